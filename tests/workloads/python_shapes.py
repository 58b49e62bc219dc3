"""Python call shapes for `tests/jit.rs`: a generator and a thread pool, blocking in
time.sleep.

Prints `ready PID`, waits for a line on stdin, then, at the same time:
- the main thread consumes a generator, `consume -> ticks` (the generator body sleeps);
- two pool threads each run `pooled -> nap`.
Each sleep is timed by the workload's own clock (time.perf_counter), per function. Prints
`slept JSON` ({"ticks": ns, "nap": ns}) and waits for one more line before it exits.
"""

import concurrent.futures
import json
import os
import sys
import threading
import time

ROUNDS = int(sys.argv[1])
SLEEP_S = int(sys.argv[2]) / 1000.0
slept = {"ticks": 0, "nap": 0}
lock = threading.Lock()


def timed_sleep(what):
    began = time.perf_counter_ns()
    time.sleep(SLEEP_S)
    with lock:
        slept[what] += time.perf_counter_ns() - began


def ticks(n):
    for i in range(n):
        timed_sleep("ticks")
        yield i


def consume():
    for _ in ticks(ROUNDS):
        pass


def nap():
    timed_sleep("nap")


def pooled(n):
    for _ in range(n):
        nap()


print("ready", os.getpid(), flush=True)
sys.stdin.readline()
with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    futures = [pool.submit(pooled, ROUNDS) for _ in range(2)]
    consume()
    for f in futures:
        f.result()
print("slept", json.dumps(slept), flush=True)
sys.stdin.readline()

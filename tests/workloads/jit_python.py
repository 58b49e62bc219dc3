"""Blocks in time.sleep from nested Python functions and a method, for `tests/jit.rs`.

Prints `ready PID`, waits for a line on stdin, then runs ROUNDS calls
outer -> Service.handle -> middle -> inner, each sleeping SLEEP_MS in inner, timed by the
workload's own clock (time.perf_counter around each sleep). Ends with `inner_ns N` and waits
for one more line before it exits (so the test can read its perf map while it lives).
"""

import os
import sys
import time

ROUNDS = int(sys.argv[1])
SLEEP_S = int(sys.argv[2]) / 1000.0
slept = [0.0]


def inner():
    began = time.perf_counter()
    time.sleep(SLEEP_S)
    slept[0] += time.perf_counter() - began


def middle():
    inner()


class Service:
    def handle(self):
        middle()


def outer():
    service = Service()
    for _ in range(ROUNDS):
        service.handle()


print("ready", os.getpid(), flush=True)
sys.stdin.readline()
outer()
print("inner_ns", int(slept[0] * 1e9), flush=True)
sys.stdin.readline()

"""Test workload for the db family's SQLite probes: Python's sqlite3 module (which calls
libsqlite3's prepare/step/reset) running known statements a known number of times.

Prints `ready PID`, waits for a line on stdin, then runs: 200 INSERTs, 50 single-row
SELECTs (fetchone: the statement is reset before it is done), 10 three-way self-joins
(fetchall), and prints its own timing of the joins as JSON: the oracle the test compares
the profiler with.
"""

import json
import os
import sqlite3
import sys
import time

print(f"ready {os.getpid()}", flush=True)
sys.stdin.readline()

db = sqlite3.connect(":memory:")
db.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)")
for i in range(200):
    db.execute("INSERT INTO t VALUES (?, ?)", (i, f"value {i}"))
db.commit()
for i in range(50):
    db.execute("SELECT v FROM t WHERE k = ?", (i,)).fetchone()
join_ns = 0
for _ in range(10):
    start = time.perf_counter_ns()
    db.execute("SELECT count(*) FROM t a, t b, t c WHERE a.k + b.k = c.k").fetchall()
    join_ns += time.perf_counter_ns() - start
db.close()
print(json.dumps({"join_ns": join_ns}), flush=True)

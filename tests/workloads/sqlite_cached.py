"""Statements prepared before the capture: Python's sqlite3 module keeps prepared statements
in its cache and steps them again, so a long-running application prepares its queries once,
long before anyone profiles it.

Runs each statement once, prints `ready PID`, waits for a line on stdin, then runs them
again from the cache (no new prepare) and prints how many times it ran each, as JSON.
"""

import json
import os
import sqlite3
import sys

BY_ID = "SELECT total FROM orders WHERE id = ?"
BY_CUSTOMER = "SELECT count(*), sum(total) FROM orders WHERE customer = ?"

db = sqlite3.connect(":memory:")
db.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, customer INTEGER, total REAL)")
db.executemany(
    "INSERT INTO orders (customer, total) VALUES (?, ?)",
    [(i % 17, i * 1.5) for i in range(500)],
)
# Prepared now, before the capture; the module's statement cache keeps them.
db.execute(BY_ID, (1,)).fetchone()
db.execute(BY_CUSTOMER, (1,)).fetchall()

print(f"ready {os.getpid()}", flush=True)
sys.stdin.readline()
for i in range(120):
    db.execute(BY_ID, (i + 1,)).fetchone()
for i in range(40):
    db.execute(BY_CUSTOMER, (i % 17,)).fetchall()
print(json.dumps({BY_ID: 120, BY_CUSTOMER: 40}), flush=True)

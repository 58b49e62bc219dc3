"""Test workload for the db family's MySQL/MariaDB probes: Python's MySQLdb (which calls
libmariadb's mysql_real_query) running known statements a known number of times.

mysql_workload.py SOCKET prints `ready PID`, waits for a line on stdin, runs 200 SELECTs
that each sleep 1 ms in the server, timing each execute() itself, and prints a JSON report.
"""

import json
import os
import sys
import time

import MySQLdb

socket_path = sys.argv[1]
print(f"ready {os.getpid()}", flush=True)
sys.stdin.readline()

db = MySQLdb.connect(unix_socket=socket_path, user="root")
cursor = db.cursor()
selects = 200
select_ns = 0
for i in range(selects):
    start = time.perf_counter_ns()
    cursor.execute(f"SELECT {i} AS mysql_probe, SLEEP(0.001)")
    cursor.fetchall()
    select_ns += time.perf_counter_ns() - start
db.close()
print(json.dumps({"selects": selects, "select_ns": select_ns}), flush=True)

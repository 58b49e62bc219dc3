"""Test workload for the db family's MySQL/MariaDB probes: Python's MySQLdb (which calls
libmariadb's mysql_real_query) running known statements a known number of times.

mysql_workload.py SOCKET prints `ready PID`, waits for a line on stdin, runs 200 SELECTs
that each sleep 1 ms in the server, timing each execute() itself, and prints a JSON report.

mysql_workload.py SOCKET multi connects with CLIENT_MULTI_STATEMENTS and sends 60 queries
of two statements each (the first sleeps 2 ms in the server, the second 6 ms): execute()
returns with the first's result (libmariadb's mysql_real_query), nextset() reads the
second's (mysql_next_result). It times each of the two itself.
"""

import json
import os
import sys
import time

import MySQLdb

socket_path = sys.argv[1]
print(f"ready {os.getpid()}", flush=True)
sys.stdin.readline()

if sys.argv[2:] == ["multi"]:
    from MySQLdb.constants import CLIENT

    db = MySQLdb.connect(
        unix_socket=socket_path, user="root", client_flag=CLIENT.MULTI_STATEMENTS
    )
    cursor = db.cursor()
    queries = 60
    first_ns = second_ns = 0
    for i in range(queries):
        start = time.perf_counter_ns()
        cursor.execute(
            f"SELECT {i} AS multi_first, SLEEP(0.002); SELECT {i} AS multi_second, SLEEP(0.006)"
        )
        first = cursor.fetchall()
        middle = time.perf_counter_ns()
        more = cursor.nextset()
        second = cursor.fetchall()
        end = time.perf_counter_ns()
        assert first == ((i, 0),) and more and second == ((i, 0),), (first, more, second)
        first_ns += middle - start
        second_ns += end - middle
    db.close()
    print(
        json.dumps({"queries": queries, "first_ns": first_ns, "second_ns": second_ns}),
        flush=True,
    )
    sys.exit(0)

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

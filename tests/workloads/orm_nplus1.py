"""The N+1 query of an ORM-shaped application: a repository class lists orders with one
query, then fetches each order's items with one more query per row.

Usage: orm_nplus1.py sqlite [--yield]
       orm_nplus1.py postgres HOST PORT   (psycopg2, over libpq; autocommit)

--yield: gives up the CPU (sched_yield) once per round, between two item queries: with a
busier process on its CPU, the thread waits there for its turn.

Prints `ready PID`, waits for a line on stdin, renders the report ROUNDS times, then prints
as JSON how many times it issued each query, the line of each execute call, the longest
time between two item queries of one round (ns, by this script's clock) and how long the
thread waited for a CPU meanwhile (ns, the kernel's schedstat run_delay).
"""

import json
import os
import sys
import time

ROUNDS = 25
ORDERS = 30

LIST = "SELECT id FROM orders ORDER BY id LIMIT {}".format(ORDERS)
ITEMS_SQLITE = "SELECT sku, qty FROM items WHERE order_id = ?"
ITEMS_PG = "SELECT sku, qty FROM items WHERE order_id = %s"

issued = {"list": 0, "items": 0}
lines = {}
# The end of the last item query's fetch, the longest time from it to the next item query of
# its round, and how many such gaps exceeded 1 ms.
gaps = {"last_end": None, "longest": 0, "over_1ms": 0}


def run_delay():
    with open("/proc/thread-self/schedstat") as f:
        return int(f.read().split()[1])


def here():
    """The line of the caller's next line: where its execute call is."""
    return sys._getframe(1).f_lineno + 1


class OrderRepository:
    def __init__(self, conn, items_sql):
        self.conn = conn
        self.items_sql = items_sql

    def order_ids(self):
        cur = self.conn.cursor()
        lines["list"] = here()
        cur.execute(LIST)
        issued["list"] += 1
        return [row[0] for row in cur.fetchall()]

    def items_for(self, order_id):
        start = time.perf_counter_ns()
        if gaps["last_end"] is not None:
            gap = start - gaps["last_end"]
            gaps["longest"] = max(gaps["longest"], gap)
            gaps["over_1ms"] += gap > 1000000
        cur = self.conn.cursor()
        lines["items"] = here()
        cur.execute(self.items_sql, (order_id,))
        issued["items"] += 1
        rows = cur.fetchall()
        gaps["last_end"] = time.perf_counter_ns()
        return rows


def render_report(repo, yield_mid_round):
    """One query for the orders, one per order for its items: the N+1."""
    total = 0
    gaps["last_end"] = None
    for n, order_id in enumerate(repo.order_ids()):
        if yield_mid_round and n == ORDERS // 2:
            os.sched_yield()
        total += sum(qty for _, qty in repo.items_for(order_id))
    return total


def fill(conn, param):
    cur = conn.cursor()
    cur.execute("DROP TABLE IF EXISTS items")
    cur.execute("DROP TABLE IF EXISTS orders")
    cur.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, customer INTEGER)")
    cur.execute("CREATE TABLE items (order_id INTEGER, sku TEXT, qty INTEGER)")
    insert_order = "INSERT INTO orders VALUES ({0}, {0})".format(param)
    insert_item = "INSERT INTO items VALUES ({0}, {0}, {0})".format(param)
    for order in range(1, 61):
        cur.execute(insert_order, (order, order % 7))
        for item in range(3):
            cur.execute(insert_item, (order, "sku-%d" % item, item + 1))
    conn.commit()


def main():
    backend = sys.argv[1]
    if backend == "sqlite":
        import sqlite3

        conn = sqlite3.connect(":memory:")
        fill(conn, "?")
        repo = OrderRepository(conn, ITEMS_SQLITE)
    elif backend == "postgres":
        import psycopg2

        conn = psycopg2.connect(
            host=sys.argv[2], port=int(sys.argv[3]), user="postgres", dbname="postgres"
        )
        fill(conn, "%s")
        conn.autocommit = True
        repo = OrderRepository(conn, ITEMS_PG)
    else:
        sys.exit("unknown backend " + backend)
    print("ready {}".format(os.getpid()), flush=True)
    sys.stdin.readline()
    total = 0
    queued = run_delay()
    for _ in range(ROUNDS):
        total += render_report(repo, "--yield" in sys.argv)
    queued = run_delay() - queued
    assert total == ROUNDS * ORDERS * 6, total
    report = {
        "issued": issued,
        "lines": lines,
        "longest_gap_ns": gaps["longest"],
        "gaps_over_1ms": gaps["over_1ms"],
        "queued_ns": queued,
    }
    print(json.dumps(report), flush=True)


main()

"""A busy Python request loop for `cargo xtask bench python`: one Python thread sends
requests through a pipe to `cat` and reads each answer back, routing each through a few
layers of Python (a handler class, a router, a view, a "repository"). Every request blocks
the Python thread once in read() (an off-CPU event with a walked stack when profiled). One
Python thread, so no GIL hand-offs muddle its CPU time.

Usage: python_requests.py REQUESTS. Prints `ready PID`, waits for a line on stdin, serves
REQUESTS requests, then prints its own CPU time (user + system) per request in ns, measured
around the loop only (cat's is not in it).
"""

import os
import subprocess
import sys
import time

REQUESTS = int(sys.argv[1])


class Repository:
    def __init__(self):
        self.rows = {i: "row-%d" % i for i in range(64)}

    def lookup(self, key):
        return self.rows[key % 64]


class View:
    def __init__(self, repo):
        self.repo = repo

    def render(self, key):
        return self.repo.lookup(key).encode()


class Router:
    def __init__(self, view):
        self.view = view

    def dispatch(self, request):
        key = int(request[4:])
        return self.view.render(key)


class Handler:
    def __init__(self, router):
        self.router = router
        self.peer = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.out = self.peer.stdin.fileno()
        self.back = self.peer.stdout.fileno()

    def exchange(self, request):
        os.write(self.out, request)
        return os.read(self.back, 64)

    def serve(self, count):
        answered = 0
        for i in range(count):
            echoed = self.exchange(b"GET %d" % i)
            answered += len(self.router.dispatch(echoed))
        return answered


def main():
    handler = Handler(Router(View(Repository())))
    print("ready {}".format(os.getpid()), flush=True)
    sys.stdin.readline()
    start = time.process_time_ns()
    handler.serve(REQUESTS)
    used = time.process_time_ns() - start
    print(used / REQUESTS, flush=True)


main()

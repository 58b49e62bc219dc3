"""A PostgreSQL client that speaks the protocol itself (no libpq): the database family must
see its queries on the wire. Also writes garbage that looks like the start of a message to
a socket pair, which must be ignored.

pg_wire_client.py SOCKET_PATH SIMPLE EXTENDED prints `ready PID`, waits for a line on
stdin, then runs SIMPLE simple-protocol queries and EXTENDED Parse/Bind/Execute/Sync
round trips (each sleeping 1 ms in the server, so the client's own overhead is small
against the round trip), timing each round trip itself, and prints a JSON report.
"""

import json
import os
import socket
import struct
import sys
import time


def message(kind, body):
    return kind + struct.pack("!I", len(body) + 4) + body


def read_until_ready(sock):
    """Reads backend messages until ReadyForQuery; returns the last CommandComplete tag."""
    buf = b""
    tag = None
    while True:
        while len(buf) < 5:
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError("server closed the connection")
            buf += chunk
        kind, length = buf[0:1], struct.unpack("!I", buf[1:5])[0]
        while len(buf) < 1 + length:
            buf += sock.recv(65536)
        body, buf = buf[5 : 1 + length], buf[1 + length :]
        if kind == b"E":
            raise RuntimeError(f"server error: {body!r}")
        if kind == b"C":
            tag = body.rstrip(b"\0").decode()
        if kind == b"Z":
            return tag


socket_path, simple, extended = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
print(f"ready {os.getpid()}", flush=True)
sys.stdin.readline()

sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(socket_path)
params = b"user\0postgres\0database\0postgres\0\0"
sock.sendall(struct.pack("!II", len(params) + 8, 196608) + params)
read_until_ready(sock)  # trust authentication: AuthenticationOk … ReadyForQuery

simple_ns = 0
for i in range(simple):
    start = time.perf_counter_ns()
    sock.sendall(message(b"Q", f"SELECT {i} AS wire_simple, pg_sleep(0.001)\0".encode()))
    read_until_ready(sock)
    simple_ns += time.perf_counter_ns() - start

extended_ns = 0
for i in range(extended):
    start = time.perf_counter_ns()
    value = str(i).encode()
    sock.sendall(
        message(b"P", b"\0SELECT $1::int AS wire_extended, pg_sleep(0.001)\0\0\0")
        + message(b"B", b"\0\0\0\0\0\x01" + struct.pack("!I", len(value)) + value + b"\0\0")
        + message(b"E", b"\0\0\0\0\0")
        + message(b"S", b"")
    )
    read_until_ready(sock)
    extended_ns += time.perf_counter_ns() - start
sock.sendall(message(b"X", b""))
sock.close()

# Garbage shaped like a Parse message without its terminator, on a socket pair.
a, b = socket.socketpair()
a.sendall(b"P\0\0\0\x09noterm!")
b.recv(100)
b.sendall(b"reply")
a.recv(100)
a.close()
b.close()

print(
    json.dumps(
        {"simple": simple, "simple_ns": simple_ns, "extended": extended, "extended_ns": extended_ns}
    ),
    flush=True,
)

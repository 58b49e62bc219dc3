"""A MySQL client that speaks the protocol itself (no client library), with server-side
prepared statements: COM_STMT_PREPARE once, then COM_STMT_EXECUTE N times. The database
family must see the executions on the wire under the prepared statement's text.

mysql_wire_client.py SOCKET N prints `ready PID`, waits for a line on stdin, runs the N
executions (each sleeps 1 ms in the server), timing each round trip itself, and prints a
JSON report. Assumes a server started with --skip-grant-tables (no password check).
"""

import json
import os
import socket
import struct
import sys
import time


class Conn:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buf = b""

    def recv_exact(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("server closed the connection")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def packet(self):
        header = self.recv_exact(4)
        length = header[0] | header[1] << 8 | header[2] << 16
        return header[3], self.recv_exact(length)

    def send(self, seq, payload):
        self.sock.sendall(struct.pack("<I", len(payload))[:3] + bytes([seq]) + payload)


def is_eof(payload):
    return payload[:1] == b"\xfe" and len(payload) < 9


socket_path, executions = sys.argv[1], int(sys.argv[2])
print(f"ready {os.getpid()}", flush=True)
sys.stdin.readline()

conn = Conn(socket_path)
conn.packet()  # server greeting
caps = 0x1 | 0x200 | 0x2000 | 0x8000 | 0x80000  # long password, 4.1, transactions, secure, plugin auth
conn.send(
    1,
    struct.pack("<IIB", caps, 1 << 24, 33)
    + b"\0" * 23
    + b"root\0"
    + b"\0"
    + b"mysql_native_password\0",
)
_, reply = conn.packet()
if reply[:1] != b"\x00":
    raise RuntimeError(f"login failed: {reply!r}")

conn.send(0, b"\x16" + b"SELECT ? + 1 AS mysql_prepared, SLEEP(0.001)")
_, ok = conn.packet()
if ok[:1] != b"\x00":
    raise RuntimeError(f"prepare failed: {ok!r}")
stmt_id, columns, params = struct.unpack("<IHH", ok[1:9])
for count in (params, columns):
    if count:
        for _ in range(count):
            conn.packet()
        conn.packet()  # EOF

elapsed = 0
for i in range(executions):
    start = time.perf_counter_ns()
    conn.send(
        0,
        b"\x17"
        + struct.pack("<IBI", stmt_id, 0, 1)
        + b"\x00"  # NULL bitmap (1 parameter)
        + b"\x01"  # new parameters bound
        + b"\x08\x00"  # MYSQL_TYPE_LONGLONG
        + struct.pack("<q", i),
    )
    _, first = conn.packet()
    if first[:1] == b"\xff":
        raise RuntimeError(f"execute failed: {first!r}")
    eofs = 0
    while eofs < 2:  # after the column definitions, and after the rows
        _, payload = conn.packet()
        if is_eof(payload):
            eofs += 1
    elapsed += time.perf_counter_ns() - start
conn.send(0, b"\x01")  # COM_QUIT
print(json.dumps({"executions": executions, "execute_ns": elapsed}), flush=True)

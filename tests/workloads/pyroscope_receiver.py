"""A Pyroscope-shaped receiver for the export tests: answers `POST /push.v1.PusherService/Push`
(Connect's JSON form of push.v1.PushRequest) and keeps what it is sent.

Usage: pyroscope_receiver.py PORT DIR [--fail-first N]

Each series' raw profile is written to DIR/<request>-<series>.pb.gz and its labels to
DIR/<request>-<series>.json. With --fail-first N the first N requests get a 503 (a store
that is briefly unavailable). Prints `listening PORT` once ready.
"""

import base64
import http.server
import json
import os
import sys


class Receiver(http.server.BaseHTTPRequestHandler):
    requests = 0
    fail_first = 0
    directory = "."

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        cls = type(self)
        cls.requests += 1
        number = cls.requests
        if self.path != "/push.v1.PusherService/Push":
            return self.answer(404, b'{"code":"not_found"}')
        if number <= cls.fail_first:
            return self.answer(503, b'{"code":"unavailable"}')
        if self.headers.get("Content-Type") != "application/json":
            return self.answer(415, b'{"code":"invalid_argument"}')
        request = json.loads(body)
        for index, series in enumerate(request["series"]):
            labels = {l["name"]: l["value"] for l in series["labels"]}
            for sample in series["samples"]:
                stem = os.path.join(cls.directory, f"{number:04d}-{index:03d}")
                with open(stem + ".pb.gz", "wb") as f:
                    f.write(base64.b64decode(sample["rawProfile"]))
                with open(stem + ".json", "w") as f:
                    json.dump({"labels": labels, "id": sample["ID"]}, f)
        self.answer(200, b"{}")

    def answer(self, status, body):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def main():
    port, directory = int(sys.argv[1]), sys.argv[2]
    Receiver.directory = directory
    if "--fail-first" in sys.argv:
        Receiver.fail_first = int(sys.argv[sys.argv.index("--fail-first") + 1])
    server = http.server.HTTPServer(("127.0.0.1", port), Receiver)
    print(f"listening {port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()

"""An OTLP/HTTP profiles receiver for the export tests, built on the official message classes
(PyPI's opentelemetry-proto, generated from opentelemetry-proto v1.10.0 — the version the
profiler encodes): it parses each `POST /v1development/profiles` body as an
ExportProfilesServiceRequest and writes what it holds, resolved through the request's
dictionary, as DIR/<request>.json:

  {"resources": [{"attributes": {key: value},
                  "profiles": [{"sample_type": [type, unit], "period_type": [type, unit],
                                "period": n, "time_unix_nano": t, "duration_nano": d,
                                "samples": [{"frames": [leaf … root], "values": [v],
                                             "attributes": {key: value}}]}]}]}

plus, over HTTP, "content_encoding" (the request's Content-Encoding; gzip bodies are
inflated by Python's gzip module) and "bytes_sent" (its Content-Length).

Usage: otlp_receiver.py PORT DIR [--grpc] [--tls CERT KEY]. With --grpc it is an OTLP/gRPC
server instead (ProfilesService/Export, grpcio, HTTP/2; grpcio inflates gzip messages
itself). With --tls it speaks TLS (Python's ssl module, i.e. OpenSSL; grpcio's own TLS) with
that certificate chain and key, both PEM.
Prints `listening PORT` once ready.
"""

import gzip
import http.server
import json
import os
import ssl
import sys

from opentelemetry.proto.collector.profiles.v1development import profiles_service_pb2
from opentelemetry.proto.common.v1 import common_pb2


def any_value(value: common_pb2.AnyValue, strings):
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value
    if kind == "int_value":
        return value.int_value
    if kind == "string_value_strindex":
        return strings[value.string_value_strindex]
    return str(getattr(value, kind)) if kind else None


def decode(body: bytes):
    request = profiles_service_pb2.ExportProfilesServiceRequest()
    request.ParseFromString(body)
    d = request.dictionary
    strings = list(d.string_table)
    assert strings and strings[0] == "", "string_table[0] must be empty"
    for table in ("mapping_table", "location_table", "function_table", "link_table",
                  "attribute_table", "stack_table"):
        first = getattr(d, table)[0]
        assert first.ByteSize() == 0, f"{table}[0] must be the zero value"

    def frames(stack_index):
        names = []
        for location_index in d.stack_table[stack_index].location_indices:
            location = d.location_table[location_index]
            for line in location.lines:
                names.append(strings[d.function_table[line.function_index].name_strindex])
        return names

    def attributes(indices):
        out = {}
        for i in indices:
            kv = d.attribute_table[i]
            out[strings[kv.key_strindex]] = any_value(kv.value, strings)
        return out

    resources = []
    for rp in request.resource_profiles:
        resource = {
            "attributes": {kv.key: any_value(kv.value, strings) for kv in rp.resource.attributes},
            "profiles": [],
        }
        for sp in rp.scope_profiles:
            for p in sp.profiles:
                resource["profiles"].append({
                    "scope": [sp.scope.name, sp.scope.version],
                    "sample_type": [strings[p.sample_type.type_strindex],
                                    strings[p.sample_type.unit_strindex]],
                    "period_type": [strings[p.period_type.type_strindex],
                                    strings[p.period_type.unit_strindex]],
                    "period": p.period,
                    "time_unix_nano": p.time_unix_nano,
                    "duration_nano": p.duration_nano,
                    "samples": [{
                        "frames": frames(s.stack_index),
                        "values": list(s.values),
                        "attributes": attributes(s.attribute_indices),
                    } for s in p.samples],
                })
        resources.append(resource)
    return {"resources": resources}


class Receiver(http.server.BaseHTTPRequestHandler):
    requests = 0
    directory = "."

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        encoding = self.headers.get("Content-Encoding", "identity")
        if encoding == "gzip":
            body = gzip.decompress(body)
        cls = type(self)
        cls.requests += 1
        if self.path != "/v1development/profiles":
            return self.answer(404, b"")
        if self.headers.get("Content-Type") != "application/x-protobuf":
            return self.answer(415, b"")
        try:
            decoded = decode(body)
        except Exception as err:  # a request the official classes cannot read: a 400
            with open(os.path.join(cls.directory, f"{cls.requests:04d}.error"), "w") as f:
                f.write(repr(err))
            return self.answer(400, b"")
        decoded["content_encoding"] = encoding
        decoded["bytes_sent"] = length
        with open(os.path.join(cls.directory, f"{cls.requests:04d}.json"), "w") as f:
            json.dump(decoded, f)
        response = profiles_service_pb2.ExportProfilesServiceResponse()
        self.answer(200, response.SerializeToString())

    def answer(self, status, body):
        self.send_response(status)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def serve_grpc(port, directory, tls):
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.profiles.v1development import profiles_service_pb2_grpc

    class Service(profiles_service_pb2_grpc.ProfilesServiceServicer):
        requests = 0

        def Export(self, request, context):
            Service.requests += 1
            decoded = decode(request.SerializeToString())
            with open(os.path.join(directory, f"{Service.requests:04d}.json"), "w") as f:
                json.dump(decoded, f)
            return profiles_service_pb2.ExportProfilesServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    profiles_service_pb2_grpc.add_ProfilesServiceServicer_to_server(Service(), server)
    if tls:
        cert, key = (open(path, "rb").read() for path in tls)
        credentials = grpc.ssl_server_credentials([(key, cert)])
        server.add_secure_port(f"127.0.0.1:{port}", credentials)
    else:
        server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"listening {port}", flush=True)
    server.wait_for_termination()


def main():
    port, directory = int(sys.argv[1]), sys.argv[2]
    tls = None
    if "--tls" in sys.argv:
        at = sys.argv.index("--tls")
        tls = (sys.argv[at + 1], sys.argv[at + 2])
    if "--grpc" in sys.argv:
        return serve_grpc(port, directory, tls)
    Receiver.directory = directory
    server = http.server.HTTPServer(("127.0.0.1", port), Receiver)
    if tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        context.set_alpn_protocols(["http/1.1"])
        server.socket = context.wrap_socket(server.socket, server_side=True)
    print(f"listening {port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()

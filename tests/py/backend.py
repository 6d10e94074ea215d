#!/usr/bin/env python3
"""Recording HTTP backend for the filter end-to-end tests.

Listens dual-stack on [::]:PORT, answers every request (any method token,
including lowercase and unknown ones) with 200 and the body
"backend saw METHOD PATH\\n", and appends one JSON line
{"method", "path", "version"} per request to --log, flushed *before* the
response is sent, so a test that has seen the response can trust the log.
It must not interpret the request any further: the tests need to see exactly
what reached the backend.

Two paths behave differently, for the tests of the filter's egress view:
  /slow      answers after SLOW_S seconds (a backend still working on a request)
  /upgrade   with an Upgrade header: answers 101 and becomes a tunnel; it records
             the tunnel's first line as {"method": "TUNNEL", "path": <line>}, reads
             what else comes until 0.3 s pass quietly, and closes
Every other request carrying Upgrade is answered 200 like any other (the upgrade
is refused by ignoring it, as RFC 9110 allows).
"""

import argparse
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


SLOW_S = 0.6


class DualStackServer(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    allow_reuse_address = True

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class RecordingHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    log_file = None
    log_lock = threading.Lock()

    def __getattr__(self, name):
        # BaseHTTPRequestHandler dispatches to do_<METHOD>; answer every token.
        if name.startswith("do_"):
            return self._answer
        raise AttributeError(name)

    def _drain_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size_line = self.rfile.readline(65537)
                if not size_line:
                    return
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    # trailer section up to the empty line
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return
                self.rfile.read(size)
                self.rfile.readline(65537)  # CRLF after the chunk
        length = self.headers.get("Content-Length")
        if length:
            self.rfile.read(int(length))

    def _record(self, method, path):
        record = {"method": method, "path": path, "version": self.request_version}
        with self.log_lock:
            self.log_file.write(json.dumps(record) + "\n")
            self.log_file.flush()

    def _tunnel(self):
        self.send_response(101)
        self.send_header("Upgrade", self.headers.get("Upgrade", ""))
        self.send_header("Connection", "Upgrade")
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        try:
            first = self.rfile.readline(65537)
            if first:
                self._record("TUNNEL", first.decode("utf-8", "surrogateescape").rstrip("\r\n"))
            # Take what else comes for a moment, then close (with nothing unread: a clean FIN).
            self.connection.settimeout(0.3)
            while self.rfile.read1(65536):
                pass
        except OSError:  # the quiet moment ended, or the client reset the connection
            pass

    def _answer(self):
        self._drain_body()
        self._record(self.command, self.path)
        if self.path == "/upgrade" and self.headers.get("Upgrade"):
            self._tunnel()
            return
        if self.path == "/slow":
            time.sleep(SLOW_S)
        body = f"backend saw {self.command} {self.path}\n".encode("utf-8", "surrogateescape")
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format, *args):  # quiet
        pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", required=True, help="file to append JSON lines to")
    args = parser.parse_args()
    RecordingHandler.log_file = open(args.log, "a", encoding="utf-8")
    server = DualStackServer(("::", args.port), RecordingHandler)
    print(f"backend listening on [::]:{args.port}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()

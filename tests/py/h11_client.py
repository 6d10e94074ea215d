#!/usr/bin/env python3
"""Strict one-request HTTP/1.1 client for the filter end-to-end tests.

Sends one request built by h11 (so the request itself is well-formed), reads
every byte until the peer closes (or 5 s pass), then lets h11 judge the
response. Prints ONE JSON object on stdout:
  raw_b64    every byte received, base64
  eof        "clean" (recv returned b""), "reset" (ConnectionResetError) or "timeout"
  h11_ok     h11 parsed one complete response without a protocol error
  status     status code or null
  headers    [[name, value], ...], names lowercased
  body       response body (utf-8, replacement characters on error)
  h11_error  the h11 error, or null
It judges nothing else: the Rust tests check the raw bytes themselves, because
h11 accepts bare LF and folded headers.
"""

import argparse
import base64
import json
import socket
import sys
import time

import h11

TIMEOUT_S = 5.0


def host_header(host, port):
    name = f"[{host}]" if ":" in host else host
    return name if port == 80 else f"{name}:{port}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--method", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--header", action="append", default=[], help="'Name: value', repeatable")
    parser.add_argument("--body", default=None, help="request body (sets Content-Length)")
    args = parser.parse_args()

    headers = [("Host", host_header(args.host, args.port))]
    for h in args.header:
        name, sep, value = h.partition(":")
        if not sep:
            parser.error(f"--header {h!r} is not 'Name: value'")
        headers.append((name.strip(), value.strip()))
    body = args.body.encode() if args.body is not None else b""
    if args.body is not None:
        headers.append(("Content-Length", str(len(body))))

    conn = h11.Connection(our_role=h11.CLIENT)
    out = conn.send(h11.Request(method=args.method, target=args.target, headers=headers))
    if body:
        out += conn.send(h11.Data(data=body))
    out += conn.send(h11.EndOfMessage())

    sock = socket.create_connection((args.host, args.port), timeout=TIMEOUT_S)
    sock.sendall(out)

    raw = b""
    eof = "timeout"
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            sock.settimeout(remaining)
            chunk = sock.recv(65536)
            if chunk == b"":
                eof = "clean"
                break
            raw += chunk
    except ConnectionResetError:
        eof = "reset"
    except socket.timeout:
        eof = "timeout"
    finally:
        sock.close()

    status = None
    resp_headers = []
    resp_body = b""
    h11_error = None
    complete = False
    try:
        conn.receive_data(raw)
        if eof == "clean":
            conn.receive_data(b"")
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Response):
                status = event.status_code
                resp_headers = [[n.decode("latin-1"), v.decode("latin-1")] for n, v in event.headers]
            elif isinstance(event, h11.InformationalResponse):
                continue
            elif isinstance(event, h11.Data):
                resp_body += event.data
            elif isinstance(event, h11.EndOfMessage):
                complete = True
                break
            elif event is h11.NEED_DATA:
                h11_error = "incomplete response (h11 needs more data)"
                break
            elif isinstance(event, h11.ConnectionClosed):
                h11_error = "connection closed before a complete response"
                break
            else:
                h11_error = f"unexpected event {event!r}"
                break
    except h11.RemoteProtocolError as e:
        h11_error = f"RemoteProtocolError: {e}"

    json.dump(
        {
            "raw_b64": base64.b64encode(raw).decode("ascii"),
            "eof": eof,
            "h11_ok": complete and h11_error is None,
            "status": status,
            "headers": resp_headers,
            "body": resp_body.decode("utf-8", "replace"),
            "h11_error": h11_error,
        },
        sys.stdout,
    )
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Raw TCP client for the filter end-to-end tests: the kernel's own TCP stack, no HTTP library.

Usage: raw_client.py HOST PORT DELAY_S PART_HEX [PART_HEX ...]
Connects, writes each part with sendall (DELAY_S apart), then reads every byte until the
peer closes (or 10 s pass). Prints ONE JSON object: raw_b64 (every byte received), eof
("clean", "reset" or "timeout"). It judges nothing: the Rust tests hold the expectations.
"""

import base64
import json
import socket
import sys
import time


def main():
    host, port, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    parts = [bytes.fromhex(p) for p in sys.argv[4:]]
    s = socket.create_connection((host, port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for i, p in enumerate(parts):
        if i:
            time.sleep(delay)
        s.sendall(p)
    buf, eof = b"", "timeout"
    try:
        while True:
            b = s.recv(65536)
            if not b:
                eof = "clean"
                break
            buf += b
    except ConnectionResetError:
        eof = "reset"
    except socket.timeout:
        pass
    print(json.dumps({"raw_b64": base64.b64encode(buf).decode(), "eof": eof}))


if __name__ == "__main__":
    main()

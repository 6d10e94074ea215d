#!/usr/bin/env python3
"""Segment-level TCP client for the evasion suite (tests/tests/evasion.rs).

Reads cases as JSON, one per line on stdin (a single case is one line), runs
each against the server and prints one JSON line per case, flushed, so the
caller can look at the backend between cases. It must run in the client
namespace and sends from a source address no interface there owns, so the
client kernel never answers (or resets) the connection; the server side needs
a static neighbour entry for that address.

A case:
  iface, src_mac, dst_mac   client veth, its MAC, the server's MAC
  src, dst, dport           addresses (IPv4 or IPv6) and port
  vlan                      802.1Q ids to tag with: [] | [id] | [outer 802.1ad, inner, ...]
  ip                        "none" | "v4_options" | "v6_destopts" | "v6_hopbyhop"
                            | "v6_destopts_7" (seven Destination Options headers)
                            | "fragments"
                            vlan and ip apply to every segment that carries data; the
                            handshake and bare ACKs are plain
  segments                  [{"off": stream offset, "data_b64": ..., "delay_ms": ...,
                              "tweak": {...}}]
                            sent in this order after the handshake, seq = isn+1+off.
                            A tweak makes a segment one the server's TCP may discard or
                            read differently: "bad_csum": true, "flags": TCP flags instead
                            of PSH|ACK, "ack_delta": added to the acknowledgement number,
                            "urg": an urgent pointer (with URG). A segment tweaked to be
                            discarded (anything but "urg") does not count as the bytes'
                            last copy for the retransmissions.
  settle_ms, timeout_ms     quiet time after everything is acknowledged; hard bound

Unacknowledged bytes are retransmitted in order (as a real TCP would, so a
filter may drop out-of-order segments); a retransmission carries, for every
byte, the copy sent last. Data from the server is reassembled and acknowledged.

A result:
  handshake, received_b64 (the server's in-order byte stream up to its FIN),
  fin, rst, after_fin (data bytes the server sent beyond its FIN),
  acked (bytes of ours the server acknowledged), retransmits, server_vlans
  (802.1Q ids seen on the server's frames, 0 for untagged), error
It must not judge anything: the Rust side holds the expectations.
"""

import base64
import json
import random
import select
import sys
import time
import traceback

from scapy.config import conf
from scapy.layers.inet import IP, TCP, IPOption_RR
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    PadN,
)
from scapy.layers.l2 import Dot1AD, Dot1Q, Ether
from scapy.packet import Raw

conf.verb = 0

RTO = 0.2  # retransmit when the server's ACK has not moved for this long
MSS = 1200
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10


def seq_add(a, b):
    return (a + b) & 0xFFFFFFFF


def seq_diff(a, b):
    """a - b in sequence space, signed."""
    d = (a - b) & 0xFFFFFFFF
    return d - (1 << 32) if d >= (1 << 31) else d


class Conn:
    def __init__(self, sock, case):
        self.sock = sock
        self.c = case
        self.v6 = ":" in case["dst"]
        self.sport = random.randint(20000, 60000)
        self.dport = case["dport"]
        self.isn = random.randint(0, 0xFFFFFFFF)
        self.snd_base = seq_add(self.isn, 1)
        self.rcv_nxt = None
        self.received = bytearray()
        self.ooo = {}  # server seq -> bytes, beyond rcv_nxt
        self.fin = False
        self.after_fin = 0  # data bytes the server sent beyond its own FIN
        self.rst = False
        self.una = 0  # stream offset the server acknowledged
        self.server_vlans = set()
        self.ip_id = random.randint(1, 0xFFFF)

    # -- building -----------------------------------------------------------

    def l2(self, carries_data):
        e = Ether(src=self.c["src_mac"], dst=self.c["dst_mac"])
        tags = (self.c.get("vlan") or []) if carries_data else []
        if len(tags) >= 2:
            e = e / Dot1AD(vlan=tags[0])
            for t in tags[1:]:
                e = e / Dot1Q(vlan=t)
        elif len(tags) == 1:
            e = e / Dot1Q(vlan=tags[0])
        return e

    def tcp(self, flags, off=0, data=b"", seq=None, tweak=None):
        tweak = tweak or {}
        flags = tweak.get("flags", flags)
        t = TCP(
            sport=self.sport,
            dport=self.dport,
            flags=flags,
            seq=seq if seq is not None else seq_add(self.snd_base, off),
            ack=seq_add(self.rcv_nxt or 0, tweak.get("ack_delta", 0)),
            window=65535,
        )
        if "urg" in tweak:
            t.flags = int(t.flags) | 0x20
            t.urgptr = tweak["urg"]
        if flags & SYN:
            t.options = [("MSS", MSS)]
        if data:
            t = t / Raw(data)
        if tweak.get("bad_csum"):
            # The right checksum (scapy computes it with the pseudo-header), then wrong.
            t = TCP(bytes(self.ip_for_csum() / t)[self.ip_hlen():])
            t.chksum ^= 0x0101
        return t

    def ip_for_csum(self):
        if self.v6:
            return IPv6(src=self.c["src"], dst=self.c["dst"])
        return IP(src=self.c["src"], dst=self.c["dst"])

    def ip_hlen(self):
        return 40 if self.v6 else 20

    def frames(self, tcp, carries_data):
        tweak = self.c.get("ip", "none") if carries_data else "none"
        self.ip_id = (self.ip_id + 1) & 0xFFFF
        if not self.v6:
            ip = IP(src=self.c["src"], dst=self.c["dst"], id=self.ip_id, flags="DF")
            if tweak == "v4_options":
                ip.options = [IPOption_RR(pointer=4, routers=["0.0.0.0"])]
            if tweak == "fragments":
                ip.flags = 0
                whole = IP(bytes(ip / tcp))
                l4 = bytes(whole.payload)
                return [
                    self.l2(carries_data)
                    / IP(src=self.c["src"], dst=self.c["dst"], id=self.ip_id, proto=6,
                         flags="MF" if end < len(l4) else 0, frag=start // 8)
                    / Raw(l4[start:end])
                    for start, end in fragment_bounds(len(l4))
                ]
            return [self.l2(carries_data) / ip / tcp]
        ip = IPv6(src=self.c["src"], dst=self.c["dst"])
        if tweak == "v6_destopts":
            return [self.l2(carries_data) / ip / IPv6ExtHdrDestOpt(options=[PadN(optdata=b"\x00" * 4)]) / tcp]
        if tweak == "v6_destopts_7":
            exts = ip
            for _ in range(7):
                exts = exts / IPv6ExtHdrDestOpt(options=[PadN(optdata=b"\x00" * 4)])
            return [self.l2(carries_data) / exts / tcp]
        if tweak == "v6_hopbyhop":
            return [self.l2(carries_data) / ip / IPv6ExtHdrHopByHop(options=[PadN(optdata=b"\x00" * 4)]) / tcp]
        if tweak == "fragments":
            whole = IPv6(bytes(ip / tcp))
            l4 = bytes(whole.payload)
            return [
                self.l2(carries_data)
                / IPv6(src=self.c["src"], dst=self.c["dst"], nh=44)
                / IPv6ExtHdrFragment(nh=6, offset=start // 8, m=1 if end < len(l4) else 0,
                                     id=self.ip_id)
                / Raw(l4[start:end])
                for start, end in fragment_bounds(len(l4))
            ]
        return [self.l2(carries_data) / ip / tcp]

    def send(self, flags, off=0, data=b"", seq=None, tweak=None):
        for f in self.frames(self.tcp(flags, off, data, seq, tweak), bool(data)):
            self.sock.send(f)

    # -- receiving ----------------------------------------------------------

    def poll(self, timeout, until=None):
        """Handles every server segment that arrives within `timeout` s, or until
        `until()` holds; returns how many."""
        n = 0
        deadline = time.monotonic() + timeout
        while not (until and until()):
            left = deadline - time.monotonic()
            if left <= 0:
                return n
            r, _, _ = select.select([self.sock], [], [], left)
            if not r:
                return n
            pkt = self.sock.recv()
            if pkt is None or TCP not in pkt:
                continue
            ipl = IPv6 if self.v6 else IP
            if ipl not in pkt or pkt[ipl].src != self.c["dst"] or pkt[ipl].dst != self.c["src"]:
                continue
            t = pkt[TCP]
            if t.sport != self.dport or t.dport != self.sport:
                continue
            self.server_vlans.add(pkt[Dot1Q].vlan if Dot1Q in pkt else 0)
            n += 1
            self.segment(t)
        return n

    def segment(self, t):
        flags = int(t.flags)
        if flags & RST:
            self.rst = True
            return
        if flags & SYN and flags & ACK and self.rcv_nxt is None:
            if t.ack == self.snd_base:
                self.rcv_nxt = seq_add(t.seq, 1)
            return
        if self.rcv_nxt is None:
            return
        if flags & ACK:
            acked = seq_diff(t.ack, self.snd_base)
            if acked > self.una:
                self.una = acked
        data = bytes(t[Raw].load) if Raw in t else b""
        length = len(data)
        if data and self.fin:
            # A FIN ends the server's stream: a real TCP ignores what follows.
            if seq_diff(seq_add(t.seq, length), self.rcv_nxt) > 0:
                self.after_fin += length
            data = b""
        if data:
            d = seq_diff(t.seq, self.rcv_nxt)
            if d <= 0:
                data = data[-d:] if -d < len(data) else b""
                self.take(data)
            else:
                self.ooo[t.seq] = data
        if flags & FIN:
            end = seq_add(t.seq, length)
            if end == self.rcv_nxt:
                self.rcv_nxt = seq_add(self.rcv_nxt, 1)
                self.fin = True
        if data or flags & FIN:
            self.send(ACK, seq=seq_add(self.snd_base, self.una))

    def take(self, data):
        self.received += data
        self.rcv_nxt = seq_add(self.rcv_nxt, len(data))
        progress = True
        while progress:
            progress = False
            for s in list(self.ooo):
                d = seq_diff(s, self.rcv_nxt)
                if d <= 0:
                    chunk = self.ooo.pop(s)
                    if -d < len(chunk):
                        self.received += chunk[-d:]
                        self.rcv_nxt = seq_add(self.rcv_nxt, len(chunk) + d)
                        progress = True


def fragment_bounds(n):
    """The first fragment holds the TCP header and a few data bytes; then 16-byte pieces."""
    bounds, start, size = [], 0, 32
    while start < n:
        end = min(n, start + size)
        bounds.append((start, end))
        start, size = end, 16
    return bounds


def run_case(sock, case):
    t0 = time.monotonic()
    hard = t0 + case.get("timeout_ms", 4000) / 1000
    settle = case.get("settle_ms", 300) / 1000
    conn = Conn(sock, case)
    segs = [(s["off"], base64.b64decode(s["data_b64"]), s.get("delay_ms", 0), s.get("tweak"))
            for s in case["segments"]]
    end = max((off + len(d) for off, d, _, _ in segs), default=0)
    last = bytearray(end)  # for each byte, the copy sent last (tweaked copies aside)
    for off, d, _, tweak in segs:
        if not tweak or set(tweak) <= {"urg"}:
            last[off:off + len(d)] = d

    for _ in range(3):
        conn.send(SYN, seq=conn.isn)
        conn.poll(0.5, until=lambda: conn.rcv_nxt is not None or conn.rst)
        if conn.rcv_nxt is not None or conn.rst:
            break
    result = {"handshake": conn.rcv_nxt is not None}
    if conn.rcv_nxt is not None:
        conn.send(ACK)
        for off, d, delay, tweak in segs:
            if delay:
                conn.poll(delay / 1000)
            # Back to back: no reading between segments unless the row asks for a delay.
            conn.send(PSH | ACK, off=off, data=d, tweak=tweak)
        retransmits = 0
        last_progress = time.monotonic()
        quiet_since = time.monotonic()
        una_seen = conn.una
        while time.monotonic() < hard:
            if conn.poll(0.05):
                quiet_since = time.monotonic()
            now = time.monotonic()
            if conn.una != una_seen:
                una_seen, last_progress = conn.una, now
            if conn.rst or conn.fin:
                conn.poll(0.1)  # stragglers (the responder's FIN after its data, an RST)
                break
            if conn.una >= end:
                if now - quiet_since >= settle:
                    break
            elif now - last_progress >= RTO:
                start = conn.una
                conn.send(PSH | ACK, off=start, data=bytes(last[start:start + MSS]))
                retransmits += 1
                last_progress = now
        result["retransmits"] = retransmits
        if not conn.rst:
            # Leave nothing behind on the server: reset at our next sequence number.
            conn.send(RST | ACK, seq=seq_add(conn.snd_base, max(conn.una, end)))
    result.update(
        received_b64=base64.b64encode(bytes(conn.received)).decode(),
        fin=conn.fin,
        after_fin=conn.after_fin,
        rst=conn.rst,
        acked=conn.una,
        sent=end,
        server_vlans=sorted(conn.server_vlans),
        elapsed_ms=int((time.monotonic() - t0) * 1000),
        error=None,
    )
    return result


def main():
    sock = None
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            case = json.loads(line)
            if sock is None:
                sock = conf.L2socket(iface=case["iface"])
            out = run_case(sock, case)
        except Exception:  # report, keep serving the next case
            out = {"handshake": False, "error": traceback.format_exc()}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()

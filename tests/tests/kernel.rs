//! Tier 2: kernel fixture tests. Frames go through the loaded classifier with
//! `BPF_PROG_TEST_RUN`; each case states the policy, the frame, the verdict reason the kernel
//! must count, and what it must do to the frame and tell the responder.
//!
//! Needs root and the kernel object embedded in `filter-userspace` (`cargo xtask test`).

use std::net::{Ipv4Addr, Ipv6Addr};

use filter_common::{csum, tcp_flags, Method, Reason, RejectEvent, FAMILY_V4, FAMILY_V6};
use filter_tests::lab;
use filter_userspace::dataplane::Dataplane;
use filter_userspace::policy::{parse_toml, Policy};

const PASS: i32 = -1;
const DROP: i32 = 2;
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const SERVER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const SEQ: u32 = 0x1000_0000;
const ACK: u32 = 0x2000_0000;

use filter_tests::lab::SAMPLE_POLICY as POLICY;

#[derive(Clone, Copy)]
enum Ip {
    V4,
    /// IPv4 with this many 4-byte words of options (NOPs).
    V4Options(u8),
    V4Fragment,
    V6,
}

struct Frame {
    /// Sequence number of the first payload byte (of the SYN itself if `syn`).
    seq: u32,
    syn: bool,
    ip: Ip,
    /// Client port: each case is its own connection (the classifier follows connections).
    sport: u16,
    proto: u8,
    dport: u16,
    payload: Vec<u8>,
}

static NEXT_PORT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(40000);

/// A TCP segment on a connection of its own (the classifier follows connections).
fn tcp(ip: Ip, dport: u16, payload: &[u8]) -> Frame {
    let sport = NEXT_PORT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Frame {
        seq: SEQ,
        syn: false,
        ip,
        sport,
        proto: 6,
        dport,
        payload: payload.to_vec(),
    }
}

fn build(f: &Frame) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&f.sport.to_be_bytes());
    l4.extend_from_slice(&f.dport.to_be_bytes());
    if f.proto == 6 {
        l4.extend_from_slice(&f.seq.to_be_bytes());
        l4.extend_from_slice(&ACK.to_be_bytes());
        // 12 bytes of options (NOP NOP + timestamp), as Linux clients send.
        l4.push(8 << 4);
        l4.push(if f.syn {
            tcp_flags::SYN
        } else {
            tcp_flags::PSH | tcp_flags::ACK
        });
        l4.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
        l4.extend_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
    } else {
        l4.extend_from_slice(&((8 + f.payload.len()) as u16).to_be_bytes());
        l4.extend_from_slice(&[0, 0]);
    }
    l4.extend_from_slice(&f.payload);
    let mut frame = Vec::new();
    frame.extend_from_slice(&SERVER_MAC);
    frame.extend_from_slice(&CLIENT_MAC);
    match f.ip {
        Ip::V6 => {
            let (src, dst) = (v6(1), v6(2));
            frame.extend_from_slice(&0x86ddu16.to_be_bytes());
            frame.extend_from_slice(&[0x60, 0, 0, 0]);
            frame.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            frame.extend_from_slice(&[f.proto, 64]);
            frame.extend_from_slice(&src);
            frame.extend_from_slice(&dst);
            if f.proto == 6 {
                let c = csum::finish(csum::add(csum::pseudo_v6(&src, &dst, l4.len() as u32), &l4));
                l4[16..18].copy_from_slice(&c.to_be_bytes());
            }
        }
        _ => {
            let opt_words = if let Ip::V4Options(n) = f.ip { n } else { 0 };
            let (src, dst) = (
                Ipv4Addr::new(10, 77, 0, 1).octets(),
                Ipv4Addr::new(10, 77, 0, 2).octets(),
            );
            let hlen = 20 + 4 * opt_words as usize;
            let mut ip = vec![0u8; hlen];
            ip[0] = 0x40 | (hlen / 4) as u8;
            ip[2..4].copy_from_slice(&((hlen + l4.len()) as u16).to_be_bytes());
            ip[6] = if matches!(f.ip, Ip::V4Fragment) {
                0x20
            } else {
                0x40
            };
            ip[8] = 64;
            ip[9] = f.proto;
            ip[12..16].copy_from_slice(&src);
            ip[16..20].copy_from_slice(&dst);
            for b in &mut ip[20..] {
                *b = 1; // NOP options
            }
            let c = csum::finish(csum::add(0, &ip));
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            if f.proto == 6 {
                let c = csum::finish(csum::add(csum::pseudo_v4(&src, &dst, l4.len() as u16), &l4));
                l4[16..18].copy_from_slice(&c.to_be_bytes());
            }
            frame.extend_from_slice(&0x0800u16.to_be_bytes());
            frame.extend_from_slice(&ip);
        }
    }
    frame.extend_from_slice(&l4);
    frame
}

fn v6(last: u16) -> [u8; 16] {
    Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, last).octets()
}

struct Case {
    name: &'static str,
    frame: Vec<u8>,
    reason: Reason,
    /// For rejections: the method the event names and the `Allow` set.
    rejected: Option<(Method, &'static [Method])>,
}

fn case(name: &'static str, f: Frame, reason: Reason) -> Case {
    Case {
        name,
        frame: build(&f),
        reason,
        rejected: None,
    }
}

fn reject(name: &'static str, f: Frame, method: Method, allow: &'static [Method]) -> Case {
    Case {
        name,
        frame: build(&f),
        reason: Reason::Rejected,
        rejected: Some((method, allow)),
    }
}

/// A request the filter stops and the responder answers (405, 400, 414, ...).
fn answer(
    name: &'static str,
    f: Frame,
    reason: Reason,
    method: Method,
    allow: &'static [Method],
) -> Case {
    Case {
        name,
        frame: build(&f),
        reason,
        rejected: Some((method, allow)),
    }
}

fn counters(dp: &Dataplane) -> Vec<(Reason, u64)> {
    dp.counters().expect("counters")
}

fn delta(before: &[(Reason, u64)], after: &[(Reason, u64)]) -> Vec<(Reason, u64)> {
    before
        .iter()
        .zip(after)
        .filter(|(b, a)| a.1 != b.1)
        .map(|(b, a)| (a.0, a.1 - b.1))
        .collect()
}

/// Check the rewritten frame: a bare RST|ACK with the segment's sequence number, correct
/// lengths and checksums.
fn assert_reset(name: &str, input: &[u8], out: &[u8]) {
    let v4 = u16::from_be_bytes([input[12], input[13]]) == 0x0800;
    let l4 = if v4 {
        14 + ((input[14] & 0x0f) as usize) * 4
    } else {
        54
    };
    assert_eq!(out.len(), l4 + 20, "{name}: payload and options removed");
    let t = &out[l4..];
    assert_eq!(t[13], tcp_flags::RST | tcp_flags::ACK, "{name}: flags");
    assert_eq!(t[12] >> 4, 5, "{name}: data offset");
    assert_eq!(
        u32::from_be_bytes(t[4..8].try_into().unwrap()),
        SEQ,
        "{name}: seq is the backend's rcv_nxt"
    );
    assert_eq!(&t[0..4], &input[l4..l4 + 4], "{name}: ports");
    if v4 {
        let ip = &out[14..l4];
        assert_eq!(
            u16::from_be_bytes([ip[2], ip[3]]) as usize,
            ip.len() + 20,
            "{name}: tot_len"
        );
        assert_eq!(
            csum::finish(csum::add(0, ip)),
            0,
            "{name}: IPv4 header checksum"
        );
        let (s, d) = (
            ip[12..16].try_into().unwrap(),
            ip[16..20].try_into().unwrap(),
        );
        assert_eq!(
            csum::finish(csum::add(csum::pseudo_v4(&s, &d, 20), t)),
            0,
            "{name}: TCP checksum"
        );
    } else {
        assert_eq!(
            u16::from_be_bytes([out[18], out[19]]),
            20,
            "{name}: payload_len"
        );
        let (s, d) = (
            out[22..38].try_into().unwrap(),
            out[38..54].try_into().unwrap(),
        );
        assert_eq!(
            csum::finish(csum::add(csum::pseudo_v6(&s, &d, 20), t)),
            0,
            "{name}: TCP checksum"
        );
    }
}

fn load(policy: &Policy) -> Dataplane {
    lab::check_prerequisites().expect("prerequisites");
    let mut dp = Dataplane::load(&[80, 8080]).expect("the classifier loads and verifies");
    dp.apply(policy).expect("policy applies");
    dp
}

#[test]
fn verdicts_table() {
    if !lab::e2e_enabled("kernel::verdicts_table") {
        return;
    }
    use Method::*;
    let mut dp = load(&parse_toml(POLICY).unwrap());
    let mut events = dp.take_events().expect("event ring");
    let long_path = format!("GET /{} HTTP/1.1\r\n", "a".repeat(1100));
    let cases = vec![
        case(
            "allowed by rule, v4",
            tcp(Ip::V4, 80, b"GET /api/items HTTP/1.1\r\nHost: x\r\n\r\n"),
            Reason::AllowedByRule,
        ),
        case(
            "allowed by rule, v6",
            tcp(Ip::V6, 80, b"POST /api/items HTTP/1.1\r\n\r\n"),
            Reason::AllowedByRule,
        ),
        case(
            "GET implies HEAD",
            tcp(Ip::V4, 80, b"HEAD /admin HTTP/1.1\r\n\r\n"),
            Reason::AllowedByRule,
        ),
        case(
            "query ignored",
            tcp(Ip::V4, 80, b"GET /api/items?x=/admin HTTP/1.1\r\n\r\n"),
            Reason::AllowedByRule,
        ),
        case(
            "no rule: default any",
            tcp(Ip::V4, 80, b"DELETE /other HTTP/1.1\r\n\r\n"),
            Reason::AllowedByDefault,
        ),
        case(
            "second port inspected",
            tcp(Ip::V4, 8080, b"GET /x HTTP/1.1\r\n\r\n"),
            Reason::AllowedByDefault,
        ),
        case(
            "other port untouched",
            tcp(Ip::V4, 443, b"DELETE /admin HTTP/1.1\r\n\r\n"),
            Reason::OtherPort,
        ),
        case(
            "udp",
            Frame {
                seq: SEQ,
                syn: false,
                ip: Ip::V4,
                sport: 1,
                proto: 17,
                dport: 80,
                payload: b"DELETE /admin".to_vec(),
            },
            Reason::NotTcp,
        ),
        case(
            "fragment",
            tcp(Ip::V4Fragment, 80, b"DELETE /admin HTTP/1.1\r\n"),
            Reason::Fragment,
        ),
        case("no payload", tcp(Ip::V4, 80, b""), Reason::NoPayload),
        case(
            "not http",
            tcp(Ip::V4, 80, b"\x16\x03\x01\x00\xa5\x01\x00"),
            Reason::NotHttp,
        ),
        case(
            "h2 preface",
            tcp(Ip::V6, 80, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Reason::NotHttp,
        ),
        case(
            "split request line",
            tcp(Ip::V4, 80, b"DELETE /adm"),
            Reason::MidStream,
        ),
        answer(
            "path over the bound: 414",
            tcp(Ip::V4, 80, long_path.as_bytes()),
            Reason::LineTooLong,
            Other,
            &[],
        ),
        case(
            "OPTIONS passes by default",
            tcp(Ip::V4, 80, b"OPTIONS /admin HTTP/1.1\r\n\r\n"),
            Reason::OptionsPassed,
        ),
        reject(
            "disallowed, v4",
            tcp(Ip::V4, 80, b"DELETE /api/items HTTP/1.1\r\nHost: x\r\n\r\n"),
            Delete,
            &[Get, Head, Post],
        ),
        reject(
            "disallowed, v6",
            tcp(Ip::V6, 80, b"PUT /admin HTTP/1.1\r\n\r\n"),
            Put,
            &[Get, Head],
        ),
        reject(
            "IPv4 options",
            tcp(Ip::V4Options(3), 80, b"DELETE /admin HTTP/1.1\r\n\r\n"),
            Delete,
            &[Get, Head],
        ),
        reject(
            "lowercase method",
            tcp(Ip::V4, 80, b"get /admin HTTP/1.1\r\n\r\n"),
            Other,
            &[Get, Head],
        ),
        reject(
            "absolute form",
            tcp(Ip::V4, 80, b"DELETE http://x/admin HTTP/1.1\r\n\r\n"),
            Delete,
            &[Get, Head],
        ),
        reject(
            "HTTP/0.9 style",
            tcp(Ip::V6, 80, b"DELETE /admin\r\n"),
            Delete,
            &[Get, Head],
        ),
        reject(
            "leading blank line",
            tcp(Ip::V4, 80, b"\r\nDELETE /admin HTTP/1.1\r\n\r\n"),
            Delete,
            &[Get, Head],
        ),
    ];
    for c in &cases {
        let before = counters(&dp);
        let out = dp
            .test_run(&c.frame, 1)
            .unwrap_or_else(|e| panic!("{}: {e}", c.name));
        let want_action = if c.reason == Reason::Fragment {
            DROP
        } else {
            PASS
        };
        assert_eq!(out.action, want_action, "{}: TC action", c.name);
        assert_eq!(
            delta(&before, &counters(&dp)),
            [(c.reason, 1)],
            "{}: counted reason",
            c.name
        );
        let event = events
            .next()
            .map(|item| unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<RejectEvent>()) });
        match c.rejected {
            None => {
                assert_eq!(out.frame, c.frame, "{}: frame passes unchanged", c.name);
                assert!(event.is_none(), "{}: no event for a pass", c.name);
            }
            Some((method, allow)) => {
                assert_reset(c.name, &c.frame, &out.frame);
                let ev = event.unwrap_or_else(|| panic!("{}: the responder gets an event", c.name));
                assert_eq!(Method::from_u8(ev.method), method, "{}: method", c.name);
                assert_eq!(
                    ev.reason, c.reason as u32,
                    "{}: the event says what to answer",
                    c.name
                );
                let want: u32 = allow.iter().map(|m| m.bit()).sum();
                assert_eq!(ev.allow, want, "{}: allow set", c.name);
                assert_eq!((ev.seq, ev.ack), (SEQ, ACK), "{}: sequence numbers", c.name);
                let sport = u16::from_be_bytes([
                    c.frame[out.frame.len() - 20],
                    c.frame[out.frame.len() - 19],
                ]);
                assert_eq!(
                    (ev.client_port, ev.server_port),
                    (sport, 80),
                    "{}: ports",
                    c.name
                );
                assert_eq!(
                    (ev.client_mac, ev.server_mac),
                    (CLIENT_MAC, SERVER_MAC),
                    "{}: MACs",
                    c.name
                );
                let v4 = matches!(ev.family, FAMILY_V4);
                assert!(v4 || ev.family == FAMILY_V6);
                if v4 {
                    assert_eq!(
                        &ev.client_addr_be[..4],
                        &[10, 77, 0, 1],
                        "{}: client",
                        c.name
                    );
                } else {
                    assert_eq!(ev.client_addr_be, v6(1), "{}: client", c.name);
                }
                // The event carries the canonical path (none for a line refused before its path
                // was complete).
                let line = &ev.line[..ev.line_len as usize];
                assert!(
                    c.reason == Reason::LineTooLong
                        || (!line.is_empty() && c.frame.windows(line.len()).any(|w| w == line)),
                    "{}: event carries the path: {:?}",
                    c.name,
                    String::from_utf8_lossy(line)
                );
            }
        }
    }
}

#[test]
fn policy_switches_are_seen_by_the_next_packet() {
    if !lab::e2e_enabled("kernel::policy_switches_are_seen_by_the_next_packet") {
        return;
    }
    let mut dp = load(&Policy::default());
    let reason = |dp: &mut Dataplane| {
        // A new connection each time: the classifier follows connections.
        let delete = build(&tcp(Ip::V4, 80, b"DELETE /x HTTP/1.1\r\n\r\n"));
        let before = counters(dp);
        dp.test_run(&delete, 1).unwrap();
        delta(&before, &counters(dp))[0].0
    };
    assert_eq!(reason(&mut dp), Reason::AllowedByDefault);
    dp.apply(&parse_toml("[[rules]]\npath = \"/x\"\nmethods = [\"GET\"]\n").unwrap())
        .unwrap();
    assert_eq!(reason(&mut dp), Reason::Rejected);
    dp.remove("/x").unwrap();
    assert_eq!(reason(&mut dp), Reason::AllowedByDefault);
    dp.apply(&parse_toml("default = [\"GET\"]\n").unwrap())
        .unwrap();
    assert_eq!(
        reason(&mut dp),
        Reason::Rejected,
        "a default method list governs unruled paths"
    );
    dp.apply(&Policy::default()).unwrap();
    assert_eq!(
        reason(&mut dp),
        Reason::AllowedByDefault,
        "the A/B switch back clears old rules"
    );
}

/// One connection (opened with a SYN), several segments: each row is (sequence offset from
/// the first byte, or `NEXT` for right after the previous segment; payload; the reasons the
/// segment is counted under; whether it must come out as a reset).
type Seg = (u32, &'static [u8], &'static [Reason], bool);
const NEXT: u32 = u32::MAX;

#[test]
fn streams_table() {
    if !lab::e2e_enabled("kernel::streams_table") {
        return;
    }
    use Reason::*;
    let mut dp = load(&parse_toml(POLICY).unwrap());
    let _events = dp.take_events().expect("event ring");
    let table: &[(&str, &[Seg])] = &[
        ("keep-alive: allowed then disallowed", &[
            (0, b"GET /api/items HTTP/1.1\r\n\r\n", &[AllowedByRule], false),
            (NEXT, b"DELETE /api/items HTTP/1.1\r\n\r\n", &[Rejected], true),
        ]),
        ("request line split across segments", &[
            (0, b"DEL", &[MidStream], false),
            (NEXT, b"ETE /ad", &[MidStream], false),
            (NEXT, b"min HTTP/1.1\r\n\r\n", &[Rejected], true),
        ]),
        ("out of order is dropped, then taken in order", &[
            (5, b"E /admin HTTP/1.1\r\n\r\n", &[OutOfOrder], false),
            (0, b"DELETE /admin HTTP/1.1\r\n\r\n", &[Rejected], true),
        ]),
        ("retransmission of decided bytes passes", &[
            (0, b"GET /admin HTTP/1.1\r\n\r\n", &[AllowedByRule], false),
            (0, b"PUT /admin HTTP/1.1\r\n\r\n", &[Retransmit], false),
        ]),
        ("body is not parsed as a request", &[
            (0, b"POST /api/items HTTP/1.1\r\nContent-Length: 26\r\n\r\n", &[AllowedByRule], false),
            (NEXT, b"DELETE /admin HTTP/1.1\r\n\r\n", &[MidStream], false),
            (NEXT, b"GET /admin HTTP/1.1\r\n\r\n", &[AllowedByRule], false),
        ]),
        ("pipelined: the refused request is cut off, then reset when sent again", &[
            (0, b"GET /admin HTTP/1.1\r\n\r\nDELETE /admin HTTP/1.1\r\n\r\n", &[AllowedByRule], false),
            (23, b"DELETE /admin HTTP/1.1\r\n\r\n", &[Rejected], true),
        ]),
        ("method override", &[
            (0, b"POST /api/items HTTP/1.1\r\nX-HTTP-Method-Override: DELETE\r\n\r\n", &[AllowedByRule, Rejected], true),
        ]),
        ("smuggling framing", &[
            (0, b"POST /api/items HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", &[AllowedByRule, BadFraming], true),
        ]),
        ("ambiguous path", &[
            (0, b"GET /a%2Fdmin HTTP/1.1\r\n\r\n", &[BadPath], true),
        ]),
        ("dot segments", &[
            (0, b"DELETE /x/../ad%6din;p=1 HTTP/1.1\r\n\r\n", &[Rejected], true),
        ]),
    ];
    let mut failures = Vec::new();
    for (i, (name, segs)) in table.iter().enumerate() {
        let sport = 50000 + i as u16;
        let syn = Frame {
            seq: SEQ.wrapping_sub(1),
            syn: true,
            ip: Ip::V4,
            sport,
            proto: 6,
            dport: 80,
            payload: Vec::new(),
        };
        dp.test_run(&build(&syn), 1).unwrap();
        let mut next = 0u32;
        for (j, (off, payload, reasons, reset)) in segs.iter().enumerate() {
            let off = if *off == NEXT { next } else { *off };
            next = off + payload.len() as u32;
            let f = Frame {
                seq: SEQ.wrapping_add(off),
                syn: false,
                ip: Ip::V4,
                sport,
                proto: 6,
                dport: 80,
                payload: payload.to_vec(),
            };
            let frame = build(&f);
            let before = counters(&dp);
            let out = dp.test_run(&frame, 1).unwrap();
            let got: Vec<Reason> = delta(&before, &counters(&dp))
                .into_iter()
                .map(|(r, _)| r)
                .collect();
            let mut want = reasons.to_vec();
            want.sort_by_key(|r| *r as u32);
            let is_reset = out.frame.len() < frame.len()
                && out.frame[out.frame.len() - 20 + 13] & tcp_flags::RST != 0;
            if got != want || is_reset != *reset {
                failures.push(format!("{name}, segment {j}: counted {got:?} (want {want:?}), reset {is_reset} (want {reset})"));
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// The host's decision for one request line on a fresh connection: the same stream parser,
/// canonicalizer and policy semantics, run in userspace.
fn host_decision(policy: &Policy, payload: &[u8]) -> Reason {
    use filter_common::stream::{flag, Ev, Stream};
    use filter_userspace::policy::MatchKind;
    let mut s = Stream::new(0, flag::SYN);
    let mut raw = [0u8; filter_common::PATH_MAX];
    for &b in payload {
        if s.in_bulk() {
            return Reason::MidStream;
        }
        match s.step(b, &mut raw) {
            Ev::More | Ev::Bulk => {}
            Ev::Tunnel => return Reason::Tunnel,
            Ev::Override => return Reason::MidStream,
            Ev::Fail(r) => return r,
            Ev::Decide => {
                let method = s.take_method();
                let mut path = [0u8; filter_common::PATH_MAX];
                let n = s.line.path_len();
                let canon = if n == 0 {
                    String::new()
                } else {
                    match filter_common::canon::canonicalize(&raw[..n], &mut path) {
                        Ok(len) => String::from_utf8_lossy(&path[..len]).into_owned(),
                        Err(Reason::PathTooLong) => return Reason::LineTooLong,
                        Err(_) => return Reason::BadPath,
                    }
                };
                let exact = policy
                    .rules
                    .values()
                    .find(|r| r.kind == MatchKind::Exact && r.path == canon);
                let prefix = policy
                    .rules
                    .values()
                    .filter(|r| r.kind == MatchKind::Prefix && canon.starts_with(&r.path))
                    .max_by_key(|r| r.path.len());
                let rule = exact.or(prefix);
                if method == Method::Options {
                    return Reason::OptionsPassed;
                }
                let (allow, verdict) = match rule {
                    Some(r) => (r.effective(), Reason::AllowedByRule),
                    None => (policy.default.effective(), Reason::AllowedByDefault),
                };
                return if allow.contains(method) {
                    verdict
                } else {
                    Reason::Rejected
                };
            }
        }
    }
    Reason::MidStream
}

/// Property: on generated request lines, the kernel (through `BPF_PROG_TEST_RUN`) and the
/// host reach the same decision.
#[test]
fn host_and_kernel_agree_on_generated_requests() {
    if !lab::e2e_enabled("kernel::host_and_kernel_agree_on_generated_requests") {
        return;
    }
    let policy = parse_toml(
        "[[rules]]\npath = \"/api/items\"\nmethods = [\"GET\", \"POST\"]\n\
         [[rules]]\npath = \"/admin\"\nmethods = [\"GET\"]\n\
         [[rules]]\npath = \"/static/\"\nmatch = \"prefix\"\nmethods = [\"GET\"]\n\
         [[rules]]\npath = \"/static/up/\"\nmatch = \"prefix\"\nmethods = [\"PUT\"]\n",
    )
    .unwrap();
    let mut dp = load(&policy);
    let _events = dp.take_events().expect("event ring");
    let methods = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "get", "BREW", "PATCH",
    ];
    let pieces = [
        "/admin",
        "/api",
        "/items",
        "/static",
        "/up",
        "/x",
        "/..",
        "/.",
        "//",
        "/%61dmin",
        "%2e",
        "%2F",
        ";p=1",
        "/a",
        "%zz",
        "?q=/admin",
        "#f",
        // Long plain runs and dotted names: the kernel takes these eight bytes at a time.
        "/segment-with-plain-bytes-0123456789",
        "/v1.2.3/archive.tar.gz",
        ";jsessionid=0123456789abcdef0123",
    ];
    // Header lines the filter does not act on, long enough for the word-at-a-time paths.
    let headers = [
        "",
        "User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:109.0) Gecko/20100101 Firefox/115.0\r\n",
        "Accept-Language: en-US,en;q=0.9,de;q=0.8\r\nX-Request-Identifier-Long-Name: 0123456789abcdef\r\n",
        "Cookie:   a=b;   c=d    \r\n",
    ];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    };
    let mut disagreements = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    // Request lines that cross the 1 KiB inspection window at every alignment (a run of
    // words ending exactly at the window's end must not wrap around to its start).
    let mut lines: Vec<String> = (1000..1040)
        .map(|n| format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "p".repeat(n)))
        .collect();
    lines.extend((1000..1040).map(|n| {
        format!(
            "GET /{} HTTP/1.1\r\nHost: x\r\n\r\n",
            "p".repeat(n - 980) + &"/q".repeat(490)
        )
    }));
    for (i, line) in lines.iter().enumerate() {
        let sport = 30000 + i as u16;
        let syn = Frame {
            seq: SEQ.wrapping_sub(1),
            syn: true,
            ip: Ip::V4,
            sport,
            proto: 6,
            dport: 80,
            payload: Vec::new(),
        };
        dp.test_run(&build(&syn), 1).unwrap();
        let f = Frame {
            seq: SEQ,
            syn: false,
            ip: Ip::V4,
            sport,
            proto: 6,
            dport: 80,
            payload: line.clone().into_bytes(),
        };
        let before = counters(&dp);
        dp.test_run(&build(&f), 1).unwrap();
        let kernel: Vec<Reason> = delta(&before, &counters(&dp))
            .into_iter()
            .map(|(r, _)| r)
            .collect();
        let host = host_decision(&policy, line.as_bytes());
        if kernel != [host] {
            disagreements.push(format!(
                "{}-byte line: kernel {kernel:?}, host {host:?}",
                line.len()
            ));
        }
    }
    for i in 0..300u32 {
        let mut target = String::new();
        for _ in 0..1 + next(4) {
            target.push_str(pieces[next(pieces.len())]);
        }
        if !target.starts_with('/') {
            target.insert(0, '/');
        }
        let line = format!(
            "{} {} HTTP/1.1\r\nHost: x\r\n{}\r\n",
            methods[next(methods.len())],
            target,
            headers[next(headers.len())]
        );
        let sport = 20000 + i as u16;
        let syn = Frame {
            seq: SEQ.wrapping_sub(1),
            syn: true,
            ip: Ip::V4,
            sport,
            proto: 6,
            dport: 80,
            payload: Vec::new(),
        };
        dp.test_run(&build(&syn), 1).unwrap();
        let f = Frame {
            seq: SEQ,
            syn: false,
            ip: Ip::V4,
            sport,
            proto: 6,
            dport: 80,
            payload: line.clone().into_bytes(),
        };
        let before = counters(&dp);
        dp.test_run(&build(&f), 1).unwrap();
        let kernel: Vec<Reason> = delta(&before, &counters(&dp))
            .into_iter()
            .map(|(r, _)| r)
            .collect();
        let host = host_decision(&policy, line.as_bytes());
        seen.insert(host as u32);
        if kernel != [host] {
            disagreements.push(format!("{line:?}: kernel {kernel:?}, host {host:?}"));
        }
    }
    assert!(
        disagreements.is_empty(),
        "{} of 380 disagree:\n{}",
        disagreements.len(),
        disagreements.join("\n")
    );
    // The generator must reach allowed, rejected, prefix and refused (400) verdicts alike.
    assert!(
        seen.len() >= 5,
        "the generated requests reached only {seen:?}"
    );
}

//! Tier 2: kernel fixture tests. Frames go through the loaded classifier with
//! `BPF_PROG_TEST_RUN`; each case states the policy, the frame, the verdict reason the kernel
//! must count, and what it must do to the frame and tell the responder.
//!
//! Needs root and the kernel object embedded in `filter-userspace` (`cargo xtask test`).

use std::net::{Ipv4Addr, Ipv6Addr};

use filter_common::{
    csum, tcp_flags, Method, Reason, RejectEvent, FAMILY_V4, FAMILY_V6, RESPONDER_MARK,
};
use filter_tests::lab;
use filter_userspace::dataplane::Dataplane;
use filter_userspace::policy::{parse_toml, Policy};

const PASS: i32 = -1;
const DROP: i32 = 2;
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// `BPF_PROG_TEST_RUN` receives frames on the loopback device, whose address is all zero: a
/// frame to it is the host's (`PACKET_HOST`), as the classifier requires of a client segment.
const SERVER_MAC: [u8; 6] = [0; 6];
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

/// The client's segment at byte `off` (from `SEQ`) of connection `sport` to :80.
fn client_segment(ip: Ip, sport: u16, off: u32, payload: &[u8]) -> Frame {
    Frame {
        seq: SEQ.wrapping_add(off),
        syn: false,
        ip,
        sport,
        proto: 6,
        dport: 80,
        payload: payload.to_vec(),
    }
}

/// Open connection `sport` to :80 with a handshake through both classifiers (the client's SYN,
/// the server's SYN|ACK, the client's ACK), so that its next segment (at `SEQ`) goes on a
/// followed stream whose responses are followed too.
fn open_conn(dp: &mut Dataplane, ip: Ip, sport: u16) {
    open_conn_unfollowed(dp, ip, sport);
    handshake_rest(dp, ip, sport);
}

/// Open connection `sport` to :80 with only the client's SYN through the ingress classifier (the
/// server's answers leave elsewhere): its next segment (at `SEQ`) starts a followed stream,
/// whose responses are not followed.
fn open_conn_unfollowed(dp: &mut Dataplane, ip: Ip, sport: u16) {
    let syn = Frame {
        seq: SEQ.wrapping_sub(1),
        syn: true,
        ..client_segment(ip, sport, 0, &[])
    };
    dp.test_run(&build(&syn), 1).unwrap();
}

/// The server's SYN|ACK (initial sequence number `ACK - 1`) and the client's ACK that
/// completes the handshake, after the client's SYN at `SEQ - 1`.
fn handshake_rest(dp: &mut Dataplane, ip: Ip, cport: u16) {
    let synack = conn_frame(
        ip,
        cport,
        false,
        ACK.wrapping_sub(1),
        SEQ,
        tcp_flags::SYN | tcp_flags::ACK,
        b"",
    );
    dp.test_run_egress(&synack, 1).unwrap();
    let ack = conn_frame(ip, cport, true, SEQ, ACK, tcp_flags::ACK, b"");
    dp.test_run(&ack, 1).unwrap();
}

/// `frame` through the classifier: the reasons it was counted under, and the frame that came
/// out.
fn run_counted(dp: &mut Dataplane, frame: &[u8]) -> (Vec<Reason>, Vec<u8>) {
    let before = counters(dp);
    let out = dp.test_run(frame, 1).unwrap().frame;
    let reasons = delta(&before, &counters(dp))
        .into_iter()
        .map(|(r, _)| r)
        .collect();
    (reasons, out)
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
    lab::check_root().expect("prerequisites");
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
        // paths = "strict" (the default): a path not in normal form is answered 400.
        answer(
            "strict: a dot segment",
            tcp(Ip::V4, 80, b"GET /x/../admin HTTP/1.1\r\n\r\n"),
            Reason::BadPath,
            Get,
            &[],
        ),
        answer(
            "strict: ..; (Tomcat's ..)",
            tcp(Ip::V6, 80, b"DELETE /public/..;/admin HTTP/1.1\r\n\r\n"),
            Reason::BadPath,
            Delete,
            &[],
        ),
        answer(
            "strict: an escaped literal character",
            tcp(Ip::V4, 80, b"GET /users/%40me HTTP/1.1\r\n\r\n"),
            Reason::BadPath,
            Get,
            &[],
        ),
        answer(
            "strict: a raw byte >= 0x80",
            tcp(Ip::V4, 80, b"GET /caf\xc3\xa9 HTTP/1.1\r\n\r\n"),
            Reason::BadPath,
            Get,
            &[],
        ),
        answer(
            // Refused by the request-line parser, before the method is looked up.
            "a fragment in the target",
            tcp(Ip::V4, 80, b"GET /admin#x HTTP/1.1\r\n\r\n"),
            Reason::BadPath,
            Other,
            &[],
        ),
        case(
            "strict: in normal form but not plain",
            tcp(
                Ip::V4,
                80,
                b"DELETE /.well-known/a%3Bb%C3%A9 HTTP/1.1\r\n\r\n",
            ),
            Reason::AllowedByDefault,
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
                // was complete; the part read so far of a path refused with 400).
                let line = &ev.line[..ev.line_len as usize];
                assert!(
                    c.reason == Reason::LineTooLong
                        || c.reason == Reason::BadPath
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
    let reason_for = |dp: &mut Dataplane, path: &str| {
        // A new connection each time: the classifier follows connections.
        let line = format!("DELETE {path} HTTP/1.1\r\n\r\n");
        let delete = build(&tcp(Ip::V4, 80, line.as_bytes()));
        let before = counters(dp);
        dp.test_run(&delete, 1).unwrap();
        delta(&before, &counters(dp))[0].0
    };
    let reason = |dp: &mut Dataplane| reason_for(dp, "/x");
    assert_eq!(reason(&mut dp), Reason::AllowedByDefault);
    dp.apply(&parse_toml("[[rules]]\npath = \"/x\"\nmethods = [\"GET\"]\n").unwrap())
        .unwrap();
    assert_eq!(reason(&mut dp), Reason::Rejected);
    // A rule added to the policy in force, on a path long enough that the kernel asks
    // `EXACT_LENS` before hashing it, of a length no rule had: its requests now find it.
    let long = long_path("/added/", 100);
    let added = parse_toml(&format!(
        "[[rules]]\npath = \"{long}\"\nmethods = [\"GET\"]\n"
    ))
    .unwrap();
    assert_eq!(reason_for(&mut dp, &long), Reason::AllowedByDefault);
    dp.upsert(added.rules.values().next().unwrap()).unwrap();
    assert_eq!(reason_for(&mut dp, &long), Reason::Rejected);
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
        ("_method in the query", &[
            (0, b"POST /api/items?_method=DELETE HTTP/1.1\r\n\r\n", &[AllowedByRule, Rejected], true),
        ]),
        ("_method in the query, spelled otherwise, among other parameters", &[
            (0, b"POST /api/items?a=1&%5fMETHOD[]=put;b=2 HTTP/1.1\r\n\r\n", &[AllowedByRule, Rejected], true),
        ]),
        ("_method naming an allowed method", &[
            (0, b"POST /api/items?x=_method&_method=get HTTP/1.1\r\n\r\n", &[AllowedByRule], false),
        ]),
        ("_method split across segments", &[
            (0, b"GET /admin?_met", &[AllowedByRule], false),
            (NEXT, b"hod=DEL", &[MidStream], false),
            (NEXT, b"ETE HTTP/1.1\r\n\r\n", &[Rejected], true),
        ]),
        ("an override on OPTIONS is checked (OPTIONS itself is never 405)", &[
            (0, b"OPTIONS /admin HTTP/1.1\r\nX-HTTP-Method-Override: DELETE\r\n\r\n", &[OptionsPassed, Rejected], true),
        ]),
        ("_method on OPTIONS", &[
            (0, b"OPTIONS /admin?_method=PUT HTTP/1.1\r\n\r\n", &[OptionsPassed, Rejected], true),
        ]),
        ("an allowed override on OPTIONS", &[
            (0, b"OPTIONS /admin HTTP/1.1\r\nX-HTTP-Method: GET\r\n\r\n", &[OptionsPassed], false),
        ]),
        ("smuggling framing", &[
            (0, b"POST /api/items HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", &[AllowedByRule, BadFraming], true),
        ]),
        ("ambiguous path", &[
            (0, b"GET /a%2Fdmin HTTP/1.1\r\n\r\n", &[BadPath], true),
        ]),
        ("a path not in normal form (paths = \"strict\")", &[
            (0, b"GET /x/../ad%6din;p=1 HTTP/1.1\r\n\r\n", &[BadPath], true),
        ]),
    ];
    let mut failures = Vec::new();
    for (i, (name, segs)) in table.iter().enumerate() {
        let sport = 50000 + i as u16;
        // Refusals at once: no earlier response to wait for.
        open_conn_unfollowed(&mut dp, Ip::V4, sport);
        let mut next = 0u32;
        for (j, (off, payload, reasons, reset)) in segs.iter().enumerate() {
            let off = if *off == NEXT { next } else { *off };
            next = off + payload.len() as u32;
            let frame = build(&client_segment(Ip::V4, sport, off, payload));
            let (got, out) = run_counted(&mut dp, &frame);
            let mut want = reasons.to_vec();
            want.sort_by_key(|r| *r as u32);
            let is_reset =
                out.len() < frame.len() && out[out.len() - 20 + 13] & tcp_flags::RST != 0;
            if got != want || is_reset != *reset {
                failures.push(format!("{name}, segment {j}: counted {got:?} (want {want:?}), reset {is_reset} (want {reset})"));
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// The host's decision for one request on a fresh connection: `filter_userspace::explain::decide`,
/// the same stream parser, canonicalizer and rule lookup run in userspace, and what
/// `filterctl explain` and `GET /v1/explain` answer with. The reasons come sorted, as
/// [`run_counted`] reports them.
fn host_decision(policy: &Policy, payload: &[u8]) -> Vec<Reason> {
    use filter_userspace::explain::{decide, Options};
    decide(policy, &Options::default(), payload).reasons
}

/// The policy of [`host_and_kernel_agree_on_generated_requests`] and [`path_modes_table`]:
/// exact and prefix rules, some of them under others, a monitor rule and a default that
/// refuses some methods, so that every reading of a path can make a difference.
const READINGS_POLICY: &str = r#"default = ["GET", "POST"]

[[rules]]
path = "/api/items"
methods = ["GET", "POST"]

[[rules]]
path = "/api/"
match = "prefix"
methods = ["GET", "POST", "DELETE"]

[[rules]]
path = "/admin"
methods = ["GET"]

[[rules]]
path = "/static/"
match = "prefix"
methods = ["GET"]

[[rules]]
path = "/static/up/"
match = "prefix"
methods = ["PUT"]

[[rules]]
path = "/users/@me"
methods = ["GET", "DELETE"]

[[rules]]
path = "/users/"
match = "prefix"
methods = ["GET", "DELETE", "PATCH"]

[[rules]]
path = "/public/"
match = "prefix"
methods = ["GET", "PUT", "DELETE"]

[[rules]]
path = "/beta/"
match = "prefix"
methods = ["GET"]
mode = "monitor"
"#;

/// `READINGS_POLICY` with `paths = mode`.
fn readings_policy(mode: &str) -> Policy {
    parse_toml(&format!("paths = \"{mode}\"\n{READINGS_POLICY}")).unwrap()
}

/// What a user sees, per path mode: each request on a connection of its own, the reasons the
/// kernel counts it under in `paths = "strict"` and in `paths = "normalize"` (and a refused
/// request comes out as a reset either way).
#[test]
fn path_modes_table() {
    if !lab::e2e_enabled("kernel::path_modes_table") {
        return;
    }
    use Reason::*;
    type Row = (&'static [u8], &'static [Reason], &'static [Reason]);
    let rows: &[Row] = &[
        // In normal form: the same in both modes.
        (b"DELETE /users/@me", &[AllowedByRule], &[AllowedByRule]),
        (
            b"GET /.well-known/x",
            &[AllowedByDefault],
            &[AllowedByDefault],
        ),
        (b"GET /a%3Bb", &[AllowedByDefault], &[AllowedByDefault]),
        (b"DELETE /admin", &[Rejected], &[Rejected]),
        // Read differently by different backends: refused in both modes.
        (b"DELETE /public/..;/admin", &[BadPath], &[BadPath]),
        (b"GET /public/..;x/admin", &[BadPath], &[BadPath]),
        (b"GET /public/.;/x", &[BadPath], &[BadPath]),
        (b"GET /a//../admin", &[BadPath], &[BadPath]),
        (b"GET /a/;x/../admin", &[BadPath], &[BadPath]),
        (b"GET /x/%2e%2e/admin", &[BadPath], &[BadPath]),
        (b"GET /x/.%2E/admin", &[BadPath], &[BadPath]),
        (b"GET /admin#frag", &[BadPath], &[BadPath]),
        (b"GET /a%2Fb", &[BadPath], &[BadPath]),
        // Not in normal form: 400 in strict; in normalize, judged under every reading.
        (b"GET /public/../admin", &[BadPath], &[AllowedByRule]),
        (b"DELETE /public/../admin", &[BadPath], &[Rejected]),
        // As sent (Express, axum) `/admin/../public/x` is under no prefix rule: the default
        // refuses DELETE, although the canonical path's rule allows it.
        (b"DELETE /admin/../public/x", &[BadPath], &[Rejected]),
        (b"GET /admin/../public/x", &[BadPath], &[AllowedByRule]),
        (b"DELETE /users/%40me", &[BadPath], &[AllowedByRule]),
        (b"PATCH /users/%40me", &[BadPath], &[Rejected]),
        (b"PUT /public/a%40b", &[BadPath], &[AllowedByRule]),
        (b"PATCH /public/a%40b", &[BadPath], &[Rejected]),
        (b"GET /caf%c3%a9", &[BadPath], &[AllowedByDefault]),
        (b"GET /caf\xc3\xa9", &[BadPath], &[AllowedByDefault]),
        (b"DELETE //api/x", &[BadPath], &[Rejected]),
        (b"DELETE /api//x", &[BadPath], &[AllowedByRule]),
        // `;` as text (nginx) is under `/api/` like the canonical path: allowed.
        (b"DELETE /api/x;jsessionid=1", &[BadPath], &[AllowedByRule]),
        (b"DELETE /api/items;x=1", &[BadPath], &[Rejected]),
        (b"GET /api/items;x=1", &[BadPath], &[AllowedByRule]),
        // `;` as text, where the other readings part: `/x/../users/a;b` is under `/users/` as
        // canonical and as text, but as sent under nothing (the default refuses DELETE).
        (b"DELETE /x/../users/a;b", &[BadPath], &[Rejected]),
        (b"GET /x/../users/a;b", &[BadPath], &[AllowedByRule]),
        // A monitor rule refuses nothing; an enforcing rule (the default) of another reading
        // does refuse what it does not allow.
        (b"DELETE /beta/x", &[Monitored], &[Monitored]),
        (b"DELETE /beta/%78", &[BadPath], &[Monitored]),
        (b"DELETE /x/../beta/x", &[BadPath], &[Rejected]),
        (b"POST /x/../beta/x", &[BadPath], &[Monitored]),
    ];
    let mut failures = Vec::new();
    for (m, mode) in ["strict", "normalize"].into_iter().enumerate() {
        let policy = readings_policy(mode);
        let mut dp = load(&policy);
        let _events = dp.take_events().expect("event ring");
        for (i, (line, strict, normalize)) in rows.iter().enumerate() {
            let want = if m == 0 { strict } else { normalize };
            let mut req = line.to_vec();
            req.extend_from_slice(b" HTTP/1.1\r\nHost: x\r\n\r\n");
            let sport = 31000 + (m * 100 + i) as u16;
            open_conn(&mut dp, Ip::V4, sport);
            let frame = build(&client_segment(Ip::V4, sport, 0, &req));
            let (got, out) = run_counted(&mut dp, &frame);
            let reset = out.len() < frame.len() && out[out.len() - 20 + 13] & tcp_flags::RST != 0;
            let refused = want.iter().any(|r| matches!(r, Rejected | BadPath));
            let shown = String::from_utf8_lossy(line);
            if got != *want || reset != refused {
                failures.push(format!(
                    "{mode}: {shown}: counted {got:?} (want {want:?}), reset {reset}"
                ));
            }
            // The host's model agrees with the table.
            let host = host_decision(&policy, &req);
            if host != *want {
                failures.push(format!("{mode}: {shown}: the host model says {host:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// Property: on generated request lines, the kernel (through `BPF_PROG_TEST_RUN`) and the
/// host reach the same decision.
#[test]
fn host_and_kernel_agree_on_generated_requests() {
    if !lab::e2e_enabled("kernel::host_and_kernel_agree_on_generated_requests") {
        return;
    }
    let methods = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "get", "BREW", "PATCH",
    ];
    let pieces = [
        "/admin",
        "/api",
        "/items",
        "/static",
        "/up",
        "/users",
        "/@me",
        "/public",
        "/beta",
        "/x",
        "/..",
        "/.",
        "//",
        "/%61dmin",
        "/%40me",
        "%2e",
        "%2F",
        "%3a",
        "%3B",
        "%c3%a9",
        "\u{e9}",
        "\"",
        ";p=1",
        "..;",
        "/a",
        "%zz",
        "?q=/admin",
        "?_method=DELETE",
        "?x=1&%5fmethod=put",
        "?a=b;.method=patch&_method=",
        "#f",
        // Long plain runs and dotted names: the kernel takes these eight bytes at a time.
        "/segment-with-plain-bytes-0123456789",
        "/v1.2.3/archive.tar.gz",
        ";jsessionid=0123456789abcdef0123",
    ];
    // Header lines, long enough for the word-at-a-time paths, and method overrides.
    let headers = [
        "",
        "User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:109.0) Gecko/20100101 Firefox/115.0\r\n",
        "Accept-Language: en-US,en;q=0.9,de;q=0.8\r\nX-Request-Identifier-Long-Name: 0123456789abcdef\r\n",
        "Cookie:   a=b;   c=d    \r\n",
        "X-HTTP-Method-Override: DELETE\r\n",
        "X-Method-Override: get\r\n",
        // Long values of a header the filter does not act on (taken a word at a time), with
        // what ends or fails them after the first words: the kernel must agree byte for byte.
        "X-Long-Value: 0123456789abcdef\t0123456789abcdef  \r\n",
        "X-Long-Value: 0123456789abcdef0123456789abcdef\x00tail\r\n",
        "X-Long-Value: 0123456789abcdef0123456789abcde\x7f\r\n",
        "X-Long-Value: 0123456789abcdef0123456789abcdef\n",
        "X-Long-Value: 0123456789abcdef0123456789abcd\rX\n",
        "X-Long-Value: 0123456789abcdef0123456789abcdef\u{e9}\u{80}\r\n",
    ];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    };
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
    // Random pieces; and half the time a rule's path, one change that gives the target
    // several readings, another rule's path and a piece: so that the readings of a path fall
    // under different rules.
    let heads = [
        "",
        "/public",
        "/users",
        "/api",
        "/static/up",
        "/beta",
        "/admin",
        "/x",
    ];
    let changes = [
        "/..", "/.", "//", "/%40me", "/@me", ";p=1", "/%61", "/a%3a", "..;", "/%2e%2e", "#f",
        "\u{e9}", "%3B", "",
    ];
    for i in 0..400 {
        let mut target = String::new();
        if i % 2 == 0 {
            target += heads[next(heads.len())];
            target += changes[next(changes.len())];
            target += heads[next(heads.len())];
            target += pieces[next(pieces.len())];
        } else {
            for _ in 0..1 + next(4) {
                target.push_str(pieces[next(pieces.len())]);
            }
        }
        if !target.starts_with('/') {
            target.insert(0, '/');
        }
        lines.push(format!(
            "{} {} HTTP/1.1\r\nHost: x\r\n{}\r\n",
            methods[next(methods.len())],
            target,
            headers[next(headers.len())]
        ));
    }
    let mut disagreements = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (m, mode) in ["strict", "normalize"].into_iter().enumerate() {
        let policy = readings_policy(mode);
        let mut dp = load(&policy);
        let _events = dp.take_events().expect("event ring");
        for (i, line) in lines.iter().enumerate() {
            let sport = 20000 + (m * lines.len() + i) as u16;
            open_conn(&mut dp, Ip::V4, sport);
            let (kernel, _) = run_counted(
                &mut dp,
                &build(&client_segment(Ip::V4, sport, 0, line.as_bytes())),
            );
            let host = host_decision(&policy, line.as_bytes());
            seen.insert((mode, host.iter().map(|r| *r as u32).collect::<Vec<_>>()));
            if kernel != host {
                let shown: String = line.chars().take(160).collect();
                disagreements.push(format!(
                    "{mode}: {shown:?}: kernel {kernel:?}, host {host:?}"
                ));
            }
        }
    }
    assert!(
        disagreements.is_empty(),
        "{} of {} disagree:\n{}",
        disagreements.len(),
        2 * lines.len(),
        disagreements.join("\n")
    );
    // The generator must reach allowed, rejected, monitored, prefix and refused (400)
    // verdicts alike, and overrides, in both modes.
    for mode in ["strict", "normalize"] {
        let reached: Vec<_> = seen.iter().filter(|(m, _)| *m == mode).collect();
        assert!(
            reached.len() >= 8,
            "{mode}: the generated requests reached only {reached:?}"
        );
    }
}

/// A path of `len` bytes, `/long/` then letters: plain, so the kernel takes it a whole word
/// at a time from its second word on (`path_words`), the words written into the raw path at
/// the alignment the path's length so far gives them.
fn long_path(prefix: &str, len: usize) -> String {
    let mut p = String::from(prefix);
    while p.len() < len {
        p.push((b'a' + (p.len() % 26) as u8) as char);
    }
    p.truncate(len);
    p
}

/// Long paths hash in the kernel exactly as userspace hashed the rules: at every length modulo
/// eight, and with the request line cut across two segments (the second goes on from the
/// path saved between them), an exact rule on a long path decides its requests and a path one
/// byte off does not; the same for a long prefix rule; and a doubled slash or a dot segment
/// far into a path (where the kernel reads whole words) is still resolved to the rule's path
/// (`paths = "normalize"`; the path as sent falls under a prefix rule that allows the method,
/// the canonical path's exact rule does not).
#[test]
fn long_paths_match_their_rules() {
    if !lab::e2e_enabled("kernel::long_paths_match_their_rules") {
        return;
    }
    let lens: Vec<usize> = (72..=80).chain([300, 513, 1000, 1019]).collect();
    // A prefix rule covers the subtree under it: its path ends in `/`.
    let prefix = long_path("/pre/", 249) + "/";
    let mut toml = String::from("paths = \"normalize\"\ndefault = [\"GET\"]\n");
    for &len in &lens {
        toml += &format!(
            "[[rules]]\npath = \"{}\"\nmethods = [\"DELETE\"]\n",
            long_path("/long/", len)
        );
    }
    toml +=
        &format!("[[rules]]\npath = \"{prefix}\"\nmatch = \"prefix\"\nmethods = [\"DELETE\"]\n");
    // One byte changed: the letter after it in the alphabet (still plain).
    let off_by_one = |p: &str, at: usize| {
        let mut b = p.as_bytes().to_vec();
        b[at] = if b[at] == b'z' { b'a' } else { b[at] + 1 };
        String::from_utf8(b).unwrap()
    };
    let mut cases: Vec<(String, Reason)> = Vec::new();
    for &len in &lens {
        let p = long_path("/long/", len);
        cases.push((p.clone(), Reason::AllowedByRule));
        cases.push((off_by_one(&p, len - 1), Reason::Rejected));
        cases.push((off_by_one(&p, len / 2), Reason::Rejected));
        // One byte longer (`-`: the rules' paths are letters, so no other rule is hit).
        cases.push((format!("{p}-"), Reason::Rejected));
    }
    // Dot segments and doubled slashes past the path's first 64 bytes, at every alignment:
    // the word loop must leave them to the canonicalizer, which resolves them to the rule's
    // path (`abcdef/` segments put the slashes at every offset modulo eight).
    let mut sliced = String::from("/seg/");
    while sliced.len() < 400 {
        sliced += "abcdef/";
    }
    // The exact rule refuses DELETE where the prefix rule over it allows it: a path resolved
    // to anything but the exact rule's is let through.
    toml += &format!("[[rules]]\npath = \"{sliced}\"\nmethods = [\"GET\"]\n");
    toml += "[[rules]]\npath = \"/seg/\"\nmatch = \"prefix\"\nmethods = [\"GET\", \"DELETE\"]\n";
    cases.push((sliced.clone(), Reason::Rejected));
    cases.push((format!("{sliced}x"), Reason::AllowedByRule));
    let slashes: Vec<usize> = sliced
        .match_indices('/')
        .map(|(i, _)| i)
        .filter(|&i| i > 80)
        .collect();
    for &at in &slashes[..8] {
        for extra in ["/", "./", "q/../"] {
            let odd = format!("{}{extra}{}", &sliced[..=at], &sliced[at + 1..]);
            cases.push((odd, Reason::Rejected));
        }
    }
    let under = long_path(&prefix, 900);
    cases.push((under.clone(), Reason::AllowedByRule));
    cases.push((off_by_one(&under, 200), Reason::Rejected));
    cases.push((off_by_one(&under, 800), Reason::AllowedByRule));
    let mut dp = load(&parse_toml(&toml).unwrap());
    let _events = dp.take_events().expect("event ring");
    let mut failures = Vec::new();
    let mut sport = 40000u16;
    for (path, want) in &cases {
        let line = format!("DELETE {path} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes();
        // Whole, and cut inside the path (before, around and after its first 64 bytes).
        for cut in [0, 40, 100, path.len() / 2, path.len() + 3] {
            // Cuts inside the path only ("DELETE " is 7 bytes): a first segment holding the
            // whole line would be decided (and reset) on its own.
            if cut >= path.len() + 7 {
                continue;
            }
            sport += 1;
            open_conn(&mut dp, Ip::V4, sport);
            let segs: Vec<(usize, &[u8])> = if cut == 0 {
                vec![(0, &line[..])]
            } else {
                vec![(0, &line[..cut]), (cut, &line[cut..])]
            };
            let mut got = Vec::new();
            for (off, payload) in segs {
                let f = client_segment(Ip::V4, sport, off as u32, payload);
                got.extend(run_counted(&mut dp, &build(&f)).0);
            }
            // A first segment that ends inside the path is counted as mid-stream.
            got.retain(|r| *r != Reason::MidStream);
            if got != [*want] {
                failures.push(format!(
                    "{} B path, cut at {cut}: counted {got:?}, want {want:?}",
                    path.len()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// A segment of one connection in either direction, for the egress tests: the client's to the
/// ingress classifier, the server's to the egress one.
fn conn_frame(
    ip: Ip,
    cport: u16,
    from_client: bool,
    seq: u32,
    ack: u32,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let (sport, dport) = if from_client {
        (cport, 80)
    } else {
        (80, cport)
    };
    let mut l4 = Vec::new();
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    l4.extend_from_slice(&seq.to_be_bytes());
    l4.extend_from_slice(&ack.to_be_bytes());
    l4.push(5 << 4);
    l4.push(flags);
    l4.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
    l4.extend_from_slice(payload);
    let mut frame = Vec::new();
    let (dmac, smac) = if from_client {
        (SERVER_MAC, CLIENT_MAC)
    } else {
        (CLIENT_MAC, SERVER_MAC)
    };
    frame.extend_from_slice(&dmac);
    frame.extend_from_slice(&smac);
    if let Ip::V6 = ip {
        let (src, dst) = if from_client {
            (v6(1), v6(2))
        } else {
            (v6(2), v6(1))
        };
        frame.extend_from_slice(&0x86ddu16.to_be_bytes());
        frame.extend_from_slice(&[0x60, 0, 0, 0]);
        frame.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        frame.extend_from_slice(&[6, 64]);
        frame.extend_from_slice(&src);
        frame.extend_from_slice(&dst);
        let c = csum::finish(csum::add(csum::pseudo_v6(&src, &dst, l4.len() as u32), &l4));
        l4[16..18].copy_from_slice(&c.to_be_bytes());
    } else {
        let (c4, s4) = (
            Ipv4Addr::new(10, 77, 0, 1).octets(),
            Ipv4Addr::new(10, 77, 0, 2).octets(),
        );
        let (src, dst) = if from_client { (c4, s4) } else { (s4, c4) };
        let mut iph = vec![0u8; 20];
        iph[0] = 0x45;
        iph[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
        iph[6] = 0x40;
        iph[8] = 64;
        iph[9] = 6;
        iph[12..16].copy_from_slice(&src);
        iph[16..20].copy_from_slice(&dst);
        let c = csum::finish(csum::add(0, &iph));
        iph[10..12].copy_from_slice(&c.to_be_bytes());
        let c = csum::finish(csum::add(csum::pseudo_v4(&src, &dst, l4.len() as u16), &l4));
        l4[16..18].copy_from_slice(&c.to_be_bytes());
        frame.extend_from_slice(&0x0800u16.to_be_bytes());
        frame.extend_from_slice(&iph);
    }
    frame.extend_from_slice(&l4);
    frame
}

/// What the ingress classifier must do with a client segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Act {
    Pass,
    /// Passed, shortened (the rest is held or comes again).
    Cut,
    Drop,
    /// Turned into a reset; the event's sequence number for the answer is the server's
    /// `ACK + this offset`.
    Reset(u32),
}

/// One step of a conversation: the client's segment (sequence offset, acknowledged offset of
/// the server's bytes, payload, reasons counted, action), or the server's (sequence offset,
/// payload, FIN, reasons counted).
enum Step {
    C(u32, u32, &'static [u8], &'static [Reason], Act),
    S(u32, &'static [u8], bool, &'static [Reason]),
    /// The responder's answer (marked `RESPONDER_MARK`, with FIN) at this sequence offset of
    /// the server's bytes.
    A(u32, &'static [u8]),
    /// The server resets the connection (RST at this sequence offset of its bytes): its
    /// responses are no longer followed, while a client may still send on it.
    ServerReset(u32),
}

const OK5: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
const OK5_LEN: u32 = OK5.len() as u32;
const HEAD_OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n";
const REFUSED: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 3\r\n\r\nno\n";
const SWITCHED: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n";
const UPGRADE: &[u8] = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
const UPGRADE_LEN: u32 = UPGRADE.len() as u32;
const DELETE_ADMIN: &[u8] = b"DELETE /admin HTTP/1.1\r\n\r\n";
const ANSWER_405: &[u8] =
    b"HTTP/1.1 405 Method Not Allowed\r\nAllow: GET\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// The egress classifier follows the server's responses (opened with the server's SYN|ACK),
/// and the ingress one times refusals and settles upgrades with what it saw.
#[test]
fn egress_table() {
    if !lab::e2e_enabled("kernel::egress_table") {
        return;
    }
    use Act::*;
    use Reason::*;
    use Step::{ServerReset, A, C, S};
    let mut dp = load(&parse_toml(POLICY).unwrap());
    let mut events = dp.take_events().expect("event ring");
    let table: &[(&str, &[Step])] = &[
        ("a refusal waits for the earlier response, complete and acknowledged", &[
            C(0, 0, b"GET /api/items HTTP/1.1\r\n\r\n", &[AllowedByRule], Pass),
            C(27, 0, b"DELETE /api/items HTTP/1.1\r\n\r\n", &[Held], Drop),
            S(0, &OK5[..40], false, &[]),
            C(27, 40, b"DELETE /api/items HTTP/1.1\r\n\r\n", &[Held], Drop),
            S(40, &OK5[40..], false, &[]),
            C(27, 40, b"DELETE /api/items HTTP/1.1\r\n\r\n", &[Held], Drop),
            C(27, OK5_LEN, b"DELETE /api/items HTTP/1.1\r\n\r\n", &[Rejected], Reset(OK5_LEN)),
        ]),
        ("pipelined: the refused request is cut off, held, then refused after the response", &[
            C(0, 0, b"GET /admin HTTP/1.1\r\n\r\nDELETE /admin HTTP/1.1\r\n\r\n", &[AllowedByRule], Cut),
            C(23, 0, DELETE_ADMIN, &[Held], Drop),
            S(0, OK5, false, &[]),
            C(23, OK5_LEN, DELETE_ADMIN, &[Rejected], Reset(OK5_LEN)),
        ]),
        ("the response to HEAD has no body", &[
            C(0, 0, b"HEAD /admin HTTP/1.1\r\n\r\n", &[AllowedByRule], Pass),
            S(0, HEAD_OK, false, &[]),
            C(24, HEAD_OK.len() as u32, DELETE_ADMIN, &[Rejected], Reset(HEAD_OK.len() as u32)),
        ]),
        // Framing starts when a request comes before the previous one's response has begun
        // (the client pipelines): here the DELETE, held.
        ("interim responses do not count; a retransmitted response is not framed twice", &[
            C(0, 0, b"POST /api/items HTTP/1.1\r\nContent-Length: 2\r\n\r\nab", &[AllowedByRule], Pass),
            C(49, 0, DELETE_ADMIN, &[Held], Drop),
            S(0, b"HTTP/1.1 100 Continue\r\n\r\n", false, &[]),
            S(0, b"HTTP/1.1 100 Continue\r\n\r\n", false, &[]),
            C(49, 25, DELETE_ADMIN, &[Held], Drop),
            S(25, OK5, false, &[]),
            C(49, 25 + OK5_LEN, DELETE_ADMIN, &[Rejected], Reset(25 + OK5_LEN)),
        ]),
        ("a body delimited by the server's close ends at its FIN", &[
            C(0, 0, b"GET /admin HTTP/1.1\r\n\r\n", &[AllowedByRule], Pass),
            C(23, 0, DELETE_ADMIN, &[Held], Drop),
            S(0, b"HTTP/1.0 200 OK\r\n\r\nuntil close", false, &[]),
            C(23, 30, DELETE_ADMIN, &[Held], Drop),
            S(30, b"", true, &[]),
            C(23, 31, DELETE_ADMIN, &[Rejected], Reset(31)),
        ]),
        // Lockstep: a request after a response the client acknowledged whole is judged at once,
        // and the egress side frames nothing.
        ("lockstep: after a complete, acknowledged response the refusal is answered at once", &[
            C(0, 0, b"GET /admin HTTP/1.1\r\n\r\n", &[AllowedByRule], Pass),
            S(0, OK5, false, &[]),
            C(23, OK5_LEN, DELETE_ADMIN, &[Rejected], Reset(OK5_LEN)),
        ]),
        ("lockstep: a request sent before the client has the whole response waits", &[
            C(0, 0, b"GET /admin HTTP/1.1\r\n\r\n", &[AllowedByRule], Pass),
            S(0, OK5, false, &[]),
            C(23, 10, DELETE_ADMIN, &[Held], Drop),
            C(23, OK5_LEN, DELETE_ADMIN, &[Rejected], Reset(OK5_LEN)),
        ]),
        // What lockstep cannot see: a server that stops inside a response while the client,
        // having acknowledged all it got, pipelines a request. That client's answer comes at the
        // server's next byte, inside the unfinished response (its own stream only).
        ("lockstep: an acknowledged part of a response is taken as all of it", &[
            C(0, 0, b"GET /admin HTTP/1.1\r\n\r\n", &[AllowedByRule], Pass),
            S(0, &OK5[..40], false, &[]),
            C(23, 40, DELETE_ADMIN, &[Rejected], Reset(40)),
        ]),
        // ... so a switch of protocols read after such an inference is not trusted: the
        // upgrade waits for good (fail closed), although the backend accepted it.
        ("lockstep: an upgrade after an inferred response waits (fail closed)", &[
            C(0, 0, b"GET /admin HTTP/1.1\r\n\r\n", &[AllowedByRule], Pass),
            S(0, OK5, false, &[]),
            C(23, OK5_LEN, UPGRADE, &[AllowedByDefault], Pass),
            S(OK5_LEN, SWITCHED, false, &[]),
            C(23 + UPGRADE_LEN, OK5_LEN + SWITCHED.len() as u32, DELETE_ADMIN, &[Awaiting], Drop),
        ]),
        ("upgrade refused by the backend: held, then followed as HTTP/1.1", &[
            C(0, 0, UPGRADE, &[AllowedByDefault], Pass),
            C(UPGRADE_LEN, 0, DELETE_ADMIN, &[Awaiting], Drop),
            S(0, REFUSED, false, &[]),
            C(UPGRADE_LEN, REFUSED.len() as u32, DELETE_ADMIN, &[UpgradeRefused, Rejected], Reset(REFUSED.len() as u32)),
        ]),
        ("upgrade accepted (101): tunnel", &[
            C(0, 0, UPGRADE, &[AllowedByDefault], Pass),
            S(0, SWITCHED, false, &[]),
            C(UPGRADE_LEN, SWITCHED.len() as u32, DELETE_ADMIN, &[Tunnel], Pass),
            C(UPGRADE_LEN + 26, SWITCHED.len() as u32, DELETE_ADMIN, &[Tunnel], Pass),
        ]),
        ("upgrade: pipelined bytes after it are cut off until the answer", &[
            C(0, 0, b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nDELETE /admin HTTP/1.1\r\n\r\n", &[AllowedByDefault], Cut),
            C(UPGRADE_LEN, 0, DELETE_ADMIN, &[Awaiting], Drop),
        ]),
        ("upgrade with a body: the body passes, then the stream waits", &[
            C(0, 0, b"POST /api/items HTTP/1.1\r\nUpgrade: x\r\nContent-Length: 4\r\n\r\n", &[AllowedByRule], Pass),
            C(59, 0, b"body", &[MidStream], Pass),
            C(63, 0, DELETE_ADMIN, &[Awaiting], Drop),
        ]),
        ("a 101 to another request than the upgrade loses the state: the upgrade waits for good", &[
            C(0, 0, b"GET /admin HTTP/1.1\r\n\r\n", &[AllowedByRule], Pass),
            C(23, 0, UPGRADE, &[AllowedByDefault], Pass),
            S(0, SWITCHED, false, &[ReplyLost]),
            C(23 + UPGRADE_LEN, 0, DELETE_ADMIN, &[Awaiting], Drop),
            S(SWITCHED.len() as u32, SWITCHED, false, &[]),
            C(23 + UPGRADE_LEN, 0, DELETE_ADMIN, &[Awaiting], Drop),
        ]),
        ("an override to HEAD makes the responses unframeable: a fake 101 cannot open a tunnel", &[
            C(0, 0, b"GET /admin HTTP/1.1\r\nX-HTTP-Method-Override: HEAD\r\n\r\n", &[AllowedByRule], Pass),
            C(53, 0, UPGRADE, &[AllowedByDefault], Pass),
            S(0, b"HTTP/1.1 200 OK\r\nContent-Length: 36\r\n\r\n", false, &[ReplyLost]),
            S(39, b"HTTP/1.1 101 Switching Protocols\r\n\r\n", false, &[]),
            C(53 + UPGRADE_LEN, 0, DELETE_ADMIN, &[Awaiting], Drop),
        ]),
        ("the server's FIN settles an awaited upgrade on a lost connection", &[
            C(0, 0, UPGRADE, &[AllowedByDefault], Pass),
            S(0, b"garbage\r\n", false, &[ReplyLost]),
            C(UPGRADE_LEN, 0, DELETE_ADMIN, &[Awaiting], Drop),
            S(9, b"", true, &[]),
            C(UPGRADE_LEN, 10, DELETE_ADMIN, &[UpgradeRefused, Rejected], Reset(10)),
        ]),
        ("the server reset the connection: an upgrade on it waits (fail closed)", &[
            C(0, 0, b"GET /admin HTTP/1.1\r\n\r\n", &[AllowedByRule], Pass),
            S(0, OK5, false, &[]),
            ServerReset(OK5_LEN),
            C(23, OK5_LEN, UPGRADE, &[AllowedByDefault], Pass),
            C(23 + UPGRADE_LEN, OK5_LEN, DELETE_ADMIN, &[Awaiting], Drop),
        ]),
        ("the server reset the connection: a refusal is answered at the client's ack", &[
            C(0, 0, b"GET /admin HTTP/1.1\r\n\r\n", &[AllowedByRule], Pass),
            ServerReset(0),
            C(23, 0, DELETE_ADMIN, &[Rejected], Reset(0)),
        ]),
        ("CONNECT: 200 switches", &[
            C(0, 0, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", &[AllowedByDefault], Pass),
            S(0, b"HTTP/1.1 200 Connection established\r\n\r\n", false, &[]),
            C(59, 39, DELETE_ADMIN, &[Tunnel], Pass),
        ]),
        ("the answer lost, the refused request sent again: answered again at the same place", &[
            C(0, 0, b"GET /admin HTTP/1.1\r\n\r\n", &[AllowedByRule], Pass),
            S(0, OK5, false, &[]),
            C(23, OK5_LEN, DELETE_ADMIN, &[Rejected], Reset(OK5_LEN)),
            A(OK5_LEN, ANSWER_405),
            C(23, OK5_LEN, DELETE_ADMIN, &[Rejected], Reset(OK5_LEN)),
        ]),
        ("unframeable responses: the old behaviour (answer at the client's ack)", &[
            C(0, 0, b"GET /admin HTTP/1.1\r\n\r\n", &[AllowedByRule], Pass),
            C(23, 0, DELETE_ADMIN, &[Held], Drop),
            S(0, b"ICY 200 OK\r\n\r\n", false, &[ReplyLost]),
            C(23, 0, DELETE_ADMIN, &[Rejected], Reset(0)),
        ]),
    ];
    // 64 pipelined requests in one segment: the 64th waits (63 outstanding at most, so the
    // egress side's ring of HEAD bits never wraps), and goes once a response is complete.
    let get = b"GET / HTTP/1.1\r\n\r\n";
    // (Each request takes one of the 32 rounds a segment gets: 31 per segment here.)
    let many: &'static [u8] = Box::leak(get.repeat(31).into_boxed_slice());
    let two: &'static [u8] = Box::leak(get.repeat(2).into_boxed_slice());
    let n = get.len() as u32;
    let many_63 = 63 * n;
    let ok_once: &'static [u8] = Box::leak(OK5.to_vec().into_boxed_slice());
    let pipelined_64: &'static [Step] = Box::leak(Box::new([
        C(0, 0, many, &[AllowedByDefault], Pass),
        C(31 * n, 0, many, &[AllowedByDefault], Pass),
        C(62 * n, 0, two, &[AllowedByDefault, Held], Cut),
        C(many_63, 0, get, &[Held], Drop),
        S(0, ok_once, false, &[]),
        C(many_63, 0, get, &[AllowedByDefault], Pass),
    ]));
    // A chunked body of 1-byte chunks framed across a whole frame (small chunks cost no
    // round each: the state is not lost).
    let mut small = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..500 {
        small.extend_from_slice(b"1\r\nx\r\n");
    }
    small.extend_from_slice(b"0\r\nX-Trailer: 1\r\n\r\n");
    let small_len = small.len() as u32;
    let small: &'static [u8] = Box::leak(small.into_boxed_slice());
    let chunks: &'static [Step] = Box::leak(Box::new([
        C(0, 0, b"GET /admin HTTP/1.1\r\n\r\n", &[AllowedByRule], Pass),
        S(0, small, false, &[]),
        C(23, small_len, DELETE_ADMIN, &[Rejected], Reset(small_len)),
    ]));
    let table: Vec<(&str, &[Step])> = table
        .iter()
        .copied()
        .chain([
            (
                "64 pipelined requests: the 64th waits for a response",
                pipelined_64,
            ),
            (
                "a chunked response of 500 one-byte chunks in one frame",
                chunks,
            ),
        ])
        .collect();
    let mut failures = Vec::new();
    for ip in [Ip::V4, Ip::V6] {
        for (i, (name, steps)) in table.iter().enumerate() {
            let cport = 30000 + i as u16 + if let Ip::V6 = ip { 100 } else { 0 };
            let syn = conn_frame(ip, cport, true, SEQ.wrapping_sub(1), 0, tcp_flags::SYN, b"");
            dp.test_run(&syn, 1).unwrap();
            handshake_rest(&mut dp, ip, cport);
            // The server's segment at `off` in its byte stream.
            let server = |off: u32, flags: u8, payload: &[u8]| {
                conn_frame(ip, cport, false, ACK.wrapping_add(off), SEQ, flags, payload)
            };
            for (j, step) in steps.iter().enumerate() {
                if let ServerReset(off) = step {
                    let f = server(*off, tcp_flags::RST | tcp_flags::ACK, b"");
                    let out = dp.test_run_egress(&f, 1).unwrap();
                    assert_eq!(
                        out.action, PASS,
                        "{name}: egress changed a server RST's verdict"
                    );
                    continue;
                }
                if let A(off, payload) = step {
                    let before = counters(&dp);
                    let f = server(
                        *off,
                        tcp_flags::FIN | tcp_flags::PSH | tcp_flags::ACK,
                        payload,
                    );
                    let out = dp.test_run_egress_marked(&f, RESPONDER_MARK).unwrap();
                    let got = delta(&before, &counters(&dp));
                    if out.action != PASS || out.frame != f || !got.is_empty() {
                        failures.push(format!(
                            "{name} ({}), step {j}: the responder's answer was not passed untouched (counted {got:?})",
                            ip_name(ip)
                        ));
                    }
                    continue;
                }
                let before = counters(&dp);
                let (out, frame, reasons, act) = match step {
                    C(off, ack, payload, reasons, act) => {
                        let f = conn_frame(
                            ip,
                            cport,
                            true,
                            SEQ.wrapping_add(*off),
                            ACK.wrapping_add(*ack),
                            tcp_flags::PSH | tcp_flags::ACK,
                            payload,
                        );
                        (dp.test_run(&f, 1).unwrap(), f, *reasons, Some(*act))
                    }
                    S(off, payload, fin, reasons) => {
                        let flags =
                            tcp_flags::PSH | tcp_flags::ACK | if *fin { tcp_flags::FIN } else { 0 };
                        let f = server(*off, flags, payload);
                        (dp.test_run_egress(&f, 1).unwrap(), f, *reasons, None)
                    }
                    ServerReset(_) | A(..) => unreachable!(),
                };
                let got: Vec<Reason> = delta(&before, &counters(&dp))
                    .into_iter()
                    .map(|(r, _)| r)
                    .collect();
                let mut want = reasons.to_vec();
                want.sort_by_key(|r| *r as u32);
                let event = events.next().map(|item| unsafe {
                    std::ptr::read_unaligned(item.as_ptr().cast::<RejectEvent>())
                });
                let is_reset = out.frame.len() < frame.len()
                    && out.frame[out.frame.len() - 20 + 13] & tcp_flags::RST != 0;
                let got_act = match act {
                    None => {
                        if out.action != PASS || out.frame != frame {
                            failures.push(format!(
                                "{name} ({}), step {j}: egress changed the frame or its verdict",
                                ip_name(ip)
                            ));
                        }
                        None
                    }
                    Some(_) if out.action == DROP => Some(Drop),
                    Some(_) if is_reset => {
                        Some(Reset(event.map_or(u32::MAX, |e| e.ack.wrapping_sub(ACK))))
                    }
                    Some(_) if out.frame.len() < frame.len() => Some(Cut),
                    Some(_) if out.frame == frame && out.action == PASS => Some(Pass),
                    Some(_) => None,
                };
                if got != want || got_act != act {
                    failures.push(format!(
                        "{name} ({}), step {j}: counted {got:?} (want {want:?}), did {got_act:?} (want {act:?})",
                        ip_name(ip)
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

fn ip_name(ip: Ip) -> &'static str {
    match ip {
        Ip::V6 => "IPv6",
        _ => "IPv4",
    }
}

/// A segment cut before a refused request keeps correct lengths and checksums. Under
/// `BPF_PROG_TEST_RUN` the skb carries a full checksum (`CHECKSUM_NONE`), the state of a
/// segment from a NIC without checksum offload; the end-to-end tests cover veth's
/// `CHECKSUM_PARTIAL`. Odd and even cut points (the removed bytes' words swap on odd ones).
#[test]
fn cut_segments_keep_valid_checksums() {
    if !lab::e2e_enabled("kernel::cut_segments_keep_valid_checksums") {
        return;
    }
    let mut dp = load(&parse_toml(POLICY).unwrap());
    let refused: &[u8] = b"DELETE /admin HTTP/1.1\r\nHost: x\r\n\r\n";
    let kept: [&[u8]; 2] = [
        b"GET /admin HTTP/1.1\r\n\r\n",          // 23 bytes: odd cut
        b"GET /admin HTTP/1.1\r\nA: bc\r\n\r\n", // 30 bytes: even cut
    ];
    let mut failures = Vec::new();
    for (i, ip) in [Ip::V4, Ip::V4Options(2), Ip::V6].into_iter().enumerate() {
        for (j, kept) in kept.iter().enumerate() {
            let name = format!("ip #{i}, cut after {} bytes", kept.len());
            let sport = 51000 + (i * 10 + j) as u16;
            open_conn(&mut dp, ip, sport);
            let mut payload = kept.to_vec();
            payload.extend_from_slice(refused);
            let frame = build(&client_segment(ip, sport, 0, &payload));
            let out = dp.test_run(&frame, 1).unwrap().frame;
            let v4 = !matches!(ip, Ip::V6);
            let l4 = if v4 {
                14 + ((frame[14] & 0x0f) as usize) * 4
            } else {
                54
            };
            let doff = ((frame[l4 + 12] >> 4) as usize) * 4;
            let seg_len = doff + kept.len();
            if out.len() != l4 + seg_len {
                failures.push(format!(
                    "{name}: {} bytes out, want {}",
                    out.len(),
                    l4 + seg_len
                ));
                continue;
            }
            if out[l4 + doff..] != **kept {
                failures.push(format!("{name}: kept payload differs"));
            }
            if out[l4..l4 + 16] != frame[l4..l4 + 16]
                || out[l4 + 18..l4 + doff] != frame[l4 + 18..l4 + doff]
            {
                failures.push(format!("{name}: TCP header changed beyond its checksum"));
            }
            let t = &out[l4..];
            let sum = if v4 {
                let ip = &out[14..l4];
                if u16::from_be_bytes([ip[2], ip[3]]) as usize != ip.len() + seg_len {
                    failures.push(format!("{name}: tot_len"));
                }
                if csum::finish(csum::add(0, ip)) != 0 {
                    failures.push(format!("{name}: IPv4 header checksum"));
                }
                let (s, d) = (
                    ip[12..16].try_into().unwrap(),
                    ip[16..20].try_into().unwrap(),
                );
                csum::finish(csum::add(csum::pseudo_v4(&s, &d, seg_len as u16), t))
            } else {
                if u16::from_be_bytes([out[18], out[19]]) as usize != seg_len {
                    failures.push(format!("{name}: payload_len"));
                }
                let (s, d) = (
                    out[22..38].try_into().unwrap(),
                    out[38..54].try_into().unwrap(),
                );
                csum::finish(csum::add(csum::pseudo_v6(&s, &d, seg_len as u32), t))
            };
            if sum != 0 {
                failures.push(format!("{name}: TCP checksum does not verify"));
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// A connection with no state: adopted at its segment while the adoption window is open
/// (connections open before the load), refused once it is closed (its state was evicted);
/// a refused request sent again gets the same answer; a FIN releases the state.
#[test]
fn stateless_segments_and_released_state() {
    if !lab::e2e_enabled("kernel::stateless_segments_and_released_state") {
        return;
    }
    let mut dp = load(&parse_toml(POLICY).unwrap());
    let mut events = dp.take_events().expect("event ring");
    let mut next_event = || {
        events
            .next()
            .map(|item| unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<RejectEvent>()) })
    };
    let run = |dp: &mut Dataplane, f: &Frame| {
        let frame = build(f);
        let before = counters(dp);
        let out = dp.test_run(&frame, 1).unwrap();
        let reasons: Vec<Reason> = delta(&before, &counters(dp))
            .into_iter()
            .map(|(r, _)| r)
            .collect();
        (frame, out.frame, reasons)
    };
    let body = b"{\"k\": 1}DELETE /admin HTTP/1.1\r\n\r\n";

    // Window open (the default after a load): adopted; the bytes are not HTTP, so the
    // connection is not followed.
    let (_, out, reasons) = run(&mut dp, &tcp(Ip::V4, 80, body));
    assert_eq!(reasons, [Reason::NotHttp], "adopted mid-stream");
    assert!(out.len() > 60, "adopted segment passes");
    assert!(next_event().is_none());

    // Window closed: refused, with a 503 for the responder.
    dp.set_adopt_window(std::time::Duration::ZERO).unwrap();
    let (frame, out, reasons) = run(&mut dp, &tcp(Ip::V4, 80, body));
    assert_eq!(
        reasons,
        [Reason::ConnTableFull],
        "state lost after the window"
    );
    assert_reset("stateless after the window", &frame, &out);
    let ev = next_event().expect("the responder is told");
    assert_eq!(ev.reason, Reason::ConnTableFull as u32);

    // A connection from its SYN (its SYN|ACK unseen: the answers leave elsewhere; the backend
    // is not on this host): a refused request sent again is refused again (same answer), and
    // its FIN releases the state.
    let base = dp.tracked_connections();
    let mut f = tcp(Ip::V4, 80, b"");
    f.seq = SEQ.wrapping_sub(1);
    f.syn = true;
    run(&mut dp, &f);
    assert_eq!(
        dp.tracked_connections(),
        base,
        "a SYN alone creates no connection state (a flood of them evicts none)"
    );
    f.seq = SEQ;
    f.syn = false;
    f.payload = b"DELETE /admin HTTP/1.1\r\n\r\n".to_vec();
    for attempt in ["first", "resent"] {
        let (frame, out, reasons) = run(&mut dp, &f);
        assert_eq!(reasons, [Reason::Rejected], "{attempt} copy");
        assert_reset(attempt, &frame, &out);
        assert_eq!(next_event().expect("event").reason, Reason::Rejected as u32);
        assert_eq!(
            dp.tracked_connections(),
            base + 1,
            "the first byte after the SYN starts the state"
        );
    }
    let fin = conn_frame(
        Ip::V4,
        f.sport,
        true,
        SEQ,
        ACK,
        tcp_flags::FIN | tcp_flags::ACK,
        b"",
    );
    dp.test_run(&fin, 1).unwrap();
    assert_eq!(dp.tracked_connections(), base, "the FIN releases the state");
}

/// A TCP segment built field by field, for the normalization table.
#[derive(Clone)]
struct Wire {
    ip: Ip,
    cport: u16,
    from_client: bool,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    urg: u16,
    /// TCP options (a multiple of 4 bytes).
    opts: Vec<u8>,
    payload: Vec<u8>,
    /// Flip a bit of the TCP checksum.
    bad_csum: bool,
    /// The destination MAC (the server's, `SERVER_MAC`, unless a test says otherwise).
    dst_mac: [u8; 6],
    /// IPv6 Destination Options headers (8 bytes each) before TCP.
    v6_exts: usize,
    /// VLAN priority tags (VID 0) in the frame.
    vlan_tags: usize,
    /// Flip a bit of the IPv4 header checksum.
    bad_ip_csum: bool,
}

impl Wire {
    fn client(ip: Ip, cport: u16, seq: u32, ack: u32, flags: u8, payload: &[u8]) -> Wire {
        Wire {
            ip,
            cport,
            from_client: true,
            seq,
            ack,
            flags,
            window: 0xffff,
            urg: 0,
            opts: Vec::new(),
            payload: payload.to_vec(),
            bad_csum: false,
            dst_mac: SERVER_MAC,
            v6_exts: 0,
            vlan_tags: 0,
            bad_ip_csum: false,
        }
    }

    fn server(ip: Ip, cport: u16, seq: u32, ack: u32, flags: u8, payload: &[u8]) -> Wire {
        Wire {
            from_client: false,
            dst_mac: CLIENT_MAC,
            ..Wire::client(ip, cport, seq, ack, flags, payload)
        }
    }

    fn build(&self) -> Vec<u8> {
        let (sport, dport) = if self.from_client {
            (self.cport, 80)
        } else {
            (80, self.cport)
        };
        let mut l4 = Vec::new();
        l4.extend_from_slice(&sport.to_be_bytes());
        l4.extend_from_slice(&dport.to_be_bytes());
        l4.extend_from_slice(&self.seq.to_be_bytes());
        l4.extend_from_slice(&self.ack.to_be_bytes());
        l4.push((((20 + self.opts.len()) / 4) as u8) << 4);
        l4.push(self.flags);
        l4.extend_from_slice(&self.window.to_be_bytes());
        l4.extend_from_slice(&[0, 0]);
        l4.extend_from_slice(&self.urg.to_be_bytes());
        l4.extend_from_slice(&self.opts);
        l4.extend_from_slice(&self.payload);
        let mut frame = Vec::new();
        let smac = if self.from_client {
            CLIENT_MAC
        } else {
            SERVER_MAC
        };
        frame.extend_from_slice(&self.dst_mac);
        frame.extend_from_slice(&smac);
        for _ in 0..self.vlan_tags {
            frame.extend_from_slice(&[0x81, 0x00, 0x00, 0x00]);
        }
        let fix = |l4: &mut Vec<u8>, pseudo: u32| {
            let c = csum::finish(csum::add(pseudo, l4));
            l4[16..18].copy_from_slice(&c.to_be_bytes());
        };
        let tcp_len = l4.len();
        if let Ip::V6 = self.ip {
            let (src, dst) = if self.from_client {
                (v6(1), v6(2))
            } else {
                (v6(2), v6(1))
            };
            fix(&mut l4, csum::pseudo_v6(&src, &dst, tcp_len as u32));
            let exts = self.v6_exts;
            frame.extend_from_slice(&0x86ddu16.to_be_bytes());
            frame.extend_from_slice(&[0x60, 0, 0, 0]);
            frame.extend_from_slice(&((l4.len() + 8 * exts) as u16).to_be_bytes());
            frame.extend_from_slice(&[if exts > 0 { 60 } else { 6 }, 64]);
            frame.extend_from_slice(&src);
            frame.extend_from_slice(&dst);
            for i in 0..exts {
                let next = if i + 1 < exts { 60 } else { 6 };
                frame.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
            }
        } else {
            let (c4, s4) = (
                Ipv4Addr::new(10, 77, 0, 1).octets(),
                Ipv4Addr::new(10, 77, 0, 2).octets(),
            );
            let (src, dst) = if self.from_client { (c4, s4) } else { (s4, c4) };
            fix(&mut l4, csum::pseudo_v4(&src, &dst, tcp_len as u16));
            let mut iph = vec![0u8; 20];
            iph[0] = 0x45;
            iph[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
            iph[6] = 0x40;
            iph[8] = 64;
            iph[9] = 6;
            iph[12..16].copy_from_slice(&src);
            iph[16..20].copy_from_slice(&dst);
            let c = csum::finish(csum::add(0, &iph));
            iph[10..12].copy_from_slice(&c.to_be_bytes());
            if self.bad_ip_csum {
                iph[11] ^= 1;
            }
            frame.extend_from_slice(&0x0800u16.to_be_bytes());
            frame.extend_from_slice(&iph);
        }
        if self.bad_csum {
            l4[17] ^= 1;
        }
        frame.extend_from_slice(&l4);
        frame
    }
}

/// TCP options: NOP NOP timestamp `tsval`.
fn ts_opt(tsval: u32) -> Vec<u8> {
    let mut o = vec![1, 1, 8, 10];
    o.extend_from_slice(&tsval.to_be_bytes());
    o.extend_from_slice(&[0, 0, 0, 0]);
    o
}

/// A handshake's options: timestamp `tsval`, NOP, window scale `ws`.
fn syn_opts(tsval: u32, ws: u8) -> Vec<u8> {
    let mut o = ts_opt(tsval);
    o.extend_from_slice(&[1, 3, 3, ws]);
    o
}

/// The ingress classifier reads a client's stream as the server's TCP will: segments TCP would
/// discard change nothing (the same bytes sent again as a "retransmission" are judged), an
/// urgent byte is read in line by both, and SYN, RST and FIN change the state only where TCP
/// acts on them.
#[test]
fn normalization_table() {
    if !lab::e2e_enabled("kernel::normalization_table") {
        return;
    }
    use Reason::*;
    let mut dp = load(&parse_toml(POLICY).unwrap());
    const ALLOWED: &[u8] = b"GET /admin HTTP/1.1\r\n\r\n";
    const REFUSED: &[u8] = b"PUT /admin HTTP/1.1\r\n\r\n";
    /// What a segment must do: reasons counted, and whether it passed untouched (`Pass`), was
    /// dropped, or was turned into a reset.
    #[derive(Debug, PartialEq, Clone, Copy)]
    enum Act {
        Pass,
        Drop,
        Reset,
        /// Passed, changed (cut, or a header field cleared).
        Changed,
    }
    type Tweak = fn(&mut Wire);
    /// A client segment: stream offset, payload, what to change in it, reasons, action.
    type Step = (u32, &'static [u8], Tweak, &'static [Reason], Act);
    // Each row: its connection's handshake options (timestamps and window scaling, or none),
    // the server's window in its SYN|ACK, then client segments at stream offsets.
    struct Row {
        name: &'static str,
        ts: bool,
        window: u16,
        steps: Vec<Step>,
    }
    fn none(_: &mut Wire) {}
    let rows = vec![
        Row {
            name: "bad checksum: the first copy counts for nothing",
            ts: false,
            window: 0xffff,
            steps: vec![
                (0, ALLOWED, |w| w.bad_csum = true, &[BadChecksum], Act::Drop),
                (0, REFUSED, none, &[Rejected], Act::Reset),
            ],
        },
        Row {
            name: "no ACK flag",
            ts: false,
            window: 0xffff,
            steps: vec![
                (
                    0,
                    ALLOWED,
                    |w| w.flags = tcp_flags::PSH,
                    &[NoAck],
                    Act::Drop,
                ),
                (0, REFUSED, none, &[Rejected], Act::Reset),
            ],
        },
        Row {
            name: "ACK of data the server never sent",
            ts: false,
            window: 0xffff,
            steps: vec![
                (
                    0,
                    ALLOWED,
                    |w| w.ack = w.ack.wrapping_add(1000),
                    &[BadAck],
                    Act::Drop,
                ),
                (0, REFUSED, none, &[Rejected], Act::Reset),
            ],
        },
        Row {
            name: "ACK older than the window (RFC 5961 5.2)",
            ts: false,
            window: 0xffff,
            steps: vec![
                (
                    0,
                    ALLOWED,
                    |w| w.ack = w.ack.wrapping_sub(0x4000_0000),
                    &[BadAck],
                    Act::Drop,
                ),
                (0, REFUSED, none, &[Rejected], Act::Reset),
            ],
        },
        Row {
            name: "PAWS: an older timestamp",
            ts: true,
            window: 0xffff,
            steps: vec![
                (0, ALLOWED, |w| w.opts = ts_opt(90), &[Paws], Act::Drop),
                (
                    0,
                    REFUSED,
                    |w| w.opts = ts_opt(101),
                    &[Rejected],
                    Act::Reset,
                ),
            ],
        },
        Row {
            name: "PAWS: no timestamp where the handshake negotiated them",
            ts: true,
            window: 0xffff,
            steps: vec![
                (0, ALLOWED, |w| w.opts.clear(), &[Paws], Act::Drop),
                (
                    0,
                    REFUSED,
                    |w| w.opts = ts_opt(101),
                    &[Rejected],
                    Act::Reset,
                ),
            ],
        },
        Row {
            name: "past the window's edge: trimmed to it",
            ts: false,
            window: 10,
            steps: vec![(0, ALLOWED, none, &[OutOfWindow, MidStream], Act::Changed)],
        },
        Row {
            name: "zero window: dropped",
            ts: false,
            window: 0,
            steps: vec![(0, REFUSED, none, &[OutOfWindow], Act::Drop)],
        },
        Row {
            name: "SYN inside the connection changes nothing",
            ts: false,
            window: 0xffff,
            steps: vec![
                (
                    0,
                    ALLOWED,
                    |w| w.flags |= tcp_flags::SYN,
                    &[SynInStream],
                    Act::Changed,
                ),
                (0, REFUSED, none, &[Rejected], Act::Reset),
            ],
        },
        Row {
            // The refusal reset the backend's side: a SYN on the tuple (the client reusing its
            // port) is a new connection, not one inside the old stream.
            name: "SYN after a refusal starts afresh",
            ts: false,
            window: 0xffff,
            steps: vec![
                (0, REFUSED, none, &[Rejected], Act::Reset),
                (
                    0,
                    ALLOWED,
                    |w| w.flags |= tcp_flags::SYN,
                    &[NoPayload],
                    Act::Changed,
                ),
            ],
        },
        Row {
            name: "RST off the next byte changes nothing",
            ts: false,
            window: 0xffff,
            steps: vec![
                (
                    10,
                    b"",
                    |w| w.flags = tcp_flags::RST | tcp_flags::ACK,
                    &[NoPayload],
                    Act::Pass,
                ),
                (0, REFUSED, none, &[Rejected], Act::Reset),
            ],
        },
        Row {
            name: "FIN ahead of the stream passes and changes nothing",
            ts: false,
            window: 0xffff,
            steps: vec![
                (
                    30,
                    b"",
                    |w| w.flags = tcp_flags::FIN | tcp_flags::ACK,
                    &[NoPayload],
                    Act::Pass,
                ),
                (0, REFUSED, none, &[Rejected], Act::Reset),
            ],
        },
        Row {
            name: "urgent data is read in line",
            ts: false,
            window: 0xffff,
            steps: vec![
                // `PUT /aXdmin`: with the urgent byte X taken out, the server would route /admin.
                (
                    0,
                    b"PUT /aXdmin HTTP/1.1\r\n\r\n",
                    |w| {
                        w.flags |= tcp_flags::URG;
                        w.urg = 7;
                    },
                    &[UrgentCleared, AllowedByDefault],
                    Act::Changed,
                ),
            ],
        },
        Row {
            name: "a frame for another host",
            ts: false,
            window: 0xffff,
            steps: vec![
                (
                    0,
                    ALLOWED,
                    |w| w.dst_mac = [2, 0, 0, 0, 0, 9],
                    &[NotForHost],
                    Act::Drop,
                ),
                (0, REFUSED, none, &[Rejected], Act::Reset),
            ],
        },
        Row {
            name: "a bad IPv4 header checksum",
            ts: false,
            window: 0xffff,
            steps: vec![
                (
                    0,
                    ALLOWED,
                    |w| w.bad_ip_csum = true,
                    &[BadHeader],
                    Act::Drop,
                ),
                (0, REFUSED, none, &[Rejected], Act::Reset),
            ],
        },
        Row {
            name: "more VLAN priority tags than are walked",
            ts: false,
            window: 0xffff,
            steps: vec![
                (0, ALLOWED, |w| w.vlan_tags = 3, &[Unwalkable], Act::Drop),
                (0, REFUSED, none, &[Rejected], Act::Reset),
            ],
        },
        Row {
            name: "more IPv6 extension headers than are walked",
            ts: false,
            window: 0xffff,
            steps: vec![
                (
                    0,
                    ALLOWED,
                    |w| w.v6_exts = filter_common::packet::V6_EXT_MAX + 1,
                    &[Unwalkable],
                    Act::Drop,
                ),
                (
                    0,
                    REFUSED,
                    |w| w.v6_exts = filter_common::packet::V6_EXT_MAX,
                    &[Rejected],
                    Act::Reset,
                ),
            ],
        },
    ];
    let mut failures = Vec::new();
    for ip in [Ip::V4, Ip::V6] {
        for (i, row) in rows.iter().enumerate() {
            let v6 = matches!(ip, Ip::V6);
            if (row.name.contains("IPv4") && v6) || (row.name.contains("IPv6") && !v6) {
                continue;
            }
            let cport = 33000 + i as u16 + if let Ip::V6 = ip { 100 } else { 0 };
            let mut syn = Wire::client(ip, cport, SEQ.wrapping_sub(1), 0, tcp_flags::SYN, b"");
            let mut synack = Wire::server(
                ip,
                cport,
                ACK.wrapping_sub(1),
                SEQ,
                tcp_flags::SYN | tcp_flags::ACK,
                b"",
            );
            synack.window = row.window;
            let mut ack = Wire::client(ip, cport, SEQ, ACK, tcp_flags::ACK, b"");
            if row.ts {
                syn.opts = syn_opts(100, 0);
                synack.opts = syn_opts(5000, 0);
                ack.opts = ts_opt(100);
            }
            dp.test_run(&syn.build(), 1).unwrap();
            dp.test_run_egress(&synack.build(), 1).unwrap();
            dp.test_run(&ack.build(), 1).unwrap();
            for (j, (off, payload, tweak, want, act)) in row.steps.iter().enumerate() {
                let mut w = Wire::client(
                    ip,
                    cport,
                    SEQ.wrapping_add(*off),
                    ACK,
                    tcp_flags::PSH | tcp_flags::ACK,
                    payload,
                );
                if row.ts {
                    w.opts = ts_opt(100);
                }
                tweak(&mut w);
                let frame = w.build();
                let before = counters(&dp);
                let out = dp.test_run(&frame, 1).unwrap();
                let mut got: Vec<Reason> = delta(&before, &counters(&dp))
                    .into_iter()
                    .map(|(r, _)| r)
                    .collect();
                got.sort_by_key(|r| *r as u32);
                let mut want = want.to_vec();
                want.sort_by_key(|r| *r as u32);
                let got_act = if out.action == DROP {
                    Act::Drop
                } else if out.frame == frame {
                    Act::Pass
                } else if out.frame.len() < frame.len()
                    && out.frame[out.frame.len() - 20 + 13] & tcp_flags::RST != 0
                {
                    Act::Reset
                } else {
                    Act::Changed
                };
                if got != want || got_act != *act {
                    failures.push(format!(
                        "{} ({}), step {j}: counted {got:?} (want {want:?}), did {got_act:?} (want {act:?})",
                        row.name,
                        ip_name(ip)
                    ));
                }
                if got_act == Act::Changed {
                    check_changed(row.name, ip, &frame, &out.frame, &mut failures);
                }
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// A segment the classifier changed and passed: its TCP checksum is still right, no urgent
/// flag or pointer is left, and no SYN's data.
fn check_changed(name: &str, ip: Ip, input: &[u8], out: &[u8], failures: &mut Vec<String>) {
    let v4 = !matches!(ip, Ip::V6);
    let l3 = 14;
    let l4 = if v4 { l3 + 20 } else { l3 + 40 };
    let tcp = &out[l4..];
    let (src, dst) = (l3 + if v4 { 12 } else { 8 }, l3 + if v4 { 16 } else { 24 });
    let pseudo = if v4 {
        csum::pseudo_v4(
            out[src..src + 4].try_into().unwrap(),
            out[dst..dst + 4].try_into().unwrap(),
            tcp.len() as u16,
        )
    } else {
        csum::pseudo_v6(
            out[src..src + 16].try_into().unwrap(),
            out[dst..dst + 16].try_into().unwrap(),
            tcp.len() as u32,
        )
    };
    if csum::finish(csum::add(pseudo, tcp)) != 0 {
        failures.push(format!(
            "{name} ({}): the changed segment's checksum is wrong",
            ip_name(ip)
        ));
    }
    if tcp[13] & tcp_flags::URG != 0 || tcp[18] != 0 || tcp[19] != 0 {
        failures.push(format!(
            "{name} ({}): an urgent flag or pointer is left",
            ip_name(ip)
        ));
    }
    if tcp[13] & tcp_flags::SYN != 0 && out.len() != l4 + ((tcp[12] >> 4) as usize) * 4 {
        failures.push(format!("{name} ({}): a SYN kept its data", ip_name(ip)));
    }
    if out.len() > input.len() {
        failures.push(format!("{name} ({}): the segment grew", ip_name(ip)));
    }
}

/// `/metrics` counts the connection table with batch lookups (`BPF_MAP_LOOKUP_BATCH`, a few
/// syscalls for the whole table): the same count as a walk key by key, over more entries than
/// one batch takes.
#[test]
fn the_connection_table_is_counted_in_batches() {
    if !lab::e2e_enabled("kernel::the_connection_table_is_counted_in_batches") {
        return;
    }
    let mut dp = load(&parse_toml(POLICY).unwrap());
    let _events = dp.take_events().expect("event ring");
    let base = dp.tracked_connections_walked();
    for i in 0..2500u16 {
        open_conn(&mut dp, Ip::V4, 10_000 + i);
    }
    let walked = dp.tracked_connections_walked();
    assert_eq!(walked, base + 2500, "every handshake left its state");
    assert_eq!(dp.tracked_connections(), walked);
    assert_eq!(
        dp.tracked_connections_batched()
            .expect("the kernel has batch lookups for LRU hashes"),
        walked
    );
}

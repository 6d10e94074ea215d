use super::*;
use std::string::String;
use std::vec::Vec;

/// What the caller of a [`Stream`] saw, in order.
#[derive(Debug, PartialEq, Eq, Clone)]
enum Seen {
    Request(Method, String),
    Override(Method),
    Tunnel,
    Fail(Reason),
}

/// Feed `data` to a fresh stream in segments cut at `cuts`, the way the kernel does: bulk
/// bytes are consumed in bulk, everything else byte by byte; stops at a failure or tunnel.
fn run(data: &[u8], cuts: &[usize]) -> Vec<Seen> {
    let mut s = Stream::new(1000, flag::SYN);
    let mut path = [0u8; PATH_MAX];
    let mut seen = Vec::new();
    let mut bounds: Vec<usize> = cuts
        .iter()
        .copied()
        .filter(|&c| c > 0 && c < data.len())
        .collect();
    bounds.push(data.len());
    let mut start = 0;
    for end in bounds {
        let seg = &data[start..end];
        let mut off = 0;
        while off < seg.len() {
            if s.in_bulk() {
                let n = (s.bulk_left() as usize).min(seg.len() - off);
                s.consume(n as u64);
                off += n;
                continue;
            }
            let ev = s.step(seg[off], &mut path);
            off += 1;
            match ev {
                Ev::More | Ev::Bulk | Ev::Await => {}
                Ev::Decide => {
                    s.take_method();
                    // The caller canonicalizes the raw path (the kernel: a second bpf_loop).
                    let raw = path;
                    let mut canon = [0u8; PATH_MAX];
                    let p = if s.line.path_len() == 0 {
                        String::new()
                    } else {
                        match crate::canon::canonicalize(&raw[..s.line.path_len()], &mut canon) {
                            Ok(n) => String::from_utf8_lossy(&canon[..n]).into_owned(),
                            Err(r) => {
                                seen.push(Seen::Fail(r));
                                return seen;
                            }
                        }
                    };
                    seen.push(Seen::Request(Method::from_u8(s.method), p));
                    s.set_verdict(MethodSet::ANY.0, 0);
                }
                Ev::Override => seen.push(Seen::Override(s.override_method())),
                Ev::Tunnel => {
                    seen.push(Seen::Tunnel);
                    return seen;
                }
                Ev::Fail(r) => {
                    seen.push(Seen::Fail(r));
                    return seen;
                }
            }
        }
        start = end;
    }
    seen
}

use crate::MethodSet;

fn req(m: Method, p: &str) -> Seen {
    Seen::Request(m, p.into())
}

/// The same decisions whatever the segmentation: whole, every single cut, 1-byte segments.
fn check(data: &[u8], want: &[Seen]) {
    let text = String::from_utf8_lossy(data);
    assert_eq!(run(data, &[]), want, "whole: {text:?}");
    for cut in 1..data.len() {
        assert_eq!(run(data, &[cut]), want, "cut at {cut}: {text:?}");
    }
    let ones: Vec<usize> = (1..data.len()).collect();
    assert_eq!(run(data, &ones), want, "1-byte segments: {text:?}");
}

#[test]
fn keep_alive_and_pipelined_requests_are_each_decided() {
    use Method::*;
    check(
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nDELETE /admin HTTP/1.1\r\nHost: x\r\n\r\n",
        &[req(Get, "/a"), req(Delete, "/admin")],
    );
    check(
        b"GET /a HTTP/1.1\n\nPUT /b HTTP/1.1\n\n",
        &[req(Get, "/a"), req(Put, "/b")],
    );
}

#[test]
fn bodies_are_skipped_not_parsed_as_requests() {
    use Method::*;
    // A request line hidden in a Content-Length body is body, not a request.
    let hidden = b"POST /api HTTP/1.1\r\nContent-Length: 28\r\n\r\nDELETE /admin HTTP/1.1\r\n\r\n\r\nGET /next HTTP/1.1\r\n\r\n";
    check(hidden, &[req(Post, "/api"), req(Get, "/next")]);
    // ... and the request after the body is one.
    let after = b"POST /api HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcDELETE /admin HTTP/1.1\r\n\r\n";
    check(after, &[req(Post, "/api"), req(Delete, "/admin")]);
    // Chunked: sizes, extensions, trailers; the request after it is decided.
    let chunked = b"POST /c HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n5;ext=1\r\nhello\r\n1A\r\nDELETE /admin HTTP/1.1\r\n\r\n\r\n0\r\nX-Trailer: 1\r\n\r\nPUT /after HTTP/1.1\r\n\r\n";
    check(chunked, &[req(Post, "/c"), req(Put, "/after")]);
}

#[test]
fn method_override_headers_are_reported() {
    use Method::*;
    for name in [
        "X-HTTP-Method-Override",
        "x-http-method",
        "X-Method-Override",
    ] {
        let data = std::format!("POST /a HTTP/1.1\r\n{name}:  delete \r\n\r\n");
        check(data.as_bytes(), &[req(Post, "/a"), Seen::Override(Delete)]);
    }
    check(
        b"POST /a HTTP/1.1\r\nX-HTTP-Method-Override: BREW\r\n\r\n",
        &[req(Post, "/a"), Seen::Override(Other)],
    );
}

#[test]
fn ambiguous_framing_is_refused() {
    use Method::*;
    let cases: &[&[u8]] = &[
        b"POST /a HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST /a HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
        b"POST /a HTTP/1.1\r\nContent-Length: 3 4\r\n\r\n",
        b"POST /a HTTP/1.1\r\nContent-Length: +3\r\n\r\n",
        b"POST /a HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST /a HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
        b"POST /a HTTP/1.1\r\nHost : x\r\n\r\n",
        b"POST /a HTTP/1.1\r\nHost: x\x00y\r\n\r\n",
        b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\r\n",
        b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXY",
    ];
    for c in cases {
        check(c, &[req(Post, "/a"), Seen::Fail(Reason::BadFraming)]);
    }
    // Identical repeated lengths are fine.
    check(b"POST /a HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nxGET /b HTTP/1.1\r\n\r\n", &[req(Post, "/a"), req(Get, "/b")]);
}

#[test]
fn tunnels_and_non_http() {
    use Method::*;
    check(
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: x\r\n\r\nDELETE /x",
        &[req(Connect, ""), Seen::Tunnel],
    );
    check(
        b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n\x81\x05hello",
        &[req(Get, "/ws"), Seen::Tunnel],
    );
    check(
        b"OPTIONS * HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n",
        &[req(Options, ""), req(Get, "/")],
    );
    check(
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        &[Seen::Fail(Reason::NotHttp)],
    );
    check(b"\x16\x03\x01\x02\x00\x01", &[Seen::Fail(Reason::NotHttp)]);
}

#[test]
fn paths_are_canonical_and_ambiguous_ones_refused() {
    use Method::*;
    check(
        b"DELETE /a/../ad%6din;x=1?q HTTP/1.1\r\n\r\n",
        &[req(Delete, "/admin")],
    );
    check(
        b"DELETE http://h//admin/. HTTP/1.1\r\n\r\n",
        &[req(Delete, "/admin/")],
    );
    check(
        b"DELETE /a%2Fb HTTP/1.1\r\n\r\n",
        &[Seen::Fail(Reason::BadPath)],
    );
    check(
        b"DELETE /a\\b HTTP/1.1\r\n\r\n",
        &[Seen::Fail(Reason::BadPath)],
    );
}

#[test]
fn limits() {
    let mut line = Vec::from(&b"GET /?"[..]);
    line.extend(core::iter::repeat_n(b'q', LINE_LIMIT as usize));
    assert_eq!(
        run(&line, &[]).last(),
        Some(&Seen::Fail(Reason::LineTooLong))
    );
    let mut long_path = Vec::from(&b"GET /"[..]);
    long_path.extend(core::iter::repeat_n(b'p', PATH_MAX + 1));
    assert_eq!(
        run(&long_path, &[]).last(),
        Some(&Seen::Fail(Reason::LineTooLong))
    );
    let mut headers = Vec::from(&b"GET / HTTP/1.1\r\n"[..]);
    for _ in 0..(HEADER_LIMIT / 10 + 1) {
        headers.extend_from_slice(b"A: 123456\r\n");
    }
    assert_eq!(
        run(&headers, &[]).last(),
        Some(&Seen::Fail(Reason::HeadersTooLarge))
    );
}

#[test]
fn positions_track_the_stream() {
    let data = b"GET /a HTTP/1.1\r\n\r\nPOST /b HTTP/1.1\r\nContent-Length: 2\r\n\r\nhiGET";
    let mut s = Stream::new(100, 0);
    let mut path = [0u8; PATH_MAX];
    let mut starts = Vec::new();
    let mut i = 0;
    while i < data.len() {
        if s.in_bulk() {
            let n = s.bulk_left() as usize;
            s.consume(n as u64);
            i += n;
            continue;
        }
        if s.step(data[i], &mut path) == Ev::Decide {
            s.take_method();
            starts.push(s.req_start);
        }
        i += 1;
    }
    assert_eq!(starts, [100, 119]);
    assert_eq!(s.pos, 100 + data.len() as u32);
}

/// Feed `data` to `s` the way the kernel does; on `Ev::Tunnel`, await the reply. Returns the
/// offset where the stream started waiting, if it did.
fn feed_awaiting(s: &mut Stream, data: &[u8]) -> Option<usize> {
    let mut path = [0u8; PATH_MAX];
    let mut off = 0;
    while off < data.len() {
        if s.in_bulk() {
            let n = (s.bulk_left() as usize).min(data.len() - off);
            s.consume(n as u64);
            off += n;
            continue;
        }
        match s.step(data[off], &mut path) {
            Ev::Await => return Some(off),
            Ev::Decide => {
                s.take_method();
                s.set_verdict(MethodSet::ANY.0, 0);
            }
            Ev::Tunnel => {
                s.await_reply();
            }
            Ev::Fail(r) => panic!("{r:?}"),
            _ => {}
        }
        off += 1;
    }
    if s.is_awaiting() {
        Some(off)
    } else {
        None
    }
}

#[test]
fn an_override_that_changes_head_makes_framing_unsure() {
    for (line, m, unsure) in [
        ("GET", Method::Head, 1),
        ("HEAD", Method::Get, 1),
        ("HEAD", Method::Delete, 1),
        ("GET", Method::Delete, 0),
        ("HEAD", Method::Head, 0),
    ] {
        let mut s = Stream::new(0, flag::SYN);
        let req = std::format!("{line} / HTTP/1.1\r\n");
        feed_awaiting(&mut s, req.as_bytes());
        s.note_override(m);
        assert_eq!(s.unsure, unsure, "{line} overridden to {m:?}");
        assert_eq!(s.req_view().unsure, unsure);
        s.reset(0, flag::SYN);
        assert_eq!(s.unsure, 0, "a new connection starts sure");
    }
}

#[test]
fn heads_are_counted_and_head_requests_marked() {
    let mut s = Stream::new(0, flag::SYN);
    let data = b"GET / HTTP/1.1\r\n\r\nHEAD /a HTTP/1.1\r\n\r\nPOST /b HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcPOST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n";
    assert_eq!(feed_awaiting(&mut s, data), None);
    assert_eq!(s.reqs, 4, "the chunked request's head passed");
    assert_eq!(s.reqs_before_current(), 3, "its body is being read");
    assert_eq!(s.head_ring, 0b10);
    assert_eq!(s.req_view().reqs, 4);
    // Reusing a ring slot clears it.
    s.reqs = 65;
    feed_awaiting(&mut s, b"x\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n");
    assert_eq!((s.reqs, s.head_ring), (66, 0));
}

#[test]
fn an_upgrade_request_awaits_the_answer_after_its_body() {
    for (data, switch) in [
        (&b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\nGET /next"[..], SWITCH_UPGRADE),
        (&b"POST /up HTTP/1.1\r\nUpgrade: h2c\r\nContent-Length: 4\r\n\r\nbodyGET /next"[..], SWITCH_UPGRADE),
        (&b"POST /up HTTP/1.1\r\nUpgrade: x\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nbody\r\n0\r\n\r\nGET /next"[..], SWITCH_UPGRADE),
        (&b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com\r\n\r\nGET /next"[..], SWITCH_CONNECT),
    ] {
        let mut s = Stream::new(100, flag::SYN);
        let at = feed_awaiting(&mut s, data).expect("awaits");
        assert_eq!(&data[at..], b"GET /next", "{:?}", String::from_utf8_lossy(data));
        assert_eq!(s.pos, 100 + at as u32, "the awaited byte is not consumed");
        assert_eq!((s.reqs, s.switch), (1, switch));
        assert_eq!(s.req_view().switch, switch);
        // Still waiting for more bytes.
        let mut path = [0u8; PATH_MAX];
        assert_eq!(s.step(b'G', &mut path), Ev::Await);
        assert_eq!(s.pos, 100 + at as u32);
        // Refused by the server: the next bytes are a request again.
        s.resume();
        assert_eq!(feed_awaiting(&mut s, b"GET /next HTTP/1.1\r\n\r\n"), None);
        assert_eq!((s.reqs, s.switch), (2, SWITCH_NONE));
    }
}

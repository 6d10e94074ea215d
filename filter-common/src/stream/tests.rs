use super::*;
use std::string::String;
use std::vec;
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
    run_with(data, cuts, false)
}

/// [`run`], optionally taking eight bytes at a time through [`Stream::step_run`] wherever a
/// segment has eight left (as the kernel does).
fn run_with(data: &[u8], cuts: &[usize], words: bool) -> Vec<Seen> {
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
            if words {
                // Past the segment's end, letters (which a name run would take): `step_run`
                // must not read beyond `avail`, as the kernel's window holds stale bytes there.
                let avail = seg.len() - off;
                let word = crate::swar::word_padded(seg, off, b'Z');
                // The kernel tries a whole path or header-value word first.
                if avail >= 8
                    && (s.path_word(word, &mut path) || s.value_word(word) || s.query_word(word))
                {
                    off += 8;
                    continue;
                }
                let k = s.step_run(word, avail, &mut path);
                if k > 0 {
                    off += k;
                    // The kernel's runs after a whole word, in the next words.
                    let mut more = k == 8;
                    let mut r = 0;
                    while more && r < 2 && s.runs_on() && off < seg.len() {
                        let next = crate::swar::word_padded(seg, off, b'Z');
                        let n = s.run_on(next, seg.len() - off);
                        off += n;
                        more = n == 8;
                        r += 1;
                    }
                    continue;
                }
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
                        let raw = &raw[..s.line.path_len()];
                        match crate::canon::canonicalize(raw, &mut canon) {
                            Ok(n) => {
                                // The kernel skips this pass for a path called plain.
                                if s.line.plain_mask() != 0 {
                                    assert_eq!(&canon[..n], raw);
                                }
                                String::from_utf8_lossy(&canon[..n]).into_owned()
                            }
                            Err(r) => {
                                assert_eq!(s.line.plain_mask(), 0, "{r:?}");
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

/// A request for `/ppp…`, `len` bytes of path.
fn req_of(m: Method, len: usize) -> Seen {
    let mut p = String::from("/");
    p.extend(core::iter::repeat_n('p', len - 1));
    req(m, &p)
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
    assert_eq!(run_with(data, &[], true), want, "whole, by words: {text:?}");
    for cut in 1..data.len() {
        assert_eq!(
            run_with(data, &[cut], true),
            want,
            "cut at {cut}, by words: {text:?}"
        );
    }
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

/// `_method` in the query string is an override, spelled any way PHP reads it; other
/// parameters are not.
#[test]
fn method_parameters_in_the_query_are_reported() {
    use Method::*;
    let cases: &[(&str, &[Method])] = &[
        ("/a?_method=DELETE", &[Delete]),
        ("/a?x=1&_method=put&y=2", &[Put]),
        ("/a?x=1;_method=patch", &[Patch]),
        ("/a?%5Fmethod=DELETE", &[Delete]),
        ("/a?%5fMeThOd=DELETE", &[Delete]),
        ("/a?.method=DELETE", &[Delete]),
        ("/a?%2Emethod=DELETE", &[Delete]),
        ("/a?_METHOD=delete", &[Delete]),
        ("/a?++_method=DELETE", &[Delete]),
        ("/a?_method[]=DELETE", &[Delete]),
        ("/a?_method%00x=DELETE", &[Delete]),
        ("/a?_method=%44ELETE", &[Delete]),
        ("/a?_method=%64elete", &[Delete]),
        // Every one of several, not only the last (which PHP keeps).
        ("/a?_method=GET&_method=DELETE", &[Get, Delete]),
        // Not a method token: `Other`, which no rule allows.
        ("/a?_method=DEL+ETE", &[Other]),
        ("/a?_method=DELETE%", &[Other]),
        ("/a?_method=DELETE%2", &[Other]),
        ("/a?_method=%zzDELETE", &[Other]),
        ("/a?_method=DELETE#x", &[Other]),
        ("/a?_method=", &[Other]),
        ("/a?_method", &[Other]),
        ("/a?_method&x=1", &[Other]),
        ("/a?_method=VERYLONGMETHODNAMEXYZ", &[Other]),
        // Other parameters.
        ("/a?_methodx=DELETE", &[]),
        ("/a?x_method=DELETE", &[]),
        ("/a?method=DELETE", &[]),
        ("/a?_method%3DDELETE", &[]),
        ("/a?_meth=DELETE", &[]),
        ("/a?x=_method=DELETE", &[]),
        ("/a?x=1&y=_method", &[]),
        ("/a?", &[]),
        ("/a?&&", &[]),
    ];
    for (target, overrides) in cases {
        for end in [" HTTP/1.1\r\nHost: x\r\n\r\n", "\r\n\r\n", "\n\n"] {
            let data = format!("POST {target}{end}");
            let mut want = vec![req(Post, "/a")];
            want.extend(overrides.iter().map(|m| Seen::Override(*m)));
            check(data.as_bytes(), &want);
        }
    }
    // The request after it starts fresh.
    check(
        b"GET /a?_method=PUT HTTP/1.1\r\n\r\nGET /b?x=_method HTTP/1.1\r\n\r\n",
        &[req(Get, "/a"), Seen::Override(Put), req(Get, "/b")],
    );
    // Past the line's limit inside the query: 414, as anywhere in the line.
    let mut long = Vec::from(&b"GET /a?_method="[..]);
    long.extend(core::iter::repeat_n(b'D', LINE_LIMIT as usize));
    assert_eq!(
        run(&long, &[]).last(),
        Some(&Seen::Fail(Reason::LineTooLong))
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
    // Around the path's limit, whole words and single bytes agree (the word paths stop short
    // of it and leave the last bytes to `step`).
    for len in PATH_MAX - 24..=PATH_MAX + 2 {
        let mut req = Vec::from(&b"GET /"[..]);
        req.extend(core::iter::repeat_n(b'p', len - 1));
        req.extend_from_slice(b" HTTP/1.1\r\n\r\n");
        let want = if len <= PATH_MAX {
            req_of(Method::Get, len)
        } else {
            Seen::Fail(Reason::LineTooLong)
        };
        assert_eq!(run(&req, &[]).last(), Some(&want), "{len}");
        assert_eq!(run_with(&req, &[], true).last(), Some(&want), "{len}");
        assert_eq!(run_with(&req, &[7, 300], true).last(), Some(&want), "{len}");
    }
    let mut headers = Vec::from(&b"GET / HTTP/1.1\r\n"[..]);
    for _ in 0..(HEADER_LIMIT / 10 + 1) {
        headers.extend_from_slice(b"A: 123456\r\n");
    }
    assert_eq!(
        run(&headers, &[]).last(),
        Some(&Seen::Fail(Reason::HeadersTooLarge))
    );
    // Around the header block's limit, a value taken a word at a time (a header the filter
    // does not act on) fails at the same byte as one taken byte by byte, or passes with it.
    let prefix = b"GET / HTTP/1.1\r\nX-Filler: ";
    let head = HEADER_LIMIT as usize - (prefix.len() - b"GET / HTTP/1.1\r\n".len());
    let mut outcomes = std::collections::BTreeSet::new();
    for len in head - 28..=head + 2 {
        let mut request = Vec::from(&prefix[..]);
        request.extend(core::iter::repeat_n(b'v', len));
        request.extend_from_slice(b"\r\n\r\nGET /next HTTP/1.1\r\n\r\n");
        let bytes = run(&request, &[]);
        assert!(
            bytes.last() == Some(&Seen::Fail(Reason::HeadersTooLarge))
                || bytes.last() == Some(&req(Method::Get, "/next")),
            "{len}: {bytes:?}"
        );
        assert_eq!(run_with(&request, &[], true), bytes, "{len}");
        assert_eq!(run_with(&request, &[9, 4000, 9001], true), bytes, "{len}");
        outcomes.insert(format!("{:?}", bytes.last()));
    }
    // Both sides of the limit were crossed.
    assert_eq!(outcomes.len(), 2, "{outcomes:?}");
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

/// A word taker the stream only counts with, its room, and how many words it took.
type SkippedWords<'a> = (
    fn(&mut Stream, u64) -> bool,
    fn(&Stream) -> usize,
    &'a mut usize,
);

/// At every offset of `data` (fed byte by byte from a fresh stream), [`Stream::step_run`]
/// takes k bytes and leaves exactly the state and path (up to its length) of k
/// [`Stream::step`] calls, each of which returns [`Ev::More`]; and [`Stream::path_word`] and
/// [`Stream::value_word`], where eight bytes are left, each take all eight the same way or
/// leave the state alone. Returns how many bytes `step_run` took in all, and how many words
/// `path_word` and `value_word` took.
fn word_fast_path_is_exact(data: &[u8], start: Stream) -> (usize, usize, usize, usize) {
    let mut s = start;
    let mut path = [0x5au8; PATH_MAX];
    let (mut taken, mut words, mut values, mut queries) = (0, 0, 0, 0);
    let mut off = 0;
    while off < data.len() {
        if s.in_bulk() {
            let n = (s.bulk_left() as usize).min(data.len() - off);
            s.consume(n as u64);
            off += n;
            continue;
        }
        {
            // Near the end, the word's bytes past the data are letters (stale bytes in the
            // kernel's window): the run must not take them.
            let avail = (data.len() - off).min(8);
            let (mut fast, mut fast_path) = (s, path);
            let word = crate::swar::word_padded(data, off, b'Z');
            let k = fast.step_run(word, data.len() - off, &mut fast_path);
            assert!(k <= avail);
            let shown = String::from_utf8_lossy(&data[off..off + avail]);
            let (mut slow, mut slow_path) = (s, path);
            for &b in &data[off..off + k] {
                assert_eq!(slow.step(b, &mut slow_path), Ev::More, "{shown:?} in {s:?}");
            }
            assert_eq!(format!("{fast:?}"), format!("{slow:?}"), "{k} of {shown:?}");
            // The path up to its length; the bytes after it are scratch.
            let n = slow.line.path_len();
            assert!(fast_path[..n] == slow_path[..n], "{k} of {shown:?}");
            taken += k;
            // The run after a whole word alone: the same bytes `step_run` takes in the rest
            // of a request line, in a header name and at a field line's start, none elsewhere.
            let mut rest = s;
            let r = rest.run_on(word, data.len() - off);
            if (s.phase == phase::LINE_REST && s.count <= LINE_LIMIT - 8)
                || (s.phase == phase::HEADER_NAME && s.count <= HEADER_LIMIT - 8)
                || (s.phase == phase::HEADER_START && s.count <= HEADER_LIMIT - 8)
            {
                assert_eq!(
                    (r, format!("{rest:?}")),
                    (k, format!("{fast:?}")),
                    "{shown:?}"
                );
            } else {
                assert_eq!((r, format!("{rest:?}")), (0, format!("{s:?}")), "{shown:?}");
            }
        }
        if data.len() - off >= 8 {
            // The whole-word path: all eight bytes or none.
            let (mut fast, mut fast_path) = (s, path);
            let word = crate::swar::word_padded(data, off, b'Z');
            let shown = String::from_utf8_lossy(&data[off..off + 8]);
            if fast.path_word(word, &mut fast_path) {
                let (mut slow, mut slow_path) = (s, path);
                for &b in &data[off..off + 8] {
                    assert_eq!(slow.step(b, &mut slow_path), Ev::More, "{shown:?} in {s:?}");
                }
                assert_eq!(format!("{fast:?}"), format!("{slow:?}"), "{shown:?}");
                let n = slow.line.path_len();
                assert!(fast_path[..n] == slow_path[..n], "{shown:?}");
                // The kernel reckons the room once for a run of words.
                assert_eq!(fast.path_words_room(), s.path_words_room() - 1);
                words += 1;
            } else {
                assert_eq!(format!("{fast:?}"), format!("{s:?}"), "{shown:?}");
            }
            // The words the stream only counts: a header value's, a skipped query parameter's.
            let skipped: [SkippedWords; 2] = [
                (Stream::value_word, Stream::value_words_room, &mut values),
                (Stream::query_word, Stream::query_words_room, &mut queries),
            ];
            for (take, room, count) in skipped {
                let mut fast = s;
                if take(&mut fast, word) {
                    let (mut slow, mut slow_path) = (s, path);
                    for &b in &data[off..off + 8] {
                        assert_eq!(slow.step(b, &mut slow_path), Ev::More, "{shown:?} in {s:?}");
                    }
                    assert_eq!(format!("{fast:?}"), format!("{slow:?}"), "{shown:?}");
                    // The kernel reckons the room once for a run of words.
                    assert_eq!(room(&fast), room(&s) - 1);
                    *count += 1;
                } else {
                    assert_eq!(format!("{fast:?}"), format!("{s:?}"), "{shown:?}");
                }
            }
        }
        match s.step(data[off], &mut path) {
            Ev::Decide => {
                s.take_method();
                s.set_verdict(MethodSet::ANY.0, 0);
            }
            Ev::Fail(_) | Ev::Tunnel => return (taken, words, values, queries),
            _ => {}
        }
        off += 1;
    }
    (taken, words, values, queries)
}

use std::format;

const WORD_CORPUS: &[&[u8]] = &[
    b"GET /api/items/with/a/longer/path/segment HTTP/1.1\r\nHost: 10.77.0.2\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n",
    b"POST /upload?x=1 HTTP/1.1\r\nUSER-AGENT: Mozilla/5.0 (X11; Linux x86_64; rv:109.0) Gecko/20100101 Firefox/115.0\r\nX-HTTP-Method-Override: delete\r\nContent-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\n\r\n",
    b"PUT http://example.com/a/b/c HTTP/1.1\r\nTransfer-Encoding: chunked\r\nX-Long-Header-Name-Here: a  b\t c    d     e      f\r\n\r\n5\r\nhello\r\n0\r\nTrailer-Field: x\r\n\r\n",
    b"DELETE /a%2e%2E/b;x=1//c HTTP/1.1\r\nX-Method-Override:      PATCH     \r\nAccept-Language: en-US,en;q=0.9,de;q=0.8,fr;q=0.7\r\n\r\n",
    b"POST /search?utm_source=newsletter&utm_medium=email;q=a+b&_method=delete&%5Fmethod[]=PUT&.x=1&-y=2 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /api/items?token=eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJl%2Bx&utm_campaign=winter-sale-2026&ref=home;v=2 HTTP/1.1\r\nHost: x\r\n\r\n",
];

#[test]
fn word_fast_path_matches_byte_steps() {
    let (mut taken, mut words, mut values, mut queries) = (0, 0, 0, 0);
    for data in WORD_CORPUS {
        let (t, w, v, q) = word_fast_path_is_exact(data, Stream::new(1, flag::SYN));
        taken += t;
        words += w;
        values += v;
        queries += q;
    }
    // The corpus must exercise the fast paths, or this proves little.
    assert!(taken > 400, "{taken}");
    assert!(words > 20, "{words}");
    assert!(values > 40, "{values}");
    assert!(queries > 10, "{queries}");
    // Mutated copies, so that declines and odd states are covered too.
    let mut next = crate::xorshift(0x9e37_79b9_7f4a_7c15);
    for _ in 0..20_000 {
        let mut d = WORD_CORPUS[(next() % WORD_CORPUS.len() as u64) as usize].to_vec();
        for _ in 0..(next() % 4) {
            let i = (next() % d.len() as u64) as usize;
            d[i] = b" \t\r\n:;/.%?#-aZ\x00\x7f\x80\\&="[(next() % 20) as usize];
        }
        word_fast_path_is_exact(&d, Stream::new(1, flag::SYN));
    }
}

/// The same, as a bolero target: a plausible request prefix and arbitrary bytes after it.
#[test]
fn fuzz_word_fast_path_matches_byte_steps() {
    bolero::check!()
        .with_type::<(u8, Vec<u8>)>()
        .for_each(|(which, tail)| {
            let mut d = WORD_CORPUS[*which as usize % WORD_CORPUS.len()][..20].to_vec();
            d.extend(tail);
            word_fast_path_is_exact(&d, Stream::new(1, flag::SYN));
        });
}

/// A chunked body reads the same in both directions: a request's body (this stream) and a
/// response's ([`crate::reply`]) share one chunk framing, so what one accepts the other does.
#[test]
fn chunked_framing_is_read_alike_by_requests_and_responses() {
    let bodies: &[(&[u8], bool)] = &[
        (b"5\r\nhello\r\n0\r\n\r\n", true),
        (
            b"5;ext=\"a b\"\r\nhello\r\nA\r\n0123456789\r\n0\r\nT: 1\r\n\r\n",
            true,
        ),
        (b"3\nabc\n0\n\n", true),
        (b"1 \t;x\r\na\r\n0\r\n\r\n", true),
        (b"\r\nhello\r\n0\r\n\r\n", false),
        (b"5g\r\nhello\r\n0\r\n\r\n", false),
        (b"1\r\nab\r\n0\r\n\r\n", false),
        (b"1\rxa\r\n0\r\n\r\n", false),
        (b"1;a\x00b\r\nx\r\n0\r\n\r\n", false),
        (b"1;a\x1b\r\nx\r\n0\r\n\r\n", false),
        (b"fffffffffffff\r\n", false),
    ];
    for &(body, good) in bodies {
        let text = String::from_utf8_lossy(body);
        let mut request = b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        request.extend_from_slice(body);
        request.extend_from_slice(b"GET /next HTTP/1.1\r\n\r\n");
        let seen = run(&request, &[]);
        let request_ok = seen == [req(Method::Post, "/a"), req(Method::Get, "/next")];
        if !request_ok {
            assert_eq!(
                seen,
                [req(Method::Post, "/a"), Seen::Fail(Reason::BadFraming)],
                "{text:?}"
            );
        }

        let mut response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        response.extend_from_slice(body);
        let mut r = crate::reply::Replies::new(0);
        let view = ReqView {
            reqs: 1,
            ..Default::default()
        };
        crate::reply::feed(&mut r, &response, &view);
        let response_ok = r.done == 1 && !r.is_lost();

        assert_eq!(request_ok, good, "request with {text:?}");
        assert_eq!(response_ok, good, "response with {text:?}");
    }
}

use super::*;
use std::vec::Vec;

fn view(reqs: u32, heads: &[u32], switch: u8) -> ReqView {
    let mut v = ReqView {
        reqs,
        switch,
        ..Default::default()
    };
    for &h in heads {
        v.head_ring |= 1 << (h % RING);
    }
    v
}

/// Feed `data` in segments cut at `cuts`; the state after each segment is the same as after
/// feeding it whole.
fn run(data: &[u8], cuts: &[usize], req: &ReqView) -> Replies {
    let mut r = Replies::new(1000);
    let mut bounds: Vec<usize> = cuts
        .iter()
        .copied()
        .filter(|&c| c > 0 && c < data.len())
        .collect();
    bounds.sort();
    bounds.push(data.len());
    let mut start = 0;
    for end in bounds {
        feed(&mut r, &data[start..end], req);
        start = end;
    }
    assert_eq!(
        r.pos,
        1000u32.wrapping_add(data.len() as u32),
        "every byte framed"
    );
    r
}

/// `data` whole and cut at every single position and every pair of positions (short inputs)
/// give the same counts.
fn every_cut(data: &[u8], req: &ReqView) -> Replies {
    let whole = run(data, &[], req);
    for i in 1..data.len() {
        let r = run(data, &[i], req);
        assert_eq!(
            (r.done, r.is_lost(), r.is_switched(), r.phase),
            (
                whole.done,
                whole.is_lost(),
                whole.is_switched(),
                whole.phase
            ),
            "cut at {i} of {:?}",
            std::string::String::from_utf8_lossy(data)
        );
    }
    if data.len() <= 160 {
        for i in 1..data.len() {
            for j in i + 1..data.len() {
                let r = run(data, &[i, j], req);
                assert_eq!(
                    (r.done, r.is_lost()),
                    (whole.done, whole.is_lost()),
                    "cuts {i},{j}"
                );
            }
        }
    }
    whole
}

#[test]
fn content_length_responses_in_sequence() {
    let data = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 404 Not Found\r\ncontent-length:  3 \r\nX: y\r\n\r\nabc";
    let r = every_cut(data, &view(2, &[], 0));
    assert_eq!(r.done, 2);
    assert!(!r.is_lost());
    assert!(r.bulk_left() == 0 && !r.in_bulk(), "at a response boundary");
}

#[test]
fn a_partial_body_is_not_complete() {
    let r = every_cut(
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello",
        &view(1, &[], 0),
    );
    assert_eq!(r.done, 0);
    assert_eq!(r.bulk_left(), 5);
}

#[test]
fn chunked_with_extensions_and_trailers() {
    let data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5;x=y\r\nhello\r\nA\r\n0123456789\r\n0\r\nTrailer-A: 1\r\nContent-Length: zz\r\n\r\nHTTP/1.0 204 No Content\r\n\r\n";
    let r = every_cut(data, &view(2, &[], 0));
    assert_eq!(r.done, 2);
    assert!(!r.is_lost());
}

#[test]
fn head_204_304_and_interim_responses_have_no_body() {
    // Request 0 was HEAD: its Content-Length describes the GET it stands for.
    let data = b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\nHTTP/1.1 304 Not Modified\r\n\r\n";
    let r = every_cut(data, &view(3, &[0], 0));
    assert_eq!(r.done, 3, "HEAD, 204 (after two interim responses), 304");
    assert!(!r.is_lost());
    // The same bytes when request 0 was a GET: 99 body bytes swallow the rest.
    let r = run(data, &[], &view(3, &[], 0));
    assert_eq!(r.done, 1);
    assert!(r.is_lost(), "the 99 body bytes end inside a status line");
}

#[test]
fn head_ring_wraps_by_request_index() {
    let mut data = Vec::new();
    for i in 0..70u32 {
        if i == 66 {
            data.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n");
        } else {
            data.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody");
        }
    }
    // Request 66 was HEAD (bit 2 of the ring); feed the first 64 responses with a view where
    // bit 2 is request 2 (a GET), then the rest with the ring describing requests 64..70.
    let mut r = Replies::new(0);
    let first: usize = 64 * 42;
    feed(&mut r, &data[..first], &view(64, &[], 0));
    assert_eq!(r.done, 64);
    feed(&mut r, &data[first..], &view(70, &[66], 0));
    assert_eq!(r.done, 70);
    assert!(!r.is_lost());
}

#[test]
fn close_delimited_bodies_end_at_the_servers_fin() {
    for data in [
        &b"HTTP/1.1 200 OK\r\n\r\nanything HTTP/1.1 200 OK\r\n"[..],
        &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 3\r\n\r\nabcdef"[..],
        &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: notchunked\r\n\r\nabcdef"[..],
    ] {
        let mut r = every_cut(data, &view(1, &[], 0));
        assert_eq!(r.done, 0);
        assert!(!r.is_lost());
        r.fin();
        assert_eq!(r.done, 1);
        assert!(r.fin_seen());
    }
}

#[test]
fn upgrade_switches_only_for_the_upgrade_requests_own_101() {
    let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello";
    let r = every_cut(ok, &view(2, &[], SWITCH_UPGRADE));
    assert!(r.is_switched());
    assert_eq!((r.switch_index, r.done), (1, 1));
    // The same 101 as the answer to the first request (the upgrade is the second): lost.
    let early = b"HTTP/1.1 101 Switching Protocols\r\n\r\n";
    let r = every_cut(early, &view(2, &[], SWITCH_UPGRADE));
    assert!(r.is_lost() && !r.is_switched());
    // A 101 when nobody asked to upgrade.
    let r = every_cut(early, &view(1, &[], SWITCH_NONE));
    assert!(r.is_lost());
    // A fake 101 inside a body is body.
    let inside =
        b"HTTP/1.1 200 OK\r\nContent-Length: 36\r\n\r\nHTTP/1.1 101 Switching Protocols\r\n\r\n";
    let r = every_cut(inside, &view(2, &[], SWITCH_UPGRADE));
    assert!(!r.is_switched() && !r.is_lost());
    assert_eq!(r.done, 1);
}

#[test]
fn a_refused_upgrade_is_an_ordinary_response() {
    let data = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 3\r\n\r\nno!";
    let r = every_cut(data, &view(1, &[], SWITCH_UPGRADE));
    assert!(!r.is_switched() && !r.is_lost());
    assert_eq!(r.done, 1);
}

#[test]
fn connect_switches_on_2xx_only() {
    let r = every_cut(
        b"HTTP/1.1 200 Connection established\r\n\r\n\x16\x03\x01",
        &view(1, &[], SWITCH_CONNECT),
    );
    assert!(r.is_switched());
    assert_eq!(r.switch_index, 0);
    let r = every_cut(
        b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n",
        &view(1, &[], SWITCH_CONNECT),
    );
    assert!(!r.is_switched() && !r.is_lost());
    assert_eq!(r.done, 1);
}

#[test]
fn unframeable_bytes_lose_the_connection() {
    for (data, reqs) in [
        (&b"SSH-2.0-OpenSSH\r\n"[..], 1),
        (&b"HTTP/2 200\r\n\r\n"[..], 1),
        (&b"HTTP/1.1 20x OK\r\n\r\n"[..], 1),
        (
            &b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n"[..],
            1,
        ),
        (&b"HTTP/1.1 200 OK\r\nContent-Length: 3 4\r\n\r\n"[..], 1),
        (&b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n"[..], 1),
        (&b"HTTP/1.1 200 OK\r\n folded\r\n\r\n"[..], 1),
        (&b"HTTP/1.1 200 OK\r\nContent-Length : 5\r\n\r\n"[..], 1),
        // A bad name where it could be a framing header (lines whose name starts with neither
        // `c` nor `t` are skipped to their LF, unread).
        (&b"HTTP/1.1 200 OK\r\nContent Length: 5\r\n\r\n"[..], 1),
        (
            &b"HTTP/1.1 200 OK\r\nTransfer Encoding: chunked\r\n\r\n"[..],
            1,
        ),
        (
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"[..],
            1,
        ),
        (
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab\r\n"[..],
            1,
        ),
        // A response to a request the backend never got.
        (&b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"[..], 0),
        (&b"HTTP/1.1 408 Request Timeout\r\n\r\n"[..], 0),
    ] {
        let r = every_cut(data, &view(reqs, &[], 0));
        assert!(
            r.is_lost(),
            "{:?}",
            std::string::String::from_utf8_lossy(data)
        );
        assert_eq!(r.done, 0);
    }
}

/// A line whose name stops being a prefix of `Content-Length` or `Transfer-Encoding` is
/// skipped unread from there, like a line starting with another letter.
#[test]
fn lines_that_cannot_frame_are_skipped_unread() {
    let data = b"HTTP/1.1 200 OK\r\nContent-Type : text/plain\r\nTransfer-Encodings: chunked\r\nConnection\tx\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 204 No Content\r\n\r\n";
    let r = every_cut(data, &view(2, &[], 0));
    assert!(!r.is_lost());
    assert_eq!(r.done, 2);
}

#[test]
fn an_uncertain_head_loses_the_connection() {
    let mut v = view(1, &[], 0);
    v.unsure = 1;
    let r = every_cut(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", &v);
    assert!(r.is_lost());
    assert_eq!(r.done, 0);
}

#[test]
fn any_state_is_safe() {
    // Every phase value, including corrupted ones, accepts every byte without panicking.
    for p in 0..=255u8 {
        for b in 0..=255u8 {
            let mut r = Replies::new(0);
            r.phase = p;
            r.count = u32::MAX;
            r.status = u16::MAX;
            r.body_left = u64::MAX;
            r.done = u32::MAX;
            let _ = r.step(b, &view(u32::MAX, &[], 1));
        }
    }
}

/// `Replies::step_run` called on what is left of the word while it takes a piece: what the
/// kernel's frame callback does over successive calls.
fn runs(r: &mut Replies, w: u64, avail: usize) -> usize {
    let mut t = 0;
    while t < avail {
        let k = r.step_run(w >> (8 * t), avail - t);
        if k == 0 {
            break;
        }
        t += k;
    }
    t
}

#[test]
fn words_frame_like_bytes() {
    let req = view(3, &[], 0);
    let data: &[u8] = b"HTTP/1.1 200 OK with a long reason phrase\r\nServer: nginx/1.22.1\r\nDate: Thu, 26 Nov 2026 09:50:00 GMT\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nX-Long: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\nok\nHTTP/1.1 204 No Content\r\nX: y\r\n\r\n";
    for start in 0..8 {
        // Every alignment of the words against the lines.
        let mut words = Replies::new(1000);
        feed(&mut words, &data[..start], &req);
        feed(&mut words, &data[start..], &req);
        let mut bytes = Replies::new(1000);
        feed_bytes(&mut bytes, data, &req);
        assert_eq!(
            std::format!("{words:?}"),
            std::format!("{bytes:?}"),
            "start {start}"
        );
        assert_eq!(words.done, 2);
    }
    // The word path really takes the plain runs (piece after piece, as the kernel's callback
    // calls it).
    let mut r = Replies::new(0);
    assert_eq!(runs(&mut r, u64::from_le_bytes(*b"HTTP/1.1"), 8), 8);
    // The status code and the rest of the line, through its LF, then a line the framing
    // does not read from its first byte.
    assert_eq!(runs(&mut r, u64::from_le_bytes(*b" 200 OK\r"), 8), 8);
    assert_eq!(r.status, 200);
    assert_eq!(runs(&mut r, u64::from_le_bytes(*b"\nServer:"), 8), 8);
    assert_eq!(runs(&mut r, u64::from_le_bytes(*b" nginx/1"), 8), 8);
    // Through its LF and into the next such line.
    assert_eq!(runs(&mut r, u64::from_le_bytes(*b".22\r\nDat"), 8), 8);
    assert_eq!(r.phase, phase::SKIP_LINE);
    feed_bytes(&mut r, b"e: x\r\n", &req);
    // A name that could be a framing header's is read...
    assert_eq!(runs(&mut r, u64::from_le_bytes(*b"Content-"), 8), 8);
    assert_eq!(r.phase, phase::HEADER_NAME);
    // ... until it cannot: then the line is skipped, through its CRLF.
    assert_eq!(runs(&mut r, u64::from_le_bytes(*b"Type: te"), 8), 8);
    assert_eq!(r.phase, phase::SKIP_LINE);
    assert_eq!(runs(&mut r, u64::from_le_bytes(*b"xt\r\nCont"), 8), 8);
    // `Content-Length` is read to its colon; the colon and the value go byte by byte.
    assert_eq!(runs(&mut r, u64::from_le_bytes(*b"ent-Leng"), 8), 8);
    assert_eq!(runs(&mut r, u64::from_le_bytes(*b"th: 3\r\nX"), 8), 2);
    assert_eq!(r.phase, phase::HEADER_NAME);
    feed_bytes(&mut r, b": 3\r\n", &req);
    // A line that cannot frame, through its LF.
    feed_bytes(&mut r, b"Connection:", &req);
    assert_eq!(runs(&mut r, u64::from_le_bytes(*b" keep-al"), 8), 8);
    assert_eq!(runs(&mut r, u64::from_le_bytes(*b"ive\r\n\r\nx"), 8), 5);
    // The empty line ends the head: `step` takes it.
    assert_eq!(runs(&mut r, u64::from_le_bytes(*b"\r\nxxxxxx"), 8), 0);
    assert_eq!(r.phase, phase::HEADER_START);
    // A status line that is not `HTTP/1.x NNN ` is left to `step` (which loses it).
    let mut r = Replies::new(0);
    assert_eq!(runs(&mut r, u64::from_le_bytes(*b"HTTP/1.1"), 8), 8);
    assert_eq!(runs(&mut r, u64::from_le_bytes(*b" 2x0 OK\r"), 8), 0);
}

/// Responses built line by line (status lines and header lines of every kind, CRLF or bare
/// LF or a stray CR, then a few bytes changed at random): the run fast path crosses every
/// phase boundary it can (status code, line ends, line starts, CRLF after values) and leaves
/// exactly the state that byte by byte framing does, at every alignment.
#[test]
fn runs_frame_like_bytes_across_phase_boundaries() {
    const STATUS: &[&[u8]] = &[
        b"HTTP/1.1 200 OK",
        b"HTTP/1.0 204 No Content",
        b"HTTP/1.1 101 Switching Protocols",
        b"HTTP/1.1 404",
        b"HTTP/1.1 2x0 Bad",
        b"HTTP/1.1 200\tOK",
    ];
    const FIELDS: &[&[u8]] = &[
        b"Server: nginx/1.22.1",
        b"Date: Thu, 26 Nov 2026 10:28:15 GMT",
        b"Content-Length: 3",
        b"content-length:3",
        b"Transfer-Encoding: chunked",
        b"Content-Type: text/plain",
        b"Connection: keep-alive",
        b"X: y",
        b"t:",
        b"A",
        b" folded",
    ];
    const EOL: &[&[u8]] = &[b"\r\n", b"\r\n", b"\n", b"\r"];
    const NOISE: &[u8] = b" \t\r\n:\x7f\0aZ-1";
    let req = view(8, &[], 0);
    let mut rng = crate::xorshift(0x9e37_79b9_7f4a_7c15);
    let mut next = |n: usize| (rng() % n as u64) as usize;
    for _ in 0..4000 {
        let mut data = Vec::new();
        for _ in 0..1 + next(3) {
            data.extend_from_slice(STATUS[next(STATUS.len())]);
            data.extend_from_slice(EOL[next(EOL.len())]);
            for _ in 0..next(6) {
                data.extend_from_slice(FIELDS[next(FIELDS.len())]);
                data.extend_from_slice(EOL[next(EOL.len())]);
            }
            data.extend_from_slice(EOL[next(EOL.len())]);
            data.extend_from_slice(b"abc");
        }
        for _ in 0..next(3) {
            let i = next(data.len());
            data[i] = NOISE[next(NOISE.len())];
        }
        let mut bytes = Replies::new(5);
        feed_bytes(&mut bytes, &data, &req);
        for start in 0..8.min(data.len()) {
            let mut words = Replies::new(5);
            feed(&mut words, &data[..start], &req);
            feed(&mut words, &data[start..], &req);
            assert_eq!(
                std::format!("{words:?}"),
                std::format!("{bytes:?}"),
                "start {start} of {:?}",
                std::string::String::from_utf8_lossy(&data)
            );
        }
    }
}

#[test]
fn lockstep_inference() {
    // (reqs, lock_done, snd_at_req, snd_nxt, client_ack) → what the ingress side can tell.
    let cases = [
        // Nothing before the current request.
        ((0, 0, 100, 100, 100), Infer::Complete),
        // The server answered since the last request, and the client has all of it.
        ((1, 0, 100, 160, 160), Infer::Complete),
        ((1, 0, 100, 160, 170), Infer::Complete),
        // ... but not all of it yet: wait.
        ((1, 0, 100, 160, 150), Infer::Wait),
        // Nothing sent since: the response starts at the next byte (frame from there).
        ((1, 0, 100, 100, 100), Infer::Arm),
        // Known complete already (the current request was judged before, say).
        ((1, 1, 100, 100, 50), Infer::Complete),
        // Across the sequence-space wrap.
        ((1, 0, u32::MAX - 5, 10, 10), Infer::Complete),
        ((1, 0, u32::MAX - 5, 10, u32::MAX), Infer::Wait),
    ];
    for ((reqs, done, at, nxt, ack), want) in cases {
        assert_eq!(
            infer(reqs, done, at, nxt, ack),
            want,
            "{reqs} {done} {at} {nxt} {ack}"
        );
    }
}

#[test]
fn arming_starts_framing_at_a_response() {
    let req = view(2, &[], 0);
    let mut r = Replies::idle(1000);
    assert!(r.is_idle() && r.followed());
    r.fin();
    assert!(r.fin_seen() && r.is_idle());
    // Framing from 1100, with one response complete before it.
    r.arm(1100, 1);
    assert!(!r.is_idle());
    r.snd_nxt = 1100;
    feed(&mut r, OK5_BYTES, &req);
    assert_eq!(r.done, 2);
    assert!(r.fin_seen(), "the FIN seen while idle stays");
}

const OK5_BYTES: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";

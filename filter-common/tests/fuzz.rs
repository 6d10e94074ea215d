//! Fuzz targets for the parsers the kernel runs on attacker-controlled bytes, one per parser.
//!
//! Under a plain `cargo test -p filter-common` bolero runs each target as a random property
//! test for about a second (`BOLERO_RANDOM_TEST_TIME_MS`, `BOLERO_RANDOM_ITERATIONS` and
//! `BOLERO_RANDOM_SEED` change that); that is the smoke run CI does.
//!
//! The same targets run under libFuzzer with `cargo-bolero` (nightly, for the sanitizer):
//!
//! ```text
//! cargo install cargo-bolero
//! cargo +nightly bolero test -p filter-common --profile release parse_request_line_never_panics
//! cargo +nightly bolero test -p filter-common --profile release canonical_paths_are_canonical
//! cargo +nightly bolero test -p filter-common --profile release path_hash_is_siphash13
//! cargo +nightly bolero test -p filter-common --profile release stream_is_segmentation_independent
//! cargo +nightly bolero test -p filter-common --profile release replies_are_segmentation_independent
//! cargo +nightly bolero test -p filter-common --profile release canon::tests::fuzz_matches_the_reference
//! ```
//!
//! (`-T 60s` bounds a run; a crash is written under `filter-common/tests/__fuzz__/<target>/`
//! and replayed by the next `cargo test`.)

use core::hash::Hasher;

use filter_common::canon::{canonicalize, is_literal, readings};
use filter_common::hash::{hash_slice, path_hash};
use filter_common::http::parse_request_line;
use filter_common::reply::{feed, feed_bytes, Replies, ReqView};
use filter_common::{Reason, LINE_WINDOW, PATH_MAX};
use siphasher::sip::SipHasher13;

fn parse(input: &[u8]) -> Option<usize> {
    let mut buf = [0u8; LINE_WINDOW];
    let n = input.len().min(LINE_WINDOW);
    buf[..n].copy_from_slice(&input[..n]);
    let mut path = [0u8; PATH_MAX];
    let r = parse_request_line(&buf, input.len(), &mut path).ok()?;
    assert!(r.path_len <= PATH_MAX, "path_len {}", r.path_len);
    assert!(
        r.path_len >= 1 && path[0] == b'/',
        "a decided path starts with '/'"
    );
    Some(r.path_len)
}

/// `http::parse_request_line` never panics; a decided path fits the buffer and starts with `/`.
#[test]
fn parse_request_line_never_panics() {
    bolero::check!()
        .with_type::<Vec<u8>>()
        .with_max_len(2 * LINE_WINDOW)
        .for_each(|input| {
            // Raw bytes, and the same bytes as the target of a plausible request line, so
            // that most inputs reach the path phase.
            parse(input);
            let mut line = b"DELETE ".to_vec();
            line.extend(input);
            parse(&line);
            let mut line = b"GET /".to_vec();
            line.extend(input);
            parse(&line);
        });
}

fn check_canonical(input: &[u8]) {
    let mut out = [0u8; PATH_MAX];
    let Ok(r) = readings(input, &mut out) else {
        return;
    };
    let n = r.len;
    let c = &out[..n];
    let shown = String::from_utf8_lossy(input);
    assert!(c.first() == Some(&b'/'), "{shown:?}");
    assert!(!c.windows(2).any(|w| w == b"//"), "{shown:?}");
    for bad in [&b"/./"[..], b"/../"] {
        assert!(!c.windows(bad.len()).any(|w| w == bad), "{shown:?}");
    }
    assert!(!c.ends_with(b"/.") && !c.ends_with(b"/.."), "{shown:?}");
    // Normal form: `/`, literal characters, and uppercase escapes of everything else.
    let mut i = 0;
    while i < n {
        if c[i] == b'%' {
            let e = &c[i + 1..i + 3];
            assert!(
                e.iter()
                    .all(|h| h.is_ascii_digit() || (b'A'..=b'F').contains(h)),
                "{shown:?}"
            );
            let v = u8::from_str_radix(std::str::from_utf8(e).unwrap(), 16).unwrap();
            assert!(!is_literal(v) && v != b'/', "{shown:?}");
            i += 3;
        } else {
            assert!(c[i] == b'/' || is_literal(c[i]), "{shown:?}");
            i += 1;
        }
    }
    // Unchanged exactly when the output is the input; the other readings point into the
    // paths at segment starts, and the raw path is in normal form before its first change.
    assert_eq!(r.changed.is_none(), c == input, "{shown:?}");
    if let Some(p) = r.changed {
        assert!(input[..p].ends_with(b"/"), "{shown:?}");
        let mut before = [0u8; PATH_MAX];
        let b = readings(&input[..p], &mut before).unwrap();
        assert_eq!(
            (&before[..b.len], b.changed),
            (&input[..p], None),
            "{shown:?}"
        );
    }
    if let Some(p) = r.params_at {
        assert!(r.changed.is_some() && c[..p].ends_with(b"/"), "{shown:?}");
    }
    let mut again = [0u8; PATH_MAX];
    let m = canonicalize(c, &mut again);
    assert_eq!(m, Ok(n), "{shown:?}");
    assert_eq!(&again[..n], c, "{shown:?}");
}

/// `canon::canonicalize` never panics; its output is canonical and a fixed point.
#[test]
fn canonical_paths_are_canonical() {
    bolero::check!()
        .with_type::<Vec<u8>>()
        .with_max_len(2 * PATH_MAX)
        .for_each(|input| {
            check_canonical(input);
            // Arbitrary bytes rarely get past the first check; also try them mapped onto
            // the characters that matter, behind a leading '/'.
            let mut p = vec![b'/'];
            p.extend(
                input
                    .iter()
                    .map(|&b| b"/.%2eEfF5cC;a0\\3bB~\x80@\"4"[b as usize % 23]),
            );
            check_canonical(&p);
        });
}

/// `canonicalize` refuses only with the two reasons it documents.
#[test]
fn canonicalize_errors_are_bad_path_or_too_long() {
    bolero::check!()
        .with_type::<Vec<u8>>()
        .with_max_len(2 * PATH_MAX)
        .for_each(|input| {
            let mut out = [0u8; PATH_MAX];
            if let Err(r) = canonicalize(input, &mut out) {
                assert!(matches!(r, Reason::BadPath | Reason::PathTooLong), "{r:?}");
            }
        });
}

/// `hash::path_hash` is SipHash-1-3 for every key and length, whatever follows `len`.
#[test]
fn path_hash_is_siphash13() {
    bolero::check!()
        .with_type::<([u64; 2], u8, Vec<u8>)>()
        .with_max_len(2 * PATH_MAX)
        .for_each(|(key, fill, data)| {
            let mut h = SipHasher13::new_with_keys(key[0], key[1]);
            h.write(data);
            let want = h.finish();
            if data.len() > PATH_MAX {
                assert_eq!(hash_slice(key, data), None);
                return;
            }
            assert_eq!(hash_slice(key, data), Some(want));
            let mut buf = [*fill; PATH_MAX];
            buf[..data.len()].copy_from_slice(data);
            assert_eq!(path_hash(key, &buf, data.len()), want);
        });
}

/// Feed `data` to a fresh stream, cut into segments at `cuts`, the way the kernel does (body
/// runs in bulk, everything else byte by byte); returns what the caller saw, in order.
fn stream_events(data: &[u8], cuts: &[usize]) -> Vec<String> {
    use filter_common::stream::{flag, Ev, Stream};
    let mut s = Stream::new(7, flag::SYN);
    let mut path = [0u8; PATH_MAX];
    let mut seen = Vec::new();
    let mut bounds: Vec<usize> = cuts.iter().map(|&c| c % (data.len() + 1)).collect();
    bounds.sort_unstable();
    bounds.push(data.len());
    let mut start = 0;
    for end in bounds {
        if end < start {
            continue;
        }
        let mut off = start;
        while off < end {
            assert!(
                s.pos == 7 + off as u32,
                "the stream's position follows the bytes"
            );
            if s.in_bulk() {
                let n = (s.bulk_left() as usize).min(end - off);
                assert!(n > 0, "bulk with nothing left");
                s.consume(n as u64);
                off += n;
                continue;
            }
            let ev = s.step(data[off], &mut path);
            off += 1;
            match ev {
                Ev::More | Ev::Bulk | Ev::Await => {}
                Ev::Decide => {
                    let m = s.take_method();
                    assert!(s.line.path_len() <= PATH_MAX);
                    seen.push(format!("{m:?} {:?}", &path[..s.line.path_len()]));
                    s.set_verdict(u32::MAX, 0);
                }
                Ev::Override => seen.push(format!("override {:?}", s.override_method())),
                Ev::Tunnel => {
                    seen.push("tunnel".into());
                    return seen;
                }
                Ev::Fail(r) => {
                    seen.push(format!("fail {r:?}"));
                    return seen;
                }
            }
        }
        start = end;
    }
    seen
}

/// `stream::Stream` never panics, keeps its position in step with the bytes, and reaches the
/// same decisions however the bytes are cut into segments.
#[test]
fn stream_is_segmentation_independent() {
    bolero::check!()
        .with_type::<(Vec<u8>, Vec<u16>)>()
        .for_each(|(tail, cuts)| {
            // A plausible request prefix so most inputs reach headers and bodies.
            let mut data = b"POST /a HTTP/1.1\r\n".to_vec();
            data.extend(tail);
            let cuts: Vec<usize> = cuts.iter().map(|&c| c as usize).collect();
            assert_eq!(stream_events(&data, &[]), stream_events(&data, &cuts));
        });
}

/// Frame `data` as responses with `reply::feed`, cut into segments at `cuts`: the counts and
/// the state reached.
fn reply_state(data: &[u8], cuts: &[usize], req: &ReqView) -> (u32, bool, bool, u32, u64) {
    let mut r = Replies::new(7);
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
        7u32.wrapping_add(data.len() as u32),
        "every byte framed"
    );
    (
        r.done,
        r.is_lost(),
        r.is_switched(),
        r.switch_index,
        r.bulk_left(),
    )
}

/// `reply::Replies` never panics, frames every byte, and reaches the same counts however the
/// server's bytes are cut into segments.
#[test]
fn replies_are_segmentation_independent() {
    bolero::check!()
        .with_type::<(Vec<u8>, Vec<u16>, u8, u64)>()
        .for_each(|(tail, cuts, switch, heads)| {
            // A plausible response prefix so most inputs reach headers and bodies.
            let mut data = b"HTTP/1.1 200 OK\r\n".to_vec();
            data.extend(tail);
            let req = ReqView {
                head_ring: *heads,
                reqs: 4,
                switch: switch % 3,
                unsure: 0,
                _pad: [0; 2],
            };
            let cuts: Vec<usize> = cuts.iter().map(|&c| c as usize).collect();
            let whole = reply_state(&data, &[], &req);
            assert_eq!(whole, reply_state(&data, &cuts, &req));
            // Body bytes stepped one at a time (as the kernel does inside a window) frame the
            // same way as body runs consumed in bulk.
            let mut r = Replies::new(7);
            for &b in &data {
                r.step(b, &req);
            }
            assert_eq!(
                (r.done, r.is_lost(), r.is_switched(), r.switch_index, r.pos),
                (
                    whole.0,
                    whole.1,
                    whole.2,
                    whole.3,
                    7u32.wrapping_add(data.len() as u32)
                )
            );
            // The run fast path (`Replies::step_run`) leaves exactly the state that byte by
            // byte framing does.
            let mut words = Replies::new(7);
            feed(&mut words, &data, &req);
            let mut bytes = Replies::new(7);
            feed_bytes(&mut bytes, &data, &req);
            assert_eq!(format!("{words:?}"), format!("{bytes:?}"));
        });
}

//! Tier 3, the evasion suite: every way around a method filter that
//! `../shared/PRIOR-ART.md` ("How filters get evaded") lists, played against the
//! real kernel program and `filterd` by a segment-level client
//! (`tests/py/evasion.py`, scapy), over IPv4 and IPv6.
//!
//! Each row of [`table`] is one TCP connection: the client's byte stream as
//! segments (stream offset + bytes, sent in row order, so out-of-order,
//! retransmitted and overlapping segments are just rows), what the backend must
//! record (`reach`, in order: no allowed request was blocked), what it must not
//! (`never`: no disallowed request reached it; anything recorded that is not in
//! `reach` fails the row too), and the responses the client must read, in order.
//! All rows run; the test fails once at the end listing every failing row.
//! `known_gap` marks a row as a known failure (reported, not fatal); it is
//! `None` everywhere until someone decides otherwise.
//!
//! The client sends from 10.77.0.9 / fd77::9, an address no interface owns, so
//! the client kernel never resets scapy's connections; the server side has a
//! static neighbour entry for it.
//!
//! VLANs: this kernel has no `CONFIG_VLAN_8021Q`, so no VLAN subinterface can
//! exist on the server. The VLAN rows therefore do the handshake untagged and
//! tag the data segments, which is what an evader would do anyway. Linux
//! strips one tag before TC ingress and delivers a priority tag (VID 0, also
//! an 802.1ad VID 0 outer tag over an 802.1Q VID 0 inner one) to the untagged
//! interface: those requests reach the backend, so the filter must judge them
//! like any other. A frame tagged with a VID that has no subinterface is
//! dropped by the server (PACKET_OTHERHOST) after TC: the backend never reads
//! it, so the filter must not answer for it either.
//!
//! Policy: `/api/items` GET+POST, `/admin` GET, `/users/@me` GET, default any,
//! `paths = "strict"` (the default) unless a row says `paths = "normalize"`
//! (the runner switches the policy through the REST API before such rows).
//! Paths backends read differently (`%2F`, `%5C`, `%00`, invalid escapes, `..;`,
//! escaped dot segments, `..` after `//`, a fragment) are answered 400 by the
//! filter and never forwarded, in both modes; in strict mode so is every path
//! not already in normal form. Request lines past the inspection window 414,
//! header blocks 431.
//!
//! Run: `FILTER_E2E=1 cargo test -p filter-tests --test evasion -- --test-threads=1`
//! (`EVASION_ONLY=<substring>` runs only the rows whose name contains it).

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use filter_tests::lab::{self, Backend, Daemon, Lab, Recorded};
use serde::Deserialize;
use serde_json::json;

use filter_tests::lab::{ADMIN_ALLOW, ITEMS_ALLOW};
/// The lab's sample policy and a rule on a path with a reserved character.
const POLICY: &str = r#"[[rules]]
path = "/api/items"
methods = ["GET", "POST"]

[[rules]]
path = "/admin"
methods = ["GET"]

[[rules]]
path = "/users/@me"
methods = ["GET"]
"#;
const USERS_ALLOW: &str = "GET, HEAD";

/// [`POLICY`] as the REST API's document, with `paths` set.
fn policy_json(paths: Paths) -> String {
    let rules = json!([
        {"path": "/api/items", "methods": ["GET", "POST"]},
        {"path": "/admin", "methods": ["GET"]},
        {"path": "/users/@me", "methods": ["GET"]},
    ]);
    json!({"paths": paths.wire(), "rules": rules}).to_string()
}

/// The policy's `paths` mode a row runs under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Paths {
    Strict,
    Normalize,
}

impl Paths {
    fn wire(self) -> &'static str {
        match self {
            Paths::Strict => "strict",
            Paths::Normalize => "normalize",
        }
    }
}
/// The kernel inspects this many bytes of a request line / header block.
const WINDOW: usize = 1024;
const VLAN_ID: u16 = 100;
/// Per row: the client gives up after this long; we wait a little longer for its report.
const CASE_TIMEOUT: Duration = Duration::from_secs(4);
const SETTLE_MS: u64 = 300;

// ---------------------------------------------------------------------------
// The table

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

/// What happens to the IP layer of every segment that carries data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ip {
    Plain,
    /// IPv4 only: a Record Route option (IHL 8).
    V4Options,
    /// IPv6 only: a Destination Options extension header before TCP.
    V6DestOpts,
    /// IPv6 only: a Hop-by-Hop Options extension header before TCP.
    V6HopByHop,
    /// IPv6 only: seven Destination Options headers, more than the filter walks.
    V6DestOpts7,
    /// IP fragments: the first holds the TCP header and 12 payload bytes, then 16-byte pieces.
    Fragments,
}

impl Ip {
    fn wire(self) -> &'static str {
        match self {
            Ip::Plain => "none",
            Ip::V4Options => "v4_options",
            Ip::V6DestOpts => "v6_destopts",
            Ip::V6HopByHop => "v6_hopbyhop",
            Ip::V6DestOpts7 => "v6_destopts_7",
            Ip::Fragments => "fragments",
        }
    }
    fn family(self) -> Option<Family> {
        match self {
            Ip::V4Options => Some(Family::V4),
            Ip::V6DestOpts | Ip::V6HopByHop | Ip::V6DestOpts7 => Some(Family::V6),
            Ip::Plain | Ip::Fragments => None,
        }
    }
}

/// One TCP segment: its offset in the client's byte stream and its bytes.
#[derive(Clone, Debug)]
struct Seg {
    off: usize,
    data: Vec<u8>,
    /// Pause before sending it (reading what the server sent meanwhile).
    delay_ms: u64,
    /// What makes it a segment the server's TCP may discard or read differently (see
    /// `tests/py/evasion.py`); sent once, not a copy the client retransmits.
    tweak: Option<serde_json::Value>,
}

/// A response the client must read, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    /// The backend answered with this status (it sends `Server: BaseHTTP…`).
    Backend(u16),
    /// The filter answered 405 with exactly this `Allow`.
    NotAllowed(&'static str),
    /// The filter answered with this status (no `Server` header, `Connection: close`).
    Filter(u16),
}

struct Case {
    name: &'static str,
    segments: Vec<Seg>,
    ip: Ip,
    /// Tags on every data segment: `[]`, `[802.1Q id]` or `[802.1ad outer, 802.1Q inner]`.
    vlan: &'static [u16],
    /// (method, target as the backend records it) that must arrive, in this order.
    reach: &'static [(&'static str, &'static str)],
    /// (method, target) that must never arrive.
    never: &'static [(&'static str, &'static str)],
    /// Every response the client must read, in order, and nothing else.
    client: &'static [Answer],
    /// Set to say "fails today, for this reason": reported, not fatal.
    known_gap: Option<&'static str>,
    /// The policy's `paths` mode for this row.
    paths: Paths,
}

// Stream builders.

/// `METHOD target HTTP/1.1` with a Host header and `extra` header lines, no body.
fn req(method: &str, target: &str) -> Vec<u8> {
    req_h(method, target, &[])
}

fn req_h(method: &str, target: &str, headers: &[&str]) -> Vec<u8> {
    let mut s = format!("{method} {target} HTTP/1.1\r\nHost: lab\r\n");
    for h in headers {
        s += h;
        s += "\r\n";
    }
    s += "\r\n";
    s.into_bytes()
}

fn post(target: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {target} HTTP/1.1\r\nHost: lab\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn post_chunked(target: &str, chunks: &[&str]) -> Vec<u8> {
    let mut s =
        format!("POST {target} HTTP/1.1\r\nHost: lab\r\nTransfer-Encoding: chunked\r\n\r\n");
    for c in chunks {
        s += &format!("{:x}\r\n{c}\r\n", c.len());
    }
    s += "0\r\n\r\n";
    s.into_bytes()
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

// Segment builders.

fn seg(off: usize, data: impl AsRef<[u8]>) -> Seg {
    Seg {
        off,
        data: data.as_ref().to_vec(),
        delay_ms: 0,
        tweak: None,
    }
}

impl Seg {
    /// Whether the client sends these bytes again (as they are) until the server has them:
    /// not a copy tweaked to be discarded (an urgent pointer changes no byte).
    fn is_copy(&self) -> bool {
        self.tweak
            .as_ref()
            .is_none_or(|t| t.as_object().is_some_and(|o| o.keys().all(|k| k == "urg")))
    }
}

/// A segment the server's TCP discards or reads differently (`tweak`, see `Seg::tweak`).
fn tweaked(off: usize, data: impl AsRef<[u8]>, tweak: serde_json::Value) -> Seg {
    Seg {
        tweak: Some(tweak),
        ..seg(off, data)
    }
}

/// The whole stream in one segment.
fn one(stream: Vec<u8>) -> Vec<Seg> {
    vec![seg(0, stream)]
}

/// The stream cut at these offsets, in order.
fn cut(stream: &[u8], at: &[usize]) -> Vec<Seg> {
    let mut bounds = vec![0];
    bounds.extend_from_slice(at);
    bounds.push(stream.len());
    bounds
        .windows(2)
        .map(|w| seg(w[0], &stream[w[0]..w[1]]))
        .collect()
}

/// The stream in `n`-byte segments, in order.
fn every(stream: &[u8], n: usize) -> Vec<Seg> {
    let at: Vec<usize> = (1..stream.len().div_ceil(n)).map(|i| i * n).collect();
    cut(stream, &at)
}

/// Segments sent in this order (indices into `segs`).
fn order(segs: Vec<Seg>, order: &[usize]) -> Vec<Seg> {
    order.iter().map(|&i| segs[i].clone()).collect()
}

fn reversed(mut segs: Vec<Seg>) -> Vec<Seg> {
    segs.reverse();
    segs
}

/// Each request in its own segment, `ms` apart, so each answer comes back before the next.
fn keepalive(reqs: &[Vec<u8>], ms: u64) -> Vec<Seg> {
    let mut off = 0;
    reqs.iter()
        .enumerate()
        .map(|(i, r)| {
            let s = Seg {
                off,
                data: r.clone(),
                delay_ms: if i == 0 { 0 } else { ms },
                tweak: None,
            };
            off += r.len();
            s
        })
        .collect()
}

/// A path of `len` bytes that canonicalizes to `tail`: `/x/aaaa…/../..` + `tail`.
fn long_dotdot(len: usize, tail: &str) -> String {
    let pad = len.saturating_sub(tail.len() + 9);
    format!("/x/{}/../..{tail}", "a".repeat(pad))
}

use Answer::{Backend as B, Filter as F, NotAllowed as NA};

const DEL_ADMIN: (&str, &str) = ("DELETE", "/admin");
const GET_ADMIN: (&str, &str) = ("GET", "/admin");
const PUT_ADMIN: (&str, &str) = ("PUT", "/admin");
const GET_ITEMS: (&str, &str) = ("GET", "/api/items");
const POST_ITEMS: (&str, &str) = ("POST", "/api/items");
const ADMIN_405: Answer = NA(ADMIN_ALLOW);
const ITEMS_405: Answer = NA(ITEMS_ALLOW);
/// A POST whose query names DELETE in `_method` after skipped parameters of many words each
/// (the kernel takes those a word at a time): a tracking tail and a token.
const LONG_QUERY_OVERRIDE: &str = "/api/items?utm_source=newsletter-winter-2026&utm_medium=email&utm_campaign=spring_sale_2026_last_chance&token=eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c&_method=DELETE";

#[rustfmt::skip]
fn table() -> Vec<Case> {
    let del_admin = req("DELETE", "/admin");
    let get_admin = req("GET", "/admin");
    let get_items = req("GET", "/api/items");
    let put_admin = req("PUT", "/admin");
    let n = del_admin.len();
    let plain = |name, segments, reach, never, client| Case {
        name, segments, ip: Ip::Plain, vlan: &[], reach, never, client, known_gap: None,
        paths: Paths::Strict,
    };
    let norm = |name, segments, reach, never, client| Case {
        name, segments, ip: Ip::Plain, vlan: &[], reach, never, client, known_gap: None,
        paths: Paths::Normalize,
    };
    let long_admin = long_dotdot(WINDOW + 100, "/admin");
    let long_query = format!("/admin?{}", "q".repeat(WINDOW + 100));
    let pad_header = format!("X-Pad: {}", "p".repeat(WINDOW + 100));
    let mut t = vec![
        // --- controls: the lab works, the policy is what we think it is
        plain("control: GET /admin is allowed", one(get_admin.clone()), &[GET_ADMIN], &[], &[B(200)]),
        plain("control: DELETE /admin is rejected", one(del_admin.clone()), &[], &[DEL_ADMIN], &[ADMIN_405]),
        plain("control: DELETE on an unruled path is allowed (default any)", one(req("DELETE", "/other")), &[("DELETE", "/other")], &[], &[B(200)]),

        // --- request line split across segments
        plain("split: inside the method (DEL|ETE /admin)", cut(&del_admin, &[3]), &[], &[DEL_ADMIN], &[ADMIN_405]),
        // The first-segment-only kernel rejects "ETE /admin" as an unknown method: the row
        // after this one shows that an allowed request split the same way gets blocked.
        plain("split: inside an allowed method (GE|T /admin)", cut(&get_admin, &[2]), &[GET_ADMIN], &[], &[B(200)]),
        plain("split: after the method (DELETE| /admin)", cut(&del_admin, &[6]), &[], &[DEL_ADMIN], &[ADMIN_405]),
        plain("split: inside the path (DELETE /ad|min)", cut(&del_admin, &[10]), &[], &[DEL_ADMIN], &[ADMIN_405]),
        plain("split: before the line's CRLF", cut(&del_admin, &[22]), &[], &[DEL_ADMIN], &[ADMIN_405]),
        plain("split: three segments", cut(&del_admin, &[2, 9]), &[], &[DEL_ADMIN], &[ADMIN_405]),
        plain("split: 1-byte segments, disallowed", every(&del_admin, 1), &[], &[DEL_ADMIN], &[ADMIN_405]),
        plain("split: 2-byte segments, disallowed", every(&del_admin, 2), &[], &[DEL_ADMIN], &[ADMIN_405]),
        plain("split: 1-byte segments, allowed GET /api/items", every(&get_items, 1), &[GET_ITEMS], &[], &[B(200)]),
        plain("split: allowed POST with body over 3 segments", cut(&post("/api/items", "name=widget"), &[4, 30]), &[POST_ITEMS], &[], &[B(200)]),

        // --- out of order
        plain("out of order: second half first", reversed(cut(&del_admin, &[3])), &[], &[DEL_ADMIN], &[ADMIN_405]),
        plain("out of order: 1-byte segments in reverse", reversed(every(&del_admin, 1)), &[], &[DEL_ADMIN], &[ADMIN_405]),
        plain("out of order: middle, last, first", order(cut(&del_admin, &[4, 12]), &[1, 2, 0]), &[], &[DEL_ADMIN], &[ADMIN_405]),
        plain("out of order: allowed request arrives", reversed(cut(&get_items, &[5])), &[GET_ITEMS], &[], &[B(200)]),

        // --- retransmission
        plain("retransmit: allowed request sent twice", vec![seg(0, &get_admin), seg(0, &get_admin)], &[GET_ADMIN], &[], &[B(200)]),
        plain("retransmit: disallowed request sent twice", vec![seg(0, &del_admin), seg(0, &del_admin)], &[], &[DEL_ADMIN], &[ADMIN_405]),
        plain("retransmit: first piece of a split line twice", order(cut(&del_admin, &[3]), &[0, 0, 1]), &[], &[DEL_ADMIN], &[ADMIN_405]),

        // --- overlapping segments with different bytes
        // In order, Linux keeps the first copy: the later one changes nothing.
        plain("overlap in order: allowed first copy kept, PUT copy ignored", vec![seg(0, &get_admin), seg(0, req("PUT", "/admin"))], &[GET_ADMIN], &[("PUT", "/admin")], &[B(200)]),
        plain("overlap in order: disallowed first copy, GET copy cannot undo it", vec![seg(0, req("PUT", "/admin")), seg(0, &get_admin)], &[], &[("PUT", "/admin"), GET_ADMIN], &[ADMIN_405]),
        // "DELETE /a" then "xdmin…" at offset 8: the backend reads "DELETE /admin".
        plain("overlap in order: partial, the first copy's byte wins", vec![seg(0, &del_admin[..9]), seg(8, [b"x".as_slice(), &del_admin[9..]].concat())], &[], &[DEL_ADMIN, ("DELETE", "/xdmin")], &[ADMIN_405]),
        // Out of order, a later copy that covers an earlier one and reaches further replaces
        // it (tcp_data_queue_ofo); a later copy of exactly the same range is dropped.
        plain("overlap out of order: longer covering copy replaces /xdmin with /admin", vec![seg(1, &req("DELETE", "/xdmin")[1..n - 2]), seg(1, &del_admin[1..]), seg(0, "D")], &[], &[DEL_ADMIN, ("DELETE", "/xdmin")], &[ADMIN_405]),
        plain("overlap out of order: longer covering copy replaces /admin with /xdmin", vec![seg(1, &del_admin[1..n - 2]), seg(1, &req("DELETE", "/xdmin")[1..]), seg(0, "D")], &[("DELETE", "/xdmin")], &[DEL_ADMIN], &[B(200)]),
        // The filter drops segments ahead of the next byte it expects, so neither same-range
        // copy reaches the backend: it reads the client's retransmission (the last copy sent),
        // and that is what the filter decides on.
        plain("overlap out of order: same-range copies dropped, resent /admin decides", vec![seg(1, &req("DELETE", "/xdmin")[1..]), seg(1, &del_admin[1..]), seg(0, "D")], &[], &[DEL_ADMIN, ("DELETE", "/xdmin")], &[ADMIN_405]),
        plain("overlap out of order: same-range copies dropped, resent /xdmin decides", vec![seg(1, &del_admin[1..]), seg(1, &req("DELETE", "/xdmin")[1..]), seg(0, "D")], &[("DELETE", "/xdmin")], &[DEL_ADMIN], &[B(200)]),

        // --- several requests on one connection
        plain("keep-alive: disallowed after an allowed one", keepalive(&[get_admin.clone(), del_admin.clone()], 150), &[GET_ADMIN], &[DEL_ADMIN], &[B(200), ADMIN_405]),
        plain("keep-alive: disallowed after two allowed ones", keepalive(&[get_items.clone(), get_admin.clone(), req("PUT", "/api/items")], 150), &[GET_ITEMS, GET_ADMIN], &[("PUT", "/api/items")], &[B(200), B(200), ITEMS_405]),
        plain("keep-alive: three allowed requests all arrive", keepalive(&[get_items.clone(), post("/api/items", "a=1"), get_admin.clone()], 100), &[GET_ITEMS, POST_ITEMS, GET_ADMIN], &[], &[B(200), B(200), B(200)]),
        plain("keep-alive: disallowed line split, 1-byte segments", { let mut s = keepalive(std::slice::from_ref(&get_admin), 0); s.extend(every(&del_admin, 1).into_iter().map(|mut x| { x.off += get_admin.len(); x })); s[1].delay_ms = 150; s }, &[GET_ADMIN], &[DEL_ADMIN], &[B(200), ADMIN_405]),
        plain("pipelined: allowed then disallowed in one segment", one(cat(&[&get_admin, &del_admin])), &[GET_ADMIN], &[DEL_ADMIN], &[B(200), ADMIN_405]),
        plain("pipelined: disallowed then allowed in one segment", one(cat(&[&del_admin, &get_admin])), &[], &[DEL_ADMIN, GET_ADMIN], &[ADMIN_405]),
        plain("pipelined: three allowed in one segment", one(cat(&[&get_items, &get_admin, &req("DELETE", "/other")])), &[GET_ITEMS, GET_ADMIN, ("DELETE", "/other")], &[], &[B(200), B(200), B(200)]),
        plain("pipelined: second request line split across segments", cut(&cat(&[&get_admin, &del_admin]), &[get_admin.len() + 3]), &[GET_ADMIN], &[DEL_ADMIN], &[B(200), ADMIN_405]),
        // The backend takes 0.6 s over /slow (tests/py/backend.py): the refusal waits until its
        // response is complete and acknowledged, then the 405 follows it in the client's stream.
        plain("pipelined: slow allowed response, then disallowed in the same segment", one(cat(&[&req("GET", "/slow"), &del_admin])), &[("GET", "/slow")], &[DEL_ADMIN], &[B(200), ADMIN_405]),
        plain("pipelined: slow allowed response, disallowed line split behind it", cut(&cat(&[&req("GET", "/slow"), &del_admin]), &[req("GET", "/slow").len() + 3]), &[("GET", "/slow")], &[DEL_ADMIN], &[B(200), ADMIN_405]),
        plain("keep-alive: disallowed sent while the allowed response is slow", keepalive(&[req("GET", "/slow"), get_admin.clone(), del_admin.clone()], 50), &[("GET", "/slow"), GET_ADMIN], &[DEL_ADMIN], &[B(200), B(200), ADMIN_405]),
        plain("body: Content-Length, disallowed request after the body", one(cat(&[&post("/api/items", "hello"), &del_admin])), &[POST_ITEMS], &[DEL_ADMIN], &[B(200), ADMIN_405]),
        plain("body: Content-Length, request-looking body is data", one(cat(&[&post("/api/items", std::str::from_utf8(&del_admin).unwrap()), &get_admin])), &[POST_ITEMS, GET_ADMIN], &[DEL_ADMIN], &[B(200), B(200)]),
        plain("body: Content-Length body split, next request in the body's last segment", cut(&cat(&[&post("/api/items", "0123456789"), &del_admin]), &[post("/api/items", "").len() + 4]), &[POST_ITEMS], &[DEL_ADMIN], &[B(200), ADMIN_405]),
        plain("body: chunked, disallowed request after the last chunk", one(cat(&[&post_chunked("/api/items", &["hello", "world"]), &del_admin])), &[POST_ITEMS], &[DEL_ADMIN], &[B(200), ADMIN_405]),
        plain("body: chunked, request-looking chunk is data", one(cat(&[&post_chunked("/api/items", &[std::str::from_utf8(&del_admin).unwrap()]), &get_admin])), &[POST_ITEMS, GET_ADMIN], &[DEL_ADMIN], &[B(200), B(200)]),
        plain("body: chunked, split inside the chunk size line", cut(&cat(&[&post_chunked("/api/items", &["0123456789abcdefX"]), &del_admin]), &[post_chunked("/api/items", &[]).len() - 4]), &[POST_ITEMS], &[DEL_ADMIN], &[B(200), ADMIN_405]),

        // --- path tricks (all of these are /admin to a normalizing backend). paths = "strict",
        // the default: a path not in normal form is answered 400 and never forwarded.
        plain("path: /a/../admin (400)", one(req("DELETE", "/a/../admin")), &[], &[("DELETE", "/a/../admin"), DEL_ADMIN], &[F(400)]),
        plain("path: GET /a/../admin is refused too (400)", one(req("GET", "/a/../admin")), &[], &[("GET", "/a/../admin")], &[F(400)]),
        plain("path: /./admin (400)", one(req("DELETE", "/./admin")), &[], &[("DELETE", "/./admin"), DEL_ADMIN], &[F(400)]),
        plain("path: /x/%2e%2e/admin (400)", one(req("DELETE", "/x/%2e%2e/admin")), &[], &[("DELETE", "/x/%2e%2e/admin"), DEL_ADMIN], &[F(400)]),
        plain("path: /x/.%2E/admin (400)", one(req("DELETE", "/x/.%2E/admin")), &[], &[("DELETE", "/x/.%2E/admin"), DEL_ADMIN], &[F(400)]),
        plain("path: //admin (400)", one(req("DELETE", "//admin")), &[], &[("DELETE", "//admin"), DEL_ADMIN], &[F(400)]),
        plain("path: /admin;x=1 (400)", one(req("DELETE", "/admin;x=1")), &[], &[("DELETE", "/admin;x=1"), DEL_ADMIN], &[F(400)]),
        plain("path: /%61dmin (400)", one(req("DELETE", "/%61dmin")), &[], &[("DELETE", "/%61dmin"), DEL_ADMIN], &[F(400)]),
        plain("path: /public/..;/admin, Tomcat's .. (400)", one(req("DELETE", "/public/..;/admin")), &[], &[("DELETE", "/public/..;/admin"), DEL_ADMIN], &[F(400)]),
        plain("path: /users/%40me, an escaped @ (400)", one(req("DELETE", "/users/%40me")), &[], &[("DELETE", "/users/%40me")], &[F(400)]),
        plain("path: /users/@me (405)", one(req("DELETE", "/users/@me")), &[], &[("DELETE", "/users/@me")], &[NA(USERS_ALLOW)]),
        plain("path: raw UTF-8 bytes (400)", one(req("DELETE", "/caf\u{e9}")), &[], &[("DELETE", "/caf\u{e9}")], &[F(400)]),
        plain("path: /admin?x=1", one(req("DELETE", "/admin?x=1")), &[], &[("DELETE", "/admin?x=1"), DEL_ADMIN], &[ADMIN_405]),
        plain("path: /admin#frag (400)", one(req("DELETE", "/admin#frag")), &[], &[("DELETE", "/admin#frag"), DEL_ADMIN], &[F(400)]),
        plain("path: /a/..|/admin split across segments (400)", cut(&req("DELETE", "/a/../admin"), &[11]), &[], &[("DELETE", "/a/../admin"), DEL_ADMIN], &[F(400)]),
        plain("path: normal form but not plain arrives (/.well-known, %3B, %C3%A9)", one(req("DELETE", "/.well-known/a%3Bb%C3%A9")), &[("DELETE", "/.well-known/a%3Bb%C3%A9")], &[], &[B(200)]),
        // paths = "normalize": canonicalized and judged (every reading: here the default,
        // any, is all the other readings fall under); what backends disagree on stays 400.
        norm("normalize: /a/../admin (405)", one(req("DELETE", "/a/../admin")), &[], &[("DELETE", "/a/../admin"), DEL_ADMIN], &[ADMIN_405]),
        norm("normalize: GET /a/../admin arrives as sent", one(req("GET", "/a/../admin")), &[("GET", "/a/../admin")], &[], &[B(200)]),
        norm("normalize: /./admin (405)", one(req("DELETE", "/./admin")), &[], &[("DELETE", "/./admin"), DEL_ADMIN], &[ADMIN_405]),
        norm("normalize: //admin (405)", one(req("DELETE", "//admin")), &[], &[("DELETE", "//admin"), DEL_ADMIN], &[ADMIN_405]),
        norm("normalize: /admin;x=1 (405)", one(req("DELETE", "/admin;x=1")), &[], &[("DELETE", "/admin;x=1"), DEL_ADMIN], &[ADMIN_405]),
        norm("normalize: /%61dmin (405)", one(req("DELETE", "/%61dmin")), &[], &[("DELETE", "/%61dmin"), DEL_ADMIN], &[ADMIN_405]),
        norm("normalize: /users/%40me is /users/@me (405)", one(req("DELETE", "/users/%40me")), &[], &[("DELETE", "/users/%40me")], &[NA(USERS_ALLOW)]),
        norm("normalize: GET /users/%40me arrives", one(req("GET", "/users/%40me")), &[("GET", "/users/%40me")], &[], &[B(200)]),
        norm("normalize: /a/..|/admin split across segments (405)", cut(&req("DELETE", "/a/../admin"), &[11]), &[], &[("DELETE", "/a/../admin"), DEL_ADMIN], &[ADMIN_405]),
        norm("normalize: /public/..;/admin stays 400", one(req("DELETE", "/public/..;/admin")), &[], &[("DELETE", "/public/..;/admin"), DEL_ADMIN], &[F(400)]),
        norm("normalize: GET /public/..;/admin stays 400", one(req("GET", "/public/..;/admin")), &[], &[("GET", "/public/..;/admin")], &[F(400)]),
        norm("normalize: /x//../admin, // before .. (400)", one(req("DELETE", "/x//../admin")), &[], &[("DELETE", "/x//../admin"), DEL_ADMIN], &[F(400)]),
        norm("normalize: /x/%2e%2e/admin, an escaped dot segment (400)", one(req("DELETE", "/x/%2e%2e/admin")), &[], &[("DELETE", "/x/%2e%2e/admin"), DEL_ADMIN], &[F(400)]),
        norm("normalize: /admin#frag (400)", one(req("DELETE", "/admin#frag")), &[], &[("DELETE", "/admin#frag"), DEL_ADMIN], &[F(400)]),
        plain("path: absolute-form http://lab/admin", one(req("DELETE", "http://lab/admin")), &[], &[("DELETE", "http://lab/admin"), DEL_ADMIN], &[ADMIN_405]),
        plain("path: absolute-form, allowed GET arrives", one(req("GET", "http://lab/admin")), &[("GET", "http://lab/admin")], &[], &[B(200)]),
        plain("path: OPTIONS * passes (never 405)", one(req("OPTIONS", "*")), &[("OPTIONS", "*")], &[], &[B(200)]),
        plain("path: OPTIONS /admin passes (never 405)", one(req("OPTIONS", "/admin")), &[("OPTIONS", "/admin")], &[], &[B(200)]),
        plain("path: %2F is ambiguous (400)", one(req("DELETE", "/x/..%2Fadmin")), &[], &[("DELETE", "/x/..%2Fadmin")], &[F(400)]),
        plain("path: %2F is ambiguous even for GET (400)", one(req("GET", "/api%2Fitems")), &[], &[("GET", "/api%2Fitems")], &[F(400)]),
        plain("path: %5C is ambiguous (400)", one(req("DELETE", "/x%5C..%5Cadmin")), &[], &[("DELETE", "/x%5C..%5Cadmin")], &[F(400)]),
        plain("path: %00 is ambiguous (400)", one(req("DELETE", "/admin%00")), &[], &[("DELETE", "/admin%00")], &[F(400)]),
        plain("path: invalid escape %zz (400)", one(req("DELETE", "/admin%zz")), &[], &[("DELETE", "/admin%zz")], &[F(400)]),
        plain("path: truncated escape % (400)", one(req("DELETE", "/admin%")), &[], &[("DELETE", "/admin%")], &[F(400)]),

        // --- method tricks
        plain("method: lowercase delete", one(req("delete", "/admin")), &[], &[("delete", "/admin")], &[ADMIN_405]),
        plain("method: lowercase get is not GET", one(req("get", "/admin")), &[], &[("get", "/admin")], &[ADMIN_405]),
        plain("method: unknown FOO", one(req("FOO", "/admin")), &[], &[("FOO", "/admin")], &[ADMIN_405]),
        plain("method: unknown FOO on an unruled path is allowed", one(req("FOO", "/other")), &[("FOO", "/other")], &[], &[B(200)]),
        plain("override: X-HTTP-Method-Override: DELETE on POST", one(req_h("POST", "/api/items", &["X-HTTP-Method-Override: DELETE", "Content-Length: 0"])), &[], &[POST_ITEMS], &[ITEMS_405]),
        plain("override: X-HTTP-Method: DELETE on POST", one(req_h("POST", "/api/items", &["X-HTTP-Method: DELETE", "Content-Length: 0"])), &[], &[POST_ITEMS], &[ITEMS_405]),
        plain("override: X-Method-Override: DELETE on POST", one(req_h("POST", "/api/items", &["X-Method-Override: DELETE", "Content-Length: 0"])), &[], &[POST_ITEMS], &[ITEMS_405]),
        plain("override: lowercase header name on GET /admin", one(req_h("GET", "/admin", &["x-http-method-override: PUT"])), &[], &[GET_ADMIN], &[ADMIN_405]),
        plain("override: header in a later segment", cut(&req_h("GET", "/admin", &["X-HTTP-Method-Override: DELETE"]), &[get_admin.len() - 2]), &[], &[GET_ADMIN], &[ADMIN_405]),
        plain("override: on the second keep-alive request", keepalive(&[get_admin.clone(), req_h("GET", "/admin", &["X-HTTP-Method: DELETE"])], 150), &[GET_ADMIN], &[], &[B(200), ADMIN_405]),
        plain("override: naming an allowed method arrives", one(req_h("POST", "/api/items", &["X-HTTP-Method-Override: GET", "Content-Length: 0"])), &[POST_ITEMS], &[], &[B(200)]),
        plain("override: header on OPTIONS is checked (405 names the override)", one(req_h("OPTIONS", "/admin", &["X-HTTP-Method-Override: DELETE"])), &[], &[("OPTIONS", "/admin")], &[ADMIN_405]),
        plain("override: _method=DELETE in the query of a POST (Symfony, Laravel)", one(req_h("POST", "/api/items?_method=DELETE", &["Content-Length: 0"])), &[], &[("POST", "/api/items?_method=DELETE")], &[ITEMS_405]),
        plain("override: .method=delete, which PHP reads as _method", one(req_h("POST", "/api/items?x=1&.method=delete", &["Content-Length: 0"])), &[], &[("POST", "/api/items?x=1&.method=delete")], &[ITEMS_405]),
        plain("override: %5Fmethod[]=PUT", one(req_h("POST", "/api/items?%5Fmethod[]=PUT", &["Content-Length: 0"])), &[], &[("POST", "/api/items?%5Fmethod[]=PUT")], &[ITEMS_405]),
        plain("override: the second of two _method parameters", one(req_h("POST", "/api/items?_method=GET&_method=DELETE", &["Content-Length: 0"])), &[], &[("POST", "/api/items?_method=GET&_method=DELETE")], &[ITEMS_405]),
        plain("override: _method on GET is checked too", one(req("GET", "/admin?_method=PUT")), &[], &[("GET", "/admin?_method=PUT")], &[ADMIN_405]),
        plain("override: _method on OPTIONS is checked", one(req("OPTIONS", "/admin?_method=DELETE")), &[], &[("OPTIONS", "/admin?_method=DELETE")], &[ADMIN_405]),
        plain("override: _method split across segments", cut(&req("GET", "/admin?_method=DELETE"), &[14, 19]), &[], &[("GET", "/admin?_method=DELETE")], &[ADMIN_405]),
        plain("override: _method naming an allowed method arrives", one(req_h("POST", "/api/items?_method=get", &["Content-Length: 0"])), &[("POST", "/api/items?_method=get")], &[], &[B(200)]),
        plain("override: other query parameters arrive", one(req("GET", "/admin?x_method=PUT&method=DELETE&q=_method")), &[("GET", "/admin?x_method=PUT&method=DELETE&q=_method")], &[], &[B(200)]),
        plain("override: _method after long skipped parameters", one(req_h("POST", LONG_QUERY_OVERRIDE, &["Content-Length: 0"])), &[], &[("POST", LONG_QUERY_OVERRIDE)], &[ITEMS_405]),
        plain("override: _method after parameters split by ; and -", one(req_h("POST", "/api/items?a=1;b-2=x&-c=3;d=eyJhbGciOiJIUzI1NiJ9.e30&_method=delete", &["Content-Length: 0"])), &[], &[("POST", "/api/items?a=1;b-2=x&-c=3;d=eyJhbGciOiJIUzI1NiJ9.e30&_method=delete")], &[ITEMS_405]),

        // --- past the inspection window
        plain("window: dot segments push /admin past the window (414)", one(req("DELETE", &long_admin)), &[], one_of("DELETE", &long_admin), &[F(414)]),
        // The decision is made when the path ends: a long query after it cannot delay it.
        plain("window: long query on a disallowed request is decided on its path (405)", one(req("DELETE", &long_query)), &[], one_of("DELETE", &long_query), &[ADMIN_405]),
        plain("window: long line in 100-byte segments (414)", every(&req("DELETE", &long_admin), 100), &[], one_of("DELETE", &long_admin), &[F(414)]),
        // Header blocks are followed up to 16 KiB (431 past that): the override is seen.
        plain("window: override header past a 1 KiB header block is seen (405)", one(req_h("POST", "/api/items", &[&pad_header, "X-HTTP-Method-Override: DELETE", "Content-Length: 0"])), &[], &[POST_ITEMS], &[ITEMS_405]),

        // --- other protocols on the port
        // Upgrade not accepted (the backend answers 200): the stream is still HTTP/1.1.
        plain("upgrade: h2c refused by the backend, disallowed request follows", keepalive(&[req_h("GET", "/admin", &["Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c", "HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA"]), del_admin.clone()], 150), &[GET_ADMIN], &[DEL_ADMIN], &[B(200), ADMIN_405]),
        plain("upgrade: websocket refused by the backend, disallowed request follows", keepalive(&[req_h("GET", "/admin", &["Connection: Upgrade", "Upgrade: websocket", "Sec-WebSocket-Version: 13", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="]), del_admin.clone()], 150), &[GET_ADMIN], &[DEL_ADMIN], &[B(200), ADMIN_405]),
        plain("upgrade: pipelined behind an unanswered Upgrade", one(cat(&[&req_h("GET", "/admin", &["Connection: Upgrade", "Upgrade: websocket"]), &del_admin])), &[GET_ADMIN], &[DEL_ADMIN], &[B(200), ADMIN_405]),
        // The backend answers /upgrade with 101 and becomes a tunnel (tests/py/backend.py):
        // what follows is no longer HTTP/1.1, and passes.
        plain("upgrade: accepted (101), the connection becomes a tunnel", keepalive(&[req_h("GET", "/upgrade", &["Connection: Upgrade", "Upgrade: websocket"]), del_admin.clone()], 150), &[("GET", "/upgrade"), ("TUNNEL", "DELETE /admin HTTP/1.1")], &[], &[B(101)]),
        plain("upgrade: accepted (101), bytes pipelined behind it wait for the answer", one(cat(&[&req_h("GET", "/upgrade", &["Connection: Upgrade", "Upgrade: websocket"]), &del_admin])), &[("GET", "/upgrade"), ("TUNNEL", "DELETE /admin HTTP/1.1")], &[], &[B(101)]),
        plain("upgrade: refused by the backend after a slow answer, disallowed request pipelined", one(cat(&[&req_h("GET", "/slow", &["Connection: Upgrade", "Upgrade: websocket"]), &del_admin])), &[("GET", "/slow")], &[DEL_ADMIN], &[B(200), ADMIN_405]),
        // Contract (Reason::Tunnel): the HTTP/2 preface makes the connection a tunnel and
        // it passes. This HTTP/1.1-only backend answers it 505; a disallowed HTTP/1.1
        // request smuggled behind the preface must still not be read as allowed.
        // Python answers PRI with an HTTP/0.9-style error page (no status line) and closes.
        // The filter cannot inspect HTTP/2, so it does not let it through: 400 and reset.
        plain("h2: prior-knowledge preface is refused (400)", one(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec()), &[], &[], &[F(400)]),
        plain("h2: preface split, disallowed HTTP/1.1 request behind it, refused (400)", cut(&cat(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", &del_admin]), &[5]), &[], &[DEL_ADMIN], &[F(400)]),

        // --- insertion: a first copy the server's TCP discards must not advance the filter,
        // or the request sent next at the same sequence number passes as a "retransmission".
        // GET /admin and PUT /admin are the same length; /admin allows GET only.
        plain("insertion: bad TCP checksum on the first copy", vec![tweaked(0, &get_admin, json!({"bad_csum": true})), seg(0, &put_admin)], &[], &[PUT_ADMIN, GET_ADMIN], &[ADMIN_405]),
        plain("insertion: first copy without the ACK flag", vec![tweaked(0, &get_admin, json!({"flags": 0x08})), seg(0, &put_admin)], &[], &[PUT_ADMIN, GET_ADMIN], &[ADMIN_405]),
        plain("insertion: first copy acknowledges data never sent", vec![tweaked(0, &get_admin, json!({"ack_delta": 100_000})), seg(0, &put_admin)], &[], &[PUT_ADMIN, GET_ADMIN], &[ADMIN_405]),
        plain("insertion: first copy carries SYN", vec![tweaked(0, &get_admin, json!({"flags": 0x1a})), seg(0, &put_admin)], &[], &[PUT_ADMIN, GET_ADMIN], &[ADMIN_405]),
        // An RST off the next byte gets a challenge ACK: the connection and its state stay.
        plain("insertion: RST off the next byte forgets nothing", vec![tweaked(10, b"", json!({"flags": 0x14})), seg(0, &put_admin)], &[], &[PUT_ADMIN], &[ADMIN_405]),
        // With the urgent byte taken out of the stream, a backend would read PUT /admin.
        plain("urgent: the urgent byte is read in line by both", vec![tweaked(0, req("PUT", "/aXdmin"), json!({"urg": 7}))], &[("PUT", "/aXdmin")], &[PUT_ADMIN], &[B(200)]),
    ];

    // --- the IP layer and the link
    let ipcase = |name, ip, segments, reach, never, client| Case {
        name, segments, ip, vlan: &[], reach, never, client, known_gap: None,
        paths: Paths::Strict,
    };
    t.extend([
        ipcase("ipv4 options: disallowed", Ip::V4Options, one(del_admin.clone()), &[], &[DEL_ADMIN], &[ADMIN_405]),
        ipcase("ipv4 options: allowed arrives", Ip::V4Options, one(get_admin.clone()), &[GET_ADMIN], &[], &[B(200)]),
        ipcase("ipv4 options: split disallowed line", Ip::V4Options, cut(&del_admin, &[3]), &[], &[DEL_ADMIN], &[ADMIN_405]),
        ipcase("ipv6 destination options header: disallowed", Ip::V6DestOpts, one(del_admin.clone()), &[], &[DEL_ADMIN], &[ADMIN_405]),
        ipcase("ipv6 destination options header: allowed arrives", Ip::V6DestOpts, one(get_admin.clone()), &[GET_ADMIN], &[], &[B(200)]),
        ipcase("ipv6 hop-by-hop header: disallowed", Ip::V6HopByHop, one(del_admin.clone()), &[], &[DEL_ADMIN], &[ADMIN_405]),
        // More extension headers than the filter walks: dropped (fail-closed), even allowed.
        ipcase("ipv6 seven destination options headers: dropped", Ip::V6DestOpts7, one(del_admin.clone()), &[], &[DEL_ADMIN], &[]),
        ipcase("ipv6 seven destination options headers: allowed is dropped as well", Ip::V6DestOpts7, one(get_admin.clone()), &[], &[GET_ADMIN], &[]),
        ipcase("ip fragments: disallowed is dropped", Ip::Fragments, one(del_admin.clone()), &[], &[DEL_ADMIN], &[]),
        // Fragmented TCP to an inspected port is dropped (fail-closed): allowed requests too.
        ipcase("ip fragments: allowed is dropped as well", Ip::Fragments, one(get_admin.clone()), &[], &[GET_ADMIN], &[]),
    ]);
    let vlan = |name, vlan, segments, reach, never, client| Case {
        name, segments, ip: Ip::Plain, vlan, reach, never, client, known_gap: None,
        paths: Paths::Strict,
    };
    t.extend([
        vlan("vlan: priority tag (VID 0), disallowed", &[0], one(del_admin.clone()), &[], &[DEL_ADMIN], &[ADMIN_405]),
        vlan("vlan: priority tag (VID 0), allowed arrives", &[0], one(get_admin.clone()), &[GET_ADMIN], &[], &[B(200)]),
        vlan("vlan: priority tag (VID 0), split disallowed line", &[0], cut(&del_admin, &[3]), &[], &[DEL_ADMIN], &[ADMIN_405]),
        vlan("vlan: priority tag, disallowed keep-alive second", &[0], keepalive(&[get_admin.clone(), del_admin.clone()], 150), &[GET_ADMIN], &[DEL_ADMIN], &[B(200), ADMIN_405]),
        vlan("vlan: double tag 802.1ad 0 / 802.1Q 0, disallowed", &[0, 0], one(del_admin.clone()), &[], &[DEL_ADMIN], &[ADMIN_405]),
        vlan("vlan: double tag 802.1ad 0 / 802.1Q 0, allowed arrives", &[0, 0], one(get_admin.clone()), &[GET_ADMIN], &[], &[B(200)]),
        // Dropped by the server after TC: nothing is read, so nothing may be answered.
        vlan("vlan: VID 100 without a subinterface is never read, never answered", &[VLAN_ID], one(del_admin.clone()), &[], &[DEL_ADMIN], &[]),
        vlan("vlan: double tag 802.1ad 0 / 802.1Q 100 is never read, never answered", &[0, VLAN_ID], one(del_admin.clone()), &[], &[DEL_ADMIN], &[]),
        vlan("vlan: double tag 802.1ad 0 / 802.1Q 0, split disallowed line", &[0, 0], cut(&del_admin, &[3]), &[], &[DEL_ADMIN], &[ADMIN_405]),
        // Four priority tags: one is taken out before TC, three are more than the filter
        // walks: dropped (fail-closed), even allowed.
        vlan("vlan: four priority tags, disallowed is dropped", &[0, 0, 0, 0], one(del_admin.clone()), &[], &[DEL_ADMIN], &[]),
        vlan("vlan: four priority tags, allowed is dropped as well", &[0, 0, 0, 0], one(get_admin.clone()), &[], &[GET_ADMIN], &[]),
    ]);
    // Known gaps: a row whose `known_gap` says why still runs; it is reported, and flagged
    // when it starts passing. None today.
    t
}

/// Row expectations are `'static`; the few built at run time live for the test.
fn one_of(method: &'static str, target: &str) -> &'static [(&'static str, &'static str)] {
    let target: &'static str = Box::leak(target.to_owned().into_boxed_str());
    Box::leak(Box::new([(method, target)]))
}

// ---------------------------------------------------------------------------
// Running

/// Fields drop in declaration order: client, daemon, backend, then the lab.
struct Setup {
    client: Client,
    daemon: Daemon,
    backend: Backend,
    lab: Lab,
    family: Family,
    /// The policy's `paths` mode in force.
    paths: Paths,
}

const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 9);
const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 9);

fn setup(test: &str, family: Family) -> Option<Setup> {
    if !lab::e2e_enabled(test) {
        return None;
    }
    let fail = |what: &str, e: anyhow::Error| -> ! { panic!("{test}: {what}: {e:#}") };
    lab::check_prerequisites()
        .unwrap_or_else(|e| fail("FILTER_E2E=1 but a prerequisite is missing", e));
    let scapy = Command::new("python3")
        .args(["-c", "import scapy.all"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        scapy,
        "{test}: FILTER_E2E=1 but python3 cannot import scapy (pip install scapy)"
    );
    lab::install_ctrlc_cleanup().unwrap_or_else(|e| fail("installing Ctrl-C cleanup", e));
    let lab = Lab::new().unwrap_or_else(|e| fail("building the lab", e));
    let client_mac = lab.client_mac().unwrap_or_else(|e| fail("client MAC", e));
    for addr in [IpAddr::V4(CLIENT_V4), IpAddr::V6(CLIENT_V6)] {
        lab.add_server_neighbour(lab.server_iface(), addr, &client_mac)
            .unwrap_or_else(|e| fail("adding a static neighbour", e));
    }
    let backend = lab
        .start_backend(80)
        .unwrap_or_else(|e| fail("starting the backend", e));
    let daemon = lab
        .start_filterd(&lab::filterd_binary(), POLICY, &[])
        .unwrap_or_else(|e| fail("starting filterd", e));
    let client = Client::start(&lab).unwrap_or_else(|e| fail("starting evasion.py", e));
    Some(Setup {
        client,
        daemon,
        backend,
        lab,
        family,
        paths: Paths::Strict,
    })
}

/// `evasion.py` in the client namespace, fed one case per line.
struct Client {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
}

impl Client {
    fn start(lab: &Lab) -> anyhow::Result<Client> {
        let mut child = lab
            .client_cmd("python3")
            .arg("-u")
            .arg(lab::py_script("evasion.py"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Client {
            child,
            stdin,
            lines,
        })
    }

    fn run(&mut self, case: &serde_json::Value) -> Result<Outcome, String> {
        writeln!(self.stdin, "{case}").map_err(|e| format!("writing to evasion.py: {e}"))?;
        self.stdin
            .flush()
            .map_err(|e| format!("writing to evasion.py: {e}"))?;
        // The first case also pays for importing scapy.
        let line = self
            .lines
            .recv_timeout(CASE_TIMEOUT + Duration::from_secs(10))
            .map_err(|e| format!("no answer from evasion.py: {e}"))?;
        serde_json::from_str(&line).map_err(|e| format!("evasion.py printed {line:?}: {e}"))
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // Our own child, by PID.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug, Deserialize)]
struct Outcome {
    handshake: bool,
    #[serde(default)]
    received_b64: String,
    #[serde(default)]
    fin: bool,
    #[serde(default)]
    rst: bool,
    #[serde(default)]
    after_fin: usize,
    #[serde(default)]
    acked: usize,
    #[serde(default)]
    sent: usize,
    #[serde(default)]
    retransmits: u32,
    error: Option<String>,
}

fn wire_case(s: &Setup, c: &Case) -> serde_json::Value {
    let (src, dst) = match s.family {
        Family::V4 => (IpAddr::V4(CLIENT_V4), IpAddr::V4(s.lab.server_v4())),
        Family::V6 => (IpAddr::V6(CLIENT_V6), IpAddr::V6(s.lab.server_v6())),
    };
    let segments: Vec<_> = c
        .segments
        .iter()
        .map(|g| json!({"off": g.off, "data_b64": b64(&g.data), "delay_ms": g.delay_ms, "tweak": g.tweak}))
        .collect();
    json!({
        "iface": s.lab.client_iface(),
        "src_mac": s.lab.client_mac().expect("client MAC"),
        "dst_mac": s.lab.server_mac().expect("server MAC"),
        "src": src.to_string(),
        "dst": dst.to_string(),
        "dport": 80,
        "vlan": c.vlan,
        "ip": c.ip.wire(),
        "segments": segments,
        "settle_ms": SETTLE_MS,
        "timeout_ms": CASE_TIMEOUT.as_millis() as u64,
    })
}

/// One response as the client read it.
#[derive(Debug)]
struct Response {
    /// 0 for bytes that do not start with a status line; `raw` holds their start.
    status: u16,
    raw: String,
    from_backend: bool,
    allow: Vec<String>,
    closes: bool,
}

impl Response {
    fn matches(&self, want: Answer) -> bool {
        match want {
            Answer::Backend(st) => self.from_backend && self.status == st,
            Answer::NotAllowed(allow) => {
                !self.from_backend && self.status == 405 && self.allow == [allow] && self.closes
            }
            Answer::Filter(st) => !self.from_backend && self.status == st && self.closes,
        }
    }
}

impl std::fmt::Display for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.status == 0 {
            return write!(f, "raw {:?}", self.raw);
        }
        let who = if self.from_backend {
            "backend"
        } else {
            "filter"
        };
        write!(f, "{who} {}", self.status)?;
        if !self.allow.is_empty() {
            write!(f, " Allow: {}", self.allow.join(" | "))?;
        }
        Ok(())
    }
}

/// Splits the server's byte stream into responses (Content-Length framed; a
/// response without one runs to the end). Unparseable bytes end the list with an error.
fn responses(raw: &[u8]) -> (Vec<Response>, Option<String>) {
    let mut out = Vec::new();
    let mut rest = raw;
    while !rest.is_empty() {
        if !rest.starts_with(b"HTTP/") {
            out.push(Response {
                status: 0,
                raw: lossy(rest, 40),
                from_backend: false,
                allow: Vec::new(),
                closes: true,
            });
            return (out, None);
        }
        let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") else {
            return (out, Some(format!("trailing bytes {:?}", lossy(rest, 120))));
        };
        let head = String::from_utf8_lossy(&rest[..end]).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let Some(status) = status_line
            .strip_prefix("HTTP/1.")
            .and_then(|s| s.get(2..5))
            .and_then(|s| s.parse().ok())
        else {
            return (
                out,
                Some(format!("not a status line: {:?}", lossy(rest, 120))),
            );
        };
        let mut r = Response {
            status,
            raw: String::new(),
            from_backend: false,
            allow: Vec::new(),
            closes: false,
        };
        let mut len = None;
        for line in lines {
            let Some((n, v)) = line.split_once(':') else {
                continue;
            };
            let v = v.trim();
            match n.trim().to_ascii_lowercase().as_str() {
                "server" => r.from_backend = true,
                "allow" => r.allow.push(v.to_owned()),
                "connection" => r.closes = v.eq_ignore_ascii_case("close"),
                "content-length" => len = v.parse::<usize>().ok(),
                _ => {}
            }
        }
        let body_start = end + 4;
        let body_end = len.map_or(rest.len(), |l| (body_start + l).min(rest.len()));
        rest = &rest[body_end..];
        out.push(r);
    }
    (out, None)
}

fn lossy(b: &[u8], max: usize) -> String {
    String::from_utf8_lossy(&b[..b.len().min(max)]).into_owned()
}

/// Runs one row; returns why it failed, or None.
fn check(s: &mut Setup, c: &Case) -> Option<String> {
    let mark = s.backend.requests().map(|r| r.len()).unwrap_or(0);
    let out = match s.client.run(&wire_case(s, c)) {
        Ok(o) => o,
        Err(e) => return Some(e),
    };
    if let Some(e) = &out.error {
        return Some(format!("evasion.py failed: {e}"));
    }
    if !out.handshake {
        return Some("no handshake (SYN not answered)".into());
    }
    // The backend logs before it answers; give a late request a moment to land anyway.
    std::thread::sleep(Duration::from_millis(20));
    let mut seen: Vec<Recorded> = match s.backend.requests() {
        Ok(r) => r,
        Err(e) => return Some(format!("reading the backend log: {e:#}")),
    };
    seen.drain(..mark.min(seen.len()));
    let got: Vec<(&str, &str)> = seen
        .iter()
        .map(|r| (r.method.as_str(), r.path.as_str()))
        .collect();
    let show = |v: &[(&str, &str)]| {
        v.iter()
            .map(|(m, p)| format!("{m} {}", abbreviate(p)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut why = Vec::new();
    let leaked: Vec<_> = got
        .iter()
        .copied()
        .filter(|g| c.never.contains(g))
        .collect();
    if !leaked.is_empty() {
        why.push(format!("DISALLOWED REACHED THE BACKEND: {}", show(&leaked)));
    }
    // `reach` must show up in order; a missing one does not hide the ones after it.
    let mut missing = Vec::new();
    let mut from = 0;
    for want in c.reach {
        match got[from..].iter().position(|g| g == want) {
            Some(i) => from += i + 1,
            None => missing.push(*want),
        }
    }
    if !missing.is_empty() {
        why.push(format!(
            "ALLOWED BLOCKED: backend never got {}",
            show(&missing)
        ));
    }
    let extra: Vec<_> = got
        .iter()
        .copied()
        .filter(|g| !c.reach.contains(g) && !c.never.contains(g))
        .collect();
    if !extra.is_empty() {
        why.push(format!("unexpected at the backend: {}", show(&extra)));
    }
    let raw = b64_decode(&out.received_b64);
    let (resp, parse_err) = responses(&raw);
    let ok = resp.len() == c.client.len()
        && resp.iter().zip(c.client).all(|(r, &w)| r.matches(w))
        && parse_err.is_none();
    if !ok {
        let saw: Vec<String> = resp.iter().map(ToString::to_string).collect();
        let mut m = format!(
            "client read [{}], want [{}]",
            saw.join("; "),
            c.client
                .iter()
                .map(|a| match a {
                    Answer::Backend(st) => format!("backend {st}"),
                    Answer::NotAllowed(al) => format!("filter 405 Allow: {al}"),
                    Answer::Filter(st) => format!("filter {st}"),
                })
                .collect::<Vec<_>>()
                .join("; ")
        );
        if let Some(e) = parse_err {
            m += &format!(" ({e})");
        }
        why.push(m);
    }
    if out.after_fin > 0 {
        why.push(format!(
            "the server sent {} bytes after its FIN (e.g. a second answer)",
            out.after_fin
        ));
    }
    if why.is_empty() {
        return None;
    }
    why.push(format!(
        "[client: acked {}/{} bytes, {} retransmits, fin={}, rst={}]",
        out.acked, out.sent, out.retransmits, out.fin, out.rst
    ));
    Some(why.join("; "))
}

fn abbreviate(p: &str) -> String {
    if p.len() > 40 {
        format!("{}…({} bytes)", &p[..30], p.len())
    } else {
        p.to_owned()
    }
}

fn run_suite(test: &str, family: Family) {
    let Some(mut s) = setup(test, family) else {
        return;
    };
    let only = std::env::var("EVASION_ONLY").ok();
    let started = Instant::now();
    let mut failures = Vec::new();
    let mut gaps = Vec::new();
    let mut ran = 0;
    for c in table() {
        if c.ip.family().is_some_and(|f| f != family) {
            continue;
        }
        if only.as_deref().is_some_and(|o| !c.name.contains(o)) {
            continue;
        }
        assert!(
            covered(&c.segments),
            "row {:?}: the segments leave a hole in the stream",
            c.name
        );
        ran += 1;
        if c.paths != s.paths {
            match s
                .daemon
                .api("PUT", "/v1/policy", Some(&policy_json(c.paths)))
            {
                Ok((200, _)) => s.paths = c.paths,
                Ok((st, body)) => panic!("switching to paths = {:?}: {st} {body}", c.paths),
                Err(e) => panic!("switching to paths = {:?}: {e:#}", c.paths),
            }
        }
        let t0 = Instant::now();
        let verdict = check(&mut s, &c);
        let line = format!("[{family:?}] {}", c.name);
        let _ = writeln!(
            std::io::stderr(),
            "{:<4} {line} ({} ms)",
            if verdict.is_none() { "ok" } else { "FAIL" },
            t0.elapsed().as_millis()
        );
        match (verdict, c.known_gap) {
            (None, Some(gap)) => gaps.push(format!("{line}: passes now, drop known_gap ({gap})")),
            (None, None) => {}
            (Some(why), Some(gap)) => gaps.push(format!("{line}: known gap ({gap}): {why}")),
            (Some(why), None) => failures.push(format!("{line}: {why}")),
        }
        if !s.daemon.running() {
            failures.push(format!("{line}: filterd exited; log:\n{}", s.daemon.log()));
            break;
        }
    }
    let _ = writeln!(
        std::io::stderr(),
        "{test}: {ran} rows in {:.1} s, {} failing, {} known gaps",
        started.elapsed().as_secs_f64(),
        failures.len(),
        gaps.len()
    );
    for g in &gaps {
        let _ = writeln!(std::io::stderr(), "  gap: {g}");
    }
    assert!(
        failures.is_empty(),
        "{} of {ran} evasion rows failed over {family:?}:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

/// Every byte from 0 to the end is in some segment.
fn covered(segs: &[Seg]) -> bool {
    let end = segs.iter().map(|g| g.off + g.data.len()).max().unwrap_or(0);
    let mut have = vec![false; end];
    // A segment the server's TCP discards is no copy the client sends again: the others must
    // cover the stream.
    for g in segs.iter().filter(|g| g.is_copy()) {
        have[g.off..g.off + g.data.len()].fill(true);
    }
    have.into_iter().all(|b| b)
}

fn b64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from_be_bytes([0, b[0], b[1], b[2]]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn b64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            _ => 63,
        }
    };
    let s = s.trim_end_matches('=').as_bytes();
    let mut out = Vec::new();
    for chunk in s.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= val(c) << (18 - 6 * i);
        }
        out.extend_from_slice(&acc.to_be_bytes()[1..chunk.len()]);
    }
    out
}

// ---------------------------------------------------------------------------
// Tests

#[test]
fn table_is_well_formed() {
    // Host-only: no root needed. Names are unique and every stream is hole-free.
    let t = table();
    let mut names: Vec<_> = t.iter().map(|c| c.name).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), t.len(), "duplicate row names");
    for c in &t {
        assert!(covered(&c.segments), "{}: hole in the stream", c.name);
    }
    assert_eq!(b64_decode(&b64(b"HTTP/1.1 405\r\n")), b"HTTP/1.1 405\r\n");
    for s in ["", "f", "fo", "foo", "foob"] {
        assert_eq!(b64_decode(&b64(s.as_bytes())), s.as_bytes());
    }
}

#[test]
fn evasion_ipv4() {
    run_suite("evasion_ipv4", Family::V4);
}

#[test]
fn evasion_ipv6() {
    run_suite("evasion_ipv6", Family::V6);
}

//! Tier 3, end to end: the real `filterd` on the server side of a [`Lab`], the
//! recording backend behind it on port 80, and real clients (curl and the
//! strict h11 client) in the client namespace. Every test runs over IPv4 and
//! IPv6. Needs root and a release `filterd` with the embedded kernel object;
//! runs only with `FILTER_E2E=1` (`cargo xtask test` sets it), and then a
//! missing prerequisite fails the test instead of skipping it.
//!
//! Run: `FILTER_E2E=1 cargo test -p filter-tests --test e2e -- --test-threads=1`

use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime};

use filter_tests::lab::{self, Backend, Daemon, Lab, Recorded};
use serde_json::{json, Value};

use filter_tests::lab::{ADMIN_ALLOW, ITEMS_ALLOW, SAMPLE_POLICY as POLICY};
/// After a rejection the server side must have let go of the connection by then.
const CONNECTION_GONE_WITHIN: Duration = Duration::from_millis(300);

// ---------------------------------------------------------------------------
// Setup

/// Fields drop in declaration order: the daemon first, the lab last.
struct Setup {
    daemon: Daemon,
    backend: Backend,
    lab: Lab,
}

fn setup(test: &str) -> Option<Setup> {
    setup_with(test, &[])
}

/// As [`setup`], with extra `filterd` arguments.
fn setup_with(test: &str, filterd_args: &[&str]) -> Option<Setup> {
    if !lab::e2e_enabled(test) {
        return None;
    }
    let fail = |what: &str, e: anyhow::Error| -> ! { panic!("{test}: {what}: {e:#}") };
    lab::check_prerequisites()
        .unwrap_or_else(|e| fail("FILTER_E2E=1 but a prerequisite is missing", e));
    lab::install_ctrlc_cleanup().unwrap_or_else(|e| fail("installing Ctrl-C cleanup", e));
    let binary = lab::filterd_binary();
    let lab = Lab::new().unwrap_or_else(|e| fail("building the lab", e));
    let backend = lab
        .start_backend(80)
        .unwrap_or_else(|e| fail("starting the backend", e));
    let daemon = lab
        .start_filterd(&binary, POLICY, filterd_args)
        .unwrap_or_else(|e| fail("starting filterd", e));
    Some(Setup {
        daemon,
        backend,
        lab,
    })
}

// ---------------------------------------------------------------------------
// Clients

#[derive(Debug, Clone, Copy)]
enum Client {
    /// `curl -sS -i` (`-I` for HEAD): lenient, what most users run.
    Curl,
    /// `tests/py/h11_client.py`: strict, and sends any method token as is.
    H11,
}

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

fn url(addr: IpAddr, path: &str) -> String {
    match addr {
        IpAddr::V4(a) => format!("http://{a}{path}"),
        IpAddr::V6(a) => format!("http://[{a}]{path}"),
    }
}

fn family(addr: IpAddr) -> &'static str {
    if addr.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

/// Splits an HTTP response leniently (CRLF or LF) into status, headers, body.
fn parse_response(raw: &[u8], what: &str) -> Reply {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .or_else(|| text.split_once("\n\n"))
        .unwrap_or_else(|| panic!("{what}: no end of header section in {text:?}"));
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{what}: bad status line {status_line:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_owned(),
    }
}

fn request(
    s: &Setup,
    client: Client,
    addr: IpAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Reply {
    let what = format!("{method} {path} over {} ({client:?})", family(addr));
    match client {
        Client::Curl => {
            let mut cmd = s.lab.client_cmd("curl");
            cmd.args(["-sS", "-g", "--max-time", "5"]);
            if method == "HEAD" {
                cmd.arg("-I");
            } else {
                cmd.args(["-i", "-X", method]);
            }
            if let Some(b) = body {
                cmd.args(["--data-binary", b]);
            }
            let out = cmd.arg(url(addr, path)).output().expect("running curl");
            assert!(
                out.status.success(),
                "{what}: curl failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            parse_response(&out.stdout, &what)
        }
        Client::H11 => {
            assert!(body.is_none(), "the h11 helper sends no body");
            let r = s
                .lab
                .h11_request(addr, 80, method, path, &[])
                .unwrap_or_else(|e| panic!("{what}: {e:#}"));
            assert!(r.h11_ok, "{what}: h11 could not parse the response: {r:?}");
            Reply {
                status: r.status.expect("h11_ok implies a status"),
                headers: r.headers,
                body: r.body,
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Shared assertions

/// The request reached the backend and the client got the backend's answer.
fn expect_allowed(s: &Setup, addr: IpAddr, method: &str, path: &str, body: Option<&str>) {
    let what = format!("{method} {path} over {}", family(addr));
    let mark = backend_mark(s);
    let r = request(s, Client::Curl, addr, method, path, body);
    let backend_body = format!("backend saw {method} {path}\n");
    assert_eq!(
        r.status, 200,
        "{what}: expected the backend's 200, got {r:?}"
    );
    if method == "HEAD" {
        assert_eq!(r.body, "", "{what}: HEAD answer has a body");
        assert_eq!(
            r.header("content-length"),
            [backend_body.len().to_string()],
            "{what}"
        );
    } else {
        assert_eq!(r.body, backend_body, "{what}: body is not the backend's");
    }
    let want = Recorded {
        method: method.into(),
        path: path.into(),
        version: "HTTP/1.1".into(),
    };
    assert_eq!(
        backend_since(s, mark),
        [want],
        "{what}: the backend should have recorded exactly this request"
    );
}

/// The client got a 405 with exactly `allow`, the backend never saw the
/// request, and the server side holds no connection on port 80 shortly after.
fn expect_rejected(s: &Setup, client: Client, addr: IpAddr, method: &str, path: &str, allow: &str) {
    let what = format!("{method} {path} over {} ({client:?})", family(addr));
    let mark = backend_mark(s);
    let r = request(s, client, addr, method, path, None);
    assert_eq!(r.status, 405, "{what}: expected 405, got {r:?}");
    assert_eq!(r.header("allow"), [allow], "{what}: Allow header");
    assert!(
        !allow.split(", ").any(|m| m.eq_ignore_ascii_case(method)),
        "{what}: the rejected method is listed in Allow: {allow}"
    );
    assert_server_let_go(s, &what);
    let seen = backend_since(s, mark);
    assert!(seen.is_empty(), "{what}: the backend received {seen:?}");
}

/// How many requests the backend has recorded so far.
fn backend_mark(s: &Setup) -> usize {
    s.backend.requests().expect("reading the backend log").len()
}

/// The requests the backend recorded after `mark`, oldest first.
fn backend_since(s: &Setup, mark: usize) -> Vec<Recorded> {
    let mut all = s.backend.requests().expect("reading the backend log");
    all.drain(..mark.min(all.len()));
    all
}

/// No ESTABLISHED connection on :80 in the server namespace, polled for a bounded time.
fn assert_server_let_go(s: &Setup, what: &str) {
    let deadline = Instant::now() + CONNECTION_GONE_WITHIN;
    loop {
        let open = s.lab.server_established(80).expect("running ss");
        if open.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {CONNECTION_GONE_WITHIN:?} after the 405 the server still holds {open:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Strict IMF-fixdate shape (`Sun, 06 Nov 1994 08:49:37 GMT`), a real date,
/// and close to now.
fn assert_imf_fixdate(value: &str, what: &str) {
    let b = value.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    let shape = b.len() == 29
        && ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"].contains(&&value[..3])
        && &value[3..5] == ", "
        && digits(5..7)
        && b[7] == b' '
        && [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ]
        .contains(&&value[8..11])
        && b[11] == b' '
        && digits(12..16)
        && b[16] == b' '
        && digits(17..19)
        && b[19] == b':'
        && digits(20..22)
        && b[22] == b':'
        && digits(23..25)
        && &value[25..] == " GMT";
    assert!(
        value.is_ascii() && shape,
        "{what}: Date {value:?} is not an IMF-fixdate"
    );
    let when =
        httpdate::parse_http_date(value).unwrap_or_else(|e| panic!("{what}: Date {value:?}: {e}"));
    let skew = match when.duration_since(SystemTime::now()) {
        Ok(ahead) => ahead,
        Err(behind) => behind.duration(),
    };
    assert!(
        skew < Duration::from_secs(60),
        "{what}: Date {value:?} is {skew:?} off the clock"
    );
}

/// Byte-level checks on a 405 that h11 would let slip (bare LF, folding, ...).
fn assert_strict_405(s: &Setup, addr: IpAddr, method: &str, path: &str, allow: &str) {
    let what = format!("{method} {path} over {} (raw bytes)", family(addr));
    let r = s
        .lab
        .h11_request(addr, 80, method, path, &[])
        .unwrap_or_else(|e| panic!("{what}: {e:#}"));
    let raw = String::from_utf8_lossy(&r.raw).into_owned();
    assert!(
        r.h11_ok,
        "{what}: h11 rejected the response ({:?}): {raw:?}",
        r.h11_error
    );
    assert_eq!(
        r.eof, "clean",
        "{what}: connection did not end with a clean FIN: {raw:?}"
    );
    assert_eq!(
        raw.matches("\r\n\r\n").count(),
        1,
        "{what}: want exactly one CRLFCRLF: {raw:?}"
    );
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let head_bytes = format!("{head}\r\n");
    for (i, c) in head_bytes.char_indices() {
        match c {
            '\n' => assert!(
                i > 0 && head_bytes.as_bytes()[i - 1] == b'\r',
                "{what}: bare LF in head: {raw:?}"
            ),
            '\r' => assert!(
                head_bytes.as_bytes().get(i + 1) == Some(&b'\n'),
                "{what}: bare CR in head: {raw:?}"
            ),
            _ => {}
        }
    }
    let mut lines = head.split("\r\n");
    assert_eq!(
        lines.next(),
        Some("HTTP/1.1 405 Method Not Allowed"),
        "{what}: status line"
    );
    let mut headers = Vec::new();
    for line in lines {
        assert!(
            !line.starts_with([' ', '\t']),
            "{what}: folded header line {line:?}"
        );
        let (name, value) = line
            .split_once(':')
            .unwrap_or_else(|| panic!("{what}: header line without a colon: {line:?}"));
        assert!(
            !name.is_empty() && name.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-'),
            "{what}: bad header name {name:?}"
        );
        headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
    }
    let one = |name: &str| -> &str {
        let v: Vec<&str> = headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(
            v.len(),
            1,
            "{what}: want exactly one {name} header, have {v:?} in {raw:?}"
        );
        v[0]
    };
    assert_eq!(one("allow"), allow, "{what}: Allow");
    assert!(
        !allow.split(", ").any(|m| m.eq_ignore_ascii_case(method)),
        "{what}: Allow lists the rejected method"
    );
    if method.eq_ignore_ascii_case("HEAD") {
        // RFC 9110 §9.3.2: no content in a response to HEAD.
        assert!(
            body.is_empty() && !headers.iter().any(|(n, _)| n == "content-length"),
            "{what}: a response to HEAD with content or Content-Length: {raw:?}"
        );
    } else {
        assert_eq!(
            one("content-length"),
            body.len().to_string(),
            "{what}: Content-Length vs body {body:?}"
        );
    }
    assert!(
        !one("content-type").is_empty(),
        "{what}: empty Content-Type"
    );
    assert!(
        one("connection").eq_ignore_ascii_case("close"),
        "{what}: Connection must be close"
    );
    assert_imf_fixdate(one("date"), &what);
    // h11 read the same thing we did.
    assert_eq!(r.status, Some(405), "{what}");
    assert_eq!(
        r.headers, headers,
        "{what}: h11's view of the headers differs from the raw bytes"
    );
    assert_eq!(r.body, body, "{what}");
}

fn api(s: &Setup, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    s.daemon
        .api(method, path, body)
        .unwrap_or_else(|e| panic!("API {method} {path}: {e:#}"))
}

fn api_json(s: &Setup, method: &str, path: &str) -> Value {
    let (status, body) = api(s, method, path, None);
    assert_eq!(status, 200, "API {method} {path}: {body}");
    serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("API {method} {path}: not JSON ({e}): {body}"))
}

/// The rules as `(path, methods)`, sorted by path.
fn rules(s: &Setup) -> Vec<(String, Vec<String>)> {
    let v = api_json(s, "GET", "/v1/rules");
    let list = v["rules"]
        .as_array()
        .unwrap_or_else(|| panic!("GET /v1/rules: no `rules` array: {v}"));
    let mut out: Vec<(String, Vec<String>)> = list
        .iter()
        .map(|r| {
            let path = r["path"]
                .as_str()
                .unwrap_or_else(|| panic!("rule without path: {r}"))
                .to_owned();
            let methods = r["methods"]
                .as_array()
                .unwrap_or_else(|| panic!("rule without methods: {r}"))
                .iter()
                .map(|m| {
                    m.as_str()
                        .unwrap_or_else(|| panic!("method is not a string: {r}"))
                        .to_owned()
                })
                .collect();
            (path, methods)
        })
        .collect();
    out.sort();
    out
}

fn counter(s: &Setup, name: &str) -> u64 {
    let v = api_json(s, "GET", "/v1/stats");
    let n = v
        .get("counters")
        .and_then(|c| c.get(name))
        .or_else(|| v.get(name));
    n.and_then(Value::as_u64).unwrap_or_else(|| {
        panic!("GET /v1/stats: no numeric `{name}` under `counters` or at top level: {v}")
    })
}

fn rejected_counter(s: &Setup) -> u64 {
    counter(s, "rejected")
}

/// `POST /v1/rules` with `rule` (JSON); it must be accepted.
fn add_rule(s: &Setup, rule: &str) {
    let (st, body) = api(s, "POST", "/v1/rules", Some(rule));
    assert_2xx(st, &body, &format!("POST /v1/rules {rule}"));
}

fn assert_2xx(status: u16, body: &str, what: &str) {
    assert!(
        (200..300).contains(&status),
        "{what}: expected 2xx, got {status}: {body}"
    );
}

// ---------------------------------------------------------------------------
// Tests

#[test]
fn allowed_requests_reach_the_backend() {
    let Some(s) = setup("allowed_requests_reach_the_backend") else {
        return;
    };
    for addr in s.lab.server_addrs() {
        expect_allowed(&s, addr, "GET", "/api/items", None);
        expect_allowed(&s, addr, "POST", "/api/items", Some("name=widget&size=3"));
        expect_allowed(&s, addr, "HEAD", "/admin", None);
        expect_allowed(&s, addr, "DELETE", "/unruled", None);
    }
}

#[test]
fn disallowed_requests_get_405_and_never_reach_the_backend() {
    let Some(s) = setup("disallowed_requests_get_405_and_never_reach_the_backend") else {
        return;
    };
    for addr in s.lab.server_addrs() {
        for (client, method, path, allow) in [
            (Client::Curl, "DELETE", "/api/items", ITEMS_ALLOW),
            (Client::Curl, "PUT", "/admin", ADMIN_ALLOW),
            (Client::H11, "delete", "/api/items", ITEMS_ALLOW),
        ] {
            expect_rejected(&s, client, addr, method, path, allow);
        }
        // Control: the backend is up and logging, so "not recorded" above means something.
        expect_allowed(&s, addr, "GET", "/api/items", None);
    }
}

#[test]
fn the_405_is_byte_exact_and_ends_with_a_clean_close() {
    let Some(s) = setup("the_405_is_byte_exact_and_ends_with_a_clean_close") else {
        return;
    };
    add_rule(&s, r#"{"path":"/upload","methods":["POST"]}"#);
    for addr in s.lab.server_addrs() {
        assert_strict_405(&s, addr, "DELETE", "/api/items", ITEMS_ALLOW);
        assert_strict_405(&s, addr, "PUT", "/admin", ADMIN_ALLOW);
        assert_strict_405(&s, addr, "delete", "/api/items", ITEMS_ALLOW);
        assert_strict_405(&s, addr, "HEAD", "/upload", "POST");
    }
}

#[test]
fn curl_sees_no_reset_on_a_405() {
    let Some(s) = setup("curl_sees_no_reset_on_a_405") else {
        return;
    };
    for addr in s.lab.server_addrs() {
        for (method, path) in [("DELETE", "/api/items"), ("PUT", "/admin")] {
            let what = format!("curl -v -X {method} {path} over {}", family(addr));
            let out = s
                .lab
                .client_cmd("curl")
                .args(["-v", "-sS", "-g", "--max-time", "5", "-X", method])
                .arg(url(addr, path))
                .output()
                .expect("running curl");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success(),
                "{what}: curl exited {}: {stderr}",
                out.status
            );
            assert!(
                stderr.contains("< HTTP/1.1 405 Method Not Allowed"),
                "{what}: {stderr}"
            );
            for bad in ["reset", "Recv failure", "transfer closed"] {
                assert!(
                    !stderr.contains(bad),
                    "{what}: curl reports {bad:?}: {stderr}"
                );
            }
            assert!(!out.stdout.is_empty(), "{what}: the 405 has no body");
        }
    }
}

/// A client that reuses its port right after a refused request (the backend's side of the old
/// connection was reset) gets a new connection that works: the refused connection's state does
/// not swallow the new one.
#[test]
fn a_client_port_reused_after_a_405_starts_afresh() {
    let Some(s) = setup("a_client_port_reused_after_a_405_starts_afresh") else {
        return;
    };
    for (i, addr) in s.lab.server_addrs().into_iter().enumerate() {
        let port = (41000 + i).to_string();
        // The 405's connection ends with the responder's close, so the client's port is free
        // at once (no TIME_WAIT on the client's side); the 200's is not, so it comes last.
        for (method, status) in [("DELETE", "405"), ("DELETE", "405"), ("GET", "200")] {
            let what = format!("{method} /api/items from port {port} over {}", family(addr));
            let out = s
                .lab
                .client_cmd("curl")
                .args([
                    "-sS",
                    "-g",
                    "--max-time",
                    "5",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                ])
                .args(["--local-port", &port, "-X", method])
                .arg(url(addr, "/api/items"))
                .output()
                .expect("running curl");
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                status,
                "{what}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[test]
fn api_adds_lists_and_deletes_a_rule() {
    let Some(s) = setup("api_adds_lists_and_deletes_a_rule") else {
        return;
    };
    for addr in s.lab.server_addrs() {
        add_rule(&s, r#"{"path":"/new","methods":["GET"]}"#);
        expect_rejected(&s, Client::Curl, addr, "DELETE", "/new", "GET, HEAD");
        let listed = rules(&s);
        assert!(
            listed.iter().any(|(p, m)| p == "/new"
                && m.iter().any(|m| m == "GET")
                && !m.iter().any(|m| m == "DELETE")),
            "GET /v1/rules does not list /new with GET: {listed:?}"
        );

        let (st, body) = api(&s, "DELETE", "/v1/rules?path=/new", None);
        assert!(
            st == 200 || st == 204,
            "DELETE /v1/rules?path=/new: {st} {body}"
        );
        assert!(
            !rules(&s).iter().any(|(p, _)| p == "/new"),
            "/new still listed after DELETE"
        );
        expect_allowed(&s, addr, "DELETE", "/new", None);

        let (st, body) = api(&s, "DELETE", "/v1/rules?path=/nope", None);
        assert_eq!(st, 404, "DELETE of a rule that does not exist: {body}");
    }
}

#[test]
fn api_put_replaces_the_whole_policy() {
    let Some(s) = setup("api_put_replaces_the_whole_policy") else {
        return;
    };
    let (st, body) = api(
        &s,
        "PUT",
        "/v1/rules",
        Some(r#"{"rules":[{"path":"/only","methods":["POST"]}]}"#),
    );
    assert_2xx(st, &body, "PUT /v1/rules");
    assert_eq!(
        rules(&s),
        [("/only".to_owned(), vec!["POST".to_owned()])],
        "rules after PUT"
    );
    for addr in s.lab.server_addrs() {
        expect_allowed(&s, addr, "DELETE", "/api/items", None);
        expect_allowed(&s, addr, "PUT", "/admin", None);
        expect_rejected(&s, Client::Curl, addr, "GET", "/only", "POST");
    }
}

#[test]
fn api_rejects_bad_bodies_and_keeps_the_policy() {
    let Some(s) = setup("api_rejects_bad_bodies_and_keeps_the_policy") else {
        return;
    };
    let before = rules(&s);
    let one = |r: Value| json!(r).to_string();
    let all = |r: Value| json!({ "rules": [r] }).to_string();
    let bad_rules = [
        (
            "path without a leading /",
            json!({"path": "x", "methods": ["GET"]}),
        ),
        (
            "method with a space",
            json!({"path": "/x", "methods": ["GE T"]}),
        ),
        ("empty method list", json!({"path": "/x", "methods": []})),
    ];
    let mut cases: Vec<(String, &str, String)> = vec![
        ("truncated JSON".into(), "POST", "{".into()),
        ("truncated JSON".into(), "PUT", "{".into()),
    ];
    for (why, rule) in bad_rules {
        cases.push((why.into(), "POST", one(rule.clone())));
        cases.push((why.into(), "PUT", all(rule)));
    }
    for (why, method, body) in &cases {
        let (st, resp) = api(&s, method, "/v1/rules", Some(body));
        let what = format!("{method} /v1/rules with {why} ({body})");
        assert_eq!(st, 400, "{what}: {resp}");
        let v: Value = serde_json::from_str(&resp)
            .unwrap_or_else(|e| panic!("{what}: error body is not JSON ({e}): {resp}"));
        assert!(
            v["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{what}: no `error` string in {resp}"
        );
    }
    assert_eq!(rules(&s), before, "a rejected API call changed the rules");
    for addr in s.lab.server_addrs() {
        expect_rejected(&s, Client::Curl, addr, "DELETE", "/api/items", ITEMS_ALLOW);
        expect_allowed(&s, addr, "DELETE", "/x", None);
    }
}

#[test]
fn stats_count_rejections() {
    let Some(s) = setup("stats_count_rejections") else {
        return;
    };
    for addr in s.lab.server_addrs() {
        let before = rejected_counter(&s);
        expect_allowed(&s, addr, "GET", "/api/items", None);
        assert_eq!(
            rejected_counter(&s),
            before,
            "an allowed request over {} counted as rejected",
            family(addr)
        );
        expect_rejected(&s, Client::Curl, addr, "DELETE", "/api/items", ITEMS_ALLOW);
        let after = rejected_counter(&s);
        assert!(
            after > before,
            "rejected stayed at {after} after a 405 over {}",
            family(addr)
        );
    }
    // The responder's answers are not the server's bytes: the egress view of the responses
    // never lost track because of one.
    assert_eq!(
        counter(&s, "reply_lost"),
        0,
        "reply_lost counted after allowed requests and 405s"
    );
}

/// A victim connection sends a POST's head and part of its body, other connections fill
/// the connection table so the victim's state is evicted, then the victim sends the rest of
/// the body with a disallowed request hidden behind it. Read as a request boundary, those
/// bytes would pass (they are not HTTP) and the backend would read the DELETE; the filter
/// answers 503 and resets the backend instead, and counts it. The kernel's LRU is
/// approximate (entries in use get a second chance; free entries move between per-CPU lists
/// in batches), so the victim may survive one round of filling: then the filter still follows
/// its body and refuses the DELETE with 405. The client runs on one CPU (the veth pair makes
/// every handshake on the sender's CPU, and a CPU evicts only its own new entries or shared
/// ones), tries up to eight times and reports what each victim read.
const EVICTION_CLIENT: &str = r#"
import json, os, socket, sys, time
host, fill = sys.argv[1], int(sys.argv[2])
# One CPU for every handshake: a new entry waits on the list of the CPU that made it, which
# only that CPU evicts from, so a victim made on the other CPU would outlive any filling.
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
def conn():
    s = socket.create_connection((host, 80), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s
def read_all(s):
    out = b""
    try:
        while True:
            b = s.recv(65536)
            if not b:
                break
            out += b
    except OSError as e:
        out += ("<%s>" % type(e).__name__).encode()
    return out
smuggled = b"DELETE /admin HTTP/1.1\r\nHost: x\r\n\r\n"
rest = b"b" * 50
attempts = []
for attempt in range(8):
    victim = conn()
    victim.sendall(b"POST /api/items HTTP/1.1\r\nHost: x\r\nContent-Length: 60\r\n\r\n" + b"a" * 10)
    time.sleep(0.2)
    # Each of the others is looked up as often as the victim was, and all stay open.
    others = []
    for _ in range(fill):
        o = conn()
        o.sendall(b"GET /api/items HTTP/1.1\r\nHost: x\r\n\r\n")
        o.recv(65536)
        others.append(o)
    time.sleep(0.2)
    victim.sendall(rest + smuggled)
    got = read_all(victim)
    victim.close()
    for o in others:
        o.close()
    attempts.append(got.decode("latin-1"))
    if got.startswith(b"HTTP/1.1 503"):
        break
    time.sleep(0.5)
time.sleep(0.2)
fresh = conn()
fresh.sendall(b"GET /api/items HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
fresh_read = read_all(fresh)
print(json.dumps({"attempts": attempts, "fresh": fresh_read.decode("latin-1")}))
"#;

#[test]
fn a_connection_whose_state_was_evicted_is_refused() {
    let Some(s) = setup_with(
        "a_connection_whose_state_was_evicted_is_refused",
        &["--max-connections", "64", "--adopt-window", "0"],
    ) else {
        return;
    };
    let metric = |name: &str| -> u64 {
        let (status, text) = api(&s, "GET", "/metrics", None);
        assert_eq!(status, 200, "GET /metrics: {text}");
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("/metrics has no {name}:\n{text}"))
    };
    let full = "filterd_packets_total{reason=\"conn_table_full\"}";
    let tracked = "filterd_map_entries{map=\"connections\"}";
    for addr in s.lab.server_addrs() {
        let mark = backend_mark(&s);
        let before = metric(full);
        let out = lab::run(s.lab.client_cmd("python3").args([
            "-c",
            EVICTION_CLIENT,
            &addr.to_string(),
            "300",
        ]))
        .unwrap_or_else(|e| panic!("eviction client over {}: {e:#}", family(addr)));
        let v: Value = serde_json::from_str(out.trim()).expect("the client's JSON");
        let attempts: Vec<&str> = v["attempts"]
            .as_array()
            .expect("attempts")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        for got in &attempts {
            // Evicted: 503 and the close. Not evicted: the POST's 200, then the 405.
            let evicted = got.starts_with("HTTP/1.1 503 Service Unavailable\r\n")
                && got.contains("Connection: close");
            let followed = got.starts_with("HTTP/1.1 200")
                && got.contains("HTTP/1.1 405 Method Not Allowed\r\nAllow: GET, HEAD\r\n");
            assert!(
                evicted || followed,
                "over {}: a victim read {got:?}",
                family(addr)
            );
        }
        assert!(
            attempts
                .last()
                .is_some_and(|got| got.starts_with("HTTP/1.1 503")),
            "over {}: no victim was evicted in {} attempts: {attempts:?}",
            family(addr),
            attempts.len()
        );
        let seen = backend_since(&s, mark);
        assert!(
            seen.iter().all(|r| r.method != "DELETE"),
            "over {}: the backend read {seen:?}",
            family(addr)
        );
        assert!(
            metric(full) > before,
            "over {}: conn_table_full was not counted",
            family(addr)
        );
        let fresh = v["fresh"].as_str().unwrap();
        assert!(
            fresh.starts_with("HTTP/1.1 200") || fresh.starts_with("HTTP/1.0 200"),
            "over {}: a new connection after the eviction got {fresh:?}",
            family(addr)
        );
        // Closed connections gave their state back (the server's last packets may trail).
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let n = metric(tracked);
            if n <= 2 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "over {}: {n} connections still tracked after every client closed",
                family(addr)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The backend's answer to `GET path` (tests/py/backend.py), as the client must read it.
fn backend_ok_body(method: &str, path: &str) -> String {
    format!("backend saw {method} {path}\n")
}

/// Splits what the client read into (status, head, body) per response, framed by
/// `Content-Length` (a response without one runs to the end).
fn split_responses(raw: &[u8]) -> Vec<(u16, String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut rest = raw;
    while let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&rest[..end]).into_owned();
        let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        let len = head
            .lines()
            .find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())?
            })
            .unwrap_or(rest.len() - end - 4);
        let body_end = (end + 4 + len).min(rest.len());
        out.push((status, head, rest[end + 4..body_end].to_vec()));
        rest = &rest[body_end..];
    }
    out
}

/// A real client (the kernel's TCP stack) pipelines a disallowed request behind an allowed one
/// the backend is slow to answer, or sends it while the answer is on its way, or behind an
/// `Upgrade` the backend refuses: the client reads the allowed response intact, then the 405
/// and a clean close; the backend never sees the disallowed request. An `Upgrade` the backend
/// accepts (101) makes the connection a tunnel.
#[test]
fn refusals_wait_for_earlier_responses_and_upgrades_for_their_answer() {
    let Some(s) = setup("refusals_wait_for_earlier_responses_and_upgrades_for_their_answer") else {
        return;
    };
    let slow = b"GET /slow HTTP/1.1\r\nHost: lab\r\n\r\n".as_slice();
    let slow_upgrade =
        b"GET /slow HTTP/1.1\r\nHost: lab\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
            .as_slice();
    let delete = b"DELETE /admin HTTP/1.1\r\nHost: lab\r\n\r\n".as_slice();
    let cases: [(&str, &[&[u8]], Duration); 3] = [
        (
            "pipelined behind a slow response",
            &[&[slow, delete].concat()],
            Duration::ZERO,
        ),
        (
            "sent while the slow response is on its way",
            &[slow, delete],
            Duration::from_millis(100),
        ),
        (
            "pipelined behind a refused upgrade",
            &[&[slow_upgrade, delete].concat()],
            Duration::ZERO,
        ),
    ];
    for addr in s.lab.server_addrs() {
        for (name, parts, delay) in cases {
            let what = format!("{name} over {}", family(addr));
            let mark = backend_mark(&s);
            let (raw, eof) = s
                .lab
                .raw_exchange(addr, 80, delay, parts)
                .unwrap_or_else(|e| panic!("{what}: {e:#}"));
            let got = split_responses(&raw);
            let statuses: Vec<u16> = got.iter().map(|r| r.0).collect();
            assert_eq!(
                statuses,
                [200, 405],
                "{what}: the client read {:?}",
                String::from_utf8_lossy(&raw)
            );
            assert_eq!(
                got[0].2,
                backend_ok_body("GET", "/slow").as_bytes(),
                "{what}: the allowed response is intact"
            );
            assert!(
                got[1].1.contains("\r\nAllow: GET, HEAD"),
                "{what}: the 405 names the allowed methods: {}",
                got[1].1
            );
            assert_eq!(eof, "clean", "{what}: the connection ends with a FIN");
            let seen: Vec<(String, String)> = backend_since(&s, mark)
                .into_iter()
                .map(|r| (r.method, r.path))
                .collect();
            assert_eq!(
                seen,
                [("GET".to_owned(), "/slow".to_owned())],
                "{what}: the backend saw only the allowed request"
            );
        }
        // Accepted: the bytes after the 101 are no longer HTTP/1.1 and pass.
        let what = format!("upgrade accepted over {}", family(addr));
        let mark = backend_mark(&s);
        let upgrade =
            b"GET /upgrade HTTP/1.1\r\nHost: lab\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
        let (raw, _) = s
            .lab
            .raw_exchange(addr, 80, Duration::from_millis(100), &[upgrade, delete])
            .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        assert!(
            raw.starts_with(b"HTTP/1.1 101 "),
            "{what}: {:?}",
            String::from_utf8_lossy(&raw)
        );
        let seen: Vec<(String, String)> = backend_since(&s, mark)
            .into_iter()
            .map(|r| (r.method, r.path))
            .collect();
        assert_eq!(
            seen,
            [
                ("GET".to_owned(), "/upgrade".to_owned()),
                ("TUNNEL".to_owned(), "DELETE /admin HTTP/1.1".to_owned())
            ],
            "{what}: the tunnel's bytes reach the backend"
        );
    }
}

/// Opens N connections to HOST:80 (one after the other, 2 ms apart: the backend's accept
/// queue is 5 deep, and a dropped SYN costs a second), then writes one refused request on each as fast as it can (a burst of
/// refusals the responder answers in batches), and reads every connection to its end.
/// Prints, per connection in order, the bytes it read (latin-1) and how it ended: `clean`
/// (EOF), `reset` or `timeout`.
const BURST_CLIENT: &str = r#"
import json, selectors, socket, sys, time
host, n = sys.argv[1], int(sys.argv[2])
requests = [r.encode() for r in sys.argv[3:]]
conns = []
for i in range(n):
    s = socket.create_connection((host, 80), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conns.append(s)
    time.sleep(0.002)
for i, s in enumerate(conns):
    s.sendall(requests[i % len(requests)])
sel = selectors.DefaultSelector()
got = [b""] * n
end = ["timeout"] * n
for i, s in enumerate(conns):
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ, i)
deadline = time.monotonic() + 15
open_ = n
while open_ and time.monotonic() < deadline:
    for key, _ in sel.select(timeout=0.5):
        i = key.data
        try:
            b = key.fileobj.recv(65536)
        except BlockingIOError:
            continue
        except ConnectionResetError:
            b, end[i] = None, "reset"
        if b:
            got[i] += b
            continue
        if b == b"":
            end[i] = "clean"
        sel.unregister(key.fileobj)
        open_ -= 1
for s in conns:
    s.close()
print(json.dumps([{"raw": g.decode("latin-1"), "end": e} for g, e in zip(got, end)]))
"#;

/// Refusals in connections opened together in a burst: every one gets its byte-exact answer
/// and a clean close, none is lost, and every counter counts each one exactly once.
#[test]
fn a_burst_of_refusals_is_answered_in_full() {
    let Some(s) = setup("a_burst_of_refusals_is_answered_in_full") else {
        return;
    };
    add_rule(&s, r#"{"path":"/upload","methods":["POST"]}"#);
    /// Connections per address family.
    const N: usize = 160;
    let items_body = |m: &str| {
        format!("405 Method Not Allowed: {m} is not allowed here. Allowed: GET, HEAD, POST.\n")
    };
    let head = |allow: &str, date: &str| {
        format!("HTTP/1.1 405 Method Not Allowed\r\nAllow: {allow}\r\nDate: {date}\r\nContent-Type: text/plain; charset=utf-8\r\n")
    };
    let with_body = |allow: &str, date: &str, body: String| {
        format!(
            "{}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            head(allow, date),
            body.len()
        )
    };
    // (request, the answer with a given Date, its rule and method in /metrics)
    type Expect<'a> = Box<dyn Fn(&str) -> String + 'a>;
    let cases: [(&str, Expect, &str, &str); 4] = [
        (
            "DELETE /api/items HTTP/1.1\r\nHost: t\r\n\r\n",
            Box::new(|d: &str| with_body(ITEMS_ALLOW, d, items_body("DELETE"))),
            "/api/items",
            "DELETE",
        ),
        (
            "PUT /admin HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n",
            Box::new(|d: &str| {
                let body = format!(
                    "405 Method Not Allowed: PUT is not allowed here. Allowed: {ADMIN_ALLOW}.\n"
                );
                with_body(ADMIN_ALLOW, d, body)
            }),
            "/admin",
            "PUT",
        ),
        (
            "HEAD /upload HTTP/1.1\r\nHost: t\r\n\r\n",
            // RFC 9110 §9.3.2: no content, and no Content-Length, in an answer to HEAD.
            Box::new(|d: &str| format!("{}Connection: close\r\n\r\n", head("POST", d))),
            "/upload",
            "HEAD",
        ),
        (
            "delete /api/items HTTP/1.1\r\nHost: t\r\n\r\n",
            Box::new(|d: &str| with_body(ITEMS_ALLOW, d, items_body("this method"))),
            "/api/items",
            "(other)",
        ),
    ];
    let metric_line = |rule: &str, method: &str| {
        format!("filterd_rejections_total{{rule=\"{rule}\",match=\"exact\",method=\"{method}\"}}")
    };
    let metric = |line: &str| -> u64 {
        let (status, text) = api(&s, "GET", "/metrics", None);
        assert_eq!(status, 200, "GET /metrics: {text}");
        text.lines()
            .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
            .unwrap_or(0)
    };
    let series: Vec<String> = cases.iter().map(|c| metric_line(c.2, c.3)).collect();
    let before_hits: Vec<u64> = series.iter().map(|l| metric(l)).collect();
    let (rejected, sent, failed) = (
        rejected_counter(&s),
        counter(&s, "responses_sent"),
        counter(&s, "responses_failed"),
    );
    let mark = backend_mark(&s);
    for addr in s.lab.server_addrs() {
        let what = format!("a burst of {N} refusals over {}", family(addr));
        let mut cmd = s.lab.client_cmd("python3");
        cmd.args(["-c", BURST_CLIENT, &addr.to_string(), &N.to_string()]);
        cmd.args(cases.iter().map(|c| c.0));
        let out = lab::run(&mut cmd).unwrap_or_else(|e| panic!("{what}: {e:#}"));
        let v: Value = serde_json::from_str(out.trim()).expect("the burst client's JSON");
        let conns = v.as_array().expect("one entry per connection");
        assert_eq!(conns.len(), N, "{what}");
        for (i, c) in conns.iter().enumerate() {
            let (raw, end) = (c["raw"].as_str().unwrap(), c["end"].as_str().unwrap());
            let (request, expect, ..) = &cases[i % cases.len()];
            let what = format!("{what}, connection {i} ({:?})", request.lines().next());
            assert_eq!(end, "clean", "{what}: no clean close after {raw:?}");
            let date = raw
                .split("\r\n")
                .find_map(|l| l.strip_prefix("Date: "))
                .unwrap_or_else(|| panic!("{what}: no Date in {raw:?}"));
            assert_imf_fixdate(date, &what);
            assert_eq!(raw, expect(date), "{what}: not the byte-exact answer");
        }
    }
    // Every refusal counted once: by the kernel, by the responder, by rule and method.
    let total = 2 * N as u64;
    let deadline = Instant::now() + Duration::from_secs(3);
    while counter(&s, "responses_sent") < sent + total && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(rejected_counter(&s) - rejected, total, "rejected");
    assert_eq!(
        counter(&s, "responses_sent") - sent,
        total,
        "responses_sent"
    );
    assert_eq!(counter(&s, "responses_failed"), failed, "responses_failed");
    for (k, line) in series.iter().enumerate() {
        let want = (0..N).filter(|i| i % cases.len() == k).count() as u64 * 2;
        assert_eq!(metric(line) - before_hits[k], want, "{line}");
    }
    let seen = backend_since(&s, mark);
    assert!(seen.is_empty(), "the backend received {seen:?}");
}

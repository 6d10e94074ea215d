//! What the kernel decides for a request, computed on the host: the same stream parser
//! (`filter_common::stream`), the same canonicalizer (`filter_common::canon`) and the policy's
//! rules looked up as the kernel looks them up (an exact rule, else the longest prefix rule,
//! else the default). [`decide`] is what the kernel fixture tier holds the real classifier to
//! (`tests/tests/kernel.rs`, `host_and_kernel_agree_on_generated_requests`), and what
//! `filterctl explain` and `GET /v1/explain` answer with, so an explanation cannot drift from
//! the kernel without that test failing.
//!
//! It decides one request head on a fresh connection: the request line, the method overrides
//! in its headers, its framing. It knows nothing of TCP (ordering, holds, the connection
//! table) and touches no map.

use filter_common::stream::{flag, Ev, Stream};
use filter_common::{Method, MethodSet, Reason, PATH_MAX, PREFIX_MAX};
use serde::Serialize;

use crate::policy::{Mode, OptionsMode, Oversize, PathsMode, Policy, Rule, RuleKey};

/// What the daemon adds to the policy.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// `filterd --dry-run`: every rule and the default behave as monitor rules.
    pub dry_run: bool,
}

/// The decision on one request, as the kernel reaches it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Every reason the kernel counts for the request (sorted by code, as the kernel fixture
    /// tier reads them): its verdict, and a second one where a header refuses or monitors it
    /// after the request line passed (a method override, framing).
    pub reasons: Vec<Reason>,
    /// The request line's method, as the kernel's table names it.
    pub method: Option<Method>,
    /// The request line's path as read (no query), when the line got that far.
    pub raw_path: Option<Vec<u8>>,
    /// The canonical path, or the canonicalizer's refusal.
    pub canonical: Option<Result<String, Reason>>,
    /// The rule that matched; `None` with a canonical path: the default.
    pub rule: Option<RuleKey>,
    /// The methods the matched rule (or the default) allows: the `Allow` header of a 405.
    pub allow: Option<MethodSet>,
    /// The method a method-override header named, if one did.
    pub override_method: Option<Method>,
}

/// The rule for a canonical path, as the kernel finds it: an exact rule, else the longest
/// prefix rule (its LPM key is the path's first `PREFIX_MAX` bytes; prefix rule paths end in
/// `/`), else none.
pub fn rule_for<'p>(policy: &'p Policy, canonical: &str) -> Option<&'p Rule> {
    if let Some(r) = policy.rules.get(&RuleKey::exact(canonical)) {
        return Some(r);
    }
    prefix_rule_for(policy, canonical.as_bytes())
}

/// The longest prefix rule above `path` (canonical bytes, or a prefix of the path as sent: a
/// reading other than the canonical one is looked up in the prefix rules only), as the
/// kernel's LPM lookup finds it.
pub fn prefix_rule_for<'p>(policy: &'p Policy, path: &[u8]) -> Option<&'p Rule> {
    let window = &path[..path.len().min(PREFIX_MAX)];
    (0..window.len())
        .rev()
        .filter(|&i| window[i] == b'/')
        .find_map(|i| {
            let candidate = std::str::from_utf8(&window[..=i]).ok()?;
            policy.rules.get(&RuleKey::prefix(candidate))
        })
}

/// The kernel's decision for `payload`, the first bytes of a fresh connection (a request
/// head, possibly more), under `policy`.
///
/// In `paths = "normalize"` a path the canonicalizer changes is judged under each of its
/// readings (`filter_common::canon::readings`): the canonical path under its rule, the path as
/// sent and the path with `;` read as text under the prefix rules above the point where they
/// leave the canonical one. The request passes only if every reading allows its method; it is
/// only reported when every reading that refuses it is under a monitor rule.
pub fn decide(policy: &Policy, opts: &Options, payload: &[u8]) -> Decision {
    let mut d = Decision {
        reasons: Vec::new(),
        method: None,
        raw_path: None,
        canonical: None,
        rule: None,
        allow: None,
        override_method: None,
    };
    let mut s = Stream::new(0, flag::SYN);
    let mut raw = [0u8; PATH_MAX];
    // What the method overrides of the current request are checked against, and whether a
    // violation there only counts (monitor).
    let mut allow = MethodSet::ANY;
    let mut monitor = false;
    let done = |mut d: Decision| {
        d.reasons.sort_by_key(|r| *r as u32);
        d.reasons.dedup();
        d
    };
    // (allows, allows in enforce mode): what a reading's rule, or the default, says.
    let verdict_of = |rule: Option<&Rule>| match rule {
        _ if opts.dry_run => (
            rule.map_or(policy.default.effective(), Rule::effective),
            MethodSet::ANY,
        ),
        Some(r) if r.mode == Mode::Monitor => (r.effective(), MethodSet::ANY),
        Some(r) => (r.effective(), r.effective()),
        None => (policy.default.effective(), policy.default.effective()),
    };
    for &b in payload {
        if s.in_bulk() {
            // A body: the kernel counts it in bulk, undecided.
            break;
        }
        match s.step(b, &mut raw) {
            Ev::More | Ev::Bulk | Ev::Await => {}
            Ev::Tunnel => {
                d.reasons.push(Reason::Tunnel);
                break;
            }
            Ev::Override => {
                let m = s.override_method();
                s.note_override(m);
                d.override_method = Some(m);
                if !allow.contains(m) {
                    if monitor {
                        d.reasons.push(Reason::Monitored);
                    } else {
                        d.reasons.push(Reason::Rejected);
                        return done(d);
                    }
                }
            }
            Ev::Fail(r) => {
                let oversize = r == Reason::LineTooLong || r == Reason::HeadersTooLarge;
                if oversize && policy.oversize == Oversize::Pass {
                    d.reasons.push(Reason::PathTooLong);
                } else {
                    d.reasons.push(r);
                }
                return done(d);
            }
            Ev::Decide => {
                let method = s.take_method();
                d.method = Some(method);
                let n = s.line.path_len();
                d.raw_path = Some(raw[..n].to_vec());
                let mut path = [0u8; PATH_MAX];
                let (canon, readings) = if n == 0 {
                    (Vec::new(), None)
                } else {
                    match filter_common::canon::readings(&raw[..n], &mut path) {
                        Ok(r) => (path[..r.len].to_vec(), Some(r)),
                        Err(e) => {
                            d.canonical = Some(Err(e));
                            d.reasons.push(Reason::BadPath);
                            return done(d);
                        }
                    }
                };
                let changed = readings.and_then(|r| r.changed);
                let canon_text = String::from_utf8_lossy(&canon).into_owned();
                if policy.paths == PathsMode::Strict && changed.is_some() {
                    // Not in normal form: answered 400 in `strict`.
                    d.canonical = Some(Ok(canon_text));
                    d.reasons.push(Reason::BadPath);
                    return done(d);
                }
                let rule = rule_for(policy, &canon_text);
                d.canonical = Some(Ok(canon_text));
                d.rule = rule.map(Rule::key);
                let (mut a, mut enforced) = verdict_of(rule);
                let others = [
                    changed.map(|p| raw[..p].to_vec()),
                    readings
                        .and_then(|r| r.params_at)
                        .map(|p| canon[..p].to_vec()),
                ];
                for other in others.into_iter().flatten() {
                    let (oa, oe) = verdict_of(prefix_rule_for(policy, &other));
                    a = MethodSet(a.0 & oa.0);
                    enforced = MethodSet(enforced.0 & oe.0);
                }
                d.allow = Some(a);
                allow = a;
                monitor = enforced == MethodSet::ANY;
                if method == Method::Options {
                    // Never 405 for OPTIONS (CORS preflight): passed, or answered 204 + Allow.
                    // A method override on it is checked like on any other request.
                    if rule.is_some() && policy.options == OptionsMode::Answer {
                        d.reasons.push(Reason::OptionsAnswered);
                        return done(d);
                    }
                    d.reasons.push(Reason::OptionsPassed);
                    continue;
                }
                if !enforced.contains(method) {
                    d.reasons.push(Reason::Rejected);
                    return done(d);
                } else if !a.contains(method) {
                    d.reasons.push(Reason::Monitored);
                } else if rule.is_some() {
                    d.reasons.push(Reason::AllowedByRule);
                } else {
                    d.reasons.push(Reason::AllowedByDefault);
                }
            }
        }
    }
    if d.reasons.is_empty() {
        // The payload ended before a request was decided.
        d.reasons.push(Reason::MidStream);
    }
    done(d)
}

/// What the request's client sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The request reaches the backend.
    Pass,
    /// It reaches the backend, but would have been refused: counted and logged (a monitor
    /// rule, `--dry-run`).
    Monitor,
    /// The backend is reset and the client answered `answer`.
    Refuse,
}

/// The status the responder answers a refusal with.
pub fn answer_of(r: Reason) -> Option<u16> {
    Some(match r {
        Reason::Rejected => 405,
        Reason::OptionsAnswered => 204,
        Reason::BadPath | Reason::BadFraming | Reason::NotHttp => 400,
        Reason::LineTooLong => 414,
        Reason::HeadersTooLarge => 431,
        Reason::ConnTableFull => 503,
        _ => return None,
    })
}

/// The rule that matched, as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MatchedRule {
    pub path: String,
    #[serde(rename = "match")]
    pub kind: &'static str,
    pub mode: &'static str,
    /// The methods as the rule declares them.
    pub methods: Vec<&'static str>,
}

/// An explanation: the decision in an operator's terms (`GET /v1/explain`,
/// `filterctl explain`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Explanation {
    pub method: String,
    pub target: String,
    /// The path the request line carries, as read (query and fragment dropped).
    pub path: Option<String>,
    /// The path the rules are looked up with.
    pub canonical: Option<String>,
    /// Why the path is refused (400), when it is.
    pub path_refused: Option<String>,
    /// The rule that matched; `None` with a canonical path: the policy's default.
    pub rule: Option<MatchedRule>,
    /// The methods allowed there (the `Allow` header of a 405); `["*"]`: any.
    pub allow: Vec<&'static str>,
    /// The method a method-override header named.
    pub override_method: Option<&'static str>,
    /// What the kernel counts (`filterd_packets_total` reasons).
    pub reasons: Vec<&'static str>,
    pub verdict: Verdict,
    /// The status the client is answered with when refused (405, 400, 414, 431, 204).
    pub answer: Option<u16>,
    /// The decision in one sentence.
    pub summary: String,
}

/// Why `request` cannot be explained.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExplainError {
    #[error("{what} {value:?}: must not contain CR or LF (one request line is explained)")]
    LineBreak { what: &'static str, value: String },
    #[error("method: empty")]
    EmptyMethod,
    #[error("header {0:?}: must be `Name: value`")]
    BadHeader(String),
}

/// The request head [`explain`] decides on: `METHOD TARGET HTTP/1.1`, a `Host`, `headers`.
pub fn request_head(
    method: &str,
    target: &str,
    headers: &[String],
) -> Result<Vec<u8>, ExplainError> {
    for (what, value) in [("method", method), ("target", target)] {
        if value.contains(['\r', '\n']) {
            return Err(ExplainError::LineBreak {
                what,
                value: value.to_owned(),
            });
        }
    }
    if method.is_empty() {
        return Err(ExplainError::EmptyMethod);
    }
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: filterd-explain\r\n");
    for h in headers {
        if h.contains(['\r', '\n']) {
            return Err(ExplainError::LineBreak {
                what: "header",
                value: h.clone(),
            });
        }
        if h.split_once(':').is_none_or(|(n, _)| n.trim().is_empty()) {
            return Err(ExplainError::BadHeader(h.clone()));
        }
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    Ok(head.into_bytes())
}

/// Explain what the filter does with `method target` (and `headers`) under `policy`.
pub fn explain(
    policy: &Policy,
    opts: &Options,
    method: &str,
    target: &str,
    headers: &[String],
) -> Result<Explanation, ExplainError> {
    let head = request_head(method, target, headers)?;
    let d = decide(policy, opts, &head);
    let refusal = d.reasons.iter().copied().find(|r| answer_of(*r).is_some());
    let verdict = match refusal {
        Some(_) => Verdict::Refuse,
        None if d.reasons.contains(&Reason::Monitored) => Verdict::Monitor,
        None => Verdict::Pass,
    };
    let answer = refusal.and_then(answer_of);
    let rule = d
        .rule
        .as_ref()
        .and_then(|k| policy.rules.get(k))
        .map(|r| MatchedRule {
            path: r.path.clone(),
            kind: r.kind.as_str(),
            mode: match r.mode {
                Mode::Enforce => "enforce",
                Mode::Monitor => "monitor",
            },
            methods: r.methods.iter().map(Method::as_str).collect(),
        });
    let allow = match d.allow {
        None => Vec::new(),
        Some(a) if a == MethodSet::ANY => vec!["*"],
        Some(a) => a.iter().map(Method::as_str).collect(),
    };
    let path_refused = match (&d.canonical, &d.raw_path) {
        (Some(Err(e)), Some(raw)) => Some(path_refusal(raw, *e)),
        (Some(Ok(c)), Some(_)) if refusal == Some(Reason::BadPath) => Some(format!(
            "not in normal form (paths = \"strict\"; its normal form is {c}, which paths = \"normalize\" would judge)"
        )),
        _ => None,
    };
    let mut e = Explanation {
        method: method.to_owned(),
        target: target.to_owned(),
        path: d
            .raw_path
            .as_ref()
            .map(|p| String::from_utf8_lossy(p).into_owned()),
        canonical: d.canonical.as_ref().and_then(|c| c.clone().ok()),
        path_refused,
        rule,
        allow,
        override_method: d.override_method.map(Method::as_str),
        reasons: d.reasons.iter().map(|r| r.name()).collect(),
        verdict,
        answer,
        summary: String::new(),
    };
    e.summary = summary(&e, refusal, opts);
    Ok(e)
}

fn summary(e: &Explanation, refusal: Option<Reason>, opts: &Options) -> String {
    let matched = match &e.rule {
        Some(r) => format!(
            "rule {} ({}{})",
            r.path,
            r.kind,
            if r.mode == "monitor" { ", monitor" } else { "" }
        ),
        None => "no rule: the default".into(),
    };
    let allows = if e.allow == ["*"] {
        "any method".to_owned()
    } else {
        e.allow.join(", ")
    };
    let what = e.override_method.map_or(e.method.clone(), |m| {
        format!("{m} (a method-override header on {})", e.method)
    });
    match refusal {
        Some(Reason::Rejected) => format!("405: {matched} allows {allows}, not {what}"),
        Some(Reason::OptionsAnswered) => format!("204: OPTIONS on a governed path is answered with Allow: {allows} (options = \"answer\")"),
        Some(Reason::BadPath) => format!("400: the path is refused: {}", e.path_refused.as_deref().unwrap_or("an ambiguous encoding")),
        Some(Reason::BadFraming) => "400: the request's framing is one backends disagree on".into(),
        Some(Reason::NotHttp) => "400: not an HTTP/1.x request line the filter reads (a method is a token of letters and digits; the version HTTP/1.0 or HTTP/1.1)".into(),
        Some(Reason::LineTooLong) => "414: the request line or path is longer than the filter inspects (8 KiB line, 1 KiB path)".into(),
        Some(Reason::HeadersTooLarge) => "431: the header block is longer than the filter inspects (16 KiB)".into(),
        Some(r) => format!("refused ({})", r.name()),
        None if e.verdict == Verdict::Monitor => format!(
            "passes, would be refused 405 ({}): {matched} allows {allows}, not {what}",
            if opts.dry_run { "--dry-run" } else { "monitor rule" }
        ),
        None if e.reasons.contains(&Reason::PathTooLong.name()) => "passes undecided: longer than the filter inspects, and oversize = \"pass\"".into(),
        None if e.reasons.contains(&Reason::Tunnel.name()) => format!("passes: {matched} allows {what}; the connection is no longer followed once the backend switches protocols"),
        None if e.reasons.contains(&Reason::OptionsPassed.name()) => "passes: OPTIONS is never refused 405 (CORS preflight)".into(),
        None => format!("passes: {matched} allows {allows}"),
    }
}

/// Why the canonicalizer refused `raw`: the first place where a prefix of it is refused,
/// named. (The canonicalizer itself only says `bad_path`.)
pub fn path_refusal(raw: &[u8], reason: Reason) -> String {
    if reason == Reason::PathTooLong {
        return format!(
            "{} bytes: longer than the {PATH_MAX} the filter inspects",
            raw.len()
        );
    }
    let mut out = [0u8; PATH_MAX];
    // The shortest prefix the canonicalizer refuses, not cutting an escape in two.
    let cut = (1..=raw.len())
        .filter(|&k| {
            let tail = &raw[..k];
            !(tail.ends_with(b"%") || (tail.len() >= 2 && tail[tail.len() - 2] == b'%'))
                || k == raw.len()
        })
        .find(|&k| filter_common::canon::canonicalize(&raw[..k], &mut out).is_err());
    let Some(k) = cut else {
        return "an ambiguous encoding".into();
    };
    let before = &raw[..k];
    let what = if before.ends_with(b"\\") {
        "a backslash (some backends read it as '/')".to_owned()
    } else if before.len() >= 3 && before[before.len() - 3] == b'%' {
        let esc = String::from_utf8_lossy(&before[before.len() - 3..]).to_ascii_uppercase();
        match esc.as_str() {
            "%2F" => {
                "%2F, an encoded '/' (backends disagree on whether it separates segments)".into()
            }
            "%5C" => "%5C, an encoded '\\' (some backends read it as '/')".into(),
            "%00" => "%00, an encoded NUL".into(),
            e if !e[1..].bytes().all(|b| b.is_ascii_hexdigit()) => {
                format!("{e}, an invalid escape")
            }
            e => format!("{e}, an escape the filter refuses"),
        }
    } else if before.ends_with(b"%") || (before.len() >= 2 && before[before.len() - 2] == b'%') {
        "an escape cut short".into()
    } else if before.ends_with(b"..") || before.ends_with(b"../") {
        "'..' that climbs above the root (or further back than the filter follows)".into()
    } else {
        format!(
            "'{}'",
            String::from_utf8_lossy(&before[before.len() - 1..]).escape_debug()
        )
    };
    format!("at byte {}: {what}", k)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse_toml;

    /// A policy in `paths = "normalize"`: the examples below are about canonicalization.
    fn policy() -> Policy {
        parse_toml(
            "paths = \"normalize\"\n\
             default = [\"GET\", \"POST\"]\n\
             [[rules]]\npath = \"/admin\"\nmethods = [\"GET\"]\n\
             [[rules]]\npath = \"/api/\"\nmatch = \"prefix\"\nmethods = [\"GET\", \"POST\"]\n\
             [[rules]]\npath = \"/api/v2/\"\nmatch = \"prefix\"\nmethods = [\"GET\", \"DELETE\"]\n\
             [[rules]]\npath = \"/beta/\"\nmatch = \"prefix\"\nmethods = [\"GET\"]\nmode = \"monitor\"\n",
        )
        .unwrap()
    }

    fn ex(method: &str, target: &str, headers: &[&str]) -> Explanation {
        let h: Vec<String> = headers.iter().map(|s| s.to_string()).collect();
        explain(&policy(), &Options::default(), method, target, &h).unwrap()
    }

    #[test]
    fn explains_the_path_the_rule_the_allow_set_and_the_answer() {
        // The example: decoded, dot segments resolved, the query dropped.
        let e = ex("DELETE", "/api/%61dmin/../x?y", &[]);
        assert_eq!(e.canonical.as_deref(), Some("/api/x"));
        assert_eq!(
            e.rule.as_ref().map(|r| (r.path.as_str(), r.kind)),
            Some(("/api/", "prefix"))
        );
        assert_eq!(e.allow, ["GET", "HEAD", "POST"]);
        assert_eq!((e.verdict, e.answer), (Verdict::Refuse, Some(405)));
        assert_eq!(e.reasons, ["rejected"]);
        assert_eq!(
            e.summary,
            "405: rule /api/ (prefix) allows GET, HEAD, POST, not DELETE"
        );

        // The longest prefix rule wins; an exact rule beats prefixes.
        let e = ex("DELETE", "/api/v2/things", &[]);
        assert_eq!(
            (e.rule.unwrap().path.as_str(), e.verdict),
            ("/api/v2/", Verdict::Pass)
        );
        let e = ex("POST", "//%61dmin", &[]);
        assert_eq!(e.rule.as_ref().unwrap().kind, "exact");
        assert_eq!(e.answer, Some(405));
        // The default.
        let e = ex("PUT", "/elsewhere", &[]);
        assert_eq!((e.rule.is_none(), e.answer), (true, Some(405)));
        assert!(e.summary.contains("no rule: the default"), "{}", e.summary);
    }

    #[test]
    fn explains_strict_refusing_paths_not_in_normal_form() {
        let mut strict = policy();
        strict.paths = PathsMode::Strict;
        let e = explain(
            &strict,
            &Options::default(),
            "GET",
            "/api/%61dmin/../x",
            &[],
        )
        .unwrap();
        assert_eq!((e.verdict, e.answer), (Verdict::Refuse, Some(400)));
        assert_eq!(e.canonical.as_deref(), Some("/api/x"));
        assert!(e.summary.contains("not in normal form"), "{}", e.summary);
        // A path in normal form is judged as sent.
        let e = explain(&strict, &Options::default(), "DELETE", "/api/x", &[]).unwrap();
        assert_eq!(e.answer, Some(405));
    }

    #[test]
    fn explains_refused_targets() {
        let e = ex("GET", "/a%2Fb", &[]);
        assert_eq!(
            (e.verdict, e.answer, e.canonical.clone()),
            (Verdict::Refuse, Some(400), None)
        );
        assert_eq!(e.path_refused.as_deref(), Some("at byte 5: %2F, an encoded '/' (backends disagree on whether it separates segments)"));
        let e = ex("GET", "/a/../..", &[]);
        assert!(e.path_refused.unwrap().contains("climbs above the root"));
        let e = ex("GET", "/a%zz", &[]);
        assert!(e.path_refused.unwrap().contains("%ZZ, an invalid escape"));
        let e = ex("GET", &format!("/{}", "a".repeat(2000)), &[]);
        assert_eq!(e.answer, Some(414));
        // Methods are case-sensitive: `get` is a method no rule allows.
        let e = ex("get", "/admin", &[]);
        assert_eq!((e.answer, e.reasons.clone()), (Some(405), vec!["rejected"]));
        let e = ex("G@T", "/admin", &[]);
        assert_eq!((e.answer, e.reasons.clone()), (Some(400), vec!["not_http"]));
    }

    #[test]
    fn explains_overrides_monitor_rules_options_and_dry_run() {
        let e = ex("POST", "/api/items", &["X-HTTP-Method-Override: DELETE"]);
        assert_eq!(e.override_method, Some("DELETE"));
        assert!(
            e.summary
                .ends_with("not DELETE (a method-override header on POST)"),
            "{}",
            e.summary
        );
        assert_eq!(
            (e.answer, e.reasons.clone()),
            (Some(405), vec!["allowed_by_rule", "rejected"])
        );
        let e = ex("DELETE", "/beta/x", &[]);
        assert_eq!((e.verdict, e.answer), (Verdict::Monitor, None));
        assert!(
            e.summary
                .starts_with("passes, would be refused 405 (monitor rule)"),
            "{}",
            e.summary
        );
        let e = ex("OPTIONS", "/admin", &[]);
        assert_eq!(
            (e.verdict, e.reasons.clone()),
            (Verdict::Pass, vec!["options_passed"])
        );
        let dry = explain(&policy(), &Options { dry_run: true }, "PUT", "/admin", &[]).unwrap();
        assert_eq!(dry.verdict, Verdict::Monitor);
        assert!(dry.summary.contains("--dry-run"));
        let mut answer = policy();
        answer.options = OptionsMode::Answer;
        let e = explain(&answer, &Options::default(), "OPTIONS", "/admin", &[]).unwrap();
        assert_eq!(e.answer, Some(204));
        let e = ex(
            "POST",
            "/api/x",
            &["Content-Length: 3", "Transfer-Encoding: chunked"],
        );
        assert_eq!(e.answer, Some(400));
    }

    #[test]
    fn a_request_line_cannot_be_smuggled_in() {
        assert!(matches!(
            explain(
                &policy(),
                &Options::default(),
                "GET",
                "/a HTTP/1.1\r\nX: y",
                &[]
            ),
            Err(ExplainError::LineBreak { what: "target", .. })
        ));
        assert!(explain(
            &policy(),
            &Options::default(),
            "GET",
            "/",
            &["nocolon".into()]
        )
        .is_err());
    }
}

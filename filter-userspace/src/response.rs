//! The HTTP responses the responder sends on a client's connection, and the cache that builds
//! each distinct one once a second ([`AnswerCache`]).
//!
//! What an answer says depends on the kernel's reason ([`Answer`]), the path's `Allow` set, the
//! refused method (named in a 405's body; `HEAD` gets no content) and the second (`Date`). It
//! does not depend on the client's HTTP version: every answer is `HTTP/1.1`, the version this
//! server conforms to (RFC 9112 §2.3), to HTTP/1.0 clients too. Everything that differs per
//! connection (addresses, ports, sequence numbers, checksums) is in the frame's headers
//! ([`crate::packet`]), not here.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use filter_common::{csum, Method, MethodSet};

/// What the responder answers, by the kernel's reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Answer {
    /// `405 Method Not Allowed` with `Allow` (RFC 9110 §15.5.6).
    MethodNotAllowed,
    /// `204 No Content` with `Allow`, for OPTIONS on a governed path (`options = "answer"`).
    OptionsNoContent,
    /// `400 Bad Request`: a request the filter does not forward: a target backends read
    /// differently or (`paths = "strict"`) not in normal form, ambiguous framing, bytes that
    /// are not HTTP/1.x.
    BadRequest,
    /// `414 URI Too Long`: the request line runs past the inspection bound.
    UriTooLong,
    /// `431 Request Header Fields Too Large`: the header block runs past the inspection bound.
    HeadersTooLarge,
    /// `503 Service Unavailable`: the filter lost the connection's state (the connection table
    /// was full); a new connection works.
    Unavailable,
}

impl Answer {
    /// Every answer, in the order [`Answer::index`] numbers them.
    pub const ALL: [Answer; 6] = [
        Answer::MethodNotAllowed,
        Answer::OptionsNoContent,
        Answer::BadRequest,
        Answer::UriTooLong,
        Answer::HeadersTooLarge,
        Answer::Unavailable,
    ];

    /// Its place in [`Answer::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The status code.
    pub fn status(self) -> u16 {
        match self {
            Answer::MethodNotAllowed => 405,
            Answer::OptionsNoContent => 204,
            Answer::BadRequest => 400,
            Answer::UriTooLong => 414,
            Answer::HeadersTooLarge => 431,
            Answer::Unavailable => 503,
        }
    }

    fn status_line(self) -> &'static str {
        match self {
            Answer::MethodNotAllowed => "HTTP/1.1 405 Method Not Allowed",
            Answer::OptionsNoContent => "HTTP/1.1 204 No Content",
            Answer::BadRequest => "HTTP/1.1 400 Bad Request",
            Answer::UriTooLong => "HTTP/1.1 414 URI Too Long",
            Answer::HeadersTooLarge => "HTTP/1.1 431 Request Header Fields Too Large",
            Answer::Unavailable => "HTTP/1.1 503 Service Unavailable",
        }
    }
}

/// The complete response for `answer`. Every one closes the connection (`Connection: close`;
/// the responder sends FIN right after it). `allow` is listed in canonical order where the
/// status calls for `Allow`; `method` names the rejected method in the 405 body.
pub fn build(answer: Answer, allow: MethodSet, method: Method, now: SystemTime) -> Vec<u8> {
    let allow_value = allow
        .iter()
        .map(Method::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    let body = match answer {
        Answer::MethodNotAllowed if allow_value.is_empty() => {
            "405 Method Not Allowed: this resource allows no method.\n".to_owned()
        }
        Answer::MethodNotAllowed => {
            let m = if method == Method::Other {
                "this method"
            } else {
                method.as_str()
            };
            format!("405 Method Not Allowed: {m} is not allowed here. Allowed: {allow_value}.\n")
        }
        Answer::OptionsNoContent => String::new(),
        Answer::BadRequest => {
            "400 Bad Request: the request's target or framing is ambiguous, or not in normal form.\n"
                .to_owned()
        }
        Answer::UriTooLong => "414 URI Too Long\n".to_owned(),
        Answer::HeadersTooLarge => "431 Request Header Fields Too Large\n".to_owned(),
        Answer::Unavailable => {
            "503 Service Unavailable: this connection can no longer be filtered; open a new one.\n"
                .to_owned()
        }
    };
    let mut head = format!("{}\r\n", answer.status_line());
    if matches!(answer, Answer::MethodNotAllowed | Answer::OptionsNoContent) {
        head += &format!("Allow: {allow_value}\r\n");
    }
    head += &format!("Date: {}\r\n", httpdate::fmt_http_date(now));
    // RFC 9110 §9.3.2: a response to HEAD carries no content (a client reading one after it
    // would take it for garbage); it may leave out Content-Length (§8.6), which would count
    // the content a GET would get.
    let content = method != Method::Head;
    // RFC 9110 §8.6: no Content-Length (and no content) in a 204.
    if answer != Answer::OptionsNoContent {
        head += "Content-Type: text/plain; charset=utf-8\r\n";
        if content {
            head += &format!("Content-Length: {}\r\n", body.len());
        }
    }
    head += "Connection: close\r\n\r\n";
    if content {
        head += &body;
    }
    head.into_bytes()
}

/// `405 Method Not Allowed` for a request whose method `method` the path does not allow.
pub fn method_not_allowed(allow: MethodSet, method: Method, now: SystemTime) -> Vec<u8> {
    build(Answer::MethodNotAllowed, allow, method, now)
}

/// An answer built for the current second: its bytes and their checksum contribution.
#[derive(Debug)]
pub struct Prebuilt {
    pub bytes: Vec<u8>,
    /// `csum::add(0, &bytes)`: the answer's part of a TCP checksum, for a payload that starts at
    /// an even offset of the segment (it does: the header has no options).
    pub sum: u32,
}

impl Prebuilt {
    fn new(bytes: Vec<u8>) -> Prebuilt {
        let sum = csum::add(0, &bytes);
        Prebuilt { bytes, sum }
    }
}

/// Where an answer of the current batch is in an [`AnswerCache`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AnswerId(u32);

/// The answers built in the current second, each distinct (answer, `Allow`, method) once: a
/// flood of refusals formats a handful of answers a second instead of one per request, and
/// the checksum of their bytes with them. At most `kept` are kept a second; one past that is
/// built for the batch that needs it and dropped at the next [`AnswerCache::begin`] (a client
/// that cycles through `Allow` sets and methods cannot make the cache grow).
///
/// Ids stay valid from one `begin` to the next: the responder takes an id per event of a
/// batch and reads the bytes when it sends the batch.
#[derive(Debug)]
pub struct AnswerCache {
    kept: usize,
    /// The second (Unix time) the answers' `Date` names.
    second: u64,
    now: SystemTime,
    ids: HashMap<(Answer, u32, u8), AnswerId>,
    /// The kept answers (`ids.len()` of them), then this batch's spares.
    built: Vec<Prebuilt>,
}

/// Distinct (answer, `Allow`, method) triples kept per second: far more than a policy's
/// distinct `Allow` sets times the methods clients use, and a bound on what a client that
/// cycles through them can make the responder hold.
pub const ANSWERS_KEPT: usize = 256;

impl Default for AnswerCache {
    fn default() -> AnswerCache {
        AnswerCache::new(ANSWERS_KEPT)
    }
}

impl AnswerCache {
    pub fn new(kept: usize) -> AnswerCache {
        AnswerCache {
            kept,
            second: 0,
            now: UNIX_EPOCH,
            ids: HashMap::with_capacity(kept),
            built: Vec::with_capacity(kept),
        }
    }

    /// Start a batch whose answers are dated `now`: a new second drops the previous second's
    /// answers; the previous batch's spares go either way.
    pub fn begin(&mut self, now: SystemTime) {
        let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if second != self.second {
            self.second = second;
            self.ids.clear();
        }
        self.now = now;
        self.built.truncate(self.ids.len());
    }

    /// The answer for (`answer`, `allow`, `method`) in this batch, built if the second has not
    /// needed it yet.
    pub fn get(&mut self, answer: Answer, allow: MethodSet, method: Method) -> AnswerId {
        let key = (answer, allow.0, method as u8);
        if let Some(&id) = self.ids.get(&key) {
            return id;
        }
        let id = AnswerId(self.built.len() as u32);
        self.built
            .push(Prebuilt::new(build(answer, allow, method, self.now)));
        if self.ids.len() < self.kept {
            self.ids.insert(key, id);
        }
        id
    }

    /// The bytes of an answer this batch took.
    pub fn bytes(&self, id: AnswerId) -> &Prebuilt {
        &self.built[id.0 as usize]
    }

    /// Answers kept for the current second.
    pub fn kept(&self) -> usize {
        self.ids.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn head_and_body(raw: &[u8]) -> (String, String) {
        let text = String::from_utf8(raw.to_vec()).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        (head.to_owned(), body.to_owned())
    }

    #[test]
    fn a_405_is_well_formed_and_lists_allow_in_canonical_order() {
        let allow = MethodSet::EMPTY
            .with(Method::Post)
            .with(Method::Get)
            .with(Method::Head);
        let now = UNIX_EPOCH + Duration::from_secs(1_784_000_000);
        let raw = method_not_allowed(allow, Method::Delete, now);
        let (head, body) = head_and_body(&raw);
        let lines: Vec<_> = head.split("\r\n").collect();
        assert_eq!(lines[0], "HTTP/1.1 405 Method Not Allowed");
        assert!(lines.contains(&"Allow: GET, HEAD, POST"));
        assert!(lines.contains(&"Connection: close"));
        assert!(lines.contains(&"Content-Type: text/plain; charset=utf-8"));
        assert!(lines.contains(&format!("Date: {}", httpdate::fmt_http_date(now)).as_str()));
        assert!(lines.contains(&format!("Content-Length: {}", body.len()).as_str()));
        assert!(!head.contains('\n') || head.matches('\n').count() == head.matches("\r\n").count());
        assert_eq!(
            String::from_utf8(raw.clone())
                .unwrap()
                .matches("\r\n\r\n")
                .count(),
            1
        );
        assert!(body.contains("DELETE"));
    }

    #[test]
    fn other_answers_are_well_formed() {
        let allow = MethodSet::EMPTY.with(Method::Get).with(Method::Head);
        for (answer, status) in [
            (Answer::OptionsNoContent, "HTTP/1.1 204 No Content"),
            (Answer::BadRequest, "HTTP/1.1 400 Bad Request"),
            (Answer::UriTooLong, "HTTP/1.1 414 URI Too Long"),
            (
                Answer::HeadersTooLarge,
                "HTTP/1.1 431 Request Header Fields Too Large",
            ),
            (Answer::Unavailable, "HTTP/1.1 503 Service Unavailable"),
        ] {
            let raw = build(answer, allow, Method::Options, SystemTime::now());
            let (head, body) = head_and_body(&raw);
            let lines: Vec<_> = head.split("\r\n").collect();
            assert_eq!(lines[0], status);
            assert!(lines.contains(&"Connection: close"));
            if answer == Answer::OptionsNoContent {
                assert!(lines.contains(&"Allow: GET, HEAD"));
                assert!(
                    body.is_empty() && !head.contains("Content-Length"),
                    "204 has no content"
                );
            } else {
                assert!(!head.contains("Allow:"));
                assert!(lines.contains(&format!("Content-Length: {}", body.len()).as_str()));
            }
        }
    }

    #[test]
    fn answers_to_head_have_no_content() {
        let allow = MethodSet::EMPTY.with(Method::Post);
        for answer in [
            Answer::MethodNotAllowed,
            Answer::OptionsNoContent,
            Answer::BadRequest,
            Answer::UriTooLong,
            Answer::HeadersTooLarge,
            Answer::Unavailable,
        ] {
            let raw = build(answer, allow, Method::Head, SystemTime::now());
            let (head, body) = head_and_body(&raw);
            assert!(body.is_empty(), "{answer:?} to HEAD: content {body:?}");
            assert!(!head.contains("Content-Length"), "{answer:?}: {head}");
            assert!(head.contains("Connection: close"), "{answer:?}: {head}");
            if answer == Answer::MethodNotAllowed {
                assert!(head.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"));
                assert!(head.split("\r\n").any(|l| l == "Allow: POST"));
            }
        }
    }

    #[test]
    fn every_answer_has_its_place_and_its_status() {
        for (i, answer) in Answer::ALL.into_iter().enumerate() {
            assert_eq!(answer.index(), i);
            let raw = build(answer, MethodSet::EMPTY, Method::Get, SystemTime::now());
            let want = format!("HTTP/1.1 {} ", answer.status());
            assert!(raw.starts_with(want.as_bytes()), "{answer:?}");
        }
    }

    #[test]
    fn an_empty_allow_is_still_sent() {
        let raw = method_not_allowed(MethodSet::EMPTY, Method::Other, SystemTime::now());
        let (head, _) = head_and_body(&raw);
        assert!(head.split("\r\n").any(|l| l == "Allow: "));
    }

    #[test]
    fn the_cache_builds_each_answer_once_a_second_and_it_is_what_build_makes() {
        let mut cache = AnswerCache::default();
        let t = UNIX_EPOCH + Duration::from_secs(1_784_000_000);
        let items = MethodSet::EMPTY.with(Method::Get).with(Method::Post);
        let admin = MethodSet::EMPTY.with(Method::Get);
        let cases = [
            (Answer::MethodNotAllowed, items, Method::Delete),
            (Answer::MethodNotAllowed, items, Method::Put),
            (Answer::MethodNotAllowed, admin, Method::Delete),
            (Answer::MethodNotAllowed, items, Method::Head),
            (Answer::BadRequest, items, Method::Delete),
        ];
        let mut first = Vec::new();
        for later in [Duration::ZERO, Duration::from_millis(999)] {
            cache.begin(t + later);
            let ids: Vec<_> = cases
                .iter()
                .map(|&(answer, allow, method)| cache.get(answer, allow, method))
                .collect();
            for (&(answer, allow, method), &id) in cases.iter().zip(&ids) {
                let want = build(answer, allow, method, t);
                assert_eq!(cache.bytes(id).bytes, want);
                assert_eq!(cache.bytes(id).sum, csum::add(0, &want));
            }
            if first.is_empty() {
                first = ids;
            } else {
                assert_eq!(ids, first, "the same second reuses what it built");
            }
        }
        assert_eq!(cache.kept(), cases.len());
        // The next second: built again, with its own Date.
        let next = t + Duration::from_secs(1);
        cache.begin(next);
        let (answer, allow, method) = cases[0];
        let id = cache.get(answer, allow, method);
        assert_eq!(cache.bytes(id).bytes, build(answer, allow, method, next));
        assert_ne!(cache.bytes(id).bytes, build(answer, allow, method, t));
        assert_eq!(cache.kept(), 1);
    }

    #[test]
    fn the_cache_is_bounded_and_answers_past_the_bound_are_still_right() {
        let mut cache = AnswerCache::new(8);
        let t = UNIX_EPOCH + Duration::from_secs(1_784_000_000);
        cache.begin(t);
        let ids: Vec<_> = (0..20u32)
            .map(|allow| cache.get(Answer::MethodNotAllowed, MethodSet(allow), Method::Delete))
            .collect();
        // Every id of the batch reads its own answer, kept or spare.
        for (allow, id) in (0..20u32).zip(ids) {
            assert_eq!(
                cache.bytes(id).bytes,
                build(
                    Answer::MethodNotAllowed,
                    MethodSet(allow),
                    Method::Delete,
                    t
                )
            );
        }
        assert_eq!(cache.kept(), 8);
        // The next batch of the same second drops the spares and keeps the rest.
        cache.begin(t);
        assert_eq!(cache.built.len(), 8);
        let id = cache.get(Answer::MethodNotAllowed, MethodSet(15), Method::Delete);
        assert_eq!(
            cache.bytes(id).bytes,
            build(Answer::MethodNotAllowed, MethodSet(15), Method::Delete, t)
        );
        assert_eq!(cache.built.len(), 9);
    }
}

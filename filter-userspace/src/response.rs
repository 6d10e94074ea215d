//! The HTTP responses the responder sends on a client's connection.

use std::time::SystemTime;

use filter_common::{Method, MethodSet};

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

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
    fn an_empty_allow_is_still_sent() {
        let raw = method_not_allowed(MethodSet::EMPTY, Method::Other, SystemTime::now());
        let (head, _) = head_and_body(&raw);
        assert!(head.split("\r\n").any(|l| l == "Allow: "));
    }
}

//! The HTTP responses the responder sends on a client's connection.

use std::time::SystemTime;

use filter_common::{Method, MethodSet};

/// `405 Method Not Allowed` (RFC 9110 §15.5.6) for a request whose method `method` the path
/// does not allow. `Allow` lists exactly `allow`'s named methods in canonical order; the
/// connection closes after it, so `Connection: close`.
pub fn method_not_allowed(allow: MethodSet, method: Method, now: SystemTime) -> Vec<u8> {
    let allow_value = allow
        .iter()
        .map(Method::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    let body = if allow_value.is_empty() {
        "405 Method Not Allowed: this resource allows no method.\n".to_owned()
    } else {
        let m = if method == Method::Other {
            "this method"
        } else {
            method.as_str()
        };
        format!("405 Method Not Allowed: {m} is not allowed here. Allowed: {allow_value}.\n")
    };
    format!(
        "HTTP/1.1 405 Method Not Allowed\r\n\
         Allow: {allow_value}\r\n\
         Date: {date}\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {len}\r\n\
         Connection: close\r\n\
         \r\n\
         {body}",
        date = httpdate::fmt_http_date(now),
        len = body.len(),
    )
    .into_bytes()
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
    fn an_empty_allow_is_still_sent() {
        let raw = method_not_allowed(MethodSet::EMPTY, Method::Other, SystemTime::now());
        let (head, _) = head_and_body(&raw);
        assert!(head.split("\r\n").any(|l| l == "Allow: "));
    }
}

//! What a request passes before its handler: the bearer token on `auth` routes
//! ([`require_token`]), `Content-Type: application/json` on writes ([`json_writes`]), on TCP
//! listeners a `Host` that names the API ([`host_guard`]), and the time limit ([`timeout`]).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method as HttpMethod, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;

use super::{ApiError, AppState, REQUEST_TIMEOUT};

pub(super) async fn require_token(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let Some(want) = &state.0.token else {
        return next.run(req).await;
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(t) if crate::auth::constant_time_eq(t.as_bytes(), want.as_bytes()) => {
            next.run(req).await
        }
        _ => {
            let mut resp = ApiError(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token: send `Authorization: Bearer <token>` (the token is in filterd's --token-file)".into(),
            )
            .into_response();
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"filterd\""),
            );
            resp
        }
    }
}

/// Writes (`POST`, `PUT`) must say `Content-Type: application/json`: an HTML form cannot, so
/// a page in the operator's browser cannot post to the API behind its back (with `--no-auth`
/// there is no token to stop it).
pub(super) async fn json_writes(req: Request, next: Next) -> Response {
    if matches!(*req.method(), HttpMethod::POST | HttpMethod::PUT) {
        let ct = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let essence = ct.split(';').next().unwrap_or("").trim();
        if !essence.eq_ignore_ascii_case("application/json") {
            return ApiError(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "Content-Type: {:?}: writes take `Content-Type: application/json`",
                    ct
                ),
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// The `Host` values an API listener accepts: the address it listens on (`localhost` too on
/// loopback; any IP literal on a wildcard address), and the names given with `--api-host`.
/// A browser lured to a name that resolves to this host (DNS rebinding) sends that name, and
/// is refused with 421.
#[derive(Clone, Debug)]
pub struct AllowedHosts {
    port: u16,
    /// Lowercased `host` or `host:port` values.
    names: Vec<String>,
    /// Any IP literal (the API listens on 0.0.0.0 or ::).
    any_ip: bool,
}

impl AllowedHosts {
    pub fn new(listen: std::net::SocketAddr, extra: &[String]) -> AllowedHosts {
        let ip = listen.ip();
        let mut names = vec![match ip {
            std::net::IpAddr::V4(a) => a.to_string(),
            std::net::IpAddr::V6(a) => format!("[{a}]"),
        }];
        if ip.is_loopback() || ip.is_unspecified() {
            names.push("localhost".into());
        }
        names.extend(extra.iter().map(|n| n.to_ascii_lowercase()));
        AllowedHosts {
            port: listen.port(),
            names,
            any_ip: ip.is_unspecified(),
        }
    }

    /// Whether a request's `Host` names this listener.
    pub fn allows(&self, host: &str) -> bool {
        let host = host.trim().to_ascii_lowercase();
        let (name, port) = match host.rsplit_once(':') {
            Some((n, p))
                if !n.ends_with(':')
                    && (n.starts_with('[') == n.ends_with(']'))
                    && p.bytes().all(|b| b.is_ascii_digit()) =>
            {
                (n.to_owned(), p.parse::<u16>().ok())
            }
            _ => (host.clone(), None),
        };
        if port.is_some_and(|p| p != self.port) {
            return self.names.contains(&host);
        }
        if self.names.contains(&name) || self.names.contains(&host) {
            return true;
        }
        self.any_ip
            && name
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok()
    }
}

/// `router` answering only requests whose `Host` is in `allowed` (TCP listeners; the Unix
/// socket needs none: no browser reaches it).
pub fn host_guard(router: Router, allowed: AllowedHosts) -> Router {
    router.layer(middleware::from_fn_with_state(
        Arc::new(allowed),
        check_host,
    ))
}

async fn check_host(
    State(allowed): State<Arc<AllowedHosts>>,
    req: Request,
    next: Next,
) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    match host {
        Some(h) if allowed.allows(&h) => next.run(req).await,
        h => ApiError(
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "Host {:?} is not an address this API serves (it accepts {}); to reach it under another name, start filterd with --api-host NAME",
                h.unwrap_or_default(),
                allowed
                    .names
                    .iter()
                    .map(|n| format!("{n}:{}", allowed.port))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
        .into_response(),
    }
}

pub(super) async fn timeout(req: Request, next: Next) -> Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError(
            StatusCode::REQUEST_TIMEOUT,
            format!("the request took longer than {REQUEST_TIMEOUT:?}"),
        )
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    use crate::api::testing::*;
    use crate::api::{routes, OPENAPI_PATH};
    use crate::serve::Peer;

    #[tokio::test]
    async fn the_token_is_required_except_for_health_and_the_document() {
        let (app, _) = secured(None);
        for doc in routes() {
            let uri = if doc.method == "DELETE" {
                format!("{}?path=/a", doc.path)
            } else {
                doc.path.to_owned()
            };
            let body = if doc.request.is_some() {
                r#"{"rules":[]}"#
            } else {
                ""
            };
            for hdrs in [
                &[][..],
                &[("authorization", "Bearer wrong")][..],
                &[("authorization", "s3cret")][..],
            ] {
                let r = send(&app, doc.method, &uri, body, hdrs).await;
                if doc.auth {
                    assert_eq!(
                        r.status,
                        StatusCode::UNAUTHORIZED,
                        "{} {uri} {hdrs:?}",
                        doc.method
                    );
                    assert!(r.headers.contains_key(header::WWW_AUTHENTICATE));
                    assert!(r.json["error"].as_str().unwrap().contains("bearer token"));
                } else {
                    assert_eq!(r.status, StatusCode::OK, "{} {uri}", doc.method);
                }
            }
            let r = send(&app, doc.method, &uri, body, &[bearer()]).await;
            assert_ne!(r.status, StatusCode::UNAUTHORIZED, "{} {uri}", doc.method);
        }
        assert_eq!(
            send(&app, "GET", OPENAPI_PATH, "", &[]).await.status,
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn writes_need_json_and_say_who_made_them() {
        let (app, _) = app(false);
        for ct in [
            None,
            Some("application/x-www-form-urlencoded"),
            Some("text/plain"),
        ] {
            let mut req = Request::builder().method("POST").uri("/v1/rules");
            if let Some(ct) = ct {
                req = req.header("content-type", ct);
            }
            let req = req
                .body(Body::from(r#"{"path":"/a","methods":["GET"]}"#))
                .unwrap();
            let resp = app.clone().oneshot(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "{ct:?}");
        }
        let r = send(
            &app,
            "POST",
            "/v1/rules",
            r#"{"path":"/a","methods":["GET"]}"#,
            &[("content-type", "application/json; charset=utf-8")],
        )
        .await;
        assert_eq!(r.status, StatusCode::CREATED);
        // The peer the connection came from is the audit's `who`.
        let peer = Peer::Unix {
            uid: Some(0),
            pid: Some(42),
        };
        let req = Request::builder()
            .method("DELETE")
            .uri("/v1/rules?path=/a")
            .extension(peer)
            .body(Body::empty())
            .unwrap();
        assert_eq!(
            app.clone().oneshot(req).await.unwrap().status(),
            StatusCode::NO_CONTENT
        );
        let (_, st) = call(&app, "GET", "/v1/status", "").await;
        assert_eq!(
            st["last_change"]["who"],
            "uid 0 (pid 42) on the Unix socket"
        );
        assert_eq!(st["last_change"]["change"], "remove");
    }

    #[tokio::test]
    async fn the_host_must_be_the_address_served() {
        let (app, _) = app(false);
        let guarded = host_guard(
            app,
            AllowedHosts::new(
                "127.0.0.1:9405".parse().unwrap(),
                &["filterd.internal".into()],
            ),
        );
        for (host, ok) in [
            ("127.0.0.1:9405", true),
            ("localhost:9405", true),
            ("LOCALHOST:9405", true),
            ("filterd.internal:9405", true),
            ("filterd.internal", true),
            ("evil.example:9405", false),
            ("127.0.0.1:80", false),
            ("127.0.0.2:9405", false),
            ("", false),
        ] {
            let r = send(&guarded, "GET", "/healthz", "", &[("host", host)]).await;
            let want = if ok {
                StatusCode::OK
            } else {
                StatusCode::MISDIRECTED_REQUEST
            };
            assert_eq!(r.status, want, "Host: {host}");
        }
        let any = AllowedHosts::new("0.0.0.0:9405".parse().unwrap(), &[]);
        assert!(
            any.allows("10.1.2.3:9405")
                && any.allows("[fe80::1]:9405")
                && !any.allows("rebind.example:9405")
        );
        let v6 = AllowedHosts::new("[::1]:9405".parse().unwrap(), &[]);
        assert!(v6.allows("[::1]:9405") && v6.allows("localhost:9405") && !v6.allows("[::2]:9405"));
    }
}

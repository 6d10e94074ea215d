//! `GET /v1/events`: the live feed of refusals and monitor-mode hits ([`crate::events`]), as
//! JSON lines or as server-sent events.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState};
use crate::events::{Line, SubscribeError, HEARTBEAT};

pub(super) async fn events(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let hub = state.0.observer.events().ok_or_else(|| {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "this daemon has no event feed".into(),
        )
    })?;
    let sub = hub.subscribe().map_err(|e| match e {
        SubscribeError::Full | SubscribeError::Closed => {
            ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
    })?;
    let sse = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/event-stream"));
    let body = Body::from_stream(futures_util::stream::unfold(
        sub,
        move |mut sub| async move {
            let line = sub.next(HEARTBEAT).await?;
            Some((
                Ok::<Bytes, std::convert::Infallible>(render_line(&line, sse)),
                sub,
            ))
        },
    ));
    let content_type = if sse {
        "text/event-stream"
    } else {
        "application/x-ndjson"
    };
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response())
}

/// One line of the feed: a JSON line, or a server-sent event.
pub fn render_line(line: &Line, sse: bool) -> Bytes {
    let json = serde_json::to_string(line).expect("a feed line serializes");
    if !sse {
        return Bytes::from(json + "\n");
    }
    match line {
        Line::Heartbeat { .. } => Bytes::from_static(b": heartbeat\n\n"),
        Line::Lost { .. } => Bytes::from(format!("event: lost\ndata: {json}\n\n")),
        Line::Event(e) => Bytes::from(format!("event: {}\ndata: {json}\n\n", e.kind)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use axum::http::Request;
    use serde_json::{json, Value};
    use tower::ServiceExt;

    use crate::api::router;
    use crate::api::testing::*;
    use crate::events::EventHub;
    use crate::policy::Policy;

    #[tokio::test]
    async fn events_stream_as_json_lines_and_as_server_sent_events() {
        use futures_util::StreamExt as _;
        let hub = Arc::new(EventHub::default());
        let rec = Recorder {
            events: Some(hub.clone()),
            ..Recorder::default()
        };
        let app = router(AppState::new(Policy::default(), Box::new(rec)));
        let ev = crate::events::Event {
            kind: "rejected",
            time: "2026-12-06T08:00:00.000Z".into(),
            client: "10.0.0.1:5000".into(),
            method: "DELETE",
            path: "/admin".into(),
            rule: "/admin".into(),
            match_kind: "exact",
            reason: "rejected",
            answer: Some(405),
            result: "sent",
        };
        for sse in [false, true] {
            let mut req = Request::builder().uri("/v1/events");
            if sse {
                req = req.header("accept", "text/event-stream");
            }
            let resp = app
                .clone()
                .oneshot(req.body(Body::empty()).unwrap())
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            let ct = resp.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .to_owned();
            assert_eq!(
                ct,
                if sse {
                    "text/event-stream"
                } else {
                    "application/x-ndjson"
                }
            );
            let mut body = resp.into_body().into_data_stream();
            hub.publish(ev.clone());
            let chunk = body.next().await.unwrap().unwrap();
            let text = String::from_utf8_lossy(&chunk).into_owned();
            if sse {
                assert!(text.starts_with("event: rejected\ndata: {"), "{text}");
                assert!(text.ends_with("}\n\n"), "{text}");
            } else {
                let v: Value = serde_json::from_str(text.trim_end()).unwrap();
                assert_eq!(
                    (&v["client"], &v["answer"], &v["rule"]),
                    (&json!("10.0.0.1:5000"), &json!(405), &json!("/admin"))
                );
                assert!(text.ends_with('\n'));
            }
        }
        // Shutdown ends the feeds.
        let resp = app
            .clone()
            .oneshot(
                Request::builder()
                    .uri("/v1/events")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let mut body = resp.into_body().into_data_stream();
        hub.close();
        assert!(body.next().await.is_none());
    }
}

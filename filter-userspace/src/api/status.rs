//! The daemon's health and state: `/healthz` (liveness), `/readyz` (both classifiers attached
//! on every interface, asked of the kernel) and `/v1/status`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::state::lock;
use super::{AppState, PolicyStore};

pub(super) async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

pub(super) async fn readyz(State(state): State<AppState>) -> Response {
    let observer = state.0.observer.clone();
    let ready = tokio::task::spawn_blocking(move || observer.ready())
        .await
        .unwrap_or_else(|e| Err(vec![format!("the readiness check failed: {e}")]));
    match ready {
        Ok(()) => Json(json!({"ready": true, "missing": []})).into_response(),
        Err(missing) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "missing": missing})),
        )
            .into_response(),
    }
}

pub(super) async fn status(State(state): State<AppState>) -> Json<Value> {
    let dataplane = state.0.observer.status();
    let summary = lock(&state.0.summary).clone();
    let store = state.lock().store.clone();
    let source = match &store {
        None => json!({"source": "memory", "path": null, "read_only": false}),
        Some(s) => json!({
            "source": s.kind(),
            "path": s.path().display().to_string(),
            "read_only": matches!(s, PolicyStore::ReadOnly(_)),
        }),
    };
    let mut policy = source;
    policy["health"] = serde_json::to_value(state.source_health()).expect("serializes");
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "build": {"revision": crate::GIT_REVISION, "bpf_object_sha256": crate::BPF_OBJECT_SHA256},
        "revision": summary.revision,
        "rules": {
            "exact": summary.rules[0] + summary.rules[1],
            "prefix": summary.rules[2] + summary.rules[3],
        },
        "fail_mode": state.0.info.fail_mode,
        "policy_file": state.0.info.policy_file,
        "policy": policy,
        "last_change": state.last_change(),
        "dataplane": dataplane,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::router;
    use crate::api::testing::*;
    use crate::policy::Policy;

    #[tokio::test]
    async fn readyz_names_what_is_missing() {
        let rec = Recorder {
            missing: vec!["eth0 egress: no filter at pref 405 (netlink tc)".into()],
            ..Recorder::default()
        };
        let broken = router(AppState::new(Policy::default(), Box::new(rec)));
        let r = send(&broken, "GET", "/readyz", "", &[]).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            r.json["missing"][0],
            "eth0 egress: no filter at pref 405 (netlink tc)"
        );
        let (fine, _) = app(false);
        assert_eq!(
            send(&fine, "GET", "/readyz", "", &[]).await.json,
            json!({"ready": true, "missing": []})
        );
    }
}

//! `GET /v1/explain`: what the filter does with a request under the policy in force, decided by
//! [`crate::explain`].

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::error::bad_request;
use super::rules::etag;
use super::{ApiError, AppState};

pub(super) async fn explain(
    State(state): State<AppState>,
    query: Result<Query<Vec<(String, String)>>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let q = query.map_err(|e| bad_request(format!("query: {e}")))?.0;
    let one = |name: &str| {
        q.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .ok_or_else(|| {
                bad_request(format!(
                    "query parameter `{name}` is required: GET /v1/explain?method=DELETE&target=/api/items"
                ))
            })
    };
    let (method, target) = (one("method")?, one("target")?);
    let headers: Vec<String> = q
        .iter()
        .filter(|(k, _)| k == "header")
        .map(|(_, v)| v.clone())
        .collect();
    let opts = crate::explain::Options {
        dry_run: state.0.observer.status().dry_run,
    };
    let inner = state.lock();
    let e = crate::explain::explain(&inner.policy, &opts, &method, &target, &headers)
        .map_err(|e| bad_request(e.to_string()))?;
    let mut v = serde_json::to_value(e).expect("an explanation serializes");
    v["revision"] = json!(inner.revision);
    Ok((etag(inner.revision), Json(v)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::testing::*;
    use axum::http::StatusCode;

    #[tokio::test]
    async fn explain_answers_with_the_policy_in_force() {
        let (app, _) = app(false);
        call(
            &app,
            "PUT",
            "/v1/policy",
            r#"{"paths":"normalize","rules":[{"path":"/api/","match":"prefix","methods":["GET","POST"]}]}"#,
        )
        .await;
        let r = send(
            &app,
            "GET",
            "/v1/explain?method=DELETE&target=%2Fapi%2F%2561dmin%2F..%2Fx%3Fy",
            "",
            &[],
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.json["canonical"], "/api/x");
        assert_eq!(r.json["rule"]["path"], "/api/");
        assert_eq!(r.json["allow"], json!(["GET", "HEAD", "POST"]));
        assert_eq!(
            (&r.json["answer"], &r.json["revision"]),
            (&json!(405), &json!(1))
        );
        let r = send(
            &app,
            "GET",
            "/v1/explain?method=POST&target=/api/x&header=X-HTTP-Method-Override:%20DELETE",
            "",
            &[],
        )
        .await;
        assert_eq!(
            (&r.json["override_method"], &r.json["answer"]),
            (&json!("DELETE"), &json!(405))
        );
        let r = send(&app, "GET", "/v1/explain?method=GET", "", &[]).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        let r = send(
            &app,
            "GET",
            "/v1/explain?method=GET&target=/a%0D%0AX:%20y",
            "",
            &[],
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
    }
}

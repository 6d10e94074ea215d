//! The REST API: `pub fn router(state) -> Router`. Handlers validate input into the policy
//! model, apply it through a [`PolicySink`] (the dataplane), and only then change the policy
//! they report, so what `GET /v1/rules` shows is what the kernel enforces.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;

use crate::dataplane::DataplaneError;
use crate::policy::{Policy, Rule, RuleSetSpec, RuleSpec};

/// Where validated policy changes go: the dataplane in the daemon.
pub trait PolicySink: Send {
    fn replace(&mut self, policy: &Policy) -> Result<(), DataplaneError>;
    fn upsert(&mut self, rule: &Rule) -> Result<(), DataplaneError>;
    fn remove(&mut self, path: &str) -> Result<(), DataplaneError>;
    /// Counters by name.
    fn counters(&self) -> Result<BTreeMap<String, u64>, DataplaneError>;
}

struct Inner {
    policy: Policy,
    sink: Box<dyn PolicySink>,
}

/// Shared state of the API: the policy and the sink, behind one lock so that each change is
/// validated, applied and recorded as one step.
#[derive(Clone)]
pub struct AppState(Arc<Mutex<Inner>>);

impl AppState {
    pub fn new(policy: Policy, sink: Box<dyn PolicySink>) -> AppState {
        AppState(Arc::new(Mutex::new(Inner { policy, sink })))
    }

    pub fn policy(&self) -> Policy {
        self.0.lock().unwrap().policy.clone()
    }
}

/// Largest request body: a 100k-rule document fits.
pub const BODY_LIMIT: usize = 32 << 20;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route(
            "/v1/rules",
            get(list_rules)
                .put(replace_rules)
                .post(upsert_rule)
                .delete(remove_rule),
        )
        .route("/v1/stats", get(stats))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// An error answer: a status and a JSON body `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<DataplaneError> for ApiError {
    fn from(e: DataplaneError) -> Self {
        // Logged in full; the client gets no internals.
        tracing::error!(error = %e, "dataplane update failed; the policy in force is unchanged");
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the kernel maps could not be updated; the policy in force is unchanged".into(),
        )
    }
}

fn bad_request(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

fn parse_json<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| bad_request(format!("invalid JSON body: {e}")))
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn list_rules(State(state): State<AppState>) -> Json<RuleSetSpec> {
    Json(RuleSetSpec {
        rules: state.policy().specs(),
    })
}

async fn replace_rules(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<Json<RuleSetSpec>, ApiError> {
    let spec: RuleSetSpec = parse_json(&body)?;
    let mut inner = state.0.lock().unwrap();
    let next = Policy::from_specs(inner.policy.default, &spec.rules)
        .map_err(|e| bad_request(e.to_string()))?;
    inner.sink.replace(&next)?;
    inner.policy = next;
    Ok(Json(RuleSetSpec {
        rules: inner.policy.specs(),
    }))
}

async fn upsert_rule(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let spec: RuleSpec = parse_json(&body)?;
    let rule = Rule::from_spec(0, &spec)
        .map_err(|e| bad_request(e.to_string().replacen("rules[0].", "", 1)))?;
    let mut inner = state.0.lock().unwrap();
    let is_new = !inner.policy.rules.contains_key(&rule.path);
    if is_new && inner.policy.rules.len() >= crate::dataplane::RULES_CAPACITY {
        return Err(ApiError(
            StatusCode::INSUFFICIENT_STORAGE,
            "the policy map is full".into(),
        ));
    }
    inner.sink.upsert(&rule)?;
    let out = rule.to_spec();
    inner.policy.rules.insert(rule.path.clone(), rule);
    let status = if is_new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(out)).into_response())
}

#[derive(Deserialize)]
struct PathQuery {
    path: Option<String>,
}

async fn remove_rule(
    State(state): State<AppState>,
    query: Result<Query<PathQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<StatusCode, ApiError> {
    let path = query.ok().and_then(|Query(q)| q.path).ok_or_else(|| {
        bad_request("query parameter `path` is required: DELETE /v1/rules?path=/api/items")
    })?;
    let mut inner = state.0.lock().unwrap();
    if !inner.policy.rules.contains_key(&path) {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no rule for path {path:?}"),
        ));
    }
    inner.sink.remove(&path)?;
    inner.policy.rules.remove(&path);
    Ok(StatusCode::NO_CONTENT)
}

async fn stats(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let inner = state.0.lock().unwrap();
    let counters = inner.sink.counters()?;
    Ok(Json(
        json!({ "counters": counters, "rules": inner.policy.rules.len() }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    /// Records what reached it; can be told to fail, to show that a failed apply changes nothing.
    #[derive(Default)]
    struct Recorder {
        log: Arc<Mutex<Vec<String>>>,
        fail: bool,
    }

    impl PolicySink for Recorder {
        fn replace(&mut self, p: &Policy) -> Result<(), DataplaneError> {
            if self.fail {
                return Err(DataplaneError::NoObject);
            }
            self.log
                .lock()
                .unwrap()
                .push(format!("replace {}", p.rules.len()));
            Ok(())
        }
        fn upsert(&mut self, r: &Rule) -> Result<(), DataplaneError> {
            self.log.lock().unwrap().push(format!("upsert {}", r.path));
            Ok(())
        }
        fn remove(&mut self, path: &str) -> Result<(), DataplaneError> {
            self.log.lock().unwrap().push(format!("remove {path}"));
            Ok(())
        }
        fn counters(&self) -> Result<BTreeMap<String, u64>, DataplaneError> {
            Ok(BTreeMap::from([("rejected".to_owned(), 3)]))
        }
    }

    async fn call(
        app: &Router,
        method: &str,
        uri: &str,
        body: &str,
    ) -> (StatusCode, serde_json::Value) {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .body(Body::from(body.to_owned()))
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        let json = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        (status, json)
    }

    fn app(fail: bool) -> (Router, Arc<Mutex<Vec<String>>>) {
        let rec = Recorder {
            fail,
            ..Default::default()
        };
        let log = rec.log.clone();
        (router(AppState::new(Policy::default(), Box::new(rec))), log)
    }

    #[tokio::test]
    async fn rules_lifecycle() {
        let (app, log) = app(false);
        let (s, _) = call(
            &app,
            "POST",
            "/v1/rules",
            r#"{"path":"/api/items","methods":["GET","POST"]}"#,
        )
        .await;
        assert_eq!(s, StatusCode::CREATED);
        let (s, _) = call(
            &app,
            "POST",
            "/v1/rules",
            r#"{"path":"/api/items","methods":["GET"]}"#,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        let (s, body) = call(&app, "GET", "/v1/rules", "").await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(
            body,
            json!({"rules":[{"path":"/api/items","methods":["GET"]}]})
        );
        let (s, _) = call(
            &app,
            "PUT",
            "/v1/rules",
            r#"{"rules":[{"path":"/a","methods":["PUT"]},{"path":"/b","methods":["GET"]}]}"#,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        let (_, body) = call(&app, "GET", "/v1/rules", "").await;
        assert_eq!(body["rules"].as_array().unwrap().len(), 2);
        assert_eq!(
            call(&app, "DELETE", "/v1/rules?path=/a", "").await.0,
            StatusCode::NO_CONTENT
        );
        let (s, body) = call(&app, "DELETE", "/v1/rules?path=/a", "").await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert!(body["error"].as_str().unwrap().contains("/a"));
        assert_eq!(
            *log.lock().unwrap(),
            [
                "upsert /api/items",
                "upsert /api/items",
                "replace 2",
                "remove /a"
            ]
        );
        let (s, body) = call(&app, "GET", "/v1/stats", "").await;
        assert_eq!(
            (s, &body["counters"]["rejected"]),
            (StatusCode::OK, &json!(3))
        );
        assert_eq!(call(&app, "GET", "/healthz", "").await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn bad_input_is_a_400_that_names_the_problem_and_changes_nothing() {
        let (app, log) = app(false);
        let cases = [
            ("POST", "/v1/rules", "{", "invalid JSON"),
            (
                "POST",
                "/v1/rules",
                r#"{"path":"api","methods":["GET"]}"#,
                "path \"api\": must start with '/'",
            ),
            (
                "POST",
                "/v1/rules",
                r#"{"path":"/a","methods":["GE T"]}"#,
                "not a method token",
            ),
            (
                "POST",
                "/v1/rules",
                r#"{"path":"/a","methods":[]}"#,
                "methods: the list is empty",
            ),
            (
                "POST",
                "/v1/rules",
                r#"{"path":"/a","methods":["GET"],"extra":1}"#,
                "unknown field",
            ),
            (
                "PUT",
                "/v1/rules",
                r#"{"rules":[{"path":"/a","methods":["GET"]},{"path":"b","methods":["GET"]}]}"#,
                "rules[1].path",
            ),
            ("DELETE", "/v1/rules", "", "`path` is required"),
        ];
        for (method, uri, body, want) in cases {
            let (s, json) = call(&app, method, uri, body).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{method} {uri} {body}");
            let msg = json["error"].as_str().unwrap();
            assert!(msg.contains(want), "{msg:?} should contain {want:?}");
        }
        assert!(log.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_failed_dataplane_update_keeps_the_old_policy() {
        let (app, _) = app(true);
        let (s, body) = call(
            &app,
            "PUT",
            "/v1/rules",
            r#"{"rules":[{"path":"/a","methods":["GET"]}]}"#,
        )
        .await;
        assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(
            !body["error"].as_str().unwrap().contains("kernel object"),
            "no internals leak"
        );
        assert_eq!(
            call(&app, "GET", "/v1/rules", "").await.1,
            json!({"rules":[]})
        );
    }
}

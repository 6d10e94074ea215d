//! The REST API: `pub fn router(state) -> Router`. Handlers validate input into the policy
//! model, apply it through a [`PolicySink`] (the dataplane), persist it to the policy file, and
//! only then change the policy they report and acknowledge, so what `GET /v1/rules` shows is
//! what the kernel enforces and what a restart restores.
//!
//! Every route is registered through [`ApiBuilder::route`] together with its description, and
//! `GET /v1/openapi.json` is generated from those descriptions: a route cannot exist without
//! being documented. Routes marked `auth` need `Authorization: Bearer <token>` when the state
//! has a token. Writes carry the policy's revision (`ETag`); a write naming a stale revision
//! (`If-Match` header: 412; `revision` in the body: 409) changes nothing.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::{Json, Router};
use filter_common::Reason;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::dataplane::{DataplaneError, MapFill};
use crate::hits::{HitKey, Outcome};
use crate::policy::{self, MatchKind, Policy, PolicyFile, Rule, RuleKey, RuleSetSpec, RuleSpec};

/// Where validated policy changes go: the dataplane in the daemon.
pub trait PolicySink: Send {
    fn replace(&mut self, policy: &Policy) -> Result<(), DataplaneError>;
    fn upsert(&mut self, rule: &Rule) -> Result<(), DataplaneError>;
    fn remove(&mut self, key: &RuleKey) -> Result<(), DataplaneError>;
    /// Counters by name: kernel verdict reasons, `responses_sent`, `responses_failed`,
    /// `responses_limited`.
    fn counters(&self) -> Result<BTreeMap<String, u64>, DataplaneError>;
    /// Called after a change is applied and persisted, with the policy now in force.
    fn committed(&mut self, _policy: &Policy) {}
    /// Rejections and monitor hits by rule, method and outcome ([`crate::hits`]), sorted.
    fn rule_hits(&self) -> Vec<(HitKey, u64)> {
        Vec::new()
    }
    /// Policy map entries and capacities.
    fn map_fill(&self) -> Vec<MapFill> {
        Vec::new()
    }
    /// Map writes that failed since start.
    fn write_failures(&self) -> u64 {
        0
    }
    /// What `/v1/status` reports about the dataplane.
    fn status(&self) -> SinkStatus {
        SinkStatus::default()
    }
    /// Let go of the kernel objects at exit (`fail_open`: detach).
    fn release(&mut self, _fail_open: bool) {}
}

/// The dataplane's part of `GET /v1/status`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SinkStatus {
    pub interfaces: Vec<String>,
    /// How the classifiers are attached: `"tcx"` or `"netlink"`.
    pub attach: Option<String>,
    /// The classifiers keep enforcing when the daemon exits (pinned TCX links, or netlink
    /// filters in fail-closed mode).
    pub pinned: bool,
    pub dry_run: bool,
    pub prefix_rules_supported: bool,
}

/// Where accepted policies are written.
#[derive(Clone, Debug)]
pub struct PolicyStore {
    pub path: PathBuf,
}

impl PolicyStore {
    fn save(&self, policy: &Policy, revision: u64) -> Result<(), policy::PolicyFileError> {
        policy::write_atomic(&self.path, &policy::render_toml(policy, revision)).map_err(|source| {
            policy::PolicyFileError::Write {
                path: self.path.display().to_string(),
                source,
            }
        })
    }
}

/// How the daemon was started, for `/v1/status`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DaemonInfo {
    /// `"closed"`: the classifier keeps enforcing when the daemon exits; `"open"`: it detaches.
    pub fail_mode: String,
    pub policy_file: Option<String>,
}

struct Inner {
    policy: Policy,
    revision: u64,
    sink: Box<dyn PolicySink>,
    store: Option<PolicyStore>,
}

struct Shared {
    inner: Mutex<Inner>,
    token: Option<String>,
    info: DaemonInfo,
}

/// Shared state of the API: the policy, its revision and the sink, behind one lock so that each
/// change is validated, applied, persisted and recorded as one step.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    /// State without a token (every route open) and without persistence.
    pub fn new(policy: Policy, sink: Box<dyn PolicySink>) -> AppState {
        AppState::with(policy, 0, sink, None, None, DaemonInfo::default())
    }

    pub fn with(
        policy: Policy,
        revision: u64,
        sink: Box<dyn PolicySink>,
        store: Option<PolicyStore>,
        token: Option<String>,
        info: DaemonInfo,
    ) -> AppState {
        AppState(Arc::new(Shared {
            inner: Mutex::new(Inner {
                policy,
                revision,
                sink,
                store,
            }),
            token,
            info,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A handler that panicked mid-change left the sink and policy as they were before the
        // change was committed (the policy is replaced last), so the data is still consistent.
        self.0.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn policy(&self) -> Policy {
        self.lock().policy.clone()
    }

    pub fn revision(&self) -> u64 {
        self.lock().revision
    }

    /// Re-read the policy file (SIGHUP). An invalid file keeps the policy in force; the error
    /// says why. Returns the revision in force afterwards.
    pub fn reload(&self) -> Result<u64, String> {
        let mut inner = self.lock();
        let store = inner
            .store
            .clone()
            .ok_or_else(|| "no --policy file to reload".to_owned())?;
        let (next, file_revision) =
            policy::load_document(&store.path).map_err(|e| e.to_string())?;
        if next == inner.policy {
            return Ok(inner.revision);
        }
        let revision = inner.revision.max(file_revision) + 1;
        commit(&mut inner, next, Change::Replace, revision).map_err(|e| e.1)?;
        Ok(revision)
    }

    /// Hand the sink its exit (see [`PolicySink::release`]).
    pub fn release(&self, fail_open: bool) {
        self.lock().sink.release(fail_open);
    }
}

/// Largest request body: a 100k-rule document fits.
pub const BODY_LIMIT: usize = 32 << 20;
/// Longest a request may take, body upload included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// One route's description: the source of the OpenAPI document.
#[derive(Clone, Debug)]
pub struct RouteDoc {
    pub method: &'static str,
    pub path: &'static str,
    pub summary: &'static str,
    /// Needs the bearer token.
    pub auth: bool,
    /// Schema name (under `components.schemas`) of the JSON request body.
    pub request: Option<&'static str>,
    /// Query parameters: (name, required, description).
    pub query: &'static [(&'static str, bool, &'static str)],
    /// Accepts `If-Match`.
    pub if_match: bool,
    /// (status, description, schema name of the JSON body or `text/plain` for metrics).
    pub responses: &'static [(u16, &'static str, Option<&'static str>)],
}

/// Builds the router and its OpenAPI document from the same calls.
pub struct ApiBuilder {
    state: AppState,
    router: Router<AppState>,
    docs: Vec<RouteDoc>,
}

impl ApiBuilder {
    fn new(state: AppState) -> ApiBuilder {
        ApiBuilder {
            state,
            router: Router::new(),
            docs: Vec::new(),
        }
    }

    /// Register `handler` for `doc.method doc.path`, guarded by the token if `doc.auth`.
    pub fn route<H, T>(mut self, doc: RouteDoc, handler: H) -> ApiBuilder
    where
        H: axum::handler::Handler<T, AppState>,
        T: 'static,
    {
        let filter = match doc.method {
            "GET" => MethodFilter::GET,
            "POST" => MethodFilter::POST,
            "PUT" => MethodFilter::PUT,
            "DELETE" => MethodFilter::DELETE,
            other => panic!("route {}: method {other} is not mapped", doc.path),
        };
        let mut mr: MethodRouter<AppState> = on(filter, handler);
        if doc.auth {
            mr = mr.route_layer(middleware::from_fn_with_state(
                self.state.clone(),
                require_token,
            ));
        }
        self.router = self.router.route(doc.path, mr);
        self.docs.push(doc);
        self
    }

    fn finish(self) -> Router {
        let doc = Arc::new(openapi(&self.docs));
        self.router
            .route(
                OPENAPI_PATH,
                on(MethodFilter::GET, move || {
                    let doc = doc.clone();
                    async move { Json((*doc).clone()) }
                }),
            )
            .layer(DefaultBodyLimit::max(BODY_LIMIT))
            .layer(middleware::from_fn(timeout))
            .with_state(self.state)
    }
}

pub const OPENAPI_PATH: &str = "/v1/openapi.json";

const ERR: Option<&str> = Some("Error");

/// Every route of the API, in the order the OpenAPI document lists them.
pub fn routes() -> Vec<RouteDoc> {
    let d = |method, path, summary, auth| RouteDoc {
        method,
        path,
        summary,
        auth,
        request: None,
        query: &[],
        if_match: false,
        responses: &[],
    };
    const UNAUTH: (u16, &str, Option<&str>) = (401, "Missing or wrong bearer token", ERR);
    vec![
        RouteDoc {
            responses: &[(200, "The daemon answers", Some("Health"))],
            ..d("GET", "/healthz", "Liveness check", false)
        },
        RouteDoc {
            responses: &[
                (200, "The whole policy and its revision", Some("Policy")),
                UNAUTH,
            ],
            ..d(
                "GET",
                "/v1/policy",
                "The whole policy: switches and rules",
                true,
            )
        },
        RouteDoc {
            request: Some("Policy"),
            if_match: true,
            responses: &[
                (200, "The policy now in force", Some("Policy")),
                (400, "Invalid document; the message names the field", ERR),
                UNAUTH,
                (409, "`revision` in the body is stale", ERR),
                (412, "`If-Match` is stale", ERR),
                (413, "Body too large", ERR),
                (
                    500,
                    "The kernel maps or the policy file could not be written; nothing changed",
                    ERR,
                ),
            ],
            ..d(
                "PUT",
                "/v1/policy",
                "Replace the whole policy atomically",
                true,
            )
        },
        RouteDoc {
            responses: &[
                (200, "The rules and the policy's revision", Some("RuleSet")),
                UNAUTH,
            ],
            ..d("GET", "/v1/rules", "List the rules in force", true)
        },
        RouteDoc {
            request: Some("RuleSet"),
            if_match: true,
            responses: &[
                (200, "The rules now in force", Some("RuleSet")),
                (400, "Invalid rules; the message names the field", ERR),
                UNAUTH,
                (409, "`revision` in the body is stale", ERR),
                (412, "`If-Match` is stale", ERR),
                (413, "Body too large", ERR),
                (
                    500,
                    "The kernel maps or the policy file could not be written; nothing changed",
                    ERR,
                ),
            ],
            ..d(
                "PUT",
                "/v1/rules",
                "Replace every rule atomically (switches unchanged)",
                true,
            )
        },
        RouteDoc {
            request: Some("Rule"),
            if_match: true,
            responses: &[
                (200, "Rule replaced", Some("RuleChange")),
                (201, "Rule added", Some("RuleChange")),
                (400, "Invalid rule; the message names the field", ERR),
                UNAUTH,
                (412, "`If-Match` is stale", ERR),
                (507, "The policy map is full", ERR),
            ],
            ..d("POST", "/v1/rules", "Add or replace one rule", true)
        },
        RouteDoc {
            query: &[
                ("path", true, "The rule's path"),
                ("match", false, "`exact` (default) or `prefix`"),
            ],
            if_match: true,
            responses: &[
                (204, "Rule removed", None),
                (400, "Missing or invalid query parameter", ERR),
                UNAUTH,
                (404, "No such rule", ERR),
                (412, "`If-Match` is stale", ERR),
            ],
            ..d("DELETE", "/v1/rules", "Remove one rule", true)
        },
        RouteDoc {
            responses: &[(200, "Counters by name", Some("Stats")), UNAUTH],
            ..d("GET", "/v1/stats", "Verdict and responder counters", true)
        },
        RouteDoc {
            responses: &[(200, "Daemon status", Some("Status")), UNAUTH],
            ..d(
                "GET",
                "/v1/status",
                "Interfaces, fail mode, dry run, revision",
                true,
            )
        },
        RouteDoc {
            responses: &[
                (200, "Prometheus text exposition format 0.0.4", None),
                UNAUTH,
            ],
            ..d("GET", "/metrics", "Prometheus metrics", true)
        },
    ]
}

pub fn router(state: AppState) -> Router {
    let mut b = ApiBuilder::new(state);
    for doc in routes() {
        b = match (doc.method, doc.path) {
            ("GET", "/healthz") => b.route(doc, healthz),
            ("GET", "/v1/policy") => b.route(doc, get_policy),
            ("PUT", "/v1/policy") => b.route(doc, put_policy),
            ("GET", "/v1/rules") => b.route(doc, list_rules),
            ("PUT", "/v1/rules") => b.route(doc, replace_rules),
            ("POST", "/v1/rules") => b.route(doc, upsert_rule),
            ("DELETE", "/v1/rules") => b.route(doc, remove_rule),
            ("GET", "/v1/stats") => b.route(doc, stats),
            ("GET", "/v1/status") => b.route(doc, status),
            ("GET", "/metrics") => b.route(doc, metrics),
            (m, p) => panic!("route {m} {p} is documented but has no handler"),
        };
    }
    b.finish()
}

// ---------------------------------------------------------------------------
// Middleware

async fn require_token(State(state): State<AppState>, req: Request, next: Next) -> Response {
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

async fn timeout(req: Request, next: Next) -> Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError(
            StatusCode::REQUEST_TIMEOUT,
            format!("the request took longer than {REQUEST_TIMEOUT:?}"),
        )
        .into_response(),
    }
}

// ---------------------------------------------------------------------------
// Errors

/// An error answer: a status and a JSON body `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<DataplaneError> for ApiError {
    fn from(e: DataplaneError) -> Self {
        if let DataplaneError::NoPrefixMaps = e {
            return bad_request(e.to_string());
        }
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

// ---------------------------------------------------------------------------
// Revisions

fn etag(revision: u64) -> [(header::HeaderName, HeaderValue); 1] {
    [(
        header::ETAG,
        HeaderValue::from_str(&format!("\"{revision}\"")).expect("digits are a valid header"),
    )]
}

/// Check `If-Match` (412 when stale) and a body `revision` (409 when stale).
fn check_revision(
    headers: &HeaderMap,
    body_revision: Option<u64>,
    current: u64,
) -> Result<(), ApiError> {
    if let Some(v) = headers.get(header::IF_MATCH) {
        let text = v
            .to_str()
            .map_err(|_| bad_request("If-Match: not visible ASCII"))?
            .trim();
        if text != "*" {
            let ok = text.split(',').map(str::trim).try_fold(false, |acc, tag| {
                let n = tag
                    .trim_start_matches("W/")
                    .trim_matches('"')
                    .parse::<u64>()
                    .map_err(|_| {
                        bad_request(format!(
                            "If-Match: {tag:?} is not a revision (send the ETag of GET /v1/rules, e.g. \"{current}\")"
                        ))
                    })?;
                Ok::<bool, ApiError>(acc || n == current)
            })?;
            if !ok {
                return Err(ApiError(
                    StatusCode::PRECONDITION_FAILED,
                    format!(
                        "If-Match: the policy is at revision {current}; read it again and retry"
                    ),
                ));
            }
        }
    }
    if let Some(r) = body_revision {
        if r != current {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!("revision: {r} is stale, the policy is at revision {current}; read it again and retry"),
            ));
        }
    }
    Ok(())
}

enum Change {
    Replace,
    Upsert(Rule),
    Remove(RuleKey),
}

/// Apply `next` (reached from the policy in force by `change`) to the sink, persist it, and
/// only then make it the policy in force at `revision`. On any failure nothing changes.
fn commit(inner: &mut Inner, next: Policy, change: Change, revision: u64) -> Result<(), ApiError> {
    match &change {
        Change::Replace => inner.sink.replace(&next)?,
        Change::Upsert(rule) => inner.sink.upsert(rule)?,
        Change::Remove(key) => inner.sink.remove(key)?,
    }
    if let Some(store) = &inner.store {
        if let Err(e) = store.save(&next, revision) {
            tracing::error!(error = %e, "cannot persist the policy; rolling the kernel maps back");
            if let Err(e) = inner.sink.replace(&inner.policy) {
                tracing::error!(error = %e, "rolling back failed: the kernel enforces a policy that is not on disk");
            }
            return Err(ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the policy file could not be written; the policy in force is unchanged".into(),
            ));
        }
    }
    inner.policy = next;
    inner.revision = revision;
    inner.sink.committed(&inner.policy);
    Ok(())
}

// ---------------------------------------------------------------------------
// Handlers

async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn get_policy(State(state): State<AppState>) -> Response {
    let inner = state.lock();
    (
        etag(inner.revision),
        Json(inner.policy.to_file(Some(inner.revision))),
    )
        .into_response()
}

async fn put_policy(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    off_the_workers(move || {
        let doc: PolicyFile = parse_json(&body)?;
        let next = Policy::from_file(&doc).map_err(|e| bad_request(e.to_string()))?;
        let mut inner = state.lock();
        check_revision(&headers, doc.revision, inner.revision)?;
        let revision = inner.revision + 1;
        commit(&mut inner, next, Change::Replace, revision)?;
        Ok((
            etag(inner.revision),
            Json(inner.policy.to_file(Some(inner.revision))),
        )
            .into_response())
    })
    .await
}

/// Run a policy change on a blocking thread: parsing, validating and writing a large policy
/// takes hundreds of milliseconds, and an async worker busy with it would hold up the tasks
/// queued behind it (the responder's 405s among them).
async fn off_the_workers<F>(change: F) -> Result<Response, ApiError>
where
    F: FnOnce() -> Result<Response, ApiError> + Send + 'static,
{
    match tokio::task::spawn_blocking(change).await {
        Ok(r) => r,
        Err(e) => Err(ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the change did not complete: {e}"),
        )),
    }
}

fn rule_set(inner: &Inner) -> Response {
    (
        etag(inner.revision),
        Json(RuleSetSpec {
            revision: Some(inner.revision),
            rules: inner.policy.specs(),
        }),
    )
        .into_response()
}

async fn list_rules(State(state): State<AppState>) -> Response {
    rule_set(&state.lock())
}

async fn replace_rules(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    off_the_workers(move || {
        let spec: RuleSetSpec = parse_json(&body)?;
        let mut inner = state.lock();
        check_revision(&headers, spec.revision, inner.revision)?;
        let next = inner
            .policy
            .with_rules(&spec.rules)
            .map_err(|e| bad_request(e.to_string()))?;
        let revision = inner.revision + 1;
        commit(&mut inner, next, Change::Replace, revision)?;
        Ok(rule_set(&inner))
    })
    .await
}

/// The answer to `POST /v1/rules`.
#[derive(Serialize, Deserialize)]
pub struct RuleChange {
    pub revision: u64,
    pub rule: RuleSpec,
}

async fn upsert_rule(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let spec: RuleSpec = parse_json(&body)?;
    let rule = Rule::from_spec(0, &spec)
        .map_err(|e| bad_request(e.to_string().replacen("rules[0].", "", 1)))?;
    off_the_workers(move || {
        let mut inner = state.lock();
        check_revision(&headers, None, inner.revision)?;
        inner
            .policy
            .admits(0, &rule)
            .map_err(|e| bad_request(e.to_string().replacen("rules[0].", "", 1)))?;
        let key = rule.key();
        let is_new = !inner.policy.rules.contains_key(&key);
        let mut next = inner.policy.clone();
        next.rules.insert(key, rule.clone());
        if next.check_capacity().is_err() {
            return Err(ApiError(
                StatusCode::INSUFFICIENT_STORAGE,
                format!("the {} policy map is full", rule.kind),
            ));
        }
        let revision = inner.revision + 1;
        let out = rule.to_spec();
        commit(&mut inner, next, Change::Upsert(rule), revision)?;
        let status = if is_new {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        Ok((
            status,
            etag(revision),
            Json(RuleChange {
                revision,
                rule: out,
            }),
        )
            .into_response())
    })
    .await
}

#[derive(Deserialize)]
struct RuleQuery {
    path: Option<String>,
    #[serde(rename = "match")]
    match_kind: Option<String>,
}

async fn remove_rule(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<RuleQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let q = query.map_err(|e| bad_request(format!("query: {e}")))?.0;
    let path = q.path.ok_or_else(|| {
        bad_request("query parameter `path` is required: DELETE /v1/rules?path=/api/items")
    })?;
    let kind = match q.match_kind.as_deref() {
        None => MatchKind::Exact,
        Some(s) => MatchKind::parse(s).ok_or_else(|| {
            bad_request(format!("match: {s:?} is neither \"exact\" nor \"prefix\""))
        })?,
    };
    // The rule is stored under its canonical path; `/%61dmin` names the rule for `/admin`.
    let path = policy::canonical_path(&path, kind)
        .map_err(|why| bad_request(format!("path {path:?}: {why}")))?;
    let key = RuleKey { path, kind };
    off_the_workers(move || {
        let mut inner = state.lock();
        check_revision(&headers, None, inner.revision)?;
        if !inner.policy.rules.contains_key(&key) {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("no {} rule for path {:?}", key.kind, key.path),
            ));
        }
        let mut next = inner.policy.clone();
        next.rules.remove(&key);
        let revision = inner.revision + 1;
        commit(&mut inner, next, Change::Remove(key), revision)?;
        Ok((StatusCode::NO_CONTENT, etag(revision)).into_response())
    })
    .await
}

async fn stats(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let inner = state.lock();
    let counters = inner.sink.counters()?;
    let by_rule: Vec<Value> = inner
        .sink
        .rule_hits()
        .into_iter()
        .map(|(k, n)| {
            json!({
                "rule": k.rule.rule_label(),
                "match": k.rule.match_label(),
                "method": k.method,
                "outcome": k.outcome.as_str(),
                "count": n,
            })
        })
        .collect();
    Ok(Json(json!({
        "counters": counters,
        "by_rule": by_rule,
        "rules": inner.policy.rules.len(),
        "revision": inner.revision,
    })))
}

async fn status(State(state): State<AppState>) -> Json<Value> {
    let inner = state.lock();
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "revision": inner.revision,
        "rules": {
            "exact": inner.policy.count(MatchKind::Exact),
            "prefix": inner.policy.count(MatchKind::Prefix),
        },
        "fail_mode": state.0.info.fail_mode,
        "policy_file": state.0.info.policy_file,
        "dataplane": inner.sink.status(),
    }))
}

async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let inner = state.lock();
    let counters = inner.sink.counters()?;
    let text = render_metrics(
        &counters,
        &inner.sink.rule_hits(),
        &inner.policy,
        inner.revision,
        &inner.sink.map_fill(),
        inner.sink.write_failures(),
        &inner.sink.status(),
    );
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    )
        .into_response())
}

/// A label value in the Prometheus text format: `\`, `"` and newlines escaped.
pub fn label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// The Prometheus text exposition of the daemon's state. `hits` are the rows of
/// [`crate::hits::RuleHits`].
pub fn render_metrics(
    counters: &BTreeMap<String, u64>,
    hits: &[(HitKey, u64)],
    policy: &Policy,
    revision: u64,
    fill: &[MapFill],
    write_failures: u64,
    status: &SinkStatus,
) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, u64)>| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    family(
        "filterd_packets_total",
        "counter",
        "Packets the classifier decided on, by verdict reason (kernel counters; see ARCHITECTURE.md).",
        Reason::ALL
            .iter()
            .map(|r| {
                (
                    format!("{{reason=\"{}\"}}", r.name()),
                    counters.get(r.name()).copied().unwrap_or(0),
                )
            })
            .collect(),
    );
    family(
        "filterd_responses_total",
        "counter",
        "Answers the responder sent to clients, by result.",
        vec![
            (
                "{result=\"sent\"}".into(),
                counters.get("responses_sent").copied().unwrap_or(0),
            ),
            (
                "{result=\"failed\"}".into(),
                counters.get("responses_failed").copied().unwrap_or(0),
            ),
            (
                "{result=\"rate_limited\"}".into(),
                counters.get("responses_limited").copied().unwrap_or(0),
            ),
        ],
    );
    for (name, outcome, help) in [
        (
            "filterd_rejections_total",
            Outcome::Rejected,
            "Requests refused with 405, by the rule that matched (rule=\"(default)\": no rule) and method. At most 1000 rules get a series; later ones are counted under rule=\"(other)\".",
        ),
        (
            "filterd_monitor_hits_total",
            Outcome::Monitored,
            "Requests a monitor rule or --dry-run let through that would have been refused, by rule and method (bounded as filterd_rejections_total).",
        ),
    ] {
        family(
            name,
            "counter",
            help,
            hits.iter()
                .filter(|(k, _)| k.outcome == outcome)
                .map(|(k, n)| {
                    (
                        format!(
                            "{{rule=\"{}\",match=\"{}\",method=\"{}\"}}",
                            label_value(k.rule.rule_label()),
                            k.rule.match_label(),
                            label_value(k.method)
                        ),
                        *n,
                    )
                })
                .collect(),
        );
    }
    let mut rules = Vec::new();
    for kind in [MatchKind::Exact, MatchKind::Prefix] {
        for (mode, m) in [
            ("enforce", policy::Mode::Enforce),
            ("monitor", policy::Mode::Monitor),
        ] {
            let n = policy
                .rules
                .values()
                .filter(|r| r.kind == kind && r.mode == m)
                .count();
            rules.push((format!("{{match=\"{kind}\",mode=\"{mode}\"}}"), n as u64));
        }
    }
    family("filterd_rules", "gauge", "Rules in force.", rules);
    family(
        "filterd_map_entries",
        "gauge",
        "Entries in the active policy maps.",
        fill.iter()
            .map(|f| (format!("{{map=\"{}\"}}", f.map), f.entries as u64))
            .collect(),
    );
    family(
        "filterd_map_capacity",
        "gauge",
        "Capacity of the active policy maps.",
        fill.iter()
            .map(|f| (format!("{{map=\"{}\"}}", f.map), f.capacity as u64))
            .collect(),
    );
    family(
        "filterd_map_write_failures_total",
        "counter",
        "Kernel map writes that failed (the change was refused).",
        vec![(String::new(), write_failures)],
    );
    family(
        "filterd_policy_revision",
        "gauge",
        "Revision of the policy in force.",
        vec![(String::new(), revision)],
    );
    family(
        "filterd_dry_run",
        "gauge",
        "1 when the daemon runs with --dry-run (nothing is blocked).",
        vec![(String::new(), status.dry_run as u64)],
    );
    family(
        "filterd_interfaces_attached",
        "gauge",
        "Interfaces the classifier is attached to.",
        vec![(String::new(), status.interfaces.len() as u64)],
    );
    out
}

// ---------------------------------------------------------------------------
// OpenAPI

/// JSON Schemas of the documents, keyed by the names [`RouteDoc`]s use. The tests check them
/// against what serde reads and writes, so they cannot drift from the types.
pub fn schemas() -> Value {
    let methods = json!({
        "type": "array", "minItems": 1,
        "items": {"type": "string", "description": "An HTTP method token, e.g. GET"}
    });
    json!({
        "Rule": {
            "type": "object", "additionalProperties": false,
            "required": ["path", "methods"],
            "properties": {
                "path": {"type": "string", "description": "Absolute path; a prefix rule's ends in '/'"},
                "methods": methods,
                "match": {"type": "string", "enum": ["exact", "prefix"], "default": "exact"},
                "mode": {"type": "string", "enum": ["enforce", "monitor"], "default": "enforce"},
                "head": {"type": "boolean", "default": true, "description": "GET implies HEAD"}
            }
        },
        "RuleSet": {
            "type": "object", "additionalProperties": false,
            "required": ["rules"],
            "properties": {
                "revision": {"type": "integer", "minimum": 0, "description": "On writes: the revision the change is based on (409 if stale)"},
                "rules": {"type": "array", "items": {"$ref": "#/components/schemas/Rule"}}
            }
        },
        "RuleChange": {
            "type": "object", "additionalProperties": false,
            "required": ["revision", "rule"],
            "properties": {
                "revision": {"type": "integer", "minimum": 0},
                "rule": {"$ref": "#/components/schemas/Rule"}
            }
        },
        "Policy": {
            "type": "object", "additionalProperties": false,
            "properties": {
                "revision": {"type": "integer", "minimum": 0, "description": "On writes: the revision the change is based on (409 if stale)"},
                "default": {"oneOf": [{"type": "string", "enum": ["any"]}, methods], "default": "any"},
                "options": {"type": "string", "enum": ["pass", "answer"], "default": "pass"},
                "oversize": {"type": "string", "enum": ["reject", "pass"], "default": "reject"},
                "paths": {"type": "string", "enum": ["strict", "normalize"], "default": "strict",
                    "description": "strict: 400 for a request path not in normal form; normalize: canonicalize it and judge it under every reading backends give it"},
                "rules": {"type": "array", "items": {"$ref": "#/components/schemas/Rule"}}
            }
        },
        "Error": {
            "type": "object", "required": ["error"],
            "properties": {"error": {"type": "string"}}
        },
        "Health": {
            "type": "object", "properties": {"status": {"type": "string"}}
        },
        "Stats": {
            "type": "object",
            "properties": {
                "counters": {"type": "object", "additionalProperties": {"type": "integer"}},
                "by_rule": {
                    "type": "array",
                    "description": "Rejections and monitor hits by the rule that matched and method; at most 1000 rules, later ones under rule \"(other)\", no rule: \"(default)\"",
                    "items": {
                        "type": "object",
                        "properties": {
                            "rule": {"type": "string"},
                            "match": {"type": "string", "enum": ["exact", "prefix", "none"]},
                            "method": {"type": "string"},
                            "outcome": {"type": "string", "enum": ["rejected", "monitored"]},
                            "count": {"type": "integer"}
                        }
                    }
                },
                "rules": {"type": "integer"},
                "revision": {"type": "integer"}
            }
        },
        "Status": {
            "type": "object",
            "properties": {
                "version": {"type": "string"},
                "revision": {"type": "integer"},
                "rules": {"type": "object", "properties": {"exact": {"type": "integer"}, "prefix": {"type": "integer"}}},
                "fail_mode": {"type": "string", "enum": ["closed", "open"]},
                "policy_file": {"type": ["string", "null"]},
                "dataplane": {"type": "object", "properties": {
                    "interfaces": {"type": "array", "items": {"type": "string"}},
                    "attach": {"type": ["string", "null"], "enum": ["tcx", "netlink", null]},
                    "pinned": {"type": "boolean"},
                    "dry_run": {"type": "boolean"},
                    "prefix_rules_supported": {"type": "boolean"}
                }}
            }
        }
    })
}

/// The OpenAPI 3.1 document for `docs`.
pub fn openapi(docs: &[RouteDoc]) -> Value {
    let mut paths = serde_json::Map::new();
    for d in docs {
        let mut params = Vec::new();
        for (name, required, desc) in d.query {
            params.push(json!({"name": name, "in": "query", "required": required, "description": desc, "schema": {"type": "string"}}));
        }
        if d.if_match {
            params.push(
                json!({"name": "If-Match", "in": "header", "required": false,
                "description": "The ETag (revision) the change is based on; 412 if stale",
                "schema": {"type": "string"}}),
            );
        }
        let mut responses = serde_json::Map::new();
        for (code, desc, schema) in d.responses {
            let mut r = json!({"description": desc});
            match schema {
                Some(s) => {
                    r["content"] = json!({"application/json": {"schema": {"$ref": format!("#/components/schemas/{s}")}}})
                }
                None if *code == 200 => {
                    r["content"] = json!({"text/plain": {"schema": {"type": "string"}}})
                }
                None => {}
            }
            responses.insert(code.to_string(), r);
        }
        let mut op = json!({
            "summary": d.summary,
            "operationId": format!("{}_{}", d.method.to_lowercase(), d.path.trim_start_matches('/').replace(['/', '.'], "_")),
            "parameters": params,
            "responses": responses,
        });
        if let Some(req) = d.request {
            op["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{req}")}}}});
        }
        if !d.auth {
            op["security"] = json!([]);
        }
        paths
            .entry(d.path)
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("path items are objects")
            .insert(d.method.to_lowercase(), op);
    }
    paths.insert(
        OPENAPI_PATH.into(),
        json!({"get": {"summary": "This document", "operationId": "get_openapi", "security": [],
            "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {}}}}}}),
    );
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "filterd API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Control plane of the HTTP method firewall. Writes are atomic, persisted before they are acknowledged, and carry the policy revision (ETag)."
        },
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas(),
        },
        "paths": paths,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use filter_common::Method;
    use tower::ServiceExt;

    use crate::hits::{RuleHits, RuleRef};

    /// Records what reached it; can be told to fail, to show that a failed apply changes nothing.
    #[derive(Default)]
    struct Recorder {
        log: Arc<Mutex<Vec<String>>>,
        fail: bool,
        /// Given each committed policy and reported, as the daemon's sink does.
        hits: Arc<RuleHits>,
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
        fn remove(&mut self, key: &RuleKey) -> Result<(), DataplaneError> {
            self.log
                .lock()
                .unwrap()
                .push(format!("remove {} {}", key.kind, key.path));
            Ok(())
        }
        fn counters(&self) -> Result<BTreeMap<String, u64>, DataplaneError> {
            Ok(BTreeMap::from([("rejected".to_owned(), 3)]))
        }
        fn committed(&mut self, p: &Policy) {
            self.hits.set_policy(p);
        }
        fn rule_hits(&self) -> Vec<(HitKey, u64)> {
            self.hits.snapshot()
        }
    }

    struct Reply {
        status: StatusCode,
        headers: HeaderMap,
        json: Value,
        text: String,
    }

    async fn send(
        app: &Router,
        method: &str,
        uri: &str,
        body: &str,
        hdrs: &[(&str, &str)],
    ) -> Reply {
        let mut req = Request::builder().method(method).uri(uri);
        for (k, v) in hdrs {
            req = req.header(*k, *v);
        }
        let req = req.body(Body::from(body.to_owned())).unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Reply {
            status,
            headers,
            json,
            text,
        }
    }

    async fn call(app: &Router, method: &str, uri: &str, body: &str) -> (StatusCode, Value) {
        let r = send(app, method, uri, body, &[]).await;
        (r.status, r.json)
    }

    fn app(fail: bool) -> (Router, Arc<Mutex<Vec<String>>>) {
        let rec = Recorder {
            fail,
            ..Default::default()
        };
        let log = rec.log.clone();
        (router(AppState::new(Policy::default(), Box::new(rec))), log)
    }

    const TOKEN: &str = "s3cret";

    fn secured(store: Option<PathBuf>) -> (Router, AppState) {
        let state = AppState::with(
            Policy::default(),
            0,
            Box::new(Recorder::default()),
            store.map(|path| PolicyStore { path }),
            Some(TOKEN.into()),
            DaemonInfo {
                fail_mode: "closed".into(),
                policy_file: None,
            },
        );
        (router(state.clone()), state)
    }

    fn bearer() -> (&'static str, &'static str) {
        ("authorization", "Bearer s3cret")
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
            json!({"revision": 2, "rules":[{"path":"/api/items","methods":["GET"]}]})
        );
        let (s, _) = call(
            &app,
            "PUT",
            "/v1/rules",
            r#"{"rules":[{"path":"/a","methods":["PUT"]},{"path":"/b/","match":"prefix","mode":"monitor","methods":["GET"]}]}"#,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        let (_, body) = call(&app, "GET", "/v1/rules", "").await;
        assert_eq!(
            body["rules"][1],
            json!({"path":"/b/","match":"prefix","mode":"monitor","methods":["GET"]})
        );
        assert_eq!(
            call(&app, "DELETE", "/v1/rules?path=//%61", "").await.0,
            StatusCode::NO_CONTENT,
            "the query names the rule by any spelling of its path"
        );
        let (s, body) = call(&app, "DELETE", "/v1/rules?path=/a", "").await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert!(body["error"].as_str().unwrap().contains("/a"));
        assert_eq!(
            call(&app, "DELETE", "/v1/rules?path=/b/", "").await.0,
            StatusCode::NOT_FOUND,
            "the prefix rule is not the exact rule"
        );
        assert_eq!(
            call(&app, "DELETE", "/v1/rules?path=/b/&match=prefix", "")
                .await
                .0,
            StatusCode::NO_CONTENT
        );
        assert_eq!(
            *log.lock().unwrap(),
            [
                "upsert /api/items",
                "upsert /api/items",
                "replace 2",
                "remove exact /a",
                "remove prefix /b/"
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
    async fn whole_policy_switches_round_trip() {
        let (app, log) = app(false);
        let doc = json!({"default":["GET"],"options":"answer","oversize":"pass","paths":"normalize",
            "rules":[{"path":"/x","methods":["GET"],"head":false}]});
        let r = send(&app, "PUT", "/v1/policy", &doc.to_string(), &[]).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let mut want = doc.clone();
        want["revision"] = json!(1);
        assert_eq!(r.json, want);
        assert_eq!(r.headers[header::ETAG], "\"1\"");
        assert_eq!(call(&app, "GET", "/v1/policy", "").await.1, want);
        // PUT /v1/rules keeps the switches.
        call(&app, "PUT", "/v1/rules", r#"{"rules":[]}"#).await;
        let (_, p) = call(&app, "GET", "/v1/policy", "").await;
        assert_eq!(
            (&p["options"], &p["default"], &p["paths"]),
            (&json!("answer"), &json!(["GET"]), &json!("normalize"))
        );
        assert_eq!(*log.lock().unwrap(), ["replace 1", "replace 0"]);
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
                "POST",
                "/v1/rules",
                r#"{"path":"/a","match":"prefix","methods":["GET"]}"#,
                "path \"/a\": a prefix rule's path must end in '/'",
            ),
            (
                "POST",
                "/v1/rules",
                r#"{"path":"/a","mode":"loud","methods":["GET"]}"#,
                "mode: \"loud\"",
            ),
            (
                "PUT",
                "/v1/rules",
                r#"{"rules":[{"path":"/a","methods":["GET"]},{"path":"b","methods":["GET"]}]}"#,
                "rules[1].path",
            ),
            (
                "PUT",
                "/v1/policy",
                r#"{"options":"reply","rules":[]}"#,
                "options: \"reply\"",
            ),
            (
                "PUT",
                "/v1/policy",
                r#"{"paths":"lenient","rules":[]}"#,
                "paths: \"lenient\"",
            ),
            (
                "PUT",
                "/v1/policy",
                r#"{"default":"none"}"#,
                "default: \"none\"",
            ),
            ("DELETE", "/v1/rules", "", "`path` is required"),
            (
                "DELETE",
                "/v1/rules?path=/a&match=glob",
                "",
                "match: \"glob\"",
            ),
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
            json!({"revision": 0, "rules":[]})
        );
    }

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
    async fn stale_revisions_are_refused_and_change_nothing() {
        let (app, state) = secured(None);
        let add = |rev: &'static str| {
            let app = app.clone();
            async move {
                send(
                    &app,
                    "POST",
                    "/v1/rules",
                    r#"{"path":"/a","methods":["GET"]}"#,
                    &[bearer(), ("if-match", rev)],
                )
                .await
            }
        };
        let r = add("\"0\"").await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        assert_eq!(r.headers[header::ETAG], "\"1\"");
        assert_eq!(r.json["revision"], 1);
        let r = add("\"0\"").await;
        assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
        assert!(r.text.contains("revision 1"), "{}", r.text);
        assert_eq!(add("\"x\"").await.status, StatusCode::BAD_REQUEST);
        assert_eq!(add("*").await.status, StatusCode::OK);
        assert_eq!(state.revision(), 2);
        let r = send(
            &app,
            "PUT",
            "/v1/rules",
            r#"{"revision":1,"rules":[]}"#,
            &[bearer()],
        )
        .await;
        assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.text);
        assert!(r.json["error"]
            .as_str()
            .unwrap()
            .starts_with("revision: 1 is stale"));
        let r = send(
            &app,
            "DELETE",
            "/v1/rules?path=/a",
            "",
            &[bearer(), ("if-match", "W/\"1\"")],
        )
        .await;
        assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
        assert_eq!(state.policy().rules.len(), 1, "nothing changed");
        let r = send(
            &app,
            "PUT",
            "/v1/rules",
            r#"{"revision":2,"rules":[]}"#,
            &[bearer()],
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!((state.revision(), state.policy().rules.len()), (3, 0));
    }

    #[tokio::test]
    async fn accepted_changes_are_on_disk_before_the_answer_and_reload_keeps_bad_files_out() {
        let dir = std::env::temp_dir().join(format!("filterd-api-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("policy.toml");
        std::fs::write(&file, "").unwrap();
        let (app, state) = secured(Some(file.clone()));
        let r = send(
            &app,
            "POST",
            "/v1/rules",
            r#"{"path":"/p/","match":"prefix","methods":["GET"]}"#,
            &[bearer()],
        )
        .await;
        assert_eq!(r.status, StatusCode::CREATED);
        let (on_disk, rev) = policy::load_document(&file).unwrap();
        assert_eq!((on_disk, rev), (state.policy(), 1));

        // A broken file: reload refuses it and keeps the policy.
        std::fs::write(&file, "[[rules]]\npath = \"nope\"\nmethods = [\"GET\"]\n").unwrap();
        let err = state.reload().unwrap_err();
        assert!(
            err.contains("line 1") && err.contains("rules[0].path"),
            "{err}"
        );
        assert_eq!(state.policy().rules.len(), 1);
        // A good one replaces it and bumps the revision.
        std::fs::write(&file, "[[rules]]\npath = \"/q\"\nmethods = [\"PUT\"]\n").unwrap();
        assert_eq!(state.reload().unwrap(), 2);
        assert!(state.policy().exact("/q").is_some());
        assert_eq!(policy::load_document(&file).unwrap().1, 2);

        // A write that cannot be persisted is refused and changes nothing.
        std::fs::remove_dir_all(&dir).unwrap();
        let r = send(
            &app,
            "POST",
            "/v1/rules",
            r#"{"path":"/r","methods":["GET"]}"#,
            &[bearer()],
        )
        .await;
        assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(state.policy().exact("/r").is_none());
        assert_eq!(state.revision(), 2);
    }

    #[tokio::test]
    async fn oversized_bodies_are_refused() {
        let (app, _) = app(false);
        let big = format!(r#"{{"rules":[],"pad":"{}"}}"#, "x".repeat(BODY_LIMIT + 1));
        let r = send(&app, "PUT", "/v1/rules", &big, &[]).await;
        assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn every_route_is_in_the_openapi_document_and_answers() {
        let (app, _) = secured(None);
        let r = send(&app, "GET", OPENAPI_PATH, "", &[]).await;
        assert_eq!(r.status, StatusCode::OK);
        let doc = r.json;
        assert_eq!(doc["openapi"], "3.1.0");
        let mut documented = 0;
        for route in routes() {
            let op = &doc["paths"][route.path][route.method.to_lowercase()];
            assert!(
                op.is_object(),
                "{} {} is not documented",
                route.method,
                route.path
            );
            documented += 1;
            // And the router really serves it (not 404 / 405).
            let uri = if route.method == "DELETE" {
                format!("{}?path=/nope", route.path)
            } else {
                route.path.to_owned()
            };
            let r = send(&app, route.method, &uri, "{}", &[bearer()]).await;
            assert!(
                r.status != StatusCode::NOT_FOUND || route.method == "DELETE",
                "{} {} -> {}",
                route.method,
                route.path,
                r.status
            );
            assert_ne!(r.status, StatusCode::METHOD_NOT_ALLOWED);
            for (_, _, schema) in route.responses {
                if let Some(s) = schema {
                    assert!(doc["components"]["schemas"][s].is_object(), "schema {s}");
                }
            }
        }
        // Nothing is routed that the document does not list: an undocumented method on a
        // documented path is 405, an unknown path 404.
        let paths = doc["paths"].as_object().unwrap();
        let ops: usize = paths.values().map(|p| p.as_object().unwrap().len()).sum();
        assert_eq!(ops, documented + 1, "the document lists itself too");
        assert_eq!(
            send(&app, "PATCH", "/v1/rules", "", &[bearer()])
                .await
                .status,
            StatusCode::METHOD_NOT_ALLOWED
        );
    }

    /// The schemas name exactly the fields serde reads and writes.
    #[test]
    fn schemas_match_the_serde_types() {
        let s = schemas();
        let props = |name: &str| {
            let mut v: Vec<String> = s[name]["properties"]
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect();
            v.sort();
            v
        };
        let keys = |v: Value| {
            let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        let rule = RuleSpec {
            path: "/a/".into(),
            methods: vec!["GET".into()],
            match_kind: Some("prefix".into()),
            mode: Some("monitor".into()),
            head: Some(false),
        };
        assert_eq!(keys(serde_json::to_value(&rule).unwrap()), props("Rule"));
        let full = PolicyFile {
            revision: Some(1),
            default: Some(policy::DefaultSpec::Keyword("any".into())),
            options: Some("pass".into()),
            oversize: Some("reject".into()),
            paths: Some("strict".into()),
            rules: vec![rule.clone()],
        };
        assert_eq!(keys(serde_json::to_value(&full).unwrap()), props("Policy"));
        let set = RuleSetSpec {
            revision: Some(1),
            rules: vec![],
        };
        assert_eq!(keys(serde_json::to_value(&set).unwrap()), props("RuleSet"));
        let change = RuleChange { revision: 1, rule };
        assert_eq!(
            keys(serde_json::to_value(&change).unwrap()),
            props("RuleChange")
        );
        // deny_unknown_fields on the Rust side <=> additionalProperties: false in the schema.
        for name in ["Rule", "RuleSet", "Policy"] {
            assert_eq!(s[name]["additionalProperties"], false, "{name}");
        }
    }

    #[test]
    fn metrics_have_every_reason_and_valid_lines() {
        let counters = BTreeMap::from([
            ("rejected".to_owned(), 5u64),
            ("responses_sent".to_owned(), 4),
        ]);
        let p = Policy::from_specs(policy::DefaultPolicy::Any, &[RuleSpec::new("/a", &["GET"])])
            .unwrap();
        let text = render_metrics(
            &counters,
            &[],
            &p,
            9,
            &[MapFill {
                map: "RULES_A",
                entries: 1,
                capacity: 10,
            }],
            0,
            &SinkStatus::default(),
        );
        for r in Reason::ALL {
            assert!(
                text.contains(&format!(
                    "filterd_packets_total{{reason=\"{}\"}} ",
                    r.name()
                )),
                "{}",
                r.name()
            );
        }
        assert!(text.contains("filterd_packets_total{reason=\"rejected\"} 5\n"));
        assert!(text.contains("filterd_responses_total{result=\"sent\"} 4\n"));
        assert!(text.contains("filterd_rules{match=\"exact\",mode=\"enforce\"} 1\n"));
        assert!(text.contains("filterd_map_entries{map=\"RULES_A\"} 1\n"));
        assert!(text.contains("filterd_policy_revision 9\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, v) = line.rsplit_once(' ').unwrap();
            v.parse::<u64>().unwrap_or_else(|_| panic!("{line}"));
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label_value("/plain/path"), "/plain/path");
        assert_eq!(label_value("/a\"b\\c\nd"), "/a\\\"b\\\\c\\nd");
    }

    #[test]
    fn metrics_count_rejections_and_monitor_hits_by_rule_and_method() {
        let p = Policy::from_specs(
            policy::DefaultPolicy::Any,
            &[
                RuleSpec::new("/admin", &["GET"]),
                RuleSpec {
                    match_kind: Some("prefix".into()),
                    ..RuleSpec::new("/beta/", &["GET"])
                },
            ],
        )
        .unwrap();
        // Room for two rule series: the third rule seen is folded.
        let hits = RuleHits::with_limit(2);
        hits.set_policy(&p);
        let get = Method::Get.bit() | Method::Head.bit();
        for _ in 0..3 {
            hits.record(b"/admin", 6, get, Method::Delete, Outcome::Rejected);
        }
        hits.record(b"/beta/x", 7, get, Method::Post, Outcome::Monitored);
        hits.record(b"/elsewhere", 10, 0, Method::Put, Outcome::Rejected);
        hits.record(b"/admin", 6, get, Method::Put, Outcome::Rejected);
        // A rule path needing escapes (no policy makes one; the renderer must not care).
        hits.add(HitKey {
            rule: RuleRef::Rule(RuleKey::exact("/q\"uote\\")),
            method: "PATCH",
            outcome: Outcome::Rejected,
        });
        let text = render_metrics(
            &BTreeMap::new(),
            &hits.snapshot(),
            &p,
            1,
            &[],
            0,
            &SinkStatus::default(),
        );
        let samples = |name: &str| -> Vec<&str> {
            text.lines()
                .filter(|l| l.starts_with(&format!("{name}{{")))
                .collect()
        };
        assert_eq!(
            samples("filterd_rejections_total"),
            [
                "filterd_rejections_total{rule=\"/admin\",match=\"exact\",method=\"DELETE\"} 3",
                "filterd_rejections_total{rule=\"(default)\",match=\"none\",method=\"PUT\"} 1",
                "filterd_rejections_total{rule=\"(other)\",match=\"exact\",method=\"PATCH\"} 1",
                "filterd_rejections_total{rule=\"(other)\",match=\"exact\",method=\"PUT\"} 1",
            ],
            "{text}"
        );
        assert_eq!(
            samples("filterd_monitor_hits_total"),
            ["filterd_monitor_hits_total{rule=\"/beta/\",match=\"prefix\",method=\"POST\"} 1"]
        );
        for name in ["filterd_rejections_total", "filterd_monitor_hits_total"] {
            assert!(text.contains(&format!("# TYPE {name} counter\n")), "{name}");
        }
        // Escaping, shown on a table with room for it.
        let hits = RuleHits::default();
        hits.add(HitKey {
            rule: RuleRef::Rule(RuleKey::exact("/q\"uote\\")),
            method: "PATCH",
            outcome: Outcome::Rejected,
        });
        let text = render_metrics(
            &BTreeMap::new(),
            &hits.snapshot(),
            &p,
            1,
            &[],
            0,
            &SinkStatus::default(),
        );
        assert!(
            text.contains(
                "filterd_rejections_total{rule=\"/q\\\"uote\\\\\",match=\"exact\",method=\"PATCH\"} 1\n"
            ),
            "{text}"
        );
    }

    #[tokio::test]
    async fn stats_and_metrics_attribute_events_to_the_rules_in_force() {
        let rec = Recorder::default();
        let hits = rec.hits.clone();
        let app = router(AppState::new(Policy::default(), Box::new(rec)));
        let r = send(
            &app,
            "POST",
            "/v1/rules",
            r#"{"path":"/admin","methods":["GET"]}"#,
            &[],
        )
        .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let get = Method::Get.bit() | Method::Head.bit();
        hits.record(b"/admin", 6, get, Method::Delete, Outcome::Rejected);
        hits.record(b"/admin", 6, get, Method::Delete, Outcome::Rejected);
        let (s, body) = call(&app, "GET", "/v1/stats", "").await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(
            body["by_rule"],
            json!([{"rule":"/admin","match":"exact","method":"DELETE","outcome":"rejected","count":2}])
        );
        let r = send(&app, "GET", "/metrics", "", &[]).await;
        assert!(
            r.text.contains(
                "filterd_rejections_total{rule=\"/admin\",match=\"exact\",method=\"DELETE\"} 2\n"
            ),
            "{}",
            r.text
        );
        // Removed: later events fall to the default; the rule's series stays.
        let r = send(&app, "DELETE", "/v1/rules?path=/admin", "", &[]).await;
        assert!(r.status.is_success(), "{}", r.status);
        hits.record(b"/admin", 6, 0, Method::Delete, Outcome::Rejected);
        let r = send(&app, "GET", "/metrics", "", &[]).await;
        for want in [
            "filterd_rejections_total{rule=\"/admin\",match=\"exact\",method=\"DELETE\"} 2\n",
            "filterd_rejections_total{rule=\"(default)\",match=\"none\",method=\"DELETE\"} 1\n",
        ] {
            assert!(r.text.contains(want), "{want}\n{}", r.text);
        }
    }
}

//! The REST API: `pub fn router(state) -> Router`. Handlers validate input into the policy
//! model, apply it through a [`PolicySink`] (the dataplane), persist it to the policy state
//! file, and only then change the policy they report and acknowledge, so what `GET /v1/rules`
//! shows is what the kernel enforces and what a restart restores.
//!
//! Every route is registered through [`ApiBuilder::route`] together with its description, and
//! `GET /v1/openapi.json` is generated from those descriptions: a route cannot exist without
//! being documented. Routes marked `auth` need `Authorization: Bearer <token>` when the state
//! has a token. Writes carry the policy's revision (`ETag`); a write naming a stale revision
//! (`If-Match` header: 412; `revision` in the body: 409) changes nothing. A write with
//! `?dry_run=true` answers what it would change and changes nothing. Writes need
//! `Content-Type: application/json` (a browser's cross-site form cannot send it), and
//! [`host_guard`] holds `Host` to the address the API serves (DNS rebinding).
//!
//! Who owns the policy ([`PolicyStore`]): the API (`--state FILE`, the daemon's own file,
//! rewritten on every change), or the operator (`--policy FILE|DIR`, read-only: reloaded
//! from there, API writes refused with 409). Every accepted change is logged in one audit line
//! (target `filterd::audit`) naming who made it: the TCP peer, the uid over the Unix socket,
//! or the source that was reloaded.
//!
//! Reads of the dataplane (`/metrics`, `/v1/stats`, `/v1/status`, `/readyz`) go through an
//! [`Observer`] and never take the policy lock, so a scrape never waits for a policy change.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method as HttpMethod, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::{Extension, Json, Router};
use filter_common::Reason;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::dataplane::{DataplaneError, MapFill};
use crate::document::{self, Diagnostic};
use crate::events::{EventHub, Line, SubscribeError, HEARTBEAT};
use crate::hits::{HitKey, Outcome};
use crate::policy::{
    self, MatchKind, Mode, Policy, PolicyFile, Rule, RuleKey, RuleSetSpec, RuleSpec,
};
use crate::serve::Peer;

/// Where validated policy changes go: the dataplane in the daemon.
pub trait PolicySink: Send {
    fn replace(&mut self, policy: &Policy) -> Result<(), DataplaneError>;
    fn upsert(&mut self, rule: &Rule) -> Result<(), DataplaneError>;
    fn remove(&mut self, key: &RuleKey) -> Result<(), DataplaneError>;
    /// Called after a change is applied and persisted, with the policy now in force.
    fn committed(&mut self, _policy: &Policy) {}
    /// What reads the dataplane without the policy lock. Asked once, when the state is built.
    fn observer(&self) -> Arc<dyn Observer> {
        Arc::new(NoObserver)
    }
    /// Let go of the kernel objects at exit (`fail_open`: detach).
    fn release(&mut self, _fail_open: bool) {}
}

/// Reads of the dataplane and the responder, safe to make while a policy change runs.
pub trait Observer: Send + Sync {
    /// Counters by name: kernel verdict reasons, `responses_sent`, `responses_failed`,
    /// `responses_limited`.
    fn counters(&self) -> Result<BTreeMap<String, u64>, DataplaneError> {
        Ok(BTreeMap::new())
    }
    /// Rejections and monitor hits by rule, method and outcome ([`crate::hits`]), sorted.
    fn rule_hits(&self) -> Vec<(HitKey, u64)> {
        Vec::new()
    }
    /// Policy map entries and capacities, and the connection table's.
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
    /// Whether every configured interface has both classifiers attached, asked of the kernel;
    /// `Err` names what is missing (`/readyz`).
    fn ready(&self) -> Result<(), Vec<String>> {
        Ok(())
    }
    /// The live feed of refusals (`/v1/events`).
    fn events(&self) -> Option<Arc<EventHub>> {
        None
    }
}

/// An observer of nothing (tests, a daemon without a dataplane).
pub struct NoObserver;

impl Observer for NoObserver {}

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

/// Who owns the policy and where it lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyStore {
    /// API-owned (`--state FILE`): the daemon's own file, loaded at start (missing: an empty
    /// policy) and rewritten on every accepted API change.
    State(PathBuf),
    /// Operator-owned (`--policy PATH`), read-only: a file, or a directory of `*.toml` files
    /// (a mounted ConfigMap). Never written; reloaded from there (SIGHUP, or when the watch
    /// sees it change). API writes are refused (409).
    ReadOnly(PathBuf),
}

impl PolicyStore {
    pub fn path(&self) -> &Path {
        match self {
            PolicyStore::State(p) | PolicyStore::ReadOnly(p) => p,
        }
    }

    /// `state`, `file` or `directory` (`/v1/status`).
    pub fn kind(&self) -> &'static str {
        match self {
            PolicyStore::State(_) => "state",
            PolicyStore::ReadOnly(p) if p.is_dir() => "directory",
            PolicyStore::ReadOnly(_) => "file",
        }
    }

    /// Read and check the policy: every error, placed. A `--state` file that does not exist
    /// yet is an empty policy at revision 0 when `missing_ok` (the first start).
    pub fn load(&self, missing_ok: bool) -> document::Checked {
        match self {
            PolicyStore::State(p) if missing_ok && !p.exists() => Ok((Policy::default(), 0)),
            PolicyStore::State(p) => document::check_source(p),
            PolicyStore::ReadOnly(p) => document::check_source(p).map(|(p, _)| (p, 0)),
        }
    }

    fn save(&self, policy: &Policy, revision: u64) -> Result<(), policy::PolicyFileError> {
        let PolicyStore::State(path) = self else {
            return Ok(());
        };
        policy::write_atomic(path, &policy::render_toml(policy, revision)).map_err(|source| {
            policy::PolicyFileError::Write {
                path: path.display().to_string(),
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

/// Who made a policy change, for the audit line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Actor {
    /// The API client (`127.0.0.1:51234`, `uid 0 (pid 812) on the Unix socket`), or the source
    /// that was reloaded.
    pub who: String,
    /// `api`, `reload` (SIGHUP, or the watch saw the source change).
    pub via: &'static str,
}

impl Actor {
    fn api(peer: Option<&Peer>) -> Actor {
        Actor {
            who: peer.map_or_else(|| "in-process".to_owned(), ToString::to_string),
            via: "api",
        }
    }

    /// A reload of the policy source, for `why` (`SIGHUP`, `the watch`).
    pub fn reload(why: &str) -> Actor {
        Actor {
            who: why.to_owned(),
            via: "reload",
        }
    }
}

/// The last accepted change (`/v1/status`).
#[derive(Clone, Debug, Serialize)]
pub struct LastChange {
    pub who: String,
    pub via: &'static str,
    pub at: String,
    pub revision: u64,
    pub change: &'static str,
    pub summary: String,
}

/// How the policy source's last load went (`/v1/status`, `/metrics`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct SourceHealth {
    /// The last load or reload applied (or found nothing to change).
    pub ok: bool,
    pub at: Option<String>,
    /// Why the source's current content is not in force: every error, placed.
    pub errors: Vec<String>,
    /// Reloads that failed since start.
    pub failures: u64,
}

/// What `/metrics` reports of the policy, kept apart from the policy lock.
#[derive(Clone, Debug, Default)]
struct Summary {
    revision: u64,
    /// Rules by (match kind, mode): exact/enforce, exact/monitor, prefix/enforce,
    /// prefix/monitor.
    rules: [u64; 4],
}

impl Summary {
    fn of(policy: &Policy, revision: u64) -> Summary {
        let mut rules = [0u64; 4];
        for r in policy.rules.values() {
            let i =
                usize::from(r.kind == MatchKind::Prefix) * 2 + usize::from(r.mode == Mode::Monitor);
            rules[i] += 1;
        }
        Summary { revision, rules }
    }
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
    observer: Arc<dyn Observer>,
    summary: Mutex<Summary>,
    last_change: Mutex<Option<LastChange>>,
    source: Mutex<SourceHealth>,
}

/// Shared state of the API: the policy, its revision and the sink, behind one lock so that each
/// change is validated, applied, persisted and recorded as one step.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

/// What a reload did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reloaded {
    /// The source holds the policy in force.
    Unchanged(u64),
    /// Applied at this revision.
    Applied(u64),
}

/// Why a reload kept the policy in force.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("no policy source to reload (start filterd with --policy or --state)")]
    NoSource,
    #[error("{} (the policy in force is kept)", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<Diagnostic>),
    #[error("{0} (the policy in force is kept)")]
    Apply(String),
}

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
        let observer = sink.observer();
        let summary = Summary::of(&policy, revision);
        AppState(Arc::new(Shared {
            inner: Mutex::new(Inner {
                policy,
                revision,
                sink,
                store,
            }),
            token,
            info,
            observer,
            summary: Mutex::new(summary),
            last_change: Mutex::new(None),
            source: Mutex::new(SourceHealth {
                ok: true,
                at: Some(crate::events::now_rfc3339()),
                ..SourceHealth::default()
            }),
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

    /// How the policy source's last load went.
    pub fn source_health(&self) -> SourceHealth {
        lock(&self.0.source).clone()
    }

    /// The last accepted change.
    pub fn last_change(&self) -> Option<LastChange> {
        lock(&self.0.last_change).clone()
    }

    /// Re-read the policy source (SIGHUP, or the watch saw it change). A source that does not
    /// check keeps the policy in force and says why (every error, placed), here, in
    /// `/v1/status` and in `/metrics`; a valid one is applied atomically under a new revision.
    pub fn reload(&self, actor: &Actor) -> Result<Reloaded, ReloadError> {
        let result = self.reload_inner(actor);
        let mut health = lock(&self.0.source);
        health.at = Some(crate::events::now_rfc3339());
        match &result {
            Ok(_) => {
                health.ok = true;
                health.errors.clear();
            }
            Err(ReloadError::NoSource) => {}
            Err(e) => {
                health.ok = false;
                health.failures += 1;
                health.errors = match e {
                    ReloadError::Invalid(d) => document::one_per_line(d),
                    other => vec![other.to_string()],
                };
            }
        }
        result
    }

    fn reload_inner(&self, actor: &Actor) -> Result<Reloaded, ReloadError> {
        let store = self.lock().store.clone().ok_or(ReloadError::NoSource)?;
        // Read and check without the lock: a large file takes a while.
        let (next, file_revision) = store.load(false).map_err(ReloadError::Invalid)?;
        let mut inner = self.lock();
        if next == inner.policy {
            return Ok(Reloaded::Unchanged(inner.revision));
        }
        let revision = inner.revision.max(file_revision) + 1;
        commit(&self.0, &mut inner, next, Change::Replace, revision, actor)
            .map_err(|e| ReloadError::Apply(e.1))?;
        Ok(Reloaded::Applied(revision))
    }

    /// Hand the sink its exit (see [`PolicySink::release`]).
    pub fn release(&self, fail_open: bool) {
        self.lock().sink.release(fail_open);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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
            .layer(middleware::from_fn(json_writes))
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
    const DRY_RUN: (&str, bool, &str) = (
        "dry_run",
        false,
        "`true`: answer what the change would do (a DryRun: the diff), change nothing",
    );
    vec![
        RouteDoc {
            responses: &[(200, "The daemon answers", Some("Health"))],
            ..d("GET", "/healthz", "Liveness check", false)
        },
        RouteDoc {
            responses: &[
                (200, "Every configured interface has both classifiers attached", Some("Readiness")),
                (503, "An interface is missing a classifier (named in `missing`)", Some("Readiness")),
            ],
            ..d(
                "GET",
                "/readyz",
                "Readiness: the classifiers are attached on every interface, asked of the kernel",
                false,
            )
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
            query: &[DRY_RUN],
            responses: &[
                (200, "The policy now in force (with dry_run: the changes, as DryRun)", Some("Policy")),
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
            query: &[DRY_RUN],
            responses: &[
                (200, "The rules now in force (with dry_run: the changes, as DryRun)", Some("RuleSet")),
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
            query: &[DRY_RUN],
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
                DRY_RUN,
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
            query: &[
                ("method", true, "The request method, e.g. DELETE"),
                ("target", true, "The request target as sent, e.g. /api/%61dmin/../x?y"),
                ("header", false, "A request header `Name: value` (repeatable), e.g. a method override"),
            ],
            responses: &[
                (200, "What the filter does with the request", Some("Explanation")),
                (400, "Missing or invalid parameter", ERR),
                UNAUTH,
            ],
            ..d(
                "GET",
                "/v1/explain",
                "Explain the decision on a request: canonical path, rule, Allow set, answer",
                true,
            )
        },
        RouteDoc {
            responses: &[
                (200, "application/x-ndjson (or text/event-stream with `Accept: text/event-stream`): one Event per line as it happens; `{\"type\":\"lost\",\"count\":N}` when the reader fell behind, `{\"type\":\"heartbeat\"}` every 15 s", None),
                UNAUTH,
                (503, "Too many readers already", ERR),
            ],
            ..d(
                "GET",
                "/v1/events",
                "Live feed of refusals and monitor-mode hits",
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
            ("GET", "/readyz") => b.route(doc, readyz),
            ("GET", "/v1/explain") => b.route(doc, explain),
            ("GET", "/v1/events") => b.route(doc, events),
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

/// Writes (`POST`, `PUT`) must say `Content-Type: application/json`: an HTML form cannot, so
/// a page in the operator's browser cannot post to the API behind its back (with `--no-auth`
/// there is no token to stop it).
async fn json_writes(req: Request, next: Next) -> Response {
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

impl Change {
    fn name(&self) -> &'static str {
        match self {
            Change::Replace => "replace",
            Change::Upsert(_) => "upsert",
            Change::Remove(_) => "remove",
        }
    }
}

/// Apply `next` (reached from the policy in force by `change`) to the sink, persist it, and
/// only then make it the policy in force at `revision`; log the audit line. On any failure
/// nothing changes.
fn commit(
    shared: &Shared,
    inner: &mut Inner,
    next: Policy,
    change: Change,
    revision: u64,
    actor: &Actor,
) -> Result<(), ApiError> {
    if actor.via == "api" {
        writable(inner)?;
    }
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
                "the policy state file could not be written; the policy in force is unchanged"
                    .into(),
            ));
        }
    }
    let (switches, added, removed, changed) = crate::diff::counts(&inner.policy, &next);
    inner.policy = next;
    inner.revision = revision;
    inner.sink.committed(&inner.policy);
    *lock(&shared.summary) = Summary::of(&inner.policy, revision);
    let summary = format!(
        "{switches} switches, {added} rules added, {removed} removed, {changed} changed; {} rules in force",
        inner.policy.rules.len()
    );
    tracing::info!(
        target: "filterd::audit",
        who = %actor.who,
        via = actor.via,
        change = change.name(),
        revision,
        switches,
        added,
        removed,
        changed,
        rules = inner.policy.rules.len(),
        "policy changed"
    );
    *lock(&shared.last_change) = Some(LastChange {
        who: actor.who.clone(),
        via: actor.via,
        at: crate::events::now_rfc3339(),
        revision,
        change: change.name(),
        summary,
    });
    Ok(())
}

/// 409 when the policy is the operator's (`--policy`): the API does not write it.
fn writable(inner: &Inner) -> Result<(), ApiError> {
    match &inner.store {
        Some(PolicyStore::ReadOnly(path)) => Err(ApiError(
            StatusCode::CONFLICT,
            format!(
                "the policy is read-only: filterd loads it from {} (--policy), watches it and never writes it; change that file (or its ConfigMap), or run filterd with --state FILE to manage the policy through the API",
                path.display()
            ),
        )),
        _ => Ok(()),
    }
}

/// `?dry_run=true` on a write.
#[derive(Deserialize, Default)]
struct WriteQuery {
    dry_run: Option<bool>,
}

/// The answer to a write with `?dry_run=true`: what it would change.
#[derive(Serialize)]
pub struct DryRun {
    pub dry_run: bool,
    /// The revision in force (nothing changed).
    pub revision: u64,
    /// The revision the change would make.
    pub would_be_revision: u64,
    pub changes: crate::diff::PolicyDiff,
}

fn dry_run_answer(inner: &Inner, next: &Policy) -> Response {
    (
        etag(inner.revision),
        Json(DryRun {
            dry_run: true,
            revision: inner.revision,
            would_be_revision: inner.revision + 1,
            changes: crate::diff::diff(&inner.policy, next),
        }),
    )
        .into_response()
}

fn query_of(
    q: Result<Query<WriteQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<bool, ApiError> {
    Ok(q.map_err(|e| bad_request(format!("query: {e}")))?
        .0
        .dry_run
        .unwrap_or(false))
}

fn peer_of(p: &Option<Extension<Peer>>) -> Option<&Peer> {
    p.as_ref().map(|Extension(p)| p)
}

// ---------------------------------------------------------------------------
// Handlers

async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn readyz(State(state): State<AppState>) -> Response {
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
    peer: Option<Extension<Peer>>,
    query: Result<Query<WriteQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let dry = query_of(query)?;
    let actor = Actor::api(peer_of(&peer));
    off_the_workers(move || {
        let doc: PolicyFile = parse_json(&body)?;
        let next = Policy::from_file(&doc).map_err(|e| bad_request(e.to_string()))?;
        let mut inner = state.lock();
        check_revision(&headers, doc.revision, inner.revision)?;
        if dry {
            return Ok(dry_run_answer(&inner, &next));
        }
        let revision = inner.revision + 1;
        commit(
            &state.0,
            &mut inner,
            next,
            Change::Replace,
            revision,
            &actor,
        )?;
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
    peer: Option<Extension<Peer>>,
    query: Result<Query<WriteQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let dry = query_of(query)?;
    let actor = Actor::api(peer_of(&peer));
    off_the_workers(move || {
        let spec: RuleSetSpec = parse_json(&body)?;
        let mut inner = state.lock();
        check_revision(&headers, spec.revision, inner.revision)?;
        let next = inner
            .policy
            .with_rules(&spec.rules)
            .map_err(|e| bad_request(e.to_string()))?;
        if dry {
            return Ok(dry_run_answer(&inner, &next));
        }
        let revision = inner.revision + 1;
        commit(
            &state.0,
            &mut inner,
            next,
            Change::Replace,
            revision,
            &actor,
        )?;
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
    peer: Option<Extension<Peer>>,
    query: Result<Query<WriteQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let dry = query_of(query)?;
    let actor = Actor::api(peer_of(&peer));
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
        if dry {
            return Ok(dry_run_answer(&inner, &next));
        }
        let revision = inner.revision + 1;
        let out = rule.to_spec();
        commit(
            &state.0,
            &mut inner,
            next,
            Change::Upsert(rule),
            revision,
            &actor,
        )?;
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
    dry_run: Option<bool>,
}

async fn remove_rule(
    State(state): State<AppState>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
    query: Result<Query<RuleQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let q = query.map_err(|e| bad_request(format!("query: {e}")))?.0;
    let dry = q.dry_run.unwrap_or(false);
    let actor = Actor::api(peer_of(&peer));
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
        if dry {
            return Ok(dry_run_answer(&inner, &next));
        }
        let revision = inner.revision + 1;
        commit(
            &state.0,
            &mut inner,
            next,
            Change::Remove(key),
            revision,
            &actor,
        )?;
        Ok((StatusCode::NO_CONTENT, etag(revision)).into_response())
    })
    .await
}

async fn explain(
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

async fn events(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
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

async fn stats(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let observer = state.0.observer.clone();
    let (counters, hits) =
        tokio::task::spawn_blocking(move || observer.counters().map(|c| (c, observer.rule_hits())))
            .await
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    let by_rule: Vec<Value> = hits
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
    let summary = lock(&state.0.summary).clone();
    Ok(Json(json!({
        "counters": counters,
        "by_rule": by_rule,
        "rules": summary.rules.iter().sum::<u64>(),
        "revision": summary.revision,
    })))
}

async fn status(State(state): State<AppState>) -> Json<Value> {
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

async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let s = state.clone();
    // The kernel's counters and the connection table are read on a blocking thread, without
    // the policy lock.
    let text = tokio::task::spawn_blocking(move || -> Result<String, ApiError> {
        let o = &s.0.observer;
        let counters = o.counters()?;
        let summary = lock(&s.0.summary).clone();
        let health = s.source_health();
        let events = o.events();
        Ok(render_metrics(&MetricsInput {
            counters: &counters,
            hits: &o.rule_hits(),
            rules: summary.rules,
            revision: summary.revision,
            fill: &o.map_fill(),
            write_failures: o.write_failures(),
            status: &o.status(),
            reload_ok: health.ok,
            reload_failures: health.failures,
            event_readers: events.as_ref().map_or(0, |h| h.subscribers()),
            event_lost: events.as_ref().map_or(0, |h| h.lost()),
        }))
    })
    .await
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
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

/// Reasons the kernel counts besides a packet's own verdict (the packet is counted under its
/// verdict too): each its own counter in `/metrics`, out of `filterd_packets_total`, whose
/// reasons add up to the packets and requests decided. Every other reason is a verdict
/// (`reset_failed` included: the segment is dropped and counted there only).
pub const EXTRA_COUNTS: [(Reason, &str, &str); 4] = [
    (
        Reason::EventLost,
        "filterd_events_lost_total",
        "Refusals whose event did not fit the kernel's ring buffer: the backend was reset, the client got no answer.",
    ),
    (
        Reason::ReplyLost,
        "filterd_replies_lost_total",
        "Connections whose responses the egress classifier could not frame (they fall back to refusing without waiting for earlier responses).",
    ),
    (
        Reason::UrgentCleared,
        "filterd_urgent_cleared_total",
        "Segments whose TCP urgent pointer was cleared so the server reads the urgent byte in line.",
    ),
    (
        Reason::UpgradeRefused,
        "filterd_upgrades_refused_total",
        "Upgrade or CONNECT requests the backend answered without switching protocols (the connection goes on as HTTP/1.1).",
    ),
];

/// What [`render_metrics`] renders.
pub struct MetricsInput<'a> {
    pub counters: &'a BTreeMap<String, u64>,
    /// The rows of [`crate::hits::RuleHits`].
    pub hits: &'a [(HitKey, u64)],
    /// Rules by (match, mode): exact/enforce, exact/monitor, prefix/enforce, prefix/monitor.
    pub rules: [u64; 4],
    pub revision: u64,
    pub fill: &'a [MapFill],
    pub write_failures: u64,
    pub status: &'a SinkStatus,
    pub reload_ok: bool,
    pub reload_failures: u64,
    pub event_readers: usize,
    pub event_lost: u64,
}

/// The Prometheus text exposition of the daemon's state.
pub fn render_metrics(m: &MetricsInput<'_>) -> String {
    use std::fmt::Write as _;
    let counters = m.counters;
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, u64)>| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    let count = |r: Reason| counters.get(r.name()).copied().unwrap_or(0);
    family(
        "filterd_build_info",
        "gauge",
        "The build: version, git revision, SHA-256 of the embedded kernel object.",
        vec![(
            format!(
                "{{version=\"{}\",revision=\"{}\",bpf_object_sha256=\"{}\"}}",
                env!("CARGO_PKG_VERSION"),
                label_value(crate::GIT_REVISION),
                crate::BPF_OBJECT_SHA256
            ),
            1,
        )],
    );
    family(
        "filterd_packets_total",
        "counter",
        "Packets and requests the classifiers decided on, by verdict reason (kernel counters; see ARCHITECTURE.md).",
        Reason::ALL
            .iter()
            .filter(|r| !EXTRA_COUNTS.iter().any(|(x, _, _)| x == *r))
            .map(|r| (format!("{{reason=\"{}\"}}", r.name()), count(*r)))
            .collect(),
    );
    for (r, name, help) in EXTRA_COUNTS {
        family(name, "counter", help, vec![(String::new(), count(r))]);
    }
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
            m.hits
                .iter()
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
    for (i, (kind, mode)) in [
        ("exact", "enforce"),
        ("exact", "monitor"),
        ("prefix", "enforce"),
        ("prefix", "monitor"),
    ]
    .into_iter()
    .enumerate()
    {
        rules.push((format!("{{match=\"{kind}\",mode=\"{mode}\"}}"), m.rules[i]));
    }
    family("filterd_rules", "gauge", "Rules in force.", rules);
    family(
        "filterd_map_entries",
        "gauge",
        "Entries in the kernel's maps: the policy in force (rules_exact, rules_prefix) and the connection table (connections).",
        m.fill
            .iter()
            .map(|f| (format!("{{map=\"{}\"}}", f.map), f.entries as u64))
            .collect(),
    );
    family(
        "filterd_map_capacity",
        "gauge",
        "Capacity of the kernel's maps (as filterd_map_entries).",
        m.fill
            .iter()
            .map(|f| (format!("{{map=\"{}\"}}", f.map), f.capacity as u64))
            .collect(),
    );
    family(
        "filterd_map_write_failures_total",
        "counter",
        "Kernel map writes that failed (the change was refused).",
        vec![(String::new(), m.write_failures)],
    );
    family(
        "filterd_policy_revision",
        "gauge",
        "Revision of the policy in force.",
        vec![(String::new(), m.revision)],
    );
    family(
        "filterd_policy_last_reload_successful",
        "gauge",
        "1 when the policy source's last load was applied (or held the policy in force); 0 when it does not check and the previous policy is kept (see /v1/status).",
        vec![(String::new(), u64::from(m.reload_ok))],
    );
    family(
        "filterd_policy_reload_failures_total",
        "counter",
        "Reloads of the policy source that were refused.",
        vec![(String::new(), m.reload_failures)],
    );
    family(
        "filterd_dry_run",
        "gauge",
        "1 when the daemon runs with --dry-run (nothing is blocked).",
        vec![(String::new(), m.status.dry_run as u64)],
    );
    family(
        "filterd_interfaces_attached",
        "gauge",
        "Interfaces the classifier is attached to.",
        vec![(String::new(), m.status.interfaces.len() as u64)],
    );
    family(
        "filterd_event_readers",
        "gauge",
        "Readers of the live event feed (/v1/events).",
        vec![(String::new(), m.event_readers as u64)],
    );
    family(
        "filterd_event_feed_lost_total",
        "counter",
        "Events readers of the live feed lost by falling behind.",
        vec![(String::new(), m.event_lost)],
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
        "Readiness": {
            "type": "object", "required": ["ready", "missing"],
            "properties": {
                "ready": {"type": "boolean"},
                "missing": {"type": "array", "items": {"type": "string"}, "description": "`IFACE HOOK: why` for each classifier not attached"}
            }
        },
        "Explanation": {
            "type": "object",
            "properties": {
                "method": {"type": "string"},
                "target": {"type": "string"},
                "path": {"type": ["string", "null"], "description": "The path as the request line carries it (no query)"},
                "canonical": {"type": ["string", "null"], "description": "The path rules are looked up with"},
                "path_refused": {"type": ["string", "null"], "description": "Why the path is refused (400)"},
                "rule": {"type": ["object", "null"], "properties": {
                    "path": {"type": "string"}, "match": {"type": "string", "enum": ["exact", "prefix"]},
                    "mode": {"type": "string", "enum": ["enforce", "monitor"]},
                    "methods": {"type": "array", "items": {"type": "string"}}
                }},
                "allow": {"type": "array", "items": {"type": "string"}, "description": "The Allow set; [\"*\"]: any method"},
                "override_method": {"type": ["string", "null"]},
                "reasons": {"type": "array", "items": {"type": "string"}, "description": "What the kernel counts"},
                "verdict": {"type": "string", "enum": ["pass", "monitor", "refuse"]},
                "answer": {"type": ["integer", "null"], "description": "405, 400, 414, 431 or 204 when refused"},
                "summary": {"type": "string"},
                "revision": {"type": "integer"}
            }
        },
        "DryRun": {
            "type": "object",
            "properties": {
                "dry_run": {"type": "boolean"},
                "revision": {"type": "integer"},
                "would_be_revision": {"type": "integer"},
                "changes": {"type": "object", "properties": {
                    "switches": {"type": "array", "items": {"type": "object", "properties": {"field": {"type": "string"}, "before": {}, "after": {}}}},
                    "added": {"type": "array", "items": {"$ref": "#/components/schemas/Rule"}},
                    "removed": {"type": "array", "items": {"$ref": "#/components/schemas/Rule"}},
                    "changed": {"type": "array", "items": {"type": "object", "properties": {
                        "before": {"$ref": "#/components/schemas/Rule"}, "after": {"$ref": "#/components/schemas/Rule"}}}},
                    "unchanged": {"type": "integer"}
                }}
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
        let write = matches!(d.method, "POST" | "PUT" | "DELETE");
        let mut extra: Vec<(u16, &str, Option<&str>)> = Vec::new();
        if write {
            extra.push((
                409,
                "The policy is read-only (filterd --policy): change its file",
                ERR,
            ));
        }
        if matches!(d.method, "POST" | "PUT") {
            extra.push((415, "Content-Type is not application/json", ERR));
        }
        for (code, desc, schema) in d.responses.iter().chain(extra.iter()) {
            if let Some(r) = responses.get_mut(&code.to_string()) {
                let joined = format!("{}; or: {desc}", r["description"].as_str().unwrap_or(""));
                r["description"] = json!(joined);
                continue;
            }
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
        /// The event feed the observer offers.
        events: Option<Arc<EventHub>>,
        /// What `/readyz` reports missing.
        missing: Vec<String>,
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
        fn committed(&mut self, p: &Policy) {
            self.hits.set_policy(p);
        }
        fn observer(&self) -> Arc<dyn Observer> {
            Arc::new(RecorderView {
                hits: self.hits.clone(),
                events: self.events.clone(),
                missing: self.missing.clone(),
            })
        }
    }

    /// What the API reads of a [`Recorder`].
    struct RecorderView {
        hits: Arc<RuleHits>,
        events: Option<Arc<EventHub>>,
        missing: Vec<String>,
    }

    impl Observer for RecorderView {
        fn counters(&self) -> Result<BTreeMap<String, u64>, DataplaneError> {
            Ok(BTreeMap::from([("rejected".to_owned(), 3)]))
        }
        fn rule_hits(&self) -> Vec<(HitKey, u64)> {
            self.hits.snapshot()
        }
        fn ready(&self) -> Result<(), Vec<String>> {
            if self.missing.is_empty() {
                Ok(())
            } else {
                Err(self.missing.clone())
            }
        }
        fn events(&self) -> Option<Arc<EventHub>> {
            self.events.clone()
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
        // Writes say what they send, as every client of the API does.
        if matches!(method, "POST" | "PUT")
            && !hdrs
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            req = req.header("content-type", "application/json");
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
            store.map(PolicyStore::State),
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
        let err = state
            .reload(&Actor::reload("test"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(":2:8: rules[0].path"), "{err}");
        let health = state.source_health();
        assert!(!health.ok && health.failures == 1, "{health:?}");
        assert!(health.errors[0].contains("rules[0].path"), "{health:?}");
        assert_eq!(state.policy().rules.len(), 1);
        // A good one replaces it and bumps the revision.
        std::fs::write(&file, "[[rules]]\npath = \"/q\"\nmethods = [\"PUT\"]\n").unwrap();
        assert_eq!(
            state.reload(&Actor::reload("test")).unwrap(),
            Reloaded::Applied(2)
        );
        assert!(state.source_health().ok);
        assert_eq!(state.last_change().unwrap().who, "test");
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

    fn input<'a>(
        counters: &'a BTreeMap<String, u64>,
        hits: &'a [(HitKey, u64)],
        fill: &'a [MapFill],
    ) -> MetricsInput<'a> {
        static STATUS: std::sync::OnceLock<SinkStatus> = std::sync::OnceLock::new();
        MetricsInput {
            counters,
            hits,
            rules: [0; 4],
            revision: 9,
            fill,
            write_failures: 0,
            status: STATUS.get_or_init(SinkStatus::default),
            reload_ok: true,
            reload_failures: 0,
            event_readers: 0,
            event_lost: 0,
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
        let text = render_metrics(&MetricsInput {
            rules: Summary::of(&p, 9).rules,
            ..input(
                &counters,
                &[],
                &[MapFill {
                    map: "rules_exact",
                    entries: 1,
                    capacity: 10,
                }],
            )
        });
        // Every reason by name: a verdict in filterd_packets_total, an extra count in a
        // counter of its own (and not in filterd_packets_total).
        for r in Reason::ALL {
            let verdict = format!("filterd_packets_total{{reason=\"{}\"}} ", r.name());
            match EXTRA_COUNTS.iter().find(|(x, _, _)| *x == r) {
                Some((_, name, _)) => {
                    assert!(!text.contains(&verdict), "{}", r.name());
                    assert!(text.contains(&format!("\n{name} 0\n")), "{name}");
                }
                None => assert!(text.contains(&verdict), "{}", r.name()),
            }
        }
        for extra in [
            "event_lost",
            "reply_lost",
            "urgent_cleared",
            "upgrade_refused",
        ] {
            assert!(
                EXTRA_COUNTS.iter().any(|(r, _, _)| r.name() == extra),
                "{extra}"
            );
        }
        assert!(text.contains("filterd_packets_total{reason=\"rejected\"} 5\n"));
        assert!(text.contains("filterd_packets_total{reason=\"reset_failed\"} 0\n"));
        assert!(text.contains("filterd_responses_total{result=\"sent\"} 4\n"));
        assert!(text.contains("filterd_rules{match=\"exact\",mode=\"enforce\"} 1\n"));
        assert!(text.contains("filterd_map_entries{map=\"rules_exact\"} 1\n"));
        assert!(text.contains("filterd_policy_revision 9\n"));
        assert!(text.contains("filterd_policy_last_reload_successful 1\n"));
        assert!(text.contains(&format!(
            "filterd_build_info{{version=\"{}\",revision=\"{}\",bpf_object_sha256=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION"),
            crate::GIT_REVISION,
            crate::BPF_OBJECT_SHA256
        )));
        // Prometheus conventions: counters end in _total, every family has HELP and TYPE
        // once, every sample's value is a number.
        let mut families = std::collections::BTreeSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(families.insert(name.to_owned()), "{name} twice");
                assert_eq!(kind == "counter", name.ends_with("_total"), "{line}");
                assert!(name.starts_with("filterd_"), "{line}");
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
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
        let text = render_metrics(&input(&BTreeMap::new(), &hits.snapshot(), &[]));
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
        let text = render_metrics(&input(&BTreeMap::new(), &hits.snapshot(), &[]));
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

    #[tokio::test]
    async fn dry_runs_answer_the_changes_and_change_nothing() {
        let (app, log) = app(false);
        call(
            &app,
            "PUT",
            "/v1/rules",
            r#"{"rules":[{"path":"/a","methods":["GET"]},{"path":"/b","methods":["GET"]}]}"#,
        )
        .await;
        let r = send(
            &app,
            "PUT",
            "/v1/rules?dry_run=true",
            r#"{"rules":[{"path":"/%61","methods":["GET","PUT"]},{"path":"/c/","match":"prefix","methods":["GET"]}]}"#,
            &[],
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.json["dry_run"], true);
        assert_eq!(
            (&r.json["revision"], &r.json["would_be_revision"]),
            (&json!(1), &json!(2))
        );
        let c = &r.json["changes"];
        assert_eq!(
            c["added"],
            json!([{"path":"/c/","match":"prefix","methods":["GET"]}])
        );
        assert_eq!(c["removed"], json!([{"path":"/b","methods":["GET"]}]));
        assert_eq!(c["changed"][0]["after"]["methods"], json!(["GET", "PUT"]));
        // The other writes too; none of them reaches the dataplane or the revision.
        let r = send(
            &app,
            "PUT",
            "/v1/policy?dry_run=true",
            r#"{"default":["GET"],"rules":[]}"#,
            &[],
        )
        .await;
        assert_eq!(
            r.json["changes"]["switches"][0]["field"], "default",
            "{}",
            r.text
        );
        assert_eq!(r.json["changes"]["removed"].as_array().unwrap().len(), 2);
        let r = send(
            &app,
            "POST",
            "/v1/rules?dry_run=true",
            r#"{"path":"/z","methods":["GET"]}"#,
            &[],
        )
        .await;
        assert_eq!(r.json["changes"]["added"][0]["path"], "/z");
        let r = send(&app, "DELETE", "/v1/rules?path=/a&dry_run=true", "", &[]).await;
        assert_eq!(r.json["changes"]["removed"][0]["path"], "/a", "{}", r.text);
        // Invalid input and stale revisions are refused as without dry_run.
        let r = send(
            &app,
            "PUT",
            "/v1/rules?dry_run=true",
            r#"{"revision":0,"rules":[]}"#,
            &[],
        )
        .await;
        assert_eq!(r.status, StatusCode::CONFLICT);
        let r = send(
            &app,
            "PUT",
            "/v1/rules?dry_run=maybe",
            r#"{"rules":[]}"#,
            &[],
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(*log.lock().unwrap(), ["replace 2"]);
        let (_, rules) = call(&app, "GET", "/v1/rules", "").await;
        assert_eq!(rules["revision"], 1);
    }

    #[tokio::test]
    async fn a_read_only_policy_refuses_api_writes_and_reloads_from_its_source() {
        let dir = std::env::temp_dir().join(format!("filterd-ro-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("policy.toml");
        let text = "# the operator's comment\n[[rules]]\npath = \"/a\"\nmethods = [\"GET\"]\n";
        std::fs::write(&file, text).unwrap();
        let state = AppState::with(
            policy::parse_toml(text).unwrap(),
            1,
            Box::new(Recorder::default()),
            Some(PolicyStore::ReadOnly(file.clone())),
            None,
            DaemonInfo::default(),
        );
        let app = router(state.clone());
        for (method, uri, body) in [
            ("POST", "/v1/rules", r#"{"path":"/b","methods":["GET"]}"#),
            ("PUT", "/v1/rules", r#"{"rules":[]}"#),
            ("PUT", "/v1/policy", r#"{"rules":[]}"#),
            ("DELETE", "/v1/rules?path=/a", ""),
        ] {
            let r = send(&app, method, uri, body, &[]).await;
            assert_eq!(r.status, StatusCode::CONFLICT, "{method} {uri}");
            let msg = r.json["error"].as_str().unwrap();
            assert!(
                msg.contains("read-only") && msg.contains("--state"),
                "{msg}"
            );
        }
        // A dry run still answers.
        let r = send(
            &app,
            "PUT",
            "/v1/rules?dry_run=true",
            r#"{"rules":[]}"#,
            &[],
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            text,
            "never written"
        );
        // A bad new version keeps the old policy and says why, in the status too.
        std::fs::write(&file, "[[rules]]\npath = \"/a\"\nmethods = [\"FETCH\"]\n").unwrap();
        assert!(state.reload(&Actor::reload("the watch")).is_err());
        let (_, st) = call(&app, "GET", "/v1/status", "").await;
        assert_eq!(st["policy"]["source"], "file");
        assert_eq!(st["policy"]["read_only"], true);
        assert_eq!(st["policy"]["health"]["ok"], false);
        assert!(
            st["policy"]["health"]["errors"][0]
                .as_str()
                .unwrap()
                .contains(":3:12: rules[0].methods"),
            "{st}"
        );
        assert!(state.policy().exact("/a").is_some());
        let r = send(&app, "GET", "/metrics", "", &[]).await;
        assert!(
            r.text.contains("filterd_policy_last_reload_successful 0\n"),
            "{}",
            r.text
        );
        // A good one is applied, and the audit names the watch.
        std::fs::write(&file, "[[rules]]\npath = \"/b\"\nmethods = [\"PUT\"]\n").unwrap();
        assert_eq!(
            state.reload(&Actor::reload("the watch")).unwrap(),
            Reloaded::Applied(2)
        );
        let (_, st) = call(&app, "GET", "/v1/status", "").await;
        assert_eq!(st["policy"]["health"]["ok"], true);
        assert_eq!(st["last_change"]["who"], "the watch");
        assert_eq!(st["last_change"]["via"], "reload");
        assert_eq!(
            state.reload(&Actor::reload("x")).unwrap(),
            Reloaded::Unchanged(2)
        );
        std::fs::remove_dir_all(&dir).unwrap();
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

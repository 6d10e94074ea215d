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
//!
//! The parts: `state` holds the policy in force and is the one way a change goes in (applied,
//! persisted, put in force, audited) or a source is reloaded; `guard` the checks a request
//! passes before its handler (token, `Content-Type`, `Host`, time limit); `error` the JSON
//! error answer. The handlers, by resource: `rules` (`/v1/policy`, `/v1/rules`), `explain`
//! (`/v1/explain`), `events` (`/v1/events`), `status` (`/healthz`, `/readyz`, `/v1/status`),
//! `metrics` (`/v1/stats`, and `/metrics` rendered for Prometheus). `openapi` generates the
//! document from the route table here ([`routes`], [`router`]).

mod error;
mod events;
mod explain;
mod guard;
mod metrics;
mod openapi;
mod rules;
mod state;
mod status;
#[cfg(test)]
mod testing;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::middleware;
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::{Json, Router};

pub use error::ApiError;
pub use events::render_line;
pub use guard::{host_guard, AllowedHosts};
pub use metrics::{label_value, render_metrics, MetricsInput, EXTRA_COUNTS};
pub use openapi::{openapi, schemas};
pub use rules::{DryRun, RuleChange};
pub use state::{
    Actor, AppState, DaemonInfo, LastChange, NoObserver, Observer, PolicySink, PolicyStore,
    ReloadError, Reloaded, SinkStatus, SourceHealth,
};

use guard::{json_writes, require_token, timeout};

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
            ("GET", "/healthz") => b.route(doc, status::healthz),
            ("GET", "/readyz") => b.route(doc, status::readyz),
            ("GET", "/v1/explain") => b.route(doc, explain::explain),
            ("GET", "/v1/events") => b.route(doc, events::events),
            ("GET", "/v1/policy") => b.route(doc, rules::get_policy),
            ("PUT", "/v1/policy") => b.route(doc, rules::put_policy),
            ("GET", "/v1/rules") => b.route(doc, rules::list_rules),
            ("PUT", "/v1/rules") => b.route(doc, rules::replace_rules),
            ("POST", "/v1/rules") => b.route(doc, rules::upsert_rule),
            ("DELETE", "/v1/rules") => b.route(doc, rules::remove_rule),
            ("GET", "/v1/stats") => b.route(doc, metrics::stats),
            ("GET", "/v1/status") => b.route(doc, status::status),
            ("GET", "/metrics") => b.route(doc, metrics::metrics),
            (m, p) => panic!("route {m} {p} is documented but has no handler"),
        };
    }
    b.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::testing::*;
    use axum::http::StatusCode;

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
}

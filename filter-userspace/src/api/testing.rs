//! What the API's tests share: a sink that records what reached it ([`Recorder`]), and
//! requests sent through the router without a socket ([`send`], [`call`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::Router;
use serde_json::Value;
use tower::ServiceExt;

use super::{router, AppState, DaemonInfo, Observer, PolicySink, PolicyStore};
use crate::dataplane::DataplaneError;
use crate::events::EventHub;
use crate::hits::{HitKey, RuleHits};
use crate::policy::{Policy, Rule, RuleKey};

/// Records what reached it; can be told to fail, to show that a failed apply changes nothing.
#[derive(Default)]
pub(super) struct Recorder {
    pub(super) log: Arc<Mutex<Vec<String>>>,
    pub(super) fail: bool,
    /// Given each committed policy and reported, as the daemon's sink does.
    pub(super) hits: Arc<RuleHits>,
    /// The event feed the observer offers.
    pub(super) events: Option<Arc<EventHub>>,
    /// What `/readyz` reports missing.
    pub(super) missing: Vec<String>,
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

pub(super) struct Reply {
    pub(super) status: StatusCode,
    pub(super) headers: HeaderMap,
    pub(super) json: Value,
    pub(super) text: String,
}

pub(super) async fn send(
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

pub(super) async fn call(app: &Router, method: &str, uri: &str, body: &str) -> (StatusCode, Value) {
    let r = send(app, method, uri, body, &[]).await;
    (r.status, r.json)
}

pub(super) fn app(fail: bool) -> (Router, Arc<Mutex<Vec<String>>>) {
    let rec = Recorder {
        fail,
        ..Default::default()
    };
    let log = rec.log.clone();
    (router(AppState::new(Policy::default(), Box::new(rec))), log)
}

const TOKEN: &str = "s3cret";

pub(super) fn secured(store: Option<PathBuf>) -> (Router, AppState) {
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

pub(super) fn bearer() -> (&'static str, &'static str) {
    ("authorization", "Bearer s3cret")
}

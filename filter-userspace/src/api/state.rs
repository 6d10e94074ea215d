//! The API's shared state ([`AppState`]): the policy in force, its revision, the sink that
//! applies it (the dataplane) and the store that persists it, behind one lock, beside what the
//! reads need without that lock (the [`Observer`], the rule counts, the last change, the
//! source's health). A change goes in one way only, [`commit`]: applied to the sink,
//! persisted, and only then put in force and logged in the audit line; a reload of the policy
//! source goes through it too.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::http::StatusCode;
use serde::Serialize;

use super::ApiError;
use crate::dataplane::{DataplaneError, MapFill};
use crate::document::{self, Diagnostic};
use crate::events::EventHub;
use crate::hits::HitKey;
use crate::policy::{self, MatchKind, Mode, Policy, Rule, RuleKey};
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
    pub(super) fn api(peer: Option<&Peer>) -> Actor {
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
pub(super) struct Summary {
    pub(super) revision: u64,
    /// Rules by (match kind, mode): exact/enforce, exact/monitor, prefix/enforce,
    /// prefix/monitor.
    pub(super) rules: [u64; 4],
}

impl Summary {
    pub(super) fn of(policy: &Policy, revision: u64) -> Summary {
        let mut rules = [0u64; 4];
        for r in policy.rules.values() {
            let i =
                usize::from(r.kind == MatchKind::Prefix) * 2 + usize::from(r.mode == Mode::Monitor);
            rules[i] += 1;
        }
        Summary { revision, rules }
    }
}

pub(super) struct Inner {
    pub(super) policy: Policy,
    pub(super) revision: u64,
    pub(super) sink: Box<dyn PolicySink>,
    pub(super) store: Option<PolicyStore>,
}

pub(super) struct Shared {
    pub(super) inner: Mutex<Inner>,
    pub(super) token: Option<String>,
    pub(super) info: DaemonInfo,
    pub(super) observer: Arc<dyn Observer>,
    pub(super) summary: Mutex<Summary>,
    pub(super) last_change: Mutex<Option<LastChange>>,
    pub(super) source: Mutex<SourceHealth>,
}

/// Shared state of the API: the policy, its revision and the sink, behind one lock so that each
/// change is validated, applied, persisted and recorded as one step.
#[derive(Clone)]
pub struct AppState(pub(super) Arc<Shared>);

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

    pub(super) fn lock(&self) -> MutexGuard<'_, Inner> {
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

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(super) enum Change {
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
pub(super) fn commit(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::router;
    use crate::api::testing::*;
    use serde_json::json;

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
}

//! The userspace half of the HTTP method firewall: the `filterd` daemon and the `filterctl`
//! client, as a library with thin binaries.
//!
//! It owns the policy (validated here, the source of truth, persisted to the policy file), the
//! kernel program's lifecycle and maps ([`dataplane::Dataplane`], the only code that touches
//! them), the responder that answers rejected requests, and the REST API with its token auth.
//! It must not parse packets on the hot path: the kernel decides; userspace only answers what
//! the kernel rejected.

pub mod api;
pub mod auth;
pub mod cli;
pub mod client;
pub mod dataplane;
pub mod diff;
pub mod document;
pub mod events;
pub mod explain;
pub mod hits;
pub mod kernel_log;
pub mod packet;
pub mod policy;
pub mod ratelimit;
pub mod responder;
pub mod response;
pub mod sd_notify;
pub mod serve;
pub mod tc_netlink;
pub mod verifier;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use policy::MatchKind;

/// The git revision the binaries were built from (`-dirty` with uncommitted changes).
pub const GIT_REVISION: &str = env!("FILTERD_GIT_REVISION");
/// SHA-256 of the embedded kernel object (`none` without one); compare with `sha256sum` of
/// `target/ebpf/bpfel-unknown-none/release/filter-ebpf`.
pub const BPF_OBJECT_SHA256: &str = env!("FILTERD_BPF_SHA256");

/// `--version`: the version, the git revision and the kernel object's hash.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("FILTERD_GIT_REVISION"),
    ", bpf object sha256:",
    env!("FILTERD_BPF_SHA256"),
    ")"
);

/// The dataplane as the API changes it (writes, under the API's policy lock), with the
/// responder's statistics (it also hands the responder each policy put in force, to attribute
/// rejections to rules).
pub struct DaemonSink {
    /// `None` once released at exit.
    pub dataplane: Option<dataplane::Dataplane>,
    pub responder: Arc<responder::ResponderStats>,
    /// What the API reads without the lock: the dataplane's observer and the responder's
    /// statistics.
    pub observer: Arc<DaemonObserver>,
}

impl DaemonSink {
    fn dp(&mut self) -> Result<&mut dataplane::Dataplane, dataplane::DataplaneError> {
        self.dataplane
            .as_mut()
            .ok_or(dataplane::DataplaneError::Missing("dataplane (released)"))
    }
}

impl api::PolicySink for DaemonSink {
    fn replace(&mut self, policy: &policy::Policy) -> Result<(), dataplane::DataplaneError> {
        self.dp()?.apply(policy)
    }

    fn upsert(&mut self, rule: &policy::Rule) -> Result<(), dataplane::DataplaneError> {
        self.dp()?.upsert(rule)
    }

    fn remove(&mut self, key: &policy::RuleKey) -> Result<(), dataplane::DataplaneError> {
        self.dp()?.remove_rule(key)
    }

    fn committed(&mut self, policy: &policy::Policy) {
        self.responder.hits.set_policy(policy);
        if let Some(dp) = self.dataplane.as_mut() {
            dp.set_fill(
                policy.count(MatchKind::Exact),
                policy.count(MatchKind::Prefix),
            );
        }
    }

    fn observer(&self) -> Arc<dyn api::Observer> {
        self.observer.clone()
    }

    fn release(&mut self, fail_open: bool) {
        if let Some(dp) = self.dataplane.take() {
            dp.release(fail_open);
        }
    }
}

/// The daemon's reads for the API: kernel counters, fill levels and attachments through the
/// dataplane's observer (map handles of its own), the responder's statistics.
pub struct DaemonObserver {
    pub dataplane: dataplane::DataplaneObserver,
    pub responder: Arc<responder::ResponderStats>,
}

impl api::Observer for DaemonObserver {
    fn counters(&self) -> Result<BTreeMap<String, u64>, dataplane::DataplaneError> {
        let mut out: BTreeMap<String, u64> = self
            .dataplane
            .counters()?
            .into_iter()
            .map(|(r, n)| (r.name().to_owned(), n))
            .collect();
        let r = &self.responder;
        out.insert("responses_sent".into(), r.sent.load(Ordering::Relaxed));
        out.insert("responses_failed".into(), r.failed.load(Ordering::Relaxed));
        out.insert(
            "responses_limited".into(),
            r.limited.load(Ordering::Relaxed),
        );
        Ok(out)
    }

    fn rule_hits(&self) -> Vec<(hits::HitKey, u64)> {
        self.responder.hits.snapshot()
    }

    fn map_fill(&self) -> Vec<dataplane::MapFill> {
        self.dataplane.map_fill()
    }

    fn write_failures(&self) -> u64 {
        self.dataplane.write_failures()
    }

    fn status(&self) -> api::SinkStatus {
        let dp = &self.dataplane;
        api::SinkStatus {
            interfaces: dp.interfaces().to_vec(),
            attach: dp.attach_mode().map(|m| m.name().to_owned()),
            pinned: dp.pinned(),
            dry_run: dp.dry_run(),
            prefix_rules_supported: dp.supports_prefix(),
        }
    }

    fn ready(&self) -> Result<(), Vec<String>> {
        self.dataplane.ready()
    }

    fn events(&self) -> Option<Arc<events::EventHub>> {
        Some(self.responder.events.clone())
    }
}

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
pub mod dataplane;
pub mod hits;
pub mod packet;
pub mod policy;
pub mod ratelimit;
pub mod responder;
pub mod response;
pub mod serve;
pub mod tc_netlink;
pub mod verifier;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use policy::MatchKind;

/// The dataplane as the API sees it, plus the responder's counters for `/v1/stats` and
/// `/metrics` (it also hands the responder each policy put in force, to attribute rejections
/// to rules).
pub struct DaemonSink {
    /// `None` once released at exit.
    pub dataplane: Option<dataplane::Dataplane>,
    pub responder: Arc<responder::ResponderStats>,
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

    fn counters(&self) -> Result<BTreeMap<String, u64>, dataplane::DataplaneError> {
        let mut out: BTreeMap<String, u64> = match &self.dataplane {
            Some(dp) => dp
                .counters()?
                .into_iter()
                .map(|(r, n)| (r.name().to_owned(), n))
                .collect(),
            None => BTreeMap::new(),
        };
        out.insert(
            "responses_sent".into(),
            self.responder.sent.load(Ordering::Relaxed),
        );
        out.insert(
            "responses_failed".into(),
            self.responder.failed.load(Ordering::Relaxed),
        );
        out.insert(
            "responses_limited".into(),
            self.responder.limited.load(Ordering::Relaxed),
        );
        Ok(out)
    }

    fn rule_hits(&self) -> Vec<(hits::HitKey, u64)> {
        self.responder.hits.snapshot()
    }

    fn map_fill(&self) -> Vec<dataplane::MapFill> {
        self.dataplane
            .as_ref()
            .map(|d| d.map_fill())
            .unwrap_or_default()
    }

    fn write_failures(&self) -> u64 {
        self.dataplane
            .as_ref()
            .map(|d| d.write_failures())
            .unwrap_or(0)
    }

    fn status(&self) -> api::SinkStatus {
        match &self.dataplane {
            Some(dp) => api::SinkStatus {
                interfaces: dp.attached(),
                attach: dp.attach_mode().map(|m| m.name().to_owned()),
                pinned: dp.pinned(),
                dry_run: dp.dry_run(),
                prefix_rules_supported: dp.supports_prefix(),
            },
            None => api::SinkStatus::default(),
        }
    }

    fn release(&mut self, fail_open: bool) {
        if let Some(dp) = self.dataplane.take() {
            dp.release(fail_open);
        }
    }
}

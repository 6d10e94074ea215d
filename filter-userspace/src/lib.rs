//! The userspace half of the HTTP method firewall: the `filterd` daemon and the `filterctl`
//! client, as a library with thin binaries.
//!
//! It owns the policy (validated here, the source of truth), the kernel program's lifecycle
//! and maps ([`dataplane::Dataplane`], the only code that touches them), the responder that
//! answers rejected requests, and the REST API. It must not parse packets on the hot path:
//! the kernel decides; userspace only answers what the kernel rejected.

pub mod api;
pub mod dataplane;
pub mod packet;
pub mod policy;
pub mod responder;
pub mod response;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The dataplane as the API sees it, plus the responder's counters for `/v1/stats`.
pub struct DaemonSink {
    pub dataplane: dataplane::Dataplane,
    pub responder: Arc<responder::ResponderStats>,
}

impl api::PolicySink for DaemonSink {
    fn replace(&mut self, policy: &policy::Policy) -> Result<(), dataplane::DataplaneError> {
        self.dataplane.apply(policy)
    }

    fn upsert(&mut self, rule: &policy::Rule) -> Result<(), dataplane::DataplaneError> {
        self.dataplane.upsert(rule)
    }

    fn remove(&mut self, path: &str) -> Result<(), dataplane::DataplaneError> {
        self.dataplane.remove(path)
    }

    fn counters(&self) -> Result<BTreeMap<String, u64>, dataplane::DataplaneError> {
        let mut out: BTreeMap<String, u64> = self
            .dataplane
            .counters()?
            .into_iter()
            .map(|(r, n)| (r.name().to_owned(), n))
            .collect();
        out.insert(
            "responses_sent".into(),
            self.responder.sent.load(Ordering::Relaxed),
        );
        out.insert(
            "responses_failed".into(),
            self.responder.failed.load(Ordering::Relaxed),
        );
        Ok(out)
    }
}

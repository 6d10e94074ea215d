//! Rejections and monitor-mode hits by rule and method, for `/metrics` and `/v1/stats`.
//!
//! The kernel counts per verdict reason only. For every refused request and every monitor hit
//! it sends the responder a `RejectEvent` with the method and the canonical path it decided on;
//! this module finds the rule that path matched, against a snapshot of the policy in force and
//! in the kernel's order (an exact rule, else the longest prefix rule, else the default), and
//! counts it under (rule, method, outcome). It must stay bounded whatever the policy holds (up
//! to 131072 + 16384 rules): at most [`RULE_ROWS_MAX`] rows name a rule; a rule first seen after
//! that is counted under `(other)` with its match kind. Rows are never removed (counters only
//! grow), so a row stays after its rule is removed. It must not touch kernel maps.
//!
//! Limits, both rare: the kernel decides and the responder resolves a moment later, so a
//! request decided just before a policy change may be attributed under the new policy; and the
//! event carries only the first 256 bytes of a longer path, so such a path is attributed to the
//! exact rule of its length that starts with those bytes and allows what the kernel's `Allow`
//! said (if there are several, to `(other)`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::{Arc, Mutex, RwLock};

use filter_common::{Method, PREFIX_MAX};

use crate::policy::{MatchKind, Policy, RuleKey};

/// Rows naming a rule that the table keeps. With 17 method labels and 2 outcomes the table
/// also holds at most 34 `(default)` rows and 68 `(other)` rows: at most 1102 in all.
pub const RULE_ROWS_MAX: usize = 1000;

/// The `rule` label of requests no rule matched.
pub const DEFAULT_LABEL: &str = "(default)";
/// The `rule` label of rules past [`RULE_ROWS_MAX`] (and of a truncated path that more than
/// one exact rule could be).
pub const OTHER_LABEL: &str = "(other)";

/// What the kernel did with the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Outcome {
    /// Refused with 405 (`Reason::Rejected`).
    Rejected,
    /// Passed, would have been refused (`Reason::Monitored`: a monitor rule or `--dry-run`).
    Monitored,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Rejected => "rejected",
            Outcome::Monitored => "monitored",
        }
    }
}

/// The rule a request matched.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RuleRef {
    Rule(RuleKey),
    /// No rule: the policy's `default`.
    Default,
    /// A rule of this kind that the table has no row of its own for.
    Other(MatchKind),
}

impl RuleRef {
    /// The `rule` label: the rule's path, `(default)` or `(other)`.
    pub fn rule_label(&self) -> &str {
        match self {
            RuleRef::Rule(k) => &k.path,
            RuleRef::Default => DEFAULT_LABEL,
            RuleRef::Other(_) => OTHER_LABEL,
        }
    }

    /// The `match` label: `exact`, `prefix`, or `none` for the default.
    pub fn match_label(&self) -> &'static str {
        match self {
            RuleRef::Rule(k) => k.kind.as_str(),
            RuleRef::Default => "none",
            RuleRef::Other(kind) => kind.as_str(),
        }
    }
}

/// One row of the table.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HitKey {
    pub rule: RuleRef,
    /// The method token, or `(other)` for one the kernel's table does not name.
    pub method: &'static str,
    pub outcome: Outcome,
}

/// The rule paths of a policy, for resolving event paths.
#[derive(Debug, Default)]
pub struct RuleIndex {
    /// Exact rule paths and the method set the kernel enforces for each.
    exact: BTreeMap<String, u32>,
    prefix: BTreeSet<String>,
}

impl RuleIndex {
    pub fn new(policy: &Policy) -> RuleIndex {
        let mut index = RuleIndex::default();
        for rule in policy.rules.values() {
            match rule.kind {
                MatchKind::Exact => {
                    index.exact.insert(rule.path.clone(), rule.effective().0);
                }
                MatchKind::Prefix => {
                    index.prefix.insert(rule.path.clone());
                }
            }
        }
        index
    }

    /// The rule the kernel matched for a canonical path `len` bytes long, of which `seen` are
    /// the first bytes (the event carries at most `EVENT_LINE_MAX`), and whose `Allow` set the
    /// kernel gave as `allow` (used only when `seen` is truncated).
    pub fn resolve(&self, seen: &[u8], len: usize, allow: u32) -> RuleRef {
        let seen = &seen[..seen.len().min(len)];
        // Rule paths are ASCII: a path that is not UTF-8 can match a prefix rule at most.
        let text = utf8_prefix(seen);
        if seen.len() == len {
            if text.len() == seen.len() && self.exact.contains_key(text) {
                return RuleRef::Rule(RuleKey::exact(text));
            }
        } else if text.len() == seen.len() {
            // Truncated: the exact rules of that length, starting with what was seen, that
            // allow what the kernel said.
            let mut candidates = self
                .exact
                .range::<str, _>((Bound::Included(text), Bound::Unbounded))
                .take_while(|(p, _)| p.starts_with(text))
                .filter(|(p, a)| p.len() == len && **a == allow)
                .map(|(p, _)| p);
            match (candidates.next(), candidates.next()) {
                (Some(p), None) => return RuleRef::Rule(RuleKey::exact(p.as_str())),
                (Some(_), Some(_)) => return RuleRef::Other(MatchKind::Exact),
                _ => {}
            }
        }
        // The kernel's LPM key is the first PREFIX_MAX bytes; prefix rule paths end in '/'.
        let window = &text.as_bytes()[..text.len().min(PREFIX_MAX)];
        for end in (0..window.len()).rev().filter(|&i| window[i] == b'/') {
            let candidate = &text[..=end];
            if self.prefix.contains(candidate) {
                return RuleRef::Rule(RuleKey::prefix(candidate));
            }
        }
        RuleRef::Default
    }
}

/// The longest UTF-8 prefix of `bytes`.
fn utf8_prefix(bytes: &[u8]) -> &str {
    match std::str::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or_default(),
    }
}

/// Counts by (rule, method, outcome), bounded (see the module comment).
pub struct RuleHits {
    index: RwLock<Arc<RuleIndex>>,
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    counts: HashMap<HitKey, u64>,
    rule_rows: usize,
    rule_rows_max: usize,
}

impl std::fmt::Debug for RuleHits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        f.debug_struct("RuleHits")
            .field("rows", &t.counts.len())
            .field("rule_rows_max", &t.rule_rows_max)
            .finish()
    }
}

impl Default for RuleHits {
    fn default() -> RuleHits {
        RuleHits::with_limit(RULE_ROWS_MAX)
    }
}

impl RuleHits {
    /// A table that keeps at most `rule_rows_max` rows naming a rule.
    pub fn with_limit(rule_rows_max: usize) -> RuleHits {
        RuleHits {
            index: RwLock::new(Arc::new(RuleIndex::default())),
            table: Mutex::new(Table {
                rule_rows_max,
                ..Table::default()
            }),
        }
    }

    /// Resolve later events against `policy` (the policy now in force).
    pub fn set_policy(&self, policy: &Policy) {
        let index = Arc::new(RuleIndex::new(policy));
        *self.index.write().unwrap_or_else(|e| e.into_inner()) = index;
    }

    /// Count one event: `seen` the first bytes of its canonical path, `len` the path's length,
    /// `allow` the method set the kernel found for it. Returns the rule it matched.
    pub fn record(
        &self,
        seen: &[u8],
        len: usize,
        allow: u32,
        method: Method,
        outcome: Outcome,
    ) -> RuleRef {
        self.record_n(seen, len, allow, method, outcome, 1)
    }

    /// As [`RuleHits::record`], for `n` events alike (the responder counts a run of equal
    /// events of one batch at once).
    pub fn record_n(
        &self,
        seen: &[u8],
        len: usize,
        allow: u32,
        method: Method,
        outcome: Outcome,
        n: u64,
    ) -> RuleRef {
        let index = self.index.read().unwrap_or_else(|e| e.into_inner()).clone();
        let rule = index.resolve(seen, len, allow);
        self.add_n(
            HitKey {
                rule: rule.clone(),
                method: method.as_str(),
                outcome,
            },
            n,
        );
        rule
    }

    /// Count one row, folding a new rule row into `(other)` once the table is full.
    pub fn add(&self, key: HitKey) {
        self.add_n(key, 1)
    }

    fn add_n(&self, mut key: HitKey, n: u64) {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = t.counts.get_mut(&key) {
            *count += n;
            return;
        }
        if let RuleRef::Rule(k) = &key.rule {
            if t.rule_rows >= t.rule_rows_max {
                key.rule = RuleRef::Other(k.kind);
                *t.counts.entry(key).or_default() += n;
                return;
            }
            t.rule_rows += 1;
        }
        t.counts.insert(key, n);
    }

    /// Every row, sorted by rule, method and outcome.
    pub fn snapshot(&self) -> Vec<(HitKey, u64)> {
        let t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let mut rows: Vec<(HitKey, u64)> = t.counts.iter().map(|(k, n)| (k.clone(), *n)).collect();
        rows.sort();
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{DefaultPolicy, RuleSpec};

    fn prefix(path: &str, methods: &[&str]) -> RuleSpec {
        RuleSpec {
            match_kind: Some("prefix".into()),
            ..RuleSpec::new(path, methods)
        }
    }

    fn policy() -> Policy {
        let (x, y) = ("x".repeat(400), "y".repeat(400));
        let specs = vec![
            RuleSpec::new("/admin", &["GET"]),
            RuleSpec::new("/api/items", &["GET", "POST"]),
            prefix("/api/", &["GET"]),
            prefix("/api/v2/", &["GET", "POST"]),
            // Longer than the event's 256 bytes: told apart by length and Allow only.
            RuleSpec::new(format!("/{x}a"), &["GET"]),
            RuleSpec::new(format!("/{x}b"), &["GET"]),
            RuleSpec::new(format!("/{y}c"), &["GET"]),
            RuleSpec::new(format!("/{y}dd"), &["GET"]),
        ];
        Policy::from_specs(DefaultPolicy::Any, &specs).unwrap()
    }

    const GET_HEAD: u32 = Method::Get.bit() | Method::Head.bit();

    /// As the kernel sends it: the first 256 bytes, the length and the Allow set.
    fn resolve(index: &RuleIndex, path: &str, allow: u32) -> RuleRef {
        let b = path.as_bytes();
        index.resolve(&b[..b.len().min(256)], b.len(), allow)
    }

    #[test]
    fn resolves_like_the_kernel() {
        let index = RuleIndex::new(&policy());
        let any = DefaultPolicy::Any.effective().0;
        let exact = |p: &str| RuleRef::Rule(RuleKey::exact(p));
        let prefix = |p: &str| RuleRef::Rule(RuleKey::prefix(p));
        let (x, y) = ("x".repeat(400), "y".repeat(400));
        let cases: Vec<(String, u32, RuleRef)> = vec![
            ("/admin".into(), GET_HEAD, exact("/admin")),
            ("/admin/x".into(), any, RuleRef::Default),
            ("/adminx".into(), any, RuleRef::Default),
            ("/".into(), any, RuleRef::Default),
            // exact beats prefix
            ("/api/items".into(), GET_HEAD, exact("/api/items")),
            ("/api/items/1".into(), GET_HEAD, prefix("/api/")),
            ("/api/".into(), GET_HEAD, prefix("/api/")),
            ("/api".into(), any, RuleRef::Default),
            // the longest prefix wins
            ("/api/v2/".into(), GET_HEAD, prefix("/api/v2/")),
            ("/api/v2/things/1".into(), GET_HEAD, prefix("/api/v2/")),
            ("/api/v3/x".into(), GET_HEAD, prefix("/api/")),
            // a truncated path under a prefix rule
            (
                format!("/api/v2/{}", "z".repeat(600)),
                GET_HEAD,
                prefix("/api/v2/"),
            ),
            // truncated paths: the exact rule of that length and Allow set
            (format!("/{y}c"), GET_HEAD, exact(&format!("/{y}c"))),
            (format!("/{y}dd"), GET_HEAD, exact(&format!("/{y}dd"))),
            (format!("/{y}e"), any, RuleRef::Default),
            (format!("/{y}eee"), any, RuleRef::Default),
            // two candidates: cannot tell which
            (format!("/{x}a"), GET_HEAD, RuleRef::Other(MatchKind::Exact)),
        ];
        for (path, allow, want) in cases {
            assert_eq!(resolve(&index, &path, allow), want, "{path:.40}");
        }
        // Not UTF-8 after a prefix: the prefix still matches, no exact rule can.
        assert_eq!(index.resolve(b"/api/\xff", 6, GET_HEAD), prefix("/api/"));
    }

    #[test]
    fn prefix_rules_reach_the_end_of_the_event_window() {
        // A prefix rule is at most PREFIX_MAX (256) bytes, as is the event's window: every
        // prefix rule the kernel can match is inside the window.
        let long = format!("/{}/", "p".repeat(PREFIX_MAX - 2));
        let p = Policy::from_specs(DefaultPolicy::Any, &[prefix(&long, &["GET"])]).unwrap();
        let index = RuleIndex::new(&p);
        let path = format!("{long}and/more/{}", "q".repeat(300));
        assert_eq!(
            resolve(&index, &path, GET_HEAD),
            RuleRef::Rule(RuleKey::prefix(long))
        );
    }

    #[test]
    fn counts_by_rule_method_and_outcome() {
        let hits = RuleHits::default();
        hits.set_policy(&policy());
        hits.record(b"/admin", 6, GET_HEAD, Method::Delete, Outcome::Rejected);
        hits.record(b"/admin", 6, GET_HEAD, Method::Delete, Outcome::Rejected);
        hits.record(b"/admin", 6, GET_HEAD, Method::Put, Outcome::Rejected);
        hits.record(b"/api/x", 6, GET_HEAD, Method::Delete, Outcome::Monitored);
        hits.record(b"/nothing", 8, 0, Method::Other, Outcome::Rejected);
        let rows: Vec<(String, &str, &str, &str, u64)> = hits
            .snapshot()
            .into_iter()
            .map(|(k, n)| {
                (
                    k.rule.rule_label().to_owned(),
                    k.rule.match_label(),
                    k.method,
                    k.outcome.as_str(),
                    n,
                )
            })
            .collect();
        assert_eq!(
            rows,
            vec![
                ("/admin".into(), "exact", "DELETE", "rejected", 2),
                ("/admin".into(), "exact", "PUT", "rejected", 1),
                ("/api/".into(), "prefix", "DELETE", "monitored", 1),
                ("(default)".into(), "none", "(other)", "rejected", 1),
            ]
        );
    }

    #[test]
    fn rows_past_the_limit_fold_into_other() {
        let specs: Vec<RuleSpec> = (0..10)
            .map(|i| RuleSpec::new(format!("/r{i}"), &["GET"]))
            .collect();
        let p = Policy::from_specs(DefaultPolicy::Any, &specs).unwrap();
        let hits = RuleHits::with_limit(3);
        hits.set_policy(&p);
        for round in 0..2 {
            for i in 0..10 {
                let path = format!("/r{i}");
                hits.record(
                    path.as_bytes(),
                    path.len(),
                    GET_HEAD,
                    Method::Delete,
                    Outcome::Rejected,
                );
            }
            // The default never folds and never takes a rule row.
            hits.record(b"/zzz", 4, 0, Method::Delete, Outcome::Rejected);
            let rows = hits.snapshot();
            let n = (round + 1) as u64;
            let named: Vec<&str> = rows
                .iter()
                .filter(|(k, _)| matches!(k.rule, RuleRef::Rule(_)))
                .map(|(k, _)| k.rule.rule_label())
                .collect();
            // The first three rules seen keep their rows, also once the table is full.
            assert_eq!(named, ["/r0", "/r1", "/r2"]);
            assert!(rows
                .iter()
                .filter(|(k, _)| matches!(k.rule, RuleRef::Rule(_)))
                .all(|(_, c)| *c == n));
            let other = rows
                .iter()
                .find(|(k, _)| k.rule == RuleRef::Other(MatchKind::Exact))
                .unwrap();
            assert_eq!(other.1, 7 * n);
            let default = rows
                .iter()
                .find(|(k, _)| k.rule == RuleRef::Default)
                .unwrap();
            assert_eq!(default.1, n);
            assert_eq!(rows.len(), 5);
        }
    }

    #[test]
    fn a_new_policy_is_used_for_later_events() {
        let hits = RuleHits::default();
        hits.record(b"/admin", 6, GET_HEAD, Method::Delete, Outcome::Rejected);
        hits.set_policy(&policy());
        hits.record(b"/admin", 6, GET_HEAD, Method::Delete, Outcome::Rejected);
        let rules: Vec<RuleRef> = hits.snapshot().into_iter().map(|(k, _)| k.rule).collect();
        assert_eq!(
            rules,
            [RuleRef::Rule(RuleKey::exact("/admin")), RuleRef::Default]
        );
    }

    #[test]
    fn recording_n_alike_counts_as_n_records() {
        let specs: Vec<RuleSpec> = (0..3)
            .map(|i| RuleSpec::new(format!("/r{i}"), &["GET"]))
            .collect();
        let p = Policy::from_specs(DefaultPolicy::Any, &specs).unwrap();
        let (one_by_one, at_once) = (RuleHits::with_limit(1), RuleHits::with_limit(1));
        for hits in [&one_by_one, &at_once] {
            hits.set_policy(&p);
        }
        // The second rule folds into `(other)`: the table keeps one rule row.
        for (path, n) in [("/r0", 3), ("/r1", 4), ("/zzz", 2), ("/r0", 1)] {
            for _ in 0..n {
                one_by_one.record(
                    path.as_bytes(),
                    path.len(),
                    GET_HEAD,
                    Method::Put,
                    Outcome::Rejected,
                );
            }
            at_once.record_n(
                path.as_bytes(),
                path.len(),
                GET_HEAD,
                Method::Put,
                Outcome::Rejected,
                n,
            );
        }
        assert_eq!(at_once.snapshot(), one_by_one.snapshot());
        assert_eq!(at_once.snapshot().iter().map(|(_, n)| n).sum::<u64>(), 10);
    }
}

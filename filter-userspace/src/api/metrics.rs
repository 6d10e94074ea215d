//! The counters: `GET /v1/stats` as JSON, and `GET /metrics` in the Prometheus text format
//! ([`render_metrics`]). Both read the dataplane through the [`Observer`](super::Observer) on a
//! blocking thread, never under the policy lock.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use filter_common::Reason;
use serde_json::{json, Value};

use super::state::lock;
use super::{ApiError, AppState, SinkStatus};
use crate::dataplane::MapFill;
use crate::hits::{HitKey, Outcome};

pub(super) async fn stats(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
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

pub(super) async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use filter_common::Method;

    use crate::api::router;
    use crate::api::state::Summary;
    use crate::api::testing::*;
    use crate::hits::{RuleHits, RuleRef};
    use crate::policy::{self, Policy, RuleKey, RuleSpec};

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
}

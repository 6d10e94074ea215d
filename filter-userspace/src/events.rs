//! The live feed of refusals and monitor-mode hits (`GET /v1/events`, `filterctl events`):
//! the responder publishes one [`Event`] per event it handles, each subscriber reads them as
//! JSON lines (or server-sent events).
//!
//! Bounded so that no reader can hold the daemon: the responder never waits for a reader (a
//! `tokio::sync::broadcast` ring of [`CAPACITY`] events; a reader that falls behind loses the
//! oldest and is told how many, `{"type":"lost","count":N}`), at most [`SUBSCRIBERS_MAX`]
//! readers at once, and nothing is formatted while nobody reads. A heartbeat line every
//! [`HEARTBEAT`] finds readers that went away. [`EventHub::close`] ends every feed at shutdown.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{broadcast, watch};

/// Events the ring holds for the slowest reader.
pub const CAPACITY: usize = 1024;
/// Readers at once.
pub const SUBSCRIBERS_MAX: usize = 16;
/// A line when nothing else was sent for this long.
pub const HEARTBEAT: Duration = Duration::from_secs(15);

/// One refusal or monitor hit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Event {
    /// `rejected` (refused, the client answered) or `monitored` (passed, would have been
    /// refused).
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// RFC 3339, UTC, to the millisecond.
    pub time: String,
    /// `addr:port` (IPv6 in brackets).
    pub client: String,
    pub method: &'static str,
    /// The canonical path (its first 256 bytes), escaped.
    pub path: String,
    /// The rule that matched: its path, `(default)`, or `(other)`; empty for answers that
    /// name no rule (400, 414, 431, 503).
    pub rule: String,
    /// `exact`, `prefix`, `none` (the default) or empty.
    #[serde(rename = "match")]
    pub match_kind: &'static str,
    /// The kernel's reason (`rejected`, `bad_path`, `monitored`, ...).
    pub reason: &'static str,
    /// The status the client was answered with; `null` for a monitor hit.
    pub answer: Option<u16>,
    /// `sent`, `failed` (the answer could not be sent), `rate_limited` (a 503 not sent),
    /// `passed` (a monitor hit).
    pub result: &'static str,
}

/// A line of the feed.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum Line {
    Event(#[serde(serialize_with = "shared")] Arc<Event>),
    Lost {
        #[serde(rename = "type")]
        kind: &'static str,
        count: u64,
    },
    Heartbeat {
        #[serde(rename = "type")]
        kind: &'static str,
    },
}

fn shared<S: serde::Serializer>(ev: &Arc<Event>, s: S) -> Result<S::Ok, S::Error> {
    ev.as_ref().serialize(s)
}

/// The feed's hub: one per daemon, shared by the responder (publishing) and the API.
#[derive(Debug)]
pub struct EventHub {
    tx: broadcast::Sender<Arc<Event>>,
    subscribers: AtomicUsize,
    closed: watch::Sender<bool>,
    /// Events readers lost by falling behind, all readers together.
    lost: AtomicU64,
}

impl Default for EventHub {
    fn default() -> EventHub {
        EventHub {
            tx: broadcast::channel(CAPACITY).0,
            subscribers: AtomicUsize::new(0),
            closed: watch::channel(false).0,
            lost: AtomicU64::new(0),
        }
    }
}

/// Why a subscription was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubscribeError {
    #[error("{SUBSCRIBERS_MAX} readers of the event feed already; try again when one leaves")]
    Full,
    #[error("the daemon is shutting down")]
    Closed,
}

impl EventHub {
    /// Whether anybody reads (publishers skip formatting otherwise).
    pub fn wanted(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    /// Publish an event; never waits.
    pub fn publish(&self, ev: Event) {
        let _ = self.tx.send(Arc::new(ev));
    }

    pub fn subscribers(&self) -> usize {
        self.subscribers.load(Ordering::Relaxed)
    }

    /// Events readers lost by falling behind, since start.
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }

    /// End every feed (shutdown): their streams finish, their connections close.
    pub fn close(&self) {
        let _ = self.closed.send(true);
    }

    /// A new reader's feed.
    pub fn subscribe(self: &Arc<Self>) -> Result<Subscription, SubscribeError> {
        if *self.closed.borrow() {
            return Err(SubscribeError::Closed);
        }
        let n = self.subscribers.fetch_add(1, Ordering::AcqRel);
        if n >= SUBSCRIBERS_MAX {
            self.subscribers.fetch_sub(1, Ordering::AcqRel);
            return Err(SubscribeError::Full);
        }
        Ok(Subscription {
            rx: self.tx.subscribe(),
            closed: self.closed.subscribe(),
            hub: self.clone(),
        })
    }
}

/// One reader's feed; leaving it frees its place.
pub struct Subscription {
    rx: broadcast::Receiver<Arc<Event>>,
    closed: watch::Receiver<bool>,
    hub: Arc<EventHub>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.subscribers.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Subscription {
    /// The next line, or `None` once the hub is closed. A heartbeat after `heartbeat` of
    /// silence.
    pub async fn next(&mut self, heartbeat: Duration) -> Option<Line> {
        if *self.closed.borrow() {
            return None;
        }
        tokio::select! {
            _ = self.closed.changed() => None,
            r = self.rx.recv() => match r {
                Ok(ev) => Some(Line::Event(ev)),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    self.hub.lost.fetch_add(n, Ordering::Relaxed);
                    Some(Line::Lost { kind: "lost", count: n })
                }
                Err(broadcast::error::RecvError::Closed) => None,
            },
            _ = tokio::time::sleep(heartbeat) => Some(Line::Heartbeat { kind: "heartbeat" }),
        }
    }
}

/// The current time as RFC 3339 UTC with milliseconds.
pub fn now_rfc3339() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let (days, rem) = (secs / 86400, secs % 86400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_millis()
    )
}

/// Howard Hinnant's days-to-civil: the proleptic Gregorian date of a day count since 1970.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(n: usize) -> Event {
        Event {
            kind: "rejected",
            time: "t".into(),
            client: format!("10.0.0.1:{n}"),
            method: "DELETE",
            path: "/admin".into(),
            rule: "/admin".into(),
            match_kind: "exact",
            reason: "rejected",
            answer: Some(405),
            result: "sent",
        }
    }

    #[tokio::test]
    async fn a_slow_reader_loses_the_oldest_and_never_blocks_the_publisher() {
        let hub = Arc::new(EventHub::default());
        assert!(!hub.wanted());
        let mut slow = hub.subscribe().unwrap();
        assert!(hub.wanted());
        // Far more than the ring holds, published without anybody reading: no wait.
        for n in 0..CAPACITY * 3 {
            hub.publish(ev(n));
        }
        match slow.next(HEARTBEAT).await {
            Some(Line::Lost { count, .. }) => assert_eq!(count as usize, CAPACITY * 2),
            other => panic!("{other:?}"),
        }
        match slow.next(HEARTBEAT).await {
            Some(Line::Event(e)) => assert_eq!(e.client, format!("10.0.0.1:{}", CAPACITY * 2)),
            other => panic!("{other:?}"),
        }
        assert_eq!(hub.lost(), (CAPACITY * 2) as u64);
        let line = serde_json::to_string(&Line::Lost {
            kind: "lost",
            count: 3,
        })
        .unwrap();
        assert_eq!(line, r#"{"type":"lost","count":3}"#);
    }

    #[tokio::test]
    async fn readers_are_bounded_heartbeats_flow_and_close_ends_the_feed() {
        let hub = Arc::new(EventHub::default());
        let subs: Vec<_> = (0..SUBSCRIBERS_MAX)
            .map(|_| hub.subscribe().unwrap())
            .collect();
        assert_eq!(hub.subscribe().err(), Some(SubscribeError::Full));
        drop(subs);
        assert_eq!(hub.subscribers(), 0);
        let mut s = hub.subscribe().unwrap();
        assert!(matches!(
            s.next(Duration::from_millis(10)).await,
            Some(Line::Heartbeat { .. })
        ));
        hub.publish(ev(1));
        let line = serde_json::to_value(s.next(HEARTBEAT).await.unwrap()).unwrap();
        assert_eq!(line["type"], "rejected");
        assert_eq!(line["answer"], 405);
        assert_eq!(line["match"], "exact");
        hub.close();
        assert!(s.next(HEARTBEAT).await.is_none());
        assert_eq!(hub.subscribe().err(), Some(SubscribeError::Closed));
    }

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_793), (2026, 12, 6));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        let t = now_rfc3339();
        assert_eq!((t.len(), &t[10..11], &t[23..]), (24, "T", "Z"), "{t}");
    }
}

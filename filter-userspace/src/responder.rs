//! The responder: drains rejection events from the kernel and answers each client on its own
//! connection with a forged `405 Method Not Allowed` + FIN, sent through an `AF_PACKET`
//! socket on the interface the request arrived on. The kernel has already turned the
//! rejected segment into a reset to the backend. It also counts every 405 and every
//! monitor-mode hit under the rule that matched ([`crate::hits`]) and logs them, rate-limited.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use aya::maps::{MapData, RingBuf};
use filter_common::{
    Method, MethodSet, Reason, RejectEvent, ETH_P_IPV4, ETH_P_IPV6, FAMILY_V4, RESPONDER_MARK,
};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::watch;

use crate::events::Event;
use crate::hits::{Outcome, RuleHits, RuleRef};
use crate::packet;
use crate::response::{self, Answer};

/// What the responder did, for `/v1/stats`.
#[derive(Debug, Default)]
pub struct ResponderStats {
    pub sent: AtomicU64,
    pub failed: AtomicU64,
    /// 503 answers to segments without connection state not sent: over the rate limit.
    pub limited: AtomicU64,
    /// Monitor-mode hits (logged, not blocked).
    pub monitored: AtomicU64,
    /// Log lines dropped by the rate limit.
    pub log_suppressed: AtomicU64,
    /// Rejections and monitor hits by rule and method.
    pub hits: RuleHits,
    /// The live feed of what the responder handles (`GET /v1/events`).
    pub events: Arc<crate::events::EventHub>,
}

/// At most `per_second` log lines a second; the rest are counted, and the count is reported
/// with the next line that gets through.
pub struct LogLimit {
    per_second: u32,
    window: std::time::Instant,
    used: u32,
    suppressed: u64,
    stats: Arc<ResponderStats>,
}

impl LogLimit {
    pub fn new(per_second: u32, stats: Arc<ResponderStats>) -> LogLimit {
        LogLimit {
            per_second,
            window: std::time::Instant::now(),
            used: 0,
            suppressed: 0,
            stats,
        }
    }

    /// Whether the caller may log a line now.
    pub fn allow(&mut self) -> bool {
        if self.window.elapsed() >= std::time::Duration::from_secs(1) {
            if self.suppressed > 0 {
                tracing::info!(
                    suppressed = self.suppressed,
                    "rejection log lines suppressed in the last second"
                );
            }
            self.window = std::time::Instant::now();
            self.used = 0;
            self.suppressed = 0;
        }
        if self.used < self.per_second {
            self.used += 1;
            true
        } else {
            self.suppressed += 1;
            self.stats.log_suppressed.fetch_add(1, Ordering::Relaxed);
            false
        }
    }
}

/// An `AF_PACKET` socket that only sends whole Ethernet frames, each marked
/// [`RESPONDER_MARK`] so the egress classifier passes them without a look.
struct PacketSocket(OwnedFd);

impl PacketSocket {
    fn new() -> io::Result<PacketSocket> {
        // Protocol 0: this socket receives nothing.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let socket = PacketSocket(unsafe { OwnedFd::from_raw_fd(fd) });
        let mark = RESPONDER_MARK;
        let r = unsafe {
            libc::setsockopt(
                socket.0.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_MARK,
                (&mark as *const u32).cast(),
                std::mem::size_of::<u32>() as u32,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("marking the responder's frames (SO_MARK): {e}"),
            ));
        }
        Ok(socket)
    }

    fn send(&self, ifindex: u32, dst_mac: [u8; 6], ethertype: u16, frame: &[u8]) -> io::Result<()> {
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ethertype.to_be();
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&dst_mac);
        let n = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

pub struct Responder {
    socket: PacketSocket,
    stats: Arc<ResponderStats>,
    ip_id: u16,
    log_limit: LogLimit,
    answers: Answers,
    /// 503 answers (see `UNAVAILABLE_PER_SECOND`).
    unavailable: crate::ratelimit::RateLimiter,
}

/// The answers built in the current second (their `Date` is the second's), so a flood of
/// rejections formats each distinct answer once a second instead of once per request. At most
/// `ANSWERS_KEPT` are kept a second; others are built each time.
#[derive(Default)]
struct Answers {
    second: u64,
    built: HashMap<(Answer, u32, u8), Vec<u8>>,
    /// An answer built past the limit.
    spare: Vec<u8>,
}

/// Distinct (answer, `Allow`, method) triples kept per second: far more than a policy's
/// distinct `Allow` sets times the methods clients use, and a bound on what a client that
/// cycles through them can make the responder hold.
const ANSWERS_KEPT: usize = 256;

impl Answers {
    fn get(&mut self, answer: Answer, allow: MethodSet, method: Method, now: SystemTime) -> &[u8] {
        let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if second != self.second {
            self.second = second;
            self.built.clear();
        }
        let key = (answer, allow.0, method as u8);
        if self.built.len() >= ANSWERS_KEPT && !self.built.contains_key(&key) {
            self.spare = response::build(answer, allow, method, now);
            return &self.spare;
        }
        self.built
            .entry(key)
            .or_insert_with(|| response::build(answer, allow, method, now))
    }
}

/// Rejection log lines per second.
const LOG_LINES_PER_SECOND: u32 = 20;
/// 503 answers a second (and at once) to segments of connections the kernel has no state for
/// (`conn_table_full`). Where the backend runs on this host the kernel answers only segments of
/// connections its server's socket shows real; elsewhere any source address may be forged, and
/// the answer must not become a reflector. The backend's side is reset either way.
const UNAVAILABLE_PER_SECOND: u32 = 50;
const UNAVAILABLE_BURST: u32 = 100;

impl Responder {
    pub fn new(stats: Arc<ResponderStats>) -> io::Result<Responder> {
        Ok(Responder {
            socket: PacketSocket::new()?,
            log_limit: LogLimit::new(LOG_LINES_PER_SECOND, stats.clone()),
            unavailable: crate::ratelimit::RateLimiter::new(
                UNAVAILABLE_PER_SECOND,
                UNAVAILABLE_BURST,
            ),
            stats,
            ip_id: std::process::id() as u16,
            answers: Answers::default(),
        })
    }

    /// Answer one event from the kernel.
    pub fn answer(&mut self, ev: &RejectEvent) {
        let allow = MethodSet(ev.allow);
        let method = Method::from_u8(ev.method);
        let reason = Reason::from_u32(ev.reason);
        let mut rule = None;
        let answer = match reason {
            Reason::Rejected => {
                rule = Some(self.count(ev, method, Outcome::Rejected));
                Answer::MethodNotAllowed
            }
            Reason::OptionsAnswered => Answer::OptionsNoContent,
            Reason::BadPath | Reason::BadFraming | Reason::NotHttp => Answer::BadRequest,
            Reason::LineTooLong => Answer::UriTooLong,
            Reason::HeadersTooLarge => Answer::HeadersTooLarge,
            Reason::ConnTableFull => {
                if self.unavailable.allow().is_none() {
                    self.stats.limited.fetch_add(1, Ordering::Relaxed);
                    self.publish(ev, method, reason, None, Some(503), "rate_limited");
                    return;
                }
                Answer::Unavailable
            }
            Reason::Monitored => {
                self.stats.monitored.fetch_add(1, Ordering::Relaxed);
                let rule = self.count(ev, method, Outcome::Monitored);
                self.publish(ev, method, reason, Some(&rule), None, "passed");
                if self.log_limit.allow() {
                    tracing::info!(client = %client(ev), method = method.as_str(), path = %event_path(ev), rule = rule.rule_label(), "monitor: would reject with 405 (not blocked)");
                }
                return;
            }
            other => {
                tracing::warn!(
                    reason = other.name(),
                    "event with a reason the responder does not answer"
                );
                return;
            }
        };
        let body = self.answers.get(answer, allow, method, SystemTime::now());
        self.ip_id = self.ip_id.wrapping_add(1);
        let frame = packet::response_frame(ev, body, self.ip_id);
        let ethertype = if ev.family == FAMILY_V4 {
            ETH_P_IPV4
        } else {
            ETH_P_IPV6
        };
        let sent = self
            .socket
            .send(ev.ifindex, ev.client_mac, ethertype, &frame);
        let counter = if sent.is_ok() {
            &self.stats.sent
        } else {
            &self.stats.failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let result = if sent.is_ok() { "sent" } else { "failed" };
        self.publish(
            ev,
            method,
            reason,
            rule.as_ref(),
            crate::explain::answer_of(reason),
            result,
        );
        if !self.log_limit.allow() {
            return;
        }
        let (client, path) = (client(ev), event_path(ev));
        let (method, rule) = (method.as_str(), rule.as_ref().map(RuleRef::rule_label));
        match sent {
            Ok(()) => {
                tracing::info!(%client, method, path = %path, rule, reason = reason.name(), "rejected: answered {answer:?}")
            }
            Err(e) => {
                tracing::warn!(%client, method, path = %path, rule, error = %e, "rejected, but the answer could not be sent")
            }
        }
    }

    /// Put the event on the live feed, if anybody reads it.
    fn publish(
        &self,
        ev: &RejectEvent,
        method: Method,
        reason: Reason,
        rule: Option<&RuleRef>,
        answer: Option<u16>,
        result: &'static str,
    ) {
        let hub = &self.stats.events;
        if !hub.wanted() {
            return;
        }
        hub.publish(Event {
            kind: if reason == Reason::Monitored {
                "monitored"
            } else {
                "rejected"
            },
            time: crate::events::now_rfc3339(),
            client: client(ev),
            method: method.as_str(),
            path: event_path(ev),
            rule: rule.map(|r| r.rule_label().to_owned()).unwrap_or_default(),
            match_kind: rule.map_or("", RuleRef::match_label),
            reason: reason.name(),
            answer,
            result,
        });
    }

    /// Count the event under the rule its path matched; returns that rule.
    fn count(&self, ev: &RejectEvent, method: Method, outcome: Outcome) -> RuleRef {
        let seen = &ev.line[..(ev.line_len as usize).min(ev.line.len())];
        self.stats
            .hits
            .record(seen, ev.path_len as usize, ev.allow, method, outcome)
    }

    /// Drain the ring until `shutdown` changes.
    pub async fn run(
        mut self,
        ring: RingBuf<MapData>,
        mut shutdown: watch::Receiver<bool>,
    ) -> io::Result<()> {
        // SAFETY: the AsyncFd owns the ring, so its fd stays open for as long as it is registered.
        let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }?;
        loop {
            tokio::select! {
                _ = shutdown.changed() => return Ok(()),
                guard = ring.readable_mut() => {
                    let mut guard = guard?;
                    let rb = guard.get_inner_mut();
                    while let Some(item) = rb.next() {
                        if item.len() < std::mem::size_of::<RejectEvent>() {
                            continue;
                        }
                        // SAFETY: the kernel wrote a whole RejectEvent (checked length); any bit
                        // pattern is a valid RejectEvent.
                        let ev: RejectEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                        drop(item);
                        self.answer(&ev);
                    }
                    guard.clear_ready();
                }
            }
        }
    }
}

fn client(ev: &RejectEvent) -> String {
    if ev.family == FAMILY_V4 {
        let a = &ev.client_addr_be;
        format!("{}.{}.{}.{}:{}", a[0], a[1], a[2], a[3], ev.client_port)
    } else {
        format!(
            "[{}]:{}",
            std::net::Ipv6Addr::from(ev.client_addr_be),
            ev.client_port
        )
    }
}

/// The canonical path the kernel decided on (its first `EVENT_LINE_MAX` bytes), escaped for
/// the logs.
fn event_path(ev: &RejectEvent) -> String {
    let n = (ev.line_len as usize).min(ev.line.len());
    let line = &ev.line[..n];
    let end = line
        .iter()
        .position(|&b| b == b'\r' || b == b'\n')
        .unwrap_or(n);
    String::from_utf8_lossy(&line[..end])
        .escape_debug()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn answers_are_built_once_a_second_and_are_what_build_makes() {
        let mut answers = Answers::default();
        let t = UNIX_EPOCH + Duration::from_secs(1_784_000_000);
        let items = MethodSet::EMPTY.with(Method::Get).with(Method::Post);
        let admin = MethodSet::EMPTY.with(Method::Get);
        let cases = [
            (Answer::MethodNotAllowed, items, Method::Delete),
            (Answer::MethodNotAllowed, items, Method::Put),
            (Answer::MethodNotAllowed, admin, Method::Delete),
            (Answer::MethodNotAllowed, items, Method::Head),
            (Answer::BadRequest, items, Method::Delete),
        ];
        for later in [Duration::ZERO, Duration::from_millis(999)] {
            for (answer, allow, method) in cases {
                let want = response::build(answer, allow, method, t);
                assert_eq!(answers.get(answer, allow, method, t + later), want);
            }
        }
        assert_eq!(answers.built.len(), cases.len());
        // The next second: built again, with its own Date.
        let next = t + Duration::from_secs(1);
        let (answer, allow, method) = cases[0];
        let got = answers.get(answer, allow, method, next).to_vec();
        assert_eq!(got, response::build(answer, allow, method, next));
        assert_ne!(got, response::build(answer, allow, method, t));
        assert_eq!(answers.built.len(), 1);
    }

    #[test]
    fn answers_kept_per_second_are_bounded_and_the_rest_still_right() {
        let mut answers = Answers::default();
        let t = UNIX_EPOCH + Duration::from_secs(1_784_000_000);
        for allow in 0..(ANSWERS_KEPT as u32 + 50) {
            let allow = MethodSet(allow);
            let got = answers
                .get(Answer::MethodNotAllowed, allow, Method::Delete, t)
                .to_vec();
            assert_eq!(
                got,
                response::build(Answer::MethodNotAllowed, allow, Method::Delete, t)
            );
        }
        assert_eq!(answers.built.len(), ANSWERS_KEPT);
    }
}

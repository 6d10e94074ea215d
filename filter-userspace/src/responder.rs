//! The responder: drains rejection events from the kernel and answers each client on its own
//! connection with a forged `405 Method Not Allowed` (or the 204/400/414/431/503 its reason
//! calls for) + FIN, sent through an `AF_PACKET` socket on the interface the request arrived
//! on. The kernel has already turned the rejected segment into a reset to the backend. It also
//! counts every 405 and every monitor-mode hit under the rule that matched ([`crate::hits`]),
//! and logs a sample of them with a summary of each busy second.
//!
//! It is built to cost little per refusal under a flood:
//! - it runs on a thread of its own, asleep in `ppoll` on the ring until an event arrives;
//!   while events are dense (two or more per [`GATHER`], [`Pace`]) it lets them gather for
//!   [`GATHER`] after each drain, so a flood costs one wakeup per [`GATHER`], not one per
//!   refusal (the kernel wakes the reader only for a record written to a ring the reader had
//!   emptied). A trickle of refusals is answered as each arrives;
//! - it drains the ring in batches of up to [`BATCH`] events, reads the clock once per batch,
//!   and sends the batch's answers with one `sendmmsg`;
//! - the answers come from [`AnswerCache`] (each distinct answer built once a second, with the
//!   checksum of its bytes); per event only the frame's headers are written, into a buffer of
//!   the batch, and the answer's bytes are the frame's second `iovec`: no allocation per
//!   answer;
//! - log lines are a sample ([`LOG_LINES_PER_SECOND`]) plus one line summing up each second
//!   in which lines were left out; the counters are exact.
//!
//! Must not: drop an event it took from the ring without answering or counting it, or leave
//! events in the ring for longer than [`GATHER`] (and the time to answer a batch) while they
//! arrive.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use aya::maps::{MapData, RingBuf};
use filter_common::{
    Method, MethodSet, Reason, RejectEvent, EVENT_LINE_MAX, FAMILY_V4, RESPONDER_MARK,
};
use tokio::sync::watch;

use crate::events::Event;
use crate::hits::{Outcome, RuleHits, RuleRef};
use crate::packet::{self, HEADERS_MAX};
use crate::response::{Answer, AnswerCache, AnswerId};

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

/// Events taken from the ring per batch, and so answers sent per `sendmmsg`.
pub const BATCH: usize = 64;
/// Events taken in one go before the thread looks whether it is to stop (a flood faster than
/// the responder must not keep it from stopping).
const DRAIN_MAX: usize = 16 * BATCH;
/// How long events gather after a batch before the ring is drained again: the most an answer
/// waits for its batch under a flood, and a bound of a wakeup per `GATHER` while it lasts.
/// Each client connection waits for its answer, so the pause also bounds how fast clients are
/// answered: at 250 µs the bench's 405 load ran at 1.43× the closing nginx with a quarter of
/// the machine idle, at 100 µs at 1.65× with the machine busy, and 50 µs gave the same 1.65×
/// for 40 % more CPU per answer.
pub const GATHER: Duration = Duration::from_micros(100);
/// Log lines about single events per second.
pub const LOG_LINES_PER_SECOND: u32 = 20;
/// 503 answers a second (and at once) to segments of connections the kernel has no state for
/// (`conn_table_full`). Where the backend runs on this host the kernel answers only segments of
/// connections its server's socket shows real; elsewhere any source address may be forged, and
/// the answer must not become a reflector. The backend's side is reset either way.
const UNAVAILABLE_PER_SECOND: u32 = 50;
const UNAVAILABLE_BURST: u32 = 100;

/// The responder's log: at most `per_second` lines a second about single events, and for each
/// second in which lines were left out, one line that sums it up (answers by status, monitor
/// hits, failures, lines left out).
pub struct LogLimit {
    per_second: u32,
    window: Instant,
    used: u32,
    suppressed: u64,
    tally: Tally,
    stats: Arc<ResponderStats>,
}

/// What one second of the log saw.
#[derive(Default)]
struct Tally {
    answered: [u64; Answer::ALL.len()],
    failed: u64,
    monitored: u64,
    limited: u64,
}

impl LogLimit {
    pub fn new(per_second: u32, stats: Arc<ResponderStats>) -> LogLimit {
        LogLimit {
            per_second,
            window: Instant::now(),
            used: 0,
            suppressed: 0,
            tally: Tally::default(),
            stats,
        }
    }

    /// Whether the caller may log a line about one event now.
    pub fn allow(&mut self, now: Instant) -> bool {
        self.tick(now);
        if self.used < self.per_second {
            self.used += 1;
            true
        } else {
            self.suppressed += 1;
            self.stats.log_suppressed.fetch_add(1, Ordering::Relaxed);
            false
        }
    }

    /// End the second if it is over: sum it up if lines were left out.
    pub fn tick(&mut self, now: Instant) {
        if now.saturating_duration_since(self.window) < Duration::from_secs(1) {
            return;
        }
        if self.suppressed > 0 {
            let t = &self.tally;
            let answered = Answer::ALL
                .iter()
                .filter(|a| t.answered[a.index()] > 0)
                .map(|a| format!("{} {}", t.answered[a.index()], a.status()))
                .collect::<Vec<_>>()
                .join(", ");
            tracing::info!(
                answered = %answered,
                failed = t.failed,
                monitored = t.monitored,
                limited = t.limited,
                suppressed = self.suppressed,
                "responder, last second: {} log lines left out",
                self.suppressed
            );
        }
        self.window = now;
        self.used = 0;
        self.suppressed = 0;
        self.tally = Tally::default();
    }

    /// When the current second ends, if it has a summary to write.
    fn pending_until(&self) -> Option<Instant> {
        (self.suppressed > 0).then(|| self.window + Duration::from_secs(1))
    }
}

/// Whether events come often enough that letting them gather pays for the wakeup it costs:
/// at least two per [`GATHER`] on average over the last [`PACE_WINDOW`] measured. A trickle
/// (each event alone in its `GATHER`) is answered as each arrives, one wakeup each.
struct Pace {
    since: Instant,
    events: u64,
    dense: bool,
}

/// How long the responder counts events to decide whether they are dense.
const PACE_WINDOW: Duration = Duration::from_millis(10);

impl Pace {
    fn new(now: Instant) -> Pace {
        Pace {
            since: now,
            events: 0,
            dense: false,
        }
    }

    /// `taken` events were drained at `now`.
    fn note(&mut self, taken: usize, now: Instant) {
        self.events += taken as u64;
        let span = now.saturating_duration_since(self.since);
        if span >= PACE_WINDOW {
            self.dense = u128::from(self.events) * GATHER.as_nanos() >= 2 * span.as_nanos();
            self.since = now;
            self.events = 0;
        }
    }
}

/// An `AF_PACKET` socket that only sends whole Ethernet frames, each marked
/// [`RESPONDER_MARK`] so the egress classifier passes them without a look.
struct PacketSocket(OwnedFd);

impl PacketSocket {
    fn new() -> io::Result<PacketSocket> {
        // Protocol 0: this socket receives nothing.
        // SAFETY: a plain system call; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a socket this process just opened and nothing else owns.
        let socket = PacketSocket(unsafe { OwnedFd::from_raw_fd(fd) });
        let mark = RESPONDER_MARK;
        // SAFETY: the option value is a live u32 of the length given.
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

    /// Send every message of `msgs`, as many per `sendmmsg` as the kernel takes. `errors[k]`
    /// is the error (`errno`) of message `k`, 0 if it was sent.
    fn send_many(&self, msgs: &mut [libc::mmsghdr], errors: &mut [i32]) {
        let mut i = 0;
        while i < msgs.len() {
            let rest = &mut msgs[i..];
            // SAFETY: every header in `rest` points to an address and iovecs that outlive this
            // call (the caller's arrays); the kernel writes only `msg_len` of each.
            let r = unsafe {
                libc::sendmmsg(
                    self.0.as_raw_fd(),
                    rest.as_mut_ptr(),
                    rest.len() as libc::c_uint,
                    0,
                )
            };
            if r > 0 {
                let r = (r as usize).min(rest.len());
                errors[i..i + r].fill(0);
                i += r;
                continue;
            }
            // The first message of `rest` failed (the kernel reports an error only when it
            // sent none); the ones after it are tried again.
            let e = io::Error::last_os_error();
            if r < 0 && e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            errors[i] = e.raw_os_error().filter(|&n| n != 0).unwrap_or(libc::EIO);
            i += 1;
        }
    }
}

/// An `eventfd` that tells the responder's thread to stop; once set it stays readable.
struct Stop(OwnedFd);

impl Stop {
    fn new() -> io::Result<Stop> {
        // SAFETY: a plain system call; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and nothing else owns it.
        Ok(Stop(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn set(&self) {
        let one = 1u64;
        // SAFETY: writes the 8 bytes of a live u64 to an eventfd. It cannot block (the counter
        // is far from overflow); an error would leave the thread running until exit.
        unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

/// Wait until one of `fds` is readable or `timeout` passes (`None`: no limit). Returns which
/// of `fds` are readable, as bits; an interrupted wait returns no bit.
fn wait(fds: &[RawFd], timeout: Option<Duration>) -> io::Result<u32> {
    let mut polled = [libc::pollfd {
        fd: -1,
        events: 0,
        revents: 0,
    }; 2];
    let polled = &mut polled[..fds.len()];
    for (p, &fd) in polled.iter_mut().zip(fds) {
        p.fd = fd;
        p.events = libc::POLLIN;
    }
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs() as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `polled` and `ts` live across the call; no signal mask is passed.
    let r = unsafe {
        libc::ppoll(
            polled.as_mut_ptr(),
            polled.len() as libc::nfds_t,
            ts_ptr,
            std::ptr::null(),
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(0)
        } else {
            Err(e)
        };
    }
    let mut ready = 0;
    for (k, p) in polled.iter().enumerate() {
        if p.revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
            return Err(io::Error::other(format!(
                "polling fd {}: revents {:#x}",
                p.fd, p.revents
            )));
        }
        if p.revents != 0 {
            ready |= 1 << k;
        }
    }
    Ok(ready)
}

/// One answer of a batch.
struct Slot {
    ifindex: u32,
    client_mac: [u8; 6],
    ethertype: u16,
    answer: AnswerId,
    /// Bytes of its headers in [`Batch::heads`] (same index as the slot).
    head_len: usize,
    /// For the log's sample and the live feed: logged (`Note::log`) and published after the
    /// send, with its result.
    note: Option<Box<Note>>,
}

/// What a log line and the live feed say about one answered event.
struct Note {
    client: String,
    method: &'static str,
    path: String,
    reason: Reason,
    rule: Option<RuleRef>,
    /// In the log's sample (else only for the feed).
    log: bool,
}

/// The answers of one batch, in buffers allocated once.
struct Batch {
    slots: Vec<Slot>,
    heads: Box<[[u8; HEADERS_MAX]; BATCH]>,
    errors: [i32; BATCH],
}

impl Batch {
    fn new() -> Batch {
        Batch {
            slots: Vec::with_capacity(BATCH),
            heads: Box::new([[0; HEADERS_MAX]; BATCH]),
            errors: [0; BATCH],
        }
    }
}

/// A run of events alike (path, `Allow`, method, outcome) not yet counted in [`RuleHits`]: a
/// flood of one refusal resolves its rule once per batch, not once per event.
struct Run {
    line: [u8; EVENT_LINE_MAX],
    line_len: usize,
    path_len: usize,
    allow: u32,
    method: Method,
    outcome: Outcome,
    n: u64,
}

impl Run {
    fn new() -> Run {
        Run {
            line: [0; EVENT_LINE_MAX],
            line_len: 0,
            path_len: 0,
            allow: 0,
            method: Method::Other,
            outcome: Outcome::Rejected,
            n: 0,
        }
    }

    /// Count `ev`: in this run if it is alike, else in a new run (the old one is counted in
    /// `hits` first).
    fn count(&mut self, hits: &RuleHits, ev: &RejectEvent, method: Method, outcome: Outcome) {
        if !self.extend(ev, method, outcome) {
            self.start(hits, ev, method, outcome);
        }
    }

    /// Count `ev` in the run if it is alike; false if it is not (the run is left as it is).
    fn extend(&mut self, ev: &RejectEvent, method: Method, outcome: Outcome) -> bool {
        let seen = event_seen(ev);
        let alike = self.n > 0
            && self.outcome == outcome
            && self.method == method
            && self.allow == ev.allow
            && self.path_len == ev.path_len as usize
            && self.line[..self.line_len] == *seen;
        if alike {
            self.n += 1;
        }
        alike
    }

    /// Start a run with `ev` (the previous one counted first).
    fn start(&mut self, hits: &RuleHits, ev: &RejectEvent, method: Method, outcome: Outcome) {
        self.flush(hits);
        let seen = event_seen(ev);
        self.line[..seen.len()].copy_from_slice(seen);
        self.line_len = seen.len();
        self.path_len = ev.path_len as usize;
        self.allow = ev.allow;
        self.method = method;
        self.outcome = outcome;
        self.n = 1;
    }

    fn flush(&mut self, hits: &RuleHits) {
        if self.n > 0 {
            let seen = &self.line[..self.line_len];
            hits.record_n(
                seen,
                self.path_len,
                self.allow,
                self.method,
                self.outcome,
                self.n,
            );
            self.n = 0;
        }
    }
}

pub struct Responder {
    socket: PacketSocket,
    stats: Arc<ResponderStats>,
    ip_id: u16,
    log: LogLimit,
    answers: AnswerCache,
    batch: Batch,
    run: Box<Run>,
    /// 503 answers (see `UNAVAILABLE_PER_SECOND`).
    unavailable: crate::ratelimit::RateLimiter,
}

impl Responder {
    pub fn new(stats: Arc<ResponderStats>) -> io::Result<Responder> {
        Ok(Responder {
            socket: PacketSocket::new()?,
            log: LogLimit::new(LOG_LINES_PER_SECOND, stats.clone()),
            unavailable: crate::ratelimit::RateLimiter::new(
                UNAVAILABLE_PER_SECOND,
                UNAVAILABLE_BURST,
            ),
            stats,
            ip_id: std::process::id() as u16,
            answers: AnswerCache::default(),
            batch: Batch::new(),
            run: Box::new(Run::new()),
        })
    }

    /// Count the event under the rule its path matched. With `need_rule` it is counted at once
    /// and its rule returned (for the log); else it may join the run of events alike.
    fn count(
        &mut self,
        ev: &RejectEvent,
        method: Method,
        outcome: Outcome,
        need_rule: bool,
    ) -> Option<RuleRef> {
        let hits = &self.stats.hits;
        if need_rule {
            return Some(hits.record(
                event_seen(ev),
                ev.path_len as usize,
                ev.allow,
                method,
                outcome,
            ));
        }
        self.run.count(hits, ev, method, outcome);
        None
    }

    /// Decide what `ev` gets; an answer is queued as a slot of the batch.
    fn take(&mut self, ev: &RejectEvent, now: Instant) {
        let method = Method::from_u8(ev.method);
        let reason = Reason::from_u32(ev.reason);
        let answer = match reason {
            Reason::Rejected => Answer::MethodNotAllowed,
            Reason::OptionsAnswered => Answer::OptionsNoContent,
            Reason::BadPath | Reason::BadFraming | Reason::NotHttp => Answer::BadRequest,
            Reason::LineTooLong => Answer::UriTooLong,
            Reason::HeadersTooLarge => Answer::HeadersTooLarge,
            Reason::ConnTableFull => {
                if self.unavailable.allow().is_none() {
                    self.stats.limited.fetch_add(1, Ordering::Relaxed);
                    self.log.tally.limited += 1;
                    self.publish(ev, method, reason, None, Some(503), "rate_limited");
                    return;
                }
                Answer::Unavailable
            }
            Reason::Monitored => {
                self.stats.monitored.fetch_add(1, Ordering::Relaxed);
                self.log.tally.monitored += 1;
                let sampled = self.log.allow(now);
                let wanted = self.stats.events.wanted();
                let rule = self.count(ev, method, Outcome::Monitored, sampled || wanted);
                if sampled {
                    if let Some(rule) = &rule {
                        tracing::info!(client = %client(ev), method = method.as_str(), path = %event_path(ev), rule = rule.rule_label(), "monitor: would reject with 405 (not blocked)");
                    }
                }
                self.publish(ev, method, reason, rule.as_ref(), None, "passed");
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
        self.log.tally.answered[answer.index()] += 1;
        let sampled = self.log.allow(now);
        let wanted = self.stats.events.wanted();
        let rule = if answer == Answer::MethodNotAllowed {
            self.count(ev, method, Outcome::Rejected, sampled || wanted)
        } else {
            None
        };
        let note = (sampled || wanted).then(|| {
            Box::new(Note {
                client: client(ev),
                method: method.as_str(),
                path: event_path(ev),
                reason,
                rule,
                log: sampled,
            })
        });
        let id = self.answers.get(answer, allow_of(ev), method);
        let body = self.answers.bytes(id);
        self.ip_id = self.ip_id.wrapping_add(1);
        let slot = self.batch.slots.len();
        let head_len = packet::write_headers(
            ev,
            body.bytes.len(),
            body.sum,
            self.ip_id,
            &mut self.batch.heads[slot],
        );
        self.batch.slots.push(Slot {
            ifindex: ev.ifindex,
            client_mac: ev.client_mac,
            ethertype: packet::ethertype(ev),
            answer: id,
            head_len,
            note,
        });
    }

    /// Put an event the responder sends no answer for on the live feed, if anybody reads it.
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

    /// Send the batch's answers, count them, log the sampled ones.
    fn send(&mut self, now: Instant) {
        self.run.flush(&self.stats.hits);
        let b = &mut self.batch;
        let n = b.slots.len();
        if n == 0 {
            return;
        }
        // SAFETY: all-zero is a valid sockaddr_ll, iovec and mmsghdr (null pointers, zero
        // lengths); every entry used is filled in below.
        let mut addrs: [libc::sockaddr_ll; BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut iovs: [[libc::iovec; 2]; BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for (k, slot) in b.slots.iter().enumerate() {
            let body = &self.answers.bytes(slot.answer).bytes;
            let a = &mut addrs[k];
            a.sll_family = libc::AF_PACKET as u16;
            a.sll_protocol = slot.ethertype.to_be();
            a.sll_ifindex = slot.ifindex as i32;
            a.sll_halen = 6;
            a.sll_addr[..6].copy_from_slice(&slot.client_mac);
            iovs[k] = [
                libc::iovec {
                    iov_base: b.heads[k].as_mut_ptr().cast(),
                    iov_len: slot.head_len,
                },
                libc::iovec {
                    // The kernel only reads through it.
                    iov_base: body.as_ptr() as *mut libc::c_void,
                    iov_len: body.len(),
                },
            ];
            let h = &mut msgs[k].msg_hdr;
            h.msg_name = (a as *mut libc::sockaddr_ll).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            h.msg_iov = iovs[k].as_mut_ptr();
            h.msg_iovlen = 2;
        }
        self.socket.send_many(&mut msgs[..n], &mut b.errors[..n]);
        let errors = &b.errors[..n];
        let failed = errors.iter().filter(|&&e| e != 0).count();
        self.stats
            .sent
            .fetch_add((n - failed) as u64, Ordering::Relaxed);
        if failed > 0 {
            self.stats
                .failed
                .fetch_add(failed as u64, Ordering::Relaxed);
            self.log.tally.failed += failed as u64;
        }
        let mut failures_logged = false;
        for (slot, &e) in b.slots.iter_mut().zip(errors) {
            let Some(note) = slot.note.take() else {
                if e != 0 && !failures_logged && self.log.allow(now) {
                    let error = io::Error::from_raw_os_error(e);
                    tracing::warn!(failed, batch = n, %error, "answers to refused requests could not be sent");
                    failures_logged = true;
                }
                continue;
            };
            let Note {
                client,
                method,
                path,
                reason,
                rule,
                log,
            } = *note;
            if log {
                let rule = rule.as_ref().map(RuleRef::rule_label);
                let status = self
                    .answers
                    .bytes(slot.answer)
                    .bytes
                    .get(9..12)
                    .unwrap_or(b"???");
                let status = String::from_utf8_lossy(status);
                let reason = reason.name();
                if e == 0 {
                    tracing::info!(%client, method, path = %path, rule, reason, "rejected: answered {status}");
                } else {
                    let error = io::Error::from_raw_os_error(e);
                    tracing::warn!(%client, method, path = %path, rule, reason, %error, "rejected, but the answer could not be sent");
                }
            }
            let hub = &self.stats.events;
            if hub.wanted() {
                hub.publish(Event {
                    kind: "rejected",
                    time: crate::events::now_rfc3339(),
                    client,
                    method,
                    path,
                    rule: rule
                        .as_ref()
                        .map(|r| r.rule_label().to_owned())
                        .unwrap_or_default(),
                    match_kind: rule.as_ref().map_or("", RuleRef::match_label),
                    reason: reason.name(),
                    answer: crate::explain::answer_of(reason),
                    result: if e == 0 { "sent" } else { "failed" },
                });
            }
        }
    }

    /// Drain the ring in batches of at most [`BATCH`] until it is empty or [`DRAIN_MAX`]
    /// events are taken; returns the events taken.
    fn drain(&mut self, ring: &mut RingBuf<MapData>) -> usize {
        let mut taken = 0;
        loop {
            let now = Instant::now();
            self.log.tick(now);
            self.answers.begin(SystemTime::now());
            self.batch.slots.clear();
            let mut items = 0;
            while items < BATCH {
                let Some(item) = ring.next() else { break };
                items += 1;
                if item.len() < std::mem::size_of::<RejectEvent>() {
                    continue;
                }
                let copy;
                let ev: &RejectEvent = if item.as_ptr().cast::<RejectEvent>().is_aligned() {
                    // SAFETY: a whole RejectEvent (checked length) at an aligned address (ring
                    // records are 8-byte aligned); any bit pattern is a valid RejectEvent; the
                    // kernel does not write a committed record until it is consumed, which is
                    // when `item` drops, after the last use of `ev`.
                    unsafe { &*item.as_ptr().cast() }
                } else {
                    // SAFETY: as above, read at any alignment.
                    copy = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                    &copy
                };
                self.take(ev, now);
            }
            self.send(now);
            taken += items;
            if items < BATCH || taken >= DRAIN_MAX {
                return taken;
            }
        }
    }

    /// The responder's thread: wait for events, drain, let the next ones gather, drain again,
    /// until `stop` is set.
    fn serve(mut self, mut ring: RingBuf<MapData>, stop: &Stop) -> io::Result<()> {
        const RING: u32 = 1;
        const STOP: u32 = 2;
        let (ring_fd, stop_fd) = (ring.as_raw_fd(), stop.0.as_raw_fd());
        let mut pace = Pace::new(Instant::now());
        loop {
            let timeout = self
                .log
                .pending_until()
                .map(|t| t.saturating_duration_since(Instant::now()));
            let ready = wait(&[ring_fd, stop_fd], timeout)?;
            if ready & STOP != 0 {
                return Ok(());
            }
            self.log.tick(Instant::now());
            if ready & RING == 0 {
                continue;
            }
            // Drain; while events are dense, let them gather and drain again, until a drain
            // finds nothing. A drain that stopped at its bound may have left events: look
            // again at once. Sparse events go back to `ppoll`: the ring wakes it for the next.
            loop {
                let taken = self.drain(&mut ring);
                pace.note(taken, Instant::now());
                let pause = match taken {
                    0 => break,
                    n if n >= DRAIN_MAX => Duration::ZERO,
                    _ if pace.dense => GATHER,
                    _ => break,
                };
                if wait(&[stop_fd], Some(pause))? != 0 {
                    return Ok(());
                }
            }
        }
    }

    /// Answer events from `ring` on a thread of the responder's own until `shutdown` changes.
    pub async fn run(
        self,
        ring: RingBuf<MapData>,
        mut shutdown: watch::Receiver<bool>,
    ) -> io::Result<()> {
        let stop = Arc::new(Stop::new()?);
        let (done_tx, mut done) = tokio::sync::oneshot::channel();
        let thread_stop = stop.clone();
        std::thread::Builder::new()
            .name("responder".into())
            .spawn(move || {
                let _ = done_tx.send(self.serve(ring, &thread_stop));
            })?;
        let gone = || io::Error::other("the responder's thread ended without a result");
        tokio::select! {
            r = &mut done => return r.unwrap_or_else(|_| Err(gone())),
            _ = shutdown.changed() => {}
        }
        stop.set();
        done.await.unwrap_or_else(|_| Err(gone()))
    }
}

/// The first bytes of the event's canonical path that it carries.
fn event_seen(ev: &RejectEvent) -> &[u8] {
    &ev.line[..(ev.line_len as usize).min(ev.line.len())]
}

fn allow_of(ev: &RejectEvent) -> MethodSet {
    MethodSet(ev.allow)
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
    use crate::policy::{DefaultPolicy, Policy, RuleSpec};

    fn event(path: &str, allow: u32, method: Method) -> RejectEvent {
        // SAFETY: any bit pattern, zeros included, is a valid RejectEvent.
        let mut ev: RejectEvent = unsafe { std::mem::zeroed() };
        let n = path.len().min(EVENT_LINE_MAX);
        ev.line[..n].copy_from_slice(&path.as_bytes()[..n]);
        ev.line_len = n as u16;
        ev.path_len = path.len() as u16;
        ev.allow = allow;
        ev.method = method as u8;
        ev
    }

    #[test]
    fn runs_of_events_alike_count_what_one_by_one_counts() {
        let specs = [
            RuleSpec::new("/a", &["GET"]),
            RuleSpec::new("/b", &["POST"]),
        ];
        let policy = Policy::from_specs(DefaultPolicy::Any, &specs).unwrap();
        let (one_by_one, in_runs) = (RuleHits::default(), RuleHits::default());
        one_by_one.set_policy(&policy);
        in_runs.set_policy(&policy);
        let get = Method::Get.bit() | Method::Head.bit();
        let long = format!("/{}", "x".repeat(300));
        let long_other = format!("/{}y", "x".repeat(299));
        let events = [
            (event("/a", get, Method::Delete), Outcome::Rejected),
            (event("/a", get, Method::Delete), Outcome::Rejected),
            (event("/a", get, Method::Put), Outcome::Rejected),
            (event("/a", get, Method::Put), Outcome::Monitored),
            (
                event("/b", Method::Post.bit(), Method::Put),
                Outcome::Rejected,
            ),
            (event("/a", get, Method::Delete), Outcome::Rejected),
            (event("/ab", get, Method::Delete), Outcome::Rejected),
            // Alike in their first 256 bytes, told apart by length.
            (event(&long, 0, Method::Delete), Outcome::Rejected),
            (event(&long_other, 0, Method::Delete), Outcome::Rejected),
            (event(&long_other, 0, Method::Delete), Outcome::Rejected),
        ];
        let mut run = Run::new();
        for (ev, outcome) in &events {
            let method = Method::from_u8(ev.method);
            one_by_one.record(
                event_seen(ev),
                ev.path_len as usize,
                ev.allow,
                method,
                *outcome,
            );
            run.count(&in_runs, ev, method, *outcome);
        }
        run.flush(&in_runs);
        assert_eq!(in_runs.snapshot(), one_by_one.snapshot());
        let total: u64 = in_runs.snapshot().iter().map(|(_, n)| n).sum();
        assert_eq!(total, events.len() as u64);
        // A flushed run counts nothing twice.
        run.flush(&in_runs);
        assert_eq!(in_runs.snapshot(), one_by_one.snapshot());
    }

    #[test]
    fn events_are_dense_from_two_per_gather() {
        let t0 = Instant::now();
        let mut pace = Pace::new(t0);
        assert!(!pace.dense, "a start answers each event as it comes");
        // Per window of 10 ms: 2000/s is 20 events, 20000/s (two per GATHER) is 200.
        let windows = [
            (20, false),
            (200, true),
            (199, false),
            (1000, true),
            (0, false),
        ];
        for (k, (events, dense)) in windows.into_iter().enumerate() {
            let start = t0 + PACE_WINDOW * k as u32;
            pace.note(events, start + PACE_WINDOW / 2);
            pace.note(0, start + PACE_WINDOW);
            assert_eq!(pace.dense, dense, "{events} events in {PACE_WINDOW:?}");
        }
    }

    #[test]
    fn the_log_samples_a_few_lines_a_second_and_counts_the_rest() {
        let stats = Arc::new(ResponderStats::default());
        let mut log = LogLimit::new(3, stats.clone());
        let t0 = log.window;
        let got: Vec<bool> = (0..5).map(|_| log.allow(t0)).collect();
        assert_eq!(got, [true, true, true, false, false]);
        assert_eq!(stats.log_suppressed.load(Ordering::Relaxed), 2);
        assert_eq!(
            log.pending_until(),
            Some(log.window + Duration::from_secs(1))
        );
        // Within the second: still none; the next second: a fresh sample.
        assert!(!log.allow(t0 + Duration::from_millis(999)));
        let next = log.window + Duration::from_secs(1);
        log.tick(next);
        assert_eq!(log.pending_until(), None, "the summary was written");
        assert!(log.allow(next));
        assert_eq!(stats.log_suppressed.load(Ordering::Relaxed), 3);
    }
}

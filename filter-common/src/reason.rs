//! Verdict reasons: why the classifier let a packet through or rejected it. The kernel counts
//! every packet under exactly one verdict reason, and some events under an extra one
//! (`EventLost`, `ResetFailed`), in the per-CPU `STATS` array; userspace reports them by name.
//!
//! Append-only, like cilium's drop reasons: a retired value stays reserved.

/// Counter slots in `STATS`.
pub const REASON_COUNT: usize = 64;

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Not IPv4 or IPv6 (ARP, VLAN-tagged, ...): passed.
    NotIp = 0,
    /// IP but not TCP: passed.
    NotTcp = 1,
    /// A later IP fragment, an IPv6 packet whose TCP header is behind more extension headers
    /// than the program walks, or a frame tagged for a VLAN: passed.
    Unsupported = 2,
    /// TCP to a port that is not configured: passed.
    OtherPort = 3,
    /// TCP to a configured port with no payload (handshake, ACKs, FIN): passed.
    NoPayload = 4,
    /// The payload does not start with an HTTP/1.x request line: passed.
    NotHttp = 5,
    /// Asterisk-form (`OPTIONS *`) or a target the parser does not decide on: passed.
    TargetForm = 6,
    /// The segment ends inside the request line's path: passed (stream tracking is future work).
    LineIncomplete = 7,
    /// The path is longer than the inspection bound: passed.
    PathTooLong = 8,
    /// A rule matched the path and allows the method: passed.
    AllowedByRule = 9,
    /// No rule for the path; the default allows the method: passed.
    AllowedByDefault = 10,
    /// The method is not allowed: the segment became a reset to the backend, and the
    /// responder was told to answer the client with 405.
    Rejected = 11,
    /// Extra count: a rejection whose event did not fit in the ring buffer (no 405 was sent).
    EventLost = 12,
    /// Extra count: a rejected segment could not be turned into a reset, so it was dropped.
    ResetFailed = 13,
    /// The method is not allowed, but the rule is in monitor mode or the daemon runs with
    /// `--dry-run`: passed, and the responder logs what would have been rejected.
    Monitored = 14,
    /// OPTIONS is never answered with 405 (CORS preflight): passed to the backend.
    OptionsPassed = 15,
    /// OPTIONS on a governed path with `options = "answer"`: the responder answers
    /// `204 No Content` with `Allow`; the backend is reset.
    OptionsAnswered = 16,
    /// The path's encoding is ambiguous (`%2F`, `%5C`, `%00`, a backslash, an invalid escape,
    /// dot segments above the root): the responder answers 400; the backend is reset.
    BadPath = 17,
    /// The request line is longer than the inspection bound: the responder answers 414; the
    /// backend is reset (or passed, if limits are configured to pass).
    LineTooLong = 18,
    /// The header block is longer than the inspection bound: 431, backend reset (or passed).
    HeadersTooLarge = 19,
    /// A segment of a tracked connection where no request line starts (headers after the
    /// decision, body bytes): passed.
    MidStream = 20,
    /// A segment beyond the next byte the filter expects on a connection whose current request
    /// is undecided: dropped, so the client retransmits it in order.
    OutOfOrder = 21,
    /// The connection stopped being HTTP/1.1 (`101` to an `Upgrade` request, `2xx` to
    /// `CONNECT`, or such a request on a connection without egress state): its further bytes
    /// pass untracked.
    Tunnel = 22,
    /// A segment of a connection whose state is gone (the full table evicted it) after the
    /// adoption window: the responder answers 503 and the backend is reset.
    ConnTableFull = 23,
    /// A retransmission of bytes already decided on: passed (the backend keeps its first copy).
    Retransmit = 24,
    /// Request framing backends disagree on (`Content-Length` with `Transfer-Encoding`, two
    /// lengths, an unknown transfer coding, line folding, control bytes, a bad chunk size):
    /// the responder answers 400; the backend is reset.
    BadFraming = 25,
    /// The first fragment of a fragmented IP packet for an inspected port: dropped (the filter
    /// cannot see the whole segment).
    Fragment = 26,
    /// A client segment held back (dropped; the client sends it again): it starts a refused
    /// request while earlier responses are incomplete or unacknowledged (the refusal waits so
    /// the client gets them intact and the 405 after them), or a request while 63 are
    /// outstanding.
    Held = 27,
    /// A client segment after an `Upgrade` / `CONNECT` request, dropped until the server's
    /// answer is seen (the client sends it again).
    Awaiting = 28,
    /// The server answered an `Upgrade` / `CONNECT` request without switching protocols:
    /// the connection is followed as HTTP/1.1 again.
    UpgradeRefused = 29,
    /// Extra count: the egress classifier could not frame a connection's responses; the
    /// connection falls back to what the filter does without egress state.
    ReplyLost = 30,
    /// The classifier could not pass a segment to its next stage (a tail call failed: the
    /// stage is missing from `STAGES`, or the chain ran too long): dropped on ingress (the
    /// client sends it again), the connection's responses lost on egress.
    StageFailed = 31,
    /// A SYN on a connection the filter follows: the server's TCP answers it with a challenge
    /// ACK and discards it (RFC 5961 §4), so it changes nothing the filter keeps; it passes
    /// (without its data, if it carried any), since it may start a new connection where the
    /// server's is gone.
    SynInStream = 32,
    /// A data segment without the ACK flag: the server's TCP discards it; dropped.
    NoAck = 33,
    /// A segment whose acknowledgement number the server's TCP refuses (data never sent, or
    /// older than its window: RFC 5961 §5.2); dropped.
    BadAck = 34,
    /// A segment whose timestamp fails PAWS (RFC 7323), or that carries none where the
    /// handshake negotiated timestamps; dropped.
    Paws = 35,
    /// A segment at or past the right edge of the server's receive window: dropped; or data
    /// running past it: trimmed to the edge (counted here too).
    OutOfWindow = 36,
    /// A segment whose TCP checksum is wrong (and that no device verified): the server's TCP
    /// discards it; dropped.
    BadChecksum = 37,
    /// A frame not addressed to this host (packet type other than `PACKET_HOST`) for an
    /// inspected port: the host's TCP never reads it; dropped.
    NotForHost = 38,
    /// Headers the classifier cannot walk to the TCP header (more VLAN priority tags or IPv6
    /// extension headers than it reads): dropped, since the segment might be for an inspected
    /// port.
    Unwalkable = 39,
    /// A data segment of no connection the filter follows and no live connection of the
    /// server's (no established socket for it on this host): passed untouched, unanswered
    /// (the server's TCP resets or discards it).
    Stray = 40,
    /// Extra count: an urgent pointer was cleared (flag and pointer zeroed, checksum fixed),
    /// so the server's TCP reads the urgent byte in line, as the filter does.
    UrgentCleared = 41,
    /// An IP or TCP header the host discards (an IPv4 header checksum or length that does not
    /// add up, a wrong IP version, a TCP header shorter than 20 bytes or longer than the
    /// packet) on a segment for an inspected port: dropped.
    BadHeader = 42,
    /// A segment the filter cannot place against what the server's TCP holds: data for a
    /// connection the server has not completed (a listener or a half-open handshake only,
    /// where a SYN cookie or the handshake's last ACK could still make a connection of it), or
    /// a retransmission of bytes the server's socket shows it never took. Dropped: the client
    /// sends it again.
    Unconfirmed = 43,
}

impl Reason {
    pub const ALL: [Reason; 44] = [
        Reason::NotIp,
        Reason::NotTcp,
        Reason::Unsupported,
        Reason::OtherPort,
        Reason::NoPayload,
        Reason::NotHttp,
        Reason::TargetForm,
        Reason::LineIncomplete,
        Reason::PathTooLong,
        Reason::AllowedByRule,
        Reason::AllowedByDefault,
        Reason::Rejected,
        Reason::EventLost,
        Reason::ResetFailed,
        Reason::Monitored,
        Reason::OptionsPassed,
        Reason::OptionsAnswered,
        Reason::BadPath,
        Reason::LineTooLong,
        Reason::HeadersTooLarge,
        Reason::MidStream,
        Reason::OutOfOrder,
        Reason::Tunnel,
        Reason::ConnTableFull,
        Reason::Retransmit,
        Reason::BadFraming,
        Reason::Fragment,
        Reason::Held,
        Reason::Awaiting,
        Reason::UpgradeRefused,
        Reason::ReplyLost,
        Reason::StageFailed,
        Reason::SynInStream,
        Reason::NoAck,
        Reason::BadAck,
        Reason::Paws,
        Reason::OutOfWindow,
        Reason::BadChecksum,
        Reason::NotForHost,
        Reason::Unwalkable,
        Reason::Stray,
        Reason::UrgentCleared,
        Reason::BadHeader,
        Reason::Unconfirmed,
    ];

    /// The reason with this code; unknown codes map to `NotHttp` (never produced: every code
    /// the parser emits is a `Reason`).
    #[inline(always)]
    pub const fn from_u32(v: u32) -> Reason {
        if (v as usize) < Reason::ALL.len() {
            Reason::ALL[v as usize]
        } else {
            Reason::NotHttp
        }
    }

    /// The name userspace reports (stats API, metrics).
    pub const fn name(self) -> &'static str {
        match self {
            Reason::NotIp => "not_ip",
            Reason::NotTcp => "not_tcp",
            Reason::Unsupported => "unsupported_ip",
            Reason::OtherPort => "other_port",
            Reason::NoPayload => "no_payload",
            Reason::NotHttp => "not_http",
            Reason::TargetForm => "target_form",
            Reason::LineIncomplete => "line_incomplete",
            Reason::PathTooLong => "path_too_long",
            Reason::AllowedByRule => "allowed_by_rule",
            Reason::AllowedByDefault => "allowed_by_default",
            Reason::Rejected => "rejected",
            Reason::EventLost => "event_lost",
            Reason::ResetFailed => "reset_failed",
            Reason::Monitored => "monitored",
            Reason::OptionsPassed => "options_passed",
            Reason::OptionsAnswered => "options_answered",
            Reason::BadPath => "bad_path",
            Reason::LineTooLong => "line_too_long",
            Reason::HeadersTooLarge => "headers_too_large",
            Reason::MidStream => "mid_stream",
            Reason::OutOfOrder => "out_of_order",
            Reason::Tunnel => "tunnel",
            Reason::ConnTableFull => "conn_table_full",
            Reason::Retransmit => "retransmit",
            Reason::BadFraming => "bad_framing",
            Reason::Fragment => "fragment_dropped",
            Reason::Held => "held",
            Reason::Awaiting => "awaiting_upgrade",
            Reason::UpgradeRefused => "upgrade_refused",
            Reason::ReplyLost => "reply_lost",
            Reason::StageFailed => "stage_failed",
            Reason::SynInStream => "syn_in_stream",
            Reason::NoAck => "no_ack",
            Reason::BadAck => "bad_ack",
            Reason::Paws => "paws",
            Reason::OutOfWindow => "out_of_window",
            Reason::BadChecksum => "bad_checksum",
            Reason::NotForHost => "not_for_host",
            Reason::Unwalkable => "unwalkable",
            Reason::Stray => "stray",
            Reason::UrgentCleared => "urgent_cleared",
            Reason::BadHeader => "bad_header",
            Reason::Unconfirmed => "unconfirmed",
        }
    }
}

const _: () = assert!(Reason::ALL.len() <= REASON_COUNT);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_dense_and_names_unique() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
            for s in &Reason::ALL[i + 1..] {
                assert_ne!(r.name(), s.name());
            }
        }
    }
}

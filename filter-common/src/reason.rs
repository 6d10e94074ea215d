//! Verdict reasons: why the classifier let a packet through or rejected it. The kernel counts
//! every packet under exactly one verdict reason, and some events under an extra one
//! (`EventLost`, `ResetFailed`), in the per-CPU `STATS` array; userspace reports them by name.
//!
//! Append-only, like cilium's drop reasons: a retired value stays reserved.

/// Counter slots in `STATS`.
pub const REASON_COUNT: usize = 16;

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Not IPv4 or IPv6 (ARP, VLAN-tagged, ...): passed.
    NotIp = 0,
    /// IP but not TCP: passed.
    NotTcp = 1,
    /// An IPv4 fragment, or an IPv6 packet whose TCP header is behind extension headers the
    /// program does not walk: passed.
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
}

impl Reason {
    pub const ALL: [Reason; 14] = [
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

//! Netlink tc, for kernels without TCX (before 6.6): the requests behind a classic `cls_bpf`
//! attachment, for [`crate::dataplane::Dataplane`] to sequence.
//!
//! The classifiers go into the `clsact` qdisc as `cls_bpf` filters in direct-action mode, at a
//! fixed place ([`PRIORITY`], [`HANDLE`]) on each hook, so a restarted daemon finds its
//! predecessor's filter and replaces it there. Adding the qdisc and creating, replacing and
//! deleting a filter go through aya ([`create`]: `NLM_F_CREATE | NLM_F_EXCL`; [`replace`]: no
//! `NLM_F_CREATE`, which `cls_bpf` carries out as an atomic swap of the program; [`delete`]),
//! and the filters are kept past aya's link (which would delete them when dropped). The one
//! request aya keeps private is made here over a raw netlink socket: the dump of a hook's
//! filters ([`filters`], `RTM_GETTFILTER`), with each filter's kind, program name and program
//! id, so the daemon can tell its own filter from anyone else's.
//!
//! Must not: decide what to attach where (the dataplane does), or touch a filter it was not
//! pointed at.

use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use aya::programs::links::Link as _;
use aya::programs::tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle};
use aya::programs::{ProgramError, SchedClassifier, TcAttachType};

/// `tc` priority (`pref`) of the daemon's filters on both hooks. A lower number runs first:
/// below the 49152 the kernel gives the first filter added without one, so the filter sees
/// packets before other filters that may end their classification.
pub const PRIORITY: u16 = 405;
/// `tc` handle of the daemon's filters (shown as `handle 0x4d05f405`), the responder's packet
/// mark: unlikely to be anyone else's.
pub const HANDLE: u32 = 0x4d05_f405;

// linux/rtnetlink.h: TCA_KIND, TCA_OPTIONS; linux/pkt_cls.h: TCA_BPF_*; linux/pkt_sched.h.
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_FLAGS: u16 = 8;
const TCA_BPF_ID: u16 = 11;
const TCA_BPF_FLAG_ACT_DIRECT: u32 = 1;
/// `TC_H_MAKE(TC_H_CLSACT, 0)`: the handle of the `clsact` (or `ingress`) qdisc.
const CLSACT_HANDLE: u32 = 0xffff_0000;
/// `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)` and `..._EGRESS`.
const PARENT_INGRESS: u32 = 0xffff_fff2;
const PARENT_EGRESS: u32 = 0xffff_fff3;

const NLMSG_HDR: usize = 16;
const TCMSG: usize = 20;
const NLA_HDR: usize = 4;

/// One filter on a clsact hook, as the kernel dumps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub priority: u16,
    pub handle: u32,
    /// The classifier kind (`bpf`, `u32`, `flower`, ...).
    pub kind: String,
    /// `cls_bpf`: the name given at attach time (aya gives the program's name).
    pub name: Option<String>,
    /// `cls_bpf`: the id of the program the filter runs.
    pub prog_id: Option<u32>,
    pub direct_action: bool,
}

impl Filter {
    /// At the daemon's fixed place.
    pub fn at_our_place(&self) -> bool {
        self.priority == PRIORITY && self.handle == HANDLE
    }

    /// A `cls_bpf` filter running a program named `name`.
    pub fn runs(&self, name: &str) -> bool {
        self.kind == "bpf" && self.name.as_deref() == Some(name)
    }
}

impl std::fmt::Display for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pref {} handle {:#x} {}",
            self.priority, self.handle, self.kind
        )?;
        if let Some(name) = &self.name {
            write!(f, " {name}")?;
        }
        if let Some(id) = self.prog_id {
            write!(f, " id {id}")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TcNetlinkError {
    #[error("opening a netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("netlink {op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the kernel's tc dump is malformed: {0}")]
    Malformed(&'static str),
    #[error(transparent)]
    Qdisc(#[from] TcError),
    #[error("the interface has an `{0}` qdisc where `clsact` goes; it has no egress hook. Replace it (`tc qdisc del dev IFACE ingress`, which deletes its filters), or attach with TCX (kernel ≥ 6.6)")]
    NotClsact(String),
}

/// Add a `clsact` qdisc to `iface` (index `ifindex`) unless it has one. Returns whether it
/// added one. An `ingress` qdisc in its place is an error: the egress filter would land on
/// its one hook, beside the ingress filter.
pub fn ensure_clsact(iface: &str, ifindex: u32) -> Result<bool, TcNetlinkError> {
    match aya::programs::tc::qdisc_add_clsact(iface) {
        Ok(()) => Ok(true),
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {
            match ingress_qdisc_kind(ifindex)? {
                Some(kind) if kind != "clsact" => Err(TcNetlinkError::NotClsact(kind)),
                _ => Ok(false),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// The errno of a failed netlink request, if that is what `e` is.
pub fn errno(e: &ProgramError) -> Option<i32> {
    match e {
        ProgramError::TcError(TcError::NetlinkError(e)) | ProgramError::NetlinkError(e) => {
            e.raw_os_error()
        }
        _ => None,
    }
}

/// aya's netlink link deletes its filter when dropped; ours must outlive the process. It holds
/// no descriptor and no kernel object, only the filter's place, so forgetting it leaks nothing.
fn keep(link: SchedClassifierLink) {
    std::mem::forget(link);
}

/// Add a filter running `prog` at the fixed place on `point` of `iface`:
/// `NLM_F_CREATE | NLM_F_EXCL`, so never over a filter already there.
pub fn create(
    prog: &mut SchedClassifier,
    iface: &str,
    point: TcAttachType,
) -> Result<(), ProgramError> {
    let id = prog.attach_with_options(
        iface,
        point,
        TcAttachOptions::Netlink(NlOptions {
            priority: PRIORITY,
            handle: TcHandle::from(HANDLE),
            classid: None,
        }),
    )?;
    keep(prog.take_link(id)?);
    Ok(())
}

/// Put `prog` into the filter at the fixed place: aya sends `RTM_NEWTFILTER` without
/// `NLM_F_CREATE`, which `cls_bpf` carries out as a replace in place (the old program's entry
/// swapped for the new one's in one RCU list replace: no packet sees no filter, none sees two),
/// and which fails with `ENOENT` when there is no filter to replace.
pub fn replace(
    prog: &mut SchedClassifier,
    iface: &str,
    point: TcAttachType,
) -> Result<(), ProgramError> {
    let link = SchedClassifierLink::attached(iface, point, PRIORITY, TcHandle::from(HANDLE), None)
        .map_err(TcError::IoError)?;
    let id = prog.attach_to_link(link)?;
    keep(prog.take_link(id)?);
    Ok(())
}

/// Delete the filter `f` from `point` of `iface` (`RTM_DELTFILTER`).
pub fn delete(iface: &str, point: TcAttachType, f: &Filter) -> Result<(), ProgramError> {
    SchedClassifierLink::attached(iface, point, f.priority, TcHandle::from(f.handle), None)
        .map_err(TcError::IoError)?
        .detach()
}

/// The tc parent of a clsact hook.
fn parent(hook: TcAttachType) -> u32 {
    match hook {
        TcAttachType::Egress => PARENT_EGRESS,
        TcAttachType::Ingress => PARENT_INGRESS,
        TcAttachType::Custom(p) => p,
    }
}

/// Every filter on `hook` of interface `ifindex`, in the calling thread's network namespace.
/// An interface without a clsact qdisc has none.
pub fn filters(ifindex: u32, hook: TcAttachType) -> Result<Vec<Filter>, TcNetlinkError> {
    let msgs = dump(libc::RTM_GETTFILTER, ifindex, parent(hook))?;
    Ok(msgs.iter().filter_map(filter_of).collect())
}

/// The kind of `ifindex`'s qdisc at `ffff:` (`clsact`, or the older `ingress`, which has no
/// egress hook), if it has one.
pub fn ingress_qdisc_kind(ifindex: u32) -> Result<Option<String>, TcNetlinkError> {
    let msgs = dump(libc::RTM_GETQDISC, ifindex, 0)?;
    Ok(msgs
        .iter()
        .find(|m| m.ifindex == ifindex as i32 && m.handle == CLSACT_HANDLE)
        .and_then(|m| {
            attrs(&m.attrs)
                .find(|(t, _)| *t == TCA_KIND)
                .map(|(_, k)| c_string(k))
        }))
}

/// One tc object of a dump: its `struct tcmsg` and its attributes.
#[derive(Debug)]
struct TcMessage {
    ifindex: i32,
    handle: u32,
    info: u32,
    attrs: Vec<u8>,
}

/// A filter from a filter dump's message; `None` for the per-priority head entries (no handle;
/// `tc` prints them as `filter protocol all pref N bpf chain 0`).
fn filter_of(m: &TcMessage) -> Option<Filter> {
    if m.handle == 0 {
        return None;
    }
    let mut f = Filter {
        priority: (m.info >> 16) as u16,
        handle: m.handle,
        kind: String::new(),
        name: None,
        prog_id: None,
        direct_action: false,
    };
    for (t, payload) in attrs(&m.attrs) {
        match t {
            TCA_KIND => f.kind = c_string(payload),
            TCA_OPTIONS => {
                for (t, payload) in attrs(payload) {
                    match t {
                        TCA_BPF_NAME => f.name = Some(c_string(payload)),
                        TCA_BPF_ID => f.prog_id = u32_at(payload, 0),
                        TCA_BPF_FLAGS => {
                            f.direct_action =
                                u32_at(payload, 0).is_some_and(|v| v & TCA_BPF_FLAG_ACT_DIRECT != 0)
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(f)
}

/// A `NLM_F_DUMP` request of `kind` (`RTM_GETTFILTER`, `RTM_GETQDISC`) for `ifindex` and
/// `parent`; its answers, in order.
fn dump(kind: u16, ifindex: u32, parent: u32) -> Result<Vec<TcMessage>, TcNetlinkError> {
    let op = if kind == libc::RTM_GETQDISC {
        "RTM_GETQDISC"
    } else {
        "RTM_GETTFILTER"
    };
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(TcNetlinkError::Socket(io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a socket this function just opened and owns alone.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };

    let seq: u32 = 1;
    let mut req = Vec::with_capacity(NLMSG_HDR + TCMSG);
    // struct nlmsghdr: length, type, flags, sequence number, port id (0: the kernel).
    req.extend_from_slice(&((NLMSG_HDR + TCMSG) as u32).to_ne_bytes());
    req.extend_from_slice(&kind.to_ne_bytes());
    req.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    req.extend_from_slice(&seq.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    // struct tcmsg: family, pad, pad, ifindex, handle, parent, info.
    req.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    req.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&parent.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    // SAFETY: send(2) of an initialized buffer of `req.len()` bytes on an open socket.
    let sent = unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
    if sent < 0 {
        return Err(TcNetlinkError::Io {
            op,
            source: io::Error::last_os_error(),
        });
    }

    let reply = kind - 2; // RTM_GETx answers with RTM_NEWx.
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: recv(2) into a buffer of `buf.len()` writable bytes on an open socket.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(TcNetlinkError::Io { op, source: e });
        }
        if n == 0 {
            return Err(TcNetlinkError::Malformed(
                "the dump ended without NLMSG_DONE",
            ));
        }
        if parse_dump(&buf[..n as usize], seq, reply, &mut out)? {
            return Ok(out);
        }
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The attributes in `b`, as (type without the nested/byte-order flags, payload).
fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = u16_at(b, 0)? as usize;
        let kind = u16_at(b, 2)? & (libc::NLA_TYPE_MASK as u16);
        let payload = b.get(NLA_HDR..len)?;
        b = b.get(len.next_multiple_of(4)..).unwrap_or(&[]);
        Some((kind, payload))
    })
}

fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Parse one datagram of a dump: its messages of type `reply` (and sequence number `seq`) go
/// into `out`. Returns whether the dump is complete (`NLMSG_DONE`).
fn parse_dump(
    mut b: &[u8],
    seq: u32,
    reply: u16,
    out: &mut Vec<TcMessage>,
) -> Result<bool, TcNetlinkError> {
    use TcNetlinkError::Malformed;
    while b.len() >= NLMSG_HDR {
        let len = u32_at(b, 0).ok_or(Malformed("short header"))? as usize;
        let kind = u16_at(b, 4).ok_or(Malformed("short header"))?;
        let msg_seq = u32_at(b, 8).ok_or(Malformed("short header"))?;
        if len < NLMSG_HDR || len > b.len() {
            return Err(Malformed("a message length past the datagram"));
        }
        let body = &b[NLMSG_HDR..len];
        b = b.get(len.next_multiple_of(4)..).unwrap_or(&[]);
        if msg_seq != seq {
            continue;
        }
        match kind as i32 {
            libc::NLMSG_DONE => return Ok(true),
            libc::NLMSG_ERROR => {
                let errno = u32_at(body, 0).ok_or(Malformed("short error"))? as i32;
                if errno == 0 {
                    continue;
                }
                // No such device, or no qdisc to dump the filters of: nothing there.
                if matches!(-errno, libc::ENODEV | libc::ENOENT | libc::EINVAL) {
                    return Ok(true);
                }
                return Err(TcNetlinkError::Io {
                    op: "dump",
                    source: io::Error::from_raw_os_error(-errno),
                });
            }
            _ if kind == reply => {
                if body.len() < TCMSG {
                    return Err(Malformed("a message shorter than struct tcmsg"));
                }
                out.push(TcMessage {
                    ifindex: u32_at(body, 4).unwrap_or(0) as i32,
                    handle: u32_at(body, 8).unwrap_or(0),
                    info: u32_at(body, 16).unwrap_or(0),
                    attrs: body[TCMSG..].to_vec(),
                });
            }
            _ => {}
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((NLA_HDR + payload.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(payload);
        a.resize(a.len().next_multiple_of(4), 0);
        a
    }

    fn msg(kind: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDR + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&2u16.to_ne_bytes()); // NLM_F_MULTI
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(body);
        m
    }

    fn tcmsg(handle: u32, priority: u16) -> Vec<u8> {
        let mut t = vec![0u8; 4];
        t.extend_from_slice(&7i32.to_ne_bytes());
        t.extend_from_slice(&handle.to_ne_bytes());
        t.extend_from_slice(&PARENT_INGRESS.to_ne_bytes());
        // ETH_P_ALL in network byte order in the low half, as the kernel reports it.
        t.extend_from_slice(&(u32::from(priority) << 16 | 0x0300).to_ne_bytes());
        t
    }

    fn bpf_filter(seq: u32, handle: u32, priority: u16, name: &str, id: u32) -> Vec<u8> {
        let mut body = tcmsg(handle, priority);
        body.extend(attr(TCA_KIND, b"bpf\0"));
        let mut opts = attr(TCA_BPF_ID, &id.to_ne_bytes());
        opts.extend(attr(TCA_BPF_NAME, format!("{name}\0").as_bytes()));
        opts.extend(attr(TCA_BPF_FLAGS, &TCA_BPF_FLAG_ACT_DIRECT.to_ne_bytes()));
        opts.extend(attr(TCA_BPF_ID, &id.to_ne_bytes()));
        // TCA_OPTIONS arrives with NLA_F_NESTED set.
        body.extend(attr(TCA_OPTIONS | 0x8000, &opts));
        msg(libc::RTM_NEWTFILTER, seq, &body)
    }

    #[test]
    fn a_dump_yields_each_filter_with_its_place_name_and_program() {
        let mut d = Vec::new();
        // The per-priority head: kind only, no handle.
        let mut head = tcmsg(0, PRIORITY);
        head.extend(attr(TCA_KIND, b"bpf\0"));
        d.extend(msg(libc::RTM_NEWTFILTER, 1, &head));
        d.extend(bpf_filter(1, HANDLE, PRIORITY, "http_ingress", 42));
        let mut other = tcmsg(0x800, 49152);
        other.extend(attr(TCA_KIND, b"u32\0"));
        d.extend(msg(libc::RTM_NEWTFILTER, 1, &other));
        let mut msgs = Vec::new();
        assert!(
            !parse_dump(&d, 1, libc::RTM_NEWTFILTER, &mut msgs).unwrap(),
            "no NLMSG_DONE yet"
        );
        let out: Vec<Filter> = msgs.iter().filter_map(filter_of).collect();
        assert_eq!(
            out,
            vec![
                Filter {
                    priority: PRIORITY,
                    handle: HANDLE,
                    kind: "bpf".into(),
                    name: Some("http_ingress".into()),
                    prog_id: Some(42),
                    direct_action: true,
                },
                Filter {
                    priority: 49152,
                    handle: 0x800,
                    kind: "u32".into(),
                    name: None,
                    prog_id: None,
                    direct_action: false,
                },
            ]
        );
        assert!(out[0].at_our_place() && out[0].runs("http_ingress"));
        assert!(!out[0].runs("http_egress") && !out[1].at_our_place());
        assert_eq!(
            out[0].to_string(),
            "pref 405 handle 0x4d05f405 bpf http_ingress id 42"
        );

        let done = msg(libc::NLMSG_DONE as u16, 1, &0u32.to_ne_bytes());
        assert!(parse_dump(&done, 1, libc::RTM_NEWTFILTER, &mut msgs).unwrap());
    }

    #[test]
    fn other_sequence_numbers_types_and_missing_qdiscs_are_not_filters() {
        let mut out = Vec::new();
        let f = libc::RTM_NEWTFILTER;
        let stale = bpf_filter(9, HANDLE, PRIORITY, "http_ingress", 1);
        assert!(!parse_dump(&stale, 1, f, &mut out).unwrap());
        let current = bpf_filter(1, HANDLE, PRIORITY, "http_ingress", 1);
        assert!(!parse_dump(&current, 1, libc::RTM_NEWQDISC, &mut out).unwrap());
        assert!(out.is_empty());
        let einval = msg(libc::NLMSG_ERROR as u16, 1, &(-libc::EINVAL).to_ne_bytes());
        assert!(parse_dump(&einval, 1, f, &mut out).unwrap());
        assert!(out.is_empty());
        let eperm = msg(libc::NLMSG_ERROR as u16, 1, &(-libc::EPERM).to_ne_bytes());
        assert!(parse_dump(&eperm, 1, f, &mut out).is_err());
    }

    #[test]
    fn a_qdisc_dump_names_each_qdisc_kind() {
        let mut d = Vec::new();
        for (handle, kind) in [(0u32, "noqueue"), (CLSACT_HANDLE, "ingress")] {
            let mut body = tcmsg(handle, 0);
            body.extend(attr(TCA_KIND, format!("{kind}\0").as_bytes()));
            d.extend(msg(libc::RTM_NEWQDISC, 1, &body));
        }
        let mut msgs = Vec::new();
        parse_dump(&d, 1, libc::RTM_NEWQDISC, &mut msgs).unwrap();
        let kinds: Vec<(i32, u32, String)> = msgs
            .iter()
            .map(|m| {
                let kind = attrs(&m.attrs).find(|(t, _)| *t == TCA_KIND).unwrap().1;
                (m.ifindex, m.handle, c_string(kind))
            })
            .collect();
        assert_eq!(
            kinds,
            vec![
                (7, 0, "noqueue".to_owned()),
                (7, CLSACT_HANDLE, "ingress".to_owned())
            ]
        );
    }

    #[test]
    fn a_truncated_message_is_an_error_not_a_panic() {
        let full = bpf_filter(1, HANDLE, PRIORITY, "http_ingress", 1);
        for cut in NLMSG_HDR..full.len() {
            let mut out = Vec::new();
            assert!(
                parse_dump(&full[..cut], 1, libc::RTM_NEWTFILTER, &mut out).is_err(),
                "cut {cut}"
            );
        }
    }
}

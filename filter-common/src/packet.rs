//! Ethernet, VLAN, IPv4, IPv6 and TCP headers: the one parser both classifiers use (the
//! ingress one for the client's segments, the egress one for the server's) and the host tests
//! check.
//!
//! [`parse`] walks a frame through any [`Frame`] (the kernel's skb, or a byte slice on the
//! host) to the TCP header of a segment for an inspected port, and says why it stopped
//! otherwise. It reads only fixed-size pieces at known offsets: no slice of run-time length,
//! loops bounded by constants ([`VLAN_TAGS_MAX`] priority tags, [`V6_EXT_MAX`] IPv6 extension
//! headers). It touches no map: a segment for another port costs only the header reads.
//!
//! It fails closed where it cannot finish: a frame whose headers it cannot walk to a TCP
//! header (more priority tags or extension headers than it reads) might be a segment for an
//! inspected port, so it is dropped ([`Reason::Unwalkable`]); and a segment for an inspected
//! port whose IP or TCP header the host would discard is dropped too ([`Reason::BadHeader`]),
//! so that the filter never follows bytes the server's TCP does not read.

use crate::{
    Reason, ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IPV4, ETH_P_IPV6, FAMILY_V4, FAMILY_V6,
    IPPROTO_TCP, IPV4_HLEN_MIN, IPV6_HLEN, TCP_HLEN_MIN,
};

/// VLAN tags read through inside the frame (each must be a priority tag, VID 0).
pub const VLAN_TAGS_MAX: usize = 2;
/// IPv6 extension headers walked to the TCP header.
pub const V6_EXT_MAX: usize = 6;
/// Bound of the TCP header's offset: past the Ethernet header, the VLAN tags, the IPv6 header
/// and its extension headers (each at most 2048 bytes). A mask as well: the verifier
/// establishes packet bounds only for offsets whose maximum plus the access stays within
/// 64 KiB.
pub const L4_MAX: usize = 0x3fff;
/// Bound of the end of the IP payload (a GRO super-packet with BIG TCP may exceed 64 KiB),
/// also a mask.
pub const IP_END_MAX: usize = 0xf_ffff;
const _: () = assert!(ETH_HLEN + 4 * VLAN_TAGS_MAX + IPV6_HLEN + 2048 * V6_EXT_MAX <= L4_MAX);
/// Bound of the IP header's offset (Ethernet header and VLAN tags), also a mask.
pub const L3_MAX: usize = 0xff;
const _: () = assert!(ETH_HLEN + 4 * VLAN_TAGS_MAX <= L3_MAX);
/// The longest IPv4 header: 15 words of 32 bits.
const IPV4_HLEN_MAX: usize = 60;

/// Read access to a frame.
pub trait Frame {
    /// The `N` bytes at `off`, or `None` if the frame ends before them.
    fn bytes<const N: usize>(&self, off: usize) -> Option<[u8; N]>;

    /// `f` of the `N` bytes at `off`, or `None` if the frame ends before them. For reading a
    /// few fields of a header: a frame that holds the bytes in place lends them to `f`, so
    /// only the bytes `f` reads are loaded (an `[u8; N]` returned by value is assembled
    /// byte by byte in BPF: LLVM emits no misaligned load there).
    #[inline(always)]
    fn view<const N: usize, R>(&self, off: usize, f: impl FnOnce(&[u8; N]) -> R) -> Option<R> {
        self.bytes::<N>(off).map(|b| f(&b))
    }

    /// The `N / 4` 32-bit words at `off`, each read little-endian, added up (`N` a multiple
    /// of 4), or `None` if the frame ends before them: the IPv4 header's checksum is checked
    /// on these sums ([`v4_header_ok`]). A frame that holds the bytes in place reads each word
    /// in one load.
    #[inline(always)]
    fn word_sum<const N: usize>(&self, off: usize) -> Option<u64> {
        self.bytes::<N>(off).map(|b| le_word_sum(&b))
    }

    /// The 32-bit words at offsets `offs`, each read little-endian, if the frame holds its
    /// first `within` bytes (the caller keeps every `off + 4 <= within`), else `None`. A
    /// frame that holds them in place checks its length once and reads each word in one load.
    #[inline(always)]
    fn le_words<const N: usize>(&self, within: usize, offs: [usize; N]) -> Option<[u32; N]> {
        if self.frame_len() < within {
            return None;
        }
        let mut out = [0u32; N];
        let mut i = 0;
        while i < N {
            out[i] = u32::from_le_bytes(self.bytes::<4>(offs[i])?);
            i += 1;
        }
        Some(out)
    }

    /// The frame's length in bytes.
    fn frame_len(&self) -> usize;

    /// The VLAN tag control information the driver took out of the frame (the skb's
    /// `vlan_tci`), if there was a tag.
    fn offloaded_vlan(&self) -> Option<u16> {
        None
    }
}

impl Frame for [u8] {
    fn bytes<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        let end = off.checked_add(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(self.get(off..end)?);
        Some(out)
    }

    fn frame_len(&self) -> usize {
        self.len()
    }
}

/// Which end of the connection the frame comes from, so which port is the inspected one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Client to server (ingress): the destination port is the server's.
    ToServer,
    /// Server to client (egress): the source port is the server's.
    FromServer,
}

/// Where a TCP segment's headers are, and its TCP header's fixed part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Offset of the IP header (after any VLAN tags left in the frame), at most [`L3_MAX`].
    pub l3: usize,
    /// Offset of the TCP header, at most [`L4_MAX`].
    pub l4: usize,
    /// Offset of the end of the IP payload (from the IP length field).
    pub ip_end: usize,
    /// The first 20 bytes of the TCP header.
    pub tcp: Tcp,
}

impl Segment {
    /// Offset of the source address: 4 bytes for IPv4, 16 for IPv6; the destination's
    /// follows it.
    pub fn addrs(&self) -> usize {
        if self.family == FAMILY_V4 {
            self.l3 + 12
        } else {
            self.l3 + 8
        }
    }

    /// Offset of the TCP payload.
    pub fn payload(&self) -> usize {
        self.l4 + self.tcp.header_len()
    }

    /// Bytes of TCP payload (0 if the lengths do not leave room for any).
    pub fn payload_len(&self) -> usize {
        self.ip_end.saturating_sub(self.payload())
    }
}

/// The fixed part of a TCP header, as sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(transparent)]
pub struct Tcp(pub [u8; TCP_HLEN_MIN]);

impl Tcp {
    #[inline(always)]
    fn be16(&self, i: usize) -> u16 {
        u16::from_be_bytes([self.0[i], self.0[i + 1]])
    }

    #[inline(always)]
    fn be32(&self, i: usize) -> u32 {
        u32::from_be_bytes([self.0[i], self.0[i + 1], self.0[i + 2], self.0[i + 3]])
    }

    pub fn sport(&self) -> u16 {
        self.be16(0)
    }

    pub fn dport(&self) -> u16 {
        self.be16(2)
    }

    pub fn seq(&self) -> u32 {
        self.be32(4)
    }

    pub fn ack(&self) -> u32 {
        self.be32(8)
    }

    /// Header length in bytes (data offset), options included.
    pub fn header_len(&self) -> usize {
        ((self.0[12] >> 4) as usize) * 4
    }

    /// [`crate::tcp_flags`] bits.
    pub fn flags(&self) -> u8 {
        self.0[13]
    }

    pub fn window(&self) -> u16 {
        self.be16(14)
    }

    pub fn urgent(&self) -> u16 {
        self.be16(18)
    }
}

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

/// Walk `frame` to the TCP header of a segment whose server port (`dir`) `inspected` accepts.
///
/// Stops with the reason the classifier counts otherwise:
/// * [`Reason::NotIp`]: neither IPv4 nor IPv6 (or the frame ends in the Ethernet header);
/// * [`Reason::Unsupported`]: tagged for a VLAN (VID ≠ 0, offloaded or in the frame: it belongs
///   to the VLAN's interface), a later IP fragment;
/// * [`Reason::Unwalkable`]: more priority tags or IPv6 extension headers than are walked, or
///   a frame that ends inside them (the classifier drops it: it could be for an inspected
///   port);
/// * [`Reason::NotTcp`]: not TCP (an IPv6 extension the walk does not know counts as another
///   protocol, as it does for the host, which has no handler for it);
/// * [`Reason::Fragment`]: the first fragment of a fragmented packet for an inspected port (its
///   segment cannot be seen whole);
/// * [`Reason::OtherPort`]: TCP for a port that is not inspected;
/// * [`Reason::BadHeader`]: for an inspected port, an IP or TCP header the host discards: a
///   wrong IP version, an IPv4 header length below 20, a header checksum or length that does
///   not add up, a TCP header shorter than 20 bytes or longer than the segment.
///
/// An IP length of 0 (a GRO super-packet with BIG TCP) means the frame's own length.
#[inline(always)]
pub fn parse<F: Frame + ?Sized>(
    frame: &F,
    dir: Dir,
    inspected: impl Fn(u16) -> bool,
) -> Result<Segment, Reason> {
    let ethertype = be16(frame.bytes::<2>(12).ok_or(Reason::NotIp)?);
    if vlan_offloaded(frame) {
        return Err(Reason::Unsupported);
    }
    // VLAN tags left in the frame: the inner tag of QinQ once the outer one is offloaded, or
    // any tag when offload is off. A priority tag (VID 0) is read through.
    let mut proto = ethertype;
    let mut l3 = ETH_HLEN;
    let mut k = 0;
    while k < VLAN_TAGS_MAX && is_vlan(proto) {
        let tag = frame.bytes::<4>(l3).ok_or(Reason::Unwalkable)?;
        if be16([tag[0], tag[1]]) & 0x0fff != 0 {
            return Err(Reason::Unsupported);
        }
        proto = be16([tag[2], tag[3]]);
        l3 += 4;
        k += 1;
    }
    if is_vlan(proto) {
        return Err(Reason::Unwalkable);
    }
    let frame_len = frame.frame_len();
    let (family, l4, ip_end) = match proto {
        ETH_P_IPV4 => {
            // Version and header length, total length, fragment field, protocol.
            let (vihl, total, frag, proto) = frame
                .view::<IPV4_HLEN_MIN, _>(l3, |ip| {
                    (ip[0], be16([ip[2], ip[3]]), be16([ip[6], ip[7]]), ip[9])
                })
                .ok_or(Reason::NotIp)?;
            if vihl >> 4 != 4 {
                return Err(Reason::BadHeader);
            }
            if proto != IPPROTO_TCP {
                return Err(Reason::NotTcp);
            }
            let ihl = ((vihl & 0x0f) as usize) * 4;
            if ihl < IPV4_HLEN_MIN {
                return Err(Reason::BadHeader);
            }
            if frag & 0x1fff != 0 {
                // A later fragment: no TCP header to judge; without its first fragment
                // (dropped when it is for an inspected port) it is never reassembled.
                return Err(Reason::Unsupported);
            }
            if frag & 0x2000 != 0 {
                return Err(first_fragment(frame, l3 + ihl, dir, &inspected));
            }
            // Another port's segment leaves before its header is checked (a broken header
            // matters only on an inspected port): the common case of a classifier on a busy
            // interface costs the least.
            if let Some(port) = frame.view::<4, _>(l3 + ihl, |p| server_port(p, dir)) {
                if !inspected(port) {
                    return Err(Reason::OtherPort);
                }
            }
            let total = total as usize;
            let ip_end = if total == 0 { frame_len } else { l3 + total };
            if !v4_header_ok(frame, l3, ihl, ip_end, frame_len) {
                return Err(reason_for(
                    frame,
                    l3 + ihl,
                    dir,
                    &inspected,
                    Reason::BadHeader,
                ));
            }
            (FAMILY_V4, l3 + ihl, ip_end)
        }
        ETH_P_IPV6 => {
            let ip = frame.bytes::<8>(l3).ok_or(Reason::NotIp)?;
            if ip[0] >> 4 != 6 {
                return Err(Reason::BadHeader);
            }
            let payload_len = be16([ip[4], ip[5]]) as usize;
            let mut next = ip[6];
            let mut l4 = l3 + IPV6_HLEN;
            let mut k = 0;
            while k < V6_EXT_MAX && next != IPPROTO_TCP {
                let ext = frame.bytes::<4>(l4).ok_or(Reason::Unwalkable)?;
                match next {
                    // Hop-by-hop, routing, destination options: (len + 1) * 8 bytes.
                    0 | 43 | 60 => l4 += (ext[1] as usize + 1) * 8,
                    // Authentication header: (len + 2) * 4 bytes.
                    51 => l4 += (ext[1] as usize + 2) * 4,
                    // Fragment header. An atomic fragment (offset 0, no more fragments) is a
                    // whole packet (RFC 8200 §4.5; the host reads it so): walk on. A first
                    // fragment for an inspected port is dropped; a later one carries no TCP
                    // header and is never reassembled without it.
                    44 => {
                        let off_m = be16([ext[2], ext[3]]);
                        if off_m & 0xfff9 != 0 || ext[0] != IPPROTO_TCP {
                            if off_m & 0xfff8 == 0 && ext[0] == IPPROTO_TCP {
                                return Err(first_fragment(frame, l4 + 8, dir, &inspected));
                            }
                            return Err(Reason::Unsupported);
                        }
                        l4 += 8;
                    }
                    _ => return Err(Reason::NotTcp),
                }
                next = ext[0];
                k += 1;
            }
            if next != IPPROTO_TCP {
                return Err(Reason::Unwalkable);
            }
            let ip_end = if payload_len == 0 {
                frame_len
            } else {
                l3 + IPV6_HLEN + payload_len
            };
            if ip_end > frame_len {
                return Err(reason_for(frame, l4, dir, &inspected, Reason::BadHeader));
            }
            (FAMILY_V6, l4, ip_end)
        }
        _ => return Err(Reason::NotIp),
    };
    let port = frame
        .view::<4, _>(l4, |p| server_port(p, dir))
        .ok_or(Reason::NotTcp)?;
    if !inspected(port) {
        return Err(Reason::OtherPort);
    }
    let tcp = Tcp(frame.bytes::<TCP_HLEN_MIN>(l4).ok_or(Reason::BadHeader)?);
    let doff = tcp.header_len();
    if doff < TCP_HLEN_MIN || l4 + doff > ip_end {
        return Err(Reason::BadHeader);
    }
    Ok(Segment {
        family,
        l3,
        l4,
        ip_end,
        tcp,
    })
}

/// Whether `frame` is, beyond doubt, a TCP segment whose server port (`dir`) `inspected`
/// does not accept: then [`parse`] returns [`Reason::OtherPort`] for it too. `false` says
/// nothing (`parse` walks the frame).
///
/// The classifiers ask this first: a busy interface's other traffic leaves after four word
/// loads ([`quick_port`]) instead of the walk.
#[inline(always)]
pub fn other_port<F: Frame + ?Sized>(frame: &F, dir: Dir, inspected: impl Fn(u16) -> bool) -> bool {
    matches!(quick_port(frame, dir), Some(port) if !inspected(port))
}

/// The bytes [`quick_port`] reads: an untagged IPv6 header and the TCP ports after it.
const QUICK_LEN: usize = ETH_HLEN + IPV6_HLEN + 4;

/// The server's port (`dir`) of the commonest frames, from four word loads: untagged, and
/// either IPv4 with a 20-byte header, not fragmented, carrying TCP, or IPv6 whose first next
/// header is TCP. `None` for any other frame (or one shorter than [`QUICK_LEN`]).
///
/// [`parse`] reads such a frame's port before anything else that could stop it: the walk to
/// the port has no other exit for these layouts (an IPv4 header's checksum and lengths are
/// checked after the port, an IPv6 length past the frame's end counts for inspected ports
/// only).
#[inline(always)]
fn quick_port<F: Frame + ?Sized>(frame: &F, dir: Dir) -> Option<u16> {
    if vlan_offloaded(frame) {
        return None;
    }
    // Each word little-endian: byte `off` in its low bits.
    let [eth, mid, v4_ports, v6_ports] = frame.le_words(QUICK_LEN, [12, 20, 34, 54])?;
    let ports = if eth & 0x00ff_ffff == 0x0045_0008 {
        // Ethertype 0x0800, version 4 and a 20-byte header; at 20, the fragment field (no
        // more-fragments flag, offset 0) and, at 23, the protocol.
        if mid & 0xff3f != 0 || mid >> 24 != IPPROTO_TCP as u32 {
            return None;
        }
        v4_ports
    } else if eth & 0x00f0_ffff == 0x0060_dd86 {
        // Ethertype 0x86dd and version 6; at 20, the next header.
        if mid & 0xff != IPPROTO_TCP as u32 {
            return None;
        }
        v6_ports
    } else {
        return None;
    };
    let port = match dir {
        Dir::ToServer => ports >> 16,
        Dir::FromServer => ports,
    } as u16;
    Some(port.swap_bytes())
}

/// Whether the driver took a VLAN tag (VID ≠ 0; a priority tag does not count) out of the
/// frame: it belongs to the VLAN's interface.
#[inline(always)]
fn vlan_offloaded<F: Frame + ?Sized>(frame: &F) -> bool {
    matches!(frame.offloaded_vlan(), Some(tci) if tci & 0x0fff != 0)
}

#[inline(always)]
fn is_vlan(proto: u16) -> bool {
    proto == ETH_P_8021Q || proto == ETH_P_8021AD
}

/// `bad` if the TCP ports at `l4` are readable and the server's is inspected, else the reason
/// the segment would have been passed for (another port, or not TCP as far as can be read):
/// a broken header matters only on an inspected port.
#[inline(always)]
fn reason_for<F: Frame + ?Sized>(
    frame: &F,
    l4: usize,
    dir: Dir,
    inspected: &impl Fn(u16) -> bool,
    bad: Reason,
) -> Reason {
    match frame.view::<4, _>(l4, |p| server_port(p, dir)) {
        Some(port) if inspected(port) => bad,
        Some(_) => Reason::OtherPort,
        None => bad,
    }
}

/// Whether the host's IP layer takes the IPv4 header at `l3` (`ihl` bytes, at least 20): its
/// checksum sums to all ones, and the packet (ending at `ip_end`) holds the header and fits in
/// the frame.
///
/// The sum is taken over 32-bit little-endian words ([`Frame::word_sum`]: the first 20 bytes
/// in five loads, then the options a word at a time) and folded to 16 bits: the one's-complement
/// sum of the header's 16-bit words with its two bytes swapped (RFC 1071 §2(B)), and all ones
/// is the same swapped.
#[inline(always)]
fn v4_header_ok<F: Frame + ?Sized>(
    frame: &F,
    l3: usize,
    ihl: usize,
    ip_end: usize,
    frame_len: usize,
) -> bool {
    if ip_end > frame_len || ip_end < l3 + ihl {
        return false;
    }
    let Some(mut sum) = frame.word_sum::<IPV4_HLEN_MIN>(l3) else {
        return false;
    };
    let mut i = IPV4_HLEN_MIN / 4;
    while i < IPV4_HLEN_MAX / 4 {
        if i * 4 >= ihl {
            break;
        }
        let Some(w) = frame.word_sum::<4>(l3 + i * 4) else {
            return false;
        };
        sum += w;
        i += 1;
    }
    fold_ones(sum) == 0xffff
}

/// The 32-bit little-endian words of `b` added up (`b.len()` a multiple of 4).
#[inline(always)]
pub fn le_word_sum(b: &[u8]) -> u64 {
    let mut sum = 0u64;
    let mut i = 0;
    while i + 4 <= b.len() {
        sum += u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]) as u64;
        i += 4;
    }
    sum
}

/// `sum` (below 2^36: at most 15 words of 32 bits) folded with end-around carries into 16 bits.
#[inline(always)]
const fn fold_ones(sum: u64) -> u64 {
    let s = (sum & 0xffff) + (sum >> 16);
    let s = (s & 0xffff) + (s >> 16);
    (s & 0xffff) + (s >> 16)
}

#[inline(always)]
fn server_port(ports: &[u8; 4], dir: Dir) -> u16 {
    match dir {
        Dir::ToServer => be16([ports[2], ports[3]]),
        Dir::FromServer => be16([ports[0], ports[1]]),
    }
}

/// The first fragment of a fragmented IP packet whose TCP header starts at `l4`: dropped when
/// it is for an inspected port, since the filter cannot see the whole segment (fail-closed;
/// TCP stacks avoid fragmentation with path MTU discovery).
#[inline(always)]
fn first_fragment<F: Frame + ?Sized>(
    frame: &F,
    l4: usize,
    dir: Dir,
    inspected: &impl Fn(u16) -> bool,
) -> Reason {
    match frame.view::<4, _>(l4, |p| server_port(p, dir)) {
        Some(port) if inspected(port) => Reason::Fragment,
        _ => Reason::Unsupported,
    }
}

#[cfg(test)]
mod tests;

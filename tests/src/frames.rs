//! TCP segments for `BPF_PROG_TEST_RUN`: Ethernet + IPv4 + TCP frames between the lab's client
//! ([`CLIENT_V4`]) and server ([`SERVER_V4`]), with valid checksums, built from
//! `filter_common`'s constants and checksum. The benchmarks (`filter-bench`) feed the
//! classifiers with them; a fixture test can too.
//!
//! Owns: the bytes on the wire only. Must not: decide anything about them (that is the
//! classifier's, and a test's to assert).

use filter_common::{
    csum, tcp_flags, ETH_HLEN, ETH_P_IPV4, IPPROTO_TCP, IPV4_HLEN_MIN, TCP_HLEN_MIN,
};

pub use crate::lab::{CLIENT_V4, SERVER_V4};

/// The client's MAC in the frames.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// The server's MAC: `BPF_PROG_TEST_RUN` receives frames on the loopback device, whose address
/// is all zero, so a frame to it is the host's (`PACKET_HOST`), as the classifier requires of a
/// client segment.
pub const SERVER_MAC: [u8; 6] = [0; 6];

/// One TCP segment of the connection between the client's port `cport` and the server's
/// `port`, in either direction.
#[derive(Clone, Debug)]
pub struct Segment {
    pub from_client: bool,
    pub cport: u16,
    pub port: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    /// TCP options, a multiple of 4 bytes ([`ts_opt`], [`syn_opts`]).
    pub opts: Vec<u8>,
    pub payload: Vec<u8>,
}

impl Segment {
    /// The client's segment to the server's `port`: `PSH|ACK` with a payload, `ACK` without.
    pub fn client(cport: u16, port: u16, seq: u32, ack: u32, payload: &[u8]) -> Segment {
        Segment {
            from_client: true,
            cport,
            port,
            seq,
            ack,
            flags: if payload.is_empty() {
                tcp_flags::ACK
            } else {
                tcp_flags::PSH | tcp_flags::ACK
            },
            window: 0xffff,
            opts: Vec::new(),
            payload: payload.to_vec(),
        }
    }

    /// The server's segment from its `port` to the client's `cport`.
    pub fn server(cport: u16, port: u16, seq: u32, ack: u32, payload: &[u8]) -> Segment {
        Segment {
            from_client: false,
            ..Segment::client(cport, port, seq, ack, payload)
        }
    }

    pub fn flags(self, flags: u8) -> Segment {
        Segment { flags, ..self }
    }

    pub fn opts(self, opts: Vec<u8>) -> Segment {
        Segment { opts, ..self }
    }

    /// The frame, checksums filled in.
    pub fn build(&self) -> Vec<u8> {
        let (sport, dport) = if self.from_client {
            (self.cport, self.port)
        } else {
            (self.port, self.cport)
        };
        let mut l4 = Vec::with_capacity(TCP_HLEN_MIN + self.opts.len() + self.payload.len());
        l4.extend_from_slice(&sport.to_be_bytes());
        l4.extend_from_slice(&dport.to_be_bytes());
        l4.extend_from_slice(&self.seq.to_be_bytes());
        l4.extend_from_slice(&self.ack.to_be_bytes());
        l4.push((((TCP_HLEN_MIN + self.opts.len()) / 4) as u8) << 4);
        l4.push(self.flags);
        l4.extend_from_slice(&self.window.to_be_bytes());
        l4.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
        l4.extend_from_slice(&self.opts);
        l4.extend_from_slice(&self.payload);
        let (c, s) = (CLIENT_V4.octets(), SERVER_V4.octets());
        let (src, dst, src_mac, dst_mac) = if self.from_client {
            (c, s, CLIENT_MAC, SERVER_MAC)
        } else {
            (s, c, SERVER_MAC, CLIENT_MAC)
        };
        let sum = csum::finish(csum::add(csum::pseudo_v4(&src, &dst, l4.len() as u16), &l4));
        l4[16..18].copy_from_slice(&sum.to_be_bytes());

        let mut ip = [0u8; IPV4_HLEN_MIN];
        ip[0] = 0x40 | (IPV4_HLEN_MIN / 4) as u8;
        ip[2..4].copy_from_slice(&((IPV4_HLEN_MIN + l4.len()) as u16).to_be_bytes());
        ip[6] = 0x40; // don't fragment
        ip[8] = 64;
        ip[9] = IPPROTO_TCP;
        ip[12..16].copy_from_slice(&src);
        ip[16..20].copy_from_slice(&dst);
        let sum = csum::finish(csum::add(0, &ip));
        ip[10..12].copy_from_slice(&sum.to_be_bytes());

        let mut f = Vec::with_capacity(ETH_HLEN + ip.len() + l4.len());
        f.extend_from_slice(&dst_mac);
        f.extend_from_slice(&src_mac);
        f.extend_from_slice(&ETH_P_IPV4.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(&l4);
        f
    }
}

/// TCP options: NOP NOP timestamp (`tsval`, `tsecr`), as Linux sends on every segment once
/// both ends negotiated timestamps.
pub fn ts_opt(tsval: u32, tsecr: u32) -> Vec<u8> {
    let mut o = vec![1, 1, 8, 10];
    o.extend_from_slice(&tsval.to_be_bytes());
    o.extend_from_slice(&tsecr.to_be_bytes());
    o
}

/// A handshake's options: timestamp `tsval` (echoing `tsecr`), NOP, window scale `ws`.
pub fn syn_opts(tsval: u32, tsecr: u32, ws: u8) -> Vec<u8> {
    let mut o = ts_opt(tsval, tsecr);
    o.extend_from_slice(&[1, 3, 3, ws]);
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_segment_has_valid_lengths_and_checksums() {
        let f = Segment::client(40000, 80, 7, 9, b"GET / HTTP/1.1\r\n\r\n")
            .opts(ts_opt(1, 2))
            .build();
        assert_eq!(f.len(), ETH_HLEN + 20 + 32 + 18);
        // A checksum over a header (or a pseudo-header and segment) that holds its own
        // checksum sums to zero.
        assert_eq!(csum::finish(csum::add(0, &f[ETH_HLEN..ETH_HLEN + 20])), 0);
        let tcp = &f[ETH_HLEN + 20..];
        let pseudo = csum::pseudo_v4(&CLIENT_V4.octets(), &SERVER_V4.octets(), tcp.len() as u16);
        assert_eq!(csum::finish(csum::add(pseudo, tcp)), 0);
        assert_eq!(&tcp[2..4], &80u16.to_be_bytes());
        assert_eq!(tcp[12] >> 4, 8);
    }
}

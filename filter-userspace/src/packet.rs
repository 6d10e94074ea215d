//! The frames the responder sends: Ethernet + IPv4/IPv6 + TCP with full checksums, answering
//! on the connection a [`RejectEvent`] describes. The headers are written per event into a
//! small fixed buffer ([`write_headers`]); the answer's bytes follow them unchanged from the
//! answer cache (the responder sends the two as one frame with two `iovec`s), and their part
//! of the TCP checksum is computed once with them ([`crate::response::Prebuilt`]).

use filter_common::{
    csum, tcp_flags, RejectEvent, ETH_HLEN, ETH_P_IPV4, ETH_P_IPV6, FAMILY_V4, IPPROTO_TCP,
    IPV4_HLEN_MIN, IPV6_HLEN, TCP_HLEN_MIN,
};

/// Window the forged segment advertises. The connection closes right after it, so any
/// non-zero value works.
const WINDOW: u16 = 65_535;
const TTL: u8 = 64;

/// The longest headers of an answer: Ethernet, IPv6, TCP without options.
pub const HEADERS_MAX: usize = ETH_HLEN + IPV6_HLEN + TCP_HLEN_MIN;

/// The EtherType of the answer to `ev`.
pub fn ethertype(ev: &RejectEvent) -> u16 {
    if ev.family == FAMILY_V4 {
        ETH_P_IPV4
    } else {
        ETH_P_IPV6
    }
}

/// Write into `out` the headers of the client-facing segment that carries a payload of
/// `payload_len` bytes whose [`csum::add`] is `payload_sum`, with PSH|ACK|FIN, from the
/// server's side of the connection; returns their length. Its sequence number is the event's
/// `ack` (the server's next byte) and it acknowledges everything the rejected segment carried,
/// so the client stops retransmitting the request and reads the response followed by a clean
/// EOF. No TCP options: a segment without a timestamp is not subject to PAWS.
pub fn write_headers(
    ev: &RejectEvent,
    payload_len: usize,
    payload_sum: u32,
    ip_id: u16,
    out: &mut [u8; HEADERS_MAX],
) -> usize {
    let v4 = ev.family == FAMILY_V4;
    let l4 = ETH_HLEN + if v4 { IPV4_HLEN_MIN } else { IPV6_HLEN };
    let tcp_len = TCP_HLEN_MIN + payload_len;
    out[0..6].copy_from_slice(&ev.client_mac);
    out[6..12].copy_from_slice(&ev.server_mac);
    out[12..14].copy_from_slice(&ethertype(ev).to_be_bytes());
    let pseudo = if v4 {
        let (src, dst) = (v4_addr(&ev.server_addr_be), v4_addr(&ev.client_addr_be));
        let ip = &mut out[ETH_HLEN..l4];
        ip.fill(0);
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((IPV4_HLEN_MIN + tcp_len) as u16).to_be_bytes());
        ip[4..6].copy_from_slice(&ip_id.to_be_bytes());
        ip[6] = 0x40; // don't fragment
        ip[8] = TTL;
        ip[9] = IPPROTO_TCP;
        ip[12..16].copy_from_slice(&src);
        ip[16..20].copy_from_slice(&dst);
        let c = csum::finish(csum::add(0, ip));
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        csum::pseudo_v4(&src, &dst, tcp_len as u16)
    } else {
        let ip = &mut out[ETH_HLEN..l4];
        ip[0..4].copy_from_slice(&[0x60, 0, 0, 0]);
        ip[4..6].copy_from_slice(&(tcp_len as u16).to_be_bytes());
        ip[6] = IPPROTO_TCP;
        ip[7] = TTL;
        ip[8..24].copy_from_slice(&ev.server_addr_be);
        ip[24..40].copy_from_slice(&ev.client_addr_be);
        csum::pseudo_v6(&ev.server_addr_be, &ev.client_addr_be, tcp_len as u32)
    };
    let tcp = &mut out[l4..l4 + TCP_HLEN_MIN];
    tcp[0..2].copy_from_slice(&ev.server_port.to_be_bytes());
    tcp[2..4].copy_from_slice(&ev.client_port.to_be_bytes());
    tcp[4..8].copy_from_slice(&ev.ack.to_be_bytes());
    tcp[8..12].copy_from_slice(&ev.seq.wrapping_add(ev.payload_len).to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = tcp_flags::FIN | tcp_flags::PSH | tcp_flags::ACK;
    tcp[14..16].copy_from_slice(&WINDOW.to_be_bytes());
    tcp[16..20].fill(0); // checksum, urgent pointer
    let c = csum::finish(csum::add(pseudo, tcp).wrapping_add(payload_sum));
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    l4 + TCP_HLEN_MIN
}

/// The whole frame of [`write_headers`] and `payload` in one buffer.
pub fn response_frame(ev: &RejectEvent, payload: &[u8], ip_id: u16) -> Vec<u8> {
    let mut head = [0u8; HEADERS_MAX];
    let n = write_headers(ev, payload.len(), csum::add(0, payload), ip_id, &mut head);
    let mut frame = Vec::with_capacity(n + payload.len());
    frame.extend_from_slice(&head[..n]);
    frame.extend_from_slice(payload);
    frame
}

fn v4_addr(a: &[u8; 16]) -> [u8; 4] {
    [a[0], a[1], a[2], a[3]]
}

#[cfg(test)]
mod tests {
    use super::*;
    use filter_common::FAMILY_V6;

    fn event(family: u8) -> RejectEvent {
        let mut ev: RejectEvent = unsafe { core::mem::zeroed() };
        ev.family = family;
        ev.seq = 1000;
        ev.ack = 5000;
        ev.payload_len = 37;
        ev.client_port = 40000;
        ev.server_port = 80;
        ev.client_mac = [2, 0, 0, 0, 0, 1];
        ev.server_mac = [2, 0, 0, 0, 0, 2];
        if family == FAMILY_V4 {
            ev.client_addr_be[..4].copy_from_slice(&[10, 77, 0, 1]);
            ev.server_addr_be[..4].copy_from_slice(&[10, 77, 0, 2]);
        } else {
            ev.client_addr_be = "fd77::1".parse::<std::net::Ipv6Addr>().unwrap().octets();
            ev.server_addr_be = "fd77::2".parse::<std::net::Ipv6Addr>().unwrap().octets();
        }
        ev
    }

    #[test]
    fn ipv4_frame_has_valid_checksums_and_answers_the_connection() {
        let f = response_frame(&event(FAMILY_V4), b"hello", 7);
        assert_eq!(&f[0..6], &[2, 0, 0, 0, 0, 1]);
        assert_eq!(u16::from_be_bytes([f[12], f[13]]), ETH_P_IPV4);
        let ip = &f[14..34];
        assert_eq!(csum::finish(csum::add(0, ip)), 0, "IPv4 header checksum");
        assert_eq!(&ip[12..16], &[10, 77, 0, 2]);
        let tcp = &f[34..];
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]) as usize, 20 + tcp.len());
        let pseudo = csum::pseudo_v4(&[10, 77, 0, 2], &[10, 77, 0, 1], tcp.len() as u16);
        assert_eq!(csum::finish(csum::add(pseudo, tcp)), 0, "TCP checksum");
        assert_eq!(u32::from_be_bytes(tcp[4..8].try_into().unwrap()), 5000);
        assert_eq!(u32::from_be_bytes(tcp[8..12].try_into().unwrap()), 1037);
        assert_eq!(tcp[13], tcp_flags::FIN | tcp_flags::PSH | tcp_flags::ACK);
        assert_eq!(&tcp[20..], b"hello");
    }

    #[test]
    fn ipv6_frame_has_a_valid_tcp_checksum() {
        let ev = event(FAMILY_V6);
        let f = response_frame(&ev, b"hello!", 0);
        assert_eq!(u16::from_be_bytes([f[12], f[13]]), ETH_P_IPV6);
        let tcp = &f[54..];
        assert_eq!(u16::from_be_bytes([f[18], f[19]]) as usize, tcp.len());
        let pseudo = csum::pseudo_v6(&ev.server_addr_be, &ev.client_addr_be, tcp.len() as u32);
        assert_eq!(csum::finish(csum::add(pseudo, tcp)), 0);
    }

    #[test]
    fn headers_written_over_old_ones_are_the_same_as_fresh_ones() {
        let payload = b"HTTP/1.1 405 Method Not Allowed\r\n\r\n";
        let sum = csum::add(0, payload);
        for (first, then) in [(FAMILY_V6, FAMILY_V4), (FAMILY_V4, FAMILY_V6)] {
            let mut reused = [0xffu8; HEADERS_MAX];
            write_headers(&event(first), 3, 0x1234, 9, &mut reused);
            let n = write_headers(&event(then), payload.len(), sum, 7, &mut reused);
            let mut fresh = [0u8; HEADERS_MAX];
            let m = write_headers(&event(then), payload.len(), sum, 7, &mut fresh);
            assert_eq!((n, &reused[..n]), (m, &fresh[..m]));
            let mut frame = reused[..n].to_vec();
            frame.extend_from_slice(payload);
            assert_eq!(frame, response_frame(&event(then), payload, 7));
        }
    }
}

//! Building the frames the responder sends: Ethernet + IPv4/IPv6 + TCP with full checksums,
//! answering on the connection a [`RejectEvent`] describes.

use filter_common::{csum, tcp_flags, RejectEvent, ETH_P_IPV4, ETH_P_IPV6, FAMILY_V4, IPPROTO_TCP};

/// Window the forged segment advertises. The connection closes right after it, so any
/// non-zero value works.
const WINDOW: u16 = 65_535;
const TTL: u8 = 64;

/// The client-facing segment: `payload` with PSH|ACK|FIN, from the server's side of the
/// connection. Its sequence number is the client's acknowledgement number (the server's next
/// byte) and it acknowledges everything the rejected segment carried, so the client stops
/// retransmitting the request and reads the response followed by a clean EOF. No TCP options:
/// a segment without a timestamp is not subject to PAWS.
pub fn response_frame(ev: &RejectEvent, payload: &[u8], ip_id: u16) -> Vec<u8> {
    let v4 = ev.family == FAMILY_V4;
    let l4 = 14 + if v4 { 20 } else { 40 };
    let tcp_len = 20 + payload.len();
    let mut frame = Vec::with_capacity(l4 + tcp_len);
    frame.extend_from_slice(&ev.client_mac);
    frame.extend_from_slice(&ev.server_mac);
    let pseudo = if v4 {
        let (src, dst) = (v4_addr(&ev.server_addr_be), v4_addr(&ev.client_addr_be));
        frame.extend_from_slice(&ETH_P_IPV4.to_be_bytes());
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
        ip[4..6].copy_from_slice(&ip_id.to_be_bytes());
        ip[6] = 0x40; // don't fragment
        ip[8] = TTL;
        ip[9] = IPPROTO_TCP;
        ip[12..16].copy_from_slice(&src);
        ip[16..20].copy_from_slice(&dst);
        let c = csum::finish(csum::add(0, &ip));
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        frame.extend_from_slice(&ip);
        csum::pseudo_v4(&src, &dst, tcp_len as u16)
    } else {
        frame.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
        let mut ip = [0u8; 40];
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&(tcp_len as u16).to_be_bytes());
        ip[6] = IPPROTO_TCP;
        ip[7] = TTL;
        ip[8..24].copy_from_slice(&ev.server_addr_be);
        ip[24..40].copy_from_slice(&ev.client_addr_be);
        frame.extend_from_slice(&ip);
        csum::pseudo_v6(&ev.server_addr_be, &ev.client_addr_be, tcp_len as u32)
    };
    frame.extend_from_slice(&ev.server_port.to_be_bytes());
    frame.extend_from_slice(&ev.client_port.to_be_bytes());
    frame.extend_from_slice(&ev.ack.to_be_bytes());
    frame.extend_from_slice(&ev.seq.wrapping_add(ev.payload_len).to_be_bytes());
    frame.push(5 << 4);
    frame.push(tcp_flags::FIN | tcp_flags::PSH | tcp_flags::ACK);
    frame.extend_from_slice(&WINDOW.to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    frame.extend_from_slice(payload);
    let c = csum::finish(csum::add(pseudo, &frame[l4..]));
    frame[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
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
}

use super::*;
use std::vec;
use std::vec::Vec;

const HTTP: u16 = 80;

fn inspected(p: u16) -> bool {
    p == HTTP
}

/// A TCP header from `sport` to `dport` with `opts` bytes of options (a multiple of 4).
fn tcp_header(sport: u16, dport: u16, opts: usize) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&0x0102_0304u32.to_be_bytes());
    t.extend_from_slice(&0x0a0b_0c0du32.to_be_bytes());
    t.push((((TCP_HLEN_MIN + opts) / 4) as u8) << 4);
    t.push(crate::tcp_flags::ACK | crate::tcp_flags::PSH);
    t.extend_from_slice(&[0x20, 0x00, 0, 0, 0, 7]);
    t.resize(TCP_HLEN_MIN + opts, 1);
    t
}

/// Ethernet header with `tags` (TPID, TCI) and the final EtherType.
fn eth(tags: &[(u16, u16)], ethertype: u16) -> Vec<u8> {
    let mut f = vec![0xaa; 12];
    for (tpid, tci) in tags {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&tci.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

fn v4(mut f: Vec<u8>, ihl_words: u8, frag: u16, proto: u8, l4: &[u8], payload: usize) -> Vec<u8> {
    let hl = ihl_words as usize * 4;
    let total = (hl.max(20) + l4.len() + payload) as u16;
    let l3 = f.len();
    f.push(0x40 | ihl_words);
    f.push(0);
    f.extend_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&[0, 1]);
    f.extend_from_slice(&frag.to_be_bytes());
    f.extend_from_slice(&[64, proto, 0, 0]);
    f.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
    f.resize(f.len() + hl.saturating_sub(20), 1); // options (NOPs)
    let c = crate::csum::finish(crate::csum::add(0, &f[l3..])).to_be_bytes();
    f[l3 + 10] = c[0];
    f[l3 + 11] = c[1];
    f.extend_from_slice(l4);
    f.resize(f.len() + payload, b'x');
    f
}

/// IPv6 with extension headers `exts` (next header, bytes), then `l4`.
fn v6(mut f: Vec<u8>, exts: &[(u8, Vec<u8>)], last: u8, l4: &[u8], payload: usize) -> Vec<u8> {
    let ext_len: usize = exts.iter().map(|(_, b)| b.len()).sum();
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&((ext_len + l4.len() + payload) as u16).to_be_bytes());
    f.push(exts.first().map_or(last, |(n, _)| *n));
    f.push(64);
    f.extend_from_slice(&[0x20; 16]);
    f.extend_from_slice(&[0x21; 16]);
    for (i, (_, body)) in exts.iter().enumerate() {
        let mut b = body.clone();
        b[0] = exts.get(i + 1).map_or(last, |(n, _)| *n);
        f.extend_from_slice(&b);
    }
    f.extend_from_slice(l4);
    f.resize(f.len() + payload, b'x');
    f
}

/// A frame whose VLAN tag the driver took out (`skb->vlan_tci`): the bytes, and the tag.
struct Tagged<'a>(&'a [u8], u16);

impl Frame for Tagged<'_> {
    fn bytes<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        self.0.bytes(off)
    }
    fn frame_len(&self) -> usize {
        self.0.len()
    }
    fn offloaded_vlan(&self) -> Option<u16> {
        Some(self.1)
    }
}

/// An extension header of `len8` eight-byte units (hop-by-hop, routing, destination options).
fn opts_ext(len8: usize) -> Vec<u8> {
    let mut b = vec![0u8; len8 * 8];
    b[1] = (len8 - 1) as u8;
    b
}

#[test]
fn ipv4_segment_to_an_inspected_port() {
    let t = tcp_header(40000, HTTP, 12);
    let f = v4(eth(&[], ETH_P_IPV4), 5, 0x4000, 6, &t, 100);
    let s = parse(f.as_slice(), Dir::ToServer, inspected).unwrap();
    assert_eq!(s.family, FAMILY_V4);
    assert_eq!((s.l3, s.l4), (14, 34));
    assert_eq!(s.addrs(), 26);
    assert_eq!(s.payload(), 34 + 32);
    assert_eq!(s.payload_len(), 100);
    assert_eq!(s.ip_end, f.len());
    assert_eq!((s.tcp.sport(), s.tcp.dport()), (40000, HTTP));
    assert_eq!((s.tcp.seq(), s.tcp.ack()), (0x0102_0304, 0x0a0b_0c0d));
    assert_eq!(s.tcp.header_len(), 32);
    assert_eq!(s.tcp.window(), 0x2000);
    assert_eq!(s.tcp.urgent(), 7);
    // The server's answer on the same connection, seen from the egress side.
    let t = tcp_header(HTTP, 40000, 0);
    let f = v4(eth(&[], ETH_P_IPV4), 5, 0, 6, &t, 0);
    let s = parse(f.as_slice(), Dir::FromServer, inspected).unwrap();
    assert_eq!(s.payload_len(), 0);
    assert_eq!(
        parse(f.as_slice(), Dir::ToServer, inspected),
        Err(Reason::OtherPort)
    );
}

#[test]
fn ipv4_options_and_bad_lengths() {
    let t = tcp_header(40000, HTTP, 0);
    let f = v4(eth(&[], ETH_P_IPV4), 8, 0, 6, &t, 5);
    let s = parse(f.as_slice(), Dir::ToServer, inspected).unwrap();
    assert_eq!((s.l4, s.payload_len()), (14 + 32, 5));
    let f = v4(eth(&[], ETH_P_IPV4), 4, 0, 6, &t, 5);
    assert_eq!(
        parse(f.as_slice(), Dir::ToServer, inspected),
        Err(Reason::BadHeader)
    );
}

#[test]
fn fragments() {
    let t = tcp_header(40000, HTTP, 0);
    // First fragment (MF set, offset 0): dropped for an inspected port only.
    let f = v4(eth(&[], ETH_P_IPV4), 5, 0x2000, 6, &t, 10);
    assert_eq!(
        parse(f.as_slice(), Dir::ToServer, inspected),
        Err(Reason::Fragment)
    );
    let other = tcp_header(40000, 81, 0);
    let f = v4(eth(&[], ETH_P_IPV4), 5, 0x2000, 6, &other, 10);
    assert_eq!(
        parse(f.as_slice(), Dir::ToServer, inspected),
        Err(Reason::Unsupported)
    );
    // A later fragment.
    let f = v4(eth(&[], ETH_P_IPV4), 5, 0x0010, 6, &t, 10);
    assert_eq!(
        parse(f.as_slice(), Dir::ToServer, inspected),
        Err(Reason::Unsupported)
    );
    // IPv6 fragment header, offset 0, more fragments, TCP next.
    let mut frag = vec![0u8; 8];
    frag[3] = 1;
    let f = v6(eth(&[], ETH_P_IPV6), &[(44, frag.clone())], 6, &t, 10);
    assert_eq!(
        parse(f.as_slice(), Dir::ToServer, inspected),
        Err(Reason::Fragment)
    );
    // An atomic fragment (offset 0, no more) is a whole packet.
    let f = v6(eth(&[], ETH_P_IPV6), &[(44, vec![0u8; 8])], 6, &t, 10);
    let s = parse(f.as_slice(), Dir::ToServer, inspected).unwrap();
    assert_eq!((s.l4, s.payload_len()), (14 + 40 + 8, 10));
    let mut later = frag;
    later[3] = 0x10;
    let f = v6(eth(&[], ETH_P_IPV6), &[(44, later)], 6, &t, 10);
    assert_eq!(
        parse(f.as_slice(), Dir::ToServer, inspected),
        Err(Reason::Unsupported)
    );
}

#[test]
fn ipv6_extension_headers() {
    let t = tcp_header(40000, HTTP, 0);
    let f = v6(eth(&[], ETH_P_IPV6), &[], 6, &t, 7);
    let s = parse(f.as_slice(), Dir::ToServer, inspected).unwrap();
    assert_eq!(
        (s.family, s.l4, s.addrs(), s.payload_len()),
        (FAMILY_V6, 54, 22, 7)
    );
    let mut ah = vec![0u8; 12];
    ah[1] = 1; // (1 + 2) * 4 bytes
    let exts = [
        (0, opts_ext(1)),
        (43, opts_ext(2)),
        (51, ah),
        (60, opts_ext(1)),
    ];
    let f = v6(eth(&[], ETH_P_IPV6), &exts, 6, &t, 7);
    let s = parse(f.as_slice(), Dir::ToServer, inspected).unwrap();
    assert_eq!((s.l4, s.payload_len()), (54 + 8 + 16 + 12 + 8, 7));
    assert_eq!(s.ip_end, f.len());
    // One more than is walked: dropped, as it could be for an inspected port.
    let mut exts = vec![(0, opts_ext(1))];
    exts.resize(V6_EXT_MAX + 1, (60, opts_ext(1)));
    let f = v6(eth(&[], ETH_P_IPV6), &exts, 6, &t, 7);
    assert_eq!(
        parse(f.as_slice(), Dir::ToServer, inspected),
        Err(Reason::Unwalkable)
    );
    exts.pop();
    let f = v6(eth(&[], ETH_P_IPV6), &exts, 6, &t, 7);
    assert!(parse(f.as_slice(), Dir::ToServer, inspected).is_ok());
    // UDP behind an extension header; an unknown extension.
    let f = v6(eth(&[], ETH_P_IPV6), &[(0, opts_ext(1))], 17, &t, 7);
    assert_eq!(
        parse(f.as_slice(), Dir::ToServer, inspected),
        Err(Reason::NotTcp)
    );
    let f = v6(eth(&[], ETH_P_IPV6), &[(135, opts_ext(1))], 6, &t, 7);
    assert_eq!(
        parse(f.as_slice(), Dir::ToServer, inspected),
        Err(Reason::NotTcp)
    );
}

#[test]
fn vlan_tags() {
    let t = tcp_header(40000, HTTP, 0);
    // Two priority tags are read through.
    let f = v4(
        eth(&[(ETH_P_8021AD, 0x2000), (ETH_P_8021Q, 0x6000)], ETH_P_IPV4),
        5,
        0,
        6,
        &t,
        3,
    );
    let s = parse(f.as_slice(), Dir::ToServer, inspected).unwrap();
    assert_eq!((s.l3, s.payload_len()), (22, 3));
    // A VLAN's frame belongs to the VLAN interface.
    let f = v4(eth(&[(ETH_P_8021Q, 0x0005)], ETH_P_IPV4), 5, 0, 6, &t, 3);
    assert_eq!(
        parse(f.as_slice(), Dir::ToServer, inspected),
        Err(Reason::Unsupported)
    );
    // Three priority tags: not walked, and dropped (it could be for an inspected port).
    let tags = [(ETH_P_8021Q, 0), (ETH_P_8021Q, 0), (ETH_P_8021Q, 0)];
    let f = v4(eth(&tags, ETH_P_IPV4), 5, 0, 6, &t, 3);
    assert_eq!(
        parse(f.as_slice(), Dir::ToServer, inspected),
        Err(Reason::Unwalkable)
    );
}

#[test]
fn offloaded_vlan_tag() {
    let t = tcp_header(40000, HTTP, 0);
    let f = v4(eth(&[], ETH_P_IPV4), 5, 0, 6, &t, 3);
    assert!(parse(&Tagged(&f, 0x6000), Dir::ToServer, inspected).is_ok());
    assert_eq!(
        parse(&Tagged(&f, 0x6007), Dir::ToServer, inspected),
        Err(Reason::Unsupported)
    );
}

#[test]
fn other_protocols_and_short_frames() {
    let t = tcp_header(40000, HTTP, 0);
    let f = v4(eth(&[], ETH_P_IPV4), 5, 0, 17, &t, 3);
    assert_eq!(
        parse(f.as_slice(), Dir::ToServer, inspected),
        Err(Reason::NotTcp)
    );
    assert_eq!(
        parse(eth(&[], 0x0806).as_slice(), Dir::ToServer, inspected),
        Err(Reason::NotIp)
    );
    // Every truncation of a good frame stops with a reason, never a segment past the end.
    let f = v6(eth(&[], ETH_P_IPV6), &[(0, opts_ext(1))], 6, &t, 0);
    for n in 0..f.len() {
        assert!(parse(&f[..n], Dir::ToServer, inspected).is_err(), "{n}");
    }
    assert!(parse(f.as_slice(), Dir::ToServer, inspected).is_ok());
}

#[test]
fn headers_the_host_discards() {
    let t = tcp_header(40000, HTTP, 0);
    let good = v4(eth(&[], ETH_P_IPV4), 5, 0, 6, &t, 4);
    assert!(parse(good.as_slice(), Dir::ToServer, inspected).is_ok());
    // A wrong header checksum: dropped for an inspected port only.
    let mut f = good.clone();
    f[14 + 10] ^= 1;
    assert_eq!(
        parse(f.as_slice(), Dir::ToServer, inspected),
        Err(Reason::BadHeader)
    );
    let other = v4(eth(&[], ETH_P_IPV4), 5, 0, 6, &tcp_header(40000, 81, 0), 4);
    let mut f = other;
    f[14 + 10] ^= 1;
    assert_eq!(
        parse(f.as_slice(), Dir::ToServer, inspected),
        Err(Reason::OtherPort)
    );
    // An IP length past the frame; a version that is not 4.
    let mut f = good.clone();
    f.truncate(f.len() - 1);
    assert_eq!(
        parse(f.as_slice(), Dir::ToServer, inspected),
        Err(Reason::BadHeader)
    );
    let mut f = good.clone();
    f[14] = 0x55;
    assert_eq!(
        parse(f.as_slice(), Dir::ToServer, inspected),
        Err(Reason::BadHeader)
    );
    // A TCP header shorter than 20 bytes, or longer than the segment.
    for doff in [4u8, 15] {
        let mut t = tcp_header(40000, HTTP, 0);
        t[12] = doff << 4;
        let f = v4(eth(&[], ETH_P_IPV4), 5, 0, 6, &t, 4);
        assert_eq!(
            parse(f.as_slice(), Dir::ToServer, inspected),
            Err(Reason::BadHeader),
            "doff {doff}"
        );
    }
    // IPv6: a payload length past the frame.
    let mut f = v6(eth(&[], ETH_P_IPV6), &[], 6, &t, 7);
    f.truncate(f.len() - 1);
    assert_eq!(
        parse(f.as_slice(), Dir::ToServer, inspected),
        Err(Reason::BadHeader)
    );
}

/// The header checksum check sums 32-bit little-endian words: it must accept exactly the
/// headers whose 16-bit big-endian words sum to all ones (what the host's IP layer takes),
/// with and without options, and refuse every header with one bit flipped.
#[test]
fn the_header_checksum_check_is_the_ip_layers() {
    let mut next = crate::xorshift(0x0123_4567_89ab_cdef);
    for round in 0..20_000 {
        let ihl = 20 + 4 * (round % 11);
        let mut h: Vec<u8> = (0..ihl).map(|_| next() as u8).collect();
        if round % 2 == 0 {
            h[10] = 0;
            h[11] = 0;
            let c = crate::csum::finish(crate::csum::add(0, &h)).to_be_bytes();
            h[10] = c[0];
            h[11] = c[1];
        }
        let expected = crate::csum::finish(crate::csum::add(0, &h)) == 0;
        if round % 2 == 0 {
            assert!(expected);
        }
        let n = h.len();
        assert_eq!(
            v4_header_ok(h.as_slice(), 0, ihl, n, n),
            expected,
            "{h:02x?}"
        );
        if expected {
            let bit = next() as usize % (8 * ihl);
            h[bit / 8] ^= 1 << (bit % 8);
            assert!(!v4_header_ok(h.as_slice(), 0, ihl, n, n), "{h:02x?}");
        }
    }
}

#[test]
fn an_ip_length_of_zero_is_the_frames() {
    // BIG TCP super-packets: IPv4 total length 0, IPv6 payload length 0.
    let t = tcp_header(40000, HTTP, 0);
    let mut f = v4(eth(&[], ETH_P_IPV4), 5, 0, 6, &t, 70_000 - 54);
    f[16] = 0;
    f[17] = 0;
    let c = {
        let mut h = f[14..34].to_vec();
        h[10] = 0;
        h[11] = 0;
        crate::csum::finish(crate::csum::add(0, &h)).to_be_bytes()
    };
    f[24] = c[0];
    f[25] = c[1];
    let s = parse(f.as_slice(), Dir::ToServer, inspected).unwrap();
    assert_eq!(s.ip_end, f.len());
    let mut f = v6(eth(&[], ETH_P_IPV6), &[], 6, &t, 70_000);
    f[18] = 0;
    f[19] = 0;
    let s = parse(f.as_slice(), Dir::ToServer, inspected).unwrap();
    assert_eq!(s.ip_end, f.len());
}

/// `other_port` says yes only where `parse` says `OtherPort`; and it says yes for the plain
/// layouts it reads (so that the agreement is not the agreement of an answer that is always
/// no).
#[test]
fn the_quick_port_check_agrees_with_the_walk() {
    let mut frag = vec![0u8; 8];
    frag[3] = 1;
    // (frame, quick yes for a port that is not inspected)
    let shapes = |t: &[u8]| -> Vec<(Vec<u8>, bool)> {
        let mut bad_sum = v4(eth(&[], ETH_P_IPV4), 5, 0, 6, t, 4);
        bad_sum[14 + 10] ^= 1;
        let mut long_total = v4(eth(&[], ETH_P_IPV4), 5, 0, 6, t, 4);
        long_total[14 + 2] = 0x7f;
        let mut zero_total = v4(eth(&[], ETH_P_IPV4), 5, 0, 6, t, 4);
        zero_total[14 + 2] = 0;
        zero_total[14 + 3] = 0;
        let mut long_v6 = v6(eth(&[], ETH_P_IPV6), &[], 6, t, 4);
        long_v6[14 + 4] = 0x7f;
        let mut v5 = v4(eth(&[], ETH_P_IPV4), 5, 0, 6, t, 4);
        v5[14] = 0x55;
        vec![
            (v4(eth(&[], ETH_P_IPV4), 5, 0, 6, t, 100), true),
            (v4(eth(&[], ETH_P_IPV4), 5, 0x4000, 6, t, 0), true),
            (bad_sum, true),
            (long_total, true),
            (zero_total, true),
            (v6(eth(&[], ETH_P_IPV6), &[], 6, t, 10), true),
            (long_v6, true),
            (v4(eth(&[], ETH_P_IPV4), 6, 0, 6, t, 4), false),
            (v4(eth(&[], ETH_P_IPV4), 5, 0x2000, 6, t, 4), false),
            (v4(eth(&[], ETH_P_IPV4), 5, 0x0010, 6, t, 4), false),
            (v4(eth(&[], ETH_P_IPV4), 5, 0, 17, t, 4), false),
            (v5, false),
            (
                v4(eth(&[(ETH_P_8021Q, 0)], ETH_P_IPV4), 5, 0, 6, t, 4),
                false,
            ),
            (
                v4(eth(&[(ETH_P_8021Q, 5)], ETH_P_IPV4), 5, 0, 6, t, 4),
                false,
            ),
            (
                v6(eth(&[], ETH_P_IPV6), &[(0, opts_ext(1))], 6, t, 4),
                false,
            ),
            (
                v6(eth(&[], ETH_P_IPV6), &[(44, frag.clone())], 6, t, 4),
                false,
            ),
            (v6(eth(&[], ETH_P_IPV6), &[], 17, t, 4), false),
            (eth(&[], 0x0806), false),
        ]
    };
    let mut yes = 0;
    for (server, client) in [(HTTP, 40000), (443, 40000), (443, HTTP)] {
        for (dir, sport, dport) in [
            (Dir::ToServer, client, server),
            (Dir::FromServer, server, client),
        ] {
            let t = tcp_header(sport, dport, 12);
            for (i, (f, plain)) in shapes(&t).into_iter().enumerate() {
                let want = plain && server != HTTP;
                let walk = parse(f.as_slice(), dir, inspected);
                let quick = other_port(f.as_slice(), dir, inspected);
                assert_eq!(quick, want, "shape {i}, {dir:?}, port {server}");
                if quick {
                    yes += 1;
                    assert_eq!(walk, Err(Reason::OtherPort), "shape {i}, {dir:?}");
                }
                // Cut anywhere, or tagged by the driver: never a yes the walk contradicts.
                for n in 0..f.len() {
                    if other_port(&f[..n], dir, inspected) {
                        assert_eq!(parse(&f[..n], dir, inspected), Err(Reason::OtherPort));
                    }
                }
                for tci in [0x6000, 0x6007] {
                    let tagged = Tagged(&f, tci);
                    let quick = other_port(&tagged, dir, inspected);
                    assert_eq!(quick, want && tci & 0x0fff == 0, "shape {i}, tag {tci:#x}");
                    if quick {
                        assert_eq!(parse(&tagged, dir, inspected), Err(Reason::OtherPort));
                    }
                }
            }
        }
    }
    assert_eq!(yes, 7 * 2 * 2);
}

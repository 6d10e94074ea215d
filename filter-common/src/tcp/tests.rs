use super::*;
use crate::tcp_flags::{ACK, FIN, PSH};

fn block(bytes: &[u8]) -> ([u8; OPTIONS_MAX], usize) {
    let mut b = [0u8; OPTIONS_MAX];
    b[..bytes.len()].copy_from_slice(bytes);
    (b, bytes.len())
}

#[test]
fn options_of_real_segments() {
    // Linux's SYN: MSS, SACK permitted, timestamps, NOP, window scale 7.
    let (b, n) = block(&[
        2, 4, 5, 0xb4, 4, 2, 8, 10, 0, 0, 0x12, 0x34, 0, 0, 0, 0, 1, 3, 3, 7,
    ]);
    assert_eq!(
        parse_options(&b, n),
        Options {
            wscale: Some(7),
            tsval: Some(0x1234)
        }
    );
    assert_eq!(fast_tsval(&b, n), None);
    // A data segment: NOP NOP TS.
    let (b, n) = block(&[1, 1, 8, 10, 0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 1]);
    assert_eq!(fast_tsval(&b, n), Some(0xdead_beef));
    assert_eq!(parse_options(&b, n).tsval, Some(0xdead_beef));
    // The timestamp elsewhere: only the walk finds it.
    let (b, n) = block(&[5, 10, 0, 0, 0, 1, 0, 0, 0, 2, 8, 10, 0, 0, 0, 9, 0, 0, 0, 0]);
    assert_eq!(fast_tsval(&b, n), None);
    assert_eq!(parse_options(&b, n).tsval, Some(9));
    // No options; a shift above 14 counts as 14.
    assert_eq!(parse_options(&[0; OPTIONS_MAX], 0), Options::default());
    let (b, n) = block(&[3, 3, 20, 0]);
    assert_eq!(parse_options(&b, n).wscale, Some(14));
}

#[test]
fn malformed_options_end_the_walk() {
    // EOL before the timestamp; a zero length; a length past the block; a truncated option.
    for bytes in [
        &[0u8, 8, 10, 0, 0, 0, 9, 0, 0, 0, 0][..],
        &[2, 0, 8, 10, 0, 0, 0, 9, 0, 0, 0, 0],
        &[8, 30, 0, 0, 0, 9, 0, 0, 0, 0],
        &[1, 1, 8],
    ] {
        let (b, n) = block(bytes);
        assert_eq!(parse_options(&b, n).tsval, None, "{bytes:?}");
    }
    // Any bytes: the walk ends within the block and never panics.
    let mut next = crate::xorshift(7);
    for _ in 0..20_000 {
        let mut b = [0u8; OPTIONS_MAX];
        for x in b.iter_mut() {
            *x = (next() % 12) as u8;
        }
        let n = (next() % (OPTIONS_MAX as u64 + 1)) as usize;
        let _ = parse_options(&b, n);
        if let Some(t) = fast_tsval(&b, n) {
            assert_eq!(parse_options(&b, n).tsval, Some(t));
        }
    }
}

const POS: u32 = 1000;

fn seg(flags: u8, len: u32) -> Seg {
    Seg {
        seq: POS,
        ack: 5000,
        flags,
        payload_len: len,
        tsval: None,
    }
}

fn views() -> (ClientView, ServerView) {
    let mut h = Handshake::syn(POS - 1, &Options::default());
    h.synack(4999, POS, 0, &Options::default());
    let (mut c, mut s) = h.views(100);
    // A window of 500 bytes from POS.
    s.edge = POS + 500;
    c.flags &= !client::TS_ON;
    (c, s)
}

#[test]
fn what_tcp_discards_is_dropped() {
    let (c, s) = views();
    let ok = seg(ACK | PSH, 10);
    assert_eq!(judge(&ok, POS, &c, &s, Some(5000)), Verdict::Accept);
    let cases = [
        (seg(PSH, 10), Reason::NoAck),
        (Seg { ack: 5001, ..ok }, Reason::BadAck),
        (
            Seg {
                seq: POS + 500,
                ..ok
            },
            Reason::OutOfWindow,
        ),
    ];
    for (sg, r) in cases {
        assert_eq!(
            judge(&sg, sg.seq.min(POS), &c, &s, Some(5000)),
            Verdict::Drop(r),
            "{sg:?}"
        );
    }
    // Unknown snd_nxt: no check there.
    assert_eq!(
        judge(&Seg { ack: 9999, ..ok }, POS, &c, &s, None),
        Verdict::Accept
    );
    // A FIN alone at a zero window is accepted, as TCP does.
    let mut zero = s;
    zero.edge = POS;
    assert_eq!(
        judge(&seg(ACK | FIN, 0), POS, &c, &zero, Some(5000)),
        Verdict::Accept
    );
    assert_eq!(
        judge(&ok, POS, &c, &zero, Some(5000)),
        Verdict::Drop(Reason::OutOfWindow)
    );
}

#[test]
fn data_past_the_edge_is_trimmed() {
    let (c, s) = views();
    let big = seg(ACK, 600);
    assert_eq!(judge(&big, POS, &c, &s, None), Verdict::Trim(500));
    // A partial overlap: the kept part counts from `seq`.
    let overlap = Seg {
        seq: POS - 100,
        ..seg(ACK, 700)
    };
    assert_eq!(judge(&overlap, POS, &c, &s, None), Verdict::Trim(600));
    // Nothing new inside the window: dropped.
    let mut at_pos = s;
    at_pos.edge = POS;
    assert_eq!(
        judge(&overlap, POS, &c, &at_pos, None),
        Verdict::Drop(Reason::OutOfWindow)
    );
}

#[test]
fn old_acknowledgements_are_refused_at_least_as_strictly_as_tcp() {
    let (mut c, s) = views();
    note(
        &mut c,
        &Seg {
            ack: 100_000,
            ..seg(ACK, 1)
        },
        None,
    );
    // The handshake's window was 100: an ACK more than 100 below the highest is refused.
    let at = |ack| judge(&Seg { ack, ..seg(ACK, 1) }, POS, &c, &s, None);
    assert_eq!(at(99_900), Verdict::Accept);
    assert_eq!(at(99_899), Verdict::Drop(Reason::BadAck));
    // Across the sequence-space wrap.
    let mut w = c;
    w.ack_max = 50;
    assert_eq!(
        judge(
            &Seg {
                ack: 50u32.wrapping_sub(100),
                ..seg(ACK, 1)
            },
            POS,
            &w,
            &s,
            None
        ),
        Verdict::Accept
    );
}

#[test]
fn timestamps() {
    let (mut c, s) = views();
    let with = |t| Seg {
        tsval: Some(t),
        ..seg(ACK, 1)
    };
    note(&mut c, &with(1000), None);
    assert_eq!(judge(&with(1000), POS, &c, &s, None), Verdict::Accept);
    assert_eq!(judge(&with(999), POS, &c, &s, None), Verdict::Accept);
    assert_eq!(
        judge(&with(998), POS, &c, &s, None),
        Verdict::Drop(Reason::Paws)
    );
    note(&mut c, &with(997), None);
    assert_eq!(c.ts_max, 1000, "the newest stays");
    // Negotiated: a segment without one is refused.
    assert_eq!(judge(&seg(ACK, 1), POS, &c, &s, None), Verdict::Accept);
    c.flags |= client::TS_ON;
    assert_eq!(
        judge(&seg(ACK, 1), POS, &c, &s, None),
        Verdict::Drop(Reason::Paws)
    );
}

#[test]
fn handshakes() {
    let syn = Options {
        wscale: Some(7),
        tsval: Some(1),
    };
    let mut h = Handshake::syn(100, &syn);
    assert!(!h.completed_by(101, 1001));
    // A SYN|ACK that does not acknowledge this SYN is ignored.
    h.synack(1000, 999, 64_000, &syn);
    assert!(!h.completed_by(101, 1001));
    h.synack(
        1000,
        101,
        64_000,
        &Options {
            wscale: Some(9),
            tsval: Some(5),
        },
    );
    assert!(h.completed_by(101, 1001));
    assert!(!h.completed_by(102, 1001));
    assert!(!h.completed_by(101, 1000));
    let (c, s) = h.views(500);
    assert_eq!(c.win0, 500 << 7);
    assert_eq!(c.flags & client::TS_ON, client::TS_ON);
    assert_eq!((s.edge, s.wscale), (101 + 64_000, 9));
    let mut s = s;
    s.advertise(5000, 200);
    assert_eq!(s.edge, 5000 + (200 << 9));
    // The edge never moves left.
    s.advertise(4000, 1);
    assert_eq!(s.edge, 5000 + (200 << 9));
    // Without scaling on both ends, neither shift applies.
    let mut h = Handshake::syn(100, &Options::default());
    h.synack(1000, 101, 10, &syn);
    let (c, s) = h.views(500);
    assert_eq!((c.win0, s.wscale, c.flags & client::TS_ON), (500, 0, 0));
}

#[test]
fn resets_only_at_the_next_byte() {
    assert!(rst_acceptable(POS, POS));
    assert!(!rst_acceptable(POS + 1, POS));
    assert!(!rst_acceptable(POS - 1, POS));
}

#[test]
fn noting_acks_stops_at_snd_nxt() {
    let mut c = ClientView::default();
    note(&mut c, &seg(ACK, 0), Some(4000));
    assert_eq!(c.ack_max, 4000);
    note(
        &mut c,
        &Seg {
            ack: 3000,
            ..seg(ACK, 0)
        },
        Some(4000),
    );
    assert_eq!(c.ack_max, 4000);
    // Without the ACK flag the number means nothing.
    note(
        &mut c,
        &Seg {
            ack: 3999,
            ..seg(PSH, 0)
        },
        None,
    );
    assert_eq!(c.ack_max, 4000);
}

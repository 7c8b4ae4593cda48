//! Fuzz the STUN codec, ChannelData parsing and the TURN-over-TCP frame splitter: arbitrary bytes
//! are parsed as one datagram and as a stream of frames; every message that parses is checked with
//! a fixed key, its attributes are decoded, re-encoded, signed and parsed again. Text attributes
//! also go through OpaqueString preparation (which must be idempotent: a client prepares, the
//! server prepares again) and the nonce cookie parser.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern::turn::stun::{
    Attribute, FrameLen, Message, MessageBuilder, PacketKind, classify, frame_len, opaque_string,
    parse_channel_data, security_features, write_channel_data,
};

const KEY: &[u8] = b"fuzz-long-term-key";
const MAX_FRAME: usize = 4096;

fn stun(data: &[u8]) {
    let Ok(m) = Message::parse(data) else {
        return;
    };
    assert_eq!(classify(data), PacketKind::Stun);
    let _ = (m.check_integrity(KEY), m.check_integrity_sha256(KEY));
    let _ = m.check_fingerprint();
    let _ = m.unknown_required().count();
    let tid = m.transaction_id();
    let decoded: Vec<Attribute<'_>> = m
        .attributes()
        .filter_map(|a| Attribute::decode(a, &tid).ok())
        .collect();
    for a in &decoded {
        if let Attribute::Username(t) | Attribute::Realm(t) | Attribute::Nonce(t) = a {
            if let Ok(prepared) = opaque_string(t, "text") {
                assert_eq!(opaque_string(&prepared, "text").as_deref(), Ok(&*prepared));
            }
            let _ = security_features(t);
        }
    }
    let mut out = Vec::new();
    let mut b = MessageBuilder::new(&mut out, m.message_type(), tid);
    for a in &decoded {
        b.add(a);
    }
    b.integrity(KEY).integrity_sha256(KEY).fingerprint();
    if b.finish().is_err() {
        return;
    }
    let again = Message::parse(&out).expect("own output parses");
    assert_eq!(again.message_type(), m.message_type());
    assert_eq!(again.transaction_id(), tid);
    assert!(again.check_integrity(KEY));
    assert!(again.check_integrity_sha256(KEY));
    assert!(again.check_fingerprint());
    let redecoded: Vec<Attribute<'_>> = again
        .attributes()
        .map(|a| Attribute::decode(a, &tid).expect("own attribute decodes"))
        .collect();
    assert_eq!(redecoded, decoded);
}

fuzz_target!(|data: &[u8]| {
    stun(data);
    if let Some((ch, payload)) = parse_channel_data(data) {
        assert_eq!(classify(data), PacketKind::ChannelData);
        assert!(payload.len() + 4 <= data.len());
        let mut out = Vec::new();
        let n = write_channel_data(&mut out, ch, payload, true).expect("payload fits");
        assert_eq!(n % 4, 0);
        assert_eq!(parse_channel_data(&out), Some((ch, payload)));
        assert_eq!(frame_len(&out, usize::MAX), FrameLen::Complete(n));
    }
    // The same bytes as a TCP stream: split frame by frame.
    let mut rest = data;
    while let FrameLen::Complete(n) = frame_len(rest, MAX_FRAME) {
        assert!((4..=MAX_FRAME).contains(&n) && n <= rest.len());
        let (frame, tail) = rest.split_at(n);
        match classify(frame) {
            PacketKind::Stun => stun(frame),
            PacketKind::ChannelData => assert!(parse_channel_data(frame).is_some()),
            PacketKind::Other => panic!("frame_len accepted a non-TURN frame"),
        }
        rest = tail;
    }
});

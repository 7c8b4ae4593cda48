//! Fuzz the XMPP stream framer: arbitrary bytes, split at a fuzzer-chosen point, optionally
//! behind a valid stream header; every stanza produced is re-serialised and queried.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern::xmpp::framer::{Event, Framer, FramerLimits};

const HEADER: &[u8] = b"<stream:stream xmlns='jabber:client' \
    xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>";

fn drain(f: &mut Framer, limits: &FramerLimits) -> bool {
    loop {
        match f.next() {
            Ok(Some(Event::Stanza(s))) => {
                assert!(s.raw().len() <= limits.max_stanza_bytes);
                assert!(s.raw().starts_with(b"<") && s.raw().ends_with(b">"));
                let _ = (s.name(), s.ns(), s.to(), s.from(), s.id(), s.stanza_type());
                let _ = s.attr("xml:lang");
                let _ = s.first_child();
                let out = s.with_addressing(Some("a'b\"c&<>@x/\u{e9}"), Some("to@example.com"));
                // Re-addressed output must itself frame as exactly one valid stanza.
                let mut g = Framer::new(FramerLimits {
                    max_stanza_bytes: out.len().max(HEADER.len()),
                    ..*limits
                });
                g.push(HEADER);
                assert!(matches!(g.next(), Ok(Some(Event::StreamOpen(_)))));
                g.push(&out);
                match g.next() {
                    Ok(Some(Event::Stanza(t))) => {
                        assert_eq!(t.name(), s.name());
                        assert_eq!(t.from().as_deref(), Some("a'b\"c&<>@x/\u{e9}"));
                        assert_eq!(t.to().as_deref(), Some("to@example.com"));
                        assert_eq!(t.id(), s.id());
                        assert_eq!(g.buffered(), 0);
                    }
                    other => panic!("re-addressed stanza did not frame: {other:?}"),
                }
                let _ = s.with_addressing(None, Some("x"));
            }
            Ok(Some(Event::StreamOpen(_))) => {}
            Ok(Some(Event::StreamClose)) => f.reset(),
            Ok(None) => return true,
            Err(e) => {
                let _ = e.condition();
                assert!(f.next().is_err());
                return false;
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let Some((&split, rest)) = rest.split_first() else {
        return;
    };
    let limits = FramerLimits {
        max_stanza_bytes: 512 + usize::from(ctl & 0x3f) * 64,
        max_depth: 8,
    };
    let mut f = Framer::new(limits);
    if ctl & 0x80 != 0 {
        f.push(HEADER);
    }
    let cut = (usize::from(split) * rest.len() / 255).min(rest.len());
    let (a, b) = rest.split_at(cut);
    for part in [a, b] {
        f.push(part);
        if !drain(&mut f, &limits) {
            return;
        }
        assert!(f.buffered() <= limits.max_stanza_bytes);
    }
    if ctl & 0x40 != 0 {
        f.reset();
        drain(&mut f, &limits);
    }
});

//! Throughput of the XMPP stream framer on a batch of typical stanzas fed in 1 KiB chunks.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use tern::xmpp::framer::{Event, Framer, FramerLimits};

const HEADER: &[u8] = b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
    xmlns:stream='http://etherx.jabber.org/streams' to='example.com' version='1.0'>";

fn batch() -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..300 {
        out.extend_from_slice(
            format!(
                "<message to='juliet@example.com/balcony' from='romeo@example.net/orchard' \
                 type='chat' id='msg-{i}' xml:lang='en'><body>Wherefore art thou, Romeo? \
                 Deny thy father &amp; refuse thy name. {i}</body>\
                 <active xmlns='http://jabber.org/protocol/chatstates'/></message>\
                 <iq type='get' id='ping-{i}' to='example.com'><ping xmlns='urn:xmpp:ping'/></iq>\
                 <presence><show>away</show><status>Out to lunch</status><priority>5</priority>\
                 </presence> "
            )
            .as_bytes(),
        );
    }
    out
}

fn bench_framer(c: &mut Criterion) {
    let data = batch();
    let mut g = c.benchmark_group("framer");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("typical_stanzas_1k_chunks", |b| {
        b.iter(|| {
            let mut f = Framer::new(FramerLimits {
                max_stanza_bytes: 256 * 1024,
                max_depth: 32,
            });
            f.push(HEADER);
            let mut n = 0usize;
            if let Ok(Some(Event::StreamOpen(_))) = f.next() {
                n += 1;
            }
            for chunk in data.chunks(1024) {
                f.push(chunk);
                while let Ok(Some(ev)) = f.next() {
                    if let Event::Stanza(s) = ev {
                        n += s.raw().len();
                    }
                }
            }
            black_box(n)
        })
    });
    g.finish();
}

criterion_group!(benches, bench_framer);
criterion_main!(benches);

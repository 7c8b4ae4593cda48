//! The session registry's hot paths (`src/xmpp/router.rs`) with 10k and 100k bound sessions:
//! binding and unbinding a session, routing a chat message to a full and to a bare JID, and the
//! push fast path of `POST /api/v1/push` (parse the recipient's JID, `route_tagged` a `normal`
//! message with its `PushMeta`). Each routing iteration also drains the recipient's queue, as its
//! session task would, so queues stay empty and every iteration takes the delivery branch.
//!
//!   cargo bench --bench router                 # short: 10 samples, 2 s of measurement each
//!   cargo bench --bench router -- --quick      # quicker still (criterion's --quick)

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use jid::{BareJid, FullJid, Jid};
use tern::xmpp::router::{Delivery, Kind, MessageType, PushMeta, Router, SessionHandle};

const SIZES: [usize; 2] = [10_000, 100_000];
const CHAT: Kind = Kind::Message(MessageType::Chat);
const STANZA: &[u8] = b"<message type='chat' id='m1' from='a@localhost/x' to='bench-1@localhost'>\
    <body>hello</body></message>";

/// A router with `n` accounts bench-{i}@localhost, one available resource each (`phone`), and
/// their session handles (to drain their queues).
fn populated(n: usize) -> (Router, Vec<Arc<SessionHandle>>) {
    let router = Router::new();
    let presence = Bytes::from_static(b"<presence/>");
    let addr = "127.0.0.1:40000".parse().expect("addr");
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        let full = FullJid::new(&format!("bench-{i}@localhost/phone")).expect("jid");
        let h = SessionHandle::with_limits(256, 1 << 20, addr);
        router.bind(&full, h.clone()).expect("bind");
        router.set_presence(&full, h.id, Some((0, presence.clone())));
        handles.push(h);
    }
    (router, handles)
}

/// Recipients visited in a scattered order (a multiplicative walk over 0..n), so consecutive
/// iterations do not hit the same cache lines.
fn scatter(n: usize) -> impl FnMut() -> usize {
    let mut i = 0usize;
    move || {
        i = (i + 7919) % n;
        i
    }
}

fn bench_router(c: &mut Criterion) {
    let mut g = c.benchmark_group("router");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let stanza = Bytes::from_static(STANZA);
    for n in SIZES {
        let (router, handles) = populated(n);
        let fulls: Vec<Jid> = (0..n)
            .map(|i| Jid::new(&format!("bench-{i}@localhost/phone")).expect("jid"))
            .collect();
        let bares: Vec<Jid> = (0..n)
            .map(|i| Jid::from(BareJid::new(&format!("bench-{i}@localhost")).expect("jid")))
            .collect();
        let names: Vec<String> = (0..n).map(|i| format!("bench-{i}@localhost")).collect();
        let mut out = Vec::with_capacity(4);

        // A new session binds (and its account's first resource comes online), then leaves.
        g.bench_function(BenchmarkId::new("bind_unbind", n), |b| {
            let addr = "127.0.0.1:40001".parse().expect("addr");
            let full = FullJid::new("newcomer@localhost/phone").expect("jid");
            b.iter(|| {
                let h = SessionHandle::with_limits(256, 1 << 20, addr);
                let id = h.id;
                assert!(router.bind(&full, h).expect("bind").is_none());
                router.unbind(&full, id);
            })
        });

        g.bench_function(BenchmarkId::new("route_full_jid", n), |b| {
            let mut next = scatter(n);
            b.iter(|| {
                let i = next();
                let d = router.route(black_box(&fulls[i]), CHAT, stanza.clone());
                assert_eq!(d, Delivery::Delivered(1));
                out.clear();
                handles[i].drain(8, &mut out);
            })
        });

        g.bench_function(BenchmarkId::new("route_bare_jid", n), |b| {
            let mut next = scatter(n);
            b.iter(|| {
                let i = next();
                let d = router.route(black_box(&bares[i]), CHAT, stanza.clone());
                assert_eq!(d, Delivery::Delivered(1));
                out.clear();
                handles[i].drain(8, &mut out);
            })
        });

        // What `POST /api/v1/push` does per recipient once the request is parsed: the recipient's
        // JID from its string, a `PushMeta`, and `route_tagged` of a `normal` message.
        g.bench_function(BenchmarkId::new("push_fast_path", n), |b| {
            let mut next = scatter(n);
            let ttl = Duration::from_secs(86_400);
            b.iter(|| {
                let i = next();
                let to = Jid::new(black_box(&names[i])).expect("jid");
                let created = SystemTime::now();
                let meta = Arc::new(PushMeta {
                    push_id: "push-0123456789".to_string(),
                    created,
                    expires_at: created + ttl,
                });
                let d = router.route_tagged(
                    &to,
                    Kind::Message(MessageType::Normal),
                    stanza.clone(),
                    Some(meta),
                );
                assert_eq!(d, Delivery::Delivered(1));
                out.clear();
                handles[i].drain(8, &mut out);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_router);
criterion_main!(benches);

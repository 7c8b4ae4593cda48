//! Micro-benchmarks of the TURN hot paths: STUN parsing, authenticated request verification,
//! ChannelData parsing, and the engine's relay paths in both directions.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use tern::turn::auth::{Credentials, FailureLimiter, Nonces};
use tern::turn::engine::{
    ClientAction, ClientId, Engine, EngineConfig, PeerAction, RelayId, RelaySockets, Transport,
};
use tern::turn::peer::PeerFilter;
use tern::turn::stun::{
    Class, LongTermKey, Message, MessageBuilder, MessageType, Method, TransactionId, attr,
    parse_channel_data, write_channel_data,
};

const REALM: &str = "bench.example";
const TID: TransactionId = TransactionId([7; 12]);

fn message(method: Method, f: impl FnOnce(&mut MessageBuilder<'_>)) -> Vec<u8> {
    let mut v = Vec::new();
    let mut b = MessageBuilder::new(&mut v, MessageType::new(method, Class::Request), TID);
    f(&mut b);
    b.finish().expect("fits");
    v
}

fn authenticated(method: Method, nonce: &str, f: impl FnOnce(&mut MessageBuilder<'_>)) -> Vec<u8> {
    let key = LongTermKey::md5("user", REALM, "password").expect("ASCII credentials");
    message(method, |b| {
        f(b);
        b.text(attr::USERNAME, "user")
            .text(attr::REALM, REALM)
            .text(attr::NONCE, nonce)
            .integrity(key.as_bytes())
            .fingerprint();
    })
}

fn bench_codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("stun");
    let binding = message(Method::BINDING, |b| {
        b.fingerprint();
    });
    g.bench_function("parse_binding_request", |b| {
        b.iter(|| {
            let m = Message::parse(black_box(&binding)).expect("parses");
            black_box(m.check_fingerprint())
        })
    });
    let refresh = authenticated(Method::REFRESH, "AbCdEfGhIjKlMnOpQrStUvWxYz012345", |b| {
        b.u32_value(attr::LIFETIME, 600);
    });
    let key = LongTermKey::md5("user", REALM, "password").expect("ASCII credentials");
    g.bench_function("parse_verify_refresh", |b| {
        b.iter(|| {
            let m = Message::parse(black_box(&refresh)).expect("parses");
            let ok = m.check_fingerprint() && m.check_integrity(key.as_bytes());
            black_box((ok, m.text(attr::USERNAME), m.u32_value(attr::LIFETIME)))
        })
    });
    let allocate = authenticated(Method::ALLOCATE, "AbCdEfGhIjKlMnOpQrStUvWxYz012345", |b| {
        b.requested_transport(17);
    });
    g.bench_function("parse_derive_verify_allocate", |b| {
        b.iter(|| {
            let m = Message::parse(black_box(&allocate)).expect("parses");
            let user = m.text(attr::USERNAME).ok().flatten().unwrap_or_default();
            let k = LongTermKey::md5(user, REALM, "password").expect("ASCII credentials");
            black_box(m.check_fingerprint() && m.check_integrity(k.as_bytes()))
        })
    });
    let mut frame = Vec::new();
    write_channel_data(&mut frame, 0x4001, &[0xAB; 1000], false);
    g.throughput(Throughput::Bytes(frame.len() as u64));
    g.bench_function("parse_channel_data_1000", |b| {
        b.iter(|| black_box(parse_channel_data(black_box(&frame))))
    });
    g.finish();
}

struct Relays(AtomicU64);

impl RelaySockets for Relays {
    fn open(&self, ip: IpAddr) -> std::io::Result<(RelayId, SocketAddr)> {
        let n = self.0.fetch_add(1, Ordering::Relaxed) + 1;
        Ok((RelayId(n), SocketAddr::new(ip, 50_000 + n as u16)))
    }
    fn close(&self, _: RelayId) {}
}

/// An engine with one allocation, a permission and a channel to `peer`.
fn engine_with_channel(client: ClientId, peer: SocketAddr) -> (Engine, RelayId) {
    let engine = Engine::new(
        EngineConfig {
            realm: REALM.into(),
            software: None,
            relay_ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
            advertised_ip: None,
            default_lifetime: Duration::from_secs(600),
            max_lifetime: Duration::from_secs(3600),
            max_allocations: 10,
            max_allocations_per_user: 10,
            max_bandwidth: 0,
        },
        Arc::new(Credentials::new(
            vec![],
            vec![("user".into(), "password".into())],
        )),
        Nonces::new([1; 32], Duration::from_secs(3600)),
        FailureLimiter::new(100, 100),
        PeerFilter::default(),
        Arc::new(Relays(AtomicU64::new(0))),
    );
    let (now, wall) = (Instant::now(), SystemTime::now());
    let mut out = Vec::new();
    let challenge = message(Method::ALLOCATE, |b| {
        b.requested_transport(17);
    });
    engine.on_client(client, &challenge, now, wall, &mut out);
    let nonce = Message::parse(&out)
        .ok()
        .and_then(|m| m.text(attr::NONCE).ok().flatten().map(str::to_owned))
        .expect("401 with a NONCE");
    let allocate = authenticated(Method::ALLOCATE, &nonce, |b| {
        b.requested_transport(17);
    });
    assert_eq!(
        engine.on_client(client, &allocate, now, wall, &mut out),
        ClientAction::Reply
    );
    let bind = authenticated(Method::CHANNEL_BIND, &nonce, |b| {
        b.channel_number(0x4001)
            .xor_address(attr::XOR_PEER_ADDRESS, peer);
    });
    assert_eq!(
        engine.on_client(client, &bind, now, wall, &mut out),
        ClientAction::Reply
    );
    (engine, RelayId(1))
}

fn bench_engine(c: &mut Criterion) {
    let client = ClientId {
        transport: Transport::Udp,
        remote: "203.0.113.1:40000".parse().expect("addr"),
        local: "192.0.2.1:3478".parse().expect("addr"),
    };
    let peer: SocketAddr = "203.0.113.2:50000".parse().expect("addr");
    let (engine, relay) = engine_with_channel(client, peer);
    let payload = [0xAB; 1000];
    let mut frame = Vec::new();
    write_channel_data(&mut frame, 0x4001, &payload, false);
    let now = Instant::now();
    let wall = SystemTime::now();
    let mut out = Vec::with_capacity(2048);
    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Bytes(payload.len() as u64));
    g.bench_function("channel_data_to_peer_1000", |b| {
        b.iter(|| {
            let a = engine.on_client(client, black_box(&frame), now, wall, &mut out);
            assert!(matches!(a, ClientAction::Relay { .. }));
        })
    });
    g.bench_function("peer_to_channel_data_1000", |b| {
        b.iter(|| {
            let a = engine.on_peer(relay, peer, black_box(&payload), now, &mut out);
            assert!(matches!(a, PeerAction::ToClient { .. }));
        })
    });
    g.finish();
}

criterion_group!(benches, bench_codec, bench_engine);
criterion_main!(benches);

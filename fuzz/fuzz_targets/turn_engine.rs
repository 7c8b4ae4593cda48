//! Fuzz the sans-IO TURN allocation engine: an input is a script of client packets (raw bytes, or
//! requests the target builds and signs with real credentials and the NONCE the engine handed out,
//! so the fuzzer gets past authentication into allocations, permissions, channels and relaying),
//! peer datagrams, time steps with `expire`, and TCP connection closes, from a few client 5-tuples.
//!
//! Relay sockets are an in-memory table. Checked after every step: no panic; replies parse and
//! carry a valid FINGERPRINT when they have one; authenticated successes are signed with the
//! request's key; relays name open sockets and a live allocation; the engine's allocation count
//! matches a model built from its own answers (Allocate/Refresh successes, expiry, closes) and
//! never exceeds the server-wide or per-user quota; no socket is closed twice; once everything
//! has expired, every relay socket is closed again (no leaks, reservations included).
#![no_main]

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use libfuzzer_sys::arbitrary::{Result as ArbResult, Unstructured};
use libfuzzer_sys::fuzz_target;
use tern::turn::auth::{Credentials, FailureLimiter, Nonces, rest_user};
use tern::turn::engine::{
    ClientAction, ClientId, Engine, EngineConfig, PeerAction, RelayId, RelaySockets, Transport,
};
use tern::turn::peer::PeerFilter;
use tern::turn::stun::{
    self, Attribute, Class, LongTermKey, Message, MessageBuilder, MessageType, Method, PacketKind,
    PasswordAlgorithm, TransactionId, attr,
};

const REALM: &str = "fuzz.realm";
const SECRET: &str = "fuzz-rest-secret";
const RELAY_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
const MAX_ALLOCATIONS: usize = 4;
const MAX_PER_USER: usize = 2;
/// Relay sockets the fake hands out before `open` fails (the engine's 508 path).
const MAX_SOCKETS: usize = 12;
const MAX_STEPS: usize = 64;

/// The in-memory relay socket table: ids count up, ports alternate parity so EVEN-PORT retries.
#[derive(Default)]
struct Sockets {
    state: Mutex<SocketState>,
}

#[derive(Default)]
struct SocketState {
    next: u64,
    open: BTreeSet<u64>,
    ports: BTreeSet<u16>,
    by_id: HashMap<u64, u16>,
}

impl SocketState {
    fn bind(&mut self, ip: IpAddr, port: u16) -> std::io::Result<(RelayId, SocketAddr)> {
        if self.open.len() >= MAX_SOCKETS || port == 0 || !self.ports.insert(port) {
            return Err(std::io::ErrorKind::AddrInUse.into());
        }
        self.next += 1;
        self.open.insert(self.next);
        self.by_id.insert(self.next, port);
        Ok((RelayId(self.next), SocketAddr::new(ip, port)))
    }
}

impl Sockets {
    fn lock(&self) -> std::sync::MutexGuard<'_, SocketState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl RelaySockets for Sockets {
    fn open(&self, ip: IpAddr) -> std::io::Result<(RelayId, SocketAddr)> {
        let mut s = self.lock();
        // 49152, 49153, ...: every other one is even.
        let port = (49_152..65_535)
            .find(|p| !s.ports.contains(p))
            .ok_or(std::io::ErrorKind::AddrInUse)?;
        s.bind(ip, port)
    }

    fn close(&self, id: RelayId) {
        let mut s = self.lock();
        assert!(s.open.remove(&id.0), "relay socket {id:?} closed twice");
        let port = s.by_id.remove(&id.0).expect("port of an open socket");
        s.ports.remove(&port);
    }

    fn open_port(&self, ip: IpAddr, port: u16) -> std::io::Result<(RelayId, SocketAddr)> {
        self.lock().bind(ip, port)
    }
}

const CLIENTS: [(Transport, &str); 4] = [
    (Transport::Udp, "203.0.113.1:40000"),
    (Transport::Udp, "203.0.113.1:40001"),
    (Transport::Tcp, "203.0.113.2:50000"),
    (Transport::Tcp, "[2001:db8::7]:50001"),
];

/// Public, private (refused), IPv6 (family mismatch) and IPv4-mapped peers.
const PEERS: [&str; 5] = [
    "8.8.8.8:5000",
    "1.1.1.1:6000",
    "10.0.0.1:7000",
    "[2606:4700::1]:8000",
    "[::ffff:8.8.8.8]:5000",
];

const CHANNELS: [u16; 4] = [0x4000, 0x4001, 0x7FFF, 0x3FFF];
const LIFETIMES: [u32; 6] = [0, 1, 60, 600, 3600, u32::MAX];
const STEPS: [u64; 6] = [0, 1, 31, 301, 601, 3601];

/// Who a structured request claims to be.
#[derive(Clone)]
struct User {
    name: String,
    password: String,
}

struct Run {
    engine: Engine,
    sockets: Arc<Sockets>,
    clients: Vec<ClientId>,
    users: Vec<User>,
    start: Instant,
    elapsed: Duration,
    /// Per client address: the last NONCE and PASSWORD-ALGORITHMS the engine challenged with.
    nonces: HashMap<IpAddr, (String, Option<Vec<u8>>)>,
    /// RESERVATION-TOKENs handed out.
    tokens: Vec<[u8; 8]>,
    /// Model: live allocations, their quota user and expiry (offset from `start`).
    model: HashMap<ClientId, (String, Duration)>,
    out: Vec<u8>,
    tid: u8,
    /// The quota user of the last signed request (what an Allocate success counts against).
    last_user: String,
}

impl Run {
    fn now(&self) -> Instant {
        self.start + self.elapsed
    }

    fn wall(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000) + self.elapsed
    }

    fn check_model(&self) {
        let count = self.engine.allocation_count();
        assert_eq!(count, self.model.len(), "allocation count vs. model");
        assert!(count <= MAX_ALLOCATIONS);
        let mut per_user: HashMap<&str, usize> = HashMap::new();
        for (user, _) in self.model.values() {
            *per_user.entry(user).or_default() += 1;
        }
        assert!(
            per_user.values().all(|&n| n <= MAX_PER_USER),
            "{per_user:?}"
        );
        assert!(self.sockets.lock().open.len() >= count);
    }

    /// Learns from an answer to `client`: challenges, tokens, allocation lifetimes.
    fn observe(&mut self, client: ClientId, method: Method, key: Option<&LongTermKey>) {
        let msg = Message::parse(&self.out).expect("the engine's answers parse");
        if msg.has_fingerprint() {
            assert!(msg.check_fingerprint(), "FINGERPRINT of an answer");
        }
        assert_eq!(msg.method(), method, "answer to another method");
        if let Ok(Some(nonce)) = msg.text(attr::NONCE) {
            let algs = msg.get(attr::PASSWORD_ALGORITHMS).map(|a| a.value.to_vec());
            self.nonces
                .insert(client.remote.ip(), (nonce.to_owned(), algs));
        }
        if msg.class() != Class::Success {
            return;
        }
        // Unsigned bytes succeed only as Binding or as a retransmitted Allocate, whose stored
        // answer is replayed (RFC 8656 §7.2; transaction ids here are easy to guess).
        if method != Method::BINDING {
            match key {
                Some(key) => assert!(
                    msg.check_integrity(key.as_bytes())
                        || msg.check_integrity_sha256(key.as_bytes()),
                    "success answers are signed with the request's key"
                ),
                None => assert!(
                    method == Method::ALLOCATE && self.model.contains_key(&client),
                    "an unsigned {method:?} succeeded"
                ),
            }
        }
        if let Ok(Some(Attribute::ReservationToken(t))) = msg.decode(attr::RESERVATION_TOKEN) {
            self.tokens.push(t);
        }
        let lifetime = msg.u32_value(attr::LIFETIME).ok().flatten();
        match (method, lifetime) {
            (Method::ALLOCATE, Some(secs)) => {
                let user = self.last_user.clone();
                let expires = self.elapsed + Duration::from_secs(u64::from(secs));
                self.model.entry(client).or_insert((user, expires));
            }
            (Method::REFRESH, Some(0)) => {
                assert!(self.model.remove(&client).is_some(), "refreshed a ghost");
            }
            (Method::REFRESH, Some(secs)) => {
                let e = self.model.get_mut(&client).expect("refreshed a ghost");
                e.1 = self.elapsed + Duration::from_secs(u64::from(secs));
            }
            _ => {}
        }
    }

    fn client_packet(&mut self, client: ClientId, data: &[u8], key: Option<&LongTermKey>) {
        let (now, wall) = (self.now(), self.wall());
        let action = self
            .engine
            .on_client(client, data, now, wall, &mut self.out);
        match action {
            ClientAction::None => {}
            ClientAction::Reply => {
                let method = Message::parse(data).expect("answered STUN").method();
                self.observe(client, method, key);
            }
            ClientAction::Relay {
                relay,
                peer,
                payload,
            } => {
                assert!(payload.end <= data.len() && payload.start <= payload.end);
                assert!(self.sockets.lock().open.contains(&relay.0));
                assert!(self.model.contains_key(&client), "relay without allocation");
                assert!(
                    !matches!(peer.ip().to_canonical(), IpAddr::V4(v4) if v4.is_private()),
                    "relayed to {peer}"
                );
            }
        }
        self.check_model();
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = run(data);
});

fn run(data: &[u8]) -> ArbResult<()> {
    let mut u = Unstructured::new(data);
    let max_bandwidth = *u.choose(&[0u64, 1, 2_000, 1 << 20])?;
    let burst = u.int_in_range(1..=50u32)?;
    let wall0 = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    // Without REST secrets the NONCEs also offer username anonymity (USERHASH).
    let secrets = if u.arbitrary()? {
        vec![SECRET.into()]
    } else {
        vec![]
    };
    let creds = Credentials::new(
        secrets,
        vec![
            ("alice".into(), "wonderland".into()),
            ("bob".into(), "builder".into()),
            ("1800000000:x".into(), "static-rest-lookalike".into()),
        ],
    );
    let mut users = vec![
        User {
            name: "alice".into(),
            password: "wonderland".into(),
        },
        User {
            name: "bob".into(),
            password: "builder".into(),
        },
        User {
            name: "alice".into(),
            password: "wrong".into(),
        },
    ];
    for (who, ttl) in [("carol", 3600), ("carol", 700), ("dave", 30), ("", 3600)] {
        if let Some((name, password, _)) = creds.mint(who, Duration::from_secs(ttl), wall0) {
            users.push(User { name, password });
        }
    }
    let sockets = Arc::new(Sockets::default());
    let engine = Engine::new(
        EngineConfig {
            realm: REALM.into(),
            software: Some("fuzz".into()),
            relay_ip: RELAY_IP,
            advertised_ip: None,
            default_lifetime: Duration::from_secs(600),
            max_lifetime: Duration::from_secs(3600),
            max_allocations: MAX_ALLOCATIONS,
            max_allocations_per_user: MAX_PER_USER,
            max_bandwidth,
        },
        Arc::new(creds),
        Nonces::new([9; 32], Duration::from_secs(600)),
        FailureLimiter::new(burst, burst),
        PeerFilter::default(),
        sockets.clone(),
    );
    let clients = CLIENTS
        .iter()
        .map(|&(transport, remote)| ClientId {
            transport,
            remote: remote.parse().expect("client address"),
            local: SocketAddr::new(RELAY_IP, 3478),
        })
        .collect();
    let mut r = Run {
        engine,
        sockets,
        clients,
        users,
        start: Instant::now(),
        elapsed: Duration::ZERO,
        nonces: HashMap::new(),
        tokens: Vec::new(),
        model: HashMap::new(),
        out: Vec::new(),
        tid: 0,
        last_user: String::new(),
    };
    let result = steps(&mut r, &mut u);
    // Everything expires in the end: no allocation, reservation or socket may outlive that.
    r.elapsed += Duration::from_secs(86_400);
    let now = r.now();
    r.engine.expire(now);
    r.model.clear();
    r.check_model();
    assert!(r.sockets.lock().open.is_empty(), "relay sockets leaked");
    result
}

fn steps(r: &mut Run, u: &mut Unstructured<'_>) -> ArbResult<()> {
    for _ in 0..MAX_STEPS {
        if u.is_empty() {
            break;
        }
        let client = *u.choose(&r.clients)?;
        match u.int_in_range(0..=9u8)? {
            0 => {
                let len = u.int_in_range(0..=256usize)?;
                let bytes = u.bytes(len.min(u.len()))?.to_vec();
                r.client_packet(client, &bytes, None);
            }
            1 => {
                // Unauthenticated Allocate: the 401 gives the NONCE.
                let req = request(r, Method::ALLOCATE, None, |b| {
                    b.requested_transport(17);
                });
                r.client_packet(client, &req, None);
            }
            2..=5 => signed(r, u, client)?,
            6 => {
                let ch = *u.choose(&CHANNELS)?;
                let len = u.int_in_range(0..=1500usize)?;
                let mut v = Vec::new();
                stun::write_channel_data(&mut v, ch, &vec![0xab; len], u.arbitrary()?);
                r.client_packet(client, &v, None);
            }
            7 => {
                let peer: SocketAddr = u.choose(&PEERS)?.parse().expect("peer");
                let len = u.int_in_range(0..=1500usize)?;
                let payload = vec![0xcd; len];
                let tid = next_tid(r);
                let mut v = Vec::new();
                let mut b = MessageBuilder::new(
                    &mut v,
                    MessageType::new(Method::SEND, Class::Indication),
                    tid,
                );
                b.xor_address(attr::XOR_PEER_ADDRESS, peer).data(&payload);
                if b.finish().is_ok() {
                    r.client_packet(client, &v, None);
                }
            }
            8 => {
                let open: Vec<u64> = r.sockets.lock().open.iter().copied().collect();
                let relay = match u.choose(&open) {
                    Ok(&id) => RelayId(id),
                    Err(_) => RelayId(u.arbitrary()?),
                };
                let peer: SocketAddr = u.choose(&PEERS)?.parse().expect("peer");
                let len = u.int_in_range(0..=70_000usize)?;
                let payload = vec![0x5a; len];
                let now = r.now();
                match r.engine.on_peer(relay, peer, &payload, now, &mut r.out) {
                    PeerAction::None => {}
                    PeerAction::ToClient { client } => {
                        assert!(r.model.contains_key(&client), "data for no allocation");
                        match stun::classify(&r.out) {
                            PacketKind::ChannelData => {
                                let (_, p) = stun::parse_channel_data(&r.out).expect("ours");
                                assert_eq!(p, &payload[..]);
                            }
                            PacketKind::Stun => {
                                let m = Message::parse(&r.out).expect("Data indication parses");
                                assert_eq!(m.method(), Method::DATA);
                                assert_eq!(m.get(attr::DATA).map(|d| d.value), Some(&payload[..]));
                            }
                            PacketKind::Other => panic!("garbage to the client"),
                        }
                    }
                }
                r.check_model();
            }
            _ => {
                if u.arbitrary()? {
                    r.engine.on_client_closed(client);
                    r.model.remove(&client);
                } else {
                    r.elapsed += Duration::from_secs(*u.choose(&STEPS)?);
                    let (now, elapsed) = (r.now(), r.elapsed);
                    r.engine.expire(now);
                    r.model.retain(|_, (_, exp)| *exp > elapsed);
                }
                r.check_model();
            }
        }
    }
    Ok(())
}

fn next_tid(r: &mut Run) -> TransactionId {
    r.tid = r.tid.wrapping_add(1);
    TransactionId([r.tid; 12])
}

/// A request of `method`, with whatever `attrs` adds, signed with `key` if given (the caller adds
/// the credential attributes first).
fn request(
    r: &mut Run,
    method: Method,
    key: Option<(&LongTermKey, bool)>,
    attrs: impl FnOnce(&mut MessageBuilder<'_>),
) -> Vec<u8> {
    let tid = next_tid(r);
    let mut v = Vec::new();
    let mut b = MessageBuilder::new(&mut v, MessageType::new(method, Class::Request), tid);
    attrs(&mut b);
    match key {
        Some((k, true)) => {
            b.integrity_sha256(k.as_bytes());
        }
        Some((k, false)) => {
            b.integrity(k.as_bytes());
        }
        None => {}
    }
    b.fingerprint();
    let _ = b.finish();
    v
}

/// A request signed with real (or deliberately wrong) credentials and the engine's NONCE.
fn signed(r: &mut Run, u: &mut Unstructured<'_>, client: ClientId) -> ArbResult<()> {
    let method = *u.choose(&[
        Method::ALLOCATE,
        Method::REFRESH,
        Method::CREATE_PERMISSION,
        Method::CHANNEL_BIND,
        Method::BINDING,
        Method(0x00a),
    ])?;
    let user = u.choose(&r.users)?.clone();
    let (nonce, algs) = match r.nonces.get(&client.remote.ip()) {
        Some(n) if u.ratio(7, 8)? => n.clone(),
        _ => (u.choose(&["", "obMatJos2AAAB", "x"])?.to_string(), None),
    };
    // The client's choice of algorithm: what the challenge offered (RFC 8489 §9.2.4), or not.
    let alg = match u.int_in_range(0..=3u8)? {
        0 => None,
        1 => Some(PasswordAlgorithm::Md5),
        _ => Some(PasswordAlgorithm::Sha256),
    };
    let echo_algs = u.ratio(3, 4)?;
    let sha256 = u.arbitrary()?;
    let Ok(key) = LongTermKey::derive(
        alg.unwrap_or(PasswordAlgorithm::Md5),
        &user.name,
        REALM,
        &user.password,
    ) else {
        return Ok(());
    };
    // USERHASH instead of USERNAME (RFC 8489 §14.4): finds static users only.
    let hashed = u.ratio(1, 4)?;
    let peer: SocketAddr = u.choose(&PEERS)?.parse().expect("peer");
    let peer2: SocketAddr = u.choose(&PEERS)?.parse().expect("peer");
    let ch = *u.choose(&CHANNELS)?;
    let lifetime = if u.arbitrary()? {
        Some(*u.choose(&LIFETIMES)?)
    } else {
        None
    };
    let transport = *u.choose(&[17u8, 17, 6])?;
    let even = u.int_in_range(0..=2u8)?;
    let token = if u.ratio(1, 4)? {
        u.choose(&r.tokens).ok().copied()
    } else {
        None
    };
    let family = u.int_in_range(0..=3u8)?;
    let two_peers = u.arbitrary()?;
    let realm = if u.ratio(15, 16)? { REALM } else { "other" };
    r.last_user = rest_user(&user.name).unwrap_or(&user.name).to_owned();
    let req = request(r, method, Some((&key, sha256)), |b| {
        if method == Method::ALLOCATE {
            b.requested_transport(transport);
            match even {
                1 => {
                    b.raw(attr::EVEN_PORT, &[0]);
                }
                2 => {
                    b.raw(attr::EVEN_PORT, &[0x80]);
                }
                _ => {}
            }
            if let Some(t) = token {
                b.raw(attr::RESERVATION_TOKEN, &t);
            }
        }
        match family {
            1 => {
                b.requested_address_family(stun::AddressFamily::V4);
            }
            2 => {
                b.requested_address_family(stun::AddressFamily::V6);
            }
            _ => {}
        }
        if let Some(l) = lifetime {
            b.u32_value(attr::LIFETIME, l);
        }
        if method == Method::CHANNEL_BIND {
            b.channel_number(ch);
        }
        if method == Method::CREATE_PERMISSION || method == Method::CHANNEL_BIND {
            b.xor_address(attr::XOR_PEER_ADDRESS, peer);
            if two_peers {
                b.xor_address(attr::XOR_PEER_ADDRESS, peer2);
            }
        }
        match stun::userhash(&user.name, realm) {
            Ok(hash) if hashed => {
                b.raw(attr::USERHASH, &hash);
            }
            _ => {
                b.text(attr::USERNAME, &user.name);
            }
        }
        b.text(attr::REALM, realm).text(attr::NONCE, &nonce);
        if echo_algs && let Some(a) = &algs {
            b.raw(attr::PASSWORD_ALGORITHMS, a);
        }
        if let Some(a) = alg {
            let [hi, lo] = a.code().to_be_bytes();
            b.raw(attr::PASSWORD_ALGORITHM, &[hi, lo, 0, 0]);
        }
    });
    r.client_packet(client, &req, Some(&key));
    Ok(())
}

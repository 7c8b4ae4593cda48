//! The sans-IO TURN allocation engine (RFC 8656): packets, `now` and wall time in; replies and
//! relay decisions out. It never touches a socket or a clock: relay sockets are opened and closed
//! through [`RelaySockets`], implemented by the Tokio layer (`server.rs`) and faked in tests.
//!
//! Shared by the receive loops of both cores, so every method takes `&self`: allocations live in a
//! [`DashMap`] keyed by the client's 5-tuple, with a second index from relay socket to 5-tuple.
//! No guard of one map is held while another map is locked, so there is no lock ordering to get
//! wrong. The relay paths (ChannelData, Send and Data indications) allocate nothing per packet:
//! they look up `(5-tuple, channel)` or `(relay, peer)`, write into the caller's `out` buffer and
//! return byte ranges of the caller's input; their counters are summed per allocation and
//! published to `metrics` once a second by [`Engine::expire`].

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use super::auth::{Credentials, FailureLimiter, NonceError, Nonces, rest_user};
use super::peer::PeerFilter;
use super::stun::{
    self, AddressFamily, Attribute, Class, LongTermKey, Message, MessageBuilder, MessageType,
    Method, PacketKind, PasswordAlgorithm, TransactionId, attr, code, feature,
};

/// Permission lifetime (RFC 8656 §9: 300 s, not refreshed by data).
pub const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);
/// Channel binding lifetime (RFC 8656 §12: 600 s).
pub const CHANNEL_LIFETIME: Duration = Duration::from_secs(600);
/// After a binding expires, its channel and peer stay reserved this long (RFC 8656 §12: 5 min),
/// so a late ChannelData cannot reach a different peer.
const CHANNEL_COOLDOWN: Duration = Duration::from_secs(300);
/// IANA protocol number of UDP, the only relayed transport (RFC 8656 §7.2, REQUESTED-TRANSPORT).
const PROTO_UDP: u8 = 17;
/// How long a port reserved by EVEN-PORT (R bit) waits for its RESERVATION-TOKEN (RFC 8656 §7.2
/// suggests about 30 s).
const RESERVATION_LIFETIME: Duration = Duration::from_secs(30);
/// Relay sockets opened looking for an even port before giving up with 508 (each try has even
/// odds, so 16 fail once in 65,536).
const EVEN_PORT_TRIES: usize = 16;
/// Permissions per allocation; a CreatePermission beyond this gets 508. Data towards the client is
/// checked against every permission, so the list stays short.
const MAX_PERMISSIONS: usize = 128;
/// The PASSWORD-ALGORITHMS value of every challenge (RFC 8489 §14.11): SHA-256 first, the
/// server's preference, then MD5 for RFC 5389 clients; both without parameters (§18.5.1). A
/// request must echo it byte for byte when it names a PASSWORD-ALGORITHM (§9.2.4), which is what
/// stops a man in the middle from bidding the client down to MD5.
const OFFERED_ALGORITHMS: [u8; 8] = [0x00, 0x02, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00];

/// How a client reaches the TURN server (the relayed side is always UDP).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
}

/// The client's 5-tuple (RFC 8656 §2): one allocation at most per 5-tuple.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientId {
    pub transport: Transport,
    pub remote: SocketAddr,
    pub local: SocketAddr,
}

/// What the engine enforces; from `[turn]`.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// REALM of the long-term credentials (RFC 8489 §9.2).
    pub realm: String,
    /// SOFTWARE in Allocate success answers (never in error answers: no amplification).
    pub software: Option<String>,
    /// Address relay sockets bind to.
    pub relay_ip: IpAddr,
    /// Address announced in XOR-RELAYED-ADDRESS when the box sits behind NAT.
    pub advertised_ip: Option<IpAddr>,
    /// Lifetime granted when the client asks for none or for less (RFC 8656 §7.2: 600 s).
    pub default_lifetime: Duration,
    pub max_lifetime: Duration,
    /// Allocations server-wide (508 beyond).
    pub max_allocations: usize,
    /// Allocations per user (486 beyond); a REST username `EXPIRY:USER` counts as `USER`.
    pub max_allocations_per_user: usize,
    /// Relayed bytes per second per allocation and direction; 0 = unlimited. Excess is dropped.
    pub max_bandwidth: u64,
}

/// Opens and closes relay sockets for the engine (implemented by the Tokio layer; tests use a fake).
pub trait RelaySockets: Send + Sync {
    /// Binds a new UDP relay socket on `ip`; returns its id and bound address.
    fn open(&self, ip: IpAddr) -> std::io::Result<(RelayId, SocketAddr)>;
    /// Closes a relay socket (its allocation is gone).
    fn close(&self, id: RelayId);
    /// Binds a relay socket on a given port: the odd port reserved next to an even one for
    /// EVEN-PORT with the R bit (RFC 8656 §7.2, an RTP/RTCP pair). Without it such requests get
    /// 508.
    fn open_port(&self, ip: IpAddr, port: u16) -> std::io::Result<(RelayId, SocketAddr)> {
        let _ = (ip, port);
        Err(std::io::ErrorKind::Unsupported.into())
    }

    /// Like [`RelaySockets::open`], preferring an even port (EVEN-PORT); the engine still checks
    /// the parity and retries, so the default (any port) is correct, only slower.
    fn open_even(&self, ip: IpAddr) -> std::io::Result<(RelayId, SocketAddr)> {
        self.open(ip)
    }
}

/// A relay socket, as named by [`RelaySockets::open`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RelayId(pub u64);

/// What to do after [`Engine::on_client`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientAction {
    /// Nothing to send.
    None,
    /// Send `out` to the client.
    Reply,
    /// Send `data[payload]` from relay socket `relay` to `peer` (ChannelData and Send
    /// indications: zero-copy).
    Relay {
        relay: RelayId,
        peer: SocketAddr,
        payload: Range<usize>,
    },
}

/// What to do after [`Engine::on_peer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerAction {
    /// Drop the datagram.
    None,
    /// Send `out` (a ChannelData message or a Data indication) to the client.
    ToClient { client: ClientId },
}

/// Token bucket in bytes; refilled from the `now` the caller passes.
#[derive(Debug)]
struct Bucket {
    tokens: u64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u64, now: Instant) -> Self {
        Self {
            tokens: Self::capacity(rate),
            last: now,
        }
    }

    /// One second of traffic, but at least two maximal datagrams so any packet can pass.
    fn capacity(rate: u64) -> u64 {
        rate.max(2 * 65_536)
    }

    fn take(&mut self, n: usize, rate: u64, now: Instant) -> bool {
        if rate == 0 {
            return true;
        }
        let cap = Self::capacity(rate);
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        let add = elapsed.saturating_mul(u128::from(rate)) / 1_000_000_000;
        // Advance the clock only when whole bytes were added, so frequent small calls still
        // accumulate credit.
        if add > 0 {
            self.tokens = u64::try_from(u128::from(self.tokens) + add)
                .unwrap_or(u64::MAX)
                .min(cap);
            self.last = now;
        }
        let n = n as u64;
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

/// Relay counters of one allocation, published by [`Engine::expire`].
#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    to_peer_packets: u64,
    to_peer_bytes: u64,
    to_client_packets: u64,
    to_client_bytes: u64,
    dropped_bandwidth: u64,
    dropped_no_permission: u64,
    refused_peers: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.to_peer_packets += o.to_peer_packets;
        self.to_peer_bytes += o.to_peer_bytes;
        self.to_client_packets += o.to_client_packets;
        self.to_client_bytes += o.to_client_bytes;
        self.dropped_bandwidth += o.dropped_bandwidth;
        self.dropped_no_permission += o.dropped_no_permission;
        self.refused_peers += o.refused_peers;
    }

    fn publish(&self) {
        let c = |name: &'static str, labels: &[(&'static str, &'static str)], v: u64| {
            if v > 0 {
                metrics::counter!(name, labels).increment(v);
            }
        };
        let to_peer = [("direction", "to_peer")];
        let to_client = [("direction", "to_client")];
        c(
            "tern_turn_relayed_packets_total",
            &to_peer,
            self.to_peer_packets,
        );
        c(
            "tern_turn_relayed_bytes_total",
            &to_peer,
            self.to_peer_bytes,
        );
        c(
            "tern_turn_relayed_packets_total",
            &to_client,
            self.to_client_packets,
        );
        c(
            "tern_turn_relayed_bytes_total",
            &to_client,
            self.to_client_bytes,
        );
        c(
            "tern_turn_dropped_total",
            &[("reason", "bandwidth")],
            self.dropped_bandwidth,
        );
        c(
            "tern_turn_dropped_total",
            &[("reason", "no_permission")],
            self.dropped_no_permission,
        );
        c("tern_turn_refused_peers_total", &[], self.refused_peers);
    }
}

#[derive(Debug, Clone, Copy)]
struct Channel {
    peer: SocketAddr,
    expires: Instant,
}

/// One allocation (RFC 8656 §2.2).
#[derive(Debug)]
struct Allocation {
    relay: RelayId,
    family: AddressFamily,
    username: Box<str>,
    quota_user: Box<str>,
    key: LongTermKey,
    expires: Instant,
    /// Peer IP → expiry. Short (see [`MAX_PERMISSIONS`]), so a scan beats hashing.
    permissions: Vec<(IpAddr, Instant)>,
    /// Channel → binding, including bindings cooling down after expiry.
    channels: HashMap<u16, Channel>,
    /// Peer transport address → channel.
    by_peer: HashMap<SocketAddr, u16>,
    /// The Allocate this allocation answered and the answer, resent on retransmission (§7.2).
    allocate_tid: TransactionId,
    allocate_reply: Box<[u8]>,
    up: Bucket,
    down: Bucket,
    stats: Stats,
}

impl Allocation {
    fn permitted(&self, ip: IpAddr, now: Instant) -> bool {
        self.permissions
            .iter()
            .any(|&(p, exp)| p == ip && exp > now)
    }

    fn channel(&self, ch: u16, now: Instant) -> Option<SocketAddr> {
        self.channels
            .get(&ch)
            .filter(|c| c.expires > now)
            .map(|c| c.peer)
    }

    fn channel_for(&self, peer: &SocketAddr, now: Instant) -> Option<u16> {
        let ch = *self.by_peer.get(peer)?;
        self.channel(ch, now).map(|_| ch)
    }

    /// Installs or refreshes a permission; `false` when the list is full.
    fn permit(&mut self, ip: IpAddr, now: Instant) -> bool {
        let expires = now + PERMISSION_LIFETIME;
        if let Some(p) = self.permissions.iter_mut().find(|(p, _)| *p == ip) {
            p.1 = expires;
            return true;
        }
        self.permissions.retain(|&(_, exp)| exp > now);
        if self.permissions.len() >= MAX_PERMISSIONS {
            return false;
        }
        self.permissions.push((ip, expires));
        true
    }

    fn prune(&mut self, now: Instant) {
        self.permissions.retain(|&(_, exp)| exp > now);
        let by_peer = &mut self.by_peer;
        self.channels.retain(|_, c| {
            let keep = c.expires + CHANNEL_COOLDOWN > now;
            if !keep {
                by_peer.remove(&c.peer);
            }
            keep
        });
    }
}

/// A request that proved its credentials (RFC 8489 §9.2.4).
struct Auth<'m> {
    /// USERNAME, or the static user a USERHASH named.
    username: Cow<'m, str>,
    key: LongTermKey,
    /// Answer with MESSAGE-INTEGRITY-SHA256 (the request used it) rather than MESSAGE-INTEGRITY.
    sha256: bool,
}

/// The TURN server's state and decisions. See the module docs.
pub struct Engine {
    cfg: EngineConfig,
    creds: Arc<Credentials>,
    nonces: Nonces,
    limiter: FailureLimiter,
    peers: PeerFilter,
    relays: Arc<dyn RelaySockets>,
    allocations: DashMap<ClientId, Allocation>,
    by_relay: DashMap<RelayId, ClientId>,
    per_user: DashMap<Box<str>, usize>,
    /// RESERVATION-TOKEN → the reserved relay socket and when the reservation lapses.
    reservations: DashMap<[u8; 8], (RelayId, SocketAddr, Instant)>,
    count: AtomicUsize,
}

/// Peers are compared and relayed to in canonical form: an IPv4-mapped IPv6 address is the IPv4
/// host (a relay socket of one family sees the other's peers only in that form).
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// RFC 8656 §7.2: the smaller of the requested and the maximum lifetime, but not below the default.
fn granted_lifetime(cfg: &EngineConfig, requested: Option<u32>) -> Duration {
    let default = cfg.default_lifetime.min(cfg.max_lifetime);
    match requested {
        None => default,
        Some(s) => Duration::from_secs(u64::from(s))
            .min(cfg.max_lifetime)
            .max(default),
    }
}

/// The name per-user quotas count: `USER` of a REST username `EXPIRY:USER` (fresh credentials
/// are still the same user), else the whole username.
fn quota_user(username: &str) -> &str {
    rest_user(username).unwrap_or(username)
}

impl Engine {
    pub fn new(
        cfg: EngineConfig,
        creds: Arc<Credentials>,
        nonces: Nonces,
        limiter: FailureLimiter,
        peers: PeerFilter,
        relays: Arc<dyn RelaySockets>,
    ) -> Self {
        // Username anonymity (RFC 8489 §9.2.1) makes clients send USERHASH, which finds static
        // users only: a REST username embeds its expiry, so it cannot be looked up by hash.
        let nonces = if creds.can_mint() || !creds.has_static_users() {
            nonces
        } else {
            let features = nonces.features() | feature::USERNAME_ANONYMITY;
            nonces.with_features(features)
        };
        Self {
            cfg,
            creds,
            nonces,
            limiter,
            peers,
            relays,
            allocations: DashMap::new(),
            by_relay: DashMap::new(),
            per_user: DashMap::new(),
            reservations: DashMap::new(),
            count: AtomicUsize::new(0),
        }
    }

    /// Allocations at present.
    pub fn allocation_count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// A STUN message or ChannelData frame from a client. `out` is cleared and gets the reply to
    /// send back to the client (if any).
    pub fn on_client(
        &self,
        client: ClientId,
        data: &[u8],
        now: Instant,
        wall: SystemTime,
        out: &mut Vec<u8>,
    ) -> ClientAction {
        out.clear();
        match stun::classify(data) {
            PacketKind::ChannelData => self.client_channel_data(client, data, now),
            PacketKind::Stun => self.client_stun(client, data, now, wall, out),
            PacketKind::Other => ClientAction::None,
        }
    }

    /// A datagram from `peer` arrived on relay socket `relay`. `out` is cleared and gets the
    /// ChannelData message or Data indication for the client.
    pub fn on_peer(
        &self,
        relay: RelayId,
        peer: SocketAddr,
        data: &[u8],
        now: Instant,
        out: &mut Vec<u8>,
    ) -> PeerAction {
        out.clear();
        let Some(client) = self.by_relay.get(&relay).map(|c| *c) else {
            return PeerAction::None;
        };
        let Some(mut a) = self.allocations.get_mut(&client) else {
            return PeerAction::None;
        };
        let peer = canonical(peer);
        // RFC 8656 §9: only peers the client gave a permission to reach it.
        if !a.permitted(peer.ip(), now) {
            a.stats.dropped_no_permission += 1;
            return PeerAction::None;
        }
        let rate = self.cfg.max_bandwidth;
        if !a.down.take(data.len(), rate, now) {
            a.stats.dropped_bandwidth += 1;
            return PeerAction::None;
        }
        // Prefer ChannelData when a channel is bound (RFC 8656 §12.7); pad over streams (§12.5).
        let written = match a.channel_for(&peer, now) {
            Some(ch) => stun::write_channel_data(out, ch, data, client.transport != Transport::Udp),
            None => {
                let tid = TransactionId(rand::random());
                let mut b = MessageBuilder::new(
                    out,
                    MessageType::new(Method::DATA, Class::Indication),
                    tid,
                );
                b.xor_address(attr::XOR_PEER_ADDRESS, peer).data(data);
                b.finish().ok()
            }
        };
        if written.is_none() {
            out.clear();
            return PeerAction::None;
        }
        a.stats.to_client_packets += 1;
        a.stats.to_client_bytes += data.len() as u64;
        PeerAction::ToClient { client }
    }

    /// Drops expired allocations (closing their relay sockets), permissions and channel bindings,
    /// and publishes the relay counters. Call about once a second.
    pub fn expire(&self, now: Instant) {
        let mut gone: Vec<(RelayId, Box<str>)> = Vec::new();
        let mut stats = Stats::default();
        let (mut permissions, mut channels) = (0usize, 0usize);
        self.allocations.retain(|_, a| {
            stats.add(&a.stats);
            a.stats = Stats::default();
            if a.expires <= now {
                gone.push((a.relay, std::mem::take(&mut a.quota_user)));
                return false;
            }
            a.prune(now);
            permissions += a.permissions.len();
            channels += a.channels.values().filter(|c| c.expires > now).count();
            true
        });
        for (relay, user) in gone {
            self.released(relay, &user);
        }
        let mut lapsed = Vec::new();
        self.reservations.retain(|_, &mut (relay, _, expires)| {
            let keep = expires > now;
            if !keep {
                lapsed.push(relay);
            }
            keep
        });
        for relay in lapsed {
            self.relays.close(relay);
        }
        stats.publish();
        metrics::gauge!("tern_turn_permissions").set(permissions as f64);
        metrics::gauge!("tern_turn_channels").set(channels as f64);
        metrics::gauge!("tern_turn_allocations").set(self.allocation_count() as f64);
    }

    /// A TCP/TLS client connection closed: its allocation goes (RFC 8656 §3.1, RFC 6062).
    pub fn on_client_closed(&self, client: ClientId) {
        self.delete(&client);
    }

    fn delete(&self, client: &ClientId) {
        if let Some((_, a)) = self.allocations.remove(client) {
            a.stats.publish();
            self.released(a.relay, &a.quota_user);
        }
    }

    /// Bookkeeping after an allocation left the map.
    fn released(&self, relay: RelayId, user: &str) {
        self.by_relay.remove(&relay);
        self.relays.close(relay);
        self.release_quota(user);
        self.count.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!("tern_turn_allocations").set(self.allocation_count() as f64);
    }

    fn release_quota(&self, user: &str) {
        if let Entry::Occupied(mut e) = self.per_user.entry(user.into()) {
            *e.get_mut() = e.get().saturating_sub(1);
            if *e.get() == 0 {
                e.remove();
            }
        }
    }

    /// ChannelData from the client (RFC 8656 §12.6): relay to the bound peer.
    fn client_channel_data(&self, client: ClientId, data: &[u8], now: Instant) -> ClientAction {
        let Some((ch, payload)) = stun::parse_channel_data(data) else {
            return ClientAction::None;
        };
        let Some(mut a) = self.allocations.get_mut(&client) else {
            metrics::counter!("tern_turn_dropped_total", "reason" => "no_permission").increment(1);
            return ClientAction::None;
        };
        let Some(peer) = a.channel(ch, now) else {
            a.stats.dropped_no_permission += 1;
            return ClientAction::None;
        };
        self.relay_to_peer(
            &mut a,
            peer,
            stun::CHANNEL_DATA_HEADER_LEN,
            payload.len(),
            now,
        )
    }

    /// The checks every client → peer path shares: permission, peer filter, bandwidth.
    fn relay_to_peer(
        &self,
        a: &mut Allocation,
        peer: SocketAddr,
        offset: usize,
        len: usize,
        now: Instant,
    ) -> ClientAction {
        if !a.permitted(peer.ip(), now) {
            a.stats.dropped_no_permission += 1;
            return ClientAction::None;
        }
        if !self.peers.permits(peer.ip()) {
            a.stats.refused_peers += 1;
            return ClientAction::None;
        }
        if !a.up.take(len, self.cfg.max_bandwidth, now) {
            a.stats.dropped_bandwidth += 1;
            return ClientAction::None;
        }
        a.stats.to_peer_packets += 1;
        a.stats.to_peer_bytes += len as u64;
        ClientAction::Relay {
            relay: a.relay,
            peer,
            payload: offset..offset + len,
        }
    }

    fn client_stun(
        &self,
        client: ClientId,
        data: &[u8],
        now: Instant,
        wall: SystemTime,
        out: &mut Vec<u8>,
    ) -> ClientAction {
        // Malformed STUN is silently discarded (RFC 8489 §6.3), as is a bad FINGERPRINT (§7.3).
        let Ok(msg) = Message::parse(data) else {
            return ClientAction::None;
        };
        if msg.has_fingerprint() && !msg.check_fingerprint() {
            return ClientAction::None;
        }
        match msg.class() {
            Class::Indication => {
                // Unknown comprehension-required attributes: drop the indication (§6.3.2).
                if msg.method() == Method::SEND && !msg.has_unknown_required() {
                    self.send_indication(client, &msg, now)
                } else {
                    ClientAction::None
                }
            }
            Class::Request => {
                if msg.has_unknown_required() {
                    return self.reject_unknown(client, &msg, now, out);
                }
                match msg.method() {
                    Method::BINDING => self.binding(client, &msg, out),
                    Method::ALLOCATE => self.allocate(client, &msg, now, wall, out),
                    Method::REFRESH => self.refresh(client, &msg, now, wall, out),
                    Method::CREATE_PERMISSION => {
                        self.create_permission(client, &msg, now, wall, out)
                    }
                    Method::CHANNEL_BIND => self.channel_bind(client, &msg, now, wall, out),
                    _ => self.reject(client, &msg, code::BAD_REQUEST, false, now, wall, out),
                }
            }
            // Responses: a server sends no requests.
            Class::Success | Class::Error => ClientAction::None,
        }
    }

    /// Binding (RFC 8489 §6.3.1): the client's reflexive address, to anyone. No SOFTWARE, so
    /// the answer is barely larger than the request.
    fn binding(&self, client: ClientId, msg: &Message<'_>, out: &mut Vec<u8>) -> ClientAction {
        let mut b = MessageBuilder::new(
            out,
            MessageType::new(Method::BINDING, Class::Success),
            msg.transaction_id(),
        );
        b.xor_address(attr::XOR_MAPPED_ADDRESS, client.remote);
        if msg.has_fingerprint() {
            b.fingerprint();
        }
        finish(b)
    }

    /// An error answer to a request that did not authenticate: small (ERROR-CODE, and REALM with
    /// a fresh NONCE for 401), and rate-limited per source address (over the limit: nothing).
    #[allow(clippy::too_many_arguments)]
    fn reject(
        &self,
        client: ClientId,
        msg: &Message<'_>,
        err: u16,
        challenge: bool,
        now: Instant,
        wall: SystemTime,
        out: &mut Vec<u8>,
    ) -> ClientAction {
        if !self.limiter.allow(client.remote.ip(), now) {
            metrics::counter!("tern_turn_dropped_total", "reason" => "rate_limit").increment(1);
            return ClientAction::None;
        }
        let mut b = MessageBuilder::new(
            out,
            MessageType::new(msg.method(), Class::Error),
            msg.transaction_id(),
        );
        b.error_code(err, code::reason(err));
        if challenge {
            self.challenge(&mut b, client.remote.ip(), wall);
        }
        if msg.has_fingerprint() {
            b.fingerprint();
        }
        finish(b)
    }

    fn reject_unknown(
        &self,
        client: ClientId,
        msg: &Message<'_>,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> ClientAction {
        if !self.limiter.allow(client.remote.ip(), now) {
            metrics::counter!("tern_turn_dropped_total", "reason" => "rate_limit").increment(1);
            return ClientAction::None;
        }
        let mut b = MessageBuilder::new(
            out,
            MessageType::new(msg.method(), Class::Error),
            msg.transaction_id(),
        );
        b.error_code(
            code::UNKNOWN_ATTRIBUTE,
            code::reason(code::UNKNOWN_ATTRIBUTE),
        )
        .unknown_attributes(msg.unknown_required());
        if msg.has_fingerprint() {
            b.fingerprint();
        }
        finish(b)
    }

    /// An answer to an authenticated request: integrity-protected with the request's key and
    /// kind of MESSAGE-INTEGRITY, then FINGERPRINT (RFC 8489 §9.2.4).
    fn answer(
        &self,
        msg: &Message<'_>,
        auth: &Auth<'_>,
        err: Option<u16>,
        out: &mut Vec<u8>,
        attrs: impl FnOnce(&mut MessageBuilder<'_>),
    ) -> ClientAction {
        out.clear();
        let class = if err.is_some() {
            Class::Error
        } else {
            Class::Success
        };
        let mut b = MessageBuilder::new(
            out,
            MessageType::new(msg.method(), class),
            msg.transaction_id(),
        );
        if let Some(e) = err {
            b.error_code(e, code::reason(e));
        }
        attrs(&mut b);
        if auth.sha256 {
            b.integrity_sha256(auth.key.as_bytes());
        } else {
            b.integrity(auth.key.as_bytes());
        }
        b.fingerprint();
        finish(b)
    }

    /// REALM and a fresh NONCE for a 401 or 438, with PASSWORD-ALGORITHMS when the NONCE
    /// announces that feature (RFC 8489 §9.2.4: the client echoes the list it was sent).
    fn challenge(&self, b: &mut MessageBuilder<'_>, ip: IpAddr, wall: SystemTime) {
        b.text(attr::REALM, &self.cfg.realm)
            .text(attr::NONCE, &self.nonces.issue(ip, wall));
        if self.nonces.features() & feature::PASSWORD_ALGORITHMS != 0 {
            b.raw(attr::PASSWORD_ALGORITHMS, &OFFERED_ALGORITHMS);
        }
    }

    /// The key derivation a request asks for (RFC 8489 §9.2.4): under a NONCE whose cookie
    /// announces password algorithms, a request names none (MD5, an RFC 5389 client) or names one
    /// of the offered ones and echoes PASSWORD-ALGORITHMS unchanged; otherwise PASSWORD-ALGORITHM
    /// alone decides (as in the RFC 8489 Appendix B.1 vector). `None`: answer 400.
    fn password_algorithm(msg: &Message<'_>, nonce: &str) -> Option<PasswordAlgorithm> {
        let named = match msg.decode(attr::PASSWORD_ALGORITHM) {
            Ok(None) => None,
            Ok(Some(Attribute::PasswordAlgorithm { algorithm, .. })) => {
                Some(PasswordAlgorithm::from_code(algorithm)?)
            }
            _ => return None,
        };
        let negotiated =
            stun::security_features(nonce).is_some_and(|f| f & feature::PASSWORD_ALGORITHMS != 0);
        if !negotiated {
            return Some(named.unwrap_or(PasswordAlgorithm::Md5));
        }
        match (msg.get(attr::PASSWORD_ALGORITHMS), named) {
            (None, None) => Some(PasswordAlgorithm::Md5),
            // Every algorithm `from_code` knows is offered.
            (Some(listed), Some(alg)) if listed.value == OFFERED_ALGORITHMS => Some(alg),
            _ => None,
        }
    }

    /// Long-term credential check (RFC 8489 §9.2.4), in the RFC's order: integrity present (else
    /// 401), USERNAME or USERHASH, REALM and NONCE present (else 400), the password algorithm
    /// (400), a known user and a matching MESSAGE-INTEGRITY(-SHA256) (401), a fresh NONCE (438).
    /// `Err` carries the action to return (the answer, or nothing when rate-limited).
    fn authenticate<'m>(
        &self,
        client: ClientId,
        msg: &Message<'m>,
        now: Instant,
        wall: SystemTime,
        out: &mut Vec<u8>,
    ) -> Result<Auth<'m>, ClientAction> {
        let ip = client.remote.ip();
        let signed = msg.has_integrity() || msg.has_integrity_sha256();
        // A 401 is a challenge; to a signed request it is also a failed authentication.
        let reject = |err: u16, out: &mut Vec<u8>| {
            let challenge = err == code::UNAUTHENTICATED;
            if challenge && signed {
                metrics::counter!("tern_turn_auth_failures_total").increment(1);
            }
            Err(self.reject(client, msg, err, challenge, now, wall, out))
        };
        if !signed {
            // The normal first round trip: challenge with REALM and NONCE.
            return reject(code::UNAUTHENTICATED, out);
        }
        let (Ok(Some(realm)), Ok(Some(nonce))) = (msg.text(attr::REALM), msg.text(attr::NONCE))
        else {
            return reject(code::BAD_REQUEST, out);
        };
        let claimed = match (msg.text(attr::USERNAME), msg.decode(attr::USERHASH)) {
            (Ok(Some(name)), _) => Ok(name),
            (Ok(None), Ok(Some(Attribute::UserHash(hash)))) => Err(hash),
            _ => return reject(code::BAD_REQUEST, out),
        };
        let Some(alg) = Self::password_algorithm(msg, nonce) else {
            return reject(code::BAD_REQUEST, out);
        };
        if realm != self.cfg.realm {
            return reject(code::UNAUTHENTICATED, out);
        }
        let username = match claimed {
            Ok(name) => Cow::Borrowed(name),
            Err(hash) => match self.creds.user_by_hash(hash, realm) {
                Some(name) => Cow::Owned(name.to_owned()),
                None => return reject(code::UNAUTHENTICATED, out),
            },
        };
        let sha256 = msg.has_integrity_sha256();
        // Every candidate password (secret rotation); the HMAC comparisons are constant-time.
        // A credential that is no valid OpaqueString has no key and never matches.
        let key = self
            .creds
            .passwords(&username, wall)
            .iter()
            .filter_map(|pw| LongTermKey::derive(alg, &username, realm, pw).ok())
            .find(|k| {
                if sha256 {
                    msg.check_integrity_sha256(k.as_bytes())
                } else {
                    msg.check_integrity(k.as_bytes())
                }
            });
        let Some(key) = key else {
            return reject(code::UNAUTHENTICATED, out);
        };
        let auth = Auth {
            username,
            key,
            sha256,
        };
        match self.nonces.check(nonce, ip, wall) {
            Ok(()) => Ok(auth),
            Err(NonceError::Stale) => {
                // The client holds the key: answer integrity-protected with a fresh NONCE.
                Err(self.answer(msg, &auth, Some(code::STALE_NONCE), out, |b| {
                    self.challenge(b, ip, wall);
                }))
            }
            Err(NonceError::Invalid) => reject(code::UNAUTHENTICATED, out),
        }
    }

    /// Checks the request's credentials are the allocation's (RFC 8656 §5: else 441).
    fn same_credentials(a: &Allocation, auth: &Auth<'_>) -> bool {
        *a.username == *auth.username && a.key.ct_eq(&auth.key)
    }

    /// The allocation of `client` for a request authenticated as `auth`: 437 without one, 441
    /// when the credentials are not the allocation's own (RFC 8656 §5).
    fn own_allocation<'s>(
        &'s self,
        client: ClientId,
        msg: &Message<'_>,
        auth: &Auth<'_>,
        out: &mut Vec<u8>,
    ) -> Result<dashmap::mapref::one::RefMut<'s, ClientId, Allocation>, ClientAction> {
        let Some(a) = self.allocations.get_mut(&client) else {
            return Err(self.answer(msg, auth, Some(code::ALLOCATION_MISMATCH), out, |_| {}));
        };
        if !Self::same_credentials(&a, auth) {
            drop(a);
            metrics::counter!("tern_turn_auth_failures_total").increment(1);
            return Err(self.answer(msg, auth, Some(code::WRONG_CREDENTIALS), out, |_| {}));
        }
        Ok(a)
    }

    /// Allocate (RFC 8656 §7.2).
    fn allocate(
        &self,
        client: ClientId,
        msg: &Message<'_>,
        now: Instant,
        wall: SystemTime,
        out: &mut Vec<u8>,
    ) -> ClientAction {
        // A retransmission of the Allocate that created this allocation gets the same answer,
        // even if its NONCE went stale meanwhile.
        let tid = msg.transaction_id();
        if let Some(a) = self.allocations.get(&client)
            && a.allocate_tid == tid
        {
            out.extend_from_slice(&a.allocate_reply);
            return ClientAction::Reply;
        }
        let auth = match self.authenticate(client, msg, now, wall, out) {
            Ok(a) => a,
            Err(action) => return action,
        };
        let fail = |err: u16, out: &mut Vec<u8>| self.answer(msg, &auth, Some(err), out, |_| {});
        if self.allocations.contains_key(&client) {
            return fail(code::ALLOCATION_MISMATCH, out);
        }
        match msg.get(attr::REQUESTED_TRANSPORT).map(|a| a.value) {
            Some([PROTO_UDP, _, _, _]) => {}
            Some([_, _, _, _]) => return fail(code::UNSUPPORTED_TRANSPORT_PROTOCOL, out),
            _ => return fail(code::BAD_REQUEST, out),
        }
        // EVEN-PORT: `Some(reserve the next port too)`; malformed: 400.
        let even_port = match msg.decode(attr::EVEN_PORT) {
            Ok(Some(stun::Attribute::EvenPort(r))) => Some(r),
            Ok(_) => None,
            Err(_) => return fail(code::BAD_REQUEST, out),
        };
        let token = match msg.decode(attr::RESERVATION_TOKEN) {
            Ok(Some(stun::Attribute::ReservationToken(t))) => Some(t),
            Ok(_) => None,
            Err(_) => return fail(code::BAD_REQUEST, out),
        };
        let family = msg.get(attr::REQUESTED_ADDRESS_FAMILY);
        if token.is_some() && (even_port.is_some() || family.is_some()) {
            return fail(code::BAD_REQUEST, out);
        }
        let relay_family = AddressFamily::of(&self.cfg.relay_ip);
        if let Some(f) = family {
            let wanted = match f.value {
                [1, _, _, _] => Some(AddressFamily::V4),
                [2, _, _, _] => Some(AddressFamily::V6),
                _ => None,
            };
            if wanted != Some(relay_family) {
                return fail(code::ADDRESS_FAMILY_NOT_SUPPORTED, out);
            }
        }
        let lifetime = match msg.u32_value(attr::LIFETIME) {
            Ok(l) => granted_lifetime(&self.cfg, l),
            Err(_) => return fail(code::BAD_REQUEST, out),
        };
        // Quotas: server-wide first (508), then the user's (486).
        let reserved = self
            .count
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.cfg.max_allocations).then_some(n + 1)
            });
        if reserved.is_err() {
            return fail(code::INSUFFICIENT_CAPACITY, out);
        }
        let user = quota_user(&auth.username);
        let user_ok = self.cfg.max_allocations_per_user > 0 && {
            let mut n = self.per_user.entry(user.into()).or_insert(0);
            if *n < self.cfg.max_allocations_per_user {
                *n += 1;
                true
            } else {
                false
            }
        };
        if !user_ok {
            self.count.fetch_sub(1, Ordering::Relaxed);
            return fail(code::ALLOCATION_QUOTA_REACHED, out);
        }
        let opened = match token {
            // A port reserved by an earlier EVEN-PORT; unknown or lapsed tokens get 508 (§7.2).
            Some(t) => self
                .reservations
                .remove(&t)
                .map(|(_, (relay, addr, _))| (relay, addr, None)),
            None => self.open_relay(even_port, now),
        };
        let Some((relay, bound, new_token)) = opened else {
            self.count.fetch_sub(1, Ordering::Relaxed);
            self.release_quota(user);
            return fail(code::INSUFFICIENT_CAPACITY, out);
        };
        let relayed = SocketAddr::new(self.cfg.advertised_ip.unwrap_or(bound.ip()), bound.port());
        let secs = u32::try_from(lifetime.as_secs()).unwrap_or(u32::MAX);
        let reply = self.answer(msg, &auth, None, out, |b| {
            b.xor_address(attr::XOR_RELAYED_ADDRESS, relayed)
                .u32_value(attr::LIFETIME, secs)
                .xor_address(attr::XOR_MAPPED_ADDRESS, client.remote);
            if let Some(t) = &new_token {
                b.raw(attr::RESERVATION_TOKEN, t);
            }
            if let Some(s) = &self.cfg.software {
                b.text(attr::SOFTWARE, s);
            }
        });
        let rate = self.cfg.max_bandwidth;
        let allocation = Allocation {
            relay,
            family: relay_family,
            username: auth.username.as_ref().into(),
            quota_user: user.into(),
            key: auth.key.clone(),
            expires: now + lifetime,
            permissions: Vec::new(),
            channels: HashMap::new(),
            by_peer: HashMap::new(),
            allocate_tid: tid,
            allocate_reply: out.as_slice().into(),
            up: Bucket::new(rate, now),
            down: Bucket::new(rate, now),
            stats: Stats::default(),
        };
        match self.allocations.entry(client) {
            Entry::Vacant(v) => {
                v.insert(allocation);
            }
            Entry::Occupied(_) => {
                // Lost a race with a concurrent Allocate on the same 5-tuple.
                self.relays.close(relay);
                if let Some(t) = new_token
                    && let Some((_, (reserved, _, _))) = self.reservations.remove(&t)
                {
                    self.relays.close(reserved);
                }
                self.count.fetch_sub(1, Ordering::Relaxed);
                self.release_quota(user);
                return fail(code::ALLOCATION_MISMATCH, out);
            }
        }
        self.by_relay.insert(relay, client);
        metrics::counter!("tern_turn_allocations_total").increment(1);
        metrics::gauge!("tern_turn_allocations").set(self.allocation_count() as f64);
        reply
    }

    /// Opens the relay socket of a new allocation. With EVEN-PORT (RFC 8656 §7.2) the port must
    /// be even, and with its R bit the next port is reserved under a new RESERVATION-TOKEN.
    /// `None`: no socket could be had (508).
    fn open_relay(
        &self,
        even_port: Option<bool>,
        now: Instant,
    ) -> Option<(RelayId, SocketAddr, Option<[u8; 8]>)> {
        let ip = self.cfg.relay_ip;
        let tries = if even_port.is_some() {
            EVEN_PORT_TRIES
        } else {
            1
        };
        for _ in 0..tries {
            let opened = if even_port.is_some() {
                self.relays.open_even(ip)
            } else {
                self.relays.open(ip)
            };
            let (relay, addr) = match opened {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!("TURN relay socket on {ip}: {e}");
                    return None;
                }
            };
            let Some(reserve) = even_port else {
                return Some((relay, addr, None));
            };
            if !addr.port().is_multiple_of(2) {
                self.relays.close(relay);
                continue;
            }
            if !reserve {
                return Some((relay, addr, None));
            }
            match self.relays.open_port(ip, addr.port() + 1) {
                Ok((next, next_addr)) => {
                    let token: [u8; 8] = rand::random();
                    self.reservations
                        .insert(token, (next, next_addr, now + RESERVATION_LIFETIME));
                    return Some((relay, addr, Some(token)));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
                    self.relays.close(relay);
                    return None;
                }
                Err(_) => self.relays.close(relay),
            }
        }
        None
    }

    /// Refresh (RFC 8656 §7.3): LIFETIME 0 deletes.
    fn refresh(
        &self,
        client: ClientId,
        msg: &Message<'_>,
        now: Instant,
        wall: SystemTime,
        out: &mut Vec<u8>,
    ) -> ClientAction {
        let auth = match self.authenticate(client, msg, now, wall, out) {
            Ok(a) => a,
            Err(action) => return action,
        };
        let fail = |err: u16, out: &mut Vec<u8>| self.answer(msg, &auth, Some(err), out, |_| {});
        let Ok(requested) = msg.u32_value(attr::LIFETIME) else {
            return fail(code::BAD_REQUEST, out);
        };
        let mut a = match self.own_allocation(client, msg, &auth, out) {
            Ok(a) => a,
            Err(action) => return action,
        };
        if let Some(f) = msg.get(attr::REQUESTED_ADDRESS_FAMILY) {
            let fam = f.value.first().copied();
            let ours = match a.family {
                AddressFamily::V4 => 1,
                AddressFamily::V6 => 2,
            };
            if fam != Some(ours) {
                drop(a);
                return fail(code::PEER_ADDRESS_FAMILY_MISMATCH, out);
            }
        }
        let secs = if requested == Some(0) {
            drop(a);
            self.delete(&client);
            0
        } else {
            let lifetime = granted_lifetime(&self.cfg, requested);
            a.expires = now + lifetime;
            drop(a);
            u32::try_from(lifetime.as_secs()).unwrap_or(u32::MAX)
        };
        self.answer(msg, &auth, None, out, |b| {
            b.u32_value(attr::LIFETIME, secs);
        })
    }

    /// Checks a peer address of CreatePermission/ChannelBind: the peer filter (403), then the
    /// allocation's family (443). Returns the canonical address or the error code.
    fn check_peer(&self, a: &mut Allocation, peer: SocketAddr) -> Result<SocketAddr, u16> {
        let peer = canonical(peer);
        if !self.peers.permits(peer.ip()) {
            a.stats.refused_peers += 1;
            return Err(code::FORBIDDEN);
        }
        if AddressFamily::of(&peer.ip()) != a.family {
            return Err(code::PEER_ADDRESS_FAMILY_MISMATCH);
        }
        Ok(peer)
    }

    /// CreatePermission (RFC 8656 §9.2): all peers or none.
    fn create_permission(
        &self,
        client: ClientId,
        msg: &Message<'_>,
        now: Instant,
        wall: SystemTime,
        out: &mut Vec<u8>,
    ) -> ClientAction {
        let auth = match self.authenticate(client, msg, now, wall, out) {
            Ok(a) => a,
            Err(action) => return action,
        };
        let fail = |err: u16, out: &mut Vec<u8>| self.answer(msg, &auth, Some(err), out, |_| {});
        let mut a = match self.own_allocation(client, msg, &auth, out) {
            Ok(a) => a,
            Err(action) => return action,
        };
        let tid = msg.transaction_id();
        let mut any = false;
        for raw in msg.get_all(attr::XOR_PEER_ADDRESS) {
            let Ok(stun::Attribute::XorPeerAddress(peer)) = stun::Attribute::decode(raw, &tid)
            else {
                drop(a);
                return fail(code::BAD_REQUEST, out);
            };
            if let Err(e) = self.check_peer(&mut a, peer) {
                drop(a);
                return fail(e, out);
            }
            any = true;
        }
        if !any {
            drop(a);
            return fail(code::BAD_REQUEST, out);
        }
        for raw in msg.get_all(attr::XOR_PEER_ADDRESS) {
            if let Ok(stun::Attribute::XorPeerAddress(peer)) = stun::Attribute::decode(raw, &tid)
                && !a.permit(canonical(peer).ip(), now)
            {
                drop(a);
                return fail(code::INSUFFICIENT_CAPACITY, out);
            }
        }
        drop(a);
        self.answer(msg, &auth, None, out, |_| {})
    }

    /// ChannelBind (RFC 8656 §11.2): binds or refreshes a channel, and the peer's permission.
    fn channel_bind(
        &self,
        client: ClientId,
        msg: &Message<'_>,
        now: Instant,
        wall: SystemTime,
        out: &mut Vec<u8>,
    ) -> ClientAction {
        let auth = match self.authenticate(client, msg, now, wall, out) {
            Ok(a) => a,
            Err(action) => return action,
        };
        let fail = |err: u16, out: &mut Vec<u8>| self.answer(msg, &auth, Some(err), out, |_| {});
        let mut a = match self.own_allocation(client, msg, &auth, out) {
            Ok(a) => a,
            Err(action) => return action,
        };
        let ch = match msg.get(attr::CHANNEL_NUMBER).map(|c| c.value) {
            Some(&[h, l, _, _]) if stun::is_valid_channel(u16::from_be_bytes([h, l])) => {
                u16::from_be_bytes([h, l])
            }
            _ => {
                drop(a);
                return fail(code::BAD_REQUEST, out);
            }
        };
        let peer = match msg.xor_address(attr::XOR_PEER_ADDRESS) {
            Ok(Some(p)) => p,
            _ => {
                drop(a);
                return fail(code::BAD_REQUEST, out);
            }
        };
        let peer = match self.check_peer(&mut a, peer) {
            Ok(p) => p,
            Err(e) => {
                drop(a);
                return fail(e, out);
            }
        };
        // A channel serves one peer and a peer one channel, also while a binding cools down.
        let channel_taken = a.channels.get(&ch).is_some_and(|c| c.peer != peer);
        let peer_taken = a.by_peer.get(&peer).is_some_and(|&c| c != ch);
        if channel_taken || peer_taken {
            drop(a);
            return fail(code::BAD_REQUEST, out);
        }
        if !a.permit(peer.ip(), now) {
            drop(a);
            return fail(code::INSUFFICIENT_CAPACITY, out);
        }
        a.channels.insert(
            ch,
            Channel {
                peer,
                expires: now + CHANNEL_LIFETIME,
            },
        );
        a.by_peer.insert(peer, ch);
        drop(a);
        self.answer(msg, &auth, None, out, |_| {})
    }

    /// Send indication (RFC 8656 §10.2): relay DATA to XOR-PEER-ADDRESS; never answered.
    fn send_indication(&self, client: ClientId, msg: &Message<'_>, now: Instant) -> ClientAction {
        let Some(mut a) = self.allocations.get_mut(&client) else {
            metrics::counter!("tern_turn_dropped_total", "reason" => "no_permission").increment(1);
            return ClientAction::None;
        };
        let (Ok(Some(peer)), Some(data)) =
            (msg.xor_address(attr::XOR_PEER_ADDRESS), msg.get(attr::DATA))
        else {
            return ClientAction::None;
        };
        self.relay_to_peer(&mut a, canonical(peer), data.offset, data.value.len(), now)
    }
}

/// Ends a reply: `Reply`, or nothing when it did not fit (cannot happen for the replies built
/// here, all far below 64 KiB, but never send a truncated message).
fn finish(b: MessageBuilder<'_>) -> ClientAction {
    match b.finish() {
        Ok(_) => ClientAction::Reply,
        Err(_) => ClientAction::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use md5::{Digest, Md5};
    use std::sync::Mutex;
    use std::sync::atomic::AtomicU64;

    const REALM: &str = "tern.test";
    const RELAY_IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 10));
    const PUBLIC_IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, 7));

    /// Relay ids count up from 1 and relay ports are 50,000 + id; `open_port` is supported
    /// when `ports` is set.
    #[derive(Default)]
    struct FakeRelays {
        next: AtomicU64,
        closed: Mutex<Vec<RelayId>>,
        ports: bool,
    }

    impl RelaySockets for FakeRelays {
        fn open(&self, ip: IpAddr) -> std::io::Result<(RelayId, SocketAddr)> {
            let n = self.next.fetch_add(1, Ordering::Relaxed) + 1;
            Ok((RelayId(n), SocketAddr::new(ip, 50_000 + n as u16)))
        }
        fn close(&self, id: RelayId) {
            self.closed.lock().expect("lock").push(id);
        }
        fn open_port(&self, ip: IpAddr, port: u16) -> std::io::Result<(RelayId, SocketAddr)> {
            if !self.ports {
                return Err(std::io::ErrorKind::Unsupported.into());
            }
            let n = self.next.fetch_add(1, Ordering::Relaxed) + 1;
            Ok((RelayId(n), SocketAddr::new(ip, port)))
        }
    }

    fn config() -> EngineConfig {
        EngineConfig {
            realm: REALM.into(),
            software: Some("tern-test".into()),
            relay_ip: RELAY_IP,
            advertised_ip: Some(PUBLIC_IP),
            default_lifetime: Duration::from_secs(600),
            max_lifetime: Duration::from_secs(3600),
            max_allocations: 100,
            max_allocations_per_user: 10,
            max_bandwidth: 0,
        }
    }

    struct H {
        engine: Engine,
        relays: Arc<FakeRelays>,
        now: Instant,
        wall: SystemTime,
        out: Vec<u8>,
    }

    fn harness(cfg: EngineConfig, limiter: FailureLimiter) -> H {
        harness_with(cfg, limiter, FakeRelays::default())
    }

    fn harness_with(cfg: EngineConfig, limiter: FailureLimiter, relays: FakeRelays) -> H {
        let creds = Credentials::new(
            vec!["rest-secret".into()],
            vec![
                ("alice".into(), "wonderland".into()),
                ("bob".into(), "builder".into()),
            ],
        );
        harness_creds(cfg, limiter, relays, creds)
    }

    fn harness_creds(
        cfg: EngineConfig,
        limiter: FailureLimiter,
        relays: FakeRelays,
        creds: Credentials,
    ) -> H {
        let relays = Arc::new(relays);
        let engine = Engine::new(
            cfg,
            Arc::new(creds),
            Nonces::new([7; 32], Duration::from_secs(600)),
            limiter,
            PeerFilter::default(),
            relays.clone(),
        );
        H {
            engine,
            relays,
            now: Instant::now(),
            wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            out: Vec::new(),
        }
    }

    fn h() -> H {
        harness(config(), FailureLimiter::new(1000, 1000))
    }

    fn client(port: u16) -> ClientId {
        ClientId {
            transport: Transport::Udp,
            remote: SocketAddr::new("203.0.113.1".parse().expect("ip"), port),
            local: SocketAddr::new(RELAY_IP, 3478),
        }
    }

    fn peer(s: &str) -> SocketAddr {
        s.parse().expect("peer address")
    }

    fn tid(n: u8) -> TransactionId {
        TransactionId([n; 12])
    }

    /// A request with whatever `attrs` adds, unauthenticated.
    fn plain(
        method: Method,
        class: Class,
        t: TransactionId,
        attrs: impl FnOnce(&mut MessageBuilder<'_>),
    ) -> Vec<u8> {
        let mut v = Vec::new();
        let mut b = MessageBuilder::new(&mut v, MessageType::new(method, class), t);
        attrs(&mut b);
        b.finish().expect("fits");
        v
    }

    /// A request with long-term credentials and MESSAGE-INTEGRITY (or -SHA256) and FINGERPRINT.
    #[allow(clippy::too_many_arguments)]
    fn authed(
        method: Method,
        t: TransactionId,
        user: &str,
        pass: &str,
        nonce: &str,
        sha256: bool,
        attrs: impl FnOnce(&mut MessageBuilder<'_>),
    ) -> Vec<u8> {
        let key = LongTermKey::md5(user, REALM, pass).expect("key");
        let mut v = Vec::new();
        let mut b = MessageBuilder::new(&mut v, MessageType::new(method, Class::Request), t);
        attrs(&mut b);
        b.text(attr::USERNAME, user)
            .text(attr::REALM, REALM)
            .text(attr::NONCE, nonce);
        if sha256 {
            b.integrity_sha256(key.as_bytes());
        } else {
            b.integrity(key.as_bytes());
        }
        b.fingerprint();
        b.finish().expect("fits");
        v
    }

    fn error_code(out: &[u8]) -> Option<u16> {
        let m = Message::parse(out).ok()?;
        match m.decode(attr::ERROR_CODE) {
            Ok(Some(stun::Attribute::ErrorCode { code, .. })) => Some(code),
            _ => None,
        }
    }

    impl H {
        fn send(&mut self, c: ClientId, data: &[u8]) -> ClientAction {
            self.engine
                .on_client(c, data, self.now, self.wall, &mut self.out)
        }

        fn peer_data(&mut self, relay: RelayId, p: SocketAddr, data: &[u8]) -> PeerAction {
            self.engine.on_peer(relay, p, data, self.now, &mut self.out)
        }

        /// The 401 challenge's NONCE.
        fn nonce(&mut self, c: ClientId) -> String {
            let req = plain(Method::ALLOCATE, Class::Request, tid(0xee), |b| {
                b.requested_transport(17);
            });
            assert_eq!(self.send(c, &req), ClientAction::Reply);
            assert_eq!(error_code(&self.out), Some(401));
            let m = Message::parse(&self.out).expect("401 parses");
            m.text(attr::NONCE)
                .expect("utf-8")
                .expect("nonce")
                .to_owned()
        }

        /// Allocates for `c` as `user`; returns the relay id and the nonce.
        fn allocate(&mut self, c: ClientId, user: &str, pass: &str) -> (RelayId, String) {
            let nonce = self.nonce(c);
            let req = authed(Method::ALLOCATE, tid(1), user, pass, &nonce, false, |b| {
                b.requested_transport(17);
            });
            assert_eq!(self.send(c, &req), ClientAction::Reply);
            assert_eq!(error_code(&self.out), None, "allocate succeeds");
            let relay = RelayId(self.relays.next.load(Ordering::Relaxed));
            (relay, nonce)
        }

        fn request(
            &mut self,
            c: ClientId,
            method: Method,
            user: &str,
            pass: &str,
            nonce: &str,
            attrs: impl FnOnce(&mut MessageBuilder<'_>),
        ) -> Option<u16> {
            let req = authed(method, tid(9), user, pass, nonce, false, attrs);
            assert_eq!(self.send(c, &req), ClientAction::Reply);
            let m = Message::parse(&self.out).expect("answer parses");
            assert!(m.check_fingerprint());
            assert!(
                m.check_integrity(LongTermKey::md5(user, REALM, pass).expect("key").as_bytes()),
                "authenticated answers carry MESSAGE-INTEGRITY"
            );
            error_code(&self.out)
        }

        fn permit(&mut self, c: ClientId, nonce: &str, p: SocketAddr) -> Option<u16> {
            self.request(
                c,
                Method::CREATE_PERMISSION,
                "alice",
                "wonderland",
                nonce,
                |b| {
                    b.xor_address(attr::XOR_PEER_ADDRESS, p);
                },
            )
        }

        fn bind(&mut self, c: ClientId, nonce: &str, ch: u16, p: SocketAddr) -> Option<u16> {
            self.request(c, Method::CHANNEL_BIND, "alice", "wonderland", nonce, |b| {
                b.channel_number(ch).xor_address(attr::XOR_PEER_ADDRESS, p);
            })
        }
    }

    #[test]
    fn binding_answers_anyone() {
        let mut h = h();
        let req = plain(Method::BINDING, Class::Request, tid(3), |b| {
            b.fingerprint();
        });
        assert_eq!(h.send(client(4000), &req), ClientAction::Reply);
        let m = Message::parse(&h.out).expect("parses");
        assert_eq!(m.class(), Class::Success);
        assert_eq!(m.transaction_id(), tid(3));
        assert_eq!(
            m.xor_address(attr::XOR_MAPPED_ADDRESS),
            Ok(Some(client(4000).remote))
        );
        assert!(m.check_fingerprint());
        assert!(m.get(attr::SOFTWARE).is_none());
    }

    #[test]
    fn allocate_challenge_then_success() {
        let mut h = h();
        let c = client(4000);
        let req = plain(Method::ALLOCATE, Class::Request, tid(0xee), |b| {
            b.requested_transport(17);
        });
        assert_eq!(h.send(c, &req), ClientAction::Reply);
        let m = Message::parse(&h.out).expect("401 parses");
        assert_eq!(error_code(&h.out), Some(401));
        assert_eq!(m.text(attr::REALM), Ok(Some(REALM)));
        assert!(m.get(attr::SOFTWARE).is_none(), "no amplification");
        // The RFC 8489 §9.2.1 offer: SHA-256 preferred, MD5 for RFC 5389 clients.
        assert_eq!(
            m.get(attr::PASSWORD_ALGORITHMS).map(|a| a.value),
            Some(&OFFERED_ALGORITHMS[..])
        );
        // Header, ERROR-CODE, REALM, a 45-byte NONCE and PASSWORD-ALGORITHMS, nothing else.
        assert!(h.out.len() <= 124, "small 401: {} bytes", h.out.len());
        let nonce = m
            .text(attr::NONCE)
            .expect("utf-8")
            .expect("nonce")
            .to_owned();

        let req = authed(
            Method::ALLOCATE,
            tid(1),
            "alice",
            "wonderland",
            &nonce,
            false,
            |b| {
                b.requested_transport(17).u32_value(attr::LIFETIME, 60);
            },
        );
        assert_eq!(h.send(c, &req), ClientAction::Reply);
        let reply = h.out.clone();
        let m = Message::parse(&reply).expect("parses");
        assert_eq!(m.class(), Class::Success);
        assert_eq!(
            m.xor_address(attr::XOR_RELAYED_ADDRESS),
            Ok(Some(SocketAddr::new(PUBLIC_IP, 50_001)))
        );
        assert_eq!(m.xor_address(attr::XOR_MAPPED_ADDRESS), Ok(Some(c.remote)));
        // Below the default: the default (RFC 8656 §7.2).
        assert_eq!(m.u32_value(attr::LIFETIME), Ok(Some(600)));
        assert_eq!(m.text(attr::SOFTWARE), Ok(Some("tern-test")));
        let key = LongTermKey::md5("alice", REALM, "wonderland").expect("key");
        assert!(m.check_integrity(key.as_bytes()) && m.check_fingerprint());
        assert_eq!(h.engine.allocation_count(), 1);

        // A retransmission gets the same answer; a new transaction on the 5-tuple gets 437.
        assert_eq!(h.send(c, &req), ClientAction::Reply);
        assert_eq!(h.out, reply);
        assert_eq!(h.relays.next.load(Ordering::Relaxed), 1, "no second socket");
        let again = authed(
            Method::ALLOCATE,
            tid(2),
            "alice",
            "wonderland",
            &nonce,
            false,
            |b| {
                b.requested_transport(17);
            },
        );
        assert_eq!(h.send(c, &again), ClientAction::Reply);
        assert_eq!(error_code(&h.out), Some(437));
    }

    #[test]
    fn integrity_sha256_is_answered_in_kind() {
        let mut h = h();
        let c = client(4000);
        let nonce = h.nonce(c);
        let req = authed(
            Method::ALLOCATE,
            tid(1),
            "alice",
            "wonderland",
            &nonce,
            true,
            |b| {
                b.requested_transport(17);
            },
        );
        assert_eq!(h.send(c, &req), ClientAction::Reply);
        let m = Message::parse(&h.out).expect("parses");
        assert_eq!(error_code(&h.out), None);
        let key = LongTermKey::md5("alice", REALM, "wonderland").expect("key");
        assert!(m.check_integrity_sha256(key.as_bytes()));
        assert!(!m.has_integrity());
    }

    #[test]
    fn lifetime_is_capped() {
        let mut h = h();
        let c = client(4000);
        let nonce = h.nonce(c);
        let req = authed(
            Method::ALLOCATE,
            tid(1),
            "alice",
            "wonderland",
            &nonce,
            false,
            |b| {
                b.requested_transport(17).u32_value(attr::LIFETIME, 99_999);
            },
        );
        h.send(c, &req);
        let m = Message::parse(&h.out).expect("parses");
        assert_eq!(m.u32_value(attr::LIFETIME), Ok(Some(3600)));
    }

    #[test]
    fn stale_nonce_gets_438_with_a_new_one() {
        let mut h = h();
        let c = client(4000);
        let nonce = h.nonce(c);
        h.wall += Duration::from_secs(601);
        let req = authed(
            Method::ALLOCATE,
            tid(1),
            "alice",
            "wonderland",
            &nonce,
            false,
            |b| {
                b.requested_transport(17);
            },
        );
        assert_eq!(h.send(c, &req), ClientAction::Reply);
        assert_eq!(error_code(&h.out), Some(438));
        let m = Message::parse(&h.out).expect("parses");
        assert_eq!(
            m.get(attr::PASSWORD_ALGORITHMS).map(|a| a.value),
            Some(&OFFERED_ALGORITHMS[..]),
            "438 offers the algorithms again (RFC 8489 §9.2.4)"
        );
        let fresh = m
            .text(attr::NONCE)
            .expect("utf-8")
            .expect("nonce")
            .to_owned();
        assert_ne!(fresh, nonce);
        assert_eq!(m.text(attr::REALM), Ok(Some(REALM)));
        let req = authed(
            Method::ALLOCATE,
            tid(1),
            "alice",
            "wonderland",
            &fresh,
            false,
            |b| {
                b.requested_transport(17);
            },
        );
        h.send(c, &req);
        assert_eq!(error_code(&h.out), None);
    }

    #[test]
    fn bad_credentials_get_401() {
        let mut h = h();
        let c = client(4000);
        let nonce = h.nonce(c);
        for (user, pass) in [("alice", "wrong"), ("mallory", "x"), ("1:alice", "x")] {
            let req = authed(Method::ALLOCATE, tid(1), user, pass, &nonce, false, |b| {
                b.requested_transport(17);
            });
            assert_eq!(h.send(c, &req), ClientAction::Reply);
            assert_eq!(error_code(&h.out), Some(401), "{user}");
            let m = Message::parse(&h.out).expect("parses");
            assert!(m.get(attr::NONCE).is_some() && !m.has_integrity());
        }
        // MESSAGE-INTEGRITY without USERNAME: 400.
        let req = plain(Method::ALLOCATE, Class::Request, tid(1), |b| {
            b.requested_transport(17).integrity(b"k");
        });
        h.send(c, &req);
        assert_eq!(error_code(&h.out), Some(400));
        // A NONCE issued to another address: 401.
        let other = client(4000);
        let elsewhere = ClientId {
            remote: peer("203.0.113.2:4000"),
            ..other
        };
        let req = authed(
            Method::ALLOCATE,
            tid(1),
            "alice",
            "wonderland",
            &nonce,
            false,
            |b| {
                b.requested_transport(17);
            },
        );
        h.send(elsewhere, &req);
        assert_eq!(error_code(&h.out), Some(401));
        assert_eq!(h.engine.allocation_count(), 0);
    }

    #[test]
    fn rest_credentials_work_until_they_expire() {
        let mut h = h();
        let c = client(4000);
        let nonce = h.nonce(c);
        let creds = Credentials::new(vec!["rest-secret".into()], vec![]);
        let now = 1_800_000_000u64;
        let user = format!("{}:carol", now + 60);
        let pass = creds
            .password(&user, h.wall)
            .expect("valid REST credential");
        let req = authed(Method::ALLOCATE, tid(1), &user, &pass, &nonce, false, |b| {
            b.requested_transport(17);
        });
        h.send(c, &req);
        assert_eq!(error_code(&h.out), None);
        h.wall += Duration::from_secs(61);
        let fresh = h.nonce(client(4001));
        let req = authed(Method::REFRESH, tid(2), &user, &pass, &fresh, false, |_| {});
        h.send(client(4001), &req);
        assert_eq!(error_code(&h.out), Some(401), "expired REST credential");
    }

    #[test]
    fn another_user_on_the_allocation_gets_441() {
        let mut h = h();
        let c = client(4000);
        let (_, nonce) = h.allocate(c, "alice", "wonderland");
        assert_eq!(
            h.request(c, Method::REFRESH, "bob", "builder", &nonce, |_| {}),
            Some(441)
        );
        assert_eq!(
            h.request(
                c,
                Method::CREATE_PERMISSION,
                "bob",
                "builder",
                &nonce,
                |b| {
                    b.xor_address(attr::XOR_PEER_ADDRESS, peer("203.0.113.9:1"));
                }
            ),
            Some(441)
        );
        assert_eq!(
            h.request(c, Method::REFRESH, "alice", "wonderland", &nonce, |_| {}),
            None
        );
    }

    #[test]
    fn quotas_486_and_508() {
        let mut cfg = config();
        cfg.max_allocations_per_user = 1;
        cfg.max_allocations = 2;
        let mut h = harness(cfg, FailureLimiter::new(1000, 1000));
        h.allocate(client(4000), "alice", "wonderland");
        let nonce = h.nonce(client(4001));
        let req = authed(
            Method::ALLOCATE,
            tid(5),
            "alice",
            "wonderland",
            &nonce,
            false,
            |b| {
                b.requested_transport(17);
            },
        );
        h.send(client(4001), &req);
        assert_eq!(error_code(&h.out), Some(486));
        h.allocate(client(4002), "bob", "builder");
        // REST users count as their USER part; the server is full anyway.
        let creds = Credentials::new(vec!["rest-secret".into()], vec![]);
        let user = "1900000000:carol";
        let pass = creds.password(user, h.wall).expect("valid");
        let req = authed(Method::ALLOCATE, tid(6), user, &pass, &nonce, false, |b| {
            b.requested_transport(17);
        });
        h.send(client(4001), &req);
        assert_eq!(error_code(&h.out), Some(508));
        assert_eq!(h.engine.allocation_count(), 2);
        // Freeing one makes room again.
        h.engine.on_client_closed(client(4000));
        assert_eq!(h.engine.allocation_count(), 1);
        h.send(client(4001), &req);
        assert_eq!(error_code(&h.out), None);
        assert_eq!(quota_user(user), "carol");
    }

    #[test]
    fn unsupported_transport_and_options() {
        let mut h = h();
        let c = client(4000);
        let nonce = h.nonce(c);
        type Attrs = Box<dyn Fn(&mut MessageBuilder<'_>)>;
        let cases: [(Attrs, u16); 5] = [
            (
                Box::new(|b| {
                    b.requested_transport(6);
                }),
                442,
            ),
            (Box::new(|_| {}), 400),
            (
                Box::new(|b| {
                    b.requested_transport(17).raw(attr::EVEN_PORT, &[0x80]);
                }),
                508,
            ),
            (
                Box::new(|b| {
                    b.requested_transport(17)
                        .requested_address_family(AddressFamily::V6);
                }),
                440,
            ),
            (
                Box::new(|b| {
                    b.requested_transport(17)
                        .raw(attr::RESERVATION_TOKEN, &[1; 8])
                        .raw(attr::EVEN_PORT, &[0]);
                }),
                400,
            ),
        ];
        for (attrs, want) in cases {
            let req = authed(
                Method::ALLOCATE,
                tid(1),
                "alice",
                "wonderland",
                &nonce,
                false,
                attrs,
            );
            assert_eq!(h.send(c, &req), ClientAction::Reply);
            assert_eq!(error_code(&h.out), Some(want));
        }
        // DONT-FRAGMENT and REQUESTED-ADDRESS-FAMILY IPv4 are fine.
        let req = authed(
            Method::ALLOCATE,
            tid(1),
            "alice",
            "wonderland",
            &nonce,
            false,
            |b| {
                b.requested_transport(17)
                    .raw(attr::DONT_FRAGMENT, &[])
                    .requested_address_family(AddressFamily::V4);
            },
        );
        h.send(c, &req);
        assert_eq!(error_code(&h.out), None);
    }

    #[test]
    fn even_port_and_reservations() {
        let relays = FakeRelays {
            ports: true,
            ..FakeRelays::default()
        };
        let mut h = harness_with(config(), FailureLimiter::new(1000, 1000), relays);
        let (a, b, c) = (client(4000), client(4001), client(4002));
        // EVEN-PORT without R: an even port (the fake's first port, 50001, is closed again).
        let nonce = h.nonce(a);
        let req = authed(
            Method::ALLOCATE,
            tid(1),
            "alice",
            "wonderland",
            &nonce,
            false,
            |m| {
                m.requested_transport(17)
                    .add(&stun::Attribute::EvenPort(false));
            },
        );
        h.send(a, &req);
        let m = Message::parse(&h.out).expect("parses");
        assert_eq!(
            m.xor_address(attr::XOR_RELAYED_ADDRESS),
            Ok(Some(SocketAddr::new(PUBLIC_IP, 50_002)))
        );
        assert!(m.get(attr::RESERVATION_TOKEN).is_none());
        assert_eq!(*h.relays.closed.lock().expect("lock"), [RelayId(1)]);
        // With R: the next even port (50004 after 50003 is closed), 50005 reserved.
        let req = authed(
            Method::ALLOCATE,
            tid(2),
            "alice",
            "wonderland",
            &nonce,
            false,
            |m| {
                m.requested_transport(17)
                    .add(&stun::Attribute::EvenPort(true));
            },
        );
        h.send(b, &req);
        let m = Message::parse(&h.out).expect("parses");
        assert_eq!(error_code(&h.out), None);
        assert_eq!(
            m.xor_address(attr::XOR_RELAYED_ADDRESS),
            Ok(Some(SocketAddr::new(PUBLIC_IP, 50_004)))
        );
        let token: [u8; 8] = m
            .get(attr::RESERVATION_TOKEN)
            .and_then(|t| t.value.try_into().ok())
            .expect("token");
        // The token gets the reserved odd port, once.
        let with_token = |t: u8| {
            authed(
                Method::ALLOCATE,
                tid(t),
                "alice",
                "wonderland",
                &nonce,
                false,
                |m| {
                    m.requested_transport(17)
                        .raw(attr::RESERVATION_TOKEN, &token);
                },
            )
        };
        h.send(c, &with_token(3));
        let m = Message::parse(&h.out).expect("parses");
        assert_eq!(
            m.xor_address(attr::XOR_RELAYED_ADDRESS),
            Ok(Some(SocketAddr::new(PUBLIC_IP, 50_005)))
        );
        h.send(client(4003), &with_token(4));
        assert_eq!(error_code(&h.out), Some(508), "token used up");
        // An unused reservation lapses and its socket is closed.
        let req = authed(
            Method::ALLOCATE,
            tid(5),
            "alice",
            "wonderland",
            &nonce,
            false,
            |m| {
                m.requested_transport(17)
                    .add(&stun::Attribute::EvenPort(true));
            },
        );
        h.send(client(4004), &req);
        assert_eq!(error_code(&h.out), None);
        let reserved = RelayId(h.relays.next.load(Ordering::Relaxed));
        h.now += Duration::from_secs(31);
        h.engine.expire(h.now);
        assert!(h.relays.closed.lock().expect("lock").contains(&reserved));
        assert_eq!(h.engine.allocation_count(), 4);
    }

    #[test]
    fn requests_without_allocation_get_437() {
        let mut h = h();
        let c = client(4000);
        let nonce = h.nonce(c);
        assert_eq!(
            h.request(c, Method::REFRESH, "alice", "wonderland", &nonce, |_| {}),
            Some(437)
        );
        assert_eq!(h.permit(c, &nonce, peer("203.0.113.9:1")), Some(437));
        assert_eq!(h.bind(c, &nonce, 0x4000, peer("203.0.113.9:1")), Some(437));
    }

    #[test]
    fn unknown_comprehension_required_gets_420() {
        let mut h = h();
        let req = plain(Method::ALLOCATE, Class::Request, tid(1), |b| {
            b.requested_transport(17)
                .raw(0x7abc, b"?")
                .raw(0xc001, b"ok");
        });
        assert_eq!(h.send(client(4000), &req), ClientAction::Reply);
        assert_eq!(error_code(&h.out), Some(420));
        let m = Message::parse(&h.out).expect("parses");
        let listed = m.get(attr::UNKNOWN_ATTRIBUTES).expect("listed").value;
        assert_eq!(listed, [0x7a, 0xbc]);
    }

    #[test]
    fn denied_peers_get_403() {
        let mut h = h();
        let c = client(4000);
        let (_, nonce) = h.allocate(c, "alice", "wonderland");
        for p in [
            "127.0.0.1:9",
            "10.0.0.1:9",
            "[::ffff:127.0.0.1]:9",
            "[::1]:9",
            "[64:ff9b::a00:1]:9",
        ] {
            assert_eq!(h.permit(c, &nonce, peer(p)), Some(403), "{p}");
            assert_eq!(h.bind(c, &nonce, 0x4000, peer(p)), Some(403), "{p}");
        }
        // One denied peer among allowed ones: none is installed.
        assert_eq!(
            h.request(
                c,
                Method::CREATE_PERMISSION,
                "alice",
                "wonderland",
                &nonce,
                |b| {
                    b.xor_address(attr::XOR_PEER_ADDRESS, peer("203.0.113.9:1"))
                        .xor_address(attr::XOR_PEER_ADDRESS, peer("192.168.1.1:1"));
                }
            ),
            Some(403)
        );
        assert_eq!(
            h.peer_data(RelayId(1), peer("203.0.113.9:1"), b"x"),
            PeerAction::None
        );
        // An IPv6 peer that is allowed, on an IPv4 relay: 443.
        assert_eq!(h.permit(c, &nonce, peer("[2a00::1]:9")), Some(443));
        // No XOR-PEER-ADDRESS at all: 400.
        assert_eq!(
            h.request(
                c,
                Method::CREATE_PERMISSION,
                "alice",
                "wonderland",
                &nonce,
                |_| {}
            ),
            Some(400)
        );
        assert_eq!(h.permit(c, &nonce, peer("203.0.113.9:1")), None);
    }

    fn send_indication(p: SocketAddr, payload: &[u8]) -> Vec<u8> {
        plain(Method::SEND, Class::Indication, tid(7), |b| {
            b.xor_address(attr::XOR_PEER_ADDRESS, p).data(payload);
        })
    }

    #[test]
    fn send_indication_and_channel_data_are_relayed() {
        let mut h = h();
        let c = client(4000);
        let (relay, nonce) = h.allocate(c, "alice", "wonderland");
        let p = peer("203.0.113.9:7000");
        // No permission yet: dropped.
        let ind = send_indication(p, b"hello peer");
        assert_eq!(h.send(c, &ind), ClientAction::None);
        assert_eq!(h.permit(c, &nonce, p), None);
        let action = h.send(c, &ind);
        let ClientAction::Relay {
            relay: r,
            peer: to,
            payload,
        } = action
        else {
            panic!("not relayed: {action:?}");
        };
        assert_eq!((r, to), (relay, p));
        assert_eq!(&ind[payload], b"hello peer");
        // IPv4-mapped form of the permitted peer: relayed to the IPv4 address.
        let mapped = send_indication(peer("[::ffff:203.0.113.9]:7000"), b"x");
        assert!(matches!(h.send(c, &mapped), ClientAction::Relay { peer, .. } if peer == p));
        // Another peer without permission: dropped. Another client without allocation: dropped.
        assert_eq!(
            h.send(c, &send_indication(peer("203.0.113.10:7000"), b"x")),
            ClientAction::None
        );
        assert_eq!(h.send(client(4001), &ind), ClientAction::None);

        // ChannelData on an unbound channel: dropped; after ChannelBind: relayed.
        let mut frame = Vec::new();
        stun::write_channel_data(&mut frame, 0x4001, b"via channel", false);
        assert_eq!(h.send(c, &frame), ClientAction::None);
        assert_eq!(h.bind(c, &nonce, 0x4001, p), None);
        assert_eq!(
            h.send(c, &frame),
            ClientAction::Relay {
                relay,
                peer: p,
                payload: 4..15
            }
        );
        // Padded (TCP) frames relay the same range.
        frame.clear();
        stun::write_channel_data(&mut frame, 0x4001, b"via channel", true);
        assert_eq!(frame.len(), 16);
        assert!(
            matches!(h.send(c, &frame), ClientAction::Relay { payload, .. } if payload == (4..15))
        );
        // A truncated frame is dropped.
        assert_eq!(h.send(c, &frame[..10]), ClientAction::None);
    }

    #[test]
    fn channel_bind_rules() {
        let mut h = h();
        let c = client(4000);
        let (_, nonce) = h.allocate(c, "alice", "wonderland");
        let p = peer("203.0.113.9:7000");
        let q = peer("203.0.113.9:7001");
        assert_eq!(h.bind(c, &nonce, 0x3fff, p), Some(400));
        assert_eq!(h.bind(c, &nonce, 0x8000, p), Some(400));
        assert_eq!(h.bind(c, &nonce, 0x4000, p), None);
        assert_eq!(h.bind(c, &nonce, 0x4000, p), None, "refresh");
        assert_eq!(h.bind(c, &nonce, 0x4000, q), Some(400), "channel taken");
        assert_eq!(h.bind(c, &nonce, 0x4001, p), Some(400), "peer taken");
        assert_eq!(h.bind(c, &nonce, 0x4001, q), None);
        // ChannelBind without a peer: 400.
        assert_eq!(
            h.request(
                c,
                Method::CHANNEL_BIND,
                "alice",
                "wonderland",
                &nonce,
                |b| {
                    b.channel_number(0x4002);
                }
            ),
            Some(400)
        );
    }

    #[test]
    fn peer_data_becomes_data_indication_then_channel_data() {
        let mut h = h();
        let c = client(4000);
        let (relay, nonce) = h.allocate(c, "alice", "wonderland");
        let p = peer("203.0.113.9:7000");
        // No permission: nothing reaches the client.
        assert_eq!(h.peer_data(relay, p, b"early"), PeerAction::None);
        assert!(h.out.is_empty());
        assert_eq!(h.permit(c, &nonce, p), None);
        // A permission is per IP: any port of the peer may send.
        let other_port = peer("203.0.113.9:7777");
        assert_eq!(
            h.peer_data(relay, other_port, b"hi"),
            PeerAction::ToClient { client: c }
        );
        let m = Message::parse(&h.out).expect("data indication");
        assert_eq!(
            m.message_type(),
            MessageType::new(Method::DATA, Class::Indication)
        );
        assert_eq!(m.xor_address(attr::XOR_PEER_ADDRESS), Ok(Some(other_port)));
        assert_eq!(m.get(attr::DATA).map(|d| d.value), Some(&b"hi"[..]));
        // After ChannelBind: ChannelData.
        assert_eq!(h.bind(c, &nonce, 0x4abc, p), None);
        assert_eq!(
            h.peer_data(relay, p, b"hello"),
            PeerAction::ToClient { client: c }
        );
        assert_eq!(
            stun::parse_channel_data(&h.out),
            Some((0x4abc, &b"hello"[..]))
        );
        assert_eq!(h.out.len(), 9, "unpadded over UDP");
        // Unknown relay: nothing.
        assert_eq!(h.peer_data(RelayId(99), p, b"x"), PeerAction::None);
    }

    #[test]
    fn channel_data_to_tcp_clients_is_padded() {
        let mut h = h();
        let c = ClientId {
            transport: Transport::Tcp,
            ..client(4000)
        };
        let (relay, nonce) = h.allocate(c, "alice", "wonderland");
        let p = peer("203.0.113.9:7000");
        assert_eq!(h.bind(c, &nonce, 0x4000, p), None);
        h.peer_data(relay, p, b"hello");
        assert_eq!(h.out, b"\x40\x00\x00\x05hello\0\0\0");
        h.engine.on_client_closed(c);
        assert_eq!(h.engine.allocation_count(), 0);
        assert_eq!(*h.relays.closed.lock().expect("lock"), [relay]);
        assert_eq!(h.peer_data(relay, p, b"late"), PeerAction::None);
    }

    #[test]
    fn refresh_zero_deletes_and_closes_the_socket() {
        let mut h = h();
        let c = client(4000);
        let (relay, nonce) = h.allocate(c, "alice", "wonderland");
        assert_eq!(
            h.request(c, Method::REFRESH, "alice", "wonderland", &nonce, |b| {
                b.u32_value(attr::LIFETIME, 1200);
            }),
            None
        );
        let m = Message::parse(&h.out).expect("parses");
        assert_eq!(m.u32_value(attr::LIFETIME), Ok(Some(1200)));
        assert_eq!(
            h.request(c, Method::REFRESH, "alice", "wonderland", &nonce, |b| {
                b.u32_value(attr::LIFETIME, 0);
            }),
            None
        );
        let m = Message::parse(&h.out).expect("parses");
        assert_eq!(m.u32_value(attr::LIFETIME), Ok(Some(0)));
        assert_eq!(h.engine.allocation_count(), 0);
        assert_eq!(*h.relays.closed.lock().expect("lock"), [relay]);
        // The 5-tuple can allocate again.
        h.allocate(c, "alice", "wonderland");
        assert_eq!(h.engine.allocation_count(), 1);
    }

    #[test]
    fn permissions_channels_and_allocations_expire() {
        let mut h = h();
        let c = client(4000);
        let (relay, nonce) = h.allocate(c, "alice", "wonderland");
        let p = peer("203.0.113.9:7000");
        let q = peer("203.0.113.20:7000");
        assert_eq!(h.bind(c, &nonce, 0x4000, p), None);
        assert_eq!(h.permit(c, &nonce, q), None);
        let start = h.now;

        // 299 s: everything still works.
        h.now = start + Duration::from_secs(299);
        h.engine.expire(h.now);
        assert!(matches!(
            h.peer_data(relay, q, b"x"),
            PeerAction::ToClient { .. }
        ));
        // 301 s: both permissions lapsed (a channel does not keep its permission alive).
        h.now = start + Duration::from_secs(301);
        h.engine.expire(h.now);
        assert_eq!(h.peer_data(relay, q, b"x"), PeerAction::None);
        assert_eq!(h.peer_data(relay, p, b"x"), PeerAction::None);
        let mut frame = Vec::new();
        stun::write_channel_data(&mut frame, 0x4000, b"x", false);
        assert_eq!(h.send(c, &frame), ClientAction::None);
        // Refresh the permission alone: the channel (600 s) relays again.
        let fresh = h.nonce(c);
        assert_eq!(h.permit(c, &fresh, p), None);
        assert!(matches!(h.send(c, &frame), ClientAction::Relay { .. }));
        // Keep the allocation alive, let the channel lapse.
        assert_eq!(
            h.request(c, Method::REFRESH, "alice", "wonderland", &fresh, |b| {
                b.u32_value(attr::LIFETIME, 3600);
            }),
            None
        );
        h.now = start + Duration::from_secs(601);
        h.engine.expire(h.now);
        assert_eq!(h.send(c, &frame), ClientAction::None, "channel expired");
        // While cooling down the channel cannot go to another peer.
        let fresh = h.nonce(c);
        assert_eq!(h.bind(c, &fresh, 0x4000, q), Some(400));
        assert_eq!(h.bind(c, &fresh, 0x4000, p), None, "same peer may rebind");
        // The allocation lapses after its lifetime; the relay socket is closed.
        h.now = start + Duration::from_secs(301 + 3601);
        h.engine.expire(h.now);
        assert_eq!(h.engine.allocation_count(), 0);
        assert_eq!(*h.relays.closed.lock().expect("lock"), [relay]);
    }

    #[test]
    fn bandwidth_cap_drops_excess() {
        let mut cfg = config();
        cfg.max_bandwidth = 200_000;
        let mut h = harness(cfg, FailureLimiter::new(1000, 1000));
        let c = client(4000);
        let (relay, nonce) = h.allocate(c, "alice", "wonderland");
        let p = peer("203.0.113.9:7000");
        assert_eq!(h.bind(c, &nonce, 0x4000, p), None);
        let payload = vec![0u8; 1000];
        let mut frame = Vec::new();
        stun::write_channel_data(&mut frame, 0x4000, &payload, false);
        let relayed = (0..400)
            .filter(|_| matches!(h.send(c, &frame), ClientAction::Relay { .. }))
            .count();
        assert_eq!(relayed, 200, "one second's worth of burst");
        let delivered = (0..400)
            .filter(|_| h.peer_data(relay, p, &payload) != PeerAction::None)
            .count();
        assert_eq!(delivered, 200, "each direction has its own bucket");
        h.now += Duration::from_millis(100);
        let relayed = (0..400)
            .filter(|_| matches!(h.send(c, &frame), ClientAction::Relay { .. }))
            .count();
        assert_eq!(relayed, 20, "refilled at the configured rate");
    }

    #[test]
    fn unauthenticated_errors_are_rate_limited() {
        let mut h = harness(config(), FailureLimiter::new(1, 2));
        let c = client(4000);
        let req = plain(Method::ALLOCATE, Class::Request, tid(1), |b| {
            b.requested_transport(17);
        });
        assert_eq!(h.send(c, &req), ClientAction::Reply);
        assert_eq!(h.send(c, &req), ClientAction::Reply);
        assert_eq!(h.send(c, &req), ClientAction::None);
        // Binding is not an error answer and stays available.
        let bind = plain(Method::BINDING, Class::Request, tid(2), |_| {});
        assert_eq!(h.send(c, &bind), ClientAction::Reply);
        h.now += Duration::from_secs(1);
        assert_eq!(h.send(c, &req), ClientAction::Reply);
    }

    #[test]
    fn garbage_is_ignored() {
        let mut h = h();
        let c = client(4000);
        for data in [
            &b""[..],
            b"\xff\xff",
            b"\x00\x01\x00\x00\x21\x12\xa4\x42",
            b"\x40\x00\x00\x10abc",
        ] {
            assert_eq!(h.send(c, data), ClientAction::None);
        }
        // A response or an unknown indication from a client: ignored.
        let resp = plain(Method::BINDING, Class::Success, tid(1), |_| {});
        assert_eq!(h.send(c, &resp), ClientAction::None);
        // A bad FINGERPRINT: dropped.
        let mut req = plain(Method::BINDING, Class::Request, tid(1), |b| {
            b.fingerprint();
        });
        let last = req.len() - 1;
        req[last] ^= 1;
        assert_eq!(h.send(c, &req), ClientAction::None);
    }

    #[test]
    fn engine_is_shareable_across_tasks() {
        fn check<T: Send + Sync>() {}
        check::<Engine>();
    }

    #[test]
    fn token_bucket_accumulates_small_steps() {
        let t0 = Instant::now();
        let mut b = Bucket::new(1_000, t0);
        b.tokens = 0;
        // 1000 B/s: 100 steps of 1 ms add 100 bytes even though each adds just 1.
        for i in 1..=100 {
            b.take(0, 1_000, t0 + Duration::from_millis(i));
        }
        assert!(b.take(100, 1_000, t0 + Duration::from_millis(100)));
        assert!(!b.take(1, 1_000, t0 + Duration::from_millis(100)));
    }
    /// What the credential part of an RFC 8489 request looks like.
    struct Rfc8489<'a> {
        /// USERNAME, or USERHASH of it.
        user: &'a str,
        hash_user: bool,
        pass: &'a str,
        nonce: &'a str,
        /// PASSWORD-ALGORITHMS to echo, and the PASSWORD-ALGORITHM named (key derivation).
        algorithms: Option<&'a [u8]>,
        algorithm: Option<PasswordAlgorithm>,
    }

    impl Rfc8489<'_> {
        fn key(&self) -> LongTermKey {
            let alg = self.algorithm.unwrap_or(PasswordAlgorithm::Md5);
            LongTermKey::derive(alg, self.user, REALM, self.pass).expect("key")
        }

        /// An Allocate signed with MESSAGE-INTEGRITY-SHA256 (what an RFC 8489 client uses once
        /// the server offered algorithms).
        fn allocate(&self, t: TransactionId) -> Vec<u8> {
            let mut v = Vec::new();
            let mut b = MessageBuilder::new(
                &mut v,
                MessageType::new(Method::ALLOCATE, Class::Request),
                t,
            );
            b.requested_transport(17);
            if self.hash_user {
                b.raw(
                    attr::USERHASH,
                    &stun::userhash(self.user, REALM).expect("hash"),
                );
            } else {
                b.text(attr::USERNAME, self.user);
            }
            b.text(attr::REALM, REALM).text(attr::NONCE, self.nonce);
            if let Some(list) = self.algorithms {
                b.raw(attr::PASSWORD_ALGORITHMS, list);
            }
            if let Some(alg) = self.algorithm {
                let [hi, lo] = alg.code().to_be_bytes();
                b.raw(attr::PASSWORD_ALGORITHM, &[hi, lo, 0, 0]);
            }
            b.integrity_sha256(self.key().as_bytes()).fingerprint();
            b.finish().expect("fits");
            v
        }
    }

    #[test]
    fn sha256_key_derivation_is_negotiated() {
        let mut h = h();
        let c = client(4000);
        let nonce = h.nonce(c);
        assert!(
            nonce.starts_with("obMatJos2AAAB"),
            "password algorithms only: {nonce}"
        );
        let req = Rfc8489 {
            user: "alice",
            hash_user: false,
            pass: "wonderland",
            nonce: &nonce,
            algorithms: Some(&OFFERED_ALGORITHMS),
            algorithm: Some(PasswordAlgorithm::Sha256),
        };
        assert_eq!(h.send(c, &req.allocate(tid(1))), ClientAction::Reply);
        assert_eq!(error_code(&h.out), None, "allocated");
        let m = Message::parse(&h.out).expect("parses");
        assert!(m.check_integrity_sha256(req.key().as_bytes()));
        let md5 = LongTermKey::md5("alice", REALM, "wonderland").expect("key");
        assert!(
            !m.check_integrity_sha256(md5.as_bytes()),
            "the SHA-256 key signs"
        );
        // Later requests on the allocation must use the same key (RFC 8656 §5: else 441).
        let mut refresh = Vec::new();
        let mut b = MessageBuilder::new(
            &mut refresh,
            MessageType::new(Method::REFRESH, Class::Request),
            tid(2),
        );
        b.text(attr::USERNAME, "alice")
            .text(attr::REALM, REALM)
            .text(attr::NONCE, &nonce)
            .integrity(md5.as_bytes());
        b.finish().expect("fits");
        assert_eq!(h.send(c, &refresh), ClientAction::Reply);
        assert_eq!(error_code(&h.out), Some(441));
    }

    #[test]
    fn password_algorithms_must_be_echoed_unchanged() {
        let mut h = h();
        let c = client(4000);
        let nonce = h.nonce(c);
        let md5_only = [0u8, 1, 0, 0];
        let reversed = [0u8, 1, 0, 0, 0, 2, 0, 0];
        for (algorithms, algorithm) in [
            // A man in the middle stripped the list, or rewrote it to MD5 only (§9.2.4).
            (None, Some(PasswordAlgorithm::Md5)),
            (None, Some(PasswordAlgorithm::Sha256)),
            (Some(&md5_only[..]), Some(PasswordAlgorithm::Md5)),
            (Some(&reversed[..]), Some(PasswordAlgorithm::Sha256)),
            // The list without a choice.
            (Some(&OFFERED_ALGORITHMS[..]), None),
        ] {
            let req = Rfc8489 {
                user: "alice",
                hash_user: false,
                pass: "wonderland",
                nonce: &nonce,
                algorithms,
                algorithm,
            };
            assert_eq!(h.send(c, &req.allocate(tid(1))), ClientAction::Reply);
            assert_eq!(
                error_code(&h.out),
                Some(400),
                "{algorithms:?} {algorithm:?}"
            );
        }
        // An algorithm nobody registered.
        let mut v = Vec::new();
        let mut b = MessageBuilder::new(
            &mut v,
            MessageType::new(Method::ALLOCATE, Class::Request),
            tid(3),
        );
        b.requested_transport(17)
            .text(attr::USERNAME, "alice")
            .text(attr::REALM, REALM)
            .text(attr::NONCE, &nonce)
            .raw(attr::PASSWORD_ALGORITHMS, &OFFERED_ALGORITHMS)
            .raw(attr::PASSWORD_ALGORITHM, &[0, 9, 0, 0])
            .integrity(b"k");
        b.finish().expect("fits");
        assert_eq!(h.send(c, &v), ClientAction::Reply);
        assert_eq!(error_code(&h.out), Some(400));
        assert_eq!(h.engine.allocation_count(), 0);
        // Neither attribute: an RFC 5389 client, MD5 (the harness's `allocate` is one).
        h.allocate(c, "alice", "wonderland");
        assert_eq!(h.engine.allocation_count(), 1);
    }

    #[test]
    fn userhash_finds_static_users_when_anonymity_is_offered() {
        let creds = Credentials::new(
            vec![],
            vec![
                ("alice".into(), "wonderland".into()),
                (
                    "\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}".into(),
                    "pass\u{A0}word".into(),
                ),
            ],
        );
        let mut h = harness_creds(
            config(),
            FailureLimiter::new(1000, 1000),
            FakeRelays::default(),
            creds,
        );
        let c = client(4000);
        let nonce = h.nonce(c);
        // Password algorithms and username anonymity (RFC 8489 §9.2.1, Errata 6290 bit order).
        assert!(nonce.starts_with("obMatJos2AAAD"), "{nonce}");
        let req = Rfc8489 {
            user: "\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}",
            hash_user: true,
            // The client prepared the password with OpaqueString: U+00A0 became U+0020.
            pass: "pass word",
            nonce: &nonce,
            algorithms: Some(&OFFERED_ALGORITHMS),
            algorithm: Some(PasswordAlgorithm::Sha256),
        };
        assert_eq!(h.send(c, &req.allocate(tid(1))), ClientAction::Reply);
        assert_eq!(error_code(&h.out), None, "allocated by USERHASH");
        let m = Message::parse(&h.out).expect("parses");
        assert!(m.check_integrity_sha256(req.key().as_bytes()));
        // A hash of nobody, or of alice in another realm: 401.
        let c2 = client(4001);
        let nonce2 = h.nonce(c2);
        for hash in [
            stun::userhash("mallory", REALM).expect("hash"),
            stun::userhash("alice", "elsewhere").expect("hash"),
        ] {
            let key = LongTermKey::md5("alice", REALM, "wonderland").expect("key");
            let mut v = Vec::new();
            let mut b = MessageBuilder::new(
                &mut v,
                MessageType::new(Method::ALLOCATE, Class::Request),
                tid(2),
            );
            b.requested_transport(17)
                .raw(attr::USERHASH, &hash)
                .text(attr::REALM, REALM)
                .text(attr::NONCE, &nonce2)
                .integrity(key.as_bytes());
            b.finish().expect("fits");
            assert_eq!(h.send(c2, &v), ClientAction::Reply);
            assert_eq!(error_code(&h.out), Some(401));
        }
        assert_eq!(h.engine.allocation_count(), 1);
    }

    #[test]
    fn no_username_anonymity_with_rest_secrets() {
        // REST usernames carry their expiry and are not stored: a hash cannot find them, so a
        // server with secrets must not make clients hash (RFC 8489 §9.2.1).
        let mut h = h();
        let nonce = h.nonce(client(4000));
        assert_eq!(
            stun::security_features(&nonce),
            Some(feature::PASSWORD_ALGORITHMS)
        );
    }

    #[test]
    fn unpreparable_credentials_never_authenticate() {
        let creds = Credentials::new(vec![], vec![("eve".into(), "tab\there".into())]);
        let mut h = harness_creds(
            config(),
            FailureLimiter::new(1000, 1000),
            FakeRelays::default(),
            creds,
        );
        let c = client(4000);
        let nonce = h.nonce(c);
        // A client hashing the raw bytes (no OpaqueString) still gets only a 401.
        let key: [u8; 16] = Md5::digest(format!("eve:{REALM}:tab\there")).into();
        let mut v = Vec::new();
        let mut b = MessageBuilder::new(
            &mut v,
            MessageType::new(Method::ALLOCATE, Class::Request),
            tid(1),
        );
        b.requested_transport(17)
            .text(attr::USERNAME, "eve")
            .text(attr::REALM, REALM)
            .text(attr::NONCE, &nonce)
            .integrity(&key);
        b.finish().expect("fits");
        assert_eq!(h.send(c, &v), ClientAction::Reply);
        assert_eq!(error_code(&h.out), Some(401));
    }
}

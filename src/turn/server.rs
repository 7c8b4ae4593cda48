//! The thin Tokio layer of the TURN server: sockets in, [`Engine`] decisions out.
//!
//! - UDP: one socket per worker thread on `turn.listen` with `SO_REUSEPORT`, so the kernel spreads
//!   clients over both cores; each socket has its own receive loop.
//! - TCP (RFC 6062 framing, RFC 8656 §12.5 padding) on the same port, and TLS on the direct-TLS XMPP
//!   listeners when the client asks for ALPN `stun.turn` (`conn.rs` hands such streams to
//!   [`TurnService::serve_stream`]): XMPP and TURN share port 443.
//! - Relay sockets ([`RelayPool`], the engine's [`RelaySockets`]): one UDP socket per allocation on
//!   `turn.relay_address` in `turn.relay_ports`, each with a receive loop feeding
//!   [`Engine::on_peer`]. The relayed transport is always UDP.
//! - A one-second tick expires allocations, permissions and channels.
//!
//! Per-packet work allocates nothing: each loop owns its receive and send buffers. UDP is read and
//! written in batches (`mmsg`): a listener loop reads up to 32 datagrams per system call, and the
//! frames relay loops produce for UDP clients are queued and sent by the listener loop with one
//! `sendmmsg` per burst: a burst costs one system call, not one per datagram (BENCHMARKS.md, "TURN
//! relay": the kernel's per-datagram work, not the calls, is what remains).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use dashmap::DashMap;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::auth::{Credentials, FailureLimiter, Nonces};
use super::engine::{
    ClientAction, ClientId, Engine, EngineConfig, PeerAction, RelayId, RelaySockets, Transport,
};
use super::mmsg::{self, RecvBufs, SendQueue};
use super::peer::PeerFilter;
use super::stun;
use crate::config::TurnConfig;

/// Largest UDP datagram we read (STUN/ChannelData over UDP fit in one datagram).
const MAX_DATAGRAM: usize = 65_535;
/// Largest frame a TCP/TLS client may send (a ChannelData header plus a maximal UDP payload).
const MAX_STREAM_FRAME: usize = 4 + 65_535 + 3;
/// Frames waiting for a slow TCP/TLS client before further ones are dropped (UDP semantics).
const STREAM_QUEUE: usize = 256;
/// Random relay ports tried before an Allocate fails with 508.
const RELAY_PORT_TRIES: usize = 64;

/// A TURN startup problem, naming the config key. The OS error follows in the error chain.
#[derive(Debug, thiserror::Error)]
pub enum TurnError {
    #[error("`turn.listen` {addr}: cannot bind (is another server using this address?)")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("`{key}`: {message}")]
    Config { key: &'static str, message: String },
    #[error("cannot create {path}")]
    Secret {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// The running TURN server.
pub struct TurnService {
    engine: Arc<Engine>,
    pool: Arc<RelayPool>,
    /// The addresses actually bound (UDP; TCP on the same port when enabled).
    pub udp_addr: SocketAddr,
    pub tcp_addr: Option<SocketAddr>,
    /// What XEP-0215 mints credentials from.
    pub credentials: Arc<Credentials>,
    tcp_enabled: bool,
}

impl TurnService {
    /// Bind the listeners and start the loops (tracked by `tracker`, stopped by `cancel`). `None`
    /// when `turn.listen` is unset.
    pub fn start(
        config: &TurnConfig,
        domain: &str,
        data_dir: &Path,
        cancel: CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<Option<Arc<TurnService>>, TurnError> {
        let Some(listen) = config.listen else {
            return Ok(None);
        };
        let config_err = |key, message: String| TurnError::Config { key, message };
        let (lo, hi) = config
            .relay_port_range()
            .map_err(|m| config_err("turn.relay_ports", m))?;
        let peers = PeerFilter::new(&config.allow_peers, &config.deny_peers)
            .map_err(|m| config_err("turn.allow_peers", m))?;
        let secrets = if config.secrets.is_empty() {
            let (secret, path) = crate::store::load_or_create_secret(data_dir, "turn-secret")
                .map_err(|source| TurnError::Secret {
                    path: data_dir.join("turn-secret"),
                    source,
                })?;
            tracing::info!(
                "TURN REST secret in {} (no turn.secrets configured)",
                path.display()
            );
            vec![secret]
        } else {
            config.secrets.clone()
        };
        let users = super::auth::parse_static_users(&config.users);
        let credentials = Arc::new(Credentials::new(secrets, users));
        let relay_ip = config.relay_address.unwrap_or(listen.ip());

        let sockets = reuseport_sockets(listen)?;
        let udp_addr = sockets
            .first()
            .and_then(|s| s.local_addr().ok())
            .unwrap_or(listen);
        let tcp = if config.tcp {
            let std =
                std::net::TcpListener::bind(udp_addr).map_err(|source| TurnError::Listen {
                    addr: udp_addr,
                    source,
                })?;
            std.set_nonblocking(true)
                .and_then(|_| TcpListener::from_std(std))
                .map(Some)
                .map_err(|source| TurnError::Listen {
                    addr: udp_addr,
                    source,
                })?
        } else {
            None
        };
        let tcp_addr = tcp.as_ref().and_then(|l| l.local_addr().ok());

        let pool = Arc::new(RelayPool {
            engine: OnceLock::new(),
            me: OnceLock::new(),
            relays: DashMap::new(),
            streams: DashMap::new(),
            udp: OnceLock::new(),
            next_id: AtomicU64::new(1),
            ports: (lo, hi),
            cancel: cancel.clone(),
            tracker: tracker.clone(),
        });
        let mut key = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut key);
        let engine = Arc::new(Engine::new(
            EngineConfig {
                realm: config.realm.clone().unwrap_or_else(|| domain.to_string()),
                software: Some(concat!("tern/", env!("CARGO_PKG_VERSION")).to_string()),
                relay_ip,
                advertised_ip: config.external_address,
                default_lifetime: Duration::from_secs(config.default_lifetime_secs),
                max_lifetime: Duration::from_secs(config.max_lifetime_secs),
                max_allocations: config.max_allocations,
                max_allocations_per_user: config.max_allocations_per_user,
                max_bandwidth: config.max_bandwidth_bytes_per_sec,
            },
            credentials.clone(),
            Nonces::new(key, Duration::from_secs(config.nonce_lifetime_secs)),
            FailureLimiter::new(
                config.unauthenticated_per_sec,
                config.unauthenticated_per_sec.saturating_mul(2).max(1),
            ),
            peers,
            pool.clone(),
        ));
        let _ = pool.engine.set(Arc::downgrade(&engine));
        let _ = pool.me.set(Arc::downgrade(&pool));
        let listeners: Vec<Arc<UdpListener>> = sockets
            .into_iter()
            .map(|socket| {
                Arc::new(UdpListener {
                    socket,
                    outbox: Default::default(),
                    queued: tokio::sync::Notify::new(),
                })
            })
            .collect();
        for listener in &listeners {
            tracker.spawn(udp_loop(
                listener.clone(),
                udp_addr,
                engine.clone(),
                pool.clone(),
                cancel.clone(),
            ));
        }
        let _ = pool.udp.set(listeners);
        let service = Arc::new(TurnService {
            engine: engine.clone(),
            pool: pool.clone(),
            udp_addr,
            tcp_addr,
            credentials,
            tcp_enabled: config.tcp,
        });
        if let Some(listener) = tcp {
            tracker.spawn(tcp_accept_loop(
                listener,
                service.clone(),
                cancel.clone(),
                tracker.clone(),
            ));
        }
        tracker.spawn(expire_loop(engine, cancel));
        tracing::info!(
            "TURN on {udp_addr} (UDP{}), relays on {relay_ip} ports {lo}-{hi}",
            if tcp_addr.is_some() { " and TCP" } else { "" }
        );
        Ok(Some(service))
    }

    /// Whether TURN over TCP/TLS streams is accepted (`turn.tcp`).
    pub fn accepts_streams(&self) -> bool {
        self.tcp_enabled
    }

    /// Allocations at present.
    pub fn allocation_count(&self) -> usize {
        self.engine.allocation_count()
    }

    /// Serve one TCP or TLS client connection (RFC 6062 framing) until it closes or `cancel`.
    pub async fn serve_stream<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
        &self,
        io: S,
        client: ClientId,
        cancel: CancellationToken,
    ) {
        let (mut rd, mut wr) = tokio::io::split(io);
        let (tx, mut rx) = mpsc::channel::<Bytes>(STREAM_QUEUE);
        self.pool.streams.insert(client, tx.clone());
        let writer = async move {
            while let Some(frame) = rx.recv().await {
                if wr.write_all(&frame).await.is_err() {
                    break;
                }
            }
            let _ = wr.shutdown().await;
        };
        let engine = self.engine.clone();
        let pool = self.pool.clone();
        let reader = async move {
            let mut buf: Vec<u8> = Vec::with_capacity(4096);
            let mut out = Vec::with_capacity(1500);
            loop {
                // Handle every complete frame in the buffer, then read more.
                loop {
                    match stun::frame_len(&buf, MAX_STREAM_FRAME) {
                        stun::FrameLen::Complete(n) => {
                            out.clear();
                            let action = engine.on_client(
                                client,
                                &buf[..n],
                                Instant::now(),
                                SystemTime::now(),
                                &mut out,
                            );
                            match action {
                                ClientAction::None => {}
                                ClientAction::Reply => {
                                    let _ = tx.try_send(Bytes::copy_from_slice(&out));
                                }
                                ClientAction::Relay {
                                    relay,
                                    peer,
                                    payload,
                                } => pool.send_to_peer(
                                    relay,
                                    peer,
                                    buf.get(payload).unwrap_or_default(),
                                ),
                            }
                            buf.drain(..n);
                        }
                        stun::FrameLen::Incomplete => break,
                        stun::FrameLen::Invalid => return,
                    }
                }
                let read = tokio::select! {
                    r = rd.read_buf(&mut buf) => r,
                    _ = cancel.cancelled() => return,
                };
                match read {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        tokio::select! {
            _ = reader => {}
            _ = writer => {}
        }
        self.pool.streams.remove(&client);
        self.engine.on_client_closed(client);
    }
}

/// The engine's relay sockets, and the way back to stream clients.
pub struct RelayPool {
    /// Set right after the engine is built (the engine owns the pool, the loops need the engine).
    engine: OnceLock<Weak<Engine>>,
    /// Itself, for the relay loops it starts.
    me: OnceLock<Weak<RelayPool>>,
    relays: DashMap<RelayId, Relay>,
    /// Writers of TCP/TLS clients, for data from peers.
    streams: DashMap<ClientId, mpsc::Sender<Bytes>>,
    /// The UDP listener sockets, which carry relayed data to UDP clients.
    udp: OnceLock<Vec<Arc<UdpListener>>>,
    next_id: AtomicU64,
    ports: (u16, u16),
    cancel: CancellationToken,
    tracker: TaskTracker,
}

/// Frames queued for UDP clients at most, per listener, before relay loops send directly.
const OUTBOX_MAX: usize = 1024;

/// One UDP listener socket and the frames relay loops queued for its clients.
struct UdpListener {
    socket: UdpSocket,
    outbox: std::sync::Mutex<SendQueue>,
    /// Wakes the listener loop when the outbox turns non-empty.
    queued: tokio::sync::Notify,
}

impl UdpListener {
    /// Queue a frame for `to`; sent straight away when the outbox is full.
    fn queue(&self, to: SocketAddr, frame: &[u8]) {
        let mut outbox = self.outbox.lock().unwrap_or_else(|p| p.into_inner());
        if outbox.len() >= OUTBOX_MAX {
            drop(outbox);
            if !send_now(&self.socket, frame, to) {
                metrics::counter!("tern_turn_dropped_total", "reason" => "send_buffer")
                    .increment(1);
            }
            return;
        }
        let first = outbox.is_empty();
        outbox.push(to, frame);
        drop(outbox);
        if first {
            self.queued.notify_one();
        }
    }

    /// Send what the relay loops queued, together with `queue` (the loop's own answers).
    fn flush(&self, queue: &mut SendQueue) {
        {
            let mut outbox = self.outbox.lock().unwrap_or_else(|p| p.into_inner());
            if queue.is_empty() {
                std::mem::swap(queue, &mut outbox);
            } else {
                queue.append(&mut outbox);
            }
        }
        let dropped = queue.flush(&self.socket);
        if dropped > 0 {
            metrics::counter!("tern_turn_dropped_total", "reason" => "send_buffer")
                .increment(dropped as u64);
        }
    }
}

struct Relay {
    socket: Arc<UdpSocket>,
    task: tokio::task::AbortHandle,
}

impl RelayPool {
    /// Relay `payload` to `peer` from the allocation's socket. UDP: a full socket buffer drops the
    /// datagram, as the network would.
    fn send_to_peer(&self, relay: RelayId, peer: SocketAddr, payload: &[u8]) {
        let sent = match self.relays.get(&relay) {
            Some(r) => send_now(&r.socket, payload, peer),
            None => return,
        };
        if !sent {
            metrics::counter!("tern_turn_dropped_total", "reason" => "send_buffer").increment(1);
        }
    }

    /// Data from a peer, already framed by the engine, to its client.
    fn send_to_client(&self, client: ClientId, frame: &[u8]) {
        match client.transport {
            Transport::Udp => {
                // Any listener socket can answer (they share the address); spread by client.
                if let Some(listeners) = self.udp.get()
                    && let Some(l) =
                        listeners.get(usize::from(client.remote.port()) % listeners.len())
                {
                    l.queue(client.remote, frame);
                }
            }
            Transport::Tcp | Transport::Tls => {
                let tx = self.streams.get(&client).map(|t| t.clone());
                if let Some(tx) = tx {
                    // RFC 8656 §12.5: over TCP, ChannelData is padded to a multiple of four.
                    let mut frame = frame.to_vec();
                    if frame.first().is_some_and(|b| b & 0xC0 == 0x40) {
                        frame.resize(frame.len().next_multiple_of(4), 0);
                    }
                    if tx.try_send(Bytes::from(frame)).is_err() {
                        metrics::counter!("tern_turn_dropped_total", "reason" => "slow_client")
                            .increment(1);
                    }
                }
            }
        }
    }
}

impl RelayPool {
    /// Bind a relay socket on `ip:port` and start its receive loop.
    fn bind_relay(&self, ip: IpAddr, port: u16) -> std::io::Result<(RelayId, SocketAddr)> {
        let std = std::net::UdpSocket::bind((ip, port))?;
        std.set_nonblocking(true)?;
        let socket = Arc::new(UdpSocket::from_std(std)?);
        let addr = socket.local_addr()?;
        let id = RelayId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let engine = self.engine.get().cloned().unwrap_or_default();
        let pool = self.me.get().cloned().unwrap_or_default();
        let task = self.tracker.spawn(relay_loop(
            socket.clone(),
            id,
            engine,
            pool,
            self.cancel.clone(),
        ));
        self.relays.insert(
            id,
            Relay {
                socket,
                task: task.abort_handle(),
            },
        );
        Ok((id, addr))
    }
}

impl RelayPool {
    /// Bind a random free port of `turn.relay_ports`, only even ones when `even`.
    fn open_random(&self, ip: IpAddr, even: bool) -> std::io::Result<(RelayId, SocketAddr)> {
        let (lo, hi) = self.ports;
        let span = u32::from(hi - lo) + 1;
        let start: u32 = rand::random::<u32>() % span;
        let mut last = std::io::Error::new(std::io::ErrorKind::AddrInUse, "no free relay port");
        let mut tried = 0;
        for i in 0..span.min(4 * RELAY_PORT_TRIES as u32) {
            let port = lo + ((start + i * 7919) % span) as u16;
            if even && port % 2 == 1 {
                continue;
            }
            match self.bind_relay(ip, port) {
                Ok(r) => return Ok(r),
                Err(e) => last = e,
            }
            tried += 1;
            if tried == RELAY_PORT_TRIES {
                break;
            }
        }
        Err(last)
    }
}

impl RelaySockets for RelayPool {
    fn open(&self, ip: IpAddr) -> std::io::Result<(RelayId, SocketAddr)> {
        self.open_random(ip, false)
    }

    fn open_even(&self, ip: IpAddr) -> std::io::Result<(RelayId, SocketAddr)> {
        self.open_random(ip, true)
    }

    /// The odd port next to an even one (EVEN-PORT with R, RFC 8656 §7.2); only inside
    /// `turn.relay_ports`.
    fn open_port(&self, ip: IpAddr, port: u16) -> std::io::Result<(RelayId, SocketAddr)> {
        let (lo, hi) = self.ports;
        if !(lo..=hi).contains(&port) {
            return Err(std::io::ErrorKind::AddrNotAvailable.into());
        }
        self.bind_relay(ip, port)
    }

    fn close(&self, id: RelayId) {
        if let Some((_, relay)) = self.relays.remove(&id) {
            relay.task.abort();
        }
    }
}

/// Datagrams one relay socket read gets at most (peers send in bursts of a few).
const RELAY_SLOTS: usize = 8;
/// Reads per relay-socket wake-up before the loop yields to other tasks.
const RELAY_ROUNDS: usize = 8;

thread_local! {
    /// Receive and frame buffers shared by every relay socket served on this worker thread: a
    /// burst is received and handled within one poll, so an allocation owns no buffer at all
    /// (64 KiB each would dwarf everything else an allocation costs).
    static RELAY_BUFS: std::cell::RefCell<(RecvBufs, Vec<u8>)> = std::cell::RefCell::new((
        RecvBufs::new(RELAY_SLOTS, MAX_DATAGRAM),
        Vec::with_capacity(MAX_DATAGRAM + 36),
    ));
}

/// One batched read of `socket` into `bufs`. False when the socket is drained (or failed), in
/// which case tokio's readiness was cleared for a drained socket, so the caller waits again.
fn read_batch(socket: &UdpSocket, bufs: &mut RecvBufs) -> bool {
    bufs.clear();
    let mut more = false;
    // A short read means the queue was empty: report WouldBlock so tokio clears the readiness
    // (it keeps it if an event arrived meanwhile) instead of paying for an extra EAGAIN read.
    let _ = socket.try_io(tokio::io::Interest::READABLE, || match bufs.recv(socket) {
        Ok(true) => {
            more = true;
            Ok(())
        }
        Ok(false) => Err(std::io::ErrorKind::WouldBlock.into()),
        Err(e) => Err(e),
    });
    more
}

/// Receive loop of one relay socket: peer datagrams to the engine, then to the client.
async fn relay_loop(
    socket: Arc<UdpSocket>,
    id: RelayId,
    engine: Weak<Engine>,
    pool: Weak<RelayPool>,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            r = socket.readable() => if r.is_err() { return },
            _ = cancel.cancelled() => return,
        }
        let (Some(engine), Some(pool)) = (engine.upgrade(), pool.upgrade()) else {
            return;
        };
        RELAY_BUFS.with(|cell| {
            let (bufs, out) = &mut *cell.borrow_mut();
            for _ in 0..RELAY_ROUNDS {
                let more = read_batch(&socket, bufs);
                let now = Instant::now();
                for (data, peer) in bufs.iter() {
                    if let PeerAction::ToClient { client } =
                        engine.on_peer(id, peer, data, now, out)
                    {
                        pool.send_to_client(client, out);
                    }
                }
                if !more {
                    return;
                }
            }
        });
    }
}

/// `sendto` straight away: a UDP socket is writable unless its buffer is full, and tokio's
/// readiness may not know that yet for a socket created a moment ago. False when not sent.
fn send_now(socket: &UdpSocket, data: &[u8], to: SocketAddr) -> bool {
    socket2::SockRef::from(socket)
        .send_to(data, &to.into())
        .is_ok()
}

/// Batches a listener loop handles per wake-up before it yields to other tasks.
const LISTENER_ROUNDS: usize = 4;

/// Loop of one UDP listener socket: client datagrams to the engine (answers and relayed data
/// out), and the frames relay loops queued for UDP clients.
async fn udp_loop(
    listener: Arc<UdpListener>,
    local: SocketAddr,
    engine: Arc<Engine>,
    pool: Arc<RelayPool>,
    cancel: CancellationToken,
) {
    let mut bufs = RecvBufs::new(mmsg::BATCH, MAX_DATAGRAM);
    let mut out = Vec::with_capacity(1500);
    let mut answers = SendQueue::default();
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            r = listener.socket.readable() => {
                if r.is_err() {
                    continue;
                }
                for _ in 0..LISTENER_ROUNDS {
                    let more = read_batch(&listener.socket, &mut bufs);
                    let now = Instant::now();
                    let wall = SystemTime::now();
                    for (data, remote) in bufs.iter() {
                        let client = ClientId {
                            transport: Transport::Udp,
                            remote,
                            local,
                        };
                        match engine.on_client(client, data, now, wall, &mut out) {
                            ClientAction::None => {}
                            ClientAction::Reply => answers.push(remote, &out),
                            ClientAction::Relay {
                                relay,
                                peer,
                                payload,
                            } => pool.send_to_peer(relay, peer, data.get(payload).unwrap_or_default()),
                        }
                    }
                    if !more {
                        break;
                    }
                }
            }
            _ = listener.queued.notified() => {
                // Let the relay loops woken with this one queue their frames first: one burst.
                tokio::task::yield_now().await;
            }
        }
        listener.flush(&mut answers);
    }
}

async fn tcp_accept_loop(
    listener: TcpListener,
    service: Arc<TurnService>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let local = listener.local_addr().ok();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = cancel.cancelled() => return,
        };
        let (tcp, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "TURN TCP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let client = ClientId {
            transport: Transport::Tcp,
            remote,
            local: local.unwrap_or(remote),
        };
        let service = service.clone();
        let cancel = cancel.clone();
        tracker.spawn(async move { service.serve_stream(tcp, client, cancel).await });
    }
}

async fn expire_loop(engine: Arc<Engine>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => engine.expire(Instant::now()),
            _ = cancel.cancelled() => return,
        }
    }
}

/// One UDP socket per worker thread on `addr` with `SO_REUSEPORT` (the first fixes the port when
/// `addr` asks for port 0).
///
/// `SO_REUSEPORT` would let a second server of the same user join the group silently and take
/// half of the clients, so a plain bind probes the address first: an address in use fails here,
/// naming `turn.listen`.
fn reuseport_sockets(addr: SocketAddr) -> Result<Vec<UdpSocket>, TurnError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let err = |source| TurnError::Listen { addr, source };
    let mut bind_addr = std::net::UdpSocket::bind(addr)
        .and_then(|probe| probe.local_addr())
        .map_err(err)?;
    let n = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8);
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
            .map_err(err)?;
        socket.set_reuse_port(true).map_err(err)?;
        socket.set_nonblocking(true).map_err(err)?;
        // Bursts of small packets: a larger receive buffer loses fewer of them.
        let _ = socket.set_recv_buffer_size(4 * 1024 * 1024);
        let _ = socket.set_send_buffer_size(4 * 1024 * 1024);
        socket.bind(&bind_addr.into()).map_err(err)?;
        if let Ok(Some(a)) = socket.local_addr().map(|a| a.as_socket()) {
            bind_addr = a;
        }
        out.push(UdpSocket::from_std(socket.into()).map_err(err)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A second server on the same `turn.listen` must fail rather than share the port.
    #[tokio::test]
    async fn a_second_listener_on_the_same_port_fails() {
        let first = reuseport_sockets("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = first[0].local_addr().unwrap();
        match reuseport_sockets(addr) {
            Err(TurnError::Listen { source, .. }) => {
                assert_eq!(source.kind(), std::io::ErrorKind::AddrInUse)
            }
            other => panic!("expected AddrInUse, got {:?}", other.map(|v| v.len())),
        }
        drop(first);
        assert!(
            reuseport_sockets(addr).is_ok(),
            "free again after the first closed"
        );
    }
}

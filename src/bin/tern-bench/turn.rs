//! Scenario `turn`: allocations/s and relayed packets/s through any TURN server (Tern, coturn),
//! over UDP, with Tern's own STUN codec (`tern::turn::stun`) on the client side.
//!
//! 1. Allocate: `--allocations` allocations, each from its own UDP socket (source addresses
//!    rotated over `--source-ips`), `--alloc-concurrency` in flight. Each does what a real client
//!    does (RFC 8656 §7.1, RFC 8489 §9.2): an unauthenticated Allocate, the 401 with REALM and
//!    NONCE, then the authenticated Allocate; the latency covers both round trips.
//! 2. Relay: each allocation gets a permission and a channel (RFC 8656 §9, §12) to a UDP echo
//!    peer this process runs on 127.0.0.1 (or Send/Data indications with `--send-indications`,
//!    §10–11), then sends `--payload`-byte packets for `--duration` seconds at an aggregate
//!    `--rate`, or with `--rate 0` as fast as echoes return with at most `--window` unanswered per
//!    allocation. Each payload starts with a sequence number and a CLOCK_MONOTONIC send stamp, so
//!    the echo gives the round trip.
//!
//! Sockets are driven with `recvmmsg`/`sendmmsg` (a batch per wake-up on each allocation socket,
//! and on the echo peer's thread), so the load generator makes fewer syscalls than the server. Its
//! CPU per echo is still about the server's (the kernel's per-datagram work dominates and, on
//! loopback, the sender pays for delivery; see BENCHMARKS.md), so it is reported as
//! `bench_cpu_util`.
//!
//! Credentials: `--user/--password` (static long-term), or `--secret` (TURN REST API: username
//! `expiry:user`, password base64(HMAC-SHA1(secret, username)), as Tern and coturn's
//! `use-auth-secret` check). The realm is learned from the 401 unless `--realm` is given.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket as StdUdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use clap::Args;
use serde::Serialize;
use tern::turn::auth::Credentials;
use tern::turn::stun::{
    self, Attribute, Class, LongTermKey, Message, MessageBuilder, MessageType, Method, PacketKind,
    TransactionId, attr, code,
};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;

use crate::connect::round;
use crate::engine::mono_ns;
use crate::net::{self, SourceIps};
use crate::stats::{self, Histogram, Percentiles, ServerMeter};

/// Datagrams per `recvmmsg`/`sendmmsg` call.
const BATCH: usize = 32;
/// Receive buffer per datagram: payloads are limited to fit with the STUN/ChannelData framing.
const DGRAM: usize = 2048;
/// Payload bytes the harness needs: sequence number and send stamp.
const STAMP_LEN: usize = 16;
/// Channel number every allocation binds (channels are per allocation, RFC 8656 §12).
const CHANNEL: u16 = 0x4000;
/// STUN retransmission interval over UDP (RFC 8489 §6.2.1 RTO, kept fixed).
const RTO: Duration = Duration::from_millis(500);
/// With a window, an allocation that heard nothing for this long writes its window off as lost
/// and sends a fresh one (so one lost datagram cannot stall it for the rest of the run).
const STALL: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Args)]
pub struct TurnArgs {
    /// TURN server (UDP).
    #[arg(long, default_value = "127.0.0.1:3478")]
    pub server: SocketAddr,
    /// Username (static long-term credential) or the user part of a REST username.
    #[arg(long, default_value = "bench")]
    pub user: String,
    /// Static long-term password.
    #[arg(
        long,
        env = "TERN_BENCH_TURN_PASSWORD",
        hide_env_values = true,
        conflicts_with = "secret",
        required_unless_present = "secret"
    )]
    pub password: Option<String>,
    /// TURN REST API shared secret: username `expiry:user`, password
    /// base64(HMAC-SHA1(secret, username)).
    #[arg(long, env = "TERN_BENCH_TURN_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// Seconds the REST username is valid for.
    #[arg(long, default_value_t = 86_400)]
    pub ttl: u64,
    /// Realm for the key; by default the one the server's 401 names.
    #[arg(long)]
    pub realm: Option<String>,
    /// Allocations to create (one UDP socket each).
    #[arg(long, default_value_t = 100)]
    pub allocations: u64,
    /// Allocate transactions in flight at once.
    #[arg(long, default_value_t = 64)]
    pub alloc_concurrency: usize,
    /// Source addresses of the allocation sockets, rotated (range and/or list, e.g.
    /// `127.0.0.1-127.0.0.50`): servers limit unauthenticated answers per source address.
    #[arg(long, default_value = "127.0.0.1", value_parser = SourceIps::parse)]
    pub source_ips: SourceIps,
    /// Packets per second sent by all allocations together; 0 = as fast as echoes return, with at
    /// most --window unanswered per allocation.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Unanswered packets per allocation with --rate 0.
    #[arg(long, default_value_t = 4)]
    pub window: usize,
    /// Application bytes per packet (at least 16: sequence number and send stamp).
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// Seconds of relaying (0 = allocations only).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds to wait after sending for echoes still under way; later ones count as lost.
    #[arg(long, default_value_t = 2.0)]
    pub drain: f64,
    /// Send indications (Send/Data, RFC 8656 §10–11) instead of ChannelData.
    #[arg(long)]
    pub send_indications: bool,
    /// Use this UDP echo peer instead of running one on 127.0.0.1.
    #[arg(long)]
    pub peer: Option<SocketAddr>,
    /// Time limit of one STUN transaction including retransmissions, seconds.
    #[arg(long, default_value_t = 5.0)]
    pub request_timeout: f64,
    /// Overall time limit in seconds.
    #[arg(long, default_value_t = 120.0)]
    pub timeout: f64,
    /// PID of the server: report its CPU time and RSS.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Tokio worker threads (default 1: with the echo peer's thread that is two busy threads).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

impl TurnArgs {
    fn validate(&self) -> anyhow::Result<()> {
        if self.allocations == 0 || self.alloc_concurrency == 0 {
            bail!("--allocations and --alloc-concurrency must be at least 1");
        }
        if !(STAMP_LEN..=1200).contains(&self.payload) {
            bail!("--payload must be {STAMP_LEN} to 1200 bytes");
        }
        if !(self.rate >= 0.0 && self.rate.is_finite()) {
            bail!("--rate must be a non-negative number");
        }
        if self.rate == 0.0 && self.window == 0 {
            bail!("--window must be at least 1 with --rate 0");
        }
        for (name, v) in [
            ("--duration", self.duration),
            ("--drain", self.drain),
            ("--request-timeout", self.request_timeout),
            ("--timeout", self.timeout),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                bail!("{name} must not be negative");
            }
        }
        if self.request_timeout == 0.0 || self.timeout == 0.0 {
            bail!("--request-timeout and --timeout must be positive");
        }
        Ok(())
    }

    /// (username, password) to authenticate with.
    fn credentials(&self) -> anyhow::Result<(String, String)> {
        match (&self.secret, &self.password) {
            (Some(secret), None) => {
                let (user, pass, _) = Credentials::new(vec![secret.clone()], Vec::new())
                    .mint(&self.user, Duration::from_secs(self.ttl), SystemTime::now())
                    .context("cannot mint a REST username (--user too long?)")?;
                Ok((user, pass))
            }
            (None, Some(p)) => Ok((self.user.clone(), p.clone())),
            _ => bail!("give exactly one of --password and --secret"),
        }
    }
}

pub fn main(args: TurnArgs) -> anyhow::Result<()> {
    args.validate()?;
    let nofile = net::raise_nofile();
    if args.allocations + 64 > nofile {
        bail!(
            "{} allocations need as many sockets but the open-files limit is {nofile}",
            args.allocations
        );
    }
    let rt = crate::connect::runtime(args.threads.max(1))?;
    rt.block_on(orchestrate(args))
}

// ---------------------------------------------------------------------------------------------
// Batched datagram I/O
// ---------------------------------------------------------------------------------------------

/// Receive buffers for one `recvmmsg`, with the sender addresses (for the echo peer).
struct RecvBatch {
    bufs: Vec<[u8; DGRAM]>,
    lens: [usize; BATCH],
    addrs: Vec<libc::sockaddr_storage>,
    addr_lens: [libc::socklen_t; BATCH],
}

impl RecvBatch {
    fn new() -> Self {
        // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
        let zero: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        RecvBatch {
            bufs: vec![[0u8; DGRAM]; BATCH],
            lens: [0; BATCH],
            addrs: vec![zero; BATCH],
            addr_lens: [0; BATCH],
        }
    }

    fn get(&self, i: usize) -> &[u8] {
        &self.bufs[i][..self.lens[i].min(DGRAM)]
    }

    /// One non-blocking (`wait_one` = false) or blocking-until-one `recvmmsg(2)`; the count.
    fn recv(&mut self, fd: RawFd, wait_one: bool) -> io::Result<usize> {
        // SAFETY: mmsghdr/iovec are plain data; zeroed is valid and every pointer used by the
        // kernel is set below to buffers that outlive the call.
        let mut iovs: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for i in 0..BATCH {
            iovs[i].iov_base = self.bufs[i].as_mut_ptr().cast();
            iovs[i].iov_len = DGRAM;
            msgs[i].msg_hdr.msg_iov = &mut iovs[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            msgs[i].msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        }
        let flags = if wait_one {
            libc::MSG_WAITFORONE
        } else {
            libc::MSG_DONTWAIT
        };
        // SAFETY: `msgs` holds BATCH initialised headers pointing at live buffers.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                flags,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for (i, m) in msgs.iter().take(n).enumerate() {
            self.lens[i] = m.msg_len as usize;
            self.addr_lens[i] = m.msg_hdr.msg_namelen;
        }
        Ok(n)
    }
}

/// One `sendmmsg(2)` of `pkts` (at most [`BATCH`]); to `addrs` if given, else on a connected
/// socket. Returns how many were sent.
fn send_batch(
    fd: RawFd,
    pkts: &[&[u8]],
    addrs: Option<(&[libc::sockaddr_storage], &[libc::socklen_t])>,
) -> io::Result<usize> {
    let n = pkts.len().min(BATCH);
    // SAFETY: as in `RecvBatch::recv`; the kernel only reads the buffers.
    let mut iovs: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    for i in 0..n {
        iovs[i].iov_base = pkts[i].as_ptr() as *mut libc::c_void;
        iovs[i].iov_len = pkts[i].len();
        msgs[i].msg_hdr.msg_iov = &mut iovs[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        if let Some((Some(a), Some(l))) = addrs.map(|(a, l)| (a.get(i), l.get(i))) {
            msgs[i].msg_hdr.msg_name = (a as *const libc::sockaddr_storage).cast_mut().cast();
            msgs[i].msg_hdr.msg_namelen = *l;
        }
    }
    // SAFETY: `msgs[..n]` are initialised headers pointing at live buffers.
    let r = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), n as libc::c_uint, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

/// A UDP socket with bigger buffers (bursts of echoes must not overflow the default ones).
fn udp_socket(bind: SocketAddr, buf_bytes: usize) -> io::Result<StdUdpSocket> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(bind),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    let _ = s.set_recv_buffer_size(buf_bytes);
    let _ = s.set_send_buffer_size(buf_bytes);
    s.bind(&bind.into())?;
    Ok(s.into())
}

// ---------------------------------------------------------------------------------------------
// Echo peer
// ---------------------------------------------------------------------------------------------

/// The UDP echo peer on its own thread: every datagram goes back to where it came from, a batch
/// per `recvmmsg`/`sendmmsg`. Stops when `stop` is set (checked every 100 ms).
struct EchoPeer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl EchoPeer {
    fn start() -> anyhow::Result<EchoPeer> {
        let sock = udp_socket(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), 8 << 20)
            .context("echo peer socket")?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let addr = sock.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("echo-peer".into())
            .spawn(move || {
                let mut batch = RecvBatch::new();
                let mut echoed = 0u64;
                let fd = sock.as_raw_fd();
                while !flag.load(Ordering::Relaxed) {
                    let n = match batch.recv(fd, true) {
                        Ok(n) => n,
                        Err(_) => continue, // timeout (EAGAIN) or EINTR: check the flag
                    };
                    let mut done = 0;
                    while done < n {
                        let pkts: Vec<&[u8]> = (done..n).map(|i| batch.get(i)).collect();
                        let addrs = (&batch.addrs[done..n], &batch.addr_lens[done..n]);
                        match send_batch(fd, &pkts, Some(addrs)) {
                            Ok(k) if k > 0 => done += k,
                            _ => break, // a full buffer drops the rest, as a network would
                        }
                    }
                    echoed += done as u64;
                }
                echoed
            })?;
        Ok(EchoPeer {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for EchoPeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// STUN client
// ---------------------------------------------------------------------------------------------

fn new_tid() -> TransactionId {
    // RFC 8489 §5: transaction ids are uniformly random.
    TransactionId(rand::random())
}

/// The parts of a response the client needs, owned.
#[derive(Debug, Default)]
struct Answer {
    success: bool,
    code: Option<u16>,
    realm: Option<String>,
    nonce: Option<String>,
    relayed: Option<SocketAddr>,
}

/// Long-term credential state of one allocation (RFC 8489 §9.2).
struct Auth {
    username: String,
    password: String,
    realm: String,
    nonce: String,
    /// Derived from the first 401 (`Auth::learn`); `None` before, or when the credentials are not
    /// valid OpaqueStrings (requests then go unsigned and the server answers 401).
    key: Option<LongTermKey>,
}

impl Auth {
    /// Adopt the REALM/NONCE of a 401 or 438 (RFC 8489 §9.2.4–9.2.5) and derive the key for that
    /// realm (`fixed_realm` overrides it); false when the answer carries no NONCE.
    fn learn(&mut self, a: &Answer, fixed_realm: Option<&str>) -> bool {
        let Some(nonce) = &a.nonce else {
            return false;
        };
        self.nonce = nonce.clone();
        self.realm = fixed_realm
            .or(a.realm.as_deref())
            .unwrap_or_default()
            .to_string();
        self.key = LongTermKey::md5(&self.username, &self.realm, &self.password).ok();
        true
    }
}

/// One allocation's socket and credentials.
struct Client {
    sock: UdpSocket,
    auth: Auth,
    request_timeout: Duration,
    buf: Vec<u8>,
}

/// What an authenticated request carries besides the credentials.
enum Req {
    Allocate,
    Permission(SocketAddr),
    Channel(SocketAddr),
    Delete,
}

impl Req {
    fn method(&self) -> Method {
        match self {
            Req::Allocate => Method::ALLOCATE,
            Req::Permission(_) => Method::CREATE_PERMISSION,
            Req::Channel(_) => Method::CHANNEL_BIND,
            Req::Delete => Method::REFRESH,
        }
    }
}

impl Client {
    fn new(sock: UdpSocket, username: &str, password: &str, request_timeout: Duration) -> Client {
        Client {
            sock,
            auth: Auth {
                username: username.to_string(),
                password: password.to_string(),
                realm: String::new(),
                nonce: String::new(),
                key: None,
            },
            request_timeout,
            buf: Vec::with_capacity(256),
        }
    }

    /// Builds the request: its attributes, then USERNAME/REALM/NONCE/MESSAGE-INTEGRITY once a
    /// nonce is known (RFC 8489 §9.2.3).
    fn build(&mut self, req: &Req, tid: TransactionId) -> Result<(), String> {
        self.buf.clear();
        let mut b = MessageBuilder::new(
            &mut self.buf,
            MessageType::new(req.method(), Class::Request),
            tid,
        );
        match req {
            // REQUESTED-TRANSPORT: UDP (RFC 8656 §7.1).
            Req::Allocate => b.requested_transport(17),
            Req::Permission(peer) => b.xor_address(attr::XOR_PEER_ADDRESS, *peer),
            Req::Channel(peer) => b
                .channel_number(CHANNEL)
                .xor_address(attr::XOR_PEER_ADDRESS, *peer),
            Req::Delete => b.u32_value(attr::LIFETIME, 0),
        };
        if let (false, Some(key)) = (self.auth.nonce.is_empty(), &self.auth.key) {
            b.text(attr::USERNAME, &self.auth.username)
                .text(attr::REALM, &self.auth.realm)
                .text(attr::NONCE, &self.auth.nonce)
                .integrity(key.as_bytes());
        }
        b.finish().map(|_| ()).map_err(|e| e.to_string())
    }

    /// One transaction: send, retransmit every [`RTO`], return the matching response.
    async fn transact(&mut self, req: &Req) -> Result<Answer, String> {
        let tid = new_tid();
        self.build(req, tid)?;
        let deadline = tokio::time::Instant::now() + self.request_timeout;
        let mut rx = [0u8; DGRAM];
        loop {
            self.sock
                .send(&self.buf)
                .await
                .map_err(|e| format!("send:{:?}", e.kind()))?;
            let resend = (tokio::time::Instant::now() + RTO).min(deadline);
            loop {
                let n = match tokio::time::timeout_at(resend, self.sock.recv(&mut rx)).await {
                    Err(_) => break,
                    Ok(Ok(n)) => n,
                    // ICMP port unreachable shows up as ECONNREFUSED on a connected socket.
                    Ok(Err(e)) => return Err(format!("recv:{:?}", e.kind())),
                };
                let Ok(m) = Message::parse(&rx[..n]) else {
                    continue; // ChannelData or noise
                };
                if m.transaction_id() != tid || m.method() != req.method() {
                    continue;
                }
                return Ok(answer(&m));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err("timeout".into());
            }
        }
    }

    /// An authenticated transaction: adopts a new NONCE on 401/438 and retries (twice at most).
    async fn request(&mut self, req: &Req, fixed_realm: Option<&str>) -> Result<Answer, String> {
        for _ in 0..3 {
            let a = self.transact(req).await?;
            match a.code {
                _ if a.success => return Ok(a),
                // A 401 to a request without credentials gives realm and nonce; a 401 to one with
                // credentials means they are wrong (RFC 8489 §9.2.5), so it is not retried.
                Some(code::UNAUTHENTICATED)
                    if self.auth.nonce.is_empty() && self.auth.learn(&a, fixed_realm) =>
                {
                    continue;
                }
                Some(code::STALE_NONCE) if self.auth.learn(&a, fixed_realm) => continue,
                Some(code::UNAUTHENTICATED) => return Err("error-401-credentials".into()),
                Some(c) => return Err(format!("error-{c}")),
                None => return Err("error-without-code".into()),
            }
        }
        Err("auth-loop".into())
    }
}

fn answer(m: &Message<'_>) -> Answer {
    let code = match m.decode(attr::ERROR_CODE) {
        Ok(Some(Attribute::ErrorCode { code, .. })) => Some(code),
        _ => None,
    };
    Answer {
        success: m.class() == Class::Success,
        code,
        realm: m.text(attr::REALM).ok().flatten().map(str::to_string),
        nonce: m.text(attr::NONCE).ok().flatten().map(str::to_string),
        relayed: m.xor_address(attr::XOR_RELAYED_ADDRESS).ok().flatten(),
    }
}

/// Allocation `i`: a socket from the `i`-th source address, then Allocate (the first attempt
/// draws the 401 that tells realm and nonce).
async fn allocate(
    args: &TurnArgs,
    i: u64,
    username: &str,
    password: &str,
) -> Result<(Client, SocketAddr), String> {
    let src = match args.source_ips.pick(i) {
        IpAddr::V4(a) if args.server.is_ipv4() => IpAddr::V4(a),
        IpAddr::V6(a) if args.server.is_ipv6() => IpAddr::V6(a),
        _ => return Err("source-address-family".into()),
    };
    let std_sock = udp_socket(SocketAddr::new(src, 0), 256 << 10)
        .map_err(|e| format!("bind:{:?}", e.kind()))?;
    std_sock
        .connect(args.server)
        .and_then(|()| std_sock.set_nonblocking(true))
        .map_err(|e| format!("connect:{:?}", e.kind()))?;
    let sock = UdpSocket::from_std(std_sock).map_err(|e| format!("socket:{:?}", e.kind()))?;
    let mut c = Client::new(
        sock,
        username,
        password,
        Duration::from_secs_f64(args.request_timeout),
    );
    let a = c.request(&Req::Allocate, args.realm.as_deref()).await?;
    let relayed = a.relayed.ok_or("no-relayed-address")?;
    Ok((c, relayed))
}

// ---------------------------------------------------------------------------------------------
// Relay load
// ---------------------------------------------------------------------------------------------

/// Everything the relay tasks share.
struct Plan {
    peer: SocketAddr,
    indications: bool,
    payload: usize,
    /// Packets per second per allocation; 0 = windowed.
    rate: f64,
    window: usize,
    start: tokio::time::Instant,
    end: tokio::time::Instant,
    drain_end: tokio::time::Instant,
    /// Live totals for the progress lines.
    sent: AtomicU64,
    received: AtomicU64,
}

/// What one allocation's relay task measured.
#[derive(Default)]
struct RelayStats {
    sent: u64,
    received: u64,
    /// Datagrams that were neither an echo nor a STUN message.
    junk: u64,
    first_send_ns: u64,
    last_recv_ns: u64,
    rtt: Histogram,
    error: Option<String>,
}

impl RelayStats {
    fn merge(&mut self, o: &RelayStats) {
        self.sent += o.sent;
        self.received += o.received;
        self.junk += o.junk;
        if o.first_send_ns != 0 && (self.first_send_ns == 0 || o.first_send_ns < self.first_send_ns)
        {
            self.first_send_ns = o.first_send_ns;
        }
        self.last_recv_ns = self.last_recv_ns.max(o.last_recv_ns);
        self.rtt.merge(&o.rtt);
    }
}

/// Appends packet `seq` (ChannelData, or a Send indication) to `out`.
fn write_packet(out: &mut Vec<u8>, plan: &Plan, seq: u64) {
    let mut payload = [0u8; 1200];
    payload[..8].copy_from_slice(&seq.to_be_bytes());
    payload[8..16].copy_from_slice(&mono_ns().to_be_bytes());
    let payload = &payload[..plan.payload];
    if plan.indications {
        let mut tid = [0u8; 12];
        tid[4..].copy_from_slice(&seq.to_be_bytes());
        let mut b = MessageBuilder::new(
            out,
            MessageType::new(Method::SEND, Class::Indication),
            TransactionId(tid),
        );
        b.xor_address(attr::XOR_PEER_ADDRESS, plan.peer)
            .data(payload);
        let _ = b.finish(); // at most 1200 bytes: always fits
    } else {
        let _ = stun::write_channel_data(out, CHANNEL, payload, false);
    }
}

/// The echoed payload in a datagram from the server: ChannelData on our channel, or a Data
/// indication (RFC 8656 §11.4, §12.4).
fn echoed_payload(d: &[u8]) -> Option<&[u8]> {
    match stun::classify(d) {
        PacketKind::ChannelData => match stun::parse_channel_data(d) {
            Some((CHANNEL, p)) => Some(p),
            _ => None,
        },
        PacketKind::Stun => {
            let m = Message::parse(d).ok()?;
            if m.method() != Method::DATA || m.class() != Class::Indication {
                return None;
            }
            m.get(attr::DATA).map(|a| a.value)
        }
        PacketKind::Other => None,
    }
}

/// Send whatever is due and read echoes until the drain ends.
async fn relay(client: &Client, plan: &Plan) -> RelayStats {
    let mut st = RelayStats::default();
    let fd = client.sock.as_raw_fd();
    let mut rx = RecvBatch::new();
    let mut out: Vec<u8> = Vec::with_capacity(BATCH * (plan.payload + 64));
    let mut offsets: Vec<usize> = Vec::with_capacity(BATCH + 1);
    let mut last_rx = tokio::time::Instant::now();
    let tick = if plan.rate > 0.0 {
        Duration::from_secs_f64((1.0 / plan.rate).clamp(0.001, 0.05))
    } else {
        STALL
    };
    loop {
        let now = tokio::time::Instant::now();
        let sending = now < plan.end;
        if !sending && (now >= plan.drain_end || st.received >= st.sent) {
            return st;
        }
        // How many to send now.
        let want = if !sending {
            0
        } else if plan.rate > 0.0 {
            let due = (now.duration_since(plan.start).as_secs_f64() * plan.rate) as u64 + 1;
            due.saturating_sub(st.sent)
        } else {
            let outstanding = st.sent.saturating_sub(st.received);
            if outstanding > 0 && now.duration_since(last_rx) >= STALL {
                // Write the window off (the stragglers count as lost unless they still come).
                last_rx = now;
                plan.window as u64
            } else {
                (plan.window as u64).saturating_sub(outstanding)
            }
        };
        let mut left = want;
        while left > 0 {
            out.clear();
            offsets.clear();
            let n = left.min(BATCH as u64);
            for k in 0..n {
                offsets.push(out.len());
                write_packet(&mut out, plan, st.sent + k);
            }
            offsets.push(out.len());
            let pkts: Vec<&[u8]> = offsets.windows(2).map(|w| &out[w[0]..w[1]]).collect();
            let r = client
                .sock
                .try_io(Interest::WRITABLE, || send_batch(fd, &pkts, None));
            let k = match r {
                Ok(k) => k as u64,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Full socket buffer: wait for room (bounded by the drain end).
                    let _ = tokio::time::timeout_at(plan.drain_end, client.sock.writable()).await;
                    continue;
                }
                Err(e) => {
                    st.error = Some(format!("send:{:?}", e.kind()));
                    return st;
                }
            };
            if st.first_send_ns == 0 && k > 0 {
                st.first_send_ns = mono_ns();
            }
            st.sent += k;
            plan.sent.fetch_add(k, Ordering::Relaxed);
            left = left.saturating_sub(k);
            if tokio::time::Instant::now() >= plan.end {
                break;
            }
        }
        // Wait for echoes (or the next send slot), then drain the socket.
        let wake = if sending {
            (tokio::time::Instant::now() + tick).min(plan.end)
        } else {
            plan.drain_end
        };
        if tokio::time::timeout_at(wake, client.sock.readable())
            .await
            .is_err()
        {
            continue;
        }
        loop {
            let n = match client
                .sock
                .try_io(Interest::READABLE, || rx.recv(fd, false))
            {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    st.error = Some(format!("recv:{:?}", e.kind()));
                    return st;
                }
            };
            let now_ns = mono_ns();
            let mut got = 0;
            for i in 0..n {
                match echoed_payload(rx.get(i)).and_then(|p| p.get(8..16)) {
                    Some(stamp) => {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(stamp);
                        st.rtt
                            .record(now_ns.saturating_sub(u64::from_be_bytes(b)) / 1000);
                        got += 1;
                    }
                    None => st.junk += 1,
                }
            }
            if got > 0 {
                st.received += got;
                st.last_recv_ns = now_ns;
                last_rx = tokio::time::Instant::now();
                plan.received.fetch_add(got, Ordering::Relaxed);
            }
            if n < BATCH {
                break;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Orchestration
// ---------------------------------------------------------------------------------------------

fn bump(map: &mut BTreeMap<String, u64>, key: String) {
    *map.entry(key).or_default() += 1;
}

async fn orchestrate(args: TurnArgs) -> anyhow::Result<()> {
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(args.timeout);
    let (username, password) = args.credentials()?;
    let mut server = ServerMeter::new(args.server_pid)?;
    let bench_cpu = || stats::cpu_ms("self").unwrap_or(0);

    // 1. Allocations.
    let args = Arc::new(args);
    let sem = Arc::new(Semaphore::new(args.alloc_concurrency));
    let alloc_t0 = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..args.allocations {
        let (args, sem) = (args.clone(), sem.clone());
        let (u, p) = (username.clone(), password.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await.ok()?;
            let t = Instant::now();
            let r = tokio::time::timeout_at(deadline, allocate(&args, i, &u, &p)).await;
            let r = r.unwrap_or_else(|_| Err("overall-timeout".into()));
            Some((r, t.elapsed(), tokio::time::Instant::now()))
        }));
    }
    let mut clients = Vec::new();
    let mut alloc_failures = BTreeMap::new();
    let mut alloc_hist = Histogram::default();
    let mut last_alloc = alloc_t0;
    for t in tasks {
        match t.await {
            Ok(Some((Ok((c, relayed)), took, done))) => {
                alloc_hist.record(took.as_micros() as u64);
                last_alloc = last_alloc.max(done);
                clients.push((c, relayed));
            }
            Ok(Some((Err(reason), _, _))) => bump(&mut alloc_failures, reason),
            _ => bump(&mut alloc_failures, "task".into()),
        }
    }
    let alloc_secs = last_alloc.duration_since(alloc_t0).as_secs_f64();
    let server_alloc_cpu_secs = server.cpu_secs();
    eprintln!(
        "[{:6.1}s] {} of {} allocations in {alloc_secs:.2} s ({} failed){}",
        start.elapsed().as_secs_f64(),
        clients.len(),
        args.allocations,
        args.allocations - clients.len() as u64,
        if alloc_failures.is_empty() {
            String::new()
        } else {
            format!(": {alloc_failures:?}")
        }
    );

    // 2. Permissions and channels to the echo peer, then the relay load.
    let own_peer = match args.peer {
        None if args.duration > 0.0 => Some(EchoPeer::start()?),
        _ => None,
    };
    // Without a relay phase (--duration 0) there is no peer; the address is then never used.
    let peer = args
        .peer
        .or(own_peer.as_ref().map(|p| p.addr))
        .unwrap_or(SocketAddr::from((Ipv4Addr::LOCALHOST, 9)));
    let mut relay_failures = BTreeMap::new();
    let mut ready = Vec::new();
    if args.duration > 0.0 && !clients.is_empty() {
        let setups = clients.into_iter().map(|(mut c, _relayed)| {
            let (args, sem) = (args.clone(), sem.clone());
            async move {
                let _permit = sem.acquire_owned().await;
                let realm = args.realm.as_deref();
                let r = async {
                    c.request(&Req::Permission(peer), realm).await?;
                    if !args.send_indications {
                        c.request(&Req::Channel(peer), realm).await?;
                    }
                    Ok::<(), String>(())
                };
                match tokio::time::timeout_at(deadline, r).await {
                    Ok(Ok(())) => Ok(c),
                    Ok(Err(e)) => Err(format!("setup:{e}")),
                    Err(_) => Err("setup:overall-timeout".into()),
                }
            }
        });
        for r in futures::future::join_all(setups).await {
            match r {
                Ok(c) => ready.push(c),
                Err(reason) => bump(&mut relay_failures, reason),
            }
        }
    } else {
        ready = clients.into_iter().map(|(c, _)| c).collect();
    }

    let mut total = RelayStats::default();
    let mut send_secs = 0.0;
    let mut bench_cpu_util = 0.0;
    let mut server_cpu_secs = None;
    server.restart();
    if args.duration > 0.0 && !ready.is_empty() {
        let now = tokio::time::Instant::now();
        let end = (now + Duration::from_secs_f64(args.duration)).min(deadline);
        let plan = Arc::new(Plan {
            peer,
            indications: args.send_indications,
            payload: args.payload,
            rate: args.rate / ready.len() as f64,
            window: args.window,
            start: now,
            end,
            drain_end: (end + Duration::from_secs_f64(args.drain)).min(deadline.max(end)),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
        });
        let cpu0 = bench_cpu();
        let tasks: Vec<_> = ready
            .into_iter()
            .map(|c| {
                let plan = plan.clone();
                tokio::spawn(async move {
                    let st = relay(&c, &plan).await;
                    (c, st)
                })
            })
            .collect();
        let mut all = futures::future::join_all(tasks);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        let mut prev = (
            Instant::now(),
            0u64,
            server.sample().map_or(0, |s| s.cpu_ms),
            cpu0,
        );
        let results = loop {
            tokio::select! {
                r = &mut all => break r,
                _ = tick.tick() => {
                    let now = Instant::now();
                    let dt = now.duration_since(prev.0).as_secs_f64().max(1e-3);
                    let rx = plan.received.load(Ordering::Relaxed);
                    let cpu = bench_cpu();
                    let mut line = format!(
                        "[{:6.1}s] sent {}  received {} (+{:.0}/s)  | bench cpu {:.0}%",
                        start.elapsed().as_secs_f64(),
                        plan.sent.load(Ordering::Relaxed),
                        rx,
                        rx.saturating_sub(prev.1) as f64 / dt,
                        cpu.saturating_sub(prev.3) as f64 / 10.0 / dt,
                    );
                    if let Some(s) = server.sample() {
                        line += &s.progress(prev.2, dt);
                        prev.2 = s.cpu_ms;
                    }
                    eprintln!("{line}");
                    prev = (now, rx, prev.2, cpu);
                }
            }
        };
        let send_wall = end.saturating_duration_since(now).as_secs_f64().max(1e-3);
        bench_cpu_util = bench_cpu().saturating_sub(cpu0) as f64 / 1000.0 / send_wall;
        server_cpu_secs = server.cpu_secs();
        ready = Vec::new();
        for r in results {
            match r {
                Ok((c, st)) => {
                    if let Some(e) = &st.error {
                        bump(&mut relay_failures, e.clone());
                    }
                    total.merge(&st);
                    ready.push(c);
                }
                Err(_) => bump(&mut relay_failures, "task".into()),
            }
        }
        send_secs = total.last_recv_ns.saturating_sub(total.first_send_ns) as f64 / 1e9;
    }
    drop(own_peer);

    // 3. Release the allocations (Refresh, LIFETIME 0: RFC 8656 §7.2), best effort.
    let realm = args.realm.as_deref();
    let deletes = ready.iter_mut().map(|c| async move {
        c.request_timeout = Duration::from_secs(1);
        let _ = c.request(&Req::Delete, realm).await;
    });
    let _ = tokio::time::timeout(Duration::from_secs(5), futures::future::join_all(deletes)).await;

    let allocations = args.allocations - alloc_failures.values().sum::<u64>();
    let relayed_pps = if send_secs > 0.0 {
        2.0 * total.received as f64 / send_secs
    } else {
        0.0
    };
    let report = Report {
        scenario: "turn",
        server: args.server.to_string(),
        auth: if args.secret.is_some() {
            "rest"
        } else {
            "static"
        },
        transport: if args.send_indications {
            "indication"
        } else {
            "channel"
        },
        payload: args.payload,
        rate_target: args.rate,
        window: args.window,
        duration_target: args.duration,
        allocations,
        alloc_failed: args.allocations - allocations,
        alloc_failures,
        alloc_secs: round(alloc_secs, 3),
        allocs_per_sec: round(
            if alloc_secs > 0.0 {
                allocations as f64 / alloc_secs
            } else {
                0.0
            },
            1,
        ),
        alloc_latency_us: Percentiles::from(&alloc_hist),
        relay_failures,
        sent: total.sent,
        received: total.received,
        lost: total.sent.saturating_sub(total.received),
        junk: total.junk,
        relay_secs: round(send_secs, 3),
        relayed_pps: round(relayed_pps, 1),
        mbit_per_sec: round(relayed_pps * args.payload as f64 * 8.0 / 1e6, 2),
        rtt_us: Percentiles::from(&total.rtt),
        bench_cpu_util: round(bench_cpu_util, 3),
        server_alloc_cpu_secs: server_alloc_cpu_secs.map(|c| round(c, 3)),
        server_cpu_secs: server_cpu_secs.map(|c| round(c, 3)),
        server_rss_kib: server.rss_kib(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    if report.allocations == 0 {
        bail!("no allocation succeeded: {:?}", report.alloc_failures);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Serialize)]
struct Report {
    scenario: &'static str,
    server: String,
    /// `rest` (--secret) or `static` (--password).
    auth: &'static str,
    /// `channel` (ChannelData) or `indication` (Send/Data indications).
    transport: &'static str,
    payload: usize,
    rate_target: f64,
    window: usize,
    duration_target: f64,
    /// Allocations that succeeded.
    allocations: u64,
    alloc_failed: u64,
    alloc_failures: BTreeMap<String, u64>,
    /// First Allocate sent → last allocation granted.
    alloc_secs: f64,
    allocs_per_sec: f64,
    /// Per allocation: first (unauthenticated) Allocate → success, µs.
    alloc_latency_us: Percentiles,
    /// Allocations that failed CreatePermission/ChannelBind or a socket error while relaying.
    relay_failures: BTreeMap<String, u64>,
    /// Packets sent by the clients (each one is echoed by the peer).
    sent: u64,
    /// Echoes received back.
    received: u64,
    /// sent − received after the drain.
    lost: u64,
    /// Unexpected datagrams received.
    junk: u64,
    /// First packet sent → last echo received.
    relay_secs: f64,
    /// Packets relayed by the server per second: 2 × received (client → peer and peer → client)
    /// ÷ relay_secs.
    relayed_pps: f64,
    /// Application payload relayed, both directions, in Mbit/s.
    mbit_per_sec: f64,
    /// Client → server → peer → server → client, µs.
    rtt_us: Percentiles,
    /// This process's CPU (load and echo peer) over the send window, as a fraction of one core.
    bench_cpu_util: f64,
    /// Server CPU during the allocation phase.
    server_alloc_cpu_secs: Option<f64>,
    /// Server CPU from the first relayed packet to the end of the drain.
    server_cpu_secs: Option<f64>,
    /// Peak server RSS while relaying (after the allocations).
    server_rss_kib: Option<u64>,
}

impl Report {
    fn table(&self) -> String {
        let mut o = String::new();
        let mut row = |k: &str, v: String| o.push_str(&format!("  {k:<22} {v}\n"));
        let rate = if self.rate_target > 0.0 {
            format!("{} pps", self.rate_target)
        } else {
            format!("max (window {})", self.window)
        };
        row(
            "scenario",
            format!(
                "turn {} allocations, {} auth, {} {} B, rate {rate}",
                self.allocations + self.alloc_failed,
                self.auth,
                self.transport,
                self.payload
            ),
        );
        let p = |p: &Percentiles| {
            format!(
                "p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms",
                p.p50 as f64 / 1e3,
                p.p99 as f64 / 1e3,
                p.max as f64 / 1e3
            )
        };
        row(
            "allocations",
            format!(
                "{} ok, {} failed, {:.1}/s over {:.2} s",
                self.allocations, self.alloc_failed, self.allocs_per_sec, self.alloc_secs
            ),
        );
        row("allocate latency", p(&self.alloc_latency_us));
        for (k, v) in self.alloc_failures.iter().chain(&self.relay_failures) {
            row("failure", format!("{v:>7}  {k}"));
        }
        row(
            "packets",
            format!(
                "sent {}  received {}  lost {}",
                self.sent, self.received, self.lost
            ),
        );
        row(
            "relayed",
            format!(
                "{:.0} packets/s, {:.2} Mbit/s over {:.2} s",
                self.relayed_pps, self.mbit_per_sec, self.relay_secs
            ),
        );
        row("round trip", p(&self.rtt_us));
        row(
            "bench CPU",
            format!("{:.0}% of one core", self.bench_cpu_util * 100.0),
        );
        if let (Some(c), Some(r)) = (self.server_cpu_secs, self.server_rss_kib) {
            row(
                "server",
                format!(
                    "CPU {c:.2} s relaying, {:.2} s allocating; peak RSS {:.1} MiB",
                    self.server_alloc_cpu_secs.unwrap_or(0.0),
                    r as f64 / 1024.0
                ),
            );
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(indications: bool) -> Plan {
        let now = tokio::time::Instant::now();
        Plan {
            peer: "127.0.0.1:9".parse().unwrap(),
            indications,
            payload: 40,
            rate: 0.0,
            window: 1,
            start: now,
            end: now,
            drain_end: now,
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
        }
    }

    #[test]
    fn channel_data_packets_round_trip() {
        let p = plan(false);
        let mut out = Vec::new();
        write_packet(&mut out, &p, 7);
        assert_eq!(out.len(), 4 + 40);
        let payload = echoed_payload(&out).unwrap();
        assert_eq!(payload[..8], 7u64.to_be_bytes());
        // Another channel is not ours.
        out[1] = 1;
        assert!(echoed_payload(&out).is_none());
    }

    #[test]
    fn indications_are_sent_as_send_and_read_as_data() {
        let p = plan(true);
        let mut out = Vec::new();
        write_packet(&mut out, &p, 9);
        let m = Message::parse(&out).unwrap();
        assert_eq!((m.method(), m.class()), (Method::SEND, Class::Indication));
        assert_eq!(m.xor_address(attr::XOR_PEER_ADDRESS).unwrap(), Some(p.peer));
        assert!(
            echoed_payload(&out).is_none(),
            "a Send indication is not an echo"
        );
        // What the server turns it into (RFC 8656 §11.4): a Data indication with the same DATA.
        let data = m.get(attr::DATA).unwrap().value.to_vec();
        let mut d = Vec::new();
        let mut b = MessageBuilder::new(
            &mut d,
            MessageType::new(Method::DATA, Class::Indication),
            new_tid(),
        );
        b.xor_address(attr::XOR_PEER_ADDRESS, p.peer).data(&data);
        b.finish().unwrap();
        assert_eq!(echoed_payload(&d).unwrap()[..8], 9u64.to_be_bytes());
    }

    #[test]
    fn authenticated_requests_carry_integrity_with_the_learned_realm() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let mut c = Client::new(sock, "u", "p", Duration::from_secs(1));
            c.build(&Req::Allocate, new_tid()).unwrap();
            assert!(!Message::parse(&c.buf).unwrap().has_integrity());
            let learned = c.auth.learn(
                &Answer {
                    code: Some(401),
                    realm: Some("r".into()),
                    nonce: Some("n".into()),
                    ..Answer::default()
                },
                None,
            );
            assert!(learned);
            c.build(&Req::Channel("127.0.0.1:5".parse().unwrap()), new_tid())
                .unwrap();
            let m = Message::parse(&c.buf).unwrap();
            assert_eq!(m.text(attr::REALM).unwrap(), Some("r"));
            assert!(m.check_integrity(LongTermKey::md5("u", "r", "p").unwrap().as_bytes()));
        });
    }

    /// A server that answers every request with 401 + REALM + NONCE: the client retries once
    /// with credentials, then reports them wrong instead of looping (RFC 8489 §9.2.5).
    #[test]
    fn a_401_to_credentials_is_not_retried() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let addr = server.local_addr().unwrap();
            let answers = tokio::spawn(async move {
                let (mut buf, mut out, mut n) = ([0u8; DGRAM], Vec::new(), 0);
                while let Ok(Ok((len, from))) =
                    tokio::time::timeout(Duration::from_secs(2), server.recv_from(&mut buf)).await
                {
                    let tid = Message::parse(&buf[..len]).unwrap().transaction_id();
                    out.clear();
                    let mut b = MessageBuilder::new(
                        &mut out,
                        MessageType::new(Method::ALLOCATE, Class::Error),
                        tid,
                    );
                    b.error_code(401, "Unauthenticated")
                        .text(attr::REALM, "r")
                        .text(attr::NONCE, "n");
                    b.finish().unwrap();
                    server.send_to(&out, from).await.unwrap();
                    n += 1;
                }
                n
            });
            let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            sock.connect(addr).await.unwrap();
            let mut c = Client::new(sock, "u", "p", Duration::from_secs(1));
            let r = c.request(&Req::Allocate, None).await;
            assert_eq!(r.unwrap_err(), "error-401-credentials");
            drop(c);
            assert_eq!(answers.await.unwrap(), 2);
        });
    }

    #[test]
    fn echo_peer_echoes_batches() {
        let peer = EchoPeer::start().unwrap();
        let s = StdUdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.connect(peer.addr).unwrap();
        let msgs: Vec<Vec<u8>> = (0u8..5).map(|i| vec![i; 10]).collect();
        let refs: Vec<&[u8]> = msgs.iter().map(|m| m.as_slice()).collect();
        assert_eq!(send_batch(s.as_raw_fd(), &refs, None).unwrap(), 5);
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        for _ in 0..5 {
            let n = s.recv(&mut buf).unwrap();
            got.push(buf[..n].to_vec());
        }
        got.sort();
        assert_eq!(got, msgs);
    }
}

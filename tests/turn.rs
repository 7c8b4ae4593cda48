//! End-to-end tests of the embedded TURN server (RFC 8656 / RFC 8489) against the real `tern`
//! binary, with independent clients:
//!
//! - the webrtc-rs `turn` client crate (allocate, permission, Send indication then ChannelData, to a
//!   local UDP echo peer and back);
//! - coturn's `turnutils_uclient` (Debian package `coturn`, installed by `.ci/run`) over UDP and TCP,
//!   with channels and with Send indications, against coturn's `turnutils_peer`: 0 lost packets;
//! - a small hand-written STUN client in this file (its own codec, not Tern's) for the error paths
//!   (401, 403, 437, 438, 486, 508), TURN over TCP and TURN over TLS on the direct-TLS XMPP port with
//!   ALPN `stun.turn` (RFC 7443), which keeps serving XMPP for ALPN `xmpp-client`;
//! - XEP-0215: credentials from `<services/>` allocate with the webrtc-rs client, asked for by a
//!   raw XMPP client and by tokio-xmpp.
//!
//! `bench_allocations` (ignored) is the allocation-rate/memory load tool of `benches/turn.sh`.
//!
//! Every wait is bounded. Traffic only goes to loopback addresses: CreatePermission/ChannelBind for
//! private or remote addresses never makes the server send anything.

mod common;

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use common::{DOMAIN, STEP, TestServer, Transport, attr, element_name};
use hmac::{Hmac, Mac};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use webrtc_util::Conn as _;

/// REST API secret of the test servers.
const SECRET: &str = "turn-test-secret-0123456789abcdef";
/// Static user of the test servers.
const USER: &str = "alice";
const PASS: &str = "alice-password";

// ---------------------------------------------------------------------------------------------
// Server setup
// ---------------------------------------------------------------------------------------------

/// A loopback port free for both UDP and TCP a moment ago.
fn free_turn_port() -> u16 {
    for _ in 0..100 {
        let port = common::free_port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for both UDP and TCP");
}

/// A relay port range of 200 ports for this test, outside the kernel's ephemeral range
/// (32768-60999) so relay sockets rarely meet a busy port (the server retries anyway).
fn relay_range() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let block = (std::process::id() + n * 7) % 22;
    let lo = 61_000 + block * 200;
    format!("{}-{}", lo, lo + 199)
}

/// A TURN-enabled test server: `[turn]` listens on a fresh loopback port (picked again on every
/// start attempt), with [`SECRET`], the static user [`USER`]:[`PASS`], and `turn_extra` (TOML
/// lines for the `[turn]` table) on top. Returns the server and the TURN address.
fn start_turn(turn_extra: &str) -> (TestServer, SocketAddr) {
    let mut extra = format!("[turn]\nrelay_ports = \"{}\"\n", relay_range());
    if !turn_extra.contains("secrets =") {
        extra.push_str(&format!("secrets = [\"{SECRET}\"]\n"));
    }
    if !turn_extra.contains("users =") {
        extra.push_str(&format!("users = [\"{USER}:{PASS}\"]\n"));
    }
    extra.push_str(turn_extra);
    extra.push('\n');
    let server = TestServer::start_edited(&extra, |config| {
        let turn = config
            .get_mut("turn")
            .and_then(|t| t.as_table_mut())
            .expect("[turn] table");
        turn.insert(
            "listen".into(),
            toml::Value::String(format!("127.0.0.1:{}", free_turn_port())),
        );
    });
    let text = std::fs::read_to_string(&server.config_path).expect("read config");
    let config: toml::Table = text.parse().expect("config TOML");
    let listen: SocketAddr = config["turn"]["listen"]
        .as_str()
        .expect("turn.listen")
        .parse()
        .expect("turn.listen address");
    (server, listen)
}

/// TURN REST API credentials (draft-uberti-behave-turn-rest-00 §2.2) for `user`, expiring at
/// `expiry` (Unix seconds).
fn rest_credentials(secret: &str, user: &str, expiry: u64) -> (String, String) {
    let username = format!("{expiry}:{user}");
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(username.as_bytes());
    let password = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    (username, password)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A UDP echo peer on `ip`; every datagram's source is reported on the returned channel.
async fn echo_peer(
    ip: IpAddr,
) -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<(SocketAddr, Vec<u8>)>,
    tokio::task::JoinHandle<()>,
) {
    udp_peer(ip, true).await
}

/// A UDP peer on `ip` that reports every datagram (source, payload) on the returned channel and,
/// with `echo`, sends it back.
async fn udp_peer(
    ip: IpAddr,
    echo: bool,
) -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<(SocketAddr, Vec<u8>)>,
    tokio::task::JoinHandle<()>,
) {
    let socket = UdpSocket::bind((ip, 0)).await.expect("bind UDP peer");
    let addr = socket.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let _ = tx.send((from, buf[..n].to_vec()));
            if echo {
                let _ = socket.send_to(&buf[..n], from).await;
            }
        }
    });
    (addr, rx, task)
}

// ---------------------------------------------------------------------------------------------
// A minimal, independent STUN/TURN codec (RFC 8489, RFC 8656)
// ---------------------------------------------------------------------------------------------

const MAGIC: u32 = 0x2112_A442;

const BINDING: u16 = 0x001;
const ALLOCATE: u16 = 0x003;
const REFRESH: u16 = 0x004;
const SEND: u16 = 0x006;
const DATA: u16 = 0x007;
const CREATE_PERMISSION: u16 = 0x008;
const CHANNEL_BIND: u16 = 0x009;

const REQUEST: u8 = 0;
const INDICATION: u8 = 1;
const SUCCESS: u8 = 2;
const ERROR: u8 = 3;

const A_USERNAME: u16 = 0x0006;
const A_MESSAGE_INTEGRITY: u16 = 0x0008;
const A_ERROR_CODE: u16 = 0x0009;
const A_CHANNEL_NUMBER: u16 = 0x000C;
const A_LIFETIME: u16 = 0x000D;
const A_XOR_PEER_ADDRESS: u16 = 0x0012;
const A_DATA: u16 = 0x0013;
const A_REALM: u16 = 0x0014;
const A_NONCE: u16 = 0x0015;
const A_XOR_RELAYED_ADDRESS: u16 = 0x0016;
const A_REQUESTED_TRANSPORT: u16 = 0x0019;
const A_MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
const A_PASSWORD_ALGORITHM: u16 = 0x001D;
const A_XOR_MAPPED_ADDRESS: u16 = 0x0020;
const A_PASSWORD_ALGORITHMS: u16 = 0x8002;
const A_FINGERPRINT: u16 = 0x8028;

fn message_type(method: u16, class: u8) -> u16 {
    let c = u16::from(class);
    (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((c & 1) << 4)
        | ((c & 2) << 7)
}

fn split_type(t: u16) -> (u16, u8) {
    let method = (t & 0x000F) | ((t >> 1) & 0x0070) | ((t >> 2) & 0x0F80);
    let class = (((t >> 4) & 1) | ((t >> 7) & 2)) as u8;
    (method, class)
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// MD5(username ":" realm ":" password), the long-term key (RFC 8489 §9.2.2).
fn long_term_key(user: &str, realm: &str, pass: &str) -> Vec<u8> {
    use md5::Digest as _;
    md5::Md5::digest(format!("{user}:{realm}:{pass}").as_bytes()).to_vec()
}

fn tid() -> [u8; 12] {
    rand::random()
}

/// Which integrity attribute a request carries.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Integrity {
    Sha1,
    Sha256,
}

/// Encodes a STUN message; with `key` appends MESSAGE-INTEGRITY (or -SHA256), then FINGERPRINT.
fn encode(
    method: u16,
    class: u8,
    tid: [u8; 12],
    attrs: &[(u16, Vec<u8>)],
    key: Option<(&[u8], Integrity)>,
) -> Vec<u8> {
    let mut m = Vec::with_capacity(128);
    m.extend_from_slice(&message_type(method, class).to_be_bytes());
    m.extend_from_slice(&[0, 0]);
    m.extend_from_slice(&MAGIC.to_be_bytes());
    m.extend_from_slice(&tid);
    for (t, v) in attrs {
        push_attr(&mut m, *t, v);
    }
    if let Some((key, kind)) = key {
        let (t, len) = match kind {
            Integrity::Sha1 => (A_MESSAGE_INTEGRITY, 20),
            Integrity::Sha256 => (A_MESSAGE_INTEGRITY_SHA256, 32),
        };
        let with_mi = m.len() - 20 + 4 + len;
        set_len(&mut m, with_mi);
        let mac = match kind {
            Integrity::Sha1 => {
                let mut h = Hmac::<sha1::Sha1>::new_from_slice(key).unwrap();
                h.update(&m);
                h.finalize().into_bytes().to_vec()
            }
            Integrity::Sha256 => {
                let mut h = Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
                h.update(&m);
                h.finalize().into_bytes().to_vec()
            }
        };
        push_attr(&mut m, t, &mac);
    }
    let with_fp = m.len() - 20 + 8;
    set_len(&mut m, with_fp);
    let fp = crc32(&m) ^ 0x5354_554E;
    push_attr(&mut m, A_FINGERPRINT, &fp.to_be_bytes());
    m
}

fn push_attr(m: &mut Vec<u8>, t: u16, v: &[u8]) {
    m.extend_from_slice(&t.to_be_bytes());
    m.extend_from_slice(&(v.len() as u16).to_be_bytes());
    m.extend_from_slice(v);
    m.resize(m.len().next_multiple_of(4), 0);
}

fn set_len(m: &mut [u8], len: usize) {
    m[2..4].copy_from_slice(&(len as u16).to_be_bytes());
}

/// XOR-*-ADDRESS value (RFC 8489 §14.2).
fn xor_addr(addr: SocketAddr, tid: &[u8; 12]) -> Vec<u8> {
    let port = addr.port() ^ (MAGIC >> 16) as u16;
    let mut v = Vec::with_capacity(20);
    match addr.ip() {
        IpAddr::V4(ip) => {
            v.extend_from_slice(&[0, 1]);
            v.extend_from_slice(&port.to_be_bytes());
            v.extend_from_slice(&(u32::from(ip) ^ MAGIC).to_be_bytes());
        }
        IpAddr::V6(ip) => {
            v.extend_from_slice(&[0, 2]);
            v.extend_from_slice(&port.to_be_bytes());
            let mut mask = [0u8; 16];
            mask[..4].copy_from_slice(&MAGIC.to_be_bytes());
            mask[4..].copy_from_slice(tid);
            v.extend(ip.octets().iter().zip(mask).map(|(a, b)| a ^ b));
        }
    }
    v
}

fn parse_xor_addr(v: &[u8], tid: &[u8; 12]) -> Option<SocketAddr> {
    if v.len() < 8 {
        return None;
    }
    let port = u16::from_be_bytes([v[2], v[3]]) ^ (MAGIC >> 16) as u16;
    match v[1] {
        1 => {
            let ip = u32::from_be_bytes(v[4..8].try_into().ok()?) ^ MAGIC;
            Some(SocketAddr::new(Ipv4Addr::from(ip).into(), port))
        }
        2 if v.len() >= 20 => {
            let mut mask = [0u8; 16];
            mask[..4].copy_from_slice(&MAGIC.to_be_bytes());
            mask[4..].copy_from_slice(tid);
            let mut o = [0u8; 16];
            for i in 0..16 {
                o[i] = v[4 + i] ^ mask[i];
            }
            Some(SocketAddr::new(Ipv6Addr::from(o).into(), port))
        }
        _ => None,
    }
}

/// A decoded STUN message.
#[derive(Debug, Clone)]
struct Msg {
    method: u16,
    class: u8,
    tid: [u8; 12],
    attrs: Vec<(u16, Vec<u8>)>,
    raw: Vec<u8>,
}

impl Msg {
    fn decode(raw: &[u8]) -> Result<Msg, String> {
        if raw.len() < 20 || raw[0] & 0xC0 != 0 {
            return Err(format!("not STUN: {raw:02x?}"));
        }
        let len = usize::from(u16::from_be_bytes([raw[2], raw[3]]));
        if raw.len() < 20 + len || u32::from_be_bytes(raw[4..8].try_into().unwrap()) != MAGIC {
            return Err(format!("bad STUN header: {raw:02x?}"));
        }
        let (method, class) = split_type(u16::from_be_bytes([raw[0], raw[1]]));
        let mut attrs = Vec::new();
        let mut at = 20;
        while at + 4 <= 20 + len {
            let t = u16::from_be_bytes([raw[at], raw[at + 1]]);
            let l = usize::from(u16::from_be_bytes([raw[at + 2], raw[at + 3]]));
            if at + 4 + l > 20 + len {
                return Err(format!("attribute {t:#06x} overruns the message"));
            }
            attrs.push((t, raw[at + 4..at + 4 + l].to_vec()));
            at += 4 + l.next_multiple_of(4);
        }
        Ok(Msg {
            method,
            class,
            tid: raw[8..20].try_into().unwrap(),
            attrs,
            raw: raw[..20 + len].to_vec(),
        })
    }

    fn attr(&self, t: u16) -> Option<&[u8]> {
        self.attrs
            .iter()
            .find(|(a, _)| *a == t)
            .map(|(_, v)| v.as_slice())
    }

    fn text(&self, t: u16) -> Option<String> {
        self.attr(t)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    fn addr(&self, t: u16) -> Option<SocketAddr> {
        parse_xor_addr(self.attr(t)?, &self.tid)
    }

    fn error_code(&self) -> Option<u16> {
        let v = self.attr(A_ERROR_CODE)?;
        (v.len() >= 4).then(|| u16::from(v[2] & 0x7) * 100 + u16::from(v[3]))
    }

    fn lifetime(&self) -> Option<u32> {
        Some(u32::from_be_bytes(self.attr(A_LIFETIME)?.try_into().ok()?))
    }

    /// Whether the message carries a valid MESSAGE-INTEGRITY (or -SHA256) for `key`.
    fn integrity_ok(&self, key: &[u8]) -> bool {
        let mut at = 20;
        while at + 4 <= self.raw.len() {
            let t = u16::from_be_bytes([self.raw[at], self.raw[at + 1]]);
            let l = usize::from(u16::from_be_bytes([self.raw[at + 2], self.raw[at + 3]]));
            if t == A_MESSAGE_INTEGRITY || t == A_MESSAGE_INTEGRITY_SHA256 {
                let mut head = self.raw[..at].to_vec();
                set_len(&mut head, at - 20 + 4 + l);
                let value = &self.raw[at + 4..at + 4 + l];
                return if t == A_MESSAGE_INTEGRITY {
                    let mut h = Hmac::<sha1::Sha1>::new_from_slice(key).unwrap();
                    h.update(&head);
                    h.verify_slice(value).is_ok()
                } else {
                    let mut h = Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
                    h.update(&head);
                    h.verify_truncated_left(value).is_ok()
                };
            }
            at += 4 + l.next_multiple_of(4);
        }
        false
    }

    fn fingerprint_ok(&self) -> bool {
        let Some((t, v)) = self.attrs.last() else {
            return false;
        };
        *t == A_FINGERPRINT
            && v.len() == 4
            && u32::from_be_bytes(v[..4].try_into().unwrap())
                == crc32(&self.raw[..self.raw.len() - 8]) ^ 0x5354_554E
    }

    fn describe(&self) -> String {
        format!(
            "method {:#05x} class {} error {:?} ({:?}) attrs {:?}",
            self.method,
            self.class,
            self.error_code(),
            self.attr(A_ERROR_CODE)
                .map(|v| String::from_utf8_lossy(&v[4.min(v.len())..]).into_owned()),
            self.attrs
                .iter()
                .map(|(t, v)| format!("{t:#06x}/{}", v.len()))
                .collect::<Vec<_>>()
        )
    }
}

/// ChannelData (RFC 8656 §12.4); `pad` for TCP/TLS (§12.5).
fn channel_data(channel: u16, data: &[u8], pad: bool) -> Vec<u8> {
    let mut m = Vec::with_capacity(4 + data.len() + 3);
    m.extend_from_slice(&channel.to_be_bytes());
    m.extend_from_slice(&(data.len() as u16).to_be_bytes());
    m.extend_from_slice(data);
    if pad {
        m.resize(m.len().next_multiple_of(4), 0);
    }
    m
}

/// What arrived from the server besides responses.
#[derive(Debug)]
enum Incoming {
    /// A Data indication: (peer, data).
    Data(SocketAddr, Vec<u8>),
    /// ChannelData: (channel, data).
    Channel(u16, Vec<u8>),
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

enum Link {
    Udp(UdpSocket, SocketAddr),
    Stream(Pin<Box<dyn Io>>),
    /// Taken away for a while (the load tool's sending phase).
    Gone,
}

/// A hand-written TURN client over UDP, TCP or TLS.
struct Client {
    link: Link,
    rbuf: Vec<u8>,
    pending: VecDeque<Msg>,
    channel_data: VecDeque<(u16, Vec<u8>)>,
    user: String,
    pass: String,
    realm: String,
    nonce: Vec<u8>,
    integrity: Integrity,
}

impl Client {
    async fn udp(server: SocketAddr) -> Client {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        Self::with_link(Link::Udp(socket, server))
    }

    async fn tcp(server: SocketAddr) -> Client {
        let tcp = tokio::time::timeout(STEP, TcpStream::connect(server))
            .await
            .expect("TCP connect timed out")
            .expect("TCP connect to the TURN port");
        tcp.set_nodelay(true).unwrap();
        Self::with_link(Link::Stream(Box::pin(tcp)))
    }

    fn with_link(link: Link) -> Client {
        Client {
            link,
            rbuf: Vec::new(),
            pending: VecDeque::new(),
            channel_data: VecDeque::new(),
            user: String::new(),
            pass: String::new(),
            realm: String::new(),
            nonce: Vec::new(),
            integrity: Integrity::Sha1,
        }
    }

    fn is_stream(&self) -> bool {
        matches!(self.link, Link::Stream(_))
    }

    fn local_addr(&self) -> SocketAddr {
        match &self.link {
            Link::Udp(s, _) => s.local_addr().unwrap(),
            Link::Stream(_) | Link::Gone => panic!("local_addr of a stream client"),
        }
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        match &mut self.link {
            Link::Udp(s, server) => {
                s.send_to(bytes, *server).await.expect("UDP send");
            }
            Link::Stream(s) => {
                tokio::time::timeout(STEP, s.write_all(bytes))
                    .await
                    .expect("stream write timed out")
                    .expect("stream write");
            }
            Link::Gone => panic!("the client's socket is taken"),
        }
    }

    /// The next STUN message or ChannelData frame, or None at the deadline (or EOF).
    async fn recv_raw(&mut self, deadline: tokio::time::Instant) -> Option<Vec<u8>> {
        match &mut self.link {
            Link::Udp(s, _) => {
                let mut buf = vec![0u8; 65536];
                match tokio::time::timeout_at(deadline, s.recv_from(&mut buf)).await {
                    Ok(Ok((n, _))) => Some(buf[..n].to_vec()),
                    _ => None,
                }
            }
            Link::Stream(s) => loop {
                if self.rbuf.len() >= 4 {
                    let len = usize::from(u16::from_be_bytes([self.rbuf[2], self.rbuf[3]]));
                    let total = if self.rbuf[0] & 0xC0 == 0 {
                        20 + len
                    } else {
                        // ChannelData over a stream is padded to a multiple of four (RFC 8656 §12.5).
                        (4 + len).next_multiple_of(4)
                    };
                    if self.rbuf.len() >= total {
                        let frame: Vec<u8> = self.rbuf.drain(..total).collect();
                        return Some(frame);
                    }
                }
                let mut chunk = [0u8; 16384];
                match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
                    Ok(Ok(n)) if n > 0 => self.rbuf.extend_from_slice(&chunk[..n]),
                    _ => return None,
                }
            },
            Link::Gone => None,
        }
    }

    /// Sends a request and waits for the response with its transaction id; UDP retransmits.
    async fn transact(&mut self, request: &[u8]) -> Msg {
        let want: [u8; 12] = request[8..20].try_into().unwrap();
        let overall = tokio::time::Instant::now() + STEP;
        let mut tries = 0;
        loop {
            self.send_raw(request).await;
            tries += 1;
            let rto = if self.is_stream() {
                overall
            } else {
                (tokio::time::Instant::now() + Duration::from_millis(500)).min(overall)
            };
            while let Some(frame) = self.recv_raw(rto).await {
                if frame[0] & 0xC0 == 0x40 {
                    let ch = u16::from_be_bytes([frame[0], frame[1]]);
                    let len = usize::from(u16::from_be_bytes([frame[2], frame[3]]));
                    self.channel_data
                        .push_back((ch, frame[4..4 + len].to_vec()));
                    continue;
                }
                let msg = Msg::decode(&frame).expect("server sent a malformed STUN message");
                if msg.class == SUCCESS || msg.class == ERROR {
                    if msg.tid == want {
                        assert!(
                            msg.fingerprint_ok() || msg.attr(A_FINGERPRINT).is_none(),
                            "bad FINGERPRINT in {}",
                            msg.describe()
                        );
                        return msg;
                    }
                    continue; // a late answer to an earlier retransmission
                }
                self.pending.push_back(msg);
            }
            assert!(
                tokio::time::Instant::now() < overall && tries < 10,
                "no response to {:?} after {tries} tries",
                Msg::decode(request).map(|m| m.describe())
            );
        }
    }

    /// Waits for the next Data indication or ChannelData.
    async fn recv_data(&mut self, timeout: Duration) -> Option<Incoming> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some((ch, data)) = self.channel_data.pop_front() {
                return Some(Incoming::Channel(ch, data));
            }
            if let Some(msg) = self.pending.pop_front() {
                if msg.method == DATA && msg.class == INDICATION {
                    let peer = msg
                        .addr(A_XOR_PEER_ADDRESS)
                        .expect("Data indication without XOR-PEER-ADDRESS");
                    let data = msg.attr(A_DATA).expect("Data indication without DATA");
                    return Some(Incoming::Data(peer, data.to_vec()));
                }
                continue;
            }
            let frame = self.recv_raw(deadline).await?;
            if frame[0] & 0xC0 == 0x40 {
                let ch = u16::from_be_bytes([frame[0], frame[1]]);
                let len = usize::from(u16::from_be_bytes([frame[2], frame[3]]));
                self.channel_data
                    .push_back((ch, frame[4..4 + len].to_vec()));
            } else {
                self.pending
                    .push_back(Msg::decode(&frame).expect("malformed STUN from server"));
            }
        }
    }

    fn key(&self) -> Vec<u8> {
        long_term_key(&self.user, &self.realm, &self.pass)
    }

    /// Auth attributes plus `attrs`, encoded with integrity.
    fn authed(&self, method: u16, tid: [u8; 12], attrs: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut all = vec![
            (A_USERNAME, self.user.as_bytes().to_vec()),
            (A_REALM, self.realm.as_bytes().to_vec()),
            (A_NONCE, self.nonce.clone()),
        ];
        all.extend_from_slice(attrs);
        encode(
            method,
            REQUEST,
            tid,
            &all,
            Some((&self.key(), self.integrity)),
        )
    }

    /// An authenticated request; a 438 (stale nonce) is retried once with the new NONCE.
    async fn request(&mut self, method: u16, attrs: &[(u16, Vec<u8>)]) -> Msg {
        for _ in 0..2 {
            let req = self.authed(method, tid(), attrs);
            let resp = self.transact(&req).await;
            if resp.class == ERROR && resp.error_code() == Some(438) {
                self.nonce = resp.attr(A_NONCE).expect("438 without NONCE").to_vec();
                continue;
            }
            if resp.class == SUCCESS {
                assert!(
                    resp.integrity_ok(&self.key()),
                    "success response without valid integrity: {}",
                    resp.describe()
                );
            }
            return resp;
        }
        panic!("438 twice in a row");
    }

    /// Allocate (UDP relay) as `user`/`pass`: an unauthenticated attempt for REALM and NONCE (401),
    /// then the authenticated one. Ok(relayed address, lifetime) or Err(the final response).
    /// An unauthenticated Allocate, as every client starts: a 401 answer's REALM and NONCE are
    /// kept (with `user`/`pass`) for the requests that follow. Returns the answer.
    async fn challenge(&mut self, user: &str, pass: &str) -> Msg {
        self.user = user.into();
        self.pass = pass.into();
        let first = self
            .transact(&encode(
                ALLOCATE,
                REQUEST,
                tid(),
                &[(A_REQUESTED_TRANSPORT, vec![17, 0, 0, 0])],
                None,
            ))
            .await;
        if (first.class, first.error_code()) == (ERROR, Some(401)) {
            self.realm = first.text(A_REALM).expect("401 without REALM");
            self.nonce = first.attr(A_NONCE).expect("401 without NONCE").to_vec();
        }
        first
    }

    async fn allocate(&mut self, user: &str, pass: &str) -> Result<(SocketAddr, u32), Msg> {
        let first = self.challenge(user, pass).await;
        if (first.class, first.error_code()) != (ERROR, Some(401)) {
            // Not the expected challenge (e.g. 437: this 5-tuple already has an allocation).
            return Err(first);
        }
        let transport = vec![(A_REQUESTED_TRANSPORT, vec![17, 0, 0, 0])];
        let mut attrs = transport.clone();
        if self.integrity == Integrity::Sha256
            && let Some(algs) = first.attr(A_PASSWORD_ALGORITHMS)
        {
            // RFC 8489 §9.2.4: echo the offered list and pick MD5 (the key stays MD5-derived).
            attrs.push((A_PASSWORD_ALGORITHMS, algs.to_vec()));
            attrs.push((A_PASSWORD_ALGORITHM, vec![0, 1, 0, 0]));
        }
        let resp = self.request(ALLOCATE, &attrs).await;
        if resp.class != SUCCESS {
            return Err(resp);
        }
        let relayed = resp
            .addr(A_XOR_RELAYED_ADDRESS)
            .expect("Allocate success without XOR-RELAYED-ADDRESS");
        assert!(
            resp.attr(A_XOR_MAPPED_ADDRESS).is_some(),
            "Allocate success without XOR-MAPPED-ADDRESS: {}",
            resp.describe()
        );
        Ok((
            relayed,
            resp.lifetime().expect("Allocate success without LIFETIME"),
        ))
    }

    async fn allocate_ok(&mut self, user: &str, pass: &str) -> SocketAddr {
        match self.allocate(user, pass).await {
            Ok((relayed, _)) => relayed,
            Err(resp) => panic!("Allocate as {user} failed: {}", resp.describe()),
        }
    }

    async fn create_permission(&mut self, peer: SocketAddr) -> Msg {
        let t = tid();
        let req = self.authed(
            CREATE_PERMISSION,
            t,
            &[(A_XOR_PEER_ADDRESS, xor_addr(peer, &t))],
        );
        let resp = self.transact(&req).await;
        if resp.error_code() == Some(438) {
            self.nonce = resp.attr(A_NONCE).unwrap().to_vec();
            let t = tid();
            let req = self.authed(
                CREATE_PERMISSION,
                t,
                &[(A_XOR_PEER_ADDRESS, xor_addr(peer, &t))],
            );
            return self.transact(&req).await;
        }
        resp
    }

    async fn channel_bind(&mut self, channel: u16, peer: SocketAddr) -> Msg {
        let t = tid();
        let req = self.authed(
            CHANNEL_BIND,
            t,
            &[
                (A_CHANNEL_NUMBER, [channel.to_be_bytes(), [0, 0]].concat()),
                (A_XOR_PEER_ADDRESS, xor_addr(peer, &t)),
            ],
        );
        self.transact(&req).await
    }

    async fn refresh(&mut self, lifetime: u32) -> Msg {
        self.request(REFRESH, &[(A_LIFETIME, lifetime.to_be_bytes().to_vec())])
            .await
    }

    async fn send_indication(&mut self, peer: SocketAddr, data: &[u8]) {
        let t = tid();
        let msg = encode(
            SEND,
            INDICATION,
            t,
            &[
                (A_XOR_PEER_ADDRESS, xor_addr(peer, &t)),
                (A_DATA, data.to_vec()),
            ],
            None,
        );
        self.send_raw(&msg).await;
    }

    async fn send_channel(&mut self, channel: u16, data: &[u8]) {
        let frame = channel_data(channel, data, self.is_stream());
        self.send_raw(&frame).await;
    }

    async fn binding(&mut self) -> Msg {
        let resp = self
            .transact(&encode(BINDING, REQUEST, tid(), &[], None))
            .await;
        assert_eq!(
            resp.class,
            SUCCESS,
            "Binding not answered with success: {}",
            resp.describe()
        );
        resp
    }
}

fn assert_code(resp: &Msg, code: u16, what: &str) {
    assert_eq!(
        (resp.class, resp.error_code()),
        (ERROR, Some(code)),
        "{what}: expected error {code}, got {}",
        resp.describe()
    );
}

fn assert_success(resp: &Msg, what: &str) {
    assert_eq!(
        resp.class,
        SUCCESS,
        "{what}: expected success, got {}",
        resp.describe()
    );
}

// ---------------------------------------------------------------------------------------------
// a. webrtc-rs `turn` client
// ---------------------------------------------------------------------------------------------

/// Allocates with the webrtc-rs client as `username`/`password` and relays `rounds` datagrams of
/// various sizes to a local UDP echo peer and back; returns the relayed address.
async fn webrtc_relay_roundtrip(
    turn_addr: SocketAddr,
    username: &str,
    password: &str,
    rounds: usize,
) -> SocketAddr {
    let (peer, mut seen, peer_task) = echo_peer(IpAddr::V4(Ipv4Addr::LOCALHOST)).await;
    let conn = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let local = conn.local_addr().unwrap();
    let client = turn::client::Client::new(turn::client::ClientConfig {
        stun_serv_addr: turn_addr.to_string(),
        turn_serv_addr: turn_addr.to_string(),
        username: username.to_string(),
        password: password.to_string(),
        // The realm is taken from the server's 401.
        realm: String::new(),
        software: "tern-tests".into(),
        rto_in_ms: 0,
        conn: Arc::new(conn),
        vnet: None,
    })
    .await
    .expect("webrtc-rs client");
    client.listen().await.expect("client listen");
    let mapped = tokio::time::timeout(STEP, client.send_binding_request())
        .await
        .expect("Binding timed out")
        .expect("Binding request");
    assert_eq!(mapped, local, "XOR-MAPPED-ADDRESS is not our address");
    let relay = tokio::time::timeout(STEP, client.allocate())
        .await
        .expect("Allocate timed out")
        .unwrap_or_else(|e| panic!("webrtc-rs Allocate as {username} failed: {e}"));
    let relayed = relay.local_addr().expect("relayed address");
    assert_eq!(relayed.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST), "{relayed}");
    let mut buf = vec![0u8; 2048];
    for i in 0..rounds {
        // Sizes from 1 to 1200 bytes, every byte value.
        let len = 1 + (i * 397) % 1200;
        let payload: Vec<u8> = (0..len).map(|j| (i * 31 + j) as u8).collect();
        let mut echoed = None;
        // The first datagrams race the ChannelBind (the client sends Send indications meanwhile);
        // UDP may drop, so each round retries a few times.
        for _attempt in 0..5 {
            relay.send_to(&payload, peer).await.expect("relay send_to");
            match tokio::time::timeout(Duration::from_secs(2), relay.recv_from(&mut buf)).await {
                Ok(Ok((n, from))) => {
                    echoed = Some((buf[..n].to_vec(), from));
                    break;
                }
                Ok(Err(e)) => panic!("relay recv_from: {e}"),
                Err(_) => continue,
            }
        }
        let (data, from) = echoed.unwrap_or_else(|| panic!("round {i}: no echo through the relay"));
        assert_eq!(from, peer, "round {i}: echo from an unexpected address");
        assert_eq!(data, payload, "round {i}: payload changed in the relay");
    }
    // Everything the peer saw came from the relayed address.
    let mut count = 0;
    while let Ok((from, _)) = seen.try_recv() {
        assert_eq!(from, relayed, "peer got a datagram not from the relay");
        count += 1;
    }
    assert!(
        count >= rounds,
        "peer saw {count} datagrams for {rounds} rounds"
    );
    relay.close().await.ok();
    client.close().await.ok();
    peer_task.abort();
    relayed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webrtc_client_relays_to_echo_peer_with_rest_credentials() {
    let (server, turn_addr) = start_turn("allow_peers = [\"127.0.0.0/8\"]");
    let (username, password) = rest_credentials(SECRET, "webrtc@localhost", unix_now() + 600);
    let relayed = webrtc_relay_roundtrip(turn_addr, &username, &password, 20).await;
    let range = relay_range_of(&server);
    assert!(
        (range.0..=range.1).contains(&relayed.port()),
        "relayed port {} outside relay_ports {range:?}",
        relayed.port()
    );
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webrtc_client_relays_with_static_user() {
    let (_server, turn_addr) = start_turn("allow_peers = [\"127.0.0.0/8\"]");
    webrtc_relay_roundtrip(turn_addr, USER, PASS, 5).await;
}

/// A REST credential made with the second secret still works (rotation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_credentials_of_an_older_secret_still_work() {
    let old = "an-older-turn-secret-still-accepted";
    let (_server, turn_addr) = start_turn(&format!(
        "allow_peers = [\"127.0.0.0/8\"]\nsecrets = [\"{SECRET}\", \"{old}\"]"
    ));
    let (username, password) = rest_credentials(old, "rotated", unix_now() + 600);
    let mut c = Client::udp(turn_addr).await;
    c.allocate_ok(&username, &password).await;
}

fn relay_range_of(server: &TestServer) -> (u16, u16) {
    let text = std::fs::read_to_string(&server.config_path).unwrap();
    let config: toml::Table = text.parse().unwrap();
    let range = config["turn"]["relay_ports"].as_str().unwrap();
    let (lo, hi) = range.split_once('-').unwrap();
    (lo.parse().unwrap(), hi.parse().unwrap())
}

// ---------------------------------------------------------------------------------------------
// b. coturn's turnutils_uclient
// ---------------------------------------------------------------------------------------------

fn have(binary: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {binary}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A child process killed on drop.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `cmd` with a time limit; returns (success, stdout + stderr).
fn run_bounded(mut cmd: Command, limit: Duration) -> (bool, String) {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if rx.recv_timeout(limit).is_err() {
            // SAFETY: kill(2) on our own child, not yet reaped (wait_with_output below reaps it).
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
    });
    let out = child.wait_with_output().expect("wait");
    let _ = tx.send(());
    let _ = watchdog.join();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// What `turnutils_uclient` reported.
#[derive(Debug)]
struct UclientReport {
    sent: u64,
    received: u64,
    lost: u64,
}

fn parse_uclient(out: &str) -> Option<UclientReport> {
    // "start_mclient: tot_send_msgs=400, tot_recv_msgs=400" (the final totals line) and
    // "Total lost packets 0 (0.000000%), total send dropped 0 (0.000000%)".
    let totals = out
        .lines()
        .rfind(|l| l.contains("start_mclient: tot_send_msgs="))?;
    let num = |key: &str, line: &str| -> Option<u64> {
        let at = line.find(key)? + key.len();
        line[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .ok()
    };
    let lost_line = out.lines().find(|l| l.contains("Total lost packets"))?;
    Some(UclientReport {
        sent: num("tot_send_msgs=", totals)?,
        received: num("tot_recv_msgs=", totals)?,
        lost: num("Total lost packets ", lost_line)?,
    })
}

/// Runs `turnutils_uclient` with `flags` against a Tern TURN server and a `turnutils_peer`;
/// asserts every message came back (0 lost). `None` when coturn is not installed.
fn uclient_run(flags: &[&str], clients: u32, messages: u32) -> Option<UclientReport> {
    if !have("turnutils_uclient") || !have("turnutils_peer") {
        eprintln!(
            "SKIPPED: coturn's turnutils_uclient/turnutils_peer not installed (apt-get install coturn; .ci/run installs it)"
        );
        return None;
    }
    let (server, turn_addr) = start_turn(
        "allow_peers = [\"127.0.0.0/8\"]\nmax_allocations_per_user = 100\nunauthenticated_per_sec = 1000",
    );
    let peer_port = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port()
    };
    let _peer = Child(
        Command::new("turnutils_peer")
            .args(["-L", "127.0.0.1", "-p", &peer_port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn turnutils_peer"),
    );
    let mut cmd = Command::new("turnutils_uclient");
    cmd.args(flags)
        .args(["-e", "127.0.0.1", "-r", &peer_port.to_string()])
        .args(["-p", &turn_addr.port().to_string()])
        .args(["-m", &clients.to_string(), "-n", &messages.to_string()])
        .args(["-l", "180", "-z", "5"])
        .arg("127.0.0.1");
    let (ok, out) = run_bounded(cmd, Duration::from_secs(90));
    let report = parse_uclient(&out).unwrap_or_else(|| {
        panic!(
            "turnutils_uclient {flags:?} gave no summary (exit ok: {ok}):\n{out}\n--- server log ---\n{}",
            server.log()
        )
    });
    let expected = u64::from(clients) * u64::from(messages);
    assert!(
        report.lost == 0 && report.sent == expected && report.received == expected,
        "turnutils_uclient {flags:?}: {report:?}, expected {expected} sent and received, 0 lost:\n{out}"
    );
    Some(report)
}

#[test]
fn coturn_uclient_udp_channels_rest_secret() {
    uclient_run(&["-c", "-W", SECRET, "-u", "uclient"], 4, 100);
}

#[test]
fn coturn_uclient_udp_send_indications_static_user() {
    uclient_run(&["-c", "-s", "-u", USER, "-w", PASS], 4, 100);
}

#[test]
fn coturn_uclient_tcp_channels_static_user() {
    uclient_run(&["-t", "-c", "-u", USER, "-w", PASS], 4, 100);
}

#[test]
fn coturn_uclient_tcp_send_indications_rest_secret() {
    uclient_run(&["-t", "-c", "-s", "-W", SECRET, "-u", "uclient"], 4, 100);
}

/// uclient's default mode: an RTP/RTCP pair per client, EVEN-PORT with the R bit reserving the
/// next port, then an Allocate with the RESERVATION-TOKEN (RFC 8656 §7.2).
#[test]
fn coturn_uclient_udp_even_port_pairs() {
    uclient_run(&["-W", SECRET, "-u", "uclient"], 4, 100);
}

/// Client-to-client mode: the clients relay to each other's relayed addresses.
#[test]
fn coturn_uclient_udp_client_to_client() {
    uclient_run(&["-y", "-c", "-u", USER, "-w", PASS], 4, 100);
}

// ---------------------------------------------------------------------------------------------
// c. Error paths with the hand-written client
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binding_needs_no_credentials() {
    let (_server, turn_addr) = start_turn("");
    let mut c = Client::udp(turn_addr).await;
    let resp = c.binding().await;
    assert_eq!(
        resp.addr(A_XOR_MAPPED_ADDRESS),
        Some(c.local_addr()),
        "{}",
        resp.describe()
    );
    assert!(resp.fingerprint_ok() || resp.attr(A_FINGERPRINT).is_none());
    // Over TCP on the same port.
    let tcp = TcpStream::connect(turn_addr).await.unwrap();
    let local = tcp.local_addr().unwrap();
    let mut c = Client::with_link(Link::Stream(Box::pin(tcp)));
    let resp = c.binding().await;
    assert_eq!(resp.addr(A_XOR_MAPPED_ADDRESS), Some(local));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_password_gets_401() {
    let (_server, turn_addr) = start_turn("");
    let mut c = Client::udp(turn_addr).await;
    let resp = c.allocate(USER, "wrong-password").await.unwrap_err();
    assert_code(&resp, 401, "static user, wrong password");
    // A REST name signed with the wrong secret.
    let (username, _) = rest_credentials(SECRET, "mallory", unix_now() + 600);
    let (_, password) = rest_credentials("not-the-secret-0123456789", "mallory", unix_now() + 600);
    let mut c = Client::udp(turn_addr).await;
    let resp = c.allocate(&username, &password).await.unwrap_err();
    assert_code(&resp, 401, "REST username, wrong secret");
    // An unknown user.
    let mut c = Client::udp(turn_addr).await;
    let resp = c.allocate("nobody", PASS).await.unwrap_err();
    assert_code(&resp, 401, "unknown user");
    // The right credentials still work afterwards (from yet another client).
    let mut c = Client::udp(turn_addr).await;
    c.allocate_ok(USER, PASS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_rest_username_gets_401() {
    let (_server, turn_addr) = start_turn("");
    let (username, password) = rest_credentials(SECRET, "late", unix_now() - 5);
    let mut c = Client::udp(turn_addr).await;
    let resp = c.allocate(&username, &password).await.unwrap_err();
    assert_code(&resp, 401, "expired REST username");
    let (username, password) = rest_credentials(SECRET, "late", unix_now() + 60);
    let mut c = Client::udp(turn_addr).await;
    c.allocate_ok(&username, &password).await;
}

/// A 401 to an unauthenticated request is small (no amplification) and carries no integrity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_answers_are_small() {
    let (_server, turn_addr) = start_turn("");
    let mut c = Client::udp(turn_addr).await;
    let req = encode(
        ALLOCATE,
        REQUEST,
        tid(),
        &[(A_REQUESTED_TRANSPORT, vec![17, 0, 0, 0])],
        None,
    );
    let resp = c.transact(&req).await;
    assert_code(&resp, 401, "unauthenticated Allocate");
    eprintln!(
        "unauthenticated Allocate: request {} bytes, 401 answer {} bytes",
        req.len(),
        resp.raw.len()
    );
    assert!(
        resp.raw.len() <= 256,
        "401 answer of {} bytes to a {}-byte request",
        resp.raw.len(),
        req.len()
    );
}

/// Failed requests are answered at most `unauthenticated_per_sec` per second per source address
/// (plus a burst); the rest are dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_requests_are_rate_limited_per_source() {
    let (_server, turn_addr) = start_turn("unauthenticated_per_sec = 5");
    let mut c = Client::udp(turn_addr).await;
    let first = c.challenge(USER, "wrong").await;
    assert_code(&first, 401, "unauthenticated Allocate");
    let sent = 60;
    let started = Instant::now();
    for _ in 0..sent {
        let req = c.authed(
            ALLOCATE,
            tid(),
            &[(A_REQUESTED_TRANSPORT, vec![17, 0, 0, 0])],
        );
        c.send_raw(&req).await;
    }
    let mut answers = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
    while let Some(frame) = c.recv_raw(deadline).await {
        let m = Msg::decode(&frame).unwrap();
        assert_code(&m, 401, "bad password");
        answers += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    // Burst (2 x rate, at least 1) plus the refill over the whole window, generously.
    let bound = 10 + (5.0 * elapsed).ceil() as usize + 2;
    eprintln!("{sent} bad requests in a burst: {answers} answered in {elapsed:.2}s");
    assert!(answers >= 1, "no 401 at all");
    assert!(
        answers <= bound,
        "{answers} of {sent} failures answered (bound {bound}): not rate limited"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_nonce_gets_438_with_a_fresh_nonce() {
    let (_server, turn_addr) = start_turn("nonce_lifetime_secs = 1");
    let mut c = Client::udp(turn_addr).await;
    let first = c.challenge(USER, PASS).await;
    assert_code(&first, 401, "unauthenticated Allocate");
    // Let the NONCE go stale (lifetime 1 s; issue times may be rounded to the second).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let req = c.authed(
        ALLOCATE,
        tid(),
        &[(A_REQUESTED_TRANSPORT, vec![17, 0, 0, 0])],
    );
    let resp = c.transact(&req).await;
    assert_code(&resp, 438, "stale NONCE");
    let fresh = resp
        .attr(A_NONCE)
        .expect("438 without a new NONCE")
        .to_vec();
    assert_ne!(fresh, c.nonce, "438 repeats the stale NONCE");
    assert!(resp.attr(A_REALM).is_some(), "438 without REALM");
    c.nonce = fresh;
    let req = c.authed(
        ALLOCATE,
        tid(),
        &[(A_REQUESTED_TRANSPORT, vec![17, 0, 0, 0])],
    );
    let resp = c.transact(&req).await;
    assert_success(&resp, "Allocate with the fresh NONCE");
}

/// A NONCE from another source address is not accepted (the server binds NONCEs to the client).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_nonce_is_refused() {
    let (_server, turn_addr) = start_turn("");
    let mut c = Client::udp(turn_addr).await;
    c.allocate(USER, PASS).await.unwrap();
    let mut c2 = Client::udp(turn_addr).await;
    c2.user = USER.into();
    c2.pass = PASS.into();
    c2.realm = c.realm.clone();
    let mut nonce = c.nonce.clone();
    let mid = nonce.len() / 2;
    nonce[mid] = if nonce[mid] == b'A' { b'B' } else { b'A' };
    c2.nonce = nonce;
    let req = c2.authed(
        ALLOCATE,
        tid(),
        &[(A_REQUESTED_TRANSPORT, vec![17, 0, 0, 0])],
    );
    let resp = c2.transact(&req).await;
    assert!(
        resp.class == ERROR && matches!(resp.error_code(), Some(401 | 438)),
        "tampered NONCE accepted: {}",
        resp.describe()
    );
}

/// Denied by default: loopback, RFC 1918, RFC 6598, link-local, multicast, 0.0.0.0/8, `::`, `::1`,
/// unique-local IPv6, and the IPv4-mapped and NAT64 forms: CreatePermission and ChannelBind
/// answer 403 when `allow_peers` is empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_peers_get_403() {
    let (_server, turn_addr) = start_turn("");
    let mut c = Client::udp(turn_addr).await;
    c.allocate_ok(USER, PASS).await;
    let denied = [
        "127.0.0.1:5000",
        "10.0.0.1:5000",
        "[::ffff:127.0.0.1]:5000",
        "[::1]:5000",
        "127.1.2.3:5000",
        "172.16.0.1:5000",
        "192.168.1.1:5000",
        "100.64.0.1:5000",
        "169.254.1.1:5000",
        "224.0.0.1:5000",
        "0.0.0.0:5000",
        "0.1.2.3:5000",
        "[::]:5000",
        "[fc00::1]:5000",
        "[fd12:3456::1]:5000",
        "[fe80::1]:5000",
        "[ff02::1]:5000",
        "[::ffff:10.0.0.1]:5000",
        "[::ffff:192.168.1.1]:5000",
        "[64:ff9b::7f00:1]:5000",
        "[64:ff9b::a00:1]:5000",
    ];
    let mut wrong = Vec::new();
    for peer in denied {
        let addr: SocketAddr = peer.parse().unwrap();
        let resp = c.create_permission(addr).await;
        if resp.error_code() != Some(403) {
            wrong.push(format!("CreatePermission {peer}: {}", resp.describe()));
        }
    }
    for (i, peer) in ["127.0.0.1:5000", "[::1]:5000", "10.0.0.1:5000"]
        .iter()
        .enumerate()
    {
        let addr: SocketAddr = peer.parse().unwrap();
        let resp = c.channel_bind(0x4000 + i as u16, addr).await;
        if resp.error_code() != Some(403) {
            wrong.push(format!("ChannelBind {peer}: {}", resp.describe()));
        }
    }
    assert!(
        wrong.is_empty(),
        "not refused with 403:\n{}",
        wrong.join("\n")
    );
    // A public address is fine for a permission (nothing is sent to it).
    let resp = c
        .create_permission("198.51.100.7:5000".parse().unwrap())
        .await;
    assert_success(
        &resp,
        "CreatePermission to a public (documentation) address",
    );
}

/// `deny_peers` refuses more; `allow_peers` lets a private network through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_and_deny_peers_override_the_defaults() {
    let (_server, turn_addr) =
        start_turn("allow_peers = [\"127.0.0.0/8\"]\ndeny_peers = [\"198.51.100.0/24\"]");
    let mut c = Client::udp(turn_addr).await;
    c.allocate_ok(USER, PASS).await;
    let resp = c.create_permission("127.0.0.1:5000".parse().unwrap()).await;
    assert_success(&resp, "CreatePermission to an allowed loopback peer");
    let resp = c
        .create_permission("[::ffff:127.0.0.1]:5000".parse().unwrap())
        .await;
    // The mapped form of an allowed address: allowed (it is the same host) or refused as an
    // address-family mismatch (443), but never a relay to it.
    assert!(
        resp.class == SUCCESS || matches!(resp.error_code(), Some(443)),
        "{}",
        resp.describe()
    );
    let resp = c
        .create_permission("198.51.100.7:5000".parse().unwrap())
        .await;
    assert_code(&resp, 403, "peer in deny_peers");
    let resp = c.create_permission("10.0.0.1:5000".parse().unwrap()).await;
    assert_code(&resp, 403, "private peer not in allow_peers");
}

/// Send indications to a denied peer are dropped: with only 127.0.0.2 allowed, a datagram sent to
/// 127.0.0.1 never arrives while one sent right after it to 127.0.0.2 is echoed back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_indication_to_denied_peer_is_dropped() {
    let (_server, turn_addr) = start_turn("allow_peers = [\"127.0.0.2/32\"]");
    let denied_peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    denied_peer.set_nonblocking(true).unwrap();
    let denied_addr = denied_peer.local_addr().unwrap();
    let (allowed_addr, _seen, task) = echo_peer(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))).await;
    let mut c = Client::udp(turn_addr).await;
    c.allocate_ok(USER, PASS).await;
    assert_success(
        &c.create_permission(allowed_addr).await,
        "permission for 127.0.0.2",
    );
    assert_code(
        &c.create_permission(denied_addr).await,
        403,
        "permission for 127.0.0.1",
    );
    c.send_indication(denied_addr, b"must not arrive").await;
    c.send_indication(allowed_addr, b"control").await;
    match c.recv_data(STEP).await {
        Some(Incoming::Data(from, data)) => {
            assert_eq!((from, data.as_slice()), (allowed_addr, &b"control"[..]));
        }
        other => panic!("no echo from the allowed peer: {other:?}"),
    }
    let mut buf = [0u8; 64];
    match denied_peer.recv_from(&mut buf) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the denied peer received something: {other:?}"),
    }
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_user_quota_gets_486_and_is_released() {
    let (_server, turn_addr) = start_turn("max_allocations_per_user = 1");
    let mut a = Client::udp(turn_addr).await;
    a.allocate_ok(USER, PASS).await;
    let mut b = Client::udp(turn_addr).await;
    let resp = b.allocate(USER, PASS).await.unwrap_err();
    assert_code(&resp, 486, "second allocation of the same user");
    // The same user minting fresh REST names is still the same user.
    let (u1, p1) = rest_credentials(SECRET, "bob", unix_now() + 600);
    let (u2, p2) = rest_credentials(SECRET, "bob", unix_now() + 601);
    let mut r1 = Client::udp(turn_addr).await;
    r1.allocate_ok(&u1, &p1).await;
    let mut r2 = Client::udp(turn_addr).await;
    let resp = r2.allocate(&u2, &p2).await.unwrap_err();
    assert_code(&resp, 486, "second allocation of REST user bob");
    // Deleting the first allocation frees the quota.
    let resp = a.refresh(0).await;
    assert_success(&resp, "Refresh lifetime 0");
    let mut c = Client::udp(turn_addr).await;
    c.allocate_ok(USER, PASS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn total_quota_gets_508() {
    let (_server, turn_addr) = start_turn("max_allocations = 1");
    let mut a = Client::udp(turn_addr).await;
    a.allocate_ok(USER, PASS).await;
    let (u, p) = rest_credentials(SECRET, "other", unix_now() + 600);
    let mut b = Client::udp(turn_addr).await;
    let resp = b.allocate(&u, &p).await.unwrap_err();
    assert_code(&resp, 508, "allocation beyond max_allocations");
}

/// Refresh with lifetime 0 deletes; later requests on that 5-tuple get 437; a second Allocate on
/// a live allocation's 5-tuple gets 437 too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocation_lifecycle_and_437() {
    let (_server, turn_addr) =
        start_turn("allow_peers = [\"127.0.0.0/8\"]\nmax_lifetime_secs = 1200");
    let mut c = Client::udp(turn_addr).await;
    let (relayed, lifetime) = c.allocate(USER, PASS).await.unwrap();
    assert_eq!(lifetime, 600, "default lifetime");
    assert_eq!(relayed.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    let resp = c
        .request(ALLOCATE, &[(A_REQUESTED_TRANSPORT, vec![17, 0, 0, 0])])
        .await;
    assert_code(&resp, 437, "second Allocate on the same 5-tuple");
    // Refresh asking for more than the maximum gets the maximum.
    let resp = c.refresh(100_000).await;
    assert_success(&resp, "Refresh");
    assert_eq!(
        resp.lifetime(),
        Some(1200),
        "lifetime capped at max_lifetime_secs"
    );
    let resp = c.refresh(0).await;
    assert_success(&resp, "Refresh lifetime 0");
    let resp = c.refresh(600).await;
    assert_code(&resp, 437, "Refresh after deletion");
    let resp = c.create_permission("127.0.0.1:5000".parse().unwrap()).await;
    assert_code(&resp, 437, "CreatePermission after deletion");
    // A fresh allocation on the same 5-tuple is fine again.
    let resp = c
        .request(ALLOCATE, &[(A_REQUESTED_TRANSPORT, vec![17, 0, 0, 0])])
        .await;
    assert_success(&resp, "Allocate again after deletion");
}

/// Channel numbers below 0x4000 or above 0x7FFF are a 400 (RFC 8656 §12 allows 0x4000-0x4FFF;
/// Tern also takes RFC 5766's 0x5000-0x7FFF, which coturn's clients still pick); rebinding a
/// channel to another peer, or a peer to another channel, is a 400 too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_bind_rules() {
    let (_server, turn_addr) = start_turn("allow_peers = [\"127.0.0.0/8\"]");
    let mut c = Client::udp(turn_addr).await;
    c.allocate_ok(USER, PASS).await;
    let p1: SocketAddr = "127.0.0.1:5001".parse().unwrap();
    let p2: SocketAddr = "127.0.0.1:5002".parse().unwrap();
    assert_code(&c.channel_bind(0x3FFF, p1).await, 400, "channel 0x3FFF");
    assert_code(&c.channel_bind(0x8000, p1).await, 400, "channel 0x8000");
    assert_success(&c.channel_bind(0x4001, p1).await, "bind 0x4001");
    // Refreshing the same binding is fine.
    assert_success(
        &c.channel_bind(0x4001, p1).await,
        "re-bind 0x4001 to the same peer",
    );
    assert_code(
        &c.channel_bind(0x4001, p2).await,
        400,
        "0x4001 to another peer",
    );
    assert_code(
        &c.channel_bind(0x4002, p1).await,
        400,
        "another channel to the same peer",
    );
}

/// MESSAGE-INTEGRITY-SHA256 (RFC 8489 §14.6) authenticates as well as MESSAGE-INTEGRITY, and the
/// server answers with the same kind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_integrity_sha256() {
    let (_server, turn_addr) = start_turn("");
    let mut c = Client::udp(turn_addr).await;
    c.integrity = Integrity::Sha256;
    let result = c.allocate(USER, PASS).await;
    let resp = match result {
        Ok(_) => c.refresh(600).await,
        Err(resp) => panic!(
            "Allocate with MESSAGE-INTEGRITY-SHA256: {}",
            resp.describe()
        ),
    };
    assert_success(&resp, "Refresh with MESSAGE-INTEGRITY-SHA256");
    assert!(
        resp.attr(A_MESSAGE_INTEGRITY_SHA256).is_some(),
        "answer to a SHA256-protected request lacks MESSAGE-INTEGRITY-SHA256: {}",
        resp.describe()
    );
    assert!(resp.integrity_ok(&c.key()));
}

/// For failure messages: whether the echo peer received `payload` (so the loss was on the way back).
fn peer_saw(
    seen: &mut tokio::sync::mpsc::UnboundedReceiver<(SocketAddr, Vec<u8>)>,
    payload: &[u8],
) -> String {
    let mut got = Vec::new();
    while let Ok((from, data)) = seen.try_recv() {
        got.push((from, data.len(), data == payload));
    }
    format!("the echo peer received (source, length, is this payload): {got:?}")
}

/// Send indication + Data indication, and ChannelBind + ChannelData, over `c` (already allocated)
/// to the echo peer at `peer`.
async fn relay_both_ways(
    c: &mut Client,
    peer: SocketAddr,
    seen: &mut tokio::sync::mpsc::UnboundedReceiver<(SocketAddr, Vec<u8>)>,
) {
    assert_success(&c.create_permission(peer).await, "CreatePermission");
    for (i, size) in [1usize, 3, 100, 1200].iter().enumerate() {
        let payload: Vec<u8> = (0..*size).map(|j| (i * 7 + j) as u8).collect();
        c.send_indication(peer, &payload).await;
        match c.recv_data(STEP).await {
            Some(Incoming::Data(from, data)) => {
                assert_eq!(from, peer);
                assert_eq!(data, payload, "Data indication payload ({size} bytes)");
            }
            other => panic!(
                "payload {i} ({size} bytes): expected a Data indication, got {other:?}; {}",
                peer_saw(seen, &payload)
            ),
        }
    }
    assert_success(&c.channel_bind(0x4abc, peer).await, "ChannelBind");
    for (i, size) in [1usize, 2, 3, 4, 5, 999, 1200].iter().enumerate() {
        let payload: Vec<u8> = (0..*size).map(|j| (i * 13 + j * 3) as u8).collect();
        c.send_channel(0x4abc, &payload).await;
        match c.recv_data(STEP).await {
            Some(Incoming::Channel(ch, data)) => {
                assert_eq!(ch, 0x4abc);
                assert_eq!(data, payload, "ChannelData payload ({size} bytes)");
            }
            other => panic!(
                "payload {i} ({size} bytes): expected ChannelData, got {other:?}; {}",
                peer_saw(seen, &payload)
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_send_indication_and_channel_data_relay() {
    let (_server, turn_addr) = start_turn("allow_peers = [\"127.0.0.0/8\"]");
    let (peer, mut seen, task) = echo_peer(IpAddr::V4(Ipv4Addr::LOCALHOST)).await;
    let mut c = Client::udp(turn_addr).await;
    c.allocate_ok(USER, PASS).await;
    relay_both_ways(&mut c, peer, &mut seen).await;
    task.abort();
}

/// What [`relay_burst`] saw: payload bytes sent and received, and the time from the first send
/// to the arrival of the last marker.
struct Burst {
    sent: u64,
    received: u64,
    elapsed: Duration,
}

/// Relays `groups` × `per_group` ChannelData payloads of `size` bytes through a fresh allocation
/// on `turn_addr` to a sink peer. After each group, one-byte markers are sent until one arrives:
/// datagrams of one flow arrive in order on loopback, so by then everything of the group the
/// server relayed has arrived, and at most one group is in flight (no socket buffer overflows).
async fn relay_burst(turn_addr: SocketAddr, groups: usize, per_group: usize, size: usize) -> Burst {
    const CHANNEL: u16 = 0x4321;
    const MARKER: u8 = 0xff;
    let (peer, mut rx, task) = udp_peer(IpAddr::V4(Ipv4Addr::LOCALHOST), false).await;
    let mut c = Client::udp(turn_addr).await;
    c.allocate_ok(USER, PASS).await;
    assert_success(&c.channel_bind(CHANNEL, peer).await, "ChannelBind");
    let payload = vec![0u8; size];
    let (mut sent, mut received) = (0u64, 0u64);
    let t0 = Instant::now();
    for group in 0..groups {
        for _ in 0..per_group {
            c.send_channel(CHANNEL, &payload).await;
            sent += size as u64;
        }
        let deadline = tokio::time::Instant::now() + STEP;
        'marker: loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no marker arrived after group {group}"
            );
            c.send_channel(CHANNEL, &[MARKER]).await;
            // A pace for resending markers the cap dropped, not a limit of the test.
            let pace = tokio::time::Instant::now() + Duration::from_millis(20);
            while let Ok(Some((_, p))) = tokio::time::timeout_at(pace, rx.recv()).await {
                if p == [MARKER] {
                    break 'marker;
                }
                assert_eq!(p.len(), size, "only whole payloads arrive");
                received += p.len() as u64;
            }
        }
    }
    let elapsed = t0.elapsed();
    task.abort();
    Burst {
        sent,
        received,
        elapsed,
    }
}

/// `max_bandwidth_bytes_per_sec` caps what an allocation relays: a burst far beyond the cap
/// gets through only up to the token bucket (one second of traffic, but at least two maximal
/// datagrams, 131,072 bytes) plus what refills at the cap during the burst; uncapped, everything
/// passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidth_cap_limits_a_relayed_burst() {
    const RATE: u64 = 20_000;
    const BUCKET: u64 = 131_072;
    const SIZE: usize = 1000;
    let (_server, turn_addr) = start_turn(&format!(
        "allow_peers = [\"127.0.0.0/8\"]\nmax_bandwidth_bytes_per_sec = {RATE}"
    ));
    let capped = relay_burst(turn_addr, 12, 50, SIZE).await;
    let refill = RATE as f64 * capped.elapsed.as_secs_f64();
    eprintln!(
        "capped at {RATE} B/s: {} of {} bytes relayed in {:?}",
        capped.received, capped.sent, capped.elapsed
    );
    assert!(
        capped.received as f64 <= BUCKET as f64 + refill + SIZE as f64,
        "{} bytes passed a cap of {BUCKET} + {refill:.0} bytes",
        capped.received
    );
    // The full bucket passes (losses on loopback aside), and the burst is clearly cut.
    assert!(
        capped.received >= BUCKET * 3 / 4,
        "only {} bytes relayed",
        capped.received
    );
    assert!(capped.received < capped.sent / 2);

    let (_server, turn_addr) =
        start_turn("allow_peers = [\"127.0.0.0/8\"]\nmax_bandwidth_bytes_per_sec = 0");
    let uncapped = relay_burst(turn_addr, 12, 50, SIZE).await;
    assert_eq!(
        uncapped.received, uncapped.sent,
        "uncapped, everything passes"
    );
}

/// Data from a peer without a permission is dropped (RFC 8656 §9).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_without_permission_is_dropped() {
    let (_server, turn_addr) = start_turn("allow_peers = [\"127.0.0.0/8\"]");
    let (peer, _seen, task) = echo_peer(IpAddr::V4(Ipv4Addr::LOCALHOST)).await;
    let mut c = Client::udp(turn_addr).await;
    let relayed = c.allocate_ok(USER, PASS).await;
    assert_success(&c.create_permission(peer).await, "CreatePermission");
    let stranger = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    stranger.send_to(b"unsolicited", relayed).await.unwrap();
    // The control datagram goes out after the stranger's arrived at the relay socket.
    c.send_indication(peer, b"control").await;
    match c.recv_data(STEP).await {
        Some(Incoming::Data(from, data)) => {
            assert_eq!((from, data.as_slice()), (peer, &b"control"[..]));
        }
        other => panic!("expected the control echo, got {other:?}"),
    }
    task.abort();
}

// ---------------------------------------------------------------------------------------------
// TURN over TCP and over TLS (ALPN stun.turn on the direct-TLS XMPP port)
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turn_over_tcp() {
    let (_server, turn_addr) = start_turn("allow_peers = [\"127.0.0.0/8\"]");
    let (peer, mut seen, task) = echo_peer(IpAddr::V4(Ipv4Addr::LOCALHOST)).await;
    let mut c = Client::tcp(turn_addr).await;
    c.binding().await;
    let relayed = c.allocate_ok(USER, PASS).await;
    assert_eq!(relayed.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    relay_both_ways(&mut c, peer, &mut seen).await;
    task.abort();
}

async fn tls_connect(
    server: &TestServer,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut config = (*server.tls_client_config()).clone();
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = tokio::time::timeout(STEP, TcpStream::connect(server.tls_addr))
        .await
        .expect("connect timed out")
        .expect("connect to the direct-TLS port");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from(DOMAIN).unwrap();
    let tls = tokio::time::timeout(STEP, connector.connect(name, tcp))
        .await
        .expect("TLS handshake timed out")
        .expect("TLS handshake");
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(alpn),
        "server did not select ALPN {:?}",
        String::from_utf8_lossy(alpn)
    );
    tls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turn_over_tls_on_the_xmpp_port_with_alpn_stun_turn() {
    let (server, _turn_addr) = start_turn("allow_peers = [\"127.0.0.0/8\"]");
    let (peer, mut seen, task) = echo_peer(IpAddr::V4(Ipv4Addr::LOCALHOST)).await;
    let tls = tls_connect(&server, b"stun.turn").await;
    let local = tls.get_ref().0.local_addr().unwrap();
    let mut c = Client::with_link(Link::Stream(Box::pin(tls)));
    let resp = c.binding().await;
    assert_eq!(resp.addr(A_XOR_MAPPED_ADDRESS), Some(local));
    let (username, password) = rest_credentials(SECRET, "tls@localhost", unix_now() + 600);
    let relayed = c.allocate_ok(&username, &password).await;
    assert_eq!(relayed.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    relay_both_ways(&mut c, peer, &mut seen).await;
    task.abort();

    // The same port still serves XMPP for ALPN xmpp-client.
    let tls = tls_connect(&server, b"xmpp-client").await;
    let mut x =
        common::RawClient::new(common::Conn::Tls(Box::new(tls)), server.tls_client_config());
    let features = x.open_stream(DOMAIN).await.expect("XMPP stream over TLS");
    let bare = format!("alpn@{DOMAIN}");
    x.authenticate_plain(&features, &bare, &server.device_password(&bare))
        .await
        .expect("SASL PLAIN");
    x.bind_and_session("turn").await.expect("bind");
    x.ping_server("p1").await;
    x.close().await;
    // And a client without ALPN gets XMPP too.
    let (mut x, _features) = server.connect(Transport::DirectTls).await;
    x.send("</stream:stream>").await.ok();
}

// ---------------------------------------------------------------------------------------------
// e. XEP-0215 over a raw XMPP client
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extdisco_credentials_allocate_with_webrtc_client() {
    let (server, turn_addr) =
        start_turn("allow_peers = [\"127.0.0.0/8\"]\ncredential_ttl_secs = 3600");
    let bare = format!("remote@{DOMAIN}");
    let mut x = server.login_device(&bare, "ctl").await;

    x.send(&format!(
        "<iq type='get' id='info' to='{DOMAIN}'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>"
    ))
    .await
    .unwrap();
    let info = x.wait_iq_response("info").await;
    assert!(
        info.contains("var='urn:xmpp:extdisco:2'") || info.contains("var=\"urn:xmpp:extdisco:2\""),
        "disco#info lacks urn:xmpp:extdisco:2: {info}"
    );

    x.send(&format!(
        "<iq type='get' id='svc' to='{DOMAIN}'><services xmlns='urn:xmpp:extdisco:2'/></iq>"
    ))
    .await
    .unwrap();
    let services = x.wait_iq_response("svc").await;
    assert_eq!(
        attr(&services, "type").as_deref(),
        Some("result"),
        "{services}"
    );
    let entries = service_elements(&services);
    let turn_udp = entries
        .iter()
        .find(|s| {
            attr(s, "type").as_deref() == Some("turn")
                && attr(s, "transport").as_deref() == Some("udp")
        })
        .unwrap_or_else(|| panic!("no turn/udp service: {services}"));
    assert_eq!(attr(turn_udp, "host").as_deref(), Some("127.0.0.1"));
    assert_eq!(
        attr(turn_udp, "port").and_then(|p| p.parse().ok()),
        Some(turn_addr.port())
    );
    let username = attr(turn_udp, "username").expect("turn service without username");
    let password = attr(turn_udp, "password").expect("turn service without password");
    let expires = attr(turn_udp, "expires").expect("turn service without expires");
    let expiry: u64 = username
        .split(':')
        .next()
        .and_then(|e| e.parse().ok())
        .unwrap_or_else(|| panic!("username {username:?} is not EXPIRY:USER"));
    assert!(
        (unix_now() + 3500..=unix_now() + 3700).contains(&expiry),
        "expiry {expiry} is not about credential_ttl_secs from now"
    );
    assert!(
        expires.contains('T'),
        "expires is not a date-time: {expires}"
    );
    assert!(
        username.ends_with(&format!(":{bare}")),
        "username {username:?} does not name the user"
    );
    // The same secret mints what the server hands out.
    assert_eq!(rest_credentials(SECRET, &bare, expiry).1, password);
    for kind in [("stun", "udp"), ("turn", "tcp")] {
        assert!(
            entries
                .iter()
                .any(|s| attr(s, "type").as_deref() == Some(kind.0)
                    && attr(s, "transport").as_deref() == Some(kind.1)),
            "no {kind:?} service: {services}"
        );
    }
    let turns = entries
        .iter()
        .find(|s| attr(s, "type").as_deref() == Some("turns"))
        .unwrap_or_else(|| panic!("no turns service: {services}"));
    assert_eq!(
        attr(turns, "port").and_then(|p| p.parse().ok()),
        Some(server.tls_addr.port())
    );

    // <credentials/> (§3.3) for the turn service.
    x.send(&format!(
        "<iq type='get' id='cred' to='{DOMAIN}'><credentials xmlns='urn:xmpp:extdisco:2'><service host='127.0.0.1' type='turn'/></credentials></iq>"
    ))
    .await
    .unwrap();
    let creds = x.wait_iq_response("cred").await;
    assert_eq!(attr(&creds, "type").as_deref(), Some("result"), "{creds}");
    assert!(creds.contains("username="), "{creds}");

    // The handed-out credentials allocate and relay.
    webrtc_relay_roundtrip(turn_addr, &username, &password, 3).await;
    // Over TLS (the turns entry) with the hand-written client.
    let tls = tls_connect(&server, b"stun.turn").await;
    let mut c = Client::with_link(Link::Stream(Box::pin(tls)));
    c.allocate_ok(&username, &password).await;
    x.close().await;
}

/// The `<service/>` elements of a `<services/>` or `<credentials/>` answer.
fn service_elements(xml: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(at) = rest.find("<service ") {
        let tail = &rest[at..];
        let end = tail.find("/>").map(|e| e + 2).unwrap_or(tail.len());
        out.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    assert!(out.iter().all(|s| element_name(s) == "service"), "{out:?}");
    out
}

/// Server metrics count allocations and relayed traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_turn_activity() {
    let (server, turn_addr) = start_turn("allow_peers = [\"127.0.0.0/8\"]");
    let (peer, mut seen, task) = echo_peer(IpAddr::V4(Ipv4Addr::LOCALHOST)).await;
    let mut c = Client::udp(turn_addr).await;
    c.allocate_ok(USER, PASS).await;
    relay_both_ways(&mut c, peer, &mut seen).await;
    let mut bad = Client::udp(turn_addr).await;
    bad.allocate(USER, "wrong").await.unwrap_err();
    let text = reqwest::Client::new()
        .get(format!("http://{}/metrics", server.http_addr))
        .bearer_auth(common::API_KEY)
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .unwrap();
    let turn_lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("tern_turn") && !l.starts_with('#'))
        .collect();
    eprintln!("{}", turn_lines.join("\n"));
    assert!(
        !turn_lines.is_empty(),
        "no tern_turn_* metrics after TURN activity:\n{text}"
    );
    task.abort();
}

// ---------------------------------------------------------------------------------------------
// Load tool for benches/turn.sh (ignored by `cargo test`)
// ---------------------------------------------------------------------------------------------

/// Allocation rate and held allocations, for `benches/turn.sh` (works against Tern and coturn):
///
/// `TURN_BENCH_SERVER=127.0.0.1:3478 TURN_BENCH_SECRET=... TURN_BENCH_N=500
///  [TURN_BENCH_PEER=127.0.0.1:PORT] [TURN_BENCH_READY=/tmp/ready TURN_BENCH_RELEASE=/tmp/release]
///  cargo test --release --test turn -- --ignored --nocapture bench_allocations`
///
/// Allocates N relays (each from its own UDP socket, REST credentials, `TURN_BENCH_CONCURRENCY`
/// (50) in flight); with `TURN_BENCH_PEER` (a UDP echo peer) each then gets a permission and one
/// datagram relayed there and back. Prints `ALLOCATIONS <ok> <secs> <per sec> failed <n> active
/// <n>` (the rate covers the allocations only), creates the READY file, waits (at most 120 s) for
/// the RELEASE file, then deletes the allocations (Refresh lifetime 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
#[ignore = "load tool for benches/turn.sh"]
async fn bench_allocations() {
    let env = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} not set"));
    let server: SocketAddr = env("TURN_BENCH_SERVER").parse().unwrap();
    let secret = env("TURN_BENCH_SECRET");
    let n: usize = env("TURN_BENCH_N").parse().unwrap();
    let concurrency: usize = std::env::var("TURN_BENCH_CONCURRENCY")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(50);
    let peer: Option<SocketAddr> = std::env::var("TURN_BENCH_PEER")
        .ok()
        .map(|p| p.parse().unwrap());
    let ready = std::env::var("TURN_BENCH_READY").ok();
    let release = std::env::var("TURN_BENCH_RELEASE").ok();
    let (username, password) = rest_credentials(&secret, "bench", unix_now() + 3600);

    // Phase 1: allocations (timed).
    let started = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let (u, p) = (username.clone(), password.clone());
        tasks.push(tokio::spawn(async move {
            let mut tries = 0;
            loop {
                let mut c = Client::udp(server).await;
                let r = c.allocate(&u, &p).await.map(|_| ());
                tries += 1;
                // 437 before authentication: the kernel handed us a port whose 5-tuple still has
                // an allocation on the server (e.g. from turnutils_uclient); take another.
                if matches!(&r, Err(m) if m.error_code() == Some(437)) && tries < 5 {
                    continue;
                }
                drop(permit);
                return (c, r);
            }
        }));
    }
    let mut clients = Vec::with_capacity(n);
    let mut failures = 0;
    for t in tasks {
        match t.await {
            Ok((c, Ok(()))) => clients.push(c),
            Ok((_, Err(m))) => {
                failures += 1;
                if failures < 3 {
                    eprintln!("allocation failed: {}", m.describe());
                }
            }
            Err(e) => {
                failures += 1;
                eprintln!("allocation task failed: {e}");
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let ok = clients.len();

    // Phase 2: one datagram through each relay, so the server's per-relay state is in use.
    let mut active = 0;
    if let Some(peer) = peer {
        let mut tasks = Vec::with_capacity(ok);
        for mut c in clients.drain(..) {
            let permit = sem.clone().acquire_owned().await.unwrap();
            tasks.push(tokio::spawn(async move {
                let mut echoed = false;
                if c.create_permission(peer).await.class == SUCCESS {
                    for _ in 0..3 {
                        c.send_indication(peer, &[0x55; 200]).await;
                        if let Some(Incoming::Data(..)) =
                            c.recv_data(Duration::from_millis(500)).await
                        {
                            echoed = true;
                            break;
                        }
                    }
                }
                drop(permit);
                (c, echoed)
            }));
        }
        for t in tasks {
            if let Ok((c, echoed)) = t.await {
                active += usize::from(echoed);
                clients.push(c);
            }
        }
    }
    println!(
        "ALLOCATIONS {ok} {secs:.3} {:.0} failed {failures} active {active}",
        ok as f64 / secs
    );
    if let Some(ready) = ready {
        std::fs::write(&ready, ok.to_string()).unwrap();
    }
    if let Some(release) = release {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !std::path::Path::new(&release).exists() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for mut c in clients {
        let _ = tokio::time::timeout(Duration::from_secs(2), c.refresh(0)).await;
    }
}

/// utime + stime of process `pid` in seconds (0 if unreadable).
fn process_cpu_secs(pid: Option<u32>) -> f64 {
    let Some(pid) = pid else { return 0.0 };
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesized command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum())
        .unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz
}

/// Relay throughput load for `benches/turn.sh` (works against Tern and coturn; needs no
/// EVEN-PORT): `TURN_BENCH_M` allocations (REST credentials), each with a permission and a
/// channel bound to the UDP echo peer `TURN_BENCH_PEER` (e.g. turnutils_peer), then each sends
/// `TURN_BENCH_MSGS` ChannelData messages of `TURN_BENCH_SIZE` bytes, keeping at most
/// `TURN_BENCH_WINDOW` (4) unanswered (closed loop: the offered load follows what comes back).
/// A message not echoed within 1 s counts as lost. Prints `RELAY <sent> <received> <lost>
/// <secs> <server CPU secs>` (CPU of `TURN_BENCH_SERVER_PID` over the sending phase).
#[tokio::test(flavor = "current_thread")]
#[ignore = "load tool for benches/turn.sh"]
async fn bench_relay() {
    let env = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} not set"));
    let num = |k: &str, default: usize| -> usize {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let server: SocketAddr = env("TURN_BENCH_SERVER").parse().unwrap();
    let secret = env("TURN_BENCH_SECRET");
    let peer: SocketAddr = env("TURN_BENCH_PEER").parse().unwrap();
    let m = num("TURN_BENCH_M", 10);
    let msgs = num("TURN_BENCH_MSGS", 1000);
    let size = num("TURN_BENCH_SIZE", 100);
    let window = num("TURN_BENCH_WINDOW", 4).max(1);
    let server_pid: Option<u32> = std::env::var("TURN_BENCH_SERVER_PID")
        .ok()
        .and_then(|p| p.parse().ok());
    let (username, password) = rest_credentials(&secret, "bench", unix_now() + 3600);

    // Setup: allocation, permission and channel for each client, 50 at a time.
    let sem = Arc::new(tokio::sync::Semaphore::new(50));
    let mut tasks = Vec::with_capacity(m);
    for _ in 0..m {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let (u, p) = (username.clone(), password.clone());
        tasks.push(tokio::spawn(async move {
            let mut tries = 0;
            let mut c = loop {
                let mut c = Client::udp(server).await;
                match c.allocate(&u, &p).await {
                    Ok(_) => break c,
                    Err(r) if r.error_code() == Some(437) && tries < 5 => tries += 1,
                    Err(r) => panic!("Allocate: {}", r.describe()),
                }
            };
            assert_success(&c.create_permission(peer).await, "CreatePermission");
            assert_success(&c.channel_bind(0x4000, peer).await, "ChannelBind");
            drop(permit);
            c
        }));
    }
    let mut sockets = Vec::with_capacity(m);
    let mut clients = Vec::with_capacity(m);
    for t in tasks {
        let mut c = t.await.expect("setup task");
        let Link::Udp(socket, server) = std::mem::replace(&mut c.link, Link::Gone) else {
            unreachable!()
        };
        socket.connect(server).await.unwrap();
        sockets.push(socket);
        clients.push(c);
    }

    let cpu0 = process_cpu_secs(server_pid);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(m);
    for socket in sockets {
        tasks.push(tokio::spawn(async move {
            let frame = channel_data(0x4000, &vec![0x5a; size], false);
            let mut buf = vec![0u8; 65536];
            let (mut sent, mut received, mut lost, mut inflight) = (0usize, 0usize, 0usize, 0usize);
            while sent < msgs && inflight < window {
                socket.send(&frame).await.unwrap();
                sent += 1;
                inflight += 1;
            }
            while inflight > 0 {
                match tokio::time::timeout(Duration::from_secs(1), socket.recv(&mut buf)).await {
                    Ok(Ok(n)) if n >= 4 && buf[0] & 0xC0 == 0x40 => {
                        received += 1;
                        inflight -= 1;
                    }
                    Ok(_) => continue,
                    Err(_) => {
                        lost += inflight;
                        inflight = 0;
                    }
                }
                while sent < msgs && inflight < window {
                    socket.send(&frame).await.unwrap();
                    sent += 1;
                    inflight += 1;
                }
            }
            (sent, received, lost, socket)
        }));
    }
    let (mut sent, mut received, mut lost) = (0, 0, 0);
    for (t, c) in tasks.into_iter().zip(clients.iter_mut()) {
        let (s, r, l, socket) = t.await.unwrap();
        sent += s;
        received += r;
        lost += l;
        c.link = Link::Udp(socket, server);
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = process_cpu_secs(server_pid) - cpu0;
    println!("RELAY {sent} {received} {lost} {secs:.3} {cpu:.2}");
    // Delete the allocations, so later clients that get the same local port meet no stale 5-tuple.
    for mut c in clients {
        let _ = tokio::time::timeout(Duration::from_secs(2), c.refresh(0)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// e'. XEP-0215 with tokio-xmpp as the XMPP client
// ---------------------------------------------------------------------------------------------

/// "A tokio-xmpp client gets TURN credentials over XEP-0215 and allocates with them."
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_xmpp_client_gets_turn_credentials_and_allocates() {
    use tokio_xmpp::jid::Jid;
    use tokio_xmpp::parsers::disco::{DiscoInfoQuery, DiscoInfoResult};
    use tokio_xmpp::parsers::extdisco::{ServicesQuery, ServicesResult};
    use tokio_xmpp::parsers::iq::Iq;

    let (server, turn_addr) = start_turn("allow_peers = [\"127.0.0.0/8\"]");
    let bare = format!("tokio-turn@{DOMAIN}");
    let password = server.device_password(&bare);
    let mut x = common::xmpp_client::login(
        &server,
        Transport::DirectTls,
        &bare,
        &password,
        common::xmpp_client::Mech::Best,
    )
    .await;
    let domain = Jid::new(DOMAIN).unwrap();

    let answer = x
        .request(Iq::from_get("info", DiscoInfoQuery { node: None }).with_to(domain.clone()))
        .await;
    let Iq::Result {
        payload: Some(payload),
        ..
    } = answer
    else {
        panic!("disco#info not answered with a payload: {answer:?}");
    };
    let info = DiscoInfoResult::try_from(payload).expect("disco#info result");
    assert!(
        info.features.iter().any(|f| f == "urn:xmpp:extdisco:2"),
        "disco#info lacks urn:xmpp:extdisco:2: {info:?}"
    );

    let answer = x
        .request(Iq::from_get("svc", ServicesQuery { type_: None }).with_to(domain))
        .await;
    let Iq::Result {
        payload: Some(payload),
        ..
    } = answer
    else {
        panic!("<services/> not answered with a payload: {answer:?}");
    };
    // xmpp-parsers' typed `ServicesResult` knows only type stun|turn (not stuns|turns) and keeps the
    // credential fields private, so the element is read directly; the typed parse is only reported.
    if let Err(e) = ServicesResult::try_from(payload.clone()) {
        eprintln!("note: xmpp-parsers cannot parse this <services/> answer: {e}");
    }
    let turn_udp = payload
        .children()
        .find(|s| s.attr("type") == Some("turn") && s.attr("transport") == Some("udp"))
        .unwrap_or_else(|| panic!("no turn/udp service in {}", String::from(&payload)));
    assert_eq!(turn_udp.attr("host"), Some("127.0.0.1"));
    assert_eq!(
        turn_udp.attr("port").and_then(|p| p.parse().ok()),
        Some(turn_addr.port())
    );
    let username = turn_udp.attr("username").expect("username").to_string();
    let password = turn_udp.attr("password").expect("password").to_string();
    assert!(turn_udp.attr("expires").is_some(), "no expires");
    webrtc_relay_roundtrip(turn_addr, &username, &password, 3).await;
    x.close().await;
}

/// The first Send indication right after CreatePermission is relayed, every time (20 fresh
/// allocations): catches races between a request's effects and the next datagram.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_send_indication_after_permission_is_relayed() {
    let (server, turn_addr) = start_turn("allow_peers = [\"127.0.0.0/8\"]");
    let (peer, mut seen, task) = echo_peer(IpAddr::V4(Ipv4Addr::LOCALHOST)).await;
    let mut failures = Vec::new();
    for i in 0..20 {
        let mut c = Client::udp(turn_addr).await;
        let relayed = c.allocate_ok(USER, PASS).await;
        assert_success(&c.create_permission(peer).await, "CreatePermission");
        c.send_indication(peer, format!("first {i}").as_bytes())
            .await;
        match c.recv_data(Duration::from_secs(2)).await {
            Some(Incoming::Data(from, data))
                if from == peer && data == format!("first {i}").as_bytes() => {}
            other => failures.push(format!(
                "round {i} (client {}, relay {relayed}): {other:?}; {}",
                c.local_addr(),
                peer_saw(&mut seen, format!("first {i}").as_bytes())
            )),
        }
        while seen.try_recv().is_ok() {}
        assert_success(&c.refresh(0).await, "Refresh lifetime 0");
    }
    if !failures.is_empty() {
        let metrics = reqwest::Client::new()
            .get(format!("http://{}/metrics", server.http_addr))
            .bearer_auth(common::API_KEY)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let turn: Vec<&str> = metrics
            .lines()
            .filter(|l| l.starts_with("tern_turn"))
            .collect();
        panic!(
            "{} of 20 first Send indications lost:\n{}\nmetrics:\n{}",
            failures.len(),
            failures.join("\n"),
            turn.join("\n")
        );
    }
    task.abort();
}

//! One benchmark client: connect, TLS, SASL PLAIN, bind, presence, then hold (answering pings).
//!
//! Parsing uses Tern's own sans-IO framer. Reads go through one thread-local buffer, so an idle
//! client owns no receive buffer of its own (the framer releases its buffer when it is empty).

use std::cell::RefCell;
use std::future::poll_fn;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::Poll;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use rustls::pki_types::ServerName;
use sha2::Sha256;
use tern::xmpp::framer::{Event, FrameError, Framer, FramerLimits, Stanza, escape};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::net;

pub const NS_SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
pub const NS_TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
pub const NS_PING: &str = "urn:xmpp:ping";

const LIMITS: FramerLimits = FramerLimits {
    max_stanza_bytes: 256 * 1024,
    max_depth: 32,
};

thread_local! {
    static READ_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; 32 * 1024].into_boxed_slice());
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// TLS from the first byte (XEP-0368).
    Direct,
    /// Plain TCP, then `<starttls/>` (RFC 6120 §5).
    Starttls,
}

/// Credentials source.
#[derive(Debug, Clone)]
pub enum Password {
    /// `{i}` and `{user}` are substituted.
    Pattern(String),
    /// password = lowercase hex(HMAC-SHA256(key = secret, msg = "user@domain")).
    Device(String),
}

/// Everything a client needs, shared by all clients of a process.
pub struct ClientCtx {
    pub server: SocketAddr,
    pub mode: TlsMode,
    pub domain: String,
    pub server_name: ServerName<'static>,
    pub connector: TlsConnector,
    pub user_pattern: String,
    pub password: Password,
    pub source_ips: net::SourceIps,
}

/// Login phases, for failure reasons ("timeout:tls", ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Connect = 0,
    Stream = 1,
    StartTls = 2,
    Tls = 3,
    Auth = 4,
    Bind = 5,
    Hold = 6,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Connect => "connect",
            Phase::Stream => "stream",
            Phase::StartTls => "starttls",
            Phase::Tls => "tls",
            Phase::Auth => "auth",
            Phase::Bind => "bind",
            Phase::Hold => "hold",
        }
    }

    pub fn from_u8(v: u8) -> Phase {
        match v {
            0 => Phase::Connect,
            1 => Phase::Stream,
            2 => Phase::StartTls,
            3 => Phase::Tls,
            4 => Phase::Auth,
            5 => Phase::Bind,
            _ => Phase::Hold,
        }
    }
}

/// Why a client failed; rendered as a short, low-cardinality reason key.
#[derive(Debug)]
pub enum Fail {
    Connect(std::io::Error),
    Tls(std::io::Error),
    Io(Phase, std::io::Error),
    /// The server closed the TCP connection / sent `</stream:stream>`.
    Closed(Phase),
    StreamError(String),
    AuthFailure(String),
    BindError(String),
    Xml(FrameError),
    Unexpected(Phase, String),
}

impl Fail {
    pub fn reason(&self) -> String {
        match self {
            Fail::Connect(e) => match e.kind() {
                std::io::ErrorKind::ConnectionRefused => "connect-refused".into(),
                std::io::ErrorKind::AddrNotAvailable => "connect-addr-not-available".into(),
                _ if e.raw_os_error() == Some(libc::EMFILE) => "connect-too-many-open-files".into(),
                k => format!("connect-error:{k:?}"),
            },
            Fail::Tls(e) => {
                let mut s = format!("tls-error:{e}");
                s.truncate(80);
                s
            }
            Fail::Io(p, e) => format!("io-error:{}:{:?}", p.name(), e.kind()),
            Fail::Closed(p) => format!("closed-by-server:{}", p.name()),
            Fail::StreamError(c) => format!("stream-error:{c}"),
            Fail::AuthFailure(c) => format!("auth-failure:{c}"),
            Fail::BindError(c) => format!("bind-error:{c}"),
            Fail::Xml(e) => format!("xml-error:{}", e.condition()),
            Fail::Unexpected(p, n) => format!("unexpected:{}:{n}", p.name()),
        }
    }
}

pub fn device_password(secret: &str, bare_jid: &str) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(bare_jid.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

impl ClientCtx {
    pub fn username(&self, i: u64) -> String {
        self.user_pattern.replace("{i}", &i.to_string())
    }

    pub fn password(&self, i: u64, user: &str) -> String {
        match &self.password {
            Password::Pattern(p) => p.replace("{i}", &i.to_string()).replace("{user}", user),
            Password::Device(secret) => device_password(secret, &format!("{user}@{}", self.domain)),
        }
    }

    pub fn source_ip(&self, i: u64) -> IpAddr {
        self.source_ips.pick(i)
    }

    fn header(&self) -> String {
        format!(
            "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
             xmlns:stream='http://etherx.jabber.org/streams' to='{}' version='1.0'>",
            escape(&self.domain)
        )
    }
}

/// An authenticated, bound session.
pub struct Session {
    pub stream: TlsStream<TcpStream>,
    pub framer: Framer,
    pub resumed: bool,
}

/// Read once from `s` into the shared buffer and feed the framer. Returns the byte count (0 = EOF).
pub async fn fill<S: AsyncRead + Unpin>(s: &mut S, framer: &mut Framer) -> std::io::Result<usize> {
    poll_fn(|cx| {
        READ_BUF.with_borrow_mut(|buf| {
            let mut rb = ReadBuf::new(buf);
            match Pin::new(&mut *s).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    framer.push(rb.filled());
                    Poll::Ready(Ok(n))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        })
    })
    .await
}

/// Next framer event, reading as needed.
pub async fn next_event<S: AsyncRead + Unpin>(
    s: &mut S,
    framer: &mut Framer,
    phase: Phase,
) -> Result<Event, Fail> {
    loop {
        if let Some(ev) = framer.next().map_err(Fail::Xml)? {
            return Ok(ev);
        }
        match fill(s, framer).await {
            Ok(0) => return Err(Fail::Closed(phase)),
            Ok(_) => {}
            Err(e) => return Err(Fail::Io(phase, e)),
        }
    }
}

/// Next first-level element; a stream error or stream close becomes a failure.
async fn next_stanza<S: AsyncRead + Unpin>(
    s: &mut S,
    framer: &mut Framer,
    phase: Phase,
) -> Result<Stanza, Fail> {
    match next_event(s, framer, phase).await? {
        Event::Stanza(st) if st.name() == "stream:error" => Err(Fail::StreamError(child_name(&st))),
        Event::Stanza(st) => Ok(st),
        Event::StreamClose => Err(Fail::Closed(phase)),
        Event::StreamOpen(_) => Err(Fail::Unexpected(phase, "stream-header".into())),
    }
}

async fn expect_open<S: AsyncRead + Unpin>(
    s: &mut S,
    framer: &mut Framer,
    phase: Phase,
) -> Result<(), Fail> {
    match next_event(s, framer, phase).await? {
        Event::StreamOpen(_) => Ok(()),
        Event::Stanza(st) if st.name() == "stream:error" => Err(Fail::StreamError(child_name(&st))),
        Event::Stanza(st) => Err(Fail::Unexpected(phase, st.name().to_string())),
        Event::StreamClose => Err(Fail::Closed(phase)),
    }
}

async fn expect_features<S: AsyncRead + Unpin>(
    s: &mut S,
    framer: &mut Framer,
    phase: Phase,
) -> Result<Stanza, Fail> {
    let st = next_stanza(s, framer, phase).await?;
    if st.name() != "stream:features" {
        return Err(Fail::Unexpected(phase, st.name().to_string()));
    }
    Ok(st)
}

fn child_name(st: &Stanza) -> String {
    st.first_child()
        .map(|(n, _)| n)
        .unwrap_or_else(|| "unknown".into())
}

/// Write `data` and flush.
pub(crate) async fn send<S: AsyncWrite + Unpin>(
    s: &mut S,
    data: &[u8],
    phase: Phase,
) -> Result<(), Fail> {
    s.write_all(data).await.map_err(|e| Fail::Io(phase, e))?;
    s.flush().await.map_err(|e| Fail::Io(phase, e))
}

/// Log in client number `i`: connect, TLS, SASL PLAIN, bind, initial presence. `phase` is updated
/// as the login progresses (so a timeout can say where it happened).
pub async fn login(ctx: &Arc<ClientCtx>, i: u64, phase: &AtomicU8) -> Result<Session, Fail> {
    let set = |p: Phase| phase.store(p as u8, Ordering::Relaxed);
    let user = ctx.username(i);
    let password = ctx.password(i, &user);
    let header = ctx.header();

    set(Phase::Connect);
    let mut tcp = net::connect(ctx.server, ctx.source_ip(i))
        .await
        .map_err(Fail::Connect)?;

    if ctx.mode == TlsMode::Starttls {
        set(Phase::StartTls);
        let mut framer = Framer::new(LIMITS);
        send(&mut tcp, header.as_bytes(), Phase::StartTls).await?;
        expect_open(&mut tcp, &mut framer, Phase::StartTls).await?;
        expect_features(&mut tcp, &mut framer, Phase::StartTls).await?;
        send(
            &mut tcp,
            format!("<starttls xmlns='{NS_TLS}'/>").as_bytes(),
            Phase::StartTls,
        )
        .await?;
        let st = next_stanza(&mut tcp, &mut framer, Phase::StartTls).await?;
        if st.name() != "proceed" {
            return Err(Fail::Unexpected(Phase::StartTls, st.name().to_string()));
        }
    }

    set(Phase::Tls);
    let mut tls = ctx
        .connector
        .connect(ctx.server_name.clone(), tcp)
        .await
        .map_err(Fail::Tls)?;
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);

    set(Phase::Stream);
    let mut framer = Framer::new(LIMITS);
    send(&mut tls, header.as_bytes(), Phase::Stream).await?;
    expect_open(&mut tls, &mut framer, Phase::Stream).await?;
    expect_features(&mut tls, &mut framer, Phase::Stream).await?;

    set(Phase::Auth);
    let mut plain = Vec::with_capacity(user.len() + password.len() + 2);
    plain.push(0);
    plain.extend_from_slice(user.as_bytes());
    plain.push(0);
    plain.extend_from_slice(password.as_bytes());
    let auth = format!(
        "<auth xmlns='{NS_SASL}' mechanism='PLAIN'>{}</auth>",
        base64::engine::general_purpose::STANDARD.encode(&plain)
    );
    send(&mut tls, auth.as_bytes(), Phase::Auth).await?;
    let st = next_stanza(&mut tls, &mut framer, Phase::Auth).await?;
    match st.name() {
        "success" => {}
        "failure" => return Err(Fail::AuthFailure(child_name(&st))),
        other => return Err(Fail::Unexpected(Phase::Auth, other.to_string())),
    }

    set(Phase::Bind);
    framer.reset();
    send(&mut tls, header.as_bytes(), Phase::Bind).await?;
    expect_open(&mut tls, &mut framer, Phase::Bind).await?;
    expect_features(&mut tls, &mut framer, Phase::Bind).await?;
    send(
        &mut tls,
        b"<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>",
        Phase::Bind,
    )
    .await?;
    loop {
        let st = next_stanza(&mut tls, &mut framer, Phase::Bind).await?;
        if st.name() == "iq" && st.id().as_deref() == Some("b") {
            match st.stanza_type().as_deref() {
                Some("result") => break,
                _ => return Err(Fail::BindError(error_condition(&st))),
            }
        }
        // Anything else before the bind result (e.g. a ping) is answered or ignored.
        if let Some(reply) = ping_reply(&st) {
            send(&mut tls, reply.as_bytes(), Phase::Bind).await?;
        }
    }
    send(&mut tls, b"<presence/>", Phase::Bind).await?;
    set(Phase::Hold);
    Ok(Session {
        stream: tls,
        framer,
        resumed,
    })
}

/// The defined condition inside an `<error/>` child, if it can be found cheaply.
fn error_condition(st: &Stanza) -> String {
    let raw = String::from_utf8_lossy(st.raw());
    let Some(pos) = raw.find("<error") else {
        return "no-error-element".into();
    };
    let rest = &raw[pos..];
    let Some(close) = rest.find('>') else {
        return "unknown".into();
    };
    let inner = &rest[close + 1..];
    let Some(lt) = inner.find('<') else {
        return "unknown".into();
    };
    let name: String = inner[lt + 1..]
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '/' && *c != '>')
        .collect();
    if name.is_empty() {
        "unknown".into()
    } else {
        name
    }
}

/// The reply to an XEP-0199 ping (`<iq type='get'><ping xmlns='urn:xmpp:ping'/></iq>`), if `st` is one.
pub fn ping_reply(st: &Stanza) -> Option<String> {
    if st.name() != "iq" || st.stanza_type().as_deref() != Some("get") {
        return None;
    }
    match st.first_child() {
        Some((name, Some(ns))) if name == "ping" && ns == NS_PING => {}
        _ => return None,
    }
    let id = st.id().unwrap_or_default();
    Some(match st.from() {
        Some(from) => format!(
            "<iq type='result' id='{}' to='{}'/>",
            escape(&id),
            escape(&from)
        ),
        None => format!("<iq type='result' id='{}'/>", escape(&id)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stanza(xml: &str) -> Stanza {
        let mut f = Framer::new(LIMITS);
        f.push(b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams'>");
        assert!(matches!(f.next(), Ok(Some(Event::StreamOpen(_)))));
        f.push(xml.as_bytes());
        match f.next() {
            Ok(Some(Event::Stanza(s))) => s,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn device_password_is_lowercase_hex_hmac() {
        // HMAC-SHA256(key="key", "The quick brown fox jumps over the lazy dog") (RFC 4231 style vector).
        assert_eq!(
            device_password("key", "The quick brown fox jumps over the lazy dog"),
            "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
        );
    }

    #[test]
    fn ping_is_answered() {
        let st = stanza(
            "<iq type='get' id='p&amp;1' from='localhost'><ping xmlns='urn:xmpp:ping'/></iq>",
        );
        assert_eq!(
            ping_reply(&st).unwrap(),
            "<iq type='result' id='p&amp;1' to='localhost'/>"
        );
        let st = stanza("<iq type='get' id='x'><query xmlns='jabber:iq:version'/></iq>");
        assert!(ping_reply(&st).is_none());
        let st = stanza("<iq type='result' id='x'><ping xmlns='urn:xmpp:ping'/></iq>");
        assert!(ping_reply(&st).is_none());
    }

    #[test]
    fn bind_error_condition() {
        let st = stanza(
            "<iq type='error' id='b'><error type='cancel'><conflict \
             xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>",
        );
        assert_eq!(error_condition(&st), "conflict");
    }
}

//! A tokio-xmpp 6 client logged in to the test server, shared by the tokio-xmpp end-to-end tests
//! and the XEP-0215 TURN test.
//!
//! tokio-xmpp's own `StartTlsServerConnector` / `DirectTlsServerConnector` build their rustls root store only
//! from the `rustls-native-certs` / `webpki-roots` features, which our dev-dependency does not enable, so they
//! cannot trust the server's self-signed certificate. A custom `ServerConnector` is not possible from outside
//! the crate either: its signature names `sasl::common::ChannelBinding`, which tokio-xmpp does not re-export.
//! So the client plugs a connector into tokio-xmpp's public `StanzaStream::new` hook: the connector opens
//! TCP (+ STARTTLS via tokio-xmpp's `xmlstream` API) + TLS with a rustls config trusting our certificate,
//! and then tokio-xmpp does everything else itself: stream negotiation, SASL (`client_login::auth`, which
//! also lets a test restrict the mechanism list, e.g. to PLAIN), resource binding and stanza exchange.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::io::BufStream;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_xmpp::Stanza;
use tokio_xmpp::client_login;
use tokio_xmpp::jid::{FullJid, Jid};
use tokio_xmpp::parsers::iq::Iq;
use tokio_xmpp::parsers::message::Message;
use tokio_xmpp::parsers::ns;
use tokio_xmpp::parsers::ping::Ping;
use tokio_xmpp::parsers::starttls;
use tokio_xmpp::parsers::stream_features::StreamFeatures;
use tokio_xmpp::stanzastream::{
    Connection, Event, StanzaStage, StanzaState, StanzaStream, StreamEvent,
};
use tokio_xmpp::xmlstream::{
    FallibleStreamElement, ReadError, StreamHeader, Timeouts, XmppStream, XmppStreamElement,
    initiate_stream,
};

use super::{DOMAIN, STEP, TestServer, Transport};

type TlsIo = BufStream<tokio_rustls::client::TlsStream<TcpStream>>;

/// Which SASL mechanisms the client may use (tokio-xmpp picks SCRAM-SHA-256 > SCRAM-SHA-1 > PLAIN).
#[derive(Debug, Clone, Copy)]
pub enum Mech {
    Best,
    Only(&'static str),
}

/// `sasl::common::Credentials::default()` without naming the type (tokio-xmpp does not re-export `sasl`).
fn default_third_arg<A, B, C: Default, R>(_f: &impl Fn(A, B, C) -> R) -> C {
    C::default()
}

fn header() -> StreamHeader<'static> {
    StreamHeader {
        to: Some(Cow::Borrowed(DOMAIN)),
        from: None,
        id: None,
    }
}

/// TCP (+ STARTTLS) + TLS trusting the test certificate, then SASL by tokio-xmpp; returns an authenticated,
/// not yet bound stream as a `Connection` for `StanzaStream`.
async fn establish(
    addr: std::net::SocketAddr,
    tls: Arc<tokio_rustls::rustls::ClientConfig>,
    transport: Transport,
    jid: Jid,
    password: String,
    mech: Mech,
    sockets: Sockets,
) -> Result<Connection, String> {
    let timeouts = Timeouts::tight();
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    // Keep a second handle on the socket so a test can cut the connection under tokio-xmpp's feet.
    let tcp = tcp
        .into_std()
        .and_then(|std| {
            sockets.lock().unwrap().push(std.try_clone()?);
            TcpStream::from_std(std)
        })
        .map_err(|e| format!("socket handle: {e}"))?;
    let tcp = match transport {
        Transport::DirectTls => tcp,
        Transport::StartTls => {
            let pending =
                initiate_stream(BufStream::new(tcp), ns::JABBER_CLIENT, header(), timeouts)
                    .await
                    .map_err(|e| format!("plaintext stream header: {e}"))?;
            let (features, mut stream): (StreamFeatures, XmppStream<BufStream<TcpStream>>) =
                pending
                    .recv_features::<FallibleStreamElement>()
                    .await
                    .map_err(|e| format!("plaintext features: {e}"))?;
            if !features.can_starttls() {
                return Err(format!("STARTTLS not offered: {features:?}"));
            }
            if !features.sasl_mechanisms.is_empty() {
                return Err(format!(
                    "SASL mechanisms offered before TLS: {:?}",
                    features.sasl_mechanisms
                ));
            }
            stream
                .send(&XmppStreamElement::Starttls(starttls::Nonza::Request(
                    starttls::Request,
                )))
                .await
                .map_err(|e| format!("send <starttls/>: {e}"))?;
            loop {
                match stream.next().await {
                    Some(Ok(FallibleStreamElement::Ok(XmppStreamElement::Starttls(
                        starttls::Nonza::Proceed(_),
                    )))) => break,
                    Some(Ok(other)) => return Err(format!("expected <proceed/>, got {other:?}")),
                    Some(Err(ReadError::SoftTimeout)) => continue,
                    Some(Err(e)) => return Err(format!("waiting for <proceed/>: {e}")),
                    None => return Err("closed while waiting for <proceed/>".into()),
                }
            }
            stream.into_inner().into_inner()
        }
    };
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from(DOMAIN).unwrap();
    let tls_stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))?;
    let pending = initiate_stream(
        BufStream::new(tls_stream),
        ns::JABBER_CLIENT,
        header(),
        timeouts,
    )
    .await
    .map_err(|e| format!("stream header over TLS: {e}"))?;
    let (features, stream): (StreamFeatures, XmppStream<TlsIo>) = pending
        .recv_features::<FallibleStreamElement>()
        .await
        .map_err(|e| format!("features over TLS: {e}"))?;
    let offered = features.sasl_mechanisms.clone();
    let mechanisms: BTreeSet<String> = match mech {
        Mech::Best => offered.clone(),
        Mech::Only(name) => {
            if !offered.contains(name) {
                return Err(format!("server does not offer {name}: {offered:?}"));
            }
            BTreeSet::from([name.to_string()])
        }
    };
    let creds = default_third_arg(&client_login::<TlsIo>)
        .with_username(jid.node().expect("JID with a localpart").as_str())
        .with_password(password);
    let stream = client_login(stream, mechanisms, creds)
        .await
        .map_err(|e| format!("SASL (offered {offered:?}): {e}"))?;
    let pending = stream
        .send_header(header())
        .await
        .map_err(|e| format!("stream restart after SASL: {e}"))?;
    let (features, stream): (StreamFeatures, XmppStream<TlsIo>) = pending
        .recv_features::<FallibleStreamElement>()
        .await
        .map_err(|e| format!("features after SASL: {e}"))?;
    Ok(Connection {
        stream: stream.box_stream(),
        features,
        identity: jid,
    })
}

/// The TCP sockets of a client's connections, oldest first.
pub type Sockets = Arc<Mutex<Vec<std::net::TcpStream>>>;

/// A tokio-xmpp stanza stream logged in to the test server.
pub struct Xmpp {
    pub stream: StanzaStream,
    pub jid: FullJid,
    pub sockets: Sockets,
}

impl Xmpp {
    /// Logs in `jid` (bare for a server-chosen resource, or full) and waits until the resource is bound.
    pub async fn connect(
        server: &TestServer,
        transport: Transport,
        jid: &str,
        password: &str,
        mech: Mech,
    ) -> Result<Xmpp, String> {
        Self::connect_with(server, transport, jid, password, mech, false).await
    }

    /// As [`Xmpp::connect`]; with `reconnect`, tokio-xmpp may reconnect (and resume, XEP-0198) after
    /// the connection is lost.
    pub async fn connect_with(
        server: &TestServer,
        transport: Transport,
        jid: &str,
        password: &str,
        mech: Mech,
        reconnect: bool,
    ) -> Result<Xmpp, String> {
        let jid = Jid::new(jid).map_err(|e| e.to_string())?;
        let addr = match transport {
            Transport::StartTls => server.starttls_addr,
            Transport::DirectTls => server.tls_addr,
        };
        let tls = server.tls_client_config();
        let errors: Arc<Mutex<Vec<String>>> = Arc::default();
        let sockets: Sockets = Arc::default();
        let mut attempts = 0;
        let connector = {
            let errors = errors.clone();
            let sockets = sockets.clone();
            let password = password.to_string();
            Box::new(
                move |_location: Option<String>, slot: oneshot::Sender<Connection>| {
                    attempts += 1;
                    if attempts > 1 && !reconnect || attempts > 5 {
                        // No reconnects in tests: dropping the slot ends the stream.
                        errors
                            .lock()
                            .unwrap()
                            .push("stream lost; reconnect refused".into());
                        return;
                    }
                    let (tls, jid, password, errors, sockets) = (
                        tls.clone(),
                        jid.clone(),
                        password.clone(),
                        errors.clone(),
                        sockets.clone(),
                    );
                    tokio::spawn(async move {
                        match establish(addr, tls, transport, jid, password, mech, sockets).await {
                            Ok(conn) => {
                                let _ = slot.send(conn);
                            }
                            Err(e) => errors.lock().unwrap().push(e),
                        }
                    });
                },
            )
        };
        let mut stream = StanzaStream::new(connector, 16);
        let bound = tokio::time::timeout(STEP, async {
            while let Some(event) = stream.next().await {
                if let Event::Stream(StreamEvent::Reset { bound_jid, .. }) = event {
                    return Some(bound_jid);
                }
            }
            None
        })
        .await;
        let errors = errors.lock().unwrap().join("; ");
        match bound {
            Ok(Some(jid)) => {
                let jid = jid
                    .try_into_full()
                    .map_err(|j| format!("bound JID {j} is not a full JID"))?;
                Ok(Xmpp {
                    stream,
                    jid,
                    sockets,
                })
            }
            Ok(None) => Err(format!("stream ended before binding: {errors}")),
            Err(_) => Err(format!("no resource bound within {STEP:?}: {errors}")),
        }
    }

    pub async fn send(&mut self, stanza: impl Into<Stanza>) {
        let mut token = self.stream.send(Box::new(stanza.into())).await;
        match tokio::time::timeout(STEP, token.wait_for(StanzaStage::Sent)).await {
            Ok(Some(StanzaState::Sent { .. })) | Ok(Some(StanzaState::Acked { .. })) => {}
            other => panic!("{}: stanza not sent: {other:?}", self.jid),
        }
    }

    /// Next stanza satisfying `pred`, skipping others.
    pub async fn wait_for(&mut self, mut pred: impl FnMut(&Stanza) -> bool) -> Stanza {
        let deadline = tokio::time::Instant::now() + STEP;
        let mut skipped = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Ok(Some(Event::Stanza(s))) if pred(&s) => return s,
                Ok(Some(other)) => skipped.push(format!("{other:?}")),
                Ok(None) => panic!("{}: stream ended; skipped: {skipped:?}", self.jid),
                Err(_) => panic!(
                    "{}: no matching stanza within {STEP:?}; skipped: {skipped:?}",
                    self.jid
                ),
            }
        }
    }

    pub async fn wait_message(&mut self) -> Message {
        match self.wait_for(|s| matches!(s, Stanza::Message(_))).await {
            Stanza::Message(m) => m,
            _ => unreachable!(),
        }
    }

    pub async fn wait_iq(&mut self, id: &str) -> Iq {
        match self
            .wait_for(|s| matches!(s, Stanza::Iq(iq) if iq.id() == id))
            .await
        {
            Stanza::Iq(iq) => iq,
            _ => unreachable!(),
        }
    }

    /// Sends an iq and returns the response.
    pub async fn request(&mut self, iq: Iq) -> Iq {
        let id = iq.id().to_string();
        self.send(iq).await;
        self.wait_iq(&id).await
    }

    pub async fn ping_server(&mut self, id: &str) {
        let answer = self
            .request(Iq::from_get(id, Ping).with_to(Jid::new(DOMAIN).unwrap()))
            .await;
        assert!(
            matches!(answer, Iq::Result { .. }),
            "{}: ping not answered with a result: {answer:?}",
            self.jid
        );
    }

    pub async fn close(self) {
        let _ = tokio::time::timeout(Duration::from_secs(15), self.stream.close()).await;
    }
}

pub async fn login(
    server: &TestServer,
    transport: Transport,
    jid: &str,
    password: &str,
    mech: Mech,
) -> Xmpp {
    Xmpp::connect(server, transport, jid, password, mech)
        .await
        .unwrap_or_else(|e| panic!("login of {jid} over {transport:?} with {mech:?} failed: {e}"))
}

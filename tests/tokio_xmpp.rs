//! End-to-end tests with tokio-xmpp 6 as a real third-party client.
//!
//! tokio-xmpp's own `StartTlsServerConnector` / `DirectTlsServerConnector` build their rustls root store only
//! from the `rustls-native-certs` / `webpki-roots` features, which our dev-dependency does not enable, so they
//! cannot trust the server's self-signed certificate. A custom `ServerConnector` is not possible from outside
//! the crate either: its signature names `sasl::common::ChannelBinding`, which tokio-xmpp does not re-export.
//! So these tests plug a connector into tokio-xmpp's public `StanzaStream::new` hook: the connector opens
//! TCP (+ STARTTLS via tokio-xmpp's `xmlstream` API) + TLS with a rustls config trusting our certificate,
//! and then tokio-xmpp does everything else itself: stream negotiation, SASL (`client_login::auth`, which
//! also lets a test restrict the mechanism list, e.g. to PLAIN), resource binding and stanza exchange.

mod common;

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{DOMAIN, STEP, TRICKY_BODY, TestServer, Transport};
use futures::{SinkExt, StreamExt};
use tokio::io::BufStream;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_xmpp::Stanza;
use tokio_xmpp::client_login;
use tokio_xmpp::jid::{BareJid, FullJid, Jid};
use tokio_xmpp::parsers::disco::DiscoInfoQuery;
use tokio_xmpp::parsers::iq::Iq;
use tokio_xmpp::parsers::message::{Lang, Message};
use tokio_xmpp::parsers::ns;
use tokio_xmpp::parsers::ping::Ping;
use tokio_xmpp::parsers::presence::Presence;
use tokio_xmpp::parsers::roster::Roster;
use tokio_xmpp::parsers::starttls;
use tokio_xmpp::parsers::stream_features::StreamFeatures;
use tokio_xmpp::parsers::version::{VersionQuery, VersionResult};
use tokio_xmpp::stanzastream::{
    Connection, Event, StanzaStage, StanzaState, StanzaStream, StreamEvent,
};
use tokio_xmpp::xmlstream::{
    FallibleStreamElement, ReadError, StreamHeader, Timeouts, XmppStream, XmppStreamElement,
    initiate_stream,
};

type TlsIo = BufStream<tokio_rustls::client::TlsStream<TcpStream>>;

/// Which SASL mechanisms the client may use (tokio-xmpp picks SCRAM-SHA-256 > SCRAM-SHA-1 > PLAIN).
#[derive(Debug, Clone, Copy)]
enum Mech {
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
type Sockets = Arc<Mutex<Vec<std::net::TcpStream>>>;

/// A tokio-xmpp stanza stream logged in to the test server.
struct Xmpp {
    stream: StanzaStream,
    jid: FullJid,
    sockets: Sockets,
}

impl Xmpp {
    /// Logs in `jid` (bare for a server-chosen resource, or full) and waits until the resource is bound.
    async fn connect(
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
    async fn connect_with(
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

    async fn send(&mut self, stanza: impl Into<Stanza>) {
        let mut token = self.stream.send(Box::new(stanza.into())).await;
        match tokio::time::timeout(STEP, token.wait_for(StanzaStage::Sent)).await {
            Ok(Some(StanzaState::Sent { .. })) | Ok(Some(StanzaState::Acked { .. })) => {}
            other => panic!("{}: stanza not sent: {other:?}", self.jid),
        }
    }

    /// Next stanza satisfying `pred`, skipping others.
    async fn wait_for(&mut self, mut pred: impl FnMut(&Stanza) -> bool) -> Stanza {
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

    async fn wait_message(&mut self) -> Message {
        match self.wait_for(|s| matches!(s, Stanza::Message(_))).await {
            Stanza::Message(m) => m,
            _ => unreachable!(),
        }
    }

    async fn wait_iq(&mut self, id: &str) -> Iq {
        match self
            .wait_for(|s| matches!(s, Stanza::Iq(iq) if iq.id() == id))
            .await
        {
            Stanza::Iq(iq) => iq,
            _ => unreachable!(),
        }
    }

    /// Sends an iq and returns the response.
    async fn request(&mut self, iq: Iq) -> Iq {
        let id = iq.id().to_string();
        self.send(iq).await;
        self.wait_iq(&id).await
    }

    async fn ping_server(&mut self, id: &str) {
        let answer = self
            .request(Iq::from_get(id, Ping).with_to(Jid::new(DOMAIN).unwrap()))
            .await;
        assert!(
            matches!(answer, Iq::Result { .. }),
            "{}: ping not answered with a result: {answer:?}",
            self.jid
        );
    }

    async fn close(self) {
        let _ = tokio::time::timeout(Duration::from_secs(15), self.stream.close()).await;
    }
}

fn chat(to: &FullJid, body: &str) -> Message {
    Message::chat(Some(Jid::from(to.clone()))).with_body(Lang::default(), body.to_string())
}

fn body_of(m: &Message) -> String {
    m.bodies
        .values()
        .next()
        .cloned()
        .unwrap_or_else(|| panic!("message without body: {m:?}"))
}

async fn login(
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

/// Stored account, SCRAM-SHA-256 and PLAIN, over both transports.
async fn stored_account_login(transport: Transport, mech: Mech) {
    let server = TestServer::start_with_users("", &[("alice@localhost", "correct horse ☃")]);
    let mut c = login(
        &server,
        transport,
        "alice@localhost",
        "correct horse ☃",
        mech,
    )
    .await;
    assert_eq!(c.jid.to_bare(), BareJid::new("alice@localhost").unwrap());
    assert!(
        !c.jid.resource().as_str().is_empty(),
        "server-assigned resource is empty"
    );
    c.ping_server("p1").await;
    c.close().await;

    // A chosen resource is honoured.
    let mut c = login(
        &server,
        transport,
        "alice@localhost/laptop",
        "correct horse ☃",
        mech,
    )
    .await;
    assert_eq!(c.jid.to_string(), "alice@localhost/laptop");
    c.ping_server("p2").await;
    c.close().await;
}

#[tokio::test]
async fn direct_tls_scram_sha256_stored_account() {
    stored_account_login(Transport::DirectTls, Mech::Only("SCRAM-SHA-256")).await;
}

#[tokio::test]
async fn starttls_scram_sha256_stored_account() {
    stored_account_login(Transport::StartTls, Mech::Only("SCRAM-SHA-256")).await;
}

#[tokio::test]
async fn direct_tls_plain_stored_account() {
    stored_account_login(Transport::DirectTls, Mech::Only("PLAIN")).await;
}

#[tokio::test]
async fn starttls_plain_stored_account() {
    stored_account_login(Transport::StartTls, Mech::Only("PLAIN")).await;
}

#[tokio::test]
async fn starttls_scram_sha1_stored_account() {
    stored_account_login(Transport::StartTls, Mech::Only("SCRAM-SHA-1")).await;
}

#[tokio::test]
async fn tokio_xmpp_default_mechanism_choice() {
    stored_account_login(Transport::DirectTls, Mech::Best).await;
}

#[tokio::test]
async fn device_credential_login() {
    let server = TestServer::start("");
    let bare = "agent-42@localhost";
    let password = server.device_password(bare);
    for (transport, mech) in [
        (Transport::DirectTls, Mech::Only("SCRAM-SHA-256")),
        (Transport::StartTls, Mech::Only("SCRAM-SHA-1")),
        (Transport::StartTls, Mech::Only("PLAIN")),
    ] {
        let mut c = login(&server, transport, bare, &password, mech).await;
        assert_eq!(c.jid.to_bare().to_string(), bare);
        c.ping_server("dev-ping").await;
        c.close().await;
    }
    // The device password of one JID is not valid for another.
    let err = Xmpp::connect(
        &server,
        Transport::DirectTls,
        "agent-43@localhost",
        &password,
        Mech::Only("SCRAM-SHA-256"),
    )
    .await
    .err()
    .expect("agent-43 logged in with agent-42's device password");
    assert!(
        err.to_lowercase().contains("not-authorized")
            || err.to_lowercase().contains("notauthorized"),
        "unexpected failure: {err}"
    );
}

#[tokio::test]
async fn wrong_password_is_rejected() {
    let server = TestServer::start_with_users("", &[("alice@localhost", "right")]);
    for mech in ["SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"] {
        let err = Xmpp::connect(
            &server,
            Transport::DirectTls,
            "alice@localhost",
            "wrong",
            Mech::Only(mech),
        )
        .await
        .err()
        .unwrap_or_else(|| panic!("{mech}: login with a wrong password succeeded"));
        assert!(
            err.to_lowercase().contains("not-authorized")
                || err.to_lowercase().contains("notauthorized"),
            "{mech}: unexpected failure: {err}"
        );
    }
}

#[tokio::test]
async fn messages_with_unicode_and_xml_specials() {
    let server = TestServer::start_with_users("", &[("alice@localhost", "pw-a")]);
    let bob_bare = "bob@localhost";
    let bob_pw = server.device_password(bob_bare);
    let mut alice = login(
        &server,
        Transport::DirectTls,
        "alice@localhost",
        "pw-a",
        Mech::Best,
    )
    .await;
    let mut bob = login(&server, Transport::StartTls, bob_bare, &bob_pw, Mech::Best).await;

    // Full-JID routing, alice -> bob.
    alice.send(chat(&bob.jid, TRICKY_BODY)).await;
    let m = bob.wait_message().await;
    assert_eq!(body_of(&m), TRICKY_BODY);
    assert_eq!(
        m.from,
        Some(Jid::from(alice.jid.clone())),
        "from not stamped"
    );

    // Bare-JID routing (RFC 6121 §8.5.2): alice must be available for it to reach her.
    alice.send(Presence::available()).await;
    // Its reflection back to alice shows the server has processed it (RFC 6121 §4.2.2).
    let alice_jid = Jid::from(alice.jid.clone());
    alice
        .wait_for(|s| matches!(s, Stanza::Presence(p) if p.from.as_ref() == Some(&alice_jid)))
        .await;
    let reply = "ответ: 🦀 <&> 漢字 '\"";
    bob.send(
        Message::chat(Some(Jid::from(alice.jid.to_bare())))
            .with_body(Lang::default(), reply.to_string()),
    )
    .await;
    let m = alice.wait_message().await;
    assert_eq!(body_of(&m), reply);
    assert_eq!(m.from, Some(Jid::from(bob.jid.clone())));

    // Many messages in a row arrive complete and in order.
    for i in 0..50 {
        alice
            .send(chat(&bob.jid, &format!("{i} {TRICKY_BODY}")))
            .await;
    }
    for i in 0..50 {
        let m = bob.wait_message().await;
        assert_eq!(body_of(&m), format!("{i} {TRICKY_BODY}"));
    }
    alice.close().await;
    bob.close().await;
}

#[tokio::test]
async fn server_answers_ping_disco_and_roster() {
    let server = TestServer::start("");
    let bare = "probe@localhost";
    let password = server.device_password(bare);
    let mut c = login(&server, Transport::DirectTls, bare, &password, Mech::Best).await;
    c.ping_server("ping-1").await;

    let answer = c
        .request(
            Iq::from_get("disco-1", DiscoInfoQuery { node: None })
                .with_to(Jid::new(DOMAIN).unwrap()),
        )
        .await;
    let Iq::Result {
        payload: Some(payload),
        from,
        ..
    } = answer
    else {
        panic!("disco#info not answered with a result payload: {answer:?}");
    };
    assert_eq!(from, Some(Jid::new(DOMAIN).unwrap()));
    assert!(payload.is("query", ns::DISCO_INFO), "{payload:?}");
    let info = tokio_xmpp::parsers::disco::DiscoInfoResult::try_from(payload)
        .expect("valid disco#info result");
    assert!(
        info.identities.iter().any(|i| i.category == "server"),
        "server identity missing: {info:?}"
    );

    let answer = c
        .request(
            Iq::from_get(
                "items-1",
                tokio_xmpp::parsers::disco::DiscoItemsQuery {
                    node: None,
                    rsm: None,
                },
            )
            .with_to(Jid::new(DOMAIN).unwrap()),
        )
        .await;
    assert!(
        matches!(answer, Iq::Result { .. }),
        "disco#items not answered with a result: {answer:?}"
    );

    let answer = c
        .request(Iq::from_get(
            "roster-1",
            Roster {
                ver: None,
                items: vec![],
            },
        ))
        .await;
    let Iq::Result {
        payload: Some(payload),
        ..
    } = answer
    else {
        panic!("roster get not answered with a result payload: {answer:?}");
    };
    let roster = Roster::try_from(payload).expect("valid roster");
    assert!(roster.items.is_empty(), "roster not empty: {roster:?}");
    c.close().await;
}

#[tokio::test]
async fn iq_routed_to_client_and_reply_routed_back() {
    let server = TestServer::start("");
    let a_pw = server.device_password("asker@localhost");
    let b_pw = server.device_password("answerer@localhost");
    let mut a = login(
        &server,
        Transport::DirectTls,
        "asker@localhost",
        &a_pw,
        Mech::Best,
    )
    .await;
    let mut b = login(
        &server,
        Transport::StartTls,
        "answerer@localhost",
        &b_pw,
        Mech::Best,
    )
    .await;

    let question = Iq::from_get("version-1", VersionQuery).with_to(Jid::from(b.jid.clone()));
    a.send(question).await;
    let got = match b.wait_for(|s| matches!(s, Stanza::Iq(_))).await {
        Stanza::Iq(iq) => iq,
        _ => unreachable!(),
    };
    let Iq::Get {
        from, id, payload, ..
    } = got
    else {
        panic!("expected an iq get, got {got:?}");
    };
    assert_eq!(from, Some(Jid::from(a.jid.clone())), "from not stamped");
    assert_eq!(id, "version-1");
    assert!(payload.is("query", ns::VERSION), "{payload:?}");
    let reply = Iq::from_result(
        id,
        Some(VersionResult {
            name: "Answerer ✓".into(),
            version: "1.0 <beta>".into(),
            os: None,
        }),
    )
    .with_to(Jid::from(a.jid.clone()));
    b.send(reply).await;

    let answer = a.wait_iq("version-1").await;
    let Iq::Result {
        from,
        payload: Some(payload),
        ..
    } = answer
    else {
        panic!("expected a result with payload, got {answer:?}");
    };
    assert_eq!(from, Some(Jid::from(b.jid.clone())));
    let version = VersionResult::try_from(payload).expect("valid version result");
    assert_eq!(version.name, "Answerer ✓");
    assert_eq!(version.version, "1.0 <beta>");
    a.close().await;
    b.close().await;
}

#[tokio::test]
async fn presence_broadcast_to_own_resources() {
    let server = TestServer::start("");
    let bare = "multi@localhost";
    let pw = server.device_password(bare);
    let mut one = login(
        &server,
        Transport::DirectTls,
        &format!("{bare}/one"),
        &pw,
        Mech::Best,
    )
    .await;
    let mut two = login(
        &server,
        Transport::StartTls,
        &format!("{bare}/two"),
        &pw,
        Mech::Best,
    )
    .await;
    one.send(Presence::available()).await;
    two.send(Presence::available()).await;
    let two_jid = Jid::from(two.jid.clone());
    let got = one
        .wait_for(|s| matches!(s, Stanza::Presence(p) if p.from.as_ref() == Some(&two_jid)))
        .await;
    let Stanza::Presence(p) = got else {
        unreachable!()
    };
    assert_eq!(p.type_, tokio_xmpp::parsers::presence::Type::None);
    one.close().await;
    two.close().await;
}

#[tokio::test]
async fn ring_of_clients_routes_every_message() {
    // Ten sessions, each sends to the next one's full JID at once; every message arrives exactly once.
    let server = TestServer::start("");
    let n = 10;
    let mut clients = Vec::new();
    for i in 0..n {
        let bare = format!("ring-{i}@localhost");
        let pw = server.device_password(&bare);
        let transport = if i % 2 == 0 {
            Transport::DirectTls
        } else {
            Transport::StartTls
        };
        clients.push(login(&server, transport, &bare, &pw, Mech::Best).await);
    }
    let jids: Vec<FullJid> = clients.iter().map(|c| c.jid.clone()).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        let to = &jids[(i + 1) % n];
        for k in 0..5 {
            c.send(chat(to, &format!("{i}→{k} ✉"))).await;
        }
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let sender = (i + n - 1) % n;
        for k in 0..5 {
            let m = c.wait_message().await;
            assert_eq!(body_of(&m), format!("{sender}→{k} ✉"));
            assert_eq!(m.from, Some(Jid::from(jids[sender].clone())));
        }
    }
    for c in clients {
        c.close().await;
    }
}

/// `POST /api/v1/push` of one text push; returns the recipient's status.
async fn http_push(server: &TestServer, to: &str, id: &str, body: &str) -> String {
    let r: serde_json::Value = reqwest::Client::new()
        .post(format!("http://{}/api/v1/push", server.http_addr))
        .bearer_auth(common::API_KEY)
        .json(&serde_json::json!({"to": to, "id": id, "body": body}))
        .send()
        .await
        .expect("POST /api/v1/push")
        .json()
        .await
        .expect("JSON answer");
    r["results"][0]["status"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Polls `GET /api/v1/push/{id}` until its recipient is `want`.
async fn wait_push_status(server: &TestServer, id: &str, want: &str) {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let r: serde_json::Value = reqwest::Client::new()
            .get(format!("http://{}/api/v1/push/{id}", server.http_addr))
            .bearer_auth(common::API_KEY)
            .send()
            .await
            .expect("GET /api/v1/push")
            .json()
            .await
            .unwrap_or_default();
        if r["results"][0]["status"] == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "push {id} never became {want}: {r}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// XEP-0198 with tokio-xmpp's own stream management: the TCP connection is cut under it, it
/// reconnects and resumes (no reset), and the push sent while it was away arrives; the server's
/// `<r/>` is answered, so both pushes end `acked`.
#[tokio::test]
async fn stream_management_resume_after_a_dropped_connection() {
    let server = TestServer::start("[sm]\nrequest_every = 1\n");
    let bare = format!("sm-endpoint@{DOMAIN}");
    let password = server.device_password(&bare);
    let mut x = Xmpp::connect_with(
        &server,
        Transport::DirectTls,
        &format!("{bare}/phone"),
        &password,
        Mech::Best,
        true,
    )
    .await
    .expect("login");
    x.send(Presence::available()).await;
    // The server knows the resource is available once its own presence comes back.
    x.wait_for(|s| matches!(s, Stanza::Presence(_))).await;
    assert_eq!(
        http_push(&server, &bare, "sm-1", "before").await,
        "delivered"
    );
    assert_eq!(body_of(&x.wait_message().await), "before");
    wait_push_status(&server, "sm-1", "acked").await;

    // Cut the connection; the server notices (EOF) and keeps the session for resumption.
    x.sockets.lock().unwrap()[0]
        .shutdown(std::net::Shutdown::Both)
        .expect("shutdown");
    let status = http_push(&server, &bare, "sm-2", "while away").await;
    assert!(
        status == "delivered" || status == "queued",
        "push while away: {status}"
    );

    let deadline = tokio::time::Instant::now() + STEP;
    let mut events = Vec::new();
    let mut resumed = false;
    loop {
        match tokio::time::timeout_at(deadline, x.stream.next()).await {
            Ok(Some(Event::Stream(StreamEvent::Resumed))) => resumed = true,
            Ok(Some(Event::Stream(StreamEvent::Reset { .. }))) => {
                panic!("stream reset instead of resumed; events: {events:?}")
            }
            Ok(Some(Event::Stanza(Stanza::Message(m)))) => {
                assert_eq!(body_of(&m), "while away");
                break;
            }
            Ok(Some(other)) => events.push(format!("{other:?}")),
            Ok(None) => panic!("stream ended; events: {events:?}"),
            Err(_) => panic!("push not received after reconnecting; events: {events:?}"),
        }
    }
    assert!(resumed, "no <resumed/>; events: {events:?}");
    assert!(x.sockets.lock().unwrap().len() >= 2, "reconnected");
    wait_push_status(&server, "sm-2", "acked").await;
    x.ping_server("after-resume").await;
    x.close().await;
}

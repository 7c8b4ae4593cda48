//! End-to-end tests with tokio-xmpp 6 as a real third-party client.
//!
//! How the client reaches the server (a connector trusting the test certificate) is in
//! `common::xmpp_client`, shared with the XEP-0215 TURN test.

mod common;

use std::time::Duration;

use common::xmpp_client::{Mech, Xmpp, login};
use common::{DOMAIN, STEP, TRICKY_BODY, TestServer, Transport};
use futures::StreamExt;
use tokio_xmpp::Stanza;
use tokio_xmpp::jid::{BareJid, FullJid, Jid};
use tokio_xmpp::parsers::disco::DiscoInfoQuery;
use tokio_xmpp::parsers::iq::Iq;
use tokio_xmpp::parsers::message::{Lang, Message};
use tokio_xmpp::parsers::ns;
use tokio_xmpp::parsers::presence::Presence;
use tokio_xmpp::parsers::roster::Roster;
use tokio_xmpp::parsers::version::{VersionQuery, VersionResult};
use tokio_xmpp::stanzastream::{Event, StreamEvent};

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

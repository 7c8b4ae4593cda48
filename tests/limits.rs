//! Raw-socket tests of the server's protocol limits and error handling (RFC 6120 §4.9, §13.12).
//!
//! Every test that makes the server drop a connection afterwards checks that the server still accepts a new
//! login and answers on it.

mod common;

use std::time::{Duration, Instant};

use common::{
    DOMAIN, RawClient, STEP, TestServer, Transport, XmlEvent, attr, element_name, escape,
    inner_text, plain_auth, stream_header,
};

/// Logs in a device session, sends `payload` raw, and expects the stream error `condition` and a close.
async fn stream_error_after_login(payload: &[u8], condition: &str) {
    let server = TestServer::start("");
    let mut c = server.login_device(&format!("raw@{DOMAIN}"), "r1").await;
    c.send_bytes(payload).await.expect("send payload");
    c.expect_stream_error(condition, STEP).await;
    server.assert_alive().await;
}

#[tokio::test]
async fn restricted_xml_comment() {
    stream_error_after_login(b"<!-- a comment -->", "restricted-xml").await;
}

#[tokio::test]
async fn restricted_xml_comment_inside_stanza() {
    stream_error_after_login(
        b"<message to='sink@localhost'><body>x</body><!-- hidden --></message>",
        "restricted-xml",
    )
    .await;
}

#[tokio::test]
async fn restricted_xml_processing_instruction() {
    stream_error_after_login(b"<?evil instruction?>", "restricted-xml").await;
}

#[tokio::test]
async fn restricted_xml_undefined_entity() {
    stream_error_after_login(
        b"<message to='sink@localhost'><body>&undefinedentity;</body></message>",
        "restricted-xml",
    )
    .await;
}

#[tokio::test]
async fn restricted_xml_doctype_in_prolog() {
    let server = TestServer::start("");
    let mut c = server.connect_direct_tls().await;
    let header = stream_header(DOMAIN).replacen(
        "?>",
        "?><!DOCTYPE stream:stream [<!ENTITY boom 'boom'>]>",
        1,
    );
    c.send(&header).await.expect("send header");
    c.expect_stream_error("restricted-xml", STEP).await;
    server.assert_alive().await;
}

#[tokio::test]
async fn restricted_xml_comment_before_auth() {
    let server = TestServer::start("");
    let (mut c, _features) = server.connect(Transport::DirectTls).await;
    c.send("<!-- before auth -->").await.expect("send comment");
    c.expect_stream_error("restricted-xml", STEP).await;
    server.assert_alive().await;
}

#[tokio::test]
async fn not_well_formed_bad_nesting() {
    stream_error_after_login(
        b"<message to='sink@localhost'><body>x</message></body>",
        "not-well-formed",
    )
    .await;
}

#[tokio::test]
async fn not_well_formed_invalid_utf8() {
    stream_error_after_login(
        b"<message to='sink@localhost'><body>bad \xFF\xFE byte</body></message>",
        "not-well-formed",
    )
    .await;
}

#[tokio::test]
async fn too_deep_nesting_is_policy_violation() {
    // max_depth is 32 in the harness config; nest 40 levels inside a message.
    let mut xml = String::from("<message to='sink@localhost'>");
    for _ in 0..40 {
        xml.push_str("<x xmlns='urn:example:deep'>");
    }
    for _ in 0..40 {
        xml.push_str("</x>");
    }
    xml.push_str("</message>");
    stream_error_after_login(xml.as_bytes(), "policy-violation").await;
}

#[tokio::test]
async fn oversized_stanza_is_rejected_while_arriving() {
    let server = TestServer::start("");
    let c = server.login_device(&format!("big@{DOMAIN}"), "r1").await;
    let chunk = vec![b'a'; 64 * 1024];
    let count = 160; // 10 MiB of body text, against max_stanza_bytes = 256 KiB
    let outcome = c
        .flood(
            b"<message to='sink@localhost'><body>",
            &chunk,
            count,
            Duration::from_secs(60),
        )
        .await;
    eprintln!(
        "oversized stanza: wrote {} of {} bytes before the close (write error: {:?})",
        outcome.written, outcome.total, outcome.write_error
    );
    assert!(
        outcome.received.contains("<policy-violation"),
        "no policy-violation stream error: {:?} (wrote {} of {} bytes, write error {:?})",
        outcome.received,
        outcome.written,
        outcome.total,
        outcome.write_error
    );
    assert!(
        outcome.closed,
        "server did not close the connection: {outcome:?}"
    );
    assert!(
        outcome.written < outcome.total,
        "the whole 10 MiB stanza was accepted before the server reacted (wrote {} bytes)",
        outcome.written
    );
    server.assert_alive().await;
}

#[tokio::test]
async fn unknown_host_is_host_unknown() {
    let server = TestServer::start("");
    for transport in [Transport::DirectTls, Transport::StartTls] {
        let mut c = match transport {
            Transport::DirectTls => server.connect_direct_tls().await,
            Transport::StartTls => server.connect_plain().await,
        };
        c.send(&stream_header("example.org"))
            .await
            .expect("send header");
        let text = c.expect_stream_error("host-unknown", STEP).await;
        assert!(
            !text.contains("<mechanisms"),
            "{transport:?}: features offered for an unknown host: {text}"
        );
    }
    server.assert_alive().await;
}

#[tokio::test]
async fn preauth_timeout_closes_idle_connection() {
    let server = TestServer::start("[limits]\npreauth_timeout_secs = 2\n");
    let started = Instant::now();
    let (mut c, _features) = server.connect(Transport::DirectTls).await;
    // Send nothing more: the server must give up on us.
    c.expect_stream_error("connection-timeout", Duration::from_secs(20))
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    // The timeout applies before authentication only: an authenticated session outlives it.
    let mut authed = server.login_device(&format!("stays@{DOMAIN}"), "r1").await;
    let (mut idle, _features) = server.connect(Transport::DirectTls).await;
    idle.expect_stream_error("connection-timeout", Duration::from_secs(20))
        .await;
    authed.ping_server("still-there").await;
    server.assert_alive().await;
}

#[tokio::test]
async fn preauth_byte_budget_is_policy_violation() {
    let server = TestServer::start("[limits]\npreauth_max_bytes = 4096\n");
    let (c, _features) = server.connect(Transport::DirectTls).await;
    // Whitespace is legal between top-level elements, so only the byte budget can stop this.
    // 16 MiB: far more than socket buffers can absorb, so "all written" would mean the server kept reading.
    let chunk = vec![b' '; 16 * 1024];
    let outcome = c.flood(b"", &chunk, 1024, Duration::from_secs(60)).await;
    eprintln!(
        "preauth flood: wrote {} of {} bytes before the close (write error: {:?})",
        outcome.written, outcome.total, outcome.write_error
    );
    assert!(
        outcome.received.contains("<policy-violation"),
        "no policy-violation after {} unauthenticated bytes: {outcome:?}",
        outcome.written
    );
    assert!(outcome.closed, "connection not closed: {outcome:?}");
    assert!(
        outcome.written < outcome.total,
        "all {} bytes were accepted before authentication",
        outcome.total
    );
    // A normal login is far below the budget.
    server.assert_alive().await;
}

/// Opens a plaintext connection and tries to get stream features on it.
async fn try_open(server: &TestServer) -> Result<RawClient, String> {
    let mut c = server.connect_plain().await;
    c.open_stream(DOMAIN).await.map(|_| c)
}

#[tokio::test]
async fn per_ip_connection_cap() {
    let server = TestServer::start("[limits]\nmax_connections_per_ip = 3\n");
    // The harness's readiness probes may still be counted for a moment: retry the first three, bounded.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut open = loop {
        let mut conns = Vec::new();
        let mut last_err = String::new();
        for _ in 0..3 {
            match try_open(&server).await {
                Ok(c) => conns.push(c),
                Err(e) => {
                    last_err = e;
                    break;
                }
            }
        }
        if conns.len() == 3 {
            break conns;
        }
        assert!(
            Instant::now() < deadline,
            "three connections from one IP were not accepted with a cap of 3: {last_err}"
        );
        for c in conns {
            c.close().await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // The fourth is refused: closed (possibly after a policy-violation stream error), never given features.
    match tokio::net::TcpStream::connect(server.starttls_addr).await {
        Err(_) => {} // refused outright
        Ok(tcp) => {
            let mut fourth = RawClient::new(common::Conn::Plain(tcp), server.tls_client_config());
            let _ = fourth.send(&stream_header(DOMAIN)).await;
            let text = fourth
                .read_to_close(STEP)
                .await
                .unwrap_or_else(|e| panic!("4th connection from one IP was kept open: {e}"));
            eprintln!("4th connection from one IP got: {text:?}");
            assert!(
                !text.contains("features"),
                "4th connection got stream features: {text}"
            );
            if text.contains("error") {
                assert!(
                    text.contains("<policy-violation"),
                    "4th connection: unexpected error {text}"
                );
            }
        }
    }

    // Closing one frees a slot (bounded retry: the server needs a moment to notice the close).
    open.pop().unwrap().close().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let again = loop {
        match try_open(&server).await {
            Ok(c) => break c,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "no slot after closing a connection: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    again.close().await;
    for c in open {
        c.close().await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match try_open(&server).await {
            Ok(c) => {
                c.close().await;
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "slots not released: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    server.assert_alive().await;
}

#[tokio::test]
async fn inbound_rate_limit_throttles_without_killing() {
    // 4 KiB/s with a 10 kB burst (the smallest the config allows: one maximal stanza of the RFC 6120
    // minimum of 10000 bytes); the sender pushes ~33 kB at once.
    let server = TestServer::start(
        "[limits]\ninbound_bytes_per_sec = 4096\ninbound_burst_bytes = 10000\nmax_stanza_bytes = 10000\n",
    );
    let mut sender = server.login_device(&format!("fast@{DOMAIN}"), "r1").await;
    let mut receiver = server.login_device(&format!("slow@{DOMAIN}"), "r1").await;
    let to = receiver.jid().to_string();
    let filler = "z".repeat(1000);
    let count = 30;
    let mut burst = String::new();
    for i in 0..count {
        burst.push_str(&format!(
            "<message type='chat' to='{to}' id='burst-{i}'><body>{i}:{filler}</body></message>"
        ));
    }
    let started = Instant::now();
    sender.send(&burst).await.expect("write burst");
    sender
        .send(&format!(
            "<iq type='get' id='after-burst' to='{DOMAIN}'><ping xmlns='urn:xmpp:ping'/></iq>"
        ))
        .await
        .expect("write ping");

    // While the sender is throttled, the receiver's own session is served promptly.
    receiver
        .send(&format!(
            "<iq type='get' id='rx-ping' to='{DOMAIN}'><ping xmlns='urn:xmpp:ping'/></iq>"
        ))
        .await
        .expect("send receiver ping");
    let mut next = 0;
    let mut pong_seen_at = None;
    let deadline = Duration::from_secs(60);
    while next < count {
        let el = receiver
            .wait_for(deadline, |e| matches!(element_name(e), "message" | "iq"))
            .await
            .unwrap_or_else(|e| panic!("only {next} of {count} throttled messages arrived: {e}"));
        if element_name(&el) == "iq" {
            assert_eq!(attr(&el, "id").as_deref(), Some("rx-ping"), "{el}");
            assert_eq!(attr(&el, "type").as_deref(), Some("result"), "{el}");
            pong_seen_at.get_or_insert(next);
            continue;
        }
        let body = inner_text(&el, "body").unwrap_or_default();
        assert_eq!(
            body,
            format!("{next}:{filler}"),
            "messages out of order or damaged"
        );
        next += 1;
    }
    let elapsed = started.elapsed();
    let pong_at = match pong_seen_at {
        Some(n) => n,
        None => {
            let el = receiver.wait_iq_response("rx-ping").await;
            assert_eq!(attr(&el, "type").as_deref(), Some("result"), "{el}");
            count
        }
    };
    assert!(
        pong_at < count,
        "the receiver's ping was only answered after all of the throttled sender's messages"
    );
    // ~33 kB at 4 KiB/s after a 10 kB burst needs > 5 s; assert a generous fraction of that.
    assert!(
        elapsed >= Duration::from_millis(2000),
        "33 kB went through a 4 KiB/s bucket in {elapsed:?}: not throttled"
    );
    // The throttled session is alive and processed everything in order: its ping comes back last.
    let pong = sender.wait_iq_response("after-burst").await;
    assert_eq!(attr(&pong, "type").as_deref(), Some("result"), "{pong}");
    server.assert_alive().await;
}

#[tokio::test]
async fn tls_handshake_timeout() {
    let server =
        TestServer::start("[limits]\ntls_handshake_timeout_secs = 2\npreauth_timeout_secs = 120\n");
    let started = Instant::now();
    let tcp = tokio::net::TcpStream::connect(server.tls_addr)
        .await
        .expect("connect");
    let mut c = RawClient::new(common::Conn::Plain(tcp), server.tls_client_config());
    let text = c
        .read_to_close(Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("silent TLS client not disconnected: {e}"));
    assert!(
        text.is_empty(),
        "server sent data to a client that never started TLS: {text:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    server.assert_alive().await;
}

#[tokio::test]
async fn starttls_port_requires_tls_before_auth() {
    let server = TestServer::start("");
    let mut c = server.connect_plain().await;
    let features = c.open_stream(DOMAIN).await.expect("open stream");
    assert!(
        features.contains("urn:ietf:params:xml:ns:xmpp-tls"),
        "no <starttls/> offered: {features}"
    );
    assert!(
        !features.contains("mechanism"),
        "SASL mechanisms offered before TLS: {features}"
    );
    // Valid credentials, but over plaintext: must not succeed.
    let bare = format!("plain@{DOMAIN}");
    c.send(&plain_auth("plain", &server.device_password(&bare)))
        .await
        .expect("send auth");
    match c.next_event(STEP).await {
        Ok(XmlEvent::Element(el)) => {
            assert_ne!(
                element_name(&el),
                "success",
                "SASL succeeded before TLS: {el}"
            );
            assert!(
                matches!(element_name(&el), "failure" | "stream:error"),
                "unexpected answer to <auth/> before TLS: {el}"
            );
        }
        Ok(other) => panic!("unexpected answer to <auth/> before TLS: {other:?}"),
        Err(_) => {} // closed without answering: also a rejection
    }
    server.assert_alive().await;
}

#[tokio::test]
async fn conflict_on_same_full_jid() {
    let server = TestServer::start("");
    let bare = format!("twin@{DOMAIN}");
    let mut old = server.login_device(&bare, "desk").await;
    let password = server.device_password(&bare);
    let mut new = server
        .login_plain(Transport::StartTls, &bare, &password, "desk")
        .await
        .expect("second login with the same full JID");
    assert_eq!(new.jid(), format!("{bare}/desk"));
    old.expect_stream_error("conflict", STEP).await;
    new.ping_server("new-session").await;
    server.assert_alive().await;
}

#[tokio::test]
async fn spoofed_from_is_overwritten() {
    let server = TestServer::start("");
    let mut alice = server.login_device(&format!("alice@{DOMAIN}"), "a").await;
    let mut bob = server.login_device(&format!("bob@{DOMAIN}"), "b").await;
    let to = bob.jid().to_string();
    alice
        .send(&format!(
            "<message type='chat' from='mallory@{DOMAIN}/evil' to='{to}' id='spoof-1'><body>spoof</body></message>"
        ))
        .await
        .expect("send");
    let msg = bob
        .wait_for(STEP, |e| element_name(e) == "message")
        .await
        .expect("bob gets the message");
    assert_eq!(
        attr(&msg, "from").as_deref(),
        Some(alice.jid()),
        "from not stamped: {msg}"
    );
    assert!(!msg.contains("mallory"), "spoofed address leaked: {msg}");
    assert_eq!(inner_text(&msg, "body").as_deref(), Some("spoof"));
    server.assert_alive().await;
}

#[tokio::test]
async fn iq_to_offline_full_jid_is_service_unavailable() {
    let server = TestServer::start("");
    let mut alice = server.login_device(&format!("alice@{DOMAIN}"), "a").await;
    let ghost = format!("ghost@{DOMAIN}/nowhere");
    alice
        .send(&format!(
            "<iq type='get' id='off-1' to='{ghost}'><query xmlns='jabber:iq:version'/></iq>"
        ))
        .await
        .expect("send");
    let answer = alice.wait_iq_response("off-1").await;
    assert_eq!(attr(&answer, "type").as_deref(), Some("error"), "{answer}");
    assert!(
        answer.contains("<service-unavailable"),
        "expected service-unavailable: {answer}"
    );
    assert_eq!(
        attr(&answer, "from").as_deref(),
        Some(ghost.as_str()),
        "{answer}"
    );
    server.assert_alive().await;
}

#[tokio::test]
async fn failed_auth_is_not_authorized() {
    let server = TestServer::start_with_users("", &[("carol@localhost", "right-password")]);
    for (user, password) in [("carol", "wrong-password"), ("agent-7", "0000")] {
        let (mut c, features) = server.connect(Transport::DirectTls).await;
        assert!(features.contains(">PLAIN<"), "{features}");
        c.send(&plain_auth(user, password))
            .await
            .expect("send auth");
        let answer = c.next_element(STEP).await.expect("answer to <auth/>");
        assert_eq!(element_name(&answer), "failure", "{answer}");
        assert!(
            answer.contains("<not-authorized"),
            "expected not-authorized: {answer}"
        );
        c.close().await;
    }
    let mut ok = server
        .login_plain(
            Transport::StartTls,
            "carol@localhost",
            "right-password",
            "r",
        )
        .await
        .expect("stored account logs in with PLAIN");
    ok.ping_server("carol-ping").await;
    server.assert_alive().await;
}

#[tokio::test]
async fn sigterm_sends_system_shutdown_and_exits_zero() {
    let mut server = TestServer::start("");
    let mut a = server.login_device(&format!("a@{DOMAIN}"), "r").await;
    let (mut b, features) = server.connect(Transport::StartTls).await;
    assert_scram_offered(&features);
    let mut authed_b = {
        let bare = format!("b@{DOMAIN}");
        b.authenticate_plain(&features, &bare, &server.device_password(&bare))
            .await
            .expect("auth b");
        b.bind_and_session("r").await.expect("bind b");
        b
    };
    server.sigterm();
    a.expect_stream_error("system-shutdown", STEP).await;
    authed_b.expect_stream_error("system-shutdown", STEP).await;
    let status = server
        .wait_exit_async(Duration::from_secs(20))
        .await
        .expect("server did not exit within 20 s of SIGTERM");
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}"
    );
}

fn assert_scram_offered(features: &str) {
    assert!(
        features.contains("<mechanisms"),
        "no SASL mechanisms after TLS: {features}"
    );
    assert!(
        features.contains("SCRAM-SHA-256") && features.contains("SCRAM-SHA-1"),
        "SCRAM mechanisms missing: {features}"
    );
}

#[tokio::test]
async fn body_text_is_escaped_on_the_way_through() {
    // Raw check of what goes over the wire: special characters stay escaped and unicode intact.
    let server = TestServer::start("");
    let mut alice = server.login_device(&format!("alice@{DOMAIN}"), "a").await;
    let mut bob = server.login_device(&format!("bob@{DOMAIN}"), "b").await;
    let to = bob.jid().to_string();
    alice
        .send(&format!(
            "<message type='chat' to='{to}' id='esc-1'><body>{}</body></message>",
            escape(common::TRICKY_BODY)
        ))
        .await
        .expect("send");
    let msg = bob
        .wait_for(STEP, |e| element_name(e) == "message")
        .await
        .expect("bob gets the message");
    assert_eq!(
        inner_text(&msg, "body").as_deref(),
        Some(common::TRICKY_BODY),
        "{msg}"
    );
}

#[tokio::test]
async fn stanza_before_auth_is_not_authorized() {
    let server = TestServer::start("");
    let (mut c, _features) = server.connect(Transport::DirectTls).await;
    c.send("<message to='someone@localhost'><body>sneaky</body></message>")
        .await
        .expect("send");
    c.expect_stream_error("not-authorized", STEP).await;
    server.assert_alive().await;
}

#[tokio::test]
async fn wrong_stream_namespace_is_invalid_namespace() {
    let server = TestServer::start("");
    let mut c = server.connect_direct_tls().await;
    c.send(&stream_header(DOMAIN).replace(common::NS_STREAMS, "http://example.org/not-streams"))
        .await
        .expect("send header");
    c.expect_stream_error("invalid-namespace", STEP).await;
    server.assert_alive().await;
}

#[tokio::test]
async fn sasl_unknown_mechanism_and_abort() {
    let server = TestServer::start("");
    let (mut c, _features) = server.connect(Transport::DirectTls).await;
    c.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='DIGEST-MD5'/>")
        .await
        .expect("send");
    let answer = c.next_element(STEP).await.expect("answer");
    assert_eq!(element_name(&answer), "failure", "{answer}");
    assert!(answer.contains("<invalid-mechanism"), "{answer}");

    // Start SCRAM, then abort it (RFC 6120 §6.4.4).
    c.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-256'>biwsbj1hbGljZSxyPWZ5a28rZDJsYmJGZ09OUnY5cWt4ZGF3TA==</auth>")
        .await
        .expect("send");
    let challenge = c.next_element(STEP).await.expect("challenge");
    assert_eq!(element_name(&challenge), "challenge", "{challenge}");
    c.send("<abort xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>")
        .await
        .expect("send abort");
    let answer = c.next_element(STEP).await.expect("answer to abort");
    assert_eq!(element_name(&answer), "failure", "{answer}");
    assert!(answer.contains("<aborted"), "{answer}");

    // The same stream may still authenticate afterwards.
    let bare = format!("retry@{DOMAIN}");
    c.send(&plain_auth("retry", &server.device_password(&bare)))
        .await
        .expect("send auth");
    let answer = c.next_element(STEP).await.expect("answer");
    assert_eq!(element_name(&answer), "success", "{answer}");
}

#[tokio::test]
async fn whitespace_keepalive_is_accepted() {
    let server = TestServer::start("");
    let mut c = server.login_device(&format!("ws@{DOMAIN}"), "r").await;
    for _ in 0..5 {
        c.send(" \n\t ").await.expect("send whitespace");
    }
    c.ping_server("after-ws").await;
}

#[tokio::test]
async fn server_pings_idle_client_and_drops_a_silent_one() {
    let server = TestServer::start("[c2s]\nping_interval_secs = 1\nping_timeout_secs = 2\n");
    let mut answering = server.login_device(&format!("awake@{DOMAIN}"), "r").await;
    let mut silent = server.login_device(&format!("asleep@{DOMAIN}"), "r").await;

    // The server probes the idle session with an XEP-0199 ping; answering keeps the session.
    for round in 0..3 {
        let ping = answering
            .wait_for(Duration::from_secs(15), |e| {
                element_name(e) == "iq" && e.contains("urn:xmpp:ping")
            })
            .await
            .unwrap_or_else(|e| panic!("round {round}: no server ping to an idle client: {e}"));
        assert_eq!(attr(&ping, "type").as_deref(), Some("get"), "{ping}");
        let id = attr(&ping, "id").expect("ping id");
        let from = attr(&ping, "from").unwrap_or_else(|| DOMAIN.to_string());
        answering
            .send(&format!(
                "<iq type='result' id='{}' to='{}'/>",
                escape(&id),
                escape(&from)
            ))
            .await
            .expect("pong");
    }
    answering.ping_server("still-alive").await;

    // A session that never answers is dropped.
    let text = silent
        .read_to_close(Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("silent client not dropped: {e}"));
    assert!(
        text.contains("urn:xmpp:ping"),
        "no ping before drop: {text}"
    );
    server.assert_alive().await;
}

#[tokio::test]
async fn message_to_offline_resource_is_rerouted_or_bounced() {
    // RFC 6121 §8.5.3.2.1: a chat message to a full JID with no such resource is either handled as if
    // sent to the bare JID or answered with service-unavailable; it must not vanish silently.
    let server = TestServer::start("");
    let mut alice = server
        .login_device(&format!("alice@{DOMAIN}"), "here")
        .await;
    alice.send("<presence/>").await.expect("presence");
    let me = alice.jid().to_string();
    alice
        .wait_for(STEP, |e| {
            element_name(e) == "presence" && attr(e, "from").as_deref() == Some(me.as_str())
        })
        .await
        .expect("own presence reflected");
    let mut bob = server.login_device(&format!("bob@{DOMAIN}"), "b").await;
    bob.send(&format!(
        "<message type='chat' id='gone-1' to='alice@{DOMAIN}/gone'><body>anyone?</body></message>"
    ))
    .await
    .expect("send");
    tokio::select! {
        delivered = alice.wait_for(STEP, |e| element_name(e) == "message") => {
            let msg = delivered.expect("delivered to the available resource");
            assert_eq!(inner_text(&msg, "body").as_deref(), Some("anyone?"), "{msg}");
            assert_eq!(attr(&msg, "from").as_deref(), Some(bob.jid()), "{msg}");
        }
        bounced = bob.wait_for(STEP, |e| element_name(e) == "message") => {
            let msg = bounced.expect("neither delivered nor bounced");
            assert_eq!(attr(&msg, "type").as_deref(), Some("error"), "{msg}");
            assert!(msg.contains("<service-unavailable"), "{msg}");
        }
    }
}

#[tokio::test]
async fn message_to_remote_domain_is_bounced() {
    // Tern has no server-to-server: stanzas for other domains come back as errors.
    let server = TestServer::start("");
    let mut alice = server.login_device(&format!("alice@{DOMAIN}"), "a").await;
    alice
        .send("<message type='chat' id='far-1' to='someone@example.org'><body>hello?</body></message>")
        .await
        .expect("send");
    let msg = alice
        .wait_for(STEP, |e| element_name(e) == "message")
        .await
        .expect("bounce");
    assert_eq!(attr(&msg, "type").as_deref(), Some("error"), "{msg}");
    assert_eq!(attr(&msg, "id").as_deref(), Some("far-1"), "{msg}");
    assert!(
        msg.contains("<remote-server-not-found") || msg.contains("<service-unavailable"),
        "{msg}"
    );
    alice
        .send("<iq type='get' id='far-2' to='example.org'><ping xmlns='urn:xmpp:ping'/></iq>")
        .await
        .expect("send");
    let iq = alice.wait_iq_response("far-2").await;
    assert_eq!(attr(&iq, "type").as_deref(), Some("error"), "{iq}");
}

#[tokio::test]
async fn unavailable_presence_broadcast_on_disconnect() {
    let server = TestServer::start("");
    let bare = format!("duo@{DOMAIN}");
    let mut one = server.login_device(&bare, "one").await;
    let mut two = server.login_device(&bare, "two").await;
    one.send("<presence/>").await.expect("presence one");
    two.send("<presence/>").await.expect("presence two");
    let two_jid = two.jid().to_string();
    one.wait_for(STEP, |e| {
        element_name(e) == "presence" && attr(e, "from").as_deref() == Some(two_jid.as_str())
    })
    .await
    .expect("available presence of two");
    two.close().await;
    let gone = one
        .wait_for(STEP, |e| {
            element_name(e) == "presence" && attr(e, "from").as_deref() == Some(two_jid.as_str())
        })
        .await
        .expect("unavailable presence of two after it disconnected");
    assert_eq!(
        attr(&gone, "type").as_deref(),
        Some("unavailable"),
        "{gone}"
    );
}

#[tokio::test]
async fn accounts_added_and_removed_while_running() {
    let server = TestServer::start("");
    let deadline = Instant::now() + Duration::from_secs(10);
    server.add_user("late@localhost", "late-pw");
    // The running server picks up the store change (bounded retry).
    let mut c = loop {
        match server
            .login_plain(Transport::DirectTls, "late@localhost", "late-pw", "r")
            .await
        {
            Ok(c) => break c,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "account added at runtime cannot log in: {e}"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    c.ping_server("late-ping").await;
    c.close().await;

    let out = server.cli(&["user", "remove", "late@localhost"], None);
    assert!(out.status.success(), "{out:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match server
            .login_plain(Transport::DirectTls, "late@localhost", "late-pw", "r")
            .await
        {
            Err(e) if e.contains("not-authorized") => break,
            Err(e) => panic!("unexpected failure: {e}"),
            Ok(c) => {
                c.close().await;
                assert!(
                    Instant::now() < deadline,
                    "removed account can still log in"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

#[tokio::test]
async fn device_credentials_disabled_without_secret() {
    let server = TestServer::start_edited("", |config| {
        config["auth"]
            .as_table_mut()
            .expect("[auth]")
            .remove("device_secret");
    });
    let bare = format!("agent-1@{DOMAIN}");
    let err = server
        .login_plain(
            Transport::DirectTls,
            &bare,
            &common::device_password_for(common::DEVICE_SECRET, &bare),
            "r",
        )
        .await
        .err()
        .expect("device login worked although device credentials are disabled");
    assert!(err.contains("not-authorized"), "{err}");
}

/// `count` chat messages of ~1 kB each to `to`, as one string per message.
fn chat_burst(to: &str, count: usize) -> Vec<String> {
    let filler = "q".repeat(1000);
    (0..count)
        .map(|i| {
            format!("<message type='chat' to='{to}' id='m{i}'><body>{i} {filler}</body></message>")
        })
        .collect()
}

#[tokio::test]
async fn slow_consumer_does_not_block_the_sender() {
    // Receiver never reads; the sender pushes far more than socket buffers and the outbound queue hold.
    let server = TestServer::start(
        "[limits]\ninbound_bytes_per_sec = 100000000\ninbound_burst_bytes = 100000000\n",
    );
    let stuck = server.login_device(&format!("stuck@{DOMAIN}"), "r").await;
    let stuck_jid = stuck.jid().to_string();
    let sender = server.login_device(&format!("busy@{DOMAIN}"), "r").await;
    let mut pieces: Vec<String> = chat_burst(&stuck_jid, 8000);
    pieces.push(format!(
        "<iq type='get' id='after-flood' to='{DOMAIN}'><ping xmlns='urn:xmpp:ping'/></iq>"
    ));
    let outcome = sender
        .flood_with(
            pieces.iter().map(|p| p.as_bytes()),
            Some("after-flood"),
            Duration::from_secs(60),
        )
        .await;
    assert!(
        !outcome.closed && outcome.write_error.is_none(),
        "the sender was cut off because another client is slow: {:?} / {:?}",
        outcome.write_error,
        outcome.received.get(..2000)
    );
    assert_eq!(outcome.written, outcome.total);
    assert!(
        outcome.received.contains("after-flood"),
        "the sender's ping was not answered within 60 s while a recipient was stuck"
    );
    // Refused stanzas are bounced, not silently dropped (RFC 6120 §8.3.3.18 resource-constraint).
    assert!(
        outcome.received.contains("<resource-constraint"),
        "no resource-constraint bounce although ~8 MB were queued for a client that reads nothing"
    );
    drop(stuck);
    server.assert_alive().await;
}

#[tokio::test]
async fn sigterm_exits_despite_a_stuck_client() {
    let mut server = TestServer::start(
        "[limits]\ninbound_bytes_per_sec = 100000000\ninbound_burst_bytes = 100000000\n",
    );
    let stuck = server.login_device(&format!("stuck@{DOMAIN}"), "r").await;
    let stuck_jid = stuck.jid().to_string();
    let sender = server.login_device(&format!("busy@{DOMAIN}"), "r").await;
    let mut pieces = chat_burst(&stuck_jid, 6000);
    pieces.push(format!(
        "<iq type='get' id='flooded' to='{DOMAIN}'><ping xmlns='urn:xmpp:ping'/></iq>"
    ));
    let outcome = sender
        .flood_with(
            pieces.iter().map(|p| p.as_bytes()),
            Some("flooded"),
            Duration::from_secs(60),
        )
        .await;
    assert!(outcome.received.contains("flooded"), "flood not processed");
    // A pre-auth stream is also open.
    let (mut preauth, _features) = server.connect(Transport::DirectTls).await;
    server.sigterm();
    let text = preauth
        .read_to_close(STEP)
        .await
        .unwrap_or_else(|e| panic!("unauthenticated stream not closed on shutdown: {e}"));
    assert!(
        text.contains("<system-shutdown"),
        "unauthenticated stream closed without system-shutdown: {text:?}"
    );
    let status = server
        .wait_exit_async(Duration::from_secs(30))
        .await
        .expect("server did not exit within 30 s of SIGTERM with a client that reads nothing");
    assert_eq!(status.code(), Some(0), "exit status: {status}");
    drop(stuck);
}

/// `limits.max_resources_per_account`: one resource too many gets `resource-constraint` on bind
/// (RFC 6120 §7.6.2.1); the account's other sessions and the server carry on.
#[tokio::test]
async fn resources_per_account_cap() {
    let server = TestServer::start("[limits]\nmax_resources_per_account = 2\n");
    let bare = format!("multi@{DOMAIN}");
    let mut first = server.login_device(&bare, "one").await;
    let _second = server.login_device(&bare, "two").await;
    let password = server.device_password(&bare);
    let err = server
        .login_plain(Transport::DirectTls, &bare, &password, "three")
        .await
        .err()
        .expect("a third resource must be refused");
    assert!(err.contains("resource-constraint"), "{err}");
    // Replacing an existing resource is still allowed at the cap.
    let _two_again = server.login_device(&bare, "two").await;
    first.ping_server("still-there").await;
    server.assert_alive().await;
}

/// A stanza using a namespace prefix it does not declare would be forwarded into another stream where
/// the prefix means nothing: the sender's stream ends with `not-well-formed` instead.
#[tokio::test]
async fn undeclared_namespace_prefix_is_not_well_formed() {
    stream_error_after_login(
        b"<message to='someone@localhost/r' type='chat'><x:y/></message>",
        "not-well-formed",
    )
    .await;
}

//! Certificate reload on SIGHUP with a Tigase-style `certs_dir`: new handshakes get the new
//! certificate, a broken file keeps the old one, and a session opened before the reload keeps working.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Conn, DOMAIN, RawClient, STEP, TestServer};
use rustls::pki_types::CertificateDer;
use tokio::net::TcpStream;

/// A self-signed certificate for the test domain as a Tigase bundle (key + certificate) and its DER.
fn bundle() -> (String, CertificateDer<'static>) {
    let ck = rcgen::generate_simple_self_signed(vec![DOMAIN.to_string()]).expect("generate");
    let pem = format!("{}{}", ck.signing_key.serialize_pem(), ck.cert.pem());
    (pem, ck.cert.der().clone())
}

/// Direct TLS trusting all of `roots`; returns the client and the certificate the server presented.
async fn connect(server: &TestServer, roots: &[CertificateDer<'static>]) -> (RawClient, Vec<u8>) {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).expect("root");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(store)
            .with_no_client_auth(),
    );
    let tcp = TcpStream::connect(server.tls_addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from(DOMAIN).expect("name");
    let tls = tokio::time::timeout(
        STEP,
        tokio_rustls::TlsConnector::from(config.clone()).connect(name, tcp),
    )
    .await
    .expect("handshake timed out")
    .expect("handshake");
    let presented = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("server certificate")
        .to_vec();
    (RawClient::new(Conn::Tls(Box::new(tls)), config), presented)
}

async fn login(server: &TestServer, c: &mut RawClient, user: &str) {
    let features = c.open_stream(DOMAIN).await.expect("stream");
    let bare = format!("{user}@{DOMAIN}");
    c.authenticate_plain(&features, &bare, &server.device_password(&bare))
        .await
        .expect("auth");
    c.bind_and_session("r").await.expect("bind");
}

fn sighup(server: &TestServer) {
    // SAFETY: kill(2) on the pid of the server child process.
    assert_eq!(
        unsafe { libc::kill(server.pid() as libc::pid_t, libc::SIGHUP) },
        0
    );
}

/// Polls (bounded) until a new handshake presents `want`.
async fn wait_for_cert(server: &TestServer, roots: &[CertificateDer<'static>], want: &[u8]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_c, got) = connect(server, roots).await;
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the reloaded certificate was not presented within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn sighup_reloads_certificates_without_dropping_sessions() {
    let certs = tempfile::tempdir().expect("tempdir");
    let file = certs.path().join(format!("{DOMAIN}.pem"));
    let (pem_a, der_a) = bundle();
    let (pem_b, der_b) = bundle();
    std::fs::write(&file, &pem_a).expect("write bundle A");
    // Polling off: only SIGHUP reloads here.
    let server = TestServer::start(&format!(
        "[tls]\ncerts_dir = {:?}\nreload_check_secs = 0\n",
        certs.path().display().to_string()
    ));
    let roots = [der_a.clone(), der_b.clone()];

    let (mut old, presented) = connect(&server, &roots).await;
    assert_eq!(presented, der_a.to_vec(), "certificate A first");
    login(&server, &mut old, "before-reload").await;

    // A broken file is refused and A stays in use.
    std::fs::write(&file, "-----BEGIN PRIVATE KEY-----\nnot base64\n").expect("write broken");
    sighup(&server);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_c, presented) = connect(&server, &roots).await;
    assert_eq!(
        presented,
        der_a.to_vec(),
        "a broken bundle must not replace A"
    );

    // A valid new bundle is picked up by new handshakes.
    std::fs::write(&file, &pem_b).expect("write bundle B");
    sighup(&server);
    wait_for_cert(&server, &roots, &der_b).await;
    let (mut new, _) = connect(&server, &roots).await;
    login(&server, &mut new, "after-reload").await;

    // The session from before the reload is untouched.
    old.ping_server("after-reload-ping").await;
    assert!(
        server.log().contains(&file.display().to_string()),
        "the broken file is named in the log"
    );
}

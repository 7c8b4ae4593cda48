//! Shared harness for the end-to-end tests: runs the real `tern` binary on free loopback ports with a
//! throw-away data directory, and offers a small raw XMPP client (plain TCP, STARTTLS, direct TLS) that
//! lets tests write arbitrary bytes and read what the server answers, with bounded timeouts everywhere.
//!
//! Each integration-test crate uses a different subset of these helpers.
#![allow(dead_code)]

pub mod xmpp_client;

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// The XMPP domain every test server is configured for.
pub const DOMAIN: &str = "localhost";
/// The device secret every test server is configured with.
pub const DEVICE_SECRET: &str = "s3cret-device-secret-for-tests";
/// API key of the test servers' HTTP API.
pub const API_KEY: &str = "test-api-key-0123456789abcdef";
/// Default bound for a single protocol step in tests.
pub const STEP: Duration = Duration::from_secs(10);
/// How long the server gets to start listening.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);

pub const NS_STREAMS: &str = "http://etherx.jabber.org/streams";

/// Path of the binary under test.
pub fn tern_bin() -> &'static str {
    env!("CARGO_BIN_EXE_tern")
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// lowercase hex(HMAC-SHA256(key = secret, msg = bare JID)).
pub fn device_password_for(secret: &str, bare_jid: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(bare_jid.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Recursively merges `extra` into `base` (tables merge key by key, everything else is replaced).
fn merge_toml(base: &mut toml::Table, extra: toml::Table) {
    for (key, value) in extra {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(e)) => merge_toml(b, e),
            (_, v) => {
                base.insert(key, v);
            }
        }
    }
}

/// The configuration file the harness writes, before `extra_toml` is merged in.
pub fn base_config(
    data_dir: &Path,
    starttls: SocketAddr,
    tls: SocketAddr,
    http: SocketAddr,
) -> toml::Table {
    let text = format!(
        r#"
[server]
domain = "{DOMAIN}"
data_dir = "{data_dir}"

[c2s]
starttls_listen = ["{starttls}"]
tls_listen = ["{tls}"]
ping_interval_secs = 300
ping_timeout_secs = 60

[auth]
device_secret = "{DEVICE_SECRET}"

[http]
listen = "{http}"
api_keys = ["{API_KEY}"]

[turn]
listen = "127.0.0.1:{turn_port}"

[limits]
max_stanza_bytes = 262144
max_depth = 32
preauth_timeout_secs = 30
preauth_max_bytes = 65536
tls_handshake_timeout_secs = 10
max_connections_per_ip = 5000
inbound_bytes_per_sec = 65536
inbound_burst_bytes = 524288
"#,
        data_dir = data_dir.display(),
        // Every test server runs TURN too, on a port of its own (3478 would collide).
        turn_port = free_port()
    );
    text.parse().expect("base config is valid TOML")
}

/// A running `tern serve` on its own ports and data directory; killed on drop.
pub struct TestServer {
    dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub data_dir: PathBuf,
    pub starttls_addr: SocketAddr,
    pub tls_addr: SocketAddr,
    /// The HTTP API (`[http] listen`), which accepts [`API_KEY`].
    pub http_addr: SocketAddr,
    log_path: PathBuf,
    child: Option<Child>,
    exit_status: Option<ExitStatus>,
}

impl TestServer {
    /// Starts a server whose configuration is the harness default with `extra_toml` merged over it.
    pub fn start(extra_toml: &str) -> TestServer {
        Self::start_with_users(extra_toml, &[])
    }

    /// Like [`TestServer::start`], but first stores the given accounts with `tern user add`.
    pub fn start_with_users(extra_toml: &str, users: &[(&str, &str)]) -> TestServer {
        Self::start_full(extra_toml, users, |_| {})
    }

    /// Like [`TestServer::start`], with a final edit of the merged config (e.g. to remove a key).
    pub fn start_edited(extra_toml: &str, edit: impl Fn(&mut toml::Table)) -> TestServer {
        Self::start_full(extra_toml, &[], edit)
    }

    fn start_full(
        extra_toml: &str,
        users: &[(&str, &str)],
        edit: impl Fn(&mut toml::Table),
    ) -> TestServer {
        let extra: toml::Table = extra_toml.parse().expect("extra_toml must be valid TOML");
        let mut last_log = String::new();
        // Ports are picked by binding and dropping; another process may grab one in between, so retry.
        for _attempt in 0..3 {
            let dir = tempfile::tempdir().expect("tempdir");
            let data_dir = dir.path().join("data");
            let starttls_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let tls_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let http_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let mut config = base_config(&data_dir, starttls_addr, tls_addr, http_addr);
            merge_toml(&mut config, extra.clone());
            edit(&mut config);
            let config_path = dir.path().join("tern.toml");
            std::fs::write(
                &config_path,
                toml::to_string(&config).expect("serialize config"),
            )
            .expect("write config");
            let log_path = dir.path().join("server.log");
            let mut server = TestServer {
                dir,
                config_path,
                data_dir,
                starttls_addr,
                tls_addr,
                http_addr,
                log_path,
                child: None,
                exit_status: None,
            };
            for (jid, password) in users {
                server.add_user(jid, password);
            }
            match server.spawn_and_wait() {
                Ok(()) => return server,
                Err(e) => {
                    last_log = format!("{e}\n--- server log ---\n{}", server.log());
                    if !last_log.to_lowercase().contains("in use") {
                        break;
                    }
                }
            }
        }
        panic!("tern serve did not come up: {last_log}");
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log = File::create(&self.log_path).expect("create log file");
        let child = Command::new(tern_bin())
            .arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot spawn {}: {e}", tern_bin()))?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        let mut ready = [false, false];
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().expect("try_wait") {
                self.exit_status = Some(status);
                self.child = None;
                return Err(format!("tern serve exited early with {status}"));
            }
            for (i, addr) in [self.starttls_addr, self.tls_addr].iter().enumerate() {
                if !ready[i]
                    && std::net::TcpStream::connect_timeout(addr, Duration::from_millis(200))
                        .is_ok()
                {
                    ready[i] = true;
                }
            }
            let cert_ready = self.has_custom_tls() || self.selfsigned_cert_path().exists();
            if ready[0] && ready[1] && cert_ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "not ready after {START_TIMEOUT:?} (starttls port: {}, tls port: {}, cert: {})",
                    ready[0], ready[1], cert_ready
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn has_custom_tls(&self) -> bool {
        let text = std::fs::read_to_string(&self.config_path).unwrap_or_default();
        let config: toml::Table = text.parse().unwrap_or_default();
        config
            .get("tls")
            .and_then(|t| t.as_table())
            .is_some_and(|t| t.contains_key("cert") || t.contains_key("certs_dir"))
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything the server printed so far.
    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(&self.log_path) {
            let mut bytes = Vec::new();
            let _ = f.read_to_end(&mut bytes);
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
        text
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server is running").id()
    }

    /// Sends SIGTERM to the server process.
    pub fn sigterm(&self) {
        let pid = self.pid() as libc::pid_t;
        // SAFETY: plain kill(2) on the pid of a child we spawned and have not reaped yet.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM) failed");
    }

    /// `kill -9` the server and reap it: no shutdown code runs.
    pub fn kill9(&mut self) {
        let pid = self.pid() as libc::pid_t;
        // SAFETY: plain kill(2) on the pid of a child we spawned and have not reaped yet.
        let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
        assert_eq!(rc, 0, "kill(SIGKILL) failed");
        let status = self
            .wait_exit(STEP)
            .expect("server did not die after SIGKILL");
        assert!(
            !status.success(),
            "killed server exited successfully: {status}"
        );
    }

    /// Starts the server again with the same config file, data directory and ports, after it
    /// exited (see [`TestServer::kill9`], [`TestServer::sigterm`]).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart: the server is still running");
        self.exit_status = None;
        let first_log = self.log();
        if let Err(e) = self.spawn_and_wait() {
            panic!(
                "tern serve did not come back: {e}\n--- first run ---\n{first_log}\n--- restart ---\n{}",
                self.log()
            );
        }
    }

    /// Waits (bounded) for the server process to exit and returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.exit_status {
            return Some(status);
        }
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.exit_status = Some(status);
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Async variant of [`TestServer::wait_exit`] that does not block the runtime thread.
    pub async fn wait_exit_async(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.wait_exit(Duration::ZERO) {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs a `tern` subcommand against this server's config file.
    pub fn cli(&self, args: &[&str], stdin: Option<&str>) -> std::process::Output {
        run_tern(args, &self.config_path, stdin)
    }

    /// Stores an account with `tern user add JID --config FILE --password-stdin`.
    pub fn add_user(&self, jid: &str, password: &str) {
        let out = self.cli(&["user", "add", jid, "--password-stdin"], Some(password));
        assert!(
            out.status.success(),
            "tern user add {jid} failed: {}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The device password the server derives for `bare_jid`.
    pub fn device_password(&self, bare_jid: &str) -> String {
        device_password_for(DEVICE_SECRET, bare_jid)
    }

    pub fn selfsigned_cert_path(&self) -> PathBuf {
        self.data_dir.join("tls").join("selfsigned.pem")
    }

    /// The generated certificate chain, as DER.
    pub fn certificates(&self) -> Vec<rustls::pki_types::CertificateDer<'static>> {
        let pem = std::fs::read(self.selfsigned_cert_path()).expect("read selfsigned.pem");
        let certs: Vec<_> = rustls_pemfile::certs(&mut &pem[..])
            .collect::<Result<_, _>>()
            .expect("parse selfsigned.pem");
        assert!(!certs.is_empty(), "selfsigned.pem holds no certificate");
        certs
    }

    /// A rustls client configuration that trusts exactly the server's generated certificate.
    pub fn tls_client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in self.certificates() {
            roots.add(cert).expect("add generated cert as root");
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    }

    /// Raw TCP connection to the STARTTLS listener (nothing sent yet).
    pub async fn connect_plain(&self) -> RawClient {
        let tcp = tokio::time::timeout(STEP, TcpStream::connect(self.starttls_addr))
            .await
            .expect("connect timed out")
            .expect("connect to starttls port");
        RawClient::new(Conn::Plain(tcp), self.tls_client_config())
    }

    /// Raw TCP connection to the direct-TLS listener, TLS handshake done (nothing sent yet).
    pub async fn connect_direct_tls(&self) -> RawClient {
        let config = self.tls_client_config();
        let tcp = tokio::time::timeout(STEP, TcpStream::connect(self.tls_addr))
            .await
            .expect("connect timed out")
            .expect("connect to tls port");
        let connector = tokio_rustls::TlsConnector::from(config.clone());
        let name = rustls::pki_types::ServerName::try_from(DOMAIN).unwrap();
        let tls = tokio::time::timeout(STEP, connector.connect(name, tcp))
            .await
            .expect("TLS handshake timed out")
            .expect("TLS handshake with direct-TLS port");
        RawClient::new(Conn::Tls(Box::new(tls)), config)
    }

    /// Connection to the STARTTLS listener, upgraded: stream opened, `<starttls/>` done, TLS established,
    /// and a fresh stream header sent with its features read (returned).
    pub async fn connect_starttls(&self) -> (RawClient, String) {
        let mut c = self.connect_plain().await;
        let features = c.open_stream(DOMAIN).await.expect("open plaintext stream");
        assert!(
            features.contains("urn:ietf:params:xml:ns:xmpp-tls"),
            "pre-TLS features do not offer STARTTLS: {features}"
        );
        c.starttls().await.expect("STARTTLS");
        let features = c.open_stream(DOMAIN).await.expect("open stream after TLS");
        (c, features)
    }

    /// Connection over `transport`, stream opened, features read.
    pub async fn connect(&self, transport: Transport) -> (RawClient, String) {
        match transport {
            Transport::StartTls => self.connect_starttls().await,
            Transport::DirectTls => {
                let mut c = self.connect_direct_tls().await;
                let features = c.open_stream(DOMAIN).await.expect("open stream over TLS");
                (c, features)
            }
        }
    }

    /// Full raw login with SASL PLAIN, resource binding and the legacy session; returns the bound client.
    pub async fn login_plain(
        &self,
        transport: Transport,
        bare_jid: &str,
        password: &str,
        resource: &str,
    ) -> Result<RawClient, String> {
        let (mut c, features) = self.connect(transport).await;
        c.authenticate_plain(&features, bare_jid, password).await?;
        c.bind_and_session(resource).await?;
        Ok(c)
    }

    /// [`TestServer::login_plain`] with the device credential of `bare_jid`, over direct TLS.
    pub async fn login_device(&self, bare_jid: &str, resource: &str) -> RawClient {
        let password = self.device_password(bare_jid);
        self.login_plain(Transport::DirectTls, bare_jid, &password, resource)
            .await
            .unwrap_or_else(|e| panic!("device login of {bare_jid}/{resource} failed: {e}"))
    }

    /// Asserts that the server still accepts a new login and answers a ping on it.
    pub async fn assert_alive(&self) {
        let bare = format!("alive-{}@{DOMAIN}", free_port());
        let mut c = self.login_device(&bare, "check").await;
        c.ping_server("alive-ping").await;
        c.close().await;
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            let log = self.log();
            let tail: String = if log.len() > 16384 {
                let mut start = log.len() - 16384;
                while !log.is_char_boundary(start) {
                    start += 1;
                }
                log[start..].to_string()
            } else {
                log
            };
            eprintln!("--- tern server log (tail) ---\n{tail}\n--- end of server log ---");
        }
    }
}

/// Runs `tern ARGS --config FILE` (if a config is given), feeding `stdin` if any; bounded to 60 s.
pub fn run_tern(args: &[&str], config: &Path, stdin: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new(tern_bin());
    cmd.args(args).arg("--config").arg(config);
    run_command(cmd, stdin)
}

/// Runs a prepared command with optional stdin, killing it after 60 s.
pub fn run_command(mut cmd: Command, stdin: Option<&str>) -> std::process::Output {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn tern");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(input.as_bytes()).expect("write stdin");
        drop(pipe);
    }
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        if rx.recv_timeout(Duration::from_secs(60)).is_err() {
            // SAFETY: kill(2) on the pid of our own child, which has not been waited for yet.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
    });
    let out = child.wait_with_output().expect("wait for tern");
    let _ = tx.send(());
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    StartTls,
    DirectTls,
}

/// The byte stream under a [`RawClient`].
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// Placeholder while the connection is being upgraded.
    Gone,
}

fn gone() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::NotConnected, "connection is gone")
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::Gone => Poll::Ready(Err(gone())),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::Gone => Poll::Ready(Err(gone())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::Gone => Poll::Ready(Err(gone())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Conn::Gone => Poll::Ready(Err(gone())),
        }
    }
}

/// One thing read from the server's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XmlEvent {
    /// The server's `<stream:stream ...>` opening tag.
    Header(String),
    /// One complete top-level element (a stanza, features, SASL nonza, stream error, ...), verbatim.
    Element(String),
    /// `</stream:stream>`.
    End,
}

/// A raw XMPP client: writes whatever the test wants and reads with timeouts.
pub struct RawClient {
    pub conn: Conn,
    buf: Vec<u8>,
    in_stream: bool,
    tls_config: Arc<rustls::ClientConfig>,
    /// The full JID bound by [`RawClient::bind_and_session`].
    pub jid: Option<String>,
    counter: u64,
}

impl RawClient {
    pub fn new(conn: Conn, tls_config: Arc<rustls::ClientConfig>) -> RawClient {
        RawClient {
            conn,
            buf: Vec::new(),
            in_stream: false,
            tls_config,
            jid: None,
            counter: 0,
        }
    }

    pub fn jid(&self) -> &str {
        self.jid.as_deref().expect("client is bound")
    }

    /// A new id for a stanza, unique within this client.
    pub fn next_id(&mut self, prefix: &str) -> String {
        self.counter += 1;
        format!("{prefix}-{}", self.counter)
    }

    pub async fn send(&mut self, xml: &str) -> std::io::Result<()> {
        self.send_bytes(xml.as_bytes()).await
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        tokio::time::timeout(STEP, async {
            self.conn.write_all(bytes).await?;
            self.conn.flush().await
        })
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "write timed out"))?
    }

    /// Bytes received but not consumed yet, as text.
    pub fn pending_text(&self) -> String {
        String::from_utf8_lossy(&self.buf).into_owned()
    }

    /// Reads more data into the buffer. Ok(false) on a clean EOF.
    async fn fill(&mut self, deadline: tokio::time::Instant) -> Result<bool, String> {
        let mut chunk = [0u8; 16384];
        match tokio::time::timeout_at(deadline, self.conn.read(&mut chunk)).await {
            Err(_) => Err(format!(
                "timed out; received so far: {:?}",
                self.pending_text()
            )),
            Ok(Ok(0)) => Ok(false),
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(true)
            }
            // A reset or a TLS stream closed without close_notify is a close, too.
            Ok(Err(_)) => Ok(false),
        }
    }

    /// Reads until the received text contains `needle`; returns the text up to and including it (consumed).
    pub async fn read_until(&mut self, needle: &str, timeout: Duration) -> Result<String, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(pos) = find(&self.buf, needle.as_bytes()) {
                let end = pos + needle.len();
                let text = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                self.buf.drain(..end);
                return Ok(text);
            }
            if !self.fill(deadline).await? {
                return Err(format!(
                    "connection closed before {needle:?}; received: {:?}",
                    self.pending_text()
                ));
            }
        }
    }

    /// Reads until the server closes the connection; returns everything received (consumed).
    pub async fn read_to_close(&mut self, timeout: Duration) -> Result<String, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.fill(deadline).await? {}
        let text = self.pending_text();
        self.buf.clear();
        Ok(text)
    }

    /// Asserts that the server sends a stream error with `condition` and then closes the connection.
    pub async fn expect_stream_error(&mut self, condition: &str, timeout: Duration) -> String {
        let text = self
            .read_to_close(timeout)
            .await
            .unwrap_or_else(|e| panic!("expected stream error <{condition}/> and close: {e}"));
        assert!(
            text.contains(&format!("<{condition}")),
            "expected stream error <{condition}/>, got: {text:?}"
        );
        assert!(
            text.contains("error"),
            "expected a <stream:error/>, got: {text:?}"
        );
        text
    }

    /// Reads the next stream-level event.
    pub async fn next_event(&mut self, timeout: Duration) -> Result<XmlEvent, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match extract_event(&self.buf, self.in_stream) {
                Extract::Event(ev, used) => {
                    self.buf.drain(..used);
                    match &ev {
                        XmlEvent::Header(_) => self.in_stream = true,
                        XmlEvent::End => self.in_stream = false,
                        XmlEvent::Element(_) => {}
                    }
                    return Ok(ev);
                }
                Extract::Skip(used) => {
                    self.buf.drain(..used);
                    continue;
                }
                Extract::NeedMore => {}
            }
            if !self.fill(deadline).await? {
                return Err(format!(
                    "connection closed; unparsed data: {:?}",
                    self.pending_text()
                ));
            }
        }
    }

    /// Reads the next complete top-level element; a stream header or footer is an error.
    pub async fn next_element(&mut self, timeout: Duration) -> Result<String, String> {
        match self.next_event(timeout).await? {
            XmlEvent::Element(e) => Ok(e),
            other => Err(format!("expected an element, got {other:?}")),
        }
    }

    /// Reads elements until one satisfies `pred` (others are dropped); bounded by `timeout` overall.
    pub async fn wait_for(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&str) -> bool,
    ) -> Result<String, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut skipped = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                Ok(XmlEvent::Element(e)) if pred(&e) => return Ok(e),
                Ok(other) => skipped.push(format!("{other:?}")),
                Err(e) => return Err(format!("{e}; skipped before: {skipped:?}")),
            }
        }
    }

    /// Waits for the response (result or error) to the iq with `id`.
    pub async fn wait_iq_response(&mut self, id: &str) -> String {
        self.wait_for(STEP, |e| {
            element_name(e) == "iq" && attr(e, "id").as_deref() == Some(id)
        })
        .await
        .unwrap_or_else(|e| panic!("no response to iq {id}: {e}"))
    }

    /// Sends a stream header and reads the server's header and features (returned).
    pub async fn open_stream(&mut self, to: &str) -> Result<String, String> {
        self.in_stream = false;
        self.send(&stream_header(to))
            .await
            .map_err(|e| format!("send stream header: {e}"))?;
        match self.next_event(STEP).await? {
            XmlEvent::Header(_) => {}
            other => return Err(format!("expected stream header, got {other:?}")),
        }
        let features = self.next_element(STEP).await?;
        if element_name(&features) != "stream:features" {
            return Err(format!("expected stream features, got {features:?}"));
        }
        Ok(features)
    }

    /// Sends `<starttls/>`, waits for `<proceed/>` and upgrades the connection.
    pub async fn starttls(&mut self) -> Result<(), String> {
        self.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
            .await
            .map_err(|e| e.to_string())?;
        let answer = self.next_element(STEP).await?;
        if element_name(&answer) != "proceed" {
            return Err(format!("expected <proceed/>, got {answer:?}"));
        }
        if !self.buf.is_empty() {
            return Err(format!(
                "data after <proceed/> before TLS: {:?}",
                self.pending_text()
            ));
        }
        let Conn::Plain(tcp) = std::mem::replace(&mut self.conn, Conn::Gone) else {
            return Err("STARTTLS on a connection that is not plaintext".into());
        };
        let connector = tokio_rustls::TlsConnector::from(self.tls_config.clone());
        let name = rustls::pki_types::ServerName::try_from(DOMAIN).unwrap();
        let tls = tokio::time::timeout(STEP, connector.connect(name, tcp))
            .await
            .map_err(|_| "TLS handshake after <proceed/> timed out".to_string())?
            .map_err(|e| format!("TLS handshake after <proceed/>: {e}"))?;
        self.conn = Conn::Tls(Box::new(tls));
        self.in_stream = false;
        Ok(())
    }

    /// SASL PLAIN on an opened stream whose `features` were read.
    pub async fn authenticate_plain(
        &mut self,
        features: &str,
        bare_jid: &str,
        password: &str,
    ) -> Result<(), String> {
        if !features.contains(">PLAIN<") {
            return Err(format!("server does not offer PLAIN: {features}"));
        }
        let local = bare_jid.split('@').next().unwrap();
        self.send(&plain_auth(local, password))
            .await
            .map_err(|e| e.to_string())?;
        let answer = self.next_element(STEP).await?;
        if element_name(&answer) != "success" {
            return Err(format!("SASL PLAIN as {bare_jid} failed: {answer}"));
        }
        let features = self.open_stream(DOMAIN).await?;
        if !features.contains("urn:ietf:params:xml:ns:xmpp-bind") {
            return Err(format!("post-auth features lack bind: {features}"));
        }
        Ok(())
    }

    /// Binds `resource` and sends the legacy session request (expects a result); records the full JID.
    pub async fn bind_and_session(&mut self, resource: &str) -> Result<String, String> {
        self.send(&format!(
            "<iq type='set' id='bind-1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>{}</resource></bind></iq>",
            escape(resource)
        ))
        .await
        .map_err(|e| e.to_string())?;
        let answer = self.next_element(STEP).await?;
        if attr(&answer, "type").as_deref() != Some("result") {
            return Err(format!("bind failed: {answer}"));
        }
        let jid = inner_text(&answer, "jid").ok_or_else(|| format!("no <jid/> in {answer}"))?;
        self.jid = Some(jid.clone());
        self.send("<iq type='set' id='sess-1'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>")
            .await
            .map_err(|e| e.to_string())?;
        let answer = self.next_element(STEP).await?;
        if attr(&answer, "type").as_deref() != Some("result")
            || attr(&answer, "id").as_deref() != Some("sess-1")
        {
            return Err(format!(
                "legacy session request not answered with a result: {answer}"
            ));
        }
        Ok(jid)
    }

    /// XEP-0199 ping to the server; asserts a result.
    pub async fn ping_server(&mut self, id: &str) {
        self.send(&format!(
            "<iq type='get' id='{id}' to='{DOMAIN}'><ping xmlns='urn:xmpp:ping'/></iq>"
        ))
        .await
        .expect("send ping");
        let answer = self.wait_iq_response(id).await;
        assert_eq!(
            attr(&answer, "type").as_deref(),
            Some("result"),
            "ping not answered with a result: {answer}"
        );
    }

    /// Sends `</stream:stream>` and waits (bounded) for the server to close; errors are ignored.
    pub async fn close(mut self) {
        let _ = self.send("</stream:stream>").await;
        let _ = self.read_to_close(Duration::from_secs(5)).await;
    }
}

/// Free-function form of [`RawClient::read_until`].
pub async fn read_until(
    client: &mut RawClient,
    needle: &str,
    timeout: Duration,
) -> Result<String, String> {
    client.read_until(needle, timeout).await
}

/// The opening stream header a client sends.
pub fn stream_header(to: &str) -> String {
    format!(
        "<?xml version='1.0'?><stream:stream to='{to}' version='1.0' xml:lang='en' xmlns='jabber:client' xmlns:stream='{NS_STREAMS}'>"
    )
}

/// `<auth mechanism='PLAIN'>` with authzid empty, authcid `local`.
pub fn plain_auth(local: &str, password: &str) -> String {
    let data = base64::engine::general_purpose::STANDARD.encode(format!("\0{local}\0{password}"));
    format!("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{data}</auth>")
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

enum Extract {
    Event(XmlEvent, usize),
    Skip(usize),
    NeedMore,
}

#[derive(PartialEq)]
enum TagKind {
    Start,
    End,
    Empty,
}

/// Scans the tag starting at `start` (a '<'); returns the index just past its '>' and its kind.
fn scan_tag(buf: &[u8], start: usize) -> Option<(usize, TagKind)> {
    let mut quote: Option<u8> = None;
    let mut i = start + 1;
    while i < buf.len() {
        let b = buf[i];
        match quote {
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None if b == b'\'' || b == b'"' => quote = Some(b),
            None if b == b'>' => {
                let kind = if buf.get(start + 1) == Some(&b'/') {
                    TagKind::End
                } else if buf[i - 1] == b'/' {
                    TagKind::Empty
                } else {
                    TagKind::Start
                };
                return Some((i + 1, kind));
            }
            None => {}
        }
        i += 1;
    }
    None
}

/// Skips a construct that starts with `open` and ends with `close` at `at`; None if incomplete.
fn skip_construct(buf: &[u8], at: usize, close: &[u8]) -> Option<usize> {
    find(&buf[at..], close).map(|p| at + p + close.len())
}

fn extract_event(buf: &[u8], in_stream: bool) -> Extract {
    if buf.is_empty() {
        return Extract::NeedMore;
    }
    let ws = buf.iter().take_while(|b| b.is_ascii_whitespace()).count();
    if ws > 0 {
        return Extract::Skip(ws);
    }
    if buf[0] != b'<' {
        // Character data at stream level: ignore it.
        return Extract::Skip(find(buf, b"<").unwrap_or(buf.len()));
    }
    if buf.starts_with(b"<?") {
        return skip_construct(buf, 0, b"?>").map_or(Extract::NeedMore, Extract::Skip);
    }
    if buf.len() < 2 || (buf[1] == b'!' && buf.len() < 4) {
        return Extract::NeedMore;
    }
    if buf.starts_with(b"<!--") {
        return skip_construct(buf, 0, b"-->").map_or(Extract::NeedMore, Extract::Skip);
    }
    let Some((end, kind)) = scan_tag(buf, 0) else {
        return Extract::NeedMore;
    };
    let text = |end: usize| String::from_utf8_lossy(&buf[..end]).into_owned();
    if !in_stream {
        return Extract::Event(XmlEvent::Header(text(end)), end);
    }
    match kind {
        TagKind::End => return Extract::Event(XmlEvent::End, end),
        TagKind::Empty => return Extract::Event(XmlEvent::Element(text(end)), end),
        TagKind::Start => {}
    }
    let mut depth = 1usize;
    let mut pos = end;
    loop {
        let Some(rel) = find(&buf[pos..], b"<") else {
            return Extract::NeedMore;
        };
        let at = pos + rel;
        let rest = &buf[at..];
        if rest.len() < 2 || (rest[1] == b'!' && rest.len() < 9) {
            return Extract::NeedMore;
        }
        if rest.starts_with(b"<?") {
            let Some(next) = skip_construct(buf, at, b"?>") else {
                return Extract::NeedMore;
            };
            pos = next;
            continue;
        }
        if rest.starts_with(b"<!--") {
            let Some(next) = skip_construct(buf, at, b"-->") else {
                return Extract::NeedMore;
            };
            pos = next;
            continue;
        }
        if rest.starts_with(b"<![CDATA[") {
            let Some(next) = skip_construct(buf, at, b"]]>") else {
                return Extract::NeedMore;
            };
            pos = next;
            continue;
        }
        let Some((next, kind)) = scan_tag(buf, at) else {
            return Extract::NeedMore;
        };
        match kind {
            TagKind::Start => depth += 1,
            TagKind::End => depth -= 1,
            TagKind::Empty => {}
        }
        pos = next;
        if depth == 0 {
            return Extract::Event(XmlEvent::Element(text(pos)), pos);
        }
    }
}

/// The qualified name of the element `xml` starts with.
pub fn element_name(xml: &str) -> &str {
    let rest = xml.trim_start().trim_start_matches('<');
    let end = rest
        .find(|c: char| c.is_whitespace() || c == '>' || c == '/')
        .unwrap_or(rest.len());
    &rest[..end]
}

/// Value of attribute `name` on the first tag of `xml` (entities decoded).
pub fn attr(xml: &str, name: &str) -> Option<String> {
    let bytes = xml.as_bytes();
    let tag_end = match scan_tag(bytes, xml.find('<')?) {
        Some((end, _)) => end,
        None => xml.len(),
    };
    let tag = &xml[..tag_end];
    let pattern = format!("{name}=");
    let mut from = 0;
    while let Some(rel) = tag[from..].find(&pattern) {
        let at = from + rel;
        from = at + pattern.len();
        let before = tag[..at].chars().next_back();
        if !before.is_some_and(char::is_whitespace) {
            continue;
        }
        let rest = &tag[at + pattern.len()..];
        let quote = rest.chars().next()?;
        if quote != '\'' && quote != '"' {
            return None;
        }
        let value_end = rest[1..].find(quote)?;
        return Some(unescape(&rest[1..1 + value_end]));
    }
    None
}

/// Text content of the first `<tag>` child anywhere in `xml` (entities decoded).
pub fn inner_text(xml: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}");
    let mut from = 0;
    while let Some(rel) = xml[from..].find(&open) {
        let at = from + rel;
        from = at + open.len();
        let after = xml[from..].chars().next()?;
        if after == '/' {
            return Some(String::new());
        }
        if after != '>' && !after.is_whitespace() {
            continue;
        }
        let (content_start, kind) = scan_tag(xml.as_bytes(), at)?;
        if kind == TagKind::Empty {
            return Some(String::new());
        }
        let close = format!("</{tag}>");
        let content_end = content_start + xml[content_start..].find(&close)?;
        return Some(unescape(&xml[content_start..content_end]));
    }
    None
}

/// Escapes text for use in XML character data or attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// Decodes the predefined entities and character references.
pub fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let after = &rest[amp..];
        let Some(semi) = after.find(';') else {
            out.push_str(after);
            return out;
        };
        let entity = &after[1..semi];
        let decoded = match entity {
            "lt" => Some('<'),
            "gt" => Some('>'),
            "amp" => Some('&'),
            "apos" => Some('\''),
            "quot" => Some('"'),
            e if e.starts_with("#x") || e.starts_with("#X") => u32::from_str_radix(&e[2..], 16)
                .ok()
                .and_then(char::from_u32),
            e if e.starts_with('#') => e[1..].parse().ok().and_then(char::from_u32),
            _ => None,
        };
        match decoded {
            Some(c) => out.push(c),
            None => out.push_str(&after[..=semi]),
        }
        rest = &after[semi + 1..];
    }
    out.push_str(rest);
    out
}

/// A body text that exercises UTF-8 (emoji, CJK, combining marks) and the XML special characters.
pub const TRICKY_BODY: &str =
    "héllo 👋🏽 世界 日本語 한국어 — <tag attr=\"v\"> & 'quotes' \"double\" ]]> e\u{301} 𝄞";

/// Runs `tern-bench ARGS --json` (bounded to 60 s by [`run_command`]) and parses its report.
pub fn tern_bench_json(args: &[&str]) -> serde_json::Value {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tern-bench"));
    cmd.args(args).arg("--json");
    let out = run_command(cmd, None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tern-bench failed: {stderr}");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("report is not JSON ({e}): {stderr}"))
}

/// The count `report[key]`; panics (showing the report) when it is missing.
pub fn json_count(report: &serde_json::Value, key: &str) -> u64 {
    report[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing or not a count: {report}"))
}

/// `report[key]` is a `{p50, p99, max}` latency summary, positive and ordered.
pub fn assert_percentiles(report: &serde_json::Value, key: &str) {
    let v = &report[key];
    let (p50, p99, max) = (
        json_count(v, "p50"),
        json_count(v, "p99"),
        json_count(v, "max"),
    );
    assert!(0 < p50 && p50 <= p99 && p99 <= max, "{key}: {report}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_elements() {
        let data = b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' id='a>b'>\n<stream:features><mechanisms><mechanism>PLAIN</mechanism></mechanisms></stream:features> <success xmlns='x'/><message to=\"a\"><body>a &lt; b</body></message></stream:stream>";
        let mut buf = data.to_vec();
        let mut in_stream = false;
        let mut events = Vec::new();
        loop {
            match extract_event(&buf, in_stream) {
                Extract::Event(ev, used) => {
                    buf.drain(..used);
                    if matches!(ev, XmlEvent::Header(_)) {
                        in_stream = true;
                    }
                    events.push(ev);
                }
                Extract::Skip(used) => {
                    buf.drain(..used);
                }
                Extract::NeedMore => break,
            }
        }
        assert_eq!(events.len(), 5, "{events:?}");
        assert!(matches!(&events[0], XmlEvent::Header(h) if h.contains("a>b")));
        let XmlEvent::Element(msg) = &events[3] else {
            panic!()
        };
        assert_eq!(element_name(msg), "message");
        assert_eq!(attr(msg, "to").as_deref(), Some("a"));
        assert_eq!(inner_text(msg, "body").as_deref(), Some("a < b"));
        assert_eq!(events[4], XmlEvent::End);
        assert_eq!(unescape(&escape(TRICKY_BODY)), TRICKY_BODY);
        // An element that ends exactly at the end of the buffer.
        let tail = b"<iq type='result'><x/></iq>";
        assert!(matches!(
            extract_event(tail, true),
            Extract::Event(XmlEvent::Element(_), n) if n == tail.len()
        ));
        assert!(matches!(
            extract_event(b"<iq><x/></i", true),
            Extract::NeedMore
        ));
    }
}

/// What happened while [`RawClient::flood`] pushed data at the server.
#[derive(Debug)]
pub struct FloodOutcome {
    /// Bytes fully handed to the connection before it closed or a write failed.
    pub written: usize,
    /// Bytes the test meant to send.
    pub total: usize,
    /// Everything the server sent meanwhile (including data already buffered in the client).
    pub received: String,
    /// Whether the server closed the connection within the timeout.
    pub closed: bool,
    pub write_error: Option<String>,
}

impl RawClient {
    /// Writes `count` copies of `chunk` (after `prefix`) while concurrently reading; stops writing as soon as
    /// the server closes the connection or a write fails. Bounded by `timeout` overall.
    pub async fn flood(
        self,
        prefix: &[u8],
        chunk: &[u8],
        count: usize,
        timeout: Duration,
    ) -> FloodOutcome {
        let pieces = std::iter::once(prefix).chain(std::iter::repeat_n(chunk, count));
        self.flood_with(pieces, None, timeout).await
    }

    /// Writes `pieces` while concurrently reading. Writing stops when the server closes the connection or a
    /// write fails; reading stops at the close, at the timeout, or once the received text contains
    /// `stop_on` (if given) after everything was written.
    pub async fn flood_with<'a>(
        self,
        pieces: impl Iterator<Item = &'a [u8]>,
        stop_on: Option<&str>,
        timeout: Duration,
    ) -> FloodOutcome {
        use std::sync::atomic::{AtomicBool, Ordering};
        let deadline = tokio::time::Instant::now() + timeout;
        let RawClient { conn, buf, .. } = self;
        let (mut rd, mut wr) = tokio::io::split(conn);
        let closed = Arc::new(AtomicBool::new(false));
        let (done_tx, mut done_rx) = tokio::sync::watch::channel(false);
        let stop_on = stop_on.map(|s| s.as_bytes().to_vec());
        let reader = {
            let closed = closed.clone();
            tokio::spawn(async move {
                let mut data = buf;
                let mut chunk = vec![0u8; 65536];
                loop {
                    if *done_rx.borrow()
                        && stop_on.as_ref().is_some_and(|n| find(&data, n).is_some())
                    {
                        return (data, false);
                    }
                    tokio::select! {
                        _ = done_rx.changed() => {}
                        r = tokio::time::timeout_at(deadline, rd.read(&mut chunk)) => match r {
                            Err(_) => return (data, false),
                            Ok(Ok(0)) | Ok(Err(_)) => {
                                closed.store(true, Ordering::SeqCst);
                                return (data, true);
                            }
                            Ok(Ok(n)) => data.extend_from_slice(&chunk[..n]),
                        }
                    }
                }
            })
        };
        let mut total = 0;
        let mut written = 0;
        let mut write_error = None;
        for piece in pieces {
            total += piece.len();
            if write_error.is_some() || closed.load(Ordering::SeqCst) {
                continue;
            }
            match tokio::time::timeout_at(deadline, async {
                wr.write_all(piece).await?;
                wr.flush().await
            })
            .await
            {
                Ok(Ok(())) => written += piece.len(),
                Ok(Err(e)) => write_error = Some(e.to_string()),
                Err(_) => write_error = Some("write timed out".into()),
            }
        }
        let _ = done_tx.send(true);
        let (data, closed) = reader.await.expect("reader task");
        FloodOutcome {
            written,
            total,
            received: String::from_utf8_lossy(&data).into_owned(),
            closed,
            write_error,
        }
    }
}

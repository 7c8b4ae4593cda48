//! Configuration: TOML file + environment overrides, validated with errors that name the key and the fix.
//!
//! Layout follows hickory-dns: every section is a `deny_unknown_fields` struct with serde defaults, so an
//! empty file (or no file at all) gives the embedded defaults documented in `config/tern.example.toml`.
//!
//! Environment overrides: `TERN_<SECTION>_<KEY>` sets `[section] key` (lists are comma-separated), and the
//! Tigase `.env` name `TIGASE_DOMAIN` sets `[server] domain`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A configuration problem, phrased for the operator: which key, what is wrong, how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub tls: TlsConfig,
    pub c2s: C2sConfig,
    pub auth: AuthConfig,
    pub limits: LimitsConfig,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    pub http: HttpConfig,
    pub queue: PushQueueConfig,
    pub sm: StreamMgmtConfig,
    pub webhooks: WebhooksConfig,
    pub turn: TurnConfig,
}

/// The embedded TURN server (RFC 8656) and what XEP-0215 announces.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TurnConfig {
    /// UDP (and, with `tcp`, TCP) address of the STUN/TURN listener; unset disables TURN.
    pub listen: Option<SocketAddr>,
    /// Also accept TURN over TCP on `listen` (RFC 6062 framing), and over TLS on the direct-TLS XMPP
    /// listeners for ALPN `stun.turn`.
    pub tcp: bool,
    /// UDP ports relayed traffic uses, `LOW-HIGH` (RFC 8656 §3.3 recommends 49152-65535).
    pub relay_ports: String,
    /// Local address relay sockets bind to; unset: the IP of `listen`.
    pub relay_address: Option<std::net::IpAddr>,
    /// Public address announced in XOR-RELAYED-ADDRESS and XEP-0215 when the box sits behind NAT.
    pub external_address: Option<std::net::IpAddr>,
    /// REALM of the long-term credentials; unset: `server.domain`.
    pub realm: Option<String>,
    /// Shared secrets of the TURN REST API credential scheme (username `EXPIRY:USER`, password
    /// base64(HMAC-SHA1(secret, username))); the first mints new credentials, all are accepted
    /// (rotation). Empty: one is generated on first start as `{data_dir}/turn-secret`.
    pub secrets: Vec<String>,
    /// Static long-term users, `name:password` (optional, e.g. for test tools).
    pub users: Vec<String>,
    /// Peer networks (CIDR) relaying is allowed to even when they are denied by default
    /// (loopback, private, link-local, ...).
    pub allow_peers: Vec<String>,
    /// Peer networks (CIDR) relaying is refused to, in addition to the defaults.
    pub deny_peers: Vec<String>,
    /// Allocation lifetime granted when the client asks for none, in seconds (RFC 8656 §3.2: 600).
    pub default_lifetime_secs: u64,
    /// Longest allocation lifetime granted, in seconds.
    pub max_lifetime_secs: u64,
    /// Allocations at once, server-wide (508 beyond).
    pub max_allocations: usize,
    /// Allocations at once per user (486 beyond).
    pub max_allocations_per_user: usize,
    /// Relayed bytes per second per allocation, each direction (0 = unlimited); excess is dropped.
    pub max_bandwidth_bytes_per_sec: u64,
    /// Seconds a NONCE stays valid (438 Stale Nonce after).
    pub nonce_lifetime_secs: u64,
    /// Unauthenticated or failed requests answered per second per source address; beyond, dropped.
    pub unauthenticated_per_sec: u32,
    /// Lifetime of credentials handed out over XEP-0215, in seconds.
    pub credential_ttl_secs: u64,
    /// Extra STUN/TURN servers announced over XEP-0215 (e.g. a TURN box of your own), as
    /// `type:host:port[:transport]`, e.g. `turn:turn.example.com:3478:udp`.
    pub external_services: Vec<String>,
}

impl Default for TurnConfig {
    fn default() -> Self {
        Self {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 3478))),
            tcp: true,
            relay_ports: "49152-65535".into(),
            relay_address: None,
            external_address: None,
            realm: None,
            secrets: Vec::new(),
            users: Vec::new(),
            allow_peers: Vec::new(),
            deny_peers: Vec::new(),
            default_lifetime_secs: 600,
            max_lifetime_secs: 3600,
            max_allocations: 10_000,
            max_allocations_per_user: 10,
            max_bandwidth_bytes_per_sec: 4 * 1024 * 1024,
            nonce_lifetime_secs: 600,
            unauthenticated_per_sec: 20,
            credential_ttl_secs: 86_400,
            external_services: Vec::new(),
        }
    }
}

impl TurnConfig {
    /// `relay_ports` as an inclusive range.
    pub fn relay_port_range(&self) -> Result<(u16, u16), String> {
        let (lo, hi) = self
            .relay_ports
            .split_once('-')
            .ok_or_else(|| format!("`{}` is not LOW-HIGH", self.relay_ports))?;
        let lo: u16 = lo
            .trim()
            .parse()
            .map_err(|_| format!("`{lo}` is not a port"))?;
        let hi: u16 = hi
            .trim()
            .parse()
            .map_err(|_| format!("`{hi}` is not a port"))?;
        if lo == 0 || lo > hi {
            return Err(format!("`{}`: need 1 <= LOW <= HIGH", self.relay_ports));
        }
        Ok((lo, hi))
    }
}

/// XEP-0198 stream management.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamMgmtConfig {
    /// Longest resumption window granted, in seconds (XEP-0198 §5 `max`); 0 disables resumption.
    pub resume_window_secs: u64,
    /// Ask the client for an ack after this many unacknowledged stanzas.
    pub request_every: u32,
    /// ... or once the oldest unrequested stanza is this many seconds old.
    pub request_after_secs: u64,
    /// Unacknowledged stanzas one stream may hold; beyond, the stream is closed (`policy-violation`).
    pub max_unacked_stanzas: usize,
    /// The same bound in bytes.
    pub max_unacked_bytes: usize,
    /// Detached sessions kept for resumption; beyond, the oldest are given up (pushes requeued).
    pub max_detached: usize,
}

impl Default for StreamMgmtConfig {
    fn default() -> Self {
        Self {
            resume_window_secs: 300,
            request_every: 5,
            request_after_secs: 30,
            max_unacked_stanzas: 1000,
            max_unacked_bytes: 4 * 1024 * 1024,
            max_detached: 10_000,
        }
    }
}

/// Online/offline events POSTed as JSON to the management server.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// URLs (http:// or https://) that receive every event batch; empty disables webhooks.
    pub urls: Vec<String>,
    /// Key of the `X-Tern-Signature: sha256=<hex HMAC-SHA256(secret, body)>` header; unset sends none.
    pub secret: Option<String>,
    /// Most events in one POST.
    pub batch_max: usize,
    /// Milliseconds an event may wait for others to join its batch.
    pub batch_delay_ms: u64,
    /// Attempts per batch and URL (exponential back-off between them) before it is dropped and counted.
    pub max_attempts: u32,
    /// Seconds one POST may take.
    pub timeout_secs: u64,
    /// Events waiting for delivery; beyond, new events are dropped and counted.
    pub max_pending: usize,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            urls: Vec::new(),
            secret: None,
            batch_max: 100,
            batch_delay_ms: 200,
            max_attempts: 8,
            timeout_secs: 5,
            max_pending: 100_000,
        }
    }
}

/// The durable offline push queue (`{data_dir}/queue.redb`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PushQueueConfig {
    /// Most pushes stored for one endpoint (bare JID); further pushes answer `queue full`.
    pub max_per_endpoint: usize,
    /// TTL of a push that names none, in seconds.
    pub default_ttl_secs: u64,
    /// Largest `ttl_secs` a push may ask for (422 beyond).
    pub max_ttl_secs: u64,
    /// Seconds a push status stays visible (`GET /api/v1/push/{id}`) after its last change.
    pub status_retention_secs: u64,
    /// Seconds between purges of expired pushes and old status records.
    pub purge_interval_secs: u64,
}

impl Default for PushQueueConfig {
    fn default() -> Self {
        Self {
            max_per_endpoint: 1000,
            default_ttl_secs: 86_400,
            max_ttl_secs: 2_592_000,
            status_retention_secs: 604_800,
            purge_interval_secs: 60,
        }
    }
}

/// The HTTP service API the management server posts pushes to.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of the HTTP API; unset disables it.
    pub listen: Option<SocketAddr>,
    /// Accepted API keys. Empty: a key is generated on first start and saved as `{data_dir}/api-key`.
    pub api_keys: Vec<String>,
    /// Client networks allowed to call the API (CIDR, e.g. `10.0.0.0/8`); empty allows every address.
    pub allow_networks: Vec<String>,
    /// Seconds `POST /rest/stream` waits for the reply to an `<iq>`.
    pub iq_timeout_secs: u64,
    /// Largest request body accepted, in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// Sustained requests per second accepted from one client address (429 beyond); 0 = unlimited.
    pub rate_limit_per_sec: u32,
    /// Requests one client address may burst above the sustained rate.
    pub rate_limit_burst: u32,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 8080))),
            api_keys: Vec::new(),
            allow_networks: Vec::new(),
            iq_timeout_secs: 30,
            max_body_bytes: 1024 * 1024,
            rate_limit_per_sec: 10_000,
            rate_limit_burst: 20_000,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of a Prometheus scrape endpoint (`GET /metrics`); unset = no separate metrics listener.
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// The XMPP domain this server is authoritative for (RFC 6120 §2.1 "domainpart").
    pub domain: String,
    /// Where the generated certificate, the account store and other state live.
    pub data_dir: PathBuf,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            domain: "localhost".into(),
            data_dir: PathBuf::from("./data"),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Directory of Tigase-style `{domain}.pem` bundles (key + certificate + chain), chosen by SNI;
    /// `default.pem` is the fallback.
    pub certs_dir: Option<PathBuf>,
    /// Explicit certificate chain (PEM). Used together with `key`.
    pub cert: Option<PathBuf>,
    /// Explicit private key (PEM: PKCS#8, PKCS#1 or SEC1). Used together with `cert`.
    pub key: Option<PathBuf>,
    /// Seconds between checks of the certificate files for changes (0 disables; SIGHUP always reloads).
    pub reload_check_secs: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            certs_dir: None,
            cert: None,
            key: None,
            reload_check_secs: 30,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct C2sConfig {
    /// Listeners that start in plaintext and require STARTTLS (RFC 6120 §5).
    pub starttls_listen: Vec<SocketAddr>,
    /// Listeners that speak TLS from the first byte (XEP-0368).
    pub tls_listen: Vec<SocketAddr>,
    /// Seconds of inbound silence after which the server sends an XEP-0199 ping (0 disables).
    pub ping_interval_secs: u64,
    /// Seconds to wait for any inbound data after such a ping before the connection is considered dead.
    pub ping_timeout_secs: u64,
    /// Stanzas that may wait for one slow client before further stanzas to it are refused.
    pub outbound_queue: usize,
    /// Bytes that may wait for one slow client (one stanza is always accepted into an empty queue).
    pub outbound_queue_bytes: usize,
    /// Bare JIDs (e.g. the management server's account) that receive every endpoint's presence,
    /// like Tigase's presence forwarding.
    pub presence_observers: Vec<String>,
}

impl Default for C2sConfig {
    fn default() -> Self {
        Self {
            starttls_listen: vec!["127.0.0.1:5222".parse().expect("literal")],
            tls_listen: vec!["127.0.0.1:5223".parse().expect("literal")],
            ping_interval_secs: 300,
            ping_timeout_secs: 60,
            outbound_queue: 256,
            outbound_queue_bytes: 1024 * 1024,
            presence_observers: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Secret from which device passwords are derived: hex(HMAC-SHA256(device_secret, bare JID)).
    /// Empty disables device credentials.
    pub device_secret: Option<String>,
    /// PBKDF2 iterations for SCRAM with device credentials (RFC 7677 §4 recommends at least 4096).
    pub device_scram_iterations: u32,
    /// PBKDF2 iterations used when `tern user add` stores SCRAM keys.
    pub scram_iterations: u32,
    /// Failed authentications from one IP address before further attempts are slowed down.
    pub failures_before_delay: u32,
    /// Maximum delay (milliseconds) applied to failures from an address that keeps failing.
    pub max_failure_delay_ms: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            device_secret: None,
            device_scram_iterations: 4096,
            scram_iterations: 4096,
            failures_before_delay: 3,
            max_failure_delay_ms: 5000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest stanza accepted, in bytes (RFC 6120 §13.12 lets servers limit it); larger is `policy-violation`.
    pub max_stanza_bytes: usize,
    /// Deepest element nesting accepted inside a stanza; deeper is `policy-violation`.
    pub max_depth: usize,
    /// Seconds an unauthenticated connection may stay open.
    pub preauth_timeout_secs: u64,
    /// Bytes an unauthenticated connection may send before it must have authenticated.
    pub preauth_max_bytes: usize,
    /// Seconds allowed for a TLS handshake.
    pub tls_handshake_timeout_secs: u64,
    /// Concurrent connections accepted from one IP address (0 = unlimited).
    pub max_connections_per_ip: usize,
    /// Sustained inbound bytes per second per session (token bucket; 0 = unlimited).
    pub inbound_bytes_per_sec: usize,
    /// Simultaneously connected resources of one account (0 = unlimited); more gets `resource-constraint`.
    pub max_resources_per_account: usize,
    /// Burst size of the inbound token bucket, in bytes.
    pub inbound_burst_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_stanza_bytes: 256 * 1024,
            max_depth: 32,
            preauth_timeout_secs: 30,
            preauth_max_bytes: 64 * 1024,
            tls_handshake_timeout_secs: 10,
            max_connections_per_ip: 5000,
            inbound_bytes_per_sec: 64 * 1024,
            max_resources_per_account: 100,
            inbound_burst_bytes: 512 * 1024,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// tracing filter, e.g. `info` or `tern=debug`; `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
        }
    }
}

impl Config {
    /// Load `path` (or the embedded defaults when `None`), apply the process environment, validate.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(path, std::env::vars())
    }

    /// As [`Config::load`], with the environment passed in (for tests).
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let (text, name) = match path {
            Some(p) => (
                std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?,
                p.display().to_string(),
            ),
            None => (String::new(), "<embedded defaults>".to_string()),
        };
        let mut table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: name.clone(),
            message: e.to_string(),
        })?;
        apply_env(&mut table, env)?;
        let mut config: Config = Config::deserialize(table).map_err(|e| ConfigError::Parse {
            path: name,
            message: explain_serde(&e.to_string()),
        })?;
        // One canonical spelling (RFC 7622 §3.2: case-folded, no trailing dot), so comparisons with
        // the normalised JIDs of sessions always agree.
        let domain = config.server.domain.trim().trim_end_matches('.');
        if let Ok(j) = jid::BareJid::new(domain)
            && j.node().is_none()
        {
            config.server.domain = j.domain().as_str().to_string();
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks serde cannot express. Each error names the key and how to fix it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: &str| {
            Err(ConfigError::Invalid {
                key,
                message: message.to_string(),
            })
        };
        let d = &self.server.domain;
        if d.is_empty()
            || jid::BareJid::new(d)
                .map(|j| j.node().is_some())
                .unwrap_or(true)
        {
            return invalid(
                "server.domain",
                "must be a plain domain name such as `example.com` (set it, or TIGASE_DOMAIN)",
            );
        }
        if self.c2s.starttls_listen.is_empty() && self.c2s.tls_listen.is_empty() {
            return invalid(
                "c2s.starttls_listen",
                "no client listener configured: set `c2s.starttls_listen` and/or `c2s.tls_listen`",
            );
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return invalid(
                "tls.cert",
                "`tls.cert` and `tls.key` must be set together (or use `tls.certs_dir`)",
            );
        }
        if self.c2s.outbound_queue == 0 {
            return invalid("c2s.outbound_queue", "must be at least 1");
        }
        if self.c2s.outbound_queue_bytes < 1024 {
            return invalid("c2s.outbound_queue_bytes", "must be at least 1024");
        }
        if self.c2s.ping_interval_secs > 0 && self.c2s.ping_timeout_secs == 0 {
            return invalid(
                "c2s.ping_timeout_secs",
                "must be at least 1 when `c2s.ping_interval_secs` is set",
            );
        }
        if self.limits.max_stanza_bytes < 10_000 {
            return invalid(
                "limits.max_stanza_bytes",
                "must be at least 10000 (RFC 6120 §13.12 requires accepting 10000-byte stanzas)",
            );
        }
        if self.limits.max_depth < 2 {
            return invalid("limits.max_depth", "must be at least 2");
        }
        if self.limits.preauth_timeout_secs == 0 {
            return invalid("limits.preauth_timeout_secs", "must be at least 1");
        }
        if self.limits.tls_handshake_timeout_secs == 0 {
            return invalid("limits.tls_handshake_timeout_secs", "must be at least 1");
        }
        const YEAR: u64 = 365 * 86_400;
        for (key, v) in [
            (
                "limits.preauth_timeout_secs",
                self.limits.preauth_timeout_secs,
            ),
            (
                "limits.tls_handshake_timeout_secs",
                self.limits.tls_handshake_timeout_secs,
            ),
            ("c2s.ping_interval_secs", self.c2s.ping_interval_secs),
            ("c2s.ping_timeout_secs", self.c2s.ping_timeout_secs),
            ("tls.reload_check_secs", self.tls.reload_check_secs),
            ("http.iq_timeout_secs", self.http.iq_timeout_secs),
            ("queue.default_ttl_secs", self.queue.default_ttl_secs),
            ("queue.max_ttl_secs", self.queue.max_ttl_secs),
            (
                "queue.status_retention_secs",
                self.queue.status_retention_secs,
            ),
            ("queue.purge_interval_secs", self.queue.purge_interval_secs),
            ("sm.resume_window_secs", self.sm.resume_window_secs),
            ("turn.max_lifetime_secs", self.turn.max_lifetime_secs),
            ("turn.nonce_lifetime_secs", self.turn.nonce_lifetime_secs),
            ("turn.credential_ttl_secs", self.turn.credential_ttl_secs),
            ("sm.request_after_secs", self.sm.request_after_secs),
            ("webhooks.timeout_secs", self.webhooks.timeout_secs),
        ] {
            if v > YEAR {
                return invalid(key, "must be at most 31536000 (one year)");
            }
        }
        if self.limits.preauth_max_bytes < 4096 {
            return invalid("limits.preauth_max_bytes", "must be at least 4096");
        }
        if self.limits.inbound_bytes_per_sec > 0
            && self.limits.inbound_burst_bytes < self.limits.max_stanza_bytes
        {
            return invalid(
                "limits.inbound_burst_bytes",
                "must be at least `limits.max_stanza_bytes`, or one maximal stanza could never pass",
            );
        }
        if let Some(s) = &self.auth.device_secret
            && !s.is_empty()
            && s.len() < 16
        {
            return invalid(
                "auth.device_secret",
                "must be at least 16 characters (e.g. `openssl rand -hex 32`), or left unset",
            );
        }
        for n in &self.http.allow_networks {
            if let Err(m) = n.parse::<crate::http::Cidr>() {
                return Err(ConfigError::Invalid {
                    key: "http.allow_networks",
                    message: format!("`{n}`: {m} (expected CIDR such as `10.0.0.0/8`)"),
                });
            }
        }
        if self.http.iq_timeout_secs == 0 {
            return invalid("http.iq_timeout_secs", "must be at least 1");
        }
        if self.http.max_body_bytes < 1024 {
            return invalid("http.max_body_bytes", "must be at least 1024");
        }
        if self.http.api_keys.iter().any(|k| k.len() < 16) {
            return invalid(
                "http.api_keys",
                "every key must be at least 16 characters (e.g. `openssl rand -hex 32`)",
            );
        }
        if self.queue.max_per_endpoint == 0 {
            return invalid("queue.max_per_endpoint", "must be at least 1");
        }
        if self.queue.default_ttl_secs == 0 {
            return invalid("queue.default_ttl_secs", "must be at least 1");
        }
        if self.queue.max_ttl_secs < self.queue.default_ttl_secs {
            return invalid(
                "queue.max_ttl_secs",
                "must be at least `queue.default_ttl_secs`",
            );
        }
        if self.queue.status_retention_secs == 0 {
            return invalid("queue.status_retention_secs", "must be at least 1");
        }
        if self.queue.purge_interval_secs == 0 {
            return invalid("queue.purge_interval_secs", "must be at least 1");
        }
        if self.http.rate_limit_per_sec > 0 && self.http.rate_limit_burst == 0 {
            return invalid(
                "http.rate_limit_burst",
                "must be at least 1 when `http.rate_limit_per_sec` is set",
            );
        }
        for o in &self.c2s.presence_observers {
            if !jid::BareJid::new(o).is_ok_and(|j| j.node().is_some()) {
                return Err(ConfigError::Invalid {
                    key: "c2s.presence_observers",
                    message: format!("`{o}` is not a bare JID such as `itsm@example.com`"),
                });
            }
        }
        if self.sm.request_every == 0 {
            return invalid("sm.request_every", "must be at least 1");
        }
        if self.sm.request_after_secs == 0 {
            return invalid("sm.request_after_secs", "must be at least 1");
        }
        if self.sm.max_unacked_stanzas == 0 {
            return invalid("sm.max_unacked_stanzas", "must be at least 1");
        }
        if self.sm.max_unacked_bytes < self.limits.max_stanza_bytes {
            return invalid(
                "sm.max_unacked_bytes",
                "must be at least `limits.max_stanza_bytes`, or one maximal stanza would end the stream",
            );
        }
        for u in &self.webhooks.urls {
            if let Err(e) = crate::http::webhook::check_url(u) {
                return Err(ConfigError::Invalid {
                    key: "webhooks.urls",
                    message: format!("{e} (expected e.g. `https://itsm.example.com/tern/events`)"),
                });
            }
        }
        if let Some(s) = &self.webhooks.secret
            && s.len() < 16
        {
            return invalid(
                "webhooks.secret",
                "must be at least 16 characters (e.g. `openssl rand -hex 32`), or left unset",
            );
        }
        if self.webhooks.batch_max == 0 {
            return invalid("webhooks.batch_max", "must be at least 1");
        }
        if self.webhooks.max_attempts == 0 {
            return invalid("webhooks.max_attempts", "must be at least 1");
        }
        if self.webhooks.timeout_secs == 0 {
            return invalid("webhooks.timeout_secs", "must be at least 1");
        }
        if self.webhooks.max_pending == 0 {
            return invalid("webhooks.max_pending", "must be at least 1");
        }
        if let Err(m) = self.turn.relay_port_range() {
            return Err(ConfigError::Invalid {
                key: "turn.relay_ports",
                message: format!("{m} (e.g. `49152-65535`)"),
            });
        }
        if let Some(l) = self.turn.listen
            && l.ip().is_unspecified()
            && self.turn.relay_address.is_none()
            && self.turn.external_address.is_none()
        {
            return invalid(
                "turn.external_address",
                "`turn.listen` is a wildcard address: set `turn.external_address` (the address clients \
                 reach) or `turn.relay_address`",
            );
        }
        for (key, list) in [
            ("turn.allow_peers", &self.turn.allow_peers),
            ("turn.deny_peers", &self.turn.deny_peers),
        ] {
            for n in list {
                if let Err(m) = n.parse::<crate::http::Cidr>() {
                    return Err(ConfigError::Invalid {
                        key,
                        message: format!("`{n}`: {m} (expected CIDR such as `10.0.0.0/8`)"),
                    });
                }
            }
        }
        if self.turn.secrets.iter().any(|s| s.len() < 16) {
            return invalid(
                "turn.secrets",
                "every secret must be at least 16 characters (e.g. `openssl rand -hex 32`)",
            );
        }
        if self.turn.users.iter().any(|u| !u.contains(':')) {
            return invalid("turn.users", "entries are `name:password`");
        }
        if self.turn.default_lifetime_secs == 0
            || self.turn.max_lifetime_secs < self.turn.default_lifetime_secs
        {
            return invalid(
                "turn.max_lifetime_secs",
                "need 1 <= `turn.default_lifetime_secs` <= `turn.max_lifetime_secs`",
            );
        }
        if self.turn.max_allocations == 0 || self.turn.max_allocations_per_user == 0 {
            return invalid(
                "turn.max_allocations",
                "`turn.max_allocations` and `turn.max_allocations_per_user` must be at least 1",
            );
        }
        if self.turn.nonce_lifetime_secs == 0 || self.turn.credential_ttl_secs == 0 {
            return invalid(
                "turn.nonce_lifetime_secs",
                "`turn.nonce_lifetime_secs` and `turn.credential_ttl_secs` must be at least 1",
            );
        }
        for e in &self.turn.external_services {
            let parts: Vec<&str> = e.split(':').collect();
            let ok = matches!(parts.len(), 3 | 4)
                && matches!(parts[0], "stun" | "stuns" | "turn" | "turns")
                && !parts[1].is_empty()
                && parts[2].parse::<u16>().is_ok()
                && parts.get(3).is_none_or(|t| matches!(*t, "udp" | "tcp"));
            if !ok {
                return Err(ConfigError::Invalid {
                    key: "turn.external_services",
                    message: format!(
                        "`{e}` is not `type:host:port[:udp|tcp]` with type stun, stuns, turn or turns"
                    ),
                });
            }
        }
        if self.auth.device_scram_iterations == 0 || self.auth.scram_iterations == 0 {
            return invalid(
                "auth.scram_iterations",
                "iteration counts must be at least 1",
            );
        }
        Ok(())
    }

    /// The effective configuration as TOML, with secrets replaced, for `tern check-config`.
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        if shown.auth.device_secret.is_some() {
            shown.auth.device_secret = Some("<redacted>".into());
        }
        for s in &mut shown.turn.secrets {
            *s = "<redacted>".into();
        }
        for u in &mut shown.turn.users {
            if let Some((name, _)) = u.split_once(':') {
                *u = format!("{name}:<redacted>");
            }
        }
        if shown.webhooks.secret.is_some() {
            shown.webhooks.secret = Some("<redacted>".into());
        }
        for key in &mut shown.http.api_keys {
            *key = "<redacted>".into();
        }
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// serde's "unknown field" message lists the expected names; add the fix.
fn explain_serde(msg: &str) -> String {
    if msg.contains("unknown field") {
        format!(
            "{msg}\nfix: remove or correct the key (see config/tern.example.toml for every key)"
        )
    } else {
        msg.to_string()
    }
}

/// Apply `TERN_<SECTION>_<KEY>` and `TIGASE_DOMAIN` to the parsed table. The value's type is taken from
/// the defaults, so `TERN_C2S_TLS_LISTEN=0.0.0.0:443,[::]:443` becomes a list and numbers stay numbers.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let defaults = toml::Table::try_from(Config::default()).unwrap_or_default();
    // TIGASE_DOMAIN first, so an explicit TERN_SERVER_DOMAIN wins whatever the environment's order.
    let mut env: Vec<(String, String)> = env.into_iter().collect();
    env.sort_by_key(|(k, _)| k != "TIGASE_DOMAIN");
    for (var, value) in env {
        let (section, key) = if var == "TIGASE_DOMAIN" {
            ("server".to_string(), "domain".to_string())
        } else if let Some(rest) = var.strip_prefix("TERN_") {
            let Some((s, k)) = rest.split_once('_') else {
                continue;
            };
            (s.to_ascii_lowercase(), k.to_ascii_lowercase())
        } else {
            continue;
        };
        let env_err = |message: String| ConfigError::Env {
            var: var.clone(),
            message,
        };
        let empty = toml::Table::new();
        let default_section = match defaults.get(&section).and_then(|v| v.as_table()) {
            Some(t) => Some(t),
            // Sections whose every key defaults to unset serialise as empty tables or not at all.
            None if section == "metrics" => Some(&empty),
            None => None,
        };
        // Other tools share the TERN_ prefix (e.g. TERN_BENCH_*): only known sections are ours.
        let Some(default_section) = default_section else {
            continue;
        };
        let kind = default_section
            .get(&key)
            .cloned()
            .or_else(|| optional_key(&section, &key));
        let Some(kind) = kind else {
            return Err(env_err(format!(
                "unknown key `{key}` in section [{section}]; expected one of: {}",
                default_section
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        };
        let parsed = match kind {
            toml::Value::Array(_) => toml::Value::Array(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| toml::Value::String(s.to_string()))
                    .collect(),
            ),
            toml::Value::Integer(_) => toml::Value::Integer(
                value
                    .trim()
                    .parse()
                    .map_err(|_| env_err(format!("`{value}` is not a whole number")))?,
            ),
            toml::Value::Boolean(_) => toml::Value::Boolean(
                value
                    .trim()
                    .parse()
                    .map_err(|_| env_err(format!("`{value}` is not `true` or `false`")))?,
            ),
            _ => toml::Value::String(value.clone()),
        };
        let entry = table
            .entry(section)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        match entry.as_table_mut() {
            Some(t) => {
                t.insert(key, parsed);
            }
            None => {
                return Err(env_err(
                    "the config file has this section as a non-table".into(),
                ));
            }
        }
    }
    Ok(())
}

/// Keys whose default is `None` (absent from the serialised defaults), with their value kind.
fn optional_key(section: &str, key: &str) -> Option<toml::Value> {
    match (section, key) {
        ("tls", "certs_dir" | "cert" | "key")
        | ("auth", "device_secret")
        | ("metrics", "listen")
        | ("webhooks", "secret")
        | ("turn", "listen" | "relay_address" | "external_address" | "realm") => {
            Some(toml::Value::String(String::new()))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn load_str(text: &str, e: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("t.toml");
        std::fs::write(&p, text).expect("write");
        Config::load_with_env(Some(&p), env(e))
    }

    #[test]
    fn webhook_urls_and_secret_are_checked() {
        for (toml, key) in [
            ("[webhooks]\nurls = [\"ftp://x\"]\n", "webhooks.urls"),
            ("[webhooks]\nurls = [\"http://\"]\n", "webhooks.urls"),
            ("[webhooks]\nsecret = \"short\"\n", "webhooks.secret"),
            ("[sm]\nrequest_every = 0\n", "sm.request_every"),
            ("[sm]\nmax_unacked_bytes = 10\n", "sm.max_unacked_bytes"),
            ("[http]\nrate_limit_burst = 0\n", "http.rate_limit_burst"),
            (
                "[c2s]\npresence_observers = [\"not a jid@\"]\n",
                "c2s.presence_observers",
            ),
        ] {
            match load_str(toml, &[]) {
                Err(ConfigError::Invalid { key: k, message }) => assert_eq!(k, key, "{message}"),
                other => panic!("{toml}: {other:?}"),
            }
        }
        let c = load_str(
            "[webhooks]\nurls = [\"https://itsm.example.com/hook\"]\nsecret = \"0123456789abcdef\"\n",
            &[],
        )
        .expect("valid");
        assert!(!c.to_redacted_toml().contains("0123456789abcdef"));
    }

    #[test]
    fn example_config_is_valid() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tern.example.toml");
        let c = Config::load_with_env(Some(&p), env(&[])).expect("example config");
        assert_eq!(c.c2s.tls_listen, vec!["0.0.0.0:443".parse().unwrap()]);
        assert_eq!(c.c2s.starttls_listen, vec!["0.0.0.0:5222".parse().unwrap()]);
    }

    #[test]
    fn embedded_defaults() {
        let c = Config::load_with_env(None, env(&[])).expect("defaults");
        assert_eq!(c.server.domain, "localhost");
        assert_eq!(
            c.c2s.starttls_listen,
            vec!["127.0.0.1:5222".parse().unwrap()]
        );
        assert_eq!(c.c2s.tls_listen, vec!["127.0.0.1:5223".parse().unwrap()]);
        assert_eq!(c.limits.max_stanza_bytes, 256 * 1024);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = load_str("[server]\ndomian = \"x\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("domian"), "{e}");
        assert!(e.contains("fix"), "{e}");
        let e = load_str("[nosuch]\na = 1\n", &[]).unwrap_err().to_string();
        assert!(e.contains("nosuch"), "{e}");
    }

    #[test]
    fn env_overrides_and_tigase_domain() {
        let c = load_str(
            "[server]\ndomain = \"a.example\"\n",
            &[
                ("TIGASE_DOMAIN", "b.example"),
                ("TERN_C2S_TLS_LISTEN", "0.0.0.0:443, [::]:443"),
                ("TERN_LIMITS_MAX_DEPTH", "10"),
                ("TERN_AUTH_DEVICE_SECRET", "0123456789abcdef0123"),
                (
                    "TERN_HTTP_API_KEYS",
                    "key-one-0123456789,key-two-0123456789",
                ),
                ("TERN_QUEUE_MAX_PER_ENDPOINT", "7"),
                ("PATH", "/bin"),
            ],
        )
        .expect("load");
        assert_eq!(c.queue.max_per_endpoint, 7);
        assert_eq!(c.server.domain, "b.example");
        assert_eq!(c.c2s.tls_listen.len(), 2);
        assert_eq!(c.limits.max_depth, 10);
        assert!(c.auth.device_secret.is_some());
        let red = c.to_redacted_toml();
        assert!(!red.contains("0123456789abcdef0123"), "{red}");
        assert_eq!(c.http.api_keys.len(), 2);
        assert!(!red.contains("key-one"), "{red}");
    }

    #[test]
    fn bad_allow_network_is_named() {
        let e = load_str("[http]\nallow_networks = [\"10.0.0.0/33\"]\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("http.allow_networks") && e.contains("10.0.0.0/33"),
            "{e}"
        );
    }

    #[test]
    fn domain_is_normalised() {
        let c = load_str("[server]\ndomain = \"Example.COM.\"\n", &[]).expect("load");
        assert_eq!(c.server.domain, "example.com");
    }

    #[test]
    fn env_errors_name_the_variable() {
        let e = load_str("", &[("TERN_LIMITS_MAX_DEPHT", "3")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("TERN_LIMITS_MAX_DEPHT") && e.contains("max_depth"),
            "{e}"
        );
        // Other tools' variables with the same prefix are not ours.
        load_str(
            "",
            &[("TERN_BENCH_USERS", "10"), ("TERN_SKIP_SLIXMPP", "1")],
        )
        .expect("ignored");
        let c = load_str(
            "",
            &[
                ("TERN_SERVER_DOMAIN", "a.example"),
                ("TIGASE_DOMAIN", "b.example"),
            ],
        )
        .expect("load");
        assert_eq!(c.server.domain, "a.example", "the explicit TERN_ name wins");
        let e = load_str("", &[("TERN_LIMITS_MAX_DEPTH", "ten")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("whole number"), "{e}");
    }

    #[test]
    fn validation_names_key() {
        let e = load_str("[limits]\nmax_stanza_bytes = 100\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("limits.max_stanza_bytes"), "{e}");
        let e = load_str("[tls]\ncert = \"/x\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("tls.cert"), "{e}");
        let e = load_str("[server]\ndomain = \"a@b\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("server.domain"), "{e}");
        let e = load_str("[queue]\nmax_per_endpoint = 0\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("queue.max_per_endpoint"), "{e}");
    }
}

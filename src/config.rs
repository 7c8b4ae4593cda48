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

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
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
}

impl Default for C2sConfig {
    fn default() -> Self {
        Self {
            starttls_listen: vec!["127.0.0.1:5222".parse().expect("literal")],
            tls_listen: vec!["127.0.0.1:5223".parse().expect("literal")],
            ping_interval_secs: 300,
            ping_timeout_secs: 60,
            outbound_queue: 256,
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

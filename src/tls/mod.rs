//! TLS: certificates and acceptors.
//!
//! RFC 6120 §5 makes STARTTLS mandatory-to-implement and §13.7 requires the server to present a
//! certificate for its XMPP domain (a DNS domain name identifier, checked per RFC 6125); XEP-0368 adds
//! "direct TLS" listeners that speak TLS from the first byte and use ALPN `xmpp-client`. This module
//! loads those certificates and builds the two rustls `ServerConfig`s:
//!
//! - certificate sources: a Tigase-style directory of `{domain}.pem` bundles chosen by SNI
//!   ([`bundle`], [`resolver`]), an explicit `cert` + `key` pair, or a generated self-signed
//!   certificate ([`selfsigned`]);
//! - the configs are built once around a [`resolver::SniResolver`] whose certificate set is swapped
//!   atomically on reload ([`reload`]: SIGHUP and file polling), so renewals never rebuild configs or
//!   touch established sessions;
//! - stateless session tickets plus a server-side session cache make a reconnect storm (every
//!   mobile client returning after a network blip) resume with an abbreviated handshake.
//!
//! Crypto is aws-lc-rs explicitly (not the process default provider), TLS 1.2 and 1.3.

pub mod bundle;
pub mod reload;
pub mod resolver;
pub mod selfsigned;
pub mod x509;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::ServerConfig;
use rustls::server::{ProducesTickets, StoresServerSessions};
use tokio_util::sync::CancellationToken;

use bundle::Bundle;
use resolver::{CertStore, SniResolver};

/// ALPN protocol id for XMPP client-to-server direct TLS (XEP-0368 §3).
pub const ALPN_XMPP_CLIENT: &[u8] = b"xmpp-client";
/// ALPN protocol id for TURN over TLS (RFC 7443): lets TURN share the direct-TLS port (443) with XMPP.
pub const ALPN_STUN_TURN: &[u8] = b"stun.turn";

/// Server-side TLS 1.2 session-ID cache entries (TLS 1.3 and ticket-capable clients use tickets).
const SESSION_CACHE_ENTRIES: usize = 32 * 1024;

/// Warn at load when a certificate expires within this many seconds.
const EXPIRY_WARNING_SECS: i64 = 14 * 86_400;

/// Why certificates could not be loaded; every message names the file and the reason.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}", path = .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}", path = .path.display())]
    File { path: PathBuf, reason: String },
    #[error(
        "{path}: encrypted private keys are not supported; decrypt with `openssl pkey -in {path} -out {path}.decrypted` and point Tern at the result",
        path = .path.display()
    )]
    EncryptedKey { path: PathBuf },
    #[error(
        "{path}: the private key does not match the certificate (no certificate in the bundle carries its public key)",
        path = .path.display()
    )]
    KeyMismatch { path: PathBuf },
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("building the TLS acceptor: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Where certificates come from; kept so that reload re-reads the same source.
#[derive(Debug, Clone)]
pub(crate) enum Source {
    Dir { dir: PathBuf, domain: String },
    Explicit { cert: PathBuf, key: PathBuf },
    SelfSigned { data_dir: PathBuf, domain: String },
}

/// Loaded certificates and the acceptor configs built on them.
pub struct Tls {
    source: Source,
    resolver: Arc<SniResolver>,
    direct: Arc<ServerConfig>,
    starttls: Arc<ServerConfig>,
    /// Serializes reloads (SIGHUP and polling may coincide).
    reload_lock: Mutex<()>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// `*.pem` files of a certs directory, sorted; hidden files (editor swaps, Kubernetes `..data`) and
/// directories are skipped. Symlinks are followed.
pub(crate) fn bundle_paths(dir: &Path) -> Result<Vec<PathBuf>, TlsError> {
    let io = |source| TlsError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || !name.ends_with(".pem") {
            continue;
        }
        if std::fs::metadata(&path)
            .map(|m| m.is_file())
            .unwrap_or(false)
        {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

fn stem_is(b: &Bundle, name: &str) -> bool {
    b.path
        .file_stem()
        .is_some_and(|s| x509::normalize_name(&s.to_string_lossy()) == x509::normalize_name(name))
}

/// Read every certificate file of `source` into a new store.
fn load_store(source: &Source) -> Result<CertStore, TlsError> {
    match source {
        Source::Dir { dir, domain } => {
            let mut bundles = Vec::new();
            for path in bundle_paths(dir)? {
                bundles.push(bundle::load_bundle_file(&path)?);
            }
            if bundles.is_empty() {
                return Err(TlsError::File {
                    path: dir.clone(),
                    reason: "no *.pem certificate bundles found (expected Tigase-style {domain}.pem files \
                             holding key + certificate + chain)"
                        .into(),
                });
            }
            // Fallback for unknown/absent SNI: default.pem, else the bundle for the server's domain.
            let by_stem = |n: &str| bundles.iter().position(|b| stem_is(b, n));
            let fallback = match by_stem("default").or_else(|| by_stem(domain)) {
                Some(i) => i,
                None => {
                    let probe = CertStore::new(bundles.clone(), 0);
                    probe
                        .candidates(domain)
                        .and_then(|c| c.first().copied())
                        .unwrap_or(0)
                }
            };
            Ok(CertStore::new(bundles, fallback))
        }
        Source::Explicit { cert, key } => Ok(CertStore::new(
            vec![bundle::load_cert_and_key(cert, key)?],
            0,
        )),
        Source::SelfSigned { data_dir, domain } => Ok(CertStore::new(
            vec![selfsigned::load_or_generate(data_dir, domain)?],
            0,
        )),
    }
}

/// Warn about expired or soon-expiring certificates and export the earliest expiry.
fn check_expiry(store: &CertStore) {
    let now = x509::now_unix();
    let mut earliest = i64::MAX;
    for b in &store.bundles {
        let left = b.leaf.not_after - now;
        earliest = earliest.min(b.leaf.not_after);
        if left <= 0 {
            tracing::warn!(file = %b.path.display(), expired = %x509::format_date(b.leaf.not_after),
                "TLS certificate has EXPIRED; clients will refuse it");
        } else if left < EXPIRY_WARNING_SECS {
            tracing::warn!(file = %b.path.display(), expires = %x509::format_date(b.leaf.not_after),
                days_left = left / 86_400, "TLS certificate expires soon");
        }
    }
    if earliest != i64::MAX {
        // Unix time of the earliest leaf notAfter, for alerting.
        metrics::gauge!("tern_tls_cert_expiry_seconds").set(earliest as f64);
    }
}

fn build_config(
    resolver: &Arc<SniResolver>,
    ticketer: &Arc<dyn ProducesTickets>,
    cache: &Arc<dyn StoresServerSessions>,
    alpn: Vec<Vec<u8>>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    // Prefer AES-128-GCM with SHA-256: as secure for this purpose as AES-256-GCM-SHA384 and cheaper per
    // handshake (SHA-256 HKDF runs in hardware on current x86; measured in BENCHMARKS.md), which matters
    // in a reconnect storm. The server's order wins (`ignore_client_order`).
    provider.cipher_suites.sort_by_key(|s| match s.suite() {
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => 1,
        rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => 2,
        _ => 3,
    });
    let mut cfg = ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
    cfg.alpn_protocols = alpn;
    cfg.ticketer = Arc::clone(ticketer);
    cfg.session_storage = Arc::clone(cache);
    cfg.ignore_client_order = true;
    // One ticket per handshake is enough for a client that reconnects (each one costs an encryption).
    cfg.send_tls13_tickets = 1;
    Ok(Arc::new(cfg))
}

impl Tls {
    /// Load certificates per config: `certs_dir` (Tigase-style `{domain}.pem` bundles chosen by SNI,
    /// `default.pem` or the bundle for `domain` as fallback), or explicit `cert` + `key`, or with neither
    /// a self-signed ECDSA P-256 certificate kept in `{data_dir}/tls/selfsigned.pem`.
    pub fn load(
        server: &crate::config::ServerConfig,
        cfg: &crate::config::TlsConfig,
    ) -> Result<Arc<Tls>, TlsError> {
        let source = match (&cfg.certs_dir, &cfg.cert, &cfg.key) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                return Err(TlsError::Config(
                    "set either `tls.certs_dir` or `tls.cert` + `tls.key`, not both".into(),
                ));
            }
            (Some(dir), None, None) => Source::Dir {
                dir: dir.clone(),
                domain: server.domain.clone(),
            },
            (None, Some(cert), Some(key)) => Source::Explicit {
                cert: cert.clone(),
                key: key.clone(),
            },
            (None, Some(_), None) => {
                return Err(TlsError::Config(
                    "`tls.cert` is set but `tls.key` is not; set both (or use `tls.certs_dir`)"
                        .into(),
                ));
            }
            (None, None, Some(_)) => {
                return Err(TlsError::Config(
                    "`tls.key` is set but `tls.cert` is not; set both (or use `tls.certs_dir`)"
                        .into(),
                ));
            }
            (None, None, None) => Source::SelfSigned {
                data_dir: server.data_dir.clone(),
                domain: server.domain.clone(),
            },
        };
        let store = load_store(&source)?;
        check_expiry(&store);
        let resolver = Arc::new(SniResolver::new(store));
        // One ticketer for both listeners: tickets are encrypted with rotating keys held only in memory,
        // so resumption needs no per-session server state.
        let ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
        let cache: Arc<dyn StoresServerSessions> =
            rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES);
        // XEP-0368 §3: direct TLS offers ALPN "xmpp-client"; clients sending no ALPN are still accepted
        // (rustls only rejects clients whose ALPN list has no overlap). "stun.turn" (RFC 7443) routes
        // the connection to the TURN server instead.
        let direct = build_config(
            &resolver,
            &ticketer,
            &cache,
            vec![ALPN_XMPP_CLIENT.to_vec(), ALPN_STUN_TURN.to_vec()],
        )?;
        // RFC 6120 §5: STARTTLS upgrades an XMPP stream in place; ALPN has no role there.
        let starttls = build_config(&resolver, &ticketer, &cache, Vec::new())?;
        Ok(Arc::new(Tls {
            source,
            resolver,
            direct,
            starttls,
            reload_lock: Mutex::new(()),
        }))
    }

    /// For direct-TLS listeners (XEP-0368): ALPN "xmpp-client" offered (no ALPN is accepted too).
    pub fn direct_config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.direct)
    }

    /// For STARTTLS (RFC 6120 §5): no ALPN.
    pub fn starttls_config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.starttls)
    }

    /// Re-read all certificate files. On any error it is logged (file and reason) and the previous
    /// certificates stay in use; existing sessions are never touched. `Ok(true)` if something changed.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let _guard = self.reload_lock.lock().unwrap_or_else(|e| e.into_inner());
        match load_store(&self.source) {
            Ok(store) => {
                metrics::counter!("tern_tls_reloads_total", "result" => "ok").increment(1);
                check_expiry(&store);
                if store.same_certs(&self.resolver.current()) {
                    tracing::debug!("TLS reload: certificates unchanged");
                    return Ok(false);
                }
                self.resolver.swap(store);
                tracing::info!(certificates = %self.describe(), "TLS certificates reloaded");
                Ok(true)
            }
            Err(e) => {
                metrics::counter!("tern_tls_reloads_total", "result" => "error").increment(1);
                tracing::warn!(error = %e, "TLS reload failed; keeping the previous certificates");
                Err(e)
            }
        }
    }

    /// Spawn the reload triggers: SIGHUP, and (if `reload_check_secs > 0`) polling the files every
    /// `reload_check_secs`; stops when `cancel` fires. Must be called inside a Tokio runtime.
    pub fn spawn_reloader(
        self: &Arc<Self>,
        cfg: &crate::config::TlsConfig,
        cancel: CancellationToken,
    ) {
        reload::spawn(self, cfg.reload_check_secs, cancel);
    }

    /// What is loaded, for the startup log: source, names, key type, expiry.
    pub fn describe(&self) -> String {
        let store = self.resolver.current();
        let now = x509::now_unix();
        let source = match &self.source {
            Source::Dir { dir, .. } => format!(
                "certs_dir {} ({} bundle{}, fallback {})",
                dir.display(),
                store.bundles.len(),
                if store.bundles.len() == 1 { "" } else { "s" },
                store
                    .fallback()
                    .path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ),
            Source::Explicit { cert, key } => {
                format!("cert {} + key {}", cert.display(), key.display())
            }
            Source::SelfSigned { data_dir, .. } => {
                format!("self-signed {}", selfsigned::path(data_dir).display())
            }
        };
        let entries: Vec<String> = store
            .bundles
            .iter()
            .map(|b| {
                let left = (b.leaf.not_after - now) / 86_400;
                format!(
                    "{}: [{}] {} chain of {}, expires {} ({})",
                    b.path
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    b.dns_names().join(", "),
                    b.key_kind,
                    b.certified.cert.len(),
                    x509::format_date(b.leaf.not_after),
                    if b.leaf.not_after <= now {
                        "EXPIRED".to_string()
                    } else {
                        format!("in {left} days")
                    }
                )
            })
            .collect();
        format!("{source}: {}", entries.join("; "))
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Test PKI generated on the fly with rcgen: root → intermediate → leaves.

    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    use rustls::pki_types::CertificateDer;

    #[derive(Clone, Copy)]
    pub enum KeyAlg {
        EcdsaP256,
        EcdsaP384,
        Rsa,
    }

    pub struct Leaf {
        pub cert_pem: String,
        pub cert_der: CertificateDer<'static>,
        pub key_pem: String,
        pub key_der: Vec<u8>,
    }

    impl Leaf {
        /// Tigase-style bundle: key + certificate.
        pub fn bundle_pem(&self) -> String {
            format!("{}{}", self.key_pem, self.cert_pem)
        }
    }

    pub struct Pki {
        pub root_pem: String,
        pub root_der: CertificateDer<'static>,
        pub intermediate_pem: String,
        pub intermediate_der: CertificateDer<'static>,
        intermediate: Issuer<'static, KeyPair>,
    }

    fn ca_params(cn: &str) -> CertificateParams {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        p
    }

    impl Pki {
        pub fn new() -> Self {
            let root_key = KeyPair::generate().expect("key");
            let root_params = ca_params("Tern Test Root");
            let root_cert = root_params.self_signed(&root_key).expect("root");
            let root = Issuer::new(root_params, root_key);
            let int_key = KeyPair::generate().expect("key");
            let int_params = ca_params("Tern Test Intermediate");
            let int_cert = int_params.signed_by(&int_key, &root).expect("intermediate");
            Pki {
                root_pem: root_cert.pem(),
                root_der: root_cert.der().clone(),
                intermediate_pem: int_cert.pem(),
                intermediate_der: int_cert.der().clone(),
                intermediate: Issuer::new(int_params, int_key),
            }
        }

        fn sign(&self, params: CertificateParams, alg: KeyAlg) -> Leaf {
            let key = match alg {
                KeyAlg::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
                KeyAlg::EcdsaP384 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384),
                KeyAlg::Rsa => {
                    KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
                }
            }
            .expect("leaf key");
            let cert = params.signed_by(&key, &self.intermediate).expect("leaf");
            Leaf {
                cert_pem: cert.pem(),
                cert_der: cert.der().clone(),
                key_pem: key.serialize_pem(),
                key_der: key.serialize_der(),
            }
        }

        /// A leaf for `names` (SAN), with a CN that is not one of them.
        pub fn leaf(&self, names: &[&str], alg: KeyAlg) -> Leaf {
            let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
            let mut p = CertificateParams::new(names).expect("params");
            p.distinguished_name = rcgen::DistinguishedName::new();
            p.distinguished_name
                .push(DnType::CommonName, "Tern Test Leaf");
            self.sign(p, alg)
        }

        /// A legacy leaf with no SAN, only a CN.
        pub fn leaf_cn_only(&self, cn: &str) -> Leaf {
            let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
            p.distinguished_name = rcgen::DistinguishedName::new();
            p.distinguished_name.push(DnType::CommonName, cn);
            self.sign(p, KeyAlg::EcdsaP256)
        }
    }

    fn der_len(len: usize) -> Vec<u8> {
        if len < 0x80 {
            vec![len as u8]
        } else {
            let bytes: Vec<u8> = len
                .to_be_bytes()
                .into_iter()
                .skip_while(|&b| b == 0)
                .collect();
            let mut out = vec![0x80 | bytes.len() as u8];
            out.extend(bytes);
            out
        }
    }

    fn der(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend(der_len(content.len()));
        out.extend_from_slice(content);
        out
    }

    fn pem(label: &str, der: &[u8]) -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let mut out = format!("-----BEGIN {label}-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(chunk).expect("ascii"));
            out.push('\n');
        }
        out.push_str(&format!("-----END {label}-----\n"));
        out
    }

    /// (algorithm parameters TLV, privateKey content) of a PKCS#8 PrivateKeyInfo.
    fn pkcs8_parts(pkcs8: &[u8]) -> (Vec<u8>, Vec<u8>) {
        use crate::tls::x509::{children, read_tlv};
        let (info, _) = read_tlv(pkcs8).expect("pkcs8");
        let parts: Vec<_> = children(info.content).map(|c| c.expect("tlv")).collect();
        let alg: Vec<_> = children(parts[1].content)
            .map(|c| c.expect("tlv"))
            .collect();
        let params = alg.get(1).map(|t| t.raw.to_vec()).unwrap_or_default();
        (params, parts[2].content.to_vec())
    }

    /// PKCS#8 RSA key → PKCS#1 "RSA PRIVATE KEY" PEM (the inner RSAPrivateKey).
    pub fn pkcs8_to_pkcs1_pem(pkcs8: &[u8]) -> String {
        pem("RSA PRIVATE KEY", &pkcs8_parts(pkcs8).1)
    }

    /// PKCS#8 EC key → SEC1 "EC PRIVATE KEY" PEM, with the curve OID as `openssl ec` writes it.
    pub fn pkcs8_to_sec1_pem(pkcs8: &[u8]) -> String {
        use crate::tls::x509::{children, read_tlv};
        let (curve, inner) = pkcs8_parts(pkcs8);
        let (ec, _) = read_tlv(&inner).expect("ECPrivateKey");
        let fields: Vec<_> = children(ec.content).map(|c| c.expect("tlv")).collect();
        let mut content = Vec::new();
        content.extend_from_slice(fields[0].raw); // version
        content.extend_from_slice(fields[1].raw); // privateKey
        content.extend(der(0xa0, &curve));
        for f in &fields[2..] {
            if f.tag == 0xa1 {
                content.extend_from_slice(f.raw);
            }
        }
        pem("EC PRIVATE KEY", &der(0x30, &content))
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;
    use rustls::pki_types::{CertificateDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn server_cfg(domain: &str, data_dir: &Path) -> crate::config::ServerConfig {
        crate::config::ServerConfig {
            domain: domain.into(),
            data_dir: data_dir.to_path_buf(),
        }
    }

    fn dir_cfg(dir: &Path) -> crate::config::TlsConfig {
        crate::config::TlsConfig {
            certs_dir: Some(dir.to_path_buf()),
            ..Default::default()
        }
    }

    struct Outcome {
        alpn: Option<Vec<u8>>,
        leaf: CertificateDer<'static>,
        resumed: bool,
    }

    fn client_config(root: &CertificateDer<'static>, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(root.clone()).expect("root");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        Arc::new(cfg)
    }

    /// One handshake over an in-memory duplex, exchanging a byte to make sure the session works.
    async fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<rustls::ClientConfig>,
        name: &str,
    ) -> Result<Outcome, std::io::Error> {
        let (c, s) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let server_task = tokio::spawn(async move {
            let mut tls = acceptor.accept(s).await?;
            let mut b = [0u8; 1];
            tls.read_exact(&mut b).await?;
            tls.write_all(&b).await?;
            tls.flush().await?;
            Ok::<_, std::io::Error>(())
        });
        let connector = tokio_rustls::TlsConnector::from(client);
        let server_name = ServerName::try_from(name.to_string()).expect("name");
        let result = async {
            let mut tls = connector.connect(server_name, c).await?;
            tls.write_all(b"x").await?;
            tls.flush().await?;
            let mut b = [0u8; 1];
            tls.read_exact(&mut b).await?;
            let (_, conn) = tls.get_ref();
            Ok(Outcome {
                alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
                leaf: conn.peer_certificates().expect("certs")[0].clone(),
                resumed: conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
            })
        }
        .await;
        let _ = server_task.await;
        result
    }

    fn setup_dir(pki: &Pki, files: &[(&str, &Leaf)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tmp");
        for (name, leaf) in files {
            std::fs::write(
                dir.path().join(name),
                format!("{}{}{}", leaf.key_pem, leaf.cert_pem, pki.intermediate_pem),
            )
            .expect("write");
        }
        dir
    }

    #[tokio::test]
    async fn direct_tls_alpn_and_no_alpn_and_sni() {
        let pki = Pki::new();
        let example = pki.leaf(&["example.com", "*.example.com"], KeyAlg::EcdsaP256);
        let other = pki.leaf(&["other.org"], KeyAlg::Rsa);
        let default = pki.leaf(&["default.invalid"], KeyAlg::EcdsaP256);
        let dir = setup_dir(
            &pki,
            &[
                ("example.com.pem", &example),
                ("other.org.pem", &other),
                ("default.pem", &default),
            ],
        );
        let tls =
            Tls::load(&server_cfg("example.com", dir.path()), &dir_cfg(dir.path())).expect("load");
        let describe = tls.describe();
        assert!(
            describe.contains("3 bundles") && describe.contains("fallback default.pem"),
            "{describe}"
        );

        let with_alpn = client_config(&pki.root_der, &[ALPN_XMPP_CLIENT]);
        let o = handshake(tls.direct_config(), with_alpn, "example.com")
            .await
            .expect("alpn");
        assert_eq!(o.alpn.as_deref(), Some(ALPN_XMPP_CLIENT));
        assert_eq!(o.leaf, example.cert_der);

        let no_alpn = client_config(&pki.root_der, &[]);
        let o = handshake(
            tls.direct_config(),
            no_alpn.clone(),
            "conference.example.com",
        )
        .await
        .expect("no alpn");
        assert_eq!(o.alpn, None);
        assert_eq!(o.leaf, example.cert_der);

        let o = handshake(tls.starttls_config(), no_alpn.clone(), "other.org")
            .await
            .expect("sni rsa");
        assert_eq!(o.leaf, other.cert_der);

        // An unrelated ALPN is refused on direct TLS (XEP-0368 clients must offer xmpp-client).
        let h2 = client_config(&pki.root_der, &[b"h2"]);
        assert!(
            handshake(tls.direct_config(), h2, "example.com")
                .await
                .is_err()
        );

        // STARTTLS negotiates no ALPN even if the client offers one.
        let o = handshake(
            tls.starttls_config(),
            client_config(&pki.root_der, &[ALPN_XMPP_CLIENT]),
            "example.com",
        )
        .await
        .expect("starttls");
        assert_eq!(o.alpn, None);
    }

    #[tokio::test]
    async fn unknown_sni_gets_domain_bundle_without_default_pem() {
        let pki = Pki::new();
        let a = pki.leaf(&["a.example"], KeyAlg::EcdsaP256);
        let b = pki.leaf(&["b.example"], KeyAlg::EcdsaP256);
        let dir = setup_dir(&pki, &[("a.example.pem", &a), ("b.example.pem", &b)]);
        let tls =
            Tls::load(&server_cfg("b.example", dir.path()), &dir_cfg(dir.path())).expect("load");
        // Known names get their bundle; unknown names would get b.example (the server's domain).
        let client = client_config(&pki.root_der, &[]);
        let o = handshake(tls.starttls_config(), client.clone(), "a.example")
            .await
            .expect("a");
        assert_eq!(o.leaf, a.cert_der);
        assert_eq!(
            tls.resolver.current().fallback().leaf.dns_names(),
            vec!["b.example"]
        );
    }

    #[tokio::test]
    async fn self_signed_localhost_handshake_without_sni_and_resumption() {
        let data = tempfile::tempdir().expect("tmp");
        let tls =
            Tls::load(&server_cfg("localhost", data.path()), &Default::default()).expect("load");
        let cert = tls.resolver.current().bundles[0].certified.cert[0].clone();
        assert!(tls.describe().contains("self-signed"));
        let client = client_config(&cert, &[ALPN_XMPP_CLIENT]);
        // By IP address: the client sends no SNI, the server falls back.
        let o = handshake(tls.direct_config(), client.clone(), "127.0.0.1")
            .await
            .expect("ip");
        assert_eq!(o.leaf, cert);
        let o = handshake(tls.direct_config(), client.clone(), "localhost")
            .await
            .expect("first");
        assert!(!o.resumed);
        let o = handshake(tls.direct_config(), client.clone(), "localhost")
            .await
            .expect("second");
        assert!(o.resumed, "session ticket resumption");

        // Reused on the next start.
        let again =
            Tls::load(&server_cfg("localhost", data.path()), &Default::default()).expect("reload");
        assert_eq!(again.resolver.current().bundles[0].certified.cert[0], cert);
    }

    #[tokio::test]
    async fn reload_keeps_old_on_error_and_picks_up_new() {
        let pki = Pki::new();
        let first = pki.leaf(&["example.com"], KeyAlg::EcdsaP256);
        let dir = setup_dir(&pki, &[("example.com.pem", &first)]);
        let path = dir.path().join("example.com.pem");
        let tls =
            Tls::load(&server_cfg("example.com", dir.path()), &dir_cfg(dir.path())).expect("load");
        let client = client_config(&pki.root_der, &[]);
        assert!(!tls.reload().expect("unchanged"));

        // Broken file: error naming it, old certificate still served.
        std::fs::write(&path, &first.cert_pem).expect("write");
        let err = tls.reload().expect_err("broken");
        assert!(err.to_string().contains("example.com.pem"), "{err}");
        let o = handshake(tls.direct_config(), client.clone(), "example.com")
            .await
            .expect("old");
        assert_eq!(o.leaf, first.cert_der);

        // A renewed certificate is picked up by the same configs.
        let second = pki.leaf(&["example.com"], KeyAlg::EcdsaP256);
        std::fs::write(
            &path,
            format!(
                "{}{}{}",
                pki.intermediate_pem, second.cert_pem, second.key_pem
            ),
        )
        .expect("write");
        let config_before = tls.direct_config();
        assert!(tls.reload().expect("reload"));
        assert!(Arc::ptr_eq(&config_before, &tls.direct_config()));
        // A fresh client: a resumed session would (correctly) keep the identity it was established with.
        let client = client_config(&pki.root_der, &[]);
        let o = handshake(tls.direct_config(), client, "example.com")
            .await
            .expect("new");
        assert_eq!(o.leaf, second.cert_der);
        assert!(!tls.reload().expect("again unchanged"));
    }

    #[test]
    fn explicit_cert_and_key_and_config_errors() {
        let pki = Pki::new();
        let leaf = pki.leaf(&["x.example"], KeyAlg::Rsa);
        let dir = tempfile::tempdir().expect("tmp");
        let cert = dir.path().join("fullchain.pem");
        let key = dir.path().join("privkey.pem");
        std::fs::write(&cert, format!("{}{}", leaf.cert_pem, pki.intermediate_pem)).expect("write");
        std::fs::write(&key, &leaf.key_pem).expect("write");
        let server = server_cfg("x.example", dir.path());
        let cfg = crate::config::TlsConfig {
            cert: Some(cert.clone()),
            key: Some(key.clone()),
            ..Default::default()
        };
        let tls = Tls::load(&server, &cfg).expect("load");
        let d = tls.describe();
        assert!(
            d.contains("fullchain.pem") && d.contains("x.example") && d.contains("RSA"),
            "{d}"
        );

        let only_cert = crate::config::TlsConfig {
            cert: Some(cert.clone()),
            ..Default::default()
        };
        assert!(matches!(
            Tls::load(&server, &only_cert),
            Err(TlsError::Config(_))
        ));
        let both = crate::config::TlsConfig {
            certs_dir: Some(dir.path().to_path_buf()),
            cert: Some(cert),
            key: Some(key),
            ..Default::default()
        };
        assert!(matches!(
            Tls::load(&server, &both),
            Err(TlsError::Config(_))
        ));
        let empty = tempfile::tempdir().expect("tmp");
        let e = Tls::load(&server, &dir_cfg(empty.path())).expect_err("empty dir");
        assert!(e.to_string().contains("no *.pem"), "{e}");
    }
}

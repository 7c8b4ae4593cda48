//! PEM bundle parsing: Tigase-style `{domain}.pem` files holding the private key, the certificate, its
//! chain and optionally the root, in any order.
//!
//! Why "any order": Tigase (and many operators' `cat key.pem cert.pem chain.pem > domain.pem` habits) do
//! not fix the order, while TLS (RFC 8446 §4.4.2) wants the end-entity certificate first and each
//! following certificate certifying the one before. So the leaf is found by matching the private key's
//! public key, and the chain is ordered by issuer → subject links. A self-signed root is dropped from
//! what is sent: clients must already have it, and sending it only costs bytes on every handshake.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::SignatureAlgorithm;
use rustls::pki_types::pem::{PemObject, SectionKind};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::{CertifiedKey, SigningKey};

use super::TlsError;
use super::x509::{self, CertInfo};

/// One usable certificate: a key, its ordered chain, and what we know about the leaf.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// The file (for explicit `cert` + `key`: the certificate file) it came from.
    pub path: PathBuf,
    pub certified: Arc<CertifiedKey>,
    pub leaf: CertInfo,
    /// "ECDSA", "RSA", "Ed25519", ...
    pub key_kind: &'static str,
}

impl Bundle {
    /// DNS names for SNI selection (SAN, else CN).
    pub fn dns_names(&self) -> Vec<String> {
        self.leaf.dns_names()
    }
}

/// What one PEM file contained.
#[derive(Default)]
struct PemItems {
    certs: Vec<CertificateDer<'static>>,
    keys: Vec<PrivateKeyDer<'static>>,
}

fn file_err(path: &Path, reason: impl Into<String>) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Read a file, naming it in the error.
pub fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Split PEM text into certificates and private keys (PKCS#8, PKCS#1 RSA, SEC1 EC). Other sections
/// (CRLs, parameters, "Bag Attributes" text from `openssl pkcs12`) are ignored.
fn parse_pem(path: &Path, bytes: &[u8]) -> Result<PemItems, TlsError> {
    if contains(bytes, b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
        || contains(bytes, b"Proc-Type: 4,ENCRYPTED")
    {
        return Err(TlsError::EncryptedKey {
            path: path.to_path_buf(),
        });
    }
    let mut items = PemItems::default();
    for section in <(SectionKind, Vec<u8>)>::pem_slice_iter(bytes) {
        let (kind, der) = section.map_err(|e| file_err(path, format!("malformed PEM: {e}")))?;
        match kind {
            SectionKind::Certificate => items.certs.push(CertificateDer::from(der)),
            SectionKind::PrivateKey => items.keys.push(PrivateKeyDer::Pkcs8(der.into())),
            SectionKind::RsaPrivateKey => items.keys.push(PrivateKeyDer::Pkcs1(der.into())),
            SectionKind::EcPrivateKey => items.keys.push(PrivateKeyDer::Sec1(der.into())),
            _ => {}
        }
    }
    Ok(items)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Load a Tigase-style bundle (key + certificate + chain (+ root), any order) from one file.
pub fn load_bundle_file(path: &Path) -> Result<Bundle, TlsError> {
    let bytes = read_file(path)?;
    load_bundle_bytes(path, &bytes)
}

/// Same as [`load_bundle_file`] for bytes already read (errors still name `path`).
pub fn load_bundle_bytes(path: &Path, bytes: &[u8]) -> Result<Bundle, TlsError> {
    let items = parse_pem(path, bytes)?;
    let key = single_key(path, items.keys)?;
    assemble(path, path, items.certs, key)
}

/// Load an explicit certificate file (chain, any order) and key file. They may be the same file.
pub fn load_cert_and_key(cert_path: &Path, key_path: &Path) -> Result<Bundle, TlsError> {
    let cert_items = parse_pem(cert_path, &read_file(cert_path)?)?;
    let key_items = if key_path == cert_path {
        PemItems {
            certs: Vec::new(),
            keys: cert_items.keys,
        }
    } else {
        parse_pem(key_path, &read_file(key_path)?)?
    };
    let key = single_key(key_path, key_items.keys)?;
    assemble(cert_path, key_path, cert_items.certs, key)
}

fn single_key(
    path: &Path,
    mut keys: Vec<PrivateKeyDer<'static>>,
) -> Result<PrivateKeyDer<'static>, TlsError> {
    match keys.len() {
        0 => Err(file_err(
            path,
            "no private key found (expected a PEM \"PRIVATE KEY\", \"RSA PRIVATE KEY\" or \"EC PRIVATE KEY\" section)",
        )),
        1 => Ok(keys.remove(0)),
        n => Err(file_err(
            path,
            format!("contains {n} private keys; a bundle must hold exactly one"),
        )),
    }
}

fn key_kind(key: &dyn SigningKey) -> &'static str {
    match key.algorithm() {
        SignatureAlgorithm::ECDSA => "ECDSA",
        SignatureAlgorithm::RSA => "RSA",
        SignatureAlgorithm::ED25519 => "Ed25519",
        SignatureAlgorithm::ED448 => "Ed448",
        _ => "unknown",
    }
}

fn assemble(
    cert_path: &Path,
    key_path: &Path,
    certs: Vec<CertificateDer<'static>>,
    key_der: PrivateKeyDer<'static>,
) -> Result<Bundle, TlsError> {
    if certs.is_empty() {
        return Err(file_err(
            cert_path,
            "no certificate found (expected a PEM \"CERTIFICATE\" section)",
        ));
    }
    let key = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key_der).map_err(|e| {
        file_err(
            key_path,
            format!("unsupported or malformed private key: {e}"),
        )
    })?;

    let mut parsed = Vec::with_capacity(certs.len());
    for (i, der) in certs.into_iter().enumerate() {
        let info = x509::parse_certificate(&der).map_err(|e| {
            file_err(
                cert_path,
                format!("certificate #{} is malformed: {e}", i + 1),
            )
        })?;
        parsed.push(Some((der, info)));
    }

    // The leaf is the certificate whose public key is the private key's.
    let leaf_idx = match key.public_key() {
        Some(spki) => parsed.iter().position(|c| {
            c.as_ref()
                .is_some_and(|(_, info)| info.spki == spki.as_ref())
        }),
        // Keys that cannot report their SPKI: fall back to the first non-CA certificate.
        None => parsed
            .iter()
            .position(|c| c.as_ref().is_some_and(|(_, info)| !info.is_ca)),
    };
    let Some(leaf_idx) = leaf_idx else {
        return Err(TlsError::KeyMismatch {
            path: key_path.to_path_buf(),
        });
    };
    let Some((leaf_der, leaf)) = parsed[leaf_idx].take() else {
        return Err(file_err(cert_path, "internal error ordering the chain"));
    };

    // Follow issuer → subject links; stop at a self-issued (root) certificate, which is not sent.
    let mut chain = vec![leaf_der];
    let mut current_issuer = (!leaf.is_self_issued()).then(|| leaf.issuer.clone());
    while let Some(issuer) = current_issuer.take() {
        let next = parsed
            .iter()
            .position(|c| c.as_ref().is_some_and(|(_, info)| info.subject == issuer));
        let Some((der, info)) = next.and_then(|idx| parsed[idx].take()) else {
            break;
        };
        if info.is_self_issued() {
            break; // the root: clients have it already
        }
        current_issuer = Some(info.issuer);
        chain.push(der);
    }
    let unused = parsed.iter().filter(|c| c.is_some()).count();
    if unused > 0 {
        tracing::debug!(
            file = %cert_path.display(),
            unused,
            "certificates not part of the leaf's chain (roots or unrelated) are not sent"
        );
    }

    let certified = CertifiedKey::new(chain, key);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(_) => {
            return Err(TlsError::KeyMismatch {
                path: key_path.to_path_buf(),
            });
        }
    }
    Ok(Bundle {
        path: cert_path.to_path_buf(),
        key_kind: key_kind(certified.key.as_ref()),
        certified: Arc::new(certified),
        leaf,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::test_support::*;

    fn write(dir: &tempfile::TempDir, name: &str, parts: &[&str]) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, parts.concat()).expect("write");
        path
    }

    fn chain_ders(b: &Bundle) -> Vec<CertificateDer<'static>> {
        b.certified.cert.clone()
    }

    #[test]
    fn key_first_and_key_last() {
        let pki = Pki::new();
        let leaf = pki.leaf(&["example.com"], KeyAlg::EcdsaP256);
        let dir = tempfile::tempdir().expect("tmp");
        let expect = vec![leaf.cert_der.clone(), pki.intermediate_der.clone()];
        for (name, parts) in [
            (
                "first.pem",
                vec![&leaf.key_pem[..], &leaf.cert_pem, &pki.intermediate_pem],
            ),
            (
                "last.pem",
                vec![&leaf.cert_pem[..], &pki.intermediate_pem, &leaf.key_pem],
            ),
        ] {
            let b = load_bundle_file(&write(&dir, name, &parts)).expect(name);
            assert_eq!(chain_ders(&b), expect, "{name}");
            assert_eq!(b.dns_names(), vec!["example.com"]);
            assert_eq!(b.key_kind, "ECDSA");
        }
    }

    #[test]
    fn any_order_with_root_orders_chain_and_drops_root() {
        let pki = Pki::new();
        let leaf = pki.leaf(&["example.com"], KeyAlg::EcdsaP256);
        let dir = tempfile::tempdir().expect("tmp");
        let path = write(
            &dir,
            "mixed.pem",
            &[
                &pki.root_pem,
                &pki.intermediate_pem,
                &leaf.key_pem,
                "\nBag Attributes: junk\n",
                &leaf.cert_pem,
            ],
        );
        let b = load_bundle_file(&path).expect("load");
        assert_eq!(
            chain_ders(&b),
            vec![leaf.cert_der.clone(), pki.intermediate_der.clone()]
        );
    }

    #[test]
    fn pkcs8_rsa_and_pkcs1_rsa_keys() {
        let pki = Pki::new();
        let leaf = pki.leaf(&["rsa.example.com"], KeyAlg::Rsa);
        let dir = tempfile::tempdir().expect("tmp");
        let p8 = load_bundle_file(&write(&dir, "p8.pem", &[&leaf.cert_pem, &leaf.key_pem]))
            .expect("pkcs8");
        assert_eq!(p8.key_kind, "RSA");
        let pkcs1 = pkcs8_to_pkcs1_pem(&leaf.key_der);
        assert!(pkcs1.contains("BEGIN RSA PRIVATE KEY"));
        let p1 =
            load_bundle_file(&write(&dir, "p1.pem", &[&pkcs1, &leaf.cert_pem])).expect("pkcs1");
        assert_eq!(p1.key_kind, "RSA");
        assert_eq!(chain_ders(&p1)[0], leaf.cert_der);
    }

    #[test]
    fn sec1_ec_key() {
        let pki = Pki::new();
        let leaf = pki.leaf(&["ec.example.com"], KeyAlg::EcdsaP256);
        let sec1 = pkcs8_to_sec1_pem(&leaf.key_der);
        assert!(sec1.contains("BEGIN EC PRIVATE KEY"));
        let dir = tempfile::tempdir().expect("tmp");
        let b = load_bundle_file(&write(&dir, "sec1.pem", &[&leaf.cert_pem, &sec1])).expect("sec1");
        assert_eq!(b.key_kind, "ECDSA");
        // P-384 too.
        let leaf = pki.leaf(&["ec384.example.com"], KeyAlg::EcdsaP384);
        let sec1 = pkcs8_to_sec1_pem(&leaf.key_der);
        let b = load_bundle_file(&write(&dir, "sec1-384.pem", &[&sec1, &leaf.cert_pem]))
            .expect("sec1 p384");
        assert_eq!(b.key_kind, "ECDSA");
    }

    #[test]
    fn openssl_converted_keys_when_available() {
        // Cross-check against keys as real operators produce them; skipped if `openssl` is missing.
        let pki = Pki::new();
        let dir = tempfile::tempdir().expect("tmp");
        for (alg, cmd, marker) in [
            (KeyAlg::Rsa, "rsa", "BEGIN RSA PRIVATE KEY"),
            (KeyAlg::EcdsaP256, "ec", "BEGIN EC PRIVATE KEY"),
        ] {
            let leaf = pki.leaf(&["o.example.com"], alg);
            let p8 = write(&dir, "p8.key", &[&leaf.key_pem]);
            let out = dir.path().join("trad.key");
            let mut args = vec![
                cmd,
                "-in",
                p8.to_str().expect("utf8"),
                "-out",
                out.to_str().expect("utf8"),
            ];
            if cmd == "rsa" {
                args.push("-traditional");
            }
            let Ok(status) = std::process::Command::new("openssl")
                .args(&args)
                .stderr(std::process::Stdio::null())
                .status()
            else {
                return;
            };
            assert!(status.success());
            let trad = std::fs::read_to_string(&out).expect("read");
            assert!(trad.contains(marker), "{trad}");
            let b = load_bundle_file(&write(&dir, "o.pem", &[&trad, &leaf.cert_pem]))
                .expect("openssl key");
            assert_eq!(chain_ders(&b)[0], leaf.cert_der);
        }
        // A really encrypted PKCS#8 key.
        let leaf = pki.leaf(&["enc.example.com"], KeyAlg::EcdsaP256);
        let p8 = write(&dir, "plain.key", &[&leaf.key_pem]);
        let enc = dir.path().join("enc.key");
        let status = std::process::Command::new("openssl")
            .args([
                "pkcs8",
                "-topk8",
                "-v2",
                "aes-256-cbc",
                "-passout",
                "pass:secret",
                "-in",
            ])
            .arg(&p8)
            .arg("-out")
            .arg(&enc)
            .status()
            .expect("openssl");
        assert!(status.success());
        let enc_pem = std::fs::read_to_string(&enc).expect("read");
        let err = load_bundle_file(&write(&dir, "enc.pem", &[&leaf.cert_pem, &enc_pem]))
            .expect_err("encrypted");
        assert!(matches!(err, TlsError::EncryptedKey { .. }), "{err}");
    }

    #[test]
    fn mismatched_key_names_the_file() {
        let pki = Pki::new();
        let a = pki.leaf(&["a.example.com"], KeyAlg::EcdsaP256);
        let b = pki.leaf(&["b.example.com"], KeyAlg::EcdsaP256);
        let dir = tempfile::tempdir().expect("tmp");
        let path = write(&dir, "bad.pem", &[&a.cert_pem, &b.key_pem]);
        let err = load_bundle_file(&path).expect_err("mismatch");
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("bad.pem") && msg.contains("does not match"),
            "{msg}"
        );
    }

    #[test]
    fn encrypted_keys_are_a_clear_error() {
        let pki = Pki::new();
        let leaf = pki.leaf(&["e.example.com"], KeyAlg::EcdsaP256);
        let dir = tempfile::tempdir().expect("tmp");
        let pkcs8_enc = "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIBvTBXBgkqhkiG9w0BBQ0wSjApBgkqhkiG9w0BBQwwHAQI\n-----END ENCRYPTED PRIVATE KEY-----\n";
        let legacy_enc = "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-256-CBC,0011223344556677\n\nAAAA\n-----END RSA PRIVATE KEY-----\n";
        for (name, key) in [("enc8.pem", pkcs8_enc), ("enc1.pem", legacy_enc)] {
            let path = write(&dir, name, &[&leaf.cert_pem, key]);
            let err = load_bundle_file(&path).expect_err("encrypted");
            let msg = err.to_string();
            assert!(msg.contains(name), "{msg}");
            assert!(
                msg.contains("encrypted private keys are not supported"),
                "{msg}"
            );
            assert!(msg.contains("openssl pkey -in"), "{msg}");
        }
    }

    #[test]
    fn missing_parts_and_garbage_are_errors() {
        let pki = Pki::new();
        let leaf = pki.leaf(&["m.example.com"], KeyAlg::EcdsaP256);
        let dir = tempfile::tempdir().expect("tmp");
        let cases: [(&str, Vec<&str>, &str); 5] = [
            ("nokey.pem", vec![&leaf.cert_pem], "no private key"),
            ("nocert.pem", vec![&leaf.key_pem], "no certificate"),
            (
                "twokeys.pem",
                vec![&leaf.cert_pem, &leaf.key_pem, &leaf.key_pem],
                "2 private keys",
            ),
            (
                "trunc.pem",
                vec![&leaf.key_pem, "-----BEGIN CERTIFICATE-----\nMIIB\n"],
                "malformed PEM",
            ),
            (
                "badder.pem",
                vec![
                    &leaf.key_pem,
                    "-----BEGIN CERTIFICATE-----\nMAMCAQE=\n-----END CERTIFICATE-----\n",
                ],
                "malformed",
            ),
        ];
        for (name, parts, want) in cases {
            let err = load_bundle_file(&write(&dir, name, &parts)).expect_err(name);
            let msg = err.to_string();
            assert!(msg.contains(name) && msg.contains(want), "{name}: {msg}");
        }
        let err = load_bundle_file(&dir.path().join("absent.pem")).expect_err("absent");
        assert!(err.to_string().contains("absent.pem"));
    }

    #[test]
    fn explicit_cert_and_key_files() {
        let pki = Pki::new();
        let leaf = pki.leaf(&["x.example.com"], KeyAlg::EcdsaP256);
        let dir = tempfile::tempdir().expect("tmp");
        let cert = write(
            &dir,
            "fullchain.pem",
            &[&leaf.cert_pem, &pki.intermediate_pem],
        );
        let key = write(&dir, "privkey.pem", &[&leaf.key_pem]);
        let b = load_cert_and_key(&cert, &key).expect("load");
        assert_eq!(b.certified.cert.len(), 2);
        let combined = write(&dir, "combined.pem", &[&leaf.key_pem, &leaf.cert_pem]);
        assert!(load_cert_and_key(&combined, &combined).is_ok());
        let other = pki.leaf(&["y.example.com"], KeyAlg::EcdsaP256);
        let wrong = write(&dir, "wrong.key", &[&other.key_pem]);
        let err = load_cert_and_key(&cert, &wrong).expect_err("mismatch");
        assert!(err.to_string().contains("wrong.key"));
    }
}

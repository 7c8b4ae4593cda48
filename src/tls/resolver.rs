//! SNI certificate selection over a swappable certificate set.
//!
//! Why a custom resolver: the rustls `ServerConfig`s are built once and shared by every listener, so
//! reloading certificates must not rebuild them. [`SniResolver`] holds the current [`CertStore`] behind a
//! `RwLock<Arc<_>>` that is read only long enough to clone the `Arc`; a reload swaps in a new store and
//! handshakes already in progress (and established sessions) keep the `CertifiedKey` they picked.
//!
//! Matching follows RFC 6125 §6.4 as RFC 6120 §13.7.1.2 asks for the XMPP domain: exact DNS names first,
//! then a wildcard `*.example.com` matching exactly one left-most label, both case-insensitively, with
//! the subject CN used only for certificates without SAN dNSNames. Unknown or absent SNI (clients
//! connecting by IP address, XEP-0368 clients that omit it) gets the fallback bundle.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use rustls::SignatureScheme;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::bundle::Bundle;
use super::x509::normalize_name;

/// An immutable set of bundles with its SNI index.
#[derive(Debug)]
pub struct CertStore {
    pub bundles: Vec<Bundle>,
    exact: HashMap<String, Vec<usize>>,
    /// Keyed by the part after `*.`.
    wildcard: HashMap<String, Vec<usize>>,
    fallback: usize,
}

fn file_stem(b: &Bundle) -> String {
    b.path
        .file_stem()
        .map(|s| normalize_name(&s.to_string_lossy()))
        .unwrap_or_default()
}

impl CertStore {
    /// Index `bundles` (non-empty). `fallback` picks the bundle for unknown/absent SNI; out of range
    /// means the first.
    pub fn new(bundles: Vec<Bundle>, fallback: usize) -> Self {
        let mut exact: HashMap<String, Vec<usize>> = HashMap::new();
        let mut wildcard: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, b) in bundles.iter().enumerate() {
            for name in b.dns_names() {
                if let Some(suffix) = name.strip_prefix("*.") {
                    if !suffix.is_empty() && !suffix.contains('*') {
                        wildcard.entry(suffix.to_string()).or_default().push(i);
                    }
                } else if !name.contains('*') {
                    exact.entry(name).or_default().push(i);
                }
            }
        }
        // Several bundles may claim a name (e.g. an RSA and an ECDSA one); the file named after the name
        // (Tigase's `{domain}.pem`) comes first, then directory order.
        let stems: Vec<String> = bundles.iter().map(file_stem).collect();
        for (name, list) in exact.iter_mut() {
            list.sort_by_key(|&i| stems[i] != *name);
        }
        for (suffix, list) in wildcard.iter_mut() {
            let pattern = format!("*.{suffix}");
            list.sort_by_key(|&i| stems[i] != pattern);
        }
        let fallback = if fallback < bundles.len() {
            fallback
        } else {
            0
        };
        Self {
            bundles,
            exact,
            wildcard,
            fallback,
        }
    }

    /// Candidate bundles for a server name, without fallback.
    pub fn candidates(&self, name: &str) -> Option<&[usize]> {
        let name = normalize_name(name);
        if let Some(list) = self.exact.get(&name) {
            return Some(list);
        }
        let (label, parent) = name.split_once('.')?;
        if label.is_empty() || parent.is_empty() {
            return None;
        }
        self.wildcard.get(parent).map(Vec::as_slice)
    }

    /// Index of the bundle serving `sni`, preferring one whose key type the client can verify.
    pub fn select(&self, sni: Option<&str>, schemes: &[SignatureScheme]) -> usize {
        let Some(list) = sni.and_then(|n| self.candidates(n)) else {
            return self.fallback;
        };
        list.iter()
            .copied()
            .find(|&i| {
                schemes.is_empty()
                    || self.bundles[i]
                        .certified
                        .key
                        .choose_scheme(schemes)
                        .is_some()
            })
            .or_else(|| list.first().copied())
            .unwrap_or(self.fallback)
    }

    pub fn fallback(&self) -> &Bundle {
        &self.bundles[self.fallback]
    }

    /// True when both stores would serve the same chains from the same files. (The key needs no
    /// comparison: it must match the leaf, so the same leaf implies the same key.)
    pub fn same_certs(&self, other: &CertStore) -> bool {
        self.fallback == other.fallback
            && self.bundles.len() == other.bundles.len()
            && self
                .bundles
                .iter()
                .zip(&other.bundles)
                .all(|(a, b)| a.path == b.path && a.certified.cert == b.certified.cert)
    }
}

/// The `ResolvesServerCert` shared by both acceptor configs.
#[derive(Debug)]
pub struct SniResolver {
    current: RwLock<Arc<CertStore>>,
}

impl SniResolver {
    pub fn new(store: CertStore) -> Self {
        Self {
            current: RwLock::new(Arc::new(store)),
        }
    }

    /// The current store (a cheap `Arc` clone; the lock is held only for that).
    pub fn current(&self) -> Arc<CertStore> {
        let guard = self.current.read().unwrap_or_else(|e| e.into_inner());
        Arc::clone(&guard)
    }

    /// Atomically replace the store; running sessions are unaffected.
    pub fn swap(&self, store: CertStore) {
        let mut guard = self.current.write().unwrap_or_else(|e| e.into_inner());
        *guard = Arc::new(store);
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let store = self.current();
        let idx = store.select(hello.server_name(), hello.signature_schemes());
        store.bundles.get(idx).map(|b| Arc::clone(&b.certified))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::bundle::load_bundle_file;
    use crate::tls::test_support::*;

    fn bundle(dir: &tempfile::TempDir, file: &str, names: &[&str], pki: &Pki) -> Bundle {
        let leaf = pki.leaf(names, KeyAlg::EcdsaP256);
        let path = dir.path().join(file);
        std::fs::write(&path, format!("{}{}", leaf.key_pem, leaf.cert_pem)).expect("write");
        load_bundle_file(&path).expect("load")
    }

    fn leaf_names(store: &CertStore, sni: Option<&str>) -> Vec<String> {
        store.bundles[store.select(sni, &[])].dns_names()
    }

    #[test]
    fn exact_wildcard_san_and_fallback() {
        let pki = Pki::new();
        let dir = tempfile::tempdir().expect("tmp");
        let bundles = vec![
            bundle(&dir, "default.pem", &["default.invalid"], &pki),
            bundle(
                &dir,
                "example.com.pem",
                &["example.com", "*.example.com"],
                &pki,
            ),
            // SAN-only: the file name and CN say nothing about this name.
            bundle(
                &dir,
                "misc.pem",
                &["upload.example.com", "xmpp.other.org"],
                &pki,
            ),
        ];
        let store = CertStore::new(bundles, 0);
        assert_eq!(leaf_names(&store, Some("example.com"))[0], "example.com");
        assert_eq!(leaf_names(&store, Some("EXAMPLE.com."))[0], "example.com");
        // Wildcard: one label only.
        assert_eq!(
            leaf_names(&store, Some("conference.example.com"))[0],
            "example.com"
        );
        assert_eq!(
            leaf_names(&store, Some("a.b.example.com"))[0],
            "default.invalid"
        );
        // Exact beats wildcard.
        assert_eq!(
            leaf_names(&store, Some("upload.example.com"))[0],
            "upload.example.com"
        );
        assert_eq!(
            leaf_names(&store, Some("xmpp.other.org"))[0],
            "upload.example.com"
        );
        // Unknown and absent SNI → default.pem.
        assert_eq!(leaf_names(&store, Some("other.org"))[0], "default.invalid");
        assert_eq!(leaf_names(&store, None)[0], "default.invalid");
    }

    #[test]
    fn cn_fallback_for_certificates_without_san() {
        let pki = Pki::new();
        let dir = tempfile::tempdir().expect("tmp");
        let leaf = pki.leaf_cn_only("legacy.example.net");
        let path = dir.path().join("legacy.pem");
        std::fs::write(&path, format!("{}{}", leaf.cert_pem, leaf.key_pem)).expect("write");
        let legacy = load_bundle_file(&path).expect("load");
        let other = bundle(&dir, "x.pem", &["x.example.net"], &pki);
        let store = CertStore::new(vec![other, legacy], 0);
        assert_eq!(store.select(Some("legacy.example.net"), &[]), 1);
    }

    #[test]
    fn file_named_after_domain_wins_ties() {
        let pki = Pki::new();
        let dir = tempfile::tempdir().expect("tmp");
        let a = bundle(&dir, "aaa.pem", &["example.com"], &pki);
        let b = bundle(&dir, "example.com.pem", &["example.com"], &pki);
        let store = CertStore::new(vec![a, b], 0);
        assert_eq!(store.select(Some("example.com"), &[]), 1);
    }

    #[test]
    fn swap_replaces_what_resolve_sees() {
        let pki = Pki::new();
        let dir = tempfile::tempdir().expect("tmp");
        let a = bundle(&dir, "a.pem", &["a.example"], &pki);
        let b = bundle(&dir, "b.pem", &["b.example"], &pki);
        let resolver = SniResolver::new(CertStore::new(vec![a], 0));
        let before = resolver.current();
        resolver.swap(CertStore::new(vec![b], 0));
        assert_eq!(before.bundles[0].dns_names(), vec!["a.example"]);
        assert_eq!(resolver.current().bundles[0].dns_names(), vec!["b.example"]);
        assert!(!before.same_certs(&resolver.current()));
        assert!(resolver.current().same_certs(&resolver.current()));
    }
}

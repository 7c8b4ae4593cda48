//! Credential sources for SASL and the failed-login throttle.
//!
//! Sources, in order (the first that knows the user is authoritative, so a stored account cannot also
//! be logged into with a device password):
//! 1. the embedded [`AccountStore`];
//! 2. device credentials, if `[auth] device_secret` is set: every `username@domain` has the password
//!    `hex(HMAC-SHA256(device_secret, bare JID))` (see [`Authenticator::device_password`]), so devices can
//!    be provisioned without touching the server.
//!
//! The throttle slows down (never locks out) addresses that keep failing, which bounds online password
//! guessing (RFC 6120 §13.8 asks servers to mitigate it) without letting an attacker lock out a user.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::config::AuthConfig;
use crate::store::AccountStore;
use crate::xmpp::sasl::{CredentialLookup, ScramCredentials, ScramHash};

/// Bound on cached device SCRAM credentials: enough for a large fleet, small enough (~100 B each) to
/// not matter. When exceeded the cache is cleared, which only costs a PBKDF2 run per device.
const DEVICE_CACHE_MAX: usize = 100_000;

fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC accepts any key length");
    m.update(msg);
    m.finalize().into_bytes().into()
}

/// Looks users up for the SASL mechanisms (see the module docs for the order of sources).
pub struct Authenticator {
    /// The served domain, lower case: usernames are localparts of this domain.
    domain: String,
    /// None when device credentials are disabled (unset or empty in the config).
    device_secret: Option<String>,
    device_iterations: u32,
    /// Iterations of stored accounts, also advertised for unknown users so `i=` does not reveal them.
    scram_iterations: u32,
    store: Arc<AccountStore>,
    /// Derived device SCRAM data, so reconnect storms do not repeat PBKDF2 per login.
    device_cache: DashMap<(String, ScramHash), ScramCredentials>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("domain", &self.domain)
            .field("device_credentials", &self.device_secret.is_some())
            .finish()
    }
}

impl Authenticator {
    pub fn new(domain: &str, cfg: &AuthConfig, store: Arc<AccountStore>) -> Self {
        Authenticator {
            domain: domain.trim_end_matches('.').to_lowercase(),
            device_secret: cfg.device_secret.clone().filter(|s| !s.is_empty()),
            device_iterations: cfg.device_scram_iterations.max(1),
            scram_iterations: cfg.scram_iterations.max(1),
            store,
            device_cache: DashMap::new(),
        }
    }

    /// hex(HMAC-SHA256(key=device_secret, msg=bare JID)), lower case — the device credential scheme.
    /// The bare JID is used as given; callers pass the normalised (lower-case) form.
    pub fn device_password(secret: &str, bare_jid: &str) -> String {
        hex::encode(hmac_sha256(secret.as_bytes(), bare_jid.as_bytes()))
    }

    /// The domain usernames are resolved in.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// `username@domain` if `username` can be a localpart; None otherwise (treated as an unknown user).
    fn bare_jid(&self, username: &str) -> Option<String> {
        let jid = format!("{username}@{}", self.domain);
        match crate::store::accounts::normalize_jid(&jid) {
            // A username containing `@` would normalise to a different split; reject it.
            Ok(j) if j == jid => Some(j),
            _ => None,
        }
    }

    /// SCRAM data for a device account: the salt is derived from the secret and JID so it is stable
    /// across restarts and servers (clients may cache SaltedPassword, RFC 5802 §5.1) without storage.
    fn device_scram(&self, secret: &str, jid: &str, hash: ScramHash) -> ScramCredentials {
        let key = (jid.to_owned(), hash);
        if let Some(c) = self.device_cache.get(&key) {
            return c.clone();
        }
        let salt = hmac_sha256(secret.as_bytes(), format!("scram-salt:{jid}").as_bytes());
        let password = Self::device_password(secret, jid);
        let creds = ScramCredentials::derive(&password, &salt[..16], self.device_iterations, hash);
        if self.device_cache.len() >= DEVICE_CACHE_MAX {
            self.device_cache.clear();
        }
        self.device_cache.insert(key, creds.clone());
        creds
    }
}

impl CredentialLookup for Authenticator {
    fn scram(&self, username: &str, hash: ScramHash) -> Option<ScramCredentials> {
        let jid = self.bare_jid(username)?;
        if let Some(account) = self.store.get(&jid) {
            return Some(account.scram(hash).clone());
        }
        let secret = self.device_secret.as_deref()?;
        Some(self.device_scram(secret, &jid, hash))
    }

    fn verify_plain(&self, username: &str, password: &str) -> bool {
        let Some(jid) = self.bare_jid(username) else {
            return false;
        };
        if let Some(account) = self.store.get(&jid) {
            return account.verify_password(password);
        }
        if let Some(secret) = self.device_secret.as_deref() {
            let expected = Self::device_password(secret, &jid);
            return bool::from(expected.as_bytes().ct_eq(password.as_bytes()));
        }
        // Unknown user: spend the same PBKDF2 work a stored account would, so response time does not
        // reveal whether the account exists.
        let salt = hmac_sha256(jid.as_bytes(), b"tern-plain-dummy");
        let _ = ScramCredentials::derive(
            password,
            &salt[..16],
            self.scram_iterations,
            ScramHash::Sha256,
        );
        false
    }

    fn unknown_user_iterations(&self, _hash: ScramHash) -> u32 {
        self.scram_iterations
    }

    /// Only the user's own bare JID, domain included (RFC 6120 §6.3.8).
    fn authzid_matches(&self, username: &str, authzid: &str) -> bool {
        match (
            self.bare_jid(username),
            crate::store::accounts::normalize_jid(authzid),
        ) {
            (Some(own), Ok(requested)) => own == requested,
            _ => false,
        }
    }
}

/// How long an address's failures are remembered after its last failure.
const THROTTLE_FORGET: Duration = Duration::from_secs(600);
/// First non-zero delay.
const THROTTLE_BASE: Duration = Duration::from_millis(250);
/// Default bound on tracked addresses.
const THROTTLE_MAX_ENTRIES: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct ThrottleEntry {
    failures: u32,
    last: Instant,
}

/// Failed-authentication throttle keyed by client address.
///
/// IPv6 addresses are grouped by /64, since one subscriber usually owns a whole /64 and could otherwise
/// rotate addresses to escape the throttle (and bloat the table). Time is passed in so behaviour is
/// deterministic under test.
#[derive(Debug)]
pub struct AuthThrottle {
    entries: DashMap<IpAddr, ThrottleEntry>,
    failures_before_delay: u32,
    max_delay: Duration,
    max_entries: usize,
}

impl AuthThrottle {
    pub fn new(cfg: &AuthConfig) -> Self {
        Self::with_capacity(cfg, THROTTLE_MAX_ENTRIES)
    }

    /// Like [`AuthThrottle::new`] with an explicit bound on tracked addresses.
    pub fn with_capacity(cfg: &AuthConfig, max_entries: usize) -> Self {
        AuthThrottle {
            entries: DashMap::new(),
            failures_before_delay: cfg.failures_before_delay,
            max_delay: Duration::from_millis(cfg.max_failure_delay_ms),
            max_entries: max_entries.max(1),
        }
    }

    /// How long to wait before answering the next authentication attempt from `ip`: zero until
    /// `failures_before_delay` failures, then 250 ms doubling per further failure, capped at
    /// `max_failure_delay_ms`. Forgotten 10 minutes after the last failure.
    pub fn delay_for(&self, ip: IpAddr, now: Instant) -> Duration {
        let key = crate::limits::address_group(ip);
        let Some(e) = self.entries.get(&key).map(|e| *e) else {
            return Duration::ZERO;
        };
        if now.saturating_duration_since(e.last) >= THROTTLE_FORGET {
            self.entries.remove_if(&key, |_, v| v.last == e.last);
            return Duration::ZERO;
        }
        self.delay_after(e.failures)
    }

    fn delay_after(&self, failures: u32) -> Duration {
        let threshold = self.failures_before_delay.max(1);
        if failures < threshold {
            return Duration::ZERO;
        }
        let doublings = (failures - threshold).min(31);
        THROTTLE_BASE
            .saturating_mul(1u32 << doublings)
            .min(self.max_delay)
    }

    /// Records a failed authentication from `ip` and counts it in `tern_auth_failures_total`.
    pub fn record_failure(&self, ip: IpAddr, now: Instant) {
        metrics::counter!("tern_auth_failures_total").increment(1);
        let key = crate::limits::address_group(ip);
        if !self.entries.contains_key(&key) && self.entries.len() >= self.max_entries {
            self.prune(now);
        }
        self.entries
            .entry(key)
            .and_modify(|e| {
                if now.saturating_duration_since(e.last) >= THROTTLE_FORGET {
                    e.failures = 0;
                }
                e.failures = e.failures.saturating_add(1);
                e.last = now;
            })
            .or_insert(ThrottleEntry {
                failures: 1,
                last: now,
            });
    }

    /// Records a successful authentication from `ip`: its failures are forgotten, and
    /// `tern_auth_success_total` is incremented.
    /// Counted, but the address's failures are kept: one good login (any account, or a device behind the
    /// same NAT) must not reset an attacker's slowdown. Only failures are ever delayed, so legitimate
    /// logins are unaffected; the entry is forgotten after it stays idle.
    pub fn record_success(&self, ip: IpAddr) {
        let _ = ip;
        metrics::counter!("tern_auth_success_total").increment(1);
    }

    /// Number of tracked addresses.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Makes room at capacity: drop idle entries, then ones not (yet) delayed; if that frees less than a
    /// tenth, clear everything (an address flood is under way, and an unbounded table would be worse
    /// than briefly forgetting). Leaving at most 90 % full keeps this O(n) scan amortised O(1).
    fn prune(&self, now: Instant) {
        let threshold = self.failures_before_delay.max(1);
        self.entries
            .retain(|_, e| now.saturating_duration_since(e.last) < THROTTLE_FORGET);
        if self.entries.len() >= self.max_entries {
            self.entries.retain(|_, e| e.failures >= threshold);
        }
        if self.entries.len() > self.max_entries / 10 * 9 {
            tracing::warn!(
                entries = self.entries.len(),
                "auth throttle table full; forgetting all failures"
            );
            self.entries.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xmpp::sasl::{Mechanism, SaslFailure, SaslServer, Step};

    fn cfg(secret: Option<&str>) -> AuthConfig {
        AuthConfig {
            device_secret: secret.map(str::to_owned),
            device_scram_iterations: 64,
            scram_iterations: 64,
            failures_before_delay: 3,
            max_failure_delay_ms: 5000,
        }
    }

    fn setup(secret: Option<&str>) -> (tempfile::TempDir, Authenticator) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(AccountStore::open(tmp.path()).expect("open"));
        store
            .add("alice@example.org", "wonderland", 64)
            .expect("add");
        store.add("alice@other.org", "elsewhere", 64).expect("add");
        let auth = Authenticator::new("Example.org", &cfg(secret), store);
        (tmp, auth)
    }

    #[test]
    fn device_password_scheme() {
        let p = Authenticator::device_password("s3cret", "dev1@example.org");
        assert_eq!(p.len(), 64);
        assert!(
            p.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
        assert_eq!(p, hex::encode(hmac_sha256(b"s3cret", b"dev1@example.org")));
        // Independent check: HMAC-SHA256 RFC 4231 test case 2.
        assert_eq!(
            Authenticator::device_password("Jefe", "what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn plain_store_then_device() {
        let (_t, auth) = setup(Some("s3cret"));
        assert!(auth.verify_plain("alice", "wonderland"));
        assert!(!auth.verify_plain("alice", "elsewhere"));
        // The store is authoritative: alice's device password does not work.
        let alice_dev = Authenticator::device_password("s3cret", "alice@example.org");
        assert!(!auth.verify_plain("alice", &alice_dev));
        let dev = Authenticator::device_password("s3cret", "dev1@example.org");
        assert!(auth.verify_plain("dev1", &dev));
        assert!(!auth.verify_plain("dev2", &dev));
        assert!(!auth.verify_plain("dev1", &dev.to_uppercase()));
        assert!(!auth.verify_plain("dev1@example.org", &dev));
        assert!(!auth.verify_plain("", &dev));
    }

    #[test]
    fn no_device_secret_means_unknown_users() {
        for secret in [None, Some("")] {
            let (_t, auth) = setup(secret);
            assert!(auth.scram("dev1", ScramHash::Sha256).is_none());
            assert!(!auth.verify_plain("dev1", "whatever"));
            assert!(auth.scram("alice", ScramHash::Sha1).is_some());
            assert_eq!(auth.unknown_user_iterations(ScramHash::Sha256), 64);
        }
    }

    #[test]
    fn scram_device_credentials_are_deterministic_and_cached() {
        let (_t, auth) = setup(Some("s3cret"));
        let a = auth.scram("dev1", ScramHash::Sha256).expect("device");
        assert_eq!(a.iterations, 64);
        assert_eq!(a.salt.len(), 16);
        assert_eq!(auth.device_cache.len(), 1);
        let b = auth.scram("dev1", ScramHash::Sha256).expect("device");
        assert_eq!(a, b);
        // A fresh authenticator (restart) derives the same data.
        let (_t2, auth2) = setup(Some("s3cret"));
        assert_eq!(auth2.scram("dev1", ScramHash::Sha256), Some(a.clone()));
        let s1 = auth.scram("dev1", ScramHash::Sha1).expect("device");
        assert_eq!(s1.stored_key.len(), 20);
        assert_ne!(
            auth.scram("dev2", ScramHash::Sha256).expect("d").salt,
            a.salt
        );
        // Store accounts come from the store.
        let alice = auth.scram("alice", ScramHash::Sha256).expect("alice");
        assert_eq!(
            alice,
            auth.store.get("alice@example.org").expect("a").scram_sha256
        );
    }

    #[test]
    fn full_scram_exchange_with_device_credentials() {
        let (_t, auth) = setup(Some("s3cret"));
        let password = Authenticator::device_password("s3cret", "dev1@example.org");
        let creds = auth.scram("dev1", ScramHash::Sha256).expect("device");
        let client_first_bare = "n=dev1,r=abcdef";
        let (mut s, step) = SaslServer::start(
            Mechanism::ScramSha256,
            Some(format!("n,,{client_first_bare}").as_bytes()),
            &auth,
            [9; 18],
        );
        let Step::Challenge(sf) = step else {
            panic!("{step:?}")
        };
        let sf = String::from_utf8(sf).expect("utf8");
        let nonce = sf
            .split(',')
            .next()
            .and_then(|r| r.strip_prefix("r="))
            .expect("r");
        // Client side (RFC 5802 §3) from the password alone.
        let salted = {
            let mut out = [0u8; 32];
            pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), &creds.salt, 64, &mut out);
            out
        };
        let client_key = hmac_sha256(&salted, b"Client Key");
        let stored_key: [u8; 32] = <Sha256 as sha2::Digest>::digest(client_key).into();
        let without_proof = format!("c=biws,r={nonce}");
        let auth_msg = format!("{client_first_bare},{sf},{without_proof}");
        let sig = hmac_sha256(&stored_key, auth_msg.as_bytes());
        let proof: Vec<u8> = client_key.iter().zip(sig).map(|(a, b)| a ^ b).collect();
        use base64::Engine as _;
        let cf = format!(
            "{without_proof},p={}",
            base64::engine::general_purpose::STANDARD.encode(proof)
        );
        let step = s.step(cf.as_bytes(), &auth);
        assert!(
            matches!(&step, Step::Success { username, .. } if username == "dev1"),
            "{step:?}"
        );
    }

    #[test]
    fn authzid_must_be_own_bare_jid_on_our_domain() {
        let (_t, auth) = setup(None);
        assert!(auth.authzid_matches("alice", "alice@example.org"));
        assert!(auth.authzid_matches("alice", "Alice@EXAMPLE.org"));
        assert!(!auth.authzid_matches("alice", "alice@other.org"));
        assert!(!auth.authzid_matches("alice", "bob@example.org"));
        assert!(!auth.authzid_matches("alice", "alice@example.org/res"));
        let (_, step) = SaslServer::start(
            Mechanism::Plain,
            Some(b"alice@other.org\0alice\0wonderland"),
            &auth,
            [0; 18],
        );
        assert_eq!(step, Step::Failure(SaslFailure::InvalidAuthzid));
    }

    #[test]
    fn device_cache_is_bounded() {
        let (_t, auth) = setup(Some("s3cret"));
        let filler = ScramCredentials::derive("p", b"s", 1, ScramHash::Sha1);
        for i in 0..DEVICE_CACHE_MAX {
            auth.device_cache.insert(
                (format!("x{i}@example.org"), ScramHash::Sha1),
                filler.clone(),
            );
        }
        auth.scram("dev1", ScramHash::Sha1).expect("device");
        // Full cache was dropped, then the new entry cached.
        assert_eq!(auth.device_cache.len(), 1);
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn throttle_delay_schedule() {
        let t = AuthThrottle::new(&cfg(None));
        let a = ip("192.0.2.1");
        let t0 = Instant::now();
        let expect = [0, 0, 250, 500, 1000, 2000, 4000, 5000, 5000];
        for (i, want) in expect.iter().enumerate() {
            let now = t0 + Duration::from_secs(i as u64);
            t.record_failure(a, now);
            assert_eq!(
                t.delay_for(a, now),
                Duration::from_millis(*want),
                "after {} failures",
                i + 1
            );
        }
        // Other addresses are unaffected.
        assert_eq!(t.delay_for(ip("192.0.2.2"), t0), Duration::ZERO);
        // Many failures don't overflow.
        for _ in 0..100 {
            t.record_failure(a, t0 + Duration::from_secs(10));
        }
        assert_eq!(
            t.delay_for(a, t0 + Duration::from_secs(10)),
            Duration::from_millis(5000)
        );
        // A success from the same address does not reset the slowdown (it could be the attacker's own
        // account, or another device behind the same NAT).
        t.record_success(a);
        assert_eq!(
            t.delay_for(a, t0 + Duration::from_secs(10)),
            Duration::from_millis(5000)
        );
    }

    #[test]
    fn throttle_forgets_after_idle() {
        let t = AuthThrottle::new(&cfg(None));
        let a = ip("198.51.100.7");
        let t0 = Instant::now();
        for _ in 0..5 {
            t.record_failure(a, t0);
        }
        assert!(t.delay_for(a, t0 + Duration::from_secs(599)) > Duration::ZERO);
        assert_eq!(
            t.delay_for(a, t0 + Duration::from_secs(600)),
            Duration::ZERO
        );
        assert!(t.is_empty());
        // A failure after a long pause starts counting from one again.
        for _ in 0..5 {
            t.record_failure(a, t0);
        }
        t.record_failure(a, t0 + Duration::from_secs(1000));
        assert_eq!(
            t.delay_for(a, t0 + Duration::from_secs(1000)),
            Duration::ZERO
        );
        // Time going "backwards" (caller passes an older Instant) does not panic.
        assert_eq!(t.delay_for(a, t0), Duration::ZERO);
    }

    #[test]
    fn throttle_groups_ipv6_by_64_and_maps_v4() {
        let t = AuthThrottle::new(&cfg(None));
        let now = Instant::now();
        for i in 1..=3 {
            t.record_failure(ip(&format!("2001:db8:1:2::{i}")), now);
        }
        assert_eq!(
            t.delay_for(ip("2001:db8:1:2:ffff::1"), now),
            Duration::from_millis(250)
        );
        assert_eq!(t.delay_for(ip("2001:db8:1:3::1"), now), Duration::ZERO);
        for _ in 0..3 {
            t.record_failure(ip("::ffff:203.0.113.5"), now);
        }
        assert_eq!(
            t.delay_for(ip("203.0.113.5"), now),
            Duration::from_millis(250)
        );
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn throttle_is_bounded() {
        let t = AuthThrottle::with_capacity(&cfg(None), 100);
        let now = Instant::now();
        // A persistent offender...
        let bad = ip("10.0.0.1");
        for _ in 0..5 {
            t.record_failure(bad, now);
        }
        // ...and a flood of one-off failures from other addresses.
        for i in 0..1000u32 {
            t.record_failure(IpAddr::V4((0x0b00_0000 + i).into()), now);
            assert!(t.len() <= 100);
        }
        // Harmless entries were pruned first, so the offender stayed tracked.
        assert!(t.delay_for(bad, now) > Duration::ZERO);
    }

    #[test]
    fn throttle_zero_threshold() {
        let mut c = cfg(None);
        c.failures_before_delay = 0;
        let t = AuthThrottle::new(&c);
        let a = ip("192.0.2.9");
        let now = Instant::now();
        assert_eq!(t.delay_for(a, now), Duration::ZERO);
        t.record_failure(a, now);
        assert_eq!(t.delay_for(a, now), Duration::from_millis(250));
    }
}

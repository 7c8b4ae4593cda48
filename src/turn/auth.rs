//! Who may use the TURN server, and how often the server answers those who may not.
//!
//! - [`Credentials`]: long-term credentials (RFC 8489 §9.2). Usernames of the TURN REST API scheme
//!   (draft-uberti-behave-turn-rest-00 §2.2) carry their own expiry and need no table: the password is
//!   `base64(HMAC-SHA1(secret, username))`, so Tern's XEP-0215 side and any other holder of the secret
//!   can mint them. Several secrets are accepted so a secret can be rotated without cutting off
//!   credentials already handed out. Static users (`[turn] users`) are for test tools.
//! - [`Nonces`]: stateless NONCEs (RFC 8489 §9.2, RFC 8656 §9): a MAC over the issue time and the
//!   client address, so the server keeps no per-client table an attacker could fill, yet a NONCE is
//!   useless from another address and goes stale (438) after `turn.nonce_lifetime_secs`. Each starts
//!   with the nonce cookie announcing the security features (RFC 8489 §9.2.1).
//! - [`FailureLimiter`]: a per-source token bucket for answers to unauthenticated or failed requests,
//!   so the server neither amplifies spoofed traffic nor lets a client guess passwords quickly.
//!
//! Everything here is sans-IO: wall-clock time (`SystemTime`, for expiries that other hosts agree on)
//! and monotonic time (`Instant`, for rates) are passed in. Secrets and passwords never appear in
//! `Debug` output.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::stun::{FEATURES_LEN, NONCE_COOKIE, feature, nonce_prefix, userhash};
use crate::limits::{TokenBucket, address_group};

/// Longest USERNAME accepted: RFC 8489 §14.3 limits the attribute to less than 513 bytes.
pub const MAX_USERNAME_LEN: usize = 512;

/// Seconds since the Unix epoch; a clock before 1970 counts as 0 (everything looks expired or
/// fresh rather than panicking).
fn unix_secs(wall: SystemTime) -> u64 {
    wall.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch (0 before 1970, saturating far in the future).
fn unix_millis(wall: SystemTime) -> u64 {
    wall.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The expiry of a TURN REST API username (draft-uberti-behave-turn-rest-00 §2.2): `EXPIRY:USER`,
/// or a bare `EXPIRY` when the credentials were requested without a user (the draft's "username
/// parameter (if specified)"; pion and webrtc-rs mint such names). `EXPIRY` is a Unix timestamp in
/// decimal digits only (no sign, no spaces) that fits a `u64`; anything else is not a REST
/// username (`None`), never a panic.
pub fn rest_expiry(username: &str) -> Option<u64> {
    let expiry = match username.split_once(':') {
        Some((e, _user)) => e,
        None => username,
    };
    // 20 digits hold u64::MAX; the length check keeps parsing trivially cheap on hostile input.
    if expiry.is_empty() || expiry.len() > 20 || !expiry.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    expiry.parse().ok()
}

/// The user part of a REST username (`alice` in `1700000000:alice`), for per-user quotas: the same
/// user minting fresh credentials is still the same user. `None` for a bare `EXPIRY` or a name that
/// is not a REST username.
pub fn rest_user(username: &str) -> Option<&str> {
    rest_expiry(username)?;
    username.split_once(':').map(|(_, user)| user)
}

/// `[turn] users` entries (`name:password`, split at the first `:` so passwords may contain one);
/// entries without a `:` are skipped (config validation refuses them before this runs).
pub fn parse_static_users(entries: &[String]) -> Vec<(String, String)> {
    entries
        .iter()
        .filter_map(|e| e.split_once(':'))
        .map(|(u, p)| (u.to_owned(), p.to_owned()))
        .collect()
}

/// Long-term credentials (RFC 8489 §9.2): the TURN REST API scheme (draft-uberti-behave-turn-rest-00
/// §2.2: username `EXPIRY:USER` where EXPIRY is a Unix timestamp, password =
/// `base64(HMAC-SHA1(secret, username))`) with a list of secrets for rotation (all accepted when
/// checking; the first mints), plus static users.
///
/// Lookups return passwords, not verdicts: the STUN layer proves knowledge of the password with
/// MESSAGE-INTEGRITY(-SHA256), whose HMAC comparison is where constant time matters.
#[derive(Clone)]
pub struct Credentials {
    /// One keyed HMAC-SHA1 per secret, in configuration order (keyed once here, cloned per use).
    secrets: Vec<Hmac<Sha1>>,
    static_users: Vec<(String, String)>,
}

impl fmt::Debug for Credentials {
    /// Secrets and passwords are redacted: either lets anyone use the relay (and a secret lets them
    /// mint credentials for any user). Static user names are not secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let users: Vec<&str> = self.static_users.iter().map(|(u, _)| u.as_str()).collect();
        f.debug_struct("Credentials")
            .field(
                "secrets",
                &format_args!("<{} redacted>", self.secrets.len()),
            )
            .field("static_users", &users)
            .finish()
    }
}

impl Credentials {
    /// `secrets`: `[turn] secrets`, the first mints; `static_users`: `(name, password)` pairs (see
    /// [`parse_static_users`]).
    pub fn new(secrets: Vec<String>, static_users: Vec<(String, String)>) -> Self {
        let secrets = secrets
            .iter()
            .map(|s| {
                <Hmac<Sha1> as Mac>::new_from_slice(s.as_bytes())
                    .expect("HMAC accepts any key length")
            })
            .collect();
        Self {
            secrets,
            static_users,
        }
    }

    /// Whether any REST secret is configured (without one, [`Credentials::mint`] gives `None`).
    pub fn can_mint(&self) -> bool {
        !self.secrets.is_empty()
    }

    /// Whether `[turn] users` names anyone.
    pub fn has_static_users(&self) -> bool {
        !self.static_users.is_empty()
    }

    /// The static user whose USERHASH (RFC 8489 §14.4) in `realm` is `hash`. REST usernames
    /// cannot be found this way: they are not stored, and the hash hides the expiry they carry.
    /// Every entry is hashed and compared in constant time, so the answer's timing does not tell
    /// which user (if any) matched.
    pub fn user_by_hash(&self, hash: &[u8; 32], realm: &str) -> Option<&str> {
        let mut found = None;
        for (name, _) in &self.static_users {
            if let Ok(h) = userhash(name, realm)
                && bool::from(h.ct_eq(hash))
                && found.is_none()
            {
                found = Some(name.as_str());
            }
        }
        found
    }

    /// The password for `username` if it is a valid, unexpired REST username (expiry > `wall`) or a
    /// static user; `None` otherwise. With several secrets this is the first secret's password; the
    /// engine should use [`Credentials::passwords`] so rotation works.
    pub fn password(&self, username: &str, wall: SystemTime) -> Option<String> {
        self.passwords(username, wall).into_iter().next()
    }

    /// All candidate passwords for `username`: one per secret for an unexpired REST username, in
    /// secret order, then the static user's password. The engine tries each against
    /// MESSAGE-INTEGRITY, so credentials minted with a secret that has since moved down the list (or
    /// that another deployment still mints with) keep working until they expire.
    ///
    /// A name can be both (a static user called `1700000000:x`); both are candidates then, which is
    /// harmless: each still needs its own password.
    pub fn passwords(&self, username: &str, wall: SystemTime) -> Vec<String> {
        let mut out = Vec::new();
        if username.is_empty() || username.len() > MAX_USERNAME_LEN {
            return out;
        }
        if rest_expiry(username).is_some_and(|expiry| expiry > unix_secs(wall)) {
            out.extend(self.secrets.iter().map(|mac| rest_password(mac, username)));
        }
        out.extend(
            self.static_users
                .iter()
                .filter(|(u, _)| u == username)
                .map(|(_, p)| p.clone()),
        );
        out
    }

    /// Mint REST credentials for `user` valid for `ttl` from `wall`, with the first secret
    /// (XEP-0215 hands them out). The expiry is whole seconds, rounded up so at least `ttl` is
    /// granted. An empty `user` gives a bare `EXPIRY` username.
    ///
    /// `None` without secrets, when the expiry would not fit a `SystemTime`, or when the username
    /// would exceed [`MAX_USERNAME_LEN`] (a STUN USERNAME could not carry it).
    pub fn mint(
        &self,
        user: &str,
        ttl: Duration,
        wall: SystemTime,
    ) -> Option<(String, String, SystemTime)> {
        let mac = self.secrets.first()?;
        let ttl_secs = ttl
            .as_secs()
            .checked_add(u64::from(ttl.subsec_nanos() > 0))?;
        let expiry = unix_secs(wall).checked_add(ttl_secs)?;
        let expires = UNIX_EPOCH.checked_add(Duration::from_secs(expiry))?;
        let username = if user.is_empty() {
            expiry.to_string()
        } else {
            format!("{expiry}:{user}")
        };
        if username.len() > MAX_USERNAME_LEN {
            return None;
        }
        let password = rest_password(mac, &username);
        Some((username, password, expires))
    }
}

/// `base64(HMAC-SHA1(secret, username))`, standard alphabet with padding (draft-uberti-behave-turn-
/// rest-00 §2.2; what coturn's `use-auth-secret` checks).
fn rest_password(keyed: &Hmac<Sha1>, username: &str) -> String {
    let mut mac = keyed.clone();
    mac.update(username.as_bytes());
    B64.encode(mac.finalize().into_bytes())
}

/// Why a NONCE was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NonceError {
    /// Issued by this server for this client, but older than the NONCE lifetime: answer 438 (Stale
    /// Nonce) with a fresh one (RFC 8489 §9.2.4), which the client retries with silently.
    #[error("stale nonce")]
    Stale,
    /// Not a NONCE this server issued to this client address (forged, altered, replayed from
    /// elsewhere, or issued under another key): answer 401 with a fresh one.
    #[error("invalid nonce")]
    Invalid,
}

/// Format version, the first byte of the MAC'd part of the NONCE (after the nonce cookie).
const NONCE_VERSION: u8 = 1;
/// MAC bytes kept: 120 bits, far beyond what online guessing within a NONCE lifetime can reach.
const NONCE_MAC_LEN: usize = 15;
/// Version, issue time (ms since the Unix epoch, big-endian), truncated MAC.
const NONCE_RAW_LEN: usize = 1 + 8 + NONCE_MAC_LEN;
/// Wall-clock steps backwards tolerated between issuing and checking (threads read the clock
/// independently); a NONCE from further in the future is treated as stale, not trusted longer.
const NONCE_FUTURE_SKEW_MS: u64 = 2_000;

/// Stateless NONCEs (RFC 8489 §9.2, RFC 8656 §9): `HMAC-SHA256(key, features || issue time ||
/// client IP)` truncated, sent together with the issue time, so the server keeps no table of
/// NONCEs. A NONCE checks only from the address it was issued to, and goes [`NonceError::Stale`]
/// (438) after `lifetime`.
///
/// Encoded as the nonce cookie `obMatJos2` with four base64 characters of security feature bits
/// (RFC 8489 §9.2.1; password algorithms always, username anonymity when the engine can honour
/// it), then 32 characters of unpadded base64url: well under RFC 8489 §14.10's 763-byte limit,
/// small enough to keep 401 and 438 answers short (no amplification), and only characters valid in
/// a quoted-string. The key should be random per process (or shared by the nodes of a cluster);
/// a restart with a new key just makes clients fetch a new NONCE.
#[derive(Clone)]
pub struct Nonces {
    mac: Hmac<Sha256>,
    lifetime: Duration,
    /// Security feature bits ([`feature`]) announced by every NONCE.
    features: u32,
    /// The nonce cookie and the encoded features: the first [`Nonces::PREFIX_LEN`] characters.
    prefix: String,
}

impl fmt::Debug for Nonces {
    /// The key is redacted: with it anyone could forge NONCEs for any address.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Nonces")
            .field("key", &"<redacted>")
            .field("lifetime", &self.lifetime)
            .field("features", &self.features)
            .finish()
    }
}

impl Nonces {
    /// The nonce cookie and its four feature characters (RFC 8489 §9.2).
    pub const PREFIX_LEN: usize = NONCE_COOKIE.len() + FEATURES_LEN;
    /// Length of every NONCE issued, in bytes (ASCII).
    pub const LEN: usize = Self::PREFIX_LEN + 32;

    /// `key`: 32 random bytes; `lifetime`: `turn.nonce_lifetime_secs`. The NONCEs announce the
    /// password algorithms feature (PASSWORD-ALGORITHMS negotiation).
    pub fn new(key: [u8; 32], lifetime: Duration) -> Self {
        let features = feature::PASSWORD_ALGORITHMS;
        Self {
            mac: <Hmac<Sha256> as Mac>::new_from_slice(&key).expect("HMAC accepts any key length"),
            lifetime,
            features,
            prefix: nonce_prefix(features),
        }
    }

    /// The same NONCEs announcing `features` instead (the low 24 bits count). NONCEs issued
    /// before no longer check: the features are part of the MAC.
    pub fn with_features(self, features: u32) -> Self {
        let features = features & 0x00ff_ffff;
        Self {
            features,
            prefix: nonce_prefix(features),
            ..self
        }
    }

    /// The security feature bits every NONCE announces.
    pub fn features(&self) -> u32 {
        self.features
    }

    /// How long a NONCE stays valid.
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// A NONCE for `client`, issued at `wall`.
    pub fn issue(&self, client: IpAddr, wall: SystemTime) -> String {
        let issued = unix_millis(wall);
        let mut raw = [0u8; NONCE_RAW_LEN];
        raw[0] = NONCE_VERSION;
        raw[1..9].copy_from_slice(&issued.to_be_bytes());
        raw[9..].copy_from_slice(&self.tag(issued, client)[..NONCE_MAC_LEN]);
        let mut nonce = String::with_capacity(Self::LEN);
        nonce.push_str(&self.prefix);
        B64URL.encode_string(raw, &mut nonce);
        nonce
    }

    /// Whether `nonce` was issued by this key to `client` and is younger than the lifetime at
    /// `wall`. The MAC is checked first, in constant time, so a forged NONCE is `Invalid` whatever
    /// time it claims.
    pub fn check(&self, nonce: &str, client: IpAddr, wall: SystemTime) -> Result<(), NonceError> {
        let Some(body) = nonce.strip_prefix(self.prefix.as_str()) else {
            return Err(NonceError::Invalid);
        };
        if nonce.len() != Self::LEN {
            return Err(NonceError::Invalid);
        }
        let mut raw = [0u8; NONCE_RAW_LEN];
        match B64URL.decode_slice(body, &mut raw) {
            Ok(NONCE_RAW_LEN) => {}
            _ => return Err(NonceError::Invalid),
        }
        if raw[0] != NONCE_VERSION {
            return Err(NonceError::Invalid);
        }
        let mut issued = [0u8; 8];
        issued.copy_from_slice(&raw[1..9]);
        let issued = u64::from_be_bytes(issued);
        let tag = self.tag(issued, client);
        if !bool::from(tag[..NONCE_MAC_LEN].ct_eq(&raw[9..])) {
            return Err(NonceError::Invalid);
        }
        let now = unix_millis(wall);
        if issued > now.saturating_add(NONCE_FUTURE_SKEW_MS) {
            return Err(NonceError::Stale);
        }
        let age = Duration::from_millis(now.saturating_sub(issued));
        if age >= self.lifetime {
            return Err(NonceError::Stale);
        }
        Ok(())
    }

    /// The full MAC over the format version, the issue time and the client address (IPv4-mapped
    /// IPv6 folded to IPv4, so a dual-stack socket and an IPv4 one agree).
    fn tag(&self, issued_ms: u64, client: IpAddr) -> [u8; 32] {
        let mut mac = self.mac.clone();
        mac.update(b"tern turn nonce");
        mac.update(&self.features.to_be_bytes());
        mac.update(&[NONCE_VERSION]);
        mac.update(&issued_ms.to_be_bytes());
        match client.to_canonical() {
            IpAddr::V4(a) => {
                mac.update(&[4]);
                mac.update(&a.octets());
            }
            IpAddr::V6(a) => {
                mac.update(&[6]);
                mac.update(&a.octets());
            }
        }
        mac.finalize().into_bytes().into()
    }
}

/// Per-source-address limit on answers to unauthenticated or failed requests (RFC 8656 §21.1.3 and
/// RFC 8489 §16.1.2: no amplification of spoofed requests, no fast online password guessing): a token
/// bucket per address group ([`address_group`]: IPv4 as is, IPv6 per /64, since one IPv6 client
/// owns a whole /64).
///
/// Memory stays bounded: a full bucket is the same as none, so full buckets are dropped every
/// [`FailureLimiter::PRUNE_EVERY`]; beyond [`FailureLimiter::MAX_TRACKED`] addresses, new ones share
/// one overflow bucket (limited together rather than not at all, and no tracked bucket is reset to
/// let a flood through).
#[derive(Debug)]
pub struct FailureLimiter {
    rate: usize,
    burst: usize,
    max_tracked: usize,
    state: Mutex<LimiterState>,
}

#[derive(Debug)]
struct LimiterState {
    buckets: HashMap<IpAddr, TokenBucket>,
    /// Shared by new addresses while the map is full.
    overflow: Option<TokenBucket>,
    /// Next periodic prune; `None` until the first request (no clock is read here).
    next_prune: Option<Instant>,
    /// Earliest prune forced by a full map, so a flood of new addresses costs one scan per
    /// [`FailureLimiter::FORCED_PRUNE_GAP`], not one per packet.
    next_forced_prune: Option<Instant>,
}

impl FailureLimiter {
    /// Address groups tracked one by one at most (about 64 bytes each).
    pub const MAX_TRACKED: usize = 65_536;
    /// How often full buckets are dropped.
    pub const PRUNE_EVERY: Duration = Duration::from_secs(10);
    /// Least time between two prunes forced by a full map.
    const FORCED_PRUNE_GAP: Duration = Duration::from_secs(1);

    /// `per_sec` answers per second sustained (`turn.unauthenticated_per_sec`), `burst` at once
    /// (both at least 1).
    pub fn new(per_sec: u32, burst: u32) -> Self {
        Self::with_max_tracked(per_sec, burst, Self::MAX_TRACKED)
    }

    /// As [`FailureLimiter::new`], tracking at most `max_tracked` address groups (at least 1).
    pub fn with_max_tracked(per_sec: u32, burst: u32, max_tracked: usize) -> Self {
        Self {
            rate: (per_sec as usize).max(1),
            burst: (burst as usize).max(1),
            max_tracked: max_tracked.max(1),
            state: Mutex::new(LimiterState {
                buckets: HashMap::new(),
                overflow: None,
                next_prune: None,
                next_forced_prune: None,
            }),
        }
    }

    /// Take one answer's token for `ip` at `now`; `false`: drop the request silently.
    pub fn allow(&self, ip: IpAddr, now: Instant) -> bool {
        let key = address_group(ip);
        // A panic elsewhere while holding the lock leaves consistent buckets: keep using them.
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if st.next_prune.is_none_or(|t| now >= t) {
            st.prune(now);
            st.next_prune = Some(now + Self::PRUNE_EVERY);
        }
        if let Some(bucket) = st.buckets.get_mut(&key) {
            return take(bucket, now);
        }
        if st.buckets.len() >= self.max_tracked && st.next_forced_prune.is_none_or(|t| now >= t) {
            st.prune(now);
            st.next_forced_prune = Some(now + Self::FORCED_PRUNE_GAP);
        }
        let (rate, burst) = (self.rate, self.burst);
        if st.buckets.len() >= self.max_tracked {
            let bucket = st
                .overflow
                .get_or_insert_with(|| TokenBucket::new(rate, burst, now));
            return take(bucket, now);
        }
        take(
            st.buckets
                .entry(key)
                .or_insert_with(|| TokenBucket::new(rate, burst, now)),
            now,
        )
    }

    /// Address groups currently tracked one by one (for metrics and tests).
    pub fn tracked(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .buckets
            .len()
    }
}

impl LimiterState {
    /// Drop the buckets that are full again (indistinguishable from a new one).
    fn prune(&mut self, now: Instant) {
        self.buckets.retain(|_, b| b.available(now) < b.burst());
        if self
            .overflow
            .as_mut()
            .is_some_and(|b| b.available(now) >= b.burst())
        {
            self.overflow = None;
        }
    }
}

fn take(bucket: &mut TokenBucket, now: Instant) -> bool {
    if bucket.available(now) >= 1 {
        bucket.consume(1, now);
        true
    } else {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef-old";
    const NEW_SECRET: &str = "0123456789abcdef-new";

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn rest_password_matches_published_vectors() {
        // pion/turn and webrtc-rs `turn` (TestLtCredMech / test_lt_cred): a bare-EXPIRY username.
        let c = Credentials::new(vec!["foobar".into()], vec![]);
        assert_eq!(
            c.password("1599491771", at(1_599_491_000)).as_deref(),
            Some("Tpz/nKkyvX/vMSLKvL4sbtBt8Vs=")
        );
        // The draft's `EXPIRY:USER` form, cross-checked with
        // `echo -n 1600000000:alice | openssl dgst -binary -sha1 -hmac north | base64`.
        let c = Credentials::new(vec!["north".into()], vec![]);
        assert_eq!(
            c.password("1600000000:alice", at(1_599_999_999)).as_deref(),
            Some("gq98pTOhhHaAu0we9aV79kOVVv0=")
        );
    }

    #[test]
    fn mint_then_verify_until_expiry() {
        let c = Credentials::new(vec![SECRET.into()], vec![]);
        let wall = at(1_700_000_000) + Duration::from_millis(250);
        let (user, pass, expires) = c
            .mint("alice@example.com/phone", Duration::from_secs(3600), wall)
            .expect("minted");
        assert_eq!(user, "1700003600:alice@example.com/phone");
        assert_eq!(expires, at(1_700_003_600));
        assert_eq!(c.password(&user, wall).as_deref(), Some(pass.as_str()));
        assert_eq!(c.passwords(&user, at(1_700_003_599)), vec![pass]);
        // Expired once the wall clock reaches EXPIRY.
        assert_eq!(c.password(&user, at(1_700_003_600)), None);
        assert!(c.passwords(&user, at(1_800_000_000)).is_empty());
        assert_eq!(rest_user(&user), Some("alice@example.com/phone"));
    }

    #[test]
    fn mint_edge_cases() {
        let none = Credentials::new(vec![], vec![("u".into(), "p".into())]);
        assert!(!none.can_mint());
        assert_eq!(none.mint("alice", Duration::from_secs(60), at(1000)), None);
        let c = Credentials::new(vec![SECRET.into()], vec![]);
        // Sub-second TTLs round up, empty users give a bare EXPIRY.
        let (user, _, expires) = c
            .mint("", Duration::from_millis(1), at(1000))
            .expect("minted");
        assert_eq!((user.as_str(), expires), ("1001", at(1001)));
        assert_eq!(rest_user(&user), None);
        assert!(c.password(&user, at(1000)).is_some());
        // No overflow panics, no usernames a STUN message could not carry.
        assert_eq!(c.mint("a", Duration::MAX, at(1000)), None);
        assert_eq!(
            c.mint(&"x".repeat(600), Duration::from_secs(1), at(0)),
            None
        );
    }

    #[test]
    fn rotation_accepts_every_secret_and_mints_with_the_first() {
        let old = Credentials::new(vec![SECRET.into()], vec![]);
        let (user, old_pass, _) = old
            .mint("bob", Duration::from_secs(600), at(5000))
            .expect("minted");
        let rotated = Credentials::new(vec![NEW_SECRET.into(), SECRET.into()], vec![]);
        let candidates = rotated.passwords(&user, at(5000));
        assert_eq!(candidates.len(), 2);
        assert_eq!(candidates[1], old_pass);
        assert_ne!(candidates[0], old_pass);
        let (user2, new_pass, _) = rotated
            .mint("bob", Duration::from_secs(600), at(5000))
            .expect("minted");
        assert_eq!(user2, user);
        assert_eq!(new_pass, candidates[0]);
        // Once the old secret is dropped, its credentials no longer verify.
        let dropped = Credentials::new(vec![NEW_SECRET.into()], vec![]);
        assert!(!dropped.passwords(&user, at(5000)).contains(&old_pass));
    }

    #[test]
    fn malformed_rest_usernames_are_refused_without_panic() {
        let c = Credentials::new(vec![SECRET.into()], vec![]);
        let wall = at(1_700_000_000);
        for name in [
            "",
            ":alice",
            "abc:alice",
            "17000000001x:alice",
            "+1800000000:alice",
            " 1800000000:alice",
            "-1:alice",
            "1.8e9:alice",
            "99999999999999999999999999999:alice",
            "18446744073709551616:alice",
            "١٨٠٠٠٠٠٠٠٠:alice",
        ] {
            assert_eq!(c.password(name, wall), None, "{name:?}");
            assert!(c.passwords(name, wall).is_empty(), "{name:?}");
        }
        assert_eq!(rest_expiry("18446744073709551615:x"), Some(u64::MAX));
        assert_eq!(rest_expiry("0042"), Some(42));
        let long = format!("1800000000:{}", "a".repeat(MAX_USERNAME_LEN));
        assert!(c.passwords(&long, wall).is_empty());
        // A clock before 1970 does not panic either.
        assert!(
            c.password("5:x", UNIX_EPOCH - Duration::from_secs(10))
                .is_some()
        );
    }

    #[test]
    fn static_users() {
        let users = parse_static_users(&[
            "test:pa:ss".into(),
            "nocolon".into(),
            "1800000000:x:secret".into(),
        ]);
        assert_eq!(
            users,
            vec![
                ("test".to_owned(), "pa:ss".to_owned()),
                ("1800000000".to_owned(), "x:secret".to_owned()),
            ]
        );
        let c = Credentials::new(vec![], users);
        assert_eq!(c.password("test", at(0)).as_deref(), Some("pa:ss"));
        assert_eq!(c.password("Test", at(0)), None);
        assert_eq!(c.password("nobody", at(0)), None);
        // With a secret, a static name that is also a REST name yields both candidates.
        let c = Credentials::new(
            vec![SECRET.into()],
            vec![("1800000000".into(), "static".into())],
        );
        let both = c.passwords("1800000000", at(0));
        assert_eq!(both.len(), 2);
        assert_eq!(both[1], "static");
    }

    #[test]
    fn debug_redacts_secrets_and_passwords() {
        let c = Credentials::new(
            vec![SECRET.into()],
            vec![("tester".into(), "hunter2-password".into())],
        );
        let dbg = format!("{c:?}");
        assert!(dbg.contains("tester") && dbg.contains("redacted"), "{dbg}");
        assert!(!dbg.contains(SECRET) && !dbg.contains("hunter2"), "{dbg}");
        let n = Nonces::new([0x5a; 32], Duration::from_secs(600));
        let dbg = format!("{n:?}");
        assert!(dbg.contains("redacted") && !dbg.contains("90"), "{dbg}");
    }

    fn nonces() -> Nonces {
        Nonces::new([7; 32], Duration::from_secs(600))
    }

    #[test]
    fn nonce_issue_and_check() {
        let n = nonces();
        let client = ip("192.0.2.10");
        let wall = at(1_700_000_000) + Duration::from_millis(123);
        let nonce = n.issue(client, wall);
        assert_eq!(nonce.len(), Nonces::LEN);
        assert!(nonce.len() <= 763);
        // The nonce cookie with the password algorithms bit (RFC 8489 §9.2.1, Errata 6290: bit 0
        // is the least significant of the 24).
        assert!(nonce.starts_with("obMatJos2AAAB"), "{nonce}");
        assert_eq!(
            super::super::stun::security_features(&nonce),
            Some(feature::PASSWORD_ALGORITHMS)
        );
        // Only quoted-string-safe characters (RFC 8489 §14.10: qdtext / quoted-pair).
        assert!(
            nonce
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_eq!(n.check(&nonce, client, wall), Ok(()));
        assert_eq!(
            n.check(&nonce, client, wall + Duration::from_secs(599)),
            Ok(())
        );
        // The same client seen through a dual-stack socket.
        assert_eq!(n.check(&nonce, ip("::ffff:192.0.2.10"), wall), Ok(()));
        // A slightly earlier clock reading on another thread is tolerated.
        assert_eq!(
            n.check(&nonce, client, wall - Duration::from_millis(500)),
            Ok(())
        );
    }

    #[test]
    fn nonce_goes_stale_after_lifetime() {
        let n = nonces();
        let client = ip("2001:db8::1");
        let wall = at(1_700_000_000);
        let nonce = n.issue(client, wall);
        assert_eq!(
            n.check(&nonce, client, wall + Duration::from_millis(599_999)),
            Ok(())
        );
        assert_eq!(
            n.check(&nonce, client, wall + Duration::from_secs(600)),
            Err(NonceError::Stale)
        );
        assert_eq!(
            n.check(&nonce, client, wall + Duration::from_secs(86_400)),
            Err(NonceError::Stale)
        );
        // Issued "in the future" (the wall clock stepped back): refresh rather than trust longer.
        assert_eq!(
            n.check(&nonce, client, wall - Duration::from_secs(60)),
            Err(NonceError::Stale)
        );
    }

    #[test]
    fn nonce_invalid_when_tampered_foreign_or_garbage() {
        let n = nonces();
        let client = ip("192.0.2.10");
        let wall = at(1_700_000_000);
        let nonce = n.issue(client, wall);
        // Another address, even in the same /64 or /24.
        assert_eq!(
            n.check(&nonce, ip("192.0.2.11"), wall),
            Err(NonceError::Invalid)
        );
        // Another key (another server, or after a restart).
        let other = Nonces::new([8; 32], Duration::from_secs(600));
        assert_eq!(other.check(&nonce, client, wall), Err(NonceError::Invalid));
        // Every single-character change.
        for i in 0..nonce.len() {
            let mut b = nonce.clone().into_bytes();
            b[i] = if b[i] == b'A' { b'B' } else { b'A' };
            let t = String::from_utf8(b).expect("ascii");
            assert_eq!(n.check(&t, client, wall), Err(NonceError::Invalid), "{t}");
        }
        // A re-dated NONCE (fresh time, old MAC) is refused, not merely stale.
        let (prefix, body) = nonce.split_at(Nonces::PREFIX_LEN);
        let mut raw = B64URL.decode(body).expect("b64");
        raw[1..9].copy_from_slice(&(unix_millis(wall) + 1000).to_be_bytes());
        let redated = format!("{prefix}{}", B64URL.encode(&raw));
        assert_eq!(n.check(&redated, client, wall), Err(NonceError::Invalid));
        // Announcing other features (a bid-down that strips the password algorithms bit, or
        // claims anonymity) breaks the NONCE: the features are part of the MAC.
        let stripped = format!("obMatJos2AAAA{body}");
        assert_eq!(n.check(&stripped, client, wall), Err(NonceError::Invalid));
        let anon =
            nonces().with_features(feature::PASSWORD_ALGORITHMS | feature::USERNAME_ANONYMITY);
        let anon_nonce = anon.issue(client, wall);
        assert!(anon_nonce.starts_with("obMatJos2AAAD"), "{anon_nonce}");
        assert_eq!(anon.check(&anon_nonce, client, wall), Ok(()));
        assert_eq!(n.check(&anon_nonce, client, wall), Err(NonceError::Invalid));
        let relabelled = format!("obMatJos2AAAB{}", &anon_nonce[Nonces::PREFIX_LEN..]);
        assert_eq!(n.check(&relabelled, client, wall), Err(NonceError::Invalid));
        for garbage in [
            "",
            "x",
            "obMatJos2AAAB",
            "obMatJos2AAAB!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!",
            "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "ÄAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            &format!("{nonce}A"),
            &nonce[..Nonces::LEN - 1],
            &"A".repeat(10_000),
        ] {
            assert_eq!(
                n.check(garbage, client, wall),
                Err(NonceError::Invalid),
                "{garbage}"
            );
        }
    }

    #[test]
    fn limiter_burst_refusal_refill() {
        let t0 = Instant::now();
        let l = FailureLimiter::new(2, 5);
        let a = ip("203.0.113.7");
        for _ in 0..5 {
            assert!(l.allow(a, t0));
        }
        assert!(!l.allow(a, t0));
        assert!(!l.allow(a, t0 + Duration::from_millis(100)));
        // Other addresses are unaffected.
        assert!(l.allow(ip("203.0.113.8"), t0));
        // 2 per second: one token after 500 ms.
        assert!(l.allow(a, t0 + Duration::from_millis(500)));
        assert!(!l.allow(a, t0 + Duration::from_millis(500)));
        // Back to the full burst, never beyond.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..5 {
            assert!(l.allow(a, later));
        }
        assert!(!l.allow(a, later));
    }

    #[test]
    fn limiter_groups_ipv6_per_64_and_folds_mapped() {
        let t0 = Instant::now();
        let l = FailureLimiter::new(1, 2);
        assert!(l.allow(ip("2001:db8:1:2::1"), t0));
        assert!(l.allow(ip("2001:db8:1:2:ffff::9"), t0));
        assert!(!l.allow(ip("2001:db8:1:2::3"), t0));
        assert!(l.allow(ip("2001:db8:1:3::1"), t0));
        assert!(l.allow(ip("192.0.2.1"), t0));
        assert!(l.allow(ip("::ffff:192.0.2.1"), t0));
        assert!(!l.allow(ip("192.0.2.1"), t0));
        assert_eq!(l.tracked(), 3);
    }

    #[test]
    fn limiter_memory_is_bounded() {
        let t0 = Instant::now();
        let l = FailureLimiter::with_max_tracked(1, 2, 100);
        for i in 0..1000u32 {
            l.allow(IpAddr::V4(i.into()), t0);
        }
        assert_eq!(l.tracked(), 100);
        // Beyond the cap new addresses share one bucket: limited together, not unlimited.
        let newcomers: Vec<bool> = (5000..5010u32)
            .map(|i| l.allow(IpAddr::V4(i.into()), t0))
            .collect();
        assert!(newcomers.iter().all(|ok| !ok));
        // Tracked clients keep their own bucket (one token left of two): the flood did not reset it.
        assert!(l.allow(IpAddr::V4(0.into()), t0));
        assert!(!l.allow(IpAddr::V4(0.into()), t0));
        // Once buckets are full again they are pruned and newcomers get their own.
        let later = t0 + FailureLimiter::PRUNE_EVERY + Duration::from_secs(1);
        assert!(l.allow(ip("198.51.100.1"), later));
        assert_eq!(l.tracked(), 1);
    }
}

//! API keys and the client network allow-list.
//!
//! A key is accepted in any of the spellings the management server's clients use: `Authorization:
//! Bearer KEY`, `X-Api-Key: KEY`, `Api-Key: KEY`, or Tigase's `?api-key=KEY`. HTTP Basic credentials
//! sent alongside (Tigase admin clients do) are ignored. Keys are compared in constant time against
//! every configured key, and never logged: nothing here formats a key or the query string.
//!
//! No key at all gives 401 with `WWW-Authenticate: Bearer`; a key that matches none gives 403; a
//! client outside `allow_networks` gets 403 before its key is even looked at.
//!
//! Between the two sits the request rate limit ([`RateLimiter`], `http.rate_limit_per_sec`): a
//! client over it gets 429 with `Retry-After`, before its key is checked, so guessing keys is slowed
//! down too. `/healthz` and `/readyz` are not limited (probes must not fail because the management
//! server is busy).

use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use dashmap::DashMap;
use subtle::ConstantTimeEq;

use super::{HttpState, client_ip, json_error};
use crate::limits::{TokenBucket, address_group};

/// A network in CIDR notation (`10.0.0.0/8`, `2001:db8::/32`); a plain address is a single host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{addr}` is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("prefix length `{p}` must be 0..={max}"))?,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl Cidr {
    /// Whether `ip` is inside the network. IPv4-mapped IPv6 clients (`::ffff:10.1.2.3`, as seen on a
    /// dual-stack listener) match IPv4 networks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Whether the allow-list lets the request's client in. Without a recorded client address (router
/// used without `ConnectInfo`) a non-empty list refuses: fail closed.
fn network_allowed(state: &HttpState, req: &Request) -> bool {
    if state.allow.is_empty() {
        return true;
    }
    client_ip(req).is_some_and(|ip| state.allow.iter().any(|n| n.contains(ip)))
}

/// Middleware for routes open without a key (`/healthz`, `/readyz`): the allow-list only.
pub async fn require_network(
    State(state): State<Arc<HttpState>>,
    req: Request,
    next: Next,
) -> Response {
    if !network_allowed(&state, &req) {
        return json_error(
            StatusCode::FORBIDDEN,
            "client address is not in http.allow_networks",
        );
    }
    next.run(req).await
}

/// Middleware for every other route: allow-list, rate limit, then a valid API key.
pub async fn require_key(
    State(state): State<Arc<HttpState>>,
    req: Request,
    next: Next,
) -> Response {
    if !network_allowed(&state, &req) {
        metrics::counter!("tern_http_auth_failures_total", "reason" => "network").increment(1);
        return json_error(
            StatusCode::FORBIDDEN,
            "client address is not in http.allow_networks",
        );
    }
    // Without a recorded address (router used without `ConnectInfo`) there is nothing to key on.
    if let (Some(limiter), Some(ip)) = (&state.rate_limit, client_ip(&req))
        && let Err(wait) = limiter.check(ip, Instant::now())
    {
        metrics::counter!("tern_limit_hits_total", "limit" => "http_rate").increment(1);
        return too_many_requests(limiter, wait, req.uri().path().starts_with("/rest/"));
    }
    let presented = presented_keys(req.headers(), req.uri().query());
    if presented.is_empty() {
        metrics::counter!("tern_http_auth_failures_total", "reason" => "missing").increment(1);
        let mut resp = json_error(
            StatusCode::UNAUTHORIZED,
            "API key required: send `Authorization: Bearer KEY`, `X-Api-Key: KEY` or `?api-key=KEY`",
        );
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return resp;
    }
    if !presented.iter().any(|k| key_matches(&state.api_keys, k)) {
        metrics::counter!("tern_http_auth_failures_total", "reason" => "invalid").increment(1);
        return json_error(StatusCode::FORBIDDEN, "invalid API key");
    }
    next.run(req).await
}

/// 429 with `Retry-After` (whole seconds, at least 1); plain text for `/rest/stream`, whose Tigase
/// clients expect it, JSON elsewhere.
fn too_many_requests(limiter: &RateLimiter, wait: Duration, plain: bool) -> Response {
    let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
    let msg = format!(
        "rate limit: more than {} requests per second (burst {}) from this client address; retry in \
         {secs} s (http.rate_limit_per_sec)",
        limiter.rate, limiter.burst
    );
    let mut resp = if plain {
        (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            msg,
        )
            .into_response()
    } else {
        json_error(StatusCode::TOO_MANY_REQUESTS, msg)
    };
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    resp
}

/// Requests per client: one token bucket per address group ([`address_group`]: an IPv6 client owns
/// its whole /64), `rate` per second sustained and `burst` at most (`http.rate_limit_per_sec`,
/// `http.rate_limit_burst`).
///
/// Memory stays bounded. A full bucket is the same as none, so every [`RateLimiter::PRUNE_EVERY`]
/// the full ones are dropped. Beyond [`RateLimiter::MAX_CLIENTS`] tracked addresses, new addresses
/// share one bucket: they are limited together rather than not at all, and no known client's bucket
/// is ever reset to let a flood through.
#[derive(Debug)]
pub struct RateLimiter {
    rate: usize,
    burst: usize,
    buckets: DashMap<IpAddr, TokenBucket>,
    /// Origin of `next_prune_ms`.
    epoch: Instant,
    next_prune_ms: AtomicU64,
    /// Requests refused since the last log line (one line per prune interval, not per request).
    refused: AtomicU64,
}

impl RateLimiter {
    /// Client addresses tracked one by one at most.
    pub const MAX_CLIENTS: usize = 65_536;
    /// How often full buckets are dropped (and refusals logged).
    pub const PRUNE_EVERY: Duration = Duration::from_secs(10);
    /// The bucket shared by the addresses beyond [`RateLimiter::MAX_CLIENTS`].
    const OVERFLOW: IpAddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);

    /// `per_sec` requests per second sustained, `burst` at once (both at least 1).
    pub fn new(per_sec: u32, burst: u32) -> Self {
        Self {
            rate: (per_sec as usize).max(1),
            burst: (burst as usize).max(1),
            buckets: DashMap::new(),
            epoch: Instant::now(),
            next_prune_ms: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// Take one request's token for `ip` at `now`; `Err(wait)`: refused, a token is there in `wait`.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        self.maybe_prune(now);
        let mut key = address_group(ip);
        // No map guard is held here: `len` and `retain` lock every shard.
        if self.buckets.len() >= Self::MAX_CLIENTS && !self.buckets.contains_key(&key) {
            self.prune(now);
            if self.buckets.len() >= Self::MAX_CLIENTS {
                key = Self::OVERFLOW;
            }
        }
        let mut bucket = self
            .buckets
            .entry(key)
            .or_insert_with(|| TokenBucket::new(self.rate, self.burst, now));
        if bucket.available(now) >= 1 {
            bucket.consume(1, now);
            return Ok(());
        }
        let wait = bucket.ready_at(1).saturating_duration_since(now);
        drop(bucket);
        self.refused.fetch_add(1, Ordering::Relaxed);
        Err(wait)
    }

    /// Client addresses currently tracked.
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }

    /// Prune once per [`RateLimiter::PRUNE_EVERY`] (whichever request comes first does it).
    fn maybe_prune(&self, now: Instant) {
        let now_ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        let due = self.next_prune_ms.load(Ordering::Relaxed);
        if now_ms < due {
            return;
        }
        let next = now_ms + Self::PRUNE_EVERY.as_millis() as u64;
        if self
            .next_prune_ms
            .compare_exchange(due, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        self.prune(now);
        let refused = self.refused.swap(0, Ordering::Relaxed);
        if refused > 0 {
            tracing::warn!(
                refused,
                clients = self.buckets.len(),
                "HTTP requests refused with 429 since the last report (http.rate_limit_per_sec)"
            );
        }
    }

    /// Drop the buckets that are full again (indistinguishable from a new one).
    fn prune(&self, now: Instant) {
        self.buckets.retain(|_, b| b.available(now) < b.burst());
    }
}

/// Every key the request presents, in all accepted spellings. `Authorization: Basic` is not a key.
fn presented_keys(headers: &HeaderMap, query: Option<&str>) -> Vec<Vec<u8>> {
    let mut keys = Vec::new();
    for v in headers.get_all(header::AUTHORIZATION) {
        let v = v.as_bytes();
        if v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ") {
            keys.push(v[7..].trim_ascii().to_vec());
        }
    }
    for name in ["x-api-key", "api-key"] {
        for v in headers.get_all(name) {
            keys.push(v.as_bytes().trim_ascii().to_vec());
        }
    }
    for pair in query.unwrap_or_default().split('&') {
        if let Some(v) = pair.strip_prefix("api-key=") {
            keys.push(percent_decode(v));
        }
    }
    keys.retain(|k| !k.is_empty());
    keys
}

/// Constant-time match against every configured key: the time taken does not depend on which key
/// matched or how many leading bytes were right (only on the lengths, which are not secret).
fn key_matches(keys: &[String], presented: &[u8]) -> bool {
    let mut ok = subtle::Choice::from(0);
    for k in keys {
        ok |= k.as_bytes().ct_eq(presented);
    }
    bool::from(ok)
}

/// `%XX` and `+` decoding of a query value; invalid escapes are kept literally.
fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok());
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_matching() {
        let n: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(n.contains("10.200.1.1".parse().unwrap()));
        assert!(n.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!n.contains("11.0.0.1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
        let host: Cidr = "::1".parse().unwrap();
        assert!(host.contains("::1".parse().unwrap()));
        assert!(!host.contains("::2".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nope/8".parse::<Cidr>().is_err());
    }

    #[test]
    fn key_spellings() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic YTpi"),
        );
        assert!(presented_keys(&h, None).is_empty());
        h.insert("x-api-key", HeaderValue::from_static("k1"));
        assert_eq!(
            presented_keys(&h, Some("a=b&api-key=k%32")),
            vec![b"k1".to_vec(), b"k2".to_vec()]
        );
        let keys = vec!["0123456789abcdef".to_string()];
        assert!(key_matches(&keys, b"0123456789abcdef"));
        assert!(!key_matches(&keys, b"0123456789abcdeF"));
        assert!(!key_matches(&keys, b""));
        assert_eq!(percent_decode("%zz%4"), b"%zz%4".to_vec());
    }

    #[test]
    fn rate_limiter_refuses_beyond_the_burst_and_refills() {
        let t0 = Instant::now();
        let l = RateLimiter::new(2, 3);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(l.check(a, t0), Ok(()));
        }
        let wait = l.check(a, t0).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        assert_eq!(l.check(b, t0), Ok(()), "another client has its own bucket");
        assert_eq!(l.check(a, t0 + Duration::from_millis(500)), Ok(()));
        assert!(l.check(a, t0 + Duration::from_millis(500)).is_err());
        // Two addresses of one IPv6 /64 share a bucket.
        let v6a: IpAddr = "2001:db8::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8::2".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(l.check(v6a, t0), Ok(()));
        }
        assert!(l.check(v6b, t0).is_err());
    }

    #[test]
    fn rate_limiter_forgets_idle_clients_and_stays_bounded() {
        let t0 = Instant::now();
        let l = RateLimiter::new(1000, 1000);
        for i in 0..100u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            assert_eq!(l.check(ip, t0), Ok(()));
        }
        // The first check pruned nothing yet and scheduled the next prune.
        assert_eq!(l.tracked(), 100);
        // Long enough later every bucket is full again: the next request prunes them all.
        let later = t0 + RateLimiter::PRUNE_EVERY + Duration::from_secs(1);
        let probe: IpAddr = "192.0.2.9".parse().unwrap();
        assert_eq!(l.check(probe, later), Ok(()));
        assert_eq!(l.tracked(), 1);

        // Beyond MAX_CLIENTS busy addresses, new ones share the overflow bucket.
        let l = RateLimiter::new(1, 1);
        for i in 0..RateLimiter::MAX_CLIENTS as u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            assert_eq!(l.check(ip, t0), Ok(()));
        }
        let n1: IpAddr = "198.51.100.1".parse().unwrap();
        let n2: IpAddr = "198.51.100.2".parse().unwrap();
        assert_eq!(l.check(n1, t0), Ok(()));
        assert!(l.check(n2, t0).is_err(), "shares n1's bucket");
        assert!(l.tracked() <= RateLimiter::MAX_CLIENTS + 1);
    }
}

//! API keys and the client network allow-list.
//!
//! A key is accepted in any of the spellings the management server's clients use: `Authorization:
//! Bearer KEY`, `X-Api-Key: KEY`, `Api-Key: KEY`, or Tigase's `?api-key=KEY`. HTTP Basic credentials
//! sent alongside (Tigase admin clients do) are ignored. Keys are compared in constant time against
//! every configured key, and never logged: nothing here formats a key or the query string.
//!
//! No key at all gives 401 with `WWW-Authenticate: Bearer`; a key that matches none gives 403; a
//! client outside `allow_networks` gets 403 before its key is even looked at.

use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use subtle::ConstantTimeEq;

use super::{HttpState, client_ip, json_error};

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

/// Middleware for every other route: allow-list, then a valid API key.
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
}

//! Connection-level limits that are not part of the XMPP state machine: the inbound byte-rate token
//! bucket (sans-IO: time passed in) and the per-IP concurrent connection cap.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;

/// A token bucket counting bytes: `rate` per second sustained, `burst` at most.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: usize,
    burst: usize,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    pub fn new(rate: usize, burst: usize, now: Instant) -> Self {
        Self {
            rate: rate.max(1),
            burst: burst.max(1),
            tokens: burst.max(1) as f64,
            updated: now,
        }
    }

    pub fn burst(&self) -> usize {
        self.burst
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate as f64).min(self.burst as f64);
        self.updated = now;
    }

    /// Whole bytes that may be read now.
    pub fn available(&mut self, now: Instant) -> usize {
        self.refill(now);
        self.tokens.max(0.0) as usize
    }

    /// Record `n` bytes read (may go negative: a read is never cut short after the fact).
    pub fn consume(&mut self, n: usize, now: Instant) {
        self.refill(now);
        self.tokens -= n as f64;
    }

    /// When `n` bytes will be available.
    pub fn ready_at(&self, n: usize) -> Instant {
        let missing = n as f64 - self.tokens;
        if missing <= 0.0 {
            return self.updated;
        }
        self.updated + Duration::from_secs_f64(missing / self.rate as f64)
    }
}

/// The unit a per-address limit applies to: IPv4 as is (IPv4-mapped IPv6 folded to IPv4), IPv6
/// truncated to its /64 — one IPv6 client usually owns a whole /64, so per-address limits on the
/// full 128 bits would not limit it at all.
pub fn address_group(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(bits.into())
            }
        },
    }
}

/// Counts open connections per source address group ([`address_group`]); a [`ConnPermit`] gives its slot back on drop.
#[derive(Debug, Default)]
pub struct IpLimiter {
    max: usize,
    open: DashMap<IpAddr, usize>,
}

/// Proof that a connection was admitted; releases the slot when dropped.
#[derive(Debug)]
pub struct ConnPermit {
    limiter: Arc<IpLimiter>,
    ip: IpAddr,
}

impl IpLimiter {
    /// `max` = 0 means unlimited.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            open: DashMap::new(),
        })
    }

    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<ConnPermit> {
        let ip = address_group(ip);
        let mut n = self.open.entry(ip).or_insert(0);
        if self.max > 0 && *n >= self.max {
            return None;
        }
        *n += 1;
        drop(n);
        Some(ConnPermit {
            limiter: self.clone(),
            ip,
        })
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        self.limiter.open.remove_if_mut(&self.ip, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refills_at_rate_up_to_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 4000, t0);
        assert_eq!(b.available(t0), 4000);
        b.consume(4000, t0);
        assert_eq!(b.available(t0), 0);
        assert_eq!(b.ready_at(500), t0 + Duration::from_millis(500));
        assert_eq!(b.available(t0 + Duration::from_millis(500)), 500);
        assert_eq!(b.available(t0 + Duration::from_secs(60)), 4000);
    }

    #[test]
    fn ip_limiter_caps_and_releases() {
        let l = IpLimiter::new(2);
        let ip: IpAddr = "127.0.0.2".parse().unwrap();
        let a = l.try_acquire(ip).unwrap();
        let _b = l.try_acquire(ip).unwrap();
        assert!(l.try_acquire(ip).is_none());
        assert!(l.try_acquire("127.0.0.3".parse().unwrap()).is_some());
        drop(a);
        let _a2 = l.try_acquire(ip).unwrap();
        // One IPv6 /64 is one client; IPv4-mapped addresses count as the IPv4 address.
        let _c = l.try_acquire("2001:db8::1".parse().unwrap()).unwrap();
        let _d = l.try_acquire("2001:db8::2".parse().unwrap()).unwrap();
        assert!(l.try_acquire("2001:db8::ffff".parse().unwrap()).is_none());
        assert!(l.try_acquire("::ffff:127.0.0.2".parse().unwrap()).is_none());
    }
}

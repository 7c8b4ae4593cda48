//! Which peers the relay may send to (RFC 8656 §21.3 and §21.1.1: a TURN server is an open door into
//! the network it sits in; issue 4 "abuse protection").
//!
//! By default relaying to anything that is not a public unicast address is refused: loopback, the
//! RFC 1918 and RFC 6598 private ranges, link-local, multicast, reserved and special-purpose ranges,
//! `::`, `::1`, unique-local and site-local IPv6. IPv6 addresses that carry an IPv4 address
//! (IPv4-mapped, IPv4-compatible, SIIT IPv4-translated, NAT64 well-known prefix, 6to4) are judged by
//! that IPv4 address ([`normalize`]), so `::ffff:127.0.0.1` or `64:ff9b::a00:1` cannot be used to
//! reach what `127.0.0.1` or `10.0.0.1` may not.
//!
//! Two transition ranges are refused as a whole rather than decoded:
//! - Teredo `2001::/32` (RFC 4380): where a packet ends up depends on both the embedded server and
//!   the obfuscated client address, and the service is obsolete;
//! - NAT64 local-use `64:ff9b:1::/48` (RFC 8215): the IPv4 embedding depends on the prefix length
//!   the operator chose (RFC 6052 §2.2), so it cannot be decoded unambiguously, and as a local-use
//!   prefix it never names a public peer.
//!
//! `[turn] allow_peers` reopens default-denied networks (a local test peer on `127.0.0.0/8`, or the
//! Teredo prefix); `[turn] deny_peers` refuses more, and wins over everything. Both are matched
//! against the address as sent and against its normalized form, so `::1/128` or `2002::/16` work
//! as written and an IPv4 network also covers the IPv6 forms embedding it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::http::Cidr;

/// IPv4 networks refused by default, with the reason logged for a refusal.
const DENIED_V4: &[(Ipv4Addr, u8, &str)] = &[
    (Ipv4Addr::new(0, 0, 0, 0), 8, "\"this\" network (RFC 791)"),
    (Ipv4Addr::new(10, 0, 0, 0), 8, "private (RFC 1918)"),
    (
        Ipv4Addr::new(100, 64, 0, 0),
        10,
        "shared CGN space (RFC 6598)",
    ),
    (Ipv4Addr::new(127, 0, 0, 0), 8, "loopback (RFC 1122)"),
    (Ipv4Addr::new(169, 254, 0, 0), 16, "link-local (RFC 3927)"),
    (Ipv4Addr::new(172, 16, 0, 0), 12, "private (RFC 1918)"),
    (
        Ipv4Addr::new(192, 0, 0, 0),
        24,
        "IETF protocol assignments (RFC 6890)",
    ),
    (Ipv4Addr::new(192, 168, 0, 0), 16, "private (RFC 1918)"),
    (Ipv4Addr::new(198, 18, 0, 0), 15, "benchmarking (RFC 2544)"),
    (Ipv4Addr::new(224, 0, 0, 0), 4, "multicast (RFC 5771)"),
    // Also holds the limited broadcast address 255.255.255.255 (RFC 919).
    (Ipv4Addr::new(240, 0, 0, 0), 4, "reserved (RFC 1112)"),
];

/// IPv6 networks refused by default (after [`normalize`], so the IPv4-embedding ranges are judged
/// by their IPv4 address instead).
const DENIED_V6: &[(Ipv6Addr, u8, &str)] = &[
    (Ipv6Addr::UNSPECIFIED, 128, "unspecified (RFC 4291)"),
    (Ipv6Addr::LOCALHOST, 128, "loopback (RFC 4291)"),
    (
        Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0),
        7,
        "unique local (RFC 4193)",
    ),
    (
        Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0),
        10,
        "link-local (RFC 4291)",
    ),
    (
        Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0),
        10,
        "site-local (RFC 3879)",
    ),
    (
        Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0),
        8,
        "multicast (RFC 4291)",
    ),
    (
        Ipv6Addr::new(0x2001, 0, 0, 0, 0, 0, 0, 0),
        32,
        "Teredo (RFC 4380)",
    ),
    (
        Ipv6Addr::new(0x64, 0xff9b, 1, 0, 0, 0, 0, 0),
        48,
        "local-use NAT64 (RFC 8215)",
    ),
];

/// Why a peer is refused when it is in `[turn] deny_peers`.
pub const DENIED_BY_CONFIG: &str = "turn.deny_peers";

fn v4_in(ip: Ipv4Addr, net: Ipv4Addr, prefix: u8) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    u32::from(ip) & mask == u32::from(net) & mask
}

fn v6_in(ip: Ipv6Addr, net: Ipv6Addr, prefix: u8) -> bool {
    let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
    u128::from(ip) & mask == u128::from(net) & mask
}

/// The address a peer is judged by: the IPv4 address an IPv6 address embeds, or the address
/// itself. Decoded forms:
/// - IPv4-mapped `::ffff:a.b.c.d` (RFC 4291 §2.5.5.2), the same host as `a.b.c.d`;
/// - IPv4-compatible `::a.b.c.d` (RFC 4291 §2.5.5.1, deprecated), except `::` and `::1`, which are
///   IPv6's own unspecified and loopback addresses;
/// - SIIT IPv4-translated `::ffff:0:a.b.c.d` (RFC 2765 §2.1);
/// - NAT64 well-known prefix `64:ff9b::/96` (RFC 6052 §2.1), the IPv4 host behind the translator;
/// - 6to4 `2002:AABB:CCDD::/48` (RFC 3056 §2), the IPv4 router `AA.BB.CC.DD` the packet is sent to.
///
/// Teredo and NAT64 local-use are not decoded (see the module docs).
pub fn normalize(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip else {
        return ip;
    };
    let bits = u128::from(v6);
    let low32 = IpAddr::V4(Ipv4Addr::from(bits as u32));
    match bits >> 32 {
        // ::/96 IPv4-compatible; `::` and `::1` stay IPv6.
        0 if bits > 1 => low32,
        // ::ffff:0:0/96 IPv4-mapped.
        0xffff => low32,
        // ::ffff:0:0:0/96 IPv4-translated.
        0xffff_0000 => low32,
        // 64:ff9b::/96 NAT64 well-known prefix.
        0x0064_ff9b_0000_0000_0000_0000 => low32,
        _ if bits >> 112 == 0x2002 => IpAddr::V4(Ipv4Addr::from((bits >> 80) as u32)),
        _ => ip,
    }
}

/// The default-denied range `ip` is in, if any (no normalization here).
fn default_denial(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(a) => DENIED_V4
            .iter()
            .find(|(net, prefix, _)| v4_in(a, *net, *prefix))
            .map(|(_, _, why)| *why),
        IpAddr::V6(a) => DENIED_V6
            .iter()
            .find(|(net, prefix, _)| v6_in(a, *net, *prefix))
            .map(|(_, _, why)| *why),
    }
}

/// Which peers may be relayed to (RFC 8656 §21 security considerations; issue 4 "abuse
/// protection"). Precedence: `deny_peers` wins over everything; then `allow_peers` overrides the
/// default denials; then the default denials; everything else is permitted. Checked on every relay
/// path (CreatePermission, ChannelBind, Send): a refusal is a 403.
#[derive(Debug, Clone, Default)]
pub struct PeerFilter {
    allow: Vec<Cidr>,
    deny: Vec<Cidr>,
}

impl PeerFilter {
    /// `allow`/`deny`: CIDR strings from `turn.allow_peers` / `turn.deny_peers` (a plain address is a
    /// single host); an error names the key and the bad entry.
    pub fn new(allow: &[String], deny: &[String]) -> Result<Self, String> {
        fn parse(key: &str, list: &[String]) -> Result<Vec<Cidr>, String> {
            list.iter()
                .map(|s| {
                    s.parse::<Cidr>().map_err(|e| {
                        format!("{key}: `{s}`: {e} (expected CIDR such as `10.0.0.0/8`)")
                    })
                })
                .collect()
        }
        Ok(Self {
            allow: parse("turn.allow_peers", allow)?,
            deny: parse("turn.deny_peers", deny)?,
        })
    }

    /// Whether relaying to `peer` is allowed.
    pub fn permits(&self, peer: IpAddr) -> bool {
        self.refusal(peer).is_none()
    }

    /// Why relaying to `peer` is refused (for the log line and metric label): [`DENIED_BY_CONFIG`]
    /// or the default-denied range; `None` when it is permitted.
    pub fn refusal(&self, peer: IpAddr) -> Option<&'static str> {
        let canon = normalize(peer);
        let matches = |nets: &[Cidr]| nets.iter().any(|n| n.contains(peer) || n.contains(canon));
        if matches(&self.deny) {
            return Some(DENIED_BY_CONFIG);
        }
        if matches(&self.allow) {
            return None;
        }
        default_denial(canon).or_else(|| default_denial(peer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn filter(allow: &[&str], deny: &[&str]) -> PeerFilter {
        let v = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        PeerFilter::new(&v(allow), &v(deny)).expect("valid filter")
    }

    #[test]
    fn private_and_special_ranges_denied_by_default() {
        let f = PeerFilter::default();
        for a in [
            "127.0.0.1",
            "127.255.255.254",
            "10.0.0.1",
            "172.16.5.4",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.255",
            "169.254.1.1",
            "224.0.0.1",
            "239.255.255.250",
            "0.0.0.0",
            "0.1.2.3",
            "240.0.0.1",
            "255.255.255.255",
            "192.0.0.8",
            "198.18.0.1",
            "198.19.255.255",
            "::1",
            "::",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:0:a00:1",
            "::a00:1",
            "64:ff9b::7f00:1",
            "64:ff9b::a00:1",
            "64:ff9b::c0a8:101",
            "64:ff9b:1::808:808",
            "2002:7f00:1::1",
            "2002:a00:1::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "fe80::1",
            "fc00::1",
            "fd12:3456::1",
            "fec0::1",
            "ff02::1",
            "ff0e::1",
        ] {
            assert!(!f.permits(ip(a)), "{a} must be refused by default");
            assert!(f.refusal(ip(a)).is_some(), "{a}");
        }
    }

    #[test]
    fn public_addresses_permitted() {
        let f = PeerFilter::default();
        for a in [
            "8.8.8.8",
            "1.1.1.1",
            "100.63.255.255",
            "100.128.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "192.0.1.1",
            "198.17.255.255",
            "198.20.0.0",
            "223.255.255.255",
            "2001:4860:4860::8888",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert!(f.permits(ip(a)), "{a} must be permitted");
        }
    }

    #[test]
    fn normalization() {
        assert_eq!(normalize(ip("::ffff:1.2.3.4")), ip("1.2.3.4"));
        assert_eq!(normalize(ip("::1.2.3.4")), ip("1.2.3.4"));
        assert_eq!(normalize(ip("::ffff:0:1.2.3.4")), ip("1.2.3.4"));
        assert_eq!(normalize(ip("64:ff9b::1.2.3.4")), ip("1.2.3.4"));
        assert_eq!(normalize(ip("2002:102:304:5::6")), ip("1.2.3.4"));
        for unchanged in [
            "::",
            "::1",
            "1.2.3.4",
            "2001::1",
            "64:ff9b:1::1.2.3.4",
            "2001:db8::1",
        ] {
            assert_eq!(normalize(ip(unchanged)), ip(unchanged), "{unchanged}");
        }
    }

    #[test]
    fn allow_peers_reopens_default_denials() {
        let f = filter(&["127.0.0.0/8"], &[]);
        assert!(f.permits(ip("127.0.0.1")));
        assert!(f.permits(ip("::ffff:127.0.0.1")));
        assert!(f.permits(ip("64:ff9b::7f00:1")));
        assert!(!f.permits(ip("10.0.0.1")));
        assert!(!f.permits(ip("::1")));
        // Matched against the address as written too.
        let f = filter(&["::1/128", "2001::/32"], &[]);
        assert!(f.permits(ip("::1")));
        assert!(f.permits(ip("2001:0:4136:e378:8000:63bf:3fff:fdd2")));
        assert!(!f.permits(ip("127.0.0.1")));
        assert!(!f.permits(ip("::")));
    }

    #[test]
    fn deny_peers_wins_over_everything() {
        let f = filter(&["8.8.8.0/24", "127.0.0.0/8"], &["8.8.8.0/24", "127.0.0.2"]);
        assert!(!f.permits(ip("8.8.8.8")));
        assert_eq!(f.refusal(ip("8.8.8.8")), Some(DENIED_BY_CONFIG));
        assert!(!f.permits(ip("::ffff:8.8.8.8")));
        assert!(!f.permits(ip("64:ff9b::808:808")));
        assert!(!f.permits(ip("2002:808:808::1")));
        assert!(f.permits(ip("8.8.4.4")));
        assert!(f.permits(ip("127.0.0.1")));
        assert!(!f.permits(ip("127.0.0.2")));
        let f = filter(&[], &["2002::/16", "2001:db8::/32"]);
        assert!(!f.permits(ip("2002:808:808::1")));
        assert!(!f.permits(ip("2001:db8::5")));
        assert!(f.permits(ip("8.8.8.8")));
    }

    #[test]
    fn bad_cidr_is_named() {
        let err = PeerFilter::new(&["10.0.0.0/8".into(), "10.0.0.0/33".into()], &[])
            .expect_err("bad prefix");
        assert!(
            err.contains("turn.allow_peers") && err.contains("10.0.0.0/33"),
            "{err}"
        );
        let err = PeerFilter::new(&[], &["nope".into()]).expect_err("not an address");
        assert!(
            err.contains("turn.deny_peers") && err.contains("`nope`"),
            "{err}"
        );
    }
}

//! XEP-0215 External Service Discovery (`urn:xmpp:extdisco:2`): tells clients where the STUN/TURN
//! servers are and hands out short-lived TURN credentials minted from the TURN REST secret, so a
//! remote-control tool logged in over XMPP can allocate a relay without any other provisioning.
//!
//! Services: the embedded server (STUN and TURN over UDP, TURN over TCP on the same port, TURNS on
//! the direct-TLS XMPP port with ALPN `stun.turn`), then the `turn.external_services` entries. Our
//! own TURN entries carry `username`/`password`/`expires` (§3.2: credentials may come with the
//! service list) and `restricted='1'`; `<credentials/>` (§3.3) mints fresh ones for one service.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use jid::BareJid;
use minidom::Element;
use xmpp_parsers::stanza_error::DefinedCondition;

use super::framer::escape;
use crate::turn::auth::Credentials;

pub const NS_EXTDISCO: &str = "urn:xmpp:extdisco:2";

/// One announced service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// `stun`, `stuns`, `turn` or `turns`.
    pub kind: String,
    pub host: String,
    pub port: u16,
    /// `udp` or `tcp`.
    pub transport: String,
    /// Credentials are minted for it (the embedded server's TURN entries).
    pub ours: bool,
}

/// What the server announces; built once at startup.
pub struct ExtDisco {
    services: Vec<Service>,
    credentials: Arc<Credentials>,
    ttl: Duration,
}

impl std::fmt::Debug for ExtDisco {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExtDisco")
            .field("services", &self.services)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl ExtDisco {
    /// `host`: what clients reach the embedded server at; `turn_port` its UDP/TCP port, `tcp` whether
    /// TURN over TCP runs there; `tls_port` the first direct-TLS listener (TURNS); `external`: the
    /// `turn.external_services` entries, `type:host:port[:transport]` (validated by the config).
    pub fn new(
        host: String,
        turn_port: u16,
        tcp: bool,
        tls_port: Option<(String, u16)>,
        external: &[String],
        credentials: Arc<Credentials>,
        ttl: Duration,
    ) -> Self {
        let svc = |kind: &str, host: &str, port, transport: &str, ours| Service {
            kind: kind.into(),
            host: host.into(),
            port,
            transport: transport.into(),
            ours,
        };
        let mut services = vec![
            svc("stun", &host, turn_port, "udp", false),
            svc("turn", &host, turn_port, "udp", true),
        ];
        if tcp {
            services.push(svc("turn", &host, turn_port, "tcp", true));
            // TLS needs a name the certificate covers: the XMPP domain, not an address.
            if let Some((name, port)) = &tls_port {
                services.push(svc("turns", name, *port, "tcp", true));
            }
        }
        for e in external {
            let parts: Vec<&str> = e.split(':').collect();
            if let [kind, host, port, rest @ ..] = parts.as_slice()
                && let Ok(port) = port.parse()
            {
                let transport = rest.first().copied().unwrap_or(match *kind {
                    "stuns" | "turns" => "tcp",
                    _ => "udp",
                });
                services.push(svc(kind, host, port, transport, false));
            }
        }
        Self {
            services,
            credentials,
            ttl,
        }
    }

    pub fn services(&self) -> &[Service] {
        &self.services
    }

    /// `<services/>` (§3.1), optionally only of one `type`, with credentials for `user` on ours.
    pub fn services_result(
        &self,
        user: &BareJid,
        type_filter: Option<&str>,
        wall: SystemTime,
    ) -> Element {
        let creds = self.mint(user, wall);
        let children: String = self
            .services
            .iter()
            .filter(|s| type_filter.is_none_or(|t| s.kind == t))
            .map(|s| service_xml(s, creds.as_ref()))
            .collect();
        let attr = type_filter
            .map(|t| format!(" type='{}'", escape(t)))
            .unwrap_or_default();
        element(&format!(
            "<services xmlns='{NS_EXTDISCO}'{attr}>{children}</services>"
        ))
    }

    /// `<credentials/>` (§3.3): fresh credentials for the requested service (by host, type and
    /// optionally port); `item-not-found` for a service we do not mint for.
    pub fn credentials_result(
        &self,
        user: &BareJid,
        request: &Element,
        wall: SystemTime,
    ) -> Result<Element, DefinedCondition> {
        let wanted = request
            .get_child("service", NS_EXTDISCO)
            .ok_or(DefinedCondition::BadRequest)?;
        let host = wanted.attr("host").ok_or(DefinedCondition::BadRequest)?;
        let kind = wanted.attr("type").ok_or(DefinedCondition::BadRequest)?;
        let port: Option<u16> = wanted.attr("port").and_then(|p| p.parse().ok());
        let found: Vec<&Service> = self
            .services
            .iter()
            .filter(|s| {
                s.ours && s.host == host && s.kind == kind && port.is_none_or(|p| p == s.port)
            })
            .collect();
        if found.is_empty() {
            return Err(DefinedCondition::ItemNotFound);
        }
        let creds = self.mint(user, wall);
        let children: String = found
            .into_iter()
            .map(|s| service_xml(s, creds.as_ref()))
            .collect();
        Ok(element(&format!(
            "<credentials xmlns='{NS_EXTDISCO}'>{children}</credentials>"
        )))
    }

    fn mint(&self, user: &BareJid, wall: SystemTime) -> Option<(String, String, SystemTime)> {
        self.credentials.mint(user.as_str(), self.ttl, wall)
    }
}

/// One `<service/>` (§3.1), with credentials when it is ours.
fn service_xml(s: &Service, creds: Option<&(String, String, SystemTime)>) -> String {
    let mut out = format!(
        "<service type='{}' host='{}' port='{}' transport='{}'",
        escape(&s.kind),
        escape(&s.host),
        s.port,
        escape(&s.transport)
    );
    if s.ours
        && let Some((username, password, expires)) = creds
    {
        out.push_str(&format!(
            " username='{}' password='{}' expires='{}' restricted='1'",
            escape(username),
            escape(password),
            crate::http::rfc3339(*expires)
        ));
    }
    out.push_str("/>");
    out
}

/// Parse XML built here from escaped parts (an empty element if that ever failed).
fn element(xml: &str) -> Element {
    xml.parse()
        .unwrap_or_else(|_| Element::bare("services", NS_EXTDISCO))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disco() -> ExtDisco {
        let creds = Arc::new(Credentials::new(
            vec!["0123456789abcdef-secret".into()],
            Vec::new(),
        ));
        ExtDisco::new(
            "192.0.2.7".into(),
            3478,
            true,
            Some(("example.com".into(), 443)),
            &[
                "turn:turn.example.net:3478:udp".into(),
                "stun:stun.example.net:19302".into(),
            ],
            creds,
            Duration::from_secs(3600),
        )
    }

    #[test]
    fn services_carry_credentials_for_our_turn_entries_only() {
        let x = disco();
        let me = BareJid::new("tool@example.com").unwrap();
        let wall = std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let el = x.services_result(&me, None, wall);
        let services: Vec<&Element> = el.children().collect();
        let desc: Vec<String> = services
            .iter()
            .map(|s| {
                format!(
                    "{}:{}:{}:{}:{}",
                    s.attr("type").unwrap(),
                    s.attr("host").unwrap(),
                    s.attr("port").unwrap(),
                    s.attr("transport").unwrap(),
                    s.attr("username").is_some()
                )
            })
            .collect();
        assert_eq!(
            desc,
            [
                "stun:192.0.2.7:3478:udp:false",
                "turn:192.0.2.7:3478:udp:true",
                "turn:192.0.2.7:3478:tcp:true",
                "turns:example.com:443:tcp:true",
                "turn:turn.example.net:3478:udp:false",
                "stun:stun.example.net:19302:udp:false",
            ]
        );
        let turn = services[1];
        assert_eq!(turn.attr("username"), Some("1800003600:tool@example.com"));
        assert_eq!(turn.attr("restricted"), Some("1"));
        assert_eq!(turn.attr("expires"), Some("2027-01-15T09:00:00Z"));
        let filtered = x.services_result(&me, Some("stun"), wall);
        assert_eq!(filtered.attr("type"), Some("stun"));
        assert_eq!(filtered.children().count(), 2);
    }

    #[test]
    fn credentials_for_one_service() {
        let x = disco();
        let me = BareJid::new("tool@example.com").unwrap();
        let wall = SystemTime::now();
        let req: Element = "<credentials xmlns='urn:xmpp:extdisco:2'><service host='192.0.2.7' type='turn'/></credentials>"
            .parse()
            .unwrap();
        let el = x.credentials_result(&me, &req, wall).expect("ours");
        assert_eq!(el.children().count(), 2, "udp and tcp on that host");
        assert!(el.children().all(|s| s.attr("password").is_some()));
        let other: Element = "<credentials xmlns='urn:xmpp:extdisco:2'><service host='turn.example.net' type='turn'/></credentials>"
            .parse()
            .unwrap();
        assert_eq!(
            x.credentials_result(&me, &other, wall),
            Err(DefinedCondition::ItemNotFound)
        );
        let empty: Element = "<credentials xmlns='urn:xmpp:extdisco:2'/>"
            .parse()
            .unwrap();
        assert_eq!(
            x.credentials_result(&me, &empty, wall),
            Err(DefinedCondition::BadRequest)
        );
    }
}

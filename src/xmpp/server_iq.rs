//! IQs the server answers itself: those addressed to the domain, to no one (RFC 6120 §10.3.3), or to the
//! account's own bare JID (RFC 6121 §8.5.2.1.3). Only these stanzas are parsed into `xmpp-parsers` types;
//! everything routed stays raw bytes.

use std::collections::BTreeSet;

use jid::{FullJid, Jid};
use minidom::Element;
use xmpp_parsers::disco::{
    DiscoInfoQuery, DiscoInfoResult, DiscoItemsQuery, DiscoItemsResult, Identity,
};
use xmpp_parsers::iq::Iq;
use xmpp_parsers::ping::Ping;
use xmpp_parsers::roster::Roster;
use xmpp_parsers::stanza_error::{DefinedCondition, ErrorType, StanzaError};

use super::c2s::parse_element;
use super::extdisco::{ExtDisco, NS_EXTDISCO};
use super::framer::Stanza;

/// Features advertised in disco#info for the server (XEP-0030 §3.1).
pub const SERVER_FEATURES: &[&str] = &[
    "http://jabber.org/protocol/disco#info",
    "http://jabber.org/protocol/disco#items",
    "urn:xmpp:ping",
    "jabber:iq:roster",
    "urn:ietf:params:xml:ns:xmpp-session",
];

/// Answer an iq for the server or the account itself; `None` for results/errors (e.g. a pong), which
/// need no answer. `to` is the parsed `to` attribute (None = the server on the account's behalf).
pub fn handle(
    stanza: &Stanza,
    me: &FullJid,
    domain: &str,
    to: Option<&Jid>,
    extdisco: Option<&ExtDisco>,
) -> Option<String> {
    let el = match parse_element(stanza) {
        Ok(el) => el,
        Err(_) => return error_reply(stanza, me, DefinedCondition::BadRequest),
    };
    let iq = match Iq::try_from(el) {
        Ok(iq) => iq,
        // Malformed iq (e.g. a get without exactly one child): RFC 6120 §8.2.3.
        Err(_) => return error_reply(stanza, me, DefinedCondition::BadRequest),
    };
    let (id, payload, is_get) = match iq {
        Iq::Get { id, payload, .. } => (id, payload, true),
        Iq::Set { id, payload, .. } => (id, payload, false),
        Iq::Result { .. } | Iq::Error { .. } => return None,
    };
    let to_server = to.is_none_or(|t| t.node().is_none());
    // Addressed to no one, or to the account's own bare JID (RFC 6121 §2.1.3 roster requests).
    let own = to.is_none_or(|t| t.to_bare() == me.to_bare());
    let from: Option<Jid> = to.cloned();
    let result: Result<Option<Element>, DefinedCondition> =
        match (is_get, payload.ns().as_str(), payload.name()) {
            (true, "urn:xmpp:ping", "ping") if Ping::try_from(payload.clone()).is_ok() => Ok(None),
            (true, "http://jabber.org/protocol/disco#info", "query") => {
                match DiscoInfoQuery::try_from(payload) {
                    Ok(q) if q.node.is_none() => {
                        Ok(Some(disco_info(to_server, extdisco.is_some()).into()))
                    }
                    Ok(_) => Err(DefinedCondition::ItemNotFound),
                    Err(_) => Err(DefinedCondition::BadRequest),
                }
            }
            (true, "http://jabber.org/protocol/disco#items", "query") => {
                match DiscoItemsQuery::try_from(payload) {
                    Ok(q) if q.node.is_none() => Ok(Some(
                        DiscoItemsResult {
                            node: None,
                            items: Vec::new(),
                            rsm: None,
                        }
                        .into(),
                    )),
                    Ok(_) => Err(DefinedCondition::ItemNotFound),
                    Err(_) => Err(DefinedCondition::BadRequest),
                }
            }
            // XEP-0215 §3.1 / §3.3: STUN/TURN services and credentials, from the server only.
            (true, NS_EXTDISCO, "services") if to_server => match extdisco {
                Some(x) => Ok(Some(x.services_result(
                    &me.to_bare(),
                    payload.attr("type"),
                    std::time::SystemTime::now(),
                ))),
                None => Err(DefinedCondition::ServiceUnavailable),
            },
            (true, NS_EXTDISCO, "credentials") if to_server => match extdisco {
                Some(x) => x
                    .credentials_result(&me.to_bare(), &payload, std::time::SystemTime::now())
                    .map(Some),
                None => Err(DefinedCondition::ServiceUnavailable),
            },
            // RFC 6121 §2.1.3: roster get. Tern keeps no rosters yet, so the roster is empty.
            (true, "jabber:iq:roster", "query") if own => Ok(Some(
                Roster {
                    ver: None,
                    items: Vec::new(),
                }
                .into(),
            )),
            // Roster pushes are not supported: RFC 6121 §2.3.3 allows refusing.
            (false, "jabber:iq:roster", "query") if own => Err(DefinedCondition::NotAllowed),
            // RFC 6121 §2.1.5: another user's roster is not for this client.
            (_, "jabber:iq:roster", "query") => Err(DefinedCondition::Forbidden),
            // RFC 3921 §3 legacy session establishment; RFC 6121 Appendix E: answer with success.
            (false, "urn:ietf:params:xml:ns:xmpp-session", "session") => Ok(None),
            // Re-binding after the session is bound is not allowed (RFC 6120 §7.7.2.2).
            (false, "urn:ietf:params:xml:ns:xmpp-bind", "bind") => {
                Err(DefinedCondition::NotAllowed)
            }
            _ => Err(DefinedCondition::ServiceUnavailable),
        };
    let reply = match result {
        Ok(payload) => Iq::Result {
            from: from
                .or_else(|| Jid::new(domain).ok())
                .filter(|_| to.is_some()),
            to: Some(Jid::from(me.clone())),
            id,
            payload,
        },
        Err(cond) => Iq::Error {
            from,
            to: Some(Jid::from(me.clone())),
            id,
            error: stanza_error(cond),
            payload: None,
        },
    };
    Some(String::from(&Element::from(reply)))
}

fn disco_info(server: bool, extdisco: bool) -> DiscoInfoResult {
    let (identity, features): (Identity, BTreeSet<String>) = if server {
        (
            Identity::new_anonymous::<_, _, String, String>("server", "im"),
            SERVER_FEATURES
                .iter()
                .copied()
                .chain(extdisco.then_some(NS_EXTDISCO))
                .map(str::to_string)
                .collect(),
        )
    } else {
        // XEP-0030 §3.1: the account itself.
        (
            Identity::new_anonymous::<_, _, String, String>("account", "registered"),
            ["http://jabber.org/protocol/disco#info".to_string()].into(),
        )
    };
    DiscoInfoResult {
        node: None,
        identities: vec![identity],
        features,
        extensions: Vec::new(),
    }
}

fn stanza_error(cond: DefinedCondition) -> StanzaError {
    let type_ = match cond {
        DefinedCondition::BadRequest => ErrorType::Modify,
        _ => ErrorType::Cancel,
    };
    StanzaError {
        type_,
        by: None,
        defined_condition: cond,
        texts: Default::default(),
        other: None,
    }
}

fn error_reply(stanza: &Stanza, me: &FullJid, cond: DefinedCondition) -> Option<String> {
    if matches!(stanza.stanza_type().as_deref(), Some("result" | "error")) {
        return None;
    }
    let id = stanza.id().map(|s| s.into_owned()).unwrap_or_default();
    let reply = Iq::Error {
        from: None,
        to: Some(Jid::from(me.clone())),
        id,
        error: stanza_error(cond),
        payload: None,
    };
    Some(String::from(&Element::from(reply)))
}

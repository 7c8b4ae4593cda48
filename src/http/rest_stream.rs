//! Tigase-compatible `POST /rest/stream/` and `POST /rest/stream/{jid}`: the body is one raw XML stanza.
//!
//! Behaviour, chosen to match what Tigase's clients rely on:
//! - The body must be `application/xml` or `text/xml` (415 otherwise) and exactly one `<message>`,
//!   `<presence>` or `<iq>` in the restricted XML a c2s client may send (parsed by the c2s
//!   [`Framer`], same size and depth limits); an XML declaration in front is allowed. Empty or invalid
//!   → 400 with a plain-text message.
//! - `{jid}` in the path is the recipient when the stanza has no `to`; a `to` in the stanza wins.
//!   Only JIDs of this domain with a local part can be addressed (400 otherwise: no s2s).
//! - A missing `from` becomes the service JID (the domain). A `from` of another domain is refused
//!   with 403: the API speaks for this server only. Any JID of the domain is allowed for messages and
//!   presence (the management server may send as a service account), but an `<iq>`'s `from` must be
//!   the domain (optionally with a resource), or its reply would not come back to the server.
//! - message/presence → 200 with an empty body whatever happened, as Tigase does; the outcome is in
//!   the `X-Tern-Delivery` header (`delivered`, `queued`, `offline`, `queue-full`). Messages nobody
//!   online takes (with or without a `<body>`) are stored in the durable queue through
//!   `api::deliver`, the same path `POST /api/v1/push` uses. Each message is a push with a
//!   fresh id and the default TTL (`queue.default_ttl_secs`), also when delivered live, so a
//!   stream-management session can acknowledge it or put it back into the queue.
//! - `<iq type='get|set'>` → sent with a fresh unguessable id (`tern-http-<uuid>`), so that concurrent
//!   requests reusing an id cannot collide and no one can forge the reply; the reply (stamped with the
//!   replier's real full JID by the c2s session) is returned as `application/xml` 200 with the
//!   client's original id put back (our generated id when the client sent none). No reply within
//!   `iq_timeout` → a `remote-server-timeout` (type `wait`) iq error, 200, as Tigase does; recipient
//!   not connected → `service-unavailable`; its queue full → `resource-constraint`.
//! - `<iq type='result|error'>` is routed like a message (200, empty).

use std::borrow::Cow;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use jid::Jid;
use quick_xml::events::Event as XmlEvent;

use super::api::{Outcome, deliver};
use super::{BodyError, HttpState, media_type, read_body};
use crate::xmpp::c2s::stanza_error;
use crate::xmpp::framer::{Event, Framer, FramerLimits, Stanza, escape};
use crate::xmpp::router::{Delivery, Kind, MessageType};

/// The synthetic stream header posted XML is parsed under, so it gets the c2s rules and namespace.
const STREAM_HEADER: &[u8] = b"<stream:stream xmlns='jabber:client' \
    xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>";

/// `POST /rest/stream/`: the recipient comes from the stanza's `to`.
pub async fn post_stream(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(&state, &headers, None, body).await
}

/// `POST /rest/stream/{jid}`: `jid` is the recipient when the stanza has no `to`.
pub async fn post_stream_to(
    State(state): State<Arc<HttpState>>,
    Path(jid): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(&state, &headers, Some(jid), body).await
}

/// A plain-text error, as Tigase clients expect from this endpoint.
fn plain(status: StatusCode, msg: impl Into<String>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        msg.into(),
    )
        .into_response()
}

fn xml_reply(stanza: impl Into<Bytes>) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/xml; charset=utf-8")],
        stanza.into(),
    )
        .into_response()
}

async fn handle(
    state: &HttpState,
    headers: &HeaderMap,
    path_jid: Option<String>,
    body: Body,
) -> Response {
    match media_type(headers).as_deref() {
        Some("application/xml" | "text/xml") => {}
        other => {
            return plain(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "Content-Type must be application/xml or text/xml, not {}",
                    other.unwrap_or("(none)")
                ),
            );
        }
    }
    let body = match read_body(headers, body, state.max_body).await {
        Ok(b) => b,
        Err(BodyError::TooLarge(max)) => {
            return plain(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body larger than {max} bytes (http.max_body_bytes)"),
            );
        }
        Err(BodyError::Read(e)) => {
            return plain(StatusCode::BAD_REQUEST, format!("cannot read body: {e}"));
        }
    };
    let stanza = match parse_stanza(state.limits, &body) {
        Ok(s) => s,
        Err(e) => return plain(e.status(), e.to_string()),
    };
    let kind = match stanza.name() {
        "message" => Kind::Message(MessageType::parse(stanza.stanza_type().as_deref())),
        "presence" => Kind::Presence,
        "iq" => Kind::Iq,
        other => {
            return plain(
                StatusCode::BAD_REQUEST,
                format!("<{other}> is not a stanza: post one <message>, <presence> or <iq>"),
            );
        }
    };
    let has_to = stanza.to().is_some();
    let Some(to_str) = stanza.to().map(Cow::into_owned).or(path_jid) else {
        return plain(
            StatusCode::BAD_REQUEST,
            "no recipient: the stanza has no `to` and the path names no JID",
        );
    };
    let to = match Jid::new(&to_str) {
        Ok(j) => j,
        Err(e) => {
            return plain(
                StatusCode::BAD_REQUEST,
                format!("invalid JID `{to_str}`: {e}"),
            );
        }
    };
    if to.domain().as_str() != state.domain {
        return plain(
            StatusCode::BAD_REQUEST,
            format!(
                "unknown domain in `{to}`: this server delivers only to {}",
                state.domain
            ),
        );
    }
    if to.node().is_none() {
        return plain(
            StatusCode::BAD_REQUEST,
            format!("`{to}` is the server itself: address a user JID"),
        );
    }
    let from = match stanza.from() {
        None => state.domain.clone(),
        Some(f) => match Jid::new(&f) {
            Err(e) => return plain(StatusCode::BAD_REQUEST, format!("invalid from `{f}`: {e}")),
            Ok(j) if j.domain().as_str() != state.domain => {
                return plain(
                    StatusCode::FORBIDDEN,
                    format!("from `{j}` is not of this server's domain {}", state.domain),
                );
            }
            Ok(j) if kind == Kind::Iq && j.node().is_some() => {
                return plain(
                    StatusCode::FORBIDDEN,
                    format!(
                        "an iq's from must be the service JID {} so its reply comes back here",
                        state.domain
                    ),
                );
            }
            Ok(j) => j.to_string(),
        },
    };
    let to_attr = (!has_to).then(|| to.to_string());
    let stamped = stanza.with_addressing(Some(&from), to_attr.as_deref());

    let wants_reply = match (kind, stanza.stanza_type().as_deref()) {
        (Kind::Iq, Some("get" | "set")) => true,
        (Kind::Iq, Some("result" | "error")) | (Kind::Message(_) | Kind::Presence, _) => false,
        (Kind::Iq, t) => {
            return plain(
                StatusCode::BAD_REQUEST,
                format!(
                    "an iq's type must be get, set, result or error, not {}",
                    t.unwrap_or("(none)")
                ),
            );
        }
    };
    if wants_reply {
        let client_id = stanza.id().map(Cow::into_owned);
        return iq_round_trip(state, &to, &from, client_id, &stamped).await;
    }
    let outcome = deliver(state, &to, kind, stamped).await;
    let label = match outcome {
        Outcome::Delivered => "delivered",
        Outcome::Queued | Outcome::Duplicate(_) => "queued",
        Outcome::Error("queue full") => "queue-full",
        Outcome::Error(_) => "offline",
    };
    let mut resp = StatusCode::OK.into_response();
    resp.headers_mut()
        .insert("x-tern-delivery", HeaderValue::from_static(label));
    resp
}

/// Cancels the iq waiter however the request ends (reply, timeout, or the HTTP client going away).
struct WaiterGuard<'a> {
    state: &'a HttpState,
    id: String,
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        self.state.router.cancel_iq(&self.id);
    }
}

/// Send an iq get/set under a fresh id and wait for its reply (see the module documentation).
async fn iq_round_trip(
    state: &HttpState,
    to: &Jid,
    from: &str,
    client_id: Option<String>,
    stamped: &Bytes,
) -> Response {
    let our_id = format!("tern-http-{}", uuid::Uuid::new_v4().simple());
    let reply_id = client_id.unwrap_or_else(|| our_id.clone());
    let Some(out) = replace_id(stamped, &our_id) else {
        return plain(StatusCode::BAD_REQUEST, "cannot rewrite the iq's id");
    };
    let rx = state.router.await_iq_reply(&our_id);
    let _guard = WaiterGuard {
        state,
        id: our_id.clone(),
    };
    let error = |etype: &str, cond: &str| {
        xml_reply(stanza_error(
            "iq",
            &reply_id,
            Some(to.as_str()),
            Some(from),
            etype,
            cond,
        ))
    };
    match state.router.route(to, Kind::Iq, out) {
        Delivery::Delivered(_) => {}
        Delivery::QueueFull => return error("wait", "resource-constraint"),
        Delivery::Unavailable | Delivery::Ignored => {
            return error("cancel", "service-unavailable");
        }
    }
    match tokio::time::timeout(state.iq_timeout, rx).await {
        Ok(Ok(reply)) => match replace_id(&reply, &reply_id) {
            Some(r) => xml_reply(r),
            None => xml_reply(reply),
        },
        // Timed out, or the waiter was dropped (cannot happen with a unique id): same answer.
        _ => {
            metrics::counter!("tern_http_iq_timeouts_total").increment(1);
            error("wait", "remote-server-timeout")
        }
    }
}

/// Why posted XML was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum XmlError {
    #[error("empty body: post exactly one XML stanza")]
    Empty,
    #[error("incomplete XML: the element is not closed")]
    Incomplete,
    #[error("post exactly one XML element, not several")]
    Several,
    #[error("XML element larger than {0} bytes (limits.max_stanza_bytes)")]
    TooLarge(usize),
    #[error("invalid XML: {0}")]
    Invalid(String),
}

impl XmlError {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            XmlError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// Parse exactly one element with the c2s framer (restricted XML, size and depth limits). A UTF-8 BOM
/// and an XML declaration in front are skipped; whitespace around is ignored; anything else after the
/// element is an error (this is also what stops a JSON `payload` from closing its `<message>`).
pub(crate) fn parse_stanza(limits: FramerLimits, xml: &[u8]) -> Result<Stanza, XmlError> {
    let mut xml = xml
        .strip_prefix(b"\xEF\xBB\xBF")
        .unwrap_or(xml)
        .trim_ascii();
    if xml.starts_with(b"<?xml") && xml.get(5).is_some_and(|b| b.is_ascii_whitespace()) {
        let end = memchr::memmem::find(xml, b"?>")
            .ok_or_else(|| XmlError::Invalid("unterminated XML declaration".into()))?;
        xml = xml.get(end + 2..).unwrap_or_default().trim_ascii();
    }
    if xml.is_empty() {
        return Err(XmlError::Empty);
    }
    let map = |e: crate::xmpp::framer::FrameError| match e {
        crate::xmpp::framer::FrameError::StanzaTooLarge { limit } => XmlError::TooLarge(limit),
        e => XmlError::Invalid(e.to_string()),
    };
    let mut f = Framer::new(limits);
    f.push(STREAM_HEADER);
    f.push(xml);
    match f.next().map_err(map)? {
        Some(Event::StreamOpen(_)) => {}
        _ => return Err(XmlError::Invalid("unexpected stream state".into())),
    }
    let stanza = match f.next().map_err(map)? {
        Some(Event::Stanza(s)) => s,
        Some(_) => return Err(XmlError::Invalid("expected an element".into())),
        None => return Err(XmlError::Incomplete),
    };
    match f.next().map_err(map)? {
        None if f.buffered() == 0 => Ok(stanza),
        None => Err(XmlError::Incomplete),
        Some(_) => Err(XmlError::Several),
    }
}

/// `stanza` with its `id` attribute set to `id` (other attributes copied verbatim); `None` if the
/// bytes do not start with an element.
pub(crate) fn replace_id(stanza: &Bytes, id: &str) -> Option<Bytes> {
    let mut reader = quick_xml::Reader::from_reader(stanza.as_ref());
    let (start, empty) = match reader.read_event() {
        Ok(XmlEvent::Start(e)) => (e, false),
        Ok(XmlEvent::Empty(e)) => (e, true),
        _ => return None,
    };
    let end = usize::try_from(reader.buffer_position()).ok()?;
    let mut out = Vec::with_capacity(stanza.len() + id.len() + 8);
    out.push(b'<');
    out.extend_from_slice(start.name().as_ref());
    for a in start.attributes().with_checks(false) {
        let a = a.ok()?;
        if a.key.as_ref() == b"id" {
            continue;
        }
        out.push(b' ');
        out.extend_from_slice(a.key.as_ref());
        out.extend_from_slice(b"=\"");
        // The raw (still escaped) value; a `"` can only occur in an apostrophe-quoted value.
        for &b in a.value.iter() {
            if b == b'"' {
                out.extend_from_slice(b"&quot;");
            } else {
                out.push(b);
            }
        }
        out.push(b'"');
    }
    out.extend_from_slice(b" id=\"");
    out.extend_from_slice(escape(id).as_bytes());
    out.extend_from_slice(if empty { b"\"/>" } else { b"\">" });
    out.extend_from_slice(stanza.get(end..)?);
    Some(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_one_stanza_only() {
        let l = FramerLimits::default();
        let s = parse_stanza(
            l,
            b"<?xml version='1.0'?>\n<message to='a@b'><body/></message>\n",
        )
        .unwrap();
        assert_eq!(s.name(), "message");
        assert!(matches!(parse_stanza(l, b"  "), Err(XmlError::Empty)));
        assert!(matches!(
            parse_stanza(l, b"<message>"),
            Err(XmlError::Incomplete)
        ));
        assert!(matches!(
            parse_stanza(l, b"<a/><b/>"),
            Err(XmlError::Several)
        ));
        assert!(matches!(
            parse_stanza(l, b"<a><!-- c --></a>"),
            Err(XmlError::Invalid(_))
        ));
        assert!(matches!(
            parse_stanza(l, b"<a/>junk"),
            Err(XmlError::Invalid(_))
        ));
    }

    #[test]
    fn replace_id_keeps_everything_else() {
        let s =
            Bytes::from_static(b"<iq type='get' id='x' to=\"a&amp;b\" q='say \"hi\"'><ping/></iq>");
        let r = replace_id(&s, "n<1").unwrap();
        assert_eq!(
            &r[..],
            &b"<iq type=\"get\" to=\"a&amp;b\" q=\"say &quot;hi&quot;\" id=\"n&lt;1\"><ping/></iq>"
                [..]
        );
        let r = replace_id(&Bytes::from_static(b"<iq type='result'/>"), "7").unwrap();
        assert_eq!(&r[..], b"<iq type=\"result\" id=\"7\"/>");
    }
}

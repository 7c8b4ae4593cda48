//! The native JSON API under `/api/v1` (shape fixed by issue 3; fields may be added, never renamed).
//!
//! - `POST /api/v1/push`: build `<message from=domain to=jid type=.. id=..><body/>payload</message>`
//!   per recipient and route it; answer per recipient `delivered`, `queued` or `error` + reason.
//! - `GET /api/v1/sessions/{jid}`, `DELETE /api/v1/sessions/{jid}`, `GET /api/v1/sessions`.
//! - `GET /api/v1/openapi.json`: the OpenAPI 3 description of all routes (`openapi.json` here).
//!
//! Status codes: 400 malformed JSON or JID, 404 unknown account/domain, 413 body over
//! `http.max_body_bytes` or payload over `limits.max_stanza_bytes`, 415 not `application/json`,
//! 422 well-formed JSON that makes no sense (missing `to`, no body/payload, bad type, invalid payload
//! XML), 501 listing sessions until the router can enumerate accounts.
//!
//! - `GET /api/v1/push/{id}`: the per-recipient state kept by the durable queue.
//!
//! Offline recipients are stored in the durable queue (one batch per request) and answered
//! `queued`; a client-chosen `id` makes storing idempotent. Not yet: broadcast.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use jid::{BareJid, Jid};
use serde::{Deserialize, Serialize};

use super::rest_stream::{XmlError, parse_stanza};
use super::{BodyError, HttpState, json_error, media_type, read_body, rfc3339};
use crate::store::queue::{EnqueueOutcome, NewItem, PushState, StatusUpdate};
use crate::xmpp::framer::escape;
use crate::xmpp::router::{Delivery, Kick, Kind, MessageType};

/// What happened to one stanza for one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// In a live session's outbound queue.
    Delivered,
    /// Stored durably (committed to disk) for later delivery.
    Queued,
    /// The same push id was already seen for this recipient: its current state, nothing stored.
    Duplicate(PushState),
    /// Not delivered; the reason as reported in the API (`offline`, `queue full`, ...).
    Error(&'static str),
}

impl Outcome {
    fn status(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Queued => "queued",
            Outcome::Duplicate(s) => s.as_str(),
            Outcome::Error(_) => "error",
        }
    }
}

/// Try the live sessions. `None`: nobody online took it and it is a message the durable queue
/// should store (presence and iqs to an offline endpoint are never stored).
pub(crate) fn deliver_live(
    state: &HttpState,
    to: &Jid,
    kind: Kind,
    stanza: Bytes,
) -> Option<Outcome> {
    match state.router.route(to, kind, stanza) {
        Delivery::Delivered(_) => Some(Outcome::Delivered),
        Delivery::QueueFull => Some(Outcome::Error("queue full")),
        // Ignored: e.g. a headline to an unavailable resource; for a push that is "nobody took it".
        Delivery::Unavailable | Delivery::Ignored => {
            if state.queue.is_some() && matches!(kind, Kind::Message(_)) {
                None
            } else {
                Some(Outcome::Error("offline"))
            }
        }
    }
}

/// Route one stanza to a user of this domain, storing a message nobody online took (a fresh push
/// id, the default TTL). Used by `/rest/stream`.
pub(crate) async fn deliver(state: &HttpState, to: &Jid, kind: Kind, stanza: Bytes) -> Outcome {
    match deliver_live(state, to, kind, stanza.clone()) {
        Some(o) => o,
        None => {
            let id = uuid::Uuid::new_v4().to_string();
            let item = (to.to_bare().to_string(), stanza);
            store_offline(state, &id, vec![item], state.default_ttl)
                .await
                .pop()
                .unwrap_or(Outcome::Error("offline"))
        }
    }
}

/// Store stanzas for offline recipients (normalised bare JID, exact stanza) in ONE enqueue (one
/// commit, shared with concurrent requests by the queue's writer); one outcome per item, in order.
pub(crate) async fn store_offline(
    state: &HttpState,
    push_id: &str,
    items: Vec<(String, Bytes)>,
    ttl: Duration,
) -> Vec<Outcome> {
    let n = items.len();
    let Some(queue) = &state.queue else {
        return vec![Outcome::Error("offline"); n];
    };
    let now = SystemTime::now();
    let new: Vec<NewItem> = items
        .into_iter()
        .map(|(recipient, stanza)| NewItem {
            push_id: push_id.to_string(),
            recipient,
            stanza,
            created: now,
            expires_at: now + ttl,
        })
        .collect();
    match queue.enqueue(new).await {
        Ok(outcomes) => outcomes
            .into_iter()
            .map(|o| match o {
                EnqueueOutcome::Queued(_) => Outcome::Queued,
                EnqueueOutcome::Full => Outcome::Error("queue full"),
                EnqueueOutcome::Duplicate(s) => Outcome::Duplicate(s),
            })
            .collect(),
        Err(e) => {
            tracing::error!(error = %e, "cannot store pushes for offline endpoints");
            vec![Outcome::Error("queue unavailable"); n]
        }
    }
}

/// `to` of a push: one JID or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Recipients {
    One(String),
    Many(Vec<String>),
}

/// The request of `POST /api/v1/push`. Unknown fields are ignored (forward compatibility).
#[derive(Debug, Deserialize)]
struct PushRequest {
    to: Recipients,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    payload: Option<String>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    ttl_secs: Option<u64>,
    #[serde(default)]
    id: Option<String>,
}

#[derive(Debug, Serialize)]
struct PushResponse {
    id: String,
    results: Vec<PushResult>,
}

#[derive(Debug, Serialize)]
struct PushResult {
    to: String,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'static str>,
    /// A human-readable explanation of `error`.
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
}

/// Most recipients in one push request.
const MAX_RECIPIENTS: usize = 10_000;
/// Longest client-chosen push id.
const MAX_ID_LEN: usize = 128;

/// Check the content type and read the JSON body (415, 413, 400, 422 as documented above).
async fn read_json<T: serde::de::DeserializeOwned>(
    state: &HttpState,
    headers: &HeaderMap,
    body: Body,
) -> Result<T, Response> {
    match media_type(headers).as_deref() {
        Some("application/json") => {}
        other => {
            return Err(json_error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "Content-Type must be application/json, not {}",
                    other.unwrap_or("(none)")
                ),
            ));
        }
    }
    let bytes = match read_body(headers, body, state.max_body).await {
        Ok(b) => b,
        Err(BodyError::TooLarge(max)) => {
            return Err(json_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body larger than {max} bytes (http.max_body_bytes)"),
            ));
        }
        Err(BodyError::Read(e)) => {
            return Err(json_error(
                StatusCode::BAD_REQUEST,
                format!("cannot read body: {e}"),
            ));
        }
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        let status = match e.classify() {
            serde_json::error::Category::Data => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::BAD_REQUEST,
        };
        json_error(status, format!("request body: {e}"))
    })
}

fn unprocessable(msg: impl Into<String>) -> Response {
    json_error(StatusCode::UNPROCESSABLE_ENTITY, msg)
}

/// `POST /api/v1/push`.
pub async fn push(State(state): State<Arc<HttpState>>, headers: HeaderMap, body: Body) -> Response {
    let req: PushRequest = match read_json(&state, &headers, body).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let recipients = match req.to {
        Recipients::One(s) => vec![s],
        Recipients::Many(v) => v,
    };
    if recipients.is_empty() {
        return unprocessable("`to` must name at least one recipient");
    }
    if recipients.len() > MAX_RECIPIENTS {
        return unprocessable(format!(
            "`to` names {} recipients; at most {MAX_RECIPIENTS} per request",
            recipients.len()
        ));
    }
    let body = req.body.filter(|b| !b.is_empty());
    let payload = req.payload.filter(|p| !p.trim().is_empty());
    if body.is_none() && payload.is_none() {
        return unprocessable("a push needs a non-empty `body` and/or `payload`");
    }
    let mtype = match req.kind.as_deref() {
        None | Some("normal") => "normal",
        Some("chat") => "chat",
        Some("headline") => "headline",
        Some(other) => {
            return unprocessable(format!(
                "`type` must be normal, chat or headline, not `{other}`"
            ));
        }
    };
    let ttl = match req.ttl_secs {
        None => state.default_ttl,
        Some(0) => return unprocessable("`ttl_secs` must be at least 1"),
        Some(t) if Duration::from_secs(t) > state.max_ttl => {
            return unprocessable(format!(
                "`ttl_secs` must be at most {} (queue.max_ttl_secs)",
                state.max_ttl.as_secs()
            ));
        }
        Some(t) => Duration::from_secs(t),
    };
    let id = match req.id {
        Some(id) if id.is_empty() || id.len() > MAX_ID_LEN || id.chars().any(char::is_control) => {
            return unprocessable(format!(
                "`id` must be 1 to {MAX_ID_LEN} bytes without control characters"
            ));
        }
        Some(id) => id,
        None => uuid::Uuid::new_v4().to_string(),
    };

    // The children of the message, validated once by the c2s framer: the escaped body must be
    // representable in XML 1.0, and the payload must be well-formed restricted XML that stays inside
    // its <message> (a payload closing it early shows up as several elements).
    let mut children = String::new();
    if let Some(b) = &body {
        children.push_str("<body>");
        children.push_str(&escape(b));
        children.push_str("</body>");
    }
    if let Some(p) = &payload {
        children.push_str(p);
    }
    let wrapped = format!("<message>{children}</message>");
    if let Err(e) = parse_stanza(state.limits, wrapped.as_bytes()) {
        let what = if payload.is_some() {
            "body/payload"
        } else {
            "body"
        };
        return match e {
            XmlError::TooLarge(limit) => json_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("{what}: the message would exceed {limit} bytes (limits.max_stanza_bytes)"),
            ),
            e => unprocessable(format!("{what}: {e}")),
        };
    }

    let kind = Kind::Message(MessageType::parse(Some(mtype)));
    let head_rest = format!(
        " type='{mtype}' id='{}' from='{}'>",
        escape(&id),
        escape(&state.domain)
    );
    let mut results: Vec<PushResult> = Vec::with_capacity(recipients.len());
    // Recipients nobody online took: (index in `results`, bare JID, stanza), stored in one batch.
    let mut offline = Vec::new();
    let mut delivered = Vec::new();
    for to_str in recipients {
        match push_one(&state, &to_str, kind, &head_rest, &children) {
            Ok(result) => {
                if result.status == "delivered" {
                    delivered.push(result.to.clone());
                }
                results.push(result);
            }
            Err((bare, stanza)) => {
                offline.push((results.len(), bare, stanza));
                results.push(PushResult {
                    to: to_str,
                    status: "error",
                    error: Some("offline"),
                    detail: None,
                });
            }
        }
    }
    if !offline.is_empty() {
        let (slots, items): (Vec<usize>, Vec<(String, Bytes)>) =
            offline.into_iter().map(|(i, b, s)| (i, (b, s))).unzip();
        let outcomes = store_offline(&state, &id, items, ttl).await;
        for (i, o) in slots.into_iter().zip(outcomes) {
            if let Some(r) = results.get_mut(i) {
                r.status = o.status();
                r.error = match o {
                    Outcome::Error(e) => Some(e),
                    _ => None,
                };
            }
        }
    }
    if let (Some(queue), false) = (&state.queue, delivered.is_empty()) {
        // Best effort and off the answer's path: the push was delivered whatever happens here.
        let now = SystemTime::now();
        let updates = delivered
            .into_iter()
            .filter_map(|to| Jid::new(&to).ok())
            .map(|to| StatusUpdate {
                push_id: id.clone(),
                recipient: to.to_bare().to_string(),
                state: PushState::Delivered,
                error: None,
                at: now,
            })
            .collect();
        let queue = queue.clone();
        tokio::spawn(async move {
            if let Err(e) = queue.set_status(updates).await {
                tracing::warn!(error = %e, "cannot record delivered push status");
            }
        });
    }
    for result in &results {
        let label = match (result.status, result.error) {
            (s, None) => s,
            (_, Some("invalid JID")) => "invalid_jid",
            (_, Some("unknown domain")) => "unknown_domain",
            (_, Some("queue full")) => "queue_full",
            (_, Some("payload too large")) => "too_large",
            (_, Some(_)) => "offline",
        };
        metrics::counter!("tern_pushes_total", "outcome" => label).increment(1);
    }
    (StatusCode::OK, Json(PushResponse { id, results })).into_response()
}

#[derive(Debug, Serialize)]
struct StatusResult {
    to: String,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// `GET /api/v1/push/{id}`: every recipient's state (404 when the id is unknown or past its
/// retention).
pub async fn push_status(State(state): State<Arc<HttpState>>, Path(id): Path<String>) -> Response {
    let Some(queue) = &state.queue else {
        return json_error(StatusCode::NOT_FOUND, "push status is not kept (no queue)");
    };
    match queue.status(&id) {
        Ok(Some(st)) => Json(serde_json::json!({
            "id": st.push_id,
            "results": st
                .results
                .into_iter()
                .map(|r| StatusResult {
                    to: r.recipient,
                    status: r.state.as_str(),
                    error: r.error,
                })
                .collect::<Vec<_>>(),
        }))
        .into_response(),
        Ok(None) => json_error(StatusCode::NOT_FOUND, format!("no push with id `{id}`")),
        Err(e) => {
            tracing::error!(error = %e, "cannot read push status");
            json_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot read the push status",
            )
        }
    }
}

/// Validate one recipient, build its stanza and deliver it.
/// `Err((bare JID, stanza))`: nobody online took it; the caller stores it.
fn push_one(
    state: &HttpState,
    to_str: &str,
    kind: Kind,
    head_rest: &str,
    children: &str,
) -> Result<PushResult, (String, Bytes)> {
    let fail = |error, detail: String| PushResult {
        to: to_str.to_string(),
        status: "error",
        error: Some(error),
        detail: Some(detail),
    };
    let to = match Jid::new(to_str) {
        Ok(j) => j,
        Err(e) => return Ok(fail("invalid JID", format!("`{to_str}`: {e}"))),
    };
    if to.domain().as_str() != state.domain {
        return Ok(fail(
            "unknown domain",
            format!("this server delivers only to {}", state.domain),
        ));
    }
    if to.node().is_none() {
        return Ok(fail(
            "invalid JID",
            format!("`{to}` is the server itself: address a user JID"),
        ));
    }
    let to_norm = to.to_string();
    let stanza = format!(
        "<message to='{}'{head_rest}{children}</message>",
        escape(&to_norm)
    );
    if stanza.len() > state.limits.max_stanza_bytes {
        return Ok(fail(
            "payload too large",
            format!(
                "the message would exceed {} bytes (limits.max_stanza_bytes)",
                state.limits.max_stanza_bytes
            ),
        ));
    }
    let stanza = Bytes::from(stanza);
    match deliver_live(state, &to, kind, stanza.clone()) {
        None => Err((to.to_bare().to_string(), stanza)),
        Some(o) => Ok(PushResult {
            to: to_str.to_string(),
            status: o.status(),
            error: match o {
                Outcome::Error(e) => Some(e),
                _ => None,
            },
            detail: None,
        }),
    }
}

#[derive(Debug, Serialize)]
struct SessionInfo {
    jid: String,
    online: bool,
    resources: Vec<ResourceInfo>,
}

#[derive(Debug, Serialize)]
struct ResourceInfo {
    resource: String,
    connected_since: String,
    remote_addr: String,
    /// Has sent available presence (receives pushes addressed to the bare JID).
    available: bool,
    /// Stanzas waiting in the session's outbound queue.
    queued: usize,
}

/// A JID of this domain from the path, or the status and message to answer with.
fn local_jid(state: &HttpState, s: &str) -> Result<Jid, (StatusCode, String)> {
    let j =
        Jid::new(s).map_err(|e| (StatusCode::BAD_REQUEST, format!("invalid JID `{s}`: {e}")))?;
    if j.domain().as_str() != state.domain || j.node().is_none() {
        return Err((
            StatusCode::NOT_FOUND,
            format!("`{j}` is not an account of {}", state.domain),
        ));
    }
    Ok(j)
}

fn session_info(state: &HttpState, bare: &BareJid) -> SessionInfo {
    let available: Vec<String> = state
        .router
        .presences(bare)
        .into_iter()
        .map(|(r, _)| r)
        .collect();
    let resources: Vec<ResourceInfo> = state
        .router
        .sessions(bare)
        .into_iter()
        .map(|(resource, h)| ResourceInfo {
            available: available.contains(&resource),
            resource,
            connected_since: rfc3339(h.connected_since),
            remote_addr: h.remote_addr.to_string(),
            queued: h.queued(),
        })
        .collect();
    SessionInfo {
        jid: bare.to_string(),
        online: !resources.is_empty(),
        resources,
    }
}

/// `GET /api/v1/sessions/{jid}`: the account's connected resources (a full JID shows its account).
pub async fn get_session(State(state): State<Arc<HttpState>>, Path(jid): Path<String>) -> Response {
    match local_jid(&state, &jid) {
        Ok(j) => Json(session_info(&state, &j.to_bare())).into_response(),
        Err((status, msg)) => json_error(status, msg),
    }
}

/// `DELETE /api/v1/sessions/{jid}`: disconnect every resource of a bare JID, or the one resource of a
/// full JID. 204, or 404 when nothing is connected.
pub async fn delete_session(
    State(state): State<Arc<HttpState>>,
    Path(jid): Path<String>,
) -> Response {
    let j = match local_jid(&state, &jid) {
        Ok(j) => j,
        Err((status, msg)) => return json_error(status, msg),
    };
    let only = j.resource().map(|r| r.as_str().to_string());
    let mut kicked = 0;
    for (resource, h) in state.router.sessions(&j.to_bare()) {
        if only.as_deref().is_none_or(|o| o == resource) {
            h.kick(Kick::Disconnect);
            kicked += 1;
        }
    }
    if kicked == 0 {
        return json_error(StatusCode::NOT_FOUND, format!("`{j}` is not connected"));
    }
    tracing::info!(jid = %j, sessions = kicked, "disconnected through the HTTP API");
    StatusCode::NO_CONTENT.into_response()
}

/// `GET /api/v1/sessions?offset=&limit=`: a page of online accounts (sorted by JID) and the total.
pub async fn list_sessions(
    State(state): State<Arc<HttpState>>,
    RawQuery(query): RawQuery,
) -> Response {
    let mut offset = 0usize;
    let mut limit = 100usize;
    for pair in query.as_deref().unwrap_or_default().split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let slot = match k {
            "offset" => &mut offset,
            "limit" => &mut limit,
            _ => continue,
        };
        match v.parse::<usize>() {
            Ok(n) => *slot = n,
            Err(_) => {
                return json_error(
                    StatusCode::BAD_REQUEST,
                    format!("`{k}` must be a non-negative integer, not `{v}`"),
                );
            }
        }
    }
    if !(1..=1000).contains(&limit) {
        return json_error(StatusCode::BAD_REQUEST, "`limit` must be 1 to 1000");
    }
    let mut accounts = state.router.account_jids();
    accounts.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    let total = accounts.len();
    let sessions: Vec<SessionInfo> = accounts
        .iter()
        .skip(offset)
        .take(limit)
        .map(|b| session_info(&state, b))
        .collect();
    Json(serde_json::json!({
        "total": total,
        "offset": offset,
        "limit": limit,
        "sessions": sessions,
    }))
    .into_response()
}

/// `GET /api/v1/openapi.json`.
pub async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
        .into_response()
}

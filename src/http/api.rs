//! The native JSON API under `/api/v1` (shape fixed by issue 3; fields may be added, never renamed).
//!
//! - `POST /api/v1/push`: build `<message from=domain to=jid type=.. id=..><body/>payload</message>`
//!   per recipient and route it; answer per recipient `delivered`, `queued` or `error` + reason.
//! - `POST /api/v1/broadcast`: the same message to every online account (`"to": "all"`) or to a
//!   list of at most [`MAX_RECIPIENTS`] JIDs. Answered `202 {"id", "recipients"}` at once; a
//!   background task delivers and records every recipient's state for `GET /api/v1/push/{id}`.
//! - `GET /api/v1/push/{id}`: the per-recipient state kept by the durable queue.
//! - `GET /api/v1/sessions/{jid}`, `DELETE /api/v1/sessions/{jid}`, `GET /api/v1/sessions`.
//! - `GET /api/v1/openapi.json`: the OpenAPI 3 description of all routes (`openapi.json` here).
//!
//! Status codes: 400 malformed JSON or JID, 404 unknown account/domain, 413 body over
//! `http.max_body_bytes` or payload over `limits.max_stanza_bytes`, 415 not `application/json`,
//! 422 well-formed JSON that makes no sense (missing `to`, no body/payload, bad type, invalid payload
//! XML), 429 more than `http.rate_limit_per_sec` requests from one client address (with
//! `Retry-After`).
//!
//! Pushes delivered live carry their push id ([`PushMeta`]) into the session, so a session with
//! stream management can mark them `acked`, or put them back into the queue if it dies first.
//! Offline recipients are stored in the durable queue (one batch per request, or per
//! [`BROADCAST_BATCH`] recipients of a broadcast) and answered `queued`; a client-chosen `id` makes
//! storing idempotent. After storing, the recipients' available sessions are asked to read the queue
//! again: one may have become available between the live attempt and the commit, and would otherwise
//! see the push only at its next login.
//!
//! A repeated broadcast id is answered like the first time (202, the first recipient count, plus
//! `"duplicate": true`) and nothing is sent again: a management server retrying after a timeout must
//! not notify every endpoint twice. Ids are remembered in memory ([`RecentBroadcasts`]) and, after a
//! restart or past that memory, found through the queue's status records.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use dashmap::DashMap;
use jid::{BareJid, Jid};
use serde::{Deserialize, Serialize};

use super::rest_stream::{XmlError, parse_stanza};
use super::{BodyError, HttpState, json_error, media_type, read_body, rfc3339};
use crate::store::queue::{EnqueueOutcome, NewItem, PushState, StatusUpdate};
use crate::xmpp::framer::escape;
use crate::xmpp::router::{Delivery, Kick, Kind, MessageType, PushMeta};

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

    fn error(self) -> Option<&'static str> {
        match self {
            Outcome::Error(e) => Some(e),
            _ => None,
        }
    }
}

/// The `outcome` label of `tern_pushes_total` (a fixed set, never the free-text detail).
fn outcome_label(status: &'static str, error: Option<&'static str>) -> &'static str {
    match (status, error) {
        (s, None) => s,
        (_, Some("invalid JID")) => "invalid_jid",
        (_, Some("unknown domain")) => "unknown_domain",
        (_, Some("queue full")) => "queue_full",
        (_, Some("payload too large")) => "too_large",
        (_, Some(_)) => "offline",
    }
}

fn count_push(status: &'static str, error: Option<&'static str>) {
    metrics::counter!("tern_pushes_total", "outcome" => outcome_label(status, error)).increment(1);
}

/// The identity of a new push: `created` now, expiring after `ttl`.
fn push_meta(push_id: String, ttl: Duration) -> Arc<PushMeta> {
    let created = SystemTime::now();
    Arc::new(PushMeta {
        push_id,
        created,
        expires_at: created + ttl,
    })
}

/// Try the live sessions. `None`: nobody online took it and it is a message the durable queue
/// should store (presence and iqs to an offline endpoint are never stored). `meta` travels with a
/// push into the sessions (see the module documentation).
pub(crate) fn deliver_live(
    state: &HttpState,
    to: &Jid,
    kind: Kind,
    stanza: Bytes,
    meta: Option<Arc<PushMeta>>,
) -> Option<Outcome> {
    match state.router.route_tagged(to, kind, stanza, meta) {
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

/// Route one stanza to a user of this domain; a message is a push with a fresh push id and the
/// default TTL, stored when nobody online takes it. Used by `/rest/stream`.
pub(crate) async fn deliver(state: &HttpState, to: &Jid, kind: Kind, stanza: Bytes) -> Outcome {
    let meta = matches!(kind, Kind::Message(_))
        .then(|| push_meta(uuid::Uuid::new_v4().to_string(), state.default_ttl));
    match deliver_live(state, to, kind, stanza.clone(), meta.clone()) {
        Some(o) => o,
        None => {
            // `deliver_live` only leaves messages to store, and messages have `meta`.
            let Some(meta) = meta else {
                return Outcome::Error("offline");
            };
            store_offline(state, &meta, vec![(to.to_bare(), stanza)])
                .await
                .pop()
                .unwrap_or(Outcome::Error("offline"))
        }
    }
}

/// Store stanzas for offline recipients (bare JID, exact stanza) under `meta` in ONE enqueue (one
/// commit, shared with concurrent requests by the queue's writer); one outcome per item, in order.
/// Then asks the available sessions of every recipient that got an item stored to read the queue
/// again (closing the gap between the failed live attempt and the commit).
pub(crate) async fn store_offline(
    state: &HttpState,
    meta: &PushMeta,
    items: Vec<(BareJid, Bytes)>,
) -> Vec<Outcome> {
    let n = items.len();
    let Some(queue) = &state.queue else {
        return vec![Outcome::Error("offline"); n];
    };
    if n == 0 {
        return Vec::new();
    }
    let (recipients, new): (Vec<BareJid>, Vec<NewItem>) = items
        .into_iter()
        .map(|(recipient, stanza)| {
            let item = NewItem {
                push_id: meta.push_id.clone(),
                recipient: recipient.to_string(),
                stanza,
                created: meta.created,
                expires_at: meta.expires_at,
            };
            (recipient, item)
        })
        .unzip();
    match queue.enqueue(new).await {
        Ok(outcomes) => outcomes
            .into_iter()
            .zip(recipients)
            .map(|(o, bare)| match o {
                EnqueueOutcome::Queued(_) => {
                    state.router.request_replay(&bare);
                    Outcome::Queued
                }
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

/// `to` of a push: one JID or a list (for a broadcast: `"all"` or a list).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Recipients {
    One(String),
    Many(Vec<String>),
}

/// The request of `POST /api/v1/push` and `POST /api/v1/broadcast`. Unknown fields are ignored
/// (forward compatibility).
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

/// Most recipients in one push request, and in one broadcast naming its recipients: bounds the
/// work and the memory one request can cause (the request body is bounded too, by
/// `http.max_body_bytes`). A broadcast to `"all"` is bounded by the online accounts instead.
pub const MAX_RECIPIENTS: usize = 10_000;
/// Longest client-chosen push id.
const MAX_ID_LEN: usize = 128;
/// Recipients a broadcast handles per queue batch (one enqueue, one status write) before yielding,
/// so a large fan-out shares the runtime and the queue's writer with everything else.
pub const BROADCAST_BATCH: usize = 1000;

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

/// A validated push message: everything but the recipient, shared by all recipients of a push or
/// broadcast.
#[derive(Debug)]
struct Message {
    kind: Kind,
    /// The start tag after `<message to='..'`: ` type='..' id='..' from='..'>`.
    head_rest: String,
    /// The children, validated once by the c2s framer.
    children: String,
    /// Push id, creation and expiry: the same for the live sessions and the durable queue.
    meta: Arc<PushMeta>,
}

impl Message {
    fn id(&self) -> &str {
        &self.meta.push_id
    }
}

/// Validate everything of a push request except `to` (body/payload, type, TTL, id) and build the
/// message parts; `Err` is the 413/422 status and message. Shared by push and broadcast so both accept exactly
/// the same messages.
fn prepare(
    state: &HttpState,
    req: PushRequest,
) -> Result<(Recipients, Message), (StatusCode, String)> {
    let unprocessable = |msg: String| (StatusCode::UNPROCESSABLE_ENTITY, msg);
    let body = req.body.filter(|b| !b.is_empty());
    let payload = req.payload.filter(|p| !p.trim().is_empty());
    if body.is_none() && payload.is_none() {
        return Err(unprocessable(
            "a push needs a non-empty `body` and/or `payload`".into(),
        ));
    }
    let mtype = match req.kind.as_deref() {
        None | Some("normal") => "normal",
        Some("chat") => "chat",
        Some("headline") => "headline",
        Some(other) => {
            return Err(unprocessable(format!(
                "`type` must be normal, chat or headline, not `{other}`"
            )));
        }
    };
    let ttl = match req.ttl_secs {
        None => state.default_ttl,
        Some(0) => return Err(unprocessable("`ttl_secs` must be at least 1".into())),
        Some(t) if Duration::from_secs(t) > state.max_ttl => {
            return Err(unprocessable(format!(
                "`ttl_secs` must be at most {} (queue.max_ttl_secs)",
                state.max_ttl.as_secs()
            )));
        }
        Some(t) => Duration::from_secs(t),
    };
    let id = match req.id {
        Some(id) if id.is_empty() || id.len() > MAX_ID_LEN || id.chars().any(char::is_control) => {
            return Err(unprocessable(format!(
                "`id` must be 1 to {MAX_ID_LEN} bytes without control characters"
            )));
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
        return Err(match e {
            XmlError::TooLarge(limit) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("{what}: the message would exceed {limit} bytes (limits.max_stanza_bytes)"),
            ),
            e => unprocessable(format!("{what}: {e}")),
        });
    }
    let head_rest = format!(
        " type='{mtype}' id='{}' from='{}'>",
        escape(&id),
        escape(&state.domain)
    );
    let message = Message {
        kind: Kind::Message(MessageType::parse(Some(mtype))),
        head_rest,
        children,
        meta: push_meta(id, ttl),
    };
    Ok((req.to, message))
}

/// Why one recipient cannot get a push: the API's `error` and a human-readable detail.
type Refusal = (&'static str, String);

/// A user JID of this domain, or why not.
fn recipient_jid(state: &HttpState, to_str: &str) -> Result<Jid, Refusal> {
    let to = Jid::new(to_str).map_err(|e| ("invalid JID", format!("`{to_str}`: {e}")))?;
    if to.domain().as_str() != state.domain {
        return Err((
            "unknown domain",
            format!("this server delivers only to {}", state.domain),
        ));
    }
    if to.node().is_none() {
        return Err((
            "invalid JID",
            format!("`{to}` is the server itself: address a user JID"),
        ));
    }
    Ok(to)
}

/// The message's stanza for `to`, within `limits.max_stanza_bytes`.
fn stanza_for(state: &HttpState, msg: &Message, to: &Jid) -> Result<Bytes, Refusal> {
    let stanza = format!(
        "<message to='{}'{}{}</message>",
        escape(to.as_str()),
        msg.head_rest,
        msg.children
    );
    if stanza.len() > state.limits.max_stanza_bytes {
        return Err((
            "payload too large",
            format!(
                "the message would exceed {} bytes (limits.max_stanza_bytes)",
                state.limits.max_stanza_bytes
            ),
        ));
    }
    Ok(Bytes::from(stanza))
}

/// Record `updates` (best effort: the pushes went out whatever happens here).
async fn record_status(state: &HttpState, updates: Vec<StatusUpdate>) {
    if let (Some(queue), false) = (&state.queue, updates.is_empty())
        && let Err(e) = queue.set_status(updates).await
    {
        tracing::warn!(error = %e, "cannot record push status");
    }
}

fn status_update(
    push_id: &str,
    recipient: String,
    outcome: Outcome,
    at: SystemTime,
) -> Option<StatusUpdate> {
    let (state, error) = match outcome {
        Outcome::Delivered => (PushState::Delivered, None),
        Outcome::Error(e) => (PushState::Error, Some(e.to_string())),
        // The queue wrote `queued` itself; a duplicate keeps the state it has.
        Outcome::Queued | Outcome::Duplicate(_) => return None,
    };
    Some(StatusUpdate {
        push_id: push_id.to_string(),
        recipient,
        state,
        error,
        at,
    })
}

/// `POST /api/v1/push`.
pub async fn push(State(state): State<Arc<HttpState>>, headers: HeaderMap, body: Body) -> Response {
    let req: PushRequest = match read_json(&state, &headers, body).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let (to, msg) = match prepare(&state, req) {
        Ok(p) => p,
        Err((status, msg)) => return json_error(status, msg),
    };
    let recipients = match to {
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

    let mut results: Vec<PushResult> = Vec::with_capacity(recipients.len());
    // Recipients nobody online took: (index in `results`, bare JID, stanza), stored in one batch.
    let mut offline = Vec::new();
    let mut delivered = Vec::new();
    for to_str in recipients {
        match push_one(&state, &to_str, &msg) {
            Ok((result, bare)) => {
                if let Some(bare) = bare {
                    delivered.push(bare);
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
        let (slots, items): (Vec<usize>, Vec<(BareJid, Bytes)>) =
            offline.into_iter().map(|(i, b, s)| (i, (b, s))).unzip();
        let outcomes = store_offline(&state, &msg.meta, items).await;
        for (i, o) in slots.into_iter().zip(outcomes) {
            if let Some(r) = results.get_mut(i) {
                r.status = o.status();
                r.error = o.error();
            }
        }
    }
    if !delivered.is_empty() {
        // Off the answer's path: the push was delivered whatever happens here.
        let now = SystemTime::now();
        let updates = delivered
            .into_iter()
            .filter_map(|bare| status_update(msg.id(), bare.to_string(), Outcome::Delivered, now))
            .collect();
        let state = state.clone();
        state
            .tasks
            .clone()
            .spawn(async move { record_status(&state, updates).await });
    }
    for result in &results {
        count_push(result.status, result.error);
    }
    let id = msg.id().to_string();
    (StatusCode::OK, Json(PushResponse { id, results })).into_response()
}

/// Validate one recipient, build its stanza and deliver it: the result, with the bare JID when
/// it was delivered live. `Err((bare JID, stanza))`: nobody online took it; the caller stores it.
fn push_one(
    state: &HttpState,
    to_str: &str,
    msg: &Message,
) -> Result<(PushResult, Option<BareJid>), (BareJid, Bytes)> {
    let fail = |(error, detail): Refusal| {
        let result = PushResult {
            to: to_str.to_string(),
            status: "error",
            error: Some(error),
            detail: Some(detail),
        };
        Ok((result, None))
    };
    let to = match recipient_jid(state, to_str) {
        Ok(j) => j,
        Err(r) => return fail(r),
    };
    let stanza = match stanza_for(state, msg, &to) {
        Ok(s) => s,
        Err(r) => return fail(r),
    };
    match deliver_live(state, &to, msg.kind, stanza.clone(), Some(msg.meta.clone())) {
        None => Err((to.to_bare(), stanza)),
        Some(o) => {
            let result = PushResult {
                to: to_str.to_string(),
                status: o.status(),
                error: o.error(),
                detail: None,
            };
            Ok((result, (o == Outcome::Delivered).then(|| to.to_bare())))
        }
    }
}

/// Broadcast ids answered recently (id → when, recipient count), so that a retried broadcast gets
/// the first answer instead of a second fan-out even before its status records are written. At most
/// [`RecentBroadcasts::CAPACITY`] ids, each for [`RecentBroadcasts::RETENTION`]; older ones are
/// still found through the queue's status records.
#[derive(Debug, Default)]
pub struct RecentBroadcasts {
    ids: DashMap<String, (Instant, usize)>,
}

impl RecentBroadcasts {
    pub const CAPACITY: usize = 10_000;
    pub const RETENTION: Duration = Duration::from_secs(86_400);

    /// Remember `id` with its recipient count; `Err(count)` when it was already answered.
    fn claim(&self, id: &str, recipients: usize, now: Instant) -> Result<(), usize> {
        let fresh = |at: Instant| now.saturating_duration_since(at) < Self::RETENTION;
        // A known id first: making room must not forget the very id being asked about.
        if let Some((at, n)) = self.ids.get(id).map(|e| *e.value())
            && fresh(at)
        {
            return Err(n);
        }
        if self.ids.len() >= Self::CAPACITY {
            self.ids.retain(|_, (at, _)| fresh(*at));
            while self.ids.len() >= Self::CAPACITY {
                let oldest = self
                    .ids
                    .iter()
                    .min_by_key(|e| e.value().0)
                    .map(|e| e.key().clone());
                match oldest {
                    Some(k) => self.ids.remove(&k),
                    None => break,
                };
            }
        }
        match self.ids.entry(id.to_string()) {
            // Claimed concurrently since the check above.
            dashmap::Entry::Occupied(mut e) => {
                let (at, n) = *e.get();
                if fresh(at) {
                    return Err(n);
                }
                e.insert((now, recipients));
                Ok(())
            }
            dashmap::Entry::Vacant(e) => {
                e.insert((now, recipients));
                Ok(())
            }
        }
    }
}

/// One recipient of a broadcast: a JID to deliver to, or the entry as given and why it was refused.
type Target = Result<Jid, Box<(String, Refusal)>>;

#[derive(Debug, Serialize)]
struct BroadcastResponse {
    id: String,
    recipients: usize,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    duplicate: bool,
}

fn accepted(id: String, recipients: usize, duplicate: bool) -> Response {
    let answer = BroadcastResponse {
        id,
        recipients,
        duplicate,
    };
    (StatusCode::ACCEPTED, Json(answer)).into_response()
}

/// `POST /api/v1/broadcast`: validated like a push, answered 202 at once, delivered by a
/// background task (see the module documentation).
pub async fn broadcast(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let req: PushRequest = match read_json(&state, &headers, body).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let (to, msg) = match prepare(&state, req) {
        Ok(p) => p,
        Err((status, msg)) => return json_error(status, msg),
    };
    let (audience, targets): (&'static str, Vec<Target>) = match to {
        Recipients::One(s) if s == "all" => (
            "all",
            // Snapshot now: accounts logging in later are not part of this broadcast.
            state
                .router
                .account_jids()
                .into_iter()
                .map(|b| Ok(Jid::from(b)))
                .collect(),
        ),
        Recipients::One(other) => {
            return unprocessable(format!(
                "`to` must be \"all\" or a list of JIDs, not `{other}`"
            ));
        }
        Recipients::Many(v) if v.is_empty() => {
            return unprocessable("`to` must name at least one recipient");
        }
        Recipients::Many(v) if v.len() > MAX_RECIPIENTS => {
            return unprocessable(format!(
                "`to` names {} recipients; at most {MAX_RECIPIENTS} per broadcast (or \"all\")",
                v.len()
            ));
        }
        Recipients::Many(v) => {
            // Each account once, however often (or in whatever spelling) it is named.
            let mut seen = HashSet::with_capacity(v.len());
            let targets = v
                .into_iter()
                .filter_map(|s| match recipient_jid(&state, &s) {
                    Ok(j) => seen.insert(j.to_string()).then_some(Ok(j)),
                    Err(r) => seen.insert(s.clone()).then(|| Err(Box::new((s, r)))),
                })
                .collect();
            ("list", targets)
        }
    };

    let id = msg.id().to_string();
    if let Some(queue) = &state.queue {
        match queue.status(&id) {
            Ok(Some(st)) => return accepted(id, st.results.len(), true),
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, "cannot read push status");
                return json_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "cannot check the broadcast id",
                );
            }
        }
    }
    let recipients = targets.len();
    if let Err(first) = state.broadcasts.claim(&id, recipients, Instant::now()) {
        return accepted(id, first, true);
    }
    metrics::counter!("tern_broadcasts_total", "to" => audience).increment(1);
    tracing::info!(id = %id, to = audience, recipients, "broadcast accepted");
    state.tasks.spawn(fan_out(state.clone(), msg, targets));
    accepted(id, recipients, false)
}

/// Deliver a broadcast, [`BROADCAST_BATCH`] recipients at a time: live where a session takes it,
/// otherwise stored; every recipient's state recorded in one status write per batch.
async fn fan_out(state: Arc<HttpState>, msg: Message, targets: Vec<Target>) {
    let started = Instant::now();
    let total = targets.len();
    for batch in targets.chunks(BROADCAST_BATCH) {
        let now = SystemTime::now();
        let mut updates = Vec::with_capacity(batch.len());
        let mut offline: Vec<(BareJid, Bytes)> = Vec::new();
        for target in batch {
            let (recipient, outcome) = match target {
                Err(bad) => (bad.0.clone(), Outcome::Error(bad.1.0)),
                Ok(to) => {
                    let live = stanza_for(&state, &msg, to).map(|stanza| {
                        let tried = deliver_live(
                            &state,
                            to,
                            msg.kind,
                            stanza.clone(),
                            Some(msg.meta.clone()),
                        );
                        (stanza, tried)
                    });
                    match live {
                        Err((e, _)) => (to.to_bare().to_string(), Outcome::Error(e)),
                        Ok((stanza, None)) => {
                            offline.push((to.to_bare(), stanza));
                            continue;
                        }
                        Ok((_, Some(o))) => (to.to_bare().to_string(), o),
                    }
                }
            };
            count_push(outcome.status(), outcome.error());
            updates.extend(status_update(msg.id(), recipient, outcome, now));
        }
        if !offline.is_empty() {
            let bares: Vec<String> = offline.iter().map(|(b, _)| b.to_string()).collect();
            let outcomes = store_offline(&state, &msg.meta, offline).await;
            for (recipient, o) in bares.into_iter().zip(outcomes) {
                count_push(o.status(), o.error());
                updates.extend(status_update(msg.id(), recipient, o, now));
            }
        }
        record_status(&state, updates).await;
        tokio::task::yield_now().await;
    }
    tracing::info!(
        id = %msg.id(),
        recipients = total,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "broadcast done"
    );
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
    /// When the client last sent anything (keep-alives included): tells a silent endpoint from a
    /// busy one.
    last_activity: String,
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
            last_activity: rfc3339(h.last_activity()),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_ids_are_remembered_bounded_and_for_a_while() {
        let t0 = Instant::now();
        let recent = RecentBroadcasts::default();
        assert_eq!(recent.claim("a", 3, t0), Ok(()));
        assert_eq!(recent.claim("a", 5, t0), Err(3), "the first answer");
        // Past the retention the id is new again (the queue's status records still know it).
        let later = t0 + RecentBroadcasts::RETENTION;
        assert_eq!(recent.claim("a", 5, later), Ok(()));
        assert_eq!(recent.claim("a", 1, later), Err(5));

        // At capacity the oldest id makes room; the memory never grows beyond it.
        let recent = RecentBroadcasts::default();
        for i in 0..RecentBroadcasts::CAPACITY {
            let at = t0 + Duration::from_millis(i as u64);
            assert_eq!(recent.claim(&format!("id-{i}"), 1, at), Ok(()));
        }
        let at = t0 + Duration::from_secs(60);
        assert_eq!(recent.claim("new", 1, at), Ok(()));
        assert_eq!(recent.ids.len(), RecentBroadcasts::CAPACITY);
        assert!(!recent.ids.contains_key("id-0"), "the oldest went");
        assert_eq!(recent.claim("id-1", 7, at), Err(1));
    }
}

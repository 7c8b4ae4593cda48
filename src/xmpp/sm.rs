//! Stream management (XEP-0198 v1.6, namespace `urn:xmpp:sm:3`), sans-IO.
//!
//! Two parts, both without sockets or clocks (`now` is always passed in):
//!
//! - [`StreamMgmt`]: the per-stream state a connection owns. It counts inbound stanzas and answers `<r/>`
//!   (§4), keeps every outbound stanza in a bounded "unacknowledged" buffer until the client's `<a h/>`
//!   covers it (§4), decides when to ask for an ack, and builds `<enabled/>` (§3).
//! - [`ResumptionRegistry`]: the shared store of broken streams that asked for resumption (§5). A detached
//!   session waits there until it is resumed, replaced by a new login of the same full JID, evicted by the
//!   bound, or its window runs out; every way out hands the session over exactly once, so the caller can
//!   resend or requeue its unacknowledged stanzas and nothing is lost (§4: "a server SHOULD treat
//!   unacknowledged stanzas in the same way that it would treat a stanza sent to an unavailable resource").
//!
//! Outbound stanzas carry an optional caller-chosen tag `T` (e.g. a push id or a durable-queue key) that
//! travels with the stanza through acks, detachment, resumption and expiry.
//!
//! Parsers for what the client sends (`<enable/>`, `<resume/>`, `<r/>`, `<a/>`) take attribute values as
//! `&str`, as the framer gives them ([`super::framer::Stanza::attr`]); builders return ready-to-write bytes.
//!
//! How the connection is expected to use it:
//!
//! | client sends | caller does |
//! |---|---|
//! | `<enable/>` (after bind) | [`parse_enable`], [`StreamMgmt::enable`]; write `Enabled::bytes`, or on error [`SmError::failed_bytes`] |
//! | `<enable/>` (before bind) | write [`failed_element`]`("unexpected-request")` (§3: not before resource binding) |
//! | `<resume/>` (after SASL, before bind) | [`parse_resume`], [`ResumptionRegistry::resume`]; write `Resumed::bytes`, then `Resumed::resend` |
//! | message / presence / iq | [`StreamMgmt::on_inbound_stanza`] once handled |
//! | `<r/>` | write [`StreamMgmt::on_request`] |
//! | `<a/>` | [`parse_ack`], [`StreamMgmt::on_ack`]; mark the released tags as acknowledged |
//!
//! An error from `on_ack`, `on_request` or `on_outbound_stanza` ends the stream with
//! [`SmError::stream_error_bytes`]. A stream that breaks without `</stream:stream>` goes through
//! [`StreamMgmt::into_detached`]: resumable ones into [`ResumptionRegistry::detach`], the others' stanzas
//! straight back to the durable queue. A stream that is still attached is not in the registry: a
//! `<resume/>` for it must first end the old stream (§5: "the old stream SHOULD be terminated") and detach
//! it, then resume.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use jid::{BareJid, FullJid};

use super::framer::escape;

/// The XEP-0198 v3 namespace (§2, §11.1).
pub const NS_SM: &str = "urn:xmpp:sm:3";
const NS_STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
const NS_STREAM_ERRORS: &str = "urn:ietf:params:xml:ns:xmpp-streams";

/// The stream feature advertised after authentication (§2).
pub const FEATURE: &str = "<sm xmlns='urn:xmpp:sm:3'/>";

/// §5: "The SM-ID SHOULD NOT be longer than 4000 bytes"; ours are 32 characters, so anything longer is junk.
const MAX_PREVID_LEN: usize = 4000;

/// Tunables (one `[sm]` config section).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmConfig {
    /// The server's maximum resumption window (§5 `max`); a client's smaller `max` wins. Zero disables
    /// resumption (acks still work).
    pub resume_window: Duration,
    /// Ask for an ack (`<r/>`) once this many stanzas were sent since the last request.
    pub request_every: u32,
    /// ... or once the oldest unrequested stanza is this old; also the delay before asking again when a
    /// request went unanswered.
    pub request_after: Duration,
    /// Bound on the unacknowledged buffer, in stanzas. Over it, the stream is closed (`policy-violation`):
    /// a client that never acks must not grow the server's memory.
    pub max_unacked_stanzas: usize,
    /// The same bound in bytes.
    pub max_unacked_bytes: usize,
    /// Bound on detached sessions kept by the [`ResumptionRegistry`]; the oldest are evicted first.
    pub max_detached: usize,
}

impl Default for SmConfig {
    fn default() -> Self {
        Self {
            resume_window: Duration::from_secs(300),
            request_every: 5,
            request_after: Duration::from_secs(30),
            max_unacked_stanzas: 1_000,
            max_unacked_bytes: 4 * 1024 * 1024,
            max_detached: 10_000,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// A stream management error on a live stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SmError {
    /// An SM element with a missing or malformed attribute (e.g. `h` that is not an xs:unsignedInt).
    #[error("malformed stream management element: {0}")]
    BadRequest(&'static str),
    /// `<r/>` or `<a/>` while stream management is not enabled.
    #[error("stream management is not enabled")]
    NotEnabled,
    /// A second `<enable/>` (§3: "a client SHALL only make at most one attempt to enable").
    #[error("stream management is already enabled")]
    AlreadyEnabled,
    /// §6: the peer acknowledged more stanzas than it was sent.
    #[error("you acknowledged {h} stanzas, but only {send_count} were sent")]
    HandledCountTooHigh { h: u32, send_count: u32 },
    /// The unacknowledged buffer went over [`SmConfig::max_unacked_stanzas`] or
    /// [`SmConfig::max_unacked_bytes`]. The stanza that crossed the bound *is* kept, so
    /// [`StreamMgmt::into_detached`] / [`StreamMgmt::take_unacked`] still return everything.
    #[error("too many unacknowledged stanzas ({stanzas} stanzas, {bytes} bytes)")]
    TooManyUnacked { stanzas: usize, bytes: usize },
}

impl SmError {
    /// The stanza error condition for a `<failed/>` answer to `<enable/>` (§6: "MUST be one of the
    /// stanza error conditions defined in RFC 6120").
    pub fn failed_condition(&self) -> &'static str {
        match self {
            SmError::BadRequest(_) => "bad-request",
            SmError::NotEnabled | SmError::AlreadyEnabled => "unexpected-request",
            SmError::HandledCountTooHigh { .. } | SmError::TooManyUnacked { .. } => {
                "undefined-condition"
            }
        }
    }

    /// `<failed xmlns='urn:xmpp:sm:3'><condition/></failed>` (§6).
    pub fn failed_bytes(&self) -> Bytes {
        failed_element(self.failed_condition())
    }

    /// The RFC 6120 §4.9.3 stream error condition when this error ends the stream.
    pub fn stream_condition(&self) -> &'static str {
        match self {
            SmError::BadRequest(_) => "bad-format",
            SmError::NotEnabled => "unsupported-stanza-type",
            SmError::AlreadyEnabled | SmError::TooManyUnacked { .. } => "policy-violation",
            // §6: "undefined-condition" with the application-specific <handled-count-too-high/>.
            SmError::HandledCountTooHigh { .. } => "undefined-condition",
        }
    }

    /// The application-specific condition element that goes with [`SmError::stream_condition`], if any.
    pub fn app_condition(&self) -> Option<String> {
        match self {
            SmError::HandledCountTooHigh { h, send_count } => Some(format!(
                "<handled-count-too-high xmlns='{NS_SM}' h='{h}' send-count='{send_count}'/>"
            )),
            _ => None,
        }
    }

    /// The whole `<stream:error>…</stream:error>` element (condition, application condition, text).
    /// The caller follows it with `</stream:stream>` and closes.
    pub fn stream_error_bytes(&self) -> Bytes {
        Bytes::from(format!(
            "<stream:error><{} xmlns='{NS_STREAM_ERRORS}'/>{}<text xmlns='{NS_STREAM_ERRORS}'>{}</text></stream:error>",
            self.stream_condition(),
            self.app_condition().unwrap_or_default(),
            escape(&self.to_string()),
        ))
    }
}

/// Why a `<resume/>` failed (§5). The answer is a `<failed/>`, after which the client may bind a resource
/// normally on the same stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResumeError {
    /// Unknown, expired, or belonging to another account: the same answer in every case, so an `SM-ID`
    /// reveals nothing to anyone else (§5: "MUST return a <failed/> element, which SHOULD include an error
    /// condition of <item-not-found/>"; only the entity that created the session may resume it, §5 and §9
    /// Security Considerations).
    #[error("no resumable session with that id")]
    ItemNotFound,
    /// The client claims to have handled more stanzas than the old stream sent (§6). The detached
    /// session is left in the registry untouched (it expires or is replaced as usual).
    #[error("you acknowledged {h} stanzas, but only {send_count} were sent")]
    HandledCountTooHigh { h: u32, send_count: u32 },
}

impl ResumeError {
    /// The `<failed/>` answer.
    pub fn failed_bytes(&self) -> Bytes {
        match self {
            ResumeError::ItemNotFound => failed_element("item-not-found"),
            ResumeError::HandledCountTooHigh { h, send_count } => Bytes::from(format!(
                "<failed xmlns='{NS_SM}'><undefined-condition xmlns='{NS_STANZAS}'/>\
                 <handled-count-too-high xmlns='{NS_SM}' h='{h}' send-count='{send_count}'/></failed>"
            )),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What the client sends: classification and attribute parsing
// ---------------------------------------------------------------------------------------------

/// A first-level element of the SM namespace the server handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmElement {
    /// `<enable/>` (§3).
    Enable,
    /// `<resume/>` (§5).
    Resume,
    /// `<r/>`: the client asks for an ack (§4).
    Request,
    /// `<a h/>`: the client acknowledges (§4).
    Ack,
}

/// Which SM element this first-level element is, if any (name and namespace as the framer reports them).
pub fn classify(name: &str, ns: Option<&str>) -> Option<SmElement> {
    if ns != Some(NS_SM) {
        return None;
    }
    match name {
        "enable" => Some(SmElement::Enable),
        "resume" => Some(SmElement::Resume),
        "r" => Some(SmElement::Request),
        "a" => Some(SmElement::Ack),
        _ => None,
    }
}

/// §4: only `<message/>`, `<presence/>` and `<iq/>` are counted; SM elements and other first-level
/// elements (nonzas) are not.
pub fn is_counted(name: &str, ns: Option<&str>) -> bool {
    matches!(name, "message" | "presence" | "iq")
        && matches!(ns, None | Some("jabber:client") | Some("jabber:server"))
}

/// The attributes of `<enable/>` (§3, §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnableRequest {
    /// `resume='true'` or `'1'`: the client wants a resumable stream.
    pub resume: bool,
    /// The client's preferred maximum resumption time in seconds.
    pub max: Option<u32>,
}

/// The attributes of `<resume/>` (§5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeRequest {
    pub previd: String,
    /// The number of stanzas the client handled from the old stream.
    pub h: u32,
}

/// XML whitespace (what xs:unsignedInt / xs:boolean collapse).
fn trim_xml(s: &str) -> &str {
    s.trim_matches(|c| matches!(c, ' ' | '\t' | '\r' | '\n'))
}

/// Parse a sequence number (xs:unsignedInt, §4, §12): ASCII digits, optional `+`, surrounding whitespace.
/// Anything else, including values of 2^32 and above, is [`SmError::BadRequest`].
pub fn parse_h(value: &str) -> Result<u32, SmError> {
    trim_xml(value)
        .parse::<u32>()
        .map_err(|_| SmError::BadRequest("'h' is not a 32-bit unsigned integer"))
}

/// xs:boolean: `true`/`1`/`false`/`0`.
fn parse_bool(value: &str) -> Result<bool, SmError> {
    match trim_xml(value) {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(SmError::BadRequest("'resume' is not a boolean")),
    }
}

/// `<enable resume? max?/>` (§3, §5). A missing `resume` means false.
pub fn parse_enable(resume: Option<&str>, max: Option<&str>) -> Result<EnableRequest, SmError> {
    let resume = resume.map(parse_bool).transpose()?.unwrap_or(false);
    let max = max
        .map(|m| {
            trim_xml(m)
                .parse::<u32>()
                .map_err(|_| SmError::BadRequest("'max' is not a 32-bit unsigned integer"))
        })
        .transpose()?;
    Ok(EnableRequest { resume, max })
}

/// `<resume previd h/>` (§5); both attributes are required in `urn:xmpp:sm:3`.
pub fn parse_resume(previd: Option<&str>, h: Option<&str>) -> Result<ResumeRequest, SmError> {
    let previd = previd.ok_or(SmError::BadRequest("'previd' is missing"))?;
    if previd.is_empty() || previd.len() > MAX_PREVID_LEN {
        return Err(SmError::BadRequest("'previd' is empty or too long"));
    }
    let h = parse_h(h.ok_or(SmError::BadRequest("'h' is missing"))?)?;
    Ok(ResumeRequest {
        previd: previd.to_owned(),
        h,
    })
}

/// `<a h/>` (§4).
pub fn parse_ack(h: Option<&str>) -> Result<u32, SmError> {
    parse_h(h.ok_or(SmError::BadRequest("'h' is missing"))?)
}

// ---------------------------------------------------------------------------------------------
// What the server sends
// ---------------------------------------------------------------------------------------------

/// `<r xmlns='urn:xmpp:sm:3'/>` (§4).
pub fn request_element() -> Bytes {
    Bytes::from_static(b"<r xmlns='urn:xmpp:sm:3'/>")
}

/// `<a xmlns='urn:xmpp:sm:3' h='…'/>` (§4).
pub fn ack_element(h: u32) -> Bytes {
    Bytes::from(format!("<a xmlns='{NS_SM}' h='{h}'/>"))
}

/// `<enabled/>` (§3), with `id`, `resume='true'` and `max` when resumable (§5).
pub fn enabled_element(resumable: Option<(&str, u32)>) -> Bytes {
    match resumable {
        Some((id, max)) => Bytes::from(format!(
            "<enabled xmlns='{NS_SM}' id='{}' resume='true' max='{max}'/>",
            escape(id)
        )),
        None => Bytes::from_static(b"<enabled xmlns='urn:xmpp:sm:3'/>"),
    }
}

/// `<resumed xmlns='urn:xmpp:sm:3' h='…' previd='…'/>` (§5); `h` is the server's inbound count.
pub fn resumed_element(h: u32, previd: &str) -> Bytes {
    Bytes::from(format!(
        "<resumed xmlns='{NS_SM}' h='{h}' previd='{}'/>",
        escape(previd)
    ))
}

/// `<failed xmlns='urn:xmpp:sm:3'><condition xmlns='…stanzas'/></failed>` (§6).
pub fn failed_element(condition: &str) -> Bytes {
    Bytes::from(format!(
        "<failed xmlns='{NS_SM}'><{condition} xmlns='{NS_STANZAS}'/></failed>"
    ))
}

// ---------------------------------------------------------------------------------------------
// Per-stream state
// ---------------------------------------------------------------------------------------------

/// The answer to a successful `<enable/>` (§3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enabled {
    /// The `<enabled/>` element to write.
    pub bytes: Bytes,
    /// The SM-ID when the stream is resumable.
    pub resume_id: Option<String>,
    /// The resumption window granted, when resumable.
    pub max: Option<Duration>,
}

/// How a stream without a clean `</stream:stream>` ends, from [`StreamMgmt::into_detached`].
#[derive(Debug)]
pub enum Detach<T> {
    /// Resumption was enabled: give this to [`ResumptionRegistry::detach`].
    Resumable {
        id: String,
        session: DetachedSession<T>,
    },
    /// Not resumable: these unacknowledged stanzas, in order, go back to the durable queue now.
    Requeue(Vec<(Bytes, Option<T>)>),
}

#[derive(Debug, Clone)]
struct ResumeInfo {
    id: String,
    max: Duration,
}

/// One stream's XEP-0198 state. Created disabled; [`StreamMgmt::enable`] or a resumption turns it on.
#[derive(Debug)]
pub struct StreamMgmt<T> {
    config: SmConfig,
    enabled: bool,
    resume: Option<ResumeInfo>,
    /// Stanzas handled from the client, mod 2^32 (§4).
    inbound_h: u32,
    /// The last `h` the client acknowledged, mod 2^32 (§4). The send count is `acked + unacked.len()`.
    acked: u32,
    /// Sent and not yet acknowledged, oldest first.
    unacked: VecDeque<(Bytes, Option<T>)>,
    unacked_bytes: usize,
    /// Stanzas sent since the last `<r/>` (or since the last ack that left no request pending).
    since_request: u32,
    /// When the first of those was sent.
    first_unrequested: Option<Instant>,
    /// An `<r/>` sent and not yet answered.
    pending_request: Option<Instant>,
}

impl<T> StreamMgmt<T> {
    pub fn new(config: SmConfig) -> Self {
        Self {
            config,
            enabled: false,
            resume: None,
            inbound_h: 0,
            acked: 0,
            unacked: VecDeque::new(),
            unacked_bytes: 0,
            since_request: 0,
            first_unrequested: None,
            pending_request: None,
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// The SM-ID, when resumption is enabled.
    pub fn resume_id(&self) -> Option<&str> {
        self.resume.as_ref().map(|r| r.id.as_str())
    }

    /// The resumption window granted, when resumption is enabled.
    pub fn resume_max(&self) -> Option<Duration> {
        self.resume.as_ref().map(|r| r.max)
    }

    /// Stanzas handled from the client, mod 2^32.
    pub fn inbound_h(&self) -> u32 {
        self.inbound_h
    }

    /// Stanzas sent to the client since enabling, mod 2^32.
    pub fn send_count(&self) -> u32 {
        self.acked.wrapping_add(self.unacked.len() as u32)
    }

    /// The last `h` the client acknowledged.
    pub fn acked_h(&self) -> u32 {
        self.acked
    }

    pub fn unacked_len(&self) -> usize {
        self.unacked.len()
    }

    pub fn unacked_bytes(&self) -> usize {
        self.unacked_bytes
    }

    /// When the unanswered `<r/>` was sent, if one is outstanding (lets the caller close a stream whose
    /// client stopped answering).
    pub fn request_pending_since(&self) -> Option<Instant> {
        self.pending_request
    }

    /// Handle `<enable/>` (§3). The caller checks that a resource is bound first (§3: the client MUST NOT
    /// enable before binding; answer [`failed_element`]`("unexpected-request")`).
    ///
    /// `token` must come from a CSPRNG (`rand::random()`): it becomes the SM-ID, the only secret besides
    /// the account that protects a detached session. Resumption is granted when asked for and
    /// [`SmConfig::resume_window`] is not zero, with `max = min(requested, window)` (a requested `max` of
    /// 0 means no resumption). Counting starts now, at zero (§4).
    pub fn enable(
        &mut self,
        request: EnableRequest,
        token: u128,
        _now: Instant,
    ) -> Result<Enabled, SmError> {
        if self.enabled {
            return Err(SmError::AlreadyEnabled);
        }
        let window = self.config.resume_window.as_secs().min(u64::from(u32::MAX)) as u32;
        let max = request.max.map_or(window, |m| m.min(window));
        self.enabled = true;
        self.inbound_h = 0;
        self.acked = 0;
        self.unacked.clear();
        self.unacked_bytes = 0;
        self.since_request = 0;
        self.first_unrequested = None;
        self.pending_request = None;
        if request.resume && max > 0 {
            let id = format!("{token:032x}");
            let bytes = enabled_element(Some((&id, max)));
            let max = Duration::from_secs(u64::from(max));
            self.resume = Some(ResumeInfo {
                id: id.clone(),
                max,
            });
            Ok(Enabled {
                bytes,
                resume_id: Some(id),
                max: Some(max),
            })
        } else {
            self.resume = None;
            Ok(Enabled {
                bytes: enabled_element(None),
                resume_id: None,
                max: None,
            })
        }
    }

    /// A `<message/>`, `<presence/>` or `<iq/>` from the client was handled (§4; see [`is_counted`]).
    /// Wraps at 2^32. Nothing is counted before stream management is enabled.
    pub fn on_inbound_stanza(&mut self) {
        if self.enabled {
            self.inbound_h = self.inbound_h.wrapping_add(1);
        }
    }

    /// Answer `<r/>` with `<a h/>` (§4: "MUST acknowledge it ... as soon as possible").
    pub fn on_request(&self) -> Result<Bytes, SmError> {
        if !self.enabled {
            return Err(SmError::NotEnabled);
        }
        Ok(ack_element(self.inbound_h))
    }

    /// A stanza (message / presence / iq) is being written to the client: keep it until acknowledged
    /// (§4, §8.1 "basic acking": put the stanza in the unacknowledged queue, then send it). Does nothing
    /// when stream management is not enabled.
    ///
    /// Over the bound ([`SmConfig::max_unacked_stanzas`] / [`SmConfig::max_unacked_bytes`]) the stanza is
    /// still kept and [`SmError::TooManyUnacked`] is returned: close the stream with
    /// [`SmError::stream_error_bytes`] (`policy-violation`), then detach or requeue as usual.
    pub fn on_outbound_stanza(
        &mut self,
        stanza: Bytes,
        tag: Option<T>,
        now: Instant,
    ) -> Result<(), SmError> {
        if !self.enabled {
            return Ok(());
        }
        self.unacked_bytes = self.unacked_bytes.saturating_add(stanza.len());
        self.unacked.push_back((stanza, tag));
        self.since_request = self.since_request.saturating_add(1);
        self.first_unrequested.get_or_insert(now);
        if self.unacked.len() > self.config.max_unacked_stanzas
            || self.unacked_bytes > self.config.max_unacked_bytes
        {
            return Err(SmError::TooManyUnacked {
                stanzas: self.unacked.len(),
                bytes: self.unacked_bytes,
            });
        }
        Ok(())
    }

    /// Handle `<a h/>` (§4): release, oldest first, the stanzas the client has now acknowledged.
    ///
    /// Arithmetic is mod 2^32 (§4: `h` wraps). An `h` that covers more than was sent (or goes backwards,
    /// which looks the same mod 2^32) is [`SmError::HandledCountTooHigh`] (§6: close the stream with
    /// `undefined-condition` and `<handled-count-too-high/>`); nothing is released then.
    pub fn on_ack(&mut self, h: u32, now: Instant) -> Result<Vec<(Bytes, Option<T>)>, SmError> {
        if !self.enabled {
            return Err(SmError::NotEnabled);
        }
        let n = h.wrapping_sub(self.acked) as usize;
        if n > self.unacked.len() {
            return Err(SmError::HandledCountTooHigh {
                h,
                send_count: self.send_count(),
            });
        }
        let released: Vec<_> = self.unacked.drain(..n).collect();
        let freed: usize = released.iter().map(|(b, _)| b.len()).sum();
        self.unacked_bytes = self.unacked_bytes.saturating_sub(freed);
        self.acked = h;
        self.pending_request = None;
        if self.unacked.is_empty() {
            self.since_request = 0;
            self.first_unrequested = None;
            // Give the buffer's memory back once idle.
            if self.unacked.capacity() > 16 {
                self.unacked = VecDeque::new();
            }
        } else {
            // Stanzas sent after the answered request (or not yet handled by the client) are
            // unrequested again: the count rule applies to them, and the time rule from now.
            self.since_request = u32::try_from(self.unacked.len()).unwrap_or(u32::MAX);
            if self.first_unrequested.is_none() {
                self.first_unrequested = Some(now);
            }
        }
        Ok(released)
    }

    /// Whether to send `<r/>` now: unacknowledged stanzas and either [`SmConfig::request_every`] of them
    /// sent since the last request, or the oldest of those older than [`SmConfig::request_after`]. While
    /// a request is unanswered, only the time rule applies (ask again after `request_after`).
    pub fn should_request(&self, now: Instant) -> bool {
        if !self.enabled || self.unacked.is_empty() {
            return false;
        }
        if self.pending_request.is_none() && self.since_request >= self.config.request_every.max(1)
        {
            return true;
        }
        self.next_request_at().is_some_and(|at| now >= at)
    }

    /// When the time rule of [`StreamMgmt::should_request`] fires next (for the connection's timer); the
    /// count rule is checked after each [`StreamMgmt::on_outbound_stanza`].
    pub fn next_request_at(&self) -> Option<Instant> {
        if !self.enabled || self.unacked.is_empty() {
            return None;
        }
        self.pending_request
            .or(self.first_unrequested)
            .and_then(|t| t.checked_add(self.config.request_after))
    }

    /// The `<r/>` to write (§4); records that a request is outstanding.
    pub fn request_bytes(&mut self, now: Instant) -> Bytes {
        self.pending_request = Some(now);
        self.since_request = 0;
        self.first_unrequested = None;
        request_element()
    }

    /// Everything still unacknowledged, oldest first, leaving the buffer empty (e.g. after a clean
    /// `</stream:stream>`, §7: the session ends, and undelivered pushes go back to the durable queue).
    pub fn take_unacked(&mut self) -> Vec<(Bytes, Option<T>)> {
        self.unacked_bytes = 0;
        self.since_request = 0;
        self.first_unrequested = None;
        self.pending_request = None;
        std::mem::take(&mut self.unacked).into()
    }

    /// The stream broke without `</stream:stream>` (§7: an unfinished stream). Resumable streams become a
    /// [`DetachedSession`] for [`ResumptionRegistry::detach`]; the others return their unacknowledged
    /// stanzas for requeueing.
    pub fn into_detached(mut self, full_jid: FullJid) -> Detach<T> {
        let unacked = self.take_unacked();
        match self.resume.take() {
            Some(info) if self.enabled => Detach::Resumable {
                id: info.id,
                session: DetachedSession {
                    full_jid,
                    inbound_h: self.inbound_h,
                    acked_h: self.acked,
                    unacked,
                    max: info.max,
                    presence: None,
                },
            },
            _ => Detach::Requeue(unacked),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Resumption
// ---------------------------------------------------------------------------------------------

/// A broken resumable stream, waiting for `<resume/>` (§5).
#[derive(Debug)]
pub struct DetachedSession<T> {
    /// The bound resource; only its account may resume.
    pub full_jid: FullJid,
    /// Stanzas the server handled from the client (goes back in `<resumed h/>`).
    pub inbound_h: u32,
    /// The last `h` the client acknowledged.
    pub acked_h: u32,
    /// Sent and not acknowledged, oldest first.
    pub unacked: Vec<(Bytes, Option<T>)>,
    /// The resumption window granted in `<enabled max/>`.
    pub max: Duration,
    /// The resource's last available presence and priority, restored on resumption (the caller
    /// fills it in; the stream itself does not know it).
    pub presence: Option<(i8, Bytes)>,
}

impl<T> DetachedSession<T> {
    /// Stanzas the old stream sent, mod 2^32.
    pub fn send_count(&self) -> u32 {
        self.acked_h.wrapping_add(self.unacked.len() as u32)
    }
}

/// A successful resumption (§5).
#[derive(Debug)]
pub struct Resumed<T> {
    /// The `<resumed h previd/>` element to write first.
    pub bytes: Bytes,
    /// Then these, in order: the stanzas the client had not handled (§5: "retransmit any stanzas that were
    /// not handled"). They are already tracked by `state` as unacknowledged: write them, do not pass them
    /// to [`StreamMgmt::on_outbound_stanza`] again.
    pub resend: Vec<Bytes>,
    /// Stanzas the client's `h` acknowledged (delivered while the old stream was breaking): mark them acked.
    pub acked: Vec<(Bytes, Option<T>)>,
    /// The resource to bind again.
    pub full_jid: FullJid,
    /// The presence to restore ([`DetachedSession::presence`]).
    pub presence: Option<(i8, Bytes)>,
    /// The stream's state to continue with: enabled, same SM-ID and window, counters carried over.
    pub state: StreamMgmt<T>,
}

#[derive(Debug)]
struct Entry<T> {
    session: DetachedSession<T>,
    deadline: Instant,
    seq: u64,
}

#[derive(Debug)]
struct Inner<T> {
    by_id: HashMap<String, Entry<T>>,
    by_jid: HashMap<FullJid, String>,
    by_deadline: BTreeMap<(Instant, u64), String>,
    by_age: BTreeMap<u64, String>,
    /// Evicted (bound, duplicate id or JID), reported by the next `expire`, with the time of eviction.
    evicted: Vec<(Instant, String, DetachedSession<T>)>,
    seq: u64,
}

impl<T> Inner<T> {
    fn remove(&mut self, id: &str) -> Option<Entry<T>> {
        let entry = self.by_id.remove(id)?;
        self.by_deadline.remove(&(entry.deadline, entry.seq));
        self.by_age.remove(&entry.seq);
        if self.by_jid.get(&entry.session.full_jid).map(String::as_str) == Some(id) {
            self.by_jid.remove(&entry.session.full_jid);
        }
        Some(entry)
    }

    fn evict(&mut self, id: &str, now: Instant) {
        if let Some(entry) = self.remove(id) {
            self.evicted.push((now, id.to_owned(), entry.session));
        }
    }
}

/// The detached sessions of the whole server (§5), shared by all connections.
///
/// One mutex inside; no method returns a guard or awaits, and every way out (`resume`, `expire`,
/// `take_by_jid`, `take_all`) removes the session under the lock, so a session is handed over exactly
/// once: it cannot be both resumed and expired.
#[derive(Debug)]
pub struct ResumptionRegistry<T> {
    config: SmConfig,
    inner: Mutex<Inner<T>>,
}

impl<T> ResumptionRegistry<T> {
    pub fn new(config: SmConfig) -> Self {
        Self {
            config,
            inner: Mutex::new(Inner {
                by_id: HashMap::new(),
                by_jid: HashMap::new(),
                by_deadline: BTreeMap::new(),
                by_age: BTreeMap::new(),
                evicted: Vec::new(),
                seq: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<T>> {
        // Every update keeps the maps consistent before anything that could panic: keep using them.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Detached sessions waiting (not counting evicted ones not yet reported by `expire`).
    pub fn len(&self) -> usize {
        self.lock().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keep a broken resumable stream until `now + session.max` (§5; capped at
    /// [`SmConfig::resume_window`]). A session already kept under the
    /// same id or the same full JID, and the oldest ones over [`SmConfig::max_detached`], are evicted and
    /// reported by the next [`ResumptionRegistry::expire`] (whose [`ResumptionRegistry::next_deadline`]
    /// is then already due).
    pub fn detach(&self, id: String, session: DetachedSession<T>, now: Instant) {
        let mut inner = self.lock();
        inner.evict(&id, now);
        if let Some(old) = inner.by_jid.get(&session.full_jid).cloned() {
            inner.evict(&old, now);
        }
        let seq = inner.seq;
        inner.seq += 1;
        // Never longer than the server's window, whatever the caller put in `max`.
        let deadline = now
            .checked_add(session.max.min(self.config.resume_window))
            .unwrap_or(now);
        inner.by_deadline.insert((deadline, seq), id.clone());
        inner.by_age.insert(seq, id.clone());
        inner.by_jid.insert(session.full_jid.clone(), id.clone());
        inner.by_id.insert(
            id,
            Entry {
                session,
                deadline,
                seq,
            },
        );
        while inner.by_id.len() > self.config.max_detached {
            let Some(oldest) = inner.by_age.first_key_value().map(|(_, id)| id.clone()) else {
                break;
            };
            inner.evict(&oldest, now);
        }
    }

    /// Handle `<resume previd h/>` from a client authenticated as `account` (§5).
    ///
    /// Fails with [`ResumeError::ItemNotFound`] for an unknown or expired id and for another account's
    /// session (which stays untouched), and with [`ResumeError::HandledCountTooHigh`] when `h` covers
    /// more than the old stream sent (§6). On success the session leaves the registry: the stanzas `h`
    /// covers come back in `acked`, the rest in `resend` (in order, and tracked again by `state`).
    pub fn resume(
        &self,
        previd: &str,
        h: u32,
        account: &BareJid,
        now: Instant,
    ) -> Result<Resumed<T>, ResumeError> {
        let entry = {
            let mut inner = self.lock();
            let Some(entry) = inner.by_id.get(previd) else {
                return Err(ResumeError::ItemNotFound);
            };
            // An expired session stays for `expire`, which hands it over for requeueing.
            if now >= entry.deadline || entry.session.full_jid.to_bare() != *account {
                return Err(ResumeError::ItemNotFound);
            }
            let n = h.wrapping_sub(entry.session.acked_h) as usize;
            if n > entry.session.unacked.len() {
                return Err(ResumeError::HandledCountTooHigh {
                    h,
                    send_count: entry.session.send_count(),
                });
            }
            inner.remove(previd).ok_or(ResumeError::ItemNotFound)?
        };
        let DetachedSession {
            full_jid,
            inbound_h,
            acked_h,
            unacked,
            max,
            presence,
        } = entry.session;
        let n = h.wrapping_sub(acked_h) as usize;
        let mut rest: VecDeque<_> = unacked.into();
        let acked: Vec<_> = rest.drain(..n.min(rest.len())).collect();
        let resend: Vec<Bytes> = rest.iter().map(|(b, _)| b.clone()).collect();
        let mut state = StreamMgmt::new(self.config);
        state.enabled = true;
        state.resume = Some(ResumeInfo {
            id: previd.to_owned(),
            max,
        });
        state.inbound_h = inbound_h;
        state.acked = h;
        state.unacked_bytes = rest.iter().map(|(b, _)| b.len()).sum();
        state.since_request = u32::try_from(rest.len()).unwrap_or(u32::MAX);
        state.first_unrequested = (!rest.is_empty()).then_some(now);
        state.unacked = rest;
        Ok(Resumed {
            bytes: resumed_element(inbound_h, previd),
            resend,
            acked,
            full_jid,
            presence,
            state,
        })
    }

    /// Sessions whose window ran out by `now`, and those evicted since the last call, each exactly once:
    /// put their unacknowledged stanzas back in the durable queue (§4: treat them like stanzas sent to an
    /// unavailable resource) and announce the resource unavailable.
    pub fn expire(&self, now: Instant) -> Vec<(String, DetachedSession<T>)> {
        let mut inner = self.lock();
        let mut out: Vec<_> = inner
            .evicted
            .drain(..)
            .map(|(_, id, session)| (id, session))
            .collect();
        while let Some((&(deadline, _), id)) = inner.by_deadline.first_key_value() {
            if deadline > now {
                break;
            }
            let id = id.clone();
            if let Some(entry) = inner.remove(&id) {
                out.push((id, entry.session));
            }
        }
        out
    }

    /// When [`ResumptionRegistry::expire`] has something to return next (already due if sessions were
    /// evicted).
    pub fn next_deadline(&self) -> Option<Instant> {
        let inner = self.lock();
        let evicted = inner.evicted.iter().map(|(at, _, _)| *at).min();
        let first = inner.by_deadline.first_key_value().map(|(&(at, _), _)| at);
        match (evicted, first) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// A new login bound `full_jid` while a detached session of that resource waits: take it out, so the
    /// caller can requeue its stanzas (or deliver them on the new stream) and it can no longer be resumed.
    pub fn take_by_jid(&self, full_jid: &FullJid) -> Option<(String, DetachedSession<T>)> {
        let mut inner = self.lock();
        let id = inner.by_jid.get(full_jid)?.clone();
        inner.remove(&id).map(|e| (id, e.session))
    }

    /// Everything, evicted ones included (graceful shutdown: requeue it all).
    pub fn take_all(&self) -> Vec<(String, DetachedSession<T>)> {
        let mut inner = self.lock();
        let mut out: Vec<_> = inner
            .evicted
            .drain(..)
            .map(|(_, id, session)| (id, session))
            .collect();
        let mut entries: Vec<_> = inner.by_id.drain().collect();
        entries.sort_by_key(|(_, e)| e.seq);
        out.extend(entries.into_iter().map(|(id, e)| (id, e.session)));
        inner.by_jid.clear();
        inner.by_deadline.clear();
        inner.by_age.clear();
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier};
    use std::thread;

    fn cfg() -> SmConfig {
        SmConfig::default()
    }

    fn full(s: &str) -> FullJid {
        FullJid::new(s).expect("test JID")
    }

    fn bare(s: &str) -> BareJid {
        BareJid::new(s).expect("test JID")
    }

    fn msg(i: u32) -> Bytes {
        Bytes::from(format!("<message id='m{i}'><body>{i}</body></message>"))
    }

    fn enabled(resume: bool, now: Instant) -> StreamMgmt<u32> {
        let mut sm = StreamMgmt::new(cfg());
        sm.enable(EnableRequest { resume, max: None }, 0x1234, now)
            .expect("enable");
        sm
    }

    fn send(sm: &mut StreamMgmt<u32>, range: std::ops::Range<u32>, now: Instant) {
        for i in range {
            sm.on_outbound_stanza(msg(i), Some(i), now)
                .expect("under the bound");
        }
    }

    fn tags(items: &[(Bytes, Option<u32>)]) -> Vec<u32> {
        items.iter().filter_map(|(_, t)| *t).collect()
    }

    #[test]
    fn stanzas_sent_while_a_request_was_out_are_requested_after_the_ack() {
        let now = Instant::now();
        let mut sm = StreamMgmt::new(SmConfig {
            request_every: 1,
            ..cfg()
        });
        sm.enable(
            EnableRequest {
                resume: false,
                max: None,
            },
            1,
            now,
        )
        .expect("enable");
        send(&mut sm, 0..1, now);
        assert!(sm.should_request(now));
        sm.request_bytes(now);
        // Sent before the client's answer arrived: the outstanding request does not cover it.
        send(&mut sm, 1..2, now);
        assert!(!sm.should_request(now), "one request at a time");
        assert_eq!(tags(&sm.on_ack(1, now).expect("ack")), [0]);
        assert!(
            sm.should_request(now),
            "not 30 s later: the count rule applies again"
        );
    }

    /// A detached session as the registry would get it, with `n` unacked stanzas tagged 0..n.
    fn detached(jid: &str, inbound_h: u32, acked_h: u32, n: u32) -> DetachedSession<u32> {
        DetachedSession {
            full_jid: full(jid),
            inbound_h,
            acked_h,
            unacked: (0..n).map(|i| (msg(i), Some(i))).collect(),
            max: Duration::from_secs(300),
            presence: None,
        }
    }

    // ---- parsing and builders ----

    #[test]
    fn parse_h_is_robust() {
        assert_eq!(parse_h("0"), Ok(0));
        assert_eq!(parse_h(" 42\n"), Ok(42));
        assert_eq!(parse_h("+7"), Ok(7));
        assert_eq!(parse_h("0004294967295"), Ok(u32::MAX));
        for bad in [
            "",
            " ",
            "-1",
            "4294967296",
            "99999999999999999999999",
            "1.0",
            "0x10",
            "1e3",
            "abc",
            "١٢",
            "+",
        ] {
            assert!(
                matches!(parse_h(bad), Err(SmError::BadRequest(_))),
                "{bad:?} accepted"
            );
        }
        assert!(matches!(parse_ack(None), Err(SmError::BadRequest(_))));
        assert_eq!(parse_ack(Some("5")), Ok(5));
    }

    #[test]
    fn parse_enable_and_resume() {
        assert_eq!(
            parse_enable(None, None),
            Ok(EnableRequest {
                resume: false,
                max: None
            })
        );
        assert_eq!(
            parse_enable(Some("1"), Some("60")),
            Ok(EnableRequest {
                resume: true,
                max: Some(60)
            })
        );
        assert_eq!(parse_enable(Some("true"), None).map(|e| e.resume), Ok(true));
        assert_eq!(
            parse_enable(Some("false"), None).map(|e| e.resume),
            Ok(false)
        );
        assert!(parse_enable(Some("yes"), None).is_err());
        assert!(parse_enable(Some("true"), Some("-5")).is_err());

        assert_eq!(
            parse_resume(Some("abc"), Some("3")),
            Ok(ResumeRequest {
                previd: "abc".into(),
                h: 3
            })
        );
        assert!(parse_resume(None, Some("3")).is_err());
        assert!(parse_resume(Some("abc"), None).is_err());
        assert!(parse_resume(Some(""), Some("3")).is_err());
        assert!(parse_resume(Some(&"x".repeat(5000)), Some("3")).is_err());
        assert!(parse_resume(Some("abc"), Some("lots")).is_err());
    }

    #[test]
    fn classify_and_count_rules() {
        assert_eq!(classify("enable", Some(NS_SM)), Some(SmElement::Enable));
        assert_eq!(classify("resume", Some(NS_SM)), Some(SmElement::Resume));
        assert_eq!(classify("r", Some(NS_SM)), Some(SmElement::Request));
        assert_eq!(classify("a", Some(NS_SM)), Some(SmElement::Ack));
        assert_eq!(classify("a", Some("urn:xmpp:sm:2")), None);
        assert_eq!(classify("r", None), None);
        assert!(is_counted("message", None));
        assert!(is_counted("iq", Some("jabber:client")));
        assert!(is_counted("presence", None));
        assert!(!is_counted("r", Some(NS_SM)));
        assert!(!is_counted("a", Some(NS_SM)));
        assert!(!is_counted("message", Some(NS_SM)));
    }

    #[test]
    fn builders() {
        assert_eq!(&request_element()[..], b"<r xmlns='urn:xmpp:sm:3'/>");
        assert_eq!(&ack_element(7)[..], b"<a xmlns='urn:xmpp:sm:3' h='7'/>");
        assert_eq!(
            &resumed_element(3, "id'x")[..],
            b"<resumed xmlns='urn:xmpp:sm:3' h='3' previd='id&apos;x'/>"
        );
        assert_eq!(
            &failed_element("item-not-found")[..],
            &b"<failed xmlns='urn:xmpp:sm:3'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></failed>"[..]
        );
        // Every builder's output is well-formed XML.
        for b in [
            request_element(),
            ack_element(u32::MAX),
            enabled_element(Some(("abc", 300))),
            enabled_element(None),
            resumed_element(1, "<&>"),
            failed_element("bad-request"),
            ResumeError::HandledCountTooHigh {
                h: 5,
                send_count: 2,
            }
            .failed_bytes(),
        ] {
            let s = std::str::from_utf8(&b).expect("utf-8");
            s.parse::<minidom::Element>()
                .unwrap_or_else(|e| panic!("{s}: {e}"));
        }
    }

    // ---- enable ----

    #[test]
    fn enable_resumable_with_max_negotiation() {
        let now = Instant::now();
        let mut sm: StreamMgmt<u32> = StreamMgmt::new(cfg());
        assert!(!sm.is_enabled());
        let en = sm
            .enable(
                EnableRequest {
                    resume: true,
                    max: Some(60),
                },
                0xabc,
                now,
            )
            .expect("enable");
        let id = "00000000000000000000000000000abc";
        assert_eq!(en.resume_id.as_deref(), Some(id));
        assert_eq!(en.max, Some(Duration::from_secs(60)));
        assert_eq!(
            std::str::from_utf8(&en.bytes),
            Ok(
                format!("<enabled xmlns='urn:xmpp:sm:3' id='{id}' resume='true' max='60'/>")
                    .as_str()
            )
        );
        assert_eq!(sm.resume_id(), Some(id));

        // The server's window caps the client's wish; no wish means the window.
        let mut sm: StreamMgmt<u32> = StreamMgmt::new(cfg());
        let en = sm
            .enable(
                EnableRequest {
                    resume: true,
                    max: Some(100_000),
                },
                1,
                now,
            )
            .expect("enable");
        assert_eq!(en.max, Some(Duration::from_secs(300)));
        let mut sm: StreamMgmt<u32> = StreamMgmt::new(cfg());
        let en = sm
            .enable(
                EnableRequest {
                    resume: true,
                    max: None,
                },
                1,
                now,
            )
            .expect("enable");
        assert_eq!(en.max, Some(Duration::from_secs(300)));
        assert!(std::str::from_utf8(&en.bytes).is_ok_and(|s| s.contains("max='300'")));
    }

    #[test]
    fn enable_without_resumption() {
        let now = Instant::now();
        let mut sm: StreamMgmt<u32> = StreamMgmt::new(cfg());
        let en = sm
            .enable(
                EnableRequest {
                    resume: false,
                    max: Some(60),
                },
                1,
                now,
            )
            .expect("enable");
        assert_eq!(&en.bytes[..], b"<enabled xmlns='urn:xmpp:sm:3'/>");
        assert_eq!(en.resume_id, None);

        // Resumption disabled by config.
        let mut sm: StreamMgmt<u32> = StreamMgmt::new(SmConfig {
            resume_window: Duration::ZERO,
            ..cfg()
        });
        let en = sm
            .enable(
                EnableRequest {
                    resume: true,
                    max: None,
                },
                1,
                now,
            )
            .expect("enable");
        assert_eq!(en.resume_id, None);
        assert!(sm.is_enabled());
        // Not resumable: a broken stream hands its stanzas back at once.
        send(&mut sm, 0..2, now);
        match sm.into_detached(full("a@x/r")) {
            Detach::Requeue(items) => assert_eq!(tags(&items), vec![0, 1]),
            Detach::Resumable { .. } => panic!("resumable"),
        }
    }

    #[test]
    fn second_enable_is_unexpected_request() {
        let now = Instant::now();
        let mut sm = enabled(true, now);
        sm.on_inbound_stanza();
        let err = sm
            .enable(
                EnableRequest {
                    resume: true,
                    max: None,
                },
                2,
                now,
            )
            .expect_err("second enable");
        assert_eq!(err, SmError::AlreadyEnabled);
        assert_eq!(
            &err.failed_bytes()[..],
            &b"<failed xmlns='urn:xmpp:sm:3'><unexpected-request xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></failed>"[..]
        );
        // State untouched.
        assert_eq!(sm.inbound_h(), 1);
    }

    // ---- inbound counting ----

    #[test]
    fn inbound_counting_and_request_answers() {
        let now = Instant::now();
        let mut sm: StreamMgmt<u32> = StreamMgmt::new(cfg());
        sm.on_inbound_stanza(); // before enable: not counted (§4)
        assert_eq!(sm.on_request(), Err(SmError::NotEnabled));
        let mut sm = enabled(false, now);
        assert_eq!(
            &sm.on_request().expect("a")[..],
            b"<a xmlns='urn:xmpp:sm:3' h='0'/>"
        );
        for _ in 0..3 {
            sm.on_inbound_stanza();
        }
        assert_eq!(
            &sm.on_request().expect("a")[..],
            b"<a xmlns='urn:xmpp:sm:3' h='3'/>"
        );
    }

    #[test]
    fn inbound_count_wraps_at_2_pow_32() {
        let now = Instant::now();
        let reg: ResumptionRegistry<u32> = ResumptionRegistry::new(cfg());
        reg.detach("w".into(), detached("a@x/r", u32::MAX - 1, 0, 0), now);
        let mut r = reg.resume("w", 0, &bare("a@x"), now).expect("resume");
        assert_eq!(r.state.on_request(), Ok(ack_element(u32::MAX - 1)));
        r.state.on_inbound_stanza();
        assert_eq!(r.state.inbound_h(), u32::MAX);
        r.state.on_inbound_stanza();
        assert_eq!(r.state.inbound_h(), 0);
        r.state.on_inbound_stanza();
        assert_eq!(
            &r.state.on_request().expect("a")[..],
            b"<a xmlns='urn:xmpp:sm:3' h='1'/>"
        );
    }

    // ---- outbound tracking ----

    #[test]
    fn ack_releases_exactly_the_acknowledged_items_in_order() {
        let now = Instant::now();
        let mut sm = enabled(false, now);
        send(&mut sm, 0..5, now);
        assert_eq!(sm.send_count(), 5);
        assert_eq!(sm.unacked_len(), 5);

        let r = sm.on_ack(2, now).expect("ack");
        assert_eq!(tags(&r), vec![0, 1]);
        assert_eq!(r[0].0, msg(0));
        assert_eq!(sm.unacked_len(), 3);
        assert_eq!(
            sm.unacked_bytes(),
            (2..5).map(|i| msg(i).len()).sum::<usize>()
        );

        // The same h again releases nothing.
        assert!(sm.on_ack(2, now).expect("ack").is_empty());
        let r = sm.on_ack(5, now).expect("ack");
        assert_eq!(tags(&r), vec![2, 3, 4]);
        assert_eq!(sm.unacked_len(), 0);
        assert_eq!(sm.unacked_bytes(), 0);
        assert_eq!(sm.acked_h(), 5);

        // Tags are optional.
        sm.on_outbound_stanza(msg(9), None, now).expect("send");
        let r = sm.on_ack(6, now).expect("ack");
        assert_eq!(r, vec![(msg(9), None)]);
    }

    #[test]
    fn outbound_counting_wraps_at_2_pow_32() {
        let now = Instant::now();
        let reg: ResumptionRegistry<u32> = ResumptionRegistry::new(cfg());
        // The old stream's client had acked u32::MAX - 1; two stanzas (tags 0, 1) were outstanding.
        reg.detach("w".into(), detached("a@x/r", 0, u32::MAX - 1, 2), now);
        let mut r = reg
            .resume("w", u32::MAX, &bare("a@x"), now)
            .expect("resume");
        assert_eq!(tags(&r.acked), vec![0]);
        assert_eq!(r.resend, vec![msg(1)]);
        let sm = &mut r.state;
        assert_eq!(sm.send_count(), 0); // u32::MAX + 1 wraps
        send(sm, 10..13, now);
        assert_eq!(sm.send_count(), 3);
        // h wrapped past zero: releases the resent stanza and the first new one.
        let released = sm.on_ack(1, now).expect("ack");
        assert_eq!(tags(&released), vec![1, 10]);
        // h too high across the wrap.
        assert_eq!(
            sm.on_ack(4, now),
            Err(SmError::HandledCountTooHigh {
                h: 4,
                send_count: 3
            })
        );
        assert_eq!(tags(&sm.on_ack(3, now).expect("ack")), vec![11, 12]);
    }

    #[test]
    fn ack_too_high_is_an_error_and_releases_nothing() {
        let now = Instant::now();
        let mut sm = enabled(false, now);
        send(&mut sm, 0..8, now);
        let err = sm.on_ack(10, now).expect_err("too high");
        assert_eq!(
            err,
            SmError::HandledCountTooHigh {
                h: 10,
                send_count: 8
            }
        );
        assert_eq!(sm.unacked_len(), 8);
        assert_eq!(err.stream_condition(), "undefined-condition");
        let xml = String::from_utf8(err.stream_error_bytes().to_vec()).expect("utf-8");
        assert!(xml.starts_with(
            "<stream:error><undefined-condition xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>\
             <handled-count-too-high xmlns='urn:xmpp:sm:3' h='10' send-count='8'/><text"
        ));
        // Well-formed once the stream prefix is declared.
        let wrapped = xml.replace(
            "<stream:error>",
            "<stream:error xmlns:stream='http://etherx.jabber.org/streams'>",
        );
        wrapped
            .parse::<minidom::Element>()
            .unwrap_or_else(|e| panic!("{wrapped}: {e}"));

        // An h that goes backwards is just as invalid.
        assert_eq!(sm.on_ack(4, now).map(|r| r.len()), Ok(4));
        assert!(matches!(
            sm.on_ack(3, now),
            Err(SmError::HandledCountTooHigh { .. })
        ));
        assert_eq!(sm.unacked_len(), 4);
    }

    #[test]
    fn ack_and_request_before_enable_are_errors() {
        let now = Instant::now();
        let mut sm: StreamMgmt<u32> = StreamMgmt::new(cfg());
        assert_eq!(sm.on_ack(0, now), Err(SmError::NotEnabled));
        assert_eq!(
            SmError::NotEnabled.stream_condition(),
            "unsupported-stanza-type"
        );
        // Outbound stanzas are not tracked before enable.
        sm.on_outbound_stanza(msg(0), Some(0), now).expect("ok");
        assert_eq!(sm.unacked_len(), 0);
        assert!(!sm.should_request(now + Duration::from_secs(3600)));
    }

    #[test]
    fn unacked_bound_by_count_is_reported() {
        let now = Instant::now();
        let mut sm: StreamMgmt<u32> = StreamMgmt::new(SmConfig {
            max_unacked_stanzas: 3,
            ..cfg()
        });
        sm.enable(
            EnableRequest {
                resume: true,
                max: None,
            },
            1,
            now,
        )
        .expect("enable");
        send(&mut sm, 0..3, now);
        let err = sm
            .on_outbound_stanza(msg(3), Some(3), now)
            .expect_err("over the bound");
        assert_eq!(
            err,
            SmError::TooManyUnacked {
                stanzas: 4,
                bytes: (0..4).map(|i| msg(i).len()).sum()
            }
        );
        assert_eq!(err.stream_condition(), "policy-violation");
        // Nothing lost: the stanza over the bound is still there for requeueing.
        match sm.into_detached(full("a@x/r")) {
            Detach::Resumable { session, .. } => {
                assert_eq!(tags(&session.unacked), vec![0, 1, 2, 3])
            }
            Detach::Requeue(_) => panic!("not resumable"),
        }
    }

    #[test]
    fn unacked_bound_by_bytes_is_reported_and_acks_free_room() {
        let now = Instant::now();
        let len = msg(0).len();
        let mut sm: StreamMgmt<u32> = StreamMgmt::new(SmConfig {
            max_unacked_bytes: 2 * len,
            ..cfg()
        });
        sm.enable(
            EnableRequest {
                resume: false,
                max: None,
            },
            1,
            now,
        )
        .expect("enable");
        send(&mut sm, 0..2, now);
        assert!(matches!(
            sm.on_outbound_stanza(msg(2), Some(2), now),
            Err(SmError::TooManyUnacked { stanzas: 3, .. })
        ));
        sm.on_ack(2, now).expect("ack");
        assert_eq!(sm.unacked_bytes(), len);
        sm.on_outbound_stanza(msg(3), Some(3), now)
            .expect("room again");
    }

    #[test]
    fn should_request_by_count() {
        let now = Instant::now();
        let mut sm: StreamMgmt<u32> = StreamMgmt::new(SmConfig {
            request_every: 3,
            request_after: Duration::from_secs(3600),
            ..cfg()
        });
        sm.enable(
            EnableRequest {
                resume: false,
                max: None,
            },
            1,
            now,
        )
        .expect("enable");
        assert!(!sm.should_request(now));
        send(&mut sm, 0..2, now);
        assert!(!sm.should_request(now));
        send(&mut sm, 2..3, now);
        assert!(sm.should_request(now));
        assert_eq!(&sm.request_bytes(now)[..], b"<r xmlns='urn:xmpp:sm:3'/>");
        assert_eq!(sm.request_pending_since(), Some(now));
        assert!(!sm.should_request(now));
        // While the request is unanswered, more stanzas do not trigger another one.
        send(&mut sm, 3..7, now);
        assert!(!sm.should_request(now));
        // The answer covers the first three; four were sent since the request: ask again.
        sm.on_ack(3, now).expect("ack");
        assert_eq!(sm.request_pending_since(), None);
        assert!(sm.should_request(now));
        sm.request_bytes(now);
        sm.on_ack(7, now).expect("ack");
        assert!(!sm.should_request(now));
    }

    #[test]
    fn should_request_by_time() {
        let t0 = Instant::now();
        let after = Duration::from_secs(10);
        let mut sm: StreamMgmt<u32> = StreamMgmt::new(SmConfig {
            request_every: 100,
            request_after: after,
            ..cfg()
        });
        sm.enable(
            EnableRequest {
                resume: false,
                max: None,
            },
            1,
            t0,
        )
        .expect("enable");
        assert_eq!(sm.next_request_at(), None);
        send(&mut sm, 0..1, t0);
        send(&mut sm, 1..2, t0 + Duration::from_secs(5));
        // Timed from the oldest unrequested stanza.
        assert_eq!(sm.next_request_at(), Some(t0 + after));
        assert!(!sm.should_request(t0 + Duration::from_secs(9)));
        assert!(sm.should_request(t0 + after));
        let t1 = t0 + after;
        sm.request_bytes(t1);
        assert!(!sm.should_request(t1 + Duration::from_secs(9)));
        // Unanswered: ask again after `request_after`.
        assert_eq!(sm.next_request_at(), Some(t1 + after));
        assert!(sm.should_request(t1 + after));
        // A partial answer restarts the clock for what is left.
        let t2 = t1 + Duration::from_secs(1);
        sm.on_ack(1, t2).expect("ack");
        assert!(!sm.should_request(t2 + Duration::from_secs(9)));
        assert!(sm.should_request(t2 + after));
        // Everything acknowledged: nothing to ask.
        sm.on_ack(2, t2).expect("ack");
        assert!(!sm.should_request(t2 + Duration::from_secs(3600)));
        assert_eq!(sm.next_request_at(), None);
    }

    #[test]
    fn take_unacked_empties_the_buffer() {
        let now = Instant::now();
        let mut sm = enabled(true, now);
        send(&mut sm, 0..3, now);
        sm.on_ack(1, now).expect("ack");
        assert_eq!(tags(&sm.take_unacked()), vec![1, 2]);
        assert_eq!(sm.unacked_len(), 0);
        assert_eq!(sm.unacked_bytes(), 0);
        assert!(sm.take_unacked().is_empty());
    }

    // ---- resumption ----

    /// An enabled, resumable stream that sent 0..5 (acked 2) and handled 3 inbound stanzas, detached.
    fn broken_stream(
        reg: &ResumptionRegistry<u32>,
        jid: &str,
        token: u128,
        now: Instant,
    ) -> String {
        let mut sm: StreamMgmt<u32> = StreamMgmt::new(cfg());
        sm.enable(
            EnableRequest {
                resume: true,
                max: Some(120),
            },
            token,
            now,
        )
        .expect("enable");
        for _ in 0..3 {
            sm.on_inbound_stanza();
        }
        send(&mut sm, 0..5, now);
        sm.on_ack(2, now).expect("ack");
        match sm.into_detached(full(jid)) {
            Detach::Resumable { id, session } => {
                assert_eq!(session.inbound_h, 3);
                assert_eq!(session.acked_h, 2);
                assert_eq!(session.max, Duration::from_secs(120));
                reg.detach(id.clone(), session, now);
                id
            }
            Detach::Requeue(_) => panic!("not resumable"),
        }
    }

    #[test]
    fn resume_by_the_same_account_resends_only_the_unacked_in_order() {
        let t0 = Instant::now();
        let reg: ResumptionRegistry<u32> = ResumptionRegistry::new(cfg());
        let id = broken_stream(&reg, "alice@x/phone", 7, t0);
        assert_eq!(reg.len(), 1);

        // The client got stanza 2 before the connection died (h = 3).
        let now = t0 + Duration::from_secs(30);
        let mut r = reg.resume(&id, 3, &bare("alice@x"), now).expect("resume");
        assert!(reg.is_empty());
        assert_eq!(
            std::str::from_utf8(&r.bytes),
            Ok(format!("<resumed xmlns='urn:xmpp:sm:3' h='3' previd='{id}'/>").as_str())
        );
        assert_eq!(tags(&r.acked), vec![2]);
        assert_eq!(r.resend, vec![msg(3), msg(4)]);
        assert_eq!(r.full_jid, full("alice@x/phone"));

        // The new stream continues the old one: same id and window, counters carried over.
        let sm = &mut r.state;
        assert!(sm.is_enabled());
        assert_eq!(sm.resume_id(), Some(id.as_str()));
        assert_eq!(sm.resume_max(), Some(Duration::from_secs(120)));
        assert_eq!(sm.inbound_h(), 3);
        assert_eq!(sm.send_count(), 5);
        assert_eq!(sm.unacked_len(), 2);
        // A second enable on a resumed stream is refused.
        assert!(
            sm.enable(
                EnableRequest {
                    resume: true,
                    max: None
                },
                1,
                now
            )
            .is_err()
        );
        send(sm, 5..6, now);
        assert_eq!(tags(&sm.on_ack(6, now).expect("ack")), vec![3, 4, 5]);

        // Resumed once only.
        assert_eq!(
            reg.resume(&id, 3, &bare("alice@x"), now).map(|_| ()),
            Err(ResumeError::ItemNotFound)
        );
    }

    #[test]
    fn detach_resume_round_trip_keeps_inbound_h() {
        let t0 = Instant::now();
        let reg: ResumptionRegistry<u32> = ResumptionRegistry::new(cfg());
        let id = broken_stream(&reg, "a@x/r", 1, t0);
        let mut r = reg.resume(&id, 2, &bare("a@x"), t0).expect("resume");
        assert_eq!(r.resend.len(), 3);
        r.state.on_inbound_stanza();
        r.state.on_inbound_stanza();
        // Break again, resume again: the count goes on (3 + 2), the same SM-ID works.
        let Detach::Resumable { id: id2, session } = r.state.into_detached(r.full_jid) else {
            panic!("not resumable");
        };
        assert_eq!(id2, id);
        assert_eq!(session.inbound_h, 5);
        reg.detach(id2, session, t0);
        let r = reg.resume(&id, 5, &bare("a@x"), t0).expect("resume");
        assert_eq!(r.state.inbound_h(), 5);
        assert!(std::str::from_utf8(&r.bytes).is_ok_and(|s| s.contains("h='5'")));
        assert_eq!(tags(&r.acked), vec![2, 3, 4]);
        assert!(r.resend.is_empty());
        assert_eq!(r.state.unacked_len(), 0);
    }

    #[test]
    fn resume_by_another_account_is_item_not_found() {
        let now = Instant::now();
        let reg: ResumptionRegistry<u32> = ResumptionRegistry::new(cfg());
        let id = broken_stream(&reg, "alice@x/phone", 1, now);
        let err = reg
            .resume(&id, 2, &bare("mallory@x"), now)
            .map(|_| ())
            .expect_err("other account");
        assert_eq!(err, ResumeError::ItemNotFound);
        // Same answer as an unknown id: nothing leaks.
        assert_eq!(
            err.failed_bytes(),
            reg.resume("nope", 2, &bare("mallory@x"), now)
                .map(|_| ())
                .expect_err("unknown")
                .failed_bytes()
        );
        assert_eq!(
            &err.failed_bytes()[..],
            &b"<failed xmlns='urn:xmpp:sm:3'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></failed>"[..]
        );
        // Another domain with the same local part is another account too.
        assert!(reg.resume(&id, 2, &bare("alice@y"), now).is_err());
        // The owner can still resume.
        assert!(reg.resume(&id, 2, &bare("alice@x"), now).is_ok());
    }

    #[test]
    fn resume_with_h_too_high_fails_and_keeps_the_session() {
        let now = Instant::now();
        let reg: ResumptionRegistry<u32> = ResumptionRegistry::new(cfg());
        let id = broken_stream(&reg, "a@x/r", 1, now);
        let err = reg
            .resume(&id, 6, &bare("a@x"), now)
            .map(|_| ())
            .expect_err("too high");
        assert_eq!(
            err,
            ResumeError::HandledCountTooHigh {
                h: 6,
                send_count: 5
            }
        );
        assert!(std::str::from_utf8(&err.failed_bytes()).is_ok_and(|s| {
            s.contains("<handled-count-too-high xmlns='urn:xmpp:sm:3' h='6' send-count='5'/>")
        }));
        // Below the last ack is as wrong as above the send count.
        assert!(matches!(
            reg.resume(&id, 1, &bare("a@x"), now),
            Err(ResumeError::HandledCountTooHigh { .. })
        ));
        assert_eq!(reg.len(), 1);
        let expired = reg.expire(now + Duration::from_secs(120));
        assert_eq!(expired.len(), 1);
        assert_eq!(tags(&expired[0].1.unacked), vec![2, 3, 4]);
    }

    #[test]
    fn expired_id_is_item_not_found_and_expire_returns_it_once() {
        let t0 = Instant::now();
        let reg: ResumptionRegistry<u32> = ResumptionRegistry::new(cfg());
        let id = broken_stream(&reg, "a@x/r", 1, t0);
        assert_eq!(reg.next_deadline(), Some(t0 + Duration::from_secs(120)));

        assert!(reg.expire(t0 + Duration::from_secs(119)).is_empty());
        let late = t0 + Duration::from_secs(120);
        // Past the window, even before `expire` ran, resumption is refused...
        assert_eq!(
            reg.resume(&id, 2, &bare("a@x"), late).map(|_| ()),
            Err(ResumeError::ItemNotFound)
        );
        // ... and the session is still handed over for requeueing, exactly once.
        let expired = reg.expire(late);
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].0, id);
        assert_eq!(expired[0].1.full_jid, full("a@x/r"));
        assert_eq!(tags(&expired[0].1.unacked), vec![2, 3, 4]);
        assert!(reg.expire(late + Duration::from_secs(1000)).is_empty());
        assert!(reg.is_empty());
        assert_eq!(reg.next_deadline(), None);
        assert_eq!(
            reg.resume(&id, 2, &bare("a@x"), late).map(|_| ()),
            Err(ResumeError::ItemNotFound)
        );
    }

    #[test]
    fn expire_in_deadline_order_across_windows() {
        let t0 = Instant::now();
        let reg: ResumptionRegistry<u32> = ResumptionRegistry::new(cfg());
        let mut long = detached("a@x/1", 0, 0, 1);
        long.max = Duration::from_secs(100);
        let mut short = detached("a@x/2", 0, 0, 1);
        short.max = Duration::from_secs(10);
        reg.detach("long".into(), long, t0);
        reg.detach("short".into(), short, t0 + Duration::from_secs(1));
        assert_eq!(reg.next_deadline(), Some(t0 + Duration::from_secs(11)));
        let e = reg.expire(t0 + Duration::from_secs(50));
        assert_eq!(
            e.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
            ["short"]
        );
        let e = reg.expire(t0 + Duration::from_secs(100));
        assert_eq!(
            e.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
            ["long"]
        );
    }

    #[test]
    fn take_by_jid_on_new_login() {
        let now = Instant::now();
        let reg: ResumptionRegistry<u32> = ResumptionRegistry::new(cfg());
        let id = broken_stream(&reg, "a@x/r", 1, now);
        assert!(reg.take_by_jid(&full("a@x/other")).is_none());
        let (got, session) = reg.take_by_jid(&full("a@x/r")).expect("detached");
        assert_eq!(got, id);
        assert_eq!(tags(&session.unacked), vec![2, 3, 4]);
        assert!(reg.take_by_jid(&full("a@x/r")).is_none());
        assert!(reg.resume(&id, 2, &bare("a@x"), now).is_err());
        assert!(reg.expire(now + Duration::from_secs(1000)).is_empty());
    }

    #[test]
    fn same_jid_detached_twice_evicts_the_older() {
        let now = Instant::now();
        let reg: ResumptionRegistry<u32> = ResumptionRegistry::new(cfg());
        reg.detach("old".into(), detached("a@x/r", 0, 0, 2), now);
        reg.detach("new".into(), detached("a@x/r", 0, 0, 3), now);
        assert_eq!(reg.len(), 1);
        assert_eq!(reg.next_deadline(), Some(now));
        let e = reg.expire(now);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].0, "old");
        assert_eq!(e[0].1.unacked.len(), 2);
        assert_eq!(
            reg.take_by_jid(&full("a@x/r")).map(|(id, _)| id),
            Some("new".into())
        );
    }

    #[test]
    fn bound_evicts_oldest_first_through_expire() {
        let t0 = Instant::now();
        let reg: ResumptionRegistry<u32> = ResumptionRegistry::new(SmConfig {
            max_detached: 2,
            ..cfg()
        });
        for i in 0..4u32 {
            reg.detach(
                format!("s{i}"),
                detached(&format!("u{i}@x/r"), 0, 0, i + 1),
                t0 + Duration::from_secs(u64::from(i)),
            );
        }
        assert_eq!(reg.len(), 2);
        let e = reg.expire(t0 + Duration::from_secs(4));
        assert_eq!(
            e.iter()
                .map(|(id, s)| (id.as_str(), s.unacked.len()))
                .collect::<Vec<_>>(),
            [("s0", 1), ("s1", 2)]
        );
        assert!(reg.resume("s0", 0, &bare("u0@x"), t0).is_err());
        assert!(reg.resume("s3", 0, &bare("u3@x"), t0).is_ok());
        assert!(reg.expire(t0 + Duration::from_secs(4)).is_empty());
        let all = reg.take_all();
        assert_eq!(
            all.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
            ["s2"]
        );
        assert!(reg.is_empty());
        assert_eq!(reg.next_deadline(), None);
    }

    #[test]
    fn concurrent_resume_and_expire_hand_over_exactly_once() {
        let t0 = Instant::now();
        for round in 0..200u32 {
            let reg: Arc<ResumptionRegistry<u32>> = Arc::new(ResumptionRegistry::new(cfg()));
            let id = broken_stream(&reg, "a@x/r", u128::from(round), t0);
            let barrier = Arc::new(Barrier::new(3));
            let resumer = {
                let (reg, id, barrier) = (reg.clone(), id.clone(), barrier.clone());
                thread::spawn(move || {
                    barrier.wait();
                    // Within the window from the resumer's point of view.
                    reg.resume(&id, 2, &bare("a@x"), t0 + Duration::from_secs(119))
                        .ok()
                        .map(|r| r.state.unacked_len())
                })
            };
            let expirer = {
                let (reg, barrier) = (reg.clone(), barrier.clone());
                thread::spawn(move || {
                    barrier.wait();
                    reg.expire(t0 + Duration::from_secs(500))
                })
            };
            let taker = {
                let (reg, barrier) = (reg.clone(), barrier.clone());
                thread::spawn(move || {
                    barrier.wait();
                    reg.take_by_jid(&full("a@x/r"))
                })
            };
            let resumed = resumer.join().expect("resumer");
            let expired = expirer.join().expect("expirer");
            let taken = taker.join().expect("taker");
            let winners = usize::from(resumed.is_some())
                + usize::from(!expired.is_empty())
                + usize::from(taken.is_some());
            assert_eq!(winners, 1, "round {round}");
            if let Some(n) = resumed {
                assert_eq!(n, 3);
            }
            for (_, s) in &expired {
                assert_eq!(tags(&s.unacked), vec![2, 3, 4]);
            }
            if let Some((_, s)) = &taken {
                assert_eq!(tags(&s.unacked), vec![2, 3, 4]);
            }
            assert!(reg.is_empty());
        }
    }
}

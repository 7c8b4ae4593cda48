//! The sans-IO client-to-server stream state machine (RFC 6120 §4–§8, RFC 6121).
//!
//! Framer events, TLS completion and the passage of time go in; bytes to write and instructions for the
//! connection task (start TLS, restart the framer, close) come out through [`C2s::poll_action`]. It never
//! touches a socket or reads a clock: `now` is always passed in, so tests drive it directly. Routing goes
//! through the in-memory [`Router`], whose API never blocks.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use jid::{BareJid, FullJid, Jid};
use minidom::Element;

use super::framer::{Event, FrameError, Stanza, StreamHeader, escape};
use super::router::{
    Delivery, Kick, Kind, MessageType, Outgoing, PushFate, PushFates, PushMeta, Router,
    SessionHandle,
};
use super::sasl::{self, Mechanism, SaslFailure, SaslServer, Step};
use super::server_iq;
use super::sm::{
    self, Detach, ResumeError, ResumeRequest, ResumptionRegistry, SmConfig, SmElement, SmError,
    StreamMgmt,
};
use crate::auth::{AuthThrottle, Authenticator};

pub const NS_STREAMS: &str = "http://etherx.jabber.org/streams";
pub const NS_CLIENT: &str = "jabber:client";
const NS_TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
const NS_SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
const NS_BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
const NS_SESSION: &str = "urn:ietf:params:xml:ns:xmpp-session";
const NS_STREAM_ERRORS: &str = "urn:ietf:params:xml:ns:xmpp-streams";
const NS_STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";

/// Directed-presence recipients remembered per session for the final `unavailable` (RFC 6121 §4.6.3);
/// beyond this, further recipients are not remembered (a bound on client-driven memory).
const MAX_DIRECTED_PRESENCE: usize = 1000;

/// RFC 6120 §6.4.5: allow a reasonable number of SASL retries (2 to 5) before closing the stream.
const MAX_SASL_ATTEMPTS: u32 = 5;

/// A `<resume/>` for a session whose old stream is still attached ends that stream, then waits this
/// long for it to detach (XEP-0198 §5: "the old stream SHOULD be terminated").
const RESUME_TAKEOVER_WAIT: Duration = Duration::from_secs(2);
/// How often the resumption is retried meanwhile.
const RESUME_RETRY: Duration = Duration::from_millis(10);

/// One stream's XEP-0198 state; the tag of a stanza is its push identity, when it is a push.
type Sm = StreamMgmt<Arc<PushMeta>>;

/// Server-wide, read-only context shared by every connection.
pub struct C2sContext {
    pub domain: String,
    pub router: Arc<Router>,
    pub auth: Arc<Authenticator>,
    pub throttle: Arc<AuthThrottle>,
    pub preauth_timeout: Duration,
    pub preauth_max_bytes: usize,
    /// Inbound silence after which the server pings (XEP-0199 §4.2); `None` disables.
    pub ping_interval: Option<Duration>,
    pub ping_timeout: Duration,
    /// XEP-0198 tunables (`[sm]`).
    pub sm: SmConfig,
    /// Broken resumable streams, waiting for `<resume/>`.
    pub resumption: Arc<ResumptionRegistry<Arc<PushMeta>>>,
    /// Where acknowledged and requeued pushes are reported (the durable queue's owner); `None`
    /// without a queue.
    pub fates: Option<PushFates>,
    /// XEP-0215 services and credentials (the embedded TURN server); `None` without TURN.
    pub extdisco: Option<Arc<super::extdisco::ExtDisco>>,
}

/// What the connection task must do next, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Write these bytes to the peer.
    Write(Bytes),
    /// Wait this long before doing the following actions (slows down repeated authentication failures).
    Pause(Duration),
    /// `<proceed/>` was written: flush, then run the TLS handshake and start a fresh framer (RFC 6120 §5.4.3.3:
    /// nothing received before TLS may be kept).
    StartTls,
    /// SASL succeeded: the framer must expect a new stream header (RFC 6120 §6.4.6).
    RestartStream,
    /// Flush and close the connection (any closing bytes were already queued as `Write`).
    Close,
}

/// Where in the negotiation the stream is (RFC 6120 §4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the client's stream header.
    AwaitHeader,
    /// Features sent; waiting for STARTTLS / SASL / bind.
    Negotiating,
    /// Resource bound: stanzas are routed.
    Active,
    Closed,
}

/// One client connection's protocol state.
pub struct C2s {
    ctx: Arc<C2sContext>,
    handle: Arc<SessionHandle>,
    peer: SocketAddr,
    phase: Phase,
    secure: bool,
    header_sent: bool,
    username: Option<String>,
    jid: Option<FullJid>,
    sasl: Option<SaslServer>,
    sasl_failures: u32,
    available: bool,
    /// Entities that got directed presence and must get `unavailable` at the end (RFC 6121 §4.6.3).
    directed: HashSet<Jid>,
    inbound_bytes: usize,
    started: Instant,
    last_inbound: Instant,
    ping_sent: Option<Instant>,
    ping_seq: u32,
    actions: VecDeque<Action>,
    /// The latest time passed in (for stream management's bookkeeping on paths without a `now`).
    now: Instant,
    /// XEP-0198 state, allocated only once the client enables it.
    sm: Option<Box<Sm>>,
    /// The last available presence and its priority (restored when a detached session resumes).
    presence: Option<(i8, Bytes)>,
    /// A `<resume/>` waiting for the old stream to detach: request, next try, give-up time.
    pending_resume: Option<Box<(ResumeRequest, Instant, Instant)>>,
    /// The close about to happen keeps the session resumable (dead peer, or resumed elsewhere).
    resumable_close: bool,
}

impl C2s {
    /// `secure` is true on direct-TLS listeners (XEP-0368), false where STARTTLS is required first.
    pub fn new(
        ctx: Arc<C2sContext>,
        handle: Arc<SessionHandle>,
        peer: SocketAddr,
        secure: bool,
        now: Instant,
    ) -> Self {
        Self {
            ctx,
            handle,
            peer,
            phase: Phase::AwaitHeader,
            secure,
            header_sent: false,
            username: None,
            jid: None,
            sasl: None,
            sasl_failures: 0,
            available: false,
            directed: HashSet::new(),
            inbound_bytes: 0,
            started: now,
            last_inbound: now,
            ping_sent: None,
            ping_seq: 0,
            actions: VecDeque::new(),
            now,
            sm: None,
            presence: None,
            pending_resume: None,
            resumable_close: false,
        }
    }

    /// Whether XEP-0198 is enabled on this stream (outbound stanzas must then be reported through
    /// [`C2s::on_written`]).
    pub fn sm_enabled(&self) -> bool {
        self.sm.is_some()
    }

    /// A stanza is about to be written to the client by the connection (routed to it, or replayed
    /// from the offline queue): stream management keeps it until the client acknowledges it.
    pub fn on_written(&mut self, stanza: &Bytes, tag: Option<Arc<PushMeta>>, now: Instant) {
        self.now = now;
        self.track(stanza.clone(), tag);
    }

    /// [`C2s::on_written`] for a batch of routed stanzas.
    pub fn on_routed(&mut self, batch: &[Outgoing], now: Instant) {
        self.now = now;
        for (b, tag) in batch {
            self.track(b.clone(), tag.clone());
        }
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// True when queued actions must be carried out before more input is parsed: bytes after `<starttls/>`
    /// must not be read as plaintext, and a stream restart must happen before the next header.
    pub fn wants_io_first(&self) -> bool {
        self.actions.iter().any(|a| {
            matches!(
                a,
                Action::StartTls | Action::RestartStream | Action::Close | Action::Pause(_)
            )
        })
    }

    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// The bound full JID, once resource binding succeeded.
    pub fn jid(&self) -> Option<&FullJid> {
        self.jid.as_ref()
    }

    /// True once the bound session has sent available presence (RFC 6121 §4.2).
    pub fn is_available(&self) -> bool {
        self.available
    }

    pub fn is_authenticated(&self) -> bool {
        self.username.is_some()
    }

    /// `n` bytes arrived from the peer (whitespace keep-alives included: RFC 6120 §4.6.1).
    pub fn on_bytes(&mut self, n: usize, now: Instant) {
        self.now = now;
        self.last_inbound = now;
        self.ping_sent = None;
        if self.username.is_none() {
            self.inbound_bytes += n;
            if self.inbound_bytes > self.ctx.preauth_max_bytes {
                metrics::counter!("tern_limit_hits_total", "limit" => "preauth_max_bytes")
                    .increment(1);
                tracing::info!(peer = %self.peer, limit = self.ctx.preauth_max_bytes,
                    "closing: pre-authentication byte budget exceeded (limits.preauth_max_bytes)");
                self.stream_error(
                    "policy-violation",
                    Some("pre-authentication byte budget exceeded"),
                );
            }
        }
    }

    /// The framer failed: the matching stream error (RFC 6120 §4.9.3), then close.
    pub fn on_frame_error(&mut self, err: &FrameError) {
        let cond = err.condition();
        if cond == "policy-violation" {
            metrics::counter!("tern_limit_hits_total", "limit" => "stanza").increment(1);
        }
        tracing::info!(peer = %self.peer, error = %err, "closing: {cond}");
        self.stream_error(cond, Some(&err.to_string()));
    }

    /// The TLS handshake after `<proceed/>` finished: the client opens a new stream (RFC 6120 §5.4.3.3).
    pub fn on_tls_established(&mut self) {
        self.secure = true;
        self.header_sent = false;
        self.phase = Phase::AwaitHeader;
    }

    /// The next moment [`C2s::on_timeout`] wants to be called.
    pub fn next_timeout(&self) -> Option<Instant> {
        if self.phase == Phase::Closed {
            return None;
        }
        [
            self.session_deadline(),
            self.sm.as_ref().and_then(|sm| sm.next_request_at()),
            self.pending_resume.as_ref().map(|p| p.1),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Pre-authentication timeout, or the keep-alive ping's next step.
    fn session_deadline(&self) -> Option<Instant> {
        // Until a resource is bound the session is not usable: the pre-auth deadline still applies.
        if self.jid.is_none() {
            return Some(self.started + self.ctx.preauth_timeout);
        }
        match self.ping_sent {
            Some(at) => Some(at + self.ctx.ping_timeout),
            None => self.ctx.ping_interval.map(|i| self.last_inbound + i),
        }
    }

    pub fn on_timeout(&mut self, now: Instant) {
        if self.phase == Phase::Closed {
            return;
        }
        self.now = now;
        if let Some(pending) = self.pending_resume.take() {
            let (req, next, give_up) = *pending;
            if now < next {
                self.pending_resume = Some(Box::new((req, next, give_up)));
            } else {
                self.try_resume(req, Some(give_up));
            }
        }
        if let Some(sm) = self.sm.as_mut()
            && sm.should_request(now)
        {
            let r = sm.request_bytes(now);
            self.write_bytes(r);
        }
        let Some(due) = self.session_deadline() else {
            return;
        };
        if now < due {
            return;
        }
        if self.jid.is_none() {
            metrics::counter!("tern_limit_hits_total", "limit" => "preauth_timeout").increment(1);
            tracing::info!(peer = %self.peer, "closing: no session bound within limits.preauth_timeout_secs");
            self.stream_error("connection-timeout", Some("authentication timeout"));
        } else if self.ping_sent.is_some() {
            metrics::counter!("tern_ping_timeouts_total").increment(1);
            tracing::info!(peer = %self.peer, jid = ?self.jid.as_ref().map(|j| j.to_string()),
                "closing: no answer to ping (c2s.ping_timeout_secs)");
            // The peer is gone, not misbehaving: a resumable session waits for it (XEP-0198 §5).
            self.resumable_close = true;
            self.stream_error("connection-timeout", None);
        } else if let Some(jid) = &self.jid {
            // XEP-0199 §4.2: server-to-client ping; any inbound data counts as the answer.
            self.ping_seq += 1;
            let ping = format!(
                "<iq type='get' id='tern-ping-{}' from='{}' to='{}'><ping xmlns='urn:xmpp:ping'/></iq>",
                self.ping_seq,
                escape(&self.ctx.domain),
                escape(jid.as_str())
            );
            self.write_stanza(Bytes::from(ping));
            self.ping_sent = Some(now);
        }
    }

    /// Something outside asked this session to end.
    pub fn on_kick(&mut self, why: Kick) {
        match why {
            Kick::Conflict => self.stream_error("conflict", Some("replaced by a new login")),
            Kick::Disconnect => {
                self.stream_error("policy-violation", Some("disconnected by the operator"))
            }
            // The client resumed this session on a new stream: hand the state over, say nothing
            // (the old connection is most likely dead).
            Kick::Resumed => {
                self.resumable_close = true;
                self.close();
            }
        }
    }

    /// Graceful server shutdown (RFC 6120 §4.9.3.17).
    pub fn on_shutdown(&mut self) {
        self.stream_error("system-shutdown", None);
    }

    /// The connection is gone. Closed by the peer or broken (no `close` decided here): a resumable
    /// session waits for `<resume/>` (XEP-0198 §5).
    pub fn on_disconnected(&mut self) {
        if self.phase != Phase::Closed {
            self.leave(true);
        }
        self.phase = Phase::Closed;
    }

    /// Unbind and broadcast `unavailable` (RFC 6121 §4.6): once, whichever way the session ends.
    ///
    /// Pushes written and not acknowledged, and those still waiting in the outbound queue, are not
    /// lost: with `resumable` and a resumable stream they wait in the resumption registry, otherwise
    /// they go back to the durable queue.
    fn leave(&mut self, resumable: bool) {
        let Some(jid) = self.jid.take() else {
            return;
        };
        let current = self.ctx.router.is_current(&jid, self.handle.id);
        let mut pending = Vec::new();
        self.handle.drain(usize::MAX, &mut pending);
        // A replaced session says nothing: its full JID lives on in the new session.
        if self.available && current {
            let unavailable = Bytes::from(format!(
                "<presence type='unavailable' from='{}'/>",
                escape(jid.as_str())
            ));
            self.broadcast_unavailable(&jid, unavailable);
        }
        self.ctx.router.unbind(&jid, self.handle.id);
        metrics::gauge!("tern_sessions").decrement(1.0);
        let Some(mut sm) = self.sm.take() else {
            return self.requeue(&jid, pending);
        };
        // Never written: to stream management the same as written and lost, so a resumption
        // resends them in order.
        for (b, tag) in pending {
            let _ = sm.on_outbound_stanza(b, tag, self.now);
        }
        if !(resumable && current) {
            let unacked = sm.take_unacked();
            return self.requeue(&jid, unacked);
        }
        match sm.into_detached(jid.clone()) {
            Detach::Resumable { id, mut session } => {
                session.presence = self.presence.take();
                metrics::counter!("tern_sm_detached_total").increment(1);
                tracing::debug!(peer = %self.peer, jid = %jid, "session detached for resumption");
                self.ctx.resumption.detach(id, session, self.now);
            }
            Detach::Requeue(unacked) => self.requeue(&jid, unacked),
        }
    }

    /// Send the pushes among `items` back to the durable queue, in order (other stanzas are dropped
    /// as for an unavailable resource).
    fn requeue(&self, jid: &FullJid, items: Vec<Outgoing>) {
        requeue(&self.ctx, jid.to_bare(), items);
    }

    /// Feed one framer event.
    pub fn on_event(&mut self, event: Event, now: Instant) {
        if self.phase == Phase::Closed {
            return;
        }
        self.now = now;
        match event {
            Event::StreamOpen(header) => self.on_stream_open(&header),
            Event::StreamClose => {
                // RFC 6120 §4.4: answer the close with ours, then end the connection.
                self.write_static("</stream:stream>");
                self.close();
            }
            Event::Stanza(stanza) => {
                if self.phase != Phase::Active && self.phase != Phase::Negotiating {
                    self.stream_error("not-well-formed", Some("stanza before stream header"));
                    return;
                }
                metrics::counter!("tern_stanzas_in_total").increment(1);
                self.on_stanza(stanza, now);
            }
        }
    }

    fn on_stream_open(&mut self, h: &StreamHeader) {
        if self.phase != Phase::AwaitHeader {
            self.stream_error("not-well-formed", Some("unexpected stream header"));
            return;
        }
        // RFC 6120 §4.9.1.2: the error needs an open stream, so send our header first.
        self.send_header(h);
        let local_name = h.name.rsplit(':').next();
        if h.stream_ns.as_deref() != Some(NS_STREAMS) || local_name != Some("stream") {
            return self.stream_error("invalid-namespace", None);
        }
        if h.default_ns.as_deref() != Some(NS_CLIENT) {
            return self.stream_error("invalid-namespace", Some("expected jabber:client"));
        }
        if let Some(to) = &h.to
            && !to.eq_ignore_ascii_case(&self.ctx.domain)
        {
            return self.stream_error(
                "host-unknown",
                Some("this server does not serve that domain"),
            );
        }
        if h.version.as_deref().and_then(|v| v.split('.').next()) != Some("1") {
            return self.stream_error("unsupported-version", Some("version 1.0 is required"));
        }
        self.phase = Phase::Negotiating;
        let features = if !self.secure {
            // RFC 6120 §5.3.1: TLS is mandatory here, so nothing else is offered before it.
            format!(
                "<stream:features><starttls xmlns='{NS_TLS}'><required/></starttls></stream:features>"
            )
        } else if self.username.is_none() {
            let mechs: String = sasl::OFFERED
                .iter()
                .map(|m| format!("<mechanism>{}</mechanism>", m.name()))
                .collect();
            format!(
                "<stream:features><mechanisms xmlns='{NS_SASL}'>{mechs}</mechanisms></stream:features>"
            )
        } else {
            format!(
                "<stream:features><bind xmlns='{NS_BIND}'/><session xmlns='{NS_SESSION}'><optional/></session>{}</stream:features>",
                sm::FEATURE
            )
        };
        self.write(features);
    }

    fn send_header(&mut self, h: &StreamHeader) {
        if self.header_sent {
            return;
        }
        self.header_sent = true;
        let id: u128 = rand::random();
        let to = h
            .from
            .as_deref()
            .filter(|_| self.username.is_some())
            .map(|f| format!(" to='{}'", escape(f)))
            .unwrap_or_default();
        self.write(format!(
            "<?xml version='1.0'?><stream:stream xmlns='{NS_CLIENT}' xmlns:stream='{NS_STREAMS}' \
             id='{id:032x}' from='{}'{to} version='1.0' xml:lang='en'>",
            escape(&self.ctx.domain)
        ));
    }

    fn on_stanza(&mut self, stanza: Stanza, now: Instant) {
        /// First-level elements by what they are for, decided without copying the name.
        enum Class {
            StartTls,
            Sasl,
            Stanza,
            Sm(SmElement),
            Other,
        }
        let class = match (stanza.name(), stanza.ns()) {
            ("starttls", Some(NS_TLS)) => Class::StartTls,
            ("auth" | "response" | "abort", Some(NS_SASL)) => Class::Sasl,
            ("message" | "presence" | "iq", None | Some(NS_CLIENT)) => Class::Stanza,
            (name, ns) => sm::classify(name, ns).map_or(Class::Other, Class::Sm),
        };
        match (self.phase, class) {
            (Phase::Negotiating, Class::StartTls) => {
                if self.secure {
                    self.write(format!("<failure xmlns='{NS_TLS}'/></stream:stream>"));
                    self.close();
                } else {
                    self.write(format!("<proceed xmlns='{NS_TLS}'/>"));
                    self.actions.push_back(Action::StartTls);
                }
            }
            (Phase::Negotiating, Class::Sasl) => self.on_sasl(&stanza, now),
            (Phase::Negotiating, Class::Stanza)
                if self.username.is_some() && stanza.name() == "iq" =>
            {
                self.on_bind_phase_iq(&stanza)
            }
            (Phase::Active, Class::Stanza) => {
                self.on_routable(stanza);
                // XEP-0198 §4: handled (delivered, answered or bounced).
                if let Some(sm) = self.sm.as_mut() {
                    sm.on_inbound_stanza();
                }
            }
            (Phase::Negotiating, Class::Sm(SmElement::Resume))
                if self.username.is_some() && self.pending_resume.is_none() =>
            {
                match sm::parse_resume(
                    stanza.attr("previd").as_deref(),
                    stanza.attr("h").as_deref(),
                ) {
                    Ok(req) => self.try_resume(req, None),
                    Err(e) => self.write_bytes(e.failed_bytes()),
                }
            }
            // XEP-0198 §3: not before resource binding.
            (Phase::Negotiating, Class::Sm(SmElement::Enable)) if self.username.is_some() => {
                self.write_bytes(sm::failed_element("unexpected-request"))
            }
            (Phase::Active, Class::Sm(el)) => self.on_sm(el, &stanza),
            (Phase::Negotiating, _) if !self.secure => {
                self.stream_error("policy-violation", Some("STARTTLS is required first"))
            }
            // RFC 6120 §7.1: nothing is processed before authentication and binding.
            (Phase::Negotiating, _) => self.stream_error("not-authorized", None),
            _ => self.stream_error("unsupported-stanza-type", None),
        }
    }

    // ---- SASL (RFC 6120 §6) -------------------------------------------------------------------

    fn on_sasl(&mut self, stanza: &Stanza, now: Instant) {
        if !self.secure {
            // RFC 6120 §6.4.1 / §5.3.1: no SASL before TLS on a STARTTLS port.
            return self.sasl_failure(SaslFailure::EncryptionRequired, now);
        }
        if self.username.is_some() {
            return self.stream_error("policy-violation", Some("already authenticated"));
        }
        let Ok(el) = parse_element(stanza) else {
            return self.stream_error("not-well-formed", None);
        };
        let payload = match decode_sasl_payload(&el.text()) {
            Ok(p) => p,
            Err(()) => return self.sasl_failure(SaslFailure::MalformedRequest, now),
        };
        let step = match el.name() {
            "abort" => {
                self.sasl = None;
                Step::Failure(SaslFailure::Aborted)
            }
            "auth" => {
                let Some(mech) = el.attr("mechanism").and_then(Mechanism::from_name) else {
                    return self.sasl_failure(SaslFailure::InvalidMechanism, now);
                };
                let (server, step) =
                    SaslServer::start(mech, payload.as_deref(), &*self.ctx.auth, rand::random());
                self.sasl = Some(server);
                step
            }
            _ => match self.sasl.as_mut() {
                Some(s) => s.step(payload.as_deref().unwrap_or(&[]), &*self.ctx.auth),
                None => Step::Failure(SaslFailure::MalformedRequest),
            },
        };
        match step {
            Step::Challenge(data) => {
                let text = B64.encode(data);
                self.write(format!("<challenge xmlns='{NS_SASL}'>{text}</challenge>"));
            }
            Step::Success {
                username,
                additional,
            } => {
                self.sasl = None;
                self.ctx.throttle.record_success(self.peer.ip());
                let data = additional.map(|d| B64.encode(d)).unwrap_or_default();
                self.write(format!("<success xmlns='{NS_SASL}'>{data}</success>"));
                self.username = Some(username);
                self.header_sent = false;
                self.phase = Phase::AwaitHeader;
                self.actions.push_back(Action::RestartStream);
            }
            Step::Failure(f) => {
                self.sasl = None;
                self.sasl_failure(f, now);
            }
        }
    }

    fn sasl_failure(&mut self, f: SaslFailure, now: Instant) {
        let ip = self.peer.ip();
        if f == SaslFailure::NotAuthorized {
            let delay = self.ctx.throttle.delay_for(ip, now);
            self.ctx.throttle.record_failure(ip, now);
            if !delay.is_zero() {
                self.actions.push_back(Action::Pause(delay));
            }
        }
        self.write(format!(
            "<failure xmlns='{NS_SASL}'><{}/></failure>",
            f.condition()
        ));
        self.sasl_failures += 1;
        if self.sasl_failures >= MAX_SASL_ATTEMPTS {
            self.stream_error("policy-violation", Some("too many authentication attempts"));
        }
    }

    // ---- Resource binding (RFC 6120 §7) and legacy session ---------------------------------------

    fn on_bind_phase_iq(&mut self, stanza: &Stanza) {
        let id = stanza.id().map(|s| s.into_owned()).unwrap_or_default();
        match stanza.first_child() {
            Some((name, Some(ns)))
                if name == "bind"
                    && ns == NS_BIND
                    && stanza.stanza_type().as_deref() == Some("set") =>
            {
                self.bind(stanza, &id)
            }
            // RFC 6120 §7.1: only binding is possible before a resource is bound.
            _ => self.write(stanza_error(
                "iq",
                &id,
                None,
                None,
                "auth",
                "not-authorized",
            )),
        }
    }

    fn bind(&mut self, stanza: &Stanza, id: &str) {
        let Some(user) = self.username.clone() else {
            return self.stream_error("not-authorized", None);
        };
        let requested = parse_element(stanza).ok().and_then(|iq| {
            iq.get_child("bind", NS_BIND)
                .and_then(|b| b.get_child("resource", NS_BIND))
                .map(|r| r.text())
                .filter(|r| !r.trim().is_empty())
        });
        let resource = requested.unwrap_or_else(|| format!("tern-{:016x}", rand::random::<u64>()));
        let Ok(jid) = FullJid::new(&format!("{user}@{}/{resource}", self.ctx.domain)) else {
            // RFC 6120 §7.7.2.1: a resource that cannot be processed is `bad-request`.
            return self.write(stanza_error("iq", id, None, None, "modify", "bad-request"));
        };
        // Credentials were checked for the lower-cased username; the bound identity is its nodeprep
        // form. They must be the same account, or a look-alike name (e.g. full-width letters) could
        // authenticate as one user and bind as another.
        if jid.node().map(|n| n.as_str()) != Some(user.to_lowercase().as_str()) {
            tracing::info!(peer = %self.peer, username = %user, "refusing a non-canonical username");
            return self.stream_error("not-authorized", Some("username is not in canonical form"));
        }
        // A new login of a resource that waits detached ends that session; its pushes go back to
        // the queue and reach this session by replay.
        if let Some((_, old)) = self.ctx.resumption.take_by_jid(&jid) {
            requeue(&self.ctx, jid.to_bare(), old.unacked);
        }
        match self.ctx.router.bind(&jid, self.handle.clone()) {
            // RFC 6120 §7.7.2.2: override the old session; it gets <conflict/>.
            Ok(Some(old)) => old.kick(Kick::Conflict),
            Ok(None) => {}
            Err(e) => {
                metrics::counter!("tern_limit_hits_total", "limit" => "max_resources_per_account")
                    .increment(1);
                tracing::info!(peer = %self.peer, jid = %jid, "bind refused: {e}");
                // RFC 6120 §7.6.2.1: resource-constraint, the client may try again later.
                return self.write(stanza_error(
                    "iq",
                    id,
                    None,
                    None,
                    "wait",
                    "resource-constraint",
                ));
            }
        }
        metrics::gauge!("tern_sessions").increment(1.0);
        metrics::counter!("tern_logins_total").increment(1);
        tracing::debug!(peer = %self.peer, jid = %jid, "session bound");
        self.write(format!(
            "<iq type='result' id='{}'><bind xmlns='{NS_BIND}'><jid>{}</jid></bind></iq>",
            escape(id),
            escape(jid.as_str())
        ));
        self.jid = Some(jid);
        self.phase = Phase::Active;
    }

    // ---- Stanzas of a bound session --------------------------------------------------------------

    fn on_routable(&mut self, stanza: Stanza) {
        let Some(me) = self.jid.clone() else {
            return self.stream_error("not-authorized", None);
        };
        let to = match stanza.to().map(|t| Jid::new(&t)) {
            None => None,
            Some(Ok(j)) => Some(j),
            Some(Err(_)) => return self.bounce(&stanza, &me, "modify", "jid-malformed"),
        };
        let kind = match stanza.name() {
            "message" => Kind::Message(MessageType::parse(stanza.stanza_type().as_deref())),
            "presence" => Kind::Presence,
            _ => Kind::Iq,
        };
        if kind == Kind::Presence {
            return self.on_presence(stanza, &me, to);
        }
        let to_server = match &to {
            None => true,
            Some(j) => j.node().is_none() && j.domain().as_str() == self.ctx.domain,
        };
        let to_local_bare = to
            .as_ref()
            .is_some_and(|j| j.is_bare() && j.domain().as_str() == self.ctx.domain);
        if kind == Kind::Iq
            && to_server
            && matches!(stanza.stanza_type().as_deref(), Some("result" | "error"))
            && let Some(id) = stanza.id()
        {
            // A reply to an iq the server sent on someone's behalf (HTTP API): hand it over stamped.
            let stamped = stanza.with_addressing(Some(me.as_str()), None);
            if self.ctx.router.complete_iq(&id, stamped) {
                return;
            }
        }
        if kind == Kind::Iq && (to_server || to_local_bare) {
            // RFC 6121 §8.5.2.1.3 / RFC 6120 §10.3: the server answers on the account's behalf.
            let reply = server_iq::handle(
                &stanza,
                &me,
                &self.ctx.domain,
                to.as_ref(),
                self.ctx.extdisco.as_deref(),
            );
            if let Some(reply) = reply {
                self.write_stanza(Bytes::from(reply));
            }
            return;
        }
        let Some(to) = to else {
            // A message without `to` is for the account itself (RFC 6120 §10.3.1).
            return self.route(stanza, &me, &Jid::from(me.to_bare()), kind);
        };
        if to.domain().as_str() != self.ctx.domain {
            // No server-to-server: remote domains are unreachable (RFC 6120 §10.4.3).
            return self.bounce(&stanza, &me, "cancel", "remote-server-not-found");
        }
        if to_server {
            // Messages to the domain itself: nothing to deliver to.
            return self.bounce(&stanza, &me, "cancel", "service-unavailable");
        }
        self.route(stanza, &me, &to, kind);
    }

    fn route(&mut self, stanza: Stanza, me: &FullJid, to: &Jid, kind: Kind) {
        let stamped = stanza.with_addressing(Some(me.as_str()), None);
        match self.ctx.router.route(to, kind, stamped) {
            Delivery::Delivered(_) | Delivery::Ignored => {}
            Delivery::Unavailable => self.bounce(&stanza, me, "cancel", "service-unavailable"),
            Delivery::QueueFull => self.bounce(&stanza, me, "wait", "resource-constraint"),
        }
    }

    /// RFC 6121 §4: initial/unavailable presence broadcast and directed presence.
    fn on_presence(&mut self, stanza: Stanza, me: &FullJid, to: Option<Jid>) {
        let ptype = stanza.stanza_type().map(|t| t.into_owned());
        let stamped = stanza.with_addressing(Some(me.as_str()), None);
        match (to, ptype.as_deref()) {
            (None, None) => {
                let priority = parse_element(&stanza)
                    .ok()
                    .and_then(|p| p.get_child("priority", NS_CLIENT).map(|e| e.text()))
                    .and_then(|t| t.trim().parse::<i8>().ok())
                    .unwrap_or(0);
                let first = !self.available;
                self.available = true;
                self.presence = Some((priority, stamped.clone()));
                self.ctx
                    .router
                    .set_presence(me, self.handle.id, Some((priority, stamped.clone())));
                // §4.2.2: to all of the account's available resources, this one included.
                self.ctx.router.broadcast_presence(&me.to_bare(), stamped);
                if first {
                    // §4.2.2/§4.4.2: the new resource learns about the account's other resources.
                    for (res, p) in self.ctx.router.presences(&me.to_bare()) {
                        if res != me.resource().as_str() {
                            self.write_stanza(p);
                        }
                    }
                }
            }
            (None, Some("unavailable")) => {
                if self.available {
                    self.broadcast_unavailable(me, stamped);
                }
                self.available = false;
                self.presence = None;
            }
            (None, _) => {} // subscription management without a roster: nothing to do
            (Some(to), ptype) => {
                let local = to.domain().as_str() == self.ctx.domain && to.node().is_some();
                match ptype {
                    // Only local entities can be reached; the set is bounded so a client cannot grow it.
                    None if self.available
                        && local
                        && self.directed.len() < MAX_DIRECTED_PRESENCE =>
                    {
                        self.directed.insert(to.clone());
                    }
                    Some("unavailable") => {
                        self.directed.remove(&to);
                    }
                    _ => {}
                }
                if local {
                    self.ctx.router.route(&to, Kind::Presence, stamped);
                }
            }
        }
    }

    fn broadcast_unavailable(&mut self, me: &FullJid, stanza: Bytes) {
        self.ctx.router.set_presence(me, self.handle.id, None);
        let bare: BareJid = me.to_bare();
        self.ctx.router.broadcast_presence(&bare, stanza.clone());
        for to in std::mem::take(&mut self.directed) {
            if to.to_bare() != bare {
                self.ctx.router.route(&to, Kind::Presence, stanza.clone());
            }
        }
        // The resource itself is still connected (it may send presence again): it hears its own.
        let _ = self.handle.try_send(stanza);
    }

    /// Return a stanza error to the sender (RFC 6120 §8.3), never for an error or result (§8.3.1).
    fn bounce(&mut self, stanza: &Stanza, me: &FullJid, etype: &str, cond: &str) {
        let t = stanza.stanza_type();
        if matches!(t.as_deref(), Some("error" | "result"))
            || stanza.name() == "presence" && t.is_some()
        {
            return;
        }
        let id = stanza.id().unwrap_or_default();
        let from = stanza.to();
        let reply = stanza_error(
            stanza.name(),
            &id,
            from.as_deref(),
            Some(me.as_str()),
            etype,
            cond,
        );
        self.write_stanza(Bytes::from(reply));
    }

    // ---- Stream management (XEP-0198) ------------------------------------------------------------

    /// `<enable/>`, `<r/>`, `<a/>` (and a misplaced `<resume/>`) on a bound stream.
    fn on_sm(&mut self, el: SmElement, stanza: &Stanza) {
        match el {
            SmElement::Enable => self.on_enable(stanza),
            // §5: resumption replaces binding; this stream is bound already.
            SmElement::Resume => self.write_bytes(sm::failed_element("unexpected-request")),
            SmElement::Request => match self.sm.as_ref().map(|sm| sm.on_request()) {
                Some(Ok(a)) => self.write_bytes(a),
                Some(Err(e)) => self.sm_stream_error(&e),
                None => self.sm_stream_error(&SmError::NotEnabled),
            },
            SmElement::Ack => {
                let Some(sm) = self.sm.as_mut() else {
                    return self.sm_stream_error(&SmError::NotEnabled);
                };
                let released =
                    sm::parse_ack(stanza.attr("h").as_deref()).and_then(|h| sm.on_ack(h, self.now));
                match released {
                    Ok(released) => {
                        // What was sent while the request was out may be due for a request now.
                        if sm.should_request(self.now) {
                            let r = sm.request_bytes(self.now);
                            self.write_bytes(r);
                        }
                        self.report_acked(released);
                    }
                    Err(e) => self.sm_stream_error(&e),
                }
            }
        }
    }

    fn on_enable(&mut self, stanza: &Stanza) {
        if self.sm.is_some() {
            return self.write_bytes(SmError::AlreadyEnabled.failed_bytes());
        }
        let req = match sm::parse_enable(
            stanza.attr("resume").as_deref(),
            stanza.attr("max").as_deref(),
        ) {
            Ok(r) => r,
            Err(e) => return self.write_bytes(e.failed_bytes()),
        };
        let token: u128 = rand::random();
        let mut state = Box::new(Sm::new(self.ctx.sm));
        match state.enable(req, token, self.now) {
            Ok(enabled) => {
                if enabled.resume_id.is_some() {
                    self.handle.set_resume_token(token);
                }
                metrics::counter!("tern_sm_enabled_total").increment(1);
                self.write_bytes(enabled.bytes);
                self.sm = Some(state);
            }
            Err(e) => self.write_bytes(e.failed_bytes()),
        }
    }

    /// `<resume/>` (§5). When the old stream is still attached (its peer vanished and the server has
    /// not noticed yet) it is told to detach, and the resumption is retried until `give_up`.
    fn try_resume(&mut self, req: ResumeRequest, give_up: Option<Instant>) {
        let account = self
            .username
            .as_deref()
            .and_then(|u| BareJid::new(&format!("{u}@{}", self.ctx.domain)).ok());
        let Some(account) = account else {
            return self.write_bytes(ResumeError::ItemNotFound.failed_bytes());
        };
        match self
            .ctx
            .resumption
            .resume(&req.previd, req.h, &account, self.now)
        {
            Ok(resumed) => self.resumed(resumed, &req.previd),
            Err(ResumeError::ItemNotFound) => {
                let give_up = match give_up {
                    Some(at) => at,
                    None => {
                        let token = u128::from_str_radix(&req.previd, 16).ok();
                        let attached = self
                            .ctx
                            .router
                            .sessions(&account)
                            .into_iter()
                            .find(|(_, h)| token.is_some() && h.resume_token() == token);
                        let Some((_, old)) = attached else {
                            return self.resume_failed(&ResumeError::ItemNotFound);
                        };
                        old.kick(Kick::Resumed);
                        self.now + RESUME_TAKEOVER_WAIT
                    }
                };
                if self.now >= give_up {
                    return self.resume_failed(&ResumeError::ItemNotFound);
                }
                self.pending_resume = Some(Box::new((req, self.now + RESUME_RETRY, give_up)));
            }
            Err(e) => self.resume_failed(&e),
        }
    }

    fn resume_failed(&mut self, e: &ResumeError) {
        metrics::counter!("tern_sm_resume_failures_total").increment(1);
        tracing::debug!(peer = %self.peer, "resumption failed: {e}");
        self.write_bytes(e.failed_bytes());
    }

    fn resumed(&mut self, r: sm::Resumed<Arc<PushMeta>>, previd: &str) {
        let sm::Resumed {
            bytes,
            resend,
            acked,
            full_jid,
            presence,
            state,
        } = r;
        match self.ctx.router.bind(&full_jid, self.handle.clone()) {
            Ok(Some(old)) => old.kick(Kick::Conflict),
            Ok(None) => {}
            Err(e) => {
                // The account filled its resources meanwhile: the pushes go back to the queue.
                tracing::info!(peer = %self.peer, jid = %full_jid, "resumption refused: {e}");
                let mut state = state;
                let mut items = acked;
                items.extend(state.take_unacked());
                requeue(&self.ctx, full_jid.to_bare(), items);
                return self.resume_failed(&ResumeError::ItemNotFound);
            }
        }
        metrics::gauge!("tern_sessions").increment(1.0);
        metrics::counter!("tern_sm_resumed_total").increment(1);
        tracing::debug!(peer = %self.peer, jid = %full_jid, resent = resend.len(), "session resumed");
        if let Ok(token) = u128::from_str_radix(previd, 16) {
            self.handle.set_resume_token(token);
        }
        self.write_bytes(bytes);
        // §5: retransmit what the client had not handled; `state` tracks them already.
        for b in resend {
            self.write_bytes(b);
        }
        self.sm = Some(Box::new(state));
        self.phase = Phase::Active;
        self.jid = Some(full_jid.clone());
        self.report_acked(acked);
        if let Some((priority, p)) = presence {
            // Other resources and observers saw it leave when its stream broke.
            self.available = true;
            self.ctx
                .router
                .set_presence(&full_jid, self.handle.id, Some((priority, p.clone())));
            self.ctx
                .router
                .broadcast_presence(&full_jid.to_bare(), p.clone());
            self.presence = Some((priority, p));
        }
    }

    /// Pushes the client acknowledged: their status becomes `acked`.
    fn report_acked(&self, released: Vec<Outgoing>) {
        let (Some(fates), Some(jid)) = (&self.ctx.fates, &self.jid) else {
            return;
        };
        let push_ids: Vec<String> = released
            .into_iter()
            .filter_map(|(_, tag)| tag.map(|t| t.push_id.clone()))
            .collect();
        if !push_ids.is_empty() {
            let _ = fates.send(PushFate::Acked {
                recipient: jid.to_bare(),
                push_ids,
            });
        }
    }

    /// Keep an outbound stanza until acknowledged; ask for an ack when due (§4).
    fn track(&mut self, stanza: Bytes, tag: Option<Arc<PushMeta>>) {
        let Some(sm) = self.sm.as_mut() else {
            return;
        };
        match sm.on_outbound_stanza(stanza, tag, self.now) {
            Ok(()) if sm.should_request(self.now) => {
                let r = sm.request_bytes(self.now);
                self.write_bytes(r);
            }
            Ok(()) => {}
            Err(e) => {
                metrics::counter!("tern_limit_hits_total", "limit" => "sm_unacked").increment(1);
                tracing::info!(peer = %self.peer, "closing: {e} (sm.max_unacked_stanzas / sm.max_unacked_bytes)");
                self.sm_stream_error(&e);
            }
        }
    }

    /// A stream management error ends the stream (§6), with its application condition.
    fn sm_stream_error(&mut self, e: &SmError) {
        if self.phase == Phase::Closed {
            return;
        }
        metrics::counter!("tern_stream_errors_total", "condition" => e.stream_condition())
            .increment(1);
        self.write_bytes(e.stream_error_bytes());
        self.write_static("</stream:stream>");
        self.close();
    }

    // ---- Output helpers --------------------------------------------------------------------------

    fn write(&mut self, s: String) {
        self.actions.push_back(Action::Write(Bytes::from(s)));
    }

    fn write_static(&mut self, s: &'static str) {
        self.actions
            .push_back(Action::Write(Bytes::from_static(s.as_bytes())));
    }

    fn write_bytes(&mut self, b: Bytes) {
        self.actions.push_back(Action::Write(b));
    }

    /// A stanza (message, presence, iq) the server writes itself: counted by stream management.
    fn write_stanza(&mut self, b: Bytes) {
        self.actions.push_back(Action::Write(b.clone()));
        self.track(b, None);
    }

    /// Leave the registry at once (nothing more is routed to a closing stream), then close.
    fn close(&mut self) {
        self.phase = Phase::Closed;
        let resumable = std::mem::take(&mut self.resumable_close);
        self.leave(resumable);
        self.actions.push_back(Action::Close);
    }

    /// Send a stream error and close (RFC 6120 §4.9.1.1).
    fn stream_error(&mut self, condition: &str, text: Option<&str>) {
        if self.phase == Phase::Closed {
            return;
        }
        if !self.header_sent {
            self.send_header(&StreamHeader::default());
        }
        metrics::counter!("tern_stream_errors_total", "condition" => condition.to_string())
            .increment(1);
        let text = text
            .map(|t| format!("<text xmlns='{NS_STREAM_ERRORS}'>{}</text>", escape(t)))
            .unwrap_or_default();
        self.write(format!(
            "<stream:error><{condition} xmlns='{NS_STREAM_ERRORS}'/>{text}</stream:error></stream:stream>"
        ));
        self.close();
    }
}

impl Drop for C2s {
    /// Also on a panic in the connection task: the registry never keeps a dead session.
    fn drop(&mut self) {
        self.on_disconnected();
    }
}

/// Send the pushes among `items` back to the front of `recipient`'s durable queue, in order; other
/// stanzas are dropped, as for an unavailable resource (XEP-0198 §4).
fn requeue(ctx: &C2sContext, recipient: BareJid, items: Vec<Outgoing>) {
    let items: Vec<(Bytes, Arc<PushMeta>)> = items
        .into_iter()
        .filter_map(|(b, tag)| tag.map(|t| (b, t)))
        .collect();
    if items.is_empty() {
        return;
    }
    metrics::counter!("tern_pushes_requeued_total").increment(items.len() as u64);
    match &ctx.fates {
        Some(fates) => {
            let _ = fates.send(PushFate::Requeue { recipient, items });
        }
        None => {
            tracing::warn!(jid = %recipient, pushes = items.len(), "unacknowledged pushes lost: no offline queue")
        }
    }
}

/// Parse a stanza the server handles itself into a DOM, with the stream's default namespace.
pub fn parse_element(stanza: &Stanza) -> Result<Element, minidom::Error> {
    Element::from_reader_with_prefixes(&stanza.raw()[..], Some(NS_CLIENT.to_string()))
}

/// RFC 6120 §6.4.2: no text means no data; `=` means an empty response.
fn decode_sasl_payload(text: &str) -> Result<Option<Vec<u8>>, ()> {
    let t = text.trim();
    match t {
        "" => Ok(None),
        "=" => Ok(Some(Vec::new())),
        _ => B64.decode(t).map(Some).map_err(|_| ()),
    }
}

/// A stanza error (RFC 6120 §8.3.2): `<name type='error' id from to><error type><cond/></error></name>`.
/// Used for bounces, iq errors during binding and HTTP-originated iqs.
pub fn stanza_error(
    name: &str,
    id: &str,
    from: Option<&str>,
    to: Option<&str>,
    etype: &str,
    cond: &str,
) -> String {
    let attr = |k: &str, v: Option<&str>| {
        v.map(|v| format!(" {k}='{}'", escape(v)))
            .unwrap_or_default()
    };
    format!(
        "<{name} type='error' id='{}'{}{}><error type='{etype}'><{cond} xmlns='{NS_STANZAS}'/></error></{name}>",
        escape(id),
        attr("from", from),
        attr("to", to),
    )
}

#[cfg(test)]
mod tests {
    //! Drives framer + state machine with strings and a hand-moved clock: no sockets, no sleeping.
    use super::*;
    use crate::config::AuthConfig;
    use crate::store::accounts::AccountStore;
    use crate::xmpp::framer::{Framer, FramerLimits};

    const SECRET: &str = "0123456789abcdef0123";
    const HDR: &str = "<?xml version='1.0'?><stream:stream to='localhost' xmlns='jabber:client' \
                       xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>";

    struct World {
        ctx: Arc<C2sContext>,
        _dir: tempfile::TempDir,
        t0: Instant,
        fates: std::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<PushFate>>,
    }

    impl World {
        fn fates(&self) -> Vec<PushFate> {
            let mut rx = self.fates.lock().unwrap();
            std::iter::from_fn(|| rx.try_recv().ok()).collect()
        }
    }

    fn world() -> World {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(AccountStore::open(dir.path()).unwrap());
        store.add("alice@localhost", "pencil", 4096).unwrap();
        let cfg = AuthConfig {
            device_secret: Some(SECRET.into()),
            ..AuthConfig::default()
        };
        let (fates, fates_rx) = tokio::sync::mpsc::unbounded_channel();
        let ctx = Arc::new(C2sContext {
            domain: "localhost".into(),
            router: Arc::new(Router::with_max_resources(3)),
            auth: Arc::new(Authenticator::new("localhost", &cfg, store)),
            throttle: Arc::new(AuthThrottle::new(&cfg)),
            preauth_timeout: Duration::from_secs(30),
            preauth_max_bytes: 65536,
            ping_interval: Some(Duration::from_secs(300)),
            ping_timeout: Duration::from_secs(60),
            sm: SmConfig::default(),
            resumption: Arc::new(ResumptionRegistry::new(SmConfig::default())),
            fates: Some(fates),
            extdisco: None,
        });
        World {
            ctx,
            _dir: dir,
            t0: Instant::now(),
            fates: std::sync::Mutex::new(fates_rx),
        }
    }

    struct Client {
        c2s: C2s,
        framer: Framer,
        handle: Arc<SessionHandle>,
        /// Non-write actions seen, in order.
        actions: Vec<Action>,
    }

    impl Client {
        fn new(w: &World, secure: bool) -> Client {
            let peer: SocketAddr = "127.0.0.1:4000".parse().unwrap();
            let handle = SessionHandle::new(16, peer);
            Client {
                c2s: C2s::new(w.ctx.clone(), handle.clone(), peer, secure, w.t0),
                framer: Framer::new(FramerLimits {
                    max_stanza_bytes: 262144,
                    max_depth: 32,
                }),
                handle,
                actions: Vec::new(),
            }
        }

        /// Feed client bytes; return what the server writes in response (routed stanzas excluded).
        fn send(&mut self, s: &str, now: Instant) -> String {
            self.c2s.on_bytes(s.len(), now);
            self.framer.push(s.as_bytes());
            let mut out = String::new();
            loop {
                let mut progressed = false;
                while !self.c2s.is_closed() {
                    match self.framer.next() {
                        Ok(Some(ev)) => {
                            self.c2s.on_event(ev, now);
                            progressed = true;
                        }
                        Ok(None) => break,
                        Err(e) => {
                            self.c2s.on_frame_error(&e);
                            break;
                        }
                    }
                    if self.c2s.wants_io_first() {
                        break;
                    }
                }
                out.push_str(&self.drain());
                if !progressed || self.c2s.is_closed() {
                    return out;
                }
            }
        }

        fn drain(&mut self) -> String {
            let mut out = String::new();
            while let Some(a) = self.c2s.poll_action() {
                match a {
                    Action::Write(b) => out.push_str(std::str::from_utf8(&b).unwrap()),
                    Action::RestartStream => {
                        self.framer.reset();
                        self.actions.push(Action::RestartStream);
                    }
                    other => self.actions.push(other),
                }
            }
            out
        }

        fn routed(&mut self) -> Vec<String> {
            let mut v = Vec::new();
            self.handle.drain(usize::MAX, &mut v);
            v.into_iter()
                .map(|(b, _)| String::from_utf8(b.to_vec()).unwrap())
                .collect()
        }

        /// PLAIN login + bind on a secure stream.
        fn login(w: &World, user: &str, pw: &str, resource: &str) -> Client {
            let mut c = Client::new(w, true);
            let features = c.send(HDR, w.t0);
            assert!(
                features.contains("<mechanism>PLAIN</mechanism>"),
                "{features}"
            );
            let auth = B64.encode(format!("\0{user}\0{pw}"));
            let r = c.send(
                &format!("<auth xmlns='{NS_SASL}' mechanism='PLAIN'>{auth}</auth>"),
                w.t0,
            );
            assert!(r.contains("<success"), "{r}");
            let r = c.send(HDR, w.t0);
            assert!(
                r.contains("<bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/>"),
                "{r}"
            );
            let r = c.send(
                &format!("<iq type='set' id='b'><bind xmlns='{NS_BIND}'><resource>{resource}</resource></bind></iq>"),
                w.t0,
            );
            assert!(
                r.contains(&format!("<jid>{user}@localhost/{resource}</jid>")),
                "{r}"
            );
            c
        }
    }

    #[test]
    fn starttls_port_offers_only_starttls_and_refuses_early_sasl() {
        let w = world();
        let mut c = Client::new(&w, false);
        let r = c.send(HDR, w.t0);
        assert!(
            r.contains("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls>"),
            "{r}"
        );
        assert!(!r.contains("mechanism"), "no SASL before TLS: {r}");
        let r = c.send(
            &format!("<auth xmlns='{NS_SASL}' mechanism='PLAIN'>AGFsaWNlAHBlbmNpbA==</auth>"),
            w.t0,
        );
        assert!(r.contains("<encryption-required/>"), "{r}");
        let r = c.send(&format!("<starttls xmlns='{NS_TLS}'/>"), w.t0);
        assert!(r.contains("<proceed"), "{r}");
        assert_eq!(c.actions, vec![Action::StartTls]);
        c.c2s.on_tls_established();
        c.framer = Framer::new(FramerLimits {
            max_stanza_bytes: 262144,
            max_depth: 32,
        });
        let r = c.send(HDR, w.t0);
        assert!(r.contains("<mechanism>SCRAM-SHA-256</mechanism>"), "{r}");
    }

    #[test]
    fn stanza_before_tls_is_policy_violation() {
        let w = world();
        let mut c = Client::new(&w, false);
        c.send(HDR, w.t0);
        let r = c.send("<message to='a@localhost'><body>x</body></message>", w.t0);
        assert!(r.contains("<policy-violation"), "{r}");
        assert!(c.c2s.is_closed());
    }

    #[test]
    fn header_checks() {
        let w = world();
        let mut c = Client::new(&w, true);
        let r = c.send(&HDR.replace("to='localhost'", "to='other.example'"), w.t0);
        assert!(r.starts_with("<?xml") && r.contains("<host-unknown"), "{r}");
        let mut c = Client::new(&w, true);
        let r = c.send(&HDR.replace("jabber:client", "jabber:server"), w.t0);
        assert!(r.contains("<invalid-namespace"), "{r}");
        let mut c = Client::new(&w, true);
        let r = c.send(&HDR.replace("version='1.0'", "version='2.0'"), w.t0);
        assert!(r.contains("<unsupported-version"), "{r}");
    }

    #[test]
    fn plain_login_bind_ping_disco_and_close() {
        let w = world();
        let mut c = Client::login(&w, "alice", "pencil", "desk");
        let r = c.send(
            "<iq type='get' id='p'><ping xmlns='urn:xmpp:ping'/></iq>",
            w.t0,
        );
        assert!(r.contains("id='p'") && r.contains("type='result'"), "{r}");
        let r = c.send("<iq type='get' id='d' to='localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>", w.t0);
        assert!(
            r.contains("urn:xmpp:ping") && r.contains("category='server'"),
            "{r}"
        );
        let r = c.send(
            "<iq type='get' id='r'><query xmlns='jabber:iq:roster'/></iq>",
            w.t0,
        );
        assert!(
            r.contains("type='result'") && r.contains("jabber:iq:roster"),
            "{r}"
        );
        let r = c.send(
            "<iq type='set' id='s'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>",
            w.t0,
        );
        assert!(r.contains("type='result'"), "{r}");
        let r = c.send(
            "<iq type='get' id='u'><query xmlns='urn:example:unknown'/></iq>",
            w.t0,
        );
        assert!(r.contains("<service-unavailable"), "{r}");
        let r = c.send("</stream:stream>", w.t0);
        assert_eq!(r, "</stream:stream>");
        assert!(c.c2s.is_closed());
        assert_eq!(w.ctx.router.session_count(), 0);
    }

    #[test]
    fn iq_to_a_bare_jid_is_answered_by_the_server() {
        let w = world();
        let mut c = Client::login(&w, "alice", "pencil", "desk");
        // RFC 6121 §8.5.2.1.3: on behalf of any local account, online or not.
        let r = c.send(
            "<iq type='get' id='p' to='bob@localhost'><ping xmlns='urn:xmpp:ping'/></iq>",
            w.t0,
        );
        assert!(
            r.contains("type='result'") && r.contains("from='bob@localhost'"),
            "{r}"
        );
        let r = c.send(
            "<iq type='get' id='r' to='bob@localhost'><query xmlns='jabber:iq:roster'/></iq>",
            w.t0,
        );
        assert!(r.contains("<forbidden"), "{r}");
        let r = c.send(
            "<iq type='get' id='r2' to='alice@localhost'><query xmlns='jabber:iq:roster'/></iq>",
            w.t0,
        );
        assert!(
            r.contains("type='result'") && r.contains("jabber:iq:roster"),
            "{r}"
        );
        let r = c.send(
            "<iq type='get' id='d' to='bob@localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>",
            w.t0,
        );
        assert!(r.contains("category='account'"), "{r}");
    }

    #[test]
    fn scram_sha256_login() {
        let w = world();
        let mut c = Client::new(&w, true);
        c.send(HDR, w.t0);
        let cnonce = "rOprNGfwEbeRWgbNEkqO";
        let first_bare = format!("n=alice,r={cnonce}");
        let r = c.send(
            &format!(
                "<auth xmlns='{NS_SASL}' mechanism='SCRAM-SHA-256'>{}</auth>",
                B64.encode(format!("n,,{first_bare}"))
            ),
            w.t0,
        );
        let chal = r
            .split("<challenge xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>")
            .nth(1)
            .unwrap();
        let server_first =
            String::from_utf8(B64.decode(chal.split('<').next().unwrap()).unwrap()).unwrap();
        let mut nonce = "";
        let mut salt = Vec::new();
        let mut iters = 0;
        for part in server_first.split(',') {
            match part.split_at(2) {
                ("r=", v) => nonce = v,
                ("s=", v) => salt = B64.decode(v).unwrap(),
                ("i=", v) => iters = v.parse().unwrap(),
                _ => {}
            }
        }
        assert!(nonce.starts_with(cnonce));
        use hmac::{Hmac, Mac};
        use sha2::{Digest, Sha256};
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(b"pencil", &salt, iters, &mut salted);
        let hmac = |k: &[u8], m: &[u8]| {
            let mut h = <Hmac<Sha256> as Mac>::new_from_slice(k).unwrap();
            h.update(m);
            h.finalize().into_bytes().to_vec()
        };
        let client_key = hmac(&salted, b"Client Key");
        let stored = Sha256::digest(&client_key);
        let without_proof = format!("c=biws,r={nonce}");
        let auth_msg = format!("{first_bare},{server_first},{without_proof}");
        let sig = hmac(&stored, auth_msg.as_bytes());
        let proof: Vec<u8> = client_key.iter().zip(sig).map(|(a, b)| a ^ b).collect();
        let final_msg = format!("{without_proof},p={}", B64.encode(proof));
        let r = c.send(
            &format!(
                "<response xmlns='{NS_SASL}'>{}</response>",
                B64.encode(final_msg)
            ),
            w.t0,
        );
        assert!(r.contains("<success"), "{r}");
        assert!(c.c2s.is_authenticated());
    }

    #[test]
    fn device_credentials_and_wrong_password() {
        let w = world();
        let pw = Authenticator::device_password(SECRET, "agent-42@localhost");
        let _c = Client::login(&w, "agent-42", &pw, "agent");
        let mut c = Client::new(&w, true);
        c.send(HDR, w.t0);
        for i in 0..5 {
            let auth = B64.encode("\0agent-42\0wrong");
            let r = c.send(
                &format!("<auth xmlns='{NS_SASL}' mechanism='PLAIN'>{auth}</auth>"),
                w.t0,
            );
            assert!(
                r.contains(
                    "<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><not-authorized/></failure>"
                ),
                "{i}: {r}"
            );
        }
        // Repeated failures are slowed down, and the 5th closes the stream.
        assert!(
            c.actions
                .iter()
                .any(|a| matches!(a, Action::Pause(d) if !d.is_zero())),
            "{:?}",
            c.actions
        );
        assert!(c.c2s.is_closed());
    }

    #[test]
    fn routing_stamps_from_and_bounces_offline_iq() {
        let w = world();
        let mut a = Client::login(&w, "alice", "pencil", "a");
        let pw = Authenticator::device_password(SECRET, "bob@localhost");
        let mut b = Client::login(&w, "bob", &pw, "b");
        // Spoofed from is replaced; escaped text passes through untouched.
        a.send("<message to='bob@localhost/b' from='admin@localhost/x' type='chat'><body>&lt;&amp;&gt; é 😀</body></message>", w.t0);
        let got = b.routed();
        assert_eq!(got.len(), 1);
        assert!(
            got[0].contains("from='alice@localhost/a'") && !got[0].contains("admin@"),
            "{}",
            got[0]
        );
        assert!(
            got[0].contains("<body>&lt;&amp;&gt; é 😀</body>"),
            "{}",
            got[0]
        );
        // iq to a full JID and its reply routed back.
        a.send(
            "<iq type='get' id='q1' to='bob@localhost/b'><query xmlns='urn:x'/></iq>",
            w.t0,
        );
        assert!(b.routed()[0].contains("id='q1'"));
        b.send("<iq type='result' id='q1' to='alice@localhost/a'/>", w.t0);
        let back = a.routed();
        assert!(
            back[0].contains("type='result'") && back[0].contains("from='bob@localhost/b'"),
            "{back:?}"
        );
        // iq to an unavailable resource: service-unavailable.
        let r = a.send(
            "<iq type='get' id='q2' to='bob@localhost/gone'><ping xmlns='urn:xmpp:ping'/></iq>",
            w.t0,
        );
        assert!(
            r.contains("<service-unavailable") && r.contains("id='q2'"),
            "{r}"
        );
        // Remote domains are unreachable without s2s.
        let r = a.send(
            "<message to='x@remote.example'><body>x</body></message>",
            w.t0,
        );
        assert!(r.contains("<remote-server-not-found"), "{r}");
    }

    #[tokio::test]
    async fn iq_reply_to_the_server_reaches_its_waiter_stamped() {
        let w = world();
        let mut c = Client::login(&w, "alice", "pencil", "desk");
        let rx = w.ctx.router.await_iq_reply("http-1");
        let r = c.send(
            "<iq type='result' id='http-1' to='localhost' from='mallory@localhost/x'/>",
            w.t0,
        );
        assert!(r.is_empty(), "nothing goes back to the client: {r}");
        let reply = String::from_utf8(rx.await.unwrap().to_vec()).unwrap();
        assert!(
            reply.contains("from='alice@localhost/desk'") && !reply.contains("mallory"),
            "{reply}"
        );
    }

    #[test]
    fn presence_broadcast_and_bare_jid_delivery() {
        let w = world();
        let mut a1 = Client::login(&w, "alice", "pencil", "one");
        let mut a2 = Client::login(&w, "alice", "pencil", "two");
        let pw = Authenticator::device_password(SECRET, "bob@localhost");
        let mut b = Client::login(&w, "bob", &pw, "b");
        // Not available yet: a chat to the bare JID bounces.
        let r = b.send(
            "<message to='alice@localhost' type='chat'><body>x</body></message>",
            w.t0,
        );
        assert!(r.contains("<service-unavailable"), "{r}");
        a1.send("<presence><priority>5</priority></presence>", w.t0);
        assert_eq!(a1.routed().len(), 1, "own presence comes back");
        let r = a2.send("<presence><priority>1</priority></presence>", w.t0);
        assert!(
            r.contains("from='alice@localhost/one'"),
            "new resource learns of the other: {r}"
        );
        assert!(a1.routed()[0].contains("from='alice@localhost/two'"));
        a2.routed();
        b.send(
            "<message to='alice@localhost' type='chat'><body>hi</body></message>",
            w.t0,
        );
        assert_eq!(a1.routed().len(), 1, "highest priority gets it");
        assert!(a2.routed().is_empty());
        // Directed presence, then unavailable goes to the directed recipient too.
        b.send("<presence/>", w.t0);
        b.send("<presence to='alice@localhost/one'/>", w.t0);
        assert!(a1.routed()[0].contains("from='bob@localhost/b'"));
        drop(b);
        assert!(
            a1.routed()
                .iter()
                .any(|p| p.contains("unavailable") && p.contains("bob@localhost/b"))
        );
    }

    #[test]
    fn conflict_kicks_the_old_session() {
        let w = world();
        let mut a = Client::login(&w, "alice", "pencil", "r");
        a.send("<presence/>", w.t0);
        let mut a2 = Client::login(&w, "alice", "pencil", "r");
        a2.send("<presence/>", w.t0);
        a2.routed();
        assert_eq!(a.handle.kick_reason(), Some(Kick::Conflict));
        // The old session notices late (its socket was dead) and only then cleans up.
        a.c2s.on_kick(Kick::Conflict);
        assert!(a.drain().contains("<conflict"));
        drop(a);
        assert_eq!(
            w.ctx.router.session_count(),
            1,
            "the replacement survives the old one's cleanup"
        );
        assert!(
            !a2.routed().iter().any(|p| p.contains("unavailable")),
            "the replacement is not told it went away"
        );
        let pw = Authenticator::device_password(SECRET, "bob@localhost");
        let mut b = Client::login(&w, "bob", &pw, "b");
        let r = b.send(
            "<message to='alice@localhost' type='chat'><body>x</body></message>",
            w.t0,
        );
        assert!(r.is_empty(), "alice is still available: {r}");
        assert_eq!(a2.routed().len(), 1);
    }

    fn push(n: u32) -> Outgoing {
        let meta = PushMeta {
            push_id: format!("p{n}"),
            created: std::time::SystemTime::UNIX_EPOCH,
            expires_at: std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1 << 40),
        };
        (
            Bytes::from(format!("<message id='p{n}'><body>{n}</body></message>")),
            Some(Arc::new(meta)),
        )
    }

    /// The previd of an `<enabled id='..' resume='true'/>` answer.
    fn sm_id(enabled: &str) -> String {
        let start = enabled.find(" id='").expect("id") + 5;
        enabled[start..].split('\'').next().unwrap().to_string()
    }

    /// Log in without binding (for `<resume/>`).
    fn authenticated(w: &World, user: &str, pw: &str) -> Client {
        let mut c = Client::new(w, true);
        c.send(HDR, w.t0);
        let auth = B64.encode(format!("\0{user}\0{pw}"));
        let r = c.send(
            &format!("<auth xmlns='{NS_SASL}' mechanism='PLAIN'>{auth}</auth>"),
            w.t0,
        );
        assert!(r.contains("<success"), "{r}");
        let r = c.send(HDR, w.t0);
        assert!(
            r.contains("<sm xmlns='urn:xmpp:sm:3'/>"),
            "XEP-0198 §2 feature: {r}"
        );
        c
    }

    #[test]
    fn sm_enable_counts_and_acks() {
        let w = world();
        let mut c = authenticated(&w, "alice", "pencil");
        // §3: not before binding.
        let r = c.send("<enable xmlns='urn:xmpp:sm:3'/>", w.t0);
        assert!(
            r.contains("<failed xmlns='urn:xmpp:sm:3'><unexpected-request"),
            "{r}"
        );
        let r = c.send(
            &format!(
                "<iq type='set' id='b'><bind xmlns='{NS_BIND}'><resource>r</resource></bind></iq>"
            ),
            w.t0,
        );
        assert!(r.contains("<jid>"), "{r}");
        let r = c.send(
            "<enable xmlns='urn:xmpp:sm:3' resume='true' max='60'/>",
            w.t0,
        );
        assert!(
            r.contains("resume='true' max='60'"),
            "client's smaller max wins: {r}"
        );
        let r = c.send("<enable xmlns='urn:xmpp:sm:3'/>", w.t0);
        assert!(r.contains("<failed"), "only one enable: {r}");
        // Two handled inbound stanzas (a ping and a presence).
        c.send(
            "<iq type='get' id='p'><ping xmlns='urn:xmpp:ping'/></iq><presence/>",
            w.t0,
        );
        let r = c.send("<r xmlns='urn:xmpp:sm:3'/>", w.t0);
        assert!(r.contains("<a xmlns='urn:xmpp:sm:3' h='2'/>"), "{r}");
        // Outbound: the ping result (1), the own presence (routed: 2), then 3 pushes: the 5th asks.
        let own: Vec<Outgoing> = {
            let mut v = Vec::new();
            c.handle.drain(usize::MAX, &mut v);
            v
        };
        c.c2s.on_routed(&own, w.t0);
        c.c2s.on_routed(&[push(1), push(2)], w.t0);
        assert!(!c.drain().contains("<r "), "not yet");
        c.c2s.on_routed(&[push(3)], w.t0);
        assert!(
            c.drain().contains("<r xmlns='urn:xmpp:sm:3'/>"),
            "request_every = 5"
        );
        // h=3 acknowledges the ping result, the presence and push 1.
        c.send("<a xmlns='urn:xmpp:sm:3' h='3'/>", w.t0);
        match w.fates().as_slice() {
            [
                PushFate::Acked {
                    recipient,
                    push_ids,
                },
            ] => {
                assert_eq!(recipient.as_str(), "alice@localhost");
                assert_eq!(push_ids, &["p1"]);
            }
            other => panic!("{other:?}"),
        }
        // §6: acknowledging more than was sent ends the stream.
        let r = c.send("<a xmlns='urn:xmpp:sm:3' h='9'/>", w.t0);
        assert!(
            r.contains("<handled-count-too-high xmlns='urn:xmpp:sm:3' h='9' send-count='5'/>"),
            "{r}"
        );
        assert!(c.c2s.is_closed());
        // A non-resumable end: the unacknowledged pushes 2 and 3 go back to the queue, in order.
        match w.fates().as_slice() {
            [PushFate::Requeue { items, .. }] => {
                let ids: Vec<_> = items.iter().map(|(_, m)| m.push_id.as_str()).collect();
                assert_eq!(ids, ["p2", "p3"]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn sm_r_before_enable_is_a_stream_error() {
        let w = world();
        let mut c = Client::login(&w, "alice", "pencil", "r");
        let r = c.send("<r xmlns='urn:xmpp:sm:3'/>", w.t0);
        assert!(r.contains("<unsupported-stanza-type"), "{r}");
    }

    #[test]
    fn sm_resume_after_a_broken_connection_resends_unacked() {
        let w = world();
        let mut a = Client::login(&w, "alice", "pencil", "r");
        let r = a.send("<enable xmlns='urn:xmpp:sm:3' resume='true'/>", w.t0);
        let id = sm_id(&r);
        a.send("<presence/>", w.t0);
        a.routed();
        a.c2s.on_routed(&[push(1), push(2)], w.t0);
        // Push 3 was routed but never written when the connection broke.
        a.handle.try_send_tagged(push(3).0, push(3).1).unwrap();
        a.c2s.on_disconnected();
        assert_eq!(w.ctx.resumption.len(), 1, "detached, not requeued");
        assert!(w.fates().is_empty());
        assert_eq!(w.ctx.router.session_count(), 0);

        // Another account cannot take it over.
        let pw = Authenticator::device_password(SECRET, "bob@localhost");
        let mut b = authenticated(&w, "bob", &pw);
        let r = b.send(
            &format!("<resume xmlns='urn:xmpp:sm:3' previd='{id}' h='0'/>"),
            w.t0,
        );
        assert!(r.contains("<item-not-found"), "{r}");

        // The client handled push 1 only (h=1): pushes 2 and 3 are resent, in order.
        let mut a2 = authenticated(&w, "alice", "pencil");
        let r = a2.send(
            &format!("<resume xmlns='urn:xmpp:sm:3' previd='{id}' h='1'/>"),
            w.t0,
        );
        let resumed = r.find("<resumed xmlns='urn:xmpp:sm:3' h='1'").expect(&r);
        let (p2, p3) = (
            r.find("<body>2</body>").expect(&r),
            r.find("<body>3</body>").expect(&r),
        );
        assert!(resumed < p2 && p2 < p3, "{r}");
        assert!(!r.contains("<body>1</body>"), "{r}");
        assert_eq!(a2.c2s.jid().map(|j| j.as_str()), Some("alice@localhost/r"));
        assert!(a2.c2s.is_available(), "presence restored");
        assert!(w.ctx.router.is_current(a2.c2s.jid().unwrap(), a2.handle.id));
        match w.fates().as_slice() {
            [PushFate::Acked { push_ids, .. }] => assert_eq!(push_ids, &["p1"]),
            other => panic!("{other:?}"),
        }
        // Counting continues: the client acknowledges everything.
        a2.send("<a xmlns='urn:xmpp:sm:3' h='3'/>", w.t0);
        match w.fates().as_slice() {
            [PushFate::Acked { push_ids, .. }] => assert_eq!(push_ids, &["p2", "p3"]),
            other => panic!("{other:?}"),
        }
        // A clean close ends it for good (§7).
        a2.send("</stream:stream>", w.t0);
        let mut a3 = authenticated(&w, "alice", "pencil");
        let r = a3.send(
            &format!("<resume xmlns='urn:xmpp:sm:3' previd='{id}' h='3'/>"),
            w.t0,
        );
        assert!(r.contains("<item-not-found"), "{r}");
    }

    #[test]
    fn sm_resume_takes_over_a_stream_that_is_still_attached() {
        let w = world();
        let mut a = Client::login(&w, "alice", "pencil", "r");
        let id = sm_id(&a.send("<enable xmlns='urn:xmpp:sm:3' resume='true'/>", w.t0));
        a.c2s.on_routed(&[push(1)], w.t0);
        let mut a2 = authenticated(&w, "alice", "pencil");
        let r = a2.send(
            &format!("<resume xmlns='urn:xmpp:sm:3' previd='{id}' h='0'/>"),
            w.t0,
        );
        assert!(r.is_empty(), "waits for the old stream: {r}");
        assert_eq!(a.handle.kick_reason(), Some(Kick::Resumed));
        // The old connection's task notices the kick.
        a.c2s.on_kick(Kick::Resumed);
        assert!(
            !a.drain().contains("<stream:error"),
            "the old stream is ended silently"
        );
        let t = a2.c2s.next_timeout().expect("retry timer");
        a2.c2s.on_timeout(t);
        let r = a2.drain();
        assert!(
            r.contains("<resumed") && r.contains("<body>1</body>"),
            "{r}"
        );
    }

    #[test]
    fn sm_new_login_of_a_detached_resource_requeues_its_pushes() {
        let w = world();
        let mut a = Client::login(&w, "alice", "pencil", "r");
        a.send("<enable xmlns='urn:xmpp:sm:3' resume='true'/>", w.t0);
        a.c2s.on_routed(&[push(1)], w.t0);
        a.c2s.on_disconnected();
        assert_eq!(w.ctx.resumption.len(), 1);
        let _a2 = Client::login(&w, "alice", "pencil", "r");
        assert_eq!(w.ctx.resumption.len(), 0, "no longer resumable");
        assert!(
            matches!(w.fates().as_slice(), [PushFate::Requeue { items, .. }] if items.len() == 1)
        );
    }

    #[test]
    fn sm_ping_timeout_detaches_and_clean_close_requeues() {
        let w = world();
        let mut a = Client::login(&w, "alice", "pencil", "r");
        a.send("<enable xmlns='urn:xmpp:sm:3' resume='true'/>", w.t0);
        a.c2s.on_routed(&[push(1)], w.t0);
        // No inbound data: ack requests, a ping, then the ping times out (a dead peer).
        for _ in 0..20 {
            match a.c2s.next_timeout() {
                Some(t) => a.c2s.on_timeout(t),
                None => break,
            }
        }
        assert!(a.c2s.is_closed());
        assert_eq!(w.ctx.resumption.len(), 1, "a dead peer may come back");

        let mut b = Client::login(&w, "alice", "pencil", "other");
        b.send("<enable xmlns='urn:xmpp:sm:3' resume='true'/>", w.t0);
        b.c2s.on_routed(&[push(2)], w.t0);
        b.send("</stream:stream>", w.t0);
        assert_eq!(w.ctx.resumption.len(), 1, "a clean close is final (§7)");
        assert!(
            matches!(w.fates().as_slice(), [PushFate::Requeue { items, .. }] if items[0].1.push_id == "p2")
        );
    }

    #[test]
    fn directed_presence_memory_is_bounded() {
        let w = world();
        let mut a = Client::login(&w, "alice", "pencil", "r");
        a.send("<presence/>", w.t0);
        let mut many = String::new();
        for i in 0..(MAX_DIRECTED_PRESENCE + 50) {
            many.push_str(&format!("<presence to='u{i}@localhost'/>"));
        }
        many.push_str("<presence to='x@remote.example'/>");
        a.send(&many, w.t0);
        assert_eq!(a.c2s.directed.len(), MAX_DIRECTED_PRESENCE);
        assert!(
            !a.c2s
                .directed
                .iter()
                .any(|j| j.domain().as_str() == "remote.example")
        );
    }

    #[test]
    fn resource_limit_gives_resource_constraint() {
        let w = world();
        let _a = Client::login(&w, "alice", "pencil", "1");
        let _b = Client::login(&w, "alice", "pencil", "2");
        let _c = Client::login(&w, "alice", "pencil", "3");
        let mut d = Client::new(&w, true);
        d.send(HDR, w.t0);
        let auth = B64.encode("\0alice\0pencil");
        d.send(
            &format!("<auth xmlns='{NS_SASL}' mechanism='PLAIN'>{auth}</auth>"),
            w.t0,
        );
        d.send(HDR, w.t0);
        let r = d.send(
            &format!(
                "<iq type='set' id='b'><bind xmlns='{NS_BIND}'><resource>4</resource></bind></iq>"
            ),
            w.t0,
        );
        assert!(r.contains("<resource-constraint"), "{r}");
        assert_eq!(w.ctx.router.session_count(), 3);
    }

    #[test]
    fn a_panicking_connection_leaves_the_registry() {
        let w = world();
        let mut other = Client::login(&w, "alice", "pencil", "other");
        other.send("<presence/>", w.t0);
        other.routed();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut c = Client::login(&w, "alice", "pencil", "doomed");
            c.send("<presence/>", w.t0);
            assert_eq!(w.ctx.router.session_count(), 2);
            panic!("simulated bug in a connection task");
        }));
        assert!(result.is_err());
        // Unwinding dropped the state machine: unbound, and the other resource heard it leave.
        assert_eq!(w.ctx.router.session_count(), 1);
        assert!(
            other
                .routed()
                .iter()
                .any(|p| p.contains("unavailable") && p.contains("alice@localhost/doomed"))
        );
    }

    #[test]
    fn look_alike_usernames_cannot_bind_as_someone_else() {
        let w = world();
        // Full-width "ｂｏｂ" has a valid device password of its own, but nodeprep maps it to "bob".
        let pw = Authenticator::device_password(SECRET, "ｂｏｂ@localhost");
        let mut c = Client::new(&w, true);
        c.send(HDR, w.t0);
        let auth = B64.encode(format!("\0ｂｏｂ\0{pw}"));
        c.send(
            &format!("<auth xmlns='{NS_SASL}' mechanism='PLAIN'>{auth}</auth>"),
            w.t0,
        );
        c.send(HDR, w.t0);
        let r = c.send(
            &format!("<iq type='set' id='b'><bind xmlns='{NS_BIND}'/></iq>"),
            w.t0,
        );
        assert!(!r.contains("<jid>bob@"), "{r}");
        assert_eq!(w.ctx.router.session_count(), 0);
    }

    #[test]
    fn authenticated_but_unbound_sessions_time_out() {
        let w = world();
        let mut c = Client::new(&w, true);
        c.send(HDR, w.t0);
        let auth = B64.encode("\0alice\0pencil");
        c.send(
            &format!("<auth xmlns='{NS_SASL}' mechanism='PLAIN'>{auth}</auth>"),
            w.t0,
        );
        assert!(c.c2s.is_authenticated());
        let due = c.c2s.next_timeout().unwrap();
        assert_eq!(due, w.t0 + Duration::from_secs(30));
        c.c2s.on_timeout(due);
        assert!(c.drain().contains("<connection-timeout"));
    }

    #[test]
    fn timeouts_preauth_and_ping() {
        let w = world();
        let mut c = Client::new(&w, true);
        c.send(HDR, w.t0);
        let due = c.c2s.next_timeout().unwrap();
        assert_eq!(due, w.t0 + Duration::from_secs(30));
        c.c2s.on_timeout(due);
        assert!(c.drain().contains("<connection-timeout"));

        let mut c = Client::login(&w, "alice", "pencil", "r");
        let due = c.c2s.next_timeout().unwrap();
        assert_eq!(due, w.t0 + Duration::from_secs(300));
        c.c2s.on_timeout(due);
        assert!(c.drain().contains("<ping xmlns='urn:xmpp:ping'/>"));
        let due2 = c.c2s.next_timeout().unwrap();
        assert_eq!(due2, due + Duration::from_secs(60));
        c.c2s.on_timeout(due2);
        assert!(c.drain().contains("<connection-timeout"));
        assert!(c.c2s.is_closed());
    }

    #[test]
    fn framer_errors_become_stream_errors() {
        let w = world();
        let mut c = Client::login(&w, "alice", "pencil", "r");
        let r = c.send("<!-- hi -->", w.t0);
        assert!(
            r.contains("<restricted-xml"),
            "{r} {:?} {:?}",
            c.framer.next().err(),
            c.c2s.is_closed()
        );
        let mut c = Client::login(&w, "alice", "pencil", "r2");
        let r = c.send("<message><body></bad></message>", w.t0);
        assert!(r.contains("<not-well-formed"), "{r}");
    }

    #[test]
    fn preauth_byte_budget() {
        let w = world();
        let mut c = Client::new(&w, true);
        c.send(HDR, w.t0);
        let r = c.send(&" ".repeat(70_000), w.t0);
        assert!(r.contains("<policy-violation"), "{r}");
    }

    #[test]
    fn pipelined_restart_after_success() {
        let w = world();
        let mut c = Client::new(&w, true);
        c.send(HDR, w.t0);
        let auth = B64.encode("\0alice\0pencil");
        // Auth, new header and bind in one read: all must be processed in order.
        let r = c.send(
            &format!("<auth xmlns='{NS_SASL}' mechanism='PLAIN'>{auth}</auth>{HDR}<iq type='set' id='b'><bind xmlns='{NS_BIND}'/></iq>"),
            w.t0,
        );
        assert!(
            r.contains("<success") && r.contains("<jid>alice@localhost/tern-"),
            "{r}"
        );
    }
}

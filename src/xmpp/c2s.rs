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
use super::router::{Delivery, Kick, Kind, MessageType, Router, SessionHandle};
use super::sasl::{self, Mechanism, SaslFailure, SaslServer, Step};
use super::server_iq;
use crate::auth::{AuthThrottle, Authenticator};

pub const NS_STREAMS: &str = "http://etherx.jabber.org/streams";
pub const NS_CLIENT: &str = "jabber:client";
const NS_TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
const NS_SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
const NS_BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
const NS_SESSION: &str = "urn:ietf:params:xml:ns:xmpp-session";
const NS_STREAM_ERRORS: &str = "urn:ietf:params:xml:ns:xmpp-streams";
const NS_STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";

/// RFC 6120 §6.4.5: allow a reasonable number of SASL retries (2 to 5) before closing the stream.
const MAX_SASL_ATTEMPTS: u32 = 5;

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

    pub fn is_authenticated(&self) -> bool {
        self.username.is_some()
    }

    /// `n` bytes arrived from the peer (whitespace keep-alives included: RFC 6120 §4.6.1).
    pub fn on_bytes(&mut self, n: usize, now: Instant) {
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
        if self.username.is_none() {
            return Some(self.started + self.ctx.preauth_timeout);
        }
        match self.ping_sent {
            Some(at) => Some(at + self.ctx.ping_timeout),
            None => self.ctx.ping_interval.map(|i| self.last_inbound + i),
        }
    }

    pub fn on_timeout(&mut self, now: Instant) {
        let Some(due) = self.next_timeout() else {
            return;
        };
        if now < due {
            return;
        }
        if self.username.is_none() {
            metrics::counter!("tern_limit_hits_total", "limit" => "preauth_timeout").increment(1);
            tracing::info!(peer = %self.peer, "closing: not authenticated within limits.preauth_timeout_secs");
            self.stream_error("connection-timeout", Some("authentication timeout"));
        } else if self.ping_sent.is_some() {
            metrics::counter!("tern_ping_timeouts_total").increment(1);
            tracing::info!(peer = %self.peer, jid = ?self.jid.as_ref().map(|j| j.to_string()),
                "closing: no answer to ping (c2s.ping_timeout_secs)");
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
            self.write(ping);
            self.ping_sent = Some(now);
        } else {
            // Authenticated but never bound and silent: treat like a dead connection.
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
        }
    }

    /// Graceful server shutdown (RFC 6120 §4.9.3.17).
    pub fn on_shutdown(&mut self) {
        self.stream_error("system-shutdown", None);
    }

    /// The connection is gone (closed by either side): leave the registry, announce unavailability.
    pub fn on_disconnected(&mut self) {
        if let Some(jid) = self.jid.take() {
            if self.available {
                let unavailable = Bytes::from(format!(
                    "<presence type='unavailable' from='{}'/>",
                    escape(jid.as_str())
                ));
                self.broadcast_unavailable(&jid, unavailable);
            }
            self.ctx.router.unbind(&jid, self.handle.id);
            metrics::gauge!("tern_sessions").decrement(1.0);
        }
        self.phase = Phase::Closed;
    }

    /// Feed one framer event.
    pub fn on_event(&mut self, event: Event, now: Instant) {
        if self.phase == Phase::Closed {
            return;
        }
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
        if h.stream_ns.as_deref() != Some(NS_STREAMS) || !h.name.ends_with("stream") {
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
                "<stream:features><bind xmlns='{NS_BIND}'/><session xmlns='{NS_SESSION}'><optional/></session></stream:features>"
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
        let name = stanza.name().to_string();
        let ns = stanza.ns().map(str::to_string);
        match (self.phase, name.as_str(), ns.as_deref()) {
            (Phase::Negotiating, "starttls", Some(NS_TLS)) => {
                if self.secure {
                    self.write(format!("<failure xmlns='{NS_TLS}'/></stream:stream>"));
                    self.close();
                } else {
                    self.write(format!("<proceed xmlns='{NS_TLS}'/>"));
                    self.actions.push_back(Action::StartTls);
                }
            }
            (Phase::Negotiating, "auth" | "response" | "abort", Some(NS_SASL)) => {
                self.on_sasl(&stanza, now)
            }
            (Phase::Negotiating, "iq", None | Some(NS_CLIENT)) if self.username.is_some() => {
                self.on_bind_phase_iq(&stanza)
            }
            (Phase::Active, "message" | "presence" | "iq", None | Some(NS_CLIENT)) => {
                self.on_routable(stanza)
            }
            (Phase::Negotiating, _, _) if !self.secure => {
                self.stream_error("policy-violation", Some("STARTTLS is required first"))
            }
            (Phase::Negotiating, _, _) => self.stream_error("not-authorized", None),
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
            _ => self.write(iq_error(&id, None, "wait", "not-authorized")),
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
            return self.write(iq_error(id, None, "modify", "bad-request"));
        };
        if let Some(old) = self.ctx.router.bind(&jid, self.handle.clone()) {
            // RFC 6120 §7.7.2.2: override the old session; it gets <conflict/>.
            old.kick(Kick::Conflict);
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
        let to_own_bare = to
            .as_ref()
            .is_some_and(|j| j.is_bare() && j.to_bare() == me.to_bare());
        if kind == Kind::Iq && (to_server || to_own_bare) {
            // RFC 6121 §8.5.2.1.3 / RFC 6120 §10.3: the server answers on the account's behalf.
            let reply = server_iq::handle(&stanza, &me, &self.ctx.domain, to.as_ref());
            if let Some(reply) = reply {
                self.write(reply);
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
                self.ctx
                    .router
                    .set_presence(me, Some((priority, stamped.clone())));
                // §4.2.2: to all of the account's available resources, this one included.
                self.ctx.router.broadcast_presence(&me.to_bare(), stamped);
                if first {
                    // §4.2.2/§4.4.2: the new resource learns about the account's other resources.
                    for (res, p) in self.ctx.router.presences(&me.to_bare()) {
                        if res != me.resource().as_str() {
                            self.write_bytes(p);
                        }
                    }
                }
            }
            (None, Some("unavailable")) => {
                if self.available {
                    self.broadcast_unavailable(me, stamped);
                }
                self.available = false;
            }
            (None, _) => {} // subscription management without a roster: nothing to do
            (Some(to), ptype) => {
                match ptype {
                    None if self.available => {
                        self.directed.insert(to.clone());
                    }
                    Some("unavailable") => {
                        self.directed.remove(&to);
                    }
                    _ => {}
                }
                if to.domain().as_str() == self.ctx.domain && to.node().is_some() {
                    self.ctx.router.route(&to, Kind::Presence, stamped);
                }
            }
        }
    }

    fn broadcast_unavailable(&mut self, me: &FullJid, stanza: Bytes) {
        self.ctx.router.set_presence(me, None);
        let bare: BareJid = me.to_bare();
        self.ctx.router.broadcast_presence(&bare, stanza.clone());
        for to in std::mem::take(&mut self.directed) {
            if to.to_bare() != bare {
                self.ctx.router.route(&to, Kind::Presence, stanza.clone());
            }
        }
        // The resource itself is still connected (it may send presence again): it hears its own.
        if let Some((_, h)) = self
            .ctx
            .router
            .sessions(&bare)
            .into_iter()
            .find(|(r, _)| r == me.resource().as_str())
        {
            let _ = h.tx.try_send(stanza);
        }
    }

    /// Return a stanza error to the sender (RFC 6120 §8.3), never for an error or result (§8.3.1).
    fn bounce(&mut self, stanza: &Stanza, me: &FullJid, etype: &str, cond: &str) {
        let t = stanza.stanza_type();
        if matches!(t.as_deref(), Some("error" | "result"))
            || stanza.name() == "presence" && t.is_some()
        {
            return;
        }
        let id = stanza.id().map(|s| s.into_owned()).unwrap_or_default();
        let from = stanza.to().map(|s| s.into_owned());
        let name = stanza.name();
        let from_attr = from
            .map(|f| format!(" from='{}'", escape(&f)))
            .unwrap_or_default();
        self.write(format!(
            "<{name} type='error' id='{}'{from_attr} to='{}'><error type='{etype}'><{cond} xmlns='{NS_STANZAS}'/></error></{name}>",
            escape(&id),
            escape(me.as_str()),
        ));
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

    fn close(&mut self) {
        self.phase = Phase::Closed;
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

/// An iq error reply (RFC 6120 §8.3.2).
pub fn iq_error(id: &str, to: Option<&str>, etype: &str, cond: &str) -> String {
    let to = to
        .map(|t| format!(" to='{}'", escape(t)))
        .unwrap_or_default();
    format!(
        "<iq type='error' id='{}'{to}><error type='{etype}'><{cond} xmlns='{NS_STANZAS}'/></error></iq>",
        escape(id)
    )
}

//! The session registry and the local delivery rules of RFC 6121 §8.5.
//!
//! A `DashMap` from bare JID to the account's connected resources, behind a small synchronous API:
//! no method returns a guard and none awaits, so no lock is ever held across an `.await`. Delivery is a
//! `try_send` into the session's bounded outbound queue: a slow client gets `resource-constraint` errors
//! for further stanzas instead of growing memory or stalling the sender.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use dashmap::DashMap;
use jid::{BareJid, FullJid, Jid};
use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;

/// Why a session was told to end by someone else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kick {
    /// A new login bound the same full JID (RFC 6120 §7.7.2.2: the old session gets `<conflict/>`).
    Conflict = 1,
    /// An operator asked for the session to end.
    Disconnect = 2,
    /// A new stream resumed this session (XEP-0198 §5: "the old stream SHOULD be terminated"): end
    /// without a word and hand the stream-management state over for resumption.
    Resumed = 3,
}

/// What makes a routed stanza a durable push: enough to put it back in the offline queue when the
/// session dies before acknowledging it (XEP-0198), and to mark it acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushMeta {
    pub push_id: String,
    pub created: SystemTime,
    pub expires_at: SystemTime,
}

/// A stanza waiting for a session's socket, with its push identity when it is one.
pub type Outgoing = (Bytes, Option<Arc<PushMeta>>);

/// What became of pushes a session wrote, for the durable queue's owner (sent over a channel, so the
/// sans-IO session never waits for the disk).
#[derive(Debug)]
pub enum PushFate {
    /// The client acknowledged them (XEP-0198 `<a h/>`): status `acked`.
    Acked {
        recipient: BareJid,
        push_ids: Vec<String>,
    },
    /// The session ended (or its resumption window ran out) before the client acknowledged them:
    /// back to the front of the recipient's queue, in order (XEP-0198 §4: treat them as sent to an
    /// unavailable resource).
    Requeue {
        recipient: BareJid,
        items: Vec<(Bytes, Arc<PushMeta>)>,
    },
}

pub type PushFates = tokio::sync::mpsc::UnboundedSender<PushFate>;

/// Told when an account's first resource is bound and when its last one leaves (webhooks).
/// Called synchronously from the routing path: implementations must not block.
pub trait SessionEvents: Send + Sync + std::fmt::Debug {
    fn online(&self, full: &FullJid, remote_addr: SocketAddr, at: SystemTime);
    fn offline(&self, full: &FullJid, remote_addr: SocketAddr, at: SystemTime);
}

/// The parts of a session other tasks may touch: its identity, its outbound queue and its kick signal.
///
/// The queue is a `VecDeque` that allocates only while stanzas wait and is released when drained, so an
/// idle session costs a few dozen bytes here (a channel would pre-allocate a block per session).
#[derive(Debug)]
pub struct SessionHandle {
    pub id: u64,
    pub remote_addr: SocketAddr,
    pub connected_since: SystemTime,
    queue: Mutex<Outbox>,
    capacity: usize,
    max_bytes: usize,
    kick: AtomicU8,
    /// Stored pushes arrived for this session's account after its replay: read the queue again.
    replay: AtomicBool,
    /// Unix milliseconds of the last inbound data (the session API's `last_activity`).
    last_activity: AtomicU64,
    /// The XEP-0198 SM-ID while this session is resumable (a `<resume/>` on a new stream finds and
    /// ends it through this).
    resume_token: OnceLock<u128>,
    /// Woken on every push, on a kick and on a replay request.
    wake: Notify,
}

/// Stanzas waiting for the socket, and their total size.
#[derive(Debug, Default)]
struct Outbox {
    items: VecDeque<Outgoing>,
    bytes: usize,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The session's queue is at its stanza or byte limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull;

impl SessionHandle {
    /// `capacity`: stanzas that may wait before further ones are refused (`c2s.outbound_queue`).
    pub fn new(capacity: usize, remote_addr: SocketAddr) -> Arc<Self> {
        Self::with_limits(capacity, usize::MAX, remote_addr)
    }

    /// As [`SessionHandle::new`], also refusing stanzas once `max_bytes` wait (`c2s.outbound_queue_bytes`);
    /// one stanza is always accepted into an empty queue, however large.
    pub fn with_limits(capacity: usize, max_bytes: usize, remote_addr: SocketAddr) -> Arc<Self> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let now = SystemTime::now();
        Arc::new(Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            remote_addr,
            connected_since: now,
            queue: Mutex::new(Outbox::default()),
            capacity: capacity.max(1),
            max_bytes,
            kick: AtomicU8::new(0),
            replay: AtomicBool::new(false),
            last_activity: AtomicU64::new(unix_ms(now)),
            resume_token: OnceLock::new(),
            wake: Notify::new(),
        })
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Outbox> {
        // A panic while holding this lock cannot leave the deque inconsistent: keep using it.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue a stanza for the session's socket; never blocks.
    pub fn try_send(&self, stanza: Bytes) -> Result<(), QueueFull> {
        self.try_send_tagged(stanza, None)
    }

    /// As [`SessionHandle::try_send`], for a durable push.
    pub fn try_send_tagged(
        &self,
        stanza: Bytes,
        meta: Option<Arc<PushMeta>>,
    ) -> Result<(), QueueFull> {
        {
            let mut q = self.queue();
            let over_bytes = !q.items.is_empty() && q.bytes + stanza.len() > self.max_bytes;
            if q.items.len() >= self.capacity || over_bytes {
                return Err(QueueFull);
            }
            q.bytes += stanza.len();
            q.items.push_back((stanza, meta));
        }
        self.wake.notify_one();
        Ok(())
    }

    /// Move up to `max` queued stanzas into `out`; frees the queue's memory once it is empty.
    pub fn drain(&self, max: usize, out: &mut Vec<Outgoing>) {
        let mut q = self.queue();
        let n = q.items.len().min(max);
        let start = out.len();
        out.extend(q.items.drain(..n));
        let taken: usize = out
            .get(start..)
            .unwrap_or_default()
            .iter()
            .map(|(b, _)| b.len())
            .sum();
        q.bytes = q.bytes.saturating_sub(taken);
        if q.items.is_empty() && q.items.capacity() > 0 {
            q.items = VecDeque::new();
        }
    }

    /// Stanzas waiting.
    pub fn queued(&self) -> usize {
        self.queue().items.len()
    }

    /// Ask the session's task to end with `why`; works even when its queue is full.
    pub fn kick(&self, why: Kick) {
        self.kick.store(why as u8, Ordering::Release);
        self.wake.notify_one();
    }

    pub fn kick_reason(&self) -> Option<Kick> {
        match self.kick.load(Ordering::Acquire) {
            1 => Some(Kick::Conflict),
            2 => Some(Kick::Disconnect),
            3 => Some(Kick::Resumed),
            _ => None,
        }
    }

    /// Ask the session's task to read the offline queue again (a push was stored for it meanwhile).
    pub fn request_replay(&self) {
        self.replay.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Whether a replay was requested since the last call (clears the request).
    pub fn take_replay_request(&self) -> bool {
        self.replay.swap(false, Ordering::AcqRel)
    }

    /// Record inbound activity at `now`.
    pub fn touch(&self, now: SystemTime) {
        self.last_activity.store(unix_ms(now), Ordering::Relaxed);
    }

    /// When the client last sent anything (whitespace keep-alives included).
    pub fn last_activity(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.last_activity.load(Ordering::Relaxed))
    }

    /// Mark this session resumable under `token` (its XEP-0198 SM-ID); set once.
    pub fn set_resume_token(&self, token: u128) {
        let _ = self.resume_token.set(token);
    }

    pub fn resume_token(&self) -> Option<u128> {
        self.resume_token.get().copied()
    }

    /// Resolves when there is work for the session's task: a kick, queued stanzas or a replay
    /// request. A wake-up that comes between the check and the wait is kept by `Notify` as a permit,
    /// so none is lost.
    pub async fn ready(&self) {
        loop {
            if self.kick_reason().is_some()
                || self.replay.load(Ordering::Acquire)
                || !self.queue().items.is_empty()
            {
                return;
            }
            self.wake.notified().await;
        }
    }
}

/// One bound resource of an account.
#[derive(Debug, Clone)]
struct Resource {
    name: String,
    handle: Arc<SessionHandle>,
    /// Last available presence (already stamped), and its priority; `None` until initial presence
    /// (RFC 6121 §4.2): such a resource is "connected" but not "available" for bare-JID delivery.
    presence: Option<(i8, Bytes)>,
}

/// Result of a delivery attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Written into this many sessions' queues.
    Delivered(usize),
    /// Dropped on purpose, as the RFC says for this case (e.g. presence to an unavailable resource).
    Ignored,
    /// Nobody to deliver to: the sender gets `service-unavailable` (RFC 6121 §8.5.2.2, §8.5.3.2).
    Unavailable,
    /// The recipient's queue is full: the sender gets `resource-constraint` (RFC 6120 §8.3.3.18).
    QueueFull,
}

/// The stanza kinds of RFC 6120 §8.2, with the message type where it matters for routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Message(MessageType),
    Presence,
    Iq,
}

/// RFC 6121 §5.2.2 message types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    Normal,
    Chat,
    Groupchat,
    Headline,
    Error,
}

impl MessageType {
    /// Unknown values are treated as `normal` (RFC 6121 §5.2.2).
    pub fn parse(s: Option<&str>) -> Self {
        match s {
            Some("chat") => Self::Chat,
            Some("groupchat") => Self::Groupchat,
            Some("headline") => Self::Headline,
            Some("error") => Self::Error,
            _ => Self::Normal,
        }
    }
}

/// The registry of connected sessions for one domain.
#[derive(Debug, Default)]
pub struct Router {
    accounts: DashMap<BareJid, Vec<Resource>>,
    /// Replies awaited by server-originated iqs (e.g. `POST /rest/stream` with an `<iq>`), by iq id.
    iq_waiters: DashMap<String, tokio::sync::oneshot::Sender<Bytes>>,
    /// Simultaneous resources per account; 0 = unlimited.
    max_resources: usize,
    /// Accounts that receive every presence broadcast (`c2s.presence_observers`).
    observers: Vec<BareJid>,
    events: OnceLock<Arc<dyn SessionEvents>>,
}

/// Why a resource could not be bound.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindError {
    /// RFC 6120 §7.6.2.1: the account reached its limit of connected resources.
    #[error(
        "the account already has {limit} connected resources (limits.max_resources_per_account)"
    )]
    TooManyResources { limit: usize },
}

impl Router {
    /// A registry without a per-account resource limit.
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry that refuses more than `max_resources` simultaneous resources per account (0 = no limit).
    pub fn with_max_resources(max_resources: usize) -> Self {
        Self {
            max_resources,
            ..Self::default()
        }
    }

    /// Also send every presence broadcast to these accounts (Tigase-style presence forwarding).
    pub fn with_observers(mut self, observers: Vec<BareJid>) -> Self {
        self.observers = observers;
        self
    }

    /// Report accounts coming online and going offline to `events` (set once, at startup).
    pub fn set_events(&self, events: Arc<dyn SessionEvents>) {
        let _ = self.events.set(events);
    }

    /// Ask every available session of `bare` to read the offline queue again.
    pub fn request_replay(&self, bare: &BareJid) {
        if let Some(rs) = self.accounts.get(bare) {
            for r in rs.iter().filter(|r| r.presence.is_some()) {
                r.handle.request_replay();
            }
        }
    }

    /// Wait for the reply to an iq the server sends with this `id` (choose an unguessable id). The
    /// reply is handed over by [`Router::complete_iq`]; call [`Router::cancel_iq`] on timeout.
    pub fn await_iq_reply(&self, id: &str) -> tokio::sync::oneshot::Receiver<Bytes> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.iq_waiters.insert(id.to_string(), tx);
        rx
    }

    pub fn cancel_iq(&self, id: &str) {
        self.iq_waiters.remove(id);
    }

    /// An iq result/error addressed to the server arrived: true if someone was waiting for it.
    pub fn complete_iq(&self, id: &str, reply: Bytes) -> bool {
        match self.iq_waiters.remove(id) {
            Some((_, tx)) => tx.send(reply).is_ok(),
            None => false,
        }
    }

    /// Snapshot of the accounts with at least one connected resource.
    pub fn account_jids(&self) -> Vec<BareJid> {
        self.accounts.iter().map(|e| e.key().clone()).collect()
    }

    /// Number of bound sessions (all resources of all accounts).
    pub fn session_count(&self) -> usize {
        self.accounts.iter().map(|e| e.value().len()).sum()
    }

    /// Register `full`; returns the session it replaced, which the caller kicks with `conflict`.
    pub fn bind(
        &self,
        full: &FullJid,
        handle: Arc<SessionHandle>,
    ) -> Result<Option<Arc<SessionHandle>>, BindError> {
        let addr = handle.remote_addr;
        let mut entry = self.accounts.entry(full.to_bare()).or_default();
        let name = full.resource().as_str();
        let new = Resource {
            name: name.to_string(),
            handle,
            presence: None,
        };
        let count = entry.len();
        match entry.iter_mut().find(|r| r.name == name) {
            Some(old) => Ok(Some(std::mem::replace(old, new).handle)),
            None if self.max_resources > 0 && count >= self.max_resources => {
                Err(BindError::TooManyResources {
                    limit: self.max_resources,
                })
            }
            None => {
                entry.push(new);
                drop(entry);
                if count == 0
                    && let Some(ev) = self.events.get()
                {
                    ev.online(full, addr, SystemTime::now());
                }
                Ok(None)
            }
        }
    }

    /// Remove `full` if it is still the session `session_id` (a replacement must not be removed by the
    /// replaced session's cleanup).
    pub fn unbind(&self, full: &FullJid, session_id: u64) {
        let bare = full.to_bare();
        let mut addr = None;
        let gone = self.accounts.remove_if_mut(&bare, |_, resources| {
            resources.retain(|r| {
                let this = r.name == full.resource().as_str() && r.handle.id == session_id;
                if this {
                    addr = Some(r.handle.remote_addr);
                }
                !this
            });
            resources.is_empty()
        });
        if gone.is_some()
            && let (Some(addr), Some(ev)) = (addr, self.events.get())
        {
            ev.offline(full, addr, SystemTime::now());
        }
    }

    /// Record the resource's current presence; `None` makes it unavailable (but still connected).
    /// Only the session `session_id` is touched: a replaced session's late cleanup must not change the
    /// presence of the session that took over its full JID.
    pub fn set_presence(&self, full: &FullJid, session_id: u64, presence: Option<(i8, Bytes)>) {
        if let Some(mut resources) = self.accounts.get_mut(&full.to_bare())
            && let Some(r) = resources
                .iter_mut()
                .find(|r| r.name == full.resource().as_str() && r.handle.id == session_id)
        {
            r.presence = presence;
        }
    }

    /// True while `full` is bound to the session `session_id` (false once a new login replaced it).
    pub fn is_current(&self, full: &FullJid, session_id: u64) -> bool {
        self.accounts.get(&full.to_bare()).is_some_and(|rs| {
            rs.iter()
                .any(|r| r.name == full.resource().as_str() && r.handle.id == session_id)
        })
    }

    /// Available presences of the account's resources, as (resource, stanza).
    pub fn presences(&self, bare: &BareJid) -> Vec<(String, Bytes)> {
        self.accounts
            .get(bare)
            .map(|rs| {
                rs.iter()
                    .filter_map(|r| {
                        r.presence
                            .as_ref()
                            .map(|(_, p)| (r.name.clone(), p.clone()))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Connected resources of an account with their session handles.
    pub fn sessions(&self, bare: &BareJid) -> Vec<(String, Arc<SessionHandle>)> {
        self.accounts
            .get(bare)
            .map(|rs| {
                rs.iter()
                    .map(|r| (r.name.clone(), r.handle.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Kick every session (shutdown, operator disconnect of a whole account …).
    pub fn kick_all(&self, why: Kick) {
        for e in self.accounts.iter() {
            for r in e.value() {
                r.handle.kick(why);
            }
        }
    }

    /// Deliver a stanza addressed to a user of this domain, per RFC 6121 §8.5.
    pub fn route(&self, to: &Jid, kind: Kind, stanza: Bytes) -> Delivery {
        self.route_tagged(to, kind, stanza, None)
    }

    /// As [`Router::route`], for a durable push: the sessions keep `meta` with it until the client
    /// acknowledges it (or requeue it).
    pub fn route_tagged(
        &self,
        to: &Jid,
        kind: Kind,
        stanza: Bytes,
        meta: Option<Arc<PushMeta>>,
    ) -> Delivery {
        // Collect the target queues under the shard lock, send after releasing it.
        let targets: Vec<Arc<SessionHandle>>;
        match to.try_as_full() {
            Ok(full) => {
                let found = self.accounts.get(&full.to_bare()).and_then(|rs| {
                    rs.iter()
                        .find(|r| r.name == full.resource().as_str())
                        .map(|r| r.handle.clone())
                });
                match (found, kind) {
                    (Some(h), _) => targets = vec![h],
                    // §8.5.3.2.1: normal/chat to an unavailable resource is handled as if to the bare JID.
                    (None, Kind::Message(MessageType::Normal | MessageType::Chat)) => {
                        return self.route_tagged(&Jid::from(full.to_bare()), kind, stanza, meta);
                    }
                    (None, Kind::Message(MessageType::Groupchat) | Kind::Iq) => {
                        return Delivery::Unavailable;
                    }
                    // §8.5.3.2.1 headline/error, §8.5.3.2.2 presence: silently ignored.
                    (None, _) => return Delivery::Ignored,
                }
            }
            Err(bare) => {
                let Some(rs) = self.accounts.get(bare) else {
                    return Self::nobody(kind);
                };
                targets = match kind {
                    // §8.5.2.1.1: chat/normal to the highest non-negative priority resource(s).
                    Kind::Message(MessageType::Normal | MessageType::Chat) => {
                        let best = rs
                            .iter()
                            .filter_map(|r| r.presence.as_ref().map(|(p, _)| *p))
                            .filter(|p| *p >= 0)
                            .max();
                        match best {
                            Some(best) => rs
                                .iter()
                                .filter(|r| matches!(r.presence, Some((p, _)) if p == best))
                                .map(|r| r.handle.clone())
                                .collect(),
                            None => Vec::new(),
                        }
                    }
                    // Headline: every available resource with non-negative priority.
                    Kind::Message(MessageType::Headline) => rs
                        .iter()
                        .filter(|r| matches!(r.presence, Some((p, _)) if p >= 0))
                        .map(|r| r.handle.clone())
                        .collect(),
                    // §8.5.2.1.1: groupchat to a bare JID is an error; errors are dropped.
                    Kind::Message(MessageType::Groupchat) => return Delivery::Unavailable,
                    Kind::Message(MessageType::Error) => return Delivery::Ignored,
                    // §8.5.2.1.2: presence to every available resource.
                    Kind::Presence => rs
                        .iter()
                        .filter(|r| r.presence.is_some())
                        .map(|r| r.handle.clone())
                        .collect(),
                    // §8.5.2.1.3: an iq to the bare JID is the server's to answer, never routed here.
                    Kind::Iq => return Delivery::Unavailable,
                };
            }
        }
        if targets.is_empty() {
            return Self::nobody(kind);
        }
        let mut delivered = 0;
        let mut full = false;
        for h in targets {
            match h.try_send_tagged(stanza.clone(), meta.clone()) {
                Ok(()) => delivered += 1,
                Err(QueueFull) => full = true,
            }
        }
        metrics::counter!("tern_stanzas_routed_total").increment(delivered as u64);
        match (delivered, full) {
            (0, true) => {
                metrics::counter!("tern_outbound_queue_full_total").increment(1);
                Delivery::QueueFull
            }
            (0, false) => Self::nobody(kind),
            (n, _) => Delivery::Delivered(n),
        }
    }

    /// §8.5.2.2: no available resource. Without offline storage, messages and iqs bounce.
    fn nobody(kind: Kind) -> Delivery {
        match kind {
            Kind::Message(MessageType::Normal | MessageType::Chat | MessageType::Groupchat)
            | Kind::Iq => Delivery::Unavailable,
            _ => Delivery::Ignored,
        }
    }

    /// Send to every available resource of `bare` (presence broadcast, RFC 6121 §4.2.2, §4.5.2).
    /// Observers (`c2s.presence_observers`) get it too, unless it is their own.
    pub fn broadcast_presence(&self, bare: &BareJid, stanza: Bytes) -> usize {
        let mut n = 0;
        for to in std::iter::once(bare).chain(self.observers.iter().filter(|o| *o != bare)) {
            if let Delivery::Delivered(k) =
                self.route(&Jid::from(to.clone()), Kind::Presence, stanza.clone())
            {
                n += k;
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A session and a way to take what was queued for it.
    fn session(cap: usize) -> (Arc<SessionHandle>, Rx) {
        let h = SessionHandle::new(cap, "127.0.0.1:1".parse().unwrap());
        (h.clone(), Rx(h))
    }

    struct Rx(Arc<SessionHandle>);

    impl Rx {
        fn try_recv(&mut self) -> Result<Bytes, ()> {
            let mut v = Vec::new();
            self.0.drain(1, &mut v);
            v.pop().map(|(b, _)| b).ok_or(())
        }
    }

    fn full(s: &str) -> FullJid {
        FullJid::new(s).unwrap()
    }

    fn jid(s: &str) -> Jid {
        Jid::new(s).unwrap()
    }

    const CHAT: Kind = Kind::Message(MessageType::Chat);

    /// Set the presence of whichever session holds `jid`.
    fn set(r: &Router, jid: &str, p: Option<(i8, Bytes)>) {
        let j = full(jid);
        let id = r
            .sessions(&j.to_bare())
            .into_iter()
            .find(|(res, _)| res == j.resource().as_str())
            .map(|(_, h)| h.id)
            .expect("bound");
        r.set_presence(&j, id, p);
    }

    #[test]
    fn full_jid_delivery_and_fallback_to_bare() {
        let r = Router::new();
        let (h, mut rx) = session(4);
        assert!(r.bind(&full("a@d/x"), h).unwrap().is_none());
        assert_eq!(
            r.route(&jid("a@d/x"), CHAT, Bytes::from_static(b"1")),
            Delivery::Delivered(1)
        );
        assert_eq!(rx.try_recv().unwrap(), Bytes::from_static(b"1"));
        // Unknown resource, no available presence: chat falls back to bare → unavailable.
        assert_eq!(
            r.route(&jid("a@d/y"), CHAT, Bytes::new()),
            Delivery::Unavailable
        );
        assert_eq!(
            r.route(&jid("a@d/y"), Kind::Iq, Bytes::new()),
            Delivery::Unavailable
        );
        assert_eq!(
            r.route(&jid("a@d/y"), Kind::Presence, Bytes::new()),
            Delivery::Ignored
        );
        set(&r, "a@d/x", Some((0, Bytes::new())));
        assert_eq!(
            r.route(&jid("a@d/y"), CHAT, Bytes::from_static(b"2")),
            Delivery::Delivered(1)
        );
        assert_eq!(rx.try_recv().unwrap(), Bytes::from_static(b"2"));
    }

    #[test]
    fn bare_jid_priority_rules() {
        let r = Router::new();
        let (h1, mut rx1) = session(4);
        let (h2, mut rx2) = session(4);
        let (h3, mut rx3) = session(4);
        r.bind(&full("a@d/1"), h1).unwrap();
        r.bind(&full("a@d/2"), h2).unwrap();
        r.bind(&full("a@d/3"), h3).unwrap();
        set(&r, "a@d/1", Some((5, Bytes::new())));
        set(&r, "a@d/2", Some((5, Bytes::new())));
        set(&r, "a@d/3", Some((-1, Bytes::new())));
        assert_eq!(
            r.route(&jid("a@d"), CHAT, Bytes::from_static(b"m")),
            Delivery::Delivered(2)
        );
        assert!(rx1.try_recv().is_ok() && rx2.try_recv().is_ok() && rx3.try_recv().is_err());
        let hl = Kind::Message(MessageType::Headline);
        assert_eq!(
            r.route(&jid("a@d"), hl, Bytes::new()),
            Delivery::Delivered(2)
        );
        assert_eq!(
            r.route(&jid("a@d"), Kind::Presence, Bytes::new()),
            Delivery::Delivered(3)
        );
        let gc = Kind::Message(MessageType::Groupchat);
        assert_eq!(
            r.route(&jid("a@d"), gc, Bytes::new()),
            Delivery::Unavailable
        );
        // Only negative priorities: chat is not delivered.
        set(&r, "a@d/1", None);
        set(&r, "a@d/2", None);
        assert_eq!(
            r.route(&jid("a@d"), CHAT, Bytes::new()),
            Delivery::Unavailable
        );
    }

    #[test]
    fn replace_and_unbind_keep_the_newer_session() {
        let r = Router::new();
        let (h1, _rx1) = session(1);
        let (h2, mut rx2) = session(1);
        let id1 = h1.id;
        r.bind(&full("a@d/x"), h1).unwrap();
        let old = r.bind(&full("a@d/x"), h2).unwrap().expect("replaced");
        assert_eq!(old.id, id1);
        r.unbind(&full("a@d/x"), id1); // the old session's cleanup must not remove the new one
        r.set_presence(&full("a@d/x"), id1, Some((0, Bytes::new())));
        assert!(
            r.presences(&full("a@d/x").to_bare()).is_empty(),
            "nor set its presence"
        );
        assert_eq!(r.session_count(), 1);
        assert_eq!(
            r.route(&jid("a@d/x"), Kind::Iq, Bytes::new()),
            Delivery::Delivered(1)
        );
        assert!(rx2.try_recv().is_ok());
    }

    #[test]
    fn resource_limit_per_account() {
        let r = Router::with_max_resources(2);
        let (h1, _r1) = session(1);
        let (h2, _r2) = session(1);
        let (h3, _r3) = session(1);
        let (h4, _r4) = session(1);
        r.bind(&full("a@d/1"), h1).unwrap();
        r.bind(&full("a@d/2"), h2).unwrap();
        assert_eq!(
            r.bind(&full("a@d/3"), h3).unwrap_err(),
            BindError::TooManyResources { limit: 2 }
        );
        // Replacing an existing resource is still allowed at the limit.
        assert!(r.bind(&full("a@d/2"), h4).unwrap().is_some());
    }

    #[tokio::test]
    async fn iq_waiters_get_their_reply_once() {
        let r = Router::new();
        let rx = r.await_iq_reply("x1");
        assert!(!r.complete_iq("other", Bytes::new()));
        assert!(r.complete_iq("x1", Bytes::from_static(b"<iq/>")));
        assert!(!r.complete_iq("x1", Bytes::new()), "only once");
        assert_eq!(rx.await.unwrap(), Bytes::from_static(b"<iq/>"));
        let _rx = r.await_iq_reply("x2");
        r.cancel_iq("x2");
        assert!(!r.complete_iq("x2", Bytes::new()));
    }

    #[test]
    fn full_queue_is_reported_not_grown() {
        let r = Router::new();
        let (h, _rx) = session(1);
        r.bind(&full("a@d/x"), h).unwrap();
        assert_eq!(
            r.route(&jid("a@d/x"), Kind::Iq, Bytes::new()),
            Delivery::Delivered(1)
        );
        assert_eq!(
            r.route(&jid("a@d/x"), Kind::Iq, Bytes::new()),
            Delivery::QueueFull
        );
    }

    #[tokio::test]
    async fn queue_wakes_and_releases_memory() {
        let (h, _rx) = session(4);
        let waiter = tokio::spawn({
            let h = h.clone();
            async move { h.ready().await }
        });
        h.try_send(Bytes::from_static(b"x")).unwrap();
        waiter.await.unwrap();
        let mut out = Vec::new();
        h.drain(10, &mut out);
        assert_eq!(out, vec![(Bytes::from_static(b"x"), None)]);
        assert_eq!(
            h.queue().items.capacity(),
            0,
            "an idle queue holds no allocation"
        );
        assert_eq!(h.queue().bytes, 0);
    }

    #[test]
    fn queue_is_bounded_in_bytes_too() {
        let h = SessionHandle::with_limits(100, 10, "127.0.0.1:1".parse().unwrap());
        // One stanza always fits into an empty queue, however large.
        h.try_send(Bytes::from(vec![b'x'; 50])).unwrap();
        assert_eq!(h.try_send(Bytes::from_static(b"y")), Err(QueueFull));
        let mut out = Vec::new();
        h.drain(10, &mut out);
        h.try_send(Bytes::from(vec![b'x'; 6])).unwrap();
        h.try_send(Bytes::from(vec![b'x'; 4])).unwrap();
        assert_eq!(h.try_send(Bytes::from_static(b"z")), Err(QueueFull));
    }

    #[tokio::test]
    async fn kick_wakes_even_with_full_queue() {
        let (h, _rx) = session(1);
        h.try_send(Bytes::new()).unwrap();
        assert_eq!(h.try_send(Bytes::new()), Err(QueueFull));
        h.kick(Kick::Conflict);
        h.ready().await;
        assert_eq!(h.kick_reason(), Some(Kick::Conflict));
    }
}

//! The durable offline push queue and the push status records, stored in one redb file
//! (`{data_dir}/queue.redb`).
//!
//! # Why it is built this way
//!
//! * **Durability before the answer.** A push answered `queued` must survive `kill -9`, so every
//!   write is a redb transaction committed with [`redb::Durability::Immediate`] (the default: the
//!   commit fsyncs) *before* the caller is answered.
//! * **Group commit.** redb allows one write transaction at a time and an fsync costs around a
//!   millisecond, so one transaction per push would cap the server at about a thousand pushes a
//!   second. Instead every write goes through ONE dedicated writer thread fed by a bounded channel:
//!   it takes every command already waiting (up to [`QueueConfig::max_batch`]), applies them all in
//!   ONE write transaction, commits (one fsync), then answers each command through its
//!   [`tokio::sync::oneshot`]. Under load, thousands of concurrent enqueues share a handful of
//!   fsyncs. The bounded channel gives back-pressure when the disk cannot keep up.
//! * **Status-only commits may skip the fsync.** A batch of nothing but status records
//!   (`delivered`, `acked`, ...) commits with [`redb::Durability::None`] unless the last durable
//!   commit is a second old: those records describe pushes no longer in the queue, so a crash loses
//!   at most a second of them and never a push, and the single-recipient push path stays fast.
//! * **Reads never wait for the writer.** [`PushQueue::peek`], [`PushQueue::status`] and
//!   [`PushQueue::depth`] open a redb read transaction (an MVCC snapshot) directly on the caller's
//!   thread; they are short B-tree lookups, cheap enough to call from async code.
//! * **Order.** Items are keyed by `(bare JID, seq)` with a signed per-endpoint sequence: appends
//!   take the next sequence at the tail, and [`PushQueue::requeue_front`] takes sequences *below*
//!   the current head, so pushes that were sent on a stream-management session that then expired
//!   are delivered again before anything queued after them. Items delivered from the queue are
//!   only removed on acknowledgement ([`PushQueue::remove`]), so they keep their original place
//!   without any put-back at all (at-least-once delivery).
//! * **Idempotency.** The status table is keyed by `(push id, recipient)`; enqueueing a pair that
//!   already has a status record stores nothing and answers [`EnqueueOutcome::Duplicate`].
//! * **Expiry without scans.** Secondary indexes keyed by time (`item expiry`, `status purge at`)
//!   let [`PushQueue::purge_expired`] find due records with a range scan instead of reading every
//!   item or status.
//!
//! # Tables
//!
//! | table | key | value |
//! | --- | --- | --- |
//! | `queue_items` | `(bare JID, seq: i64)` | item record (push id, created, expires, stanza) |
//! | `queue_endpoints` | bare JID | `(head seq, next tail seq, item count)` |
//! | `queue_item_expiry` | `(expires ms, bare JID, seq)` | `()` |
//! | `push_status` | `(push id, recipient)` | status record |
//! | `push_status_purge` | `(purge-at ms, push id, recipient)` | `()` |
//!
//! Records are a small versioned binary encoding (first byte = format version) rather than JSON, so
//! stanza bytes are stored as they are.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use redb::{
    Database, DatabaseError, ReadableDatabase, ReadableTable, ReadableTableMetadata, Table,
    TableDefinition, WriteTransaction,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

/// File name of the queue database inside `data_dir`.
pub const FILE_NAME: &str = "queue.redb";

const ITEMS: TableDefinition<(&str, i64), &[u8]> = TableDefinition::new("queue_items");
const ENDPOINTS: TableDefinition<&str, (i64, i64, u64)> = TableDefinition::new("queue_endpoints");
const ITEM_EXPIRY: TableDefinition<(u64, &str, i64), ()> =
    TableDefinition::new("queue_item_expiry");
const STATUS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("push_status");
const STATUS_PURGE: TableDefinition<(u64, &str, &str), ()> =
    TableDefinition::new("push_status_purge");

/// Record format version written as the first byte of item and status records.
const RECORD_VERSION: u8 = 1;
/// How many expired items (and, separately, stale status records) one purge transaction handles,
/// so a large backlog of expiries does not hold the writer (and every enqueue behind it) for long.
const PURGE_CHUNK: usize = 4096;
/// redb page cache; the queue's working set is small, the 1 GiB default is far too generous.
const CACHE_SIZE: usize = 64 * 1024 * 1024;

/// Limits of the queue. Field names mirror the server's config keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    /// Maximum number of items queued for one bare JID; further enqueues answer
    /// [`EnqueueOutcome::Full`] for that recipient.
    pub max_per_endpoint: usize,
    /// How long a push status record is kept after its last update (and after its item's expiry).
    pub status_retention: Duration,
    /// Maximum number of commands the writer folds into one transaction.
    pub max_batch: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_per_endpoint: 1000,
            status_retention: Duration::from_secs(7 * 24 * 3600),
            max_batch: 1024,
        }
    }
}

/// A push to store for an offline (or not yet acknowledging) endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewItem {
    /// Client-chosen (or server-generated) push id; `(push_id, recipient)` is the idempotency key.
    pub push_id: String,
    /// Normalised bare JID of the recipient.
    pub recipient: String,
    /// The stanza exactly as it will be written to the recipient's stream.
    pub stanza: Bytes,
    pub created: SystemTime,
    /// From this instant on the item is never returned by [`PushQueue::peek`].
    pub expires_at: SystemTime,
}

/// Where an item sits in the queue: enough to remove it after acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ItemKey {
    pub recipient: String,
    pub seq: i64,
}

/// An item as stored, returned by [`PushQueue::peek`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedItem {
    /// `key.recipient` is the recipient's bare JID.
    pub key: ItemKey,
    pub push_id: String,
    pub stanza: Bytes,
    pub created: SystemTime,
    pub expires_at: SystemTime,
}

/// The answer to one [`NewItem`] of [`PushQueue::enqueue`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnqueueOutcome {
    /// Stored durably (committed before this answer).
    Queued(ItemKey),
    /// The recipient already holds `max_per_endpoint` items; nothing was stored and no status record
    /// was written, so the client may retry the same push id later.
    Full,
    /// This `(push id, recipient)` already has a status record; nothing was stored. Carries the
    /// current state so the HTTP layer can answer a repeated request like the first one.
    Duplicate(PushState),
}

/// The answer to one item of [`PushQueue::requeue_front`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequeueOutcome {
    /// Stored at the front of the recipient's queue.
    Queued(ItemKey),
    /// Already past its expiry: not stored, status set to `expired`.
    Expired,
}

/// The delivery state of one push for one recipient. Serialised in lower case, as in the JSON API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PushState {
    Queued,
    Delivered,
    Acked,
    Expired,
    Dropped,
    Error,
}

impl PushState {
    /// The name used in the JSON API.
    pub fn as_str(self) -> &'static str {
        match self {
            PushState::Queued => "queued",
            PushState::Delivered => "delivered",
            PushState::Acked => "acked",
            PushState::Expired => "expired",
            PushState::Dropped => "dropped",
            PushState::Error => "error",
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            PushState::Queued => 0,
            PushState::Delivered => 1,
            PushState::Acked => 2,
            PushState::Expired => 3,
            PushState::Dropped => 4,
            PushState::Error => 5,
        }
    }

    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => PushState::Queued,
            1 => PushState::Delivered,
            2 => PushState::Acked,
            3 => PushState::Expired,
            4 => PushState::Dropped,
            5 => PushState::Error,
            _ => return None,
        })
    }
}

impl std::fmt::Display for PushState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A status change for one `(push id, recipient)`, created if absent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusUpdate {
    pub push_id: String,
    pub recipient: String,
    pub state: PushState,
    /// Reason, meaningful with [`PushState::Error`] or [`PushState::Dropped`].
    pub error: Option<String>,
    pub at: SystemTime,
}

/// The status of one recipient of a push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientStatus {
    pub recipient: String,
    pub state: PushState,
    pub error: Option<String>,
    pub updated: SystemTime,
}

/// Everything known about one push id (`GET /api/v1/push/{id}`), recipients in byte order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushStatus {
    pub push_id: String,
    pub results: Vec<RecipientStatus>,
}

/// What [`PushQueue::purge_expired`] deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PurgeReport {
    /// Items past their expiry, deleted and their status set to `expired`.
    pub expired_items: usize,
    /// Status records past their retention, deleted.
    pub purged_statuses: usize,
}

/// A push queue problem. Messages name the file and the operation.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error(
        "push queue {}: the database is locked: another tern process holds {}?",
        .path.display(),
        .path.display()
    )]
    Locked { path: PathBuf },
    #[error("push queue {}: cannot {op}: {source}", .path.display())]
    Storage {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: Box<redb::Error>,
    },
    #[error(
        "push queue {}: cannot {op}: corrupt record: {detail} (restore the file or move it away)",
        .path.display()
    )]
    Corrupt {
        path: PathBuf,
        op: &'static str,
        detail: String,
    },
    #[error("push queue {}: cannot {op}: invalid input: {detail}", .path.display())]
    Invalid {
        path: PathBuf,
        op: &'static str,
        detail: String,
    },
    #[error("push queue {}: cannot {op}: the queue is closed", .path.display())]
    Closed { path: PathBuf, op: &'static str },
    #[error("push queue {}: cannot start the writer thread: {source}", .path.display())]
    Thread {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Internal error before it is given a path and an operation name.
#[derive(Debug)]
enum Fail {
    Redb(redb::Error),
    Corrupt(String),
    Invalid(String),
}

macro_rules! fail_from {
    ($($t:ty),*) => {$(
        impl From<$t> for Fail {
            fn from(e: $t) -> Self {
                Fail::Redb(redb::Error::from(e))
            }
        }
    )*};
}
fail_from!(
    redb::StorageError,
    redb::TableError,
    redb::TransactionError,
    redb::CommitError,
    redb::DatabaseError
);

impl Fail {
    fn into_error(self, path: &Path, op: &'static str) -> QueueError {
        let path = path.to_path_buf();
        match self {
            Fail::Redb(redb::Error::DatabaseAlreadyOpen) => QueueError::Locked { path },
            Fail::Redb(source) => QueueError::Storage {
                path,
                op,
                source: Box::new(source),
            },
            Fail::Corrupt(detail) => QueueError::Corrupt { path, op, detail },
            Fail::Invalid(detail) => QueueError::Invalid { path, op, detail },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Record encoding

fn to_ms(t: SystemTime) -> u64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
        Err(_) => 0,
    }
}

fn from_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// Reads fields off a record; every accessor returns `None` past the end (a corrupt record).
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    }
    fn i64(&mut self) -> Option<i64> {
        self.take(8)
            .and_then(|b| b.try_into().ok())
            .map(i64::from_le_bytes)
    }
    fn str(&mut self) -> Option<&'a str> {
        let len = self
            .take(4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)?;
        let bytes = self.take(usize::try_from(len).ok()?)?;
        std::str::from_utf8(bytes).ok()
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) -> Result<(), Fail> {
    let len = u32::try_from(s.len())
        .map_err(|_| Fail::Invalid(format!("string of {} bytes is too long", s.len())))?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

/// One stored item (the recipient and sequence are the key).
struct ItemRec {
    push_id: String,
    created_ms: u64,
    expires_ms: u64,
    stanza: Bytes,
}

impl ItemRec {
    fn encode(&self) -> Result<Vec<u8>, Fail> {
        let mut out = Vec::with_capacity(1 + 16 + 4 + self.push_id.len() + self.stanza.len());
        out.push(RECORD_VERSION);
        out.extend_from_slice(&self.created_ms.to_le_bytes());
        out.extend_from_slice(&self.expires_ms.to_le_bytes());
        put_str(&mut out, &self.push_id)?;
        out.extend_from_slice(&self.stanza);
        Ok(out)
    }

    fn decode(b: &[u8]) -> Result<ItemRec, Fail> {
        let mut c = Cursor(b);
        let bad = || Fail::Corrupt("queue item record".into());
        match c.u8() {
            Some(RECORD_VERSION) => {}
            Some(v) => return Err(Fail::Corrupt(format!("queue item record version {v}"))),
            None => return Err(bad()),
        }
        let created_ms = c.u64().ok_or_else(bad)?;
        let expires_ms = c.u64().ok_or_else(bad)?;
        let push_id = c.str().ok_or_else(bad)?.to_owned();
        Ok(ItemRec {
            push_id,
            created_ms,
            expires_ms,
            stanza: Bytes::copy_from_slice(c.0),
        })
    }

    fn from_new(item: &NewItem) -> ItemRec {
        ItemRec {
            push_id: item.push_id.clone(),
            created_ms: to_ms(item.created),
            expires_ms: to_ms(item.expires_at),
            stanza: item.stanza.clone(),
        }
    }
}

/// One push status record.
#[derive(Debug, Clone)]
struct StatusRec {
    state: PushState,
    updated_ms: u64,
    /// Expiry of the queued item, 0 when the push was never queued. Keeps the record at least as
    /// long as the item, so a retry can never store a second copy of a still-queued push.
    expires_ms: u64,
    /// When the record may be purged; also its key in `push_status_purge`.
    purge_at_ms: u64,
    /// Sequence of the queued item, if it was queued (may point at a removed item).
    seq: Option<i64>,
    error: Option<String>,
}

impl StatusRec {
    fn new(
        state: PushState,
        updated_ms: u64,
        expires_ms: u64,
        seq: Option<i64>,
        error: Option<String>,
        retention_ms: u64,
    ) -> StatusRec {
        StatusRec {
            state,
            updated_ms,
            expires_ms,
            purge_at_ms: updated_ms.max(expires_ms).saturating_add(retention_ms),
            seq,
            error,
        }
    }

    fn encode(&self) -> Result<Vec<u8>, Fail> {
        let mut out = Vec::with_capacity(40);
        out.push(RECORD_VERSION);
        out.push(self.state.to_u8());
        out.extend_from_slice(&self.updated_ms.to_le_bytes());
        out.extend_from_slice(&self.expires_ms.to_le_bytes());
        out.extend_from_slice(&self.purge_at_ms.to_le_bytes());
        match self.seq {
            Some(s) => {
                out.push(1);
                out.extend_from_slice(&s.to_le_bytes());
            }
            None => out.push(0),
        }
        match &self.error {
            Some(e) => {
                out.push(1);
                put_str(&mut out, e)?;
            }
            None => out.push(0),
        }
        Ok(out)
    }

    fn decode(b: &[u8]) -> Result<StatusRec, Fail> {
        let mut c = Cursor(b);
        let bad = || Fail::Corrupt("push status record".into());
        match c.u8() {
            Some(RECORD_VERSION) => {}
            Some(v) => return Err(Fail::Corrupt(format!("push status record version {v}"))),
            None => return Err(bad()),
        }
        let state = c.u8().and_then(PushState::from_u8).ok_or_else(bad)?;
        let updated_ms = c.u64().ok_or_else(bad)?;
        let expires_ms = c.u64().ok_or_else(bad)?;
        let purge_at_ms = c.u64().ok_or_else(bad)?;
        let seq = match c.u8().ok_or_else(bad)? {
            0 => None,
            _ => Some(c.i64().ok_or_else(bad)?),
        };
        let error = match c.u8().ok_or_else(bad)? {
            0 => None,
            _ => Some(c.str().ok_or_else(bad)?.to_owned()),
        };
        Ok(StatusRec {
            state,
            updated_ms,
            expires_ms,
            purge_at_ms,
            seq,
            error,
        })
    }
}

/// Per-endpoint bookkeeping: `head` is the lowest sequence handed out (front inserts go below it),
/// `tail` the next sequence for an append, `count` the items stored (expired ones included until
/// purged). Removed when the count drops to zero.
#[derive(Debug, Clone, Copy, Default)]
struct Meta {
    head: i64,
    tail: i64,
    count: u64,
}

// ---------------------------------------------------------------------------------------------
// Write side: all tables of one write transaction

struct Tables<'txn> {
    items: Table<'txn, (&'static str, i64), &'static [u8]>,
    endpoints: Table<'txn, &'static str, (i64, i64, u64)>,
    expiry: Table<'txn, (u64, &'static str, i64), ()>,
    status: Table<'txn, (&'static str, &'static str), &'static [u8]>,
    status_purge: Table<'txn, (u64, &'static str, &'static str), ()>,
}

impl<'txn> Tables<'txn> {
    fn open(txn: &'txn WriteTransaction) -> Result<Tables<'txn>, Fail> {
        Ok(Tables {
            items: txn.open_table(ITEMS)?,
            endpoints: txn.open_table(ENDPOINTS)?,
            expiry: txn.open_table(ITEM_EXPIRY)?,
            status: txn.open_table(STATUS)?,
            status_purge: txn.open_table(STATUS_PURGE)?,
        })
    }

    fn meta(&self, jid: &str) -> Result<Meta, Fail> {
        Ok(match self.endpoints.get(jid)? {
            Some(g) => {
                let (head, tail, count) = g.value();
                Meta { head, tail, count }
            }
            None => Meta::default(),
        })
    }

    fn set_meta(&mut self, jid: &str, m: Meta) -> Result<(), Fail> {
        if m.count == 0 {
            self.endpoints.remove(jid)?;
        } else {
            self.endpoints.insert(jid, (m.head, m.tail, m.count))?;
        }
        Ok(())
    }

    fn status_get(&self, push_id: &str, recipient: &str) -> Result<Option<StatusRec>, Fail> {
        match self.status.get((push_id, recipient))? {
            Some(g) => Ok(Some(StatusRec::decode(g.value())?)),
            None => Ok(None),
        }
    }

    /// Writes `rec`, keeping the purge index in step with the record it replaces.
    fn status_put(
        &mut self,
        push_id: &str,
        recipient: &str,
        rec: &StatusRec,
        old: Option<&StatusRec>,
    ) -> Result<(), Fail> {
        if let Some(old) = old {
            self.status_purge
                .remove((old.purge_at_ms, push_id, recipient))?;
        }
        let bytes = rec.encode()?;
        self.status.insert((push_id, recipient), bytes.as_slice())?;
        self.status_purge
            .insert((rec.purge_at_ms, push_id, recipient), ())?;
        Ok(())
    }

    /// Stores an item at `seq` (the caller maintains the endpoint's meta).
    fn insert_item(&mut self, jid: &str, seq: i64, rec: &ItemRec) -> Result<(), Fail> {
        let bytes = rec.encode()?;
        self.items.insert((jid, seq), bytes.as_slice())?;
        self.expiry.insert((rec.expires_ms, jid, seq), ())?;
        Ok(())
    }

    fn item_get(&self, jid: &str, seq: i64) -> Result<Option<ItemRec>, Fail> {
        match self.items.get((jid, seq))? {
            Some(g) => Ok(Some(ItemRec::decode(g.value())?)),
            None => Ok(None),
        }
    }

    /// Deletes an item with its index entry and decrements the endpoint's count.
    fn remove_item(&mut self, jid: &str, seq: i64) -> Result<Option<ItemRec>, Fail> {
        let rec = match self.items.remove((jid, seq))? {
            Some(g) => ItemRec::decode(g.value())?,
            None => return Ok(None),
        };
        self.expiry.remove((rec.expires_ms, jid, seq))?;
        let mut m = self.meta(jid)?;
        m.count = m.count.saturating_sub(1);
        self.set_meta(jid, m)?;
        Ok(Some(rec))
    }

    /// Sets the state of an existing status record (creating one if absent).
    fn mark(
        &mut self,
        push_id: &str,
        recipient: &str,
        state: PushState,
        error: Option<String>,
        at_ms: u64,
        retention_ms: u64,
    ) -> Result<(), Fail> {
        let old = self.status_get(push_id, recipient)?;
        // `delivered` is recorded off the answer's path and may land after the client's ack: an
        // acknowledged push stays acknowledged.
        if state == PushState::Delivered
            && old.as_ref().is_some_and(|o| o.state == PushState::Acked)
        {
            return Ok(());
        }
        let (expires_ms, seq) = old.as_ref().map_or((0, None), |o| (o.expires_ms, o.seq));
        let rec = StatusRec::new(state, at_ms, expires_ms, seq, error, retention_ms);
        self.status_put(push_id, recipient, &rec, old.as_ref())
    }
}

// ---------------------------------------------------------------------------------------------
// Commands

type Reply<T> = oneshot::Sender<Result<T, QueueError>>;

enum Command {
    Enqueue {
        items: Vec<NewItem>,
        reply: Reply<Vec<EnqueueOutcome>>,
    },
    Requeue {
        items: Vec<NewItem>,
        now_ms: u64,
        reply: Reply<Vec<RequeueOutcome>>,
    },
    Remove {
        keys: Vec<ItemKey>,
        mark: Option<(PushState, u64)>,
        reply: Reply<usize>,
    },
    SetStatus {
        updates: Vec<StatusUpdate>,
        reply: Reply<()>,
    },
    Purge {
        now_ms: u64,
        reply: Reply<(PurgeReport, bool)>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

impl Command {
    fn op(&self) -> &'static str {
        match self {
            Command::Enqueue { .. } => "enqueue",
            Command::Requeue { .. } => "requeue",
            Command::Remove { .. } => "remove items",
            Command::SetStatus { .. } => "set push status",
            Command::Purge { .. } => "purge expired records",
            Command::Shutdown { .. } => "close",
        }
    }
}

/// Counts applied to shared state and metrics only once the transaction committed.
#[derive(Debug, Default, Clone, Copy)]
struct Effects {
    depth: i64,
    enqueued: u64,
    expired: u64,
    full: u64,
}

enum Output {
    Enqueue(Vec<EnqueueOutcome>),
    Requeue(Vec<RequeueOutcome>),
    Remove(usize),
    SetStatus,
    Purge(PurgeReport, bool),
}

/// State shared by the handles and the writer.
struct Shared {
    path: PathBuf,
    commits: AtomicU64,
    depth: AtomicI64,
}

/// How long status-only commits may go without an fsync.
const LAZY_STATUS_WINDOW: Duration = Duration::from_secs(1);

struct Writer {
    /// When the last durable commit happened.
    last_durable: std::cell::Cell<std::time::Instant>,
    db: Arc<Database>,
    cfg: QueueConfig,
    retention_ms: u64,
    rx: mpsc::Receiver<Command>,
    shared: Arc<Shared>,
}

impl Writer {
    fn run(mut self) {
        let max = self.cfg.max_batch.max(1);
        while let Some(first) = self.rx.blocking_recv() {
            let mut batch = Vec::new();
            let mut shutdown = None;
            match first {
                Command::Shutdown { reply } => shutdown = Some(reply),
                c => batch.push(c),
            }
            while shutdown.is_none() && batch.len() < max {
                match self.rx.try_recv() {
                    Ok(Command::Shutdown { reply }) => shutdown = Some(reply),
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                self.process(batch);
            }
            if let Some(reply) = shutdown {
                // Refuse new commands, finish those already sent, then answer the close.
                self.rx.close();
                let mut more = Vec::new();
                while let Ok(c) = self.rx.try_recv() {
                    match c {
                        Command::Shutdown { reply } => {
                            let _ = reply.send(());
                        }
                        c => more.push(c),
                    }
                    if more.len() >= max {
                        self.process(std::mem::take(&mut more));
                    }
                }
                if !more.is_empty() {
                    self.process(more);
                }
                let _ = reply.send(());
                return;
            }
        }
    }

    /// Commits the batch in one transaction; if anything in it fails, retries each command in a
    /// transaction of its own so one bad command does not fail the others.
    fn process(&self, batch: Vec<Command>) {
        match self.commit(&batch) {
            Ok(outputs) => {
                for (cmd, out) in batch.into_iter().zip(outputs) {
                    answer(cmd, Ok(out), &self.shared.path);
                }
            }
            Err(e) if batch.len() == 1 => {
                if let Some(cmd) = batch.into_iter().next() {
                    let err = e.into_error(&self.shared.path, cmd.op());
                    tracing::warn!(error = %err, "push queue write failed");
                    answer(cmd, Err(err), &self.shared.path);
                }
            }
            Err(e) => {
                tracing::warn!(error = ?e, size = batch.len(), "push queue batch failed; retrying its commands one by one");
                for cmd in batch {
                    let res = match self.commit(std::slice::from_ref(&cmd)) {
                        Ok(mut outs) => outs.pop().ok_or_else(|| {
                            Fail::Invalid("writer produced no output".into())
                                .into_error(&self.shared.path, cmd.op())
                        }),
                        Err(e) => {
                            let err = e.into_error(&self.shared.path, cmd.op());
                            tracing::warn!(error = %err, "push queue write failed");
                            Err(err)
                        }
                    };
                    answer(cmd, res, &self.shared.path);
                }
            }
        }
    }

    fn commit(&self, batch: &[Command]) -> Result<Vec<Output>, Fail> {
        let mut txn = self.db.begin_write()?;
        // Status records alone (`delivered`, `acked`, ...) describe pushes that are not in the queue:
        // losing the last second of them in a crash loses no push, and skipping their fsync is what
        // lets single-recipient pushes run at full speed. At least once a second a commit is durable,
        // which also persists the non-durable ones before it (and lets redb reuse their pages).
        let statuses_only = batch.iter().all(|c| matches!(c, Command::SetStatus { .. }));
        let now = std::time::Instant::now();
        let lazy =
            statuses_only && now.duration_since(self.last_durable.get()) < LAZY_STATUS_WINDOW;
        if lazy {
            txn.set_durability(redb::Durability::None)
                .map_err(|e| Fail::Invalid(format!("cannot relax durability: {e}")))?;
        }
        let mut effects = Effects::default();
        let outputs = {
            let mut t = Tables::open(&txn)?;
            let mut outputs = Vec::with_capacity(batch.len());
            for cmd in batch {
                outputs.push(self.apply(&mut t, cmd, &mut effects)?);
            }
            outputs
        };
        // Dropping an uncommitted transaction on the error paths above aborts it.
        txn.commit()?;
        if !lazy {
            self.last_durable.set(now);
        }
        self.shared.commits.fetch_add(1, Ordering::Relaxed);
        let depth = self
            .shared
            .depth
            .fetch_add(effects.depth, Ordering::Relaxed)
            + effects.depth;
        metrics::counter!("tern_queue_commits_total").increment(1);
        metrics::histogram!("tern_queue_commit_batch_size").record(batch.len() as f64);
        metrics::gauge!("tern_queue_depth").set(depth.max(0) as f64);
        if effects.enqueued > 0 {
            metrics::counter!("tern_queue_enqueued_total").increment(effects.enqueued);
        }
        if effects.expired > 0 {
            metrics::counter!("tern_queue_expired_total").increment(effects.expired);
        }
        if effects.full > 0 {
            metrics::counter!("tern_queue_dropped_total", "reason" => "full")
                .increment(effects.full);
        }
        Ok(outputs)
    }

    fn apply(&self, t: &mut Tables<'_>, cmd: &Command, fx: &mut Effects) -> Result<Output, Fail> {
        match cmd {
            Command::Enqueue { items, .. } => self.enqueue(t, items, fx).map(Output::Enqueue),
            Command::Requeue { items, now_ms, .. } => {
                self.requeue(t, items, *now_ms, fx).map(Output::Requeue)
            }
            Command::Remove { keys, mark, .. } => {
                let mut n = 0;
                for key in keys {
                    if let Some(rec) = t.remove_item(&key.recipient, key.seq)? {
                        n += 1;
                        fx.depth -= 1;
                        if let Some((state, at_ms)) = mark {
                            t.mark(
                                &rec.push_id,
                                &key.recipient,
                                *state,
                                None,
                                *at_ms,
                                self.retention_ms,
                            )?;
                        }
                    }
                }
                Ok(Output::Remove(n))
            }
            Command::SetStatus { updates, .. } => {
                for u in updates {
                    t.mark(
                        &u.push_id,
                        &u.recipient,
                        u.state,
                        u.error.clone(),
                        to_ms(u.at),
                        self.retention_ms,
                    )?;
                }
                Ok(Output::SetStatus)
            }
            Command::Purge { now_ms, .. } => {
                let (report, more) = self.purge(t, *now_ms, fx)?;
                Ok(Output::Purge(report, more))
            }
            Command::Shutdown { .. } => Ok(Output::SetStatus),
        }
    }

    fn enqueue(
        &self,
        t: &mut Tables<'_>,
        items: &[NewItem],
        fx: &mut Effects,
    ) -> Result<Vec<EnqueueOutcome>, Fail> {
        let cap = u64::try_from(self.cfg.max_per_endpoint).unwrap_or(u64::MAX);
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            if let Some(st) = t.status_get(&item.push_id, &item.recipient)? {
                out.push(EnqueueOutcome::Duplicate(st.state));
                continue;
            }
            let mut m = t.meta(&item.recipient)?;
            if m.count >= cap {
                fx.full += 1;
                out.push(EnqueueOutcome::Full);
                continue;
            }
            let seq = m.tail;
            m.tail = m
                .tail
                .checked_add(1)
                .ok_or_else(|| Fail::Invalid("queue sequence exhausted".into()))?;
            m.count += 1;
            let rec = ItemRec::from_new(item);
            t.insert_item(&item.recipient, seq, &rec)?;
            t.set_meta(&item.recipient, m)?;
            let st = StatusRec::new(
                PushState::Queued,
                rec.created_ms,
                rec.expires_ms,
                Some(seq),
                None,
                self.retention_ms,
            );
            t.status_put(&item.push_id, &item.recipient, &st, None)?;
            fx.depth += 1;
            fx.enqueued += 1;
            out.push(EnqueueOutcome::Queued(ItemKey {
                recipient: item.recipient.clone(),
                seq,
            }));
        }
        Ok(out)
    }

    fn requeue(
        &self,
        t: &mut Tables<'_>,
        items: &[NewItem],
        now_ms: u64,
        fx: &mut Effects,
    ) -> Result<Vec<RequeueOutcome>, Fail> {
        let mut out = vec![RequeueOutcome::Expired; items.len()];
        // Group by recipient, keeping the given order inside each group.
        let mut order: Vec<&str> = Vec::new();
        let mut groups: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, item) in items.iter().enumerate() {
            groups
                .entry(item.recipient.as_str())
                .or_insert_with(|| {
                    order.push(item.recipient.as_str());
                    Vec::new()
                })
                .push(i);
        }
        for jid in order {
            let Some(idxs) = groups.get(jid) else {
                continue;
            };
            // An item still in the queue (sent from it, never acknowledged) moves to the front
            // with the others rather than being stored twice.
            let mut seen = std::collections::HashSet::new();
            let mut live = Vec::new();
            for &i in idxs {
                let item = &items[i];
                if !seen.insert(item.push_id.as_str()) {
                    continue; // the same push twice in one call: keep the first position
                }
                let old = t.status_get(&item.push_id, jid)?;
                if let Some(seq) = old.as_ref().and_then(|o| o.seq)
                    && let Some(rec) = t.item_get(jid, seq)?
                    && rec.push_id == item.push_id
                {
                    t.remove_item(jid, seq)?;
                    fx.depth -= 1;
                }
                if to_ms(item.expires_at) <= now_ms {
                    t.mark(
                        &item.push_id,
                        jid,
                        PushState::Expired,
                        None,
                        now_ms,
                        self.retention_ms,
                    )?;
                    fx.expired += 1;
                } else {
                    live.push((i, old));
                }
            }
            let mut m = t.meta(jid)?;
            let k = i64::try_from(live.len())
                .map_err(|_| Fail::Invalid("too many items to requeue".into()))?;
            let base = m
                .head
                .checked_sub(k)
                .ok_or_else(|| Fail::Invalid("queue sequence exhausted".into()))?;
            for (j, (i, old)) in live.into_iter().enumerate() {
                let item = &items[i];
                let seq = base + j as i64;
                let rec = ItemRec::from_new(item);
                t.insert_item(jid, seq, &rec)?;
                m.count += 1;
                let st = StatusRec::new(
                    PushState::Queued,
                    now_ms,
                    rec.expires_ms,
                    Some(seq),
                    None,
                    self.retention_ms,
                );
                t.status_put(&item.push_id, jid, &st, old.as_ref())?;
                fx.depth += 1;
                out[i] = RequeueOutcome::Queued(ItemKey {
                    recipient: jid.to_owned(),
                    seq,
                });
            }
            m.head = base;
            t.set_meta(jid, m)?;
        }
        Ok(out)
    }

    fn purge(
        &self,
        t: &mut Tables<'_>,
        now_ms: u64,
        fx: &mut Effects,
    ) -> Result<(PurgeReport, bool), Fail> {
        let bound = now_ms.saturating_add(1);
        let mut report = PurgeReport::default();

        let mut due: Vec<(u64, String, i64)> = Vec::new();
        for entry in t.expiry.range(..(bound, "", i64::MIN))? {
            let (k, _) = entry?;
            let (exp, jid, seq) = k.value();
            due.push((exp, jid.to_owned(), seq));
            if due.len() >= PURGE_CHUNK {
                break;
            }
        }
        let more_items = due.len() >= PURGE_CHUNK;
        for (exp, jid, seq) in due {
            match t.remove_item(&jid, seq)? {
                Some(rec) => {
                    fx.depth -= 1;
                    fx.expired += 1;
                    report.expired_items += 1;
                    let old = t.status_get(&rec.push_id, &jid)?;
                    if old.as_ref().is_none_or(|o| o.state != PushState::Acked) {
                        t.mark(
                            &rec.push_id,
                            &jid,
                            PushState::Expired,
                            None,
                            now_ms,
                            self.retention_ms,
                        )?;
                    }
                }
                // Index entry without its item (should not happen): drop the entry.
                None => {
                    t.expiry.remove((exp, jid.as_str(), seq))?;
                }
            }
        }

        let mut stale: Vec<(u64, String, String)> = Vec::new();
        for entry in t.status_purge.range(..(bound, "", ""))? {
            let (k, _) = entry?;
            let (at, id, rcpt) = k.value();
            stale.push((at, id.to_owned(), rcpt.to_owned()));
            if stale.len() >= PURGE_CHUNK {
                break;
            }
        }
        let more_status = stale.len() >= PURGE_CHUNK;
        for (at, id, rcpt) in stale {
            t.status_purge.remove((at, id.as_str(), rcpt.as_str()))?;
            if t.status.remove((id.as_str(), rcpt.as_str()))?.is_some() {
                report.purged_statuses += 1;
            }
        }
        Ok((report, more_items || more_status))
    }
}

/// Sends a command's answer; a caller that gave up waiting is not an error.
fn answer(cmd: Command, res: Result<Output, QueueError>, path: &Path) {
    fn send<T>(reply: Reply<T>, r: Result<T, QueueError>) {
        let _ = reply.send(r);
    }
    let mismatch = |op| QueueError::Invalid {
        path: path.to_path_buf(),
        op,
        detail: "internal: mismatched writer answer".into(),
    };
    match (cmd, res) {
        (Command::Enqueue { reply, .. }, Ok(Output::Enqueue(v))) => send(reply, Ok(v)),
        (Command::Requeue { reply, .. }, Ok(Output::Requeue(v))) => send(reply, Ok(v)),
        (Command::Remove { reply, .. }, Ok(Output::Remove(n))) => send(reply, Ok(n)),
        (Command::SetStatus { reply, .. }, Ok(Output::SetStatus)) => send(reply, Ok(())),
        (Command::Purge { reply, .. }, Ok(Output::Purge(r, m))) => send(reply, Ok((r, m))),
        (Command::Shutdown { reply }, _) => {
            let _ = reply.send(());
        }
        (Command::Enqueue { reply, .. }, r) => {
            send(reply, Err(r.err().unwrap_or_else(|| mismatch("enqueue"))))
        }
        (Command::Requeue { reply, .. }, r) => {
            send(reply, Err(r.err().unwrap_or_else(|| mismatch("requeue"))))
        }
        (Command::Remove { reply, .. }, r) => send(
            reply,
            Err(r.err().unwrap_or_else(|| mismatch("remove items"))),
        ),
        (Command::SetStatus { reply, .. }, r) => send(
            reply,
            Err(r.err().unwrap_or_else(|| mismatch("set push status"))),
        ),
        (Command::Purge { reply, .. }, r) => send(
            reply,
            Err(r.err().unwrap_or_else(|| mismatch("purge expired records"))),
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// The handle

struct Inner {
    db: Arc<Database>,
    shared: Arc<Shared>,
    /// `None` only while dropping.
    tx: Option<mpsc::Sender<Command>>,
    writer: Option<JoinHandle<()>>,
}

impl Drop for Inner {
    /// Closing the channel makes the writer finish what it holds and exit; joining it means the
    /// database file is released when the last handle is gone, so it can be reopened at once.
    /// (This waits for at most the batch in flight.)
    fn drop(&mut self) {
        self.tx.take();
        if let Some(h) = self.writer.take() {
            let _ = h.join();
        }
    }
}

/// The durable push queue. Cheap to clone; all clones share one database and one writer thread,
/// which stops when [`PushQueue::close`] is called or the last clone is dropped.
///
/// Cancellation: if the future of a write method is dropped after the command was sent, the
/// command still runs and commits; the caller just does not learn the outcome. Enqueueing again
/// with the same push id is safe (idempotent).
#[derive(Clone)]
pub struct PushQueue {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PushQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushQueue")
            .field("path", &self.inner.shared.path)
            .finish_non_exhaustive()
    }
}

impl PushQueue {
    /// Opens (creating if absent) the database at `path` and starts the writer thread. The parent
    /// directory must exist. Fails with [`QueueError::Locked`] when another process (or another
    /// `PushQueue` in this one) has the file open. After a crash redb repairs the file on open,
    /// which may take a moment on a large file.
    pub fn open(path: &Path, cfg: QueueConfig) -> Result<PushQueue, QueueError> {
        let db = Database::builder()
            .set_cache_size(CACHE_SIZE)
            .create(path)
            .map_err(|e| match e {
                DatabaseError::DatabaseAlreadyOpen => QueueError::Locked {
                    path: path.to_path_buf(),
                },
                other => Fail::from(other).into_error(path, "open the database"),
            })?;
        let depth = init_tables(&db).map_err(|e| e.into_error(path, "initialise the tables"))?;
        let db = Arc::new(db);
        let shared = Arc::new(Shared {
            path: path.to_path_buf(),
            commits: AtomicU64::new(0),
            depth: AtomicI64::new(depth),
        });
        metrics::gauge!("tern_queue_depth").set(depth as f64);
        let (tx, rx) = mpsc::channel(cfg.max_batch.clamp(64, 1 << 16) * 4);
        let retention_ms = u64::try_from(cfg.status_retention.as_millis()).unwrap_or(u64::MAX);
        let writer = Writer {
            last_durable: std::cell::Cell::new(std::time::Instant::now()),
            db: db.clone(),
            cfg,
            retention_ms,
            rx,
            shared: shared.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("tern-queue-writer".into())
            .spawn(move || writer.run())
            .map_err(|source| QueueError::Thread {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(PushQueue {
            inner: Arc::new(Inner {
                db,
                shared,
                tx: Some(tx),
                writer: Some(handle),
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.shared.path
    }

    fn err(&self, op: &'static str) -> impl FnOnce(Fail) -> QueueError + '_ {
        move |e| e.into_error(&self.inner.shared.path, op)
    }

    fn closed(&self, op: &'static str) -> QueueError {
        QueueError::Closed {
            path: self.inner.shared.path.clone(),
            op,
        }
    }

    /// Sends one command to the writer and waits for its committed answer.
    async fn call<T>(
        &self,
        op: &'static str,
        make: impl FnOnce(Reply<T>) -> Command,
    ) -> Result<T, QueueError> {
        let tx = self.inner.tx.as_ref().ok_or_else(|| self.closed(op))?;
        let (rtx, rrx) = oneshot::channel();
        tx.send(make(rtx)).await.map_err(|_| self.closed(op))?;
        rrx.await.map_err(|_| self.closed(op))?
    }

    /// Stores items at the tail of their recipients' queues; one outcome per item, in order. Every
    /// `Queued` outcome is on disk (fsynced) when this returns. Also writes a `queued` status record
    /// for each stored item.
    pub async fn enqueue(&self, items: Vec<NewItem>) -> Result<Vec<EnqueueOutcome>, QueueError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        self.call("enqueue", |reply| Command::Enqueue { items, reply })
            .await
    }

    /// Puts pushes back at the FRONT of their recipients' queues, keeping the given order, for
    /// pushes written to a stream-management session that expired before acknowledging them: they
    /// must be delivered before anything queued later. A push still in the queue (sent from it and
    /// not removed) is moved rather than duplicated. Ignores the per-endpoint cap (these pushes
    /// were already accepted) and the duplicate check; status becomes `queued` again. Items already
    /// expired at `now` are not stored and their status becomes `expired`.
    pub async fn requeue_front(
        &self,
        items: Vec<NewItem>,
        now: SystemTime,
    ) -> Result<Vec<RequeueOutcome>, QueueError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let now_ms = to_ms(now);
        self.call("requeue", |reply| Command::Requeue {
            items,
            now_ms,
            reply,
        })
        .await
    }

    /// Up to `max` unexpired items of `bare_jid`, oldest first, without removing them. Items
    /// stay until [`PushQueue::remove`]: delivery is at-least-once. Runs a read transaction on the
    /// calling thread (a snapshot; never waits for the writer).
    pub fn peek(
        &self,
        bare_jid: &str,
        now: SystemTime,
        max: usize,
    ) -> Result<Vec<QueuedItem>, QueueError> {
        let now_ms = to_ms(now);
        let run = || -> Result<Vec<QueuedItem>, Fail> {
            let mut out = Vec::new();
            if max == 0 {
                return Ok(out);
            }
            let txn = self.inner.db.begin_read()?;
            let items = txn.open_table(ITEMS)?;
            for entry in items.range((bare_jid, i64::MIN)..=(bare_jid, i64::MAX))? {
                let (k, v) = entry?;
                let rec = ItemRec::decode(v.value())?;
                if rec.expires_ms <= now_ms {
                    continue;
                }
                out.push(QueuedItem {
                    key: ItemKey {
                        recipient: bare_jid.to_owned(),
                        seq: k.value().1,
                    },
                    push_id: rec.push_id,
                    stanza: rec.stanza,
                    created: from_ms(rec.created_ms),
                    expires_at: from_ms(rec.expires_ms),
                });
                if out.len() >= max {
                    break;
                }
            }
            Ok(out)
        };
        run().map_err(self.err("peek"))
    }

    /// Deletes delivered items (acknowledged, or written to a session without stream management).
    /// Unknown keys are ignored. Returns how many were deleted. Does not touch status records; see
    /// [`PushQueue::remove_and_mark`].
    pub async fn remove(&self, keys: Vec<ItemKey>) -> Result<usize, QueueError> {
        if keys.is_empty() {
            return Ok(0);
        }
        self.call("remove items", |reply| Command::Remove {
            keys,
            mark: None,
            reply,
        })
        .await
    }

    /// Like [`PushQueue::remove`], and in the same transaction sets the status of each removed
    /// item's push to `state` (typically `acked` or `delivered`), so a crash cannot leave a removed
    /// item marked `queued`.
    pub async fn remove_and_mark(
        &self,
        keys: Vec<ItemKey>,
        state: PushState,
        at: SystemTime,
    ) -> Result<usize, QueueError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let mark = Some((state, to_ms(at)));
        self.call("remove items", |reply| Command::Remove {
            keys,
            mark,
            reply,
        })
        .await
    }

    /// Creates or updates status records (batched with other writes by the writer thread).
    pub async fn set_status(&self, updates: Vec<StatusUpdate>) -> Result<(), QueueError> {
        if updates.is_empty() {
            return Ok(());
        }
        self.call("set push status", |reply| Command::SetStatus {
            updates,
            reply,
        })
        .await
    }

    /// Every recipient's status for `push_id`, or `None` if nothing is known (never seen, or past
    /// its retention).
    pub fn status(&self, push_id: &str) -> Result<Option<PushStatus>, QueueError> {
        let run = || -> Result<Option<PushStatus>, Fail> {
            let txn = self.inner.db.begin_read()?;
            let table = txn.open_table(STATUS)?;
            let mut results = Vec::new();
            for entry in table.range((push_id, "")..)? {
                let (k, v) = entry?;
                let (id, rcpt) = k.value();
                if id != push_id {
                    break;
                }
                let rec = StatusRec::decode(v.value())?;
                results.push(RecipientStatus {
                    recipient: rcpt.to_owned(),
                    state: rec.state,
                    error: rec.error,
                    updated: from_ms(rec.updated_ms),
                });
            }
            Ok((!results.is_empty()).then(|| PushStatus {
                push_id: push_id.to_owned(),
                results,
            }))
        };
        run().map_err(self.err("read push status"))
    }

    /// Items stored for `bare_jid`, including expired ones not purged yet.
    pub fn depth(&self, bare_jid: &str) -> Result<usize, QueueError> {
        let run = || -> Result<usize, Fail> {
            let txn = self.inner.db.begin_read()?;
            let table = txn.open_table(ENDPOINTS)?;
            Ok(match table.get(bare_jid)? {
                Some(g) => usize::try_from(g.value().2).unwrap_or(usize::MAX),
                None => 0,
            })
        };
        run().map_err(self.err("read queue depth"))
    }

    /// Items stored for all endpoints (the `tern_queue_depth` gauge), as of the last commit.
    pub fn total_depth(&self) -> u64 {
        u64::try_from(self.inner.shared.depth.load(Ordering::Relaxed)).unwrap_or(0)
    }

    /// Write transactions committed by this handle's writer since open: exposed so tests (and
    /// diagnostics) can check that group commit works.
    pub fn commit_count(&self) -> u64 {
        self.inner.shared.commits.load(Ordering::Relaxed)
    }

    /// Deletes items whose `expires_at <= now` (marking their status `expired`) and status records
    /// past their retention. Works in chunks of a few thousand records per transaction so enqueues
    /// keep flowing during a large purge. The server calls this periodically.
    pub async fn purge_expired(&self, now: SystemTime) -> Result<PurgeReport, QueueError> {
        let now_ms = to_ms(now);
        let mut total = PurgeReport::default();
        loop {
            let (r, more) = self
                .call("purge expired records", |reply| Command::Purge {
                    now_ms,
                    reply,
                })
                .await?;
            total.expired_items += r.expired_items;
            total.purged_statuses += r.purged_statuses;
            if !more {
                return Ok(total);
            }
        }
    }

    /// Finishes every write already sent, stops the writer thread and, if this was the last
    /// handle, closes the database file. Writes sent through other clones afterwards fail with
    /// [`QueueError::Closed`].
    pub async fn close(self) {
        if let Some(tx) = self.inner.tx.as_ref() {
            let (rtx, rrx) = oneshot::channel();
            if tx.send(Command::Shutdown { reply: rtx }).await.is_ok() {
                let _ = rrx.await;
            }
        }
        // Dropping the last handle joins the (now finished) writer thread and closes the file.
        drop(self);
    }
}

/// Creates the tables if absent and counts the stored items (for the depth gauge).
fn init_tables(db: &Database) -> Result<i64, Fail> {
    let txn = db.begin_write()?;
    let count = {
        let t = Tables::open(&txn)?;
        t.items.len()?
    };
    txn.commit()?;
    Ok(i64::try_from(count).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000_000;

    fn at(ms: u64) -> SystemTime {
        from_ms(ms)
    }

    fn stanza(rcpt: &str, n: u64) -> Bytes {
        Bytes::from(format!(
            "<message to='{rcpt}' id='m{n}'><push xmlns='urn:x'>{n}</push></message>"
        ))
    }

    fn item(id: &str, rcpt: &str, n: u64) -> NewItem {
        NewItem {
            push_id: id.to_owned(),
            recipient: rcpt.to_owned(),
            stanza: stanza(rcpt, n),
            created: at(T0),
            expires_at: at(T0 + 3_600_000),
        }
    }

    fn open(dir: &tempfile::TempDir, cfg: QueueConfig) -> PushQueue {
        PushQueue::open(&dir.path().join(FILE_NAME), cfg).expect("open queue")
    }

    fn ids(items: &[QueuedItem]) -> Vec<&str> {
        items.iter().map(|i| i.push_id.as_str()).collect()
    }

    fn state(q: &PushQueue, id: &str, rcpt: &str) -> Option<PushState> {
        q.status(id)
            .expect("status")?
            .results
            .into_iter()
            .find(|r| r.recipient == rcpt)
            .map(|r| r.state)
    }

    #[tokio::test]
    async fn fifo_per_endpoint_across_interleaved_endpoints() {
        let dir = tempfile::tempdir().unwrap();
        let q = open(&dir, QueueConfig::default());
        q.enqueue(vec![item("a1", "a@x", 1)]).await.unwrap();
        q.enqueue(vec![item("b1", "b@x", 1)]).await.unwrap();
        q.enqueue(vec![
            item("a2", "a@x", 2),
            item("b2", "b@x", 2),
            item("a3", "a@x", 3),
        ])
        .await
        .unwrap();
        let now = at(T0);
        let a = q.peek("a@x", now, 100).unwrap();
        assert_eq!(ids(&a), ["a1", "a2", "a3"]);
        assert_eq!(a[2].stanza, stanza("a@x", 3));
        assert_eq!(a[2].created, at(T0));
        assert_eq!(a[2].expires_at, at(T0 + 3_600_000));
        assert_eq!(ids(&q.peek("b@x", now, 100).unwrap()), ["b1", "b2"]);
        assert_eq!(ids(&q.peek("a@x", now, 2).unwrap()), ["a1", "a2"]);
        assert!(q.peek("c@x", now, 100).unwrap().is_empty());
        assert!(q.peek("a@x", now, 0).unwrap().is_empty());
        assert_eq!(q.depth("a@x").unwrap(), 3);
        assert_eq!(q.depth("c@x").unwrap(), 0);
        assert_eq!(q.total_depth(), 5);
        assert_eq!(state(&q, "a2", "a@x"), Some(PushState::Queued));
    }

    #[tokio::test]
    async fn cap_answers_full_and_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = QueueConfig {
            max_per_endpoint: 2,
            ..QueueConfig::default()
        };
        let q = open(&dir, cfg);
        let out = q
            .enqueue(vec![
                item("p1", "a@x", 1),
                item("p2", "a@x", 2),
                item("p3", "a@x", 3),
                item("p4", "b@x", 4),
            ])
            .await
            .unwrap();
        assert!(matches!(out[0], EnqueueOutcome::Queued(_)));
        assert!(matches!(out[1], EnqueueOutcome::Queued(_)));
        assert_eq!(out[2], EnqueueOutcome::Full);
        assert!(matches!(out[3], EnqueueOutcome::Queued(_)));
        assert_eq!(q.depth("a@x").unwrap(), 2);
        assert_eq!(q.status("p3").unwrap(), None);
        // Room again after a removal; the refused id can be retried.
        let first = q.peek("a@x", at(T0), 1).unwrap();
        assert_eq!(q.remove(vec![first[0].key.clone()]).await.unwrap(), 1);
        let out = q.enqueue(vec![item("p3", "a@x", 3)]).await.unwrap();
        assert!(matches!(out[0], EnqueueOutcome::Queued(_)));
        assert_eq!(ids(&q.peek("a@x", at(T0), 10).unwrap()), ["p2", "p3"]);
    }

    #[tokio::test]
    async fn duplicate_push_id_is_stored_once() {
        let dir = tempfile::tempdir().unwrap();
        let q = open(&dir, QueueConfig::default());
        let out = q
            .enqueue(vec![item("p1", "a@x", 1), item("p1", "a@x", 1)])
            .await
            .unwrap();
        assert!(matches!(out[0], EnqueueOutcome::Queued(_)));
        assert_eq!(out[1], EnqueueOutcome::Duplicate(PushState::Queued));
        let out = q.enqueue(vec![item("p1", "a@x", 1)]).await.unwrap();
        assert_eq!(out[0], EnqueueOutcome::Duplicate(PushState::Queued));
        // Same id, other recipient: a different (push, recipient) pair.
        let out = q.enqueue(vec![item("p1", "b@x", 1)]).await.unwrap();
        assert!(matches!(out[0], EnqueueOutcome::Queued(_)));
        assert_eq!(q.depth("a@x").unwrap(), 1);
        // After delivery the duplicate answer reports the current state.
        let key = q.peek("a@x", at(T0), 1).unwrap().remove(0).key;
        q.remove_and_mark(vec![key], PushState::Acked, at(T0 + 1))
            .await
            .unwrap();
        let out = q.enqueue(vec![item("p1", "a@x", 1)]).await.unwrap();
        assert_eq!(out[0], EnqueueOutcome::Duplicate(PushState::Acked));
        assert_eq!(q.depth("a@x").unwrap(), 0);
    }

    #[tokio::test]
    async fn ttl_hides_then_purges_and_marks_expired() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = QueueConfig {
            status_retention: Duration::from_secs(60),
            ..QueueConfig::default()
        };
        let q = open(&dir, cfg);
        let mut short = item("short", "a@x", 1);
        short.expires_at = at(T0 + 1000);
        q.enqueue(vec![short, item("long", "a@x", 2)])
            .await
            .unwrap();
        assert_eq!(
            ids(&q.peek("a@x", at(T0 + 999), 10).unwrap()),
            ["short", "long"]
        );
        // At and after expires_at the item is never returned, even before a purge.
        assert_eq!(ids(&q.peek("a@x", at(T0 + 1000), 10).unwrap()), ["long"]);
        assert_eq!(q.depth("a@x").unwrap(), 2);
        let r = q.purge_expired(at(T0 + 5000)).await.unwrap();
        assert_eq!(r.expired_items, 1);
        assert_eq!(r.purged_statuses, 0);
        assert_eq!(q.depth("a@x").unwrap(), 1);
        assert_eq!(q.total_depth(), 1);
        assert_eq!(state(&q, "short", "a@x"), Some(PushState::Expired));
        assert_eq!(state(&q, "long", "a@x"), Some(PushState::Queued));
        // A second purge finds nothing.
        assert_eq!(
            q.purge_expired(at(T0 + 5000)).await.unwrap(),
            PurgeReport::default()
        );
        // Status records go after their retention (counted from the later of update and expiry).
        let r = q.purge_expired(at(T0 + 5000 + 61_000)).await.unwrap();
        assert_eq!(r.purged_statuses, 1);
        assert_eq!(q.status("short").unwrap(), None);
        assert_eq!(state(&q, "long", "a@x"), Some(PushState::Queued));
        // The long one expires later, is purged, then its status too.
        let r = q.purge_expired(at(T0 + 3_600_000)).await.unwrap();
        assert_eq!((r.expired_items, r.purged_statuses), (1, 0));
        let r = q.purge_expired(at(T0 + 3_600_000 + 60_000)).await.unwrap();
        assert_eq!((r.expired_items, r.purged_statuses), (0, 1));
        assert_eq!(q.status("long").unwrap(), None);
        assert_eq!(q.total_depth(), 0);
    }

    #[tokio::test]
    async fn remove_deletes_only_the_given_items() {
        let dir = tempfile::tempdir().unwrap();
        let q = open(&dir, QueueConfig::default());
        let batch = (1..=4).map(|n| item(&format!("p{n}"), "a@x", n)).collect();
        q.enqueue(batch).await.unwrap();
        let peeked = q.peek("a@x", at(T0), 2).unwrap();
        let keys: Vec<ItemKey> = peeked.iter().map(|i| i.key.clone()).collect();
        assert_eq!(q.remove(keys.clone()).await.unwrap(), 2);
        assert_eq!(q.remove(keys).await.unwrap(), 0, "already removed");
        let missing = ItemKey {
            recipient: "nobody@x".into(),
            seq: 7,
        };
        assert_eq!(q.remove(vec![missing]).await.unwrap(), 0);
        assert_eq!(ids(&q.peek("a@x", at(T0), 10).unwrap()), ["p3", "p4"]);
        assert_eq!(q.depth("a@x").unwrap(), 2);
        // remove does not change the status; remove_and_mark does.
        assert_eq!(state(&q, "p1", "a@x"), Some(PushState::Queued));
        let key = q.peek("a@x", at(T0), 1).unwrap().remove(0).key;
        q.remove_and_mark(vec![key], PushState::Delivered, at(T0 + 5))
            .await
            .unwrap();
        assert_eq!(state(&q, "p3", "a@x"), Some(PushState::Delivered));
        assert_eq!(ids(&q.peek("a@x", at(T0), 10).unwrap()), ["p4"]);
    }

    #[tokio::test]
    async fn status_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let q = open(&dir, QueueConfig::default());
        assert_eq!(q.status("nope").unwrap(), None);
        q.set_status(vec![
            StatusUpdate {
                push_id: "s1".into(),
                recipient: "b@x".into(),
                state: PushState::Delivered,
                error: None,
                at: at(T0 + 10),
            },
            StatusUpdate {
                push_id: "s1".into(),
                recipient: "a@x".into(),
                state: PushState::Error,
                error: Some("unknown domain".into()),
                at: at(T0 + 20),
            },
            // Another id sharing a prefix must not leak into s1's answer.
            StatusUpdate {
                push_id: "s10".into(),
                recipient: "a@x".into(),
                state: PushState::Dropped,
                error: None,
                at: at(T0),
            },
        ])
        .await
        .unwrap();
        let st = q.status("s1").unwrap().expect("known");
        assert_eq!(st.push_id, "s1");
        assert_eq!(
            st.results,
            vec![
                RecipientStatus {
                    recipient: "a@x".into(),
                    state: PushState::Error,
                    error: Some("unknown domain".into()),
                    updated: at(T0 + 20),
                },
                RecipientStatus {
                    recipient: "b@x".into(),
                    state: PushState::Delivered,
                    error: None,
                    updated: at(T0 + 10),
                },
            ]
        );
        q.set_status(vec![StatusUpdate {
            push_id: "s1".into(),
            recipient: "b@x".into(),
            state: PushState::Acked,
            error: None,
            at: at(T0 + 30),
        }])
        .await
        .unwrap();
        assert_eq!(state(&q, "s1", "b@x"), Some(PushState::Acked));
        assert_eq!(q.status("s10").unwrap().expect("known").results.len(), 1);
        assert_eq!(PushState::Acked.to_string(), "acked");
        assert_eq!(
            serde_json::to_string(&PushState::Expired).unwrap(),
            "\"expired\""
        );
    }

    #[tokio::test]
    async fn unacknowledged_items_keep_their_place() {
        let dir = tempfile::tempdir().unwrap();
        let q = open(&dir, QueueConfig::default());
        q.enqueue(vec![item("p1", "a@x", 1), item("p2", "a@x", 2)])
            .await
            .unwrap();
        // Written to a session that died before acking: not removed.
        assert_eq!(ids(&q.peek("a@x", at(T0), 10).unwrap()), ["p1", "p2"]);
        q.enqueue(vec![item("p3", "a@x", 3)]).await.unwrap();
        assert_eq!(ids(&q.peek("a@x", at(T0), 10).unwrap()), ["p1", "p2", "p3"]);
    }

    #[tokio::test]
    async fn requeue_front_goes_before_newer_items() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = QueueConfig {
            max_per_endpoint: 3,
            ..QueueConfig::default()
        };
        let q = open(&dir, cfg);
        // Sent live (never queued), then the session expired unacked; meanwhile q1 and q2 queued.
        q.set_status(vec![StatusUpdate {
            push_id: "live1".into(),
            recipient: "a@x".into(),
            state: PushState::Delivered,
            error: None,
            at: at(T0),
        }])
        .await
        .unwrap();
        q.enqueue(vec![item("q1", "a@x", 3), item("q2", "a@x", 4)])
            .await
            .unwrap();
        let mut gone = item("gone", "a@x", 9);
        gone.expires_at = at(T0 + 10);
        let out = q
            .requeue_front(
                vec![item("live1", "a@x", 1), gone, item("live2", "a@x", 2)],
                at(T0 + 100),
            )
            .await
            .unwrap();
        assert!(matches!(out[0], RequeueOutcome::Queued(_)));
        assert_eq!(out[1], RequeueOutcome::Expired);
        assert!(matches!(out[2], RequeueOutcome::Queued(_)));
        // Cap does not apply to put-back items.
        assert_eq!(q.depth("a@x").unwrap(), 4);
        assert_eq!(
            ids(&q.peek("a@x", at(T0 + 100), 10).unwrap()),
            ["live1", "live2", "q1", "q2"]
        );
        assert_eq!(state(&q, "live1", "a@x"), Some(PushState::Queued));
        assert_eq!(state(&q, "gone", "a@x"), Some(PushState::Expired));
        // Requeueing an item that is still queued moves it instead of duplicating it.
        q.requeue_front(vec![item("q2", "a@x", 4)], at(T0 + 100))
            .await
            .unwrap();
        assert_eq!(
            ids(&q.peek("a@x", at(T0 + 100), 10).unwrap()),
            ["q2", "live1", "live2", "q1"]
        );
        assert_eq!(q.depth("a@x").unwrap(), 4);
        // Appends still go to the tail; enqueue of a requeued id is a duplicate.
        let out = q
            .enqueue(vec![item("live2", "a@x", 2), item("new", "b@x", 5)])
            .await
            .unwrap();
        assert_eq!(out[0], EnqueueOutcome::Duplicate(PushState::Queued));
        // Draining everything and requeueing into an empty queue works too.
        let keys = q
            .peek("a@x", at(T0 + 100), 10)
            .unwrap()
            .into_iter()
            .map(|i| i.key)
            .collect();
        assert_eq!(q.remove(keys).await.unwrap(), 4);
        q.requeue_front(vec![item("r1", "a@x", 1), item("r2", "a@x", 2)], at(T0))
            .await
            .unwrap();
        q.enqueue(vec![item("r3", "a@x", 3)]).await.unwrap();
        assert_eq!(ids(&q.peek("a@x", at(T0), 10).unwrap()), ["r1", "r2", "r3"]);
    }

    #[tokio::test]
    async fn reopen_after_drop_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        {
            let q = PushQueue::open(&path, QueueConfig::default()).unwrap();
            let batch = (0..50)
                .map(|n| item(&format!("p{n}"), if n % 2 == 0 { "a@x" } else { "b@x" }, n))
                .collect();
            q.enqueue(batch).await.unwrap();
            q.set_status(vec![StatusUpdate {
                push_id: "other".into(),
                recipient: "c@x".into(),
                state: PushState::Delivered,
                error: None,
                at: at(T0),
            }])
            .await
            .unwrap();
            let clone = q.clone();
            drop(q);
            drop(clone);
        }
        let q = PushQueue::open(&path, QueueConfig::default()).unwrap();
        assert_eq!(q.total_depth(), 50);
        let a = q.peek("a@x", at(T0), 100).unwrap();
        assert_eq!(a.len(), 25);
        for (i, it) in a.iter().enumerate() {
            let n = 2 * i as u64;
            assert_eq!(it.push_id, format!("p{n}"));
            assert_eq!(it.stanza, stanza("a@x", n));
        }
        assert_eq!(state(&q, "other", "c@x"), Some(PushState::Delivered));
        // Sequences continue after reopen.
        q.enqueue(vec![item("late", "a@x", 99)]).await.unwrap();
        let a = q.peek("a@x", at(T0), 100).unwrap();
        assert_eq!(a.last().map(|i| i.push_id.as_str()), Some("late"));
        q.close().await;
        let q = PushQueue::open(&path, QueueConfig::default()).unwrap();
        assert_eq!(q.depth("a@x").unwrap(), 26);
    }

    #[tokio::test]
    async fn second_open_reports_lock_and_close_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let q = PushQueue::open(&path, QueueConfig::default()).unwrap();
        let err = PushQueue::open(&path, QueueConfig::default()).unwrap_err();
        assert!(matches!(err, QueueError::Locked { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("another tern process holds"), "{msg}");
        assert!(msg.contains(FILE_NAME), "{msg}");
        let other = q.clone();
        q.close().await;
        let err = other.enqueue(vec![item("p", "a@x", 1)]).await.unwrap_err();
        assert!(matches!(err, QueueError::Closed { .. }), "{err:?}");
        // Reads still work on a closed handle that is alive.
        assert!(other.peek("a@x", at(T0), 1).unwrap().is_empty());
    }

    #[test]
    fn garbage_file_gives_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        std::fs::write(&path, vec![0x5a; 20_000]).unwrap();
        let err = PushQueue::open(&path, QueueConfig::default()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(FILE_NAME), "{msg}");
    }

    #[test]
    fn corrupt_record_is_reported() {
        assert!(matches!(ItemRec::decode(&[1, 2, 3]), Err(Fail::Corrupt(_))));
        assert!(matches!(ItemRec::decode(&[9]), Err(Fail::Corrupt(_))));
        assert!(matches!(StatusRec::decode(&[]), Err(Fail::Corrupt(_))));
        let rec = StatusRec::new(PushState::Error, 5, 7, Some(-3), Some("boom".into()), 10);
        let back = StatusRec::decode(&rec.encode().unwrap()).unwrap();
        assert_eq!(
            (
                back.state,
                back.updated_ms,
                back.expires_ms,
                back.purge_at_ms,
                back.seq
            ),
            (PushState::Error, 5, 7, 17, Some(-3))
        );
        assert_eq!(back.error.as_deref(), Some("boom"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn group_commit_uses_few_transactions() {
        let dir = tempfile::tempdir().unwrap();
        let q = open(&dir, QueueConfig::default());
        let before = q.commit_count();
        let mut tasks = Vec::new();
        for n in 0..1000u64 {
            let q = q.clone();
            tasks.push(tokio::spawn(async move {
                let rcpt = format!("user{}@x", n % 10);
                q.enqueue(vec![item(&format!("g{n}"), &rcpt, n)]).await
            }));
        }
        for t in tasks {
            let out = t.await.unwrap().unwrap();
            assert!(matches!(out[0], EnqueueOutcome::Queued(_)));
        }
        let commits = q.commit_count() - before;
        assert!(commits < 100, "1000 enqueues took {commits} commits");
        assert_eq!(q.total_depth(), 1000);
        assert_eq!(q.depth("user3@x").unwrap(), 100);
        // Per endpoint, the order of the stored items is the order of the sequence numbers.
        let items = q.peek("user3@x", at(T0), 1000).unwrap();
        assert!(items.windows(2).all(|w| w[0].key.seq < w[1].key.seq));
    }

    const CRASH_ENV: &str = "TERN_QUEUE_CRASH_CHILD";
    const CRASH_ENDPOINTS: u64 = 4;

    /// Helper mode for `kill_9_keeps_every_committed_item`: does nothing in a normal test run.
    /// With the env var set (by the parent re-executing this test binary) it enqueues until killed,
    /// printing a line after each enqueue answered `Queued`.
    #[test]
    fn crash_child_helper() {
        let Some(path) = std::env::var_os(CRASH_ENV) else {
            return;
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let cfg = QueueConfig {
                max_per_endpoint: 1_000_000,
                ..QueueConfig::default()
            };
            let q = PushQueue::open(Path::new(&path), cfg).unwrap();
            let mut tasks = Vec::new();
            for ep in 0..CRASH_ENDPOINTS {
                let q = q.clone();
                tasks.push(tokio::spawn(async move {
                    use std::io::Write as _;
                    let rcpt = format!("ep{ep}@x");
                    for n in 0..1_000_000u64 {
                        let out = q
                            .enqueue(vec![item(&format!("c{ep}-{n}"), &rcpt, n)])
                            .await
                            .unwrap();
                        assert!(matches!(out[0], EnqueueOutcome::Queued(_)));
                        let mut so = std::io::stdout().lock();
                        let _ = writeln!(so, "committed {ep} {n}");
                        let _ = so.flush();
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        });
    }

    #[test]
    fn kill_9_keeps_every_committed_item() {
        use std::io::BufRead as _;
        use std::process::{Command as Proc, Stdio};

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let mut child = Proc::new(std::env::current_exe().unwrap())
            .args([
                "store::queue::tests::crash_child_helper",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CRASH_ENV, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut committed = vec![None::<u64>; CRASH_ENDPOINTS as usize];
        let mut total = 0u64;
        let mut killed = false;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // libtest prints "test NAME ... " without a newline before the child's first line.
            let Some(pos) = line.find("committed ") else {
                continue;
            };
            let mut parts = line[pos..].split_whitespace().skip(1);
            let ep: usize = parts.next().unwrap().parse().unwrap();
            let n: u64 = parts.next().unwrap().parse().unwrap();
            // Per endpoint the child enqueues sequentially, so commits come in order.
            assert_eq!(committed[ep].map_or(0, |c| c + 1), n);
            committed[ep] = Some(n);
            total += 1;
            if total == 600 && !killed {
                child.kill().unwrap(); // SIGKILL: no destructor, no flush, no close
                killed = true;
            }
        }
        let status = child.wait().unwrap();
        assert!(
            killed && !status.success(),
            "child ended on its own: {status:?}"
        );

        let q = PushQueue::open(&path, QueueConfig::default()).expect("reopen after kill -9");
        for (ep, last) in committed.iter().enumerate() {
            let rcpt = format!("ep{ep}@x");
            let items = q.peek(&rcpt, at(T0), usize::MAX).unwrap();
            let want = last.map_or(0, |l| l + 1) as usize;
            // Everything reported committed is there; a few more may have committed between the
            // last printed line and the kill, but never a gap or a reordering.
            assert!(items.len() >= want, "ep{ep}: {} < {want}", items.len());
            for (n, it) in items.iter().enumerate() {
                assert_eq!(it.push_id, format!("c{ep}-{n}"));
                assert_eq!(it.stanza, stanza(&rcpt, n as u64));
                assert_eq!(it.expires_at, at(T0 + 3_600_000));
            }
            assert_eq!(q.depth(&rcpt).unwrap(), items.len());
            if want > 0 {
                let id = format!("c{ep}-{}", want - 1);
                assert_eq!(state(&q, &id, &rcpt), Some(PushState::Queued));
            }
        }
        // The reopened file is writable.
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let out = rt
            .block_on(q.enqueue(vec![item("after", "ep0@x", 0)]))
            .unwrap();
        assert!(matches!(out[0], EnqueueOutcome::Queued(_)));
    }
}

//! Online/offline webhooks: the management server learns when an endpoint's first resource comes
//! online and its last goes offline, as batched, retried, HMAC-signed JSON POSTs (`[webhooks]`).
//!
//! ```text
//! Router ──try_send──▶ bounded channel ──▶ dispatcher (batches) ──▶ one queue + task per URL ──▶ POST
//! ```
//!
//! * The router calls [`SessionEvents`] synchronously, so the sink only does a `try_send`; when
//!   `max_pending` events wait, new ones are dropped and counted rather than blocking a login.
//! * The dispatcher forms each batch once (`batch_max` events, or the oldest waited `batch_delay_ms`)
//!   and hands the same batch to every URL's task. One task per URL, because a URL that is down retries
//!   for up to a minute per batch and must not hold back the others; within a URL batches go strictly
//!   one after the other, so a receiver sees events in order.
//! * `pending` counts events accepted and not yet delivered to (or given up by) every URL; it bounds the
//!   channel and the per-URL queues together, so their memory stays bounded by `max_pending`.
//! * The body is `{"events":[...],"sent_at":"...","batch_id":"..."}`. `batch_id` stays the same across
//!   retries and URLs so receivers can de-duplicate; `sent_at` is the time of each attempt and is covered
//!   by the signature, so a receiver can refuse replayed old requests.
//! * On shutdown the dispatcher keeps collecting briefly (sessions closing report offline events), then
//!   every URL gets one last attempt per remaining batch, all within 3 s of the cancel.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper::Uri;
use hyper::header::{CONTENT_TYPE, HeaderMap, RETRY_AFTER, USER_AGENT};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use jid::FullJid;
use serde::Serialize;
use sha2::Sha256;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::config::WebhooksConfig;
use crate::xmpp::router::SessionEvents;

/// Delay before the first retry; doubled for each further one.
const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// Longest delay between two attempts (also the most a `Retry-After` can ask for).
const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// After a cancel, stop collecting events once none arrived for this long ...
const DRAIN_QUIET: Duration = Duration::from_millis(250);
/// ... or this long after the cancel at the latest.
const DRAIN_MAX: Duration = Duration::from_secs(1);
/// Everything still pending is given up this long after the cancel (the server waits 5 s for tasks).
const FLUSH_TIMEOUT: Duration = Duration::from_secs(3);
/// At most one "events dropped" warning per this interval (the counter has the exact number).
const DROP_LOG_INTERVAL_SECS: u64 = 10;
/// Most bytes of a receiver's answer read (and ignored), so the connection can be reused.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Why webhooks could not be started.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhooks.urls: `{url}` is not a valid URL: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("webhooks: TLS client configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// HTTP/1.1 over TCP or rustls, with a connection pool per host.
type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Start the delivery task when `config.urls` is not empty; the returned sink goes to
/// [`crate::xmpp::router::Router::set_events`]. The task stops on `cancel` (after a last attempt to
/// send what is pending) and is tracked by `tracker`.
///
/// A configuration that cannot work (an unparsable URL) is logged as an error and disables webhooks:
/// the XMPP service itself stays up.
pub fn start(
    config: &WebhooksConfig,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> Option<Arc<dyn SessionEvents>> {
    if config.urls.is_empty() {
        return None;
    }
    match spawn(config, cancel, tracker) {
        Ok(sink) => Some(sink),
        Err(e) => {
            tracing::error!("webhooks disabled: {e}");
            None
        }
    }
}

fn spawn(
    config: &WebhooksConfig,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> Result<Arc<dyn SessionEvents>, WebhookError> {
    let urls = config
        .urls
        .iter()
        .map(|u| parse_url(u))
        .collect::<Result<Vec<_>, _>>()?;
    let timeout = Duration::from_secs(config.timeout_secs.max(1));
    let client = http_client(system_roots(&urls), timeout)?;
    let mac = config.secret.as_deref().map(|s| {
        <Hmac<Sha256> as Mac>::new_from_slice(s.as_bytes()).expect("HMAC accepts any key length")
    });
    tracing::info!(
        urls = ?urls.iter().map(redact).collect::<Vec<_>>(),
        signed = mac.is_some(),
        "webhooks enabled"
    );

    let shared = Arc::new(Shared::new(config.max_pending.max(1)));
    let ctx = Arc::new(Ctx {
        client,
        mac,
        timeout,
        max_attempts: config.max_attempts.max(1),
        cancel,
        flush_deadline: OnceLock::new(),
        shared: shared.clone(),
    });
    let mut queues = Vec::with_capacity(urls.len());
    for url in urls {
        let (tx, rx) = mpsc::unbounded_channel();
        queues.push(tx);
        let target = Target {
            shown: redact(&url),
            url,
        };
        tracker.spawn(run_url(ctx.clone(), target, rx));
    }
    let (tx, rx) = mpsc::channel(shared.max_pending);
    let batcher = Batcher::new(
        config.batch_max.max(1),
        Duration::from_millis(config.batch_delay_ms),
    );
    tracker.spawn(dispatch(ctx, rx, batcher, queues));
    Ok(Arc::new(Sink { tx, shared }))
}

/// Whether `url` can be a webhook URL (for configuration checks).
pub fn check_url(url: &str) -> Result<(), WebhookError> {
    parse_url(url).map(|_| ())
}

/// A webhook URL: http or https, with a host.
fn parse_url(url: &str) -> Result<Uri, WebhookError> {
    let invalid = |reason: String| WebhookError::InvalidUrl {
        url: url
            .parse::<Uri>()
            .map_or_else(|_| "<unparsable>".into(), |u| redact(&u)),
        reason,
    };
    let uri: Uri = url
        .parse()
        .map_err(|e: hyper::http::uri::InvalidUri| invalid(e.to_string()))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(invalid("the scheme must be http or https".into()));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(invalid("it names no host".into()));
    }
    Ok(uri)
}

/// The system's trusted roots (`SSL_CERT_FILE`/`SSL_CERT_DIR` are honoured, for an internal CA);
/// read only when an https URL needs them.
fn system_roots(urls: &[Uri]) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    if urls.iter().any(|u| u.scheme_str() == Some("https")) {
        let found = rustls_native_certs::load_native_certs();
        let (added, _unparsable) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            tracing::warn!(
                "webhooks: no trusted root certificates found in the system store (install \
                 ca-certificates or set SSL_CERT_FILE); https:// webhooks will fail"
            );
        }
    }
    roots
}

/// An HTTP/1.1 client on the project's rustls provider (aws-lc-rs). Redirects are not followed: a
/// webhook URL that moved is a configuration error, reported by the retries failing.
fn http_client(
    roots: rustls::RootCertStore,
    timeout: Duration,
) -> Result<HttpClient, WebhookError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_connect_timeout(Some(timeout));
    tcp.set_nodelay(true);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(tcp);
    Ok(Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector))
}

/// A URL as it may appear in logs: without user info and query (they may hold credentials).
fn redact(uri: &Uri) -> String {
    let port = uri.port_u16().map(|p| format!(":{p}")).unwrap_or_default();
    format!(
        "{}://{}{port}{}",
        uri.scheme_str().unwrap_or(""),
        uri.host().unwrap_or(""),
        uri.path()
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EventKind {
    Online,
    Offline,
}

impl EventKind {
    fn as_str(self) -> &'static str {
        match self {
            EventKind::Online => "online",
            EventKind::Offline => "offline",
        }
    }
}

/// One account coming online or going offline, as reported by the router.
#[derive(Debug, Clone, PartialEq)]
struct Event {
    kind: EventKind,
    jid: String,
    resource: String,
    remote_addr: SocketAddr,
    at: SystemTime,
}

/// The JSON form of an [`Event`].
#[derive(Serialize)]
struct EventJson<'a> {
    event: &'static str,
    jid: &'a str,
    resource: &'a str,
    remote_addr: String,
    at: String,
}

/// The `events` array of a batch, serialized once and reused by every attempt and URL.
fn encode_events(events: &[Event]) -> String {
    let list: Vec<EventJson<'_>> = events
        .iter()
        .map(|e| EventJson {
            event: e.kind.as_str(),
            jid: &e.jid,
            resource: &e.resource,
            remote_addr: e.remote_addr.to_string(),
            at: rfc3339_millis(e.at),
        })
        .collect();
    serde_json::to_string(&list).unwrap_or_else(|_| "[]".to_string())
}

/// The request body of one attempt. `events_json` is a JSON array; the other parts need no escaping
/// (a UUID and a timestamp).
fn encode_body(events_json: &str, batch_id: &Uuid, sent_at: SystemTime) -> Vec<u8> {
    format!(
        "{{\"events\":{events_json},\"sent_at\":\"{}\",\"batch_id\":\"{batch_id}\"}}",
        rfc3339_millis(sent_at)
    )
    .into_bytes()
}

/// `sha256=<lowercase hex HMAC-SHA256(secret, body)>`, the `X-Tern-Signature` value.
fn signature(mac: &Hmac<Sha256>, body: &[u8]) -> String {
    let mut mac = mac.clone();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// RFC 3339 UTC with milliseconds, e.g. `2024-05-01T12:34:56.789Z`.
fn rfc3339_millis(t: SystemTime) -> String {
    let secs = super::rfc3339(t);
    let millis = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_millis())
        .unwrap_or(0);
    let whole = secs.strip_suffix('Z').unwrap_or(&secs);
    format!("{whole}.{millis:03}Z")
}

/// Delay after the `failures`-th failed attempt: 0.5 s doubling, capped at 30 s, of which the upper
/// half is random (`jitter` in [0, 1)) so that URLs recovering together are not hit in lockstep. A
/// receiver's `Retry-After` lengthens it (up to the cap).
fn backoff(failures: u32, jitter: f64, retry_after: Option<Duration>) -> Duration {
    let exp = BACKOFF_BASE
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(BACKOFF_CAP);
    let delay = exp / 2 + (exp / 2).mul_f64(jitter.clamp(0.0, 1.0));
    match retry_after {
        Some(r) => delay.max(r.min(BACKOFF_CAP)),
        None => delay,
    }
}

/// `Retry-After` in seconds (the HTTP-date form is ignored: the back-off applies then).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// Forms batches: sans-IO, driven by the dispatcher with the current time.
#[derive(Debug)]
struct Batcher {
    events: Vec<Event>,
    /// When the oldest waiting event arrived.
    oldest: Option<Instant>,
    max: usize,
    delay: Duration,
}

impl Batcher {
    fn new(max: usize, delay: Duration) -> Self {
        Self {
            events: Vec::new(),
            oldest: None,
            max: max.max(1),
            delay,
        }
    }

    /// Add an event; returns a full batch once `max` events wait.
    fn push(&mut self, event: Event, now: Instant) -> Option<Vec<Event>> {
        if self.events.is_empty() {
            self.oldest = Some(now);
        }
        self.events.push(event);
        if self.events.len() >= self.max {
            return self.flush();
        }
        None
    }

    /// When the waiting events must be sent at the latest.
    fn deadline(&self) -> Option<Instant> {
        self.oldest.map(|t| t + self.delay)
    }

    /// The waiting events if the oldest has waited long enough.
    fn poll(&mut self, now: Instant) -> Option<Vec<Event>> {
        match self.deadline() {
            Some(d) if d <= now => self.flush(),
            _ => None,
        }
    }

    /// Whatever waits, now.
    fn flush(&mut self) -> Option<Vec<Event>> {
        self.oldest = None;
        if self.events.is_empty() {
            return None;
        }
        Some(std::mem::replace(
            &mut self.events,
            Vec::with_capacity(self.max.min(64)),
        ))
    }
}

/// The bound on waiting events, shared by the sink and the delivery tasks.
#[derive(Debug)]
struct Shared {
    max_pending: usize,
    /// Events accepted and not yet delivered to (or given up by) every URL.
    pending: AtomicUsize,
    /// Events dropped because the bound was reached or delivery had stopped, for the log line.
    dropped: AtomicU64,
    /// Unix seconds of the last "events dropped" warning.
    last_drop_log: AtomicU64,
}

impl Shared {
    fn new(max_pending: usize) -> Self {
        Self {
            max_pending,
            pending: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
            last_drop_log: AtomicU64::new(0),
        }
    }

    /// Reserve room for one event; false when `max_pending` events already wait.
    fn admit(&self) -> bool {
        if self.pending.fetch_add(1, Ordering::AcqRel) >= self.max_pending {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        metrics::gauge!("tern_webhook_pending").increment(1.0);
        true
    }

    /// `n` events are done with (delivered, given up or dropped after admission).
    fn release(&self, n: usize) {
        self.pending.fetch_sub(n, Ordering::AcqRel);
        metrics::gauge!("tern_webhook_pending").decrement(n as f64);
    }

    /// Count `n` events that will never be sent; warns at most every few seconds.
    fn dropped(&self, n: u64, why: &str) {
        metrics::counter!("tern_webhook_events_dropped_total").increment(n);
        let total = self.dropped.fetch_add(n, Ordering::Relaxed) + n;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let last = self.last_drop_log.load(Ordering::Relaxed);
        if now >= last + DROP_LOG_INTERVAL_SECS
            && self
                .last_drop_log
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                dropped_total = total,
                max_pending = self.max_pending,
                "webhook events dropped: {why}"
            );
        }
    }
}

/// What the router holds: never blocks, never allocates beyond the event itself.
#[derive(Debug)]
struct Sink {
    tx: mpsc::Sender<Event>,
    shared: Arc<Shared>,
}

impl Sink {
    fn report(&self, kind: EventKind, full: &FullJid, remote_addr: SocketAddr, at: SystemTime) {
        metrics::counter!("tern_webhook_events_total", "event" => kind.as_str()).increment(1);
        if !self.shared.admit() {
            self.shared
                .dropped(1, "webhooks.max_pending events are waiting");
            return;
        }
        let event = Event {
            kind,
            jid: full.to_bare().to_string(),
            resource: full.resource().as_str().to_string(),
            remote_addr,
            at,
        };
        if let Err(e) = self.tx.try_send(event) {
            self.shared.release(1);
            let why = match e {
                mpsc::error::TrySendError::Full(_) => "webhooks.max_pending events are waiting",
                mpsc::error::TrySendError::Closed(_) => "delivery has stopped (shutdown)",
            };
            self.shared.dropped(1, why);
        }
    }
}

impl SessionEvents for Sink {
    fn online(&self, full: &FullJid, remote_addr: SocketAddr, at: SystemTime) {
        self.report(EventKind::Online, full, remote_addr, at);
    }

    fn offline(&self, full: &FullJid, remote_addr: SocketAddr, at: SystemTime) {
        self.report(EventKind::Offline, full, remote_addr, at);
    }
}

/// A batch on its way to every URL.
#[derive(Debug)]
struct Batch {
    id: Uuid,
    events_json: String,
    len: usize,
    /// URLs that have not finished with it; the last one releases its events from `pending`.
    urls_left: AtomicUsize,
}

/// What the delivery tasks share. Not `Debug`: it holds the keyed HMAC.
struct Ctx {
    client: HttpClient,
    mac: Option<Hmac<Sha256>>,
    timeout: Duration,
    max_attempts: u32,
    cancel: CancellationToken,
    /// Set when the cancel is first noticed: the end of the final flush.
    flush_deadline: OnceLock<Instant>,
    shared: Arc<Shared>,
}

impl Ctx {
    fn flush_deadline(&self) -> Instant {
        *self
            .flush_deadline
            .get_or_init(|| Instant::now() + FLUSH_TIMEOUT)
    }

    /// One URL is done with `batch`.
    fn finish(&self, batch: &Batch) {
        if batch.urls_left.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.release(batch.len);
        }
    }
}

/// One webhook URL and its log form.
struct Target {
    url: Uri,
    shown: String,
}

/// Receives events, forms batches and hands each to every URL's queue; on cancel collects the
/// events of closing sessions for a moment, flushes, and closes the queues.
async fn dispatch(
    ctx: Arc<Ctx>,
    mut rx: mpsc::Receiver<Event>,
    mut batcher: Batcher,
    queues: Vec<mpsc::UnboundedSender<Arc<Batch>>>,
) {
    let send = |events: Vec<Event>| {
        let batch = Arc::new(Batch {
            id: Uuid::new_v4(),
            events_json: encode_events(&events),
            len: events.len(),
            urls_left: AtomicUsize::new(queues.len()),
        });
        for q in &queues {
            if q.send(batch.clone()).is_err() {
                ctx.finish(&batch);
            }
        }
    };
    loop {
        let due = batcher.deadline();
        tokio::select! {
            biased;
            _ = ctx.cancel.cancelled() => break,
            ev = rx.recv() => match ev {
                Some(ev) => {
                    let now = Instant::now();
                    // Also check the deadline here: a steady stream of events must not starve the
                    // timer branch.
                    if let Some(b) = batcher.push(ev, now).or_else(|| batcher.poll(now)) {
                        send(b);
                    }
                }
                None => break,
            },
            _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                if let Some(b) = batcher.poll(Instant::now()) {
                    send(b);
                }
            }
        }
    }
    // Sessions closing because of the shutdown report their offline events now.
    let stop = Instant::now() + DRAIN_MAX;
    ctx.flush_deadline();
    loop {
        let until = stop.min(Instant::now() + DRAIN_QUIET);
        match tokio::time::timeout_at(until, rx.recv()).await {
            Ok(Some(ev)) => {
                if let Some(b) = batcher.push(ev, Instant::now()) {
                    send(b);
                }
            }
            Ok(None) | Err(_) => break,
        }
        if Instant::now() >= stop {
            break;
        }
    }
    if let Some(b) = batcher.flush() {
        send(b);
    }
    rx.close();
    let mut late = 0;
    while rx.try_recv().is_ok() {
        late += 1;
    }
    if late > 0 {
        ctx.shared.release(late);
        ctx.shared
            .dropped(late as u64, "they arrived during shutdown");
    }
    // Dropping the queues lets each URL task finish once its last batch is done.
}

/// Delivers one URL's batches strictly in order.
async fn run_url(ctx: Arc<Ctx>, target: Target, mut rx: mpsc::UnboundedReceiver<Arc<Batch>>) {
    while let Some(batch) = rx.recv().await {
        deliver(&ctx, &target, &batch).await;
        ctx.finish(&batch);
    }
}

/// Why one POST did not succeed.
#[derive(Debug, thiserror::Error)]
enum PostError {
    #[error("HTTP status {status}")]
    Status {
        status: u16,
        retry_after: Option<Duration>,
    },
    /// The error and its causes (no URL: it may hold credentials).
    #[error("{0}")]
    Transport(String),
    #[error("no answer within {0:?} (webhooks.timeout_secs)")]
    Timeout(Duration),
    #[error("given up at shutdown")]
    Shutdown,
}

/// Try `batch` until it is accepted, `max_attempts` failed, or the shutdown flush ends.
async fn deliver(ctx: &Ctx, target: &Target, batch: &Batch) {
    let mut failures = 0u32;
    loop {
        let last_chance = ctx.cancel.is_cancelled();
        let result = if last_chance {
            let deadline = ctx.flush_deadline();
            if Instant::now() >= deadline {
                Err(PostError::Shutdown)
            } else {
                tokio::time::timeout_at(deadline, post(ctx, target, batch))
                    .await
                    .unwrap_or(Err(PostError::Shutdown))
            }
        } else {
            // An attempt under way when the cancel comes may go on until the flush deadline.
            tokio::select! {
                r = post(ctx, target, batch) => r,
                _ = async {
                    ctx.cancel.cancelled().await;
                    tokio::time::sleep_until(ctx.flush_deadline()).await;
                } => Err(PostError::Shutdown),
            }
        };
        let err = match result {
            Ok(()) => {
                metrics::counter!("tern_webhook_posts_total", "outcome" => "ok").increment(1);
                if failures > 0 {
                    tracing::info!(url = %target.shown, batch_id = %batch.id, attempts = failures + 1,
                        "webhook batch delivered after retries");
                }
                return;
            }
            Err(e) => e,
        };
        if !matches!(err, PostError::Shutdown) {
            metrics::counter!("tern_webhook_posts_total", "outcome" => "error").increment(1);
        }
        failures += 1;
        if failures >= ctx.max_attempts || last_chance {
            metrics::counter!("tern_webhook_batches_dropped_total").increment(1);
            tracing::error!(url = %target.shown, batch_id = %batch.id, events = batch.len,
                attempts = failures, "webhook batch dropped: {err}");
            return;
        }
        let ra = match &err {
            PostError::Status { retry_after, .. } => *retry_after,
            _ => None,
        };
        let delay = backoff(failures, rand::random::<f64>(), ra);
        tracing::warn!(url = %target.shown, batch_id = %batch.id, attempt = failures,
            max_attempts = ctx.max_attempts, retry_in_ms = delay.as_millis() as u64,
            "webhook POST failed: {err}");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = ctx.cancel.cancelled() => {}
        }
    }
}

/// One POST of `batch` (a fresh `sent_at` and signature each time), bounded by `timeout_secs`.
async fn post(ctx: &Ctx, target: &Target, batch: &Batch) -> Result<(), PostError> {
    let body = encode_body(&batch.events_json, &batch.id, SystemTime::now());
    let mut req = hyper::Request::post(target.url.clone())
        .header(CONTENT_TYPE, "application/json")
        .header(USER_AGENT, concat!("tern/", env!("CARGO_PKG_VERSION")))
        .header("x-tern-batch-id", batch.id.to_string());
    if let Some(mac) = &ctx.mac {
        req = req.header("x-tern-signature", signature(mac, &body));
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| PostError::Transport(e.to_string()))?;
    let exchange = async {
        let resp = ctx
            .client
            .request(req)
            .await
            .map_err(|e| PostError::Transport(error_chain(&e)))?;
        let status = resp.status();
        let retry_after = retry_after(resp.headers());
        // Read (a bounded part of) the answer so the connection goes back to the pool.
        let mut body = resp.into_body();
        let mut read = 0;
        while read < MAX_ANSWER_BYTES {
            match body.frame().await {
                Some(Ok(frame)) => read += frame.data_ref().map_or(0, |d| d.len()),
                Some(Err(_)) | None => break,
            }
        }
        Ok::<_, PostError>((status, retry_after))
    };
    let (status, retry_after) = tokio::time::timeout(ctx.timeout, exchange)
        .await
        .map_err(|_| PostError::Timeout(ctx.timeout))??;
    if status.is_success() {
        Ok(())
    } else {
        Err(PostError::Status {
            status: status.as_u16(),
            retry_after,
        })
    }
}

/// `error: cause: cause` (hyper's top-level errors alone say little, e.g. "client error (Connect)").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: EventKind, n: u32) -> Event {
        Event {
            kind,
            jid: format!("e{n}@localhost"),
            resource: "r\"1".into(),
            remote_addr: "[2001:db8::1]:5223".parse().unwrap(),
            at: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
        }
    }

    #[test]
    fn signature_is_hex_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2.
        let mac = <Hmac<Sha256> as Mac>::new_from_slice(b"Jefe").unwrap();
        assert_eq!(
            signature(&mac, b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // The keyed state is reused: a second signature is independent of the first.
        assert_eq!(
            signature(&mac, b"what do ya want for nothing?"),
            signature(&mac, b"what do ya want for nothing?")
        );
    }

    #[test]
    fn body_is_the_documented_json() {
        let id = Uuid::new_v4();
        let events = [event(EventKind::Online, 1), event(EventKind::Offline, 2)];
        let body = encode_body(
            &encode_events(&events),
            &id,
            UNIX_EPOCH + Duration::from_millis(1_700_000_001_005),
        );
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["batch_id"], id.to_string());
        assert_eq!(v["sent_at"], "2023-11-14T22:13:21.005Z");
        let e = &v["events"];
        assert_eq!(e.as_array().unwrap().len(), 2);
        assert_eq!(e[0]["event"], "online");
        assert_eq!(e[0]["jid"], "e1@localhost");
        assert_eq!(e[0]["resource"], "r\"1");
        assert_eq!(e[0]["remote_addr"], "[2001:db8::1]:5223");
        assert_eq!(e[0]["at"], "2023-11-14T22:13:20.123Z");
        assert_eq!(e[1]["event"], "offline");
        assert_eq!(e[1]["jid"], "e2@localhost");
    }

    #[test]
    fn timestamps_have_millis() {
        assert_eq!(rfc3339_millis(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339_millis(UNIX_EPOCH + Duration::from_millis(951_782_400_999)),
            "2000-02-29T00:00:00.999Z"
        );
    }

    #[test]
    fn batches_close_when_full_or_when_the_oldest_waited() {
        let delay = Duration::from_millis(200);
        let mut b = Batcher::new(3, delay);
        let t0 = Instant::now();
        assert_eq!(b.deadline(), None);
        assert_eq!(b.poll(t0 + delay * 10), None);
        assert!(b.push(event(EventKind::Online, 1), t0).is_none());
        // The deadline follows the oldest event, not the newest.
        assert!(
            b.push(event(EventKind::Online, 2), t0 + delay / 2)
                .is_none()
        );
        assert_eq!(b.deadline(), Some(t0 + delay));
        assert_eq!(b.poll(t0 + delay / 2), None);
        let full = b
            .push(event(EventKind::Offline, 1), t0 + delay / 2)
            .unwrap();
        assert_eq!(
            full.iter().map(|e| (e.kind, &*e.jid)).collect::<Vec<_>>(),
            [
                (EventKind::Online, "e1@localhost"),
                (EventKind::Online, "e2@localhost"),
                (EventKind::Offline, "e1@localhost"),
            ]
        );
        assert_eq!(b.deadline(), None);
        let t1 = t0 + delay * 2;
        assert!(b.push(event(EventKind::Online, 3), t1).is_none());
        assert_eq!(b.poll(t1 + delay - Duration::from_millis(1)), None);
        assert_eq!(b.poll(t1 + delay).unwrap().len(), 1);
        assert_eq!(b.flush(), None);
    }

    #[test]
    fn backoff_doubles_with_jitter_and_a_cap() {
        let ms = Duration::from_millis;
        assert_eq!(backoff(1, 0.0, None), ms(250));
        assert_eq!(backoff(1, 1.0, None), ms(500));
        assert_eq!(backoff(2, 1.0, None), ms(1000));
        assert_eq!(backoff(4, 0.0, None), ms(2000));
        assert_eq!(backoff(7, 1.0, None), BACKOFF_CAP);
        assert_eq!(backoff(u32::MAX, 1.0, None), BACKOFF_CAP);
        let d = backoff(3, 0.5, None);
        assert!(d >= ms(1000) && d <= ms(2000), "{d:?}");
        // Retry-After lengthens the delay, but not past the cap.
        assert_eq!(
            backoff(1, 0.0, Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
        assert_eq!(
            backoff(1, 0.0, Some(Duration::from_secs(3600))),
            BACKOFF_CAP
        );
    }

    #[test]
    fn urls_are_checked_and_logged_without_credentials() {
        let shown = |u: &str| redact(&parse_url(u).unwrap());
        assert_eq!(
            shown("https://user:pw@hooks.example.com:8443/tern?token=x"),
            "https://hooks.example.com:8443/tern"
        );
        assert_eq!(shown("http://127.0.0.1/hook"), "http://127.0.0.1/hook");
        assert_eq!(shown("http://[::1]:80/"), "http://[::1]:80/");
        for bad in ["not a url", "ftp://example.com/", "http://", "/relative"] {
            let e = parse_url(bad).unwrap_err().to_string();
            assert!(e.contains("webhooks.urls"), "{bad}: {e}");
            assert!(!e.contains("pw"), "{e}");
        }
        let e = parse_url("ftp://u:pw@example.com/?k=secret")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("pw") && !e.contains("secret"), "{e}");
    }

    /// A one-request HTTPS receiver for `localhost` with a fresh self-signed certificate: returns
    /// its port, the certificate, and the request (head, body) it will have read.
    async fn https_receiver() -> (
        u16,
        rustls::pki_types::CertificateDer<'static>,
        tokio::task::JoinHandle<std::io::Result<(String, Vec<u8>)>>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let cert_der = cert.der().clone();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert_der.clone()],
                rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
            )
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await?;
            let mut tls = acceptor.accept(tcp).await?;
            let mut data = Vec::new();
            let mut chunk = [0u8; 4096];
            let (head, body) = loop {
                let n = tls.read(&mut chunk).await?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                data.extend_from_slice(&chunk[..n]);
                let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") else {
                    continue;
                };
                let head = String::from_utf8_lossy(&data[..end]).to_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if data.len() >= end + 4 + len {
                    break (head, data[end + 4..end + 4 + len].to_vec());
                }
            };
            tls.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await?;
            tls.shutdown().await?;
            Ok((head, body))
        });
        (port, cert_der, task)
    }

    fn ctx(roots: rustls::RootCertStore) -> Ctx {
        Ctx {
            client: http_client(roots, Duration::from_secs(5)).unwrap(),
            mac: Some(<Hmac<Sha256> as Mac>::new_from_slice(b"0123456789abcdef").unwrap()),
            timeout: Duration::from_secs(5),
            max_attempts: 1,
            cancel: CancellationToken::new(),
            flush_deadline: OnceLock::new(),
            shared: Arc::new(Shared::new(10)),
        }
    }

    fn one_batch() -> Batch {
        Batch {
            id: Uuid::new_v4(),
            events_json: encode_events(&[event(EventKind::Online, 1)]),
            len: 1,
            urls_left: AtomicUsize::new(1),
        }
    }

    #[tokio::test]
    async fn posts_over_https_with_verified_certificates() {
        let (port, cert, receiver) = https_receiver().await;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let ctx = ctx(roots);
        let url = parse_url(&format!("https://localhost:{port}/hook")).unwrap();
        let target = Target {
            shown: redact(&url),
            url,
        };
        let batch = one_batch();
        post(&ctx, &target, &batch).await.unwrap();
        let (head, body) = receiver.await.unwrap().unwrap();
        assert!(head.starts_with("post /hook http/1.1"), "{head}");
        assert!(head.contains("content-type: application/json"), "{head}");
        assert!(
            head.contains(&format!("x-tern-batch-id: {}", batch.id)),
            "{head}"
        );
        let sig = signature(ctx.mac.as_ref().unwrap(), &body).to_lowercase();
        assert!(head.contains(&format!("x-tern-signature: {sig}")), "{head}");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["events"][0]["jid"], "e1@localhost");
    }

    #[tokio::test]
    async fn an_untrusted_certificate_is_refused() {
        let (port, _cert, receiver) = https_receiver().await;
        let ctx = ctx(rustls::RootCertStore::empty());
        let url = parse_url(&format!("https://localhost:{port}/hook")).unwrap();
        let target = Target {
            shown: redact(&url),
            url,
        };
        let err = post(&ctx, &target, &one_batch()).await.unwrap_err();
        assert!(
            matches!(&err, PostError::Transport(t) if t.contains("certificate")),
            "{err}"
        );
        assert!(receiver.await.unwrap().is_err());
    }

    #[tokio::test]
    async fn the_sink_never_blocks_and_drops_beyond_max_pending() {
        let shared = Arc::new(Shared::new(2));
        let (tx, mut rx) = mpsc::channel(2);
        let sink = Sink {
            tx,
            shared: shared.clone(),
        };
        let full: FullJid = "a@localhost/r".parse().unwrap();
        let addr: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        for _ in 0..5 {
            sink.online(&full, addr, SystemTime::now());
        }
        assert_eq!(shared.pending.load(Ordering::Acquire), 2);
        assert_eq!(shared.dropped.load(Ordering::Relaxed), 3);
        let got = rx.recv().await.unwrap();
        assert_eq!(
            (got.kind, &*got.jid, &*got.resource),
            (EventKind::Online, "a@localhost", "r")
        );
        // Receiving does not free room: only finished delivery does.
        sink.offline(&full, addr, SystemTime::now());
        assert_eq!(shared.dropped.load(Ordering::Relaxed), 4);
        shared.release(2);
        sink.offline(&full, addr, SystemTime::now());
        assert_eq!(shared.pending.load(Ordering::Acquire), 1);
        // Once delivery has stopped, events are dropped, not kept.
        rx.close();
        while rx.try_recv().is_ok() {}
        shared.release(1);
        sink.offline(&full, addr, SystemTime::now());
        assert_eq!(shared.pending.load(Ordering::Acquire), 0);
        assert_eq!(shared.dropped.load(Ordering::Relaxed), 5);
    }
}

//! The thin Tokio task behind each client connection: socket ↔ framer ↔ [`C2s`] ↔ router.
//!
//! All protocol decisions are the state machine's; this file only moves bytes, runs the TLS handshake,
//! sleeps until the machine's next deadline, and applies the inbound byte-rate limit.

use std::cell::RefCell;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::c2s::{Action, C2s, C2sContext};
use super::framer::{Framer, FramerLimits};
use super::router::{PushMeta, SessionHandle};
use crate::limits::TokenBucket;
use crate::store::queue::{PushQueue, PushState};

/// How a listener's connections start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// RFC 6120 §5: plaintext until STARTTLS.
    StartTls,
    /// XEP-0368: TLS from the first byte.
    DirectTls,
}

impl ListenerKind {
    pub fn name(self) -> &'static str {
        match self {
            ListenerKind::StartTls => "c2s.starttls_listen",
            ListenerKind::DirectTls => "c2s.tls_listen",
        }
    }
}

/// Per-server settings the connection layer needs (besides the protocol context).
pub struct ConnSettings {
    pub ctx: Arc<C2sContext>,
    pub tls: Arc<crate::tls::Tls>,
    pub max_stanza_bytes: usize,
    pub max_depth: usize,
    pub outbound_queue: usize,
    pub outbound_queue_bytes: usize,
    pub tls_handshake_timeout: Duration,
    /// Inbound bytes/s and burst for the token bucket; `None` = unlimited.
    pub inbound_rate: Option<(usize, usize)>,
    /// The durable offline queue, replayed when a session becomes available; `None` = no queue.
    pub queue: Option<PushQueue>,
    /// The TURN server, for direct-TLS connections that ask for ALPN `stun.turn`.
    pub turn: Option<Arc<crate::turn::server::TurnService>>,
}

impl ConnSettings {
    fn framer(&self) -> Framer {
        Framer::new(FramerLimits {
            max_stanza_bytes: self.max_stanza_bytes,
            max_depth: self.max_depth,
        })
    }
}

/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 4096;
/// Queued stanzas written per batch before the task looks at its other inputs again.
const WRITE_BATCH: usize = 64;
/// A peer that does not take our bytes for this long is dead (its queue is bounded meanwhile).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

thread_local! {
    /// One read buffer per worker thread instead of one per connection: a read completes within a
    /// single poll and its bytes are copied into the framer at once, so the buffer is never held
    /// across an `.await` (an idle session then holds no read buffer at all).
    static READ_BUF: RefCell<Box<[u8; READ_CHUNK]>> = RefCell::new(Box::new([0; READ_CHUNK]));
}

/// What ended [`Conn::run`].
enum RunEnd {
    Closed,
    /// `<proceed/>` was sent: the caller runs the TLS handshake on the same socket.
    StartTls,
}

/// Serve one accepted TCP connection until it ends.
pub async fn serve(
    mut tcp: TcpStream,
    peer: SocketAddr,
    kind: ListenerKind,
    settings: Arc<ConnSettings>,
    shutdown: CancellationToken,
) {
    let handle =
        SessionHandle::with_limits(settings.outbound_queue, settings.outbound_queue_bytes, peer);
    let now = Instant::now().into_std();
    let mut conn = Conn {
        c2s: C2s::new(
            settings.ctx.clone(),
            handle.clone(),
            peer,
            kind == ListenerKind::DirectTls,
            now,
        ),
        framer: settings.framer(),
        handle,
        bucket: settings
            .inbound_rate
            .map(|(rate, burst)| TokenBucket::new(rate, burst, now)),
        shutdown,
        peer,
        reparse: false,
        queue: settings.queue.clone(),
        replay_due: true,
    };
    // The socket lives here and `run` borrows it, so the task stores one stream, not two.
    let result = async {
        if kind == ListenerKind::StartTls {
            match conn.run(&mut tcp).await? {
                RunEnd::Closed => return Ok(()),
                RunEnd::StartTls => {
                    conn.c2s.on_tls_established();
                    // RFC 6120 §5.4.3.3: nothing sent before the handshake survives it.
                    conn.framer = settings.framer();
                }
            }
        }
        let direct = kind == ListenerKind::DirectTls;
        // Boxed, like the TURN branch below: a future's size is that of its largest await point,
        // and every idle session's task would otherwise keep room for these transient states.
        if let Some(mut tls) = Box::pin(handshake(&settings, tcp, direct, &conn.shutdown)).await {
            if direct && tls.get_ref().1.alpn_protocol() == Some(crate::tls::ALPN_STUN_TURN) {
                // RFC 7443: TURN over TLS on the XMPP port (only TCP 443 may be open).
                if let Some(turn) = settings.turn.as_ref().filter(|t| t.accepts_streams()) {
                    let client = crate::turn::engine::ClientId {
                        transport: crate::turn::engine::Transport::Tls,
                        remote: peer,
                        local: tls.get_ref().0.local_addr()?,
                    };
                    Box::pin(turn.serve_stream(tls, client, conn.shutdown.clone())).await;
                }
                return Ok(());
            }
            conn.run(&mut tls).await?;
        }
        Ok::<(), std::io::Error>(())
    }
    .await;
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an I/O error");
    }
    conn.c2s.on_disconnected();
}

async fn handshake(
    settings: &ConnSettings,
    tcp: TcpStream,
    direct: bool,
    shutdown: &CancellationToken,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let config = if direct {
        settings.tls.direct_config()
    } else {
        settings.tls.starttls_config()
    };
    let peer = tcp.peer_addr().ok();
    let accept = tokio::time::timeout(
        settings.tls_handshake_timeout,
        TlsAcceptor::from(config).accept(tcp),
    );
    let result = tokio::select! {
        r = accept => r,
        // Shutting down: a half-open handshake has no session to say goodbye to.
        _ = shutdown.cancelled() => return None,
    };
    match result {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(e)) => {
            metrics::counter!("tern_tls_handshake_failures_total").increment(1);
            tracing::debug!(?peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            metrics::counter!("tern_limit_hits_total", "limit" => "tls_handshake_timeout")
                .increment(1);
            tracing::info!(
                ?peer,
                "closing: TLS handshake not finished within limits.tls_handshake_timeout_secs"
            );
            None
        }
    }
}

struct Conn {
    c2s: C2s,
    framer: Framer,
    handle: Arc<SessionHandle>,
    bucket: Option<TokenBucket>,
    shutdown: CancellationToken,
    peer: SocketAddr,
    /// Parsing stopped early for a restart; buffered bytes remain to be parsed.
    reparse: bool,
    /// The durable offline queue.
    queue: Option<PushQueue>,
    /// The queue must be read (again) once the session is available: at first, and whenever a push
    /// was stored for it meanwhile ([`SessionHandle::request_replay`]).
    replay_due: bool,
}

impl Conn {
    /// Hand buffered events to the state machine until it needs I/O first (STARTTLS, stream restart,
    /// close) or the framer needs more bytes.
    fn pump(&mut self, now: std::time::Instant) {
        while !self.c2s.is_closed() {
            match self.framer.next() {
                Ok(Some(ev)) => self.c2s.on_event(ev, now),
                Ok(None) => return,
                Err(e) => return self.c2s.on_frame_error(&e),
            }
            if self.c2s.wants_io_first() {
                self.reparse = true;
                return;
            }
        }
    }

    /// Run the connection over `io` until it closes or STARTTLS needs the raw socket.
    async fn run<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut S,
    ) -> std::io::Result<RunEnd> {
        loop {
            // Carry out what the state machine asked for; consecutive writes go out as one.
            let mut out = Vec::new();
            while let Some(action) = self.c2s.poll_action() {
                match action {
                    Action::Write(b) => out.extend_from_slice(&b),
                    Action::Pause(d) => {
                        write_flush(io, &std::mem::take(&mut out)).await?;
                        tokio::time::sleep(d).await;
                    }
                    Action::StartTls => {
                        write_flush(io, &out).await?;
                        return Ok(RunEnd::StartTls);
                    }
                    Action::RestartStream => self.framer.reset(),
                    Action::Close => {
                        write_flush(io, &out).await?;
                        let _ = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
                        return Ok(RunEnd::Closed);
                    }
                }
            }
            write_flush(io, &out).await?;
            // Once the session is available, pushes stored while it was offline go out first, before
            // anything routed to it live (those wait in the handle, drained below).
            if self.replay_due
                && self.c2s.is_available()
                && !self.c2s.is_closed()
                && let Some(queue) = &self.queue
            {
                self.replay_due = false;
                replay(io, queue, &mut self.c2s).await?;
                continue;
            }
            // Bytes that arrived behind a stream restart are parsed only now, after the restart.
            if self.reparse {
                self.reparse = false;
                self.pump(Instant::now().into_std());
                continue;
            }
            let deadline = self.c2s.next_timeout().map(Instant::from_std);
            let read_limit = match &mut self.bucket {
                Some(b) => b.available(Instant::now().into_std()).min(READ_CHUNK),
                None => READ_CHUNK,
            };
            let refill_at = self
                .bucket
                .as_ref()
                .filter(|_| read_limit == 0)
                .map(|b| Instant::from_std(b.ready_at(READ_CHUNK.min(b.burst()))));
            let framer = &mut self.framer;
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => self.c2s.on_shutdown(),
                _ = self.handle.ready() => {
                    if let Some(why) = self.handle.kick_reason() {
                        self.c2s.on_kick(why);
                        continue;
                    }
                    if self.handle.take_replay_request() {
                        self.replay_due = true;
                    }
                    let mut batch = Vec::new();
                    self.handle.drain(WRITE_BATCH, &mut batch);
                    if batch.is_empty() {
                        continue;
                    }
                    metrics::counter!("tern_stanzas_out_total").increment(batch.len() as u64);
                    self.c2s.on_routed(&batch, Instant::now().into_std());
                    match batch.as_slice() {
                        [(one, _)] => write_flush(io, one).await?,
                        many => {
                            let all: Vec<u8> = many.iter().flat_map(|(b, _)| b.iter().copied()).collect();
                            write_flush(io, &all).await?
                        }
                    }
                }
                r = poll_fn(|cx| read_into(io, framer, read_limit, cx)), if read_limit > 0 => {
                    let n = r?;
                    if n == 0 {
                        return Ok(RunEnd::Closed);
                    }
                    let now = Instant::now().into_std();
                    if let Some(b) = &mut self.bucket {
                        b.consume(n, now);
                    }
                    self.handle.touch(std::time::SystemTime::now());
                    self.c2s.on_bytes(n, now);
                    self.pump(now);
                }
                _ = sleep_until_opt(refill_at) => {
                    metrics::counter!("tern_limit_hits_total", "limit" => "inbound_bytes_per_sec").increment(1);
                    tracing::debug!(peer = %self.peer, "inbound rate limit: paused reading (limits.inbound_bytes_per_sec)");
                }
                _ = sleep_until_opt(deadline) => self.c2s.on_timeout(Instant::now().into_std()),
            }
        }
    }
}

/// Stored pushes written per batch during a replay.
const REPLAY_BATCH: usize = 100;

/// Write every stored push of the session's account to `io`, oldest first, removing each batch
/// (status `delivered`) only after it was written and flushed: at-least-once delivery. With stream
/// management the session keeps them until acknowledged (or puts them back in the queue).
async fn replay<S: AsyncWrite + Unpin>(
    io: &mut S,
    queue: &PushQueue,
    c2s: &mut C2s,
) -> std::io::Result<()> {
    let Some(jid) = c2s.jid() else {
        return Ok(());
    };
    let bare = &jid.to_bare().to_string();
    while !c2s.is_closed() {
        let items = match queue.peek(bare, std::time::SystemTime::now(), REPLAY_BATCH) {
            Ok(items) => items,
            Err(e) => {
                tracing::warn!(jid = bare, error = %e, "cannot read the offline queue");
                return Ok(());
            }
        };
        if items.is_empty() {
            return Ok(());
        }
        let n = items.len();
        let mut out = Vec::with_capacity(items.iter().map(|i| i.stanza.len()).sum());
        let now = Instant::now().into_std();
        for i in &items {
            out.extend_from_slice(&i.stanza);
            if c2s.sm_enabled() {
                let meta = PushMeta {
                    push_id: i.push_id.clone(),
                    created: i.created,
                    expires_at: i.expires_at,
                };
                c2s.on_written(&i.stanza, Some(Arc::new(meta)), now);
            }
        }
        write_flush(io, &out).await?;
        metrics::counter!("tern_stanzas_out_total").increment(n as u64);
        let keys = items.into_iter().map(|i| i.key).collect();
        if let Err(e) = queue
            .remove_and_mark(keys, PushState::Delivered, std::time::SystemTime::now())
            .await
        {
            tracing::warn!(jid = bare, error = %e, "cannot remove replayed pushes from the queue");
            return Ok(());
        }
        tracing::debug!(jid = bare, pushes = n, "replayed stored pushes");
    }
    Ok(())
}

/// Read at most `limit` bytes into the thread's buffer and hand them to the framer in the same poll.
fn read_into<S: AsyncRead + Unpin>(
    io: &mut S,
    framer: &mut Framer,
    limit: usize,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<usize>> {
    READ_BUF.with(|buf| {
        let mut buf = buf.borrow_mut();
        let mut rb = ReadBuf::new(&mut buf[..limit.clamp(1, READ_CHUNK)]);
        match Pin::new(io).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                framer.push(rb.filled());
                Poll::Ready(Ok(rb.filled().len()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    })
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Write and flush `b` (nothing to do when empty), giving up on a peer that stops reading.
async fn write_flush<S: AsyncWrite + Unpin>(io: &mut S, b: &[u8]) -> std::io::Result<()> {
    if b.is_empty() {
        return Ok(());
    }
    let io_op = async {
        io.write_all(b).await?;
        io.flush().await
    };
    match tokio::time::timeout(WRITE_TIMEOUT, io_op).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "peer does not read",
        )),
    }
}

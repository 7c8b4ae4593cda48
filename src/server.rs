//! Wires the parts together: certificates, account store, router, listeners; and shuts them down.
//!
//! Shutdown follows hickory-dns: one `CancellationToken` for everything, a `TaskTracker` for the
//! connection tasks. On SIGTERM/SIGINT listeners stop accepting, every session gets `system-shutdown`
//! (RFC 6120 §4.9.3.17), and the process waits (bounded) for the connections to finish writing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{AuthThrottle, Authenticator};
use crate::config::Config;
use crate::limits::IpLimiter;
use crate::store::accounts::AccountStore;
use crate::store::queue::{NewItem, PushQueue, PushState, StatusUpdate};
use crate::tls::Tls;
use crate::turn::server::TurnService;
use crate::xmpp::c2s::C2sContext;
use crate::xmpp::conn::{self, ConnSettings, ListenerKind};
use crate::xmpp::extdisco::ExtDisco;
use crate::xmpp::router::{PushFate, PushFates, PushMeta, Router};
use crate::xmpp::sm::{DetachedSession, ResumptionRegistry, SmConfig};
use tokio::sync::mpsc::UnboundedReceiver;

/// Startup failures, phrased for the operator.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("listener `{listener}` on {addr}: {reason}")]
    Bind {
        listener: &'static str,
        addr: SocketAddr,
        reason: String,
    },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Store(#[from] crate::store::accounts::StoreError),
    #[error("listener `metrics.listen` on {addr}: {reason}")]
    Metrics { addr: SocketAddr, reason: String },
    #[error("HTTP API: {0}")]
    Http(String),
    #[error("durable offline queue (`[queue]`, {{data_dir}}/queue.redb): {0}")]
    Queue(#[from] crate::store::queue::QueueError),
    /// The cause (naming the config key) follows in the error chain.
    #[error("TURN server")]
    Turn(#[from] crate::turn::server::TurnError),
}

/// How long connections get to say goodbye on shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A running server. Dropping it does not stop it; call [`Server::shutdown`] or cancel the token.
pub struct Server {
    pub router: Arc<Router>,
    pub turn: Option<Arc<TurnService>>,
    pub tls: Arc<Tls>,
    pub cancel: CancellationToken,
    pub local_addrs: Vec<(ListenerKind, SocketAddr)>,
    tracker: TaskTracker,
}

impl Server {
    /// Load certificates and accounts, bind every listener (all or nothing), start accepting.
    pub async fn start(config: &Config) -> Result<Server, ServerError> {
        raise_fd_limit();
        let metrics = metrics_handle();
        let tls = Tls::load(&config.server, &config.tls)?;
        let store = Arc::new(AccountStore::open(&config.server.data_dir)?);
        let queue = open_queue(config)?;
        let observers = config
            .c2s
            .presence_observers
            .iter()
            .filter_map(|o| jid::BareJid::new(o).ok())
            .collect();
        let router = Arc::new(
            Router::with_max_resources(config.limits.max_resources_per_account)
                .with_observers(observers),
        );
        let auth = Arc::new(Authenticator::new(
            &config.server.domain,
            &config.auth,
            store,
        ));
        let sm = SmConfig {
            resume_window: Duration::from_secs(config.sm.resume_window_secs),
            request_every: config.sm.request_every,
            request_after: Duration::from_secs(config.sm.request_after_secs),
            max_unacked_stanzas: config.sm.max_unacked_stanzas,
            max_unacked_bytes: config.sm.max_unacked_bytes,
            max_detached: config.sm.max_detached,
        };
        let resumption = Arc::new(ResumptionRegistry::new(sm));
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let turn = TurnService::start(
            &config.turn,
            &config.server.domain,
            &config.server.data_dir,
            cancel.clone(),
            &tracker,
        )?;
        let extdisco = turn.as_ref().map(|t| {
            let host = config
                .turn
                .external_address
                .or(config.turn.relay_address.filter(|ip| !ip.is_unspecified()))
                .unwrap_or(t.udp_addr.ip())
                .to_string();
            let tls_port = config
                .c2s
                .tls_listen
                .first()
                .map(|a| (config.server.domain.clone(), a.port()));
            Arc::new(ExtDisco::new(
                host,
                t.udp_addr.port(),
                t.accepts_streams(),
                tls_port,
                &config.turn.external_services,
                t.credentials.clone(),
                Duration::from_secs(config.turn.credential_ttl_secs),
            ))
        });
        let (fates, fates_rx) = tokio::sync::mpsc::unbounded_channel();
        let ctx = Arc::new(C2sContext {
            domain: config.server.domain.clone(),
            router: router.clone(),
            auth,
            throttle: Arc::new(AuthThrottle::new(&config.auth)),
            preauth_timeout: Duration::from_secs(config.limits.preauth_timeout_secs),
            preauth_max_bytes: config.limits.preauth_max_bytes,
            ping_interval: (config.c2s.ping_interval_secs > 0)
                .then(|| Duration::from_secs(config.c2s.ping_interval_secs)),
            ping_timeout: Duration::from_secs(config.c2s.ping_timeout_secs),
            sm,
            resumption: resumption.clone(),
            fates: Some(fates.clone()),
            extdisco,
        });
        let limits = &config.limits;
        let settings = Arc::new(ConnSettings {
            ctx,
            tls: tls.clone(),
            max_stanza_bytes: limits.max_stanza_bytes,
            max_depth: limits.max_depth,
            outbound_queue: config.c2s.outbound_queue,
            outbound_queue_bytes: config.c2s.outbound_queue_bytes,
            tls_handshake_timeout: Duration::from_secs(limits.tls_handshake_timeout_secs),
            inbound_rate: (limits.inbound_bytes_per_sec > 0)
                .then_some((limits.inbound_bytes_per_sec, limits.inbound_burst_bytes)),
            queue: Some(queue.clone()),
            turn: turn.clone(),
        });

        // The HTTP API (push, sessions, /rest/stream, health, metrics); bound with the other listeners.
        let http = match config.http.listen {
            None => None,
            Some(addr) => {
                let keys = if config.http.api_keys.is_empty() {
                    let (key, path) = crate::http::load_or_create_api_key(&config.server.data_dir)
                        .map_err(|e| {
                            ServerError::Http(format!(
                                "cannot create the API key in {}: {e}",
                                config.server.data_dir.display()
                            ))
                        })?;
                    tracing::info!(
                        "HTTP API key in {} (no http.api_keys configured)",
                        path.display()
                    );
                    vec![key]
                } else {
                    config.http.api_keys.clone()
                };
                let mut state = crate::http::HttpState::from_config(
                    router.clone(),
                    &config.server.domain,
                    &config.http,
                    keys,
                    crate::xmpp::framer::FramerLimits {
                        max_stanza_bytes: limits.max_stanza_bytes,
                        max_depth: limits.max_depth,
                    },
                    Some(metrics.clone()),
                )
                .map_err(ServerError::Http)?;
                state.queue = Some(queue.clone());
                state.tasks = tracker.clone();
                state.default_ttl = Duration::from_secs(config.queue.default_ttl_secs);
                state.max_ttl = Duration::from_secs(config.queue.max_ttl_secs);
                Some((bind("http.listen", addr)?, Arc::new(state)))
            }
        };
        let metrics_listener = match config.metrics.listen {
            Some(addr) => Some(bind("metrics.listen", addr)?),
            None => None,
        };

        let mut listeners = Vec::new();
        for (kind, addrs) in [
            (ListenerKind::StartTls, &config.c2s.starttls_listen),
            (ListenerKind::DirectTls, &config.c2s.tls_listen),
        ] {
            for addr in addrs {
                listeners.push((kind, bind(kind.name(), *addr)?));
            }
        }

        if let Some(events) =
            crate::http::webhook::start(&config.webhooks, cancel.clone(), &tracker)
        {
            router.set_events(events);
        }
        let ip_limiter = IpLimiter::new(limits.max_connections_per_ip);
        let mut local_addrs = Vec::new();
        for (kind, listener) in listeners {
            let addr = listener.local_addr().map_err(|e| ServerError::Bind {
                listener: kind.name(),
                addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                reason: e.to_string(),
            })?;
            local_addrs.push((kind, addr));
            tracker.spawn(accept_loop(
                listener,
                kind,
                settings.clone(),
                ip_limiter.clone(),
                cancel.clone(),
                tracker.clone(),
            ));
        }
        if let Some((listener, state)) = http {
            if let Ok(a) = listener.local_addr() {
                tracing::info!("HTTP API on http://{a} (push, sessions, /rest/stream, /metrics)");
            }
            let cancel = cancel.clone();
            tracker.spawn(async move {
                if let Err(e) = crate::http::serve(listener, state, cancel).await {
                    tracing::error!("HTTP API stopped: {e}");
                }
            });
        }
        if let Some(listener) = metrics_listener {
            if let Ok(a) = listener.local_addr() {
                tracing::info!("Prometheus metrics on http://{a}/metrics");
            }
            let cancel = cancel.clone();
            tracker.spawn(serve_metrics(listener, metrics.clone(), cancel));
        }
        tracker.spawn(push_fates(
            queue.clone(),
            router.clone(),
            fates_rx,
            cancel.clone(),
        ));
        tracker.spawn(expire_detached(resumption, fates, cancel.clone()));
        tracker.spawn(purge_loop(
            queue,
            Duration::from_secs(config.queue.purge_interval_secs.max(1)),
            cancel.clone(),
        ));
        tls.spawn_reloader(&config.tls, cancel.clone());
        Ok(Server {
            router,
            turn,
            tls,
            cancel,
            local_addrs,
            tracker,
        })
    }

    /// Stop accepting, send `system-shutdown` to every session, wait (bounded) for them to finish.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("some connections did not close within {SHUTDOWN_GRACE:?}");
        }
    }
}

/// Open `{data_dir}/queue.redb` with the `[queue]` limits.
fn open_queue(config: &Config) -> Result<crate::store::queue::PushQueue, ServerError> {
    use crate::store::queue::{FILE_NAME, PushQueue, QueueConfig};
    // The account store, opened first, has created data_dir.
    let dir = &config.server.data_dir;
    let cfg = QueueConfig {
        max_per_endpoint: config.queue.max_per_endpoint,
        status_retention: Duration::from_secs(config.queue.status_retention_secs),
        ..QueueConfig::default()
    };
    Ok(PushQueue::open(&dir.join(FILE_NAME), cfg)?)
}

/// How long the push-fate task keeps working after shutdown began: closing sessions send their
/// unacknowledged pushes back to the queue then.
const FATES_DRAIN: Duration = Duration::from_secs(2);

/// Apply what sessions report about pushes they wrote: `acked` statuses, and pushes that go back to
/// the front of the durable queue (then read again by any session of the recipient now available).
async fn push_fates(
    queue: PushQueue,
    router: Arc<Router>,
    mut rx: UnboundedReceiver<PushFate>,
    cancel: CancellationToken,
) {
    loop {
        let fate = tokio::select! {
            f = rx.recv() => f,
            _ = cancel.cancelled() => break,
        };
        let Some(fate) = fate else { return };
        apply_fates(&queue, &router, fate, &mut rx).await;
    }
    while let Ok(Some(fate)) = tokio::time::timeout(FATES_DRAIN, rx.recv()).await {
        apply_fates(&queue, &router, fate, &mut rx).await;
    }
}

/// `first` and whatever else is waiting: acks in one status batch, requeues in order.
async fn apply_fates(
    queue: &PushQueue,
    router: &Router,
    first: PushFate,
    rx: &mut UnboundedReceiver<PushFate>,
) {
    let now = std::time::SystemTime::now();
    let mut acked = Vec::new();
    let mut next = Some(first);
    while let Some(fate) = next.take().or_else(|| rx.try_recv().ok()) {
        match fate {
            PushFate::Acked {
                recipient,
                push_ids,
            } => acked.extend(push_ids.into_iter().map(|push_id| StatusUpdate {
                push_id,
                recipient: recipient.to_string(),
                state: PushState::Acked,
                error: None,
                at: now,
            })),
            PushFate::Requeue { recipient, items } => {
                let n = items.len();
                let items = items
                    .into_iter()
                    .map(|(stanza, meta)| NewItem {
                        push_id: meta.push_id.clone(),
                        recipient: recipient.to_string(),
                        stanza,
                        created: meta.created,
                        expires_at: meta.expires_at,
                    })
                    .collect();
                match queue.requeue_front(items, now).await {
                    Ok(_) => {
                        tracing::debug!(jid = %recipient, pushes = n, "unacknowledged pushes requeued");
                        router.request_replay(&recipient);
                    }
                    Err(e) => {
                        tracing::error!(jid = %recipient, pushes = n, error = %e, "cannot requeue unacknowledged pushes")
                    }
                }
            }
        }
        if acked.len() >= 1024 {
            break;
        }
    }
    if !acked.is_empty()
        && let Err(e) = queue.set_status(acked).await
    {
        tracing::warn!(error = %e, "cannot record acknowledged pushes");
    }
}

/// Give up detached sessions whose resumption window ran out (XEP-0198 §5): their unacknowledged
/// pushes go back to the queue. On shutdown every detached session is given up.
async fn expire_detached(
    registry: Arc<ResumptionRegistry<Arc<PushMeta>>>,
    fates: PushFates,
    cancel: CancellationToken,
) {
    let give_up = |sessions: Vec<(String, DetachedSession<Arc<PushMeta>>)>| {
        for (_, s) in sessions {
            metrics::counter!("tern_sm_expired_total").increment(1);
            let items: Vec<_> = s
                .unacked
                .into_iter()
                .filter_map(|(b, tag)| tag.map(|t| (b, t)))
                .collect();
            if !items.is_empty() {
                metrics::counter!("tern_pushes_requeued_total").increment(items.len() as u64);
                let _ = fates.send(PushFate::Requeue {
                    recipient: s.full_jid.to_bare(),
                    items,
                });
            }
        }
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        give_up(registry.expire(std::time::Instant::now()));
        metrics::gauge!("tern_sm_detached").set(registry.len() as f64);
    }
    give_up(registry.take_all());
}

/// Periodically delete expired pushes (status `expired`) and old status records, until cancelled.
async fn purge_loop(
    queue: crate::store::queue::PushQueue,
    every: Duration,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        match queue.purge_expired(std::time::SystemTime::now()).await {
            Ok(r) if r.expired_items > 0 || r.purged_statuses > 0 => {
                metrics::counter!("tern_queue_expired_total").increment(r.expired_items as u64);
                tracing::info!(
                    expired = r.expired_items,
                    statuses = r.purged_statuses,
                    "purged the offline queue"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot purge the offline queue"),
        }
    }
}

/// Run until SIGTERM or SIGINT, then shut down gracefully.
pub async fn run(config: Config) -> Result<(), ServerError> {
    let server = Server::start(&config).await?;
    tracing::info!(domain = %config.server.domain, "certificates: {}", server.tls.describe());
    for (kind, addr) in &server.local_addrs {
        let what = match kind {
            ListenerKind::StartTls => "STARTTLS (RFC 6120 §5)",
            ListenerKind::DirectTls => "direct TLS (XEP-0368)",
        };
        tracing::info!("listening on {addr} for XMPP clients, {what}");
    }
    tracing::info!(
        "log in as USER@{d}: create the account with `tern user add USER@{d}`{}",
        if config.auth.device_secret.is_some() {
            ", or use device credentials (password = hex HMAC-SHA256(device_secret, bare JID))"
        } else {
            ""
        },
        d = config.server.domain
    );
    wait_for_signal().await;
    tracing::info!(
        sessions = server.router.session_count(),
        "shutting down: sending system-shutdown to every session"
    );
    server.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the server with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Bind a listener; errors name its config key (`listener`) and the fix.
fn bind(listener: &'static str, addr: SocketAddr) -> Result<TcpListener, ServerError> {
    let err = |e: std::io::Error| ServerError::Bind {
        listener,
        addr,
        reason: bind_reason(&e),
    };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(4096).map_err(err)
}

/// Why a listener could not be bound, with the fix.
fn bind_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            "address already in use (another process listens there; stop it or choose another port)"
                .to_string()
        }
        std::io::ErrorKind::PermissionDenied => format!(
            "permission denied ({e}); ports below 1024 need root or CAP_NET_BIND_SERVICE \
             (`setcap cap_net_bind_service=+ep $(which tern)`)"
        ),
        std::io::ErrorKind::AddrNotAvailable => {
            format!("address not available on this machine ({e})")
        }
        _ => e.to_string(),
    }
}

async fn accept_loop(
    listener: TcpListener,
    kind: ListenerKind,
    settings: Arc<ConnSettings>,
    ip_limiter: Arc<IpLimiter>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                metrics::counter!("tern_accept_errors_total").increment(1);
                tracing::warn!(listener = kind.name(), error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(permit) = ip_limiter.try_acquire(peer.ip()) else {
            metrics::counter!("tern_limit_hits_total", "limit" => "max_connections_per_ip")
                .increment(1);
            tracing::info!(%peer, "refusing connection: limits.max_connections_per_ip reached");
            drop(tcp);
            continue;
        };
        metrics::counter!("tern_connections_total", "listener" => kind.name()).increment(1);
        let _ = tcp.set_nodelay(true);
        let settings = settings.clone();
        let cancel = cancel.clone();
        tracker.spawn(async move {
            conn::serve(tcp, peer, kind, settings, cancel).await;
            drop(permit);
        });
    }
}

/// The process-wide Prometheus recorder, installed on first use. A second server in the same process
/// (tests) shares it.
fn metrics_handle() -> metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            handle
        })
        .clone()
}

/// The separate `[metrics] listen` endpoint: `GET /metrics` only, no authentication (bind it to a
/// private address).
async fn serve_metrics(
    listener: TcpListener,
    handle: metrics_exporter_prometheus::PrometheusHandle,
    cancel: CancellationToken,
) {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle = handle.clone();
            async move { handle.render() }
        }),
    );
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await;
    if let Err(e) = served {
        tracing::error!("metrics listener stopped: {e}");
    }
}

/// Each session is a socket: lift the soft open-file limit to the hard one.
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

//! The HTTP service API the management server uses to push to endpoints (issue 3, "HTTP API").
//!
//! - [`auth`]: API keys (four spellings, constant-time comparison), the client network allow-list and
//!   the per-client request rate limit.
//! - [`rest_stream`]: Tigase-compatible `POST /rest/stream/{jid}` with a raw XML stanza.
//! - [`api`]: the native JSON API under `/api/v1` (push, broadcast, push status, sessions, OpenAPI
//!   document).
//! - [`webhook`]: online/offline events POSTed to the management server.
//!
//! Everything here sits on top of [`Router`]: pushes are `Router::route_tagged` calls, iq replies come back
//! through `Router::await_iq_reply`. Posted XML goes through the c2s [`Framer`](crate::xmpp::framer)
//! so the HTTP path accepts exactly the restricted XML a client connection would.
//!
//! Errors are JSON `{"error": "..."}` everywhere except `/rest/stream`, whose Tigase clients expect
//! plain text (and XML stanzas for iq failures).

pub mod api;
pub mod auth;
pub mod rest_stream;
pub mod webhook;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::config::HttpConfig;
use crate::xmpp::framer::FramerLimits;
use crate::xmpp::router::Router;

pub use auth::Cidr;

/// Everything the handlers need; shared by all requests.
pub struct HttpState {
    pub router: Arc<Router>,
    /// The XMPP domain: the service's own JID, and the only domain pushes may go to.
    pub domain: String,
    /// Accepted API keys. Empty: every request needing a key is refused (fail closed).
    pub api_keys: Vec<String>,
    /// Client networks allowed to call the API; empty allows every address.
    pub allow: Vec<Cidr>,
    /// How long `POST /rest/stream` waits for the reply to an `<iq>`.
    pub iq_timeout: Duration,
    /// Largest request body accepted (413 beyond).
    pub max_body: usize,
    /// Stanza size and depth limits for posted XML: the same as for c2s (`[limits]`).
    pub limits: FramerLimits,
    /// Renders `GET /metrics`; `None` gives 404 there.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// The durable offline queue; `None`: pushes to offline endpoints answer error `offline`.
    pub queue: Option<crate::store::queue::PushQueue>,
    /// TTL of a push that names none (`queue.default_ttl_secs`).
    pub default_ttl: Duration,
    /// Largest TTL a push may ask for (`queue.max_ttl_secs`).
    pub max_ttl: Duration,
    /// Requests per client address (`http.rate_limit_per_sec`, `http.rate_limit_burst`); `None`:
    /// unlimited.
    pub rate_limit: Option<auth::RateLimiter>,
    /// Broadcast ids answered recently (idempotent retries).
    pub broadcasts: api::RecentBroadcasts,
    /// Background work of requests (broadcast fan-out, status records): the server waits for it on
    /// shutdown, so an accepted broadcast is not cut off half-way.
    pub tasks: tokio_util::task::TaskTracker,
}

impl std::fmt::Debug for HttpState {
    /// Hand-written so the API keys can never end up in a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpState")
            .field("domain", &self.domain)
            .field(
                "api_keys",
                &format_args!("<{} redacted>", self.api_keys.len()),
            )
            .field("allow", &self.allow)
            .field("iq_timeout", &self.iq_timeout)
            .field("max_body", &self.max_body)
            .field("rate_limit", &self.rate_limit)
            .finish_non_exhaustive()
    }
}

impl HttpState {
    /// State from the `[http]` section. `api_keys` are the effective keys (the configured ones, or the
    /// generated one from [`load_or_create_api_key`]). Errors name the bad `allow_networks` entry.
    pub fn from_config(
        router: Arc<Router>,
        domain: &str,
        config: &HttpConfig,
        api_keys: Vec<String>,
        limits: FramerLimits,
        metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    ) -> Result<Self, String> {
        let allow = config
            .allow_networks
            .iter()
            .map(|s| {
                s.parse::<Cidr>()
                    .map_err(|e| format!("http.allow_networks: `{s}`: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            router,
            domain: domain.to_string(),
            api_keys,
            allow,
            iq_timeout: Duration::from_secs(config.iq_timeout_secs.max(1)),
            max_body: config.max_body_bytes,
            limits,
            metrics,
            queue: None,
            default_ttl: Duration::from_secs(86_400),
            max_ttl: Duration::from_secs(2_592_000),
            rate_limit: (config.rate_limit_per_sec > 0).then(|| {
                auth::RateLimiter::new(config.rate_limit_per_sec, config.rate_limit_burst)
            }),
            broadcasts: api::RecentBroadcasts::default(),
            tasks: tokio_util::task::TaskTracker::new(),
        })
    }
}

/// All routes, with authentication, body limits and request metrics.
pub fn router(state: Arc<HttpState>) -> axum::Router {
    let protected = axum::Router::new()
        .route("/rest/stream", post(rest_stream::post_stream))
        .route("/rest/stream/", post(rest_stream::post_stream))
        .route("/rest/stream/{*jid}", post(rest_stream::post_stream_to))
        .route("/api/v1/push", post(api::push))
        .route("/api/v1/broadcast", post(api::broadcast))
        .route("/api/v1/push/{id}", get(api::push_status))
        .route("/api/v1/sessions", get(api::list_sessions))
        .route(
            "/api/v1/sessions/{*jid}",
            get(api::get_session).delete(api::delete_session),
        )
        .route("/api/v1/openapi.json", get(api::openapi))
        .route("/metrics", get(metrics_handler))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_key,
        ));
    let public = axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        // The allow-list still applies: probes come from the orchestrator's network.
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_network,
        ));
    protected
        .merge(public)
        .fallback(|| async { json_error(StatusCode::NOT_FOUND, "no such route") })
        .layer(middleware::from_fn(record_metrics))
        .with_state(state)
}

/// Serve until `shutdown` is cancelled, then finish the requests in flight (graceful shutdown).
/// Client addresses are recorded (`ConnectInfo`) for the allow-list.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<HttpState>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = router(state).layer(axum::Extension(Readiness(shutdown.clone())));
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { shutdown.cancelled().await })
    .await
}

/// The shutdown token, so `/readyz` turns 503 while draining.
#[derive(Clone)]
struct Readiness(CancellationToken);

async fn readyz(ready: Option<axum::Extension<Readiness>>) -> Response {
    match ready {
        Some(axum::Extension(Readiness(t))) if t.is_cancelled() => {
            (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response()
        }
        _ => (StatusCode::OK, "ready").into_response(),
    }
}

async fn metrics_handler(State(state): State<Arc<HttpState>>) -> Response {
    match &state.metrics {
        Some(h) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            h.render(),
        )
            .into_response(),
        None => json_error(StatusCode::NOT_FOUND, "metrics are not enabled"),
    }
}

/// `tern_http_requests_total{route,status}` and `tern_http_request_duration_seconds{route}`. The route
/// label is the route pattern (never the raw path, which would carry JIDs and unbounded cardinality).
async fn record_metrics(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let start = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    metrics::histogram!("tern_http_request_duration_seconds", "route" => route.clone())
        .record(start.elapsed().as_secs_f64());
    metrics::counter!("tern_http_requests_total", "route" => route, "status" => status)
        .increment(1);
    resp
}

/// `{"error": message}` with `status`.
pub(crate) fn json_error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

/// Why a request body could not be read.
pub(crate) enum BodyError {
    /// Larger than `max_body` (413).
    TooLarge(usize),
    /// The connection failed while reading.
    Read(String),
}

/// Read the whole body, refusing more than `max` bytes (announced or actually sent) with a precise
/// message instead of axum's plain-text rejection.
pub(crate) async fn read_body(
    headers: &HeaderMap,
    body: axum::body::Body,
    max: usize,
) -> Result<Bytes, BodyError> {
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > max as u64) {
        return Err(BodyError::TooLarge(max));
    }
    axum::body::to_bytes(body, max).await.map_err(|e| {
        // `to_bytes` reports the limit through a `LengthLimitError` source.
        let mut src: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(s) = src {
            if s.to_string().contains("length limit exceeded") {
                return BodyError::TooLarge(max);
            }
            src = s.source();
        }
        BodyError::Read(e.to_string())
    })
}

/// The media type of the request (`application/xml; charset=utf-8` → `application/xml`), lowercased.
pub(crate) fn media_type(headers: &HeaderMap) -> Option<String> {
    let ct = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let mt = ct.split(';').next()?.trim().to_ascii_lowercase();
    Some(mt)
}

/// RFC 3339 UTC timestamp with second precision, e.g. `2024-05-01T12:34:56Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The API key of the embedded default: `{data_dir}/api-key` (mode 0600), 32 random bytes in hex,
/// created on first start and reused afterwards so the management server's key stays valid.
pub fn load_or_create_api_key(data_dir: &Path) -> std::io::Result<(String, PathBuf)> {
    crate::store::load_or_create_secret(data_dir, "api-key")
}

/// The client's address, recorded by [`serve`]; `None` when the router runs without `ConnectInfo`.
pub(crate) fn client_ip(req: &Request) -> Option<IpAddr> {
    req.extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400); // leap day 2000
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn api_key_is_created_once_with_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        let (k1, p1) = load_or_create_api_key(&dir.path().join("sub")).unwrap();
        assert_eq!(k1.len(), 64);
        let (k2, p2) = load_or_create_api_key(&dir.path().join("sub")).unwrap();
        assert_eq!((k1, p1.clone()), (k2, p2));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p1).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}

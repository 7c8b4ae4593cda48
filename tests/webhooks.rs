//! Online/offline webhooks through a real `tern serve` and a real HTTP receiver: events arrive as
//! signed JSON batches, only an account's first resource and its last are reported, failed POSTs are
//! retried with the same batch id, a receiver that comes up late still gets its events, a shutdown
//! flushes the offline events, and presence observers see every endpoint's presence.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use common::{API_KEY, DOMAIN, STEP, TestServer, attr, element_name};
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

const SECRET: &str = "webhook-secret-for-tests-0123";

/// One request the receiver got, and what it answered.
#[derive(Debug, Clone)]
struct Hit {
    status: u16,
    batch_id: Option<String>,
    signature: Option<String>,
    content_type: Option<String>,
    body: Bytes,
    json: Value,
}

struct HookState {
    hits: Mutex<Vec<Hit>>,
    /// Requests still to be answered 500.
    fail_next: AtomicUsize,
    /// Bumped on every request, to wake waiters.
    seen: tokio::sync::watch::Sender<usize>,
}

/// A webhook receiver on a real socket.
struct Hook {
    addr: SocketAddr,
    state: Arc<HookState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Hook {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn receive(
    State(state): State<Arc<HookState>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let fail = state
        .fail_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    let status = if fail {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    };
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let hit = Hit {
        status: status.as_u16(),
        batch_id: header("x-tern-batch-id"),
        signature: header("x-tern-signature"),
        content_type: header("content-type"),
        json: serde_json::from_slice(&body).unwrap_or(Value::Null),
        body,
    };
    state.hits.lock().unwrap().push(hit);
    state.seen.send_modify(|n| *n += 1);
    status
}

impl Hook {
    /// A receiver on a fresh loopback port that answers 500 to its first `fail_first` requests.
    async fn start(fail_first: usize) -> Hook {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        Self::serve(listener, fail_first)
    }

    fn serve(listener: tokio::net::TcpListener, fail_first: usize) -> Hook {
        let addr = listener.local_addr().expect("local_addr");
        let state = Arc::new(HookState {
            hits: Mutex::new(Vec::new()),
            fail_next: AtomicUsize::new(fail_first),
            seen: tokio::sync::watch::channel(0).0,
        });
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Hook { addr, state, task }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn hits(&self) -> Vec<Hit> {
        self.state.hits.lock().unwrap().clone()
    }

    /// The events of the accepted (2xx) requests, in arrival order, once there are at least `n`.
    async fn events(&self, n: usize, timeout: Duration) -> Vec<Value> {
        let accepted = |hits: &[Hit]| -> Vec<Value> {
            hits.iter()
                .filter(|h| h.status == 200)
                .flat_map(|h| h.json["events"].as_array().cloned().unwrap_or_default())
                .collect()
        };
        let mut rx = self.state.seen.subscribe();
        let waited = tokio::time::timeout(
            timeout,
            rx.wait_for(|_| accepted(&self.state.hits.lock().unwrap()).len() >= n),
        )
        .await;
        let hits = self.hits();
        let events = accepted(&hits);
        assert!(
            waited.is_ok(),
            "expected {n} webhook events within {timeout:?}; requests so far: {hits:#?}"
        );
        events
    }
}

/// The extra TOML of a server posting to `url` (further `[webhooks]` keys in `webhook_keys`).
/// `batch_delay_ms` is 50 unless `webhook_keys` sets it.
fn config(url: &str, webhook_keys: &str) -> String {
    let delay = if webhook_keys.contains("batch_delay_ms") {
        ""
    } else {
        "batch_delay_ms = 50\n"
    };
    format!("[webhooks]\nurls = [\"{url}\"]\nsecret = \"{SECRET}\"\n{delay}{webhook_keys}\n")
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ`.
fn is_rfc3339_millis(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 24
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'.',
            23 => *c == b'Z',
            _ => c.is_ascii_digit(),
        })
}

/// Asserts the headers, the signature and the envelope of one request.
fn check_request(hit: &Hit) {
    assert_eq!(
        hit.content_type.as_deref(),
        Some("application/json"),
        "{hit:?}"
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("any key length");
    mac.update(&hit.body);
    let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(
        hit.signature.as_deref(),
        Some(expected.as_str()),
        "signature over the raw body"
    );
    let id = hit.batch_id.as_deref().expect("X-Tern-Batch-Id");
    assert_eq!(hit.json["batch_id"], id, "{}", hit.json);
    assert!(
        id.len() == 36 && id.chars().filter(|&c| c == '-').count() == 4,
        "batch id is a UUID: {id}"
    );
    let sent_at = hit.json["sent_at"].as_str().expect("sent_at");
    assert!(is_rfc3339_millis(sent_at), "sent_at: {sent_at}");
    assert!(
        !hit.json["events"].as_array().expect("events").is_empty(),
        "{}",
        hit.json
    );
}

/// Asserts one event's fields.
fn check_event(ev: &Value, kind: &str, bare: &str, resource: &str) {
    assert_eq!(ev["event"], kind, "{ev}");
    assert_eq!(ev["jid"], bare, "{ev}");
    assert_eq!(ev["resource"], resource, "{ev}");
    let addr: SocketAddr = ev["remote_addr"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("remote_addr is ip:port: {ev}"));
    assert_eq!(addr.ip().to_string(), "127.0.0.1", "{ev}");
    assert_ne!(addr.port(), 0, "{ev}");
    let at = ev["at"].as_str().expect("at");
    assert!(is_rfc3339_millis(at), "at: {at}");
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

/// The server's Prometheus text.
async fn metrics(server: &TestServer) -> String {
    let r = http()
        .get(format!("http://{}/metrics", server.http_addr))
        .bearer_auth(API_KEY)
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(r.status(), 200);
    r.text().await.expect("metrics text")
}

/// The value of the sample `name` (with its labels, e.g. `x_total{a="b"}`), if present.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Polls the metrics until `ready` holds for them (bounded by [`STEP`]).
async fn wait_metrics(server: &TestServer, ready: impl Fn(&str) -> bool) {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let text = metrics(server).await;
        if ready(&text) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "metrics not as expected within {STEP:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_and_offline_arrive_as_signed_json() {
    let hook = Hook::start(0).await;
    let server = TestServer::start(&config(&hook.url(), ""));
    let bare = format!("wh-basic@{DOMAIN}");

    let client = server.login_device(&bare, "desk").await;
    let events = hook.events(1, STEP).await;
    check_event(&events[0], "online", &bare, "desk");

    // The TCP connection drops without a stream close.
    drop(client);
    let events = hook.events(2, STEP).await;
    check_event(&events[1], "offline", &bare, "desk");
    assert_eq!(
        events[0]["remote_addr"], events[1]["remote_addr"],
        "same connection"
    );

    // A clean close.
    let client = server.login_device(&bare, "lab").await;
    let events = hook.events(3, STEP).await;
    check_event(&events[2], "online", &bare, "lab");
    client.close().await;
    let events = hook.events(4, STEP).await;
    check_event(&events[3], "offline", &bare, "lab");
    assert_eq!(events.len(), 4, "{events:#?}");
    // Same format, so the strings order like the times.
    let ats: Vec<&str> = events.iter().map(|e| e["at"].as_str().unwrap()).collect();
    assert!(ats.windows(2).all(|w| w[0] <= w[1]), "{ats:?}");

    let hits = hook.hits();
    for hit in &hits {
        assert_eq!(hit.status, 200);
        check_request(hit);
    }
    let mut ids: Vec<_> = hits.iter().map(|h| h.batch_id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), hits.len(), "every batch has its own id");
    assert!(!server.log().contains(SECRET), "the secret is never logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_first_and_the_last_resource_are_reported() {
    let hook = Hook::start(0).await;
    let server = TestServer::start(&config(&hook.url(), ""));
    let bare = format!("wh-multi@{DOMAIN}");

    let one = server.login_device(&bare, "one").await;
    hook.events(1, STEP).await;
    let two = server.login_device(&bare, "two").await;
    one.close().await;
    two.close().await;
    // Events of one URL arrive in order: anything reported for the login of `two` or the close of
    // `one` would come before the offline of `two`.
    let events = hook.events(2, STEP).await;
    assert_eq!(events.len(), 2, "{events:#?}");
    check_event(&events[0], "online", &bare, "one");
    check_event(&events[1], "offline", &bare, "two");
    hook.hits().iter().for_each(check_request);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_posts_are_retried_with_the_same_batch_id() {
    let hook = Hook::start(2).await;
    let server = TestServer::start(&config(&hook.url(), ""));
    let bare = format!("wh-retry@{DOMAIN}");

    let client = server.login_device(&bare, "desk").await;
    let events = hook.events(1, STEP).await;
    check_event(&events[0], "online", &bare, "desk");
    client.close().await;
    let events = hook.events(2, STEP).await;
    assert_eq!(events.len(), 2, "{events:#?}");
    check_event(&events[1], "offline", &bare, "desk");

    let hits = hook.hits();
    assert_eq!(
        hits.iter().map(|h| h.status).collect::<Vec<_>>(),
        [500, 500, 200, 200],
        "{hits:#?}"
    );
    for hit in &hits {
        check_request(hit);
    }
    // The three attempts of the first batch: same id, same events (only `sent_at` differs).
    for retry in &hits[1..3] {
        assert_eq!(retry.batch_id, hits[0].batch_id);
        assert_eq!(retry.json["events"], hits[0].json["events"]);
    }
    assert_ne!(hits[3].batch_id, hits[0].batch_id);

    // The server counts an answer after the receiver has recorded the request: wait for the numbers.
    let expected = [
        ("tern_webhook_posts_total{outcome=\"error\"}", 2.0),
        ("tern_webhook_posts_total{outcome=\"ok\"}", 2.0),
        ("tern_webhook_events_total{event=\"online\"}", 1.0),
        ("tern_webhook_events_total{event=\"offline\"}", 1.0),
        ("tern_webhook_pending", 0.0),
    ];
    wait_metrics(&server, |text| {
        expected
            .iter()
            .all(|(name, want)| sample(text, name) == Some(*want))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_comes_up_late_gets_the_events() {
    // A port bound but not listening: it stays ours, and connections to it are refused.
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    socket.bind(&any.into()).expect("bind");
    let addr = socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .expect("bound address");
    let server = TestServer::start(&config(&format!("http://{addr}/hook"), "max_attempts = 8"));
    let bare = format!("wh-late@{DOMAIN}");
    let client = server.login_device(&bare, "desk").await;

    // Wait until at least one attempt has failed before the receiver comes up.
    wait_metrics(&server, |text| {
        sample(text, "tern_webhook_posts_total{outcome=\"error\"}").is_some_and(|n| n >= 1.0)
    })
    .await;
    socket.listen(128).expect("listen");
    socket.set_nonblocking(true).expect("nonblocking");
    let listener = tokio::net::TcpListener::from_std(socket.into()).expect("tokio listener");
    let hook = Hook::serve(listener, 0);

    // The back-off before the attempts that can reach it is at most a few seconds.
    let events = hook.events(1, Duration::from_secs(30)).await;
    check_event(&events[0], "online", &bare, "desk");
    client.close().await;
    let events = hook.events(2, STEP).await;
    check_event(&events[1], "offline", &bare, "desk");
    hook.hits().iter().for_each(check_request);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_the_offline_events() {
    let hook = Hook::start(0).await;
    let mut server = TestServer::start(&config(&hook.url(), "batch_delay_ms = 60000"));
    let bare = format!("wh-stop@{DOMAIN}");
    let _client = server.login_device(&bare, "desk").await;

    // With a minute of batch delay, only the shutdown flush sends anything now.
    server.sigterm();
    let status = server
        .wait_exit_async(STEP)
        .await
        .expect("server exits after SIGTERM");
    assert!(status.success(), "{status}");
    let events = hook.events(2, STEP).await;
    check_event(&events[0], "online", &bare, "desk");
    check_event(&events[1], "offline", &bare, "desk");
    hook.hits().iter().for_each(check_request);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_observers_see_endpoints_come_and_go() {
    let server = TestServer::start("[c2s]\npresence_observers = [\"observer@localhost\"]\n");
    let mut observer = server
        .login_device(&format!("observer@{DOMAIN}"), "monitor")
        .await;
    observer.send("<presence/>").await.expect("presence");
    let own = observer.jid().to_string();
    observer
        .wait_for(STEP, |e| {
            element_name(e) == "presence" && attr(e, "from").as_deref() == Some(own.as_str())
        })
        .await
        .expect("the observer's own presence");

    let mut endpoint = server.login_device(&format!("e1@{DOMAIN}"), "dev").await;
    endpoint.send("<presence/>").await.expect("presence");
    let e1 = endpoint.jid().to_string();
    let available = observer
        .wait_for(STEP, |e| {
            element_name(e) == "presence" && attr(e, "from").as_deref() == Some(e1.as_str())
        })
        .await
        .expect("e1's presence reaches the observer");
    assert_eq!(attr(&available, "type"), None, "{available}");

    drop(endpoint);
    let gone = observer
        .wait_for(STEP, |e| {
            element_name(e) == "presence"
                && attr(e, "from").as_deref() == Some(e1.as_str())
                && attr(e, "type").as_deref() == Some("unavailable")
        })
        .await
        .expect("e1's unavailable presence reaches the observer");
    assert!(gone.contains("unavailable"), "{gone}");
    observer.close().await;
}

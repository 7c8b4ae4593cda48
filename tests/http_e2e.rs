//! The HTTP API of a real `tern serve`, against clients logged in over XMPP: a push through the
//! Tigase-compatible `/rest/stream` and through `/api/v1/push` arrives intact, an iq through
//! `/rest/stream` returns the client's reply, and the session API sees the client (and its
//! activity). A broadcast reaches every online account, or a list with offline accounts queued
//! until login; the request rate limit answers 429 but never the health probe.

mod common;

use std::time::Duration;

use common::{API_KEY, DOMAIN, STEP, TRICKY_BODY, TestServer, attr, escape, inner_text};
use serde_json::{Value, json};

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

#[tokio::test]
async fn pushes_reach_a_logged_in_endpoint() {
    let server = TestServer::start("");
    let base = format!("http://{}", server.http_addr);
    let bare = format!("agent-7@{DOMAIN}");
    let mut agent = server.login_device(&bare, "desk").await;
    agent.send("<presence/>").await.expect("presence");
    agent
        .wait_for(STEP, |e| e.starts_with("<presence"))
        .await
        .expect("own presence");

    // Tigase form: raw stanza, key in the query, `from` filled by the server.
    let stanza = format!(
        "<message to='{bare}/desk' type='chat'><body>{}</body><cmd xmlns='urn:x:cmd' op='restart'/></message>",
        escape(TRICKY_BODY)
    );
    let r = http()
        .post(format!("{base}/rest/stream/?api-key={API_KEY}"))
        .header("content-type", "application/xml")
        .body(stanza)
        .send()
        .await
        .expect("POST /rest/stream");
    assert_eq!(r.status(), 200);
    let got = agent
        .wait_for(STEP, |e| e.starts_with("<message"))
        .await
        .expect("message");
    assert_eq!(attr(&got, "from").as_deref(), Some(DOMAIN), "{got}");
    assert_eq!(
        inner_text(&got, "body").as_deref(),
        Some(TRICKY_BODY),
        "{got}"
    );
    assert!(
        got.contains("<cmd xmlns='urn:x:cmd' op='restart'/>"),
        "{got}"
    );

    // Native JSON API, Bearer key.
    let r = http()
        .post(format!("{base}/api/v1/push"))
        .bearer_auth(API_KEY)
        .json(&serde_json::json!({"to": [bare.clone(), format!("nobody@{DOMAIN}")], "body": "hello ☃", "id": "push-1"}))
        .send()
        .await
        .expect("POST /api/v1/push");
    assert_eq!(r.status(), 200);
    let answer: serde_json::Value = r.json().await.expect("json");
    assert_eq!(answer["results"][0]["status"], "delivered", "{answer}");
    // Nobody online: stored in the durable queue.
    assert_eq!(answer["results"][1]["status"], "queued", "{answer}");
    let got = agent
        .wait_for(STEP, |e| e.starts_with("<message"))
        .await
        .expect("push");
    assert_eq!(
        inner_text(&got, "body").as_deref(),
        Some("hello ☃"),
        "{got}"
    );

    // An iq through /rest/stream waits for the endpoint's reply.
    let waiter = tokio::spawn({
        let url = format!("{base}/rest/stream/{bare}/desk");
        async move {
            http()
                .post(url)
                .header("X-Api-Key", API_KEY)
                .header("content-type", "application/xml")
                .body("<iq type='get' id='q1'><query xmlns='urn:x:status'/></iq>")
                .send()
                .await
                .expect("POST iq")
                .text()
                .await
                .expect("body")
        }
    });
    let iq = agent
        .wait_for(STEP, |e| e.starts_with("<iq"))
        .await
        .expect("iq");
    let id = attr(&iq, "id").expect("iq id");
    agent
        .send(&format!(
            "<iq type='result' id='{id}' to='{DOMAIN}'><query xmlns='urn:x:status'><ok/></query></iq>"
        ))
        .await
        .expect("reply");
    let reply = waiter.await.expect("join");
    assert!(
        reply.contains("type='result'") || reply.contains("type=\"result\""),
        "{reply}"
    );
    assert!(reply.contains("<ok"), "{reply}");

    // The session API sees the endpoint; a wrong key is 403, none is 401.
    let r = http()
        .get(format!("{base}/api/v1/sessions/{bare}"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .expect("GET session");
    let s: serde_json::Value = r.json().await.expect("json");
    assert_eq!(s["online"], true, "{s}");
    assert_eq!(s["resources"][0]["resource"], "desk", "{s}");
    let r = http()
        .get(format!("{base}/api/v1/sessions"))
        .bearer_auth("wrong-key-0123456789")
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), 403);
    let r = http()
        .get(format!("{base}/api/v1/sessions"))
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), 401);
    let r = http()
        .get(format!("{base}/metrics"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(r.status(), 200);
    let text = r.text().await.expect("metrics");
    assert!(text.contains("tern_logins_total"), "{text}");
    server.assert_alive().await;
}

async fn get_json(server: &TestServer, path: &str) -> (u16, Value) {
    let r = http()
        .get(format!("http://{}{path}", server.http_addr))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = r.status().as_u16();
    (status, r.json().await.expect("JSON answer"))
}

async fn broadcast(server: &TestServer, req: Value) -> (u16, Value) {
    let r = http()
        .post(format!("http://{}/api/v1/broadcast", server.http_addr))
        .bearer_auth(API_KEY)
        .json(&req)
        .send()
        .await
        .expect("POST /api/v1/broadcast");
    let status = r.status().as_u16();
    (status, r.json().await.expect("JSON answer"))
}

/// The state of `recipient` in `GET /api/v1/push/{id}`, if listed.
fn state_of(status: &Value, recipient: &str) -> Option<String> {
    status["results"]
        .as_array()?
        .iter()
        .find(|r| r["to"] == recipient)
        .and_then(|r| r["status"].as_str())
        .map(str::to_string)
}

/// Polls `GET /api/v1/push/{id}` until `done` accepts it (bounded by [`STEP`]).
async fn wait_push_status(server: &TestServer, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let (code, body) = get_json(server, &format!("/api/v1/push/{id}")).await;
        if code == 200 && done(&body) {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "push {id} never reached the expected state: {code} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn broadcast_reaches_online_accounts_and_queues_for_listed_offline_ones() {
    let server = TestServer::start("");
    let alice = format!("alice@{DOMAIN}");
    let bob = format!("bob@{DOMAIN}");
    let carol = format!("carol@{DOMAIN}");
    let mut clients = Vec::new();
    for bare in [&alice, &bob] {
        let mut c = server.login_device(bare, "phone").await;
        c.send("<presence/>").await.expect("presence");
        c.wait_for(STEP, |e| e.starts_with("<presence"))
            .await
            .expect("own presence");
        clients.push(c);
    }

    // Every online account; carol (offline) is not a recipient at all.
    let (code, answer) = broadcast(
        &server,
        json!({"to": "all", "body": "all hands ☃", "id": "bc-all"}),
    )
    .await;
    assert_eq!(code, 202, "{answer}");
    assert_eq!(answer, json!({"id": "bc-all", "recipients": 2}));
    for (c, bare) in clients.iter_mut().zip([&alice, &bob]) {
        let got = c
            .wait_for(STEP, |e| e.starts_with("<message"))
            .await
            .unwrap_or_else(|e| panic!("{bare}: {e}"));
        assert_eq!(attr(&got, "id").as_deref(), Some("bc-all"), "{got}");
        assert_eq!(attr(&got, "from").as_deref(), Some(DOMAIN), "{got}");
        assert_eq!(attr(&got, "to").as_deref(), Some(bare.as_str()), "{got}");
        assert_eq!(
            inner_text(&got, "body").as_deref(),
            Some("all hands ☃"),
            "{got}"
        );
    }
    let status = wait_push_status(&server, "bc-all", |v| {
        v["results"].as_array().is_some_and(|r| r.len() == 2)
    })
    .await;
    assert_eq!(state_of(&status, &alice).as_deref(), Some("delivered"));
    assert_eq!(state_of(&status, &bob).as_deref(), Some("delivered"));
    assert_eq!(state_of(&status, &carol), None, "{status}");
    // Retried: the same answer, marked, and nothing sent twice (checked below: the next message
    // alice sees is the list broadcast).
    let (code, again) = broadcast(
        &server,
        json!({"to": "all", "body": "all hands ☃", "id": "bc-all"}),
    )
    .await;
    assert_eq!(code, 202);
    assert_eq!(again["recipients"], 2, "{again}");
    assert_eq!(again["duplicate"], true, "{again}");

    // A list: alice live, carol stored until she logs in.
    let (code, answer) = broadcast(
        &server,
        json!({"to": [alice.clone(), carol.clone()], "payload": "<cmd xmlns='urn:x:cmd'/>", "id": "bc-list"}),
    )
    .await;
    assert_eq!(code, 202, "{answer}");
    assert_eq!(answer["recipients"], 2, "{answer}");
    let got = clients[0]
        .wait_for(STEP, |e| e.starts_with("<message"))
        .await
        .expect("alice gets the list broadcast");
    assert_eq!(attr(&got, "id").as_deref(), Some("bc-list"), "{got}");
    let status = wait_push_status(&server, "bc-list", |v| {
        v["results"].as_array().is_some_and(|r| r.len() == 2)
    })
    .await;
    assert_eq!(state_of(&status, &alice).as_deref(), Some("delivered"));
    assert_eq!(state_of(&status, &carol).as_deref(), Some("queued"));

    let mut c = server.login_device(&carol, "tablet").await;
    c.send("<presence/>").await.expect("presence");
    let got = c
        .wait_for(STEP, |e| e.starts_with("<message"))
        .await
        .expect("carol gets the stored broadcast at login");
    assert_eq!(attr(&got, "id").as_deref(), Some("bc-list"), "{got}");
    assert!(got.contains("<cmd xmlns='urn:x:cmd'/>"), "{got}");
    wait_push_status(&server, "bc-list", |v| {
        state_of(v, &carol).as_deref() == Some("delivered")
    })
    .await;

    // Refused like a push.
    let r = http()
        .post(format!("http://{}/api/v1/broadcast", server.http_addr))
        .bearer_auth(API_KEY)
        .header("content-type", "application/json")
        .body("{\"to\": \"all\", ")
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 400);
    let (code, answer) = broadcast(&server, json!({"to": "all"})).await;
    assert_eq!(code, 422, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap_or_default()
            .contains("body"),
        "{answer}"
    );

    let metrics = metrics_text(&server).await;
    assert!(metrics.contains("tern_broadcasts_total"), "{metrics}");
    server.assert_alive().await;
}

async fn metrics_text(server: &TestServer) -> String {
    let r = http()
        .get(format!("http://{}/metrics", server.http_addr))
        .bearer_auth(API_KEY)
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(r.status(), 200);
    r.text().await.expect("metrics")
}

#[tokio::test]
async fn rate_limit_answers_429_and_spares_health() {
    let server = TestServer::start("[http]\nrate_limit_per_sec = 1\nrate_limit_burst = 2\n");
    let url = format!("http://{}/api/v1/sessions", server.http_addr);
    for _ in 0..2 {
        let r = http()
            .get(&url)
            .bearer_auth(API_KEY)
            .send()
            .await
            .expect("GET");
        assert_eq!(r.status(), 200);
    }
    let r = http()
        .get(&url)
        .bearer_auth(API_KEY)
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), 429);
    let retry: u64 = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Retry-After in seconds");
    assert!(retry >= 1, "{retry}");
    let body: Value = r.json().await.expect("JSON error");
    let msg = body["error"].as_str().unwrap_or_default();
    assert!(msg.starts_with("rate limit"), "{msg}");
    assert!(msg.contains("http.rate_limit_per_sec"), "{msg}");
    for _ in 0..5 {
        let r = http()
            .get(format!("http://{}/healthz", server.http_addr))
            .send()
            .await
            .expect("GET /healthz");
        assert_eq!(r.status(), 200);
    }
    // The refill lets the client back in (1 per second); the hits are counted.
    let deadline = tokio::time::Instant::now() + STEP;
    let text = loop {
        let r = http()
            .get(format!("http://{}/metrics", server.http_addr))
            .bearer_auth(API_KEY)
            .send()
            .await
            .expect("GET /metrics");
        if r.status() == 200 {
            break r.text().await.expect("metrics");
        }
        assert_eq!(r.status(), 429);
        assert!(tokio::time::Instant::now() < deadline, "never let back in");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        text.lines()
            .any(|l| l.starts_with("tern_limit_hits_total{limit=\"http_rate\"}")),
        "{text}"
    );
}

#[tokio::test]
async fn session_api_shows_last_activity() {
    let server = TestServer::start("");
    let bare = format!("active@{DOMAIN}");
    let mut c = server.login_device(&bare, "r1").await;
    let (code, s) = get_json(&server, &format!("/api/v1/sessions/{bare}")).await;
    assert_eq!(code, 200, "{s}");
    let first = s["resources"][0]["last_activity"]
        .as_str()
        .unwrap_or_else(|| panic!("no last_activity: {s}"))
        .to_string();
    let since = s["resources"][0]["connected_since"]
        .as_str()
        .unwrap_or_default();
    assert!(first.as_str() >= since, "{first} < {since}: {s}");
    assert!(s["resources"][0]["remote_addr"].is_string(), "{s}");
    // The stamp has second precision: keep the client busy until it moves (bounded).
    let deadline = tokio::time::Instant::now() + STEP;
    let mut n = 0;
    loop {
        n += 1;
        c.ping_server(&format!("act-{n}")).await;
        let (_, s) = get_json(&server, &format!("/api/v1/sessions/{bare}")).await;
        let now = s["resources"][0]["last_activity"]
            .as_str()
            .unwrap_or_default();
        if now > first.as_str() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "last_activity never moved from {first}: {s}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, list) = get_json(&server, "/api/v1/sessions").await;
    assert!(
        list["sessions"][0]["resources"][0]["last_activity"].is_string(),
        "{list}"
    );
}

//! The durable offline queue through a real `tern serve`: pushes to an offline endpoint are answered
//! `queued` and delivered in order, intact, when it comes online; they survive `kill -9`; the
//! per-endpoint cap answers `queue full`; an expired push is never delivered and shows `expired`.

mod common;

use std::time::Duration;

use common::{API_KEY, DOMAIN, STEP, TestServer, attr, element_name, inner_text};
use serde_json::{Value, json};

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

async fn push(server: &TestServer, req: Value) -> (u16, Value) {
    let r = http()
        .post(format!("http://{}/api/v1/push", server.http_addr))
        .bearer_auth(API_KEY)
        .json(&req)
        .send()
        .await
        .expect("POST /api/v1/push");
    let status = r.status().as_u16();
    (status, r.json().await.expect("JSON answer"))
}

/// Push and assert the single recipient's status.
async fn push_expect(server: &TestServer, req: Value, status: &str) -> Value {
    let (code, body) = push(server, req).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["results"][0]["status"], status, "{body}");
    body
}

async fn push_status(server: &TestServer, id: &str) -> (u16, Value) {
    let r = http()
        .get(format!("http://{}/api/v1/push/{id}", server.http_addr))
        .bearer_auth(API_KEY)
        .send()
        .await
        .expect("GET /api/v1/push/{id}");
    let status = r.status().as_u16();
    (status, r.json().await.expect("JSON answer"))
}

/// Polls the push status until its first recipient has `want` (bounded by [`STEP`]).
async fn wait_status(server: &TestServer, id: &str, want: &str) -> Value {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let (code, body) = push_status(server, id).await;
        if code == 200 && body["results"][0]["status"] == want {
            return body;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("push {id} never became {want}: {code} {body}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const PAYLOAD: &str = "<cmd xmlns='urn:x:cmd' op='reboot'><arg n='1'>now &amp; then</arg></cmd>";

/// Three pushes for `bare` (the last one body-less), all answered `queued`.
async fn queue_three(server: &TestServer, bare: &str, prefix: &str) {
    push_expect(
        server,
        json!({"to": bare, "body": "first", "id": format!("{prefix}-1")}),
        "queued",
    )
    .await;
    push_expect(
        server,
        json!({"to": bare, "body": "second <&>", "type": "chat", "id": format!("{prefix}-2")}),
        "queued",
    )
    .await;
    push_expect(
        server,
        json!({"to": bare, "payload": PAYLOAD, "id": format!("{prefix}-3")}),
        "queued",
    )
    .await;
}

/// Logs in, sends initial presence and returns the first `n` messages received.
async fn login_and_receive(server: &TestServer, bare: &str, n: usize) -> Vec<String> {
    let mut c = server.login_device(bare, "phone").await;
    c.send("<presence/>").await.expect("presence");
    let mut got = Vec::new();
    while got.len() < n {
        let m = c
            .wait_for(STEP, |e| element_name(e) == "message")
            .await
            .unwrap_or_else(|e| panic!("message {} of {n} not received: {e}", got.len() + 1));
        got.push(m);
    }
    got
}

fn assert_three(got: &[String], bare: &str, prefix: &str) {
    let ids: Vec<_> = got
        .iter()
        .map(|m| attr(m, "id").unwrap_or_default())
        .collect();
    assert_eq!(
        ids,
        [1, 2, 3].map(|i| format!("{prefix}-{i}")),
        "order: {got:?}"
    );
    for m in got {
        assert_eq!(attr(m, "to").as_deref(), Some(bare), "{m}");
        assert_eq!(attr(m, "from").as_deref(), Some(DOMAIN), "{m}");
    }
    assert_eq!(inner_text(&got[0], "body").as_deref(), Some("first"));
    assert_eq!(inner_text(&got[1], "body").as_deref(), Some("second <&>"));
    assert_eq!(attr(&got[1], "type").as_deref(), Some("chat"));
    assert!(!got[2].contains("<body"), "{}", got[2]);
    assert!(got[2].contains(PAYLOAD), "payload changed: {}", got[2]);
}

#[tokio::test]
async fn offline_pushes_are_delivered_in_order_on_login() {
    let server = TestServer::start("");
    let bare = format!("offline-a@{DOMAIN}");
    queue_three(&server, &bare, "a").await;
    let (code, st) = push_status(&server, "a-1").await;
    assert_eq!(code, 200, "{st}");
    assert_eq!(st["id"], "a-1");
    assert_eq!(st["results"][0]["to"], bare.as_str());
    assert_eq!(st["results"][0]["status"], "queued");
    let (code, _) = push_status(&server, "no-such-push").await;
    assert_eq!(code, 404);

    // A body-less message through the Tigase-compatible path is queued too, behind the others.
    let r = http()
        .post(format!(
            "http://{}/rest/stream/?api-key={API_KEY}",
            server.http_addr
        ))
        .header("content-type", "application/xml")
        .body(format!(
            "<message to='{bare}' id='rest-4'><cmd xmlns='urn:x:cmd' op='ping'/></message>"
        ))
        .send()
        .await
        .expect("POST /rest/stream");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-tern-delivery"], "queued");

    let got = login_and_receive(&server, &bare, 4).await;
    assert_three(&got[..3], &bare, "a");
    assert_eq!(attr(&got[3], "id").as_deref(), Some("rest-4"), "{}", got[3]);
    assert!(got[3].contains("<cmd xmlns='urn:x:cmd' op='ping'/>"));

    for i in 1..=3 {
        wait_status(&server, &format!("a-{i}"), "delivered").await;
    }
    // A repeated id is not stored again: it answers the current state.
    push_expect(
        &server,
        json!({"to": format!("offline-b@{DOMAIN}"), "body": "x", "id": "dup"}),
        "queued",
    )
    .await;
    push_expect(
        &server,
        json!({"to": format!("offline-b@{DOMAIN}"), "body": "x", "id": "dup"}),
        "queued",
    )
    .await;
}

#[tokio::test]
async fn queued_pushes_survive_kill_9() {
    let mut server = TestServer::start("");
    let bare = format!("crash@{DOMAIN}");
    queue_three(&server, &bare, "k").await;
    server.kill9();
    server.restart();
    let got = login_and_receive(&server, &bare, 3).await;
    assert_three(&got, &bare, "k");
    wait_status(&server, "k-3", "delivered").await;
}

#[tokio::test]
async fn per_endpoint_cap_answers_queue_full() {
    let server = TestServer::start("[queue]\nmax_per_endpoint = 2\n");
    let bare = format!("capped@{DOMAIN}");
    for i in 1..=2 {
        push_expect(
            &server,
            json!({"to": bare, "body": format!("m{i}")}),
            "queued",
        )
        .await;
    }
    let body = push_expect(&server, json!({"to": bare, "body": "m3"}), "error").await;
    assert_eq!(body["results"][0]["error"], "queue full", "{body}");
    // Another endpoint is not affected.
    push_expect(
        &server,
        json!({"to": format!("other@{DOMAIN}"), "body": "m"}),
        "queued",
    )
    .await;
}

#[tokio::test]
async fn expired_pushes_are_not_delivered() {
    let server = TestServer::start(
        "[queue]\npurge_interval_secs = 1\ndefault_ttl_secs = 600\nmax_ttl_secs = 3600\n",
    );
    let bare = format!("late@{DOMAIN}");
    let (code, body) = push(&server, json!({"to": bare, "body": "x", "ttl_secs": 3601})).await;
    assert_eq!(code, 422, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or("")
            .contains("max_ttl_secs"),
        "{body}"
    );

    push_expect(
        &server,
        json!({"to": bare, "body": "too late", "ttl_secs": 1, "id": "ttl-1"}),
        "queued",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    wait_status(&server, "ttl-1", "expired").await;

    let mut c = server.login_device(&bare, "phone").await;
    c.send("<presence/>").await.expect("presence");
    c.send(&format!(
        "<iq type='get' id='after' to='{DOMAIN}'><ping xmlns='urn:xmpp:ping'/></iq>"
    ))
    .await
    .expect("ping");
    loop {
        let e = c.next_element(STEP).await.expect("element");
        assert_ne!(element_name(&e), "message", "expired push delivered: {e}");
        if element_name(&e) == "iq" && attr(&e, "id").as_deref() == Some("after") {
            break;
        }
    }
}

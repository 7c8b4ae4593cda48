//! XEP-0198 stream management through a real `tern serve` with a raw client: resumption after a
//! dropped TCP connection loses nothing (the unacknowledged push is resent, the one stored meanwhile
//! is replayed after it), a `<resume/>` takes over a stream the server still thinks is alive, and
//! when the resumption window runs out the unacknowledged pushes go back to the durable queue.

mod common;

use std::time::Duration;

use common::{
    API_KEY, DOMAIN, RawClient, STEP, TestServer, Transport, attr, element_name, inner_text,
};
use serde_json::{Value, json};

async fn push(server: &TestServer, to: &str, id: &str, body: &str) -> String {
    let r: Value = reqwest::Client::new()
        .post(format!("http://{}/api/v1/push", server.http_addr))
        .bearer_auth(API_KEY)
        .json(&json!({"to": to, "id": id, "body": body}))
        .send()
        .await
        .expect("POST /api/v1/push")
        .json()
        .await
        .expect("JSON answer");
    r["results"][0]["status"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

async fn get(server: &TestServer, path: &str) -> Value {
    reqwest::Client::new()
        .get(format!("http://{}{path}", server.http_addr))
        .bearer_auth(API_KEY)
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .unwrap_or_default()
}

/// Polls until `pred` holds for `GET path` (bounded by [`STEP`]).
async fn wait_json(server: &TestServer, path: &str, what: &str, pred: impl Fn(&Value) -> bool) {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let v = get(server, path).await;
        if pred(&v) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_status(server: &TestServer, id: &str, want: &str) {
    wait_json(
        server,
        &format!("/api/v1/push/{id}"),
        &format!("{id} → {want}"),
        |v| v["results"][0]["status"] == want,
    )
    .await;
}

async fn wait_offline(server: &TestServer, bare: &str) {
    wait_json(
        server,
        &format!("/api/v1/sessions/{bare}"),
        "still online",
        |v| v["online"] == false,
    )
    .await;
}

/// Device login + `<enable resume='true'/>` + initial presence; returns the client and its SM-ID.
async fn login_resumable(server: &TestServer, bare: &str) -> (RawClient, String) {
    let (c, id, _) = login_resumable_max(server, bare).await;
    (c, id)
}

/// [`login_resumable`], also returning the granted window (`max`).
async fn login_resumable_max(server: &TestServer, bare: &str) -> (RawClient, String, String) {
    let mut c = server.login_device(bare, "phone").await;
    c.send("<enable xmlns='urn:xmpp:sm:3' resume='true'/>")
        .await
        .expect("enable");
    let enabled = c
        .wait_for(STEP, |e| element_name(e) == "enabled")
        .await
        .expect("<enabled/>");
    assert_eq!(
        attr(&enabled, "resume").as_deref(),
        Some("true"),
        "{enabled}"
    );
    let id = attr(&enabled, "id").expect("SM-ID");
    c.send("<presence/>").await.expect("presence");
    c.wait_for(STEP, |e| element_name(e) == "presence")
        .await
        .expect("own presence");
    (c, id, attr(&enabled, "max").unwrap_or_default())
}

/// A new connection authenticated as `bare` (not bound); the features must offer XEP-0198.
async fn authenticated(server: &TestServer, bare: &str) -> RawClient {
    let (mut c, features) = server.connect(Transport::DirectTls).await;
    c.authenticate_plain(&features, bare, &server.device_password(bare))
        .await
        .expect("authenticate");
    c
}

async fn next_message(c: &mut RawClient) -> String {
    c.wait_for(STEP, |e| element_name(e) == "message")
        .await
        .expect("message")
}

#[tokio::test]
async fn resume_after_a_dropped_connection_loses_nothing() {
    let server = TestServer::start("");
    let bare = format!("sm-drop@{DOMAIN}");
    let (mut c, id, max) = login_resumable_max(&server, &bare).await;
    assert_eq!(max, "300", "the default window (sm.resume_window_secs)");
    assert_eq!(push(&server, &bare, "d-1", "one").await, "delivered");
    assert_eq!(
        inner_text(&next_message(&mut c).await, "body").as_deref(),
        Some("one")
    );
    // The client "loses" it: the connection drops before it could acknowledge anything. It had
    // handled one stanza: its own presence.
    drop(c);
    wait_offline(&server, &bare).await;
    assert_eq!(push(&server, &bare, "d-2", "two").await, "queued");

    let mut c = authenticated(&server, &bare).await;
    c.send(&format!(
        "<resume xmlns='urn:xmpp:sm:3' previd='{id}' h='1'/>"
    ))
    .await
    .expect("resume");
    let resumed = c.next_element(STEP).await.expect("answer to <resume/>");
    assert_eq!(element_name(&resumed), "resumed", "{resumed}");
    assert_eq!(attr(&resumed, "previd").as_deref(), Some(id.as_str()));
    assert_eq!(
        attr(&resumed, "h").as_deref(),
        Some("1"),
        "the server handled the presence"
    );
    // The unacknowledged push first (resent), then the one stored while away (replayed).
    let first = next_message(&mut c).await;
    let second = next_message(&mut c).await;
    assert_eq!(attr(&first, "id").as_deref(), Some("d-1"), "{first}");
    assert_eq!(attr(&second, "id").as_deref(), Some("d-2"), "{second}");
    wait_json(
        &server,
        &format!("/api/v1/sessions/{bare}"),
        "online again",
        |v| v["online"] == true && v["resources"][0]["resource"] == "phone",
    )
    .await;
    c.send("<a xmlns='urn:xmpp:sm:3' h='3'/>")
        .await
        .expect("ack");
    wait_status(&server, "d-1", "acked").await;
    wait_status(&server, "d-2", "acked").await;
    // Counting goes on over the resumed stream.
    c.send("<r xmlns='urn:xmpp:sm:3'/>").await.expect("r");
    let a = c
        .wait_for(STEP, |e| element_name(e) == "a")
        .await
        .expect("<a/>");
    assert_eq!(
        attr(&a, "h").as_deref(),
        Some("1"),
        "the presence before: {a}"
    );
    c.close().await;
}

#[tokio::test]
async fn resume_takes_over_a_stream_the_server_still_holds() {
    let server = TestServer::start("");
    let bare = format!("sm-takeover@{DOMAIN}");
    let (mut old, id) = login_resumable(&server, &bare).await;
    assert_eq!(push(&server, &bare, "t-1", "one").await, "delivered");
    next_message(&mut old).await;
    // The old connection is still open (as after a NAT timeout nobody noticed yet).
    let mut c = authenticated(&server, &bare).await;
    c.send(&format!(
        "<resume xmlns='urn:xmpp:sm:3' previd='{id}' h='0'/>"
    ))
    .await
    .expect("resume");
    let resumed = c.next_element(STEP).await.expect("answer to <resume/>");
    assert_eq!(element_name(&resumed), "resumed", "{resumed}");
    assert_eq!(
        attr(&next_message(&mut c).await, "id").as_deref(),
        Some("t-1")
    );
    old.read_to_close(STEP)
        .await
        .expect("the old stream is closed");
    assert_eq!(push(&server, &bare, "t-2", "two").await, "delivered");
    assert_eq!(
        attr(&next_message(&mut c).await, "id").as_deref(),
        Some("t-2")
    );
}

#[tokio::test]
async fn bad_resumptions_fail_and_the_stream_can_still_bind() {
    let server = TestServer::start("");
    let bare = format!("sm-bad@{DOMAIN}");
    let (c, id) = login_resumable(&server, &bare).await;
    drop(c);
    wait_offline(&server, &bare).await;
    // Another account cannot resume it; an unknown id neither; h beyond what was sent is refused.
    let other = format!("sm-other@{DOMAIN}");
    let mut c = authenticated(&server, &other).await;
    c.send(&format!(
        "<resume xmlns='urn:xmpp:sm:3' previd='{id}' h='0'/>"
    ))
    .await
    .unwrap();
    let failed = c.next_element(STEP).await.unwrap();
    assert!(failed.contains("<item-not-found"), "{failed}");
    // After <failed/> the client binds normally on the same stream (XEP-0198 §5).
    c.bind_and_session("desk")
        .await
        .expect("bind after failed resumption");
    let mut c = authenticated(&server, &bare).await;
    c.send(&format!(
        "<resume xmlns='urn:xmpp:sm:3' previd='{id}' h='7'/>"
    ))
    .await
    .unwrap();
    let failed = c.next_element(STEP).await.unwrap();
    assert!(failed.contains("<handled-count-too-high"), "{failed}");
    c.send("<resume xmlns='urn:xmpp:sm:3' previd='00' h='0'/>")
        .await
        .unwrap();
    let failed = c.next_element(STEP).await.unwrap();
    assert!(failed.contains("<item-not-found"), "{failed}");
    // The real one is still there.
    c.send(&format!(
        "<resume xmlns='urn:xmpp:sm:3' previd='{id}' h='0'/>"
    ))
    .await
    .unwrap();
    let resumed = c.next_element(STEP).await.unwrap();
    assert_eq!(element_name(&resumed), "resumed", "{resumed}");
}

#[tokio::test]
async fn expired_window_puts_unacknowledged_pushes_back_in_the_queue() {
    let server = TestServer::start("[sm]\nresume_window_secs = 1\n");
    let bare = format!("sm-expire@{DOMAIN}");
    let (mut c, _, max) = login_resumable_max(&server, &bare).await;
    assert_eq!(max, "1");
    assert_eq!(push(&server, &bare, "x-1", "one").await, "delivered");
    next_message(&mut c).await;
    drop(c);
    // Window (1 s) over: the push is stored again, in the durable queue.
    wait_status(&server, "x-1", "queued").await;
    assert_eq!(push(&server, &bare, "x-2", "two").await, "queued");
    let mut c = server.login_device(&bare, "phone").await;
    c.send("<presence/>").await.unwrap();
    let first = next_message(&mut c).await;
    let second = next_message(&mut c).await;
    assert_eq!(
        attr(&first, "id").as_deref(),
        Some("x-1"),
        "requeued at the front: {first}"
    );
    assert_eq!(attr(&second, "id").as_deref(), Some("x-2"), "{second}");
    wait_status(&server, "x-1", "delivered").await;
}

#[tokio::test]
async fn acks_mark_pushes_acked_and_too_high_h_ends_the_stream() {
    let server = TestServer::start("");
    let bare = format!("sm-ack@{DOMAIN}");
    let (mut c, _) = login_resumable(&server, &bare).await;
    for i in 1..=5 {
        assert_eq!(
            push(&server, &bare, &format!("a-{i}"), "x").await,
            "delivered"
        );
    }
    // request_every = 5 (default): after own presence + 4 pushes the server asks for an ack.
    let mut seen: Vec<String> = Vec::new();
    while seen.iter().filter(|e| element_name(e) == "message").count() < 5 {
        seen.push(c.next_element(STEP).await.expect("element"));
    }
    let names: Vec<&str> = seen.iter().map(|e| element_name(e)).collect();
    assert_eq!(
        names,
        ["message", "message", "message", "message", "r", "message"]
    );
    c.send("<a xmlns='urn:xmpp:sm:3' h='4'/>").await.unwrap();
    wait_status(&server, "a-3", "acked").await;
    wait_status(&server, "a-5", "delivered").await;
    c.send("<a xmlns='urn:xmpp:sm:3' h='99'/>").await.unwrap();
    let err = c.read_to_close(STEP).await.unwrap();
    assert!(err.contains("<handled-count-too-high"), "{err}");
    // A broken protocol is not a broken connection: the rest goes back to the queue.
    wait_status(&server, "a-5", "queued").await;
}

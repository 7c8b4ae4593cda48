//! The HTTP API of a real `tern serve`, against clients logged in over XMPP: a push through the
//! Tigase-compatible `/rest/stream` and through `/api/v1/push` arrives intact, an iq through
//! `/rest/stream` returns the client's reply, and the session API sees the client.

mod common;

use std::time::Duration;

use common::{API_KEY, DOMAIN, STEP, TRICKY_BODY, TestServer, attr, escape, inner_text};

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

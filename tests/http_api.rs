//! The HTTP API in-process: a real `Router` with simulated sessions (handles whose queues the test
//! drains), `tern::http::serve` on an ephemeral port, and reqwest as the management server.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use jid::FullJid;
use reqwest::StatusCode;
use tern::config::HttpConfig;
use tern::http::{self, HttpState};
use tern::store::queue::{PushQueue, QueueConfig};
use tern::xmpp::framer::FramerLimits;
use tern::xmpp::router::{Kick, PushMeta, Router, SessionHandle};
use tokio_util::sync::CancellationToken;

const DOMAIN: &str = "example.com";
const KEY: &str = "0123456789abcdef0123456789abcdef";
/// Bound of one waiting step.
const STEP: Duration = Duration::from_secs(10);

struct Api {
    base: String,
    router: Arc<Router>,
    client: reqwest::Client,
    cancel: CancellationToken,
    queue: Option<PushQueue>,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for Api {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Api {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.get(self.url(path)).bearer_auth(KEY)
    }

    fn post_xml(&self, path: &str, xml: &str) -> reqwest::RequestBuilder {
        self.post_as(path, "application/xml", xml)
    }

    /// reqwest appends headers, so the content type is set exactly once here.
    fn post_as(&self, path: &str, content_type: &str, body: &str) -> reqwest::RequestBuilder {
        self.client
            .post(self.url(path))
            .bearer_auth(KEY)
            .header("content-type", content_type)
            .body(body.to_string())
    }

    fn push(&self, json: serde_json::Value) -> reqwest::RequestBuilder {
        self.client
            .post(self.url("/api/v1/push"))
            .bearer_auth(KEY)
            .json(&json)
    }

    fn broadcast(&self, json: serde_json::Value) -> reqwest::RequestBuilder {
        self.client
            .post(self.url("/api/v1/broadcast"))
            .bearer_auth(KEY)
            .json(&json)
    }

    /// Polls `GET /api/v1/push/{id}` until `done` accepts the answer (bounded).
    async fn wait_status(
        &self,
        id: &str,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            let resp = self
                .get(&format!("/api/v1/push/{id}"))
                .send()
                .await
                .unwrap();
            let status = resp.status();
            let v: serde_json::Value = resp.json().await.unwrap();
            if status == StatusCode::OK && done(&v) {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "push {id} status never complete: {status} {v}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A connected resource; with `available`, it has sent initial presence (priority 0).
    fn online(&self, full: &str, available: bool) -> Arc<SessionHandle> {
        let h = SessionHandle::new(16, "192.0.2.7:40000".parse().unwrap());
        let full = FullJid::new(full).unwrap();
        self.router.bind(&full, h.clone()).unwrap();
        if available {
            self.router
                .set_presence(&full, h.id, Some((0, Bytes::from_static(b"<presence/>"))));
        }
        h
    }
}

async fn start(tune: impl FnOnce(&mut HttpState)) -> Api {
    let router = Arc::new(Router::new());
    // Built like the server builds it, so every field has its configured default.
    let mut state = HttpState::from_config(
        router.clone(),
        DOMAIN,
        &HttpConfig::default(),
        vec![KEY.into()],
        FramerLimits::default(),
        None,
    )
    .unwrap();
    state.iq_timeout = Duration::from_secs(5);
    state.max_body = 64 * 1024;
    tune(&mut state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let cancel = CancellationToken::new();
    tokio::spawn(http::serve(listener, Arc::new(state), cancel.clone()));
    Api {
        base,
        router,
        client: reqwest::Client::new(),
        cancel,
        queue: None,
        _dir: None,
    }
}

/// [`start`] with a durable queue in a temporary directory.
async fn start_with_queue(tune: impl FnOnce(&mut HttpState)) -> Api {
    let dir = tempfile::tempdir().unwrap();
    let queue = PushQueue::open(&dir.path().join("queue.redb"), QueueConfig::default()).unwrap();
    let q = queue.clone();
    let mut api = start(move |s| {
        s.queue = Some(q);
        tune(s);
    })
    .await;
    api.queue = Some(queue);
    api._dir = Some(dir);
    api
}

fn drain(h: &SessionHandle) -> Vec<String> {
    drain_tagged(h).into_iter().map(|(s, _)| s).collect()
}

/// The session's queued stanzas with the push identity each was routed with.
fn drain_tagged(h: &SessionHandle) -> Vec<(String, Option<Arc<PushMeta>>)> {
    let mut out = Vec::new();
    h.drain(100, &mut out);
    out.into_iter()
        .map(|(b, m)| (String::from_utf8(b.to_vec()).unwrap(), m))
        .collect()
}

/// Waits (bounded) until the session has something queued, then drains it.
async fn wait_drain(h: &SessionHandle) -> Vec<(String, Option<Arc<PushMeta>>)> {
    tokio::time::timeout(STEP, h.ready())
        .await
        .expect("nothing arrived in time");
    drain_tagged(h)
}

/// `{recipient: (status, error)}` of a push status answer.
fn statuses(v: &serde_json::Value) -> BTreeMap<String, (String, Option<String>)> {
    v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["to"].as_str().unwrap().to_string(),
                (
                    r["status"].as_str().unwrap().to_string(),
                    r["error"].as_str().map(str::to_string),
                ),
            )
        })
        .collect()
}

/// The value of `attr` in the start tag of `xml` (either quote style).
fn attr(xml: &str, attr: &str) -> Option<String> {
    let tag_end = xml.find('>')?;
    let tag = &xml[..tag_end];
    for q in ['\'', '"'] {
        let pat = format!(" {attr}={q}");
        if let Some(i) = tag.find(&pat) {
            let rest = &tag[i + pat.len()..];
            return rest.find(q).map(|j| rest[..j].to_string());
        }
    }
    None
}

async fn error_of(resp: reqwest::Response) -> (StatusCode, String) {
    let status = resp.status();
    let v: serde_json::Value = resp.json().await.unwrap();
    (status, v["error"].as_str().unwrap().to_string())
}

#[tokio::test]
async fn every_key_spelling_works_and_401_differs_from_403() {
    let api = start(|_| {}).await;
    let path = "/api/v1/openapi.json";
    let ok = [
        api.client.get(api.url(path)).bearer_auth(KEY),
        api.client.get(api.url(path)).header("X-Api-Key", KEY),
        api.client.get(api.url(path)).header("Api-Key", KEY),
        api.client.get(api.url(&format!("{path}?api-key={KEY}"))),
        // Tigase clients send admin Basic credentials next to the key: ignored.
        api.client
            .get(api.url(path))
            .basic_auth("admin", Some("secret"))
            .header("X-Api-Key", KEY),
    ];
    for req in ok {
        assert_eq!(req.send().await.unwrap().status(), StatusCode::OK);
    }

    let resp = api.client.get(api.url(path)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    let resp = api
        .client
        .get(api.url(path))
        .basic_auth("admin", Some("secret"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::UNAUTHORIZED,
        "Basic alone is no key"
    );
    let resp = api
        .client
        .get(api.url(path))
        .bearer_auth("0123456789abcdef0123456789abcdeX")
        .send()
        .await
        .unwrap();
    let (status, msg) = error_of(resp).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(
        !msg.contains("0123456789"),
        "the key is never echoed: {msg}"
    );

    // Health needs no key.
    let resp = api.client.get(api.url("/healthz")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.text().await.unwrap(), "ok");
    let resp = api.client.get(api.url("/readyz")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // Metrics needs a key, and is 404 without a Prometheus handle.
    let resp = api.client.get(api.url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        api.get("/metrics").send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn allow_list_refuses_other_networks() {
    let api = start(|s| s.allow = vec!["10.0.0.0/8".parse().unwrap()]).await;
    let (status, msg) = error_of(api.get("/api/v1/openapi.json").send().await.unwrap()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(msg.contains("allow_networks"), "{msg}");
    let resp = api.client.get(api.url("/healthz")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);

    let api = start(|s| s.allow = vec!["127.0.0.0/8".parse().unwrap()]).await;
    let resp = api.get("/api/v1/openapi.json").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test]
async fn rest_stream_message_arrives_intact_with_from_filled() {
    let api = start(|_| {}).await;
    let h = api.online("dev@example.com/phone", true);
    let xml = "<?xml version='1.0'?><message to='dev@example.com' id='m1'>\
               <body>caf\u{e9} &amp; &lt;ok&gt; \u{1F680}</body><cmd xmlns='urn:x'/></message>";
    let resp = api.post_xml("/rest/stream/", xml).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-tern-delivery"], "delivered");
    assert_eq!(resp.text().await.unwrap(), "");
    let got = drain(&h);
    assert_eq!(got.len(), 1);
    assert_eq!(attr(&got[0], "from").as_deref(), Some(DOMAIN));
    assert_eq!(attr(&got[0], "to").as_deref(), Some("dev@example.com"));
    assert!(got[0].ends_with(
        "<body>caf\u{e9} &amp; &lt;ok&gt; \u{1F680}</body><cmd xmlns='urn:x'/></message>"
    ));

    // `to` from the path (a full JID, slash included); `from` of the domain is kept.
    let resp = api
        .post_as(
            "/rest/stream/dev@example.com/phone",
            "text/xml; charset=utf-8",
            "<message from='ops@example.com'><body>2</body></message>",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let got = drain(&h);
    assert_eq!(
        attr(&got[0], "to").as_deref(),
        Some("dev@example.com/phone")
    );
    assert_eq!(attr(&got[0], "from").as_deref(), Some("ops@example.com"));

    // Offline: still 200, like Tigase.
    let resp = api
        .post_xml(
            "/rest/stream/nobody@example.com",
            "<message><body>x</body></message>",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-tern-delivery"], "offline");
}

#[tokio::test]
async fn rest_stream_refuses_bad_requests() {
    let api = start(|s| s.max_body = 2048).await;
    let cases = [
        ("", StatusCode::BAD_REQUEST, "empty"),
        ("   ", StatusCode::BAD_REQUEST, "empty"),
        (
            "<message to='a@example.com'>",
            StatusCode::BAD_REQUEST,
            "incomplete",
        ),
        (
            "<message to='a@example.com'><!--x--></message>",
            StatusCode::BAD_REQUEST,
            "restricted",
        ),
        (
            "<message to='a@example.com'/><message/>",
            StatusCode::BAD_REQUEST,
            "exactly one",
        ),
        (
            "<foo to='a@example.com'/>",
            StatusCode::BAD_REQUEST,
            "not a stanza",
        ),
        ("<message/>", StatusCode::BAD_REQUEST, "no recipient"),
        (
            "<message to='a@other.org'/>",
            StatusCode::BAD_REQUEST,
            "unknown domain",
        ),
        (
            "<message to='a@@example.com'/>",
            StatusCode::BAD_REQUEST,
            "invalid JID",
        ),
        (
            "<message to='a@example.com' from='x@evil.org'/>",
            StatusCode::FORBIDDEN,
            "domain",
        ),
        (
            "<iq to='a@example.com/r' from='x@example.com' type='get' id='1'/>",
            StatusCode::FORBIDDEN,
            "service JID",
        ),
        (
            "<iq to='a@example.com/r' id='1'/>",
            StatusCode::BAD_REQUEST,
            "type",
        ),
    ];
    for (body, status, needle) in cases {
        let resp = api.post_xml("/rest/stream/", body).send().await.unwrap();
        assert_eq!(resp.status(), status, "{body}");
        let text = resp.text().await.unwrap();
        assert!(text.contains(needle), "{body}: {text}");
    }
    let resp = api
        .post_as("/rest/stream/", "application/json", "<message/>")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let big = format!(
        "<message to='a@example.com'><body>{}</body></message>",
        "x".repeat(3000)
    );
    let resp = api.post_xml("/rest/stream/", &big).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn rest_stream_iq_returns_the_endpoints_reply() {
    let api = start(|_| {}).await;
    let h = api.online("dev@example.com/phone", true);
    let req = api
        .post_xml(
            "/rest/stream/",
            "<iq type='get' id='client-1' to='dev@example.com/phone'><ping xmlns='urn:xmpp:ping'/></iq>",
        )
        .send();
    let endpoint = {
        let h = h.clone();
        let router = api.router.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(5), h.ready())
                .await
                .unwrap();
            let sent = drain(&h).remove(0);
            assert_eq!(attr(&sent, "from").as_deref(), Some(DOMAIN));
            let id = attr(&sent, "id").unwrap();
            assert!(
                id.starts_with("tern-http-") && id.len() > 40,
                "unguessable: {id}"
            );
            // What the c2s session hands over: the reply stamped with the replier's full JID.
            let reply = format!(
                "<iq type='result' id='{id}' to='example.com' from='dev@example.com/phone'><pong xmlns='urn:x'/></iq>"
            );
            assert!(router.complete_iq(&id, Bytes::from(reply)));
        }
    };
    let (resp, ()) = tokio::join!(req, endpoint);
    let resp = resp.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/xml")
    );
    let body = resp.text().await.unwrap();
    assert_eq!(attr(&body, "id").as_deref(), Some("client-1"), "{body}");
    assert_eq!(attr(&body, "type").as_deref(), Some("result"));
    assert_eq!(
        attr(&body, "from").as_deref(),
        Some("dev@example.com/phone")
    );
    assert!(body.contains("<pong xmlns='urn:x'/>"), "{body}");
}

#[tokio::test]
async fn rest_stream_iq_timeout_and_offline_give_error_stanzas() {
    let api = start(|s| s.iq_timeout = Duration::from_secs(1)).await;
    let _h = api.online("dev@example.com/phone", true);
    let started = std::time::Instant::now();
    let resp = api
        .post_xml(
            "/rest/stream/dev@example.com/phone",
            "<iq type='set' id='c2'><cmd xmlns='urn:x'/></iq>",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.text().await.unwrap();
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(attr(&body, "type").as_deref(), Some("error"));
    assert_eq!(attr(&body, "id").as_deref(), Some("c2"));
    assert!(
        body.contains("<error type='wait'><remote-server-timeout"),
        "{body}"
    );

    let resp = api
        .post_xml(
            "/rest/stream/",
            "<iq type='get' id='c3' to='gone@example.com/x'><ping xmlns='urn:xmpp:ping'/></iq>",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.text().await.unwrap();
    assert!(
        body.contains("<error type='cancel'><service-unavailable"),
        "{body}"
    );
    assert_eq!(attr(&body, "from").as_deref(), Some("gone@example.com/x"));
}

#[tokio::test]
async fn push_reports_each_recipient() {
    let api = start(|_| {}).await;
    let a = api.online("a@example.com/r", true);
    let b1 = api.online("b@example.com/1", true);
    let b2 = api.online("b@example.com/2", true);
    let body = "<\u{fc}ber> & \"quotes\" 'apos' \u{1F680}";
    let resp = api
        .push(serde_json::json!({
            "to": ["a@example.com", "b@example.com", "off@example.com", "a@@x", "a@other.org", "example.com"],
            "body": body,
            "payload": "<cmd xmlns='urn:x:cmd' n='1'>a &amp; b \u{e9}</cmd>",
            "type": "headline",
            "id": "push-<1>",
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["id"], "push-<1>");
    let r = v["results"].as_array().unwrap();
    let summary: Vec<(&str, &str, Option<&str>)> = r
        .iter()
        .map(|x| {
            (
                x["to"].as_str().unwrap(),
                x["status"].as_str().unwrap(),
                x["error"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("a@example.com", "delivered", None),
            ("b@example.com", "delivered", None),
            ("off@example.com", "error", Some("offline")),
            ("a@@x", "error", Some("invalid JID")),
            ("a@other.org", "error", Some("unknown domain")),
            ("example.com", "error", Some("invalid JID")),
        ]
    );
    let got = drain(&a);
    assert_eq!(got.len(), 1);
    let m = &got[0];
    assert_eq!(attr(m, "from").as_deref(), Some(DOMAIN));
    assert_eq!(attr(m, "to").as_deref(), Some("a@example.com"));
    assert_eq!(attr(m, "type").as_deref(), Some("headline"));
    assert_eq!(attr(m, "id").as_deref(), Some("push-&lt;1&gt;"));
    assert!(
        m.ends_with(
            "<body>&lt;\u{fc}ber&gt; &amp; &quot;quotes&quot; &apos;apos&apos; \u{1F680}</body>\
             <cmd xmlns='urn:x:cmd' n='1'>a &amp; b \u{e9}</cmd></message>"
        ),
        "{m}"
    );
    // Headline to a bare JID: every available resource.
    assert_eq!(drain(&b1).len(), 1);
    assert_eq!(drain(&b2).len(), 1);

    // A single recipient as a string; a generated id; payload only.
    let resp = api
        .push(serde_json::json!({"to": "a@example.com/r", "payload": "<x xmlns='urn:y'/>"}))
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["results"][0]["status"], "delivered");
    assert!(v["id"].as_str().unwrap().len() >= 32);
    let got = drain(&a);
    assert!(
        got[0].ends_with("><x xmlns='urn:y'/></message>"),
        "{}",
        got[0]
    );
    assert_eq!(attr(&got[0], "type").as_deref(), Some("normal"));
}

#[tokio::test]
async fn push_rejects_bad_requests_precisely() {
    let api = start(|s| s.max_body = 2048).await;
    let resp = api
        .post_as("/api/v1/push", "text/plain", "{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let resp = api
        .post_as("/api/v1/push", "application/json", "{\"to\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(resp).await.0, StatusCode::BAD_REQUEST);

    let cases = [
        (
            serde_json::json!({"body": "x"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "missing field `to`",
        ),
        (
            serde_json::json!({"to": [], "body": "x"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "at least one",
        ),
        (
            serde_json::json!({"to": "a@example.com"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "body",
        ),
        (
            serde_json::json!({"to": "a@example.com", "body": "x", "type": "groupchat"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "type",
        ),
        (
            serde_json::json!({"to": "a@example.com", "body": "x", "ttl_secs": 0}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "ttl_secs",
        ),
        (
            serde_json::json!({"to": "a@example.com", "body": "x", "id": ""}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "id",
        ),
        (
            serde_json::json!({"to": "a@example.com", "payload": "<a>"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "incomplete",
        ),
        (
            serde_json::json!({"to": "a@example.com", "payload": "<!-- c --><a/>"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "restricted",
        ),
        // A payload that tries to close the message and smuggle a second stanza.
        (
            serde_json::json!({"to": "a@example.com", "payload": "</message><iq type='set'/><message>"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "payload",
        ),
        (
            serde_json::json!({"to": "a@example.com", "body": "bell \u{7}"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "body",
        ),
        (
            serde_json::json!({"to": "a@example.com", "body": "x".repeat(3000)}),
            StatusCode::PAYLOAD_TOO_LARGE,
            "max_body_bytes",
        ),
    ];
    for (json, status, needle) in cases {
        let (got, msg) = error_of(api.push(json.clone()).send().await.unwrap()).await;
        assert_eq!(got, status, "{json}: {msg}");
        assert!(msg.contains(needle), "{json}: {msg}");
    }
}

#[tokio::test]
async fn sessions_show_and_disconnect() {
    let api = start(|_| {}).await;
    let h1 = api.online("dev@example.com/phone", true);
    let h2 = api.online("dev@example.com/tablet", false);

    let resp = api
        .get("/api/v1/sessions/dev@example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["jid"], "dev@example.com");
    assert_eq!(v["online"], true);
    let rs = v["resources"].as_array().unwrap();
    assert_eq!(rs.len(), 2);
    assert_eq!(rs[0]["resource"], "phone");
    assert_eq!(rs[0]["remote_addr"], "192.0.2.7:40000");
    assert_eq!(rs[0]["available"], true);
    assert_eq!(rs[1]["available"], false);
    let since = rs[0]["connected_since"].as_str().unwrap();
    assert_eq!(since.len(), 20, "{since}");
    assert!(since.starts_with("20") && since.ends_with('Z') && since.as_bytes()[10] == b'T');
    let active = rs[0]["last_activity"].as_str().unwrap();
    assert_eq!(active.len(), 20, "{active}");
    assert!(active >= since, "{active} < {since}");
    // Activity moves it (a time far enough ahead to change the second-precision stamp).
    let later = SystemTime::now() + Duration::from_secs(3600);
    h1.touch(later);
    let v: serde_json::Value = api
        .get("/api/v1/sessions/dev@example.com/phone")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let moved = v["resources"][0]["last_activity"].as_str().unwrap();
    assert_eq!(moved, http::rfc3339(later), "{v}");
    assert_eq!(v["resources"][1]["last_activity"], active, "{v}");

    let v: serde_json::Value = api
        .get("/api/v1/sessions/nobody@example.com")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["online"], false);
    assert_eq!(v["resources"].as_array().unwrap().len(), 0);
    let (status, _) = error_of(api.get("/api/v1/sessions/a@@b").send().await.unwrap()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = error_of(
        api.get("/api/v1/sessions/a@other.org")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let del = |p: &str| {
        api.client
            .delete(api.url(&format!("/api/v1/sessions/{p}")))
            .bearer_auth(KEY)
            .send()
    };
    assert_eq!(
        del("dev@example.com/tablet").await.unwrap().status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(h2.kick_reason(), Some(Kick::Disconnect));
    assert_eq!(h1.kick_reason(), None, "a full JID kicks one resource");
    assert_eq!(
        del("dev@example.com").await.unwrap().status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(h1.kick_reason(), Some(Kick::Disconnect));
    let (status, _) = error_of(del("nobody@example.com").await.unwrap()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // The paged list (the kicked sessions are still registered until their tasks end).
    let v: serde_json::Value = api
        .get("/api/v1/sessions?offset=0&limit=10")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["total"], 1, "{v}");
    assert_eq!(v["sessions"][0]["jid"], "dev@example.com", "{v}");
    assert_eq!(
        v["sessions"][0]["resources"].as_array().unwrap().len(),
        2,
        "{v}"
    );
    let resp = api.get("/api/v1/sessions?limit=x").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn openapi_document_describes_the_routes() {
    let api = start(|_| {}).await;
    let resp = api.get("/api/v1/openapi.json").send().await.unwrap();
    assert_eq!(resp.headers()["content-type"], "application/json");
    let v: serde_json::Value = resp.json().await.unwrap();
    assert!(v["openapi"].as_str().unwrap().starts_with("3."));
    for p in [
        "/api/v1/push",
        "/api/v1/broadcast",
        "/api/v1/push/{id}",
        "/api/v1/sessions",
        "/api/v1/sessions/{jid}",
        "/rest/stream/",
        "/healthz",
    ] {
        assert!(v["paths"].get(p).is_some(), "{p}");
    }
    assert!(
        v["paths"]["/api/v1/broadcast"]["post"]["responses"]
            .get("202")
            .is_some()
    );
    assert!(
        v["paths"]["/api/v1/push"]["post"]["responses"]
            .get("429")
            .is_some()
    );
    assert!(
        v["components"]["schemas"]["Resource"]["properties"]
            .get("last_activity")
            .is_some()
    );
    let (status, _) = error_of(api.get("/nope").send().await.unwrap()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn shutdown_stops_serving() {
    let api = start(|_| {}).await;
    assert_eq!(
        api.client
            .get(api.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    api.cancel.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let fresh = reqwest::Client::new();
    assert!(fresh.get(api.url("/healthz")).send().await.is_err());
}

#[tokio::test]
async fn pushes_are_tagged_with_their_push_identity() {
    let api = start_with_queue(|_| {}).await;
    let a = api.online("a@example.com/r", true);
    let resp = api
        .push(
            serde_json::json!({"to": "a@example.com", "body": "x", "id": "tag-1", "ttl_secs": 60}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let got = drain_tagged(&a);
    assert_eq!(got.len(), 1);
    let meta = got[0].1.as_ref().expect("a push carries its identity");
    assert_eq!(meta.push_id, "tag-1");
    assert_eq!(
        meta.expires_at.duration_since(meta.created).unwrap(),
        Duration::from_secs(60)
    );

    // /rest/stream: messages are pushes with a fresh id and the default TTL; presence is not.
    let resp = api
        .post_xml(
            "/rest/stream/",
            "<message to='a@example.com'><body>m</body></message>",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-tern-delivery"], "delivered");
    let resp = api
        .post_xml("/rest/stream/", "<presence to='a@example.com'/>")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let got = drain_tagged(&a);
    assert_eq!(got.len(), 2, "{got:?}");
    let meta = got[0]
        .1
        .as_ref()
        .expect("a message carries a push identity");
    assert!(uuid_like(&meta.push_id), "{}", meta.push_id);
    assert_eq!(
        meta.expires_at.duration_since(meta.created).unwrap(),
        Duration::from_secs(86_400)
    );
    assert!(got[1].0.starts_with("<presence"), "{}", got[1].0);
    assert!(got[1].1.is_none(), "presence is no push");
}

fn uuid_like(s: &str) -> bool {
    s.len() == 36 && s.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}

#[tokio::test]
async fn storing_a_push_asks_available_sessions_to_read_the_queue_again() {
    let api = start_with_queue(|_| {}).await;
    // Available, but with a negative priority: a headline to the bare JID reaches nobody live
    // (RFC 6121 §8.5.2.1.1) and is stored, while the session counts as available for a replay —
    // the same position as a session that became available just after the live attempt.
    let h = SessionHandle::new(16, "192.0.2.7:40000".parse().unwrap());
    let full = FullJid::new("neg@example.com/r").unwrap();
    api.router.bind(&full, h.clone()).unwrap();
    api.router
        .set_presence(&full, h.id, Some((-1, Bytes::from_static(b"<presence/>"))));
    assert!(!h.take_replay_request());
    let v: serde_json::Value = api
        .push(serde_json::json!({"to": "neg@example.com", "body": "x", "type": "headline"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["results"][0]["status"], "queued", "{v}");
    assert!(h.take_replay_request(), "the session was asked to replay");
    assert!(drain(&h).is_empty());
    let queue = api.queue.as_ref().unwrap();
    assert_eq!(queue.depth("neg@example.com").unwrap(), 1);
}

#[tokio::test]
async fn broadcast_to_all_reaches_every_online_account_once() {
    let api = start_with_queue(|_| {}).await;
    let a = api.online("a@example.com/r", true);
    let b1 = api.online("b@example.com/1", true);
    let b2 = api.online("b@example.com/2", true);
    let resp = api
        .broadcast(serde_json::json!({"to": "all", "body": "maintenance at 22:00", "id": "bc-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v, serde_json::json!({"id": "bc-1", "recipients": 2}));

    let got = wait_drain(&a).await;
    assert_eq!(got.len(), 1, "{got:?}");
    let (m, meta) = &got[0];
    assert_eq!(attr(m, "to").as_deref(), Some("a@example.com"));
    assert_eq!(attr(m, "from").as_deref(), Some(DOMAIN));
    assert_eq!(attr(m, "id").as_deref(), Some("bc-1"));
    assert!(m.contains("<body>maintenance at 22:00</body>"), "{m}");
    assert_eq!(meta.as_ref().unwrap().push_id, "bc-1");
    // A normal message to a bare JID goes to the best resource(s): equal priorities, both.
    let b = wait_drain(&b1).await.len() + wait_drain(&b2).await.len();
    assert_eq!(b, 2);

    let v = api
        .wait_status("bc-1", |v| {
            v["results"].as_array().is_some_and(|r| r.len() == 2)
        })
        .await;
    let want: BTreeMap<String, (String, Option<String>)> = [
        ("a@example.com".to_string(), ("delivered".to_string(), None)),
        ("b@example.com".to_string(), ("delivered".to_string(), None)),
    ]
    .into();
    assert_eq!(statuses(&v), want, "{v}");

    // The same id again: the first answer, nothing sent again.
    let resp = api
        .broadcast(serde_json::json!({"to": "all", "body": "maintenance at 22:00", "id": "bc-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        v,
        serde_json::json!({"id": "bc-1", "recipients": 2, "duplicate": true})
    );
    // A later broadcast is the next thing `a` sees.
    let v: serde_json::Value = api
        .broadcast(serde_json::json!({"to": "all", "payload": "<ping xmlns='urn:x'/>", "type": "headline"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id2 = v["id"].as_str().unwrap().to_string();
    assert!(uuid_like(&id2), "{v}");
    let got = wait_drain(&a).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(attr(&got[0].0, "id").as_deref(), Some(id2.as_str()));
    assert_eq!(attr(&got[0].0, "type").as_deref(), Some("headline"));
    let queue = api.queue.as_ref().unwrap();
    assert_eq!(
        queue.total_depth(),
        0,
        "everyone was online: nothing stored"
    );
}

#[tokio::test]
async fn broadcast_all_without_a_queue_and_with_nobody_online() {
    let api = start(|_| {}).await;
    let v: serde_json::Value = api
        .broadcast(serde_json::json!({"to": "all", "body": "x"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["recipients"], 0, "{v}");
    // Without a queue no status is kept.
    let id = v["id"].as_str().unwrap();
    let (status, _) = error_of(api.get(&format!("/api/v1/push/{id}")).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn broadcast_to_a_list_delivers_queues_or_refuses_each() {
    let api = start_with_queue(|_| {}).await;
    let a = api.online("a@example.com/r", true);
    let resp = api
        .broadcast(serde_json::json!({
            "to": ["a@example.com", "off@example.com", "a@@x", "a@other.org", "A@example.com", "a@example.com"],
            "body": "b",
            "id": "bl-1",
            "ttl_secs": 600,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let v: serde_json::Value = resp.json().await.unwrap();
    // Each account once (JIDs are compared normalised: `A@` is `a@`).
    assert_eq!(v["recipients"], 4, "{v}");
    let v = api
        .wait_status("bl-1", |v| {
            v["results"].as_array().is_some_and(|r| r.len() == 4)
        })
        .await;
    let st = statuses(&v);
    let get = |k: &str| st.get(k).cloned().unwrap_or_else(|| panic!("{k}: {v}"));
    assert_eq!(get("a@example.com"), ("delivered".into(), None));
    assert_eq!(get("off@example.com"), ("queued".into(), None));
    assert_eq!(get("a@@x"), ("error".into(), Some("invalid JID".into())));
    assert_eq!(
        get("a@other.org"),
        ("error".into(), Some("unknown domain".into()))
    );
    assert_eq!(wait_drain(&a).await.len(), 1);

    let queue = api.queue.as_ref().unwrap();
    let stored = queue
        .peek("off@example.com", SystemTime::now(), 10)
        .unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].push_id, "bl-1");
    assert_eq!(
        stored[0]
            .expires_at
            .duration_since(stored[0].created)
            .unwrap(),
        Duration::from_secs(600)
    );
    let stanza = std::str::from_utf8(&stored[0].stanza).unwrap();
    assert_eq!(attr(stanza, "to").as_deref(), Some("off@example.com"));
    assert!(stanza.contains("<body>b</body>"), "{stanza}");

    // A broadcast id already used by a push is a duplicate too (the ids share the status records).
    api.push(serde_json::json!({"to": "a@example.com", "body": "p", "id": "shared"}))
        .send()
        .await
        .unwrap();
    api.wait_status("shared", |v| v["results"][0]["status"] == "delivered")
        .await;
    let v: serde_json::Value = api
        .broadcast(serde_json::json!({"to": ["a@example.com"], "body": "b", "id": "shared"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["duplicate"], true, "{v}");
}

#[tokio::test]
async fn broadcast_fans_out_in_batches() {
    let api = start_with_queue(|_| {}).await;
    // More recipients than one batch: all of them offline, so every one is stored and recorded.
    let n = 2500;
    let to: Vec<String> = (0..n).map(|i| format!("u{i}@example.com")).collect();
    let v: serde_json::Value = api
        .broadcast(serde_json::json!({"to": to, "body": "x", "id": "big"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["recipients"], n, "{v}");
    let v = api
        .wait_status("big", |v| {
            v["results"].as_array().is_some_and(|r| r.len() == n)
        })
        .await;
    assert!(
        v["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["status"] == "queued"),
        "{v}"
    );
    assert_eq!(api.queue.as_ref().unwrap().total_depth(), n as u64);
}

#[tokio::test]
async fn broadcast_rejects_bad_requests_like_push() {
    let api = start(|s| s.max_body = 2048).await;
    let resp = api
        .post_as("/api/v1/broadcast", "application/json", "{\"to\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(resp).await.0, StatusCode::BAD_REQUEST);
    let resp = api
        .post_as("/api/v1/broadcast", "text/plain", "{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let too_many: Vec<String> = (0..10_001).map(|i| format!("u{i}@x")).collect();
    let cases = [
        (
            serde_json::json!({"to": "all"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "body",
        ),
        (
            serde_json::json!({"body": "x"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "missing field `to`",
        ),
        (
            serde_json::json!({"to": [], "body": "x"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "at least one",
        ),
        (
            serde_json::json!({"to": "a@example.com", "body": "x"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "\"all\" or a list",
        ),
        (
            serde_json::json!({"to": "all", "body": "x", "type": "groupchat"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "type",
        ),
        (
            serde_json::json!({"to": "all", "payload": "</message><iq type='set'/><message>"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "payload",
        ),
        (
            serde_json::json!({"to": "all", "body": "x", "ttl_secs": 0}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "ttl_secs",
        ),
        (
            serde_json::json!({"to": "all", "body": "x", "id": "a\u{1}"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "id",
        ),
        (
            serde_json::json!({"to": "all", "body": "x".repeat(3000)}),
            StatusCode::PAYLOAD_TOO_LARGE,
            "max_body_bytes",
        ),
    ];
    for (json, status, needle) in cases {
        let (got, msg) = error_of(api.broadcast(json.clone()).send().await.unwrap()).await;
        assert_eq!(got, status, "{json}: {msg}");
        assert!(msg.contains(needle), "{json}: {msg}");
    }
    // The recipient cap (a bigger body limit so the list itself fits).
    let api = start(|s| s.max_body = 1 << 20).await;
    let (got, msg) = error_of(
        api.broadcast(serde_json::json!({"to": too_many, "body": "x"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(got, StatusCode::UNPROCESSABLE_ENTITY, "{msg}");
    assert!(msg.contains("at most 10000"), "{msg}");
}

#[tokio::test]
async fn rate_limit_answers_429_with_retry_after() {
    let api = start(|s| s.rate_limit = Some(tern::http::auth::RateLimiter::new(1, 2))).await;
    for _ in 0..2 {
        let resp = api.get("/api/v1/sessions").send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }
    let resp = api.get("/api/v1/sessions").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    let (_, msg) = error_of(resp).await;
    assert!(msg.contains("http.rate_limit_per_sec"), "{msg}");
    // Limited before the key is looked at: guessing keys is limited too.
    let resp = api
        .client
        .get(api.url("/api/v1/sessions"))
        .bearer_auth("wrong-key-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    // /rest/stream answers in plain text, like its other errors.
    let resp = api
        .post_xml("/rest/stream/", "<message to='a@example.com'/>")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(resp.headers().contains_key("retry-after"));
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    assert!(resp.text().await.unwrap().starts_with("rate limit:"));
    // Health probes are never limited.
    for _ in 0..5 {
        let resp = api.client.get(api.url("/healthz")).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }
}

#[tokio::test]
async fn rate_limit_zero_is_unlimited() {
    let mut config = HttpConfig {
        rate_limit_per_sec: 0,
        ..HttpConfig::default()
    };
    let state = HttpState::from_config(
        Arc::new(Router::new()),
        DOMAIN,
        &config,
        vec![KEY.into()],
        FramerLimits::default(),
        None,
    )
    .unwrap();
    assert!(state.rate_limit.is_none());
    config.rate_limit_per_sec = 5;
    config.rate_limit_burst = 7;
    let state = HttpState::from_config(
        Arc::new(Router::new()),
        DOMAIN,
        &config,
        vec![KEY.into()],
        FramerLimits::default(),
        None,
    )
    .unwrap();
    assert!(state.rate_limit.is_some());
}

//! The HTTP API in-process: a real `Router` with simulated sessions (handles whose queues the test
//! drains), `tern::http::serve` on an ephemeral port, and reqwest as the management server.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use jid::FullJid;
use reqwest::StatusCode;
use tern::http::{self, HttpState};
use tern::xmpp::framer::FramerLimits;
use tern::xmpp::router::{Kick, Router, SessionHandle};
use tokio_util::sync::CancellationToken;

const DOMAIN: &str = "example.com";
const KEY: &str = "0123456789abcdef0123456789abcdef";

struct Api {
    base: String,
    router: Arc<Router>,
    client: reqwest::Client,
    cancel: CancellationToken,
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
    let mut state = HttpState {
        router: router.clone(),
        domain: DOMAIN.into(),
        api_keys: vec![KEY.into()],
        allow: Vec::new(),
        iq_timeout: Duration::from_secs(5),
        max_body: 64 * 1024,
        limits: FramerLimits::default(),
        metrics: None,
        queue: None,
        default_ttl: Duration::from_secs(86_400),
        max_ttl: Duration::from_secs(2_592_000),
    };
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
    }
}

fn drain(h: &SessionHandle) -> Vec<String> {
    let mut out = Vec::new();
    h.drain(100, &mut out);
    out.into_iter()
        .map(|(b, _)| String::from_utf8(b.to_vec()).unwrap())
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
        "/api/v1/sessions/{jid}",
        "/rest/stream/",
        "/healthz",
    ] {
        assert!(v["paths"].get(p).is_some(), "{p}");
    }
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

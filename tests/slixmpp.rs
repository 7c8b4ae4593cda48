//! Interoperability with slixmpp (Debian's python3-slixmpp), run by `/usr/bin/python3`.
//!
//! Needs `apt-get install -y python3-slixmpp`. Without it these tests fail with that hint, unless
//! `TERN_SKIP_SLIXMPP=1` is set, which skips them explicitly.

mod common;

use std::path::Path;
use std::process::Command;

use common::{TRICKY_BODY, TestServer, run_command};
use serde_json::Value;

const PYTHON: &str = "/usr/bin/python3";

/// Whether slixmpp tests should run; panics with a hint if slixmpp is missing and skipping was not asked.
fn slixmpp_available() -> bool {
    let ok = Path::new(PYTHON).exists()
        && Command::new(PYTHON)
            .args(["-c", "import slixmpp"])
            .status()
            .is_ok_and(|s| s.success());
    if ok {
        return true;
    }
    if std::env::var("TERN_SKIP_SLIXMPP").is_ok_and(|v| v == "1") {
        eprintln!("slixmpp not available and TERN_SKIP_SLIXMPP=1: skipping");
        return false;
    }
    panic!(
        "{PYTHON} cannot import slixmpp: install it with `apt-get install -y python3-slixmpp` \
         (or set TERN_SKIP_SLIXMPP=1 to skip these tests)"
    );
}

/// Runs tests/slixmpp_client.py with `args` and parses the JSON it prints last.
fn run_script(server: &TestServer, args: &[String]) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/slixmpp_client.py");
    let mut cmd = Command::new(PYTHON);
    cmd.arg(script)
        .arg("--ca")
        .arg(server.selfsigned_cert_path())
        .args(args);
    let out = run_command(cmd, None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| {
        panic!(
            "slixmpp script did not print JSON ({e}); status {}\nstdout: {stdout}\nstderr: {stderr}",
            out.status
        )
    })
}

fn s(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string {key:?} in {v:#}"))
        .to_string()
}

fn assert_ok(v: &Value) {
    assert_eq!(
        v.get("ok"),
        Some(&Value::Bool(true)),
        "slixmpp run failed: {v:#}"
    );
}

/// Two slixmpp clients over STARTTLS (certificate verified against the generated cert) exchange unicode.
fn exchange(mech: &str, direct: bool) {
    if !slixmpp_available() {
        return;
    }
    let server = TestServer::start_with_users("", &[("alice@localhost", "alice-pw ✓")]);
    let bob = "bob@localhost";
    let port = if direct {
        server.tls_addr.port()
    } else {
        server.starttls_addr.port()
    };
    let mut args = vec![
        "--mode".into(),
        "exchange".into(),
        "--port".into(),
        port.to_string(),
        "--jid1".into(),
        "alice@localhost/sli".into(),
        "--pw1".into(),
        "alice-pw ✓".into(),
        "--jid2".into(),
        format!("{bob}/sli"),
        "--pw2".into(),
        server.device_password(bob),
        "--body".into(),
        TRICKY_BODY.into(),
        "--mech".into(),
        mech.into(),
    ];
    if direct {
        args.push("--direct".into());
    }
    let v = run_script(&server, &args);
    assert_ok(&v);
    assert_eq!(s(&v, "a_jid"), "alice@localhost/sli");
    assert_eq!(s(&v, "b_jid"), "bob@localhost/sli");
    assert_eq!(s(&v, "b_received_body"), TRICKY_BODY);
    assert_eq!(s(&v, "b_received_from"), "alice@localhost/sli");
    let reversed: String = TRICKY_BODY.chars().rev().collect();
    assert_eq!(s(&v, "a_received_body"), reversed);
    assert_eq!(s(&v, "a_received_from"), "bob@localhost/sli");
    assert_eq!(v["ping_ok"], Value::Bool(true), "{v:#}");
    assert_eq!(v["a_roster_items"], Value::from(0), "{v:#}");
    assert_eq!(s(&v, "b_version_name"), "Slixmpp", "{v:#}");
    let identities = v["disco_identities"].as_array().expect("identities");
    assert!(
        identities
            .iter()
            .any(|i| i.get(0).and_then(Value::as_str) == Some("server")),
        "no server identity in disco#info: {v:#}"
    );
}

#[test]
fn slixmpp_starttls_exchange_scram_sha256() {
    exchange("SCRAM-SHA-256", false);
}

#[test]
fn slixmpp_starttls_exchange_plain() {
    exchange("PLAIN", false);
}

#[test]
fn slixmpp_direct_tls_exchange_default_mechanism() {
    exchange("", true);
}

#[test]
fn slixmpp_device_credential_login() {
    if !slixmpp_available() {
        return;
    }
    let server = TestServer::start("");
    let jid = "agent-42@localhost";
    for mech in ["SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"] {
        let v = run_script(
            &server,
            &[
                "--mode".into(),
                "login".into(),
                "--port".into(),
                server.starttls_addr.port().to_string(),
                "--jid1".into(),
                jid.into(),
                "--pw1".into(),
                server.device_password(jid),
                "--mech".into(),
                mech.into(),
            ],
        );
        assert_ok(&v);
        assert!(
            s(&v, "a_jid").starts_with("agent-42@localhost/"),
            "{mech}: {v:#}"
        );
    }
    // A wrong device password is refused.
    let v = run_script(
        &server,
        &[
            "--mode".into(),
            "login".into(),
            "--port".into(),
            server.starttls_addr.port().to_string(),
            "--jid1".into(),
            jid.into(),
            "--pw1".into(),
            server.device_password("agent-43@localhost"),
            "--timeout".into(),
            "8".into(),
        ],
    );
    assert_eq!(v["ok"], Value::Bool(false), "{v:#}");
    let errors = v["errors"].to_string();
    assert!(
        errors.contains("authentication failed"),
        "expected an authentication failure: {v:#}"
    );
}

/// Pushes through the HTTP API reach a slixmpp endpoint: two stored while it was offline (delivered in
/// order at login), then one live.
#[test]
fn slixmpp_receives_queued_and_live_pushes() {
    if !slixmpp_available() {
        return;
    }
    let server = TestServer::start("");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let jid = "agent-sli@localhost";
    let push = |body: &str, id: &str| {
        let url = format!("http://{}/api/v1/push", server.http_addr);
        let body = serde_json::json!({"to": jid, "body": body, "type": "chat", "id": id});
        rt.block_on(async move {
            let r = reqwest::Client::new()
                .post(url)
                .bearer_auth(common::API_KEY)
                .json(&body)
                .send()
                .await
                .expect("push");
            r.json::<Value>().await.expect("json")
        })
    };
    assert_eq!(push("first ✓", "p1")["results"][0]["status"], "queued");
    assert_eq!(push(TRICKY_BODY, "p2")["results"][0]["status"], "queued");

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/slixmpp_client.py");
    let child = Command::new(PYTHON)
        .arg(script)
        .arg("--ca")
        .arg(server.selfsigned_cert_path())
        .args(["--mode", "receive", "--expect", "3", "--direct"])
        .args(["--port", &server.tls_addr.port().to_string()])
        .args([
            "--jid1",
            &format!("{jid}/sli"),
            "--pw1",
            &server.device_password(jid),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start slixmpp");

    // Once the endpoint is online, a live push.
    let online = format!("http://{}/api/v1/sessions/{jid}", server.http_addr);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let v: Value = rt.block_on(async {
            reqwest::Client::new()
                .get(&online)
                .bearer_auth(common::API_KEY)
                .send()
                .await
                .expect("session")
                .json()
                .await
                .expect("json")
        });
        if v["resources"][0]["available"] == Value::Bool(true) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "slixmpp never came online"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(push("live", "p3")["results"][0]["status"], "delivered");

    let out = child.wait_with_output().expect("slixmpp output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap_or_else(|e| {
            panic!(
                "no JSON ({e}): {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert_ok(&v);
    let bodies: Vec<&str> = v["received"]
        .as_array()
        .expect("received")
        .iter()
        .map(|m| m["body"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(bodies, vec!["first ✓", TRICKY_BODY, "live"], "{v:#}");
    assert_eq!(v["received"][0]["from"], "localhost", "{v:#}");
    assert_eq!(v["received"][0]["id"], "p1", "{v:#}");
}

//! The `tern` command line: version, check-config, user management, and listener errors of `serve`.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{free_port, run_command, run_tern, tern_bin};

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A minimal valid config in a temp dir; returns (dir, config path).
fn config_file(extra: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let path = dir.path().join("tern.toml");
    let body = format!(
        "[server]\ndomain = \"localhost\"\ndata_dir = \"{}\"\n\n[c2s]\nstarttls_listen = [\"127.0.0.1:{}\"]\ntls_listen = [\"127.0.0.1:{}\"]\n\n[auth]\ndevice_secret = \"top-secret-value-9f2c\"\n{extra}",
        data.display(),
        free_port(),
        free_port()
    );
    std::fs::write(&path, body).expect("write config");
    (dir, path)
}

#[test]
fn version_flag() {
    let mut cmd = Command::new(tern_bin());
    cmd.arg("--version");
    let out = run_command(cmd, None);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("tern"), "{stdout}");
    assert!(
        stdout.contains(env!("CARGO_PKG_VERSION")),
        "version {} not printed: {stdout}",
        env!("CARGO_PKG_VERSION")
    );
}

#[test]
fn check_config_prints_effective_config_without_secret() {
    let (_dir, path) = config_file("\n[limits]\nmax_depth = 17\n");
    let mut cmd = Command::new(tern_bin());
    cmd.arg("check-config").arg(&path);
    let out = run_command(cmd, None);
    let all = text(&out);
    assert!(out.status.success(), "check-config failed: {all}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The effective config: explicit values and defaults alike.
    assert!(stdout.contains("localhost"), "{stdout}");
    assert!(stdout.contains("max_depth"), "{stdout}");
    assert!(stdout.contains("17"), "explicit value not shown: {stdout}");
    assert!(
        stdout.contains("max_stanza_bytes") && stdout.contains("262144"),
        "defaults not shown: {stdout}"
    );
    assert!(stdout.contains("device_secret"), "{stdout}");
    assert!(
        !all.contains("top-secret-value-9f2c"),
        "device_secret value leaked: {all}"
    );
}

#[test]
fn check_config_rejects_unknown_key() {
    let (_dir, path) = config_file("\n[limits]\nmax_stanza_bytez = 5\n");
    let mut cmd = Command::new(tern_bin());
    cmd.arg("check-config").arg(&path);
    let out = run_command(cmd, None);
    let all = text(&out);
    assert!(!out.status.success(), "unknown key accepted: {all}");
    assert!(
        all.contains("max_stanza_bytez"),
        "error does not name the key: {all}"
    );
}

#[test]
fn check_config_rejects_invalid_value() {
    let (_dir, path) = config_file("\n[limits]\nmax_depth = \"deep\"\n");
    let mut cmd = Command::new(tern_bin());
    cmd.arg("check-config").arg(&path);
    let out = run_command(cmd, None);
    let all = text(&out);
    assert!(!out.status.success(), "invalid value accepted: {all}");
    assert!(
        all.contains("max_depth"),
        "error does not name the key: {all}"
    );
}

#[test]
fn user_add_list_remove_round_trip() {
    let (_dir, path) = config_file("");
    let list = |path: &std::path::Path| {
        let out = run_tern(&["user", "list"], path, None);
        assert!(out.status.success(), "user list failed: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(!list(&path).contains("alice@localhost"));

    for jid in ["alice@localhost", "bob@localhost"] {
        let out = run_tern(
            &["user", "add", jid, "--password-stdin"],
            &path,
            Some("pässword-1"),
        );
        assert!(out.status.success(), "user add {jid}: {}", text(&out));
        assert!(
            !text(&out).contains("pässword-1"),
            "password echoed: {}",
            text(&out)
        );
    }
    let listed = list(&path);
    assert!(listed.contains("alice@localhost"), "{listed}");
    assert!(listed.contains("bob@localhost"), "{listed}");
    assert!(!listed.contains("pässword-1"), "password listed: {listed}");

    let out = run_tern(&["user", "remove", "alice@localhost"], &path, None);
    assert!(out.status.success(), "user remove: {}", text(&out));
    let listed = list(&path);
    assert!(!listed.contains("alice@localhost"), "{listed}");
    assert!(listed.contains("bob@localhost"), "{listed}");

    // Removing a user that does not exist is an error.
    let out = run_tern(&["user", "remove", "alice@localhost"], &path, None);
    assert!(
        !out.status.success(),
        "removing a missing user succeeded: {}",
        text(&out)
    );
}

#[test]
fn user_add_rejects_invalid_jid() {
    let (_dir, path) = config_file("");
    let out = run_tern(
        &["user", "add", "not a jid@@", "--password-stdin"],
        &path,
        Some("pw"),
    );
    assert!(
        !out.status.success(),
        "invalid JID accepted: {}",
        text(&out)
    );
}

#[test]
fn serve_fails_when_listener_port_in_use() {
    let (_dir, path) = config_file("");
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy_addr = busy.local_addr().unwrap();
    // Point the STARTTLS listener at the occupied port.
    let body = std::fs::read_to_string(&path).unwrap();
    let mut config: toml::Table = body.parse().unwrap();
    config["c2s"]["starttls_listen"] = toml::Value::Array(vec![busy_addr.to_string().into()]);
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();

    let started = std::time::Instant::now();
    let out = run_tern(&["serve"], &path, None);
    let all = text(&out);
    assert!(
        !out.status.success(),
        "serve succeeded on a busy port: {all}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "serve took {:?} to fail",
        started.elapsed()
    );
    assert!(
        all.contains(&busy_addr.to_string()),
        "error does not name the listener {busy_addr}: {all}"
    );
    assert!(
        all.to_lowercase().contains("in use"),
        "error does not say the address is in use: {all}"
    );
    drop(busy);
}

/// A second server on the same TURN port fails at startup, naming `turn.listen`, instead of
/// silently sharing the port through `SO_REUSEPORT` (the first keeps serving).
#[test]
fn serve_fails_when_turn_port_is_taken_by_another_server() {
    let busy = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .expect("socket");
    busy.set_reuse_port(true).expect("SO_REUSEPORT");
    busy.bind(
        &"127.0.0.1:0"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into(),
    )
    .expect("bind");
    let busy_addr = busy.local_addr().unwrap().as_socket().unwrap();
    let (_dir, path) = config_file(&format!("\n[turn]\nlisten = \"{busy_addr}\"\n"));

    let out = run_tern(&["serve"], &path, None);
    let all = text(&out);
    assert!(
        !out.status.success(),
        "serve shared a busy TURN port: {all}"
    );
    assert!(
        all.contains("`turn.listen`"),
        "error does not name the key: {all}"
    );
    assert!(
        all.contains(&busy_addr.to_string()),
        "error does not name {busy_addr}: {all}"
    );
    assert_eq!(
        all.matches("in use").count(),
        1,
        "the OS error should appear once: {all}"
    );
}

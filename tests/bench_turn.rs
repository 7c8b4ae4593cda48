//! `tern-bench turn` against real TURN servers: Tern (`tern serve`) and, when installed, coturn
//! (`turnserver`) on free loopback ports with loopback peers allowed. Every allocation must
//! succeed and every relayed packet must come back from the harness's echo peer.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{TestServer, assert_percentiles, json_count, tern_bench_json};

const SECRET: &str = "bench-turn-test-secret-0123456789";
const USER: &str = "alice";
const PASS: &str = "alice-password";

/// A port free for both UDP and TCP a moment ago.
fn free_turn_port() -> u16 {
    for _ in 0..100 {
        let port = common::free_port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for both UDP and TCP");
}

/// 200 relay ports outside the kernel's ephemeral range (32768-60999), varied per process.
fn relay_range(offset: u32) -> (u32, u32) {
    let lo = 61_000 + ((std::process::id() + offset) % 22) * 200;
    (lo, lo + 199)
}

/// Runs the harness with `auth` against `server` and checks the report: `allocations` granted,
/// nothing lost, the documented fields present.
fn check_run(server: SocketAddr, pid: u32, auth: &[&str], extra: &[&str], allocations: u64) {
    let (server, pid) = (server.to_string(), pid.to_string());
    let n = allocations.to_string();
    let mut args = vec![
        "turn",
        "--server",
        &server,
        "--allocations",
        &n,
        "--duration",
        "1",
        "--drain",
        "10",
        "--timeout",
        "50",
        "--server-pid",
        &pid,
    ];
    args.extend(auth);
    args.extend(extra);
    let v = tern_bench_json(&args);
    assert_eq!(v["scenario"], "turn", "{v}");
    assert_eq!(json_count(&v, "allocations"), allocations, "{v}");
    assert_eq!(json_count(&v, "alloc_failed"), 0, "{v}");
    assert!(v["allocs_per_sec"].as_f64().is_some_and(|r| r > 0.0), "{v}");
    let sent = json_count(&v, "sent");
    assert!(sent > 0, "{v}");
    assert_eq!(json_count(&v, "received"), sent, "{v}");
    assert_eq!(json_count(&v, "lost"), 0, "{v}");
    assert!(v["relayed_pps"].as_f64().is_some_and(|r| r > 0.0), "{v}");
    assert!(v["mbit_per_sec"].as_f64().is_some_and(|r| r > 0.0), "{v}");
    assert_percentiles(&v, "alloc_latency_us");
    assert_percentiles(&v, "rtt_us");
    assert!(v["server_cpu_secs"].as_f64().is_some(), "{v}");
    assert!(json_count(&v, "server_rss_kib") > 0, "{v}");
}

#[test]
fn turn_relays_through_tern() {
    let (lo, hi) = relay_range(0);
    let extra = format!(
        "[turn]\nrelay_ports = \"{lo}-{hi}\"\nsecrets = [\"{SECRET}\"]\nusers = [\"{USER}:{PASS}\"]\n\
         allow_peers = [\"127.0.0.0/8\"]\nmax_allocations_per_user = 100\n"
    );
    let server = TestServer::start_edited(&extra, |config| {
        if let Some(turn) = config.get_mut("turn").and_then(|t| t.as_table_mut()) {
            turn.insert(
                "listen".into(),
                toml::Value::String(format!("127.0.0.1:{}", free_turn_port())),
            );
        }
    });
    let config: toml::Table = std::fs::read_to_string(&server.config_path)
        .expect("read config")
        .parse()
        .expect("config TOML");
    let addr: SocketAddr = config["turn"]["listen"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("turn.listen");
    // REST credentials, channels, fixed rate; then a static user, Send indications, a window.
    check_run(
        addr,
        server.pid(),
        &["--secret", SECRET],
        &["--rate", "2000"],
        8,
    );
    check_run(
        addr,
        server.pid(),
        &["--user", USER, "--password", PASS],
        &["--send-indications", "--window", "2"],
        4,
    );
}

/// A `turnserver` (coturn) child, killed on drop.
struct Coturn(Child);

impl Drop for Coturn {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until `addr` answers a STUN Binding request (RFC 8489 §5), at most 15 s.
fn wait_stun(addr: SocketAddr) -> bool {
    let Ok(s) = UdpSocket::bind("127.0.0.1:0") else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let mut req = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42];
    req.extend_from_slice(b"tern-bench-0");
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut buf = [0u8; 1024];
    while Instant::now() < deadline {
        let _ = s.send_to(&req, addr);
        if let Ok(n) = s.recv(&mut buf)
            && n >= 2
            && buf[..2] == [0x01, 0x01]
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn turn_relays_through_coturn() {
    let found = std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|d| Path::new(&d).join("turnserver").is_file())
    });
    if !found {
        eprintln!("skipped: coturn's `turnserver` is not installed (apt-get install coturn)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_turn_port();
    let (lo, hi) = relay_range(11);
    let child = Command::new("turnserver")
        .args(["-n", "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1"])
        .arg(format!("--listening-port={port}"))
        .arg(format!("--min-port={lo}"))
        .arg(format!("--max-port={hi}"))
        .arg("--use-auth-secret")
        .arg(format!("--static-auth-secret={SECRET}"))
        .args(["--realm=localhost", "--allow-loopback-peers"])
        .args([
            "--no-tls",
            "--no-dtls",
            "--no-cli",
            "--no-tcp-relay",
            "--simple-log",
        ])
        .arg(format!("--db={}", dir.path().join("turndb").display()))
        .arg(format!("--pidfile={}", dir.path().join("pid").display()))
        .arg(format!("--log-file={}", dir.path().join("log").display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn turnserver");
    let coturn = Coturn(child);
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    assert!(wait_stun(addr), "turnserver did not answer on {addr}");
    check_run(
        addr,
        coturn.0.id(),
        &["--secret", SECRET],
        &["--rate", "2000"],
        8,
    );
    check_run(
        addr,
        coturn.0.id(),
        &["--secret", SECRET],
        &["--send-indications", "--window", "2"],
        4,
    );
}

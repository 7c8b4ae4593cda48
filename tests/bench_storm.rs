//! `tern-bench storm` against the real server: 200 users in 2 worker processes are cut off at
//! once (by the harness, or by a server restart driven through `--armed-file`) and must all come
//! back; the JSON report carries the fields comparison scripts read, and `--plot` writes the SVG.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{DEVICE_SECRET, DOMAIN, STEP, TestServer, run_command};

const USERS: u64 = 200;

fn bench(server: &TestServer, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tern-bench"));
    cmd.args(["storm", "--server"])
        .arg(server.tls_addr.to_string())
        .args(["--tls", "direct", "--domain", DOMAIN])
        .args(["--users", &USERS.to_string(), "--workers", "2"])
        .args(["--device-secret", DEVICE_SECRET])
        .args(["--hold", "0.2", "--timeout", "40", "--json"])
        .args(extra);
    cmd
}

/// The report, after checking the exit status; panics with stderr otherwise.
fn report(out: &std::process::Output) -> serde_json::Value {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tern-bench failed: {stderr}");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}); stderr: {stderr}"))
}

/// Every user is back in every cycle, with the fields the comparison script relies on.
fn assert_all_back(r: &serde_json::Value, cycles: usize, with_server: bool) {
    assert_eq!(r["scenario"], "storm");
    assert_eq!(r["users"], USERS);
    assert_eq!(r["logged_in"], USERS);
    let list = r["cycles"].as_array().expect("cycles");
    assert_eq!(list.len(), cycles, "{r:#}");
    for c in list {
        assert_eq!(c["reconnected"], USERS, "{c:#}");
        assert_eq!(c["failed"], 0, "{c:#}");
        assert!(c["cut_at_unix_ms"].as_u64().is_some_and(|t| t > 0), "{c:#}");
        for k in ["back_secs", "p50_secs", "p90_secs", "p99_secs"] {
            assert!(c[k].as_f64().is_some_and(|s| s >= 0.0), "{k}: {c:#}");
        }
        let (p50, back) = (c["p50_secs"].as_f64(), c["back_secs"].as_f64());
        assert!(p50 <= back, "{c:#}");
        assert!(c["failures"].is_object(), "{c:#}");
        assert!(c["attempts"].as_u64().is_some_and(|a| a >= USERS), "{c:#}");
        for k in ["peak_rss_kib", "server_cpu_secs"] {
            assert_eq!(c[k].is_number(), with_server, "{k}: {c:#}");
        }
    }
    assert_eq!(r["peak_rss_kib"].is_number(), with_server, "{r:#}");
}

#[test]
fn client_cut_storm_all_reconnect() {
    let server = TestServer::start("");
    let svg = server.dir().join("storm.svg");
    let pid = server.pid().to_string();
    let mut cmd = bench(&server, &["--cut", "client", "--cycles", "2"]);
    cmd.args(["--server-pid", &pid, "--plot"]).arg(&svg);
    let r = report(&run_command(cmd, None));
    assert_eq!(r["cut"], "client");
    assert_eq!(r["workers"], 2);
    assert_all_back(&r, 2, true);
    // The harness cut: one attempt each was enough against a healthy server.
    assert_eq!(r["cycles"][0]["attempts"], USERS, "{r:#}");

    let text = std::fs::read_to_string(&svg).expect("--plot wrote the SVG");
    for series in [
        "data-series=\"first login\"",
        "data-series=\"reconnect, cycle 1\"",
        "data-series=\"reconnect, cycle 2\"",
        "data-series=\"rss-vs-sessions\"",
    ] {
        assert!(text.contains(series), "{series} missing from the plot");
    }
}

fn wait_for_file(path: &Path, content: &str, child: &mut std::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        if std::fs::read_to_string(path).is_ok_and(|t| t.trim() == content) {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("tern-bench exited ({status}) before arming cycle {content}");
        }
        assert!(Instant::now() < deadline, "cycle {content} was never armed");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How a bench script drives `--cut server-restart`: wait for the armed file, restart the server,
/// publish the new PID in the PID file.
#[test]
fn server_restart_storm_all_reconnect() {
    let mut server = TestServer::start("");
    let armed = server.dir().join("armed");
    let pid_file = server.dir().join("server.pid");
    std::fs::write(&pid_file, server.pid().to_string()).expect("pid file");
    let mut cmd = bench(&server, &["--cut", "server-restart", "--cycles", "1"]);
    cmd.arg("--armed-file")
        .arg(&armed)
        .arg("--server-pid-file")
        .arg(&pid_file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn tern-bench");
    wait_for_file(&armed, "1", &mut child);
    server.sigterm();
    server.wait_exit(STEP).expect("server stops on SIGTERM");
    server.restart();
    std::fs::write(&pid_file, server.pid().to_string()).expect("pid file");

    // Bounded: the harness gives up 40 s (+5) after the drop by itself; kill it after 90 s.
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if rx.recv_timeout(Duration::from_secs(90)).is_err() {
            // SAFETY: kill(2) on the pid of our own child, which has not been waited for yet.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
    });
    let out = child.wait_with_output().expect("wait for tern-bench");
    let _ = tx.send(());
    let r = report(&out);
    assert_eq!(r["cut"], "server-restart");
    assert_all_back(&r, 1, true);
}

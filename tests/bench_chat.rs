//! `tern-bench chat` against the real `tern` binary: endpoints echo every tool message, in one
//! process and with worker processes, and the report carries the fields comparison scripts read.

mod common;

use common::{DEVICE_SECRET, TestServer, assert_percentiles, json_count, tern_bench_json};

#[test]
fn chat_endpoints_echo_every_message() {
    let server = TestServer::start("");
    let addr = server.tls_addr.to_string();
    let pid = server.pid().to_string();
    // Fixed rate in one process; then as fast as a window allows, endpoints in two workers.
    for extra in [
        ["--rate", "300", "--workers", "1"],
        ["--window", "8", "--workers", "2"],
    ] {
        let mut args = vec![
            "chat",
            "--server",
            &addr,
            "--device-secret",
            DEVICE_SECRET,
            "--endpoints",
            "30",
            "--tools",
            "3",
            "--duration",
            "1",
            "--drain",
            "20",
            "--settle",
            "0.2",
            "--timeout",
            "50",
            "--server-pid",
            &pid,
        ];
        args.extend(extra);
        let v = tern_bench_json(&args);
        assert_eq!(v["scenario"], "chat", "{v}");
        let sent = json_count(&v, "sent");
        assert!(sent > 0, "{v}");
        assert_eq!(json_count(&v, "lost"), 0, "{v}");
        assert_eq!(json_count(&v, "replies"), sent, "{v}");
        assert_eq!(json_count(&v, "delivered"), sent, "{v}");
        assert!(v["msgs_per_sec"].as_f64().is_some_and(|r| r > 0.0), "{v}");
        assert_percentiles(&v, "rtt_us");
        assert_percentiles(&v, "one_way_us");
        // The echo leaves after the message arrived: one way is within the round trip.
        assert!(
            json_count(&v["one_way_us"], "p50") <= json_count(&v["rtt_us"], "max"),
            "{v}"
        );
        assert!(v["server_cpu_secs"].as_f64().is_some(), "{v}");
        assert!(json_count(&v, "server_rss_kib") > 0, "{v}");
    }
}

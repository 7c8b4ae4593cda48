//! `tern-bench`: Tern's own lightweight XMPP load client.
//!
//! One subcommand per scenario: `connect` (logins, idle memory), `push` (HTTP API pushes to
//! connected clients: throughput and push-to-receive latency), `storm` (everyone cut off at once,
//! everyone reconnecting: time until all are back), `chat` (tool-to-endpoint messages) and `turn`
//! (TURN allocations and relayed packets, against any TURN server). The client speaks just enough XMPP (TLS,
//! SASL PLAIN, bind, presence, ping replies) and parses with Tern's own stream framer, so that
//! tens of thousands of sessions fit in one small process. See BENCHMARKS.md for how it is used.

mod chat;
mod client;
mod connect;
mod engine;
mod net;
mod plot;
mod progress;
mod push;
mod stats;
mod storm;
mod turn;

use std::net::SocketAddr;

use clap::{Args, Parser, Subcommand};

use crate::client::TlsMode;
use crate::net::SourceIps;

#[derive(Debug, Parser)]
#[command(
    name = "tern-bench",
    version,
    about = "XMPP load client for benchmarking Tern"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Log N users in (TLS, SASL PLAIN, bind, presence), hold the idle sessions, report login rate,
    /// login latency, failures and the server's RSS per session / CPU per login.
    Connect(ConnectArgs),
    /// Log N users in, then push to them through an HTTP API (Tern or ejabberd) at a fixed or
    /// unbounded rate; report pushes/s, push-to-receive latency, losses and server CPU/RSS.
    Push(push::PushArgs),
    /// Log N users in, then cut every connection at once (`--cut client`) or wait for a server
    /// restart to cut them (`--cut server-restart`); all reconnect at once, with a jittered
    /// back-off on failure. Reports per cycle the time until 50/90/99/100 % are back, failures,
    /// attempts and the server's peak RSS and CPU.
    Storm(storm::StormArgs),
    /// Log N endpoints and M tools in; tools send chat messages that endpoints echo; report
    /// messages/s, round-trip and one-way latency, losses and server CPU/RSS.
    Chat(chat::ChatArgs),
    /// Allocate N TURN allocations over UDP (allocations/s, latency), then relay ChannelData (or
    /// Send indications) through them to a local echo peer; report packets/s, RTT and losses.
    Turn(turn::TurnArgs),
}

/// `--workers`: a number or `auto`.
#[derive(Debug, Clone, Copy)]
pub struct WorkerCount(pub Option<u64>);

pub(crate) fn parse_workers(s: &str) -> Result<WorkerCount, String> {
    if s == "auto" {
        return Ok(WorkerCount(None));
    }
    match s.parse::<u64>() {
        Ok(n) if n >= 1 => Ok(WorkerCount(Some(n))),
        _ => Err(format!("expected `auto` or a positive number, got {s:?}")),
    }
}

/// How the clients reach the XMPP server and log in: shared by `connect`, `storm`, `push` and
/// `chat` (the user range and pattern are each scenario's own).
#[derive(Debug, Clone, Args)]
pub struct Login {
    /// XMPP server address (c2s).
    #[arg(long, default_value = "127.0.0.1:5223")]
    pub server: SocketAddr,
    /// `direct` (XEP-0368, e.g. port 5223) or `starttls` (e.g. port 5222).
    #[arg(long, value_enum, default_value = "direct")]
    pub tls: TlsMode,
    /// XMPP domain (stream `to`, the domain of the JIDs).
    #[arg(long, default_value = "localhost")]
    pub domain: String,
    /// TLS server name (SNI); defaults to --domain.
    #[arg(long)]
    pub sni: Option<String>,
    /// Maximum logins in flight at once.
    #[arg(long, default_value_t = 200)]
    pub concurrency: usize,
    /// Password pattern; `{i}` is the user index, `{user}` the username.
    #[arg(
        long,
        conflicts_with = "device_secret",
        required_unless_present = "device_secret"
    )]
    pub password_pattern: Option<String>,
    /// Use device credentials: password = hex(HMAC-SHA256(secret, "user@domain")).
    #[arg(long, env = "TERN_BENCH_DEVICE_SECRET", hide_env_values = true)]
    pub device_secret: Option<String>,
    /// Source addresses to bind, rotated per connection: a range `127.0.0.1-127.0.0.50` and/or a
    /// comma-separated list.
    #[arg(long, default_value = "127.0.0.1", value_parser = SourceIps::parse)]
    pub source_ips: SourceIps,
    /// Time limit for one login (connect to bind result), seconds.
    #[arg(long, default_value_t = 30.0)]
    pub login_timeout: f64,
    /// Do not resume TLS sessions (by default all clients share one session cache).
    #[arg(long)]
    pub no_resume: bool,
    /// TLS 1.3 cipher suite to offer first.
    #[arg(long, value_enum, default_value = "default")]
    pub prefer_suite: net::SuitePref,
    /// Worker processes (`auto` = one per 18,000 users; each process may hold ~19,000 sockets).
    #[arg(long, default_value = "auto", value_parser = parse_workers)]
    pub workers: WorkerCount,
    /// Tokio worker threads per process (default: CPUs available to the process; 1 = current-thread runtime).
    #[arg(long)]
    pub threads: Option<usize>,
    #[arg(long, hide = true)]
    pub worker_index: Option<u64>,
    #[arg(long, hide = true)]
    pub worker_count: Option<u64>,
}

#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    #[command(flatten)]
    pub login: Login,
    /// Number of users (sessions) to log in.
    #[arg(long, default_value_t = 1000)]
    pub users: u64,
    /// Index of the first user (`{i}` runs from here).
    #[arg(long, default_value_t = 0)]
    pub first_user: u64,
    /// Target logins per second (0 = as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Username pattern; `{i}` is the user index.
    #[arg(long, default_value = "bench-{i}")]
    pub user_pattern: String,
    /// Seconds to hold the sessions after the ramp, then close them and exit.
    #[arg(long, default_value_t = 10.0)]
    pub hold: f64,
    /// Seconds after the ramp before the idle server RSS is sampled (capped by --hold).
    #[arg(long, default_value_t = 5.0)]
    pub settle: f64,
    /// PID of the server: sample its RSS and CPU from /proc.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Overall time limit in seconds (ramp + hold).
    #[arg(long, default_value_t = 120.0)]
    pub timeout: f64,
    /// Show a progress bar on stderr while logging in (default: only when stderr is a terminal).
    #[arg(long)]
    pub progress: bool,
    /// Write an SVG plot: login-latency distribution, and server RSS against sessions during the
    /// ramp (with --server-pid).
    #[arg(long, value_name = "FILE")]
    pub plot: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.scenario {
        Scenario::Connect(args) => connect::main(args),
        Scenario::Push(args) => push::main(args),
        Scenario::Storm(args) => storm::main(args),
        Scenario::Chat(args) => chat::main(args),
        Scenario::Turn(args) => turn::main(args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "tern-bench",
            "connect",
            "--users",
            "10",
            "--device-secret",
            "0123456789abcdef",
            "--source-ips",
            "127.0.0.1-127.0.0.5",
            "--workers",
            "2",
        ])
        .unwrap();
        let Scenario::Connect(a) = cli.scenario else {
            panic!("expected connect");
        };
        assert_eq!(a.login.source_ips.0.len(), 5);
        assert_eq!(a.login.workers.0, Some(2));
        assert!(
            Cli::try_parse_from([
                "tern-bench",
                "connect",
                "--password-pattern",
                "x",
                "--device-secret",
                "y"
            ])
            .is_err()
        );
    }

    #[test]
    fn push_cli() {
        let cli = Cli::try_parse_from([
            "tern-bench",
            "push",
            "--users",
            "10",
            "--password-pattern",
            "p{i}",
            "--target",
            "ejabberd",
            "--rate",
            "10000",
            "--http-conns",
            "32",
        ])
        .unwrap();
        let Scenario::Push(a) = cli.scenario else {
            panic!("expected push");
        };
        assert_eq!((a.rate, a.http_conns, a.users), (10_000.0, 32, 10));
    }

    #[test]
    fn storm_cli() {
        let cli = Cli::try_parse_from([
            "tern-bench",
            "storm",
            "--users",
            "10",
            "--device-secret",
            "s",
            "--cut",
            "server-restart",
            "--cycles",
            "3",
            "--server-pid-file",
            "/tmp/pid",
            "--plot",
            "/tmp/x.svg",
        ])
        .unwrap();
        let Scenario::Storm(a) = cli.scenario else {
            panic!("expected storm");
        };
        assert_eq!(
            (a.cut, a.cycles, a.conn.users),
            (storm::Cut::ServerRestart, 3, 10)
        );
        assert!(a.conn.plot.is_some());
        // One PID source at a time.
        assert!(
            Cli::try_parse_from([
                "tern-bench",
                "storm",
                "--device-secret",
                "s",
                "--server-pid",
                "1",
                "--server-pid-file",
                "/tmp/pid"
            ])
            .is_err()
        );
    }
}

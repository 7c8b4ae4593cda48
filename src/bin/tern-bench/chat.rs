//! Scenario `chat`: tool-to-endpoint message exchange over plain c2s (RFC 6121 §5), so it runs
//! against any XMPP server (Tern, ejabberd, Prosody) with no server-specific API.
//!
//! N endpoint sessions log in through the `connect` fleet (worker processes included) and M tool
//! sessions log in in this process. Each tool sends `<message type='chat' id='tbc-N'>` to the
//! endpoints' bare JIDs in turn, at an aggregate `--rate` or, with `--rate 0`, as fast as the
//! echoes come back with at most `--window` messages unanswered per tool. An endpoint answers each
//! such message at once with the same id and body (see [`echo_reply`], called from the fleet's
//! hold loop).
//!
//! The body is the `push` stamp (`t=<send>;s=<due>;n=<seq>`, CLOCK_MONOTONIC ns, one clock for the
//! machine): endpoints record receive time − `t` (one-way tool → endpoint latency, the fleet's
//! push histogram), tools record echo time − `t` (round trip).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;
use serde::Serialize;
use tern::xmpp::framer::{Event, Stanza, escape};
use tokio::io::{AsyncWriteExt, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::client::TlsStream;

use crate::ConnectArgs;
use crate::client::{self, Phase, Session};
use crate::connect::{self, Fleet, USERS_PER_WORKER, round};
use crate::engine::{mono_ns, stopped};
use crate::net::{self};
use crate::push::{Stamp, body_text, parse_stamp, write_stamp};
use crate::stats::{Histogram, Percentiles, ServerMeter};

/// Id prefix of the tool's messages: endpoints echo only these, so other traffic (pushes,
/// server notices) is never answered.
const ID_PREFIX: &str = "tbc-";

#[derive(Debug, Clone, Args)]
pub struct ChatArgs {
    /// Endpoint sessions (receivers that echo).
    #[arg(long, default_value_t = 100)]
    pub endpoints: u64,
    /// Endpoint username pattern; `{i}` is the endpoint index.
    #[arg(long, default_value = "bench-{i}")]
    pub endpoint_pattern: String,
    /// Index of the first endpoint.
    #[arg(long, default_value_t = 0)]
    pub first_endpoint: u64,
    /// Tool sessions (senders), in this process.
    #[arg(long, default_value_t = 4)]
    pub tools: u64,
    /// Tool username pattern; `{i}` is the tool index (from 0).
    #[arg(long, default_value = "bench-tool-{i}")]
    pub tool_pattern: String,
    /// Messages per second from all tools together; 0 = as fast as the echoes come back, with at
    /// most --window unanswered messages per tool.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Unanswered messages per tool with --rate 0.
    #[arg(long, default_value_t = 16)]
    pub window: usize,
    /// Seconds of sending.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds to wait after sending for echoes still under way; later ones count as lost.
    #[arg(long, default_value_t = 5.0)]
    pub drain: f64,
    /// Seconds between the last login and the first message.
    #[arg(long, default_value_t = 1.0)]
    pub settle: f64,
    /// Extra filler bytes in each body (`;p=xxx…`).
    #[arg(long, default_value_t = 0)]
    pub body_pad: usize,
    /// How the clients connect and log in.
    #[command(flatten)]
    pub login: crate::Login,
    /// Logins per second during the ramp (0 = as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    pub login_rate: f64,
    /// PID of the server: report its CPU time and RSS over the exchange.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Overall time limit in seconds (logins + sending + drain).
    #[arg(long, default_value_t = 180.0)]
    pub timeout: f64,
}

impl ChatArgs {
    /// The endpoints as `connect` understands them (workers run the `connect` fleet, whose hold
    /// loop answers through [`echo_reply`]).
    fn endpoint_args(&self) -> ConnectArgs {
        ConnectArgs {
            login: self.login.clone(),
            users: self.endpoints,
            first_user: self.first_endpoint,
            rate: self.login_rate,
            user_pattern: self.endpoint_pattern.clone(),
            hold: 0.0,
            settle: 0.0,
            server_pid: None,
            json: self.json,
            timeout: self.timeout,
            progress: false,
            plot: None,
        }
    }

    /// The tools: the same login settings with their own user pattern and count.
    fn tool_args(&self) -> ConnectArgs {
        ConnectArgs {
            users: self.tools,
            first_user: 0,
            user_pattern: self.tool_pattern.clone(),
            ..self.endpoint_args()
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.endpoints == 0 || self.tools == 0 {
            bail!("--endpoints and --tools must be at least 1");
        }
        // One pattern may serve both (peers with accounts bench-0..N) when the ranges do not
        // overlap: tools are 0..tools, endpoints start at --first-endpoint.
        if self.endpoint_pattern == self.tool_pattern && self.first_endpoint < self.tools {
            bail!(
                "--tool-pattern equals --endpoint-pattern: give them different patterns, or \
                 --first-endpoint at least --tools so tools and endpoints are different users"
            );
        }
        if !(self.rate >= 0.0 && self.rate.is_finite()) {
            bail!("--rate must be a non-negative number");
        }
        if self.rate == 0.0 && self.window == 0 {
            bail!("--window must be at least 1 with --rate 0");
        }
        for (name, v) in [
            ("--duration", self.duration),
            ("--timeout", self.timeout),
            ("--login-timeout", self.login.login_timeout),
        ] {
            if !(v > 0.0 && v.is_finite()) {
                bail!("{name} must be positive");
            }
        }
        if !(self.drain >= 0.0 && self.settle >= 0.0) {
            bail!("--drain and --settle must not be negative");
        }
        Ok(())
    }
}

pub fn main(args: ChatArgs) -> anyhow::Result<()> {
    let conn = args.endpoint_args();
    let nofile = net::raise_nofile();
    let workers = match (args.login.worker_index, args.login.worker_count) {
        (Some(index), Some(count)) => return connect::run_worker(conn, index, count, None),
        (None, None) => args
            .login
            .workers
            .0
            .unwrap_or_else(|| args.endpoints.div_ceil(USERS_PER_WORKER).max(1)),
        _ => bail!("--worker-index and --worker-count go together"),
    };
    args.validate()?;
    let in_parent = if workers > 1 { 0 } else { args.endpoints };
    if in_parent + args.tools + 64 > nofile {
        eprintln!(
            "warning: {} connections in this process but the open-files limit is {nofile}; \
             use more --workers",
            in_parent + args.tools
        );
    }
    let rt = connect::runtime(if workers > 1 {
        1
    } else {
        connect::threads(&conn)
    })?;
    rt.block_on(orchestrate(args, conn, workers))
}

// ---------------------------------------------------------------------------------------------
// Endpoint side
// ---------------------------------------------------------------------------------------------

/// The endpoint's answer to a tool message: a chat message back to the sender's full JID with
/// the same id and body. `None` for anything else (other message types, ids without the tool
/// prefix, no `from`). The body is copied as written, so no unescaping/escaping round trip.
pub fn echo_reply(st: &Stanza) -> Option<Vec<u8>> {
    if st.name() != "message" || st.stanza_type().as_deref() != Some("chat") {
        return None;
    }
    let id = st.id()?;
    if !id.starts_with(ID_PREFIX) {
        return None;
    }
    let from = st.from()?;
    let body = body_text(st.raw())?;
    let mut out = Vec::with_capacity(body.len() + from.len() + id.len() + 64);
    out.extend_from_slice(b"<message type='chat' to='");
    out.extend_from_slice(escape(&from).as_bytes());
    out.extend_from_slice(b"' id='");
    out.extend_from_slice(escape(&id).as_bytes());
    out.extend_from_slice(b"'><body>");
    out.extend_from_slice(body);
    out.extend_from_slice(b"</body></message>");
    Some(out)
}

// ---------------------------------------------------------------------------------------------
// Tool side
// ---------------------------------------------------------------------------------------------

/// What the tool tasks share: the schedule and the counters.
struct Plan {
    /// Endpoint bare JIDs, XML-escaped.
    endpoints: Vec<String>,
    /// Nanoseconds between messages (aggregate) at a fixed rate; 0 = windowed.
    interval_ns: f64,
    window: usize,
    t0_ns: u64,
    end_ns: u64,
    pad: usize,
    /// Next message number (all tools draw from it, so the aggregate rate is the schedule's).
    next: AtomicU64,
    sent: AtomicU64,
    replies: AtomicU64,
    /// Echoes and error replies: when it reaches `sent`, nothing is under way.
    answered: AtomicU64,
    first_send_ns: AtomicU64,
    last_reply_ns: AtomicU64,
    rtt: Mutex<Histogram>,
    /// Error replies and lost tool sessions, by reason.
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Plan {
    fn error(&self, reason: String) {
        if let Ok(mut m) = self.errors.lock() {
            *m.entry(reason).or_default() += 1;
        }
    }

    /// Message number `seq` to its endpoint (round robin), stamped with `now` and its due time.
    fn message(&self, seq: u64, due_ns: u64, out: &mut Vec<u8>) {
        out.clear();
        let to = &self.endpoints[(seq % self.endpoints.len() as u64) as usize];
        out.extend_from_slice(b"<message type='chat' to='");
        out.extend_from_slice(to.as_bytes());
        out.extend_from_slice(format!("' id='{ID_PREFIX}{seq}'><body>").as_bytes());
        let stamp = Stamp {
            sent_ns: mono_ns(),
            due_ns,
            seq,
        };
        write_stamp(out, stamp, self.pad);
        out.extend_from_slice(b"</body></message>");
    }
}

type Writer = Arc<tokio::sync::Mutex<WriteHalf<TlsStream<TcpStream>>>>;

async fn write(w: &Writer, data: &[u8]) -> Result<(), client::Fail> {
    client::send(&mut *w.lock().await, data, Phase::Hold).await
}

/// One tool session: send on schedule (or within the window) until the end of the send window,
/// read echoes until stopped, then close the stream.
async fn tool_task(session: Session, plan: Arc<Plan>, mut stop: watch::Receiver<bool>) {
    let (mut rd, wr) = tokio::io::split(session.stream);
    let mut framer = session.framer;
    let wr: Writer = Arc::new(tokio::sync::Mutex::new(wr));
    let window = Arc::new(Semaphore::new(if plan.interval_ns > 0.0 {
        0
    } else {
        plan.window
    }));

    let sender = {
        let (plan, wr, window, mut stop) = (plan.clone(), wr.clone(), window.clone(), stop.clone());
        async move {
            let mut buf = Vec::with_capacity(256 + plan.pad);
            loop {
                if plan.interval_ns == 0.0 {
                    tokio::select! {
                        p = window.acquire() => match p { Ok(p) => p.forget(), Err(_) => return },
                        _ = stopped(&mut stop) => return,
                    }
                }
                let seq = plan.next.fetch_add(1, Ordering::Relaxed);
                let due_ns = if plan.interval_ns > 0.0 {
                    plan.t0_ns + (seq as f64 * plan.interval_ns) as u64
                } else {
                    mono_ns()
                };
                if due_ns >= plan.end_ns {
                    return;
                }
                let wait = Duration::from_nanos(due_ns.saturating_sub(mono_ns()));
                if !wait.is_zero() {
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stopped(&mut stop) => return,
                    }
                }
                plan.message(seq, due_ns, &mut buf);
                if let Err(f) = write(&wr, &buf).await {
                    plan.error(format!("tool-{}", f.reason()));
                    return;
                }
                let _ = plan.first_send_ns.compare_exchange(
                    0,
                    mono_ns(),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
                plan.sent.fetch_add(1, Ordering::Relaxed);
            }
        }
    };

    let reader = async {
        loop {
            let ev = tokio::select! {
                ev = client::next_event(&mut rd, &mut framer, Phase::Hold) => ev,
                _ = stopped(&mut stop) => return,
            };
            let st = match ev {
                Ok(Event::Stanza(st)) => st,
                Ok(Event::StreamClose) => return plan.error("tool-closed-by-server".into()),
                Ok(Event::StreamOpen(_)) => return plan.error("tool-unexpected-header".into()),
                Err(f) => return plan.error(format!("tool-{}", f.reason())),
            };
            match st.name() {
                "message" => {
                    let now = mono_ns();
                    let ours = st.id().is_some_and(|id| id.starts_with(ID_PREFIX));
                    if !ours {
                        continue;
                    }
                    if st.stanza_type().as_deref() == Some("error") {
                        let cond = st
                            .first_child()
                            .map(|(n, _)| n)
                            .unwrap_or_else(|| "unknown".into());
                        plan.error(format!("message-error:{cond}"));
                    } else if let Some(stamp) = parse_stamp(st.raw()) {
                        plan.replies.fetch_add(1, Ordering::Relaxed);
                        plan.last_reply_ns.fetch_max(now, Ordering::Relaxed);
                        if let Ok(mut h) = plan.rtt.lock() {
                            h.record(now.saturating_sub(stamp.sent_ns) / 1000);
                        }
                    }
                    plan.answered.fetch_add(1, Ordering::Relaxed);
                    window.add_permits(1);
                }
                "stream:error" => {
                    let cond = st.first_child().map(|(n, _)| n).unwrap_or_default();
                    return plan.error(format!("tool-stream-error:{cond}"));
                }
                _ => {
                    if let Some(reply) = client::ping_reply(&st)
                        && let Err(f) = write(&wr, reply.as_bytes()).await
                    {
                        return plan.error(format!("tool-{}", f.reason()));
                    }
                }
            }
        }
    };
    tokio::join!(sender, reader);
    let close = async {
        let mut w = wr.lock().await;
        w.write_all(b"</stream:stream>").await?;
        w.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), close).await;
}

/// Log the tools in, all at once (there are few), each bounded by the login timeout.
async fn login_tools(args: &ChatArgs) -> anyhow::Result<(Vec<Session>, BTreeMap<String, u64>)> {
    let ctx = connect::client_ctx(&args.tool_args())?;
    let limit = Duration::from_secs_f64(args.login.login_timeout);
    let logins = (0..args.tools).map(|i| {
        let ctx = ctx.clone();
        async move {
            let phase = AtomicU8::new(Phase::Connect as u8);
            match tokio::time::timeout(limit, client::login(&ctx, i, &phase)).await {
                Ok(r) => r.map_err(|f| f.reason()),
                Err(_) => Err(format!(
                    "timeout:{}",
                    Phase::from_u8(phase.load(Ordering::Relaxed)).name()
                )),
            }
        }
    });
    let mut sessions = Vec::new();
    let mut failures = BTreeMap::new();
    for r in futures::future::join_all(logins).await {
        match r {
            Ok(s) => sessions.push(s),
            Err(reason) => *failures.entry(format!("tool:{reason}")).or_default() += 1,
        }
    }
    Ok((sessions, failures))
}

// ---------------------------------------------------------------------------------------------
// Orchestration
// ---------------------------------------------------------------------------------------------

async fn orchestrate(args: ChatArgs, conn: ConnectArgs, workers: u64) -> anyhow::Result<()> {
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.timeout);
    let mut server = ServerMeter::new(args.server_pid)?;

    // 1. Endpoints (fleet, maybe in workers) and tools (here) log in concurrently.
    let fleet = Fleet::start(&conn, workers, deadline, None)?;
    let (tools, mut login_failures) = login_tools(&args).await?;
    let mut timed_out = false;
    loop {
        let snap = fleet.snapshot();
        if snap.ramp_done {
            break;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            eprintln!("timeout: {} s elapsed during the logins", args.timeout);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let login_snap = fleet.snapshot();
    let login_secs = start.elapsed().as_secs_f64();
    eprintln!(
        "[{login_secs:6.1}s] endpoints {} of {} logged in, tools {} of {}; sending",
        login_snap.ok,
        args.endpoints,
        tools.len(),
        args.tools
    );
    if login_snap.ok < args.endpoints || tools.is_empty() || timed_out {
        let r = fleet.stop().await?;
        for (k, v) in r.failures {
            *login_failures.entry(k).or_default() += v;
        }
        bail!(
            "no exchange: endpoints ok {}/{}, tools ok {}/{}, failures {login_failures:?}",
            login_snap.ok,
            args.endpoints,
            tools.len(),
            args.tools
        );
    }
    tokio::time::sleep(Duration::from_secs_f64(args.settle)).await;

    // 2. Exchange.
    let endpoints = (0..args.endpoints)
        .map(|k| {
            let user = args
                .endpoint_pattern
                .replace("{i}", &(args.first_endpoint + k).to_string());
            escape(&format!("{user}@{}", args.login.domain)).into_owned()
        })
        .collect();
    let t0_ns = mono_ns() + 1_000_000;
    let send_for = Duration::from_secs_f64(args.duration)
        .min(deadline.saturating_duration_since(Instant::now()));
    let plan = Arc::new(Plan {
        endpoints,
        interval_ns: if args.rate > 0.0 {
            1e9 / args.rate
        } else {
            0.0
        },
        window: args.window,
        t0_ns,
        end_ns: t0_ns + send_for.as_nanos() as u64,
        pad: args.body_pad,
        next: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        replies: AtomicU64::new(0),
        answered: AtomicU64::new(0),
        first_send_ns: AtomicU64::new(0),
        last_reply_ns: AtomicU64::new(0),
        rtt: Mutex::new(Histogram::default()),
        errors: Mutex::new(BTreeMap::new()),
    });
    let rx_before = fleet.snapshot().rx;
    server.restart();
    let bench_before = fleet.snapshot().cpu_ms;
    let (stop_tx, stop_rx) = watch::channel(false);
    let tasks: Vec<_> = tools
        .into_iter()
        .map(|s| tokio::spawn(tool_task(s, plan.clone(), stop_rx.clone())))
        .collect();
    let send_end = Instant::now() + send_for;
    let drain_end = (send_end + Duration::from_secs_f64(args.drain))
        .min(deadline.max(send_end + Duration::from_secs(1)));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut prev = (Instant::now(), 0u64);
    loop {
        let now = Instant::now();
        let (sent, replies) = (
            plan.sent.load(Ordering::Relaxed),
            plan.replies.load(Ordering::Relaxed),
        );
        if now >= drain_end || (now >= send_end && plan.answered.load(Ordering::Relaxed) >= sent) {
            break;
        }
        tokio::select! {
            _ = tick.tick() => {
                let dt = now.duration_since(prev.0).as_secs_f64().max(1e-3);
                let mut line = format!(
                    "[{:6.1}s] sent {sent}  replies {replies} (+{:.0}/s)  delivered {}",
                    start.elapsed().as_secs_f64(),
                    replies.saturating_sub(prev.1) as f64 / dt,
                    fleet.snapshot().rx.saturating_sub(rx_before),
                );
                if let Some(s) = server.sample() {
                    line += &format!("  | server rss {:.1} MiB", s.rss_kib as f64 / 1024.0);
                }
                eprintln!("{line}");
                prev = (now, replies);
            }
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    let server_cpu_secs = server.cpu_secs();
    let bench_cpu_ms = fleet.snapshot().cpu_ms.saturating_sub(bench_before);
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    // Workers report every 200 ms: let the last report arrive before stopping.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let result = fleet.stop().await?;
    for (k, v) in &result.failures {
        *login_failures.entry(k.clone()).or_default() += v;
    }

    let sent = plan.sent.load(Ordering::Relaxed);
    let replies = plan.replies.load(Ordering::Relaxed);
    let first = plan.first_send_ns.load(Ordering::Relaxed);
    let last = plan.last_reply_ns.load(Ordering::Relaxed);
    let secs = last.saturating_sub(first) as f64 / 1e9;
    let rtt = plan.rtt.lock().map(|h| h.clone()).unwrap_or_default();
    let report = Report {
        scenario: "chat",
        server: args.login.server.to_string(),
        endpoints: args.endpoints,
        tools: args.tools,
        workers,
        rate_target: args.rate,
        window: args.window,
        duration_target: args.duration,
        login_secs: round(login_secs, 3),
        login_failures,
        sessions_dropped: result.snapshot.dropped,
        sent,
        delivered: result.snapshot.rx.saturating_sub(rx_before),
        replies,
        lost: sent.saturating_sub(replies),
        errors: plan.errors.lock().map(|m| m.clone()).unwrap_or_default(),
        exchange_secs: round(secs, 3),
        msgs_per_sec: round(
            if secs > 0.0 {
                replies as f64 / secs
            } else {
                0.0
            },
            1,
        ),
        rtt_us: Percentiles::from(&rtt),
        one_way_us: Percentiles::from(&result.push_latency_us),
        bench_cpu_util: round(
            bench_cpu_ms as f64 / 1000.0 / send_for.as_secs_f64().max(1e-3),
            3,
        ),
        server_cpu_secs: server_cpu_secs.map(|c| round(c, 3)),
        server_rss_kib: server.rss_kib(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Serialize)]
struct Report {
    scenario: &'static str,
    server: String,
    endpoints: u64,
    tools: u64,
    workers: u64,
    rate_target: f64,
    window: usize,
    duration_target: f64,
    login_secs: f64,
    login_failures: BTreeMap<String, u64>,
    /// Endpoint sessions lost during the run.
    sessions_dropped: u64,
    /// Messages the tools wrote.
    sent: u64,
    /// Messages the endpoints received.
    delivered: u64,
    /// Echoes the tools received.
    replies: u64,
    /// sent − replies after the drain.
    lost: u64,
    /// Error replies and tool failures, by reason.
    errors: BTreeMap<String, u64>,
    /// First message written → last echo read.
    exchange_secs: f64,
    /// Round trips completed per second over `exchange_secs`.
    msgs_per_sec: f64,
    /// Tool → endpoint → tool, µs.
    rtt_us: Percentiles,
    /// Tool → endpoint, µs.
    one_way_us: Percentiles,
    /// This process and its workers' CPU over the send window, as a fraction of one core.
    bench_cpu_util: f64,
    /// Server CPU from the first message to the end of the drain.
    server_cpu_secs: Option<f64>,
    /// Peak server RSS over the same window.
    server_rss_kib: Option<u64>,
}

impl Report {
    fn table(&self) -> String {
        let mut o = String::new();
        let mut row = |k: &str, v: String| o.push_str(&format!("  {k:<22} {v}\n"));
        let rate = if self.rate_target > 0.0 {
            format!("{}/s", self.rate_target)
        } else {
            format!("max (window {} per tool)", self.window)
        };
        row(
            "scenario",
            format!(
                "chat {} endpoints, {} tools, rate {rate}, {} process(es)",
                self.endpoints, self.tools, self.workers
            ),
        );
        row(
            "messages",
            format!(
                "sent {}  delivered {}  replies {}  lost {}",
                self.sent, self.delivered, self.replies, self.lost
            ),
        );
        for (k, v) in self.errors.iter().chain(&self.login_failures) {
            row("error", format!("{v:>7}  {k}"));
        }
        row(
            "throughput",
            format!(
                "{:.1} round trips/s over {:.2} s",
                self.msgs_per_sec, self.exchange_secs
            ),
        );
        let p = |p: &Percentiles| {
            format!(
                "p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms",
                p.p50 as f64 / 1e3,
                p.p99 as f64 / 1e3,
                p.max as f64 / 1e3
            )
        };
        row("round trip", p(&self.rtt_us));
        row("one way", p(&self.one_way_us));
        row(
            "bench CPU",
            format!("{:.0}% of one core", self.bench_cpu_util * 100.0),
        );
        if let (Some(c), Some(r)) = (self.server_cpu_secs, self.server_rss_kib) {
            row(
                "server",
                format!("CPU {c:.2} s, peak RSS {:.1} MiB", r as f64 / 1024.0),
            );
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern::xmpp::framer::{Framer, FramerLimits};

    fn stanza(xml: &str) -> Stanza {
        let mut f = Framer::new(FramerLimits::default());
        f.push(b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams'>");
        assert!(matches!(f.next(), Ok(Some(Event::StreamOpen(_)))));
        f.push(xml.as_bytes());
        match f.next() {
            Ok(Some(Event::Stanza(s))) => s,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn echo_keeps_id_and_body_and_answers_the_sender() {
        let st = stanza(
            "<message type='chat' from='t@h/r&amp;1' to='e@h' id='tbc-7'>\
             <body>t=5;s=4;n=7;p=xx</body></message>",
        );
        let reply = String::from_utf8(echo_reply(&st).unwrap()).unwrap();
        assert_eq!(
            reply,
            "<message type='chat' to='t@h/r&amp;1' id='tbc-7'><body>t=5;s=4;n=7;p=xx</body></message>"
        );
        let stamp = parse_stamp(reply.as_bytes()).unwrap();
        assert_eq!((stamp.sent_ns, stamp.due_ns, stamp.seq), (5, 4, 7));
        for other in [
            "<message type='chat' from='a@h/r' id='x-1'><body>t=1;s=1;n=1</body></message>",
            "<message type='normal' from='a@h/r' id='tbc-1'><body>t=1;s=1;n=1</body></message>",
            "<message type='chat' id='tbc-1'><body>t=1;s=1;n=1</body></message>",
            "<message type='chat' from='a@h/r' id='tbc-1'/>",
        ] {
            assert!(echo_reply(&stanza(other)).is_none(), "{other}");
        }
    }

    #[test]
    fn tool_messages_carry_a_stamp_for_their_endpoint() {
        let plan = Plan {
            endpoints: vec!["e0@h".into(), "e1@h".into()],
            interval_ns: 0.0,
            window: 1,
            t0_ns: 0,
            end_ns: 0,
            pad: 3,
            next: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            replies: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            first_send_ns: AtomicU64::new(0),
            last_reply_ns: AtomicU64::new(0),
            rtt: Mutex::new(Histogram::default()),
            errors: Mutex::new(BTreeMap::new()),
        };
        let mut buf = Vec::new();
        plan.message(3, 42, &mut buf);
        let st = stanza(std::str::from_utf8(&buf).unwrap());
        assert_eq!(st.to().as_deref(), Some("e1@h"));
        assert_eq!(st.id().as_deref(), Some("tbc-3"));
        let stamp = parse_stamp(&buf).unwrap();
        assert_eq!((stamp.due_ns, stamp.seq), (42, 3));
        assert!(stamp.sent_ns > 0);
    }
}

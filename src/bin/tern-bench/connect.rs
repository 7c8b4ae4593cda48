//! Scenario `connect`: log N users in (paced, bounded concurrency), hold the idle sessions, and
//! report login rate, login latency, failures and — with `--server-pid` — the server's memory per
//! session and CPU per login.
//!
//! Above ~18,000 users the process re-executes itself as worker processes (each with a share of
//! the users) because of the open-files limit; workers talk to the parent in JSON lines
//! (`{"progress":…}` repeatedly, `{"result":…}` at the end) and stop when their stdin closes.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rustls::pki_types::ServerName;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::watch;
use tokio_rustls::TlsConnector;

use crate::client::{ClientCtx, Password, TlsMode};
use crate::engine::{self, Counters, FleetParams, FleetResult, Share, Snapshot};
use crate::progress::Bar;
use crate::stats::{self, ProcSample};
use crate::storm::{self, Storm};
use crate::{ConnectArgs, net, plot};

/// Users per worker process when `--workers auto` (the fd limit is 20,000 per process).
pub const USERS_PER_WORKER: u64 = 18_000;

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum WorkerMsg {
    Progress(Snapshot),
    Result(Box<FleetResult>),
}

pub fn main(args: ConnectArgs) -> anyhow::Result<()> {
    let workers = match role(&args, 0)? {
        Role::Worker { index, count } => return run_worker(args, index, count, None),
        Role::Parent { workers } => workers,
    };
    let rt = runtime(if workers > 1 { 1 } else { threads(&args) })?;
    rt.block_on(orchestrate(args, workers))
}

/// Whether this process is a worker (started by a parent with `--worker-index/--worker-count`)
/// or the parent, and then with how many worker processes.
pub(crate) enum Role {
    Worker { index: u64, count: u64 },
    Parent { workers: u64 },
}

/// Raise the open-files limit and decide this process's role; a parent warns when its share of
/// connections (plus `extra_fds`) would not fit under the limit.
pub(crate) fn role(args: &ConnectArgs, extra_fds: u64) -> anyhow::Result<Role> {
    let nofile = net::raise_nofile();
    let workers = match (args.login.worker_index, args.login.worker_count) {
        (Some(index), Some(count)) => return Ok(Role::Worker { index, count }),
        (None, None) => args
            .login
            .workers
            .0
            .unwrap_or_else(|| args.users.div_ceil(USERS_PER_WORKER).max(1)),
        _ => bail!("--worker-index and --worker-count go together"),
    };
    let per_process = Share {
        first: 0,
        users: args.users,
        index: 0,
        count: workers.max(1),
    }
    .len();
    if per_process + extra_fds + 64 > nofile {
        eprintln!(
            "warning: {per_process} connections per process but the open-files limit is {nofile}; \
             use more --workers"
        );
    }
    Ok(Role::Parent { workers })
}

pub(crate) fn threads(args: &ConnectArgs) -> usize {
    args.login
        .threads
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
        .max(1)
}

pub(crate) fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let rt = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?
    };
    Ok(rt)
}

pub(crate) fn client_ctx(args: &ConnectArgs) -> anyhow::Result<Arc<ClientCtx>> {
    let password = match (&args.login.password_pattern, &args.login.device_secret) {
        (Some(p), None) => Password::Pattern(p.clone()),
        (None, Some(s)) => Password::Device(s.clone()),
        _ => bail!("give exactly one of --password-pattern and --device-secret"),
    };
    let sni = args
        .login
        .sni
        .clone()
        .unwrap_or_else(|| args.login.domain.clone());
    let server_name =
        ServerName::try_from(sni).context("--sni / --domain is not a valid TLS server name")?;
    let config = net::client_config(
        !args.login.no_resume,
        1024,
        args.login.tls == TlsMode::Direct,
        args.login.prefer_suite,
    )?;
    Ok(Arc::new(ClientCtx {
        server: args.login.server,
        mode: args.login.tls,
        domain: args.login.domain.clone(),
        server_name,
        connector: TlsConnector::from(config),
        user_pattern: args.user_pattern.clone(),
        password,
        source_ips: args.login.source_ips.clone(),
    }))
}

fn fleet_params(
    args: &ConnectArgs,
    share: Share,
    deadline: Instant,
    storm: Option<Arc<Storm>>,
) -> FleetParams {
    let count = share.count.max(1);
    FleetParams {
        share,
        rate: args.rate / count as f64,
        concurrency: args.login.concurrency.div_ceil(count as usize).max(1),
        login_timeout: Duration::from_secs_f64(args.login.login_timeout),
        deadline,
        storm,
    }
}

/// The counters of this process, with the storm's per-cycle figures when there is a storm.
fn local_snapshot(counters: &Counters, storm: Option<&Arc<Storm>>) -> Snapshot {
    let mut s = counters.snapshot();
    if let Some(storm) = storm {
        storm.fill(&mut s);
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Worker process
// ---------------------------------------------------------------------------------------------

fn emit(msg: &WorkerMsg) {
    use std::io::Write;
    if let Ok(line) = serde_json::to_string(msg) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// A worker process: run this share of the fleet, report progress and the result on stdout, and
/// follow the parent's stdin (`stop` or EOF; storm commands such as `cut 1 <unix µs>`).
pub(crate) fn run_worker(
    args: ConnectArgs,
    index: u64,
    count: u64,
    storm: Option<Arc<Storm>>,
) -> anyhow::Result<()> {
    let rt = runtime(threads(&args))?;
    rt.block_on(async move {
        let ctx = client_ctx(&args)?;
        let start = Instant::now();
        let timeout = Duration::from_secs_f64(args.timeout);
        let share = Share {
            first: args.first_user,
            users: args.users,
            index,
            count,
        };
        let params = fleet_params(&args, share, start + timeout, storm.clone());
        let counters = Arc::new(Counters::default());
        let (stop_tx, stop_rx) = watch::channel(false);
        let fleet = tokio::spawn(engine::run(ctx, params, counters.clone(), stop_rx));
        // The parent closes our stdin (or writes "stop") to end the hold.
        let stdin_stop = stop_tx.clone();
        let stdin_storm = storm.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(tokio::io::stdin()).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                if l.trim() == "stop" {
                    break;
                }
                match (&stdin_storm, storm::Cmd::parse(&l)) {
                    (Some(s), Some(cmd)) => s.apply(cmd),
                    _ => eprintln!("worker {index}: ignoring {l:?}"),
                }
            }
            let _ = stdin_stop.send(true);
        });
        // Failsafe if the parent vanishes without closing the pipe.
        let bound = storm.as_ref().map_or(timeout, |s| s.run_bound());
        let failsafe = start + bound + Duration::from_secs(15);
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        let mut fleet = fleet;
        loop {
            tokio::select! {
                r = &mut fleet => {
                    let result = r.context("fleet task")?;
                    emit(&WorkerMsg::Result(Box::new(result)));
                    return Ok(());
                }
                _ = tick.tick() => {
                    emit(&WorkerMsg::Progress(local_snapshot(&counters, storm.as_ref())));
                    if Instant::now() >= failsafe {
                        let _ = stop_tx.send(true);
                    }
                }
            }
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Parent: one in-process fleet or several worker processes
// ---------------------------------------------------------------------------------------------

pub(crate) enum Fleet {
    Local {
        counters: Arc<Counters>,
        storm: Option<Arc<Storm>>,
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<FleetResult>,
    },
    Workers {
        children: Vec<Child>,
        stdins: Vec<ChildStdin>,
        latest: Arc<Mutex<Vec<Snapshot>>>,
        readers: Vec<tokio::task::JoinHandle<Option<FleetResult>>>,
    },
}

impl Fleet {
    /// Start the fleet in this process or in `workers` worker processes. `storm` is this
    /// process's storm state (workers build their own from the same command line).
    pub(crate) fn start(
        args: &ConnectArgs,
        workers: u64,
        deadline: Instant,
        storm: Option<Arc<Storm>>,
    ) -> anyhow::Result<Fleet> {
        if workers <= 1 {
            let ctx = client_ctx(args)?;
            let share = Share {
                first: args.first_user,
                users: args.users,
                index: 0,
                count: 1,
            };
            let counters = Arc::new(Counters::default());
            let (stop, stop_rx) = watch::channel(false);
            let task = tokio::spawn(engine::run(
                ctx,
                fleet_params(args, share, deadline, storm.clone()),
                counters.clone(),
                stop_rx,
            ));
            return Ok(Fleet::Local {
                counters,
                storm,
                stop,
                task,
            });
        }
        client_ctx(args)?; // validate arguments once, before spawning anything
        let exe = std::env::current_exe().context("cannot find own executable")?;
        let argv: Vec<_> = std::env::args_os().skip(1).collect();
        let latest = Arc::new(Mutex::new(vec![Snapshot::default(); workers as usize]));
        let (mut children, mut stdins, mut readers) = (Vec::new(), Vec::new(), Vec::new());
        for index in 0..workers {
            let mut child = Command::new(&exe)
                .args(&argv)
                .arg("--worker-index")
                .arg(index.to_string())
                .arg("--worker-count")
                .arg(workers.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("spawning worker {index}"))?;
            let stdout = child.stdout.take().context("worker stdout")?;
            stdins.push(child.stdin.take().context("worker stdin")?);
            let latest = latest.clone();
            readers.push(tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                let mut result = None;
                while let Ok(Some(line)) = lines.next_line().await {
                    match serde_json::from_str::<WorkerMsg>(&line) {
                        Ok(WorkerMsg::Progress(s)) => {
                            if let Ok(mut l) = latest.lock() {
                                l[index as usize] = s;
                            }
                        }
                        Ok(WorkerMsg::Result(r)) => result = Some(*r),
                        Err(e) => eprintln!("worker {index}: bad message ({e}): {line}"),
                    }
                }
                result
            }));
            children.push(child);
        }
        Ok(Fleet::Workers {
            children,
            stdins,
            latest,
            readers,
        })
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        match self {
            Fleet::Local {
                counters, storm, ..
            } => local_snapshot(counters, storm.as_ref()),
            Fleet::Workers { latest, .. } => {
                let mut s = latest
                    .lock()
                    .map(|l| Snapshot::sum(l.iter()))
                    .unwrap_or_default();
                s.cpu_ms += stats::cpu_ms("self").unwrap_or(0);
                s
            }
        }
    }

    /// Hand a storm command to every client of the fleet (a line on each worker's stdin).
    pub(crate) async fn command(&mut self, cmd: storm::Cmd) -> anyhow::Result<()> {
        match self {
            Fleet::Local { storm, .. } => {
                if let Some(s) = storm {
                    s.apply(cmd);
                }
            }
            Fleet::Workers { stdins, .. } => {
                let line = format!("{}\n", cmd.line());
                for (i, stdin) in stdins.iter_mut().enumerate() {
                    stdin
                        .write_all(line.as_bytes())
                        .await
                        .with_context(|| format!("telling worker {i}: {line}"))?;
                    stdin.flush().await?;
                }
            }
        }
        Ok(())
    }

    pub(crate) async fn stop(self) -> anyhow::Result<FleetResult> {
        match self {
            Fleet::Local { stop, task, .. } => {
                let _ = stop.send(true);
                Ok(task.await?)
            }
            Fleet::Workers {
                mut children,
                stdins,
                readers,
                ..
            } => {
                drop(stdins); // EOF on stdin = stop
                let mut total = FleetResult::default();
                let mut first = true;
                for (i, r) in readers.into_iter().enumerate() {
                    match tokio::time::timeout(Duration::from_secs(30), r).await {
                        Ok(Ok(Some(res))) => {
                            if first {
                                total = res;
                                first = false;
                            } else {
                                total.merge(&res);
                            }
                        }
                        _ => eprintln!("worker {i} gave no result"),
                    }
                }
                for c in &mut children {
                    if tokio::time::timeout(Duration::from_secs(5), c.wait())
                        .await
                        .is_err()
                    {
                        let _ = c.start_kill();
                    }
                }
                Ok(total)
            }
        }
    }
}

/// What [`wait_ramp`] saw.
pub(crate) struct Ramp {
    pub timed_out: bool,
    /// (sessions established, server RSS KiB) every 100 ms during the ramp, with a server PID:
    /// the memory-per-session curve of `--plot`.
    pub rss: Vec<(u64, u64)>,
}

/// Wait until every login of the ramp has finished (or `deadline`), sampling the server through
/// `sample` every 100 ms. Progress goes to stderr: a bar on a terminal (or with `--progress`),
/// otherwise one log line per second.
pub(crate) async fn wait_ramp(
    fleet: &Fleet,
    users: u64,
    deadline: Instant,
    bar: &mut Bar,
    sample: &mut dyn FnMut() -> Option<ProcSample>,
) -> Ramp {
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut next_print = start + Duration::from_secs(1);
    let first = sample();
    let mut rss: Vec<(u64, u64)> = first.iter().map(|s| (0, s.rss_kib)).collect();
    // Previous log line: time, logins ok, server CPU ms, bench CPU ms.
    let mut prev = (
        start,
        0u64,
        first.map_or(0, |s| s.cpu_ms),
        fleet.snapshot().cpu_ms,
    );
    let mut timed_out = false;
    loop {
        tick.tick().await;
        let snap = fleet.snapshot();
        let now = Instant::now();
        let server = sample();
        if let Some(s) = server {
            rss.push((snap.active, s.rss_kib));
        }
        if snap.ramp_done {
            break;
        }
        if now >= deadline {
            timed_out = true;
            break;
        }
        let secs = now.duration_since(start).as_secs_f64();
        if bar.enabled() {
            let mut text = format!(
                "{:.0}/s  failed {}  in-flight {}",
                snap.ok as f64 / secs.max(1e-3),
                snap.failed,
                snap.in_flight()
            );
            if let Some(s) = server {
                text += &format!("  server {:.1} MiB", s.rss_kib as f64 / 1024.0);
            }
            bar.draw("logins", snap.ok, users, &text);
        } else if now >= next_print {
            next_print += Duration::from_secs(1);
            let dt = now.duration_since(prev.0).as_secs_f64().max(1e-3);
            let mut line = format!(
                "[{secs:6.1}s] ok {:>7}/{users} (+{:.0}/s)  failed {}  in-flight {}",
                snap.ok,
                snap.ok.saturating_sub(prev.1) as f64 / dt,
                snap.failed,
                snap.in_flight(),
            );
            if let Some(s) = server {
                line += &format!(
                    "  | server rss {:.1} MiB cpu {:.0}%",
                    s.rss_kib as f64 / 1024.0,
                    (s.cpu_ms.saturating_sub(prev.2)) as f64 / 10.0 / dt
                );
                prev.2 = s.cpu_ms;
            }
            line += &format!(
                "  | bench cpu {:.0}%",
                snap.cpu_ms.saturating_sub(prev.3) as f64 / 10.0 / dt
            );
            eprintln!("{line}");
            prev = (now, snap.ok, prev.2, snap.cpu_ms);
        }
    }
    bar.finish();
    if timed_out {
        eprintln!("timeout: logins were still running at the deadline");
    }
    Ramp { timed_out, rss }
}

/// Server process samples taken during the run.
#[derive(Default)]
struct ServerWatch {
    pid: Option<u32>,
    before: Option<ProcSample>,
    ramp_end: Option<ProcSample>,
    after: Option<ProcSample>,
    peak_rss_kib: u64,
    last: Option<ProcSample>,
}

impl ServerWatch {
    fn sample(&mut self) -> Option<ProcSample> {
        let s = stats::sample(self.pid?)?;
        self.peak_rss_kib = self.peak_rss_kib.max(s.rss_kib);
        self.last = Some(s);
        Some(s)
    }
}

async fn orchestrate(args: ConnectArgs, workers: u64) -> anyhow::Result<()> {
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.timeout);
    let cpu_start = stats::cpu_ms("self").unwrap_or(0);
    let mut server = ServerWatch {
        pid: args.server_pid,
        ..ServerWatch::default()
    };
    if let Some(pid) = args.server_pid {
        server.before = Some(
            server
                .sample()
                .with_context(|| format!("cannot read /proc/{pid}/status and stat"))?,
        );
    }

    let fleet = Fleet::start(&args, workers, deadline, None)?;
    let fleet_start = Instant::now();
    let mut bar = Bar::new(args.progress);
    let ramp = wait_ramp(&fleet, args.users, deadline, &mut bar, &mut || {
        server.sample()
    })
    .await;
    let timed_out = ramp.timed_out;
    let ramp_end = Instant::now();
    let ramp_snap = fleet.snapshot();
    server.ramp_end = server.sample();

    // Hold: sample the server once per second; the idle-memory sample is taken after `settle`.
    let hold_end = (ramp_end + Duration::from_secs_f64(args.hold)).min(deadline.max(ramp_end));
    let settle_at = (ramp_end + Duration::from_secs_f64(args.settle)).min(hold_end);
    let mut sessions_at_sample = 0;
    let mut sampled = false;
    let mut next = ramp_end + Duration::from_secs(1);
    loop {
        let now = Instant::now();
        if !sampled && now >= settle_at {
            server.after = server.sample();
            sessions_at_sample = fleet.snapshot().active;
            sampled = true;
        }
        if now >= hold_end {
            break;
        }
        if now >= next {
            next += Duration::from_secs(1);
            let snap = fleet.snapshot();
            let mut line = format!(
                "[{:6.1}s] holding {} sessions  dropped {}  pings {}",
                now.duration_since(fleet_start).as_secs_f64(),
                snap.active,
                snap.dropped,
                snap.pings
            );
            if let Some(s) = server.sample() {
                line += &format!("  | server rss {:.1} MiB", s.rss_kib as f64 / 1024.0);
            }
            eprintln!("{line}");
        }
        let wake = [next, hold_end, if sampled { hold_end } else { settle_at }]
            .into_iter()
            .min()
            .unwrap_or(hold_end);
        tokio::time::sleep_until(wake.into()).await;
    }
    let result = fleet.stop().await?;
    if let Some(path) = &args.plot {
        plot::write(
            path,
            &format!("tern-bench connect: {} users", args.users),
            "login latency",
            &[plot::Series::of_histogram(
                "login",
                &result.latency_us,
                None,
            )],
            &ramp.rss,
        )?;
    }
    let report = Report::build(
        &args,
        workers,
        &result,
        &ramp_snap,
        &server,
        sessions_at_sample,
        Timing {
            ramp_wall: ramp_end.duration_since(fleet_start),
            harness_cpu_ms: ramp_snap.cpu_ms.saturating_sub(cpu_start),
            timed_out,
        },
    );
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

struct Timing {
    ramp_wall: Duration,
    harness_cpu_ms: u64,
    timed_out: bool,
}

#[derive(Debug, Serialize)]
pub(crate) struct Latency {
    pub samples: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Latency {
    pub(crate) fn of(h: &stats::Histogram) -> Latency {
        Latency {
            samples: h.count(),
            p50_ms: ms(h.quantile(0.5)),
            p90_ms: ms(h.quantile(0.9)),
            p99_ms: ms(h.quantile(0.99)),
            p999_ms: ms(h.quantile(0.999)),
            max_ms: ms(h.max()),
            mean_ms: ms(h.mean() as u64),
        }
    }
}

#[derive(Debug, Serialize)]
struct ServerReport {
    pid: u32,
    rss_before_kib: u64,
    rss_after_kib: u64,
    rss_peak_kib: u64,
    /// Sessions established when `rss_after_kib` was sampled.
    sessions_at_sample: u64,
    kib_per_session: Option<f64>,
    cpu_ramp_secs: f64,
    /// Server CPU during the ramp as a fraction of one core.
    cpu_ramp_util: f64,
    cpu_us_per_login: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    scenario: &'static str,
    server: String,
    tls: TlsMode,
    domain: String,
    users: u64,
    rate_target: f64,
    concurrency: usize,
    workers: u64,
    tls_resumption: bool,
    attempted: u64,
    ok: u64,
    failed: u64,
    failures: BTreeMap<String, u64>,
    tls_resumed: u64,
    /// Protocol version, cipher suite and key exchange of the first session.
    tls_params: Option<String>,
    /// First connect start to last bind result.
    ramp_secs: f64,
    login_rate: f64,
    latency: Latency,
    dropped_during_hold: u64,
    drops: BTreeMap<String, u64>,
    pings_answered: u64,
    /// Benchmark CPU during the ramp as a fraction of one core (all its processes).
    harness_cpu_ramp_util: f64,
    timed_out: bool,
    server_process: Option<ServerReport>,
}

/// Microseconds as milliseconds with three decimals (pushes and chats take well under one).
fn ms(us: u64) -> f64 {
    round(us as f64 / 1000.0, 3)
}

/// `x` rounded to `digits` decimals (report figures).
pub(crate) fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

impl Report {
    fn build(
        args: &ConnectArgs,
        workers: u64,
        r: &FleetResult,
        ramp: &Snapshot,
        server: &ServerWatch,
        sessions_at_sample: u64,
        t: Timing,
    ) -> Report {
        let s = &r.snapshot;
        let ramp_secs = if ramp.ok > 0 && ramp.last_ok_us > ramp.first_start_us {
            (ramp.last_ok_us - ramp.first_start_us) as f64 / 1e6
        } else {
            t.ramp_wall.as_secs_f64()
        };
        let wall = t.ramp_wall.as_secs_f64().max(1e-3);
        let server_process = match (server.pid, server.before, server.ramp_end) {
            (Some(pid), Some(before), Some(ramp_end)) => {
                let after = server.after.or(server.last).unwrap_or(ramp_end);
                let cpu_ms = ramp_end.cpu_ms.saturating_sub(before.cpu_ms);
                Some(ServerReport {
                    pid,
                    rss_before_kib: before.rss_kib,
                    rss_after_kib: after.rss_kib,
                    rss_peak_kib: server.peak_rss_kib,
                    sessions_at_sample,
                    kib_per_session: (sessions_at_sample > 0).then(|| {
                        round(
                            (after.rss_kib as f64 - before.rss_kib as f64)
                                / sessions_at_sample as f64,
                            2,
                        )
                    }),
                    cpu_ramp_secs: cpu_ms as f64 / 1000.0,
                    cpu_ramp_util: round(cpu_ms as f64 / 1000.0 / wall, 3),
                    cpu_us_per_login: (ramp.ok > 0)
                        .then(|| round(cpu_ms as f64 * 1000.0 / ramp.ok as f64, 1)),
                })
            }
            _ => None,
        };
        Report {
            scenario: "connect",
            server: args.login.server.to_string(),
            tls: args.login.tls,
            domain: args.login.domain.clone(),
            users: args.users,
            rate_target: args.rate,
            concurrency: args.login.concurrency,
            workers,
            tls_resumption: !args.login.no_resume,
            attempted: s.attempted,
            ok: s.ok,
            failed: s.failed,
            failures: r.failures.clone(),
            tls_resumed: s.resumed,
            tls_params: r.tls_params.clone(),
            ramp_secs: round(ramp_secs, 3),
            login_rate: round(
                if ramp_secs > 0.0 {
                    ramp.ok as f64 / ramp_secs
                } else {
                    0.0
                },
                1,
            ),
            latency: Latency::of(&r.latency_us),
            dropped_during_hold: s.dropped,
            drops: r.drops.clone(),
            pings_answered: s.pings,
            harness_cpu_ramp_util: round(t.harness_cpu_ms as f64 / 1000.0 / wall, 3),
            timed_out: t.timed_out,
            server_process,
        }
    }

    fn table(&self) -> String {
        let mut o = String::new();
        let mut row = |k: &str, v: String| o.push_str(&format!("  {k:<24} {v}\n"));
        let rate = if self.rate_target > 0.0 {
            format!("{}/s", self.rate_target)
        } else {
            "max".into()
        };
        row(
            "scenario",
            format!(
                "connect {} users, {:?} TLS, concurrency {}, rate {rate}, {} process(es){}",
                self.users,
                self.tls,
                self.concurrency,
                self.workers,
                if self.timed_out { ", TIMED OUT" } else { "" }
            ),
        );
        row(
            "logins ok",
            format!(
                "{} of {} attempted ({} failed)",
                self.ok, self.attempted, self.failed
            ),
        );
        row(
            "login rate",
            format!(
                "{:.1} logins/s over {:.2} s",
                self.login_rate, self.ramp_secs
            ),
        );
        let l = &self.latency;
        row(
            "login latency",
            format!(
                "p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms  (mean {:.2} ms)",
                l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms, l.mean_ms
            ),
        );
        row(
            "TLS",
            self.tls_params.clone().unwrap_or_else(|| "n/a".into()),
        );
        row("TLS sessions resumed", self.tls_resumed.to_string());
        for (k, v) in &self.failures {
            row("failure", format!("{v:>7}  {k}"));
        }
        row(
            "dropped while holding",
            self.dropped_during_hold.to_string(),
        );
        for (k, v) in &self.drops {
            row("drop", format!("{v:>7}  {k}"));
        }
        row("pings answered", self.pings_answered.to_string());
        row(
            "bench CPU during ramp",
            format!("{:.0}% of one core", self.harness_cpu_ramp_util * 100.0),
        );
        if let Some(s) = &self.server_process {
            row("server pid", s.pid.to_string());
            row(
                "server RSS before",
                format!("{:.1} MiB", s.rss_before_kib as f64 / 1024.0),
            );
            row(
                "server RSS idle",
                format!(
                    "{:.1} MiB with {} sessions",
                    s.rss_after_kib as f64 / 1024.0,
                    s.sessions_at_sample
                ),
            );
            row(
                "server RSS peak",
                format!("{:.1} MiB", s.rss_peak_kib as f64 / 1024.0),
            );
            row(
                "server KiB per session",
                s.kib_per_session
                    .map_or("n/a".into(), |k| format!("{k:.2}")),
            );
            row(
                "server CPU during ramp",
                format!(
                    "{:.2} s ({:.0}% of one core), {} per login",
                    s.cpu_ramp_secs,
                    s.cpu_ramp_util * 100.0,
                    s.cpu_us_per_login
                        .map_or("n/a".into(), |u| format!("{u:.0} µs"))
                ),
            );
        }
        o
    }
}

//! Scenario `storm`: N users log in (the `connect` fleet, worker processes included), then every
//! session is cut off at once and every client reconnects at once — what a NAT reboot, a network
//! failure or a server restart does to a fleet of devices. Repeated `--cycles` times.
//!
//! - `--cut client`: the harness resets every TCP connection itself (`SO_LINGER` 0, so an RST and
//!   no goodbye). The parent stamps the cut time and sends `cut <cycle> <unix µs>` to each worker
//!   (a line on its stdin), so all processes cut together and measure from the same instant.
//! - `--cut server-restart`: the harness arms the cycle (`arm <cycle>`), says so (stderr line,
//!   `--armed-file`, or runs `--restart-cmd` itself) and waits for the server to drop the sessions;
//!   the cut instant is the first drop any client saw. `--server-pid-file` is re-read at every
//!   sample so the restarted server (a new PID) is measured too.
//!
//! Dropped clients reconnect at once; a failed attempt is retried after a jittered back-off
//! (50 ms doubling to 800 ms, ×0.5–1.5), until `--timeout` after the cut. Each client's time back
//! (bind result) is reported to the parent, which merges them into one distribution per cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::ConnectArgs;
use crate::client::{self, ClientCtx, Phase, Session, TlsMode};
use crate::connect::{self, Fleet, Latency, Role, round, wait_ramp};
use crate::engine::{Counters, Snapshot, close_politely, hold_until, now_us, stopped};
use crate::plot;
use crate::progress::Bar;
use crate::stats::{self, Histogram, ProcSample};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cut {
    /// The harness resets all its connections at the same instant.
    Client,
    /// Someone restarts the server; the harness waits for the drops.
    ServerRestart,
}

impl Cut {
    fn name(self) -> &'static str {
        match self {
            Cut::Client => "client",
            Cut::ServerRestart => "server-restart",
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct StormArgs {
    #[command(flatten)]
    pub conn: ConnectArgs,
    /// Who cuts the sessions: the harness (`client`) or a server restart (`server-restart`).
    /// With a storm, `--timeout` bounds the login ramp and each cycle's reconnection, and
    /// `--hold` is the pause before each cut.
    #[arg(long, value_enum, default_value = "client")]
    pub cut: Cut,
    /// Storms to run, one after the other (each once everyone is back).
    #[arg(long, default_value_t = 1)]
    pub cycles: u64,
    /// File with the server's PID, re-read at every sample (a restarted server has a new PID).
    #[arg(long, value_name = "FILE", conflicts_with = "server_pid")]
    pub server_pid_file: Option<PathBuf>,
    /// `--cut server-restart`: shell command (`sh -c`) the harness runs when a cycle is armed,
    /// e.g. one that restarts the server; `{cycle}` is replaced by the cycle number.
    #[arg(long, value_name = "CMD")]
    pub restart_cmd: Option<String>,
    /// `--cut server-restart`: the harness writes the cycle number to this file when the cycle
    /// is armed (all sessions up, waiting for them to drop), for a script that restarts the server.
    #[arg(long, value_name = "FILE")]
    pub armed_file: Option<PathBuf>,
}

impl StormArgs {
    fn validate(&self) -> anyhow::Result<()> {
        if self.conn.users == 0 || self.cycles == 0 {
            bail!("--users and --cycles must be at least 1");
        }
        if self.cut == Cut::Client && (self.restart_cmd.is_some() || self.armed_file.is_some()) {
            bail!("--restart-cmd and --armed-file go with --cut server-restart");
        }
        if !(self.conn.timeout > 0.0 && self.conn.hold >= 0.0) {
            bail!("--timeout must be positive and --hold not negative");
        }
        Ok(())
    }
}

pub fn main(args: StormArgs) -> anyhow::Result<()> {
    let storm = Arc::new(Storm::new(&args));
    let workers = match connect::role(&args.conn, 0)? {
        Role::Worker { index, count } => {
            return connect::run_worker(args.conn, index, count, Some(storm));
        }
        Role::Parent { workers } => workers,
    };
    args.validate()?;
    let rt = connect::runtime(if workers > 1 {
        1
    } else {
        connect::threads(&args.conn)
    })?;
    rt.block_on(orchestrate(args, storm, workers))
}

// ---------------------------------------------------------------------------------------------
// Per-process storm state and the client's cycle loop
// ---------------------------------------------------------------------------------------------

/// Parent → worker commands (one line each on the worker's stdin).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmd {
    /// Drops from now on belong to this cycle (`--cut server-restart`).
    Arm(u64),
    /// Reset every session now; the cycle is measured from `at_us` (Unix µs).
    Cut { cycle: u64, at_us: u64 },
}

impl Cmd {
    pub fn line(&self) -> String {
        match self {
            Cmd::Arm(c) => format!("arm {c}"),
            Cmd::Cut { cycle, at_us } => format!("cut {cycle} {at_us}"),
        }
    }

    pub fn parse(line: &str) -> Option<Cmd> {
        let mut w = line.split_whitespace();
        let cmd = match (w.next()?, w.next()?.parse().ok()?) {
            ("arm", c) => Cmd::Arm(c),
            ("cut", cycle) => Cmd::Cut {
                cycle,
                at_us: w.next()?.parse().ok()?,
            },
            _ => return None,
        };
        w.next().is_none().then_some(cmd)
    }
}

/// One cycle as seen by one process (merged across processes by the parent).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CycleAcc {
    /// Unix µs the cycle is measured from: the parent's cut, or (server restart) the first drop.
    pub cut_at_us: u64,
    /// Clients whose session was cut or dropped.
    pub down: BTreeSet<u64>,
    /// Client → Unix µs its new session was bound.
    pub back_us: BTreeMap<u64, u64>,
    /// Clients that gave up (not back within `--timeout`).
    pub failed: BTreeSet<u64>,
    /// Reconnection attempts (each login try, retries included).
    pub attempts: u64,
    /// Failed attempts by reason (retried ones included).
    pub failures: BTreeMap<String, u64>,
}

impl CycleAcc {
    pub fn merge(&mut self, o: &CycleAcc) {
        self.note_cut(o.cut_at_us);
        self.down.extend(&o.down);
        self.back_us.extend(&o.back_us);
        self.failed.extend(&o.failed);
        self.attempts += o.attempts;
        for (k, v) in &o.failures {
            *self.failures.entry(k.clone()).or_default() += v;
        }
    }

    /// The earliest nonzero cut time wins.
    fn note_cut(&mut self, at_us: u64) {
        if at_us != 0 && (self.cut_at_us == 0 || at_us < self.cut_at_us) {
            self.cut_at_us = at_us;
        }
    }
}

/// The storm state of one process, shared by its clients.
#[derive(Debug)]
pub struct Storm {
    cut_mode: Cut,
    /// How long a client keeps trying after its cut.
    timeout: Duration,
    login_timeout: Duration,
    /// (cycle, cut Unix µs) of the latest `--cut client` cut; clients reset when it changes.
    cut: watch::Sender<(u64, u64)>,
    /// The cycle drops are counted in (0 = before any cycle: not reported).
    armed: AtomicU64,
    cycles: Mutex<BTreeMap<u64, CycleAcc>>,
    /// Longest the whole run can take (the ramp, then per cycle the pause, waiting for a server
    /// drop and the reconnection), for the workers' failsafe.
    run_bound: Duration,
}

/// Shortest pause before a cut: worker progress arrives every 200 ms, so the parent's count of
/// sessions up (the cycle's participants) is current.
const MIN_PAUSE: Duration = Duration::from_millis(300);

/// The pause before each cut: `--hold`, at least [`MIN_PAUSE`].
fn pause(conn: &ConnectArgs) -> Duration {
    Duration::from_secs_f64(conn.hold.max(0.0)).max(MIN_PAUSE)
}

/// Delay before retry number `n` (0-based): 50 ms doubling to 800 ms, ×0.5–1.5 so that clients
/// refused together do not come back in lockstep.
fn backoff(n: u32) -> Duration {
    let base = 50.0 * f64::from(1u32 << n.min(4));
    Duration::from_secs_f64(base * rand::random_range(0.5..1.5) / 1000.0)
}

impl Storm {
    fn new(args: &StormArgs) -> Storm {
        let timeout = Duration::from_secs_f64(args.conn.timeout.max(0.0));
        let pause = pause(&args.conn);
        let cycles = u32::try_from(args.cycles).unwrap_or(u32::MAX);
        let per_cycle = pause + 2 * timeout + Duration::from_secs(5);
        Storm {
            run_bound: timeout.saturating_add(per_cycle.saturating_mul(cycles)),
            cut_mode: args.cut,
            timeout,
            login_timeout: Duration::from_secs_f64(args.conn.login.login_timeout.max(0.0)),
            cut: watch::Sender::new((0, 0)),
            armed: AtomicU64::new(0),
            cycles: Mutex::new(BTreeMap::new()),
        }
    }

    fn with<R>(&self, cycle: u64, f: impl FnOnce(&mut CycleAcc) -> R) -> Option<R> {
        let mut cycles = self.cycles.lock().ok()?;
        Some(f(cycles.entry(cycle).or_default()))
    }

    pub fn apply(&self, cmd: Cmd) {
        match cmd {
            Cmd::Arm(cycle) => {
                self.with(cycle, |_| ());
                self.armed.store(cycle, Ordering::Release);
            }
            Cmd::Cut { cycle, at_us } => {
                self.with(cycle, |c| c.cut_at_us = at_us);
                self.armed.store(cycle, Ordering::Release);
                self.cut.send_replace((cycle, at_us));
            }
        }
    }

    /// The armed cycle's progress, for the worker → parent progress messages.
    pub fn fill(&self, s: &mut Snapshot) {
        let cycle = self.armed.load(Ordering::Acquire);
        s.storm_cycle = cycle;
        if let Ok(cycles) = self.cycles.lock()
            && let Some(c) = cycles.get(&cycle)
        {
            s.storm_down = c.down.len() as u64;
            s.storm_back = c.back_us.len() as u64;
            s.storm_failed = c.failed.len() as u64;
        }
    }

    pub fn run_bound(&self) -> Duration {
        self.run_bound
    }

    pub fn cycles(&self) -> BTreeMap<u64, CycleAcc> {
        self.cycles.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Client `i` after its first login: hold the session; on a cut or a drop, reconnect; until
    /// stopped or given up. Keeps `counters.active` (the engine counted this session in).
    pub async fn client(
        &self,
        ctx: &Arc<ClientCtx>,
        i: u64,
        mut session: Session,
        counters: &Counters,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut cuts = self.cut.subscribe();
        cuts.borrow_and_update();
        loop {
            let end = hold_until(&mut session, counters, async {
                tokio::select! {
                    _ = stopped(&mut stop) => None,
                    r = cuts.changed() => r.ok().map(|()| *cuts.borrow_and_update()),
                }
            })
            .await;
            counters.active.fetch_sub(1, Ordering::Relaxed);
            let (cycle, at_us) = match end {
                Ok(None) => {
                    close_politely(session).await;
                    return;
                }
                Ok(Some(cut)) => {
                    // Abortive close: an RST, as when a NAT or the network forgets the flow.
                    let _ = session.stream.get_ref().0.set_zero_linger();
                    drop(session);
                    cut
                }
                Err(reason) => {
                    counters.record_drop(reason);
                    (self.armed.load(Ordering::Acquire), now_us())
                }
            };
            let server_side = self.cut_mode == Cut::ServerRestart;
            self.with(cycle, |c| {
                if server_side {
                    c.note_cut(at_us);
                }
                c.down.insert(i);
                c.back_us.remove(&i);
                c.failed.remove(&i);
            });
            match self.reconnect(ctx, i, cycle, counters, &mut stop).await {
                Some(s) => {
                    session = s;
                    counters.active.fetch_add(1, Ordering::Relaxed);
                }
                None => return,
            }
        }
    }

    /// Log client `i` in again, retrying with back-off; None once stopped or out of time.
    async fn reconnect(
        &self,
        ctx: &Arc<ClientCtx>,
        i: u64,
        cycle: u64,
        counters: &Counters,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<Session> {
        let deadline = Instant::now() + self.timeout;
        for n in 0u32.. {
            let phase = AtomicU8::new(Phase::Connect as u8);
            let left = deadline.saturating_duration_since(Instant::now());
            self.with(cycle, |c| c.attempts += 1);
            let outcome = tokio::select! {
                r = tokio::time::timeout(self.login_timeout.min(left), client::login(ctx, i, &phase)) => match r {
                    Ok(r) => r.map_err(|f| f.reason()),
                    Err(_) => Err(format!("timeout:{}", Phase::from_u8(phase.load(Ordering::Relaxed)).name())),
                },
                _ = stopped(stop) => return None,
            };
            let reason = match outcome {
                Ok(s) => {
                    if s.resumed {
                        counters.resumed.fetch_add(1, Ordering::Relaxed);
                    }
                    self.with(cycle, |c| c.back_us.insert(i, now_us()));
                    return Some(s);
                }
                Err(reason) => reason,
            };
            self.with(cycle, |c| *c.failures.entry(reason).or_default() += 1);
            let wait = backoff(n);
            if Instant::now() + wait >= deadline {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stopped(stop) => return None,
            }
        }
        self.with(cycle, |c| c.failed.insert(i));
        None
    }
}

// ---------------------------------------------------------------------------------------------
// Parent: ramp, cycles, report
// ---------------------------------------------------------------------------------------------

/// Samples the server from /proc by `--server-pid` or `--server-pid-file`, keeping the peak RSS
/// overall and per cycle, and the CPU used per cycle (across a restart: all of the new process).
#[derive(Default)]
struct Probe {
    pid: Option<u32>,
    pid_file: Option<PathBuf>,
    peak_rss_kib: u64,
    cycle_peak_kib: u64,
    /// PID → (CPU ms at cycle start, or 0 if the process appeared during the cycle; latest).
    cycle_cpu: BTreeMap<u32, (u64, u64)>,
    /// The next sample is the cycle's first: processes seen there were there before the cut.
    cycle_start: bool,
}

impl Probe {
    fn pid(&self) -> Option<u32> {
        self.pid.or_else(|| {
            let text = std::fs::read_to_string(self.pid_file.as_ref()?).ok()?;
            text.trim().parse().ok()
        })
    }

    fn enabled(&self) -> bool {
        self.pid.is_some() || self.pid_file.is_some()
    }

    fn sample(&mut self) -> Option<ProcSample> {
        let pid = self.pid()?;
        let s = stats::sample(pid)?;
        self.peak_rss_kib = self.peak_rss_kib.max(s.rss_kib);
        self.cycle_peak_kib = self.cycle_peak_kib.max(s.rss_kib);
        let base = if self.cycle_start { s.cpu_ms } else { 0 };
        self.cycle_cpu.entry(pid).or_insert((base, 0)).1 = s.cpu_ms;
        self.cycle_start = false;
        Some(s)
    }

    fn begin_cycle(&mut self) {
        self.cycle_peak_kib = 0;
        self.cycle_cpu.clear();
        self.cycle_start = true;
        self.sample();
    }

    fn cycle_cpu_ms(&self) -> u64 {
        self.cycle_cpu
            .values()
            .map(|(base, last)| last.saturating_sub(*base))
            .sum()
    }
}

/// What the parent saw of one cycle.
struct CycleRun {
    cycle: u64,
    /// Sessions up when the cycle started.
    participants: u64,
    /// `--cut client`: when the parent cut (Unix µs); 0 for server restarts.
    cut_at_us: u64,
    peak_rss_kib: Option<u64>,
    server_cpu_ms: Option<u64>,
    /// Not everyone was back (or given up) by `--timeout` after the cut.
    timed_out: bool,
}

async fn orchestrate(args: StormArgs, storm: Arc<Storm>, workers: u64) -> anyhow::Result<()> {
    let conn = &args.conn;
    let timeout = Duration::from_secs_f64(conn.timeout);
    let mut probe = Probe {
        pid: conn.server_pid,
        pid_file: args.server_pid_file.clone(),
        ..Probe::default()
    };
    if probe.enabled() && probe.sample().is_none() {
        bail!(
            "cannot read the server's /proc/PID/status and stat (--server-pid / --server-pid-file)"
        );
    }
    let local = (workers <= 1).then_some(storm);
    let mut fleet = Fleet::start(conn, workers, Instant::now() + timeout, local)?;
    let mut bar = Bar::new(conn.progress);
    let ramp = wait_ramp(
        &fleet,
        conn.users,
        Instant::now() + timeout,
        &mut bar,
        &mut || probe.sample(),
    )
    .await;
    let login = fleet.snapshot();
    eprintln!(
        "storm: {} of {} users logged in ({} failed)",
        login.ok, conn.users, login.failed
    );
    if login.ok == 0 || ramp.timed_out {
        let r = fleet.stop().await?;
        bail!(
            "no storm: logins ok {} of {}, failures {:?}",
            login.ok,
            conn.users,
            r.failures
        );
    }
    let mut runs = Vec::new();
    for cycle in 1..=args.cycles {
        tokio::time::sleep(pause(conn)).await;
        let run = run_cycle(&args, &mut fleet, &mut probe, &mut bar, cycle).await?;
        let no_drop = run.timed_out && run.cut_at_us == 0 && fleet.snapshot().storm_down == 0;
        runs.push(run);
        if no_drop {
            eprintln!("storm: no session dropped in cycle {cycle}; stopping");
            break;
        }
    }
    let result = fleet.stop().await?;
    let report = Report::build(&args, workers, &result, &runs, &probe);
    if let Some(path) = &conn.plot {
        let mut series = vec![plot::Series::of_histogram(
            "first login",
            &result.latency_us,
            None,
        )];
        for (run, c) in runs.iter().zip(&report.cycles) {
            let mut h = Histogram::default();
            for us in back_times(&result.storm, run) {
                h.record(us);
            }
            let name = format!("reconnect, cycle {}", c.cycle);
            series.push(plot::Series::of_histogram(&name, &h, Some(c.participants)));
        }
        plot::write(
            path,
            &format!(
                "tern-bench storm ({:?} cut): {} users",
                args.cut, conn.users
            ),
            "login latency; time from the cut until back",
            &series,
            &ramp.rss,
        )?;
    }
    if conn.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

/// Cut (or wait for the server to cut) every session, then wait until all are back or given up.
async fn run_cycle(
    args: &StormArgs,
    fleet: &mut Fleet,
    probe: &mut Probe,
    bar: &mut Bar,
    cycle: u64,
) -> anyhow::Result<CycleRun> {
    let timeout = Duration::from_secs_f64(args.conn.timeout);
    let participants = fleet.snapshot().active;
    probe.begin_cycle();
    let mut run = CycleRun {
        cycle,
        participants,
        cut_at_us: 0,
        peak_rss_kib: None,
        server_cpu_ms: None,
        timed_out: false,
    };
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    match args.cut {
        Cut::Client => {
            run.cut_at_us = now_us();
            fleet
                .command(Cmd::Cut {
                    cycle,
                    at_us: run.cut_at_us,
                })
                .await?;
            eprintln!("storm: cycle {cycle}: cut {participants} sessions");
        }
        Cut::ServerRestart => {
            fleet.command(Cmd::Arm(cycle)).await?;
            if let Some(f) = &args.armed_file {
                std::fs::write(f, format!("{cycle}\n"))
                    .with_context(|| format!("writing --armed-file {}", f.display()))?;
            }
            eprintln!(
                "storm: cycle {cycle} armed: {participants} sessions up, waiting for the server to drop them"
            );
            if let Some(cmd) = &args.restart_cmd {
                spawn_restart(cmd, cycle)?;
            }
            let until = Instant::now() + timeout;
            loop {
                tick.tick().await;
                probe.sample();
                let s = fleet.snapshot();
                if s.storm_cycle == cycle && s.storm_down > 0 {
                    break;
                }
                if Instant::now() >= until {
                    run.timed_out = true;
                    return Ok(finish(run, probe));
                }
            }
        }
    }
    // Clients give up `timeout` after their cut; a little more covers the reports' delay.
    let until = Instant::now() + timeout + Duration::from_secs(5);
    let start = Instant::now();
    let mut next_print = start + Duration::from_secs(1);
    loop {
        tick.tick().await;
        probe.sample();
        let s = fleet.snapshot();
        let current = s.storm_cycle == cycle;
        if current && s.storm_back + s.storm_failed >= participants {
            break;
        }
        if Instant::now() >= until {
            run.timed_out = true;
            break;
        }
        let text = format!(
            "down {}  failed {}  {:.1} s",
            s.storm_down,
            s.storm_failed,
            start.elapsed().as_secs_f64()
        );
        if bar.enabled() {
            bar.draw(
                &format!("cycle {cycle} back"),
                s.storm_back,
                participants,
                &text,
            );
        } else if Instant::now() >= next_print {
            next_print += Duration::from_secs(1);
            eprintln!(
                "storm: cycle {cycle}: back {}/{participants}  {text}",
                s.storm_back
            );
        }
    }
    bar.finish();
    Ok(finish(run, probe))
}

fn finish(mut run: CycleRun, probe: &mut Probe) -> CycleRun {
    probe.sample();
    if probe.enabled() {
        run.peak_rss_kib = Some(probe.cycle_peak_kib);
        run.server_cpu_ms = Some(probe.cycle_cpu_ms());
    }
    run
}

/// Run `--restart-cmd` for `cycle` in the background (its output goes to our stderr, keeping
/// stdout for the report).
fn spawn_restart(cmd: &str, cycle: u64) -> anyhow::Result<()> {
    let stderr = std::io::stderr().as_fd().try_clone_to_owned()?;
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd.replace("{cycle}", &cycle.to_string()))
        .stdin(Stdio::null())
        .stdout(Stdio::from(stderr))
        .spawn()
        .context("running --restart-cmd")?;
    tokio::spawn(async move {
        match child.wait().await {
            Ok(st) if st.success() => {}
            Ok(st) => eprintln!("storm: --restart-cmd for cycle {cycle} exited with {st}"),
            Err(e) => eprintln!("storm: --restart-cmd for cycle {cycle}: {e}"),
        }
    });
    Ok(())
}

/// Each reconnected client's time from the cut to its new session (µs), ascending.
fn back_times(accs: &BTreeMap<u64, CycleAcc>, run: &CycleRun) -> Vec<u64> {
    let Some(acc) = accs.get(&run.cycle) else {
        return Vec::new();
    };
    let cut = if run.cut_at_us != 0 {
        run.cut_at_us
    } else {
        acc.cut_at_us
    };
    let mut t: Vec<u64> = acc
        .back_us
        .values()
        .map(|b| b.saturating_sub(cut))
        .collect();
    t.sort_unstable();
    t
}

/// Seconds until the share `q` of `population` was back: None if fewer than that came back.
fn time_to_share(sorted_us: &[u64], population: u64, q: f64) -> Option<f64> {
    let rank = ((q * population as f64).ceil() as u64).clamp(1, population.max(1));
    let us = sorted_us.get(usize::try_from(rank).ok()? - 1)?;
    Some(round(*us as f64 / 1e6, 4))
}

#[derive(Debug, Serialize)]
struct CycleReport {
    cycle: u64,
    /// Unix ms of the cut (`client`) or of the first drop (`server-restart`).
    cut_at_unix_ms: u64,
    /// Sessions up before the cut.
    participants: u64,
    /// Seconds from the cut until all participants were back; null if some never came back.
    back_secs: Option<f64>,
    p50_secs: Option<f64>,
    p90_secs: Option<f64>,
    p99_secs: Option<f64>,
    reconnected: u64,
    /// Participants not back by `--timeout` after the cut.
    failed: u64,
    /// Failed attempts by reason (retried ones included).
    failures: BTreeMap<String, u64>,
    /// Login attempts during the reconnection (first tries and retries).
    attempts: u64,
    peak_rss_kib: Option<u64>,
    server_cpu_secs: Option<f64>,
    timed_out: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    scenario: &'static str,
    cut: Cut,
    server: String,
    tls: TlsMode,
    users: u64,
    workers: u64,
    logged_in: u64,
    login_failures: BTreeMap<String, u64>,
    login_latency: Latency,
    cycles: Vec<CycleReport>,
    /// Server peak RSS over the whole run (ramp and cycles).
    peak_rss_kib: Option<u64>,
    /// Sessions the server ended (all cycles), by what the client saw (`server-restart` cuts).
    drops: BTreeMap<String, u64>,
    tls_resumed: u64,
}

impl Report {
    fn build(
        args: &StormArgs,
        workers: u64,
        r: &crate::engine::FleetResult,
        runs: &[CycleRun],
        probe: &Probe,
    ) -> Report {
        let cycles = runs
            .iter()
            .map(|run| {
                let acc = r.storm.get(&run.cycle).cloned().unwrap_or_default();
                let times = back_times(&r.storm, run);
                let participants = run.participants.max(acc.down.len() as u64);
                let cut = if run.cut_at_us != 0 {
                    run.cut_at_us
                } else {
                    acc.cut_at_us
                };
                let reconnected = times.len() as u64;
                CycleReport {
                    cycle: run.cycle,
                    cut_at_unix_ms: cut / 1000,
                    participants,
                    back_secs: time_to_share(&times, participants, 1.0),
                    p50_secs: time_to_share(&times, participants, 0.5),
                    p90_secs: time_to_share(&times, participants, 0.9),
                    p99_secs: time_to_share(&times, participants, 0.99),
                    reconnected,
                    failed: participants.saturating_sub(reconnected),
                    failures: acc.failures,
                    attempts: acc.attempts,
                    peak_rss_kib: run.peak_rss_kib,
                    server_cpu_secs: run.server_cpu_ms.map(|ms| ms as f64 / 1000.0),
                    timed_out: run.timed_out,
                }
            })
            .collect();
        Report {
            scenario: "storm",
            cut: args.cut,
            server: args.conn.login.server.to_string(),
            tls: args.conn.login.tls,
            users: args.conn.users,
            workers,
            logged_in: r.snapshot.ok,
            login_failures: r.failures.clone(),
            login_latency: Latency::of(&r.latency_us),
            cycles,
            peak_rss_kib: probe.enabled().then_some(probe.peak_rss_kib),
            drops: r.drops.clone(),
            tls_resumed: r.snapshot.resumed,
        }
    }

    fn table(&self) -> String {
        let mut o = String::new();
        let mut row = |k: &str, v: String| o.push_str(&format!("  {k:<24} {v}\n"));
        let secs = |s: Option<f64>| s.map_or("—".into(), |s| format!("{s:.3} s"));
        row(
            "scenario",
            format!(
                "storm ({} cut) of {} users, {:?} TLS, {} process(es)",
                self.cut.name(),
                self.users,
                self.tls,
                self.workers
            ),
        );
        row(
            "first logins",
            format!(
                "{} ok; p50 {:.2} ms  p99 {:.2} ms",
                self.logged_in, self.login_latency.p50_ms, self.login_latency.p99_ms
            ),
        );
        for (k, v) in &self.login_failures {
            row("login failure", format!("{v:>7}  {k}"));
        }
        for c in &self.cycles {
            row(
                &format!("cycle {}", c.cycle),
                format!(
                    "{} of {} back{}; 50% {}  90% {}  99% {}  100% {}",
                    c.reconnected,
                    c.participants,
                    if c.timed_out { " (TIMED OUT)" } else { "" },
                    secs(c.p50_secs),
                    secs(c.p90_secs),
                    secs(c.p99_secs),
                    secs(c.back_secs)
                ),
            );
            row(
                "  attempts",
                format!("{} ({} clients gave up)", c.attempts, c.failed),
            );
            for (k, v) in &c.failures {
                row("  failed attempt", format!("{v:>7}  {k}"));
            }
            if let (Some(rss), Some(cpu)) = (c.peak_rss_kib, c.server_cpu_secs) {
                row(
                    "  server",
                    format!("peak RSS {:.1} MiB, CPU {cpu:.2} s", rss as f64 / 1024.0),
                );
            }
        }
        for (k, v) in &self.drops {
            row("session ended by server", format!("{v:>7}  {k}"));
        }
        if let Some(rss) = self.peak_rss_kib {
            row("server peak RSS", format!("{:.1} MiB", rss as f64 / 1024.0));
        }
        row("TLS sessions resumed", self.tls_resumed.to_string());
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip() {
        for cmd in [
            Cmd::Arm(3),
            Cmd::Cut {
                cycle: 2,
                at_us: 1_700_000_000_123_456,
            },
        ] {
            assert_eq!(Cmd::parse(&cmd.line()), Some(cmd));
        }
        for bad in ["", "cut 1", "arm x", "cut 1 2 3", "stop", "arm"] {
            assert_eq!(Cmd::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn shares_of_the_population() {
        let t = [100_000, 200_000, 300_000, 400_000];
        assert_eq!(time_to_share(&t, 4, 0.5), Some(0.2));
        assert_eq!(time_to_share(&t, 4, 1.0), Some(0.4));
        // Five participants, four back: 100 % was never reached, 80 % was.
        assert_eq!(time_to_share(&t, 5, 1.0), None);
        assert_eq!(time_to_share(&t, 5, 0.8), Some(0.4));
        assert_eq!(time_to_share(&[], 0, 0.5), None);
    }

    #[test]
    fn cycles_merge_across_processes() {
        let mut a = CycleAcc {
            cut_at_us: 50,
            attempts: 2,
            ..CycleAcc::default()
        };
        a.back_us.insert(0, 70);
        a.failures.insert("connect-refused".into(), 1);
        let mut b = CycleAcc {
            cut_at_us: 40,
            attempts: 3,
            ..CycleAcc::default()
        };
        b.back_us.insert(1, 90);
        b.failed.insert(3);
        b.failures.insert("connect-refused".into(), 2);
        // Through JSON, as worker results travel.
        let b: CycleAcc = serde_json::from_str(&serde_json::to_string(&b).unwrap()).unwrap();
        a.merge(&b);
        assert_eq!(a.cut_at_us, 40);
        assert_eq!(a.back_us.len(), 2);
        assert_eq!((a.attempts, a.failures["connect-refused"]), (5, 3));
        assert!(a.failed.contains(&3));
    }

    #[test]
    fn backoff_is_bounded_and_jittered() {
        for n in 0..10 {
            let d = backoff(n);
            let base = 50.0 * f64::from(1u32 << n.min(4)) / 1000.0;
            assert!(
                d.as_secs_f64() >= base * 0.5 && d.as_secs_f64() <= base * 1.5,
                "{n}"
            );
        }
    }
}

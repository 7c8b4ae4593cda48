//! The client fleet of one process: paced logins with bounded concurrency, then holding the
//! sessions until told to stop. Progress lives in atomics so a reporter can read it at any time.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tern::xmpp::framer::Event;
use tokio::io::AsyncWriteExt;
use tokio::sync::{Semaphore, watch};

use crate::client::{self, ClientCtx, Fail, Phase, Session};
use crate::stats::{self, Histogram};

/// Which clients this process runs: indices `first + index + k * count` below `first + users`.
#[derive(Debug, Clone, Copy)]
pub struct Share {
    pub first: u64,
    pub users: u64,
    pub index: u64,
    pub count: u64,
}

impl Share {
    pub fn len(&self) -> u64 {
        if self.index >= self.users {
            0
        } else {
            (self.users - self.index).div_ceil(self.count)
        }
    }
}

#[derive(Debug, Clone)]
pub struct FleetParams {
    pub share: Share,
    /// Logins per second for this process (0 = as fast as possible).
    pub rate: f64,
    pub concurrency: usize,
    pub login_timeout: Duration,
    /// Stop launching new logins after this instant.
    pub deadline: Instant,
    /// Scenario `storm`: after the login, clients follow the storm's cuts and reconnect.
    pub storm: Option<Arc<crate::storm::Storm>>,
}

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Cumulative counters of one process.
#[derive(Debug, Default)]
pub struct Counters {
    pub attempted: AtomicU64,
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    /// Sessions currently established (logged in and not yet dropped).
    pub active: AtomicU64,
    /// Sessions lost while holding (server closed, error).
    pub dropped: AtomicU64,
    pub pings: AtomicU64,
    pub resumed: AtomicU64,
    /// Client tasks still alive.
    pub live: AtomicU64,
    pub first_start_us: AtomicU64,
    pub last_ok_us: AtomicU64,
    pub ramp_done: AtomicBool,
    /// Pushes received (messages whose `<body>` carries a `push` stamp).
    pub rx: AtomicU64,
    /// Other messages received (no parsable stamp).
    pub rx_other: AtomicU64,
    /// `mono_ns()` of the first and the latest push received, 0 if none yet.
    pub rx_first_ns: AtomicU64,
    pub rx_last_ns: AtomicU64,
    pub hist: Mutex<Histogram>,
    /// Push-to-receive latency (µs): receive time − the send stamp in the body.
    pub push_hist: Mutex<Histogram>,
    /// The same from the scheduled send time (fixed rate: includes the sender's own lateness, so a
    /// stalled server cannot hide behind requests that were never sent — coordinated omission).
    pub push_sched_hist: Mutex<Histogram>,
    pub failures: Mutex<BTreeMap<String, u64>>,
    pub drops: Mutex<BTreeMap<String, u64>>,
    pub tls_params: Mutex<Option<String>>,
}

/// Point-in-time view of the counters (also the worker → parent progress message).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Snapshot {
    pub attempted: u64,
    pub ok: u64,
    pub failed: u64,
    pub active: u64,
    pub dropped: u64,
    pub pings: u64,
    pub resumed: u64,
    pub ramp_done: bool,
    /// CPU time used by the process so far (ms).
    pub cpu_ms: u64,
    /// Unix time (µs) of the first connect attempt, 0 if none yet.
    pub first_start_us: u64,
    /// Unix time (µs) of the latest successful bind, 0 if none yet.
    pub last_ok_us: u64,
    /// Pushes received (scenario `push`).
    #[serde(default)]
    pub rx: u64,
    /// Messages received without a push stamp.
    #[serde(default)]
    pub rx_other: u64,
    /// `mono_ns()` of the first / latest push received (system-wide CLOCK_MONOTONIC), 0 if none.
    #[serde(default)]
    pub rx_first_ns: u64,
    #[serde(default)]
    pub rx_last_ns: u64,
    /// Scenario `storm`: the cycle being measured and, for it, clients cut off, back, given up.
    #[serde(default)]
    pub storm_cycle: u64,
    #[serde(default)]
    pub storm_down: u64,
    #[serde(default)]
    pub storm_back: u64,
    #[serde(default)]
    pub storm_failed: u64,
}

impl Snapshot {
    pub fn in_flight(&self) -> u64 {
        self.attempted.saturating_sub(self.ok + self.failed)
    }

    /// Sum of per-process snapshots (ramp_done only when all are done).
    pub fn sum<'a>(all: impl IntoIterator<Item = &'a Snapshot>) -> Snapshot {
        let mut out = Snapshot {
            ramp_done: true,
            ..Snapshot::default()
        };
        let mut any = false;
        for s in all {
            any = true;
            out.attempted += s.attempted;
            out.ok += s.ok;
            out.failed += s.failed;
            out.active += s.active;
            out.dropped += s.dropped;
            out.pings += s.pings;
            out.resumed += s.resumed;
            out.ramp_done &= s.ramp_done;
            out.cpu_ms += s.cpu_ms;
            if s.first_start_us != 0
                && (out.first_start_us == 0 || s.first_start_us < out.first_start_us)
            {
                out.first_start_us = s.first_start_us;
            }
            out.last_ok_us = out.last_ok_us.max(s.last_ok_us);
            out.rx += s.rx;
            out.rx_other += s.rx_other;
            if s.rx_first_ns != 0 && (out.rx_first_ns == 0 || s.rx_first_ns < out.rx_first_ns) {
                out.rx_first_ns = s.rx_first_ns;
            }
            out.rx_last_ns = out.rx_last_ns.max(s.rx_last_ns);
            out.storm_cycle = out.storm_cycle.max(s.storm_cycle);
            out.storm_down += s.storm_down;
            out.storm_back += s.storm_back;
            out.storm_failed += s.storm_failed;
        }
        out.ramp_done &= any;
        out
    }
}

/// Final result of one process (also the worker → parent result message).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FleetResult {
    pub snapshot: Snapshot,
    pub latency_us: Histogram,
    /// Push-to-receive latency (scenario `push`).
    #[serde(default)]
    pub push_latency_us: Histogram,
    /// Push-to-receive latency from the scheduled send time.
    #[serde(default)]
    pub push_sched_latency_us: Histogram,
    pub failures: BTreeMap<String, u64>,
    pub drops: BTreeMap<String, u64>,
    pub tls_params: Option<String>,
    /// Scenario `storm`: what each cycle's reconnection looked like, by cycle number.
    #[serde(default)]
    pub storm: BTreeMap<u64, crate::storm::CycleAcc>,
}

impl FleetResult {
    pub fn merge(&mut self, other: &FleetResult) {
        self.snapshot = Snapshot::sum([&self.snapshot, &other.snapshot]);
        self.latency_us.merge(&other.latency_us);
        self.push_latency_us.merge(&other.push_latency_us);
        self.push_sched_latency_us
            .merge(&other.push_sched_latency_us);
        for (k, v) in &other.failures {
            *self.failures.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.drops {
            *self.drops.entry(k.clone()).or_default() += v;
        }
        if self.tls_params.is_none() {
            self.tls_params = other.tls_params.clone();
        }
        for (k, c) in &other.storm {
            self.storm.entry(*k).or_default().merge(c);
        }
    }
}

/// Resolves once the stop flag is true (or its sender is gone).
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

fn bump(map: &Mutex<BTreeMap<String, u64>>, key: String) {
    if let Ok(mut m) = map.lock() {
        *m.entry(key).or_default() += 1;
    }
}

impl Counters {
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            attempted: self.attempted.load(Ordering::Relaxed),
            ok: self.ok.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            active: self.active.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            pings: self.pings.load(Ordering::Relaxed),
            resumed: self.resumed.load(Ordering::Relaxed),
            ramp_done: self.ramp_done.load(Ordering::Acquire),
            cpu_ms: stats::cpu_ms("self").unwrap_or(0),
            first_start_us: self.first_start_us.load(Ordering::Relaxed),
            last_ok_us: self.last_ok_us.load(Ordering::Relaxed),
            rx: self.rx.load(Ordering::Relaxed),
            rx_other: self.rx_other.load(Ordering::Relaxed),
            rx_first_ns: self.rx_first_ns.load(Ordering::Relaxed),
            rx_last_ns: self.rx_last_ns.load(Ordering::Relaxed),
            ..Snapshot::default()
        }
    }

    pub fn result(&self) -> FleetResult {
        FleetResult {
            snapshot: self.snapshot(),
            latency_us: self.hist.lock().map(|h| h.clone()).unwrap_or_default(),
            push_latency_us: self.push_hist.lock().map(|h| h.clone()).unwrap_or_default(),
            push_sched_latency_us: self
                .push_sched_hist
                .lock()
                .map(|h| h.clone())
                .unwrap_or_default(),
            failures: self.failures.lock().map(|m| m.clone()).unwrap_or_default(),
            drops: self.drops.lock().map(|m| m.clone()).unwrap_or_default(),
            tls_params: self
                .tls_params
                .lock()
                .map(|m| m.clone())
                .unwrap_or_default(),
            storm: BTreeMap::new(),
        }
    }
}

impl Counters {
    /// A held session was lost (not closed by us).
    pub fn record_drop(&self, reason: String) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        bump(&self.drops, reason);
    }

    /// A `<message/>` arrived: if its body carries a push stamp, count it and record its latency.
    pub fn record_message(&self, raw: &[u8]) {
        let now = mono_ns();
        match crate::push::parse_stamp(raw) {
            Some(stamp) => {
                self.rx.fetch_add(1, Ordering::Relaxed);
                let _ =
                    self.rx_first_ns
                        .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
                self.rx_last_ns.fetch_max(now, Ordering::Relaxed);
                if let Ok(mut h) = self.push_hist.lock() {
                    h.record(now.saturating_sub(stamp.sent_ns) / 1000);
                }
                if let Ok(mut h) = self.push_sched_hist.lock() {
                    h.record(now.saturating_sub(stamp.due_ns) / 1000);
                }
            }
            None => {
                self.rx_other.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds. The clock is system-wide, so stamps taken in one process (the
/// push sender) can be compared with readings in another (a worker holding the receiving clients).
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-parameter; CLOCK_MONOTONIC is always supported on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// Run the fleet: ramp up, hold until `stop` turns true, close all sessions, return.
/// `counters.ramp_done` is set once every login has either succeeded or failed.
pub async fn run(
    ctx: Arc<ClientCtx>,
    params: FleetParams,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
) -> FleetResult {
    let sem = Arc::new(Semaphore::new(params.concurrency.max(1)));
    let share = params.share;
    let t0 = tokio::time::Instant::now();
    let mut launched = 0u64;
    let mut j = share.index;
    while j < share.users {
        if Instant::now() >= params.deadline || *stop.borrow() {
            break;
        }
        let permit = tokio::select! {
            p = sem.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = stopped(&mut stop) => break,
        };
        if params.rate > 0.0 {
            let due = t0 + Duration::from_secs_f64(launched as f64 / params.rate);
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {}
                _ = stopped(&mut stop) => break,
            }
        }
        let i = share.first + j;
        let (ctx, counters, stop_rx) = (ctx.clone(), counters.clone(), stop.clone());
        let (login_timeout, storm) = (params.login_timeout, params.storm.clone());
        counters.live.fetch_add(1, Ordering::Relaxed);
        counters.attempted.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            client_task(
                ctx,
                i,
                login_timeout,
                counters.clone(),
                permit,
                stop_rx,
                storm,
            )
            .await;
            counters.live.fetch_sub(1, Ordering::Relaxed);
        });
        launched += 1;
        j += share.count;
    }
    // Wait for the in-flight logins (each bounded by the login timeout) unless told to stop.
    tokio::select! {
        _ = sem.acquire_many(params.concurrency.max(1) as u32) => {}
        _ = stopped(&mut stop) => {}
    }
    counters.ramp_done.store(true, Ordering::Release);
    stopped(&mut stop).await;
    // Clients see the same stop signal and close; give them a moment to do it politely.
    let until = Instant::now() + Duration::from_secs(10);
    while counters.live.load(Ordering::Relaxed) > 0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut result = counters.result();
    if let Some(storm) = &params.storm {
        result.storm = storm.cycles();
    }
    result
}

async fn client_task(
    ctx: Arc<ClientCtx>,
    i: u64,
    login_timeout: Duration,
    counters: Arc<Counters>,
    permit: tokio::sync::OwnedSemaphorePermit,
    mut stop: watch::Receiver<bool>,
    storm: Option<Arc<crate::storm::Storm>>,
) {
    let phase = AtomicU8::new(Phase::Connect as u8);
    let start = Instant::now();
    let _ =
        counters
            .first_start_us
            .compare_exchange(0, now_us(), Ordering::Relaxed, Ordering::Relaxed);
    let outcome = tokio::select! {
        r = tokio::time::timeout(login_timeout, client::login(&ctx, i, &phase)) => match r {
            Ok(r) => r.map_err(|f| f.reason()),
            Err(_) => Err(format!("timeout:{}", Phase::from_u8(phase.load(Ordering::Relaxed)).name())),
        },
        _ = stopped(&mut stop) => {
            Err(format!("aborted:{}", Phase::from_u8(phase.load(Ordering::Relaxed)).name()))
        }
    };
    drop(permit);
    let session = match outcome {
        Ok(s) => s,
        Err(reason) => {
            counters.failed.fetch_add(1, Ordering::Relaxed);
            bump(&counters.failures, reason);
            return;
        }
    };
    let us = start.elapsed().as_micros() as u64;
    if let Ok(mut h) = counters.hist.lock() {
        h.record(us);
    }
    if let Ok(mut p) = counters.tls_params.lock()
        && p.is_none()
    {
        let c = session.stream.get_ref().1;
        let opt = |o: Option<String>| o.unwrap_or_else(|| "?".into());
        *p = Some(format!(
            "{} {} {}",
            opt(c.protocol_version().map(|v| format!("{v:?}"))),
            opt(c
                .negotiated_cipher_suite()
                .map(|s| format!("{:?}", s.suite()))),
            opt(c
                .negotiated_key_exchange_group()
                .map(|g| format!("{:?}", g.name()))),
        ));
    }
    if session.resumed {
        counters.resumed.fetch_add(1, Ordering::Relaxed);
    }
    counters.last_ok_us.fetch_max(now_us(), Ordering::Relaxed);
    counters.active.fetch_add(1, Ordering::Relaxed);
    counters.ok.fetch_add(1, Ordering::Relaxed);
    if let Some(storm) = storm {
        // The storm loop keeps `active` and the drop counters itself.
        storm.client(&ctx, i, session, &counters, stop).await;
        return;
    }
    let dropped = hold(session, &counters, stop).await;
    counters.active.fetch_sub(1, Ordering::Relaxed);
    if let Some(reason) = dropped {
        counters.record_drop(reason);
    }
}

/// Idle in the session, answering pings, until stopped (→ None) or the session is lost (→ reason).
async fn hold(
    mut s: Session,
    counters: &Counters,
    mut stop: watch::Receiver<bool>,
) -> Option<String> {
    match hold_until(&mut s, counters, stopped(&mut stop)).await {
        Ok(()) => {
            close_politely(s).await;
            None
        }
        Err(reason) => Some(reason),
    }
}

/// Idle in the session (answering pings, recording pushes) until `until` resolves (→ its value;
/// the session stays open for the caller to close) or the session is lost (→ the reason).
pub async fn hold_until<T>(
    s: &mut Session,
    counters: &Counters,
    until: impl Future<Output = T>,
) -> Result<T, String> {
    tokio::pin!(until);
    loop {
        tokio::select! {
            v = &mut until => return Ok(v),
            ev = client::next_event(&mut s.stream, &mut s.framer, Phase::Hold) => match ev {
                Ok(Event::Stanza(st)) => {
                    if st.name() == "stream:error" {
                        let cond = st.first_child().map(|(n, _)| n).unwrap_or_default();
                        return Err(format!("stream-error:{cond}"));
                    }
                    if st.name() == "message" {
                        counters.record_message(st.raw());
                        // Scenario `chat`: answer the tool's message at once (crate::chat).
                        if let Some(echo) = crate::chat::echo_reply(&st) {
                            drop(st);
                            if let Err(f) = client::send(&mut s.stream, &echo, Phase::Hold).await {
                                return Err(f.reason());
                            }
                        }
                        continue;
                    }
                    if let Some(reply) = client::ping_reply(&st) {
                        drop(st);
                        counters.pings.fetch_add(1, Ordering::Relaxed);
                        let r = s.stream.write_all(reply.as_bytes()).await;
                        let r = match r { Ok(()) => s.stream.flush().await, Err(e) => Err(e) };
                        if let Err(e) = r {
                            return Err(Fail::Io(Phase::Hold, e).reason());
                        }
                    }
                }
                Ok(Event::StreamClose) => return Err(Fail::Closed(Phase::Hold).reason()),
                Ok(Event::StreamOpen(_)) => return Err("unexpected:hold:stream-header".into()),
                Err(f) => return Err(f.reason()),
            },
        }
    }
}

/// Close the stream and TLS session the way a client that logs off does (bounded: 2 s).
pub async fn close_politely(mut s: Session) {
    let close = async {
        s.stream.write_all(b"</stream:stream>").await?;
        s.stream.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), close).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_partition_users() {
        for users in [0u64, 1, 7, 10, 18_001] {
            for count in 1..5u64 {
                let total: u64 = (0..count)
                    .map(|index| {
                        Share {
                            first: 0,
                            users,
                            index,
                            count,
                        }
                        .len()
                    })
                    .sum();
                assert_eq!(total, users, "users {users} count {count}");
            }
        }
    }

    #[test]
    fn snapshot_sum() {
        let a = Snapshot {
            ok: 2,
            ramp_done: true,
            first_start_us: 10,
            last_ok_us: 50,
            ..Default::default()
        };
        let b = Snapshot {
            ok: 3,
            ramp_done: false,
            first_start_us: 5,
            last_ok_us: 40,
            ..Default::default()
        };
        let s = Snapshot::sum([&a, &b]);
        assert_eq!(
            (s.ok, s.ramp_done, s.first_start_us, s.last_ok_us),
            (5, false, 5, 50)
        );
        assert!(Snapshot::sum([&a]).ramp_done);
        assert!(!Snapshot::sum([]).ramp_done);
    }
}

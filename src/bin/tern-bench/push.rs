//! Scenario `push`: log N clients in (the `connect` machinery, worker processes included), then
//! drive pushes to them through an HTTP API at a fixed or unbounded rate and measure what arrives.
//!
//! - `--target tern`: `POST /api/v1/push` with `Authorization: Bearer KEY`, one recipient per
//!   request (`--mode single`, `{"to":"jid","body":…}`) or `--batch N` (`{"to":[…],"body":…}`).
//! - `--target ejabberd`: mod_http_api `POST /api/send_message` (one recipient per request;
//!   ejabberd has no batch send).
//!
//! Every body is a stamp `t=<send>;s=<scheduled>;n=<request>`, CLOCK_MONOTONIC nanoseconds (one
//! clock for the whole machine, so workers can compare it with their own readings). The receiving
//! client records receive time − `t` (push-to-receive latency) and receive time − `s` (the same
//! from the time the request was due: at a fixed rate it also counts the time a request waited for
//! a free connection, so a stall cannot hide behind requests that were never sent).
//!
//! `--http-conns` keep-alive HTTP/1.1 connections each carry one request at a time; hand-written
//! HTTP over `TcpStream` keeps the client cheap (its CPU share is reported).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::ConnectArgs;
use crate::connect::{self, Fleet, Latency, Role, round, wait_ramp};
use crate::engine::{FleetResult, mono_ns};
use crate::plot;
use crate::progress::Bar;
use crate::stats::{self, Histogram, ProcSample};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// Tern's `POST /api/v1/push`.
    Tern,
    /// ejabberd's mod_http_api `POST /api/send_message`.
    Ejabberd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One recipient per request.
    Single,
    /// `--batch` recipients per request (Tern only).
    Batch,
}

#[derive(Debug, Clone, Args)]
pub struct PushArgs {
    /// Server whose HTTP API receives the pushes.
    #[arg(long, value_enum, default_value = "tern")]
    pub target: Target,
    /// HTTP API address (plain HTTP/1.1).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    /// API key for Tern (`Authorization: Bearer KEY`).
    #[arg(long, env = "TERN_BENCH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// One recipient per request, or `--batch` recipients per request.
    #[arg(long, value_enum, default_value = "single")]
    pub mode: Mode,
    /// Recipients per request with `--mode batch`.
    #[arg(long, default_value_t = 100)]
    pub batch: u64,
    /// Pushes (recipient deliveries) per second; 0 = as fast as the connections go.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Seconds of sending.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Stop after this many pushes (whichever of --duration and --count comes first).
    #[arg(long)]
    pub count: Option<u64>,
    /// Keep-alive HTTP connections, one request in flight on each.
    #[arg(long, default_value_t = 8)]
    pub http_conns: usize,
    /// Seconds to wait after sending for pushes still under way; later ones count as lost.
    #[arg(long, default_value_t = 5.0)]
    pub drain: f64,
    /// Seconds between the last login and the first push.
    #[arg(long, default_value_t = 1.0)]
    pub settle: f64,
    /// Extra filler bytes in each push body (`;p=xxx…`).
    #[arg(long, default_value_t = 0)]
    pub body_pad: usize,
    /// `from` of ejabberd's send_message (default `admin@DOMAIN`).
    #[arg(long)]
    pub ejabberd_from: Option<String>,
    /// How the clients connect and log in.
    #[command(flatten)]
    pub login: crate::Login,
    /// Clients to log in (and push to).
    #[arg(long, default_value_t = 1000)]
    pub users: u64,
    /// Index of the first user.
    #[arg(long, default_value_t = 0)]
    pub first_user: u64,
    /// Logins per second during the ramp (0 = as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    pub login_rate: f64,
    /// Username pattern; `{i}` is the user index.
    #[arg(long, default_value = "bench-{i}")]
    pub user_pattern: String,
    /// PID of the server: sample its RSS and CPU from /proc.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Overall time limit in seconds (logins + sending + drain).
    #[arg(long, default_value_t = 180.0)]
    pub timeout: f64,
    /// Show a progress bar on stderr while logging in (default: only when stderr is a terminal).
    #[arg(long)]
    pub progress: bool,
    /// Write an SVG plot: push-to-receive latency distribution, and server RSS against sessions
    /// during the login ramp (with --server-pid).
    #[arg(long, value_name = "FILE")]
    pub plot: Option<std::path::PathBuf>,
}

impl PushArgs {
    /// The login side, as `connect` understands it (workers run the `connect` fleet unchanged).
    fn connect_args(&self) -> ConnectArgs {
        ConnectArgs {
            login: self.login.clone(),
            users: self.users,
            first_user: self.first_user,
            rate: self.login_rate,
            user_pattern: self.user_pattern.clone(),
            hold: 0.0,
            settle: 0.0,
            server_pid: None,
            json: self.json,
            timeout: self.timeout,
            progress: self.progress,
            plot: None,
        }
    }

    fn batch_size(&self) -> u64 {
        match self.mode {
            Mode::Single => 1,
            Mode::Batch => self.batch,
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.users == 0 {
            bail!("--users must be at least 1");
        }
        if self.mode == Mode::Batch {
            if self.target == Target::Ejabberd {
                bail!(
                    "--mode batch: ejabberd's mod_http_api has no batch send (send_message takes \
                     one recipient); use --mode single"
                );
            }
            if self.batch == 0 || self.batch > self.users {
                bail!("--batch must be 1 to --users ({})", self.users);
            }
        }
        if self.target == Target::Tern && self.api_key.is_none() {
            bail!("--target tern needs --api-key (or TERN_BENCH_API_KEY)");
        }
        if !(self.rate >= 0.0 && self.rate.is_finite()) {
            bail!("--rate must be a non-negative number");
        }
        if !(self.duration > 0.0 && self.duration.is_finite()) {
            bail!("--duration must be positive");
        }
        if self.http_conns == 0 {
            bail!("--http-conns must be at least 1");
        }
        Ok(())
    }
}

pub fn main(args: PushArgs) -> anyhow::Result<()> {
    let conn = args.connect_args();
    let workers = match connect::role(&conn, args.http_conns as u64)? {
        Role::Worker { index, count } => return connect::run_worker(conn, index, count, None),
        Role::Parent { workers } => workers,
    };
    args.validate()?;
    let rt = connect::runtime(if workers > 1 {
        1
    } else {
        connect::threads(&conn)
    })?;
    rt.block_on(orchestrate(args, conn, workers))
}

// ---------------------------------------------------------------------------------------------
// Push stamps
// ---------------------------------------------------------------------------------------------

/// What a push body carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// `mono_ns()` just before the request was written.
    pub sent_ns: u64,
    /// `mono_ns()` the request was due (equal to `sent_ns` without a fixed rate).
    pub due_ns: u64,
    /// Request number.
    pub seq: u64,
}

pub(crate) fn write_stamp(out: &mut Vec<u8>, s: Stamp, pad: usize) {
    use std::io::Write;
    let _ = write!(out, "t={};s={};n={}", s.sent_ns, s.due_ns, s.seq);
    if pad > 0 {
        out.extend_from_slice(b";p=");
        out.resize(out.len() + pad, b'x');
    }
}

/// Digits at the start of `s` as a number, and the rest.
fn number(s: &[u8]) -> Option<(u64, &[u8])> {
    let n = s.iter().take_while(|b| b.is_ascii_digit()).count();
    if n == 0 || n > 19 {
        return None;
    }
    let v = std::str::from_utf8(s.get(..n)?).ok()?.parse().ok()?;
    Some((v, s.get(n..)?))
}

/// The text of the first `<body>` of a raw stanza, as written (still escaped).
pub(crate) fn body_text(raw: &[u8]) -> Option<&[u8]> {
    let open = memchr::memmem::find(raw, b"<body")?;
    let rest = raw.get(open + 5..)?;
    // `<body>` or `<body attr='…'>`, but not `<bodyx>`.
    if !matches!(rest.first(), Some(b'>' | b' ' | b'\t' | b'\r' | b'\n')) {
        return None;
    }
    let text = rest.get(memchr::memchr(b'>', rest)? + 1..)?;
    text.get(..memchr::memmem::find(text, b"</body>")?)
}

/// The stamp in the `<body>` of a raw `<message/>`, if there is one.
pub fn parse_stamp(raw: &[u8]) -> Option<Stamp> {
    let text = body_text(raw)?.strip_prefix(b"t=")?;
    let (sent_ns, text) = number(text)?;
    let text = text.strip_prefix(b";s=")?;
    let (due_ns, text) = number(text)?;
    let text = text.strip_prefix(b";n=")?;
    let (seq, text) = number(text)?;
    if !matches!(text.first(), None | Some(b';')) {
        return None;
    }
    Some(Stamp {
        sent_ns,
        due_ns,
        seq,
    })
}

// ---------------------------------------------------------------------------------------------
// Minimal HTTP/1.1 client (keep-alive, one request at a time)
// ---------------------------------------------------------------------------------------------

/// One parsed response at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
struct Parsed {
    status: u16,
    body: Vec<u8>,
    /// Bytes of the buffer the response took.
    consumed: usize,
    /// The server will close the connection (`Connection: close` or HTTP/1.0 without keep-alive).
    close: bool,
}

enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

/// Parse one response from `buf`. `Ok(None)`: incomplete; `eof`: the peer closed, so a body
/// without length ends here.
fn parse_response(buf: &[u8], eof: bool) -> Result<Option<Parsed>, String> {
    let Some(head_end) = memchr::memmem::find(buf, b"\r\n\r\n") else {
        if buf.len() > 64 * 1024 {
            return Err("response header larger than 64 KiB".into());
        }
        return Ok(None);
    };
    let head = std::str::from_utf8(buf.get(..head_end).unwrap_or_default())
        .map_err(|_| "response header is not UTF-8".to_string())?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(format!("bad status line {status_line:?}"));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut framing = Framing::UntilClose;
    let mut close = version == "HTTP/1.0";
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            framing = Framing::Length(
                value
                    .parse()
                    .map_err(|_| format!("bad Content-Length {value:?}"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            && value.to_ascii_lowercase().contains("chunked")
        {
            framing = Framing::Chunked;
        } else if name.eq_ignore_ascii_case("connection") {
            let v = value.to_ascii_lowercase();
            if v.contains("close") {
                close = true;
            } else if v.contains("keep-alive") {
                close = false;
            }
        }
    }
    if status == 204 || status == 304 || (100..200).contains(&status) {
        framing = Framing::Length(0);
    }
    let start = head_end + 4;
    let rest = buf.get(start..).unwrap_or_default();
    match framing {
        Framing::Length(n) => {
            if rest.len() < n {
                return Ok(None);
            }
            Ok(Some(Parsed {
                status,
                body: rest.get(..n).unwrap_or_default().to_vec(),
                consumed: start + n,
                close,
            }))
        }
        Framing::UntilClose => {
            if !eof {
                return Ok(None);
            }
            Ok(Some(Parsed {
                status,
                body: rest.to_vec(),
                consumed: buf.len(),
                close: true,
            }))
        }
        Framing::Chunked => {
            let mut body = Vec::new();
            let mut pos = 0usize;
            loop {
                let chunk = rest.get(pos..).unwrap_or_default();
                let Some(eol) = memchr::memmem::find(chunk, b"\r\n") else {
                    return Ok(None);
                };
                let size_str = std::str::from_utf8(chunk.get(..eol).unwrap_or_default())
                    .map_err(|_| "bad chunk size".to_string())?;
                let size_hex = size_str.split(';').next().unwrap_or_default().trim();
                let size = usize::from_str_radix(size_hex, 16)
                    .map_err(|_| format!("bad chunk size {size_str:?}"))?;
                let data_start = pos + eol + 2;
                if size == 0 {
                    // Trailers (normally none) end with an empty line.
                    let trailer = rest.get(data_start..).unwrap_or_default();
                    let Some(end) = memchr::memmem::find(trailer, b"\r\n") else {
                        return Ok(None);
                    };
                    let mut end = end;
                    if end != 0 {
                        let Some(e) = memchr::memmem::find(trailer, b"\r\n\r\n") else {
                            return Ok(None);
                        };
                        end = e + 2;
                    }
                    return Ok(Some(Parsed {
                        status,
                        body,
                        consumed: start + data_start + end + 2,
                        close,
                    }));
                }
                let Some(data) = rest.get(data_start..data_start + size) else {
                    return Ok(None);
                };
                body.extend_from_slice(data);
                if rest.len() < data_start + size + 2 {
                    return Ok(None);
                }
                pos = data_start + size + 2;
            }
        }
    }
}

struct HttpConn {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

impl HttpConn {
    fn new(addr: SocketAddr) -> Self {
        HttpConn {
            addr,
            stream: None,
            buf: Vec::with_capacity(16 * 1024),
        }
    }

    /// Send one request and read its response; reconnects when needed. On error the connection
    /// is dropped (the next request opens a new one). Returns (status, body).
    async fn roundtrip(&mut self, req: &[u8]) -> Result<(u16, Vec<u8>), String> {
        let r = self.try_roundtrip(req).await;
        if r.is_err() {
            self.stream = None;
            self.buf.clear();
        }
        r
    }

    async fn try_roundtrip(&mut self, req: &[u8]) -> Result<(u16, Vec<u8>), String> {
        if self.stream.is_none() {
            let s = TcpStream::connect(self.addr)
                .await
                .map_err(|e| format!("connect:{:?}", e.kind()))?;
            s.set_nodelay(true)
                .map_err(|e| format!("nodelay:{:?}", e.kind()))?;
            self.stream = Some(s);
            self.buf.clear();
        }
        let Some(stream) = self.stream.as_mut() else {
            return Err("no connection".into());
        };
        stream
            .write_all(req)
            .await
            .map_err(|e| format!("write:{:?}", e.kind()))?;
        let mut eof = false;
        loop {
            if let Some(p) = parse_response(&self.buf, eof)? {
                self.buf.drain(..p.consumed);
                if p.close {
                    self.stream = None;
                    self.buf.clear();
                }
                return Ok((p.status, p.body));
            }
            if eof {
                return Err("closed-mid-response".into());
            }
            self.buf.reserve(8 * 1024);
            let n = stream
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| format!("read:{:?}", e.kind()))?;
            if n == 0 {
                if self.buf.is_empty() {
                    return Err("closed-before-response".into());
                }
                eof = true;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sender
// ---------------------------------------------------------------------------------------------

/// Everything the connection tasks share.
struct Plan {
    target: Target,
    http: SocketAddr,
    api_key: String,
    from: String,
    /// JSON string literals (quoted) of the recipients' bare JIDs, by user index − first_user.
    jids: Vec<String>,
    batch: u64,
    requests: u64,
    /// Nanoseconds between request due times (0 = unpaced).
    interval_ns: f64,
    t0_ns: u64,
    end_ns: u64,
    pad: usize,
    next: AtomicU64,
}

#[derive(Debug, Default, Clone)]
struct SendStats {
    requests: u64,
    requests_ok: u64,
    pushes_sent: u64,
    pushes_accepted: u64,
    /// Failed requests by reason (`http-429`, `io:…`).
    http_errors: BTreeMap<String, u64>,
    /// Recipients of answered requests that were not accepted, by status/error.
    rejected: BTreeMap<String, u64>,
    rtt_us: Histogram,
    lag_us: Histogram,
    first_send_ns: u64,
    last_done_ns: u64,
}

impl SendStats {
    fn merge(&mut self, o: &SendStats) {
        self.requests += o.requests;
        self.requests_ok += o.requests_ok;
        self.pushes_sent += o.pushes_sent;
        self.pushes_accepted += o.pushes_accepted;
        for (k, v) in &o.http_errors {
            *self.http_errors.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.rejected {
            *self.rejected.entry(k.clone()).or_default() += v;
        }
        self.rtt_us.merge(&o.rtt_us);
        self.lag_us.merge(&o.lag_us);
        if o.first_send_ns != 0 && (self.first_send_ns == 0 || o.first_send_ns < self.first_send_ns)
        {
            self.first_send_ns = o.first_send_ns;
        }
        self.last_done_ns = self.last_done_ns.max(o.last_done_ns);
    }
}

/// Live counters for progress lines.
#[derive(Default)]
struct Progress {
    pushes_sent: AtomicU64,
    pushes_accepted: AtomicU64,
    errors: AtomicU64,
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

impl Plan {
    /// Write the full HTTP request for request number `i` into `out`.
    fn build(&self, i: u64, stamp: Stamp, out: &mut Vec<u8>, body: &mut Vec<u8>) {
        use std::io::Write;
        body.clear();
        let n = self.jids.len() as u64;
        let jid = |k: u64| self.jids[((i * self.batch + k) % n) as usize].as_str();
        let path = match self.target {
            Target::Tern => {
                body.extend_from_slice(b"{\"to\":");
                if self.batch == 1 {
                    body.extend_from_slice(jid(0).as_bytes());
                } else {
                    body.push(b'[');
                    for k in 0..self.batch {
                        if k > 0 {
                            body.push(b',');
                        }
                        body.extend_from_slice(jid(k).as_bytes());
                    }
                    body.push(b']');
                }
                body.extend_from_slice(b",\"body\":\"");
                write_stamp(body, stamp, self.pad);
                body.extend_from_slice(b"\"}");
                "/api/v1/push"
            }
            Target::Ejabberd => {
                body.extend_from_slice(b"{\"type\":\"normal\",\"from\":");
                body.extend_from_slice(self.from.as_bytes());
                body.extend_from_slice(b",\"to\":");
                body.extend_from_slice(jid(0).as_bytes());
                body.extend_from_slice(b",\"subject\":\"\",\"body\":\"");
                write_stamp(body, stamp, self.pad);
                body.extend_from_slice(b"\"}");
                "/api/send_message"
            }
        };
        out.clear();
        let _ = write!(
            out,
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n",
            self.http
        );
        if self.target == Target::Tern {
            let _ = write!(out, "Authorization: Bearer {}\r\n", self.api_key);
        }
        let _ = write!(out, "Content-Length: {}\r\n\r\n", body.len());
        out.extend_from_slice(body);
    }

    /// Count accepted recipients of an answered request; the rest go to `rejected`.
    fn classify(&self, status: u16, body: &[u8], st: &mut SendStats) -> u64 {
        let k = self.batch;
        if !(200..300).contains(&status) {
            *st.http_errors.entry(format!("http-{status}")).or_default() += 1;
            return 0;
        }
        st.requests_ok += 1;
        match self.target {
            Target::Ejabberd => {
                // send_message answers `0` on success.
                if body.trim_ascii() == b"0" {
                    1
                } else {
                    let mut s = String::from_utf8_lossy(body).into_owned();
                    s.truncate(60);
                    *st.rejected.entry(format!("answer:{s}")).or_default() += 1;
                    0
                }
            }
            Target::Tern => {
                let ok =
                    memchr::memmem::find_iter(body, b"\"status\":\"delivered\"").count() as u64;
                if ok < k {
                    tern_rejections(body, &mut st.rejected, k - ok);
                }
                ok.min(k)
            }
        }
    }
}

/// Why recipients of a Tern push were not delivered (slow path: parse the JSON).
fn tern_rejections(body: &[u8], out: &mut BTreeMap<String, u64>, missing: u64) {
    let mut found = 0;
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body)
        && let Some(results) = v.get("results").and_then(|r| r.as_array())
    {
        for r in results {
            let status = r.get("status").and_then(|s| s.as_str()).unwrap_or("?");
            if status == "delivered" {
                continue;
            }
            let key = match r.get("error").and_then(|e| e.as_str()) {
                Some(e) => format!("{status}:{e}"),
                None => status.to_string(),
            };
            *out.entry(key).or_default() += 1;
            found += 1;
        }
    }
    if found < missing {
        *out.entry("unparsed-response".into()).or_default() += missing - found;
    }
}

async fn conn_task(plan: Arc<Plan>, progress: Arc<Progress>) -> SendStats {
    let mut conn = HttpConn::new(plan.http);
    let mut st = SendStats::default();
    let (mut req, mut body) = (Vec::with_capacity(4096), Vec::with_capacity(4096));
    loop {
        let i = plan.next.fetch_add(1, Ordering::Relaxed);
        if i >= plan.requests {
            break;
        }
        let now = mono_ns();
        let due = if plan.interval_ns > 0.0 {
            plan.t0_ns + (i as f64 * plan.interval_ns) as u64
        } else {
            now
        };
        if due >= plan.end_ns || now >= plan.end_ns {
            break;
        }
        if due > now {
            tokio::time::sleep(Duration::from_nanos(due - now)).await;
        }
        let sent_ns = mono_ns();
        let stamp = Stamp {
            sent_ns,
            due_ns: due.min(sent_ns),
            seq: i,
        };
        if plan.interval_ns > 0.0 {
            st.lag_us.record(sent_ns.saturating_sub(due) / 1000);
        }
        plan.build(i, stamp, &mut req, &mut body);
        if st.first_send_ns == 0 {
            st.first_send_ns = sent_ns;
        }
        st.requests += 1;
        st.pushes_sent += plan.batch;
        progress
            .pushes_sent
            .fetch_add(plan.batch, Ordering::Relaxed);
        let result = conn.roundtrip(&req).await;
        let done = mono_ns();
        st.last_done_ns = done;
        st.rtt_us.record(done.saturating_sub(sent_ns) / 1000);
        match result {
            Ok((status, resp)) => {
                let ok = plan.classify(status, &resp, &mut st);
                st.pushes_accepted += ok;
                progress.pushes_accepted.fetch_add(ok, Ordering::Relaxed);
                if ok < plan.batch {
                    progress.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(reason) => {
                *st.http_errors.entry(format!("io:{reason}")).or_default() += 1;
                progress.errors.fetch_add(1, Ordering::Relaxed);
                // Do not spin on a refused connection.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    st
}

// ---------------------------------------------------------------------------------------------
// Orchestration
// ---------------------------------------------------------------------------------------------

fn sample(pid: Option<u32>, peak: &mut u64) -> Option<ProcSample> {
    let s = stats::sample(pid?)?;
    *peak = (*peak).max(s.rss_kib);
    Some(s)
}

async fn orchestrate(args: PushArgs, conn: ConnectArgs, workers: u64) -> anyhow::Result<()> {
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.timeout);
    let mut peak_rss = 0u64;
    if let Some(pid) = args.server_pid {
        sample(Some(pid), &mut peak_rss)
            .with_context(|| format!("cannot read /proc/{pid}/status and stat"))?;
    }

    // 1. Log the clients in.
    let fleet = Fleet::start(&conn, workers, deadline, None)?;
    let mut bar = Bar::new(args.progress);
    let ramp = wait_ramp(&fleet, args.users, deadline, &mut bar, &mut || {
        sample(args.server_pid, &mut peak_rss)
    })
    .await;
    let timed_out = ramp.timed_out;
    let login_snap = fleet.snapshot();
    let login_secs = start.elapsed().as_secs_f64();
    eprintln!(
        "[{:6.1}s] {} of {} clients logged in ({} failed); pushing",
        login_secs, login_snap.ok, args.users, login_snap.failed
    );
    if login_snap.ok == 0 || timed_out {
        let r = fleet.stop().await?;
        bail!(
            "no push phase: logins ok {}, failures {:?}",
            login_snap.ok,
            r.failures
        );
    }
    tokio::time::sleep(Duration::from_secs_f64(args.settle)).await;

    // 2. Push.
    let batch = args.batch_size();
    let jids: Vec<String> = (0..args.users)
        .map(|k| {
            let user = args
                .user_pattern
                .replace("{i}", &(args.first_user + k).to_string());
            json_string(&format!("{user}@{}", args.login.domain))
        })
        .collect();
    let max_pushes = args.count.unwrap_or(u64::MAX);
    let requests = max_pushes.div_ceil(batch);
    let t0_ns = mono_ns() + 1_000_000; // first request due 1 ms from now
    let send_end = Instant::now() + Duration::from_secs_f64(args.duration);
    let send_end = send_end.min(deadline);
    let end_ns = t0_ns
        + send_end
            .saturating_duration_since(Instant::now())
            .as_nanos() as u64;
    let plan = Arc::new(Plan {
        target: args.target,
        http: args.http,
        api_key: args.api_key.clone().unwrap_or_default(),
        from: json_string(
            &args
                .ejabberd_from
                .clone()
                .unwrap_or_else(|| format!("admin@{}", args.login.domain)),
        ),
        jids,
        batch,
        requests,
        interval_ns: if args.rate > 0.0 {
            1e9 * batch as f64 / args.rate
        } else {
            0.0
        },
        t0_ns,
        end_ns,
        pad: args.body_pad,
        next: AtomicU64::new(0),
    });
    let progress = Arc::new(Progress::default());
    let server_before = sample(args.server_pid, &mut peak_rss);
    let bench_before = fleet.snapshot().cpu_ms;
    let rx_before = fleet.snapshot().rx;
    if rx_before > 0 {
        eprintln!("note: {rx_before} stamped messages arrived before the first push");
    }
    let tasks: Vec<_> = (0..args.http_conns)
        .map(|_| tokio::spawn(conn_task(plan.clone(), progress.clone())))
        .collect();
    let mut all = futures::future::join_all(tasks);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut prev = (
        Instant::now(),
        0u64,
        0u64,
        server_before.map_or(0, |s| s.cpu_ms),
    );
    let results = loop {
        tokio::select! {
            r = &mut all => break r,
            _ = tick.tick() => {
                let now = Instant::now();
                let dt = now.duration_since(prev.0).as_secs_f64().max(1e-3);
                let sent = progress.pushes_sent.load(Ordering::Relaxed);
                let rx = fleet.snapshot().rx;
                let mut line = format!(
                    "[{:6.1}s] sent {} (+{:.0}/s)  accepted {}  errors {}  received {} (+{:.0}/s)",
                    start.elapsed().as_secs_f64(),
                    sent,
                    (sent - prev.1) as f64 / dt,
                    progress.pushes_accepted.load(Ordering::Relaxed),
                    progress.errors.load(Ordering::Relaxed),
                    rx,
                    rx.saturating_sub(prev.2) as f64 / dt,
                );
                if let Some(s) = sample(args.server_pid, &mut peak_rss) {
                    line += &s.progress(prev.3, dt);
                    prev.3 = s.cpu_ms;
                }
                eprintln!("{line}");
                prev = (now, sent, rx, prev.3);
            }
        }
    };
    let mut sent = SendStats::default();
    for r in results {
        sent.merge(&r.context("sender task")?);
    }
    let server_send_end = sample(args.server_pid, &mut peak_rss);
    let bench_send_end = fleet.snapshot().cpu_ms;

    // 3. Drain: wait for what was accepted to arrive.
    let expected = sent.pushes_accepted + rx_before;
    let drain_until = (Instant::now() + Duration::from_secs_f64(args.drain))
        .min(deadline.max(Instant::now() + Duration::from_secs(1)));
    loop {
        let rx = fleet.snapshot().rx;
        if rx >= expected || Instant::now() >= drain_until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Workers report every 200 ms: let the last report arrive before stopping.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let server_after = sample(args.server_pid, &mut peak_rss);
    let result = fleet.stop().await?;
    if let Some(path) = &args.plot {
        plot::write(
            path,
            &format!("tern-bench push: {} clients", args.users),
            "push-to-receive latency",
            &[plot::Series::of_histogram(
                "push",
                &result.push_latency_us,
                None,
            )],
            &ramp.rss,
        )?;
    }

    let report = Report::build(
        &args,
        workers,
        login_secs,
        &result,
        &sent,
        rx_before,
        ServerSamples {
            pid: args.server_pid,
            before: server_before,
            send_end: server_send_end,
            after: server_after,
            peak_rss_kib: peak_rss,
        },
        bench_send_end.saturating_sub(bench_before),
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

struct ServerSamples {
    pid: Option<u32>,
    before: Option<ProcSample>,
    send_end: Option<ProcSample>,
    after: Option<ProcSample>,
    peak_rss_kib: u64,
}

#[derive(Debug, Serialize)]
struct ServerReport {
    pid: u32,
    /// RSS just before the first push (all clients logged in).
    rss_before_kib: u64,
    rss_after_kib: u64,
    rss_peak_kib: u64,
    /// Server CPU during the send window, as a fraction of one core.
    cpu_send_util: f64,
    /// Server CPU from the first push to the end of the drain ÷ pushes received.
    cpu_us_per_push: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    scenario: &'static str,
    target: Target,
    http: String,
    mode: Mode,
    batch: u64,
    rate_target: f64,
    duration_target: f64,
    http_conns: usize,
    users: u64,
    workers: u64,
    logged_in: u64,
    login_failures: BTreeMap<String, u64>,
    login_secs: f64,
    sessions_dropped: u64,
    requests: u64,
    requests_ok: u64,
    /// Failed requests by reason (non-2xx status, I/O error).
    http_errors: BTreeMap<String, u64>,
    /// Pushes (recipient deliveries) in the requests sent.
    pushes_sent: u64,
    /// Pushes the server acknowledged as delivered (Tern `"status":"delivered"`, ejabberd `0`).
    pushes_accepted: u64,
    /// Recipients of answered requests that were not accepted, by status/error.
    rejected: BTreeMap<String, u64>,
    /// Stamped pushes received by the clients.
    received: u64,
    /// Other messages received.
    received_other: u64,
    /// Accepted but not received by the end of the drain.
    lost: u64,
    /// Received beyond what was accepted (e.g. requests that failed on the client side but were
    /// delivered anyway).
    extra: u64,
    /// First request written → last response read.
    send_secs: f64,
    /// First request written → last push received (or last response, if later).
    delivery_secs: f64,
    requests_per_sec: f64,
    accepted_per_sec: f64,
    /// Pushes received ÷ delivery_secs: the throughput figure.
    delivered_per_sec: f64,
    /// Push-to-receive latency: from writing the request to the client parsing the message.
    latency: Latency,
    /// From the time the request was due (fixed rate only differs).
    latency_from_schedule: Latency,
    /// HTTP request → response.
    http_rtt: Latency,
    /// How late requests went out against the schedule (fixed rate only).
    sender_lag: Latency,
    /// Benchmark CPU (all its processes) during the send window, as a fraction of one core.
    bench_cpu_send_util: f64,
    server_process: Option<ServerReport>,
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    fn build(
        args: &PushArgs,
        workers: u64,
        login_secs: f64,
        r: &FleetResult,
        s: &SendStats,
        rx_before: u64,
        server: ServerSamples,
        bench_cpu_ms: u64,
    ) -> Report {
        let snap = &r.snapshot;
        let received = snap.rx.saturating_sub(rx_before);
        let send_ns = s.last_done_ns.saturating_sub(s.first_send_ns);
        let send_secs = send_ns as f64 / 1e9;
        let delivery_ns = snap
            .rx_last_ns
            .max(s.last_done_ns)
            .saturating_sub(s.first_send_ns);
        let delivery_secs = delivery_ns as f64 / 1e9;
        let per = |n: u64, secs: f64| {
            if secs > 0.0 {
                round(n as f64 / secs, 1)
            } else {
                0.0
            }
        };
        let server_process = match (server.pid, server.before, server.send_end) {
            (Some(pid), Some(before), Some(send_end)) => {
                let after = server.after.unwrap_or(send_end);
                let send_cpu = send_end.cpu_ms.saturating_sub(before.cpu_ms) as f64 / 1000.0;
                let all_cpu = after.cpu_ms.saturating_sub(before.cpu_ms) as f64 / 1000.0;
                Some(ServerReport {
                    pid,
                    rss_before_kib: before.rss_kib,
                    rss_after_kib: after.rss_kib,
                    rss_peak_kib: server.peak_rss_kib,
                    cpu_send_util: if send_secs > 0.0 {
                        round(send_cpu / send_secs, 3)
                    } else {
                        0.0
                    },
                    cpu_us_per_push: (received > 0)
                        .then(|| round(all_cpu * 1e6 / received as f64, 2)),
                })
            }
            _ => None,
        };
        Report {
            scenario: "push",
            target: args.target,
            http: args.http.to_string(),
            mode: args.mode,
            batch: args.batch_size(),
            rate_target: args.rate,
            duration_target: args.duration,
            http_conns: args.http_conns,
            users: args.users,
            workers,
            logged_in: snap.ok,
            login_failures: r.failures.clone(),
            login_secs: round(login_secs, 2),
            sessions_dropped: snap.dropped,
            requests: s.requests,
            requests_ok: s.requests_ok,
            http_errors: s.http_errors.clone(),
            pushes_sent: s.pushes_sent,
            pushes_accepted: s.pushes_accepted,
            rejected: s.rejected.clone(),
            received,
            received_other: snap.rx_other,
            lost: s.pushes_accepted.saturating_sub(received),
            extra: received.saturating_sub(s.pushes_accepted),
            send_secs: round(send_secs, 3),
            delivery_secs: round(delivery_secs, 3),
            requests_per_sec: per(s.requests, send_secs),
            accepted_per_sec: per(s.pushes_accepted, send_secs),
            delivered_per_sec: per(received, delivery_secs),
            latency: Latency::of(&r.push_latency_us),
            latency_from_schedule: Latency::of(&r.push_sched_latency_us),
            http_rtt: Latency::of(&s.rtt_us),
            sender_lag: Latency::of(&s.lag_us),
            bench_cpu_send_util: if send_secs > 0.0 {
                round(bench_cpu_ms as f64 / 1000.0 / send_secs, 3)
            } else {
                0.0
            },
            server_process,
        }
    }

    fn table(&self) -> String {
        let mut o = String::new();
        let mut row = |k: &str, v: String| o.push_str(&format!("  {k:<26} {v}\n"));
        let rate = if self.rate_target > 0.0 {
            format!("{}/s", self.rate_target)
        } else {
            "max".into()
        };
        row(
            "scenario",
            format!(
                "push to {:?} ({}), {:?} x{}, rate {rate}, {} HTTP conns, {} clients, {} process(es)",
                self.target,
                self.http,
                self.mode,
                self.batch,
                self.http_conns,
                self.users,
                self.workers
            ),
        );
        row(
            "clients logged in",
            format!(
                "{} of {} in {:.1} s (dropped later: {})",
                self.logged_in, self.users, self.login_secs, self.sessions_dropped
            ),
        );
        for (k, v) in &self.login_failures {
            row("login failure", format!("{v:>7}  {k}"));
        }
        row(
            "requests",
            format!(
                "{} sent, {} 2xx, {:.1}/s",
                self.requests, self.requests_ok, self.requests_per_sec
            ),
        );
        for (k, v) in &self.http_errors {
            row("HTTP error", format!("{v:>7}  {k}"));
        }
        row(
            "pushes",
            format!(
                "{} sent, {} accepted, {} received, {} lost, {} extra, {} other messages",
                self.pushes_sent,
                self.pushes_accepted,
                self.received,
                self.lost,
                self.extra,
                self.received_other
            ),
        );
        for (k, v) in &self.rejected {
            row("rejected recipient", format!("{v:>7}  {k}"));
        }
        row(
            "throughput",
            format!(
                "{:.0} delivered/s over {:.2} s ({:.0} accepted/s over {:.2} s of sending)",
                self.delivered_per_sec, self.delivery_secs, self.accepted_per_sec, self.send_secs
            ),
        );
        let lat = |l: &Latency| {
            format!(
                "p50 {:.2} ms  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}  (n {})",
                l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms, l.samples
            )
        };
        row("push→receive latency", lat(&self.latency));
        if self.rate_target > 0.0 {
            row("  from scheduled time", lat(&self.latency_from_schedule));
            row("sender lag", lat(&self.sender_lag));
        }
        row("HTTP round trip", lat(&self.http_rtt));
        row(
            "bench CPU while sending",
            format!("{:.0}% of one core", self.bench_cpu_send_util * 100.0),
        );
        if let Some(s) = &self.server_process {
            row(
                "server CPU while sending",
                format!(
                    "{:.0}% of one core; {} per push received",
                    s.cpu_send_util * 100.0,
                    s.cpu_us_per_push
                        .map_or("n/a".into(), |u| format!("{u:.1} µs"))
                ),
            );
            row(
                "server RSS",
                format!(
                    "{:.1} MiB before pushing, {:.1} MiB peak, {:.1} MiB after",
                    s.rss_before_kib as f64 / 1024.0,
                    s.rss_peak_kib as f64 / 1024.0,
                    s.rss_after_kib as f64 / 1024.0
                ),
            );
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_round_trip() {
        let s = Stamp {
            sent_ns: 123_456_789_012,
            due_ns: 123_456_000_000,
            seq: 42,
        };
        let mut body = Vec::new();
        write_stamp(&mut body, s, 0);
        let msg = format!(
            "<message to='a@b' type='normal'><body>{}</body></message>",
            String::from_utf8(body).unwrap()
        );
        assert_eq!(parse_stamp(msg.as_bytes()), Some(s));
        let mut body = Vec::new();
        write_stamp(&mut body, s, 5);
        assert!(body.ends_with(b";p=xxxxx"));
        let msg = format!(
            "<message><subject/><body xml:lang='en'>{}</body></message>",
            String::from_utf8(body).unwrap()
        );
        assert_eq!(parse_stamp(msg.as_bytes()), Some(s));
        for bad in [
            "<message><body>hello</body></message>",
            "<message><bodyx>t=1;s=1;n=1</bodyx></message>",
            "<message><body>t=1;s=1;n=</body></message>",
            "<message><body>t=1;s=1;n=1x</body></message>",
            "<message/>",
        ] {
            assert_eq!(parse_stamp(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn responses_with_length_chunks_and_close() {
        let r = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabcHTTP/1.1";
        assert_eq!(
            parse_response(r, false).unwrap(),
            Some(Parsed {
                status: 200,
                body: b"abc".to_vec(),
                consumed: r.len() - 8,
                close: false
            })
        );
        assert_eq!(parse_response(&r[..20], false).unwrap(), None);
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab", false).unwrap(),
            None
        );
        let c = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        let p = parse_response(c, false).unwrap().unwrap();
        assert_eq!((p.body.as_slice(), p.consumed), (&b"abcde"[..], c.len()));
        for cut in 1..c.len() {
            assert_eq!(parse_response(&c[..cut], false).unwrap(), None, "{cut}");
        }
        let k = b"HTTP/1.1 429 Too Many\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
        let p = parse_response(k, false).unwrap().unwrap();
        assert_eq!((p.status, p.close), (429, true));
        let u = b"HTTP/1.0 200 OK\r\n\r\n0";
        assert_eq!(parse_response(u, false).unwrap(), None);
        assert_eq!(parse_response(u, true).unwrap().unwrap().body, b"0");
        assert!(parse_response(b"SSH-2.0\r\n\r\n", false).is_err());
    }

    #[test]
    fn requests_and_classification() {
        let plan = Plan {
            target: Target::Tern,
            http: "127.0.0.1:8080".parse().unwrap(),
            api_key: "k".into(),
            from: json_string("admin@localhost"),
            jids: (0..3)
                .map(|i| json_string(&format!("u{i}@localhost")))
                .collect(),
            batch: 2,
            requests: 10,
            interval_ns: 0.0,
            t0_ns: 0,
            end_ns: u64::MAX,
            pad: 0,
            next: AtomicU64::new(0),
        };
        let stamp = Stamp {
            sent_ns: 5,
            due_ns: 5,
            seq: 1,
        };
        let (mut req, mut body) = (Vec::new(), Vec::new());
        plan.build(1, stamp, &mut req, &mut body);
        let req = String::from_utf8(req).unwrap();
        assert!(req.starts_with("POST /api/v1/push HTTP/1.1\r\n"), "{req}");
        assert!(req.contains("Authorization: Bearer k\r\n"));
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            json["to"],
            serde_json::json!(["u2@localhost", "u0@localhost"])
        );
        assert_eq!(json["body"], "t=5;s=5;n=1");
        assert!(req.ends_with(&String::from_utf8(body.clone()).unwrap()));

        let mut st = SendStats::default();
        let resp = br#"{"id":"x","results":[{"to":"u2@localhost","status":"delivered"},{"to":"u0@localhost","status":"error","error":"queue full"}]}"#;
        assert_eq!(plan.classify(200, resp, &mut st), 1);
        assert_eq!(st.rejected.get("error:queue full"), Some(&1));
        assert_eq!(plan.classify(429, b"", &mut st), 0);
        assert_eq!(st.http_errors.get("http-429"), Some(&1));

        let plan = Plan {
            target: Target::Ejabberd,
            batch: 1,
            ..plan
        };
        let (mut req, mut body) = (Vec::new(), Vec::new());
        plan.build(4, stamp, &mut req, &mut body);
        assert!(req.starts_with(b"POST /api/send_message HTTP/1.1\r\n"));
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["to"], "u1@localhost");
        assert_eq!(json["from"], "admin@localhost");
        assert_eq!(json["type"], "normal");
        let mut st = SendStats::default();
        assert_eq!(plan.classify(200, b"0", &mut st), 1);
        assert_eq!(plan.classify(200, b"\"error\"", &mut st), 0);
    }
}

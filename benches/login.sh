#!/usr/bin/env bash
# Login-rate / idle-memory benchmark of Tern with tern-bench (see BENCHMARKS.md).
#
# Starts a fresh server per run pinned to CPU $SERVER_CPU, runs `tern-bench connect` pinned to
# CPU $BENCH_CPU, stores each run's JSON and prints the medians.
#
#   benches/login.sh                      # 3 runs, 10,000 users, direct TLS, concurrency 200
#   RUNS=5 USERS=20000 benches/login.sh -- --prefer-suite aes128
#
# Environment: RUNS (3) USERS (10000) CONCURRENCY (200) RATE (0 = max) HOLD (8) SETTLE (5)
#   SERVER_CPU (0) BENCH_CPU (1) NICE (0; e.g. -15 to shield the runs from other load on the machine:
#   server and bench each run in a new session whose autogroup gets this nice value — with
#   CONFIG_SCHED_AUTOGROUP plain `nice` would only rank them within their own session; needs root)
#   OUT (target/bench-login/<timestamp>) BUILD (1; 0 = use existing binaries)
# Arguments after `--` are passed to tern-bench.
set -euo pipefail

cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
USERS=${USERS:-10000}
CONCURRENCY=${CONCURRENCY:-200}
RATE=${RATE:-0}
HOLD=${HOLD:-8}
SETTLE=${SETTLE:-5}
SERVER_CPU=${SERVER_CPU:-0}
BENCH_CPU=${BENCH_CPU:-1}
NICE=${NICE:-0}
OUT=${OUT:-target/bench-login/$(date -u +%Y%m%dT%H%M%SZ)}
SECRET=bench-device-secret-0123456789abcdef
[[ "${1:-}" == "--" ]] && shift

if [[ "${BUILD:-1}" == 1 ]]; then
    cargo build --release --bin tern --bin tern-bench
fi
mkdir -p "$OUT"
cat > "$OUT/tern.toml" <<TOML
[server]
domain = "localhost"
data_dir = "$PWD/$OUT/data"

[c2s]
starttls_listen = ["127.0.0.1:15222"]
tls_listen = ["127.0.0.1:15223"]
ping_interval_secs = 0

[auth]
device_secret = "$SECRET"

[limits]
max_connections_per_ip = 0

[log]
level = "warn"
TOML

# Run "$@" in a new session (own scheduler autogroup) with nice $NICE on CPU $1; the process id
# is written to the file $2 (setsid may fork, so $! is not it).
pinned() {
    local cpu=$1 pidfile=$2
    shift 2
    setsid bash -c 'echo $$ > "$1"; if [[ $0 != 0 ]]; then echo "$0" > /proc/self/autogroup; fi; shift; exec "$@"' \
        "$NICE" "$pidfile" nice -n "$NICE" taskset -c "$cpu" "$@"
}

server_pid=
cleanup() { [[ -n "$server_pid" ]] && kill "$server_pid" 2>/dev/null || true; }
trap cleanup EXIT

for run in $(seq 1 "$RUNS"); do
    rm -f "$OUT/server.pid"
    pinned "$SERVER_CPU" "$OUT/server.pid" target/release/tern serve --config "$OUT/tern.toml" \
        > "$OUT/server-$run.log" 2>&1 &
    for _ in $(seq 1 50); do [[ -s "$OUT/server.pid" ]] && break; sleep 0.1; done
    server_pid=$(cat "$OUT/server.pid")
    for _ in $(seq 1 100); do
        (exec 3<>/dev/tcp/127.0.0.1/15223) 2>/dev/null && break
        sleep 0.1
    done
    sleep 1 # let the server settle before the "before" RSS sample
    pinned "$BENCH_CPU" "$OUT/bench.pid" target/release/tern-bench connect \
        --server 127.0.0.1:15223 --tls direct --domain localhost \
        --users "$USERS" --concurrency "$CONCURRENCY" --rate "$RATE" \
        --device-secret "$SECRET" --source-ips 127.0.0.1-127.0.0.50 \
        --hold "$HOLD" --settle "$SETTLE" --server-pid "$server_pid" --json "$@" \
        > "$OUT/run-$run.json" 2> "$OUT/run-$run.progress"
    kill "$server_pid"
    for _ in $(seq 1 100); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
    server_pid=
    jq -r --arg run "$run" '"run \($run): \(.ok)/\(.attempted) ok, \(.login_rate) logins/s, p50 \(.latency.p50_ms) ms, p99 \(.latency.p99_ms) ms, \(.server_process.kib_per_session) KiB/session, server \(.server_process.cpu_us_per_login) µs CPU/login (\(.server_process.cpu_ramp_util * 100 | round)% core), bench \(.harness_cpu_ramp_util * 100 | round)% core, resumed \(.tls_resumed), \(.tls_params)"' "$OUT/run-$run.json"
done

jq -s -r '
  def median: sort | if length % 2 == 1 then .[length/2|floor] else (.[length/2-1] + .[length/2]) / 2 end;
  "median of \(length): \(map(.login_rate) | median) logins/s, p50 \(map(.latency.p50_ms) | median) ms, p99 \(map(.latency.p99_ms) | median) ms, \(map(.server_process.kib_per_session) | median) KiB/session, server \(map(.server_process.cpu_us_per_login) | median) µs CPU/login"
' "$OUT"/run-*.json
echo "results in $OUT"

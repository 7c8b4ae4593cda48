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
#   SERVER_CPU (0) BENCH_CPU (1) NICE (0; e.g. -15 to shield the runs from other load on the
#   machine, see benches/lib.sh) BENCH_TERN_TLS_PORT (15223) and the other settings of benches/lib.sh
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
BENCH_TERN_HTTP_PORT= # no HTTP API
# shellcheck source=lib.sh
source benches/lib.sh
[[ "${1:-}" == "--" ]] && shift

if [[ "${BUILD:-1}" == 1 ]]; then
    cargo build --release --bin tern --bin tern-bench
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
tern_write_config "$OUT/tern.toml" "$OUT/data"
trap tern_stop EXIT

for run in $(seq 1 "$RUNS"); do
    tern_start "$OUT/tern.toml" "$SERVER_CPU" "$OUT/server-$run.log"
    pinned "$BENCH_CPU" "$OUT/bench.pid" "$BIN/tern-bench" connect \
        --server "127.0.0.1:$BENCH_TERN_TLS_PORT" --tls direct --domain localhost \
        --users "$USERS" --concurrency "$CONCURRENCY" --rate "$RATE" \
        --device-secret "$BENCH_TERN_SECRET" --source-ips 127.0.0.1-127.0.0.50 \
        --hold "$HOLD" --settle "$SETTLE" --server-pid "$BENCH_TERN_PID" --json "$@" \
        > "$OUT/run-$run.json" 2> "$OUT/run-$run.progress"
    tern_stop
    jq -r --arg run "$run" '"run \($run): \(.ok)/\(.attempted) ok, \(.login_rate) logins/s, p50 \(.latency.p50_ms) ms, p99 \(.latency.p99_ms) ms, \(.server_process.kib_per_session) KiB/session, server \(.server_process.cpu_us_per_login) µs CPU/login (\(.server_process.cpu_ramp_util * 100 | round)% core), bench \(.harness_cpu_ramp_util * 100 | round)% core, resumed \(.tls_resumed), \(.tls_params)"' "$OUT/run-$run.json"
done

jq -s -r '
  def median: sort | if length % 2 == 1 then .[length/2|floor] else (.[length/2-1] + .[length/2]) / 2 end;
  "median of \(length): \(map(.login_rate) | median) logins/s, p50 \(map(.latency.p50_ms) | median) ms, p99 \(map(.latency.p99_ms) | median) ms, \(map(.server_process.kib_per_session) | median) KiB/session, server \(map(.server_process.cpu_us_per_login) | median) µs CPU/login"
' "$OUT"/run-*.json
echo "results in $OUT"

#!/usr/bin/env bash
# Push throughput and latency: Tern against ejabberd, with tern-bench push (see BENCHMARKS.md).
#
# For each run, target and scenario a fresh server is started pinned to CPU $SERVER_CPU, and
# `tern-bench push` pinned to CPU $BENCH_CPU logs $USERS clients in (direct TLS), then pushes
# through the server's HTTP API:
#   batch   max rate, $BATCH recipients per request, $BATCH_CONNS keep-alive connections (Tern only:
#           ejabberd's mod_http_api has no batch send)
#   single  max rate, one recipient per request, $SINGLE_CONNS keep-alive connections
#   fixed   $FIXED_RATE pushes/s, one recipient per request, $FIXED_CONNS connections (latency)
#   low     $LOW_RATE pushes/s, as `fixed` (a rate both servers sustain, for a fair latency figure)
# Each JSON result is kept in $OUT; at the end one table of medians with Tern/ejabberd ratios.
#
#   benches/push.sh                              # 3 runs, 10,000 clients, Tern and ejabberd
#   RUNS=1 USERS=2000 TARGETS=tern benches/push.sh
#
# Environment: RUNS (3) USERS (10000) DURATION (10 s of sending per scenario) BATCH (100)
#   BATCH_CONNS (4) SINGLE_CONNS (32) FIXED_RATE (10000) FIXED_CONNS (32) LOW_RATE (5000) DRAIN (5)
#   TARGETS ("tern ejabberd") SCENARIOS ("batch single fixed low") SERVER_CPU (0) BENCH_CPU (1)
#   NICE (0; e.g. -15, see benches/lib.sh) OUT (target/bench-push/<timestamp>) BUILD (1)
#   TIME_LIMIT (5400 s for the whole script; each step also has its own timeout)
#   SUMMARY_ONLY (0; 1 = only print the table of the results already in $OUT)
# Arguments after `--` are passed to every tern-bench run.
set -euo pipefail

cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
USERS=${USERS:-10000}
DURATION=${DURATION:-10}
BATCH=${BATCH:-100}
BATCH_CONNS=${BATCH_CONNS:-4}
SINGLE_CONNS=${SINGLE_CONNS:-32}
FIXED_RATE=${FIXED_RATE:-10000}
FIXED_CONNS=${FIXED_CONNS:-32}
LOW_RATE=${LOW_RATE:-5000}
DRAIN=${DRAIN:-5}
TARGETS=${TARGETS:-tern ejabberd}
SCENARIOS=${SCENARIOS:-batch single fixed low}
SERVER_CPU=${SERVER_CPU:-0}
BENCH_CPU=${BENCH_CPU:-1}
NICE=${NICE:-0}
TIME_LIMIT=${TIME_LIMIT:-5400}
OUT=${OUT:-target/bench-push/$(date -u +%Y%m%dT%H%M%SZ)}
# shellcheck source=lib.sh
source benches/lib.sh
[[ "${1:-}" == "--" ]] && shift
EXTRA=("$@")

if [[ "${SUMMARY_ONLY:-0}" == 1 ]]; then
    BUILD=0 RUNS=0 TARGETS=
fi
if [[ "${BUILD:-1}" == 1 ]]; then
    cargo build --release --bin tern --bin tern-bench
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SCRIPT_END=$((SECONDS + TIME_LIMIT))

# shellcheck source=ejabberd/ejabberd.sh
source benches/ejabberd/ejabberd.sh
EJ_DIR=$OUT/ejabberd
tern_write_config "$OUT/tern.toml" "$OUT/tern-data"

bench_pid=
cleanup() {
    [[ -n "$bench_pid" ]] && kill "$bench_pid" 2>/dev/null || true
    tern_stop
    ej_stop "$EJ_DIR" || true
    ej_epmd_restore
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# scenario_args SCENARIO: tern-bench arguments of one scenario.
scenario_args() {
    case $1 in
        batch) echo "--mode batch --batch $BATCH --rate 0 --http-conns $BATCH_CONNS" ;;
        single) echo "--mode single --rate 0 --http-conns $SINGLE_CONNS" ;;
        fixed) echo "--mode single --rate $FIXED_RATE --http-conns $FIXED_CONNS" ;;
        low) echo "--mode single --rate $LOW_RATE --http-conns $FIXED_CONNS" ;;
    esac
}

# bench TARGET SCENARIO RUN SERVER_PID
bench() {
    local target=$1 scenario=$2 run=$3 pid=$4 file
    file="$OUT/$target-$scenario-$run"
    local target_args
    if [[ $target == tern ]]; then
        target_args=(--target tern --http "127.0.0.1:$BENCH_TERN_HTTP_PORT" --api-key "$BENCH_TERN_API_KEY"
            --server "127.0.0.1:$BENCH_TERN_TLS_PORT" --device-secret "$BENCH_TERN_SECRET")
    else
        target_args=(--target ejabberd --http "127.0.0.1:$EJ_HTTP_PORT"
            --server "127.0.0.1:$EJ_TLS_PORT" --password-pattern 'pw-{i}')
    fi
    local limit=$((DURATION + DRAIN + 150))
    # shellcheck disable=SC2046
    pinned "$BENCH_CPU" "$OUT/bench.pid" timeout --kill-after=10 "$limit" \
        "$BIN/tern-bench" push "${target_args[@]}" --tls direct --domain localhost \
        --users "$USERS" --source-ips 127.0.0.1-127.0.0.50 --duration "$DURATION" \
        --drain "$DRAIN" --timeout $((limit - 10)) --server-pid "$pid" --json \
        $(scenario_args "$scenario") "${EXTRA[@]}" > "$file.json" 2> "$file.progress" &
    bench_pid=$!
    wait "$bench_pid" || echo "tern-bench exited with $? (see $file.progress)" >&2
    bench_pid=
    if jq -e . "$file.json" > /dev/null 2>&1; then
        jq --arg s "$scenario" '. + {bench_scenario: $s}' "$file.json" > "$file.tmp" && mv "$file.tmp" "$file.json"
        jq -r --arg n "$target $scenario run $run" '"\($n): \(.delivered_per_sec) delivered/s, \(.pushes_accepted)/\(.pushes_sent) accepted, \(.received) received, \(.lost) lost, errors \(.http_errors), latency p50 \(.latency.p50_ms) ms p99 \(.latency.p99_ms) ms max \(.latency.max_ms) ms, server \(.server_process.cpu_us_per_push) µs/push (\(.server_process.cpu_send_util * 100 | round)% core), bench \(.bench_cpu_send_util * 100 | round)% core, logged in \(.logged_in)"' "$file.json"
    else
        rm -f "$file.json"
        echo "$target $scenario run $run: no result" >&2
    fi
}

if [[ " $TARGETS " == *" ejabberd "* ]]; then
    ej_prepare "$EJ_DIR"
    ej_start "$EJ_DIR" "$SERVER_CPU" "$NICE"
    ej_register "$EJ_DIR" "$USERS" 'bench-{i}' 'pw-{i}'
    ej_stop "$EJ_DIR"
fi

for run in $(seq 1 "$RUNS"); do
    for target in $TARGETS; do
        for scenario in $SCENARIOS; do
            if ((SECONDS > SCRIPT_END)); then
                echo "TIME_LIMIT ($TIME_LIMIT s) reached; stopping" >&2
                break 3
            fi
            if [[ $target == ejabberd && $scenario == batch ]]; then
                continue # no batch send in mod_http_api
            fi
            if [[ $target == tern ]]; then
                tern_start "$OUT/tern.toml" "$SERVER_CPU" "$OUT/tern-server.log"
                bench tern "$scenario" "$run" "$BENCH_TERN_PID"
                tern_stop
            else
                ej_start "$EJ_DIR" "$SERVER_CPU" "$NICE"
                sleep 1
                bench ejabberd "$scenario" "$run" "$EJ_PID"
                ej_stop "$EJ_DIR"
            fi
        done
    done
done

# Medians per target and scenario, then the side-by-side table.
shopt -s nullglob
files=("$OUT"/*-*-*.json)
if ((${#files[@]} == 0)); then
    echo "no results" >&2
    exit 1
fi
jq -s -r --arg fixed "$FIXED_RATE" --arg low "$LOW_RATE" '
  def median: sort | if length == 0 then null elif length % 2 == 1 then .[length/2|floor]
                     else (.[length/2-1] + .[length/2]) / 2 end;
  def m(f): map(f) | map(select(. != null)) | median;
  def fmt: if . == null then "n/a" elif type == "number" then (. * 100 | round / 100 | tostring) else tostring end;
  def ratio(a; b): if a == null or b == null or b == 0 then "n/a" else ((a / b) * 100 | round / 100 | tostring) + "×" end;
  (group_by(.target + "/" + .bench_scenario)
   | map({key: (.[0].target + "/" + .[0].bench_scenario),
          value: {runs: length,
                  rate: m(.delivered_per_sec), p50: m(.latency.p50_ms), p99: m(.latency.p99_ms),
                  p99s: m(.latency_from_schedule.p99_ms), max: m(.latency.max_ms),
                  lost: m(.lost), errors: m([.http_errors[]] | add // 0),
                  cpu: m(.server_process.cpu_us_per_push), util: m(.server_process.cpu_send_util),
                  bench: m(.bench_cpu_send_util), rss: m(.server_process.rss_peak_kib / 1024)}})
   | from_entries) as $r
  | def row(name; f; cmp): "| \(name) | \($r["tern/" + f[0]] | if . == null then null else .[f[1]] end | fmt) | \($r["ejabberd/" + f[0]] | if . == null then null else .[f[1]] end | fmt) | \(if cmp then ratio($r["tern/" + f[0]][f[1]]?; $r["ejabberd/" + f[0]][f[1]]?) else "" end) |";
  "medians (runs per cell: " + ([$r | to_entries[] | "\(.key)=\(.value.runs)"] | join(", ")) + ")",
    "",
    "| metric | Tern | ejabberd | Tern ÷ ejabberd |",
    "|---|---:|---:|---:|",
    "| max rate, batched: pushes/s delivered | \($r["tern/batch"].rate | fmt) | n/a (no batch send) | \(ratio($r["tern/batch"].rate; $r["ejabberd/single"].rate)) vs ejabberd single |",
    "| max rate, batched: server CPU µs/push | \($r["tern/batch"].cpu | fmt) | n/a | \(ratio($r["tern/batch"].cpu; $r["ejabberd/single"].cpu)) vs ejabberd single |",
    row("max rate, single: pushes/s delivered"; ["single", "rate"]; true),
    row("max rate, single: server CPU µs/push"; ["single", "cpu"]; true),
    row("max rate, single: latency p50 ms"; ["single", "p50"]; true),
    row("max rate, single: latency p99 ms"; ["single", "p99"]; true),
    row("\($fixed)/s single: pushes/s delivered"; ["fixed", "rate"]; true),
    row("\($fixed)/s single: latency p50 ms"; ["fixed", "p50"]; true),
    row("\($fixed)/s single: latency p99 ms"; ["fixed", "p99"]; true),
    row("\($fixed)/s single: p99 from scheduled send, ms"; ["fixed", "p99s"]; true),
    row("\($fixed)/s single: latency max ms"; ["fixed", "max"]; false),
    row("\($fixed)/s single: server CPU, share of a core"; ["fixed", "util"]; true),
    row("\($low)/s single: pushes/s delivered"; ["low", "rate"]; true),
    row("\($low)/s single: latency p50 ms"; ["low", "p50"]; true),
    row("\($low)/s single: latency p99 ms"; ["low", "p99"]; true),
    row("\($low)/s single: p99 from scheduled send, ms"; ["low", "p99s"]; true),
    row("\($low)/s single: server CPU, share of a core"; ["low", "util"]; true),
    "| lost pushes (batch / single / fixed / low) | \([$r["tern/batch", "tern/single", "tern/fixed", "tern/low"] | if . == null then null else .lost end | fmt] | join(" / ")) | \([$r["ejabberd/single", "ejabberd/fixed", "ejabberd/low"] | if . == null then null else .lost end | fmt] | join(" / ")) | |",
    "| failed requests (batch / single / fixed / low) | \([$r["tern/batch", "tern/single", "tern/fixed", "tern/low"] | if . == null then null else .errors end | fmt] | join(" / ")) | \([$r["ejabberd/single", "ejabberd/fixed", "ejabberd/low"] | if . == null then null else .errors end | fmt] | join(" / ")) | |",
    row("server peak RSS MiB (max rate, single)"; ["single", "rss"]; false),
    "| bench CPU, share of its core (batch / single / fixed / low) | \([$r["tern/batch", "tern/single", "tern/fixed", "tern/low"] | if . == null then null else .bench end | fmt] | join(" / ")) | \([$r["ejabberd/single", "ejabberd/fixed", "ejabberd/low"] | if . == null then null else .bench end | fmt] | join(" / ")) | |"
' "${files[@]}" | tee "$OUT/summary.md"
echo "results in $OUT"

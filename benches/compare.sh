#!/usr/bin/env bash
# Side-by-side comparison of Tern with ejabberd, Prosody (XMPP) and coturn (TURN), all driven by
# tern-bench (see BENCHMARKS.md, "Comparison script").
#
# Installs what is missing (Debian packages), builds tern and tern-bench (release), then for each
# server in $SERVERS, one after another, for each run and scenario: starts the server fresh, pinned
# to CPU $SERVER_CPU, runs `tern-bench SCENARIO ... --server-pid PID --json` pinned to CPU
# $BENCH_CPU under a timeout, stops the server, and keeps the JSON as
# $OUT/<server>-<scenario>-<run>.json. At the end benches/compare.py prints one Markdown table of
# the medians with Tern ÷ peer ratios ($OUT/summary.md). All load stays on 127.0.0.0/8.
#
# Scenarios ($SCENARIOS) and the servers they run against:
#   connect  $USERS logins at full speed (concurrency $CONCURRENCY), held $HOLD s: logins/s,
#            login latency, server KiB/session and CPU/login          (Tern, ejabberd, Prosody)
#   idle     the same with $IDLE_USERS users: idle capacity, KiB/session at that count
#   storm    `storm --cut client`, $STORM_USERS users: time until all are back  (same three)
#   push     pushes through the server's HTTP API, one recipient per request, $PUSH_RATE/s (0 =
#            as fast as $PUSH_CONNS connections go) to $PUSH_USERS clients, $PUSH_DURATION s
#            (Tern /api/v1/push, ejabberd mod_http_api send_message; Prosody: n/a, no HTTP send API
#            in Debian's prosody / prosody-modules)
#   chat     `chat`: client → endpoint <message type='chat'> echo      (Tern, ejabberd, Prosody)
#   turn     `turn`: $TURN_ALLOCS allocations, $TURN_PAYLOAD B payloads at $TURN_RATE msgs/s for
#            $TURN_DURATION s                                          (Tern, coturn)
# A scenario that this tern-bench build does not have is reported as n/a.
#
#   benches/compare.sh                                     # everything, 3 runs
#   USERS=1000 RUNS=1 SCENARIOS="connect push" benches/compare.sh
#   SERVERS="tern prosody" SCENARIOS=connect benches/compare.sh
#   SUMMARY_ONLY=1 OUT=target/bench-compare/<ts> benches/compare.sh   # table of existing results
#
# Environment: SERVERS ("tern ejabberd prosody coturn") SCENARIOS ("connect idle storm push chat
#   turn") RUNS (3) USERS (10000) CONCURRENCY (200) HOLD (8) SETTLE (5) IDLE_USERS (19000)
#   IDLE_HOLD (20) IDLE_SETTLE (10) STORM_USERS ($USERS) STORM_ARGS ("") PUSH_USERS ($USERS)
#   PUSH_RATE (0) PUSH_CONNS (32) PUSH_DURATION (10) PUSH_DRAIN (5) CHAT_ENDPOINTS (1000)
#   CHAT_TOOLS (20) CHAT_DURATION (10) CHAT_ARGS (tools bench-0.., endpoints after them, window 16
#   per tool, as fast as the echoes come back) TURN_ALLOCS (500)
#   TURN_PAYLOAD (100) TURN_RATE (20000) TURN_DURATION (10) TURN_ARGS ("") SERVER_CPU (0)
#   BENCH_CPU (1) NICE (0; see benches/lib.sh) STEP_TIMEOUT (600 s per tern-bench run at most)
#   TIME_LIMIT (7200 s for the whole script) OUT (target/bench-compare/<timestamp>) BUILD (1)
#   INSTALL (1; 0 = do not apt-get install missing packages) SUMMARY_ONLY (0)
#   Ports: BENCH_TERN_* (benches/lib.sh), EJ_* (ejabberd/ejabberd.sh), PR_* (prosody/prosody.sh),
#   TURN_PORT (13478, Tern's TURN listener) COTURN_PORT (33478).
# *_ARGS are appended to that scenario's tern-bench arguments.
set -euo pipefail

cd "$(dirname "$0")/.."
SERVERS=${SERVERS:-tern ejabberd prosody coturn}
SCENARIOS=${SCENARIOS:-connect idle storm push chat turn}
RUNS=${RUNS:-3}
USERS=${USERS:-10000}
CONCURRENCY=${CONCURRENCY:-200}
HOLD=${HOLD:-8}
SETTLE=${SETTLE:-5}
IDLE_USERS=${IDLE_USERS:-19000}
IDLE_HOLD=${IDLE_HOLD:-20}
IDLE_SETTLE=${IDLE_SETTLE:-10}
STORM_USERS=${STORM_USERS:-$USERS}
STORM_ARGS=${STORM_ARGS:-}
PUSH_USERS=${PUSH_USERS:-$USERS}
PUSH_RATE=${PUSH_RATE:-0}
PUSH_CONNS=${PUSH_CONNS:-32}
PUSH_DURATION=${PUSH_DURATION:-10}
PUSH_DRAIN=${PUSH_DRAIN:-5}
CHAT_ENDPOINTS=${CHAT_ENDPOINTS:-1000}
CHAT_TOOLS=${CHAT_TOOLS:-20}
CHAT_USERS=$((CHAT_TOOLS + CHAT_ENDPOINTS)) # accounts bench-0.. : the tools first, then endpoints
CHAT_DURATION=${CHAT_DURATION:-10}
if [[ -z "${CHAT_ARGS:-}" ]]; then
    CHAT_ARGS="--tools $CHAT_TOOLS --tool-pattern bench-{i} --endpoints $CHAT_ENDPOINTS"
    CHAT_ARGS+=" --first-endpoint $CHAT_TOOLS --rate 0 --window 16 --duration $CHAT_DURATION"
fi
TURN_ALLOCS=${TURN_ALLOCS:-500}
TURN_PAYLOAD=${TURN_PAYLOAD:-100}
TURN_RATE=${TURN_RATE:-20000}
TURN_DURATION=${TURN_DURATION:-10}
TURN_ARGS=${TURN_ARGS:-}
SERVER_CPU=${SERVER_CPU:-0}
BENCH_CPU=${BENCH_CPU:-1}
NICE=${NICE:-0}
STEP_TIMEOUT=${STEP_TIMEOUT:-600}
TIME_LIMIT=${TIME_LIMIT:-7200}
OUT=${OUT:-target/bench-compare/$(date -u +%Y%m%dT%H%M%SZ)}
TURN_PORT=${TURN_PORT:-13478} # Tern's, with the turn scenario
COTURN_PORT=${COTURN_PORT:-33478}
# shellcheck source=lib.sh
source benches/lib.sh
BENCH_TERN_TURN_PORT= # no TURN listener for the XMPP scenarios
# shellcheck source=ejabberd/ejabberd.sh
source benches/ejabberd/ejabberd.sh
# shellcheck source=prosody/prosody.sh
source benches/prosody/prosody.sh

if [[ "${SUMMARY_ONLY:-0}" == 1 ]]; then
    exec python3 benches/compare.py "$OUT"
fi

if [[ "${INSTALL:-1}" == 1 ]]; then
    missing=()
    for pkg in ejabberd prosody coturn curl jq openssl python3 util-linux; do
        dpkg-query -W -f '${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        echo "installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y "${missing[@]}" || { apt-get update && apt-get install -y "${missing[@]}"; }
    fi
fi
if [[ "${BUILD:-1}" == 1 ]]; then
    cargo build --release --bin tern --bin tern-bench
fi

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SCRIPT_END=$((SECONDS + TIME_LIMIT))
EJ_DIR=$OUT/ejabberd
PR_DIR=$OUT/prosody
CT_DIR=$OUT/coturn
tern_write_config "$OUT/tern.toml" "$OUT/tern-data"
BENCH_TERN_TURN_PORT=$TURN_PORT tern_write_config "$OUT/tern-turn.toml" "$OUT/tern-data"
: > "$OUT/na.tsv"

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) CPUs;" \
        "server on CPU $SERVER_CPU, tern-bench on CPU $BENCH_CPU"
    echo "kernel: $(uname -srm)"
    echo "tern: $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet HEAD 2>/dev/null || echo -dirty)"
    for pkg in ejabberd prosody coturn; do
        echo "$pkg: $(dpkg-query -W -f '${Version}' "$pkg" 2>/dev/null || echo 'not installed')"
    done
    echo "settings: RUNS=$RUNS USERS=$USERS CONCURRENCY=$CONCURRENCY IDLE_USERS=$IDLE_USERS" \
        "STORM_USERS=$STORM_USERS STORM_ARGS=\"$STORM_ARGS\" PUSH_USERS=$PUSH_USERS PUSH_RATE=$PUSH_RATE" \
        "PUSH_CONNS=$PUSH_CONNS CHAT_ARGS=\"$CHAT_ARGS\" TURN_ALLOCS=$TURN_ALLOCS" \
        "TURN_PAYLOAD=$TURN_PAYLOAD TURN_RATE=$TURN_RATE TURN_ARGS=\"$TURN_ARGS\" NICE=$NICE"
} > "$OUT/machine.txt"
cat "$OUT/machine.txt"

BENCH_PID=
cleanup() {
    trap '' INT TERM # a second signal must not cut the cleanup short
    # tern-bench runs in its own session: stop it through the pid `pinned` wrote (its timeout).
    if [[ -n "$BENCH_PID" && -s "$OUT/bench.pid" ]]; then
        kill "$(cat "$OUT/bench.pid")" 2>/dev/null || true
    fi
    tern_stop
    ej_stop "$EJ_DIR" || true
    pr_stop || true
    coturn_stop || true
    ej_epmd_restore
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# na SERVER SCENARIO REASON: the table shows n/a with this reason.
na() {
    local server=$1 scenario=$2
    shift 2
    printf '%s\t%s\t%s\n' "$server" "$scenario" "$*" >> "$OUT/na.tsv"
}

# applies SERVER SCENARIO: whether the scenario runs against that server (else records why not).
applies() {
    local server=$1 scenario=$2
    case "$server/$scenario" in
        coturn/turn | tern/*) ;;
        coturn/* | */turn) return 1 ;;
        prosody/push)
            na prosody push "no HTTP API to send a message in Debian's prosody 0.12.3 and" \
                "prosody-modules (mod_rest, mod_post_msg are not packaged)"
            return 1
            ;;
    esac
    if ! "$BIN/tern-bench" "$scenario" --help > /dev/null 2>&1 \
        && [[ $scenario != connect && $scenario != idle ]]; then
        na "$server" "$scenario" "this tern-bench has no \`$scenario\` scenario"
        return 1
    fi
    return 0
}

# server_start SERVER SCENARIO: sets SERVER_PID (Tern gets a [turn] listener for `turn` only).
server_start() {
    case $1/$2 in
        tern/turn) tern_start "$OUT/tern-turn.toml" "$SERVER_CPU" "$OUT/tern-server.log" \
            && wait_stun "$TURN_PORT" && SERVER_PID=$BENCH_TERN_PID ;;
        tern/*) tern_start "$OUT/tern.toml" "$SERVER_CPU" "$OUT/tern-server.log" \
            && SERVER_PID=$BENCH_TERN_PID ;;
        ejabberd/*) ej_start "$EJ_DIR" "$SERVER_CPU" "$NICE" && sleep 1 && SERVER_PID=$EJ_PID ;;
        prosody/*) pr_start "$PR_DIR" "$SERVER_CPU" && SERVER_PID=$PR_PID ;;
        coturn/*) coturn_start "$CT_DIR" "$COTURN_PORT" "$SERVER_CPU" && SERVER_PID=$COTURN_PID ;;
    esac
}

server_stop() {
    case $1 in
        tern) tern_stop ;;
        ejabberd) ej_stop "$EJ_DIR" ;;
        prosody) pr_stop ;;
        coturn) coturn_stop ;;
    esac
    SERVER_PID=
}

# XMPP login arguments of tern-bench for SERVER (direct TLS; device credentials for Tern,
# accounts bench-{i} / pw-{i} created below for the others).
login_args() {
    case $1 in
        tern) echo "--server 127.0.0.1:$BENCH_TERN_TLS_PORT --device-secret $BENCH_TERN_SECRET" ;;
        ejabberd) echo "--server 127.0.0.1:$EJ_TLS_PORT --password-pattern pw-{i}" ;;
        prosody) echo "--server 127.0.0.1:$PR_TLS_PORT --password-pattern pw-{i}" ;;
    esac
    echo "--tls direct --domain localhost --source-ips 127.0.0.1-127.0.0.50"
}

# scenario_args SERVER SCENARIO LIMIT: the tern-bench command line after the subcommand.
scenario_args() {
    local server=$1 scenario=$2 limit=$3
    case $scenario in
        connect) echo "$(login_args "$server") --users $USERS --concurrency $CONCURRENCY --rate 0" \
            "--hold $HOLD --settle $SETTLE --timeout $((limit - 10))" ;;
        idle) echo "$(login_args "$server") --users $IDLE_USERS --concurrency $CONCURRENCY --rate 0" \
            "--hold $IDLE_HOLD --settle $IDLE_SETTLE --timeout $((limit - 10))" ;;
        storm) echo "$(login_args "$server") --cut client --users $STORM_USERS $STORM_ARGS" ;;
        push)
            if [[ $server == tern ]]; then
                echo "--target tern --http 127.0.0.1:$BENCH_TERN_HTTP_PORT --api-key $BENCH_TERN_API_KEY"
            else
                echo "--target ejabberd --http 127.0.0.1:$EJ_HTTP_PORT"
            fi
            echo "$(login_args "$server") --users $PUSH_USERS --mode single --rate $PUSH_RATE" \
                "--http-conns $PUSH_CONNS --duration $PUSH_DURATION --drain $PUSH_DRAIN" \
                "--timeout $((limit - 10))"
            ;;
        chat) echo "$(login_args "$server") $CHAT_ARGS" ;;
        turn)
            local port=$TURN_PORT
            [[ $server == coturn ]] && port=$COTURN_PORT
            echo "--server 127.0.0.1:$port --secret $TURN_SECRET --allocations $TURN_ALLOCS" \
                "--payload $TURN_PAYLOAD --rate $TURN_RATE --duration $TURN_DURATION $TURN_ARGS"
            ;;
    esac
}

# bench SERVER SCENARIO RUN: one tern-bench run against the running server.
bench() {
    local server=$1 scenario=$2 run=$3 file limit subcommand=$2 rss0
    file="$OUT/$server-$scenario-$run"
    case $scenario in
        push) limit=$((PUSH_DURATION + PUSH_DRAIN + 150)) ;;
        connect) limit=$((HOLD + 300)) ;;
        *) limit=$STEP_TIMEOUT ;;
    esac
    ((limit > STEP_TIMEOUT)) && limit=$STEP_TIMEOUT
    [[ $scenario == idle ]] && subcommand=connect
    rss0=$(awk '/^VmRSS:/ {print $2}' "/proc/$SERVER_PID/status" 2>/dev/null || true)
    rm -f "$OUT/bench.pid"
    # shellcheck disable=SC2046 # word splitting of the argument lists is intended
    pinned "$BENCH_CPU" "$OUT/bench.pid" timeout --kill-after=10 "$limit" "$BIN/tern-bench" \
        "$subcommand" $(scenario_args "$server" "$scenario" "$limit") --server-pid "$SERVER_PID" \
        --json > "$file.json" 2> "$file.progress" &
    BENCH_PID=$!
    wait "$BENCH_PID" || echo "  tern-bench exited with $? (see $file.progress)" >&2
    BENCH_PID=
    if jq -e 'type == "object"' "$file.json" > /dev/null 2>&1; then
        jq --arg server "$server" --arg scenario "$scenario" --argjson rss0 "${rss0:-null}" \
            '. + {bench_server: $server, bench_scenario: $scenario, bench_rss_before_kib: $rss0}' \
            "$file.json" > "$file.tmp" && mv "$file.tmp" "$file.json"
        echo "  $server $scenario run $run: $(python3 benches/compare.py --one "$file.json")"
    else
        mv "$file.json" "$file.failed" 2>/dev/null || true
        echo "  $server $scenario run $run: no result (see $file.progress)" >&2
    fi
}

# Accounts for ejabberd and Prosody: as many as the largest selected scenario logs in.
max_users=0
for scenario in $SCENARIOS; do
    case $scenario in
        connect) n=$USERS ;; idle) n=$IDLE_USERS ;; storm) n=$STORM_USERS ;;
        push) n=$PUSH_USERS ;; chat) n=$CHAT_USERS ;; *) n=0 ;;
    esac
    ((n > max_users)) && max_users=$n
done
SERVER_PID=
for server in $SERVERS; do
    todo=()
    for scenario in $SCENARIOS; do applies "$server" "$scenario" && todo+=("$scenario"); done
    ((${#todo[@]})) || continue
    echo "== $server: ${todo[*]}"
    case $server in
        ejabberd)
            ej_prepare "$EJ_DIR"
            ej_start "$EJ_DIR" "$SERVER_CPU" "$NICE"
            ej_register "$EJ_DIR" "$max_users" 'bench-{i}' 'pw-{i}'
            ej_stop "$EJ_DIR"
            ;;
        prosody)
            pr_prepare "$PR_DIR"
            pr_accounts "$PR_DIR" "$max_users" 'bench-{i}' 'pw-{i}'
            ;;
    esac
    for run in $(seq 1 "$RUNS"); do
        for scenario in "${todo[@]}"; do
            if ((SECONDS > SCRIPT_END)); then
                echo "TIME_LIMIT ($TIME_LIMIT s) reached; stopping" >&2
                break 3
            fi
            if ! server_start "$server" "$scenario"; then
                echo "  $server did not start; skipping $scenario run $run" >&2
                server_stop "$server"
                continue
            fi
            bench "$server" "$scenario" "$run"
            server_stop "$server"
        done
    done
done

python3 benches/compare.py "$OUT" | tee "$OUT/summary.md"
echo "results in $OUT"

#!/usr/bin/env bash
# TURN relay benchmark: Tern's embedded TURN server against coturn (Debian's `turnserver`), under the
# same load in the same run (see BENCHMARKS.md, "TURN relay").
#
# For each run and server, a fresh server is started pinned to CPU $SERVER_CPU with equivalent
# settings (loopback listener, REST secret, loopback peers allowed, no TLS/DTLS, no bandwidth cap,
# no quotas in the way). The load runs pinned to CPU $LOAD_CPU, with coturn's turnutils_peer as the
# UDP echo peer; M allocations in $ALLOCS, payloads in $SIZES, two load generators ($LOADS):
#   tool     the `bench_relay` load tool of tests/turn.rs: M allocations, each with a channel to
#            the peer, sending ChannelData with at most $WINDOW messages unanswered (closed loop,
#            as fast as the echoes come back); $TOOL_TOTAL messages in all.
#   uclient  coturn's turnutils_uclient (-c: one allocation per client, channels, REST secret),
#            paced to $OFFERED messages/s in total (-z), $TOTAL messages in all.
# Each message crosses the server twice (client -> peer, peer -> client): relayed packets =
# 2 x messages echoed back. Reported: loss, the achieved relayed packets/s and Mbit/s of payload
# over the sending window, and the server's CPU time over that window, from which "capacity" =
# relayed packets per second of server CPU (what one saturated core would relay: the load
# generator and the echo peer share one core and cannot saturate either server, so the achieved
# rate is mostly the load generator's).
#   alloc   the `bench_allocations` load tool of tests/turn.rs: $MEM_N allocations (own UDP socket
#           each, 401 round trip then authenticated Allocate, 50 in flight): allocations/s; then
#           each gets a permission and one datagram relayed both ways (so per-relay buffers are
#           touched), and the server's VmRSS growth while holding them / $MEM_N = KiB per allocation.
# Results: $OUT/relay.tsv, $OUT/alloc.tsv, raw outputs, and $OUT/summary.md (medians, ratios).
#
#   benches/turn.sh                          # 3 runs, 100 and 1000 bytes x 10/100/500 allocations
#   RUNS=1 ALLOCS="10 100" SIZES=100 benches/turn.sh
#
# Environment: RUNS (3) SIZES ("100 1000") ALLOCS ("10 100 500") LOADS ("tool uclient") WINDOW (4)
#   TOTAL (messages per turnutils_uclient run across all clients, 100000) TOOL_TOTAL (the same for
#   the tool, 400000) MIN_N (messages per client at least, 100) OFFERED (messages/s the
#   clients are paced to in total, 20000: turnutils_uclient -z = M*1000/OFFERED ms, at least 1)
#   MEM_N (2000) TARGETS ("tern coturn") SERVER_CPU (0) LOAD_CPU (1) BUILD (1)
#   OUT (target/bench-turn/<timestamp>) TIME_LIMIT (3600 s for the whole script)
#   SUMMARY_ONLY (0; 1 = only summarize the results already in $OUT) LOADTOOL (path of the
#   tests/turn.rs test binary; default: built and found with cargo)
set -euo pipefail

cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
SIZES=${SIZES:-100 1000}
ALLOCS=${ALLOCS:-10 100 500}
LOADS=${LOADS:-tool uclient}
WINDOW=${WINDOW:-4}
TOTAL=${TOTAL:-100000}
TOOL_TOTAL=${TOOL_TOTAL:-400000}
MIN_N=${MIN_N:-100}
OFFERED=${OFFERED:-20000}
MEM_N=${MEM_N:-2000}
TARGETS=${TARGETS:-tern coturn}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
TIME_LIMIT=${TIME_LIMIT:-3600}
OUT=${OUT:-target/bench-turn/$(date -u +%Y%m%dT%H%M%SZ)}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
# shellcheck source=lib.sh
source benches/lib.sh # TURN_SECRET, relay ports 20000-29999, Tern's and coturn's settings
SECRET=$TURN_SECRET

for tool in turnserver turnutils_uclient turnutils_peer taskset python3; do
    command -v "$tool" > /dev/null || {
        echo "$tool not found (apt-get install coturn util-linux python3)" >&2
        exit 1
    }
done

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SCRIPT_END=$((SECONDS + TIME_LIMIT))

if [[ "${SUMMARY_ONLY:-0}" != 1 ]]; then
    if [[ "${BUILD:-1}" == 1 ]]; then
        cargo build --release --bin tern
        cargo test --release --test turn --no-run
    fi
    LOADTOOL=${LOADTOOL:-$(cargo test --release --test turn --no-run --message-format=json 2> /dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "turn":
        print(m["executable"])' | tail -1)}
    [[ -x "$LOADTOOL" ]] || {
        echo "cannot find the tests/turn.rs test binary" >&2
        exit 1
    }
fi

free_port() {
    python3 -c 'import socket
while True:
    t = socket.socket(); t.bind(("127.0.0.1", 0)); p = t.getsockname()[1]
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.bind(("127.0.0.1", p)); print(p); break
    except OSError:
        pass'
}

# Everything this script starts, killed on exit (by pid, never by name).
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do
        kill "$p" 2> /dev/null || true
    done
    sleep 0.2
    for p in "${PIDS[@]}"; do
        kill -9 "$p" 2> /dev/null || true
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
CLK_TCK=$(getconf CLK_TCK)

server_pid=
peer_pid=
TURN_PORT=

start_peer() {
    PEER_PORT=$(free_port)
    taskset -c "$LOAD_CPU" turnutils_peer -L 127.0.0.1 -p "$PEER_PORT" > /dev/null 2>&1 &
    peer_pid=$!
    PIDS+=("$peer_pid")
}

start_tern() {
    local dir=$OUT/tern-run
    rm -rf "$dir"
    mkdir -p "$dir"
    TURN_PORT=$(free_port)
    BENCH_TERN_STARTTLS_PORT=$(free_port) BENCH_TERN_TLS_PORT=$(free_port) BENCH_TERN_HTTP_PORT=$(free_port) \
        BENCH_TERN_TURN_PORT=$TURN_PORT tern_write_config "$dir/tern.toml" "$dir/data"
    taskset -c "$SERVER_CPU" "$TARGET_DIR/release/tern" serve --config "$dir/tern.toml" \
        >> "$OUT/tern-server.log" 2>&1 &
    server_pid=$!
    PIDS+=("$server_pid")
}

start_coturn() {
    TURN_PORT=$(free_port)
    coturn_start "$OUT/coturn-run" "$TURN_PORT" "$SERVER_CPU"
    server_pid=$COTURN_PID
    PIDS+=("$server_pid")
}

stop_server() {
    [[ -z "$server_pid" ]] && return 0
    kill "$server_pid" 2> /dev/null || true
    local i
    for i in $(seq 1 50); do
        kill -0 "$server_pid" 2> /dev/null || break
        sleep 0.1
    done
    kill -9 "$server_pid" 2> /dev/null || true
    wait "$server_pid" 2> /dev/null || true
    server_pid=
    [[ -n "$peer_pid" ]] && { kill "$peer_pid" 2> /dev/null || true; wait "$peer_pid" 2> /dev/null || true; }
    peer_pid=
}

# relay_tool TARGET SIZE M RUN: one bench_relay run; appends a row to relay.tsv.
relay_tool() {
    local target=$1 size=$2 m=$3 run=$4
    local n=$((TOOL_TOTAL / m))
    ((n < MIN_N)) && n=$MIN_N
    local file=$OUT/relay-tool-$target-$size-$m-$run.log
    TURN_BENCH_SERVER=127.0.0.1:$TURN_PORT TURN_BENCH_SECRET=$SECRET TURN_BENCH_PEER=127.0.0.1:$PEER_PORT \
        TURN_BENCH_M=$m TURN_BENCH_MSGS=$n TURN_BENCH_SIZE=$size TURN_BENCH_WINDOW=$WINDOW \
        TURN_BENCH_SERVER_PID=$server_pid taskset -c "$LOAD_CPU" timeout --kill-after=5 300 \
        "$LOADTOOL" --ignored --exact bench_relay --nocapture > "$file" 2>&1 || true
    local line
    line=$(grep -o 'RELAY .*' "$file" | tail -1 || true)
    if [[ -z "$line" ]]; then
        printf 'tool\t%s\t%s\t%s\t%s\t%s\t%s\tNA\tNA\tNA\tNA\tNA\n' "$target" "$size" "$m" "$run" "$n" "w$WINDOW" >> "$OUT/relay.tsv"
        echo "  tool $target ${size}B x$m run $run: no result (see $file)" >&2
        return 0
    fi
    local _ sent recv lost secs cpu
    read -r _ sent recv lost secs cpu <<< "$line"
    printf 'tool\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$target" "$size" "$m" "$run" "$n" \
        "w$WINDOW" "$sent" "$recv" "$lost" "$secs" "$cpu" >> "$OUT/relay.tsv"
    echo "  tool $target ${size}B x$m run $run: sent $sent recv $recv lost $lost in ${secs}s, server CPU ${cpu}s"
}

# relay_uclient TARGET SIZE M RUN: one turnutils_uclient run; appends a row to relay.tsv.
relay_uclient() {
    local target=$1 size=$2 m=$3 run=$4
    local n=$((TOTAL / m))
    ((n < MIN_N)) && n=$MIN_N
    local z=$((m * 1000 / OFFERED))
    ((z < 1)) && z=1
    local file=$OUT/relay-uclient-$target-$size-$m-$run.log
    local limit=$((n * z / 1000 + m / 5 + 120))
    # Each output line is stamped with the wall clock and the server's CPU ticks when it appears:
    # sending starts at "Total connect time", ends at "Total transmit time".
    taskset -c "$LOAD_CPU" timeout --kill-after=5 "$limit" stdbuf -oL -eL \
        turnutils_uclient -c -W "$SECRET" -u bench -e 127.0.0.1 -r "$PEER_PORT" \
        -p "$TURN_PORT" -m "$m" -n "$n" -l "$size" -z "$z" 127.0.0.1 2>&1 |
        while IFS= read -r line; do
            printf '%s %s %s\n' "$(date +%s.%N)" "$(cpu_ticks "$server_pid" 2> /dev/null || echo 0)" "$line"
        done > "$file" || true
    python3 - "$file" "$target" "$size" "$m" "$run" "$n" "$z" "$CLK_TCK" >> "$OUT/relay.tsv" << 'PY'
import re, sys
path, target, size, m, run, n, z, tck = sys.argv[1:]
start = end = None
sent = recv = lost = None
for line in open(path, errors="replace"):
    parts = line.split(" ", 2)
    if len(parts) < 3:
        continue
    t, cpu, text = float(parts[0]), float(parts[1]), parts[2]
    if "Total connect time" in text and start is None:
        start = (t, cpu)
    if "Total transmit time" in text:
        end = (t, cpu)
    mm = re.search(r"start_mclient: tot_send_msgs=(\d+), tot_recv_msgs=(\d+)", text)
    if mm:
        sent, recv = int(mm.group(1)), int(mm.group(2))
    mm = re.search(r"Total lost packets (\d+)", text)
    if mm:
        lost = int(mm.group(1))
if None in (start, end, sent, recv, lost):
    print(f"uclient\t{target}\t{size}\t{m}\t{run}\t{n}\tz{z}\tNA\tNA\tNA\tNA\tNA", flush=True)
    sys.stderr.write(f"{path}: incomplete turnutils_uclient output\n")
    sys.exit(0)
window = max(end[0] - start[0], 1e-3)
cpu = (end[1] - start[1]) / float(tck)
print(f"uclient\t{target}\t{size}\t{m}\t{run}\t{n}\tz{z}\t{sent}\t{recv}\t{lost}\t{window:.3f}\t{cpu:.2f}")
PY
    tail -1 "$OUT/relay.tsv" | awk -F'\t' '{printf "  uclient %s %sB x%s run %s: sent %s recv %s lost %s in %ss, server CPU %ss\n", $2, $3, $4, $5, $8, $9, $10, $11, $12}'
    if grep -q 'error 508' "$file"; then
        echo "  (turnutils_uclient got 508 Insufficient Capacity: it asks for EVEN-PORT)" >&2
    fi
}

# alloc TARGET RUN: allocation rate and memory per allocation; appends a row to alloc.tsv.
alloc() {
    local target=$1 run=$2
    local file=$OUT/alloc-$target-$run.log ready=$OUT/ready release=$OUT/release
    rm -f "$ready" "$release"
    local rss0
    rss0=$(rss_kib "$server_pid")
    TURN_BENCH_SERVER=127.0.0.1:$TURN_PORT TURN_BENCH_SECRET=$SECRET TURN_BENCH_N=$MEM_N \
        TURN_BENCH_PEER=127.0.0.1:$PEER_PORT TURN_BENCH_READY=$ready TURN_BENCH_RELEASE=$release \
        taskset -c "$LOAD_CPU" timeout --kill-after=5 300 "$LOADTOOL" --ignored --exact \
        bench_allocations --nocapture > "$file" 2>&1 &
    local tool=$!
    PIDS+=("$tool")
    local i
    for i in $(seq 1 1200); do
        [[ -e "$ready" ]] && break
        kill -0 "$tool" 2> /dev/null || break
        sleep 0.1
    done
    sleep 1
    local rss1
    rss1=$(rss_kib "$server_pid")
    touch "$release"
    wait "$tool" || true
    local line
    line=$(grep -o 'ALLOCATIONS .*' "$file" | tail -1 || true)
    if [[ -z "$line" ]]; then
        echo "  $target alloc run $run: no result (see $file)" >&2
        return 0
    fi
    # ALLOCATIONS <ok> <secs> <rate> failed <n> active <n>
    read -r _ ok secs rate _ failed _ active <<< "$line"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$target" "$run" "$ok" "$failed" "$active" \
        "$secs" "$rate" "$rss0" "$rss1" >> "$OUT/alloc.tsv"
    echo "  $target alloc run $run: $ok allocations ($failed failed, $active active) in ${secs}s = $rate/s; RSS ${rss0} -> ${rss1} KiB"
}

if [[ "${SUMMARY_ONLY:-0}" != 1 ]]; then
    {
        echo "# $(date -u) $(uname -srm); $(nproc) CPUs: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-)"
        echo "# tern $(git rev-parse --short HEAD 2> /dev/null)$(git diff --quiet 2> /dev/null || echo -dirty) (src/turn sha256 $(cat src/turn/*.rs | sha256sum | cut -c1-12)); coturn $(dpkg-query -W -f '${Version}' coturn 2> /dev/null)"
        echo "# RUNS=$RUNS SIZES=$SIZES ALLOCS=$ALLOCS LOADS=$LOADS WINDOW=$WINDOW TOTAL=$TOTAL TOOL_TOTAL=$TOOL_TOTAL MIN_N=$MIN_N OFFERED=$OFFERED MEM_N=$MEM_N SERVER_CPU=$SERVER_CPU LOAD_CPU=$LOAD_CPU"
    } > "$OUT/machine.txt"
    cat "$OUT/machine.txt"
    for run in $(seq 1 "$RUNS"); do
        for target in $TARGETS; do
            if ((SECONDS > SCRIPT_END)); then
                echo "TIME_LIMIT ($TIME_LIMIT s) reached; stopping" >&2
                break 2
            fi
            echo "run $run: $target"
            "start_$target"
            start_peer
            wait_stun "$TURN_PORT"
            for size in $SIZES; do
                for m in $ALLOCS; do
                    for load in $LOADS; do
                        "relay_$load" "$target" "$size" "$m" "$run"
                    done
                done
            done
            alloc "$target" "$run"
            stop_server
        done
    done
fi

python3 - "$OUT" "$MEM_N" << 'PY' | tee "$OUT/summary.md"
import statistics, sys, os
out, mem_n = sys.argv[1], int(sys.argv[2])
def rows(name):
    p = os.path.join(out, name)
    return [l.rstrip("\n").split("\t") for l in open(p)] if os.path.exists(p) else []
def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None
def f(x, d=0):
    return "n/a" if x is None else f"{x:,.{d}f}"
def ratio(a, b):
    return "n/a" if a is None or b in (None, 0) else f"{a / b:.2f}x"
relay = {}
for r in rows("relay.tsv"):
    load, target, size, m, run, n, pace = r[:7]
    key = (load, target, int(size), int(m))
    if r[7] == "NA":
        relay.setdefault(key, []).append(None)
        continue
    sent, recv, lost = int(r[7]), int(r[8]), int(r[9])
    window, cpu = float(r[10]), float(r[11])
    pkts = 2 * recv
    relay.setdefault(key, []).append(dict(
        sent=sent, recv=recv, lost=sent - recv,
        pps=pkts / window, mbps=pkts * int(size) * 8 / window / 1e6,
        cap=pkts / cpu if cpu > 0 else None, capmbps=pkts * int(size) * 8 / cpu / 1e6 if cpu > 0 else None,
        us=cpu * 1e6 / pkts if pkts else None))
def m_of(key, field):
    return med([x[field] for x in relay.get(key, []) if x is not None])
print("Medians over runs (successful/attempted runs per cell). Relayed packets = 2 x echoed messages;")
print("Mbit/s count payload bytes; capacity = relayed packets per second of server CPU time.")
for load in ("tool", "uclient"):
    keys = sorted({(s, m) for (l, _, s, m) in relay if l == load})
    if not keys:
        continue
    print()
    print(f"Load: {load}")
    print()
    print("| payload | allocations | server | runs | lost / sent | achieved relayed pkt/s | achieved Mbit/s | server CPU µs / relayed pkt | capacity pkt/s | capacity Mbit/s |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for size, m in keys:
        for target in ("tern", "coturn"):
            k = (load, target, size, m)
            if k not in relay:
                continue
            ok = [x for x in relay[k] if x is not None]
            lost = f"{sum(x['lost'] for x in ok)} / {sum(x['sent'] for x in ok)}" if ok else "n/a"
            print(f"| {size} B | {m} | {target} | {len(ok)}/{len(relay[k])} | {lost} | {f(m_of(k,'pps'))} | {f(m_of(k,'mbps'),1)} | {f(m_of(k,'us'),2)} | {f(m_of(k,'cap'))} | {f(m_of(k,'capmbps'),0)} |")
    print()
    print("| payload | allocations | Tern ÷ coturn: capacity | Tern ÷ coturn: achieved pkt/s |")
    print("|---:|---:|---:|---:|")
    for size, m in keys:
        t, c = (load, "tern", size, m), (load, "coturn", size, m)
        print(f"| {size} B | {m} | {ratio(m_of(t,'cap'), m_of(c,'cap'))} | {ratio(m_of(t,'pps'), m_of(c,'pps'))} |")
alloc = {}
for r in rows("alloc.tsv"):
    target, run, ok, failed, active, secs, rate, rss0, rss1 = r
    ok = int(ok)
    alloc.setdefault(target, []).append(dict(ok=ok, failed=int(failed), active=int(active), rate=float(rate),
        per=(int(rss1) - int(rss0)) / ok if ok else None, rss0=int(rss0), rss1=int(rss1)))
if alloc:
    print()
    print(f"| server | runs | allocations/s | failed | RSS before → holding {mem_n} (KiB) | KiB per allocation |")
    print("|---|---:|---:|---:|---:|---:|")
    for target in ("tern", "coturn"):
        a = alloc.get(target)
        if not a:
            continue
        print(f"| {target} | {len(a)} | {f(med([x['rate'] for x in a]))} | {sum(x['failed'] for x in a)} | {f(med([x['rss0'] for x in a]))} → {f(med([x['rss1'] for x in a]))} | {f(med([x['per'] for x in a]),1)} |")
    t, c = alloc.get("tern"), alloc.get("coturn")
    if t and c:
        print()
        print(f"Tern ÷ coturn: allocations/s {ratio(med([x['rate'] for x in t]), med([x['rate'] for x in c]))}, "
              f"memory per allocation {ratio(med([x['per'] for x in t]), med([x['per'] for x in c]))}")
PY
echo "results in $OUT"

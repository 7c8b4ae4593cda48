# Helpers shared by the benchmark scripts (login.sh, push.sh, compare.sh; ejabberd/ejabberd.sh and
# prosody/prosody.sh). Source it from the repository root.
#
#   pinned CPU PIDFILE CMD...      run CMD in a new session on CPU (taskset), nice $NICE (see below);
#                                  its process id is written to PIDFILE (setsid may fork, so $!
#                                  is not it)
#   wait_port PORT                 wait up to 10 s for a TCP listener on 127.0.0.1:PORT
#   selfsigned_cert KEY CRT        ECDSA P-256 self-signed certificate for `localhost` (the key
#                                  type Tern generates for itself)
#   tern_write_config FILE DATA    Tern configuration for the benchmarks (loopback, device
#                                  credentials, no per-IP limit); optional [http] and [turn]
#   tern_start CONFIG CPU LOG      start `tern serve` pinned to CPU; sets BENCH_TERN_PID, waits for
#                                  its ports
#   tern_stop                      stop it (stop_pid)
#   coturn_start DIR PORT CPU      coturn (`turnserver`) with settings equivalent to Tern's [turn]
#                                  section, pinned to CPU; sets COTURN_PID, waits for a STUN answer
#   coturn_stop                    stop it (stop_pid)
#   wait_stun PORT                 wait up to 15 s for a STUN Binding response on 127.0.0.1:PORT/udp
#   stop_pid PID                   SIGTERM, SIGKILL after 10 s
#
# NICE (0): e.g. -15 shields the runs from other load on the machine: server and bench each run in a
# new session whose scheduler autogroup gets this nice value (with CONFIG_SCHED_AUTOGROUP plain
# `nice` would only rank them within their own session; needs root).
# BIN: directory of the tern and tern-bench binaries (default $CARGO_TARGET_DIR/release).
# The BENCH_TERN_* settings below are not named TERN_*: `tern serve` reads exported TERN_SECTION_KEY
# variables as configuration.

NICE=${NICE:-0}
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release}
BENCH_TERN_SECRET=${BENCH_TERN_SECRET:-bench-device-secret-0123456789abcdef}
BENCH_TERN_API_KEY=${BENCH_TERN_API_KEY:-bench-api-key-0123456789abcdef0123456789}
BENCH_TERN_STARTTLS_PORT=${BENCH_TERN_STARTTLS_PORT:-15222}
BENCH_TERN_TLS_PORT=${BENCH_TERN_TLS_PORT:-15223}
BENCH_TERN_HTTP_PORT=${BENCH_TERN_HTTP_PORT-18080} # empty: no [http] section
BENCH_TERN_TURN_PORT=${BENCH_TERN_TURN_PORT-}      # set: a [turn] section listening there
TURN_SECRET=${TURN_SECRET:-bench-turn-secret-0123456789abcdef} # REST secret of Tern and coturn
TURN_RELAY_PORTS=${TURN_RELAY_PORTS:-20000-29999}
BENCH_TERN_PID=
COTURN_PID=

pinned() {
    local cpu=$1 pidfile=$2
    shift 2
    setsid bash -c 'echo $$ > "$1"; if [[ $0 != 0 ]]; then echo "$0" > /proc/self/autogroup; fi; shift; exec "$@"' \
        "$NICE" "$pidfile" nice -n "$NICE" taskset -c "$cpu" "$@"
}

stop_pid() {
    local pid=$1 i
    [[ -z "$pid" ]] && return 0
    kill "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
}

wait_port() {
    local port=$1 i
    for i in $(seq 1 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on 127.0.0.1:$port" >&2
    return 1
}

selfsigned_cert() {
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
        -subj "/CN=localhost" -addext "subjectAltName=DNS:localhost" \
        -keyout "$1" -out "$2" 2>/dev/null
}

tern_write_config() {
    local file=$1 data=$2
    cat > "$file" <<TOML
[server]
domain = "localhost"
data_dir = "$data"

[c2s]
starttls_listen = ["127.0.0.1:$BENCH_TERN_STARTTLS_PORT"]
tls_listen = ["127.0.0.1:$BENCH_TERN_TLS_PORT"]
ping_interval_secs = 0

[auth]
device_secret = "$BENCH_TERN_SECRET"

[limits]
max_connections_per_ip = 0
# Unthrottled, like the peers' benchmark configs (ejabberd without shapers).
inbound_bytes_per_sec = 0

[log]
level = "warn"
TOML
    if [[ -n "$BENCH_TERN_HTTP_PORT" ]]; then
        cat >> "$file" <<TOML

[http]
listen = "127.0.0.1:$BENCH_TERN_HTTP_PORT"
api_keys = ["$BENCH_TERN_API_KEY"]
rate_limit_per_sec = 0
TOML
    fi
    if [[ -n "$BENCH_TERN_TURN_PORT" ]]; then
        # As benches/turn.sh: loopback peers allowed, no quotas or bandwidth cap in the way.
        cat >> "$file" <<TOML

[turn]
listen = "127.0.0.1:$BENCH_TERN_TURN_PORT"
relay_ports = "$TURN_RELAY_PORTS"
secrets = ["$TURN_SECRET"]
allow_peers = ["127.0.0.0/8"]
max_allocations = 100000
max_allocations_per_user = 100000
max_bandwidth_bytes_per_sec = 0
unauthenticated_per_sec = 1000000
TOML
    fi
}

# tern_start CONFIG CPU LOG: the data directory named in CONFIG is emptied first.
tern_start() {
    local config=$1 cpu=$2 log=$3 pidfile i
    pidfile="$(dirname "$config")/tern.pid"
    rm -rf "$(sed -n 's/^data_dir = "\(.*\)"$/\1/p' "$config")" "$pidfile"
    pinned "$cpu" "$pidfile" "$BIN/tern" serve --config "$config" >> "$log" 2>&1 &
    for i in $(seq 1 50); do [[ -s "$pidfile" ]] && break; sleep 0.1; done
    BENCH_TERN_PID=$(cat "$pidfile")
    wait_port "$BENCH_TERN_TLS_PORT" || return 1
    if [[ -n "$BENCH_TERN_HTTP_PORT" ]]; then wait_port "$BENCH_TERN_HTTP_PORT" || return 1; fi
    sleep 1 # let the server settle before the "before" RSS sample
}

tern_stop() {
    stop_pid "$BENCH_TERN_PID"
    BENCH_TERN_PID=
}

wait_stun() {
    python3 - "$1" << 'PY'
import os, socket, struct, sys, time
port = int(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.2)
req = struct.pack("!HHI", 1, 0, 0x2112A442) + os.urandom(12)
deadline = time.time() + 15
while time.time() < deadline:
    s.sendto(req, ("127.0.0.1", port))
    try:
        if s.recv(2048)[:2] == b"\x01\x01":
            sys.exit(0)
    except OSError:
        time.sleep(0.1)
sys.exit("TURN server on port %d did not answer a Binding request" % port)
PY
}

# Equivalent to Tern's [turn] settings above: loopback listener and relays, REST secret, loopback
# peers allowed, no TLS/DTLS, no CLI, no config file (-n), unlimited quotas and bandwidth (defaults).
coturn_start() {
    local dir=$1 port=$2 cpu=$3 i
    rm -rf "$dir"
    mkdir -p "$dir"
    pinned "$cpu" "$dir/launcher.pid" turnserver -n --listening-ip=127.0.0.1 --listening-port="$port" \
        --relay-ip=127.0.0.1 --min-port="${TURN_RELAY_PORTS%-*}" --max-port="${TURN_RELAY_PORTS#*-}" \
        --use-auth-secret --static-auth-secret="$TURN_SECRET" --realm=localhost \
        --allow-loopback-peers --no-tls --no-dtls --no-cli --no-tcp-relay \
        --db="$dir/turndb" --pidfile="$dir/turnserver.pid" --log-file="$dir/turnserver.log" \
        --simple-log > /dev/null 2>&1 &
    for i in $(seq 1 50); do [[ -s "$dir/launcher.pid" ]] && break; sleep 0.1; done
    COTURN_PID=$(cat "$dir/launcher.pid")
    wait_stun "$port"
}

coturn_stop() {
    stop_pid "$COTURN_PID"
    COTURN_PID=
}

# Helpers for benches/push.sh and benches/compare.sh: an ejabberd (Debian package) on loopback for
# the comparison. Source benches/lib.sh first; every function takes the working directory DIR first.
#
#   ej_prepare DIR                 render ejabberd.yml/ejabberdctl.cfg into DIR, self-signed cert
#   ej_start DIR CPU NICE          start `ejabberdctl foreground` pinned to CPU; sets EJ_PID (beam.smp)
#   ej_register DIR N PATTERN PW   register users PATTERN/PW ({i} = 0..N-1) through mod_http_api
#   ej_stop DIR                    stop the node (ejabberdctl stop, then SIGKILL of EJ_PID if needed)
#   ej_epmd_restore                the Erlang VM starts epmd on demand: stop it if it was not
#                                  running when this file was sourced (call on exit)
#
# Ports: EJ_TLS_PORT (25223, direct TLS), EJ_STARTTLS_PORT (25222), EJ_HTTP_PORT (25280); Erlang
# node name EJ_NODE (ejabberd-bench@localhost).

EJ_TLS_PORT=${EJ_TLS_PORT:-25223}
EJ_STARTTLS_PORT=${EJ_STARTTLS_PORT:-25222}
EJ_HTTP_PORT=${EJ_HTTP_PORT:-25280}
EJ_NODE=${EJ_NODE:-ejabberd-bench@localhost}
EJ_SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
EJ_PID=
EJ_LAUNCHER_PID=
EJ_EPMD_WAS_RUNNING=0
epmd -names > /dev/null 2>&1 && EJ_EPMD_WAS_RUNNING=1

ej_ctl() {
    local dir=$1
    shift
    /usr/sbin/ejabberdctl --config "$dir/ejabberd.yml" --ctl-config "$dir/ejabberdctl.cfg" \
        --logs "$dir/logs" --spool "$dir/spool" "$@"
}

ej_prepare() {
    local dir=$1
    if [[ ! -x /usr/sbin/ejabberdctl ]]; then
        echo "ejabberd is not installed: apt-get install -y ejabberd" >&2
        return 1
    fi
    mkdir -p "$dir/logs" "$dir/spool"
    if [[ ! -s "$dir/cert.pem" ]]; then
        selfsigned_cert "$dir/key.pem" "$dir/crt.pem"
        cat "$dir/key.pem" "$dir/crt.pem" > "$dir/cert.pem"
    fi
    sed -e "s|@CERTFILE@|$dir/cert.pem|" -e "s|@TLS_PORT@|$EJ_TLS_PORT|" \
        -e "s|@STARTTLS_PORT@|$EJ_STARTTLS_PORT|" -e "s|@HTTP_PORT@|$EJ_HTTP_PORT|" \
        "$EJ_SRC/ejabberd.yml" > "$dir/ejabberd.yml"
    cp "$EJ_SRC/ejabberdctl.cfg" "$dir/ejabberdctl.cfg"
    # ejabberdctl starts the VM through `su ejabberd`, whose pam_limits lowers the soft open-files
    # limit to 1024: start erl through a wrapper that raises it back to the hard limit.
    printf '#!/bin/sh\nulimit -n "$(ulimit -Hn)"\nexec /usr/bin/erl "$@"\n' > "$dir/erl"
    chmod 0755 "$dir/erl"
    printf 'ERL=%s\nERLANG_NODE=%s\n' "$dir/erl" "$EJ_NODE" >> "$dir/ejabberdctl.cfg"
    # ejabberdctl runs the node as the `ejabberd` user when started by root.
    chown -R ejabberd:ejabberd "$dir"
    chmod 0600 "$dir/cert.pem" "$dir/key.pem"
    # The directories above must be reachable by that user.
    local d=$dir
    while [[ "$d" != / ]]; do
        chmod o+x "$d" 2>/dev/null || true
        d=$(dirname "$d")
    done
}

# ej_start DIR CPU NICE: start the node pinned to CPU (setsid, autogroup nice as in login.sh).
ej_start() {
    local dir=$1 cpu=$2 nice=${3:-0}
    setsid bash -c 'if [[ $0 != 0 ]]; then echo "$0" > /proc/self/autogroup; fi; shift; exec "$@"' \
        "$nice" x nice -n "$nice" taskset -c "$cpu" /usr/sbin/ejabberdctl \
        --config "$dir/ejabberd.yml" --ctl-config "$dir/ejabberdctl.cfg" \
        --logs "$dir/logs" --spool "$dir/spool" foreground > "$dir/logs/foreground.out" 2>&1 &
    EJ_LAUNCHER_PID=$!
    EJ_PID=
    local i
    for i in $(seq 1 300); do
        if [[ -z "$EJ_PID" ]]; then
            EJ_PID=$(pgrep -f -- "beam.smp.* -sname $EJ_NODE " | head -n1 || true)
        fi
        if [[ -n "$EJ_PID" ]] && (exec 3<>"/dev/tcp/127.0.0.1/$EJ_HTTP_PORT") 2>/dev/null \
            && (exec 3<>"/dev/tcp/127.0.0.1/$EJ_TLS_PORT") 2>/dev/null; then
            return 0
        fi
        if ! kill -0 "$EJ_LAUNCHER_PID" 2>/dev/null; then
            echo "ejabberd exited during start; see $dir/logs" >&2
            tail -n 20 "$dir/logs/foreground.out" >&2 || true
            return 1
        fi
        sleep 0.2
    done
    echo "ejabberd did not open its ports within 60 s; see $dir/logs" >&2
    return 1
}

# ej_register DIR N USER_PATTERN PASSWORD_PATTERN: one curl process, keep-alive, N POSTs.
ej_register() {
    local dir=$1 n=$2 upat=$3 ppat=$4
    local cfg="$dir/register.curl" i u p
    : > "$cfg"
    for ((i = 0; i < n; i++)); do
        u=${upat//\{i\}/$i}
        p=${ppat//\{i\}/$i}
        p=${p//\{user\}/$u}
        ((i > 0)) && echo next >> "$cfg"
        printf 'url = "http://127.0.0.1:%s/api/register"\nheader = "Content-Type: application/json"\ndata = "{\\"user\\":\\"%s\\",\\"host\\":\\"localhost\\",\\"password\\":\\"%s\\"}"\noutput = "/dev/null"\nwrite-out = "%%{http_code}\\n"\n' \
            "$EJ_HTTP_PORT" "$u" "$p" >> "$cfg"
    done
    local codes
    codes=$(timeout 600 curl -s -K "$cfg" | sort | uniq -c | tr '\n' ' ')
    echo "ejabberd register: HTTP status counts (count status): $codes"
    local users
    users=$(curl -s -H 'Content-Type: application/json' -d '{"host":"localhost"}' \
        "http://127.0.0.1:$EJ_HTTP_PORT/api/registered_users" | tr -cd ',' | wc -c)
    echo "ejabberd register: about $((users + 1)) users registered"
}

ej_stop() {
    local dir=$1 i
    [[ -z "$EJ_LAUNCHER_PID" ]] && return 0
    timeout 30 /usr/sbin/ejabberdctl --config "$dir/ejabberd.yml" --ctl-config "$dir/ejabberdctl.cfg" \
        --logs "$dir/logs" --spool "$dir/spool" stop > /dev/null 2>&1 || true
    for i in $(seq 1 100); do
        kill -0 "$EJ_LAUNCHER_PID" 2>/dev/null || break
        sleep 0.2
    done
    if [[ -n "$EJ_PID" ]] && kill -0 "$EJ_PID" 2>/dev/null; then
        kill -9 "$EJ_PID" 2>/dev/null || true
    fi
    kill "$EJ_LAUNCHER_PID" 2>/dev/null || true
    EJ_PID=
    EJ_LAUNCHER_PID=
}

ej_epmd_restore() {
    if [[ $EJ_EPMD_WAS_RUNNING == 0 ]] && command -v epmd > /dev/null; then
        epmd -kill > /dev/null 2>&1 || true
    fi
}

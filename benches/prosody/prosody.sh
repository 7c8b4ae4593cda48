# Helpers for benches/compare.sh: a Prosody (Debian package 0.12.3) on loopback for the comparison.
# Source benches/lib.sh first; every function takes the working directory DIR first.
#
#   pr_prepare DIR                 render prosody.cfg.lua into DIR, self-signed ECDSA P-256 cert
#   pr_accounts DIR N PATTERN PW   create accounts PATTERN/PW ({i} = 0..N-1, {user} in PW) by
#                                  writing mod_auth_internal_plain's data files directly (20,000
#                                  accounts in well under a second; prosodyctl adduser takes ~0.5 s
#                                  per account)
#   pr_start DIR CPU               start `prosody -F` pinned to CPU (as `pinned` in lib.sh) with the
#                                  open-files limit raised to the hard limit; sets PR_PID
#   pr_stop                        stop it (stop_pid in lib.sh)
#
# Ports: PR_TLS_PORT (35223, direct TLS), PR_STARTTLS_PORT (35222).

PR_TLS_PORT=${PR_TLS_PORT:-35223}
PR_STARTTLS_PORT=${PR_STARTTLS_PORT:-35222}
PR_SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PR_PID=

pr_prepare() {
    local dir=$1
    if [[ ! -x /usr/bin/prosody ]]; then
        echo "Prosody is not installed: apt-get install -y prosody" >&2
        return 1
    fi
    mkdir -p "$dir/certs" "$dir/data"
    if [[ ! -s "$dir/certs/localhost.crt" ]]; then
        selfsigned_cert "$dir/certs/localhost.key" "$dir/certs/localhost.crt"
    fi
    sed -e "s|@DIR@|$dir|g" -e "s|@TLS_PORT@|$PR_TLS_PORT|" -e "s|@STARTTLS_PORT@|$PR_STARTTLS_PORT|" \
        "$PR_SRC/prosody.cfg.lua" > "$dir/prosody.cfg.lua"
}

# The file layout of Prosody's `internal` storage (util/datamanager.lua): DATA/<host>/accounts/
# <user>.dat, host and user with every non-alphanumeric byte written as %xx, holding a Lua table.
pr_accounts() {
    local dir=$1 n=$2 upat=$3 ppat=$4
    python3 - "$dir/data" "$n" "$upat" "$ppat" <<'PY'
import os, re, sys
data, n, upat, ppat = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
enc = lambda s: re.sub(r"[^A-Za-z0-9]", lambda m: "%%%02x" % ord(m.group()), s)
lua = lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
accounts = os.path.join(data, enc("localhost"), "accounts")
os.makedirs(accounts, exist_ok=True)
for i in range(n):
    user = upat.replace("{i}", str(i))
    pw = ppat.replace("{i}", str(i)).replace("{user}", user)
    with open(os.path.join(accounts, enc(user) + ".dat"), "w") as f:
        f.write("return {\n\t[\"password\"] = %s;\n};\n" % lua(pw))
print(f"prosody accounts: {n} in {accounts}")
PY
}

pr_start() {
    local dir=$1 cpu=$2 i
    rm -f "$dir/launcher.pid"
    pinned "$cpu" "$dir/launcher.pid" bash -c 'ulimit -n "$(ulimit -Hn)"; exec "$@"' x \
        /usr/bin/prosody --config "$dir/prosody.cfg.lua" -F > "$dir/foreground.out" 2>&1 &
    for i in $(seq 1 50); do [[ -s "$dir/launcher.pid" ]] && break; sleep 0.1; done
    PR_PID=$(cat "$dir/launcher.pid")
    for i in $(seq 1 150); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$PR_TLS_PORT") 2>/dev/null \
            && (exec 3<>"/dev/tcp/127.0.0.1/$PR_STARTTLS_PORT") 2>/dev/null; then
            sleep 1
            return 0
        fi
        if ! kill -0 "$PR_PID" 2>/dev/null; then
            echo "prosody exited during start; see $dir/foreground.out and $dir/prosody.log" >&2
            tail -n 20 "$dir/foreground.out" >&2 || true
            return 1
        fi
        sleep 0.2
    done
    echo "prosody did not open its ports within 30 s; see $dir/prosody.log" >&2
    return 1
}

pr_stop() {
    stop_pid "$PR_PID"
    PR_PID=
}

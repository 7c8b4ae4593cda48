#!/usr/bin/python3
"""Side-by-side table of benches/compare.sh results (Python 3 standard library only).

    compare.py OUT          Markdown table of the medians in OUT/<server>-<scenario>-<run>.json
                            (OUT/machine.txt first, OUT/na.tsv gives the reasons for n/a cells)
    compare.py --one FILE   one line about one result (progress output of compare.sh)

Each JSON file is a tern-bench --json result plus bench_server, bench_scenario and
bench_rss_before_kib (the server's VmRSS before the run), added by compare.sh.
"""

import glob
import json
import os
import statistics
import sys

SERVERS = ["tern", "ejabberd", "prosody", "coturn"]
NAMES = {"tern": "Tern", "ejabberd": "ejabberd", "prosody": "Prosody", "coturn": "coturn"}
XMPP = ["tern", "ejabberd", "prosody"]
TURN = ["tern", "coturn"]


def get(d, *path):
    for p in path:
        if not isinstance(d, dict) or d.get(p) is None:
            return None
        d = d[p]
    return d


def div(a, b, scale=1.0):
    return None if a is None or not b else a * scale / b


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def cycles_median(r, field):
    return med([c.get(field) for c in r.get("cycles") or []])


def kib_per_alloc(r):
    rss, before, n = r.get("server_rss_kib"), r.get("bench_rss_before_kib"), r.get("allocations")
    return None if rss is None or before is None or not n else (rss - before) / n


# (label, higher is better, scenario, servers, value of one run)
ROWS = [
    ("logins/s", True, "connect", XMPP, lambda r: r.get("login_rate")),
    ("login latency p99, ms", False, "connect", XMPP, lambda r: get(r, "latency", "p99_ms")),
    ("server KiB/session", False, "connect", XMPP,
     lambda r: get(r, "server_process", "kib_per_session")),
    ("server CPU µs/login", False, "connect", XMPP,
     lambda r: get(r, "server_process", "cpu_us_per_login")),
    ("failed logins", False, "connect", XMPP, lambda r: r.get("failed")),
    ("idle: sessions held", True, "idle", XMPP,
     lambda r: None if r.get("ok") is None else r["ok"] - (r.get("dropped_during_hold") or 0)),
    ("idle: server KiB/session", False, "idle", XMPP,
     lambda r: get(r, "server_process", "kib_per_session")),
    ("idle: server peak RSS, MiB", False, "idle", XMPP,
     lambda r: div(get(r, "server_process", "rss_peak_kib"), 1024)),
    ("storm: all back after, s (median cycle)", False, "storm", XMPP,
     lambda r: cycles_median(r, "back_secs")),
    ("storm: reconnect p99, s (median cycle)", False, "storm", XMPP,
     lambda r: cycles_median(r, "p99_secs")),
    ("storm: failed reconnects (all cycles)", False, "storm", XMPP,
     lambda r: sum(c.get("failed") or 0 for c in r.get("cycles") or [])),
    ("storm: server peak RSS, MiB", False, "storm", XMPP,
     lambda r: div(r.get("peak_rss_kib"), 1024)),
    ("pushes/s delivered", True, "push", XMPP, lambda r: r.get("delivered_per_sec")),
    ("push latency p99, ms", False, "push", XMPP, lambda r: get(r, "latency", "p99_ms")),
    ("server CPU µs/push", False, "push", XMPP,
     lambda r: get(r, "server_process", "cpu_us_per_push")),
    ("lost pushes", False, "push", XMPP, lambda r: r.get("lost")),
    ("chat msgs/s", True, "chat", XMPP, lambda r: r.get("msgs_per_sec")),
    ("chat RTT p99, µs", False, "chat", XMPP, lambda r: get(r, "rtt_us", "p99")),
    ("chat one-way p99, µs", False, "chat", XMPP, lambda r: get(r, "one_way_us", "p99")),
    ("chat server CPU µs/routed msg", False, "chat", XMPP,
     lambda r: div(r.get("server_cpu_secs"), (r.get("delivered") or 0) + (r.get("replies") or 0), 1e6)),
    ("chat lost", False, "chat", XMPP, lambda r: r.get("lost")),
    ("TURN allocations/s", True, "turn", TURN, lambda r: r.get("allocs_per_sec")),
    ("TURN allocation latency p99, µs", False, "turn", TURN,
     lambda r: get(r, "alloc_latency_us", "p99")),
    ("TURN relayed pkt/s", True, "turn", TURN, lambda r: r.get("relayed_pps")),
    ("TURN relayed Mbit/s", True, "turn", TURN, lambda r: r.get("mbit_per_sec")),
    ("TURN server CPU µs/relayed pkt", False, "turn", TURN,
     lambda r: div(r.get("server_cpu_secs"), 2 * (r.get("received") or 0), 1e6)),
    ("TURN RTT p99, µs", False, "turn", TURN, lambda r: get(r, "rtt_us", "p99")),
    ("TURN lost", False, "turn", TURN, lambda r: r.get("lost")),
    ("TURN KiB/allocation", False, "turn", TURN, kib_per_alloc),
]
NO_RATIO = {"failed logins", "storm: failed reconnects (all cycles)", "lost pushes", "chat lost",
            "TURN lost"}


def fmt(x):
    if x is None:
        return "n/a"
    if isinstance(x, int) or float(x).is_integer() or abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:,.1f}" if abs(x) >= 10 else f"{x:,.2f}"


def one(path):
    r = json.load(open(path))
    s = r.get("bench_scenario")
    parts = [f"{label} {fmt(f(r))}" for label, _, scen, _, f in ROWS if scen == s]
    return ", ".join(parts)


def table(out):
    if os.path.exists(os.path.join(out, "machine.txt")):
        print("```")
        print(open(os.path.join(out, "machine.txt")).read().rstrip())
        print("```")
        print()
    results, failed = {}, {}
    for p in sorted(glob.glob(os.path.join(out, "*-*-*.json"))):
        try:
            r = json.load(open(p))
        except (OSError, ValueError):
            continue
        results.setdefault((r.get("bench_server"), r.get("bench_scenario")), []).append(r)
    for p in glob.glob(os.path.join(out, "*-*-*.failed")):
        server, scenario = os.path.basename(p).split("-")[:2]
        failed[(server, scenario)] = failed.get((server, scenario), 0) + 1
    reasons = {}
    if os.path.exists(os.path.join(out, "na.tsv")):
        for line in open(os.path.join(out, "na.tsv")):
            server, scenario, why = line.rstrip("\n").split("\t", 2)
            reasons[(server, scenario)] = why
    notes = []

    def note(text):
        if text not in notes:
            notes.append(text)
        return f"[{notes.index(text) + 1}]"

    peers = [s for s in SERVERS if s != "tern"]
    print("Medians over runs. Ratio = Tern ÷ peer: for ↑ rows above 1 means Tern is better, "
          "for ↓ rows below 1 means Tern is better.")
    print()
    print("| measure | better | " + " | ".join(NAMES[s] for s in SERVERS) + " | "
          + " | ".join(f"Tern ÷ {NAMES[s]}" for s in peers) + " |")
    print("|---|:-:|" + "---:|" * (len(SERVERS) + len(peers)))
    shown = 0
    for label, higher, scenario, servers, f in ROWS:
        if not any((s, scenario) in results or (s, scenario) in reasons for s in servers):
            continue
        shown += 1
        vals, cells = {}, []
        for s in SERVERS:
            if s not in servers:
                cells.append("–")
                continue
            runs = results.get((s, scenario), [])
            v = med([f(r) for r in runs])
            vals[s] = v
            cell = fmt(v)
            if (s, scenario) in reasons:
                cell = "n/a " + note(reasons[(s, scenario)])
            elif not runs:
                cell = "n/a " + note("no successful run (see the .progress files)") \
                    if failed.get((s, scenario)) else "not run"
            elif failed.get((s, scenario)):
                cell += f" ({len(runs)}/{len(runs) + failed[(s, scenario)]} runs)"
            cells.append(cell)
        ratios = []
        for s in peers:
            t, p = vals.get("tern"), vals.get(s)
            ok = s in servers and label not in NO_RATIO and t is not None and p
            ratios.append(f"{t / p:.2f}×" if ok else "")
        print(f"| {label} | {'↑' if higher else '↓'} | " + " | ".join(cells) + " | "
              + " | ".join(ratios) + " |")
    if not shown:
        print("(no results)")
    for i, n in enumerate(notes, 1):
        print(f"\n[{i}] {n}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(one(sys.argv[2]))
    elif len(sys.argv) == 2:
        table(sys.argv[1])
    else:
        sys.exit(__doc__)

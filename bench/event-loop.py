#!/usr/bin/env python3
"""The agent's event loop under a big write: five agents on loopback, one `weft table load` of
500,000 keys on the first. Reports, per run:

- event-loop lag on every agent during the load (time from an input's arrival to its handling
  by the agent's task), per class (membership: SWIM datagrams; table: gossip datagrams and
  stream frames; command): p99 from the `weft_loop_lag_seconds` histogram's increase over the
  run (the upper bound of its log2 bucket), and the maximum since the agent started;
- suspicions: every agent's `members` polled every 100 ms during the run; any member seen
  other than alive is counted (target: none);
- the latency of `GET /members` and `GET /dump?network=cluster&table=weft:nodes` on the loaded
  agent while the load runs (p50, p99, max; target p99 under 50 ms);
- how long the load took to answer, and until every agent held every key.

usage: bench/event-loop.py [--keys 500000] [--runs 3] [--bin target/release/weft]
Needs python3 and cargo; builds the release binary first unless --bin is given.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import agents as bench  # noqa: E402  (the agent harness of bench/agents.py)

bench.NET = 31


CLASSES = ("membership", "table", "command")


def lag_buckets(text, cls):
    out = {}
    prefix = f'weft_loop_lag_seconds_bucket{{class="{cls}",le="'
    for line in text.splitlines():
        if line.startswith(prefix):
            le = line[len(prefix):].split('"')[0]
            out[le] = float(line.rsplit(" ", 1)[1])
    return out


def lag_max_of(text, cls):
    return bench.metric(text, "weft_loop_lag_max_seconds", f'class="{cls}"')


def p99_from(before, after):
    """Upper bound of the bucket holding the 99th percentile of the increase, seconds."""
    les = [le for le in after if le != "+Inf"]
    les.sort(key=float)
    total = after.get("+Inf", 0) - before.get("+Inf", 0)
    if total <= 0:
        return 0.0
    for le in les:
        if after[le] - before.get(le, 0) >= 0.99 * total:
            return float(le)
    return float("inf")


def timed_get(sock, path):
    t0 = time.monotonic()
    bench.http_get(sock, path)
    return time.monotonic() - t0


def pct(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, int(q * len(v)))] if v else 0.0


def one_run(agents, keys, run, root):
    path = os.path.join(root, f"load{run}.txt")
    with open(path, "w") as f:
        for k in range(keys):
            f.write(f"r{run}-k{k:07d} value-{k}\n")
    loaded = agents[0]
    before = [{c: lag_buckets(m, c) for c in CLASSES} for m in (a.metrics() for a in agents)]
    stop = threading.Event()
    not_alive = []
    reads = {"members": [], "dump": []}

    def watch_members():
        while not stop.is_set():
            time.sleep(0.1)
            for a in agents:
                try:
                    ms = json.loads(bench.http_get(a.sock, "/members"))["members"]
                except Exception:
                    continue
                for m in ms:
                    if m["state"] != "alive":
                        not_alive.append((a.name, m["name"], m["state"]))

    def time_reads():
        while not stop.is_set():
            try:
                reads["members"].append(timed_get(loaded.sock, "/members"))
                reads["dump"].append(timed_get(loaded.sock, "/dump?network=cluster&table=weft:nodes"))
            except Exception:
                reads["errors"] = reads.get("errors", 0) + 1
            time.sleep(0.02)

    threads = [threading.Thread(target=watch_members), threading.Thread(target=time_reads)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    try:
        out = loaded.cli("table", "load", "bench", f"bulk{run}", path)
        answered = time.monotonic() - t0
        assert out.returncode == 0, out.stderr

        def everywhere():
            return all(bench.metric(a.metrics(), "weft_entries", f'table="bulk{run}"') >= keys for a in agents)

        bench.wait(f"{keys} keys on every agent", 300, everywhere, 0.1)
        converged = time.monotonic() - t0
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join()
    after = [a.metrics() for a in agents]
    lag_p99 = {c: [round(p99_from(b[c], lag_buckets(m, c)) * 1000, 2) for b, m in zip(before, after)] for c in CLASSES}
    lag_max = {c: [round(lag_max_of(m, c) * 1000, 1) for m in after] for c in CLASSES}
    drops = [bench.metric(m, "weft_datagram_queue_drops_total") for m in after]
    os.remove(path)
    return {
        "run": run,
        "load_answered_s": round(answered, 2),
        "converged_s": round(converged, 2),
        "lag_p99_ms_per_agent": lag_p99,
        "lag_max_ms_per_agent_lifetime": lag_max,
        "datagram_queue_drops_per_agent": drops,
        "members_seen_not_alive": len(not_alive),
        "not_alive_samples": not_alive[:5],
        "members_ms": {k: round(pct(reads["members"], q) * 1000, 2) for k, q in (("p50", 0.5), ("p99", 0.99), ("max", 1.0))},
        "dump_ms": {k: round(pct(reads["dump"], q) * 1000, 2) for k, q in (("p50", 0.5), ("p99", 0.99), ("max", 1.0))},
        "read_samples": len(reads["members"]),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--keys", type=int, default=500_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--bin", default=None)
    args = p.parse_args()
    if args.bin:
        bench.BIN = os.path.abspath(args.bin)
    else:
        subprocess.run(["cargo", "build", "--release", "-p", "weft-node", "--bin", "weft"], cwd=bench.ROOT, check=True)
    rows = []
    # A fresh cluster per run: every run loads into empty tables.
    for run in range(1, args.runs + 1):
        root = tempfile.mkdtemp(prefix="weft-loop-", dir=os.path.join(bench.ROOT, "target"))
        agents = []
        try:
            agents, _ = bench.cluster(root, 5)
            time.sleep(2)
            row = one_run(agents, args.keys, run, root)
            rows.append(row)
            print(json.dumps(row), flush=True)
        finally:
            for a in agents:
                a.stop()
            if os.environ.get("KEEP"):
                print(f"logs kept under {root}")
            else:
                shutil.rmtree(root, ignore_errors=True)
    if rows:
        summary = {
            "keys": args.keys,
            "runs": args.runs,
            "median_load_answered_s": statistics.median(r["load_answered_s"] for r in rows),
            "median_converged_s": statistics.median(r["converged_s"] for r in rows),
            "worst_lag_p99_ms": {c: max(max(r["lag_p99_ms_per_agent"][c]) for r in rows) for c in CLASSES},
            "worst_lag_max_ms": {c: max(max(r["lag_max_ms_per_agent_lifetime"][c]) for r in rows) for c in CLASSES},
            "suspicions": sum(r["members_seen_not_alive"] for r in rows),
            "median_members_p99_ms": statistics.median(r["members_ms"]["p99"] for r in rows),
            "median_dump_p99_ms": statistics.median(r["dump_ms"]["p99"] for r in rows),
        }
        print(json.dumps({"summary": summary}), flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

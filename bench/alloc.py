#!/usr/bin/env python3
"""Allocation through the control API, the figures issue 13 asks for.

1. Throughput: one agent, C concurrent clients (default 16) each looping `endpoint create`
   then `endpoint rm` over the Unix socket (HTTP/1.1 keep-alive), every allocation durable
   (fsync'ed, group-committed) before its reply. Reports endpoints/s (create+remove pairs),
   store commits (fsyncs) per allocation, and the raw fdatasync latency of the same data dir,
   measured in the same run. Target: min(2000, 4 / fdatasync seconds) per second.
2. Latency: three agents on loopback; `endpoint create` to reply on a node allocating from its
   own share, and on a node whose share is used up so each create waits for a donation.

usage: bench/alloc.py [--clients 16] [--seconds 10] [--runs 3] [--dir /var/tmp] [--bin PATH]
Needs only python3 and cargo; builds the release binary first unless --bin is given.
"""

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NET = 33  # agents listen on 127.0.33.x


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("weft", timeout=30)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


def call(conn, method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
    r = conn.getresponse()
    out = r.read()
    if r.status >= 300:
        raise RuntimeError(f"{method} {path}: {r.status} {out.decode(errors='replace')}")
    return json.loads(out) if out else None


def metric(text, name):
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class Agent:
    def __init__(self, bin_, root, i, seeds, extra=()):
        self.name = f"a{i}"
        self.addr = f"127.0.{NET}.{i}:7946"
        self.dir = os.path.join(root, self.name)
        os.makedirs(self.dir, exist_ok=True)
        self.sock = os.path.join(self.dir, "weft.sock")
        log = open(os.path.join(self.dir, "agent.log"), "w")
        args = [bin_, "agent", "--name", self.name, "--bind", self.addr, "--data-dir", self.dir,
                "--join", ",".join(seeds), *extra]
        self.proc = subprocess.Popen(args, stdout=log, stderr=log, env=dict(os.environ, RUST_LOG="warn"))
        t0 = time.time()
        while not os.path.exists(self.sock):
            if time.time() - t0 > 10:
                raise RuntimeError(f"{self.name} did not start")
            time.sleep(0.02)
        time.sleep(0.05)

    def conn(self):
        return UnixHTTP(self.sock)

    def metrics(self):
        c = self.conn()
        c.request("GET", "/metrics")
        return c.getresponse().read().decode()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def fdatasync_us(dir_, n=300):
    path = os.path.join(dir_, "fsync-probe")
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    lat = []
    buf = b"x" * 4096
    for i in range(n):
        os.pwrite(fd, buf, (i % 64) * 4096)
        t = time.perf_counter()
        os.fdatasync(fd)
        lat.append((time.perf_counter() - t) * 1e6)
    os.close(fd)
    os.unlink(path)
    return statistics.median(lat)


def create_network(a, name, subnet=None):
    body = {"name": name}
    if subnet:
        body["subnets"] = [subnet]
    t0 = time.time()
    while True:
        try:
            return call(a.conn(), "POST", "/networks", body)
        except RuntimeError as e:
            if time.time() - t0 > 20:
                raise
            if "not seeded" not in str(e) and "timed out" not in str(e):
                raise
            time.sleep(0.2)


def throughput(bin_, base, clients, seconds):
    root = tempfile.mkdtemp(prefix="weft-bench-alloc-", dir=base)
    try:
        a = Agent(bin_, root, 1, [f"127.0.{NET}.1:7946"])
        create_network(a, "bench", "10.128.0.0/16")
        sync_us = fdatasync_us(a.dir)
        stop = time.time() + seconds
        counts = [0] * clients
        errors = []

        def worker(k):
            c = a.conn()
            i = 0
            while time.time() < stop:
                name = f"c{k}-{i}"
                try:
                    call(c, "POST", "/networks/bench/endpoints", {"name": name})
                    call(c, "DELETE", f"/networks/bench/endpoints/{name}")
                except Exception as e:  # noqa: BLE001 (reported below)
                    errors.append(str(e))
                    return
                counts[k] += 1
                i += 1

        m0 = a.metrics()
        load = os.path.join(os.path.dirname(bin_), "examples", "alloc_load")
        if os.path.exists(load):
            # The Rust client (keep-alive connections, no interpreter in the way).
            out = subprocess.run([load, a.sock, "bench", str(clients), str(seconds)],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout)
            pairs, elapsed = r["pairs"], r["seconds"]
        else:
            t0 = time.time()
            threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.time() - t0
            if errors:
                raise RuntimeError(f"client failed: {errors[0]}")
            pairs = sum(counts)
        m1 = a.metrics()
        a.stop()
        allocs = metric(m1, "weft_ipam_allocations_total") - metric(m0, "weft_ipam_allocations_total")
        commits = metric(m1, "weft_persist_commits_total") - metric(m0, "weft_persist_commits_total")
        return {
            "pairs_per_s": pairs / elapsed,
            "allocs": allocs,
            "commits_per_alloc": commits / max(allocs, 1),
            "fdatasync_us": sync_us,
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def latency(bin_, base, n):
    root = tempfile.mkdtemp(prefix="weft-bench-alloc-lat-", dir=base)
    seeds = [f"127.0.{NET}.{i}:7946" for i in (1, 2, 3)]
    agents = []
    try:
        agents = [Agent(bin_, root, i, seeds) for i in (1, 2, 3)]
        create_network(agents[0], "lat")
        # Local: the creator allocates from its own share.
        local = []
        c = agents[0].conn()
        for i in range(n):
            t = time.perf_counter()
            call(c, "POST", "/networks/lat/endpoints", {"name": f"l{i}"})
            local.append((time.perf_counter() - t) * 1e3)
        # Donated: a /28 network (14 addresses, blocks of one address); a3 drains the share it
        # got when it attached, then every further create waits for a donation from a1 or a2.
        create_network(agents[0], "small", "10.200.0.0/28")
        c3 = agents[2].conn()
        donated = []
        for i in range(12):
            t = time.perf_counter()
            try:
                call(c3, "POST", "/networks/small/endpoints", {"name": f"d{i}"})
            except RuntimeError:
                break
            donated.append((time.perf_counter() - t) * 1e3)
        m = agents[2].metrics()
        asked = metric(m, "weft_ipam_donations_asked_total")
        return local, donated, asked
    finally:
        for a in agents:
            a.stop()
        shutil.rmtree(root, ignore_errors=True)


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--bin")
    args = ap.parse_args()
    bin_ = args.bin or os.path.join(ROOT, "target", "release", "weft")
    if not args.bin:
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "weft-node", "--bin", "weft", "--example", "alloc_load"],
                       cwd=ROOT, check=True)
    runs = [throughput(bin_, args.dir, args.clients, args.seconds) for _ in range(args.runs)]
    for r in runs:
        print(f"  run: {r['pairs_per_s']:.0f} create+rm/s, {r['commits_per_alloc']:.3f} fsyncs/allocation, "
              f"fdatasync {r['fdatasync_us']:.0f} us", file=sys.stderr)
    rate = statistics.median(r["pairs_per_s"] for r in runs)
    sync = statistics.median(r["fdatasync_us"] for r in runs)
    fpa = statistics.median(r["commits_per_alloc"] for r in runs)
    target = min(2000, 4 / (sync / 1e6))
    print(f"throughput ({args.clients} clients, {args.runs} runs, medians): {rate:.0f} endpoint create+rm per s; "
          f"{fpa:.3f} fsyncs per allocation; raw fdatasync {sync:.0f} us; target {target:.0f}/s; "
          f"ratio {rate / target:.2f}x")
    local, donated, asked = latency(bin_, args.dir, 200)
    print(f"latency, local share: p50 {pct(local, 50):.2f} ms, p99 {pct(local, 99):.2f} ms (n={len(local)})")
    print(f"latency, small subnet on a non-creator: p50 {pct(donated, 50):.2f} ms, p99 {pct(donated, 99):.2f} ms "
          f"(n={len(donated)}, donations asked {asked:.0f})")


if __name__ == "__main__":
    main()

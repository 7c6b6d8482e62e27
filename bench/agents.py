#!/usr/bin/env python3
"""Real agents on loopback: how fast a `weft table load` reaches every agent, and what an agent
costs at idle. The figures the node issue asks for, measured the way networkdb was measured
(../shared/anchors/networkdb-convergence.md): N agent processes on 127.0.x.y, K keys written on
one agent in one request, time from the return of that request until every agent holds all K.

usage: bench/agents.py [--nodes 5,20] [--keys 100,1000] [--runs 5] [--idle 10] [--bin PATH]
Needs only python3 and cargo; builds the release binary first.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "weft")
NET = 30  # agents listen on 127.0.30.x


def http_get(sock_path, path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(sock_path)
    s.sendall(f"GET {path} HTTP/1.0\r\nHost: weft\r\n\r\n".encode())
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    return data.split(b"\r\n\r\n", 1)[1].decode()


def metric(text, name, labels=None):
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (labels is None or labels in line):
            total += float(line.rsplit(" ", 1)[1])
    return total


class Agent:
    def __init__(self, root, i, seeds):
        self.name = f"b{i}"
        self.addr = f"127.0.{NET}.{i}:7946"
        self.dir = os.path.join(root, self.name)
        os.makedirs(self.dir, exist_ok=True)
        self.sock = os.path.join(self.dir, "weft.sock")
        log = open(os.path.join(self.dir, "agent.log"), "w")
        args = [BIN, "agent", "--name", self.name, "--bind", self.addr, "--data-dir", self.dir]
        if seeds:
            args += ["--join", ",".join(seeds)]
        env = dict(os.environ, RUST_LOG="warn")
        self.proc = subprocess.Popen(args, stdout=log, stderr=log, env=env)

    def cli(self, *args, stdin=None):
        return subprocess.run([BIN, "-H", f"unix://{self.sock}", *args], input=stdin, capture_output=True, text=True)

    def metrics(self):
        return http_get(self.sock, "/metrics")

    def rss_mib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def cpu_seconds(self):
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def wait(what, limit, cond, step=0.01):
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > limit:
            raise SystemExit(f"timed out waiting until {what}")
        time.sleep(step)
    return time.monotonic() - t0


def cluster(root, n):
    agents = []
    for i in range(1, n + 1):
        seeds = [f"127.0.{NET}.1:7946", f"127.0.{NET}.2:7946"] if i > 1 else []
        agents.append(Agent(root, i, [s for s in seeds if not s.startswith(f"127.0.{NET}.{i}:")]))
    for a in agents:
        wait("control socket", 10, lambda: os.path.exists(a.sock))
    wait("membership", 60, lambda: all(
        metric(a.metrics(), "weft_members", 'state="alive"') == n for a in agents), 0.1)
    out = agents[0].cli("network", "create", "bench")
    assert out.returncode == 0, out.stderr
    for a in agents[1:]:
        wait("network definition", 30, lambda: a.cli("network", "attach", "bench").returncode == 0, 0.05)
    wait("attachments", 30, lambda: all(
        len(json.loads(a.cli("network", "ls", "--json").stdout)[0]["peers"]) == n - 1 for a in agents), 0.1)
    return agents, json.loads(agents[0].cli("network", "ls", "--json").stdout)[0]["id"]


def load_run(agents, nid, keys, run):
    lines = "".join(f"run{run}-key{k:05d} value-{k}-of-run-{run}\n" for k in range(keys))
    before = [metric(a.metrics(), "weft_entries", f'network="{nid}"') for a in agents]
    out = agents[0].cli("table", "load", "bench", "t", stdin=lines)
    t0 = time.monotonic()
    assert out.returncode == 0, out.stderr

    def done():
        return all(metric(a.metrics(), "weft_entries", f'network="{nid}"') >= b + keys for a, b in zip(agents, before))

    wait(f"{keys} keys on all agents", 120, done, 0.005)
    return time.monotonic() - t0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--nodes", default="5,20")
    p.add_argument("--keys", default="100,1000")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--idle", type=float, default=10.0)
    p.add_argument("--bin", default=None, help="a weft binary to measure instead of building this tree's")
    args = p.parse_args()
    global BIN
    if args.bin:
        BIN = os.path.abspath(args.bin)
    else:
        subprocess.run(["cargo", "build", "--release", "-p", "weft-node", "--bin", "weft"], cwd=ROOT, check=True)
    results = []
    for n in [int(x) for x in args.nodes.split(",")]:
        root = tempfile.mkdtemp(prefix="weft-bench-")
        agents = []
        try:
            agents, nid = cluster(root, n)
            # Idle: let the cluster settle, then measure CPU and traffic over a quiet window.
            time.sleep(3)
            cpu0 = [a.cpu_seconds() for a in agents]
            m0 = [a.metrics() for a in agents]
            time.sleep(args.idle)
            cpu1 = [a.cpu_seconds() for a in agents]
            m1 = [a.metrics() for a in agents]
            out_bytes = lambda m: metric(m, "weft_datagram_bytes_out_total") + metric(m, "weft_stream_bytes_out_total")
            idle_cpu = statistics.median((c1 - c0) / args.idle * 100 for c0, c1 in zip(cpu0, cpu1))
            idle_bps = statistics.median((out_bytes(b) - out_bytes(a)) / args.idle for a, b in zip(m0, m1))
            idle_rss = statistics.median(a.rss_mib() for a in agents)
            row = {"nodes": n, "idle_cpu_percent": round(idle_cpu, 2), "idle_bytes_out_per_s": round(idle_bps),
                   "idle_rss_mib": round(idle_rss, 1)}
            run = 0
            for k in [int(x) for x in args.keys.split(",")]:
                samples = []
                for _ in range(args.runs):
                    run += 1
                    samples.append(load_run(agents, nid, k, run))
                row[f"load_{k}_median_s"] = round(statistics.median(samples), 3)
                row[f"load_{k}_samples_s"] = [round(s, 3) for s in samples]
            row["loaded_rss_mib_max"] = round(max(a.rss_mib() for a in agents), 1)
            results.append(row)
            print(json.dumps(row), flush=True)
        finally:
            for a in agents:
                a.stop()
            shutil.rmtree(root, ignore_errors=True)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

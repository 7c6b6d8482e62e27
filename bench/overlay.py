#!/usr/bin/env python3
"""The overlay data plane on a real kernel: the figures issue 14 asks for, next to Docker's.

Three "hosts" are network namespaces on one underlay bridge (a fourth namespace), each running
`weft agent --dataplane linux` (entered with nsenter --net, its own --run-dir); host B and host
C each hold one endpoint with an interface.

1. Reachability of a new endpoint: on host A, `weft endpoint create ov eN --sandbox NS`; from
   the moment it returns, B's endpoint pings the new address every 2 ms; the time to the first
   answer. N samples (default 30): median, p90, p99, max. Also the create's own duration, and
   as the same run's baseline the duration of a create without --sandbox (no data plane).
2. Failure: `kill -9` of host C's agent; the time until host A's kernel FDB holds no entry for
   C's endpoint (polled every 20 ms with `bridge fdb`); then C's agent starts again with its
   data dir and the time until A's endpoint reaches C's again. R rounds (default 5).

Docker 20.10 on these machines (../shared/anchors/docker-overlay.md): a new container is
reachable from the other host about 843 ms after `docker run` starts (600 ms with the network
already on the host), and a dead host's entries go after 5.7 s.

usage: sudo bench/overlay.py [--samples 30] [--rounds 5] [--bin PATH]
Needs root, iproute2, iputils-ping, nsenter; builds the release binary unless --bin is given.
"""

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAG = str(os.getpid() % 100000)


def sh(*args, check=True):
    r = subprocess.run(args, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise SystemExit(f"{' '.join(args)}: {r.stderr.strip()}")
    return r


def ns(kind, i):
    return f"b{kind}{i}{TAG}"


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(p / 100 * len(xs) + 0.5)) - 1))]


def summary(name, xs):
    return (f"{name}: median {statistics.median(xs):.1f} ms, p90 {pct(xs, 90):.1f}, "
            f"p99 {pct(xs, 99):.1f}, max {max(xs):.1f} (n={len(xs)})")


class Bench:
    def __init__(self, binary, root):
        self.bin = binary
        self.root = root
        self.agents = {}
        self.containers = []

    def setup(self):
        u = ns("u", 0)
        sh("ip", "netns", "add", u)
        sh("ip", "-n", u, "link", "add", "name", "ubr", "type", "bridge")
        sh("ip", "-n", u, "link", "set", "ubr", "up")
        for i in (1, 2, 3):
            h = ns("h", i)
            sh("ip", "netns", "add", h)
            a, b = f"be{i}{TAG}", f"bp{i}{TAG}"
            sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)
            sh("ip", "link", "set", a, "netns", h)
            sh("ip", "link", "set", b, "netns", u)
            sh("ip", "-n", u, "link", "set", b, "master", "ubr", "up")
            sh("ip", "-n", h, "addr", "add", f"10.95.0.{i}/24", "dev", a)
            sh("ip", "-n", h, "link", "set", a, "up")
            sh("ip", "-n", h, "link", "set", "lo", "up")
        for i in (1, 2, 3):
            self.start(i)
        self.wait(lambda: all(self.alive(i) == 3 for i in (1, 2, 3)), 30, "three agents alive")

    def start(self, i):
        d = os.path.join(self.root, f"h{i}")
        os.makedirs(d, exist_ok=True)
        log = open(os.path.join(d, "agent.log"), "a")
        seeds = ",".join(f"10.95.0.{j}:7946" for j in (1, 2, 3))
        p = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{ns('h', i)}", self.bin, "agent", "--name", f"h{i}",
             "--bind", f"10.95.0.{i}:7946", "--join", seeds, "--data-dir", d,
             "--run-dir", os.path.join(self.root, f"run{i}"), "--dataplane", "linux"],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        self.agents[i] = p
        self.wait(lambda: self.cli(i, "members", "--json").returncode == 0, 10, f"h{i} serves")

    def cli(self, i, *args):
        sock = os.path.join(self.root, f"h{i}", "weft.sock")
        return subprocess.run([self.bin, "-H", f"unix://{sock}", *args], capture_output=True, text=True)

    def alive(self, i):
        r = self.cli(i, "members", "--json")
        if r.returncode != 0:
            return 0
        return sum(1 for m in json.loads(r.stdout) if m.get("state") == "alive")

    @staticmethod
    def wait(cond, limit, what):
        t0 = time.monotonic()
        while not cond():
            if time.monotonic() - t0 > limit:
                raise SystemExit(f"timed out waiting until {what}")
            time.sleep(0.05)

    def container(self, name):
        sh("ip", "netns", "add", name)
        self.containers.append(name)
        return f"/run/netns/{name}"

    def endpoint(self, i, name, sandbox):
        args = ["endpoint", "create", "ov", name, "--json"]
        if sandbox:
            args += ["--sandbox", sandbox]
        t0 = time.monotonic()
        r = self.cli(i, *args)
        took = (time.monotonic() - t0) * 1000
        if r.returncode != 0:
            raise SystemExit(f"endpoint create on h{i}: {r.stderr.strip()}")
        e = json.loads(r.stdout)
        return e, took

    def first_answer_ms(self, from_ns, ip, limit_s=5):
        """Pings every 2 ms from the moment it is called; ms until the first answer."""
        t0 = time.monotonic()
        r = subprocess.run(["ip", "netns", "exec", from_ns, "ping", "-n", "-i", "0.002", "-W", "1",
                            "-w", str(limit_s), "-c", "1", ip], capture_output=True, text=True)
        # -c 1 stops at the first answer; ping sends every 2 ms until one comes back.
        if r.returncode != 0:
            return None
        return (time.monotonic() - t0) * 1000

    def kernel_fdb_has(self, i, mac):
        d = os.path.join(self.root, f"run{i}", "netns")
        for f in os.listdir(d):
            r = sh("nsenter", f"--net={os.path.join(d, f)}", "bridge", "fdb", "show", "dev", "vxlan0",
                   check=False)
            # Only the `self` entries with a destination (the bridge's own learned `master`
            # entries for the port say nothing about the VXLAN device's forwarding).
            if any(mac in line and " dst " in line for line in r.stdout.splitlines()):
                return True
        return False

    def cleanup(self):
        for p in self.agents.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        for i in (1, 2, 3):
            d = os.path.join(self.root, f"run{i}", "netns")
            if os.path.isdir(d):
                for f in os.listdir(d):
                    subprocess.run(["umount", "-l", os.path.join(d, f)], capture_output=True)
        for c in self.containers:
            sh("ip", "netns", "del", c, check=False)
        for i in (1, 2, 3):
            sh("ip", "netns", "del", ns("h", i), check=False)
        sh("ip", "netns", "del", ns("u", 0), check=False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--bin")
    o = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/overlay.py needs root (network namespaces)")
    binary = o.bin
    if not binary:
        sh("cargo", "build", "--release", "-q", "-p", "weft-node", "--bin", "weft")
        binary = os.path.join(ROOT, "target", "release", "weft")
    root = tempfile.mkdtemp(prefix="weft-bench-overlay-")
    b = Bench(binary, root)
    try:
        b.setup()
        r = b.cli(1, "network", "create", "ov")
        if r.returncode != 0:
            raise SystemExit(f"network create: {r.stderr.strip()}")
        time.sleep(0.5)
        cb, cc = b.container(ns("c", "b")), b.container(ns("c", "c"))
        eb, _ = b.endpoint(2, "eb", cb)
        ec, _ = b.endpoint(3, "ec", cc)
        ip_c = ec["ipv4"].split("/")[0]
        # Warm: host A's first endpoint makes its sandbox; not a sample.
        ca = b.container(ns("c", "a"))
        ea, _ = b.endpoint(1, "ea", ca)
        ip_a = ea["ipv4"].split("/")[0]
        assert b.first_answer_ms(ns("c", "b"), ip_a) is not None, "warm-up endpoint unreachable"

        reach, create, plain = [], [], []
        for k in range(o.samples):
            name = ns("c", f"s{k}")
            path = b.container(name)
            e, took = b.endpoint(1, f"s{k}", path)
            ms = b.first_answer_ms(ns("c", "b"), e["ipv4"].split("/")[0])
            if ms is None:
                raise SystemExit(f"sample {k}: {e['ipv4']} never answered")
            reach.append(ms)
            create.append(took)
            _, took_plain = b.endpoint(1, f"p{k}", None)
            plain.append(took_plain)
            b.cli(1, "endpoint", "rm", "ov", f"s{k}")
            b.cli(1, "endpoint", "rm", "ov", f"p{k}")
            sh("ip", "netns", "del", name, check=False)
            b.containers.remove(name)
        print(summary("create --sandbox to first ping answered from another host", reach))
        print(summary("endpoint create --sandbox (CLI round trip)", create))
        print(summary("endpoint create without --sandbox (same run, baseline)", plain))
        print(f"  sandbox/no-sandbox create ratio (medians): "
              f"{statistics.median(create) / statistics.median(plain):.2f}")

        fail, back = [], []
        mac_c = ec["mac"]
        for k in range(o.rounds):
            b.wait(lambda: b.kernel_fdb_has(1, mac_c), 30, "A holds C's entry")
            t0 = time.monotonic()
            b.agents[3].send_signal(signal.SIGKILL)
            b.agents[3].wait()
            b.wait(lambda: not b.kernel_fdb_has(1, mac_c), 120, "A drops C's entry")
            fail.append((time.monotonic() - t0) * 1000)
            t1 = time.monotonic()
            b.start(3)
            b.wait(lambda: b.first_answer_ms(ns("c", "a"), ip_c, 1) is not None, 60, "C reachable again")
            back.append((time.monotonic() - t1) * 1000)
        print(summary("kill -9 to the peers' FDB entries removed", fail))
        print(summary("restart (process start) to reachable again", back))
        print("Docker 20.10 here: reachable 843 ms after docker run starts (596 warm); "
              "a dead host's entries go after 5700 ms")
    finally:
        b.cleanup()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

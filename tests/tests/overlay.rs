//! The overlay data plane on a real kernel: three "hosts", each a network namespace on one
//! underlay bridge (in a fourth namespace), each running an agent (`nsenter --net=`, its own
//! `--run-dir`) with one endpoint whose interface is in a "container" namespace. Every endpoint
//! pings every other across hosts; a 1422-byte ping with DF passes at MTU 1450; a SIGTERM
//! restart keeps endpoints answering; a `kill -9`ed host's neighbour and FDB entries go from
//! the others' kernels, and come back when it restarts over a stray VXLAN device holding the
//! VNI; `weft leave` removes a host's entries everywhere; `endpoint rm` and `network detach`
//! leave nothing behind.
//!
//! Needs root (namespaces, netlink). Under `CI=true` it always runs; elsewhere, without root,
//! it skips with one line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use weft_tests::{Agent, TempDir, wait_until};

const LONG: Duration = Duration::from_secs(30);

fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("run {cmd}: {e}"))
}

fn sh(args: &[&str]) {
    let out = run(args[0], &args[1..]);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Whether this process may make namespaces (root); under CI it must.
fn privileged(test: &str) -> bool {
    let root = nix::unistd::Uid::effective().is_root();
    if !root {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "{test}: CI=true but not root: namespace tests must run in CI"
        );
        eprintln!("skipping {test}: needs root (network namespaces, netlink)");
    }
    root
}

/// The test's namespaces and the underlay; everything goes on drop.
struct Hosts {
    tag: String,
    n: u8,
}

impl Hosts {
    fn underlay(&self) -> String {
        format!("wu{}", self.tag)
    }

    fn host(&self, i: u8) -> String {
        format!("wh{i}{}", self.tag)
    }

    fn container(&self, i: u8) -> String {
        format!("wc{i}{}", self.tag)
    }

    fn host_path(&self, i: u8) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.host(i)))
    }

    fn container_path(&self, i: u8) -> String {
        format!("/run/netns/{}", self.container(i))
    }

    fn ip(i: u8) -> String {
        format!("10.96.0.{i}")
    }

    fn new(n: u8) -> Hosts {
        let tag = format!("{}", std::process::id() % 100_000);
        let h = Hosts { tag, n };
        h.cleanup();
        let u = h.underlay();
        sh(&["ip", "netns", "add", &u]);
        sh(&["ip", "-n", &u, "link", "add", "name", "ubr", "type", "bridge"]);
        sh(&["ip", "-n", &u, "link", "set", "ubr", "up"]);
        for i in 1..=n {
            let (host, c) = (h.host(i), h.container(i));
            sh(&["ip", "netns", "add", &host]);
            sh(&["ip", "netns", "add", &c]);
            let (a, b) = (format!("we{i}{}", h.tag), format!("wp{i}{}", h.tag));
            sh(&["ip", "link", "add", &a, "type", "veth", "peer", "name", &b]);
            sh(&["ip", "link", "set", &a, "netns", &host]);
            sh(&["ip", "link", "set", &b, "netns", &u]);
            sh(&["ip", "-n", &u, "link", "set", &b, "master", "ubr", "up"]);
            sh(&["ip", "-n", &host, "addr", "add", &format!("{}/24", Self::ip(i)), "dev", &a]);
            sh(&["ip", "-n", &host, "link", "set", &a, "up"]);
            sh(&["ip", "-n", &host, "link", "set", "lo", "up"]);
        }
        h
    }

    fn cleanup(&self) {
        for i in 1..=self.n {
            let _ = run("ip", &["netns", "del", &self.container(i)]);
            let _ = run("ip", &["netns", "del", &self.host(i)]);
        }
        let _ = run("ip", &["netns", "del", &self.underlay()]);
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Unmounts and removes a run dir's namespaces (what an agent killed mid-test left).
fn clean_run_dir(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir.join("netns")) {
        for e in entries.flatten() {
            let _ = nix::mount::umount2(&e.path(), nix::mount::MntFlags::MNT_DETACH);
            let _ = std::fs::remove_file(e.path());
        }
    }
}

struct RunDirs(Vec<PathBuf>);

impl Drop for RunDirs {
    fn drop(&mut self) {
        for d in &self.0 {
            clean_run_dir(d);
        }
    }
}

/// One ping from container namespace `from` to `ip`; whether it was answered.
fn ping(from: &str, ip: &str, extra: &[&str]) -> bool {
    let mut args = vec!["netns", "exec", from, "ping", "-c", "1", "-W", "1", "-n", "-q"];
    args.extend_from_slice(extra);
    args.push(ip);
    run("ip", &args).status.success()
}

fn inspect(a: &Agent, net: &str) -> Value {
    a.json(&["network", "inspect", net, "--verbose", "--json"])
}

/// The kernel's FDB entries of the network's sandbox on `a`'s host: (MAC, VTEP).
fn kernel_fdb(a: &Agent, net: &str) -> Vec<(String, String)> {
    let v = inspect(a, net);
    v["overlay"]["kernel"]["fdb"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| (e[0].as_str().unwrap_or("").to_string(), e[1].as_str().unwrap_or("").to_string()))
        .collect()
}

fn kernel_neighbours(a: &Agent, net: &str) -> Vec<String> {
    let v = inspect(a, net);
    v["overlay"]["kernel"]["neighbours"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| e[0].as_str().unwrap_or("").to_string())
        .collect()
}

#[test]
fn three_hosts_reach_each_other_through_failures_restarts_and_leaves() {
    if !privileged("three_hosts_reach_each_other_through_failures_restarts_and_leaves") {
        return;
    }
    let hosts = Hosts::new(3);
    let root = TempDir::new("overlay");
    let runs = RunDirs((1..=3).map(|i| root.0.join(format!("run{i}"))).collect());
    let seeds: Vec<SocketAddr> = (1..=3).map(|i| format!("{}:7946", Hosts::ip(i)).parse().unwrap()).collect();
    let mut agents: Vec<Agent> = (1..=3u8)
        .map(|i| {
            let run_dir = runs.0[i as usize - 1].display().to_string();
            Agent::start_in(
                &root.0,
                &format!("h{i}"),
                seeds[i as usize - 1],
                &seeds,
                &hosts.host_path(i),
                &["--dataplane", "linux", "--run-dir", &run_dir],
            )
        })
        .collect();
    wait_until("three agents see three alive", LONG, || {
        agents.iter().all(|a| a.member_states().iter().filter(|(_, s)| s == "alive").count() == 3)
    });
    let created = agents[0].cli(&["network", "create", "ov"]);
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let net = "ov";
    let vni: String = {
        let v = agents[0].json(&["network", "inspect", net, "--json"]);
        v["network"]["options"]["com.docker.network.driver.overlay.vxlanid_list"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // One endpoint with an interface per host.
    let mut ips = Vec::new();
    let mut macs = Vec::new();
    for (i, a) in agents.iter().enumerate() {
        let c = hosts.container_path(i as u8 + 1);
        let e = a.json(&["endpoint", "create", net, &format!("e{}", i + 1), "--sandbox", &c, "--json"]);
        ips.push(e["ipv4"].as_str().unwrap().split('/').next().unwrap().to_string());
        macs.push(e["mac"].as_str().unwrap().to_string());
    }
    for i in 1..=3u8 {
        let out = run("ip", &["-n", &hosts.container(i), "-o", "link", "show", "eth0"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("mtu 1450"), "host {i}'s endpoint interface: {text}");
    }
    // Every endpoint reaches every other.
    let all_reach = |ips: &[String], among: &[usize]| {
        for &i in among {
            for &j in among {
                if i != j {
                    wait_until(&format!("e{} pings e{}", i + 1, j + 1), LONG, || {
                        ping(&hosts.container(i as u8 + 1), &ips[j], &[])
                    });
                }
            }
        }
    };
    all_reach(&ips, &[0, 1, 2]);
    assert!(
        ping(&hosts.container(1), &ips[1], &["-M", "do", "-s", "1422"]),
        "1422 bytes with DF pass at MTU 1450"
    );
    assert!(
        !ping(&hosts.container(1), &ips[1], &["-M", "do", "-s", "1423"]),
        "1423 bytes with DF exceed MTU 1450"
    );
    // The metrics say the same: a sandbox here, three peer records, all programmed.
    assert_eq!(agents[0].metric("weft_dataplane_enabled"), Some(1.0));
    assert_eq!(agents[0].metric("weft_overlay_sandboxes"), Some(1.0));
    assert_eq!(agents[0].metric("weft_overlay_peer_records"), Some(3.0));
    assert_eq!(agents[0].metric("weft_overlay_peer_records_unprogrammed"), Some(0.0));
    // What inspect shows: the peers programmed, and a kernel equal to the tables.
    let v = inspect(&agents[0], net);
    assert_eq!(v["overlay"]["differences"], Value::Array(vec![]), "{v:#}");
    let fdb = kernel_fdb(&agents[0], net);
    assert!(
        fdb.contains(&(macs[1].clone(), Hosts::ip(2))) && fdb.contains(&(macs[2].clone(), Hosts::ip(3))),
        "{fdb:?}"
    );
    let dump = agents[0].cli(&["dump", "--network", net, "--table", "overlay_peer_table", "--verbose"]);
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(
        dump.contains(&format!("Host IP: {}", Hosts::ip(2))),
        "dump --verbose decodes peer records: {dump}"
    );

    // A SIGTERM restart of h2: its endpoint keeps answering from h1 throughout.
    let pinger = Command::new("ip")
        .args(["netns", "exec", &hosts.container(1), "ping", "-n", "-q", "-i", "0.2", "-W", "1", "-c", "40"])
        .arg(&ips[1])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("ping");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(agents[1].terminate(), Some(0), "a SIGTERM stop exits 0");
    std::thread::sleep(Duration::from_millis(500));
    agents[1].start_again();
    let out = pinger.wait_with_output().expect("ping ends");
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("40 packets transmitted, 40 received"), "pings across h2's restart: {summary}");
    all_reach(&ips, &[0, 1, 2]);

    // kill -9 of h3, which stays down: the others' entries for its endpoint go.
    agents[2].kill9();
    let t0 = Instant::now();
    for a in &agents[..2] {
        wait_until(
            &format!("{} drops the dead host's FDB and neighbour entries", a.name),
            Duration::from_secs(120),
            || {
                !kernel_fdb(a, net).iter().any(|(m, _)| *m == macs[2])
                    && !kernel_neighbours(a, net).contains(&ips[2])
            },
        );
    }
    eprintln!("kill -9 to the others' entries gone: {:?}", t0.elapsed());
    // It comes back with its data dir, over a stray VXLAN device holding the network's VNI in
    // its namespace: its endpoint is reachable again, and the stray is gone.
    // (The kernel refuses a second device with the VNI while the sandbox's own exists: the
    // sandbox loses it first, as when an agent dies between making and moving it.)
    let h3 = hosts.host(3);
    let sandbox =
        std::fs::read_dir(runs.0[2].join("netns")).unwrap().flatten().next().expect("h3's sandbox").path();
    sh(&["nsenter", &format!("--net={}", sandbox.display()), "ip", "link", "del", "vxlan0"]);
    // (Named as weft names a device before moving it into the sandbox, but with another tag
    // than this network's, so only the stray sweep, not the removal of the device weft is about
    // to make, can take it away.)
    let stray_name = format!("vx-{:06x}-stray", vni.parse::<u32>().unwrap());
    let stray =
        ["-n", &h3, "link", "add", &stray_name, "type", "vxlan", "id", &vni, "dstport", "4789", "nolearning"];
    sh(&[&["ip"][..], &stray[..]].concat());
    sh(&["ip", "-n", &h3, "link", "set", &stray_name, "up"]);
    agents[2].start_again();
    all_reach(&ips, &[0, 1, 2]);
    assert!(
        !run("ip", &["-n", &h3, "link", "show", &stray_name]).status.success(),
        "the stray VXLAN device was removed"
    );

    // weft leave on h2: its entries go everywhere, and its own sandbox before it exits.
    let (out, code) = agents[1].leave();
    assert!(out.status.success() && code == Some(0), "leave: {}", String::from_utf8_lossy(&out.stderr));
    let left: Vec<_> =
        std::fs::read_dir(runs.0[1].join("netns")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "h2's sandbox went with its leave: {left:?}");
    for a in [&agents[0], &agents[2]] {
        wait_until(&format!("{} drops the leaver's entries", a.name), LONG, || {
            !kernel_fdb(a, net).iter().any(|(m, _)| *m == macs[1])
                && !kernel_neighbours(a, net).contains(&ips[1])
        });
    }
    assert!(!ping(&hosts.container(1), &ips[1], &[]));
    all_reach(&ips, &[0, 2]);

    // endpoint rm and network detach on h1 leave no namespace, device or entry behind.
    let rm = agents[0].cli(&["endpoint", "rm", net, "e1"]);
    assert!(rm.status.success(), "{}", String::from_utf8_lossy(&rm.stderr));
    let links =
        String::from_utf8_lossy(&run("ip", &["-n", &hosts.container(1), "-o", "link"]).stdout).into_owned();
    assert!(!links.contains("eth0"), "the endpoint's interface is gone: {links}");
    let left: Vec<_> =
        std::fs::read_dir(runs.0[0].join("netns")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "the network's sandbox is gone with its last endpoint: {left:?}");
    let detach = agents[0].cli(&["network", "detach", net]);
    assert!(detach.status.success(), "{}", String::from_utf8_lossy(&detach.stderr));
    // (Some kernels give every namespace fallback tunnel devices: look for ours only.)
    let host_links =
        String::from_utf8_lossy(&run("ip", &["-d", "-n", &hosts.host(1), "-o", "link"]).stdout).into_owned();
    assert!(!host_links.contains("vxlan id"), "no VXLAN device left in h1's namespace: {host_links}");
    let left: Vec<_> =
        std::fs::read_dir(runs.0[0].join("netns")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "no sandbox on h1 after the detach: {left:?}");
    let v = inspect(&agents[0], net);
    assert!(v.get("overlay").is_none(), "h1's driver no longer handles the network: {v:#}");
    let v = inspect(&agents[2], net);
    assert!(kernel_fdb(&agents[2], net).iter().all(|(m, _)| *m != macs[0]), "h3 dropped e1: {v:#}");

    // Another system's VXLAN device holding a network's VNI and port (Calico's holds 4096 on
    // 4789) is never deleted: the endpoint is refused in one line naming it, and nothing is
    // published; once it is gone, the same create works.
    let created = agents[0].cli(&["network", "create", "ov2"]);
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let vni2 = agents[0].json(&["network", "inspect", "ov2", "--json"])["network"]["options"]
        ["com.docker.network.driver.overlay.vxlanid_list"]
        .as_str()
        .unwrap()
        .to_string();
    let h1 = hosts.host(1);
    sh(&["ip", "-n", &h1, "link", "add", "foreign0", "type", "vxlan", "id", &vni2, "dstport", "4789"]);
    let c1 = hosts.container_path(1);
    let refused = agents[0].cli(&["endpoint", "create", "ov2", "f1", "--sandbox", &c1]);
    let err = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(!refused.status.success(), "a create over a foreign device holding the VNI fails");
    assert!(err.trim().lines().count() == 1 && err.contains("foreign0") && err.contains(&vni2), "{err}");
    assert!(run("ip", &["-n", &h1, "link", "show", "foreign0"]).status.success(), "foreign0 is left alone");
    let listed = agents[0].json(&["endpoint", "ls", "ov2", "--json"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "nothing published: {listed:#}");
    sh(&["ip", "-n", &h1, "link", "del", "foreign0"]);
    let e = agents[0].json(&["endpoint", "create", "ov2", "f1", "--sandbox", &c1, "--json"]);
    let f1 = e["ipv4"].as_str().unwrap().split('/').next().unwrap().to_string();
    let addrs = run("ip", &["-n", &hosts.container(1), "-o", "addr", "show", "eth0"]);
    assert!(String::from_utf8_lossy(&addrs.stdout).contains(&f1), "f1's interface is up with {f1}");
    drop(agents);
    drop(runs);
}

//! Allocation across real agents: endpoints created concurrently on three agents while one of
//! them is killed with SIGKILL at random moments and restarted, several rounds; afterwards no
//! address is held by two endpoints and every acknowledged endpoint exists. And two networks
//! created at once on two nodes without `--subnet` get different subnets and VNIs.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use weft_tests::{Agent, TempDir, wait_until};

const LONG: Duration = Duration::from_secs(30);

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn addr(net: u8, i: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, net, i], 7946))
}

fn alive_count(a: &Agent) -> usize {
    a.member_states().iter().filter(|(_, s)| s == "alive").count()
}

/// Three agents given the same seed list (all three): the acceptors are n1, n2, n3.
fn three(root: &TempDir, net: u8) -> Vec<Agent> {
    let seeds = [addr(net, 1), addr(net, 2), addr(net, 3)];
    let agents: Vec<Agent> =
        (1..=3).map(|i| Agent::start(&root.0, &format!("n{i}"), addr(net, i), &seeds)).collect();
    wait_until("three agents see three alive", LONG, || agents.iter().all(|a| alive_count(a) == 3));
    agents
}

/// A small deterministic generator (the seed is printed on failure).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Polls `cond` until it holds or `limit` passes; whether it held.
fn poll_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let t0 = std::time::Instant::now();
    while t0.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    cond()
}

fn endpoints(a: &Agent, network: &str) -> Option<Vec<Value>> {
    let out = a.cli(&["endpoint", "ls", network, "--json"]);
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice::<Value>(&out.stdout).ok()?.as_array().cloned()
}

#[test]
fn endpoints_created_through_sigkills_are_never_duplicated_and_never_lost() {
    let _serial = serial();
    let seed: u64 = std::env::var("WEFT_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_a110c);
    eprintln!("seed {seed} (WEFT_TEST_SEED to replay)");
    let root = TempDir::new("alloc-kill");
    let mut agents = three(&root, 31);
    let out = agents[0].cli(&["network", "create", "web"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_until("the definition reaches every agent", LONG, || {
        agents.iter().all(|a| a.cli(&["network", "inspect", "web"]).status.success())
    });
    let mut rng = Rng(seed | 1);
    // Every endpoint an agent acknowledged: name -> (node, address).
    let acked: Arc<Mutex<BTreeMap<String, (String, String)>>> = Arc::default();
    for round in 0..3 {
        let victim = (rng.next() % 3) as usize;
        let kill_after = Duration::from_millis(50 + rng.next() % 250);
        let hosts: Vec<(String, String)> = agents.iter().map(|a| (a.name.clone(), a.host())).collect();
        let workers: Vec<_> = hosts
            .into_iter()
            .map(|(name, host)| {
                let acked = acked.clone();
                std::thread::spawn(move || {
                    for k in 0..40 {
                        let ep = format!("{name}-r{round}-{k}");
                        let out = std::process::Command::new(weft_tests::weft_bin())
                            .args(["-H", &host, "endpoint", "create", "web", &ep, "--json"])
                            .output()
                            .expect("run weft");
                        if out.status.success() {
                            let v: Value = serde_json::from_slice(&out.stdout).expect("endpoint JSON");
                            let ip = v["ipv4"].as_str().expect("ipv4").to_string();
                            acked.lock().unwrap().insert(ep, (name.clone(), ip));
                        }
                    }
                })
            })
            .collect();
        std::thread::sleep(kill_after);
        agents[victim].kill9();
        for w in workers {
            w.join().expect("worker");
        }
        agents[victim].start_again();
        wait_until("the restarted agent is back in the cluster", LONG, || {
            agents.iter().all(|a| alive_count(a) == 3)
        });
    }
    let acked = acked.lock().unwrap().clone();
    eprintln!("{} endpoints acknowledged over 3 rounds with a SIGKILL each", acked.len());
    assert!(acked.len() >= 12, "too few endpoints were created to test anything: {}", acked.len());
    // Every agent converges on a set that holds every acknowledged endpoint, no address twice.
    for a in &agents {
        let mut last = Vec::new();
        let ok = poll_until(LONG, || {
            let Some(eps) = endpoints(a, "web") else { return false };
            last = eps;
            acked.keys().all(|name| last.iter().any(|e| e["name"] == name.as_str()))
        });
        let names: BTreeSet<String> =
            last.iter().map(|e| e["name"].as_str().unwrap_or("").to_string()).collect();
        let missing: Vec<&String> = acked.keys().filter(|n| !names.contains(*n)).collect();
        assert!(ok, "seed {seed}: {} lost acknowledged endpoints {missing:?}", a.name);
        let mut by_ip: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for e in &last {
            by_ip
                .entry(e["ipv4"].as_str().unwrap_or("").to_string())
                .or_default()
                .push(e["name"].to_string());
        }
        let dups: Vec<_> = by_ip.iter().filter(|(_, v)| v.len() > 1).collect();
        assert!(dups.is_empty(), "seed {seed}: addresses held twice on {}: {dups:?}", a.name);
        for (name, (node, ip)) in &acked {
            let e = last.iter().find(|e| e["name"] == name.as_str()).expect("present");
            assert_eq!(
                (e["node"].as_str(), e["ipv4"].as_str()),
                (Some(node.as_str()), Some(ip.as_str())),
                "seed {seed}: {name}"
            );
        }
    }
}

#[test]
fn two_networks_created_at_once_on_two_nodes_get_different_subnets_and_vnis() {
    let _serial = serial();
    let root = TempDir::new("alloc-two");
    let agents = three(&root, 32);
    // Both wait for the rings to be seeded (a create parks for that), then run at once.
    let hosts: Vec<String> = agents.iter().take(2).map(Agent::host).collect();
    let creates: Vec<_> = hosts
        .into_iter()
        .enumerate()
        .map(|(i, host)| {
            std::thread::spawn(move || {
                std::process::Command::new(weft_tests::weft_bin())
                    .args(["-H", &host, "network", "create", &format!("net{i}")])
                    .output()
                    .expect("run weft")
            })
        })
        .collect();
    for c in creates {
        let out = c.join().expect("create");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let mut defs = Vec::new();
    wait_until("both definitions reach n3", LONG, || {
        let v = agents[2].json(&["network", "ls", "--json"]);
        defs = v.as_array().cloned().unwrap_or_default();
        defs.len() == 2
    });
    let subnet = |d: &Value| d["subnets"][0].as_str().unwrap_or("").to_string();
    let vni = |d: &Value| {
        d["options"]["com.docker.network.driver.overlay.vxlanid_list"].as_str().unwrap_or("").to_string()
    };
    assert_ne!(subnet(&defs[0]), subnet(&defs[1]), "{defs:?}");
    assert_ne!(vni(&defs[0]), vni(&defs[1]), "{defs:?}");
    assert!(!vni(&defs[0]).is_empty() && !subnet(&defs[0]).is_empty(), "{defs:?}");
    assert!(defs.iter().all(|d| d["subnet_overlap"].is_null()), "flagged as overlapping: {defs:?}");
}

//! Allocation across real agents: endpoints created concurrently on three agents while one of
//! them is killed with SIGKILL at random moments and restarted, several rounds; afterwards no
//! address is held by two endpoints and every acknowledged endpoint exists. Two networks
//! created at once on two nodes without `--subnet` get different subnets and VNIs. A node
//! killed for good is removed with `weft node rm` and tears down when it comes back.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use weft_tests::{Agent, TempDir, wait_until};

const LONG: Duration = Duration::from_secs(30);
/// How long a restarted agent may take to be seen alive by all three.
const REJOIN: Duration = Duration::from_secs(120);

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

/// The live endpoint records an agent holds in network `nid`, read from its table by network
/// id (so they are checked even where the network's definition is missing; see below).
fn endpoints(a: &Agent, nid: &str) -> Option<Vec<Value>> {
    use base64::Engine;
    let out = a.cli(&["dump", "--network", nid, "--table", "endpoint_table", "--json"]);
    if !out.status.success() {
        return None;
    }
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    let mut eps = Vec::new();
    for n in v["networks"].as_array()? {
        for t in n["tables"].as_array()? {
            for e in t["entries"].as_array()?.iter().filter(|e| e["state"] == "live") {
                let raw = base64::engine::general_purpose::STANDARD.decode(e["value"].as_str()?).ok()?;
                eps.push(serde_json::from_slice(&raw).ok()?);
            }
        }
    }
    Some(eps)
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
    let nid = String::from_utf8_lossy(&out.stdout).trim().to_string();
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
        let killed_at = std::time::Instant::now();
        for w in workers {
            w.join().expect("worker");
        }
        let creates_done = killed_at.elapsed();
        agents[victim].start_again();
        let t0 = std::time::Instant::now();
        // A liveness bound, not a speed target: a loaded machine (one CI run took 250 s for
        // what takes 12 s here) may need more than LONG; the figure is printed below.
        if !poll_until(REJOIN, || agents.iter().all(|a| alive_count(a) == 3)) {
            for a in &agents {
                let o = a.cli(&["members"]);
                eprintln!(
                    "{} members: {}{}",
                    a.name,
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                );
                eprintln!("{} log (last 60 lines):", a.name);
                let log = a.log();
                let lines: Vec<&str> = log.lines().collect();
                for l in &lines[lines.len().saturating_sub(60)..] {
                    eprintln!("  {l}");
                }
            }
            panic!("round {round}: {} is not back in the cluster after {REJOIN:?}", agents[victim].name);
        }
        let back = t0.elapsed();
        eprintln!(
            "round {round}: killed {} after {kill_after:?}; creates done {creates_done:?} after the kill; back in {back:?}",
            agents[victim].name
        );
    }
    let acked = acked.lock().unwrap().clone();
    eprintln!("{} endpoints acknowledged over 3 rounds with a SIGKILL each", acked.len());
    assert!(acked.len() >= 12, "too few endpoints were created to test anything: {}", acked.len());
    // Every agent converges on a set that holds every acknowledged endpoint, no address twice.
    for a in &agents {
        let mut last = Vec::new();
        let t0 = std::time::Instant::now();
        let ok = poll_until(LONG, || {
            let Some(eps) = endpoints(a, &nid) else { return false };
            last = eps;
            acked.keys().all(|name| last.iter().any(|e| e["name"] == name.as_str()))
        });
        let names: BTreeSet<String> =
            last.iter().map(|e| e["name"].as_str().unwrap_or("").to_string()).collect();
        let missing: Vec<&String> = acked.keys().filter(|n| !names.contains(*n)).collect();
        eprintln!("{} converged in {:?}", a.name, t0.elapsed());
        if !ok {
            let o = a.cli(&["endpoint", "create", "web", "probe"]);
            eprintln!(
                "{} PROBE create (the agent's own state): {}{}",
                a.name,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            let o = a.cli(&["endpoint", "ls", "web", "--json"]);
            eprintln!(
                "{} endpoint ls: {} / {}",
                a.name,
                String::from_utf8_lossy(&o.stdout).len(),
                String::from_utf8_lossy(&o.stderr)
            );
            let o = a.cli(&["network", "ls"]);
            eprintln!(
                "{} network ls: {}{}",
                a.name,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            for b in &agents {
                let o = b.cli(&["dump", "--network", "cluster", "--table", "networks", "-v"]);
                eprintln!(
                    "{} dump: {}{}",
                    b.name,
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                );
                eprintln!(
                    "{} log: {}",
                    b.name,
                    b.log()
                        .lines()
                        .filter(|l| l.contains("network") || l.contains("WARN") || l.contains("ERROR"))
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            let m = a.http_get("/metrics");
            for l in m.lines().filter(|l| {
                l.starts_with("weft_persist")
                    || l.starts_with("weft_held")
                    || l.starts_with("weft_sync")
                    || l.starts_with("weft_datagram")
                    || l.starts_with("weft_entries")
            }) {
                eprintln!("{} {l}", a.name);
            }
            eprintln!("{} health {}", a.name, a.http_get("/health"));
            let log = a.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("{} log tail:\n{}", a.name, tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
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
    // The network's definition survived the rolling kills (written back if the cluster lost it).
    wait_until("every agent resolves the network by name", LONG, || {
        agents.iter().all(|a| a.cli(&["network", "inspect", "web"]).status.success())
    });
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

#[test]
fn a_node_killed_for_good_is_removed_with_the_cli_and_tears_down_when_it_comes_back() {
    let _serial = serial();
    let root = TempDir::new("alloc-noderm");
    let mut agents = three(&root, 33);
    let ok = |out: std::process::Output| {
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    ok(agents[0].cli(&["network", "create", "web", "--subnet", "10.33.0.0/24"]));
    wait_until("n2 knows web", LONG, || agents[1].cli(&["network", "inspect", "web"]).status.success());
    ok(agents[1].cli(&["network", "attach", "web"]));
    let mine = agents[2].json(&["endpoint", "create", "web", "c1", "--json"]);
    assert_eq!(mine["node"], "n3", "{mine}");
    // A live node is never removed: one line says why. (Until n1 has synced the cluster's
    // tables it refuses any removal, saying to retry: a user would.)
    let mut last = None;
    wait_until("n1 has synced the cluster's tables", LONG, || {
        let out = agents[0].cli(&["node", "rm", "n3"]);
        let synced = !String::from_utf8_lossy(&out.stderr).contains("not synced");
        last = Some(out);
        synced
    });
    let out = last.expect("asked at least once");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("alive") && err.trim().lines().count() == 1, "{err}");
    let out = agents[0].cli(&["node", "rm", "nobody"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such node"), "{out:?}");

    agents[2].kill9();
    wait_until("n1 sees n3 down", LONG, || {
        agents[0].state_of("n3").is_some_and(|s| s != "alive" && s != "suspect")
    });
    let said = ok(agents[0].cli(&["node", "rm", "n3"]));
    assert!(said.starts_with("removed n3@") && said.contains("entries deleted cluster-wide"), "{said}");
    // Its endpoint is gone everywhere, not hidden until it returns.
    let nid = mine["network_id"].as_str().expect("network id").to_string();
    wait_until("n2 holds n3's endpoint as a tombstone", LONG, || {
        let theirs: Vec<String> = agents[1]
            .entries(&nid, "endpoint_table")
            .into_iter()
            .filter(|(_, owner, _, _)| owner == "n3")
            .map(|(_, _, state, _)| state)
            .collect();
        !theirs.is_empty() && theirs.iter().all(|s| s == "tombstone")
    });

    // n3 comes back from its data dir: it tears down, says so, and allocates nothing.
    agents[2].start_again();
    wait_until("n3 knows it was removed", LONG, || agents[2].metric("weft_node_removed") == Some(1.0));
    let out = agents[2].cli(&["endpoint", "create", "web", "c2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("was removed from the cluster by n1@"), "{err}");
    assert!(agents[2].log().contains("THIS NODE WAS REMOVED"), "not said loudly");
    let left = agents[2].json(&["endpoint", "ls", "--json"]);
    assert!(left.as_array().is_some_and(|a| a.iter().all(|e| e["node"] != "n3")), "{left}");

    // Reinstalled (an empty data dir): a new instance that allocates again.
    agents[2].kill9();
    agents[2].wipe_data_dir();
    agents[2].start_again();
    wait_until("the new n3 is up and knows web", LONG, || {
        alive_count(&agents[0]) == 3 && agents[2].cli(&["network", "inspect", "web"]).status.success()
    });
    let again = agents[2].json(&["endpoint", "create", "web", "c3", "--json"]);
    assert_eq!(again["node"], "n3", "{again}");
    assert_ne!(again["ipv4"], mine["ipv4"], "the removed instance's address is held back");
}

//! The allocation scenario: endpoint churn on N agents (the very `Agent` the binary runs) with
//! datagram loss, a partition, crashes and restarts, on a disk that loses every write not yet
//! durable when its host crashes. A checker runs after every step: no address is held by two
//! endpoints (a crashed node's endpoints, as its disk holds them, count while it is down), and
//! every endpoint a node acknowledged and did not remove is still its. At the end every node's
//! endpoint table holds exactly the acknowledged endpoints.
//!
//! It reports allocations per second (of virtual time), the share of creates that needed a
//! donation first, allocation latency (virtual time from the first attempt to the reply; a
//! create that must wait for a share is retried every 50 ms, as a parked command is), local
//! and donated apart, and duplicates (always 0, or the run fails).

use std::collections::BTreeMap;
use std::time::Duration;

use weft_gossip::Config;
use weft_node::alloc::Endpoint;
use weft_node::{AgentError, Command, Reply};

use crate::cluster::{AgentCluster, NetModel, mix};
use crate::scenarios::Percentiles;

/// What one run measured.
#[derive(Debug, Clone)]
pub struct AllocationReport {
    pub seed: u64,
    pub nodes: usize,
    /// Endpoints created (acknowledged) and removed.
    pub created: u64,
    pub removed: u64,
    pub virtual_s: f64,
    /// Creates that found no free address in the node's share at first and got one later.
    pub donated: u64,
    /// Creates that gave up (no share came within the wait, or the node had just restarted).
    pub gave_up: u64,
    pub local_latency: Percentiles,
    pub donated_latency: Percentiles,
    /// Addresses held by two endpoints at any check (the run fails if not 0).
    pub duplicates: u64,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn apply(c: &mut AgentCluster, i: usize, cmd: Command) -> Result<Reply, AgentError> {
    c.with(i, |n, now| n.apply(now, cmd))
}

/// Endpoints node `i` holds as its own: from the running agent, or from its disk while down.
fn own_endpoints(c: &AgentCluster, i: usize, nid: &str) -> Vec<Endpoint> {
    match c.nodes[i].node.as_ref() {
        Some(a) => a.allocator().local_endpoints(nid).into_iter().cloned().collect(),
        None => c.nodes[i]
            .disk
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("ep/{nid}/")))
            .filter_map(|(_, v)| serde_json::from_slice(v).ok())
            .collect(),
    }
}

/// The checker: no address twice, no acknowledged endpoint lost.
fn check(c: &AgentCluster, nid: &str, acked: &BTreeMap<String, (usize, String)>) -> Result<(), String> {
    let mut by_ip: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut held: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for i in 0..c.nodes.len() {
        for e in own_endpoints(c, i, nid) {
            by_ip.entry(e.ipv4.clone()).or_default().push(format!("{} on node {i}", e.name));
            held.insert(e.id.clone(), (i, e.ipv4.clone()));
        }
    }
    if let Some((ip, who)) = by_ip.iter().find(|(_, w)| w.len() > 1) {
        return Err(format!("address {ip} held by {who:?}"));
    }
    for (id, (i, ip)) in acked {
        if held.get(id) != Some(&(*i, ip.clone())) {
            return Err(format!("acknowledged endpoint {id} ({ip} on node {i}) lost"));
        }
    }
    Ok(())
}

/// Runs the churn for `steps` steps on `n` nodes (the first three are the acceptors).
pub fn allocation(n: usize, seed: u64, steps: usize) -> Result<AllocationReport, String> {
    let err = |e: String| format!("allocation seed {seed}: {e}");
    let net = NetModel { loss: 0.01, ..NetModel::default() };
    let mut c = AgentCluster::new(n, seed, Config::lan(n as u32), net);
    let acceptors: Vec<usize> = (0..n.min(3)).collect();
    let seeds: Vec<_> = acceptors.iter().map(|&i| c.nodes[i].addr).collect();
    for i in 0..n {
        c.join(i, &seeds);
    }
    c.run_for(Duration::from_secs(5));
    // Once the rings are seeded (Paxos among the acceptors) the network gets its subnet and VNI.
    let mut nid = None;
    for _ in 0..40 {
        let create = Command::CreateNetwork {
            name: "app".into(),
            driver: "overlay".into(),
            subnets: vec![],
            gateway: None,
            options: Default::default(),
        };
        match apply(&mut c, 0, create) {
            Ok(Reply::Network(d)) => {
                nid = Some(d.id);
                break;
            }
            _ => c.run_for(Duration::from_millis(500)),
        }
    }
    let nid = nid.ok_or_else(|| err("the network was never created".into()))?;
    c.run_for(Duration::from_secs(2));
    let t0 = c.now();
    let mut rng = Rng(mix(seed, 0xa110c) | 1);
    let mut acked: BTreeMap<String, (usize, String)> = BTreeMap::new();
    let mut down: Vec<usize> = Vec::new();
    let mut partitioned = false;
    let (mut created, mut removed, mut donated, mut gave_up) = (0, 0, 0, 0);
    let (mut local_lat, mut donated_lat) = (Vec::new(), Vec::new());
    for step in 0..steps {
        let up: Vec<usize> = (0..n).filter(|i| !down.contains(i)).collect();
        match rng.below(100) {
            0..=59 => {
                let i = up[rng.below(up.len() as u64) as usize];
                let started = c.now();
                let mut waited = false;
                // Retried every 50 ms for up to 5 s, as a parked command is.
                for _ in 0..100 {
                    let cmd = Command::EndpointCreate {
                        network: nid.clone(),
                        name: format!("e{step}"),
                        ip: None,
                        mac: None,
                        sandbox: None,
                    };
                    match apply(&mut c, i, cmd) {
                        Ok(Reply::Endpoint(e)) => {
                            created += 1;
                            let lat = c.now() - started;
                            if waited {
                                donated += 1;
                                donated_lat.push(lat);
                            } else {
                                local_lat.push(lat);
                            }
                            acked.insert(e.id.clone(), (i, e.ipv4.clone()));
                            break;
                        }
                        // A share on its way; the definition not back after a restart.
                        Err(AgentError::WaitedTooLong(_) | AgentError::NoSuchNetwork(_)) => {
                            waited = true;
                            c.run_for(Duration::from_millis(50));
                        }
                        // Nobody reachable has space.
                        Err(AgentError::NoAddress(_)) => {
                            gave_up += 1;
                            break;
                        }
                        other => {
                            return Err(err(format!("step {step}: endpoint create on node {i}: {other:?}")));
                        }
                    }
                    if c.nodes[i].node.is_none() {
                        break;
                    }
                }
            }
            60..=79 => {
                let mine: Vec<String> =
                    acked.iter().filter(|(_, (m, _))| up.contains(m)).map(|(k, _)| k.clone()).collect();
                if !mine.is_empty() {
                    let id = mine[rng.below(mine.len() as u64) as usize].clone();
                    let i = acked[&id].0;
                    match apply(&mut c, i, Command::EndpointRm { network: nid.clone(), endpoint: id.clone() })
                    {
                        Ok(_) => {
                            removed += 1;
                            acked.remove(&id);
                        }
                        // Just restarted, the definition not back yet: removed later.
                        Err(AgentError::NoSuchNetwork(_)) => {}
                        other => return Err(err(format!("step {step}: endpoint rm on node {i}: {other:?}"))),
                    }
                }
            }
            80..=86 if down.len() < 2 => {
                let i = up[rng.below(up.len() as u64) as usize];
                c.crash(i);
                down.push(i);
            }
            87..=93 if !down.is_empty() => {
                let i = down.remove(0);
                c.restart(i, &acceptors);
            }
            94..=96 if !partitioned => {
                let half = n / 2;
                c.partition(&[(0..half).collect(), (half..n).collect()]);
                partitioned = true;
            }
            97..=99 if partitioned => {
                c.heal();
                partitioned = false;
            }
            _ => {}
        }
        c.run_for(Duration::from_millis(50 + rng.below(250)));
        check(&c, &nid, &acked).map_err(|e| err(format!("step {step}: {e}")))?;
    }
    let virtual_s = (c.now() - t0).as_secs_f64();
    c.heal();
    for i in std::mem::take(&mut down) {
        c.restart(i, &acceptors);
    }
    c.run_for(Duration::from_secs(30));
    check(&c, &nid, &acked).map_err(|e| err(format!("at the end: {e}")))?;
    let mut want: Vec<&String> = acked.keys().collect();
    want.sort();
    for i in 0..n {
        if weft_node::read::resolve(c.host(i), &nid).is_err() {
            return Err(err(format!("node {i} lost the network's definition")));
        }
        let seen = weft_node::read::endpoints(c.host(i), Some(&nid)).map_err(|e| err(e.to_string()))?;
        let mut ids: Vec<&String> = seen.iter().map(|e| &e.id).collect();
        ids.sort();
        if ids != want {
            return Err(err(format!(
                "node {i}'s endpoint table holds {} endpoints, {} acknowledged ones live",
                ids.len(),
                want.len()
            )));
        }
    }
    Ok(AllocationReport {
        seed,
        nodes: n,
        created,
        removed,
        virtual_s,
        donated,
        gave_up,
        local_latency: Percentiles::of(local_lat),
        donated_latency: Percentiles::of(donated_lat),
        duplicates: 0,
    })
}

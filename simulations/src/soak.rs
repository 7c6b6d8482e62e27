//! The soak: random mixed load and faults on a cluster, with every checker on.
//!
//! For `duration` of virtual time a seeded schedule writes, updates and deletes entries,
//! attaches and detaches networks, crashes nodes (seeds included) and restarts them, stops them
//! for an announced restart, makes them leave and come back, reinstalls them (a wiped data dir:
//! a new instance, its wall clock sometimes stepped back), partitions the cluster (both ways and
//! one way), raises loss, duplication and reordering, and skews clocks. Then the faults stop and
//! the checkers must pass within a bound derived from the configuration:
//!
//! * **watcher contract** (all along): every node's table events form create, updates,
//!   delete, with `prev` equal to what the node reported last;
//! * **durability** (all along): a node always holds the writes it acknowledged;
//! * **membership**: every up node sees every other up node alive;
//! * **convergence**: every node attached to a network holds the same live entries;
//! * **no lost entry**: every acknowledged write whose owner has been up since is held, as
//!   written, by every node attached to its network;
//! * **lifecycle** (clusters of 5 or more, once converged): one node is crashed, one stopped
//!   for a restart, one leaves, one is reinstalled. While they are down the crashed node's
//!   entries are hidden on every node, the restarting node's stay live, the leaver's are gone;
//!   once the restarting and reinstalled nodes are back, the first holds its entries and the
//!   second none of its earlier instance's; once the crashed node is back, its entries are
//!   live again everywhere.
//!
//! * **allocation** (all along, and at the end): endpoints are created and removed in an
//!   addressed network, networks taking their subnet and VNI from the cluster rings are
//!   created and removed, and now and then a node that crashed stays down and is removed
//!   (`node rm`) by another. No address is held by two endpoints (a down node's endpoints, as
//!   its disk holds them, count while it is down; a removed one's for `reuse_after` after its
//!   removal), every endpoint a node acknowledged and did not remove is still its (unless its
//!   data dir was wiped or it was removed), and no VNI or subnet is held by two networks. At
//!   the end every node holds the acknowledged endpoints, and a removed node that came back
//!   holds none and allocates nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use weft_gossip::Config;
use weft_node::alloc::Endpoint;
use weft_node::{Agent, AgentError, Command, Reply};

use crate::cluster::{AgentCluster, NetModel, Sim, mix};
use crate::host::Host;
use crate::scenarios::T;

/// What the soak does.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    pub nodes: usize,
    pub seed: u64,
    /// Virtual time of load and faults.
    pub duration: Duration,
    /// Networks defined (each node attaches to a random subset).
    pub networks: usize,
}

/// What a passing soak did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SoakReport {
    pub seed: u64,
    pub writes: usize,
    pub deletes: usize,
    pub attaches: usize,
    pub detaches: usize,
    pub crashes: usize,
    pub leaves: usize,
    /// Stops announced as restarts (SIGTERM).
    pub restarts: usize,
    /// Reinstalls: the data dir wiped, the host back as a new instance.
    pub wipes: usize,
    /// Endpoints created (acknowledged) and removed.
    pub endpoints: usize,
    pub endpoints_removed: usize,
    /// Endpoint creates with an interface (a sandbox) issued.
    pub sandboxed: usize,
    /// Networks created from the cluster rings (subnet and VNI), and removed.
    pub networks_created: usize,
    pub networks_removed: usize,
    /// Crashed nodes removed with `node rm` while they stayed down.
    pub node_rms: usize,
    /// Whether the lifecycle epilogue ran (5 nodes or more).
    pub lifecycle_checked: bool,
    pub partitions: usize,
    /// Virtual time from the end of the faults until every checker passed.
    pub converged_after: Duration,
    pub trace: u64,
}

impl SoakReport {
    /// What the soak did, as (count, what) pairs in a fixed order (the line `weft-sim soak`
    /// prints and the columns of its CSV).
    pub fn counts(&self) -> [(usize, &'static str); 15] {
        [
            (self.writes, "writes"),
            (self.deletes, "deletes"),
            (self.attaches, "attaches"),
            (self.detaches, "detaches"),
            (self.crashes, "crashes"),
            (self.restarts, "restarts"),
            (self.leaves, "leaves"),
            (self.wipes, "reinstalls"),
            (self.partitions, "partitions"),
            (self.endpoints, "endpoints"),
            (self.endpoints_removed, "endpoints removed"),
            (self.sandboxed, "with interfaces"),
            (self.networks_created, "pool networks"),
            (self.networks_removed, "pool networks removed"),
            (self.node_rms, "node rms"),
        ]
    }
}

/// What an owner's acknowledged writes say a key must hold: the owner, the life (generation)
/// that wrote it, and Some(value) or None (deleted).
/// How long after the faults stop every checker must pass: failure detection and the
/// rejoin of a healed partition, then a few anti-entropy rounds.
pub fn bound(cfg: &Config) -> Duration {
    let m = &cfg.membership;
    let down_announce = m.periodic_announce_to_down_members.as_ref().map_or(Duration::ZERO, |p| p.frequency);
    m.suspect_to_down_after + m.probe_period * 2 + cfg.rejoin_interval + down_announce + cfg.sync_interval * 4
}

/// The allocation load's ledger.
#[derive(Default)]
struct Alloc {
    /// The addressed network.
    net: String,
    /// Acknowledged endpoints not removed: id -> (node, address).
    acked: BTreeMap<String, (usize, String)>,
    /// Networks created from the cluster rings.
    pool_nets: Vec<String>,
    /// A crashed node that stays down until it is removed, and the nodes removed, with when.
    stay_down: Option<usize>,
    removed: BTreeMap<usize, Duration>,
    seq: u64,
}

/// Endpoints with an interface node `i` created (their replies are not kept) count as
/// acknowledged once published: their reply follows at once.
fn adopt_sandboxed(c: &AgentCluster, a: &mut Alloc, i: usize) {
    if !c.is_up(i) || a.removed.contains_key(&i) {
        return;
    }
    let agent: &Agent = c.host(i);
    for e in agent.allocator().local_endpoints(&a.net) {
        if e.sandbox.is_some()
            && !a.acked.contains_key(&e.id)
            && agent.gossip().get_entry(&a.net, weft_node::alloc::ENDPOINT_TABLE, &e.id).is_some()
        {
            a.acked.insert(e.id.clone(), (i, e.ipv4.clone()));
        }
    }
}

/// The data-plane checker: every up node's data plane holds a sandbox exactly for the
/// networks it has local endpoints with an interface in, those interfaces, and the neighbour
/// and FDB entries its peer table says (no stale entry, nothing missing).
pub fn check_dataplane(c: &AgentCluster) -> Result<(), String> {
    use std::collections::BTreeMap;
    use std::net::{IpAddr, Ipv4Addr};
    use weft_overlay::{Mac, PeerRecord};
    for i in 0..c.nodes.len() {
        if !c.is_up(i) {
            continue;
        }
        let agent: &Agent = c.host(i);
        let g = agent.gossip();
        let dp = &c.nodes[i].dataplane;
        let me = c.nodes[i].name.as_str();
        let mut want = BTreeSet::new();
        for nid in g.networks().filter(|n| *n != weft_gossip::CLUSTER_NETWORK) {
            // In an overlay network, every endpoint has its peer record, with its address, MAC
            // and its owner's VTEP (else it is unreachable).
            if agent.overlay_network(nid).is_some() {
                let mut eps = Vec::new();
                g.walk(nid, weft_node::alloc::ENDPOINT_TABLE, |k, v, owner| {
                    eps.push((k.to_string(), v.clone(), owner.to_string()));
                    true
                });
                for (k, v, owner) in eps {
                    let Ok(e) = serde_json::from_slice::<weft_node::alloc::Endpoint>(&v) else { continue };
                    let rec = g.get_entry(nid, weft_overlay::OVERLAY_PEER_TABLE, &k);
                    let ok = rec.as_deref().and_then(|r| PeerRecord::decode(r).ok()).is_some_and(
                        |(ip, mac, vtep)| {
                            ip.to_string() == e.ipv4
                                && mac.to_string() == e.mac
                                && g.node_data_addr(&owner) == Some(vtep)
                        },
                    );
                    if !ok {
                        return Err(format!(
                            "data plane: node {i} sees endpoint {k} of {owner} in {nid} without a matching peer record: {rec:?}"
                        ));
                    }
                }
            }
            // Every peer record stands for an endpoint (no orphan keeps being programmed).
            let mut peer_keys = Vec::new();
            g.walk(nid, weft_overlay::OVERLAY_PEER_TABLE, |k, _, _| {
                peer_keys.push(k.to_string());
                true
            });
            if let Some(k) =
                peer_keys.iter().find(|k| g.get_entry(nid, weft_node::alloc::ENDPOINT_TABLE, k).is_none())
            {
                return Err(format!(
                    "data plane: node {i} holds a peer record {k} in {nid} with no endpoint"
                ));
            }
            let eps: BTreeMap<String, &weft_node::alloc::Endpoint> = agent
                .allocator()
                .local_endpoints(nid)
                .into_iter()
                .filter(|e| e.sandbox.is_some())
                .map(|e| (e.id.clone(), e))
                .collect();
            if eps.is_empty() {
                continue;
            }
            want.insert(nid.to_string());
            let Some(sb) = dp.sandboxes.get(nid) else {
                return Err(format!(
                    "data plane: node {i} has endpoints with interfaces in {nid} but no sandbox"
                ));
            };
            let have: BTreeSet<&String> = sb.endpoints.keys().collect();
            if have != eps.keys().collect() {
                return Err(format!(
                    "data plane: node {i}'s sandbox of {nid} holds interfaces {have:?}, its endpoints are {:?}",
                    eps.keys()
                ));
            }
            for (id, spec) in &sb.endpoints {
                let e = eps[id];
                if spec.mac.to_string() != e.mac || spec.addr.to_string() != e.ipv4 {
                    return Err(format!(
                        "data plane: node {i}: interface of {id} is {} {}, the endpoint {} {}",
                        spec.mac, spec.addr, e.mac, e.ipv4
                    ));
                }
            }
            // What the peer table says, worked out here on its own: per address the record
            // with the highest (Lamport time, owner); programmed if remote and its VTEP is its
            // owner's published data address.
            let mut best: BTreeMap<Ipv4Addr, ((u64, String), Mac, IpAddr)> = BTreeMap::new();
            for e in g.table(nid, weft_overlay::OVERLAY_PEER_TABLE) {
                if e.state != weft_gossip::EntryState::Live {
                    continue;
                }
                let Ok((ip, mac, vtep)) = PeerRecord::decode(&e.value) else { continue };
                let v = (e.ltime, e.owner.clone());
                if best.get(&ip.addr()).is_none_or(|b| b.0 < v) {
                    best.insert(ip.addr(), (v, mac, vtep));
                }
            }
            let mut neigh = Vec::new();
            let mut fdb = BTreeSet::new();
            for (ip, ((_, owner), mac, vtep)) in best {
                if owner != me && g.node_data_addr(&owner) == Some(vtep) {
                    neigh.push((ip, mac));
                    fdb.insert((mac, vtep));
                }
            }
            let got_n: Vec<_> = sb.neighbours.iter().map(|(ip, m)| (*ip, *m)).collect();
            if got_n != neigh || sb.fdb != fdb {
                return Err(format!(
                    "data plane: node {i}'s sandbox of {nid} differs from its peer table: neighbours {got_n:?} want {neigh:?}; fdb {:?} want {fdb:?}",
                    sb.fdb
                ));
            }
        }
        if let Some(stale) = dp.sandboxes.keys().find(|k| !want.contains(*k)) {
            return Err(format!(
                "data plane: node {i} keeps a sandbox of {stale}, where it has no endpoint with an interface"
            ));
        }
    }
    Ok(())
}

/// Runs a command on node `i`; a success counts once the batch carrying it is durable (as the
/// shell's reply waits for it).
fn apply(c: &mut AgentCluster, i: usize, cmd: Command) -> Result<Reply, AgentError> {
    let r = c.with(i, |n, now| n.apply(now, cmd));
    if r.is_ok() {
        c.settle(i);
    }
    r
}

/// Endpoints node `i` holds as its own: the running agent's, or its disk's while it is down.
fn own_endpoints(c: &AgentCluster, i: usize, nid: &str) -> Vec<Endpoint> {
    match c.nodes[i].node.as_ref() {
        Some(a) => a.allocator().local_endpoints(nid).into_iter().cloned().collect(),
        None => {
            let prefix = format!("{}{nid}/", weft_node::alloc::EP_PREFIX);
            c.nodes[i]
                .disk
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .filter_map(|(_, v)| serde_json::from_slice(v).ok())
                .collect()
        }
    }
}

/// The allocation checker (see the module doc).
fn check_alloc(c: &AgentCluster, a: &Alloc) -> Result<(), String> {
    let reuse = weft_node::alloc::AllocConfig::default().reuse_after;
    let now = c.elapsed();
    let mut by_ip: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut held: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for i in 0..c.nodes.len() {
        // A removed node's addresses are the heir's to hand out once `reuse_after` is over.
        if c.nodes[i].node.is_none() && a.removed.get(&i).is_some_and(|t| now >= *t + reuse) {
            continue;
        }
        for e in own_endpoints(c, i, &a.net) {
            by_ip.entry(e.ipv4.clone()).or_default().push(format!("{} on node {i}", e.name));
            held.insert(e.id.clone(), (i, e.ipv4.clone()));
        }
    }
    if let Some((ip, who)) = by_ip.iter().find(|(_, w)| w.len() > 1) {
        return Err(format!("allocation: address {ip} held by {who:?}"));
    }
    for (id, (i, ip)) in &a.acked {
        if held.get(id) != Some(&(*i, ip.clone())) {
            return Err(format!("allocation: acknowledged endpoint {id} ({ip} on node {i}) lost"));
        }
    }
    // No VNI and no pool subnet in two networks, as any up node sees the definitions.
    let mut vnis: BTreeMap<String, String> = BTreeMap::new();
    let mut subnets: BTreeMap<String, String> = BTreeMap::new();
    for i in (0..c.nodes.len()).filter(|&i| c.nodes[i].node.is_some()) {
        for n in weft_node::read::networks(c.host(i)) {
            if !a.pool_nets.contains(&n.def.id) {
                continue;
            }
            let list = n.def.options.get(weft_node::alloc::VXLANID_OPTION).cloned().unwrap_or_default();
            for v in list.split(',').filter(|v| !v.is_empty()) {
                if let Some(other) = vnis.insert(v.to_string(), n.def.id.clone())
                    && other != n.def.id
                {
                    return Err(format!("allocation: VNI {v} in networks {other} and {}", n.def.id));
                }
            }
            for sn in &n.def.subnets {
                if let Some(other) = subnets.insert(sn.clone(), n.def.id.clone())
                    && other != n.def.id
                {
                    return Err(format!("allocation: subnet {sn} in networks {other} and {}", n.def.id));
                }
            }
        }
    }
    Ok(())
}

/// One step of the allocation load on node `i` (up): create or remove an endpoint, create or
/// remove a network from the cluster rings.
fn alloc_step(
    c: &mut AgentCluster,
    a: &mut Alloc,
    r: &mut SoakReport,
    rng: &mut Xoshiro256PlusPlus,
    i: usize,
) -> Result<(), String> {
    a.seq += 1;
    adopt_sandboxed(c, a, i);
    match rng.random_range(0..10) {
        // Half the endpoints get an interface: their reply comes after the data plane's.
        0..3 => {
            let sandbox = format!("/sim/{}/e{}", c.nodes[i].name, a.seq);
            c.nodes[i].dataplane.add_sandbox_path(&sandbox);
            let cmd = Command::EndpointCreate {
                network: a.net.clone(),
                name: format!("e{}", a.seq),
                ip: None,
                mac: None,
                sandbox: Some(sandbox),
            };
            let id = a.seq;
            c.with(i, |n, now| n.handle_command(now, id, cmd));
            r.sandboxed += 1;
        }
        3..6 => {
            let cmd = Command::EndpointCreate {
                network: a.net.clone(),
                name: format!("e{}", a.seq),
                ip: None,
                mac: None,
                sandbox: None,
            };
            match apply(c, i, cmd) {
                Ok(Reply::Endpoint(e)) => {
                    a.acked.insert(e.id.clone(), (i, e.ipv4.clone()));
                    r.endpoints += 1;
                }
                // A share on its way, the definition not back after a restart, nobody reachable
                // with space, this node removed: nothing acknowledged.
                Err(
                    AgentError::WaitedTooLong(_)
                    | AgentError::NoSuchNetwork(_)
                    | AgentError::NoAddress(_)
                    | AgentError::Exhausted(_)
                    | AgentError::Removed(_),
                ) => {}
                other => return Err(format!("endpoint create on node {i}: {other:?}")),
            }
        }
        6..9 => {
            let mine: Vec<String> =
                a.acked.iter().filter(|(_, (m, _))| *m == i).map(|(k, _)| k.clone()).collect();
            if let Some(id) = mine.get(rng.random_range(0..mine.len().max(1))).cloned() {
                match apply(c, i, Command::EndpointRm { network: a.net.clone(), endpoint: id.clone() }) {
                    Ok(_) => {
                        a.acked.remove(&id);
                        r.endpoints_removed += 1;
                    }
                    Err(AgentError::NoSuchNetwork(_)) => {}
                    other => return Err(format!("endpoint rm on node {i}: {other:?}")),
                }
            }
        }
        _ => {
            if a.pool_nets.len() < 3 || rng.random_bool(0.4) {
                let cmd = Command::CreateNetwork {
                    name: format!("pool{}", a.seq),
                    driver: "overlay".into(),
                    subnets: Vec::new(),
                    gateway: None,
                    options: Default::default(),
                };
                match apply(c, i, cmd) {
                    Ok(Reply::Network(d)) => {
                        a.pool_nets.push(d.id);
                        r.networks_created += 1;
                    }
                    // The rings not seeded yet (acceptors down or cut off), a share on its way,
                    // nothing free within reach, this node removed.
                    Err(AgentError::WaitedTooLong(_) | AgentError::Exhausted(_) | AgentError::Removed(_)) => {
                    }
                    other => return Err(format!("network create on node {i}: {other:?}")),
                }
            } else {
                let k = rng.random_range(0..a.pool_nets.len());
                match apply(c, i, Command::RemoveNetwork { network: a.pool_nets[k].clone(), force: true }) {
                    Ok(_) => {
                        // (Kept in the checker's list: a removed definition is not listed.)
                        r.networks_removed += 1;
                    }
                    Err(AgentError::NoSuchNetwork(_)) => {}
                    other => return Err(format!("network rm on node {i}: {other:?}")),
                }
            }
        }
    }
    Ok(())
}

/// Runs one soak; the error names the seed and the first checker that failed.
pub fn soak(o: &SoakOptions) -> Result<SoakReport, String> {
    let n = o.nodes;
    let seed = o.seed;
    let fail = |what: String| format!("soak seed {seed}, {n} nodes: {what}");
    if n < 2 || o.networks == 0 {
        return Err(fail("needs at least 2 nodes and 1 network".into()));
    }
    let cfg = Config::lan(n as u32);
    let limit = bound(&cfg);
    let mut c = AgentCluster::new(n, seed, cfg, NetModel::default());
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(mix(seed, 0x50a4));
    let seeds: Vec<usize> = (0..n.min(3)).collect();
    let seed_addrs: Vec<_> = seeds.iter().map(|&i| c.nodes[i].addr).collect();
    for i in 0..n {
        c.join(i, &seed_addrs);
    }
    c.run_for(Duration::from_secs(3));
    let nets: Vec<String> = (0..o.networks).map(|k| c.define_network(0, &format!("net{k}"))).collect();
    let mut report = SoakReport { seed, ..SoakReport::default() };
    // The addressed network: an overlay /22 owned by node 0 at first, shared out by donation
    // (its VNI comes from the cluster's ring: created once the rings are seeded).
    let addressed = Command::CreateNetwork {
        name: "addressed".into(),
        driver: "overlay".into(),
        subnets: vec!["10.250.0.0/22".into()],
        gateway: None,
        options: Default::default(),
    };
    let mut made = Err(AgentError::WaitedTooLong("not tried".into()));
    for _ in 0..30 {
        made = apply(&mut c, 0, addressed.clone());
        if made.is_ok() {
            break;
        }
        c.run_for(Duration::from_secs(1));
    }
    let mut alloc = match made {
        Ok(Reply::Network(d)) => Alloc { net: d.id, ..Alloc::default() },
        other => return Err(fail(format!("the addressed network: {other:?}"))),
    };
    // Nodes down (crashed or left) and when they come back.
    let mut down: BTreeMap<usize, Duration> = BTreeMap::new();
    // When the current partition or network fault ends.
    let mut heal_at: Option<Duration> = None;
    let mut calm_at: Option<Duration> = None;
    let mut seq = 0u64;
    let end = c.elapsed() + o.duration;
    while c.elapsed() < end {
        c.run_for(Duration::from_millis(rng.random_range(20..400)));
        let now = c.elapsed();
        if heal_at.is_some_and(|t| now >= t) {
            c.heal();
            heal_at = None;
        }
        if calm_at.is_some_and(|t| now >= t) {
            c.net = NetModel::default();
            calm_at = None;
        }
        let back: Vec<usize> = down.iter().filter(|(_, t)| now >= **t).map(|(i, _)| *i).collect();
        for i in back {
            down.remove(&i);
            c.restart(i, &seeds);
        }
        // The node that stays down is removed by an up node once that one sees it down.
        if let Some(j) = alloc.stay_down
            && let Some(by) = (0..n).find(|&k| c.is_up(k))
        {
            let member = format!("{}@{:016x}", c.nodes[j].name, c.nodes[j].instance);
            match apply(&mut c, by, Command::NodeRm { node: member.clone(), force: false }) {
                Ok(_) => {
                    alloc.stay_down = None;
                    alloc.removed.insert(j, now);
                    alloc.acked.retain(|_, (owner, _)| *owner != j);
                    report.node_rms += 1;
                }
                // Not seen down yet, or this node was removed itself.
                Err(AgentError::NodeAlive(_) | AgentError::Removed(_) | AgentError::NoSuchNode(_)) => {}
                Err(e) => return Err(fail(format!("node rm {member} on node {by}: {e}"))),
            }
        }
        let i = rng.random_range(0..n);
        if !c.is_up(i) {
            continue;
        }
        let stay = usize::from(alloc.stay_down.is_some());
        match rng.random_range(0..100) {
            0..45 => {
                // Write, update or delete one of the node's own keys on a network it is on.
                let mine: Vec<&String> = nets.iter().filter(|id| c.node(i).is_attached(id)).collect();
                let Some(&net) = mine.get(rng.random_range(0..mine.len().max(1))) else { continue };
                let net = net.clone();
                let key = format!("{}/k{}", c.nodes[i].name, rng.random_range(0..6));
                seq += 1;
                let live = c.node(i).get_entry(&net, T, &key).is_some();
                let value = (!live || !seq.is_multiple_of(3)).then(|| Bytes::from(format!("v{seq}")));
                c.write(i, &net, T, &key, value.clone()).map_err(|e| fail(format!("write refused: {e}")))?;
                if value.is_some() {
                    report.writes += 1;
                } else {
                    report.deletes += 1;
                }
            }
            45..60 => {
                let net = nets[rng.random_range(0..nets.len())].clone();
                if c.node(i).is_attached(&net) {
                    if rng.random_bool(0.4) {
                        c.detach(i, &net);
                        report.detaches += 1;
                    }
                } else {
                    c.attach(i, &net);
                    report.attaches += 1;
                }
            }
            60..68 if down.len() + stay + 1 < n / 2 + 1 => {
                // A crash (seeds included), a stop for a restart, a clean leave or a reinstall;
                // back after 1-20 s under a new generation.
                match rng.random_range(0..20) {
                    0..10 => {
                        c.crash(i);
                        report.crashes += 1;
                    }
                    10..14 => {
                        c.stop_restarting(i);
                        report.restarts += 1;
                    }
                    14..17 => {
                        c.leave(i);
                        report.leaves += 1;
                    }
                    17..20 if alloc.stay_down.is_none() && !alloc.removed.contains_key(&i) && n >= 4 => {
                        // Crashed for good: it stays down until another node removes it.
                        c.crash(i);
                        report.crashes += 1;
                        alloc.stay_down = Some(i);
                        continue;
                    }
                    _ => {
                        c.wipe(i);
                        alloc.acked.retain(|_, (owner, _)| *owner != i);
                        // Sometimes the reinstalled host's wall clock is behind.
                        if rng.random_bool(0.5) {
                            c.nodes[i].wall_offset_ms = -rng.random_range(0..3_600_000);
                        }
                        report.wipes += 1;
                    }
                }
                down.insert(i, now + Duration::from_millis(rng.random_range(1000..20_000)));
            }
            68..76 if heal_at.is_none() => {
                let cut = rng.random_range(1..n);
                let mut order: Vec<usize> = (0..n).collect();
                for k in (1..n).rev() {
                    order.swap(k, rng.random_range(0..=k));
                }
                let (a, b) = (order[..cut].to_vec(), order[cut..].to_vec());
                if rng.random_bool(0.5) {
                    c.partition(&[a, b]);
                } else {
                    let (from, to) = (rng.random_range(0..n), rng.random_range(0..n));
                    c.block_one_way(from, to);
                }
                report.partitions += 1;
                heal_at = Some(now + Duration::from_millis(rng.random_range(500..8000)));
            }
            76..84 if calm_at.is_none() => {
                c.net = NetModel {
                    loss: rng.random_range(0.0..0.3),
                    duplicate: rng.random_range(0.0..0.1),
                    reorder: rng.random_range(0.0..0.2),
                    ..NetModel::default()
                };
                calm_at = Some(now + Duration::from_millis(rng.random_range(500..10_000)));
            }
            84..88 => c.set_clock_rate(i, rng.random_range(0.95..1.05)),
            _ => {}
        }
        // The allocation load, on an up node.
        let j = rng.random_range(0..n);
        if c.is_up(j) && rng.random_bool(0.6) {
            alloc_step(&mut c, &mut alloc, &mut report, &mut rng, j).map_err(&fail)?;
        }
        // The watcher contract and durability, all along.
        c.check().map_err(fail)?;
        check_alloc(&c, &alloc).map_err(fail)?;
    }
    // The faults stop: heal, calm the network, bring every node back.
    c.heal();
    c.net = NetModel::default();
    let removed_down = alloc.removed.keys().copied().filter(|&i| c.nodes[i].node.is_none());
    let back: BTreeSet<usize> =
        std::mem::take(&mut down).into_keys().chain(alloc.stay_down.take()).chain(removed_down).collect();
    for i in back {
        c.restart(i, &seeds);
    }
    let stop = c.elapsed();
    let converged = c.run_until(c.now() + limit, |c| {
        c.membership_converged() && c.divergence(&nets).is_none() && c.lost_entry().is_none()
    });
    if !converged {
        return Err(fail(format!(
            "not converged {limit:?} after the faults stopped: membership gap {:?}, divergence {:?}, lost {:?}",
            c.membership_gap_report(),
            c.divergence(&nets),
            c.lost_entry()
        )));
    }
    c.check().map_err(fail)?;
    report.converged_after = c.elapsed() - stop;
    // Creates with an interface still in flight finish, and count as acknowledged.
    c.run_for(Duration::from_secs(2));
    for i in 0..n {
        adopt_sandboxed(&c, &mut alloc, i);
    }
    alloc_end(&mut c, &alloc, limit).map_err(fail)?;
    if !c.run_until(c.now() + limit, |c| check_dataplane(c).is_ok()) {
        check_dataplane(&c).map_err(fail)?;
    }
    if n >= 5 {
        lifecycle(&mut c, &nets[0], &seeds, limit).map_err(fail)?;
        report.lifecycle_checked = true;
    }
    report.trace = c.trace_hash();
    Ok(report)
}

/// The end of the allocation load: every node attached to the addressed network holds exactly
/// the acknowledged endpoints, and removed nodes hold none and allocate nothing.
fn alloc_end(c: &mut AgentCluster, a: &Alloc, limit: Duration) -> Result<(), String> {
    let want: BTreeSet<&String> = a.acked.keys().collect();
    let torn_down = |c: &AgentCluster, i: usize| {
        let agent: &Agent = c.host(i);
        agent.allocator().removed_by().is_some() && agent.allocator().local_endpoints(&a.net).is_empty()
    };
    let agreed = c.run_until(c.now() + limit, |c| {
        a.removed.keys().all(|&i| torn_down(c, i))
            && (0..c.nodes.len()).all(|i| {
                !c.node(i).is_attached(&a.net)
                    || weft_node::read::endpoints(c.host(i), Some(&a.net))
                        .is_ok_and(|seen| seen.iter().map(|e| &e.id).collect::<BTreeSet<_>>() == want)
            })
    });
    check_alloc(c, a)?;
    if let Some(&i) = a.removed.keys().find(|&&i| !torn_down(c, i)) {
        return Err(format!("allocation: removed node {i} came back and did not tear down within {limit:?}"));
    }
    if !agreed {
        let bad = (0..c.nodes.len())
            .find(|&i| {
                c.node(i).is_attached(&a.net)
                    && !weft_node::read::endpoints(c.host(i), Some(&a.net))
                        .is_ok_and(|seen| seen.iter().map(|e| &e.id).collect::<BTreeSet<_>>() == want)
            })
            .unwrap_or(0);
        let seen = weft_node::read::endpoints(c.host(bad), Some(&a.net)).unwrap_or_default();
        let extra: Vec<String> = seen
            .iter()
            .filter(|e| !want.contains(&e.id))
            .map(|e| {
                format!(
                    "{} of {}@{}{}",
                    e.name,
                    e.node,
                    e.instance,
                    if e.sandbox.is_some() { " (with an interface)" } else { "" }
                )
            })
            .collect();
        let ids: BTreeSet<&String> = seen.iter().map(|e| &e.id).collect();
        let missing: Vec<String> = a
            .acked
            .iter()
            .filter(|(id, _)| !ids.contains(id))
            .map(|(id, (i, ip))| format!("{id:.8} ({ip} on node {i})"))
            .collect();
        let removed: Vec<String> = a.removed.keys().map(|i| c.nodes[*i].name.clone()).collect();
        return Err(format!(
            "allocation: node {bad} lists {} endpoints of the addressed network, {} acknowledged (nodes removed: {removed:?}); not acknowledged: {extra:?}; missing: {missing:?}",
            seen.len(),
            want.len()
        ));
    }

    Ok(())
}

/// Live entries `key` at every up node attached to `net` (`want`: live at all of them, or at
/// none); the first node that disagrees.
fn disagrees<H: Host>(c: &Sim<H>, net: &str, key: &str, want: bool) -> Option<usize> {
    c.attached(net).into_iter().find(|&j| c.node(j).get_entry(net, T, key).is_some() != want)
}

/// What node `j` holds of `key` and thinks of its owner, for failure messages.
fn held<H: Host>(c: &Sim<H>, j: Option<usize>, net: &str, key: &str) -> String {
    let Some(j) = j else { return "-".into() };
    let n = c.node(j);
    let entry = n.table(net, T).into_iter().find(|e| e.key == key);
    let owner = entry.as_ref().map(|e| e.owner.clone()).unwrap_or_default();
    let member = n.members().into_iter().find(|m| *m.id.name == *owner).map(|m| (m.id, m.state));
    let peers: Vec<String> = n.network_peers(net).iter().map(|p| p.name.to_string()).collect();
    let attach: Vec<String> = n
        .table(weft_gossip::CLUSTER_NETWORK, weft_gossip::ATTACH_TABLE)
        .into_iter()
        .filter(|e| e.key.starts_with(net))
        .map(|e| format!("{} {} {:?}", e.owner, e.ltime, e.state))
        .collect();
    let members: Vec<String> =
        n.members().iter().map(|m| format!("{:?}={}", m.id, m.state.as_str())).collect();
    format!(
        "node {j}: {:?}, owner {member:?}, {} entries, sweep pending {}, peers {peers:?}, attach {attach:?}, members {members:?}, {:?}",
        entry.map(|e| (e.ltime, e.state)),
        n.entry_count(net),
        n.predecessor_sweep_pending(),
        n.stats()
    )
}

/// The lifecycle epilogue (see the module doc): crash, announced restart, leave, reinstall.
fn lifecycle<H: Host>(c: &mut Sim<H>, net: &str, seeds: &[usize], limit: Duration) -> Result<(), String> {
    let n = c.nodes.len();
    // A seed crashes; the others are the last nodes, so a restart always finds a live seed.
    let (crashed, restarting, leaving, wiped) = (seeds[0], n - 1, n - 2, n - 3);
    let key = |c: &Sim<H>, i: usize| format!("{}/lifecycle", c.nodes[i].name);
    // Every node on the network: the others are what keeps a down node's entries.
    for i in 0..n {
        if !c.node(i).is_attached(net) {
            c.attach(i, net);
        }
    }
    for i in [crashed, restarting, leaving, wiped] {
        let k = key(c, i);
        c.write(i, net, T, &k, Some(Bytes::from_static(b"before")))?;
    }
    let keys: Vec<String> = [crashed, restarting, leaving, wiped].iter().map(|&i| key(c, i)).collect();
    let spread = c.run_until(c.now() + limit, |c| keys.iter().all(|k| disagrees(c, net, k, true).is_none()));
    if !spread {
        return Err("lifecycle: the epilogue's writes did not reach every node".into());
    }
    c.crash(crashed);
    c.stop_restarting(restarting);
    c.leave(leaving);
    c.wipe(wiped);
    // Failure detection has run its course; the restart grace (60 s) has not.
    c.run_for(limit);
    let (kc, kr, kl, kw) = (&keys[0], &keys[1], &keys[2], &keys[3]);
    if let Some(j) = disagrees(c, net, kc, false) {
        return Err(format!("lifecycle: node {j} still shows crashed node {crashed}'s entry live"));
    }
    if let Some(j) = disagrees(c, net, kr, true) {
        return Err(format!(
            "lifecycle: node {j} dropped restarting node {restarting}'s entry within the grace"
        ));
    }
    if let Some(j) = disagrees(c, net, kl, false) {
        return Err(format!("lifecycle: node {j} still shows node {leaving}'s entry after it left"));
    }
    // The restarting node comes back within its grace; the reinstalled one as a new instance,
    // attaching and writing anew.
    c.restart(restarting, seeds);
    c.restart(wiped, seeds);
    c.attach(wiped, net);
    let fresh = format!("{}/new-instance", c.nodes[wiped].name);
    c.write(wiped, net, T, &fresh, Some(Bytes::from_static(b"after")))?;
    // The reinstalled node never knew the crashed one alive (foca's feeds carry only active
    // members): it hides the crashed node's entries once the unknown-owner grace is over.
    let wait = limit + c.cfg.unknown_owner_grace();
    let settled = c.run_until(c.now() + wait, |c| {
        disagrees(c, net, kr, true).is_none()
            && disagrees(c, net, kw, false).is_none()
            && disagrees(c, net, &fresh, true).is_none()
            && disagrees(c, net, kc, false).is_none()
    });
    if !settled {
        return Err(format!(
            "lifecycle: after the restarts: restarting node's entry missing at {}; reinstalled node's \
             old entry live at {}; its new one missing at {}; crashed node's live at {}",
            held(c, disagrees(c, net, kr, true), net, kr),
            held(c, disagrees(c, net, kw, false), net, kw)
                + " / at the reinstalled node: "
                + &held(c, Some(wiped), net, kw),
            held(c, disagrees(c, net, &fresh, true), net, &fresh),
            held(c, disagrees(c, net, kc, false), net, kc)
        ));
    }
    // The crashed node returns: its entries come back everywhere.
    c.restart(crashed, seeds);
    if !c.run_until(c.now() + limit, |c| disagrees(c, net, kc, true).is_none()) {
        return Err(format!(
            "lifecycle: crashed node {crashed} is back but node {:?} does not show its entry",
            disagrees(c, net, kc, true)
        ));
    }
    c.check()
}

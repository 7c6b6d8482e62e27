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
//! (No address or VNI checker yet: the IPAM ring is not wired into the agent.)

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use weft_gossip::Config;

use crate::cluster::{NetModel, Sim, mix};
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
    pub fn counts(&self) -> [(usize, &'static str); 9] {
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

/// Runs one soak; the error names the seed and the first checker that failed.
pub fn soak<H: Host>(o: &SoakOptions) -> Result<SoakReport, String> {
    let n = o.nodes;
    let seed = o.seed;
    let fail = |what: String| format!("soak seed {seed}, {n} nodes: {what}");
    if n < 2 || o.networks == 0 {
        return Err(fail("needs at least 2 nodes and 1 network".into()));
    }
    let cfg = Config::lan(n as u32);
    let limit = bound(&cfg);
    let mut c = Sim::<H>::new(n, seed, cfg, NetModel::default());
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(mix(seed, 0x50a4));
    let seeds: Vec<usize> = (0..n.min(3)).collect();
    let seed_addrs: Vec<_> = seeds.iter().map(|&i| c.nodes[i].addr).collect();
    for i in 0..n {
        c.join(i, &seed_addrs);
    }
    c.run_for(Duration::from_secs(3));
    let nets: Vec<String> = (0..o.networks).map(|k| c.define_network(0, &format!("net{k}"))).collect();
    let mut report = SoakReport { seed, ..SoakReport::default() };
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
        let i = rng.random_range(0..n);
        if !c.is_up(i) {
            continue;
        }
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
            60..68 if down.len() + 1 < n / 2 + 1 => {
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
                    _ => {
                        c.wipe(i);
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
        // The watcher contract and durability, all along.
        c.check().map_err(fail)?;
    }
    // The faults stop: heal, calm the network, bring every node back.
    c.heal();
    c.net = NetModel::default();
    for i in std::mem::take(&mut down).into_keys() {
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
    if n >= 5 {
        lifecycle(&mut c, &nets[0], &seeds, limit).map_err(fail)?;
        report.lifecycle_checked = true;
    }
    report.trace = c.trace_hash();
    Ok(report)
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

//! A deterministic in-memory cluster: many `GossipNode`s, virtual time, a modelled network.
//!
//! One event queue ordered by (virtual time, sequence); every node's RNG seed derives from one
//! master seed; no wall clock. The network delivers datagrams after a random latency, drops
//! them with the configured loss, and drops everything (datagrams and streams) across a
//! partition. Streams model TCP: reliable and ordered per pair, unless partitioned.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use weft_gossip::{
    Config, Event, GossipNode, MemberState, NodeId, ObjectType, TableEvent, TableEventKind, TableSpec,
    Transmit, TransmitKind,
};

/// The network model.
#[derive(Debug, Clone)]
pub struct NetModel {
    pub latency_min: Duration,
    pub latency_max: Duration,
    /// Probability that a datagram is lost.
    pub loss: f64,
}

impl Default for NetModel {
    fn default() -> Self {
        NetModel { latency_min: Duration::from_micros(200), latency_max: Duration::from_millis(2), loss: 0.0 }
    }
}

#[derive(Debug)]
enum Ev {
    Deliver { from: usize, to: usize, kind: TransmitKind, bytes: Bytes },
    Timer { node: usize, at: Instant },
}

/// Bytes and datagrams a node sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    pub datagrams: u64,
    pub datagram_bytes: u64,
    pub streams: u64,
    pub stream_bytes: u64,
}

/// A simulated host: its node (None while crashed) and what it persists across restarts.
#[derive(Debug)]
pub struct SimNode {
    pub name: String,
    pub addr: SocketAddr,
    pub node: Option<GossipNode>,
    pub generation: u64,
    /// The Lamport high-water mark the agent would persist.
    pub persisted_ltime: u64,
    armed: Option<Instant>,
    /// What this node's watcher has seen: (network, table, key) -> value.
    pub watched: BTreeMap<(String, String, String), Bytes>,
    /// Networks the test attached this node to (re-attached after a restart).
    pub networks: BTreeSet<String>,
    pub traffic: Traffic,
    pub left: bool,
}

/// The tables every simulated node registers.
pub const TABLES: [&str; 2] = ["endpoints", "defs"];

/// A cluster under test.
pub struct Cluster {
    pub seed: u64,
    pub cfg: Config,
    pub net: NetModel,
    pub nodes: Vec<SimNode>,
    t0: Instant,
    now: Instant,
    queue: BinaryHeap<Reverse<(Instant, u64, usize)>>,
    pending: HashMap<usize, Ev>,
    seq: u64,
    rng: Xoshiro256PlusPlus,
    by_addr: HashMap<SocketAddr, usize>,
    /// Ordered pairs (from, to) whose traffic is dropped.
    blocked: BTreeSet<(usize, usize)>,
    /// Per ordered pair, the time the last stream frame arrives (TCP keeps order).
    stream_tail: HashMap<(usize, usize), Instant>,
    /// A violation of the watcher contract, if one happened.
    pub watcher_violation: Option<String>,
    /// Table events seen, per node, with their virtual arrival time (when recording).
    pub record: bool,
    pub arrivals: Vec<(usize, Duration, TableEvent)>,
    /// Messages delivered per node: (sender name, data).
    pub messages: Vec<Vec<(String, Bytes)>>,
    /// `NameConflict` events per node.
    pub name_conflicts: Vec<u64>,
    /// Every `MemberDown` any node reported: (observer, virtual time, who).
    pub downs: Vec<(usize, Duration, NodeId)>,
    /// The largest datagram any node sent.
    pub max_datagram: usize,
    /// The largest stream frame any node sent.
    pub max_stream_frame: usize,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("seed", &self.seed).field("nodes", &self.nodes.len()).finish()
    }
}

pub fn mix(seed: u64, i: u64) -> u64 {
    // splitmix64 of (seed, i): independent per-node streams from one master seed.
    let mut z = seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

pub fn sim_addr(i: usize) -> SocketAddr {
    // Loopback-range identifiers; nothing is ever sent to them.
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 1, (i >> 8) as u8, (i & 0xff) as u8), 7946))
}

impl Cluster {
    /// `n` nodes, not yet joined.
    pub fn new(n: usize, seed: u64, cfg: Config, net: NetModel) -> Self {
        // A fixed origin: virtual time is `t0 + offset`, never read from a clock after this.
        #[allow(clippy::disallowed_methods)]
        let t0 = Instant::now();
        let mut c = Cluster {
            seed,
            cfg,
            net,
            nodes: Vec::with_capacity(n),
            t0,
            now: t0,
            queue: BinaryHeap::new(),
            pending: HashMap::new(),
            seq: 0,
            rng: Xoshiro256PlusPlus::seed_from_u64(mix(seed, u64::MAX)),
            by_addr: HashMap::new(),
            blocked: BTreeSet::new(),
            stream_tail: HashMap::new(),
            watcher_violation: None,
            record: false,
            arrivals: Vec::new(),
            messages: vec![Vec::new(); n],
            name_conflicts: vec![0; n],
            downs: Vec::new(),
            max_datagram: 0,
            max_stream_frame: 0,
        };
        for i in 0..n {
            let addr = sim_addr(i);
            c.by_addr.insert(addr, i);
            c.nodes.push(SimNode {
                name: format!("node-{i:04}"),
                addr,
                node: None,
                generation: 0,
                persisted_ltime: 0,
                armed: None,
                watched: BTreeMap::new(),
                networks: BTreeSet::new(),
                traffic: Traffic::default(),
                left: false,
            });
            c.boot(i);
        }
        c
    }

    /// A cluster of `n` nodes that all joined through node 0 and settled.
    pub fn settled(n: usize, seed: u64, cfg: Config, net: NetModel) -> Self {
        let mut c = Cluster::new(n, seed, cfg, net);
        let seeds = [c.nodes[0].addr];
        for i in 0..n {
            c.with(i, |node, now| node.join(now, &seeds).expect("join"));
        }
        c.run_for(Duration::from_secs(5));
        c
    }

    pub fn now(&self) -> Instant {
        self.now
    }

    pub fn elapsed(&self) -> Duration {
        self.now - self.t0
    }

    fn boot(&mut self, i: usize) {
        let s = &mut self.nodes[i];
        s.generation += 1;
        let id = NodeId::new(s.name.as_str(), s.addr, s.generation);
        let seed = mix(self.seed, i as u64 ^ (s.generation << 32));
        let mut node =
            GossipNode::new(self.cfg.clone(), id, seed, s.persisted_ltime, self.now).expect("config");
        for t in TABLES {
            let spec = if t == "defs" {
                TableSpec::cluster(ObjectType::Network)
            } else {
                TableSpec::node_owned(ObjectType::Endpoint)
            };
            node.register_table(t, spec).expect("register");
        }
        s.node = Some(node);
        s.left = false;
        s.armed = None;
        s.watched.clear();
        self.flush(i);
    }

    /// Runs `f` on node `i` at the current virtual time, then sends what it produced.
    pub fn with<R>(&mut self, i: usize, f: impl FnOnce(&mut GossipNode, Instant) -> R) -> R {
        let now = self.now;
        let r = f(self.nodes[i].node.as_mut().expect("node is up"), now);
        self.flush(i);
        r
    }

    pub fn node(&self, i: usize) -> &GossipNode {
        self.nodes[i].node.as_ref().expect("node is up")
    }

    pub fn is_up(&self, i: usize) -> bool {
        self.nodes[i].node.is_some() && !self.nodes[i].left
    }

    fn schedule(&mut self, at: Instant, ev: Ev) {
        self.seq += 1;
        self.pending.insert(self.seq as usize, ev);
        self.queue.push(Reverse((at, self.seq, self.seq as usize)));
    }

    /// Drains node `i`'s outputs: transmits onto the network, events into its watcher model,
    /// and re-arms its timer.
    fn flush(&mut self, i: usize) {
        loop {
            let Some(node) = self.nodes[i].node.as_mut() else { return };
            let t = node.poll_transmit();
            let Some(t) = t else { break };
            self.send(i, t);
        }
        while let Some(ev) = self.nodes[i].node.as_mut().and_then(GossipNode::poll_event) {
            self.observe(i, ev);
        }
        let Some(node) = self.nodes[i].node.as_ref() else { return };
        let (ltime, next) = (node.ltime(), node.poll_timeout());
        self.nodes[i].persisted_ltime = ltime;
        if next != self.nodes[i].armed
            && let Some(at) = next
        {
            self.nodes[i].armed = Some(at);
            self.schedule(at.max(self.now), Ev::Timer { node: i, at });
        }
    }

    fn observe(&mut self, i: usize, ev: Event) {
        let t = match ev {
            Event::Table(t) => t,
            Event::Message { from, data } => {
                self.messages[i].push((from.name.to_string(), data));
                return;
            }
            Event::NameConflict { .. } => {
                self.name_conflicts[i] += 1;
                return;
            }
            Event::MemberDown { id, .. } => {
                self.downs.push((i, self.now - self.t0, id));
                return;
            }
            _ => return,
        };
        let k = (t.network.clone(), t.table.clone(), t.key.clone());
        let seen = self.nodes[i].watched.get(&k).cloned();
        let ok = match t.kind {
            TableEventKind::Create => seen.is_none() && t.prev.is_none() && t.value.is_some(),
            TableEventKind::Update => seen.is_some() && t.prev == seen && t.value.is_some(),
            TableEventKind::Delete => seen.is_some() && t.prev == seen && t.value.is_none(),
        };
        if !ok && self.watcher_violation.is_none() {
            self.watcher_violation = Some(format!(
                "node {i}: {:?} {k:?} prev={:?} but the watcher last saw {:?}",
                t.kind, t.prev, seen
            ));
        }
        match &t.value {
            Some(v) => self.nodes[i].watched.insert(k, v.clone()),
            None => self.nodes[i].watched.remove(&k),
        };
        if self.record {
            self.arrivals.push((i, self.now - self.t0, t));
        }
    }

    fn send(&mut self, from: usize, t: Transmit) {
        let tr = &mut self.nodes[from].traffic;
        match t.kind {
            TransmitKind::Datagram => {
                tr.datagrams += 1;
                tr.datagram_bytes += t.bytes.len() as u64;
                self.max_datagram = self.max_datagram.max(t.bytes.len());
            }
            TransmitKind::Stream => {
                tr.streams += 1;
                tr.stream_bytes += t.bytes.len() as u64;
                self.max_stream_frame = self.max_stream_frame.max(t.bytes.len());
            }
        }
        let Some(&to) = self.by_addr.get(&t.dst) else { return };
        if self.blocked.contains(&(from, to)) {
            return;
        }
        if t.kind == TransmitKind::Datagram && self.net.loss > 0.0 && self.rng.random_bool(self.net.loss) {
            return;
        }
        let lat = self.rng.random_range(self.net.latency_min..=self.net.latency_max);
        let mut at = self.now + lat;
        if t.kind == TransmitKind::Stream {
            let tail = self.stream_tail.entry((from, to)).or_insert(at);
            at = at.max(*tail);
            *tail = at;
        }
        self.schedule(at, Ev::Deliver { from, to, kind: t.kind, bytes: t.bytes });
    }

    /// Advances virtual time by `d`, processing everything due.
    pub fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        self.run_until(end, |_| false);
    }

    /// Runs until `stop(self)` holds (checked after every event) or `end`; returns whether
    /// `stop` held.
    pub fn run_until(&mut self, end: Instant, mut stop: impl FnMut(&Cluster) -> bool) -> bool {
        while let Some(Reverse((at, _, key))) = self.queue.peek().copied() {
            if at > end {
                break;
            }
            self.queue.pop();
            self.now = self.now.max(at);
            let ev = self.pending.remove(&key).expect("scheduled");
            match ev {
                Ev::Deliver { from, to, kind, bytes } => {
                    if self.blocked.contains(&(from, to)) {
                        continue;
                    }
                    let src = self.nodes[from].addr;
                    let now = self.now;
                    let Some(node) = self.nodes[to].node.as_mut() else { continue };
                    match kind {
                        TransmitKind::Datagram => node.handle_datagram(now, src, &bytes),
                        TransmitKind::Stream => node.handle_stream(now, src, &bytes),
                    }
                    self.flush(to);
                }
                Ev::Timer { node: i, at } => {
                    if self.nodes[i].armed != Some(at) {
                        continue;
                    }
                    self.nodes[i].armed = None;
                    let now = self.now;
                    let Some(node) = self.nodes[i].node.as_mut() else { continue };
                    node.handle_timeout(now);
                    self.flush(i);
                }
            }
            if stop(self) {
                return true;
            }
        }
        self.now = self.now.max(end);
        stop(self)
    }

    // ----- faults --------------------------------------------------------------------------

    /// Drops all traffic between the groups (two-way).
    pub fn partition(&mut self, groups: &[Vec<usize>]) {
        for (a, ga) in groups.iter().enumerate() {
            for gb in &groups[a + 1..] {
                for &x in ga {
                    for &y in gb {
                        self.blocked.insert((x, y));
                        self.blocked.insert((y, x));
                    }
                }
            }
        }
    }

    /// Drops traffic from `from` to `to` only.
    pub fn block_one_way(&mut self, from: usize, to: usize) {
        self.blocked.insert((from, to));
    }

    pub fn heal(&mut self) {
        self.blocked.clear();
    }

    /// Crashes node `i`: its state is gone except what it persisted.
    pub fn crash(&mut self, i: usize) {
        self.nodes[i].node = None;
        self.nodes[i].armed = None;
    }

    /// Restarts node `i` under its name with a new generation and its persisted clock, joins
    /// it through `seeds` and re-attaches the networks it had.
    pub fn restart(&mut self, i: usize, seeds: &[usize]) {
        self.boot(i);
        let seeds: Vec<SocketAddr> = seeds.iter().map(|&s| self.nodes[s].addr).collect();
        let nets: Vec<String> = self.nodes[i].networks.iter().cloned().collect();
        self.with(i, |n, now| {
            n.join(now, &seeds).expect("join");
            for net in &nets {
                n.join_network(now, net).expect("attach");
            }
        });
    }

    /// Node `i` leaves cleanly.
    pub fn leave(&mut self, i: usize) {
        self.with(i, |n, now| n.leave(now).expect("leave"));
        self.nodes[i].left = true;
    }

    pub fn attach(&mut self, i: usize, network: &str) {
        self.nodes[i].networks.insert(network.to_string());
        self.with(i, |n, now| n.join_network(now, network).expect("attach"));
    }

    pub fn detach(&mut self, i: usize, network: &str) {
        self.nodes[i].networks.remove(network);
        self.with(i, |n, now| n.leave_network(now, network).expect("detach"));
    }

    // ----- views ---------------------------------------------------------------------------

    /// Live entries of a table as node `i` holds them: key -> (value, owner).
    pub fn live(&self, i: usize, network: &str, table: &str) -> BTreeMap<String, (Bytes, String)> {
        let mut out = BTreeMap::new();
        self.node(i).walk(network, table, |k, v, o| {
            out.insert(k.to_string(), (v.clone(), o.to_string()));
            true
        });
        out
    }

    /// Nodes up and attached to `network`.
    pub fn attached(&self, network: &str) -> Vec<usize> {
        (0..self.nodes.len()).filter(|&i| self.is_up(i) && self.node(i).is_attached(network)).collect()
    }

    /// Whether every up node sees every other up node alive.
    pub fn membership_converged(&self) -> bool {
        self.membership_gap().is_none()
    }

    /// The first up node `i` that does not see up node `j`'s current identity alive.
    pub fn membership_gap(&self) -> Option<(usize, usize)> {
        let up: Vec<usize> = (0..self.nodes.len()).filter(|&i| self.is_up(i)).collect();
        up.iter().find_map(|&i| {
            let ms = self.node(i).members();
            up.iter()
                .find(|&&j| {
                    let id = self.node(j).id();
                    !ms.iter()
                        .any(|m| m.id == *id && matches!(m.state, MemberState::Alive | MemberState::Suspect))
                })
                .map(|&j| (i, j))
        })
    }

    /// Each up node's view of the members, for failure messages.
    pub fn membership_report(&self) -> String {
        let mut out = String::new();
        for i in (0..self.nodes.len()).filter(|&i| self.is_up(i)) {
            let n = self.node(i);
            let view: Vec<String> =
                n.members().iter().map(|m| format!("{:?}={}", m.id, m.state.as_str())).collect();
            out.push_str(&format!(
                "\n  node {i} ({:?}, connected {}): {}",
                n.id(),
                n.is_connected(),
                view.join(" ")
            ));
        }
        out
    }

    /// The first network/table where two attached nodes disagree on live entries, if any.
    pub fn divergence(&self, networks: &[String]) -> Option<String> {
        for net in networks {
            let nodes = self.attached(net);
            let Some(&first) = nodes.first() else { continue };
            for t in TABLES {
                let want = self.live(first, net, t);
                for &j in &nodes[1..] {
                    let got = self.live(j, net, t);
                    if got != want {
                        let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).take(3).collect();
                        let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).take(3).collect();
                        return Some(format!(
                            "{net}/{t}: node {first} has {} live, node {j} has {} (missing {missing:?}, extra {extra:?})",
                            want.len(),
                            got.len()
                        ));
                    }
                }
            }
        }
        None
    }
}

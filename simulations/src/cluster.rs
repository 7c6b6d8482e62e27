//! A deterministic in-memory cluster: many sans-IO hosts, virtual time, a modelled network.
//!
//! One event queue ordered by (virtual time, sequence); every node's RNG seed derives from one
//! master seed; no wall clock. The network delivers datagrams after a random latency, loses,
//! duplicates and delays some of them as configured, and drops everything (datagrams and
//! streams) across a partition. Streams model TCP: reliable and ordered per pair, unless
//! partitioned. Each node may run its clock at its own rate. Every delivery and timer is folded
//! into a trace hash, so two runs can be compared byte for byte.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use weft_gossip::wire::{self, FrameType};
use weft_gossip::{
    CLUSTER_NETWORK, Config, Event, GossipNode, NodeId, TableEvent, TableEventKind, Transmit, TransmitKind,
};
use weft_node::persist::{self, PersistBatch};
use xxhash_rust::xxh3::xxh3_64;

use crate::host::{Host, TABLES};

/// The network model.
#[derive(Debug, Clone, PartialEq)]
pub struct NetModel {
    /// Datagram and stream latency, uniform in `latency_min..=latency_max`.
    pub latency_min: Duration,
    pub latency_max: Duration,
    /// Probability that a datagram is lost.
    pub loss: f64,
    /// Probability that a datagram is delivered twice (the copy after its own latency).
    pub duplicate: f64,
    /// Probability that a datagram is held back by up to `reorder_delay` more, so it arrives
    /// behind later ones (uniform latency already reorders a little).
    pub reorder: f64,
    pub reorder_delay: Duration,
}

impl Default for NetModel {
    fn default() -> Self {
        NetModel {
            latency_min: Duration::from_micros(200),
            latency_max: Duration::from_millis(2),
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            reorder_delay: Duration::from_millis(20),
        }
    }
}

impl NetModel {
    /// The default LAN with datagram loss `loss`.
    pub fn lossy(loss: f64) -> Self {
        NetModel { loss, ..NetModel::default() }
    }
}

#[derive(Debug)]
enum Ev {
    Deliver {
        from: usize,
        to: usize,
        kind: TransmitKind,
        bytes: Bytes,
    },
    Timer {
        node: usize,
        at: Instant,
    },
    /// A persist batch of life `life` of a node reaches its disk (lost if that life crashed
    /// first).
    Persisted {
        node: usize,
        life: u64,
        batch: weft_node::persist::PersistBatch,
    },
}

/// How long a simulated disk takes to make a batch durable.
const DISK_LATENCY: Duration = Duration::from_millis(2);

/// One queued event, ordered by (time, sequence) only.
#[derive(Debug)]
struct Scheduled {
    at: Instant,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Scheduled {}

impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// Bytes and datagrams a node sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    pub datagrams: u64,
    pub datagram_bytes: u64,
    pub streams: u64,
    pub stream_bytes: u64,
}

impl Traffic {
    fn add(&mut self, kind: TransmitKind, len: usize) {
        match kind {
            TransmitKind::Datagram => {
                self.datagrams += 1;
                self.datagram_bytes += len as u64;
            }
            TransmitKind::Stream => {
                self.streams += 1;
                self.stream_bytes += len as u64;
            }
        }
    }

    pub fn messages(&self) -> u64 {
        self.datagrams + self.streams
    }

    pub fn bytes(&self) -> u64 {
        self.datagram_bytes + self.stream_bytes
    }

    /// What was sent between `earlier` and this reading.
    pub fn since(&self, earlier: &Traffic) -> Traffic {
        Traffic {
            datagrams: self.datagrams - earlier.datagrams,
            datagram_bytes: self.datagram_bytes - earlier.datagram_bytes,
            streams: self.streams - earlier.streams,
            stream_bytes: self.stream_bytes - earlier.stream_bytes,
        }
    }
}

/// What the engine processed, by kind (for cost breakdowns).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Work {
    pub swim_datagrams: u64,
    pub gossip_datagrams: u64,
    pub stream_frames: u64,
    pub timers: u64,
    /// Datagrams the network model lost, duplicated, or dropped across a partition.
    pub lost: u64,
    pub duplicated: u64,
    pub blocked: u64,
}

/// The watcher model of one node: for each (network, table, key) it saw a live value for, a
/// hash of that value. Hashes, not copies: a 2,000-node run holds millions of them.
#[derive(Debug, Default)]
pub struct Watched(HashMap<u64, u64>);

impl Watched {
    fn key(network: &str, table: &str, key: &str) -> u64 {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for part in [network, table, key] {
            h.update(part.as_bytes());
            h.update(&[0]);
        }
        h.digest()
    }

    /// Whether the watcher holds a live value for the key.
    pub fn saw(&self, network: &str, table: &str, key: &str) -> bool {
        self.0.contains_key(&Self::key(network, table, key))
    }

    /// Whether the live value the watcher holds for the key is `value`.
    pub fn holds(&self, network: &str, table: &str, key: &str, value: &[u8]) -> bool {
        self.0.get(&Self::key(network, table, key)) == Some(&xxh3_64(value))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A simulated host: its sans-IO host (None while crashed) and what it persists across
/// restarts.
#[derive(Debug)]
pub struct SimNode<H> {
    pub name: String,
    pub addr: SocketAddr,
    pub node: Option<H>,
    /// Lives of this host so far (every boot is one): the durability ledger holds a node to
    /// the writes of the life that acknowledged them.
    pub generation: u64,
    /// The instance id of its data dir (a new one when the data dir is wiped).
    pub instance: u64,
    /// The identity generation the agent would persist: each boot takes `max(persisted + 1,
    /// wall-clock ms)`, and the agent raises it when it moves above an earlier life.
    pub persisted_generation: u64,
    /// How far this host's wall clock is from the simulation's (negative: behind), in ms. A
    /// host's wall clock may step back between two lives.
    pub wall_offset_ms: i64,
    /// The Lamport high-water mark the agent would persist.
    pub persisted_ltime: u64,
    /// Whether the agent would persist that an earlier instance's entries are still to delete.
    pub persisted_sweep: bool,
    /// Everything the agent's store holds (the allocator's keys with the rest): what a boot
    /// reads back.
    pub disk: BTreeMap<String, Vec<u8>>,
    /// Batches handed to the disk and not durable yet (a crash loses them; a graceful stop
    /// waits for them).
    pub in_flight: Vec<PersistBatch>,
    /// The host crashed (or was wiped) since its last boot: its disk writes in flight are lost.
    pub crashed: bool,
    /// The host's data plane (its kernel's state): it outlives the agent, as namespaces and
    /// devices do; a reinstall clears it.
    pub dataplane: weft_overlay::MemDataplane,
    /// Global virtual time of the timer armed on the queue.
    armed: Option<Instant>,
    /// What this node's watcher has seen.
    pub watched: Watched,
    /// Networks the test attached this node to (re-attached after a restart).
    pub networks: BTreeSet<String>,
    pub traffic: Traffic,
    pub left: bool,
    /// This node's clock: it read `clock.1` at virtual time `clock.0` and runs at `clock.2`
    /// times virtual time (1.0: exactly).
    clock: (Instant, Instant, f64),
}

/// The last write a node acknowledged on one key, as the durability checker keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Acked {
    pub owner: usize,
    /// The owner's life ([`SimNode::generation`]) when it acknowledged the write: a crash
    /// loses what the node did not persist, so only the same life is held to it.
    pub generation: u64,
    /// What was written; `None` for a delete.
    pub value: Option<Bytes>,
    /// Written by more than one node: which version wins is the merge order's business, not
    /// durability's, so the key is no longer checked.
    pub contested: bool,
    /// The owner detached from the network since: its entries went with it until it writes
    /// again.
    pub detached: bool,
}

/// A cluster under test, generic over what runs on each host.
pub struct Sim<H> {
    pub seed: u64,
    pub cfg: Config,
    pub net: NetModel,
    pub nodes: Vec<SimNode<H>>,
    t0: Instant,
    now: Instant,
    queue: BinaryHeap<Reverse<Scheduled>>,
    seq: u64,
    rng: Xoshiro256PlusPlus,
    by_addr: HashMap<SocketAddr, usize>,
    /// Ordered pairs (from, to) whose traffic is dropped.
    blocked: HashSet<(usize, usize)>,
    /// Per ordered pair, the time the last stream frame arrives (TCP keeps order).
    stream_tail: HashMap<(usize, usize), Instant>,
    /// A violation of the watcher contract, if one happened.
    pub watcher_violation: Option<String>,
    /// The durability checker's ledger: per (network, table, key), the last write a node
    /// acknowledged (see [`check`](Self::check)).
    pub acked: BTreeMap<(String, String, String), Acked>,
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
    /// Bytes sent per second of virtual time, cluster-wide: (datagram bytes, stream bytes,
    /// messages), indexed by second.
    pub per_second: Vec<(u64, u64, u64)>,
    pub work: Work,
    /// Networks defined through [`define_network`](Self::define_network): name -> id.
    pub nets: BTreeMap<String, String>,
    trace: u64,
}

/// The gossip core on every host: the core's own cross-node tests.
pub type Cluster = Sim<GossipNode>;
/// The agent that ships on every host: the scenarios.
pub type AgentCluster = Sim<weft_node::Agent>;

impl<H> std::fmt::Debug for Sim<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim").field("seed", &self.seed).field("nodes", &self.nodes.len()).finish()
    }
}

/// splitmix64 of (seed, i): independent per-node streams from one master seed.
pub fn mix(seed: u64, i: u64) -> u64 {
    let mut z = seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The gossip address of simulated node `i`: loopback-range identifiers nothing is sent to.
pub fn sim_addr(i: usize) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(127, (1 + (i >> 16)) as u8, (i >> 8) as u8, i as u8),
        7946,
    ))
}

impl<H: Host> Sim<H> {
    /// `n` nodes, not yet joined.
    pub fn new(n: usize, seed: u64, cfg: Config, net: NetModel) -> Self {
        // A fixed origin: virtual time is `t0 + offset`, never read from a clock after this.
        #[allow(clippy::disallowed_methods)]
        let t0 = Instant::now();
        let mut c = Sim {
            seed,
            cfg,
            net,
            nodes: Vec::with_capacity(n),
            t0,
            now: t0,
            queue: BinaryHeap::new(),
            seq: 0,
            rng: Xoshiro256PlusPlus::seed_from_u64(mix(seed, u64::MAX)),
            by_addr: HashMap::new(),
            blocked: HashSet::new(),
            stream_tail: HashMap::new(),
            watcher_violation: None,
            acked: BTreeMap::new(),
            record: false,
            arrivals: Vec::new(),
            messages: vec![Vec::new(); n],
            name_conflicts: vec![0; n],
            downs: Vec::new(),
            max_datagram: 0,
            max_stream_frame: 0,
            per_second: Vec::new(),
            work: Work::default(),
            nets: BTreeMap::new(),
            trace: seed,
        };
        for i in 0..n {
            let addr = sim_addr(i);
            c.by_addr.insert(addr, i);
            c.nodes.push(SimNode {
                name: format!("node-{i:04}"),
                addr,
                node: None,
                generation: 0,
                instance: mix(seed, 0x1457 ^ i as u64) | 1,
                persisted_generation: 0,
                wall_offset_ms: 0,
                persisted_ltime: 0,
                persisted_sweep: true,
                disk: BTreeMap::new(),
                dataplane: weft_overlay::MemDataplane::new(),
                in_flight: Vec::new(),
                crashed: false,
                armed: None,
                watched: Watched::default(),
                networks: BTreeSet::new(),
                traffic: Traffic::default(),
                left: false,
                clock: (t0, t0, 1.0),
            });
            c.boot(i);
        }
        c
    }

    /// A cluster of `n` nodes that all joined through node 0, run for 5 s.
    pub fn settled(n: usize, seed: u64, cfg: Config, net: NetModel) -> Self {
        let mut c = Self::new(n, seed, cfg, net);
        let seeds = [c.nodes[0].addr];
        for i in 0..n {
            c.join(i, &seeds);
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

    /// Datagrams sent and not delivered yet.
    pub fn in_flight_datagrams(&self) -> u64 {
        self.queue
            .iter()
            .filter(|Reverse(s)| matches!(s.ev, Ev::Deliver { kind: TransmitKind::Datagram, .. }))
            .count() as u64
    }

    /// A hash of everything delivered and every timer fired so far, in order.
    pub fn trace_hash(&self) -> u64 {
        self.trace
    }

    fn fold(&mut self, x: u64) {
        self.trace = mix(self.trace, x);
    }

    /// Node `i`'s clock reading at virtual time `t`.
    fn local_at(&self, i: usize, t: Instant) -> Instant {
        let (g0, l0, rate) = self.nodes[i].clock;
        if rate == 1.0 { l0 + (t - g0) } else { l0 + (t - g0).mul_f64(rate) }
    }

    /// Node `i`'s clock reading now.
    fn local(&self, i: usize) -> Instant {
        self.local_at(i, self.now)
    }

    /// The virtual time at which node `i`'s clock reads `at` (never before it does).
    fn global(&self, i: usize, at: Instant) -> Instant {
        let (g0, l0, rate) = self.nodes[i].clock;
        if rate == 1.0 {
            return g0 + at.saturating_duration_since(l0);
        }
        let mut g = g0 + at.saturating_duration_since(l0).div_f64(rate);
        while self.local_at(i, g) < at {
            g += Duration::from_nanos(1);
        }
        g
    }

    /// Makes node `i`'s clock run at `rate` times virtual time from now on. Its reading stays
    /// continuous, so a change never moves it backwards.
    pub fn set_clock_rate(&mut self, i: usize, rate: f64) {
        assert!(rate > 0.1 && rate < 10.0, "clock rate {rate} out of range");
        let reading = self.local(i);
        self.nodes[i].clock = (self.now, reading, rate);
        // The armed timer's virtual time moved with the rate.
        self.nodes[i].armed = None;
        self.flush(i);
    }

    /// Node `i`'s clock rate against virtual time.
    pub fn clock_rate(&self, i: usize) -> f64 {
        self.nodes[i].clock.2
    }

    /// Host `i`'s wall clock, in ms since the epoch (the simulation starts in late 2023).
    pub fn wall_ms(&self, i: usize) -> u64 {
        const START_MS: i64 = 1_700_000_000_000;
        let ms = START_MS + self.elapsed().as_millis() as i64 + self.nodes[i].wall_offset_ms;
        ms.max(0) as u64
    }

    fn boot(&mut self, i: usize) {
        let now = self.local(i);
        let wall = self.wall_ms(i);
        let s = &mut self.nodes[i];
        s.generation += 1;
        s.persisted_generation = (s.persisted_generation + 1).max(wall);
        let id = NodeId::new(s.name.as_str(), s.addr, s.persisted_generation).with_instance(s.instance);
        let seed = mix(self.seed, i as u64 ^ (s.generation << 32));
        let mut node = H::boot(&self.cfg, id, seed, s.persisted_ltime, &s.disk, now);
        node.set_predecessor_sweep(s.persisted_sweep);
        s.node = Some(node);
        s.crashed = false;
        s.left = false;
        s.armed = None;
        s.watched.0.clear();
        self.flush(i);
    }

    /// Runs `f` on node `i` at its clock's current reading, then sends what it produced.
    pub fn with<R>(&mut self, i: usize, f: impl FnOnce(&mut H, Instant) -> R) -> R {
        let now = self.local(i);
        let r = f(self.nodes[i].node.as_mut().expect("node is up"), now);
        self.flush(i);
        r
    }

    /// Node `i`'s host.
    pub fn host(&self, i: usize) -> &H {
        self.nodes[i].node.as_ref().expect("node is up")
    }

    /// Live entries of a table at node `i`: what its reads and watchers see (not tombstones,
    /// not entries hidden while their owner is failed).
    pub fn live_len(&self, i: usize, network: &str, table: &str) -> usize {
        let mut n = 0;
        self.node(i).walk(network, table, |_, _, _| {
            n += 1;
            true
        });
        n
    }

    /// Node `i`'s gossip core, for reads.
    pub fn node(&self, i: usize) -> &GossipNode {
        self.host(i).core()
    }

    pub fn is_up(&self, i: usize) -> bool {
        self.nodes[i].node.is_some() && !self.nodes[i].left
    }

    fn schedule(&mut self, at: Instant, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse(Scheduled { at, seq: self.seq, ev }));
    }

    /// Drains node `i`'s outputs: transmits onto the network, events into its watcher model,
    /// and re-arms its timer.
    fn flush(&mut self, i: usize) {
        let now = self.local(i);
        let s = &mut self.nodes[i];
        if let Some(n) = s.node.as_mut() {
            n.apply_dataplane(now, &mut s.dataplane);
        }
        loop {
            let Some(node) = self.nodes[i].node.as_mut() else { return };
            let Some(t) = node.poll_transmit() else { break };
            self.send(i, t);
        }
        let now = self.local(i);
        while let Some(ev) = self.nodes[i].node.as_mut().and_then(|n| n.poll_event(now)) {
            self.observe(i, ev);
        }
        let mut batches = Vec::new();
        while let Some(b) = self.nodes[i].node.as_mut().and_then(H::poll_persist) {
            batches.push(b);
        }
        for batch in batches {
            let life = self.nodes[i].generation;
            self.nodes[i].in_flight.push(batch.clone());
            self.schedule(self.now + DISK_LATENCY, Ev::Persisted { node: i, life, batch });
        }
        let Some(node) = self.nodes[i].node.as_ref() else { return };
        let next = node.poll_timeout();
        if !H::PERSISTS {
            // A host without a store is taken to persist at once.
            let (ltime, generation) = (node.core().ltime(), node.core().id().generation);
            let sweep = node.core().predecessor_sweep_pending();
            let s = &mut self.nodes[i];
            s.persisted_ltime = ltime;
            s.persisted_sweep = sweep;
            s.persisted_generation = s.persisted_generation.max(generation);
        }
        let next = next.map(|at| self.global(i, at));
        if next != self.nodes[i].armed
            && let Some(at) = next
        {
            self.nodes[i].armed = Some(at);
            self.schedule(at.max(self.now), Ev::Timer { node: i, at });
        }
    }

    /// Writes node `i`'s in-flight batches up to `seq` to its disk; false if none was left
    /// (a graceful stop landed them already).
    fn land(&mut self, i: usize, seq: u64) -> bool {
        let s = &mut self.nodes[i];
        let (done, rest): (Vec<PersistBatch>, Vec<PersistBatch>) =
            std::mem::take(&mut s.in_flight).into_iter().partition(|b| b.seq <= seq);
        s.in_flight = rest;
        let landed = !done.is_empty();
        for batch in done {
            for (k, v) in batch.ops {
                let n = v.as_deref().and_then(|v| std::str::from_utf8(v).ok()?.parse::<u64>().ok());
                match (k.as_str(), n) {
                    (persist::KEY_LTIME, Some(n)) => s.persisted_ltime = n,
                    (persist::KEY_GENERATION, Some(n)) => {
                        s.persisted_generation = s.persisted_generation.max(n)
                    }
                    (persist::KEY_SWEEP, Some(n)) => s.persisted_sweep = n != 0,
                    _ => {}
                }
                match v {
                    Some(v) => s.disk.insert(k, v),
                    None => s.disk.remove(&k),
                };
            }
        }
        landed
    }

    /// A graceful stop waits for the store (as the shell's `settle`): what was in flight lands
    /// and what waited for it goes out, then the process is gone. Also what a command run with
    /// `apply` waits for before its caller counts it acknowledged (the shell replies only once
    /// the batch carrying the change is durable).
    pub fn settle(&mut self, i: usize) {
        // Landing a batch may release outputs that stage another: until nothing is in flight.
        for _ in 0..16 {
            let Some(last) = self.nodes[i].in_flight.last().map(|b| b.seq) else { return };
            self.land(i, last);
            let now = self.local(i);
            if let Some(node) = self.nodes[i].node.as_mut() {
                node.handle_persisted(now, last);
            }
            self.flush(i);
        }
        self.nodes[i].in_flight.clear();
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
        let k = Watched::key(&t.network, &t.table, &t.key);
        let seen = self.nodes[i].watched.0.get(&k).copied();
        let prev = t.prev.as_deref().map(xxh3_64);
        let ok = match t.kind {
            TableEventKind::Create => seen.is_none() && prev.is_none() && t.value.is_some(),
            TableEventKind::Update => seen.is_some() && prev == seen && t.value.is_some(),
            TableEventKind::Delete => seen.is_some() && prev == seen && t.value.is_none(),
        };
        if !ok && self.watcher_violation.is_none() {
            let what = if seen.is_some() { "another value" } else { "nothing" };
            self.watcher_violation = Some(format!(
                "seed {}: node {i}: {:?} {}/{}/{} prev={:?} but the watcher last saw {what}",
                self.seed, t.kind, t.network, t.table, t.key, t.prev
            ));
        }
        match &t.value {
            Some(v) => self.nodes[i].watched.0.insert(k, xxh3_64(v)),
            None => self.nodes[i].watched.0.remove(&k),
        };
        if self.record {
            self.arrivals.push((i, self.now - self.t0, t));
        }
    }

    fn account(&mut self, from: usize, kind: TransmitKind, len: usize) {
        self.nodes[from].traffic.add(kind, len);
        let sec = (self.now - self.t0).as_secs() as usize;
        if self.per_second.len() <= sec {
            self.per_second.resize(sec + 1, (0, 0, 0));
        }
        let slot = &mut self.per_second[sec];
        match kind {
            TransmitKind::Datagram => {
                slot.0 += len as u64;
                self.max_datagram = self.max_datagram.max(len);
            }
            TransmitKind::Stream => {
                slot.1 += len as u64;
                self.max_stream_frame = self.max_stream_frame.max(len);
            }
        }
        slot.2 += 1;
    }

    fn send(&mut self, from: usize, t: Transmit) {
        self.account(from, t.kind, t.bytes.len());
        let Some(&to) = self.by_addr.get(&t.dst) else { return };
        if self.blocked.contains(&(from, to)) {
            self.work.blocked += 1;
            return;
        }
        let lat = self.rng.random_range(self.net.latency_min..=self.net.latency_max);
        let mut at = self.now + lat;
        if t.kind == TransmitKind::Stream {
            let tail = self.stream_tail.entry((from, to)).or_insert(at);
            at = at.max(*tail);
            *tail = at;
            self.schedule(at, Ev::Deliver { from, to, kind: t.kind, bytes: t.bytes });
            return;
        }
        if self.net.loss > 0.0 && self.rng.random_bool(self.net.loss) {
            self.work.lost += 1;
            return;
        }
        if self.net.reorder > 0.0 && self.rng.random_bool(self.net.reorder) {
            at += self.rng.random_range(Duration::ZERO..=self.net.reorder_delay);
        }
        if self.net.duplicate > 0.0 && self.rng.random_bool(self.net.duplicate) {
            self.work.duplicated += 1;
            let again = self.now + self.rng.random_range(self.net.latency_min..=self.net.latency_max);
            self.schedule(again, Ev::Deliver { from, to, kind: t.kind, bytes: t.bytes.clone() });
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
    pub fn run_until(&mut self, end: Instant, mut stop: impl FnMut(&Self) -> bool) -> bool {
        while self.queue.peek().is_some_and(|Reverse(s)| s.at <= end) {
            let Some(Reverse(Scheduled { at, ev, .. })) = self.queue.pop() else { break };
            self.now = self.now.max(at);
            let stamp = (self.now - self.t0).as_nanos() as u64;
            match ev {
                Ev::Deliver { from, to, kind, bytes } => {
                    if self.blocked.contains(&(from, to)) {
                        self.work.blocked += 1;
                        continue;
                    }
                    self.fold(stamp ^ ((from as u64) << 32) ^ to as u64);
                    self.fold(xxh3_64(&bytes));
                    let src = self.nodes[from].addr;
                    let now = self.local(to);
                    let Some(node) = self.nodes[to].node.as_mut() else { continue };
                    match kind {
                        TransmitKind::Datagram => {
                            if wire::open_envelope(&bytes).is_ok_and(|(ty, _)| ty == FrameType::Swim) {
                                self.work.swim_datagrams += 1;
                            } else {
                                self.work.gossip_datagrams += 1;
                            }
                            node.handle_datagram(now, src, &bytes)
                        }
                        TransmitKind::Stream => {
                            self.work.stream_frames += 1;
                            node.handle_stream(now, src, &bytes)
                        }
                    }
                    self.flush(to);
                }
                Ev::Persisted { node: i, life, batch } => {
                    // A crash loses what was not durable yet; a graceful stop lets it land.
                    if self.nodes[i].generation != life || self.nodes[i].crashed {
                        continue;
                    }
                    self.fold(stamp ^ (i as u64) << 44 ^ batch.seq);
                    if !self.land(i, batch.seq) {
                        continue;
                    }
                    let now = self.local(i);
                    if let Some(node) = self.nodes[i].node.as_mut() {
                        node.handle_persisted(now, batch.seq);
                    }
                    self.flush(i);
                }
                Ev::Timer { node: i, at } => {
                    if self.nodes[i].armed != Some(at) {
                        continue;
                    }
                    self.nodes[i].armed = None;
                    self.fold(stamp ^ (i as u64) << 40);
                    self.work.timers += 1;
                    let now = self.local(i);
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

    // ----- commands --------------------------------------------------------------------------

    /// Node `i` joins through `seeds` (gossip addresses).
    pub fn join(&mut self, i: usize, seeds: &[SocketAddr]) {
        self.with(i, |n, now| n.join(now, seeds)).expect("join");
    }

    /// Node `i` leaves cleanly.
    pub fn leave(&mut self, i: usize) {
        self.with(i, |n, now| n.leave(now)).expect("leave");
        self.settle(i);
        self.nodes[i].left = true;
    }

    /// Node `i` stops for a restart (SIGTERM): it announces it, then its process is gone; its
    /// persisted state stays.
    pub fn stop_restarting(&mut self, i: usize) {
        self.with(i, |n, now| n.stop_restarting(now)).expect("stop");
        self.settle(i);
        self.nodes[i].node = None;
        self.nodes[i].armed = None;
    }

    /// Node `i` defines network `name` (and attaches to it); returns its id, also kept in
    /// [`nets`](Self::nets).
    pub fn define_network(&mut self, i: usize, name: &str) -> String {
        let id = self.with(i, |n, now| n.define_network(now, name)).expect("define network");
        self.nodes[i].networks.insert(id.clone());
        self.nets.insert(name.to_string(), id.clone());
        id
    }

    /// The id of a network defined with [`define_network`](Self::define_network).
    pub fn net(&self, name: &str) -> String {
        self.nets.get(name).cloned().unwrap_or_else(|| panic!("network {name} was never defined"))
    }

    pub fn attach(&mut self, i: usize, network: &str) {
        self.nodes[i].networks.insert(network.to_string());
        self.with(i, |n, now| n.attach(now, network)).expect("attach");
    }

    pub fn detach(&mut self, i: usize, network: &str) {
        self.nodes[i].networks.remove(network);
        self.with(i, |n, now| n.detach(now, network)).expect("detach");
        for ((net, _, _), a) in self.acked.iter_mut() {
            if a.owner == i && net == network {
                a.detached = true;
            }
        }
    }

    /// Node `i` writes `value` under `key` (create or update; `None` deletes).
    pub fn write(
        &mut self,
        i: usize,
        network: &str,
        table: &str,
        key: &str,
        value: Option<Bytes>,
    ) -> Result<(), String> {
        let written = value.clone();
        self.with(i, |n, now| n.write(now, network, table, key, value))?;
        let generation = self.nodes[i].generation;
        let k = (network.to_string(), table.to_string(), key.to_string());
        let fresh = Acked { owner: i, generation, value: written, contested: false, detached: false };
        match self.acked.get_mut(&k) {
            Some(a) => *a = Acked { contested: a.contested || a.owner != i, ..fresh },
            None => {
                self.acked.insert(k, fresh);
            }
        }
        Ok(())
    }

    /// The acknowledged writes the checkers hold nodes to: not contested, not detached from,
    /// and written by an owner that is up in the same life.
    fn checkable(&self) -> impl Iterator<Item = (&(String, String, String), &Acked)> + '_ {
        self.acked.iter().filter(|(_, a)| {
            !a.contested
                && !a.detached
                && self.is_up(a.owner)
                && self.nodes[a.owner].generation == a.generation
        })
    }

    /// The checkers every scenario runs alongside: the watcher contract (every node's table
    /// events form create, updates, delete, `prev` being what it reported last) and
    /// durability (an owner, up since, holds every write it acknowledged, as written). The
    /// error names the seed.
    pub fn check(&self) -> Result<(), String> {
        if let Some(v) = &self.watcher_violation {
            return Err(format!("watcher contract broken: {v}"));
        }
        for ((net, table, key), a) in self.checkable() {
            let got = self.node(a.owner).get_entry(net, table, key);
            if got != a.value {
                return Err(format!(
                    "seed {}: durability: node {} lost its own write {net}/{table}/{key}: holds {got:?}, \
                     acknowledged {:?}",
                    self.seed, a.owner, a.value
                ));
            }
        }
        Ok(())
    }

    /// No lost entry: the first acknowledged write (see [`check`](Self::check)) that a node
    /// attached to its network does not hold as written. Holds once the cluster has
    /// converged.
    pub fn lost_entry(&self) -> Option<String> {
        for ((net, table, key), a) in self.checkable() {
            for i in self.attached(net) {
                let got = self.node(i).get_entry(net, table, key);
                if got != a.value {
                    return Some(format!(
                        "node {i} has {net}/{table}/{key} = {got:?}, owner {} acknowledged {:?}",
                        a.owner, a.value
                    ));
                }
            }
        }
        None
    }

    // ----- faults ----------------------------------------------------------------------------

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
        self.nodes[i].crashed = true;
        self.nodes[i].in_flight.clear();
        self.nodes[i].node = None;
        self.nodes[i].armed = None;
    }

    /// Host `i` is reinstalled: its agent is gone (if it ran) and so is its data dir. It boots
    /// again with [`restart`](Self::restart) as a new instance with no clock and no networks.
    pub fn wipe(&mut self, i: usize) {
        self.crash(i);
        let s = &mut self.nodes[i];
        s.instance = mix(s.instance, 0x3175) | 1;
        s.persisted_generation = 0;
        s.persisted_ltime = 0;
        s.persisted_sweep = true;
        s.disk.clear();
        s.networks.clear();
        s.dataplane = weft_overlay::MemDataplane::new();
    }

    /// Restarts node `i` under its name with a new generation and its persisted clock, joins
    /// it through `seeds` and re-attaches the networks it had.
    pub fn restart(&mut self, i: usize, seeds: &[usize]) {
        self.boot(i);
        let seeds: Vec<SocketAddr> = seeds.iter().map(|&s| self.nodes[s].addr).collect();
        let nets: Vec<String> = self.nodes[i].networks.iter().cloned().collect();
        self.with(i, |n, now| -> Result<(), String> {
            n.join(now, &seeds)?;
            for net in &nets {
                n.attach(now, net)?;
            }
            Ok(())
        })
        .expect("restart");
    }

    // ----- views -----------------------------------------------------------------------------

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
        self.up().filter(|&i| self.node(i).is_attached(network)).collect()
    }

    /// Whether no up node has table events or membership updates left to disseminate.
    pub fn quiet(&self) -> bool {
        self.tables_quiet() && self.up().all(|i| self.node(i).membership_backlog() == 0)
    }

    /// Whether no up node has table events left to disseminate.
    pub fn tables_quiet(&self) -> bool {
        self.up().all(|i| {
            let n = self.node(i);
            n.networks().all(|net| n.queue_len(net) == 0)
        })
    }

    fn up(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.nodes.len()).filter(|&i| self.is_up(i))
    }

    /// Whether every up node sees every other up node alive.
    pub fn membership_converged(&self) -> bool {
        self.membership_gap().is_none()
    }

    /// The first up node `i` that does not see up node `j`'s current identity alive.
    pub fn membership_gap(&self) -> Option<(usize, usize)> {
        let up: Vec<usize> = self.up().collect();
        // A node that counts fewer alive members than there are up nodes has a gap: look
        // only at it (the full check is O(n^2)).
        let short =
            up.iter().copied().find(|&i| self.node(i).network_peer_count(CLUSTER_NETWORK) + 1 < up.len());
        let candidates: Vec<usize> = match short {
            Some(i) => vec![i],
            None => up.clone(),
        };
        candidates.iter().find_map(|&i| {
            // Alive and suspect members: foca's suspicion does not change the core's view.
            let alive: HashSet<NodeId> = self.node(i).network_peers(CLUSTER_NETWORK).into_iter().collect();
            up.iter().find(|&&j| j != i && !alive.contains(self.node(j).id())).map(|&j| (i, j))
        })
    }

    /// The membership gap in words: which node lacks which member, what it holds under that
    /// member's name, and how many nodes see fewer members than are up.
    pub fn membership_gap_report(&self) -> Option<String> {
        let (i, j) = self.membership_gap()?;
        let id = self.node(j).id().clone();
        let held: Vec<String> = self
            .node(i)
            .members()
            .iter()
            .filter(|m| m.id.name == id.name)
            .map(|m| format!("{:?} {}", m.id, m.state.as_str()))
            .collect();
        let up = self.up().count();
        let short = self.up().filter(|&k| self.node(k).network_peer_count(CLUSTER_NETWORK) + 1 < up).count();
        Some(format!(
            "node {i} lacks node {j}'s current {id:?}, holds {held:?}; {short} of {up} up nodes see too few members"
        ))
    }

    /// Each up node's view of the members, for failure messages.
    pub fn membership_report(&self) -> String {
        let mut out = String::new();
        for i in self.up() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_leave_the_queue_by_time_then_by_the_order_they_were_scheduled() {
        #[allow(clippy::disallowed_methods)] // an arbitrary origin for virtual time
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut q = BinaryHeap::new();
        for (seq, ms) in [(1, 5), (2, 1), (3, 5), (4, 0), (5, 1)] {
            q.push(Reverse(Scheduled { at: at(ms), seq, ev: Ev::Timer { node: 0, at: at(ms) } }));
        }
        let order: Vec<u64> = std::iter::from_fn(|| q.pop().map(|Reverse(s)| s.seq)).collect();
        assert_eq!(order, vec![4, 2, 5, 1, 3]);
    }

    #[test]
    fn node_seeds_and_addresses_are_distinct() {
        let seeds: HashSet<u64> = (0..10_000).map(|i| mix(7, i)).collect();
        assert_eq!(seeds.len(), 10_000);
        let addrs: HashSet<SocketAddr> = (0..60_000).map(sim_addr).collect();
        assert_eq!(addrs.len(), 60_000);
    }
}

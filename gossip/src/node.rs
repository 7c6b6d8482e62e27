//! `GossipNode`: the whole protocol state of one agent, as a sans-IO state machine.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use foca::{Foca, NoCustomBroadcast, OwnedNotification};
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

use crate::config::Config;
use crate::discovery::{AttachRecord, Discovery};
use crate::error::Error;
use crate::event::{
    DownReason, Event, MemberInfo, MemberState, Stats, TableEvent, TableEventKind, Transmit, TransmitKind,
};
use crate::identity::NodeId;
use crate::peers::{PeerSet, Peers};
use crate::queue::{Pushed, Take};
use crate::store::{
    DIGEST_BUCKETS, Entry, MergeRule, NetState, TableKind, TableSpec, VersionRef, bucket_of,
    compare_versions, diff_buckets, fingerprint, keyhash, reap_deadline,
};
use crate::timers::{TimerKind, Timers};
use crate::watcher::ObjectType;
use crate::wire::{
    self, Body, EventsPacketBuilder, FLAG_CLUSTER, FLAG_DELETED, FLAG_HIDDEN, FrameType, Head, MAX_LTIME,
    Packet, WireEntry, WireEntryRef, WireError,
};

/// The reserved network every node is attached to; it carries cluster-wide tables.
pub const CLUSTER_NETWORK: &str = "cluster";
/// Prefix of the tables the core keeps for itself; commands refuse to write them.
pub const RESERVED_TABLE_PREFIX: &str = "weft:";
/// The core's own table of network attachments, in [`CLUSTER_NETWORK`]: key `"<network> <node>"`,
/// value `(generation, attached)`.
pub const ATTACH_TABLE: &str = "weft:attachments";

const MAX_NAME_LEN: usize = 255;
/// How long a restarted node waits before detaching networks only a previous life attached.
const SELF_DETACH_GRACE: Duration = Duration::from_secs(10);
/// How far ahead of this node's clock a remote Lamport time may be.
pub const MAX_LTIME_JUMP: u64 = 1 << 40;
const MAX_KEY_LEN: usize = 1024;
/// Unseen members announced to per gossip round (see [`crate::discovery`]).
const DISCOVERY_PER_ROUND: usize = 4;

/// Which of a network's queued events a send carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Push {
    /// Right after a write: own events and news not relayed yet, with the round's budget.
    Own,
    /// `relay_delay` after news arrived: own events and news not relayed yet, one packet.
    Relay,
    /// The gossip round: everything queued, within the round's budget.
    Round,
}

/// Buckets and their items, for one `SyncSummary` frame.
type SummaryFrame = (Vec<u32>, Vec<wire::SummaryItem>);

type Membership = Foca<NodeId, wire::FocaCodec, Xoshiro256PlusPlus, NoCustomBroadcast>;

/// A network attachment record, as indexed from [`ATTACH_TABLE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Attachment {
    generation: u64,
    ltime: u64,
    attached: bool,
}

/// Attachment records order by the writer's generation first, so a restarted node that lost its
/// Lamport clock still re-attaches.
#[derive(Debug)]
struct AttachRule;

impl MergeRule for AttachRule {
    fn compare(&self, a: &VersionRef<'_>, b: &VersionRef<'_>) -> Ordering {
        let generation =
            |v: &VersionRef<'_>| AttachRecord::decode(v.value).map(|r| r.generation).unwrap_or(0);
        generation(a).cmp(&generation(b))
    }
}

#[derive(Debug, Clone)]
struct Member {
    id: NodeId,
    state: MemberState,
    /// When the state last changed (failed and left members are forgotten after `reap_after`).
    since: Instant,
}

#[derive(Debug)]
struct SyncState {
    network: String,
    deadline: Instant,
    /// The responder's last summary frame arrived; its answer to our wants ends the sync.
    summary_done: bool,
}

/// Where a version came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Local,
    Gossip,
    /// Learned through anti-entropy; relayed on like gossip news.
    Sync,
    /// Learned through anti-entropy beyond the relay budget: applied, not relayed.
    Repair,
}

/// A point-in-time view of one stored entry, for reads and dumps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryView {
    pub key: String,
    pub value: Bytes,
    pub owner: String,
    pub ltime: u64,
    pub state: EntryState,
    /// Time since this node last changed the entry.
    pub age: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryState {
    Live,
    /// Deleted; reaped after the residual time.
    Tombstone {
        reap_in: Duration,
    },
    /// Owner failed; kept for its return until the residual time is up.
    Hidden {
        reap_in: Duration,
    },
}

/// The sans-IO gossip core of one agent.
///
/// # Calling contract
///
/// The node never touches a socket, a clock or OS entropy. Its caller (the agent's tokio shell,
/// or the simulator) drives it:
///
/// * **Inputs.** [`handle_datagram`](Self::handle_datagram) for every UDP datagram received on
///   the gossip port; [`handle_stream`](Self::handle_stream) for every frame read from a TCP
///   stream (one length-prefixed frame, prefix removed; see [`wire`]);
///   [`handle_timeout`](Self::handle_timeout) when the deadline from
///   [`poll_timeout`](Self::poll_timeout) has passed. `now` is monotonic and comes only from the
///   caller.
/// * **Commands.** [`join`](Self::join), [`leave`](Self::leave),
///   [`join_network`](Self::join_network), [`leave_network`](Self::leave_network),
///   [`create_entry`](Self::create_entry), [`update_entry`](Self::update_entry),
///   [`delete_entry`](Self::delete_entry), [`send_message`](Self::send_message),
///   [`register_table`](Self::register_table). A command that fails returns an [`Error`] and
///   changes nothing.
/// * **Outputs.** After every input or command, drain [`poll_transmit`](Self::poll_transmit)
///   (send each [`Transmit`]: a datagram, or a stream frame written to a TCP connection to
///   `dst`), [`poll_event`](Self::poll_event), then re-arm the timer with
///   [`poll_timeout`](Self::poll_timeout).
/// * **Reads.** [`get_entry`](Self::get_entry), [`table`](Self::table), [`walk`](Self::walk),
///   [`members`](Self::members), [`network_peers`](Self::network_peers), [`stats`](Self::stats).
///
/// # Streams and replies
///
/// Every stream frame is self-contained: it carries the sender's identity (name, gossip address,
/// generation) in its head, and a stream carries frames in one direction only. A reply is a new
/// stream from the responder to the requester's *gossip address* from that head, never the
/// ephemeral port the request came from; it finds its request by the `sync_id` (anti-entropy)
/// the request carried. The shell may close a stream after its frames are written, or keep one
/// connection per peer open and write many frames on it.
///
/// # Determinism
///
/// Given the same seed, the same inputs at the same `now`s produce the same outputs: all
/// iteration that reaches the wire is over ordered maps, and all randomness comes from the RNG
/// seeded in [`new`](Self::new).
pub struct GossipNode {
    cfg: Config,
    id: NodeId,
    foca: Membership,
    rng: Xoshiro256PlusPlus,
    clock: u64,
    now: Instant,
    timers: Timers,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    notes: Vec<OwnedNotification<NodeId>>,
    members: BTreeMap<Arc<str>, Member>,
    seeds: Vec<SocketAddr>,
    networks: BTreeMap<String, NetState>,
    specs: BTreeMap<String, TableSpec>,
    attachments: BTreeMap<String, BTreeMap<Arc<str>, Attachment>>,
    syncs: BTreeMap<u64, SyncState>,
    /// Networks a previous life of this node attached and this one did not, with when to
    /// detach them (see `on_attachment`).
    stale_self_attachments: BTreeMap<String, Instant>,
    /// Members named in the attachment table that membership has not seen yet.
    discovery: Discovery,
    /// A relay of fresh news is scheduled.
    relay_armed: bool,
    /// Seeds the hashing of per-network version indexes.
    hash_seed: u64,
    /// Another node claimed this node's name: records of "our" previous lives may be its.
    name_contested: bool,
    /// Alive attached peers per network (the cluster's: every alive member), kept current.
    peers: Peers,
    /// Nodes attached per network, this one included when attached.
    attached_count: BTreeMap<String, usize>,
    /// Owners that may have hidden entries here (a superset: cleared when a restore finds
    /// none), so a member coming up costs a table scan only if it has something to restore.
    hidden_owners: HashSet<Arc<str>>,
    connected: bool,
    left: bool,
    stats: Stats,
}

impl std::fmt::Debug for GossipNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GossipNode")
            .field("id", &self.id)
            .field("clock", &self.clock)
            .field("members", &self.members.len())
            .field("networks", &self.networks.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// foca's `Runtime`: an outbox that turns sends into transmits and `submit_after` into absolute
/// deadlines in the node's timer table.
struct Outbox<'a> {
    now: Instant,
    timers: &'a mut Timers,
    transmits: &'a mut VecDeque<Transmit>,
    notes: &'a mut Vec<OwnedNotification<NodeId>>,
    stats: &'a mut Stats,
}

impl foca::Runtime<NodeId> for Outbox<'_> {
    fn notify(&mut self, notification: foca::Notification<'_, NodeId>) {
        self.notes.push(notification.to_owned());
    }

    fn send_to(&mut self, to: NodeId, data: &[u8]) {
        let mut bytes = wire::envelope(FrameType::Swim, data.len());
        bytes.extend_from_slice(data);
        self.stats.datagrams_out += 1;
        self.stats.bytes_out += bytes.len() as u64;
        self.transmits.push_back(Transmit {
            dst: to.addr,
            kind: TransmitKind::Datagram,
            bytes: Bytes::from(bytes),
        });
    }

    fn submit_after(&mut self, event: foca::Timer<NodeId>, after: Duration) {
        self.timers.add(self.now + after, TimerKind::Foca(event));
    }
}

fn check_name(what: &'static str, s: &str, max: usize) -> Result<(), Error> {
    if s.is_empty() || s.len() > max || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Error::BadName { what, max });
    }
    Ok(())
}

fn attach_key(network: &str, node: &str) -> String {
    format!("{network} {node}")
}

impl GossipNode {
    /// Builds a node. `seed` seeds every random choice it will make; `ltime` is the Lamport
    /// high-water mark the agent persisted (0 for a fresh node), so a restarted node never
    /// writes with an older clock.
    pub fn new(cfg: Config, id: NodeId, seed: u64, ltime: u64, now: Instant) -> Result<Self, Error> {
        cfg.validate()?;
        check_name("node name", &id.name, MAX_NAME_LEN)?;
        if ltime >= MAX_LTIME {
            return Err(Error::InvalidConfig(format!(
                "Lamport high-water mark {ltime} is beyond {MAX_LTIME}"
            )));
        }
        let mut membership = cfg.membership.clone();
        membership.max_packet_size = std::num::NonZeroUsize::new(cfg.max_packet_size - wire::ENVELOPE_LEN)
            .ok_or_else(|| Error::InvalidConfig("max_packet_size".into()))?;
        let foca_rng = Xoshiro256PlusPlus::seed_from_u64(seed ^ 0x5eed_f0ca_5eed_f0ca);
        let foca = Foca::new(id.clone(), membership, foca_rng, wire::FocaCodec);
        let mut node = GossipNode {
            id,
            foca,
            rng: Xoshiro256PlusPlus::seed_from_u64(seed),
            clock: ltime,
            now,
            timers: Timers::default(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            notes: Vec::new(),
            members: BTreeMap::new(),
            seeds: Vec::new(),
            networks: BTreeMap::new(),
            specs: BTreeMap::new(),
            attachments: BTreeMap::new(),
            syncs: BTreeMap::new(),
            stale_self_attachments: BTreeMap::new(),
            name_contested: false,
            hash_seed: seed.rotate_left(29) ^ 0x9e37_79b9_7f4a_7c15,
            discovery: Discovery::default(),
            relay_armed: false,
            peers: Peers::default(),
            attached_count: BTreeMap::new(),
            hidden_owners: HashSet::new(),
            connected: false,
            left: false,
            stats: Stats::default(),
            cfg,
        };
        node.specs.insert(
            ATTACH_TABLE.to_string(),
            TableSpec::cluster(ObjectType::Opaque).with_merge(Arc::new(AttachRule)),
        );
        node.networks
            .insert(CLUSTER_NETWORK.to_string(), NetState::new(node.cfg.join_sync_peers, node.hash_seed));
        node.write_attachment(now, CLUSTER_NETWORK, true);
        // Spread the periodic work over the first interval so nodes built together do not
        // tick in lockstep.
        let jitter = |rng: &mut Xoshiro256PlusPlus, d: Duration| d.mul_f64(rng.random_range(0.0..1.0));
        let g = jitter(&mut node.rng, node.cfg.gossip_interval);
        let s = jitter(&mut node.rng, node.cfg.sync_interval);
        node.timers.add(now + g, TimerKind::Gossip);
        node.timers.add(now + s, TimerKind::Sync);
        node.timers.add(now + node.cfg.reap_period, TimerKind::Reap);
        node.timers.add(now + node.cfg.rejoin_interval, TimerKind::Rejoin);
        Ok(node)
    }

    // ----- reads -------------------------------------------------------------------------

    pub fn id(&self) -> &NodeId {
        &self.id
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The Lamport clock: persist it as the high-water mark for the next start.
    pub fn ltime(&self) -> u64 {
        self.clock
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn is_connected(&self) -> bool {
        self.connected
    }

    pub fn has_left(&self) -> bool {
        self.left
    }

    /// Networks this node is attached to (always including [`CLUSTER_NETWORK`]).
    pub fn networks(&self) -> impl Iterator<Item = &str> {
        self.networks.keys().map(String::as_str)
    }

    pub fn is_attached(&self, network: &str) -> bool {
        self.networks.contains_key(network)
    }

    /// The live value of an entry, if this node holds one (tombstones and hidden entries are
    /// not live).
    pub fn get_entry(&self, network: &str, table: &str, key: &str) -> Option<Bytes> {
        self.networks.get(network)?.get(table, key)?.visible().cloned()
    }

    /// Membership updates (SWIM) still to be piggybacked on outgoing messages.
    pub fn membership_backlog(&self) -> usize {
        self.foca.updates_backlog()
    }

    /// Events queued for dissemination in `network`.
    pub fn queue_len(&self, network: &str) -> usize {
        self.networks.get(network).map_or(0, |n| n.queue.len())
    }

    /// Encoded bytes of the events queued in `network`.
    pub fn queue_bytes(&self, network: &str) -> usize {
        self.networks.get(network).map_or(0, |n| n.queue.bytes())
    }

    /// Stored versions (live, tombstoned, hidden) in `network`.
    pub fn entry_count(&self, network: &str) -> usize {
        self.networks.get(network).map_or(0, NetState::len)
    }

    /// The anti-entropy digest of `network`, as kept incrementally, and as rebuilt from the
    /// entries (they must agree; for tests and benchmarks).
    #[doc(hidden)]
    pub fn digests(&self, network: &str) -> Option<(Vec<u64>, Vec<u64>)> {
        self.networks.get(network).map(|n| (n.digest.clone(), n.rebuild_digest()))
    }

    /// Every stored version of a table, live, tombstoned or hidden, sorted by key.
    pub fn table(&self, network: &str, table: &str) -> Vec<EntryView> {
        let Some(t) = self.networks.get(network).and_then(|n| n.tables.get(table)) else {
            return Vec::new();
        };
        t.iter().map(|(k, e)| self.view(k, e)).collect()
    }

    /// Stored versions (live, tombstoned, hidden) of one table.
    pub fn table_len(&self, network: &str, table: &str) -> usize {
        self.networks.get(network).and_then(|n| n.tables.get(table)).map_or(0, |t| t.len())
    }

    /// Tables of a network that hold at least one entry.
    pub fn tables(&self, network: &str) -> Vec<String> {
        self.networks.get(network).map(|n| n.tables.keys().cloned().collect()).unwrap_or_default()
    }

    /// Calls `f(key, value, owner)` for every live entry of a table, in key order; stops when
    /// `f` returns false.
    pub fn walk(&self, network: &str, table: &str, mut f: impl FnMut(&str, &Bytes, &str) -> bool) {
        let Some(t) = self.networks.get(network).and_then(|n| n.tables.get(table)) else { return };
        for (k, e) in t {
            if let Some(v) = e.visible()
                && !f(k, v, &e.owner)
            {
                return;
            }
        }
    }

    fn view(&self, key: &str, e: &Entry) -> EntryView {
        let reap_in = e.reap_at.map(|at| at.saturating_duration_since(self.now)).unwrap_or_default();
        let state = if e.deleted {
            EntryState::Tombstone { reap_in }
        } else if e.hidden {
            EntryState::Hidden { reap_in }
        } else {
            EntryState::Live
        };
        EntryView {
            key: key.to_string(),
            value: e.value.clone(),
            owner: e.owner.to_string(),
            ltime: e.ltime,
            state,
            age: self.now.saturating_duration_since(e.updated),
        }
    }

    /// Every member this node knows, itself included, sorted by name.
    pub fn members(&self) -> Vec<MemberInfo> {
        let foca_state: HashMap<&NodeId, (foca::State, u16)> =
            self.foca.iter_membership_state().map(|m| (m.id(), (m.state(), m.incarnation()))).collect();
        let mut out = Vec::with_capacity(self.members.len() + 1);
        let me = MemberInfo {
            id: self.id.clone(),
            state: if self.left { MemberState::Left } else { MemberState::Alive },
            incarnation: 0,
            networks: self.networks.keys().cloned().collect(),
        };
        let mut mine = Some(me);
        for (name, m) in &self.members {
            if let Some(me) = mine.take_if(|me| me.id.name < *name) {
                out.push(me);
            }
            let (fs, inc) = foca_state.get(&m.id).copied().unwrap_or((foca::State::Alive, 0));
            let state = match (m.state, fs) {
                (MemberState::Alive, foca::State::Suspect) => MemberState::Suspect,
                (s, _) => s,
            };
            out.push(MemberInfo {
                id: m.id.clone(),
                state,
                incarnation: inc,
                networks: self.networks_of(name),
            });
        }
        out.extend(mine);
        out
    }

    fn networks_of(&self, node: &str) -> Vec<String> {
        self.attachments
            .iter()
            .filter(|(_, by)| by.get(node).is_some_and(|a| a.attached))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Alive members attached to `network`, other than this node, sorted by name.
    pub fn network_peers(&self, network: &str) -> Vec<NodeId> {
        self.peers.of(network, CLUSTER_NETWORK).map(PeerSet::sorted).unwrap_or_default()
    }

    /// How many alive members are attached to `network`, other than this node (for
    /// [`CLUSTER_NETWORK`]: alive members); the length of [`network_peers`](Self::network_peers)
    /// without building it.
    pub fn network_peer_count(&self, network: &str) -> usize {
        self.peers.of(network, CLUSTER_NETWORK).map_or(0, PeerSet::len)
    }

    /// Up to `k` distinct alive peers of `network`, chosen at random.
    fn pick_peers(&mut self, network: &str, k: usize) -> Vec<NodeId> {
        match self.peers.of(network, CLUSTER_NETWORK) {
            Some(set) => set.pick(&mut self.rng, k),
            None => Vec::new(),
        }
    }

    /// Brings every peer set up to date with `name`'s member state and attachments; called
    /// after anything changes either.
    fn refresh_peer(&mut self, name: &Arc<str>) {
        if **name == *self.id.name {
            return;
        }
        let alive = self.members.get(name).filter(|m| m.state == MemberState::Alive).map(|m| &m.id);
        self.peers.cluster.set(name, alive);
        for (network, by) in &self.attachments {
            if network == CLUSTER_NETWORK {
                continue;
            }
            let attached = by.get(name).is_some_and(|a| a.attached);
            let set = match self.peers.networks.get_mut(network) {
                Some(set) => set,
                None => self.peers.networks.entry(network.clone()).or_default(),
            };
            set.set(name, alive.filter(|_| attached));
        }
    }

    fn member_state(&self, name: &str) -> Option<MemberState> {
        if *name == *self.id.name {
            return Some(MemberState::Alive);
        }
        self.members.get(name).map(|m| m.state)
    }

    // ----- outputs -----------------------------------------------------------------------

    /// The next bytes to send. Own table events written since the last call are pushed to
    /// peers first (coalesced into as few datagrams as fit), with any news not relayed yet.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if self.transmits.is_empty() {
            let pending: Vec<String> =
                self.networks.iter().filter(|(_, n)| n.push_now).map(|(k, _)| k.clone()).collect();
            for nid in pending {
                if let Some(n) = self.networks.get_mut(&nid) {
                    n.push_now = false;
                }
                self.send_queue(&nid, Push::Own);
            }
        }
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next_deadline()
    }

    // ----- inputs ------------------------------------------------------------------------

    /// A datagram arrived on the gossip port.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        self.tick(now);
        self.stats.datagrams_in += 1;
        self.stats.bytes_in += bytes.len() as u64;
        if bytes.len() > self.cfg.max_packet_size {
            self.reject(from, WireError::TooLarge { len: bytes.len(), max: self.cfg.max_packet_size });
            return;
        }
        match wire::open_envelope(bytes) {
            Ok((FrameType::Swim, payload)) => {
                if self.left {
                    return;
                }
                let result = {
                    let mut rt = Outbox {
                        now,
                        timers: &mut self.timers,
                        transmits: &mut self.transmits,
                        notes: &mut self.notes,
                        stats: &mut self.stats,
                    };
                    self.foca.handle_data(payload, &mut rt)
                };
                if let Err(e) = result {
                    self.stats.membership_errors += 1;
                    tracing::debug!(%from, error = %e, "membership packet refused");
                }
                self.process_notes(now);
            }
            Ok((FrameType::Gossip, payload)) => match wire::decode_events(payload) {
                Ok(Some((head, network, events))) => self.handle_events(now, head, network, &events),
                Ok(None) => match wire::decode::<Packet>(payload) {
                    Ok(p) => self.handle_packet(now, p),
                    Err(e) => self.reject(from, e),
                },
                Err(e) => self.reject(from, e),
            },
            Err(e) => self.reject(from, e),
        }
    }

    /// One frame arrived on a TCP stream (its length prefix already removed).
    pub fn handle_stream(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        self.tick(now);
        self.stats.streams_in += 1;
        self.stats.stream_bytes_in += bytes.len() as u64;
        if bytes.len() > self.cfg.max_stream_frame {
            self.reject(from, WireError::TooLarge { len: bytes.len(), max: self.cfg.max_stream_frame });
            return;
        }
        match wire::decode_packet(bytes) {
            Ok(p) => self.handle_packet(now, p),
            Err(e) => self.reject(from, e),
        }
    }

    fn reject(&mut self, from: SocketAddr, e: WireError) {
        self.stats.decode_errors += 1;
        if let WireError::NewerVersion(v) = e {
            self.stats.newer_version_frames += 1;
            if self.stats.newer_version_frames == 1 {
                tracing::warn!(%from, version = v, "peer speaks a newer wire version; upgrade this node");
            }
        } else {
            tracing::debug!(%from, error = %e, "dropped undecodable frame");
        }
    }

    /// Timers due at `now` fire, in deadline order.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.tick(now);
        while let Some(t) = self.timers.pop_due(now) {
            match t {
                TimerKind::Foca(t) => {
                    let result = {
                        let mut rt = Outbox {
                            now,
                            timers: &mut self.timers,
                            transmits: &mut self.transmits,
                            notes: &mut self.notes,
                            stats: &mut self.stats,
                        };
                        self.foca.handle_timer(t, &mut rt)
                    };
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "membership timer");
                    }
                    self.process_notes(now);
                }
                TimerKind::Gossip => {
                    self.gossip_round(now);
                    self.timers.add(now + self.cfg.gossip_interval, TimerKind::Gossip);
                }
                TimerKind::Sync => {
                    self.sync_round(now);
                    let d = self.cfg.sync_interval.mul_f64(self.rng.random_range(0.9..1.1));
                    self.timers.add(now + d, TimerKind::Sync);
                }
                TimerKind::Reap => {
                    self.reap(now);
                    self.timers.add(now + self.cfg.reap_period, TimerKind::Reap);
                }
                TimerKind::Rejoin => {
                    if !self.left {
                        self.announce_to_missing_seeds(now);
                        self.timers.add(now + self.cfg.rejoin_interval, TimerKind::Rejoin);
                    }
                }
                TimerKind::Relay => {
                    self.relay_armed = false;
                    let due: Vec<String> = self
                        .networks
                        .iter()
                        .filter(|(_, n)| n.relay_pending)
                        .map(|(k, _)| k.clone())
                        .collect();
                    for nid in due {
                        if let Some(n) = self.networks.get_mut(&nid) {
                            n.relay_pending = false;
                            n.relayed_at = Some(now);
                        }
                        self.send_queue(&nid, Push::Relay);
                    }
                }
            }
        }
    }

    fn tick(&mut self, now: Instant) {
        if now > self.now {
            self.now = now;
        }
    }

    // ----- membership --------------------------------------------------------------------

    /// Joins the cluster through `seeds` (gossip addresses). Announces to every seed now and
    /// keeps announcing, every `rejoin_interval`, to each seed that is not an active member:
    /// until one answers, and later whenever this node has lost them (a partition, a restart).
    pub fn join(&mut self, now: Instant, seeds: &[SocketAddr]) -> Result<(), Error> {
        self.tick(now);
        if self.left {
            return Err(Error::Left);
        }
        self.seeds = seeds
            .iter()
            .copied()
            .filter(|a| *a != self.id.addr)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        self.announce_to_missing_seeds(now);
        Ok(())
    }

    /// Announces to every seed that is not an active member, or, while foca is not connected,
    /// to every seed and every member it still lists.
    fn announce_to_missing_seeds(&mut self, now: Instant) {
        if !self.connected {
            return self.announce_everywhere(now);
        }
        let active: HashSet<SocketAddr> = self.foca.iter_members().map(|m| m.id().addr).collect();
        let missing: Vec<SocketAddr> = self.seeds.iter().copied().filter(|a| !active.contains(a)).collect();
        self.announce_to(now, missing);
    }

    fn announce_everywhere(&mut self, now: Instant) {
        let mut targets: BTreeSet<SocketAddr> = self.seeds.iter().copied().collect();
        targets.extend(self.foca.iter_members().map(|m| m.id().addr));
        self.announce_to(now, targets.into_iter().collect());
    }

    fn announce_to(&mut self, now: Instant, targets: Vec<SocketAddr>) {
        for addr in targets {
            let mut rt = Outbox {
                now,
                timers: &mut self.timers,
                transmits: &mut self.transmits,
                notes: &mut self.notes,
                stats: &mut self.stats,
            };
            if let Err(e) = self.foca.announce(NodeId::seed(addr), &mut rt) {
                tracing::debug!(%addr, error = %e, "announce");
            }
        }
        self.process_notes(now);
    }

    /// Seeds this node announces to but does not have as active members (unreachable so far).
    pub fn unreachable_seeds(&self) -> Vec<SocketAddr> {
        let active: HashSet<SocketAddr> = self.foca.iter_members().map(|m| m.id().addr).collect();
        self.seeds.iter().copied().filter(|a| !active.contains(a)).collect()
    }

    /// Leaves the cluster cleanly: detaches from every network (peers delete this node's
    /// entries at once instead of hiding them) and tells the membership layer. Keep polling
    /// transmits and timers for a moment afterwards so the news goes out.
    pub fn leave(&mut self, now: Instant) -> Result<(), Error> {
        self.tick(now);
        if self.left {
            return Ok(());
        }
        let nets: Vec<String> = self.networks.keys().filter(|n| *n != CLUSTER_NETWORK).cloned().collect();
        for n in nets {
            self.write_attachment(now, &n, false);
        }
        self.write_attachment(now, CLUSTER_NETWORK, false);
        // Send the leave records to more peers than usual: this node will not relay them.
        let mut peers = self.pick_peers(CLUSTER_NETWORK, 2 * self.cfg.gossip_fanout);
        peers.sort();
        self.send_queue_to(CLUSTER_NETWORK, Push::Own, &peers);
        let result = {
            let mut rt = Outbox {
                now,
                timers: &mut self.timers,
                transmits: &mut self.transmits,
                notes: &mut self.notes,
                stats: &mut self.stats,
            };
            self.foca.leave_cluster(&mut rt)
        };
        self.left = true;
        self.process_notes(now);
        result.map_err(|e| Error::Membership(e.to_string()))
    }

    fn process_notes(&mut self, now: Instant) {
        while !self.notes.is_empty() {
            let notes = std::mem::take(&mut self.notes);
            for n in notes {
                self.process_note(now, n);
            }
        }
    }

    fn process_note(&mut self, now: Instant, n: OwnedNotification<NodeId>) {
        {
            match n {
                OwnedNotification::MemberUp(id) => self.member_up(now, id),
                OwnedNotification::Rename(old, new) => self.member_renamed(now, old, new),
                OwnedNotification::MemberDown(id) => self.member_down(now, id),
                OwnedNotification::Active => {
                    self.connected = true;
                    self.events.push_back(Event::Connected(true));
                    // (Re)joined a cluster: catch up on every network right away.
                    let k = self.cfg.join_sync_peers;
                    for net in self.networks.values_mut() {
                        net.initial_syncs = net.initial_syncs.max(k);
                    }
                }
                OwnedNotification::Idle => {
                    self.connected = false;
                    self.events.push_back(Event::Connected(false));
                }
                OwnedNotification::Rejoin(id) => {
                    tracing::info!(id = ?id, "declared down by the cluster; rejoining under a renewed identity");
                    self.id = id;
                    // foca reset itself without saying so: it is not connected, and until a peer
                    // learns the new identity nobody answers it (peers address the old one). An
                    // announce is accepted by address, so announce to every seed and every member.
                    if self.connected {
                        self.connected = false;
                        self.events.push_back(Event::Connected(false));
                    }
                    self.announce_everywhere(now);
                }
                OwnedNotification::Defunct => {
                    // Leaving makes foca declare itself down too; only the unexpected case warns.
                    if self.left {
                        tracing::debug!("membership stopped after leaving");
                    } else {
                        tracing::warn!("declared down by the cluster and unable to rejoin");
                    }
                }
            }
        }
    }

    /// The life of `name` that left the cluster, per its leave record, if any.
    fn left_generation(&self, name: &str) -> Option<u64> {
        self.attachments.get(CLUSTER_NETWORK)?.get(name).filter(|a| !a.attached).map(|a| a.generation)
    }

    fn member_up(&mut self, now: Instant, id: NodeId) {
        if id.name == self.id.name {
            if id.addr != self.id.addr {
                self.name_contested = true;
                self.events.push_back(Event::NameConflict { other: id });
            }
            return;
        }
        if let Some(m) = self.members.get(&id.name) {
            if m.id.life() > id.life() || (m.id == id && m.state == MemberState::Alive) {
                return;
            }
            // Two live nodes claim one name from two addresses: the one known first keeps it
            // (the other is refusing to run); its entries must not be hidden by the impostor.
            if m.state == MemberState::Alive && m.id.addr != id.addr {
                tracing::warn!(holder = %m.id, other = %id, "two nodes claim one name; keeping the first");
                return;
            }
        }
        // A life that already left stays gone; only a newer life (a restart) comes back.
        if self.left_generation(&id.name).is_some_and(|g| g >= id.generation) {
            return;
        }
        self.discovery.forget(&id.name);
        let was = self
            .members
            .insert(id.name.clone(), Member { id: id.clone(), state: MemberState::Alive, since: now });
        self.refresh_peer(&id.name);
        tracing::info!(member = %id, "member up");
        if !matches!(was, Some(Member { state: MemberState::Alive, .. })) {
            self.set_hidden(now, &id.name, false);
        }
        self.events.push_back(Event::MemberUp(id));
    }

    /// foca replaced `old` by `new` (same address, or a newer life of the member). foca also
    /// reports renames to identities it knows only as down, so liveness comes from foca itself.
    fn member_renamed(&mut self, now: Instant, old: NodeId, new: NodeId) {
        if old.name != new.name {
            // Another node now has `old`'s address: `old` is gone from there.
            self.member_down(now, old);
        }
        if self.foca.iter_members().any(|m| *m.id() == new) {
            self.member_up(now, new);
        } else {
            self.member_gone(now, new);
        }
    }

    /// A life of a member that foca knows only as down.
    fn member_gone(&mut self, now: Instant, id: NodeId) {
        if id.name == self.id.name {
            return;
        }
        let prev = self.members.get(&id.name).map(|m| (m.id.clone(), m.state));
        match &prev {
            Some((known, _)) if known.life() > id.life() => return,
            Some((known, _)) if *known == id => return self.member_down(now, id),
            _ => {}
        }
        let left = self.left_generation(&id.name).is_some_and(|g| g >= id.generation);
        let state = if left { MemberState::Left } else { MemberState::Failed };
        self.discovery.forget(&id.name);
        self.members.insert(id.name.clone(), Member { id: id.clone(), state, since: now });
        self.refresh_peer(&id.name);
        if !left {
            self.set_hidden(now, &id.name, true);
        }
        if matches!(prev, Some((_, MemberState::Alive))) {
            let reason = if left { DownReason::Left } else { DownReason::Failed };
            tracing::info!(member = %id, ?reason, "member down");
            self.events.push_back(Event::MemberDown { id, reason });
        }
    }

    fn member_down(&mut self, now: Instant, id: NodeId) {
        if !self.members.get(&id.name).is_some_and(|m| m.id == id && m.state == MemberState::Alive) {
            return;
        }
        let left = self.left_generation(&id.name).is_some_and(|g| g >= id.generation);
        let m = self.members.get_mut(&id.name).expect("checked");
        let reason = if left { DownReason::Left } else { DownReason::Failed };
        m.state = if left { MemberState::Left } else { MemberState::Failed };
        m.since = now;
        self.refresh_peer(&id.name);
        tracing::info!(member = %id, ?reason, "member down");
        if !left {
            self.set_hidden(now, &id.name, true);
        }
        let name = id.name.clone();
        self.events.push_back(Event::MemberDown { id, reason });
        // A life of this name at another address that was held back while this one was alive
        // (a node that moved) takes over now.
        let successor = self.foca.iter_members().map(|m| m.id().clone()).find(|m| m.name == name);
        if let Some(next) = successor {
            self.member_up(now, next);
        }
    }

    /// Hides (owner failed) or restores (owner back) every node-owned entry of `owner`.
    fn set_hidden(&mut self, now: Instant, owner: &str, hidden: bool) {
        if !hidden && !self.hidden_owners.remove(owner) {
            return;
        }
        if hidden {
            self.hidden_owners.insert(Arc::from(owner));
        }
        let specs = &self.specs;
        for (nid, net) in &mut self.networks {
            for (table, entries) in &mut net.tables {
                let cluster_kind = specs.get(table).map(|s| s.kind == TableKind::Cluster);
                for (key, e) in entries.iter_mut() {
                    if *e.owner != *owner || e.deleted || e.hidden == hidden {
                        continue;
                    }
                    if cluster_kind.unwrap_or(e.cluster) {
                        continue;
                    }
                    e.hidden = hidden;
                    e.reap_at = hidden.then(|| now + self.cfg.reap_after);
                    e.updated = now;
                    if specs.contains_key(table) && !table.starts_with(RESERVED_TABLE_PREFIX) {
                        let (kind, prev, value) = if hidden {
                            (TableEventKind::Delete, Some(e.value.clone()), None)
                        } else {
                            (TableEventKind::Create, None, Some(e.value.clone()))
                        };
                        self.events.push_back(Event::Table(TableEvent {
                            kind,
                            network: nid.clone(),
                            table: table.clone(),
                            key: key.clone(),
                            owner: owner.to_string(),
                            prev,
                            value,
                        }));
                    }
                }
            }
        }
    }

    // ----- networks ----------------------------------------------------------------------

    /// Attaches this node to `network`: peers learn it cluster-wide, and the node syncs the
    /// network's tables with a few attached peers at once. Attaching twice is a no-op.
    pub fn join_network(&mut self, now: Instant, network: &str) -> Result<(), Error> {
        self.tick(now);
        self.check_live()?;
        check_name("network id", network, MAX_NAME_LEN)?;
        if self.networks.contains_key(network) {
            return Ok(());
        }
        self.networks.insert(network.to_string(), NetState::new(self.cfg.join_sync_peers, self.hash_seed));
        self.write_attachment(now, network, true);
        // Catch up at once, not at the next gossip round: a node joining a populated network
        // has its tables one round trip later (peers answer a sync whoever asks).
        if !self.left {
            self.initial_syncs(now, network);
        }
        Ok(())
    }

    /// Detaches from `network`: peers remove this node's entries there, and this node forgets
    /// the network's tables (watchers see a delete for every live entry).
    pub fn leave_network(&mut self, now: Instant, network: &str) -> Result<(), Error> {
        self.tick(now);
        self.check_live()?;
        if network == CLUSTER_NETWORK {
            return Err(Error::ReservedNetwork(network.to_string()));
        }
        let Some(net) = self.networks.remove(network) else {
            return Err(Error::NotAttached(network.to_string()));
        };
        for (table, entries) in net.tables {
            for (key, e) in entries {
                if let Some(v) = e.visible() {
                    let ev = TableEvent {
                        kind: TableEventKind::Delete,
                        network: network.to_string(),
                        table: table.clone(),
                        key,
                        owner: e.owner.to_string(),
                        prev: Some(v.clone()),
                        value: None,
                    };
                    self.emit(ev);
                }
            }
        }
        self.syncs.retain(|_, s| s.network != network);
        self.write_attachment(now, network, false);
        Ok(())
    }

    fn write_attachment(&mut self, now: Instant, network: &str, attached: bool) {
        let value = AttachRecord { generation: self.id.generation, attached, addr: self.id.addr }.encode();
        let key = attach_key(network, &self.id.name);
        let _ = self.write_local(now, CLUSTER_NETWORK, ATTACH_TABLE, &key, Some(value));
    }

    /// Applies a stored attachment record (own or remote; `deleted` if it is a tombstone) to
    /// the index and its consequences.
    fn on_attachment(&mut self, now: Instant, key: &str, ltime: u64, deleted: bool, r: AttachRecord) {
        let Some((network, node)) = key.split_once(' ') else { return };
        let AttachRecord { generation, attached, addr } = r;
        let rec = Attachment { generation, ltime, attached: attached && !deleted };
        let by = match self.attachments.get_mut(network) {
            Some(by) => by,
            None => self.attachments.entry(network.to_string()).or_default(),
        };
        let node: Arc<str> = by.get_key_value(node).map_or_else(|| Arc::from(node), |(k, _)| k.clone());
        let prev = by.insert(node.clone(), rec);
        let was_attached = prev.is_some_and(|p| p.attached);
        if was_attached != rec.attached {
            let count = self.attached_count.entry(network.to_string()).or_default();
            *count = if rec.attached { *count + 1 } else { count.saturating_sub(1) };
        }
        self.refresh_peer(&node);
        if *node == *self.id.name {
            // A previous life of this node attached a network this life has not: say it left,
            // or peers would keep it (and its old entries) attached forever.
            // Not at once: until a grace period has passed without anyone else claiming this
            // node's name, the record may be another node's (a misconfigured twin).
            if rec.attached
                && generation < self.id.generation
                && !self.networks.contains_key(network)
                && !self.left
            {
                self.stale_self_attachments.entry(network.to_string()).or_insert(now + SELF_DETACH_GRACE);
            }
            return;
        }
        if network == CLUSTER_NETWORK {
            // A member the table knows and membership has never seen: go and find it.
            if rec.attached && !self.members.contains_key(&node) && !self.left {
                self.discovery.want(&node, addr, now);
            } else if !rec.attached {
                self.discovery.forget(&node);
            }
        }
        if prev.map(|p| p.attached) != Some(rec.attached) {
            self.events.push_back(Event::NetworkPeer {
                network: network.to_string(),
                node: node.to_string(),
                attached: rec.attached,
            });
        }
        if rec.attached {
            return;
        }
        // Detached (or left the cluster): its node-owned entries written before go.
        let nets: Vec<String> = if network == CLUSTER_NETWORK {
            self.networks.keys().cloned().collect()
        } else if self.networks.contains_key(network) {
            vec![network.to_string()]
        } else {
            Vec::new()
        };
        for nid in nets {
            self.remove_owned_before(now, &nid, &node, rec.ltime);
        }
        if network == CLUSTER_NETWORK
            && let Some(m) = self.members.get_mut(&node)
            && m.id.generation <= generation
            && m.state != MemberState::Left
        {
            m.state = MemberState::Left;
            m.since = now;
            let id = m.id.clone();
            self.refresh_peer(&node);
            tracing::info!(member = %id, "member left");
            self.events.push_back(Event::MemberDown { id, reason: DownReason::Left });
        }
    }

    /// Turns every node-owned entry of `owner` in `network` written before `ltime` into a
    /// tombstone (the owner detached or left after writing it).
    fn remove_owned_before(&mut self, now: Instant, network: &str, owner: &str, ltime: u64) {
        let Some(net) = self.networks.get(network) else { return };
        let mut doomed = Vec::new();
        for (table, entries) in &net.tables {
            if self.table_kind(table, None) == TableKind::Cluster {
                continue;
            }
            for (key, e) in entries {
                if *e.owner == *owner && !e.deleted && !e.cluster && e.ltime < ltime {
                    doomed.push((table.clone(), key.clone()));
                }
            }
        }
        for (table, key) in doomed {
            let net = self.networks.get_mut(network).expect("checked");
            let Some(old) = net.get(&table, &key).cloned() else { continue };
            let mut e = old.clone();
            e.deleted = true;
            e.hidden = false;
            e.reap_at = Some(now + self.cfg.reap_after);
            e.updated = now;
            e.fp = fingerprint(e.keyhash, e.ltime, &e.owner, true, &e.value);
            net.put(&table, &key, e);
            if let Some(v) = old.visible() {
                let ev = TableEvent {
                    kind: TableEventKind::Delete,
                    network: network.to_string(),
                    table,
                    key,
                    owner: owner.to_string(),
                    prev: Some(v.clone()),
                    value: None,
                };
                self.emit(ev);
            }
        }
    }

    /// The Lamport time after which `owner` is gone from `network` (detached, or left the
    /// cluster), if it is.
    fn detached_since(&self, network: &str, owner: &str) -> Option<u64> {
        let gone = |n: &str| self.attachments.get(n)?.get(owner).filter(|a| !a.attached).map(|a| a.ltime);
        gone(network).max(gone(CLUSTER_NETWORK))
    }

    // ----- tables ------------------------------------------------------------------------

    /// Registers how a table behaves and that watchers want its events. Events flow only for
    /// registered tables; registering replays every live entry as a create.
    pub fn register_table(&mut self, table: &str, spec: TableSpec) -> Result<(), Error> {
        check_name("table name", table, MAX_NAME_LEN)?;
        if table.starts_with(RESERVED_TABLE_PREFIX) {
            return Err(Error::ReservedTable(table.to_string()));
        }
        let replay = !self.specs.contains_key(table);
        self.specs.insert(table.to_string(), spec);
        if replay {
            let mut evs = Vec::new();
            for (nid, net) in &self.networks {
                for (key, e) in net.tables.get(table).into_iter().flatten() {
                    if let Some(v) = e.visible() {
                        evs.push(TableEvent {
                            kind: TableEventKind::Create,
                            network: nid.clone(),
                            table: table.to_string(),
                            key: key.clone(),
                            owner: e.owner.to_string(),
                            prev: None,
                            value: Some(v.clone()),
                        });
                    }
                }
            }
            self.events.extend(evs.into_iter().map(Event::Table));
        }
        Ok(())
    }

    /// The registered spec of a table, if any.
    pub fn table_spec(&self, table: &str) -> Option<&TableSpec> {
        self.specs.get(table)
    }

    fn table_kind(&self, table: &str, wire_cluster: Option<bool>) -> TableKind {
        match self.specs.get(table) {
            Some(s) => s.kind,
            None if wire_cluster == Some(true) => TableKind::Cluster,
            None => TableKind::NodeOwned,
        }
    }

    fn check_live(&self) -> Result<(), Error> {
        if self.left { Err(Error::Left) } else { Ok(()) }
    }

    fn check_write(&self, network: &str, table: &str, key: &str) -> Result<(), Error> {
        self.check_live()?;
        check_name("table name", table, MAX_NAME_LEN)?;
        if key.is_empty() || key.len() > MAX_KEY_LEN {
            return Err(Error::BadName { what: "key", max: MAX_KEY_LEN });
        }
        if table.starts_with(RESERVED_TABLE_PREFIX) {
            return Err(Error::ReservedTable(table.to_string()));
        }
        if !self.networks.contains_key(network) {
            return Err(Error::NotAttached(network.to_string()));
        }
        Ok(())
    }

    fn check_value(&self, value: &[u8]) -> Result<(), Error> {
        let max = self.cfg.max_stream_frame / 2;
        if value.len() > max {
            return Err(Error::TooLarge { len: value.len(), max });
        }
        Ok(())
    }

    /// Whether a key has a live value here, as `get_entry` sees it (a failed owner's hidden
    /// entry is not live: creating over it takes the key over).
    fn live(&self, network: &str, table: &str, key: &str) -> bool {
        self.networks.get(network).and_then(|n| n.get(table, key)).is_some_and(|e| e.visible().is_some())
    }

    fn err_key(&self, network: &str, table: &str, key: &str, exists: bool) -> Error {
        let (network, table, key) = (network.to_string(), table.to_string(), key.to_string());
        if exists {
            Error::EntryExists { network, table, key }
        } else {
            Error::EntryNotFound { network, table, key }
        }
    }

    /// Creates an entry owned by this node. Refused if a live entry has that key.
    pub fn create_entry(
        &mut self,
        now: Instant,
        network: &str,
        table: &str,
        key: &str,
        value: Bytes,
    ) -> Result<(), Error> {
        self.command_write(now, network, table, key, Some(value), false)
    }

    /// Replaces the value of a live entry; this node becomes its owner.
    pub fn update_entry(
        &mut self,
        now: Instant,
        network: &str,
        table: &str,
        key: &str,
        value: Bytes,
    ) -> Result<(), Error> {
        self.command_write(now, network, table, key, Some(value), true)
    }

    /// Deletes a live entry: it becomes a tombstone, reaped after `reap_after`.
    pub fn delete_entry(&mut self, now: Instant, network: &str, table: &str, key: &str) -> Result<(), Error> {
        self.command_write(now, network, table, key, None, true)
    }

    /// The checks every write command shares, then the write. `live` says whether the key must
    /// hold a live entry (update, delete) or must not (create).
    fn command_write(
        &mut self,
        now: Instant,
        network: &str,
        table: &str,
        key: &str,
        value: Option<Bytes>,
        live: bool,
    ) -> Result<(), Error> {
        self.tick(now);
        self.check_write(network, table, key)?;
        if let Some(v) = &value {
            self.check_value(v)?;
        }
        if self.live(network, table, key) != live {
            return Err(self.err_key(network, table, key, !live));
        }
        if !self.write_local(now, network, table, key, value) {
            return Err(Error::Superseded { network: network.into(), table: table.into(), key: key.into() });
        }
        Ok(())
    }

    /// Writes a new version owned by this node; `None` writes a tombstone. Always wins: its
    /// Lamport time is above both the clock and the version it replaces.
    fn write_local(
        &mut self,
        now: Instant,
        network: &str,
        table: &str,
        key: &str,
        value: Option<Bytes>,
    ) -> bool {
        let existing = self.networks.get(network).and_then(|n| n.get(table, key));
        let existing_ltime = existing.map(|e| e.ltime).unwrap_or(0);
        // A tombstone in a table with a merge rule carries the value it deletes, so the rule
        // ranks it like that value and the Lamport time decides.
        let has_rule = self.specs.get(table).is_some_and(|s| s.merge.is_some());
        let tomb_value = if has_rule { existing.map(|e| e.value.clone()) } else { None };
        self.clock = self.clock.max(existing_ltime) + 1;
        let cluster = self.table_kind(table, None) == TableKind::Cluster;
        let mut flags = if cluster { FLAG_CLUSTER } else { 0 };
        if value.is_none() {
            flags |= FLAG_DELETED;
        }
        let reap_in_ms =
            if value.is_none() { self.cfg.reap_after.as_millis().min(u32::MAX as u128) as u32 } else { 0 };
        let w = WireEntry {
            table: table.to_string(),
            key: key.to_string(),
            owner: self.id.name.to_string(),
            ltime: self.clock,
            flags,
            reap_in_ms,
            value: value.or(tomb_value).unwrap_or_default(),
        };
        self.apply(now, network, w, Origin::Local)
    }

    /// Applies one version (local or remote). Returns whether it was newer than what the node
    /// held.
    fn apply(&mut self, now: Instant, network: &str, w: WireEntry, origin: Origin) -> bool {
        self.clock = self.clock.max(w.ltime);
        if !self.networks.contains_key(network) {
            self.stats.foreign_network_events += 1;
            return false;
        }
        let kind = self.table_kind(&w.table, Some(w.flags & FLAG_CLUSTER != 0));
        let mut deleted = w.flags & FLAG_DELETED != 0;
        let mut residual = Duration::from_millis(w.reap_in_ms as u64);
        if kind == TableKind::NodeOwned
            && !deleted
            && self.detached_since(network, &w.owner).is_some_and(|gone| w.ltime < gone)
        {
            // Written before its owner detached or left: it arrives as what it now is.
            deleted = true;
            residual = self.cfg.reap_after;
        }
        // Hidden while its owner is failed here, or when the sender hid it and this node does not
        // know the owner alive (a node that never saw the owner must not resurrect its entries).
        let owner_state = self.member_state(&w.owner);
        let flagged_hidden = w.flags & FLAG_HIDDEN != 0;
        let hidden = kind == TableKind::NodeOwned
            && !deleted
            && (owner_state == Some(MemberState::Failed)
                || (flagged_hidden && owner_state != Some(MemberState::Alive)));
        if hidden && !flagged_hidden {
            residual = self.cfg.reap_after;
        }
        let rule = self.specs.get(&w.table).and_then(|s| s.merge.clone());
        let reap_after = self.cfg.reap_after;
        let net = self.networks.get_mut(network).expect("checked");
        let old = net.get(&w.table, &w.key);
        if let Some(old) = old {
            let incoming = VersionRef { ltime: w.ltime, owner: &w.owner, deleted, value: &w.value };
            if compare_versions(rule.as_deref(), &incoming, &old.version()) != Ordering::Greater {
                if origin != Origin::Local {
                    self.stats.entries_stale += 1;
                }
                return false;
            }
        }
        let keyhash = old.map(|o| o.keyhash).unwrap_or_else(|| keyhash(&w.table, &w.key));
        // Share the owner's name with the member table rather than one copy per entry.
        let owner: Arc<str> = match old {
            Some(o) if *o.owner == *w.owner => o.owner.clone(),
            _ if *w.owner == *self.id.name => self.id.name.clone(),
            _ => match self.members.get_key_value(w.owner.as_str()) {
                Some((name, _)) => name.clone(),
                None => Arc::from(w.owner.as_str()),
            },
        };
        let entry = Entry {
            fp: fingerprint(keyhash, w.ltime, &owner, deleted, &w.value),
            value: w.value.clone(),
            owner,
            ltime: w.ltime,
            deleted,
            cluster: kind == TableKind::Cluster,
            hidden,
            reap_at: (deleted || hidden).then(|| reap_deadline(now, residual, reap_after)),
            updated: now,
            keyhash,
        };
        let new_visible = entry.visible().cloned();
        if hidden {
            self.hidden_owners.insert(entry.owner.clone());
        }
        let old = net.put(&w.table, &w.key, entry);
        if origin != Origin::Local {
            self.stats.entries_applied += 1;
        }
        let old_visible = old.as_ref().and_then(|o| o.visible().cloned());
        let ev_kind = match (&old_visible, &new_visible) {
            (None, Some(_)) => Some(TableEventKind::Create),
            (Some(_), Some(_)) => Some(TableEventKind::Update),
            (Some(_), None) => Some(TableEventKind::Delete),
            (None, None) => None,
        };
        // Relay: own writes and gossip news go on; sync news too, within a budget.
        if origin == Origin::Repair {
            self.after_apply(now, network, w, old_visible, new_visible, ev_kind);
            return true;
        }
        let transmits = self.cfg.retransmits(self.peer_count(network) + 1);
        let mut w = w;
        w.flags = (w.flags & FLAG_CLUSTER)
            | if deleted { FLAG_DELETED } else { 0 }
            | if hidden { FLAG_HIDDEN } else { 0 };
        w.reap_in_ms = if deleted || hidden {
            residual.min(reap_after).as_millis().min(u32::MAX as u128) as u32
        } else {
            0
        };
        let encoded = Bytes::from(wire::encode(&w).expect("entries encode"));
        let net = self.networks.get_mut(network).expect("checked");
        let own = origin == Origin::Local;
        match net.queue.push(
            keyhash,
            encoded,
            transmits,
            own,
            self.cfg.max_queue_len,
            self.cfg.max_queue_bytes,
        ) {
            Pushed::Dropped | Pushed::Evicted => self.stats.queue_drops += 1,
            Pushed::New | Pushed::Replaced => {}
        }
        // Own writes go out at once; news after `relay_delay`, with what else arrives by then.
        let interval = self.cfg.gossip_interval;
        if own {
            net.push_now = true;
        } else if net.relayed_at.is_none_or(|at| now.saturating_duration_since(at) >= interval) {
            net.relay_pending = true;
            if !self.relay_armed {
                self.relay_armed = true;
                self.timers.add(now + self.cfg.relay_delay, TimerKind::Relay);
            }
        }
        self.after_apply(now, network, w, old_visible, new_visible, ev_kind);
        true
    }

    fn after_apply(
        &mut self,
        now: Instant,
        network: &str,
        w: WireEntry,
        old_visible: Option<Bytes>,
        new_visible: Option<Bytes>,
        ev_kind: Option<TableEventKind>,
    ) {
        if w.table == ATTACH_TABLE && network == CLUSTER_NETWORK {
            let stored = self.networks[network].get(&w.table, &w.key).expect("just stored");
            if let Ok(rec) = AttachRecord::decode(&stored.value) {
                let (ltime, deleted) = (stored.ltime, stored.deleted);
                self.on_attachment(now, &w.key, ltime, deleted, rec);
            }
        }
        if let Some(kind) = ev_kind {
            let ev = TableEvent {
                kind,
                network: network.to_string(),
                table: w.table,
                key: w.key,
                owner: w.owner,
                prev: old_visible,
                value: new_visible,
            };
            self.emit(ev);
        }
    }

    fn emit(&mut self, ev: TableEvent) {
        if self.specs.contains_key(&ev.table) && !ev.table.starts_with(RESERVED_TABLE_PREFIX) {
            self.events.push_back(Event::Table(ev));
        }
    }

    /// Other nodes of `network`, for the retransmit count.
    fn peer_count(&self, network: &str) -> usize {
        if network == CLUSTER_NETWORK {
            return self.peers.cluster.len();
        }
        self.attached_count.get(network).map_or(0, |n| n.saturating_sub(1))
    }

    fn reap(&mut self, now: Instant) {
        let mut reaped = 0;
        for net in self.networks.values_mut() {
            let doomed: Vec<(String, String)> = net
                .tables
                .iter()
                .flat_map(|(t, es)| {
                    es.iter()
                        .filter(|(_, e)| e.reap_at.is_some_and(|at| at <= now))
                        .map(|(k, _)| (t.clone(), k.clone()))
                })
                .collect();
            for (t, k) in doomed {
                net.remove(&t, &k);
                reaped += 1;
            }
        }
        self.stats.tombstones_reaped += reaped;
        // Members failed or left for longer than the reap interval are forgotten; their hidden
        // entries went with that interval too.
        let reap_after = self.cfg.reap_after;
        self.members.retain(|_, m| {
            m.state == MemberState::Alive || now.saturating_duration_since(m.since) < reap_after
        });
        let expired: Vec<u64> =
            self.syncs.iter().filter(|(_, s)| s.deadline <= now).map(|(id, _)| *id).collect();
        for id in expired {
            self.syncs.remove(&id);
        }
    }

    // ----- dissemination -----------------------------------------------------------------

    fn head(&self) -> Head {
        Head { from: self.id.clone(), ltime: self.clock }
    }

    fn gossip_round(&mut self, now: Instant) {
        self.detach_stale_self_attachments(now);
        let nets: Vec<String> = self.networks.keys().cloned().collect();
        for nid in &nets {
            if !self.networks[nid].queue.is_empty() {
                self.send_queue(nid, Push::Round);
            }
        }
        if self.left {
            return;
        }
        if self.connected && self.discovery.len() > 0 {
            let targets = self.discovery.due(now, DISCOVERY_PER_ROUND);
            self.announce_to(now, targets);
        }
        // Syncs owed to a network just attached (or a cluster just joined).
        for nid in &nets {
            self.initial_syncs(now, nid);
        }
    }

    /// Starts the syncs owed to `nid` (attached just now, or a cluster just joined) with that
    /// many attached peers; what cannot start yet is tried again next round.
    fn initial_syncs(&mut self, now: Instant, nid: &str) {
        let want = self.networks[nid].initial_syncs as usize;
        if want == 0 {
            return;
        }
        let peers = self.pick_peers(nid, want);
        if peers.is_empty() {
            return;
        }
        let mut started = 0u8;
        for p in peers {
            started += u8::from(self.start_sync(now, nid, &p));
        }
        let net = self.networks.get_mut(nid).expect("listed");
        net.initial_syncs = if started > 0 { 0 } else { net.initial_syncs };
    }

    fn detach_stale_self_attachments(&mut self, now: Instant) {
        if self.stale_self_attachments.is_empty() || self.left {
            return;
        }
        if self.name_contested {
            self.stale_self_attachments.clear();
            return;
        }
        let due: Vec<String> = self
            .stale_self_attachments
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(n, _)| n.clone())
            .collect();
        for network in due {
            self.stale_self_attachments.remove(&network);
            let still = self
                .attachments
                .get(&network)
                .and_then(|by| by.get(&self.id.name))
                .is_some_and(|a| a.attached && a.generation < self.id.generation);
            if still && !self.networks.contains_key(&network) {
                self.write_attachment(now, &network, false);
            }
        }
    }

    fn send_queue(&mut self, network: &str, push: Push) {
        let peers = self.pick_peers(network, self.cfg.gossip_fanout);
        self.send_queue_to(network, push, &peers);
    }

    /// One round of a network's queue to `peers`: as many datagrams as the budget allows, the
    /// same datagrams to each peer; events too large for a datagram go by stream.
    fn send_queue_to(&mut self, network: &str, push: Push, peers: &[NodeId]) {
        if peers.is_empty() {
            return;
        }
        let head = self.head();
        let max_packet = self.cfg.max_packet_size;
        // An early relay sends one packet: a storm's news waits for the round's full packets.
        let max_packets = if push == Push::Relay { 1 } else { self.cfg.max_packets_per_round };
        let Ok(mut builder) = EventsPacketBuilder::new(&head, network, max_packet) else { return };
        let prefix = builder.prefix_len();
        let empty_room = builder.room();
        let mut packets: Vec<Bytes> = Vec::new();
        // Events too large for a datagram: at most one stream frame's worth per round, split
        // into frames that each fit the limit.
        let frame_budget = self.cfg.max_stream_frame - 4096;
        let mut big: Vec<Vec<Bytes>> = Vec::new();
        let mut big_bytes = 0usize;
        let mut frame_bytes = 0usize;
        let Some(net) = self.networks.get_mut(network) else { return };
        net.queue.drain(push != Push::Round, |enc| {
            if enc.len() > empty_room {
                if big_bytes > 0 && big_bytes + enc.len() > frame_budget {
                    return Take::Full;
                }
                if big.is_empty() || frame_bytes + enc.len() > frame_budget {
                    big.push(Vec::new());
                    frame_bytes = 0;
                }
                big.last_mut().expect("pushed").push(enc.clone());
                frame_bytes += enc.len();
                big_bytes += enc.len();
                return Take::Sent;
            }
            if builder.push(enc) {
                return Take::Sent;
            }
            if packets.len() + 1 >= max_packets {
                return Take::Full;
            }
            let full = std::mem::replace(
                &mut builder,
                EventsPacketBuilder::new(&head, network, max_packet).expect("encoded once already"),
            );
            packets.push(full.finish(prefix));
            builder.push(enc);
            Take::Sent
        });
        if !builder.is_empty() {
            packets.push(builder.finish(prefix));
        }
        let streams: Vec<Bytes> = big
            .iter()
            .map(|frame| {
                let mut b = EventsPacketBuilder::new(&head, network, usize::MAX).expect("encodes");
                let p = b.prefix_len();
                for e in frame {
                    b.push(e);
                }
                b.finish(p)
            })
            .collect();
        for peer in peers {
            for p in &packets {
                self.stats.datagrams_out += 1;
                self.stats.bytes_out += p.len() as u64;
                self.transmits.push_back(Transmit {
                    dst: peer.addr,
                    kind: TransmitKind::Datagram,
                    bytes: p.clone(),
                });
            }
            for s in &streams {
                self.push_stream(peer.addr, s.clone());
            }
        }
    }

    fn push_stream(&mut self, dst: SocketAddr, bytes: Bytes) {
        self.stats.streams_out += 1;
        self.stats.stream_bytes_out += bytes.len() as u64;
        self.transmits.push_back(Transmit { dst, kind: TransmitKind::Stream, bytes });
    }

    fn send_packet(&mut self, dst: SocketAddr, body: Body, stream: bool) {
        let packet = Packet { head: self.head(), body };
        let Ok(bytes) = wire::encode_packet(&packet) else { return };
        if stream || bytes.len() > self.cfg.max_packet_size {
            self.push_stream(dst, Bytes::from(bytes));
        } else {
            self.stats.datagrams_out += 1;
            self.stats.bytes_out += bytes.len() as u64;
            self.transmits.push_back(Transmit {
                dst,
                kind: TransmitKind::Datagram,
                bytes: Bytes::from(bytes),
            });
        }
    }

    /// Checks a packet's head and witnesses its clock; false (counted) if the packet must go.
    fn accept_head(&mut self, head: &Head) -> bool {
        if head.from.name == self.id.name || head.from.name.is_empty() || !self.plausible_ltime(head.ltime) {
            self.stats.decode_errors += 1;
            return false;
        }
        self.clock = self.clock.max(head.ltime);
        true
    }

    /// A datagram of table events, decoded in place.
    fn handle_events(&mut self, now: Instant, head: Head, network: &str, events: &[WireEntryRef<'_>]) {
        if self.accept_head(&head) {
            self.apply_events(now, network, events);
        }
    }

    /// Applies gossiped events (from a datagram or, when too large for one, a stream). Most of
    /// what gossip delivers is a version this node already holds; those are counted, credited
    /// to the queue's blind counter, and skipped before anything is allocated.
    fn apply_events(&mut self, now: Instant, network: &str, events: &[WireEntryRef<'_>]) {
        for e in events {
            if !valid_entry(e) || !self.plausible_ltime(e.ltime) {
                self.stats.decode_errors += 1;
                continue;
            }
            if let Some(kh) = self.holds_exactly(network, e) {
                self.stats.entries_stale += 1;
                if let Some(net) = self.networks.get_mut(network) {
                    net.queue.heard(kh);
                }
                continue;
            }
            self.apply(now, network, e.to_owned(), Origin::Gossip);
        }
    }

    /// The key hash, if this node stores exactly this version (same Lamport time, owner,
    /// deletion and value, by fingerprint): `apply` would find it equal, hence stale.
    fn holds_exactly(&self, network: &str, e: &WireEntryRef<'_>) -> Option<u64> {
        let net = self.networks.get(network)?;
        let kh = keyhash(e.table, e.key);
        net.holds_version(kh, fingerprint(kh, e.ltime, e.owner, e.flags & FLAG_DELETED != 0, e.value))
            .then_some(kh)
    }

    fn handle_packet(&mut self, now: Instant, p: Packet) {
        let Packet { head, body } = p;
        if !self.accept_head(&head) {
            return;
        }
        match body {
            Body::Events { network, events } => {
                let events: Vec<WireEntryRef<'_>> = events.iter().map(WireEntry::borrowed).collect();
                self.apply_events(now, &network, &events);
            }
            Body::SyncDigest { network, sync_id, buckets } => {
                self.on_sync_digest(&head.from, network, sync_id, buckets)
            }
            summary @ Body::SyncSummary { .. } => self.on_sync_summary(now, &head.from, summary),
            Body::SyncEntries { network, sync_id, entries, want } => {
                self.on_sync_entries(now, &head.from, network, sync_id, entries, want)
            }
            Body::Message { data } => self.events.push_back(Event::Message { from: head.from, data }),
        }
    }

    /// Whether a remote Lamport time may be witnessed: below [`MAX_LTIME`] and at most
    /// [`MAX_LTIME_JUMP`] ahead of this node's clock. A legitimate peer is never that far ahead
    /// (it would take 10^12 writes); a forged packet cannot push every clock in the cluster to
    /// the end of its range in one step.
    fn plausible_ltime(&self, ltime: u64) -> bool {
        ltime < MAX_LTIME && ltime <= self.clock.saturating_add(MAX_LTIME_JUMP)
    }

    /// Sends `data` to the node named `to`: a datagram when it fits, a stream otherwise. It
    /// arrives as [`Event::Message`]; there is no delivery guarantee beyond UDP's or TCP's.
    pub fn send_message(&mut self, now: Instant, to: &str, data: Bytes) -> Result<(), Error> {
        self.tick(now);
        self.check_live()?;
        let max = self.cfg.max_stream_frame - 512;
        if data.len() > max {
            return Err(Error::TooLarge { len: data.len(), max });
        }
        let Some(m) = self.members.get(to) else { return Err(Error::UnknownNode(to.to_string())) };
        let dst = m.id.addr;
        self.send_packet(dst, Body::Message { data }, false);
        Ok(())
    }

    // ----- anti-entropy ------------------------------------------------------------------

    fn sync_round(&mut self, now: Instant) {
        if self.left {
            return;
        }
        // Start at a random network so a full sync table never starves the same ones.
        let mut nets: Vec<String> = self.networks.keys().cloned().collect();
        if !nets.is_empty() {
            let k = self.rng.random_range(0..nets.len());
            nets.rotate_left(k);
        }
        for nid in nets {
            if let Some(peer) = self.pick_peers(&nid, 1).pop() {
                self.start_sync(now, &nid, &peer);
            }
        }
    }

    /// Starts anti-entropy of `network` with `peer`: step 1, send the digest.
    fn start_sync(&mut self, now: Instant, network: &str, peer: &NodeId) -> bool {
        if self.syncs.len() >= self.cfg.max_concurrent_syncs {
            return false;
        }
        let Some(net) = self.networks.get(network) else { return false };
        let buckets = net.digest.clone();
        let sync_id = self.rng.random::<u64>();
        self.syncs.insert(
            sync_id,
            SyncState {
                network: network.to_string(),
                deadline: now + self.cfg.sync_timeout,
                summary_done: false,
            },
        );
        self.stats.syncs_started += 1;
        self.send_packet(
            peer.addr,
            Body::SyncDigest { network: network.to_string(), sync_id, buckets },
            true,
        );
        true
    }

    /// Step 2 (responder): compare digests; for the buckets that differ, send what is held.
    fn on_sync_digest(&mut self, from: &NodeId, network: String, sync_id: u64, buckets: Vec<u64>) {
        let Some(net) = self.networks.get(&network) else {
            self.stats.foreign_network_events += 1;
            return;
        };
        if buckets.len() != DIGEST_BUCKETS {
            self.stats.decode_errors += 1;
            return;
        }
        self.stats.syncs_answered += 1;
        let diff = diff_buckets(&net.digest, &buckets);
        if diff.is_empty() {
            // Tell the requester at once, so its sync slot frees now rather than at the timeout.
            self.stats.syncs_identical += 1;
            let body =
                Body::SyncSummary { network, sync_id, buckets: Vec::new(), items: Vec::new(), last: true };
            self.send_packet(from.addr, body, true);
            return;
        }
        let mut flagged = vec![false; DIGEST_BUCKETS];
        for b in &diff {
            flagged[*b as usize] = true;
        }
        let mut per_bucket: Vec<Vec<(u64, u64)>> = vec![Vec::new(); DIGEST_BUCKETS];
        for (_, _, e) in net.in_buckets(&flagged) {
            per_bucket[bucket_of(e.keyhash)].push((e.keyhash, e.fp));
        }
        // Whole buckets per frame, each frame within the stream frame limit.
        let max_items = (self.cfg.max_stream_frame / 2 / 20).max(1);
        let mut frames: Vec<SummaryFrame> = vec![(Vec::new(), Vec::new())];
        for b in diff {
            let items = std::mem::take(&mut per_bucket[b as usize]);
            let cur = frames.last_mut().expect("one frame");
            if !cur.0.is_empty() && cur.1.len() + items.len() > max_items {
                frames.push((Vec::new(), Vec::new()));
            }
            let cur = frames.last_mut().expect("one frame");
            cur.0.push(b);
            cur.1.extend(items);
        }
        let n = frames.len();
        for (i, (buckets, items)) in frames.into_iter().enumerate() {
            let body =
                Body::SyncSummary { network: network.clone(), sync_id, buckets, items, last: i + 1 == n };
            self.send_packet(from.addr, body, true);
        }
    }

    /// Step 3 (requester): send what the responder lacks, ask for what this node lacks.
    fn on_sync_summary(&mut self, now: Instant, from: &NodeId, summary: Body) {
        let Body::SyncSummary { network, sync_id, buckets, items, last } = summary else { return };
        if self.syncs.get(&sync_id).is_none_or(|s| s.network != network) {
            return;
        }
        let Some(net) = self.networks.get(&network) else { return };
        let mut flagged = vec![false; DIGEST_BUCKETS];
        for b in &buckets {
            if let Some(f) = flagged.get_mut(*b as usize) {
                *f = true;
            }
        }
        let theirs: HashMap<u64, u64> = items.iter().copied().collect();
        let mut mine: HashSet<u64> = HashSet::new();
        let mut entries = Vec::new();
        for (table, key, e) in net.in_buckets(&flagged) {
            mine.insert(e.fp);
            if theirs.get(&e.keyhash) != Some(&e.fp) {
                entries.push(e.to_wire(table, key, now));
            }
        }
        let want: Vec<u64> = items.iter().filter(|(_, fp)| !mine.contains(fp)).map(|(kh, _)| *kh).collect();
        if last {
            if want.is_empty() {
                self.syncs.remove(&sync_id);
            } else if let Some(st) = self.syncs.get_mut(&sync_id) {
                st.summary_done = true;
            }
        }
        self.send_entries(from.addr, &network, sync_id, entries, want, false);
    }

    /// Steps 3 and 4 (both sides): apply the entries; answer what was wanted.
    fn on_sync_entries(
        &mut self,
        now: Instant,
        from: &NodeId,
        network: String,
        sync_id: u64,
        entries: Vec<WireEntry>,
        want: Vec<u64>,
    ) {
        if !self.networks.contains_key(&network) {
            self.stats.foreign_network_events += 1;
            return;
        }
        let mut relayed = 0;
        for e in entries {
            if !valid_entry(&e.borrowed()) || !self.plausible_ltime(e.ltime) {
                self.stats.decode_errors += 1;
                continue;
            }
            let origin = if relayed < self.cfg.max_sync_relays { Origin::Sync } else { Origin::Repair };
            if self.apply(now, &network, e, origin) {
                relayed += 1;
            }
        }
        if want.is_empty() {
            if self.syncs.get(&sync_id).is_some_and(|st| st.summary_done) {
                self.syncs.remove(&sync_id);
            }
            return;
        }
        let wanted: HashSet<u64> = want.into_iter().collect();
        let net = &self.networks[&network];
        let out: Vec<WireEntry> = net
            .tables
            .iter()
            .flat_map(|(t, es)| es.iter().map(move |(k, e)| (t, k, e)))
            .filter(|(_, _, e)| wanted.contains(&e.keyhash))
            .map(|(t, k, e)| e.to_wire(t, k, now))
            .collect();
        // Always answer, even with nothing, so the requester can close the sync.
        self.send_entries(from.addr, &network, sync_id, out, Vec::new(), true);
    }

    fn send_entries(
        &mut self,
        dst: SocketAddr,
        network: &str,
        sync_id: u64,
        entries: Vec<WireEntry>,
        want: Vec<u64>,
        always: bool,
    ) {
        if entries.is_empty() && want.is_empty() && !always {
            return;
        }
        let per_frame = self.cfg.max_entries_per_frame;
        let budget = self.cfg.max_stream_frame / 2;
        let mut want = Some(want);
        let mut chunk = Vec::new();
        let mut bytes = 0;
        let mut it = entries.into_iter().peekable();
        loop {
            let next = it.next();
            let flush = match &next {
                None => true,
                Some(e) => chunk.len() >= per_frame || bytes + wire_size(e) > budget,
            };
            if flush && (!chunk.is_empty() || next.is_none()) {
                let body = Body::SyncEntries {
                    network: network.to_string(),
                    sync_id,
                    entries: std::mem::take(&mut chunk),
                    want: want.take().unwrap_or_default(),
                };
                self.send_packet(dst, body, true);
                bytes = 0;
            }
            match next {
                None => break,
                Some(e) => {
                    bytes += wire_size(&e);
                    chunk.push(e);
                }
            }
        }
    }
}

/// An upper bound of an entry's encoded size.
fn wire_size(e: &WireEntry) -> usize {
    e.value.len() + e.key.len() + e.table.len() + e.owner.len() + 48
}

fn valid_entry(e: &WireEntryRef<'_>) -> bool {
    e.ltime < MAX_LTIME
        && !e.table.is_empty()
        && e.table.len() <= MAX_NAME_LEN
        && !e.key.is_empty()
        && e.key.len() <= MAX_KEY_LEN
        && !e.owner.is_empty()
        && e.owner.len() <= MAX_NAME_LEN
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // an arbitrary origin for virtual time
mod tests {
    use super::*;
    use crate::watcher::{TableWatcher, Watchers};
    use std::sync::Mutex;

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, i], 7946))
    }

    fn node(i: u8, cfg: Config, now: Instant) -> GossipNode {
        GossipNode::new(cfg, NodeId::new(format!("n{i}"), addr(i), 1), i as u64, 0, now).unwrap()
    }

    /// Two nodes wired back to back; every transmit is delivered at once.
    struct Pair {
        a: GossipNode,
        b: GossipNode,
        now: Instant,
        /// Stream frames sent, per sender (0 = a), with their body's kind.
        frames: Vec<(usize, Transmit)>,
    }

    impl Pair {
        fn new(cfg: Config) -> Self {
            let now = Instant::now();
            let mut p = Pair { a: node(1, cfg.clone(), now), b: node(2, cfg, now), now, frames: Vec::new() };
            p.a.join(now, &[addr(2)]).unwrap();
            p.run(Duration::from_secs(2));
            assert!(p.a.is_connected() && p.b.is_connected());
            p
        }

        fn pump(&mut self) {
            loop {
                let mut moved = false;
                while let Some(t) = self.a.poll_transmit() {
                    moved = true;
                    if t.kind == TransmitKind::Stream {
                        self.frames.push((0, t.clone()));
                        self.b.handle_stream(self.now, addr(1), &t.bytes);
                    } else {
                        self.b.handle_datagram(self.now, addr(1), &t.bytes);
                    }
                }
                while let Some(t) = self.b.poll_transmit() {
                    moved = true;
                    if t.kind == TransmitKind::Stream {
                        self.frames.push((1, t.clone()));
                        self.a.handle_stream(self.now, addr(2), &t.bytes);
                    } else {
                        self.a.handle_datagram(self.now, addr(2), &t.bytes);
                    }
                }
                if !moved {
                    break;
                }
            }
        }

        fn run(&mut self, d: Duration) {
            let end = self.now + d;
            while self.now < end {
                self.now += Duration::from_millis(10);
                self.a.handle_timeout(self.now);
                self.b.handle_timeout(self.now);
                self.pump();
            }
        }
    }

    /// The datagrams `n` has to send, drained.
    fn sent(n: &mut GossipNode) -> Vec<Transmit> {
        std::iter::from_fn(|| n.poll_transmit()).collect()
    }

    #[test]
    fn a_member_only_the_attachment_table_names_is_announced_to_with_backoff() {
        let mut p = Pair::new(Config::default());
        // b tells a of "ghost", a node a's membership never heard of.
        let ghost = addr(9);
        let rec = AttachRecord { generation: 1, attached: true, addr: ghost };
        let head = Head { from: p.b.id.clone(), ltime: p.b.clock };
        let w = WireEntry {
            table: ATTACH_TABLE.into(),
            key: attach_key(CLUSTER_NETWORK, "ghost"),
            owner: "ghost".into(),
            ltime: 5,
            flags: FLAG_CLUSTER,
            reap_in_ms: 0,
            value: rec.encode(),
        };
        let bytes = wire::encode_packet(&Packet {
            head,
            body: Body::Events { network: CLUSTER_NETWORK.into(), events: vec![w] },
        })
        .unwrap();
        p.a.handle_datagram(p.now, addr(2), &bytes);
        let announces = |ts: &[Transmit]| {
            ts.iter()
                .filter(|t| {
                    t.dst == ghost && wire::open_envelope(&t.bytes).is_ok_and(|(ty, _)| ty == FrameType::Swim)
                })
                .count()
        };
        let mut at = Vec::new();
        for step in 0..400 {
            let now = p.now + Duration::from_millis(10 * step);
            p.a.handle_timeout(now);
            if announces(&sent(&mut p.a)) > 0 {
                at.push(step * 10);
            }
        }
        assert!(!at.is_empty() && at[0] <= 200, "announced within a gossip round: {at:?}");
        assert!(at.len() >= 2, "retried while unanswered: {at:?}");
        assert!(at[1] - at[0] >= 2000, "backed off: {at:?}");
        // Once membership has seen it, discovery stops.
        p.a.member_up(p.now, NodeId::new("ghost", ghost, 1));
        assert_eq!(p.a.discovery.len(), 0);
    }

    #[test]
    fn a_duplicate_costs_its_receiver_one_retransmission() {
        let mut p = Pair::new(Config::default());
        let now = p.now;
        p.a.join_network(now, "net1").unwrap();
        p.b.join_network(now, "net1").unwrap();
        p.run(Duration::from_secs(1));
        p.b.create_entry(now, "net1", "t", "k", Bytes::from_static(b"v")).unwrap();
        // b's immediate push reaches a, which queues the event to relay.
        let pushed = sent(&mut p.b);
        for t in &pushed {
            p.a.handle_datagram(now, addr(2), &t.bytes);
        }
        let left = |n: &GossipNode| n.networks["net1"].queue.len();
        assert_eq!(left(&p.a), 1);
        let before = p.a.networks["net1"].queue.transmissions_left();
        // Hearing it again from b burns one of a's transmissions, never a's copy of the entry.
        for t in &pushed {
            p.a.handle_datagram(now, addr(2), &t.bytes);
        }
        assert_eq!(p.a.networks["net1"].queue.transmissions_left(), before - 1);
        assert_eq!(p.a.get_entry("net1", "t", "k"), Some(Bytes::from_static(b"v")));
        for _ in 0..before {
            for t in &pushed {
                p.a.handle_datagram(now, addr(2), &t.bytes);
            }
        }
        // Duplicates cancel at most a quarter: the rest still go out.
        assert_eq!(left(&p.a), 1, "a rumour everyone repeats keeps most of its transmissions");
        assert_eq!(p.a.networks["net1"].queue.transmissions_left(), before - before / 4);
    }

    #[test]
    fn a_duplicate_that_arrives_by_stream_counts_like_one_by_datagram() {
        let mut p = Pair::new(Config::default());
        let now = p.now;
        p.a.join_network(now, "net1").unwrap();
        p.b.join_network(now, "net1").unwrap();
        p.run(Duration::from_secs(1));
        p.b.create_entry(now, "net1", "t", "k", Bytes::from_static(b"v")).unwrap();
        let pushed = sent(&mut p.b);
        for t in &pushed {
            p.a.handle_datagram(now, addr(2), &t.bytes);
        }
        let before = p.a.networks["net1"].queue.transmissions_left();
        let stale = p.a.stats().entries_stale;
        // Events too large for a datagram travel in the same frame over a stream.
        for t in &pushed {
            p.a.handle_stream(now, addr(2), &t.bytes);
        }
        assert_eq!(p.a.stats().entries_stale, stale + 1);
        assert_eq!(p.a.networks["net1"].queue.transmissions_left(), before - 1);
    }

    #[test]
    fn a_large_summary_is_split_by_bucket_within_the_frame_limit() {
        let mut p = Pair::new(Config { max_stream_frame: 64 << 10, ..Config::default() });
        let now = p.now;
        p.a.join_network(now, "net1").unwrap();
        // b attaches but hears nothing of a's writes: drop a's transmits.
        for k in 0..6000 {
            p.a.create_entry(now, "net1", "t", &format!("k{k:05}"), Bytes::from_static(b"v")).unwrap();
        }
        while p.a.poll_transmit().is_some() {}
        p.a.networks.get_mut("net1").unwrap().queue = Default::default();
        // Only b may start syncs, so a is the one answering with a summary.
        p.a.cfg.max_concurrent_syncs = 0;
        p.b.join_network(now, "net1").unwrap();
        p.frames.clear();
        // b asks (it syncs on attach); a answers with its summary.
        p.run(Duration::from_millis(500));
        let summaries: Vec<Packet> = p
            .frames
            .iter()
            .filter(|(from, _)| *from == 0)
            .map(|(_, t)| wire::decode_packet(&t.bytes).unwrap())
            .filter(|pk| matches!(&pk.body, Body::SyncSummary { network, .. } if network == "net1"))
            .collect();
        assert!(summaries.len() >= 2, "{} summary frames", summaries.len());
        let lasts: Vec<bool> =
            summaries.iter().map(|pk| matches!(pk.body, Body::SyncSummary { last, .. } if last)).collect();
        assert_eq!(lasts.iter().filter(|l| **l).count(), 1);
        assert!(*lasts.last().unwrap());
        assert!(p.frames.iter().all(|(_, t)| t.bytes.len() <= 64 << 10));
        assert_eq!(p.b.entry_count("net1"), 6000);
        assert_eq!(p.b.stats().decode_errors, 0);
    }

    #[test]
    fn syncs_of_many_networks_complete_and_none_starves() {
        let mut p = Pair::new(Config::default());
        let now = p.now;
        for k in 0..40 {
            p.a.join_network(now, &format!("net{k:02}")).unwrap();
            p.b.join_network(now, &format!("net{k:02}")).unwrap();
        }
        p.run(Duration::from_secs(3));
        // A write on the network that sorts last, whose gossip is lost.
        p.b.create_entry(p.now, "net39", "t", "k", Bytes::from_static(b"v")).unwrap();
        while p.b.poll_transmit().is_some() {}
        p.b.networks.get_mut("net39").unwrap().queue = Default::default();
        p.run(Duration::from_secs(30));
        assert_eq!(p.a.get_entry("net39", "t", "k"), Some(Bytes::from_static(b"v")), "repaired");
        // Identical digests are answered, so requests do not sit in the table until they time out.
        assert!(
            p.a.syncs.len() <= 4 && p.b.syncs.len() <= 4,
            "{} / {} syncs open",
            p.a.syncs.len(),
            p.b.syncs.len()
        );
        assert!(p.a.stats().syncs_started > 41 * 4, "every network synced: {}", p.a.stats().syncs_started);
    }

    #[test]
    fn a_clock_near_overflow_from_a_peer_is_refused() {
        let now = Instant::now();
        let mut n = node(1, Config::default(), now);
        let before = n.ltime();
        let entry = |ltime| WireEntry {
            table: "t".into(),
            key: "k".into(),
            owner: "n9".into(),
            ltime,
            flags: 0,
            reap_in_ms: 0,
            value: Bytes::from_static(b"x"),
        };
        let far = before + MAX_LTIME_JUMP + 1;
        for (head_ltime, entry_ltime) in [(u64::MAX, 1), (1, u64::MAX), (MAX_LTIME, 1), (far, 1), (1, far)] {
            let head = Head { from: NodeId::new("n9", addr(9), 1), ltime: head_ltime };
            let body = Body::Events { network: "cluster".into(), events: vec![entry(entry_ltime)] };
            n.handle_datagram(now, addr(9), &wire::encode_packet(&Packet { head, body }).unwrap());
        }
        assert_eq!(n.ltime(), before, "the clock did not move");
        assert_eq!(n.stats().decode_errors, 5);
        n.create_entry(now, "cluster", "t", "mine", Bytes::from_static(b"ok")).unwrap();
        assert!(GossipNode::new(Config::default(), NodeId::new("x", addr(3), 1), 0, MAX_LTIME, now).is_err());
    }

    #[derive(Default)]
    struct Recorder(Arc<Mutex<Vec<String>>>);

    impl TableWatcher for Recorder {
        fn event_notify(
            &mut self,
            nid: &str,
            table: &str,
            key: &str,
            prev: Option<&[u8]>,
            value: Option<&[u8]>,
        ) {
            let s = |v: Option<&[u8]>| v.map(|b| String::from_utf8_lossy(b).into_owned());
            self.0.lock().unwrap().push(format!("{nid}/{table}/{key} {:?}->{:?}", s(prev), s(value)));
        }

        fn decode_table_entry(&self, _: &str, key: &str, value: &[u8]) -> (String, BTreeMap<String, String>) {
            let mut m = BTreeMap::new();
            m.insert("Host IP".to_string(), String::from_utf8_lossy(value).into_owned());
            (key.to_string(), m)
        }
    }

    #[test]
    fn watchers_see_registered_tables_only_with_prev_values() {
        let now = Instant::now();
        let mut n = node(1, Config::default(), now);
        n.create_entry(now, "cluster", "peers", "ep0", Bytes::from_static(b"10.0.0.0")).unwrap();
        n.create_entry(now, "cluster", "other", "x", Bytes::from_static(b"y")).unwrap();
        assert!(std::iter::from_fn(|| n.poll_event()).all(|e| !matches!(e, Event::Table(_))), "unregistered");
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut w = Watchers::new();
        w.register("peers", ObjectType::Endpoint, Box::new(Recorder(log.clone())));
        n.register_table("peers", TableSpec::node_owned(ObjectType::Endpoint)).unwrap();
        n.update_entry(now, "cluster", "peers", "ep0", Bytes::from_static(b"10.0.0.1")).unwrap();
        n.delete_entry(now, "cluster", "peers", "ep0").unwrap();
        n.update_entry(now, "cluster", "other", "x", Bytes::from_static(b"z")).unwrap();
        while let Some(e) = n.poll_event() {
            if let Event::Table(t) = e {
                assert!(w.dispatch(&t), "only registered tables produce events");
            }
        }
        assert_eq!(
            *log.lock().unwrap(),
            vec![
                "cluster/peers/ep0 None->Some(\"10.0.0.0\")".to_string(),
                "cluster/peers/ep0 Some(\"10.0.0.0\")->Some(\"10.0.0.1\")".to_string(),
                "cluster/peers/ep0 Some(\"10.0.0.1\")->None".to_string(),
            ]
        );
        let (id, fields) = w.decode("peers", "ep7", b"192.0.2.1").unwrap();
        assert_eq!(id, "ep7");
        assert_eq!(fields["Host IP"], "192.0.2.1");
        assert!(w.decode("other", "x", b"z").is_none());
        assert!(n.register_table("weft:mine", TableSpec::cluster(ObjectType::Opaque)).is_err());
    }

    #[test]
    fn a_write_always_wins_over_the_version_it_replaces() {
        let now = Instant::now();
        let mut n = node(1, Config::default(), now);
        // A peer's version with a far higher clock arrives first.
        let head = Head { from: NodeId::new("n9", addr(9), 1), ltime: 1 };
        let e = WireEntry {
            table: "t".into(),
            key: "k".into(),
            owner: "n9".into(),
            ltime: 1_000,
            flags: 0,
            reap_in_ms: 0,
            value: Bytes::from_static(b"theirs"),
        };
        let frame = wire::encode_packet(&Packet {
            head,
            body: Body::Events { network: "cluster".into(), events: vec![e] },
        })
        .unwrap();
        n.handle_datagram(now, addr(9), &frame);
        assert_eq!(n.get_entry("cluster", "t", "k"), Some(Bytes::from_static(b"theirs")));
        assert!(n.ltime() >= 1_000, "the clock witnessed the peer's");
        n.update_entry(now, "cluster", "t", "k", Bytes::from_static(b"mine")).unwrap();
        let v = n.table("cluster", "t");
        assert_eq!((v[0].owner.as_str(), v[0].ltime), ("n1", 1_001));
        // A stale copy of the old version changes nothing and is counted.
        n.handle_datagram(now, addr(9), &frame);
        assert_eq!(n.get_entry("cluster", "t", "k"), Some(Bytes::from_static(b"mine")));
        assert_eq!(n.stats().entries_stale, 1);
    }
}

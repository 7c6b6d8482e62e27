//! `GossipNode`: the whole protocol state of one agent, as a sans-IO state machine.
//!
//! One type, its state grouped and its methods split by concern (as quinn-proto splits its
//! `Connection`): this file holds the type, its constructor and its inputs and outputs;
//! [`membership`] the SWIM layer (foca) and what members coming and going mean; [`attach`]
//! network attachments; [`apply`] table writes and how a version is applied; [`dissemination`]
//! gossip of table events; [`sync`] anti-entropy; [`read`] the public reads.

mod apply;
mod attach;
mod dissemination;
mod lifecycle;
mod membership;
mod read;
mod sync;
#[cfg(test)]
#[allow(clippy::disallowed_methods)] // an arbitrary origin for virtual time
mod tests;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use foca::{Foca, OwnedNotification};
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

use crate::config::Config;
use crate::discovery::Discovery;
use crate::error::Error;
use crate::event::{Event, Stats, Transmit};
use crate::identity::NodeId;
use crate::peers::Peers;
use crate::store::{NetState, TableSpec};
use crate::timers::{TimerKind, Timers};
use crate::watcher::ObjectType;
use crate::wire::{self, FrameType, MAX_LTIME, Packet, WireEntryRef, WireError};

use self::attach::{AttachRule, Attachments};
use self::dissemination::Push;
use self::lifecycle::{Lifecycle, NodeRule};
use self::membership::Membership;
pub use self::read::{EntryState, EntryView};
use self::sync::SyncState;

/// The reserved network every node is attached to; it carries cluster-wide tables.
pub const CLUSTER_NETWORK: &str = "cluster";
/// Prefix of the tables the core keeps for itself; commands refuse to write them.
pub const RESERVED_TABLE_PREFIX: &str = "weft:";
/// The core's own table of network attachments, in [`CLUSTER_NETWORK`]: key `"<network> <node>"`,
/// value `(generation, attached)`.
pub const ATTACH_TABLE: &str = "weft:attachments";
/// The core's own table of node records, in [`CLUSTER_NETWORK`]: key the node's name, value a
/// [`NodeRecord`](crate::NodeRecord) (instance, generation, addresses, status).
pub const NODES_TABLE: &str = "weft:nodes";

const MAX_NAME_LEN: usize = 255;
/// How far ahead of this node's clock a remote Lamport time may be.
pub const MAX_LTIME_JUMP: u64 = 1 << 40;
const MAX_KEY_LEN: usize = 1024;
/// How far above its own clock a node puts the tombstone that removes a dead node
/// ([`GossipNode::remove_node`]): the removed node may have written, in networks the remover
/// is not attached to, at Lamport times the remover never witnessed. Far below
/// [`MAX_LTIME_JUMP`], so peers accept it.
pub const REMOVAL_LTIME_MARGIN: u64 = 1 << 24;

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
    /// foca and the members it reported (see [`membership`]).
    membership: Membership,
    rng: Xoshiro256PlusPlus,
    clock: u64,
    now: Instant,
    // `Outbox`, foca's runtime, borrows these four while foca runs (see `with_foca`).
    timers: Timers,
    transmits: VecDeque<Transmit>,
    notes: Vec<OwnedNotification<NodeId>>,
    /// Identities foca recorded as down since the last `process_notes` (see `Outbox`).
    foca_downs: Vec<NodeId>,
    stats: Stats,
    events: VecDeque<Event>,
    networks: BTreeMap<String, NetState>,
    specs: BTreeMap<String, TableSpec>,
    /// Every node's attachment records, indexed (see [`attach`]).
    attach: Attachments,
    /// Node records, restarts, earlier lives, unknown and expired owners (see [`lifecycle`]).
    life: Lifecycle,
    syncs: BTreeMap<u64, SyncState>,
    /// A relay of fresh news is scheduled.
    relay_armed: bool,
    /// Seeds the hashing of per-network version indexes.
    hash_seed: u64,
    /// Alive attached peers per network (the cluster's: every alive member), kept current.
    peers: Peers,
    /// Owners that may have hidden entries here (a superset: cleared when a restore finds
    /// none), so a member coming up costs a table scan only if it has something to restore.
    hidden_owners: HashSet<Arc<str>>,
    /// Networks attached or detached since the change feed was last drained; `None` while the
    /// feed is off (see [`set_change_feed`](GossipNode::set_change_feed)).
    net_changes: Option<Vec<Change>>,
}

/// One item of the change feed: what the node stored changed (see
/// [`GossipNode::drain_changes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// This node attached (`true`) or detached a network: a reader drops everything it held of
    /// it either way (an attach starts empty).
    Network { network: String, attached: bool },
    /// An entry was stored, changed (value, state, reap time) or removed: read it back with
    /// [`GossipNode::entry`].
    Entry { network: String, table: String, key: String },
}

impl std::fmt::Debug for GossipNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GossipNode")
            .field("id", &self.id)
            .field("clock", &self.clock)
            .field("members", &self.membership.members.len())
            .field("networks", &self.networks.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

fn check_name(what: &'static str, s: &str, max: usize) -> Result<(), Error> {
    if s.is_empty() || s.len() > max || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Error::BadName { what, max });
    }
    Ok(())
}

impl GossipNode {
    /// Builds a node. `seed` seeds every random choice it will make; `ltime` is the Lamport
    /// high-water mark the agent persisted (0 for a fresh data dir), so a restarted node never
    /// writes with an older clock. A node built with 0 is a new instance: entries under its
    /// name that it finds in the cluster are an earlier instance's and it deletes them once it
    /// has synced (see `lifecycle`).
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
        // Alone so far: the suspicion timeout of a small cluster until members arrive.
        membership.suspect_to_down_after = cfg.suspicion(1);
        let foca = Foca::new(id.clone(), membership.clone(), foca_rng, wire::FocaCodec);
        let (data_addr, started) = (id.addr.ip(), id.generation);
        let mut node = GossipNode {
            id,
            membership: Membership {
                foca,
                foca_cfg: membership,
                members: BTreeMap::new(),
                seeds: Vec::new(),
                discovery: Discovery::default(),
                name_contested: false,
                connected: false,
                left: false,
            },
            rng: Xoshiro256PlusPlus::seed_from_u64(seed),
            clock: ltime,
            now,
            timers: Timers::default(),
            transmits: VecDeque::new(),
            notes: Vec::new(),
            foca_downs: Vec::new(),
            stats: Stats::default(),
            events: VecDeque::new(),
            networks: BTreeMap::new(),
            specs: BTreeMap::new(),
            attach: Attachments::default(),
            life: Lifecycle::new(data_addr, started, ltime == 0),
            syncs: BTreeMap::new(),
            hash_seed: seed.rotate_left(29) ^ 0x9e37_79b9_7f4a_7c15,
            relay_armed: false,
            peers: Peers::default(),
            hidden_owners: HashSet::new(),
            net_changes: None,
            cfg,
        };
        node.specs.insert(
            ATTACH_TABLE.to_string(),
            TableSpec::cluster(ObjectType::Opaque).with_merge(Arc::new(AttachRule)),
        );
        node.specs.insert(
            NODES_TABLE.to_string(),
            TableSpec::cluster(ObjectType::Opaque).with_merge(Arc::new(NodeRule)),
        );
        node.networks
            .insert(CLUSTER_NETWORK.to_string(), NetState::new(node.cfg.join_sync_peers, node.hash_seed));
        node.write_node_record(now, crate::discovery::NodeStatus::Up);
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

    /// Turns the change feed on or off. While on, every change to what the node stores is
    /// recorded until [`drain_changes`](Self::drain_changes); the caller must drain it.
    pub fn set_change_feed(&mut self, on: bool) {
        self.net_changes = on.then(Vec::new);
        for net in self.networks.values_mut() {
            net.touched = on.then(Vec::new);
        }
    }

    /// What changed since the last call, in order for each network: attachments first, then
    /// the entries touched (a key may appear more than once). Empty while the feed is off.
    pub fn drain_changes(&mut self, out: &mut Vec<Change>) {
        if let Some(c) = &mut self.net_changes {
            out.append(c);
        }
        for (nid, net) in &mut self.networks {
            if let Some(t) = &mut net.touched {
                out.extend(t.drain(..).map(|(table, key)| Change::Entry {
                    network: nid.clone(),
                    table,
                    key,
                }));
            }
        }
    }

    pub(super) fn record_network_change(&mut self, network: &str, attached: bool) {
        if let Some(c) = &mut self.net_changes {
            c.push(Change::Network { network: network.to_string(), attached });
        }
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next_deadline()
    }

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
                if self.membership.left {
                    return;
                }
                let result = self.with_foca(now, |foca, rt| foca.handle_data(payload, rt));
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
        self.settle_own_name(now);
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
        self.settle_own_name(now);
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
                    let result = self.with_foca(now, |foca, rt| foca.handle_timer(t, rt));
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
                    if !self.membership.left {
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
                TimerKind::Grace(name) => self.grace_over(now, &name),
                TimerKind::Depart => {
                    let result = self.with_foca(now, |foca, rt| foca.leave_cluster(rt));
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "leaving membership");
                    }
                    self.process_notes(now);
                }
            }
        }
        self.settle_own_name(now);
    }

    fn tick(&mut self, now: Instant) {
        if now > self.now {
            self.now = now;
        }
    }
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

//! `Agent`: what every weft host runs, without I/O. It composes the gossip core with the cluster's
//! network definitions (and, as they land, IPAM and the drivers), applies table events to them,
//! and tells its caller what to persist and when an output may leave. The tokio shell's event
//! loop and the simulator both drive it (see the calling contract on [`Agent`]).

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use weft_gossip::{
    ATTACH_TABLE, CLUSTER_NETWORK, Change, Config as GossipConfig, EntryState, Event, GossipNode,
    NODES_TABLE, NodeId, ObjectType, TableEventKind, TableSpec, TableWatcher, Transmit, Watchers,
};

use weft_gossip::wire::{self, FrameType};

use crate::alloc::{
    ALLOC_WAIT, AllocConfig, Allocator, ENDPOINT_TABLE, Endpoint, Endpoints, IPAM_TABLE, Pending,
    REMOVED_TABLE, RemovalMerge, RingEntries, RingMerge,
};
use crate::error::AgentError;
use crate::persist::{KEY_GENERATION, KEY_SWEEP, NET_PREFIX, NodeState, Persist, PersistBatch};
use crate::read::{self, TableRead};
use crate::view::{Snapshot, View, ViewEntry};

mod dataplane;

pub use dataplane::OverlayReport;
use dataplane::{DpWait, PendingEp};

pub use crate::read::is_network_id;

/// The cluster table of network definitions, in [`CLUSTER_NETWORK`], keyed by network id.
pub const NETWORKS_TABLE: &str = "networks";
/// How long after first connecting a clash of this node's name still makes it refuse to run:
/// the newcomer refuses, the established holder only warns.
pub const NAME_CHECK_WINDOW: Duration = Duration::from_secs(10);
/// How often the agent checks the networks it is attached to against their definitions.
const DEFINITION_CHECK: Duration = Duration::from_secs(1);

/// A network as the cluster knows it: a cluster entry that outlives the node that created it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkDef {
    pub id: String,
    pub name: String,
    pub driver: String,
    #[serde(default)]
    pub subnets: Vec<String>,
    #[serde(default)]
    pub gateway: Option<String>,
    pub created_by: String,
    /// Driver options, Docker's way: the overlay's VNIs under
    /// `com.docker.network.driver.overlay.vxlanid_list`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub options: BTreeMap<String, String>,
}

impl NetworkDef {
    /// A network known by its id alone (attached here, its definition gone).
    pub fn id_only(id: &str) -> Self {
        NetworkDef {
            id: id.to_string(),
            name: String::new(),
            driver: String::new(),
            subnets: Vec::new(),
            gateway: None,
            created_by: String::new(),
            options: BTreeMap::new(),
        }
    }

    /// The 12-hex short id, as Docker prints it.
    pub fn short_id(&self) -> &str {
        self.id.get(..12).unwrap_or(&self.id)
    }
}

/// A network in `network ls`: its definition, whether this node is attached, who is, and
/// whether its name clashes with another network's (two sides of a partition created it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInfo {
    #[serde(flatten)]
    pub def: NetworkDef,
    pub attached: bool,
    pub peers: Vec<String>,
    pub name_clash: bool,
    /// Networks whose subnets overlap this one's (both created apart, on two sides of a
    /// partition): names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subnet_overlap: Vec<String>,
    /// Attached here, but the cluster holds no definition of it (removed while this node was
    /// down long enough for the tombstone to be reaped, or not arrived yet): `weft network
    /// detach ID` detaches it.
    #[serde(default)]
    pub missing_definition: bool,
}

/// One entry in a dump.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpEntry {
    pub key: String,
    pub owner: String,
    pub ltime: u64,
    /// "live", "tombstone" or "hidden".
    pub state: String,
    /// Base64 of the raw value.
    pub value: String,
    /// Time left before a tombstone or hidden entry is reaped, milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reap_in_ms: Option<u64>,
    pub age_ms: u64,
    /// What the table's driver makes of the value: object id and fields.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decoded: Option<Decoded>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decoded {
    pub object_id: String,
    pub fields: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpTable {
    pub name: String,
    pub entries: Vec<DumpEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpNetwork {
    pub id: String,
    pub name: String,
    pub tables: Vec<DumpTable>,
}

/// Everything a node holds, grouped by network and table (the stable `dump --json` shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dump {
    pub node: String,
    pub networks: Vec<DumpNetwork>,
}

/// Network ids are random and never reused: once deleted, a network stays deleted. A
/// tombstone of a definition therefore wins over any live version of it, whatever the Lamport
/// times, so a definition written again (republished after a rolling restart lost it, see
/// [`Agent::republish_lost_definitions`]) can never bring back a network someone removed.
#[derive(Debug)]
struct NetworkDefRule;

impl weft_gossip::MergeRule for NetworkDefRule {
    fn compare(
        &self,
        a: &weft_gossip::VersionRef<'_>,
        b: &weft_gossip::VersionRef<'_>,
    ) -> std::cmp::Ordering {
        a.deleted.cmp(&b.deleted)
    }
}

/// Decodes network definitions for dumps.
struct NetworkDefs;

impl TableWatcher for NetworkDefs {
    fn decode_table_entry(&self, _: &str, key: &str, value: &[u8]) -> (String, BTreeMap<String, String>) {
        let mut m = BTreeMap::new();
        if let Ok(d) = serde_json::from_slice::<NetworkDef>(value) {
            m.insert("name".into(), d.name);
            m.insert("driver".into(), d.driver);
            if !d.subnets.is_empty() {
                m.insert("subnets".into(), d.subnets.join(","));
            }
            m.insert("created by".into(), d.created_by);
        }
        (key.to_string(), m)
    }
}

/// Identifies a command; its reply carries the same id.
pub type CommandId = u64;

/// What a client asks of the agent (the control API's writes). Each is handled by
/// [`Agent::handle_command`]; its reply comes out of [`Agent::poll_output`] when it is done,
/// possibly many inputs later (an attach waiting for a definition, a load applied in slices, a
/// write waiting for the disk).
#[derive(Debug, Clone)]
pub enum Command {
    Join {
        seeds: Vec<SocketAddr>,
    },
    /// Leave the cluster for good: peers delete this node's entries at once.
    Leave,
    /// Stop for a restart: peers keep this node's entries live for their `restart_grace`.
    StopRestarting,
    CreateNetwork {
        name: String,
        driver: String,
        subnets: Vec<String>,
        gateway: Option<String>,
        /// Driver options (`-o KEY=VALUE`): the overlay's `com.docker.network.driver.mtu` and
        /// VXLAN port.
        options: BTreeMap<String, String>,
    },
    RemoveNetwork {
        network: String,
        force: bool,
    },
    /// Attach by id, unique id prefix or name. A network whose definition has not arrived yet
    /// is waited for, up to [`ATTACH_WAIT`].
    Attach {
        network: String,
    },
    /// Attach by id, whatever this node knows of the definition (a restart re-attaching).
    AttachId {
        id: String,
    },
    Detach {
        network: String,
    },
    TablePut {
        network: String,
        table: String,
        key: String,
        value: Bytes,
        force: bool,
    },
    TableRm {
        network: String,
        table: String,
        key: String,
        force: bool,
    },
    /// Many writes, validated as a whole, then applied in slices of [`LOAD_SLICE`] with the
    /// caller's I/O served between them.
    TableLoad {
        network: String,
        table: String,
        pairs: Vec<(String, String)>,
        force: bool,
    },
    /// Allocates an address from this node's share of the network's subnet (attaching first
    /// if needed) and publishes the endpoint. Waits up to [`ALLOC_WAIT`] for a share.
    EndpointCreate {
        network: String,
        name: String,
        ip: Option<std::net::IpAddr>,
        mac: Option<String>,
        /// The network namespace to put the endpoint's interface in (`--sandbox`); none: the
        /// endpoint gets its address and records, no interface.
        sandbox: Option<String>,
    },
    /// Removes one of this node's endpoints (by name, id or unique id prefix).
    EndpointRm {
        network: String,
        endpoint: String,
    },
    /// `weft node rm NAME[@INSTANCE]`: removes instances of a node that are down (or, with
    /// `force`, one that may still run) and takes over their shares.
    NodeRm {
        node: String,
        force: bool,
    },
}

impl Command {
    /// What the command is, in a few words (for a reply that times out).
    pub fn describe(&self) -> String {
        match self {
            Command::Join { .. } => "join".into(),
            Command::Leave => "leave".into(),
            Command::StopRestarting => "stop".into(),
            Command::CreateNetwork { name, .. } => format!("network create {name}"),
            Command::RemoveNetwork { network, .. } => format!("network rm {network}"),
            Command::Attach { network } => format!("network attach {network}"),
            Command::AttachId { id } => format!("network attach {id}"),
            Command::Detach { network } => format!("network detach {network}"),
            Command::TablePut { network, table, key, .. } => format!("table put {network} {table} {key}"),
            Command::TableRm { network, table, key, .. } => format!("table rm {network} {table} {key}"),
            Command::TableLoad { network, table, pairs, .. } => {
                format!("table load {network} {table} ({} keys)", pairs.len())
            }
            Command::EndpointCreate { network, name, .. } => format!("endpoint create {network} {name}"),
            Command::EndpointRm { network, endpoint } => format!("endpoint rm {network} {endpoint}"),
            Command::NodeRm { node, .. } => format!("node rm {node}"),
        }
    }
}

/// A command's successful outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Done,
    Network(NetworkDef),
    Written(usize),
    Endpoint(Endpoint),
    NodeRemoved(crate::alloc::NodeRmReply),
}

pub type CommandResult = Result<Reply, AgentError>;

/// What the agent hands its caller, in order: bytes to send, and command replies.
#[derive(Debug)]
pub enum Output {
    Transmit(Transmit),
    Reply { id: CommandId, result: CommandResult },
}

/// How long `network attach NAME` waits for a definition that has not arrived yet (a network
/// just created on another node) before it answers "no such network".
pub const ATTACH_WAIT: Duration = Duration::from_secs(3);
/// Writes of a `table load` applied per input.
pub const LOAD_SLICE: usize = 1024;
/// Bytes of transmits held behind persist batches at most.
pub const HELD_BYTES: usize = 16 << 20;
/// How stale the view's counters and member states may get.
const SNAPSHOT_EVERY: Duration = Duration::from_millis(100);

/// A load being applied.
#[derive(Debug)]
struct Load {
    id: CommandId,
    network: String,
    table: String,
    pairs: Vec<(String, String)>,
    next: usize,
}

/// A command waiting for allocation to become possible (a seed, a donation).
#[derive(Debug)]
struct AllocParked {
    id: CommandId,
    cmd: Command,
    deadline: Instant,
    why: String,
}

/// An attach waiting for its network's definition.
#[derive(Debug)]
struct Parked {
    id: CommandId,
    network: String,
    deadline: Instant,
}

/// The sans-IO agent.
///
/// # Calling contract
///
/// One owner drives it (the shell's event loop, or the simulator):
///
/// * **Inputs.** [`handle_datagram`](Self::handle_datagram),
///   [`handle_stream`](Self::handle_stream), [`handle_timeout`](Self::handle_timeout) (when
///   [`poll_timeout`](Self::poll_timeout) is due), [`handle_command`](Self::handle_command),
///   [`handle_work`](Self::handle_work) (while [`has_work`](Self::has_work): one slice of a
///   load per call, the owner's I/O served in between), and the results of effects:
///   [`handle_persisted`](Self::handle_persisted), [`handle_persist_failed`](Self::handle_persist_failed).
/// * **Effects.** [`poll_persist`](Self::poll_persist) yields batches of durable-state changes
///   to write in order (see [`persist`](crate::persist)).
/// * **Outputs.** [`poll_output`](Self::poll_output) yields transmits and replies. Each depends
///   on a persist sequence (0: none); an output comes out only once its batch is reported
///   durable, and one that depends on nothing is never held behind one.
/// * **Events** of the gossip core are applied inside every input (watchers notified, removed
///   networks detached, name clashes judged); nothing is left for the caller to poll.
///   [`record_events`](Self::record_events) keeps a copy for an observer (the simulator).
/// * **Reads** go to the [`View`] from [`attach_view`](Self::attach_view), current after every
///   input.
pub struct Agent {
    gossip: GossipNode,
    watchers: Watchers,
    rng: Xoshiro256PlusPlus,
    connected_at: Option<Instant>,
    /// Whether this node joins through seeds (a node started without seeds founds a cluster and
    /// is never the newcomer of a name clash).
    has_seeds: bool,
    /// Why this node must not run: another live node holds its name and this one is the
    /// newcomer, or its data dir was copied and this is the newer copy.
    refused: Option<String>,
    /// When attached networks were last checked against their definitions.
    defs_checked_at: Option<Instant>,
    /// Definitions of the networks attached in an earlier life, as persisted with the
    /// attachment (names for `network ls` while the cluster holds none).
    restored: BTreeMap<String, NetworkDef>,
    /// The network definitions changed since the attachments were last staged for the store.
    defs_changed: bool,
    /// Attached networks whose definition the cluster held no trace of at the last check.
    defs_missing: std::collections::BTreeSet<String>,
    /// Networks this node created whose definition the synced cluster holds no trace of, and
    /// that nobody is attached to, since when.
    created_absent: BTreeMap<String, Instant>,
    persist: Persist,
    /// Attached networks as last staged for the store, sorted.
    staged_networks: Vec<String>,
    /// The last batch that changed more than the clock lease.
    last_structural: u64,
    /// The last batch that changed each network's attachment, while not durable.
    net_seq: std::collections::HashMap<String, u64>,
    /// The last batch that moved the node's generation.
    generation_seq: u64,
    /// The network whose attachment a pending command's reply rests on.
    reply_net: std::collections::HashMap<CommandId, String>,
    /// Bytes of transmits held, and transmits dropped at the bound.
    held_bytes: usize,
    held_drops: u64,
    ready: VecDeque<Output>,
    held: BTreeMap<u64, Vec<Output>>,
    /// Replies produced by the input being handled.
    replies: Vec<(CommandId, CommandResult)>,
    log: Option<VecDeque<Event>>,
    parked: Vec<Parked>,
    alloc: Allocator,
    alloc_parked: Vec<AllocParked>,
    /// The whole seed list (this node's own address included) the acceptors are derived from,
    /// when the caller gives it apart from the seeds it joins through.
    acceptor_seeds: Option<Vec<SocketAddr>>,
    /// Inside `boot`: the allocator's outputs wait for the first input.
    booting: bool,
    /// This input stops or leaves: SWIM waits for the record's lease too, until
    /// `hold_swim_until` is durable.
    hold_swim: bool,
    hold_swim_until: u64,
    loads: VecDeque<Load>,
    view: Option<Arc<View>>,
    changes: Vec<Change>,
    snapshot_dirty: bool,
    snapshot_at: Option<Instant>,
    /// The overlay driver, owned directly: the agent collects its data-plane operations and
    /// hands their results back.
    overlay: weft_overlay::OverlayDriver,
    /// Whether the caller applies data-plane operations.
    dataplane: bool,
    /// Attached networks the overlay driver does not handle (another driver, or refused).
    not_overlay: std::collections::BTreeSet<String>,
    ep_pending: Vec<PendingEp>,
    dp_waits: Vec<DpWait>,
    /// A reply's own persist batch, where it does not follow from the input that sends it
    /// (a removal answered once the data plane is done).
    reply_seq: std::collections::HashMap<CommandId, u64>,
    /// When the overlay's periodic work first ran.
    overlay_since: Option<Instant>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").field("gossip", &self.gossip).finish_non_exhaustive()
    }
}

/// A command run by [`Agent::apply`] (its reply is returned, never queued).
const APPLY_ID: CommandId = u64::MAX;

impl Agent {
    /// Builds the agent from the durable state read back at start: identity (`state`'s name,
    /// instance and generation at `addr`), clock lease, attached networks and their persisted
    /// definitions, and whether an earlier instance's entries are still to delete.
    pub fn boot(
        cfg: GossipConfig,
        state: &NodeState,
        addr: SocketAddr,
        seed: u64,
        now: Instant,
    ) -> Result<Self, AgentError> {
        let id = NodeId::new(state.name.as_str(), addr, state.generation).with_instance(state.instance);
        let mut alloc = Allocator::new(&id, AllocConfig::default(), now);
        alloc.restore(&state.alloc).map_err(AgentError::CorruptStore)?;
        let mut gossip = GossipNode::new(cfg, id, seed, state.ltime_hwm, now)?;
        gossip.register_table(
            NETWORKS_TABLE,
            TableSpec::cluster(ObjectType::Network).with_merge(Arc::new(NetworkDefRule)),
        )?;
        gossip.register_table(
            IPAM_TABLE,
            TableSpec::cluster(ObjectType::Opaque).with_merge(Arc::new(RingMerge)),
        )?;
        gossip.register_table(ENDPOINT_TABLE, TableSpec::node_owned(ObjectType::Endpoint))?;
        gossip
            .register_table(weft_overlay::OVERLAY_PEER_TABLE, TableSpec::node_owned(ObjectType::Endpoint))?;
        gossip.register_table(
            REMOVED_TABLE,
            TableSpec::cluster(ObjectType::Opaque).with_merge(Arc::new(RemovalMerge)),
        )?;
        gossip.set_predecessor_sweep(state.sweep_pending);
        let mut watchers = Watchers::new();
        watchers.register(NETWORKS_TABLE, ObjectType::Network, Box::new(NetworkDefs));
        watchers.register(IPAM_TABLE, ObjectType::Opaque, Box::new(RingEntries));
        watchers.register(ENDPOINT_TABLE, ObjectType::Endpoint, Box::new(Endpoints));
        watchers.register(REMOVED_TABLE, ObjectType::Opaque, Box::new(crate::alloc::removal::Removals));
        let mut agent = Agent {
            gossip,
            watchers,
            rng: Xoshiro256PlusPlus::seed_from_u64(seed.rotate_left(17) ^ 0xa6e7),
            connected_at: None,
            has_seeds: false,
            refused: None,
            defs_checked_at: None,
            restored: BTreeMap::new(),
            defs_changed: false,
            defs_missing: Default::default(),
            created_absent: BTreeMap::new(),
            persist: Persist::new(state),
            staged_networks: state
                .networks
                .iter()
                .cloned()
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect(),
            last_structural: 0,
            net_seq: Default::default(),
            reply_net: Default::default(),
            generation_seq: 0,
            held_bytes: 0,
            held_drops: 0,
            ready: VecDeque::new(),
            held: BTreeMap::new(),
            replies: Vec::new(),
            log: None,
            parked: Vec::new(),
            alloc,
            alloc_parked: Vec::new(),
            acceptor_seeds: None,
            hold_swim: false,
            hold_swim_until: 0,
            booting: true,
            loads: VecDeque::new(),
            view: None,
            changes: Vec::new(),
            snapshot_dirty: true,
            snapshot_at: None,
            overlay: weft_overlay::OverlayDriver::new(&state.name, addr.ip()),
            dataplane: false,
            not_overlay: Default::default(),
            ep_pending: Vec::new(),
            dp_waits: Vec::new(),
            reply_seq: Default::default(),
            overlay_since: None,
        };
        for id in &state.networks {
            agent.gossip.join_network(now, id)?;
        }
        agent.restored = state
            .definitions
            .iter()
            .filter(|d| state.networks.contains(&d.id))
            .map(|d| (d.id.clone(), d.clone()))
            .collect();
        agent.finish(now);
        agent.booting = false;
        Ok(agent)
    }

    /// An agent with a new data dir's state under `id` (tests and the simulator): its clock
    /// starts at `ltime`, no network attached.
    pub fn new(
        cfg: GossipConfig,
        id: NodeId,
        seed: u64,
        ltime: u64,
        now: Instant,
    ) -> Result<Self, AgentError> {
        let state = NodeState {
            name: id.name.to_string(),
            instance: id.instance,
            generation: id.generation,
            ltime_hwm: ltime,
            networks: Vec::new(),
            sweep_pending: false,
            definitions: Vec::new(),
            alloc: BTreeMap::new(),
        };
        Agent::boot(cfg, &state, id.addr, seed, now)
    }

    /// Configures allocation: the default pool, `--acceptors`, `reuse_after`, and the whole
    /// seed list (own address included) the acceptor set is derived from. Call before joining.
    /// `unresolved`: seeds given by a name that did not resolve (the set stays unknown).
    pub fn configure_alloc(
        &mut self,
        cfg: AllocConfig,
        seeds: Option<Vec<SocketAddr>>,
        unresolved: Vec<String>,
    ) {
        self.alloc.configure(cfg);
        if let Some(s) = &seeds {
            self.alloc.set_seeds(s);
        }
        self.alloc.set_unresolved_seeds(unresolved);
        self.acceptor_seeds = seeds;
    }

    /// The allocator (tests and the simulator's checkers).
    pub fn allocator(&self) -> &Allocator {
        &self.alloc
    }

    pub fn gossip(&self) -> &GossipNode {
        &self.gossip
    }

    /// Registers a driver's table: how it behaves, and the watcher its events go to (and that
    /// decodes its values in dumps). Registering replays every live entry as a create.
    pub fn register_table(
        &mut self,
        now: Instant,
        table: &str,
        spec: TableSpec,
        watcher: Box<dyn TableWatcher + Send>,
    ) -> Result<(), AgentError> {
        if table == NETWORKS_TABLE {
            return Err(AgentError::Reserved(table.to_string()));
        }
        let object_type = spec.object_type;
        self.gossip.register_table(table, spec)?;
        self.watchers.register(table, object_type, watcher);
        // The view decodes this table's entries from now on, those it holds included.
        if let Some(view) = self.view.clone() {
            for nid in self.attached_networks().into_iter().chain([CLUSTER_NETWORK.to_string()]) {
                for e in self.gossip.table(&nid, table) {
                    let decoded = self.decode(table, &e);
                    view.set(&nid, table, &e.key.clone(), Some(ViewEntry::from_view(now, &e, decoded)));
                }
            }
        }
        self.finish(now);
        Ok(())
    }

    pub fn id(&self) -> &NodeId {
        self.gossip.id()
    }

    /// Another node is alive under this node's name and this node is the newcomer (or the
    /// newer copy of a copied data dir): it must not run. The reason, in one line.
    pub fn refused(&self) -> Option<&str> {
        self.refused.as_deref()
    }

    /// Whether entries under this node's name that it did not write are an earlier instance's
    /// to delete: what the store says at start (see `GossipNode::set_predecessor_sweep`).
    pub fn set_predecessor_sweep(&mut self, pending: bool) {
        self.gossip.set_predecessor_sweep(pending);
        self.persist.assume(KEY_SWEEP, u64::from(pending));
    }

    /// The data-plane (VTEP) address this node publishes in its node record.
    pub fn set_data_addr(&mut self, now: Instant, addr: std::net::IpAddr) {
        self.gossip.set_data_addr(now, addr);
        self.overlay.set_vtep(addr);
        self.finish(now);
    }

    /// Keeps a copy of every applied event for [`poll_event`](Self::poll_event).
    pub fn record_events(&mut self, on: bool) {
        self.log = on.then(VecDeque::new);
    }

    /// The next applied event, while [`record_events`](Self::record_events) is on.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.log.as_mut()?.pop_front()
    }

    /// Starts keeping `View` current (filled now from what the core holds) and returns it.
    pub fn attach_view(&mut self, now: Instant) -> Arc<View> {
        let view = Arc::new(View::new(self.snapshot()));
        for nid in self.gossip.networks().map(str::to_string).collect::<Vec<_>>() {
            for t in self.gossip.tables(&nid) {
                for e in self.gossip.table(&nid, &t) {
                    let decoded = self.decode(&t, &e);
                    view.set(&nid, &t, &e.key.clone(), Some(ViewEntry::from_view(now, &e, decoded)));
                }
            }
        }
        self.gossip.set_change_feed(true);
        self.view = Some(view.clone());
        self.snapshot_at = Some(now);
        view
    }

    // ----- inputs ----------------------------------------------------------------------------

    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        self.gossip.handle_datagram(now, from, bytes);
        self.finish(now);
    }

    pub fn handle_stream(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        self.gossip.handle_stream(now, from, bytes);
        self.finish(now);
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.gossip.handle_timeout(now);
        self.alloc.tick(&mut self.gossip, now);
        if self.defs_checked_at.is_none_or(|t| now.saturating_duration_since(t) >= DEFINITION_CHECK) {
            self.defs_checked_at = Some(now);
            self.detach_removed_networks(now);
            self.republish_lost_definitions(now);
            self.note_absent_creations(now);
            self.overlay_tick(now);
            let g = &self.gossip;
            let (absent, reap) = (&self.created_absent, self.gossip.config().reap_after);
            self.alloc.reconcile(
                &|nid| {
                    g.entry(CLUSTER_NETWORK, NETWORKS_TABLE, nid)
                        .is_some_and(|e| matches!(e.state, EntryState::Tombstone { .. }))
                },
                &|nid| absent.get(nid).is_some_and(|t| now.saturating_duration_since(*t) >= reap),
            );
        }
        let (expired, waiting): (Vec<AllocParked>, Vec<AllocParked>) =
            std::mem::take(&mut self.alloc_parked).into_iter().partition(|p| p.deadline <= now);
        self.alloc_parked = waiting;
        for p in expired {
            // One last try, then what it waited for.
            if let Some(r) = self.run_alloc(now, p.id, p.cmd, false, Some(p.deadline)) {
                self.replies.push((p.id, r));
            }
        }
        let (expired, waiting): (Vec<Parked>, Vec<Parked>) =
            std::mem::take(&mut self.parked).into_iter().partition(|p| p.deadline <= now);
        self.parked = waiting;
        for p in expired {
            self.replies.push((
                p.id,
                Err(AgentError::NoSuchNetwork(format!(
                    "{} (waited {ATTACH_WAIT:?} for its definition)",
                    p.network
                ))),
            ));
        }
        self.finish(now);
    }

    /// Starts a command; its reply comes out of [`poll_output`](Self::poll_output) under `id`.
    pub fn handle_command(&mut self, now: Instant, id: CommandId, cmd: Command) {
        if let Some(r) = self.execute(now, id, cmd, true) {
            self.replies.push((id, r));
        }
        self.finish(now);
    }

    /// Runs a command to its end at once and returns its result (the simulator and tests, which
    /// own the agent in-process): an attach does not wait, a load is applied whole.
    pub fn apply(&mut self, now: Instant, cmd: Command) -> CommandResult {
        let r = self.execute(now, APPLY_ID, cmd, false).expect("apply never defers");
        self.finish(now);
        r
    }

    /// Whether a load is still being applied (call [`handle_work`](Self::handle_work)).
    pub fn has_work(&self) -> bool {
        !self.loads.is_empty()
    }

    /// Applies one slice of the oldest load.
    pub fn handle_work(&mut self, now: Instant) {
        if let Some(mut load) = self.loads.pop_front() {
            if let Some(r) = self.load_slice(now, &mut load) {
                self.replies.push((load.id, r));
            } else {
                self.loads.push_front(load);
            }
        }
        self.finish(now);
    }

    /// Every persist batch up to `seq` is durable: outputs that waited for them come out.
    pub fn handle_persisted(&mut self, now: Instant, seq: u64) {
        self.persist.persisted(seq);
        self.alloc.persisted(self.persist.durable());
        let durable = self.persist.durable();
        while let Some(entry) = self.held.first_entry() {
            if *entry.key() > durable {
                break;
            }
            for out in entry.remove() {
                if let Output::Transmit(t) = &out {
                    self.held_bytes -= t.bytes.len();
                }
                self.ready.push_back(out);
            }
        }
        self.snapshot_dirty = true;
        self.finish(now);
    }

    /// The store failed to write batch `seq` (the caller retries it): outputs that depend on
    /// it keep waiting, and the view says why.
    pub fn handle_persist_failed(&mut self, now: Instant, seq: u64, error: String) {
        tracing::error!(seq, error = %error, "cannot persist node state; holding back what depends on it");
        self.persist.failed(error);
        self.snapshot_dirty = true;
        self.finish(now);
    }

    // ----- outputs ---------------------------------------------------------------------------

    pub fn poll_output(&mut self) -> Option<Output> {
        self.ready.pop_front()
    }

    pub fn poll_persist(&mut self) -> Option<PersistBatch> {
        self.persist.poll_batch()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let parked =
            self.parked.iter().map(|p| p.deadline).chain(self.alloc_parked.iter().map(|p| p.deadline)).min();
        match (self.gossip.poll_timeout(), parked) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// What a command is still waiting for, in a few words; `None` once it is answered (or
    /// unknown).
    pub fn waiting_for(&self, id: CommandId) -> Option<String> {
        if let Some(p) = self.parked.iter().find(|p| p.id == id) {
            return Some(format!("the definition of network {:?} to arrive", p.network));
        }
        if let Some(p) = self.alloc_parked.iter().find(|p| p.id == id) {
            return Some(p.why.clone());
        }
        if self.ep_pending.iter().any(|p| p.id == id && p.ops.is_some()) {
            return Some("the data plane to build the endpoint's interface".into());
        }
        if self.ep_pending.iter().any(|p| p.id == id) {
            return Some("the data dir to make the endpoint's address durable".into());
        }
        if self.dp_waits.iter().any(|w| w.id == id) {
            return Some("the data plane to remove what it built".into());
        }
        if let Some(l) = self.loads.iter().find(|l| l.id == id) {
            return Some(format!("the load to be applied ({} of {} keys so far)", l.next, l.pairs.len()));
        }
        for (seq, outs) in &self.held {
            if outs.iter().any(|o| matches!(o, Output::Reply { id: i, .. } if *i == id)) {
                let why = match self.persist.failing() {
                    Some(e) => format!("; the store fails: {e}; retrying"),
                    None => String::new(),
                };
                return Some(format!("the data dir to make write #{seq} durable{why}"));
            }
        }
        None
    }

    /// Runs everything an input set off: applies the core's events, stages durable-state
    /// changes, queues the outputs behind what they depend on, and brings the view up to date.
    fn finish(&mut self, now: Instant) {
        loop {
            let mut defs_seen = false;
            let mut any = false;
            while let Some(ev) = self.gossip.poll_event() {
                any = true;
                match &ev {
                    Event::Table(t) => {
                        defs_seen |= t.network == CLUSTER_NETWORK && t.table == NETWORKS_TABLE;
                    }
                    _ => self.snapshot_dirty = true,
                }
                self.apply_event(now, &ev);
                if let Some(log) = &mut self.log {
                    log.push_back(ev);
                }
            }
            if defs_seen && !self.parked.is_empty() {
                self.retry_parked(now);
            }
            self.resolve_owners();
            self.sync_overlay_networks();
            // (Not while booting: an observer attached after `boot` must see every event.)
            if !self.booting {
                any |= self.alloc.pump(&mut self.gossip, now);
            }
            if self.alloc.take_progress() && !self.alloc_parked.is_empty() {
                self.retry_alloc_parked(now);
                any = true;
            }
            if !any {
                break;
            }
        }
        let moved = self.gossip.id().generation > self.persist.planned_num(KEY_GENERATION);
        let issued = self.persist.issued();
        let structural = self.stage_state();
        if let Some(seq) = structural {
            self.last_structural = seq;
        }
        self.advance_pending_eps(now);
        self.stage_dp_waits();
        // What staging found durable already goes out now, not at the next input.
        if !self.booting {
            self.alloc.pump(&mut self.gossip, now);
        }
        let durable = self.persist.durable();
        let dep = self.persist.cover(self.gossip.ltime()).max(structural.unwrap_or(0));
        // The view's persist counters must show a batch as soon as it is handed out (a stop
        // waits for them).
        self.snapshot_dirty |= self.persist.issued() != issued;
        // SWIM packets carry identities and membership only, no Lamport time: they wait for
        // nothing but a move of the node's generation not yet durable.
        if moved && let Some(seq) = structural {
            self.generation_seq = seq;
        }
        let swim_dep = if self.generation_seq > durable { self.generation_seq } else { 0 };
        // A stop's or leave's SWIM announcement must not overtake the node record saying which
        // it is (peers would take a restart for a failure and hide this node's entries).
        // (A restart leaves SWIM in a later input, so the hold lasts until that batch is durable.)
        if std::mem::take(&mut self.hold_swim) {
            self.hold_swim_until = self.hold_swim_until.max(dep);
        }
        let swim_dep =
            if self.hold_swim_until > durable { swim_dep.max(self.hold_swim_until) } else { swim_dep };
        // Table traffic may carry (in this input or in any later round or sync) the records of
        // a change of attachments or generation not yet durable: it waits for the last one.
        let table_dep = if self.last_structural > durable { dep.max(self.last_structural) } else { dep };
        while let Some(t) = self.gossip.poll_transmit() {
            let swim = wire::open_envelope(&t.bytes).is_ok_and(|(ty, _)| ty == FrameType::Swim);
            self.queue(if swim { swim_dep } else { table_dep }, Output::Transmit(t));
        }
        // A reply also waits for the attachment its network rests on, if that is in flight.
        for (id, result) in std::mem::take(&mut self.replies) {
            let net_dep = self
                .reply_net
                .remove(&id)
                .and_then(|nid| self.net_seq.get(&nid).copied())
                .filter(|s| *s > durable)
                .unwrap_or(0);
            let own = self.reply_seq.remove(&id).unwrap_or(0);
            self.queue(dep.max(net_dep).max(own), Output::Reply { id, result });
        }
        self.net_seq.retain(|_, s| *s > durable);
        self.update_view(now);
    }

    fn queue(&mut self, dep: u64, out: Output) {
        if dep <= self.persist.durable() {
            self.ready.push_back(out);
            return;
        }
        if let Output::Transmit(t) = &out {
            // Held traffic is bounded: beyond the bound it is dropped and counted (gossip
            // retransmits and anti-entropy repair it); replies are never dropped.
            if self.held_bytes + t.bytes.len() > HELD_BYTES {
                self.held_drops += 1;
                return;
            }
            self.held_bytes += t.bytes.len();
        }
        self.held.entry(dep).or_default().push(out);
    }

    /// Stages the node's durable state as it now stands: a generation moved up to, a finished
    /// sweep, the attached networks and their definitions. Returns the batch, if any.
    fn stage_state(&mut self) -> Option<u64> {
        let mut ops = Vec::new();
        let generation = self.gossip.id().generation;
        if generation > self.persist.planned_num(KEY_GENERATION) {
            ops.push((KEY_GENERATION.to_string(), Some(generation.to_string().into_bytes())));
        }
        if !self.gossip.predecessor_sweep_pending() && self.persist.planned_num(KEY_SWEEP) != 0 {
            ops.push((KEY_SWEEP.to_string(), Some(b"0".to_vec())));
        }
        if !self.gossip.has_left() {
            // Definitions are looked up only when the attachments or the definitions table
            // changed (a walk of that table is too dear for every datagram); the comparison
            // allocates nothing.
            let same = self
                .gossip
                .networks()
                .filter(|n| *n != CLUSTER_NETWORK)
                .eq(self.staged_networks.iter().map(String::as_str));
            if std::mem::take(&mut self.defs_changed) || !same {
                let ids = self.attached_networks();
                let defs: BTreeMap<String, NetworkDef> =
                    self.attached_definitions().into_iter().map(|d| (d.id.clone(), d)).collect();
                for k in self.persist.planned_keys(NET_PREFIX).map(str::to_string).collect::<Vec<_>>() {
                    if !ids.iter().any(|id| k[NET_PREFIX.len()..] == **id) {
                        ops.push((k, None));
                    }
                }
                for id in &ids {
                    let def = defs.get(id).cloned().unwrap_or_else(|| NetworkDef::id_only(id));
                    ops.push((
                        format!("{NET_PREFIX}{id}"),
                        Some(serde_json::to_vec(&def).expect("serializable")),
                    ));
                }
                self.staged_networks = ids;
            }
        }
        let covered = self.alloc.stage(&mut ops);
        // Only what changes: a network whose key is rewritten as it was is not in flight.
        ops.retain(|(k, v)| self.persist.planned(k) != v.as_deref());
        let nets: Vec<String> =
            ops.iter().filter_map(|(k, _)| k.strip_prefix(NET_PREFIX)).map(str::to_string).collect();
        let Some(seq) = self.persist.stage(ops) else {
            // Nothing new to write: what the allocator staged is in the batches already issued.
            let issued = self.persist.issued();
            self.alloc.staged(issued, covered);
            if issued <= self.persist.durable() {
                self.alloc.persisted(issued);
            }
            return None;
        };
        self.alloc.staged(seq, covered);

        for id in nets {
            self.net_seq.insert(id, seq);
        }
        Some(seq)
    }

    fn decode(&self, table: &str, e: &weft_gossip::EntryView) -> Option<Decoded> {
        if table == weft_overlay::OVERLAY_PEER_TABLE
            && (e.state == EntryState::Live || matches!(e.state, EntryState::Hidden { .. }))
        {
            let (object_id, fields) = self.overlay_decode(&e.key, &e.value);
            return Some(Decoded { object_id, fields });
        }
        if e.state == EntryState::Live || matches!(e.state, EntryState::Hidden { .. }) {
            self.watchers
                .decode(table, &e.key, &e.value)
                .map(|(object_id, fields)| Decoded { object_id, fields })
        } else {
            None
        }
    }

    /// Applies the core's change feed to the view, and refreshes the snapshot when it changed
    /// (or is older than [`SNAPSHOT_EVERY`]).
    fn update_view(&mut self, now: Instant) {
        let Some(view) = self.view.clone() else { return };
        // The buffer keeps its capacity from one input to the next.
        let mut changes = std::mem::take(&mut self.changes);
        self.gossip.drain_changes(&mut changes);
        for c in changes.drain(..) {
            match c {
                Change::Network { network, .. } => {
                    view.drop_network(&network);
                    self.snapshot_dirty = true;
                }
                Change::Entry { network, table, key } => {
                    if network == CLUSTER_NETWORK
                        && (table == ATTACH_TABLE || table == NODES_TABLE || table == NETWORKS_TABLE)
                    {
                        self.snapshot_dirty = true;
                    }
                    let e = self.gossip.entry(&network, &table, &key).map(|e| {
                        let decoded = self.decode(&table, &e);
                        ViewEntry::from_view(now, &e, decoded)
                    });
                    view.set(&network, &table, &key, e);
                }
            }
        }
        self.changes = changes;
        if self.snapshot_dirty
            || self.snapshot_at.is_none_or(|t| now.saturating_duration_since(t) >= SNAPSHOT_EVERY)
        {
            view.set_snapshot(self.snapshot());
            self.snapshot_dirty = false;
            self.snapshot_at = Some(now);
        }
    }

    /// The agent's scalar state, for the view.
    pub fn snapshot(&self) -> Snapshot {
        let mut known: Vec<String> = Vec::new();
        self.gossip.walk(CLUSTER_NETWORK, NETWORKS_TABLE, |k, _, _| {
            known.push(k.to_string());
            true
        });
        known.extend(self.attached_networks());
        let peers = known
            .into_iter()
            .map(|id| {
                let p = self.gossip.network_peers(&id).iter().map(|p| p.name.to_string()).collect();
                (id, p)
            })
            .collect();
        Snapshot {
            id: self.gossip.id().clone(),
            connected: self.gossip.is_connected(),
            left: self.gossip.has_left(),
            members: self.gossip.members(),
            unreachable_seeds: self.gossip.unreachable_seeds(),
            attached: self.gossip.networks().map(str::to_string).collect(),
            peers,
            restored: self.restored.clone(),
            stats: self.gossip.stats().clone(),
            ltime: self.gossip.ltime(),
            queues: self.gossip.networks().map(|n| (n.to_string(), self.gossip.queue_len(n))).collect(),
            persist_issued: self.persist.issued(),
            persist_durable: self.persist.durable(),
            persist_failing: self.persist.failing().map(str::to_string),
            held_bytes: self.held_bytes,
            held_drops: self.held_drops,
            refused: self.refused.clone(),
            alloc: self.alloc.report(),
            overlay: self.overlay_report(),
        }
    }

    /// Detaches every attached network whose definition is a tombstone here. A network removed
    /// while this node was down produces no delete event when its tombstone arrives (this node
    /// never held the definition in this life), so the tombstone itself is the signal.
    ///
    /// A definition absent altogether (its tombstone reaped while this node was down) is not
    /// taken as a removal: cluster tables live in memory only, so after an outage of the whole
    /// cluster no peer holds any definition, and every node would detach everything. Such a
    /// network stays attached and flagged ([`read::attached_without_definition`]), with the
    /// definition this node persisted, for the operator to detach.
    fn detach_removed_networks(&mut self, now: Instant) {
        let removed: Vec<String> = self
            .attached_networks()
            .into_iter()
            .filter(|id| {
                self.gossip
                    .entry(CLUSTER_NETWORK, NETWORKS_TABLE, id)
                    .is_some_and(|e| matches!(e.state, EntryState::Tombstone { .. }))
            })
            .collect();
        for id in removed {
            tracing::info!(network = %id, "detaching a network whose definition was deleted while this node was away");
            let _ = self.gossip.leave_network(now, &id);
            self.drop_network_alloc(&id);
        }
    }

    /// Writes again the definitions the cluster lost. Cluster tables live in memory: when every
    /// node holding a definition restarts before the one restarted before it learned it back
    /// (a rolling crash), no copy is left, and `endpoint create NET` says "no such network" on
    /// every node while the network is in use. A node attached to such a network writes back
    /// the definition it persisted once it has synced the cluster table, the cluster holds no
    /// trace of the definition (no live version, no tombstone) at two checks in a row, and
    /// another live node is attached to it too (a network removed while this node was away
    /// leaves nobody else attached: `network rm` detaches them). A tombstone, wherever one
    /// still lives, wins over the copy written back ([`NetworkDefRule`]).
    fn republish_lost_definitions(&mut self, now: Instant) {
        if !self.gossip.has_synced(CLUSTER_NETWORK) {
            return;
        }
        let missing: Vec<String> = self
            .attached_networks()
            .into_iter()
            .filter(|id| {
                self.restored.contains_key(id)
                    && !self.alloc.is_gone(id)
                    && self.gossip.entry(CLUSTER_NETWORK, NETWORKS_TABLE, id).is_none()
                    && self.gossip.network_peer_count(id) > 0
            })
            .collect();
        let seen_before = std::mem::take(&mut self.defs_missing);
        for id in missing {
            if !seen_before.contains(&id) {
                self.defs_missing.insert(id);
                continue;
            }
            let def = self.restored[&id].clone();
            tracing::warn!(
                network = %id, name = %def.name,
                "the cluster lost this network's definition (every node holding it restarted); writing back the one this node stored"
            );
            let value = Bytes::from(serde_json::to_vec(&def).expect("serializable"));
            if let Err(e) = self.gossip.create_entry(now, CLUSTER_NETWORK, NETWORKS_TABLE, &id, value) {
                tracing::debug!(network = %id, error = %e, "definition not written back");
            }
        }
    }

    /// A network this node created whose definition went while it was down, and whose
    /// tombstone was reaped before it came back, leaves no delete to see. It counts as removed
    /// (its VNIs and pool subnet are released) once the synced cluster has held no trace of
    /// it, and no node has been attached to it, for `reap_after`: a network in use has
    /// attached nodes, and they write its definition back if the cluster lost it.
    fn note_absent_creations(&mut self, now: Instant) {
        if !self.gossip.has_synced(CLUSTER_NETWORK) {
            return;
        }
        let absent: Vec<String> = self
            .alloc
            .created_networks()
            .filter(|nid| {
                self.gossip.entry(CLUSTER_NETWORK, NETWORKS_TABLE, nid).is_none()
                    && !self.gossip.is_attached(nid)
                    && self.gossip.network_peer_count(nid) == 0
            })
            .map(str::to_string)
            .collect();
        self.created_absent.retain(|k, _| absent.contains(k));
        for nid in absent {
            self.created_absent.entry(nid).or_insert(now);
        }
    }

    fn apply_event(&mut self, now: Instant, ev: &Event) {
        self.alloc.handle_event(&mut self.gossip, now, ev);
        match ev {
            Event::Table(t) => {
                if t.table == weft_overlay::OVERLAY_PEER_TABLE {
                    self.overlay_event(t);
                } else {
                    self.watchers.dispatch(t);
                }
                if t.network == CLUSTER_NETWORK && t.table == NETWORKS_TABLE {
                    self.defs_changed = true;
                    if t.kind != TableEventKind::Delete {
                        self.overlay_definition_changed(&t.key);
                    }
                }
                if t.network == CLUSTER_NETWORK
                    && t.table == NETWORKS_TABLE
                    && t.kind == TableEventKind::Delete
                {
                    if self.gossip.is_attached(&t.key) {
                        tracing::info!(network = %t.key, "network removed by {}; detaching", t.owner);
                        let _ = self.gossip.leave_network(now, &t.key);
                    }
                    // Also when detached before: its rings and records go.
                    self.drop_network_alloc(&t.key);
                }
            }
            Event::Connected(true) if self.connected_at.is_none() => self.connected_at = Some(now),
            Event::NameConflict { other, other_started } => {
                let me = self.gossip.id();
                if other.instance == me.instance {
                    // One data dir running twice (a cloned VM): the copy started later stops
                    // (by the generations the two started with, which moving above does not
                    // change; a tie stops both, rather than neither).
                    if *other_started <= self.gossip.started_generation() {
                        self.refused = Some(format!(
                            "another agent at {} runs with this data dir's identity ({} instance {}): the data dir was copied; give this host its own data dir (never copy one)",
                            other.addr,
                            other.name,
                            other.instance_hex()
                        ));
                    } else {
                        tracing::error!(other = %other, "a copy of this node's data dir runs at another address; the newer copy stops");
                    }
                    return;
                }
                let newcomer = self.has_seeds
                    && self
                        .connected_at
                        .is_none_or(|at| now.saturating_duration_since(at) < NAME_CHECK_WINDOW);
                if newcomer {
                    self.refused = Some(format!(
                        "node name {:?} is already in use by {} (alive at another address, instance {}): give this node another --name",
                        other.name,
                        other.addr,
                        other.instance_hex()
                    ));
                } else {
                    tracing::warn!(other = %other, "another node claims this node's name");
                }
            }
            _ => {}
        }
    }

    // ----- commands ----------------------------------------------------------------------------

    /// Runs a command; `None` if it goes on later (`may_wait`: a parked attach, a load).
    fn execute(
        &mut self,
        now: Instant,
        id: CommandId,
        cmd: Command,
        may_wait: bool,
    ) -> Option<CommandResult> {
        // A table write's reply rests on its network's attachment too (if that is in flight).
        if let Command::TablePut { network, .. }
        | Command::TableRm { network, .. }
        | Command::TableLoad { network, .. }
        | Command::EndpointCreate { network, .. }
        | Command::EndpointRm { network, .. } = &cmd
            && id != APPLY_ID
            && let Ok(nid) = self.table_network(network)
        {
            self.reply_net.insert(id, nid);
        }
        let done = |r: Result<(), AgentError>| r.map(|_| Reply::Done);
        let net = |r: Result<NetworkDef, AgentError>| r.map(Reply::Network);
        Some(match cmd {
            Command::Join { seeds } => done(self.join(now, &seeds)),
            Command::Leave => {
                self.hold_swim = true;
                let r = self.gossip.leave(now).map_err(AgentError::from);
                // This host's sandboxes go with it; the reply waits for them.
                if r.is_ok()
                    && let Some(end) = self.overlay_leave()
                    && id != APPLY_ID
                {
                    self.dp_waits.push(DpWait { id, end, seq: 0, reply: Reply::Done });
                    return None;
                }
                done(r)
            }
            Command::StopRestarting => {
                self.hold_swim = true;
                done(self.gossip.stop_restarting(now).map_err(AgentError::from))
            }
            Command::RemoveNetwork { network, force } => net(self.remove_network(now, &network, force)),
            Command::Attach { network } => match self.attach(now, &network) {
                Err(AgentError::NoSuchNetwork(_)) if may_wait => {
                    self.parked.push(Parked { id, network, deadline: now + ATTACH_WAIT });
                    return None;
                }
                r => net(r),
            },
            Command::CreateNetwork { .. } | Command::EndpointCreate { .. } => {
                return self.run_alloc(now, id, cmd, may_wait, None);
            }
            Command::EndpointRm { network, endpoint } => match self.endpoint_rm(now, &network, &endpoint) {
                // The reply waits for the interface to be gone.
                Ok((e, Some(end))) if id != APPLY_ID => {
                    self.dp_waits.push(DpWait { id, end, seq: 0, reply: Reply::Endpoint(e) });
                    return None;
                }
                r => r.map(|(e, _)| Reply::Endpoint(e)),
            },
            Command::NodeRm { node, force } => {
                self.alloc.remove_node(&mut self.gossip, now, &node, force).map(Reply::NodeRemoved)
            }
            Command::AttachId { id } => done(self.reattach(now, &id)),
            Command::Detach { network } => net(self.detach(now, &network)),
            Command::TablePut { network, table, key, value, force } => {
                done(self.table_put(now, &network, &table, &key, value, force))
            }
            Command::TableRm { network, table, key, force } => {
                done(self.table_rm(now, &network, &table, &key, force))
            }
            Command::TableLoad { network, table, pairs, force } => {
                let network = match self.check_load(&network, &table, &pairs, force) {
                    Ok(nid) => nid,
                    Err(e) => return Some(Err(e)),
                };
                let mut load = Load { id, network, table, pairs, next: 0 };
                if may_wait {
                    self.loads.push_back(load);
                    return None;
                }
                loop {
                    if let Some(r) = self.load_slice(now, &mut load) {
                        break r;
                    }
                }
            }
        })
    }

    /// Runs a command that allocates: parked (up to [`ALLOC_WAIT`]) while it must wait for a
    /// seed or a donation, failed with what it waited for when it may not wait.
    fn run_alloc(
        &mut self,
        now: Instant,
        id: CommandId,
        cmd: Command,
        may_wait: bool,
        deadline: Option<Instant>,
    ) -> Option<CommandResult> {
        let r = match &cmd {
            Command::CreateNetwork { name, driver, subnets, gateway, options } => self
                .create_network(now, name, driver, subnets, gateway.as_deref(), options)
                .map(Reply::Network),
            Command::EndpointCreate { sandbox: Some(_), .. } if id == APPLY_ID => Err(Err(AgentError::Dataplane(
                "an endpoint with a sandbox is created through handle_command (its reply waits for the data plane)"
                    .into(),
            ))),
            Command::EndpointCreate { network, name, ip, mac, sandbox } => {
                match self.endpoint_create(now, network, name, *ip, mac.as_deref(), sandbox.clone()) {
                    // Its interface comes first: the reply waits for the address to be durable,
                    // then for the data plane.
                    Ok(ep) if ep.sandbox.is_some() => {
                        self.ep_pending.push(PendingEp { id, ep, seq: 0, ops: None });
                        return None;
                    }
                    r => r.map(Reply::Endpoint),
                }
            }
            _ => unreachable!("only allocating commands"),
        };
        match r {
            Ok(r) => Some(Ok(r)),
            Err(Err(e)) => Some(Err(e)),
            Err(Ok(Pending(why))) => {
                let deadline = deadline.unwrap_or(now + ALLOC_WAIT);
                if may_wait && now < deadline {
                    self.alloc_parked.push(AllocParked { id, cmd, deadline, why });
                    None
                } else {
                    // A request for a share waits for its own write like any output: say so
                    // when that is what held it.
                    let disk = match self.persist.failing() {
                        Some(e) => format!(" (the data dir fails: {e})"),
                        None if self.persist.issued() > self.persist.durable() => {
                            format!(
                                " (the data dir has not made write #{} durable yet)",
                                self.persist.durable() + 1
                            )
                        }
                        None => String::new(),
                    };
                    Some(Err(AgentError::WaitedTooLong(format!("{why}{disk}"))))
                }
            }
        }
    }

    /// Runs parked allocating commands again (something they wait for may have happened).
    fn retry_alloc_parked(&mut self, now: Instant) {
        for p in std::mem::take(&mut self.alloc_parked) {
            if let Some(r) = self.run_alloc(now, p.id, p.cmd, true, Some(p.deadline)) {
                self.replies.push((p.id, r));
            }
        }
    }

    /// Attaches parked commands whose network's definition has arrived.
    fn retry_parked(&mut self, now: Instant) {
        for p in std::mem::take(&mut self.parked) {
            match self.attach(now, &p.network) {
                Err(AgentError::NoSuchNetwork(_)) => self.parked.push(p),
                r => self.replies.push((p.id, r.map(Reply::Network))),
            }
        }
    }

    fn join(&mut self, now: Instant, seeds: &[SocketAddr]) -> Result<(), AgentError> {
        self.has_seeds |= !seeds.is_empty();
        if self.acceptor_seeds.is_none() {
            self.alloc.set_seeds(seeds);
        }
        Ok(self.gossip.join(now, seeds)?)
    }

    /// Networks this node is attached to, other than `cluster`, sorted: what the store keeps so
    /// a restart re-attaches them.
    pub fn attached_networks(&self) -> Vec<String> {
        self.gossip.networks().filter(|n| *n != CLUSTER_NETWORK).map(str::to_string).collect()
    }

    /// Re-attaches a network by id after a restart (its definition may not have arrived yet).
    fn reattach(&mut self, now: Instant, id: &str) -> Result<(), AgentError> {
        Ok(self.gossip.join_network(now, id)?)
    }

    /// The definitions of the networks attached here, as the store keeps them with the
    /// attachment: the cluster's, or the one restored from an earlier life.
    pub fn attached_definitions(&self) -> Vec<NetworkDef> {
        let live: BTreeMap<String, NetworkDef> =
            self.networks().into_iter().map(|n| (n.def.id.clone(), n.def)).collect();
        self.attached_networks()
            .into_iter()
            .filter_map(|id| live.get(&id).or_else(|| self.restored.get(&id)).cloned())
            .collect()
    }

    /// Detaches a network by id, whether or not its definition has arrived.
    fn detach_id(&mut self, now: Instant, id: &str) -> Result<(), AgentError> {
        if !self.gossip.is_attached(id) {
            return Err(AgentError::NotAttached(id.to_string()));
        }
        Ok(self.gossip.leave_network(now, id)?)
    }

    fn networks(&self) -> Vec<NetworkInfo> {
        read::networks(self)
    }

    fn resolve(&self, r: &str) -> Result<NetworkInfo, AgentError> {
        read::resolve(self, r)
    }

    fn table_network(&self, r: &str) -> Result<String, AgentError> {
        read::table_network(self, r)
    }

    /// Defines a network cluster-wide and attaches this node to it.
    fn create_network(
        &mut self,
        now: Instant,
        name: &str,
        driver: &str,
        subnets: &[String],
        gateway: Option<&str>,
        user_options: &BTreeMap<String, String>,
    ) -> crate::alloc::Try<NetworkDef> {
        self.alloc.check_not_removed().map_err(Err)?;
        if user_options.contains_key(crate::alloc::VXLANID_OPTION) {
            return Err(Err(AgentError::BadOption(format!(
                "{}: VNIs are allocated by weft, from the cluster's VNI ring",
                crate::alloc::VXLANID_OPTION
            ))));
        }
        self.check_new_network(name, driver, subnets, gateway).map_err(Err)?;
        let parsed: Vec<ipnet::IpNet> = subnets.iter().map(|s| s.parse().expect("checked")).collect();
        let known = self.networks();
        for net in &parsed {
            for n in &known {
                for theirs in &n.def.subnets {
                    if let Ok(t) = theirs.parse::<ipnet::IpNet>()
                        && (t.contains(net) || net.contains(&t))
                    {
                        return Err(Err(AgentError::PoolOverlap {
                            subnet: net.to_string(),
                            other: n.def.name.clone(),
                            theirs: theirs.clone(),
                        }));
                    }
                }
            }
        }
        let taken: Vec<ipnet::IpNet> =
            known.iter().flat_map(|n| n.def.subnets.iter().filter_map(|s| s.parse().ok())).collect();
        let crate::alloc::NetworkAlloc { subnets: nets, vnis, pool_slots } = self.alloc.allocate_network(
            &self.gossip,
            now,
            &parsed,
            &taken,
            driver == "overlay",
            driver == NULL_DRIVER,
        )?;
        let id = format!("{:016x}{:016x}", self.rng.random::<u64>(), self.rng.random::<u64>());
        let mut options = user_options.clone();
        if !vnis.is_empty() {
            options.insert(
                crate::alloc::VXLANID_OPTION.to_string(),
                vnis.iter().map(u32::to_string).collect::<Vec<_>>().join(","),
            );
        }
        if driver == "overlay" {
            // The driver checks what it was given and fixes its port in the definition.
            use weft_overlay::driverapi::NetworkAllocator;
            let v4: Vec<_> = nets
                .iter()
                .filter_map(|n| match n {
                    ipnet::IpNet::V4(n) => Some(weft_overlay::driverapi::ipam_v4(*n, None)),
                    _ => None,
                })
                .collect();
            match self.overlay.network_allocate(&id, &options, &v4, &[]) {
                Ok(o) => options = o,
                Err(e) => {
                    self.alloc.abandon_network(&id, &vnis, &pool_slots);
                    return Err(Err(AgentError::BadOption(e.to_string())));
                }
            }
        }
        let mut def = NetworkDef {
            id: id.clone(),
            name: name.to_string(),
            driver: driver.to_string(),
            subnets: nets.iter().map(ToString::to_string).collect(),
            gateway: gateway.map(str::to_string),
            created_by: self.id().name.to_string(),
            options,
        };
        if def.gateway.is_none()
            && let Some(ipnet::IpNet::V4(first)) = nets.iter().find(|n| matches!(n, ipnet::IpNet::V4(_)))
        {
            def.gateway = crate::alloc::gateway_of(&def, first).map(|g| g.to_string());
        }
        let value = Bytes::from(serde_json::to_vec(&def).expect("serializable"));
        let made = self.alloc.network_created(&def, &vnis, &pool_slots).and_then(|()| {
            self.gossip.create_entry(now, CLUSTER_NETWORK, NETWORKS_TABLE, &id, value)?;
            Ok(self.gossip.join_network(now, &id)?)
        });
        if let Err(e) = made {
            self.alloc.abandon_network(&id, &vnis, &pool_slots);
            return Err(Err(e));
        }
        Ok(def)
    }

    /// Checks a new network's name, driver, subnets and gateway.
    fn check_new_network(
        &self,
        name: &str,
        driver: &str,
        subnets: &[String],
        gateway: Option<&str>,
    ) -> Result<(), AgentError> {
        validate_network_name(name)?;
        if name == CLUSTER_NETWORK {
            return Err(AgentError::Reserved(name.to_string()));
        }
        if self.networks().iter().any(|n| n.def.name == name) {
            return Err(AgentError::NetworkExists(name.to_string()));
        }
        if subnets.len() > MAX_SUBNETS {
            return Err(AgentError::BadSubnet(format!("{} subnets (at most {MAX_SUBNETS})", subnets.len())));
        }
        let mut parsed = Vec::new();
        for s in subnets {
            let net: ipnet::IpNet = s.parse().map_err(|_| AgentError::BadSubnet(s.clone()))?;
            if net.trunc() != net {
                return Err(AgentError::BadSubnet(format!(
                    "{s} (host bits set; did you mean {}?)",
                    net.trunc()
                )));
            }
            parsed.push(net);
        }
        for (i, a) in parsed.iter().enumerate() {
            if parsed[i + 1..].iter().any(|b| a.contains(b) || b.contains(a)) {
                return Err(AgentError::BadSubnet(format!("{a} overlaps another subnet of the request")));
            }
        }
        if let Some(gw) = gateway {
            let ip: std::net::IpAddr = gw.parse().map_err(|_| AgentError::BadGateway(gw.to_string()))?;
            if !parsed.iter().any(|n| n.contains(&ip)) {
                return Err(AgentError::BadGateway(format!("{gw} is not inside any --subnet")));
            }
        }
        if driver.is_empty() {
            return Err(AgentError::BadName("driver".into()));
        }
        if gateway.is_some() && parsed.is_empty() {
            return Err(AgentError::BadGateway("--gateway needs a --subnet".into()));
        }
        if let Some(gw) = gateway.and_then(|g| g.parse::<std::net::IpAddr>().ok())
            && let Some(net) = parsed.iter().find(|n| n.contains(&gw))
            && weft_ipam::net::offset_of(net, gw)
                .is_some_and(|o| weft_ipam::net::reserved_offsets(net).contains(&o))
        {
            return Err(AgentError::BadGateway(format!("{gw} is {net}'s network or broadcast address")));
        }
        Ok(())
    }

    /// Removes a network definition cluster-wide. Refused while other nodes are attached,
    /// unless `force`.
    fn remove_network(&mut self, now: Instant, r: &str, force: bool) -> Result<NetworkDef, AgentError> {
        let n = self.resolve(r)?;
        let local: Vec<Endpoint> = self.alloc.local_endpoints(&n.def.id).into_iter().cloned().collect();
        let mut others: Vec<String> = read::endpoints(self, Some(&n.def.id))
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e.node != *self.id().name)
            .map(|e| format!("{} on {}", e.name, e.node))
            .collect();
        others.extend(local.iter().map(|e| e.name.clone()));
        if !others.is_empty() && !force {
            return Err(AgentError::HasEndpoints {
                network: n.def.name.clone(),
                names: others,
                hint: " or use --force",
            });
        }
        for e in &local {
            self.alloc.remove_endpoint(&mut self.gossip, now, e)?;
        }
        if !n.peers.is_empty() && !force {
            return Err(AgentError::NetworkInUse { name: n.def.name.clone(), peers: n.peers.clone() });
        }
        if n.attached {
            self.gossip.leave_network(now, &n.def.id)?;
        }
        self.gossip.delete_entry(now, CLUSTER_NETWORK, NETWORKS_TABLE, &n.def.id)?;
        self.drop_network_alloc(&n.def.id);
        Ok(n.def)
    }

    fn attach(&mut self, now: Instant, r: &str) -> Result<NetworkDef, AgentError> {
        let n = self.resolve(r)?;
        self.gossip.join_network(now, &n.def.id)?;
        self.alloc.network_attached(&mut self.gossip, now, &n.def);
        Ok(n.def)
    }

    /// A removed network's subnet rings and endpoint records go, every key of them in the store.
    fn drop_network_alloc(&mut self, nid: &str) {
        let stored: Vec<String> = Allocator::network_prefixes(nid)
            .iter()
            .flat_map(|p| self.persist.planned_keys(p).map(str::to_string).collect::<Vec<_>>())
            .collect();
        self.alloc.network_removed(nid, stored);
    }

    /// Refuses to detach from a network this node still has endpoints in.
    fn check_no_endpoints(&self, id: &str, name: &str) -> Result<(), AgentError> {
        let local: Vec<String> = self.alloc.local_endpoints(id).iter().map(|e| e.name.clone()).collect();
        if local.is_empty() {
            Ok(())
        } else {
            Err(AgentError::HasEndpoints { network: name.to_string(), names: local, hint: "" })
        }
    }

    fn endpoint_create(
        &mut self,
        now: Instant,
        network: &str,
        name: &str,
        ip: Option<std::net::IpAddr>,
        mac: Option<&str>,
        sandbox: Option<String>,
    ) -> crate::alloc::Try<Endpoint> {
        self.alloc.check_not_removed().map_err(Err)?;
        validate_network_name(name)
            .map_err(|_| Err(AgentError::BadName(format!("endpoint name {name:?}"))))?;
        let n = self.resolve(network).map_err(Err)?;
        if let Some(s) = &sandbox {
            self.check_sandbox(&n.def, s).map_err(Err)?;
        }
        if self.alloc.local_endpoints(&n.def.id).iter().any(|e| e.name == name) {
            return Err(Err(AgentError::EndpointExists {
                name: name.into(),
                network: n.def.name,
                node: self.node_name(),
            }));
        }
        if !n.attached {
            self.gossip.join_network(now, &n.def.id).map_err(|e| Err(e.into()))?;
        }
        // (Makes the subnet rings if missing and asks for a share if this node has none.)
        self.alloc.network_attached(&mut self.gossip, now, &n.def);
        if let Some(e) =
            read::endpoints(self, Some(&n.def.id)).map_err(Err)?.into_iter().find(|e| e.name == name)
        {
            return Err(Err(AgentError::EndpointExists {
                name: name.into(),
                network: n.def.name,
                node: e.node,
            }));
        }
        let id: String = (0..4).map(|_| format!("{:016x}", self.rng.random::<u64>())).collect();
        // The driver learns the network now if this command attached it.
        self.sync_overlay_networks();
        let publish = sandbox.is_none();
        let ep =
            self.alloc.create_endpoint(&mut self.gossip, now, &n.def, name, ip, mac, id, sandbox, publish)?;
        if publish && let Err(e) = self.overlay_endpoint_created(now, &ep) {
            // Nothing of it stays: its entry and address go again.
            let _ = self.alloc.remove_endpoint(&mut self.gossip, now, &ep);
            return Err(Err(e));
        }
        Ok(ep)
    }

    /// Removes a local endpoint; also returns the end of the data-plane operations removing its
    /// interface, if any.
    fn endpoint_rm(
        &mut self,
        now: Instant,
        network: &str,
        r: &str,
    ) -> Result<(Endpoint, Option<weft_overlay::OpId>), AgentError> {
        let n = self.resolve(network)?;
        let mut all = read::endpoints(self, Some(&n.def.id))?;
        for e in self.alloc.local_endpoints(&n.def.id) {
            if !all.iter().any(|x| x.id == e.id) {
                all.push(e.clone());
            }
        }
        let e = read::find_endpoint(&all, r, &n.def.name)?;
        if self.ep_pending.iter().any(|p| p.ep.id == e.id) {
            return Err(AgentError::Dataplane(format!(
                "endpoint {} is still being created (its interface is being built): try again",
                e.name
            )));
        }
        self.alloc.remove_endpoint(&mut self.gossip, now, &e)?;
        let end = self.overlay_endpoint_removed(now, &e);
        Ok((e, end))
    }

    /// Detaches this node from a network, by reference; a network attached by id whose
    /// definition is gone (see [`NetworkInfo::missing_definition`]) is detached by its id.
    fn detach(&mut self, now: Instant, r: &str) -> Result<NetworkDef, AgentError> {
        let n = match self.resolve(r) {
            Err(AgentError::NoSuchNetwork(_)) if is_network_id(r) && self.gossip.is_attached(r) => {
                self.check_no_endpoints(r, r)?;
                self.detach_id(now, r)?;
                return Ok(self.restored.get(r).cloned().unwrap_or_else(|| NetworkDef::id_only(r)));
            }
            other => other?,
        };
        if !n.attached {
            return Err(AgentError::NotAttached(n.def.name));
        }
        self.check_no_endpoints(&n.def.id, &n.def.name)?;
        self.gossip.leave_network(now, &n.def.id)?;
        Ok(n.def)
    }

    // ----- diagnostic table writes -------------------------------------------------------------

    fn check_table_write(&self, network: &str, table: &str, force: bool) -> Result<(), AgentError> {
        if force {
            return Ok(());
        }
        if network == CLUSTER_NETWORK {
            return Err(AgentError::Protected(format!("network {CLUSTER_NETWORK:?} is reserved")));
        }
        if self.gossip.table_spec(table).is_some() {
            return Err(AgentError::Protected(format!("table {table:?} belongs to a driver")));
        }
        Ok(())
    }

    /// Creates or updates an entry (networkdb's diagnostic write).
    fn table_put(
        &mut self,
        now: Instant,
        network: &str,
        table: &str,
        key: &str,
        value: Bytes,
        force: bool,
    ) -> Result<(), AgentError> {
        let nid = self.table_network(network)?;
        self.check_table_write(&nid, table, force)?;
        Ok(self.gossip.put_entry(now, &nid, table, key, value)?)
    }

    /// A live value, as `table get` reads it (here from the core; the API reads the view).
    pub fn table_get(&self, network: &str, table: &str, key: &str) -> Result<Option<Bytes>, AgentError> {
        read::table_get(self, network, table, key)
    }

    /// What `dump` shows (here from the core; the API reads the view).
    pub fn dump(&self, network: Option<&str>, table: Option<&str>) -> Result<Dump, AgentError> {
        read::dump(self, network, table)
    }

    fn table_rm(
        &mut self,
        now: Instant,
        network: &str,
        table: &str,
        key: &str,
        force: bool,
    ) -> Result<(), AgentError> {
        let nid = self.table_network(network)?;
        self.check_table_write(&nid, table, force)?;
        Ok(self.gossip.delete_entry(now, &nid, table, key)?)
    }

    /// Checks a load as a whole before anything is written; returns the network id.
    fn check_load(
        &self,
        network: &str,
        table: &str,
        pairs: &[(String, String)],
        force: bool,
    ) -> Result<String, AgentError> {
        let nid = self.table_network(network)?;
        self.check_table_write(&nid, table, force)?;
        if !self.gossip.is_attached(&nid) {
            return Err(AgentError::NotAttached(network.to_string()));
        }
        let max_value = self.gossip.config().max_stream_frame / 2;
        for (k, v) in pairs {
            if k.is_empty() || k.len() > 1024 || k.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(AgentError::BadName(format!("key {k:?}")));
            }
            if v.len() > max_value {
                return Err(AgentError::BadName(format!(
                    "value of {k:?}: {} bytes (at most {max_value})",
                    v.len()
                )));
            }
        }
        Ok(nid)
    }

    /// Applies the next [`LOAD_SLICE`] writes of a load; its result once the last is applied.
    fn load_slice(&mut self, now: Instant, load: &mut Load) -> Option<CommandResult> {
        if !self.gossip.is_attached(&load.network) {
            // Detached (or left) while the load went on: what is written went with it.
            return Some(Err(AgentError::NotAttached(load.network.clone())));
        }
        let end = (load.next + LOAD_SLICE).min(load.pairs.len());
        for (k, v) in &load.pairs[load.next..end] {
            let value = Bytes::copy_from_slice(v.as_bytes());
            if let Err(e) = self.gossip.put_entry(now, &load.network, &load.table, k, value) {
                return Some(Err(e.into()));
            }
        }
        load.next = end;
        (end == load.pairs.len()).then_some(Ok(Reply::Written(end)))
    }
}

impl TableRead for Agent {
    fn node_name(&self) -> String {
        self.id().name.to_string()
    }

    fn attached(&self) -> Vec<String> {
        self.gossip.networks().map(str::to_string).collect()
    }

    fn is_attached(&self, network: &str) -> bool {
        self.gossip.is_attached(network)
    }

    fn tables_of(&self, network: &str) -> Vec<String> {
        self.gossip.tables(network)
    }

    fn live(&self, network: &str, table: &str) -> Vec<(String, Bytes)> {
        let mut out = Vec::new();
        self.gossip.walk(network, table, |k, v, _| {
            out.push((k.to_string(), v.clone()));
            true
        });
        out
    }

    fn entries(&self, network: &str, table: &str) -> Vec<(weft_gossip::EntryView, Option<Decoded>)> {
        self.gossip
            .table(network, table)
            .into_iter()
            .map(|e| {
                let d = self.decode(table, &e);
                (e, d)
            })
            .collect()
    }

    fn live_value(&self, network: &str, table: &str, key: &str) -> Option<Bytes> {
        self.gossip.get_entry(network, table, key)
    }

    fn peers(&self, network: &str) -> Vec<String> {
        self.gossip.network_peers(network).iter().map(|p| p.name.to_string()).collect()
    }

    fn restored(&self, id: &str) -> Option<NetworkDef> {
        self.restored.get(id).cloned()
    }
}

/// Subnets one network may have.
pub const MAX_SUBNETS: usize = 64;
/// The driver of networks with no addressing (Docker's `none`): no subnet from the default
/// pool, no VNI.
pub const NULL_DRIVER: &str = "null";

fn validate_network_name(name: &str) -> Result<(), AgentError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(AgentError::BadName(format!(
            "network name {name:?} (use [A-Za-z0-9][A-Za-z0-9_.-]*, at most 64)"
        )))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, i], 7946))
    }

    /// Agents wired back to back, every transmit delivered at once unless cut off.
    pub struct Net {
        pub agents: Vec<Agent>,
        pub now: Instant,
        pub cut: bool,
        /// Replies that came out: (agent, command id, result).
        pub replies: Vec<(usize, CommandId, CommandResult)>,
        /// Each agent's disk: what its batches wrote.
        pub disks: Vec<BTreeMap<String, Vec<u8>>>,
        /// Agents that are down: no timers, nothing in or out.
        pub down: std::collections::BTreeSet<usize>,
        /// Each agent's data plane, if it has one (see `with_dataplanes`): the host's, it
        /// outlives the agent.
        pub dataplanes: Vec<Option<weft_overlay::MemDataplane>>,
        cfg: GossipConfig,
        next_id: CommandId,
    }

    /// A node's disk with the identity keys the store wrote when the data dir was made.
    pub fn with_identity(disk: &BTreeMap<String, Vec<u8>>, name: &str) -> BTreeMap<String, Vec<u8>> {
        let mut image = disk.clone();
        let made = NodeState {
            name: name.into(),
            instance: 0,
            generation: 1,
            ltime_hwm: 0,
            networks: vec![],
            sweep_pending: false,
            definitions: vec![],
            alloc: BTreeMap::new(),
        };
        for (k, v) in made.to_image() {
            image.entry(k).or_insert(v);
        }
        image
    }

    impl Net {
        pub fn new(n: u8) -> Net {
            Net::with_cfg(n, GossipConfig::lan(8))
        }

        pub fn with_cfg(n: u8, cfg: GossipConfig) -> Net {
            let now = Instant::now();
            let agents = (1..=n)
                .map(|i| {
                    Agent::new(cfg.clone(), NodeId::new(format!("a{i}"), addr(i), 1), i as u64, 0, now)
                        .unwrap()
                })
                .collect();
            let disks = vec![BTreeMap::new(); n as usize];
            let mut net = Net {
                agents,
                now,
                cut: false,
                replies: Vec::new(),
                disks,
                down: Default::default(),
                dataplanes: vec![None; n as usize],
                cfg: cfg.clone(),
                next_id: 1,
            };
            // The first founds the cluster (no seeds), the others join it.
            net.agents[0].join(now, &[]).unwrap();
            for i in 1..net.agents.len() {
                net.agents[i].join(now, &[addr(1)]).unwrap();
            }
            net.run(Duration::from_secs(3));
            net
        }

        pub fn pump(&mut self) {
            loop {
                let mut moved = false;
                for i in 0..self.agents.len() {
                    if self.down.contains(&i) {
                        continue;
                    }
                    // The test is the disk: every batch is durable at once.
                    while let Some(b) = self.agents[i].poll_persist() {
                        for (k, v) in b.ops {
                            match v {
                                Some(v) => self.disks[i].insert(k, v),
                                None => self.disks[i].remove(&k),
                            };
                        }
                        self.agents[i].handle_persisted(self.now, b.seq);
                    }
                    if let Some(dp) = self.dataplanes[i].as_mut() {
                        use weft_overlay::Dataplane;
                        while let Some((id, op)) = self.agents[i].poll_dataplane() {
                            let r = dp.apply(&op);
                            self.agents[i].handle_dataplane_done(self.now, id, r);
                            moved = true;
                        }
                    }
                    while let Some(out) = self.agents[i].poll_output() {
                        let t = match out {
                            Output::Transmit(t) => t,
                            Output::Reply { id, result } => {
                                self.replies.push((i, id, result));
                                continue;
                            }
                        };
                        moved = true;
                        let Some(j) = self.agents.iter().position(|a| a.id().addr == t.dst) else { continue };
                        if self.down.contains(&j) {
                            continue;
                        }
                        if self.cut && (i == 0) != (j == 0) {
                            continue;
                        }
                        let from = self.agents[i].id().addr;
                        match t.kind {
                            weft_gossip::TransmitKind::Datagram => {
                                self.agents[j].handle_datagram(self.now, from, &t.bytes)
                            }
                            weft_gossip::TransmitKind::Stream => {
                                self.agents[j].handle_stream(self.now, from, &t.bytes)
                            }
                        }
                    }
                }
                if !moved {
                    break;
                }
            }
        }

        /// Gives every agent an in-memory data plane.
        pub fn with_dataplanes(mut self) -> Net {
            for i in 0..self.agents.len() {
                self.dataplanes[i] = Some(weft_overlay::MemDataplane::new());
                self.agents[i].set_dataplane(true);
            }
            self.pump();
            self
        }

        /// Runs a command on agent `i` through the event loop's interface, until it answers.
        pub fn cmd(&mut self, i: usize, c: Command) -> CommandResult {
            let id = self.next_id;
            self.next_id += 1;
            self.agents[i].handle_command(self.now, id, c);
            for _ in 0..500 {
                self.pump();
                if let Some(p) = self.replies.iter().position(|r| r.0 == i && r.1 == id) {
                    return self.replies.remove(p).2;
                }
                self.run(Duration::from_millis(20));
            }
            panic!("no reply from agent {i} after 10 s");
        }

        /// Agent `i` crashes and comes back from its disk: cluster tables, which live in memory,
        /// are gone with it.
        pub fn reboot(&mut self, i: usize) {
            let image = with_identity(&self.disks[i], &self.agents[i].id().name);
            let mut state = NodeState::from_image(&image).unwrap().unwrap();
            state.generation = self.agents[i].id().generation + 1;
            state.ltime_hwm = state.ltime_hwm.max(self.agents[i].gossip().ltime());
            let mut a =
                Agent::boot(self.cfg.clone(), &state, addr(i as u8 + 1), 50 + i as u64, self.now).unwrap();
            let seeds: Vec<SocketAddr> =
                (1..=self.agents.len() as u8).filter(|&j| j != i as u8 + 1).map(addr).collect();
            a.join(self.now, &seeds).unwrap();
            if self.dataplanes[i].is_some() {
                a.set_dataplane(true);
            }
            self.agents[i] = a;
            self.down.remove(&i);
        }

        /// The reply to command `id` of agent `i`, which must have come.
        pub fn take_reply(&mut self, i: usize, id: CommandId) -> CommandResult {
            let p = self.replies.iter().position(|r| r.0 == i && r.1 == id).expect("the reply came");
            self.replies.remove(p).2
        }

        pub fn run(&mut self, d: Duration) {
            let end = self.now + d;
            while self.now < end {
                self.now += Duration::from_millis(20);
                for (i, a) in self.agents.iter_mut().enumerate() {
                    if !self.down.contains(&i) {
                        a.handle_timeout(self.now);
                    }
                }
                self.pump();
            }
        }
    }

    impl Agent {
        pub(crate) fn create_net(
            &mut self,
            now: Instant,
            name: &str,
            driver: &str,
            subnets: &[String],
            gateway: Option<&str>,
        ) -> Result<NetworkDef, AgentError> {
            self.create_network(now, name, driver, subnets, gateway, &BTreeMap::new()).map_err(|e| match e {
                Ok(p) => AgentError::WaitedTooLong(p.0),
                Err(e) => e,
            })
        }

        pub(crate) fn without_def(&self) -> Vec<String> {
            read::attached_without_definition(self)
        }

        /// Every output that came out, transmits and replies.
        fn outputs(&mut self) -> Vec<Output> {
            std::iter::from_fn(|| self.poll_output()).collect()
        }

        /// The disk: makes every batch handed out durable; returns the last sequence.
        fn persist_all(&mut self, now: Instant) -> u64 {
            let batches: Vec<PersistBatch> = std::iter::from_fn(|| self.poll_persist()).collect();
            let last = batches.last().map_or(0, |b| b.seq);
            if last > 0 {
                self.handle_persisted(now, last);
            }
            last
        }
    }

    fn replies(outs: &[Output]) -> Vec<(CommandId, &CommandResult)> {
        outs.iter()
            .filter_map(|o| match o {
                Output::Reply { id, result } => Some((*id, result)),
                Output::Transmit(_) => None,
            })
            .collect()
    }

    fn transmits(outs: &[Output]) -> usize {
        outs.iter().filter(|o| matches!(o, Output::Transmit(_))).count()
    }

    /// A network that needs no cluster ring (its own subnet, a driver without VNIs), so a
    /// lone agent that never ticked can create it.
    fn create(name: &str) -> Command {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let subnet = format!("172.{}.{}.0/24", 16 + (n >> 8) % 16, n & 255);
        Command::CreateNetwork {
            name: name.into(),
            driver: "test".into(),
            subnets: vec![subnet],
            gateway: None,
            options: Default::default(),
        }
    }

    #[test]
    fn an_output_never_leaves_before_the_batch_it_depends_on_and_one_that_depends_on_none_never_waits() {
        let now = Instant::now();
        let cfg = GossipConfig::lan(8);
        let mut a = Agent::new(cfg.clone(), NodeId::new("a1", addr(1), 1), 1, 0, now).unwrap();
        let mut b = Agent::new(cfg, NodeId::new("a2", addr(2), 1), 2, 0, now).unwrap();
        // A new node's clock has no durable lease yet: nothing it says may leave before it.
        a.handle_command(now, 1, create("green"));
        let held = a.outputs();
        assert!(held.is_empty(), "left before its lease and definition were durable: {held:?}");
        let batches: Vec<PersistBatch> = std::iter::from_fn(|| a.poll_persist()).collect();
        let last = batches.last().unwrap().seq;
        assert!(last >= 2, "a lease and the attachment: {batches:?}");
        // Durable up to the one before the last: the reply still waits.
        a.handle_persisted(now, last - 1);
        assert!(replies(&a.outputs()).is_empty(), "the reply left before its batch was durable");
        a.handle_persisted(now, last);
        let outs = a.outputs();
        assert!(matches!(replies(&outs)[..], [(1, Ok(Reply::Network(_)))]), "{outs:?}");
        // b joins a: its SWIM packets carry no Lamport time and leave at once; its reply
        // waits for its first lease.
        b.handle_command(now, 9, Command::Join { seeds: vec![addr(1)] });
        let outs = b.outputs();
        assert!(replies(&outs).is_empty());
        let join: Vec<Transmit> = outs
            .into_iter()
            .filter_map(|o| match o {
                Output::Transmit(t) => Some(t),
                Output::Reply { .. } => None,
            })
            .collect();
        assert!(!join.is_empty());
        assert!(
            join.iter().all(|t| wire::open_envelope(&t.bytes).is_ok_and(|(ty, _)| ty == FrameType::Swim))
        );
        b.persist_all(now);
        assert!(matches!(replies(&b.outputs())[..], [(9, Ok(Reply::Done))]));
        // a attaches another network: a batch goes to a disk that stalls.
        a.handle_command(now, 2, create("blue"));
        let pending: Vec<PersistBatch> = std::iter::from_fn(|| a.poll_persist()).collect();
        assert!(!pending.is_empty());
        assert!(replies(&a.outputs()).is_empty(), "held behind the stalled disk");
        // Meanwhile b's membership traffic reaches a: a's answers depend on no write and leave
        // at once, ahead of the held reply.
        for t in &join {
            a.handle_datagram(now, addr(2), &t.bytes);
        }
        let outs = a.outputs();
        assert!(transmits(&outs) > 0, "a's answer to b waited behind an unrelated write");
        assert!(replies(&outs).is_empty());
        // The disk catches up: the reply comes out.
        a.handle_persisted(now, pending.last().unwrap().seq);
        let outs = a.outputs();
        assert!(matches!(replies(&outs)[..], [(2, Ok(Reply::Network(_)))]), "{outs:?}");
    }

    #[test]
    fn a_write_waits_for_its_own_networks_attachment_and_not_for_anothers() {
        let now = Instant::now();
        let mut a = Agent::new(GossipConfig::lan(8), NodeId::new("a1", addr(1), 1), 1, 0, now).unwrap();
        a.apply(now, create("g1")).unwrap();
        a.persist_all(now);
        a.outputs();
        // g2's attachment goes to a disk that stalls.
        a.handle_command(now, 1, create("g2"));
        let put = |net: &str| Command::TablePut {
            network: net.into(),
            table: "t".into(),
            key: "k".into(),
            value: Bytes::from_static(b"v"),
            force: false,
        };
        a.handle_command(now, 2, put("g2"));
        a.handle_command(now, 3, put("g1"));
        let outs = a.outputs();
        assert!(
            matches!(replies(&outs)[..], [(3, Ok(Reply::Done))]),
            "only g1's write is answered: {outs:?}"
        );
        a.persist_all(now);
        let outs = a.outputs();
        let ids: Vec<CommandId> = replies(&outs).iter().map(|r| r.0).collect();
        assert_eq!(ids, vec![1, 2], "{outs:?}");
    }

    #[test]
    fn an_attach_waits_for_a_definition_on_its_way_and_gives_up_after_a_while() {
        let mut net = Net::new(2);
        net.cut = true;
        let now = net.now;
        let def = match net.agents[0].apply(now, create("green")) {
            Ok(Reply::Network(d)) => d,
            other => panic!("{other:?}"),
        };
        net.agents[1].handle_command(now, 5, Command::Attach { network: "green".into() });
        net.agents[1].handle_command(now, 6, Command::Attach { network: "nothere".into() });
        net.run(Duration::from_millis(500));
        assert!(net.replies.is_empty(), "both wait: {:?}", net.replies);
        assert!(net.agents[1].waiting_for(5).is_some_and(|w| w.contains("green")));
        net.cut = false;
        net.run(Duration::from_secs(1));
        assert!(
            matches!(&net.replies[..], [(1, 5, Ok(Reply::Network(d)))] if *d == def),
            "attached once the definition arrived: {:?}",
            net.replies
        );
        assert!(net.agents[1].gossip().is_attached(&def.id));
        net.run(ATTACH_WAIT);
        let last = net.replies.last().unwrap();
        assert!(
            matches!(last, (1, 6, Err(AgentError::NoSuchNetwork(m))) if m.contains("waited")),
            "{last:?}"
        );
        assert_eq!(net.agents[1].waiting_for(6), None);
    }

    #[test]
    fn a_load_is_applied_in_slices_with_inputs_served_between_and_answered_after_the_last() {
        let mut net = Net::new(2);
        let now = net.now;
        net.agents[0].apply(now, create("g")).unwrap();
        let pairs: Vec<(String, String)> =
            (0..2 * LOAD_SLICE + 10).map(|i| (format!("k{i}"), format!("v{i}"))).collect();
        let load = Command::TableLoad { network: "g".into(), table: "t".into(), pairs, force: false };
        net.agents[0].handle_command(now, 3, load);
        assert!(net.agents[0].has_work());
        let len = |a: &Agent| a.gossip().table_len(&a.resolve("g").unwrap().def.id, "t");
        assert_eq!(len(&net.agents[0]), 0, "nothing applied before the first slice");
        for slice in 1..=3 {
            net.agents[0].handle_work(net.now);
            assert_eq!(len(&net.agents[0]), (slice * LOAD_SLICE).min(2 * LOAD_SLICE + 10));
            if slice < 3 {
                assert!(net.agents[0].waiting_for(3).is_some_and(|w| w.contains("of 2058")));
                // Between slices the node goes on with everything else.
                net.run(Duration::from_millis(40));
                assert!(net.replies.is_empty(), "answered before the last slice");
            }
        }
        assert!(!net.agents[0].has_work());
        net.pump();
        assert!(matches!(&net.replies[..], [(0, 3, Ok(Reply::Written(2058)))]), "{:?}", net.replies);
        // A bad load is refused whole, before anything is written.
        let bad = vec![("ok".to_string(), "1".to_string()), ("has space".to_string(), "2".to_string())];
        let cmd = Command::TableLoad { network: "g".into(), table: "u".into(), pairs: bad, force: false };
        net.agents[0].handle_command(net.now, 4, cmd);
        net.pump();
        assert!(matches!(&net.replies[1], (0, 4, Err(AgentError::BadName(_)))), "{:?}", net.replies);
        assert!(!net.agents[0].has_work());
    }

    /// A watcher that records what it is told.
    struct Record(Arc<std::sync::Mutex<Vec<String>>>);

    impl TableWatcher for Record {
        fn event_notify(
            &mut self,
            _: &str,
            _: &str,
            key: &str,
            _: Option<&[u8]>,
            value: Option<&[u8]>,
            _: weft_gossip::Version<'_>,
        ) {
            let what = if value.is_some() { "set" } else { "gone" };
            self.0.lock().unwrap().push(format!("{what} {key}"));
        }

        fn decode_table_entry(&self, _: &str, key: &str, _: &[u8]) -> (String, BTreeMap<String, String>) {
            (key.to_string(), BTreeMap::new())
        }
    }

    #[test]
    fn events_are_applied_inside_every_input_without_anyone_polling() {
        let mut net = Net::new(2);
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let now = net.now;
        net.agents[1]
            .register_table(
                now,
                "eps",
                TableSpec::node_owned(ObjectType::Endpoint),
                Box::new(Record(seen.clone())),
            )
            .unwrap();
        net.agents[0]
            .register_table(now, "eps", TableSpec::node_owned(ObjectType::Endpoint), Box::new(Ignore))
            .unwrap();
        let id = match net.agents[0].apply(now, create("g")) {
            Ok(Reply::Network(d)) => d.id,
            other => panic!("{other:?}"),
        };
        net.run(Duration::from_secs(1));
        net.agents[1].apply(net.now, Command::Attach { network: "g".into() }).unwrap();
        net.run(Duration::from_secs(1));
        let put = Command::TablePut {
            network: "g".into(),
            table: "eps".into(),
            key: "e1".into(),
            value: Bytes::from_static(b"x"),
            force: true,
        };
        net.agents[0].apply(net.now, put).unwrap();
        net.run(Duration::from_secs(1));
        // Nobody called poll_event (recording is off, so there is nothing to poll either).
        assert_eq!(net.agents[1].poll_event(), None);
        assert_eq!(*seen.lock().unwrap(), vec!["set e1"]);
        // The network is removed on a1: a2 is told of the entry going and detaches by itself.
        net.agents[0].apply(net.now, Command::RemoveNetwork { network: "g".into(), force: true }).unwrap();
        net.run(Duration::from_secs(2));
        assert_eq!(*seen.lock().unwrap(), vec!["set e1", "gone e1"]);
        assert!(!net.agents[1].gossip().is_attached(&id));
    }

    /// Decodes every value as its length.
    struct Lengths;

    impl TableWatcher for Lengths {
        fn decode_table_entry(&self, _: &str, key: &str, value: &[u8]) -> (String, BTreeMap<String, String>) {
            (key.to_string(), BTreeMap::from([("len".to_string(), value.len().to_string())]))
        }
    }

    #[test]
    fn a_table_registered_after_the_view_exists_is_decoded_in_it() {
        let now = Instant::now();
        let mut a = Agent::new(GossipConfig::lan(8), NodeId::new("a1", addr(1), 1), 1, 0, now).unwrap();
        a.apply(now, create("g")).unwrap();
        let put = Command::TablePut {
            network: "g".into(),
            table: "eps".into(),
            key: "e".into(),
            value: Bytes::from_static(b"abc"),
            force: true,
        };
        a.apply(now, put).unwrap();
        let view = a.attach_view(now);
        let decoded = |view: &View| {
            let r = crate::view::ViewRead::new(view);
            let d = read::dump(&r, Some("g"), Some("eps")).unwrap();
            d.networks[0].tables[0].entries[0].decoded.clone()
        };
        assert_eq!(decoded(&view), None, "no driver yet");
        a.register_table(now, "eps", TableSpec::node_owned(ObjectType::Endpoint), Box::new(Lengths)).unwrap();
        let d = decoded(&view).expect("decoded once the driver registered");
        assert_eq!(d.fields["len"], "3");
    }

    /// A dump with the times that differ between two reads of one state taken out.
    fn timeless(mut d: Dump) -> Dump {
        for n in &mut d.networks {
            for t in &mut n.tables {
                for e in &mut t.entries {
                    e.age_ms = 0;
                    e.reap_in_ms = e.reap_in_ms.map(|_| 0);
                }
            }
        }
        d
    }

    #[test]
    fn the_view_reads_its_own_writes_and_matches_the_core_through_hides_detaches_and_reaps() {
        let cfg = GossipConfig { reap_after: Duration::from_secs(5), ..GossipConfig::lan(8) };
        let mut net = Net::with_cfg(3, cfg);
        let now = net.now;
        let view = net.agents[0].attach_view(now);
        let check = |net: &Net, what: &str| {
            let r = crate::view::ViewRead { view: &view, snap: view.snapshot(), now: net.now };
            assert_eq!(
                timeless(read::dump(&r, None, None).unwrap()),
                timeless(net.agents[0].dump(None, None).unwrap()),
                "the view and the core disagree {what}"
            );
        };
        check(&net, "after the initial fill");
        net.agents[0].handle_command(now, 1, create("g"));
        let put = |k: &str| Command::TablePut {
            network: "g".into(),
            table: "t".into(),
            key: k.into(),
            value: Bytes::from_static(b"v"),
            force: false,
        };
        net.agents[0].handle_command(now, 2, put("mine"));
        // A diagnostic write to a table no driver registered, in the reserved network.
        let diag = Command::TablePut {
            network: "cluster".into(),
            table: "diag".into(),
            key: "d".into(),
            value: Bytes::from_static(b"1"),
            force: true,
        };
        net.agents[0].handle_command(now, 3, diag);
        // Read your writes: by the time a reply is out, the view holds what it wrote.
        net.agents[0].persist_all(now);
        let outs = net.agents[0].outputs();
        assert_eq!(replies(&outs).len(), 3, "{outs:?}");
        let r = crate::view::ViewRead::new(&view);
        assert_eq!(read::table_get(&r, "g", "t", "mine").unwrap(), Some(Bytes::from_static(b"v")));
        assert_eq!(read::table_get(&r, "cluster", "diag", "d").unwrap(), Some(Bytes::from_static(b"1")));
        assert!(read::resolve(&r, "g").unwrap().attached, "the snapshot knows the attachment");
        net.run(Duration::from_secs(1));
        for i in 1..3 {
            net.agents[i].apply(net.now, Command::Attach { network: "g".into() }).unwrap();
            let cmd = Command::TablePut {
                network: "g".into(),
                table: "t".into(),
                key: format!("k{i}"),
                value: Bytes::from_static(b"w"),
                force: false,
            };
            net.agents[i].apply(net.now, cmd).unwrap();
        }
        net.run(Duration::from_secs(2));
        check(&net, "after remote writes");
        assert_eq!(read::resolve(&crate::view::ViewRead::new(&view), "g").unwrap().peers, vec!["a2", "a3"]);
        // a3 is cut off: a1 hides its entry once it is declared failed.
        let a3 = net.agents.remove(2);
        let k2 = |a: &Agent| {
            let d = a.dump(Some("g"), Some("t")).unwrap();
            d.networks[0].tables[0].entries.iter().find(|e| e.key == "k2").map(|e| e.state.clone())
        };
        for _ in 0..40 {
            net.run(Duration::from_millis(500));
            if k2(&net.agents[0]).as_deref() == Some("hidden") {
                break;
            }
        }
        assert_eq!(k2(&net.agents[0]).as_deref(), Some("hidden"), "a3's entry is hidden on a1");
        check(&net, "after a3's entries were hidden");
        net.run(Duration::from_secs(10));
        assert_eq!(k2(&net.agents[0]), None, "and reaped");
        check(&net, "after a3's hidden entry was reaped");
        net.agents.push(a3);
        // A delete, then its tombstone reaped.
        net.agents[0]
            .apply(
                net.now,
                Command::TableRm { network: "g".into(), table: "t".into(), key: "mine".into(), force: false },
            )
            .unwrap();
        net.run(Duration::from_secs(1));
        check(&net, "after a delete");
        net.run(Duration::from_secs(10));
        check(&net, "after the tombstone was reaped");
        // Detaching drops the network from the view.
        net.agents[0].apply(net.now, Command::Detach { network: "g".into() }).unwrap();
        net.run(Duration::from_secs(1));
        check(&net, "after the detach");
    }

    /// A driver's watcher that ignores everything (the tests read the tables directly).
    struct Ignore;

    impl TableWatcher for Ignore {
        fn decode_table_entry(&self, _: &str, key: &str, _: &[u8]) -> (String, BTreeMap<String, String>) {
            (key.to_string(), BTreeMap::new())
        }
    }

    #[test]
    fn a_network_attached_by_id_before_its_definition_arrives_takes_driver_writes() {
        let mut net = Net::new(2);
        let v = Bytes::from_static(b"10.0.0.2");
        let now = net.now;
        for a in &mut net.agents {
            let spec = TableSpec::node_owned(ObjectType::Endpoint);
            a.register_table(now, "eps", spec, Box::new(Ignore)).unwrap();
            let refused = a.register_table(
                now,
                NETWORKS_TABLE,
                TableSpec::cluster(ObjectType::Network),
                Box::new(Ignore),
            );
            assert!(matches!(refused, Err(AgentError::Reserved(_))), "{refused:?}");
        }
        // a2 is restarting: it re-attaches by id before the definition reaches it.
        net.cut = true;
        let now = net.now;
        let def = net.agents[0].create_net(now, "green", "test", &["172.30.1.0/24".into()], None).unwrap();
        let a2 = &mut net.agents[1];
        assert!(a2.resolve("green").is_err(), "the definition has not arrived");
        a2.reattach(now, &def.id).unwrap();
        a2.table_put(now, &def.id, "eps", "ep2", v.clone(), true).unwrap();
        assert_eq!(a2.table_get(&def.id, "eps", "ep2").unwrap(), Some(v.clone()));
        net.cut = false;
        net.run(Duration::from_secs(5));
        assert_eq!(net.agents[0].table_get("green", "eps", "ep2").unwrap(), Some(v), "it replicated");
        // Detaching by id works whatever a2 knows of the definition, and only once.
        let now = net.now;
        let a2 = &mut net.agents[1];
        a2.detach_id(now, &def.id).unwrap();
        assert!(matches!(a2.detach_id(now, &def.id), Err(AgentError::NotAttached(_))));
        net.run(Duration::from_secs(5));
        assert_eq!(net.agents[0].table_get("green", "eps", "ep2").unwrap(), None, "its entries went with it");
    }

    #[test]
    fn a_network_whose_definition_is_gone_altogether_stays_attached_and_flagged() {
        let cfg = GossipConfig { reap_after: Duration::from_secs(10), ..GossipConfig::lan(8) };
        let mut net = Net::with_cfg(3, cfg.clone());
        let now = net.now;
        let def = net.agents[1].create_net(now, "green", "test", &["172.30.2.0/24".into()], None).unwrap();
        net.run(Duration::from_secs(1));
        let now = net.now;
        net.agents[0].attach(now, "green").unwrap();
        net.run(Duration::from_secs(2));
        assert_eq!(net.agents[0].attached_definitions(), vec![def.clone()]);
        // a1 is cut off (down); the network is removed and its tombstone reaped meanwhile.
        net.cut = true;
        let now = net.now;
        net.agents[1].remove_network(now, "green", true).unwrap();
        net.run(Duration::from_secs(30));
        let ltime = net.agents[0].gossip().ltime() + 100;
        // a1 restarts from its store: its attachment and the definition it persisted.
        let state = NodeState {
            name: "a1".into(),
            instance: 0,
            generation: 2,
            ltime_hwm: ltime,
            networks: vec![def.id.clone()],
            sweep_pending: false,
            definitions: vec![def.clone()],
            alloc: BTreeMap::new(),
        };
        let mut a1 = Agent::boot(cfg, &state, addr(1), 2, net.now).unwrap();
        a1.apply(net.now, Command::Join { seeds: vec![addr(2), addr(3)] }).unwrap();
        net.agents[0] = a1;
        net.cut = false;
        net.run(Duration::from_secs(15));
        // No peer holds a definition or a tombstone: that proves nothing (a whole-cluster
        // outage looks the same), so the network stays attached, flagged, with the persisted
        // definition, and the operator detaches it by id.
        assert_eq!(net.agents[0].attached_networks(), vec![def.id.clone()]);
        assert_eq!(net.agents[0].without_def(), vec![def.id.clone()]);
        assert_eq!(TableRead::restored(&net.agents[0], &def.id), Some(def.clone()));
        assert_eq!(net.agents[0].attached_definitions(), vec![def.clone()], "still persisted");
        let now = net.now;
        let detached = net.agents[0].detach(now, &def.id).unwrap();
        assert_eq!(detached.id, def.id);
        assert_eq!(detached, def, "answered with the persisted definition");
        assert!(net.agents[0].attached_networks().is_empty());
    }

    #[test]
    fn of_two_copies_of_one_data_dir_the_one_started_later_stops() {
        let mut net = Net::new(2);
        // A clone of a1's data dir (same name, same instance) starts at another address.
        let clone = NodeId::new("a1", addr(2), 5);
        let mut a = Agent::new(GossipConfig::lan(8), clone, 99, 10_000, net.now).unwrap();
        a.join(net.now, &[addr(1)]).unwrap();
        net.agents[1] = a;
        net.run(Duration::from_secs(10));
        let refused = net.agents[1].refused().map(str::to_string);
        assert!(refused.as_deref().is_some_and(|r| r.contains("copied")), "{refused:?}");
        assert_eq!(net.agents[0].refused(), None, "the original keeps running");
        assert_eq!(net.agents[1].id().generation, 5, "a copy is never moved above");
    }

    #[test]
    fn a_network_removed_while_a_node_was_down_is_detached_when_it_returns() {
        let mut net = Net::new(2);
        let now = net.now;
        let def = net.agents[0].create_net(now, "green", "test", &["172.30.3.0/24".into()], None).unwrap();
        net.run(Duration::from_secs(1));
        let now = net.now;
        net.agents[1].attach(now, "green").unwrap();
        net.run(Duration::from_secs(2));
        // a2 goes down; meanwhile a1 removes the network.
        net.cut = true;
        let ltime = net.agents[1].gossip().ltime();
        let now = net.now;
        net.agents[0].remove_network(now, "green", true).unwrap();
        net.run(Duration::from_secs(5));
        // a2 restarts: a new life re-attaches the network by id, before any definition
        // (or its tombstone) reaches it, as the shell does from its persisted state.
        let id = NodeId::new("a2", addr(2), 2);
        let mut a2 = Agent::new(GossipConfig::lan(8), id, 22, ltime, net.now).unwrap();
        a2.reattach(net.now, &def.id).unwrap();
        a2.join(net.now, &[addr(1)]).unwrap();
        assert_eq!(a2.without_def(), vec![def.id.clone()], "flagged until it hears");
        net.agents[1] = a2;
        net.cut = false;
        net.run(Duration::from_secs(10));
        assert!(net.agents[1].attached_networks().is_empty(), "the tombstone detached it");
        assert!(net.agents[1].without_def().is_empty());
    }

    #[test]
    fn network_definitions_are_cluster_wide_and_validated() {
        let mut net = Net::new(3);
        let now = net.now;
        let a = &mut net.agents[0];
        let def = a.create_net(now, "blue", "overlay", &["10.1.0.0/24".into()], Some("10.1.0.1")).unwrap();
        assert_eq!(def.id.len(), 32);
        assert!(matches!(a.create_net(now, "blue", "overlay", &[], None), Err(AgentError::NetworkExists(_))));
        assert!(matches!(
            a.create_net(now, "x", "overlay", &["10.1.0.7/24".into()], None),
            Err(AgentError::BadSubnet(_))
        ));
        assert!(matches!(
            a.create_net(now, "y", "overlay", &["nope".into()], None),
            Err(AgentError::BadSubnet(_))
        ));
        assert!(matches!(
            a.create_net(now, "z", "overlay", &["10.2.0.0/24".into(), "10.2.0.0/25".into()], None),
            Err(AgentError::BadSubnet(_))
        ));
        assert!(matches!(
            a.create_net(now, "w", "overlay", &["10.3.0.0/24".into()], Some("10.4.0.1")),
            Err(AgentError::BadGateway(_))
        ));
        assert!(matches!(a.create_net(now, "cluster", "overlay", &[], None), Err(AgentError::Reserved(_))));
        assert!(matches!(a.create_net(now, "bad name", "overlay", &[], None), Err(AgentError::BadName(_))));
        net.run(Duration::from_secs(1));
        for a in &net.agents {
            let n = a.resolve("blue").unwrap();
            assert_eq!(n.def, def);
            assert_eq!(a.resolve(&def.id[..6]).unwrap().def.id, def.id, "id prefixes work");
        }
        assert!(net.agents[0].resolve("blue").unwrap().attached);
        assert!(!net.agents[1].resolve("blue").unwrap().attached);
    }

    #[test]
    fn rm_refuses_while_others_are_attached_and_detaches_them_when_forced() {
        let mut net = Net::new(3);
        let now = net.now;
        net.agents[0].create_net(now, "red", "test", &["172.30.4.0/24".into()], None).unwrap();
        net.run(Duration::from_secs(1));
        let now = net.now;
        net.agents[1].attach(now, "red").unwrap();
        net.run(Duration::from_secs(1));
        let now = net.now;
        let err = net.agents[0].remove_network(now, "red", false).unwrap_err();
        assert!(
            matches!(&err, AgentError::NetworkInUse { peers, .. } if peers == &["a2".to_string()]),
            "{err}"
        );
        net.agents[0].remove_network(now, "red", true).unwrap();
        net.run(Duration::from_secs(1));
        for a in &net.agents {
            assert!(a.resolve("red").is_err());
            assert!(a.attached_networks().is_empty(), "{} still attached", a.id().name);
        }
    }

    #[test]
    fn a_name_created_on_both_sides_of_a_partition_keeps_both_networks() {
        let mut net = Net::new(2);
        net.cut = true;
        net.run(Duration::from_secs(1));
        let now = net.now;
        let x = net.agents[0].create_net(now, "dup", "test", &["172.30.5.0/24".into()], None).unwrap();
        let y = net.agents[1].create_net(now, "dup", "test", &["172.30.6.0/24".into()], None).unwrap();
        net.cut = false;
        net.run(Duration::from_secs(20));
        for a in &net.agents {
            let all = a.networks();
            assert_eq!(all.len(), 2, "both survive on {}", a.id().name);
            assert!(all.iter().all(|n| n.name_clash));
            let err = a.resolve("dup").unwrap_err().to_string();
            assert!(
                err.contains("ambiguous") && err.contains(x.short_id()) && err.contains(y.short_id()),
                "{err}"
            );
            assert_eq!(a.resolve(&x.id).unwrap().def, x);
        }
    }

    #[test]
    fn diagnostic_writes_respect_protected_tables() {
        let mut net = Net::new(2);
        let now = net.now;
        net.agents[0].create_net(now, "g", "test", &["172.30.7.0/24".into()], None).unwrap();
        let a = &mut net.agents[0];
        let v = || Bytes::from_static(b"v");
        assert!(matches!(a.table_put(now, "cluster", "x", "k", v(), false), Err(AgentError::Protected(_))));
        assert!(matches!(
            a.table_put(now, "g", NETWORKS_TABLE, "k", v(), false),
            Err(AgentError::Protected(_))
        ));
        a.table_put(now, "cluster", "x", "k", v(), true).unwrap();
        a.table_put(now, "g", "endpoints", "k", v(), false).unwrap();
        a.table_put(now, "g", "endpoints", "k", Bytes::from_static(b"w"), false).unwrap();
        assert_eq!(a.table_get("g", "endpoints", "k").unwrap(), Some(Bytes::from_static(b"w")));
        let pairs = vec![("a".to_string(), "1".to_string()), (String::new(), "2".to_string())];
        let load = |pairs: &Vec<(String, String)>| Command::TableLoad {
            network: "g".into(),
            table: "endpoints".into(),
            pairs: pairs.clone(),
            force: false,
        };
        assert!(a.apply(now, load(&pairs)).is_err());
        assert_eq!(a.table_get("g", "endpoints", "a").unwrap(), None, "a bad load writes nothing");
        a.table_rm(now, "g", "endpoints", "k", false).unwrap();
        assert!(a.table_rm(now, "g", "endpoints", "k", false).is_err());
        let d = a.dump(Some("g"), None).unwrap();
        assert_eq!(d.networks.len(), 1);
        assert_eq!(d.networks[0].name, "g");
        assert_eq!(d.networks[0].tables[0].entries[0].state, "tombstone");
        let d = a.dump(Some("cluster"), Some(NETWORKS_TABLE)).unwrap();
        let e = &d.networks[0].tables[0].entries[0];
        assert_eq!(e.decoded.as_ref().unwrap().fields["name"], "g");
        let view = a.attach_view(now);
        let m = crate::view::metrics(&view);
        assert!(
            m.contains("weft_members{state=\"alive\"} 2") && m.contains("weft_decode_errors_total 0"),
            "{m}"
        );
    }
}

#[cfg(test)]
mod alloc_tests {
    //! Allocation through the agent: seeding, donation, endpoints, release, restart.

    use super::*;
    use crate::alloc::VXLANID_OPTION;

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, i], 7946))
    }

    fn ep(network: &str, name: &str) -> Command {
        Command::EndpointCreate {
            network: network.into(),
            name: name.into(),
            ip: None,
            mac: None,
            sandbox: None,
        }
    }

    fn overlay(name: &str) -> Command {
        Command::CreateNetwork {
            name: name.into(),
            driver: "overlay".into(),
            subnets: vec![],
            gateway: None,
            options: Default::default(),
        }
    }

    fn network(r: CommandResult) -> NetworkDef {
        match r {
            Ok(Reply::Network(d)) => d,
            other => panic!("expected a network, got {other:?}"),
        }
    }

    fn endpoint(r: CommandResult) -> Endpoint {
        match r {
            Ok(Reply::Endpoint(e)) => e,
            other => panic!("expected an endpoint, got {other:?}"),
        }
    }

    use super::tests::Net;

    #[test]
    fn networks_created_at_once_on_two_nodes_get_different_subnets_and_vnis() {
        let mut net = Net::new(3);
        let a = 0;
        // Both commands start before either node hears of the other's network.
        let id1 = 1001;
        let id2 = 1002;
        net.agents[a].handle_command(net.now, id1, overlay("red"));
        net.agents[2].handle_command(net.now, id2, overlay("blue"));
        net.run(Duration::from_secs(5));
        let r1 = net.take_reply(a, id1);
        let r2 = net.take_reply(2, id2);
        let (red, blue) = (network(r1), network(r2));
        assert_eq!(red.subnets.len(), 1);
        assert_ne!(red.subnets, blue.subnets, "two networks got one subnet");
        let vni = |d: &NetworkDef| d.options.get(VXLANID_OPTION).cloned().expect("a VNI");
        assert_ne!(vni(&red), vni(&blue), "two networks got one VNI");
        let v: u32 = vni(&red).parse().unwrap();
        assert!((4096..1 << 24).contains(&v), "{v}");
        assert_eq!(red.gateway.as_deref(), Some(red.subnets[0].replace(".0/24", ".1").as_str()));
        // An explicit subnet overlapping a known one is refused, naming it.
        net.run(Duration::from_secs(1));
        let e = net
            .cmd(
                1,
                Command::CreateNetwork {
                    name: "green".into(),
                    driver: "overlay".into(),
                    subnets: vec![red.subnets[0].clone()],
                    gateway: None,
                    options: Default::default(),
                },
            )
            .unwrap_err();
        assert!(matches!(&e, AgentError::PoolOverlap { other, .. } if other == "red"), "{e}");
    }

    #[test]
    fn endpoints_get_distinct_addresses_from_each_nodes_share_and_everyone_sees_them() {
        let mut net = Net::new(3);
        let def = network(net.cmd(0, overlay("app")));
        let mut eps = Vec::new();
        for round in 0..4 {
            for i in 0..3 {
                eps.push(endpoint(net.cmd(i, ep("app", &format!("e{i}-{round}")))));
            }
        }
        let mut ips: Vec<&str> = eps.iter().map(|e| e.ipv4.as_str()).collect();
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), eps.len(), "an address was handed out twice: {eps:?}");
        let gw = def.gateway.clone().unwrap();
        for e in &eps {
            assert!(e.ipv4.ends_with("/24"), "{e:?}");
            assert_ne!(e.ipv4.split('/').next(), Some(gw.as_str()), "the gateway was handed out");
            assert_eq!(e.gateway.as_deref(), Some(gw.as_str()));
            let ip: std::net::Ipv4Addr = e.ipv4.split('/').next().unwrap().parse().unwrap();
            let o = ip.octets();
            assert_eq!(e.mac, format!("02:42:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3]));
        }
        // Nodes 2 and 3 got their shares by donation when they attached.
        for i in 1..3 {
            let r = net.agents[i].allocator().report();
            let ring = r.rings.iter().find(|g| g.network == def.id).expect("a subnet ring");
            assert!(ring.owned_blocks > 0, "{ring:?}");
        }
        net.run(Duration::from_secs(2));
        for a in &net.agents {
            let seen = read::endpoints(a, Some(&def.id)).unwrap();
            assert_eq!(seen.len(), eps.len(), "{} sees {} endpoints", a.id().name, seen.len());
        }
    }

    #[test]
    fn a_removed_endpoints_address_is_not_handed_out_again_at_once() {
        let mut net = Net::new(1);
        network(net.cmd(0, overlay("n")));
        let first = endpoint(net.cmd(0, ep("n", "a")));
        endpoint(net.cmd(0, Command::EndpointRm { network: "n".into(), endpoint: "a".into() }));
        let second = endpoint(net.cmd(0, ep("n", "b")));
        assert_ne!(first.ipv4, second.ipv4, "immediate reuse (moby #35401)");
        // Removing someone else's endpoint, or one that does not exist, is refused.
        let e = net.cmd(0, Command::EndpointRm { network: "n".into(), endpoint: "zz".into() }).unwrap_err();
        assert!(matches!(e, AgentError::NoSuchEndpoint(_)), "{e}");
        // Names are unique in a network.
        let e = net.cmd(0, ep("n", "b")).unwrap_err();
        assert!(matches!(e, AgentError::EndpointExists { .. }), "{e}");
    }

    #[test]
    fn an_address_in_another_nodes_block_is_refused_naming_that_node() {
        let mut net = Net::new(2);
        let def = network(net.cmd(0, overlay("n")));
        endpoint(net.cmd(1, ep("n", "x")));
        // Node 2's share came from the top of node 1's range; ask node 1 for an address there.
        let r = net.agents[1].allocator().report();
        let theirs = r.rings.iter().find(|g| g.network == def.id).unwrap().owned[0].clone();
        let ip: std::net::IpAddr = theirs.split('-').next().unwrap().parse().unwrap();
        let e = net
            .cmd(
                0,
                Command::EndpointCreate {
                    network: "n".into(),
                    name: "y".into(),
                    ip: Some(ip),
                    mac: None,
                    sandbox: None,
                },
            )
            .unwrap_err();
        assert!(e.to_string().contains("a2@"), "{e}");
        // A free address of its own share works.
        let mine: std::net::IpAddr = def.subnets[0].replace(".0/24", ".9").parse().unwrap();
        let got = endpoint(net.cmd(
            0,
            Command::EndpointCreate {
                network: "n".into(),
                name: "z".into(),
                ip: Some(mine),
                mac: Some("02:00:00:00:00:09".into()),
                sandbox: None,
            },
        ));
        assert_eq!(got.ipv4, format!("{mine}/24"));
        assert_eq!(got.mac, "02:00:00:00:00:09");
    }

    #[test]
    fn network_rm_is_refused_while_endpoints_exist_and_returns_the_vni() {
        let mut net = Net::new(1);
        let def = network(net.cmd(0, overlay("n")));
        endpoint(net.cmd(0, ep("n", "a")));
        let e = net.cmd(0, Command::RemoveNetwork { network: "n".into(), force: false }).unwrap_err();
        assert!(matches!(e, AgentError::HasEndpoints { .. }), "{e}");
        let e = net.cmd(0, Command::Detach { network: "n".into() }).unwrap_err();
        assert!(matches!(e, AgentError::HasEndpoints { .. }), "{e}");
        let vni_ring = |net: &Net| {
            net.agents[0].allocator().report().rings.into_iter().find(|g| g.ring == "vni").unwrap().allocated
        };
        assert_eq!(vni_ring(&net), 1);
        network(net.cmd(0, Command::RemoveNetwork { network: "n".into(), force: true }));
        net.run(Duration::from_secs(1));
        assert_eq!(vni_ring(&net), 0, "the VNI was released");
        assert!(
            net.agents[0].allocator().report().rings.iter().all(|g| g.network != def.id),
            "subnet ring dropped"
        );
        assert!(
            net.disks[0].keys().all(|k| !k.starts_with(&format!("ep/{}", def.id))),
            "endpoint records deleted"
        );
    }

    #[test]
    fn a_network_removed_with_force_leaves_no_keys_behind_and_every_node_still_boots() {
        let mut net = Net::new(2);
        let def = network(net.cmd(0, overlay("n")));
        endpoint(net.cmd(1, ep("n", "x")));
        endpoint(net.cmd(0, ep("n", "y")));
        net.run(Duration::from_secs(1));
        // Removed from the node that did not create it, endpoints and all.
        network(net.cmd(1, Command::RemoveNetwork { network: "n".into(), force: true }));
        net.run(Duration::from_secs(2));
        for (i, disk) in net.disks.iter().enumerate() {
            // Only the note that the id is gone (so nobody brings the definition back).
            let left: Vec<&String> = disk
                .keys()
                .filter(|k| k.contains(&def.id) && !k.starts_with(crate::alloc::GONE_PREFIX))
                .collect();
            assert!(left.is_empty(), "node {i} kept {left:?}");
            assert!(disk.contains_key(&format!("{}{}", crate::alloc::GONE_PREFIX, def.id)), "node {i}");
            let mut state =
                NodeState::from_image(&with_identity(disk, &format!("a{}", i + 1))).unwrap().unwrap();
            state.generation += 1;
            Agent::boot(GossipConfig::lan(8), &state, addr(i as u8 + 1), 7, net.now).expect("boots");
        }
        // The creator gave the VNI back when it saw the definition go.
        let vnis = net.agents[0].allocator().report().rings.into_iter().find(|g| g.ring == "vni").unwrap();
        assert_eq!(vnis.allocated, 0);
    }

    #[test]
    fn a_network_create_that_fails_takes_nothing() {
        let mut net = Net::new(1);
        let before = net.agents[0].allocator().report();
        let e = net
            .cmd(
                0,
                Command::CreateNetwork {
                    name: "bad".into(),
                    driver: "overlay".into(),
                    subnets: vec!["10.1.0.0/24".into()],
                    gateway: Some("10.1.0.255".into()),
                    options: Default::default(),
                },
            )
            .unwrap_err();
        assert!(matches!(e, AgentError::BadGateway(_)), "{e}");
        net.run(Duration::from_secs(1));
        let after = net.agents[0].allocator().report();
        let vni =
            |r: &crate::alloc::AllocReport| r.rings.iter().find(|g| g.ring == "vni").map(|g| g.allocated);
        assert_eq!(vni(&after), vni(&before));
        assert!(
            net.disks[0].keys().all(|k| !k.starts_with("own/")),
            "{:?}",
            net.disks[0].keys().collect::<Vec<_>>()
        );
    }

    use super::tests::with_identity;

    #[test]
    fn a_restarted_node_keeps_its_endpoints_and_never_hands_out_an_address_twice() {
        let mut net = Net::new(2);
        network(net.cmd(0, overlay("n")));
        let before: Vec<Endpoint> = (0..5).map(|k| endpoint(net.cmd(1, ep("n", &format!("e{k}"))))).collect();
        net.run(Duration::from_secs(1));
        // Node 2 restarts from what its disk holds.
        let image = with_identity(&net.disks[1], "a2");
        let mut state = NodeState::from_image(&image).unwrap().unwrap();
        state.generation += 1;
        let cfg = GossipConfig::lan(8);
        let mut a2 = Agent::boot(cfg, &state, addr(2), 99, net.now).unwrap();
        a2.join(net.now, &[addr(1)]).unwrap();
        net.agents[1] = a2;
        net.run(Duration::from_secs(3));
        let after: Vec<Endpoint> = (5..10).map(|k| endpoint(net.cmd(1, ep("n", &format!("e{k}"))))).collect();
        let mut ips: Vec<&str> = before.iter().chain(&after).map(|e| e.ipv4.as_str()).collect();
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), 10, "an address was handed out twice across the restart");
        net.run(Duration::from_secs(2));
        let seen = read::endpoints(&net.agents[0], None).unwrap();
        for e in &before {
            assert!(seen.iter().any(|s| s.id == e.id), "endpoint {} lost across the restart", e.name);
        }
    }
}

#[cfg(test)]
mod removal_tests {
    //! `weft node rm` through the agent.

    use super::tests::Net;
    use super::*;
    use crate::alloc::NodeRmReply;

    fn ep(network: &str, name: &str) -> Command {
        Command::EndpointCreate {
            network: network.into(),
            name: name.into(),
            ip: None,
            mac: None,
            sandbox: None,
        }
    }

    fn endpoint(r: CommandResult) -> Endpoint {
        match r {
            Ok(Reply::Endpoint(e)) => e,
            other => panic!("expected an endpoint, got {other:?}"),
        }
    }

    fn rm(net: &mut Net, i: usize, node: &str, force: bool) -> Result<NodeRmReply, AgentError> {
        net.cmd(i, Command::NodeRm { node: node.into(), force }).map(|r| match r {
            Reply::NodeRemoved(r) => r,
            other => panic!("expected a removal, got {other:?}"),
        })
    }

    /// Agent `i` creates network `name` on an explicit subnet (no cluster ring needed).
    fn subnet_network(net: &mut Net, i: usize, name: &str, subnet: &str) -> NetworkDef {
        let create = Command::CreateNetwork {
            name: name.into(),
            driver: "test".into(),
            subnets: vec![subnet.into()],
            gateway: None,
            options: Default::default(),
        };
        match net.cmd(i, create) {
            Ok(Reply::Network(d)) => d,
            other => panic!("{other:?}"),
        }
    }

    fn subnet_ring(a: &Agent, nid: &str) -> crate::alloc::RingReport {
        a.allocator().report().rings.into_iter().find(|r| r.network == nid).expect("the subnet ring")
    }

    fn endpoints_of(a: &Agent, node: &str) -> Vec<Endpoint> {
        read::endpoints(a, None).unwrap().into_iter().filter(|e| e.node == node).collect()
    }

    #[test]
    fn node_rm_takes_a_dead_nodes_share_deletes_its_entries_and_a_returning_instance_tears_down() {
        let mut net = Net::new(3);
        let web = subnet_network(&mut net, 0, "web", "10.9.0.0/26");
        let theirs: Vec<Endpoint> =
            (0..3).map(|k| endpoint(net.cmd(2, ep("web", &format!("e{k}"))))).collect();
        endpoint(net.cmd(1, ep("web", "b0")));
        net.run(Duration::from_secs(2));
        assert_eq!(endpoints_of(&net.agents[1], "a3").len(), 3);

        // Refused: a live node, this node itself, a name nobody knows.
        let e = rm(&mut net, 0, "a2", false).unwrap_err();
        assert!(matches!(e, AgentError::NodeAlive(_)), "{e}");
        assert!(e.to_string().contains("a2@") && e.to_string().contains("alive"), "{e}");
        let e = rm(&mut net, 0, "a1", false).unwrap_err();
        assert!(matches!(e, AgentError::BadName(_)) && e.to_string().contains("this node itself"), "{e}");
        assert!(matches!(rm(&mut net, 0, "zz", false), Err(AgentError::NoSuchNode(_))));
        assert!(matches!(rm(&mut net, 0, "a3@xyz", false), Err(AgentError::BadName(_))));

        // a3 dies; membership declares it failed; its endpoints are hidden, not deleted.
        net.down.insert(2);
        net.run(Duration::from_secs(20));
        assert!(endpoints_of(&net.agents[1], "a3").is_empty());
        let owned_before = subnet_ring(&net.agents[0], &web.id).owned_blocks;
        let r = rm(&mut net, 0, "a3", false).unwrap();
        assert_eq!(r.removed.len(), 1, "{r:?}");
        let gone = &r.removed[0];
        assert!(
            gone.node.starts_with("a3@") && gone.state == "failed" && gone.entries_deleted && !gone.fenced,
            "{r:?}"
        );
        let blocks: u64 = gone.rings.iter().filter(|x| x.network == web.id).map(|x| x.blocks).sum();
        assert!(blocks > 0, "a3's share came to a1: {r:?}");
        net.run(Duration::from_secs(2));
        assert_eq!(subnet_ring(&net.agents[0], &web.id).owned_blocks, owned_before + blocks);
        // Its entries are tombstones everywhere now, not hidden ones waiting for its return.
        for i in [0, 1] {
            let held = net.agents[i].gossip().table(&web.id, ENDPOINT_TABLE);
            for e in held.iter().filter(|e| e.owner == "a3") {
                assert!(matches!(e.state, EntryState::Tombstone { .. }), "agent {i}: {e:?}");
            }
            let m = net.agents[i].gossip().members().into_iter().find(|m| &*m.id.name == "a3").unwrap();
            assert_eq!(m.state, weft_gossip::MemberState::Left, "agent {i}");
        }
        // What a3 handed out is not handed out again at once, even once a1 has nothing else.
        let mut mine = 0;
        while let Ok(Reply::Endpoint(e)) = net.cmd(0, ep("web", &format!("m{mine}"))) {
            assert!(theirs.iter().all(|t| t.ipv4 != e.ipv4), "{} handed out again at once", e.ipv4);
            mine += 1;
            assert!(mine < 64, "more endpoints than addresses");
        }
        assert!(mine > 10, "a1 allocated {mine}");

        // a3 comes back from its disk: it tears down, says so, and allocates nothing more.
        net.reboot(2);
        net.run(Duration::from_secs(5));
        assert!(net.agents[2].allocator().removed_by().is_some_and(|b| b.starts_with("a1@")));
        assert!(net.agents[2].allocator().local_endpoints(&web.id).is_empty());
        assert!(
            net.disks[2].keys().all(|k| !k.starts_with(crate::alloc::EP_PREFIX)),
            "its endpoint records left its store"
        );
        let e = net.cmd(2, ep("web", "again")).unwrap_err();
        assert!(matches!(e, AgentError::Removed(_)), "{e}");
        assert!(e.to_string().contains("was removed from the cluster by a1@"), "{e}");
        for i in 0..3 {
            assert!(endpoints_of(&net.agents[i], "a3").is_empty(), "agent {i} still lists a3's endpoints");
        }
        // Still removed after another restart.
        net.reboot(2);
        net.run(Duration::from_secs(2));
        assert!(matches!(net.cmd(2, ep("web", "again")), Err(AgentError::Removed(_))));
    }

    #[test]
    fn a_reinstalled_host_takes_back_its_earlier_instances_share_with_node_rm_name_at_old() {
        let mut net = Net::new(3);
        let web = subnet_network(&mut net, 0, "web", "10.9.2.0/26");
        let old: Vec<Endpoint> = (0..3).map(|k| endpoint(net.cmd(2, ep("web", &format!("o{k}"))))).collect();
        net.run(Duration::from_secs(1));
        let old_member = net.agents[2].allocator().report().member;
        // a3's host is reinstalled: same name and address, a new instance with an empty disk.
        let generation = net.agents[2].id().generation + 1;
        let id = NodeId::new("a3", SocketAddr::from(([127, 0, 0, 3], 7946)), generation).with_instance(7);
        let mut fresh = Agent::new(GossipConfig::lan(8), id, 77, 0, net.now).unwrap();
        fresh.join(net.now, &[SocketAddr::from(([127, 0, 0, 1], 7946))]).unwrap();
        net.agents[2] = fresh;
        net.disks[2].clear();
        net.run(Duration::from_secs(5));
        endpoint(net.cmd(2, ep("web", "n0")));
        let before = subnet_ring(&net.agents[2], &web.id).owned_blocks;
        // Only the earlier instance can be meant: the live one is this node itself.
        let e = rm(&mut net, 2, "a3@0000000000000007", false).unwrap_err();
        assert!(e.to_string().contains("this node itself"), "{e}");
        let r = rm(&mut net, 2, &old_member, false).unwrap();
        assert_eq!(r.removed.len(), 1, "{r:?}");
        let blocks: u64 = r.removed[0].rings.iter().filter(|x| x.network == web.id).map(|x| x.blocks).sum();
        assert!(blocks > 0, "{r:?}");
        assert_eq!(subnet_ring(&net.agents[2], &web.id).owned_blocks, before + blocks);
        // The earlier instance's addresses are held back: the new one does not hand them out.
        let mut k = 1;
        while let Ok(Reply::Endpoint(e)) = net.cmd(2, ep("web", &format!("n{k}"))) {
            assert!(old.iter().all(|o| o.ipv4 != e.ipv4), "{} handed out again at once", e.ipv4);
            k += 1;
            assert!(k < 64, "more endpoints than addresses");
        }
        assert!(k > 3, "the new instance allocated {k}");
    }

    #[test]
    fn the_heir_adopts_a_removed_creators_vni_and_gateway_and_releases_the_vni_with_the_network() {
        let mut net = Net::new(3);
        let overlay = Command::CreateNetwork {
            name: "old".into(),
            driver: "overlay".into(),
            subnets: vec![],
            gateway: None,
            options: Default::default(),
        };
        let old = match net.cmd(1, overlay) {
            Ok(Reply::Network(d)) => d,
            other => panic!("{other:?}"),
        };
        let web = subnet_network(&mut net, 1, "web", "10.9.3.0/24");
        net.run(Duration::from_secs(1));
        let now = net.now;
        net.agents[0].attach(now, "web").unwrap();
        net.run(Duration::from_secs(2));
        let vni_allocated = |a: &Agent| {
            let rings = a.allocator().report().rings;
            rings.iter().find(|r| r.network == CLUSTER_NETWORK && r.ring == "vni").map_or(0, |r| r.allocated)
        };
        let before = (vni_allocated(&net.agents[0]), subnet_ring(&net.agents[0], &web.id).allocated);
        // a2 (creator of both) dies and a1 removes it: a1 inherits the VNI block holding old's
        // VNI and web's whole subnet, gateway included.
        net.down.insert(1);
        net.run(Duration::from_secs(20));
        rm(&mut net, 0, "a2", false).unwrap();
        net.run(Duration::from_secs(2));
        let after = (vni_allocated(&net.agents[0]), subnet_ring(&net.agents[0], &web.id).allocated);
        assert_eq!(
            after,
            (before.0 + 1, before.1 + 1),
            "old's VNI and web's gateway are a1's allocations now"
        );
        // a1 now releases old's VNI when old is removed.
        let now = net.now;
        net.agents[0].remove_network(now, &old.id, true).unwrap();
        net.run(Duration::from_secs(1));
        assert_eq!(vni_allocated(&net.agents[0]), before.0, "released with the network");
    }

    #[test]
    fn a_forced_removal_of_a_running_instance_holds_its_blocks_until_it_tears_down() {
        let mut net = Net::new(3);
        let web = subnet_network(&mut net, 0, "web", "10.9.1.0/24");
        endpoint(net.cmd(2, ep("web", "c0")));
        net.run(Duration::from_secs(2));
        // a3 runs: only --force removes an instance membership lists alive.
        assert!(matches!(rm(&mut net, 0, "a3", false), Err(AgentError::NodeAlive(_))));
        let r = rm(&mut net, 0, "a3", true).unwrap();
        let gone = &r.removed[0];
        assert!(gone.fenced && gone.state == "alive" && !gone.entries_deleted, "{r:?}");
        let ring = subnet_ring(&net.agents[0], &web.id);
        assert_eq!(ring.fenced.len(), 1, "{ring:?}");
        // a3 learns it was removed, deletes its endpoint and confirms; the fence lifts.
        net.run(Duration::from_secs(3));
        assert!(net.agents[2].allocator().removed_by().is_some());
        assert!(endpoints_of(&net.agents[0], "a3").is_empty());
        assert!(subnet_ring(&net.agents[0], &web.id).fenced.is_empty(), "torn down: the fence is lifted");
    }
}

#[cfg(test)]
mod reconcile_tests {
    //! What a creator gives back for a network removed while it was away.

    use super::tests::Net;
    use super::*;

    fn allocated(a: &Agent, ring: &str) -> u128 {
        let rings = a.allocator().report().rings;
        rings.iter().find(|r| r.network == CLUSTER_NETWORK && r.ring == ring).map_or(0, |r| r.allocated)
    }

    #[test]
    fn a_creator_back_after_its_networks_tombstone_was_reaped_gives_back_its_vni_and_subnet() {
        let cfg = GossipConfig { reap_after: Duration::from_secs(10), ..GossipConfig::lan(8) };
        let mut net = Net::with_cfg(3, cfg);
        let create = Command::CreateNetwork {
            name: "web".into(),
            driver: "overlay".into(),
            subnets: vec![],
            gateway: None,
            options: Default::default(),
        };
        let def = match net.cmd(1, create) {
            Ok(Reply::Network(d)) => d,
            other => panic!("{other:?}"),
        };
        assert_eq!((allocated(&net.agents[1], "vni"), allocated(&net.agents[1], "pool")), (1, 1));
        // The creator goes down; the network is removed and its tombstone reaped meanwhile.
        net.down.insert(1);
        net.run(Duration::from_secs(15));
        let now = net.now;
        net.agents[0].remove_network(now, &def.id, true).unwrap();
        net.run(Duration::from_secs(30));
        assert!(net.agents[0].gossip().entry(CLUSTER_NETWORK, NETWORKS_TABLE, &def.id).is_none(), "reaped");
        // Back from its disk: nothing says the network went. It stays attached and flagged (the
        // cluster may only have lost the definition) until the operator detaches it; then
        // nobody holds it or is on it.
        net.reboot(1);
        net.run(Duration::from_secs(15));
        assert_eq!(net.agents[1].without_def(), vec![def.id.clone()]);
        assert_eq!(allocated(&net.agents[1], "vni"), 1, "kept while attached");
        let now = net.now;
        net.agents[1].detach(now, &def.id).unwrap();
        net.run(Duration::from_secs(5));
        assert_eq!(allocated(&net.agents[1], "vni"), 1, "not at once: the cluster may only have lost it");
        net.run(Duration::from_secs(10));
        assert_eq!((allocated(&net.agents[1], "vni"), allocated(&net.agents[1], "pool")), (0, 0));
        assert!(net.disks[1].keys().all(|k| !k.starts_with(crate::alloc::OWN_PREFIX)));
    }
}

#[cfg(test)]
mod definition_tests {
    //! Network definitions across restarts of the whole cluster.

    use super::tests::Net;
    use super::*;

    #[test]
    fn two_nodes_away_past_a_networks_reaping_do_not_bring_it_back() {
        let cfg = GossipConfig { reap_after: Duration::from_secs(10), ..GossipConfig::lan(8) };
        let mut net = Net::with_cfg(3, cfg);
        let now = net.now;
        let def = net.agents[1].create_net(now, "web", "test", &["172.29.2.0/24".into()], None).unwrap();
        net.run(Duration::from_secs(1));
        for i in [0, 2] {
            let now = net.now;
            net.agents[i].attach(now, "web").unwrap();
        }
        net.run(Duration::from_secs(2));
        // a1 and a3 are down while the network is removed and its tombstone reaped.
        net.down.extend([0, 2]);
        net.run(Duration::from_secs(20));
        let now = net.now;
        net.agents[1].remove_network(now, "web", true).unwrap();
        net.run(Duration::from_secs(30));
        assert!(net.agents[1].gossip().entry(CLUSTER_NETWORK, NETWORKS_TABLE, &def.id).is_none(), "reaped");
        // Back, each sees the other attached and writes the definition back; a2 remembers the
        // id is gone and deletes it again, and they detach.
        // a2 restarts too: it keeps only the note that the id is gone (not even a queued event).
        net.reboot(1);
        net.run(Duration::from_secs(3));
        net.reboot(0);
        net.reboot(2);
        net.run(Duration::from_secs(10));
        for i in 0..3 {
            assert!(read::resolve(&net.agents[i], "web").is_err(), "agent {i} sees the removed network");
            assert!(net.agents[i].attached_networks().is_empty(), "agent {i} still attached");
        }
    }

    #[test]
    fn a_definition_every_holder_lost_in_a_restart_is_written_back_and_a_removal_still_wins() {
        let mut net = Net::new(3);
        let now = net.now;
        let def = net.agents[1].create_net(now, "web", "test", &["172.29.1.0/24".into()], None).unwrap();
        net.run(Duration::from_secs(1));
        for i in [0, 2] {
            let now = net.now;
            net.agents[i].attach(now, "web").unwrap();
        }
        net.run(Duration::from_secs(2));
        // Every node restarts before any learned the definition back: no copy is left.
        for i in 0..3 {
            net.reboot(i);
        }
        net.run(Duration::from_millis(40));
        for i in 0..3 {
            assert_eq!(net.agents[i].without_def(), vec![def.id.clone()], "agent {i} lost it");
        }
        net.run(Duration::from_secs(6));
        for i in 0..3 {
            let found = read::resolve(&net.agents[i], "web").unwrap_or_else(|e| panic!("agent {i}: {e}"));
            assert_eq!(found.def, def, "agent {i} holds the definition again");
            assert!(net.agents[i].without_def().is_empty());
        }
        // Removed now: no node can write the definition back over the tombstone.
        net.agents[0].detach(net.now, "web").unwrap();
        net.agents[2].detach(net.now, "web").unwrap();
        net.run(Duration::from_secs(1));
        let now = net.now;
        net.agents[1].remove_network(now, "web", false).unwrap();
        net.run(Duration::from_secs(1));
        let value = Bytes::from(serde_json::to_vec(&def).unwrap());
        let now = net.now;
        let refused = net.agents[2].gossip.create_entry(now, CLUSTER_NETWORK, NETWORKS_TABLE, &def.id, value);
        assert!(refused.is_err(), "a removed network's definition cannot come back: {refused:?}");
        net.run(Duration::from_secs(1));
        for i in 0..3 {
            assert!(read::resolve(&net.agents[i], "web").is_err(), "agent {i} still sees the network");
        }
    }
}

//! `Agent`: what every weft host runs, without I/O. It composes the gossip core with the cluster's
//! network definitions (and, as they land, IPAM and the drivers), applies table events to them,
//! and tells its caller what to persist. The tokio shell and the simulator both drive it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use weft_gossip::{
    ATTACH_TABLE, AttachRecord, CLUSTER_NETWORK, Config as GossipConfig, EntryState, Event, GossipNode,
    MemberInfo, NODES_TABLE, NodeId, NodeRecord, ObjectType, TableEventKind, TableSpec, TableWatcher,
    Transmit, Watchers,
};

use crate::error::AgentError;

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

/// Decodes network definitions for dumps.
struct NetworkDefs;

impl TableWatcher for NetworkDefs {
    fn event_notify(&mut self, _: &str, _: &str, _: &str, _: Option<&[u8]>, _: Option<&[u8]>) {}

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

/// Decodes the gossip core's own attachment records for dumps.
fn decode_attachment(key: &str, value: &[u8], names: &BTreeMap<String, String>) -> Option<Decoded> {
    let (network, node) = key.split_once(' ')?;
    let r = AttachRecord::decode(value).ok()?;
    let mut fields = BTreeMap::new();
    let network = names.get(network).cloned().unwrap_or_else(|| network.chars().take(12).collect());
    fields.insert("network".into(), network);
    fields.insert("generation".into(), r.generation.to_string());
    fields.insert("state".into(), if r.attached { "attached" } else { "detached" }.into());
    fields.insert("address".into(), r.addr.to_string());
    Some(Decoded { object_id: node.to_string(), fields })
}

/// Decodes the gossip core's node records for dumps.
fn decode_node_record(key: &str, value: &[u8]) -> Option<Decoded> {
    let r = NodeRecord::decode(value).ok()?;
    let mut fields = BTreeMap::new();
    fields.insert("instance".into(), format!("{:016x}", r.instance));
    fields.insert("generation".into(), r.generation.to_string());
    fields.insert("address".into(), r.addr.to_string());
    fields.insert("data address".into(), r.data_addr.to_string());
    fields.insert("status".into(), format!("{:?}", r.status).to_lowercase());
    Some(Decoded { object_id: key.to_string(), fields })
}

/// The sans-IO agent.
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
    /// The network definitions or attachments changed since the caller last persisted them.
    defs_changed: bool,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").field("gossip", &self.gossip).finish_non_exhaustive()
    }
}

/// What a client names a network by: its id, a unique id prefix, or its name.
fn matches_ref(def: &NetworkDef, r: &str) -> bool {
    def.id == r || def.name == r || def.id.starts_with(r)
}

impl Agent {
    /// Builds the agent for `id` (name, advertised gossip address, restart generation), starting
    /// its Lamport clock at the persisted high-water mark `ltime`.
    pub fn new(
        cfg: GossipConfig,
        id: NodeId,
        seed: u64,
        ltime: u64,
        now: Instant,
    ) -> Result<Self, AgentError> {
        let mut gossip = GossipNode::new(cfg, id, seed, ltime, now)?;
        gossip.register_table(NETWORKS_TABLE, TableSpec::cluster(ObjectType::Network))?;
        let mut watchers = Watchers::new();
        watchers.register(NETWORKS_TABLE, ObjectType::Network, Box::new(NetworkDefs));
        let agent = Agent {
            gossip,
            watchers,
            rng: Xoshiro256PlusPlus::seed_from_u64(seed.rotate_left(17) ^ 0xa6e7),
            connected_at: None,
            has_seeds: false,
            refused: None,
            defs_checked_at: None,
            restored: BTreeMap::new(),
            defs_changed: false,
        };
        let _ = now;
        Ok(agent)
    }

    pub fn gossip(&self) -> &GossipNode {
        &self.gossip
    }

    /// Registers a driver's table: how it behaves, and the watcher its events go to (and that
    /// decodes its values in dumps). Registering replays every live entry as a create.
    pub fn register_table(
        &mut self,
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
        Ok(())
    }

    pub fn id(&self) -> &NodeId {
        self.gossip.id()
    }

    /// The Lamport clock; the caller persists a high-water mark above it before acknowledging a
    /// write (see [`crate::state`]).
    pub fn ltime(&self) -> u64 {
        self.gossip.ltime()
    }

    /// Another node is alive under this node's name and this node is the newcomer (or the
    /// newer copy of a copied data dir): it must not run. The reason, in one line.
    pub fn refused(&self) -> Option<&str> {
        self.refused.as_deref()
    }

    /// Whether entries under this node's name that it did not write are an earlier instance's
    /// to delete (persisted by the caller until done; see `GossipNode::set_predecessor_sweep`).
    pub fn set_predecessor_sweep(&mut self, pending: bool) {
        self.gossip.set_predecessor_sweep(pending);
    }

    /// The data-plane (VTEP) address this node publishes in its node record.
    pub fn set_data_addr(&mut self, now: Instant, addr: std::net::IpAddr) {
        self.gossip.set_data_addr(now, addr);
    }

    // ----- I/O passthrough -----------------------------------------------------------------

    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        self.gossip.handle_datagram(now, from, bytes);
    }

    pub fn handle_stream(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        self.gossip.handle_stream(now, from, bytes);
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.gossip.handle_timeout(now);
        if self.defs_checked_at.is_none_or(|t| now.saturating_duration_since(t) >= DEFINITION_CHECK) {
            self.defs_checked_at = Some(now);
            self.detach_removed_networks(now);
        }
    }

    /// Detaches every attached network whose definition is a tombstone here. A network removed
    /// while this node was down produces no delete event when its tombstone arrives (this node
    /// never held the definition in this life), so the tombstone itself is the signal.
    ///
    /// A definition absent altogether (its tombstone reaped while this node was down) is not
    /// taken as a removal: cluster tables live in memory only, so after an outage of the whole
    /// cluster no peer holds any definition, and every node would detach everything. Such a
    /// network stays attached and flagged
    /// ([`attached_without_definition`](Self::attached_without_definition)), with the
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
        }
    }

    /// Whether the definitions of the attached networks may have changed since the last call
    /// (the caller persists them then; looking them up costs a walk of the definitions table).
    pub fn take_definitions_changed(&mut self) -> bool {
        std::mem::take(&mut self.defs_changed)
    }

    /// Networks attached here with no live definition in the cluster table (see
    /// [`NetworkInfo::missing_definition`]).
    pub fn attached_without_definition(&self) -> Vec<String> {
        self.attached_networks()
            .into_iter()
            .filter(|id| self.gossip.get_entry(CLUSTER_NETWORK, NETWORKS_TABLE, id).is_none())
            .collect()
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.gossip.poll_transmit()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.gossip.poll_timeout()
    }

    /// The next event, after the agent applied it (watchers notified, networks whose definition
    /// was deleted detached, name clashes judged).
    pub fn poll_event(&mut self, now: Instant) -> Option<Event> {
        let ev = self.gossip.poll_event()?;
        self.apply_event(now, &ev);
        Some(ev)
    }

    fn apply_event(&mut self, now: Instant, ev: &Event) {
        match ev {
            Event::Table(t) => {
                self.watchers.dispatch(t);
                if t.network == CLUSTER_NETWORK && t.table == NETWORKS_TABLE {
                    self.defs_changed = true;
                }
                if t.network == CLUSTER_NETWORK
                    && t.table == NETWORKS_TABLE
                    && t.kind == TableEventKind::Delete
                    && self.gossip.is_attached(&t.key)
                {
                    tracing::info!(network = %t.key, "network removed by {}; detaching", t.owner);
                    let _ = self.gossip.leave_network(now, &t.key);
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

    // ----- membership ------------------------------------------------------------------------

    pub fn join(&mut self, now: Instant, seeds: &[SocketAddr]) -> Result<(), AgentError> {
        self.has_seeds |= !seeds.is_empty();
        Ok(self.gossip.join(now, seeds)?)
    }

    /// Leaves the cluster for good: peers delete this node's entries at once.
    pub fn leave(&mut self, now: Instant) -> Result<(), AgentError> {
        Ok(self.gossip.leave(now)?)
    }

    /// Stops for a restart: peers keep this node's entries live for their `restart_grace`.
    pub fn stop_restarting(&mut self, now: Instant) -> Result<(), AgentError> {
        Ok(self.gossip.stop_restarting(now)?)
    }

    /// Networks this node is attached to, other than `cluster`: what the caller persists so a
    /// restart re-attaches them.
    pub fn attached_networks(&self) -> Vec<String> {
        self.gossip.networks().filter(|n| *n != CLUSTER_NETWORK).map(str::to_string).collect()
    }

    /// Re-attaches a network by id after a restart (its definition may not have arrived yet).
    pub fn reattach(&mut self, now: Instant, id: &str) -> Result<(), AgentError> {
        Ok(self.gossip.join_network(now, id)?)
    }

    /// After a restart: re-attaches the networks of the earlier life with the definitions it
    /// persisted (shown while the cluster holds none).
    pub fn restore_attached(
        &mut self,
        now: Instant,
        ids: &[String],
        defs: &[NetworkDef],
    ) -> Result<(), AgentError> {
        for id in ids {
            self.reattach(now, id)?;
        }
        self.restored =
            defs.iter().filter(|d| ids.contains(&d.id)).map(|d| (d.id.clone(), d.clone())).collect();
        Ok(())
    }

    /// The definitions of the networks attached here, as the caller persists them with the
    /// attachment: the cluster's, or the one restored from an earlier life.
    pub fn attached_definitions(&self) -> Vec<NetworkDef> {
        let live: BTreeMap<String, NetworkDef> =
            self.networks().into_iter().map(|n| (n.def.id.clone(), n.def)).collect();
        self.attached_networks()
            .into_iter()
            .filter_map(|id| live.get(&id).or_else(|| self.restored.get(&id)).cloned())
            .collect()
    }

    /// A persisted definition of a network attached here that the cluster does not define.
    pub fn restored_definition(&self, id: &str) -> Option<&NetworkDef> {
        self.restored.get(id)
    }

    /// Detaches a network by id, whether or not its definition has arrived (the counterpart of
    /// [`reattach`](Self::reattach)).
    pub fn detach_id(&mut self, now: Instant, id: &str) -> Result<(), AgentError> {
        if !self.gossip.is_attached(id) {
            return Err(AgentError::NotAttached(id.to_string()));
        }
        Ok(self.gossip.leave_network(now, id)?)
    }

    pub fn members(&self) -> Vec<MemberInfo> {
        self.gossip.members()
    }

    pub fn unreachable_seeds(&self) -> Vec<SocketAddr> {
        self.gossip.unreachable_seeds()
    }

    // ----- networks ----------------------------------------------------------------------------

    /// Every network definition the cluster holds, sorted by name then id.
    pub fn networks(&self) -> Vec<NetworkInfo> {
        let mut defs = Vec::new();
        self.gossip.walk(CLUSTER_NETWORK, NETWORKS_TABLE, |key, v, _| {
            // Only well-formed definitions stored under their own id count (anyone can write
            // this table with --force).
            if let Ok(d) = serde_json::from_slice::<NetworkDef>(v)
                && d.id == key
                && is_network_id(key)
            {
                defs.push(d);
            }
            true
        });
        let mut names: BTreeMap<&str, usize> = BTreeMap::new();
        for d in &defs {
            *names.entry(d.name.as_str()).or_default() += 1;
        }
        let mut out: Vec<NetworkInfo> = defs
            .iter()
            .map(|d| NetworkInfo {
                attached: self.gossip.is_attached(&d.id),
                peers: self.gossip.network_peers(&d.id).iter().map(|p| p.name.to_string()).collect(),
                name_clash: names[d.name.as_str()] > 1,
                missing_definition: false,
                def: d.clone(),
            })
            .collect();
        out.sort_by(|a, b| (&a.def.name, &a.def.id).cmp(&(&b.def.name, &b.def.id)));
        out
    }

    /// Finds a network by id, unique id prefix or unique name.
    pub fn resolve(&self, r: &str) -> Result<NetworkInfo, AgentError> {
        if r.is_empty() {
            return Err(AgentError::NoSuchNetwork(r.to_string()));
        }
        let all = self.networks();
        if let Some(n) = all.iter().find(|n| n.def.id == r) {
            return Ok(n.clone());
        }
        let by_name: Vec<&NetworkInfo> = all.iter().filter(|n| n.def.name == r).collect();
        match by_name.len() {
            1 => return Ok(by_name[0].clone()),
            0 => {}
            _ => {
                let ids = by_name.iter().map(|n| n.def.short_id().to_string()).collect();
                return Err(AgentError::AmbiguousNetwork { name: r.to_string(), ids });
            }
        }
        let by_prefix: Vec<&NetworkInfo> = all.iter().filter(|n| matches_ref(&n.def, r)).collect();
        match by_prefix.len() {
            1 => Ok(by_prefix[0].clone()),
            0 => Err(AgentError::NoSuchNetwork(r.to_string())),
            _ => Err(AgentError::AmbiguousNetwork {
                name: r.to_string(),
                ids: by_prefix.iter().map(|n| n.def.short_id().to_string()).collect(),
            }),
        }
    }

    /// Defines a network cluster-wide and attaches this node to it.
    pub fn create_network(
        &mut self,
        now: Instant,
        name: &str,
        driver: &str,
        subnets: &[String],
        gateway: Option<&str>,
    ) -> Result<NetworkDef, AgentError> {
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
        let id = format!("{:016x}{:016x}", self.rng.random::<u64>(), self.rng.random::<u64>());
        let def = NetworkDef {
            id: id.clone(),
            name: name.to_string(),
            driver: driver.to_string(),
            subnets: parsed.iter().map(ToString::to_string).collect(),
            gateway: gateway.map(str::to_string),
            created_by: self.id().name.to_string(),
        };
        let value = Bytes::from(serde_json::to_vec(&def).expect("serializable"));
        self.gossip.create_entry(now, CLUSTER_NETWORK, NETWORKS_TABLE, &id, value)?;
        self.gossip.join_network(now, &id)?;
        Ok(def)
    }

    /// Removes a network definition cluster-wide. Refused while other nodes are attached,
    /// unless `force`.
    pub fn remove_network(&mut self, now: Instant, r: &str, force: bool) -> Result<NetworkDef, AgentError> {
        let n = self.resolve(r)?;
        if !n.peers.is_empty() && !force {
            return Err(AgentError::NetworkInUse { name: n.def.name.clone(), peers: n.peers.clone() });
        }
        if n.attached {
            self.gossip.leave_network(now, &n.def.id)?;
        }
        self.gossip.delete_entry(now, CLUSTER_NETWORK, NETWORKS_TABLE, &n.def.id)?;
        Ok(n.def)
    }

    pub fn attach(&mut self, now: Instant, r: &str) -> Result<NetworkDef, AgentError> {
        let n = self.resolve(r)?;
        self.gossip.join_network(now, &n.def.id)?;
        Ok(n.def)
    }

    /// Detaches this node from a network, by reference; a network attached by id whose
    /// definition is gone (see [`NetworkInfo::missing_definition`]) is detached by its id.
    pub fn detach(&mut self, now: Instant, r: &str) -> Result<NetworkDef, AgentError> {
        let n = match self.resolve(r) {
            Err(AgentError::NoSuchNetwork(_)) if is_network_id(r) && self.gossip.is_attached(r) => {
                self.detach_id(now, r)?;
                return Ok(self.restored.get(r).cloned().unwrap_or_else(|| NetworkDef::id_only(r)));
            }
            other => other?,
        };
        if !n.attached {
            return Err(AgentError::NotAttached(n.def.name));
        }
        self.gossip.leave_network(now, &n.def.id)?;
        Ok(n.def)
    }

    // ----- diagnostic table writes -------------------------------------------------------------

    /// The gossip network id a client's network reference means (`cluster` is itself).
    fn table_network(&self, r: &str) -> Result<String, AgentError> {
        // `cluster`, or a network attached by id whose definition has not arrived yet.
        if r == CLUSTER_NETWORK || (is_network_id(r) && self.gossip.is_attached(r)) {
            return Ok(r.to_string());
        }
        Ok(self.resolve(r)?.def.id)
    }

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
    pub fn table_put(
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
        if self.gossip.get_entry(&nid, table, key).is_some() {
            self.gossip.update_entry(now, &nid, table, key, value)?;
        } else {
            self.gossip.create_entry(now, &nid, table, key, value)?;
        }
        Ok(())
    }

    pub fn table_get(&self, network: &str, table: &str, key: &str) -> Result<Option<Bytes>, AgentError> {
        let nid = self.table_network(network)?;
        Ok(self.gossip.get_entry(&nid, table, key))
    }

    pub fn table_rm(
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

    /// Many `key value` pairs in one request. Validates everything before writing anything.
    pub fn table_load(
        &mut self,
        now: Instant,
        network: &str,
        table: &str,
        pairs: &[(String, String)],
        force: bool,
    ) -> Result<usize, AgentError> {
        let nid = self.table_network(network)?;
        self.check_table_write(&nid, table, force)?;
        if !self.gossip.is_attached(&nid) {
            return Err(AgentError::NotAttached(network.to_string()));
        }
        let max_value = self.gossip.config().max_stream_frame / 2;
        for (k, v) in pairs {
            if k.is_empty() || k.len() > 1024 {
                return Err(AgentError::BadName(format!("key {k:?}")));
            }
            if v.len() > max_value {
                return Err(AgentError::BadName(format!(
                    "value of {k:?}: {} bytes (at most {max_value})",
                    v.len()
                )));
            }
        }
        for (k, v) in pairs {
            let value = Bytes::copy_from_slice(v.as_bytes());
            if self.gossip.get_entry(&nid, table, k).is_some() {
                self.gossip.update_entry(now, &nid, table, k, value)?;
            } else {
                self.gossip.create_entry(now, &nid, table, k, value)?;
            }
        }
        Ok(pairs.len())
    }

    // ----- views -----------------------------------------------------------------------------

    /// Everything this node holds, optionally limited to one network (id, prefix or name) and
    /// one table.
    pub fn dump(&self, network: Option<&str>, table: Option<&str>) -> Result<Dump, AgentError> {
        let names: BTreeMap<String, String> =
            self.networks().into_iter().map(|n| (n.def.id.clone(), n.def.name.clone())).collect();
        let only = match network {
            Some(r) => Some(self.table_network(r)?),
            None => None,
        };
        let mut networks = Vec::new();
        // `cluster` first, then the others by name.
        let mut nids: Vec<&str> = self.gossip.networks().collect();
        nids.sort_by_key(|n| {
            (*n != CLUSTER_NETWORK, names.get(*n).cloned().unwrap_or_default(), n.to_string())
        });
        for nid in nids {
            if only.as_deref().is_some_and(|o| o != nid) {
                continue;
            }
            let mut tables = Vec::new();
            for t in self.gossip.tables(nid) {
                if table.is_some_and(|only| only != t) {
                    continue;
                }
                let entries =
                    self.gossip.table(nid, &t).into_iter().map(|e| self.dump_entry(&t, e, &names)).collect();
                tables.push(DumpTable { name: t, entries });
            }
            let name = if nid == CLUSTER_NETWORK {
                nid.to_string()
            } else {
                names.get(nid).cloned().unwrap_or_default()
            };
            networks.push(DumpNetwork { id: nid.to_string(), name, tables });
        }
        Ok(Dump { node: self.id().name.to_string(), networks })
    }

    fn dump_entry(
        &self,
        table: &str,
        e: weft_gossip::EntryView,
        names: &BTreeMap<String, String>,
    ) -> DumpEntry {
        use base64::Engine;
        let (state, reap_in) = match e.state {
            EntryState::Live => ("live", None),
            EntryState::Tombstone { reap_in } => ("tombstone", Some(reap_in)),
            EntryState::Hidden { reap_in } => ("hidden", Some(reap_in)),
        };
        let decoded = if table == ATTACH_TABLE {
            decode_attachment(&e.key, &e.value, names)
        } else if table == NODES_TABLE {
            decode_node_record(&e.key, &e.value)
        } else if e.state == EntryState::Live || matches!(e.state, EntryState::Hidden { .. }) {
            self.watchers
                .decode(table, &e.key, &e.value)
                .map(|(object_id, fields)| Decoded { object_id, fields })
        } else {
            None
        };
        DumpEntry {
            key: e.key,
            owner: e.owner,
            ltime: e.ltime,
            state: state.to_string(),
            value: base64::engine::general_purpose::STANDARD.encode(&e.value),
            reap_in_ms: reap_in.map(|d| d.as_millis() as u64),
            age_ms: e.age.as_millis() as u64,
            decoded,
        }
    }

    /// Prometheus text exposition of the agent's state and counters.
    pub fn metrics(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let mut by_state: BTreeMap<&str, usize> =
            ["alive", "suspect", "restarting", "failed", "left"].iter().map(|s| (*s, 0)).collect();
        for m in self.members() {
            *by_state.entry(m.state.as_str()).or_default() += 1;
        }
        let _ = writeln!(out, "# HELP weft_members Cluster members as this node sees them, itself included.");
        let _ = writeln!(out, "# TYPE weft_members gauge");
        for (s, n) in &by_state {
            let _ = writeln!(out, "weft_members{{state=\"{s}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP weft_entries Stored table entries (live, tombstoned, hidden).");
        let _ = writeln!(out, "# TYPE weft_entries gauge");
        let mut queues = Vec::new();
        for nid in self.gossip.networks() {
            for t in self.gossip.tables(nid) {
                let n = self.gossip.table_len(nid, &t);
                let _ = writeln!(out, "weft_entries{{network=\"{nid}\",table=\"{t}\"}} {n}");
            }
            queues.push((nid.to_string(), self.gossip.queue_len(nid)));
        }
        let _ = writeln!(out, "# HELP weft_queue_length Table events waiting for dissemination.");
        let _ = writeln!(out, "# TYPE weft_queue_length gauge");
        for (nid, n) in queues {
            let _ = writeln!(out, "weft_queue_length{{network=\"{nid}\"}} {n}");
        }
        let s = self.gossip.stats();
        let counters: [(&str, &str, u64); 23] = [
            ("weft_datagrams_in_total", "Datagrams received.", s.datagrams_in),
            ("weft_datagrams_out_total", "Datagrams sent.", s.datagrams_out),
            ("weft_datagram_bytes_in_total", "Datagram bytes received.", s.bytes_in),
            ("weft_datagram_bytes_out_total", "Datagram bytes sent.", s.bytes_out),
            ("weft_stream_frames_in_total", "Stream frames received.", s.streams_in),
            ("weft_stream_frames_out_total", "Stream frames sent.", s.streams_out),
            ("weft_stream_bytes_in_total", "Stream bytes received.", s.stream_bytes_in),
            ("weft_stream_bytes_out_total", "Stream bytes sent.", s.stream_bytes_out),
            ("weft_decode_errors_total", "Frames dropped as undecodable.", s.decode_errors),
            ("weft_newer_version_frames_total", "Frames from a newer wire version.", s.newer_version_frames),
            ("weft_membership_errors_total", "Membership packets refused.", s.membership_errors),
            (
                "weft_foreign_network_events_total",
                "Events for networks not attached here.",
                s.foreign_network_events,
            ),
            ("weft_entries_applied_total", "Remote versions applied.", s.entries_applied),
            ("weft_entries_stale_total", "Remote versions ignored as not newer.", s.entries_stale),
            ("weft_queue_drops_total", "Queued events dropped at the queue bound.", s.queue_drops),
            ("weft_syncs_started_total", "Anti-entropy rounds started.", s.syncs_started),
            (
                "weft_syncs_identical_total",
                "Anti-entropy rounds that found identical state.",
                s.syncs_identical,
            ),
            (
                "weft_owners_hidden_failed_total",
                "Owners whose entries were hidden because membership declared them down.",
                s.owners_hidden_failed,
            ),
            (
                "weft_owners_hidden_unknown_total",
                "Owners whose entries were hidden because membership never knew them alive.",
                s.owners_hidden_unknown,
            ),
            (
                "weft_identity_moves_total",
                "Times this node moved its generation above an earlier life of its name.",
                s.identity_moves,
            ),
            (
                "weft_old_life_entries_removed_total",
                "Entries of earlier lives of this node's name that it deleted.",
                s.old_life_entries_removed,
            ),
            (
                "weft_records_expired_total",
                "Node and attachment records of long-gone members dropped.",
                s.records_expired,
            ),
            ("weft_records_refused_total", "Records of expired members refused.", s.records_refused),
        ];
        for (name, help, v) in counters {
            write_counter(&mut out, name, help, v);
        }
        let _ = writeln!(
            out,
            "# HELP weft_lamport_time The node's Lamport clock.\n# TYPE weft_lamport_time gauge"
        );
        let _ = writeln!(out, "weft_lamport_time {}", self.ltime());
        let _ = writeln!(
            out,
            "# HELP weft_networks_without_definition Networks attached here with no live definition in the cluster.\n# TYPE weft_networks_without_definition gauge"
        );
        let _ =
            writeln!(out, "weft_networks_without_definition {}", self.attached_without_definition().len());
        out
    }
}

/// Appends one Prometheus counter (HELP, TYPE and value lines).
pub fn write_counter(out: &mut String, name: &str, help: &str, value: u64) {
    use std::fmt::Write;
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
}

/// Network ids are 32 lowercase hex digits.
pub fn is_network_id(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Subnets one network may have.
pub const MAX_SUBNETS: usize = 64;

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
mod tests {
    use super::*;

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, i], 7946))
    }

    /// Agents wired back to back, every transmit delivered at once unless cut off.
    struct Net {
        agents: Vec<Agent>,
        now: Instant,
        cut: bool,
    }

    impl Net {
        fn new(n: u8) -> Net {
            Net::with_cfg(n, GossipConfig::lan(8))
        }

        fn with_cfg(n: u8, cfg: GossipConfig) -> Net {
            let now = Instant::now();
            let agents = (1..=n)
                .map(|i| {
                    Agent::new(cfg.clone(), NodeId::new(format!("a{i}"), addr(i), 1), i as u64, 0, now)
                        .unwrap()
                })
                .collect();
            let mut net = Net { agents, now, cut: false };
            for i in 1..net.agents.len() {
                net.agents[i].join(now, &[addr(1)]).unwrap();
            }
            net.run(Duration::from_secs(3));
            net
        }

        fn pump(&mut self) {
            loop {
                let mut moved = false;
                for i in 0..self.agents.len() {
                    while let Some(t) = self.agents[i].poll_transmit() {
                        moved = true;
                        let Some(j) = self.agents.iter().position(|a| a.id().addr == t.dst) else { continue };
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
                    while self.agents[i].poll_event(self.now).is_some() {}
                }
                if !moved {
                    break;
                }
            }
        }

        fn run(&mut self, d: Duration) {
            let end = self.now + d;
            while self.now < end {
                self.now += Duration::from_millis(20);
                for a in &mut self.agents {
                    a.handle_timeout(self.now);
                }
                self.pump();
            }
        }
    }

    /// A driver's watcher that ignores everything (the tests read the tables directly).
    struct Ignore;

    impl TableWatcher for Ignore {
        fn event_notify(&mut self, _: &str, _: &str, _: &str, _: Option<&[u8]>, _: Option<&[u8]>) {}

        fn decode_table_entry(&self, _: &str, key: &str, _: &[u8]) -> (String, BTreeMap<String, String>) {
            (key.to_string(), BTreeMap::new())
        }
    }

    #[test]
    fn a_network_attached_by_id_before_its_definition_arrives_takes_driver_writes() {
        let mut net = Net::new(2);
        let v = Bytes::from_static(b"10.0.0.2");
        for a in &mut net.agents {
            let spec = TableSpec::node_owned(ObjectType::Endpoint);
            a.register_table("eps", spec, Box::new(Ignore)).unwrap();
            let refused =
                a.register_table(NETWORKS_TABLE, TableSpec::cluster(ObjectType::Network), Box::new(Ignore));
            assert!(matches!(refused, Err(AgentError::Reserved(_))), "{refused:?}");
        }
        // a2 is restarting: it re-attaches by id before the definition reaches it.
        net.cut = true;
        let now = net.now;
        let def = net.agents[0].create_network(now, "green", "overlay", &[], None).unwrap();
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
        let def = net.agents[1].create_network(now, "green", "overlay", &[], None).unwrap();
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
        let ltime = net.agents[0].ltime() + 100;
        let mut a1 = Agent::new(cfg, NodeId::new("a1", addr(1), 2), 2, ltime, net.now).unwrap();
        a1.restore_attached(net.now, std::slice::from_ref(&def.id), std::slice::from_ref(&def)).unwrap();
        a1.join(net.now, &[addr(2), addr(3)]).unwrap();
        net.agents[0] = a1;
        net.cut = false;
        net.run(Duration::from_secs(15));
        // No peer holds a definition or a tombstone: that proves nothing (a whole-cluster
        // outage looks the same), so the network stays attached, flagged, with the persisted
        // definition, and the operator detaches it by id.
        assert_eq!(net.agents[0].attached_networks(), vec![def.id.clone()]);
        assert_eq!(net.agents[0].attached_without_definition(), vec![def.id.clone()]);
        assert_eq!(net.agents[0].restored_definition(&def.id), Some(&def));
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
        let def = net.agents[0].create_network(now, "green", "overlay", &[], None).unwrap();
        net.run(Duration::from_secs(1));
        let now = net.now;
        net.agents[1].attach(now, "green").unwrap();
        net.run(Duration::from_secs(2));
        // a2 goes down; meanwhile a1 removes the network.
        net.cut = true;
        let ltime = net.agents[1].ltime();
        let now = net.now;
        net.agents[0].remove_network(now, "green", true).unwrap();
        net.run(Duration::from_secs(5));
        // a2 restarts: a new life re-attaches the network by id, before any definition
        // (or its tombstone) reaches it, as the shell does from its persisted state.
        let id = NodeId::new("a2", addr(2), 2);
        let mut a2 = Agent::new(GossipConfig::lan(8), id, 22, ltime, net.now).unwrap();
        a2.reattach(net.now, &def.id).unwrap();
        a2.join(net.now, &[addr(1)]).unwrap();
        assert_eq!(a2.attached_without_definition(), vec![def.id.clone()], "flagged until it hears");
        net.agents[1] = a2;
        net.cut = false;
        net.run(Duration::from_secs(10));
        assert!(net.agents[1].attached_networks().is_empty(), "the tombstone detached it");
        assert!(net.agents[1].attached_without_definition().is_empty());
    }

    #[test]
    fn network_definitions_are_cluster_wide_and_validated() {
        let mut net = Net::new(3);
        let now = net.now;
        let a = &mut net.agents[0];
        let def =
            a.create_network(now, "blue", "overlay", &["10.1.0.0/24".into()], Some("10.1.0.1")).unwrap();
        assert_eq!(def.id.len(), 32);
        assert!(matches!(
            a.create_network(now, "blue", "overlay", &[], None),
            Err(AgentError::NetworkExists(_))
        ));
        assert!(matches!(
            a.create_network(now, "x", "overlay", &["10.1.0.7/24".into()], None),
            Err(AgentError::BadSubnet(_))
        ));
        assert!(matches!(
            a.create_network(now, "y", "overlay", &["nope".into()], None),
            Err(AgentError::BadSubnet(_))
        ));
        assert!(matches!(
            a.create_network(now, "z", "overlay", &["10.2.0.0/24".into(), "10.2.0.0/25".into()], None),
            Err(AgentError::BadSubnet(_))
        ));
        assert!(matches!(
            a.create_network(now, "w", "overlay", &["10.3.0.0/24".into()], Some("10.4.0.1")),
            Err(AgentError::BadGateway(_))
        ));
        assert!(matches!(
            a.create_network(now, "cluster", "overlay", &[], None),
            Err(AgentError::Reserved(_))
        ));
        assert!(matches!(
            a.create_network(now, "bad name", "overlay", &[], None),
            Err(AgentError::BadName(_))
        ));
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
        net.agents[0].create_network(now, "red", "overlay", &[], None).unwrap();
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
        let x = net.agents[0].create_network(now, "dup", "overlay", &[], None).unwrap();
        let y = net.agents[1].create_network(now, "dup", "overlay", &[], None).unwrap();
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
        net.agents[0].create_network(now, "g", "overlay", &[], None).unwrap();
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
        assert!(a.table_load(now, "g", "endpoints", &pairs, false).is_err());
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
        let m = a.metrics();
        assert!(
            m.contains("weft_members{state=\"alive\"} 2") && m.contains("weft_decode_errors_total 0"),
            "{m}"
        );
    }
}

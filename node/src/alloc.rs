//! The agent's allocator: weft's "global-scope NetworkAllocator that splits pools by node".
//!
//! It wires the rings of `weft-ipam` into the agent, sans-IO like the rest of it:
//!
//! * **Cluster rings**, in the `cluster` network: the VNI range and the default global pool
//!   (Docker's `10.0.0.0/8` cut into `/24`s). Each is seeded once by single-decree Paxos among
//!   a fixed acceptor set (the names of the nodes at the seed addresses, or `--acceptors`) and
//!   split among the (name, instance) members whose promises formed the quorum.
//! * **Subnet rings**, one per IPv4 subnet of a network, in that network: created wholly owned
//!   by the network's creator; every node that attaches asks for a share by donation.
//! * **Endpoints**: a node allocates its endpoints' addresses from its own share, with no round
//!   trip, and publishes each in the network's node-owned `endpoint_table`.
//!
//! Ring state travels in the reserved cluster table [`IPAM_TABLE`] (its merge rule is the
//! ring's); donation and Paxos messages go point to point. Everything a node owns, has handed
//! out and its endpoint records go into the agent's one durable store as a few keys per change
//! (the ring's change log) before anything that rests on them leaves: the rings hold their
//! publications and answers until [`Allocator::persisted`] says the batch that carried them is
//! durable, and a command's reply waits for its batch like any other.
//!
//! * **Removal** (`weft node rm`, [`removal`]): a dead instance's shares go to an heir, and a
//!   removed instance that comes back tears down.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};
use weft_gossip::{
    CLUSTER_NETWORK, Event, GossipNode, MemberState, MergeRule, NodeId, TableEventKind, VersionRef,
};
use weft_ipam::net::{addr_at, offset_of};
use weft_ipam::ring::{Name, Output as RingOutput, RingChanges, RingDurable, member_name};
use weft_ipam::seeding::{SeedOutput, SeederDurable};
use weft_ipam::{PaxosMsg, Ring, RingEntry, RingError, RingEvent, RingMsg, Seed, Seeder, Space};

use crate::agent::NetworkDef;
use crate::error::AgentError;

pub mod removal;
pub use removal::{NodeRemoval, NodeRmReply, REMOVALS_PREFIX, REMOVED_KEY, REMOVED_TABLE, RemovalMerge};

/// The reserved cluster table holding ring state (seeds, claims, removals), keyed by
/// [`RingEntry::key`]; in `cluster` for the cluster rings, in each network for its subnets.
pub const IPAM_TABLE: &str = "ipam";
/// libnetwork's endpoint table: node-owned, one endpoint object per key (its id).
pub const ENDPOINT_TABLE: &str = "endpoint_table";
/// The default global pool's ring.
pub const POOL_RING: &str = "pool";
/// Docker's option naming a network's VNIs, one per IPv4 subnet, comma-separated (the
/// overlay driver's).
pub use weft_overlay::driver::VXLANID_OPTION;
/// How long a command waits for allocation to become possible (a seed being chosen, a
/// donation answered) before it fails with what it waited for.
pub const ALLOC_WAIT: Duration = Duration::from_secs(5);
/// A share with fewer free slots than this asks for more.
pub const LOW_WATER: u128 = 4;
/// How often a low share asks again.
const REFILL_EVERY_MS: u64 = 2_000;
/// Delay before acceptor `rank` proposes a seed (so the first in the set usually wins alone).
const PROPOSE_STAGGER_MS: u64 = 300;
/// How long a restarted node that finds no other member waits before it allocates alone.
const CATCH_UP_ALONE_MS: u64 = 3_000;
/// Endpoints one network may hold on one node.
pub const MAX_ENDPOINTS: usize = 1 << 16;

/// Keys of the durable store (see `persist`): ring change logs, acceptor state, endpoint
/// records, and what this node allocated for the networks it created.
pub const IPAM_PREFIX: &str = "ipam/";
pub const PAXOS_PREFIX: &str = "paxos/";
pub const EP_PREFIX: &str = "ep/";
pub const OWN_PREFIX: &str = "own/";
/// Store keys of network ids seen removed (`gone/<id>`): a definition written back under one
/// (by nodes that were away past its tombstone's reaping) is deleted again.
pub const GONE_PREFIX: &str = "gone/";

const MSG_MAGIC: &[u8] = b"weft-ipam\x01";

/// What the allocator is configured with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocConfig {
    /// The default global pool, and the prefix length of the subnets cut from it.
    pub default_pool: Ipv4Net,
    pub pool_prefix: u8,
    /// The acceptor set (node names); `None`: derived from the seed list.
    pub acceptors: Option<Vec<String>>,
    /// How long a released address or VNI stays out of use.
    pub reuse_after: Duration,
}

impl Default for AllocConfig {
    fn default() -> Self {
        AllocConfig {
            default_pool: "10.0.0.0/8".parse().expect("valid"),
            pool_prefix: 24,
            acceptors: None,
            reuse_after: Duration::from_millis(weft_ipam::ring::REUSE_AFTER_MS),
        }
    }
}

impl AllocConfig {
    /// `10.0.0.0/8/24`: what the pool ring's seed records as its params.
    pub fn pool_params(&self) -> String {
        format!("{}/{}", self.default_pool, self.pool_prefix)
    }

    fn pool_space(&self) -> Result<Space, String> {
        let bits = self.pool_prefix.checked_sub(self.default_pool.prefix_len()).filter(|b| *b <= 24);
        let Some(bits) = bits.filter(|_| self.pool_prefix <= 30) else {
            return Err(format!(
                "default pool {} cannot be cut into /{} subnets (at most 2^24 of them, /30 at most)",
                self.default_pool, self.pool_prefix
            ));
        };
        Space::new(POOL_RING, 1u128 << bits).map_err(|e| e.to_string())
    }
}

/// Parses `10.0.0.0/8/24` (a pool and the prefix of its subnets).
pub fn parse_pool(s: &str) -> Result<(Ipv4Net, u8), String> {
    let (net, prefix) =
        s.rsplit_once('/').ok_or_else(|| format!("{s:?}: expected POOL/PREFIX, e.g. 10.0.0.0/8/24"))?;
    let net: Ipv4Net = net.parse().map_err(|_| format!("{s:?}: {net} is not an IPv4 CIDR"))?;
    let prefix: u8 = prefix.parse().map_err(|_| format!("{s:?}: {prefix} is not a prefix length"))?;
    if net.trunc() != net {
        return Err(format!("{s:?}: host bits set in {net}"));
    }
    let cfg = AllocConfig { default_pool: net, pool_prefix: prefix, ..AllocConfig::default() };
    cfg.pool_space()?;
    Ok((net, prefix))
}

/// An endpoint: the value of its `endpoint_table` entry, and what `endpoint ls --json` lists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub id: String,
    pub name: String,
    /// The network's name.
    pub network: String,
    pub network_id: String,
    /// The node that allocated it (its owner).
    pub node: String,
    /// The owner's instance (hex).
    #[serde(default)]
    pub instance: String,
    /// Address with prefix, e.g. `10.0.1.5/24`.
    pub ipv4: String,
    pub mac: String,
    #[serde(default)]
    pub gateway: Option<String>,
    /// The sandbox (network namespace) its interface is in; none: records only, no interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

impl Endpoint {
    pub fn short_id(&self) -> &str {
        self.id.get(..12).unwrap_or(&self.id)
    }
}

/// What the creator of a network allocated for it from the cluster rings: released when it
/// sees the definition deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Owned {
    pool_slots: Vec<u128>,
    vnis: Vec<u32>,
}

/// Messages between allocators.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum AllocMsg {
    Paxos(PaxosMsg),
    Ring { network: String, msg: RingMsg },
}

/// The merge rule of [`IPAM_TABLE`]: the ring's total order on versions of one key.
#[derive(Debug)]
pub struct RingMerge;

impl MergeRule for RingMerge {
    fn compare(&self, a: &VersionRef<'_>, b: &VersionRef<'_>) -> std::cmp::Ordering {
        match (decode_entry(a.value), decode_entry(b.value)) {
            (Some(x), Some(y)) => x.compare(&y),
            _ => std::cmp::Ordering::Equal,
        }
    }
}

pub fn decode_entry(v: &[u8]) -> Option<RingEntry> {
    serde_json::from_slice(v).ok()
}

/// A node as a ring member: `name@instance`.
pub fn member_of(id: &NodeId) -> Name {
    format!("{}@{}", id.name, id.instance_hex()).into()
}

/// Counters for `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocStats {
    pub allocations: u64,
    pub releases: u64,
    pub donations_asked: u64,
    pub donations_granted: u64,
    pub donations_refused: u64,
    pub donations_given: u64,
    pub no_space: u64,
    pub violations: u64,
    pub seed_conflicts: u64,
    pub bad_messages: u64,
}

/// One ring as this node sees it (`network inspect --verbose`, `/metrics`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingReport {
    pub network: String,
    pub ring: String,
    pub seeded: bool,
    /// Who seeded it, with the seed's owners.
    pub seed_owners: Vec<String>,
    /// What this node owns, as slot ranges shown in the ring's terms (addresses, VNIs, subnets).
    pub owned: Vec<String>,
    pub owned_blocks: u64,
    pub free_slots: u128,
    pub allocated: u128,
    pub quarantined: u128,
    pub requesting_from: Option<String>,
    /// The owners asked last time no space was found.
    pub last_no_space: Vec<String>,
    /// Allocations in blocks this node no longer owns.
    pub conflicts: usize,
    /// Why the ring cannot be used, if it cannot (a seed conflict, a removal).
    pub problem: Option<String>,
    /// Removed nodes whose inherited blocks are held until they are down or tore down.
    #[serde(default)]
    pub fenced: Vec<String>,
}

/// The allocator's state for the view.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocReport {
    pub member: String,
    pub acceptors: Option<Vec<String>>,
    /// Why acceptors are not known yet, or why this node cannot seed.
    pub acceptors_pending: Option<String>,
    pub learner_only: bool,
    pub rings: Vec<RingReport>,
    pub stats: AllocStats,
    /// This instance was removed (`node rm`), by whom.
    #[serde(default)]
    pub removed_by: Option<String>,
}

/// What a command waits for before it can allocate (the agent parks it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending(pub String);

type RingKey = (String, String);

/// A ring as the store holds it: meta, cursor, bitmap pages.
type StoredRing = (Option<RingDurable>, u128, Vec<(u128, Vec<u64>)>);

/// A command's outcome: done, waiting (`Err(Ok(why))`), or failed.
pub type Try<T> = Result<T, Result<Pending, AgentError>>;

/// What a new network got from the cluster rings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkAlloc {
    pub subnets: Vec<IpNet>,
    pub vnis: Vec<u32>,
    /// Default-pool slots (one per subnet taken from the pool).
    pub pool_slots: Vec<u128>,
}

/// One owner's share of a ring, as the replicated claims say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerShare {
    /// `name@instance`.
    pub owner: String,
    /// Slot ranges.
    pub ranges: Vec<(u128, u128)>,
    pub blocks: u64,
    /// Free blocks it last advertised.
    pub free_blocks: Option<u64>,
}

#[derive(Debug, Clone)]
pub enum Staged {
    Ring(RingKey, u64),
    Seeder(String, u64),
}

/// See the module docs.
pub struct Allocator {
    me: Name,
    name: Arc<str>,
    addr: SocketAddr,
    cfg: AllocConfig,
    epoch: Instant,
    seeds: Vec<SocketAddr>,
    seeds_known: bool,
    unresolved: Vec<String>,
    acceptors: Option<Vec<Name>>,
    acceptors_pending: Option<String>,
    /// Started without seeds nor `--acceptors`, and another member appeared before the rings
    /// were seeded: this node never seeds.
    solo_lost: bool,
    rings: BTreeMap<RingKey, Ring>,
    problems: BTreeMap<RingKey, String>,
    seeders: BTreeMap<String, Seeder>,
    propose_at: Option<u64>,
    staged_seeder_gen: BTreeMap<String, u64>,
    staged: VecDeque<(u64, Vec<Staged>)>,
    /// Local endpoints by (network id, endpoint id).
    endpoints: BTreeMap<RingKey, Endpoint>,
    owned: BTreeMap<String, Owned>,
    ops: Vec<(String, Option<Vec<u8>>)>,
    last_refill: BTreeMap<RingKey, u64>,
    last_no_space: BTreeMap<RingKey, Vec<Name>>,
    local: VecDeque<(Name, PaxosMsg)>,
    warned: BTreeSet<String>,
    /// A ring gained space or a seed was chosen since the agent last looked.
    progress: bool,
    /// Restored endpoints not yet published again.
    republish_pending: bool,
    /// Removal records (`node rm`), by removed `name@instance`.
    removals: BTreeMap<String, NodeRemoval>,
    /// This instance was removed, by whom: it allocates nothing more.
    removed: Option<String>,
    /// When removal records are looked at next (ms).
    removal_check_at: u64,
    /// Removal records read back from the store, not yet checked against the cluster table.
    removals_unpublished: bool,
    /// (removed member, ring) pairs with nothing left to inherit.
    inherit_checked: BTreeMap<RingKey, BTreeSet<String>>,
    /// Network ids seen removed (persisted under [`GONE_PREFIX`]).
    gone: BTreeSet<String>,
    /// Restored from a store and not yet caught up with the cluster (a removal of this node,
    /// ring records that moved on): nothing is published or allocated until it has synced the
    /// cluster's tables (or found itself alone).
    catching_up: bool,
    /// Inherited holds began (or came back from the store), or a definition arrived while some
    /// hold lasts: live users of inherited slots are to be adopted.
    adopt_due: bool,
    pub stats: AllocStats,
}

impl std::fmt::Debug for Allocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Allocator")
            .field("me", &self.me)
            .field("rings", &self.rings.len())
            .finish_non_exhaustive()
    }
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("serializable")
}

fn words_to_bytes(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn bytes_to_words(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()
}

impl Allocator {
    pub fn new(id: &NodeId, cfg: AllocConfig, now: Instant) -> Self {
        Allocator {
            me: member_of(id),
            name: id.name.clone(),
            addr: id.addr,
            cfg,
            epoch: now,
            seeds: Vec::new(),
            seeds_known: false,
            unresolved: Vec::new(),
            acceptors: None,
            acceptors_pending: None,
            solo_lost: false,
            rings: BTreeMap::new(),
            problems: BTreeMap::new(),
            seeders: BTreeMap::new(),
            propose_at: None,
            staged_seeder_gen: BTreeMap::new(),
            staged: VecDeque::new(),
            endpoints: BTreeMap::new(),
            owned: BTreeMap::new(),
            ops: Vec::new(),
            last_refill: BTreeMap::new(),
            last_no_space: BTreeMap::new(),
            local: VecDeque::new(),
            warned: BTreeSet::new(),
            progress: false,
            republish_pending: false,
            removals: BTreeMap::new(),
            removed: None,
            removal_check_at: 0,
            removals_unpublished: false,
            inherit_checked: BTreeMap::new(),
            gone: BTreeSet::new(),
            catching_up: false,
            adopt_due: false,
            stats: AllocStats::default(),
        }
    }

    /// Sets the configuration (before the cluster rings exist: the pool is fixed once seeded).
    pub fn configure(&mut self, cfg: AllocConfig) {
        for r in self.rings.values_mut() {
            r.set_reuse_after(cfg.reuse_after.as_millis() as u64);
        }
        self.cfg = cfg;
    }

    fn ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    fn warn_once(&mut self, key: String, line: impl FnOnce() -> String) {
        if self.warned.insert(key) {
            tracing::warn!("{}", line());
        }
    }

    /// Reads back what the store holds under the allocator's prefixes.
    pub fn restore(&mut self, keys: &BTreeMap<String, Vec<u8>>) -> Result<(), String> {
        // ipam/<net>/<ring>/{meta,cursor,page/<n>}; a ring name may hold '/' (a CIDR).
        let mut parts: BTreeMap<RingKey, StoredRing> = BTreeMap::new();
        for (k, v) in keys.range(IPAM_PREFIX.to_string()..).take_while(|(k, _)| k.starts_with(IPAM_PREFIX)) {
            let rest = &k[IPAM_PREFIX.len()..];
            let (net, rest) = rest.split_once('/').ok_or_else(|| format!("bad key {k}"))?;
            let (ring, field) = if let Some(r) = rest.strip_suffix("/meta") {
                (r, "meta")
            } else if let Some(r) = rest.strip_suffix("/cursor") {
                (r, "cursor")
            } else if let Some((r, p)) = rest.rsplit_once("/page/") {
                (r, p)
            } else {
                return Err(format!("bad key {k}"));
            };
            let e = parts.entry((net.to_string(), ring.to_string())).or_default();
            match field {
                "meta" => e.0 = Some(serde_json::from_slice(v).map_err(|err| format!("{k}: {err}"))?),
                "cursor" => {
                    let b: [u8; 16] = v.as_slice().try_into().map_err(|_| format!("{k}: not 16 bytes"))?;
                    e.1 = u128::from_le_bytes(b);
                }
                p => {
                    let page: u128 = p.parse().map_err(|_| format!("bad key {k}"))?;
                    e.2.push((page, bytes_to_words(v)));
                }
            }
        }
        for (key, (meta, cursor, pages)) in parts {
            let Some(meta) = meta else {
                // Pages of a ring whose meta went (a removal interrupted): nothing to restore.
                tracing::warn!(network = %key.0, ring = %key.1, "stored ring pages without their ring; ignored");
                continue;
            };
            let mut ring = Ring::from_parts(meta, cursor, pages);
            ring.set_reuse_after(self.cfg.reuse_after.as_millis() as u64);
            self.rings.insert(key, ring);
        }
        for (k, v) in keys.range(PAXOS_PREFIX.to_string()..).take_while(|(k, _)| k.starts_with(PAXOS_PREFIX))
        {
            let d: SeederDurable = serde_json::from_slice(v).map_err(|e| format!("{k}: {e}"))?;
            let ring = k[PAXOS_PREFIX.len()..].to_string();
            self.staged_seeder_gen.insert(ring.clone(), 0);
            self.seeders.insert(ring, Seeder::restore(d));
        }
        for (k, v) in keys.range(EP_PREFIX.to_string()..).take_while(|(k, _)| k.starts_with(EP_PREFIX)) {
            let e: Endpoint = serde_json::from_slice(v).map_err(|err| format!("{k}: {err}"))?;
            self.endpoints.insert((e.network_id.clone(), e.id.clone()), e);
            self.republish_pending = true;
        }
        if let Some(by) = keys.get(REMOVED_KEY) {
            self.removed = Some(String::from_utf8_lossy(by).into_owned());
        }
        for (k, v) in
            keys.range(REMOVALS_PREFIX.to_string()..).take_while(|(k, _)| k.starts_with(REMOVALS_PREFIX))
        {
            let r: NodeRemoval = serde_json::from_slice(v).map_err(|e| format!("{k}: {e}"))?;
            self.removals.insert(r.node.clone(), r);
            self.removals_unpublished = true;
        }
        self.catching_up = !self.rings.is_empty() || !self.endpoints.is_empty();
        self.adopt_due = self.rings.values().any(Ring::has_holds);
        if let Some(by) = &self.removed {
            tracing::error!(
                by = %by,
                "THIS NODE WAS REMOVED from the cluster (weft node rm {}): it allocates nothing; to rejoin, stop it \
                 and start it with an empty data dir (a new instance)",
                self.me
            );
        }
        for (k, _) in keys.range(GONE_PREFIX.to_string()..).take_while(|(k, _)| k.starts_with(GONE_PREFIX)) {
            self.gone.insert(k[GONE_PREFIX.len()..].to_string());
        }
        for (k, v) in keys.range(OWN_PREFIX.to_string()..).take_while(|(k, _)| k.starts_with(OWN_PREFIX)) {
            let o: Owned = serde_json::from_slice(v).map_err(|e| format!("{k}: {e}"))?;
            self.owned.insert(k[OWN_PREFIX.len()..].to_string(), o);
        }
        for ((_, ring), r) in &self.rings {
            if let (Some(seed), Some(s)) = (r.state().seed.as_ref(), self.seeders.get_mut(ring))
                && seed.owners.iter().any(|o| member_name(o) == &*self.name && *o != self.me)
            {
                s.set_learner_only();
            }
        }
        // The restored cluster rings fix the acceptor set (it is permanent for a ring).
        if let Some(r) = self.rings.get(&(CLUSTER_NETWORK.to_string(), weft_ipam::ring::VNI_RING.to_string()))
            && let Some(a) = &r.durable().acceptors
        {
            self.acceptors = Some(a.clone());
        }
        Ok(())
    }

    /// Re-publishes this node's endpoints after a restart (they are its own entries): at the
    /// first tick after a restore.
    fn republish(&mut self, gossip: &mut GossipNode, now: Instant) {
        if !std::mem::take(&mut self.republish_pending) {
            return;
        }
        for ((nid, id), e) in &self.endpoints {
            if gossip.is_attached(nid)
                && let Err(err) = gossip.put_entry(now, nid, ENDPOINT_TABLE, id, Bytes::from(json(e)))
            {
                tracing::warn!(endpoint = %id, error = %err, "cannot republish endpoint");
            }
        }
    }

    /// The seed list the acceptors are derived from. Until it is given (or `--acceptors`), the
    /// node does not know whether it is alone by design, and seeds nothing.
    pub fn set_seeds(&mut self, seeds: &[SocketAddr]) {
        self.seeds = seeds.to_vec();
        self.seeds_known = true;
    }

    /// Seeds named by a host name that did not resolve at start: the acceptor set cannot be
    /// derived alike on every node without them.
    pub fn set_unresolved_seeds(&mut self, unresolved: Vec<String>) {
        self.unresolved = unresolved;
    }

    /// Whether something a parked command may be waiting for happened (and clears it).
    pub fn take_progress(&mut self) -> bool {
        std::mem::take(&mut self.progress)
    }

    // ----- acceptors and seeding -------------------------------------------------------------

    fn alive_members(gossip: &GossipNode) -> BTreeSet<Name> {
        gossip
            .members()
            .iter()
            .filter(|m| matches!(m.state, MemberState::Alive | MemberState::Suspect))
            .map(|m| member_of(&m.id))
            .collect()
    }

    /// Learns the acceptor set once every seed's name is known.
    fn resolve_acceptors(&mut self, gossip: &GossipNode) {
        if self.acceptors.is_some() {
            return;
        }
        if let Some(a) = &self.cfg.acceptors {
            self.acceptors = Some(a.iter().map(|s| Name::from(s.as_str())).collect());
        } else if !self.unresolved.is_empty() {
            self.acceptors_pending = Some(format!(
                "acceptors unknown: seed(s) {} did not resolve at start (restart the agent once they do, or \
                 give --acceptors)",
                self.unresolved.join(", ")
            ));
            return;
        } else if !self.seeds_known {
            self.acceptors_pending = Some("acceptors not known yet: this node has not joined".into());
            return;
        } else if self.seeds.is_empty() {
            let others =
                gossip.members().iter().any(|m| m.id.name != self.name && m.state == MemberState::Alive);
            if others {
                self.solo_lost = true;
                self.acceptors_pending = Some(
                    "this node was started without --join or --acceptors and is no longer alone: it cannot \
                     seed the cluster rings (give every agent the same --join list)"
                        .into(),
                );
                return;
            }
            self.acceptors = Some(vec![Name::from(&*self.name)]);
        } else {
            let members = gossip.members();
            let mut names = Vec::new();
            let mut missing = Vec::new();
            for s in &self.seeds {
                if *s == self.addr {
                    names.push(Name::from(&*self.name));
                } else if let Some(m) = members.iter().find(|m| m.id.addr == *s) {
                    names.push(Name::from(&*m.id.name));
                } else {
                    missing.push(s.to_string());
                }
            }
            if !missing.is_empty() {
                self.acceptors_pending = Some(format!(
                    "acceptors not known yet: no name learned for seed(s) {}",
                    missing.join(", ")
                ));
                return;
            }
            self.acceptors = Some(names);
        }
        if let Some(a) = &mut self.acceptors {
            a.sort();
            a.dedup();
            tracing::info!(acceptors = ?a, "acceptor set of the cluster rings");
        }
        self.acceptors_pending = None;
    }

    fn cluster_key(ring: &str) -> RingKey {
        (CLUSTER_NETWORK.to_string(), ring.to_string())
    }

    /// Creates the cluster rings and their seeders once the acceptor set is known, and starts
    /// a proposal from an acceptor while they are unseeded.
    fn ensure_cluster_rings(&mut self, gossip: &mut GossipNode, now: Instant) {
        let Some(acceptors) = self.acceptors.clone() else { return };
        let pool_space = match self.cfg.pool_space() {
            Ok(s) => s,
            Err(e) => {
                self.warn_once("pool-config".into(), || e.clone());
                return;
            }
        };
        for (ring, space) in [(weft_ipam::ring::VNI_RING, Space::vnis()), (POOL_RING, pool_space)] {
            let key = Self::cluster_key(ring);
            // The seeder first: a seed replayed into the ring may make it a learner only.
            if !self.seeders.contains_key(ring) {
                let mut s = Seeder::new(Name::from(&*self.name), ring, acceptors.iter().cloned());
                s.set_member(self.me.clone());
                self.seeders.insert(ring.to_string(), s);
            }
            if !self.rings.contains_key(&key) {
                let mut r = Ring::cluster(self.me.clone(), space.clone(), [], acceptors.iter().cloned());
                r.set_reuse_after(self.cfg.reuse_after.as_millis() as u64);
                self.rings.insert(key.clone(), r);
                self.replay_table(gossip, CLUSTER_NETWORK, ring);
            }
            let params = if ring == POOL_RING { self.cfg.pool_params() } else { String::new() };
            let s = self.seeders.get_mut(ring).expect("inserted");
            s.set_params(params);
            s.set_member(self.me.clone());
        }
        // A chosen seed the ring has not installed (learned by Paxos before a crash).
        let chosen: Vec<(String, Seed)> =
            self.seeders.iter().filter_map(|(r, s)| s.chosen().map(|c| (r.clone(), c.clone()))).collect();
        for (ring, seed) in chosen {
            self.install(&Self::cluster_key(&ring), &seed);
        }
        let is_acceptor = acceptors.iter().any(|a| **a == *self.name);
        let unseeded = [weft_ipam::ring::VNI_RING, POOL_RING]
            .iter()
            .any(|r| self.rings.get(&Self::cluster_key(r)).is_some_and(|x| !x.is_seeded()));
        if !is_acceptor || !unseeded || self.solo_lost {
            return;
        }
        let now_ms = self.ms(now);
        let rank = acceptors.iter().position(|a| **a == *self.name).unwrap_or(0) as u64;
        let at = *self.propose_at.get_or_insert(now_ms + rank * PROPOSE_STAGGER_MS);
        if now_ms < at {
            return;
        }
        for ring in [weft_ipam::ring::VNI_RING, POOL_RING] {
            let seeded = self.rings.get(&Self::cluster_key(ring)).is_some_and(Ring::is_seeded);
            let space = self.rings.get(&Self::cluster_key(ring)).map(|r| r.space().clone());
            if let (false, Some(space), Some(s)) = (seeded, space, self.seeders.get_mut(ring))
                && !s.is_proposing()
                && s.chosen().is_none()
            {
                s.propose(space, now_ms);
            }
        }
    }

    /// Merges every live entry of a ring's table into it (a ring just created).
    fn replay_table(&mut self, gossip: &GossipNode, network: &str, ring: &str) {
        let mut entries = Vec::new();
        gossip.walk(network, IPAM_TABLE, |_, v, _| {
            if let Some(e) = decode_entry(v)
                && e.ring() == ring
            {
                entries.push(e);
            }
            true
        });
        // Seeds first: claims of an unseeded ring have nothing to land on.
        entries.sort_by_key(|e| !matches!(e, RingEntry::Seed(_)));
        let key = (network.to_string(), ring.to_string());
        for e in entries {
            self.merge(&key, &e);
        }
    }

    fn install(&mut self, key: &RingKey, seed: &Seed) {
        let Some(r) = self.rings.get_mut(key) else { return };
        if r.state().seed.as_ref() == Some(seed) {
            return;
        }
        match r.install_seed(seed) {
            Ok(()) => {
                self.progress = true;
                self.check_seed_params(key, seed);
            }
            Err(e) => self.ring_error(key, e),
        }
    }

    fn check_seed_params(&mut self, key: &RingKey, seed: &Seed) {
        if key.1 == POOL_RING && !seed.params.is_empty() && seed.params != self.cfg.pool_params() {
            let (theirs, ours) = (seed.params.clone(), self.cfg.pool_params());
            self.warn_once(format!("params/{theirs}"), || {
                format!(
                    "the default pool was seeded as {theirs}; this node's --default-pool {ours} is ignored"
                )
            });
        }
        // An acceptor that sees its name under another instance in a chosen seed is a
        // reinstalled host (its data dir lost): it may have promised in that earlier life and
        // forgotten, so it only learns from now on (persisted).
        if seed.owners.iter().any(|o| member_name(o) == &*self.name && *o != self.me)
            && let Some(s) = self.seeders.get_mut(&key.1)
            && !s.is_learner_only()
        {
            s.set_learner_only();
            tracing::warn!(
                ring = %key.1,
                "an earlier instance of this node's name is an owner of the seed: this node lost its acceptor \
                 state with its data dir and takes part in seeding as a learner only"
            );
        }
    }

    fn ring_error(&mut self, key: &RingKey, e: RingError) {
        match &e {
            RingError::Violations(v) => {
                self.stats.violations += v.len() as u64;
                tracing::warn!(network = %key.0, error = %e, "refused ring records");
            }
            RingError::SeedConflict { .. } => {
                self.stats.seed_conflicts += 1;
                let line = format!(
                    "ring {} holds two different seeds (two clusters seeded apart and merged?): nothing is \
                     allocated from it; rebuild the smaller cluster ({e})",
                    key.1
                );
                if self.problems.insert(key.clone(), line.clone()).is_none() {
                    tracing::error!("{line}");
                }
            }
            // A seed that cannot be this ring's: nothing is allocated from it until an operator
            // acts.
            RingError::SeedOwners { .. } | RingError::SeedMismatch { .. } => {
                let line = e.to_string();
                if self.problems.insert(key.clone(), line.clone()).is_none() {
                    tracing::error!(network = %key.0, "{line}");
                }
            }
            // Transient (no owner with space now, a request refused): reported by the ring's
            // events and the command that waits, not a lasting problem.
            _ => tracing::debug!(network = %key.0, error = %e, "ring"),
        }
    }

    fn merge(&mut self, key: &RingKey, entry: &RingEntry) {
        if let RingEntry::Seed(s) = entry {
            return self.install(key, s);
        }
        // Ownership may change: what was left to inherit there is looked at again.
        if !self.inherit_checked.is_empty() {
            self.inherit_checked.remove(key);
        }
        let Some(r) = self.rings.get_mut(key) else { return };
        let before = r.free_slots();
        if let Err(e) = r.merge(entry) {
            self.ring_error(key, e);
        }
        if self.rings.get(key).is_some_and(|r| r.free_slots() > before) {
            self.progress = true;
        }
    }

    // ----- inputs ----------------------------------------------------------------------------

    /// Applies one event of the gossip core.
    pub fn handle_event(&mut self, gossip: &mut GossipNode, now: Instant, ev: &Event) {
        match ev {
            Event::Table(t) if t.table == IPAM_TABLE => {
                let Some(v) = &t.value else { return };
                let Some(entry) = decode_entry(v) else {
                    self.stats.bad_messages += 1;
                    return;
                };
                let key = (t.network.clone(), entry.ring().to_string());
                if self.rings.contains_key(&key) {
                    self.merge(&key, &entry);
                }
            }
            // An endpoint under this node's name that it does not hold: a version an earlier
            // life wrote and removed (the removal was lost with that life's memory) or an
            // earlier instance's. The store is the truth of this node's endpoints: it goes.
            Event::Table(t)
                if t.table == ENDPOINT_TABLE
                    && t.value.is_some()
                    && t.owner == *self.name
                    && !self.endpoints.contains_key(&(t.network.clone(), t.key.clone())) =>
            {
                tracing::info!(network = %t.network, endpoint = %t.key, "deleting an endpoint this node no longer holds");
                if let Err(e) = gossip.delete_entry(now, &t.network, ENDPOINT_TABLE, &t.key) {
                    tracing::debug!(error = %e, "stale endpoint not deleted");
                }
            }
            Event::Table(t)
                if t.network == CLUSTER_NETWORK
                    && t.table == crate::agent::NETWORKS_TABLE
                    && t.kind == TableEventKind::Delete =>
            {
                self.definition_deleted(&t.key, true);
            }
            Event::Table(t)
                if t.network == CLUSTER_NETWORK
                    && t.table == crate::agent::NETWORKS_TABLE
                    && t.value.is_some()
                    && !self.gone.contains(&t.key)
                    && self.rings.values().any(Ring::has_holds) =>
            {
                self.adopt_due = true;
            }
            // A definition written back under an id this node saw removed (by nodes that were
            // away past its tombstone's reaping): deleted again; the tombstone wins.
            Event::Table(t)
                if t.network == CLUSTER_NETWORK
                    && t.table == crate::agent::NETWORKS_TABLE
                    && t.value.is_some()
                    && self.gone.contains(&t.key) =>
            {
                tracing::warn!(network = %t.key, "a removed network's definition came back; deleting it again");
                if let Err(e) =
                    gossip.delete_entry(now, CLUSTER_NETWORK, crate::agent::NETWORKS_TABLE, &t.key)
                {
                    tracing::debug!(error = %e, "definition not deleted again");
                }
            }
            Event::Table(t) if t.network == CLUSTER_NETWORK && t.table == REMOVED_TABLE => {
                self.removal_event(gossip, now, t);
            }
            Event::Message { from, data } => {
                let Some(body) = data.strip_prefix(MSG_MAGIC) else { return };
                let Ok(msg) = serde_json::from_slice::<AllocMsg>(body) else {
                    self.stats.bad_messages += 1;
                    tracing::debug!(from = %from.name, "undecodable allocator message dropped");
                    return;
                };
                self.handle_message(gossip, now, from, msg);
            }
            _ => {}
        }
    }

    fn handle_message(&mut self, gossip: &GossipNode, now: Instant, from: &NodeId, msg: AllocMsg) {
        match msg {
            AllocMsg::Paxos(m) => {
                if let Some(s) = self.seeders.get_mut(m.ring()) {
                    s.handle(&Name::from(&*from.name), &m);
                }
            }
            AllocMsg::Ring { network, msg } => {
                let key = (network, msg.ring().to_string());
                let alive = Self::alive_members(gossip);
                let now_ms = self.ms(now);
                match &msg {
                    RingMsg::Grant { .. } => self.stats.donations_granted += 1,
                    RingMsg::Refuse { .. } => self.stats.donations_refused += 1,
                    RingMsg::Request { .. } => {}
                }
                let Some(r) = self.rings.get_mut(&key) else { return };
                let before = r.free_slots();
                let res = r.handle_message(&member_of(from), &msg, now_ms, &|m| alive.contains(m));
                let gained = r.free_slots() > before;
                if let Err(e) = res {
                    self.ring_error(&key, e);
                }
                if gained || matches!(msg, RingMsg::Refuse { .. }) {
                    self.progress = true;
                }
            }
        }
    }

    /// Timers: acceptors, proposals, donation timeouts, refills of low shares.
    pub fn tick(&mut self, gossip: &mut GossipNode, now: Instant) {
        if gossip.has_left() {
            return;
        }
        self.removal_tick(gossip, now);
        if self.catching_up && self.caught_up(gossip, now) {
            self.catching_up = false;
            self.progress = true;
        }
        if !self.catching_up {
            self.republish(gossip, now);
        }
        self.resolve_acceptors(gossip);
        self.ensure_cluster_rings(gossip, now);
        let now_ms = self.ms(now);
        for s in self.seeders.values_mut() {
            s.tick(now_ms);
        }
        // Membership is listed only when a ring needs it (a request timing out, a refill): a
        // thousand-node cluster ticks often.
        let alive_cell: std::cell::OnceCell<BTreeSet<Name>> = std::cell::OnceCell::new();
        let alive = |m: &str| alive_cell.get_or_init(|| Self::alive_members(gossip)).contains(m);
        let keys: Vec<RingKey> = self.rings.keys().cloned().collect();
        for key in keys {
            let attached = key.0 == CLUSTER_NETWORK || gossip.is_attached(&key.0);
            let r = self.rings.get_mut(&key).expect("listed");
            let asking = r.requesting_from().cloned();
            // (An error here is a NoSpace event the pump reports.)
            let _ = r.tick(now_ms, &alive);
            if asking.is_some() && r.requesting_from() != asking.as_ref() {
                self.progress = true;
            }
            // A subnet share running low asks for more (the cluster rings only when a
            // command needs it: one VNI or subnet per network lasts long).
            let low = key.0 != CLUSTER_NETWORK
                && attached
                && self.removed.is_none()
                && r.is_seeded()
                && r.removed_by().is_none()
                && r.free_slots() < LOW_WATER
                && r.requesting_from().is_none();
            if low && self.last_refill.get(&key).is_none_or(|t| now_ms >= t + REFILL_EVERY_MS) {
                self.last_refill.insert(key.clone(), now_ms);
                let r = self.rings.get_mut(&key).expect("listed");
                if r.request_space(now_ms, &alive).is_ok() && r.requesting_from().is_some() {
                    self.stats.donations_asked += 1;
                }
            }
        }
    }

    /// Hands the rings' and seeders' released outputs to the gossip core. Returns whether it
    /// did anything.
    pub fn pump(&mut self, gossip: &mut GossipNode, now: Instant) -> bool {
        let mut any = false;
        loop {
            let mut moved = false;
            let keys: Vec<RingKey> = self.rings.keys().cloned().collect();
            for key in keys {
                while let Some(o) = self.rings.get_mut(&key).and_then(Ring::poll_output) {
                    moved = true;
                    self.ring_output(gossip, now, &key, o);
                }
            }
            let rings: Vec<String> = self.seeders.keys().cloned().collect();
            for ring in rings {
                while let Some(o) = self.seeders.get_mut(&ring).and_then(Seeder::poll_output) {
                    moved = true;
                    match o {
                        SeedOutput::Send { to, msg } => {
                            if *to == *self.name {
                                self.local.push_back((to, msg));
                            } else {
                                self.send(gossip, now, &to, &AllocMsg::Paxos(msg));
                            }
                        }
                        SeedOutput::Chosen(seed) => {
                            tracing::info!(ring = %ring, owners = ?seed.owners, "cluster ring seeded");
                            self.install(&Self::cluster_key(&ring), &seed);
                        }
                        SeedOutput::Mismatch { from, theirs, ours } => {
                            self.warn_once(format!("mismatch/{from}/{theirs:?}"), || {
                                format!(
                                    "ring {ring}: {from} runs with acceptors {theirs:?}, this node with {ours:?}: \
                                     refused (give every agent the same --join list or --acceptors)"
                                )
                            });
                        }
                    }
                }
            }
            while let Some((from, msg)) = self.local.pop_front() {
                moved = true;
                if let Some(s) = self.seeders.get_mut(msg.ring()) {
                    s.handle(&from, &msg);
                }
            }
            if !moved {
                return any;
            }
            any = true;
        }
    }

    fn ring_output(&mut self, gossip: &mut GossipNode, now: Instant, key: &RingKey, o: RingOutput) {
        match o {
            RingOutput::Publish(entry) => {
                if key.0 != CLUSTER_NETWORK && !gossip.is_attached(&key.0) {
                    return;
                }
                let held = gossip.get_entry(&key.0, IPAM_TABLE, &entry.key());
                let skip = match &entry {
                    // Every node installs the seed; the table needs it once, not a write from each.
                    RingEntry::Seed(_) => held.as_deref().and_then(decode_entry).as_ref() == Some(&entry),
                    // A node that owns nothing and never wrote claims has nothing to say.
                    RingEntry::Claims(c) => c.runs.is_empty() && c.free_blocks == 0 && held.is_none(),
                    RingEntry::Removal(_) => false,
                };
                if skip {
                    return;
                }
                let value = Bytes::from(json(&entry));
                if let Err(e) = gossip.put_entry(now, &key.0, IPAM_TABLE, &entry.key(), value) {
                    tracing::debug!(network = %key.0, error = %e, "ring publication not written");
                }
            }
            RingOutput::Send { to, msg } => {
                if matches!(msg, RingMsg::Grant { .. }) {
                    self.stats.donations_given += 1;
                }
                if matches!(msg, RingMsg::Request { .. }) {
                    tracing::debug!(network = %key.0, ring = %key.1, to = %to, "asking for a share");
                }
                self.send_member(gossip, now, &to, &AllocMsg::Ring { network: key.0.clone(), msg });
            }
            RingOutput::Event(e) => match e {
                RingEvent::Owned { .. } => self.progress = true,
                RingEvent::Lost { blocks, to, allocated } => tracing::warn!(
                    network = %key.0, ring = %key.1, blocks, to = %to, allocated,
                    "blocks this node owned went to another node"
                ),
                RingEvent::Removed { by } => {
                    tracing::error!(
                        network = %key.0, ring = %key.1, by = %by,
                        "this node was removed from the ring: it allocates nothing more from it"
                    );
                    self.removed_from_ring(gossip, now, &by);
                }
                RingEvent::NoSpace { asked } => {
                    self.stats.no_space += 1;
                    self.progress = true;
                    self.last_no_space.insert(key.clone(), asked);
                }
            },
        }
    }

    fn send(&mut self, gossip: &mut GossipNode, now: Instant, to: &str, msg: &AllocMsg) {
        let mut data = MSG_MAGIC.to_vec();
        data.extend_from_slice(&json(msg));
        if let Err(e) = gossip.send_message(now, to, Bytes::from(data)) {
            tracing::debug!(to, error = %e, "allocator message not sent");
        }
    }

    /// Sends to a ring member `name@instance`, if that instance is the one membership knows.
    fn send_member(&mut self, gossip: &mut GossipNode, now: Instant, to: &Name, msg: &AllocMsg) {
        let name = member_name(to);
        let current = gossip.members().iter().any(|m| &*m.id.name == name && member_of(&m.id) == *to);
        if current {
            self.send(gossip, now, name, msg);
        }
    }

    // ----- persistence -----------------------------------------------------------------------

    /// Adds what changed to `ops` (keys of the durable store); returns what the batch covers,
    /// for [`Allocator::staged`].
    pub fn stage(&mut self, ops: &mut Vec<(String, Option<Vec<u8>>)>) -> Vec<Staged> {
        let mut covered = Vec::new();
        for (key, ring) in &mut self.rings {
            let Some(RingChanges { generation, meta, cursor, pages }) = ring.take_changes() else { continue };
            let prefix = format!("{IPAM_PREFIX}{}/{}/", key.0, key.1);
            if let Some(m) = meta {
                ops.push((format!("{prefix}meta"), Some(json(&m))));
            }
            if let Some(c) = cursor {
                ops.push((format!("{prefix}cursor"), Some(c.to_le_bytes().to_vec())));
            }
            for (p, words) in pages {
                let v = (!words.is_empty()).then(|| words_to_bytes(&words));
                ops.push((format!("{prefix}page/{p}"), v));
            }
            covered.push(Staged::Ring(key.clone(), generation));
        }
        for (ring, s) in &self.seeders {
            let g = s.generation();
            if s.is_dirty() && self.staged_seeder_gen.get(ring).is_none_or(|x| *x < g) {
                ops.push((format!("{PAXOS_PREFIX}{ring}"), Some(json(s.durable()))));
                self.staged_seeder_gen.insert(ring.clone(), g);
                covered.push(Staged::Seeder(ring.clone(), g));
            }
        }
        ops.append(&mut self.ops);
        covered
    }

    /// The batch `seq` carries `covered` (from [`Allocator::stage`]).
    pub fn staged(&mut self, seq: u64, covered: Vec<Staged>) {
        if !covered.is_empty() {
            self.staged.push_back((seq, covered));
        }
    }

    /// Every batch up to `seq` is durable: the rings and seeders release what waited for it.
    pub fn persisted(&mut self, seq: u64) {
        while self.staged.front().is_some_and(|(s, _)| *s <= seq) {
            let (_, covered) = self.staged.pop_front().expect("checked");
            for c in covered {
                match c {
                    Staged::Ring(key, g) => {
                        if let Some(r) = self.rings.get_mut(&key) {
                            r.persisted(g);
                        }
                    }
                    Staged::Seeder(ring, g) => {
                        if let Some(s) = self.seeders.get_mut(&ring) {
                            s.persisted(g);
                        }
                    }
                }
            }
        }
    }

    // ----- networks --------------------------------------------------------------------------

    fn cluster_ring_ready(&self, ring: &str, gossip: &GossipNode) -> Result<(), Pending> {
        let key = Self::cluster_key(ring);
        if let Some(p) = self.problems.get(&key) {
            return Err(Pending(p.clone()));
        }
        if self.rings.get(&key).is_some_and(Ring::is_seeded) {
            return Ok(());
        }
        let what = if ring == POOL_RING { "the default address pool" } else { "the VNI range" };
        let Some(acceptors) = &self.acceptors else {
            let why = self.acceptors_pending.clone().unwrap_or_else(|| "acceptors not known yet".into());
            return Err(Pending(format!("{what} is not seeded yet: {why}")));
        };
        let alive: BTreeSet<String> = gossip
            .members()
            .iter()
            .filter(|m| m.state == MemberState::Alive)
            .map(|m| m.id.name.to_string())
            .collect();
        let reachable = acceptors.iter().filter(|a| alive.contains(&***a) || ***a == *self.name).count();
        let needed = acceptors.len() / 2 + 1;
        Err(Pending(format!(
            "{what} is not seeded yet: {reachable} of {} acceptors reachable ({}), {needed} needed",
            acceptors.len(),
            acceptors.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ")
        )))
    }

    /// The subnet the pool's slot stands for.
    fn pool_subnet(&self, slot: u128) -> Option<Ipv4Net> {
        self.clone_pool_mapper()(slot)
    }

    /// Allocates what a new network needs from the cluster rings: a subnet from the default
    /// pool when none is given (avoiding `taken`, the subnets of known networks), and one VNI
    /// per IPv4 subnet. `Err(Ok(pending))` when it must wait (unseeded rings); nothing is kept
    /// on failure.
    pub fn allocate_network(
        &mut self,
        gossip: &GossipNode,
        now: Instant,
        subnets: &[IpNet],
        taken: &[IpNet],
        vxlan: bool,
        no_ipam: bool,
    ) -> Try<NetworkAlloc> {
        self.check_not_removed().map_err(Err)?;
        self.check_caught_up().map_err(Ok)?;
        let mut subnets = subnets.to_vec();
        let mut pool_slots = Vec::new();
        let from_pool = subnets.is_empty() && !no_ipam;
        if from_pool {
            self.cluster_ring_ready(POOL_RING, gossip).map_err(Ok)?;
        }
        let v4 = if from_pool { 1 } else { subnets.iter().filter(|n| matches!(n, IpNet::V4(_))).count() };
        if vxlan && v4 > 0 {
            self.cluster_ring_ready(weft_ipam::ring::VNI_RING, gossip).map_err(Ok)?;
        }
        // A ring whose share here is used up (a node outside the acceptor set starts with
        // none) asks an owner for a donation first.
        let pool_key = Self::cluster_key(POOL_RING);
        let vni_key = Self::cluster_key(weft_ipam::ring::VNI_RING);
        let mut waits = Vec::new();
        if from_pool && self.rings.get(&pool_key).is_some_and(|r| r.free_slots() == 0) {
            waits.push(pool_key.clone());
        }
        if vxlan && v4 > 0 && self.rings.get(&vni_key).is_some_and(|r| (r.free_slots() as usize) < v4) {
            waits.push(vni_key.clone());
        }
        if !waits.is_empty() {
            let mut why = Vec::new();
            for key in waits {
                self.ask_share(gossip, now, &key, u128::MAX);
                let what = if key.1 == POOL_RING { "the default address pool" } else { "the VNI range" };
                match self.rings.get(&key).and_then(Ring::requesting_from) {
                    Some(to) => why.push(format!("a share of {what} from {to}")),
                    None => {
                        let asked = self.last_no_space.get(&key).cloned().unwrap_or_default();
                        return Err(Err(AgentError::Exhausted(format!(
                            "nothing free in {what}: this node has no share left and no reachable owner has \
                             space (asked: {})",
                            if asked.is_empty() {
                                "nobody reachable".to_string()
                            } else {
                                asked.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ")
                            }
                        ))));
                    }
                }
            }
            return Err(Ok(Pending(why.join("; "))));
        }
        if from_pool {
            let me = self.clone_pool_mapper();
            let key = Self::cluster_key(POOL_RING);
            let ring = self.rings.get_mut(&key).expect("ready");
            let ok = |slot: u128| {
                me(slot).is_some_and(|n| {
                    !taken.iter().any(|t| t.contains(&IpNet::V4(n)) || IpNet::V4(n).contains(t))
                })
            };
            match ring.allocate_where(None, &ok) {
                Ok(slot) => {
                    pool_slots.push(slot);
                    subnets.push(IpNet::V4(me(slot).expect("checked")));
                    self.stats.allocations += 1;
                }
                Err(RingError::Exhausted { .. }) => {
                    let r = self.rings.get(&key).expect("ready");
                    return Err(Err(AgentError::Exhausted(format!(
                        "no free subnet in the default address pool: this node's share ({} subnets, {} of them \
                         held back after a release or an inheritance) is used up; node rm of departed nodes \
                         or a network rm frees some",
                        r.owned().iter().map(|(s, e)| e - s).sum::<u128>(),
                        r.quarantined()
                    ))));
                }
                Err(e) => {
                    return Err(Err(AgentError::Exhausted(format!("no subnet from the default pool: {e}"))));
                }
            }
        }
        let mut vnis = Vec::new();
        let key = Self::cluster_key(weft_ipam::ring::VNI_RING);
        for _ in subnets.iter().filter(|n| vxlan && matches!(n, IpNet::V4(_))) {
            let ring = self.rings.get_mut(&key).expect("ready");
            match ring.allocate(None) {
                Ok(slot) => {
                    vnis.push(Space::vni(slot).expect("a slot of the VNI space"));
                    self.stats.allocations += 1;
                }
                Err(e) => {
                    // Give back what this call took (it was never acknowledged).
                    self.release_cluster(&vnis, &pool_slots);
                    return Err(Err(AgentError::Exhausted(format!("no free VNI: {e}"))));
                }
            }
        }
        Ok(NetworkAlloc { subnets, vnis, pool_slots })
    }

    /// A function from pool slots to subnets, detached from `self` (for filters).
    /// The default pool as seeded (or as configured, before the seed).
    fn pool_as_seeded(&self) -> (Ipv4Net, u8) {
        self.rings
            .get(&Self::cluster_key(POOL_RING))
            .and_then(|r| r.state().seed.as_ref())
            .filter(|s| !s.params.is_empty())
            .and_then(|s| parse_pool(&s.params).ok())
            .unwrap_or((self.cfg.default_pool, self.cfg.pool_prefix))
    }

    /// The default-pool slot of a subnet, if it is one of the pool's.
    fn pool_slot(&self, net: &Ipv4Net) -> Option<u128> {
        let (base, prefix) = self.pool_as_seeded();
        if net.prefix_len() != prefix || !base.contains(&net.network()) {
            return None;
        }
        let off = u32::from(net.network()) - u32::from(base.network());
        Some(u128::from(off >> (32 - u32::from(prefix))))
    }

    /// Live users of inherited slots: every VNI and pool subnet of a live network definition,
    /// and every subnet's gateway, that fall in blocks this node inherited (while they are held
    /// back) are marked allocated: the removed node allocated them and they outlive it. A
    /// network whose VNIs or pool subnet came this way is this node's to release when deleted.
    pub(crate) fn adopt_inherited(&mut self, gossip: &GossipNode) {
        let (vni_key, pool_key) =
            (Self::cluster_key(weft_ipam::ring::VNI_RING), Self::cluster_key(POOL_RING));
        let cluster = [&vni_key, &pool_key].iter().any(|k| self.rings.get(*k).is_some_and(Ring::has_holds));
        let subnets: BTreeSet<RingKey> = self
            .rings
            .iter()
            .filter(|(k, r)| k.0 != CLUSTER_NETWORK && r.has_holds())
            .map(|(k, _)| k.clone())
            .collect();
        if !cluster && subnets.is_empty() {
            return;
        }
        let mut defs: Vec<NetworkDef> = Vec::new();
        gossip.walk(CLUSTER_NETWORK, crate::agent::NETWORKS_TABLE, |_, v, _| {
            if let Ok(d) = serde_json::from_slice::<NetworkDef>(v) {
                defs.push(d);
            }
            true
        });
        for d in &defs {
            let nets = v4_subnets(d);
            if cluster {
                let mut got = Owned::default();
                let vnis = d.options.get(VXLANID_OPTION).map(String::as_str).unwrap_or("");
                for v in vnis.split(',').filter_map(|v| v.trim().parse::<u32>().ok()) {
                    if let (Some(slot), Some(r)) = (Space::vni_slot(v), self.rings.get_mut(&vni_key))
                        && r.adopt(slot)
                    {
                        got.vnis.push(v);
                    }
                }
                for n in &nets {
                    if let Some(slot) = self.pool_slot(n)
                        && self.rings.get_mut(&pool_key).is_some_and(|r| r.adopt(slot))
                    {
                        got.pool_slots.push(slot);
                    }
                }
                if !got.vnis.is_empty() || !got.pool_slots.is_empty() {
                    tracing::info!(network = %d.id, vnis = ?got.vnis, "adopted what a removed node allocated for a live network");
                    let own = self.owned.entry(d.id.clone()).or_default();
                    own.vnis.extend(got.vnis);
                    own.pool_slots.extend(got.pool_slots);
                    let value = json(&*own);
                    self.ops.push((format!("{OWN_PREFIX}{}", d.id), Some(value)));
                }
            }
            for n in &nets {
                let key = (d.id.clone(), n.to_string());
                if !subnets.contains(&key) {
                    continue;
                }
                if let Some(gw) = gateway_of(d, n)
                    && let Some(slot) = offset_of(&IpNet::V4(*n), IpAddr::V4(gw))
                    && let Some(r) = self.rings.get_mut(&key)
                    && r.adopt(slot)
                {
                    tracing::info!(network = %d.id, gateway = %gw, "adopted the gateway from a removed node's block");
                }
            }
        }
    }

    fn clone_pool_mapper(&self) -> impl Fn(u128) -> Option<Ipv4Net> + use<> {
        let (base, prefix) = self.pool_as_seeded();
        move |slot| {
            let step = 1u64 << (32 - prefix);
            let addr = u64::from(u32::from(base.network())) + u64::try_from(slot).ok()? * step;
            Ipv4Net::new(Ipv4Addr::from(u32::try_from(addr).ok()?), prefix).ok()
        }
    }

    /// Records what a network created here holds of the cluster rings, and creates its subnet
    /// rings wholly owned by this node with each gateway allocated.
    pub fn network_created(
        &mut self,
        def: &NetworkDef,
        vnis: &[u32],
        pool_slots: &[u128],
    ) -> Result<(), AgentError> {
        let own = Owned { pool_slots: pool_slots.to_vec(), vnis: vnis.to_vec() };
        if !own.pool_slots.is_empty() || !own.vnis.is_empty() {
            self.ops.push((format!("{OWN_PREFIX}{}", def.id), Some(json(&own))));
            self.owned.insert(def.id.clone(), own);
        }
        for s in &def.subnets {
            let Ok(IpNet::V4(net)) = s.parse::<IpNet>() else { continue };
            let (space, reserved) = Space::subnet(net.to_string(), &IpNet::V4(net));
            let mut ring = Ring::created_by(self.me.clone(), space, reserved);
            ring.set_reuse_after(self.cfg.reuse_after.as_millis() as u64);
            let gw = gateway_of(def, &net);
            if let Some(gw) = gw
                && let Some(slot) = offset_of(&IpNet::V4(net), IpAddr::V4(gw))
            {
                ring.allocate(Some(slot)).map_err(|e| AgentError::BadGateway(format!("{gw}: {e}")))?;
            }
            self.rings.insert((def.id.clone(), net.to_string()), ring);
        }
        Ok(())
    }

    /// A network create failed after its allocation: what it took goes back (nothing of it
    /// was acknowledged) and nothing of it stays in memory or the store.
    pub fn abandon_network(&mut self, nid: &str, vnis: &[u32], pool_slots: &[u128]) {
        self.release_cluster(vnis, pool_slots);
        self.owned.remove(nid);
        self.ops.retain(|(k, _)| *k != format!("{OWN_PREFIX}{nid}"));
        self.rings.retain(|k, _| k.0 != nid);
    }

    /// Gives VNIs and default-pool subnets back to the cluster rings; how many were held.
    fn release_cluster(&mut self, vnis: &[u32], pool_slots: &[u128]) -> u64 {
        let mut released = 0;
        if let Some(r) = self.rings.get_mut(&Self::cluster_key(POOL_RING)) {
            released += pool_slots.iter().filter(|s| r.release(**s).is_ok()).count() as u64;
        }
        if let Some(r) = self.rings.get_mut(&Self::cluster_key(weft_ipam::ring::VNI_RING)) {
            released +=
                vnis.iter().filter_map(|v| Space::vni_slot(*v)).filter(|s| r.release(*s).is_ok()).count()
                    as u64;
        }
        released
    }

    /// The creator of a network sees its definition deleted: it releases the subnet and VNIs
    /// it allocated for it.
    fn definition_deleted(&mut self, nid: &str, seen_deleted: bool) {
        if seen_deleted && self.gone.insert(nid.to_string()) {
            self.ops.push((format!("{GONE_PREFIX}{nid}"), Some(Vec::new())));
        }
        let Some(own) = self.owned.remove(nid) else { return };
        self.ops.push((format!("{OWN_PREFIX}{nid}"), None));
        self.stats.releases += self.release_cluster(&own.vnis, &own.pool_slots);
        tracing::info!(network = %nid, vnis = ?own.vnis, "released the network's VNIs and pool subnet");
    }

    /// Networks created here whose definition is a tombstone, or gone, while this node is
    /// connected: released (a delete seen before a restart, or missed while down).
    pub fn reconcile(&mut self, deleted: &dyn Fn(&str) -> bool, absent: &dyn Fn(&str) -> bool) {
        let gone: Vec<String> = self.owned.keys().filter(|n| deleted(n)).cloned().collect();
        for nid in gone {
            self.definition_deleted(&nid, true);
        }
        // Absent without a trace: released, but not remembered as removed (the cluster may only
        // have lost the definition; if it comes back it is not deleted again).
        let absent: Vec<String> = self.owned.keys().filter(|n| absent(n)).cloned().collect();
        for nid in absent {
            self.definition_deleted(&nid, false);
        }
    }

    fn check_caught_up(&self) -> Result<(), Pending> {
        if self.catching_up {
            return Err(Pending(
                "this node restarted and has not synced the cluster's tables yet (a removal of it, or blocks \
                 it lost, would be learned there); it allocates once a seed answers"
                    .into(),
            ));
        }
        Ok(())
    }

    /// No other member is up, and none is expected: started with no seed but itself.
    pub(crate) fn alone(&self, gossip: &GossipNode) -> bool {
        self.seeds_known
            && self.seeds.iter().all(|s| *s == self.addr)
            && !gossip.members().iter().any(|m| m.id.name != self.name && m.state == MemberState::Alive)
    }

    /// This life knows what the cluster holds: it synced the cluster's tables, or it is alone by
    /// design (no seed but itself) and has been up a moment.
    pub(crate) fn caught_up(&self, gossip: &GossipNode, now: Instant) -> bool {
        gossip.has_synced(CLUSTER_NETWORK) || (self.alone(gossip) && self.ms(now) >= CATCH_UP_ALONE_MS)
    }

    /// Whether this node saw the network with this id removed.
    pub fn is_gone(&self, nid: &str) -> bool {
        self.gone.contains(nid)
    }

    /// Networks this node created (it holds what they took from the cluster rings).
    pub fn created_networks(&self) -> impl Iterator<Item = &str> {
        self.owned.keys().map(String::as_str)
    }

    /// This node attaches to a network: it makes the network's subnet rings (learning their
    /// state from the network's table) and asks for a share where it has none.
    pub fn network_attached(&mut self, gossip: &mut GossipNode, now: Instant, def: &NetworkDef) {
        for s in &def.subnets {
            let Ok(IpNet::V4(net)) = s.parse::<IpNet>() else { continue };
            let key = (def.id.clone(), net.to_string());
            if !self.rings.contains_key(&key) {
                let (space, reserved) = Space::subnet(net.to_string(), &IpNet::V4(net));
                let mut ring = Ring::new(self.me.clone(), space, reserved);
                ring.set_reuse_after(self.cfg.reuse_after.as_millis() as u64);
                self.rings.insert(key.clone(), ring);
                self.replay_table(gossip, &def.id, &key.1);
            }
            self.ask_share(gossip, now, &key, LOW_WATER);
        }
    }

    /// Asks for a share of a ring if this node has fewer than `low` free slots there.
    fn ask_share(&mut self, gossip: &GossipNode, now: Instant, key: &RingKey, low: u128) {
        let alive = Self::alive_members(gossip);
        let now_ms = self.ms(now);
        if self.removed.is_some() {
            return;
        }
        let Some(r) = self.rings.get_mut(key) else { return };
        if !r.is_seeded()
            || r.removed_by().is_some()
            || r.requesting_from().is_some()
            || r.free_slots() >= low
        {
            return;
        }
        match r.request_space(now_ms, &|m| alive.contains(m)) {
            Ok(()) => {
                if r.requesting_from().is_some() {
                    self.stats.donations_asked += 1;
                }
                self.last_refill.insert(key.clone(), now_ms);
            }
            Err(e) => tracing::debug!(network = %key.0, error = %e, "no share to ask for"),
        }
    }

    /// The network is gone (removed cluster-wide, or this node detached from a removed one):
    /// its subnet rings and local endpoints go, from memory and from the store.
    /// `stored`: every key the store holds (or is about to) under [`Allocator::network_prefixes`].
    pub fn network_removed(&mut self, nid: &str, stored: Vec<String>) {
        self.rings.retain(|k, _| k.0 != nid);
        self.endpoints.retain(|k, _| k.0 != nid);
        self.inherit_checked.retain(|k, _| k.0 != nid);
        // Changes staged later for what was just dropped must not bring keys back.
        let prefixes = Self::network_prefixes(nid);
        self.ops.retain(|(k, _)| !prefixes.iter().any(|p| k.starts_with(p.as_str())));
        self.ops.extend(stored.into_iter().map(|k| (k, None)));
    }

    /// The store prefixes of a network's rings and endpoint records.
    pub fn network_prefixes(nid: &str) -> [String; 2] {
        [format!("{IPAM_PREFIX}{nid}/"), format!("{EP_PREFIX}{nid}/")]
    }

    /// Every local endpoint.
    pub fn all_endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.endpoints.values()
    }

    /// A restarted node that has not caught up with the cluster yet (it publishes and
    /// allocates nothing meanwhile).
    pub fn is_catching_up(&self) -> bool {
        self.catching_up
    }

    /// Local endpoints in a network.
    pub fn local_endpoints(&self, nid: &str) -> Vec<&Endpoint> {
        self.endpoints
            .range((nid.to_string(), String::new())..)
            .take_while(|(k, _)| k.0 == nid)
            .map(|(_, e)| e)
            .collect()
    }

    // ----- endpoints -------------------------------------------------------------------------

    /// Allocates an endpoint's address in `def` (attached) and publishes it. `Err(Ok(_))`: it
    /// must wait (a share is being asked for); nothing is kept then.
    #[allow(clippy::too_many_arguments)]
    pub fn create_endpoint(
        &mut self,
        gossip: &mut GossipNode,
        now: Instant,
        def: &NetworkDef,
        name: &str,
        ip: Option<IpAddr>,
        mac: Option<&str>,
        id: String,
        sandbox: Option<String>,
        publish: bool,
    ) -> Try<Endpoint> {
        self.check_not_removed().map_err(Err)?;
        self.check_caught_up().map_err(Ok)?;
        let nets = v4_subnets(def);
        if nets.is_empty() {
            return Err(Err(AgentError::NoAddress(format!("network {:?} has no IPv4 subnet", def.name))));
        }
        if self.local_endpoints(&def.id).len() >= MAX_ENDPOINTS {
            return Err(Err(AgentError::NoAddress(format!(
                "network {:?}: this node holds {MAX_ENDPOINTS} endpoints already",
                def.name
            ))));
        }
        let mac = match mac {
            Some(m) => Some(parse_mac(m).map_err(|e| Err(AgentError::BadName(e)))?),
            None => None,
        };
        let now_ms = self.ms(now);
        let (net, slot) = match ip {
            Some(IpAddr::V4(ip)) => {
                let Some(&net) = nets.iter().find(|n| n.contains(&ip)) else {
                    return Err(Err(AgentError::NoAddress(format!(
                        "{ip} is not in any subnet of network {:?} ({})",
                        def.name,
                        def.subnets.join(", ")
                    ))));
                };
                let key = (def.id.clone(), net.to_string());
                let Some(r) = self.rings.get_mut(&key) else {
                    return Err(Ok(Pending(format!("the state of subnet {net} to arrive from its creator"))));
                };
                r.advance(now_ms);
                let slot = offset_of(&IpNet::V4(net), IpAddr::V4(ip)).expect("inside");
                match r.allocate(Some(slot)) {
                    Ok(s) => (net, s),
                    Err(RingError::NotSeeded { .. }) => {
                        return Err(Ok(Pending(format!(
                            "the state of subnet {net} to arrive from its creator"
                        ))));
                    }
                    Err(RingError::NotOwned { .. }) => {
                        let b = r.space().block_of(slot);
                        let owner = r.state().owner_of(b).map_or("nobody".to_string(), |o| o.to_string());
                        return Err(Err(AgentError::NoAddress(format!(
                            "{ip} is in a block node {owner} owns, not this node: create the endpoint there, or \
                             let weft pick an address here"
                        ))));
                    }
                    Err(e) => return Err(Err(AgentError::NoAddress(format!("{ip}: {e}")))),
                }
            }
            Some(IpAddr::V6(ip)) => {
                return Err(Err(AgentError::NoAddress(format!("{ip}: only IPv4 endpoint addresses so far"))));
            }
            None => {
                let mut found = None;
                let mut waiting = Vec::new();
                for &net in &nets {
                    let key = (def.id.clone(), net.to_string());
                    let Some(r) = self.rings.get_mut(&key) else { continue };
                    r.advance(now_ms);
                    match r.allocate(None) {
                        Ok(s) => {
                            found = Some((net, s));
                            break;
                        }
                        Err(RingError::Removed { by, .. }) => {
                            return Err(Err(AgentError::NoAddress(format!(
                                "this node was removed from subnet {net} by {by}: it allocates nothing more there"
                            ))));
                        }
                        Err(e) => {
                            tracing::debug!(network = %key.0, ring = %key.1, error = %e, "no address from this share");
                            waiting.push(key)
                        }
                    }
                }
                match found {
                    Some(f) => f,
                    None => {
                        // No share with space: ask (once) and wait, unless nobody has space.
                        let mut why = Vec::new();
                        for key in waiting {
                            self.ask_share(gossip, now, &key, LOW_WATER);
                            let r = self.rings.get(&key).expect("listed");
                            if let Some(p) = self.problems.get(&key) {
                                why.push(p.clone());
                            } else if !r.is_seeded() {
                                why.push(format!("the state of subnet {} to arrive from its creator", key.1));
                            } else if let Some(to) = r.requesting_from() {
                                why.push(format!("a share of subnet {} from {to}", key.1));
                            } else {
                                let asked = self.last_no_space.get(&key).cloned().unwrap_or_default();
                                return Err(Err(AgentError::NoAddress(format!(
                                    "network {:?} has no free address this node can get: no reachable owner has \
                                     space in subnet {} (asked: {})",
                                    def.name,
                                    key.1,
                                    if asked.is_empty() {
                                        "nobody reachable".to_string()
                                    } else {
                                        asked.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ")
                                    }
                                ))));
                            }
                        }
                        return Err(Ok(Pending(why.join("; "))));
                    }
                }
            }
        };
        self.stats.allocations += 1;
        let addr = addr_at(&IpNet::V4(net), slot);
        let IpAddr::V4(v4) = addr else { unreachable!("an IPv4 subnet") };
        let mac = mac.unwrap_or_else(|| weft_overlay::Mac::from_ipv4(v4).to_string());
        let ep = Endpoint {
            id,
            name: name.to_string(),
            network: def.name.clone(),
            network_id: def.id.clone(),
            node: self.name.to_string(),
            instance: member_name_instance(&self.me).to_string(),
            ipv4: format!("{v4}/{}", net.prefix_len()),
            mac,
            gateway: gateway_of(def, &net).map(|g| g.to_string()),
            sandbox,
        };
        if publish && let Err(e) = self.publish_endpoint(gossip, now, &ep) {
            let _ = self.rings.get_mut(&(def.id.clone(), net.to_string())).map(|r| r.release(slot));
            return Err(Err(e));
        }
        self.ops.push((format!("{EP_PREFIX}{}/{}", def.id, ep.id), Some(json(&ep))));
        self.endpoints.insert((def.id.clone(), ep.id.clone()), ep.clone());
        Ok(ep)
    }

    /// Publishes a local endpoint's entry in its network's `endpoint_table`.
    pub fn publish_endpoint(
        &self,
        gossip: &mut GossipNode,
        now: Instant,
        ep: &Endpoint,
    ) -> Result<(), AgentError> {
        gossip.put_entry(now, &ep.network_id, ENDPOINT_TABLE, &ep.id, Bytes::from(json(ep)))?;
        Ok(())
    }

    /// Removes a local endpoint: its entry, its record, and its address (held back for
    /// `reuse_after`).
    pub fn remove_endpoint(
        &mut self,
        gossip: &mut GossipNode,
        now: Instant,
        ep: &Endpoint,
    ) -> Result<(), AgentError> {
        let key = (ep.network_id.clone(), ep.id.clone());
        if !self.endpoints.contains_key(&key) {
            return Err(AgentError::NotLocal(format!(
                "endpoint {} is on node {}: remove it there",
                ep.name, ep.node
            )));
        }
        if gossip.is_attached(&ep.network_id) {
            match gossip.delete_entry(now, &ep.network_id, ENDPOINT_TABLE, &ep.id) {
                Ok(()) | Err(weft_gossip::Error::EntryNotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.endpoints.remove(&key);
        self.ops.push((format!("{EP_PREFIX}{}/{}", ep.network_id, ep.id), None));
        if let Ok(IpNet::V4(net)) = ep.ipv4.parse::<IpNet>() {
            let subnet = net.trunc();
            let ring_key = (ep.network_id.clone(), subnet.to_string());
            let now_ms = self.ms(now);
            if let Some(r) = self.rings.get_mut(&ring_key)
                && let Some(slot) = offset_of(&IpNet::V4(subnet), IpAddr::V4(net.addr()))
            {
                r.advance(now_ms);
                if r.release(slot).is_ok() {
                    self.stats.releases += 1;
                }
            }
        }
        Ok(())
    }

    // ----- reads -----------------------------------------------------------------------------

    pub fn report(&self) -> AllocReport {
        let rings = self
            .rings
            .iter()
            .map(|(key, r)| {
                let show = |s: u128, e: u128| -> String { self.show_range(key, s, e) };
                RingReport {
                    network: key.0.clone(),
                    ring: key.1.clone(),
                    seeded: r.is_seeded(),
                    seed_owners: r
                        .state()
                        .seed
                        .as_ref()
                        .map(|s| s.owners.iter().map(|o| o.to_string()).collect())
                        .unwrap_or_default(),
                    owned: r.owned().iter().map(|&(s, e)| show(s, e)).collect(),
                    owned_blocks: r.owned_blocks(),
                    free_slots: r.free_slots(),
                    allocated: r.allocated_count(),
                    quarantined: r.quarantined(),
                    requesting_from: r.requesting_from().map(|n| n.to_string()),
                    last_no_space: self
                        .last_no_space
                        .get(key)
                        .map(|v| v.iter().map(|n| n.to_string()).collect())
                        .unwrap_or_default(),
                    conflicts: r.conflict_count() as usize,
                    problem: self
                        .problems
                        .get(key)
                        .cloned()
                        .or_else(|| r.removed_by().map(|b| format!("removed from this ring by {b}"))),
                    fenced: r.fenced_from().iter().map(|f| f.to_string()).collect(),
                }
            })
            .collect();
        AllocReport {
            member: self.me.to_string(),
            acceptors: self.acceptors.as_ref().map(|a| a.iter().map(|x| x.to_string()).collect()),
            acceptors_pending: self.acceptors_pending.clone(),
            learner_only: self.seeders.values().any(Seeder::is_learner_only),
            rings,
            stats: self.stats.clone(),
            removed_by: self.removed.clone(),
        }
    }

    /// A slot range in the ring's own terms.
    fn show_range(&self, key: &RingKey, s: u128, e: u128) -> String {
        if key.0 == CLUSTER_NETWORK && key.1 == weft_ipam::ring::VNI_RING {
            let (a, b) = (Space::vni(s).unwrap_or(0), Space::vni(e - 1).unwrap_or(0));
            return format!("vni {a}-{b}");
        }
        if key.0 == CLUSTER_NETWORK && key.1 == POOL_RING {
            let a = self.pool_subnet(s).map(|n| n.to_string()).unwrap_or_default();
            let b = self.pool_subnet(e - 1).map(|n| n.to_string()).unwrap_or_default();
            return format!("{a} .. {b} ({} subnets)", e - s);
        }
        match key.1.parse::<IpNet>() {
            Ok(net) => format!("{}-{} ({} addresses)", addr_at(&net, s), addr_at(&net, e - 1), e - s),
            Err(_) => format!("{s}-{}", e - 1),
        }
    }
}

/// The instance part of `name@instance`.
fn member_name_instance(m: &str) -> &str {
    m.split_once('@').map_or("", |(_, i)| i)
}

/// A network's IPv4 subnets (each is a ring).
pub(crate) fn v4_subnets(def: &NetworkDef) -> Vec<Ipv4Net> {
    def.subnets
        .iter()
        .filter_map(|s| match s.parse::<IpNet>() {
            Ok(IpNet::V4(n)) => Some(n),
            _ => None,
        })
        .collect()
}

/// The gateway of subnet `i` of a network: `--gateway` when it lies in that subnet, else the
/// lowest usable address.
pub fn gateway_of(def: &NetworkDef, net: &Ipv4Net) -> Option<Ipv4Addr> {
    if let Some(gw) = def.gateway.as_deref().and_then(|g| g.parse::<Ipv4Addr>().ok())
        && net.contains(&gw)
    {
        return Some(gw);
    }
    if net.prefix_len() >= 31 {
        return None;
    }
    Some(Ipv4Addr::from(u32::from(net.network()) + 1))
}

/// A MAC address `aa:bb:cc:dd:ee:ff`, unicast.
pub fn parse_mac(s: &str) -> Result<String, String> {
    match s.parse::<weft_overlay::Mac>() {
        Ok(m) if m.is_unicast() => Ok(m.to_string()),
        Ok(_) => Err(format!("MAC {s}: a multicast address cannot be an endpoint's")),
        Err(_) => Err(format!("MAC {s}: expected six hex bytes like 02:42:0a:00:01:05")),
    }
}

/// Per node, what it owns of a ring as the replicated claims say (for `network inspect
/// --verbose`): (owner, ranges of slots, blocks, advertised free blocks).
pub fn shares(entries: &[RingEntry], ring: &str) -> Vec<OwnerShare> {
    let mut state = weft_ipam::RingState::default();
    let mut adverts: BTreeMap<String, u64> = BTreeMap::new();
    for e in entries.iter().filter(|e| e.ring() == ring) {
        match e {
            RingEntry::Seed(s) => {
                state.seed = Some(s.clone());
                state.blocks = state.blocks.join(&s.runs());
            }
            RingEntry::Claims(c) => {
                adverts.insert(c.writer.to_string(), c.free_blocks);
                state.blocks = state.blocks.join(&weft_ipam::ring::Runs::from_runs(c.runs.iter().cloned()));
            }
            RingEntry::Removal(r) => {
                let v = (r.generation, r.heir.clone());
                let cur = state.removed.entry(r.node.clone()).or_insert_with(|| v.clone());
                if v > *cur {
                    *cur = v;
                }
            }
        }
    }
    let Some(seed) = &state.seed else { return Vec::new() };
    let bs = seed.space.block_size;
    let size = seed.space.size;
    let mut by: BTreeMap<String, (Vec<(u128, u128)>, u64)> = BTreeMap::new();
    for (s, e, o) in state.ownership() {
        let entry = by.entry(o.to_string()).or_default();
        entry.0.push((u128::from(s) * bs, (u128::from(e) * bs).min(size)));
        entry.1 += u64::from(e - s);
    }
    by.into_iter()
        .map(|(owner, (ranges, blocks))| {
            let free_blocks = adverts.get(&owner).copied();
            OwnerShare { owner, ranges, blocks, free_blocks }
        })
        .collect()
}

/// Decodes ring entries for `dump --verbose`.
#[derive(Debug)]
pub struct RingEntries;

impl weft_gossip::TableWatcher for RingEntries {
    fn decode_table_entry(&self, _: &str, key: &str, value: &[u8]) -> (String, BTreeMap<String, String>) {
        let mut m = BTreeMap::new();
        match decode_entry(value) {
            Some(RingEntry::Seed(s)) => {
                m.insert("kind".into(), "seed".into());
                m.insert(
                    "owners".into(),
                    s.owners.iter().map(|o| o.to_string()).collect::<Vec<_>>().join(","),
                );
                m.insert("seeded by".into(), s.seeded_by.to_string());
                m.insert("slots".into(), s.space.size.to_string());
                if !s.params.is_empty() {
                    m.insert("params".into(), s.params);
                }
            }
            Some(RingEntry::Claims(c)) => {
                m.insert("kind".into(), "claims".into());
                m.insert("writer".into(), c.writer.to_string());
                m.insert("runs".into(), c.runs.len().to_string());
                m.insert("free blocks".into(), c.free_blocks.to_string());
            }
            Some(RingEntry::Removal(r)) => {
                m.insert("kind".into(), "removal".into());
                m.insert("removed".into(), r.node.to_string());
                m.insert("heir".into(), r.heir.to_string());
            }
            None => {}
        }
        (key.to_string(), m)
    }
}

/// Decodes endpoints for `dump --verbose`.
#[derive(Debug)]
pub struct Endpoints;

impl weft_gossip::TableWatcher for Endpoints {
    fn decode_table_entry(&self, _: &str, key: &str, value: &[u8]) -> (String, BTreeMap<String, String>) {
        let mut m = BTreeMap::new();
        if let Ok(e) = serde_json::from_slice::<Endpoint>(value) {
            m.insert("name".into(), e.name);
            m.insert("ipv4".into(), e.ipv4);
            m.insert("mac".into(), e.mac);
            m.insert("node".into(), e.node);
        }
        (key.to_string(), m)
    }
}

#[cfg(test)]
mod tests {
    use super::parse_mac;

    #[test]
    fn an_endpoint_mac_is_unicast_and_shown_in_lower_case_colon_form() {
        assert_eq!(parse_mac("02:42:0A:00:00:05").as_deref(), Ok("02:42:0a:00:00:05"));
        assert_eq!(
            parse_mac("01:00:5e:00:00:01"),
            Err("MAC 01:00:5e:00:00:01: a multicast address cannot be an endpoint's".into())
        );
        assert_eq!(
            parse_mac("02:42:0a:00:05"),
            Err("MAC 02:42:0a:00:05: expected six hex bytes like 02:42:0a:00:01:05".into())
        );
    }
}

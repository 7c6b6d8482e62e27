//! The ring: one pool (an address range, or the VNI range), many owners.
//!
//! The space is cut into at most [`MAX_BLOCKS`] equal blocks (a power of two each). Every block
//! carries a [`Record`] naming its owner; only the owner writes a block's next record (to give
//! it away), and rings merge block by block, highest record wins, so merging is commutative,
//! associative and idempotent and a block never has two owners. A node allocates only inside
//! blocks it owns, so allocation is local and needs no round trip.
//!
//! What travels: [`RingEntry`] values, meant for a gossip *cluster* table with
//! [`RingEntry::compare`] as its merge rule: the seed (`<ring>/seed`), one entry per writer
//! holding the records it wrote that still win (`<ring>/claims/<node>`), and removal records
//! (`<ring>/removed/<node>`). Donations use [`RingMsg`] point to point.
//!
//! Persist before use: every change bumps the ring's generation. Outputs that let others rely
//! on a change (publications, donation grants) are held until the caller has written
//! [`Ring::durable`] to disk and called [`Ring::persisted`] with the generation it wrote; an
//! allocated slot must likewise be handed out only after that. A crash before then loses
//! nothing anyone saw.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use ipnet::IpNet;

use crate::bitmap::{Bitmap, PAGE_SLOTS};
use crate::net::{net_size, reserved_offsets};
use crate::outbox::Outbox;
pub use crate::runs::{Name, Record, Run, Runs};

/// Most blocks a ring is cut into.
pub const MAX_BLOCKS: u128 = 1 << 16;
/// Versions and epochs at or above these are refused from the network (nothing honest gets
/// near them), so the arithmetic on them never overflows.
pub const MAX_VERSION: u64 = 1 << 62;
pub const MAX_EPOCH: u32 = 1 << 30;
/// Requesters whose last donation a donor remembers (to answer duplicates without giving
/// twice); beyond it the one served longest ago is forgotten, and a late duplicate from it
/// gets a second, harmless donation.
pub const MAX_SERVED: usize = 1024;
/// How long a donation request waits for its answer before the next owner is asked.
pub const REQUEST_TIMEOUT_MS: u64 = 2_000;

/// The first VNI the VNI ring hands out (lower ones stay VLAN-compatible, as in Docker).
pub const VNI_FIRST: u32 = 4096;
/// The last VNI (24 bits).
pub const VNI_LAST: u32 = (1 << 24) - 1;
/// The VNI ring's name.
pub const VNI_RING: &str = "vni";

/// A ring's space: slots `0..size` (the caller maps them to addresses or VNIs) in blocks.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Space {
    pub ring: String,
    pub size: u128,
    pub block_size: u128,
}

impl Space {
    /// `size` slots in the fewest power-of-two blocks that keep their count at most
    /// [`MAX_BLOCKS`].
    pub fn new(ring: impl Into<String>, size: u128) -> Result<Space, RingError> {
        let ring = ring.into();
        if size == 0 {
            return Err(RingError::EmptySpace(ring));
        }
        let block_size = size.div_ceil(MAX_BLOCKS).next_power_of_two();
        Ok(Space { ring, size, block_size })
    }

    /// The cluster's VNI space, `VNI_FIRST..=VNI_LAST`: slot `i` is VNI `VNI_FIRST + i`.
    pub fn vnis() -> Space {
        Space::new(VNI_RING, u128::from(VNI_LAST - VNI_FIRST + 1)).expect("not empty")
    }

    /// The VNI of a slot of [`Space::vnis`].
    pub fn vni(slot: u128) -> Option<u32> {
        u32::try_from(slot).ok().and_then(|s| s.checked_add(VNI_FIRST)).filter(|v| *v <= VNI_LAST)
    }

    /// The slot of a VNI in [`Space::vnis`].
    pub fn vni_slot(vni: u32) -> Option<u128> {
        (VNI_FIRST..=VNI_LAST).contains(&vni).then(|| u128::from(vni - VNI_FIRST))
    }

    /// A subnet's space (slot `i` is the subnet's `i`-th address, see [`crate::net::addr_at`])
    /// and the slots never handed out in it (network, broadcast, anycast).
    pub fn subnet(ring: impl Into<String>, net: &IpNet) -> (Space, Vec<u128>) {
        let space = Space::new(ring, net_size(net)).expect("a subnet is never empty");
        (space, reserved_offsets(net))
    }

    pub fn blocks(&self) -> u32 {
        self.size.div_ceil(self.block_size) as u32
    }

    /// Slots of block `b`.
    pub fn slots(&self, b: u32) -> (u128, u128) {
        let s = u128::from(b) * self.block_size;
        (s, s.saturating_add(self.block_size).min(self.size))
    }

    pub fn block_of(&self, slot: u128) -> u32 {
        (slot / self.block_size) as u32
    }
}

/// The node name of a ring member `name@instance` (a bare name is its own).
pub fn member_name(member: &str) -> &str {
    member.split_once('@').map_or(member, |(n, _)| n)
}

/// Whether a seed's owners can have come out of Paxos among `acceptors`: distinct acceptors
/// (by name; owners carry `name@instance`), at least a majority of the set.
pub fn seed_fits(acceptors: &[Name], owners: &[Name]) -> bool {
    let mut names: Vec<&str> = owners.iter().map(|o| member_name(o)).collect();
    names.sort_unstable();
    let n = names.len();
    names.dedup();
    n == names.len() && n > acceptors.len() / 2 && names.iter().all(|x| acceptors.iter().any(|a| &**a == *x))
}

/// The value seeding chooses: the space, split evenly among `owners` in their order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Seed {
    pub space: Space,
    pub owners: Vec<Name>,
    /// Who proposed it (informational; it makes concurrent proposals distinct).
    pub seeded_by: Name,
    /// What the slots mean, chosen with the seed and fixed by it (the default pool's
    /// `10.0.0.0/8` cut into `/24`s): a node configured otherwise later follows the seed.
    #[serde(default)]
    pub params: String,
}

impl Seed {
    /// The seed's records: owner `i` gets blocks `i*n/k..(i+1)*n/k`, version 0 of epoch 0.
    pub fn runs(&self) -> Runs {
        let n = u64::from(self.space.blocks());
        let k = self.owners.len() as u64;
        let mut runs = Vec::new();
        for (i, o) in self.owners.iter().enumerate() {
            let (s, e) = ((i as u64 * n / k) as u32, ((i as u64 + 1) * n / k) as u32);
            let rec =
                Record { epoch: 0, lineage: "".into(), version: 0, writer: "".into(), owner: o.clone() };
            runs.push(Run { start: s, end: e, rec });
        }
        Runs::from_runs(runs)
    }
}

/// The replicated state of a ring: a join-semilattice.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingState {
    pub seed: Option<Seed>,
    pub blocks: Runs,
    /// Removed node -> (generation, heir). Grows only; of two removals of one node the later
    /// generation wins, then the higher heir name: an operator can always remove again.
    pub removed: BTreeMap<Name, (u64, Name)>,
}

impl RingState {
    /// The join of two states (what every node converges to, whatever the order).
    pub fn join(&self, other: &RingState) -> RingState {
        let mut removed = self.removed.clone();
        for (n, r) in &other.removed {
            let e = removed.entry(n.clone()).or_insert_with(|| r.clone());
            if r > e {
                *e = r.clone();
            }
        }
        RingState {
            seed: self.seed.clone().max(other.seed.clone()),
            blocks: self.blocks.join(&other.blocks),
            removed,
        }
    }

    /// The effective owner of blocks recorded for `owner`: its heir if it was removed
    /// (transitively); none if removals form a cycle (both sides of a partition removed each
    /// other: nobody allocates there until an operator removes again).
    pub fn resolve(&self, owner: &Name) -> Option<Name> {
        let mut cur = owner.clone();
        for _ in 0..=self.removed.len() {
            match self.removed.get(&cur) {
                None => return Some(cur),
                Some((_, h)) => cur = h.clone(),
            }
        }
        None
    }

    /// The effective owner of block `b`.
    pub fn owner_of(&self, b: u32) -> Option<Name> {
        self.blocks.get(b).and_then(|r| self.resolve(&r.owner))
    }

    /// Maximal runs of blocks with one effective owner.
    pub fn ownership(&self) -> Vec<(u32, u32, Name)> {
        let mut out: Vec<(u32, u32, Name)> = Vec::new();
        for r in self.blocks.iter() {
            let Some(o) = self.resolve(&r.rec.owner) else { continue };
            match out.last_mut() {
                Some(last) if last.1 == r.start && last.2 == o => last.1 = r.end,
                _ => out.push((r.start, r.end, o)),
            }
        }
        out
    }
}

/// One gossip entry of a ring.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RingEntry {
    Seed(Seed),
    Claims(Claims),
    Removal(Removal),
}

/// The records `writer` wrote that still win in its view, and its free space.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Claims {
    pub ring: String,
    pub writer: Name,
    /// Grows with every publication by `writer` (persisted), so the latest one wins.
    pub seq: u64,
    pub runs: Vec<Run>,
    /// Blocks `writer` owns with nothing allocated in them: what it could donate.
    pub free_blocks: u64,
}

/// `node` was removed from the ring; its blocks go to `heir`. A later `generation` (then the
/// higher heir) wins.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Removal {
    pub ring: String,
    pub node: Name,
    pub generation: u64,
    pub heir: Name,
}

impl RingEntry {
    pub fn ring(&self) -> &str {
        match self {
            RingEntry::Seed(s) => &s.space.ring,
            RingEntry::Claims(c) => &c.ring,
            RingEntry::Removal(r) => &r.ring,
        }
    }

    /// The gossip key: one per seed, per writer and per removed node.
    pub fn key(&self) -> String {
        match self {
            RingEntry::Seed(s) => format!("{}/seed", s.space.ring),
            RingEntry::Claims(c) => format!("{}/claims/{}", c.ring, c.writer),
            RingEntry::Removal(r) => format!("{}/removed/{}", r.ring, r.node),
        }
    }

    /// The merge rule for two versions of one key: a total order, `Greater` when `self` wins.
    /// A writer's later claims win; of two removal records the higher heir; seeds (one value
    /// by Paxos) by value.
    pub fn compare(&self, other: &RingEntry) -> Ordering {
        match (self, other) {
            (RingEntry::Seed(a), RingEntry::Seed(b)) => a.cmp(b),
            (RingEntry::Claims(a), RingEntry::Claims(b)) => a.cmp(b),
            (RingEntry::Removal(a), RingEntry::Removal(b)) => a.cmp(b),
            _ => self.rank().cmp(&other.rank()),
        }
    }

    fn rank(&self) -> u8 {
        match self {
            RingEntry::Seed(_) => 0,
            RingEntry::Claims(_) => 1,
            RingEntry::Removal(_) => 2,
        }
    }
}

/// Donation messages, sent point to point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RingMsg {
    /// "Give me some of your free blocks" (`want` at most).
    Request { ring: String, id: u64, want: u32 },
    /// The donated blocks' new records (also gossiped in the donor's claims).
    Grant { ring: String, id: u64, runs: Vec<Run> },
    /// Nothing to give.
    Refuse { ring: String, id: u64 },
}

impl RingMsg {
    pub fn ring(&self) -> &str {
        match self {
            RingMsg::Request { ring, .. } | RingMsg::Grant { ring, .. } | RingMsg::Refuse { ring, .. } => {
                ring
            }
        }
    }
}

/// What the ring tells its caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Publish(RingEntry),
    Send { to: Name, msg: RingMsg },
    Event(RingEvent),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RingEvent {
    /// This node's owned blocks changed (a seed, a donation either way, a takeover).
    Owned { blocks: u64, free_slots: u128 },
    /// Blocks this node owned went to another node's newer epoch (a removal of this node, or a
    /// concurrent takeover that won); `allocated` of its allocations are in them.
    Lost { blocks: u64, to: Name, allocated: u128 },
    /// This node was removed from the ring by `by`; it allocates nothing more from it.
    Removed { by: Name },
    /// No owner with free space answered: `asked` were tried.
    NoSpace { asked: Vec<Name> },
}

/// Ring errors: each a clear line the agent can log.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RingError {
    #[error("ring {0}: an empty space cannot be a ring")]
    EmptySpace(String),
    #[error("ring {ring}: not seeded yet")]
    NotSeeded { ring: String },
    #[error("ring {ring}: seed for a different space ({theirs:?}, this node has {ours:?})")]
    SeedMismatch { ring: String, theirs: Box<Space>, ours: Box<Space> },
    #[error("ring {ring}: a different seed is already installed (from {theirs}, this node has {ours})")]
    SeedConflict { ring: String, theirs: Name, ours: Name },
    #[error("ring {ring}: seed split among {theirs:?}, but this node's acceptor set is {ours:?}; refused")]
    SeedOwners { ring: String, theirs: Vec<Name>, ours: Vec<Name> },
    #[error(
        "ring {ring}: slot {slot} is in a block inherited from a removed node, held back (its containers may \
         still use it)"
    )]
    Held { ring: String, slot: u128 },
    #[error("ring {ring}: this node was removed by {by}; it allocates nothing more")]
    Removed { ring: String, by: Name },
    #[error("ring {ring}: no free slot in the {owned} blocks this node owns")]
    Exhausted { ring: String, owned: u64 },
    #[error("ring {ring}: slot {slot} is not in a block this node owns")]
    NotOwned { ring: String, slot: u128 },
    #[error("ring {ring}: slot {slot} is already allocated")]
    InUse { ring: String, slot: u128 },
    #[error("ring {ring}: slot {slot} is reserved")]
    Reserved { ring: String, slot: u128 },
    #[error("ring {ring}: slot {slot} is not allocated")]
    NotAllocated { ring: String, slot: u128 },
    #[error("ring {ring}: slot {slot} is outside the ring (size {size})")]
    OutOfRange { ring: String, slot: u128, size: u128 },
    #[error("ring {ring}: no reachable owner has free space (asked: {asked:?})")]
    NoOwnerWithSpace { ring: String, asked: Vec<Name> },
    #[error("ring {ring}: refusing to remove {node}: it is alive (force to override)")]
    RemoveAlive { ring: String, node: Name },
    #[error("ring {ring}: a node cannot remove itself")]
    RemoveSelf { ring: String },
    #[error("ring {ring}: refused {} record(s) that break ownership: {}", .0.len(), .0.first().map(|v| v.to_string()).unwrap_or_default(), ring = .0.first().map(|v| v.ring.as_str()).unwrap_or_default())]
    Violations(Vec<Violation>),
}

/// A refused record: `writer` claimed blocks `start..end` against this node's ownership.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{writer} wrote blocks {start}..{end} (epoch {epoch}, version {version}) {why}")]
pub struct Violation {
    pub ring: String,
    pub writer: Name,
    pub start: u32,
    pub end: u32,
    pub epoch: u32,
    pub version: u64,
    pub why: &'static str,
}

/// The part of a ring that must survive a crash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingDurable {
    pub me: Name,
    pub space: Space,
    /// A cluster-wide ring: the acceptor set its seed must be split among. `None`: a ring
    /// created by one node.
    pub acceptors: Option<Vec<Name>>,
    pub reserved: BTreeSet<u128>,
    pub state: RingState,
    pub alloc: Bitmap,
    pub seq: u64,
    pub clock: u64,
    pub removed_by: Option<Name>,
    pub next_request: u64,
    /// Per requester: the last request id served, what it got, and when (a counter).
    pub served: BTreeMap<Name, Served>,
    pub served_count: u64,
    /// Where the next serial allocation starts looking: a released slot is reached again only
    /// after the cursor went round the share.
    #[serde(default)]
    pub cursor: u128,
    /// Inherited slot ranges held back: `(first slot, end, removed node, fenced)`. Read back
    /// after a restart, a fenced range (`node rm --force` of an instance that may still run)
    /// stays held until the agent lifts the fence, any other for a whole `reuse_after` again.
    #[serde(default)]
    pub held: Vec<(u128, u128, Name, bool)>,
}

/// A donor's memory of its last answer to one requester.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Served {
    pub id: u64,
    pub runs: Vec<Run>,
    pub at: u64,
}

#[derive(Debug, Clone)]
struct Want {
    id: u64,
    to: Name,
    deadline: u64,
    asked: Vec<Name>,
}

/// One node's view of a ring, and its allocations in it.
#[derive(Debug, Clone)]
pub struct Ring {
    d: RingDurable,
    /// Free blocks each owner last advertised.
    adverts: BTreeMap<Name, u64>,
    /// Effective ownership of this node, in slots, rebuilt on ownership changes.
    owned: Vec<(u128, u128)>,
    owned_blocks: u64,
    free_blocks: u64,
    published_free: Option<u64>,
    want: Option<Want>,
    outbox: Outbox<Output>,
    /// The caller's clock, milliseconds (from [`Ring::tick`] and [`Ring::handle_message`]).
    now_ms: u64,
    /// How long a released slot stays out of use, milliseconds.
    reuse_after_ms: u64,
    /// Released slots and when they may be handed out again.
    quarantine: BTreeMap<u128, u64>,
    /// Slot ranges held back (behind the cursor after a restart) and until when: taken only
    /// when nothing else is free.
    quarantine_ranges: Vec<(u128, u128, u64)>,
    /// Inherited slot ranges, the node they came from, and until when none of their slots is
    /// handed out whatever else is free: the removed node's containers may still hold any of
    /// them. `u64::MAX` while fenced.
    held: Vec<(u128, u128, Name, u64)>,
    /// After a restart, until when every free slot of the share is held back from allocation
    /// (taken only when nothing else is free).
    restart_hold: Option<u64>,
    /// What changed since [`Ring::take_changes`] last ran.
    dirty_meta: bool,
    dirty_cursor: bool,
    dirty_pages: BTreeSet<u128>,
}

/// Default time a released slot stays out of use (stale FDB entries elsewhere would send its
/// traffic to the wrong host: moby #35401).
pub const REUSE_AFTER_MS: u64 = 60_000;

/// What changed in a ring's durable state since the last call of [`Ring::take_changes`]:
/// written as a few keys, not the whole state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingChanges {
    /// The generation these changes bring the disk to (pass it to [`Ring::persisted`]).
    pub generation: u64,
    /// Everything but the bitmap and the cursor (ownership, counters, donation memory):
    /// changes with ownership and publications, not with each allocation.
    pub meta: Option<RingDurable>,
    pub cursor: Option<u128>,
    /// Pages of the allocation bitmap ([`crate::bitmap::PAGE_SLOTS`] slots each); empty words:
    /// the page holds nothing (delete its key).
    pub pages: Vec<(u128, Vec<u64>)>,
}

impl Ring {
    /// A ring this node has not seeded: it learns the seed from Paxos or gossip.
    pub fn new(me: impl Into<Name>, space: Space, reserved: impl IntoIterator<Item = u128>) -> Ring {
        let reserved = reserved.into_iter().filter(|&s| s < space.size).collect();
        let d = RingDurable {
            me: me.into(),
            acceptors: None,
            alloc: Bitmap::new(space.size),
            space,
            reserved,
            state: RingState::default(),
            seq: 0,
            clock: 0,
            removed_by: None,
            next_request: 1,
            served: BTreeMap::new(),
            served_count: 0,
            cursor: 0,
            held: Vec::new(),
        };
        Ring::from_durable(d)
    }

    /// A cluster-wide ring (the VNI range, the default global pool), seeded by Paxos among
    /// `acceptors`: only a seed split among exactly that set is installed, whoever sends it.
    pub fn cluster(
        me: impl Into<Name>,
        space: Space,
        reserved: impl IntoIterator<Item = u128>,
        acceptors: impl IntoIterator<Item = Name>,
    ) -> Ring {
        let mut ring = Ring::new(me, space, reserved);
        let mut set: Vec<Name> = acceptors.into_iter().collect();
        set.sort();
        set.dedup();
        ring.d.acceptors = Some(set);
        ring
    }

    /// A ring created by this node (a network's own subnet): wholly owned by it.
    pub fn created_by(me: impl Into<Name>, space: Space, reserved: impl IntoIterator<Item = u128>) -> Ring {
        let mut ring = Ring::new(me, space, reserved);
        let seed = Seed {
            space: ring.d.space.clone(),
            owners: vec![ring.d.me.clone()],
            seeded_by: ring.d.me.clone(),
            params: String::new(),
        };
        ring.install_seed(&seed).expect("a fresh ring takes its own seed");
        ring
    }

    /// A ring back from disk. It republishes its claims (a publication may have been lost).
    pub fn restore(d: RingDurable) -> Ring {
        let mut ring = Ring::from_durable(d);
        if ring.d.state.seed.is_some() {
            ring.publish_claims();
        }
        ring
    }

    fn from_durable(d: RingDurable) -> Ring {
        let mut ring = Ring {
            d,
            adverts: BTreeMap::new(),
            owned: Vec::new(),
            owned_blocks: 0,
            free_blocks: 0,
            published_free: None,
            want: None,
            outbox: Outbox::default(),
            now_ms: 0,
            reuse_after_ms: REUSE_AFTER_MS,
            quarantine: BTreeMap::new(),
            quarantine_ranges: Vec::new(),
            held: Vec::new(),
            restart_hold: None,
            dirty_meta: true,
            dirty_cursor: true,
            dirty_pages: BTreeSet::new(),
        };
        ring.dirty_pages = ring.d.alloc.iter().map(|s| s / PAGE_SLOTS).collect();
        ring.held = ring
            .d
            .held
            .iter()
            .map(|(s, e, from, fenced)| {
                (*s, *e, from.clone(), if *fenced { u64::MAX } else { REUSE_AFTER_MS })
            })
            .collect();
        ring.rebuild_owned();
        ring
    }

    /// A ring back from its change log: the meta, the cursor and the bitmap's pages. Like
    /// [`Ring::restore`], it republishes its claims.
    pub fn from_parts(
        meta: RingDurable,
        cursor: u128,
        pages: impl IntoIterator<Item = (u128, Vec<u64>)>,
    ) -> Ring {
        let mut d = meta;
        d.cursor = cursor;
        d.alloc = Bitmap::new(d.space.size);
        for (page, words) in pages {
            d.alloc.load_page(page, &words);
        }
        let mut ring = Ring::from_durable(d);
        // What was read back is on disk already; what it republishes is not.
        ring.dirty_meta = false;
        ring.dirty_cursor = false;
        ring.dirty_pages.clear();
        ring.quarantine_restart();
        ring.republish();
        ring
    }

    /// After a restart the cluster tables may have lost everything (they live in memory):
    /// the seed, the removals this node knows and its claims go out again.
    fn republish(&mut self) {
        let Some(seed) = self.d.state.seed.clone() else { return };
        self.emit(Output::Publish(RingEntry::Seed(seed)));
        let ring = self.d.space.ring.clone();
        for (node, (generation, heir)) in self.d.state.removed.clone() {
            let r = Removal { ring: ring.clone(), node, generation, heir };
            self.emit(Output::Publish(RingEntry::Removal(r)));
        }
        self.publish_claims();
    }

    /// After a restart nothing says when slots were released: every free slot of this node's
    /// share waits `reuse_after` again (when nothing else is free, allocation still goes on from
    /// the cursor), so a restart never shortens a quarantine.
    ///
    /// For donation it is narrower: a block is kept only if it lies behind the cursor (where
    /// serial allocation released what it released); a share frozen whole after every restart
    /// would leave its neighbours without space for `reuse_after`.
    fn quarantine_restart(&mut self) {
        let until = self.now_ms.saturating_add(self.reuse_after_ms);
        self.restart_hold = Some(until);
        let cursor = self.d.cursor;
        for &(s, e) in &self.owned.clone() {
            if s < cursor {
                self.quarantine_ranges.push((s, e.min(cursor), until));
            }
        }
    }

    /// How long a released slot stays out of use (default [`REUSE_AFTER_MS`]); quarantines
    /// already running are moved to the new length.
    pub fn set_reuse_after(&mut self, ms: u64) {
        let old = self.reuse_after_ms;
        let shift = |t: &mut u64| *t = t.saturating_sub(old).saturating_add(ms);
        self.quarantine.values_mut().for_each(shift);
        self.quarantine_ranges.iter_mut().for_each(|q| shift(&mut q.2));
        self.held.iter_mut().filter(|q| q.3 != u64::MAX).for_each(|q| shift(&mut q.3));
        if let Some(t) = &mut self.restart_hold {
            shift(t);
        }
        self.reuse_after_ms = ms;
        self.recount_free_blocks();
    }

    /// Takes what changed in the durable state since the last call, to write as keys. Call
    /// [`Ring::persisted`] with its generation once written.
    pub fn take_changes(&mut self) -> Option<RingChanges> {
        if !self.dirty_meta && !self.dirty_cursor && self.dirty_pages.is_empty() {
            return None;
        }
        let meta = std::mem::take(&mut self.dirty_meta).then(|| self.meta());
        let cursor = std::mem::take(&mut self.dirty_cursor).then_some(self.d.cursor);
        let pages = std::mem::take(&mut self.dirty_pages)
            .into_iter()
            .map(|p| (p, self.d.alloc.page_words(p)))
            .collect();
        Some(RingChanges { generation: self.outbox.generation(), meta, cursor, pages })
    }

    /// The durable state without the bitmap and the cursor (see [`RingChanges::meta`]).
    pub fn meta(&self) -> RingDurable {
        let d = &self.d;
        RingDurable {
            me: d.me.clone(),
            space: d.space.clone(),
            acceptors: d.acceptors.clone(),
            reserved: d.reserved.clone(),
            state: d.state.clone(),
            alloc: Bitmap::new(d.space.size),
            seq: d.seq,
            clock: d.clock,
            removed_by: d.removed_by.clone(),
            next_request: d.next_request,
            served: d.served.clone(),
            served_count: d.served_count,
            cursor: 0,
            held: d.held.clone(),
        }
    }

    /// A change to the meta part of the durable state.
    fn touch(&mut self) {
        self.outbox.touch();
        self.dirty_meta = true;
    }

    /// A change to one slot's allocation bit.
    fn touch_slot(&mut self, slot: u128) {
        self.outbox.touch();
        self.dirty_pages.insert(slot / PAGE_SLOTS);
    }

    pub fn me(&self) -> &Name {
        &self.d.me
    }

    pub fn space(&self) -> &Space {
        &self.d.space
    }

    pub fn state(&self) -> &RingState {
        &self.d.state
    }

    pub fn is_seeded(&self) -> bool {
        self.d.state.seed.is_some()
    }

    pub fn removed_by(&self) -> Option<&Name> {
        self.d.removed_by.as_ref()
    }

    /// Slot ranges this node owns (effective, after removals).
    pub fn owned(&self) -> &[(u128, u128)] {
        &self.owned
    }

    pub fn owned_blocks(&self) -> u64 {
        self.owned_blocks
    }

    /// Blocks this node owns with nothing allocated in them.
    pub fn free_blocks(&self) -> u64 {
        self.free_blocks
    }

    /// Slots this node could still hand out.
    pub fn free_slots(&self) -> u128 {
        if self.d.removed_by.is_some() {
            return 0;
        }
        let free_in = |s: u128, e: u128| {
            let reserved = self.d.reserved.range(s..e).count() as u128;
            (e - s) - self.d.alloc.count_in(s, e) - reserved
        };
        let all: u128 = self.owned.iter().map(|&(s, e)| free_in(s, e)).sum();
        // Inherited slots held back are not free to hand out (nor to give away).
        all.saturating_sub(self.held())
    }

    /// This node's allocations.
    pub fn allocations(&self) -> impl Iterator<Item = u128> + '_ {
        self.d.alloc.iter()
    }

    pub fn is_allocated(&self, slot: u128) -> bool {
        self.d.alloc.is_set(slot)
    }

    /// How many slots this node holds allocated.
    pub fn allocated_count(&self) -> u128 {
        self.d.alloc.allocated()
    }

    /// How many of them lie in blocks it no longer owns, counted without walking them.
    pub fn conflict_count(&self) -> u128 {
        let inside: u128 = self.owned.iter().map(|&(s, e)| self.d.alloc.count_in(s, e)).sum();
        self.d.alloc.allocated() - inside.min(self.d.alloc.allocated())
    }

    /// Allocations of this node in blocks it no longer owns (after losing them to a takeover).
    pub fn conflicts(&self) -> Vec<u128> {
        self.d.alloc.iter().filter(|&s| !self.owns_slot(s)).collect()
    }

    fn owns_slot(&self, slot: u128) -> bool {
        let i = self.owned.partition_point(|&(_, e)| e <= slot);
        self.owned.get(i).is_some_and(|&(s, _)| s <= slot)
    }

    /// Advertised free blocks of each owner.
    pub fn adverts(&self) -> &BTreeMap<Name, u64> {
        &self.adverts
    }

    // ---- persistence ----

    /// Whether there are changes not yet persisted.
    pub fn is_dirty(&self) -> bool {
        self.outbox.is_dirty()
    }

    /// The generation of the state [`Ring::durable`] shows now: read it before writing.
    pub fn generation(&self) -> u64 {
        self.outbox.generation()
    }

    /// What to write (fsync'ed) before calling [`Ring::persisted`].
    pub fn durable(&self) -> &RingDurable {
        &self.d
    }

    /// The state as of `generation` is on disk: release what waited for it.
    pub fn persisted(&mut self, generation: u64) {
        self.outbox.persisted(generation);
    }

    /// The next output. Publications and messages come only after the change they carry was
    /// persisted.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outbox.poll()
    }

    fn emit(&mut self, o: Output) {
        self.outbox.emit(o);
    }

    fn event(&mut self, e: RingEvent) {
        self.outbox.event(Output::Event(e));
    }

    // ---- seeding and merging ----

    /// Installs the seed chosen for this ring (by Paxos, by its creator, or learned by gossip).
    pub fn install_seed(&mut self, seed: &Seed) -> Result<(), RingError> {
        let ring = self.d.space.ring.clone();
        if seed.space != self.d.space {
            return Err(RingError::SeedMismatch {
                ring,
                theirs: Box::new(seed.space.clone()),
                ours: Box::new(self.d.space.clone()),
            });
        }
        match &self.d.state.seed {
            Some(s) if s == seed => return Ok(()),
            Some(s) => {
                return Err(RingError::SeedConflict {
                    ring,
                    theirs: seed.seeded_by.clone(),
                    ours: s.seeded_by.clone(),
                });
            }
            None => {}
        }
        if seed.owners.is_empty() {
            return Err(RingError::NotSeeded { ring });
        }
        if let Some(acceptors) = &self.d.acceptors
            && !seed_fits(acceptors, &seed.owners)
        {
            return Err(RingError::SeedOwners { ring, theirs: seed.owners.clone(), ours: acceptors.clone() });
        }
        self.d.state.seed = Some(seed.clone());
        self.d.state.blocks = self.d.state.blocks.join(&seed.runs());
        self.touch();
        self.emit(Output::Publish(RingEntry::Seed(seed.clone())));
        self.refresh(true, true);
        Ok(())
    }

    /// Merges a gossiped entry. Records that break this node's ownership are refused (the rest
    /// is applied) and returned as [`RingError::Violations`].
    pub fn merge(&mut self, entry: &RingEntry) -> Result<(), RingError> {
        if entry.ring() != self.d.space.ring {
            return Ok(());
        }
        match entry {
            RingEntry::Seed(s) => self.install_seed(s),
            RingEntry::Removal(r) => {
                if r.generation >= MAX_VERSION {
                    let v = Violation {
                        ring: r.ring.clone(),
                        writer: r.heir.clone(),
                        start: 0,
                        end: 0,
                        epoch: 0,
                        version: r.generation,
                        why: "as a removal with a generation beyond any honest one",
                    };
                    return Err(RingError::Violations(vec![v]));
                }
                let new = (r.generation, r.heir.clone());
                if self.d.state.removed.get(&r.node).is_none_or(|old| new > *old) {
                    self.d.state.removed.insert(r.node.clone(), new);
                    self.touch();
                    self.after_merge();
                }
                Ok(())
            }
            RingEntry::Claims(c) => {
                if c.writer != self.d.me {
                    self.adverts.insert(c.writer.clone(), c.free_blocks);
                }
                self.merge_runs(&c.runs)
            }
        }
    }

    /// Merges records (from claims or a grant), refusing those that break ownership.
    fn merge_runs(&mut self, runs: &[Run]) -> Result<(), RingError> {
        let n = self.d.space.blocks();
        let mut bad = Vec::new();
        let mut sane = Vec::with_capacity(runs.len());
        for r in runs {
            let end = r.end.min(n);
            if r.start >= end {
                continue;
            }
            if r.rec.version >= MAX_VERSION || r.rec.epoch >= MAX_EPOCH {
                bad.push(self.violation(r, r.start, end, "with a version or epoch beyond any honest one"));
                continue;
            }
            sane.push(Run { start: r.start, end, rec: r.rec.clone() });
        }
        // Per block the highest incoming record: bounded by the blocks, however many runs came.
        let incoming = Runs::from_runs(sane);
        let mut ok = Vec::with_capacity(incoming.len());
        for r in incoming.iter() {
            let mut pos = r.start;
            let mut pieces = self.d.state.blocks.slice(r.start, r.end).peekable();
            while pos < r.end {
                // The local run covering `pos`, or the gap before the next one.
                let (piece_end, loc) = match pieces.peek() {
                    Some(l) if l.start <= pos => {
                        let l = pieces.next().expect("peeked");
                        (l.end, Some(l.rec))
                    }
                    Some(l) => (l.start, None),
                    None => (r.end, None),
                };
                if let Some(why) = self.refuse(&r.rec, loc.as_ref()) {
                    bad.push(self.violation(r, pos, piece_end, why));
                } else if loc.as_ref().is_none_or(|l| r.rec > *l) {
                    ok.push(Run { start: pos, end: piece_end, rec: r.rec.clone() });
                }
                pos = piece_end;
            }
        }
        if !ok.is_empty() {
            let top = ok.iter().map(|r| r.rec.version).max().unwrap_or(0);
            self.d.clock = self.d.clock.max(top);
            self.d.state.blocks = self.d.state.blocks.join(&Runs::from_runs(ok));
            self.touch();
            self.after_merge();
        }
        if bad.is_empty() { Ok(()) } else { Err(RingError::Violations(bad)) }
    }

    fn violation(&self, r: &Run, start: u32, end: u32, why: &'static str) -> Violation {
        Violation {
            ring: self.d.space.ring.clone(),
            writer: r.rec.writer.clone(),
            start,
            end,
            epoch: r.rec.epoch,
            version: r.rec.version,
            why,
        }
    }

    /// Why an incoming record must not replace `local` here, if it must not.
    fn refuse(&self, inc: &Record, local: Option<&Record>) -> Option<&'static str> {
        let me = &self.d.me;
        let newer = local.is_none_or(|l| inc > l);
        if !newer {
            return None;
        }
        if inc.writer == *me {
            return Some("as this node, which never wrote it (was its data dir lost?)");
        }
        let l = local?;
        if l.owner != *me || self.d.state.resolve(&l.owner).as_ref() != Some(me) {
            return None;
        }
        // A newer epoch, or a winning heir's line in this one, is a takeover of this node's
        // blocks: it decides. Within one line only the owner writes.
        if (inc.epoch, &inc.lineage) > (l.epoch, &l.lineage) {
            return None;
        }
        Some("over blocks this node owns")
    }

    /// After a merge: learn removals of this node, claim inherited blocks, recompute ownership.
    fn after_merge(&mut self) {
        self.refresh(true, false);
    }

    /// Recomputes ownership after a change of the replicated state. `report_loss`: blocks that
    /// left were taken (not donated); `wrote`: this node wrote records, so its claims go out.
    fn refresh(&mut self, report_loss: bool, mut wrote: bool) {
        let me = self.d.me.clone();
        // Removed (or removed again, by a later or winning removal): say so, naming who.
        if let Some((_, by)) = self.d.state.removed.get(&me).cloned()
            && self.d.removed_by.as_ref() != Some(&by)
        {
            self.d.removed_by = Some(by.clone());
            self.touch();
            self.want = None;
            self.event(RingEvent::Removed { by });
        }
        let claimed = self.d.removed_by.is_none() && self.claim_inherited();
        wrote |= claimed;
        let (before_blocks, before) = (self.owned_blocks, self.owned.clone());
        self.rebuild_owned();
        if claimed {
            // New holds: the blocks they cover are no longer free, whether or not ownership moved.
            self.recount_free_blocks();
        }
        if (self.owned_blocks, &self.owned) != (before_blocks, &before) {
            // Blocks lost to another node's newer write, with the allocations left in them.
            let lost: Vec<(u128, u128)> =
                before.iter().flat_map(|&(s, e)| self.subtract_owned(s, e)).collect();
            if report_loss && !lost.is_empty() {
                let b = self.d.space.block_of(lost[0].0);
                let to = self.d.state.owner_of(b).unwrap_or_else(|| "nobody".into());
                let blocks =
                    lost.iter().map(|&(s, e)| (e - s).div_ceil(self.d.space.block_size) as u64).sum();
                let allocated = lost.iter().map(|&(s, e)| self.d.alloc.count_in(s, e)).sum();
                self.event(RingEvent::Lost { blocks, to, allocated });
            }
            let free_slots = self.free_slots();
            self.event(RingEvent::Owned { blocks: self.owned_blocks, free_slots });
            if self.owned_blocks > before_blocks {
                self.want = None;
            }
        }
        if self.is_seeded() && (wrote || self.advert_stale()) {
            self.publish_claims();
        }
    }

    /// Parts of `s..e` this node no longer owns.
    fn subtract_owned(&self, s: u128, e: u128) -> Vec<(u128, u128)> {
        let mut out = Vec::new();
        let mut pos = s;
        for &(os, oe) in &self.owned {
            if oe <= pos || os >= e {
                continue;
            }
            if os > pos {
                out.push((pos, os));
            }
            pos = oe;
        }
        if pos < e {
            out.push((pos, e));
        }
        out
    }

    /// Blocks recorded for removed nodes whose heir (transitively) is this node get a
    /// takeover record: a new epoch, which beats whatever the removed node writes later.
    fn claim_inherited(&mut self) -> bool {
        let me = self.d.me.clone();
        let mut takes = Vec::new();
        for r in self.d.state.blocks.iter() {
            if r.rec.owner != me && self.d.state.resolve(&r.rec.owner).as_ref() == Some(&me) {
                takes.push((r.start, r.end, r.rec.owner.clone()));
            }
        }
        if takes.is_empty() {
            return false;
        }
        let until = self.now_ms.saturating_add(self.reuse_after_ms);
        for (s, e, from) in takes {
            let (lo, hi) = (self.d.space.slots(s).0, self.d.space.slots(e - 1).1);
            match self.held.iter_mut().find(|h| (h.0, h.1) == (lo, hi) && h.2 == from) {
                Some(h) => h.3 = h.3.max(until),
                None => {
                    self.d.held.push((lo, hi, from.clone(), false));
                    self.held.push((lo, hi, from, until));
                }
            }
            self.d.state.blocks.rewrite(s, e, |old| Record {
                epoch: old.epoch + 1,
                lineage: me.clone(),
                version: 0,
                writer: me.clone(),
                owner: me.clone(),
            });
        }
        self.touch();
        true
    }

    /// Recomputes the slot ranges this node owns; block counts are recounted only when those
    /// ranges changed (allocation keeps `free_blocks` up to date on its own), so merging a claim
    /// that leaves this node's ownership alone costs nothing per owned block.
    fn rebuild_owned(&mut self) {
        let mut owned: Vec<(u128, u128)> = Vec::new();
        let mut blocks = Vec::new();
        if self.d.removed_by.is_none() {
            let sp = &self.d.space;
            for (s, e, o) in self.d.state.ownership() {
                if o != self.d.me {
                    continue;
                }
                blocks.push((s, e));
                let (lo, hi) = (sp.slots(s).0, sp.slots(e - 1).1);
                match owned.last_mut() {
                    Some(last) if last.1 == lo => last.1 = hi,
                    _ => owned.push((lo, hi)),
                }
            }
        }
        if owned == self.owned {
            return;
        }
        self.owned = owned;
        self.owned_blocks = blocks.iter().map(|&(s, e)| u64::from(e - s)).sum();
        self.free_blocks =
            blocks.iter().flat_map(|&(s, e)| s..e).filter(|&b| self.block_is_free(b)).count() as u64;
    }

    /// Nothing allocated, and something to allocate (a block of reserved slots only is
    /// worth nothing to a requester, so it is never counted free or donated).
    fn block_is_free(&self, b: u32) -> bool {
        let (s, e) = self.d.space.slots(b);
        self.d.alloc.count_in(s, e) == 0
            && (e - s) > self.d.reserved.range(s..e).count() as u128
            && !self.held.iter().any(|h| h.0 < e && s < h.1 && h.3 > self.now_ms)
    }

    /// Counts the free blocks again (after holds began or ended).
    fn recount_free_blocks(&mut self) {
        let sp = &self.d.space;
        let blocks: Vec<u32> =
            self.owned.iter().flat_map(|&(lo, hi)| sp.block_of(lo)..=sp.block_of(hi - 1)).collect();
        self.free_blocks = blocks.into_iter().filter(|&b| self.block_is_free(b)).count() as u64;
    }

    /// Publishes this node's claims: the records it wrote or owns that still win, and its free
    /// blocks. Carrying what it owns too means a grant spreads from its receiver as well, so a
    /// donor dying right after donating does not leave the donation known to one node only.
    fn publish_claims(&mut self) {
        let me = self.d.me.clone();
        let runs: Vec<Run> = self
            .d
            .state
            .blocks
            .iter()
            .filter(|r| r.rec.writer == me || (r.rec.owner == me && !r.rec.writer.is_empty()))
            .cloned()
            .collect();
        self.d.seq += 1;
        self.touch();
        self.published_free = Some(self.free_blocks);
        let c = Claims {
            ring: self.d.space.ring.clone(),
            writer: me,
            seq: self.d.seq,
            runs,
            free_blocks: self.free_blocks,
        };
        self.emit(Output::Publish(RingEntry::Claims(c)));
    }

    /// Whether the advertised free blocks are off by a power of two (or zero is wrong): a
    /// stale advert costs a requester one refusal, a fresh one a publication, so adverts move
    /// only that coarsely, not on every allocation.
    fn advert_stale(&self) -> bool {
        let bucket = |x: u64| 64 - x.leading_zeros();
        self.published_free.is_none_or(|p| bucket(p) != bucket(self.free_blocks))
    }

    fn maybe_publish_free(&mut self) {
        if self.is_seeded() && self.advert_stale() {
            self.publish_claims();
        }
    }

    // ---- allocation ----

    fn check_can_allocate(&self) -> Result<(), RingError> {
        let ring = self.d.space.ring.clone();
        if let Some(by) = &self.d.removed_by {
            return Err(RingError::Removed { ring, by: by.clone() });
        }
        if !self.is_seeded() {
            return Err(RingError::NotSeeded { ring });
        }
        Ok(())
    }

    /// Allocates `preferred`, or the lowest free slot this node owns. Hand it out only after
    /// persisting.
    pub fn allocate(&mut self, preferred: Option<u128>) -> Result<u128, RingError> {
        self.allocate_where(preferred, &|_| true)
    }

    /// Like [`Ring::allocate`], a free slot only where `ok` holds (a default-pool subnet that no
    /// explicit `--subnet` overlaps). Without a preferred slot the search is serial: it starts
    /// at the cursor, wraps once, and takes a slot released less than `reuse_after` ago only
    /// when no other is free.
    pub fn allocate_where(
        &mut self,
        preferred: Option<u128>,
        ok: &dyn Fn(u128) -> bool,
    ) -> Result<u128, RingError> {
        self.check_can_allocate()?;
        let ring = self.d.space.ring.clone();
        let slot = match preferred {
            Some(slot) => {
                if slot >= self.d.space.size {
                    return Err(RingError::OutOfRange { ring, slot, size: self.d.space.size });
                }
                if !self.owns_slot(slot) {
                    return Err(RingError::NotOwned { ring, slot });
                }
                if self.d.reserved.contains(&slot) {
                    return Err(RingError::Reserved { ring, slot });
                }
                if self.d.alloc.is_set(slot) {
                    return Err(RingError::InUse { ring, slot });
                }
                if self.is_held(slot) {
                    return Err(RingError::Held { ring, slot });
                }
                slot
            }
            None => self
                .next_free(ok, false)
                .or_else(|| self.next_free(ok, true))
                .ok_or(RingError::Exhausted { ring, owned: self.owned_blocks })?,
        };
        let b = self.d.space.block_of(slot);
        let was_free = self.block_is_free(b);
        self.d.alloc.set(slot);
        self.touch_slot(slot);
        if preferred.is_none() {
            self.d.cursor = slot + 1;
            self.dirty_cursor = true;
        }
        self.quarantine.remove(&slot);
        if was_free {
            self.free_blocks = self.free_blocks.saturating_sub(1);
            self.maybe_publish_free();
        }
        Ok(slot)
    }

    /// The next free slot of the share from the cursor on, wrapping once; quarantined slots
    /// only if `quarantined`.
    fn next_free(&self, ok: &dyn Fn(u128) -> bool, quarantined: bool) -> Option<u128> {
        let cursor = self.d.cursor;
        let after = self.owned.iter().filter(|&&(_, e)| e > cursor).map(|&(s, e)| (s.max(cursor), e));
        let before = self.owned.iter().filter(|&&(s, _)| s < cursor).map(|&(s, e)| (s, e.min(cursor)));
        for (s, e) in after.chain(before) {
            let mut from = s;
            while let Some(slot) = self.d.alloc.first_clear_in(from, e) {
                if !self.d.reserved.contains(&slot)
                    && !self.is_held(slot)
                    && (quarantined || !self.is_quarantined(slot))
                    && ok(slot)
                {
                    return Some(slot);
                }
                from = slot + 1;
            }
        }
        None
    }

    /// In an inherited range still held back: never handed out.
    fn is_held(&self, slot: u128) -> bool {
        self.held.iter().any(|&(s, e, _, t)| s <= slot && slot < e && t > self.now_ms)
    }

    fn is_quarantined(&self, slot: u128) -> bool {
        self.restart_hold.is_some_and(|t| t > self.now_ms)
            || self.quarantine.get(&slot).is_some_and(|&t| t > self.now_ms)
            || self.quarantine_ranges.iter().any(|&(s, e, t)| s <= slot && slot < e && t > self.now_ms)
    }

    /// Whether any slot of `s..e` is quarantined (such a block is not given away).
    fn quarantined_in(&self, s: u128, e: u128) -> bool {
        self.quarantine.range(s..e).any(|(_, &t)| t > self.now_ms)
            || self.quarantine_ranges.iter().any(|&(qs, qe, t)| qs < e && s < qe && t > self.now_ms)
            || self.held.iter().any(|&(qs, qe, _, t)| qs < e && s < qe && t > self.now_ms)
    }

    /// Slots released less than `reuse_after` ago (and inherited ranges still held back).
    pub fn quarantined(&self) -> u128 {
        let ranges: u128 = self
            .quarantine_ranges
            .iter()
            .map(|&(s, e, t)| (s, e, t))
            .chain(self.held.iter().map(|&(s, e, _, t)| (s, e, t)))
            .filter(|q| q.2 > self.now_ms)
            .map(|(s, e, _)| (e - s) - self.d.alloc.count_in(s, e))
            .sum();
        self.quarantine.values().filter(|&&t| t > self.now_ms).count() as u128 + ranges
    }

    /// Moves the ring's clock (milliseconds) and forgets quarantines that ended.
    pub fn advance(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        let now = self.now_ms;
        if self.quarantine.first_key_value().is_some() {
            self.quarantine.retain(|_, t| *t > now);
        }
        self.quarantine_ranges.retain(|q| q.2 > now);
        if self.held.iter().any(|q| q.3 <= now) {
            self.held.retain(|q| q.3 > now);
            self.sync_held();
        }
        if self.restart_hold.is_some_and(|t| t <= now) {
            self.restart_hold = None;
        }
    }

    /// Releases an allocation (also one left in a block this node lost).
    pub fn release(&mut self, slot: u128) -> Result<(), RingError> {
        if !self.d.alloc.unset(slot) {
            return Err(RingError::NotAllocated { ring: self.d.space.ring.clone(), slot });
        }
        self.touch_slot(slot);
        self.quarantine.insert(slot, self.now_ms.saturating_add(self.reuse_after_ms));
        if self.owns_slot(slot) && self.block_is_free(self.d.space.block_of(slot)) {
            self.free_blocks += 1;
            self.maybe_publish_free();
        }
        Ok(())
    }

    // ---- donation ----

    /// Asks an owner with free space for a share, unless a request is already out. `alive`
    /// says which nodes membership sees alive. Errors when no live owner has space.
    pub fn request_space(&mut self, now_ms: u64, alive: &dyn Fn(&str) -> bool) -> Result<(), RingError> {
        self.check_can_allocate()?;
        if self.want.is_some() {
            return Ok(());
        }
        self.ask_next(now_ms, alive, Vec::new())
    }

    /// Asks for a share if this node has no free slot: call it on attaching to a network, so
    /// the first allocation needs no round trip.
    pub fn ensure_share(&mut self, now_ms: u64, alive: &dyn Fn(&str) -> bool) -> Result<(), RingError> {
        if self.free_slots() > 0 {
            return Ok(());
        }
        self.request_space(now_ms, alive)
    }

    /// Owners to ask, best first: most advertised free blocks (owned blocks when unknown).
    fn candidates(&self, alive: &dyn Fn(&str) -> bool, asked: &[Name]) -> Vec<Name> {
        let mut owned: BTreeMap<Name, u64> = BTreeMap::new();
        for (s, e, o) in self.d.state.ownership() {
            *owned.entry(o).or_default() += u64::from(e - s);
        }
        let mut c: Vec<(u64, Name)> = owned
            .into_iter()
            .filter(|(o, _)| *o != self.d.me && !asked.contains(o) && alive(o))
            .filter(|(o, _)| !self.d.state.removed.contains_key(o))
            .map(|(o, n)| (self.adverts.get(&o).copied().unwrap_or(n), o))
            .filter(|(free, _)| *free > 0)
            .collect();
        c.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        c.into_iter().map(|(_, o)| o).collect()
    }

    fn ask_next(
        &mut self,
        now_ms: u64,
        alive: &dyn Fn(&str) -> bool,
        asked: Vec<Name>,
    ) -> Result<(), RingError> {
        let ring = self.d.space.ring.clone();
        let Some(to) = self.candidates(alive, &asked).into_iter().next() else {
            self.want = None;
            self.event(RingEvent::NoSpace { asked: asked.clone() });
            return Err(RingError::NoOwnerWithSpace { ring, asked });
        };
        let id = self.d.next_request;
        self.d.next_request += 1;
        self.touch();
        let mut asked = asked;
        asked.push(to.clone());
        self.want = Some(Want { id, to: to.clone(), deadline: now_ms + REQUEST_TIMEOUT_MS, asked });
        let want = (self.d.space.blocks() / 2).max(1);
        self.emit(Output::Send { to, msg: RingMsg::Request { ring, id, want } });
        Ok(())
    }

    /// Retries a request that timed out with the next owner.
    pub fn tick(&mut self, now_ms: u64, alive: &dyn Fn(&str) -> bool) -> Result<(), RingError> {
        self.advance(now_ms);
        match &self.want {
            Some(w) if now_ms >= w.deadline => {
                let asked = w.asked.clone();
                self.want = None;
                self.ask_next(now_ms, alive, asked)
            }
            _ => Ok(()),
        }
    }

    /// The owner a donation request is out to, if one is.
    pub fn requesting_from(&self) -> Option<&Name> {
        self.want.as_ref().map(|w| &w.to)
    }

    /// Handles a donation message from `from`.
    pub fn handle_message(
        &mut self,
        from: &Name,
        msg: &RingMsg,
        now_ms: u64,
        alive: &dyn Fn(&str) -> bool,
    ) -> Result<(), RingError> {
        if msg.ring() != self.d.space.ring {
            return Ok(());
        }
        self.advance(now_ms);
        match msg {
            RingMsg::Request { id, want, .. } => {
                self.donate(from, *id, *want);
                Ok(())
            }
            RingMsg::Grant { id, runs, .. } => {
                let res = self.merge_runs(runs);
                if self.want.as_ref().is_some_and(|w| w.id == *id) && self.free_slots() > 0 {
                    self.want = None;
                }
                res
            }
            RingMsg::Refuse { id, .. } => match &self.want {
                Some(w) if w.id == *id => {
                    let asked = w.asked.clone();
                    self.want = None;
                    self.ask_next(now_ms, alive, asked)
                }
                _ => Ok(()),
            },
        }
    }

    fn donate(&mut self, from: &Name, id: u64, want: u32) {
        let ring = self.d.space.ring.clone();
        match self.d.served.get(from) {
            Some(last) if last.id == id => {
                // A duplicate: the same answer again, no second donation.
                let msg = RingMsg::Grant { ring, id, runs: last.runs.clone() };
                self.emit(Output::Send { to: from.clone(), msg });
                return;
            }
            Some(last) if last.id > id => return,
            _ => {}
        }
        let Some((s, e)) = self.pick_donation(want) else {
            self.emit(Output::Send { to: from.clone(), msg: RingMsg::Refuse { ring, id } });
            return;
        };
        let me = self.d.me.clone();
        let version = self.d.clock + 1;
        self.d.clock = version;
        self.d.state.blocks.rewrite(s, e, |old| Record {
            epoch: old.epoch,
            lineage: old.lineage.clone(),
            version,
            writer: me.clone(),
            owner: from.clone(),
        });
        let runs: Vec<Run> = self.d.state.blocks.slice(s, e).collect();
        self.d.served_count += 1;
        let at = self.d.served_count;
        self.d.served.insert(from.clone(), Served { id, runs: runs.clone(), at });
        if self.d.served.len() > MAX_SERVED {
            // Forget the requester served longest ago.
            let oldest = self.d.served.iter().min_by_key(|(_, v)| v.at).map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                self.d.served.remove(&k);
            }
        }
        self.touch();
        self.refresh(false, true);
        self.emit(Output::Send { to: from.clone(), msg: RingMsg::Grant { ring, id, runs } });
    }

    /// Free blocks to give: half of this node's free blocks (at most `want`), from the top of
    /// the owned range with the longest unused tail, so what stays here stays contiguous; if no
    /// range ends unused, the top of the longest unused run inside one. Blocks holding only
    /// reserved slots travel with the free ones around them (they are worth nothing to either
    /// side, and keeping them would split the donor's range).
    fn pick_donation(&self, want: u32) -> Option<(u32, u32)> {
        if self.d.removed_by.is_some() || self.free_blocks == 0 {
            return None;
        }
        let n = self.free_blocks.div_ceil(2).min(u64::from(want.max(1)));
        // A block with a slot released less than `reuse_after` ago is kept: given away, that
        // slot could be handed out again at once.
        let unused = |b: u32| {
            let (s, e) = self.d.space.slots(b);
            self.d.alloc.count_in(s, e) == 0 && !self.quarantined_in(s, e)
        };
        let free_in = |s: u32, e: u32| (s..e).filter(|&b| unused(b) && self.block_is_free(b)).count() as u64;
        let me = self.d.me.clone();
        // (free blocks, start, end) of the best tail and the best inner run.
        let mut best_tail: Option<(u64, u32, u32)> = None;
        let mut best_inner: Option<(u64, u32, u32)> = None;
        for (s, e, o) in self.d.state.ownership() {
            if o != me {
                continue;
            }
            let mut t = e;
            while t > s && unused(t - 1) {
                t -= 1;
            }
            let free = free_in(t, e);
            if free > 0 && best_tail.is_none_or(|(f, _, _)| free > f) {
                best_tail = Some((free, t, e));
            }
            let mut b = s;
            while b < t {
                if !unused(b) {
                    b += 1;
                    continue;
                }
                let start = b;
                while b < t && unused(b) {
                    b += 1;
                }
                let free = free_in(start, b);
                if free > 0 && best_inner.is_none_or(|(f, _, _)| free > f) {
                    best_inner = Some((free, start, b));
                }
            }
        }
        let (_, s, e) = best_tail.or(best_inner)?;
        // From the top down until `n` free blocks are in.
        let mut start = e;
        let mut taken = 0;
        while start > s && taken < n {
            start -= 1;
            if unused(start) && self.block_is_free(start) {
                taken += 1;
            }
        }
        Some((start, e))
    }

    // ---- removal ----

    /// Removes `node` from the ring: its blocks go to this node (the operator's `weft node rm`).
    /// Refused for a node membership sees alive, unless `force`. Returns how many blocks this
    /// node gained; the removal record and then the takeover records are queued as outputs.
    pub fn transfer_dead(&mut self, node: &Name, alive: bool, force: bool) -> Result<u64, RingError> {
        let ring = self.d.space.ring.clone();
        if *node == self.d.me {
            return Err(RingError::RemoveSelf { ring });
        }
        if let Some(by) = &self.d.removed_by {
            return Err(RingError::Removed { ring, by: by.clone() });
        }
        if alive && !force {
            return Err(RingError::RemoveAlive { ring, node: node.clone() });
        }
        let before = self.owned_blocks;
        let generation = self.d.state.removed.get(node).map_or(1, |(g, _)| g + 1).min(MAX_VERSION - 1);
        let removal = Removal { ring, node: node.clone(), generation, heir: self.d.me.clone() };
        self.touch();
        self.emit(Output::Publish(RingEntry::Removal(removal.clone())));
        self.merge(&RingEntry::Removal(removal))?;
        Ok(self.owned_blocks.saturating_sub(before))
    }

    /// Holds every block inherited from `from` until [`Ring::lift_hold`] (persisted): `node rm
    /// --force` of an instance that may still be running and handing out their slots.
    pub fn fence(&mut self, from: &Name) {
        let mut any = false;
        for h in self.held.iter_mut().filter(|h| h.2 == *from) {
            h.3 = u64::MAX;
            any = true;
        }
        if any {
            self.sync_held();
        }
    }

    /// The persisted form of the holds, after they changed.
    fn sync_held(&mut self) {
        self.d.held = self.held.iter().map(|h| (h.0, h.1, h.2.clone(), h.3 == u64::MAX)).collect();
        self.touch();
        self.recount_free_blocks();
        self.maybe_publish_free();
    }

    /// Whether any inherited range is still held back (its slots' users are being adopted).
    pub fn has_holds(&self) -> bool {
        self.held.iter().any(|h| h.3 > self.now_ms)
    }

    /// Marks `slot` allocated when it lies in an inherited range this node owns and is free:
    /// something that outlives its allocator (a live network's VNI or subnet, a gateway) still
    /// uses it. Whether it did.
    pub fn adopt(&mut self, slot: u128) -> bool {
        if slot >= self.d.space.size
            || !self.owns_slot(slot)
            || self.d.alloc.is_set(slot)
            || self.d.reserved.contains(&slot)
            || !self.held.iter().any(|h| h.0 <= slot && slot < h.1)
        {
            return false;
        }
        let b = self.d.space.block_of(slot);
        let was_free = self.block_is_free(b);
        self.d.alloc.set(slot);
        self.touch_slot(slot);
        if was_free {
            self.free_blocks = self.free_blocks.saturating_sub(1);
            self.maybe_publish_free();
        }
        true
    }

    /// Whether blocks inherited from some node are fenced.
    pub fn has_fence(&self) -> bool {
        self.d.held.iter().any(|h| h.3)
    }

    /// The nodes whose inherited blocks are fenced.
    pub fn fenced_from(&self) -> BTreeSet<Name> {
        self.d.held.iter().filter(|h| h.3).map(|h| h.2.clone()).collect()
    }

    /// Ends the fence on blocks inherited from `from`: they are held until `until_ms` (now +
    /// `reuse_after` once that instance is down; now once it confirmed its teardown).
    pub fn lift_hold(&mut self, from: &Name, until_ms: u64) {
        let now = self.now_ms;
        let before = self.held.len();
        let mut changed = false;
        for h in self.held.iter_mut().filter(|h| h.2 == *from && h.3 > until_ms) {
            h.3 = until_ms;
            changed = true;
        }
        self.held.retain(|q| q.3 > now);
        if changed || self.held.len() != before {
            self.sync_held();
        }
    }

    /// Inherited slots held back now: owned, neither allocated nor reserved, and not handed
    /// out whatever else is free ([`Ring::free_slots`] leaves them out).
    pub fn held(&self) -> u128 {
        if self.d.removed_by.is_some() {
            return 0;
        }
        // The union of the ranges held now (one block may be inherited twice).
        let mut ranges: Vec<(u128, u128)> =
            self.held.iter().filter(|h| h.3 > self.now_ms).map(|h| (h.0, h.1)).collect();
        ranges.sort_unstable();
        let mut union: Vec<(u128, u128)> = Vec::with_capacity(ranges.len());
        for (s, e) in ranges {
            match union.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => union.push((s, e)),
            }
        }
        union
            .iter()
            .flat_map(|h| self.owned.iter().map(move |&(s, e)| (s.max(h.0), e.min(h.1))))
            .filter(|(s, e)| s < e)
            .map(|(s, e)| (e - s) - self.d.alloc.count_in(s, e) - self.d.reserved.range(s..e).count() as u128)
            .sum()
    }
}

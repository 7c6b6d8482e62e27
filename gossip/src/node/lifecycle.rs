//! A node's lives: its node record (`weft:nodes/<name>`), restarts announced to peers, earlier
//! lives of its own name (moving above them, telling a live clash from a dead life, deleting a
//! reinstalled host's stale entries), owners membership never knew, and forgetting the records
//! of members gone for good.
//!
//! * Every node publishes one record under its name: instance, generation, gossip and
//!   data-plane addresses, and a status: up, restarting (SIGTERM: peers keep its entries live
//!   for `restart_grace`), or left (a tombstone: peers delete its entries).
//! * A life that learns of a life of another instance of its name at or above its own
//!   generation (a reinstalled host whose wall clock stepped back) moves above it, so its
//!   records win: at once if that life shared its address, after unanswered probes if it was
//!   up elsewhere, never while foca lists it alive. A record of its own instance at or above
//!   it is a copy of its data dir, never moved above.
//! * Another life of its name that answers a direct probe is a clash ([`Event::NameConflict`]);
//!   one that does not answer is only an earlier life.
//! * The first life of a fresh data dir (a reinstalled host, its data dir lost: its Lamport
//!   high-water mark starts at 0) deletes the entries under its name it has not written itself,
//!   once it has synced each network; a key it wrote itself is never replaced by an earlier
//!   life's version. A life restarted on its data dir keeps them: they are its own.
//! * Entries of an owner membership does not know at all stay live for
//!   [`Config::unknown_owner_grace`](crate::Config::unknown_owner_grace), then are hidden; an
//!   owner foca knows only as down is hidden at once.
//! * Node and attachment records of members gone (failed, left or unknown) for longer than
//!   `reap_after` are dropped, left out of the digest, and refused when a peer sends them back.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::RngExt;

use crate::discovery::{AttachRecord, NodeRecord, NodeStatus};
use crate::error::Error;
use crate::event::{DownReason, Event, MemberState};
use crate::identity::NodeId;
use crate::store::{MergeRule, VersionRef};
use crate::timers::TimerKind;
use crate::wire::Body;

use super::attach::attach_key;
use super::dissemination::Push;
use super::{ATTACH_TABLE, CLUSTER_NETWORK, GossipNode, NODES_TABLE};

/// Direct probes sent to another life of this node's name before it counts as dead.
const PROBE_ATTEMPTS: u8 = 3;
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Node records order by generation first: a newer life wins whatever its Lamport time (a
/// reinstalled host starts with a fresh clock).
#[derive(Debug)]
pub(super) struct NodeRule;

impl MergeRule for NodeRule {
    fn compare(&self, a: &VersionRef<'_>, b: &VersionRef<'_>) -> Ordering {
        let generation = |v: &VersionRef<'_>| NodeRecord::decode(v.value).map(|r| r.generation).unwrap_or(0);
        generation(a).cmp(&generation(b))
    }
}

/// A node record as indexed.
#[derive(Debug, Clone, Copy)]
pub(super) struct Indexed {
    pub(super) rec: NodeRecord,
    pub(super) ltime: u64,
    /// `Left` for a tombstone, whatever the value says.
    pub(super) status: NodeStatus,
}

#[derive(Debug)]
pub(super) struct Probe {
    nonce: u64,
    attempts: u8,
    next: Instant,
}

/// The state of this concern.
#[derive(Debug)]
pub(super) struct Lifecycle {
    /// This node's data-plane (VTEP) address, published in its record.
    pub(super) data_addr: IpAddr,
    /// The generation this life started with (before any move above).
    pub(super) started: u64,
    /// Every node's record, by name.
    pub(super) records: BTreeMap<Arc<str>, Indexed>,
    /// Probes in flight to other lives of this node's name, by address.
    pub(super) probes: BTreeMap<SocketAddr, Probe>,
    /// The highest generation of another instance's life, up at another address, to move
    /// above once every probe went unanswered.
    move_after_probe: Option<u64>,
    /// The other life of this node's name that answered a probe, while it is up.
    pub(super) clash: Option<NodeId>,
    /// Entries under this name that this life did not write are another instance's, hence
    /// stale: this is a fresh data dir (it started with no Lamport high-water mark), or the
    /// agent persisted that the sweep was still due.
    foreign_predecessor: bool,
    /// Entries of an earlier life to delete, and own keys to write again above an earlier
    /// life's version, once the current input is handled.
    pending: Vec<(String, String, String, bool)>,
    /// Owners of entries membership does not know, with when their first entry arrived.
    pub(super) unknown_owners: BTreeMap<Arc<str>, Instant>,
    /// Those of them whose entries are hidden.
    unknown_hidden: HashSet<Arc<str>>,
    /// Members whose records were dropped (gone longer than `reap_after`): records of theirs
    /// up to this generation are refused until the instant.
    expired: BTreeMap<Arc<str>, (u64, Instant)>,
}

impl Lifecycle {
    /// Whether `owner`'s records expired here (it is gone for good, until a newer life's
    /// record arrives).
    pub(super) fn expired_owner(&self, owner: &str) -> bool {
        !self.expired.is_empty() && self.expired.contains_key(owner)
    }

    pub(super) fn new(data_addr: IpAddr, started: u64, fresh: bool) -> Self {
        Lifecycle {
            data_addr,
            started,
            records: BTreeMap::new(),
            probes: BTreeMap::new(),
            move_after_probe: None,
            clash: None,
            foreign_predecessor: fresh,
            pending: Vec::new(),
            unknown_owners: BTreeMap::new(),
            unknown_hidden: HashSet::new(),
            expired: BTreeMap::new(),
        }
    }
}

impl GossipNode {
    // ----- this node's record ------------------------------------------------------------

    /// Sets the data-plane (VTEP) address this node publishes (default: its gossip IP).
    pub fn set_data_addr(&mut self, now: Instant, addr: IpAddr) {
        self.tick(now);
        if addr != self.life.data_addr {
            self.life.data_addr = addr;
            if !self.membership.left {
                self.write_node_record(now, NodeStatus::Up);
            }
        }
    }

    /// This node's data-plane address.
    pub fn data_addr(&self) -> IpAddr {
        self.life.data_addr
    }

    /// The generation this life started with (its identity's may have moved above since).
    pub fn started_generation(&self) -> u64 {
        self.life.started
    }

    pub(super) fn write_node_record(&mut self, now: Instant, status: NodeStatus) {
        let rec = NodeRecord {
            instance: self.id.instance,
            generation: self.id.generation,
            addr: self.id.addr,
            data_addr: self.life.data_addr,
            status,
        };
        let name = self.id.name.to_string();
        // Leaving is a tombstone that still says who left.
        let _ = self.write_local_version(
            now,
            CLUSTER_NETWORK,
            NODES_TABLE,
            &name,
            rec.encode(),
            status == NodeStatus::Left,
        );
    }

    /// Removes a dead life of another node for good (`weft node rm`): writes, above its node
    /// record, a tombstone that still names that life (same instance and generation), which
    /// every node applies as that life leaving: its node-owned entries, hidden ones included,
    /// are deleted everywhere, and versions of them that arrive later arrive deleted. The
    /// tombstone's Lamport time is put [`REMOVAL_LTIME_MARGIN`] above this node's clock, so it
    /// also goes above what the removed node wrote in networks this node does not see.
    ///
    /// Returns whether a tombstone was written: not when `name`'s record is of another
    /// instance (a reinstalled host deletes what its earlier instance left itself), says it
    /// left, or is unknown. Refused for this node's own life and for a member membership
    /// sees alive or suspect (a live node would write its record back above the tombstone).
    pub fn remove_node(&mut self, now: Instant, name: &str, instance: u64) -> Result<bool, Error> {
        self.tick(now);
        if self.membership.left {
            return Err(Error::Left);
        }
        if *name == *self.id.name && instance == self.id.instance {
            return Err(Error::Membership("a node cannot remove itself".into()));
        }
        if let Some(m) = self.membership.members.get(name)
            && m.id.instance == instance
            && m.state == MemberState::Alive
        {
            return Err(Error::Membership(format!(
                "{name} is alive; only a node that is down can be removed"
            )));
        }
        let Some(r) = self.life.records.get(name) else { return Ok(false) };
        if r.rec.instance != instance || r.status == NodeStatus::Left {
            return Ok(false);
        }
        let value = r.rec.encode();
        self.clock = self.clock.saturating_add(super::REMOVAL_LTIME_MARGIN).min(crate::wire::MAX_LTIME - 2);
        self.stats.nodes_removed += 1;
        Ok(self.write_local_version(now, CLUSTER_NETWORK, NODES_TABLE, name, value, true))
    }

    /// Stops for a restart: peers keep this node's entries live for their `restart_grace`, and
    /// hide them after it unless a new life of this node came up first. Like
    /// [`leave`](Self::leave), keep polling transmits for a moment so the news goes out.
    pub fn stop_restarting(&mut self, now: Instant) -> Result<(), Error> {
        self.tick(now);
        if self.membership.left {
            return Ok(());
        }
        self.write_node_record(now, NodeStatus::Restarting);
        self.depart(now, true)
    }

    /// Sends what this node wrote last to more peers than usual (it will not relay it) and
    /// leaves membership.
    ///
    /// A restart leaves SWIM half a gossip interval later: a peer that heard of the departure
    /// before the record saying it is a restart would hide this node's entries (a stopping
    /// agent keeps running 600 ms for its news to go out).
    pub(super) fn depart(&mut self, now: Instant, restarting: bool) -> Result<(), Error> {
        // The record saying why this node goes (restart or leave) goes first, whatever else it
        // wrote last: peers that hear of the departure from SWIM before it take a restart for
        // a failure.
        let record = crate::store::keyhash(NODES_TABLE, &self.id.name);
        if let Some(net) = self.networks.get_mut(CLUSTER_NETWORK) {
            net.queue.promote(record);
        }
        let mut peers = self.pick_peers(CLUSTER_NETWORK, 2 * self.cfg.gossip_fanout);
        peers.sort();
        self.send_queue_to(CLUSTER_NETWORK, Push::Own, &peers);
        self.membership.left = true;
        if restarting {
            self.timers.add(now + self.cfg.gossip_interval / 2, TimerKind::Depart);
            return Ok(());
        }
        let result = self.with_foca(now, |foca, rt| foca.leave_cluster(rt));
        self.process_notes(now);
        result.map_err(|e| Error::Membership(e.to_string()))
    }

    // ----- every node's record -----------------------------------------------------------

    /// Applies a stored node record (own or remote; `deleted` for a tombstone) to the index and
    /// its consequences.
    pub(super) fn on_node_record(
        &mut self,
        now: Instant,
        key: &str,
        ltime: u64,
        deleted: bool,
        rec: NodeRecord,
    ) {
        let status = if deleted { NodeStatus::Left } else { rec.status };
        let name: Arc<str> = match self.membership.members.get_key_value(key) {
            Some((k, _)) => k.clone(),
            None if *key == *self.id.name => self.id.name.clone(),
            None => Arc::from(key),
        };
        self.life.records.insert(name.clone(), Indexed { rec, ltime, status });
        if let Some((g, _)) = self.life.expired.get(&name)
            && rec.generation > *g
        {
            self.life.expired.remove(&name);
        }
        if name == self.id.name {
            // Another life's record was looked at in `apply`, whether or not it won.
            return;
        }
        if status != NodeStatus::Left && !self.membership.members.contains_key(&name) {
            // Its records expire like its entries if membership never comes to know it.
            self.note_unknown_owner(now, &name);
        }
        match status {
            NodeStatus::Up => {
                if !self.membership.members.contains_key(&name) && !self.membership.left {
                    // A member the table knows and membership has never seen: go and find it.
                    self.membership.discovery.want(&name, rec.addr, now);
                }
            }
            NodeStatus::Restarting => {
                self.membership.discovery.forget(&name);
                // foca declared it down before its record arrived: its entries were hidden
                // as a failure's; within the grace they come back.
                let grace = self.cfg.restart_grace;
                if let Some(m) = self.membership.members.get_mut(&name)
                    && m.state == MemberState::Failed
                    && m.id.generation <= rec.generation
                    && now.saturating_duration_since(m.since) < grace
                {
                    m.state = MemberState::Restarting;
                    let at = m.since + grace;
                    self.timers.add(at, TimerKind::Grace(name.clone()));
                    self.set_hidden(now, &name, false);
                }
            }
            NodeStatus::Left => {
                self.membership.discovery.forget(&name);
                // Its node-owned entries written before it left go.
                let nets: Vec<String> = self.networks.keys().cloned().collect();
                for nid in nets {
                    self.remove_owned_before(now, &nid, &name, ltime);
                }
                if let Some(m) = self.membership.members.get_mut(&name)
                    && m.id.generation <= rec.generation
                    && m.state != MemberState::Left
                {
                    // Down once is enough: a failed member that turns out to have left says
                    // nothing more (its hidden entries were just deleted).
                    let announce = m.state != MemberState::Failed;
                    m.state = MemberState::Left;
                    m.since = now;
                    let id = m.id.clone();
                    self.refresh_peer(&name);
                    if announce {
                        tracing::info!(member = %id, "member left");
                        self.events.push_back(Event::MemberDown { id, reason: DownReason::Left });
                    }
                }
            }
        }
    }

    /// A record under this node's name that is not this life's own.
    pub(super) fn another_life_of_mine(&mut self, now: Instant, rec: NodeRecord, status: NodeStatus) {
        if rec.instance == self.id.instance && rec.generation == self.id.generation {
            return;
        }
        // A record of this very instance at or above this life can only be a copy of its data
        // dir (one instance's lives only go up): never moved above; a probe tells if it runs.
        let other_instance = rec.instance != self.id.instance;
        if status == NodeStatus::Up && rec.addr != self.id.addr {
            // Maybe a live twin: move above it only once it has not answered (see
            // `probe_round`); a clash is for the agent to settle.
            self.probe(now, rec.addr);
            if other_instance && rec.generation >= self.id.generation {
                self.life.move_after_probe = self.life.move_after_probe.max(Some(rec.generation));
            }
            return;
        }
        if other_instance && rec.generation >= self.id.generation && self.can_move() {
            self.move_above(now, rec.generation);
        }
    }

    /// Whether this life may take a new generation now: no live clash, no probe in flight, not
    /// gone.
    pub(super) fn can_move(&self) -> bool {
        self.life.clash.is_none() && self.life.probes.is_empty() && !self.membership.left
    }

    /// Takes a generation above `other`'s (an earlier life of this name that started at or
    /// above this one: the wall clock stepped back) and publishes this node's records again
    /// under it.
    pub(super) fn move_above(&mut self, now: Instant, other: u64) {
        let next = NodeId { generation: other.saturating_add(1), renewal: 0, ..self.id.clone() };
        tracing::warn!(
            from = self.id.generation,
            to = next.generation,
            "an earlier life of this node's name is at or above this one (the clock stepped back?); moving above it"
        );
        self.stats.identity_moves += 1;
        if let Err(e) = self.with_foca(now, |foca, rt| foca.change_identity(next.clone(), rt)) {
            tracing::debug!(error = %e, "change identity");
        }
        self.id = next;
        self.write_node_record(now, NodeStatus::Up);
        // Attachments of the earlier life to networks this one is not on were not stale while
        // that life was above this one; now they are (or its entries there would stay forever).
        self.mark_stale_self_attachments(now);
        let nets: Vec<String> = self.networks.keys().filter(|n| *n != CLUSTER_NETWORK).cloned().collect();
        for n in nets {
            self.write_attachment(now, &n, true);
        }
        self.process_notes(now);
        self.announce_everywhere(now);
    }

    /// `from` is a life of a name whose newer life (of another instance) this node knows:
    /// membership refuses `from` at its address until it moves above, so say what to move
    /// above. Answered once per sync `from` starts (every few seconds at most).
    pub(super) fn tell_of_newer_life(&mut self, from: &NodeId) {
        let newer = self
            .membership
            .members
            .get(&from.name)
            .map(|m| &m.id)
            .filter(|m| m.instance != from.instance && m.generation >= from.generation)
            .map(|m| (m.instance, m.generation));
        if let Some((instance, generation)) = newer {
            self.send_packet(from.addr, Body::NewerLife { instance, generation }, false);
        }
    }

    /// A member told this node of a newer life of its name, of another instance.
    pub(super) fn on_newer_life(&mut self, now: Instant, from: &NodeId, instance: u64, generation: u64) {
        let trusted = self.membership.members.get(&from.name).is_some_and(|m| m.id == *from);
        if trusted
            && instance != self.id.instance
            && generation >= self.id.generation
            && self.life.clash.is_none()
            && !self.membership.left
        {
            self.move_above(now, generation);
        }
    }

    // ----- probes: a live clash, or an earlier life ------------------------------------

    /// Asks the other life of this node's name at `addr` whether it is alive.
    pub(super) fn probe(&mut self, now: Instant, addr: SocketAddr) {
        if self.life.probes.contains_key(&addr) || self.membership.left {
            return;
        }
        let nonce = self.rng.random::<u64>();
        self.life.probes.insert(addr, Probe { nonce, attempts: 1, next: now + PROBE_INTERVAL });
        self.send_packet(addr, Body::Probe { nonce }, false);
    }

    /// Resends unanswered probes; one unanswered [`PROBE_ATTEMPTS`] times is an earlier life.
    pub(super) fn probe_round(&mut self, now: Instant) {
        if self.life.probes.is_empty() {
            return;
        }
        let due: Vec<SocketAddr> =
            self.life.probes.iter().filter(|(_, p)| p.next <= now).map(|(a, _)| *a).collect();
        for addr in due {
            let p = self.life.probes.get_mut(&addr).expect("listed");
            if p.attempts >= PROBE_ATTEMPTS {
                self.life.probes.remove(&addr);
                continue;
            }
            p.attempts += 1;
            p.next = now + PROBE_INTERVAL;
            let nonce = p.nonce;
            self.send_packet(addr, Body::Probe { nonce }, false);
        }
        if self.life.probes.is_empty() && self.life.clash.is_none() {
            // Every other life probed was dead: move above the highest, sweep what waited. Not
            // while foca lists another identity of this name alive at another address (a twin
            // that probes cannot reach): two live twins would move above each other forever.
            let name = self.id.name.clone();
            let twin_alive = self
                .membership
                .foca
                .iter_members()
                .any(|m| m.id().name == name && m.id().addr != self.id.addr);
            if let Some(g) = self.life.move_after_probe.take()
                && g >= self.id.generation
                && !self.membership.left
                && !twin_alive
            {
                self.move_above(now, g);
            }
            self.sweep_waiting(now);
        }
    }

    /// A probe or its answer from another life of this node's name. Returns false for any
    /// other packet.
    pub(super) fn on_own_name_packet(&mut self, from: &NodeId, body: &Body) -> bool {
        match body {
            Body::Probe { nonce } => {
                if !self.membership.left {
                    let started = self.life.started;
                    self.send_packet(from.addr, Body::ProbeAck { nonce: *nonce, started }, false);
                }
                true
            }
            Body::ProbeAck { nonce, started } => {
                if self.life.probes.get(&from.addr).is_some_and(|p| p.nonce == *nonce) {
                    self.life.probes.remove(&from.addr);
                    tracing::warn!(other = %from, instance = %from.instance_hex(), "another live node uses this node's name");
                    self.membership.name_contested = true;
                    self.life.clash = Some(from.clone());
                    self.events
                        .push_back(Event::NameConflict { other: from.clone(), other_started: *started });
                }
                true
            }
            _ => false,
        }
    }

    /// foca reports another identity of this node's name down: a clash with it is over (only
    /// that life or a later one of it: an earlier identity at its address going down is not).
    pub(super) fn own_name_down(&mut self, now: Instant, id: &NodeId) {
        if self
            .life
            .clash
            .as_ref()
            .is_some_and(|c| c.addr == id.addr && id.instance == c.instance && id.life() >= c.life())
        {
            self.life.clash = None;
            self.membership.name_contested = false;
            // What the clash held back goes on.
            self.sweep_waiting(now);
        }
    }

    // ----- restarts ----------------------------------------------------------------------

    /// Whether `id`, just declared down, had announced a restart.
    pub(super) fn announced_restart(&self, id: &NodeId) -> bool {
        self.life
            .records
            .get(&id.name)
            .is_some_and(|r| r.status == NodeStatus::Restarting && r.rec.generation >= id.generation)
    }

    /// The restart grace of `name` is over: unless a new life came up, its entries are hidden.
    pub(super) fn grace_over(&mut self, now: Instant, name: &Arc<str>) {
        let Some(m) = self.membership.members.get_mut(name) else { return };
        if m.state != MemberState::Restarting
            || now.saturating_duration_since(m.since) < self.cfg.restart_grace
        {
            return;
        }
        m.state = MemberState::Failed;
        m.since = now;
        tracing::info!(member = %m.id, "no new life within the restart grace; hiding its entries");
        self.stats.owners_hidden_failed += 1;
        self.set_hidden(now, name, true);
    }

    // ----- owners membership does not know ------------------------------------------------

    /// Whether `owner`'s node-owned entries are hidden here: membership shows it failed (by any
    /// path), or never knew it for longer than the unknown-owner grace.
    pub(super) fn owner_hidden(&self, owner: &str) -> bool {
        match self.membership.members.get(owner) {
            Some(m) => m.state == MemberState::Failed,
            None => self.life.unknown_hidden.contains(owner),
        }
    }

    /// An entry of `owner` arrived and membership does not know it: start its clock.
    pub(super) fn note_unknown_owner(&mut self, now: Instant, owner: &Arc<str>) {
        if !self.life.unknown_owners.contains_key(owner) {
            self.life.unknown_owners.insert(owner.clone(), now);
        }
    }

    /// Membership now knows `name`.
    pub(super) fn owner_known(&mut self, name: &str) {
        if !self.life.unknown_owners.is_empty() {
            self.life.unknown_owners.remove(name);
            self.life.unknown_hidden.remove(name);
        }
    }

    /// Judges the owners membership does not know: those foca knows only as down are failed
    /// members now; the others are hidden once the grace is over, and forgotten `reap_after`
    /// later.
    pub(super) fn judge_unknown_owners(&mut self, now: Instant) {
        if self.life.unknown_owners.is_empty() {
            return;
        }
        let members = &self.membership.members;
        self.life.unknown_owners.retain(|name, _| !members.contains_key(name));
        let down: HashMap<&str, NodeId> = self
            .membership
            .foca
            .iter_membership_state()
            .filter(|m| {
                m.state() == foca::State::Down && self.life.unknown_owners.contains_key(&*m.id().name)
            })
            .map(|m| (&*m.id().name, m.id().clone()))
            .collect();
        let mut gone = Vec::new();
        let mut hide = Vec::new();
        let mut expire = Vec::new();
        let grace = self.cfg.unknown_owner_grace();
        for (name, since) in &self.life.unknown_owners {
            if let Some(id) = down.get(&**name) {
                gone.push(id.clone());
            } else if now.saturating_duration_since(*since) >= grace + self.cfg.reap_after {
                expire.push(name.clone());
            } else if now.saturating_duration_since(*since) >= grace
                && !self.life.unknown_hidden.contains(name)
            {
                hide.push(name.clone());
            }
        }
        drop(down);
        for id in gone {
            self.life.unknown_owners.remove(&id.name);
            self.life.unknown_hidden.remove(&id.name);
            self.stats.owners_hidden_unknown += 1;
            self.member_gone(now, id);
        }
        for name in hide {
            tracing::info!(owner = %name, "owner unknown to membership since its first entry; hiding its entries");
            self.stats.owners_hidden_unknown += 1;
            self.life.unknown_hidden.insert(name.clone());
            self.set_hidden(now, &name, true);
        }
        for name in expire {
            self.life.unknown_owners.remove(&name);
            self.life.unknown_hidden.remove(&name);
            self.expire_records(now, &name, 0);
        }
    }

    // ----- records of members gone for good ------------------------------------------------

    /// Drops `name`'s node and attachment records (it has been gone longer than `reap_after`):
    /// out of the store, the digest and the indexes; records of its lives up to the latest
    /// known one are refused for another `reap_after`.
    pub(super) fn expire_records(&mut self, now: Instant, name: &str, generation: u64) {
        let mut generation = generation;
        let mut dropped = 0;
        if let Some(r) = self.life.records.remove(name) {
            generation = generation.max(r.rec.generation);
        }
        let cluster = self.networks.get_mut(CLUSTER_NETWORK).expect("always attached");
        if cluster.remove(NODES_TABLE, name).is_some() {
            dropped += 1;
        }
        let nets: Vec<String> = self
            .attach
            .index
            .iter()
            .filter(|(_, by)| by.contains_key(name))
            .map(|(n, _)| n.clone())
            .collect();
        for network in nets {
            let by = self.attach.index.get_mut(&network).expect("listed");
            if let Some(a) = by.remove(name) {
                generation = generation.max(a.generation);
                if a.attached
                    && let Some(c) = self.attach.attached_count.get_mut(&network)
                {
                    *c = c.saturating_sub(1);
                }
            }
            if by.is_empty() {
                self.attach.index.remove(&network);
            }
            let cluster = self.networks.get_mut(CLUSTER_NETWORK).expect("always attached");
            if cluster.remove(ATTACH_TABLE, &attach_key(&network, name)).is_some() {
                dropped += 1;
            }
        }
        let name: Arc<str> = Arc::from(name);
        self.refresh_peer(&name);
        self.membership.discovery.forget(&name);
        self.stats.records_expired += dropped;
        self.life.expired.insert(name, (generation, now + self.cfg.reap_after));
    }

    /// Whether a node or attachment record from `owner` at `generation` belongs to a member
    /// whose records expired here (counted when refused).
    pub(super) fn refuse_expired(&mut self, table: &str, owner: &str, value: &[u8]) -> bool {
        let Some((g, _)) = self.life.expired.get(owner) else { return false };
        let generation = match table {
            NODES_TABLE => NodeRecord::decode(value).map(|r| r.generation),
            _ => AttachRecord::decode(value).map(|r| r.generation),
        };
        let refuse = generation.is_ok_and(|x| x <= *g);
        if refuse {
            self.stats.records_refused += 1;
        }
        refuse
    }

    /// Forgets expiries whose time is up.
    pub(super) fn forget_expired(&mut self, now: Instant) {
        self.life.expired.retain(|_, (_, until)| *until > now);
    }

    // ----- entries of earlier lives ---------------------------------------------------------

    /// A sync of `network` completed: the first time, delete what earlier lives of another
    /// instance left under this name.
    pub(super) fn sync_completed(&mut self, now: Instant, network: &str) {
        let Some(net) = self.networks.get_mut(network) else { return };
        if net.synced {
            return;
        }
        net.synced = true;
        self.sweep_waiting(now);
    }

    /// Whether a restart must still treat entries under this name that it did not write as an
    /// earlier instance's: a fresh instance until its first sync of the cluster network. The
    /// agent persists it, so a restart before then still deletes them; a restart after it
    /// keeps this instance's own entries. (Within the first life every network is swept at its
    /// first sync, however late; the earlier instance's attachments to networks this one did
    /// not attach are detached, and its entries there deleted, through its attachment records.)
    pub fn predecessor_sweep_pending(&self) -> bool {
        self.life.foreign_predecessor && !self.networks.get(CLUSTER_NETWORK).is_some_and(|n| n.swept)
    }

    /// Sets whether entries under this name that this life did not write are an earlier
    /// instance's (see [`predecessor_sweep_pending`](Self::predecessor_sweep_pending)); a node
    /// built with no Lamport high-water mark (a fresh data dir) starts with it set.
    pub fn set_predecessor_sweep(&mut self, pending: bool) {
        self.life.foreign_predecessor = pending;
    }

    /// Sweeps every synced network not swept yet, unless a probe is in flight or a clash is
    /// on (the entries may be a live twin's).
    fn sweep_waiting(&mut self, now: Instant) {
        if !self.life.foreign_predecessor || !self.life.probes.is_empty() || self.life.clash.is_some() {
            return;
        }
        let due: Vec<String> =
            self.networks.iter().filter(|(_, n)| n.synced && !n.swept).map(|(k, _)| k.clone()).collect();
        for nid in due {
            self.sweep_old_lives(now, &nid);
            if let Some(n) = self.networks.get_mut(&nid) {
                n.swept = true;
            }
        }
    }

    /// Tombstones every live node-owned entry under this node's name in `network` that this
    /// life did not write, each above the version it deletes.
    fn sweep_old_lives(&mut self, now: Instant, network: &str) {
        let Some(net) = self.networks.get(network) else { return };
        let doomed = self.owned_entries(network, &self.id.name, |e| !net.own_written.contains(&e.keyhash));
        for (table, key) in doomed {
            self.stats.old_life_entries_removed += 1;
            self.write_local(now, network, &table, &key, None);
        }
    }

    /// Whether a remote version under this node's name must not be applied as it is: this life
    /// wrote the key (its own version goes above the earlier life's), or it is an earlier
    /// instance's and the network has been swept (a tombstone goes above it). Queues the fix
    /// for [`settle_own_name`](Self::settle_own_name).
    pub(super) fn earlier_life_version(
        &mut self,
        network: &str,
        table: &str,
        key: &str,
        keyhash: u64,
    ) -> bool {
        let Some(net) = self.networks.get(network) else { return false };
        let mine = net.own_written.contains(&keyhash);
        if mine || (self.life.foreign_predecessor && net.swept) {
            // Not stored: this life's own version goes above it, or a tombstone does.
            self.life.pending.push((network.to_string(), table.to_string(), key.to_string(), mine));
            return true;
        }
        false
    }

    /// Writes this life's own version again above an earlier life's, or deletes an earlier
    /// life's entry, for every key queued while handling the last input.
    pub(super) fn settle_own_name(&mut self, now: Instant) {
        // Not while another live node holds this name: the two would write above each other
        // at gossip speed (the newcomer refuses to run; the versions settle once it is gone).
        if self.life.pending.is_empty() || self.membership.left || self.membership.name_contested {
            self.life.pending.clear();
            return;
        }
        for (network, table, key, mine) in std::mem::take(&mut self.life.pending) {
            let Some(net) = self.networks.get(&network) else { continue };
            if !mine {
                // An earlier instance's version, newer than anything held here: a tombstone
                // goes above it (the clock already witnessed it).
                self.stats.old_life_entries_removed += 1;
                self.write_local(now, &network, &table, &key, None);
                continue;
            }
            let value = match net.get(&table, &key) {
                Some(e) if e.owner == self.id.name && !e.deleted => Some(e.value.clone()),
                Some(e) if e.owner == self.id.name => None,
                // Someone else took the key over since, and an earlier life's version went above
                // both at the peers that stored it: a tombstone above it ends that.
                Some(_) | None => None,
            };
            self.write_local(now, &network, &table, &key, value);
        }
    }
}

/// A probe in flight, for tests.
#[cfg(test)]
pub(super) fn test_probe(nonce: u64, now: Instant) -> Probe {
    Probe { nonce, attempts: 1, next: now + PROBE_INTERVAL }
}

//! Membership: foca, its runtime, joining and leaving the cluster, and what members coming,
//! going and being renamed mean for the node's tables and peers.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use foca::{Foca, NoCustomBroadcast, OwnedNotification};
use rand::rngs::Xoshiro256PlusPlus;

use crate::discovery::{Discovery, NodeStatus};
use crate::error::Error;
use crate::event::{
    DownReason, Event, MemberState, Stats, TableEvent, TableEventKind, Transmit, TransmitKind,
};
use crate::identity::NodeId;
use crate::store::TableKind;
use crate::timers::{TimerKind, Timers};
use crate::wire::{self, FrameType};

use super::{CLUSTER_NETWORK, GossipNode, RESERVED_TABLE_PREFIX};

/// foca, with the node's identity, wire codec and RNG.
pub(super) type Swim = Foca<NodeId, wire::FocaCodec, Xoshiro256PlusPlus, NoCustomBroadcast>;

/// The cluster membership state: foca, and the node's own record of the members it reported.
pub(super) struct Membership {
    pub(super) foca: Swim,
    /// The configuration foca runs with; its suspicion timeout follows the cluster's size
    /// ([`Config::suspicion`](crate::Config::suspicion)).
    pub(super) foca_cfg: foca::Config,
    pub(super) members: BTreeMap<Arc<str>, Member>,
    pub(super) seeds: Vec<SocketAddr>,
    /// Members named in the attachment table that membership has not seen yet.
    pub(super) discovery: Discovery,
    /// Another node claimed this node's name: records of "our" previous lives may be its.
    pub(super) name_contested: bool,
    /// foca is connected to a cluster (its last word was `Active`, not `Idle` or `Rejoin`).
    pub(super) connected: bool,
    /// [`leave`](GossipNode::leave) was called: commands are refused, rounds stop.
    pub(super) left: bool,
}

#[derive(Debug, Clone)]
pub(super) struct Member {
    pub(super) id: NodeId,
    pub(super) state: MemberState,
    /// When the state last changed (failed and left members are forgotten after `reap_after`).
    pub(super) since: Instant,
}

/// foca's `Runtime`: an outbox that turns sends into transmits and `submit_after` into absolute
/// deadlines in the node's timer table.
pub(super) struct Outbox<'a> {
    now: Instant,
    timers: &'a mut Timers,
    transmits: &'a mut VecDeque<Transmit>,
    notes: &'a mut Vec<OwnedNotification<NodeId>>,
    /// Identities foca recorded as down (it schedules their removal): foca says nothing else
    /// of a member it first learns as down, nor of another life of this node's name that it
    /// declares down for sharing this node's address.
    downs: &'a mut Vec<NodeId>,
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
        if let foca::Timer::RemoveDown(id) = &event {
            self.downs.push(id.clone());
        }
        self.timers.add(self.now + after, TimerKind::Foca(event));
    }
}

impl GossipNode {
    /// Runs `f` on foca with the node's [`Outbox`] as its runtime: the one place that runtime
    /// is set up.
    pub(super) fn with_foca<R>(
        &mut self,
        now: Instant,
        f: impl FnOnce(&mut Swim, &mut Outbox<'_>) -> R,
    ) -> R {
        let mut rt = Outbox {
            now,
            timers: &mut self.timers,
            transmits: &mut self.transmits,
            notes: &mut self.notes,
            downs: &mut self.foca_downs,
            stats: &mut self.stats,
        };
        f(&mut self.membership.foca, &mut rt)
    }

    /// Joins the cluster through `seeds` (gossip addresses). Announces to every seed now and
    /// keeps announcing, every `rejoin_interval`, to each seed that is not an active member:
    /// until one answers, and later whenever this node has lost them (a partition, a restart).
    pub fn join(&mut self, now: Instant, seeds: &[SocketAddr]) -> Result<(), Error> {
        self.tick(now);
        if self.membership.left {
            return Err(Error::Left);
        }
        self.membership.seeds = seeds
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
    pub(super) fn announce_to_missing_seeds(&mut self, now: Instant) {
        if !self.membership.connected {
            return self.announce_everywhere(now);
        }
        let active: HashSet<SocketAddr> = self.membership.foca.iter_members().map(|m| m.id().addr).collect();
        let missing: Vec<SocketAddr> =
            self.membership.seeds.iter().copied().filter(|a| !active.contains(a)).collect();
        self.announce_to(now, missing);
    }

    pub(super) fn announce_everywhere(&mut self, now: Instant) {
        let mut targets: BTreeSet<SocketAddr> = self.membership.seeds.iter().copied().collect();
        targets.extend(self.membership.foca.iter_members().map(|m| m.id().addr));
        self.announce_to(now, targets.into_iter().collect());
    }

    pub(super) fn announce_to(&mut self, now: Instant, targets: Vec<SocketAddr>) {
        for addr in targets {
            if let Err(e) = self.with_foca(now, |foca, rt| foca.announce(NodeId::seed(addr), rt)) {
                tracing::debug!(%addr, error = %e, "announce");
            }
        }
        self.process_notes(now);
    }

    /// Leaves the cluster for good: detaches from every network and publishes a leave record
    /// (peers delete this node's entries at once instead of hiding them), then tells the
    /// membership layer. Keep polling transmits and timers for a moment afterwards so the news
    /// goes out. A plain stop for a restart is [`stop_restarting`](Self::stop_restarting).
    pub fn leave(&mut self, now: Instant) -> Result<(), Error> {
        self.tick(now);
        if self.membership.left {
            return Ok(());
        }
        let nets: Vec<String> = self.networks.keys().filter(|n| *n != CLUSTER_NETWORK).cloned().collect();
        for n in nets {
            self.write_attachment(now, &n, false);
        }
        self.write_node_record(now, NodeStatus::Left);
        self.depart(now, false)
    }

    pub(super) fn process_notes(&mut self, now: Instant) {
        let mut resized = false;
        while !self.notes.is_empty() || !self.foca_downs.is_empty() {
            let notes = std::mem::take(&mut self.notes);
            for n in notes {
                resized |= matches!(n, OwnedNotification::MemberUp(_) | OwnedNotification::MemberDown(_));
                self.process_note(now, n);
            }
            for id in std::mem::take(&mut self.foca_downs) {
                self.recorded_down(now, id);
            }
        }
        if resized {
            self.scale_suspicion();
        }
    }

    /// Gives foca the suspicion timeout for the number of members it holds active now: a
    /// suspicion raised from here on runs that long (one already running keeps its deadline).
    pub(super) fn scale_suspicion(&mut self) {
        let members = self.membership.foca.num_members() + 1;
        let want = self.cfg.suspicion(members);
        if want == self.membership.foca_cfg.suspect_to_down_after {
            return;
        }
        let mut cfg = self.membership.foca_cfg.clone();
        cfg.suspect_to_down_after = want;
        match self.membership.foca.set_config(cfg.clone()) {
            Ok(()) => {
                tracing::debug!(members, suspicion = ?want, "suspicion timeout follows the cluster's size");
                self.membership.foca_cfg = cfg;
            }
            Err(e) => tracing::warn!(error = %e, "foca refused a new suspicion timeout"),
        }
    }

    /// foca recorded `id` as down. A member this node never had is failed (or left) now, and
    /// its entries are hidden; another life of this node's name at or above this one (foca
    /// declares it down for sharing this node's address, and peers refuse this life while it
    /// is older) makes this life move above it.
    fn recorded_down(&mut self, now: Instant, id: NodeId) {
        if id.name == self.id.name {
            let other_life = id.instance != self.id.instance || id.generation > self.id.generation;
            if other_life
                && id.generation >= self.id.generation
                && self.life.clash.is_none()
                && !self.membership.left
            {
                self.move_above(now, id.generation);
            }
            return;
        }
        if !self.membership.members.contains_key(&id.name) {
            self.member_gone(now, id);
        }
    }

    fn process_note(&mut self, now: Instant, n: OwnedNotification<NodeId>) {
        {
            match n {
                OwnedNotification::MemberUp(id) => self.member_up(now, id),
                OwnedNotification::Rename(old, new) => self.member_renamed(now, old, new),
                OwnedNotification::MemberDown(id) => self.member_down(now, id),
                OwnedNotification::Active => {
                    self.membership.connected = true;
                    self.events.push_back(Event::Connected(true));
                    // (Re)joined a cluster: catch up on every network right away.
                    let k = self.cfg.join_sync_peers;
                    for net in self.networks.values_mut() {
                        net.initial_syncs = net.initial_syncs.max(k);
                    }
                }
                OwnedNotification::Idle => {
                    self.membership.connected = false;
                    self.events.push_back(Event::Connected(false));
                }
                OwnedNotification::Rejoin(id) => {
                    tracing::info!(id = ?id, "declared down by the cluster; rejoining under a renewed identity");
                    self.id = id;
                    // foca reset itself without saying so: it is not connected, and until a peer
                    // learns the new identity nobody answers it (peers address the old one). An
                    // announce is accepted by address, so announce to every seed and every member.
                    if self.membership.connected {
                        self.membership.connected = false;
                        self.events.push_back(Event::Connected(false));
                    }
                    self.announce_everywhere(now);
                }
                OwnedNotification::Defunct => {
                    // Leaving makes foca declare itself down too; only the unexpected case warns.
                    if self.membership.left {
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
        self.life.records.get(name).filter(|r| r.status == NodeStatus::Left).map(|r| r.rec.generation)
    }

    pub(super) fn member_up(&mut self, now: Instant, id: NodeId) {
        if id.name == self.id.name {
            // Another identity of this node's name that foca believes alive: a live clash only
            // if it answers a direct probe (an earlier life still suspected does not).
            if id.addr != self.id.addr {
                self.probe(now, id.addr);
            }
            return;
        }
        if let Some(m) = self.membership.members.get(&id.name) {
            if m.id.life() > id.life() || (m.id == id && m.state == MemberState::Alive) {
                return;
            }
            // Two live nodes claim one name from two addresses: the one known first keeps it
            // (the other is refusing to run); its entries must not be hidden by the impostor.
            // A newer life of the same instance is the same node restarted at a new address:
            // its earlier life cannot be running any more.
            let restarted = id.instance == m.id.instance && id.life() > m.id.life();
            if m.state == MemberState::Alive && m.id.addr != id.addr && !restarted {
                tracing::warn!(holder = %m.id, other = %id, "two nodes claim one name; keeping the first");
                return;
            }
        }
        // A life that already left stays gone; only a newer life (a restart) comes back.
        if self.left_generation(&id.name).is_some_and(|g| g >= id.generation) {
            return;
        }
        self.membership.discovery.forget(&id.name);
        self.owner_known(&id.name);
        let was = self
            .membership
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
        if self.membership.foca.iter_members().any(|m| *m.id() == new) {
            self.member_up(now, new);
        } else {
            self.member_gone(now, new);
        }
    }

    /// A life of a member that foca knows only as down.
    pub(super) fn member_gone(&mut self, now: Instant, id: NodeId) {
        if id.name == self.id.name {
            self.own_name_down(now, &id);
            return;
        }
        let prev = self.membership.members.get(&id.name).map(|m| (m.id.clone(), m.state));
        match &prev {
            Some((known, _)) if known.life() > id.life() => return,
            Some((known, _)) if *known == id => return self.member_down(now, id),
            _ => {}
        }
        let (state, reason) = self.down_state(now, &id);
        self.membership.discovery.forget(&id.name);
        self.owner_known(&id.name);
        self.membership.members.insert(id.name.clone(), Member { id: id.clone(), state, since: now });
        self.refresh_peer(&id.name);
        if state == MemberState::Failed {
            self.stats.owners_hidden_failed += 1;
            self.set_hidden(now, &id.name, true);
        }
        if matches!(prev, Some((_, MemberState::Alive))) {
            tracing::info!(member = %id, ?reason, "member down");
            self.events.push_back(Event::MemberDown { id, reason });
        }
    }

    /// What `id` going down makes it: left (its leave record says so), restarting (its record
    /// announced a restart: a grace timer starts), or failed.
    fn down_state(&mut self, now: Instant, id: &NodeId) -> (MemberState, DownReason) {
        if self.left_generation(&id.name).is_some_and(|g| g >= id.generation) {
            (MemberState::Left, DownReason::Left)
        } else if self.announced_restart(id) {
            self.timers.add(now + self.cfg.restart_grace, TimerKind::Grace(id.name.clone()));
            (MemberState::Restarting, DownReason::Restarting)
        } else {
            (MemberState::Failed, DownReason::Failed)
        }
    }

    fn member_down(&mut self, now: Instant, id: NodeId) {
        if id.name == self.id.name {
            return self.own_name_down(now, &id);
        }
        if !self.membership.members.get(&id.name).is_some_and(|m| m.id == id && m.state == MemberState::Alive)
        {
            return;
        }
        let (state, reason) = self.down_state(now, &id);
        let m = self.membership.members.get_mut(&id.name).expect("checked");
        m.state = state;
        m.since = now;
        self.refresh_peer(&id.name);
        tracing::info!(member = %id, ?reason, "member down");
        if state == MemberState::Failed {
            self.stats.owners_hidden_failed += 1;
            self.set_hidden(now, &id.name, true);
        }
        let name = id.name.clone();
        self.events.push_back(Event::MemberDown { id, reason });
        // A life of this name at another address that was held back while this one was alive
        // (a node that moved) takes over now.
        let successor = self.membership.foca.iter_members().map(|m| m.id().clone()).find(|m| m.name == name);
        if let Some(next) = successor {
            self.member_up(now, next);
        }
    }

    /// Hides (owner failed) or restores (owner back) every node-owned entry of `owner`.
    pub(super) fn set_hidden(&mut self, now: Instant, owner: &str, hidden: bool) {
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
                    if let Some(feed) = &mut net.touched {
                        feed.push((table.clone(), key.clone()));
                    }
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
                            ltime: e.ltime,
                            prev,
                            value,
                        }));
                    }
                }
            }
        }
    }
}

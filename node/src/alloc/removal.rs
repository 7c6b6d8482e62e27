//! `weft node rm`: removing a dead node's instance for good.
//!
//! A dead node's shares stay its own until an operator removes it. The node that runs
//! `node rm NAME[@INSTANCE]` writes a removal record in the cluster table
//! [`REMOVED_TABLE`] (`name@instance` -> [`NodeRemoval`]) and becomes the heir of every ring it
//! holds in which the removed instance owns blocks (the ring's removal record wins over anything
//! the removed node writes later); for rings of networks the remover is not attached to, the
//! lowest-named live node attached there inherits, on seeing the record. The gossip core
//! deletes the removed life's node-owned entries everywhere
//! ([`GossipNode::remove_node`]).
//!
//! An heir hands out nothing from what it inherited for `reuse_after` (the removed host's
//! containers may still hold those addresses). `--force` removes an instance membership still
//! sees alive: its heirs hold the inherited blocks until it is down or confirms its teardown.
//! A removed instance that comes back (or is still running) deletes its endpoints, allocates
//! nothing more, says so at error level, and confirms in its removal record.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use weft_gossip::{CLUSTER_NETWORK, GossipNode, MemberState, TableEvent};
use weft_ipam::Ring;
use weft_ipam::ring::{Name, member_name};

use super::{Allocator, ENDPOINT_TABLE, EP_PREFIX, RingKey, json, member_name_instance, member_of};
use crate::error::AgentError;

/// The cluster table of removed node instances: key `name@instance`.
pub const REMOVED_TABLE: &str = "removed_nodes";
/// The store key saying this node's instance was removed (by whom).
pub const REMOVED_KEY: &str = "removed";
/// Store keys of the removal records this node knows (`removals/<name@instance>`): cluster
/// tables live in memory, so every node keeps them and writes back those the cluster lost.
pub const REMOVALS_PREFIX: &str = "removals/";
/// How often heirs look at removal records (inheritances to take, fences to lift).
const REMOVAL_CHECK_MS: u64 = 1_000;

/// A removal record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRemoval {
    /// The removed instance, `name@instance`.
    pub node: String,
    /// Who removed it, `name@instance`.
    pub by: String,
    /// Removed while membership saw it alive (`--force`): heirs hold what it owned until it is
    /// down or has torn down.
    pub force: bool,
    /// The removed instance saw the record, deleted its endpoints and stopped allocating.
    #[serde(default)]
    pub torn_down: bool,
}

/// Removal records order by teardown first: a confirmation is never undone by a later removal
/// of the same instance.
#[derive(Debug)]
pub struct RemovalMerge;

impl weft_gossip::MergeRule for RemovalMerge {
    fn compare(
        &self,
        a: &weft_gossip::VersionRef<'_>,
        b: &weft_gossip::VersionRef<'_>,
    ) -> std::cmp::Ordering {
        let torn = |v: &weft_gossip::VersionRef<'_>| {
            serde_json::from_slice::<NodeRemoval>(v.value).is_ok_and(|r| r.torn_down)
        };
        torn(a).cmp(&torn(b))
    }
}

/// What `node rm` did to one instance (the reply).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovedNode {
    /// `name@instance`.
    pub node: String,
    /// Its state as membership saw it (`failed`, `left`, `unknown`, ... or `alive` with --force).
    pub state: String,
    /// Rings whose blocks came to this node.
    pub rings: Vec<InheritedRing>,
    /// Its entries were deleted cluster-wide now (not when its record is another instance's,
    /// or it left already, or it may still run).
    pub entries_deleted: bool,
    /// Its blocks are held until it is down or has torn down (`--force` on a live instance).
    pub fenced: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InheritedRing {
    pub network: String,
    pub ring: String,
    pub blocks: u64,
}

/// The reply to `node rm`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRmReply {
    pub removed: Vec<RemovedNode>,
    /// Instances left alone, each with why.
    pub skipped: Vec<String>,
}

fn state_word(s: Option<MemberState>) -> &'static str {
    match s {
        Some(MemberState::Alive) => "alive",
        Some(MemberState::Suspect) => "suspect",
        Some(MemberState::Restarting) => "restarting",
        Some(MemberState::Failed) => "failed",
        Some(MemberState::Left) => "left",
        None => "unknown",
    }
}

/// What this node knows of one instance `name@instance`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// Membership's state of it.
    Member(MemberState),
    /// Another instance of its name is the one membership or the node records know: this one
    /// was reinstalled over.
    Superseded,
    /// Its node record says it left, or none is left (gone longer than `reap_after`).
    Gone,
    /// A live node record of it that membership does not know (yet).
    Unknown,
}

impl Seen {
    fn word(self) -> &'static str {
        match self {
            Seen::Member(s) => state_word(Some(s)),
            Seen::Superseded => "superseded by a newer instance",
            Seen::Gone => "gone",
            Seen::Unknown => "unknown",
        }
    }

    /// It may be running: never removed without --force, its fence never lifted.
    fn maybe_running(self) -> bool {
        matches!(
            self,
            Seen::Member(MemberState::Alive | MemberState::Suspect | MemberState::Restarting) | Seen::Unknown
        )
    }
}

fn seen(gossip: &GossipNode, m: &str) -> Seen {
    let name = member_name(m);
    let member = gossip.members().into_iter().find(|x| &*x.id.name == name);
    if let Some(x) = &member {
        if *member_of(&x.id) == *m {
            return Seen::Member(x.state);
        }
        // Another instance of the name runs: this one was reinstalled over.
        if matches!(x.state, MemberState::Alive | MemberState::Suspect | MemberState::Restarting) {
            return Seen::Superseded;
        }
    }
    let Some(e) = gossip.entry(CLUSTER_NETWORK, weft_gossip::NODES_TABLE, name) else {
        // No record left (gone longer than reap_after); a dead other instance in membership
        // does not say whether this one runs.
        return if member.is_some() { Seen::Unknown } else { Seen::Gone };
    };
    match weft_gossip::NodeRecord::decode(&e.value) {
        Ok(r) if format!("{:016x}", r.instance) != member_name_instance(m) => Seen::Unknown,
        Ok(r) if r.status == weft_gossip::NodeStatus::Left => Seen::Gone,
        _ if matches!(e.state, weft_gossip::EntryState::Tombstone { .. }) => Seen::Gone,
        _ => Seen::Unknown,
    }
}

impl Allocator {
    /// Why this node allocates nothing, if it was removed.
    pub fn removed_by(&self) -> Option<&str> {
        self.removed.as_deref()
    }

    pub(crate) fn check_not_removed(&self) -> Result<(), AgentError> {
        match &self.removed {
            Some(by) => Err(AgentError::Removed(format!(
                "this node's instance {} was removed from the cluster by {by} (weft node rm): it allocates \
                 nothing more; to rejoin, start it with an empty data dir (a new instance)",
                self.me
            ))),
            None => Ok(()),
        }
    }

    /// `weft node rm NAME[@INSTANCE] [--force]`: see the module docs.
    pub fn remove_node(
        &mut self,
        gossip: &mut GossipNode,
        now: Instant,
        target: &str,
        force: bool,
    ) -> Result<NodeRmReply, AgentError> {
        self.check_not_removed()?;
        if !(gossip.has_synced(CLUSTER_NETWORK) || force && self.alone(gossip)) {
            return Err(AgentError::NodeAlive(
                "this node has not synced the cluster's tables yet: it cannot tell which instances are down; \
                 retry in a few seconds (--force if it is alone by design)"
                    .into(),
            ));
        }
        let (name, prefix) = match target.rsplit_once('@') {
            Some((n, i)) => (n, Some(i.to_ascii_lowercase())),
            None => (target, None),
        };
        if name.is_empty()
            || prefix.as_ref().is_some_and(|p| p.is_empty() || !p.chars().all(|c| c.is_ascii_hexdigit()))
        {
            return Err(AgentError::BadName(format!(
                "node {target:?}: expected NAME or NAME@INSTANCE (hex)"
            )));
        }
        // Every instance of the name this node knows: ring owners, seed owners, membership.
        let mut known: BTreeSet<Name> = BTreeSet::new();
        for r in self.rings.values() {
            let st = r.state();
            known.extend(st.ownership().into_iter().map(|(_, _, o)| o).filter(|o| member_name(o) == name));
            if let Some(seed) = &st.seed {
                known.extend(seed.owners.iter().filter(|o| member_name(o) == name).cloned());
            }
        }
        if let Some(m) = gossip.members().into_iter().find(|m| &*m.id.name == name) {
            known.insert(member_of(&m.id));
        }
        let mut candidates: Vec<Name> = known
            .into_iter()
            .filter(|k| prefix.as_ref().is_none_or(|p| member_name_instance(k).starts_with(p.as_str())))
            .collect();
        // A whole instance id this node has no trace of: its shares may be in rings this node
        // does not hold (the record makes the nodes attached there inherit them).
        if candidates.is_empty()
            && let Some(p) = prefix.as_ref().filter(|p| p.len() == 16)
        {
            candidates.push(Name::from(format!("{name}@{p}")));
        }
        if candidates.is_empty() {
            return Err(AgentError::NoSuchNode(format!("{target:?}")));
        }
        if prefix.is_some() && candidates.len() > 1 {
            let all: Vec<String> = candidates.iter().map(|c| c.to_string()).collect();
            return Err(AgentError::BadName(format!(
                "node {target:?} is ambiguous ({}): give more of the instance",
                all.join(", ")
            )));
        }
        let mut reply = NodeRmReply::default();
        for m in candidates {
            if m == self.me {
                if prefix.is_some() {
                    return Err(AgentError::BadName(format!(
                        "{m} is this node itself (weft leave takes a node out of the cluster)"
                    )));
                }
                reply.skipped.push(format!("{m}: this node itself"));
                continue;
            }
            let state = seen(gossip, &m);
            let live = state.maybe_running();
            if live && !force {
                reply.skipped.push(format!(
                    "{m}: it is {}; node rm removes only instances that are down (--force removes one that may \
                     still be running)",
                    state.word()
                ));
                continue;
            }
            let rec =
                NodeRemoval { node: m.to_string(), by: self.me.to_string(), force: live, torn_down: false };
            if let Err(e) = gossip.put_entry(now, CLUSTER_NETWORK, REMOVED_TABLE, &m, Bytes::from(json(&rec)))
            {
                tracing::warn!(node = %m, error = %e, "removal record not written");
            }
            self.ops.push((format!("{REMOVALS_PREFIX}{m}"), Some(json(&rec))));
            self.removals.insert(m.to_string(), rec);
            let rings = self.inherit(gossip, now, &m);
            let entries_deleted = !live && self.delete_entries_of(gossip, now, &m);
            tracing::warn!(node = %m, state = state.word(), rings = rings.len(), "node removed");
            reply.removed.push(RemovedNode {
                node: m.to_string(),
                state: state.word().into(),
                rings,
                entries_deleted,
                fenced: live,
            });
        }
        self.adopt_inherited(gossip);
        if reply.removed.is_empty() {
            if reply.skipped.len() == 1 && reply.skipped[0].ends_with("this node itself") {
                return Err(AgentError::BadName(format!(
                    "{} is this node itself (weft leave takes a node out of the cluster)",
                    self.me
                )));
            }
            return Err(AgentError::NodeAlive(reply.skipped.join("; ")));
        }
        self.progress = true;
        Ok(reply)
    }

    /// Deletes a removed life's node-owned entries cluster-wide (the gossip core's tombstone of
    /// its node record). Whether it did.
    fn delete_entries_of(&mut self, gossip: &mut GossipNode, now: Instant, m: &str) -> bool {
        let Ok(instance) = u64::from_str_radix(member_name_instance(m), 16) else { return false };
        match gossip.remove_node(now, member_name(m), instance) {
            Ok(done) => done,
            Err(e) => {
                tracing::debug!(node = %m, error = %e, "entries of the removed node not deleted");
                false
            }
        }
    }

    /// Takes over the blocks `m` owns in the rings this node should inherit: every ring it
    /// holds when it removed `m` itself; otherwise only rings of networks the remover is not
    /// attached to, where the lowest-named live attached node inherits.
    fn inherit(
        &mut self,
        gossip: &GossipNode,
        now: Instant,
        m: &Name,
    ) -> Vec<crate::alloc::removal::InheritedRing> {
        let Some(rec) = self.removals.get(&**m).cloned() else { return Vec::new() };
        let mine = *rec.by == *self.me;
        let fence = std::cell::OnceCell::new();
        let now_ms = self.ms(now);
        let mut out = Vec::new();
        let keys: Vec<RingKey> = self.rings.keys().cloned().collect();
        for key in keys {
            // A ring is looked at until the removal is on its record or `m` owns nothing in
            // it (a removed instance never gains blocks): not every second for ever.
            if self.inherit_checked.get(&key).is_some_and(|done| done.contains(&**m)) {
                continue;
            }
            let r = &self.rings[&key];
            if r.state().removed.contains_key(m)
                || !r.state().ownership().iter().any(|(_, _, o)| o == m)
                || r.removed_by().is_some()
            {
                // Only once the ring's table has synced: before, `m`'s claims may be on their way.
                if r.is_seeded() && (gossip.has_synced(&key.0) || gossip.network_peer_count(&key.0) == 0) {
                    self.inherit_checked.entry(key.clone()).or_default().insert(m.to_string());
                }
                continue;
            }
            if !mine {
                if key.0 == CLUSTER_NETWORK {
                    continue; // the remover holds every cluster ring
                }
                let peers = gossip.network_peers(&key.0);
                let remover = member_name(&rec.by);
                if peers.iter().any(|p| &*p.name == remover) {
                    continue;
                }
                // Not a node removed itself (one removed with --force may still run).
                let lowest = peers
                    .iter()
                    .filter(|p| *p.name != *member_name(m) && !self.removals.contains_key(&*member_of(p)))
                    .map(|p| &*p.name)
                    .chain(std::iter::once(&*self.name))
                    .min();
                if lowest != Some(&*self.name) {
                    continue;
                }
            }
            let fence = *fence.get_or_init(|| rec.force && !rec.torn_down && seen(gossip, m).maybe_running());
            let r = self.rings.get_mut(&key).expect("listed");
            r.advance(now_ms);
            match r.transfer_dead(m, fence, true) {
                Ok(blocks) => {
                    if fence {
                        r.fence(m);
                    }
                    tracing::info!(network = %key.0, ring = %key.1, node = %m, blocks, "inherited the blocks of a removed node");
                    out.push(InheritedRing { network: key.0.clone(), ring: key.1.clone(), blocks });
                }
                Err(e) => {
                    tracing::warn!(network = %key.0, ring = %key.1, node = %m, error = %e, "cannot inherit")
                }
            }
        }
        out
    }

    /// A removal record arrived (or changed).
    pub(super) fn removal_event(&mut self, gossip: &mut GossipNode, now: Instant, t: &TableEvent) {
        let Some(v) = &t.value else {
            self.removals.remove(&t.key);
            return;
        };
        let Ok(rec) = serde_json::from_slice::<NodeRemoval>(v) else {
            self.stats.bad_messages += 1;
            return;
        };
        if rec.node != t.key {
            self.stats.bad_messages += 1;
            return;
        }
        if self.removals.get(&t.key) != Some(&rec) {
            self.ops.push((format!("{REMOVALS_PREFIX}{}", t.key), Some(json(&rec))));
        }
        self.removals.insert(t.key.clone(), rec.clone());
        self.removal_check_at = 0;
        if *t.key == *self.me {
            self.tear_down(gossip, now, &rec);
        }
    }

    /// A ring says this instance was removed from it (its removal record in the cluster table
    /// may be lost): the same as the record.
    pub(super) fn removed_from_ring(&mut self, gossip: &mut GossipNode, now: Instant, by: &str) {
        let rec = self.removals.get(&*self.me).cloned().unwrap_or_else(|| NodeRemoval {
            node: self.me.to_string(),
            by: by.to_string(),
            force: false,
            torn_down: false,
        });
        self.removals.insert(rec.node.clone(), rec.clone());
        self.tear_down(gossip, now, &rec);
    }

    /// This instance was removed: its endpoints go, nothing more is allocated, the record says
    /// it tore down.
    fn tear_down(&mut self, gossip: &mut GossipNode, now: Instant, rec: &NodeRemoval) {
        let first = self.removed.is_none();
        if first {
            self.removed = Some(rec.by.clone());
            self.ops.push((REMOVED_KEY.into(), Some(rec.by.clone().into_bytes())));
            let eps: Vec<(String, String)> = self.endpoints.keys().cloned().collect();
            for (nid, id) in &eps {
                self.ops.push((format!("{EP_PREFIX}{nid}/{id}"), None));
                if gossip.is_attached(nid)
                    && let Err(e) = gossip.delete_entry(now, nid, ENDPOINT_TABLE, id)
                {
                    tracing::debug!(endpoint = %id, error = %e, "endpoint of a removed node not deleted");
                }
            }
            self.endpoints.clear();
            tracing::error!(
                by = %rec.by,
                endpoints = eps.len(),
                "THIS NODE WAS REMOVED from the cluster (weft node rm {}): its endpoints are deleted and it \
                 allocates nothing more; to rejoin, stop it and start it with an empty data dir (a new instance)",
                self.me
            );
            self.progress = true;
        }
        if !rec.torn_down {
            let done = NodeRemoval { torn_down: true, ..rec.clone() };
            self.ops.push((format!("{REMOVALS_PREFIX}{}", done.node), Some(json(&done))));
            self.removals.insert(done.node.clone(), done.clone());
            if let Err(e) =
                gossip.put_entry(now, CLUSTER_NETWORK, REMOVED_TABLE, &done.node, Bytes::from(json(&done)))
            {
                tracing::debug!(error = %e, "teardown not confirmed");
            }
        }
    }

    /// Timers of removals: inheritances this node should take (rings of networks the remover
    /// is not attached to, rings attached since), fences to lift, a removal of this very
    /// instance learned while booting.
    pub(super) fn removal_tick(&mut self, gossip: &mut GossipNode, now: Instant) {
        if self.removals.is_empty() && !self.rings.values().any(Ring::has_fence) {
            return;
        }
        let now_ms = self.ms(now);
        if now_ms < self.removal_check_at {
            return;
        }
        self.removal_check_at = now_ms + REMOVAL_CHECK_MS;
        // Records the cluster lost (every holder restarted): written back from the store, once
        // the cluster table has synced.
        if self.removals_unpublished && gossip.has_synced(CLUSTER_NETWORK) {
            self.removals_unpublished = false;
            for (m, rec) in &self.removals {
                if gossip.entry(CLUSTER_NETWORK, REMOVED_TABLE, m).is_none()
                    && let Err(e) =
                        gossip.put_entry(now, CLUSTER_NETWORK, REMOVED_TABLE, m, Bytes::from(json(rec)))
                {
                    tracing::debug!(node = %m, error = %e, "removal record not written back");
                }
            }
        }
        if let Some(rec) = self.removals.get(&*self.me).cloned() {
            self.tear_down(gossip, now, &rec);
        }
        // Who is down, and who inherits, are membership's judgements: not before this life
        // has joined and synced the cluster's tables (right after a restart it knows nobody).
        if self.removed.is_some() || !self.caught_up(gossip, now) {
            return;
        }
        let removed: Vec<String> = self.removals.keys().cloned().collect();
        for m in removed {
            if !self.inherit(gossip, now, &Name::from(m.as_str())).is_empty() {
                self.adopt_due = true;
            }
        }
        if std::mem::take(&mut self.adopt_due) {
            self.adopt_inherited(gossip);
        }
        // A fence ends when the instance is down or tore down; a `reuse_after` hold follows
        // either way (a teardown confirmed is not the data plane everywhere forgetting it).
        let until = now_ms.saturating_add(self.cfg.reuse_after.as_millis() as u64);
        let mut lift: BTreeSet<Name> = BTreeSet::new();
        for r in self.rings.values().filter(|r| r.has_fence()) {
            for f in r.fenced_from() {
                if !lift.contains(&f)
                    && (self.removals.get(&*f).is_some_and(|x| x.torn_down)
                        || !seen(gossip, &f).maybe_running())
                {
                    lift.insert(f);
                }
            }
        }
        for f in lift {
            tracing::info!(node = %f, "a removed node is down or tore down: the blocks it owned are no longer fenced");
            for r in self.rings.values_mut() {
                r.lift_hold(&f, until);
            }
            if !self.removals.get(&*f).is_some_and(|x| x.torn_down) {
                self.delete_entries_of(gossip, now, &f);
            }
        }
    }
}

/// Decodes removal records for dumps.
#[derive(Debug)]
pub struct Removals;

impl weft_gossip::TableWatcher for Removals {
    fn decode_table_entry(&self, _: &str, key: &str, value: &[u8]) -> (String, BTreeMap<String, String>) {
        let mut m = BTreeMap::new();
        if let Ok(r) = serde_json::from_slice::<NodeRemoval>(value) {
            m.insert("removed by".into(), r.by);
            m.insert("forced".into(), r.force.to_string());
            m.insert("torn down".into(), r.torn_down.to_string());
        }
        (key.to_string(), m)
    }
}

//! Network attachments: attaching and detaching this node, and the index of every node's
//! attachment records (the [`ATTACH_TABLE`]) with its consequences.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::discovery::AttachRecord;
use crate::error::Error;
use crate::event::{Event, TableEvent, TableEventKind};
use crate::store::{Entry, MergeRule, NetState, TableKind, VersionRef, fingerprint};

use super::{ATTACH_TABLE, CLUSTER_NETWORK, GossipNode, MAX_NAME_LEN, check_name};

/// How long a restarted node waits before detaching networks only a previous life attached.
const SELF_DETACH_GRACE: Duration = Duration::from_secs(10);

/// The index of attachment records and what derives from it.
#[derive(Debug, Default)]
pub(super) struct Attachments {
    /// Per network, per node: the latest attachment record.
    pub(super) index: BTreeMap<String, BTreeMap<Arc<str>, Attachment>>,
    /// Nodes attached per network, this one included when attached.
    pub(super) attached_count: BTreeMap<String, usize>,
    /// Networks a previous life of this node attached and this one did not, with when to
    /// detach them (see `on_attachment`).
    pub(super) stale_self: BTreeMap<String, Instant>,
}

/// A network attachment record, as indexed from [`ATTACH_TABLE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Attachment {
    pub(super) generation: u64,
    pub(super) ltime: u64,
    pub(super) attached: bool,
}

/// Attachment records order by the writer's generation first, so a restarted node that lost its
/// Lamport clock still re-attaches.
#[derive(Debug)]
pub(super) struct AttachRule;

impl MergeRule for AttachRule {
    fn compare(&self, a: &VersionRef<'_>, b: &VersionRef<'_>) -> Ordering {
        let generation =
            |v: &VersionRef<'_>| AttachRecord::decode(v.value).map(|r| r.generation).unwrap_or(0);
        generation(a).cmp(&generation(b))
    }
}

pub(super) fn attach_key(network: &str, node: &str) -> String {
    format!("{network} {node}")
}

impl GossipNode {
    /// Attaches this node to `network`: peers learn it cluster-wide, and the node syncs the
    /// network's tables with a few attached peers at once. Attaching twice is a no-op.
    pub fn join_network(&mut self, now: Instant, network: &str) -> Result<(), Error> {
        self.tick(now);
        self.check_live()?;
        check_name("network id", network, MAX_NAME_LEN)?;
        if self.networks.contains_key(network) {
            return Ok(());
        }
        let mut net = NetState::new(self.cfg.join_sync_peers, self.hash_seed);
        net.touched = self.net_changes.as_ref().map(|_| Vec::new());
        self.networks.insert(network.to_string(), net);
        self.record_network_change(network, true);
        self.write_attachment(now, network, true);
        // Catch up at once, not at the next gossip round: a node joining a populated network
        // has its tables one round trip later (peers answer a sync whoever asks).
        if !self.membership.left {
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
        self.record_network_change(network, false);
        for (table, entries) in net.tables {
            for (key, e) in entries {
                if let Some(v) = e.visible() {
                    let ev = TableEvent {
                        kind: TableEventKind::Delete,
                        network: network.to_string(),
                        table: table.clone(),
                        key,
                        owner: e.owner.to_string(),
                        ltime: e.ltime,
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

    /// Writes this node's attachment record for `network`; a detach is a tombstone (reaped
    /// after `reap_after` like any other) that still says which life detached.
    pub(super) fn write_attachment(&mut self, now: Instant, network: &str, attached: bool) {
        let value = AttachRecord { generation: self.id.generation, attached, addr: self.id.addr }.encode();
        let key = attach_key(network, &self.id.name);
        let _ = self.write_local_version(now, CLUSTER_NETWORK, ATTACH_TABLE, &key, value, !attached);
    }

    /// Applies a stored attachment record (own or remote; `deleted` if it is a tombstone) to
    /// the index and its consequences.
    pub(super) fn on_attachment(
        &mut self,
        now: Instant,
        key: &str,
        ltime: u64,
        deleted: bool,
        r: AttachRecord,
    ) {
        let Some((network, node)) = key.split_once(' ') else { return };
        let AttachRecord { generation, attached, addr: _ } = r;
        let rec = Attachment { generation, ltime, attached: attached && !deleted };
        let by = match self.attach.index.get_mut(network) {
            Some(by) => by,
            None => self.attach.index.entry(network.to_string()).or_default(),
        };
        let node: Arc<str> = by.get_key_value(node).map_or_else(|| Arc::from(node), |(k, _)| k.clone());
        let prev = by.insert(node.clone(), rec);
        let was_attached = prev.is_some_and(|p| p.attached);
        if was_attached != rec.attached {
            let count = self.attach.attached_count.entry(network.to_string()).or_default();
            *count = if rec.attached { *count + 1 } else { count.saturating_sub(1) };
        }
        self.refresh_peer(&node);
        if rec.attached && *node != *self.id.name && !self.membership.members.contains_key(&node) {
            self.note_unknown_owner(now, &node);
        }
        if *node == *self.id.name {
            // A previous life of this node attached a network this life has not: say it left,
            // or peers would keep it (and its old entries) attached forever.
            // Not at once: until a grace period has passed without anyone else claiming this
            // node's name, the record may be another node's (a misconfigured twin).
            if rec.attached
                && generation < self.id.generation
                && !self.networks.contains_key(network)
                && !self.membership.left
            {
                self.attach.stale_self.entry(network.to_string()).or_insert(now + SELF_DETACH_GRACE);
            }
            return;
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
        // Detached: its node-owned entries written before go.
        if self.networks.contains_key(network) {
            self.remove_owned_before(now, network, &node, rec.ltime);
        }
    }

    /// A reaped attachment tombstone leaves the index.
    pub(super) fn forget_attachment(&mut self, key: &str) {
        let Some((network, node)) = key.split_once(' ') else { return };
        let Some(by) = self.attach.index.get_mut(network) else { return };
        let Some((name, a)) = by.remove_entry(node) else { return };
        if a.attached
            && let Some(c) = self.attach.attached_count.get_mut(network)
        {
            *c = c.saturating_sub(1);
        }
        if by.is_empty() {
            self.attach.index.remove(network);
        }
        self.refresh_peer(&name);
    }

    /// Turns every node-owned entry of `owner` in `network` written before `ltime` into a
    /// tombstone (the owner detached or left after writing it).
    pub(super) fn remove_owned_before(&mut self, now: Instant, network: &str, owner: &str, ltime: u64) {
        let doomed = self.owned_entries(network, owner, |e| e.ltime < ltime);
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
                    ltime: old.ltime,
                    prev: Some(v.clone()),
                    value: None,
                };
                self.emit(ev);
            }
        }
    }

    /// (table, key) of every undeleted entry of `owner` in `network`'s node-owned tables for
    /// which `keep` holds.
    pub(super) fn owned_entries(
        &self,
        network: &str,
        owner: &str,
        keep: impl Fn(&Entry) -> bool,
    ) -> Vec<(String, String)> {
        let Some(net) = self.networks.get(network) else { return Vec::new() };
        let mut out = Vec::new();
        for (table, entries) in &net.tables {
            if self.table_kind(table, None) == TableKind::Cluster {
                continue;
            }
            for (key, e) in entries {
                if *e.owner == *owner && !e.deleted && !e.cluster && keep(e) {
                    out.push((table.clone(), key.clone()));
                }
            }
        }
        out
    }

    /// The Lamport time after which `owner` is gone from `network` (detached, or left the
    /// cluster), if it is.
    pub(super) fn detached_since(&self, network: &str, owner: &str) -> Option<u64> {
        let detached = self
            .attach
            .index
            .get(network)
            .and_then(|by| by.get(owner))
            .filter(|a| !a.attached)
            .map(|a| a.ltime);
        let left = self
            .life
            .records
            .get(owner)
            .filter(|r| r.status == crate::discovery::NodeStatus::Left)
            .map(|r| r.ltime);
        detached.max(left)
    }

    /// Every attachment under this node's name of an earlier life to a network this life is
    /// not on: to be detached after the grace.
    pub(super) fn mark_stale_self_attachments(&mut self, now: Instant) {
        let me = self.id.name.clone();
        let stale: Vec<String> = self
            .attach
            .index
            .iter()
            .filter(|(net, by)| {
                by.get(&*me).is_some_and(|a| a.attached && a.generation < self.id.generation)
                    && !self.networks.contains_key(*net)
            })
            .map(|(net, _)| net.clone())
            .collect();
        for network in stale {
            self.attach.stale_self.entry(network).or_insert(now + SELF_DETACH_GRACE);
        }
    }

    pub(super) fn detach_stale_self_attachments(&mut self, now: Instant) {
        if self.attach.stale_self.is_empty() || self.membership.left {
            return;
        }
        if self.membership.name_contested {
            // The records may be the other live node's: wait until the contest is over.
            return;
        }
        let due: Vec<String> =
            self.attach.stale_self.iter().filter(|(_, at)| **at <= now).map(|(n, _)| n.clone()).collect();
        for network in due {
            self.attach.stale_self.remove(&network);
            let still = self
                .attach
                .index
                .get(&network)
                .and_then(|by| by.get(&self.id.name))
                .is_some_and(|a| a.attached && a.generation < self.id.generation);
            if still && !self.networks.contains_key(&network) {
                self.write_attachment(now, &network, false);
            }
        }
    }
}

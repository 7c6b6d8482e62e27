//! Tables: registering them, the write commands, and applying a version (local or remote) with
//! its consequences: the event queue, relays, watcher events.

use std::cmp::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::discovery::{AttachRecord, NodeRecord, NodeStatus};
use crate::error::Error;
use crate::event::{Event, MemberState, TableEvent, TableEventKind};
use crate::queue::Pushed;
use crate::store::{
    Entry, TableKind, TableSpec, VersionRef, compare_versions, fingerprint, keyhash, reap_deadline,
};
use crate::timers::TimerKind;
use crate::wire::{self, FLAG_CLUSTER, FLAG_DELETED, WireEntry};

use super::{
    ATTACH_TABLE, CLUSTER_NETWORK, GossipNode, MAX_KEY_LEN, MAX_NAME_LEN, NODES_TABLE, RESERVED_TABLE_PREFIX,
    check_name,
};

/// Where a version came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Origin {
    Local,
    Gossip,
    /// Learned through anti-entropy; relayed on like gossip news.
    Sync,
    /// Learned through anti-entropy beyond the relay budget: applied, not relayed.
    Repair,
}

impl GossipNode {
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
                            ltime: e.ltime,
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

    pub(super) fn table_kind(&self, table: &str, wire_cluster: Option<bool>) -> TableKind {
        match self.specs.get(table) {
            Some(s) => s.kind,
            None if wire_cluster == Some(true) => TableKind::Cluster,
            None => TableKind::NodeOwned,
        }
    }

    pub(super) fn check_live(&self) -> Result<(), Error> {
        if self.membership.left { Err(Error::Left) } else { Ok(()) }
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

    /// Creates the entry, or replaces its value if it is live (networkdb's diagnostic write,
    /// and a load).
    pub fn put_entry(
        &mut self,
        now: Instant,
        network: &str,
        table: &str,
        key: &str,
        value: Bytes,
    ) -> Result<(), Error> {
        let live = self.live(network, table, key);
        self.command_write(now, network, table, key, Some(value), live)
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
    pub(super) fn write_local(
        &mut self,
        now: Instant,
        network: &str,
        table: &str,
        key: &str,
        value: Option<Bytes>,
    ) -> bool {
        let deleted = value.is_none();
        // A tombstone in a table with a merge rule carries the value it deletes, so the rule
        // ranks it like that value and the Lamport time decides.
        let value = value.unwrap_or_else(|| {
            let has_rule = self.specs.get(table).is_some_and(|s| s.merge.is_some());
            let existing = self.networks.get(network).and_then(|n| n.get(table, key));
            existing.filter(|_| has_rule).map(|e| e.value.clone()).unwrap_or_default()
        });
        self.write_local_version(now, network, table, key, value, deleted)
    }

    /// [`write_local`](Self::write_local) with the value a tombstone carries given (the core's
    /// own records: a leave or detach still says which life it was).
    pub(super) fn write_local_version(
        &mut self,
        now: Instant,
        network: &str,
        table: &str,
        key: &str,
        value: Bytes,
        deleted: bool,
    ) -> bool {
        let existing = self.networks.get(network).and_then(|n| n.get(table, key));
        let existing_ltime = existing.map(|e| e.ltime).unwrap_or(0);
        self.clock = self.clock.max(existing_ltime) + 1;
        let cluster = self.table_kind(table, None) == TableKind::Cluster;
        let mut flags = if cluster { FLAG_CLUSTER } else { 0 };
        if deleted {
            flags |= FLAG_DELETED;
        }
        let reap_in_ms =
            if deleted { self.cfg.reap_after.as_millis().min(u32::MAX as u128) as u32 } else { 0 };
        let w = WireEntry {
            table: table.to_string(),
            key: key.to_string(),
            owner: self.id.name.to_string(),
            ltime: self.clock,
            flags,
            reap_in_ms,
            value,
        };
        if let Some(net) = self.networks.get_mut(network) {
            net.own_written.insert(keyhash(table, key));
        }
        self.apply(now, network, w, Origin::Local)
    }

    /// Applies one version (local or remote). Returns whether it was newer than what the node
    /// held.
    pub(super) fn apply(&mut self, now: Instant, network: &str, w: WireEntry, origin: Origin) -> bool {
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
        if origin != Origin::Local && network == CLUSTER_NETWORK {
            if (w.table == NODES_TABLE || w.table == ATTACH_TABLE)
                && self.refuse_expired(&w.table, &w.owner, &w.value)
            {
                return false;
            }
            // A record of another life of this node's name matters even when this life's own
            // record wins over it.
            if w.table == NODES_TABLE
                && *w.key == *self.id.name
                && let Ok(rec) = NodeRecord::decode(&w.value)
            {
                let status = if deleted { NodeStatus::Left } else { rec.status };
                self.another_life_of_mine(now, rec, status);
            }
        }
        // Hidden is this node's own judgement of the owner (failed, or unknown for too long),
        // never the sender's: a stale peer must not hide a live owner.
        let own_name = *w.owner == *self.id.name;
        // A member gone for good here (its records expired): its entries, which peers that
        // joined late may still hold, are not taken back.
        if kind == TableKind::NodeOwned
            && origin != Origin::Local
            && !deleted
            && self.life.expired_owner(&w.owner)
        {
            self.stats.records_refused += 1;
            return false;
        }
        let hidden = kind == TableKind::NodeOwned && !deleted && !own_name && self.owner_hidden(&w.owner);
        if hidden {
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
            _ => match self.membership.members.get_key_value(w.owner.as_str()) {
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
        if kind == TableKind::NodeOwned && origin != Origin::Local {
            if own_name {
                // A version under this node's name that this life did not write.
                if self.earlier_life_version(network, &w.table, &w.key, keyhash) {
                    return false;
                }
            } else if !self.membership.members.contains_key(&entry.owner) {
                let owner = entry.owner.clone();
                self.note_unknown_owner(now, &owner);
            }
        }
        let net = self.networks.get_mut(network).expect("checked");
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
        w.flags = (w.flags & FLAG_CLUSTER) | if deleted { FLAG_DELETED } else { 0 };
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
        } else if w.table == NODES_TABLE && network == CLUSTER_NETWORK {
            let stored = self.networks[network].get(&w.table, &w.key).expect("just stored");
            if let Ok(rec) = NodeRecord::decode(&stored.value) {
                let (ltime, deleted) = (stored.ltime, stored.deleted);
                self.on_node_record(now, &w.key, ltime, deleted, rec);
            }
        }
        if let Some(kind) = ev_kind {
            let ev = TableEvent {
                kind,
                network: network.to_string(),
                table: w.table,
                key: w.key,
                ltime: w.ltime,
                owner: w.owner,
                prev: old_visible,
                value: new_visible,
            };
            self.emit(ev);
        }
    }

    pub(super) fn emit(&mut self, ev: TableEvent) {
        if self.specs.contains_key(&ev.table) && !ev.table.starts_with(RESERVED_TABLE_PREFIX) {
            self.events.push_back(Event::Table(ev));
        }
    }

    /// Other nodes of `network`, for the retransmit count.
    fn peer_count(&self, network: &str) -> usize {
        if network == CLUSTER_NETWORK {
            return self.peers.cluster.len();
        }
        self.attach.attached_count.get(network).map_or(0, |n| n.saturating_sub(1))
    }

    pub(super) fn reap(&mut self, now: Instant) {
        let mut reaped = 0;
        let mut records = Vec::new();
        for (nid, net) in self.networks.iter_mut() {
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
                if nid == CLUSTER_NETWORK && (t == ATTACH_TABLE || t == NODES_TABLE) {
                    records.push((t, k));
                }
            }
        }
        self.stats.tombstones_reaped += reaped;
        // Reaped leave and detach records leave the indexes; a leave is remembered while its
        // member is (its tombstone's time counts from its writing, the member's from when this
        // node heard of it).
        for (t, k) in records {
            if t == ATTACH_TABLE {
                self.forget_attachment(&k);
            } else if !self.membership.members.contains_key(k.as_str()) {
                self.life.records.remove(k.as_str());
            }
        }
        // Members failed or left for longer than the reap interval are forgotten; their hidden
        // entries went with that interval too, and their records go now.
        let reap_after = self.cfg.reap_after;
        let mut forgotten = Vec::new();
        self.membership.members.retain(|name, m| {
            let keep = matches!(m.state, MemberState::Alive | MemberState::Restarting)
                || now.saturating_duration_since(m.since) < reap_after;
            if !keep {
                forgotten.push((name.clone(), m.id.generation));
            }
            keep
        });
        for (name, generation) in forgotten {
            self.expire_records(now, &name, generation);
        }
        self.judge_unknown_owners(now);
        self.forget_expired(now);
        let expired: Vec<u64> =
            self.syncs.iter().filter(|(_, s)| s.deadline <= now).map(|(id, _)| *id).collect();
        for id in expired {
            self.syncs.remove(&id);
        }
    }
}

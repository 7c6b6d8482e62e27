//! What the agent keeps on disk, as the sans-IO side sees it: the keys of the durable store,
//! the batches of puts and deletes the agent hands its caller, and which of them are durable.
//!
//! Every change to durable state becomes one [`PersistBatch`] with a sequence number. The caller
//! writes batches in order (the shell groups whatever is waiting into one redb transaction: one
//! fsync for many batches) and reports the highest durable sequence with
//! `Agent::handle_persisted`. An output (datagram, stream frame, command reply) that depends on
//! a batch is held until that batch is durable; one that depends on none is never held.
//!
//! The Lamport clock is persisted as a lease: `node/ltime_hwm` is a high-water mark
//! [`LTIME_LEASE`] ticks above the clock, renewed once half of it is used, so writes need a new
//! batch only once per half lease, and an output waits for one only if the clock outran every
//! durable lease.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::agent::NetworkDef;

/// The clock is persisted in leases of this many ticks.
pub const LTIME_LEASE: u64 = 10_000;

pub const KEY_NAME: &str = "node/name";
pub const KEY_INSTANCE: &str = "node/instance";
pub const KEY_GENERATION: &str = "node/generation";
pub const KEY_LTIME: &str = "node/ltime_hwm";
pub const KEY_SWEEP: &str = "node/sweep_pending";
/// `net/<id>`: a network this node is attached to, with its definition as last known (JSON;
/// an id-only definition while none has arrived).
pub const NET_PREFIX: &str = "net/";

/// Keyed puts (`Some`) and deletes (`None`) that become durable together, under one sequence
/// number. Sequence numbers start at 1 and increase by one per batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersistBatch {
    pub seq: u64,
    pub ops: Vec<(String, Option<Vec<u8>>)>,
}

/// The node's durable state, as read back at start (see `store`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    pub name: String,
    /// Random, created with the data dir.
    #[serde(default)]
    pub instance: u64,
    pub generation: u64,
    /// No Lamport time at or above this was ever used; a restart starts its clock here.
    pub ltime_hwm: u64,
    /// Networks (ids) this node is attached to; a restart re-attaches them.
    #[serde(default)]
    pub networks: Vec<String>,
    /// This instance has not yet deleted the entries an earlier instance of its name left in
    /// the cluster (see `GossipNode::set_predecessor_sweep`).
    #[serde(default)]
    pub sweep_pending: bool,
    /// The definitions of the attached networks, as last known.
    #[serde(default)]
    pub definitions: Vec<NetworkDef>,
    /// The allocator's keys (see [`crate::alloc`]): ring change logs, acceptor state, endpoint
    /// records, what this node allocated for networks it created.
    #[serde(default)]
    pub alloc: BTreeMap<String, Vec<u8>>,
}

/// Whether a key belongs to the allocator.
pub fn is_alloc_key(k: &str) -> bool {
    k == crate::alloc::REMOVED_KEY
        || [
            crate::alloc::IPAM_PREFIX,
            crate::alloc::PAXOS_PREFIX,
            crate::alloc::EP_PREFIX,
            crate::alloc::OWN_PREFIX,
            crate::alloc::REMOVALS_PREFIX,
            crate::alloc::GONE_PREFIX,
        ]
        .iter()
        .any(|p| k.starts_with(p))
}

fn num(v: u64) -> Vec<u8> {
    v.to_string().into_bytes()
}

fn parse_num(key: &str, v: &[u8]) -> Result<u64, String> {
    std::str::from_utf8(v).ok().and_then(|s| s.parse().ok()).ok_or_else(|| format!("{key} is not a number"))
}

impl NodeState {
    /// The store's keys and values for this state.
    pub fn to_image(&self) -> BTreeMap<String, Vec<u8>> {
        let mut m = BTreeMap::new();
        m.insert(KEY_NAME.to_string(), self.name.clone().into_bytes());
        m.insert(KEY_INSTANCE.to_string(), num(self.instance));
        m.insert(KEY_GENERATION.to_string(), num(self.generation));
        m.insert(KEY_LTIME.to_string(), num(self.ltime_hwm));
        m.insert(KEY_SWEEP.to_string(), num(u64::from(self.sweep_pending)));
        for id in &self.networks {
            let def = self
                .definitions
                .iter()
                .find(|d| &d.id == id)
                .cloned()
                .unwrap_or_else(|| NetworkDef::id_only(id));
            m.insert(format!("{NET_PREFIX}{id}"), serde_json::to_vec(&def).expect("serializable"));
        }
        m.extend(self.alloc.iter().map(|(k, v)| (k.clone(), v.clone())));
        m
    }

    /// Reads a state back from the store's keys; `None` if the store holds no node (a new data
    /// dir). Keys it does not know (later issues' allocations) are ignored.
    pub fn from_image(m: &BTreeMap<String, Vec<u8>>) -> Result<Option<NodeState>, String> {
        let Some(name) = m.get(KEY_NAME) else { return Ok(None) };
        let get = |k: &str| m.get(k).map(|v| parse_num(k, v)).transpose().map(Option::unwrap_or_default);
        let mut s = NodeState {
            name: String::from_utf8(name.clone()).map_err(|_| format!("{KEY_NAME} is not UTF-8"))?,
            instance: get(KEY_INSTANCE)?,
            generation: get(KEY_GENERATION)?,
            ltime_hwm: get(KEY_LTIME)?,
            networks: Vec::new(),
            sweep_pending: get(KEY_SWEEP)? != 0,
            definitions: Vec::new(),
            alloc: m.iter().filter(|(k, _)| is_alloc_key(k)).map(|(k, v)| (k.clone(), v.clone())).collect(),
        };
        for (k, v) in m.range(NET_PREFIX.to_string()..) {
            let Some(id) = k.strip_prefix(NET_PREFIX) else { break };
            let def: NetworkDef = serde_json::from_slice(v).map_err(|e| format!("{k}: {e}"))?;
            s.networks.push(id.to_string());
            if !def.name.is_empty() {
                s.definitions.push(def);
            }
        }
        Ok(Some(s))
    }
}

/// The sans-IO bookkeeping of durable state: what was handed out, what is durable, and what an
/// output must wait for.
#[derive(Debug)]
pub struct Persist {
    /// The store's image as of the last batch handed out.
    planned: BTreeMap<String, Vec<u8>>,
    /// The last sequence number handed out, and the highest reported durable.
    issued: u64,
    durable: u64,
    /// Clock leases in flight: (sequence, high-water mark), oldest first.
    leases: VecDeque<(u64, u64)>,
    /// The highest high-water mark durable, and the highest handed out.
    durable_hwm: u64,
    planned_hwm: u64,
    ready: VecDeque<PersistBatch>,
    /// The store's last error, until a write succeeds.
    failing: Option<String>,
}

impl Persist {
    /// Starts from the state the caller read back (and already made durable).
    pub fn new(state: &NodeState) -> Self {
        Persist {
            planned: state.to_image(),
            issued: 0,
            durable: 0,
            leases: VecDeque::new(),
            durable_hwm: state.ltime_hwm,
            planned_hwm: state.ltime_hwm,
            ready: VecDeque::new(),
            failing: None,
        }
    }

    pub fn planned(&self, key: &str) -> Option<&[u8]> {
        self.planned.get(key).map(Vec::as_slice)
    }

    /// The planned value of a numeric key.
    pub fn planned_num(&self, key: &str) -> u64 {
        self.planned(key).and_then(|v| parse_num(key, v).ok()).unwrap_or_default()
    }

    /// Keys under `prefix` in the planned image.
    pub fn planned_keys<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.planned
            .range(prefix.to_string()..)
            .map(|(k, _)| k.as_str())
            .take_while(move |k| k.starts_with(prefix))
    }

    /// Records what the store already holds for a numeric key (read back at start).
    pub fn assume(&mut self, key: &str, value: u64) {
        self.planned.insert(key.to_string(), num(value));
    }

    /// Hands out a batch of the ops that change the planned image; returns its sequence, or
    /// `None` if nothing changes.
    pub fn stage(&mut self, ops: Vec<(String, Option<Vec<u8>>)>) -> Option<u64> {
        let ops: Vec<_> = ops.into_iter().filter(|(k, v)| self.planned.get(k) != v.as_ref()).collect();
        if ops.is_empty() {
            return None;
        }
        for (k, v) in &ops {
            match v {
                Some(v) => self.planned.insert(k.clone(), v.clone()),
                None => self.planned.remove(k),
            };
        }
        self.issued += 1;
        self.ready.push_back(PersistBatch { seq: self.issued, ops });
        Some(self.issued)
    }

    /// Makes sure a lease covers `ltime`, staging a renewal once half of the planned one is
    /// used. Returns the sequence an output carrying `ltime` must wait for (0: none).
    pub fn cover(&mut self, ltime: u64) -> u64 {
        if ltime.saturating_add(LTIME_LEASE / 2) >= self.planned_hwm {
            let hwm = ltime.saturating_add(LTIME_LEASE).min(weft_gossip::wire::MAX_LTIME - 1);
            if hwm > self.planned_hwm
                && let Some(seq) = self.stage(vec![(KEY_LTIME.to_string(), Some(num(hwm)))])
            {
                self.planned_hwm = hwm;
                self.leases.push_back((seq, hwm));
            }
        }
        if ltime < self.durable_hwm {
            return 0;
        }
        self.leases.iter().find(|(_, hwm)| *hwm > ltime).map_or(self.issued, |(seq, _)| *seq)
    }

    pub fn poll_batch(&mut self) -> Option<PersistBatch> {
        self.ready.pop_front()
    }

    /// Every batch up to `seq` is durable.
    pub fn persisted(&mut self, seq: u64) {
        let seq = seq.min(self.issued);
        if seq <= self.durable {
            return;
        }
        self.durable = seq;
        self.failing = None;
        while let Some(&(s, hwm)) = self.leases.front() {
            if s > seq {
                break;
            }
            self.durable_hwm = self.durable_hwm.max(hwm);
            self.leases.pop_front();
        }
    }

    pub fn failed(&mut self, error: String) {
        self.failing = Some(error);
    }

    pub fn durable(&self) -> u64 {
        self.durable
    }

    pub fn issued(&self) -> u64 {
        self.issued
    }

    pub fn failing(&self) -> Option<&str> {
        self.failing.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> NodeState {
        NodeState {
            name: "a".into(),
            instance: 7,
            generation: 3,
            ltime_hwm: 100,
            networks: vec!["n1".into()],
            sweep_pending: true,
            definitions: vec![],
            alloc: BTreeMap::new(),
        }
    }

    #[test]
    fn the_image_round_trips() {
        let mut s = state();
        s.definitions = vec![NetworkDef { name: "green".into(), ..NetworkDef::id_only("n1") }];
        assert_eq!(NodeState::from_image(&s.to_image()).unwrap(), Some(s));
        assert_eq!(NodeState::from_image(&BTreeMap::new()).unwrap(), None);
    }

    #[test]
    fn an_output_waits_only_for_a_lease_it_outran() {
        let mut p = Persist::new(&NodeState { ltime_hwm: 20_000, ..state() });
        // Under the durable mark, and far from it: nothing to wait for, nothing staged.
        assert_eq!(p.cover(10), 0);
        assert!(p.poll_batch().is_none());
        // Past half of the lease: a renewal is staged, but the clock is still under the durable
        // mark, so nothing waits.
        assert_eq!(p.cover(15_000), 0);
        let b = p.poll_batch().unwrap();
        assert_eq!(b.ops, vec![(KEY_LTIME.to_string(), Some(b"25000".to_vec()))]);
        // The clock outruns the durable mark: it waits for the renewal, and only for it.
        assert_eq!(p.cover(20_000), b.seq);
        p.persisted(b.seq);
        assert_eq!(p.cover(20_001), 0);
        // Staging what is already planned stages nothing.
        assert_eq!(p.stage(vec![(KEY_NAME.into(), Some(b"a".to_vec()))]), None);
        let seq = p.stage(vec![(KEY_SWEEP.into(), Some(b"0".to_vec()))]);
        assert_eq!(seq, Some(p.issued()));
    }
}

//! The public reads, and the peer sets the node picks gossip and sync partners from.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::config::Config;
use crate::event::{MemberInfo, MemberState, Stats};
use crate::identity::NodeId;
use crate::peers::PeerSet;
use crate::store::{Entry, NetState};

use super::{CLUSTER_NETWORK, GossipNode};

/// A point-in-time view of one stored entry, for reads and dumps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryView {
    pub key: String,
    pub value: Bytes,
    pub owner: String,
    pub ltime: u64,
    pub state: EntryState,
    /// Time since this node last changed the entry.
    pub age: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryState {
    Live,
    /// Deleted; reaped after the residual time.
    Tombstone {
        reap_in: Duration,
    },
    /// Owner failed; kept for its return until the residual time is up.
    Hidden {
        reap_in: Duration,
    },
}

impl GossipNode {
    pub fn id(&self) -> &NodeId {
        &self.id
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The Lamport clock: persist it as the high-water mark for the next start.
    pub fn ltime(&self) -> u64 {
        self.clock
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn is_connected(&self) -> bool {
        self.membership.connected
    }

    pub fn has_left(&self) -> bool {
        self.membership.left
    }

    /// Networks this node is attached to (always including [`CLUSTER_NETWORK`]).
    pub fn networks(&self) -> impl Iterator<Item = &str> {
        self.networks.keys().map(String::as_str)
    }

    pub fn is_attached(&self, network: &str) -> bool {
        self.networks.contains_key(network)
    }

    /// Whether a sync (anti-entropy) of `network` with a peer has completed in this life: what
    /// the cluster held then has arrived.
    pub fn has_synced(&self, network: &str) -> bool {
        self.networks.get(network).is_some_and(|n| n.synced)
    }

    /// The data-plane (VTEP) address `name` publishes in its node record (this node's own for
    /// its name); `None` while no record of it is known, or after it left.
    pub fn node_data_addr(&self, name: &str) -> Option<std::net::IpAddr> {
        if name == &*self.id.name {
            return Some(self.life.data_addr);
        }
        self.life
            .records
            .get(name)
            .filter(|r| r.status != crate::discovery::NodeStatus::Left)
            .map(|r| r.rec.data_addr)
    }

    /// The live value of an entry, if this node holds one (tombstones and hidden entries are
    /// not live).
    pub fn get_entry(&self, network: &str, table: &str, key: &str) -> Option<Bytes> {
        self.networks.get(network)?.get(table, key)?.visible().cloned()
    }

    /// Membership updates (SWIM) still to be piggybacked on outgoing messages.
    pub fn membership_backlog(&self) -> usize {
        self.membership.foca.updates_backlog()
    }

    /// Seeds this node announces to but does not have as active members (unreachable so far).
    pub fn unreachable_seeds(&self) -> Vec<SocketAddr> {
        let active: HashSet<SocketAddr> = self.membership.foca.iter_members().map(|m| m.id().addr).collect();
        self.membership.seeds.iter().copied().filter(|a| !active.contains(a)).collect()
    }

    /// Events queued for dissemination in `network`.
    pub fn queue_len(&self, network: &str) -> usize {
        self.networks.get(network).map_or(0, |n| n.queue.len())
    }

    /// Encoded bytes of the events queued in `network`.
    pub fn queue_bytes(&self, network: &str) -> usize {
        self.networks.get(network).map_or(0, |n| n.queue.bytes())
    }

    /// Stored versions (live, tombstoned, hidden) in `network`.
    pub fn entry_count(&self, network: &str) -> usize {
        self.networks.get(network).map_or(0, NetState::len)
    }

    /// The anti-entropy digest of `network`, as kept incrementally, and as rebuilt from the
    /// entries (they must agree; for tests and benchmarks).
    #[doc(hidden)]
    pub fn digests(&self, network: &str) -> Option<(Vec<u64>, Vec<u64>)> {
        self.networks.get(network).map(|n| (n.digest.clone(), n.rebuild_digest()))
    }

    /// The stored version of one entry, live, tombstoned or hidden.
    pub fn entry(&self, network: &str, table: &str, key: &str) -> Option<EntryView> {
        let e = self.networks.get(network)?.get(table, key)?;
        Some(self.view(key, e))
    }

    /// Every stored version of a table, live, tombstoned or hidden, sorted by key.
    pub fn table(&self, network: &str, table: &str) -> Vec<EntryView> {
        let Some(t) = self.networks.get(network).and_then(|n| n.tables.get(table)) else {
            return Vec::new();
        };
        t.iter().map(|(k, e)| self.view(k, e)).collect()
    }

    /// Stored versions (live, tombstoned, hidden) of one table.
    pub fn table_len(&self, network: &str, table: &str) -> usize {
        self.networks.get(network).and_then(|n| n.tables.get(table)).map_or(0, |t| t.len())
    }

    /// Tables of a network that hold at least one entry.
    pub fn tables(&self, network: &str) -> Vec<String> {
        self.networks.get(network).map(|n| n.tables.keys().cloned().collect()).unwrap_or_default()
    }

    /// Calls `f(key, value, owner)` for every live entry of a table, in key order; stops when
    /// `f` returns false.
    pub fn walk(&self, network: &str, table: &str, mut f: impl FnMut(&str, &Bytes, &str) -> bool) {
        let Some(t) = self.networks.get(network).and_then(|n| n.tables.get(table)) else { return };
        for (k, e) in t {
            if let Some(v) = e.visible()
                && !f(k, v, &e.owner)
            {
                return;
            }
        }
    }

    fn view(&self, key: &str, e: &Entry) -> EntryView {
        let reap_in = e.reap_at.map(|at| at.saturating_duration_since(self.now)).unwrap_or_default();
        let state = if e.deleted {
            EntryState::Tombstone { reap_in }
        } else if e.hidden {
            EntryState::Hidden { reap_in }
        } else {
            EntryState::Live
        };
        EntryView {
            key: key.to_string(),
            value: e.value.clone(),
            owner: e.owner.to_string(),
            ltime: e.ltime,
            state,
            age: self.now.saturating_duration_since(e.updated),
        }
    }

    /// Every member this node knows, itself included, sorted by name.
    pub fn members(&self) -> Vec<MemberInfo> {
        let foca_state: HashMap<&NodeId, (foca::State, u16)> = self
            .membership
            .foca
            .iter_membership_state()
            .map(|m| (m.id(), (m.state(), m.incarnation())))
            .collect();
        let mut out = Vec::with_capacity(self.membership.members.len() + 1);
        let me = MemberInfo {
            id: self.id.clone(),
            state: if self.membership.left { MemberState::Left } else { MemberState::Alive },
            incarnation: 0,
            networks: self.networks.keys().cloned().collect(),
            data_addr: Some(self.life.data_addr),
        };
        let mut mine = Some(me);
        for (name, m) in &self.membership.members {
            if let Some(me) = mine.take_if(|me| me.id.name < *name) {
                out.push(me);
            }
            let (fs, inc) = foca_state.get(&m.id).copied().unwrap_or((foca::State::Alive, 0));
            let state = match (m.state, fs) {
                (MemberState::Alive, foca::State::Suspect) => MemberState::Suspect,
                (s, _) => s,
            };
            out.push(MemberInfo {
                id: m.id.clone(),
                state,
                incarnation: inc,
                networks: self.networks_of(name),
                data_addr: self.life.records.get(name).map(|r| r.rec.data_addr),
            });
        }
        out.extend(mine);
        out
    }

    /// The networks `node` is attached to, `cluster` included while its record says it has
    /// not left.
    fn networks_of(&self, node: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .attach
            .index
            .iter()
            .filter(|(_, by)| by.get(node).is_some_and(|a| a.attached))
            .map(|(n, _)| n.clone())
            .collect();
        if self.life.records.get(node).is_some_and(|r| r.status != crate::discovery::NodeStatus::Left) {
            out.push(CLUSTER_NETWORK.to_string());
            out.sort();
        }
        out
    }

    /// Alive members attached to `network`, other than this node, sorted by name.
    pub fn network_peers(&self, network: &str) -> Vec<NodeId> {
        self.peers.of(network, CLUSTER_NETWORK).map(PeerSet::sorted).unwrap_or_default()
    }

    /// How many alive members are attached to `network`, other than this node (for
    /// [`CLUSTER_NETWORK`]: alive members); the length of [`network_peers`](Self::network_peers)
    /// without building it.
    pub fn network_peer_count(&self, network: &str) -> usize {
        self.peers.of(network, CLUSTER_NETWORK).map_or(0, PeerSet::len)
    }

    /// Up to `k` distinct alive peers of `network`, chosen at random.
    pub(super) fn pick_peers(&mut self, network: &str, k: usize) -> Vec<NodeId> {
        match self.peers.of(network, CLUSTER_NETWORK) {
            Some(set) => set.pick(&mut self.rng, k),
            None => Vec::new(),
        }
    }

    /// Brings every peer set up to date with `name`'s member state and attachments; called
    /// after anything changes either.
    pub(super) fn refresh_peer(&mut self, name: &Arc<str>) {
        if **name == *self.id.name {
            return;
        }
        let alive =
            self.membership.members.get(name).filter(|m| m.state == MemberState::Alive).map(|m| &m.id);
        self.peers.cluster.set(name, alive);
        for (network, by) in &self.attach.index {
            if network == CLUSTER_NETWORK {
                continue;
            }
            let attached = by.get(name).is_some_and(|a| a.attached);
            let set = match self.peers.networks.get_mut(network) {
                Some(set) => set,
                None => self.peers.networks.entry(network.clone()).or_default(),
            };
            set.set(name, alive.filter(|_| attached));
        }
    }
}

//! Node identity: the unique name, the gossip address, the instance and the restart generation,
//! as foca sees it.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// A node as the cluster knows it.
///
/// * `name` is unique in the cluster and is what owns table entries; it survives restarts.
/// * `addr` is the gossip address (UDP and TCP, same port).
/// * `instance` is random and created with the agent's data dir: a host reinstalled with an
///   empty data dir comes back under its name as a new instance.
/// * `generation` orders the lives of a name: the agent starts at `max(persisted + 1, wall-clock
///   ms)`, so a restarted or reinstalled node is a new SWIM identity that wins over its previous
///   life; a life that learns of an earlier one at or above it moves above it (see
///   `GossipNode`).
/// * `renewal` counts in-process rejoins (foca declared us down and we came back) within one
///   generation; it is not persisted because the next start bumps `generation` instead.
///
/// Foca's notion of "the same member" is the address: two identities at one address are two
/// lives of one node, and the newer `(generation, renewal)` wins.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId {
    pub name: Arc<str>,
    pub addr: SocketAddr,
    pub instance: u64,
    pub generation: u64,
    pub renewal: u32,
}

impl NodeId {
    /// An identity of instance 0 (tests and simulations that model no reinstalls); see
    /// [`with_instance`](Self::with_instance).
    pub fn new(name: impl Into<Arc<str>>, addr: SocketAddr, generation: u64) -> Self {
        NodeId { name: name.into(), addr, instance: 0, generation, renewal: 0 }
    }

    pub fn with_instance(mut self, instance: u64) -> Self {
        self.instance = instance;
        self
    }

    /// The instance id as printed (`NAME@INSTANCE` names one instance of a node).
    pub fn instance_hex(&self) -> String {
        format!("{:016x}", self.instance)
    }

    /// `(generation, renewal)`: which of two lives of a node is the newer.
    pub fn life(&self) -> (u64, u32) {
        (self.generation, self.renewal)
    }

    /// The identity used to announce to a seed whose name we do not know yet. Foca accepts an
    /// announce addressed to any identity with the receiver's address.
    pub(crate) fn seed(addr: SocketAddr) -> Self {
        NodeId { name: Arc::from(""), addr, instance: 0, generation: 0, renewal: 0 }
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}@{}#{:08x}.{}.{}",
            self.name,
            self.addr,
            self.instance >> 32,
            self.generation,
            self.renewal
        )
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.addr)
    }
}

impl foca::Identity for NodeId {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(NodeId { renewal: self.renewal.wrapping_add(1), ..self.clone() })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.life() > adversary.life()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use foca::Identity;

    #[test]
    fn newer_life_wins_address_conflicts() {
        let addr: SocketAddr = "127.0.0.1:7946".parse().unwrap();
        let old = NodeId::new("a", addr, 3);
        let renewed = old.renew().unwrap();
        let restarted = NodeId::new("a", addr, 4);
        assert!(renewed.win_addr_conflict(&old));
        assert!(!old.win_addr_conflict(&renewed));
        assert!(restarted.win_addr_conflict(&renewed));
        assert_eq!(renewed.addr(), old.addr());
    }
}

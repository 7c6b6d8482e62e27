//! The alive peers of each network, kept current as members and attachments change, so choosing
//! gossip targets costs O(k) instead of a scan of every member (a 2,000-node cluster picks peers
//! thousands of times per second of virtual time in the simulator, and every round in an agent).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use rand::RngExt;
use rand::rngs::Xoshiro256PlusPlus;

use crate::identity::NodeId;

/// One network's alive attached peers: a dense list to pick from, and where each name sits in
/// it. The list's order depends only on the order of changes, so picks stay deterministic.
#[derive(Debug, Default)]
pub(crate) struct PeerSet {
    list: Vec<NodeId>,
    index: HashMap<Arc<str>, usize>,
}

impl PeerSet {
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Makes `name` present with identity `id`, or absent with `None`.
    pub fn set(&mut self, name: &Arc<str>, id: Option<&NodeId>) {
        match (self.index.get(name).copied(), id) {
            (Some(i), Some(id)) => {
                if self.list[i] != *id {
                    self.list[i] = id.clone();
                }
            }
            (None, Some(id)) => {
                self.index.insert(name.clone(), self.list.len());
                self.list.push(id.clone());
            }
            (Some(i), None) => {
                self.index.remove(name);
                self.list.swap_remove(i);
                if let Some(moved) = self.list.get(i) {
                    self.index.insert(moved.name.clone(), i);
                }
            }
            (None, None) => {}
        }
    }

    /// Up to `k` distinct peers chosen uniformly at random (a partial Fisher-Yates over
    /// indexes: O(k) draws, no copy of the list).
    pub fn pick(&self, rng: &mut Xoshiro256PlusPlus, k: usize) -> Vec<NodeId> {
        let n = self.list.len();
        let k = k.min(n);
        if k * 4 >= n {
            // Small sets: shuffle a copy of the indexes.
            let mut idx: Vec<usize> = (0..n).collect();
            for i in 0..k {
                let j = rng.random_range(i..n);
                idx.swap(i, j);
            }
            return idx[..k].iter().map(|&i| self.list[i].clone()).collect();
        }
        // Large sets: draw until k distinct indexes (k is small against n, so few redraws).
        let mut chosen: Vec<usize> = Vec::with_capacity(k);
        while chosen.len() < k {
            let j = rng.random_range(0..n);
            if !chosen.contains(&j) {
                chosen.push(j);
            }
        }
        chosen.into_iter().map(|i| self.list[i].clone()).collect()
    }

    /// The peers sorted by name.
    pub fn sorted(&self) -> Vec<NodeId> {
        let mut v = self.list.clone();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

/// The peer sets of every network this node knows attachments for, and of the cluster (every
/// alive member).
#[derive(Debug, Default)]
pub(crate) struct Peers {
    pub cluster: PeerSet,
    pub networks: BTreeMap<String, PeerSet>,
}

impl Peers {
    pub fn of(&self, network: &str, cluster_network: &str) -> Option<&PeerSet> {
        if network == cluster_network { Some(&self.cluster) } else { self.networks.get(network) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use std::collections::BTreeSet;
    use std::net::SocketAddr;

    fn id(i: u16) -> NodeId {
        NodeId::new(format!("n{i}"), SocketAddr::from(([127, 0, 0, 1], i)), 1)
    }

    #[test]
    fn set_keeps_list_and_index_consistent() {
        let mut s = PeerSet::default();
        for i in 0..10 {
            s.set(&id(i).name, Some(&id(i)));
        }
        s.set(&id(3).name, None);
        s.set(&id(0).name, None);
        s.set(&id(9).name, None);
        s.set(&id(42).name, None);
        let renewed = NodeId { renewal: 1, ..id(5) };
        s.set(&renewed.name, Some(&renewed));
        assert_eq!(s.len(), 7);
        for (i, p) in s.list.iter().enumerate() {
            assert_eq!(s.index[&p.name], i);
        }
        let names: BTreeSet<String> = s.sorted().iter().map(|p| p.name.to_string()).collect();
        let want: BTreeSet<String> = [1, 2, 4, 5, 6, 7, 8].iter().map(|i| format!("n{i}")).collect();
        assert_eq!(names, want);
        assert!(s.sorted().contains(&renewed));
    }

    #[test]
    fn picks_are_distinct_and_cover_the_set() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(7);
        for n in [0u16, 1, 3, 8, 100] {
            let mut s = PeerSet::default();
            for i in 0..n {
                s.set(&id(i).name, Some(&id(i)));
            }
            let mut seen = BTreeSet::new();
            for _ in 0..2000 {
                let p = s.pick(&mut rng, 3);
                assert_eq!(p.len(), 3.min(n as usize));
                let distinct: BTreeSet<_> = p.iter().map(|x| x.name.clone()).collect();
                assert_eq!(distinct.len(), p.len());
                seen.extend(distinct);
            }
            assert_eq!(seen.len(), n as usize, "every peer gets picked");
        }
    }
}

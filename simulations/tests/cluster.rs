//! Cross-node behaviour of the gossip core, on the in-memory cluster.

use std::time::Duration;

use bytes::Bytes;
use weft_gossip::{Config, DownReason, Event, MemberState};
use weft_sim::{Cluster, NetModel};

fn settled(n: usize, seed: u64) -> Cluster {
    let mut c = Cluster::settled(n, seed, Config::lan(n as u32), NetModel::default());
    assert!(c.membership_converged(), "seed {seed}: membership did not converge");
    for i in 0..n {
        c.attach(i, "net1");
    }
    c.run_for(Duration::from_secs(2));
    c
}

#[test]
fn an_entry_reaches_every_attached_node() {
    let mut c = settled(5, 1);
    c.with(2, |n, now| n.create_entry(now, "net1", "endpoints", "ep1", Bytes::from_static(b"v1")).unwrap());
    c.run_for(Duration::from_secs(1));
    for i in 0..5 {
        assert_eq!(c.node(i).get_entry("net1", "endpoints", "ep1"), Some(Bytes::from_static(b"v1")), "node {i}");
    }
    assert!(c.watcher_violation.is_none(), "{:?}", c.watcher_violation);
}

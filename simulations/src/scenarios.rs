//! Measurements on simulated clusters.

use std::time::Duration;

use bytes::Bytes;
use weft_gossip::Config;

use crate::cluster::{Cluster, NetModel};

/// Virtual time from one write on node 0 until every node of a settled `n`-node cluster,
/// all attached to one network, holds all `keys` entries; `None` if not within `limit`.
pub fn burst_convergence(
    n: usize,
    keys: usize,
    seed: u64,
    net: NetModel,
    limit: Duration,
) -> Option<Duration> {
    let mut c = Cluster::settled(n, seed, Config::lan(n as u32), net);
    for i in 0..n {
        c.attach(i, "net1");
    }
    c.run_for(Duration::from_secs(3));
    let writer = (seed as usize) % n;
    let start = c.now();
    c.with(writer, |node, now| {
        for k in 0..keys {
            node.create_entry(
                now,
                "net1",
                "endpoints",
                &format!("key-{k:05}"),
                Bytes::from(format!("value-{k}")),
            )
            .expect("create");
        }
    });
    let done = c.run_until(start + limit, |c| {
        (0..c.nodes.len()).all(|i| c.node(i).table("net1", "endpoints").len() >= keys)
    });
    done.then(|| c.now() - start)
}

/// Nearest-rank percentile of sorted samples.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

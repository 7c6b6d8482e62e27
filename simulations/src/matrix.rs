//! networkdb's convergence matrix on weft: the perturbations of Docker's own
//! `TestNetworkDBConvergenceLatency`, measured the same way (settle, apply exactly one change,
//! check every node every 1 ms of virtual time until it holds everywhere), so each cell can be
//! put next to `../shared/anchors/networkdb-convergence.md`.

use std::time::Duration;

use bytes::Bytes;

use crate::cluster::{Cluster, NetModel, mix};
use crate::scenarios::settle;

/// The quiet perturbations, in the anchor table's order.
pub const PERTURBATIONS: [&str; 7] = [
    "create-entry",
    "update-entry",
    "delete-entry",
    "join-network",
    "write-after-join",
    "join-populated-network",
    "leave-network",
];

/// Whether a perturbation needs a node outside the network (so at least 3 nodes).
pub fn needs_joiner(p: &str) -> bool {
    matches!(p, "join-network" | "write-after-join" | "join-populated-network" | "leave-network")
}

const T: &str = "endpoints";

/// Runs 1 ms at a time until `done` holds on a sample; the virtual time it took.
fn sample_until(
    c: &mut Cluster,
    limit: Duration,
    mut done: impl FnMut(&Cluster) -> bool,
) -> Option<Duration> {
    let start = c.elapsed();
    while c.elapsed() - start <= limit {
        if done(c) {
            return Some(c.elapsed() - start);
        }
        c.run_for(Duration::from_millis(1));
    }
    None
}

/// One sample of one cell: virtual time until the perturbation converged on `n` nodes.
pub fn cell(perturbation: &str, n: usize, seed: u64) -> Result<Duration, String> {
    let fail = |what: &str| format!("{perturbation}, {n} nodes, seed {seed}: {what}");
    let mut c = settle(n, seed, NetModel::default(), Duration::from_secs(120)).map_err(|e| fail(&e))?;
    let pick = |k: u64, of: usize| (mix(seed, k) % of as u64) as usize;
    let limit = Duration::from_secs(120);
    // Join perturbations use net2, which every node but the joiner (the last) is attached to.
    let joiner = n - 1;
    if needs_joiner(perturbation) {
        for i in 0..n - 1 {
            c.attach(i, "net2");
        }
        c.run_for(Duration::from_secs(3));
    }
    let got = match perturbation {
        "create-entry" => {
            let w = pick(1, n);
            c.with(w, |node, now| {
                node.create_entry(now, "net1", T, "k", Bytes::from_static(b"v1")).expect("create")
            });
            sample_until(&mut c, limit, |c| (0..n).all(|i| c.node(i).get_entry("net1", T, "k").is_some()))
        }
        "update-entry" | "delete-entry" => {
            let w = pick(1, n);
            c.with(w, |node, now| {
                node.create_entry(now, "net1", T, "k", Bytes::from_static(b"v1")).expect("create")
            });
            c.run_for(Duration::from_secs(3));
            if !(0..n).all(|i| c.node(i).get_entry("net1", T, "k").is_some()) {
                return Err(fail("the entry to change did not settle"));
            }
            if perturbation == "update-entry" {
                c.with(w, |node, now| {
                    node.update_entry(now, "net1", T, "k", Bytes::from_static(b"v2")).expect("update")
                });
                sample_until(&mut c, limit, |c| {
                    (0..n).all(|i| c.node(i).get_entry("net1", T, "k").as_deref() == Some(&b"v2"[..]))
                })
            } else {
                c.with(w, |node, now| node.delete_entry(now, "net1", T, "k").expect("delete"));
                sample_until(&mut c, limit, |c| (0..n).all(|i| c.node(i).get_entry("net1", T, "k").is_none()))
            }
        }
        "join-network" => {
            c.attach(joiner, "net2");
            let name = c.nodes[joiner].name.clone();
            sample_until(&mut c, limit, |c| {
                (0..n)
                    .all(|i| i == joiner || c.node(i).network_peers("net2").iter().any(|p| *p.name == *name))
            })
        }
        "write-after-join" => {
            c.nodes[joiner].networks.insert("net2".into());
            c.with(joiner, |node, now| {
                node.join_network(now, "net2").expect("attach");
                node.create_entry(now, "net2", T, "k", Bytes::from_static(b"v1")).expect("create")
            });
            sample_until(&mut c, limit, |c| (0..n).all(|i| c.node(i).get_entry("net2", T, "k").is_some()))
        }
        "join-populated-network" => {
            c.with(0, |node, now| {
                for k in 0..1000 {
                    node.create_entry(now, "net2", T, &format!("k{k:04}"), Bytes::from_static(b"v"))
                        .expect("create");
                }
            });
            c.run_for(Duration::from_secs(10));
            if !(0..n - 1).all(|i| c.node(i).table("net2", T).len() == 1000) {
                return Err(fail("the 1,000 entries did not settle"));
            }
            c.attach(joiner, "net2");
            sample_until(&mut c, limit, |c| c.node(joiner).table("net2", T).len() == 1000)
        }
        "leave-network" => {
            let leaver = pick(2, n - 1);
            c.with(leaver, |node, now| {
                node.create_entry(now, "net2", T, "mine", Bytes::from_static(b"v")).expect("create")
            });
            c.run_for(Duration::from_secs(3));
            c.detach(leaver, "net2");
            let name = c.nodes[leaver].name.clone();
            sample_until(&mut c, limit, |c| {
                (0..n - 1).filter(|&i| i != leaver).all(|i| {
                    c.node(i).get_entry("net2", T, "mine").is_none()
                        && !c.node(i).network_peers("net2").iter().any(|p| *p.name == *name)
                })
            })
        }
        other => return Err(format!("unknown perturbation {other:?}")),
    };
    got.ok_or_else(|| fail("did not converge within 120 s"))
}

//! networkdb's convergence matrix on weft: the perturbations of Docker's own
//! `TestNetworkDBConvergenceLatency` and `TestNetworkDBConvergenceUnderChurn`, measured the
//! same way (settle, apply exactly one change, check every node every 1 ms of virtual time until
//! it holds everywhere), so each cell can be put next to
//! `../shared/anchors/networkdb-convergence.md`.

use std::time::Duration;

use bytes::Bytes;
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

use crate::cluster::{NetModel, Sim, mix};
use crate::host::Host;
use crate::scenarios::{NET, T, run_until_holds, settle};

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

/// The churn perturbation.
pub const CHURN: &str = "create-entry-under-churn";

/// Whether a perturbation needs a node outside the network (so at least 3 nodes).
pub fn needs_joiner(p: &str) -> bool {
    matches!(p, "join-network" | "write-after-join" | "join-populated-network" | "leave-network")
}

/// Runs 1 ms at a time until `done` holds on a sample; the virtual time it took.
fn sample_until<H: Host>(
    c: &mut Sim<H>,
    limit: Duration,
    mut done: impl FnMut(&Sim<H>) -> bool,
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

/// Runs until `done` holds (checked every 100 ms) and nothing is left to send, at most 60 s:
/// the state a perturbation starts from.
fn prepare<H: Host>(c: &mut Sim<H>, mut done: impl FnMut(&Sim<H>) -> bool) -> bool {
    run_until_holds(c, Duration::from_secs(60), |c| done(c) && c.quiet())
}

/// One sample of one quiet cell: virtual time until the perturbation converged on `n` nodes.
pub fn cell<H: Host>(perturbation: &str, n: usize, seed: u64) -> Result<Duration, String> {
    if perturbation == CHURN {
        return churn_cell::<H>(n, seed);
    }
    let fail = |what: &str| format!("{perturbation}, {n} nodes, seed {seed}: {what}");
    let mut c = settle::<H>(n, seed, NetModel::default(), Duration::from_secs(120)).map_err(|e| fail(&e))?;
    let net1 = c.net(NET);
    let pick = |k: u64, of: usize| (mix(seed, k) % of as u64) as usize;
    let limit = Duration::from_secs(120);
    // Join perturbations use net2, which every node but the joiner (the last) is attached to.
    let joiner = n - 1;
    let mut net2 = String::new();
    if needs_joiner(perturbation) {
        net2 = c.define_network(0, "net2");
        for i in 1..n - 1 {
            c.attach(i, &net2);
        }
        let others = n - 2;
        if !prepare(&mut c, |c| (0..n - 1).all(|i| c.node(i).network_peer_count(&net2) == others)) {
            return Err(fail("the attachments to net2 did not settle"));
        }
    }
    let v = |s: &'static str| Some(Bytes::from_static(s.as_bytes()));
    let got = match perturbation {
        "create-entry" => {
            c.write(pick(1, n), &net1, T, "k", v("v1"))?;
            sample_until(&mut c, limit, |c| (0..n).all(|i| c.node(i).get_entry(&net1, T, "k").is_some()))
        }
        "update-entry" | "delete-entry" => {
            let w = pick(1, n);
            c.write(w, &net1, T, "k", v("v1"))?;
            if !prepare(&mut c, |c| (0..n).all(|i| c.node(i).get_entry(&net1, T, "k").is_some())) {
                return Err(fail("the entry to change did not settle"));
            }
            if perturbation == "update-entry" {
                c.write(w, &net1, T, "k", v("v2"))?;
                sample_until(&mut c, limit, |c| {
                    (0..n).all(|i| c.node(i).get_entry(&net1, T, "k").as_deref() == Some(&b"v2"[..]))
                })
            } else {
                c.write(w, &net1, T, "k", None)?;
                sample_until(&mut c, limit, |c| (0..n).all(|i| c.node(i).get_entry(&net1, T, "k").is_none()))
            }
        }
        "join-network" => {
            c.attach(joiner, &net2);
            let name = c.nodes[joiner].name.clone();
            sample_until(&mut c, limit, |c| {
                (0..n).all(|i| i == joiner || c.node(i).network_peers(&net2).iter().any(|p| *p.name == *name))
            })
        }
        "write-after-join" => {
            c.attach(joiner, &net2);
            c.write(joiner, &net2, T, "k", v("v1"))?;
            sample_until(&mut c, limit, |c| (0..n).all(|i| c.node(i).get_entry(&net2, T, "k").is_some()))
        }
        "join-populated-network" => {
            for k in 0..1000 {
                c.write(0, &net2, T, &format!("k{k:04}"), v("v"))?;
            }
            if !prepare(&mut c, |c| (0..n - 1).all(|i| c.live_len(i, &net2, T) == 1000)) {
                return Err(fail("the 1,000 entries did not settle"));
            }
            c.attach(joiner, &net2);
            sample_until(&mut c, limit, |c| c.live_len(joiner, &net2, T) == 1000)
        }
        "leave-network" => {
            let leaver = pick(2, n - 1);
            c.write(leaver, &net2, T, "mine", v("v"))?;
            if !prepare(&mut c, |c| (0..n - 1).all(|i| c.node(i).get_entry(&net2, T, "mine").is_some())) {
                return Err(fail("the entry to remove did not settle"));
            }
            c.detach(leaver, &net2);
            let name = c.nodes[leaver].name.clone();
            sample_until(&mut c, limit, |c| {
                (0..n - 1).filter(|&i| i != leaver).all(|i| {
                    c.node(i).get_entry(&net2, T, "mine").is_none()
                        && !c.node(i).network_peers(&net2).iter().any(|p| *p.name == *name)
                })
            })
        }
        other => return Err(format!("unknown perturbation {other:?}")),
    };
    let got = got.ok_or_else(|| fail("did not converge within 120 s"))?;
    c.check().map_err(|e| fail(&e))?;
    Ok(got)
}

/// Steps of the churn cell: every 20 ms, 8 junk writes (up to 2,000 in all), and every fifth
/// step the flapping node leaves the network or rejoins it.
const STEP: Duration = Duration::from_millis(20);
const JUNK_PER_STEP: usize = 8;
const JUNK_MAX: usize = 2000;
const FLAP_EVERY: usize = 5;

/// One sample of the churn cell on `n` nodes: the cluster settles, churn starts, and after a
/// random 0..1 s a node that does not flap writes the probe; the time until every node that
/// does not flap holds it.
pub fn churn_cell<H: Host>(n: usize, seed: u64) -> Result<Duration, String> {
    let fail = |what: &str| format!("{CHURN}, {n} nodes, seed {seed}: {what}");
    if n < 3 {
        return Err(fail("churn needs at least 3 nodes"));
    }
    let mut c = settle::<H>(n, seed, NetModel::default(), Duration::from_secs(120)).map_err(|e| fail(&e))?;
    let net = c.net(NET);
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(mix(seed, 0xc4u64));
    let flapper = n - 1;
    let steady: Vec<usize> = (0..n - 1).collect();
    let writer = steady[rng.random_range(0..steady.len())];
    let probe_at_step = rng.random_range(0..50usize);
    let (mut junk, mut attached, mut step) = (0usize, true, 0usize);
    let mut churn_step = |c: &mut Sim<H>, step: usize| -> Result<(), String> {
        for _ in 0..JUNK_PER_STEP {
            if junk >= JUNK_MAX {
                break;
            }
            let w = steady[rng.random_range(0..steady.len())];
            c.write(w, &net, T, &format!("junk-{}", junk % 200), Some(Bytes::from(format!("j{junk}"))))?;
            junk += 1;
        }
        if step % FLAP_EVERY == FLAP_EVERY - 1 {
            if attached {
                c.detach(flapper, &net);
            } else {
                c.attach(flapper, &net);
            }
            attached = !attached;
        }
        Ok(())
    };
    while step < probe_at_step {
        churn_step(&mut c, step)?;
        c.run_for(STEP);
        step += 1;
    }
    c.write(writer, &net, T, "probe", Some(Bytes::from_static(b"v")))?;
    let start = c.elapsed();
    let limit = Duration::from_secs(120);
    let mut next_step = c.elapsed() + STEP;
    loop {
        if steady.iter().all(|&i| c.node(i).get_entry(&net, T, "probe").is_some()) {
            c.check().map_err(|e| fail(&e))?;
            return Ok(c.elapsed() - start);
        }
        if c.elapsed() - start > limit {
            return Err(fail("did not converge within 120 s"));
        }
        c.run_for(Duration::from_millis(1));
        if c.elapsed() >= next_step {
            churn_step(&mut c, step)?;
            step += 1;
            next_step += STEP;
        }
    }
}

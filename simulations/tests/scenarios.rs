//! The scenarios behind `weft-sim`, on the agent that ships: every node gets the entry and a
//! seed replays exactly, crashes are detected, partitions heal, networkdb's perturbations
//! (quiet and under churn) converge on small clusters, the scale run forms a cluster, and the
//! soak passes its checkers over many seeds.

use std::time::Duration;

use weft_node::Agent;
use weft_sim::NetModel;
use weft_sim::scenarios::{Percentiles, convergence, failure_detection, partition};

#[test]
fn one_entry_reaches_every_node_and_a_seed_replays_exactly() {
    let window = Duration::from_secs(10);
    let a = convergence::<Agent>(12, 5, NetModel::default(), window).unwrap();
    assert_eq!(a.arrivals.len(), 12);
    assert_eq!(a.arrivals.iter().filter(|d| d.is_zero()).count(), 1, "only the writer has it at 0");
    assert_eq!(a.arrivals.iter().max(), Some(&a.last));
    assert!(a.last < Duration::from_secs(2), "{:?}", a.last);
    assert!(a.msgs_per_node_per_s > 0.0 && a.bytes_per_node_per_s > a.msgs_per_node_per_s);
    // The determinism check: the same seed gives the same trace, byte for byte.
    assert_eq!(
        convergence::<Agent>(12, 5, NetModel::default(), window),
        Ok(a.clone()),
        "same seed, same run"
    );
    let b = convergence::<Agent>(12, 6, NetModel::default(), window).unwrap();
    assert_ne!(b.trace, a.trace, "another seed, another run");
}

#[test]
fn a_thousand_node_cluster_converges_on_one_write() {
    let a = convergence::<Agent>(1000, 1, NetModel::default(), Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(a.arrivals.len(), 1000);
    assert!(a.last < Duration::from_secs(3), "the last of 1,000 nodes had it after {:?}", a.last);
    assert!(a.bytes_per_node_per_s < 20_000.0, "{} bytes/node/s", a.bytes_per_node_per_s);
}

#[test]
fn a_crashed_node_is_declared_down_by_every_live_node_and_no_live_one_is() {
    let a = failure_detection::<Agent>(10, 3, NetModel::default()).unwrap();
    assert!(a.detected > Duration::from_millis(500), "not before a probe could fail: {:?}", a.detected);
    assert!(a.detected < Duration::from_secs(60), "{:?}", a.detected);
    assert_eq!(a.per_node.len(), 9);
    assert_eq!(a.per_node.iter().max(), Some(&a.detected));
    assert_eq!(a.false_failures, 0);
    assert_eq!(failure_detection::<Agent>(10, 3, NetModel::default()), Ok(a), "a seed replays");
}

#[test]
fn after_a_split_with_writes_on_both_sides_every_node_ends_with_both() {
    let p = partition::<Agent>(10, 4, NetModel::default(), Duration::from_secs(20), 30).unwrap();
    assert!(p.reconverged < Duration::from_secs(30), "{:?}", p.reconverged);
    assert!(p.repair_bytes_per_node > 30.0 * 10.0, "each node fetched the other side's 30 entries");
}

#[test]
fn every_networkdb_matrix_perturbation_converges_on_small_clusters() {
    use weft_sim::matrix::{CHURN, PERTURBATIONS, cell};
    for p in PERTURBATIONS {
        for n in [2, 3, 5] {
            if n < 3 && weft_sim::matrix::needs_joiner(p) {
                continue;
            }
            let d = cell::<Agent>(p, n, 11).unwrap_or_else(|e| panic!("{e}"));
            assert!(d < Duration::from_secs(2), "{p} on {n} nodes took {d:?}");
        }
    }
    for seed in 1..=3 {
        let d = cell::<Agent>(CHURN, 5, seed).unwrap_or_else(|e| panic!("{e}"));
        assert!(d < Duration::from_secs(2), "{CHURN} on 5 nodes took {d:?}");
    }
    assert!(cell::<Agent>("no-such-change", 3, 1).unwrap_err().contains("unknown perturbation"));
    assert!(cell::<Agent>(CHURN, 2, 1).unwrap_err().contains("at least 3 nodes"));
}

#[test]
fn a_cluster_forms_and_publishes_in_the_scale_run() {
    use weft_sim::scale::{ScaleOptions, scale};
    let o = ScaleOptions {
        nodes: 60,
        seed: 2,
        duration: Duration::from_secs(25),
        join_over: Duration::from_secs(5),
        seeds: 3,
        writes_per_node: 2,
        net: NetModel::default(),
        max_rss: None,
    };
    let mut samples = 0;
    let r = scale::<Agent>(&o, |_| samples += 1).unwrap();
    assert_eq!(samples, 5, "a progress sample every 5 s of virtual time");
    assert!(r.stopped.is_none());
    assert_eq!(r.virtual_time, Duration::from_secs(25));
    let joined = |d: Option<Duration>| d.is_some_and(|d| d < Duration::from_secs(15));
    assert!(joined(r.membership_converged), "{:?}", r.membership_converged);
    assert!(joined(r.tables_converged), "{:?}", r.tables_converged);
    assert!(r.work.swim_datagrams > 0 && r.work.gossip_datagrams > 0 && r.work.timers > 0);
    assert!(r.steady_bytes_per_node_per_s > 0.0);
    assert_eq!(r.live_owners_hidden, 0, "a join storm hid no live owner's entries");
    assert_eq!(scale::<Agent>(&o, |_| {}).unwrap().trace, r.trace, "a seed replays");
}

#[test]
fn fifty_soak_seeds_pass_every_checker() {
    use weft_sim::soak::{SoakOptions, soak};
    let (mut faults, mut lives, mut lifecycle) = (0, 0, 0);
    let (mut endpoints, mut pool_networks, mut node_rms, mut sandboxed) = (0, 0, 0, 0);
    for seed in 1..=50 {
        let o = SoakOptions {
            nodes: 4 + (seed as usize % 5),
            seed,
            duration: Duration::from_secs(40),
            networks: 2,
        };
        let r = soak(&o).unwrap_or_else(|e| panic!("{e}"));
        assert!(r.writes > 0, "seed {seed} wrote nothing");
        faults += r.crashes + r.leaves + r.partitions;
        lives += r.restarts + r.wipes;
        lifecycle += usize::from(r.lifecycle_checked);
        endpoints += r.endpoints;
        sandboxed += r.sandboxed;
        pool_networks += r.networks_created;
        node_rms += r.node_rms;
    }
    assert!(endpoints > 100, "endpoints created under the faults: {endpoints}");
    assert!(sandboxed > 100, "endpoints with an interface (their data plane checked): {sandboxed}");
    assert!(pool_networks > 20, "networks given a subnet and a VNI by the cluster rings: {pool_networks}");
    assert!(node_rms > 10, "crashed nodes removed while down: {node_rms}");
    assert!(faults > 100, "the soak injected faults: {faults}");
    assert!(lives > 20, "announced restarts and reinstalls: {lives}");
    assert_eq!(lifecycle, 40, "the lifecycle epilogue ran on every cluster of 5 nodes or more");
}

#[test]
fn percentiles_are_nearest_rank_in_milliseconds() {
    let samples: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
    let p = Percentiles::of(samples);
    assert_eq!((p.p50, p.p90, p.p99, p.max), (50.0, 90.0, 99.0, 100.0));
    assert_eq!(p.to_string(), "p50 50 ms  p90 90 ms  p99 99 ms  max 100 ms");
    let one = Percentiles::of(vec![Duration::from_millis(7)]);
    assert_eq!((one.p50, one.p99, one.max), (7.0, 7.0, 7.0));
}

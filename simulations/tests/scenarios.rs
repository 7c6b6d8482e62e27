//! The convergence scenario behind `weft-sim convergence`: every node gets the entry, the
//! figures are consistent, and a seed replays exactly.

use std::time::Duration;

use weft_sim::NetModel;
use weft_sim::scenarios::convergence;

#[test]
fn one_entry_reaches_every_node_and_a_seed_replays_exactly() {
    let window = Duration::from_secs(10);
    let a = convergence(12, 5, NetModel::default(), window).unwrap();
    assert_eq!(a.arrivals.len(), 12);
    assert_eq!(a.arrivals.iter().filter(|d| d.is_zero()).count(), 1, "only the writer has it at 0");
    assert_eq!(a.arrivals.iter().max(), Some(&a.last));
    assert!(a.last < Duration::from_secs(2), "{:?}", a.last);
    assert!(a.msgs_per_node_per_s > 0.0 && a.bytes_per_node_per_s > a.msgs_per_node_per_s);
    assert_eq!(convergence(12, 5, NetModel::default(), window), Ok(a.clone()), "same seed, same run");
    assert_ne!(convergence(12, 6, NetModel::default(), window), Ok(a), "another seed, another run");
}

#[test]
fn a_crashed_node_is_declared_down_by_every_live_node_and_no_live_one_is() {
    let a = weft_sim::scenarios::failure_detection(10, 3, NetModel::default()).unwrap();
    assert!(a.detected > Duration::from_millis(500), "not before a probe could fail: {:?}", a.detected);
    assert!(a.detected < Duration::from_secs(60), "{:?}", a.detected);
    assert_eq!(a.false_failures, 0);
    assert_eq!(weft_sim::scenarios::failure_detection(10, 3, NetModel::default()), Ok(a), "a seed replays");
}

#[test]
fn after_a_split_with_writes_on_both_sides_every_node_ends_with_both() {
    let p = weft_sim::scenarios::partition(10, 4, NetModel::default(), Duration::from_secs(20), 30).unwrap();
    assert!(p.reconverged < Duration::from_secs(30), "{:?}", p.reconverged);
    assert!(p.repair_bytes_per_node > 30.0 * 10.0, "each node fetched the other side's 30 entries");
}

#[test]
fn every_networkdb_matrix_perturbation_converges_on_small_clusters() {
    use weft_sim::matrix::{PERTURBATIONS, cell};
    for p in PERTURBATIONS {
        for n in [3, 5] {
            let d = cell(p, n, 11).unwrap_or_else(|e| panic!("{e}"));
            assert!(d < Duration::from_secs(2), "{p} on {n} nodes took {d:?}");
        }
    }
    assert!(cell("no-such-change", 3, 1).unwrap_err().contains("unknown perturbation"));
}

#[test]
fn percentiles_are_nearest_rank_in_milliseconds() {
    use weft_sim::scenarios::Percentiles;
    let samples: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
    let p = Percentiles::of(samples);
    assert_eq!((p.p50, p.p90, p.p99, p.max), (50.0, 90.0, 99.0, 100.0));
    assert_eq!(p.to_string(), "p50 50 ms  p90 90 ms  p99 99 ms  max 100 ms");
    let one = Percentiles::of(vec![Duration::from_millis(7)]);
    assert_eq!((one.p50, one.p99, one.max), (7.0, 7.0, 7.0));
}

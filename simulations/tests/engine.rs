//! The simulator's engine: reproducibility from a seed, the network model's faults and their
//! accounting, clock skew, and the per-second traffic series.

use std::time::Duration;

use bytes::Bytes;
use weft_gossip::Config;
use weft_sim::{Cluster, NetModel};

fn formed(n: usize, seed: u64, net: NetModel) -> Cluster {
    let mut c = Cluster::new(n, seed, Config::lan(n as u32), net);
    let seeds = [c.nodes[0].addr];
    for i in 0..n {
        c.join(i, &seeds);
    }
    c.run_for(Duration::from_secs(4));
    for i in 0..n {
        c.attach(i, "net1");
    }
    c
}

/// Runs a fixed workload and returns what a run can be told apart by.
fn fingerprint(seed: u64, net: NetModel) -> (u64, Vec<u64>, Duration) {
    let mut c = formed(6, seed, net);
    for k in 0..20 {
        c.write(k % 6, "net1", "endpoints", &format!("k{k}"), Some(Bytes::from(format!("v{k}")))).unwrap();
        c.run_for(Duration::from_millis(37));
    }
    c.run_for(Duration::from_secs(10));
    assert!(c.divergence(&["net1".into()]).is_none());
    (c.trace_hash(), c.nodes.iter().map(|s| s.traffic.bytes()).collect(), c.elapsed())
}

#[test]
fn a_seed_replays_byte_for_byte_and_another_seed_does_not() {
    let lossy = NetModel { loss: 0.1, duplicate: 0.05, reorder: 0.1, ..NetModel::default() };
    let a = fingerprint(7, lossy.clone());
    assert_eq!(fingerprint(7, lossy.clone()), a, "same seed, same trace");
    assert_ne!(fingerprint(8, lossy.clone()).0, a.0, "another seed, another trace");
    assert_ne!(fingerprint(7, NetModel::default()).0, a.0, "another network, another trace");
}

#[test]
fn loss_and_duplication_are_applied_at_their_rates_and_counted() {
    let mut c = formed(5, 3, NetModel { loss: 0.2, duplicate: 0.1, ..NetModel::default() });
    c.run_for(Duration::from_secs(30));
    let sent: u64 = c.nodes.iter().map(|s| s.traffic.datagrams).sum();
    let (lost, dup) = (c.work.lost as f64 / sent as f64, c.work.duplicated as f64 / sent as f64);
    assert!(sent > 1000, "{sent}");
    assert!((0.16..0.24).contains(&lost), "lost {lost}");
    // Duplication applies to what survived loss.
    assert!((0.06..0.10).contains(&dup), "duplicated {dup}");
    let delivered = c.work.swim_datagrams + c.work.gossip_datagrams;
    assert_eq!(
        delivered + c.in_flight_datagrams(),
        sent - c.work.lost + c.work.duplicated,
        "every datagram is accounted for"
    );
    assert!(c.membership_converged(), "SWIM rides out 20% loss");
}

#[test]
fn a_partition_drops_everything_across_it_until_healed() {
    let mut c = formed(6, 5, NetModel::default());
    c.run_for(Duration::from_secs(2));
    c.partition(&[vec![0, 1, 2], vec![3, 4, 5]]);
    let before = c.work.blocked;
    c.write(0, "net1", "endpoints", "left", Some(Bytes::from_static(b"L"))).unwrap();
    c.run_for(Duration::from_secs(3));
    assert!(c.work.blocked > before, "traffic across the cut was dropped and counted");
    assert!((0..3).all(|i| c.node(i).get_entry("net1", "endpoints", "left").is_some()));
    assert!((3..6).all(|i| c.node(i).get_entry("net1", "endpoints", "left").is_none()));
    c.heal();
    c.run_for(Duration::from_secs(20));
    assert!((0..6).all(|i| c.node(i).get_entry("net1", "endpoints", "left").is_some()));
    // One way: 5 hears nothing from 0, 0 still hears 5.
    let blocked = c.work.blocked;
    c.block_one_way(0, 5);
    c.run_for(Duration::from_secs(2));
    assert!(c.work.blocked > blocked);
    c.heal();
}

#[test]
fn a_fast_clock_fires_its_timers_faster() {
    let mut c = formed(3, 9, NetModel::default());
    c.set_clock_rate(1, 2.0);
    let (s0, s1) = (c.node(0).stats().syncs_started, c.node(1).stats().syncs_started);
    c.run_for(Duration::from_secs(60));
    let d0 = c.node(0).stats().syncs_started - s0;
    let d1 = c.node(1).stats().syncs_started - s1;
    // Anti-entropy runs every 5 s (+-10%) per network: ~24 in 60 s, ~48 at double speed.
    assert!((18..=30).contains(&d0), "normal clock: {d0}");
    assert!((38..=58).contains(&d1), "double-speed clock: {d1}");
    assert!(c.membership_converged(), "a skewed clock does not make members fail");
    // Slowing down again never moves the clock back.
    c.set_clock_rate(1, 0.5);
    c.run_for(Duration::from_secs(10));
    assert!(c.membership_converged());
}

#[test]
fn the_per_second_series_adds_up_to_the_totals() {
    let c = {
        let mut c = formed(4, 2, NetModel::default());
        c.run_for(Duration::from_secs(12));
        c
    };
    let (dg, st, msgs) = c.per_second.iter().fold((0, 0, 0), |(a, b, m), s| (a + s.0, b + s.1, m + s.2));
    let total = c.nodes.iter().fold((0, 0, 0), |(a, b, m), s| {
        (a + s.traffic.datagram_bytes, b + s.traffic.stream_bytes, m + s.traffic.messages())
    });
    assert_eq!((dg, st, msgs), total);
    assert!(c.per_second.len() >= 16, "one slot per virtual second: {}", c.per_second.len());
}

#[test]
fn the_durability_checker_catches_an_owner_losing_its_own_write_and_only_that() {
    let v = |s: &str| Some(Bytes::from(s.to_string()));
    let mut c = formed(4, 11, NetModel::default());
    c.write(0, "net1", "endpoints", "mine", v("a")).unwrap();
    c.write(1, "net1", "endpoints", "shared", v("b")).unwrap();
    c.write(2, "net1", "endpoints", "shared", v("c")).unwrap();
    c.write(3, "net1", "endpoints", "gone", v("d")).unwrap();
    c.run_for(Duration::from_secs(2));
    c.check().unwrap();
    assert_eq!(c.lost_entry(), None);
    // Two writers of one key: whichever the merge order picks, nobody lost anything.
    assert!(c.acked[&("net1".into(), "endpoints".into(), "shared".into())].contested);
    // An owner that detached, or crashed and came back, is no longer held to its writes.
    c.detach(3, "net1");
    c.crash(1);
    c.run_for(Duration::from_secs(1));
    c.restart(1, &[0]);
    c.run_for(Duration::from_secs(5));
    c.check().unwrap();
    // A delete the checker never saw acknowledged: to it, node 0 lost its own write.
    c.with(0, |n, now| n.delete_entry(now, "net1", "endpoints", "mine")).unwrap();
    let err = c.check().unwrap_err();
    assert!(
        err.contains("seed 11") && err.contains("node 0 lost its own write net1/endpoints/mine"),
        "{err}"
    );
}

#[test]
fn the_lost_entry_checker_names_a_node_without_a_write_until_it_arrives() {
    let mut c = formed(3, 12, NetModel::default());
    c.run_for(Duration::from_secs(2));
    c.partition(&[vec![0, 1], vec![2]]);
    c.write(0, "net1", "endpoints", "k", Some(Bytes::from_static(b"v"))).unwrap();
    c.run_for(Duration::from_secs(1));
    let lost = c.lost_entry().expect("node 2 is cut off");
    assert!(lost.starts_with("node 2 has net1/endpoints/k = None"), "{lost}");
    c.heal();
    assert!(c.run_until(c.now() + Duration::from_secs(60), |c| c.lost_entry().is_none()));
    c.check().unwrap();
}

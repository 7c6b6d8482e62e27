//! Lives of a node in the simulator: reinstalled hosts whose wall clock stepped back, restarts
//! announced to peers, clean leaves.

use std::time::Duration;

use bytes::Bytes;
use weft_gossip::{Config, MemberState};
use weft_sim::{AgentCluster, NetModel};

fn b(s: &'static str) -> Bytes {
    Bytes::from_static(s.as_bytes())
}

/// Five agents (seeds 0 and 1) all on `net1`, where node 3 wrote `old`, spread everywhere.
fn five_on_net1_with_an_entry_of_node_3(seed: u64) -> (AgentCluster, String) {
    let mut c = AgentCluster::new(5, seed, Config::lan(5), NetModel::default());
    let seeds: Vec<_> = (0..2).map(|i| c.nodes[i].addr).collect();
    for i in 0..5 {
        c.join(i, &seeds);
    }
    c.run_for(Duration::from_secs(3));
    let net = c.define_network(0, "net1");
    for i in 1..5 {
        c.attach(i, &net);
    }
    c.write(3, &net, "endpoints", "old", Some(b("from the old disk"))).unwrap();
    c.run_for(Duration::from_secs(5));
    (c, net)
}

#[test]
fn a_reinstalled_host_whose_clock_stepped_back_moves_above_its_earlier_life() {
    let (mut c, net) = five_on_net1_with_an_entry_of_node_3(7);
    let old = c.node(0).members().into_iter().find(|m| m.id.name.as_ref() == "node-0003").unwrap().id;
    // Node 3's host is reinstalled and its wall clock is an hour behind.
    c.wipe(3);
    c.nodes[3].wall_offset_ms = -3_600_000;
    c.restart(3, &[0, 1]);
    c.attach(3, &net);
    c.write(3, &net, "endpoints", "new", Some(b("fresh"))).unwrap();
    c.run_for(Duration::from_secs(20));
    let me = c.node(3).id().clone();
    assert!(me.generation > old.generation, "moved above: {me:?} after {old:?}");
    assert_ne!(me.instance, old.instance);
    for i in 0..5 {
        let m = c.node(i).members().into_iter().find(|m| m.id.name == me.name).unwrap();
        assert_eq!((m.id.clone(), m.state), (me.clone(), MemberState::Alive), "node {i}");
        let live: Vec<String> = c.live(i, &net, "endpoints").into_keys().collect();
        assert_eq!(live, ["new"], "node {i}");
    }
    assert_eq!(c.node(3).stats().identity_moves, 1);
    c.check().unwrap();
}

#[test]
fn a_host_that_left_and_comes_back_reinstalled_with_its_clock_behind_rejoins() {
    let mut c = AgentCluster::new(5, 9, Config::lan(5), NetModel::default());
    let seeds: Vec<_> = (0..2).map(|i| c.nodes[i].addr).collect();
    for i in 0..5 {
        c.join(i, &seeds);
    }
    c.run_for(Duration::from_secs(3));
    c.leave(3);
    c.run_for(Duration::from_secs(5));
    c.wipe(3);
    c.nodes[3].wall_offset_ms = -3_600_000;
    c.restart(3, &[0, 1]);
    c.run_for(Duration::from_secs(30));
    assert!(c.membership_converged(), "{:?}", c.membership_gap_report());
}

#[test]
fn a_life_that_died_before_publishing_its_record_is_moved_above_when_peers_say_so() {
    let mut c = AgentCluster::new(5, 11, Config::lan(5), NetModel::default());
    let seeds: Vec<_> = (0..2).map(|i| c.nodes[i].addr).collect();
    for i in 0..5 {
        c.join(i, &seeds);
    }
    c.run_for(Duration::from_secs(3));
    // Node 3 restarts and dies at once: membership heard of that life, no record of it went
    // out. Then its host is reinstalled with a clock an hour behind.
    c.crash(3);
    c.run_for(Duration::from_secs(10));
    c.restart(3, &[0, 1]);
    let dead_life = c.node(3).id().clone();
    c.run_for(Duration::from_millis(5));
    c.wipe(3);
    c.nodes[3].wall_offset_ms = -3_600_000;
    c.run_for(Duration::from_secs(10));
    c.restart(3, &[0, 1]);
    c.run_for(Duration::from_secs(30));
    let me = c.node(3).id().clone();
    assert!(me.generation > dead_life.generation, "{me:?} is above {dead_life:?}");
    assert!(c.membership_converged(), "{:?}", c.membership_gap_report());
}

#[test]
fn a_restart_announced_within_the_grace_keeps_entries_live_and_one_past_it_hides_them() {
    let mut cfg = Config::lan(4);
    cfg.restart_grace = Duration::from_secs(40);
    let mut c = AgentCluster::new(4, 13, cfg, NetModel::default());
    let seeds: Vec<_> = (0..2).map(|i| c.nodes[i].addr).collect();
    for i in 0..4 {
        c.join(i, &seeds);
    }
    c.run_for(Duration::from_secs(3));
    let net = c.define_network(0, "net1");
    for i in 1..4 {
        c.attach(i, &net);
    }
    c.write(3, &net, "endpoints", "ep3", Some(b("three"))).unwrap();
    c.run_for(Duration::from_secs(2));
    c.stop_restarting(3);
    c.run_for(Duration::from_secs(30));
    for i in 0..3 {
        let m = c.node(i).members().into_iter().find(|m| m.id.name.as_ref() == "node-0003").unwrap();
        assert_eq!(m.state, MemberState::Restarting, "node {i}");
        assert_eq!(c.node(i).get_entry(&net, "endpoints", "ep3"), Some(b("three")), "kept live at node {i}");
    }
    // Back within the grace: nothing was ever hidden.
    c.restart(3, &[0, 1]);
    c.run_for(Duration::from_secs(5));
    for i in 0..3 {
        assert!(c.nodes[i].watched.holds(&net, "endpoints", "ep3", b"three"), "node {i}");
        assert_eq!(c.node(i).stats().owners_hidden_failed, 0, "node {i} hid nothing");
    }
    // A stop whose restart takes longer than the grace: hidden after it, back on return.
    c.stop_restarting(3);
    c.run_for(Duration::from_secs(60));
    for i in 0..3 {
        assert_eq!(c.node(i).get_entry(&net, "endpoints", "ep3"), None, "hidden at node {i}");
    }
    c.restart(3, &[0, 1]);
    c.run_for(Duration::from_secs(10));
    for i in 0..3 {
        assert_eq!(c.node(i).get_entry(&net, "endpoints", "ep3"), Some(b("three")), "restored at node {i}");
    }
    c.check().unwrap();
}

#[test]
fn a_reinstalled_host_whose_clock_stepped_back_drops_its_earlier_instances_networks_it_did_not_rejoin() {
    let (mut c, net) = five_on_net1_with_an_entry_of_node_3(13);
    // Node 3's host is reinstalled, its wall clock an hour behind, and it does not attach net1
    // again: its earlier instance's attachment and entries there must go all the same.
    c.wipe(3);
    c.nodes[3].wall_offset_ms = -3_600_000;
    c.restart(3, &[0, 1]);
    c.run_for(Duration::from_secs(30));
    assert_eq!(c.node(3).stats().identity_moves, 1, "it moved above its earlier life");
    for i in 0..5 {
        assert!(c.live(i, &net, "endpoints").is_empty(), "node {i} still holds the earlier instance's entry");
        assert!(
            !c.node(i).network_peers(&net).iter().any(|p| &*p.name == "node-0003") || i == 3,
            "node {i} still counts node 3 attached"
        );
    }
    c.check().unwrap();
}

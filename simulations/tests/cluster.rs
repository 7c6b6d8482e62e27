//! Cross-node behaviour of the gossip core, on the in-memory cluster.

use std::cmp::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use weft_gossip::{
    Config, DownReason, EntryState, Event, MemberState, MergeRule, ObjectType, TableSpec, VersionRef,
};
use weft_sim::{Cluster, NetModel};

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn settled(n: usize, seed: u64) -> Cluster {
    let mut c = Cluster::settled(n, seed, Config::lan(n as u32), NetModel::default());
    assert!(c.membership_converged(), "seed {seed}: membership did not converge");
    for i in 0..n {
        c.attach(i, "net1");
    }
    c.run_for(Duration::from_secs(2));
    c
}

fn state_of(c: &Cluster, at: usize, of: usize) -> MemberState {
    let name = c.nodes[of].name.as_str();
    c.node(at).members().into_iter().find(|m| &*m.id.name == name).map(|m| m.state).expect("known member")
}

fn no_violation(c: &Cluster) {
    assert!(c.watcher_violation.is_none(), "seed {}: {:?}", c.seed, c.watcher_violation);
}

#[test]
fn create_update_delete_reach_every_attached_node() {
    let mut c = settled(5, 1);
    c.with(2, |n, now| n.create_entry(now, "net1", "endpoints", "ep1", b("v1")).unwrap());
    c.run_for(Duration::from_secs(1));
    for i in 0..5 {
        assert_eq!(c.node(i).get_entry("net1", "endpoints", "ep1"), Some(b("v1")), "node {i}");
        assert!(c.nodes[i].watched.holds("net1", "endpoints", "ep1", b"v1"), "node {i}");
    }
    c.with(2, |n, now| n.update_entry(now, "net1", "endpoints", "ep1", b("v2")).unwrap());
    c.run_for(Duration::from_secs(1));
    assert!((0..5).all(|i| c.node(i).get_entry("net1", "endpoints", "ep1") == Some(b("v2"))));
    c.with(2, |n, now| n.delete_entry(now, "net1", "endpoints", "ep1").unwrap());
    c.run_for(Duration::from_secs(1));
    for i in 0..5 {
        assert_eq!(c.node(i).get_entry("net1", "endpoints", "ep1"), None);
        let t = c.node(i).table("net1", "endpoints");
        assert!(matches!(t[0].state, EntryState::Tombstone { .. }), "node {i} keeps a tombstone");
    }
    no_violation(&c);
}

#[test]
fn commands_refuse_what_they_cannot_do_and_change_nothing() {
    let mut c = settled(2, 2);
    c.with(0, |n, now| {
        n.create_entry(now, "net1", "endpoints", "k", b("v")).unwrap();
        assert!(n.create_entry(now, "net1", "endpoints", "k", b("w")).is_err(), "create on a live key");
        assert!(n.update_entry(now, "net1", "endpoints", "missing", b("w")).is_err());
        assert!(n.delete_entry(now, "net1", "endpoints", "missing").is_err());
        assert!(n.create_entry(now, "nope", "endpoints", "k", b("v")).is_err(), "unattached network");
        assert!(n.create_entry(now, "net1", "weft:attachments", "k", b("v")).is_err(), "reserved table");
        assert!(n.leave_network(now, "cluster").is_err(), "cluster cannot be left");
        assert_eq!(n.get_entry("net1", "endpoints", "k"), Some(b("v")));
        // Re-creating a deleted key is fine.
        n.delete_entry(now, "net1", "endpoints", "k").unwrap();
        n.create_entry(now, "net1", "endpoints", "k", b("again")).unwrap();
    });
    c.run_for(Duration::from_secs(1));
    assert_eq!(c.node(1).get_entry("net1", "endpoints", "k"), Some(b("again")));
}

#[test]
fn entries_go_only_to_nodes_attached_to_their_network() {
    let mut c = Cluster::settled(6, 3, Config::lan(6), NetModel::default());
    for i in 0..3 {
        c.attach(i, "red");
    }
    c.run_for(Duration::from_secs(1));
    c.with(0, |n, now| n.create_entry(now, "red", "endpoints", "e", b("x")).unwrap());
    c.run_for(Duration::from_secs(6));
    for i in 0..3 {
        assert_eq!(c.node(i).get_entry("red", "endpoints", "e"), Some(b("x")));
    }
    for i in 3..6 {
        assert!(!c.node(i).is_attached("red"));
        assert_eq!(c.node(i).entry_count("red"), 0, "node {i} holds nothing of red");
        let peers: Vec<_> = c.node(i).network_peers("red").iter().map(|p| p.name.to_string()).collect();
        assert_eq!(peers.len(), 3, "but knows who is attached: {peers:?}");
    }
}

#[test]
fn a_failed_owner_hides_its_entries_and_its_return_restores_them() {
    let mut c = settled(5, 4);
    c.with(3, |n, now| n.create_entry(now, "net1", "endpoints", "ep3", b("three")).unwrap());
    c.with(1, |n, now| n.create_entry(now, "net1", "defs", "net-def", b("def")).unwrap());
    c.run_for(Duration::from_secs(1));
    assert!(c.nodes[0].watched.saw("net1", "endpoints", "ep3"));

    c.crash(3);
    c.crash(1);
    c.run_for(Duration::from_secs(20));
    assert_eq!(state_of(&c, 0, 3), MemberState::Failed);
    // Hidden, not deleted: watchers saw a delete; the entry is still held.
    assert_eq!(c.node(0).get_entry("net1", "endpoints", "ep3"), None);
    assert!(!c.nodes[0].watched.saw("net1", "endpoints", "ep3"));
    let t = c.node(0).table("net1", "endpoints");
    assert!(matches!(t[0].state, EntryState::Hidden { .. }), "{t:?}");
    // Cluster entries outlive their writer.
    assert_eq!(c.node(0).get_entry("net1", "defs", "net-def"), Some(b("def")));

    c.restart(3, &[0]);
    c.run_for(Duration::from_secs(10));
    assert_eq!(state_of(&c, 0, 3), MemberState::Alive);
    for i in [0, 2, 3, 4] {
        assert_eq!(c.node(i).get_entry("net1", "endpoints", "ep3"), Some(b("three")), "node {i}");
        assert!(c.nodes[i].watched.saw("net1", "endpoints", "ep3"), "node {i} saw the create");
    }
    // The restarted node owns its entry again.
    c.with(3, |n, now| n.update_entry(now, "net1", "endpoints", "ep3", b("three-b")).unwrap());
    c.run_for(Duration::from_secs(1));
    assert!([0, 2, 4].iter().all(|&i| c.node(i).get_entry("net1", "endpoints", "ep3") == Some(b("three-b"))));
    no_violation(&c);
}

#[test]
fn a_clean_leave_deletes_the_leavers_entries_at_once() {
    let mut c = settled(5, 5);
    c.with(4, |n, now| {
        n.create_entry(now, "net1", "endpoints", "ep4", b("four")).unwrap();
        n.create_entry(now, "net1", "defs", "def4", b("stays")).unwrap();
    });
    c.run_for(Duration::from_secs(1));
    c.leave(4);
    c.run_for(Duration::from_millis(500));
    for i in 0..4 {
        assert_eq!(c.node(i).get_entry("net1", "endpoints", "ep4"), None, "node {i}");
        assert_eq!(c.node(i).get_entry("net1", "defs", "def4"), Some(b("stays")), "node {i}");
    }
    c.run_for(Duration::from_secs(5));
    for i in 0..4 {
        assert_eq!(state_of(&c, i, 4), MemberState::Left, "node {i}");
        let t = c.node(i).table("net1", "endpoints");
        assert!(matches!(t[0].state, EntryState::Tombstone { .. }), "node {i}: {t:?}");
    }
    no_violation(&c);
}

#[test]
fn leave_is_reported_as_left_and_failure_as_failed() {
    let mut c = settled(4, 6);
    c.record = true;
    c.leave(3);
    c.crash(2);
    c.run_for(Duration::from_secs(20));
    let ms = c.node(0).members();
    let find = |name: &str| ms.iter().find(|m| &*m.id.name == name).unwrap().state;
    assert_eq!(find("node-0003"), MemberState::Left);
    assert_eq!(find("node-0002"), MemberState::Failed);
    let _ = (DownReason::Left, Event::Connected(true));
}

#[test]
fn detaching_removes_the_nodes_entries_from_that_network() {
    let mut c = settled(4, 7);
    c.with(2, |n, now| n.create_entry(now, "net1", "endpoints", "ep2", b("x")).unwrap());
    c.run_for(Duration::from_secs(1));
    c.detach(2, "net1");
    c.run_for(Duration::from_secs(1));
    for i in [0, 1, 3] {
        assert_eq!(c.node(i).get_entry("net1", "endpoints", "ep2"), None, "node {i}");
        assert!(!c.node(i).network_peers("net1").iter().any(|p| &*p.name == "node-0002"));
    }
    assert_eq!(c.node(2).entry_count("net1"), 0);
    // Re-attaching and writing again works.
    c.attach(2, "net1");
    c.run_for(Duration::from_secs(1));
    c.with(2, |n, now| n.create_entry(now, "net1", "endpoints", "ep2", b("y")).unwrap());
    c.run_for(Duration::from_secs(1));
    assert!((0..4).all(|i| c.node(i).get_entry("net1", "endpoints", "ep2") == Some(b("y"))));
    no_violation(&c);
}

#[test]
fn a_missed_attach_never_makes_peers_reject_entries() {
    let mut c = settled(3, 8);
    c.with(0, |n, now| n.join_network(now, "blue").unwrap());
    c.with(1, |n, now| n.join_network(now, "blue").unwrap());
    c.run_for(Duration::from_secs(1));
    // Node 2 attaches while nobody hears it; its attach record and first write are lost.
    c.partition(&[vec![0, 1], vec![2]]);
    c.attach(2, "blue");
    c.with(2, |n, now| n.create_entry(now, "blue", "endpoints", "from-2", b("x")).unwrap());
    c.run_for(Duration::from_millis(500));
    c.heal();
    c.run_for(Duration::from_secs(30));
    for i in 0..3 {
        assert_eq!(c.node(i).get_entry("blue", "endpoints", "from-2"), Some(b("x")), "node {i}");
        assert_eq!(c.node(i).network_peers("blue").len(), 2, "node {i}");
    }
}

#[derive(Debug)]
struct HighestVersionWins;

impl MergeRule for HighestVersionWins {
    fn compare(&self, a: &VersionRef<'_>, b: &VersionRef<'_>) -> Ordering {
        let v = |x: &VersionRef<'_>| x.value.first().copied().unwrap_or(0);
        v(a).cmp(&v(b))
    }
}

#[test]
fn a_cluster_table_merge_rule_decides_on_every_node() {
    let mut c = settled(4, 9);
    for i in 0..4 {
        c.with(i, |n, _| {
            n.register_table(
                "ring",
                TableSpec::cluster(ObjectType::Opaque).with_merge(Arc::new(HighestVersionWins)),
            )
            .unwrap()
        });
    }
    c.with(0, |n, now| {
        n.create_entry(now, "net1", "ring", "range-1", Bytes::from_static(&[9, b'a'])).unwrap()
    });
    c.run_for(Duration::from_secs(1));
    // A later write with a lower version loses, and its writer is told so.
    let err = c.with(1, |n, now| {
        n.update_entry(now, "net1", "ring", "range-1", Bytes::from_static(&[3, b'b'])).unwrap_err()
    });
    assert!(matches!(err, weft_gossip::Error::Superseded { .. }), "{err}");
    assert_eq!(c.node(1).get_entry("net1", "ring", "range-1"), Some(Bytes::from_static(&[9, b'a'])));
    c.run_for(Duration::from_secs(1));
    c.with(2, |n, now| {
        n.update_entry(now, "net1", "ring", "range-1", Bytes::from_static(&[12, b'c'])).unwrap()
    });
    c.run_for(Duration::from_secs(7));
    for i in 0..4 {
        assert_eq!(
            c.node(i).get_entry("net1", "ring", "range-1"),
            Some(Bytes::from_static(&[12, b'c'])),
            "node {i}"
        );
    }
    // A delete carries the value it deletes, so the rule ranks it equal and it wins by time.
    c.with(3, |n, now| n.delete_entry(now, "net1", "ring", "range-1").unwrap());
    c.run_for(Duration::from_secs(2));
    assert!((0..4).all(|i| c.node(i).get_entry("net1", "ring", "range-1").is_none()));
}

#[test]
fn a_restarted_node_gets_its_entries_back_and_never_writes_with_an_older_clock() {
    let mut c = settled(4, 10);
    c.with(1, |n, now| {
        for k in 0..20 {
            n.create_entry(now, "net1", "endpoints", &format!("ep{k}"), b("old")).unwrap();
        }
    });
    c.run_for(Duration::from_secs(2));
    let before = c.node(1).ltime();
    c.crash(1);
    c.run_for(Duration::from_secs(2));
    c.restart(1, &[0]);
    assert!(c.node(1).ltime() >= before, "the persisted high-water mark is the floor");
    c.run_for(Duration::from_secs(6));
    assert_eq!(c.live(1, "net1", "endpoints").len(), 20, "entries came back from peers");
    c.with(1, |n, now| {
        n.update_entry(now, "net1", "endpoints", "ep0", b("new")).unwrap();
        n.delete_entry(now, "net1", "endpoints", "ep1").unwrap();
    });
    c.run_for(Duration::from_secs(1));
    for i in 0..4 {
        assert_eq!(c.node(i).get_entry("net1", "endpoints", "ep0"), Some(b("new")), "node {i}");
        assert_eq!(c.node(i).get_entry("net1", "endpoints", "ep1"), None, "node {i}");
    }
    no_violation(&c);
}

#[test]
fn a_restart_without_a_persisted_clock_still_wins_by_witnessing_peers() {
    let mut c = settled(3, 11);
    c.with(2, |n, now| {
        for k in 0..50 {
            n.create_entry(now, "net1", "endpoints", &format!("k{k}"), b("a")).unwrap();
        }
        n.delete_entry(now, "net1", "endpoints", "k0").unwrap();
    });
    c.run_for(Duration::from_secs(2));
    c.crash(2);
    c.nodes[2].persisted_ltime = 0;
    c.restart(2, &[0]);
    c.run_for(Duration::from_secs(6));
    c.with(2, |n, now| n.create_entry(now, "net1", "endpoints", "k0", b("reborn")).unwrap());
    c.run_for(Duration::from_secs(2));
    for i in 0..3 {
        assert_eq!(c.node(i).get_entry("net1", "endpoints", "k0"), Some(b("reborn")), "node {i}");
    }
}

#[test]
fn both_sides_of_a_partition_converge_after_it_heals() {
    let mut c = settled(10, 12);
    c.partition(&[(0..5).collect(), (5..10).collect()]);
    c.run_for(Duration::from_secs(30));
    c.with(1, |n, now| n.create_entry(now, "net1", "endpoints", "left-side", b("L")).unwrap());
    c.with(7, |n, now| n.create_entry(now, "net1", "endpoints", "right-side", b("R")).unwrap());
    c.with(8, |n, now| n.create_entry(now, "net1", "defs", "shared", b("R")).unwrap());
    c.with(2, |n, now| n.create_entry(now, "net1", "defs", "shared", b("L")).unwrap());
    c.run_for(Duration::from_secs(5));
    c.heal();
    let end = c.now() + Duration::from_secs(60);
    let ok = c.run_until(end, |c| c.membership_converged() && c.divergence(&["net1".into()]).is_none());
    assert!(ok, "seed 12: {:?}", c.divergence(&["net1".into()]));
    for i in 0..10 {
        assert_eq!(c.node(i).get_entry("net1", "endpoints", "left-side"), Some(b("L")));
        assert_eq!(c.node(i).get_entry("net1", "endpoints", "right-side"), Some(b("R")));
        assert!(c.node(i).get_entry("net1", "defs", "shared").is_some());
    }
    no_violation(&c);
}

#[test]
fn a_node_keeps_announcing_to_seeds_that_are_not_up_yet() {
    let mut c = Cluster::new(3, 13, Config::lan(3), NetModel::default());
    c.crash(0);
    let seed = [c.nodes[0].addr];
    c.with(1, |n, now| n.join(now, &seed).unwrap());
    c.with(2, |n, now| n.join(now, &seed).unwrap());
    c.run_for(Duration::from_secs(10));
    assert_eq!(c.node(1).unreachable_seeds(), seed.to_vec());
    c.restart(0, &[]);
    c.run_for(Duration::from_secs(5));
    assert!(c.membership_converged());
    assert!(c.node(1).unreachable_seeds().is_empty());
}

#[test]
fn identical_10k_entry_tables_cost_a_digest_per_sync() {
    let mut c = settled(2, 14);
    c.with(0, |n, now| {
        for k in 0..10_000 {
            n.create_entry(now, "net1", "endpoints", &format!("endpoint-{k:05}"), Bytes::from(vec![1u8; 40]))
                .unwrap();
        }
    });
    c.run_for(Duration::from_secs(30));
    assert_eq!(c.live(1, "net1", "endpoints").len(), 10_000);
    assert_eq!(c.node(0).queue_len("net1"), 0);
    let before: Vec<_> = (0..2).map(|i| (c.nodes[i].traffic, c.node(i).stats().clone())).collect();
    c.run_for(Duration::from_secs(20));
    let mut bytes = 0;
    let mut syncs = 0;
    for i in 0..2 {
        bytes += c.nodes[i].traffic.stream_bytes - before[i].0.stream_bytes;
        syncs += c.node(i).stats().syncs_started - before[i].1.syncs_started;
        assert_eq!(
            c.node(i).stats().syncs_identical - before[i].1.syncs_identical,
            c.node(1 - i).stats().syncs_started - before[1 - i].1.syncs_started
        );
    }
    // Each round syncs `net1` and `cluster`; the net1 digest is what matters.
    assert!(syncs >= 4, "syncs ran: {syncs}");
    let per_sync = bytes / syncs;
    assert!(per_sync < 2048, "{per_sync} bytes per sync round");
}

#[test]
fn no_datagram_exceeds_the_packet_size_and_a_backlog_drains_fast() {
    let mut c = settled(20, 15);
    c.with(0, |n, now| {
        for k in 0..1000 {
            n.create_entry(now, "net1", "endpoints", &format!("key-{k:04}"), Bytes::from(vec![b'v'; 30]))
                .unwrap();
        }
    });
    let start = c.now();
    // networkdb takes about 22 s here; the bound is ten times tighter.
    let ok = c.run_until(start + Duration::from_millis(2200), |c| {
        (0..20).all(|i| c.node(i).table("net1", "endpoints").len() == 1000)
    });
    assert!(ok, "seed 15: the burst did not reach all 20 nodes in 2.2 s of virtual time");
    assert!(c.max_datagram <= 1400, "a datagram of {} bytes", c.max_datagram);
}

#[test]
fn large_values_travel_by_stream_and_messages_reach_their_node() {
    let mut c = settled(3, 16);
    let big = Bytes::from(vec![42u8; 20_000]);
    c.with(0, |n, now| n.create_entry(now, "net1", "endpoints", "big", big.clone()).unwrap());
    c.run_for(Duration::from_secs(2));
    assert!((0..3).all(|i| c.node(i).get_entry("net1", "endpoints", "big") == Some(big.clone())));
    assert!(c.max_datagram <= 1400);
    c.record = true;
    c.with(1, |n, now| {
        n.send_message(now, "node-0002", b("small")).unwrap();
        n.send_message(now, "node-0002", big.clone()).unwrap();
        assert!(n.send_message(now, "nobody", b("x")).is_err());
    });
    c.run_for(Duration::from_millis(100));
    // Datagram and stream take different paths, so either may arrive first.
    let mut got: Vec<usize> = c.messages[2]
        .iter()
        .map(|(from, d)| {
            assert_eq!(from, "node-0001");
            d.len()
        })
        .collect();
    got.sort();
    assert_eq!(got, vec![5, big.len()]);
    assert!(c.messages[2].iter().any(|(_, d)| *d == big));
}

#[test]
fn a_name_claimed_from_another_address_is_reported() {
    let mut c = Cluster::new(3, 17, Config::lan(3), NetModel::default());
    // Node 2 is misconfigured with node 1's name.
    c.nodes[2].name = c.nodes[1].name.clone();
    c.restart(2, &[0]);
    let seed = [c.nodes[0].addr];
    c.with(1, |n, now| n.join(now, &seed).unwrap());
    c.with(0, |n, now| n.join(now, &[]).unwrap());
    c.run_for(Duration::from_secs(10));
    assert!(c.name_conflicts[1] + c.name_conflicts[2] > 0, "someone noticed the clash");
}

#[test]
fn tombstones_carry_their_residual_reap_time_when_synced() {
    let mut cfg = Config::lan(3);
    cfg.reap_after = Duration::from_secs(60);
    let mut c = Cluster::settled(3, 18, cfg, NetModel::default());
    c.attach(0, "net1");
    c.attach(1, "net1");
    c.run_for(Duration::from_secs(1));
    c.with(0, |n, now| {
        n.create_entry(now, "net1", "endpoints", "gone", b("x")).unwrap();
        n.delete_entry(now, "net1", "endpoints", "gone").unwrap();
    });
    c.run_for(Duration::from_secs(30));
    // Node 2 attaches half way through the reap interval and syncs the tombstone.
    c.attach(2, "net1");
    c.run_for(Duration::from_secs(2));
    let t = c.node(2).table("net1", "endpoints");
    let EntryState::Tombstone { reap_in } = t[0].state else { panic!("{t:?}") };
    assert!(reap_in <= Duration::from_secs(29) && reap_in >= Duration::from_secs(25), "{reap_in:?}");
    // And everyone reaps it at about the same time.
    c.run_for(Duration::from_secs(35));
    for i in 0..3 {
        assert!(c.node(i).table("net1", "endpoints").is_empty(), "node {i} reaped");
        assert_eq!(c.node(i).get_entry("net1", "endpoints", "gone"), None);
    }
}

#[test]
fn a_large_repair_is_split_into_frames_within_the_limit() {
    let mut cfg = Config::lan(2);
    cfg.max_stream_frame = 64 << 10;
    cfg.max_entries_per_frame = 500;
    // A tiny queue: almost everything must travel by anti-entropy.
    cfg.max_queue_len = 8;
    let mut c = Cluster::settled(2, 19, cfg, NetModel::default());
    c.attach(0, "net1");
    c.attach(1, "net1");
    c.run_for(Duration::from_secs(2));
    c.with(0, |n, now| {
        for k in 0..5000 {
            n.create_entry(now, "net1", "endpoints", &format!("e{k:05}"), Bytes::from(vec![3u8; 32]))
                .unwrap();
        }
    });
    assert!(c.node(0).stats().queue_drops > 4000, "the queue bound held");
    let end = c.now() + Duration::from_secs(30);
    assert!(c.run_until(end, |c| c.live(1, "net1", "endpoints").len() == 5000), "seed 19: repaired");
    assert!(c.max_stream_frame <= 64 << 10, "a {}-byte frame", c.max_stream_frame);
    assert_eq!(c.node(1).stats().decode_errors, 0);
}

#[test]
fn a_node_that_never_knew_a_failed_owner_does_not_resurrect_its_entries() {
    let mut cfg = Config::lan(5);
    cfg.reap_after = Duration::from_secs(120);
    let grace = cfg.unknown_owner_grace();
    let mut c = Cluster::new(5, 20, cfg, NetModel::default());
    let seeds = [c.nodes[0].addr];
    for i in 0..4 {
        c.with(i, |n, now| n.join(now, &seeds).unwrap());
        c.attach(i, "net1");
    }
    c.run_for(Duration::from_secs(3));
    c.with(3, |n, now| n.create_entry(now, "net1", "endpoints", "ep3", b("three")).unwrap());
    c.run_for(Duration::from_secs(1));
    c.crash(3);
    c.run_for(Duration::from_secs(40));
    assert_eq!(state_of(&c, 0, 3), MemberState::Failed);
    // Node 4 joins after the failure: it never sees node 3 alive, and foca's feeds carry only
    // active members. A peer's hidden flag does not hide an owner here (a stale peer must not
    // hide a live one): node 4 judges node 3 itself, as unknown, and hides its entries once the
    // unknown-owner grace is over.
    c.with(4, |n, now| n.join(now, &seeds).unwrap());
    c.attach(4, "net1");
    c.run_for(Duration::from_secs(10));
    let t = c.node(4).table("net1", "endpoints");
    assert_eq!(t.len(), 1, "synced");
    c.run_for(grace);
    let t = c.node(4).table("net1", "endpoints");
    assert!(matches!(t[0].state, EntryState::Hidden { .. }), "hidden after the grace: {t:?}");
    assert_eq!(c.node(4).stats().owners_hidden_unknown, 1);
    // Once the reap interval is over, nobody holds it, and nobody hands it back: the others
    // forgot node 3 and refuse its entries, node 4 reaps its copy in turn.
    c.run_for(Duration::from_secs(240));
    for i in [0, 1, 2, 4] {
        assert!(c.node(i).table("net1", "endpoints").is_empty(), "node {i}");
    }
    no_violation(&c);
}

#[test]
fn a_restart_that_does_not_reattach_a_network_detaches_it() {
    let mut c = settled(3, 21);
    c.with(2, |n, now| n.create_entry(now, "net1", "endpoints", "ep2", b("x")).unwrap());
    c.run_for(Duration::from_secs(1));
    c.crash(2);
    c.run_for(Duration::from_secs(2));
    // Restart without re-attaching net1 (the agent did not persist it).
    c.nodes[2].networks.clear();
    c.restart(2, &[0]);
    // It waits out a grace period first (the records might be a same-named twin's).
    c.run_for(Duration::from_secs(5));
    assert!(c.node(0).network_peers("net1").iter().any(|p| &*p.name == "node-0002"));
    c.run_for(Duration::from_secs(15));
    for i in 0..2 {
        assert!(!c.node(i).network_peers("net1").iter().any(|p| &*p.name == "node-0002"), "node {i}");
        assert_eq!(c.node(i).get_entry("net1", "endpoints", "ep2"), None, "node {i}");
    }
}

#[test]
fn large_events_are_split_into_frames_within_the_limit() {
    let mut cfg = Config::lan(3);
    cfg.max_stream_frame = 64 << 10;
    let mut c = Cluster::settled(3, 22, cfg, NetModel::default());
    for i in 0..3 {
        c.attach(i, "net1");
    }
    c.run_for(Duration::from_secs(1));
    let big = Bytes::from(vec![9u8; 30_000]);
    c.with(0, |n, now| {
        for k in 0..6 {
            n.create_entry(now, "net1", "endpoints", &format!("big{k}"), big.clone()).unwrap();
        }
        assert!(n.create_entry(now, "net1", "endpoints", "huge", Bytes::from(vec![0u8; 40_000])).is_err());
    });
    c.run_for(Duration::from_secs(3));
    for i in 0..3 {
        assert_eq!(c.live(i, "net1", "endpoints").len(), 6, "node {i}");
        assert_eq!(c.node(i).stats().decode_errors, 0);
    }
    assert!(c.max_stream_frame <= 64 << 10, "a {}-byte frame", c.max_stream_frame);
}

#[test]
fn members_failed_longer_than_the_reap_interval_are_forgotten() {
    let mut cfg = Config::lan(3);
    cfg.reap_after = Duration::from_secs(60);
    let mut c = Cluster::settled(3, 23, cfg, NetModel::default());
    c.crash(2);
    c.run_for(Duration::from_secs(30));
    assert_eq!(state_of(&c, 0, 2), MemberState::Failed);
    c.run_for(Duration::from_secs(60));
    assert!(!c.node(0).members().iter().any(|m| &*m.id.name == "node-0002"));
}

#[test]
fn a_hidden_key_can_be_taken_over() {
    let mut c = settled(3, 24);
    c.with(2, |n, now| n.create_entry(now, "net1", "endpoints", "vip", b("on-2")).unwrap());
    c.run_for(Duration::from_secs(1));
    c.crash(2);
    c.run_for(Duration::from_secs(20));
    assert_eq!(c.node(0).get_entry("net1", "endpoints", "vip"), None);
    c.with(0, |n, now| n.create_entry(now, "net1", "endpoints", "vip", b("on-0")).unwrap());
    c.run_for(Duration::from_secs(1));
    assert_eq!(c.node(1).get_entry("net1", "endpoints", "vip"), Some(b("on-0")));
    no_violation(&c);
}

#[test]
fn an_impostor_of_a_name_does_not_hide_the_holders_entries() {
    let mut c = Cluster::new(3, 25, Config::lan(3), NetModel::default());
    let seeds = [c.nodes[0].addr];
    for i in 0..2 {
        c.with(i, |n, now| n.join(now, &seeds).unwrap());
        c.attach(i, "net1");
    }
    c.run_for(Duration::from_secs(3));
    c.with(1, |n, now| n.create_entry(now, "net1", "endpoints", "ep1", b("holder")).unwrap());
    c.run_for(Duration::from_secs(1));
    // Node 2 is misconfigured with node 1's name and a newer generation; it joins, then (as the
    // agent does when it finds its name taken) stops without leaving.
    c.nodes[2].name = c.nodes[1].name.clone();
    c.nodes[2].generation = 5;
    c.restart(2, &[0]);
    c.run_for(Duration::from_secs(2));
    c.crash(2);
    c.run_for(Duration::from_secs(30));
    assert_eq!(state_of(&c, 0, 1), MemberState::Alive);
    assert_eq!(c.node(0).get_entry("net1", "endpoints", "ep1"), Some(b("holder")));
    assert!(c.nodes[0].watched.saw("net1", "endpoints", "ep1"));
}

#[test]
fn news_is_relayed_within_the_relay_delay_once_per_gossip_interval() {
    // Rounds every 10 s: only the early relay can carry news on within a second.
    let cfg = Config { gossip_interval: Duration::from_secs(10), ..Config::lan(3) };
    let mut c = Cluster::settled(3, 4, cfg, NetModel::default());
    for i in 0..3 {
        c.attach(i, "net1");
    }
    c.run_for(Duration::from_secs(12));
    // Node 0 cannot reach node 2: what node 2 gets, node 1 relays.
    c.block_one_way(0, 2);
    c.write(0, "net1", "endpoints", "first", Some(b("1"))).unwrap();
    c.run_for(Duration::from_millis(30));
    assert!(c.node(2).get_entry("net1", "endpoints", "first").is_some(), "relayed early");
    // More news within the same interval waits for the round: a storm goes out in rounds.
    c.write(0, "net1", "endpoints", "second", Some(b("2"))).unwrap();
    c.run_for(Duration::from_millis(500));
    assert!(c.node(1).get_entry("net1", "endpoints", "second").is_some());
    assert!(c.node(2).get_entry("net1", "endpoints", "second").is_none(), "not relayed early twice");
    c.run_for(Duration::from_secs(10));
    assert!(c.node(2).get_entry("net1", "endpoints", "second").is_some(), "the round carries it");
}

#[test]
fn a_node_that_never_saw_an_owner_restores_its_entries_when_it_returns() {
    let mut c = Cluster::new(5, 21, Config::lan(5), NetModel::default());
    let seeds = [c.nodes[0].addr];
    for i in 0..4 {
        c.join(i, &seeds);
    }
    c.run_for(Duration::from_secs(3));
    for i in 0..4 {
        c.attach(i, "net1");
    }
    c.write(3, "net1", "endpoints", "ep3", Some(b("three"))).unwrap();
    c.run_for(Duration::from_secs(2));
    c.crash(3);
    c.run_for(Duration::from_secs(20));
    // Node 4 arrives after node 3 failed: it never knew node 3, and hides its entries once the
    // unknown-owner grace is over.
    c.join(4, &seeds);
    c.attach(4, "net1");
    let grace = c.cfg.unknown_owner_grace();
    c.run_for(grace + Duration::from_secs(12));
    assert_eq!(c.node(4).get_entry("net1", "endpoints", "ep3"), None);
    assert!(matches!(c.node(4).table("net1", "endpoints")[0].state, EntryState::Hidden { .. }));
    c.restart(3, &[0]);
    c.run_for(Duration::from_secs(10));
    assert_eq!(c.node(4).get_entry("net1", "endpoints", "ep3"), Some(b("three")), "restored");
    assert!(c.nodes[4].watched.saw("net1", "endpoints", "ep3"), "and its watcher saw the create");
    no_violation(&c);
}

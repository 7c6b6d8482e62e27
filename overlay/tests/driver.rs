//! The overlay driver and its peer DB against the in-memory data plane.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use proptest::prelude::*;
use weft_overlay::dataplane::{DpError, DpOp, MemDataplane};
use weft_overlay::driver::{VXLANID_OPTION, expected_peers};
use weft_overlay::driverapi::{
    Driver, EndpointInterface, Joined, NetworkAllocator, TableWatcher, Version, ipam_v4,
};
use weft_overlay::{Dataplane, Mac, OVERLAY_PEER_TABLE, OverlayDriver, PeerRecord};

const NID: &str = "0123456789abcdef0123456789abcdef";

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 1, 0, last)
}

fn vtep(host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(192, 0, 2, host))
}

fn record(last: u8, host: u8) -> Vec<u8> {
    PeerRecord {
        endpoint_ip: format!("{}/24", ip(last)),
        endpoint_mac: Mac::from_ipv4(ip(last)).to_string(),
        tunnel_endpoint_ip: vtep(host).to_string(),
    }
    .encode()
}

/// A driver for node `h1` with the network created, and owners `h2..h9` at their VTEPs.
fn driver() -> OverlayDriver {
    let mut d = OverlayDriver::new("h1", vtep(1));
    let mut opts = BTreeMap::new();
    opts.insert(VXLANID_OPTION.to_string(), "4097".to_string());
    let v4 = [ipam_v4("10.1.0.0/24".parse().unwrap(), Some(IpAddr::V4(ip(1))))];
    let opts = d.network_allocate(NID, &opts, &v4, &[]).unwrap();
    d.create_network(NID, &opts, &v4, &[]).unwrap();
    for h in 2..10 {
        d.set_owner_vtep(&format!("h{h}"), Some(vtep(h)));
    }
    d
}

/// Applies every pending operation; returns them.
fn run(d: &mut OverlayDriver, dp: &mut MemDataplane) -> Vec<DpOp> {
    let mut ops = Vec::new();
    while let Some((id, op)) = d.poll_op() {
        let r = dp.apply(&op);
        d.handle_done(id, r);
        ops.push(op);
    }
    ops
}

fn put(d: &mut OverlayDriver, key: &str, v: &[u8], ltime: u64, owner: &str) {
    d.event_notify(NID, OVERLAY_PEER_TABLE, key, None, Some(v), Version { ltime, owner });
}

fn del(d: &mut OverlayDriver, key: &str, ltime: u64, owner: &str) {
    d.event_notify(NID, OVERLAY_PEER_TABLE, key, None, None, Version { ltime, owner });
}

fn local_join(d: &mut OverlayDriver, eid: &str, last: u8, sandbox: Option<&str>) -> Joined {
    let mut iface = EndpointInterface {
        addr: Some(format!("{}/24", ip(last)).parse().unwrap()),
        netns: sandbox.map(Into::into),
        ..Default::default()
    };
    d.create_endpoint(NID, eid, &mut iface).unwrap();
    assert_eq!(iface.mac, Some(Mac::from_ipv4(ip(last))), "Docker's MAC from the address");
    let mut j = Joined::default();
    d.join(NID, eid, sandbox.map(Path::new), &mut j).unwrap();
    j
}

fn held(dp: &mut MemDataplane) -> weft_overlay::dataplane::PeerEntries {
    let v = dp.read(NID).unwrap();
    (v.neighbours, v.fdb)
}

#[test]
fn a_join_with_a_sandbox_builds_the_sandbox_then_the_interface_and_the_last_leave_removes_both() {
    let mut d = driver();
    let mut dp = MemDataplane::new();
    dp.add_sandbox_path("/run/netns/c1");
    // A remote record before any local sandbox: stored, nothing programmed.
    put(&mut d, "r1", &record(20, 2), 5, "h2");
    assert!(run(&mut d, &mut dp).is_empty());
    let j = local_join(&mut d, "e1", 10, Some("/run/netns/c1"));
    assert_eq!(j.dst_prefix, "eth");
    assert_eq!(j.table_entries.len(), 1);
    let (table, key, value) = &j.table_entries[0];
    assert_eq!((table.as_str(), key.as_str()), (OVERLAY_PEER_TABLE, "e1"));
    assert_eq!(PeerRecord::decode(value).unwrap().2, vtep(1), "the record carries this node's VTEP");
    let ops = run(&mut d, &mut dp);
    assert!(matches!(ops[0], DpOp::EnsureSandbox(ref s) if s.vni == 4097 && s.port == 4789));
    assert!(matches!(ops[1], DpOp::SetFdb { .. }), "the stored peer is programmed with the sandbox: {ops:?}");
    assert!(matches!(ops[2], DpOp::SetNeighbour { .. }));
    assert!(matches!(ops.last(), Some(DpOp::AddEndpoint(e)) if e.eid == "e1"));
    assert_eq!(
        held(&mut dp),
        (vec![(ip(20), Mac::from_ipv4(ip(20)))], vec![(Mac::from_ipv4(ip(20)), vtep(2))])
    );
    // Its own record (echoed by the table) is never programmed.
    put(&mut d, "e1", &j.table_entries[0].2, 6, "h1");
    assert!(run(&mut d, &mut dp).is_empty());
    // A second local endpoint without a sandbox changes nothing in the data plane.
    local_join(&mut d, "e2", 11, None);
    assert!(run(&mut d, &mut dp).is_empty());
    d.leave(NID, "e2").unwrap();
    assert!(run(&mut d, &mut dp).is_empty());
    d.leave(NID, "e1").unwrap();
    let ops = run(&mut d, &mut dp);
    assert!(matches!(ops[..], [DpOp::RemoveEndpoint { .. }, DpOp::RemoveSandbox { .. }]), "{ops:?}");
    assert!(dp.sandboxes.is_empty());
    // The peer is still known: a new sandbox programs it again.
    local_join(&mut d, "e3", 12, Some("/run/netns/c1"));
    run(&mut d, &mut dp);
    assert_eq!(held(&mut dp).0, vec![(ip(20), Mac::from_ipv4(ip(20)))]);
}

#[test]
fn of_two_records_for_one_address_the_highest_version_is_programmed_and_the_other_takes_over() {
    let mut d = driver();
    let mut dp = MemDataplane::new();
    dp.add_sandbox_path("/s");
    local_join(&mut d, "e1", 10, Some("/s"));
    run(&mut d, &mut dp);
    // The same address on two hosts (a handover): h3's record is newer.
    put(&mut d, "old", &record(30, 2), 10, "h2");
    put(&mut d, "new", &record(30, 3), 12, "h3");
    run(&mut d, &mut dp);
    assert_eq!(held(&mut dp).1, vec![(Mac::from_ipv4(ip(30)), vtep(3))]);
    // Arrival order does not matter: an older record arriving later does not take over.
    put(&mut d, "old", &record(30, 2), 11, "h2");
    run(&mut d, &mut dp);
    assert_eq!(held(&mut dp).1, vec![(Mac::from_ipv4(ip(30)), vtep(3))]);
    // A tie in Lamport time is broken by owner name, the same way on every node.
    put(&mut d, "old", &record(30, 2), 12, "h2");
    run(&mut d, &mut dp);
    assert_eq!(held(&mut dp).1, vec![(Mac::from_ipv4(ip(30)), vtep(3))]);
    // The active one goes: the other is programmed again.
    del(&mut d, "new", 13, "h3");
    run(&mut d, &mut dp);
    assert_eq!(
        held(&mut dp),
        (vec![(ip(30), Mac::from_ipv4(ip(30)))], vec![(Mac::from_ipv4(ip(30)), vtep(2))])
    );
    del(&mut d, "old", 14, "h2");
    run(&mut d, &mut dp);
    assert_eq!(held(&mut dp), (vec![], vec![]));
}

#[test]
fn fdb_entries_are_counted_per_vtep_and_mac() {
    let mut d = driver();
    let mut dp = MemDataplane::new();
    dp.add_sandbox_path("/s");
    local_join(&mut d, "e1", 10, Some("/s"));
    run(&mut d, &mut dp);
    // Two addresses behind one MAC on one host (a secondary address).
    let mac = Mac::from_ipv4(ip(40));
    let rec = |last: u8| {
        PeerRecord {
            endpoint_ip: format!("{}/24", ip(last)),
            endpoint_mac: mac.to_string(),
            tunnel_endpoint_ip: vtep(4).to_string(),
        }
        .encode()
    };
    put(&mut d, "a", &rec(40), 3, "h4");
    put(&mut d, "b", &rec(41), 4, "h4");
    let ops = run(&mut d, &mut dp);
    assert_eq!(ops.iter().filter(|o| matches!(o, DpOp::SetFdb { .. })).count(), 1, "{ops:?}");
    del(&mut d, "a", 5, "h4");
    let ops = run(&mut d, &mut dp);
    assert!(!ops.iter().any(|o| matches!(o, DpOp::DelFdb { .. })), "still referenced: {ops:?}");
    assert_eq!(held(&mut dp).1, vec![(mac, vtep(4))]);
    del(&mut d, "b", 6, "h4");
    run(&mut d, &mut dp);
    assert_eq!(held(&mut dp), (vec![], vec![]));
}

#[test]
fn a_hidden_peer_goes_and_comes_back_and_a_record_with_a_wrong_vtep_waits_for_its_owner() {
    let mut d = driver();
    let mut dp = MemDataplane::new();
    dp.add_sandbox_path("/s");
    local_join(&mut d, "e1", 10, Some("/s"));
    run(&mut d, &mut dp);
    put(&mut d, "r", &record(50, 5), 3, "h5");
    run(&mut d, &mut dp);
    // The gossip core hides a failed node's entries: a delete for the driver; then a create.
    del(&mut d, "r", 3, "h5");
    run(&mut d, &mut dp);
    assert_eq!(held(&mut dp), (vec![], vec![]));
    put(&mut d, "r", &record(50, 5), 3, "h5");
    run(&mut d, &mut dp);
    assert_eq!(held(&mut dp).1, vec![(Mac::from_ipv4(ip(50)), vtep(5))]);
    // A record claiming another host's VTEP is stored, not programmed ...
    put(&mut d, "w", &record(60, 7), 4, "h6");
    run(&mut d, &mut dp);
    assert_eq!(held(&mut dp).0.len(), 1);
    assert_eq!(d.counts(), (2, 1, 0));
    // ... until the owner's published address matches it.
    d.set_owner_vtep("h6", Some(vtep(7)));
    run(&mut d, &mut dp);
    assert_eq!(held(&mut dp).0.len(), 2);
    // An owner never heard of is asked about, and waits.
    put(&mut d, "u", &record(70, 8), 5, "stranger");
    assert_eq!(d.take_unresolved(), vec!["stranger".to_string()]);
    run(&mut d, &mut dp);
    assert_eq!(held(&mut dp).0.len(), 2);
    // Garbage is counted and dropped.
    put(&mut d, "junk", b"{not json", 6, "h2");
    put(
        &mut d,
        "bcast",
        &PeerRecord {
            endpoint_ip: "10.1.0.9/24".into(),
            endpoint_mac: "ff:ff:ff:ff:ff:ff".into(),
            tunnel_endpoint_ip: vtep(2).to_string(),
        }
        .encode(),
        7,
        "h2",
    );
    assert_eq!(d.stats.malformed_records, 2);
    run(&mut d, &mut dp);
    assert_eq!(held(&mut dp).0.len(), 2);
}

#[test]
fn a_restarted_driver_reconciles_whatever_a_previous_life_left() {
    // The previous life left: this network's sandbox with stale peers, and another network's.
    let mut dp = MemDataplane::new();
    dp.add_sandbox_path("/s");
    let mut old = driver();
    local_join(&mut old, "e1", 10, Some("/s"));
    put(&mut old, "gone", &record(90, 9), 2, "h9");
    put(&mut old, "kept", &record(20, 2), 3, "h2");
    run(&mut old, &mut dp);
    dp.apply(&DpOp::EnsureSandbox(weft_overlay::dataplane::NetSpec {
        nid: "stale".into(),
        vni: 5000,
        port: 4789,
        gateway: None,
        mtu: None,
    }))
    .unwrap();
    dp.apply(&DpOp::SetNeighbour { nid: NID.into(), ip: ip(99), mac: Mac([2, 0, 0, 0, 0, 99]) }).unwrap();
    // The new life: endpoints come back from its store, records from the tables.
    let mut d = driver();
    d.prune_sandboxes(vec![NID.to_string()]);
    local_join(&mut d, "e1", 10, Some("/s"));
    put(&mut d, "kept", &record(20, 2), 3, "h2");
    run(&mut d, &mut dp);
    assert!(!dp.sandboxes.contains_key("stale"));
    assert_eq!(held(&mut dp).0.len(), 3, "nothing is removed before the tables have synced");
    d.network_synced(NID);
    run(&mut d, &mut dp);
    assert_eq!(
        held(&mut dp),
        (vec![(ip(20), Mac::from_ipv4(ip(20)))], vec![(Mac::from_ipv4(ip(20)), vtep(2))])
    );
    assert_eq!(dp.sandboxes[NID].endpoints.keys().collect::<Vec<_>>(), vec!["e1"]);
}

#[test]
fn a_sandbox_that_fails_is_asked_for_again_and_its_error_is_kept() {
    let mut d = driver();
    let mut dp = MemDataplane::new();
    dp.add_sandbox_path("/s");
    dp.fail = Some((
        |op| matches!(op, DpOp::EnsureSandbox(_)),
        DpError::new("network x: create vxlan device", "address in use"),
    ));
    local_join(&mut d, "e1", 10, Some("/s"));
    run(&mut d, &mut dp);
    let r = d.report(NID).unwrap();
    assert!(!r.sandbox);
    assert_eq!(r.last_error.as_deref(), Some("network x: create vxlan device: address in use"));
    d.leave(NID, "e1").unwrap();
    run(&mut d, &mut dp);
    local_join(&mut d, "e2", 11, Some("/s"));
    let ops = run(&mut d, &mut dp);
    assert!(matches!(ops[0], DpOp::EnsureSandbox(_)));
    assert!(d.report(NID).unwrap().sandbox);
    // A sandbox path that does not exist fails the endpoint in one line.
    local_join(&mut d, "e3", 12, Some("/nope"));
    run(&mut d, &mut dp);
    assert_eq!(
        d.report(NID).unwrap().last_error.as_deref(),
        Some("endpoint e3: open sandbox /nope: no such file or directory")
    );
}

/// Log lines at warning level or above written while `f` runs.
fn warnings_during(f: impl FnOnce()) -> Vec<String> {
    #[derive(Clone, Default)]
    struct Capture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Capture {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let out = Capture::default();
    let w = out.clone();
    let sub = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || w.clone())
        .finish();
    tracing::subscriber::with_default(sub, f);
    let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    text.lines().map(str::to_string).collect()
}

#[test]
fn a_sandbox_refused_the_same_way_on_every_retry_is_warned_about_once_per_cause() {
    let mut d = driver();
    let mut dp = MemDataplane::new();
    dp.add_sandbox_path("/s");
    put(&mut d, "e9", &record(9, 2), 1, "h2");
    // The data plane's rule fails one operation: every attempt below is refused anew.
    let refuse = |dp: &mut MemDataplane, why: &str| {
        dp.fail = Some((
            |op| matches!(op, DpOp::EnsureSandbox(_)),
            DpError::new("network x: create vxlan device", why),
        ))
    };
    let retries = |d: &mut OverlayDriver, dp: &mut MemDataplane, why: Option<&str>, n: u32| {
        for _ in 0..n * weft_overlay::driver::RETRY_EVERY_TICKS {
            if let Some(why) = why {
                refuse(dp, why);
            }
            d.tick();
            run(d, dp);
        }
    };
    let failed =
        |lines: &[String]| lines.iter().filter(|l| l.contains("data plane operation failed")).count();
    let foreign = "device foreign0 (not weft's) holds VNI 4097";
    let lines = warnings_during(|| {
        refuse(&mut dp, foreign);
        local_join(&mut d, "e1", 10, Some("/s"));
        run(&mut d, &mut dp);
        // Three retries, each failing the same way (and its peer and endpoint with it).
        retries(&mut d, &mut dp, Some(foreign), 3);
    });
    assert_eq!(
        d.stats.op_errors,
        4 * 4,
        "four attempts, each failing its sandbox, the peer's two entries and the endpoint"
    );
    assert_eq!(failed(&lines), 1, "one warning for one cause: {lines:#?}");
    assert!(!d.report(NID).unwrap().sandbox, "still refused");
    // Another cause is worth a warning again; a success ends it, and the same cause after it
    // is news again.
    let lines = warnings_during(|| {
        retries(&mut d, &mut dp, Some("address in use"), 2);
        dp.fail = None;
        retries(&mut d, &mut dp, None, 1);
    });
    assert!(d.report(NID).unwrap().sandbox, "the sandbox is up once nothing refuses it");
    assert_eq!(failed(&lines), 1, "{lines:#?}");
    d.leave(NID, "e1").unwrap();
    run(&mut d, &mut dp);
    let lines = warnings_during(|| {
        refuse(&mut dp, "address in use");
        local_join(&mut d, "e2", 11, Some("/s"));
        run(&mut d, &mut dp);
    });
    assert_eq!(failed(&lines), 1, "{lines:#?}");
}

#[test]
fn the_allocator_checks_vnis_port_and_mtu() {
    let mut d = OverlayDriver::new("h1", vtep(1));
    let v4 = [ipam_v4("10.1.0.0/24".parse().unwrap(), None), ipam_v4("10.2.0.0/24".parse().unwrap(), None)];
    let mut o = BTreeMap::new();
    assert_eq!(
        d.network_allocate(NID, &o, &v4, &[]).unwrap_err().to_string(),
        format!("no VNI provided (option {VXLANID_OPTION})")
    );
    o.insert(VXLANID_OPTION.to_string(), "4097".to_string());
    assert_eq!(
        d.network_allocate(NID, &o, &v4, &[]).unwrap_err().to_string(),
        "insufficient VNIs: 1 for 2 IPv4 subnets"
    );
    o.insert(VXLANID_OPTION.to_string(), "4097,4098".to_string());
    let out = d.network_allocate(NID, &o, &v4, &[]).unwrap();
    assert_eq!(out["com.docker.network.driver.overlay.vxlan_port"], "4789");
    o.insert("com.docker.network.driver.overlay.vxlan_port".into(), "80".into());
    assert!(d.network_allocate(NID, &o, &v4, &[]).unwrap_err().to_string().contains("1024..=49151"));
    o.remove("com.docker.network.driver.overlay.vxlan_port");
    o.insert("com.docker.network.driver.mtu".into(), "99999".into());
    assert!(d.network_allocate(NID, &o, &v4, &[]).is_err());
}

#[derive(Debug, Clone)]
enum Step {
    Put { key: u8, last: u8, host: u8, ltime: u64 },
    Del { key: u8 },
    Join { ep: u8, sandbox: bool },
    Leave { ep: u8 },
    Synced,
    Move { host: u8, to: u8 },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0u8..12, 20u8..28, 2u8..6, 1u64..40).prop_map(|(key, last, host, ltime)| Step::Put { key, last, host, ltime }),
        2 => (0u8..12).prop_map(|key| Step::Del { key }),
        1 => (0u8..3, any::<bool>()).prop_map(|(ep, sandbox)| Step::Join { ep, sandbox }),
        1 => (0u8..3).prop_map(|ep| Step::Leave { ep }),
        1 => Just(Step::Synced),
        1 => (2u8..6, 2u8..8).prop_map(|(host, to)| Step::Move { host, to }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, rng_seed: proptest::test_runner::RngSeed::Fixed(0x0e41a7), ..ProptestConfig::default() })]

    /// Whatever the order of records, handovers, joins and leaves, the data plane ends equal
    /// to what the table says (and holds nothing without a local sandboxed endpoint).
    #[test]
    fn the_data_plane_always_equals_the_table(steps in proptest::collection::vec(step(), 1..80)) {
        let mut d = driver();
        let mut dp = MemDataplane::new();
        dp.add_sandbox_path("/s");
        let mut table: BTreeMap<String, (Vec<u8>, u64, String)> = BTreeMap::new();
        let mut vteps: BTreeMap<String, IpAddr> = (2..10).map(|h| (format!("h{h}"), vtep(h))).collect();
        let mut joined: BTreeMap<u8, bool> = BTreeMap::new();
        for s in steps {
            match s {
                Step::Put { key, last, host, ltime } => {
                    let k = format!("k{key}");
                    let owner = format!("h{host}");
                    let v = record(last, host);
                    let prev = table.get(&k).map(|e| e.0.clone());
                    table.insert(k.clone(), (v.clone(), ltime, owner.clone()));
                    d.event_notify(NID, OVERLAY_PEER_TABLE, &k, prev.as_deref(), Some(&v), Version { ltime, owner: &owner });
                }
                Step::Del { key } => {
                    let k = format!("k{key}");
                    if let Some((v, ltime, owner)) = table.remove(&k) {
                        d.event_notify(NID, OVERLAY_PEER_TABLE, &k, Some(&v), None, Version { ltime, owner: &owner });
                    }
                }
                Step::Join { ep, sandbox } => {
                    if let std::collections::btree_map::Entry::Vacant(e) = joined.entry(ep) {
                        local_join(&mut d, &format!("e{ep}"), 10 + ep, sandbox.then_some("/s"));
                        e.insert(sandbox);
                    }
                }
                Step::Leave { ep } => {
                    if joined.remove(&ep).is_some() {
                        d.delete_endpoint(NID, &format!("e{ep}")).unwrap();
                    }
                }
                Step::Synced => d.network_synced(NID),
                Step::Move { host, to } => {
                    vteps.insert(format!("h{host}"), vtep(to));
                    d.set_owner_vtep(&format!("h{host}"), Some(vtep(to)));
                }
            }
            run(&mut d, &mut dp);
        }
        let want = expected_peers(NID, table.iter().map(|(k, (v, l, o))| (k.as_str(), v.as_slice(), *l, o.as_str())), "h1", |o| vteps.get(o).copied());
        if joined.values().any(|s| *s) {
            prop_assert_eq!(held(&mut dp), want);
        } else {
            prop_assert!(dp.sandboxes.is_empty());
        }
    }
}

#[test]
fn a_failed_sandbox_is_asked_for_again_while_endpoints_need_it_and_a_leave_removes_every_sandbox() {
    let mut d = driver();
    let mut dp = MemDataplane::new();
    dp.add_sandbox_path("/s");
    put(&mut d, "r", &record(20, 2), 3, "h2");
    dp.fail = Some((
        |op| matches!(op, DpOp::EnsureSandbox(_)),
        DpError::new("network x: create bridge br0", "no buffer space"),
    ));
    local_join(&mut d, "e1", 10, Some("/s"));
    run(&mut d, &mut dp);
    assert!(!d.report(NID).unwrap().sandbox);
    for _ in 0..weft_overlay::driver::RETRY_EVERY_TICKS {
        d.tick();
    }
    let ops = run(&mut d, &mut dp);
    assert!(matches!(ops[0], DpOp::EnsureSandbox(_)), "{ops:?}");
    assert!(d.report(NID).unwrap().sandbox);
    assert_eq!(dp.sandboxes[NID].endpoints.keys().collect::<Vec<_>>(), vec!["e1"]);
    assert_eq!(held(&mut dp).0, vec![(ip(20), Mac::from_ipv4(ip(20)))]);
    d.leave_all();
    run(&mut d, &mut dp);
    assert!(dp.sandboxes.is_empty());
    assert_eq!(d.networks().count(), 0);
}

#[test]
fn only_the_sandbox_and_the_interface_are_essential_to_an_endpoint() {
    let mut d = driver();
    local_join(&mut d, "e1", 10, None);
    put(&mut d, "r", &record(20, 2), 3, "h2");
    let mut j = Joined::default();
    d.leave(NID, "e1").unwrap();
    d.join(NID, "e1", Some(Path::new("/s")), &mut j).unwrap();
    let mut kinds = Vec::new();
    while let Some((id, op)) = d.poll_op() {
        kinds.push((std::mem::discriminant(&op), d.handle_done(id, Err(DpError::new("x", "y")))));
    }
    use weft_overlay::driver::OpKind;
    let essential = kinds.iter().filter(|(_, k)| *k == OpKind::Essential).count();
    assert_eq!(essential, 2, "EnsureSandbox and AddEndpoint: {kinds:?}");
    assert_eq!(kinds.len(), 4, "with the peer's FDB and neighbour entries: {kinds:?}");
}

#[test]
fn a_definition_that_changes_under_a_sandbox_rebuilds_it_with_every_peer() {
    let mut d = driver();
    let mut dp = MemDataplane::new();
    dp.add_sandbox_path("/s");
    local_join(&mut d, "e1", 10, Some("/s"));
    put(&mut d, "r", &record(20, 2), 3, "h2");
    run(&mut d, &mut dp);
    let mut opts = BTreeMap::new();
    opts.insert(VXLANID_OPTION.to_string(), "5000".to_string());
    let v4 = [ipam_v4("10.1.0.0/24".parse().unwrap(), Some(IpAddr::V4(ip(1))))];
    d.create_network(NID, &opts, &v4, &[]).unwrap();
    let ops = run(&mut d, &mut dp);
    assert!(matches!(ops[0], DpOp::EnsureSandbox(ref s) if s.vni == 5000), "{ops:?}");
    // A new VXLAN device holds nothing: the peer is programmed on it again.
    assert!(ops.iter().any(|o| matches!(o, DpOp::SetFdb { .. })), "{ops:?}");
    assert!(ops.iter().any(|o| matches!(o, DpOp::SetNeighbour { .. })), "{ops:?}");
}

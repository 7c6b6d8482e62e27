//! The ring's rules, one by one: seeding, local allocation, donation, ownership checks,
//! removal, and persist-before-use.

use weft_ipam::ring::{Name, Output, REQUEST_TIMEOUT_MS, REUSE_AFTER_MS, Record, RingDurable, Run};
use weft_ipam::{Ring, RingEntry, RingError, RingEvent, RingMsg, Seed, Space};

fn n(s: &str) -> Name {
    s.into()
}

fn all_alive(_: &str) -> bool {
    true
}

/// Persists and returns what the ring released.
fn flush(r: &mut Ring) -> Vec<Output> {
    let written = r.generation();
    r.persisted(written);
    std::iter::from_fn(|| r.poll_output()).collect()
}

fn publications(out: &[Output]) -> Vec<RingEntry> {
    out.iter().filter_map(|o| if let Output::Publish(e) = o { Some(e.clone()) } else { None }).collect()
}

fn sends(out: &[Output]) -> Vec<(Name, RingMsg)> {
    out.iter()
        .filter_map(|o| if let Output::Send { to, msg } = o { Some((to.clone(), msg.clone())) } else { None })
        .collect()
}

/// A /24-like pool: 256 slots, network and broadcast reserved.
fn pool() -> Space {
    Space::new("GlobalDefault/10.0.1.0/24", 256).unwrap()
}

fn created(me: &str) -> Ring {
    let mut r = Ring::created_by(n(me), pool(), [0, 255]);
    flush(&mut r);
    r
}

/// A node that learned `owner`'s ring from gossip.
fn joined(me: &str, owner: &mut Ring) -> Ring {
    let mut r = Ring::new(n(me), pool(), [0, 255]);
    r.merge(&RingEntry::Seed(owner.state().seed.clone().unwrap())).unwrap();
    flush(&mut r);
    r
}

/// Delivers `from`'s released messages to `to` and back until both are quiet.
fn exchange(a: &mut Ring, b: &mut Ring) {
    loop {
        let mut moved = false;
        for (src, dst) in [(0, 1), (1, 0)] {
            let (s, d) = if src == 0 { (&mut *a, &mut *b) } else { (&mut *b, &mut *a) };
            let from = s.me().clone();
            let out = flush(s);
            for (to, msg) in sends(&out) {
                assert_eq!(&to, d.me(), "{src}->{dst}");
                d.handle_message(&from, &msg, 0, &all_alive).unwrap();
                moved = true;
            }
            for e in publications(&out) {
                d.merge(&e).unwrap();
            }
        }
        if !moved {
            return;
        }
    }
}

#[test]
fn a_created_pool_is_wholly_its_creators_and_hands_out_the_lowest_unreserved_slot() {
    let mut r = Ring::created_by(n("a"), pool(), [0, 255]);
    assert!(r.is_dirty(), "the seed must be persisted first");
    assert!(
        std::iter::from_fn(|| r.poll_output()).all(|o| matches!(o, Output::Event(_))),
        "nothing is published before the seed is persisted"
    );
    let out = flush(&mut r);
    assert!(matches!(&publications(&out)[..], [RingEntry::Seed(_), RingEntry::Claims(_)]), "{out:?}");
    assert_eq!(r.owned(), &[(0, 256)]);
    assert_eq!(r.free_slots(), 254);
    assert_eq!(r.allocate(None), Ok(1), "the gateway gets .1");
    assert_eq!(r.allocate(None), Ok(2));
    assert_eq!(r.allocate(Some(0)), Err(RingError::Reserved { ring: pool().ring, slot: 0 }));
    assert_eq!(r.allocate(Some(2)), Err(RingError::InUse { ring: pool().ring, slot: 2 }));
    assert!(matches!(r.allocate(Some(256)), Err(RingError::OutOfRange { .. })));
    r.release(1).unwrap();
    assert_eq!(r.allocate(None), Ok(3), "serial: a released slot is not handed out again at once");
    assert!(matches!(r.release(77), Err(RingError::NotAllocated { .. })));
    let last = (0..252).map(|_| r.allocate(None).unwrap()).last();
    assert_eq!(last, Some(1), "the released slot comes back only when nothing else is free");
    assert_eq!(r.free_slots(), 0);
    let e = r.allocate(None).unwrap_err();
    assert_eq!(
        e.to_string(),
        "ring GlobalDefault/10.0.1.0/24: no free slot in the 256 blocks this node owns"
    );
}

#[test]
fn a_seed_splits_the_space_evenly_and_contiguously_among_its_owners() {
    let space = Space::new("vni", (1 << 24) - 4096).unwrap();
    assert_eq!(space.block_size, 256);
    assert_eq!(space.blocks(), 65_520);
    let seed = Seed {
        space: space.clone(),
        owners: vec![n("a"), n("b"), n("c")],
        seeded_by: n("a"),
        params: String::new(),
    };
    let mut rings: Vec<Ring> =
        ["a", "b", "c", "d"].iter().map(|m| Ring::new(n(m), space.clone(), [])).collect();
    for r in &mut rings {
        r.install_seed(&seed).unwrap();
        flush(r);
    }
    let blocks: Vec<u64> = rings.iter().map(|r| r.owned_blocks()).collect();
    assert_eq!(blocks, vec![21_840, 21_840, 21_840, 0]);
    assert_eq!(rings[1].owned(), &[(21_840 * 256, 43_680 * 256)]);
    assert_eq!(rings[0].state(), rings[3].state(), "every node derives the same ring");

    let other = Seed { seeded_by: n("b"), ..seed.clone() };
    assert!(matches!(rings[0].install_seed(&other), Err(RingError::SeedConflict { .. })));
    let wrong = Seed { space: Space::new("vni", 1000).unwrap(), ..seed };
    let e = rings[0].install_seed(&wrong).unwrap_err();
    assert!(e.to_string().starts_with("ring vni: seed for a different space"), "{e}");
    let mut unseeded = Ring::new(n("x"), space, []);
    assert_eq!(unseeded.allocate(None).unwrap_err().to_string(), "ring vni: not seeded yet");
}

#[test]
fn donation_gives_the_free_top_of_the_donors_range_once_even_when_asked_twice() {
    let mut a = created("a");
    for _ in 0..10 {
        a.allocate(None).unwrap();
    }
    flush(&mut a);
    let mut b = joined("b", &mut a);
    assert_eq!(b.free_slots(), 0);
    b.ensure_share(0, &all_alive).unwrap();
    assert_eq!(b.requesting_from(), Some(&n("a")));
    let out = flush(&mut b);
    let (_, request) = sends(&out).pop().unwrap();
    a.handle_message(&n("b"), &request, 0, &all_alive).unwrap();
    assert!(sends(&std::iter::from_fn(|| a.poll_output()).collect::<Vec<_>>()).is_empty(), "grant held");
    let out = flush(&mut a);
    let (_, grant) = sends(&out).pop().unwrap();
    // a keeps its allocated low blocks and a contiguous range; b gets the top.
    assert_eq!(a.owned(), &[(0, 133)], "half of the 245 free blocks, rounded up, went");
    b.handle_message(&n("a"), &grant, 0, &all_alive).unwrap();
    flush(&mut b);
    assert_eq!(b.owned(), &[(133, 256)]);
    assert_eq!(b.requesting_from(), None);
    assert_eq!(b.allocate(None), Ok(133));
    assert_eq!(b.free_slots(), 121, "255 is reserved");

    // The same request again (a duplicate, or a retry after a lost grant): the same answer.
    a.handle_message(&n("b"), &request, 0, &all_alive).unwrap();
    let again = sends(&flush(&mut a));
    assert_eq!(again, vec![(n("b"), grant)]);
    assert_eq!(a.owned(), &[(0, 133)], "no second donation");

    // The donor's claims carry the same ownership to everyone else.
    let mut c = joined("c", &mut a);
    let claims = publications(&flush(&mut Ring::restore(a.durable().clone())));
    for e in &claims {
        c.merge(e).unwrap();
    }
    assert_eq!(c.state().owner_of(200), Some(n("b")));
    assert_eq!(c.state().owner_of(20), Some(n("a")));
}

#[test]
fn a_donor_never_gives_a_block_with_an_allocation_and_never_allocates_in_what_it_gave() {
    let mut a = created("a");
    // Allocations at the top: the free tail is gone, so a free run inside is donated.
    a.allocate(Some(254)).unwrap();
    a.allocate(Some(100)).unwrap();
    flush(&mut a);
    let mut b = joined("b", &mut a);
    b.request_space(0, &all_alive).unwrap();
    exchange(&mut a, &mut b);
    let given: Vec<(u128, u128)> = b.owned().to_vec();
    assert_eq!(given.len(), 1);
    let (s, e) = given[0];
    assert!(!(s..e).contains(&254) && !(s..e).contains(&100), "{given:?}");
    assert!(a.allocations().all(|x| !(s..e).contains(&x)));
    for x in s..e {
        assert!(matches!(a.allocate(Some(x)), Err(RingError::NotOwned { .. })));
    }
    while let Ok(x) = a.allocate(None) {
        assert!(!(s..e).contains(&x));
    }
}

#[test]
fn without_a_reachable_owner_with_space_the_error_says_so_and_a_timeout_moves_on() {
    let space = pool();
    let seed =
        Seed { space: space.clone(), owners: vec![n("a"), n("b")], seeded_by: n("a"), params: String::new() };
    let mut c = Ring::new(n("c"), space, [0, 255]);
    c.install_seed(&seed).unwrap();
    flush(&mut c);
    let e = c.request_space(0, &|_| false).unwrap_err();
    assert_eq!(
        e.to_string(),
        "ring GlobalDefault/10.0.1.0/24: no reachable owner has free space (asked: [])"
    );
    c.request_space(0, &all_alive).unwrap();
    assert_eq!(c.requesting_from(), Some(&n("a")), "equal shares: by name");
    c.tick(REQUEST_TIMEOUT_MS - 1, &all_alive).unwrap();
    assert_eq!(c.requesting_from(), Some(&n("a")));
    c.tick(REQUEST_TIMEOUT_MS, &all_alive).unwrap();
    assert_eq!(c.requesting_from(), Some(&n("b")), "a did not answer: b is asked");
    let e = c.tick(2 * REQUEST_TIMEOUT_MS, &all_alive).unwrap_err();
    assert!(e.to_string().contains("(asked: [\"a\", \"b\"])"), "{e}");
    let events: Vec<Output> = flush(&mut c);
    assert!(events.contains(&Output::Event(RingEvent::NoSpace { asked: vec![n("a"), n("b")] })));
}

#[test]
fn records_that_break_ownership_are_refused_and_change_nothing() {
    let mut a = created("a");
    let before = a.state().clone();
    let forged = |writer: &str, start, end| {
        RingEntry::Claims(weft_ipam::ring::Claims {
            ring: pool().ring,
            writer: n(writer),
            seq: 1,
            runs: vec![Run {
                start,
                end,
                rec: Record { epoch: 0, lineage: n(""), version: 9, writer: n(writer), owner: n(writer) },
            }],
            free_blocks: 0,
        })
    };
    let e = a.merge(&forged("mallory", 10, 20)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "ring GlobalDefault/10.0.1.0/24: refused 1 record(s) that break ownership: mallory wrote blocks \
         10..20 (epoch 0, version 9) over blocks this node owns"
    );
    assert_eq!(a.state(), &before);
    let e = a.merge(&forged("a", 30, 31)).unwrap_err();
    assert!(e.to_string().contains("as this node, which never wrote it"), "{e}");
    assert_eq!(a.state(), &before);
    // A third node applies what does not touch its own blocks.
    let mut c = joined("c", &mut a);
    c.merge(&forged("mallory", 10, 20)).unwrap();
    assert_eq!(c.state().owner_of(15), Some(n("mallory")));
}

#[test]
fn a_removal_moves_a_dead_nodes_blocks_and_wins_over_what_it_writes_afterwards() {
    let mut a = created("a");
    let mut b = joined("b", &mut a);
    b.request_space(0, &all_alive).unwrap();
    exchange(&mut a, &mut b);
    let mut c = joined("c", &mut a);
    for e in publications(&flush(&mut Ring::restore(a.durable().clone()))) {
        c.merge(&e).unwrap();
    }
    let b_blocks = b.owned_blocks();
    assert!(b_blocks > 0);
    b.allocate(None).unwrap();
    flush(&mut b);

    // Removing a live node is refused unless forced.
    let e = a.transfer_dead(&n("b"), true, false).unwrap_err();
    assert_eq!(
        e.to_string(),
        "ring GlobalDefault/10.0.1.0/24: refusing to remove b: it is alive (force to override)"
    );
    assert!(matches!(a.transfer_dead(&n("a"), false, false), Err(RingError::RemoveSelf { .. })));
    assert_eq!(a.transfer_dead(&n("b"), false, false), Ok(b_blocks));
    assert_eq!(a.owned(), &[(0, 256)]);
    let from_a = publications(&flush(&mut a));
    assert!(matches!(from_a[0], RingEntry::Removal(_)), "the removal record goes first");

    // Meanwhile b, cut off, gives some of its blocks to c at b's old epoch.
    let (_, req) = {
        c.request_space(0, &|o| o == "b").unwrap();
        sends(&flush(&mut c)).pop().unwrap()
    };
    b.handle_message(&n("c"), &req, 0, &all_alive).unwrap();
    let from_b = flush(&mut b);
    let (_, grant) = sends(&from_b).pop().unwrap();
    c.handle_message(&n("b"), &grant, 0, &all_alive).unwrap();
    assert!(c.owned_blocks() > 0);

    flush(&mut c);
    // Heal: everyone merges everything, in either order.
    for e in &from_a {
        c.merge(e).unwrap();
        b.merge(e).unwrap();
    }
    let lost = flush(&mut c);
    assert!(
        lost.iter()
            .any(|o| matches!(o, Output::Event(RingEvent::Lost { to, allocated: 0, .. }) if *to == n("a"))),
        "c is told it lost b's late donation to a: {lost:?}"
    );
    for e in publications(&from_b) {
        a.merge(&e).unwrap();
    }
    for e in publications(&flush(&mut c)) {
        a.merge(&e).unwrap();
    }
    assert_eq!(c.owned_blocks(), 0, "b's late donation lost to the removal");
    assert_eq!(a.state().ownership(), vec![(0, 256, n("a"))]);
    assert_eq!(a.state().ownership(), c.state().ownership());
    assert_eq!(b.removed_by(), Some(&n("a")));
    let events = flush(&mut b);
    assert!(events.contains(&Output::Event(RingEvent::Removed { by: n("a") })), "{events:?}");
    assert_eq!(
        b.allocate(None).unwrap_err().to_string(),
        "ring GlobalDefault/10.0.1.0/24: this node was removed by a; it allocates nothing more"
    );
    assert_eq!(b.free_slots(), 0);
}

#[test]
fn a_crash_before_persisting_loses_only_what_nobody_saw() {
    let mut a = created("a");
    let slot = a.allocate(None).unwrap();
    let saved: RingDurable = a.durable().clone();
    flush(&mut a);
    let unpersisted = a.allocate(None).unwrap();
    // Crash: the unpersisted allocation was never handed out, and comes back free.
    let mut back = Ring::restore(saved);
    assert!(back.is_allocated(slot));
    assert!(!back.is_allocated(unpersisted));
    assert_eq!(back.allocate(None), Ok(unpersisted));
    let out = flush(&mut back);
    assert!(matches!(&publications(&out)[..], [RingEntry::Claims(c)] if c.seq > 1), "claims are republished");
    // Adverts follow free space coarsely: 254 free blocks stay in one power-of-two bucket.
    for _ in 0..100 {
        back.allocate(None).unwrap();
    }
    assert!(publications(&flush(&mut back)).is_empty());
}

#[test]
fn the_merge_rule_orders_versions_of_one_key() {
    let mut a = created("a");
    a.allocate(None).unwrap();
    let first = publications(&flush(&mut Ring::restore(a.durable().clone())));
    let mut b = joined("b", &mut a);
    b.request_space(0, &all_alive).unwrap();
    exchange(&mut a, &mut b);
    let later = publications(&flush(&mut Ring::restore(a.durable().clone())));
    let (RingEntry::Claims(c1), RingEntry::Claims(c2)) = (&first[0], &later[0]) else { panic!() };
    assert_eq!(first[0].key(), "GlobalDefault/10.0.1.0/24/claims/a");
    assert!(c2.seq > c1.seq);
    assert_eq!(later[0].compare(&first[0]), std::cmp::Ordering::Greater);
    assert_eq!(first[0].compare(&later[0]), std::cmp::Ordering::Less);
}

#[test]
fn spaces_map_slots_to_vnis_and_addresses() {
    let v = Space::vnis();
    assert_eq!((v.size, v.block_size, v.blocks()), (16_773_120, 256, 65_520));
    assert_eq!(Space::vni(0), Some(4096));
    assert_eq!(Space::vni(v.size - 1), Some((1 << 24) - 1));
    assert_eq!(Space::vni(v.size), None);
    assert_eq!(Space::vni(u128::MAX), None);
    assert_eq!(Space::vni_slot(4095), None);
    assert_eq!(Space::vni_slot(5000), Some(904));

    let net: ipnet::IpNet = "10.0.9.0/24".parse().unwrap();
    let (space, reserved) = Space::subnet("GlobalDefault/10.0.9.0/24", &net);
    let mut r = Ring::created_by(n("a"), space, reserved);
    let gw = r.allocate(None).unwrap();
    assert_eq!(weft_ipam::net::addr_at(&net, gw).to_string(), "10.0.9.1");
    let (v6, reserved) = Space::subnet("GlobalDefault/fd00::/48", &"fd00::/48".parse().unwrap());
    assert_eq!((v6.size, v6.block_size), (1 << 80, 1 << 64));
    let mut r = Ring::created_by(n("a"), v6, reserved);
    assert_eq!(r.allocate(None), Ok(1), "the anycast address is skipped");
    assert_eq!(r.free_slots(), (1 << 80) - 2);
}

#[test]
fn the_durable_form_round_trips_through_json() {
    let mut a = created("a");
    a.allocate(None).unwrap();
    a.transfer_dead(&n("gone"), false, false).unwrap();
    flush(&mut a);
    let json = serde_json::to_string(a.durable()).unwrap();
    let back: RingDurable = serde_json::from_str(&json).unwrap();
    assert_eq!(&back, a.durable());
    let r = Ring::restore(back);
    assert_eq!(r.state(), a.state());
    assert!(r.is_allocated(1));
}

#[test]
fn a_cluster_ring_installs_only_a_seed_split_among_its_acceptors() {
    let space = Space::vnis();
    let acceptors = [n("s1"), n("s2"), n("s3")];
    let mut r = Ring::cluster(n("x"), space.clone(), [], acceptors.clone());
    // A node configured with the seed list [rogue] chose among itself.
    let rogue =
        Seed { space: space.clone(), owners: vec![n("rogue")], seeded_by: n("rogue"), params: String::new() };
    let e = r.merge(&RingEntry::Seed(rogue)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "ring vni: seed split among [\"rogue\"], but this node's acceptor set is [\"s1\", \"s2\", \"s3\"]; refused"
    );
    assert!(!r.is_seeded());
    let good = Seed { space, owners: acceptors.to_vec(), seeded_by: n("s2"), params: String::new() };
    r.merge(&RingEntry::Seed(good)).unwrap();
    assert!(r.is_seeded());
}

/// Everything `from` released, merged into each of `to`.
fn gossip(from: &mut Ring, to: &mut [&mut Ring]) -> Vec<RingEntry> {
    let out = publications(&flush(from));
    for r in to.iter_mut() {
        for e in &out {
            r.merge(e).unwrap();
        }
    }
    out
}

fn seeded(names: &[&str], owners: &[&str]) -> Vec<Ring> {
    let seed = Seed {
        space: pool(),
        owners: owners.iter().map(|o| n(o)).collect(),
        seeded_by: n(owners[0]),
        params: String::new(),
    };
    names
        .iter()
        .map(|m| {
            let mut r = Ring::new(n(m), pool(), [0, 255]);
            r.install_seed(&seed).unwrap();
            flush(&mut r);
            r
        })
        .collect()
}

#[test]
fn two_heirs_removing_one_node_at_once_end_with_one_owner_everywhere() {
    let mut rings = seeded(&["h1", "h2", "r", "x"], &["h1", "h2", "r"]);
    let [h1, h2, _r, x] = &mut rings[..] else { unreachable!() };
    // (This test is about the removal race, not the heir's quarantine of what it inherits.)
    h1.set_reuse_after(0);
    // Both operators remove r before hearing of each other; h1 then gives r's old blocks to x
    // and x allocates there.
    h1.transfer_dead(&n("r"), false, false).unwrap();
    h2.transfer_dead(&n("r"), false, false).unwrap();
    let h1_out = gossip(h1, &mut [x]);
    x.request_space(0, &|o| o == "h1").unwrap();
    exchange(h1, x);
    let slot = x.allocate(None).unwrap();
    assert!(slot >= 170, "x allocates in what was r's: {slot}");
    // Now everything meets: nobody refuses anything, and every node ends with the same owner
    // per block: h2's line won.
    let h2_out = gossip(h2, &mut [h1, x]);
    for e in h1_out.iter().chain(publications(&flush(h1)).iter()).chain(publications(&flush(x)).iter()) {
        h2.merge(e).unwrap();
    }
    for e in &h2_out {
        h1.merge(e).unwrap();
    }
    gossip(h1, &mut [h2, x]);
    gossip(x, &mut [h1, h2]);
    assert_eq!(h1.state(), h2.state());
    assert_eq!(h2.state(), x.state());
    for b in 170u32..256 {
        assert_eq!(h2.state().owner_of(b), Some(n("h2")), "block {b}");
    }
    assert_eq!(x.conflicts(), vec![slot], "x is told which of its allocations are now h2's");
}

#[test]
fn an_operator_can_always_remove_again_even_after_a_removal_cycle() {
    let mut rings = seeded(&["a", "b", "c"], &["a", "b"]);
    let [a, b, c] = &mut rings[..] else { unreachable!() };
    // Each side of a partition removed the other: nobody owns anything.
    a.transfer_dead(&n("b"), false, true).unwrap();
    b.transfer_dead(&n("a"), false, true).unwrap();
    gossip(a, &mut [c]);
    gossip(b, &mut [c]);
    assert_eq!(c.state().ownership(), vec![], "a removal cycle leaves the blocks to nobody");
    // c (lower name than both) removes a: the later removal wins, and c inherits.
    assert_eq!(c.transfer_dead(&n("a"), false, false), Ok(256));
    gossip(c, &mut [a, b]);
    assert_eq!(c.state().ownership(), vec![(0, 256, n("c"))]);
    assert_eq!(a.state().ownership(), c.state().ownership());
}

#[test]
fn versions_beyond_any_honest_one_are_refused_and_do_not_move_the_clock() {
    let mut a = created("a");
    let mut c = joined("c", &mut a);
    let huge = RingEntry::Claims(weft_ipam::ring::Claims {
        ring: pool().ring,
        writer: n("m"),
        seq: 1,
        runs: vec![Run {
            start: 0,
            end: 4,
            rec: Record { epoch: 0, lineage: n(""), version: u64::MAX, writer: n("m"), owner: n("m") },
        }],
        free_blocks: 0,
    });
    let e = c.merge(&huge).unwrap_err();
    assert!(e.to_string().contains("with a version or epoch beyond any honest one"), "{e}");
    assert_eq!(c.durable().clock, 0);
    assert_eq!(c.state().owner_of(0), Some(n("a")));
}

#[test]
fn a_block_of_reserved_slots_only_is_never_counted_free_nor_given_alone() {
    let mut a = created("a");
    assert_eq!(a.free_blocks(), 254, "blocks 0 and 255 hold only a reserved slot");
    let mut b = joined("b", &mut a);
    b.request_space(0, &all_alive).unwrap();
    exchange(&mut a, &mut b);
    // b gets the top 127 free blocks and the reserved block above them; a stays contiguous.
    assert_eq!(a.owned(), &[(0, 128)]);
    assert_eq!(b.owned(), &[(128, 256)]);
    assert_eq!(b.free_slots(), 127);
}

#[test]
fn an_answer_waits_for_the_write_that_contains_its_change() {
    let mut a = created("a");
    let mut b = joined("b", &mut a);
    b.request_space(0, &all_alive).unwrap();
    let (_, req) = sends(&flush(&mut b)).pop().unwrap();
    // The shell snapshots a, then a donates before that write completes.
    let written = a.generation();
    a.handle_message(&n("b"), &req, 0, &all_alive).unwrap();
    a.persisted(written);
    assert!(
        sends(&std::iter::from_fn(|| a.poll_output()).collect::<Vec<_>>()).is_empty(),
        "grant still held"
    );
    let now = a.generation();
    a.persisted(now);
    assert_eq!(sends(&std::iter::from_fn(|| a.poll_output()).collect::<Vec<_>>()).len(), 1);
}

#[test]
fn a_removal_generation_beyond_any_honest_one_is_refused_and_removing_again_still_works() {
    let mut a = created("a");
    let forged = RingEntry::Removal(weft_ipam::ring::Removal {
        ring: pool().ring,
        node: n("x"),
        generation: u64::MAX,
        heir: n("m"),
    });
    let e = a.merge(&forged).unwrap_err();
    assert!(e.to_string().contains("a removal with a generation beyond any honest one"), "{e}");
    assert!(a.state().removed.is_empty());
    assert_eq!(a.transfer_dead(&n("x"), false, false), Ok(0));
    assert_eq!(a.state().removed.get(&n("x")), Some(&(1, n("a"))));
}

/// Replays a change log into a key map, as the agent's store holds it.
fn write_changes(
    r: &mut Ring,
    disk: &mut std::collections::BTreeMap<String, Vec<u64>>,
    meta: &mut Option<RingDurable>,
) -> usize {
    let Some(c) = r.take_changes() else { return 0 };
    let mut keys = 0;
    if let Some(m) = c.meta {
        *meta = Some(m);
        keys += 1;
    }
    if let Some(cur) = c.cursor {
        disk.insert("cursor".into(), vec![cur as u64]);
        keys += 1;
    }
    for (p, words) in c.pages {
        keys += 1;
        if words.is_empty() {
            disk.remove(&format!("page/{p}"));
        } else {
            disk.insert(format!("page/{p}"), words);
        }
    }
    r.persisted(c.generation);
    keys
}

fn from_disk(disk: &std::collections::BTreeMap<String, Vec<u64>>, meta: &Option<RingDurable>) -> Ring {
    let cursor = disk.get("cursor").map_or(0, |w| u128::from(w[0]));
    let pages = disk
        .iter()
        .filter_map(|(k, w)| k.strip_prefix("page/").map(|p| (p.parse::<u128>().unwrap(), w.clone())));
    Ring::from_parts(meta.clone().unwrap(), cursor, pages)
}

#[test]
fn the_change_log_writes_a_few_keys_per_allocation_and_reads_back_the_same_ring() {
    let space = Space::new("10.0.0.0/16", 1 << 16).unwrap();
    let mut a = Ring::created_by(n("a@1"), space, [0, 65535]);
    let (mut disk, mut meta) = (Default::default(), None);
    write_changes(&mut a, &mut disk, &mut meta);
    let mut last = 0;
    for i in 0..5000 {
        last = a.allocate(None).unwrap();
        let keys = write_changes(&mut a, &mut disk, &mut meta);
        assert!(keys <= 3, "allocation {i} wrote {keys} keys");
    }
    a.release(17).unwrap();
    assert_eq!(write_changes(&mut a, &mut disk, &mut meta), 1, "a release writes its page");
    let mut back = from_disk(&disk, &meta);
    // (A restored ring republishes its claims: only that sequence moved.)
    let same = RingDurable { seq: a.durable().seq, ..back.durable().clone() };
    assert!(same == *a.durable(), "the keys hold the whole durable state");
    assert_eq!(back.allocate(None), Ok(last + 1), "the cursor survives");
    assert!(!back.is_allocated(17));
    // Released before the restart: its release time is lost, so it waits a whole quarantine.
    back.advance(1_000);
    assert_ne!(back.allocate(Some(17)).ok(), None, "an explicit request may take it");
}

#[test]
fn a_crash_loses_only_changes_not_written_and_a_restart_never_hands_them_out_again_early() {
    let mut a = Ring::created_by(n("a@1"), pool(), [0, 255]);
    let (mut disk, mut meta) = (Default::default(), None);
    write_changes(&mut a, &mut disk, &mut meta);
    let x = a.allocate(None).unwrap();
    write_changes(&mut a, &mut disk, &mut meta);
    let lost = a.allocate(None).unwrap();
    // Crash: `lost` was never written, so never handed out; x was and stays allocated.
    let mut back = from_disk(&disk, &meta);
    assert!(back.is_allocated(x) && !back.is_allocated(lost));
    back.release(x).unwrap();
    let mut seen = Vec::new();
    while let Ok(s) = back.allocate(None) {
        seen.push(s);
    }
    assert_eq!(seen.last(), Some(&x), "x is handed out last, after every other slot");
}

#[test]
fn a_donor_keeps_blocks_with_recently_released_slots() {
    let space = Space::new("vni", 1 << 12).unwrap(); // 4096 blocks of 1
    let mut a = Ring::created_by(n("a@1"), space.clone(), []);
    flush(&mut a);
    // Allocate and release the top slot: that block is free but quarantined.
    let top = a.allocate(Some(4095)).unwrap();
    a.release(top).unwrap();
    flush(&mut a);
    let mut b = Ring::new(n("b@1"), space, []);
    b.merge(&RingEntry::Seed(a.state().seed.clone().unwrap())).unwrap();
    flush(&mut b);
    b.request_space(0, &all_alive).unwrap();
    exchange(&mut a, &mut b);
    assert!(b.free_slots() > 0, "b got a share");
    assert!(
        b.owned().iter().all(|&(s, e)| !(s..e).contains(&4095)),
        "the quarantined block stayed: {:?}",
        b.owned()
    );
    a.advance(REUSE_AFTER);
    assert!(!a.is_allocated(4095));
}

const REUSE_AFTER: u64 = weft_ipam::ring::REUSE_AFTER_MS;

#[test]
fn an_acceptor_never_acknowledges_a_second_value_under_a_ballot_it_accepted() {
    use weft_ipam::seeding::{Ballot, PaxosMsg};
    let set: Vec<Name> = vec![n("a"), n("b"), n("c")];
    let mut c = weft_ipam::Seeder::new(n("c"), "vni", set.clone());
    let seed = |by: &str| Seed {
        space: Space::vnis(),
        owners: vec![n("a@1"), n("c@1")],
        seeded_by: n(by),
        params: String::new(),
    };
    let ballot = Ballot { round: 1, proposer: n("a@1") };
    let accept = |v: Seed| PaxosMsg::Accept {
        ring: "vni".into(),
        ballot: ballot.clone(),
        value: v,
        acceptors: set.clone(),
    };
    c.handle(&n("a"), &accept(seed("a@1")));
    c.persisted(c.generation());
    let first: Vec<_> = std::iter::from_fn(|| c.poll_output()).collect();
    assert!(
        first.iter().any(|o| matches!(o, weft_ipam::SeedOutput::Send { msg: PaxosMsg::Accepted { .. }, .. }))
    );
    // The same ballot with another value (a proposer that forgot its round): refused.
    c.handle(&n("a"), &accept(seed("a@2")));
    c.persisted(c.generation());
    let second: Vec<_> = std::iter::from_fn(|| c.poll_output()).collect();
    assert!(
        !second
            .iter()
            .any(|o| matches!(o, weft_ipam::SeedOutput::Send { msg: PaxosMsg::Accepted { .. }, .. })),
        "{second:?}"
    );
    // A learner only (lost its state once, persisted) neither promises nor accepts.
    let mut b = weft_ipam::Seeder::new(n("b"), "vni", set.clone());
    b.set_learner_only();
    assert!(b.durable().learner_only);
    let mut b = weft_ipam::Seeder::restore(b.durable().clone());
    b.handle(
        &n("a"),
        &PaxosMsg::Prepare {
            ring: "vni".into(),
            ballot: Ballot { round: 9, proposer: n("a@1") },
            acceptors: set,
        },
    );
    b.persisted(b.generation());
    assert_eq!(std::iter::from_fn(|| b.poll_output()).count(), 0);
}

#[test]
fn a_ring_read_back_from_its_change_log_publishes_its_seed_and_claims_again() {
    let mut a = Ring::created_by(n("a@1"), pool(), [0, 255]);
    let (mut disk, mut meta) = (Default::default(), None);
    write_changes(&mut a, &mut disk, &mut meta);
    a.allocate(None).unwrap();
    write_changes(&mut a, &mut disk, &mut meta);
    let mut back = from_disk(&disk, &meta);
    // The seed is on disk already: it goes out at once. The claims carry a new sequence: they
    // wait until it is written.
    let now: Vec<Output> = std::iter::from_fn(|| back.poll_output()).collect();
    let pubs = publications(&now);
    assert!(matches!(pubs[..], [RingEntry::Seed(_)]), "{pubs:?}");
    let written = write_changes(&mut back, &mut disk, &mut meta);
    assert!(written > 0, "the republished claims' sequence is written");
    let later: Vec<Output> = std::iter::from_fn(|| back.poll_output()).collect();
    assert!(publications(&later).iter().any(|e| matches!(e, RingEntry::Claims(_))), "{later:?}");
}

#[test]
fn an_heir_hands_out_nothing_it_inherited_until_the_hold_ends_and_a_fence_survives_a_restart() {
    let mut rings = seeded(&["a@1", "b@1"], &["a@1", "b@1"]);
    let [a, _b] = &mut rings[..] else { unreachable!() };
    let (mut disk, mut meta) = (Default::default(), None);
    // a's own half runs out first.
    while a.allocate(None).is_ok() {}
    write_changes(a, &mut disk, &mut meta);
    assert_eq!(a.transfer_dead(&n("b@1"), false, false), Ok(128));
    assert!(a.held() > 0, "everything inherited is held back");
    let e = a.allocate(None).unwrap_err();
    assert!(
        matches!(e, RingError::Exhausted { .. }),
        "nothing else free, still nothing from b's blocks: {e}"
    );
    assert!(matches!(a.allocate(Some(200)), Err(RingError::Held { .. })), "not even asked for by name");
    a.advance(REUSE_AFTER_MS - 1);
    assert!(a.allocate(None).is_err());
    // A restart does not shorten the hold: it starts over.
    write_changes(a, &mut disk, &mut meta);
    let mut a = from_disk(&disk, &meta);
    a.advance(REUSE_AFTER_MS - 1);
    assert!(a.allocate(None).is_err(), "held again after the restart");
    a.advance(REUSE_AFTER_MS);
    let slot = a.allocate(None).unwrap();
    assert!(slot >= 128, "after reuse_after the inherited blocks are a's: {slot}");
    assert_eq!(a.held(), 0);

    // Forced: fenced, whatever the clock says, across a restart, until lifted.
    let mut rings = seeded(&["a@1", "b@1"], &["a@1", "b@1"]);
    let [a, _b] = &mut rings[..] else { unreachable!() };
    while a.allocate(None).is_ok() {}
    a.transfer_dead(&n("b@1"), true, true).unwrap();
    a.fence(&n("b@1"));
    assert_eq!(a.fenced_from().into_iter().collect::<Vec<_>>(), vec![n("b@1")]);
    let (mut disk, mut meta) = (Default::default(), None);
    write_changes(a, &mut disk, &mut meta);
    let mut back = from_disk(&disk, &meta);
    back.advance(10 * REUSE_AFTER_MS);
    assert!(back.allocate(None).is_err(), "the fence came back from disk");
    back.lift_hold(&n("b@1"), 10 * REUSE_AFTER_MS + 5);
    assert!(back.fenced_from().is_empty());
    assert!(back.allocate(None).is_err(), "held until the time given");
    back.advance(10 * REUSE_AFTER_MS + 5);
    assert!(back.allocate(None).unwrap() >= 128);
}

use super::*;
use crate::discovery::{NodeRecord, NodeStatus};
use crate::event::{DownReason, MemberState, TransmitKind};
use crate::watcher::{TableWatcher, Watchers};
use crate::wire::{Body, FLAG_CLUSTER, Head, WireEntry};
use bytes::Bytes;
use std::sync::Mutex;

fn addr(i: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, i], 7946))
}

fn node(i: u8, cfg: Config, now: Instant) -> GossipNode {
    GossipNode::new(cfg, NodeId::new(format!("n{i}"), addr(i), 1), i as u64, 0, now).unwrap()
}

/// Two nodes wired back to back; every transmit is delivered at once.
struct Pair {
    a: GossipNode,
    b: GossipNode,
    now: Instant,
    /// Stream frames sent, per sender (0 = a), with their body's kind.
    frames: Vec<(usize, Transmit)>,
}

impl Pair {
    fn new(cfg: Config) -> Self {
        let now = Instant::now();
        let mut p = Pair { a: node(1, cfg.clone(), now), b: node(2, cfg, now), now, frames: Vec::new() };
        p.a.join(now, &[addr(2)]).unwrap();
        p.run(Duration::from_secs(2));
        assert!(p.a.is_connected() && p.b.is_connected());
        p
    }

    fn pump(&mut self) {
        loop {
            let mut moved = false;
            while let Some(t) = self.a.poll_transmit() {
                moved = true;
                if t.kind == TransmitKind::Stream {
                    self.frames.push((0, t.clone()));
                    self.b.handle_stream(self.now, addr(1), &t.bytes);
                } else {
                    self.b.handle_datagram(self.now, addr(1), &t.bytes);
                }
            }
            while let Some(t) = self.b.poll_transmit() {
                moved = true;
                if t.kind == TransmitKind::Stream {
                    self.frames.push((1, t.clone()));
                    self.a.handle_stream(self.now, addr(2), &t.bytes);
                } else {
                    self.a.handle_datagram(self.now, addr(2), &t.bytes);
                }
            }
            if !moved {
                break;
            }
        }
    }

    fn run(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.now += Duration::from_millis(10);
            self.a.handle_timeout(self.now);
            self.b.handle_timeout(self.now);
            self.pump();
        }
    }
}

/// The datagrams `n` has to send, drained.
fn sent(n: &mut GossipNode) -> Vec<Transmit> {
    std::iter::from_fn(|| n.poll_transmit()).collect()
}

#[test]
fn a_member_only_the_attachment_table_names_is_announced_to_with_backoff() {
    let mut p = Pair::new(Config::default());
    // b tells a of "ghost", a node a's membership never heard of.
    let ghost = addr(9);
    let rec =
        NodeRecord { instance: 7, generation: 1, addr: ghost, data_addr: ghost.ip(), status: NodeStatus::Up };
    let head = Head { from: p.b.id.clone(), ltime: p.b.clock };
    let w = WireEntry {
        table: NODES_TABLE.into(),
        key: "ghost".into(),
        owner: "ghost".into(),
        ltime: 5,
        flags: FLAG_CLUSTER,
        reap_in_ms: 0,
        value: rec.encode(),
    };
    let bytes = wire::encode_packet(&Packet {
        head,
        body: Body::Events { network: CLUSTER_NETWORK.into(), events: vec![w] },
    })
    .unwrap();
    p.a.handle_datagram(p.now, addr(2), &bytes);
    let announces = |ts: &[Transmit]| {
        ts.iter()
            .filter(|t| {
                t.dst == ghost && wire::open_envelope(&t.bytes).is_ok_and(|(ty, _)| ty == FrameType::Swim)
            })
            .count()
    };
    let mut at = Vec::new();
    for step in 0..400 {
        let now = p.now + Duration::from_millis(10 * step);
        p.a.handle_timeout(now);
        if announces(&sent(&mut p.a)) > 0 {
            at.push(step * 10);
        }
    }
    assert!(!at.is_empty() && at[0] <= 200, "announced within a gossip round: {at:?}");
    assert!(at.len() >= 2, "retried while unanswered: {at:?}");
    assert!(at[1] - at[0] >= 2000, "backed off: {at:?}");
    // Once membership has seen it, discovery stops.
    p.a.member_up(p.now, NodeId::new("ghost", ghost, 1));
    assert_eq!(p.a.membership.discovery.len(), 0);
}

#[test]
fn a_duplicate_costs_its_receiver_one_retransmission() {
    let mut p = Pair::new(Config::default());
    let now = p.now;
    p.a.join_network(now, "net1").unwrap();
    p.b.join_network(now, "net1").unwrap();
    p.run(Duration::from_secs(1));
    p.b.create_entry(now, "net1", "t", "k", Bytes::from_static(b"v")).unwrap();
    // b's immediate push reaches a, which queues the event to relay.
    let pushed = sent(&mut p.b);
    for t in &pushed {
        p.a.handle_datagram(now, addr(2), &t.bytes);
    }
    let left = |n: &GossipNode| n.networks["net1"].queue.len();
    assert_eq!(left(&p.a), 1);
    let before = p.a.networks["net1"].queue.transmissions_left();
    // Hearing it again from b burns one of a's transmissions, never a's copy of the entry.
    for t in &pushed {
        p.a.handle_datagram(now, addr(2), &t.bytes);
    }
    assert_eq!(p.a.networks["net1"].queue.transmissions_left(), before - 1);
    assert_eq!(p.a.get_entry("net1", "t", "k"), Some(Bytes::from_static(b"v")));
    for _ in 0..before {
        for t in &pushed {
            p.a.handle_datagram(now, addr(2), &t.bytes);
        }
    }
    // Duplicates cancel at most a quarter: the rest still go out.
    assert_eq!(left(&p.a), 1, "a rumour everyone repeats keeps most of its transmissions");
    assert_eq!(p.a.networks["net1"].queue.transmissions_left(), before - before / 4);
}

#[test]
fn a_duplicate_that_arrives_by_stream_counts_like_one_by_datagram() {
    let mut p = Pair::new(Config::default());
    let now = p.now;
    p.a.join_network(now, "net1").unwrap();
    p.b.join_network(now, "net1").unwrap();
    p.run(Duration::from_secs(1));
    p.b.create_entry(now, "net1", "t", "k", Bytes::from_static(b"v")).unwrap();
    let pushed = sent(&mut p.b);
    for t in &pushed {
        p.a.handle_datagram(now, addr(2), &t.bytes);
    }
    let before = p.a.networks["net1"].queue.transmissions_left();
    let stale = p.a.stats().entries_stale;
    // Events too large for a datagram travel in the same frame over a stream.
    for t in &pushed {
        p.a.handle_stream(now, addr(2), &t.bytes);
    }
    assert_eq!(p.a.stats().entries_stale, stale + 1);
    assert_eq!(p.a.networks["net1"].queue.transmissions_left(), before - 1);
}

#[test]
fn a_large_summary_is_split_by_bucket_within_the_frame_limit() {
    let mut p = Pair::new(Config { max_stream_frame: 64 << 10, ..Config::default() });
    let now = p.now;
    p.a.join_network(now, "net1").unwrap();
    // b attaches but hears nothing of a's writes: drop a's transmits.
    for k in 0..6000 {
        p.a.create_entry(now, "net1", "t", &format!("k{k:05}"), Bytes::from_static(b"v")).unwrap();
    }
    while p.a.poll_transmit().is_some() {}
    p.a.networks.get_mut("net1").unwrap().queue = Default::default();
    // Only b may start syncs, so a is the one answering with a summary.
    p.a.cfg.max_concurrent_syncs = 0;
    p.b.join_network(now, "net1").unwrap();
    p.frames.clear();
    // b asks (it syncs on attach); a answers with its summary.
    p.run(Duration::from_millis(500));
    let summaries: Vec<Packet> = p
        .frames
        .iter()
        .filter(|(from, _)| *from == 0)
        .map(|(_, t)| wire::decode_packet(&t.bytes).unwrap())
        .filter(|pk| matches!(&pk.body, Body::SyncSummary { network, .. } if network == "net1"))
        .collect();
    // The first round's frames (a round that moved this much may be followed by another).
    let first = summaries.iter().find_map(|pk| match pk.body {
        Body::SyncSummary { sync_id, .. } => Some(sync_id),
        _ => None,
    });
    let summaries: Vec<Packet> = summaries
        .into_iter()
        .filter(|pk| matches!(pk.body, Body::SyncSummary { sync_id, .. } if Some(sync_id) == first))
        .collect();
    assert!(summaries.len() >= 2, "{} summary frames", summaries.len());
    let lasts: Vec<bool> =
        summaries.iter().map(|pk| matches!(pk.body, Body::SyncSummary { last, .. } if last)).collect();
    assert_eq!(lasts.iter().filter(|l| **l).count(), 1);
    assert!(*lasts.last().unwrap());
    assert!(p.frames.iter().all(|(_, t)| t.bytes.len() <= 64 << 10));
    assert_eq!(p.b.entry_count("net1"), 6000);
    assert_eq!(p.b.stats().decode_errors, 0);
}

#[test]
fn syncs_of_many_networks_complete_and_none_starves() {
    let mut p = Pair::new(Config::default());
    let now = p.now;
    for k in 0..40 {
        p.a.join_network(now, &format!("net{k:02}")).unwrap();
        p.b.join_network(now, &format!("net{k:02}")).unwrap();
    }
    p.run(Duration::from_secs(3));
    // A write on the network that sorts last, whose gossip is lost.
    p.b.create_entry(p.now, "net39", "t", "k", Bytes::from_static(b"v")).unwrap();
    while p.b.poll_transmit().is_some() {}
    p.b.networks.get_mut("net39").unwrap().queue = Default::default();
    p.run(Duration::from_secs(30));
    assert_eq!(p.a.get_entry("net39", "t", "k"), Some(Bytes::from_static(b"v")), "repaired");
    // Identical digests are answered, so requests do not sit in the table until they time out.
    assert!(
        p.a.syncs.len() <= 4 && p.b.syncs.len() <= 4,
        "{} / {} syncs open",
        p.a.syncs.len(),
        p.b.syncs.len()
    );
    assert!(p.a.stats().syncs_started > 41 * 4, "every network synced: {}", p.a.stats().syncs_started);
}

#[test]
fn a_clock_near_overflow_from_a_peer_is_refused() {
    let now = Instant::now();
    let mut n = node(1, Config::default(), now);
    let before = n.ltime();
    let entry = |ltime| WireEntry {
        table: "t".into(),
        key: "k".into(),
        owner: "n9".into(),
        ltime,
        flags: 0,
        reap_in_ms: 0,
        value: Bytes::from_static(b"x"),
    };
    let far = before + MAX_LTIME_JUMP + 1;
    for (head_ltime, entry_ltime) in [(u64::MAX, 1), (1, u64::MAX), (MAX_LTIME, 1), (far, 1), (1, far)] {
        let head = Head { from: NodeId::new("n9", addr(9), 1), ltime: head_ltime };
        let body = Body::Events { network: "cluster".into(), events: vec![entry(entry_ltime)] };
        n.handle_datagram(now, addr(9), &wire::encode_packet(&Packet { head, body }).unwrap());
    }
    assert_eq!(n.ltime(), before, "the clock did not move");
    assert_eq!(n.stats().decode_errors, 5);
    n.create_entry(now, "cluster", "t", "mine", Bytes::from_static(b"ok")).unwrap();
    assert!(GossipNode::new(Config::default(), NodeId::new("x", addr(3), 1), 0, MAX_LTIME, now).is_err());
}

#[derive(Default)]
struct Recorder(Arc<Mutex<Vec<String>>>);

impl TableWatcher for Recorder {
    fn event_notify(
        &mut self,
        nid: &str,
        table: &str,
        key: &str,
        prev: Option<&[u8]>,
        value: Option<&[u8]>,
        v: crate::Version<'_>,
    ) {
        let s = |v: Option<&[u8]>| v.map(|b| String::from_utf8_lossy(b).into_owned());
        self.0.lock().unwrap().push(format!(
            "{nid}/{table}/{key} {:?}->{:?} @{}/{}",
            s(prev),
            s(value),
            v.ltime,
            v.owner
        ));
    }

    fn decode_table_entry(&self, _: &str, key: &str, value: &[u8]) -> (String, BTreeMap<String, String>) {
        let mut m = BTreeMap::new();
        m.insert("Host IP".to_string(), String::from_utf8_lossy(value).into_owned());
        (key.to_string(), m)
    }
}

#[test]
fn watchers_see_registered_tables_only_with_prev_values() {
    let now = Instant::now();
    let mut n = node(1, Config::default(), now);
    n.create_entry(now, "cluster", "peers", "ep0", Bytes::from_static(b"10.0.0.0")).unwrap();
    let t0 = n.entry("cluster", "peers", "ep0").unwrap().ltime;
    n.create_entry(now, "cluster", "other", "x", Bytes::from_static(b"y")).unwrap();
    assert!(std::iter::from_fn(|| n.poll_event()).all(|e| !matches!(e, Event::Table(_))), "unregistered");
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut w = Watchers::new();
    w.register("peers", ObjectType::Endpoint, Box::new(Recorder(log.clone())));
    n.register_table("peers", TableSpec::node_owned(ObjectType::Endpoint)).unwrap();
    n.update_entry(now, "cluster", "peers", "ep0", Bytes::from_static(b"10.0.0.1")).unwrap();
    n.delete_entry(now, "cluster", "peers", "ep0").unwrap();
    n.update_entry(now, "cluster", "other", "x", Bytes::from_static(b"z")).unwrap();
    while let Some(e) = n.poll_event() {
        if let Event::Table(t) = e {
            assert!(w.dispatch(&t), "only registered tables produce events");
        }
    }
    assert_eq!(
        *log.lock().unwrap(),
        vec![
            format!("cluster/peers/ep0 None->Some(\"10.0.0.0\") @{t0}/n1"),
            format!("cluster/peers/ep0 Some(\"10.0.0.0\")->Some(\"10.0.0.1\") @{}/n1", t0 + 2),
            format!("cluster/peers/ep0 Some(\"10.0.0.1\")->None @{}/n1", t0 + 3),
        ]
    );
    let (id, fields) = w.decode("peers", "ep7", b"192.0.2.1").unwrap();
    assert_eq!(id, "ep7");
    assert_eq!(fields["Host IP"], "192.0.2.1");
    assert!(w.decode("other", "x", b"z").is_none());
    assert!(n.register_table("weft:mine", TableSpec::cluster(ObjectType::Opaque)).is_err());
}

#[test]
fn a_write_always_wins_over_the_version_it_replaces() {
    let now = Instant::now();
    let mut n = node(1, Config::default(), now);
    // A peer's version with a far higher clock arrives first.
    let head = Head { from: NodeId::new("n9", addr(9), 1), ltime: 1 };
    let e = WireEntry {
        table: "t".into(),
        key: "k".into(),
        owner: "n9".into(),
        ltime: 1_000,
        flags: 0,
        reap_in_ms: 0,
        value: Bytes::from_static(b"theirs"),
    };
    let frame = wire::encode_packet(&Packet {
        head,
        body: Body::Events { network: "cluster".into(), events: vec![e] },
    })
    .unwrap();
    n.handle_datagram(now, addr(9), &frame);
    assert_eq!(n.get_entry("cluster", "t", "k"), Some(Bytes::from_static(b"theirs")));
    assert!(n.ltime() >= 1_000, "the clock witnessed the peer's");
    n.update_entry(now, "cluster", "t", "k", Bytes::from_static(b"mine")).unwrap();
    let v = n.table("cluster", "t");
    assert_eq!((v[0].owner.as_str(), v[0].ltime), ("n1", 1_001));
    // A stale copy of the old version changes nothing and is counted.
    n.handle_datagram(now, addr(9), &frame);
    assert_eq!(n.get_entry("cluster", "t", "k"), Some(Bytes::from_static(b"mine")));
    assert_eq!(n.stats().entries_stale, 1);
}

/// A datagram from `from` carrying one entry of `network`.
fn event_from(from: &GossipNode, network: &str, w: WireEntry) -> Vec<u8> {
    let head = Head { from: from.id.clone(), ltime: from.clock };
    wire::encode_packet(&Packet { head, body: Body::Events { network: network.into(), events: vec![w] } })
        .unwrap()
}

fn entry(table: &str, key: &str, owner: &str, ltime: u64, flags: u8, value: Bytes) -> WireEntry {
    WireEntry {
        table: table.into(),
        key: key.into(),
        owner: owner.into(),
        ltime,
        flags,
        reap_in_ms: 0,
        value,
    }
}

#[test]
fn a_peer_cannot_hide_an_owner_and_an_owner_membership_never_knew_is_hidden_after_the_grace() {
    let mut p = Pair::new(Config::default());
    let now = p.now;
    p.a.join_network(now, "net1").unwrap();
    p.b.join_network(now, "net1").unwrap();
    p.run(Duration::from_secs(1));
    // b relays an entry of "ghost", an owner a's membership has never seen, flagged hidden.
    let flagged = entry("t", "g", "ghost", 5, crate::wire::FLAG_HIDDEN, Bytes::from_static(b"v"));
    let bytes = event_from(&p.b, "net1", flagged);
    p.a.handle_datagram(p.now, addr(2), &bytes);
    assert_eq!(
        p.a.get_entry("net1", "t", "g"),
        Some(Bytes::from_static(b"v")),
        "the sender's flag is ignored"
    );
    // An entry of b, alive, reaches a flagged hidden (a stale relay): live.
    p.b.create_entry(p.now, "net1", "t", "b", Bytes::from_static(b"w")).unwrap();
    while p.b.poll_transmit().is_some() {}
    let ltime = p.b.table("net1", "t")[0].ltime;
    let stale = entry("t", "b", "n2", ltime, crate::wire::FLAG_HIDDEN, Bytes::from_static(b"w"));
    let bytes = event_from(&p.b, "net1", stale);
    p.a.handle_datagram(p.now, addr(2), &bytes);
    assert_eq!(p.a.get_entry("net1", "t", "b"), Some(Bytes::from_static(b"w")));
    // The unknown owner stays live for the grace, then is hidden; b's entry stays live.
    let grace = p.a.cfg.unknown_owner_grace();
    p.run(grace - Duration::from_secs(6));
    assert!(p.a.get_entry("net1", "t", "g").is_some(), "live within the grace");
    p.run(Duration::from_secs(12));
    assert_eq!(p.a.get_entry("net1", "t", "g"), None, "hidden after it");
    assert!(matches!(p.a.table("net1", "t")[1].state, EntryState::Hidden { .. }));
    assert_eq!(p.a.stats().owners_hidden_unknown, 1);
    assert_eq!(p.a.get_entry("net1", "t", "b"), Some(Bytes::from_static(b"w")));
    // Hidden is each node's own judgement, never part of the digest.
    assert_eq!(p.a.digests("net1").unwrap().0, p.b.digests("net1").unwrap().0);
}

#[test]
fn a_failed_member_that_turns_out_to_have_left_is_not_reported_down_twice() {
    let mut p = Pair::new(Config::default());
    // b's record as a tombstone: it left (the news arrives after a declared it failed).
    let rec = NodeRecord {
        instance: p.b.id.instance,
        generation: p.b.id.generation,
        addr: addr(2),
        data_addr: addr(2).ip(),
        status: NodeStatus::Left,
    };
    let left = entry(NODES_TABLE, "n2", "n2", 1_000, FLAG_CLUSTER | crate::wire::FLAG_DELETED, rec.encode());
    let bytes = event_from(&p.b, CLUSTER_NETWORK, left);
    // b stops answering; a declares it failed.
    let mut now = p.now;
    for _ in 0..3000 {
        now += Duration::from_millis(10);
        p.a.handle_timeout(now);
        while p.a.poll_transmit().is_some() {}
    }
    let downs = |n: &mut GossipNode| {
        std::iter::from_fn(|| n.poll_event())
            .filter_map(|e| match e {
                Event::MemberDown { reason, .. } => Some(reason),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(downs(&mut p.a), vec![DownReason::Failed]);
    p.a.handle_datagram(now, addr(2), &bytes);
    assert_eq!(downs(&mut p.a), Vec::<DownReason>::new(), "no second MemberDown");
    let m = p.a.members().into_iter().find(|m| &*m.id.name == "n2").unwrap();
    assert_eq!(m.state, MemberState::Left);
}

/// Virtual time from the moment b stops answering until a reports it down.
fn time_to_down(cfg: Config) -> Duration {
    let mut p = Pair::new(cfg);
    while p.a.poll_event().is_some() {}
    let start = p.now;
    let mut now = p.now;
    while now - start < Duration::from_secs(120) {
        now += Duration::from_millis(10);
        p.a.handle_timeout(now);
        while p.a.poll_transmit().is_some() {}
        while let Some(e) = p.a.poll_event() {
            if let Event::MemberDown { reason: DownReason::Failed, .. } = e {
                return now - start;
            }
        }
    }
    panic!("b never reported down");
}

#[test]
fn the_suspicion_timeout_follows_the_cluster_size_within_the_configured_bound() {
    // Made for 1,000 hosts: 12 s of suspicion. Two members get memberlist's 4 s.
    let big = Config::lan(1000);
    assert_eq!(big.membership.suspect_to_down_after, Duration::from_secs(12));
    assert_eq!(big.suspicion(2), Duration::from_secs(4));
    assert_eq!(big.suspicion(100), Duration::from_secs(8));
    assert_eq!(big.suspicion(10_000), Duration::from_secs(12), "never above the configured bound");
    let detection = big.membership.probe_period * 2 + big.membership.probe_rtt;
    let took = time_to_down(big.clone());
    assert!(
        took >= big.suspicion(2) && took <= big.suspicion(2) + detection,
        "a two-node cluster declared its dead member down after {took:?}"
    );
    // A configured timeout below the scaled one is kept.
    let mut short = Config::lan(1000);
    short.membership.suspect_to_down_after = Duration::from_secs(2);
    assert_eq!(short.suspicion(2), Duration::from_secs(2));
    let took = time_to_down(short);
    assert!(took <= Duration::from_secs(2) + detection, "down after {took:?}");
}

#[test]
fn the_suspicion_timeout_is_rescaled_as_members_come_and_go() {
    // Beyond 10 members the timeout grows with log10 of their number; foca gets it. (`members`
    // lists this node too.)
    let cfg = Config::lan(1000);
    let mut now = Instant::now();
    let mut nodes: Vec<GossipNode> = (1..=12).map(|i| node(i, cfg.clone(), now)).collect();
    for n in &mut nodes[1..] {
        n.join(now, &[addr(1)]).unwrap();
    }
    // Steps every node in `live` 10 ms, delivering what they send among themselves.
    let step = |nodes: &mut [GossipNode], now: Instant, live: usize| {
        for n in &mut nodes[..live] {
            n.handle_timeout(now);
        }
        loop {
            let mut sent = Vec::new();
            for (i, n) in nodes[..live].iter_mut().enumerate() {
                sent.extend(std::iter::from_fn(|| n.poll_transmit()).map(|t| (addr(i as u8 + 1), t)));
            }
            if sent.is_empty() {
                break;
            }
            for (from, t) in sent {
                let to = t.dst.ip().to_string().rsplit('.').next().unwrap().parse::<usize>().unwrap() - 1;
                if to < live {
                    match t.kind {
                        TransmitKind::Stream => nodes[to].handle_stream(now, from, &t.bytes),
                        _ => nodes[to].handle_datagram(now, from, &t.bytes),
                    }
                }
            }
        }
    };
    let alive = |n: &GossipNode| n.members().iter().filter(|m| m.state == MemberState::Alive).count();
    let mut waited = Duration::ZERO;
    while !nodes.iter().all(|n| alive(n) == 12) {
        assert!(
            waited < Duration::from_secs(60),
            "twelve nodes never all saw each other: {:?}",
            nodes.iter().map(|n| (alive(n), n.members().len())).collect::<Vec<_>>()
        );
        now += Duration::from_millis(10);
        waited += Duration::from_millis(10);
        step(&mut nodes, now, 12);
    }
    let twelve = cfg.suspicion(12);
    assert!(twelve > Duration::from_secs(4) && twelve < Duration::from_secs(5), "{twelve:?}");
    for n in &nodes {
        assert_eq!(n.membership.foca_cfg.suspect_to_down_after, twelve, "{}", n.id);
    }
    // Six stop for good: once the other six declare them down, they are back at 4 s.
    let mut waited = Duration::ZERO;
    while !nodes[..6].iter().all(|n| alive(n) == 6) {
        assert!(waited < Duration::from_secs(60), "the six stopped nodes were never declared down");
        now += Duration::from_millis(10);
        waited += Duration::from_millis(10);
        step(&mut nodes, now, 6);
    }
    for n in &nodes[..6] {
        assert_eq!(n.membership.foca_cfg.suspect_to_down_after, Duration::from_secs(4), "{}", n.id);
    }
}

#[test]
fn a_clash_is_a_live_node_answering_a_probe_and_ends_when_it_goes() {
    let mut p = Pair::new(Config::default());
    // b probes a as if a were another life of b's name: a answers; b reports a clash.
    let nonce = 42;
    p.b.life.probes.insert(addr(1), super::lifecycle::test_probe(nonce, p.now));
    let head = Head { from: NodeId::new("n2", addr(1), 9).with_instance(77), ltime: 1 };
    let ack = wire::encode_packet(&Packet { head, body: Body::ProbeAck { nonce, started: 9 } }).unwrap();
    p.b.handle_datagram(p.now, addr(1), &ack);
    let clash = std::iter::from_fn(|| p.b.poll_event()).find(|e| matches!(e, Event::NameConflict { .. }));
    assert!(clash.is_some(), "an answered probe is a clash");
    assert!(p.b.membership.name_contested);
    // A wrong nonce (or an unanswered probe) is not.
    let head = Head { from: NodeId::new("n2", addr(3), 9).with_instance(78), ltime: 1 };
    let forged =
        wire::encode_packet(&Packet { head, body: Body::ProbeAck { nonce: 7, started: 9 } }).unwrap();
    p.b.handle_datagram(p.now, addr(3), &forged);
    assert!(!std::iter::from_fn(|| p.b.poll_event()).any(|e| matches!(e, Event::NameConflict { .. })));
    // The clashing identity goes down: the contest is over.
    p.b.own_name_down(p.now, &NodeId::new("n2", addr(1), 9).with_instance(77));
    assert!(!p.b.membership.name_contested);
}

#[test]
fn a_peer_far_behind_is_repaired_in_bounded_rounds() {
    let cap = 500;
    let mut p = Pair::new(Config { max_sync_entries: cap, ..Config::default() });
    let now = p.now;
    p.a.join_network(now, "net1").unwrap();
    for k in 0..3000 {
        p.a.create_entry(now, "net1", "t", &format!("k{k:05}"), Bytes::from_static(b"v")).unwrap();
    }
    // b hears nothing of a's writes but what anti-entropy brings.
    while p.a.poll_transmit().is_some() {}
    p.a.networks.get_mut("net1").unwrap().queue = Default::default();
    p.b.join_network(now, "net1").unwrap();
    p.frames.clear();
    // Well within one sync interval (5 s): the rounds follow each other at once.
    p.run(Duration::from_secs(3));
    assert_eq!(p.b.table_len("net1", "t"), 3000, "repaired over several back-to-back rounds");
    // No frame of any round carried more than a round's share (entries sent on their own,
    // plus those answering a summary's wants, at most twice the bound).
    for (_, t) in &p.frames {
        if let Ok(Packet { body: Body::SyncEntries { entries, .. }, .. }) = wire::decode_packet(&t.bytes) {
            assert!(entries.len() <= 2 * cap, "a frame of {} entries", entries.len());
        }
    }
    let syncs = p.b.stats().syncs_started;
    assert!(syncs >= (3000 / (2 * cap)) as u64, "{syncs} rounds");
}

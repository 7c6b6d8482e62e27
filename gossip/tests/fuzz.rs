//! Arbitrary bytes and mutated valid frames, fed to the decoder and to a live node: every input
//! yields a value or a typed error, never a panic, and the node keeps working.

// Tests need an arbitrary origin for virtual time; the core itself never reads the clock.
#![allow(clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::{Config as PtConfig, RngSeed};
use weft_gossip::wire::{self, Body, Head, Packet, WireEntry};
use weft_gossip::{Config, GossipNode, NodeId, TransmitKind};

fn addr(i: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, i], 7946))
}

fn node(i: u8, now: Instant) -> GossipNode {
    GossipNode::new(Config::default(), NodeId::new(format!("n{i}"), addr(i), 1), i as u64, 0, now).unwrap()
}

/// Valid frames of every kind: gossip bodies and real foca packets.
fn corpus() -> Vec<Vec<u8>> {
    let head = Head { from: NodeId::new("peer", addr(9), 3), ltime: 77 };
    let entry = WireEntry {
        table: "endpoints".into(),
        key: "ep1".into(),
        owner: "peer".into(),
        ltime: 5,
        flags: 1,
        reap_in_ms: 1000,
        value: Bytes::from_static(b"value"),
    };
    let bodies = vec![
        Body::Events { network: "cluster".into(), events: vec![entry.clone(), entry.clone()] },
        Body::SyncDigest {
            network: "cluster".into(),
            sync_id: 9,
            buckets: vec![1; weft_gossip::DIGEST_BUCKETS],
        },
        Body::SyncSummary {
            network: "cluster".into(),
            sync_id: 9,
            buckets: vec![1, 2],
            items: vec![(1, 2), (3, 4)],
            last: true,
        },
        Body::SyncEntries {
            network: "cluster".into(),
            sync_id: 9,
            entries: vec![entry],
            want: vec![1, 2, 3],
        },
        Body::Message { data: Bytes::from_static(b"hello") },
    ];
    let mut out: Vec<Vec<u8>> = bodies
        .into_iter()
        .map(|body| wire::encode_packet(&Packet { head: head.clone(), body }).unwrap())
        .collect();
    // Real membership traffic between two nodes.
    let t0 = Instant::now();
    let mut a = node(1, t0);
    let mut b = node(2, t0);
    a.join(t0, &[addr(2)]).unwrap();
    for step in 0..20 {
        let now = t0 + Duration::from_millis(100 * step);
        while let Some(t) = a.poll_transmit() {
            if t.kind == TransmitKind::Datagram {
                out.push(t.bytes.to_vec());
            }
            b.handle_datagram(now, addr(1), &t.bytes);
        }
        while let Some(t) = b.poll_transmit() {
            out.push(t.bytes.to_vec());
            a.handle_datagram(now, addr(2), &t.bytes);
        }
        a.handle_timeout(now);
        b.handle_timeout(now);
    }
    out
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, bit: u8 },
    Set { at: usize, byte: u8 },
    Truncate { len: usize },
    Insert { at: usize, bytes: Vec<u8> },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Set { at, byte }),
        any::<usize>().prop_map(|len| Mutation::Truncate { len }),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
    ]
}

fn apply(frame: &mut Vec<u8>, m: &Mutation) {
    if frame.is_empty() {
        return;
    }
    match m {
        Mutation::Flip { at, bit } => {
            let i = at % frame.len();
            frame[i] ^= 1 << bit;
        }
        Mutation::Set { at, byte } => {
            let i = at % frame.len();
            frame[i] = *byte;
        }
        Mutation::Truncate { len } => frame.truncate(len % frame.len()),
        Mutation::Insert { at, bytes } => {
            let i = at % (frame.len() + 1);
            frame.splice(i..i, bytes.iter().copied());
        }
    }
}

/// Feeds `frame` both ways and checks the node still accepts a write and answers.
fn feed(frame: &[u8]) {
    let t0 = Instant::now();
    let mut n = node(1, t0);
    let _ = wire::decode_packet(frame);
    let _ = wire::open_envelope(frame);
    n.handle_datagram(t0, addr(9), frame);
    n.handle_stream(t0, addr(9), frame);
    n.handle_timeout(t0 + Duration::from_secs(1));
    while n.poll_transmit().is_some() {}
    while n.poll_event().is_some() {}
    n.create_entry(t0, "cluster", "t", "k", Bytes::from_static(b"v")).unwrap();
    assert_eq!(n.get_entry("cluster", "t", "k"), Some(Bytes::from_static(b"v")));
    let s = n.stats();
    assert_eq!(s.datagrams_in, 1);
    assert_eq!(s.streams_in, 1);
}

proptest! {
    #![proptest_config(PtConfig { cases: 2000, rng_seed: RngSeed::Fixed(0xf022), failure_persistence: None, ..PtConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        feed(&bytes);
    }

    #[test]
    fn arbitrary_payloads_behind_a_valid_envelope_never_panic(ty in 1u8..=2, bytes in proptest::collection::vec(any::<u8>(), 0..1500)) {
        let mut frame = vec![b'W', b'F', weft_gossip::wire::WIRE_VERSION];
        frame.push(ty);
        frame.extend(bytes);
        feed(&frame);
    }

    #[test]
    fn mutated_valid_frames_never_panic(pick in any::<usize>(), ms in proptest::collection::vec(mutation(), 1..4)) {
        let corpus = corpus();
        let mut frame = corpus[pick % corpus.len()].clone();
        for m in &ms {
            apply(&mut frame, m);
        }
        feed(&frame);
    }
}

#[test]
fn garbage_is_counted_as_decode_errors() {
    let t0 = Instant::now();
    let mut n = node(1, t0);
    n.handle_datagram(t0, addr(9), b"definitely not weft");
    n.handle_stream(t0, addr(9), b"WF\x02\x02\xff\xff\xff\xff\xff");
    n.handle_datagram(t0, addr(9), b"WF\x07\x02");
    assert_eq!(n.stats().decode_errors, 3);
    assert_eq!(n.stats().newer_version_frames, 1);
}

#[test]
fn the_corpus_is_valid() {
    for frame in corpus() {
        let (ty, _) = wire::open_envelope(&frame).expect("valid envelope");
        if ty == wire::FrameType::Gossip {
            wire::decode_packet(&frame).expect("valid packet");
        }
    }
}

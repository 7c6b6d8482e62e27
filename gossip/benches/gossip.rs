//! Criterion benchmarks of the gossip core's hot paths:
//! applying remote table events, building and comparing digests, packet encode/decode.

// Tests need an arbitrary origin for virtual time; the core itself never reads the clock.
#![allow(clippy::disallowed_methods)]

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use weft_gossip::wire::{self, EventsPacketBuilder, Head, WireEntry};
use weft_gossip::{Config, GossipNode, NodeId, diff_buckets};

fn addr(i: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, i], 7946))
}

fn entry(i: u64) -> WireEntry {
    WireEntry {
        table: "endpoints".into(),
        key: format!("endpoint-{i:08}"),
        owner: "peer".into(),
        ltime: i + 1,
        flags: 0,
        reap_in_ms: 0,
        value: Bytes::from(vec![7u8; 24]),
    }
}

/// Full datagrams of `n` distinct events from "peer", for network `net1`.
fn packets(n: u64) -> Vec<Bytes> {
    let head = Head { from: NodeId::new("peer", addr(9), 1), ltime: n };
    let mut out = Vec::new();
    let mut b = EventsPacketBuilder::new(&head, "net1", 1400).unwrap();
    let mut prefix = b.prefix_len();
    for i in 0..n {
        let e = wire::encode(&entry(i)).unwrap();
        if !b.push(&e) {
            out.push(b.finish(prefix));
            b = EventsPacketBuilder::new(&head, "net1", 1400).unwrap();
            prefix = b.prefix_len();
            assert!(b.push(&e));
        }
    }
    out.push(b.finish(prefix));
    out
}

fn fresh_node(now: Instant) -> GossipNode {
    let mut n = GossipNode::new(Config::default(), NodeId::new("me", addr(1), 1), 1, 0, now).unwrap();
    n.join_network(now, "net1").unwrap();
    n
}

fn apply_events(c: &mut Criterion) {
    let now = Instant::now();
    let n = 10_000u64;
    let pkts = packets(n);
    let mut g = c.benchmark_group("apply_remote_events");
    g.throughput(Throughput::Elements(n));
    g.bench_function("10k_new_entries_via_datagrams", |bch| {
        bch.iter_batched(
            || fresh_node(now),
            |mut node| {
                for p in &pkts {
                    node.handle_datagram(now, addr(9), p);
                }
                assert_eq!(node.entry_count("net1"), n as usize);
                node
            },
            BatchSize::LargeInput,
        )
    });
    // Baseline in the same run: only decoding the same datagrams.
    g.bench_function("decode_only_baseline", |bch| {
        bch.iter(|| {
            for p in &pkts {
                black_box(wire::decode_packet(p).unwrap());
            }
        })
    });
    g.finish();
}

fn digests(c: &mut Criterion) {
    let now = Instant::now();
    let mut node = fresh_node(now);
    for i in 0..100_000u64 {
        node.create_entry(now, "net1", "endpoints", &format!("endpoint-{i:08}"), Bytes::from_static(b"v"))
            .unwrap();
    }
    while node.poll_transmit().is_some() {}
    let mut g = c.benchmark_group("digest_100k_entries");
    g.throughput(Throughput::Elements(100_000));
    g.bench_function("rebuild_from_entries", |b| b.iter(|| black_box(node.digests("net1").unwrap().1)));
    let (inc, rebuilt) = node.digests("net1").unwrap();
    assert_eq!(inc, rebuilt);
    let mut other = inc.clone();
    other[17] ^= 1;
    g.bench_function("compare_two_digests", |b| b.iter(|| black_box(diff_buckets(&inc, &other))));
    g.finish();
}

fn packet_codec(c: &mut Criterion) {
    let head = Head { from: NodeId::new("peer", addr(9), 1), ltime: 5 };
    let encoded: Vec<Vec<u8>> = (0..200).map(|i| wire::encode(&entry(i)).unwrap()).collect();
    let full = packets(200).remove(0);
    let per_packet = match wire::decode_packet(&full).unwrap().body {
        wire::Body::Events { events, .. } => events.len(),
        _ => unreachable!(),
    };
    let mut g = c.benchmark_group("full_packet");
    g.throughput(Throughput::Bytes(full.len() as u64));
    g.bench_function(format!("encode_{per_packet}_events"), |b| {
        b.iter(|| {
            let mut builder = EventsPacketBuilder::new(&head, "net1", 1400).unwrap();
            let p = builder.prefix_len();
            for e in &encoded {
                if !builder.push(e) {
                    break;
                }
            }
            black_box(builder.finish(p))
        })
    });
    g.bench_function(format!("decode_{per_packet}_events"), |b| {
        b.iter(|| black_box(wire::decode_packet(&full).unwrap()))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1)).sample_size(20);
    targets = apply_events, digests, packet_codec
}
criterion_main!(benches);

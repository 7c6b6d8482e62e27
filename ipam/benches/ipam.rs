//! Allocate+release of single addresses in a /24, /16 and /8 (lowest-free and serial), and
//! allocation in a 99%-full /16, through the default IPAM; a naive `BTreeSet` allocator with the
//! same semantics runs beside it as the baseline. Then the ring: merging two rings of 10,000
//! ranges each (the run join, and a node's validating merge of a 10,000-range claim), against a
//! naive per-block `BTreeMap` join.

use std::collections::{BTreeMap, BTreeSet};
use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use weft_ipam::contract::{LOCAL_DEFAULT, OPT_SERIAL};
use weft_ipam::ring::{Claims, Name, Record, Run, Runs};
use weft_ipam::{DefaultIpam, Ipam, Options, PoolId, PoolRequest, Ring, RingEntry, Seed, Space};

/// The baseline: allocated offsets in a `BTreeSet`; lowest free found by walking it.
struct Naive {
    size: u128,
    used: BTreeSet<u128>,
    cursor: u128,
}

impl Naive {
    fn new(size: u128) -> Self {
        let mut used = BTreeSet::new();
        used.insert(0);
        used.insert(size - 1);
        Naive { size, used, cursor: 0 }
    }

    fn first_free(&self, from: u128) -> Option<u128> {
        let mut i = from;
        for &x in self.used.range(from..) {
            if x != i {
                break;
            }
            i += 1;
        }
        (i < self.size).then_some(i)
    }

    fn alloc(&mut self, serial: bool) -> Option<u128> {
        let i = if serial {
            self.first_free(self.cursor).or_else(|| self.first_free(0))
        } else {
            self.first_free(0)
        }?;
        self.used.insert(i);
        self.cursor = i + 1;
        Some(i)
    }

    fn release(&mut self, i: u128) {
        self.used.remove(&i);
    }
}

fn pool(prefix: u8) -> (DefaultIpam, PoolId) {
    let mut ipam = DefaultIpam::default();
    let req = PoolRequest {
        address_space: LOCAL_DEFAULT.into(),
        pool: Some(format!("10.0.0.0/{prefix}").parse().unwrap()),
        ..PoolRequest::default()
    };
    let id = ipam.request_pool(&req).unwrap().id;
    (ipam, id)
}

fn alloc_release(c: &mut Criterion) {
    let mut g = c.benchmark_group("alloc_release");
    for prefix in [24u8, 16, 8] {
        let size = 1u128 << (32 - prefix);
        for serial in [false, true] {
            let mode = if serial { "serial" } else { "lowest" };
            let mut opts = Options::new();
            if serial {
                opts.insert(OPT_SERIAL.into(), "true".into());
            }
            // Half full, so lowest-free has to look past a long run of allocated addresses.
            let (mut ipam, id) = pool(prefix);
            let mut naive = Naive::new(size);
            for i in 0..size / 2 {
                ipam.request_address(&id, None, &Options::new()).unwrap();
                naive.used.insert(i);
            }
            g.bench_function(format!("bitmap/{mode}/slash{prefix}"), |b| {
                b.iter(|| {
                    let (a, _) = ipam.request_address(&id, None, &opts).unwrap();
                    ipam.release_address(&id, black_box(a.addr())).unwrap();
                })
            });
            g.bench_function(format!("naive_btreeset/{mode}/slash{prefix}"), |b| {
                b.iter(|| {
                    let i = naive.alloc(serial).unwrap();
                    naive.release(black_box(i));
                })
            });
        }
    }
    g.finish();
}

fn nearly_full(c: &mut Criterion) {
    let mut g = c.benchmark_group("alloc_in_99pct_full_slash16");
    let size = 1u128 << 16;
    let (mut ipam, id) = pool(16);
    let mut naive = Naive::new(size);
    for i in 0..(size * 99 / 100) {
        ipam.request_address(&id, None, &Options::new()).unwrap();
        naive.used.insert(i);
    }
    g.bench_function("bitmap", |b| {
        b.iter(|| {
            let (a, _) = ipam.request_address(&id, None, &Options::new()).unwrap();
            ipam.release_address(&id, a.addr()).unwrap();
        })
    });
    g.bench_function("naive_btreeset", |b| {
        b.iter(|| {
            let i = naive.alloc(false).unwrap();
            naive.release(i);
        })
    });
    g.finish();
}

/// 10,000 ranges of 4 blocks with 50 owners; `shift` offsets the boundaries and `bump` raises
/// every other version, so two rings disagree on half of every range.
fn ranges(shift: u32, bump: u64) -> Vec<Run> {
    (0..10_000u32)
        .map(|i| {
            let owner: Name = format!("n{:02}", i % 50).into();
            let version = u64::from(i) + if i % 2 == 0 { bump } else { 0 };
            let rec = Record { epoch: 0, lineage: "".into(), version, writer: owner.clone(), owner };
            Run { start: i * 4 + shift, end: i * 4 + 4 + shift, rec }
        })
        .collect()
}

fn per_block(runs: &[Run]) -> BTreeMap<u32, Record> {
    runs.iter().flat_map(|r| (r.start..r.end).map(move |b| (b, r.rec.clone()))).collect()
}

fn ring_merge(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring_merge_10k_ranges");
    let (a, b) = (ranges(0, 0), ranges(2, 1));
    let (ra, rb) = (Runs::from_runs(a.clone()), Runs::from_runs(b.clone()));
    let (na, nb) = (per_block(&a), per_block(&b));
    g.bench_function("runs_join", |bench| bench.iter(|| black_box(ra.join(black_box(&rb)))));
    g.bench_function("naive_per_block_btreemap", |bench| {
        bench.iter(|| {
            let mut out = na.clone();
            for (k, v) in &nb {
                let e = out.entry(*k).or_insert_with(|| v.clone());
                if v > e {
                    *e = v.clone();
                }
            }
            black_box(out)
        })
    });
    // A node's merge of another node's 10,000-range claims, ownership checks included.
    let space = Space::new("bench", 40_002).unwrap();
    let mut ring = Ring::new("observer", space.clone(), []);
    let seed = Seed { space, owners: vec!["n00".into()], seeded_by: "n00".into(), params: String::new() };
    ring.install_seed(&seed).unwrap();
    let claims = |runs: Vec<Run>| {
        RingEntry::Claims(Claims { ring: "bench".into(), writer: "n00".into(), seq: 1, runs, free_blocks: 0 })
    };
    ring.merge(&claims(a)).unwrap();
    let incoming = claims(b);
    g.bench_function("ring_validating_merge", |bench| {
        bench.iter_batched(
            || ring.clone(),
            |mut r| {
                r.merge(&incoming).unwrap();
                black_box(r)
            },
            criterion::BatchSize::LargeInput,
        )
    });
    // A node owning 32,768 blocks (every other one allocated) merges claims over the other
    // half (about 8,000 ranges), where its own blocks are untouched: what it pays per claim.
    let half = |runs: Vec<Run>| runs.into_iter().filter(|r| r.end <= 32_768).collect::<Vec<_>>();
    let space = Space::new("bench", 1 << 16).unwrap();
    let mut owner = Ring::new("observer", space.clone(), []);
    let seed = Seed {
        space,
        owners: vec!["n00".into(), "observer".into()],
        seeded_by: "n00".into(),
        params: String::new(),
    };
    owner.install_seed(&seed).unwrap();
    owner.merge(&claims(half(ranges(0, 0)))).unwrap();
    for slot in (32_768..65_536).step_by(2) {
        owner.allocate(Some(slot)).unwrap();
    }
    let incoming = claims(half(ranges(2, 1)));
    g.bench_function("ring_validating_merge_by_an_owner", |bench| {
        bench.iter_batched(
            || owner.clone(),
            |mut r| {
                r.merge(&incoming).unwrap();
                black_box(r)
            },
            criterion::BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500)).sample_size(20);
    targets = alloc_release, nearly_full, ring_merge
}
criterion_main!(benches);

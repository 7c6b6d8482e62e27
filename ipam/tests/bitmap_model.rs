//! The bitmap against a `BTreeSet` model: random sets, clears and lowest-free searches over
//! small and huge spaces agree at every step, and so do range counts.

use std::collections::BTreeSet;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use weft_ipam::Bitmap;

#[derive(Debug, Clone)]
enum Op {
    Set(u128),
    Unset(u128),
    SetFirst {
        from: u128,
        len: u128,
    },
    Fill {
        from: u128,
        len: u16,
    },
    /// Fills a whole 2^16 chunk (where the full-chunk index works).
    FillChunk(u8),
}

fn ops(size: u128) -> impl Strategy<Value = Vec<Op>> {
    ops_with(size, 0)
}

/// `chunk_fills`: weight of whole-chunk fills against 10 for everything else.
fn ops_with(size: u128, chunk_fills: u32) -> impl Strategy<Value = Vec<Op>> {
    // Indexes cluster near chunk boundaries and the ends, where bugs live.
    let idx = prop_oneof![
        0..size.min(300),
        (0u128..8).prop_map(move |k| ((k + 1) << 16).min(size - 1)),
        (0u128..8).prop_flat_map(move |k| {
            let b = (k << 16).min(size - 1);
            b..(b + 200).min(size)
        }),
        (size - size.min(300))..size,
        0..size,
    ];
    let op = prop_oneof![
        4 => idx.clone().prop_map(Op::Set),
        2 => idx.clone().prop_map(Op::Unset),
        3 => (idx.clone(), 1..size.min(1 << 18)).prop_map(|(from, len)| Op::SetFirst { from, len }),
        1 => (idx, 1u16..3000).prop_map(|(from, len)| Op::Fill { from, len }),
        chunk_fills => any::<u8>().prop_map(Op::FillChunk),
    ];
    proptest::collection::vec(op, 1..120)
}

fn check(size: u128, ops: &[Op]) {
    let mut b = Bitmap::new(size);
    let mut m: BTreeSet<u128> = BTreeSet::new();
    let model_first = |m: &BTreeSet<u128>, from: u128, to: u128| {
        let to = to.min(size);
        let mut i = from;
        for &x in m.range(from..to) {
            if x != i {
                break;
            }
            i += 1;
        }
        (i < to).then_some(i)
    };
    for op in ops {
        match *op {
            Op::Set(i) => assert_eq!(b.set(i), i < size && m.insert(i), "set {i}"),
            Op::Unset(i) => assert_eq!(b.unset(i), m.remove(&i), "unset {i}"),
            Op::SetFirst { from, len } => {
                let to = from.saturating_add(len);
                let want = model_first(&m, from, to);
                assert_eq!(b.set_first_in(from, to), want, "first free in {from}..{to}");
                if let Some(w) = want {
                    m.insert(w);
                }
                let counted = m.range(from..to.min(size).max(from)).count() as u128;
                assert_eq!(b.count_in(from, to), counted, "count in {from}..{to}");
            }
            Op::FillChunk(k) => {
                let base = u128::from(k % 6) << 16;
                for i in base..(base + (1 << 16)).min(size) {
                    b.set(i);
                    m.insert(i);
                }
            }
            Op::Fill { from, len } => {
                for i in from..(from + len as u128).min(size) {
                    b.set(i);
                    m.insert(i);
                }
            }
        }
        assert_eq!(b.allocated(), m.len() as u128);
    }
    assert!(b.iter().eq(m.iter().copied()));
}

proptest! {
    #![proptest_config(Config { cases: 400, rng_seed: RngSeed::Fixed(0xb17), failure_persistence: None, ..Config::default() })]

    #[test]
    fn small_spaces_match_the_model(ops in ops(1000)) {
        check(1000, &ops);
    }

    #[test]
    fn a_slash_8_matches_the_model(ops in ops(1 << 24)) {
        check(1 << 24, &ops);
    }

    #[test]
    fn a_slash_48_matches_the_model(ops in ops(1 << 80)) {
        check(1 << 80, &ops);
    }
}

proptest! {
    #![proptest_config(Config { cases: 40, rng_seed: RngSeed::Fixed(0xf011), failure_persistence: None, ..Config::default() })]

    #[test]
    fn full_chunks_match_the_model(ops in ops_with(6 << 16, 1)) {
        check(6 << 16, &ops);
    }
}

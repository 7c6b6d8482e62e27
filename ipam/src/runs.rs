//! Per-block ownership records of a ring, stored as runs of consecutive blocks that share a
//! record, and their join (the CRDT merge: per block, the highest record wins).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// A node's name, as the gossip layer knows it.
pub type Name = Arc<str>;

/// Who owns a block, and which write made it so. Records are totally ordered by
/// `(epoch, lineage, version, writer, owner)`; the highest wins.
///
/// * `epoch` is raised only by a takeover (`transfer_dead`): a record of a newer epoch beats
///   anything written in an older one, which is how a removal wins over whatever the removed
///   node writes afterwards. A takeover writes version 0 of its epoch.
/// * `lineage` names the heir whose takeover opened the epoch (empty for epoch 0), and is kept
///   by every later write in it. Two heirs taking the same block at once open two lines of
///   one epoch; the higher line wins with everything written in it, so even then every node
///   ends with the same single owner.
/// * `version` grows with every write by the owner (the writer takes the highest version it
///   has seen anywhere in the ring, plus one, so a donation of many blocks stays one run).
/// * `writer` is the node that wrote the record (empty for the seed), `owner` the node it gives
///   the block to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Record {
    pub epoch: u32,
    pub lineage: Name,
    pub version: u64,
    pub writer: Name,
    pub owner: Name,
}

impl Record {
    /// A takeover record (version 0 of an epoch above 0, written by its line's heir).
    pub fn is_takeover(&self) -> bool {
        self.epoch > 0 && self.version == 0 && self.writer == self.lineage
    }
}

/// Blocks `start..end` share `rec`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Run {
    pub start: u32,
    pub end: u32,
    pub rec: Record,
}

/// Sorted, non-overlapping runs; adjacent runs with equal records are merged. Blocks without a
/// record are simply not covered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Runs(Vec<Run>);

impl Runs {
    /// Runs from any list (unsorted, overlapping): per block, the highest record wins. Sorted,
    /// disjoint input (what claims carry) is taken in one pass; anything else is joined
    /// pairwise, `O(n log n)`.
    pub fn from_runs(runs: impl IntoIterator<Item = Run>) -> Runs {
        let runs: Vec<Run> = runs.into_iter().filter(|r| r.start < r.end).collect();
        if runs.windows(2).all(|w| w[0].end <= w[1].start) {
            let mut out = Runs(Vec::with_capacity(runs.len()));
            for r in &runs {
                out.push(r.start, r.end, &r.rec);
            }
            return out;
        }
        let mut level: Vec<Runs> = runs.into_iter().map(|r| Runs(vec![r])).collect();
        while level.len() > 1 {
            level = level.chunks(2).map(|c| if let [a, b] = c { a.join(b) } else { c[0].clone() }).collect();
        }
        level.pop().unwrap_or_default()
    }

    pub fn as_slice(&self) -> &[Run] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Blocks covered.
    pub fn blocks(&self) -> u64 {
        self.0.iter().map(|r| u64::from(r.end - r.start)).sum()
    }

    /// The record of block `b`.
    pub fn get(&self, b: u32) -> Option<&Record> {
        let i = self.0.partition_point(|r| r.end <= b);
        self.0.get(i).filter(|r| r.start <= b).map(|r| &r.rec)
    }

    /// Runs overlapping `start..end`, clipped to it.
    pub fn slice(&self, start: u32, end: u32) -> impl Iterator<Item = Run> + '_ {
        let i = self.0.partition_point(|r| r.end <= start);
        self.0[i..].iter().take_while(move |r| r.start < end).map(move |r| Run {
            start: r.start.max(start),
            end: r.end.min(end),
            rec: r.rec.clone(),
        })
    }

    /// Appends a run after every existing one, merging it with the last if they touch and agree.
    fn push(&mut self, start: u32, end: u32, rec: &Record) {
        if start >= end {
            return;
        }
        if let Some(last) = self.0.last_mut() {
            debug_assert!(last.end <= start);
            if last.end == start && last.rec == *rec {
                last.end = end;
                return;
            }
        }
        self.0.push(Run { start, end, rec: rec.clone() });
    }

    /// The join: per block, the higher record. Commutative, associative, idempotent; linear
    /// in the number of runs.
    pub fn join(&self, other: &Runs) -> Runs {
        let (a, b) = (&self.0, &other.0);
        let (mut i, mut j) = (0, 0);
        let mut out = Runs(Vec::with_capacity(a.len().max(b.len())));
        let mut pos = 0u32;
        loop {
            while i < a.len() && a[i].end <= pos {
                i += 1;
            }
            while j < b.len() && b[j].end <= pos {
                j += 1;
            }
            let (end, rec) = match (a.get(i), b.get(j)) {
                (None, None) => break,
                (Some(x), None) | (None, Some(x)) => {
                    pos = pos.max(x.start);
                    (x.end, &x.rec)
                }
                (Some(x), Some(y)) => {
                    pos = pos.max(x.start.min(y.start));
                    match (x.start <= pos, y.start <= pos) {
                        (true, true) => (x.end.min(y.end), if x.rec >= y.rec { &x.rec } else { &y.rec }),
                        (true, false) => (x.end.min(y.start), &x.rec),
                        _ => (y.end.min(x.start), &y.rec),
                    }
                }
            };
            out.push(pos, end, rec);
            pos = end;
        }
        out
    }

    /// Rewrites the covered blocks of `start..end` with `f(old record)`.
    pub fn rewrite(&mut self, start: u32, end: u32, f: impl Fn(&Record) -> Record) {
        let mut out = Runs(Vec::with_capacity(self.0.len() + 2));
        for r in &self.0 {
            if r.end <= start || r.start >= end {
                out.push(r.start, r.end, &r.rec);
                continue;
            }
            out.push(r.start, r.start.max(start), &r.rec);
            out.push(r.start.max(start), r.end.min(end), &f(&r.rec));
            out.push(r.end.min(end), r.end, &r.rec);
        }
        *self = out;
    }

    pub fn iter(&self) -> impl Iterator<Item = &Run> {
        self.0.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(epoch: u32, version: u64, owner: &str) -> Record {
        let lineage = if epoch == 0 { "" } else { owner };
        Record { epoch, lineage: lineage.into(), version, writer: owner.into(), owner: owner.into() }
    }

    fn run(start: u32, end: u32, r: Record) -> Run {
        Run { start, end, rec: r }
    }

    #[test]
    fn join_takes_the_higher_record_per_block_and_keeps_gaps() {
        let a = Runs::from_runs([run(0, 10, rec(0, 1, "a")), run(20, 30, rec(0, 1, "a"))]);
        let b = Runs::from_runs([run(5, 25, rec(0, 2, "b"))]);
        let j = a.join(&b);
        assert_eq!(
            j.as_slice(),
            &[run(0, 5, rec(0, 1, "a")), run(5, 25, rec(0, 2, "b")), run(25, 30, rec(0, 1, "a"))]
        );
        assert_eq!(j, b.join(&a));
        assert_eq!(j.join(&j), j);
        let gap = Runs::from_runs([run(40, 41, rec(0, 0, "c"))]);
        assert_eq!(j.join(&gap).get(40), Some(&rec(0, 0, "c")));
        assert_eq!(j.join(&gap).get(35), None);
        assert_eq!(j.blocks(), 30);
    }

    #[test]
    fn a_newer_epoch_beats_any_version_and_the_higher_line_all_of_the_lower() {
        assert!(rec(1, 0, "heir") > rec(0, 99, "zz"));
        let late = Record { owner: "x".into(), version: 7, ..rec(1, 0, "h1") };
        assert!(rec(1, 0, "h2") > late, "h2's takeover beats what h1 wrote after its own");
        assert!(rec(1, 0, "heir").is_takeover());
        assert!(!rec(0, 0, "seed").is_takeover());
    }

    #[test]
    fn rewrite_splits_and_merges_runs() {
        let mut r = Runs::from_runs([run(0, 10, rec(0, 1, "a"))]);
        r.rewrite(3, 6, |old| Record { owner: "b".into(), ..old.clone() });
        assert_eq!(r.len(), 3);
        r.rewrite(3, 6, |old| Record { owner: "a".into(), ..old.clone() });
        assert_eq!(r.as_slice(), &[run(0, 10, rec(0, 1, "a"))], "equal neighbours merge again");
        assert_eq!(r.slice(8, 20).collect::<Vec<_>>(), vec![run(8, 10, rec(0, 1, "a"))]);
    }
}

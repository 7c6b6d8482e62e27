//! The allocation bitmap: one bit per address (or VNI) of a space of up to 2^127 slots.
//!
//! Bits live in chunks of 2^16 (1,024 u64 words); a chunk exists only while it has a bit set, so
//! a sparse /48 costs memory per allocation, not per address. Inside a chunk, a 1,024-bit
//! summary marks full words: finding a free bit reads at most 16 summary words and one data
//! word (trailing-one counts), never a whole megabyte of a nearly full /8.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

const CHUNK_BITS: u32 = 16;
const CHUNK: u128 = 1 << CHUNK_BITS;
const WORDS: usize = (CHUNK / 64) as usize;
const SUMMARY: usize = WORDS / 64;
/// Slots per page of [`Bitmap::page_words`] (64 words, 512 bytes).
pub const PAGE_SLOTS: u128 = 4096;
const PAGE_WORDS: usize = (PAGE_SLOTS / 64) as usize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Chunk {
    words: Vec<u64>,
    /// Bit `w` set: word `w` is full.
    full: [u64; SUMMARY],
    count: u32,
}

impl Chunk {
    fn new() -> Self {
        Chunk { words: vec![0; WORDS], full: [0; SUMMARY], count: 0 }
    }

    fn is_set(&self, bit: u32) -> bool {
        self.words[(bit / 64) as usize] >> (bit % 64) & 1 == 1
    }

    fn set(&mut self, bit: u32) {
        let w = (bit / 64) as usize;
        self.words[w] |= 1 << (bit % 64);
        self.count += 1;
        if self.words[w] == u64::MAX {
            self.full[w / 64] |= 1 << (w % 64);
        }
    }

    fn unset(&mut self, bit: u32) {
        let w = (bit / 64) as usize;
        self.words[w] &= !(1 << (bit % 64));
        self.count -= 1;
        self.full[w / 64] &= !(1 << (w % 64));
    }

    /// Lowest clear bit at or above `from` (within this chunk).
    fn first_clear(&self, from: u32) -> Option<u32> {
        let mut w = (from / 64) as usize;
        // The first word, masked below `from`.
        let first = self.words[w] | ((1u64 << (from % 64)) - 1);
        if first != u64::MAX {
            return Some(w as u32 * 64 + first.trailing_ones());
        }
        w += 1;
        while w < WORDS {
            // Skip full words 64 at a time through the summary.
            let s = w / 64;
            let summary = self.full[s] | ((1u64 << (w % 64)) - 1);
            if summary == u64::MAX {
                w = (s + 1) * 64;
                continue;
            }
            let free_word = s * 64 + summary.trailing_ones() as usize;
            return Some(free_word as u32 * 64 + self.words[free_word].trailing_ones());
        }
        None
    }
}

/// A set of allocated slots `0..size`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(from = "Stored", into = "Stored")]
pub struct Bitmap {
    size: u128,
    chunks: BTreeMap<u128, Chunk>,
    allocated: u128,
    /// Runs of full chunks, start -> end (chunk indexes): the level above the chunks, so a
    /// search skips a full /8 in one lookup.
    full: BTreeMap<u128, u128>,
    /// The one empty chunk kept (the last to empty): allocating and releasing one address at
    /// the edge of the used space would otherwise create and drop a chunk every time. Any other
    /// chunk is dropped when it empties, so memory stays proportional to what is allocated.
    empty: Option<u128>,
}

/// What is written to disk: the chunks that hold bits; the full-run index is rebuilt on load.
#[derive(Serialize, Deserialize)]
struct Stored {
    size: u128,
    chunks: BTreeMap<u128, Chunk>,
}

impl From<Bitmap> for Stored {
    fn from(b: Bitmap) -> Stored {
        let chunks = b.chunks.into_iter().filter(|(_, c)| c.count > 0).collect();
        Stored { size: b.size, chunks }
    }
}

impl From<Stored> for Bitmap {
    fn from(s: Stored) -> Bitmap {
        let mut b = Bitmap::new(s.size);
        for (k, c) in s.chunks {
            if c.count == 0 || (k << CHUNK_BITS) >= s.size {
                continue;
            }
            b.allocated += u128::from(c.count);
            if u128::from(c.count) == CHUNK {
                b.mark_full(k);
            }
            b.chunks.insert(k, c);
        }
        b
    }
}

impl PartialEq for Bitmap {
    fn eq(&self, other: &Self) -> bool {
        let live = |b: &Bitmap| {
            b.chunks.iter().filter(|(_, c)| c.count > 0).map(|(k, c)| (*k, c.clone())).collect::<Vec<_>>()
        };
        (self.size, self.allocated) == (other.size, other.allocated) && live(self) == live(other)
    }
}

impl Eq for Bitmap {}

impl Bitmap {
    /// An empty bitmap of `size` slots.
    pub fn new(size: u128) -> Self {
        Bitmap { size, chunks: BTreeMap::new(), allocated: 0, full: BTreeMap::new(), empty: None }
    }

    pub fn size(&self) -> u128 {
        self.size
    }

    pub fn allocated(&self) -> u128 {
        self.allocated
    }

    pub fn free(&self) -> u128 {
        self.size - self.allocated
    }

    pub fn is_set(&self, i: u128) -> bool {
        i < self.size && self.chunks.get(&(i >> CHUNK_BITS)).is_some_and(|c| c.is_set((i % CHUNK) as u32))
    }

    /// Sets slot `i`; false if it was set already or is out of range.
    pub fn set(&mut self, i: u128) -> bool {
        if i >= self.size || self.is_set(i) {
            return false;
        }
        let k = i >> CHUNK_BITS;
        let c = self.chunks.entry(k).or_insert_with(Chunk::new);
        c.set((i % CHUNK) as u32);
        let now_full = c.count as u128 == CHUNK;
        if self.empty == Some(k) {
            self.empty = None;
        }
        if now_full {
            self.mark_full(k);
        }
        self.allocated += 1;
        true
    }

    fn mark_full(&mut self, k: u128) {
        let mut start = k;
        let mut end = k + 1;
        if let Some((&s, &e)) = self.full.range(..k).next_back()
            && e == k
        {
            start = s;
        }
        if let Some(e) = self.full.remove(&(k + 1)) {
            end = e;
        }
        self.full.insert(start, end);
    }

    fn mark_not_full(&mut self, k: u128) {
        let (&s, &e) = self.full.range(..=k).next_back().expect("a full chunk is in a run");
        debug_assert!(s <= k && k < e);
        self.full.remove(&s);
        if s < k {
            self.full.insert(s, k);
        }
        if k + 1 < e {
            self.full.insert(k + 1, e);
        }
    }

    /// The first chunk index at or after `k` that is not full.
    fn skip_full(&self, k: u128) -> u128 {
        match self.full.range(..=k).next_back() {
            Some((_, &e)) if e > k => e,
            _ => k,
        }
    }

    /// Clears slot `i`; false if it was clear or out of range. Empty chunks are dropped.
    pub fn unset(&mut self, i: u128) -> bool {
        if !self.is_set(i) {
            return false;
        }
        let k = i >> CHUNK_BITS;
        let c = self.chunks.get_mut(&k).expect("set bit has a chunk");
        let was_full = c.count as u128 == CHUNK;
        c.unset((i % CHUNK) as u32);
        let now_empty = c.count == 0;
        if was_full {
            self.mark_not_full(k);
        }
        if now_empty && let Some(old) = self.empty.replace(k) {
            self.chunks.remove(&old);
        }
        self.allocated -= 1;
        true
    }

    /// The lowest clear slot in `from..to` (`to` capped at the size).
    pub fn first_clear_in(&self, from: u128, to: u128) -> Option<u128> {
        let to = to.min(self.size);
        let mut i = from;
        while i < to {
            let k = i >> CHUNK_BITS;
            let past = self.skip_full(k);
            if past != k {
                i = past.saturating_mul(CHUNK);
                continue;
            }
            let found = match self.chunks.get(&k) {
                None => Some(i),
                Some(c) => c.first_clear((i % CHUNK) as u32).map(|b| (k << CHUNK_BITS) + b as u128),
            };
            if let Some(f) = found {
                return (f < to).then_some(f);
            }
            // The rest of this chunk is full: skip to the next chunk, and past the run of full
            // chunks after it, if any.
            i = self.skip_full(k + 1).saturating_mul(CHUNK);
        }
        None
    }

    /// Sets and returns the lowest clear slot in `from..to`, if any.
    pub fn set_first_in(&mut self, from: u128, to: u128) -> Option<u128> {
        let i = self.first_clear_in(from, to)?;
        self.set(i);
        Some(i)
    }

    /// Allocated slots in `from..to`: whole chunks by their count, partial ones by popcount.
    pub fn count_in(&self, from: u128, to: u128) -> u128 {
        let to = to.min(self.size);
        if from >= to {
            return 0;
        }
        let mut n = 0u128;
        for (&k, c) in self.chunks.range(from >> CHUNK_BITS..=(to - 1) >> CHUNK_BITS) {
            let base = k << CHUNK_BITS;
            let lo = from.max(base) - base;
            let hi = to.min(base + CHUNK) - base;
            if lo == 0 && hi == CHUNK {
                n += c.count as u128;
                continue;
            }
            let (lo, hi) = (lo as usize, hi as usize);
            for w in lo / 64..hi.div_ceil(64) {
                let mut word = c.words[w];
                let (ws, we) = (w * 64, w * 64 + 64);
                if lo > ws {
                    word &= u64::MAX << (lo - ws);
                }
                if hi < we {
                    word &= u64::MAX >> (we - hi);
                }
                n += word.count_ones() as u128;
            }
        }
        n
    }

    /// The words of page `page` (slots `page * PAGE_SLOTS ..`), empty when none is set: the
    /// unit a change log writes, so one allocation costs one small key, not a whole chunk.
    pub fn page_words(&self, page: u128) -> Vec<u64> {
        let first = page.saturating_mul(PAGE_SLOTS);
        let Some(c) = self.chunks.get(&(first >> CHUNK_BITS)) else { return Vec::new() };
        let w = ((first % CHUNK) / 64) as usize;
        let words = &c.words[w..w + PAGE_WORDS];
        if words.iter().all(|&x| x == 0) { Vec::new() } else { words.to_vec() }
    }

    /// Sets the bits of page `page` from its words (restoring a change log); bits beyond the
    /// size are ignored. Bits already set stay set.
    pub fn load_page(&mut self, page: u128, words: &[u64]) {
        let first = page.saturating_mul(PAGE_SLOTS);
        for (w, &word) in words.iter().take(PAGE_WORDS).enumerate() {
            for b in 0..64u32 {
                if word >> b & 1 == 1 {
                    self.set(first + w as u128 * 64 + u128::from(b));
                }
            }
        }
    }

    /// Allocated slots in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u128> + '_ {
        self.chunks.iter().flat_map(|(&k, c)| {
            c.words.iter().enumerate().flat_map(move |(w, &word)| {
                let base = (k << CHUNK_BITS) + (w as u128) * 64;
                (0..64u32).filter(move |b| word >> b & 1 == 1).map(move |b| base + b as u128)
            })
        })
    }

    /// Memory held by the bitmap, roughly (for tests and reports).
    pub fn heap_bytes(&self) -> usize {
        self.chunks.len() * (WORDS * 8 + SUMMARY * 8 + 64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowest_free_skips_full_words_and_chunks() {
        let mut b = Bitmap::new(1 << 24);
        for i in 0..(3 * CHUNK + 70) {
            assert!(b.set(i));
        }
        assert_eq!(b.first_clear_in(0, b.size()), Some(3 * CHUNK + 70));
        assert!(b.unset(5));
        assert_eq!(b.first_clear_in(0, b.size()), Some(5));
        assert_eq!(b.first_clear_in(6, b.size()), Some(3 * CHUNK + 70));
        assert_eq!(b.first_clear_in(6, 3 * CHUNK + 70), None);
        assert!(!b.set(6), "already set");
        assert!(!b.set(1 << 24), "out of range");
        assert_eq!(b.allocated(), 3 * CHUNK + 69);
        assert_eq!(b.count_in(0, b.size()), 3 * CHUNK + 69);
        assert_eq!(b.count_in(3, 8), 4, "slot 5 is clear");
        assert_eq!(b.count_in(CHUNK - 10, 2 * CHUNK + 3), CHUNK + 13);
        assert_eq!(b.count_in(3 * CHUNK + 60, 1 << 24), 10);
        assert_eq!(b.count_in(9, 9), 0);
    }

    #[test]
    fn a_huge_sparse_space_costs_per_allocation() {
        let mut b = Bitmap::new(1 << 80);
        assert_eq!(b.set_first_in(0, b.size()), Some(0));
        assert!(b.set((1 << 79) + 12345));
        assert_eq!(b.first_clear_in(1 << 79, b.size()), Some(1 << 79));
        assert_eq!(b.heap_bytes(), 2 * (WORDS * 8 + SUMMARY * 8 + 64));
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![0, (1 << 79) + 12345]);
        assert!(b.unset(0));
        assert_eq!(b.chunks.len(), 2, "the last chunk to empty is kept");
        assert!(b.set(5 << 40));
        assert!(b.unset(5 << 40));
        assert_eq!(b.chunks.len(), 2, "another chunk emptying drops the kept one");
        assert!(b.unset((1 << 79) + 12345));
        assert_eq!(b.chunks.len(), 1);
        assert_eq!(b, Bitmap::new(1 << 80), "empty chunks do not count for equality");
    }

    #[test]
    fn runs_of_full_chunks_are_skipped_in_one_step_and_split_on_release() {
        let mut b = Bitmap::new(8 * CHUNK);
        for i in 0..5 * CHUNK {
            b.set(i);
        }
        assert_eq!(b.full.iter().collect::<Vec<_>>(), vec![(&0, &5)]);
        assert_eq!(b.first_clear_in(0, b.size()), Some(5 * CHUNK));
        assert!(b.unset(2 * CHUNK + 7));
        assert_eq!(b.full.iter().collect::<Vec<_>>(), vec![(&0, &2), (&3, &5)]);
        assert_eq!(b.first_clear_in(0, b.size()), Some(2 * CHUNK + 7));
        assert_eq!(b.first_clear_in(2 * CHUNK + 8, b.size()), Some(5 * CHUNK));
        assert!(b.set(2 * CHUNK + 7));
        assert_eq!(b.full.iter().collect::<Vec<_>>(), vec![(&0, &5)], "runs join again");
        // The index is not stored; loading rebuilds it.
        let json = serde_json::to_string(&b).unwrap();
        let back: Bitmap = serde_json::from_str(&json).unwrap();
        assert_eq!(back.full, b.full);
        assert_eq!(back, b);
        assert_eq!(back.first_clear_in(0, back.size()), Some(5 * CHUNK));
    }

    #[test]
    fn a_full_space_has_no_free_slot() {
        let mut b = Bitmap::new(130);
        for _ in 0..130 {
            assert!(b.set_first_in(0, 130).is_some());
        }
        assert_eq!(b.set_first_in(0, 130), None);
        assert_eq!(b.free(), 0);
    }
}

//! Replicated table state of one network: entries, version order, merge rules, bucket digest.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use xxhash_rust::xxh3::{Xxh3, xxh3_64};

use crate::queue::BroadcastQueue;
use crate::watcher::ObjectType;
use crate::wire::{FLAG_CLUSTER, FLAG_DELETED, WireEntry};

/// Buckets of the anti-entropy digest. 128 x 8 bytes: a digest costs 1 KiB whatever the size
/// of the tables.
pub const DIGEST_BUCKETS: usize = 128;

/// The two kinds of table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableKind {
    /// An entry lives with its owner (networkdb semantics): hidden while the owner is failed,
    /// removed when it leaves or detaches from the network.
    NodeOwned,
    /// An entry outlives its writer and goes only by an explicit delete.
    Cluster,
}

/// One version of an entry, as a merge rule sees it.
#[derive(Debug, Clone, Copy)]
pub struct VersionRef<'a> {
    pub ltime: u64,
    pub owner: &'a str,
    pub deleted: bool,
    pub value: &'a [u8],
}

/// Decides which of two versions of a cluster-table entry wins. It must be a total order
/// (antisymmetric, transitive) so every node picks the same winner; ties it leaves (`Equal`)
/// are broken by the default order `(ltime, owner)`.
pub trait MergeRule: Send + Sync + std::fmt::Debug {
    /// `Greater` when `a` wins over `b`.
    fn compare(&self, a: &VersionRef<'_>, b: &VersionRef<'_>) -> Ordering;
}

/// How a table behaves; registered before events flow for it.
#[derive(Debug, Clone)]
pub struct TableSpec {
    pub kind: TableKind,
    pub object_type: ObjectType,
    pub merge: Option<Arc<dyn MergeRule>>,
}

impl TableSpec {
    pub fn node_owned(object_type: ObjectType) -> Self {
        TableSpec { kind: TableKind::NodeOwned, object_type, merge: None }
    }

    pub fn cluster(object_type: ObjectType) -> Self {
        TableSpec { kind: TableKind::Cluster, object_type, merge: None }
    }

    pub fn with_merge(mut self, rule: Arc<dyn MergeRule>) -> Self {
        self.merge = Some(rule);
        self
    }
}

/// The total order on versions: the table's rule, then `(ltime, owner)`, then a tombstone over
/// a live version of the same write (the tombstone a detach or leave makes of it), then bytes.
pub fn compare_versions(rule: Option<&dyn MergeRule>, a: &VersionRef<'_>, b: &VersionRef<'_>) -> Ordering {
    rule.map_or(Ordering::Equal, |r| r.compare(a, b))
        .then(a.ltime.cmp(&b.ltime))
        .then_with(|| a.owner.cmp(b.owner))
        .then(a.deleted.cmp(&b.deleted))
        .then_with(|| a.value.cmp(b.value))
}

/// One stored entry version.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub value: Bytes,
    pub owner: Arc<str>,
    pub ltime: u64,
    pub deleted: bool,
    pub cluster: bool,
    /// Owner failed: invisible to watchers and reads, kept for its return.
    pub hidden: bool,
    pub reap_at: Option<Instant>,
    pub updated: Instant,
    pub keyhash: u64,
    pub fp: u64,
}

impl Entry {
    pub fn version(&self) -> VersionRef<'_> {
        VersionRef { ltime: self.ltime, owner: &self.owner, deleted: self.deleted, value: &self.value }
    }

    pub fn visible(&self) -> Option<&Bytes> {
        (!self.deleted && !self.hidden).then_some(&self.value)
    }

    pub fn to_wire(&self, table: &str, key: &str, now: Instant) -> WireEntry {
        let mut flags = 0;
        if self.deleted {
            flags |= FLAG_DELETED;
        }
        if self.cluster {
            flags |= FLAG_CLUSTER;
        }
        let reap_in_ms = match self.reap_at {
            Some(at) => at.saturating_duration_since(now).as_millis().min(u32::MAX as u128) as u32,
            None => 0,
        };
        WireEntry {
            table: table.to_string(),
            key: key.to_string(),
            owner: self.owner.to_string(),
            ltime: self.ltime,
            flags,
            reap_in_ms,
            value: self.value.clone(),
        }
    }
}

/// xxh3 of the concatenation of `parts`: one-shot over a stack buffer when they fit (the
/// common case, several times faster than the streaming state), streaming otherwise. Both give
/// the same hash.
fn xxh3_concat(parts: &[&[u8]]) -> u64 {
    // Small enough that zeroing it costs nothing next to the hash; a 64-hex endpoint id with
    // its table name fits.
    const BUF: usize = 128;
    let total: usize = parts.iter().map(|p| p.len()).sum();
    if total <= BUF {
        let mut buf = [0u8; BUF];
        let mut at = 0;
        for p in parts {
            buf[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        return xxh3_64(&buf[..at]);
    }
    let mut h = Xxh3::new();
    for p in parts {
        h.update(p);
    }
    h.digest()
}

pub(crate) fn keyhash(table: &str, key: &str) -> u64 {
    xxh3_concat(&[table.as_bytes(), &[0], key.as_bytes()])
}

/// Identifies one version: everything the version order looks at, value included (merge rules
/// and the last tie-break read it), so two different versions never share a digest.
pub(crate) fn fingerprint(keyhash: u64, ltime: u64, owner: &str, deleted: bool, value: &[u8]) -> u64 {
    xxh3_concat(&[
        &keyhash.to_le_bytes(),
        &ltime.to_le_bytes(),
        &[deleted as u8],
        &xxh3_64(value).to_le_bytes(),
        owner.as_bytes(),
    ])
}

/// Hashes key hashes (already uniform) for the version index: one multiply-xorshift with a
/// per-node seed, so nobody can aim keys at one slot of every node's index.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SeededMix(u64);

impl BuildHasher for SeededMix {
    type Hasher = MixHasher;
    fn build_hasher(&self) -> MixHasher {
        MixHasher(self.0)
    }
}

#[derive(Debug)]
pub(crate) struct MixHasher(u64);

impl Hasher for MixHasher {
    fn finish(&self) -> u64 {
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).rotate_left(8);
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.0 ^= x;
    }
}

pub(crate) fn bucket_of(keyhash: u64) -> usize {
    (keyhash >> 57) as usize % DIGEST_BUCKETS
}

/// All state of one attached network.
#[derive(Debug)]
pub(crate) struct NetState {
    pub tables: BTreeMap<String, BTreeMap<String, Entry>>,
    /// Key hash -> fingerprint of the stored version, for telling a duplicate from news in one
    /// lookup. A cache: two keys sharing a key hash leave one of them out (the slow path then
    /// decides), and a fingerprint match is the same test anti-entropy already trusts.
    versions: HashMap<u64, u64, SeededMix>,
    pub digest: Vec<u64>,
    pub queue: BroadcastQueue,
    /// Own events waiting for their immediate push.
    pub push_now: bool,
    /// News to relay when the relay timer fires.
    pub relay_pending: bool,
    /// When news was last relayed early (at most once per gossip interval, so a storm goes
    /// out in the rounds' full packets).
    pub relayed_at: Option<Instant>,
    /// Peers still to sync with right after attaching.
    pub initial_syncs: u8,
    /// Key hashes this life of the node wrote (its own versions, which an earlier life's
    /// version must never replace).
    pub own_written: HashSet<u64>,
    /// A sync of this network completed since this node attached it: what peers hold of it
    /// has been seen at least once.
    pub synced: bool,
    /// An earlier instance's entries under this node's name were deleted here (see
    /// `lifecycle`).
    pub swept: bool,
    /// Entries stored, changed or removed since the change feed was last drained, as (table,
    /// key); `None` while nobody reads the feed (see `GossipNode::set_change_feed`).
    pub touched: Option<Vec<(String, String)>>,
}

impl NetState {
    pub fn new(initial_syncs: u8, hash_seed: u64) -> Self {
        NetState {
            tables: BTreeMap::new(),
            versions: HashMap::with_hasher(SeededMix(hash_seed)),
            digest: vec![0; DIGEST_BUCKETS],
            queue: BroadcastQueue::default(),
            push_now: false,
            relay_pending: false,
            relayed_at: None,
            initial_syncs,
            own_written: HashSet::new(),
            synced: false,
            swept: false,
            touched: None,
        }
    }

    /// Records a change to `table`/`key` for the change feed, if it is on.
    pub fn touch(&mut self, table: &str, key: &str) {
        if let Some(t) = &mut self.touched {
            t.push((table.to_string(), key.to_string()));
        }
    }

    pub fn get(&self, table: &str, key: &str) -> Option<&Entry> {
        self.tables.get(table)?.get(key)
    }

    /// Whether the version with this key hash and fingerprint is the one stored (see
    /// `versions`).
    pub fn holds_version(&self, keyhash: u64, fp: u64) -> bool {
        self.versions.get(&keyhash) == Some(&fp)
    }

    /// Stores `entry`, keeping the digest current; returns the replaced version.
    pub fn put(&mut self, table: &str, key: &str, entry: Entry) -> Option<Entry> {
        self.touch(table, key);
        let b = bucket_of(entry.keyhash);
        self.digest[b] = self.digest[b].wrapping_add(entry.fp);
        self.versions.insert(entry.keyhash, entry.fp);
        let t = match self.tables.get_mut(table) {
            Some(t) => t,
            None => self.tables.entry(table.to_string()).or_default(),
        };
        let old = match t.get_mut(key) {
            Some(slot) => Some(std::mem::replace(slot, entry)),
            None => {
                t.insert(key.to_string(), entry);
                None
            }
        };
        if let Some(o) = &old {
            let ob = bucket_of(o.keyhash);
            self.digest[ob] = self.digest[ob].wrapping_sub(o.fp);
        }
        old
    }

    pub fn remove(&mut self, table: &str, key: &str) -> Option<Entry> {
        let t = self.tables.get_mut(table)?;
        let old = t.remove(key)?;
        if let Some(feed) = &mut self.touched {
            feed.push((table.to_string(), key.to_string()));
        }
        if t.is_empty() {
            self.tables.remove(table);
        }
        if self.versions.get(&old.keyhash) == Some(&old.fp) {
            self.versions.remove(&old.keyhash);
        }
        let b = bucket_of(old.keyhash);
        self.digest[b] = self.digest[b].wrapping_sub(old.fp);
        Some(old)
    }

    pub fn len(&self) -> usize {
        self.tables.values().map(BTreeMap::len).sum()
    }

    /// Recomputes the digest from scratch (what an implementation without incremental upkeep
    /// would do every sync; used by tests and benchmarks to check the incremental one).
    pub fn rebuild_digest(&self) -> Vec<u64> {
        let mut d = vec![0u64; DIGEST_BUCKETS];
        for t in self.tables.values() {
            for e in t.values() {
                let b = bucket_of(e.keyhash);
                d[b] = d[b].wrapping_add(e.fp);
            }
        }
        d
    }

    /// Entries whose bucket is flagged in `buckets`.
    pub fn in_buckets<'a>(
        &'a self,
        buckets: &'a [bool],
    ) -> impl Iterator<Item = (&'a str, &'a str, &'a Entry)> + 'a {
        self.tables.iter().flat_map(move |(t, es)| {
            es.iter()
                .filter(move |(_, e)| buckets[bucket_of(e.keyhash)])
                .map(move |(k, e)| (t.as_str(), k.as_str(), e))
        })
    }
}

/// Bucket indexes where two digests differ.
pub fn diff_buckets(a: &[u64], b: &[u64]) -> Vec<u32> {
    a.iter().zip(b).enumerate().filter(|(_, (x, y))| x != y).map(|(i, _)| i as u32).collect()
}

pub(crate) fn reap_deadline(now: Instant, residual: Duration, reap_after: Duration) -> Instant {
    now + residual.min(reap_after)
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // an arbitrary origin for virtual time
mod tests {
    use super::*;

    fn v(ltime: u64, owner: &str, deleted: bool) -> VersionRef<'_> {
        VersionRef { ltime, owner, deleted, value: b"" }
    }

    #[test]
    fn version_order_is_total_and_never_ties_across_writers() {
        assert_eq!(compare_versions(None, &v(5, "a", false), &v(4, "z", false)), Ordering::Greater);
        // Same Lamport time from two writers: networkdb drops one; here the writer decides.
        assert_eq!(compare_versions(None, &v(5, "b", false), &v(5, "a", false)), Ordering::Greater);
        assert_eq!(compare_versions(None, &v(5, "a", false), &v(5, "b", false)), Ordering::Less);
        // A tombstone made of a write wins over that write.
        assert_eq!(compare_versions(None, &v(5, "a", true), &v(5, "a", false)), Ordering::Greater);
        assert_eq!(compare_versions(None, &v(5, "a", false), &v(5, "a", false)), Ordering::Equal);
    }

    #[derive(Debug)]
    struct ValueWins;
    impl MergeRule for ValueWins {
        fn compare(&self, a: &VersionRef<'_>, b: &VersionRef<'_>) -> Ordering {
            a.value.cmp(b.value)
        }
    }

    #[test]
    fn a_merge_rule_decides_before_lamport_time() {
        let hi = VersionRef { ltime: 1, owner: "a", deleted: false, value: b"9" };
        let lo = VersionRef { ltime: 7, owner: "b", deleted: false, value: b"1" };
        assert_eq!(compare_versions(Some(&ValueWins), &hi, &lo), Ordering::Greater);
        assert_eq!(compare_versions(None, &hi, &lo), Ordering::Less);
    }

    fn entry(table: &str, key: &str, ltime: u64, now: Instant) -> Entry {
        let kh = keyhash(table, key);
        Entry {
            value: Bytes::from_static(b"v"),
            owner: Arc::from("n"),
            ltime,
            deleted: false,
            cluster: false,
            hidden: false,
            reap_at: None,
            updated: now,
            keyhash: kh,
            fp: fingerprint(kh, ltime, "n", false, b"v"),
        }
    }

    #[test]
    fn fingerprints_tell_apart_versions_that_differ_only_in_value() {
        let kh = keyhash("t", "k");
        assert_ne!(fingerprint(kh, 1, "n", false, b"(1,true)"), fingerprint(kh, 1, "n", false, b"(2,true)"));
        assert_ne!(fingerprint(kh, 1, "n", false, b"v"), fingerprint(kh, 1, "n", true, b"v"));
        assert_eq!(fingerprint(kh, 1, "n", false, b"v"), fingerprint(kh, 1, "n", false, b"v"));
    }

    #[test]
    fn one_shot_hashes_match_the_streaming_definition() {
        let stream = |parts: &[&[u8]]| {
            let mut h = Xxh3::new();
            for p in parts {
                h.update(p);
            }
            h.digest()
        };
        let long = "k".repeat(400);
        for (t, k) in [("endpoints", "ep1"), ("t", long.as_str()), ("", "")] {
            assert_eq!(keyhash(t, k), stream(&[t.as_bytes(), &[0], k.as_bytes()]));
        }
        let v = vec![9u8; 1000];
        let fp = stream(&[
            &7u64.to_le_bytes(),
            &3u64.to_le_bytes(),
            &[1],
            &xxh3_64(&v).to_le_bytes(),
            long.as_bytes(),
        ]);
        assert_eq!(fingerprint(7, 3, &long, true, &v), fp);
    }

    #[test]
    fn the_version_index_follows_puts_and_removes() {
        let now = Instant::now();
        let mut a = NetState::new(0, 9);
        let e1 = entry("t", "k", 1, now);
        let (kh, fp1) = (e1.keyhash, e1.fp);
        a.put("t", "k", e1);
        assert!(a.holds_version(kh, fp1));
        let e2 = entry("t", "k", 2, now);
        let fp2 = e2.fp;
        a.put("t", "k", e2);
        assert!(!a.holds_version(kh, fp1) && a.holds_version(kh, fp2));
        a.remove("t", "k");
        assert!(!a.holds_version(kh, fp2));
    }

    #[test]
    fn incremental_digest_matches_a_rebuild() {
        let now = Instant::now();
        let mut a = NetState::new(0, 1);
        let mut b = NetState::new(0, 1);
        for i in 0..500 {
            a.put("t", &format!("k{i}"), entry("t", &format!("k{i}"), 1, now));
        }
        for i in (0..500).rev() {
            b.put("t", &format!("k{i}"), entry("t", &format!("k{i}"), 1, now));
        }
        assert_eq!(a.digest, b.digest);
        assert_eq!(a.digest, a.rebuild_digest());
        a.put("t", "k7", entry("t", "k7", 2, now));
        a.remove("t", "k8");
        assert_eq!(a.digest, a.rebuild_digest());
        let diff = diff_buckets(&a.digest, &b.digest);
        assert!(!diff.is_empty() && diff.len() <= 2);
        assert!(diff.contains(&(bucket_of(keyhash("t", "k7")) as u32)));
    }
}

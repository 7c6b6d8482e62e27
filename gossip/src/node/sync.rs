//! Anti-entropy: digest, summary and entries exchanges that repair what gossip missed.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Instant;

use rand::RngExt;

use crate::event::MemberState;
use crate::identity::NodeId;
use crate::store::{DIGEST_BUCKETS, bucket_of, diff_buckets};
use crate::wire::{self, Body, WireEntry};

use super::GossipNode;
use super::apply::Origin;
use super::valid_entry;

/// Buckets and their items, for one `SyncSummary` frame.
type SummaryFrame = (Vec<u32>, Vec<wire::SummaryItem>);

#[derive(Debug)]
pub(super) struct SyncState {
    pub(super) network: String,
    pub(super) deadline: Instant,
    /// The responder's last summary frame arrived; its answer to our wants ends the sync.
    pub(super) summary_done: bool,
    /// The round moved at least [`FOLLOW_UP_AFTER`] entries: the two nodes are apart, so another
    /// round with the same peer starts as soon as this one ends.
    pub(super) follow_up: bool,
    /// Rounds with this peer started back to back before this one.
    pub(super) chain: u8,
    /// Entries this node sent in the round, and entries sent plus asked for.
    pub(super) sent: usize,
    pub(super) moved: usize,
}

/// Follow-up rounds with one peer that may start at once, one after the other; then the next
/// waits for the sync interval (two nodes that keep disagreeing, say on entries one of them refuses, do not sync
/// without pause).
const MAX_SYNC_CHAIN: u8 = 8;
/// A round that moved at least this many entries (either way; at most `max_sync_entries`) is
/// followed by another at once.
const FOLLOW_UP_AFTER: usize = 1024;
/// A summary lists up to this many items (key hash, fingerprint) per entry a round may move:
/// listing is cheap next to sending and applying.
const SUMMARY_ITEMS_PER_ENTRY: usize = 2;

impl GossipNode {
    pub(super) fn sync_round(&mut self, now: Instant) {
        if self.membership.left {
            return;
        }
        // Start at a random network so a full sync table never starves the same ones.
        let mut nets: Vec<String> = self.networks.keys().cloned().collect();
        if !nets.is_empty() {
            let k = self.rng.random_range(0..nets.len());
            nets.rotate_left(k);
        }
        for nid in nets {
            if let Some(peer) = self.pick_peers(&nid, 1).pop() {
                self.start_sync(now, &nid, &peer);
            }
        }
    }

    /// Starts anti-entropy of `network` with `peer`: step 1, send the digest.
    pub(super) fn start_sync(&mut self, now: Instant, network: &str, peer: &NodeId) -> bool {
        self.begin_sync(now, network, peer).is_some()
    }

    /// [`start_sync`](Self::start_sync), returning the new sync's id.
    fn begin_sync(&mut self, now: Instant, network: &str, peer: &NodeId) -> Option<u64> {
        if self.syncs.len() >= self.cfg.max_concurrent_syncs {
            return None;
        }
        let net = self.networks.get(network)?;
        let buckets = net.digest.clone();
        let sync_id = self.rng.random::<u64>();
        self.syncs.insert(
            sync_id,
            SyncState {
                network: network.to_string(),
                deadline: now + self.cfg.sync_timeout,
                summary_done: false,
                follow_up: false,
                chain: 0,
                sent: 0,
                moved: 0,
            },
        );
        self.stats.syncs_started += 1;
        self.send_packet(
            peer.addr,
            Body::SyncDigest { network: network.to_string(), sync_id, buckets },
            true,
        );
        Some(sync_id)
    }

    /// A sync this node started is complete; a round that moved much starts the next at once.
    fn end_sync(&mut self, now: Instant, sync_id: u64, network: &str, peer: &NodeId) {
        let chain = self.syncs.remove(&sync_id).filter(|st| st.follow_up).map(|st| st.chain);
        self.sync_completed(now, network);
        let alive = self.membership.members.get(&peer.name).is_some_and(|m| m.state == MemberState::Alive);
        if let Some(chain) = chain.filter(|c| *c < MAX_SYNC_CHAIN)
            && alive
            && !self.membership.left
            && let Some(id) = self.begin_sync(now, network, peer)
            && let Some(st) = self.syncs.get_mut(&id)
        {
            st.chain = chain + 1;
        }
    }

    /// Step 2 (responder): compare digests; for the buckets that differ, send what is held.
    pub(super) fn on_sync_digest(&mut self, from: &NodeId, network: String, sync_id: u64, buckets: Vec<u64>) {
        self.tell_of_newer_life(from);
        let Some(net) = self.networks.get(&network) else {
            self.stats.foreign_network_events += 1;
            return;
        };
        if buckets.len() != DIGEST_BUCKETS {
            self.stats.decode_errors += 1;
            return;
        }
        self.stats.syncs_answered += 1;
        let diff = diff_buckets(&net.digest, &buckets);
        if diff.is_empty() {
            // Tell the requester at once, so its sync slot frees now rather than at the timeout.
            self.stats.syncs_identical += 1;
            let body =
                Body::SyncSummary { network, sync_id, buckets: Vec::new(), items: Vec::new(), last: true };
            self.send_packet(from.addr, body, true);
            return;
        }
        let mut flagged = vec![false; DIGEST_BUCKETS];
        for b in &diff {
            flagged[*b as usize] = true;
        }
        let mut per_bucket: Vec<Vec<(u64, u64)>> = vec![Vec::new(); DIGEST_BUCKETS];
        for (_, _, e) in net.in_buckets(&flagged) {
            per_bucket[bucket_of(e.keyhash)].push((e.keyhash, e.fp));
        }
        // Whole buckets per frame, each frame within the stream frame limit. One round covers
        // buckets up to `SUMMARY_ITEMS_PER_ENTRY * max_sync_entries` items (at least one
        // bucket): a peer far behind is repaired over several rounds, back to back while they
        // move much, and no round keeps either node busy for long.
        let max_items = (self.cfg.max_stream_frame / 2 / 20).max(1);
        let mut frames: Vec<SummaryFrame> = vec![(Vec::new(), Vec::new())];
        let mut total = 0;
        // Start at a random differing bucket, so a bounded round never starves the same ones.
        let mut diff = diff;
        let k = self.rng.random_range(0..diff.len());
        diff.rotate_left(k);
        for b in diff {
            let items = std::mem::take(&mut per_bucket[b as usize]);
            if total > 0 && total + items.len() > SUMMARY_ITEMS_PER_ENTRY * self.cfg.max_sync_entries {
                break;
            }
            total += items.len();
            let cur = frames.last_mut().expect("one frame");
            if !cur.0.is_empty() && cur.1.len() + items.len() > max_items {
                frames.push((Vec::new(), Vec::new()));
            }
            let cur = frames.last_mut().expect("one frame");
            cur.0.push(b);
            cur.1.extend(items);
        }
        let n = frames.len();
        for (i, (buckets, items)) in frames.into_iter().enumerate() {
            let body =
                Body::SyncSummary { network: network.clone(), sync_id, buckets, items, last: i + 1 == n };
            self.send_packet(from.addr, body, true);
        }
    }

    /// Step 3 (requester): send what the responder lacks, ask for what this node lacks.
    pub(super) fn on_sync_summary(&mut self, now: Instant, from: &NodeId, summary: Body) {
        let Body::SyncSummary { network, sync_id, buckets, items, last } = summary else { return };
        if self.syncs.get(&sync_id).is_none_or(|s| s.network != network) {
            return;
        }
        let Some(net) = self.networks.get(&network) else { return };
        let mut flagged = vec![false; DIGEST_BUCKETS];
        for b in &buckets {
            if let Some(f) = flagged.get_mut(*b as usize) {
                *f = true;
            }
        }
        let theirs: HashMap<u64, u64> = items.iter().copied().collect();
        let mut mine: HashSet<u64> = HashSet::new();
        let mut entries = Vec::new();
        // What is over the round's bound (all its summary frames together) goes in a later one.
        let room = self.cfg.max_sync_entries.saturating_sub(self.syncs.get(&sync_id).map_or(0, |st| st.sent));
        for (table, key, e) in net.in_buckets(&flagged) {
            mine.insert(e.fp);
            if theirs.get(&e.keyhash) != Some(&e.fp) && entries.len() < room {
                entries.push(e.to_wire(table, key, now));
            }
        }
        let want: Vec<u64> = items.iter().filter(|(_, fp)| !mine.contains(fp)).map(|(kh, _)| *kh).collect();
        let follow_up_after = FOLLOW_UP_AFTER.min(self.cfg.max_sync_entries);
        if let Some(st) = self.syncs.get_mut(&sync_id) {
            st.sent += entries.len();
            st.moved += entries.len() + want.len();
            st.follow_up |= st.moved >= follow_up_after;
        }
        let done = last && want.is_empty();
        if last
            && !done
            && let Some(st) = self.syncs.get_mut(&sync_id)
        {
            st.summary_done = true;
        }
        // The entries go before any follow-up round's digest, so the peer has applied them when
        // it compares.
        self.send_entries(from.addr, &network, sync_id, entries, want, false);
        if done {
            self.end_sync(now, sync_id, &network, from);
        }
    }

    /// Steps 3 and 4 (both sides): apply the entries; answer what was wanted.
    pub(super) fn on_sync_entries(
        &mut self,
        now: Instant,
        from: &NodeId,
        network: String,
        sync_id: u64,
        entries: Vec<WireEntry>,
        want: Vec<u64>,
    ) {
        if !self.networks.contains_key(&network) {
            self.stats.foreign_network_events += 1;
            return;
        }
        let mut relayed = 0;
        for e in entries {
            if !valid_entry(&e.borrowed()) || !self.plausible_ltime(e.ltime) {
                self.stats.decode_errors += 1;
                continue;
            }
            let origin = if relayed < self.cfg.max_sync_relays { Origin::Sync } else { Origin::Repair };
            if self.apply(now, &network, e, origin) {
                relayed += 1;
            }
        }
        if want.is_empty() {
            if self.syncs.get(&sync_id).is_some_and(|st| st.summary_done && st.network == network) {
                self.end_sync(now, sync_id, &network, from);
            }
            return;
        }
        let wanted: HashSet<u64> = want.into_iter().collect();
        let net = &self.networks[&network];
        let out: Vec<WireEntry> = net
            .tables
            .iter()
            .flat_map(|(t, es)| es.iter().map(move |(k, e)| (t, k, e)))
            .filter(|(_, _, e)| wanted.contains(&e.keyhash))
            .map(|(t, k, e)| e.to_wire(t, k, now))
            .collect();
        // Always answer, even with nothing, so the requester can close the sync.
        self.send_entries(from.addr, &network, sync_id, out, Vec::new(), true);
    }

    fn send_entries(
        &mut self,
        dst: SocketAddr,
        network: &str,
        sync_id: u64,
        entries: Vec<WireEntry>,
        want: Vec<u64>,
        always: bool,
    ) {
        if entries.is_empty() && want.is_empty() && !always {
            return;
        }
        let per_frame = self.cfg.max_entries_per_frame;
        let budget = self.cfg.max_stream_frame / 2;
        let mut want = Some(want);
        let mut chunk = Vec::new();
        let mut bytes = 0;
        let mut it = entries.into_iter().peekable();
        loop {
            let next = it.next();
            let flush = match &next {
                None => true,
                Some(e) => chunk.len() >= per_frame || bytes + wire_size(e) > budget,
            };
            if flush && (!chunk.is_empty() || next.is_none()) {
                let body = Body::SyncEntries {
                    network: network.to_string(),
                    sync_id,
                    entries: std::mem::take(&mut chunk),
                    want: want.take().unwrap_or_default(),
                };
                self.send_packet(dst, body, true);
                bytes = 0;
            }
            match next {
                None => break,
                Some(e) => {
                    bytes += wire_size(&e);
                    chunk.push(e);
                }
            }
        }
    }
}

/// An upper bound of an entry's encoded size.
fn wire_size(e: &WireEntry) -> usize {
    e.value.len() + e.key.len() + e.table.len() + e.owner.len() + 48
}

//! The per-network broadcast queue: keyed, bounded, own events before relayed ones.
//!
//! An event is keyed by its entry's key hash, so a newer event for the same key replaces the
//! older one in O(1). Each round hands events to a sink in priority order (own first, then
//! relayed events never sent, then the other relayed ones; within each, round-robin), and
//! every event sent loses one of its transmissions. An immediate push (right after a write,
//! or after news arrived) sends only own events and relayed ones never sent: news moves one
//! hop per network round trip instead of one per gossip interval.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;

#[derive(Debug)]
struct Slot {
    encoded: Bytes,
    left: u32,
    /// Duplicates that may still cancel a transmission (see [`BroadcastQueue::heard`]).
    damp: u32,
    own: bool,
    seq: u64,
}

/// What a sink did with an offered event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Take {
    /// Sent: it loses one transmission.
    Sent,
    /// No room left this round: stop.
    Full,
}

/// Outcome of [`BroadcastQueue::push`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pushed {
    New,
    Replaced,
    /// The queue was full and the event was not queued (a relayed event).
    Dropped,
    /// The queue was full; an older event was evicted to make room.
    Evicted,
}

/// The queue's order lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum List {
    Own,
    Fresh,
    Relayed,
}

#[derive(Debug, Default)]
pub(crate) struct BroadcastQueue {
    slots: HashMap<u64, Slot>,
    own: VecDeque<(u64, u64)>,
    /// Relayed events not sent yet.
    fresh: VecDeque<(u64, u64)>,
    relayed: VecDeque<(u64, u64)>,
    next_seq: u64,
    /// Encoded bytes of the live events.
    bytes: usize,
}

impl BroadcastQueue {
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Queues an event; `max_len` events and `max_bytes` encoded bytes bound the queue.
    pub(crate) fn push(
        &mut self,
        key: u64,
        encoded: Bytes,
        transmits: u32,
        own: bool,
        max_len: usize,
        max_bytes: usize,
    ) -> Pushed {
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut outcome = Pushed::New;
        let full = |q: &Self| {
            let old_len = q.slots.get(&key).map(|s| s.encoded.len());
            let bytes = q.bytes - old_len.unwrap_or(0) + encoded.len();
            (old_len.is_none() && q.slots.len() >= max_len)
                || (bytes > max_bytes && q.slots.len() > usize::from(old_len.is_some()))
        };
        while full(self) {
            if !own {
                // The queued older version of this key is stale now: drop it too.
                if let Some(old) = self.slots.remove(&key) {
                    self.bytes -= old.encoded.len();
                }
                return Pushed::Dropped;
            }
            if !self.evict_front(List::Relayed, key)
                && !self.evict_front(List::Fresh, key)
                && !self.evict_front(List::Own, key)
            {
                break;
            }
            outcome = Pushed::Evicted;
        }
        self.bytes += encoded.len();
        if let Some(slot) = self.slots.get_mut(&key) {
            self.bytes -= slot.encoded.len();
            slot.encoded = encoded;
            slot.left = transmits.max(1);
            slot.damp = transmits / 4;
            slot.own = own;
            slot.seq = seq;
            if outcome == Pushed::New {
                outcome = Pushed::Replaced;
            }
        } else {
            self.slots.insert(key, Slot { encoded, left: transmits.max(1), damp: transmits / 4, own, seq });
        }
        if own { &mut self.own } else { &mut self.fresh }.push_back((key, seq));
        self.compact();
        outcome
    }

    /// Moves an own event to the front of the own list (a departing node's record must be in
    /// the first packet, whatever else it wrote last).
    pub(crate) fn promote(&mut self, key: u64) {
        let Some(slot) = self.slots.get(&key) else { return };
        if !slot.own {
            return;
        }
        let seq = slot.seq;
        self.own.retain(|&(k, _)| k != key);
        self.own.push_front((key, seq));
    }

    fn list(&mut self, which: List) -> &mut VecDeque<(u64, u64)> {
        match which {
            List::Own => &mut self.own,
            List::Fresh => &mut self.fresh,
            List::Relayed => &mut self.relayed,
        }
    }

    /// Evicts the oldest live event of one list, other than `keep`.
    fn evict_front(&mut self, which: List, keep: u64) -> bool {
        while let Some((k, s)) = self.list(which).pop_front() {
            if k != keep && self.slots.get(&k).is_some_and(|slot| slot.seq == s) {
                let slot = self.slots.remove(&k).expect("live");
                self.bytes -= slot.encoded.len();
                return true;
            }
        }
        false
    }

    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Transmissions the queued events have left, in all.
    #[cfg(test)]
    pub(crate) fn transmissions_left(&self) -> u32 {
        self.slots.values().map(|s| s.left).sum()
    }

    /// A peer sent this node the version it has queued under `key`: the rumour is spreading
    /// without it, so it has one transmission fewer to make (Demers et al.'s blind counter).
    /// At most a quarter of an event's transmissions go this way: with fanout 3 a node is
    /// missed with odds of about e^-3 per round left after the rumour saturates, so cancelling
    /// half (weft-sim: one node in ~10^5 missing an entry of a 1,000-entry burst until the next
    /// anti-entropy round) costs more than the traffic it saves. Returns whether a transmission
    /// was cancelled.
    pub(crate) fn heard(&mut self, key: u64) -> bool {
        let Some(slot) = self.slots.get_mut(&key) else { return false };
        if slot.damp == 0 {
            return false;
        }
        slot.damp -= 1;
        slot.left -= 1;
        if slot.left == 0 {
            let slot = self.slots.remove(&key).expect("live");
            self.bytes -= slot.encoded.len();
            self.compact();
            self.release_if_idle();
        }
        true
    }

    /// Drops the order lists' stale references once they outnumber live events.
    fn compact(&mut self) {
        if self.own.len() + self.fresh.len() + self.relayed.len() > 2 * self.slots.len() + 64 {
            let slots = &self.slots;
            let live = |(k, s): &(u64, u64)| slots.get(k).is_some_and(|slot| slot.seq == *s);
            self.own.retain(live);
            self.fresh.retain(live);
            self.relayed.retain(live);
        }
    }

    /// Offers events to `sink` in priority order until it is full or every event was offered
    /// once. `immediate` restricts the round to own events and relayed ones never sent (the
    /// push right after a write or after news arrived).
    pub(crate) fn drain(&mut self, immediate: bool, mut sink: impl FnMut(&Bytes) -> Take) {
        let lists: &[List] =
            if immediate { &[List::Own, List::Fresh] } else { &[List::Own, List::Fresh, List::Relayed] };
        // Each event is offered at most once: what a list held when the round began.
        let budgets: Vec<usize> = lists.iter().map(|&l| self.list(l).len()).collect();
        for (&which, &budget) in lists.iter().zip(&budgets) {
            let mut budget = budget;
            while budget > 0 {
                budget -= 1;
                let Some((k, s)) = self.list(which).pop_front() else { break };
                let Some(slot) = self.slots.get_mut(&k) else { continue };
                if slot.seq != s {
                    continue;
                }
                match sink(&slot.encoded) {
                    Take::Full => {
                        self.list(which).push_front((k, s));
                        self.release_if_idle();
                        return;
                    }
                    Take::Sent => {
                        slot.left -= 1;
                        if slot.left == 0 {
                            let slot = self.slots.remove(&k).expect("live");
                            self.bytes -= slot.encoded.len();
                        } else {
                            // A relayed event sent once joins the others.
                            let next = if which == List::Own { List::Own } else { List::Relayed };
                            self.list(next).push_back((k, s));
                        }
                    }
                }
            }
        }
        self.release_if_idle();
    }

    /// A storm's worth of capacity is given back once the queue has drained (a node that
    /// relayed a 2,000-node join keeps ~200 KB per network otherwise).
    fn release_if_idle(&mut self) {
        const KEEP: usize = 1024;
        if self.slots.is_empty() && self.slots.capacity() > KEEP {
            self.slots = HashMap::new();
            self.own = VecDeque::new();
            self.fresh = VecDeque::new();
            self.relayed = VecDeque::new();
        }
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // an arbitrary origin for virtual time
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn round(q: &mut BroadcastQueue, own_only: bool, cap: usize) -> Vec<Bytes> {
        let mut out = Vec::new();
        q.drain(own_only, |e| {
            if out.len() == cap {
                return Take::Full;
            }
            out.push(e.clone());
            Take::Sent
        });
        out
    }

    #[test]
    fn a_promoted_own_event_goes_first_whatever_was_queued_before_it() {
        let mut q = BroadcastQueue::default();
        for k in 1..=5 {
            q.push(k, b(&format!("e{k}")), 3, true, 10, usize::MAX);
        }
        q.promote(5);
        q.promote(99); // not queued: nothing happens
        assert_eq!(round(&mut q, true, 1), vec![b("e5")]);
        // It keeps its later transmissions, behind the others.
        assert_eq!(round(&mut q, true, 10), ["e1", "e2", "e3", "e4", "e5"].map(b).to_vec());
    }

    #[test]
    fn newer_event_for_a_key_replaces_the_older() {
        let mut q = BroadcastQueue::default();
        assert_eq!(q.push(1, b("v1"), 3, true, 10, usize::MAX), Pushed::New);
        assert_eq!(q.push(1, b("v2"), 3, true, 10, usize::MAX), Pushed::Replaced);
        assert_eq!(q.len(), 1);
        assert_eq!(round(&mut q, false, 10), vec![b("v2")]);
    }

    #[test]
    fn own_events_go_before_relayed_ones_and_expire_after_their_transmissions() {
        let mut q = BroadcastQueue::default();
        q.push(1, b("relayed"), 2, false, 10, usize::MAX);
        q.push(2, b("own"), 1, true, 10, usize::MAX);
        assert_eq!(round(&mut q, false, 10), vec![b("own"), b("relayed")]);
        assert_eq!(round(&mut q, false, 10), vec![b("relayed")]);
        assert!(round(&mut q, false, 10).is_empty());
        assert!(q.is_empty());
    }

    #[test]
    fn the_immediate_push_sends_own_and_never_sent_relayed_events_only() {
        let mut q = BroadcastQueue::default();
        q.push(1, b("old"), 3, false, 10, usize::MAX);
        assert_eq!(round(&mut q, true, 10), vec![b("old")], "news goes out at once");
        assert!(round(&mut q, true, 10).is_empty(), "once sent it waits for the rounds");
        q.push(2, b("new"), 3, false, 10, usize::MAX);
        q.push(3, b("own"), 3, true, 10, usize::MAX);
        assert_eq!(round(&mut q, true, 10), vec![b("own"), b("new")]);
        assert_eq!(round(&mut q, false, 10), vec![b("own"), b("old"), b("new")]);
    }

    #[test]
    fn a_full_round_keeps_the_rest_in_order() {
        let mut q = BroadcastQueue::default();
        for i in 0..5 {
            q.push(i, b(&i.to_string()), 1, true, 10, usize::MAX);
        }
        assert_eq!(round(&mut q, false, 2), vec![b("0"), b("1")]);
        assert_eq!(round(&mut q, false, 2), vec![b("2"), b("3")]);
        assert_eq!(round(&mut q, true, 2), vec![b("4")]);
    }

    #[test]
    fn the_bound_drops_relayed_and_evicts_for_own() {
        let mut q = BroadcastQueue::default();
        q.push(1, b("r1"), 5, false, 2, usize::MAX);
        q.push(2, b("o2"), 5, true, 2, usize::MAX);
        assert_eq!(q.push(3, b("r3"), 5, false, 2, usize::MAX), Pushed::Dropped);
        assert_eq!(q.len(), 2);
        assert_eq!(q.push(4, b("o4"), 5, true, 2, usize::MAX), Pushed::Evicted);
        assert_eq!(round(&mut q, false, 10), vec![b("o2"), b("o4")]);
        // With only own events left, the oldest own one makes room.
        assert_eq!(q.push(5, b("o5"), 5, true, 2, usize::MAX), Pushed::Evicted);
        assert_eq!(round(&mut q, false, 10), vec![b("o4"), b("o5")]);
    }

    #[test]
    fn the_byte_bound_holds_too() {
        let mut q = BroadcastQueue::default();
        q.push(1, Bytes::from(vec![0u8; 600]), 5, false, 100, 1000);
        assert_eq!(q.push(2, Bytes::from(vec![0u8; 600]), 5, false, 100, 1000), Pushed::Dropped);
        assert_eq!(q.push(3, Bytes::from(vec![0u8; 600]), 5, true, 100, 1000), Pushed::Evicted);
        assert_eq!((q.len(), q.bytes()), (1, 600));
        // Replacing a key accounts for the old size.
        assert_eq!(q.push(3, Bytes::from(vec![0u8; 900]), 5, true, 100, 1000), Pushed::Replaced);
        assert_eq!(q.bytes(), 900);
        round(&mut q, false, 10);
        for _ in 0..4 {
            round(&mut q, false, 10);
        }
        assert_eq!((q.len(), q.bytes()), (0, 0));
    }

    #[test]
    fn a_drained_storm_gives_its_memory_back() {
        let mut q = BroadcastQueue::default();
        for i in 0..5000u64 {
            q.push(i, b("x"), 1, false, 10_000, usize::MAX);
        }
        assert!(q.slots.capacity() >= 5000);
        while !q.is_empty() {
            round(&mut q, false, 100);
        }
        assert!(q.slots.capacity() <= 1024 && q.fresh.capacity() <= 1024 && q.relayed.capacity() <= 1024);
        // A small queue keeps its capacity: no churn at the edge.
        q.push(1, b("x"), 1, false, 10, usize::MAX);
        round(&mut q, false, 10);
        let cap = q.slots.capacity();
        q.push(2, b("y"), 1, false, 10, usize::MAX);
        round(&mut q, false, 10);
        assert_eq!(q.slots.capacity(), cap);
    }

    #[test]
    fn replacing_keeps_order_lists_bounded() {
        let mut q = BroadcastQueue::default();
        for i in 0..10_000u64 {
            q.push(i % 3, b("x"), 4, i % 2 == 0, 100, usize::MAX);
        }
        assert_eq!(q.len(), 3);
        assert!(q.own.len() + q.fresh.len() + q.relayed.len() <= 2 * 3 + 64 + 1);
    }
}

//! The per-network broadcast queue: keyed, bounded, own events before relayed ones.
//!
//! An event is keyed by its entry's key hash, so a newer event for the same key replaces the
//! older one in O(1). Each round hands events to a sink in priority order (own first, then
//! relayed; within each, round-robin), and every event sent loses one of its transmissions.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;

#[derive(Debug)]
struct Slot {
    encoded: Bytes,
    left: u32,
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

#[derive(Debug, Default)]
pub(crate) struct BroadcastQueue {
    slots: HashMap<u64, Slot>,
    own: VecDeque<(u64, u64)>,
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
            if !self.evict_front(false, key) && !self.evict_front(true, key) {
                break;
            }
            outcome = Pushed::Evicted;
        }
        self.bytes += encoded.len();
        if let Some(slot) = self.slots.get_mut(&key) {
            self.bytes -= slot.encoded.len();
            slot.encoded = encoded;
            slot.left = transmits.max(1);
            slot.own = own;
            slot.seq = seq;
            if outcome == Pushed::New {
                outcome = Pushed::Replaced;
            }
        } else {
            self.slots.insert(key, Slot { encoded, left: transmits.max(1), own, seq });
        }
        if own { &mut self.own } else { &mut self.relayed }.push_back((key, seq));
        self.compact();
        outcome
    }

    /// Evicts the oldest live event of one list, other than `keep`.
    fn evict_front(&mut self, own: bool, keep: u64) -> bool {
        let list = if own { &mut self.own } else { &mut self.relayed };
        while let Some((k, s)) = list.pop_front() {
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
    /// Returns whether the event was queued.
    pub(crate) fn heard(&mut self, key: u64) -> bool {
        let Some(slot) = self.slots.get_mut(&key) else { return false };
        slot.left -= 1;
        if slot.left == 0 {
            let slot = self.slots.remove(&key).expect("live");
            self.bytes -= slot.encoded.len();
            self.compact();
        }
        true
    }

    /// Drops the order lists' stale references once they outnumber live events.
    fn compact(&mut self) {
        if self.own.len() + self.relayed.len() > 2 * self.slots.len() + 64 {
            let slots = &self.slots;
            let live = |(k, s): &(u64, u64)| slots.get(k).is_some_and(|slot| slot.seq == *s);
            self.own.retain(live);
            self.relayed.retain(live);
        }
    }

    /// Offers events to `sink` in priority order until it is full or every event was offered
    /// once. `own_only` restricts the round to this node's own events (the immediate push).
    pub(crate) fn drain(&mut self, own_only: bool, mut sink: impl FnMut(&Bytes) -> Take) {
        let lists: &[bool] = if own_only { &[true] } else { &[true, false] };
        for &own in lists {
            let list = if own { &mut self.own } else { &mut self.relayed };
            let mut budget = list.len();
            while budget > 0 {
                budget -= 1;
                let Some((k, s)) = list.pop_front() else { break };
                let Some(slot) = self.slots.get_mut(&k) else { continue };
                if slot.seq != s {
                    continue;
                }
                match sink(&slot.encoded) {
                    Take::Full => {
                        list.push_front((k, s));
                        return;
                    }
                    Take::Sent => {
                        slot.left -= 1;
                        if slot.left == 0 {
                            let slot = self.slots.remove(&k).expect("live");
                            self.bytes -= slot.encoded.len();
                        } else {
                            list.push_back((k, s));
                        }
                    }
                }
            }
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
    fn replacing_keeps_order_lists_bounded() {
        let mut q = BroadcastQueue::default();
        for i in 0..10_000u64 {
            q.push(i % 3, b("x"), 4, i % 2 == 0, 100, usize::MAX);
        }
        assert_eq!(q.len(), 3);
        assert!(q.own.len() + q.relayed.len() <= 2 * 3 + 64 + 1);
    }
}

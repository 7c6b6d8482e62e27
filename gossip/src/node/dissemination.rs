//! Dissemination: gossip rounds, pushing and relaying queued table events, and receiving them.

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;

use crate::error::Error;
use crate::event::{Event, Transmit, TransmitKind};
use crate::identity::NodeId;
use crate::queue::Take;
use crate::store::{fingerprint, keyhash};
use crate::wire::{
    self, Body, EventsPacketBuilder, FLAG_DELETED, Head, MAX_LTIME, Packet, WireEntry, WireEntryRef,
};

use super::apply::Origin;
use super::{GossipNode, MAX_LTIME_JUMP, valid_entry};

/// Unseen members announced to per gossip round (see [`crate::discovery`]).
const DISCOVERY_PER_ROUND: usize = 4;

/// Which of a network's queued events a send carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Push {
    /// Right after a write: own events and news not relayed yet, with the round's budget.
    Own,
    /// `relay_delay` after news arrived: own events and news not relayed yet, one packet.
    Relay,
    /// The gossip round: everything queued, within the round's budget.
    Round,
}

impl GossipNode {
    fn head(&self) -> Head {
        Head { from: self.id.clone(), ltime: self.clock }
    }

    pub(super) fn gossip_round(&mut self, now: Instant) {
        self.detach_stale_self_attachments(now);
        self.probe_round(now);
        let nets: Vec<String> = self.networks.keys().cloned().collect();
        for nid in &nets {
            if !self.networks[nid].queue.is_empty() {
                self.send_queue(nid, Push::Round);
            }
        }
        if self.membership.left {
            return;
        }
        if self.membership.connected && self.membership.discovery.len() > 0 {
            let targets = self.membership.discovery.due(now, DISCOVERY_PER_ROUND);
            self.announce_to(now, targets);
        }
        // Syncs owed to a network just attached (or a cluster just joined).
        for nid in &nets {
            self.initial_syncs(now, nid);
        }
    }

    /// Starts the syncs owed to `nid` (attached just now, or a cluster just joined) with that
    /// many attached peers; what cannot start yet is tried again next round.
    pub(super) fn initial_syncs(&mut self, now: Instant, nid: &str) {
        let want = self.networks[nid].initial_syncs as usize;
        if want == 0 {
            return;
        }
        let peers = self.pick_peers(nid, want);
        if peers.is_empty() {
            return;
        }
        let mut started = 0u8;
        for p in peers {
            started += u8::from(self.start_sync(now, nid, &p));
        }
        let net = self.networks.get_mut(nid).expect("listed");
        net.initial_syncs = if started > 0 { 0 } else { net.initial_syncs };
    }

    pub(super) fn send_queue(&mut self, network: &str, push: Push) {
        let peers = self.pick_peers(network, self.cfg.gossip_fanout);
        self.send_queue_to(network, push, &peers);
    }

    /// One round of a network's queue to `peers`: as many datagrams as the budget allows, the
    /// same datagrams to each peer; events too large for a datagram go by stream.
    pub(super) fn send_queue_to(&mut self, network: &str, push: Push, peers: &[NodeId]) {
        if peers.is_empty() {
            return;
        }
        let head = self.head();
        let max_packet = self.cfg.max_packet_size;
        // An early relay sends one packet: a storm's news waits for the round's full packets.
        let max_packets = if push == Push::Relay { 1 } else { self.cfg.max_packets_per_round };
        let Ok(mut builder) = EventsPacketBuilder::new(&head, network, max_packet) else { return };
        let prefix = builder.prefix_len();
        let empty_room = builder.room();
        let mut packets: Vec<Bytes> = Vec::new();
        // Events too large for a datagram: at most one stream frame's worth per round, split
        // into frames that each fit the limit.
        let frame_budget = self.cfg.max_stream_frame - 4096;
        let mut big: Vec<Vec<Bytes>> = Vec::new();
        let mut big_bytes = 0usize;
        let mut frame_bytes = 0usize;
        let Some(net) = self.networks.get_mut(network) else { return };
        net.queue.drain(push != Push::Round, |enc| {
            if enc.len() > empty_room {
                if big_bytes > 0 && big_bytes + enc.len() > frame_budget {
                    return Take::Full;
                }
                if big.is_empty() || frame_bytes + enc.len() > frame_budget {
                    big.push(Vec::new());
                    frame_bytes = 0;
                }
                big.last_mut().expect("pushed").push(enc.clone());
                frame_bytes += enc.len();
                big_bytes += enc.len();
                return Take::Sent;
            }
            if builder.push(enc) {
                return Take::Sent;
            }
            if packets.len() + 1 >= max_packets {
                return Take::Full;
            }
            let full = std::mem::replace(
                &mut builder,
                EventsPacketBuilder::new(&head, network, max_packet).expect("encoded once already"),
            );
            packets.push(full.finish(prefix));
            builder.push(enc);
            Take::Sent
        });
        if !builder.is_empty() {
            packets.push(builder.finish(prefix));
        }
        let streams: Vec<Bytes> = big
            .iter()
            .map(|frame| {
                let mut b = EventsPacketBuilder::new(&head, network, usize::MAX).expect("encodes");
                let p = b.prefix_len();
                for e in frame {
                    b.push(e);
                }
                b.finish(p)
            })
            .collect();
        for peer in peers {
            for p in &packets {
                self.stats.datagrams_out += 1;
                self.stats.bytes_out += p.len() as u64;
                self.transmits.push_back(Transmit {
                    dst: peer.addr,
                    kind: TransmitKind::Datagram,
                    bytes: p.clone(),
                });
            }
            for s in &streams {
                self.push_stream(peer.addr, s.clone());
            }
        }
    }

    fn push_stream(&mut self, dst: SocketAddr, bytes: Bytes) {
        self.stats.streams_out += 1;
        self.stats.stream_bytes_out += bytes.len() as u64;
        self.transmits.push_back(Transmit { dst, kind: TransmitKind::Stream, bytes });
    }

    pub(super) fn send_packet(&mut self, dst: SocketAddr, body: Body, stream: bool) {
        let packet = Packet { head: self.head(), body };
        let Ok(bytes) = wire::encode_packet(&packet) else { return };
        if stream || bytes.len() > self.cfg.max_packet_size {
            self.push_stream(dst, Bytes::from(bytes));
        } else {
            self.stats.datagrams_out += 1;
            self.stats.bytes_out += bytes.len() as u64;
            self.transmits.push_back(Transmit {
                dst,
                kind: TransmitKind::Datagram,
                bytes: Bytes::from(bytes),
            });
        }
    }

    /// Checks a packet's head and witnesses its clock; false (counted) if the packet must go.
    fn accept_head(&mut self, head: &Head) -> bool {
        if head.from.name == self.id.name || head.from.name.is_empty() || !self.plausible_ltime(head.ltime) {
            self.stats.decode_errors += 1;
            return false;
        }
        self.clock = self.clock.max(head.ltime);
        true
    }

    /// A datagram of table events, decoded in place.
    pub(super) fn handle_events(
        &mut self,
        now: Instant,
        head: Head,
        network: &str,
        events: &[WireEntryRef<'_>],
    ) {
        if self.accept_head(&head) {
            self.apply_events(now, network, events);
        }
    }

    /// Applies gossiped events (from a datagram or, when too large for one, a stream). Most of
    /// what gossip delivers is a version this node already holds; those are counted, credited
    /// to the queue's blind counter, and skipped before anything is allocated.
    fn apply_events(&mut self, now: Instant, network: &str, events: &[WireEntryRef<'_>]) {
        for e in events {
            if !valid_entry(e) || !self.plausible_ltime(e.ltime) {
                self.stats.decode_errors += 1;
                continue;
            }
            if let Some(kh) = self.holds_exactly(network, e) {
                self.stats.entries_stale += 1;
                if let Some(net) = self.networks.get_mut(network) {
                    net.queue.heard(kh);
                }
                continue;
            }
            self.apply(now, network, e.to_owned(), Origin::Gossip);
        }
    }

    /// The key hash, if this node stores exactly this version (same Lamport time, owner,
    /// deletion and value, by fingerprint): `apply` would find it equal, hence stale.
    fn holds_exactly(&self, network: &str, e: &WireEntryRef<'_>) -> Option<u64> {
        let net = self.networks.get(network)?;
        let kh = keyhash(e.table, e.key);
        net.holds_version(kh, fingerprint(kh, e.ltime, e.owner, e.flags & FLAG_DELETED != 0, e.value))
            .then_some(kh)
    }

    pub(super) fn handle_packet(&mut self, now: Instant, p: Packet) {
        let Packet { head, body } = p;
        // Another life of this node's name probing it, or answering its probe: the only
        // packets from its own name it takes.
        if head.from.name == self.id.name
            && head.from.addr != self.id.addr
            && self.plausible_ltime(head.ltime)
            && self.on_own_name_packet(&head.from, &body)
        {
            return;
        }
        if !self.accept_head(&head) {
            return;
        }
        match body {
            Body::Events { network, events } => {
                let events: Vec<WireEntryRef<'_>> = events.iter().map(WireEntry::borrowed).collect();
                self.apply_events(now, &network, &events);
            }
            Body::SyncDigest { network, sync_id, buckets } => {
                self.on_sync_digest(&head.from, network, sync_id, buckets)
            }
            summary @ Body::SyncSummary { .. } => self.on_sync_summary(now, &head.from, summary),
            Body::SyncEntries { network, sync_id, entries, want } => {
                self.on_sync_entries(now, &head.from, network, sync_id, entries, want)
            }
            Body::Message { data } => self.events.push_back(Event::Message { from: head.from, data }),
            // Probes are between lives of one name (above); from anyone else they mean nothing.
            Body::Probe { .. } | Body::ProbeAck { .. } => self.stats.decode_errors += 1,
            Body::NewerLife { instance, generation } => {
                self.on_newer_life(now, &head.from, instance, generation)
            }
        }
    }

    /// Whether a remote Lamport time may be witnessed: below [`MAX_LTIME`] and at most
    /// [`MAX_LTIME_JUMP`] ahead of this node's clock. A legitimate peer is never that far ahead
    /// (it would take 10^12 writes); a forged packet cannot push every clock in the cluster to
    /// the end of its range in one step.
    pub(super) fn plausible_ltime(&self, ltime: u64) -> bool {
        ltime < MAX_LTIME && ltime <= self.clock.saturating_add(MAX_LTIME_JUMP)
    }

    /// Sends `data` to the node named `to`: a datagram when it fits, a stream otherwise. It
    /// arrives as [`Event::Message`]; there is no delivery guarantee beyond UDP's or TCP's.
    pub fn send_message(&mut self, now: Instant, to: &str, data: Bytes) -> Result<(), Error> {
        self.tick(now);
        self.check_live()?;
        let max = self.cfg.max_stream_frame - 512;
        if data.len() > max {
            return Err(Error::TooLarge { len: data.len(), max });
        }
        let Some(m) = self.membership.members.get(to) else { return Err(Error::UnknownNode(to.to_string())) };
        let dst = m.id.addr;
        self.send_packet(dst, Body::Message { data }, false);
        Ok(())
    }
}

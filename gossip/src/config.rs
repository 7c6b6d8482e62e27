//! Tunables of the gossip core, with networkdb-compatible defaults.

use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

/// Configuration of one [`GossipNode`](crate::GossipNode).
#[derive(Debug, Clone)]
pub struct Config {
    /// Relay pending table events this often (networkdb: 200 ms).
    pub gossip_interval: Duration,
    /// Random peers of a network each round (and each immediate push) goes to.
    pub gossip_fanout: usize,
    /// News learned from a peer is relayed this long after it arrived, with whatever else
    /// arrived meanwhile, instead of at the next gossip round: an event crosses a hop in a
    /// network round trip plus this, and a storm still goes out in full packets.
    pub relay_delay: Duration,
    /// Multiplier `m` in the retransmit count `m * ceil(log10(n + 1))`.
    pub retransmit_mult: u32,
    /// Datagrams of table events one network may send to each chosen peer per round. A backlog
    /// drains at this many packets per interval instead of networkdb's one.
    pub max_packets_per_round: usize,
    /// Bound on queued events per network. At the bound a relayed event is dropped (counted);
    /// an own event evicts the oldest relayed one, or the oldest own one if there is none.
    /// Anti-entropy repairs whatever a dropped event would have carried.
    pub max_queue_len: usize,
    /// Bound on the encoded bytes queued per network, with the same policy as `max_queue_len`.
    pub max_queue_bytes: usize,
    /// Anti-entropy with one random peer per network this often (networkdb: 30 s full dumps).
    pub sync_interval: Duration,
    /// A sync that has not completed after this long is forgotten.
    pub sync_timeout: Duration,
    /// Syncs in flight at once, requester side.
    pub max_concurrent_syncs: usize,
    /// Peers a node syncs with at once when it joins a network (or the cluster).
    pub join_sync_peers: u8,
    /// Entries learned through a sync are relayed on, up to this many per sync, so a repair
    /// spreads epidemically instead of waiting for every node's own sync.
    pub max_sync_relays: usize,
    /// Tombstones, and entries hidden because their owner failed, are kept this long.
    pub reap_after: Duration,
    /// A member that stopped for a restart (announced) keeps its entries live this long; then
    /// they are hidden like a failed member's, unless a new life of it came up first.
    pub restart_grace: Duration,
    /// Largest datagram the node sends or accepts.
    pub max_packet_size: usize,
    /// Largest stream frame the node sends or accepts.
    pub max_stream_frame: usize,
    /// Entries per anti-entropy stream frame (large transfers are split).
    pub max_entries_per_frame: usize,
    /// Entries one anti-entropy round compares or sends at most (each way): a peer far behind
    /// is repaired over several rounds, so no round keeps a node's event loop busy for long.
    pub max_sync_entries: usize,
    /// While a seed is not an active member, announce to it this often.
    pub rejoin_interval: Duration,
    /// Period of the tombstone reaper.
    pub reap_period: Duration,
    /// Membership (SWIM) settings; see [`Config::lan`].
    pub membership: foca::Config,
}

/// memberlist's and foca's LAN suspicion multiplier (see [`Config::suspicion`]).
const SUSPICION_MULT: f64 = 4.0;

impl Config {
    /// Defaults for a LAN cluster of about `cluster_size` nodes.
    pub fn lan(cluster_size: u32) -> Self {
        let n = NonZeroU32::new(cluster_size.max(1)).expect("max(1)");
        let mut membership = foca::Config::new_lan(n);
        // Re-announce to members we consider down within seconds, not minutes, so a healed
        // partition merges quickly; keep down members around long enough to do so.
        membership.periodic_announce_to_down_members = Some(foca::PeriodicParams {
            frequency: Duration::from_secs(3),
            num_members: NonZeroUsize::new(2).expect("2"),
        });
        // Members SWIM's piggybacked updates missed (a join storm) are found through the
        // replicated attachment table (see `discovery`), so a periodic announce to one member
        // every 30 s is only a backstop. Each answer is a full packet of ~30 members chosen by
        // a scan of the whole member list: asking n/50 members every 10 s cost 2 KB/s per node
        // and most of a 2,000-node simulation's time.
        membership.periodic_announce = Some(foca::PeriodicParams {
            frequency: Duration::from_secs(30),
            num_members: NonZeroUsize::new(1).expect("1"),
        });
        membership.remove_down_after = Some(Duration::from_secs(15 * 60));
        Config {
            gossip_interval: Duration::from_millis(200),
            gossip_fanout: 3,
            relay_delay: Duration::from_millis(10),
            retransmit_mult: 4,
            max_packets_per_round: 32,
            max_queue_len: 65_536,
            max_queue_bytes: 64 << 20,
            sync_interval: Duration::from_secs(5),
            sync_timeout: Duration::from_secs(10),
            max_concurrent_syncs: 32,
            join_sync_peers: 3,
            max_sync_relays: 256,
            reap_after: Duration::from_secs(30 * 60),
            restart_grace: Duration::from_secs(60),
            max_packet_size: 1400,
            max_stream_frame: 16 << 20,
            max_entries_per_frame: 8192,
            max_sync_entries: 16_384,
            rejoin_interval: Duration::from_secs(2),
            reap_period: Duration::from_secs(5),
            membership,
        }
    }

    /// Retransmissions of one event in a network of `n` nodes: `m * ceil(log10(n + 1))`.
    pub fn retransmits(&self, n: usize) -> u32 {
        let digits = ((n + 1) as f64).log10().ceil() as u32;
        self.retransmit_mult * digits.max(1)
    }

    /// SWIM's suspicion timeout in a cluster of `members` active members (this node included):
    /// memberlist's rule (Docker's networkdb), `4 × max(1, log10 members) × probe_period`, never
    /// above `membership.suspect_to_down_after`, which is the timeout for the size this config
    /// was made for. A three-host cluster declares a dead host down 4 s after suspecting it,
    /// not after the 6 s meant for 32 hosts; a large cluster keeps the configured bound.
    pub fn suspicion(&self, members: usize) -> Duration {
        let scale = (members.max(1) as f64).log10().max(1.0);
        let secs = self.membership.probe_period.as_secs_f64() * SUSPICION_MULT * scale;
        Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX).min(self.membership.suspect_to_down_after)
    }

    /// How long entries of an owner that membership does not know at all stay live, counted
    /// from the first of its entries: the time SWIM takes to declare a member down (its
    /// suspicion timeout) plus the longest gap between two discovery announces to it
    /// ([`crate::discovery::MAX_BACKOFF`]). A live owner is known well before that; an owner
    /// this node has only heard of through its entries (it failed before this node joined) is
    /// hidden after it.
    pub fn unknown_owner_grace(&self) -> Duration {
        self.membership.suspect_to_down_after + crate::discovery::MAX_BACKOFF
    }

    pub(crate) fn validate(&self) -> Result<(), crate::Error> {
        let bad = |what: &str| Err(crate::Error::InvalidConfig(what.to_string()));
        if self.max_packet_size < 512 || self.max_packet_size > 65_000 {
            return bad("max_packet_size must be within 512..=65000 bytes");
        }
        if self.max_stream_frame < 64 << 10 || self.max_stream_frame > 1 << 30 {
            return bad("max_stream_frame must be within 64 KiB..=1 GiB");
        }
        if self.gossip_interval.is_zero() || self.sync_interval.is_zero() {
            return bad("gossip_interval and sync_interval must be positive");
        }
        if self.gossip_fanout == 0
            || self.max_packets_per_round == 0
            || self.max_queue_len == 0
            || self.max_queue_bytes == 0
        {
            return bad("gossip_fanout, max_packets_per_round and max_queue_len must be positive");
        }
        if self.max_entries_per_frame == 0 || self.max_concurrent_syncs == 0 {
            return bad("max_entries_per_frame and max_concurrent_syncs must be positive");
        }
        Ok(())
    }
}

impl Default for Config {
    fn default() -> Self {
        Config::lan(32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retransmit_count_matches_networkdb() {
        let c = Config::default();
        assert_eq!(c.retransmits(1), 4);
        assert_eq!(c.retransmits(9), 4);
        assert_eq!(c.retransmits(10), 8);
        assert_eq!(c.retransmits(25), 8);
        assert_eq!(c.retransmits(100), 12);
    }
}

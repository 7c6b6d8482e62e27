//! Node records, attachment records, and member discovery through them.
//!
//! Every node writes one record, `weft:nodes/<name>` in the cluster network, when it starts: its
//! instance, generation, gossip address and data-plane address, and whether it is up, stopped
//! for a restart, or left (a tombstone). The table is repaired by anti-entropy like any other,
//! so each node learns of every other within a few sync rounds, whatever SWIM's piggybacked
//! updates missed. A node named in the table that membership has never seen is announced to
//! (foca answers an announce with the target's view and learns the announcer), a few per
//! gossip round, backing off while it does not answer. Without this, a node that joins while
//! hundreds of others join learns the rest only from random 30-member feeds: minutes at 2,000
//! nodes.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::wire::{self, WireError};

/// The value of an attachment record (table `weft:attachments`, key `"<network> <node>"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachRecord {
    /// The writer's restart generation: records order by it first.
    pub generation: u64,
    pub attached: bool,
    /// The writer's gossip address.
    pub addr: SocketAddr,
}

impl AttachRecord {
    pub fn encode(&self) -> Bytes {
        Bytes::from(wire::encode(self).expect("a record encodes"))
    }

    pub fn decode(value: &[u8]) -> Result<Self, WireError> {
        wire::decode(value)
    }
}

/// What a node's record says of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeStatus {
    Up,
    /// Stopped for a restart: peers keep its entries live for `Config::restart_grace`.
    Restarting,
    /// Left the cluster for good (the record is a tombstone): peers delete its entries.
    Left,
}

/// The value of a node record (table `weft:nodes`, key: the node's name). Records of one name
/// order by generation first, so a newer life's record wins whatever its Lamport time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub instance: u64,
    pub generation: u64,
    /// Gossip address.
    pub addr: SocketAddr,
    /// Data-plane (VTEP) address.
    pub data_addr: IpAddr,
    pub status: NodeStatus,
}

impl NodeRecord {
    pub fn encode(&self) -> Bytes {
        Bytes::from(wire::encode(self).expect("a record encodes"))
    }

    pub fn decode(value: &[u8]) -> Result<Self, WireError> {
        wire::decode(value)
    }
}

/// First retry after an unanswered announce; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(2);
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Announces to one name before giving up until its record changes (a node that crashed before
/// anyone saw it stays in the table; it is not worth a datagram a minute forever).
const MAX_ATTEMPTS: u32 = 8;

#[derive(Debug, Clone, Copy)]
struct Pending {
    due: Instant,
    attempts: u32,
    addr: SocketAddr,
}

/// Names to announce to, ordered by when.
#[derive(Debug, Default)]
pub(crate) struct Discovery {
    queue: BTreeSet<(Instant, Arc<str>)>,
    by_name: HashMap<Arc<str>, Pending>,
}

impl Discovery {
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Announce to `name` at `addr` from `now` on (again from the first attempt if the address
    /// changed, i.e. a new record).
    pub fn want(&mut self, name: &Arc<str>, addr: SocketAddr, now: Instant) {
        if let Some(p) = self.by_name.get(name) {
            if p.addr == addr {
                return;
            }
            self.queue.remove(&(p.due, name.clone()));
        }
        self.by_name.insert(name.clone(), Pending { due: now, attempts: 0, addr });
        self.queue.insert((now, name.clone()));
    }

    /// Membership has seen `name` (or it left): stop announcing to it.
    pub fn forget(&mut self, name: &str) {
        if let Some((k, p)) = self.by_name.remove_entry(name) {
            self.queue.remove(&(p.due, k));
        }
    }

    /// Up to `k` addresses due at `now`; each is rescheduled with a doubled backoff, or dropped
    /// after [`MAX_ATTEMPTS`].
    pub fn due(&mut self, now: Instant, k: usize) -> Vec<SocketAddr> {
        let mut out = Vec::new();
        while out.len() < k {
            if self.queue.first().is_none_or(|(due, _)| *due > now) {
                break;
            }
            let Some((_, name)) = self.queue.pop_first() else { break };
            let Some(p) = self.by_name.get_mut(&name) else { continue };
            out.push(p.addr);
            p.attempts += 1;
            if p.attempts >= MAX_ATTEMPTS {
                self.by_name.remove(&name);
                continue;
            }
            let backoff = FIRST_BACKOFF.saturating_mul(1 << (p.attempts - 1).min(5)).min(MAX_BACKOFF);
            p.due = now + backoff;
            self.queue.insert((p.due, name));
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // an arbitrary origin for virtual time
mod tests {
    use super::*;

    fn a(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, i], 7946))
    }

    #[test]
    fn records_round_trip() {
        let r = AttachRecord { generation: 7, attached: true, addr: a(1) };
        assert_eq!(AttachRecord::decode(&r.encode()), Ok(r));
        assert!(AttachRecord::decode(b"\x07").is_err());
        let n = NodeRecord {
            instance: 9,
            generation: 1_700_000_000_000,
            addr: a(2),
            data_addr: a(3).ip(),
            status: NodeStatus::Restarting,
        };
        assert_eq!(NodeRecord::decode(&n.encode()), Ok(n));
        assert!(NodeRecord::decode(&r.encode()).is_err());
    }

    #[test]
    fn announces_back_off_give_up_and_restart_on_a_new_record() {
        let t0 = Instant::now();
        let mut d = Discovery::default();
        let (x, y): (Arc<str>, Arc<str>) = (Arc::from("x"), Arc::from("y"));
        d.want(&x, a(1), t0);
        d.want(&y, a(2), t0);
        d.want(&x, a(1), t0 + Duration::from_secs(1)); // already wanted: unchanged
        assert_eq!(d.due(t0, 1), vec![a(1)]);
        assert_eq!(d.due(t0, 5), vec![a(2)]);
        assert_eq!(d.due(t0 + Duration::from_secs(1), 5), Vec::<SocketAddr>::new());
        d.forget("y");
        let mut t = t0;
        let mut sent = 1;
        while d.len() > 0 {
            t += Duration::from_secs(1);
            sent += d.due(t, 5).len();
            assert!(t < t0 + Duration::from_secs(600), "gives up in bounded time");
        }
        assert_eq!(sent, MAX_ATTEMPTS as usize);
        // Gaps doubled: 2+4+8+16+32+60+60 s after the first.
        assert!(t - t0 >= Duration::from_secs(180), "{:?}", t - t0);
        d.want(&x, a(9), t);
        assert_eq!(d.due(t, 5), vec![a(9)], "a new address starts over");
    }
}

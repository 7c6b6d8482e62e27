//! What the core hands its caller: events, transmissions, member views.

use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;

use crate::identity::NodeId;

/// A table change as a watcher sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableEvent {
    pub kind: TableEventKind,
    pub network: String,
    pub table: String,
    pub key: String,
    /// Node that wrote the version now in force (for a delete: the deleted version's owner).
    pub owner: String,
    /// That version's Lamport time: with `owner`, a total order on versions every node
    /// computes alike (drivers order a handover of one address by it).
    pub ltime: u64,
    /// The value the watcher saw last (`None` for a create).
    pub prev: Option<Bytes>,
    /// The value now (`None` for a delete).
    pub value: Option<Bytes>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableEventKind {
    Create,
    Update,
    Delete,
}

/// How a member went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownReason {
    /// Failure detection declared it down: its entries are hidden, not deleted.
    Failed,
    /// It left cleanly: its entries are deleted.
    Left,
    /// It stopped for a restart: its entries stay live for `restart_grace`.
    Restarting,
}

/// Outputs of [`GossipNode::poll_event`](crate::GossipNode::poll_event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    MemberUp(NodeId),
    MemberDown {
        id: NodeId,
        reason: DownReason,
    },
    /// A node's attachment to a network changed (`attached` false: it detached or left).
    NetworkPeer {
        network: String,
        node: String,
        attached: bool,
    },
    Table(TableEvent),
    /// A point-to-point message from another node (see `send_message`).
    Message {
        from: NodeId,
        data: Bytes,
    },
    /// Another live node answered a direct probe under this node's name: another instance
    /// (two hosts given one `--name`), or this instance's data dir copied to another host.
    /// Earlier lives that do not answer are not a clash.
    NameConflict {
        other: NodeId,
        /// The generation the other life started with (this node's is
        /// `GossipNode::started_generation`): of two copies of one data dir, the one started
        /// later stops.
        other_started: u64,
    },
    /// This node became connected to a cluster (at least one other member is active), or lost
    /// every other member.
    Connected(bool),
}

/// How a transmission must travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransmitKind {
    /// One UDP datagram, at most `max_packet_size` bytes.
    Datagram,
    /// One frame on a TCP stream to the destination's gossip port: the shell writes
    /// [`stream_prefix`](crate::wire::stream_prefix) of the length, then the bytes.
    Stream,
}

/// Bytes for the shell to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub dst: SocketAddr,
    pub kind: TransmitKind,
    pub bytes: Bytes,
}

/// A member as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    pub id: NodeId,
    pub state: MemberState,
    pub incarnation: u16,
    /// Networks the member is attached to, as far as this node knows (sorted).
    pub networks: Vec<String>,
    /// Its data-plane (VTEP) address, from its node record, once that has arrived.
    pub data_addr: Option<IpAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum MemberState {
    Alive,
    Suspect,
    /// Stopped for a restart (SIGTERM): its entries stay live for `restart_grace`.
    Restarting,
    Failed,
    Left,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Alive => "alive",
            MemberState::Suspect => "suspect",
            MemberState::Restarting => "restarting",
            MemberState::Failed => "failed",
            MemberState::Left => "left",
        }
    }
}

/// Counters for metrics. Monotonic since the node was built.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub datagrams_in: u64,
    pub datagrams_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub streams_in: u64,
    pub streams_out: u64,
    pub stream_bytes_in: u64,
    pub stream_bytes_out: u64,
    /// Frames rejected by the decoder (bad envelope, undecodable payload, too large).
    pub decode_errors: u64,
    /// Frames from a newer wire version (an upgrade is rolling through).
    pub newer_version_frames: u64,
    /// Membership packets foca refused.
    pub membership_errors: u64,
    /// Events for networks this node is not attached to.
    pub foreign_network_events: u64,
    /// Remote versions applied (newer than what this node held).
    pub entries_applied: u64,
    /// Remote versions ignored (not newer).
    pub entries_stale: u64,
    /// Queued events dropped at the queue bound.
    pub queue_drops: u64,
    pub syncs_started: u64,
    pub syncs_answered: u64,
    /// Syncs whose digests matched: nothing but the digest crossed.
    pub syncs_identical: u64,
    pub tombstones_reaped: u64,
    /// Owners whose entries were hidden because membership declared them down (restarting
    /// members past their grace included).
    pub owners_hidden_failed: u64,
    /// Owners whose entries were hidden because membership never knew them (for longer than
    /// `Config::unknown_owner_grace`) or knew them only as down.
    pub owners_hidden_unknown: u64,
    /// Times this node moved its generation above an earlier life of its name.
    pub identity_moves: u64,
    /// Entries of earlier lives of this node's name that this life tombstoned.
    pub old_life_entries_removed: u64,
    /// Dead nodes this node removed (`weft node rm`).
    pub nodes_removed: u64,
    /// Node and attachment records of members gone longer than `reap_after`, dropped locally.
    pub records_expired: u64,
    /// Records and entries of expired members refused on receipt.
    pub records_refused: u64,
}

//! weft's gossip core: a sans-IO, deterministic networkDB on SWIM membership.
//!
//! One [`GossipNode`] per agent holds all protocol state: membership (foca), network
//! attachments, replicated tables, dissemination queues and anti-entropy. It never touches a
//! socket, a clock or OS entropy; see [`GossipNode`] for the calling contract.

mod config;
mod discovery;
mod error;
mod event;
mod identity;
mod node;
mod peers;
mod queue;
mod store;
mod timers;
mod watcher;
pub mod wire;

pub use config::Config;
pub use discovery::{AttachRecord, NodeRecord, NodeStatus};
pub use error::Error;
pub use event::{
    DownReason, Event, MemberInfo, MemberState, Stats, TableEvent, TableEventKind, Transmit, TransmitKind,
};
pub use identity::NodeId;
pub use node::{
    ATTACH_TABLE, CLUSTER_NETWORK, Change, EntryState, EntryView, GossipNode, NODES_TABLE,
    RESERVED_TABLE_PREFIX,
};
pub use store::{
    DIGEST_BUCKETS, MergeRule, TableKind, TableSpec, VersionRef, compare_versions, diff_buckets,
};
pub use watcher::{ObjectType, TableWatcher, Version, Watchers};
pub use wire::WireError;

/// Re-exported so callers can tune membership without naming foca's version themselves.
pub use foca;

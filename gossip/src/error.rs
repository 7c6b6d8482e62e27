//! Errors of the gossip core: refused commands and rejected input.

use thiserror::Error;

/// A command the core refused, or input it could not accept. Commands that fail change nothing.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    #[error("network {0:?} is not attached on this node")]
    NotAttached(String),
    #[error("network {0:?} is reserved")]
    ReservedNetwork(String),
    #[error("table name {0:?} is reserved for the gossip core")]
    ReservedTable(String),
    #[error("entry {network}/{table}/{key} already exists")]
    EntryExists { network: String, table: String, key: String },
    #[error("entry {network}/{table}/{key} does not exist")]
    EntryNotFound { network: String, table: String, key: String },
    #[error("entry {network}/{table}/{key}: the table's merge rule keeps the version already held")]
    Superseded { network: String, table: String, key: String },
    #[error("{what} is empty or longer than {max} bytes")]
    BadName { what: &'static str, max: usize },
    #[error("value of {len} bytes does not fit a {max}-byte stream frame")]
    TooLarge { len: usize, max: usize },
    #[error("unknown node {0:?}")]
    UnknownNode(String),
    #[error("the node has left the cluster")]
    Left,
    #[error("membership: {0}")]
    Membership(String),
    #[error(transparent)]
    Wire(#[from] crate::wire::WireError),
}

//! Errors of the agent's commands: each is one line a person can act on.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum AgentError {
    #[error(transparent)]
    Gossip(#[from] weft_gossip::Error),
    #[error("no such network: {0}")]
    NoSuchNetwork(String),
    #[error("bad network option: {0}")]
    BadOption(String),
    /// The data plane refused (or cannot run) an operation: the object and the call.
    #[error("data plane: {0}")]
    Dataplane(String),
    #[error("network name {name:?} is ambiguous (ids {}): use the id", ids.join(", "))]
    AmbiguousNetwork { name: String, ids: Vec<String> },
    #[error("a network named {0:?} already exists")]
    NetworkExists(String),
    #[error("network {name:?} is in use by {}: detach them first or use --force", peers.join(", "))]
    NetworkInUse { name: String, peers: Vec<String> },
    #[error("this node is not attached to network {0:?}")]
    NotAttached(String),
    #[error("{0:?} is reserved")]
    Reserved(String),
    #[error("refused: {0} (use --force)")]
    Protected(String),
    #[error("bad subnet {0}")]
    BadSubnet(String),
    #[error("bad gateway {0}")]
    BadGateway(String),
    #[error("bad {0}")]
    BadName(String),
    #[error("subnet {subnet} overlaps network {other:?} ({theirs})")]
    PoolOverlap { subnet: String, other: String, theirs: String },
    #[error("{0}")]
    Exhausted(String),
    #[error(
        "the data dir's allocator state is unreadable ({0}); move the data dir away to start as a new node"
    )]
    CorruptStore(String),
    #[error("cannot allocate: {0}")]
    NoAddress(String),
    #[error("{0}")]
    NotLocal(String),
    #[error("no such endpoint: {0}")]
    NoSuchEndpoint(String),
    #[error("an endpoint named {name:?} already exists in network {network:?} (on node {node})")]
    EndpointExists { name: String, network: String, node: String },
    #[error("network {network:?} still has endpoints on this node ({}): remove them first{hint}", names.join(", "))]
    HasEndpoints { network: String, names: Vec<String>, hint: &'static str },
    #[error("timed out waiting for {0}")]
    WaitedTooLong(String),
    #[error("{0}")]
    Removed(String),
    #[error("no such node: {0} (no instance of that name is a member or owns anything this node knows of)")]
    NoSuchNode(String),
    #[error("nothing removed: {0}")]
    NodeAlive(String),
}

impl AgentError {
    /// The HTTP status the control API answers with.
    pub fn status(&self) -> u16 {
        match self {
            AgentError::NoSuchNetwork(_) => 404,
            AgentError::Gossip(weft_gossip::Error::EntryNotFound { .. }) => 404,
            AgentError::NoSuchEndpoint(_) | AgentError::NoSuchNode(_) => 404,
            AgentError::NodeAlive(_) => 409,
            AgentError::Removed(_) => 403,
            AgentError::NetworkExists(_) | AgentError::NetworkInUse { .. } => 409,
            AgentError::PoolOverlap { .. }
            | AgentError::EndpointExists { .. }
            | AgentError::HasEndpoints { .. } => 409,
            AgentError::Exhausted(_) | AgentError::NoAddress(_) | AgentError::WaitedTooLong(_) => 503,
            AgentError::Dataplane(_) => 422,
            AgentError::Gossip(weft_gossip::Error::EntryExists { .. }) => 409,
            AgentError::Protected(_) => 403,
            _ => 400,
        }
    }
}

//! weft-sim: a deterministic simulator of whole weft clusters.
//!
//! It holds the in-memory cluster ([`Sim`], over [`Host`]s: the agent that ships, or the bare
//! gossip core for the core's own tests), the scenarios measured on it ([`scenarios`],
//! [`matrix`], [`allocation`]) and the `weft-sim` command line.

pub mod allocation;
pub mod cluster;
pub mod host;
pub mod matrix;
pub mod plot;
pub mod scale;
pub mod scenarios;
pub mod soak;

pub use cluster::{AgentCluster, Cluster, NetModel, Sim, SimNode, Traffic, Work};
pub use host::{Host, TABLES};

//! weft-sim: a deterministic simulator of whole weft clusters.
//!
//! Today it holds the in-memory cluster harness the gossip core is tested with ([`Cluster`])
//! and the convergence measurements quoted in the gossip issue ([`scenarios`]).

pub mod cluster;
pub mod scenarios;

pub use cluster::{Cluster, NetModel, SimNode, TABLES, Traffic};

//! weft-sim: a deterministic simulator of whole weft clusters.
//!
//! It holds the in-memory cluster harness the gossip core is tested with ([`Cluster`]), the
//! scenarios measured on it ([`scenarios`]), and the `weft-sim` command line (so far
//! `weft-sim convergence`).

pub mod cluster;
pub mod matrix;
pub mod scenarios;

pub use cluster::{Cluster, NetModel, SimNode, TABLES, Traffic};

//! weft's IPAM: pure and deterministic, no I/O.
//!
//! * [`contract`]: the `Ipam` trait, libnetwork's ipamapi contract in Rust;
//! * [`default`]: the Docker-compatible default IPAM;
//! * [`bitmap`]: the allocation bitmap under both (word-at-a-time, sparse, serializable).

pub mod bitmap;
pub mod contract;
pub mod default;
pub mod net;

pub use bitmap::Bitmap;
pub use contract::{AllocatedPool, Capability, Ipam, IpamError, Options, PoolId, PoolRequest};
pub use default::{DefaultIpam, DefaultIpamConfig, Predefined};

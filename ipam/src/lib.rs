//! weft's IPAM: pure and deterministic, no I/O.
//!
//! * [`contract`]: the `Ipam` trait, libnetwork's ipamapi contract in Rust;
//! * [`default`]: the Docker-compatible default IPAM;
//! * [`bitmap`]: the allocation bitmap under both (word-at-a-time, sparse, serializable);
//! * [`ring`]: one pool split among many owners, replicated as a CRDT, with donation and
//!   removal; [`runs`] holds its per-block records;
//! * [`seeding`]: single-decree Paxos that seeds a cluster-wide ring once.

pub mod bitmap;
pub mod contract;
pub mod default;
pub mod net;
pub mod outbox;
pub mod ring;
pub mod runs;
pub mod seeding;

pub use bitmap::Bitmap;
pub use contract::{AllocatedPool, Capability, Ipam, IpamError, Options, PoolId, PoolRequest};
pub use default::{DefaultIpam, DefaultIpamConfig, Predefined};
pub use ring::{Ring, RingEntry, RingError, RingEvent, RingMsg, RingState, Seed, Space};
pub use seeding::{PaxosMsg, SeedOutput, Seeder};

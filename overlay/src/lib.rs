//! weft-overlay: the overlay network driver.
//!
//! * [`driverapi`]: the parts of libnetwork's driver contract weft's drivers and runtime adapters
//!   use (`Driver`, `NetworkAllocator`, `TableWatcher`, ...).
//! * [`driver`]: the overlay driver, sans-IO. It turns endpoint joins and replicated peer
//!   records into data-plane operations ([`dataplane::DpOp`]) handed to its owner as values; the
//!   owner applies them and hands each result back.
//! * [`peerdb`]: peer records by endpoint address, the active one per address, and FDB
//!   reference counts.
//! * [`dataplane`]: the operations, the [`Dataplane`](dataplane::Dataplane) trait that applies
//!   them, and the in-memory implementation (the simulator's); [`linux`] programs the kernel
//!   through netlink.

pub mod dataplane;
pub mod driver;
pub mod driverapi;
#[cfg(target_os = "linux")]
pub mod linux;
pub mod mac;
pub mod peerdb;

pub use dataplane::{Dataplane, DpError, DpOp, KernelView, MemDataplane, OpId};
pub use driver::{OVERLAY_PEER_TABLE, OverlayDriver, OverlayStats, PeerRecord};
pub use mac::Mac;

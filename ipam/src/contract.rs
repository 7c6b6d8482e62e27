//! The IPAM contract (libnetwork's `ipamapi`): address spaces, pools and addresses, with the
//! same operations, meanings and error kinds, in Rust.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use thiserror::Error;

/// The built-in default IPAM's name.
pub const DEFAULT_IPAM: &str = "default";
/// The default address space of local-scope networks.
pub const LOCAL_DEFAULT: &str = "LocalDefault";
/// The default address space of global-scope (cluster-wide) networks.
pub const GLOBAL_DEFAULT: &str = "GlobalDefault";
/// Option asking for serial allocation: continue after the last address handed out.
pub const OPT_SERIAL: &str = "com.docker.network.ipam.serial";
/// Option naming what an address is requested for.
pub const OPT_REQUEST_ADDRESS_TYPE: &str = "RequestAddressType";
/// `RequestAddressType` value of a gateway request.
pub const REQUEST_GATEWAY: &str = "com.docker.network.gateway";

/// Options and metadata, as string maps like the Go contract's.
pub type Options = BTreeMap<String, String>;

/// The contract's error kinds.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IpamError {
    #[error("invalid address space {0:?}")]
    InvalidAddressSpace(String),
    #[error("invalid address pool: {0}")]
    InvalidPool(String),
    #[error("invalid address subpool: {0}")]
    InvalidSubPool(String),
    #[error("no available addresses on this pool")]
    NoAvailableIps,
    #[error("address {0} already in use")]
    AlreadyInUse(IpAddr),
    #[error("requested address {0} is out of range")]
    OutOfRange(IpAddr),
    #[error("pool {0} overlaps with another one in this address space")]
    PoolOverlap(IpNet),
    #[error("address space does not contain pool {0}")]
    BadPool(String),
    #[error("no more predefined subnets available")]
    NoMoreSubnets,
}

/// A pool id: `AddressSpace/subnet[/subpool]`, e.g. `LocalDefault/172.27.0.0/16/172.27.3.0/24`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PoolId {
    pub address_space: String,
    pub pool: IpNet,
    pub sub_pool: Option<IpNet>,
}

impl fmt::Display for PoolId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address_space, self.pool)?;
        if let Some(s) = &self.sub_pool {
            write!(f, "/{s}")?;
        }
        Ok(())
    }
}

impl FromStr for PoolId {
    type Err = IpamError;

    fn from_str(s: &str) -> Result<Self, IpamError> {
        let bad = || IpamError::InvalidPool(format!("malformed pool id {s:?}"));
        let parts: Vec<&str> = s.split('/').collect();
        if parts.len() != 3 && parts.len() != 5 {
            return Err(bad());
        }
        if parts[0].is_empty() {
            return Err(bad());
        }
        let net = |a: &str, p: &str| -> Result<IpNet, IpamError> {
            let n: IpNet = format!("{a}/{p}").parse().map_err(|_| bad())?;
            if n.trunc() != n {
                return Err(bad());
            }
            Ok(n)
        };
        let pool = net(parts[1], parts[2])?;
        let sub_pool = if parts.len() == 5 { Some(net(parts[3], parts[4])?) } else { None };
        Ok(PoolId { address_space: parts[0].to_string(), pool, sub_pool })
    }
}

/// What `request_pool` asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolRequest {
    pub address_space: String,
    /// A specific pool; `None` picks a free predefined one. `0.0.0.0/N` (or `::/N`) picks a free
    /// predefined pool of size N.
    pub pool: Option<IpNet>,
    /// A range of `pool` to allocate addresses from.
    pub sub_pool: Option<IpNet>,
    pub options: Options,
    pub v6: bool,
    /// Subnets a picked pool must not overlap.
    pub exclude: Vec<IpNet>,
}

/// A pool handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocatedPool {
    pub id: PoolId,
    pub pool: IpNet,
    pub meta: Options,
}

/// What an IPAM driver needs from its caller.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capability {
    /// Address requests must carry the endpoint's MAC address.
    pub requires_mac_address: bool,
    /// At start, the caller must replay pool and address requests of existing local networks.
    pub requires_request_replay: bool,
}

/// The IPAM contract.
pub trait Ipam {
    /// The default local and global address spaces.
    fn default_address_spaces(&self) -> (String, String);

    /// Reserves a pool (or a sub-pool of one) in an address space.
    fn request_pool(&mut self, req: &PoolRequest) -> Result<AllocatedPool, IpamError>;

    /// Releases a pool by id.
    fn release_pool(&mut self, id: &PoolId) -> Result<(), IpamError>;

    /// Hands out an address of a pool: `preferred` if given, else one the driver picks. The
    /// address comes with the pool's prefix length.
    fn request_address(
        &mut self,
        id: &PoolId,
        preferred: Option<IpAddr>,
        options: &Options,
    ) -> Result<(IpNet, Options), IpamError>;

    /// Returns an address to its pool.
    fn release_address(&mut self, id: &PoolId, addr: IpAddr) -> Result<(), IpamError>;

    /// Whether the driver is built in (not a plugin).
    fn is_built_in(&self) -> bool;

    fn capabilities(&self) -> Capability {
        Capability::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_ids_print_and_parse() {
        for s in [
            "LocalDefault/172.27.0.0/16",
            "LocalDefault/172.27.0.0/16/172.27.3.0/24",
            "GlobalDefault/fd00::/48",
        ] {
            assert_eq!(s.parse::<PoolId>().unwrap().to_string(), s);
        }
        for bad in [
            "",
            "LocalDefault",
            "LocalDefault/172.27.0.0",
            "/10.0.0.0/8",
            "X/10.0.0.1/8",
            "X/10.0.0.0/33",
            "X/a/b/c",
            "X/10.0.0.0/8/10.1.0.0",
        ] {
            assert!(matches!(bad.parse::<PoolId>(), Err(IpamError::InvalidPool(_))), "{bad}");
        }
    }
}

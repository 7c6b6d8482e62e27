//! The parts of libnetwork's driver contract (`driverapi`) that weft's drivers and runtime
//! adapters use, in Rust: a driver creates networks and endpoints and joins them to sandboxes;
//! a [`NetworkAllocator`] turns a network's allocated resources into the options every host's
//! driver is created with; a driver watching tables implements [`TableWatcher`].

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

pub use weft_gossip::{ObjectType, TableWatcher, Version};

use crate::mac::Mac;

/// Where a driver's state lives and how far its networks reach (libnetwork's `Capability`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capability {
    pub data_scope: Scope,
    pub connectivity_scope: Scope,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Local,
    Global,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Local => "local",
            Scope::Global => "global",
        }
    }
}

/// A network's address data for one pool (libnetwork's `IPAMData`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpamData {
    pub address_space: String,
    pub pool: IpNet,
    /// The gateway, with the pool's prefix.
    pub gateway: Option<IpNet>,
    pub aux_addresses: BTreeMap<String, IpNet>,
}

/// Why a driver refused a call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DriverError {
    #[error("no VNI provided (option {0})")]
    NoVni(&'static str),
    #[error("insufficient VNIs: {vnis} for {subnets} IPv4 subnets")]
    InsufficientVnis { vnis: usize, subnets: usize },
    #[error("option {key}={value:?}: {why}")]
    BadOption { key: String, value: String, why: String },
    #[error("network {0} is not known to the overlay driver on this node")]
    NoSuchNetwork(String),
    #[error("endpoint {0} is not known to the overlay driver on this node")]
    NoSuchEndpoint(String),
    #[error("endpoint {eid}: {why}")]
    BadEndpoint { eid: String, why: String },
}

/// What a driver reads and fills in about an endpoint's interface at `CreateEndpoint`.
pub trait InterfaceInfo {
    fn mac_address(&self) -> Option<Mac>;
    /// Sets the MAC if none was given; an error if one was.
    fn set_mac_address(&mut self, mac: Mac) -> Result<(), DriverError>;
    fn address(&self) -> Option<Ipv4Net>;
    fn address_ipv6(&self) -> Option<Ipv6Net>;
    /// The sandbox's network namespace, if the endpoint gets an interface.
    fn netns_path(&self) -> Option<&Path>;
}

/// How the interface is named inside the sandbox.
pub trait InterfaceNameInfo {
    /// The sandbox-side name: `dst_prefix` plus the first free index (`eth` gives `eth0`).
    fn set_names(&mut self, dst_prefix: &str);
}

/// What a driver hands back at `Join`.
pub trait JoinInfo {
    fn interface_name(&mut self) -> &mut dyn InterfaceNameInfo;
    /// Publishes an entry in a table of the network (the overlay's peer record).
    fn add_table_entry(&mut self, table: &str, key: &str, value: Vec<u8>);
}

/// A network driver (libnetwork's `driverapi.Driver`).
pub trait Driver {
    /// The driver's name (`overlay`).
    fn kind(&self) -> &'static str;

    fn capability(&self) -> Capability;

    /// Creates the network on this host from the options the allocator produced; returns the
    /// tables the driver wants events for (libnetwork's `TableEventRegister`).
    fn create_network(
        &mut self,
        nid: &str,
        options: &BTreeMap<String, String>,
        ipv4: &[IpamData],
        ipv6: &[IpamData],
    ) -> Result<Vec<(&'static str, ObjectType)>, DriverError>;

    fn delete_network(&mut self, nid: &str) -> Result<(), DriverError>;

    fn create_endpoint(
        &mut self,
        nid: &str,
        eid: &str,
        iface: &mut dyn InterfaceInfo,
    ) -> Result<(), DriverError>;

    fn delete_endpoint(&mut self, nid: &str, eid: &str) -> Result<(), DriverError>;

    /// Attaches the endpoint to its sandbox (`None`: no interface, only its records).
    fn join(
        &mut self,
        nid: &str,
        eid: &str,
        sandbox: Option<&Path>,
        jinfo: &mut dyn JoinInfo,
    ) -> Result<(), DriverError>;

    fn leave(&mut self, nid: &str, eid: &str) -> Result<(), DriverError>;
}

/// Allocates a network's cluster-wide driver resources once, where the network is created
/// (libnetwork's `driverapi.NetworkAllocator`); the options it returns are part of the network's
/// definition and reach every host's `create_network`.
pub trait NetworkAllocator {
    fn network_allocate(
        &mut self,
        nid: &str,
        options: &BTreeMap<String, String>,
        ipv4: &[IpamData],
        ipv6: &[IpamData],
    ) -> Result<BTreeMap<String, String>, DriverError>;

    fn network_free(&mut self, nid: &str) -> Result<(), DriverError>;
}

/// An endpoint's interface as the agent describes it to a driver.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointInterface {
    pub mac: Option<Mac>,
    pub addr: Option<Ipv4Net>,
    pub addr_v6: Option<Ipv6Net>,
    pub netns: Option<PathBuf>,
}

impl InterfaceInfo for EndpointInterface {
    fn mac_address(&self) -> Option<Mac> {
        self.mac
    }

    fn set_mac_address(&mut self, mac: Mac) -> Result<(), DriverError> {
        if let Some(m) = self.mac {
            return Err(DriverError::BadEndpoint {
                eid: String::new(),
                why: format!("MAC already set to {m}"),
            });
        }
        self.mac = Some(mac);
        Ok(())
    }

    fn address(&self) -> Option<Ipv4Net> {
        self.addr
    }

    fn address_ipv6(&self) -> Option<Ipv6Net> {
        self.addr_v6
    }

    fn netns_path(&self) -> Option<&Path> {
        self.netns.as_deref()
    }
}

/// What a join produced: the interface's name prefix and the table entries to publish.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Joined {
    pub dst_prefix: String,
    pub table_entries: Vec<(String, String, Vec<u8>)>,
}

impl InterfaceNameInfo for Joined {
    fn set_names(&mut self, dst_prefix: &str) {
        self.dst_prefix = dst_prefix.to_string();
    }
}

impl JoinInfo for Joined {
    fn interface_name(&mut self) -> &mut dyn InterfaceNameInfo {
        self
    }

    fn add_table_entry(&mut self, table: &str, key: &str, value: Vec<u8>) {
        self.table_entries.push((table.to_string(), key.to_string(), value));
    }
}

/// An IPv4 pool as [`IpamData`] (the agent's networks are described this way to drivers).
pub fn ipam_v4(pool: Ipv4Net, gateway: Option<IpAddr>) -> IpamData {
    IpamData {
        address_space: "GlobalDefault".into(),
        pool: IpNet::V4(pool),
        gateway: gateway.and_then(|g| IpNet::new(g, pool.prefix_len()).ok()),
        aux_addresses: BTreeMap::new(),
    }
}

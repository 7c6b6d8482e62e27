//! The overlay driver, sans-IO: libnetwork's overlay contract over weft's tables.
//!
//! * `network_allocate` (where a network is created) checks the VNIs the node's share of the
//!   VNI ring gave (one per IPv4 subnet) and fixes the VXLAN port and MTU in the definition.
//! * `create_network` (on every attached host) learns the network; `join` publishes the
//!   endpoint's [`PeerRecord`] (through [`JoinInfo`]) and, for an endpoint with a sandbox,
//!   asks for the network's sandbox (first such endpoint on the host) and the endpoint's
//!   interface; `leave` undoes it (the sandbox goes with the last one).
//! * `event_notify` feeds the per-network [`PeerDb`]; the active record of every remote address
//!   becomes a neighbour and an FDB entry on the network's VXLAN device.
//!
//! The driver never touches the kernel: operations come out of [`OverlayDriver::poll_op`], in
//! order, and their results go back through [`OverlayDriver::handle_done`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};

use crate::dataplane::{DpError, DpOp, EpSpec, NetSpec, OpId, PeerEntries, short};
use crate::driverapi::{
    Capability, Driver, DriverError, InterfaceInfo, IpamData, JoinInfo, NetworkAllocator, ObjectType, Scope,
    TableWatcher, Version,
};
use crate::mac::Mac;
use crate::peerdb::{Peer, PeerDb};

/// The table of peer records, one per endpoint, scoped to its network, keyed by endpoint id.
pub const OVERLAY_PEER_TABLE: &str = "overlay_peer_table";
/// The network option listing its VNIs, one per IPv4 subnet, comma-separated.
pub const VXLANID_OPTION: &str = "com.docker.network.driver.overlay.vxlanid_list";
/// The network option giving its MTU.
pub const MTU_OPTION: &str = "com.docker.network.driver.mtu";
/// The network option giving its VXLAN UDP port (fixed in the definition, the same on every
/// host).
pub const VXLAN_PORT_OPTION: &str = "com.docker.network.driver.overlay.vxlan_port";
pub const DEFAULT_VXLAN_PORT: u16 = 4789;
/// The lowest VNI handed out (clear of 802.1Q VLAN ids, as libnetwork does).
pub const MIN_VNI: u32 = 4096;
pub const MAX_VNI: u32 = (1 << 24) - 1;
/// The sandbox-side interface name prefix.
pub const IFNAME_PREFIX: &str = "eth";
/// How often the peers of a sandbox are compared with the data plane and repaired.
pub const RESYNC_EVERY_TICKS: u32 = 60;
/// How often a sandbox that failed is asked for again while endpoints need it.
pub const RETRY_EVERY_TICKS: u32 = 10;

/// What an operation was for: whether its failure fails the endpoint create it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// The network's sandbox, or an endpoint's interface: an `endpoint create --sandbox` fails
    /// with it.
    Essential,
    /// A peer's entries, a removal, a prune: logged and repaired by the next resync.
    Other,
}

/// libnetwork's overlay `PeerRecord`, with its Go field names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    /// The endpoint's address with its prefix (`10.0.1.5/24`).
    #[serde(rename = "EndpointIP")]
    pub endpoint_ip: String,
    #[serde(rename = "EndpointMAC")]
    pub endpoint_mac: String,
    /// The owner's VTEP (its data-plane address).
    #[serde(rename = "TunnelEndpointIP")]
    pub tunnel_endpoint_ip: String,
}

impl PeerRecord {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("serializable")
    }

    /// Decodes and checks a record: an IPv4 address with prefix, a unicast MAC, an IP VTEP.
    pub fn decode(v: &[u8]) -> Result<(Ipv4Net, Mac, IpAddr), String> {
        let r: PeerRecord = serde_json::from_slice(v).map_err(|e| format!("not a peer record: {e}"))?;
        let ip: Ipv4Net = r
            .endpoint_ip
            .parse()
            .map_err(|_| format!("EndpointIP {:?} is not IPv4/prefix", r.endpoint_ip))?;
        let mac: Mac = r.endpoint_mac.parse()?;
        if !mac.is_unicast() {
            return Err(format!("EndpointMAC {mac} is not unicast"));
        }
        let vtep: IpAddr = r
            .tunnel_endpoint_ip
            .parse()
            .map_err(|_| format!("TunnelEndpointIP {:?} is not an IP", r.tunnel_endpoint_ip))?;
        Ok((ip, mac, vtep))
    }
}

/// Counters for `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OverlayStats {
    pub ops: u64,
    pub op_errors: u64,
    pub malformed_records: u64,
    pub resyncs: u64,
}

/// A local endpoint the driver knows.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LocalEp {
    addr: Ipv4Net,
    mac: Mac,
    /// Joined to a sandbox (has an interface).
    sandbox: Option<PathBuf>,
    joined: bool,
}

/// A network on this host.
#[derive(Debug, Clone)]
struct Net {
    spec: NetSpec,
    subnet: Ipv4Net,
    endpoints: BTreeMap<String, LocalEp>,
    /// The sandbox was asked for (and has not failed).
    sandbox: bool,
    /// A sandbox was asked for since the last removal (failed or not): what is left of it
    /// goes with the last endpoint.
    made: bool,
    peers: PeerDb,
    /// The network's tables have synced since this agent started: the sandbox's peers were
    /// (or will be, once it exists) made exactly what the tables say.
    synced: bool,
    ticks: u32,
    last_error: Option<String>,
    /// The error last logged at warning level: a retry that fails the same way again (a
    /// foreign device that stays) is logged at debug level, not every 10 s for ever.
    reported: Option<String>,
}

/// What one network looks like to the driver (`network inspect --verbose`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetReport {
    pub vni: u32,
    pub port: u16,
    pub mtu: Option<u32>,
    pub sandbox: bool,
    pub sandboxed_endpoints: Vec<String>,
    pub peers: Vec<PeerRow>,
    /// Neighbour and FDB entries the data plane was asked to hold.
    pub neighbours: Vec<(Ipv4Addr, Mac)>,
    pub fdb: Vec<(Mac, IpAddr)>,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRow {
    pub endpoint: String,
    pub ip: String,
    pub mac: Mac,
    pub vtep: IpAddr,
    pub owner: String,
    pub ltime: u64,
    pub local: bool,
    /// The VTEP is the owner's published data address.
    pub valid: bool,
    /// The active record of its address (what is programmed, if remote and valid).
    pub active: bool,
}

/// The overlay driver of one node.
#[derive(Debug)]
pub struct OverlayDriver {
    me: String,
    vtep: IpAddr,
    nets: BTreeMap<String, Net>,
    /// Data addresses of record owners, as their node records publish them.
    owner_vteps: BTreeMap<String, Option<IpAddr>>,
    unresolved: BTreeSet<String>,
    ops: VecDeque<(OpId, DpOp)>,
    next_op: OpId,
    /// Operations handed out and not yet done: the network (empty: all), whether it made the
    /// sandbox, and what it was for.
    inflight: BTreeMap<OpId, (String, bool, OpKind)>,
    pub stats: OverlayStats,
}

impl OverlayDriver {
    /// The driver of node `me`, whose VTEP is `vtep`.
    pub fn new(me: &str, vtep: IpAddr) -> Self {
        OverlayDriver {
            me: me.to_string(),
            vtep,
            nets: BTreeMap::new(),
            owner_vteps: BTreeMap::new(),
            unresolved: BTreeSet::new(),
            ops: VecDeque::new(),
            next_op: 1,
            inflight: BTreeMap::new(),
            stats: OverlayStats::default(),
        }
    }

    pub fn vtep(&self) -> IpAddr {
        self.vtep
    }

    /// This node's VTEP changed (`--data-addr`): records published from now on carry it.
    pub fn set_vtep(&mut self, vtep: IpAddr) {
        self.vtep = vtep;
    }

    pub fn has_network(&self, nid: &str) -> bool {
        self.nets.contains_key(nid)
    }

    pub fn networks(&self) -> impl Iterator<Item = &str> {
        self.nets.keys().map(String::as_str)
    }

    /// The id the next operation gets (operations from one call are the ids from before the
    /// call up to this after it).
    pub fn next_op_id(&self) -> OpId {
        self.next_op
    }

    /// The next operation to apply.
    pub fn poll_op(&mut self) -> Option<(OpId, DpOp)> {
        self.ops.pop_front()
    }

    /// An operation's result; what it was for. A failed sandbox is asked for again by the next
    /// join, and every [`RETRY_EVERY_TICKS`] while endpoints need it.
    pub fn handle_done(&mut self, id: OpId, result: Result<(), DpError>) -> OpKind {
        let Some((nid, made_sandbox, kind)) = self.inflight.remove(&id) else { return OpKind::Other };
        match result {
            Ok(()) if made_sandbox => {
                if let Some(n) = self.nets.get_mut(&nid) {
                    n.reported = None;
                }
            }
            Ok(()) => {}
            Err(e) => self.op_failed(&nid, made_sandbox, e),
        }
        kind
    }

    fn op_failed(&mut self, nid: &str, made_sandbox: bool, e: DpError) {
        self.stats.op_errors += 1;
        let Some(n) = self.nets.get_mut(nid) else {
            tracing::warn!(network = %short(nid), error = %e, "data plane operation failed");
            return;
        };
        // The first error since the sandbox was asked for is the one that matters (what follows
        // from it says less), and said once while every retry fails the same way.
        let msg = e.to_string();
        if n.last_error.is_none() && n.reported.as_ref() != Some(&msg) {
            tracing::warn!(network = %short(nid), error = %msg, "data plane operation failed");
            n.reported = Some(msg.clone());
        } else {
            tracing::debug!(network = %short(nid), error = %msg, "data plane operation failed");
        }
        n.last_error.get_or_insert(msg);
        if made_sandbox {
            n.sandbox = false;
            n.peers.forget_programmed();
            // Asked for again in RETRY_EVERY_TICKS.
            n.ticks = 0;
        }
    }

    /// Owners of records whose data address is not known yet (resolve them and call
    /// [`set_owner_vtep`](Self::set_owner_vtep)).
    pub fn take_unresolved(&mut self) -> Vec<String> {
        std::mem::take(&mut self.unresolved).into_iter().collect()
    }

    /// Owners of the remote records held (to check their data addresses now and then).
    pub fn owners(&self) -> Vec<String> {
        self.owner_vteps.keys().cloned().collect()
    }

    /// An owner's published data address (`None`: it has no node record): records of that
    /// owner are programmed only while their VTEP matches it.
    pub fn set_owner_vtep(&mut self, owner: &str, addr: Option<IpAddr>) {
        if self.owner_vteps.get(owner) == Some(&addr) {
            return;
        }
        self.owner_vteps.insert(owner.to_string(), addr);
        let mut out = Vec::new();
        for (nid, n) in &mut self.nets {
            let mut touched = Vec::new();
            for p in n.peers.records_mut() {
                if !p.local && p.version.1 == owner {
                    let valid = addr == Some(p.vtep);
                    if valid != p.valid {
                        p.valid = valid;
                        touched.push(p.ip);
                    }
                }
            }
            if n.sandbox {
                for ip in touched {
                    n.peers.sync(nid, ip, &mut out);
                }
            }
        }
        self.push_ops(out);
    }

    /// The network's tables have synced: make its sandbox's peers exactly what they say (once
    /// per agent life; a previous life may have left entries for peers that went meanwhile).
    pub fn network_synced(&mut self, nid: &str) {
        let Some(n) = self.nets.get_mut(nid) else { return };
        if n.synced {
            return;
        }
        n.synced = true;
        if n.sandbox {
            let op = sync_peers(nid, &n.peers);
            self.push_ops(vec![op]);
        }
    }

    /// Called every second: now and then, each sandbox's peers are re-asserted in full (a
    /// kernel entry removed behind the agent's back comes back).
    pub fn tick(&mut self) {
        let mut out = Vec::new();
        let mut retry = Vec::new();
        for (nid, n) in &mut self.nets {
            n.ticks += 1;
            if n.sandbox && n.synced && n.ticks >= RESYNC_EVERY_TICKS {
                n.ticks = 0;
                out.push(sync_peers(nid, &n.peers));
                self.stats.resyncs += 1;
            }
            if !n.sandbox && n.ticks >= RETRY_EVERY_TICKS && n.endpoints.values().any(|e| e.sandbox.is_some())
            {
                n.ticks = 0;
                retry.push(nid.clone());
            }
        }
        self.push_ops(out);
        for nid in retry {
            // Said once per cause: while it keeps failing the same way, the warning was enough.
            if self.nets[&nid].reported.is_none() {
                tracing::info!(network = %short(&nid), "asking for the network's sandbox again");
            } else {
                tracing::debug!(network = %short(&nid), "asking for the network's sandbox again");
            }
            self.ensure_sandbox(&nid);
            let eps: Vec<DpOp> = self.nets[&nid]
                .endpoints
                .iter()
                .filter_map(|(eid, e)| {
                    e.sandbox.as_ref().map(|s| DpOp::AddEndpoint(ep_spec(&nid, eid, e, s)))
                })
                .collect();
            self.push_ops(eps);
        }
    }

    /// This node leaves the cluster for good: every sandbox goes (the records are gone
    /// everywhere); the driver forgets its networks.
    pub fn leave_all(&mut self) {
        let made: Vec<DpOp> = self
            .nets
            .iter()
            .filter(|(_, n)| n.made)
            .map(|(nid, _)| DpOp::RemoveSandbox { nid: nid.clone() })
            .collect();
        self.nets.clear();
        self.push_ops(made);
    }

    /// At start: every sandbox but those of these networks goes (a previous life's, for
    /// networks left meanwhile).
    pub fn prune_sandboxes(&mut self, keep: Vec<String>) {
        self.push_ops(vec![DpOp::PruneSandboxes { keep }]);
    }

    /// The local endpoints the driver knows in a network.
    pub fn local_endpoints(&self, nid: &str) -> Vec<String> {
        self.nets.get(nid).map(|n| n.endpoints.keys().cloned().collect()).unwrap_or_default()
    }

    /// Networks whose sandbox is up (asked for, not refused).
    pub fn sandboxes_up(&self) -> usize {
        self.nets.values().filter(|n| n.sandbox).count()
    }

    pub fn report(&self, nid: &str) -> Option<NetReport> {
        let n = self.nets.get(nid)?;
        let mut peers = Vec::new();
        for (key, p) in n.peers.records() {
            let active = n.peers.active(p.ip).is_some_and(|(k, _)| k == key);
            peers.push(PeerRow {
                endpoint: key.to_string(),
                ip: format!("{}/{}", p.ip, p.prefix),
                mac: p.mac,
                vtep: p.vtep,
                owner: p.version.1.clone(),
                ltime: p.version.0,
                local: p.local,
                valid: p.local || p.valid,
                active,
            });
        }
        let (neighbours, fdb) = n.peers.programmed();
        Some(NetReport {
            vni: n.spec.vni,
            port: n.spec.port,
            mtu: n.spec.mtu,
            sandbox: n.sandbox,
            sandboxed_endpoints: n
                .endpoints
                .iter()
                .filter(|(_, e)| e.sandbox.is_some())
                .map(|(k, _)| k.clone())
                .collect(),
            peers,
            neighbours,
            fdb,
            last_error: n.last_error.clone(),
        })
    }

    /// Records held across networks, those not programmed for a VTEP mismatch, and addresses
    /// held by two records.
    pub fn counts(&self) -> (usize, usize, usize) {
        self.nets.values().fold((0, 0, 0), |(r, i, c), n| {
            (r + n.peers.len(), i + n.peers.invalid(), c + n.peers.contested())
        })
    }

    fn push_ops(&mut self, ops: Vec<DpOp>) {
        for op in ops {
            let id = self.next_op;
            self.next_op += 1;
            let made_sandbox = matches!(op, DpOp::EnsureSandbox(_));
            let kind = match op {
                DpOp::EnsureSandbox(_) | DpOp::AddEndpoint(_) => OpKind::Essential,
                _ => OpKind::Other,
            };
            self.inflight.insert(id, (op.network().unwrap_or("").to_string(), made_sandbox, kind));
            self.stats.ops += 1;
            self.ops.push_back((id, op));
        }
    }

    /// Asks for the network's sandbox with every peer programmed in it.
    fn ensure_sandbox(&mut self, nid: &str) {
        let Some(n) = self.nets.get_mut(nid) else { return };
        let mut out = vec![DpOp::EnsureSandbox(n.spec.clone())];
        n.sandbox = true;
        n.made = true;
        n.last_error = None;
        n.peers.sync_all(nid, &mut out);
        if n.synced {
            // Leftovers of a previous life go at once when the tables are known already.
            out.push(sync_peers(nid, &n.peers));
        }
        self.push_ops(out);
    }
}

fn ep_spec(nid: &str, eid: &str, ep: &LocalEp, sandbox: &Path) -> EpSpec {
    EpSpec {
        nid: nid.to_string(),
        eid: eid.to_string(),
        sandbox: sandbox.to_path_buf(),
        ifname_prefix: IFNAME_PREFIX.into(),
        mac: ep.mac,
        addr: ep.addr,
    }
}

fn sync_peers(nid: &str, peers: &PeerDb) -> DpOp {
    let (neighbours, fdb) = peers.programmed();
    DpOp::SyncPeers { nid: nid.to_string(), neighbours, fdb }
}

fn bad(key: &str, value: &str, why: impl Into<String>) -> DriverError {
    DriverError::BadOption { key: key.to_string(), value: value.to_string(), why: why.into() }
}

/// Parses the VXLAN port option (1024..=49151, as Docker's `--data-path-port`).
fn parse_port(v: &str) -> Result<u16, DriverError> {
    match v.parse::<u16>() {
        Ok(p) if (1024..=49151).contains(&p) => Ok(p),
        _ => Err(bad(VXLAN_PORT_OPTION, v, "a UDP port in 1024..=49151")),
    }
}

/// Parses the MTU option (68..=9000; 0 means the default, as in Docker).
fn parse_mtu(v: &str) -> Result<Option<u32>, DriverError> {
    match v.parse::<u32>() {
        Ok(0) => Ok(None),
        Ok(m) if (68..=9000).contains(&m) => Ok(Some(m)),
        _ => Err(bad(MTU_OPTION, v, "an MTU in 68..=9000 (0: underlay MTU - 50)")),
    }
}

fn parse_vnis(v: &str) -> Result<Vec<u32>, DriverError> {
    v.split(',')
        .map(|s| match s.parse::<u32>() {
            Ok(n) if (1..=MAX_VNI).contains(&n) => Ok(n),
            _ => Err(bad(VXLANID_OPTION, v, format!("{s:?} is not a VNI in 1..={MAX_VNI}"))),
        })
        .collect()
}

impl NetworkAllocator for OverlayDriver {
    /// Checks the VNIs the caller allocated (in `options`, one per IPv4 subnet), the port and
    /// the MTU, and returns the options as the definition keeps them: the port always set, so
    /// every host uses the same one whatever its defaults.
    fn network_allocate(
        &mut self,
        _nid: &str,
        options: &BTreeMap<String, String>,
        ipv4: &[IpamData],
        _ipv6: &[IpamData],
    ) -> Result<BTreeMap<String, String>, DriverError> {
        let mut out = options.clone();
        let list = options.get(VXLANID_OPTION).ok_or(DriverError::NoVni(VXLANID_OPTION))?;
        let vnis = parse_vnis(list)?;
        if vnis.len() < ipv4.len() {
            return Err(DriverError::InsufficientVnis { vnis: vnis.len(), subnets: ipv4.len() });
        }
        let port = match options.get(VXLAN_PORT_OPTION) {
            Some(p) => parse_port(p)?,
            None => DEFAULT_VXLAN_PORT,
        };
        out.insert(VXLAN_PORT_OPTION.into(), port.to_string());
        if let Some(m) = options.get(MTU_OPTION) {
            parse_mtu(m)?;
        }
        Ok(out)
    }

    fn network_free(&mut self, _nid: &str) -> Result<(), DriverError> {
        // The VNIs go back to the ring they came from; the caller releases them.
        Ok(())
    }
}

impl Driver for OverlayDriver {
    fn kind(&self) -> &'static str {
        "overlay"
    }

    fn capability(&self) -> Capability {
        Capability { data_scope: Scope::Global, connectivity_scope: Scope::Global }
    }

    /// Learns the network (again: a definition seen anew updates it). The data plane follows
    /// its first IPv4 subnet.
    fn create_network(
        &mut self,
        nid: &str,
        options: &BTreeMap<String, String>,
        ipv4: &[IpamData],
        _ipv6: &[IpamData],
    ) -> Result<Vec<(&'static str, ObjectType)>, DriverError> {
        let list = options.get(VXLANID_OPTION).ok_or(DriverError::NoVni(VXLANID_OPTION))?;
        let vnis = parse_vnis(list)?;
        if vnis.len() < ipv4.len() {
            return Err(DriverError::InsufficientVnis { vnis: vnis.len(), subnets: ipv4.len() });
        }
        let port =
            options.get(VXLAN_PORT_OPTION).map(|p| parse_port(p)).transpose()?.unwrap_or(DEFAULT_VXLAN_PORT);
        let mtu = options.get(MTU_OPTION).map(|m| parse_mtu(m)).transpose()?.flatten();
        let Some(first) = ipv4.first() else {
            return Err(bad("subnet", "", "an overlay network needs an IPv4 subnet"));
        };
        let IpNet::V4(subnet) = first.pool else {
            return Err(bad("subnet", &first.pool.to_string(), "not IPv4"));
        };
        if subnet.prefix_len() == 0 {
            return Err(bad("subnet", &subnet.to_string(), "0.0.0.0/0 is not a network's subnet"));
        }
        let gateway = match first.gateway {
            Some(IpNet::V4(g)) => Some(g),
            _ => None,
        };
        let spec = NetSpec { nid: nid.to_string(), vni: vnis[0], port, gateway, mtu };
        match self.nets.get_mut(nid) {
            Some(n) if n.spec != spec => {
                // A definition that changed under a live sandbox: rebuild it.
                n.spec = spec;
                n.subnet = subnet;
                if n.sandbox {
                    // A new VXLAN device holds none of the old one's entries.
                    let mut out = vec![DpOp::EnsureSandbox(n.spec.clone())];
                    n.peers.sync_all(nid, &mut out);
                    self.push_ops(out);
                }
            }
            Some(_) => {}
            None => {
                self.nets.insert(
                    nid.to_string(),
                    Net {
                        spec,
                        subnet,
                        endpoints: BTreeMap::new(),
                        sandbox: false,
                        made: false,
                        peers: PeerDb::default(),
                        synced: false,
                        ticks: 0,
                        last_error: None,
                        reported: None,
                    },
                );
            }
        }
        Ok(vec![(OVERLAY_PEER_TABLE, ObjectType::Endpoint)])
    }

    /// Forgets the network; its sandbox goes.
    fn delete_network(&mut self, nid: &str) -> Result<(), DriverError> {
        let Some(n) = self.nets.remove(nid) else { return Ok(()) };
        if n.made {
            self.push_ops(vec![DpOp::RemoveSandbox { nid: nid.to_string() }]);
        }
        Ok(())
    }

    /// Checks the endpoint's address is in the network's subnet; gives it Docker's MAC for its
    /// address when it has none.
    fn create_endpoint(
        &mut self,
        nid: &str,
        eid: &str,
        iface: &mut dyn InterfaceInfo,
    ) -> Result<(), DriverError> {
        let n = self.nets.get_mut(nid).ok_or_else(|| DriverError::NoSuchNetwork(nid.to_string()))?;
        let Some(addr) = iface.address() else {
            return Err(DriverError::BadEndpoint {
                eid: eid.to_string(),
                why: "an overlay endpoint needs an IPv4 address".into(),
            });
        };
        if iface.netns_path().is_some() && !n.subnet.contains(&addr.addr()) {
            return Err(DriverError::BadEndpoint {
                eid: eid.to_string(),
                why: format!(
                    "{addr} is outside {}, the only subnet of this network with a data plane so far",
                    n.subnet
                ),
            });
        }
        let mac = match iface.mac_address() {
            Some(m) => m,
            None => {
                let m = Mac::from_ipv4(addr.addr());
                iface.set_mac_address(m)?;
                m
            }
        };
        n.endpoints.insert(
            eid.to_string(),
            LocalEp { addr, mac, sandbox: iface.netns_path().map(Path::to_path_buf), joined: false },
        );
        Ok(())
    }

    fn delete_endpoint(&mut self, nid: &str, eid: &str) -> Result<(), DriverError> {
        let _ = self.leave(nid, eid);
        if let Some(n) = self.nets.get_mut(nid) {
            n.endpoints.remove(eid);
        }
        Ok(())
    }

    /// Publishes the endpoint's peer record; with a sandbox, asks for the network's sandbox
    /// (the first such endpoint here) and the endpoint's interface.
    fn join(
        &mut self,
        nid: &str,
        eid: &str,
        sandbox: Option<&Path>,
        jinfo: &mut dyn JoinInfo,
    ) -> Result<(), DriverError> {
        let vtep = self.vtep;
        let n = self.nets.get_mut(nid).ok_or_else(|| DriverError::NoSuchNetwork(nid.to_string()))?;
        let ep = n.endpoints.get_mut(eid).ok_or_else(|| DriverError::NoSuchEndpoint(eid.to_string()))?;
        ep.sandbox = sandbox.map(Path::to_path_buf);
        ep.joined = true;
        let rec = PeerRecord {
            endpoint_ip: ep.addr.to_string(),
            endpoint_mac: ep.mac.to_string(),
            tunnel_endpoint_ip: vtep.to_string(),
        };
        jinfo.add_table_entry(OVERLAY_PEER_TABLE, eid, rec.encode());
        if let Some(path) = sandbox {
            jinfo.interface_name().set_names(IFNAME_PREFIX);
            let spec = ep_spec(nid, eid, ep, path);
            if !n.sandbox {
                self.ensure_sandbox(nid);
            }
            self.push_ops(vec![DpOp::AddEndpoint(spec)]);
        }
        Ok(())
    }

    /// Removes the endpoint's interface; the sandbox goes with the last one. (Its peer record
    /// is the caller's to delete.)
    fn leave(&mut self, nid: &str, eid: &str) -> Result<(), DriverError> {
        let n = self.nets.get_mut(nid).ok_or_else(|| DriverError::NoSuchNetwork(nid.to_string()))?;
        let Some(ep) = n.endpoints.get_mut(eid) else { return Ok(()) };
        ep.joined = false;
        let had_sandbox = ep.sandbox.take().is_some();
        let mut out = Vec::new();
        if had_sandbox {
            out.push(DpOp::RemoveEndpoint { nid: nid.to_string(), eid: eid.to_string() });
        }
        if n.made && !n.endpoints.values().any(|e| e.sandbox.is_some()) {
            out.push(DpOp::RemoveSandbox { nid: nid.to_string() });
            n.sandbox = false;
            n.made = false;
            n.peers.forget_programmed();
        }
        self.push_ops(out);
        Ok(())
    }
}

impl TableWatcher for OverlayDriver {
    fn event_notify(
        &mut self,
        nid: &str,
        table: &str,
        key: &str,
        _prev: Option<&[u8]>,
        value: Option<&[u8]>,
        version: Version<'_>,
    ) {
        if table != OVERLAY_PEER_TABLE {
            return;
        }
        let me = self.me.clone();
        let Some(n) = self.nets.get_mut(nid) else { return };
        let touched = match value {
            None => n.peers.remove(key).into_iter().collect(),
            Some(v) => match PeerRecord::decode(v) {
                Ok((ip, mac, vtep)) => {
                    let local = version.owner == me;
                    let valid = if local {
                        true
                    } else {
                        match self.owner_vteps.get(version.owner) {
                            Some(a) => *a == Some(vtep),
                            None => {
                                self.unresolved.insert(version.owner.to_string());
                                false
                            }
                        }
                    };
                    let peer = Peer {
                        ip: ip.addr(),
                        prefix: ip.prefix_len(),
                        mac,
                        vtep,
                        version: (version.ltime, version.owner.to_string()),
                        local,
                        valid,
                    };
                    n.peers.upsert(key, peer)
                }
                Err(e) => {
                    self.stats.malformed_records += 1;
                    tracing::warn!(network = %short(nid), key, owner = version.owner, error = %e, "malformed peer record ignored");
                    n.peers.remove(key).into_iter().collect()
                }
            },
        };
        if n.sandbox {
            let mut out = Vec::new();
            for ip in touched {
                n.peers.sync(nid, ip, &mut out);
            }
            self.push_ops(out);
        }
    }

    fn decode_table_entry(
        &self,
        _table: &str,
        key: &str,
        value: &[u8],
    ) -> (String, BTreeMap<String, String>) {
        let mut m = BTreeMap::new();
        match serde_json::from_slice::<PeerRecord>(value) {
            Ok(r) => {
                m.insert("Host IP".into(), r.tunnel_endpoint_ip);
                m.insert("ip".into(), r.endpoint_ip);
                m.insert("mac".into(), r.endpoint_mac);
            }
            Err(_) => {
                m.insert("error".into(), "malformed peer record".into());
            }
        }
        (key.to_string(), m)
    }
}

/// What a node's sandbox for a network should hold, from the peer table alone: `(key, value,
/// ltime, owner)` of every live entry, the node's name, and owners' data addresses. The
/// simulator's checker compares the data plane with this.
pub fn expected_peers<'a>(
    nid: &str,
    entries: impl IntoIterator<Item = (&'a str, &'a [u8], u64, &'a str)>,
    me: &str,
    vtep_of: impl Fn(&str) -> Option<IpAddr>,
) -> PeerEntries {
    let mut db = PeerDb::default();
    for (key, value, ltime, owner) in entries {
        if let Ok((ip, mac, vtep)) = PeerRecord::decode(value) {
            let local = owner == me;
            let valid = local || vtep_of(owner) == Some(vtep);
            db.upsert(
                key,
                Peer {
                    ip: ip.addr(),
                    prefix: ip.prefix_len(),
                    mac,
                    vtep,
                    version: (ltime, owner.to_string()),
                    local,
                    valid,
                },
            );
        }
    }
    let mut out = Vec::new();
    db.sync_all(nid, &mut out);
    db.programmed()
}

//! Data-plane operations, the [`Dataplane`] that applies them, and [`MemDataplane`], the
//! in-memory one (the simulator's, and the driver's unit tests').
//!
//! The overlay driver never touches the kernel: it emits [`DpOp`]s in the order they must be
//! applied, and its owner hands each one to a `Dataplane` and its result back to the driver.
//! Every operation is idempotent ("make it so"): applying one twice, or over state a previous
//! agent left, ends in the same state, so a restarted agent reconciles by replaying.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use ipnet::Ipv4Net;
use serde::Serialize;

use crate::mac::Mac;

/// Neighbour entries (address -> MAC) and FDB entries (MAC -> VTEP) of a network's sandbox.
pub type PeerEntries = (Vec<(Ipv4Addr, Mac)>, Vec<(Mac, IpAddr)>);
/// A test's failure injection: operations it matches, and the error they get.
pub type FailRule = (fn(&DpOp) -> bool, DpError);

/// Identifies an operation; its result comes back under the same id.
pub type OpId = u64;

/// Underlay MTU assumed where none can be read (the in-memory data plane).
pub const DEFAULT_UNDERLAY_MTU: u32 = 1500;
/// VXLAN's overhead over the underlay: outer Ethernet, IPv4, UDP and VXLAN headers.
pub const VXLAN_OVERHEAD: u32 = 50;

/// A network's sandbox on this host: a bridge holding the gateway and a VXLAN device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetSpec {
    pub nid: String,
    pub vni: u32,
    /// The VXLAN UDP port (the network's, the same on every host).
    pub port: u16,
    /// The bridge's address: the subnet's gateway with the subnet's prefix.
    pub gateway: Option<Ipv4Net>,
    /// The network's MTU (`com.docker.network.driver.mtu`); `None`: underlay MTU - 50.
    pub mtu: Option<u32>,
}

/// An endpoint's interface: a veth pair, one end on the network's bridge, the other in the
/// endpoint's sandbox namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EpSpec {
    pub nid: String,
    pub eid: String,
    /// The sandbox's network namespace (a bind-mounted namespace file, e.g. `/run/netns/c1`).
    pub sandbox: PathBuf,
    /// The interface's name in the sandbox: this prefix plus the first free index (`eth0`).
    pub ifname_prefix: String,
    pub mac: Mac,
    pub addr: Ipv4Net,
}

/// One data-plane operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum DpOp {
    /// Make the network's sandbox exist as `spec` says, keeping what already matches (a
    /// restarted agent's endpoints stay up) and removing what stands in the way (a weft-named
    /// device a crash left holding the VNI; anyone else's refuses the sandbox).
    EnsureSandbox(NetSpec),
    /// Remove the network's sandbox and everything in it.
    RemoveSandbox {
        nid: String,
    },
    /// Make the endpoint's interface exist (keeping one already in place).
    AddEndpoint(EpSpec),
    /// Remove the endpoint's interface, if any.
    RemoveEndpoint {
        nid: String,
        eid: String,
    },
    /// Permanent neighbour entry `ip -> mac` on the network's VXLAN device (replace semantics).
    SetNeighbour {
        nid: String,
        ip: Ipv4Addr,
        mac: Mac,
    },
    DelNeighbour {
        nid: String,
        ip: Ipv4Addr,
        mac: Mac,
    },
    /// Permanent FDB entry `mac -> vtep` on the network's VXLAN device (replace semantics).
    SetFdb {
        nid: String,
        mac: Mac,
        vtep: IpAddr,
    },
    DelFdb {
        nid: String,
        mac: Mac,
        vtep: IpAddr,
    },
    /// The network's sandbox holds exactly these peers: add what is missing, remove the rest
    /// (entries a previous life left for peers that went while it was away; drift).
    SyncPeers {
        nid: String,
        neighbours: Vec<(Ipv4Addr, Mac)>,
        fdb: Vec<(Mac, IpAddr)>,
    },
    /// Only these networks have sandboxes on this host: remove any other one (at start).
    PruneSandboxes {
        keep: Vec<String>,
    },
}

impl DpOp {
    /// The network an operation is about (`None`: all of them).
    pub fn network(&self) -> Option<&str> {
        match self {
            DpOp::EnsureSandbox(s) => Some(&s.nid),
            DpOp::AddEndpoint(e) => Some(&e.nid),
            DpOp::RemoveSandbox { nid }
            | DpOp::RemoveEndpoint { nid, .. }
            | DpOp::SetNeighbour { nid, .. }
            | DpOp::DelNeighbour { nid, .. }
            | DpOp::SetFdb { nid, .. }
            | DpOp::DelFdb { nid, .. }
            | DpOp::SyncPeers { nid, .. } => Some(nid),
            DpOp::PruneSandboxes { .. } => None,
        }
    }
}

/// Why an operation failed, in one line naming the object and the call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {why}")]
pub struct DpError {
    /// The object and the call, e.g. `network 1f2e3d4c5b6a: create vxlan device (VNI 4097, port 4789)`.
    pub what: String,
    pub why: String,
}

impl DpError {
    pub fn new(what: impl Into<String>, why: impl Into<String>) -> Self {
        DpError { what: what.into(), why: why.into() }
    }
}

/// What a network's sandbox holds, as read back from the data plane.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct KernelView {
    pub sandbox: bool,
    pub vni: Option<u32>,
    pub port: Option<u16>,
    pub mtu: Option<u32>,
    /// Endpoint ids with an interface on the bridge.
    pub endpoints: Vec<String>,
    pub neighbours: Vec<(Ipv4Addr, Mac)>,
    pub fdb: Vec<(Mac, IpAddr)>,
}

impl KernelView {
    /// How this differs from what the driver asked for, one line each (moby #49908: a correct
    /// table and a wrong kernel FDB).
    pub fn differences(
        &self,
        sandbox: bool,
        neighbours: &[(Ipv4Addr, Mac)],
        fdb: &[(Mac, IpAddr)],
    ) -> Vec<String> {
        let mut out = Vec::new();
        match (sandbox, self.sandbox) {
            (true, false) => out.push("the sandbox is missing from the kernel".to_string()),
            (false, true) => out.push("the kernel holds a sandbox the driver does not expect".to_string()),
            _ => {}
        }
        if !self.sandbox {
            return out;
        }
        let (want_n, have_n): (BTreeSet<_>, BTreeSet<_>) =
            (neighbours.iter().collect(), self.neighbours.iter().collect());
        let (want_f, have_f): (BTreeSet<_>, BTreeSet<_>) = (fdb.iter().collect(), self.fdb.iter().collect());
        for (ip, mac) in want_n.difference(&have_n) {
            out.push(format!("missing in the kernel: neighbour {ip} lladdr {mac}"));
        }
        for (ip, mac) in have_n.difference(&want_n) {
            out.push(format!("stale in the kernel: neighbour {ip} lladdr {mac}"));
        }
        for (mac, vtep) in want_f.difference(&have_f) {
            out.push(format!("missing in the kernel: fdb {mac} dst {vtep}"));
        }
        for (mac, vtep) in have_f.difference(&want_f) {
            out.push(format!("stale in the kernel: fdb {mac} dst {vtep}"));
        }
        out
    }
}

/// Applies data-plane operations, in the order given.
pub trait Dataplane {
    fn apply(&mut self, op: &DpOp) -> Result<(), DpError>;

    /// What the network's sandbox holds now.
    fn read(&mut self, nid: &str) -> Result<KernelView, DpError>;
}

/// One network's sandbox in memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemSandbox {
    pub spec: Option<NetSpec>,
    pub mtu: u32,
    pub endpoints: BTreeMap<String, EpSpec>,
    pub neighbours: BTreeMap<Ipv4Addr, Mac>,
    pub fdb: BTreeSet<(Mac, IpAddr)>,
}

/// The in-memory data plane: the state operations lead to, kept as a kernel would keep it
/// (it belongs to the host, not to the agent, so it survives the agent). Sandbox paths must be
/// declared with [`add_sandbox_path`](Self::add_sandbox_path) before endpoints use them, as a
/// namespace must exist.
#[derive(Debug, Clone, Default)]
pub struct MemDataplane {
    pub sandboxes: BTreeMap<String, MemSandbox>,
    pub sandbox_paths: BTreeSet<PathBuf>,
    pub underlay_mtu: Option<u32>,
    /// Operations applied (successful or not), for tests.
    pub applied: u64,
    /// The next operation matching this fails with this error (tests of error paths).
    pub fail: Option<FailRule>,
}

impl MemDataplane {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add_sandbox_path(&mut self, p: impl Into<PathBuf>) {
        self.sandbox_paths.insert(p.into());
    }

    fn sandbox(&mut self, nid: &str, call: &str) -> Result<&mut MemSandbox, DpError> {
        self.sandboxes.get_mut(nid).ok_or_else(|| {
            DpError::new(format!("network {}: {call}", short(nid)), "the network has no sandbox on this host")
        })
    }
}

impl Dataplane for MemDataplane {
    fn apply(&mut self, op: &DpOp) -> Result<(), DpError> {
        self.applied += 1;
        if let Some((matches, _)) = &self.fail
            && matches(op)
        {
            let (_, e) = self.fail.take().expect("checked");
            return Err(e);
        }
        match op {
            DpOp::EnsureSandbox(spec) => {
                let mtu =
                    spec.mtu.unwrap_or(self.underlay_mtu.unwrap_or(DEFAULT_UNDERLAY_MTU) - VXLAN_OVERHEAD);
                let sb = self.sandboxes.entry(spec.nid.clone()).or_default();
                sb.spec = Some(spec.clone());
                sb.mtu = mtu;
            }
            DpOp::RemoveSandbox { nid } => {
                self.sandboxes.remove(nid);
            }
            DpOp::AddEndpoint(ep) => {
                if !self.sandbox_paths.contains(&ep.sandbox) {
                    return Err(DpError::new(
                        format!("endpoint {}: open sandbox {}", short(&ep.eid), ep.sandbox.display()),
                        "no such file or directory",
                    ));
                }
                self.sandbox(&ep.nid, "add endpoint interface")?.endpoints.insert(ep.eid.clone(), ep.clone());
            }
            DpOp::RemoveEndpoint { nid, eid } => {
                if let Some(sb) = self.sandboxes.get_mut(nid) {
                    sb.endpoints.remove(eid);
                }
            }
            DpOp::SetNeighbour { nid, ip, mac } => {
                self.sandbox(nid, "set neighbour")?.neighbours.insert(*ip, *mac);
            }
            DpOp::DelNeighbour { nid, ip, .. } => {
                if let Some(sb) = self.sandboxes.get_mut(nid) {
                    sb.neighbours.remove(ip);
                }
            }
            DpOp::SetFdb { nid, mac, vtep } => {
                let sb = self.sandbox(nid, "set fdb entry")?;
                // One destination per MAC, as `bridge fdb replace` leaves it.
                sb.fdb.retain(|(m, _)| m != mac);
                sb.fdb.insert((*mac, *vtep));
            }
            DpOp::DelFdb { nid, mac, vtep } => {
                if let Some(sb) = self.sandboxes.get_mut(nid) {
                    sb.fdb.remove(&(*mac, *vtep));
                }
            }
            DpOp::SyncPeers { nid, neighbours, fdb } => {
                let sb = self.sandbox(nid, "sync peers")?;
                sb.neighbours = neighbours.iter().copied().collect();
                sb.fdb = fdb.iter().copied().collect();
            }
            DpOp::PruneSandboxes { keep } => self.sandboxes.retain(|nid, _| keep.contains(nid)),
        }
        Ok(())
    }

    fn read(&mut self, nid: &str) -> Result<KernelView, DpError> {
        Ok(match self.sandboxes.get(nid) {
            None => KernelView::default(),
            Some(sb) => KernelView {
                sandbox: true,
                vni: sb.spec.as_ref().map(|s| s.vni),
                port: sb.spec.as_ref().map(|s| s.port),
                mtu: Some(sb.mtu),
                endpoints: sb.endpoints.keys().cloned().collect(),
                neighbours: sb.neighbours.iter().map(|(i, m)| (*i, *m)).collect(),
                fdb: sb.fdb.iter().copied().collect(),
            },
        })
    }
}

/// A network or endpoint id as people see it: its first 12 characters.
pub fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

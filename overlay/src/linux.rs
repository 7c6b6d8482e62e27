//! The Linux data plane: programs the overlay through netlink (`rtnetlink`).
//!
//! Per network, a network namespace bind-mounted at `<run dir>/netns/<network id, 12 chars>`
//! holds a bridge `br0` (with the gateway address) and a VXLAN device `vxlan0` (the network's
//! VNI and UDP port, learning off, proxy on). The VXLAN device is created in the agent's own
//! namespace, so its UDP socket lives on the underlay, and then moved in. Each endpoint is a
//! veth pair: `ve<endpoint id, 12 chars>` on the bridge, the other end moved into the
//! endpoint's sandbox and named `eth<N>`. Each remote peer is a permanent neighbour entry and a
//! permanent `self` FDB entry on `vxlan0`, written with replace semantics.
//!
//! Namespaces are entered with `setns` on the calling thread: a `LinuxDataplane` must be built
//! and used on one thread of its own (the agent runs it on a dedicated thread).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use futures_util::TryStreamExt;
use nix::sched::{CloneFlags, setns, unshare};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth, LinkVxlan};

use crate::dataplane::{
    DEFAULT_UNDERLAY_MTU, Dataplane, DpError, DpOp, EpSpec, KernelView, NetSpec, VXLAN_OVERHEAD, short,
};
use crate::driver::VXLAN_PORT_OPTION;
use crate::mac::Mac;

const BRIDGE: &str = "br0";

/// The name a network's VXLAN device has in the agent's namespace, between being made and
/// being moved into the sandbox (libnetwork's naming too): `vx-<VNI, 6 hex digits>-<tag>`. With
/// an empty tag, the prefix every such device of `vni` starts with.
fn vxlan_name(vni: u32, tag: &str) -> String {
    format!("vx-{vni:06x}-{tag}")
}
const VXLAN: &str = "vxlan0";

/// A network's sandbox as this data plane holds it.
#[derive(Debug)]
struct Sandbox {
    /// Held open while the data plane works in it.
    _ns: File,
    handle: Handle,
    mtu: u32,
}

/// The Linux data plane of one agent. Build it on the thread that will use it.
#[derive(Debug)]
pub struct LinuxDataplane {
    rt: tokio::runtime::Runtime,
    netns_dir: PathBuf,
    /// The agent's own network namespace (where VXLAN devices are created).
    host_ns: File,
    host: Handle,
    vtep: IpAddr,
    sandboxes: BTreeMap<String, Sandbox>,
}

fn errno_of(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

/// One line: the object and the call, and why the kernel refused.
fn nl(what: impl Into<String>, e: rtnetlink::Error) -> DpError {
    let why = match errno_of(&e) {
        Some(libc_eperm) if libc_eperm == nix::errno::Errno::EPERM as i32 => {
            "operation not permitted: the agent needs CAP_NET_ADMIN and CAP_SYS_ADMIN (run it as root, or with --dataplane none)".to_string()
        }
        Some(n) => std::io::Error::from_raw_os_error(n).to_string(),
        None => e.to_string(),
    };
    DpError::new(what, why)
}

fn sys(what: impl Into<String>, e: nix::errno::Errno) -> DpError {
    let why = if e == nix::errno::Errno::EPERM {
        "operation not permitted: the agent needs CAP_SYS_ADMIN and CAP_NET_ADMIN (run it as root, or with --dataplane none)".to_string()
    } else {
        e.desc().to_string()
    };
    DpError::new(what, why)
}

fn io(what: impl Into<String>, e: std::io::Error) -> DpError {
    DpError::new(what, e.to_string())
}

fn name_of(l: &LinkMessage) -> Option<&str> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

fn mtu_of(l: &LinkMessage) -> Option<u32> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    })
}

fn controller_of(l: &LinkMessage) -> Option<u32> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Controller(m) => Some(*m),
        _ => None,
    })
}

fn mac_of(l: &LinkMessage) -> Option<Mac> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(b) if b.len() == 6 => Some(Mac([b[0], b[1], b[2], b[3], b[4], b[5]])),
        _ => None,
    })
}

/// The local (source) address of a VXLAN device.
fn vxlan_local(l: &LinkMessage) -> Option<Ipv4Addr> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Data(InfoData::Vxlan(d)) => d.iter().find_map(|x| match x {
                InfoVxlan::Local(v) => Some(*v),
                _ => None,
            }),
            _ => None,
        }),
        _ => None,
    })
}

/// The VNI and port of a VXLAN device.
fn vxlan_of(l: &LinkMessage) -> Option<(u32, u16)> {
    let infos = l.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(i) => Some(i),
        _ => None,
    })?;
    if !infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Vxlan))) {
        return None;
    }
    let data = infos.iter().find_map(|i| match i {
        LinkInfo::Data(InfoData::Vxlan(d)) => Some(d),
        _ => None,
    })?;
    let vni = data.iter().find_map(|d| match d {
        InfoVxlan::Id(v) => Some(*v),
        _ => None,
    })?;
    let port = data
        .iter()
        .find_map(|d| match d {
            InfoVxlan::Port(p) => Some(*p),
            _ => None,
        })
        .unwrap_or(4789);
    Some((vni, port))
}

async fn links(h: &Handle) -> Result<Vec<LinkMessage>, rtnetlink::Error> {
    h.link().get().execute().try_collect().await
}

async fn link(h: &Handle, name: &str) -> Result<Option<LinkMessage>, rtnetlink::Error> {
    match h.link().get().match_name(name).execute().try_next().await {
        Ok(l) => Ok(l),
        Err(e) if errno_of(&e) == Some(nix::errno::Errno::ENODEV as i32) => Ok(None),
        Err(e) => Err(e),
    }
}

fn neigh_msg(ifindex: u32, ip: Ipv4Addr) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.ifindex = ifindex;
    m.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
    m
}

fn fdb_msg(ifindex: u32, mac: Mac, vtep: IpAddr) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Bridge;
    m.header.ifindex = ifindex;
    m.header.flags = NeighbourFlags::Own;
    m.header.state = NeighbourState::Permanent;
    m.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
    m.attributes.push(NeighbourAttribute::Destination(match vtep {
        IpAddr::V4(v) => NeighbourAddress::Inet(v),
        IpAddr::V6(v) => NeighbourAddress::Inet6(v),
    }));
    m
}

/// Ignores "not there" (a delete of what is already gone).
fn gone_ok(r: Result<(), rtnetlink::Error>) -> Result<(), rtnetlink::Error> {
    match r {
        Err(e) if matches!(errno_of(&e), Some(n) if n == nix::errno::Errno::ENOENT as i32 || n == nix::errno::Errno::ENODEV as i32) => {
            Ok(())
        }
        r => r,
    }
}

/// Peers a sandbox's VXLAN device holds: permanent neighbours, and `self` FDB entries with a
/// destination.
async fn read_peers(
    h: &Handle,
    vx: u32,
) -> Result<(Vec<(Ipv4Addr, Mac)>, Vec<(Mac, IpAddr)>), rtnetlink::Error> {
    let mut neigh = Vec::new();
    let ns: Vec<NeighbourMessage> =
        h.neighbours().get().set_address_family(AddressFamily::Inet).execute().try_collect().await?;
    for m in ns {
        if m.header.ifindex != vx || m.header.state != NeighbourState::Permanent {
            continue;
        }
        let ip = m.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) => Some(*v),
            _ => None,
        });
        let mac = m.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::LinkLayerAddress(b) if b.len() == 6 => {
                Some(Mac([b[0], b[1], b[2], b[3], b[4], b[5]]))
            }
            _ => None,
        });
        if let (Some(ip), Some(mac)) = (ip, mac) {
            neigh.push((ip, mac));
        }
    }
    let mut fdb = Vec::new();
    let fs: Vec<NeighbourMessage> =
        h.neighbours().get().set_address_family(AddressFamily::Bridge).execute().try_collect().await?;
    for m in fs {
        if m.header.ifindex != vx {
            continue;
        }
        let mac = m.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::LinkLayerAddress(b) if b.len() == 6 => {
                Some(Mac([b[0], b[1], b[2], b[3], b[4], b[5]]))
            }
            _ => None,
        });
        // (For a bridge FDB entry the destination's family is known by its length only.)
        let dst = m.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) => Some(IpAddr::V4(*v)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v)) => Some(IpAddr::V6(*v)),
            NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => match b.len() {
                4 => Some(IpAddr::from(<[u8; 4]>::try_from(b.as_slice()).ok()?)),
                16 => Some(IpAddr::from(<[u8; 16]>::try_from(b.as_slice()).ok()?)),
                _ => None,
            },
            _ => None,
        });
        if let (Some(mac), Some(dst)) = (mac, dst) {
            fdb.push((mac, dst));
        }
    }
    neigh.sort();
    fdb.sort();
    Ok((neigh, fdb))
}

impl LinuxDataplane {
    /// A data plane keeping its namespaces under `run_dir/netns`, whose VXLAN devices send from
    /// `vtep`. Fails in one line without the privileges to work.
    pub fn new(run_dir: &Path, vtep: IpAddr) -> Result<Self, DpError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| io("start the data plane's netlink runtime", e))?;
        let netns_dir = run_dir.join("netns");
        std::fs::create_dir_all(&netns_dir).map_err(|e| io(format!("create {}", netns_dir.display()), e))?;
        let host_ns =
            File::open("/proc/thread-self/ns/net").map_err(|e| io("open /proc/thread-self/ns/net", e))?;
        let host = {
            let _g = rt.enter();
            let (conn, handle, _) =
                rtnetlink::new_connection().map_err(|e| io("open a netlink socket", e))?;
            rt.spawn(conn);
            handle
        };
        let dp = LinuxDataplane { rt, netns_dir, host_ns, host, vtep, sandboxes: BTreeMap::new() };
        // Creating a namespace needs CAP_SYS_ADMIN: find out now rather than at the first
        // endpoint.
        let probe = dp.netns_dir.join(format!(".probe-{}", std::process::id()));
        let r = dp.create_ns(&probe);
        let _ = nix::mount::umount2(&probe, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_file(&probe);
        r?;
        Ok(dp)
    }

    fn ns_path(&self, nid: &str) -> PathBuf {
        self.netns_dir.join(short(nid))
    }

    /// Makes a new network namespace and bind-mounts it at `path`.
    fn create_ns(&self, path: &Path) -> Result<(), DpError> {
        let what = format!("create network namespace {}", path.display());
        File::create(path).map_err(|e| io(&what, e))?;
        unshare(CloneFlags::CLONE_NEWNET).map_err(|e| sys(&what, e))?;
        let r = nix::mount::mount(
            Some("/proc/thread-self/ns/net"),
            path,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        );
        let back = setns(&self.host_ns, CloneFlags::CLONE_NEWNET);
        if let Err(e) = back {
            // This thread is stranded in the new namespace: nothing it does from now is right.
            panic!("cannot return to the agent's network namespace: {e}");
        }
        r.map_err(|e| sys(&what, e))
    }

    /// Opens a namespace file, checking it is one.
    fn open_ns(path: &Path) -> Result<File, DpError> {
        let f = File::open(path).map_err(|e| io(format!("open sandbox {}", path.display()), e))?;
        match nix::sys::statfs::fstatfs(&f) {
            Ok(s) if s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC => Ok(f),
            Ok(_) => Err(DpError::new(
                format!("open sandbox {}", path.display()),
                "not a network namespace (give a file like /run/netns/NAME or /proc/PID/ns/net)",
            )),
            Err(e) => Err(sys(format!("open sandbox {}", path.display()), e)),
        }
    }

    /// A netlink handle working inside the namespace `ns`.
    fn connect(&self, ns: &File) -> Result<Handle, DpError> {
        setns(ns, CloneFlags::CLONE_NEWNET).map_err(|e| sys("enter a network namespace", e))?;
        let made = {
            let _g = self.rt.enter();
            rtnetlink::new_connection()
        };
        if let Err(e) = setns(&self.host_ns, CloneFlags::CLONE_NEWNET) {
            panic!("cannot return to the agent's network namespace: {e}");
        }
        let (conn, handle, _) = made.map_err(|e| io("open a netlink socket in a namespace", e))?;
        self.rt.spawn(conn);
        Ok(handle)
    }

    /// The underlay: the device holding the VTEP address, and its MTU.
    fn underlay(&self) -> (Option<u32>, u32) {
        let h = self.host.clone();
        let vtep = self.vtep;
        self.rt.block_on(async move {
            let addrs: Vec<_> = match h.address().get().set_address_filter(vtep).execute().try_collect().await
            {
                Ok(a) => a,
                Err(_) => return (None, DEFAULT_UNDERLAY_MTU),
            };
            let Some(idx) = addrs
                .iter()
                .find(|a| {
                    a.attributes.iter().any(|x| matches!(x, AddressAttribute::Address(ip) if *ip == vtep))
                })
                .map(|a| a.header.index)
            else {
                return (None, DEFAULT_UNDERLAY_MTU);
            };
            match h.link().get().match_index(idx).execute().try_next().await {
                Ok(Some(l)) => (Some(idx), mtu_of(&l).unwrap_or(DEFAULT_UNDERLAY_MTU)),
                _ => (Some(idx), DEFAULT_UNDERLAY_MTU),
            }
        })
    }

    /// Makes room for the network's VXLAN device in the agent's namespace, where the kernel
    /// refuses a second device holding `vni` on `port` ("file exists", libnetwork #1765). A
    /// device named as weft and libnetwork name one before moving it into a sandbox
    /// (`vx-<VNI, 6 hex digits>-...`) is a previous life's, left by a crash between making and
    /// moving it, and is deleted. Anyone else's (Calico's `vxlan.calico` holds VNI 4096 on
    /// 4789, the first VNI weft hands out) is left alone and the sandbox refused, naming it. A
    /// device with the VNI on another port does not conflict and stays.
    fn remove_strays(&self, nid: &str, vni: u32, port: u16) -> Result<(), DpError> {
        let h = self.host.clone();
        let ours = vxlan_name(vni, "");
        self.rt.block_on(async move {
            for l in links(&h).await.map_err(|e| nl("list the host's links", e))? {
                if vxlan_of(&l) != Some((vni, port)) {
                    continue;
                }
                let name = name_of(&l).unwrap_or("?").to_string();
                if !name.starts_with(&ours) {
                    return Err(DpError::new(
                        format!("network {}: create its VXLAN device", short(nid)),
                        format!(
                            "device {name} (not weft's) already holds VNI {vni} on UDP port {port}; \
                             remove it, or recreate the network with another port (-o {VXLAN_PORT_OPTION}=N)"
                        ),
                    ));
                }
                tracing::warn!(network = %short(nid), device = %name, vni, "removing a VXLAN device a previous life left holding the network's VNI");
                gone_ok(h.link().del(l.header.index).execute().await)
                    .map_err(|e| nl(format!("delete stray VXLAN device {name} (VNI {vni})"), e))?;
            }
            Ok(())
        })
    }

    fn ensure_sandbox(&mut self, spec: &NetSpec) -> Result<(), DpError> {
        let nid = spec.nid.as_str();
        let path = self.ns_path(nid);
        let what = |call: &str| format!("network {}: {call}", short(nid));
        let ns = match Self::open_ns(&path) {
            Ok(f) => f,
            Err(_) => {
                let _ = nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH);
                let _ = std::fs::remove_file(&path);
                self.sandboxes.remove(nid);
                self.create_ns(&path)?;
                Self::open_ns(&path)?
            }
        };
        let handle = match self.sandboxes.remove(nid) {
            Some(sb) => sb.handle,
            None => self.connect(&ns)?,
        };
        let (underlay_idx, underlay_mtu) = self.underlay();
        let mtu = spec.mtu.unwrap_or(underlay_mtu.saturating_sub(VXLAN_OVERHEAD));
        let h = handle.clone();
        let gateway = spec.gateway;
        // The bridge, with the gateway.
        let br = self.rt.block_on(async {
            let br = match link(&h, BRIDGE).await.map_err(|e| nl(what("look up br0"), e))? {
                Some(l) => l.header.index,
                None => {
                    h.link()
                        .add(LinkBridge::new(BRIDGE).mtu(mtu).build())
                        .execute()
                        .await
                        .map_err(|e| nl(what("create bridge br0"), e))?;
                    link(&h, BRIDGE)
                        .await
                        .map_err(|e| nl(what("look up br0"), e))?
                        .map(|l| l.header.index)
                        .ok_or_else(|| DpError::new(what("create bridge br0"), "it vanished"))?
                }
            };
            h.link()
                .set(LinkUnspec::new_with_index(br).mtu(mtu).up().build())
                .execute()
                .await
                .map_err(|e| nl(what(&format!("set br0 mtu {mtu} up")), e))?;
            if let Some(gw) = gateway {
                let have: Vec<_> = h
                    .address()
                    .get()
                    .set_link_index_filter(br)
                    .execute()
                    .try_collect()
                    .await
                    .map_err(|e| nl(what("list br0's addresses"), e))?;
                let present = have.iter().any(|a| {
                    a.attributes
                        .iter()
                        .any(|x| matches!(x, AddressAttribute::Address(IpAddr::V4(ip)) if *ip == gw.addr()))
                });
                if !present {
                    gone_ok(h.address().add(br, IpAddr::V4(gw.addr()), gw.prefix_len()).execute().await)
                        .map_err(|e| nl(what(&format!("add address {gw} to br0")), e))?;
                }
            }
            Ok::<u32, DpError>(br)
        })?;
        // The VXLAN device: kept if it is the network's, else made anew.
        let current = self.rt.block_on(link(&h, VXLAN)).map_err(|e| nl(what("look up vxlan0"), e))?;
        let want_local = match self.vtep {
            IpAddr::V4(v) => Some(v),
            IpAddr::V6(_) => None,
        };
        let keep = current
            .as_ref()
            .is_some_and(|l| vxlan_of(l) == Some((spec.vni, spec.port)) && vxlan_local(l) == want_local);
        if let Some(l) = current.filter(|_| !keep) {
            self.rt
                .block_on(async { gone_ok(h.link().del(l.header.index).execute().await) })
                .map_err(|e| nl(what("delete the old vxlan0"), e))?;
        }
        if !keep {
            self.remove_strays(nid, spec.vni, spec.port)?;
            let name = vxlan_name(spec.vni, nid.get(..5).unwrap_or("net"));
            let create = what(&format!(
                "create VXLAN device {name} (VNI {}, UDP port {}, MTU {mtu})",
                spec.vni, spec.port
            ));
            let host = self.host.clone();
            let vtep = self.vtep;
            let ns_fd = ns.as_raw_fd();
            let made = self.rt.block_on(async {
                if let Some(l) = link(&host, &name).await.map_err(|e| nl(&create, e))? {
                    gone_ok(host.link().del(l.header.index).execute().await).map_err(|e| nl(&create, e))?;
                }
                let mut b =
                    LinkVxlan::new(&name, spec.vni).port(spec.port).learning(false).proxy(true).mtu(mtu);
                if let IpAddr::V4(v4) = vtep {
                    b = b.local(v4);
                }
                if let Some(dev) = underlay_idx {
                    b = b.dev(dev);
                }
                host.link().add(b.build()).execute().await.map_err(|e| nl(&create, e))?;
                let idx = link(&host, &name)
                    .await
                    .map_err(|e| nl(&create, e))?
                    .map(|l| l.header.index)
                    .ok_or_else(|| DpError::new(&create, "it vanished"))?;
                host.link()
                    .set(LinkUnspec::new_with_index(idx).setns_by_fd(ns_fd).build())
                    .execute()
                    .await
                    .map_err(|e| nl(what(&format!("move {name} into the network's namespace")), e))?;
                let idx = link(&h, &name)
                    .await
                    .map_err(|e| nl(&create, e))?
                    .map(|l| l.header.index)
                    .ok_or_else(|| DpError::new(&create, "it vanished after the move"))?;
                h.link()
                    .set(LinkUnspec::new_with_index(idx).name(VXLAN.to_string()).build())
                    .execute()
                    .await
                    .map_err(|e| nl(what(&format!("rename {name} to vxlan0")), e))?;
                Ok::<(), DpError>(())
            });
            made?;
        }
        let port = spec.port;
        self.rt.block_on(async {
            let vx = link(&h, VXLAN)
                .await
                .map_err(|e| nl(what("look up vxlan0"), e))?
                .ok_or_else(|| DpError::new(what("look up vxlan0"), "missing"))?;
            h.link()
                .set(LinkUnspec::new_with_index(vx.header.index).controller(br).mtu(mtu).build())
                .execute()
                .await
                .map_err(|e| nl(what(&format!("set vxlan0 mtu {mtu}, on br0")), e))?;
            h.link()
                .set(LinkUnspec::new_with_index(vx.header.index).up().build())
                .execute()
                .await
                .map_err(|e| nl(what(&format!("set vxlan0 up (UDP port {port})")), e))
        })?;
        self.sandboxes.insert(nid.to_string(), Sandbox { _ns: ns, handle, mtu });
        Ok(())
    }

    /// The sandbox of a network, opened again if this data plane has not got it yet (a
    /// restarted agent's operations on a sandbox its previous life made).
    fn sandbox(&mut self, nid: &str, call: &str) -> Result<&Sandbox, DpError> {
        if !self.sandboxes.contains_key(nid) {
            let path = self.ns_path(nid);
            let ns = Self::open_ns(&path).map_err(|_| {
                DpError::new(
                    format!("network {}: {call}", short(nid)),
                    "the network has no sandbox on this host",
                )
            })?;
            let handle = self.connect(&ns)?;
            let mtu = self
                .rt
                .block_on(link(&handle, VXLAN))
                .ok()
                .flatten()
                .and_then(|l| mtu_of(&l))
                .unwrap_or(DEFAULT_UNDERLAY_MTU - VXLAN_OVERHEAD);
            self.sandboxes.insert(nid.to_string(), Sandbox { _ns: ns, handle, mtu });
        }
        Ok(&self.sandboxes[nid])
    }

    fn vxlan_index(&mut self, nid: &str, call: &str) -> Result<(Handle, u32), DpError> {
        let h = self.sandbox(nid, call)?.handle.clone();
        let vx = self
            .rt
            .block_on(link(&h, VXLAN))
            .map_err(|e| nl(format!("network {}: {call}", short(nid)), e))?
            .ok_or_else(|| {
                DpError::new(format!("network {}: {call}", short(nid)), "the sandbox has no vxlan0")
            })?;
        Ok((h, vx.header.index))
    }

    fn remove_sandbox(&mut self, nid_or_short: &str) -> Result<(), DpError> {
        let path = self.ns_path(nid_or_short);
        let what = format!("network {}: remove sandbox", short(nid_or_short));
        let handle = match self.sandboxes.remove(nid_or_short) {
            Some(sb) => Some(sb.handle),
            None => match Self::open_ns(&path) {
                Ok(ns) => Some(self.connect(&ns)?),
                Err(_) => None,
            },
        };
        if let Some(h) = handle {
            // Every device goes first: endpoints' veth pairs (their other ends with them) and
            // the VXLAN device, whose socket would otherwise hold the port.
            self.rt.block_on(async {
                for l in links(&h).await.map_err(|e| nl(&what, e))? {
                    if name_of(&l) != Some("lo") {
                        gone_ok(h.link().del(l.header.index).execute().await).map_err(|e| nl(&what, e))?;
                    }
                }
                Ok::<(), DpError>(())
            })?;
        }
        match nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => return Err(sys(&what, e)),
        }
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&what, e)),
            _ => Ok(()),
        }
    }

    fn add_endpoint(&mut self, ep: &EpSpec) -> Result<(), DpError> {
        let what = |call: &str| format!("endpoint {}: {call}", short(&ep.eid));
        let sb = self.sandbox(&ep.nid, "add endpoint interface")?;
        let (h, mtu) = (sb.handle.clone(), sb.mtu);
        let container_ns = Self::open_ns(&ep.sandbox)
            .map_err(|e| DpError::new(what(&format!("open sandbox {}", ep.sandbox.display())), e.why))?;
        let c = self.connect(&container_ns)?;
        let host_if = format!("ve{}", short(&ep.eid));
        let tmp_if = format!("vp{}", short(&ep.eid));
        let (mac, addr, prefix) = (ep.mac, ep.addr, ep.ifname_prefix.clone());
        let fd = container_ns.as_raw_fd();
        self.rt.block_on(async move {
            let br = link(&h, BRIDGE)
                .await
                .map_err(|e| nl(what("look up br0"), e))?
                .ok_or_else(|| DpError::new(what("look up br0"), "the network's sandbox has no bridge"))?
                .header
                .index;
            if let Some(l) = link(&h, &host_if).await.map_err(|e| nl(what("look up its veth"), e))? {
                // Kept from a previous life if its other end is still in the sandbox.
                let there = links(&c)
                    .await
                    .map_err(|e| nl(what("list the sandbox's links"), e))?
                    .iter()
                    .any(|x| mac_of(x) == Some(mac));
                if there && controller_of(&l) == Some(br) {
                    return Ok(());
                }
                gone_ok(h.link().del(l.header.index).execute().await)
                    .map_err(|e| nl(what(&format!("delete stale {host_if}")), e))?;
            }
            if let Some(l) = link(&h, &tmp_if).await.map_err(|e| nl(what("look up its veth"), e))? {
                gone_ok(h.link().del(l.header.index).execute().await)
                    .map_err(|e| nl(what(&format!("delete stale {tmp_if}")), e))?;
            }
            h.link()
                .add(LinkVeth::new(&host_if, &tmp_if).mtu(mtu).build())
                .execute()
                .await
                .map_err(|e| nl(what(&format!("create veth pair {host_if}/{tmp_if}")), e))?;
            let hi = link(&h, &host_if)
                .await
                .map_err(|e| nl(what("look up its veth"), e))?
                .ok_or_else(|| DpError::new(what("create veth"), "it vanished"))?
                .header
                .index;
            h.link()
                .set(LinkUnspec::new_with_index(hi).controller(br).mtu(mtu).up().build())
                .execute()
                .await
                .map_err(|e| nl(what(&format!("attach {host_if} to br0")), e))?;
            let ti = link(&h, &tmp_if)
                .await
                .map_err(|e| nl(what("look up its veth"), e))?
                .ok_or_else(|| DpError::new(what("create veth"), "its peer vanished"))?
                .header
                .index;
            h.link()
                .set(LinkUnspec::new_with_index(ti).setns_by_fd(fd).build())
                .execute()
                .await
                .map_err(|e| nl(what("move its interface into the sandbox"), e))?;
            let existing: BTreeSet<String> = links(&c)
                .await
                .map_err(|e| nl(what("list the sandbox's links"), e))?
                .iter()
                .filter_map(|l| name_of(l).map(str::to_string))
                .collect();
            let name =
                (0..).map(|i| format!("{prefix}{i}")).find(|n| !existing.contains(n)).expect("a free name");
            let ci = link(&c, &tmp_if)
                .await
                .map_err(|e| nl(what("look up its interface in the sandbox"), e))?
                .ok_or_else(|| DpError::new(what("move its interface"), "it vanished"))?
                .header
                .index;
            c.link()
                .set(
                    LinkUnspec::new_with_index(ci)
                        .name(name.clone())
                        .address(mac.0.to_vec())
                        .mtu(mtu)
                        .build(),
                )
                .execute()
                .await
                .map_err(|e| nl(what(&format!("name it {name}, MAC {mac}, MTU {mtu}")), e))?;
            c.address()
                .add(ci, IpAddr::V4(addr.addr()), addr.prefix_len())
                .execute()
                .await
                .map_err(|e| nl(what(&format!("add address {addr} to {name}")), e))?;
            c.link()
                .set(LinkUnspec::new_with_index(ci).up().build())
                .execute()
                .await
                .map_err(|e| nl(what(&format!("set {name} up")), e))?;
            Ok(())
        })
    }

    fn remove_endpoint(&mut self, nid: &str, eid: &str) -> Result<(), DpError> {
        let Ok(sb) = self.sandbox(nid, "remove endpoint interface") else { return Ok(()) };
        let h = sb.handle.clone();
        let host_if = format!("ve{}", short(eid));
        self.rt.block_on(async {
            if let Some(l) = link(&h, &host_if)
                .await
                .map_err(|e| nl(format!("endpoint {}: look up {host_if}", short(eid)), e))?
            {
                gone_ok(h.link().del(l.header.index).execute().await)
                    .map_err(|e| nl(format!("endpoint {}: delete {host_if}", short(eid)), e))?;
            }
            Ok(())
        })
    }

    fn sync_peers(
        &mut self,
        nid: &str,
        want_n: &[(Ipv4Addr, Mac)],
        want_f: &[(Mac, IpAddr)],
    ) -> Result<(), DpError> {
        let (h, vx) = self.vxlan_index(nid, "sync peers")?;
        let what = format!("network {}: sync peers", short(nid));
        // (Sets: a sandbox may hold thousands of peers.)
        let want_n: BTreeSet<(Ipv4Addr, Mac)> = want_n.iter().copied().collect();
        let want_f: BTreeSet<(Mac, IpAddr)> = want_f.iter().copied().collect();
        self.rt.block_on(async {
            let (have_n, have_f) = read_peers(&h, vx).await.map_err(|e| nl(&what, e))?;
            let have_n: BTreeSet<(Ipv4Addr, Mac)> = have_n.into_iter().collect();
            let have_f: BTreeSet<(Mac, IpAddr)> = have_f.into_iter().collect();
            for (ip, mac) in &have_n {
                if !want_n.contains(&(*ip, *mac)) {
                    gone_ok(h.neighbours().del(neigh_msg(vx, *ip)).execute().await)
                        .map_err(|e| nl(format!("{what}: delete neighbour {ip}"), e))?;
                }
            }
            for (mac, vtep) in &have_f {
                if !want_f.contains(&(*mac, *vtep)) {
                    gone_ok(h.neighbours().del(fdb_msg(vx, *mac, *vtep)).execute().await)
                        .map_err(|e| nl(format!("{what}: delete fdb {mac} dst {vtep}"), e))?;
                }
            }
            for (mac, vtep) in &want_f {
                if !have_f.contains(&(*mac, *vtep)) {
                    set_fdb(&h, vx, *mac, *vtep)
                        .await
                        .map_err(|e| nl(format!("{what}: fdb {mac} dst {vtep}"), e))?;
                }
            }
            for (ip, mac) in &want_n {
                if !have_n.contains(&(*ip, *mac)) {
                    set_neigh(&h, vx, *ip, *mac)
                        .await
                        .map_err(|e| nl(format!("{what}: neighbour {ip} lladdr {mac}"), e))?;
                }
            }
            Ok(())
        })
    }

    fn prune(&mut self, keep: &[String]) -> Result<(), DpError> {
        let keep: BTreeSet<&str> = keep.iter().map(|k| short(k)).collect();
        let entries = std::fs::read_dir(&self.netns_dir)
            .map_err(|e| io(format!("list {}", self.netns_dir.display()), e))?;
        let mut first_error = None;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || keep.contains(name.as_str()) {
                continue;
            }
            tracing::info!(sandbox = %name, "removing a sandbox no network here needs (left by a previous life)");
            let full: Option<String> = self.sandboxes.keys().find(|k| short(k) == name).cloned();
            // One that cannot go does not keep the others.
            if let Err(e) = self.remove_sandbox(full.as_deref().unwrap_or(&name)) {
                tracing::warn!(sandbox = %name, error = %e, "cannot remove a leftover sandbox");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

async fn set_neigh(h: &Handle, vx: u32, ip: Ipv4Addr, mac: Mac) -> Result<(), rtnetlink::Error> {
    h.neighbours()
        .add(vx, IpAddr::V4(ip))
        .link_layer_address(&mac.0)
        .state(NeighbourState::Permanent)
        .replace()
        .execute()
        .await
}

async fn set_fdb(h: &Handle, vx: u32, mac: Mac, vtep: IpAddr) -> Result<(), rtnetlink::Error> {
    h.neighbours()
        .add_bridge(vx, &mac.0)
        .flags(NeighbourFlags::Own)
        .state(NeighbourState::Permanent)
        .destination(vtep)
        .replace()
        .execute()
        .await
}

impl Dataplane for LinuxDataplane {
    fn apply(&mut self, op: &DpOp) -> Result<(), DpError> {
        match op {
            DpOp::EnsureSandbox(spec) => self.ensure_sandbox(spec),
            DpOp::RemoveSandbox { nid } => self.remove_sandbox(nid),
            DpOp::AddEndpoint(ep) => self.add_endpoint(ep),
            DpOp::RemoveEndpoint { nid, eid } => self.remove_endpoint(nid, eid),
            DpOp::SetNeighbour { nid, ip, mac } => {
                let (h, vx) = self.vxlan_index(nid, "set neighbour")?;
                self.rt.block_on(set_neigh(&h, vx, *ip, *mac)).map_err(|e| {
                    nl(format!("network {}: neighbour {ip} lladdr {mac} dev vxlan0", short(nid)), e)
                })
            }
            DpOp::DelNeighbour { nid, ip, .. } => {
                let Ok((h, vx)) = self.vxlan_index(nid, "delete neighbour") else { return Ok(()) };
                self.rt
                    .block_on(async { gone_ok(h.neighbours().del(neigh_msg(vx, *ip)).execute().await) })
                    .map_err(|e| nl(format!("network {}: delete neighbour {ip}", short(nid)), e))
            }
            DpOp::SetFdb { nid, mac, vtep } => {
                let (h, vx) = self.vxlan_index(nid, "set fdb entry")?;
                self.rt
                    .block_on(set_fdb(&h, vx, *mac, *vtep))
                    .map_err(|e| nl(format!("network {}: fdb {mac} dev vxlan0 dst {vtep}", short(nid)), e))
            }
            DpOp::DelFdb { nid, mac, vtep } => {
                let Ok((h, vx)) = self.vxlan_index(nid, "delete fdb entry") else { return Ok(()) };
                self.rt
                    .block_on(async { gone_ok(h.neighbours().del(fdb_msg(vx, *mac, *vtep)).execute().await) })
                    .map_err(|e| nl(format!("network {}: delete fdb {mac} dst {vtep}", short(nid)), e))
            }
            DpOp::SyncPeers { nid, neighbours, fdb } => self.sync_peers(nid, neighbours, fdb),
            DpOp::PruneSandboxes { keep } => self.prune(keep),
        }
    }

    fn read(&mut self, nid: &str) -> Result<KernelView, DpError> {
        if !self.sandboxes.contains_key(nid) && Self::open_ns(&self.ns_path(nid)).is_err() {
            return Ok(KernelView::default());
        }
        let (h, vx) = self.vxlan_index(nid, "read")?;
        let what = format!("network {}: read the sandbox", short(nid));
        self.rt.block_on(async {
            let all = links(&h).await.map_err(|e| nl(&what, e))?;
            let vxl = all.iter().find(|l| l.header.index == vx);
            let br = all.iter().find(|l| name_of(l) == Some(BRIDGE)).map(|l| l.header.index);
            let endpoints = all
                .iter()
                .filter(|l| br.is_some() && controller_of(l) == br)
                .filter_map(|l| name_of(l).and_then(|n| n.strip_prefix("ve")).map(str::to_string))
                .collect();
            let (neighbours, fdb) = read_peers(&h, vx).await.map_err(|e| nl(&what, e))?;
            Ok(KernelView {
                sandbox: true,
                vni: vxl.and_then(vxlan_of).map(|v| v.0),
                port: vxl.and_then(vxlan_of).map(|v| v.1),
                mtu: vxl.and_then(mtu_of),
                endpoints,
                neighbours,
                fdb,
            })
        })
    }
}

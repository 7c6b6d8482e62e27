//! The default IPAM: Docker's built-in allocator, behaving as people expect it to.
//!
//! * Predefined pools: local 172.17.0.0/16 … 172.31.0.0/16 as /16s and 192.168.0.0/16 as /20s;
//!   global 10.0.0.0/8 as /24s. An empty request takes the first free one; `0.0.0.0/N` takes the
//!   first free predefined range of size N.
//! * Static pools may not overlap; sub-pools lie inside their pool; a pool created implicitly by
//!   a sub-pool request goes with its last sub-pool.
//! * Network and broadcast addresses (IPv4) and the subnet-router anycast address (IPv6) are
//!   never handed out, except in /31, /32, /127 and /128. Without a preference the lowest free
//!   address goes out (so the gateway gets .1); with `com.docker.network.ipam.serial=true`
//!   allocation continues after the last address handed out.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::bitmap::Bitmap;
use crate::contract::{
    AllocatedPool, GLOBAL_DEFAULT, Ipam, IpamError, LOCAL_DEFAULT, OPT_SERIAL, Options, PoolId, PoolRequest,
};
use crate::net::{addr_at, net_size, offset_of, reserved_offsets};

/// A predefined range and the size of the pools cut from it (Docker's `base`/`size`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Predefined {
    pub base: IpNet,
    pub size: u8,
}

/// The predefined pools of each default address space.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DefaultIpamConfig {
    pub local: Vec<Predefined>,
    pub global: Vec<Predefined>,
}

impl Default for DefaultIpamConfig {
    fn default() -> Self {
        let p = |s: &str, size| Predefined { base: s.parse().expect("literal"), size };
        let mut local: Vec<Predefined> = (17..=31).map(|b| p(&format!("172.{b}.0.0/16"), 16)).collect();
        local.push(p("192.168.0.0/16", 20));
        DefaultIpamConfig { local, global: vec![p("10.0.0.0/8", 24)] }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PoolData {
    pool: IpNet,
    /// Sub-pools handed out.
    children: BTreeSet<IpNet>,
    /// Requested for itself (not only as a sub-pool's parent).
    explicit: bool,
    addrs: Bitmap,
    /// Serial allocation continues from here.
    cursor: u128,
}

impl PoolData {
    fn new(pool: IpNet, explicit: bool) -> Self {
        let size = net_size(&pool);
        let mut addrs = Bitmap::new(size);
        for i in reserved_offsets(&pool) {
            addrs.set(i);
        }
        PoolData { pool, children: BTreeSet::new(), explicit, addrs, cursor: 0 }
    }
}

/// The built-in default IPAM. Serializable, so its caller can persist it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DefaultIpam {
    cfg: DefaultIpamConfig,
    spaces: BTreeMap<String, BTreeMap<IpNet, PoolData>>,
}

impl Default for DefaultIpam {
    fn default() -> Self {
        DefaultIpam::new(DefaultIpamConfig::default())
    }
}

impl DefaultIpam {
    pub fn new(cfg: DefaultIpamConfig) -> Self {
        let spaces =
            [LOCAL_DEFAULT, GLOBAL_DEFAULT].iter().map(|s| (s.to_string(), BTreeMap::new())).collect();
        DefaultIpam { cfg, spaces }
    }

    fn predefined(&self, space: &str) -> &[Predefined] {
        if space == GLOBAL_DEFAULT { &self.cfg.global } else { &self.cfg.local }
    }

    fn space(&self, name: &str) -> Result<&BTreeMap<IpNet, PoolData>, IpamError> {
        self.spaces.get(name).ok_or_else(|| IpamError::InvalidAddressSpace(name.to_string()))
    }

    fn overlaps(pools: &BTreeMap<IpNet, PoolData>, net: &IpNet) -> Option<IpNet> {
        pools.keys().find(|p| p.contains(net) || net.contains(*p)).copied()
    }

    /// The first predefined subnet of `size` (or each range's own size) of the right family
    /// that overlaps no pool of the space and no exclusion.
    fn pick(&self, space: &str, v6: bool, size: Option<u8>, exclude: &[IpNet]) -> Result<IpNet, IpamError> {
        let pools = self.space(space)?;
        for pre in self.predefined(space) {
            if pre.base.addr().is_ipv6() != v6 {
                continue;
            }
            let len = size.unwrap_or(pre.size);
            if len < pre.base.prefix_len() || len > pre.base.max_prefix_len() {
                continue;
            }
            let step = 1u128 << (pre.base.max_prefix_len() - len);
            let count = net_size(&pre.base) / step;
            let mut i = 0u128;
            while i < count {
                let candidate =
                    IpNet::new(addr_at(&pre.base, i * step), len).expect("prefix within the family").trunc();
                let blocker = Self::overlaps(pools, &candidate).or_else(|| {
                    exclude.iter().find(|e| e.contains(&candidate) || candidate.contains(*e)).copied()
                });
                match blocker {
                    None => return Ok(candidate),
                    Some(b) => {
                        // Jump past whatever blocked this candidate.
                        let end = offset_of(&pre.base, b.broadcast()).map_or(i * step, |o| o);
                        i = (end / step + 1).max(i + 1);
                    }
                }
            }
        }
        Err(IpamError::NoMoreSubnets)
    }

    fn pool_mut(&mut self, id: &PoolId) -> Result<&mut PoolData, IpamError> {
        let pools = self
            .spaces
            .get_mut(&id.address_space)
            .ok_or_else(|| IpamError::InvalidAddressSpace(id.address_space.clone()))?;
        let data = pools.get_mut(&id.pool).ok_or_else(|| IpamError::BadPool(id.to_string()))?;
        if let Some(sub) = &id.sub_pool
            && !data.children.contains(sub)
        {
            return Err(IpamError::BadPool(id.to_string()));
        }
        Ok(data)
    }

    /// Addresses allocated in a pool (reserved ones included), for reports and tests.
    pub fn allocated(&self, id: &PoolId) -> Option<u128> {
        self.spaces.get(&id.address_space)?.get(&id.pool).map(|p| p.addrs.allocated())
    }
}

fn valid_net(n: &IpNet, err: impl Fn(String) -> IpamError) -> Result<(), IpamError> {
    if n.trunc() != *n {
        return Err(err(format!("{n} has host bits set (did you mean {}?)", n.trunc())));
    }
    if n.addr().is_ipv6() && n.prefix_len() == 0 {
        return Err(err(format!("{n} is too large")));
    }
    Ok(())
}

impl Ipam for DefaultIpam {
    fn default_address_spaces(&self) -> (String, String) {
        (LOCAL_DEFAULT.to_string(), GLOBAL_DEFAULT.to_string())
    }

    fn request_pool(&mut self, req: &PoolRequest) -> Result<AllocatedPool, IpamError> {
        let space = req.address_space.as_str();
        self.space(space)?;
        let pool = match req.pool {
            None => {
                if req.sub_pool.is_some() {
                    return Err(IpamError::InvalidSubPool("a sub-pool needs its pool".into()));
                }
                self.pick(space, req.v6, None, &req.exclude)?
            }
            Some(p) if p.addr().is_unspecified() => {
                if req.sub_pool.is_some() {
                    return Err(IpamError::InvalidSubPool("a sub-pool needs a specific pool".into()));
                }
                self.pick(space, p.addr().is_ipv6(), Some(p.prefix_len()), &req.exclude)?
            }
            Some(p) => {
                valid_net(&p, IpamError::InvalidPool)?;
                p
            }
        };
        if let Some(sub) = &req.sub_pool {
            valid_net(sub, IpamError::InvalidSubPool)?;
            if !pool.contains(sub) {
                return Err(IpamError::InvalidSubPool(format!("{sub} is not inside {pool}")));
            }
        }
        let pools = self.spaces.get_mut(space).expect("checked");
        match pools.get_mut(&pool) {
            Some(data) => match req.sub_pool {
                Some(sub) => {
                    if !data.children.insert(sub) {
                        return Err(IpamError::PoolOverlap(sub));
                    }
                }
                None if !data.explicit => data.explicit = true,
                None => return Err(IpamError::PoolOverlap(pool)),
            },
            None => {
                if let Some(other) = Self::overlaps(pools, &pool) {
                    let _ = other;
                    return Err(IpamError::PoolOverlap(pool));
                }
                let mut data = PoolData::new(pool, req.sub_pool.is_none());
                if let Some(sub) = req.sub_pool {
                    data.children.insert(sub);
                }
                pools.insert(pool, data);
            }
        }
        let id = PoolId { address_space: space.to_string(), pool, sub_pool: req.sub_pool };
        Ok(AllocatedPool { id, pool, meta: Options::new() })
    }

    fn release_pool(&mut self, id: &PoolId) -> Result<(), IpamError> {
        let data = self.pool_mut(id)?;
        match &id.sub_pool {
            Some(sub) => {
                data.children.remove(sub);
            }
            None => {
                if !data.explicit {
                    return Err(IpamError::BadPool(id.to_string()));
                }
                data.explicit = false;
            }
        }
        if data.children.is_empty() && !data.explicit {
            self.spaces.get_mut(&id.address_space).expect("found").remove(&id.pool);
        }
        Ok(())
    }

    fn request_address(
        &mut self,
        id: &PoolId,
        preferred: Option<IpAddr>,
        options: &Options,
    ) -> Result<(IpNet, Options), IpamError> {
        let data = self.pool_mut(id)?;
        let pool = data.pool;
        let (from, to) = match &id.sub_pool {
            Some(sub) => {
                let start = offset_of(&pool, sub.network()).expect("sub-pool inside pool");
                (start, start + net_size(sub))
            }
            None => (0, net_size(&pool)),
        };
        let index = match preferred {
            Some(ip) => {
                let i = offset_of(&pool, ip)
                    .filter(|i| (from..to).contains(i))
                    .ok_or(IpamError::OutOfRange(ip))?;
                if !data.addrs.set(i) {
                    return Err(IpamError::AlreadyInUse(ip));
                }
                i
            }
            None => {
                let serial = options.get(OPT_SERIAL).is_some_and(|v| v == "true");
                let found = if serial {
                    let start = data.cursor.clamp(from, to);
                    data.addrs.set_first_in(start, to).or_else(|| data.addrs.set_first_in(from, start))
                } else {
                    data.addrs.set_first_in(from, to)
                };
                found.ok_or(IpamError::NoAvailableIps)?
            }
        };
        data.cursor = index + 1;
        let addr = addr_at(&pool, index);
        Ok((IpNet::new(addr, pool.prefix_len()).expect("pool prefix"), Options::new()))
    }

    fn release_address(&mut self, id: &PoolId, addr: IpAddr) -> Result<(), IpamError> {
        let data = self.pool_mut(id)?;
        let i = offset_of(&data.pool, addr).ok_or(IpamError::OutOfRange(addr))?;
        if !reserved_offsets(&data.pool).contains(&i) {
            data.addrs.unset(i);
        }
        Ok(())
    }

    fn is_built_in(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::{OPT_REQUEST_ADDRESS_TYPE, REQUEST_GATEWAY};

    fn req(space: &str, pool: Option<&str>, sub: Option<&str>) -> PoolRequest {
        PoolRequest {
            address_space: space.into(),
            pool: pool.map(|p| p.parse().unwrap()),
            sub_pool: sub.map(|p| p.parse().unwrap()),
            ..PoolRequest::default()
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn addr(ipam: &mut DefaultIpam, id: &PoolId) -> String {
        ipam.request_address(id, None, &Options::new()).unwrap().0.to_string()
    }

    #[test]
    fn predefined_pools_come_in_docker_order() {
        let mut ipam = DefaultIpam::default();
        let mut got = Vec::new();
        for _ in 0..17 {
            got.push(ipam.request_pool(&req(LOCAL_DEFAULT, None, None)).unwrap().pool.to_string());
        }
        assert_eq!(&got[..3], ["172.17.0.0/16", "172.18.0.0/16", "172.19.0.0/16"]);
        assert_eq!(got[14], "172.31.0.0/16");
        assert_eq!(&got[15..], ["192.168.0.0/20", "192.168.16.0/20"]);
        let g = ipam.request_pool(&req(GLOBAL_DEFAULT, None, None)).unwrap();
        assert_eq!(g.id.to_string(), "GlobalDefault/10.0.0.0/24");
        assert_eq!(
            ipam.request_pool(&req(GLOBAL_DEFAULT, None, None)).unwrap().pool.to_string(),
            "10.0.1.0/24"
        );
        assert!(matches!(
            ipam.request_pool(&req("Nope", None, None)),
            Err(IpamError::InvalidAddressSpace(_))
        ));
        assert!(matches!(
            ipam.request_pool(&PoolRequest { v6: true, ..req(LOCAL_DEFAULT, None, None) }),
            Err(IpamError::NoMoreSubnets)
        ));
    }

    #[test]
    fn picked_pools_avoid_static_pools_and_exclusions_and_can_be_sized() {
        let mut ipam = DefaultIpam::default();
        ipam.request_pool(&req(LOCAL_DEFAULT, Some("172.17.5.0/24"), None)).unwrap();
        let mut r = req(LOCAL_DEFAULT, None, None);
        r.exclude = vec!["172.18.0.0/15".parse().unwrap()];
        assert_eq!(ipam.request_pool(&r).unwrap().pool.to_string(), "172.20.0.0/16");
        let sized = ipam.request_pool(&req(LOCAL_DEFAULT, Some("0.0.0.0/22"), None)).unwrap();
        assert_eq!(sized.pool.to_string(), "172.17.0.0/22");
        let sized = ipam.request_pool(&req(LOCAL_DEFAULT, Some("0.0.0.0/22"), None)).unwrap();
        assert_eq!(sized.pool.to_string(), "172.17.8.0/22", "skips past 172.17.5.0/24");
    }

    #[test]
    fn static_pools_may_not_overlap_and_sub_pools_lie_inside() {
        let mut ipam = DefaultIpam::default();
        ipam.request_pool(&req(LOCAL_DEFAULT, Some("10.10.0.0/16"), None)).unwrap();
        for p in ["10.10.0.0/16", "10.10.4.0/24", "10.0.0.0/8"] {
            assert!(
                matches!(
                    ipam.request_pool(&req(LOCAL_DEFAULT, Some(p), None)),
                    Err(IpamError::PoolOverlap(_))
                ),
                "{p}"
            );
        }
        assert!(matches!(
            ipam.request_pool(&req(LOCAL_DEFAULT, Some("10.20.0.0/16"), Some("10.21.0.0/24"))),
            Err(IpamError::InvalidSubPool(_))
        ));
        assert!(matches!(
            ipam.request_pool(&req(LOCAL_DEFAULT, None, Some("10.21.0.0/24"))),
            Err(IpamError::InvalidSubPool(_))
        ));
        assert!(matches!(
            ipam.request_pool(&req(LOCAL_DEFAULT, Some("10.30.0.1/16"), None)),
            Err(IpamError::InvalidPool(_))
        ));
        // The same pool in another address space is fine.
        ipam.request_pool(&req(GLOBAL_DEFAULT, Some("10.10.0.0/16"), None)).unwrap();
    }

    #[test]
    fn releasing_the_last_sub_pool_releases_an_implicit_parent() {
        let mut ipam = DefaultIpam::default();
        let a = ipam.request_pool(&req(LOCAL_DEFAULT, Some("172.27.0.0/16"), Some("172.27.3.0/24"))).unwrap();
        assert_eq!(a.id.to_string(), "LocalDefault/172.27.0.0/16/172.27.3.0/24");
        let b = ipam.request_pool(&req(LOCAL_DEFAULT, Some("172.27.0.0/16"), Some("172.27.4.0/24"))).unwrap();
        assert!(matches!(
            ipam.request_pool(&req(LOCAL_DEFAULT, Some("172.27.0.0/16"), Some("172.27.4.0/24"))),
            Err(IpamError::PoolOverlap(_))
        ));
        // Sub-pool addresses come from the sub-pool; the pool's network address stays reserved.
        assert_eq!(addr(&mut ipam, &a.id), "172.27.3.0/16");
        assert_eq!(addr(&mut ipam, &b.id), "172.27.4.0/16");
        ipam.release_pool(&a.id).unwrap();
        assert!(ipam.allocated(&a.id).is_some(), "parent stays while b uses it");
        ipam.release_pool(&b.id).unwrap();
        assert!(ipam.allocated(&a.id).is_none(), "implicit parent went with its last sub-pool");
        assert!(matches!(ipam.release_pool(&a.id), Err(IpamError::BadPool(_))));
        // An explicit pool stays after its sub-pools go.
        let p = ipam.request_pool(&req(LOCAL_DEFAULT, Some("172.28.0.0/16"), None)).unwrap();
        let s = ipam.request_pool(&req(LOCAL_DEFAULT, Some("172.28.0.0/16"), Some("172.28.1.0/24"))).unwrap();
        ipam.release_pool(&s.id).unwrap();
        assert!(ipam.allocated(&p.id).is_some());
        ipam.release_pool(&p.id).unwrap();
        assert!(ipam.allocated(&p.id).is_none());
    }

    #[test]
    fn addresses_skip_network_and_broadcast_and_go_lowest_first() {
        let mut ipam = DefaultIpam::default();
        let p = ipam.request_pool(&req(LOCAL_DEFAULT, Some("192.0.2.0/29"), None)).unwrap();
        let mut gw_opts = Options::new();
        gw_opts.insert(OPT_REQUEST_ADDRESS_TYPE.into(), REQUEST_GATEWAY.into());
        assert_eq!(
            ipam.request_address(&p.id, None, &gw_opts).unwrap().0.to_string(),
            "192.0.2.1/29",
            "gateway at .1"
        );
        let got: Vec<String> = (0..5).map(|_| addr(&mut ipam, &p.id)).collect();
        assert_eq!(got, ["192.0.2.2/29", "192.0.2.3/29", "192.0.2.4/29", "192.0.2.5/29", "192.0.2.6/29"]);
        assert_eq!(ipam.request_address(&p.id, None, &Options::new()), Err(IpamError::NoAvailableIps));
        ipam.release_address(&p.id, ip("192.0.2.3")).unwrap();
        assert_eq!(addr(&mut ipam, &p.id), "192.0.2.3/29", "lowest free again");
        assert_eq!(
            ipam.request_address(&p.id, Some(ip("192.0.2.0")), &Options::new()),
            Err(IpamError::AlreadyInUse(ip("192.0.2.0")))
        );
        assert_eq!(
            ipam.request_address(&p.id, Some(ip("192.0.2.7")), &Options::new()),
            Err(IpamError::AlreadyInUse(ip("192.0.2.7")))
        );
        assert_eq!(
            ipam.request_address(&p.id, Some(ip("192.0.3.1")), &Options::new()),
            Err(IpamError::OutOfRange(ip("192.0.3.1")))
        );
        assert_eq!(ipam.release_address(&p.id, ip("10.0.0.1")), Err(IpamError::OutOfRange(ip("10.0.0.1"))));
    }

    #[test]
    fn slash_31_and_32_use_every_address() {
        let mut ipam = DefaultIpam::default();
        let p = ipam.request_pool(&req(LOCAL_DEFAULT, Some("192.0.2.0/31"), None)).unwrap();
        assert_eq!(addr(&mut ipam, &p.id), "192.0.2.0/31");
        assert_eq!(addr(&mut ipam, &p.id), "192.0.2.1/31");
        let q = ipam.request_pool(&req(LOCAL_DEFAULT, Some("192.0.2.9/32"), None)).unwrap();
        assert_eq!(addr(&mut ipam, &q.id), "192.0.2.9/32");
        let r = ipam.request_pool(&req(LOCAL_DEFAULT, Some("2001:db8::/127"), None)).unwrap();
        assert_eq!(addr(&mut ipam, &r.id), "2001:db8::/127");
    }

    #[test]
    fn serial_allocation_continues_after_the_last_address() {
        let mut ipam = DefaultIpam::default();
        let p = ipam.request_pool(&req(LOCAL_DEFAULT, Some("192.0.2.0/29"), None)).unwrap();
        let mut serial = Options::new();
        serial.insert(OPT_SERIAL.into(), "true".into());
        let a =
            |ipam: &mut DefaultIpam| ipam.request_address(&p.id, None, &serial).unwrap().0.addr().to_string();
        assert_eq!(a(&mut ipam), "192.0.2.1");
        assert_eq!(a(&mut ipam), "192.0.2.2");
        ipam.release_address(&p.id, ip("192.0.2.1")).unwrap();
        assert_eq!(a(&mut ipam), "192.0.2.3", "not the freed .1");
        for want in ["192.0.2.4", "192.0.2.5", "192.0.2.6", "192.0.2.1"] {
            assert_eq!(a(&mut ipam), want, "wraps around at the end");
        }
    }

    #[test]
    fn ipv6_pools_of_any_size_cost_no_memory_per_address() {
        let mut ipam = DefaultIpam::default();
        let p = ipam.request_pool(&req(LOCAL_DEFAULT, Some("2001:db8:1::/48"), None)).unwrap();
        assert_eq!(addr(&mut ipam, &p.id), "2001:db8:1::1/48", "subnet-router anycast is skipped");
        let deep = ip("2001:db8:1:ffff:ffff:ffff:ffff:ffff");
        assert_eq!(
            ipam.request_address(&p.id, Some(deep), &Options::new()).unwrap().0.addr(),
            deep,
            "no broadcast in v6"
        );
        let huge = ipam.request_pool(&req(LOCAL_DEFAULT, Some("fd00::/8"), None)).unwrap();
        assert_eq!(addr(&mut ipam, &huge.id), "fd00::1/8");
        let half = ipam.request_pool(&req(GLOBAL_DEFAULT, Some("8000::/1"), None)).unwrap();
        assert_eq!(addr(&mut ipam, &half.id), "8000::1/1");
        // `::/N` asks for a predefined pool of that size; there are no predefined IPv6 pools.
        assert_eq!(
            ipam.request_pool(&req(LOCAL_DEFAULT, Some("::/64"), None)),
            Err(IpamError::NoMoreSubnets)
        );
    }
}

//! Address arithmetic: subnets as ranges of `u128` offsets.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// Addresses in `net` (a /0 IPv6 network saturates at `u128::MAX`).
pub fn net_size(net: &IpNet) -> u128 {
    let host_bits = u32::from(net.max_prefix_len() - net.prefix_len());
    1u128.checked_shl(host_bits).unwrap_or(u128::MAX)
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

/// The `i`-th address of `net`.
pub fn addr_at(net: &IpNet, i: u128) -> IpAddr {
    let base = to_u128(net.network());
    match net {
        IpNet::V4(_) => IpAddr::V4(Ipv4Addr::from((base + i) as u32)),
        IpNet::V6(_) => IpAddr::V6(Ipv6Addr::from(base.wrapping_add(i))),
    }
}

/// The offset of `ip` in `net`, if it is inside.
pub fn offset_of(net: &IpNet, ip: IpAddr) -> Option<u128> {
    if !net.contains(&ip) {
        return None;
    }
    Some(to_u128(ip) - to_u128(net.network()))
}

/// Offsets of `net` never handed out: the network address, and the broadcast address of IPv4
/// (the subnet-router anycast of IPv6 is its network address); none in /31, /32, /127, /128.
pub fn reserved_offsets(net: &IpNet) -> Vec<u128> {
    let host_bits = net.max_prefix_len() - net.prefix_len();
    match (host_bits >= 2, net) {
        (false, _) => vec![],
        (true, IpNet::V4(_)) => vec![0, net_size(net) - 1],
        (true, IpNet::V6(_)) => vec![0],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_round_trip() {
        let n: IpNet = "10.1.0.0/16".parse().unwrap();
        assert_eq!(net_size(&n), 65536);
        let a = addr_at(&n, 258);
        assert_eq!(a.to_string(), "10.1.1.2");
        assert_eq!(offset_of(&n, a), Some(258));
        assert_eq!(offset_of(&n, "10.2.0.0".parse().unwrap()), None);
        assert_eq!(net_size(&"::/0".parse().unwrap()), u128::MAX);
        assert_eq!(net_size(&"fd00::/64".parse().unwrap()), 1 << 64);
    }

    #[test]
    fn reserved_offsets_follow_docker() {
        let r = |s: &str| reserved_offsets(&s.parse().unwrap());
        assert_eq!(r("10.0.0.0/24"), vec![0, 255]);
        assert_eq!(r("10.0.0.0/30"), vec![0, 3]);
        assert!(r("10.0.0.0/31").is_empty() && r("10.0.0.1/32").is_empty());
        assert_eq!(r("fd00::/64"), vec![0]);
        assert!(r("fd00::/127").is_empty());
    }
}

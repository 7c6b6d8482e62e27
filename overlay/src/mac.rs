//! A MAC address: parsed from and shown in colon form, Docker's `02:42:` + IPv4 when derived.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// Docker's MAC for an endpoint without one: `02:42:` followed by the IPv4 address's bytes
    /// (libnetwork's `GenerateMACFromIP`).
    pub fn from_ipv4(ip: Ipv4Addr) -> Mac {
        let o = ip.octets();
        Mac([0x02, 0x42, o[0], o[1], o[2], o[3]])
    }

    pub fn is_unicast(&self) -> bool {
        self.0[0] & 1 == 0
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4], b[5])
    }
}

impl FromStr for Mac {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not a MAC address (six hex bytes, e.g. 02:42:0a:00:00:05)");
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for b in &mut out {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Mac(out))
    }
}

impl Serialize for Mac {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_colon_form_and_refuses_anything_else() {
        let m: Mac = "02:42:0A:00:00:05".parse().unwrap();
        assert_eq!(m.to_string(), "02:42:0a:00:00:05");
        assert_eq!(Mac::from_ipv4(Ipv4Addr::new(10, 0, 0, 5)), m);
        for bad in ["", "02:42:0a:00:00", "02:42:0a:00:00:05:06", "02:42:0a:00:00:5", "zz:42:0a:00:00:05"] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
        assert!(m.is_unicast());
        assert!(!"01:00:5e:00:00:01".parse::<Mac>().unwrap().is_unicast());
    }
}

//! The peer DB of one network: every peer record by endpoint address, which one is active, and
//! what the data plane was asked to hold for it.
//!
//! Two records may hold one address for a while (an address released on one host and taken on
//! another before the first record's delete arrived: a handover). The active record is the one
//! with the highest version `(Lamport time, owner)`, which every node computes alike; when it
//! goes, the other is programmed again. A record is programmed only if it is remote and its
//! VTEP is its owner's published data address. FDB entries are reference-counted per
//! `(VTEP, MAC)`: one entry serves every address behind one MAC.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use crate::dataplane::{DpOp, PeerEntries};
use crate::mac::Mac;

/// One peer record as the peer DB holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub mac: Mac,
    pub vtep: IpAddr,
    /// `(ltime, owner)` of the record's version.
    pub version: (u64, String),
    /// Written by this node (its own endpoint: never programmed).
    pub local: bool,
    /// Its VTEP is its owner's published data address.
    pub valid: bool,
}

#[derive(Debug, Clone, Default)]
pub struct PeerDb {
    /// Records by address, then by key (endpoint id).
    by_ip: BTreeMap<Ipv4Addr, BTreeMap<String, Peer>>,
    /// Address of each key.
    by_key: BTreeMap<String, Ipv4Addr>,
    /// Neighbour entries the data plane was asked to hold: address -> (MAC, VTEP).
    programmed: BTreeMap<Ipv4Addr, (Mac, IpAddr)>,
    /// FDB references per (MAC, VTEP).
    fdb: BTreeMap<(Mac, IpAddr), u32>,
}

impl PeerDb {
    /// Stores (or replaces) the record under `key`; returns the addresses whose active record
    /// may have changed.
    pub fn upsert(&mut self, key: &str, peer: Peer) -> Vec<Ipv4Addr> {
        let mut touched = Vec::with_capacity(2);
        if let Some(old) = self.remove(key) {
            touched.push(old);
        }
        self.by_key.insert(key.to_string(), peer.ip);
        if !touched.contains(&peer.ip) {
            touched.push(peer.ip);
        }
        self.by_ip.entry(peer.ip).or_default().insert(key.to_string(), peer);
        touched
    }

    /// Forgets the record under `key`; returns its address.
    pub fn remove(&mut self, key: &str) -> Option<Ipv4Addr> {
        let ip = self.by_key.remove(key)?;
        if let Some(set) = self.by_ip.get_mut(&ip) {
            set.remove(key);
            if set.is_empty() {
                self.by_ip.remove(&ip);
            }
        }
        Some(ip)
    }

    /// Records held.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Addresses with more than one record.
    pub fn contested(&self) -> usize {
        self.by_ip.values().filter(|s| s.len() > 1).count()
    }

    /// Records whose VTEP does not match their owner's data address.
    pub fn invalid(&self) -> usize {
        self.records().filter(|(_, p)| !p.local && !p.valid).count()
    }

    pub fn records(&self) -> impl Iterator<Item = (&str, &Peer)> {
        self.by_ip.values().flat_map(|s| s.iter().map(|(k, p)| (k.as_str(), p)))
    }

    pub fn records_mut(&mut self) -> impl Iterator<Item = &mut Peer> {
        self.by_ip.values_mut().flat_map(|s| s.values_mut())
    }

    /// All addresses with a record.
    pub fn addresses(&self) -> Vec<Ipv4Addr> {
        self.by_ip.keys().copied().collect()
    }

    /// The active record of an address: the highest version.
    pub fn active(&self, ip: Ipv4Addr) -> Option<(&str, &Peer)> {
        self.by_ip.get(&ip)?.iter().max_by(|a, b| a.1.version.cmp(&b.1.version)).map(|(k, p)| (k.as_str(), p))
    }

    /// What the data plane should hold for `ip`: the active record, if it is remote and valid.
    pub fn desired(&self, ip: Ipv4Addr) -> Option<(Mac, IpAddr)> {
        self.active(ip).map(|(_, p)| p).filter(|p| !p.local && p.valid).map(|p| (p.mac, p.vtep))
    }

    /// Brings what the data plane was asked to hold for `ip` to what it should hold, pushing
    /// the operations (FDB before neighbour on add, neighbour before FDB on removal).
    pub fn sync(&mut self, nid: &str, ip: Ipv4Addr, out: &mut Vec<DpOp>) {
        let want = self.desired(ip);
        let have = self.programmed.get(&ip).copied();
        if want == have {
            return;
        }
        if let Some((mac, vtep)) = want {
            if self.fdb_ref(mac, vtep) {
                out.push(DpOp::SetFdb { nid: nid.to_string(), mac, vtep });
            }
            out.push(DpOp::SetNeighbour { nid: nid.to_string(), ip, mac });
            self.programmed.insert(ip, (mac, vtep));
        } else {
            self.programmed.remove(&ip);
        }
        if let Some((mac, vtep)) = have {
            if want.is_none() {
                out.push(DpOp::DelNeighbour { nid: nid.to_string(), ip, mac });
            }
            if self.fdb_unref(mac, vtep) {
                out.push(DpOp::DelFdb { nid: nid.to_string(), mac, vtep });
            }
        }
    }

    /// Programs every address (a sandbox just made): nothing is assumed held before.
    pub fn sync_all(&mut self, nid: &str, out: &mut Vec<DpOp>) {
        self.forget_programmed();
        for ip in self.addresses() {
            self.sync(nid, ip, out);
        }
    }

    /// The sandbox went: nothing is held any more.
    pub fn forget_programmed(&mut self) {
        self.programmed.clear();
        self.fdb.clear();
    }

    /// What the data plane was asked to hold.
    pub fn programmed(&self) -> PeerEntries {
        (self.programmed.iter().map(|(ip, (m, _))| (*ip, *m)).collect(), self.fdb.keys().copied().collect())
    }

    /// Takes a reference; true if it is the first.
    fn fdb_ref(&mut self, mac: Mac, vtep: IpAddr) -> bool {
        let n = self.fdb.entry((mac, vtep)).or_insert(0);
        *n += 1;
        *n == 1
    }

    /// Drops a reference; true if it was the last.
    fn fdb_unref(&mut self, mac: Mac, vtep: IpAddr) -> bool {
        match self.fdb.get_mut(&(mac, vtep)) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                self.fdb.remove(&(mac, vtep));
                true
            }
            None => false,
        }
    }
}

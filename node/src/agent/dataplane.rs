//! The agent's side of the overlay driver: networks and local endpoints handed to the driver,
//! peer records published and fed to it, and the data-plane operations it emits handed to the
//! caller ([`Agent::poll_dataplane`]) with their results coming back
//! ([`Agent::handle_dataplane_done`]).
//!
//! `endpoint create --sandbox` runs in this order: the address is durable, then the data plane
//! builds the interface, then the endpoint's records are published, then the reply. If the data
//! plane refuses, the address is released and nothing is published.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::Instant;

use bytes::Bytes;
use ipnet::Ipv4Net;
use weft_gossip::{CLUSTER_NETWORK, TableWatcher};
use weft_overlay::driver::NetReport;
use weft_overlay::driverapi::{Driver, EndpointInterface, Joined, ipam_v4};
use weft_overlay::{DpError, DpOp, Mac, OVERLAY_PEER_TABLE, OpId, OverlayStats, PeerRecord};

use super::{Agent, CommandId, NETWORKS_TABLE, NetworkDef, Reply};
use crate::alloc::{Endpoint, v4_subnets};
use crate::error::AgentError;

/// An `endpoint create --sandbox` between its allocation and its reply.
#[derive(Debug)]
pub(super) struct PendingEp {
    pub(super) id: CommandId,
    pub(super) ep: Endpoint,
    /// The persist batch holding its address (0: not staged yet).
    pub(super) seq: u64,
    /// The data-plane operations building it, `[first, end)`, and the first error.
    pub(super) ops: Option<(OpId, OpId, Option<DpError>)>,
}

/// A reply waiting for data-plane operations `[first, end)` (an endpoint's removal).
#[derive(Debug)]
pub(super) struct DpWait {
    pub(super) id: CommandId,
    pub(super) end: OpId,
    pub(super) reply: Reply,
}

/// The overlay as the view shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OverlayReport {
    /// Whether an owner applies data-plane operations (`--dataplane` other than `none`).
    pub dataplane: bool,
    pub networks: BTreeMap<String, NetReport>,
    pub stats: OverlayStats,
    /// Peer records held, those not programmed for a VTEP that is not their owner's data
    /// address, and addresses held by two records.
    pub records: usize,
    pub unprogrammed: usize,
    pub contested: usize,
}

impl Agent {
    /// Whether this agent has a data plane (the caller applies [`poll_dataplane`](Self::poll_dataplane)'s
    /// operations). Without one, `--sandbox` endpoints are refused. Set before the first input.
    pub fn set_dataplane(&mut self, on: bool) {
        self.dataplane = on;
        // Networks known already are handed to the driver again, their endpoints with them.
        for nid in self.overlay.networks().map(str::to_string).collect::<Vec<_>>() {
            let _ = self.overlay.delete_network(&nid);
        }
        while self.overlay.poll_op().is_some() {}
        if on {
            // A previous life's sandboxes of networks with no local sandboxed endpoint go.
            let keep: Vec<String> = self
                .alloc
                .all_endpoints()
                .filter(|e| e.sandbox.is_some() && self.gossip.is_attached(&e.network_id))
                .map(|e| e.network_id.clone())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            self.overlay.prune_sandboxes(keep);
        }
        self.sync_overlay_networks();
    }

    /// The next data-plane operation to apply, in order; its result goes to
    /// [`handle_dataplane_done`](Self::handle_dataplane_done).
    pub fn poll_dataplane(&mut self) -> Option<(OpId, DpOp)> {
        if !self.dataplane {
            return None;
        }
        self.overlay.poll_op()
    }

    /// A data-plane operation's result.
    pub fn handle_dataplane_done(&mut self, now: Instant, id: OpId, result: Result<(), DpError>) {
        self.overlay.handle_done(id, result.clone());
        self.snapshot_dirty = true;
        let mut done = Vec::new();
        for (i, p) in self.ep_pending.iter_mut().enumerate() {
            if let Some((first, end, err)) = &mut p.ops
                && (*first..*end).contains(&id)
            {
                if let Err(e) = &result
                    && err.is_none()
                {
                    *err = Some(e.clone());
                }
                if id + 1 == *end {
                    done.push(i);
                }
            }
        }
        for i in done.into_iter().rev() {
            let p = self.ep_pending.remove(i);
            let r = self.finish_sandboxed(now, p);
            self.replies.push(r);
        }
        let (ready, waiting): (Vec<DpWait>, Vec<DpWait>) =
            std::mem::take(&mut self.dp_waits).into_iter().partition(|w| id + 1 >= w.end);
        self.dp_waits = waiting;
        for w in ready {
            self.replies.push((w.id, Ok(w.reply)));
        }
        self.finish(now);
    }

    /// The overlay's state for the view.
    pub(super) fn overlay_report(&self) -> OverlayReport {
        let (records, unprogrammed, contested) = self.overlay.counts();
        OverlayReport {
            dataplane: self.dataplane,
            networks: self
                .overlay
                .networks()
                .filter_map(|n| self.overlay.report(n).map(|r| (n.to_string(), r)))
                .collect(),
            stats: self.overlay.stats.clone(),
            records,
            unprogrammed,
            contested,
        }
    }

    /// Hands the driver every attached overlay network it does not know yet (with this node's
    /// endpoints in it), and takes back those detached.
    pub(super) fn sync_overlay_networks(&mut self) {
        let attached: Vec<&str> = self.gossip.networks().filter(|n| *n != CLUSTER_NETWORK).collect();
        let new: Vec<String> = attached
            .iter()
            .filter(|n| !self.overlay.has_network(n) && !self.not_overlay.contains(**n))
            .map(|n| n.to_string())
            .collect();
        let gone: Vec<String> =
            self.overlay.networks().filter(|n| !self.gossip.is_attached(n)).map(str::to_string).collect();
        for nid in gone {
            let _ = self.overlay.delete_network(&nid);
        }
        for nid in new {
            let Some(def) = self.definition(&nid) else { continue };
            self.create_overlay_network(&def);
        }
    }

    /// A definition seen anew (created or updated): the driver follows it.
    pub(super) fn overlay_definition_changed(&mut self, nid: &str) {
        if self.gossip.is_attached(nid) && (self.overlay.has_network(nid) || self.not_overlay.contains(nid)) {
            self.not_overlay.remove(nid);
            if let Some(def) = self.definition(nid) {
                self.create_overlay_network(&def);
            }
        }
    }

    fn definition(&self, nid: &str) -> Option<NetworkDef> {
        match self.gossip.get_entry(CLUSTER_NETWORK, NETWORKS_TABLE, nid) {
            Some(v) => serde_json::from_slice(&v).ok(),
            None => self.restored.get(nid).cloned(),
        }
    }

    fn create_overlay_network(&mut self, def: &NetworkDef) {
        if def.driver != "overlay" {
            self.not_overlay.insert(def.id.clone());
            return;
        }
        let known = self.overlay.has_network(&def.id);
        let v4: Vec<_> = v4_subnets(def)
            .into_iter()
            .map(|n| ipam_v4(n, crate::alloc::gateway_of(def, &n).map(IpAddr::V4)))
            .collect();
        if let Err(e) = self.overlay.create_network(&def.id, &def.options, &v4, &[]) {
            tracing::warn!(network = %def.name, error = %e, "the overlay driver refused the network; it has no data plane here");
            self.not_overlay.insert(def.id.clone());
            return;
        }
        if known {
            return;
        }
        // This node's endpoints in it (restored after a restart): their interfaces are made
        // again (kept where the kernel still holds them).
        let eps: Vec<Endpoint> = self.alloc.local_endpoints(&def.id).into_iter().cloned().collect();
        for ep in eps {
            if self.ep_pending.iter().any(|p| p.ep.id == ep.id) {
                continue;
            }
            if let Err(e) = self.overlay_join(&ep) {
                tracing::warn!(endpoint = %ep.name, error = %e, "cannot restore the endpoint's interface");
            }
        }
    }

    /// Creates and joins a local endpoint in the driver; returns the peer record to publish.
    fn overlay_join(&mut self, ep: &Endpoint) -> Result<Option<Bytes>, AgentError> {
        if !self.overlay.has_network(&ep.network_id) {
            return Ok(None);
        }
        let addr: Ipv4Net = ep
            .ipv4
            .parse()
            .map_err(|_| AgentError::NoAddress(format!("endpoint {}: bad address {}", ep.name, ep.ipv4)))?;
        let sandbox = if self.dataplane { ep.sandbox.clone().map(std::path::PathBuf::from) } else { None };
        let mut iface = EndpointInterface {
            mac: ep.mac.parse::<Mac>().ok(),
            addr: Some(addr),
            addr_v6: None,
            netns: sandbox.clone(),
        };
        let dp = |e: weft_overlay::driverapi::DriverError| AgentError::Dataplane(e.to_string());
        self.overlay.create_endpoint(&ep.network_id, &ep.id, &mut iface).map_err(dp)?;
        let mut joined = Joined::default();
        self.overlay.join(&ep.network_id, &ep.id, sandbox.as_deref(), &mut joined).map_err(dp)?;
        Ok(joined
            .table_entries
            .into_iter()
            .find(|(t, _, _)| t == OVERLAY_PEER_TABLE)
            .map(|(_, _, v)| Bytes::from(v)))
    }

    /// A new endpoint without a sandbox: its peer record is published with it.
    pub(super) fn overlay_endpoint_created(&mut self, now: Instant, ep: &Endpoint) -> Result<(), AgentError> {
        if let Some(rec) = self.overlay_join(ep)? {
            self.gossip.put_entry(now, &ep.network_id, OVERLAY_PEER_TABLE, &ep.id, rec)?;
        }
        Ok(())
    }

    /// An endpoint removed: its peer record goes, and its interface (and the network's sandbox
    /// with the last one). Returns the end of the operations that removal emitted.
    pub(super) fn overlay_endpoint_removed(&mut self, now: Instant, ep: &Endpoint) -> Option<OpId> {
        if self.gossip.is_attached(&ep.network_id) {
            match self.gossip.delete_entry(now, &ep.network_id, OVERLAY_PEER_TABLE, &ep.id) {
                Ok(()) | Err(weft_gossip::Error::EntryNotFound { .. }) => {}
                Err(e) => tracing::warn!(endpoint = %ep.name, error = %e, "cannot delete the peer record"),
            }
        }
        let first = self.overlay.next_op_id();
        let _ = self.overlay.delete_endpoint(&ep.network_id, &ep.id);
        let end = self.overlay.next_op_id();
        (self.dataplane && end > first).then_some(end)
    }

    /// Pending `--sandbox` endpoints whose address is durable get their interface built.
    pub(super) fn advance_pending_eps(&mut self, now: Instant) {
        if self.ep_pending.is_empty() {
            return;
        }
        let issued = self.persist.issued();
        let durable = self.persist.durable();
        let mut failed = Vec::new();
        for i in 0..self.ep_pending.len() {
            if self.ep_pending[i].seq == 0 {
                self.ep_pending[i].seq = issued.max(1);
            }
            if self.ep_pending[i].ops.is_some() || self.ep_pending[i].seq > durable {
                continue;
            }
            let ep = self.ep_pending[i].ep.clone();
            let first = self.overlay.next_op_id();
            match self.overlay_join(&ep) {
                Ok(_) => {
                    let end = self.overlay.next_op_id();
                    self.ep_pending[i].ops = Some((first, end, None));
                    if end == first {
                        failed.push((i, None));
                    }
                }
                Err(e) => failed.push((i, Some(e))),
            }
        }
        for (i, e) in failed.into_iter().rev() {
            let mut p = self.ep_pending.remove(i);
            if let Some(e) = e {
                p.ops = Some((0, 0, Some(DpError::new(format!("endpoint {}", p.ep.name), e.to_string()))));
            }
            let r = self.finish_sandboxed(now, p);
            self.replies.push(r);
        }
    }

    /// The data plane has built (or refused) a pending endpoint: publish it, or release it.
    fn finish_sandboxed(&mut self, now: Instant, p: PendingEp) -> (CommandId, Result<Reply, AgentError>) {
        let err = p.ops.and_then(|(_, _, e)| e);
        if let Some(e) = err {
            self.overlay_endpoint_removed(now, &p.ep);
            if let Err(r) = self.alloc.remove_endpoint(&mut self.gossip, now, &p.ep) {
                tracing::warn!(endpoint = %p.ep.name, error = %r, "cannot release the endpoint");
            }
            return (p.id, Err(AgentError::Dataplane(e.to_string())));
        }
        let published = self.alloc.publish_endpoint(&mut self.gossip, now, &p.ep).and_then(|()| {
            let rec =
                self.peer_record(&p.ep).ok_or_else(|| AgentError::Dataplane("no peer record".into()))?;
            Ok(self.gossip.put_entry(now, &p.ep.network_id, OVERLAY_PEER_TABLE, &p.ep.id, rec)?)
        });
        match published {
            Ok(()) => (p.id, Ok(Reply::Endpoint(p.ep))),
            Err(e) => (p.id, Err(e)),
        }
    }

    /// The peer record of a local endpoint, as this node publishes it now.
    fn peer_record(&self, ep: &Endpoint) -> Option<Bytes> {
        let addr: Ipv4Net = ep.ipv4.parse().ok()?;
        let mac: Mac = ep.mac.parse().ok()?;
        let rec = PeerRecord {
            endpoint_ip: addr.to_string(),
            endpoint_mac: mac.to_string(),
            tunnel_endpoint_ip: self.overlay.vtep().to_string(),
        };
        Some(Bytes::from(rec.encode()))
    }

    /// Every second: owners' data addresses checked again, peer records of this node's
    /// endpoints published where missing or stale (after a restart, a new `--data-addr`),
    /// networks whose tables synced reconciled in the data plane.
    pub(super) fn overlay_tick(&mut self, now: Instant) {
        for owner in self.overlay.owners() {
            let a = self.gossip.node_data_addr(&owner);
            self.overlay.set_owner_vtep(&owner, a);
        }
        for nid in self.overlay.networks().map(str::to_string).collect::<Vec<_>>() {
            if self.gossip.has_synced(&nid) {
                self.overlay.network_synced(&nid);
            }
        }
        self.overlay.tick();
        self.reconcile_local_endpoints();
        if self.alloc.is_catching_up() {
            return;
        }
        let eps: Vec<Endpoint> = self
            .overlay
            .networks()
            .flat_map(|n| self.alloc.local_endpoints(n).into_iter().cloned().collect::<Vec<_>>())
            .filter(|e| !self.ep_pending.iter().any(|p| p.ep.id == e.id))
            .collect();
        for ep in eps {
            let Some(want) = self.peer_record(&ep) else { continue };
            if self.gossip.get_entry(&ep.network_id, OVERLAY_PEER_TABLE, &ep.id).as_ref() != Some(&want)
                && self.gossip.get_entry(&ep.network_id, crate::alloc::ENDPOINT_TABLE, &ep.id).is_some()
                && let Err(e) = self.gossip.put_entry(now, &ep.network_id, OVERLAY_PEER_TABLE, &ep.id, want)
            {
                tracing::warn!(endpoint = %ep.name, error = %e, "cannot publish the peer record");
            }
        }
    }

    /// The driver's local endpoints follow the allocator's: one the allocator dropped without a
    /// command (a removal by `node rm`, a network removed elsewhere) loses its interface; one
    /// it holds that the driver lost is joined again.
    fn reconcile_local_endpoints(&mut self) {
        for nid in self.overlay.networks().map(str::to_string).collect::<Vec<_>>() {
            let have = self.overlay.local_endpoints(&nid);
            let want: Vec<Endpoint> = self
                .alloc
                .local_endpoints(&nid)
                .into_iter()
                .filter(|e| !self.ep_pending.iter().any(|p| p.ep.id == e.id))
                .cloned()
                .collect();
            for eid in &have {
                if !want.iter().any(|e| e.id == *eid) && !self.ep_pending.iter().any(|p| p.ep.id == *eid) {
                    tracing::info!(endpoint = %eid, "endpoint gone without a command; removing its interface");
                    let _ = self.overlay.delete_endpoint(&nid, eid);
                }
            }
            for ep in want {
                if !have.contains(&ep.id)
                    && let Err(e) = self.overlay_join(&ep)
                {
                    tracing::warn!(endpoint = %ep.name, error = %e, "cannot restore the endpoint's interface");
                }
            }
        }
    }

    /// Owners of records just seen whose data address is not known yet.
    pub(super) fn resolve_owners(&mut self) {
        for owner in self.overlay.take_unresolved() {
            let a = self.gossip.node_data_addr(&owner);
            self.overlay.set_owner_vtep(&owner, a);
        }
    }

    /// Checks a `--sandbox` path before anything is allocated.
    pub(super) fn check_sandbox(&self, def: &NetworkDef, sandbox: &str) -> Result<(), AgentError> {
        if !self.dataplane {
            return Err(AgentError::Dataplane(
                "this agent runs without a data plane (--dataplane none): an endpoint cannot get an interface; leave out --sandbox".into(),
            ));
        }
        if def.driver != "overlay" {
            return Err(AgentError::Dataplane(format!(
                "network {:?} uses driver {:?}: only overlay endpoints get an interface",
                def.name, def.driver
            )));
        }
        if !Path::new(sandbox).is_absolute() {
            return Err(AgentError::Dataplane(format!(
                "--sandbox {sandbox:?}: give the absolute path of a network namespace (e.g. /run/netns/NAME)"
            )));
        }
        Ok(())
    }

    /// Feeds a peer-table event to the driver.
    pub(super) fn overlay_event(&mut self, t: &weft_gossip::TableEvent) {
        let version = weft_gossip::Version { ltime: t.ltime, owner: &t.owner };
        self.overlay.event_notify(
            &t.network,
            &t.table,
            &t.key,
            t.prev.as_deref(),
            t.value.as_deref(),
            version,
        );
        if self.overlay.has_ops() {
            self.snapshot_dirty = true;
        }
    }

    pub(super) fn overlay_decode(&self, key: &str, value: &[u8]) -> (String, BTreeMap<String, String>) {
        self.overlay.decode_table_entry(OVERLAY_PEER_TABLE, key, value)
    }
}

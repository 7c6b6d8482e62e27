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
    /// The data-plane operations building it, `[first, end)`, and the first error of those
    /// it rests on (the sandbox, its interface).
    pub(super) ops: Option<(OpId, OpId, Option<String>)>,
}

/// A reply waiting for data-plane operations up to `end` (exclusive) and for the persist
/// batch `seq` (an endpoint's removal, a leave).
#[derive(Debug)]
pub(super) struct DpWait {
    pub(super) id: CommandId,
    pub(super) end: OpId,
    /// 0 until the command's batch is staged.
    pub(super) seq: u64,
    pub(super) reply: Reply,
}

/// The overlay as the view shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OverlayReport {
    /// Whether an owner applies data-plane operations (`--dataplane` other than `none`).
    pub dataplane: bool,
    /// Networks the driver handles here.
    pub networks: std::collections::BTreeSet<String>,
    /// Networks with a sandbox here.
    pub sandboxes: usize,
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
        let kind = self.overlay.handle_done(id, result.clone());
        let mut done = Vec::new();
        for (i, p) in self.ep_pending.iter_mut().enumerate() {
            if let Some((first, end, err)) = &mut p.ops
                && (*first..*end).contains(&id)
            {
                // A peer's entry that fails is repaired by the next resync; the create fails
                // only with its sandbox or its interface.
                if let Err(e) = &result
                    && kind == weft_overlay::driver::OpKind::Essential
                    && err.is_none()
                {
                    *err = Some(e.to_string());
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
            // (Also after the batch that removed it, as any reply.)
            self.reply_seq.insert(w.id, w.seq);
            self.replies.push((w.id, Ok(w.reply)));
        }
        self.finish(now);
    }

    /// The driver's view of one network (`network inspect --verbose`).
    pub fn overlay_network(&self, nid: &str) -> Option<NetReport> {
        self.overlay.report(nid)
    }

    /// `weft leave`: every sandbox here goes; returns the end of those operations.
    pub(super) fn overlay_leave(&mut self) -> Option<OpId> {
        let first = self.overlay.next_op_id();
        self.overlay.leave_all();
        let end = self.overlay.next_op_id();
        (self.dataplane && end > first).then_some(end)
    }

    /// The overlay's state for the view.
    pub(super) fn overlay_report(&self) -> OverlayReport {
        let (records, unprogrammed, contested) = self.overlay.counts();
        OverlayReport {
            dataplane: self.dataplane,
            networks: self.overlay.networks().map(str::to_string).collect(),
            sandboxes: self.overlay.sandboxes_up(),
            stats: self.overlay.stats.clone(),
            records,
            unprogrammed,
            contested,
        }
    }

    /// Hands the driver every attached overlay network it does not know yet (with this node's
    /// endpoints in it), and takes back those detached.
    pub(super) fn sync_overlay_networks(&mut self) {
        // (Every input comes here: nothing is allocated unless something changed.) A node that
        // left keeps no sandbox.
        if self.gossip.has_left() {
            return;
        }
        let stale =
            self.gossip.networks().any(|n| {
                n != CLUSTER_NETWORK && !self.overlay.has_network(n) && !self.not_overlay.contains(n)
            }) || self.overlay.networks().any(|n| !self.gossip.is_attached(n));
        if !stale {
            return;
        }
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
            // (One whose definition has not arrived waits for it: see `overlay_definition_changed`.)
            let Some(def) = self.definition(&nid) else {
                self.not_overlay.insert(nid);
                continue;
            };
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
        let def: NetworkDef = match self.gossip.get_entry(CLUSTER_NETWORK, NETWORKS_TABLE, nid) {
            Some(v) => serde_json::from_slice(&v).ok()?,
            None => self.restored.get(nid).cloned()?,
        };
        // (A definition written under another key is not this network's.)
        (def.id == nid).then_some(def)
    }

    fn create_overlay_network(&mut self, def: &NetworkDef) {
        if self.gossip.has_left() {
            return;
        }
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

    /// Fills in the batch a reply waiting for the data plane rests on (its command's, staged
    /// in the same input).
    pub(super) fn stage_dp_waits(&mut self) {
        let issued = self.persist.issued();
        for w in &mut self.dp_waits {
            if w.seq == 0 {
                w.seq = issued;
            }
        }
    }

    /// Pending `--sandbox` endpoints whose address is durable get their interface built.
    pub(super) fn advance_pending_eps(&mut self, now: Instant) {
        if self.ep_pending.is_empty() {
            return;
        }
        let issued = self.persist.issued();
        let durable = self.persist.durable();
        let mut failed: Vec<(usize, String)> = Vec::new();
        for i in 0..self.ep_pending.len() {
            if self.ep_pending[i].seq == 0 {
                self.ep_pending[i].seq = issued.max(1);
            }
            if self.ep_pending[i].ops.is_some() || self.ep_pending[i].seq > durable {
                continue;
            }
            let ep = self.ep_pending[i].ep.clone();
            if !self.alloc.local_endpoints(&ep.network_id).iter().any(|e| e.id == ep.id) {
                failed.push((i, format!("endpoint {}: removed (with its network, or this node) before its interface was built", ep.name)));
                continue;
            }
            let first = self.overlay.next_op_id();
            match self.overlay_join(&ep) {
                Ok(_) => {
                    let end = self.overlay.next_op_id();
                    self.ep_pending[i].ops = Some((first, end, None));
                    if end == first {
                        // The driver made nothing: the network has no data plane here.
                        failed.push((
                            i,
                            format!(
                                "network {:?}: the overlay driver has no data plane for it on this node (see the log)",
                                ep.network
                            ),
                        ));
                    }
                }
                Err(AgentError::Dataplane(e)) => failed.push((i, format!("endpoint {}: {e}", ep.name))),
                Err(e) => failed.push((i, format!("endpoint {}: {e}", ep.name))),
            }
        }
        for (i, e) in failed.into_iter().rev() {
            let mut p = self.ep_pending.remove(i);
            p.ops = Some((0, 0, Some(e)));
            let r = self.finish_sandboxed(now, p);
            self.replies.push(r);
        }
    }

    /// The data plane has built (or refused) a pending endpoint: publish it, or release it.
    fn finish_sandboxed(&mut self, now: Instant, p: PendingEp) -> (CommandId, Result<Reply, AgentError>) {
        let mut err = p.ops.and_then(|(_, _, e)| e);
        // Dropped meanwhile (its network removed, this node removed): nothing is published.
        if err.is_none() && !self.alloc.local_endpoints(&p.ep.network_id).iter().any(|e| e.id == p.ep.id) {
            err = Some(format!("endpoint {}: removed while its interface was being built", p.ep.name));
        }
        if err.is_none() {
            let published = self.alloc.publish_endpoint(&mut self.gossip, now, &p.ep).and_then(|()| {
                let rec =
                    self.peer_record(&p.ep).ok_or_else(|| AgentError::Dataplane("no peer record".into()))?;
                Ok(self.gossip.put_entry(now, &p.ep.network_id, OVERLAY_PEER_TABLE, &p.ep.id, rec)?)
            });
            match published {
                Ok(()) => return (p.id, Ok(Reply::Endpoint(p.ep))),
                Err(e) => err = Some(format!("endpoint {}: publishing it: {e}", p.ep.name)),
            }
        }
        // Nothing of it stays: its interface, its records, its address (held back).
        self.overlay_endpoint_removed(now, &p.ep);
        if self.alloc.local_endpoints(&p.ep.network_id).iter().any(|e| e.id == p.ep.id)
            && let Err(r) = self.alloc.remove_endpoint(&mut self.gossip, now, &p.ep)
        {
            tracing::warn!(endpoint = %p.ep.name, error = %r, "cannot release the endpoint");
        }
        (p.id, Err(AgentError::Dataplane(err.unwrap_or_default())))
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
        if self.gossip.has_left() {
            return;
        }
        for owner in self.overlay.owners() {
            let a = self.gossip.node_data_addr(&owner);
            self.overlay.set_owner_vtep(&owner, a);
        }
        let since = *self.overlay_since.get_or_insert(now);
        for nid in self.overlay.networks().map(str::to_string).collect::<Vec<_>>() {
            // Synced with a peer; or nothing to sync from: no peer attached while membership is
            // known (the cluster's tables synced, or alone by design), for a while.
            let known = self.gossip.has_synced(CLUSTER_NETWORK) || self.alloc.alone(&self.gossip);
            let alone = known
                && self.gossip.network_peer_count(&nid) == 0
                && now.saturating_duration_since(since) >= self.gossip.config().unknown_owner_grace();
            if self.gossip.has_synced(&nid) || alone {
                self.overlay.network_synced(&nid);
            }
        }
        self.overlay.tick();
        self.reconcile_local_endpoints(now);
        if self.alloc.is_catching_up() {
            return;
        }
        self.prune_own_peer_records(now);
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

    /// Peer records under this node's name with no endpoint behind them (one torn down by
    /// `node rm`, a delete lost in a crash) are deleted: others would keep programming them.
    fn prune_own_peer_records(&mut self, now: Instant) {
        let me = self.gossip.id().name.to_string();
        for nid in self.overlay.networks().map(str::to_string).collect::<Vec<_>>() {
            let mut orphans = Vec::new();
            let mine: std::collections::BTreeSet<&str> = self
                .alloc
                .local_endpoints(&nid)
                .into_iter()
                .map(|e| e.id.as_str())
                .chain(self.ep_pending.iter().map(|p| p.ep.id.as_str()))
                .collect();
            self.gossip.walk(&nid, OVERLAY_PEER_TABLE, |key, _, owner| {
                if owner == me && !mine.contains(key) {
                    orphans.push(key.to_string());
                }
                true
            });
            for key in orphans {
                tracing::info!(network = %nid, endpoint = %key, "deleting a peer record with no endpoint behind it");
                if let Err(e) = self.gossip.delete_entry(now, &nid, OVERLAY_PEER_TABLE, &key) {
                    tracing::warn!(endpoint = %key, error = %e, "cannot delete the peer record");
                }
            }
        }
    }

    /// The driver's local endpoints follow the allocator's: one the allocator dropped without a
    /// command (a removal by `node rm`, a network removed elsewhere) loses its interface; one
    /// it holds that the driver lost is joined again.
    fn reconcile_local_endpoints(&mut self, now: Instant) {
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
                    tracing::info!(endpoint = %eid, "endpoint gone without a command; removing its interface and record");
                    let _ = self.overlay.delete_endpoint(&nid, eid);
                    if self.gossip.get_entry(&nid, OVERLAY_PEER_TABLE, eid).is_some()
                        && let Err(e) = self.gossip.delete_entry(now, &nid, OVERLAY_PEER_TABLE, eid)
                    {
                        tracing::warn!(endpoint = %eid, error = %e, "cannot delete the peer record");
                    }
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
    }

    pub(super) fn overlay_decode(&self, key: &str, value: &[u8]) -> (String, BTreeMap<String, String>) {
        self.overlay.decode_table_entry(OVERLAY_PEER_TABLE, key, value)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::Net;
    use super::*;
    use crate::agent::Command;

    fn ep(network: &str, name: &str, sandbox: Option<&str>) -> Command {
        Command::EndpointCreate {
            network: network.into(),
            name: name.into(),
            ip: None,
            mac: None,
            sandbox: sandbox.map(str::to_string),
        }
    }

    /// Two agents with data planes and an overlay network; sandbox `/c<i>` exists on host i.
    fn two() -> (Net, NetworkDef) {
        let mut net = Net::new(2).with_dataplanes();
        for i in 0..2 {
            net.dataplanes[i].as_mut().unwrap().add_sandbox_path(format!("/c{i}"));
        }
        let create = Command::CreateNetwork {
            name: "ov".into(),
            driver: "overlay".into(),
            subnets: vec![],
            gateway: None,
            options: Default::default(),
        };
        let Ok(Reply::Network(def)) = net.cmd(0, create) else { panic!("network create") };
        net.run(std::time::Duration::from_secs(1));
        (net, def)
    }

    fn sandbox<'a>(net: &'a Net, i: usize, nid: &str) -> Option<&'a weft_overlay::dataplane::MemSandbox> {
        net.dataplanes[i].as_ref().unwrap().sandboxes.get(nid)
    }

    #[test]
    fn an_interface_comes_before_the_records_and_a_refused_one_leaves_nothing() {
        let (mut net, def) = two();
        let Ok(Reply::Endpoint(e0)) = net.cmd(0, ep("ov", "e0", Some("/c0"))) else { panic!("e0") };
        let Ok(Reply::Endpoint(e1)) = net.cmd(1, ep("ov", "e1", Some("/c1"))) else { panic!("e1") };
        net.run(std::time::Duration::from_secs(1));
        // Each host: its interface, and the other's entries.
        for (i, (mine, theirs)) in [(&e0, &e1), (&e1, &e0)].into_iter().enumerate() {
            let sb = sandbox(&net, i, &def.id).expect("a sandbox");
            assert_eq!(sb.endpoints.keys().collect::<Vec<_>>(), vec![&mine.id]);
            assert_eq!(sb.endpoints[&mine.id].mac.to_string(), mine.mac);
            let ip: ipnet::Ipv4Net = theirs.ipv4.parse().unwrap();
            assert_eq!(sb.neighbours.get(&ip.addr()).map(ToString::to_string), Some(theirs.mac.clone()));
            assert_eq!(sb.fdb.len(), 1);
        }
        // A sandbox that does not exist: one line naming it; no address kept, nothing published.
        let r = net.cmd(0, ep("ov", "bad", Some("/nope")));
        let err = r.expect_err("refused").to_string();
        assert!(err.starts_with("data plane: ") && err.contains("/nope") && !err.contains('\n'), "{err}");
        assert!(!err["data plane: ".len()..].contains("data plane: "), "one prefix: {err}");
        net.run(std::time::Duration::from_secs(1));
        for i in 0..2 {
            let a = &net.agents[i];
            assert!(
                a.gossip()
                    .table(&def.id, crate::alloc::ENDPOINT_TABLE)
                    .iter()
                    .all(|e| e.state != weft_gossip::EntryState::Live || e.key == e0.id || e.key == e1.id)
            );
            assert_eq!(
                a.gossip()
                    .table(&def.id, OVERLAY_PEER_TABLE)
                    .iter()
                    .filter(|e| e.state == weft_gossip::EntryState::Live)
                    .count(),
                2
            );
        }
        assert_eq!(
            net.agents[0].allocator().local_endpoints(&def.id).len(),
            1,
            "the refused endpoint's address went back"
        );
        assert_eq!(sandbox(&net, 0, &def.id).unwrap().endpoints.len(), 1);
    }

    #[test]
    fn rm_answers_once_the_interface_is_gone_and_a_leave_takes_the_sandboxes() {
        let (mut net, def) = two();
        let Ok(Reply::Endpoint(_)) = net.cmd(0, ep("ov", "e0", Some("/c0"))) else { panic!("e0") };
        let Ok(Reply::Endpoint(_)) = net.cmd(1, ep("ov", "e1", Some("/c1"))) else { panic!("e1") };
        // A removal's reply waits for the data plane.
        let id = 9_000;
        net.agents[0].handle_command(
            net.now,
            id,
            Command::EndpointRm { network: "ov".into(), endpoint: "e0".into() },
        );
        assert!(net.agents[0].waiting_for(id).is_some_and(|w| w.contains("data plane")));
        net.pump();
        assert!(net.take_reply(0, id).is_ok());
        assert!(sandbox(&net, 0, &def.id).is_none(), "the last endpoint took the sandbox");
        net.run(std::time::Duration::from_secs(1));
        assert!(sandbox(&net, 1, &def.id).unwrap().neighbours.is_empty(), "host 1 dropped e0");
        // A leave takes this host's sandboxes before it answers.
        assert!(net.cmd(1, Command::Leave).is_ok());
        assert!(sandbox(&net, 1, &def.id).is_none());
        net.run(std::time::Duration::from_secs(2));
        assert!(sandbox(&net, 1, &def.id).is_none(), "a node that left makes no sandbox again");
    }
}

//! The read view: what the control API reads (`members`, `network ls/inspect`, `dump`,
//! `table get`, `/metrics`, `/health`) without ever waiting for the task that owns the agent.
//!
//! The owner keeps it current incrementally: after every input the agent applies the gossip
//! core's change feed (every entry stored, changed or removed, in every table, diagnostic tables
//! included; every network attached or detached) to the entry maps, and replaces the snapshot
//! of its scalar state (members, counters) when it changed. It does so before any reply of that
//! input leaves the agent, so a client reads its own writes.
//!
//! Entries live in `dashmap` maps, one per (network, table): a writer locks one shard of one
//! table for one key, so a reader walking a table waits at most for that; the snapshot is an
//! `Arc` swapped under a lock held only for the pointer copy.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use dashmap::DashMap;
use weft_gossip::{EntryState, EntryView, MemberInfo, NodeId, Stats};

use crate::agent::{Decoded, NetworkDef};
use crate::read::TableRead;

/// One stored version, as the view keeps it: times are absolute, so a read computes ages.
#[derive(Debug, Clone)]
pub struct ViewEntry {
    pub value: Bytes,
    pub owner: Arc<str>,
    pub ltime: u64,
    /// 0 live, 1 tombstone, 2 hidden.
    pub kind: u8,
    pub reap_at: Option<Instant>,
    pub updated: Instant,
    pub decoded: Option<Decoded>,
}

impl ViewEntry {
    pub fn from_view(now: Instant, e: &EntryView, decoded: Option<Decoded>) -> Self {
        let (kind, reap_in) = match e.state {
            EntryState::Live => (0, None),
            EntryState::Tombstone { reap_in } => (1, Some(reap_in)),
            EntryState::Hidden { reap_in } => (2, Some(reap_in)),
        };
        ViewEntry {
            value: e.value.clone(),
            owner: Arc::from(e.owner.as_str()),
            ltime: e.ltime,
            kind,
            reap_at: reap_in.map(|d| now + d),
            updated: now.checked_sub(e.age).unwrap_or(now),
            decoded,
        }
    }

    fn to_view(&self, key: &str, now: Instant) -> EntryView {
        let reap_in = self.reap_at.map(|at| at.saturating_duration_since(now)).unwrap_or_default();
        EntryView {
            key: key.to_string(),
            value: self.value.clone(),
            owner: self.owner.to_string(),
            ltime: self.ltime,
            state: match self.kind {
                0 => EntryState::Live,
                1 => EntryState::Tombstone { reap_in },
                _ => EntryState::Hidden { reap_in },
            },
            age: now.saturating_duration_since(self.updated),
        }
    }
}

/// The agent's scalar state, replaced whole when it changes.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub id: NodeId,
    pub connected: bool,
    pub left: bool,
    pub members: Vec<MemberInfo>,
    pub unreachable_seeds: Vec<SocketAddr>,
    /// Networks attached here, `cluster` included.
    pub attached: Vec<String>,
    /// Alive attached peers of every network this node knows of.
    pub peers: BTreeMap<String, Vec<String>>,
    pub restored: BTreeMap<String, NetworkDef>,
    pub stats: Stats,
    pub ltime: u64,
    pub queues: Vec<(String, usize)>,
    /// Persist batches handed out and durable; the store's last error while it fails.
    pub persist_issued: u64,
    pub persist_durable: u64,
    pub persist_failing: Option<String>,
    /// Bytes of transmits held behind persist batches, and those dropped at the bound.
    pub held_bytes: usize,
    pub held_drops: u64,
    pub refused: Option<String>,
    /// The allocator: acceptors, rings, counters.
    pub alloc: crate::alloc::AllocReport,
    /// The overlay driver: its networks and counters (a network's peer records come from the
    /// agent on demand).
    pub overlay: crate::agent::OverlayReport,
}

type TableMap = Arc<DashMap<String, ViewEntry>>;

/// The read view (see the module doc). Cheap to share: clone the `Arc`.
#[derive(Debug)]
pub struct View {
    /// Network -> table -> entries; looked up by `&str`, so a write allocates only for what is
    /// new.
    nets: DashMap<String, DashMap<String, TableMap>>,
    snapshot: Mutex<Arc<Snapshot>>,
}

impl View {
    pub fn new(snapshot: Snapshot) -> Self {
        View { nets: DashMap::new(), snapshot: Mutex::new(Arc::new(snapshot)) }
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_snapshot(&self, s: Snapshot) {
        *self.snapshot.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(s);
    }

    fn table(&self, network: &str, table: &str) -> Option<TableMap> {
        self.nets.get(network)?.get(table).map(|t| t.clone())
    }

    /// Stores (or, with `None`, removes) one entry.
    pub fn set(&self, network: &str, table: &str, key: &str, e: Option<ViewEntry>) {
        match e {
            Some(e) => {
                let t = match self.table(network, table) {
                    Some(t) => t,
                    None => {
                        let tables = self.nets.entry(network.to_string()).or_default();
                        tables.entry(table.to_string()).or_default().clone()
                    }
                };
                t.insert(key.to_string(), e);
            }
            None => {
                if let Some(t) = self.table(network, table) {
                    t.remove(key);
                    if t.is_empty()
                        && let Some(tables) = self.nets.get(network)
                    {
                        tables.remove_if(table, |_, t| t.is_empty());
                    }
                }
            }
        }
    }

    /// Forgets everything of a network (it was detached, or attached anew).
    pub fn drop_network(&self, network: &str) {
        self.nets.remove(network);
    }

    /// Stored versions per (network, table).
    pub fn table_lens(&self) -> Vec<((String, String), usize)> {
        let mut out: Vec<_> = self
            .nets
            .iter()
            .flat_map(|n| {
                n.value()
                    .iter()
                    .map(|t| ((n.key().clone(), t.key().clone()), t.value().len()))
                    .collect::<Vec<_>>()
            })
            .collect();
        out.sort();
        out
    }
}

/// A [`View`] read at one instant.
#[derive(Debug)]
pub struct ViewRead<'a> {
    pub view: &'a View,
    pub snap: Arc<Snapshot>,
    pub now: Instant,
}

impl<'a> ViewRead<'a> {
    pub fn new(view: &'a View) -> Self {
        ViewRead { view, snap: view.snapshot(), now: Instant::now() }
    }
}

impl TableRead for ViewRead<'_> {
    fn node_name(&self) -> String {
        self.snap.id.name.to_string()
    }

    fn attached(&self) -> Vec<String> {
        self.snap.attached.clone()
    }

    fn is_attached(&self, network: &str) -> bool {
        self.snap.attached.iter().any(|n| n == network)
    }

    fn tables_of(&self, network: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .view
            .nets
            .get(network)
            .map(|tables| tables.iter().filter(|t| !t.value().is_empty()).map(|t| t.key().clone()).collect())
            .unwrap_or_default();
        out.sort();
        out
    }

    fn live(&self, network: &str, table: &str) -> Vec<(String, Bytes)> {
        let Some(t) = self.view.table(network, table) else { return Vec::new() };
        t.iter().filter(|e| e.kind == 0).map(|e| (e.key().clone(), e.value().value.clone())).collect()
    }

    fn entries(&self, network: &str, table: &str) -> Vec<(EntryView, Option<Decoded>)> {
        let Some(t) = self.view.table(network, table) else { return Vec::new() };
        let mut out: Vec<_> =
            t.iter().map(|e| (e.value().to_view(e.key(), self.now), e.value().decoded.clone())).collect();
        out.sort_by(|a, b| a.0.key.cmp(&b.0.key));
        out
    }

    fn live_value(&self, network: &str, table: &str, key: &str) -> Option<Bytes> {
        let t = self.view.table(network, table)?;
        t.get(key).filter(|e| e.kind == 0).map(|e| e.value.clone())
    }

    fn peers(&self, network: &str) -> Vec<String> {
        self.snap.peers.get(network).cloned().unwrap_or_default()
    }

    fn restored(&self, id: &str) -> Option<NetworkDef> {
        self.snap.restored.get(id).cloned()
    }
}

/// Appends one Prometheus counter (HELP, TYPE and value lines).
pub fn write_counter(out: &mut String, name: &str, help: &str, value: u64) {
    use std::fmt::Write;
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
}

/// Prometheus text exposition of the agent's state and counters, from the view.
pub fn metrics(view: &View) -> String {
    use std::fmt::Write;
    let r = ViewRead::new(view);
    let snap = &r.snap;
    let mut out = String::new();
    let mut by_state: BTreeMap<&str, usize> =
        ["alive", "suspect", "restarting", "failed", "left"].iter().map(|s| (*s, 0)).collect();
    for m in &snap.members {
        *by_state.entry(m.state.as_str()).or_default() += 1;
    }
    let _ = writeln!(out, "# HELP weft_members Cluster members as this node sees them, itself included.");
    let _ = writeln!(out, "# TYPE weft_members gauge");
    for (s, n) in &by_state {
        let _ = writeln!(out, "weft_members{{state=\"{s}\"}} {n}");
    }
    let _ = writeln!(out, "# HELP weft_entries Stored table entries (live, tombstoned, hidden).");
    let _ = writeln!(out, "# TYPE weft_entries gauge");
    for ((nid, t), n) in view.table_lens() {
        let _ = writeln!(out, "weft_entries{{network=\"{nid}\",table=\"{t}\"}} {n}");
    }
    let _ = writeln!(out, "# HELP weft_queue_length Table events waiting for dissemination.");
    let _ = writeln!(out, "# TYPE weft_queue_length gauge");
    for (nid, n) in &snap.queues {
        let _ = writeln!(out, "weft_queue_length{{network=\"{nid}\"}} {n}");
    }
    let s = &snap.stats;
    let counters: [(&str, &str, u64); 24] = [
        ("weft_datagrams_in_total", "Datagrams received.", s.datagrams_in),
        ("weft_datagrams_out_total", "Datagrams sent.", s.datagrams_out),
        ("weft_datagram_bytes_in_total", "Datagram bytes received.", s.bytes_in),
        ("weft_datagram_bytes_out_total", "Datagram bytes sent.", s.bytes_out),
        ("weft_stream_frames_in_total", "Stream frames received.", s.streams_in),
        ("weft_stream_frames_out_total", "Stream frames sent.", s.streams_out),
        ("weft_stream_bytes_in_total", "Stream bytes received.", s.stream_bytes_in),
        ("weft_stream_bytes_out_total", "Stream bytes sent.", s.stream_bytes_out),
        ("weft_decode_errors_total", "Frames dropped as undecodable.", s.decode_errors),
        ("weft_newer_version_frames_total", "Frames from a newer wire version.", s.newer_version_frames),
        ("weft_membership_errors_total", "Membership packets refused.", s.membership_errors),
        (
            "weft_foreign_network_events_total",
            "Events for networks not attached here.",
            s.foreign_network_events,
        ),
        ("weft_entries_applied_total", "Remote versions applied.", s.entries_applied),
        ("weft_entries_stale_total", "Remote versions ignored as not newer.", s.entries_stale),
        ("weft_queue_drops_total", "Queued events dropped at the queue bound.", s.queue_drops),
        ("weft_syncs_started_total", "Anti-entropy rounds started.", s.syncs_started),
        ("weft_syncs_identical_total", "Anti-entropy rounds that found identical state.", s.syncs_identical),
        (
            "weft_owners_hidden_failed_total",
            "Owners whose entries were hidden because membership declared them down.",
            s.owners_hidden_failed,
        ),
        (
            "weft_owners_hidden_unknown_total",
            "Owners whose entries were hidden because membership never knew them alive.",
            s.owners_hidden_unknown,
        ),
        (
            "weft_identity_moves_total",
            "Times this node moved its generation above an earlier life of its name.",
            s.identity_moves,
        ),
        (
            "weft_old_life_entries_removed_total",
            "Entries of earlier lives of this node's name that it deleted.",
            s.old_life_entries_removed,
        ),
        (
            "weft_records_expired_total",
            "Node and attachment records of long-gone members dropped.",
            s.records_expired,
        ),
        ("weft_records_refused_total", "Records of expired members refused.", s.records_refused),
        ("weft_nodes_removed_total", "Dead nodes this node removed (weft node rm).", s.nodes_removed),
    ];
    for (name, help, v) in counters {
        write_counter(&mut out, name, help, v);
    }
    let _ =
        writeln!(out, "# HELP weft_lamport_time The node's Lamport clock.\n# TYPE weft_lamport_time gauge");
    let _ = writeln!(out, "weft_lamport_time {}", snap.ltime);
    let _ = writeln!(
        out,
        "# HELP weft_networks_without_definition Networks attached here with no live definition in the cluster.\n# TYPE weft_networks_without_definition gauge"
    );
    let _ = writeln!(
        out,
        "weft_networks_without_definition {}",
        crate::read::attached_without_definition(&r).len()
    );
    let _ = writeln!(
        out,
        "# HELP weft_persist_pending Persist batches handed to the store and not yet durable.\n# TYPE weft_persist_pending gauge"
    );
    let _ = writeln!(out, "weft_persist_pending {}", snap.persist_issued - snap.persist_durable);
    let _ = writeln!(
        out,
        "# HELP weft_held_bytes Bytes of outbound traffic waiting for a persist batch.\n# TYPE weft_held_bytes gauge\nweft_held_bytes {}",
        snap.held_bytes
    );
    write_counter(
        &mut out,
        "weft_held_drops_total",
        "Outbound packets dropped because too much waited for the disk.",
        snap.held_drops,
    );
    alloc_metrics(&mut out, &r);
    overlay_metrics(&mut out, &snap.overlay);
    out
}

/// The allocator's part of `/metrics`.
fn overlay_metrics(out: &mut String, o: &crate::agent::OverlayReport) {
    use std::fmt::Write;
    let sandboxes = o.sandboxes;
    for (name, kind, help, v) in [
        (
            "weft_overlay_peer_records",
            "gauge",
            "Peer records held, in overlay networks attached here.",
            o.records as u64,
        ),
        (
            "weft_overlay_peer_records_unprogrammed",
            "gauge",
            "Peer records not programmed because their VTEP is not their owner's published data address.",
            o.unprogrammed as u64,
        ),
        (
            "weft_overlay_contested_addresses",
            "gauge",
            "Addresses held by two peer records (a handover in progress).",
            o.contested as u64,
        ),
        ("weft_overlay_sandboxes", "gauge", "Network sandboxes this host has.", sandboxes as u64),
        ("weft_dataplane_ops_total", "counter", "Data-plane operations handed out.", o.stats.ops),
        ("weft_dataplane_errors_total", "counter", "Data-plane operations that failed.", o.stats.op_errors),
        (
            "weft_overlay_malformed_records_total",
            "counter",
            "Peer records dropped as malformed.",
            o.stats.malformed_records,
        ),
        (
            "weft_overlay_resyncs_total",
            "counter",
            "Full re-assertions of a sandbox's peers.",
            o.stats.resyncs,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    }
    let _ = writeln!(
        out,
        "# HELP weft_dataplane_enabled Whether this agent programs a data plane.\n# TYPE weft_dataplane_enabled gauge\nweft_dataplane_enabled {}",
        u8::from(o.dataplane)
    );
}

fn alloc_metrics(out: &mut String, r: &ViewRead<'_>) {
    use std::fmt::Write;
    let a = &r.snap.alloc;
    let st = &a.stats;
    for (name, help, v) in [
        ("weft_ipam_allocations_total", "Addresses, subnets and VNIs this node allocated.", st.allocations),
        ("weft_ipam_releases_total", "Addresses, subnets and VNIs this node released.", st.releases),
        ("weft_ipam_donations_asked_total", "Donation requests this node sent.", st.donations_asked),
        ("weft_ipam_donations_granted_total", "Donations this node received.", st.donations_granted),
        (
            "weft_ipam_donations_refused_total",
            "Donation requests refused to this node.",
            st.donations_refused,
        ),
        ("weft_ipam_donations_given_total", "Donations this node made to others.", st.donations_given),
        ("weft_ipam_no_space_total", "Times no reachable owner had space for this node.", st.no_space),
        ("weft_ipam_violations_total", "Ring records refused for breaking ownership.", st.violations),
        (
            "weft_ipam_seed_conflicts_total",
            "Seeds seen that conflict with the installed one.",
            st.seed_conflicts,
        ),
        (
            "weft_ipam_bad_messages_total",
            "Allocator messages or records that did not decode.",
            st.bad_messages,
        ),
    ] {
        write_counter(out, name, help, v);
    }
    // One gauge per ring: (name, help, value and extra labels of each ring).
    let per_ring =
        |out: &mut String, name: &str, help: &str, v: &dyn Fn(&crate::alloc::RingReport) -> String| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for g in &a.rings {
                let _ = writeln!(out, "{name}{{network=\"{}\",ring=\"{}\"{}", g.network, g.ring, v(g));
            }
        };
    per_ring(out, "weft_ipam_free_slots", "Slots this node can still hand out, per ring.", &|g| {
        format!("}} {}", g.free_slots)
    });
    per_ring(out, "weft_ipam_allocated", "Slots this node holds allocated, per ring.", &|g| {
        format!("}} {}", g.allocated)
    });
    per_ring(
        out,
        "weft_ipam_ring_seeded",
        "Whether a ring is seeded (1), and usable (no seed conflict, not removed).",
        &|g| format!(",usable=\"{}\"}} {}", g.problem.is_none(), u8::from(g.seeded)),
    );
    per_ring(
        out,
        "weft_ipam_held_back",
        "Slots held back after a release or an inheritance, per ring.",
        &|g| format!("}} {}", g.quarantined),
    );
    let _ = writeln!(
        out,
        "# HELP weft_node_removed Whether this node's instance was removed from the cluster (weft node rm).
# TYPE weft_node_removed gauge
weft_node_removed {}",
        u8::from(a.removed_by.is_some())
    );
    let overlaps = crate::read::networks(r).iter().filter(|n| !n.subnet_overlap.is_empty()).count();
    let _ = writeln!(
        out,
        "# HELP weft_network_subnet_overlaps Networks whose subnet overlaps another's (created apart in a partition).
# TYPE weft_network_subnet_overlaps gauge
weft_network_subnet_overlaps {overlaps}"
    );
}

//! The agent's reads (`network ls/inspect`, `dump`, `table get`), written once over
//! [`TableRead`]: the owner task reads its gossip core through it, and the API reads the
//! [`View`](crate::view::View) the owner keeps current, so reads never wait for the owner.

use std::collections::BTreeMap;

use bytes::Bytes;
use weft_gossip::{
    ATTACH_TABLE, AttachRecord, CLUSTER_NETWORK, EntryState, EntryView, NODES_TABLE, NodeRecord,
};

use crate::agent::{
    Decoded, Dump, DumpEntry, DumpNetwork, DumpTable, NETWORKS_TABLE, NetworkDef, NetworkInfo,
};
use crate::alloc::{ENDPOINT_TABLE, Endpoint};
use crate::error::AgentError;

/// What the reads need of a node's stored state.
pub trait TableRead {
    fn node_name(&self) -> String;
    /// Networks attached here, [`CLUSTER_NETWORK`] included.
    fn attached(&self) -> Vec<String>;
    fn is_attached(&self, network: &str) -> bool;
    /// Tables of a network that hold at least one entry.
    fn tables_of(&self, network: &str) -> Vec<String>;
    /// Live entries of a table: (key, value), in any order.
    fn live(&self, network: &str, table: &str) -> Vec<(String, Bytes)>;
    /// Every stored version of a table (live, tombstoned, hidden), with what its driver makes
    /// of the value, sorted by key.
    fn entries(&self, network: &str, table: &str) -> Vec<(EntryView, Option<Decoded>)>;
    fn live_value(&self, network: &str, table: &str, key: &str) -> Option<Bytes>;
    /// Alive members attached to `network`, other than this node, sorted.
    fn peers(&self, network: &str) -> Vec<String>;
    /// The definition this node persisted for a network it is attached to.
    fn restored(&self, id: &str) -> Option<NetworkDef>;
}

/// What a client names a network by: its id, a unique id prefix, or its name.
fn matches_ref(def: &NetworkDef, r: &str) -> bool {
    def.id == r || def.name == r || def.id.starts_with(r)
}

/// Network ids are 32 lowercase hex digits.
pub fn is_network_id(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Every network definition the cluster holds, sorted by name then id.
pub fn networks(r: &impl TableRead) -> Vec<NetworkInfo> {
    let mut defs = Vec::new();
    for (key, v) in r.live(CLUSTER_NETWORK, NETWORKS_TABLE) {
        // Only well-formed definitions stored under their own id count (anyone can write this
        // table with --force).
        if let Ok(d) = serde_json::from_slice::<NetworkDef>(&v)
            && d.id == key
            && is_network_id(&key)
        {
            defs.push(d);
        }
    }
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    for d in &defs {
        *names.entry(d.name.as_str()).or_default() += 1;
    }
    let nets: Vec<Vec<ipnet::IpNet>> =
        defs.iter().map(|d| d.subnets.iter().filter_map(|s| s.parse().ok()).collect()).collect();
    let overlap = |i: usize| -> Vec<String> {
        defs.iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .filter(|(j, _)| nets[i].iter().any(|a| nets[*j].iter().any(|b| a.contains(b) || b.contains(a))))
            .map(|(_, d)| d.name.clone())
            .collect()
    };
    let mut out: Vec<NetworkInfo> = defs
        .iter()
        .enumerate()
        .map(|(i, d)| NetworkInfo {
            attached: r.is_attached(&d.id),
            peers: r.peers(&d.id),
            name_clash: names[d.name.as_str()] > 1,
            subnet_overlap: overlap(i),
            missing_definition: false,
            def: d.clone(),
        })
        .collect();
    out.sort_by(|a, b| (&a.def.name, &a.def.id).cmp(&(&b.def.name, &b.def.id)));
    out
}

/// Networks attached here with no live definition in the cluster table (see
/// [`NetworkInfo::missing_definition`]).
pub fn attached_without_definition(r: &impl TableRead) -> Vec<String> {
    r.attached()
        .into_iter()
        .filter(|id| id != CLUSTER_NETWORK && r.live_value(CLUSTER_NETWORK, NETWORKS_TABLE, id).is_none())
        .collect()
}

/// `network ls`: every definition, then the networks attached here that the cluster holds no
/// definition of, flagged.
pub fn network_list(r: &impl TableRead) -> Vec<NetworkInfo> {
    let mut all = networks(r);
    all.extend(attached_without_definition(r).into_iter().map(|id| NetworkInfo {
        def: r.restored(&id).unwrap_or_else(|| NetworkDef::id_only(&id)),
        attached: true,
        peers: r.peers(&id),
        name_clash: false,
        subnet_overlap: Vec::new(),
        missing_definition: true,
    }));
    all
}

/// Finds a network by id, unique id prefix or unique name.
pub fn resolve(r: &impl TableRead, name: &str) -> Result<NetworkInfo, AgentError> {
    if name.is_empty() {
        return Err(AgentError::NoSuchNetwork(name.to_string()));
    }
    let all = networks(r);
    if let Some(n) = all.iter().find(|n| n.def.id == name) {
        return Ok(n.clone());
    }
    let by_name: Vec<&NetworkInfo> = all.iter().filter(|n| n.def.name == name).collect();
    match by_name.len() {
        1 => return Ok(by_name[0].clone()),
        0 => {}
        _ => {
            let ids = by_name.iter().map(|n| n.def.short_id().to_string()).collect();
            return Err(AgentError::AmbiguousNetwork { name: name.to_string(), ids });
        }
    }
    let by_prefix: Vec<&NetworkInfo> = all.iter().filter(|n| matches_ref(&n.def, name)).collect();
    match by_prefix.len() {
        1 => Ok(by_prefix[0].clone()),
        0 => Err(AgentError::NoSuchNetwork(name.to_string())),
        _ => Err(AgentError::AmbiguousNetwork {
            name: name.to_string(),
            ids: by_prefix.iter().map(|n| n.def.short_id().to_string()).collect(),
        }),
    }
}

/// The gossip network id a client's network reference means (`cluster` is itself).
pub fn table_network(r: &impl TableRead, name: &str) -> Result<String, AgentError> {
    // `cluster`, or a network attached by id whose definition has not arrived yet.
    if name == CLUSTER_NETWORK || (is_network_id(name) && r.is_attached(name)) {
        return Ok(name.to_string());
    }
    Ok(resolve(r, name)?.def.id)
}

pub fn table_get(
    r: &impl TableRead,
    network: &str,
    table: &str,
    key: &str,
) -> Result<Option<Bytes>, AgentError> {
    let nid = table_network(r, network)?;
    Ok(r.live_value(&nid, table, key))
}

/// Everything this node holds, optionally limited to one network (id, prefix or name) and one
/// table.
pub fn dump(r: &impl TableRead, network: Option<&str>, table: Option<&str>) -> Result<Dump, AgentError> {
    let names: BTreeMap<String, String> =
        networks(r).into_iter().map(|n| (n.def.id.clone(), n.def.name.clone())).collect();
    let only = match network {
        Some(n) => Some(table_network(r, n)?),
        None => None,
    };
    let mut out = Vec::new();
    // `cluster` first, then the others by name.
    let mut nids = r.attached();
    nids.sort_by_key(|n| (n != CLUSTER_NETWORK, names.get(n).cloned().unwrap_or_default(), n.clone()));
    for nid in nids {
        if only.as_deref().is_some_and(|o| o != nid) {
            continue;
        }
        let mut tables = Vec::new();
        for t in r.tables_of(&nid) {
            if table.is_some_and(|only| only != t) {
                continue;
            }
            let entries =
                r.entries(&nid, &t).into_iter().map(|(e, d)| dump_entry(&t, e, d, &names)).collect();
            tables.push(DumpTable { name: t, entries });
        }
        let name =
            if nid == CLUSTER_NETWORK { nid.clone() } else { names.get(&nid).cloned().unwrap_or_default() };
        out.push(DumpNetwork { id: nid, name, tables });
    }
    Ok(Dump { node: r.node_name(), networks: out })
}

fn dump_entry(
    table: &str,
    e: EntryView,
    decoded: Option<Decoded>,
    names: &BTreeMap<String, String>,
) -> DumpEntry {
    use base64::Engine;
    let (state, reap_in) = match e.state {
        EntryState::Live => ("live", None),
        EntryState::Tombstone { reap_in } => ("tombstone", Some(reap_in)),
        EntryState::Hidden { reap_in } => ("hidden", Some(reap_in)),
    };
    let decoded = if table == ATTACH_TABLE {
        decode_attachment(&e.key, &e.value, names)
    } else if table == NODES_TABLE {
        decode_node_record(&e.key, &e.value)
    } else if e.state == EntryState::Live || matches!(e.state, EntryState::Hidden { .. }) {
        decoded
    } else {
        None
    };
    DumpEntry {
        key: e.key,
        owner: e.owner,
        ltime: e.ltime,
        state: state.to_string(),
        value: base64::engine::general_purpose::STANDARD.encode(&e.value),
        reap_in_ms: reap_in.map(|d| d.as_millis() as u64),
        age_ms: e.age.as_millis() as u64,
        decoded,
    }
}

/// Decodes the gossip core's own attachment records for dumps.
fn decode_attachment(key: &str, value: &[u8], names: &BTreeMap<String, String>) -> Option<Decoded> {
    let (network, node) = key.split_once(' ')?;
    let r = AttachRecord::decode(value).ok()?;
    let mut fields = BTreeMap::new();
    let network = names.get(network).cloned().unwrap_or_else(|| network.chars().take(12).collect());
    fields.insert("network".into(), network);
    fields.insert("generation".into(), r.generation.to_string());
    fields.insert("state".into(), if r.attached { "attached" } else { "detached" }.into());
    fields.insert("address".into(), r.addr.to_string());
    Some(Decoded { object_id: node.to_string(), fields })
}

/// Decodes the gossip core's node records for dumps.
fn decode_node_record(key: &str, value: &[u8]) -> Option<Decoded> {
    let r = NodeRecord::decode(value).ok()?;
    let mut fields = BTreeMap::new();
    fields.insert("instance".into(), format!("{:016x}", r.instance));
    fields.insert("generation".into(), r.generation.to_string());
    fields.insert("address".into(), r.addr.to_string());
    fields.insert("data address".into(), r.data_addr.to_string());
    fields.insert("status".into(), format!("{:?}", r.status).to_lowercase());
    Some(Decoded { object_id: key.to_string(), fields })
}

/// Endpoints this node sees: in network `nid` (an id), or in every network it is attached to;
/// sorted by network name, then endpoint name.
pub fn endpoints(r: &impl TableRead, nid: Option<&str>) -> Result<Vec<Endpoint>, AgentError> {
    let nets = match nid {
        Some(n) => vec![n.to_string()],
        None => r.attached().into_iter().filter(|n| n != CLUSTER_NETWORK).collect(),
    };
    let mut out = Vec::new();
    for n in nets {
        for (key, v) in r.live(&n, ENDPOINT_TABLE) {
            // Only well-formed records under their own id, in their own network, count.
            if let Ok(e) = serde_json::from_slice::<Endpoint>(&v)
                && e.id == key
                && e.network_id == n
            {
                out.push(e);
            }
        }
    }
    out.sort_by(|a, b| (&a.network, &a.name, &a.id).cmp(&(&b.network, &b.name, &b.id)));
    Ok(out)
}

/// The endpoint a client names (id, unique id prefix, or name) among `all` of one network.
pub fn find_endpoint(all: &[Endpoint], r: &str, network: &str) -> Result<Endpoint, AgentError> {
    if let Some(e) = all.iter().find(|e| e.id == r) {
        return Ok(e.clone());
    }
    let named: Vec<&Endpoint> = all.iter().filter(|e| e.name == r).collect();
    match named.as_slice() {
        [e] => return Ok((*e).clone()),
        [] => {}
        many => {
            return Err(AgentError::BadName(format!(
                "endpoint name {r:?} is ambiguous in network {network:?} (ids {}): use the id",
                many.iter().map(|e| e.short_id()).collect::<Vec<_>>().join(", ")
            )));
        }
    }
    let prefixed: Vec<&Endpoint> = all.iter().filter(|e| r.len() >= 4 && e.id.starts_with(r)).collect();
    match prefixed.as_slice() {
        [e] => Ok((*e).clone()),
        _ => Err(AgentError::NoSuchEndpoint(format!("{r} in network {network:?}"))),
    }
}

//! Human-readable output of the CLI and the demo.

use std::fmt::Write;

use base64::Engine;

use crate::agent::{Dump, DumpEntry, NetworkInfo};
use crate::api::MembersJson;

/// A left-aligned text table.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let n = cells.len();
        for (i, c) in cells.into_iter().enumerate() {
            if i + 1 == n {
                out.push_str(c);
            } else {
                let _ = write!(out, "{c:<width$}  ", width = w[i]);
            }
        }
        out.push('\n');
    };
    line(header.to_vec(), &mut out);
    for r in rows {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

pub fn members(m: &MembersJson) -> String {
    let rows: Vec<Vec<String>> = m
        .members
        .iter()
        .map(|x| {
            vec![
                x.name.clone(),
                x.addr.clone(),
                x.instance.get(..8).unwrap_or(&x.instance).to_string(),
                x.state.clone(),
                x.incarnation.to_string(),
                x.networks.len().to_string(),
            ]
        })
        .collect();
    let mut out = table(&["NAME", "ADDRESS", "INSTANCE", "STATE", "INCARNATION", "NETWORKS"], &rows);
    if !m.unreachable_seeds.is_empty() {
        let _ = writeln!(out, "\nseeds not reached yet: {}", m.unreachable_seeds.join(", "));
    }
    out
}

pub fn networks(ns: &[NetworkInfo]) -> String {
    let rows: Vec<Vec<String>> = ns
        .iter()
        .map(|n| {
            vec![
                n.def.short_id().to_string(),
                if n.missing_definition {
                    format!("{} (no definition)", n.def.name).trim_start().to_string()
                } else if n.name_clash {
                    format!("{} (!)", n.def.name)
                } else {
                    n.def.name.clone()
                },
                n.def.driver.clone(),
                if n.def.subnets.is_empty() {
                    "-".into()
                } else if !n.subnet_overlap.is_empty() {
                    format!("{} (!)", n.def.subnets.join(","))
                } else {
                    n.def.subnets.join(",")
                },
                if n.attached { "yes".into() } else { "no".into() },
                n.peers.len().to_string(),
            ]
        })
        .collect();
    let mut out = table(&["NETWORK ID", "NAME", "DRIVER", "SUBNETS", "ATTACHED", "PEERS"], &rows);
    if ns.iter().any(|n| n.name_clash) {
        out.push_str(
            "\n(!) two networks share this name (created on both sides of a partition): name them by id\n",
        );
    }
    if ns.iter().any(|n| !n.subnet_overlap.is_empty()) {
        out.push_str(
            "\n(!) subnet overlaps another network's (both created on two sides of a partition): remove one\n",
        );
    }
    if ns.iter().any(|n| n.missing_definition) {
        out.push_str(
            "\n(no definition): attached here, but the cluster holds no definition (removed while this node was away?): `weft network detach ID`\n",
        );
    }
    out
}

pub fn inspect(n: &NetworkInfo) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "ID:         {}", n.def.id);
    let _ = writeln!(
        out,
        "Name:       {}{}",
        n.def.name,
        if n.name_clash { "  (name shared with another network)" } else { "" }
    );
    let _ = writeln!(out, "Driver:     {}", n.def.driver);
    let _ = writeln!(
        out,
        "Subnets:    {}",
        if n.def.subnets.is_empty() { "-".into() } else { n.def.subnets.join(", ") }
    );
    if !n.subnet_overlap.is_empty() {
        let _ = writeln!(
            out,
            "Overlaps:   {}  (created apart in a partition: remove one)",
            n.subnet_overlap.join(", ")
        );
    }
    if let Some(gw) = &n.def.gateway {
        let _ = writeln!(out, "Gateway:    {gw}");
    }
    for (k, v) in &n.def.options {
        let _ = writeln!(out, "Option:     {k}={v}");
    }
    let _ = writeln!(out, "Created by: {}", n.def.created_by);
    let _ = writeln!(out, "Attached:   {}", if n.attached { "yes" } else { "no" });
    let _ = writeln!(out, "Peers:      {}", if n.peers.is_empty() { "-".into() } else { n.peers.join(", ") });
    out
}

pub fn endpoints(es: &[crate::alloc::Endpoint]) -> String {
    let rows: Vec<Vec<String>> = es
        .iter()
        .map(|e| {
            vec![
                e.short_id().to_string(),
                e.name.clone(),
                e.network.clone(),
                e.node.clone(),
                e.ipv4.clone(),
                e.mac.clone(),
            ]
        })
        .collect();
    table(&["ENDPOINT ID", "NAME", "NETWORK", "NODE", "IPV4", "MAC"], &rows)
}

pub fn endpoint(e: &crate::alloc::Endpoint) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "ID:       {}", e.id);
    let _ = writeln!(out, "Name:     {}", e.name);
    let _ = writeln!(out, "Network:  {} ({})", e.network, e.network_id.get(..12).unwrap_or(&e.network_id));
    let _ = writeln!(out, "Node:     {}", e.node);
    let _ = writeln!(out, "IPv4:     {}", e.ipv4);
    let _ = writeln!(out, "MAC:      {}", e.mac);
    let _ = writeln!(out, "Gateway:  {}", e.gateway.as_deref().unwrap_or("-"));
    out
}

/// `network inspect --verbose`: who owns which part of each subnet, and this node's view.
pub fn shares(shares: &[crate::api::Share], local: &[crate::alloc::RingReport]) -> String {
    let mut out = String::new();
    if !shares.is_empty() {
        let rows: Vec<Vec<String>> = shares
            .iter()
            .map(|s| {
                vec![
                    s.ring.clone(),
                    s.node.clone(),
                    s.ranges.join(", "),
                    s.free_blocks.map_or("?".into(), |f| f.to_string()),
                    s.endpoints.to_string(),
                ]
            })
            .collect();
        let _ = writeln!(out, "\nShares (as the replicated ring says):");
        out.push_str(&table(&["SUBNET", "NODE", "RANGES", "FREE BLOCKS", "ENDPOINTS"], &rows));
    }
    for r in local {
        let _ = writeln!(
            out,
            "\nThis node in {}: owns {} ({} free, {} used, {} held back after release or inheritance){}{}{}{}",
            r.ring,
            if r.owned.is_empty() { "nothing".to_string() } else { r.owned.join(", ") },
            r.free_slots,
            r.allocated,
            r.quarantined,
            r.requesting_from.as_ref().map(|t| format!("; asking {t} for a share")).unwrap_or_default(),
            if r.last_no_space.is_empty() {
                String::new()
            } else {
                format!("; last time no owner had space (asked {})", r.last_no_space.join(", "))
            },
            r.problem.as_ref().map(|p| format!("; {p}")).unwrap_or_default(),
            if r.fenced.is_empty() {
                String::new()
            } else {
                format!("; blocks of {} held until down or torn down", r.fenced.join(", "))
            },
        );
    }
    out
}

/// A value as text when it is printable UTF-8, else base64.
pub fn value(b64: &str) -> String {
    let raw = base64::engine::general_purpose::STANDARD.decode(b64).unwrap_or_default();
    match std::str::from_utf8(&raw) {
        Ok(s) if s.chars().all(|c| !c.is_control() || c == ' ') => s.to_string(),
        _ => format!("base64:{b64}"),
    }
}

fn ms(v: u64) -> String {
    if v >= 60_000 {
        format!("{}m{:02}s", v / 60_000, (v % 60_000) / 1000)
    } else if v >= 1000 {
        format!("{:.1}s", v as f64 / 1000.0)
    } else {
        format!("{v}ms")
    }
}

fn state(e: &DumpEntry) -> String {
    match (e.state.as_str(), e.reap_in_ms) {
        ("live", _) => "live".into(),
        (s, Some(r)) => format!("{s} ({} left)", ms(r)),
        (s, None) => s.into(),
    }
}

pub fn dump(d: &Dump, verbose: bool) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "node {}", d.node);
    for n in &d.networks {
        let label = if n.name == n.id || n.name.is_empty() {
            n.id.clone()
        } else {
            format!("{} ({})", n.name, &n.id[..n.id.len().min(12)])
        };
        let _ = writeln!(out, "\nnetwork {label}");
        if n.tables.is_empty() {
            let _ = writeln!(out, "  (no entries)");
        }
        for t in &n.tables {
            let _ = writeln!(out, "  table {} ({} entries)", t.name, t.entries.len());
            let rows: Vec<Vec<String>> = t
                .entries
                .iter()
                .map(|e| {
                    let mut r = vec![format!("    {}", e.key), e.owner.clone()];
                    if verbose {
                        r.push(e.ltime.to_string());
                        r.push(state(e));
                        r.push(ms(e.age_ms));
                        r.push(match &e.decoded {
                            Some(dec) => {
                                let fields: Vec<String> =
                                    dec.fields.iter().map(|(k, v)| format!("{k}: {v}")).collect();
                                if dec.object_id == e.key {
                                    format!("{{{}}}", fields.join(", "))
                                } else {
                                    format!("{} {{{}}}", dec.object_id, fields.join(", "))
                                }
                            }
                            None => value(&e.value),
                        });
                    } else {
                        r.push(value(&e.value));
                    }
                    r
                })
                .collect();
            let header: &[&str] = if verbose {
                &["    KEY", "OWNER", "LTIME", "STATE", "AGE", "VALUE / DECODED"]
            } else {
                &["    KEY", "OWNER", "VALUE"]
            };
            out.push_str(&table(header, &rows));
        }
    }
    out
}

/// `weft node rm`: a line per removed instance, its inheritances, and what was left alone.
pub fn node_rm(r: &crate::alloc::NodeRmReply) -> String {
    let mut out = String::new();
    for n in &r.removed {
        let blocks: u64 = n.rings.iter().map(|x| x.blocks).sum();
        let _ = writeln!(
            out,
            "removed {} (was {}): {} block(s) of {} ring(s) now this node's{}{}",
            n.node,
            n.state,
            blocks,
            n.rings.len(),
            if n.entries_deleted { ", its entries deleted cluster-wide" } else { "" },
            if n.fenced { ", held until it is down or tears down" } else { "" },
        );
        for x in &n.rings {
            let _ = writeln!(
                out,
                "  {} {}: {} block(s)",
                x.network.get(..12).unwrap_or(&x.network),
                x.ring,
                x.blocks
            );
        }
    }
    for s in &r.skipped {
        let _ = writeln!(out, "skipped {s}");
    }
    out
}

/// `network inspect --verbose` of an overlay network: the driver's peer records, what it asked
/// the data plane for, and the kernel's view next to it.
pub fn overlay(o: &crate::api::OverlayInspect) -> String {
    let d = &o.driver;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nOverlay on this host: VNI {}, UDP port {}, MTU {}; sandbox: {}",
        d.vni,
        d.port,
        d.mtu.map_or("underlay - 50".to_string(), |m| m.to_string()),
        if d.sandbox {
            format!("yes ({} endpoint(s) with an interface)", d.sandboxed_endpoints.len())
        } else {
            "none (no local endpoint with an interface)".to_string()
        }
    );
    if let Some(e) = &d.last_error {
        let _ = writeln!(out, "Last data-plane error: {e}");
    }
    let rows: Vec<Vec<String>> = d
        .peers
        .iter()
        .map(|p| {
            let state = if p.local {
                "local"
            } else if !p.valid {
                "not programmed: VTEP is not its owner's data address"
            } else if !p.active {
                "standby: a newer record holds the address"
            } else if d.sandbox {
                "programmed"
            } else {
                "known (no sandbox here)"
            };
            vec![
                p.endpoint.get(..12).unwrap_or(&p.endpoint).to_string(),
                p.ip.clone(),
                p.mac.to_string(),
                p.vtep.to_string(),
                p.owner.clone(),
                p.ltime.to_string(),
                state.to_string(),
            ]
        })
        .collect();
    if !rows.is_empty() {
        out.push_str(&table(&["PEER", "IP", "MAC", "VTEP", "OWNER", "LTIME", "STATE"], &rows));
    }
    match (&o.kernel, &o.kernel_error) {
        (_, Some(e)) => {
            let _ = writeln!(out, "Kernel: cannot read it: {e}");
        }
        (None, None) => {
            let _ = writeln!(out, "Kernel: this agent has no data plane");
        }
        (Some(k), None) => {
            let _ = writeln!(
                out,
                "Kernel (read back): {}",
                if k.sandbox {
                    format!(
                        "vxlan0 VNI {} port {} MTU {}, {} neighbour(s), {} fdb entr{}",
                        k.vni.map_or("?".into(), |v| v.to_string()),
                        k.port.map_or("?".into(), |v| v.to_string()),
                        k.mtu.map_or("?".into(), |v| v.to_string()),
                        k.neighbours.len(),
                        k.fdb.len(),
                        if k.fdb.len() == 1 { "y" } else { "ies" }
                    )
                } else {
                    "no sandbox".to_string()
                }
            );
            let rows: Vec<Vec<String>> = k
                .neighbours
                .iter()
                .map(|(ip, mac)| {
                    let dst =
                        k.fdb.iter().find(|(m, _)| m == mac).map_or("-".to_string(), |(_, v)| v.to_string());
                    vec![ip.to_string(), mac.to_string(), dst]
                })
                .collect();
            if !rows.is_empty() {
                out.push_str(&table(&["NEIGHBOUR", "LLADDR", "FDB DST"], &rows));
            }
            if o.differences.is_empty() {
                let _ = writeln!(out, "The kernel matches the tables.");
            } else {
                let _ = writeln!(out, "The kernel DIFFERS from the tables ({}):", o.differences.len());
                for d in &o.differences {
                    let _ = writeln!(out, "  {d}");
                }
            }
        }
    }
    out
}

//! `weft demo`: a real local cluster in one process. Each agent has its own UDP and TCP sockets
//! on 127.0.0.1, its own data dir and control socket; they join, define a network, write
//! entries from every node, and the demo prints what each node holds once all agree.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use weft_gossip::{Config as GossipConfig, MemberState};

use crate::agent::{Command, Reply};
use crate::config::AgentConfig;
use crate::format;
use crate::read;
use crate::shell::Shell;

const NETWORK: &str = "demo";
const TABLE: &str = "endpoints";

async fn start_one(i: usize, dir: PathBuf, seeds: &[SocketAddr]) -> anyhow::Result<Shell> {
    let cfg = AgentConfig {
        name: Some(format!("node-{i}")),
        bind: SocketAddr::from(([127, 0, 0, 1], 0)),
        advertise: None,
        join: seeds.iter().map(ToString::to_string).collect(),
        data_dir: dir,
        data_addr: None,
        restart_grace: Duration::from_secs(crate::config::DEFAULT_RESTART_GRACE_S),
        leave_on_stop: false,
    };
    // The OS picks a free UDP port; TCP must get the same one, so retry on the rare clash.
    let mut last = None;
    for _ in 0..20 {
        match Shell::start(&cfg, GossipConfig::lan(8)).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("tried")).context("cannot start an agent on 127.0.0.1")
}

async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    while !cond() {
        if t0.elapsed() > limit {
            bail!("timed out after {limit:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(t0.elapsed())
}

pub async fn run(nodes: usize, exit: bool) -> anyhow::Result<()> {
    let base = std::env::temp_dir().join(format!("weft-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let result = demo(&base, nodes, exit).await;
    let _ = std::fs::remove_dir_all(&base);
    result
}

async fn demo(base: &std::path::Path, nodes: usize, exit: bool) -> anyhow::Result<()> {
    println!("starting {nodes} agents on 127.0.0.1 (data dirs under {})", base.display());
    let t_start = Instant::now();
    let mut shells: Vec<Shell> = Vec::new();
    let mut apis = Vec::new();
    for i in 0..nodes {
        let seeds: Vec<SocketAddr> = shells.iter().take(2).map(|s| s.addr).collect();
        let dir = base.join(format!("node-{i}"));
        let s = start_one(i, dir.clone(), &seeds).await?;
        apis.push(crate::api::serve(s.clone(), &dir.join("weft.sock")).await?);
        println!("  node-{i}  gossip {}  control unix://{}", s.addr, dir.join("weft.sock").display());
        shells.push(s);
    }
    let joined = wait_until("every agent sees every other alive", Duration::from_secs(20), || {
        shells
            .iter()
            .all(|s| s.read().snap.members.iter().filter(|m| m.state == MemberState::Alive).count() == nodes)
    })
    .await?;
    let _ = joined;
    println!(
        "all {nodes} agents see each other alive, {:.1} ms after the first one started",
        t_start.elapsed().as_secs_f64() * 1000.0
    );

    let create = Command::CreateNetwork {
        name: NETWORK.into(),
        driver: "overlay".into(),
        subnets: vec!["10.42.0.0/24".to_string()],
        gateway: None,
    };
    let Reply::Network(def) = shells[0].command(create).await? else {
        bail!("network create: unexpected reply")
    };
    println!("node-0 created network {} ({}), subnet 10.42.0.0/24", def.name, def.short_id());
    wait_until("the network definition reaches every agent", Duration::from_secs(10), || {
        shells.iter().all(|s| read::resolve(&s.read(), NETWORK).is_ok())
    })
    .await?;
    for s in &shells[1..] {
        s.command(Command::Attach { network: NETWORK.into() }).await?;
    }
    wait_until("every agent sees every other attached", Duration::from_secs(10), || {
        shells
            .iter()
            .all(|s| read::resolve(&s.read(), NETWORK).map(|n| n.peers.len() + 1 == nodes).unwrap_or(false))
    })
    .await?;

    let t_write = Instant::now();
    for (i, s) in shells.iter().enumerate() {
        for j in 0..2 {
            let value =
                format!("10.42.0.{}/24 mac 02:42:0a:2a:00:{:02x} on node-{i}", 2 + 2 * i + j, 2 + 2 * i + j);
            let put = Command::TablePut {
                network: NETWORK.into(),
                table: TABLE.into(),
                key: format!("ep-{i}-{j}"),
                value: Bytes::from(value),
                force: false,
            };
            s.command(put).await?;
        }
    }
    let want = 2 * nodes;
    let converged = wait_until("every agent holds every entry", Duration::from_secs(20), || {
        shells.iter().all(|s| {
            read::dump(&s.read(), Some(NETWORK), Some(TABLE)).map(|d| live_entries(&d)).unwrap_or(0) == want
        })
    })
    .await?;
    println!(
        "{want} entries written on {nodes} agents reached every agent in {:.1} ms (wall clock, real sockets)\n",
        converged.as_secs_f64() * 1000.0
    );
    let _ = t_write;
    for s in &shells {
        let d = read::dump(&s.read(), None, None)?;
        println!("{}", "=".repeat(100));
        print!("{}", format::dump(&d, true));
    }
    println!("{}", "=".repeat(100));
    println!("done in {:.1} ms from the first agent's start", t_start.elapsed().as_secs_f64() * 1000.0);
    if !exit {
        let sock = base.join("node-0").join("weft.sock");
        println!("\nthe cluster keeps running; in another terminal try:");
        println!("  weft -H unix://{} members", sock.display());
        println!("  weft -H unix://{} dump --verbose", sock.display());
        println!("press Ctrl-C to stop");
        tokio::signal::ctrl_c().await?;
    }
    for s in &shells {
        let _ = s.command(Command::Leave).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for a in apis {
        a.abort();
    }
    Ok(())
}

fn live_entries(d: &crate::agent::Dump) -> usize {
    d.networks.iter().flat_map(|n| &n.tables).flat_map(|t| &t.entries).filter(|e| e.state == "live").count()
}

//! `weft demo`: a real local cluster in one process. Each agent has its own UDP and TCP sockets
//! on 127.0.0.1, its own data dir and control socket; they join, seed the cluster rings (VNIs,
//! default pool) by Paxos among the acceptors, define a network (its subnet and VNI allocated,
//! not made up), create endpoints on every node from each node's own share, and the demo prints
//! what each node holds once all agree.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use weft_gossip::{Config as GossipConfig, MemberState};

use crate::agent::{Command, Reply};
use crate::config::AgentConfig;
use crate::format;
use crate::read;
use crate::shell::Shell;

const NETWORK: &str = "demo";
const ENDPOINTS_PER_NODE: usize = 2;

async fn start_one(
    i: usize,
    dir: PathBuf,
    seeds: &[SocketAddr],
    acceptors: &[String],
) -> anyhow::Result<Shell> {
    let cfg = AgentConfig {
        name: Some(format!("node-{i}")),
        bind: SocketAddr::from(([127, 0, 0, 1], 0)),
        advertise: None,
        join: seeds.iter().map(ToString::to_string).collect(),
        data_dir: dir,
        data_addr: None,
        restart_grace: Duration::from_secs(crate::config::DEFAULT_RESTART_GRACE_S),
        leave_on_stop: false,
        // The OS picks the ports, so the first agent cannot list itself in a seed list: the
        // acceptors are named instead, alike on every agent.
        alloc: crate::alloc::AllocConfig { acceptors: Some(acceptors.to_vec()), ..Default::default() },
        // The demo runs anywhere, privileges or not: records only, no interfaces.
        dataplane: Some(false),
        run_dir: std::env::temp_dir().join("weft-demo-run"),
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
    let acceptors: Vec<String> = (0..nodes.min(3)).map(|i| format!("node-{i}")).collect();
    for i in 0..nodes {
        let seeds: Vec<SocketAddr> = shells.iter().take(2).map(|s| s.addr).collect();
        let dir = base.join(format!("node-{i}"));
        let s = start_one(i, dir.clone(), &seeds, &acceptors).await?;
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

    wait_until(
        "the VNI range and the default pool are seeded on every agent",
        Duration::from_secs(20),
        || {
            shells.iter().all(|s| {
                let a = &s.read().snap.alloc;
                a.rings.iter().filter(|r| r.network == weft_gossip::CLUSTER_NETWORK && r.seeded).count() == 2
            })
        },
    )
    .await?;
    println!(
        "acceptors {} seeded the VNI range and the default pool 10.0.0.0/8 (/24s) by Paxos, {:.1} ms after the first start",
        acceptors.join(", "),
        t_start.elapsed().as_secs_f64() * 1000.0
    );

    let create = Command::CreateNetwork {
        name: NETWORK.into(),
        driver: "overlay".into(),
        subnets: vec![],
        gateway: None,
        options: Default::default(),
    };
    let Reply::Network(def) = shells[0].command(create).await? else {
        bail!("network create: unexpected reply")
    };
    println!(
        "node-0 created network {} ({}): subnet {} from its share of the default pool, VNI {}, gateway {}",
        def.name,
        def.short_id(),
        def.subnets.join(","),
        def.options.get(crate::alloc::VXLANID_OPTION).map_or("-", String::as_str),
        def.gateway.as_deref().unwrap_or("-")
    );
    wait_until("the network definition reaches every agent", Duration::from_secs(10), || {
        shells.iter().all(|s| read::resolve(&s.read(), NETWORK).is_ok())
    })
    .await?;

    // Every node creates its endpoints concurrently: the first one on a node attaches it and
    // asks node-0 for a share of the subnet; the rest come from that share, no round trip.
    let t_eps = Instant::now();
    let mut tasks = Vec::new();
    for (i, s) in shells.iter().enumerate() {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for j in 0..ENDPOINTS_PER_NODE {
                let cmd = Command::EndpointCreate {
                    network: NETWORK.into(),
                    name: format!("web-{i}-{j}"),
                    ip: None,
                    mac: None,
                    sandbox: None,
                };
                out.push(s.command(cmd).await);
            }
            out
        }));
    }
    for t in tasks {
        for r in t.await? {
            if !matches!(r?, Reply::Endpoint(_)) {
                bail!("endpoint create: unexpected reply");
            }
        }
    }
    let want = ENDPOINTS_PER_NODE * nodes;
    let converged = wait_until("every agent sees every endpoint", Duration::from_secs(20), || {
        shells.iter().all(|s| read::endpoints(&s.read(), Some(&def.id)).map(|e| e.len()).unwrap_or(0) == want)
    })
    .await?;
    println!(
        "{want} endpoints created on {nodes} agents (addresses allocated locally, durable before each reply) and seen by every agent in {:.1} ms (wall clock, real sockets)\n",
        (t_eps.elapsed()).as_secs_f64() * 1000.0
    );
    let _ = converged;
    println!(
        "each node's share of {} (its own, from donation where it is not the creator):",
        def.subnets.join(",")
    );
    for (i, s) in shells.iter().enumerate() {
        let snap = s.read().snap.clone();
        let ring = snap.alloc.rings.iter().find(|r| r.network == def.id);
        match ring {
            Some(r) => println!(
                "  node-{i}: {}  ({} free, {} allocated)",
                if r.owned.is_empty() { "-".to_string() } else { r.owned.join(", ") },
                r.free_slots,
                r.allocated
            ),
            None => println!("  node-{i}: -"),
        }
    }
    println!();
    print!("{}", format::endpoints(&read::endpoints(&shells[0].read(), Some(&def.id))?));
    println!();
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

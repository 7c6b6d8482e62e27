//! The `weft` command line.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Args, CommandFactory, Parser, Subcommand};
use hyper::Method;
use weft_gossip::Config as GossipConfig;

use crate::agent::{Dump, NetworkDef, NetworkInfo};
use crate::alloc::Endpoint;
use crate::api::{self, CreateEndpoint, CreateNetwork, Inspect, MembersJson};
use crate::client::{Client, Host, enc};
use crate::config::{self, Layer};
use crate::format;
use crate::shell::{self, Shell};

#[derive(Debug, Parser)]
#[command(name = "weft", version, about = "weft: cluster networking control plane", propagate_version = true)]
pub struct Cli {
    /// The agent to talk to: unix:///path/to/weft.sock [env: WEFT_HOST; default: unix:///var/lib/weft/weft.sock]
    #[arg(short = 'H', long = "host", global = true)]
    pub host: Option<String>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Run the agent on this host
    Agent(AgentArgs),
    /// List cluster members as this agent sees them
    Members {
        #[arg(long)]
        json: bool,
    },
    /// Leave the cluster for good: peers delete this node's entries at once, and the agent exits
    /// (a plain stop, SIGTERM, is a restart: peers keep its entries for --restart-grace)
    Leave,
    /// Create, list, inspect, remove, attach to and detach from networks
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Create, list, inspect and remove endpoints: addresses from this node's share
    #[command(subcommand)]
    Endpoint(EndpointCmd),
    /// Show every table entry this agent holds
    Dump {
        /// Only this network (id, id prefix or name; `cluster` for the reserved one)
        #[arg(long)]
        network: Option<String>,
        /// Only this table
        #[arg(long)]
        table: Option<String>,
        /// Add Lamport time, state, age and the driver's decoding
        #[arg(long, short)]
        verbose: bool,
        #[arg(long)]
        json: bool,
    },
    /// Diagnostic writes and reads of table entries
    #[command(subcommand)]
    Table(TableCmd),
    /// Remove dead nodes: this node inherits their shares (of networks it is not on, the
    /// lowest-named live node attached there does)
    #[command(subcommand)]
    Node(NodeCmd),
    /// Start a local cluster of real agents on 127.0.0.1 and show its replicated tables
    Demo {
        /// Number of agents
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=64))]
        nodes: u16,
        /// Exit after printing instead of running until Ctrl-C
        #[arg(long)]
        exit: bool,
    },
    /// Print shell completions
    Completions { shell: clap_complete::Shell },
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Unique node name [env: WEFT_NAME; default: the host name]
    #[arg(long)]
    pub name: Option<String>,
    /// Gossip address, UDP and TCP [env: WEFT_BIND; default: 0.0.0.0:7946]
    #[arg(long)]
    pub bind: Option<String>,
    /// Address peers reach this node at [env: WEFT_ADVERTISE; default: guessed]
    #[arg(long)]
    pub advertise: Option<String>,
    /// Seeds: host or address, comma-separated [env: WEFT_JOIN]
    #[arg(long, value_delimiter = ',')]
    pub join: Option<Vec<String>>,
    /// Where identity and state live [env: WEFT_DATA_DIR; default: /var/lib/weft]
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Data-plane (VTEP) address published for this node [env: WEFT_DATA_ADDR; default: the
    /// advertised IP]
    #[arg(long)]
    pub data_addr: Option<String>,
    /// Seconds this agent keeps a peer's entries live after the peer stopped for a restart
    /// (give every agent the same value) [env: WEFT_RESTART_GRACE; default: 60]
    #[arg(long, value_name = "SECONDS")]
    pub restart_grace: Option<u64>,
    /// On SIGTERM/SIGINT leave the cluster for good instead of announcing a restart [env:
    /// WEFT_LEAVE_ON_STOP]
    #[arg(long)]
    pub leave_on_stop: bool,
    /// Node names of the acceptors that seed the VNI range and the default pool, comma-separated
    /// (give every agent the same) [env: WEFT_ACCEPTORS; default: the names of the nodes at the
    /// --join addresses]
    #[arg(long, value_delimiter = ',')]
    pub acceptors: Option<Vec<String>>,
    /// The default global pool and the prefix of the subnets cut from it, as POOL/PREFIX; fixed
    /// once the cluster seeded it [env: WEFT_DEFAULT_POOL; default: 10.0.0.0/8/24]
    #[arg(long, value_name = "POOL/PREFIX")]
    pub default_pool: Option<String>,
    /// Seconds a released address or VNI stays out of use, unless nothing else is free [env:
    /// WEFT_REUSE_AFTER; default: 60]
    #[arg(long, value_name = "SECONDS")]
    pub reuse_after: Option<u64>,
    /// The data plane: linux (network namespaces, VXLAN, through netlink; needs root) or none
    /// (records only: endpoints get no interface) [env: WEFT_DATAPLANE; default: linux if this
    /// process may program it, else none with a warning]
    #[arg(long, value_name = "linux|none")]
    pub dataplane: Option<String>,
    /// Where network sandboxes are bind-mounted, under netns/ (give each agent on one machine
    /// its own) [env: WEFT_RUN_DIR; default: /run/weft]
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// TOML config file (keys: name, bind, advertise, join, data_dir, data_addr, restart_grace,
    /// leave_on_stop, acceptors, default_pool, reuse_after, dataplane, run_dir) [env: WEFT_CONFIG]
    #[arg(long)]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum NetworkCmd {
    /// Define a network cluster-wide and attach this node
    Create {
        name: String,
        #[arg(long, default_value = "overlay")]
        driver: String,
        /// Subnet in CIDR form; repeat for several
        #[arg(long)]
        subnet: Vec<String>,
        #[arg(long)]
        gateway: Option<String>,
        /// Driver option KEY=VALUE; repeat for several (overlay: com.docker.network.driver.mtu,
        /// com.docker.network.driver.overlay.vxlan_port [default 4789])
        #[arg(long = "opt", short = 'o', value_name = "KEY=VALUE", value_parser = parse_key_value)]
        opt: Vec<(String, String)>,
    },
    /// List networks
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Show one network (by id, id prefix or name)
    Inspect {
        network: String,
        #[arg(long, short)]
        verbose: bool,
        #[arg(long)]
        json: bool,
    },
    /// Remove a network cluster-wide
    Rm {
        network: String,
        /// Even while other nodes are attached
        #[arg(long)]
        force: bool,
    },
    /// Attach this node to a network
    Attach { network: String },
    /// Detach this node from a network
    Detach { network: String },
}

#[derive(Debug, Subcommand)]
pub enum EndpointCmd {
    /// Allocate an address from this node's share of the network's subnet (attaching this node
    /// if needed) and publish the endpoint
    Create {
        network: String,
        name: String,
        /// A specific free address in this node's share
        #[arg(long)]
        ip: Option<std::net::IpAddr>,
        /// MAC address [default: 02:42 and the IPv4 address's bytes, as Docker]
        #[arg(long)]
        mac: Option<String>,
        /// Network namespace to give the endpoint an interface in (eth0, with its address, MAC
        /// and the network's MTU), e.g. /run/netns/NAME; the reply comes once it is up.
        /// Without it the endpoint gets its address and records but no interface
        #[arg(long, value_name = "NETNS_PATH")]
        sandbox: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// List endpoints (of one network, or of every network this node is attached to)
    Ls {
        network: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Show one endpoint (by name, id or id prefix)
    Inspect {
        network: String,
        endpoint: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove one of this node's endpoints; its address is held back for reuse_after
    Rm { network: String, endpoint: String },
}

#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    /// Remove the instances of NAME that are down (or NAME@INSTANCE, the instance id or a
    /// prefix of it, as `weft members` and `network inspect --verbose` show them): their shares
    /// come to this node, their entries are deleted everywhere, and an instance that comes
    /// back deletes its endpoints and allocates nothing more
    Rm {
        node: String,
        /// Also remove an instance membership still sees alive (its blocks are held until it is
        /// down or confirms its teardown)
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum TableCmd {
    /// Create or update an entry
    Put {
        network: String,
        table: String,
        key: String,
        value: String,
        #[arg(long)]
        force: bool,
    },
    /// Print an entry's value
    Get { network: String, table: String, key: String },
    /// Delete an entry
    Rm {
        network: String,
        table: String,
        key: String,
        #[arg(long)]
        force: bool,
    },
    /// Write many `key value` lines (from FILE or stdin) in one request
    Load {
        network: String,
        table: String,
        file: Option<PathBuf>,
        #[arg(long)]
        force: bool,
    },
}

/// Writes CLI output; a closed pipe (`weft dump | head`) ends the program quietly.
fn out(text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if stdout.write_all(text.as_bytes()).and_then(|_| stdout.flush()).is_err() {
        std::process::exit(0);
    }
}

fn outln(text: &str) {
    out(&format!("{text}\n"));
}

fn init_logs(default: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colour only on a terminal: a log file or the journal gets plain text.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let host = || -> anyhow::Result<Client> {
        let h = cli.host.clone().or_else(|| std::env::var("WEFT_HOST").ok());
        Ok(Client::new(Host::parse(h.as_deref())?))
    };
    match cli.cmd {
        Cmd::Agent(args) => run_agent(args).await,
        Cmd::Members { json } => {
            let m: MembersJson = host()?.get_json("/members").await?;
            if json {
                outln(&serde_json::to_string_pretty(&m.members)?);
            } else {
                out(&format::members(&m));
            }
            Ok(())
        }
        Cmd::Leave => {
            let c = host()?;
            c.call(Method::POST, "/leave", Bytes::new()).await?;
            // The agent exits once the news is out: wait for its socket to go.
            let sock = c.socket_path().to_path_buf();
            let t0 = std::time::Instant::now();
            while std::os::unix::net::UnixStream::connect(&sock).is_ok() {
                if t0.elapsed() > Duration::from_secs(10) {
                    bail!(
                        "the agent left the cluster but is still running after 10 s (unix://{})",
                        sock.display()
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            outln("left the cluster");
            Ok(())
        }
        Cmd::Network(cmd) => network(host()?, cmd).await,
        Cmd::Dump { network, table, verbose, json } => {
            let mut q = Vec::new();
            if let Some(n) = &network {
                q.push(format!("network={}", enc(n)));
            }
            if let Some(t) = &table {
                q.push(format!("table={}", enc(t)));
            }
            let d: Dump = host()?.get_json(&format!("/dump?{}", q.join("&"))).await?;
            if json {
                outln(&serde_json::to_string_pretty(&d)?);
            } else {
                out(&format::dump(&d, verbose));
            }
            Ok(())
        }
        Cmd::Table(cmd) => table(host()?, cmd).await,
        Cmd::Endpoint(cmd) => endpoint(host()?, cmd).await,
        Cmd::Node(NodeCmd::Rm { node, force, json }) => {
            if node.is_empty() || node.chars().any(char::is_control) {
                anyhow::bail!("node rm: expected NAME or NAME@INSTANCE, got {node:?}");
            }
            let r: crate::alloc::NodeRmReply = host()?
                .send_json(Method::DELETE, &format!("/nodes/{}?force={force}", enc(&node)), &())
                .await?;
            if json {
                outln(&serde_json::to_string_pretty(&r)?);
            } else {
                out(&format::node_rm(&r));
            }
            Ok(())
        }
        Cmd::Demo { nodes, exit } => {
            init_logs("warn");
            crate::demo::run(nodes as usize, exit).await
        }
        Cmd::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "weft", &mut std::io::stdout());
            Ok(())
        }
    }
}

/// `KEY=VALUE`, for `-o`.
fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

async fn network(c: Client, cmd: NetworkCmd) -> anyhow::Result<()> {
    match cmd {
        NetworkCmd::Create { name, driver, subnet, gateway, opt } => {
            let req =
                CreateNetwork { name, driver, subnets: subnet, gateway, options: opt.into_iter().collect() };
            let def: NetworkDef = c.send_json(Method::POST, "/networks", &req).await?;
            outln(&def.id);
        }
        NetworkCmd::Ls { json } => {
            let ns: Vec<NetworkInfo> = c.get_json("/networks").await?;
            if json {
                outln(&serde_json::to_string_pretty(&ns)?);
            } else {
                out(&format::networks(&ns));
            }
        }
        NetworkCmd::Inspect { network, verbose, json } => {
            let i: Inspect = c.get_json(&format!("/networks/{}?verbose={verbose}", enc(&network))).await?;
            if json {
                outln(&serde_json::to_string_pretty(&i)?);
            } else {
                out(&format::inspect(&i.network));
                if verbose {
                    out(&format::shares(&i.shares, &i.local));
                }
                if let Some(o) = &i.overlay {
                    out(&format::overlay(o));
                }
                if let Some(d) = &i.dump {
                    out(&format::dump(d, true));
                }
            }
        }
        NetworkCmd::Rm { network, force } => {
            let def: NetworkDef = c
                .send_json(Method::DELETE, &format!("/networks/{}?force={force}", enc(&network)), &())
                .await?;
            outln(&def.id);
        }
        NetworkCmd::Attach { network } => {
            let def: NetworkDef =
                c.send_json(Method::POST, &format!("/networks/{}/attach", enc(&network)), &()).await?;
            outln(&def.id);
        }
        NetworkCmd::Detach { network } => {
            let def: NetworkDef =
                c.send_json(Method::POST, &format!("/networks/{}/detach", enc(&network)), &()).await?;
            outln(&def.id);
        }
    }
    Ok(())
}

async fn endpoint(c: Client, cmd: EndpointCmd) -> anyhow::Result<()> {
    match cmd {
        EndpointCmd::Create { network, name, ip, mac, sandbox, json } => {
            // The agent opens the namespace: a relative path would mean its directory, not ours.
            let sandbox = match sandbox {
                Some(p) if p.is_relative() => Some(std::env::current_dir()?.join(p)),
                s => s,
            };
            let req = CreateEndpoint { name, ip, mac, sandbox: sandbox.map(|p| p.display().to_string()) };
            let e: Endpoint =
                c.send_json(Method::POST, &format!("/networks/{}/endpoints", enc(&network)), &req).await?;
            if json {
                outln(&serde_json::to_string_pretty(&e)?);
            } else {
                out(&format::endpoint(&e));
            }
        }
        EndpointCmd::Ls { network, json } => {
            let q = network.map(|n| format!("?network={}", enc(&n))).unwrap_or_default();
            let es: Vec<Endpoint> = c.get_json(&format!("/endpoints{q}")).await?;
            if json {
                outln(&serde_json::to_string_pretty(&es)?);
            } else {
                out(&format::endpoints(&es));
            }
        }
        EndpointCmd::Inspect { network, endpoint, json } => {
            let e: Endpoint =
                c.get_json(&format!("/networks/{}/endpoints/{}", enc(&network), enc(&endpoint))).await?;
            if json {
                outln(&serde_json::to_string_pretty(&e)?);
            } else {
                out(&format::endpoint(&e));
            }
        }
        EndpointCmd::Rm { network, endpoint } => {
            let e: Endpoint = c
                .send_json(
                    Method::DELETE,
                    &format!("/networks/{}/endpoints/{}", enc(&network), enc(&endpoint)),
                    &(),
                )
                .await?;
            outln(&e.id);
        }
    }
    Ok(())
}

async fn table(c: Client, cmd: TableCmd) -> anyhow::Result<()> {
    let path = |n: &str, t: &str, k: &str| format!("/tables/{}/{}/{}", enc(n), enc(t), enc(k));
    match cmd {
        TableCmd::Put { network, table, key, value, force } => {
            c.call(
                Method::PUT,
                &format!("{}?force={force}", path(&network, &table, &key)),
                Bytes::from(value),
            )
            .await?;
        }
        TableCmd::Get { network, table, key } => {
            let v = c.call(Method::GET, &path(&network, &table, &key), Bytes::new()).await?;
            outln(&String::from_utf8_lossy(&v));
        }
        TableCmd::Rm { network, table, key, force } => {
            c.call(Method::DELETE, &format!("{}?force={force}", path(&network, &table, &key)), Bytes::new())
                .await?;
        }
        TableCmd::Load { network, table, file, force } => {
            let text = match &file {
                Some(f) => {
                    std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?
                }
                None => {
                    let mut s = String::new();
                    std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                        .context("cannot read stdin")?;
                    s
                }
            };
            if let Err(e) = api::parse_load(&text) {
                bail!("{}: {e}", file.as_ref().map_or("stdin".to_string(), |f| f.display().to_string()));
            }
            let url = format!("/tables/{}/{}?force={force}", enc(&network), enc(&table));
            let v: serde_json::Value =
                serde_json::from_slice(&c.call(Method::POST, &url, Bytes::from(text)).await?)?;
            outln(&format!("{} entries written", v["written"]));
        }
    }
    Ok(())
}

async fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
    init_logs("info");
    let flags = Layer {
        name: args.name,
        bind: args.bind,
        advertise: args.advertise,
        join: args.join,
        data_dir: args.data_dir,
        data_addr: args.data_addr,
        restart_grace: args.restart_grace,
        leave_on_stop: args.leave_on_stop.then_some(true),
        acceptors: args.acceptors,
        default_pool: args.default_pool,
        reuse_after: args.reuse_after,
        dataplane: args.dataplane,
        run_dir: args.run_dir,
    };
    let cfg = config::resolve(flags, args.config, std::env::vars().collect())?;
    let sock = cfg.data_dir.join("weft.sock");
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("cannot create data dir {}", cfg.data_dir.display()))?;
    shell::check_socket_free(&sock)?;
    let gossip_cfg = GossipConfig { restart_grace: cfg.restart_grace, ..GossipConfig::default() };
    let shell = Shell::start(&cfg, gossip_cfg).await?;
    api::serve(shell.clone(), &sock).await?;
    tracing::info!(socket = %sock.display(), "control API listening");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let leave = tokio::select! {
        _ = term.recv() => cfg.leave_on_stop,
        _ = int.recv() => cfg.leave_on_stop,
        _ = shell.leave_requested() => true,
        reason = shell.refused() => {
            let _ = std::fs::remove_file(&sock);
            shell.forget_state_if_new();
            bail!("{reason}");
        }
    };
    // A second signal exits at once.
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        std::process::exit(130);
    });
    // Give the news 600 ms to go out (it is sent at once; this covers a retransmission).
    let grace = Duration::from_millis(600);
    if leave {
        tracing::info!("leaving the cluster for good");
        shell.leave(grace).await;
        tracing::info!("left");
    } else {
        tracing::info!(
            grace_s = cfg.restart_grace.as_secs(),
            "stopping for a restart: peers keep this node's entries for the restart grace"
        );
        shell.stop_restarting(grace).await;
        tracing::info!("stopped");
    }
    let _ = std::fs::remove_file(&sock);
    Ok(())
}

//! The tokio shell around the [`Agent`]: its event loop.
//!
//! One task owns the agent, on a thread of its own. The UDP socket, the TCP listener, the control API and the persister
//! reach it over channels; it handles one input at a time, then sends what came out: datagrams
//! straight on the socket (never waiting), stream frames to one writer task per peer, persist
//! batches to the persister thread, replies to the API calls that wait for them. No lock wraps
//! the agent, no I/O or fsync runs on its task, and reads (`members`, `dump`, ...) go to the
//! [`View`] the agent keeps current, never to the task.
//!
//! Memory is bounded by bytes, not counts: inbound stream frames and outbound per-peer queues
//! share one budget ([`STREAM_BUDGET`]). A frame that does not fit is refused (the inbound
//! stream is closed; an outbound frame is dropped) and counted; anti-entropy repairs what a
//! dropped frame carried. Datagrams come in through a bounded queue (the socket's own buffer
//! absorbs a burst beyond it) and go out with a non-blocking send: a full socket buffer drops
//! the datagram and counts it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use weft_gossip::{Config as GossipConfig, TransmitKind, wire};

use crate::agent::{Agent, Command, CommandId, CommandResult, Output, Reply};
use crate::config::{AgentConfig, DEFAULT_PORT};
use crate::dpthread::{DpDone, DpThread};
use crate::error::AgentError;
use crate::store::{Durable, PersistStats, Persister, Store, StoreFile};
use crate::view::{View, ViewRead, write_counter};

/// Bytes of stream frames, inbound and outbound together, held in memory at once.
pub const STREAM_BUDGET: usize = 256 << 20;
/// Bytes queued for one peer at most.
pub const PEER_QUEUE_BYTES: usize = STREAM_BUDGET / 8;
/// Peers with an open outbound stream writer.
const MAX_STREAM_WRITERS: usize = 1024;
/// Concurrent inbound TCP streams (each holds budget only for the frame it is reading).
const MAX_INBOUND_STREAMS: usize = 512;
/// A whole stream frame must arrive within this.
const FRAME_DEADLINE: Duration = Duration::from_secs(30);
/// An input that keeps the agent's task this long is logged.
const SLOW_INPUT: Duration = Duration::from_millis(100);
/// Datagrams waiting for the owner, per queue (SWIM, table traffic).
const DATAGRAM_QUEUE: usize = 1024;

/// A datagram, its sender, and when it arrived.
type Datagram = (SocketAddr, Bytes, Instant);
/// How long a control-API command waits for its reply (a load gets more, see
/// [`Shell::command`]).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// Counters of what the shell itself did or dropped before or after the core.
#[derive(Debug, Default)]
pub struct ShellStats {
    pub stream_rejects: AtomicU64,
    pub datagram_queue_drops: AtomicU64,
    pub stream_budget_rejects: AtomicU64,
    pub send_errors: AtomicU64,
    pub send_budget_drops: AtomicU64,
    pub stream_connect_errors: AtomicU64,
    pub command_timeouts: AtomicU64,
    /// Bytes of stream frames held now (inbound being read or queued, outbound queued).
    pub stream_bytes_held: AtomicU64,
}

/// What kind of input waited.
#[derive(Debug, Clone, Copy)]
enum Class {
    /// SWIM datagrams.
    Membership = 0,
    /// Gossip datagrams and stream frames.
    Table = 1,
    /// Control-API commands.
    Command = 2,
}

const CLASSES: [&str; 3] = ["membership", "table", "command"];

/// How long inputs waited between arriving and being handled, per class: a log2 histogram in
/// microseconds, and the maximum.
#[derive(Debug, Default)]
pub struct Lag {
    buckets: [[AtomicU64; 26]; 3],
    max_us: [AtomicU64; 3],
}

impl Lag {
    fn record(&self, class: Class, d: Duration) {
        let c = class as usize;
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        let b = (64 - us.leading_zeros() as usize).min(self.buckets[c].len() - 1);
        self.buckets[c][b].fetch_add(1, Ordering::Relaxed);
        self.max_us[c].fetch_max(us, Ordering::Relaxed);
    }

    /// Prometheus histogram lines (`le` in seconds).
    fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(
            out,
            "# HELP weft_loop_lag_seconds Time from an input's arrival to its handling by the agent's task, by class: membership (SWIM datagrams), table (gossip datagrams, stream frames), command.\n# TYPE weft_loop_lag_seconds histogram"
        );
        for (c, class) in CLASSES.iter().enumerate() {
            let mut total = 0;
            for (i, b) in self.buckets[c].iter().enumerate() {
                total += b.load(Ordering::Relaxed);
                let le = if i == 0 { 1e-6 } else { (1u64 << i) as f64 / 1e6 };
                let _ =
                    writeln!(out, "weft_loop_lag_seconds_bucket{{class=\"{class}\",le=\"{le}\"}} {total}");
            }
            let _ = writeln!(out, "weft_loop_lag_seconds_bucket{{class=\"{class}\",le=\"+Inf\"}} {total}");
            let _ = writeln!(out, "weft_loop_lag_seconds_count{{class=\"{class}\"}} {total}");
        }
        let _ = writeln!(
            out,
            "# HELP weft_loop_lag_max_seconds The longest an input of each class waited.\n# TYPE weft_loop_lag_max_seconds gauge"
        );
        for (c, class) in CLASSES.iter().enumerate() {
            let _ = writeln!(
                out,
                "weft_loop_lag_max_seconds{{class=\"{class}\"}} {}",
                self.max_us[c].load(Ordering::Relaxed) as f64 / 1e6
            );
        }
    }
}

/// A command's failure as the control API reports it.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// No reply in time. The command is not cancelled and may still complete.
    #[error("{0}")]
    Timeout(String),
    #[error("the agent is stopping")]
    Stopped,
}

/// A stream frame and the budget it holds until the owner has handled it.
struct Frame {
    from: SocketAddr,
    bytes: Vec<u8>,
    at: Instant,
    _budget: Budget,
}

/// Bytes taken from the stream budget; given back on drop.
struct Budget {
    _permit: OwnedSemaphorePermit,
    held: Arc<Inner>,
    bytes: u64,
}

impl Drop for Budget {
    fn drop(&mut self) {
        self.held.stats.stream_bytes_held.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

enum Control {
    Command {
        id: CommandId,
        cmd: Command,
        reply: oneshot::Sender<CommandResult>,
        at: Instant,
    },
    Describe {
        id: CommandId,
        reply: oneshot::Sender<Option<String>>,
    },
    /// The overlay driver's report of one network (`network inspect --verbose`).
    Overlay {
        nid: String,
        reply: oneshot::Sender<Option<weft_overlay::driver::NetReport>>,
    },
    Join(Vec<SocketAddr>),
}

struct Inner {
    control: mpsc::Sender<Control>,
    next_id: AtomicU64,
    view: Arc<View>,
    stats: ShellStats,
    lag: Lag,
    persist_stats: Arc<PersistStats>,
    budget: Arc<Semaphore>,
    max_frame: usize,
    store: StoreFile,
    /// Seeds as configured, for `members` to report the unresolvable ones.
    unresolved: Mutex<Vec<String>>,
    refused: watch::Sender<Option<String>>,
    /// `weft leave` asked the agent to leave the cluster and exit.
    leave: watch::Sender<bool>,
    /// The data plane's thread, if this agent has a data plane.
    dp: Option<DpThread>,
}

/// A running agent: cheap to clone, shared by the API, the demo and the signal handler.
#[derive(Clone)]
pub struct Shell {
    inner: Arc<Inner>,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
}

impl std::fmt::Debug for Shell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shell").field("addr", &self.addr).finish_non_exhaustive()
    }
}

/// Resolves seeds (`host[:port]`), dropping this agent's own addresses.
pub async fn resolve_seeds(seeds: &[String], own: &[SocketAddr]) -> (Vec<SocketAddr>, Vec<String>) {
    let mut ok = Vec::new();
    let mut failed = Vec::new();
    let mut lookups = tokio::task::JoinSet::new();
    for (i, s) in seeds.iter().enumerate() {
        let target = seed_target(s);
        lookups.spawn(async move {
            let r = tokio::time::timeout(Duration::from_secs(3), tokio::net::lookup_host(target)).await;
            (i, r.ok().and_then(Result::ok).map(|a| a.collect::<Vec<SocketAddr>>()))
        });
    }
    let mut answers = vec![None; seeds.len()];
    while let Some(Ok((i, r))) = lookups.join_next().await {
        answers[i] = r;
    }
    for (s, answer) in seeds.iter().zip(answers) {
        match answer.ok_or(()) {
            Ok(addrs) => match addrs.iter().find(|a| a.is_ipv4()).or(addrs.first()) {
                Some(a) if !own.contains(a) => ok.push(*a),
                Some(_) => {}
                None => failed.push(s.clone()),
            },
            Err(_) => failed.push(s.clone()),
        }
    }
    ok.sort();
    ok.dedup();
    (ok, failed)
}

/// `host:port` for a seed given as an address, an address without port, or a host name.
fn seed_target(s: &str) -> String {
    if s.parse::<SocketAddr>().is_ok() {
        return s.to_string();
    }
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return SocketAddr::new(ip, DEFAULT_PORT).to_string();
    }
    match s.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() && !host.is_empty() => s.to_string(),
        _ => format!("{s}:{DEFAULT_PORT}"),
    }
}

/// The address peers should use, when none was configured: the bind address if it is one,
/// else the local address a packet to the first seed (or, without seeds, to the default route)
/// would leave from. Connecting a UDP socket sends nothing.
fn guess_advertise(bind: SocketAddr, seeds: &[SocketAddr]) -> anyhow::Result<SocketAddr> {
    if !bind.ip().is_unspecified() {
        return Ok(bind);
    }
    // 192.0.2.1 is a documentation address: only the routing table is consulted.
    let probe = seeds.first().copied().unwrap_or(SocketAddr::from(([192, 0, 2, 1], 9)));
    let ip = std::net::UdpSocket::bind(("0.0.0.0", 0))
        .and_then(|s| s.connect(probe).and_then(|_| s.local_addr()))
        .map(|a| a.ip())
        .ok()
        .filter(|ip| !ip.is_unspecified());
    match ip {
        Some(ip) => Ok(SocketAddr::new(ip, bind.port())),
        None => bail!("cannot tell which address peers should use to reach {bind}: give --advertise IP:PORT"),
    }
}

impl Shell {
    /// Binds the gossip port, opens the store (a new generation, durable before anything runs),
    /// starts the agent's task, the socket tasks and the persister, and joins the seeds
    /// (retrying in the background; the agent runs even if none answers).
    pub async fn start(cfg: &AgentConfig, gossip_cfg: GossipConfig) -> anyhow::Result<Shell> {
        let udp = UdpSocket::bind(cfg.bind).await.with_context(|| format!("cannot bind UDP {}", cfg.bind))?;
        let bound = udp.local_addr()?;
        let tcp = TcpListener::bind(bound).await.with_context(|| format!("cannot bind TCP {bound}"))?;
        let wall_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let fresh_instance = {
            use rand::TryRng;
            rand::rngs::SysRng.try_next_u64().unwrap_or(wall_ms ^ u64::from(std::process::id()))
        };
        let (store, st) = {
            let dir = cfg.data_dir.clone();
            let name = cfg.name.clone();
            tokio::task::spawn_blocking(move || Store::open(&dir, name.as_deref(), wall_ms, fresh_instance))
                .await
                .context("the store's opening thread failed")??
        };
        let store_file = store.file();
        let (listed, unresolved) = resolve_seeds(&cfg.join, &[]).await;
        let seeds: Vec<SocketAddr> = listed.iter().copied().filter(|s| *s != bound).collect();
        let advertise = match cfg.advertise {
            Some(a) => a,
            None => guess_advertise(bound, &seeds)?,
        };
        // The acceptor set is derived from the whole list, this node's own address included
        // (as the address peers know it by).
        let all_seeds: Vec<SocketAddr> =
            listed.iter().map(|s| if *s == bound { advertise } else { *s }).collect();
        let seeds: Vec<SocketAddr> = seeds.into_iter().filter(|s| *s != advertise).collect();
        let seed = {
            use rand::TryRng;
            rand::rngs::SysRng.try_next_u64().unwrap_or(st.generation ^ st.ltime_hwm)
        };
        let now = Instant::now();
        let max_frame = gossip_cfg.max_stream_frame;
        let mut agent = Agent::boot(gossip_cfg, &st, advertise, seed, now)?;
        let vtep = cfg.data_addr.unwrap_or(advertise.ip());
        agent.set_data_addr(now, vtep);
        agent.configure_alloc(cfg.alloc.clone(), Some(all_seeds), unresolved.clone());
        let (dp_tx, dp_rx) = mpsc::unbounded_channel::<DpDone>();
        let dp = match cfg.dataplane {
            Some(false) => None,
            required => match DpThread::spawn_linux(&cfg.run_dir, vtep, dp_tx) {
                Ok(dp) => Some(dp),
                Err(e) if required.is_none() => {
                    tracing::warn!(error = %e, "no data plane: endpoints get no interface (--dataplane none says so without this warning)");
                    None
                }
                Err(e) => bail!("cannot start the Linux data plane: {e}"),
            },
        };
        agent.set_dataplane(dp.is_some());
        let view = agent.attach_view(now);
        agent.apply(now, Command::Join { seeds })?;

        let (control_tx, control_rx) = mpsc::channel(1024);
        let (datagram_tx, datagram_rx) = mpsc::channel(DATAGRAM_QUEUE);
        let (swim_tx, swim_rx) = mpsc::channel(DATAGRAM_QUEUE);
        let (frame_tx, frame_rx) = mpsc::unbounded_channel();
        let (durable_tx, durable_rx) = mpsc::unbounded_channel();
        let persister = Persister::spawn(store, move |d| {
            let _ = durable_tx.send(d);
        });
        let inner = Arc::new(Inner {
            control: control_tx,
            next_id: AtomicU64::new(1),
            view,
            stats: ShellStats::default(),
            lag: Lag::default(),
            persist_stats: persister.stats.clone(),
            budget: Arc::new(Semaphore::new(STREAM_BUDGET)),
            max_frame,
            store: store_file,
            unresolved: Mutex::new(unresolved.clone()),
            refused: watch::channel(None).0,
            leave: watch::channel(false).0,
            dp: dp.clone(),
        });
        let shell = Shell { inner: inner.clone(), addr: bound, data_dir: cfg.data_dir.clone() };
        let udp = Arc::new(udp);
        let owner = Owner {
            io: tokio::runtime::Handle::current(),
            agent,
            inner: inner.clone(),
            udp: udp.clone(),
            persister,
            replies: HashMap::new(),
            writers: HashMap::new(),
            dp,
        };
        // The owner runs on a thread of its own: however long an input keeps it busy, the
        // runtime's workers (sockets, the control API, stream writers) never wait behind it.
        std::thread::Builder::new()
            .name("weft-agent".into())
            .spawn(move || {
                // A panic here would leave a process whose agent is gone: stop it instead.
                let _guard = ExitOnPanic("the agent's event loop");
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start the agent's event loop; exiting");
                        std::process::exit(70);
                    }
                };
                rt.block_on(owner.run(control_rx, swim_rx, datagram_rx, frame_rx, durable_rx, dp_rx));
            })
            .context("cannot start the agent's thread")?;
        tokio::spawn(udp_loop(inner.clone(), udp, swim_tx, datagram_tx));
        tokio::spawn(tcp_loop(inner.clone(), tcp, frame_tx));
        tokio::spawn(shell.clone().report_seeds_loop());
        let id = shell.read().snap.id.clone();
        tracing::info!(
            node = %id.name,
            addr = %advertise,
            instance = %id.instance_hex(),
            generation = id.generation,
            "agent started"
        );
        if !unresolved.is_empty() {
            tracing::warn!(seeds = ?unresolved, "could not resolve seeds; will retry");
            tokio::spawn(shell.clone().resolve_loop(cfg.join.clone(), bound));
        }
        Ok(shell)
    }

    /// The agent's state as of its last input, without waiting for it.
    pub fn read(&self) -> ViewRead<'_> {
        ViewRead::new(&self.inner.view)
    }

    /// Runs a command on the agent and waits for its reply: [`COMMAND_TIMEOUT`], more for a
    /// big load. On timeout the answer says in one line what the command was waiting for; the
    /// command is not cancelled and may still complete (a client that retries must expect its
    /// first attempt to have taken effect).
    pub async fn command(&self, cmd: Command) -> Result<Reply, CommandError> {
        let limit = match &cmd {
            Command::TableLoad { pairs, .. } => {
                COMMAND_TIMEOUT + Duration::from_secs((pairs.len() / 5_000) as u64)
            }
            _ => COMMAND_TIMEOUT,
        }
        .min(Duration::from_secs(50));
        self.command_within(cmd, limit).await
    }

    pub async fn command_within(&self, cmd: Command, limit: Duration) -> Result<Reply, CommandError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let what = cmd.describe();
        let (tx, rx) = oneshot::channel();
        let send = Control::Command { id, cmd, reply: tx, at: Instant::now() };
        if self.inner.control.send(send).await.is_err() {
            return Err(CommandError::Stopped);
        }
        match tokio::time::timeout(limit, rx).await {
            Ok(Ok(r)) => Ok(r?),
            Ok(Err(_)) => Err(CommandError::Stopped),
            Err(_) => {
                self.inner.stats.command_timeouts.fetch_add(1, Ordering::Relaxed);
                let (tx, rx) = oneshot::channel();
                let _ = self.inner.control.try_send(Control::Describe { id, reply: tx });
                let waiting = match tokio::time::timeout(Duration::from_secs(1), rx).await {
                    Ok(Ok(Some(w))) => w,
                    Ok(Ok(None)) => "its reply, which is on its way".to_string(),
                    _ => "the agent's event loop, which is busy".to_string(),
                };
                Err(CommandError::Timeout(format!(
                    "{what}: no reply after {limit:?}, still waiting for {waiting} (not cancelled: it may still complete)"
                )))
            }
        }
    }

    /// Resolves once the agent must stop because its name is taken; yields the reason.
    pub async fn refused(&self) -> String {
        let mut rx = self.inner.refused.subscribe();
        loop {
            if let Some(r) = rx.borrow_and_update().clone() {
                return r;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// A node refused at its very first start leaves no identity behind in its data dir.
    pub fn forget_state_if_new(&self) {
        self.inner.store.forget_if_new();
    }

    pub fn stats(&self) -> &ShellStats {
        &self.inner.stats
    }

    pub fn unresolved_seeds(&self) -> Vec<String> {
        self.inner.unresolved.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The overlay driver's view of a network here (its peer records, what it asked the data
    /// plane for); `None` if the driver does not handle it.
    pub async fn overlay_network(&self, nid: &str) -> Option<weft_overlay::driver::NetReport> {
        let (tx, rx) = oneshot::channel();
        self.inner.control.send(Control::Overlay { nid: nid.to_string(), reply: tx }).await.ok()?;
        rx.await.ok().flatten()
    }

    /// What the kernel holds for a network's sandbox here; `None` without a data plane.
    pub async fn kernel_view(
        &self,
        nid: &str,
    ) -> Option<Result<weft_overlay::KernelView, weft_overlay::DpError>> {
        Some(self.inner.dp.as_ref()?.read(nid).await)
    }

    /// Metrics of the agent plus the shell's own counters.
    pub fn metrics(&self) -> String {
        let mut m = crate::view::metrics(&self.inner.view);
        let s = &self.inner.stats;
        let p = &self.inner.persist_stats;
        for (name, help, v) in [
            ("weft_stream_rejects_total", "TCP streams dropped for a bad frame length.", &s.stream_rejects),
            (
                "weft_datagram_queue_drops_total",
                "Datagrams dropped because the agent's task was that far behind.",
                &s.datagram_queue_drops,
            ),
            (
                "weft_stream_budget_rejects_total",
                "Inbound stream frames refused because the stream byte budget was spent.",
                &s.stream_budget_rejects,
            ),
            (
                "weft_send_errors_total",
                "Datagrams the OS refused to send (or had no room for).",
                &s.send_errors,
            ),
            (
                "weft_send_budget_drops_total",
                "Outbound stream frames dropped because the stream byte budget was spent or the peer's queue was full.",
                &s.send_budget_drops,
            ),
            (
                "weft_stream_connect_errors_total",
                "Streams that could not reach their peer.",
                &s.stream_connect_errors,
            ),
            (
                "weft_command_timeouts_total",
                "Control-API commands answered with a timeout.",
                &s.command_timeouts,
            ),
            ("weft_persist_batches_total", "Persist batches made durable.", &p.batches),
            ("weft_persist_commits_total", "Store commits (one fsync each).", &p.commits),
            ("weft_persist_errors_total", "Store commits that failed (retried).", &p.errors),
            ("weft_persist_commit_microseconds_total", "Time spent committing.", &p.commit_us),
        ] {
            write_counter(&mut m, name, help, v.load(Ordering::Relaxed));
        }
        use std::fmt::Write;
        let _ = writeln!(
            m,
            "# HELP weft_stream_bytes_held Stream frame bytes held in memory now.\n# TYPE weft_stream_bytes_held gauge\nweft_stream_bytes_held {}",
            s.stream_bytes_held.load(Ordering::Relaxed)
        );
        self.inner.lag.render(&mut m);
        m
    }

    /// Leaves the cluster for good (peers delete this node's entries) and gives the news
    /// `grace` to go out.
    pub async fn leave(&self, grace: Duration) {
        let t0 = Instant::now();
        if let Err(e) = self.command(Command::Leave).await {
            tracing::warn!(error = %e, "leave");
        }
        self.settle(t0 + grace).await;
    }

    /// Waits until `until`, and at least until what the agent handed the store is durable
    /// (at most 5 s more): a stop never leaves a write it could still make behind.
    async fn settle(&self, until: Instant) {
        let limit = until + Duration::from_secs(5);
        while Instant::now() < limit {
            let snap = self.read().snap;
            if Instant::now() >= until && snap.persist_durable >= snap.persist_issued {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops for a restart: peers keep this node's entries live for the restart grace. Gives
    /// the news `grace` to go out.
    pub async fn stop_restarting(&self, grace: Duration) {
        let t0 = Instant::now();
        if let Err(e) = self.command(Command::StopRestarting).await {
            tracing::warn!(error = %e, "stop");
        }
        self.settle(t0 + grace).await;
    }

    /// Asks the agent's owner (`weft agent`'s main loop) to leave the cluster and exit.
    pub fn request_leave(&self) {
        self.inner.leave.send_replace(true);
    }

    /// Resolves once `weft leave` asked the agent to leave.
    pub async fn leave_requested(&self) {
        let mut rx = self.inner.leave.subscribe();
        while !*rx.borrow_and_update() {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Says in the log whom the agent could not reach, when that changes (and every few
    /// minutes while it lasts).
    async fn report_seeds_loop(self) {
        let mut last: Vec<SocketAddr> = Vec::new();
        let mut quiet = 0u32;
        loop {
            tokio::time::sleep(Duration::from_secs(10)).await;
            let now = self.read().snap.unreachable_seeds.clone();
            quiet += 1;
            if now != last || (!now.is_empty() && quiet >= 18) {
                if now.is_empty() {
                    tracing::info!("every seed reached");
                } else {
                    tracing::warn!(seeds = ?now, "seeds not reached yet; still trying");
                }
                last = now;
                quiet = 0;
            }
        }
    }

    async fn resolve_loop(self, seeds: Vec<String>, bound: SocketAddr) {
        loop {
            tokio::time::sleep(Duration::from_secs(10)).await;
            let (ok, failed) = resolve_seeds(&seeds, &[bound]).await;
            *self.inner.unresolved.lock().unwrap_or_else(|p| p.into_inner()) = failed.clone();
            let _ = self.inner.control.send(Control::Join(ok)).await;
            if failed.is_empty() {
                tracing::info!("all seeds resolved");
                return;
            }
        }
    }
}

/// Ends the process if the thread holding it panics (the thread is named in the log line): a
/// process whose agent, or data plane, is gone must not go on answering.
pub(crate) struct ExitOnPanic(pub(crate) &'static str);

impl Drop for ExitOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!("{} panicked; exiting", self.0);
            std::process::exit(70);
        }
    }
}

/// The task that owns the agent.
struct Owner {
    /// The runtime the sockets live on (stream writers are spawned there).
    io: tokio::runtime::Handle,
    agent: Agent,
    inner: Arc<Inner>,
    udp: Arc<UdpSocket>,
    persister: Persister,
    replies: HashMap<CommandId, oneshot::Sender<CommandResult>>,
    writers: HashMap<SocketAddr, Writer>,
    dp: Option<DpThread>,
}

/// A peer's outbound stream writer and the bytes queued for it.
struct Writer {
    tx: mpsc::Sender<(Bytes, Budget)>,
    queued: Arc<AtomicU64>,
}

impl Owner {
    async fn run(
        mut self,
        mut control: mpsc::Receiver<Control>,
        mut swim: mpsc::Receiver<Datagram>,
        mut datagrams: mpsc::Receiver<Datagram>,
        mut frames: mpsc::UnboundedReceiver<Frame>,
        mut durable: mpsc::UnboundedReceiver<Durable>,
        mut dp_done: mpsc::UnboundedReceiver<DpDone>,
    ) {
        self.drain();
        loop {
            // First what must never wait behind a backlog: SWIM (a late ack is a suspicion),
            // the disk's reports (they release held outputs) and due timers.
            while let Ok(d) = swim.try_recv() {
                self.datagram(Class::Membership, d);
            }
            while let Ok(d) = durable.try_recv() {
                self.durable(d);
            }
            let now = Instant::now();
            if self.agent.poll_timeout().is_some_and(|d| d <= now) {
                self.agent.handle_timeout(now);
            }
            self.drain();
            let deadline =
                self.agent.poll_timeout().unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            let work = self.agent.has_work();
            // Then one input of any kind; branches are polled in random order, so a load's
            // slices, table traffic and commands take turns.
            let (kind, t0) = tokio::select! {
                Some(d) = swim.recv() => { let t = Instant::now(); self.datagram(Class::Membership, d); ("swim datagram", t) }
                Some(d) = durable.recv() => { let t = Instant::now(); self.durable(d); ("persist report", t) }
                Some((id, r)) = dp_done.recv() => { let t = Instant::now(); self.agent.handle_dataplane_done(t, id, r); ("data plane report", t) }
                Some(d) = datagrams.recv() => { let t = Instant::now(); self.datagram(Class::Table, d); ("gossip datagram", t) }
                Some(f) = frames.recv() => {
                    let now = Instant::now();
                    self.inner.lag.record(Class::Table, now.saturating_duration_since(f.at));
                    self.agent.handle_stream(now, f.from, &f.bytes);
                    ("stream frame", now)
                }
                Some(c) = control.recv() => { let t = Instant::now(); self.control(c); ("command", t) }
                _ = tokio::time::sleep_until(deadline.into()) => {
                    let t = Instant::now();
                    self.agent.handle_timeout(t);
                    ("timer", t)
                }
                _ = std::future::ready(()), if work => { let t = Instant::now(); self.agent.handle_work(t); ("load slice", t) }
            };
            let took = t0.elapsed();
            if took >= SLOW_INPUT {
                tracing::warn!(
                    input = kind,
                    ms = took.as_millis() as u64,
                    "slow input: everything else waited for it"
                );
            }
            self.drain();
        }
    }

    fn datagram(&mut self, class: Class, (from, bytes, at): Datagram) {
        let now = Instant::now();
        self.inner.lag.record(class, now.saturating_duration_since(at));
        self.agent.handle_datagram(now, from, &bytes);
    }

    fn durable(&mut self, d: Durable) {
        let now = Instant::now();
        match d {
            Durable::Upto(seq) => self.agent.handle_persisted(now, seq),
            Durable::Failed { seq, error } => self.agent.handle_persist_failed(now, seq, error),
        }
    }

    fn control(&mut self, c: Control) {
        let now = Instant::now();
        match c {
            Control::Command { id, cmd, reply, at } => {
                self.inner.lag.record(Class::Command, now.saturating_duration_since(at));
                self.replies.insert(id, reply);
                self.agent.handle_command(now, id, cmd);
            }
            Control::Describe { id, reply } => {
                let _ = reply.send(self.agent.waiting_for(id));
            }
            Control::Overlay { nid, reply } => {
                let _ = reply.send(self.agent.overlay_network(&nid));
            }
            Control::Join(seeds) => self.agent.handle_command(now, 0, Command::Join { seeds }),
        }
    }

    /// Hands out what the agent produced: batches to the persister, datagrams to the socket,
    /// frames to the peers' writers, replies to their callers.
    fn drain(&mut self) {
        while let Some(b) = self.agent.poll_persist() {
            self.persister.submit(b);
        }
        while let Some((id, op)) = self.agent.poll_dataplane() {
            if !self.dp.as_ref().is_some_and(|dp| dp.apply(id, op)) {
                self.agent.handle_dataplane_done(
                    Instant::now(),
                    id,
                    Err(weft_overlay::DpError::new("operation", "the data plane's thread is gone")),
                );
            }
        }
        while let Some(out) = self.agent.poll_output() {
            match out {
                Output::Transmit(t) => match t.kind {
                    TransmitKind::Datagram => {
                        if self.udp.try_send_to(&t.bytes, t.dst).is_err() {
                            self.inner.stats.send_errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    TransmitKind::Stream => self.send_frame(t.dst, t.bytes),
                },
                Output::Reply { id, result } => {
                    if let Some(tx) = self.replies.remove(&id) {
                        let _ = tx.send(result);
                    }
                }
            }
        }
        if let Some(r) = self.agent.refused() {
            let r = r.to_string();
            self.inner.refused.send_if_modified(|cur| {
                if cur.is_none() {
                    *cur = Some(r);
                    true
                } else {
                    false
                }
            });
        }
    }

    fn send_frame(&mut self, dst: SocketAddr, bytes: Bytes) {
        let stats = &self.inner.stats;
        if self.writers.get(&dst).is_none_or(|w| w.tx.is_closed()) {
            self.writers.retain(|_, w| !w.tx.is_closed());
            if self.writers.len() >= MAX_STREAM_WRITERS {
                stats.stream_connect_errors.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let (tx, rx) = mpsc::channel(256);
            let queued = Arc::new(AtomicU64::new(0));
            self.io.spawn(stream_writer(self.inner.clone(), dst, rx, queued.clone()));
            self.writers.insert(dst, Writer { tx, queued });
        }
        let w = &self.writers[&dst];
        // One slow peer may not take the budget every other peer's traffic shares.
        let len = bytes.len() as u64;
        if w.queued.load(Ordering::Relaxed) + len > PEER_QUEUE_BYTES as u64 {
            stats.send_budget_drops.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let Some(budget) = take_budget(&self.inner, bytes.len()) else {
            stats.send_budget_drops.fetch_add(1, Ordering::Relaxed);
            return;
        };
        w.queued.fetch_add(len, Ordering::Relaxed);
        if w.tx.try_send((bytes, budget)).is_err() {
            // A peer that cannot keep up loses frames; anti-entropy repairs them.
            w.queued.fetch_sub(len, Ordering::Relaxed);
            stats.send_budget_drops.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Takes `bytes` from the stream budget, or nothing if they do not fit now.
fn take_budget(inner: &Arc<Inner>, bytes: usize) -> Option<Budget> {
    let n = u32::try_from(bytes.max(1)).ok()?;
    let permit = inner.budget.clone().try_acquire_many_owned(n).ok()?;
    inner.stats.stream_bytes_held.fetch_add(bytes as u64, Ordering::Relaxed);
    Some(Budget { _permit: permit, held: inner.clone(), bytes: bytes as u64 })
}

/// Reads the gossip socket without ever waiting for the agent's task: SWIM datagrams go to
/// their own queue, table traffic to another; a full queue drops the datagram and counts it
/// (gossip retransmits and anti-entropy repair table traffic), so the socket's buffer never
/// fills and SWIM is never lost behind a backlog.
async fn udp_loop(
    inner: Arc<Inner>,
    udp: Arc<UdpSocket>,
    swim: mpsc::Sender<Datagram>,
    table: mpsc::Sender<Datagram>,
) {
    let mut buf = vec![0u8; 65_536];
    loop {
        match udp.recv_from(&mut buf).await {
            Ok((n, from)) => {
                let bytes = &buf[..n];
                let is_swim = wire::open_envelope(bytes).is_ok_and(|(ty, _)| ty == wire::FrameType::Swim);
                let tx = if is_swim { &swim } else { &table };
                match tx.try_send((from, Bytes::copy_from_slice(bytes), Instant::now())) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        inner.stats.datagram_queue_drops.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "udp recv");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn tcp_loop(inner: Arc<Inner>, tcp: TcpListener, tx: mpsc::UnboundedSender<Frame>) {
    let slots = Arc::new(Semaphore::new(MAX_INBOUND_STREAMS));
    loop {
        let permit = match slots.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => return,
        };
        match tcp.accept().await {
            Ok((stream, from)) => {
                let inner = inner.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    read_stream(inner, stream, from, tx).await;
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::debug!(error = %e, "tcp accept");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Reads length-prefixed frames until the peer closes, a frame is malformed or does not fit
/// the budget, or the stream idles for a minute.
async fn read_stream(
    inner: Arc<Inner>,
    mut stream: TcpStream,
    from: SocketAddr,
    tx: mpsc::UnboundedSender<Frame>,
) {
    let idle = Duration::from_secs(60);
    loop {
        let mut prefix = [0u8; wire::STREAM_PREFIX_LEN];
        match tokio::time::timeout(idle, stream.read_exact(&mut prefix)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let len = match wire::stream_frame_len(prefix, inner.max_frame) {
            Ok(len) => len,
            Err(e) => {
                inner.stats.stream_rejects.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%from, error = %e, "dropping stream");
                return;
            }
        };
        // The frame's bytes are reserved before they are read: a peer cannot make this node
        // hold more than the budget, whatever lengths it claims.
        let Some(budget) = take_budget(&inner, len) else {
            inner.stats.stream_budget_rejects.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%from, len, "stream budget spent; dropping stream");
            return;
        };
        // The bytes are reserved in the budget; allocating them exactly keeps the buffer from
        // doubling past them as they arrive.
        let mut frame = Vec::with_capacity(len);
        let mut limited = (&mut stream).take(len as u64);
        match tokio::time::timeout(FRAME_DEADLINE, limited.read_to_end(&mut frame)).await {
            Ok(Ok(n)) if n == len => {}
            _ => {
                inner.stats.stream_rejects.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        if tx.send(Frame { from, bytes: frame, at: Instant::now(), _budget: budget }).is_err() {
            return;
        }
    }
}

async fn stream_writer(
    inner: Arc<Inner>,
    dst: SocketAddr,
    mut frames: mpsc::Receiver<(Bytes, Budget)>,
    queued: Arc<AtomicU64>,
) {
    let connect = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(dst)).await;
    let Ok(Ok(mut stream)) = connect else {
        inner.stats.stream_connect_errors.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let _ = stream.set_nodelay(true);
    loop {
        let (frame, _budget) = match tokio::time::timeout(Duration::from_secs(60), frames.recv()).await {
            Ok(Some(f)) => f,
            _ => return,
        };
        let write = async {
            stream.write_all(&wire::stream_prefix(frame.len())).await?;
            stream.write_all(&frame).await
        };
        let written = tokio::time::timeout(Duration::from_secs(10), write).await;
        queued.fetch_sub(frame.len() as u64, Ordering::Relaxed);
        if written.map_or(true, |r| r.is_err()) {
            inner.stats.stream_connect_errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
}

/// Refuses to start a second agent on a data dir whose control socket answers.
pub fn check_socket_free(path: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        bail!("an agent is already running on {} (stop it, or use another --data-dir)", path.display());
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            let _ = std::fs::remove_file(path);
        }
        Ok(_) => bail!("{} exists and is not a socket; move it away", path.display()),
        Err(_) => {}
    }
    Ok(())
}

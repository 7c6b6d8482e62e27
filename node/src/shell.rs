//! The tokio shell around the [`Agent`]: one UDP socket and one TCP listener on the gossip port,
//! one timer, a sender task, and the lock that guards the agent. Every critical section is one
//! call into the sans-IO agent plus draining its outputs into channels; no I/O happens under
//! the lock except the rare fsync of a new Lamport lease.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Notify, mpsc, watch};
use weft_gossip::{Config as GossipConfig, NodeId, Transmit, TransmitKind, wire};

use crate::agent::Agent;
use crate::config::{AgentConfig, DEFAULT_PORT};
use crate::state::StateFile;

/// The data dir could not be written: nothing the call wrote is acknowledged or sent until a
/// later call persists it.
#[derive(Debug, thiserror::Error)]
#[error("cannot persist node state: {0}")]
pub struct PersistError(pub String);

/// Concurrent inbound TCP streams.
const MAX_INBOUND_STREAMS: usize = 512;
/// Peers with an open outbound stream writer.
const MAX_STREAM_WRITERS: usize = 1024;
/// A whole stream frame must arrive within this.
const FRAME_DEADLINE: Duration = Duration::from_secs(30);

/// Counters of what the shell itself dropped before the core saw it.
#[derive(Debug, Default)]
pub struct ShellStats {
    pub stream_rejects: AtomicU64,
    pub send_errors: AtomicU64,
    pub stream_connect_errors: AtomicU64,
}

struct Inner {
    agent: Mutex<Agent>,
    state: Mutex<StateFile>,
    out: mpsc::UnboundedSender<Transmit>,
    wake: Notify,
    stats: ShellStats,
    max_frame: usize,
    /// Seeds as configured, for `members` to report the unresolvable ones.
    unresolved: Mutex<Vec<String>>,
    refused: watch::Sender<Option<String>>,
    /// `weft leave` asked the agent to leave the cluster and exit.
    leave: watch::Sender<bool>,
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
    /// Binds the gossip port, loads and bumps the persisted state, starts every task and joins
    /// the seeds (retrying in the background; the agent runs even if none answers).
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
        let state = StateFile::start(&cfg.data_dir, cfg.name.as_deref(), wall_ms, fresh_instance)?;
        let (seeds, unresolved) = resolve_seeds(&cfg.join, &[bound]).await;
        let advertise = match cfg.advertise {
            Some(a) => a,
            None => guess_advertise(bound, &seeds)?,
        };
        let seeds: Vec<SocketAddr> = seeds.into_iter().filter(|s| *s != advertise).collect();
        let st = state.state().clone();
        let id = NodeId::new(st.name.as_str(), advertise, st.generation).with_instance(st.instance);
        let seed = {
            use rand::TryRng;
            rand::rngs::SysRng.try_next_u64().unwrap_or(st.generation ^ st.ltime_hwm)
        };
        let now = Instant::now();
        let max_frame = gossip_cfg.max_stream_frame;
        let mut agent = Agent::new(gossip_cfg, id.clone(), seed, st.ltime_hwm, now)?;
        agent.set_data_addr(now, cfg.data_addr.unwrap_or(advertise.ip()));
        agent.set_predecessor_sweep(st.sweep_pending);
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            agent: Mutex::new(agent),
            state: Mutex::new(state),
            out: out_tx,
            wake: Notify::new(),
            stats: ShellStats::default(),
            max_frame,
            unresolved: Mutex::new(unresolved.clone()),
            refused: watch::channel(None).0,
            leave: watch::channel(false).0,
        });
        let shell = Shell { inner, addr: bound, data_dir: cfg.data_dir.clone() };
        let udp = Arc::new(udp);
        tokio::spawn(shell.clone().udp_loop(udp.clone()));
        tokio::spawn(shell.clone().tcp_loop(tcp));
        tokio::spawn(shell.clone().timer_loop());
        tokio::spawn(send_loop(shell.inner.clone(), udp, out_rx));
        tokio::spawn(shell.clone().report_seeds_loop());
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
        shell.with(|a, now| -> Result<(), crate::AgentError> {
            a.restore_attached(now, &st.networks, &st.definitions)?;
            a.join(now, &seeds)
        })??;
        Ok(shell)
    }

    fn lock(&self) -> MutexGuard<'_, Agent> {
        self.inner.agent.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the agent, makes sure whatever it wrote is covered by the persisted state,
    /// and only then hands its outputs to the I/O tasks. If the state cannot be persisted, the
    /// call fails and nothing it produced leaves the node.
    pub fn with<R>(&self, f: impl FnOnce(&mut Agent, Instant) -> R) -> Result<R, PersistError> {
        let now = Instant::now();
        let mut agent = self.lock();
        let r = f(&mut agent, now);
        self.after(&mut agent, now)?;
        Ok(r)
    }

    /// Read-only access: no outputs to drain.
    pub fn read<R>(&self, f: impl FnOnce(&Agent) -> R) -> R {
        f(&self.lock())
    }

    fn after(&self, agent: &mut Agent, now: Instant) -> Result<(), PersistError> {
        while agent.poll_event(now).is_some() {}
        if let Some(msg) = agent.refused() {
            self.inner.refused.send_if_modified(|r| {
                if r.is_none() {
                    *r = Some(msg.to_string());
                    true
                } else {
                    false
                }
            });
        }
        // Persist before anything leaves: no peer may see a Lamport time or an attachment
        // that a crash could take back.
        {
            let mut state = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
            let mut result = state.cover(agent.ltime());
            if result.is_ok() {
                // The core moved this life above an earlier one of its name.
                result = state.set_generation(agent.id().generation);
            }
            if result.is_ok() && !agent.gossip().predecessor_sweep_pending() {
                result = state.sweep_done();
            }
            if result.is_ok() && !agent.gossip().has_left() {
                let mut ids = agent.attached_networks();
                ids.sort();
                // Definitions are looked up only when the attachments or the definitions table
                // changed (a walk of that table is too dear for every datagram).
                let stale = agent.take_definitions_changed() || ids != state.state().networks;
                result = state.set_networks(ids);
                if result.is_ok() && stale {
                    result = state.set_definitions(agent.attached_definitions());
                }
            }
            if let Err(e) = result {
                tracing::error!(error = %format!("{e:#}"), "cannot persist node state; holding output back");
                return Err(PersistError(format!("{e:#}")));
            }
        }
        while let Some(t) = agent.poll_transmit() {
            let _ = self.inner.out.send(t);
        }
        self.inner.wake.notify_one();
        Ok(())
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
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner()).forget_if_new();
    }

    pub fn stats(&self) -> &ShellStats {
        &self.inner.stats
    }

    pub fn unresolved_seeds(&self) -> Vec<String> {
        self.inner.unresolved.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Metrics of the agent plus the shell's own counters.
    pub fn metrics(&self) -> String {
        let mut m = self.read(Agent::metrics);
        let s = &self.inner.stats;
        for (name, help, v) in [
            ("weft_stream_rejects_total", "TCP streams dropped for a bad frame length.", &s.stream_rejects),
            ("weft_send_errors_total", "Datagrams the OS refused to send.", &s.send_errors),
            (
                "weft_stream_connect_errors_total",
                "Streams that could not reach their peer.",
                &s.stream_connect_errors,
            ),
        ] {
            crate::agent::write_counter(&mut m, name, help, v.load(Ordering::Relaxed));
        }
        m
    }

    /// Leaves the cluster for good (peers delete this node's entries) and gives the news
    /// `grace` to go out.
    pub async fn leave(&self, grace: Duration) {
        match self.with(|a, now| a.leave(now)) {
            Ok(Err(e)) => tracing::warn!(error = %e, "leave"),
            Err(e) => tracing::warn!(error = %e, "leave"),
            Ok(Ok(())) => {}
        }
        tokio::time::sleep(grace).await;
    }

    /// Stops for a restart: peers keep this node's entries live for the restart grace. Gives
    /// the news `grace` to go out.
    pub async fn stop_restarting(&self, grace: Duration) {
        match self.with(|a, now| a.stop_restarting(now)) {
            Ok(Err(e)) => tracing::warn!(error = %e, "stop"),
            Err(e) => tracing::warn!(error = %e, "stop"),
            Ok(Ok(())) => {}
        }
        tokio::time::sleep(grace).await;
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

    async fn udp_loop(self, udp: Arc<UdpSocket>) {
        let mut buf = vec![0u8; 65_536];
        loop {
            match udp.recv_from(&mut buf).await {
                Ok((n, from)) => {
                    let _ = self.with(|a, now| a.handle_datagram(now, from, &buf[..n]));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "udp recv");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }

    async fn tcp_loop(self, tcp: TcpListener) {
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_INBOUND_STREAMS));
        loop {
            let permit = match slots.clone().acquire_owned().await {
                Ok(p) => p,
                Err(_) => return,
            };
            match tcp.accept().await {
                Ok((stream, from)) => {
                    let me = self.clone();
                    tokio::spawn(async move {
                        me.read_stream(stream, from).await;
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

    /// Reads length-prefixed frames until the peer closes, a frame is malformed, or the stream
    /// idles for a minute.
    async fn read_stream(self, mut stream: TcpStream, from: SocketAddr) {
        let idle = Duration::from_secs(60);
        loop {
            let mut prefix = [0u8; wire::STREAM_PREFIX_LEN];
            match tokio::time::timeout(idle, stream.read_exact(&mut prefix)).await {
                Ok(Ok(_)) => {}
                _ => return,
            }
            let len = match wire::stream_frame_len(prefix, self.inner.max_frame) {
                Ok(len) => len,
                Err(e) => {
                    self.inner.stats.stream_rejects.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%from, error = %e, "dropping stream");
                    return;
                }
            };
            // The buffer grows with the bytes that arrive, not with the length a peer claims.
            let mut frame = Vec::with_capacity(len.min(64 << 10));
            let mut limited = (&mut stream).take(len as u64);
            match tokio::time::timeout(FRAME_DEADLINE, limited.read_to_end(&mut frame)).await {
                Ok(Ok(n)) if n == len => {}
                _ => {
                    self.inner.stats.stream_rejects.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
            let _ = self.with(|a, now| a.handle_stream(now, from, &frame));
        }
    }

    async fn timer_loop(self) {
        loop {
            let deadline = self.read(Agent::poll_timeout);
            let sleep = match deadline {
                Some(d) => tokio::time::sleep_until(d.into()),
                None => tokio::time::sleep(Duration::from_secs(3600)),
            };
            tokio::select! {
                _ = sleep => {
                    let _ = self.with(|a, now| a.handle_timeout(now));
                }
                _ = self.inner.wake.notified() => {}
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
            let now = self.read(Agent::unreachable_seeds);
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
            let _ = self.with(|a, now| a.join(now, &ok));
            if failed.is_empty() {
                tracing::info!("all seeds resolved");
                return;
            }
        }
    }
}

/// Sends datagrams on the gossip socket and stream frames over one TCP connection per peer
/// (opened on demand, closed after a minute idle).
async fn send_loop(inner: Arc<Inner>, udp: Arc<UdpSocket>, mut rx: mpsc::UnboundedReceiver<Transmit>) {
    let mut streams: HashMap<SocketAddr, mpsc::Sender<Bytes>> = HashMap::new();
    while let Some(t) = rx.recv().await {
        match t.kind {
            TransmitKind::Datagram => {
                if udp.send_to(&t.bytes, t.dst).await.is_err() {
                    inner.stats.send_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            TransmitKind::Stream => {
                let tx = match streams.get(&t.dst) {
                    Some(tx) if !tx.is_closed() => tx.clone(),
                    _ => {
                        streams.retain(|_, tx| !tx.is_closed());
                        if streams.len() >= MAX_STREAM_WRITERS {
                            inner.stats.stream_connect_errors.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        let (tx, frames) = mpsc::channel(256);
                        tokio::spawn(stream_writer(inner.clone(), t.dst, frames));
                        streams.insert(t.dst, tx.clone());
                        tx
                    }
                };
                if tx.try_send(t.bytes).is_err() {
                    // A peer that cannot keep up loses frames; anti-entropy repairs them.
                    inner.stats.stream_connect_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

async fn stream_writer(inner: Arc<Inner>, dst: SocketAddr, mut frames: mpsc::Receiver<Bytes>) {
    let connect = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(dst)).await;
    let Ok(Ok(mut stream)) = connect else {
        inner.stats.stream_connect_errors.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let _ = stream.set_nodelay(true);
    loop {
        let frame = match tokio::time::timeout(Duration::from_secs(60), frames.recv()).await {
            Ok(Some(f)) => f,
            _ => return,
        };
        let write = async {
            stream.write_all(&wire::stream_prefix(frame.len())).await?;
            stream.write_all(&frame).await
        };
        if tokio::time::timeout(Duration::from_secs(10), write).await.map_or(true, |r| r.is_err()) {
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

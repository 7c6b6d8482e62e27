//! The scale run: a whole cluster forms (joins spread over a window, through a seed list),
//! every node attaches to one network and publishes its endpoints, and the cluster runs on to
//! a fixed virtual time. It reports how long the simulator took in wall time and memory, where
//! the work went, and when membership and the tables converged.
//!
//! Wall time and memory are read here for the report only; they never reach the simulated
//! cluster, whose trace stays a function of the seed.

use std::time::{Duration, Instant};

use bytes::Bytes;
use weft_gossip::Config;

use crate::cluster::{NetModel, Sim, Work};
use crate::host::Host;
use crate::scenarios::{NET, T};

/// What the scale run does.
#[derive(Debug, Clone)]
pub struct ScaleOptions {
    pub nodes: usize,
    pub seed: u64,
    /// Virtual time simulated in all, from the first join.
    pub duration: Duration,
    /// Joins are spread evenly over this window.
    pub join_over: Duration,
    /// The first this many nodes are every node's seed list.
    pub seeds: usize,
    /// Endpoint entries each node writes as it attaches.
    pub writes_per_node: usize,
    pub net: NetModel,
    /// Stop early (and say so) when the process's resident memory passes this many bytes.
    pub max_rss: Option<u64>,
}

/// One progress sample.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleSample {
    pub virtual_time: Duration,
    /// Nodes that have joined so far.
    pub joined: usize,
    pub wall: Duration,
    pub rss: Option<u64>,
    pub work: Work,
}

/// What the scale run found.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleReport {
    pub nodes: usize,
    pub seed: u64,
    /// Virtual time simulated (less than asked if the memory cap stopped it).
    pub virtual_time: Duration,
    /// Nodes that joined (all, unless the memory cap stopped the run during the joins).
    pub joined: usize,
    pub wall: Duration,
    pub peak_rss: Option<u64>,
    /// When every node saw every other alive, and when every node held every endpoint.
    pub membership_converged: Option<Duration>,
    pub tables_converged: Option<Duration>,
    /// At the end, the first node whose view lacks a member, if any (see
    /// [`Sim::membership_gap_report`]).
    pub membership_gap: Option<String>,
    /// Wall time spent until membership and the tables had both converged: the cost of
    /// forming the cluster.
    pub formed_wall: Option<Duration>,
    /// Wall seconds per virtual second over the last 10 s of the run (the window of the
    /// steady traffic figures): the cost of running a formed cluster.
    pub steady_wall_per_virtual_s: Option<f64>,
    pub work: Work,
    /// Messages and bytes sent per node per second over the last 10 s of the run.
    pub steady_msgs_per_node_per_s: f64,
    pub steady_bytes_per_node_per_s: f64,
    pub samples: Vec<ScaleSample>,
    /// Times any node hid the entries of an owner (no node fails in this scenario, so every
    /// one is a live owner hidden wrongly: a join storm must not make membership miss one).
    pub live_owners_hidden: u64,
    /// Why the run stopped early, if it did.
    pub stopped: Option<String>,
    pub trace: u64,
}

/// Peak resident memory of this process (Linux `VmHWM`), bytes.
pub fn peak_rss() -> Option<u64> {
    proc_status_kib("VmHWM:").map(|k| k * 1024)
}

/// Resident memory of this process now (Linux `VmRSS`), bytes.
pub fn current_rss() -> Option<u64> {
    proc_status_kib("VmRSS:").map(|k| k * 1024)
}

fn proc_status_kib(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Runs the scale scenario, calling `progress` every 5 s of virtual time.
pub fn scale<H: Host>(
    o: &ScaleOptions,
    mut progress: impl FnMut(&ScaleSample),
) -> Result<ScaleReport, String> {
    #[allow(clippy::disallowed_methods)] // wall time, for the report only
    let wall0 = Instant::now();
    let wall = || {
        #[allow(clippy::disallowed_methods)]
        Instant::now().duration_since(wall0)
    };
    let n = o.nodes;
    let mut c = Sim::<H>::new(n, o.seed, Config::lan(n as u32), o.net.clone());
    let seeds: Vec<_> = (0..o.seeds.clamp(1, n)).map(|i| c.nodes[i].addr).collect();
    let spacing = o.join_over / n as u32;
    let value = Bytes::from_static(b"{\"Host IP\":\"10.0.0.1\"}");
    let mut id = String::new();
    let mut samples = Vec::new();
    let mut next_sample = Duration::from_secs(5);
    let mut stopped = None;
    let mut joined = 0;
    let mut sample = |c: &Sim<H>, joined: usize, samples: &mut Vec<ScaleSample>| {
        let s =
            ScaleSample { virtual_time: c.elapsed(), joined, wall: wall(), rss: current_rss(), work: c.work };
        progress(&s);
        samples.push(s);
    };
    // The cap is checked every 200 ms of virtual time: a join storm grows memory fast.
    let over_cap = || {
        let max = o.max_rss?;
        let rss = current_rss().filter(|rss| *rss > max)?;
        Some(format!("resident memory {} MiB passed the cap of {} MiB", rss >> 20, max >> 20))
    };
    let check_every = Duration::from_millis(200);
    let mut next_check = check_every;
    // Joins: node i joins at i * spacing, attaches and publishes its endpoints.
    for i in 0..n {
        c.join(i, &seeds);
        if i == 0 {
            id = c.define_network(0, NET);
        } else {
            c.attach(i, &id);
        }
        for k in 0..o.writes_per_node {
            c.write(i, &id, T, &format!("{}-ep{k}", c.nodes[i].name), Some(value.clone()))?;
        }
        joined = i + 1;
        c.run_for(spacing);
        if c.elapsed() >= next_sample {
            next_sample += Duration::from_secs(5);
            sample(&c, joined, &mut samples);
        }
        if c.elapsed() >= next_check {
            next_check = c.elapsed() + check_every;
            stopped = over_cap();
            if stopped.is_some() {
                break;
            }
        }
    }
    let want = n * o.writes_per_node;
    let (mut membership, mut tables) = (None, None);
    let before_steady = o.duration.saturating_sub(Duration::from_secs(10));
    let mut steady_from = None;
    let mut formed = None;
    let mut step_no = 0u64;
    while stopped.is_none() && c.elapsed() < o.duration {
        let step = check_every.min(o.duration - c.elapsed());
        c.run_for(step);
        stopped = over_cap();
        step_no += 1;
        // Convergence is checked every second (each check is O(n)).
        if step_no.is_multiple_of(5) || c.elapsed() >= o.duration {
            if membership.is_none() && c.membership_converged() {
                membership = Some(c.elapsed());
            }
            if tables.is_none() && (0..n).all(|i| c.live_len(i, &id, T) == want) {
                tables = Some(c.elapsed());
            }
            if formed.is_none() && membership.is_some() && tables.is_some() {
                formed = Some(wall());
            }
        }
        if steady_from.is_none() && c.elapsed() >= before_steady {
            steady_from = Some((c.elapsed(), wall(), c.nodes.iter().map(|s| s.traffic).collect::<Vec<_>>()));
        }
        if c.elapsed() >= next_sample {
            next_sample += Duration::from_secs(5);
            sample(&c, joined, &mut samples);
        }
    }
    let (mut msgs, mut bytes, mut steady_wall_per_virtual_s) = (0.0, 0.0, None);
    let end_wall = wall();
    if let Some((from, from_wall, before)) = steady_from {
        let virt = c.elapsed().saturating_sub(from).as_secs_f64();
        steady_wall_per_virtual_s =
            (virt > 0.0).then(|| end_wall.saturating_sub(from_wall).as_secs_f64() / virt);
        let secs = (c.elapsed() - from).as_secs_f64().max(1e-9) * n as f64;
        let (m, b) = c
            .nodes
            .iter()
            .zip(&before)
            .map(|(s, b)| s.traffic.since(b))
            .fold((0u64, 0u64), |(m, b), t| (m + t.messages(), b + t.bytes()));
        (msgs, bytes) = (m as f64 / secs, b as f64 / secs);
    }
    c.check()?;
    let live_owners_hidden = (0..n)
        .filter(|&i| c.is_up(i))
        .map(|i| {
            let s = c.node(i).stats();
            s.owners_hidden_failed + s.owners_hidden_unknown
        })
        .sum();
    Ok(ScaleReport {
        nodes: n,
        seed: o.seed,
        virtual_time: c.elapsed(),
        joined,
        wall: end_wall,
        peak_rss: peak_rss(),
        membership_converged: membership,
        tables_converged: tables,
        membership_gap: c.membership_gap_report(),
        formed_wall: formed,
        steady_wall_per_virtual_s,
        work: c.work,
        steady_msgs_per_node_per_s: msgs,
        steady_bytes_per_node_per_s: bytes,
        samples,
        live_owners_hidden,
        stopped,
        trace: c.trace_hash(),
    })
}

//! Measurements on simulated clusters: convergence of one entry, failure detection, a healed
//! partition, and the scale run. Each takes a seed and replays exactly from it.

use std::time::Duration;

use bytes::Bytes;
use weft_gossip::Config;

use crate::cluster::{NetModel, Sim, Traffic, mix};
use crate::host::Host;

/// Nearest-rank percentile of sorted samples.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// p50, p90, p99 and max of samples, in milliseconds (nearest rank).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(mut samples: Vec<Duration>) -> Percentiles {
        samples.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        Percentiles {
            p50: ms(percentile(&samples, 50.0)),
            p90: ms(percentile(&samples, 90.0)),
            p99: ms(percentile(&samples, 99.0)),
            max: ms(samples.last().copied().unwrap_or_default()),
        }
    }
}

impl std::fmt::Display for Percentiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {:.0} ms  p90 {:.0} ms  p99 {:.0} ms  max {:.0} ms",
            self.p50, self.p90, self.p99, self.max
        )
    }
}

/// The network every scenario's nodes attach to.
pub const NET: &str = "net1";
/// The node-owned table scenarios write.
pub const T: &str = "endpoints";

/// Runs until `done` holds (checked every 100 ms), at most `limit`; whether it did.
pub fn run_until_holds<H: Host>(
    c: &mut Sim<H>,
    limit: Duration,
    mut done: impl FnMut(&Sim<H>) -> bool,
) -> bool {
    let end = c.now() + limit;
    while c.now() < end {
        if done(c) {
            return true;
        }
        c.run_for(Duration::from_millis(100));
    }
    done(c)
}

/// Joins `n` nodes through node 0, 2 ms apart (hosts come up over time, not in one
/// millisecond), runs until every node sees every other (checked every 500 ms of virtual
/// time, at most `limit`); then node 0 defines [`NET`], every node attaches to it, and the
/// cluster runs until the attachments have spread and (within a minute) nothing is left to
/// send. The error names
/// a node whose view still lacks a member, and what it holds under that member's name.
pub fn settle<H: Host>(n: usize, seed: u64, net: NetModel, limit: Duration) -> Result<Sim<H>, String> {
    let mut c = Sim::<H>::new(n, seed, Config::lan(n as u32), net);
    let seeds = [c.nodes[0].addr];
    for i in 0..n {
        c.join(i, &seeds);
        c.run_for(Duration::from_millis(2));
    }
    while c.elapsed() < limit && !c.membership_converged() {
        c.run_for(Duration::from_millis(500));
    }
    if let Some(gap) = c.membership_gap_report() {
        return Err(format!(
            "seed {seed}: membership did not settle within {limit:?} of virtual time: {gap}"
        ));
    }
    let id = c.define_network(0, NET);
    for i in 1..n {
        c.attach(i, &id);
    }
    if !run_until_holds(&mut c, Duration::from_secs(60), Sim::tables_quiet) {
        return Err(format!("seed {seed}: attachments still spreading 60 s after attaching"));
    }
    // SWIM's backlog of the join storm drains too, so traffic measured next is the cluster's
    // own; under loss suspicions keep a trickle of updates going, so it may not reach zero.
    run_until_holds(&mut c, Duration::from_secs(60), Sim::quiet);
    c.run_for(Duration::from_secs(1));
    Ok(c)
}

/// Virtual time from a burst of `keys` writes on one node until every node of a settled
/// `n`-node cluster holds them all; `None` if not within `limit`.
pub fn burst_convergence<H: Host>(
    n: usize,
    keys: usize,
    seed: u64,
    net: NetModel,
    limit: Duration,
) -> Result<Option<Duration>, String> {
    let mut c = settle::<H>(n, seed, net, Duration::from_secs(120))?;
    let id = c.net(NET);
    let writer = (seed as usize) % n;
    let start = c.now();
    for k in 0..keys {
        let v = Bytes::from(format!("value-{k}"));
        c.write(writer, &id, T, &format!("key-{k:05}"), Some(v))?;
    }
    let done = c.run_until(start + limit, |c| (0..c.nodes.len()).all(|i| c.live_len(i, &id, T) >= keys));
    c.check()?;
    Ok(done.then(|| c.now() - start))
}

/// One run of the convergence scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvergenceSample {
    /// Virtual time until each node held the entry, in node order (writer included, at 0).
    pub arrivals: Vec<Duration>,
    /// Until the last node held it.
    pub last: Duration,
    /// Datagrams and stream frames per node per second over the measuring window.
    pub msgs_per_node_per_s: f64,
    pub bytes_per_node_per_s: f64,
    /// Of those bytes, what went in stream frames (anti-entropy, large events).
    pub stream_bytes_per_node_per_s: f64,
    /// The trace hash at the end of the run.
    pub trace: u64,
}

/// One entry written on a random node of a settled, quiet `n`-node cluster: when each node
/// has it, and what the cluster sends per node per second over `window` after the write.
pub fn convergence<H: Host>(
    n: usize,
    seed: u64,
    net: NetModel,
    window: Duration,
) -> Result<ConvergenceSample, String> {
    let mut c = settle::<H>(n, seed, net, Duration::from_secs(120))?;
    let id = c.net(NET);
    let writer = (mix(seed, 7) % n as u64) as usize;
    let before: Vec<Traffic> = c.nodes.iter().map(|s| s.traffic).collect();
    c.record = true;
    c.arrivals.clear();
    let start = c.now();
    let start_elapsed = c.elapsed();
    c.write(writer, &id, T, "probe", Some(Bytes::from_static(b"value")))?;
    let mut arrivals: Vec<Option<Duration>> = vec![None; n];
    arrivals[writer] = Some(Duration::ZERO);
    let mut seen = 1;
    let mut consumed = 0;
    let deadline = start + window.max(Duration::from_secs(60));
    let done = c.run_until(deadline, |c| {
        for (i, at, ev) in &c.arrivals[consumed..] {
            if ev.key == "probe" && arrivals[*i].is_none() {
                arrivals[*i] = Some(*at - start_elapsed);
                seen += 1;
            }
        }
        consumed = c.arrivals.len();
        seen == n
    });
    if !done {
        let missing = arrivals.iter().filter(|a| a.is_none()).count();
        return Err(format!("seed {seed}: {missing} of {n} nodes still lack the entry after 60 s"));
    }
    let last = c.now() - start;
    let measured_until = start + window;
    c.record = false;
    if c.now() < measured_until {
        c.run_until(measured_until, |_| false);
    }
    let secs = window.as_secs_f64() * n as f64;
    let mut sent = Traffic::default();
    for (s, b) in c.nodes.iter().zip(&before) {
        let d = s.traffic.since(b);
        sent.datagrams += d.datagrams;
        sent.streams += d.streams;
        sent.datagram_bytes += d.datagram_bytes;
        sent.stream_bytes += d.stream_bytes;
    }
    c.check()?;
    Ok(ConvergenceSample {
        arrivals: arrivals.into_iter().map(|a| a.unwrap_or(last)).collect(),
        last,
        msgs_per_node_per_s: sent.messages() as f64 / secs,
        bytes_per_node_per_s: sent.bytes() as f64 / secs,
        stream_bytes_per_node_per_s: sent.stream_bytes as f64 / secs,
        trace: c.trace_hash(),
    })
}

/// One run of the failure-detection scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct DetectionSample {
    /// Virtual time from the crash until every live node reported the crashed node down.
    pub detected: Duration,
    /// When each live node reported it, from the crash.
    pub per_node: Vec<Duration>,
    /// Reports of a live node being down, from settling until the end of the run.
    pub false_failures: usize,
}

/// Crashes one node of a settled `n`-node cluster (after 5 quiet seconds): when every live
/// node has declared it down, and how often live nodes were wrongly declared down.
pub fn failure_detection<H: Host>(n: usize, seed: u64, net: NetModel) -> Result<DetectionSample, String> {
    let mut c = settle::<H>(n, seed, net, Duration::from_secs(120))?;
    c.downs.clear();
    c.run_for(Duration::from_secs(5));
    let victim = 1 + (mix(seed, 9) % (n as u64 - 1)) as usize;
    let gone = c.node(victim).id().clone();
    let start = c.elapsed();
    c.crash(victim);
    let mut told: Vec<Option<Duration>> = vec![None; n];
    told[victim] = Some(Duration::ZERO);
    let mut consumed = 0;
    let limit = c.now() + Duration::from_secs(120);
    let done = c.run_until(limit, |c| {
        for (i, at, id) in &c.downs[consumed..] {
            if *id == gone && told[*i].is_none() {
                told[*i] = Some(*at - start);
            }
        }
        consumed = c.downs.len();
        told.iter().all(Option::is_some)
    });
    if !done {
        let missing = told.iter().filter(|t| t.is_none()).count();
        return Err(format!("seed {seed}: {missing} live nodes never declared the crashed node down"));
    }
    let detected = c.elapsed() - start;
    c.run_for(Duration::from_secs(10));
    let false_failures = c.downs.iter().filter(|(_, _, id)| *id != gone).count();
    let per_node = told
        .into_iter()
        .enumerate()
        .filter(|(i, _)| *i != victim)
        .map(|(_, t)| t.unwrap_or_default())
        .collect();
    c.check()?;
    Ok(DetectionSample { detected, per_node, false_failures })
}

/// One run of the partition scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct PartitionSample {
    /// Virtual time from the heal until every node holds both sides' writes.
    pub reconverged: Duration,
    /// Bytes all nodes sent from the heal until then, per node.
    pub repair_bytes_per_node: f64,
}

/// Splits a settled `n`-node cluster in two halves for `split`, writes `writes` entries on a
/// node of each side, heals, and measures the way back to one table.
pub fn partition<H: Host>(
    n: usize,
    seed: u64,
    net: NetModel,
    split: Duration,
    writes: usize,
) -> Result<PartitionSample, String> {
    let mut c = settle::<H>(n, seed, net, Duration::from_secs(120))?;
    let id = c.net(NET);
    let (left, right): (Vec<usize>, Vec<usize>) = (0..n).partition(|&i| i < n / 2);
    c.partition(&[left.clone(), right.clone()]);
    for (side, writer) in [("left", left[0]), ("right", right[0])] {
        for k in 0..writes {
            c.write(writer, &id, T, &format!("{side}-{k}"), Some(Bytes::from_static(b"v")))?;
        }
    }
    c.run_for(split);
    c.heal();
    let before: u64 = c.nodes.iter().map(|s| s.traffic.bytes()).sum();
    let start = c.elapsed();
    let want = 2 * writes;
    let limit = c.now() + Duration::from_secs(300);
    let mut next_check = c.now();
    let done = c.run_until(limit, |c| {
        // Checking every node's table after every event would dominate: every 10 ms.
        if c.now() < next_check {
            return false;
        }
        next_check = c.now() + Duration::from_millis(10);
        // Live entries: one hidden while its owner is still thought failed is not there yet.
        (0..c.nodes.len()).all(|i| c.live_len(i, &id, T) == want)
    });
    if !done {
        return Err(format!("seed {seed}: not reconverged 300 s after healing"));
    }
    let after: u64 = c.nodes.iter().map(|s| s.traffic.bytes()).sum();
    c.check()?;
    if let Some(lost) = c.lost_entry() {
        return Err(format!("seed {seed}: a write made during the partition is lost: {lost}"));
    }
    Ok(PartitionSample {
        reconverged: c.elapsed() - start,
        repair_bytes_per_node: (after - before) as f64 / n as f64,
    })
}

//! `weft-sim`: scenarios on simulated weft clusters (virtual time, a modelled network).

use std::io::Write;
use std::ops::Range;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use weft_sim::NetModel;
use weft_sim::matrix::{PERTURBATIONS, cell, needs_joiner};
use weft_sim::scenarios::{Percentiles, convergence, failure_detection, partition};

/// `println!` that ends the program quietly when stdout is gone (`weft-sim ... | head`).
macro_rules! out {
    ($($t:tt)*) => {
        if writeln!(std::io::stdout(), $($t)*).is_err() {
            std::process::exit(0);
        }
    };
}

#[derive(Parser)]
#[command(name = "weft-sim", about = "Deterministic simulations of weft clusters", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// What every scenario over a range of seeds takes.
#[derive(Args)]
struct Common {
    #[arg(long, default_value_t = 25)]
    nodes: usize,
    /// Datagram loss, 0..1.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// First seed; seeds `seed..seed+seeds` run.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    seeds: u64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

impl Common {
    /// The network model, or one line naming the bad argument.
    fn net(&self) -> Result<NetModel, Failure> {
        if self.nodes < 2 {
            return Err(Failure::Usage("--nodes must be at least 2".into()));
        }
        if !(0.0..1.0).contains(&self.loss) {
            return Err(Failure::Usage(format!("--loss must be in [0, 1), got {}", self.loss)));
        }
        Ok(NetModel { loss: self.loss, ..NetModel::default() })
    }

    fn seeds(&self) -> Range<u64> {
        self.seed..self.seed + self.seeds
    }

    fn describe(&self) -> String {
        format!("{} nodes, loss {}, seeds {}..{}", self.nodes, self.loss, self.seed, self.seed + self.seeds)
    }

    /// The JSON fields every scenario reports, with the scenario's percentiles.
    fn json(&self, p: Percentiles) -> serde_json::Map<String, serde_json::Value> {
        let v = serde_json::json!({
            "nodes": self.nodes, "seed": self.seed, "seeds": self.seeds, "loss": self.loss,
            "p50_ms": p.p50, "p90_ms": p.p90, "p99_ms": p.p99, "max_ms": p.max,
        });
        let serde_json::Value::Object(m) = v else { unreachable!("an object literal") };
        m
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// One entry written on a random node, over many seeds: when every node has it, and what
    /// the cluster sends meanwhile.
    Convergence {
        #[command(flatten)]
        common: Common,
        /// Run every seed twice and fail unless both runs are identical.
        #[arg(long)]
        check_determinism: bool,
    },
    /// One node crashes: time until every live node declares it down (over seeds), and false
    /// failures of live nodes.
    FailureDetection {
        #[command(flatten)]
        common: Common,
    },
    /// Split the cluster in two halves, write on both sides, heal: time to reconverge and
    /// bytes spent on the repair.
    Partition {
        #[command(flatten)]
        common: Common,
        /// How long the split lasts, seconds.
        #[arg(long, default_value_t = 30)]
        split_s: u64,
        /// Entries written on each side.
        #[arg(long, default_value_t = 100)]
        writes: usize,
    },
    /// networkdb's convergence matrix (quiet cells): each perturbation on each cluster size,
    /// over many seeds, as a table in the layout of networkdb's own figures.
    NetworkdbMatrix {
        /// Cluster sizes (join and leave cells start at 3).
        #[arg(long, value_delimiter = ',', default_value = "2,3,5,10,25")]
        sizes: Vec<usize>,
        /// Samples (seeds) per cell.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..))]
        samples: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

/// Why a command stopped: bad arguments (exit 2) or a run that failed (exit 1), one line each.
enum Failure {
    Usage(String),
    Run(String),
}

impl From<String> for Failure {
    fn from(e: String) -> Self {
        Failure::Run(e)
    }
}

fn main() -> ExitCode {
    match run(Cli::parse().cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(e)) => {
            eprintln!("weft-sim: {e}");
            ExitCode::from(2)
        }
        Err(Failure::Run(e)) => {
            eprintln!("weft-sim: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Cmd) -> Result<(), Failure> {
    match cmd {
        Cmd::Convergence { common, check_determinism } => {
            let net = common.net()?;
            let window = Duration::from_secs(10);
            let mut samples = Vec::new();
            for s in common.seeds() {
                let x = convergence(common.nodes, s, net.clone(), window)?;
                if check_determinism && convergence(common.nodes, s, net.clone(), window).as_ref() != Ok(&x) {
                    return Err(Failure::Run(format!("seed {s}: two runs of the same seed differ")));
                }
                samples.push(x);
            }
            let last = Percentiles::of(samples.iter().map(|x| x.last).collect());
            let per_node = Percentiles::of(samples.iter().flat_map(|x| x.arrivals.iter().copied()).collect());
            let mean = |f: fn(&weft_sim::scenarios::ConvergenceSample) -> f64| {
                samples.iter().map(f).sum::<f64>() / samples.len() as f64
            };
            let msgs = mean(|x| x.msgs_per_node_per_s);
            let bytes = mean(|x| x.bytes_per_node_per_s);
            let stream = mean(|x| x.stream_bytes_per_node_per_s);
            if common.json {
                let mut m = common.json(last);
                m.insert("node_p50_ms".into(), per_node.p50.into());
                m.insert("node_p99_ms".into(), per_node.p99.into());
                m.insert("msgs_per_node_per_s".into(), msgs.into());
                m.insert("bytes_per_node_per_s".into(), bytes.into());
                m.insert("stream_bytes_per_node_per_s".into(), stream.into());
                out!("{}", serde_json::Value::Object(m));
            } else {
                out!("convergence: {}", common.describe());
                out!("  until the last node has it: {last}");
                out!("  per node:                   p50 {:.0} ms  p99 {:.0} ms", per_node.p50, per_node.p99);
                out!(
                    "  traffic: {msgs:.1} msgs/node/s, {bytes:.0} bytes/node/s, of which {stream:.0} in streams (10 s after the write)"
                );
            }
        }
        Cmd::FailureDetection { common } => {
            let net = common.net()?;
            let mut times = Vec::new();
            let mut false_failures = 0;
            for s in common.seeds() {
                let x = failure_detection(common.nodes, s, net.clone())?;
                times.push(x.detected);
                false_failures += x.false_failures;
            }
            let p = Percentiles::of(times);
            if common.json {
                let mut m = common.json(p);
                m.insert("false_failures".into(), false_failures.into());
                out!("{}", serde_json::Value::Object(m));
            } else {
                out!("failure-detection: {}", common.describe());
                out!("  until every live node declares the crashed one down: {p}");
                out!("  live nodes wrongly declared down: {false_failures} (over all seeds)");
            }
        }
        Cmd::Partition { common, split_s, writes } => {
            let net = common.net()?;
            let mut times = Vec::new();
            let mut bytes = 0.0;
            for s in common.seeds() {
                let x = partition(common.nodes, s, net.clone(), Duration::from_secs(split_s), writes)?;
                times.push(x.reconverged);
                bytes += x.repair_bytes_per_node;
            }
            let bytes = bytes / common.seeds as f64;
            let p = Percentiles::of(times);
            if common.json {
                let mut m = common.json(p);
                m.insert("split_s".into(), split_s.into());
                m.insert("writes_per_side".into(), writes.into());
                m.insert("repair_bytes_per_node".into(), bytes.into());
                out!("{}", serde_json::Value::Object(m));
            } else {
                out!(
                    "partition: {}, split in two for {split_s} s, {writes} writes per side",
                    common.describe()
                );
                out!("  from the heal until every node has both sides' writes: {p}");
                out!("  bytes sent per node meanwhile: {bytes:.0}");
            }
        }
        Cmd::NetworkdbMatrix { sizes, samples, seed } => {
            if let Some(bad) = sizes.iter().find(|&&n| n < 2) {
                return Err(Failure::Usage(format!("--sizes: a cluster needs at least 2 nodes, got {bad}")));
            }
            out!("| test | perturbation | nodes | n | p50 ms | p90 ms | p99 ms | max ms | n >2 s |");
            out!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
            for p in PERTURBATIONS {
                for &n in sizes.iter().filter(|&&n| n >= 3 || !needs_joiner(p)) {
                    let times =
                        (seed..seed + samples).map(|s| cell(p, n, s)).collect::<Result<Vec<_>, _>>()?;
                    let slow = times.iter().filter(|d| **d > Duration::from_secs(2)).count();
                    let q = Percentiles::of(times);
                    out!(
                        "| quiet | {p} | {n} | {samples} | {:.0} | {:.0} | {:.0} | {:.0} | {slow} |",
                        q.p50,
                        q.p90,
                        q.p99,
                        q.max
                    );
                }
            }
        }
    }
    Ok(())
}

//! `weft-sim`: scenarios on simulated weft clusters (virtual time, a modelled network). Every
//! scenario runs the agent that ships (`weft_node::Agent`) on every simulated host.

use std::io::Write;
use std::ops::Range;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use weft_node::Agent;
use weft_sim::NetModel;
use weft_sim::matrix::{CHURN, PERTURBATIONS, cell, needs_joiner};
use weft_sim::plot::{Chart, Series, cdf, csv, svg};
use weft_sim::scale::{ScaleOptions, scale};
use weft_sim::scenarios::{ConvergenceSample, Percentiles, convergence, failure_detection, partition};
use weft_sim::soak::{SoakOptions, SoakReport, soak};

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
    /// Cluster sizes, comma-separated: each is run over every seed.
    #[arg(long, value_delimiter = ',', default_value = "25")]
    nodes: Vec<usize>,
    /// Datagram loss, 0..1.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// First seed: seeds `seed`, `seed+1`, ... up to `seed+seeds-1` run.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    seeds: u64,
    /// Print one JSON object per cluster size.
    #[arg(long)]
    json: bool,
    /// Write the samples as CSV.
    #[arg(long, value_name = "FILE.csv")]
    csv: Option<PathBuf>,
    /// Draw the scenario's chart as SVG.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
}

impl Common {
    /// The network model, or one line naming the bad argument.
    fn net(&self) -> Result<NetModel, Failure> {
        check_outputs(&[("--csv", &self.csv), ("--plot", &self.plot)])?;
        if let Some(bad) = self.nodes.iter().find(|&&n| n < 2) {
            return Err(Failure::Usage(format!("--nodes: a cluster needs at least 2 nodes, got {bad}")));
        }
        if self.nodes.iter().any(|&n| n > 60_000) {
            return Err(Failure::Usage("--nodes: at most 60000 (simulated addresses run out)".into()));
        }
        if !(0.0..1.0).contains(&self.loss) {
            return Err(Failure::Usage(format!("--loss must be in [0, 1), got {}", self.loss)));
        }
        Ok(NetModel::lossy(self.loss))
    }

    fn seeds(&self) -> Range<u64> {
        self.seed..self.seed + self.seeds
    }

    fn describe(&self, n: usize) -> String {
        format!("{n} nodes, loss {}, seeds {} to {}", self.loss, self.seed, self.seed + self.seeds - 1)
    }

    /// The JSON fields every scenario reports, with the scenario's percentiles.
    fn json(&self, n: usize, p: Percentiles) -> serde_json::Map<String, serde_json::Value> {
        let v = serde_json::json!({
            "nodes": n, "seed": self.seed, "seeds": self.seeds, "loss": self.loss,
            "p50_ms": p.p50, "p90_ms": p.p90, "p99_ms": p.p99, "max_ms": p.max,
        });
        let serde_json::Value::Object(m) = v else { unreachable!("an object literal") };
        m
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// One entry written on a random node, over many seeds: when every node has it, and what
    /// the cluster sends meanwhile. `--plot` draws the fraction of nodes holding the entry
    /// against time, one curve per cluster size.
    Convergence {
        #[command(flatten)]
        common: Common,
        /// Run every seed twice and fail unless both runs' traces are identical.
        #[arg(long)]
        check_determinism: bool,
        /// Draw bytes per node per second against cluster size as SVG.
        #[arg(long, value_name = "FILE.svg")]
        plot_bandwidth: Option<PathBuf>,
    },
    /// One node crashes: time until every live node declares it down (over seeds), and false
    /// failures of live nodes. `--plot` draws the CDF of detection times.
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
    /// networkdb's convergence matrix: each perturbation on each cluster size, over many seeds,
    /// and the churn cells, as a table in the layout of networkdb's own figures.
    NetworkdbMatrix {
        /// Cluster sizes (join and leave cells start at 3).
        #[arg(long, value_delimiter = ',', default_value = "2,3,5,10,25,100,1000")]
        sizes: Vec<usize>,
        /// Cluster sizes of the churn cells.
        #[arg(long, value_delimiter = ',', default_value = "5,10,25")]
        churn_sizes: Vec<usize>,
        /// Samples (seeds) per cell up to 25 nodes.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        samples: u64,
        /// Samples per cell above 25 nodes (each settles a whole cluster).
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        large_samples: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Only these perturbations (comma-separated names).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Write every sample as CSV.
        #[arg(long, value_name = "FILE.csv")]
        csv: Option<PathBuf>,
        /// Draw p99 against cluster size, one line per perturbation, as SVG.
        #[arg(long, value_name = "FILE.svg")]
        plot: Option<PathBuf>,
    },
    /// A whole cluster forms (joins spread over a window), attaches to a network, publishes
    /// endpoints and runs to a fixed virtual time: wall time, peak memory, where the work went.
    Scale {
        /// Cluster size (one per process: peak memory is the process's).
        #[arg(long, default_value_t = 2000)]
        nodes: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Virtual seconds simulated in all.
        #[arg(long, visible_alias = "duration", default_value_t = 60)]
        duration_s: u64,
        /// Joins are spread over this many virtual seconds.
        #[arg(long, default_value_t = 10)]
        join_over_s: u64,
        /// Endpoints each node publishes.
        #[arg(long, default_value_t = 1)]
        writes: usize,
        /// Stop a run early (and report it) when the process passes this resident memory.
        #[arg(long, value_name = "MiB")]
        max_rss_mib: Option<u64>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Print progress every 5 s of virtual time to stderr.
        #[arg(long)]
        progress: bool,
        /// Write the progress samples (virtual time, wall time, memory, work) as CSV.
        #[arg(long, value_name = "FILE.csv")]
        csv: Option<PathBuf>,
        /// Draw wall time against virtual time as SVG.
        #[arg(long, value_name = "FILE.svg")]
        plot: Option<PathBuf>,
    },
    /// Endpoint churn with loss, a partition, crashes and restarts, an allocation checker after
    /// every step: allocations per second, the share that needed a donation, allocation
    /// latency (virtual time, local and donated apart), duplicates (must be 0).
    Allocation {
        #[arg(long, default_value_t = 5)]
        nodes: usize,
        /// Steps of churn per seed (a create, a remove or a fault each, 50-300 ms apart).
        #[arg(long, default_value_t = 300)]
        steps: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        seeds: u64,
    },
    /// Random mixed load and faults with every checker on, over many seeds: how many pass.
    Soak {
        #[arg(long, default_value_t = 8)]
        nodes: usize,
        /// Virtual seconds of load and faults per seed.
        #[arg(long, visible_alias = "duration", default_value_t = 60)]
        duration_s: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        seeds: u64,
        /// Networks the nodes attach to and detach from.
        #[arg(long, default_value_t = 2)]
        networks: usize,
        /// Run every seed twice and fail unless both runs' traces are identical.
        #[arg(long)]
        check_determinism: bool,
        /// Write one row per seed as CSV.
        #[arg(long, value_name = "FILE.csv")]
        csv: Option<PathBuf>,
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
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version print to stdout and succeed.
        Err(e) if !e.use_stderr() => e.exit(),
        // No subcommand: the help, as clap prints it.
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
        // Clap's own errors add usage and tips; one line names the problem.
        Err(e) => {
            let msg = e.to_string();
            let first = msg.lines().next().unwrap_or_default();
            eprintln!("weft-sim: {} (see --help)", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    match run(cli.cmd) {
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

/// Refuses, before anything runs, an output file whose directory does not exist.
fn check_outputs(outputs: &[(&str, &Option<PathBuf>)]) -> Result<(), Failure> {
    for (flag, path) in outputs {
        let Some(path) = path else { continue };
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        if !dir.is_dir() {
            return Err(Failure::Usage(format!("{flag} {}: no directory {}", path.display(), dir.display())));
        }
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn run(cmd: Cmd) -> Result<(), Failure> {
    match cmd {
        Cmd::Convergence { common, check_determinism, plot_bandwidth } => {
            run_convergence(&common, check_determinism, plot_bandwidth)?
        }
        Cmd::FailureDetection { common } => {
            let net = common.net()?;
            let (mut rows, mut curves) = (Vec::new(), Vec::new());
            for &n in &common.nodes {
                let (mut times, mut per_node, mut false_failures) = (Vec::new(), Vec::new(), 0);
                for s in common.seeds() {
                    let x = failure_detection::<Agent>(n, s, net.clone())?;
                    rows.push(vec![
                        n.to_string(),
                        s.to_string(),
                        format!("{:.1}", ms(x.detected)),
                        x.false_failures.to_string(),
                    ]);
                    times.push(x.detected);
                    per_node.extend(x.per_node.iter().map(|d| d.as_secs_f64()));
                    false_failures += x.false_failures;
                }
                curves.push(Series { label: format!("{n} nodes"), points: cdf(per_node) });
                let p = Percentiles::of(times);
                if common.json {
                    let mut m = common.json(n, p);
                    m.insert("false_failures".into(), false_failures.into());
                    out!("{}", serde_json::Value::Object(m));
                } else {
                    out!("failure-detection: {}", common.describe(n));
                    out!("  until every live node declares the crashed one down: {p}");
                    out!("  live nodes wrongly declared down: {false_failures} (over all seeds)");
                }
            }
            if let Some(path) = &common.csv {
                csv(path, &["nodes", "seed", "detected_ms", "false_failures"], &rows)?;
            }
            if let Some(path) = &common.plot {
                let chart = Chart {
                    title: "Failure detection: when each live node declares a crashed node down",
                    x_label: "seconds after the crash",
                    y_label: "fraction of (seed, node) reports",
                    log_x: false,
                    series: &curves,
                };
                svg(path, &chart)?;
            }
        }
        Cmd::Partition { common, split_s, writes } => {
            let net = common.net()?;
            let (mut rows, mut curves) = (Vec::new(), Vec::new());
            for &n in &common.nodes {
                let mut times = Vec::new();
                let mut bytes = 0.0;
                for s in common.seeds() {
                    let x = partition::<Agent>(n, s, net.clone(), Duration::from_secs(split_s), writes)?;
                    rows.push(vec![
                        n.to_string(),
                        s.to_string(),
                        format!("{:.1}", ms(x.reconverged)),
                        format!("{:.0}", x.repair_bytes_per_node),
                    ]);
                    times.push(x.reconverged);
                    bytes += x.repair_bytes_per_node;
                }
                let bytes = bytes / common.seeds as f64;
                curves.push(Series {
                    label: format!("{n} nodes"),
                    points: cdf(times.iter().map(|d| d.as_secs_f64()).collect()),
                });
                let p = Percentiles::of(times);
                if common.json {
                    let mut m = common.json(n, p);
                    m.insert("split_s".into(), split_s.into());
                    m.insert("writes_per_side".into(), writes.into());
                    m.insert("repair_bytes_per_node".into(), bytes.into());
                    out!("{}", serde_json::Value::Object(m));
                } else {
                    out!(
                        "partition: {}, split in two for {split_s} s, {writes} writes per side",
                        common.describe(n)
                    );
                    out!("  from the heal until every node has both sides' writes: {p}");
                    out!("  bytes sent per node meanwhile: {bytes:.0}");
                }
            }
            if let Some(path) = &common.csv {
                csv(path, &["nodes", "seed", "reconverged_ms", "repair_bytes_per_node"], &rows)?;
            }
            if let Some(path) = &common.plot {
                let title = format!("Back to one table after a {split_s} s split, {writes} writes per side");
                let chart = Chart {
                    title: &title,
                    x_label: "seconds after the heal",
                    y_label: "fraction of seeds reconverged",
                    log_x: false,
                    series: &curves,
                };
                svg(path, &chart)?;
            }
        }
        Cmd::NetworkdbMatrix {
            sizes,
            churn_sizes,
            samples,
            large_samples,
            seed,
            only,
            csv: csv_path,
            plot,
        } => {
            check_outputs(&[("--csv", &csv_path), ("--plot", &plot)])?;
            if let Some(bad) = sizes.iter().find(|&&n| n < 2) {
                return Err(Failure::Usage(format!("--sizes: a cluster needs at least 2 nodes, got {bad}")));
            }
            if let Some(bad) = churn_sizes.iter().find(|&&n| n < 3) {
                return Err(Failure::Usage(format!(
                    "--churn-sizes: churn needs at least 3 nodes, got {bad}"
                )));
            }
            let known: Vec<&str> = PERTURBATIONS.iter().copied().chain([CHURN]).collect();
            if let Some(bad) = only.iter().find(|p| !known.contains(&p.as_str())) {
                return Err(Failure::Usage(format!(
                    "--only: unknown perturbation {bad:?} (known: {})",
                    known.join(", ")
                )));
            }
            let wanted = |p: &str| only.is_empty() || only.iter().any(|o| o == p);
            let mut cells: Vec<(&str, &str, usize, String)> = Vec::new();
            for p in PERTURBATIONS.iter().copied().filter(|p| wanted(p)) {
                for &n in sizes.iter().filter(|&&n| n >= 3 || !needs_joiner(p)) {
                    cells.push(("quiet", p, n, n.to_string()));
                }
            }
            if wanted(CHURN) {
                for &n in &churn_sizes {
                    cells.push(("churn", CHURN, n, format!("{n} ({})", n - 1)));
                }
            }
            out!(
                "| test | perturbation | nodes (converged) | n | p50 ms | p90 ms | p99 ms | max ms | n >2 s |"
            );
            out!("|---|---|---|---:|---:|---:|---:|---:|---:|");
            let mut rows = Vec::new();
            let mut lines: Vec<Series> = Vec::new();
            for (test, p, n, label) in cells {
                let k = if n > 25 { large_samples } else { samples };
                let mut times = Vec::new();
                for (i, s) in (seed..seed + k).enumerate() {
                    // A large cell settles a whole cluster per sample (minutes at 1,000 nodes):
                    // say where the run is, on stderr so the table stays clean.
                    if n > 25 {
                        eprintln!("weft-sim: {p}, {n} nodes: sample {} of {k} (seed {s})", i + 1);
                    }
                    let d = cell::<Agent>(p, n, s)?;
                    rows.push(vec![
                        test.to_string(),
                        p.to_string(),
                        n.to_string(),
                        s.to_string(),
                        format!("{:.0}", ms(d)),
                    ]);
                    times.push(d);
                }
                let slow = times.iter().filter(|d| **d > Duration::from_secs(2)).count();
                let q = Percentiles::of(times);
                match lines.iter_mut().find(|l| l.label == p) {
                    Some(l) => l.points.push((n as f64, q.p99)),
                    None => lines.push(Series { label: p.to_string(), points: vec![(n as f64, q.p99)] }),
                }
                out!(
                    "| {test} | {p} | {label} | {k} | {:.0} | {:.0} | {:.0} | {:.0} | {slow} |",
                    q.p50,
                    q.p90,
                    q.p99,
                    q.max
                );
            }
            if let Some(path) = &csv_path {
                csv(path, &["test", "perturbation", "nodes", "seed", "ms"], &rows)?;
            }
            if let Some(path) = &plot {
                let chart = Chart {
                    title: "networkdb's perturbations on weft: p99 until every node agrees",
                    x_label: "nodes",
                    y_label: "p99, virtual ms",
                    log_x: true,
                    series: &lines,
                };
                svg(path, &chart)?;
            }
        }
        Cmd::Scale {
            nodes,
            seed,
            duration_s,
            join_over_s,
            writes,
            max_rss_mib,
            json,
            progress,
            csv,
            plot,
        } => {
            check_outputs(&[("--csv", &csv), ("--plot", &plot)])?;
            if !(2..=60_000).contains(&nodes) {
                return Err(Failure::Usage(format!("--nodes: from 2 to 60000 nodes, got {nodes}")));
            }
            if join_over_s >= duration_s {
                return Err(Failure::Usage(format!(
                    "--join-over-s ({join_over_s}) must be shorter than --duration-s ({duration_s})"
                )));
            }
            let o = ScaleOptions {
                nodes,
                seed,
                duration: Duration::from_secs(duration_s),
                join_over: Duration::from_secs(join_over_s),
                seeds: 3,
                writes_per_node: writes,
                net: NetModel::default(),
                max_rss: max_rss_mib.map(|m| m << 20),
            };
            run_scale(&o, json, progress, csv, plot)?;
        }
        Cmd::Allocation { nodes, steps, seed, seeds } => {
            if nodes < 2 {
                return Err(Failure::Usage(format!(
                    "--nodes: a cluster needs at least 2 nodes, got {nodes}"
                )));
            }
            let mut failed = Vec::new();
            let (mut created, mut donated, mut secs) = (0u64, 0u64, 0f64);
            let (mut local, mut donated_p) = (Vec::new(), Vec::new());
            for s in seed..seed + seeds {
                match weft_sim::allocation::allocation(nodes, s, steps) {
                    Ok(r) => {
                        out!(
                            "seed {s}: pass: {} created, {} removed in {:.1} s virtual ({:.1}/s), {} after a donation, \
                             {} gave up; latency local {}, donated {}; duplicates {}",
                            r.created,
                            r.removed,
                            r.virtual_s,
                            r.created as f64 / r.virtual_s,
                            r.donated,
                            r.gave_up,
                            r.local_latency,
                            r.donated_latency,
                            r.duplicates
                        );
                        created += r.created;
                        donated += r.donated;
                        secs += r.virtual_s;
                        local.push(r.local_latency.p99);
                        donated_p.push(r.donated_latency.p99);
                    }
                    Err(e) => {
                        out!("seed {s}: FAIL {e}");
                        failed.push(s);
                    }
                }
            }
            let median = |mut v: Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
            };
            out!(
                "allocation: {} of {seeds} seeds passed ({nodes} nodes); {:.1} allocations/s virtual; {:.1}% needed a \
                 donation; median p99 latency local {:.0} ms, donated {:.0} ms; duplicates 0",
                seeds - failed.len() as u64,
                created as f64 / secs.max(1e-9),
                100.0 * donated as f64 / created.max(1) as f64,
                median(local),
                median(donated_p)
            );
            if !failed.is_empty() {
                return Err(Failure::Run(format!("seeds failed: {failed:?}")));
            }
        }
        Cmd::Soak { nodes, duration_s, seed, seeds, networks, check_determinism, csv: csv_path } => {
            check_outputs(&[("--csv", &csv_path)])?;
            if nodes < 2 {
                return Err(Failure::Usage(format!(
                    "--nodes: a cluster needs at least 2 nodes, got {nodes}"
                )));
            }
            if duration_s == 0 {
                return Err(Failure::Usage("--duration-s must be at least 1".into()));
            }
            if networks == 0 {
                return Err(Failure::Usage("--networks must be at least 1".into()));
            }
            let (mut failed, mut rows) = (Vec::new(), Vec::new());
            for s in seed..seed + seeds {
                let o = SoakOptions { nodes, seed: s, duration: Duration::from_secs(duration_s), networks };
                let run = soak(&o).and_then(|r| {
                    if !check_determinism {
                        return Ok(r);
                    }
                    let again = soak(&o)?;
                    if again.trace != r.trace {
                        return Err(format!(
                            "two runs of the same seed differ (trace {:016x} vs {:016x})",
                            r.trace, again.trace
                        ));
                    }
                    Ok(r)
                });
                match run {
                    Ok(r) => {
                        let counts = r.counts();
                        let did: Vec<String> = counts.iter().map(|(n, what)| format!("{n} {what}")).collect();
                        out!(
                            "seed {s}: pass, trace {:016x} ({}; converged {:.1} s after the faults{})",
                            r.trace,
                            did.join(", "),
                            r.converged_after.as_secs_f64(),
                            if r.lifecycle_checked { "; lifecycle checked" } else { "" }
                        );
                        let mut row = vec![s.to_string(), "pass".into()];
                        row.extend(counts.iter().map(|(n, _)| n.to_string()));
                        row.push(format!("{:.0}", ms(r.converged_after)));
                        row.push(format!("{:016x}", r.trace));
                        rows.push(row);
                    }
                    Err(e) => {
                        out!("seed {s}: FAIL {e}");
                        failed.push(s);
                        let mut row = vec![s.to_string(), "fail".into()];
                        row.extend(std::iter::repeat_n(
                            String::new(),
                            SoakReport::default().counts().len() + 2,
                        ));
                        rows.push(row);
                    }
                }
            }
            if let Some(path) = &csv_path {
                let mut header = vec!["seed", "result"];
                header.extend(SoakReport::default().counts().iter().map(|(_, what)| *what));
                header.extend(["converged_ms", "trace"]);
                csv(path, &header, &rows)?;
            }
            out!(
                "soak: {} of {seeds} seeds passed ({nodes} nodes, {duration_s} s each)",
                seeds - failed.len() as u64
            );
            if !failed.is_empty() {
                return Err(Failure::Run(format!("soak failed for seeds {failed:?}")));
            }
        }
    }
    Ok(())
}

fn run_scale(
    o: &ScaleOptions,
    json: bool,
    progress: bool,
    csv_path: Option<PathBuf>,
    plot: Option<PathBuf>,
) -> Result<(), Failure> {
    let n = o.nodes;
    let r = scale::<Agent>(o, |s| {
        if progress {
            eprintln!(
                "  {n} nodes: virtual {:>4.0} s  wall {:>6.1} s  rss {:>6} MiB  joined {:>5}  datagrams {}",
                s.virtual_time.as_secs_f64(),
                s.wall.as_secs_f64(),
                s.rss.unwrap_or(0) >> 20,
                s.joined,
                s.work.swim_datagrams + s.work.gossip_datagrams
            );
        }
    })?;
    let mib = |b: Option<u64>| b.map_or(f64::NAN, |b| b as f64 / (1 << 20) as f64);
    let secs = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
    if let Some(path) = &csv_path {
        let rows: Vec<Vec<String>> = r
            .samples
            .iter()
            .map(|s| {
                vec![
                    format!("{:.0}", s.virtual_time.as_secs_f64()),
                    format!("{:.2}", s.wall.as_secs_f64()),
                    format!("{:.0}", mib(s.rss)),
                    s.joined.to_string(),
                    s.work.swim_datagrams.to_string(),
                    s.work.gossip_datagrams.to_string(),
                    s.work.stream_frames.to_string(),
                    s.work.timers.to_string(),
                ]
            })
            .collect();
        let header = ["virtual_s", "wall_s", "rss_mib", "joined", "swim", "gossip", "streams", "timers"];
        csv(path, &header, &rows)?;
    }
    if let Some(path) = &plot {
        let title = format!("Simulating {n} nodes: wall time against virtual time");
        let points = r.samples.iter().map(|s| (s.virtual_time.as_secs_f64(), s.wall.as_secs_f64())).collect();
        let series = [Series { label: format!("{n} nodes"), points }];
        let chart =
            Chart { title: &title, x_label: "virtual s", y_label: "wall s", log_x: false, series: &series };
        svg(path, &chart)?;
    }
    if json {
        let v = serde_json::json!({
            "nodes": n, "seed": o.seed, "virtual_s": r.virtual_time.as_secs_f64(), "joined": r.joined,
            "wall_s": r.wall.as_secs_f64(), "peak_rss_mib": mib(r.peak_rss),
            "membership_converged_s": secs(r.membership_converged),
            "tables_converged_s": secs(r.tables_converged),
            "formed_wall_s": secs(r.formed_wall),
            "steady_wall_per_virtual_s": r.steady_wall_per_virtual_s,
            "swim_datagrams": r.work.swim_datagrams, "gossip_datagrams": r.work.gossip_datagrams,
            "stream_frames": r.work.stream_frames, "timers": r.work.timers,
            "steady_msgs_per_node_per_s": r.steady_msgs_per_node_per_s,
            "steady_bytes_per_node_per_s": r.steady_bytes_per_node_per_s,
            "stopped": r.stopped, "membership_gap": r.membership_gap,
            "live_owners_hidden": r.live_owners_hidden,
        });
        out!("{v}");
        return Ok(());
    }
    out!(
        "scale: {n} nodes, seed {}, joins over {:.0} s, {:.0} s of virtual time",
        o.seed,
        o.join_over.as_secs_f64(),
        o.duration.as_secs_f64()
    );
    out!(
        "  wall {:.1} s, peak resident {:.0} MiB ({:.1} KiB per node)",
        r.wall.as_secs_f64(),
        mib(r.peak_rss),
        mib(r.peak_rss) * 1024.0 / n as f64
    );
    let at = |d: Option<Duration>| {
        d.map_or("not within the run".to_string(), |d| format!("at {:.1} s", d.as_secs_f64()))
    };
    out!(
        "  membership converged {}, every endpoint everywhere {}",
        at(r.membership_converged),
        at(r.tables_converged)
    );
    if let Some(w) = r.formed_wall {
        out!("  until both had converged: {:.1} s of wall time", w.as_secs_f64());
    }
    if let Some(per) = r.steady_wall_per_virtual_s {
        out!(
            "  the last 10 s: {:.3} s of wall time per virtual second ({:.1} s per virtual minute)",
            per,
            per * 60.0
        );
    }
    out!(
        "  work: {} SWIM datagrams, {} gossip datagrams, {} stream frames, {} timers",
        r.work.swim_datagrams,
        r.work.gossip_datagrams,
        r.work.stream_frames,
        r.work.timers
    );
    out!(
        "  steady traffic (last 10 s): {:.1} msgs/node/s, {:.0} bytes/node/s",
        r.steady_msgs_per_node_per_s,
        r.steady_bytes_per_node_per_s
    );
    out!("  live owners whose entries a node hid: {}", r.live_owners_hidden);
    if let Some(gap) = &r.membership_gap {
        out!("  membership at the end: {gap}");
    }
    if let Some(why) = &r.stopped {
        out!(
            "  stopped early at {:.0} s of virtual time with {} of {n} nodes joined: {why}",
            r.virtual_time.as_secs_f64(),
            r.joined
        );
    }
    Ok(())
}

fn run_convergence(
    common: &Common,
    check_determinism: bool,
    plot_bandwidth: Option<PathBuf>,
) -> Result<(), Failure> {
    let net = common.net()?;
    check_outputs(&[("--plot-bandwidth", &plot_bandwidth)])?;
    let window = Duration::from_secs(10);
    let (mut rows, mut curves, mut bandwidth) = (Vec::new(), Vec::new(), Vec::new());
    for &n in &common.nodes {
        let mut samples: Vec<ConvergenceSample> = Vec::new();
        for s in common.seeds() {
            let x = convergence::<Agent>(n, s, net.clone(), window)?;
            if check_determinism {
                let again = convergence::<Agent>(n, s, net.clone(), window)?;
                if again.trace != x.trace || again != x {
                    return Err(Failure::Run(format!(
                        "seed {s}: two runs of the same seed differ (trace {:016x} vs {:016x})",
                        x.trace, again.trace
                    )));
                }
            }
            rows.push(vec![
                n.to_string(),
                s.to_string(),
                format!("{:.1}", ms(x.last)),
                format!("{:.2}", x.msgs_per_node_per_s),
                format!("{:.0}", x.bytes_per_node_per_s),
                format!("{:016x}", x.trace),
            ]);
            samples.push(x);
        }
        let last = Percentiles::of(samples.iter().map(|x| x.last).collect());
        let per_node = Percentiles::of(samples.iter().flat_map(|x| x.arrivals.iter().copied()).collect());
        let mean =
            |f: fn(&ConvergenceSample) -> f64| samples.iter().map(f).sum::<f64>() / samples.len() as f64;
        let msgs = mean(|x| x.msgs_per_node_per_s);
        let bytes = mean(|x| x.bytes_per_node_per_s);
        let stream = mean(|x| x.stream_bytes_per_node_per_s);
        curves.push(Series {
            label: format!("{n} nodes"),
            points: cdf(samples.iter().flat_map(|x| x.arrivals.iter().map(|d| ms(*d))).collect()),
        });
        bandwidth.push((n as f64, bytes));
        if common.json {
            let mut m = common.json(n, last);
            m.insert("node_p50_ms".into(), per_node.p50.into());
            m.insert("node_p99_ms".into(), per_node.p99.into());
            m.insert("msgs_per_node_per_s".into(), msgs.into());
            m.insert("bytes_per_node_per_s".into(), bytes.into());
            m.insert("stream_bytes_per_node_per_s".into(), stream.into());
            if check_determinism {
                m.insert("deterministic".into(), true.into());
            }
            out!("{}", serde_json::Value::Object(m));
        } else {
            out!("convergence: {}", common.describe(n));
            out!("  until the last node has it: {last}");
            out!("  per node:                   p50 {:.0} ms  p99 {:.0} ms", per_node.p50, per_node.p99);
            out!(
                "  traffic: {msgs:.1} msgs/node/s, {bytes:.0} bytes/node/s, of which {stream:.0} in streams (10 s after the write)"
            );
            if check_determinism {
                out!("  every seed ran twice with identical traces");
            }
        }
    }
    if let Some(path) = &common.csv {
        csv(
            path,
            &["nodes", "seed", "last_ms", "msgs_per_node_per_s", "bytes_per_node_per_s", "trace"],
            &rows,
        )?;
    }
    let loss = if common.loss > 0.0 { format!(", {:.0}% loss", common.loss * 100.0) } else { String::new() };
    if let Some(path) = &common.plot {
        let title = format!("One entry reaching every node (weft, {} seeds{loss})", common.seeds);
        let chart = Chart {
            title: &title,
            x_label: "virtual ms after the write",
            y_label: "fraction of nodes holding the entry",
            log_x: false,
            series: &curves,
        };
        svg(path, &chart)?;
    }
    if let Some(path) = &plot_bandwidth {
        let title = format!("Traffic per node in the 10 s after one write{loss}");
        let series = [Series { label: "bytes per node per second".into(), points: bandwidth }];
        let chart =
            Chart { title: &title, x_label: "nodes", y_label: "bytes/node/s", log_x: true, series: &series };
        svg(path, &chart)?;
    }
    Ok(())
}

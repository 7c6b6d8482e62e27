//! `weft-sim`: scenarios on simulated weft clusters (virtual time, a modelled network).

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use weft_sim::NetModel;
use weft_sim::matrix::{PERTURBATIONS, cell, needs_joiner};
use weft_sim::scenarios::{ConvergenceSample, convergence, failure_detection, partition, percentile};

#[derive(Parser)]
#[command(name = "weft-sim", about = "Deterministic simulations of weft clusters", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// One entry written on a random node, over many seeds: when every node has it, and what
    /// the cluster sends meanwhile.
    Convergence {
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
        /// Run every seed twice and fail unless both runs are identical.
        #[arg(long)]
        check_determinism: bool,
    },
    /// One node crashes: time until every live node declares it down (over seeds), and false
    /// failures of live nodes.
    FailureDetection {
        #[arg(long, default_value_t = 25)]
        nodes: usize,
        #[arg(long, default_value_t = 0.0)]
        loss: f64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
        seeds: u64,
        #[arg(long)]
        json: bool,
    },
    /// Split the cluster in two halves, write on both sides, heal: time to reconverge and
    /// bytes spent on the repair.
    Partition {
        #[arg(long, default_value_t = 25)]
        nodes: usize,
        #[arg(long, default_value_t = 0.0)]
        loss: f64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
        seeds: u64,
        /// How long the split lasts, seconds.
        #[arg(long, default_value_t = 30)]
        split_s: u64,
        /// Entries written on each side.
        #[arg(long, default_value_t = 100)]
        writes: usize,
        #[arg(long)]
        json: bool,
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

/// The arguments every scenario shares, checked: one line naming the problem.
fn check(nodes: usize, loss: f64) -> Result<NetModel, String> {
    if nodes < 2 {
        return Err("--nodes must be at least 2".into());
    }
    if !(0.0..1.0).contains(&loss) {
        return Err(format!("--loss must be in [0, 1), got {loss}"));
    }
    Ok(NetModel { loss, ..NetModel::default() })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::NetworkdbMatrix { sizes, samples, seed } => {
            if let Some(bad) = sizes.iter().find(|&&n| n < 2) {
                eprintln!("weft-sim: --sizes: a cluster needs at least 2 nodes, got {bad}");
                return ExitCode::from(2);
            }
            println!("| test | perturbation | nodes | n | p50 ms | p90 ms | p99 ms | max ms | n >2 s |");
            println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
            for p in PERTURBATIONS {
                for &n in sizes.iter().filter(|&&n| n >= 3 || !needs_joiner(p)) {
                    let mut times = Vec::new();
                    for s in seed..seed + samples {
                        match cell(p, n, s) {
                            Ok(d) => times.push(d),
                            Err(e) => {
                                eprintln!("weft-sim: {e}");
                                return ExitCode::FAILURE;
                            }
                        }
                    }
                    times.sort();
                    let slow = times.iter().filter(|d| **d > Duration::from_secs(2)).count();
                    println!(
                        "| quiet | {p} | {n} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {slow} |",
                        times.len(),
                        ms(percentile(&times, 50.0)),
                        ms(percentile(&times, 90.0)),
                        ms(percentile(&times, 99.0)),
                        ms(*times.last().expect("at least one sample")),
                    );
                }
            }
            ExitCode::SUCCESS
        }
        Cmd::Partition { nodes, loss, seed, seeds, split_s, writes, json } => {
            let net = match check(nodes, loss) {
                Ok(n) => n,
                Err(e) => {
                    eprintln!("weft-sim: {e}");
                    return ExitCode::from(2);
                }
            };
            let mut times = Vec::new();
            let mut bytes = 0.0;
            for s in seed..seed + seeds {
                match partition(nodes, s, net.clone(), Duration::from_secs(split_s), writes) {
                    Ok(x) => {
                        times.push(x.reconverged);
                        bytes += x.repair_bytes_per_node;
                    }
                    Err(e) => {
                        eprintln!("weft-sim: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            times.sort();
            let bytes = bytes / seeds as f64;
            let (p50, p90, p99, max) = (
                ms(percentile(&times, 50.0)),
                ms(percentile(&times, 90.0)),
                ms(percentile(&times, 99.0)),
                ms(*times.last().expect("at least one seed")),
            );
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "nodes": nodes, "seed": seed, "seeds": seeds, "loss": loss, "split_s": split_s,
                        "writes_per_side": writes, "p50_ms": p50, "p90_ms": p90, "p99_ms": p99,
                        "max_ms": max, "repair_bytes_per_node": bytes,
                    })
                );
            } else {
                println!(
                    "partition: {nodes} nodes split in two for {split_s} s, {writes} writes per side, loss {loss}, seeds {seed}..{}",
                    seed + seeds
                );
                println!(
                    "  from the heal until every node has both sides' writes: p50 {p50:.0} ms  p90 {p90:.0} ms  p99 {p99:.0} ms  max {max:.0} ms"
                );
                println!("  bytes sent per node meanwhile: {bytes:.0}");
            }
            ExitCode::SUCCESS
        }
        Cmd::FailureDetection { nodes, loss, seed, seeds, json } => {
            let net = match check(nodes, loss) {
                Ok(n) => n,
                Err(e) => {
                    eprintln!("weft-sim: {e}");
                    return ExitCode::from(2);
                }
            };
            let mut times = Vec::new();
            let mut false_failures = 0;
            for s in seed..seed + seeds {
                match failure_detection(nodes, s, net.clone()) {
                    Ok(x) => {
                        times.push(x.detected);
                        false_failures += x.false_failures;
                    }
                    Err(e) => {
                        eprintln!("weft-sim: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            times.sort();
            let (p50, p90, p99, max) = (
                ms(percentile(&times, 50.0)),
                ms(percentile(&times, 90.0)),
                ms(percentile(&times, 99.0)),
                ms(*times.last().expect("at least one seed")),
            );
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "nodes": nodes, "seed": seed, "seeds": seeds, "loss": loss,
                        "p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "max_ms": max,
                        "false_failures": false_failures,
                    })
                );
            } else {
                println!("failure-detection: {nodes} nodes, loss {loss}, seeds {seed}..{}", seed + seeds);
                println!(
                    "  until every live node declares the crashed one down: p50 {p50:.0} ms  p90 {p90:.0} ms  p99 {p99:.0} ms  max {max:.0} ms"
                );
                println!("  live nodes wrongly declared down: {false_failures} (over all seeds)");
            }
            ExitCode::SUCCESS
        }
        Cmd::Convergence { nodes, loss, seed, seeds, json, check_determinism } => {
            let net = match check(nodes, loss) {
                Ok(n) => n,
                Err(e) => {
                    eprintln!("weft-sim: {e}");
                    return ExitCode::from(2);
                }
            };
            let mut samples: Vec<ConvergenceSample> = Vec::new();
            for s in seed..seed + seeds {
                match convergence(nodes, s, net.clone(), Duration::from_secs(10)) {
                    Ok(x) => {
                        if check_determinism
                            && convergence(nodes, s, net.clone(), Duration::from_secs(10)).as_ref() != Ok(&x)
                        {
                            eprintln!("weft-sim: seed {s}: two runs of the same seed differ");
                            return ExitCode::FAILURE;
                        }
                        samples.push(x);
                    }
                    Err(e) => {
                        eprintln!("weft-sim: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            let mut all: Vec<Duration> = samples.iter().flat_map(|x| x.arrivals.iter().copied()).collect();
            all.sort();
            let mut lasts: Vec<Duration> = samples.iter().map(|x| x.last).collect();
            lasts.sort();
            let k = samples.len() as f64;
            let msgs = samples.iter().map(|x| x.msgs_per_node_per_s).sum::<f64>() / k;
            let bytes = samples.iter().map(|x| x.bytes_per_node_per_s).sum::<f64>() / k;
            let stream = samples.iter().map(|x| x.stream_bytes_per_node_per_s).sum::<f64>() / k;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "nodes": nodes, "seed": seed, "seeds": seeds, "loss": loss,
                        "p50_ms": ms(percentile(&lasts, 50.0)), "p90_ms": ms(percentile(&lasts, 90.0)),
                        "p99_ms": ms(percentile(&lasts, 99.0)), "max_ms": ms(*lasts.last().unwrap()),
                        "node_p50_ms": ms(percentile(&all, 50.0)), "node_p99_ms": ms(percentile(&all, 99.0)),
                        "msgs_per_node_per_s": msgs, "bytes_per_node_per_s": bytes,
                        "stream_bytes_per_node_per_s": stream,
                    })
                );
            } else {
                println!("convergence: {nodes} nodes, loss {loss}, seeds {seed}..{}", seed + seeds);
                println!(
                    "  until the last node has it: p50 {:.0} ms  p90 {:.0} ms  p99 {:.0} ms  max {:.0} ms",
                    ms(percentile(&lasts, 50.0)),
                    ms(percentile(&lasts, 90.0)),
                    ms(percentile(&lasts, 99.0)),
                    ms(*lasts.last().unwrap())
                );
                println!(
                    "  per node:                   p50 {:.0} ms  p99 {:.0} ms",
                    ms(percentile(&all, 50.0)),
                    ms(percentile(&all, 99.0))
                );
                println!(
                    "  traffic: {msgs:.1} msgs/node/s, {bytes:.0} bytes/node/s, of which {stream:.0} in streams (10 s after the write)"
                );
            }
            ExitCode::SUCCESS
        }
    }
}

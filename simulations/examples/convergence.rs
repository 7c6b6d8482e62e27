//! Convergence figures of the gossip core on the in-memory cluster (virtual time):
//! one entry written on a random node of a settled cluster, and a burst of entries from one
//! node, each over many seeds. `cargo run --release -p weft-sim --example convergence -- [SEEDS]`

use std::time::Duration;

use weft_node::Agent;
use weft_sim::NetModel;
use weft_sim::scenarios::{Percentiles, burst_convergence};

fn report(label: &str, samples: Vec<Duration>, failed: usize) {
    let runs = samples.len();
    println!("{label:<34} runs {runs:>4}  {}  not converged {failed}", Percentiles::of(samples));
}

fn run(label: &str, nodes: usize, keys: usize, seeds: u64, net: &NetModel) {
    let mut samples = Vec::new();
    let mut failed = 0;
    for seed in 0..seeds {
        match burst_convergence::<Agent>(nodes, keys, seed, net.clone(), Duration::from_secs(60)) {
            Ok(Some(d)) => samples.push(d),
            Err(e) => {
                eprintln!("{label}: {e}");
                failed += 1;
            }
            Ok(None) => {
                eprintln!("{label}: seed {seed} did not converge within 60 s");
                failed += 1;
            }
        }
    }
    report(label, samples, failed);
}

fn main() {
    let seeds: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(200);
    let lan = NetModel::default();
    for n in [5, 10, 25] {
        run(&format!("1 entry, {n} nodes"), n, 1, seeds, &lan);
    }
    let lossy = NetModel { loss: 0.05, ..NetModel::default() };
    run("1 entry, 25 nodes, 5% loss", 25, 1, seeds, &lossy);
    for n in [5, 10, 20] {
        run(&format!("1000-entry burst, {n} nodes"), n, 1000, (seeds / 10).max(5), &lan);
    }
}

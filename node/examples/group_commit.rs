//! Group commit of the agent's store, measured: W writer threads each hand the persister one
//! batch and wait until it is durable, as commands waiting on their write do. Reports batches
//! per second and batches per commit (one fsync each) for 1 and for W writers, against the raw
//! fdatasync latency of the same disk measured in the same run.
//!
//! usage: cargo run --release -p weft-node --example group_commit -- [DIR] [WRITERS] [SECONDS]
//! DIR must be on a real disk (not tmpfs); default `target/group-commit`.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use weft_node::persist::PersistBatch;
use weft_node::store::{Durable, Persister, Store};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median latency of a 4 KiB write plus fdatasync, in microseconds.
fn raw_fdatasync_us(dir: &std::path::Path) -> f64 {
    use std::io::Write;
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path).unwrap();
    let block = vec![7u8; 4096];
    let samples = (0..200)
        .map(|_| {
            let t0 = Instant::now();
            f.write_all(&block).unwrap();
            f.sync_data().unwrap();
            t0.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    let _ = std::fs::remove_file(&path);
    median(samples)
}

struct Run {
    batches_per_s: f64,
    batches_per_commit: f64,
    commit_us: f64,
}

fn run(dir: &std::path::Path, writers: usize, secs: f64) -> Run {
    let _ = std::fs::remove_dir_all(dir);
    let (store, _) = Store::open(dir, Some("bench"), 1, 1).unwrap();
    let durable = Arc::new((Mutex::new(0u64), Condvar::new()));
    let d = durable.clone();
    let persister = Arc::new(Persister::spawn(store, move |r| {
        if let Durable::Upto(seq) = r {
            let (m, c) = &*d;
            *m.lock().unwrap() = seq;
            c.notify_all();
        }
    }));
    // Sequence numbers are handed out in submission order, as the agent does.
    let next = Arc::new(Mutex::new(0u64));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let threads: Vec<_> = (0..writers)
        .map(|w| {
            let (persister, durable, next) = (persister.clone(), durable.clone(), next.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                while Instant::now() < deadline {
                    let seq = {
                        let mut n = next.lock().unwrap();
                        *n += 1;
                        let ops = vec![(format!("bench/{w}/{i}"), Some(vec![1u8; 64]))];
                        persister.submit(PersistBatch { seq: *n, ops });
                        *n
                    };
                    let (m, c) = &*durable;
                    let mut done = m.lock().unwrap();
                    while *done < seq {
                        done = c.wait(done).unwrap();
                    }
                    i += 1;
                }
            })
        })
        .collect();
    let t0 = Instant::now();
    for t in threads {
        t.join().unwrap();
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let batches = persister.stats.batches.load(Ordering::Relaxed) as f64;
    let commits = persister.stats.commits.load(Ordering::Relaxed) as f64;
    let commit_us = persister.stats.commit_us.load(Ordering::Relaxed) as f64 / commits.max(1.0);
    Run { batches_per_s: batches / elapsed, batches_per_commit: batches / commits.max(1.0), commit_us }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(args.get(1).cloned().unwrap_or_else(|| "target/group-commit".into()));
    let writers: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(16);
    let secs: f64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(5.0);
    std::fs::create_dir_all(&dir).unwrap();
    let raw = raw_fdatasync_us(&dir);
    println!(
        "raw fdatasync (4 KiB write + fdatasync), median of 200: {raw:.0} us = {:.0} syncs/s",
        1e6 / raw
    );
    for w in [1, writers] {
        let r = run(&dir.join(format!("w{w}")), w, secs);
        println!(
            "{w:>2} writers: {:>7.0} batches/s, {:>5.2} batches per commit, {:>6.0} us per commit, {:.2}x the raw sync rate",
            r.batches_per_s,
            r.batches_per_commit,
            r.commit_us,
            r.batches_per_s * raw / 1e6
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

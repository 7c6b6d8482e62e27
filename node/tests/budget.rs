//! The shell's memory bound, measured: peers claiming huge stream frames make the agent hold at
//! most its stream budget, whatever they claim. A counting global allocator (its own test
//! binary, so nothing else allocates in it) measures the bytes.

use std::io::Write;
use std::time::{Duration, Instant};

use cap::Cap;
use weft_gossip::{Config as GossipConfig, wire};
use weft_node::config::AgentConfig;
use weft_node::shell::{STREAM_BUDGET, Shell};

#[global_allocator]
static ALLOC: Cap<std::alloc::System> = Cap::new(std::alloc::System, usize::MAX);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_claiming_huge_frames_hold_no_more_than_the_budget() {
    let dir = std::env::temp_dir().join(format!("weft-budget-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = AgentConfig {
        name: Some("budget".into()),
        bind: "127.0.0.1:0".parse().unwrap(),
        advertise: None,
        join: Vec::new(),
        data_dir: dir.clone(),
        data_addr: None,
        restart_grace: Duration::from_secs(60),
        leave_on_stop: false,
        alloc: Default::default(),
        dataplane: Some(false),
        run_dir: dir.join("run"),
    };
    let gossip = GossipConfig::lan(8);
    let frame = gossip.max_stream_frame;
    let shell = Shell::start(&cfg, gossip).await.unwrap();
    let base = ALLOC.allocated();
    // 200 peers each claim a whole frame (3 GiB between them at 16 MiB) and send 1 MiB of it.
    let streams = 200;
    let addr = shell.addr;
    let conns = tokio::task::spawn_blocking(move || {
        (0..streams)
            .map(|_| {
                let mut s = std::net::TcpStream::connect(addr).unwrap();
                s.write_all(&wire::stream_prefix(frame)).unwrap();
                let _ = s.write_all(&vec![0xab; 1 << 20]);
                s
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let stats = shell.stats();
    let admitted = STREAM_BUDGET / frame;
    let t0 = Instant::now();
    while stats.stream_budget_rejects.load(std::sync::atomic::Ordering::Relaxed) < (streams - admitted) as u64
    {
        assert!(t0.elapsed() < Duration::from_secs(60), "the streams beyond the budget were not refused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let held = stats.stream_bytes_held.load(std::sync::atomic::Ordering::Relaxed) as usize;
    assert!(held <= STREAM_BUDGET, "{held} bytes held, budget {STREAM_BUDGET}");
    let peak = ALLOC.max_allocated().saturating_sub(base);
    // The budget, plus the sockets' and tasks' own small change.
    let slack = 32 << 20;
    assert!(
        peak <= STREAM_BUDGET + slack,
        "peak {} MiB above the baseline, budget {} MiB",
        peak >> 20,
        STREAM_BUDGET >> 20
    );
    drop(conns);
    let _ = std::fs::remove_dir_all(&dir);
}

//! The agent's event loop as real processes see it: a hung disk holds back only what depends on
//! it, and reads never wait for writes. The disk is stalled with the agents' test hook (a
//! `stall-persist` file in the data dir holds store commits back), so every ordering asserted
//! here holds by construction, not by timing.

use std::time::Duration;

use weft_tests::{Agent, TempDir, addr, wait_until};

const LONG: Duration = Duration::from_secs(30);

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn ok(out: &std::process::Output) {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn alive_count(a: &Agent) -> usize {
    a.member_states().iter().filter(|(_, s)| s == "alive").count()
}

#[test]
fn a_write_on_a_hung_disk_times_out_in_one_line_completes_later_and_gossip_goes_on() {
    let _serial = serial();
    let root = TempDir::new("stall");
    let seeds = [addr(17, 1)];
    let mut agents: Vec<Agent> =
        (1..=3).map(|i| Agent::start(&root.0, &format!("n{i}"), addr(17, i), &seeds)).collect();
    wait_until("three agents see three alive", LONG, || agents.iter().all(|a| alive_count(a) == 3));
    ok(&agents[0].cli(&["network", "create", "net1"]));
    wait_until("n2 attaches net1", LONG, || agents[1].cli(&["network", "attach", "net1"]).status.success());

    agents[1].stall_disk();
    // A new network is an attachment to make durable: its answer waits for the disk, and says
    // so when it gives up.
    // (Its own subnet and a driver without VNIs: what waits is the attachment alone, not a
    // share of the cluster rings.)
    let out = agents[1].cli(&["network", "create", "late", "--driver", "null", "--subnet", "10.77.0.0/24"]);
    assert!(!out.status.success(), "answered although its attachment is not durable");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("network create late")
            && err.contains("no reply after")
            && err.contains("data dir")
            && err.contains("not cancelled"),
        "{err}"
    );
    // Meanwhile SWIM did not wait (everyone still sees n2 alive), n1's news reached n2, and a
    // write on n2 that rests on no pending batch was answered. Its gossip waits: table traffic
    // may carry the attachment that is not durable yet.
    for a in &agents {
        assert_eq!(a.state_of("n2").as_deref(), Some("alive"), "on {}", a.name);
    }
    ok(&agents[0].cli(&["table", "put", "net1", "endpoints", "from-n1", "x"]));
    ok(&agents[1].cli(&["table", "put", "net1", "endpoints", "from-n2", "y"]));
    wait_until("n1's write reaches n2 while n2's disk hangs", LONG, || {
        agents[1].live_keys("net1", "endpoints") == ["from-n1", "from-n2"]
    });
    assert_eq!(
        agents[0].live_keys("net1", "endpoints"),
        ["from-n1"],
        "n2's gossip left before its attachment was durable"
    );
    assert!(agents[1].metric("weft_persist_pending").is_some_and(|p| p >= 1.0), "the attachment still waits");
    assert_eq!(agents[1].state_of("n1").as_deref(), Some("alive"));

    // The disk comes back: the write that timed out completes by itself, durably.
    agents[1].resume_disk();
    wait_until("n2's store catches up", LONG, || agents[1].metric("weft_persist_pending") == Some(0.0));
    wait_until("n2's held gossip goes out", LONG, || {
        agents[0].live_keys("net1", "endpoints") == ["from-n1", "from-n2"]
    });
    wait_until("everyone knows network late", LONG, || {
        agents.iter().all(|a| a.cli(&["network", "inspect", "late"]).status.success())
    });
    let before = agents[1].node_state();
    agents[1].restart();
    let after = agents[1].node_state();
    assert_eq!(after["networks"], before["networks"], "the attachment survived a kill -9");
    assert_eq!(after["networks"].as_array().map(Vec::len), Some(3), "cluster, net1, late: {after}");
}

#[test]
fn members_and_dump_answer_while_a_big_load_waits() {
    let _serial = serial();
    let root = TempDir::new("bigload");
    let a = Agent::start(&root.0, "solo", addr(18, 1), &[]);
    ok(&a.cli(&["network", "create", "big"]));
    let n = 60_000;
    let body: String = (0..n).map(|i| format!("key-{i:06} value-{i}\n")).collect();
    let file = root.0.join("load.txt");
    std::fs::write(&file, body).unwrap();
    // The load runs the clock past its durable lease, so its answer needs the disk, which
    // hangs: the load cannot finish before the disk comes back.
    a.stall_disk();
    let host = a.host();
    let loader = std::thread::spawn(move || {
        std::process::Command::new(weft_tests::weft_bin())
            .args(["-H", &host, "table", "load", "big", "bulk"])
            .arg(&file)
            .output()
            .unwrap()
    });
    let applied = |a: &Agent| {
        a.http_get("/metrics")
            .lines()
            .filter(|l| l.starts_with("weft_entries{") && l.contains("table=\"bulk\""))
            .find_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    wait_until("the load is being applied", LONG, || applied(&a) > 0);
    // Reads issued after the load started answer before it does.
    ok(&a.cli(&["members"]));
    ok(&a.cli(&["dump", "--network", "cluster", "--table", "weft:nodes"]));
    assert!(!loader.is_finished(), "the load answered before its lease was durable");
    a.resume_disk();
    let out = loader.join().unwrap();
    ok(&out);
}

//! Real agents as processes on 127.0.x.y, driven only through the `weft` CLI.

use std::io::Write;
use std::net::{TcpStream, UdpSocket};
use std::time::Duration;

use weft_tests::{Agent, TempDir, addr, wait_until, weft};

const LONG: Duration = Duration::from_secs(30);

/// One cluster at a time: five agents per test keep the machine's load bounded (2 cores), so
/// failure detection is not disturbed by the other tests' processes.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn alive_count(a: &Agent) -> usize {
    a.member_states().iter().filter(|(_, s)| s == "alive").count()
}

/// Five agents joined through a two-address seed list, with network `net1` on all of them.
fn cluster(root: &TempDir, net: u8) -> Vec<Agent> {
    let seeds = [addr(net, 1), addr(net, 2)];
    let agents: Vec<Agent> =
        (1..=5).map(|i| Agent::start(&root.0, &format!("n{i}"), addr(net, i), &seeds)).collect();
    wait_until("all five agents see five alive members", LONG, || agents.iter().all(|a| alive_count(a) == 5));
    let out = agents[0].cli(&["network", "create", "net1", "--subnet", "10.9.0.0/24"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for a in &agents[1..] {
        wait_until("the network definition arrives", LONG, || {
            a.cli(&["network", "attach", "net1"]).status.success()
        });
    }
    agents
}

#[test]
fn five_agents_join_through_two_seeds_and_converge() {
    let _serial = serial();
    let root = TempDir::new("converge");
    let agents = cluster(&root, 11);
    for (i, a) in agents.iter().enumerate() {
        let out =
            a.cli(&["table", "put", "net1", "endpoints", &format!("ep{i}"), &format!("10.9.0.{}", i + 2)]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    wait_until("every agent holds every entry", LONG, || {
        agents.iter().all(|a| a.live_keys("net1", "endpoints").len() == 5)
    });
    // The same entries, with their owners, everywhere.
    let reference = agents[0].entries("net1", "endpoints");
    for a in &agents[1..] {
        assert_eq!(
            a.entries("net1", "endpoints").iter().map(|e| (&e.0, &e.1)).collect::<Vec<_>>(),
            reference.iter().map(|e| (&e.0, &e.1)).collect::<Vec<_>>()
        );
    }
    let out = agents[3].cli(&["table", "get", "net1", "endpoints", "ep1"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "10.9.0.3");
    // members --json has the documented keys.
    let m = agents[2].json(&["members", "--json"]);
    let first = &m.as_array().unwrap()[0];
    for k in ["name", "addr", "state", "incarnation", "networks"] {
        assert!(first.get(k).is_some(), "members --json lacks {k}: {first}");
    }
    // network ls knows who is attached.
    let ls = agents[4].json(&["network", "ls", "--json"]);
    assert_eq!(ls[0]["name"], "net1");
    assert_eq!(ls[0]["peers"].as_array().unwrap().len(), 4);
}

#[test]
fn kill9_hides_entries_and_a_restart_brings_them_back() {
    let _serial = serial();
    let root = TempDir::new("kill9");
    let mut agents = cluster(&root, 12);
    let out = agents[2].cli(&["table", "put", "net1", "endpoints", "ep-n3", "on-n3"]);
    assert!(out.status.success());
    wait_until("n3's entry reaches everyone", LONG, || {
        agents.iter().all(|a| a.live_keys("net1", "endpoints") == ["ep-n3"])
    });
    let before = agents[2].node_state();
    agents[2].kill9();
    wait_until("the others see n3 failed and its entry hidden", LONG, || {
        [0, 1, 3, 4].iter().all(|&i| {
            agents[i].state_of("n3").as_deref() == Some("failed")
                && agents[i].entries("net1", "endpoints").iter().any(|e| e.0 == "ep-n3" && e.2 == "hidden")
        })
    });
    agents[2].restart();
    wait_until("n3 is back, alive, with its entry visible", LONG, || {
        agents.iter().all(|a| {
            a.state_of("n3").as_deref() == Some("alive") && a.live_keys("net1", "endpoints") == ["ep-n3"]
        })
    });
    // The restart read its store back: the same identity, a clock that never goes back, the
    // same networks attached.
    let after = agents[2].node_state();
    assert_eq!((&after["name"], &after["instance"]), (&before["name"], &before["instance"]));
    assert!(after["ltime"].as_u64() >= before["ltime"].as_u64(), "{after} after {before}");
    assert_eq!(after["networks"], before["networks"], "re-attached from the store");
    assert_eq!(after["networks"].as_array().map(Vec::len), Some(2), "cluster and net1: {after}");
    // Same name, new generation, and it owns its entry again.
    let out = agents[2].cli(&["table", "rm", "net1", "endpoints", "ep-n3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_until("the delete reaches everyone", LONG, || {
        agents.iter().all(|a| a.live_keys("net1", "endpoints").is_empty())
    });
    let state = agents[2].node_state();
    assert_eq!(state["name"], "n3");
    assert!(state["generation"].as_u64() > before["generation"].as_u64(), "{state} after {before}");
    assert_eq!(state["instance"], before["instance"], "the same data dir is the same instance");
}

#[test]
fn sigterm_is_a_restart_and_weft_leave_is_a_leave() {
    let _serial = serial();
    let root = TempDir::new("sigterm");
    let mut agents = cluster(&root, 13);
    let out = agents[4].cli(&["table", "put", "net1", "endpoints", "ep-n5", "x"]);
    assert!(out.status.success());
    wait_until("n5's entry reaches everyone", LONG, || {
        agents.iter().all(|a| a.live_keys("net1", "endpoints").len() == 1)
    });
    // SIGTERM is a restart (an upgrade, `systemctl restart`): the others keep n5's entry live.
    assert_eq!(agents[4].terminate(), Some(0), "exit status; log:\n{}", agents[4].log());
    wait_until("the others see n5 restarting", LONG, || {
        agents[..4].iter().all(|a| a.state_of("n5").as_deref() == Some("restarting"))
    });
    for a in &agents[..4] {
        assert_eq!(a.live_keys("net1", "endpoints"), ["ep-n5"], "kept live while n5 restarts");
    }
    agents[4].start_again();
    wait_until("n5 is alive again everywhere", LONG, || {
        agents.iter().all(|a| a.state_of("n5").as_deref() == Some("alive"))
    });
    for a in &agents[..4] {
        assert_eq!(a.live_keys("net1", "endpoints"), ["ep-n5"], "never dropped across the restart");
    }
    // `weft leave` is the clean leave: the agent exits 0 and the others delete its entry.
    let (out, code) = agents[4].leave();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(code, Some(0), "exit status; log:\n{}", agents[4].log());
    wait_until("the others see n5 left and its entry deleted", LONG, || {
        agents[..4].iter().all(|a| {
            a.state_of("n5").as_deref() == Some("left") && a.live_keys("net1", "endpoints").is_empty()
        })
    });
    // A log written to a file carries no terminal colour codes.
    assert!(!agents[4].log().contains('\u{1b}'), "ANSI escapes in a log file:\n{}", agents[4].log());
}

#[test]
fn a_reinstalled_host_rejoins_under_its_name_and_its_old_entries_go() {
    let _serial = serial();
    let root = TempDir::new("reimage");
    let mut agents = cluster(&root, 16);
    let out = agents[2].cli(&["table", "put", "net1", "endpoints", "old-n3", "from-the-old-disk"]);
    assert!(out.status.success());
    wait_until("n3's entry reaches everyone", LONG, || {
        agents.iter().all(|a| a.live_keys("net1", "endpoints") == ["old-n3"])
    });
    let old = agents[2].node_state();
    // The host is reinstalled: its agent stops, its data dir is lost, it starts under its name.
    assert_eq!(agents[2].terminate(), Some(0));
    agents[2].wipe_data_dir();
    agents[2].start_again();
    let new = agents[2].node_state();
    assert_ne!(new["instance"], old["instance"], "a lost data dir is a new instance");
    wait_until("n3 is alive everywhere", LONG, || {
        agents.iter().all(|a| a.state_of("n3").as_deref() == Some("alive"))
    });
    // The new life attaches again and writes; the old life's entry goes everywhere.
    wait_until("n3 attaches net1 again", LONG, || {
        agents[2].cli(&["network", "attach", "net1"]).status.success()
    });
    let out = agents[2].cli(&["table", "put", "net1", "endpoints", "new-n3", "fresh"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_until("everyone holds the new entry and not the old one", LONG, || {
        agents.iter().all(|a| a.live_keys("net1", "endpoints") == ["new-n3"])
    });
    let m = agents[0].json(&["members", "--json"]);
    let n3 = m.as_array().unwrap().iter().find(|x| x["name"] == "n3").unwrap().clone();
    assert_eq!(n3["instance"], new["instance"], "{n3}");
}

#[test]
fn garbage_on_the_gossip_port_does_not_disturb_the_cluster() {
    let _serial = serial();
    let root = TempDir::new("garbage");
    let agents = cluster(&root, 14);
    let target = agents[1].addr;
    let udp = UdpSocket::bind("127.0.14.200:0").unwrap();
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for i in 0..500 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = (x % 1400) as usize + 4;
        let mut junk: Vec<u8> = (0..len).map(|j| (x >> (j % 56)) as u8).collect();
        if i % 3 == 0 {
            // A valid envelope in front of garbage.
            junk[..4].copy_from_slice(&[b'W', b'F', weft_gossip::wire::WIRE_VERSION, 2]);
        }
        let _ = udp.send_to(&junk, target);
    }
    for payload in [&b"GET / HTTP/1.1\r\n\r\n"[..], &[0xff; 64][..], &[0, 0, 0, 9, b'W', b'F', 1][..]] {
        if let Ok(mut s) = TcpStream::connect(target) {
            let _ = s.write_all(payload);
        }
    }
    for (i, a) in agents.iter().enumerate() {
        assert!(a.cli(&["table", "put", "net1", "endpoints", &format!("k{i}"), "v"]).status.success());
    }
    wait_until("entries still converge", LONG, || {
        agents.iter().all(|a| a.live_keys("net1", "endpoints").len() == 5)
    });
    assert_eq!(alive_count(&agents[1]), 5);
    let m = agents[1].http_get("/metrics");
    let get = |name: &str| -> u64 {
        m.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    assert!(get("weft_decode_errors_total") > 100, "decode errors counted:\n{m}");
    assert!(get("weft_stream_rejects_total") >= 1, "junk streams counted:\n{m}");
}

#[test]
fn bad_arguments_and_config_get_one_clear_line() {
    let _serial = serial();
    let root = TempDir::new("badargs");
    let check = |out: std::process::Output, needle: &str| {
        assert!(!out.status.success(), "should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
        assert!(lines.len() <= 3, "too chatty: {err}");
    };
    let dd = root.0.join("d");
    let dds = dd.to_str().unwrap();
    check(weft(&["agent", "--bind", "nowhere", "--data-dir", dds]), "bind");
    check(weft(&["agent", "--advertise", "0.0.0.0:1", "--data-dir", dds]), "advertise");
    let cfg = root.0.join("weft.toml");
    std::fs::write(&cfg, "name = \"x\"\nbindd = \"127.0.0.1\"\n").unwrap();
    check(weft(&["agent", "--config", cfg.to_str().unwrap(), "--data-dir", dds]), "bindd");
    std::fs::write(&cfg, "bind = 12\n").unwrap();
    check(weft(&["agent", "--config", cfg.to_str().unwrap(), "--data-dir", dds]), "bind");
    check(
        weft(&["-H", &format!("unix://{}/none.sock", root.0.display()), "members"]),
        "cannot reach a weft agent",
    );
    check(weft(&["network", "create"]), "NAME");
    check(weft(&["demo", "--nodes", "0"]), "nodes");
}

#[test]
fn a_second_node_with_a_taken_name_refuses_to_run() {
    let _serial = serial();
    let root = TempDir::new("dupname");
    let first = Agent::start(&root.0, "same", addr(15, 1), &[]);
    let dir = root.0.join("second");
    std::fs::create_dir_all(&dir).unwrap();
    let out = std::process::Command::new(weft_tests::weft_bin())
        .args([
            "agent",
            "--name",
            "same",
            "--bind",
            &addr(15, 2).to_string(),
            "--join",
            &addr(15, 1).to_string(),
        ])
        .arg("--data-dir")
        .arg(&dir)
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already in use"), "{err}");
    // The first holder keeps running.
    assert_eq!(alive_count(&first), 1, "log of the first:\n{}", first.log());
}

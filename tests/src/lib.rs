//! Helpers for the integration tests: real `weft` agents as processes on loopback addresses,
//! driven only through the `weft` CLI. Every agent is killed and its data dir removed when its
//! handle drops.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `weft` binary of this build profile, built on first use if `cargo test` did not.
pub fn weft_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable");
        // target/<profile>/deps/<test> -> target/<profile>/weft
        let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
        let bin = profile_dir.join("weft");
        if !bin.exists() {
            let release = profile_dir.file_name().is_some_and(|n| n == "release");
            let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
            cmd.args(["build", "-p", "weft-node", "--bin", "weft"]);
            if release {
                cmd.arg("--release");
            }
            let status = cmd.status().expect("run cargo build");
            assert!(status.success(), "building the weft binary failed");
        }
        bin
    })
    .clone()
}

/// A scratch directory removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("weft-it-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("temp dir");
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One agent process.
#[derive(Debug)]
pub struct Agent {
    pub name: String,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub seeds: Vec<SocketAddr>,
    /// The network namespace the agent runs in (`nsenter --net=`), if not this process's.
    pub netns: Option<PathBuf>,
    /// More `weft agent` arguments.
    pub extra: Vec<String>,
    child: Option<Child>,
}

impl Agent {
    /// Starts `weft agent` as `name` on `addr` with its own data dir under `root` (no data
    /// plane: loopback agents program none).
    pub fn start(root: &Path, name: &str, addr: SocketAddr, seeds: &[SocketAddr]) -> Agent {
        Self::launch(root, name, addr, seeds, None, &["--dataplane", "none"])
    }

    /// Starts an agent inside the network namespace `netns` (entered with `nsenter --net=`,
    /// which keeps the host's mount namespace) with more arguments.
    pub fn start_in(
        root: &Path,
        name: &str,
        addr: SocketAddr,
        seeds: &[SocketAddr],
        netns: &Path,
        extra: &[&str],
    ) -> Agent {
        Self::launch(root, name, addr, seeds, Some(netns), extra)
    }

    fn launch(
        root: &Path,
        name: &str,
        addr: SocketAddr,
        seeds: &[SocketAddr],
        netns: Option<&Path>,
        extra: &[&str],
    ) -> Agent {
        let data_dir = root.join(name);
        std::fs::create_dir_all(&data_dir).expect("data dir");
        let mut a = Agent {
            name: name.into(),
            addr,
            data_dir,
            seeds: seeds.to_vec(),
            netns: netns.map(Path::to_path_buf),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        a.spawn();
        a
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.join("agent.log"))
            .expect("log file");
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display())).arg(weft_bin());
                c
            }
            None => Command::new(weft_bin()),
        };
        cmd.args(["agent", "--name", &self.name, "--bind", &self.addr.to_string()])
            .args(&self.extra)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        // The agent refuses unknown `WEFT_*` variables and would take the caller's settings:
        // it gets none of the test run's (`WEFT_TEST_SEED`, `WEFT_HOST`...), only the hooks.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("WEFT_") {
                cmd.env_remove(k);
            }
        }
        // Lets a test stall the agent's disk (see `stall_disk`).
        cmd.env("WEFT_TEST_HOOKS", "1");
        if !self.seeds.is_empty() {
            let seeds: Vec<String> = self.seeds.iter().map(ToString::to_string).collect();
            cmd.args(["--join", &seeds.join(",")]);
        }
        self.child = Some(cmd.spawn().expect("spawn weft agent"));
        let sock = self.socket();
        let t0 = Instant::now();
        while !self.cli(&["members", "--json"]).status.success() {
            if t0.elapsed() > Duration::from_secs(10) {
                let log = self.log();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                panic!(
                    "{} does not serve its control socket after 10 s; its log ends:\n{}",
                    self.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = sock;
    }

    pub fn socket(&self) -> PathBuf {
        self.data_dir.join("weft.sock")
    }

    pub fn host(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Runs `weft -H <this agent> ARGS`.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(weft_bin()).arg("-H").arg(self.host()).args(args).output().expect("run weft")
    }

    /// Runs the CLI and parses its JSON output; panics with stderr if it failed.
    pub fn json(&self, args: &[&str]) -> Value {
        let out = self.cli(args);
        assert!(out.status.success(), "weft {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("JSON output")
    }

    /// `name -> state` of every member this agent lists.
    pub fn member_states(&self) -> Vec<(String, String)> {
        let out = self.cli(&["members", "--json"]);
        if !out.status.success() {
            return Vec::new();
        }
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|m| {
                        (
                            m["name"].as_str().unwrap_or("").to_string(),
                            m["state"].as_str().unwrap_or("").to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn state_of(&self, name: &str) -> Option<String> {
        self.member_states().into_iter().find(|(n, _)| n == name).map(|(_, s)| s)
    }

    /// Entries of `table` in `network` as (key, owner, state, value-base64).
    pub fn entries(&self, network: &str, table: &str) -> Vec<(String, String, String, String)> {
        let out = self.cli(&["dump", "--network", network, "--table", table, "--json"]);
        if !out.status.success() {
            return Vec::new();
        }
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let mut res = Vec::new();
        for n in v["networks"].as_array().into_iter().flatten() {
            for t in n["tables"].as_array().into_iter().flatten() {
                for e in t["entries"].as_array().into_iter().flatten() {
                    let s = |k: &str| e[k].as_str().unwrap_or("").to_string();
                    res.push((s("key"), s("owner"), s("state"), s("value")));
                }
            }
        }
        res
    }

    pub fn live_keys(&self, network: &str, table: &str) -> Vec<String> {
        self.entries(network, table).into_iter().filter(|e| e.2 == "live").map(|e| e.0).collect()
    }

    /// SIGKILL: the process dies without a word.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM (a stop for a restart); returns the exit status (None if it had to be killed
    /// after 10 s).
    pub fn terminate(&mut self) -> Option<i32> {
        let c = self.child.as_ref().expect("running");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::Signal::SIGTERM)
            .expect("signal");
        self.wait_exit()
    }

    /// `weft leave`: the agent leaves the cluster for good and exits; returns the CLI's output
    /// and the agent's exit status.
    pub fn leave(&mut self) -> (Output, Option<i32>) {
        let out = self.cli(&["leave"]);
        (out, self.wait_exit())
    }

    /// Waits up to 10 s for the process to exit by itself, then kills it.
    fn wait_exit(&mut self) -> Option<i32> {
        let mut c = self.child.take().expect("running");
        let t0 = Instant::now();
        loop {
            if let Some(status) = c.try_wait().expect("wait") {
                return status.code();
            }
            if t0.elapsed() > Duration::from_secs(10) {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts the agent again (it must not be running) with the same name, address and data
    /// dir.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "{} is still running", self.name);
        self.spawn();
    }

    /// Deletes everything in the data dir but the log: the host was reinstalled.
    pub fn wipe_data_dir(&self) {
        assert!(self.child.is_none(), "{} is still running", self.name);
        for e in std::fs::read_dir(&self.data_dir).expect("data dir").flatten() {
            if e.file_name() != "agent.log" {
                let p = e.path();
                let _ = std::fs::remove_dir_all(&p).or_else(|_| std::fs::remove_file(&p));
            }
        }
    }

    /// The running agent's identity and state as it reports it about itself: `name`,
    /// `instance`, `generation`, `networks` (attached network ids, `cluster` included) and
    /// `ltime` (its Lamport clock, from `/metrics`).
    pub fn node_state(&self) -> Value {
        let out = self.cli(&["members", "--json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).expect("members --json is JSON");
        let mut me = v
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["name"] == self.name.as_str())
            .cloned()
            .expect("the agent lists itself");
        let ltime = self
            .http_get("/metrics")
            .lines()
            .find_map(|l| l.strip_prefix("weft_lamport_time ")?.trim().parse::<u64>().ok())
            .expect("weft_lamport_time");
        me["ltime"] = ltime.into();
        me
    }

    /// Starts the agent again with the same name, address and data dir.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// A raw `GET` on the control socket (what `curl --unix-socket` does); returns the body.
    pub fn http_get(&self, path: &str) -> String {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(self.socket()).expect("control socket");
        write!(s, "GET {path} HTTP/1.0\r\nHost: weft\r\n\r\n").expect("request");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("answer");
        out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()
    }

    /// Holds the agent's store commits back (its disk hangs) until `resume_disk`.
    pub fn stall_disk(&self) {
        std::fs::write(self.data_dir.join("stall-persist"), b"").expect("stall file");
    }

    pub fn resume_disk(&self) {
        let _ = std::fs::remove_file(self.data_dir.join("stall-persist"));
    }

    /// One unlabelled metric's value from `/metrics`.
    pub fn metric(&self, name: &str) -> Option<f64> {
        let prefix = format!("{name} ");
        self.http_get("/metrics").lines().find_map(|l| l.strip_prefix(prefix.as_str())?.trim().parse().ok())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("agent.log")).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Polls `cond` every 50 ms until it holds; panics with `what` after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    loop {
        if cond() {
            return t0.elapsed();
        }
        assert!(t0.elapsed() < limit, "timed out after {limit:?} waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A loopback address of this test's own (`127.0.<net>.<host>:7946`).
pub fn addr(net: u8, host: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, net, host], 7946))
}

/// Runs `weft ARGS` with no agent around (for argument errors).
pub fn weft(args: &[&str]) -> Output {
    Command::new(weft_bin()).args(args).env_remove("WEFT_HOST").output().expect("run weft")
}

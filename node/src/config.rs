//! Agent configuration: a TOML file, `WEFT_*` environment variables and flags, in rising order
//! of precedence. Unknown keys and bad values are refused with one line naming the key.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde::Deserialize;

pub const DEFAULT_PORT: u16 = 7946;
pub const DEFAULT_DATA_DIR: &str = "/var/lib/weft";
pub const DEFAULT_RUN_DIR: &str = "/run/weft";
/// How long peers keep a restarting node's entries live (see `GossipConfig::restart_grace`).
pub const DEFAULT_RESTART_GRACE_S: u64 = 60;

/// One layer of settings; `None` means "not set here".
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layer {
    pub name: Option<String>,
    pub bind: Option<String>,
    pub advertise: Option<String>,
    pub join: Option<Vec<String>>,
    pub data_dir: Option<PathBuf>,
    pub data_addr: Option<String>,
    /// Seconds.
    pub restart_grace: Option<u64>,
    pub leave_on_stop: Option<bool>,
    /// Node names of the acceptors that seed the cluster rings (default: the seeds' names).
    pub acceptors: Option<Vec<String>>,
    /// `10.0.0.0/8/24`: the default global pool and the size of its subnets (fixed once seeded).
    pub default_pool: Option<String>,
    /// Seconds a released address or VNI stays out of use.
    pub reuse_after: Option<u64>,
    /// `linux` or `none`.
    pub dataplane: Option<String>,
    /// Where network sandboxes are bind-mounted (`<run_dir>/netns/`).
    pub run_dir: Option<PathBuf>,
}

impl Layer {
    fn over(self, lower: Layer) -> Layer {
        Layer {
            name: self.name.or(lower.name),
            bind: self.bind.or(lower.bind),
            advertise: self.advertise.or(lower.advertise),
            join: self.join.or(lower.join),
            data_dir: self.data_dir.or(lower.data_dir),
            data_addr: self.data_addr.or(lower.data_addr),
            restart_grace: self.restart_grace.or(lower.restart_grace),
            leave_on_stop: self.leave_on_stop.or(lower.leave_on_stop),
            acceptors: self.acceptors.or(lower.acceptors),
            default_pool: self.default_pool.or(lower.default_pool),
            reuse_after: self.reuse_after.or(lower.reuse_after),
            dataplane: self.dataplane.or(lower.dataplane),
            run_dir: self.run_dir.or(lower.run_dir),
        }
    }
}

/// The resolved configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    pub name: Option<String>,
    pub bind: SocketAddr,
    pub advertise: Option<SocketAddr>,
    /// Seeds as given: `host[:port]` or `ip[:port]`; resolved by the shell.
    pub join: Vec<String>,
    pub data_dir: PathBuf,
    /// The data-plane (VTEP) address published in this node's record; default: the advertised
    /// gossip IP.
    pub data_addr: Option<IpAddr>,
    /// How long this agent keeps a peer's entries live after the peer stopped for a restart
    /// (every agent should have the same).
    pub restart_grace: Duration,
    /// SIGTERM/SIGINT leave the cluster for good (peers delete this node's entries) instead of
    /// announcing a restart.
    pub leave_on_stop: bool,
    /// Allocation: acceptors, default pool, reuse delay.
    pub alloc: crate::alloc::AllocConfig,
    /// The data plane: `Some(true)` Linux (required), `Some(false)` none, `None` Linux if this
    /// process may program it, else none with a warning.
    pub dataplane: Option<bool>,
    /// Where network sandboxes are bind-mounted.
    pub run_dir: PathBuf,
}

/// Environment variables the agent reads (`WEFT_HOST` is the clients').
pub const ENV_KEYS: [&str; 15] = [
    "WEFT_ACCEPTORS",
    "WEFT_DATAPLANE",
    "WEFT_RUN_DIR",
    "WEFT_DEFAULT_POOL",
    "WEFT_REUSE_AFTER",
    "WEFT_NAME",
    "WEFT_BIND",
    "WEFT_ADVERTISE",
    "WEFT_JOIN",
    "WEFT_DATA_DIR",
    "WEFT_DATA_ADDR",
    "WEFT_RESTART_GRACE",
    "WEFT_LEAVE_ON_STOP",
    "WEFT_CONFIG",
    "WEFT_HOST",
];

pub fn parse_file(path: &Path) -> anyhow::Result<Layer> {
    let text = std::fs::read_to_string(path).with_context(|| format!("config file {}", path.display()))?;
    toml::from_str::<Layer>(&text).map_err(|e| {
        let msg = e.message().replace('\n', " ");
        // Name the key the error is about: the text before `=` on the line the error points at.
        let at = e.span().map(|s| s.start).unwrap_or(0).min(text.len());
        let line_no = text[..at].matches('\n').count() + 1;
        let line = text.lines().nth(line_no - 1).unwrap_or("");
        match line.split_once('=') {
            Some((key, _)) if !msg.contains('`') || msg.contains("invalid") => {
                anyhow!("config file {} line {line_no}: key `{}`: {msg}", path.display(), key.trim())
            }
            _ => anyhow!("config file {} line {line_no}: {msg}", path.display()),
        }
    })
}

/// The `WEFT_*` layer of `vars`. Unknown `WEFT_*` variables are refused.
pub fn parse_env(
    vars: impl IntoIterator<Item = (String, String)>,
) -> anyhow::Result<(Layer, Option<PathBuf>)> {
    let mut l = Layer::default();
    let mut config = None;
    for (k, v) in vars {
        if !k.starts_with("WEFT_") {
            continue;
        }
        match k.as_str() {
            "WEFT_NAME" => l.name = Some(v),
            "WEFT_BIND" => l.bind = Some(v),
            "WEFT_ADVERTISE" => l.advertise = Some(v),
            "WEFT_JOIN" => l.join = Some(split_list(&v)),
            "WEFT_DATA_DIR" => l.data_dir = Some(v.into()),
            "WEFT_DATA_ADDR" => l.data_addr = Some(v),
            "WEFT_RESTART_GRACE" => {
                l.restart_grace = Some(
                    v.parse().map_err(|_| anyhow!("WEFT_RESTART_GRACE: {v:?} is not a number of seconds"))?,
                )
            }
            "WEFT_LEAVE_ON_STOP" => {
                l.leave_on_stop = Some(match v.as_str() {
                    "1" | "true" | "yes" => true,
                    "0" | "false" | "no" | "" => false,
                    _ => bail!("WEFT_LEAVE_ON_STOP: {v:?} is not true or false"),
                })
            }
            "WEFT_ACCEPTORS" => l.acceptors = Some(split_list(&v)),
            "WEFT_DEFAULT_POOL" => l.default_pool = Some(v),
            "WEFT_REUSE_AFTER" => {
                l.reuse_after = Some(
                    v.parse().map_err(|_| anyhow!("WEFT_REUSE_AFTER: {v:?} is not a number of seconds"))?,
                )
            }
            "WEFT_DATAPLANE" => l.dataplane = Some(v),
            "WEFT_RUN_DIR" => l.run_dir = Some(v.into()),
            "WEFT_CONFIG" => config = Some(PathBuf::from(v)),
            "WEFT_HOST" => {}
            // Test hooks (see `store::Persister::spawn`); not a setting.
            "WEFT_TEST_HOOKS" => {}
            other => bail!("unknown environment variable {other} (known: {})", ENV_KEYS.join(", ")),
        }
    }
    Ok((l, config))
}

pub fn split_list(v: &str) -> Vec<String> {
    v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect()
}

/// A socket address with the default port if none is given.
pub fn parse_addr(key: &str, v: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(a) = v.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Ok(ip) = v.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, DEFAULT_PORT));
    }
    bail!("{key}: {v:?} is not an address (IP:PORT or IP)")
}

/// Merges file < env < flags and checks every value.
pub fn resolve(
    flags: Layer,
    flag_config: Option<PathBuf>,
    env: Vec<(String, String)>,
) -> anyhow::Result<AgentConfig> {
    let (env_layer, env_config) = parse_env(env)?;
    let file = match flag_config.or(env_config) {
        Some(p) => parse_file(&p)?,
        None => Layer::default(),
    };
    let l = flags.over(env_layer.over(file));
    if let Some(n) = &l.name
        && (n.is_empty() || n.len() > 255 || n.chars().any(|c| c.is_whitespace() || c.is_control()))
    {
        bail!("name: {n:?} must be 1-255 characters without spaces");
    }
    let bind = match &l.bind {
        Some(b) => parse_addr("bind", b)?,
        None => SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)),
    };
    let advertise = l.advertise.as_deref().map(|a| parse_addr("advertise", a)).transpose()?;
    if let Some(a) = advertise
        && a.ip().is_unspecified()
    {
        bail!("advertise: {a} is not an address peers can reach");
    }
    let join = l.join.unwrap_or_default();
    for s in &join {
        if s.is_empty() || s.contains(char::is_whitespace) {
            bail!("join: {s:?} is not a host or address");
        }
    }
    let data_addr = l
        .data_addr
        .as_deref()
        .map(|a| {
            let ip: IpAddr = a.parse().map_err(|_| anyhow!("data_addr: {a:?} is not an IP address"))?;
            if ip.is_unspecified() || ip.is_multicast() {
                bail!("data_addr: {ip} is not an address peers can send VXLAN traffic to");
            }
            Ok(ip)
        })
        .transpose()?;
    let mut alloc = crate::alloc::AllocConfig::default();
    if let Some(p) = &l.default_pool {
        let (net, prefix) = crate::alloc::parse_pool(p).map_err(|e| anyhow!("default_pool: {e}"))?;
        alloc.default_pool = net;
        alloc.pool_prefix = prefix;
    }
    if let Some(a) = &l.acceptors {
        if a.is_empty() || a.len() > 15 {
            bail!(
                "acceptors: give 1 to 15 node names (an odd number: a majority of them must be up to seed)"
            );
        }
        if let Some(bad) = a.iter().find(|n| n.is_empty() || n.contains(char::is_whitespace)) {
            bail!("acceptors: {bad:?} is not a node name");
        }
        alloc.acceptors = Some(a.clone());
    }
    if let Some(r) = l.reuse_after {
        if r > 24 * 3600 {
            bail!("reuse_after: {r} s is more than a day");
        }
        alloc.reuse_after = Duration::from_secs(r);
    }
    let grace = l.restart_grace.unwrap_or(DEFAULT_RESTART_GRACE_S);
    if grace > 24 * 3600 {
        bail!("restart_grace: {grace} s is more than a day");
    }
    let dataplane = match l.dataplane.as_deref() {
        None => None,
        Some("linux") => Some(true),
        Some("none") => Some(false),
        Some(o) => bail!("dataplane: {o:?} is not linux or none"),
    };
    let run_dir = l.run_dir.unwrap_or(DEFAULT_RUN_DIR.into());
    if !run_dir.is_absolute() {
        bail!("run_dir: {} is not an absolute path", run_dir.display());
    }
    Ok(AgentConfig {
        dataplane,
        run_dir,
        name: l.name,
        bind,
        advertise,
        join,
        data_dir: l.data_dir.unwrap_or(DEFAULT_DATA_DIR.into()),
        data_addr,
        restart_grace: Duration::from_secs(grace),
        leave_on_stop: l.leave_on_stop.unwrap_or(false),
        alloc,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn flags_beat_env_beat_file() {
        let dir = std::env::temp_dir().join(format!("weft-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("weft.toml");
        std::fs::write(
            &file,
            "name = \"from-file\"\nbind = \"127.0.0.1:1000\"\njoin = [\"a\", \"b\"]\ndata_dir = \"/tmp/x\"\n",
        )
        .unwrap();
        let flags = Layer { name: Some("from-flag".into()), ..Layer::default() };
        let c =
            resolve(flags, Some(file.clone()), env(&[("WEFT_BIND", "127.0.0.2"), ("WEFT_NAME", "from-env")]))
                .unwrap();
        assert_eq!(c.name.as_deref(), Some("from-flag"));
        assert_eq!(c.bind, "127.0.0.2:7946".parse().unwrap());
        assert_eq!(c.join, vec!["a", "b"]);
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
        std::fs::write(&file, "name = \"x\"\nbindd = \"1.2.3.4\"\n").unwrap();
        let err = resolve(Layer::default(), Some(file.clone()), vec![]).unwrap_err().to_string();
        assert!(err.contains("unknown field `bindd`"), "{err}");
        assert!(!err.contains('\n'));
        std::fs::write(&file, "bind = 7\n").unwrap();
        let err = resolve(Layer::default(), Some(file), vec![]).unwrap_err().to_string();
        assert!(err.contains("bind") || err.contains("string"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_values_name_their_key() {
        let err = resolve(Layer::default(), None, env(&[("WEFT_BIND", "nowhere")])).unwrap_err().to_string();
        assert!(err.starts_with("bind:"), "{err}");
        let err = resolve(Layer::default(), None, env(&[("WEFT_BOGUS", "1")])).unwrap_err().to_string();
        assert!(err.contains("WEFT_BOGUS"), "{err}");
        let err = resolve(Layer { advertise: Some("0.0.0.0:1".into()), ..Layer::default() }, None, vec![])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("advertise:"), "{err}");
        let err = resolve(Layer { name: Some("two words".into()), ..Layer::default() }, None, vec![])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("name:"), "{err}");
        let err =
            resolve(Layer::default(), None, env(&[("WEFT_DATA_ADDR", "host")])).unwrap_err().to_string();
        assert!(err.starts_with("data_addr:"), "{err}");
        let err =
            resolve(Layer::default(), None, env(&[("WEFT_RESTART_GRACE", "1m")])).unwrap_err().to_string();
        assert!(err.starts_with("WEFT_RESTART_GRACE:"), "{err}");
        let err = resolve(Layer::default(), None, env(&[("WEFT_DEFAULT_POOL", "10.0.0.0/8")]))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("default_pool:"), "{err}");
        let err = resolve(Layer::default(), None, env(&[("WEFT_DEFAULT_POOL", "10.0.0.0/8/31")]))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("default_pool:"), "{err}");
        let err = resolve(Layer { acceptors: Some(vec!["a b".into()]), ..Layer::default() }, None, vec![])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("acceptors:"), "{err}");
        let c = resolve(
            Layer::default(),
            None,
            env(&[("WEFT_DEFAULT_POOL", "172.20.0.0/14/26"), ("WEFT_REUSE_AFTER", "5")]),
        )
        .unwrap();
        assert_eq!(c.alloc.pool_params(), "172.20.0.0/14/26");
        assert_eq!(c.alloc.reuse_after, Duration::from_secs(5));
        let c = resolve(Layer::default(), None, env(&[("WEFT_LEAVE_ON_STOP", "true")])).unwrap();
        assert!(c.leave_on_stop);
        assert_eq!(c.restart_grace, Duration::from_secs(DEFAULT_RESTART_GRACE_S));
    }
}

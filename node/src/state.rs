//! What the agent persists in its data dir: its name, its instance id, its restart generation
//! and a Lamport high-water mark. Every write is atomic (temporary file, fsync, rename, fsync of
//! the dir).
//!
//! A node's identity is (name, instance, generation). The instance id is random, created with
//! the data dir: a host whose data dir was lost (reimaged) comes back as a new instance. The
//! generation orders the lives of a name: each start takes `max(persisted + 1, wall-clock
//! milliseconds)`, so a new instance normally starts above every earlier life of its name, and
//! one instance's lives always increase even if the wall clock steps back. (When a new instance
//! starts below an earlier life because the clock stepped back, the gossip core moves it above
//! once it learns of that life.) Never copy a data dir to another host: two agents with one
//! instance id are told apart only by their generations, and the newer one stops.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

/// The clock is persisted in leases of this many ticks, so a write needs an fsync only once
/// per lease, never on every write.
pub const LTIME_LEASE: u64 = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    pub name: String,
    /// Random, created with the data dir (0 in a file written before instances existed: a new
    /// one is drawn on the next start).
    #[serde(default)]
    pub instance: u64,
    pub generation: u64,
    /// No Lamport time at or above this was ever used; a restart starts its clock here.
    pub ltime_hwm: u64,
    /// Networks (ids) this node is attached to; a restart re-attaches them.
    #[serde(default)]
    pub networks: Vec<String>,
    /// This instance has not yet deleted the entries an earlier instance of its name left in
    /// the cluster (set when the data dir is created; see `GossipNode::set_predecessor_sweep`).
    #[serde(default)]
    pub sweep_pending: bool,
    /// The definitions of the attached networks, as last known.
    #[serde(default)]
    pub definitions: Vec<crate::agent::NetworkDef>,
}

/// The state file of one data dir, and the lock that keeps a second agent off it.
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
    state: NodeState,
    /// The data dir had no state before this start.
    fresh: bool,
    _lock: nix::fcntl::Flock<fs::File>,
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    fs::File::open(dir)?.sync_all()
}

impl StateFile {
    /// Opens the data dir's state (creating both if needed) and starts a new generation,
    /// `max(persisted + 1, wall_ms)`: it is on disk before this returns. `name` must match a
    /// persisted name; `fresh_instance` is the instance id a new data dir gets (random, from the
    /// caller, never 0).
    pub fn start(dir: &Path, name: Option<&str>, wall_ms: u64, fresh_instance: u64) -> anyhow::Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("cannot create data dir {}", dir.display()))?;
        let lock_file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))
            .with_context(|| format!("cannot open {}", dir.join("lock").display()))?;
        let lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
            |_| {
                anyhow::anyhow!(
                    "another weft agent is using data dir {} (stop it, or use another --data-dir)",
                    dir.display()
                )
            },
        )?;
        let path = dir.join("node.json");
        let previous = match fs::read(&path) {
            Ok(bytes) => Some(serde_json::from_slice::<NodeState>(&bytes).with_context(|| {
                format!("{} is corrupt; move it away to start as a new node", path.display())
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let fresh = previous.is_none();
        let state = match (previous, name) {
            (Some(p), Some(n)) if p.name != n => bail!(
                "data dir {} belongs to node {:?}; start it with --name {:?} or use another --data-dir",
                dir.display(),
                p.name,
                p.name
            ),
            (Some(p), _) => NodeState {
                instance: if p.instance == 0 { fresh_instance.max(1) } else { p.instance },
                generation: p.generation.saturating_add(1).max(wall_ms),
                ..p
            },
            (None, n) => NodeState {
                name: n.map(str::to_string).unwrap_or_else(default_name),
                instance: fresh_instance.max(1),
                generation: wall_ms.max(1),
                ltime_hwm: 0,
                networks: Vec::new(),
                sweep_pending: true,
                definitions: Vec::new(),
            },
        };
        let mut f = StateFile { path, state: state.clone(), fresh, _lock: lock };
        f.save(state)?;
        Ok(f)
    }

    pub fn state(&self) -> &NodeState {
        &self.state
    }

    /// Writes `next` and adopts it only once it is on disk, so a failed write is retried by
    /// the next call instead of being believed.
    fn save(&mut self, next: NodeState) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec_pretty(&next).expect("serializable");
        write_atomic(&self.path, &bytes).with_context(|| format!("cannot write {}", self.path.display()))?;
        self.state = next;
        Ok(())
    }

    /// Records the attached networks (sorted); writes only when they changed.
    pub fn set_networks(&mut self, mut networks: Vec<String>) -> anyhow::Result<()> {
        networks.sort();
        if networks != self.state.networks {
            let next = NodeState { networks, ..self.state.clone() };
            self.save(next)?;
        }
        Ok(())
    }

    /// Removes the state file of a node that never ran (its first start was refused), so the
    /// data dir can be used under another name.
    pub fn forget_if_new(&self) {
        if self.fresh {
            let _ = fs::remove_file(&self.path);
        }
    }

    /// Records the definitions of the attached networks; writes only when they changed.
    pub fn set_definitions(&mut self, mut defs: Vec<crate::agent::NetworkDef>) -> anyhow::Result<()> {
        defs.sort_by(|a, b| a.id.cmp(&b.id));
        if defs != self.state.definitions {
            let next = NodeState { definitions: defs, ..self.state.clone() };
            self.save(next)?;
        }
        Ok(())
    }

    /// Records that the earlier instance's entries are deleted.
    pub fn sweep_done(&mut self) -> anyhow::Result<()> {
        if self.state.sweep_pending {
            let next = NodeState { sweep_pending: false, ..self.state.clone() };
            self.save(next)?;
        }
        Ok(())
    }

    /// Records a generation the node moved up to (it learned of an earlier life of its name at
    /// or above the one it started with), so the next start begins above it.
    pub fn set_generation(&mut self, generation: u64) -> anyhow::Result<()> {
        if generation > self.state.generation {
            let next = NodeState { generation, ..self.state.clone() };
            self.save(next)?;
        }
        Ok(())
    }

    /// Makes sure the persisted high-water mark is above `ltime`, extending the lease if not.
    /// Call before acknowledging anything written at `ltime`.
    /// The lease is renewed once half of it is used, so a burst of writes rarely waits for it.
    pub fn cover(&mut self, ltime: u64) -> anyhow::Result<()> {
        if ltime.saturating_add(LTIME_LEASE / 2) >= self.state.ltime_hwm {
            let hwm = ltime.saturating_add(LTIME_LEASE).min(weft_gossip::wire::MAX_LTIME - 1);
            if hwm > self.state.ltime_hwm {
                let next = NodeState { ltime_hwm: hwm, ..self.state.clone() };
                self.save(next)?;
            }
        }
        Ok(())
    }
}

/// The host name, as a node name.
pub fn default_name() -> String {
    gethostname::gethostname().to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("weft-state-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn every_start_bumps_the_generation_and_keeps_name_and_clock() {
        let dir = tempdir("gen");
        let mut s = StateFile::start(&dir, Some("alpha"), 1, 77).unwrap();
        assert_eq!((s.state().generation, s.state().instance), (1, 77));
        s.cover(5).unwrap();
        assert_eq!(s.state().ltime_hwm, 5 + LTIME_LEASE);
        s.cover(6).unwrap();
        assert_eq!(s.state().ltime_hwm, 5 + LTIME_LEASE, "inside the lease: no write");
        s.cover(5 + LTIME_LEASE / 2).unwrap();
        assert_eq!(s.state().ltime_hwm, 5 + LTIME_LEASE + LTIME_LEASE / 2, "renewed at half");
        s.cover(5).unwrap();
        let err = StateFile::start(&dir, None, 1, 1).unwrap_err().to_string();
        assert!(err.contains("another weft agent"), "{err}");
        drop(s);
        // The wall clock stepped back (or stood still): the generation still goes up.
        let s2 = StateFile::start(&dir, None, 0, 99).unwrap();
        assert_eq!(
            s2.state(),
            &NodeState {
                name: "alpha".into(),
                instance: 77,
                generation: 2,
                ltime_hwm: 5 + LTIME_LEASE + LTIME_LEASE / 2,
                networks: vec![],
                sweep_pending: true,
                definitions: vec![],
            }
        );
        let mut s3 = s2;
        s3.set_networks(vec!["b".into(), "a".into()]).unwrap();
        drop(s3);
        let s4 = StateFile::start(&dir, None, 1_700_000_000_000, 5).unwrap();
        assert_eq!(s4.state().networks, vec!["a", "b"]);
        assert_eq!(s4.state().generation, 1_700_000_000_000, "the wall clock is ahead: it wins");
        assert_eq!(s4.state().instance, 77, "the instance is the data dir's, whatever the caller drew");
        let mut s4 = s4;
        s4.set_generation(1_700_000_000_500).unwrap();
        drop(s4);
        assert_eq!(StateFile::start(&dir, None, 5, 5).unwrap().state().generation, 1_700_000_000_501);
        let err = StateFile::start(&dir, Some("beta"), 1, 1).unwrap_err().to_string();
        assert!(err.contains("belongs to node \"alpha\""), "{err}");
        fs::write(dir.join("node.json"), b"{not json").unwrap();
        assert!(StateFile::start(&dir, None, 1, 1).unwrap_err().to_string().contains("corrupt"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_state_file_from_before_instances_gets_one() {
        let dir = tempdir("upgrade");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("node.json"), br#"{"name":"old","generation":4,"ltime_hwm":10,"networks":[]}"#)
            .unwrap();
        let s = StateFile::start(&dir, None, 3, 1234).unwrap();
        assert_eq!((s.state().instance, s.state().generation), (1234, 5));
        drop(s);
        assert_eq!(StateFile::start(&dir, None, 3, 99).unwrap().state().instance, 1234);
        fs::remove_dir_all(&dir).unwrap();
    }
}

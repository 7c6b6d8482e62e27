//! The agent's one durable store: a redb database, `weft.redb`, in the data dir, holding the
//! keys of [`persist`](crate::persist) (identity, clock lease, attachments; later issues add
//! their own keys, never a second store). The [`Persister`] writes the agent's batches on its
//! own thread with group commit: every batch waiting when a commit starts goes into that one
//! transaction, so one fsync covers them all.
//!
//! A node's identity is (name, instance, generation). The instance id is random, created with
//! the data dir: a host whose data dir was lost (reimaged) comes back as a new instance. The
//! generation orders the lives of a name: each start takes `max(persisted + 1, wall-clock
//! milliseconds)`, durable before the agent starts. Never copy a data dir to another host: two
//! agents with one instance id are told apart only by their generations, and the newer one
//! stops.
//!
//! A data dir written by an earlier version keeps its state in `node.json`: it is read once,
//! copied into the store, and renamed `node.json.imported`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use crate::persist::{NodeState, PersistBatch};

const TABLE: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("weft");
pub const DB_FILE: &str = "weft.redb";
const LEGACY_FILE: &str = "node.json";

/// The store of one data dir, and the lock that keeps a second agent off it.
#[derive(Debug)]
pub struct Store {
    /// `None` only while it is being reopened after a failed write.
    db: Option<redb::Database>,
    path: PathBuf,
    /// The data dir held no node before this start.
    fresh: bool,
    _lock: nix::fcntl::Flock<fs::File>,
}

impl Store {
    /// Opens (or creates) the data dir's store and starts a new generation,
    /// `max(persisted + 1, wall_ms)`, durable before this returns. `name` must match a persisted
    /// name; `fresh_instance` is the instance id a new data dir gets (random, never 0).
    pub fn open(
        dir: &Path,
        name: Option<&str>,
        wall_ms: u64,
        fresh_instance: u64,
    ) -> anyhow::Result<(Store, NodeState)> {
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
        let path = dir.join(DB_FILE);
        let db = redb::Database::create(&path).with_context(|| {
            format!("cannot open {} (if it is corrupt, move it away to start as a new node)", path.display())
        })?;
        let mut store = Store { db: Some(db), path, fresh: false, _lock: lock };
        let image = store.read_all()?;
        let mut previous = NodeState::from_image(&image).map_err(|e| {
            anyhow::anyhow!("{} is corrupt ({e}); move it away to start as a new node", store.path.display())
        })?;
        let legacy = dir.join(LEGACY_FILE);
        if previous.is_none() {
            previous = read_legacy(&legacy)?;
        }
        store.fresh = previous.is_none();
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
                alloc: BTreeMap::new(),
            },
        };
        // The whole node state, rewritten: stale `net/` keys of an import go with it.
        let mut ops: Vec<(String, Option<Vec<u8>>)> = image
            .keys()
            .filter(|k| k.starts_with(crate::persist::NET_PREFIX))
            .map(|k| (k.clone(), None))
            .collect();
        // (The allocator's keys are as they were: not rewritten.)
        ops.extend(
            state
                .to_image()
                .into_iter()
                .filter(|(k, _)| !crate::persist::is_alloc_key(k))
                .map(|(k, v)| (k, Some(v))),
        );
        store.write(&[PersistBatch { seq: 0, ops }])?;
        if legacy.exists() {
            fs::rename(&legacy, dir.join("node.json.imported"))
                .with_context(|| format!("cannot rename {}", legacy.display()))?;
        }
        Ok((store, state))
    }

    /// Every key and value in the store.
    pub fn read_all(&self) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
        let txn = self.db()?.begin_read().context("cannot read the store")?;
        let table = match txn.open_table(TABLE) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(BTreeMap::new()),
            Err(e) => return Err(e).context("cannot read the store"),
        };
        let mut out = BTreeMap::new();
        for item in table.iter().context("cannot read the store")? {
            let (k, v) = item.context("cannot read the store")?;
            out.insert(k.value().to_string(), v.value().to_vec());
        }
        Ok(out)
    }

    /// Writes `batches` in one transaction, durable (fsync'ed) when this returns.
    pub fn write(&self, batches: &[PersistBatch]) -> anyhow::Result<()> {
        let txn = self.db()?.begin_write().context("cannot write the store")?;
        {
            let mut table = txn.open_table(TABLE).context("cannot write the store")?;
            for b in batches {
                for (k, v) in &b.ops {
                    match v {
                        Some(v) => table.insert(k.as_str(), v.as_slice()),
                        None => table.remove(k.as_str()).map(|_| None),
                    }
                    .with_context(|| format!("cannot write {k} to the store"))?;
                }
            }
        }
        txn.commit().with_context(|| format!("cannot commit to {}", self.path.display()))
    }

    fn db(&self) -> anyhow::Result<&redb::Database> {
        self.db.as_ref().ok_or_else(|| anyhow::anyhow!("{} could not be reopened", self.path.display()))
    }

    /// Closes and reopens the database: after a failed write redb refuses every later one
    /// until it is reopened (what was committed before stays).
    pub fn reopen(&mut self) -> anyhow::Result<()> {
        self.db = None;
        self.db = Some(
            redb::Database::create(&self.path)
                .with_context(|| format!("cannot reopen {}", self.path.display()))?,
        );
        Ok(())
    }

    /// Where the store lives, and whether this start created it.
    pub fn file(&self) -> StoreFile {
        StoreFile { path: self.path.clone(), fresh: self.fresh }
    }
}

/// The store's file, for the shell to remove it when a first start is refused.
#[derive(Debug, Clone)]
pub struct StoreFile {
    path: PathBuf,
    fresh: bool,
}

impl StoreFile {
    /// A node refused at its very first start leaves no identity behind in its data dir.
    pub fn forget_if_new(&self) {
        if self.fresh {
            let _ = fs::remove_file(&self.path);
        }
    }
}

fn read_legacy(path: &Path) -> anyhow::Result<Option<NodeState>> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(serde_json::from_slice::<NodeState>(&bytes).with_context(|| {
            format!("{} is corrupt; move it away to start as a new node", path.display())
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// The host name, as a node name.
pub fn default_name() -> String {
    gethostname::gethostname().to_string_lossy().into_owned()
}

/// What the persister reports: every batch up to `seq` is durable, or the write failed (it is
/// retried, with everything that came after it, until it succeeds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Durable {
    Upto(u64),
    Failed { seq: u64, error: String },
}

/// Counters of the persister, shared with the shell's metrics.
#[derive(Debug, Default)]
pub struct PersistStats {
    pub batches: AtomicU64,
    pub commits: AtomicU64,
    pub errors: AtomicU64,
    /// Total time spent in commits, microseconds.
    pub commit_us: AtomicU64,
}

/// How long a failed write waits before it is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Writes batches on a thread of its own, in order, many per commit.
#[derive(Debug)]
pub struct Persister {
    tx: mpsc::Sender<PersistBatch>,
    pub stats: Arc<PersistStats>,
}

impl Persister {
    /// Starts the writer thread; `report` hears of every commit and every failure. A file named
    /// `stall-persist` in the data dir holds commits back while it exists, when the environment
    /// sets `WEFT_TEST_HOOKS=1` (tests of a stalled disk).
    pub fn spawn(mut store: Store, report: impl Fn(Durable) + Send + 'static) -> Persister {
        let (tx, rx) = mpsc::channel::<PersistBatch>();
        let stats = Arc::new(PersistStats::default());
        let st = stats.clone();
        let stall = (std::env::var("WEFT_TEST_HOOKS").as_deref() == Ok("1"))
            .then(|| store.path.with_file_name("stall-persist"));
        std::thread::Builder::new()
            .name("weft-persist".into())
            .spawn(move || {
                let mut pending: Vec<PersistBatch> = Vec::new();
                loop {
                    if pending.is_empty() {
                        match rx.recv() {
                            Ok(b) => pending.push(b),
                            Err(_) => return,
                        }
                    }
                    if let Some(stall) = &stall {
                        while stall.exists() {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                    // Group commit: everything that queued up while the last commit ran.
                    pending.extend(rx.try_iter());
                    let t0 = Instant::now();
                    let last = pending.last().map_or(0, |b| b.seq);
                    match store.write(&pending) {
                        Ok(()) => {
                            st.commit_us.fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
                            st.commits.fetch_add(1, Ordering::Relaxed);
                            st.batches.fetch_add(pending.len() as u64, Ordering::Relaxed);
                            pending.clear();
                            report(Durable::Upto(last));
                        }
                        Err(e) => {
                            st.errors.fetch_add(1, Ordering::Relaxed);
                            let seq = pending.first().map_or(0, |b| b.seq);
                            report(Durable::Failed { seq, error: format!("{e:#}") });
                            std::thread::sleep(RETRY_AFTER);
                            // The same batches (and whatever queued meanwhile) go again, in
                            // order, on a freshly opened database.
                            if let Err(e) = store.reopen() {
                                report(Durable::Failed { seq, error: format!("{e:#}") });
                            }
                        }
                    }
                }
            })
            .expect("cannot start the persist thread");
        Persister { tx, stats }
    }

    /// Queues a batch; batches are written in the order they are queued.
    pub fn submit(&self, batch: PersistBatch) {
        let _ = self.tx.send(batch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::{KEY_GENERATION, KEY_LTIME, LTIME_LEASE};

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("weft-store-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn put(seq: u64, k: &str, v: &str) -> PersistBatch {
        PersistBatch { seq, ops: vec![(k.to_string(), Some(v.as_bytes().to_vec()))] }
    }

    #[test]
    fn every_start_bumps_the_generation_and_keeps_name_and_clock() {
        let dir = tempdir("gen");
        let (s, st) = Store::open(&dir, Some("alpha"), 1, 77).unwrap();
        assert_eq!((st.generation, st.instance, st.sweep_pending), (1, 77, true));
        s.write(&[
            put(1, KEY_LTIME, &(5 + LTIME_LEASE).to_string()),
            put(2, "net/abc", r#"{"id":"abc","name":"","driver":"","created_by":""}"#),
        ])
        .unwrap();
        let err = Store::open(&dir, None, 1, 1).unwrap_err().to_string();
        assert!(err.contains("another weft agent"), "{err}");
        drop(s);
        // The wall clock stepped back (or stood still): the generation still goes up.
        let (s2, st2) = Store::open(&dir, None, 0, 99).unwrap();
        assert_eq!(
            st2,
            NodeState {
                name: "alpha".into(),
                instance: 77,
                generation: 2,
                ltime_hwm: 5 + LTIME_LEASE,
                networks: vec!["abc".into()],
                sweep_pending: true,
                definitions: vec![],
                alloc: BTreeMap::new(),
            }
        );
        s2.write(&[put(1, KEY_GENERATION, "1700000000500")]).unwrap();
        drop(s2);
        let (s3, st3) = Store::open(&dir, None, 5, 5).unwrap();
        assert_eq!(st3.generation, 1_700_000_000_501, "a generation moved up to is kept");
        drop(s3);
        let err = Store::open(&dir, Some("beta"), 1, 1).unwrap_err().to_string();
        assert!(err.contains("belongs to node \"alpha\""), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_node_json_from_an_earlier_version_is_imported_once() {
        let dir = tempdir("upgrade");
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("node.json"),
            br#"{"name":"old","generation":4,"ltime_hwm":10,"networks":["n1"],"definitions":[{"id":"n1","name":"green","driver":"overlay","created_by":"old"}]}"#,
        )
        .unwrap();
        let (s, st) = Store::open(&dir, None, 3, 1234).unwrap();
        assert_eq!((st.instance, st.generation, st.ltime_hwm), (1234, 5, 10));
        assert_eq!(st.networks, vec!["n1"]);
        assert_eq!(st.definitions[0].name, "green");
        assert!(!dir.join("node.json").exists() && dir.join("node.json.imported").exists());
        drop(s);
        let (_, st) = Store::open(&dir, None, 3, 99).unwrap();
        assert_eq!((st.instance, st.generation, st.name.as_str()), (1234, 6, "old"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_persister_commits_in_order_and_reports_the_last_batch() {
        let dir = tempdir("persister");
        let (s, _) = Store::open(&dir, Some("p"), 1, 1).unwrap();
        let (tx, rx) = mpsc::channel();
        let p = Persister::spawn(s, move |d| {
            let _ = tx.send(d);
        });
        for seq in 1..=50 {
            p.submit(put(seq, "k", &seq.to_string()));
        }
        let mut last = 0;
        while last < 50 {
            match rx.recv_timeout(Duration::from_secs(30)).unwrap() {
                Durable::Upto(s) => {
                    assert!(s > last, "reports go up");
                    last = s;
                }
                Durable::Failed { error, .. } => panic!("{error}"),
            }
        }
        let commits = p.stats.commits.load(Ordering::Relaxed);
        assert_eq!(p.stats.batches.load(Ordering::Relaxed), 50);
        assert!(commits <= 50);
        fs::remove_dir_all(&dir).unwrap();
    }
}

//! The data plane's own thread: it applies the agent's data-plane operations in order, off the
//! agent's thread (netlink calls wait on the kernel), and reports each result back to it; it
//! also serves reads of what the kernel holds (`network inspect --verbose`), in line with the
//! operations before them. The Linux data plane enters namespaces with `setns`, which holds for
//! the calling thread only: one thread does all of it.

use std::net::IpAddr;
use std::path::Path;

use tokio::sync::{mpsc, oneshot};
use weft_overlay::{Dataplane, DpError, DpOp, KernelView, OpId};

/// An operation's result, for the agent.
pub type DpDone = (OpId, Result<(), DpError>);

enum DpReq {
    Apply(OpId, DpOp),
    Read(String, oneshot::Sender<Result<KernelView, DpError>>),
}

/// The handle of the data plane's thread.
#[derive(Debug, Clone)]
pub struct DpThread {
    tx: std::sync::mpsc::Sender<DpReq>,
}

impl std::fmt::Debug for DpReq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DpReq::Apply(id, op) => write!(f, "apply #{id} {op:?}"),
            DpReq::Read(nid, _) => write!(f, "read {nid}"),
        }
    }
}

impl DpThread {
    /// Starts the Linux data plane on a thread of its own (sandboxes under `run_dir/netns`,
    /// VXLAN devices sending from `vtep`); fails in one line if it cannot work here.
    #[cfg(target_os = "linux")]
    pub fn spawn_linux(
        run_dir: &Path,
        vtep: IpAddr,
        done: mpsc::UnboundedSender<DpDone>,
    ) -> Result<DpThread, String> {
        let run_dir = run_dir.to_path_buf();
        Self::spawn(
            move || weft_overlay::linux::LinuxDataplane::new(&run_dir, vtep).map_err(|e| e.to_string()),
            done,
        )
    }

    #[cfg(not(target_os = "linux"))]
    pub fn spawn_linux(_: &Path, _: IpAddr, _: mpsc::UnboundedSender<DpDone>) -> Result<DpThread, String> {
        Err("the Linux data plane runs on Linux only".into())
    }

    /// Starts `make()`'s data plane on a thread of its own.
    pub fn spawn<D: Dataplane + 'static>(
        make: impl FnOnce() -> Result<D, String> + Send + 'static,
        done: mpsc::UnboundedSender<DpDone>,
    ) -> Result<DpThread, String> {
        let (tx, rx) = std::sync::mpsc::channel::<DpReq>();
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Result<(), String>>(1);
        std::thread::Builder::new()
            .name("weft-dataplane".into())
            .spawn(move || {
                // A data plane that panicked (stranded in another namespace, say) must not
                // leave an agent whose operations never complete: the process stops.
                let _guard = crate::shell::ExitOnPanic("the data plane's thread");
                let mut dp = match make() {
                    Ok(dp) => {
                        let _ = ready_tx.send(Ok(()));
                        dp
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while let Ok(req) = rx.recv() {
                    match req {
                        DpReq::Apply(id, op) => {
                            let r = dp.apply(&op);
                            // The driver logs failures, with their network and once per cause.
                            if let Err(e) = &r {
                                tracing::debug!(op = id, error = %e, "data plane operation failed");
                            }
                            if done.send((id, r)).is_err() {
                                return;
                            }
                        }
                        DpReq::Read(nid, reply) => {
                            let _ = reply.send(dp.read(&nid));
                        }
                    }
                }
            })
            .map_err(|e| format!("cannot start the data plane's thread: {e}"))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(DpThread { tx }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("the data plane's thread died at start".into()),
        }
    }

    /// Queues an operation; its result comes back on the `done` channel. False if the
    /// thread is gone (the caller reports the operation failed).
    pub fn apply(&self, id: OpId, op: DpOp) -> bool {
        self.tx.send(DpReq::Apply(id, op)).is_ok()
    }

    /// What the kernel holds for a network's sandbox (after the operations queued before).
    pub async fn read(&self, nid: &str) -> Result<KernelView, DpError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(DpReq::Read(nid.to_string(), tx))
            .map_err(|_| DpError::new("read the data plane", "its thread is gone"))?;
        rx.await.map_err(|_| DpError::new("read the data plane", "its thread is gone"))?
    }
}

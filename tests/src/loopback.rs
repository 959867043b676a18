//! A manager and group leaders on loopback, each node on its own thread and tokio runtime so it
//! can be killed like a process (its runtime is dropped: sockets close, tasks stop), and
//! [`CopyDelivery`], a GL's segment side by checked file copies. Test support, not product code:
//! used by the multi-node tests (`tests/manager_*.rs`, `tests/tree_*.rs`) and the tree benchmark
//! (`benches/tree.rs`).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::oneshot;

use cm_tree::BoxFuture;
use cm_tree::http::{ClientError, JsonClient};
use cm_tree::leader::{DeliveryOutcome, LocalDelivery};
use cm_tree::manifest::Manifest;
use cm_tree::message::DiscoveryReport;

/// A node running on a thread of its own; [`NodeThread::kill`] stops it at once.
pub struct NodeThread {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl NodeThread {
    /// Runs `start` on a fresh current-thread runtime and returns what it produced; the runtime
    /// keeps running the node's tasks until [`NodeThread::kill`] or drop.
    pub fn spawn<T, F, Fut>(name: &str, start: F) -> std::io::Result<(T, NodeThread)>
    where
        T: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
    {
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<T>();
        let thread = std::thread::Builder::new().name(name.to_string()).spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!("node runtime: {e}");
                    return;
                }
            };
            rt.block_on(async move {
                let v = start().await;
                if ready_tx.send(v).is_err() {
                    return;
                }
                let _ = stop_rx.await;
            });
            rt.shutdown_background();
        })?;
        let v = ready_rx
            .recv()
            .map_err(|_| std::io::Error::other(format!("node {name} failed to start")))?;
        Ok((v, NodeThread { stop: Some(stop_tx), thread: Some(thread) }))
    }

    /// Stops the node: every socket closes, every task ends.
    pub fn kill(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for NodeThread {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Delivery by plain file copy to member directories on this machine, each copy checked against
/// the manifest's BLAKE3: stands in for MCTP in tests and benchmarks of the tree alone.
pub struct CopyDelivery {
    /// (server name, directory that receives `run-<id>.assignment`)
    pub members: Vec<(String, PathBuf)>,
}

impl LocalDelivery for CopyDelivery {
    fn deliver(
        &self,
        run: u64,
        assignment: PathBuf,
        manifest: Manifest,
    ) -> BoxFuture<'static, DeliveryOutcome> {
        let members = self.members.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                copy_to_members(run, &assignment, &manifest, &members)
            })
            .await
            .unwrap_or_default()
        })
    }
}

fn copy_to_members(
    run: u64,
    assignment: &Path,
    manifest: &Manifest,
    members: &[(String, PathBuf)],
) -> DeliveryOutcome {
    let mut out = DeliveryOutcome::default();
    for (name, dir) in members {
        let dest = dir.join(format!("run-{run}.assignment"));
        let result = std::fs::create_dir_all(dir)
            .and_then(|_| std::fs::copy(assignment, &dest))
            .map_err(|e| e.to_string())
            .and_then(|_| Manifest::of_file(&dest, manifest.chunk_size).map_err(|e| e.to_string()))
            .and_then(|m| {
                if m.blake3 == manifest.blake3 {
                    Ok(())
                } else {
                    Err("copy does not match the assignment's BLAKE3".into())
                }
            });
        match result {
            Ok(()) => out.succeeded.push(name.clone()),
            Err(e) => out.failed.push((name.clone(), e)),
        }
    }
    out
}

/// Sends a GL's discovery report to the manager.
pub async fn report_discovery(
    manager_url: &str,
    agent_token: &str,
    report: &DiscoveryReport,
) -> Result<(), ClientError> {
    let c = JsonClient::new(agent_token, Duration::from_secs(10));
    c.post::<_, serde_json::Value>(&format!("{manager_url}/api/v1/discovery"), report)
        .await
        .map(|_| ())
}

/// An operator's client for the manager API.
pub fn operator_client(token: &str) -> JsonClient {
    JsonClient::new(token, Duration::from_secs(30))
}

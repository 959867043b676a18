//! A GL's conversation with the manager about one run: fetch until whole (switching parents as
//! told, or asking for a new one when a parent fails), tell the manager it is received, deliver
//! to the segment and send the consolidated report; and the forwarding slots' questions
//! ("whom next?", "this child is unreachable").

use std::sync::Arc;
use std::time::Duration;

use super::{Inner, RunState, lock};
use crate::BoxFuture;
use crate::blob::BlobError;
use crate::forward::ChildSource;
use crate::message::{ChildTarget, NextChild, Notification, SegmentReport, TreeCall};

/// How long a GL keeps offering its consolidated report to a manager that does not answer.
const REPORT_PATIENCE: Duration = Duration::from_secs(600);

/// How long a forwarding slot keeps asking "whom next?" before it ends.
const NEXT_PATIENCE: Duration = Duration::from_secs(20);

impl Inner {
    /// The path of a tree call about `run` on the manager (`crate::managers` picks the replica).
    fn manager_path(&self, run: &RunState, what: &str) -> String {
        format!("/api/v1/dist/{}/{what}", run.notification.borrow().run)
    }

    /// Tells the manager something, following its replicas for as long as `patience` (it may
    /// be restarting, or a standby taking over).
    async fn tell_manager<T: serde::Serialize>(
        &self,
        path: &str,
        body: &T,
        patience: Duration,
    ) -> bool {
        match self.managers.post::<_, serde_json::Value>(path, body, patience).await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(segment = %self.cfg.segment, "{e}");
                false
            }
        }
    }

    /// Fetch until whole (switching parents as told or when one fails), then report received,
    /// deliver to the segment and send the consolidated report.
    pub(super) async fn drive(self: Arc<Self>, run: Arc<RunState>) {
        let mut rx = run.notification.subscribe();
        let (started, from) = (std::time::Instant::now(), run.blob.verified());
        let mut failures = 0u32;
        let mut total_failures = 0u32;
        loop {
            let n = rx.borrow_and_update().clone();
            let url = format!("{}/dist/{}/blob?from={}", n.source, n.run, n.segment);
            let result = tokio::select! {
                r = run.blob.fetch_from(&self.client, &url, self.cfg.stall) => r,
                _ = rx.changed() => { failures = 0; continue; }
            };
            match result {
                Ok(()) => break,
                Err(e) => {
                    failures += 1;
                    total_failures += 1;
                    tracing::warn!(segment = %self.cfg.segment, "{e}");
                    if total_failures > 200 {
                        tracing::error!(segment = %self.cfg.segment, run = n.run, "giving up on the run after {total_failures} failed fetches");
                        // Forgotten, so a later notification (the manager resuming the run)
                        // starts it afresh instead of finding a run nobody fetches.
                        lock(&self.runs).remove(&n.run);
                        return;
                    }
                    if failures >= self.cfg.retries_per_parent
                        || matches!(e, BlobError::Corrupt { .. }) && failures >= 2
                    {
                        failures = 0;
                        let path = self.manager_path(&run, "reparent");
                        let call = TreeCall { segment: self.cfg.segment.clone() };
                        match self
                            .managers
                            .post::<_, Notification>(&path, &call, Duration::from_secs(15))
                            .await
                        {
                            Ok(new) if self.check_signed(&new, "reparent answer").is_err() => {}
                            Ok(new) if new.run != n.run || new.segment != n.segment => {
                                tracing::warn!(segment = %self.cfg.segment, "reparent answer for another run or segment ignored");
                            }
                            Ok(new) => {
                                tracing::info!(segment = %self.cfg.segment, "re-parented to {}", new.source);
                                run.notification.send_replace(new);
                                rx.borrow_and_update();
                            }
                            Err(e) => {
                                tracing::warn!(segment = %self.cfg.segment, "asking for a new parent: {e}")
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50 * u64::from(failures.max(1))))
                        .await;
                }
            }
        }
        let fetched = run.blob.manifest().size - from;
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        lock(&self.links).fetched(fetched, micros);
        let n = run.notification.borrow().clone();
        let call = TreeCall { segment: self.cfg.segment.clone() };
        self.tell_manager(&self.manager_path(&run, "received"), &call, Duration::from_secs(15))
            .await;
        let outcome = self
            .delivery
            .deliver_to(n.run, run.blob.path().to_path_buf(), n.manifest.clone(), n.servers.clone())
            .await;
        let report = SegmentReport {
            segment: self.cfg.segment.clone(),
            leader: self.cfg.leader.clone(),
            succeeded: outcome.succeeded,
            failed: outcome.failed,
            missing: outcome.missing,
            site: n.site.clone(),
        };
        let path = format!("/api/v1/runs/{}/report", n.run);
        // The segment's outcome exists nowhere else: keep trying through a manager restart or
        // a takeover by a standby replica.
        if !self.tell_manager(&path, &report, REPORT_PATIENCE).await {
            tracing::error!(segment = %self.cfg.segment, run = n.run, "the manager never took the segment's report");
        }
        // After the report: what follows a commit in the segment (its caches) never delays it.
        self.delivery.reported(&n, &report);
    }
}

/// A GL's forwarding slots ask the manager over HTTP.
pub(super) struct ManagerChildSource {
    pub(super) inner: Arc<Inner>,
    pub(super) run: Arc<RunState>,
}

impl ChildSource for ManagerChildSource {
    fn next(&self) -> BoxFuture<'_, Option<ChildTarget>> {
        Box::pin(async move {
            let path = self.inner.manager_path(&self.run, "next");
            let call = TreeCall { segment: self.inner.cfg.segment.clone() };
            let asked = self.inner.managers.post::<_, NextChild>(&path, &call, NEXT_PATIENCE);
            match asked.await {
                Ok(next) => next.child,
                Err(e) => {
                    tracing::warn!(segment = %self.inner.cfg.segment, "asking for the next GL: {e}");
                    None
                }
            }
        })
    }

    fn unreachable(&self, child: String) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let path = self.inner.manager_path(&self.run, "dead");
            self.inner
                .tell_manager(&path, &TreeCall { segment: child }, Duration::from_secs(15))
                .await;
        })
    }
}

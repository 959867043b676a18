//! `POST /abort`: the manager's signed order to stop a run. The GL checks the signature (an
//! agent's token or certificate alone is refused: agents relay and report, never command),
//! remembers the order, stops the run's fetch, forwarding slots and delivery (the MCTP session
//! ends when its task does), deletes its copy and tells the segment side
//! ([`LocalDelivery::abort`](super::LocalDelivery::abort)), which discards what the run prepared.
//! From then on the run is gone here: a notification for it, a member asking for its targets,
//! get `410 Gone` with the order; a member's report on it is answered with the order.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};

use super::{Inner, lock};
use crate::abort::AbortOrder;
use crate::http::{self, Body, PeerRole, Role};

/// Aborted runs a GL remembers (the oldest are forgotten first).
pub(super) const KEPT: usize = 256;
/// Aborted runs named to a member with each run's targets.
const SENT: usize = 16;

/// `410 Gone` naming the abort, with the signed order for the caller to verify.
pub(super) fn gone(order: &AbortOrder) -> Response<Body> {
    http::json(
        StatusCode::GONE,
        &serde_json::json!({
            "error": format!("run {} was aborted: {}", order.run, order.reason),
            "aborted": order,
        }),
    )
}

impl Inner {
    /// The manager's order for `run`, if it aborted the run here.
    pub(super) fn aborted_order(&self, run: u64) -> Option<AbortOrder> {
        lock(&self.aborted).get(&run).cloned()
    }

    /// The orders of the newest [`SENT`] runs aborted here.
    pub(super) fn recent_aborts(&self) -> Vec<AbortOrder> {
        lock(&self.aborted).values().rev().take(SENT).cloned().collect()
    }

    pub(super) async fn on_abort(self: &Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        if let Some(PeerRole(Some(Role::Agent))) = req.extensions().get::<PeerRole>() {
            return http::error(
                StatusCode::FORBIDDEN,
                "an agent certificate cannot abort a run; only the manager can",
            );
        }
        let order: AbortOrder = match http::read_json(req).await {
            Ok(o) => o,
            Err(r) => return r,
        };
        if let Err(e) = order.verify(&self.cfg.manager_keys) {
            let total = self.refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            let msg = format!("abort order for run {} refused: {e}", order.run);
            tracing::warn!(segment = %self.cfg.segment, refused_total = total, "{msg}");
            return http::error(StatusCode::FORBIDDEN, &msg);
        }
        let run = {
            // Under the runs lock: a notification for the run either started it already (and
            // its tasks are stopped here) or sees the order and is refused.
            let mut runs = lock(&self.runs);
            let mut aborted = lock(&self.aborted);
            aborted.insert(order.run, order.clone());
            while aborted.len() > KEPT {
                aborted.pop_first();
            }
            runs.remove(&order.run)
        };
        let stopped = match &run {
            Some(r) => {
                for t in lock(&r.tasks).drain(..) {
                    t.abort();
                }
                let _ = std::fs::remove_file(r.blob.path());
                true
            }
            None => false,
        };
        tracing::info!(segment = %self.cfg.segment, run = order.run, stopped, "run aborted by the manager: {}", order.reason);
        self.delivery.abort(&order);
        http::json(
            StatusCode::OK,
            &serde_json::json!({ "aborted": order.run, "was_running": stopped }),
        )
    }
}

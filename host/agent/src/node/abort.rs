//! A run the manager aborted, on a server: the release the run prepared here is removed and the
//! run is never applied here afterwards (live is never touched). A server learns of the abort
//! from the manager's signed [`AbortOrder`], which it verifies against its pinned manager keys
//! whoever relayed it: as GL, from `POST /abort` (cm-tree's leader checks it first); as a
//! member, from its GL's answers — the run's targets (`410 Gone` with the order) or the reply
//! to its apply report.

use std::sync::Arc;

use cm_tree::abort::AbortOrder;

use super::Shared;

/// Verifies `order` and, if the manager signed it, discards what the run prepared here (on a
/// blocking thread; it waits for an apply of the run in flight). An order no pinned key signed
/// is logged and ignored.
pub fn follow(shared: &Arc<Shared>, order: &AbortOrder) {
    if let Err(e) = order.verify(&shared.cfg.manager_keys) {
        tracing::warn!(run = order.run, "abort order ignored: {e}");
        return;
    }
    discard(shared, order);
}

/// Discards what the run prepared here; `order` is already verified.
pub fn discard(shared: &Arc<Shared>, order: &AbortOrder) {
    tokio::spawn(discarded(shared.clone(), order.clone()));
}

/// Like [`follow`], finished when the release is gone (before the next run is applied).
pub async fn follow_now(shared: &Arc<Shared>, order: &AbortOrder) {
    if shared.applier.knows_aborted(order.run) {
        return;
    }
    if let Err(e) = order.verify(&shared.cfg.manager_keys) {
        tracing::warn!(run = order.run, "abort order ignored: {e}");
        return;
    }
    discarded(shared.clone(), order.clone()).await;
}

async fn discarded(shared: Arc<Shared>, order: AbortOrder) {
    let (applier, run, reason) = (shared.applier.clone(), order.run, order.reason);
    let done = tokio::task::spawn_blocking(move || applier.abort(run)).await;
    match done {
        Ok(Ok(Some(serial))) => {
            tracing::info!(run, serial, "{reason}: prepared release {serial} removed")
        }
        Ok(Ok(None)) => tracing::info!(run, "{reason}: nothing prepared here"),
        Ok(Err(e)) => tracing::error!(run, "{reason}: discarding the prepared release: {e}"),
        Err(e) => tracing::error!(run, "discarding the prepared release: {e}"),
    }
}

/// The order in a GL's answer (`{"aborted": …}`), if there is one.
pub fn order_in(answer: &serde_json::Value) -> Option<AbortOrder> {
    serde_json::from_value(answer.get("aborted")?.clone()).ok()
}

//! One forwarding slot of a tree node (the manager or a GL): ask whom to serve next, notify that
//! child, let it pull the blob, and ask again when its stream ends; stop at the null address.

use std::sync::Arc;
use std::time::Duration;

use crate::BoxFuture;
use crate::blob::{Blob, StreamState};
use crate::http::JsonClient;
use crate::message::ChildTarget;

/// Where a node learns its next child, and whom it tells about a child it could not reach.
pub trait ChildSource: Send + Sync + 'static {
    /// The next child to serve; `None` is the null address (this slot is done).
    fn next(&self) -> BoxFuture<'_, Option<ChildTarget>>;
    /// `child` did not take its notification or never started pulling.
    fn unreachable(&self, child: String) -> BoxFuture<'_, ()>;
}

/// Runs one slot until the source says done. `start_timeout` bounds how long a notified child
/// may take to start pulling before it is reported unreachable.
pub async fn forward_slot(
    blob: Arc<Blob>,
    client: JsonClient,
    source: Arc<dyn ChildSource>,
    start_timeout: Duration,
) {
    while let Some(child) = source.next().await {
        let mut stream = blob.expect_stream(&child.segment);
        let url = format!("{}/notify", client.base_url(&child.address));
        if let Err(e) = client.post::<_, serde_json::Value>(&url, &child.notification).await {
            tracing::warn!(child = %child.segment, "notification failed: {e}");
            source.unreachable(child.segment).await;
            continue;
        }
        let started =
            tokio::time::timeout(start_timeout, stream.wait_for(|s| *s != StreamState::NotStarted))
                .await
                .is_ok_and(|r| r.is_ok());
        if !started {
            tracing::warn!(child = %child.segment, "notified child never started fetching");
            source.unreachable(child.segment).await;
            continue;
        }
        // The slot is busy while the child pulls; a broken stream frees it (the child resumes
        // from wherever the manager sends it).
        let _ = stream.wait_for(|s| *s == StreamState::Ended).await;
    }
}

//! An assignment file on a node of the tree that can be served while it is still arriving.
//!
//! Bytes become visible to children only after their chunk passed its BLAKE3 check
//! ([`Blob::verified`] only grows, always to a chunk boundary or the end), so a pipelined tree
//! forwards nothing unverified and a resumed fetch (`Range: bytes=N-`) starts at `verified`.

use bytes::Bytes;
use http_body_util::{BodyExt, channel::Channel};
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_RANGE, RANGE};
use hyper::{Method, Response, StatusCode};
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::http::{Body, ClientError, JsonClient};
use crate::manifest::{Manifest, ManifestError};

/// Frames a served stream is cut into.
const FRAME: u64 = 256 << 10;

#[derive(Debug, Error)]
pub enum BlobError {
    #[error("assignment file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("fetching from {url}: connection broke at byte {at} of {size}: {why}")]
    Interrupted { url: String, at: u64, size: u64, why: String },
    #[error("fetching from {url}: no bytes for {after:?} at byte {at}")]
    Stalled { url: String, at: u64, after: Duration },
    #[error("fetching from {url}: chunk {index} failed its BLAKE3 check (corrupted in transit or at the source)")]
    Corrupt { url: String, index: u64 },
}

/// Shares one node's upload among all streams it serves (simulates a NIC's egress in benchmarks).
#[derive(Debug)]
pub struct Egress {
    bytes_per_sec: u64,
    next_free: Mutex<Instant>,
}

impl Egress {
    pub fn new(bytes_per_sec: u64) -> Arc<Egress> {
        Arc::new(Egress { bytes_per_sec: bytes_per_sec.max(1), next_free: Mutex::new(Instant::now()) })
    }

    /// Waits until `n` more bytes fit in the budget (virtual scheduling: reserve a slot, sleep to it).
    pub async fn take(&self, n: u64) {
        let cost = Duration::from_secs_f64(n as f64 / self.bytes_per_sec as f64);
        let until = {
            let mut next = self.next_free.lock().unwrap_or_else(|p| p.into_inner());
            let start = (*next).max(Instant::now());
            *next = start + cost;
            *next
        };
        tokio::time::sleep_until(until).await;
    }
}

/// How a stream to one child is going (read by the forwarder that serves that child).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamState {
    NotStarted,
    Streaming,
    Ended,
}

pub struct Blob {
    path: PathBuf,
    manifest: Manifest,
    file: Arc<std::fs::File>,
    verified: watch::Sender<u64>,
    /// Per child segment: the state of the stream it is pulling from this node.
    streams: Mutex<HashMap<String, watch::Sender<StreamState>>>,
    egress: Option<Arc<Egress>>,
}

impl Blob {
    /// A blob that is already whole on disk (the manager's copy). Its chunks are checked once here.
    pub fn complete(path: &Path, manifest: Manifest, egress: Option<Arc<Egress>>) -> Result<Arc<Blob>, BlobError> {
        manifest.validate()?;
        let on_disk = Manifest::of_file(path, manifest.chunk_size)?;
        if on_disk != manifest {
            return Err(ManifestError::Invalid("file on disk does not match its manifest").into());
        }
        let file = std::fs::File::open(path).map_err(|source| BlobError::Io { path: path.into(), source })?;
        let size = manifest.size;
        Ok(Arc::new(Blob::with(path, manifest, file, size, egress)))
    }

    /// An empty blob to be filled by [`Blob::fetch_from`].
    pub fn create(path: &Path, manifest: Manifest, egress: Option<Arc<Egress>>) -> Result<Arc<Blob>, BlobError> {
        manifest.validate()?;
        let io = |source| BlobError::Io { path: path.into(), source };
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path).map_err(io)?;
        file.set_len(manifest.size).map_err(io)?;
        Ok(Arc::new(Blob::with(path, manifest, file, 0, egress)))
    }

    fn with(path: &Path, manifest: Manifest, file: std::fs::File, verified: u64, egress: Option<Arc<Egress>>) -> Blob {
        Blob {
            path: path.to_path_buf(),
            manifest,
            file: Arc::new(file),
            verified: watch::Sender::new(verified),
            streams: Mutex::new(HashMap::new()),
            egress,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
    pub fn verified(&self) -> u64 {
        *self.verified.borrow()
    }
    pub fn is_complete(&self) -> bool {
        self.verified() == self.manifest.size
    }

    /// Waits until the whole blob is verified.
    pub async fn wait_complete(&self) {
        let mut rx = self.verified.subscribe();
        let size = self.manifest.size;
        let _ = rx.wait_for(|v| *v == size).await;
    }

    fn stream_state(&self, child: &str) -> watch::Sender<StreamState> {
        let mut m = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(child.to_string()).or_insert_with(|| watch::Sender::new(StreamState::NotStarted)).clone()
    }

    /// Forgets any earlier stream to `child` and returns a receiver for the next one.
    pub fn expect_stream(&self, child: &str) -> watch::Receiver<StreamState> {
        let s = self.stream_state(child);
        s.send_replace(StreamState::NotStarted);
        s.subscribe()
    }

    /// The HTTP response for a GET of this blob from `start` (a `Range: bytes=start-` or 0) for
    /// `child`: 206/200 and a body that follows `verified` until the end.
    pub fn serve(self: &Arc<Self>, start: Option<u64>, child: Option<String>) -> Response<Body> {
        let size = self.manifest.size;
        let from = start.unwrap_or(0);
        if from > size {
            return crate::http::error(StatusCode::RANGE_NOT_SATISFIABLE, &format!("range starts at {from}, size is {size}"));
        }
        let (mut tx, body) = Channel::<Bytes, std::io::Error>::new(4);
        let state = child.map(|c| self.stream_state(&c));
        let blob = self.clone();
        tokio::spawn(async move {
            if let Some(s) = &state {
                s.send_replace(StreamState::Streaming);
            }
            let mut pos = from;
            let mut verified = blob.verified.subscribe();
            while pos < size {
                let avail = *verified.borrow_and_update();
                if pos >= avail {
                    if verified.changed().await.is_err() {
                        break;
                    }
                    continue;
                }
                let n = (avail - pos).min(FRAME);
                if let Some(e) = &blob.egress {
                    e.take(n).await;
                }
                let file = blob.file.clone();
                let read = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; n as usize];
                    file.read_exact_at(&mut buf, pos).map(|_| buf)
                })
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)));
                match read {
                    Ok(buf) => {
                        if tx.send_data(Bytes::from(buf)).await.is_err() {
                            break; // the child hung up
                        }
                        pos += n;
                    }
                    Err(e) => {
                        tx.abort(e);
                        break;
                    }
                }
            }
            if let Some(s) = &state {
                s.send_replace(StreamState::Ended);
            }
        });
        let mut r = Response::new(body.boxed());
        r.headers_mut().insert(CONTENT_LENGTH, (size - from).into());
        if start.is_some() {
            *r.status_mut() = StatusCode::PARTIAL_CONTENT;
            let last = size.saturating_sub(1);
            if let Ok(v) = format!("bytes {from}-{last}/{size}").parse() {
                r.headers_mut().insert(CONTENT_RANGE, v);
            }
        }
        r
    }

    /// Appends one verified chunk at `verified`.
    async fn store_chunk(&self, index: u64, data: Vec<u8>) -> Result<(), BlobError> {
        let at = self.verified();
        let file = self.file.clone();
        let path = self.path.clone();
        let n = data.len() as u64;
        tokio::task::spawn_blocking(move || file.write_all_at(&data, at))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
            .map_err(|source| BlobError::Io { path, source })?;
        debug_assert_eq!(at, index * u64::from(self.manifest.chunk_size));
        self.verified.send_replace(at + n);
        Ok(())
    }

    /// Fetches the rest of the blob from `url` (resuming at `verified`), verifying each chunk
    /// before it becomes visible. `stall` bounds the wait for any byte.
    pub async fn fetch_from(&self, client: &JsonClient, url: &str, stall: Duration) -> Result<(), BlobError> {
        let size = self.manifest.size;
        let start = self.verified();
        if start == size {
            return Ok(());
        }
        let resp = client.send(Method::GET, url, None, &[(RANGE.as_str(), format!("bytes={start}-"))]).await?;
        let mut body: Incoming = resp.into_body();
        let chunk_size = u64::from(self.manifest.chunk_size);
        let mut index = start / chunk_size;
        let mut buf: Vec<u8> = Vec::with_capacity(self.manifest.chunk_len(index) as usize);
        let interrupted = |why: String| BlobError::Interrupted { url: url.into(), at: self.verified(), size, why };
        while self.verified() < size {
            let frame = match tokio::time::timeout(stall, body.frame()).await {
                Err(_) => return Err(BlobError::Stalled { url: url.into(), at: self.verified(), after: stall }),
                Ok(None) => return Err(interrupted("the stream ended early".into())),
                Ok(Some(Err(e))) => return Err(interrupted(e.to_string())),
                Ok(Some(Ok(f))) => f,
            };
            let Ok(mut data) = frame.into_data() else { continue };
            while !data.is_empty() {
                let want = self.manifest.chunk_len(index) as usize - buf.len();
                let take = want.min(data.len());
                buf.extend_from_slice(&data.split_to(take));
                if buf.len() as u64 == self.manifest.chunk_len(index) {
                    if self.manifest.verify_chunk(index, &buf).is_err() {
                        return Err(BlobError::Corrupt { url: url.into(), index });
                    }
                    let next_len = if index + 1 < self.manifest.chunk_count() { self.manifest.chunk_len(index + 1) } else { 0 };
                    let chunk = std::mem::replace(&mut buf, Vec::with_capacity(next_len as usize));
                    self.store_chunk(index, chunk).await?;
                    index += 1;
                    if index == self.manifest.chunk_count() && !data.is_empty() {
                        return Err(interrupted("the source sent more bytes than the manifest says".into()));
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn egress_spaces_out_bytes() {
        let e = Egress::new(1_000_000);
        let t0 = Instant::now();
        for _ in 0..5 {
            e.take(20_000).await;
        }
        // 100 kB at 1 MB/s is 100 ms of budget: the last take cannot end before it.
        assert!(t0.elapsed() >= Duration::from_millis(99));
    }
}

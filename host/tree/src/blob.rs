//! An assignment file on a node of the tree that can be served while it is still arriving.
//!
//! Bytes become visible to children only after their chunk passed its BLAKE3 check
//! ([`Blob::verified`] only grows, always to a chunk boundary or the end), so a pipelined tree
//! forwards nothing unverified and a resumed fetch (`Range: bytes=N-`) starts at `verified`.

use bytes::Bytes;
use http_body_util::{BodyExt, channel::Channel};
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_RANGE, RANGE};
use hyper::{Method, Request, Response, StatusCode};
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::http::{self, Body, ClientError, JsonClient};
use crate::manifest::{Manifest, ManifestError};

/// Frames a served stream read from disk is cut into.
const FRAME: u64 = 1 << 20;
/// Newest verified chunks a receiving node keeps in memory, as received: children a few chunks
/// behind (the usual case in a pipelined tree) are served from them without reading the file.
const WINDOW_CHUNKS: usize = 8;

/// One verified chunk in the in-memory window.
struct Held {
    at: u64,
    len: u64,
    pieces: Vec<Bytes>,
}

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
    #[error(
        "fetching from {url}: chunk {index} failed its BLAKE3 check (corrupted in transit or at the source)"
    )]
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
        Arc::new(Egress {
            bytes_per_sec: bytes_per_sec.max(1),
            next_free: Mutex::new(Instant::now()),
        })
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
    window: Mutex<std::collections::VecDeque<Held>>,
}

impl Blob {
    /// A blob that is already whole on disk (the manager's copy). Its chunks are checked once here.
    pub fn complete(
        path: &Path,
        manifest: Manifest,
        egress: Option<Arc<Egress>>,
    ) -> Result<Arc<Blob>, BlobError> {
        manifest.validate()?;
        let on_disk = Manifest::of_file(path, manifest.chunk_size)?;
        if on_disk != manifest {
            return Err(ManifestError::Invalid("file on disk does not match its manifest").into());
        }
        let file = std::fs::File::open(path)
            .map_err(|source| BlobError::Io { path: path.into(), source })?;
        let size = manifest.size;
        Ok(Arc::new(Blob::with(path, manifest, file, size, egress)))
    }

    /// An empty blob to be filled by [`Blob::fetch_from`].
    pub fn create(
        path: &Path,
        manifest: Manifest,
        egress: Option<Arc<Egress>>,
    ) -> Result<Arc<Blob>, BlobError> {
        manifest.validate()?;
        let io = |source| BlobError::Io { path: path.into(), source };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(io)?;
        file.set_len(manifest.size).map_err(io)?;
        Ok(Arc::new(Blob::with(path, manifest, file, 0, egress)))
    }

    fn with(
        path: &Path,
        manifest: Manifest,
        file: std::fs::File,
        verified: u64,
        egress: Option<Arc<Egress>>,
    ) -> Blob {
        Blob {
            path: path.to_path_buf(),
            manifest,
            file: Arc::new(file),
            verified: watch::Sender::new(verified),
            streams: Mutex::new(HashMap::new()),
            egress,
            window: Mutex::new(std::collections::VecDeque::new()),
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
        m.entry(child.to_string())
            .or_insert_with(|| watch::Sender::new(StreamState::NotStarted))
            .clone()
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
            return http::error(
                StatusCode::RANGE_NOT_SATISFIABLE,
                &format!("range starts at {from}, size is {size}"),
            );
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
                if let Some(pieces) = blob.window_from(pos) {
                    let mut hung_up = false;
                    for p in pieces {
                        let n = p.len() as u64;
                        if let Some(e) = &blob.egress {
                            e.take(n).await;
                        }
                        if tx.send_data(p).await.is_err() {
                            hung_up = true;
                            break;
                        }
                        pos += n;
                        crate::metrics::sent(n);
                    }
                    if hung_up {
                        break; // the child hung up
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
                        crate::metrics::sent(n);
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

    /// Appends one verified chunk at `verified`, given as the pieces it arrived in (written as
    /// they are, never copied into one buffer), and keeps it in the in-memory window.
    async fn store_chunk(&self, index: u64, pieces: Vec<Bytes>) -> Result<(), BlobError> {
        let at = self.verified();
        let file = self.file.clone();
        let path = self.path.clone();
        let n: u64 = pieces.iter().map(|p| p.len() as u64).sum();
        let pieces = tokio::task::spawn_blocking(move || {
            let mut pos = at;
            for p in &pieces {
                file.write_all_at(p, pos)?;
                pos += p.len() as u64;
            }
            Ok(pieces)
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        .map_err(|source| BlobError::Io { path, source })?;
        debug_assert_eq!(at, index * u64::from(self.manifest.chunk_size));
        {
            let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
            w.push_back(Held { at, len: n, pieces });
            while w.len() > WINDOW_CHUNKS {
                w.pop_front();
            }
        }
        self.verified.send_replace(at + n);
        Ok(())
    }

    /// The verified bytes from `pos` to the end of their chunk, if that chunk is still in the
    /// in-memory window: pieces shared with the receive path (no read, no copy).
    fn window_from(&self, pos: u64) -> Option<Vec<Bytes>> {
        let w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let held = w.iter().find(|h| h.at <= pos && pos < h.at + h.len)?;
        let mut skip = pos - held.at;
        let mut out = Vec::with_capacity(held.pieces.len());
        for p in &held.pieces {
            let len = p.len() as u64;
            if skip >= len {
                skip -= len;
                continue;
            }
            out.push(p.slice(skip as usize..));
            skip = 0;
        }
        Some(out)
    }

    /// Fetches the rest of the blob from `url` (resuming at `verified`), verifying each chunk
    /// before it becomes visible. `stall` bounds the wait for any byte.
    pub async fn fetch_from(
        &self,
        client: &JsonClient,
        url: &str,
        stall: Duration,
    ) -> Result<(), BlobError> {
        let size = self.manifest.size;
        let start = self.verified();
        if start == size {
            return Ok(());
        }
        let resp = client
            .send(Method::GET, url, None, &[(RANGE.as_str(), format!("bytes={start}-"))])
            .await?;
        let mut body: Incoming = resp.into_body();
        let chunk_size = u64::from(self.manifest.chunk_size);
        let mut index = start / chunk_size;
        // The chunk being received: its pieces as they came off the wire, hashed as they arrive.
        let mut pieces: Vec<Bytes> = Vec::new();
        let mut have = 0u64;
        let mut hasher = blake3::Hasher::new();
        let interrupted = |why: String| BlobError::Interrupted {
            url: url.into(),
            at: self.verified(),
            size,
            why,
        };
        while self.verified() < size {
            let frame = match tokio::time::timeout(stall, body.frame()).await {
                Err(_) => {
                    return Err(BlobError::Stalled {
                        url: url.into(),
                        at: self.verified(),
                        after: stall,
                    });
                }
                Ok(None) => return Err(interrupted("the stream ended early".into())),
                Ok(Some(Err(e))) => return Err(interrupted(e.to_string())),
                Ok(Some(Ok(f))) => f,
            };
            let Ok(mut data) = frame.into_data() else { continue };
            crate::metrics::received(data.len() as u64);
            while !data.is_empty() {
                let want = self.manifest.chunk_len(index) - have;
                let piece = data.split_to(want.min(data.len() as u64) as usize);
                hasher.update(&piece);
                have += piece.len() as u64;
                pieces.push(piece);
                if have == self.manifest.chunk_len(index) {
                    if self.manifest.verify_chunk_hash(index, have, &hasher.finalize()).is_err() {
                        return Err(BlobError::Corrupt { url: url.into(), index });
                    }
                    hasher.reset();
                    have = 0;
                    self.store_chunk(index, std::mem::take(&mut pieces)).await?;
                    index += 1;
                    if index == self.manifest.chunk_count() && !data.is_empty() {
                        return Err(interrupted(
                            "the source sent more bytes than the manifest says".into(),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Serves a blob GET: `Range: bytes=N-` resumes; `?from=<segment>` names the child pulling.
pub fn serve_blob(blob: &Arc<Blob>, req: &Request<Incoming>) -> Response<Body> {
    let start =
        match req.headers().get(RANGE).map(|v| v.to_str().ok().and_then(http::parse_range_start)) {
            None => None,
            Some(Some(s)) => Some(s),
            Some(None) => {
                return http::error(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    "only `Range: bytes=N-` is supported",
                );
            }
        };
    let child = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("from=")))
        .map(str::to_string);
    blob.serve(start, child)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn recent_chunks_are_served_from_memory_exactly_and_old_ones_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> =
            (0..(WINDOW_CHUNKS as u32 + 3) * 1000).map(|i| (i * 31 % 251) as u8).collect();
        let m = Manifest::of_bytes(&data, 1000);
        let blob = Blob::create(&dir.path().join("a"), m.clone(), None).unwrap();
        for i in 0..m.chunk_count() {
            let c = &data[(i * 1000) as usize..((i + 1) * 1000) as usize];
            // Arrived in three uneven pieces, as frames off the wire do.
            let pieces = vec![
                Bytes::copy_from_slice(&c[..7]),
                Bytes::copy_from_slice(&c[7..600]),
                Bytes::copy_from_slice(&c[600..]),
            ];
            blob.store_chunk(i, pieces).await.unwrap();
        }
        assert!(blob.is_complete());
        assert_eq!(
            std::fs::read(blob.path()).unwrap(),
            data,
            "the file holds every piece at its offset"
        );
        let first_held = (m.chunk_count() - WINDOW_CHUNKS as u64) * 1000;
        assert!(
            blob.window_from(first_held - 1).is_none(),
            "chunks beyond the window are read from the file"
        );
        for pos in
            [first_held, first_held + 5, first_held + 7, first_held + 650, data.len() as u64 - 1]
        {
            let got: Vec<u8> = blob.window_from(pos).unwrap().concat();
            let end = (pos / 1000 + 1) * 1000;
            assert_eq!(
                got,
                &data[pos as usize..end as usize],
                "from {pos} to the end of its chunk"
            );
        }
        assert!(blob.window_from(data.len() as u64).is_none());
    }

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

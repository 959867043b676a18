//! One hop of the tree against a misbehaving source: a connection that breaks mid-body resumes
//! with `Range` from the last verified chunk; a corrupted chunk is refused and never becomes visible.

use bytes::Bytes;
use cm_tree::blob::{Blob, BlobError, serve_blob};
use cm_tree::http::{self, JsonClient};
use cm_tree::manifest::Manifest;
use http_body_util::BodyExt;
use http_body_util::channel::Channel;
use hyper::Response;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;

const CHUNK: u32 = 16 << 10;

#[derive(Clone, Copy)]
enum Misbehave {
    /// Send this many bytes, then break the connection.
    BreakAfter(usize),
    /// Flip one bit at this offset.
    FlipAt(usize),
    Honest,
}

/// A source that serves `data` from the requested `Range`, misbehaving as told per request.
async fn source(
    data: Arc<Vec<u8>>,
    plan: Vec<Misbehave>,
) -> (String, Arc<Mutex<Vec<Option<u64>>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/blob", listener.local_addr().unwrap());
    let ranges = Arc::new(Mutex::new(Vec::new()));
    let seen = ranges.clone();
    tokio::spawn(http::serve(listener, move |req: hyper::Request<hyper::body::Incoming>| {
        let (data, plan, seen) = (data.clone(), plan.clone(), seen.clone());
        async move {
            let start = req
                .headers()
                .get("range")
                .and_then(|v| http::parse_range_start(v.to_str().unwrap()));
            let n = {
                let mut s = seen.lock().unwrap();
                s.push(start);
                s.len() - 1
            };
            let from = start.unwrap_or(0) as usize;
            let mut body = data[from..].to_vec();
            let (mut tx, ch) = Channel::<Bytes, std::io::Error>::new(2);
            let how = plan.get(n).copied().unwrap_or(Misbehave::Honest);
            if let Misbehave::FlipAt(at) = how {
                body[at - from] ^= 0x10;
            }
            tokio::spawn(async move {
                let cut = match how {
                    Misbehave::BreakAfter(k) => k.min(body.len()),
                    _ => body.len(),
                };
                for piece in body[..cut].chunks(5000) {
                    if tx.send_data(Bytes::copy_from_slice(piece)).await.is_err() {
                        return;
                    }
                }
                if cut < body.len() {
                    tx.abort(std::io::Error::other("connection cut by the test"));
                }
            });
            let mut r = Response::new(ch.boxed());
            if start.is_some() {
                *r.status_mut() = hyper::StatusCode::PARTIAL_CONTENT;
            }
            r
        }
    }));
    (url, ranges)
}

fn data(len: usize) -> Arc<Vec<u8>> {
    Arc::new((0..len).map(|i| (i * 31 % 251) as u8).collect())
}

#[tokio::test]
async fn a_broken_transfer_resumes_from_the_last_verified_chunk() {
    let d = data(10 * CHUNK as usize + 123);
    let manifest = Manifest::of_bytes(&d, CHUNK);
    // The first connection breaks in the middle of chunk 3.
    let (url, ranges) =
        source(d.clone(), vec![Misbehave::BreakAfter(3 * CHUNK as usize + 100)]).await;
    let dir = tempfile::tempdir().unwrap();
    let blob = Blob::create(&dir.path().join("a"), manifest, None).unwrap();
    let client = JsonClient::new("", Duration::from_secs(5));
    let err = blob.fetch_from(&client, &url, Duration::from_secs(5)).await.unwrap_err();
    // How much of the cut body arrives before the abort is up to the transport; what counts is
    // that only whole verified chunks are kept and the next request starts right after them.
    let at = blob.verified();
    assert!(matches!(err, BlobError::Interrupted { at: a, .. } if a == at), "{err}");
    assert!(
        at > 0 && at <= 3 * u64::from(CHUNK) && at.is_multiple_of(u64::from(CHUNK)),
        "verified {at}"
    );
    blob.fetch_from(&client, &url, Duration::from_secs(5)).await.unwrap();
    assert!(blob.is_complete());
    assert_eq!(*ranges.lock().unwrap(), vec![Some(0), Some(at)], "the second request resumes");
    assert_eq!(std::fs::read(dir.path().join("a")).unwrap(), *d);
}

#[tokio::test]
async fn a_corrupted_chunk_is_refused_and_refetched() {
    let d = data(6 * CHUNK as usize);
    let manifest = Manifest::of_bytes(&d, CHUNK);
    let (url, ranges) = source(d.clone(), vec![Misbehave::FlipAt(2 * CHUNK as usize + 7)]).await;
    let dir = tempfile::tempdir().unwrap();
    let blob = Blob::create(&dir.path().join("a"), manifest, None).unwrap();
    let client = JsonClient::new("", Duration::from_secs(5));
    let err = blob.fetch_from(&client, &url, Duration::from_secs(5)).await.unwrap_err();
    assert!(matches!(err, BlobError::Corrupt { index: 2, .. }), "{err}");
    assert_eq!(
        blob.verified(),
        2 * u64::from(CHUNK),
        "nothing of the bad chunk is visible to children"
    );
    blob.fetch_from(&client, &url, Duration::from_secs(5)).await.unwrap();
    assert_eq!(ranges.lock().unwrap()[1], Some(2 * u64::from(CHUNK)));
    assert_eq!(std::fs::read(dir.path().join("a")).unwrap(), *d);
}

#[tokio::test]
async fn a_source_that_stops_sending_is_a_stall_not_a_hang() {
    let d = data(4 * CHUNK as usize);
    let manifest = Manifest::of_bytes(&d, CHUNK);
    // A listener that accepts and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/blob", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            if let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let blob = Blob::create(&dir.path().join("a"), manifest, None).unwrap();
    let client = JsonClient::new("", Duration::from_millis(300));
    let err = blob.fetch_from(&client, &url, Duration::from_millis(300)).await.unwrap_err();
    assert!(matches!(err, BlobError::Client(_)), "{err}");
    assert_eq!(blob.verified(), 0);
}

#[tokio::test]
async fn a_blob_is_served_while_it_still_arrives() {
    // A node serves its child from a blob that is only partly verified; the child ends whole.
    let d = data(8 * CHUNK as usize + 5);
    let manifest = Manifest::of_bytes(&d, CHUNK);
    let (url, _) = source(d.clone(), vec![]).await;
    let dir = tempfile::tempdir().unwrap();
    let middle = Blob::create(&dir.path().join("middle"), manifest.clone(), None).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let middle_url = format!("http://{}/blob", listener.local_addr().unwrap());
    let served = middle.clone();
    tokio::spawn(http::serve(listener, move |req| {
        let b = served.clone();
        async move { serve_blob(&b, &req) }
    }));
    let child = Blob::create(&dir.path().join("child"), manifest, None).unwrap();
    let client = JsonClient::new("", Duration::from_secs(5));
    // The child starts first: it must wait for the middle's verified bytes, not fail.
    let c2 = client.clone();
    let child_fetch = tokio::spawn({
        let child = child.clone();
        async move { child.fetch_from(&c2, &middle_url, Duration::from_secs(5)).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(child.verified(), 0);
    middle.fetch_from(&client, &url, Duration::from_secs(5)).await.unwrap();
    child_fetch.await.unwrap().unwrap();
    assert_eq!(std::fs::read(dir.path().join("child")).unwrap(), *d);
}

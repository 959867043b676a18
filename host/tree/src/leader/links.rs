//! What a GL measures of its own links while it works, passively from its transfers: the last
//! whole fetch's rate, and everything sent to children over the time any child was pulling
//! ([`UploadMeter`]). [`LinkWatch`] reads them for the GL's discovery reports.

use http_body_util::BodyExt;
use hyper::Response;
use std::sync::{Arc, Mutex};

use super::lock;
use crate::http::Body;
use crate::link::{LinkRates, UploadMeter};

/// Transfers smaller than this are not timed: connection set-up and the pipeline's last chunk
/// would say more than the link.
const MIN_MEASURED_BYTES: u64 = 1 << 20;

/// What this GL measured of its links (see [`LinkRates`]).
pub(super) struct LinkMeasure {
    epoch: std::time::Instant,
    /// Everything sent to children, over the time any child was pulling.
    upload: UploadMeter,
    /// The last whole fetch's bytes/s.
    download: Option<u64>,
}

impl LinkMeasure {
    pub(super) fn new() -> Arc<Mutex<LinkMeasure>> {
        Arc::new(Mutex::new(LinkMeasure {
            epoch: std::time::Instant::now(),
            upload: UploadMeter::default(),
            download: None,
        }))
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// A whole fetch moved `bytes` in `micros`: its rate is the download figure, when it moved
    /// enough to say something of the link.
    pub(super) fn fetched(&mut self, bytes: u64, micros: u64) {
        if bytes >= MIN_MEASURED_BYTES {
            self.download = Some(LinkRates::rate(bytes, micros));
        }
    }
}

/// Reads a GL's measured link rates (for its discovery reports) while it runs.
#[derive(Clone)]
pub struct LinkWatch(pub(super) Arc<Mutex<LinkMeasure>>);

impl LinkWatch {
    /// `None` until the GL timed a fetch or a send of at least a MiB.
    pub fn rates(&self) -> Option<LinkRates> {
        let m = lock(&self.0);
        let upload = m.upload.rate(m.now(), MIN_MEASURED_BYTES);
        (upload.is_some() || m.download.is_some()).then(|| LinkRates {
            upload_bps: upload.unwrap_or(0),
            download_bps: m.download.unwrap_or(0),
        })
    }
}

/// Closes its child stream in the upload meter when the response body is dropped (sent or not).
struct OpenStream(Arc<Mutex<LinkMeasure>>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        let mut m = lock(&self.0);
        let now = m.now();
        m.upload.stream_closed(now);
    }
}

/// Counts a blob response's bytes in the upload meter as hyper sends them.
pub(super) fn metered(links: &Arc<Mutex<LinkMeasure>>, response: Response<Body>) -> Response<Body> {
    if !response.status().is_success() {
        return response;
    }
    {
        let mut m = lock(links);
        let now = m.now();
        m.upload.stream_opened(now);
    }
    let open = OpenStream(links.clone());
    response.map(move |body| {
        body.map_frame(move |frame| {
            if let Some(data) = frame.data_ref() {
                lock(&open.0).upload.sent(data.len() as u64);
            }
            frame
        })
        .boxed()
    })
}

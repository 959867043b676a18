//! The manager's event bus: typed events for every state change the operator watches (a job's
//! state, a run's phase and segments, a server's outcome in a run, a segment and its GL, a
//! server registered or gone, a site's releases, a history line), and their Server-Sent Events
//! stream (`GET /api/v1/events`, the console's `/console/events`).
//!
//! Events are published by the database layer ([`crate::db::Db::write`]) after the write
//! transaction that made the change has committed: every state change already is one
//! transaction, so nothing is missed and no event announces a state that was rolled back. A
//! subscriber that reads the store after an event sees at least that state.
//!
//! The bus is a `tokio::sync::broadcast`: publishing never waits for a subscriber. A subscriber
//! that falls more than [`CAPACITY`] events behind is told (`event: lagged`) and dropped; one
//! whose connection stops reading is dropped after [`SLOW_CLIENT`]. Each event is serialized
//! once, when somebody listens.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Frame;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};
use serde::Serialize;
use tokio::sync::{broadcast, mpsc};

use cm_tree::http::Body;

use crate::db::Db;
use crate::model::{
    HistoryEntry, HostedSite, Job, Run, RunPhase, SegmentRecord, SegmentStatus, ServerOutcome,
    ServerRecord,
};

/// Events a subscriber may fall behind by before it is dropped.
pub const CAPACITY: usize = 4096;
/// A keep-alive comment goes out after this long without an event (proxies close idle streams).
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// A client whose connection takes no bytes for this long is dropped.
pub const SLOW_CLIENT: Duration = Duration::from_secs(30);

/// One event: its kind (the SSE `event:` field), the run and job it concerns (for filters) and
/// its JSON object (the `data:` field), serialized once.
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: &'static str,
    pub run: Option<u64>,
    pub job: Option<u64>,
    pub data: Arc<str>,
}

/// A run as events carry it: everything but the chunk manifest (thousands of hashes), whose size
/// and hash stand for it.
#[derive(Debug, Serialize)]
pub struct RunSummary<'a> {
    pub id: u64,
    pub job: u64,
    pub started_ms: u64,
    pub deadline_ms: u64,
    #[serde(flatten)]
    pub phase: &'a RunPhase,
    pub serial: Option<u64>,
    pub release: Option<u64>,
    pub commit_of: Option<u64>,
    pub size: u64,
    pub blake3: &'a str,
    pub segments: Vec<SegmentSummary<'a>>,
}

#[derive(Debug, Serialize)]
pub struct SegmentSummary<'a> {
    pub segment: &'a str,
    pub leader: &'a str,
    pub status: SegmentStatus,
    pub servers: &'a [String],
}

impl<'a> RunSummary<'a> {
    pub fn of(r: &'a Run) -> RunSummary<'a> {
        RunSummary {
            id: r.id,
            job: r.job,
            started_ms: r.started_ms,
            deadline_ms: r.deadline_ms,
            phase: &r.phase,
            serial: r.serial,
            release: r.release,
            commit_of: r.commit_of,
            size: r.manifest.size,
            blake3: &r.manifest.blake3,
            segments: r
                .segments
                .iter()
                .map(|(name, s)| SegmentSummary {
                    segment: name,
                    leader: &s.leader,
                    status: s.status,
                    servers: &s.servers,
                })
                .collect(),
        }
    }
}

/// A server's outcome in a run (`event: report`).
#[derive(Debug, Serialize)]
struct ReportEvent<'a> {
    run: u64,
    server: &'a str,
    #[serde(flatten)]
    outcome: &'a ServerOutcome,
}

/// A change the database layer saw in a write transaction, turned into an [`Event`] once it
/// committed.
pub(crate) enum Change<'a> {
    Job(&'a Job),
    Run(&'a Run),
    Report(u64, &'a str, &'a ServerOutcome),
    Segment(&'a SegmentRecord),
    Server(&'a ServerRecord),
    Site(&'a HostedSite),
    History(&'a HistoryEntry),
}

fn event<T: Serialize>(kind: &'static str, run: Option<u64>, job: Option<u64>, v: &T) -> Event {
    let data = serde_json::to_string(v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    Event { kind, run, job, data: data.into() }
}

impl Change<'_> {
    pub(crate) fn event(&self) -> Event {
        match self {
            Change::Job(j) => {
                let run = match j.state {
                    crate::model::JobState::Running { run } => Some(run),
                    _ => None,
                };
                event("job", run, Some(j.id), j)
            }
            Change::Run(r) => event("run", Some(r.id), Some(r.job), &RunSummary::of(r)),
            Change::Report(run, server, outcome) => {
                event("report", Some(*run), None, &ReportEvent { run: *run, server, outcome })
            }
            Change::Segment(s) => event("segment", None, None, s),
            Change::Server(s) => event("server", None, None, s),
            Change::Site(s) => event("site", None, None, s),
            Change::History(h) => event("history", h.run, h.job, h),
        }
    }
}

/// The broadcast every write publishes to.
#[derive(Clone)]
pub struct Bus {
    tx: broadcast::Sender<Event>,
}

impl Default for Bus {
    fn default() -> Self {
        Bus { tx: broadcast::channel(CAPACITY).0 }
    }
}

impl Bus {
    /// Whether anybody listens (nothing is serialized otherwise).
    pub fn listened(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    /// Publishes without waiting; with nobody listening the event is dropped.
    pub fn publish(&self, e: Event) {
        let _ = self.tx.send(e);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }
}

/// Which events a stream carries (`?run=N`, `?job=N`; none: all).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub run: Option<u64>,
    pub job: Option<u64>,
    /// Runs of `job` seen so far: their reports belong to the job too.
    runs_of_job: BTreeSet<u64>,
}

/// A query string's filter, or what is wrong with it.
pub fn parse_filter(query: Option<&str>) -> Result<Filter, String> {
    let mut f = Filter::default();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let id = || v.parse::<u64>().map_err(|_| format!("events: `{k}={v}`: not an id"));
        match k {
            "run" => f.run = Some(id()?),
            "job" => f.job = Some(id()?),
            _ => return Err(format!("events: unknown parameter `{k}` (accepted: run, job)")),
        }
    }
    Ok(f)
}

impl Filter {
    pub fn run(run: u64) -> Filter {
        Filter { run: Some(run), ..Filter::default() }
    }

    /// Whether `e` passes (and, for a job filter, learns the job's runs from its run events).
    pub fn admits(&mut self, e: &Event) -> bool {
        if let Some(run) = self.run
            && e.run != Some(run)
        {
            return false;
        }
        if let Some(job) = self.job {
            if e.job == Some(job) {
                if let Some(r) = e.run {
                    self.runs_of_job.insert(r);
                }
                return true;
            }
            return e.job.is_none() && e.run.is_some_and(|r| self.runs_of_job.contains(&r));
        }
        true
    }
}

/// One SSE frame: `event: kind` and `data: json` (JSON has no raw newline, so one data line).
pub fn frame(e: &Event) -> Bytes {
    Bytes::from(format!("event: {}\ndata: {}\n\n", e.kind, e.data))
}

/// The body of a stream: frames pushed by the task that follows the bus. When the client goes,
/// hyper drops the body, the channel closes and the task ends.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

/// The state a stream starts with, sent before live events so a subscriber never misses what
/// happened before it connected: the run (and its reports so far) or the job it filters on.
fn snapshot(db: &Db, f: &Filter) -> Vec<Event> {
    let mut out = Vec::new();
    if let Some(id) = f.run
        && let Ok(Some(run)) = db.run(id)
    {
        out.push(Change::Run(&run).event());
        for (server, o) in db.reports(id).unwrap_or_default() {
            out.push(Change::Report(id, &server, &o).event());
        }
    }
    if let Some(id) = f.job
        && let Ok(Some(job)) = db.job(id)
    {
        out.push(Change::Job(&job).event());
    }
    out
}

/// `GET /api/v1/events`: subscribes first, then sends the snapshot, then every admitted event
/// as it is published, a keep-alive comment after [`KEEP_ALIVE`] of silence, and
/// `event: lagged` before dropping a subscriber that fell behind.
pub fn stream(db: &Db, mut filter: Filter) -> Response<Body> {
    let mut rx = db.events().subscribe();
    let first = snapshot(db, &filter);
    let (tx, body_rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let send = |b: Bytes| {
            let tx = tx.clone();
            async move { matches!(tokio::time::timeout(SLOW_CLIENT, tx.send(b)).await, Ok(Ok(()))) }
        };
        if !send(Bytes::from_static(b": content mover events\n\n")).await {
            return;
        }
        for e in &first {
            if filter.admits(e) && !send(frame(e)).await {
                return;
            }
        }
        loop {
            let next = tokio::time::timeout(KEEP_ALIVE, rx.recv()).await;
            let bytes = match next {
                Err(_) => Bytes::from_static(b": keep-alive\n\n"),
                Ok(Ok(e)) if filter.admits(&e) => frame(&e),
                Ok(Ok(_)) => continue,
                Ok(Err(broadcast::error::RecvError::Lagged(n))) => {
                    tracing::warn!("event stream subscriber fell {n} events behind: dropped");
                    let data = format!("{{\"missed\":{n}}}");
                    let lagged = Event { kind: "lagged", run: None, job: None, data: data.into() };
                    let _ = tx.try_send(frame(&lagged));
                    return;
                }
                Ok(Err(broadcast::error::RecvError::Closed)) => return,
            };
            if !send(bytes).await {
                return;
            }
        }
    });
    let mut r = Response::new(ChannelBody(body_rx).map_err(|never| match never {}).boxed());
    *r.status_mut() = StatusCode::OK;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{JobKind, JobSpec, JobState, Payload};

    fn spec() -> JobSpec {
        JobSpec {
            name: "p".into(),
            kind: JobKind::Publish,
            site: "s".into(),
            payload: Payload::Staging,
            start_at_ms: 0,
            every_ms: None,
            policy: Default::default(),
        }
    }

    #[test]
    fn filters_parse_and_refuse_junk() {
        assert_eq!(parse_filter(None).unwrap(), Filter::default());
        assert_eq!(parse_filter(Some("run=7")).unwrap(), Filter::run(7));
        assert_eq!(parse_filter(Some("job=3")).unwrap().job, Some(3));
        assert!(parse_filter(Some("run=x")).unwrap_err().contains("not an id"));
        assert!(parse_filter(Some("foo=1")).unwrap_err().contains("unknown parameter"));
    }

    #[test]
    fn job_filter_follows_the_jobs_runs() {
        let mut f = parse_filter(Some("job=3")).unwrap();
        let ev = |kind, run, job| Event { kind, run, job, data: "{}".into() };
        assert!(!f.admits(&ev("report", Some(9), None)), "run 9 not known to be job 3's yet");
        assert!(f.admits(&ev("run", Some(9), Some(3))));
        assert!(f.admits(&ev("report", Some(9), None)));
        assert!(!f.admits(&ev("run", Some(10), Some(4))));
        assert!(!f.admits(&ev("report", Some(10), None)));
        assert!(!f.admits(&ev("segment", None, None)));
        let mut r = Filter::run(9);
        assert!(r.admits(&ev("report", Some(9), None)));
        assert!(!r.admits(&ev("history", None, Some(3))));
    }

    #[tokio::test]
    async fn committed_writes_publish_and_rolled_back_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("m.redb")).unwrap();
        let mut rx = db.events().subscribe();
        let job = db
            .write(|t| {
                let j = t.insert_job(spec(), 5)?;
                t.log(5, Some(j.id), None, "created")?;
                Ok::<_, crate::db::DbError>(j)
            })
            .unwrap();
        let e = rx.recv().await.unwrap();
        assert_eq!((e.kind, e.job), ("job", Some(job.id)));
        let back: Job = serde_json::from_str(&e.data).unwrap();
        assert_eq!(back.state, JobState::Idle);
        let e = rx.recv().await.unwrap();
        assert_eq!(e.kind, "history");
        assert!(e.data.contains("created"));
        let failed: Result<(), crate::db::DbError> = db.write(|t| {
            t.log(6, None, None, "never")?;
            Err(crate::db::DbError::Encode(serde_json::from_str::<u8>("x").unwrap_err()))
        });
        assert!(failed.is_err());
        db.write(|t| t.put_report(4, "a<b>", &ServerOutcome::Succeeded)).unwrap();
        let e = rx.recv().await.unwrap();
        assert_eq!((e.kind, e.run), ("report", Some(4)), "the rolled-back line never came");
        let v: serde_json::Value = serde_json::from_str(&e.data).unwrap();
        assert_eq!(v["server"], "a<b>");
        assert_eq!(v["status"], "succeeded");
    }

    #[tokio::test]
    async fn a_lagging_subscriber_is_told_and_dropped_and_writers_never_wait() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("m.redb")).unwrap();
        let resp = stream(&db, Filter::default());
        // Nobody reads the body while the manager publishes far more than the bus holds.
        for i in 0..(CAPACITY as u64 + 200) {
            db.events().publish(Event {
                kind: "history",
                run: Some(i),
                job: None,
                data: "{}".into(),
            });
        }
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&body);
        assert!(text.ends_with("\n\n"));
        assert!(
            text.contains("event: lagged\ndata: {\"missed\":"),
            "{}",
            &text[text.len() - 200..]
        );
    }
}

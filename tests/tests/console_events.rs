//! The manager's event stream (`GET /api/v1/events`) with a real cluster: a publish shows its
//! job, runs, every server's report and the site's new live release as they happen; a new
//! server appears as it registers; a stream filtered on a finished run opens with its state;
//! no token, a wrong one or the agent's gets nothing. `cmover run show --follow` prints the
//! finished run and exits 0 (4 when the manager does not answer).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cm_manager::model::{JobKind, JobPolicy, OnFailure, Payload};
use cm_tests::cluster::{Layout, TestCluster};
use cm_tree::http::{ClientError, JsonClient};
use http_body_util::BodyExt;
use hyper::Method;
use hyper::body::Incoming;
use serde_json::Value;

/// An open event stream: events as (kind, data) in arrival order.
struct Stream {
    body: Incoming,
    buf: String,
}

impl Stream {
    async fn open(c: &JsonClient, url: &str) -> Result<Stream, ClientError> {
        let r = c.send(Method::GET, url, None, &[]).await?;
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        Ok(Stream { body: r.into_body(), buf: String::new() })
    }

    /// The next event (comments skipped), or an error after `limit`.
    async fn next(&mut self, limit: Duration) -> anyhow::Result<(String, Value)> {
        let end = Instant::now() + limit;
        loop {
            while let Some(i) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..i + 2).collect();
                let kind = block.lines().find_map(|l| l.strip_prefix("event: "));
                let data = block.lines().find_map(|l| l.strip_prefix("data: "));
                if let (Some(k), Some(d)) = (kind, data) {
                    return Ok((k.to_string(), serde_json::from_str(d)?));
                }
            }
            let left = end.saturating_duration_since(Instant::now());
            let frame = tokio::time::timeout(left, self.body.frame())
                .await
                .context("no event in time")?
                .context("stream ended")??;
            if let Ok(d) = frame.into_data() {
                self.buf += &String::from_utf8_lossy(&d);
            }
        }
    }

    /// Events until `done` says so (returns them all, the last one included).
    async fn until(
        &mut self,
        limit: Duration,
        done: impl Fn(&str, &Value) -> bool,
    ) -> anyhow::Result<Vec<(String, Value)>> {
        let end = Instant::now() + limit;
        let mut seen = Vec::new();
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let (k, v) = self.next(left).await.with_context(|| format!("after {seen:?}"))?;
            let stop = done(&k, &v);
            seen.push((k, v));
            if stop {
                return Ok(seen);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_publish_streams_as_it_happens() -> anyhow::Result<()> {
    let site = tempfile::tempdir()?;
    std::fs::write(site.path().join("index.html"), "<h1>hello</h1>")?;
    let mut c = TestCluster::start(&Layout::new(60, 2, 2), site.path()).await?;
    let events = c.url("events");

    for token in ["", "wrong", c.manager.agent_token.as_str()] {
        let bad = JsonClient::new(token, Duration::from_secs(5));
        match Stream::open(&bad, &events).await {
            Err(ClientError::Status { status, .. }) => assert!(status == 401 || status == 404),
            Err(e) => bail!("{e}"),
            Ok(_) => bail!("token {token:?} opened the event stream"),
        }
    }

    let mut all = Stream::open(&c.op, &events).await?;
    let policy = JobPolicy { on_failure: OnFailure::Cancel, ..JobPolicy::default() };
    let job = c.submit_with(JobKind::Publish, Payload::Staging, policy).await?;
    let seen = all
        .until(Duration::from_secs(60), |k, v| {
            k == "job"
                && v["id"] == job.id
                && v["state"]["state"] != "idle"
                && v["state"]["state"] != "running"
        })
        .await?;
    let (_, last) = seen.last().context("no events")?;
    assert_eq!(last["state"]["state"], "done", "{seen:?}\n{}", c.logs());

    // The commit run's end, its reports and the site's new live release may come just after
    // the job's end (one transaction's records, in its order; a run's record is written again
    // when its caches report): read on until all are in.
    let mut seen = seen;
    let servers = c.agents.len();
    let complete = |seen: &[(String, Value)]| {
        let site =
            seen.iter().any(|(k, v)| k == "site" && v["committed"] == serde_json::json!([1]));
        let runs = succeeded_runs(seen);
        let reported = |run: u64| {
            seen.iter()
                .filter(|(k, v)| k == "report" && v["run"] == run && v["status"] == "succeeded")
                .count()
                >= servers
        };
        site && runs.len() >= 2 && runs.iter().all(|r| reported(*r))
    };
    while !complete(&seen) {
        seen.push(
            all.next(Duration::from_secs(5)).await.with_context(|| format!("after {seen:?}"))?,
        );
    }
    let kinds: Vec<&str> = seen.iter().map(|(k, _)| k.as_str()).collect();
    for kind in ["job", "run", "report", "history", "site"] {
        assert!(kinds.contains(&kind), "no {kind} event in {kinds:?}");
    }
    let runs: Vec<&Value> = seen.iter().filter(|(k, _)| k == "run").map(|(_, v)| v).collect();
    assert!(runs.iter().any(|r| r["phase"] == "distributing"));
    let finished: Vec<u64> = succeeded_runs(&seen);
    assert_eq!(finished.len(), 2, "the distribution and its commit run: {runs:?}");
    assert!(runs.iter().all(|r| r.get("manifest").is_none()), "no chunk manifest in events");
    for run in &finished {
        let ok: Vec<&str> = seen
            .iter()
            .filter(|(k, v)| k == "report" && v["run"] == *run && v["status"] == "succeeded")
            .filter_map(|(_, v)| v["server"].as_str())
            .collect();
        assert_eq!(ok.len(), c.agents.len(), "run {run}: every server reported: {ok:?}");
    }

    // A stream on the finished commit run opens with its state and its reports.
    let mut one = Stream::open(&c.op, &format!("{events}?run={}", finished[1])).await?;
    let (k, v) = one.next(Duration::from_secs(5)).await?;
    assert_eq!((k.as_str(), &v["phase"]), ("run", &Value::from("succeeded")));
    for _ in 0..c.agents.len() {
        let (k, v) = one.next(Duration::from_secs(5)).await?;
        assert_eq!((k.as_str(), v["run"].as_u64()), ("report", Some(finished[1])));
    }
    let bad = c.op.send(Method::GET, &format!("{events}?run=x"), None, &[]).await;
    assert!(matches!(bad, Err(ClientError::Status { status, .. }) if status == 400));

    // `cmover run show --follow` on the finished run: its outcome, every server, exit 0; a
    // manager that does not answer: exit 4.
    let token_file = c.dir.path().join("secrets").join("operator.token");
    let show = |url: &str| {
        std::process::Command::new(cm_tests::cmover_bin())
            .args(["run", "show", &finished[1].to_string(), "--follow", "--manager", url])
            .arg("--token-file")
            .arg(&token_file)
            .output()
    };
    let out = show(&c.manager.url)?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("succeeded"), "{text}");
    for a in &c.agents {
        assert!(text.contains(&a.spec.name), "{text}");
    }
    let port = cm_agent::launch::free_port()?;
    assert_eq!(show(&format!("http://127.0.0.1:{port}"))?.status.code(), Some(4));

    // A new server appears on the stream as its GL registers it.
    c.add_agent(0, "seg0-new", 99)?;
    let seen =
        all.until(Duration::from_secs(30), |k, v| k == "server" && v["name"] == "seg0-new").await?;
    assert_eq!(seen.last().context("server event")?.1["live"], true);
    Ok(())
}

/// The runs seen succeeding, each once (a run's record is written again after it ended).
fn succeeded_runs(seen: &[(String, Value)]) -> Vec<u64> {
    let mut ids: Vec<u64> = seen
        .iter()
        .filter(|(k, v)| k == "run" && v["phase"] == "succeeded")
        .filter_map(|(_, v)| v["id"].as_u64())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

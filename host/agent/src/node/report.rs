//! Apply reports, both ends: a member sends its outcome for a run to whichever server is its
//! GL now (retrying across GL changes), and a GL keeps every report it gets on a
//! [`ReportBoard`] that its delivery waits on.
//!
//! The board takes reports for any run, even one this GL has not been notified of yet: after a
//! GL change, members that already applied the run report again (to the new GL), possibly
//! before the manager has re-notified it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use cm_tree::http::JsonClient;
use cm_tree::message::MemberApplyReport;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

/// Runs whose reports a board keeps (the oldest are dropped first).
const KEPT_RUNS: usize = 64;

/// A GL's apply reports by run, then by server.
#[derive(Default)]
pub struct ReportBoard {
    runs: Mutex<BTreeMap<u64, BTreeMap<String, MemberApplyReport>>>,
    changed: Notify,
}

impl ReportBoard {
    /// Records a report (a later one from the same server for the same run replaces it).
    pub fn insert(&self, r: MemberApplyReport) {
        let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        runs.entry(r.run).or_default().insert(r.server.clone(), r);
        while runs.len() > KEPT_RUNS {
            runs.pop_first();
        }
        drop(runs);
        self.changed.notify_waiters();
    }

    /// The reports of `run` so far.
    pub fn of(&self, run: u64) -> BTreeMap<String, MemberApplyReport> {
        self.runs.lock().unwrap_or_else(|p| p.into_inner()).get(&run).cloned().unwrap_or_default()
    }

    /// Waits until every server in `wanted` has reported on `run`, or `deadline`; returns what
    /// arrived (possibly from servers not in `wanted`).
    pub async fn wait_for(
        &self,
        run: u64,
        wanted: &BTreeSet<String>,
        deadline: Instant,
    ) -> BTreeMap<String, MemberApplyReport> {
        loop {
            let notified = self.changed.notified();
            let got = self.of(run);
            if wanted.iter().all(|s| got.contains_key(s)) || Instant::now() >= deadline {
                return got;
            }
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
    }
}

/// Calls the current GL (`gl` holds its base URL, `None` while no GL is known) until a call
/// succeeds, retrying on failure and following GL changes, for at most `give_up`.
pub(super) async fn with_current_gl<T, F, Fut>(
    mut gl: watch::Receiver<Option<String>>,
    give_up: Duration,
    what: &str,
    mut call: F,
) -> Option<T>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<T, cm_tree::http::ClientError>>,
{
    let deadline = Instant::now() + give_up;
    let mut attempt = 0u64;
    while Instant::now() < deadline {
        let url = gl.borrow_and_update().clone();
        let Some(url) = url else {
            // No GL known (an election is running): wait for one.
            let _ = tokio::time::timeout_at(deadline, gl.changed()).await;
            continue;
        };
        match call(url.clone()).await {
            Ok(v) => return Some(v),
            Err(e) => {
                attempt += 1;
                tracing::debug!(%url, "{what}: not yet: {e}");
                // A new GL address ends the wait early.
                let pause = Duration::from_millis(100 * attempt.min(10));
                let _ = tokio::time::timeout(pause, gl.changed()).await;
            }
        }
    }
    tracing::warn!("{what}: gave up after {give_up:?}");
    None
}

/// Member side: sends `report` to the current GL, retrying across GL changes for at most
/// `give_up`. Returns the GL's answer (`None`: not sent), which names the run's abort order
/// when the manager aborted it.
pub async fn send_to_gl(
    gl: watch::Receiver<Option<String>>,
    client: JsonClient,
    report: MemberApplyReport,
    give_up: Duration,
) -> Option<serde_json::Value> {
    let what = format!("apply report of run {}", report.run);
    with_current_gl(gl, give_up, &what, |url| {
        let (client, report) = (&client, &report);
        async move {
            client.post::<_, serde_json::Value>(&format!("{url}/members/report"), report).await
        }
    })
    .await
}

/// Member side: whether the current GL says `run` targets this server (`name`): the run's
/// `servers` (`GET /dist/{run}/servers`; empty = every member), or that it was aborted.
/// `None`: no GL said, within `give_up`.
pub async fn is_target(
    gl: watch::Receiver<Option<String>>,
    client: &JsonClient,
    run: u64,
    name: &str,
    give_up: Duration,
) -> Option<Target> {
    let what = format!("targets of run {run}");
    let answer = with_current_gl(gl, give_up, &what, |url| async move {
        match client.get::<serde_json::Value>(&format!("{url}/dist/{run}/servers")).await {
            // An aborted run: the GL's answer carries the manager's order (checked by the caller).
            Err(cm_tree::http::ClientError::Status { status, body, .. })
                if status.as_u16() == 410 =>
            {
                Ok(serde_json::from_str(&body).unwrap_or_default())
            }
            other => other,
        }
    })
    .await?;
    if let Some(order) = super::abort::order_in(&answer) {
        return Some(Target::Aborted(order));
    }
    let servers: Vec<&str> =
        answer["servers"].as_array()?.iter().filter_map(|s| s.as_str()).collect();
    if !(servers.is_empty() || servers.contains(&name)) {
        return Some(Target::No);
    }
    let aborted_before = match answer.get("aborted_before") {
        Some(v) => serde_json::from_value(v.clone()).unwrap_or_default(),
        None => Vec::new(),
    };
    let notification =
        answer.get("notification").and_then(|n| serde_json::from_value(n.clone()).ok());
    Some(Target::Yes { aborted_before, notification })
}

/// What a GL said about a run a member received.
pub enum Target {
    /// The run targets this server; the GL names the newest runs the manager aborted (orders
    /// not yet verified), whose prepared releases go before this run is applied.
    Yes {
        aborted_before: Vec<cm_tree::abort::AbortOrder>,
        /// The run's notification as the GL holds it (the manager signed it; not yet checked).
        notification: Option<Box<cm_tree::message::Notification>>,
    },
    /// It targets other servers of the segment.
    No,
    /// The manager aborted it (the order, not yet verified).
    Aborted(cm_tree::abort::AbortOrder),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rep(server: &str, run: u64) -> MemberApplyReport {
        MemberApplyReport {
            server: server.into(),
            node: 1,
            run,
            error: None,
            live: None,
            summary: String::new(),
            site: "www".into(),
        }
    }

    #[tokio::test]
    async fn wait_ends_when_everyone_reported_or_at_the_deadline() {
        let board = std::sync::Arc::new(ReportBoard::default());
        board.insert(rep("a", 7));
        let wanted: BTreeSet<String> = ["a".to_string(), "b".to_string()].into();
        let b2 = board.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            b2.insert(rep("b", 7));
        });
        let got = board.wait_for(7, &wanted, Instant::now() + Duration::from_secs(10)).await;
        assert_eq!(got.keys().collect::<Vec<_>>(), ["a", "b"]);
        let got = board.wait_for(8, &wanted, Instant::now() + Duration::from_millis(30)).await;
        assert!(got.is_empty());
    }

    #[test]
    fn old_runs_are_dropped() {
        let board = ReportBoard::default();
        for run in 0..(KEPT_RUNS as u64 + 5) {
            board.insert(rep("a", run));
        }
        assert!(board.of(0).is_empty());
        assert_eq!(board.of(KEPT_RUNS as u64 + 4).len(), 1);
    }
}

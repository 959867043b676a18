//! Job policies as pure functions: the quorum check before a run, whether a finished run
//! succeeded, and what a failure or success does to the job.

use std::collections::BTreeSet;
use std::fmt;

use crate::model::{JobPolicy, JobState, OnFailure, Quorum};

/// Servers a quorum over `total` targets needs: at least `min_servers` and `min_percent` of them
/// (rounded up), never more than `total` unless `min_servers` asks for it.
pub fn quorum_needed(q: Quorum, total: usize) -> usize {
    let by_percent = (total * usize::from(q.min_percent.min(100))).div_ceil(100);
    by_percent.max(q.min_servers as usize)
}

/// Why a run may not start: not enough live servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuorumShortfall {
    pub live: usize,
    pub needed: usize,
    pub total: usize,
    /// Targets that are not live (first few named in the reason).
    pub not_live: Vec<String>,
}

impl fmt::Display for QuorumShortfall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "quorum not met: {} of {} servers live, {} needed; not live: {}",
            self.live,
            self.total,
            self.needed,
            self.not_live.iter().take(8).cloned().collect::<Vec<_>>().join(", ")
        )?;
        if self.not_live.len() > 8 {
            write!(f, " and {} more", self.not_live.len() - 8)?;
        }
        Ok(())
    }
}

/// The quorum check before a run (seed: "defer or cancel the update if the required quorum is not met").
pub fn check_quorum(
    q: Quorum,
    targets: &[String],
    live: &BTreeSet<String>,
) -> Result<(), QuorumShortfall> {
    let not_live: Vec<String> = targets.iter().filter(|s| !live.contains(*s)).cloned().collect();
    let live_n = targets.len() - not_live.len();
    let needed = quorum_needed(q, targets.len());
    if live_n >= needed && !targets.is_empty() {
        Ok(())
    } else {
        Err(QuorumShortfall { live: live_n, needed, total: targets.len(), not_live })
    }
}

/// A run succeeded when at least the quorum of its targets reported success.
pub fn run_succeeded(q: Quorum, total: usize, succeeded: usize) -> bool {
    total > 0 && succeeded >= quorum_needed(q, total)
}

/// What the job becomes after a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextJobState {
    pub state: JobState,
    pub next_run_ms: u64,
    pub attempts: u32,
}

/// After a failed run (`attempts` runs so far since the last success, this one included).
pub fn after_failure(policy: &JobPolicy, attempts: u32, now_ms: u64, reason: &str) -> NextJobState {
    match policy.on_failure {
        OnFailure::Retry { max_attempts, delay_ms } if attempts < max_attempts => {
            NextJobState { state: JobState::Idle, next_run_ms: now_ms + delay_ms, attempts }
        }
        OnFailure::Retry { max_attempts, .. } => NextJobState {
            state: JobState::Cancelled {
                reason: format!("failed {max_attempts} times; last: {reason}"),
            },
            next_run_ms: now_ms,
            attempts,
        },
        OnFailure::Cancel => NextJobState {
            state: JobState::Cancelled { reason: format!("failed and policy cancels: {reason}") },
            next_run_ms: now_ms,
            attempts,
        },
    }
}

/// After a successful run: a recurring job waits for its next period, a one-off is done.
pub fn after_success(every_ms: Option<u64>, now_ms: u64) -> NextJobState {
    match every_ms {
        Some(every) => {
            NextJobState { state: JobState::Idle, next_run_ms: now_ms + every.max(1), attempts: 0 }
        }
        None => NextJobState { state: JobState::Done, next_run_ms: now_ms, attempts: 0 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn quorum_counts_percent_and_minimum() {
        let q = Quorum { min_percent: 75, min_servers: 2 };
        assert_eq!(quorum_needed(q, 4), 3);
        assert_eq!(quorum_needed(q, 1), 2);
        assert_eq!(quorum_needed(Quorum { min_percent: 50, min_servers: 0 }, 5), 3);
        let targets = names(&["a", "b", "c", "d"]);
        let live: BTreeSet<String> = names(&["a", "b", "c"]).into_iter().collect();
        assert!(check_quorum(q, &targets, &live).is_ok());
        let live: BTreeSet<String> = names(&["a", "b"]).into_iter().collect();
        let e = check_quorum(q, &targets, &live).unwrap_err();
        assert_eq!((e.live, e.needed, e.total), (2, 3, 4));
        assert_eq!(e.not_live, names(&["c", "d"]));
        assert!(e.to_string().contains("2 of 4 servers live, 3 needed; not live: c, d"), "{e}");
        assert!(
            check_quorum(Quorum { min_percent: 0, min_servers: 0 }, &[], &live).is_err(),
            "no targets never passes"
        );
    }

    #[test]
    fn failure_retries_then_cancels() {
        let mut p = JobPolicy {
            on_failure: OnFailure::Retry { max_attempts: 2, delay_ms: 100 },
            ..JobPolicy::default()
        };
        let n = after_failure(&p, 1, 1000, "x");
        assert_eq!((n.state, n.next_run_ms), (JobState::Idle, 1100));
        let n = after_failure(&p, 2, 1000, "disk full");
        assert!(matches!(&n.state, JobState::Cancelled { reason } if reason.contains("disk full")));
        p.on_failure = OnFailure::Cancel;
        assert!(matches!(after_failure(&p, 1, 0, "x").state, JobState::Cancelled { .. }));
        assert_eq!(after_success(Some(50), 10).next_run_ms, 60);
        assert_eq!(after_success(None, 10).state, JobState::Done);
        assert!(run_succeeded(Quorum { min_percent: 50, min_servers: 1 }, 4, 2));
        assert!(!run_succeeded(Quorum { min_percent: 51, min_servers: 1 }, 4, 2));
    }
}

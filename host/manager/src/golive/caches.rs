//! An all-at-once run that changed what is live ends its job only once the caches in front of
//! its servers are confirmed invalidated: the run's end writes a [`CacheWait`] on the job
//! (`runs.rs`), the GLs' reports are recorded on the run (`cache_report.rs`), and this tick
//! ends the job when none is left or `golive.cache_wait_ms` has passed, saying which in the
//! run's history.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::{CacheWait, CachesDone};
use crate::model::{HostedSite, JobState};
use crate::now_ms;
use crate::policy;
use crate::server::{Inner, ManagerError};

/// Default bound of a cache wait for a site without go-live settings.
const DEFAULT_CACHE_WAIT_MS: u64 = 30_000;

/// How long `site`'s runs wait for their cache reports.
pub fn cache_wait_ms(site: Option<&HostedSite>) -> u64 {
    site.and_then(|s| s.golive.as_ref()).map_or(DEFAULT_CACHE_WAIT_MS, |g| g.cache_wait_ms)
}

/// What a wait comes to now, given the segments that reported: `None` while it goes on, else
/// the history line ending it.
pub fn wait_outcome(
    wait: &CacheWait,
    now_ms: u64,
    limit_ms: u64,
    reported: &BTreeSet<String>,
) -> Option<String> {
    match wait.done(now_ms, limit_ms, reported) {
        CachesDone::Waiting => None,
        CachesDone::Yes => Some("caches confirmed by every segment's report".into()),
        CachesDone::TimedOut(silent) => Some(format!(
            "no cache report from segment {} within {limit_ms} ms: the job ends without it",
            silent.join(", ")
        )),
    }
}

impl Inner {
    /// Ends the jobs whose cache wait is over.
    pub(super) fn cache_wait_tick(self: &Arc<Self>) -> Result<(), ManagerError> {
        let now = now_ms();
        for job in self.db.jobs()? {
            if job.cache_wait.is_none() {
                continue;
            }
            self.db.write(|t| {
                let Some(mut j) = self.db.job(job.id)? else { return Ok::<_, ManagerError>(()) };
                let Some(wait) = j.cache_wait.clone() else { return Ok(()) };
                let limit = cache_wait_ms(self.db.site(&j.spec.site)?.as_ref());
                let reported =
                    self.db.run(wait.run)?.map(|r| r.caches_reported()).unwrap_or_default();
                let Some(line) = wait_outcome(&wait, now, limit, &reported) else {
                    return Ok(());
                };
                if let JobState::Running { run } = j.state
                    && run == wait.run
                {
                    let next = policy::after_success(j.spec.every_ms, now);
                    (j.state, j.next_run_ms, j.attempts) =
                        (next.state.clone(), next.next_run_ms, next.attempts);
                    let line = format!("{line}; job now {:?}", next.state);
                    t.log(now, Some(j.id), Some(wait.run), line)?;
                }
                j.cache_wait = None;
                t.put_job(&j)?;
                Ok(())
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_all_at_once_job_ends_on_the_last_report_or_the_bound() {
        let w = CacheWait { run: 3, since_ms: 0, segments: vec!["a".into(), "b".into()] };
        let mut reported = BTreeSet::new();
        assert_eq!(wait_outcome(&w, 10, 1_000, &reported), None);
        reported.insert("a".to_string());
        assert_eq!(wait_outcome(&w, 10, 1_000, &reported), None);
        let late = wait_outcome(&w, 1_000, 1_000, &reported).unwrap();
        assert!(late.contains("no cache report from segment b within 1000 ms"), "{late}");
        reported.insert("b".to_string());
        assert_eq!(
            wait_outcome(&w, 10, 1_000, &reported).unwrap(),
            "caches confirmed by every segment's report"
        );
    }
}

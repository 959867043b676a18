//! A GL's report of its segment's cache calls after a run that changed what is live
//! (`POST /api/v1/runs/{run}/caches`, agent credentials; `cm_tree::cache::CacheReport`): each
//! cache's outcome becomes a history line, e.g. "varnish on segment A: purged 37 paths in 1
//! batch".
//!
//! An agent's credentials can report, never command: the report only adds history lines, and
//! only for a run that carried a cache order, from the GL the run went to in that segment,
//! with bounded, plain names and one-line summaries of bounded length. A report also lets a
//! rolling switch's group waiting for it go back into rotation, and an all-at-once job end
//! (`golive::CacheWait`).

use cm_tree::cache::{CacheReport, one_line};

use crate::now_ms;
use crate::server::{Inner, ManagerError};

impl Inner {
    /// Records the report's outcomes in the history. `false`: ignored (the run has no cache
    /// order, or another GL leads the segment in the run).
    pub(crate) fn cache_report(
        &self,
        run_id: u64,
        report: &CacheReport,
    ) -> Result<bool, ManagerError> {
        report.check().map_err(|e| ManagerError::Invalid(e.to_string()))?;
        let run =
            self.db.run(run_id)?.ok_or_else(|| ManagerError::NotFound(format!("run {run_id}")))?;
        let seg = run.segments.get(&report.segment).ok_or_else(|| {
            ManagerError::Invalid(format!("segment {} is not in run {run_id}", report.segment))
        })?;
        if run.cache.is_none() || seg.leader != report.leader {
            return Ok(false);
        }
        let now = now_ms();
        self.db.write(|t| {
            for c in &report.caches {
                let verdict = if c.ok { "" } else { "FAILED: " };
                let line = format!(
                    "cache {} on segment {}: {verdict}{}",
                    c.cache,
                    report.segment,
                    one_line(&c.summary)
                );
                t.log(now, Some(run.job), Some(run_id), line)?;
            }
            // A rolling switch's group waits for its segments' reports before its undrain: the
            // run keeps who reported (the report may come before the group's run is ended, or
            // while a roll step works from an older read of the job).
            if let Some(mut fresh) = self.db.run(run_id)?
                && let Some(seg) = fresh.segments.get_mut(&report.segment)
                && !seg.caches_reported
            {
                seg.caches_reported = true;
                t.put_run(&fresh)?;
            }
            Ok::<_, ManagerError>(())
        })?;
        self.wake.notify_one();
        Ok(true)
    }
}

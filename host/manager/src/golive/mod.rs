//! Go-live: how a release becomes live on a site's servers when a load balancer stands in
//! front of them (issue 17 §1, §3). Spec: `docs/manager.md` ("Go-live").
//!
//! - [`settings`]: the policies (`all-at-once`, `rolling`, `canary`), a site's `golive`
//!   settings (load-balancer plugin, pool, each server's address, the health check) and the
//!   [`Roll`] record a rolling switch keeps in its job.
//! - `roll.rs`: the roll, group by group: drain through the load-balancer plugin → wait until
//!   the balancer reports it draining, then the drain grace → switch that group only (a run
//!   naming its servers) → health check → undrain; a group that fails its check goes back to
//!   the release it had and stays drained. Every step is written before it is acted on.
//! - `caches.rs`: an all-at-once job ends once its segments' caches reported (bounded).
//! - `balancer.rs`: the load-balancer plugin from the manager's own plugin store.
//! - `health.rs`: the health check (configured paths, BLAKE3 against the release's snapshot).
//! - `hot.rs`: the site's hot pool holds exactly the servers with hot content live.
//! - `rules.rs` + `trigger.rs`: rules that start hot content from the balancer's request
//!   rates (the decision sans-IO, the polling and the job start apart).
//! - `rotation.rs`: rotation follows health — servers behind, failed or silent are drained,
//!   and undrained once they caught up, at most once per interval.

mod balancer;
mod caches;
mod health;
mod hot;
mod roll;
mod rotation;
mod rules;
mod settings;
mod trigger;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

pub use balancer::{Balancer, BalancerError, DrainWait, sessions_wait, store_dir};
pub use caches::{cache_wait_ms, wait_outcome};
pub use hot::{HotStep, hot_routes, hot_steps};
pub use roll::policy_of;
pub use rotation::Rotated;
pub use rules::{HotRule, HotStart, HotTrigger, check_rules, content_path};
pub use settings::{
    CacheWait, CachesDone, GoLive, GoLivePolicy, GroupSize, HealthCheck, OnHealthFailure, Pause,
    Roll, RollStep, check, groups,
};

use crate::model::Job;
use crate::server::{Inner, ManagerError};
use crate::writes::WriteError;

/// What go-live holds in memory: which jobs' rolls have a step being worked on (a restart
/// forgets it, and the next tick picks each roll up again), and rotation's last pass.
#[derive(Default)]
pub struct GoLiveState {
    busy: Mutex<BTreeSet<u64>>,
    rotation: Mutex<rotation::Pass>,
    /// Sites whose hot holders changed: their balancer is told on the next tick (`hot.rs`).
    hot_due: Mutex<BTreeSet<String>>,
    /// Per site with hot rules: what the rules remember, and the polls (`trigger.rs`).
    hot_rules: Mutex<BTreeMap<String, RulesPoll>>,
}

#[derive(Default)]
struct RulesPoll {
    trigger: HotTrigger,
    last_ms: Option<u64>,
    running: bool,
}

impl GoLiveState {
    /// Marks `job`'s roll as being worked on; `false` if it already is.
    fn claim(&self, job: u64) -> bool {
        self.busy.lock().unwrap_or_else(|p| p.into_inner()).insert(job)
    }

    fn release(&self, job: u64) {
        self.busy.lock().unwrap_or_else(|p| p.into_inner()).remove(&job);
    }

    /// Marks `site`'s hot holders as changed.
    pub(crate) fn hot_changed(&self, site: &str) {
        self.hot_due.lock().unwrap_or_else(|p| p.into_inner()).insert(site.to_string());
    }

    /// Claims `site`'s next poll of its balancer's rates if one is due (none running, the
    /// last at least `every_ms` ago).
    fn claim_poll(&self, site: &str, now_ms: u64, every_ms: u64) -> bool {
        let mut all = self.hot_rules.lock().unwrap_or_else(|p| p.into_inner());
        let p = all.entry(site.to_string()).or_default();
        if p.running || p.last_ms.is_some_and(|l| now_ms < l.saturating_add(every_ms)) {
            return false;
        }
        (p.running, p.last_ms) = (true, Some(now_ms));
        true
    }

    fn poll_done(&self, site: &str) {
        let mut all = self.hot_rules.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = all.get_mut(site) {
            p.running = false;
        }
    }

    fn with_trigger<R>(&self, site: &str, f: impl FnOnce(&mut HotTrigger) -> R) -> R {
        let mut all = self.hot_rules.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut all.entry(site.to_string()).or_default().trigger)
    }

    fn take_hot_due(&self) -> BTreeSet<String> {
        std::mem::take(&mut *self.hot_due.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// `POST /api/v1/jobs/{id}/approve`: an operator lets a canary go on after its first group.
/// Refused unless the job has a canary roll in progress.
pub fn approve(db: &crate::db::Db, id: u64, by: &str, now: u64) -> Result<Job, WriteError> {
    db.write(|t| {
        let mut j = db.job(id)?.ok_or_else(|| ManagerError::NotFound(format!("no job {id}")))?;
        let Some(roll) = j.roll.as_mut().filter(|r| !r.ended()) else {
            return Err(ManagerError::Invalid(format!(
                "job {id} has no rolling switch in progress to approve"
            ))
            .into());
        };
        if !matches!(roll.policy, GoLivePolicy::Canary { .. }) {
            return Err(ManagerError::Invalid(format!(
                "job {id} rolls out by policy `{}`, which has no pause to approve",
                roll.policy.name()
            ))
            .into());
        }
        roll.approved = true;
        t.put_job(&j)?;
        t.log(now, Some(id), None, format!("canary approved by {by}: the rest goes live"))?;
        Ok(j)
    })
}

impl Inner {
    /// An abort of a job whose roll is in progress: the roll stops where it is, the servers it
    /// switched go back to the release live before, and every server returns to rotation
    /// (`roll.rs`). `None`: the job has no roll in progress (a plain abort applies).
    pub(crate) fn abort_roll(
        &self,
        id: u64,
        by: &str,
        now: u64,
    ) -> Result<Option<Job>, ManagerError> {
        let job = self.db.write(|t| {
            let Some(mut j) = self.db.job(id)? else { return Ok::<_, ManagerError>(None) };
            let Some(roll) = j.roll.as_mut().filter(|r| !r.ended()) else { return Ok(None) };
            if roll.aborted.is_none() {
                roll.aborted = Some(by.to_string());
                t.put_job(&j)?;
                t.log(
                    now,
                    Some(id),
                    None,
                    format!(
                        "roll aborted by {by}: switched servers go back to the release live before"
                    ),
                )?;
            }
            Ok(Some(j))
        })?;
        self.wake.notify_one();
        Ok(job)
    }
}

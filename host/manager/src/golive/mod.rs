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
//! - `balancer.rs`: the load-balancer plugin from the manager's own plugin store.
//! - `health.rs`: the health check (configured paths, BLAKE3 against the release's snapshot).
//! - `hot.rs`: the site's hot pool holds exactly the servers with hot content live.
//! - `rotation.rs`: rotation follows health — servers behind, failed or silent are drained,
//!   and undrained once they caught up, at most once per interval.

mod balancer;
mod health;
mod hot;
mod roll;
mod rotation;
mod settings;

use std::collections::BTreeSet;
use std::sync::Mutex;

pub use balancer::{Balancer, BalancerError, store_dir};
pub use hot::{HotStep, hot_steps};
pub use roll::policy_of;
pub use rotation::Rotated;
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

//! A rolling or canary switch, step by step. Every step is written to the job record
//! (`Job::roll`) before the next is acted on, so a manager restart resumes where it was: the
//! scheduler loop calls [`Inner::golive_tick`], which hands each roll not waiting for a run to
//! one task at a time ([`GoLiveState::busy`]). Steps are safe to repeat (drain, undrain and a
//! health check again change nothing); a group's run is a normal run of the job, resumed like
//! any other after a restart, and its end comes back here ([`Inner::roll_run_ended`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cm_assignment::AssignmentType;

use super::balancer::{Balancer, DrainWait};
use super::settings::{
    CacheWait, CachesDone, GoLive, GoLivePolicy, OnHealthFailure, Pause, Roll, RollStep, groups,
};
use crate::model::{Job, JobKind, JobState, Payload, Run, RunPhase, ServerOutcome};
use crate::runs::Launch;
use crate::server::{Inner, ManagerError};
use crate::{now_ms, policy, prepare};

/// The policy a job's switch follows: the job's own, else its site's, else all at once.
pub fn policy_of(job: &Job, site: Option<&GoLive>) -> GoLivePolicy {
    job.spec.policy.go_live.or(site.map(|g| g.policy)).unwrap_or_default()
}

/// A job's roll that has not ended.
fn rolling(job: &Job) -> Option<&Roll> {
    job.roll.as_ref().filter(|r| !r.ended())
}

impl Inner {
    /// Called by `start_run`: takes the job over when its switch rolls (returns `true`), or
    /// defers it while another job of the same site is rolling.
    pub(crate) fn start_roll(self: Arc<Self>, job: &Job, now: u64) -> Result<bool, ManagerError> {
        let other_rolling = self
            .db
            .jobs()?
            .into_iter()
            .find(|j| j.id != job.id && j.spec.site == job.spec.site && rolling(j).is_some());
        if let Some(other) = other_rolling {
            let mut j = job.clone();
            j.next_run_ms = now + 1_000;
            let why = format!(
                "queued: job {} is rolling a release out on site {}",
                other.id, job.spec.site
            );
            self.db.write(|t| {
                if j.last_reason.as_deref() != Some(why.as_str()) {
                    t.log(now, Some(j.id), None, why.clone())?;
                }
                j.last_reason = Some(why.clone());
                t.put_job(&j)
            })?;
            return Ok(true);
        }
        let Some(site) = self.db.site(&job.spec.site)? else { return Ok(false) };
        let policy = policy_of(job, site.golive.as_ref());
        if policy == GoLivePolicy::AllAtOnce {
            return Ok(false);
        }
        let targets = self.targets(job)?;
        let (payload, release, servers) = match (&job.pending_commit, &job.spec.payload) {
            (Some(pc), _) => (
                Payload::Commit { serial: Some(pc.release) },
                pc.release,
                targets.iter().filter(|s| pc.holders.contains(s)).cloned().collect::<Vec<_>>(),
            ),
            (None, Payload::Commit { serial }) => {
                let Some(r) = serial.or(site.prepared) else { return Ok(false) };
                (Payload::Commit { serial: Some(r) }, r, targets.clone())
            }
            (None, Payload::Switch { serial }) => {
                (job.spec.payload.clone(), *serial, targets.clone())
            }
            (None, Payload::Rollback { to }) => {
                let n = site.committed.len();
                let Some(back) = to.or_else(|| n.checked_sub(2).map(|i| site.committed[i])) else {
                    return Ok(false);
                };
                (job.spec.payload.clone(), back, targets.clone())
            }
            _ => return Ok(false),
        };
        let live: std::collections::BTreeSet<String> =
            self.live_servers(now)?.into_keys().filter(|s| servers.contains(s)).collect();
        if let Err(short) = policy::check_quorum(job.spec.policy.quorum, &targets, &live) {
            self.blocked(
                job,
                job.spec.policy.on_quorum_shortfall,
                format!("{short} for the roll"),
                now,
            )?;
            return Ok(true);
        }
        let roll = Roll {
            policy,
            payload,
            release,
            previous: site.live(),
            groups: groups(policy, &servers),
            current: 0,
            step: RollStep::Drain,
            approved: false,
            live: Vec::new(),
            failed: BTreeMap::new(),
            aborted: None,
            caches: None,
        };
        let line = format!(
            "{} switch to release {release} of site {}: {} groups ({})",
            policy.name(),
            site.name,
            roll.groups.len(),
            roll.groups.iter().map(|g| g.join(" ")).collect::<Vec<_>>().join(" | ")
        );
        self.db.write(|t| {
            let mut j = job.clone();
            j.state = JobState::Running {
                run: j.pending_commit.as_ref().map_or(0, |p| p.distributed_by),
            };
            j.attempts += 1;
            j.last_reason = None;
            j.roll = Some(roll.clone());
            t.put_job(&j)?;
            t.log(now, Some(j.id), None, line.clone())
        })?;
        self.wake.notify_one();
        Ok(true)
    }

    /// One scheduler pass over the rolls: each one not waiting for a run and not already being
    /// worked on gets a task for its next step.
    pub(crate) fn golive_tick(self: &Arc<Self>) -> Result<(), ManagerError> {
        for job in self.db.jobs()? {
            let Some(roll) = rolling(&job) else { continue };
            if !matches!(job.state, JobState::Running { .. }) || roll.waits_for().is_some() {
                continue;
            }
            if !self.golive.claim(job.id) {
                continue;
            }
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me.clone().roll_step(job.id).await {
                    tracing::error!(job = job.id, "go-live: {e}");
                    let _ = me.db.write(|t| {
                        t.log(
                            now_ms(),
                            Some(job.id),
                            None,
                            format!("go-live step failed (retried): {e}"),
                        )
                    });
                }
                me.golive.release(job.id);
            });
        }
        self.hot_rules_tick()?;
        self.cache_wait_tick()?;
        self.rotation_tick()
    }

    /// Does the roll's current step and writes the next.
    async fn roll_step(self: Arc<Self>, job_id: u64) -> Result<(), ManagerError> {
        let Some(job) = self.db.job(job_id)? else { return Ok(()) };
        let Some(mut roll) = rolling(&job).cloned() else { return Ok(()) };
        let site = self
            .db
            .site(&job.spec.site)?
            .ok_or_else(|| ManagerError::NotFound(format!("hosted site {}", job.spec.site)))?;
        let settings = site.golive.clone().unwrap_or_else(|| GoLive {
            policy: roll.policy,
            ..serde_json::from_value(serde_json::json!({})).expect("every field has a default")
        });
        let group: Vec<String> = roll.groups.get(roll.current).cloned().unwrap_or_default();
        let label = format!("group {}/{}", roll.current + 1, roll.groups.len());
        let now = now_ms();
        let mut lines = Vec::new();
        if let Some(by) = roll.aborted.clone() {
            // Aborted: whatever switched goes back, then everyone returns to rotation.
            let mut back = std::mem::take(&mut roll.live);
            if let RollStep::Check { switched } = &roll.step {
                back.extend(switched.iter().cloned());
            }
            match roll.step {
                RollStep::Drain
                | RollStep::Switch { run: None }
                | RollStep::Check { .. }
                | RollStep::Pause { .. } => {
                    lines.push(format!(
                        "roll aborted by {by}: switching back {}",
                        if back.is_empty() { "no server".into() } else { back.join(", ") }
                    ));
                    roll.step = match roll.previous {
                        Some(_) if !back.is_empty() => RollStep::Back { servers: back, run: None },
                        _ => RollStep::Undrain,
                    };
                    return self.save_roll(&job, roll, lines, now);
                }
                _ => roll.live = back,
            }
        }
        match roll.step.clone() {
            RollStep::Drain => {
                if let Some(lb) = settings.load_balancer.clone() {
                    let failures = self.balance(&settings, &lb, &group, true).await;
                    for (s, why) in &failures {
                        roll.failed.insert(s.clone(), format!("not drained: {why}"));
                    }
                    lines.push(format!(
                        "{label} drained through `{lb}`: {}{}",
                        group.join(", "),
                        fails(&failures)
                    ));
                    // Sessions already on the drained servers end (or their grace passes).
                    let drained: Vec<String> =
                        group.iter().filter(|s| !roll.failed.contains_key(*s)).cloned().collect();
                    if !drained.is_empty() {
                        let wait = self.drain_wait(&settings, &lb, &drained).await;
                        lines.push(format!("{label} drained: {wait}"));
                    }
                }
                roll.step = RollStep::Switch { run: None };
            }
            RollStep::Switch { run: None } => {
                let servers: Vec<String> =
                    group.iter().filter(|s| !roll.failed.contains_key(*s)).cloned().collect();
                if servers.is_empty() {
                    roll.step = RollStep::Undrain;
                } else {
                    return self.roll_run(job, roll, servers, false);
                }
            }
            RollStep::Check { switched } => {
                let snapshot = prepare::snapshot_dir(&self.cfg.data_dir, &site.name, roll.release);
                let mut bad = Vec::new();
                for s in &switched {
                    let verdict = match settings.servers.get(s) {
                        _ if settings.health.paths.is_empty() => Ok(()),
                        Some(address) => {
                            super::health::check(&settings.health, &snapshot, s, address).await
                        }
                        None => Err(format!("{s}: no address in the site's golive.servers")),
                    };
                    match verdict {
                        Ok(()) => roll.live.push(s.clone()),
                        Err(why) => {
                            roll.failed.insert(s.clone(), format!("health check failed: {why}"));
                            bad.push(s.clone());
                        }
                    }
                }
                lines.push(format!(
                    "{label} health check: {} of {} healthy{}",
                    switched.len() - bad.len(),
                    switched.len(),
                    if bad.is_empty() {
                        String::new()
                    } else {
                        format!("; failed: {}", bad.join(", "))
                    }
                ));
                roll.step = match (bad.is_empty(), roll.previous) {
                    (false, Some(_)) => RollStep::Back { servers: bad, run: None },
                    _ => RollStep::Undrain,
                };
            }
            RollStep::Back { servers, run: None } => {
                return self.roll_run(job, roll, servers, true);
            }
            RollStep::Undrain => {
                // A cache in front of the group must not serve its old release once it is back
                // in rotation: wait (bounded) for the GLs' reports that the caches heard.
                if let Some(wait) = roll.caches.take().filter(|_| roll.aborted.is_none()) {
                    // Who reported is on the run (`cache_report.rs`), the one record a report
                    // writes: the roll read here may be older than the report.
                    let reported =
                        self.db.run(wait.run)?.map(|r| r.caches_reported()).unwrap_or_default();
                    match wait.done(now, settings.cache_wait_ms, &reported) {
                        CachesDone::Yes => {}
                        CachesDone::Waiting => return Ok(()),
                        CachesDone::TimedOut(silent) => lines.push(format!(
                            "{label}: no cache report from segment {} within {} ms; back in rotation anyway",
                            silent.join(", "),
                            settings.cache_wait_ms
                        )),
                    }
                }
                // After an abort every group comes back (they all hold the release live before).
                let group = if roll.aborted.is_some() { roll.groups.concat() } else { group };
                let healthy: Vec<String> =
                    group.iter().filter(|s| !roll.failed.contains_key(*s)).cloned().collect();
                if let Some(lb) = settings.load_balancer.clone() {
                    let failures = self.balance(&settings, &lb, &healthy, false).await;
                    lines.push(format!(
                        "{label} back in rotation: {}{}{}",
                        if healthy.is_empty() { "none".into() } else { healthy.join(", ") },
                        fails(&failures),
                        left_drained(&group, &roll.failed)
                    ));
                }
                let group_failed = group.iter().any(|s| roll.failed.contains_key(s));
                roll.current += 1;
                roll.step = if let Some(by) = &roll.aborted {
                    RollStep::Ended { stopped: Some(format!("aborted by {by}")) }
                } else if group_failed && roll.policy.on_health_failure() == OnHealthFailure::Stop {
                    RollStep::Ended {
                        stopped: Some(format!("{label} failed; the policy stops the roll")),
                    }
                } else if roll.current >= roll.groups.len() {
                    RollStep::Ended { stopped: None }
                } else if matches!(roll.policy, GoLivePolicy::Canary { .. }) && roll.current == 1 {
                    lines.push("canary group done: pausing".into());
                    RollStep::Pause { since_ms: now }
                } else {
                    RollStep::Drain
                };
            }
            RollStep::Pause { since_ms } => {
                let GoLivePolicy::Canary { pause, .. } = roll.policy else {
                    roll.step = RollStep::Drain;
                    return self.save_roll(&job, roll, lines, now);
                };
                let go = match pause {
                    Pause::Approval => roll.approved,
                    Pause::Timer { ms } => roll.approved || now >= since_ms + ms,
                };
                if !go {
                    return Ok(());
                }
                lines.push(
                    if roll.approved {
                        "pause approved: the rest follows"
                    } else {
                        "pause over: the rest follows"
                    }
                    .into(),
                );
                roll.step = RollStep::Drain;
            }
            // Waiting for a run, or ended: nothing to do here.
            RollStep::Switch { run: Some(_) }
            | RollStep::Back { run: Some(_), .. }
            | RollStep::Ended { .. } => {
                return Ok(());
            }
        }
        self.save_roll(&job, roll, lines, now)
    }

    /// Drains (or undrains) `servers` through plugin `lb`; returns the failures.
    async fn balance(
        &self,
        settings: &GoLive,
        lb: &str,
        servers: &[String],
        drain: bool,
    ) -> Vec<(String, String)> {
        let (data, lb, pool) = (self.cfg.data_dir.clone(), lb.to_string(), settings.pool.clone());
        let (servers, timeout) =
            (servers.to_vec(), Duration::from_millis(settings.drain_timeout_ms));
        let done = tokio::task::spawn_blocking(move || {
            let b = match Balancer::open(&data, &lb) {
                Ok(b) => b,
                Err(e) => return servers.iter().map(|s| (s.clone(), e.to_string())).collect(),
            };
            let mut failures = Vec::new();
            for s in &servers {
                let name = format!("{pool}/{s}");
                let r = if drain { b.drain_and_wait(&name, timeout) } else { b.undrain(&name) };
                if let Err(e) = r {
                    failures.push((s.clone(), e.to_string()));
                }
            }
            failures
        })
        .await;
        done.unwrap_or_else(|e| vec![("*".into(), format!("balancer task: {e}"))])
    }

    /// Waits until the drained `servers` hold no session, at most `drain_grace_ms`; a balancer
    /// that cannot count sessions gets the whole grace.
    async fn drain_wait(&self, settings: &GoLive, lb: &str, servers: &[String]) -> DrainWait {
        let (data, lb) = (self.cfg.data_dir.clone(), lb.to_string());
        let names: Vec<String> = servers.iter().map(|s| format!("{}/{s}", settings.pool)).collect();
        let grace = Duration::from_millis(settings.drain_grace_ms);
        let grace_ms = settings.drain_grace_ms;
        let start = Instant::now();
        let wait = tokio::task::spawn_blocking(move || match Balancer::open(&data, &lb) {
            Ok(b) => b.wait_sessions(&names, grace),
            Err(e) => DrainWait::Uncounted { why: e.to_string(), grace_ms },
        })
        .await
        .unwrap_or_else(|e| DrainWait::Uncounted { why: format!("balancer task: {e}"), grace_ms });
        if matches!(wait, DrainWait::Uncounted { .. }) {
            tokio::time::sleep(grace.saturating_sub(start.elapsed())).await;
        }
        wait
    }

    /// Writes the roll's next step (ending it when it ended) with its history lines.
    fn save_roll(
        &self,
        job: &Job,
        roll: Roll,
        lines: Vec<String>,
        now: u64,
    ) -> Result<(), ManagerError> {
        if let RollStep::Ended { stopped } = &roll.step {
            return self.end_roll(job, roll.clone(), stopped.clone(), lines, now);
        }
        self.db.write(|t| {
            let j = self.with_roll(job, roll.clone())?;
            t.put_job(&j)?;
            for l in &lines {
                t.log(now, Some(j.id), None, l.clone())?;
            }
            Ok::<_, ManagerError>(())
        })?;
        self.wake.notify_one();
        Ok(())
    }

    /// Starts a group's run: the roll's switch to `servers`, or (`back`) the switch of servers
    /// that failed their check back to the release live before. The run and the roll's step
    /// naming it are one transaction (`launch`).
    fn roll_run(
        self: Arc<Self>,
        job: Job,
        mut roll: Roll,
        servers: Vec<String>,
        back: bool,
    ) -> Result<(), ManagerError> {
        let now = now_ms();
        let mut site = self
            .db
            .site(&job.spec.site)?
            .ok_or_else(|| ManagerError::NotFound(format!("hosted site {}", job.spec.site)))?;
        let run_id = self.db.write(|t| t.next_run_id())?;
        let copy = self.run_file(run_id);
        let ctx = prepare::Context {
            data_dir: &self.cfg.data_dir,
            seal: self.cfg.seal.as_ref(),
            signer: self.cfg.signer.as_ref(),
        };
        let serial = site.serial + 1;
        let mut prepared = match (back, roll.previous) {
            (true, Some(previous)) => prepare::switching(
                AssignmentType::Switch,
                previous,
                serial,
                job.id,
                &site,
                ctx,
                &copy,
                format!(
                    "switch of site {} back to release {previous} (failed health check)",
                    site.name
                ),
            )?,
            _ => {
                let kind = match roll.payload {
                    Payload::Commit { .. } => JobKind::Commit,
                    Payload::Switch { .. } => JobKind::Switch,
                    _ => JobKind::Rollback,
                };
                prepare::prepare(&roll.payload, kind, &site, serial, job.id, ctx, &copy)?
            }
        };
        if let Some(s) = prepared.serial {
            site.serial = site.serial.max(s);
        }
        prepared.release =
            Some(if back { roll.previous.unwrap_or(roll.release) } else { roll.release });
        roll.step = if back {
            RollStep::Back { servers: servers.clone(), run: Some(run_id) }
        } else {
            RollStep::Switch { run: Some(run_id) }
        };
        let mut j = job.clone();
        j.roll = Some(roll);
        let commit_of = match (&j.pending_commit, back) {
            (Some(pc), false) => Some(pc.distributed_by),
            _ => None,
        };
        // The group's caches hear what changes between live and the release it switches to.
        let cache = prepared
            .release
            .and_then(|to| crate::live_change::cache_order(&self.cfg.data_dir, &site, to));
        let live = self.live_servers(now)?;
        // Every server of the group counts; the roll's quorum was checked when it started.
        let quorum = crate::model::Quorum { min_percent: 0, min_servers: 0 };
        self.launch(
            Launch {
                job: &j,
                run_id,
                targets: servers.clone(),
                recipients: servers,
                outcomes: Vec::new(),
                prepared,
                commit_of,
                site,
                quorum,
                cache,
            },
            &live,
            now,
        )
    }

    /// A group's run ended (called by `finish`): the outcome is recorded and the roll moves on
    /// — to the health check after a switch, to undraining after a switch back.
    pub(crate) fn roll_run_ended(
        &self,
        run: &Run,
        forced: Option<String>,
        job: Job,
    ) -> Result<(), ManagerError> {
        let now = now_ms();
        let Some(mut roll) = job.roll.clone() else { return Ok(()) };
        let mut reports: BTreeMap<String, ServerOutcome> =
            self.db.reports(run.id)?.into_iter().collect();
        let ok: Vec<String> = reports
            .iter()
            .filter(|(_, o)| **o == ServerOutcome::Succeeded)
            .map(|(s, _)| s.clone())
            .collect();
        let label = format!("group {}/{}", roll.current + 1, roll.groups.len());
        // The run's targets: the group (less servers not drained), or those switched back.
        // Targets that never got it (not live, no space) are reported already.
        let targets: Vec<String> = match &roll.step {
            RollStep::Back { servers, .. } => servers.clone(),
            _ => roll
                .groups
                .get(roll.current)
                .into_iter()
                .flatten()
                .filter(|s| !roll.failed.contains_key(*s))
                .cloned()
                .collect(),
        };
        let mut failed_now = Vec::new();
        for s in &targets {
            let outcome = reports.entry(s.clone()).or_insert(ServerOutcome::Missing);
            if *outcome != ServerOutcome::Succeeded {
                let why = match outcome {
                    ServerOutcome::Failed { reason } => reason.clone(),
                    _ => "did not report".into(),
                };
                failed_now.push((s.clone(), why));
            }
        }
        let verdict = match &forced {
            Some(f) => format!("{label} run ended: {f}"),
            None => format!("{label} run ended: {} of {} switched", ok.len(), targets.len()),
        };
        let switched = matches!(roll.step, RollStep::Switch { .. });
        roll.step = match roll.step {
            RollStep::Switch { .. } => {
                for (s, why) in &failed_now {
                    roll.failed
                        .entry(s.clone())
                        .or_insert_with(|| format!("did not switch: {why}"));
                }
                RollStep::Check {
                    switched: ok.iter().filter(|s| targets.contains(s)).cloned().collect(),
                }
            }
            _ => {
                for (s, why) in &failed_now {
                    match roll.failed.get_mut(s) {
                        Some(f) => f.push_str(&format!("; switching back failed too: {why}")),
                        None => {
                            roll.failed.insert(s.clone(), format!("switching back failed: {why}"));
                        }
                    }
                }
                RollStep::Undrain
            }
        };
        let ended = self.db.write(|t| {
            let Some(fresh) = self.db.run(run.id)? else { return Ok::<_, ManagerError>(true) };
            if fresh.phase != RunPhase::Distributing {
                return Ok(true);
            }
            let mut roll = roll.clone();
            if switched {
                // The segments whose servers switched tell their caches; the group's undrain
                // waits for their reports (`cache_report.rs`), which the run records.
                roll.caches = fresh.cache.as_ref().map(|_| CacheWait {
                    run: run.id,
                    since_ms: now,
                    segments: fresh
                        .segments
                        .iter()
                        .filter(|(_, seg)| seg.servers.iter().any(|s| ok.contains(s)))
                        .map(|(name, _)| name.clone())
                        .collect(),
                });
            }
            for s in &targets {
                if let Some(o) = reports.get(s) {
                    t.put_report(run.id, s, o)?;
                }
            }
            let mut r = run.clone();
            for (name, seg) in &mut r.segments {
                seg.caches_reported |= fresh.segments.get(name).is_some_and(|f| f.caches_reported);
            }
            r.phase = match (&forced, failed_now.is_empty()) {
                (None, true) => RunPhase::Succeeded,
                (Some(f), _) => RunPhase::Failed { reason: f.clone() },
                (None, false) => RunPhase::Failed {
                    reason: format!(
                        "{} of {} servers did not switch",
                        failed_now.len(),
                        targets.len()
                    ),
                },
            };
            t.put_run(&r)?;
            let j = self.with_roll(&job, roll.clone())?;
            t.put_job(&j)?;
            t.log(now, Some(j.id), Some(run.id), verdict.clone())?;
            Ok(false)
        })?;
        if !ended {
            crate::metrics::run_ended(run, job.spec.kind, failed_now.is_empty(), now);
            let _ = std::fs::remove_file(self.run_file(run.id));
            self.wake.notify_one();
        }
        Ok(())
    }

    /// The job as stored now, with `roll` (worked out from an earlier read) in it. Read inside
    /// the writing transaction: what an operator said meanwhile (an abort, an approval) is kept,
    /// not overwritten by the step that was under way.
    fn with_roll(&self, job: &Job, mut roll: Roll) -> Result<Job, ManagerError> {
        let mut j = self.db.job(job.id)?.unwrap_or_else(|| job.clone());
        if let Some(stored) = &j.roll {
            roll.keep_operator_inputs(stored);
        }
        j.roll = Some(roll);
        Ok(j)
    }

    /// Ends a roll: one transaction records where every server is, the site's release (when
    /// every group was done) and the job's end.
    fn end_roll(
        &self,
        job: &Job,
        mut roll: Roll,
        stopped: Option<String>,
        mut lines: Vec<String>,
        now: u64,
    ) -> Result<(), ManagerError> {
        roll.step = RollStep::Ended { stopped: stopped.clone() };
        let summary = format!(
            "release {} live on {}{}",
            roll.release,
            if roll.live.is_empty() { "no server".into() } else { roll.live.join(", ") },
            left_drained(&roll.groups.concat(), &roll.failed)
        );
        self.db.write(|t| {
            if let Some(mut site) = self.db.site(&job.spec.site)? {
                if stopped.is_none() && !roll.live.is_empty() {
                    prepare::after_success(&roll.payload, &mut site, None, &roll.live);
                } else {
                    for s in &roll.live {
                        site.holders.insert(s.clone(), roll.release);
                    }
                }
                if let Some(previous) = roll.previous {
                    for s in roll.failed.keys() {
                        site.holders.entry(s.clone()).or_insert(previous);
                    }
                }
                super::rotation::left_drained(&mut site, &roll.failed, now);
                t.put_site(&site)?;
            }
            let mut j = self.with_roll(job, roll.clone())?;
            let next = match &stopped {
                None => policy::after_success(j.spec.every_ms, now),
                Some(why) => policy::NextJobState {
                    state: JobState::Cancelled { reason: format!("{why}: {summary}") },
                    next_run_ms: now,
                    attempts: j.attempts,
                },
            };
            (j.state, j.next_run_ms, j.attempts) = (next.state, next.next_run_ms, next.attempts);
            j.last_reason = (!roll.failed.is_empty()).then(|| summary.clone());
            j.pending_commit = None;
            t.put_job(&j)?;
            lines.push(format!(
                "{} switch ended{}: {summary}",
                roll.policy.name(),
                stopped.as_deref().map(|s| format!(" early ({s})")).unwrap_or_default()
            ));
            for l in &lines {
                t.log(now, Some(j.id), None, l.clone())?;
            }
            Ok::<_, ManagerError>(())
        })?;
        Ok(())
    }
}

fn fails(failures: &[(String, String)]) -> String {
    if failures.is_empty() {
        return String::new();
    }
    let list: Vec<String> = failures.iter().map(|(s, w)| format!("{s} ({w})")).collect();
    format!("; failed: {}", list.join(", "))
}

fn left_drained(group: &[String], failed: &BTreeMap<String, String>) -> String {
    let list: Vec<String> =
        group.iter().filter_map(|s| failed.get(s).map(|w| format!("{s} ({w})"))).collect();
    if list.is_empty() { String::new() } else { format!("; left drained: {}", list.join(", ")) }
}

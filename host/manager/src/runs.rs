//! A job's runs from start to outcome: the quorum check, the assignment, the disk space, the run
//! record; then, once every segment reported, the outcome per policy. A distribution run that
//! builds a release and meets its quorum is followed by the job's commit run (`CommitPolicy::Auto`):
//! the job stays the same, its next run (started on the next tick, before any other job of the
//! site) sends the commit assignment to the servers that hold the release. A run that falls short
//! never commits; the job is retried or cancelled per its policy.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use cm_tree::manifest::Manifest;

use crate::model::{
    CommitPolicy, Job, JobKind, JobState, OnBlocked, Payload, PendingCommit, Run, RunPhase,
    SegmentRun, SegmentStatus, ServerOutcome,
};
use crate::server::{Inner, ManagerError};
use crate::space::SpaceGate;
use crate::{now_ms, policy, prepare};

/// What a new run distributes and to whom, before it is written down.
pub(crate) struct Launch<'a> {
    pub job: &'a Job,
    pub run_id: u64,
    /// Servers the run's outcome is counted over (the quorum's total).
    pub targets: Vec<String>,
    /// Servers the assignment goes to, if live and their segment has the space.
    pub recipients: Vec<String>,
    /// Outcomes known before the run starts (targets that are not recipients).
    pub outcomes: Vec<(String, ServerOutcome)>,
    pub prepared: prepare::Prepared,
    pub commit_of: Option<u64>,
    pub site: crate::model::HostedSite,
    /// The quorum checked once segments short of space are left out (a roll's group run
    /// checks its whole roll's quorum before, `golive/`).
    pub quorum: crate::model::Quorum,
    /// What the caches are told once it is committed (`live_change.rs`).
    pub cache: Option<cm_tree::cache::CacheOrder>,
}

impl Inner {
    /// Starts the job's next run: its commit run when a release is waiting for one, else a
    /// distribution of its payload.
    pub(crate) fn start_run(self: Arc<Self>, mut job: Job, now: u64) -> Result<(), ManagerError> {
        if let Payload::CreateCheckpoint { note } = &job.spec.payload {
            // No assignment, no servers: the checkpoint is written off the scheduler's thread.
            return self.clone().checkpoint_job(job.clone(), note.clone(), now);
        }
        // A rolling or canary switch, or another job of a site whose roll is under way.
        if self.clone().start_roll(&job, now)? {
            return Ok(());
        }
        if job.pending_commit.is_none()
            && (self.staging_unchanged(&job, now)?
                || self.nothing_to_synchronize(&job, now)?
                || self.still_waiting_for_space(&job, now)?)
        {
            return Ok(());
        }
        if matches!(job.spec.payload, Payload::CatchUp { .. }) {
            self.commit_only(&mut job, now)?;
        }
        let hot_count = match &job.spec.payload {
            Payload::Hot { servers, count: Some(n), .. } if servers.is_empty() => Some(*n),
            _ => None,
        };
        if let Some(n) = hot_count
            && !self.pick_hot_servers(&mut job, n, now)?
        {
            return Ok(());
        }
        let targets = self.targets(&job)?;
        let live = self.live_servers(now)?;
        let live_names: BTreeSet<String> = live.keys().cloned().collect();
        let quorum = job.spec.policy.quorum;
        // A commit goes only to servers holding the release; the quorum still counts the group.
        let (recipients, outcomes): (Vec<String>, Vec<(String, ServerOutcome)>) =
            match &job.pending_commit {
                Some(pc) => {
                    let lacking = targets
                        .iter()
                        .filter(|s| !pc.holders.contains(s))
                        .map(|s| {
                            let why = format!(
                                "does not hold release {} (run {} did not build it there)",
                                pc.release, pc.distributed_by
                            );
                            (s.clone(), ServerOutcome::Failed { reason: why })
                        })
                        .collect();
                    (pc.holders.iter().filter(|s| targets.contains(s)).cloned().collect(), lacking)
                }
                None => (targets.clone(), Vec::new()),
            };
        let reachable: BTreeSet<String> =
            recipients.iter().filter(|s| live_names.contains(*s)).cloned().collect();
        if let Err(short) = policy::check_quorum(quorum, &targets, &reachable) {
            let what = if job.pending_commit.is_some() { " for the commit" } else { "" };
            return self.blocked(
                &job,
                job.spec.policy.on_quorum_shortfall,
                format!("{short}{what}"),
                now,
            );
        }
        let mut site = self
            .db
            .site(&job.spec.site)?
            .ok_or_else(|| ManagerError::NotFound(format!("hosted site {}", job.spec.site)))?;
        let run_id = self.db.write(|t| t.next_run_id())?;
        let copy = self.run_file(run_id);
        let (payload, kind, commit_of) = match &job.pending_commit {
            Some(pc) => (
                Payload::Commit { serial: Some(pc.release) },
                JobKind::Commit,
                Some(pc.distributed_by),
            ),
            None => (job.spec.payload.clone(), job.spec.kind, None),
        };
        let ctx = prepare::Context {
            data_dir: &self.cfg.data_dir,
            seal: self.cfg.seal.as_ref(),
            signer: self.cfg.signer.as_ref(),
        };
        let mut prepared = match &payload {
            Payload::Checkpoint { id } => {
                let cp = self.db.checkpoint(&site.name, *id)?.ok_or_else(|| {
                    ManagerError::NotFound(format!("checkpoint {id} of site {}", site.name))
                })?;
                crate::checkpoint::prepare_restore(&cp, &site, site.serial + 1, job.id, ctx, &copy)?
            }
            Payload::CatchUp { .. } => self.prepare_catch_up(&job, &site, ctx, &copy)?,
            _ => prepare::prepare(&payload, kind, &site, site.serial + 1, job.id, ctx, &copy)?,
        };
        if self.built_nothing_new(&job, &site, prepared.release, &copy, now)? {
            return Ok(());
        }
        if let Some(s) = prepared.serial {
            site.serial = site.serial.max(s);
        }
        if let Some(pc) = &job.pending_commit {
            prepared.release = Some(pc.release);
        }
        let cache = crate::live_change::new_live(&payload, &site, &self.cfg.data_dir)
            .and_then(|to| crate::live_change::cache_order(&self.cfg.data_dir, &site, to));
        self.launch(
            Launch {
                job: &job,
                run_id,
                targets,
                recipients,
                outcomes,
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

    /// Groups the recipients by segment, checks their space (`space.rs`: short servers are left
    /// out, waited for, or fail the run, per the job's policy), checks the quorum again, writes
    /// the run and starts distributing it.
    pub(crate) fn launch(
        self: Arc<Self>,
        l: Launch<'_>,
        live: &BTreeMap<String, String>,
        now: u64,
    ) -> Result<(), ManagerError> {
        let Launch {
            job,
            run_id,
            targets,
            recipients,
            mut outcomes,
            prepared,
            commit_of,
            site,
            quorum,
            cache,
        } = l;
        let copy = self.run_file(run_id);
        let manifest = Manifest::of_file(&copy, self.cfg.chunk_size)?;
        let need = crate::space::need_of(&copy).map_err(|e| {
            ManagerError::Invalid(format!("run {run_id}: reading its assignment's space need: {e}"))
        })?;
        let mut segments: BTreeMap<String, SegmentRun> = BTreeMap::new();
        for server in &recipients {
            let Some(seg) = live.get(server) else {
                outcomes.push((server.clone(), ServerOutcome::Missing));
                continue;
            };
            let Some(rec) = self.db.segment(seg)? else { continue };
            segments
                .entry(seg.clone())
                .or_insert_with(|| SegmentRun {
                    leader: rec.leader.clone(),
                    address: rec.address.clone(),
                    status: SegmentStatus::Pending,
                    servers: vec![],
                    caches_reported: false,
                })
                .servers
                .push(server.clone());
        }
        let mut run = Run {
            id: run_id,
            job: job.id,
            started_ms: now,
            deadline_ms: now + job.spec.policy.run_timeout_ms,
            phase: RunPhase::Distributing,
            serial: prepared.serial,
            release: prepared.release,
            commit_of,
            cache,
            manifest,
            disk_needed: need.bytes,
            segments,
        };
        // Servers short of the space the run needs are named before any byte moves (`space.rs`).
        if self.check_space(job, &mut run, &mut outcomes, need, now)? == SpaceGate::Stop {
            let _ = std::fs::remove_file(&copy);
            return Ok(());
        }
        let eligible: BTreeSet<String> =
            run.segments.values().flat_map(|s| s.servers.iter().cloned()).collect();
        if let Err(short) = policy::check_quorum(quorum, &targets, &eligible) {
            let _ = std::fs::remove_file(&copy);
            return self.blocked(
                job,
                job.spec.policy.on_quorum_shortfall,
                format!("{short} (after leaving out servers short of space)"),
                now,
            );
        }
        self.db.write(|t| {
            let mut j = job.clone();
            // A roll's run: an abort or approval made while the assignment was built is kept.
            if let (Some(roll), Some(stored)) =
                (j.roll.as_mut(), self.db.job(job.id)?.and_then(|s| s.roll))
            {
                roll.keep_operator_inputs(&stored);
            }
            j.state = JobState::Running { run: run_id };
            j.attempts += 1;
            j.last_reason = None;
            j.space_wait = None;
            t.put_job(&j)?;
            t.put_run(&run)?;
            t.put_site(&site)?;
            t.log(
                now,
                Some(job.id),
                Some(run_id),
                format!("assignment prepared: {}", prepared.summary),
            )?;
            for (s, o) in &outcomes {
                t.put_report(run_id, s, o)?;
            }
            let what = if commit_of.is_some() { "commit run started" } else { "run started" };
            t.log(
                now,
                Some(job.id),
                Some(run_id),
                format!(
                    "{what}: {} bytes (blake3 {}), {} segments, {} of {} servers",
                    run.manifest.size,
                    &run.manifest.blake3[..16],
                    run.segments.len(),
                    eligible.len(),
                    targets.len()
                ),
            )
        })?;
        self.resume(run)
    }

    /// A job blocked before it started (quorum): deferred or cancelled per policy.
    pub(crate) fn blocked(
        &self,
        job: &Job,
        on: OnBlocked,
        reason: String,
        now: u64,
    ) -> Result<(), ManagerError> {
        match on {
            OnBlocked::Queue => self.db.write(|t| {
                let mut j = job.clone();
                j.next_run_ms = now + j.spec.policy.defer_ms;
                j.last_reason = Some(format!("deferred: {reason}"));
                t.put_job(&j)?;
                t.log(now, Some(j.id), None, format!("deferred: {reason}"))
            })?,
            OnBlocked::Cancel => self.set_state(job, JobState::Cancelled { reason }, now)?,
        }
        Ok(())
    }

    /// Counts the outcome, records it and moves the job on per its policy: a distribution that
    /// met its quorum hands its release to the commit run; a commit that met it makes the release
    /// live in the site record (and prunes snapshots no longer needed).
    pub(crate) fn finish(&self, run: &Run, forced: Option<String>) -> Result<(), ManagerError> {
        let now = now_ms();
        let job = self
            .db
            .job(run.job)?
            .ok_or_else(|| ManagerError::NotFound(format!("job {}", run.job)))?;
        // One group's run of a roll: the roll goes on (`golive/`).
        if job.roll.as_ref().is_some_and(|r| r.waits_for() == Some(run.id)) {
            return self.roll_run_ended(run, forced, job);
        }
        let targets = self.targets(&job).unwrap_or_default();
        let reports: BTreeMap<String, ServerOutcome> =
            self.db.reports(run.id)?.into_iter().collect();
        let succeeded: Vec<String> = targets
            .iter()
            .filter(|s| reports.get(*s) == Some(&ServerOutcome::Succeeded))
            .cloned()
            .collect();
        let ok = forced.is_none()
            && policy::run_succeeded(job.spec.policy.quorum, targets.len(), succeeded.len());
        let summary = format!("{} of {} servers succeeded", succeeded.len(), targets.len());
        let reason = forced.clone().unwrap_or_else(|| format!("quorum not met: {summary}"));
        // The payload whose success this run stands for (a commit run commits its release).
        let payload = match run.commit_of {
            Some(_) => Payload::Commit { serial: run.release },
            None => job.spec.payload.clone(),
        };
        // Hot content went live as it was applied: nothing to commit.
        let builds = !matches!(
            payload,
            Payload::Commit { .. }
                | Payload::Rollback { .. }
                | Payload::Switch { .. }
                | Payload::Hot { .. }
                | Payload::Plugin { .. }
        );
        let commit_next = match (ok, builds, run.release, job.spec.policy.commit) {
            (true, true, Some(release), CommitPolicy::Auto) => {
                Some(PendingCommit { release, distributed_by: run.id, holders: succeeded.clone() })
            }
            _ => None,
        };
        // A catch-up that committed one group goes on with the next (`sync.rs`).
        let catch_up_next = match ok {
            true => self.catch_up_next(&job, run, &succeeded, &targets, now)?,
            false => None,
        };
        let mut site_after = None;
        let ended = self.db.write(|t| {
            // Read in the write transaction: an abort committed before it wins, and one after
            // it finds the run ended ([`crate::abort`]).
            if self.db.run(run.id)?.is_some_and(|r| r.phase != RunPhase::Distributing) {
                return Ok::<_, ManagerError>(true);
            }
            for s in &targets {
                if !reports.contains_key(s) {
                    t.put_report(run.id, s, &ServerOutcome::Missing)?;
                }
            }
            let mut r = run.clone();
            r.phase =
                if ok { RunPhase::Succeeded } else { RunPhase::Failed { reason: reason.clone() } };
            t.put_run(&r)?;
            let mut j = job.clone();
            let verdict = if ok {
                format!("run succeeded: {summary}")
            } else {
                format!("run failed: {reason}")
            };
            if let Some(pc) = &commit_next {
                // Same job, next stage: due now, and ahead of other jobs of the site (see `tick`).
                (j.state, j.next_run_ms, j.attempts) = (JobState::Idle, now, 0);
                j.last_reason = None;
                let line = format!(
                    "{verdict}; release {} goes live next: commit to {} servers",
                    pc.release,
                    pc.holders.len()
                );
                j.pending_commit = commit_next.clone();
                t.put_job(&j)?;
                if let Some(mut site) = self.db.site(&job.spec.site)? {
                    prepare::after_success(&payload, &mut site, run.serial, &succeeded);
                    crate::sync::record_built(&mut site, pc.release, run.id, &succeeded);
                    t.put_site(&site)?;
                }
                t.log(now, Some(job.id), Some(run.id), line)?;
                return Ok(false);
            }
            let next = if let Some(next) = catch_up_next.clone() {
                next
            } else if ok {
                policy::after_success(job.spec.every_ms, now)
            } else {
                policy::after_failure(&job.spec.policy, job.attempts, now, &reason)
            };
            (j.state, j.next_run_ms, j.attempts) =
                (next.state.clone(), next.next_run_ms, next.attempts);
            // All at once, live changed: the job ends once the caches are confirmed (bounded;
            // a roll waits per group instead). Read in this transaction: a report that came
            // first is on the run.
            let mut caches_in = false;
            // Only for a site with go-live settings: without them no cache is declared in front
            // of it, and the switch ends as it always did.
            let golive = self.db.site(&job.spec.site)?.is_some_and(|s| s.golive.is_some());
            if ok && job.roll.is_none() && run.cache.is_some() && golive {
                let fresh = self.db.run(run.id)?.unwrap_or_else(|| run.clone());
                let segments: Vec<String> = fresh
                    .segments
                    .iter()
                    .filter(|(_, seg)| !seg.caches_reported)
                    .filter(|(_, seg)| seg.servers.iter().any(|s| succeeded.contains(s)))
                    .map(|(name, _)| name.clone())
                    .collect();
                if segments.is_empty() {
                    caches_in = true;
                } else {
                    j.state = JobState::Running { run: run.id };
                    j.cache_wait =
                        Some(crate::golive::CacheWait { run: run.id, since_ms: now, segments });
                }
            }
            j.last_reason = (!ok).then(|| reason.clone());
            if ok {
                j.pending_commit = None;
            }
            t.put_job(&j)?;
            if ok && let Some(mut site) = self.db.site(&job.spec.site)? {
                prepare::after_success(&payload, &mut site, run.serial, &succeeded);
                if let (true, Some(release)) = (builds, run.release) {
                    crate::sync::record_built(&mut site, release, run.id, &succeeded);
                }
                if let (Payload::Hot { paths, .. }, Some(release)) = (&payload, run.serial) {
                    crate::hot::record(&mut site, release, paths, run.id, &succeeded);
                    t.log(
                        now,
                        Some(job.id),
                        Some(run.id),
                        format!(
                            "hot release {release} of site {} live on {}",
                            site.name,
                            succeeded.join(", ")
                        ),
                    )?;
                }
                t.put_site(&site)?;
                site_after = Some(site);
            }
            if ok
                && run.commit_of.is_some()
                && let Payload::Checkpoint { id } = &job.spec.payload
            {
                let line = format!(
                    "restored checkpoint {id} of site {}: release {} live on {} servers",
                    job.spec.site,
                    run.release.unwrap_or(0),
                    succeeded.len()
                );
                t.log(now, Some(job.id), Some(run.id), line)?;
            }
            let also = match (ok, builds, run.release) {
                (false, true, Some(rel)) => format!("; release {rel} is not committed"),
                (false, false, _) if run.commit_of.is_some() => {
                    "; servers that did not commit keep their live release".to_string()
                }
                _ => String::new(),
            };
            let then = match &j.cache_wait {
                Some(w) => format!(
                    "job ends once the caches of segment {} report (at most {} ms)",
                    w.segments.join(", "),
                    crate::golive::cache_wait_ms(self.db.site(&job.spec.site)?.as_ref())
                ),
                None if caches_in => {
                    format!("caches confirmed by every segment's report; job now {:?}", next.state)
                }
                None => format!("job now {:?}", next.state),
            };
            t.log(now, Some(job.id), Some(run.id), format!("{verdict}{also}; {then}"))?;
            Ok(false)
        })?;
        if ended {
            return Ok(());
        }
        crate::metrics::run_ended(run, job.spec.kind, ok, now);
        self.fleet_after_run(&job, run.commit_of.is_some(), ok, &targets, &reports, now);
        let _ = std::fs::remove_file(self.run_file(run.id));
        if commit_next.is_some() || catch_up_next.is_some() {
            self.wake.notify_one();
        }
        if let Some(site) = &site_after
            && site.golive.as_ref().is_some_and(|g| g.hot_pool.is_some())
            && matches!(
                payload,
                Payload::Hot { .. }
                    | Payload::Commit { .. }
                    | Payload::Rollback { .. }
                    | Payload::Switch { .. }
                    | Payload::Remove { .. }
            )
        {
            // Who holds hot content changed: the balancer is told (`golive/hot.rs`).
            self.golive.hot_changed(&site.name);
            self.wake.notify_one();
        }
        if let Some(site) = site_after
            && matches!(
                payload,
                Payload::Commit { .. } | Payload::Rollback { .. } | Payload::Switch { .. }
            )
        {
            self.prune_snapshots(&site, now)?;
        }
        Ok(())
    }

    /// A plugin run's canary or rollback follows (`fleet.rs`); a content run confirms, or rolls
    /// back, the plugin version its servers just installed. Failures here are logged, never
    /// the run's.
    fn fleet_after_run(
        &self,
        job: &Job,
        commit: bool,
        ok: bool,
        targets: &[String],
        reports: &BTreeMap<String, ServerOutcome>,
        now: u64,
    ) {
        let reports: Vec<(String, ServerOutcome)> = targets
            .iter()
            .map(|s| (s.clone(), reports.get(s).cloned().unwrap_or(ServerOutcome::Missing)))
            .collect();
        let done = match &job.spec.payload {
            Payload::Plugin { .. } => {
                crate::fleet::plugin_run_ended(&self.db, job, ok, &reports, now).map(|_| true)
            }
            // A build is the first apply with a new interpreter; a commit only switches.
            _ if commit => Ok(false),
            _ => self.db.site(&job.spec.site).map_err(Into::into).and_then(|site| match site {
                Some(site) => {
                    crate::fleet::content_run_ended(&self.db, &site.content_group, &reports, now)
                        .map(|_| true)
                }
                None => Ok(false),
            }),
        };
        match done {
            Ok(true) => self.wake.notify_one(),
            Ok(false) => {}
            Err(e) => tracing::error!(job = job.id, "plugin rollout after run: {e}"),
        }
    }

    /// Picks `count` servers for a hot job that names none and writes them into it; `false`
    /// when none qualifies (the job is blocked per its quorum policy).
    fn pick_hot_servers(&self, job: &mut Job, count: u32, now: u64) -> Result<bool, ManagerError> {
        let site = self
            .db
            .site(&job.spec.site)?
            .ok_or_else(|| ManagerError::NotFound(format!("hosted site {}", job.spec.site)))?;
        let group = self.db.group(&site.content_group)?.map(|g| g.servers).unwrap_or_default();
        let live = self.live_servers(now)?;
        let picked = crate::hot::pick_servers(&site, &group, &live, count as usize);
        if picked.is_empty() {
            let why = "hot content: no live server of the group holds the live release".to_string();
            self.blocked(job, job.spec.policy.on_quorum_shortfall, why, now)?;
            return Ok(false);
        }
        if let Payload::Hot { servers, .. } = &mut job.spec.payload {
            *servers = picked.clone();
        }
        self.db.write(|t| {
            t.put_job(job)?;
            t.log(
                now,
                Some(job.id),
                None,
                format!(
                    "hot content: picked {} of {count} servers asked for: {}",
                    picked.len(),
                    picked.join(", ")
                ),
            )
        })?;
        Ok(true)
    }

    /// Drops the snapshots the site no longer needs for rollback or deltas, and logs which.
    fn prune_snapshots(
        &self,
        site: &crate::model::HostedSite,
        now: u64,
    ) -> Result<(), ManagerError> {
        match prepare::prune_snapshots(&self.cfg.data_dir, site) {
            Ok(gone) if gone.is_empty() => Ok(()),
            Ok(gone) => {
                let list: Vec<String> = gone.iter().map(u64::to_string).collect();
                let line = format!(
                    "snapshots of site {} pruned: releases {} (keeping the last {} committed)",
                    site.name,
                    list.join(", "),
                    site.keep_releases
                );
                self.db.write(|t| t.log(now, None, None, line.clone()))?;
                Ok(())
            }
            Err(e) => {
                let line = format!("snapshots of site {}: pruning failed: {e}", site.name);
                tracing::warn!("{line}");
                self.db.write(|t| t.log(now, None, None, line.clone()))?;
                Ok(())
            }
        }
    }
}

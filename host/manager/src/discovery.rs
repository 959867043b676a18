//! What the manager does with a GL's discovery report: the segment record (its name outlives its
//! GLs), who joined and who left; a run waiting on the segment moves to a newly elected GL; a
//! member of a content group that lacks the site's live release gets a replicate job.

use std::collections::BTreeSet;
use std::sync::Arc;

use cm_tree::forward::{ChildSource, forward_slot};
use cm_tree::link::LinkRates;
use cm_tree::message::DiscoveryReport;

use crate::model::{
    CommitPolicy, Job, JobKind, JobPolicy, JobSpec, JobState, Payload, Run, SegmentRecord,
    SegmentStatus, ServerRecord,
};
use crate::now_ms;
use crate::server::{Inner, ManagerError, RootSource};
use crate::tree::{LeaderInfo, TreeConfig};

/// One line on a run's tree shape and where it came from, for the history.
pub(crate) fn describe_shape(
    shape: &TreeConfig,
    n: usize,
    leaders: &[LeaderInfo],
    measured: bool,
) -> String {
    let form = if n <= shape.star_max {
        format!("a star (the manager serves all {n})")
    } else if shape.root_fanout == 1 && shape.leader_fanout == 1 {
        "a chain (fan-out 1, pipelined)".to_string()
    } else {
        format!(
            "a tree (manager fan-out {}, GL fan-out {})",
            shape.root_fanout, shape.leader_fanout
        )
    };
    let source = if measured {
        let mib = |v: u64| v as f64 / f64::from(1 << 20);
        let rates: Vec<LinkRates> = leaders.iter().filter_map(|l| l.links).collect();
        let list: Vec<String> = rates
            .iter()
            .map(|r| format!("{:.0}/{:.0}", mib(r.upload_bps), mib(r.download_bps)))
            .collect();
        format!(
            "from the links {} of {n} GLs measured (upload/download MiB/s: {})",
            rates.len(),
            list.join(", ")
        )
    } else {
        "configured: no GL of the run has measured its links yet".to_string()
    };
    format!("tree for {n} GLs: {form}, {source}")
}

impl Inner {
    /// The tree shape for a run: from the link rates its GLs measured in earlier runs
    /// ([`TreeConfig::for_measured`]; the manager's own upload is its configured egress, if any),
    /// else the configured shape. Written to the run's history.
    pub(crate) fn tree_shape(
        &self,
        run: &Run,
        leaders: &[LeaderInfo],
    ) -> Result<TreeConfig, ManagerError> {
        let measured = TreeConfig::for_measured(self.cfg.egress_bytes_per_sec, leaders);
        let shape = measured.unwrap_or(self.cfg.tree);
        let line = describe_shape(&shape, leaders.len(), leaders, measured.is_some());
        tracing::info!(run = run.id, "{line}");
        self.db.write(|t| t.log(now_ms(), Some(run.job), Some(run.id), line.clone()))?;
        Ok(shape)
    }

    /// A GL's discovery report: the segment (stable name), its GL, and who joined or left.
    pub(crate) fn discovery(
        self: &Arc<Self>,
        r: DiscoveryReport,
    ) -> Result<serde_json::Value, ManagerError> {
        if r.segment.is_empty() || r.leader.is_empty() || r.address.is_empty() {
            return Err(ManagerError::Invalid(
                "discovery report needs segment, leader and address".into(),
            ));
        }
        let now = now_ms();
        let old = self.db.segment(&r.segment)?;
        self.db.write(|t| {
            let mut history = old.as_ref().map(|o| o.leader_history.clone()).unwrap_or_default();
            if old.as_ref().is_none_or(|o| o.leader != r.leader) {
                history.push((r.leader.clone(), now));
                let was = old.as_ref().map(|o| format!(" (was {})", o.leader)).unwrap_or_default();
                t.log(
                    now,
                    None,
                    None,
                    format!("segment {}: group leader is {}{was}", r.segment, r.leader),
                )?;
            }
            t.put_segment(&SegmentRecord {
                name: r.segment.clone(),
                leader: r.leader.clone(),
                address: r.address.clone(),
                location: r.location.clone(),
                cpu_power: r.cpu_power,
                free_disk: r.free_disk,
                connections: r.connections,
                members: r.members.clone(),
                last_report_ms: now,
                static_rank: old.as_ref().and_then(|o| o.static_rank),
                leader_history: history,
                links: r.links.or_else(|| old.as_ref().and_then(|o| o.links)),
            })?;
            for name in &r.members {
                let before: Option<ServerRecord> = self.db.server(name)?;
                if before.as_ref().is_none_or(|b| !b.live || b.segment != r.segment) {
                    t.log(now, None, None, format!("server {name} joined segment {}", r.segment))?;
                }
                t.put_server(&ServerRecord {
                    name: name.clone(),
                    segment: r.segment.clone(),
                    live: true,
                    last_seen_ms: now,
                })?;
            }
            for name in old.as_ref().map(|o| o.members.clone()).unwrap_or_default() {
                if r.members.contains(&name) {
                    continue;
                }
                if let Some(mut s) = self.db.server(&name)?
                    && s.segment == r.segment
                    && s.live
                {
                    s.live = false;
                    t.put_server(&s)?;
                    t.log(now, None, None, format!("server {name} left segment {}", r.segment))?;
                }
            }
            Ok::<_, ManagerError>(())
        })?;
        // Every active run that still waits on the segment hears of its GL (new, moved, or back).
        self.leader_changed(&r.segment, &r.leader, &r.address)?;
        let replicates = self.bring_up_to_date(&r.members, now)?;
        Ok(serde_json::json!({ "segment": r.segment, "replicate_jobs": replicates }))
    }

    /// A segment has a new GL, or its GL a new address. Every active run still waiting on the
    /// segment's report (pending, received but not reported, or lost) moves to it: same run, same
    /// assignment, a fresh parent and a fresh notification; the old GL's children are re-parented
    /// and re-notified, and a later report from the old GL is ignored (`segment_report`).
    pub(crate) fn leader_changed(
        self: &Arc<Self>,
        segment: &str,
        leader: &str,
        address: &str,
    ) -> Result<(), ManagerError> {
        let actives: Vec<_> =
            self.runs.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        for active in actives {
            let now = now_ms();
            let moved = self.db.write(|t| {
                let Some(mut run) = self.db.run(active.id)? else { return Ok(None) };
                let Some(seg) = run.segments.get_mut(segment) else { return Ok(None) };
                let same = seg.leader == leader && seg.address == address;
                if seg.status == SegmentStatus::Reported || (same && seg.status != SegmentStatus::Lost) {
                    return Ok(None);
                }
                let was = std::mem::replace(&mut seg.leader, leader.to_string());
                seg.address = address.to_string();
                seg.status = SegmentStatus::Pending;
                t.put_run(&run)?;
                t.log(
                    now,
                    Some(run.job),
                    Some(run.id),
                    format!("segment {segment}: new group leader {leader} at {address} picks up the run (was {was})"),
                )?;
                Ok::<_, ManagerError>(Some(run))
            })?;
            let Some(run) = moved else { continue };
            let orphans = {
                let mut plan = active.plan.lock().unwrap_or_else(|p| p.into_inner());
                let orphans = plan.leader_dead(segment);
                plan.revive(segment);
                orphans
            };
            self.notify_orphans(&run, &active, orphans);
            // The revived segment is first in line. Every slot may have ended already (the
            // tree was finished): one more manager slot serves it, then waits with the others.
            let source: Arc<dyn ChildSource> =
                Arc::new(RootSource { inner: self.clone(), run: active.clone() });
            tokio::spawn(forward_slot(
                active.blob.clone(),
                self.client.clone(),
                source,
                self.cfg.start_timeout,
            ));
            active.changed.notify_waiters();
        }
        Ok(())
    }

    /// Members of a content group that do not hold the site's live release get a replicate job
    /// of the live release (then its commit), unless one is under way or was given up on recently.
    /// Returns the jobs created.
    fn bring_up_to_date(&self, members: &[String], now: u64) -> Result<Vec<u64>, ManagerError> {
        let jobs = self.db.jobs()?;
        let mut created = Vec::new();
        for site in self.db.sites()? {
            let Some(live) = site.live() else { continue };
            let Some(group) = self.db.group(&site.content_group)? else { continue };
            let site_jobs: Vec<&Job> = jobs.iter().filter(|j| j.spec.site == site.name).collect();
            if site_jobs.iter().any(|j| {
                matches!(j.state, JobState::Running { .. })
                    || j.pending_commit.is_some() && j.state == JobState::Idle
            }) {
                continue; // a release is on its way: who holds what changes when it lands
            }
            let covered: BTreeSet<&String> = site_jobs
                .iter()
                .filter(|j| match &j.state {
                    JobState::Idle | JobState::Running { .. } => true,
                    JobState::Cancelled { .. } => {
                        j.next_run_ms + self.cfg.replicate_backoff.as_millis() as u64 > now
                    }
                    JobState::Done => false,
                })
                .filter_map(|j| match &j.spec.payload {
                    Payload::Live { servers } => Some(servers),
                    _ => None,
                })
                .flatten()
                .collect();
            let lacking: Vec<String> = members
                .iter()
                .filter(|m| {
                    group.servers.contains(m)
                        && site.holders.get(*m) != Some(&live)
                        && !covered.contains(m)
                })
                .cloned()
                .collect();
            if lacking.is_empty() {
                continue;
            }
            let spec = JobSpec {
                name: format!(
                    "replicate live release {live} of {} to {}",
                    site.name,
                    lacking.join(", ")
                ),
                kind: JobKind::Replicate,
                site: site.name.clone(),
                payload: Payload::Live { servers: lacking.clone() },
                start_at_ms: 0,
                every_ms: None,
                policy: JobPolicy { commit: CommitPolicy::Auto, ..JobPolicy::default() },
            };
            let job = self.db.write(|t| {
                let j = t.insert_job(spec.clone(), now)?;
                t.log(
                    now,
                    Some(j.id),
                    None,
                    format!(
                        "servers {} lack live release {live} of site {}: replicate job {} created",
                        lacking.join(", "),
                        site.name,
                        j.id
                    ),
                )?;
                Ok::<_, ManagerError>(j)
            })?;
            created.push(job.id);
        }
        Ok(created)
    }
}

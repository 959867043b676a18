//! What the manager does with a GL's discovery report: the segment record (its name outlives its
//! GLs), who joined and who left; a run waiting on the segment moves to a newly elected GL; a
//! member of a content group that lacks the site's live release gets a replicate job.
//!
//! A report comes from whoever holds the agent token (or an agent certificate), so it is bounded
//! before it touches the database: names checked ([`crate::names`]), at most
//! `max_segment_members` members and `max_segments` segments, reports per segment rate-limited
//! ([`DiscoveryGate`]), a server another segment's GL reported within the live window is not
//! taken over, and records and history are written only for what changed (one history line per
//! report for its joins, one for its leaves). The plugins it relays (one per listed member, each
//! checked by `cm_tree::member_state`) are stored per server; a report with a bad one is refused
//! whole and counted. So are the spaces (each member's free space and inodes, free never above
//! the total); a new space wakes the jobs waiting for space (`space.rs`).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cm_tree::forward::{ChildSource, forward_slot};
use cm_tree::link::LinkRates;
use cm_tree::message::DiscoveryReport;
use cm_tree::tls::PeerCertificate;

use crate::model::{
    CommitPolicy, Job, JobKind, JobPolicy, JobSpec, JobState, Payload, Run, SegmentRecord,
    SegmentStatus, ServerRecord,
};
use crate::names::check_name;
use crate::now_ms;
use crate::server::{Inner, ManagerError, RootSource};
use crate::sync;
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

/// Per-segment token buckets: a burst of `discovery_burst` reports, then one per
/// `discovery_refill`. A GL reports on election, on every join or leave and periodically, and
/// retries a refused report with a backoff, so an honest GL loses nothing but a little time.
#[derive(Default)]
pub(crate) struct DiscoveryGate {
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl DiscoveryGate {
    /// Takes a token from `reporter`'s bucket; false when it is empty.
    fn admit(&self, reporter: &str, burst: u32, refill: Duration, max_reporters: usize) -> bool {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let full = f64::from(burst.max(1));
        let per_sec = 1.0 / refill.as_secs_f64().max(1e-6);
        if buckets.len() >= max_reporters && !buckets.contains_key(reporter) {
            // Forget the buckets that have filled up again (their reporters are quiet).
            buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * per_sec < full
            });
        }
        let (tokens, at) = buckets.entry(reporter.to_string()).or_insert((full, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * per_sec).min(full);
        *at = now;
        if *tokens < 1.0 {
            return false;
        }
        *tokens -= 1.0;
        true
    }
}

/// Longest address or location a report may carry.
const MAX_FIELD: usize = 255;
/// Names a history line lists before it says "and N more".
const NAMES_IN_HISTORY: usize = 20;

/// `a, b, c and 7 more`.
fn name_list(names: &[String]) -> String {
    let shown = names.iter().take(NAMES_IN_HISTORY).cloned().collect::<Vec<_>>().join(", ");
    match names.len().saturating_sub(NAMES_IN_HISTORY) {
        0 => shown,
        more => format!("{shown} and {more} more"),
    }
}

/// What may be read from a report before anything is stored: names, sizes, duplicates.
fn check_report(r: &DiscoveryReport, max_members: usize) -> Result<(), ManagerError> {
    let invalid =
        |e: crate::names::NameError| ManagerError::Invalid(format!("discovery report: {e}"));
    check_name("segment name", &r.segment).map_err(invalid)?;
    check_name("leader name", &r.leader).map_err(invalid)?;
    if r.address.is_empty() || r.address.len() > MAX_FIELD || r.location.len() > MAX_FIELD {
        return Err(ManagerError::Invalid(format!(
            "discovery report: address must be 1 to {MAX_FIELD} bytes and location at most {MAX_FIELD}"
        )));
    }
    if r.members.len() > max_members {
        return Err(ManagerError::Invalid(format!(
            "discovery report for segment {} lists {} members; a segment has at most {max_members} (max_segment_members)",
            r.segment,
            r.members.len()
        )));
    }
    let mut seen = BTreeSet::new();
    for m in &r.members {
        check_name("member name", m).map_err(invalid)?;
        if !seen.insert(m) {
            return Err(ManagerError::Invalid(format!(
                "discovery report for segment {} lists member {m} twice",
                r.segment
            )));
        }
    }
    check_relayed(r, &seen, "plugins", "plugin", &r.plugins, |p| p.check())
        .inspect_err(|_| crate::metrics::plugin_report_refused())?;
    check_relayed(r, &seen, "spaces", "space", &r.spaces, |s| s.check())
}

/// What a report relays per member (`plugins`: each by the plugin store's name rule, with a
/// whole BLAKE3 and its short version; `spaces`: free never above the total): one per listed
/// member at most (so no more than the members), each passing `check`.
fn check_relayed<T, E: std::fmt::Display>(
    r: &DiscoveryReport,
    members: &BTreeSet<&String>,
    field: &str,
    what: &str,
    relayed: &std::collections::BTreeMap<String, T>,
    check: impl Fn(&T) -> Result<(), E>,
) -> Result<(), ManagerError> {
    for (server, item) in relayed {
        if !members.contains(server) {
            let shown: String = server.escape_debug().take(80).collect();
            return Err(ManagerError::Invalid(format!(
                "discovery report for segment {}: {field} name `{shown}`, which is not a listed member",
                r.segment
            )));
        }
        check(item).map_err(|e| {
            ManagerError::Invalid(format!(
                "discovery report for segment {}: {what} of {server}: {e}",
                r.segment
            ))
        })?;
    }
    Ok(())
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
        mut r: DiscoveryReport,
        cert: Option<&PeerCertificate>,
    ) -> Result<serde_json::Value, ManagerError> {
        check_report(&r, self.cfg.max_segment_members)?;
        if let Some(cert) = cert
            && !cert.names_server(&r.leader)
        {
            return Err(ManagerError::Forbidden(format!(
                "discovery report for segment {} names {} as its group leader, but the client certificate does not name that server: an agent certificate reports only for its own server",
                r.segment, r.leader
            )));
        }
        let c = &self.cfg;
        if !self.discovery_gate.admit(
            &r.segment,
            c.discovery_burst,
            c.discovery_refill,
            c.max_segments.saturating_mul(2),
        ) {
            return Err(ManagerError::TooMany(format!(
                "discovery reports for segment {} come faster than one per {:?} (after a burst of {}); retry later",
                r.segment, c.discovery_refill, c.discovery_burst
            )));
        }
        let now = now_ms();
        let old = self.db.segment(&r.segment)?;
        if old.is_none() && self.db.segments()?.len() >= c.max_segments {
            return Err(ManagerError::Invalid(format!(
                "discovery report for a new segment {}: the manager already has {} segments (max_segments)",
                r.segment, c.max_segments
            )));
        }
        // A server another segment's GL reported within the live window stays there: a GL
        // vouches only for its own registrations, and a report cannot take servers away from
        // another segment (a server that moved is taken once its old segment stops listing it).
        let window = c.live_window.as_millis() as u64;
        let live_elsewhere = |name: &str| -> Result<Option<SegmentRecord>, ManagerError> {
            Ok(match self.db.server(name)? {
                Some(s) if s.live && s.segment != r.segment => {
                    self.db.segment(&s.segment)?.filter(|g| {
                        g.last_report_ms + window >= now && g.members.iter().any(|m| m == name)
                    })
                }
                _ => None,
            })
        };
        // Nor can a server lead a segment while another segment's GL lists it as a member.
        if let Some(g) = live_elsewhere(&r.leader)?
            && g.leader != r.leader
        {
            return Err(ManagerError::Forbidden(format!(
                "discovery report names {} group leader of segment {}, but it is a member of segment {} (reported by its group leader {} within the live window)",
                r.leader, r.segment, g.name, g.leader
            )));
        }
        let mut refused: Vec<(String, String)> = Vec::new();
        let mut members = Vec::with_capacity(r.members.len());
        for name in std::mem::take(&mut r.members) {
            match live_elsewhere(&name)? {
                Some(g) => refused.push((
                    name,
                    format!(
                        "reported by segment {}'s group leader {} within the live window",
                        g.name, g.leader
                    ),
                )),
                None => members.push(name),
            }
        }
        r.members = members;
        if !refused.is_empty() {
            // Not in the history: a GL repeats its report, the history would grow with each.
            let names: Vec<String> = refused.iter().map(|(n, _)| n.clone()).collect();
            tracing::warn!(segment = %r.segment, leader = %r.leader, "discovery lists servers live in other segments, not taken over: {}", name_list(&names));
        }
        let mut spaces_changed = false;
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
            // Server records and history change only for servers whose membership changed.
            let mut joined = Vec::new();
            for name in &r.members {
                let before: Option<ServerRecord> = self.db.server(name)?;
                let plugin = r.plugins.get(name).cloned();
                let moved = before.as_ref().is_none_or(|b| !b.live || b.segment != r.segment);
                // A member that has not reported its plugin (yet) keeps the one known.
                let plugin = plugin.or_else(|| before.as_ref().and_then(|b| b.plugin.clone()));
                crate::metrics::server_plugin(name, plugin.as_ref());
                // Likewise its space; a new one is written with its time (members send a new
                // one only when it moved by 1 %).
                let reported = r.spaces.get(name).copied();
                let space_changed =
                    reported.is_some() && before.as_ref().is_none_or(|b| b.space != reported);
                spaces_changed |= space_changed;
                let (space, space_ms) = match space_changed {
                    true => (reported, now),
                    false => before.as_ref().map_or((None, 0), |b| (b.space, b.space_ms)),
                };
                if moved || space_changed || before.as_ref().is_some_and(|b| b.plugin != plugin) {
                    t.put_server(&ServerRecord {
                        name: name.clone(),
                        segment: r.segment.clone(),
                        live: true,
                        last_seen_ms: if moved {
                            now
                        } else {
                            before.as_ref().map_or(now, |b| b.last_seen_ms)
                        },
                        plugin,
                        space,
                        space_ms,
                    })?;
                }
                if moved {
                    joined.push(name.clone());
                }
            }
            let mut left = Vec::new();
            for name in old.as_ref().map(|o| o.members.clone()).unwrap_or_default() {
                if r.members.contains(&name) {
                    continue;
                }
                if let Some(mut s) = self.db.server(&name)?
                    && s.segment == r.segment
                    && s.live
                {
                    s.live = false;
                    s.last_seen_ms = now;
                    t.put_server(&s)?;
                    left.push(name);
                }
            }
            let seg = &r.segment;
            if !joined.is_empty() {
                let (n, list) = (joined.len(), name_list(&joined));
                let what = if n == 1 { "server" } else { "servers" };
                t.log(now, None, None, format!("{what} {list} joined segment {seg}"))?;
            }
            if !left.is_empty() {
                let (n, list) = (left.len(), name_list(&left));
                let what = if n == 1 { "server" } else { "servers" };
                t.log(now, None, None, format!("{what} {list} left segment {seg}"))?;
            }
            Ok::<_, ManagerError>(())
        })?;
        // Every active run that still waits on the segment hears of its GL (new, moved, or back).
        self.leader_changed(&r.segment, &r.leader, &r.address)?;
        if spaces_changed {
            // Jobs waiting for space look again now (`space.rs`).
            self.space_reported(now)?;
        }
        let replicates = self.bring_up_to_date(&r.members, now)?;
        Ok(serde_json::json!({
            "segment": r.segment,
            "replicate_jobs": replicates,
            "refused_members": refused,
        }))
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
                    JobState::Cancelled { .. } | JobState::Aborted { .. } => {
                        j.next_run_ms + self.cfg.replicate_backoff.as_millis() as u64 > now
                    }
                    JobState::Done => false,
                })
                .filter_map(|j| match &j.spec.payload {
                    Payload::Live { servers } | Payload::CatchUp { servers } => Some(servers),
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
                        && !site.removed.contains(*m)
                })
                .cloned()
                .collect();
            if lacking.is_empty() {
                continue;
            }
            // Servers that hold a release the manager still has the snapshot of catch up by a
            // delta (synchronize); otherwise the live release goes whole (replicate).
            let catch_up = sync::plan(&site, &group.servers, &lacking, &self.cfg.data_dir)
                .iter()
                .any(|g| g.from.is_some());
            let (what, kind, payload) = match catch_up {
                true => (
                    "synchronize",
                    JobKind::Synchronize,
                    Payload::CatchUp { servers: lacking.clone() },
                ),
                false => {
                    ("replicate", JobKind::Replicate, Payload::Live { servers: lacking.clone() })
                }
            };
            let spec = JobSpec {
                name: format!(
                    "{what} live release {live} of {} to {}",
                    site.name,
                    lacking.join(", ")
                ),
                kind,
                site: site.name.clone(),
                payload,
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
                        "servers {} lack live release {live} of site {}: {what} job {} created",
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

//! Synchronize: servers that missed runs catch up to the site's live release (a real
//! catch-up, not a publish under another name).
//!
//! The servers of the content group (or those a job names) that do not hold the live release
//! are grouped by the release the manager last saw each commit (`holders`). A group whose
//! release's snapshot the manager still keeps gets a delta from that snapshot to the live one:
//! a `synchronize` assignment with the live serial and that release as its base serial, which
//! every server checks against its own live release before it builds anything. Servers whose
//! release has no snapshot any more, or that hold nothing, get the live release whole (the
//! `live` replicate path). Servers already live are untouched: no run targets them.
//!
//! A server that built the live release but missed its commit (down between the distribution
//! and the commit) holds that release already, verified: any assignment with the live serial
//! would be refused there (it names a release built from another assignment), and it needs no
//! byte of content. Such servers form a group of their own, first, that gets just the commit:
//! the job takes the release as its pending commit (`built`: which run built it where) and its
//! run is a header-only commit to them.
//!
//! One group per run: a run distributes one assignment, then its commit run makes live the
//! servers' live; when that commit reached every server of the group and others still lag, the
//! job is due again at once for the next group, else it ends like any job. (A group that did
//! not fully commit ends the job, so a server that keeps failing cannot loop it.)

use std::collections::BTreeMap;
use std::path::Path;

use cm_assignment::{AssignmentType, BuildOptions, build};

use crate::filter::compression_policy;
use crate::model::{BuiltRelease, HostedSite, Job, JobKind, JobState, Payload, PendingCommit, Run};
use crate::policy::NextJobState;
use crate::prepare::{self, Context, PrepareError, Prepared, snapshot_dir};
use crate::server::{Inner, ManagerError};

/// Servers that hold the same release and so get the same assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatchUpGroup {
    /// The release they hold, when its snapshot is still kept (a delta from it); `None`: the
    /// live release whole; the live release itself: they built it and missed only its commit.
    pub from: Option<u64>,
    pub servers: Vec<String>,
}

/// The servers of `group` (those of `named`, when it names any; otherwise all but the ones
/// the site's content was removed from) that lack the live release, grouped by the release they
/// hold: those that built live and missed its commit first, then deltas oldest base first,
/// the whole-release group last.
pub fn plan(
    site: &HostedSite,
    group: &[String],
    named: &[String],
    data_dir: &Path,
) -> Vec<CatchUpGroup> {
    let Some(live) = site.live() else { return Vec::new() };
    let mut by_release: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    let mut whole = Vec::new();
    let mut commit_only = Vec::new();
    let chosen = group.iter().filter(|s| match named.is_empty() {
        true => !site.removed.contains(*s),
        false => named.contains(s),
    });
    for s in chosen {
        match site.holders.get(s) {
            Some(held) if *held == live => {}
            _ if site.built.get(s).is_some_and(|b| b.release == live) => {
                commit_only.push(s.clone())
            }
            Some(held) if snapshot_dir(data_dir, &site.name, *held).is_dir() => {
                by_release.entry(*held).or_default().push(s.clone());
            }
            _ => whole.push(s.clone()),
        }
    }
    let mut out: Vec<CatchUpGroup> = Vec::new();
    if !commit_only.is_empty() {
        out.push(CatchUpGroup { from: Some(live), servers: commit_only });
    }
    out.extend(
        by_release.into_iter().map(|(from, servers)| CatchUpGroup { from: Some(from), servers }),
    );
    if !whole.is_empty() {
        out.push(CatchUpGroup { from: None, servers: whole });
    }
    out
}

/// Builds the assignment of a catch-up group: a delta from `from`'s snapshot to live's, or live
/// whole.
pub fn prepare_group(
    site: &HostedSite,
    g: &CatchUpGroup,
    job_id: u64,
    ctx: Context<'_>,
    out: &Path,
) -> Result<Prepared, PrepareError> {
    let name = site.name.clone();
    let live = site.live().ok_or_else(|| PrepareError::NothingLive { site: name.clone() })?;
    let who = g.servers.join(", ");
    let Some(from) = g.from else {
        let whole = Payload::Live { servers: g.servers.clone() };
        let p = prepare::prepare(&whole, JobKind::Replicate, site, live, job_id, ctx, out)?;
        let summary =
            format!("synchronize of {who} (no kept release to start from): {}", p.summary);
        return Ok(Prepared { summary, ..p });
    };
    let (base, target) =
        (snapshot_dir(ctx.data_dir, &name, from), snapshot_dir(ctx.data_dir, &name, live));
    for (serial, path) in [(from, &base), (live, &target)] {
        if !path.is_dir() {
            let path = path.display().to_string();
            return Err(PrepareError::SnapshotMissing { site: name, serial, path });
        }
    }
    // The live serial, so the commit that follows makes the servers' live the site's live; the
    // base serial is checked by every server against its own live release.
    let mut opts = BuildOptions::new(AssignmentType::Synchronize, live).for_site(&site.name);
    opts.meta.job_id = job_id;
    opts.meta.base_serial = from;
    opts.policy = compression_policy(&site.compression);
    opts.seal = ctx.seal.cloned();
    opts.signer = ctx.signer.cloned();
    let r = build(&target, Some(&base), out, &opts)
        .map_err(|source| PrepareError::Build { site: name.clone(), source })?;
    Ok(Prepared {
        serial: None,
        release: Some(live),
        summary: format!(
            "synchronize of {who} from release {from} to live release {live} of site {name}: {} new, {} changed, {} deleted, {} unchanged, {} deltas, {} literal bytes, {} bytes in all",
            r.new, r.changed, r.deleted, r.unchanged, r.deltas, r.literal_bytes, r.file_len
        ),
    })
}

/// Records that `servers` built `release` in run `run` (a run that builds one, once it ended).
pub fn record_built(site: &mut HostedSite, release: u64, run: u64, servers: &[String]) {
    for s in servers {
        site.built.insert(s.clone(), BuiltRelease { release, run });
    }
}

impl Inner {
    /// For a catch-up job whose next group built live and missed only its commit: takes the
    /// release as the job's pending commit to them, so its run is that commit and nothing else.
    pub(crate) fn commit_only(&self, job: &mut Job, now: u64) -> Result<(), ManagerError> {
        if job.pending_commit.is_some() {
            return Ok(());
        }
        let Some(first) = self.catch_up_plan(job)?.into_iter().next() else { return Ok(()) };
        let Some(site) = self.db.site(&job.spec.site)? else { return Ok(()) };
        let (Some(live), Some(from)) = (site.live(), first.from) else { return Ok(()) };
        if from != live {
            return Ok(());
        }
        let built_by = first.servers.iter().find_map(|s| site.built.get(s)).map_or(0, |b| b.run);
        let pc = PendingCommit { release: live, distributed_by: built_by, holders: first.servers };
        let line = format!(
            "synchronize of {}: built live release {live} of site {} (run {built_by}) and missed only its commit: sending the commit alone",
            pc.holders.join(", "),
            site.name
        );
        job.pending_commit = Some(pc);
        self.db.write(|t| {
            t.put_job(job)?;
            t.log(now, Some(job.id), None, line.clone())
        })?;
        Ok(())
    }

    fn catch_up_plan(&self, job: &Job) -> Result<Vec<CatchUpGroup>, ManagerError> {
        let Payload::CatchUp { servers } = &job.spec.payload else { return Ok(Vec::new()) };
        let Some(site) = self.db.site(&job.spec.site)? else { return Ok(Vec::new()) };
        let Some(group) = self.db.group(&site.content_group)? else { return Ok(Vec::new()) };
        Ok(plan(&site, &group.servers, servers, &self.cfg.data_dir))
    }

    /// A catch-up job's targets: the servers of the group its next run is for.
    pub(crate) fn catch_up_targets(&self, job: &Job) -> Result<Vec<String>, ManagerError> {
        Ok(self.catch_up_plan(job)?.into_iter().next().map(|g| g.servers).unwrap_or_default())
    }

    /// For a catch-up job with nothing to catch up (every chosen server live, or nothing live):
    /// the job ends without a run, saying so. Returns true then.
    pub(crate) fn nothing_to_synchronize(&self, job: &Job, now: u64) -> Result<bool, ManagerError> {
        if !matches!(job.spec.payload, Payload::CatchUp { .. })
            || !self.catch_up_plan(job)?.is_empty()
        {
            return Ok(false);
        }
        let live = self.db.site(&job.spec.site)?.and_then(|s| s.live());
        let reason = match live {
            Some(l) => format!(
                "nothing to synchronize: every chosen server of site {} holds live release {l}",
                job.spec.site
            ),
            None => format!("nothing to synchronize: site {} has nothing live", job.spec.site),
        };
        self.no_run(job, reason, now)?;
        Ok(true)
    }

    /// Writes the assignment of the catch-up job's next group to `out`.
    pub(crate) fn prepare_catch_up(
        &self,
        job: &Job,
        site: &HostedSite,
        ctx: Context<'_>,
        out: &Path,
    ) -> Result<Prepared, ManagerError> {
        let groups = self.catch_up_plan(job)?;
        let first = groups.first().ok_or_else(|| {
            ManagerError::Invalid(format!("site {}: no server to synchronize", site.name))
        })?;
        let mut p = prepare_group(site, first, job.id, ctx, out)?;
        if groups.len() > 1 {
            p.summary +=
                &format!("; {} more groups of servers to catch up after it", groups.len() - 1);
        }
        Ok(p)
    }

    /// After a catch-up job's commit run: due again at once when every server of the group
    /// committed and other servers still lag (the next group); `None` otherwise.
    pub(crate) fn catch_up_next(
        &self,
        job: &Job,
        run: &Run,
        succeeded: &[String],
        targets: &[String],
        now: u64,
    ) -> Result<Option<NextJobState>, ManagerError> {
        let Payload::CatchUp { servers } = &job.spec.payload else { return Ok(None) };
        if run.commit_of.is_none() || succeeded.len() != targets.len() {
            return Ok(None);
        }
        let Some(mut site) = self.db.site(&job.spec.site)? else { return Ok(None) };
        let Some(group) = self.db.group(&site.content_group)? else { return Ok(None) };
        prepare::after_success(
            &Payload::Commit { serial: run.release },
            &mut site,
            None,
            succeeded,
        );
        let left = plan(&site, &group.servers, servers, &self.cfg.data_dir);
        Ok((!left.is_empty()).then_some(NextJobState {
            state: JobState::Idle,
            next_run_ms: now,
            attempts: 0,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Compression, ContentFilter};

    fn site() -> HostedSite {
        HostedSite {
            name: "www".into(),
            content_group: "g".into(),
            staging: "/nowhere".into(),
            serial: 9,
            prepared: None,
            committed: vec![1, 3, 5, 7],
            keep_releases: 2,
            holders: [("a", 7), ("b", 5), ("c", 1), ("d", 5), ("e", 3)]
                .into_iter()
                .map(|(s, r)| (s.to_string(), r))
                .collect(),
            keep_checkpoints: 5,
            removed: ["gone".to_string()].into_iter().collect(),
            filter: ContentFilter::default(),
            compression: Compression::default(),
            golive: None,
            rotation: Default::default(),
            refresh: Default::default(),
            built: Default::default(),
            hot: Default::default(),
        }
    }

    #[test]
    fn lagging_servers_group_by_the_release_they_hold_and_the_rest_get_live_whole() {
        let d = tempfile::tempdir().unwrap();
        for r in [5, 7] {
            std::fs::create_dir_all(snapshot_dir(d.path(), "www", r)).unwrap();
        }
        let group: Vec<String> =
            ["a", "b", "c", "d", "e", "new", "gone"].iter().map(|s| s.to_string()).collect();
        let p = plan(&site(), &group, &[], d.path());
        assert_eq!(
            p,
            vec![
                CatchUpGroup { from: Some(5), servers: vec!["b".into(), "d".into()] },
                CatchUpGroup { from: None, servers: vec!["c".into(), "e".into(), "new".into()] },
            ],
            "a is live; 1 and 3 have no snapshot; `gone` had its content removed"
        );
        // Named servers: only those (a removed one too: naming it brings it back).
        let named: Vec<String> = vec!["d".into(), "gone".into(), "a".into()];
        let p = plan(&site(), &group, &named, d.path());
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].servers, vec!["d".to_string()]);
        assert_eq!(p[1], CatchUpGroup { from: None, servers: vec!["gone".into()] });
        // b built live (release 7, run 12) and missed its commit: just the commit, first.
        let mut missed = site();
        missed.built.insert("b".into(), BuiltRelease { release: 7, run: 12 });
        missed.built.insert("c".into(), BuiltRelease { release: 5, run: 9 });
        let p = plan(&missed, &group, &[], d.path());
        assert_eq!(p[0], CatchUpGroup { from: Some(7), servers: vec!["b".into()] });
        assert_eq!(p[1], CatchUpGroup { from: Some(5), servers: vec!["d".into()] });
        let mut nothing = site();
        nothing.committed.clear();
        assert!(plan(&nothing, &group, &[], d.path()).is_empty(), "nothing live");
    }

    #[test]
    fn a_group_gets_a_signed_delta_from_its_release_with_the_live_serial() {
        let d = tempfile::tempdir().unwrap();
        let (old, live) = (snapshot_dir(d.path(), "www", 5), snapshot_dir(d.path(), "www", 7));
        std::fs::create_dir_all(&old).unwrap();
        let big: String = (0..4000).map(|i| format!("line {i}\n")).collect();
        std::fs::write(old.join("a.txt"), &big).unwrap();
        std::fs::write(old.join("gone.txt"), "x").unwrap();
        prepare::copy_tree(&old, &live).unwrap();
        std::fs::remove_file(live.join("gone.txt")).unwrap();
        std::fs::write(live.join("a.txt"), big.replace("line 7\n", "line seven\n")).unwrap();
        let key = cm_assignment::SigningKey::from_pkcs8(
            &cm_assignment::SigningKey::generate_pkcs8().unwrap(),
        )
        .unwrap();
        let ctx = Context { data_dir: d.path(), seal: None, signer: Some(&key) };
        let out = d.path().join("sync");
        let g = CatchUpGroup { from: Some(5), servers: vec!["b".into()] };
        let p = prepare_group(&site(), &g, 4, ctx, &out).unwrap();
        assert_eq!((p.serial, p.release), (None, Some(7)));
        assert!(p.summary.contains("0 new, 1 changed, 1 deleted"), "{}", p.summary);
        let h = cm_assignment::AssignmentReader::open(&out).unwrap().header().clone();
        assert_eq!((h.kind, h.serial, h.base_serial), (AssignmentType::Synchronize, 7, 5));
        assert!(cm_assignment::sign::is_signed_by(&out, &key.public_key()));
        assert!(
            std::fs::metadata(&out).unwrap().len() < big.len() as u64 / 4,
            "a delta, not the file"
        );
    }
}

//! Turning a job's payload into the assignment file a run distributes.
//!
//! For `Payload::Staging` the manager snapshots the staging tree (so what is sent is exactly what
//! is kept) and builds the assignment with cm-assignment against the snapshot of the live release
//! — the shadow copy. Snapshots live in `<data>/snapshots/<site>/<serial>`; the live one is the
//! base of the next delta, which is how only changed bytes travel.

use cm_assignment::write::Meta;
use cm_assignment::{AssignmentType, BuildOptions, build, detect::build_switch};
pub use cm_assignment::{SealKey, SigningKey};
use std::path::{Path, PathBuf};
use thiserror::Error;

use crate::filter::{Filter, RuleError, compression_policy};
use crate::model::{HostedSite, JobKind, Payload};

#[derive(Debug, Error)]
pub enum PrepareError {
    #[error("copying assignment file {path}: {source}")]
    Copy { path: String, source: std::io::Error },
    #[error("signing assignment file {path}: {source}")]
    SignFile { path: String, source: cm_assignment::sign::SignCopyError },
    #[error("assignment file {path} is for site {found:?} (its header), not the job's site {site}")]
    FileSite { path: String, site: String, found: String },
    #[error("snapshotting staging tree {from} of site {site}: {source}")]
    Snapshot { site: String, from: String, source: std::io::Error },
    #[error("building the assignment of site {site}: {source}")]
    Build { site: String, source: cm_assignment::detect::BuildError },
    #[error("writing the {what} assignment of site {site}: {source}")]
    Switch { site: String, what: &'static str, source: cm_assignment::WriteError },
    #[error("site {site} has no prepared release to commit")]
    NothingPrepared { site: String },
    #[error("site {site} has no earlier committed release to roll back to")]
    NothingToRollBack { site: String },
    #[error("site {site} has nothing live to replicate")]
    NothingLive { site: String },
    #[error(
        "site {site}: release {serial} is no longer kept on the servers (they keep the last {keep} committed releases and the prepared one; keep_releases)"
    )]
    NotKept { site: String, serial: u64, keep: u32 },
    #[error("site {site}: release {serial} was never committed before the live one")]
    NeverCommitted { site: String, serial: u64 },
    #[error("site {site}: release {serial} is already live")]
    AlreadyLive { site: String, serial: u64 },
    #[error("site {site}: this payload makes no assignment here (checkpoint.rs, sync.rs)")]
    NotAnAssignment { site: String },
    #[error("site {site}: the snapshot of live release {serial} is missing at {path}")]
    SnapshotMissing { site: String, serial: u64, path: String },
    #[error("site {site}: hot content: {why}")]
    Hot { site: String, why: String },
    #[error("site {site}: its content rules: {source}")]
    Rules { site: String, source: RuleError },
}

/// What was prepared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// The assignment's serial (manager-built payloads).
    pub serial: Option<u64>,
    /// The release the assignment builds on the servers (what its commit makes live), when the
    /// manager knows it: its own builds, and assignment files whose header names one.
    pub release: Option<u64>,
    /// One line for the history log.
    pub summary: String,
}

pub fn snapshot_dir(data_dir: &Path, site: &str, serial: u64) -> PathBuf {
    data_dir.join("snapshots").join(site).join(serial.to_string())
}

/// Copies a tree (files, directories with their modes, symlinks).
pub fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let m = std::fs::symlink_metadata(&src)?;
        if m.file_type().is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
        } else if m.is_dir() {
            copy_tree(&src, &dst)?;
            std::fs::set_permissions(
                &dst,
                std::fs::Permissions::from_mode(m.permissions().mode()),
            )?;
        } else {
            std::fs::copy(&src, &dst)?;
        }
    }
    Ok(())
}

/// Snapshots the staging tree `from` into `to`. A file whose size, mtime (to the nanosecond)
/// and mode equal those of the same path in `previous` (the live release's snapshot) is
/// hard-linked from it; any other file is copied with its mtime kept. Snapshots are the
/// manager's own and never written after they are made, so sharing inodes between them is safe
/// (staging's are never shared: the operator may edit a file in place). Unchanged files then
/// cost a link instead of a copy, and the build's size+mtime check sees them unchanged without
/// reading them: a small change to a large site costs what changed, not the site's size.
pub fn snapshot_tree(from: &Path, previous: Option<&Path>, to: &Path) -> std::io::Result<()> {
    snapshot_filtered(from, previous, to, &Filter::all())
}

/// [`snapshot_tree`] of what the site's `filter` admits: excluded paths are left out.
pub fn snapshot_filtered(
    from: &Path,
    previous: Option<&Path>,
    to: &Path,
    filter: &Filter,
) -> std::io::Result<()> {
    snapshot_below(from, previous, to, filter, Path::new(""))
}

fn snapshot_below(
    from: &Path,
    previous: Option<&Path>,
    to: &Path,
    filter: &Filter,
    rel: &Path,
) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let prev = previous.map(|p| p.join(e.file_name()));
        let m = std::fs::symlink_metadata(&src)?;
        let at = rel.join(e.file_name());
        if !filter.admits(&at, m.is_dir()) {
            continue;
        }
        if m.file_type().is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
        } else if m.is_dir() {
            snapshot_below(&src, prev.as_deref().filter(|p| p.is_dir()), &dst, filter, &at)?;
            std::fs::set_permissions(
                &dst,
                std::fs::Permissions::from_mode(m.permissions().mode()),
            )?;
        } else {
            let same =
                prev.as_ref().and_then(|p| std::fs::symlink_metadata(p).ok()).is_some_and(|pm| {
                    pm.is_file()
                        && pm.len() == m.len()
                        && pm.mtime() == m.mtime()
                        && pm.mtime_nsec() == m.mtime_nsec()
                        && pm.mode() == m.mode()
                });
            match prev.filter(|_| same) {
                Some(p) => std::fs::hard_link(p, &dst)?,
                None => {
                    std::fs::copy(&src, &dst)?;
                    std::fs::File::options().write(true).open(&dst)?.set_modified(m.modified()?)?;
                }
            }
        }
    }
    Ok(())
}

/// Where the manager keeps snapshots, its sealing key and its signing key.
#[derive(Clone, Copy)]
pub struct Context<'a> {
    pub data_dir: &'a Path,
    pub seal: Option<&'a SealKey>,
    pub signer: Option<&'a SigningKey>,
}

/// Writes the assignment of `payload` for `site` to `out`. `serial` is the serial to give a
/// manager-built assignment (the caller reserved it).
pub fn prepare(
    payload: &Payload,
    kind: JobKind,
    site: &HostedSite,
    serial: u64,
    job_id: u64,
    ctx: Context<'_>,
    out: &Path,
) -> Result<Prepared, PrepareError> {
    let (data_dir, seal, signer) = (ctx.data_dir, ctx.seal, ctx.signer);
    let name = site.name.clone();
    match payload {
        Payload::File { path } => {
            // The header names the site and the signature covers it: a file built for another
            // site never goes out under this one's name (servers would apply it there).
            let header = cm_assignment::read::AssignmentReader::open(Path::new(path))
                .map(|r| r.header().site.clone());
            if let Ok(found) = header
                && found != site.name
            {
                return Err(PrepareError::FileSite { path: path.clone(), site: name, found });
            }
            match signer {
                // Signed with this manager's key already (built with `cmover assignment build
                // --signing-key`): sent as it is; servers check every byte.
                Some(k) if cm_assignment::sign::is_signed_by(Path::new(path), &k.public_key()) => {
                    std::fs::copy(path, out)
                        .map_err(|source| PrepareError::Copy { path: path.clone(), source })?;
                }
                // Any other file is checked (trailer, data hash, seal) and signed on the way.
                Some(k) => {
                    cm_assignment::sign::sign_copy(Path::new(path), out, seal, k)
                        .map_err(|source| PrepareError::SignFile { path: path.clone(), source })?;
                }
                None => {
                    std::fs::copy(path, out)
                        .map_err(|source| PrepareError::Copy { path: path.clone(), source })?;
                }
            }
            let release = release_of_file(out);
            let named = release.map_or(String::new(), |r| format!(" (builds release {r})"));
            Ok(Prepared {
                serial: None,
                release,
                summary: format!("assignment file {path}{named}"),
            })
        }
        Payload::Staging => {
            let snap = snapshot_dir(data_dir, &site.name, serial);
            let snap_err = |source| PrepareError::Snapshot {
                site: name.clone(),
                from: site.staging.clone(),
                source,
            };
            if snap.exists() {
                std::fs::remove_dir_all(&snap).map_err(snap_err)?;
            }
            let replicate = kind == JobKind::Replicate;
            let shadow =
                site.live().map(|l| snapshot_dir(data_dir, &site.name, l)).filter(|_| !replicate);
            let filter = Filter::of(&site.filter)
                .map_err(|source| PrepareError::Rules { site: name.clone(), source })?;
            snapshot_filtered(
                Path::new(&site.staging),
                shadow.as_deref().filter(|s| s.is_dir()),
                &snap,
                &filter,
            )
            .map_err(snap_err)?;
            let mut opts = BuildOptions::new(
                if replicate { AssignmentType::Replicate } else { AssignmentType::Publish },
                serial,
            )
            .for_site(&site.name);
            opts.meta.job_id = job_id;
            opts.meta.base_serial = if replicate { 0 } else { site.live().unwrap_or(0) };
            opts.policy = compression_policy(&site.compression);
            opts.seal = seal.cloned();
            opts.signer = signer.cloned();
            let r = build(&snap, shadow.as_deref(), out, &opts)
                .map_err(|source| PrepareError::Build { site: name.clone(), source })?;
            Ok(Prepared {
                serial: Some(serial),
                release: Some(serial),
                summary: format!(
                    "release {serial} of site {name} against {}: {} new, {} changed, {} deleted, {} unchanged, {} deltas, {} literal bytes{}",
                    shadow.as_ref().map_or("nothing".to_string(), |_| format!(
                        "live release {}",
                        site.live().unwrap_or(0)
                    )),
                    r.new,
                    r.changed,
                    r.deleted,
                    r.unchanged,
                    r.deltas,
                    r.literal_bytes,
                    match r.modes_stripped {
                        0 => String::new(),
                        n => format!(", setuid/setgid/sticky bits stripped from {n} entries"),
                    }
                ),
            })
        }
        Payload::Live { servers } => {
            let live =
                site.live().ok_or_else(|| PrepareError::NothingLive { site: name.clone() })?;
            let snap = snapshot_dir(data_dir, &site.name, live);
            if !snap.is_dir() {
                return Err(PrepareError::SnapshotMissing {
                    site: name,
                    serial: live,
                    path: snap.display().to_string(),
                });
            }
            // Same serial as live everywhere else: a server that already has it skips the build.
            let mut opts = BuildOptions::new(AssignmentType::Replicate, live).for_site(&site.name);
            opts.meta.job_id = job_id;
            opts.policy = compression_policy(&site.compression);
            opts.seal = seal.cloned();
            opts.signer = signer.cloned();
            let r = build(&snap, None, out, &opts)
                .map_err(|source| PrepareError::Build { site: name.clone(), source })?;
            let to = if servers.is_empty() {
                "the content group".to_string()
            } else {
                servers.join(", ")
            };
            Ok(Prepared {
                serial: None,
                release: Some(live),
                summary: format!(
                    "live release {live} of site {name}, whole ({} files), for {to}",
                    r.new
                ),
            })
        }
        Payload::Commit { serial: target } => {
            // Nothing prepared since the live release (e.g. the publish already committed itself):
            // committing live again is harmless and leaves every server where it is.
            let target = target
                .or(site.prepared)
                .or(site.live())
                .ok_or_else(|| PrepareError::NothingPrepared { site: name.clone() })?;
            let summary = format!("commit of release {target} of site {name}");
            switching(AssignmentType::Commit, target, serial, job_id, site, ctx, out, summary)
        }
        Payload::Rollback { to } => {
            let back = rollback_target(site, *to, data_dir)?;
            let summary = format!("rollback of site {name} to release {back}");
            // Target 0: the release before live (what servers did before `to` existed).
            let target = to.map_or(0, |_| back);
            switching(AssignmentType::Rollback, target, serial, job_id, site, ctx, out, summary)
        }
        Payload::Switch { serial: target } => {
            check_switch(site, *target, data_dir)?;
            let summary = format!("switch of site {name} to release {target}");
            switching(AssignmentType::Switch, *target, serial, job_id, site, ctx, out, summary)
        }
        Payload::Remove { servers } => {
            crate::remove::prepare_remove(site, servers, serial, job_id, ctx, out)
        }
        Payload::Hot { paths, .. } => {
            crate::hot::prepare_hot(site, paths, serial, job_id, ctx, out)
        }
        Payload::Plugin { name: plugin, version, manifest, group, rollback, .. } => {
            let meta = Meta {
                kind: AssignmentType::Plugin,
                serial,
                job_id,
                base_serial: 0,
                target_serial: 0,
                site: site.name.clone(),
            };
            cm_assignment::plugin_run::build_plugin_run(
                out,
                meta,
                &crate::fleet::component_path(data_dir, version),
                &crate::fleet::manifest_path(data_dir, manifest),
                ctx.seal.cloned(),
                ctx.signer.cloned(),
            )
            .map_err(|source| PrepareError::Switch {
                site: name.clone(),
                what: "plugin",
                source,
            })?;
            let what = if rollback.is_some() { "rollback of plugin" } else { "plugin" };
            let summary = format!("{what} {plugin} {} for group {group}", &version[..12]);
            Ok(Prepared { serial: Some(serial), release: None, summary })
        }
        // Handled before `prepare` (`checkpoint.rs`, `sync.rs`); reaching here is a caller's bug.
        Payload::Checkpoint { .. } | Payload::CreateCheckpoint { .. } | Payload::CatchUp { .. } => {
            Err(PrepareError::NotAnAssignment { site: name })
        }
    }
}

/// Writes a header-only assignment (commit, rollback, switch, remove-site) carrying the site's release depth.
#[allow(clippy::too_many_arguments)]
pub(crate) fn switching(
    kind: AssignmentType,
    target: u64,
    serial: u64,
    job_id: u64,
    site: &HostedSite,
    ctx: Context<'_>,
    out: &Path,
    summary: String,
) -> Result<Prepared, PrepareError> {
    let meta = Meta {
        kind,
        serial,
        job_id,
        base_serial: release_depth(site),
        target_serial: target,
        site: site.name.clone(),
    };
    build_switch(out, meta, ctx.seal.cloned(), ctx.signer.cloned()).map_err(|source| {
        PrepareError::Switch { site: site.name.clone(), what: kind.name(), source }
    })?;
    Ok(Prepared { serial: Some(serial), release: None, summary })
}

/// The release depth switching assignments carry to the servers (their header's base-serial
/// field, signed with the rest): the site's `keep_releases`, so servers keep exactly the
/// releases the manager offers as rollback and switch targets.
pub fn release_depth(site: &HostedSite) -> u64 {
    u64::from(site.keep_releases.max(1))
}

/// The last `keep_releases` distinct committed releases, newest first: what servers keep.
pub fn kept_committed(site: &HostedSite) -> Vec<u64> {
    let mut recent: Vec<u64> = Vec::new();
    for s in site.committed.iter().rev() {
        if recent.len() >= site.keep_releases.max(1) as usize {
            break;
        }
        if !recent.contains(s) {
            recent.push(*s);
        }
    }
    recent
}

/// Whether the servers still keep release `serial`, as far as the manager knows: the manager
/// prunes its snapshots by the rule the servers prune their releases by, with the same depth
/// and at the same moments (after each commit, rollback and switch), and never keeps more than
/// they do; so a release whose snapshot is still here and that the rule keeps is on every
/// server that followed the runs. (The snapshot is also what the next delta is built against.)
pub fn release_kept(site: &HostedSite, serial: u64, data_dir: &Path) -> bool {
    snapshots_kept(site, &[serial]).0.contains(&serial)
        && snapshot_dir(data_dir, &site.name, serial).is_dir()
}

pub fn check_rollback(
    site: &HostedSite,
    to: Option<u64>,
    data_dir: &Path,
) -> Result<u64, PrepareError> {
    rollback_target(site, to, data_dir)
}

/// A switch goes only to a release the servers still keep, and not to live.
pub fn check_switch(site: &HostedSite, serial: u64, data_dir: &Path) -> Result<(), PrepareError> {
    if site.live() == Some(serial) {
        return Err(PrepareError::AlreadyLive { site: site.name.clone(), serial });
    }
    if !release_kept(site, serial, data_dir) {
        return Err(PrepareError::NotKept {
            site: site.name.clone(),
            serial,
            keep: site.keep_releases,
        });
    }
    Ok(())
}

fn rollback_target(
    site: &HostedSite,
    to: Option<u64>,
    data_dir: &Path,
) -> Result<u64, PrepareError> {
    let name = site.name.clone();
    let n = site.committed.len();
    if n < 2 {
        return Err(PrepareError::NothingToRollBack { site: name });
    }
    let to = match to {
        None => site.committed[n - 2],
        Some(to) if site.live() == Some(to) => {
            return Err(PrepareError::AlreadyLive { site: name, serial: to });
        }
        Some(to) if !site.committed[..n - 1].contains(&to) => {
            return Err(PrepareError::NeverCommitted { site: name, serial: to });
        }
        Some(to) => to,
    };
    if !kept_committed(site).contains(&to) || !release_kept(site, to, data_dir) {
        return Err(PrepareError::NotKept { site: name, serial: to, keep: site.keep_releases });
    }
    Ok(to)
}

/// The release an opaque assignment file builds, read from its header; `None` when the file is
/// not an assignment or only moves `current` (commit, rollback, switch) or commits itself (hot content).
fn release_of_file(path: &Path) -> Option<u64> {
    let r = cm_assignment::read::AssignmentReader::open(path).ok()?;
    let h = r.header();
    (!h.kind.is_switch_only() && h.kind != AssignmentType::HotContent).then_some(h.serial)
}

/// What a successful run changes in the site record: a publish is prepared, a commit goes live
/// on `servers` (the ones that reported success), a rollback returns to the release before.
pub fn after_success(
    payload: &Payload,
    site: &mut HostedSite,
    serial: Option<u64>,
    servers: &[String],
) {
    match payload {
        Payload::File { .. } | Payload::Live { .. } => {}
        Payload::Staging => site.prepared = serial,
        Payload::Commit { serial: target } => {
            if let Some(t) = target.or(site.prepared).or(site.live()) {
                if site.live() != Some(t) {
                    site.committed.push(t);
                }
                if site.prepared == Some(t) {
                    site.prepared = None;
                }
                for s in servers {
                    site.holders.insert(s.clone(), t);
                }
            }
        }
        Payload::Rollback { to } => {
            let n = site.committed.len();
            let at = match to {
                Some(t) => site.committed[..n.saturating_sub(1)].iter().rposition(|s| s == t),
                None => n.checked_sub(2),
            };
            site.committed.truncate(at.map_or(n.saturating_sub(1), |a| a + 1));
            if let Some(back) = site.live() {
                for s in servers {
                    site.holders.insert(s.clone(), back);
                }
            }
        }
        Payload::Switch { serial: t } => {
            if site.live() != Some(*t) {
                site.committed.push(*t);
            }
            if site.prepared == Some(*t) {
                site.prepared = None;
            }
            for s in servers {
                site.holders.insert(s.clone(), *t);
            }
        }
        Payload::Checkpoint { .. } => site.prepared = serial,
        Payload::CreateCheckpoint { .. } | Payload::CatchUp { .. } => {}
        Payload::Remove { .. } => crate::remove::after_remove(site, servers),
        // Recorded with its run (`hot::record`).
        Payload::Hot { .. } => {}
        // Plugin stores, not content (`fleet.rs`).
        Payload::Plugin { .. } => {}
    }
    // Live moved on these servers: a hot overlay there has ended (`hot.rs`).
    if matches!(
        payload,
        Payload::Commit { .. }
            | Payload::Rollback { .. }
            | Payload::Switch { .. }
            | Payload::Remove { .. }
    ) {
        for s in servers {
            site.hot.remove(s);
        }
    }
    // A server that holds a release again is no longer one the content was removed from.
    site.removed.retain(|s| !site.holders.contains_key(s));
}

/// The snapshots a site keeps: the last `keep_releases` committed releases (live, and what a
/// rollback returns to, which is then the next delta's base), the prepared one, and every one
/// newer than live (a publish may be under way). Everything else may go.
pub fn snapshots_kept(site: &HostedSite, on_disk: &[u64]) -> (Vec<u64>, Vec<u64>) {
    let recent = kept_committed(site);
    let newest_committed = site.committed.iter().max().copied().unwrap_or(0);
    on_disk
        .iter()
        .partition(|s| recent.contains(s) || site.prepared == Some(**s) || **s > newest_committed)
}

/// Deletes the snapshots of `site` that [`snapshots_kept`] lets go. Returns the serials pruned.
pub fn prune_snapshots(data_dir: &Path, site: &HostedSite) -> std::io::Result<Vec<u64>> {
    let dir = data_dir.join("snapshots").join(&site.name);
    let mut on_disk = Vec::new();
    match std::fs::read_dir(&dir) {
        Ok(rd) => {
            for e in rd {
                if let Some(n) = e?.file_name().to_str().and_then(|n| n.parse::<u64>().ok()) {
                    on_disk.push(n);
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    }
    on_disk.sort_unstable();
    let (_, gone) = snapshots_kept(site, &on_disk);
    for s in &gone {
        std::fs::remove_dir_all(snapshot_dir(data_dir, &site.name, *s))?;
    }
    Ok(gone)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(dir: &Path) -> HostedSite {
        HostedSite {
            name: "www".into(),
            content_group: "g".into(),
            staging: dir.display().to_string(),
            serial: 0,
            prepared: None,
            committed: vec![],
            keep_releases: 2,
            holders: Default::default(),
            keep_checkpoints: 5,
            removed: Default::default(),
            filter: Default::default(),
            compression: Default::default(),
            golive: None,
            rotation: Default::default(),
            refresh: Default::default(),
            built: Default::default(),
            hot: Default::default(),
        }
    }

    #[test]
    fn publish_commit_publish_builds_a_delta_against_the_live_snapshot() {
        let d = tempfile::tempdir().unwrap();
        let staging = d.path().join("staging");
        std::fs::create_dir_all(staging.join("css")).unwrap();
        std::fs::write(staging.join("index.html"), "<h1>hello</h1>".repeat(100)).unwrap();
        std::fs::write(staging.join("css/site.css"), "body{}").unwrap();
        let data = d.path().join("data");
        let mut s = site(&staging);
        let out1 = d.path().join("a1");
        let p = prepare(
            &Payload::Staging,
            JobKind::Publish,
            &s,
            1,
            7,
            Context { data_dir: &data, seal: None, signer: None },
            &out1,
        )
        .unwrap();
        assert!(p.summary.contains("3 new"), "{}", p.summary);
        assert!(snapshot_dir(&data, "www", 1).join("css/site.css").is_file());
        after_success(&Payload::Staging, &mut s, p.serial, &[]);
        assert_eq!(s.prepared, Some(1));
        // Commit before anything else: header only, target 1.
        let c = prepare(
            &Payload::Commit { serial: None },
            JobKind::Commit,
            &s,
            2,
            8,
            Context { data_dir: &data, seal: None, signer: None },
            &d.path().join("c2"),
        )
        .unwrap();
        assert_eq!(c.summary, "commit of release 1 of site www");
        after_success(&Payload::Commit { serial: None }, &mut s, c.serial, &["a".into()]);
        assert_eq!((s.live(), s.prepared), (Some(1), None));
        // The live release, whole, for a server that lacks it: replicate type, live's serial.
        let lv = d.path().join("live");
        let l = prepare(
            &Payload::Live { servers: vec!["new".into()] },
            JobKind::Replicate,
            &s,
            9,
            8,
            Context { data_dir: &data, seal: None, signer: None },
            &lv,
        )
        .unwrap();
        assert_eq!((l.serial, l.release), (None, Some(1)));
        let h = cm_assignment::read::AssignmentReader::open(&lv).unwrap().header().clone();
        assert_eq!((h.kind, h.serial, h.base_serial), (AssignmentType::Replicate, 1, 0));
        assert_eq!(release_of_file(&lv), Some(1), "a file payload names the release it builds");
        assert_eq!(release_of_file(&d.path().join("c2")), None, "a commit builds none");
        // A one-file change: only that file travels.
        std::fs::write(staging.join("css/site.css"), "body{color:red}").unwrap();
        let p3 = prepare(
            &Payload::Staging,
            JobKind::Publish,
            &s,
            3,
            9,
            Context { data_dir: &data, seal: None, signer: None },
            &d.path().join("a3"),
        )
        .unwrap();
        assert!(p3.summary.contains("0 new, 1 changed, 0 deleted, 1 unchanged"), "{}", p3.summary);
        assert!(
            std::fs::metadata(d.path().join("a3")).unwrap().len()
                < std::fs::metadata(&out1).unwrap().len()
        );
        assert!(matches!(
            prepare(
                &Payload::Live { servers: vec![] },
                JobKind::Replicate,
                &site(&staging),
                1,
                1,
                Context { data_dir: &data, seal: None, signer: None },
                &lv
            ),
            Err(PrepareError::NothingLive { .. })
        ));
        // Nothing committed twice yet: no rollback.
        assert!(matches!(
            prepare(
                &Payload::Rollback { to: None },
                JobKind::Rollback,
                &s,
                4,
                10,
                Context { data_dir: &data, seal: None, signer: None },
                &d.path().join("r")
            ),
            Err(PrepareError::NothingToRollBack { .. })
        ));
    }

    #[test]
    fn snapshots_link_unchanged_files_from_the_previous_one_and_copy_the_rest_with_their_mtime() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let d = tempfile::tempdir().unwrap();
        let (staging, one, two) =
            (d.path().join("staging"), d.path().join("1"), d.path().join("2"));
        std::fs::create_dir_all(staging.join("css")).unwrap();
        for (p, c) in
            [("index.html", "a"), ("css/site.css", "b"), ("mode.sh", "c"), ("gone.txt", "d")]
        {
            std::fs::write(staging.join(p), c).unwrap();
        }
        std::os::unix::fs::symlink("index.html", staging.join("home")).unwrap();
        snapshot_tree(&staging, None, &one).unwrap();
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
        let mt = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
        assert_ne!(
            ino(&one.join("index.html")),
            ino(&staging.join("index.html")),
            "staging's inodes are never shared"
        );
        assert_eq!(
            mt(&one.join("css/site.css")),
            mt(&staging.join("css/site.css")),
            "mtime kept on copy"
        );
        // Edit one file (same size, new mtime), change a mode, remove one, add one.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(staging.join("index.html"), "z").unwrap();
        std::fs::set_permissions(staging.join("mode.sh"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        std::fs::remove_file(staging.join("gone.txt")).unwrap();
        std::fs::write(staging.join("new.txt"), "n").unwrap();
        snapshot_tree(&staging, Some(&one), &two).unwrap();
        assert_eq!(
            ino(&two.join("css/site.css")),
            ino(&one.join("css/site.css")),
            "unchanged: linked"
        );
        assert_ne!(ino(&two.join("index.html")), ino(&one.join("index.html")), "edited: copied");
        assert_ne!(ino(&two.join("mode.sh")), ino(&one.join("mode.sh")), "mode changed: copied");
        assert_eq!(
            std::fs::read_to_string(one.join("index.html")).unwrap(),
            "a",
            "the older snapshot is untouched"
        );
        assert_eq!(std::fs::read_link(two.join("home")).unwrap(), Path::new("index.html"));
        assert!(!two.join("gone.txt").exists());
        let observe = |root: &Path| -> Vec<(String, String, u32)> {
            let mut v: Vec<_> = ["index.html", "css/site.css", "mode.sh", "new.txt"]
                .iter()
                .map(|p| {
                    (
                        p.to_string(),
                        std::fs::read_to_string(root.join(p)).unwrap(),
                        std::fs::metadata(root.join(p)).unwrap().mode(),
                    )
                })
                .collect();
            v.sort();
            v
        };
        assert_eq!(observe(&two), observe(&staging), "the snapshot is the staging tree");
    }

    #[test]
    fn snapshots_kept_are_the_last_committed_the_prepared_and_any_newer() {
        let d = tempfile::tempdir().unwrap();
        let mut s = site(d.path());
        s.committed = vec![1, 3, 5];
        s.prepared = Some(7);
        let (keep, gone) = snapshots_kept(&s, &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!((keep, gone), (vec![3, 5, 6, 7, 8], vec![1, 2, 4]));
        s.keep_releases = 1;
        s.prepared = None;
        assert_eq!(snapshots_kept(&s, &[1, 3, 5]).1, vec![1, 3]);
        // A release committed again counts once.
        s.keep_releases = 2;
        s.committed = vec![1, 3, 5, 3];
        assert_eq!(snapshots_kept(&s, &[1, 3, 5]).1, vec![1]);
        // On disk: what is let go is deleted, the rest stays.
        let data = d.path().join("data");
        for n in [1, 3, 5] {
            std::fs::create_dir_all(snapshot_dir(&data, "www", n).join("css")).unwrap();
        }
        assert_eq!(prune_snapshots(&data, &s).unwrap(), vec![1]);
        assert!(!snapshot_dir(&data, "www", 1).exists());
        assert!(snapshot_dir(&data, "www", 3).is_dir() && snapshot_dir(&data, "www", 5).is_dir());
        assert_eq!(
            prune_snapshots(&data, &site(d.path())).unwrap(),
            Vec::<u64>::new(),
            "nothing committed: nothing pruned"
        );
    }
}

//! Turning a job's payload into the assignment file a run distributes.
//!
//! For `Payload::Staging` the manager snapshots the staging tree (so what is sent is exactly what
//! is kept) and builds the assignment with cm-assignment against the snapshot of the live release
//! — the shadow copy. Snapshots live in `<data>/snapshots/<site>/<serial>`; the live one is the
//! base of the next delta, which is how only changed bytes travel.

pub use cm_assignment::SealKey;
use cm_assignment::write::Meta;
use cm_assignment::{AssignmentType, BuildOptions, build, detect::build_switch};
use std::path::{Path, PathBuf};
use thiserror::Error;

use crate::model::{HostedSite, JobKind, Payload};

#[derive(Debug, Error)]
pub enum PrepareError {
    #[error("copying assignment file {path}: {source}")]
    Copy { path: String, source: std::io::Error },
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
}

/// What was prepared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// The assignment's serial (manager-built payloads).
    pub serial: Option<u64>,
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
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(m.permissions().mode()))?;
        } else {
            std::fs::copy(&src, &dst)?;
        }
    }
    Ok(())
}

/// Where the manager keeps snapshots, and its sealing key.
#[derive(Clone, Copy)]
pub struct Context<'a> {
    pub data_dir: &'a Path,
    pub seal: Option<&'a SealKey>,
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
    let (data_dir, seal) = (ctx.data_dir, ctx.seal);
    let name = site.name.clone();
    match payload {
        Payload::File { path } => {
            std::fs::copy(path, out).map_err(|source| PrepareError::Copy { path: path.clone(), source })?;
            Ok(Prepared { serial: None, summary: format!("assignment file {path}") })
        }
        Payload::Staging => {
            let snap = snapshot_dir(data_dir, &site.name, serial);
            let snap_err = |source| PrepareError::Snapshot { site: name.clone(), from: site.staging.clone(), source };
            if snap.exists() {
                std::fs::remove_dir_all(&snap).map_err(snap_err)?;
            }
            copy_tree(Path::new(&site.staging), &snap).map_err(snap_err)?;
            let replicate = kind == JobKind::Replicate;
            let shadow = site.live().map(|l| snapshot_dir(data_dir, &site.name, l)).filter(|_| !replicate);
            let mut opts = BuildOptions::new(if replicate { AssignmentType::Replicate } else { AssignmentType::Publish }, serial);
            opts.meta.job_id = job_id;
            opts.meta.base_serial = if replicate { 0 } else { site.live().unwrap_or(0) };
            opts.seal = seal.cloned();
            let r = build(&snap, shadow.as_deref(), out, &opts).map_err(|source| PrepareError::Build { site: name.clone(), source })?;
            Ok(Prepared {
                serial: Some(serial),
                summary: format!(
                    "release {serial} of site {name} against {}: {} new, {} changed, {} deleted, {} unchanged, {} deltas, {} literal bytes",
                    shadow.as_ref().map_or("nothing".to_string(), |_| format!("live release {}", site.live().unwrap_or(0))),
                    r.new,
                    r.changed,
                    r.deleted,
                    r.unchanged,
                    r.deltas,
                    r.literal_bytes
                ),
            })
        }
        Payload::Commit { serial: target } => {
            let target = target.or(site.prepared).ok_or_else(|| PrepareError::NothingPrepared { site: name.clone() })?;
            let meta = Meta { kind: AssignmentType::Commit, serial, job_id, base_serial: 0, target_serial: target };
            build_switch(out, meta, seal.cloned()).map_err(|source| PrepareError::Switch { site: name.clone(), what: "commit", source })?;
            Ok(Prepared { serial: Some(serial), summary: format!("commit of release {target} of site {name}") })
        }
        Payload::Rollback => {
            if site.committed.len() < 2 {
                return Err(PrepareError::NothingToRollBack { site: name });
            }
            let meta = Meta { kind: AssignmentType::Rollback, serial, job_id, base_serial: 0, target_serial: 0 };
            build_switch(out, meta, seal.cloned()).map_err(|source| PrepareError::Switch { site: name.clone(), what: "rollback", source })?;
            let back = site.committed[site.committed.len() - 2];
            Ok(Prepared { serial: Some(serial), summary: format!("rollback of site {name} to release {back}") })
        }
    }
}

/// What a successful run changes in the site record: a publish is prepared, a commit goes live,
/// a rollback returns to the release before.
pub fn after_success(payload: &Payload, site: &mut HostedSite, serial: Option<u64>) {
    match payload {
        Payload::File { .. } => {}
        Payload::Staging => site.prepared = serial,
        Payload::Commit { serial: target } => {
            if let Some(t) = target.or(site.prepared) {
                site.committed.push(t);
                if site.prepared == Some(t) {
                    site.prepared = None;
                }
            }
        }
        Payload::Rollback => {
            site.committed.pop();
        }
    }
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
        let p = prepare(&Payload::Staging, JobKind::Publish, &s, 1, 7, Context { data_dir: &data, seal: None }, &out1).unwrap();
        assert!(p.summary.contains("3 new"), "{}", p.summary);
        assert!(snapshot_dir(&data, "www", 1).join("css/site.css").is_file());
        after_success(&Payload::Staging, &mut s, p.serial);
        assert_eq!(s.prepared, Some(1));
        // Commit before anything else: header only, target 1.
        let c = prepare(&Payload::Commit { serial: None }, JobKind::Commit, &s, 2, 8, Context { data_dir: &data, seal: None }, &d.path().join("c2")).unwrap();
        assert_eq!(c.summary, "commit of release 1 of site www");
        after_success(&Payload::Commit { serial: None }, &mut s, c.serial);
        assert_eq!((s.live(), s.prepared), (Some(1), None));
        // A one-file change: only that file travels.
        std::fs::write(staging.join("css/site.css"), "body{color:red}").unwrap();
        let p3 = prepare(&Payload::Staging, JobKind::Publish, &s, 3, 9, Context { data_dir: &data, seal: None }, &d.path().join("a3")).unwrap();
        assert!(p3.summary.contains("0 new, 1 changed, 0 deleted, 1 unchanged"), "{}", p3.summary);
        assert!(std::fs::metadata(d.path().join("a3")).unwrap().len() < std::fs::metadata(&out1).unwrap().len());
        // Nothing committed twice yet: no rollback.
        assert!(matches!(
            prepare(&Payload::Rollback, JobKind::Rollback, &s, 4, 10, Context { data_dir: &data, seal: None }, &d.path().join("r")),
            Err(PrepareError::NothingToRollBack { .. })
        ));
    }
}

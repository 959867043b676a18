//! Checkpoints (seed: CreateCheckPoint): a complete, compressed copy of a site's shadow copy —
//! the snapshot of its live release — kept in the manager's data directory, and restoring one
//! to every server of the site's group as a new release.
//!
//! The archive is an assignment file (`docs/assignment-format.md`) of type `restore`, built
//! from empty out of the live snapshot: every file's payload zstd-compressed per the
//! compression policy (formats already compressed, and tiny files, stored as they are), every
//! file's BLAKE3 and the tree manifest inside, so the format, its reader and its checks are the
//! ones the whole system already trusts. The BLAKE3 of the archive is recorded in the store
//! (`checkpoints` table) and checked before every use: a damaged archive fails the restore with
//! the expected and found hashes named.
//!
//! A restore unpacks the archive into a new snapshot (`snapshots/<site>/<serial>`) with the
//! reference interpreter, then builds the run's assignment from it like a publish: against the
//! live snapshot (a delta: only what differs travels), or from empty when that delta comes out
//! larger than the archive itself. The release is then committed like any other.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cm_assignment::{AssignmentReader, AssignmentType, BuildOptions, build};
use thiserror::Error;

use crate::model::{Checkpoint, HostedSite, Job, SnapshotInfo};
use crate::prepare::{Context, Prepared, snapshot_dir};
use crate::server::{Inner, ManagerError};
use crate::{now_ms, policy};

#[derive(Debug, Error)]
pub enum CheckpointError {
    #[error("site {site} has nothing live to checkpoint")]
    NothingLive { site: String },
    #[error("site {site}: the snapshot of live release {serial} is missing at {path}")]
    SnapshotMissing { site: String, serial: u64, path: String },
    #[error("checkpoint {id} of site {site}: {what}: {source}")]
    Io { site: String, id: u64, what: String, source: std::io::Error },
    #[error("checkpoint {id} of site {site}: building the archive: {source}")]
    Build { site: String, id: u64, source: cm_assignment::detect::BuildError },
    #[error(
        "checkpoint {id} of site {site} is damaged: its archive {path} has BLAKE3 {found}, the store recorded {expected}; nothing restored"
    )]
    Damaged { site: String, id: u64, path: String, expected: String, found: String },
    #[error("checkpoint {id} of site {site}: unpacking the archive: {source}")]
    Unpack { site: String, id: u64, source: cm_assignment::reference::ApplyAllError },
    #[error("checkpoint {id} of site {site}: reading the archive: {source}")]
    Read { site: String, id: u64, source: cm_assignment::ReadError },
    #[error("restoring checkpoint {id} of site {site}: building the release: {source}")]
    Restore { site: String, id: u64, source: cm_assignment::detect::BuildError },
}

/// Where checkpoint `id` of `site` is kept.
pub fn archive_path(data_dir: &Path, site: &str, id: u64) -> PathBuf {
    data_dir.join("checkpoints").join(site).join(format!("{id}.cma"))
}

fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(path)?)?;
    Ok(h.finalize().to_hex().to_string())
}

/// Writes checkpoint `id` of the site's live snapshot. The archive gets its final name only
/// once complete; the record to store is returned.
pub fn create(
    data_dir: &Path,
    site: &HostedSite,
    id: u64,
    note: Option<String>,
    now_ms: u64,
) -> Result<Checkpoint, CheckpointError> {
    let name = site.name.clone();
    let live = site.live().ok_or_else(|| CheckpointError::NothingLive { site: name.clone() })?;
    let snap = snapshot_dir(data_dir, &name, live);
    if !snap.is_dir() {
        return Err(CheckpointError::SnapshotMissing {
            site: name,
            serial: live,
            path: snap.display().to_string(),
        });
    }
    let io = |what: &str| {
        let (site, what) = (name.clone(), what.to_string());
        move |source| CheckpointError::Io { site, id, what, source }
    };
    let path = archive_path(data_dir, &name, id);
    let dir = path.parent().unwrap_or(data_dir);
    std::fs::create_dir_all(dir).map_err(io("creating the checkpoint directory"))?;
    let tmp = dir.join(format!(".{id}.cma.tmp"));
    let opts = BuildOptions::new(AssignmentType::Restore, live).for_site(&name);
    let r = build(&snap, None, &tmp, &opts).map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        CheckpointError::Build { site: name.clone(), id, source }
    })?;
    std::fs::rename(&tmp, &path).map_err(io("naming the archive"))?;
    let blake3 = hash_file(&path).map_err(io("hashing the archive"))?;
    let size = std::fs::metadata(&path).map_err(io("reading the archive's size"))?.len();
    Ok(Checkpoint {
        site: name,
        id,
        release: live,
        created_ms: now_ms,
        note,
        size,
        blake3,
        entries: r.new,
        content_bytes: r.literal_bytes,
    })
}

/// Checks the archive against the BLAKE3 the store recorded; returns its path.
pub fn verify(data_dir: &Path, cp: &Checkpoint) -> Result<PathBuf, CheckpointError> {
    let path = archive_path(data_dir, &cp.site, cp.id);
    let found = hash_file(&path).map_err(|source| CheckpointError::Io {
        site: cp.site.clone(),
        id: cp.id,
        what: format!("reading {}", path.display()),
        source,
    })?;
    if found != cp.blake3 {
        return Err(CheckpointError::Damaged {
            site: cp.site.clone(),
            id: cp.id,
            path: path.display().to_string(),
            expected: cp.blake3.clone(),
            found,
        });
    }
    Ok(path)
}

/// Deletes a checkpoint's archive (a missing one is already gone).
pub fn remove_archive(data_dir: &Path, cp: &Checkpoint) -> std::io::Result<()> {
    match std::fs::remove_file(archive_path(data_dir, &cp.site, cp.id)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The checkpoints past the site's `keep_checkpoints`, oldest first (`all` is oldest first).
pub fn beyond_kept<'a>(site: &HostedSite, all: &'a [Checkpoint]) -> &'a [Checkpoint] {
    &all[..all.len().saturating_sub(site.keep_checkpoints.max(1) as usize)]
}

/// Writes the assignment that brings the servers to checkpoint `cp`'s content as release
/// `serial`: the archive verified, unpacked into that release's snapshot, and the assignment
/// built against the live snapshot — or whole, from empty, when the delta is larger than the
/// archive.
pub fn prepare_restore(
    cp: &Checkpoint,
    site: &HostedSite,
    serial: u64,
    job_id: u64,
    ctx: Context<'_>,
    out: &Path,
) -> Result<Prepared, CheckpointError> {
    let (name, id) = (site.name.clone(), cp.id);
    let archive = verify(ctx.data_dir, cp)?;
    let snap = snapshot_dir(ctx.data_dir, &name, serial);
    let io = |what: &str| {
        let (site, what) = (name.clone(), what.to_string());
        move |source| CheckpointError::Io { site, id, what, source }
    };
    if snap.exists() {
        std::fs::remove_dir_all(&snap).map_err(io("removing an old partial snapshot"))?;
    }
    std::fs::create_dir_all(&snap).map_err(io("creating the release's snapshot"))?;
    let reader = AssignmentReader::open(&archive).map_err(|source| CheckpointError::Read {
        site: name.clone(),
        id,
        source,
    })?;
    cm_assignment::reference::apply_all(&reader, &snap)
        .map_err(|source| CheckpointError::Unpack { site: name.clone(), id, source })?;
    let live =
        site.live().map(|l| (l, snapshot_dir(ctx.data_dir, &name, l))).filter(|(_, p)| p.is_dir());
    let options = |kind, base| {
        let mut o = BuildOptions::new(kind, serial).for_site(&name);
        o.meta.job_id = job_id;
        o.meta.base_serial = base;
        o.seal = ctx.seal.cloned();
        o.signer = ctx.signer.cloned();
        o
    };
    let build_err = |source| CheckpointError::Restore { site: name.clone(), id, source };
    let mut how = "whole".to_string();
    let mut built = None;
    if let Some((l, base)) = &live {
        let r = build(&snap, Some(base), out, &options(AssignmentType::Publish, *l))
            .map_err(build_err)?;
        if r.file_len <= cp.size {
            how = format!(
                "a delta against live release {l}: {} new, {} changed, {} deleted, {} unchanged",
                r.new, r.changed, r.deleted, r.unchanged
            );
            built = Some(r);
        }
    }
    let r = match built {
        Some(r) => r,
        None => build(&snap, None, out, &options(AssignmentType::Restore, 0)).map_err(build_err)?,
    };
    Ok(Prepared {
        serial: Some(serial),
        release: Some(serial),
        summary: format!(
            "restore of checkpoint {id} (release {}) of site {name} as release {serial}, {how} ({} bytes; the archive is {})",
            cp.release, r.file_len, cp.size
        ),
    })
}

impl Inner {
    /// Takes checkpoint of `site`'s live snapshot now (blocking: call off the async threads),
    /// records it and deletes the oldest past the site's `keep_checkpoints`.
    pub(crate) fn create_checkpoint(
        &self,
        site: &str,
        note: Option<String>,
        job: Option<u64>,
    ) -> Result<Checkpoint, ManagerError> {
        let s = self
            .db
            .site(site)?
            .ok_or_else(|| ManagerError::NotFound(format!("hosted site {site}")))?;
        if s.live().is_none() {
            // Checked before an id is taken, so ids count checkpoints made.
            return Err(CheckpointError::NothingLive { site: site.to_string() }.into());
        }
        let id = self.db.write(|t| t.next_checkpoint_id(site))?;
        let now = now_ms();
        let cp = create(&self.cfg.data_dir, &s, id, note, now)?;
        self.db.write(|t| {
            t.put_checkpoint(&cp)?;
            t.log(
                now,
                job,
                None,
                format!(
                    "checkpoint {id} of site {site} created: release {}, {} entries, {} bytes in an archive of {} (blake3 {})",
                    cp.release,
                    cp.entries,
                    cp.content_bytes,
                    cp.size,
                    &cp.blake3[..16]
                ),
            )
        })?;
        let all = self.db.checkpoints(site)?;
        for old in beyond_kept(&s, &all) {
            self.delete_checkpoint(site, old.id, "past keep_checkpoints")?;
        }
        Ok(cp)
    }

    /// Deletes a checkpoint: its record, then its archive.
    pub(crate) fn delete_checkpoint(
        &self,
        site: &str,
        id: u64,
        why: &str,
    ) -> Result<Checkpoint, ManagerError> {
        let cp = self
            .db
            .checkpoint(site, id)?
            .ok_or_else(|| ManagerError::NotFound(format!("checkpoint {id} of site {site}")))?;
        self.db.write(|t| {
            t.remove_checkpoint(site, id)?;
            t.log(now_ms(), None, None, format!("checkpoint {id} of site {site} deleted ({why})"))
        })?;
        remove_archive(&self.cfg.data_dir, &cp).map_err(|source| ManagerError::Io {
            what: format!("deleting the archive of checkpoint {id} of site {site}"),
            source,
        })?;
        Ok(cp)
    }

    /// A job of kind `checkpoint`: no assignment and no servers. The job is leased for its run
    /// timeout (so a manager that dies meanwhile tries again then) and the archive written on a
    /// blocking thread; the outcome moves the job on like a run's.
    pub(crate) fn checkpoint_job(
        self: Arc<Self>,
        job: Job,
        note: Option<String>,
        now: u64,
    ) -> Result<(), ManagerError> {
        self.db.write(|t| {
            let mut j = job.clone();
            j.next_run_ms = now + j.spec.policy.run_timeout_ms;
            j.attempts += 1;
            j.last_reason = Some("checkpoint under way".into());
            t.put_job(&j)?;
            t.log(now, Some(j.id), None, format!("checkpoint of site {} started", j.spec.site))
        })?;
        tokio::task::spawn_blocking(move || {
            let r = self.create_checkpoint(&job.spec.site, note, Some(job.id));
            let now = now_ms();
            let attempts = job.attempts + 1;
            let (next, reason) = match &r {
                Ok(_) => (policy::after_success(job.spec.every_ms, now), None),
                Err(e) => {
                    let why = e.to_string();
                    (policy::after_failure(&job.spec.policy, attempts, now, &why), Some(why))
                }
            };
            let written = self.db.write(|t| {
                let Some(mut j) = self.db.job(job.id)? else { return Ok(()) };
                (j.state, j.next_run_ms, j.attempts) =
                    (next.state.clone(), next.next_run_ms, next.attempts);
                j.last_reason = reason.clone();
                t.put_job(&j)?;
                match &reason {
                    Some(why) => t.log(now, Some(j.id), None, format!("checkpoint failed: {why}")),
                    None => Ok(()),
                }
            });
            if let Err(e) = written.map_err(ManagerError::from) {
                tracing::error!(job = job.id, "recording a checkpoint job's outcome: {e}");
            }
        });
        Ok(())
    }

    /// The site's snapshots (shadow copies on disk), each with its state and the checkpoint it
    /// follows: the newest checkpoint of that release or an earlier one.
    pub(crate) fn snapshots(&self, site: &str) -> Result<Vec<SnapshotInfo>, ManagerError> {
        let s = self
            .db
            .site(site)?
            .ok_or_else(|| ManagerError::NotFound(format!("hosted site {site}")))?;
        let checkpoints = self.db.checkpoints(site)?;
        let mut out = Vec::new();
        let dir = self.cfg.data_dir.join("snapshots").join(site);
        let mut on_disk: Vec<u64> = match std::fs::read_dir(&dir) {
            Ok(rd) => rd
                .flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(ManagerError::Io {
                    what: format!("listing {}", dir.display()),
                    source,
                });
            }
        };
        on_disk.sort_unstable();
        for release in on_disk {
            let state = if s.live() == Some(release) {
                "live"
            } else if s.committed.contains(&release) {
                "committed"
            } else if s.prepared == Some(release) {
                "prepared"
            } else {
                "building"
            };
            let follows = checkpoints
                .iter()
                .filter(|c| c.release <= release)
                .max_by_key(|c| (c.release, c.id))
                .map(|c| c.id);
            out.push(SnapshotInfo { release, state: state.into(), follows_checkpoint: follows });
        }
        Ok(out)
    }
}

//! Has the staging tree changed since a snapshot? A recurring publish asks before it builds
//! anything, so a period in which nothing changed makes no release (and pushes no rollback
//! target out). Cheap first: names, types, modes, sizes and symlink targets must match, and a
//! file with the same size and mtime (to the nanosecond; snapshots keep staging's mtimes) and
//! mode counts as unchanged without being read. Only a file whose mtime differs is hashed, both
//! sides, so a touched-but-equal file is still "unchanged".
//!
//! A writer can race the check (a file truncated and written again looks changed for an
//! instant), so after the build a second guard compares the new snapshot with the newest
//! release's: equal, and the run is dropped the same way.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use crate::filter::Filter;
use crate::model::{HostedSite, Job, Payload};
use crate::server::{Inner, ManagerError};
use crate::{policy, prepare};

impl Inner {
    /// For a recurring publish of the staging tree: when staging equals the snapshot of the
    /// newest release (prepared, else live), records "unchanged, nothing to publish", schedules
    /// the next period and returns true; the job makes no run.
    pub(crate) fn staging_unchanged(
        self: &Arc<Self>,
        job: &Job,
        now: u64,
    ) -> Result<bool, ManagerError> {
        if job.spec.payload != Payload::Staging || job.spec.every_ms.is_none() {
            return Ok(false);
        }
        let Some(site) = self.db.site(&job.spec.site)? else { return Ok(false) };
        let Some(newest) = site.prepared.or(site.live()) else { return Ok(false) };
        let snap = prepare::snapshot_dir(&self.cfg.data_dir, &site.name, newest);
        // Rules that do not compile: the publish says why.
        let Ok(filter) = Filter::of(&site.filter) else { return Ok(false) };
        // Unreadable or missing on either side: not known to be unchanged, so publish.
        let staging = Path::new(&site.staging);
        if !snap.is_dir() || !same_tree_filtered(staging, &snap, &filter).unwrap_or(false) {
            return Ok(false);
        }
        self.no_run(job, unchanged_reason(&site.name, newest), now)?;
        Ok(true)
    }

    /// The second guard, right after a recurring publish's build: when the snapshot it made
    /// (release `built`) holds exactly what the newest release holds, the snapshot and the run's
    /// assignment `copy` are dropped and the job makes no run, as in [`Self::staging_unchanged`].
    pub(crate) fn built_nothing_new(
        self: &Arc<Self>,
        job: &Job,
        site: &HostedSite,
        built: Option<u64>,
        copy: &Path,
        now: u64,
    ) -> Result<bool, ManagerError> {
        if job.spec.payload != Payload::Staging
            || job.spec.every_ms.is_none()
            || job.pending_commit.is_some()
        {
            return Ok(false);
        }
        let Some(built) = built else { return Ok(false) };
        let Some(newest) = snapshot_equals_newest(&self.cfg.data_dir, site, built) else {
            return Ok(false);
        };
        let _ = fs::remove_dir_all(prepare::snapshot_dir(&self.cfg.data_dir, &site.name, built));
        let _ = fs::remove_file(copy);
        self.no_run(job, unchanged_reason(&site.name, newest), now)?;
        Ok(true)
    }

    /// The job makes no run this time, for `reason`: recorded on the job (with one history line
    /// per stretch of the same reason, not one per period) and the job moves on as after a
    /// successful run (done, or due a period later).
    pub(crate) fn no_run(&self, job: &Job, reason: String, now: u64) -> Result<(), ManagerError> {
        let next = policy::after_success(job.spec.every_ms, now);
        self.db.write(|t| {
            let mut j = job.clone();
            (j.state, j.next_run_ms, j.attempts) = (next.state.clone(), next.next_run_ms, 0);
            if j.last_reason.as_deref() != Some(reason.as_str()) {
                t.log(now, Some(j.id), None, reason.clone())?;
            }
            j.last_reason = Some(reason.clone());
            t.put_job(&j)?;
            Ok::<_, ManagerError>(())
        })
    }
}

fn unchanged_reason(site: &str, newest: u64) -> String {
    format!(
        "unchanged, nothing to publish: the staging tree of site {site} equals release {newest}"
    )
}

/// The newest release of `site` (prepared, else live) when its snapshot holds exactly what the
/// snapshot of release `built` holds.
pub fn snapshot_equals_newest(data_dir: &Path, site: &HostedSite, built: u64) -> Option<u64> {
    let newest = site.prepared.or(site.live()).filter(|n| *n != built)?;
    let old = prepare::snapshot_dir(data_dir, &site.name, newest);
    let new = prepare::snapshot_dir(data_dir, &site.name, built);
    (old.is_dir() && same_tree(&new, &old).unwrap_or(false)).then_some(newest)
}

/// True when `staging` holds exactly what `snapshot` holds.
pub fn same_tree(staging: &Path, snapshot: &Path) -> io::Result<bool> {
    same_tree_filtered(staging, snapshot, &Filter::all())
}

/// True when what `filter` admits of `staging` is exactly what `snapshot` holds (a snapshot
/// holds only what the filter admitted): a change to an excluded path alone is no change.
pub fn same_tree_filtered(staging: &Path, snapshot: &Path, filter: &Filter) -> io::Result<bool> {
    same_below(staging, snapshot, filter, Path::new(""))
}

fn same_below(staging: &Path, snapshot: &Path, filter: &Filter, rel: &Path) -> io::Result<bool> {
    let mut a = Vec::new();
    for e in fs::read_dir(staging)? {
        let e = e?;
        let is_dir = fs::symlink_metadata(e.path())?.is_dir();
        if filter.admits(&rel.join(e.file_name()), is_dir) {
            a.push(e.file_name());
        }
    }
    a.sort();
    let mut b =
        fs::read_dir(snapshot)?.map(|e| e.map(|e| e.file_name())).collect::<Result<Vec<_>, _>>()?;
    b.sort();
    if a != b {
        return Ok(false);
    }
    for name in a {
        let (pa, pb) = (staging.join(&name), snapshot.join(&name));
        let (ma, mb) = (fs::symlink_metadata(&pa)?, fs::symlink_metadata(&pb)?);
        if ma.file_type() != mb.file_type() {
            return Ok(false);
        }
        let same = if ma.file_type().is_symlink() {
            fs::read_link(&pa)? == fs::read_link(&pb)?
        } else if ma.is_dir() {
            ma.mode() & 0o7777 == mb.mode() & 0o7777
                && same_below(&pa, &pb, filter, &rel.join(&name))?
        } else {
            ma.mode() & 0o7777 == mb.mode() & 0o7777
                && ma.len() == mb.len()
                && ((ma.mtime(), ma.mtime_nsec()) == (mb.mtime(), mb.mtime_nsec())
                    || same_content(&pa, &pb)?)
        };
        if !same {
            return Ok(false);
        }
    }
    Ok(true)
}

fn same_content(a: &Path, b: &Path) -> io::Result<bool> {
    let hash = |p: &Path| -> io::Result<blake3::Hash> {
        let mut h = blake3::Hasher::new();
        h.update_reader(fs::File::open(p)?)?;
        Ok(h.finalize())
    };
    Ok(hash(a)? == hash(b)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prepare::snapshot_tree;

    #[test]
    fn a_snapshot_equals_its_staging_until_something_really_changes() {
        let d = tempfile::tempdir().unwrap();
        let (staging, snap) = (d.path().join("staging"), d.path().join("snap"));
        fs::create_dir_all(staging.join("css")).unwrap();
        fs::write(staging.join("index.html"), "hello").unwrap();
        fs::write(staging.join("css/site.css"), "body{}").unwrap();
        std::os::unix::fs::symlink("index.html", staging.join("home")).unwrap();
        snapshot_tree(&staging, None, &snap).unwrap();
        assert!(same_tree(&staging, &snap).unwrap());
        // Touched, same bytes: still unchanged (hashed, since the mtime differs).
        std::thread::sleep(std::time::Duration::from_millis(10));
        fs::write(staging.join("index.html"), "hello").unwrap();
        assert!(same_tree(&staging, &snap).unwrap());
        // Same size, other bytes.
        fs::write(staging.join("index.html"), "jello").unwrap();
        assert!(!same_tree(&staging, &snap).unwrap());
        fs::write(staging.join("index.html"), "hello").unwrap();
        // A new file, a removed one, a link retargeted, a mode changed: each is a change.
        fs::write(staging.join("css/new.css"), "").unwrap();
        assert!(!same_tree(&staging, &snap).unwrap());
        fs::remove_file(staging.join("css/new.css")).unwrap();
        assert!(same_tree(&staging, &snap).unwrap());
        fs::remove_file(staging.join("home")).unwrap();
        std::os::unix::fs::symlink("css", staging.join("home")).unwrap();
        assert!(!same_tree(&staging, &snap).unwrap());
        fs::remove_file(staging.join("home")).unwrap();
        std::os::unix::fs::symlink("index.html", staging.join("home")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(staging.join("css/site.css"), fs::Permissions::from_mode(0o600))
            .unwrap();
        assert!(!same_tree(&staging, &snap).unwrap());
    }

    #[test]
    fn a_build_equal_to_the_newest_release_is_found_by_the_second_guard() {
        let d = tempfile::tempdir().unwrap();
        let staging = d.path().join("staging");
        fs::create_dir_all(&staging).unwrap();
        fs::write(staging.join("index.html"), "hello").unwrap();
        let snap = |n: u64| prepare::snapshot_dir(d.path(), "www", n);
        snapshot_tree(&staging, None, &snap(1)).unwrap();
        let mut site: HostedSite = serde_json::from_value(serde_json::json!({
            "name": "www", "content_group": "g", "staging": staging, "committed": [1],
        }))
        .unwrap();
        // Rewritten with the same bytes (new mtime): nothing new.
        fs::write(staging.join("index.html"), "hello").unwrap();
        snapshot_tree(&staging, Some(&snap(1)), &snap(2)).unwrap();
        assert_eq!(snapshot_equals_newest(d.path(), &site, 2), Some(1));
        // Other bytes: a real release.
        fs::write(staging.join("index.html"), "jello").unwrap();
        snapshot_tree(&staging, Some(&snap(1)), &snap(3)).unwrap();
        assert_eq!(snapshot_equals_newest(d.path(), &site, 3), None);
        // Compared with the prepared release when there is one.
        site.prepared = Some(3);
        snapshot_tree(&staging, Some(&snap(3)), &snap(4)).unwrap();
        assert_eq!(snapshot_equals_newest(d.path(), &site, 4), Some(3));
        // Nothing released yet, or the newest is the build itself: no guard.
        assert_eq!(snapshot_equals_newest(d.path(), &site, 3), None);
        site.prepared = None;
        site.committed.clear();
        assert_eq!(snapshot_equals_newest(d.path(), &site, 2), None);
    }

    #[test]
    fn excluded_paths_are_in_no_snapshot_and_changing_them_is_no_change() {
        use crate::filter::Filter;
        use crate::model::ContentFilter;
        use crate::prepare::snapshot_filtered;
        let d = tempfile::tempdir().unwrap();
        let (staging, snap) = (d.path().join("staging"), d.path().join("snap"));
        fs::create_dir_all(staging.join("drafts")).unwrap();
        fs::write(staging.join("index.html"), "hello").unwrap();
        fs::write(staging.join("notes.tmp"), "scratch").unwrap();
        fs::write(staging.join("drafts/next.html"), "soon").unwrap();
        let filter = Filter::of(&ContentFilter {
            include: vec![],
            exclude: vec!["**/*.tmp".into(), "drafts".into()],
        })
        .unwrap();
        snapshot_filtered(&staging, None, &snap, &filter).unwrap();
        assert!(snap.join("index.html").is_file());
        assert!(!snap.join("notes.tmp").exists() && !snap.join("drafts").exists());
        assert!(same_tree_filtered(&staging, &snap, &filter).unwrap());
        assert!(!same_tree(&staging, &snap).unwrap(), "unfiltered, staging has more");
        fs::write(staging.join("notes.tmp"), "more scratch").unwrap();
        fs::write(staging.join("drafts/other.html"), "later").unwrap();
        assert!(same_tree_filtered(&staging, &snap, &filter).unwrap(), "excluded changes only");
        fs::write(staging.join("index.html"), "hello!").unwrap();
        assert!(!same_tree_filtered(&staging, &snap, &filter).unwrap());
    }
}

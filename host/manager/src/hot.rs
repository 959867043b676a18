//! Hot content (the job kind `hot`): named files of the staging tree to a few servers at once,
//! as a load balancer asks for them. The assignment is the live release plus those files, of
//! type hot-content (built against the live snapshot, so only the named files travel), sent
//! only to the chosen servers, which switch to it at once without committing it: their
//! committed live release stays the site's (`cm_site`'s `hot.rs`). The site records each
//! holder in `HostedSite::hot`, so it is not taken for out of date, and the next commit,
//! rollback or switch there ends the overlay.
//!
//! Paths are checked before anything is built: relative, normalised (no `.`, `..` or empty
//! component), admitted by the site's filter, and a regular file in staging reached through
//! real directories (no symlink on the way), so nothing outside the staging tree is read.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path};

use cm_assignment::{AssignmentType, BuildOptions, build};
use thiserror::Error;

use crate::filter::{Filter, compression_policy};
use crate::model::{HostedSite, HotHolding};
use crate::prepare::{self, Context, PrepareError, Prepared, snapshot_dir};

/// Most paths one hot job names.
pub const MAX_PATHS: usize = 1_000;
/// Longest path, bytes.
pub const MAX_PATH_LEN: usize = 1_024;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum HotPathError {
    #[error("no paths named: a hot job carries 1 to {MAX_PATHS} files")]
    None,
    #[error("{0} paths named: a hot job carries at most {MAX_PATHS}")]
    TooMany(usize),
    #[error(
        "`{0}` is not a path inside the site (relative, no `.`, `..` or empty component, at most {MAX_PATH_LEN} bytes)"
    )]
    Outside(String),
    #[error("`{0}` is left out by the site's filter")]
    Filtered(String),
    #[error("`{path}` is not in the staging tree as a regular file ({why})")]
    NotInStaging { path: String, why: String },
}

/// Checks `paths` against the site (see the module doc). Returns them sorted, deduplicated.
pub fn check_paths(site: &HostedSite, paths: &[String]) -> Result<Vec<String>, HotPathError> {
    if paths.is_empty() {
        return Err(HotPathError::None);
    }
    if paths.len() > MAX_PATHS {
        return Err(HotPathError::TooMany(paths.len()));
    }
    let filter = Filter::of(&site.filter)
        .map_err(|e| HotPathError::Filtered(format!("(the filter is invalid: {e})")))?;
    let staging = Path::new(&site.staging);
    let mut out = BTreeSet::new();
    for p in paths {
        let rel = Path::new(p);
        let normal = !p.is_empty()
            && p.len() <= MAX_PATH_LEN
            && !p.ends_with('/')
            && !p.contains("//")
            && !p.contains('\0')
            && rel.components().all(|c| matches!(c, Component::Normal(_)));
        if !normal {
            return Err(HotPathError::Outside(p.clone()));
        }
        // Every directory on the way admitted and real, the file itself a regular file.
        let mut at = staging.to_path_buf();
        let mut sofar = std::path::PathBuf::new();
        let n = rel.components().count();
        for (i, c) in rel.components().enumerate() {
            at.push(c);
            sofar.push(c);
            let last = i + 1 == n;
            if !filter.admits(&sofar, !last) {
                return Err(HotPathError::Filtered(p.clone()));
            }
            let not_there = |why: String| HotPathError::NotInStaging { path: p.clone(), why };
            let m = std::fs::symlink_metadata(&at).map_err(|e| not_there(e.to_string()))?;
            let ok = if last { m.is_file() } else { m.is_dir() };
            if !ok {
                let what = if m.file_type().is_symlink() { "a symlink" } else { "another type" };
                return Err(not_there(format!("{} is {what}", sofar.display())));
            }
        }
        out.insert(p.clone());
    }
    Ok(out.into_iter().collect())
}

/// Picks `count` servers of the content group for hot content: live (`live`: server →
/// segment), holding the site's live release, in rotation, not removed; spread over segments
/// (round robin, segments and servers by name), so one segment's loss does not take every
/// holder. Fewer when fewer qualify.
pub fn pick_servers(
    site: &HostedSite,
    group: &[String],
    live: &BTreeMap<String, String>,
    count: usize,
) -> Vec<String> {
    let Some(live_release) = site.live() else { return Vec::new() };
    let mut by_segment: BTreeMap<&str, Vec<&String>> = BTreeMap::new();
    for s in group {
        let healthy = site.holders.get(s) == Some(&live_release)
            && !site.removed.contains(s)
            && !site.rotation.get(s).is_some_and(|r| r.drained);
        if let (true, Some(seg)) = (healthy, live.get(s)) {
            by_segment.entry(seg.as_str()).or_default().push(s);
        }
    }
    let mut queues: Vec<std::vec::IntoIter<&String>> = by_segment
        .into_values()
        .map(|mut v| {
            v.sort();
            v.into_iter()
        })
        .collect();
    let mut picked = Vec::new();
    while picked.len() < count {
        let before = picked.len();
        for q in &mut queues {
            if picked.len() == count {
                break;
            }
            if let Some(s) = q.next() {
                picked.push(s.clone());
            }
        }
        if picked.len() == before {
            break;
        }
    }
    picked
}

/// Builds the hot-content assignment: the live snapshot with `paths` copied in from staging,
/// as release `serial` on top of live. Its snapshot is kept like a publish's (the next commit
/// prunes it).
pub fn prepare_hot(
    site: &HostedSite,
    paths: &[String],
    serial: u64,
    job_id: u64,
    ctx: Context<'_>,
    out: &Path,
) -> Result<Prepared, PrepareError> {
    let name = site.name.clone();
    let hot_err = |e: HotPathError| PrepareError::Hot { site: name.clone(), why: e.to_string() };
    let paths = check_paths(site, paths).map_err(hot_err)?;
    let live = site.live().ok_or_else(|| PrepareError::NothingLive { site: name.clone() })?;
    let base = snapshot_dir(ctx.data_dir, &site.name, live);
    if !base.is_dir() {
        return Err(PrepareError::SnapshotMissing {
            site: name,
            serial: live,
            path: base.display().to_string(),
        });
    }
    let snap = snapshot_dir(ctx.data_dir, &site.name, serial);
    let snap_err =
        |source| PrepareError::Snapshot { site: name.clone(), from: site.staging.clone(), source };
    if snap.exists() {
        std::fs::remove_dir_all(&snap).map_err(snap_err)?;
    }
    // Live, every file linked (its own snapshot as "previous"), then the hot files over it.
    prepare::snapshot_tree(&base, Some(&base), &snap).map_err(snap_err)?;
    for p in &paths {
        copy_in(Path::new(&site.staging), &snap, Path::new(p)).map_err(snap_err)?;
    }
    let mut opts = BuildOptions::new(AssignmentType::HotContent, serial).for_site(&site.name);
    opts.meta.job_id = job_id;
    opts.meta.base_serial = live;
    opts.policy = compression_policy(&site.compression);
    opts.seal = ctx.seal.cloned();
    opts.signer = ctx.signer.cloned();
    let r = build(&snap, Some(&base), out, &opts)
        .map_err(|source| PrepareError::Build { site: name.clone(), source })?;
    Ok(Prepared {
        serial: Some(serial),
        release: Some(serial),
        summary: format!(
            "hot release {serial} of site {name}: live release {live} plus {} ({} new, {} changed, {} unchanged)",
            paths.join(", "),
            r.new,
            r.changed,
            r.unchanged
        ),
    })
}

/// Copies staging's `rel` over the snapshot `to` (a fresh file, never through a link shared
/// with another snapshot), creating its directories with staging's modes.
fn copy_in(staging: &Path, to: &Path, rel: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut dir = to.to_path_buf();
    let mut from = staging.to_path_buf();
    if let Some(parent) = rel.parent() {
        for c in parent.components() {
            dir.push(c);
            from.push(c);
            if !dir.is_dir() {
                std::fs::create_dir(&dir)?;
                let mode = std::fs::metadata(&from)?.permissions().mode();
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))?;
            }
        }
    }
    let (src, dst) = (staging.join(rel), to.join(rel));
    if std::fs::symlink_metadata(&dst).is_ok() {
        std::fs::remove_file(&dst)?; // may be a hard link into the live snapshot
    }
    std::fs::copy(&src, &dst)?;
    let mtime = std::fs::metadata(&src)?.modified()?;
    std::fs::File::options().write(true).open(&dst)?.set_modified(mtime)
}

/// Records the servers that made hot release `release` live (run `run`).
pub fn record(site: &mut HostedSite, release: u64, paths: &[String], run: u64, servers: &[String]) {
    let Some(base) = site.live() else { return };
    let paths = check_paths(site, paths).unwrap_or_else(|_| paths.to_vec());
    for s in servers {
        site.hot.insert(s.clone(), HotHolding { release, base, paths: paths.clone(), run });
    }
}

/// The hot releases live now: per release, its paths and its holders.
pub fn holders(site: &HostedSite) -> BTreeMap<u64, (Vec<String>, Vec<String>)> {
    let mut out: BTreeMap<u64, (Vec<String>, Vec<String>)> = BTreeMap::new();
    for (server, h) in &site.hot {
        let e = out.entry(h.release).or_insert_with(|| (h.paths.clone(), Vec::new()));
        e.1.push(server.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(staging: &Path) -> HostedSite {
        serde_json::from_value(serde_json::json!({
            "name": "www", "content_group": "g", "staging": staging.display().to_string(),
            "committed": [3], "holders": {"a1": 3, "a2": 3, "b1": 3, "b2": 3, "c1": 2},
        }))
        .unwrap()
    }

    #[test]
    fn paths_must_be_regular_files_inside_staging_and_admitted() {
        let d = tempfile::tempdir().unwrap();
        let st = d.path().join("staging");
        std::fs::create_dir_all(st.join("flash")).unwrap();
        std::fs::create_dir_all(st.join("private")).unwrap();
        std::fs::write(st.join("flash/sale.html"), "x").unwrap();
        std::fs::write(st.join("private/p.html"), "x").unwrap();
        std::fs::write(d.path().join("outside.txt"), "x").unwrap();
        std::os::unix::fs::symlink(d.path(), st.join("up")).unwrap();
        let mut s = site(&st);
        s.filter.exclude = vec!["private/**".into()];
        let one = |p: &str| check_paths(&s, &[p.to_string()]);
        assert_eq!(one("flash/sale.html").unwrap(), vec!["flash/sale.html".to_string()]);
        for bad in [
            "../outside.txt",
            "/etc/passwd",
            "flash/../flash/sale.html",
            "./flash/sale.html",
            "",
            "flash//sale.html",
        ] {
            assert!(matches!(one(bad), Err(HotPathError::Outside(_))), "{bad}: {:?}", one(bad));
        }
        assert!(matches!(one("private/p.html"), Err(HotPathError::Filtered(_))));
        assert!(
            matches!(one("up/outside.txt"), Err(HotPathError::NotInStaging { .. })),
            "no symlink on the way"
        );
        assert!(
            matches!(one("flash"), Err(HotPathError::NotInStaging { .. })),
            "a directory is not a file"
        );
        assert!(matches!(one("flash/gone.html"), Err(HotPathError::NotInStaging { .. })));
        assert_eq!(check_paths(&s, &[]), Err(HotPathError::None));
    }

    #[test]
    fn servers_are_picked_up_to_date_and_spread_over_segments() {
        let d = tempfile::tempdir().unwrap();
        let mut s = site(d.path());
        let group: Vec<String> = ["a1", "a2", "b1", "b2", "c1", "d1"].map(String::from).to_vec();
        let live: BTreeMap<String, String> =
            [("a1", "A"), ("a2", "A"), ("b1", "B"), ("b2", "B"), ("c1", "C")]
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .into();
        assert_eq!(pick_servers(&s, &group, &live, 2), vec!["a1", "b1"]);
        assert_eq!(pick_servers(&s, &group, &live, 3), vec!["a1", "b1", "a2"]);
        // c1 is behind, d1 silent: at most the four up to date.
        assert_eq!(pick_servers(&s, &group, &live, 9).len(), 4);
        s.removed.insert("a1".into());
        assert_eq!(pick_servers(&s, &group, &live, 2), vec!["a2", "b1"]);
    }
}

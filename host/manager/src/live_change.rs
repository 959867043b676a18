//! What a run that changes the live release changes for the caches in front of the servers:
//! the [`CacheOrder`] the manager signs into the run's notifications (`cm_tree::cache`).
//!
//! The rule. The changed and removed paths are those of the diff between the snapshot of the
//! release live before the run and the snapshot of the release it makes live (the manager keeps
//! both: the live one is the delta base, the target is prepared or a kept rollback target).
//! The whole site is purged instead when a snapshot is gone (nothing says what differs), or
//! when more than the site's `cache_max_paths` paths differ (a large change is cheaper as one
//! purge than as thousands of invalidations). A run that does not change live (a publish, a
//! replicate, a catch-up to the live release) has no order.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use cm_tree::cache::{CacheChange, CacheOrder};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};

use crate::model::{HostedSite, Payload};
use crate::prepare;

/// Bytes of a path that stay as they are in a URL path (RFC 3986 `pchar` and `/`); the rest
/// is percent-encoded, as a browser would request it.
const PATH: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// The release `payload` makes live on the servers, when it changes live at all.
pub fn new_live(payload: &Payload, site: &HostedSite, data_dir: &Path) -> Option<u64> {
    match payload {
        Payload::Commit { serial } => serial.or(site.prepared),
        Payload::Rollback { to } => prepare::check_rollback(site, *to, data_dir).ok(),
        Payload::Switch { serial } => Some(*serial),
        _ => None,
    }
}

/// The order for a run making release `to` live on `site` (whose live release is the one
/// before), per the rule above; `None` when `to` is already live.
pub fn cache_order(data_dir: &Path, site: &HostedSite, to: u64) -> Option<CacheOrder> {
    let from = site.live();
    if from == Some(to) {
        return None;
    }
    let limit = site.refresh.cache_max_paths as usize;
    let new = prepare::snapshot_dir(data_dir, &site.name, to);
    let old = from.map(|f| prepare::snapshot_dir(data_dir, &site.name, f));
    let change = match diff(old.as_deref(), &new, limit) {
        Ok(Diff::Paths { changed, removed }) => CacheChange::Paths { changed, removed },
        Ok(Diff::TooMany) => {
            CacheChange::Site { reason: format!("more than {limit} paths changed") }
        }
        Err(why) => CacheChange::Site { reason: why },
    };
    Some(CacheOrder { site: site.name.clone(), from, to, change })
}

enum Diff {
    Paths { changed: Vec<String>, removed: Vec<String> },
    TooMany,
}

/// One entry of a snapshot, as far as a client fetching it could tell.
#[derive(PartialEq)]
enum Seen {
    Dir,
    File { dev: u64, ino: u64, size: u64, path: PathBuf },
    Link(PathBuf),
}

fn walk(root: &Path, rel: &str, out: &mut BTreeMap<String, Seen>) -> Result<(), String> {
    let dir = root.join(rel);
    let entries = std::fs::read_dir(&dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
    for e in entries {
        let e = e.map_err(|e| format!("reading {}: {e}", dir.display()))?;
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            return Err(format!("a name under {} is not UTF-8", dir.display()));
        };
        let at = if rel.is_empty() { name } else { format!("{rel}/{name}") };
        let m = std::fs::symlink_metadata(e.path())
            .map_err(|err| format!("reading {}: {err}", e.path().display()))?;
        if m.file_type().is_symlink() {
            let target = std::fs::read_link(e.path()).map_err(|err| err.to_string())?;
            out.insert(at, Seen::Link(target));
        } else if m.is_dir() {
            out.insert(at.clone(), Seen::Dir);
            walk(root, &at, out)?;
        } else {
            let path = e.path();
            out.insert(at, Seen::File { dev: m.dev(), ino: m.ino(), size: m.size(), path });
        }
    }
    Ok(())
}

/// Whether two regular files hold the same bytes (the same inode: yes without reading —
/// snapshots hard-link what did not change).
fn same_file(a: &Seen, b: &Seen) -> Result<bool, String> {
    let (
        Seen::File { dev: da, ino: ia, size: sa, path: pa },
        Seen::File { dev: db, ino: ib, size: sb, path: pb },
    ) = (a, b)
    else {
        return Ok(a == b);
    };
    if (da, ia) == (db, ib) {
        return Ok(true);
    }
    if sa != sb {
        return Ok(false);
    }
    let open =
        |p: &Path| std::fs::File::open(p).map_err(|e| format!("reading {}: {e}", p.display()));
    let (mut fa, mut fb) = (open(pa)?, open(pb)?);
    let (mut ba, mut bb) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        let n = fa.read(&mut ba).map_err(|e| e.to_string())?;
        if n == 0 {
            return Ok(true);
        }
        fb.read_exact(&mut bb[..n]).map_err(|e| e.to_string())?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

/// The URL paths a content path is served at: `/a/b.html`; an `index.html` also at its
/// directory (`/a/`).
pub(crate) fn urls(path: &str, out: &mut Vec<String>) {
    let encoded = utf8_percent_encode(path, PATH).to_string();
    out.push(format!("/{encoded}"));
    if path == "index.html" {
        out.push("/".into());
    } else if let Some(dir) = encoded.strip_suffix("/index.html") {
        out.push(format!("/{dir}/"));
    }
}

fn diff(old: Option<&Path>, new: &Path, limit: usize) -> Result<Diff, String> {
    let mut before = BTreeMap::new();
    if let Some(old) = old {
        if !old.is_dir() {
            return Err(format!(
                "the snapshot of the release live before is gone ({})",
                old.display()
            ));
        }
        walk(old, "", &mut before)?;
    }
    if !new.is_dir() {
        return Err(format!("the snapshot of the new release is gone ({})", new.display()));
    }
    let mut after = BTreeMap::new();
    walk(new, "", &mut after)?;
    let (mut changed, mut removed) = (Vec::new(), Vec::new());
    for (path, seen) in &after {
        if matches!(seen, Seen::Dir) {
            continue;
        }
        let same = match before.get(path) {
            Some(old) => same_file(old, seen)?,
            None => false,
        };
        if !same {
            urls(path, &mut changed);
        }
    }
    for (path, seen) in &before {
        if !matches!(seen, Seen::Dir) && after.get(path).is_none_or(|s| matches!(s, Seen::Dir)) {
            urls(path, &mut removed);
        }
    }
    if changed.len() + removed.len() > limit {
        return Ok(Diff::TooMany);
    }
    Ok(Diff::Paths { changed, removed })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(dir: &Path, live: Option<u64>, limit: u32) -> HostedSite {
        let mut s: HostedSite = serde_json::from_value(serde_json::json!({
            "name": "www", "content_group": "g", "staging": dir.display().to_string(),
        }))
        .unwrap();
        s.committed = live.into_iter().collect();
        s.refresh.cache_max_paths = limit;
        s
    }

    fn write(root: &Path, files: &[(&str, &str)]) {
        for (p, body) in files {
            let f = root.join(p);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(f, body).unwrap();
        }
    }

    #[test]
    fn the_order_names_changed_added_and_removed_paths_and_index_directories() {
        let data = tempfile::tempdir().unwrap();
        let (one, two) = (
            prepare::snapshot_dir(data.path(), "www", 1),
            prepare::snapshot_dir(data.path(), "www", 2),
        );
        write(
            &one,
            &[("index.html", "a"), ("same.css", "s"), ("gone.txt", "g"), ("d/x y.html", "1")],
        );
        write(&two, &[("index.html", "b"), ("d/x y.html", "2"), ("new/index.html", "n")]);
        // Unchanged content on another inode (a rollback target) still counts as unchanged.
        write(&two, &[("same.css", "s")]);
        let order = cache_order(data.path(), &site(data.path(), Some(1), 100), 2).unwrap();
        assert_eq!((order.from, order.to), (Some(1), 2));
        let CacheChange::Paths { changed, removed } = order.change else { panic!("{order:?}") };
        assert_eq!(changed, ["/d/x%20y.html", "/index.html", "/", "/new/index.html", "/new/"]);
        assert_eq!(removed, ["/gone.txt"]);

        // Too many, or a snapshot gone: the whole site.
        let order = cache_order(data.path(), &site(data.path(), Some(1), 3), 2).unwrap();
        assert!(
            matches!(order.change, CacheChange::Site { ref reason } if reason.contains("more than 3"))
        );
        std::fs::remove_dir_all(&one).unwrap();
        let order = cache_order(data.path(), &site(data.path(), Some(1), 100), 2).unwrap();
        assert!(
            matches!(order.change, CacheChange::Site { ref reason } if reason.contains("gone"))
        );
        // Nothing live before: every path is new. Already live: no order.
        let order = cache_order(data.path(), &site(data.path(), None, 100), 2).unwrap();
        assert!(
            matches!(order.change, CacheChange::Paths { ref changed, .. } if changed.len() == 6)
        );
        assert!(cache_order(data.path(), &site(data.path(), Some(2), 100), 2).is_none());
    }
}

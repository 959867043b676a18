//! Removing a site's content from this server (a signed `remove-site` assignment): the live
//! link, the history, every release and the records of what built them. The site root itself
//! stays, empty but usable, with its lock and the record of the newest serial applied, so a
//! genuine old commit or rollback relayed again after the removal is still refused as a replay.
//!
//! Nothing outside the site root is touched, whatever the root holds: names are unlinked, never
//! followed. `current`, `history` and `built` are unlinked as entries of the root (a symlink is
//! removed, not what it points to); each entry of `releases/` is renamed into trash beside it and
//! removed with `remove_dir_all`, which removes a symlink itself and opens every directory below
//! relative to its parent without following links; a `releases` that is not a real directory
//! (a symlink planted in the root) is unlinked and made again.

use std::fs;
use std::io;
use std::path::Path;

use crate::{Site, SiteError, built, layout};

/// Unlinks `path` without following it: a file or symlink is removed, a real directory removed
/// with everything below it. A missing entry is already gone.
fn remove_entry(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.is_dir() => layout::remove_tree(path),
        Ok(_) => fs::remove_file(path),
    }
}

/// Removes the site's content (see the module doc). The caller holds the site's lock.
pub(crate) fn remove_content(site: &Site) -> Result<(), SiteError> {
    let root = site.root();
    // Not served any more first; then what it served from.
    remove_entry(&root.join(layout::CURRENT)).map_err(site.io("removing `current`"))?;
    remove_entry(&root.join(layout::HISTORY)).map_err(site.io("removing the history"))?;
    let releases = root.join(layout::RELEASES);
    let real_dir = fs::symlink_metadata(&releases).is_ok_and(|m| m.is_dir());
    if real_dir {
        for e in fs::read_dir(&releases).map_err(site.io("listing releases"))? {
            let path = e.map_err(site.io("listing releases"))?.path();
            layout::discard(root, &path)
                .map_err(site.io(format!("removing {}", path.display())))?;
        }
    } else {
        remove_entry(&releases).map_err(site.io("removing `releases`"))?;
        fs::create_dir(&releases).map_err(site.io("creating `releases`"))?;
    }
    remove_entry(&root.join(built::BUILT)).map_err(site.io("removing the build records"))?;
    layout::sync_dir(root).map_err(site.io("syncing the site"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{NativeInterpreter, SiteConfig};
    use cm_assignment::detect::{build, build_switch};
    use cm_assignment::write::Meta;
    use cm_assignment::{AssignmentType, BuildOptions};

    fn header_only(
        dir: &Path,
        kind: AssignmentType,
        serial: u64,
        target: u64,
    ) -> std::path::PathBuf {
        let out = dir.join(format!("{kind}-{serial}"));
        let meta = Meta {
            kind,
            serial,
            job_id: 1,
            base_serial: 0,
            target_serial: target,
            site: "www".into(),
        };
        build_switch(&out, meta, None, None).unwrap();
        out
    }

    #[test]
    fn remove_site_empties_the_root_touches_nothing_outside_and_keeps_refusing_replays() {
        let d = tempfile::tempdir().unwrap();
        let (root, staging, outside) =
            (d.path().join("site"), d.path().join("staging"), d.path().join("outside"));
        fs::create_dir_all(&staging).unwrap();
        fs::write(staging.join("index.html"), "live").unwrap();
        fs::create_dir_all(outside.join("dir")).unwrap();
        fs::write(outside.join("keep.txt"), "precious").unwrap();
        fs::write(outside.join("dir/deep.txt"), "precious too").unwrap();
        let site = Site::open(&root, SiteConfig::default()).unwrap();
        let mut interp = NativeInterpreter;
        let publish = d.path().join("publish-1");
        build(&staging, None, &publish, &BuildOptions::new(AssignmentType::Replicate, 1)).unwrap();
        site.apply(&publish, &mut interp).unwrap();
        let commit = header_only(d.path(), AssignmentType::Commit, 2, 1);
        site.apply(&commit, &mut interp).unwrap();
        assert_eq!(site.status().unwrap().current, Some(1));
        // Tricks planted in the root: links out of it where releases and records are.
        std::os::unix::fs::symlink(&outside, root.join("releases/evil")).unwrap();
        std::os::unix::fs::symlink(outside.join("keep.txt"), root.join("releases/1/out.txt"))
            .unwrap();
        std::os::unix::fs::symlink(&outside, root.join("releases/1/outdir")).unwrap();
        layout::remove_tree(&root.join(built::BUILT)).unwrap();
        std::os::unix::fs::symlink(&outside, root.join(built::BUILT)).unwrap();

        let remove = header_only(d.path(), AssignmentType::RemoveSite, 3, 0);
        let rep = site.apply(&remove, &mut interp).unwrap();
        assert_eq!((rep.kind, rep.now_live), (AssignmentType::RemoveSite, None));
        let st = site.status().unwrap();
        assert_eq!((st.current, st.history.len(), st.releases.len()), (None, 0, 0), "{st:?}");
        assert!(fs::symlink_metadata(root.join(layout::CURRENT)).is_err());
        assert!(!root.join(built::BUILT).exists());
        assert_eq!(fs::read_to_string(outside.join("keep.txt")).unwrap(), "precious");
        assert_eq!(fs::read_to_string(outside.join("dir/deep.txt")).unwrap(), "precious too");

        // The commit relayed again: refused as a replay even though nothing is left.
        assert!(matches!(site.apply(&commit, &mut interp), Err(SiteError::Replay { .. })));
        // A `releases` that is itself a link out of the root: unlinked, not followed.
        fs::remove_dir(root.join(layout::RELEASES)).unwrap();
        std::os::unix::fs::symlink(&outside, root.join(layout::RELEASES)).unwrap();
        std::os::unix::fs::symlink(&outside, root.join(layout::CURRENT)).unwrap();
        let again = header_only(d.path(), AssignmentType::RemoveSite, 4, 0);
        site.apply(&again, &mut interp).unwrap();
        assert!(fs::symlink_metadata(root.join(layout::RELEASES)).unwrap().is_dir());
        assert!(fs::symlink_metadata(root.join(layout::CURRENT)).is_err());
        assert_eq!(fs::read_to_string(outside.join("keep.txt")).unwrap(), "precious");
        assert!(outside.join("dir/deep.txt").is_file());
        // The site takes content again.
        let next = d.path().join("publish-5");
        build(&staging, None, &next, &BuildOptions::new(AssignmentType::Replicate, 5)).unwrap();
        site.apply(&next, &mut interp).unwrap();
    }
}

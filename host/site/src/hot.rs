//! Hot content: a release that overlays live for a while. A hot-content assignment builds a
//! release from live plus a few named files and switches to it at once (seed: flash content a
//! load balancer asks for on a few servers). The release it was built on — its base — stays
//! the site's committed live release: the history journal does not change, and
//! `SITE/hot` records `<hot serial> <base serial>`.
//!
//! While `current` is the hot release, the site acts as if its base were live: the next build
//! (a publish against the base) clones the base, a commit or rollback works on the history as
//! it would without the overlay, and the release depth does not count the hot release. When
//! live moves off it, the hot release is discarded. A `hot` file that names a release other
//! than `current` (a crash between writing it and switching) means nothing and is overwritten
//! or removed by the next switch.

use std::fs;
use std::io;
use std::path::Path;

use crate::layout;

const FILE: &str = "hot";

/// The hot release live now, and the committed release it overlays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hot {
    pub serial: u64,
    pub base: u64,
}

/// The hot release if `current` is one.
pub fn live_hot(site: &Path, current: Option<u64>) -> io::Result<Option<Hot>> {
    let text = match fs::read_to_string(site.join(FILE)) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut it = text.split_whitespace().map(str::parse::<u64>);
    let (Some(Ok(serial)), Some(Ok(base))) = (it.next(), it.next()) else {
        return Ok(None);
    };
    Ok((current == Some(serial)).then_some(Hot { serial, base }))
}

/// The committed release live stands for: `current`, or the base of a hot `current`.
pub fn committed_live(site: &Path) -> io::Result<Option<u64>> {
    let current = layout::current_serial(site)?;
    Ok(live_hot(site, current)?.map(|h| h.base).or(current))
}

/// Records `hot` (before `current` switches to it).
pub fn record(site: &Path, hot: Hot) -> io::Result<()> {
    let tmp = site.join(format!(".{FILE}.tmp"));
    fs::write(&tmp, format!("{} {}\n", hot.serial, hot.base))?;
    fs::File::open(&tmp)?.sync_all()?;
    fs::rename(&tmp, site.join(FILE))?;
    layout::sync_dir(site)
}

/// Forgets the hot release (after `current` moved off it).
pub fn clear(site: &Path) -> io::Result<()> {
    match fs::remove_file(site.join(FILE)) {
        Ok(()) => layout::sync_dir(site),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

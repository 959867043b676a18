//! Replay protection: an assignment that changes what is live (commit, rollback, switch, hot
//! content) must carry a serial newer than every assignment this site applied before, so a
//! genuine but old assignment — a captured commit or rollback, relayed again — cannot move live
//! back. The manager gives each site's assignments increasing serials; builds (publish,
//! replicate…) are not refused (a replicate carries the live release's serial), but every
//! applied serial is recorded.
//!
//! The newest serial is kept in `SITE/newest-serial` (written atomically after each successful
//! apply); a site without the file starts from its newest release or history entry, since each
//! of those was built or committed by an assignment at least that new.

use std::io;
use std::path::Path;

use cm_assignment::AssignmentType;

use crate::layout;

const FILE: &str = "newest-serial";

/// Whether an assignment of `kind` must be newer than everything applied before.
pub fn must_be_newer(kind: AssignmentType) -> bool {
    kind.is_switch_only() || kind == AssignmentType::HotContent
}

/// The newest serial this site has seen applied.
pub fn newest(site: &Path) -> io::Result<u64> {
    let recorded = match std::fs::read_to_string(site.join(FILE)) {
        Ok(s) => s.trim().parse::<u64>().unwrap_or(0),
        Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e),
    };
    let releases = layout::list_releases(site)?.into_iter().max().unwrap_or(0);
    let history = layout::read_history(site)?.into_iter().max().unwrap_or(0);
    Ok(recorded.max(releases).max(history))
}

/// Records `serial` as applied (keeps the maximum).
pub fn record(site: &Path, serial: u64) -> io::Result<()> {
    if serial <= newest(site)? {
        return Ok(());
    }
    let tmp = site.join(format!(".{FILE}.tmp"));
    std::fs::write(&tmp, format!("{serial}\n"))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, site.join(FILE))?;
    layout::sync_dir(site)
}

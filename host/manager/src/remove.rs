//! Remove (job kind `remove`, destructive): a site's content taken off chosen servers of its
//! content group, or all of them. The run sends a header-only `remove-site` assignment, signed
//! like every run and newer than everything the servers applied (so it is never a replay
//! target); each server removes the site's releases, live link and history inside its site
//! root (`cm_site`'s `remove.rs`) and reports. The servers that did are dropped as holders and
//! remembered in the site's `removed`, so discovery does not bring them up to date again on
//! its own; a synchronize or replicate job naming them does.

use std::path::Path;

use cm_assignment::AssignmentType;

use crate::db::Db;
use crate::model::{HostedSite, JobSpec};
use crate::prepare::{Context, PrepareError, Prepared, switching};
use crate::validate::FieldError;

/// Writes the remove assignment of `site` for `servers` (empty: the whole group).
pub(crate) fn prepare_remove(
    site: &HostedSite,
    servers: &[String],
    serial: u64,
    job_id: u64,
    ctx: Context<'_>,
    out: &Path,
) -> Result<Prepared, PrepareError> {
    let from = match servers.is_empty() {
        true => "every server of the content group".to_string(),
        false => servers.join(", "),
    };
    let summary = format!("removal of site {}'s content from {from}", site.name);
    switching(AssignmentType::RemoveSite, 0, serial, job_id, site, ctx, out, summary)
}

/// After a successful remove run: `servers` (those that removed it) hold nothing of the site.
pub(crate) fn after_remove(site: &mut HostedSite, servers: &[String]) {
    for s in servers {
        site.holders.remove(s);
        site.built.remove(s);
        site.removed.insert(s.clone());
    }
}

/// A remove job names only servers of the site's content group: it is destructive, so a typo
/// must be refused rather than pass as "nothing to do".
pub(crate) fn check(spec: &JobSpec, servers: &[String], db: &Db) -> Result<(), FieldError> {
    let Some(site) = db.site(&spec.site)? else { return Ok(()) };
    let group = db.group(&site.content_group)?.map(|g| g.servers).unwrap_or_default();
    match servers.iter().find(|s| !group.contains(s)) {
        Some(s) => Err(FieldError::new(
            "payload.servers",
            format!(
                "server `{s}` is not in content group `{}` of site `{}`: nothing of the site to remove there",
                site.content_group, spec.site
            ),
        )),
        None => Ok(()),
    }
}

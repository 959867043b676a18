//! The checkpoints page (`/console/checkpoints`) and its actions: per site, the checkpoints
//! (create, delete, restore), the releases the servers keep (switch to one, roll back to one) and
//! the snapshots with the checkpoint each follows. Every action goes through the write path the
//! API uses: restore, switch and roll back create a job ([`crate::writes::create_job`], with its
//! checks: a missing checkpoint or a release no longer kept is refused there); creating a
//! checkpoint is a job of kind `checkpoint` too (the archive is written off the request, by
//! the scheduler), and deleting one is [`Inner::delete_checkpoint`], as `DELETE` on the API.

use maud::{Markup, html};

use crate::db::DbError;
use crate::model::{Checkpoint, HostedSite, JobKind, Payload};
use crate::prepare::{kept_committed, release_kept};
use crate::server::{Inner, ManagerError};
use crate::writes::WriteError;

use super::layout::{bytes, csrf_field, time};
use super::pages::enc;

/// The releases the servers keep for `site`, newest first, with what each is: `live`,
/// `committed` (a rollback or switch target) or `prepared` (a switch target).
fn kept(m: &Inner, site: &HostedSite) -> Vec<(u64, &'static str)> {
    let dir = &m.cfg.data_dir;
    let mut out: Vec<(u64, &'static str)> = Vec::new();
    if let Some(p) = site.prepared.filter(|p| site.live() != Some(*p)) {
        out.push((p, "prepared"));
    }
    for r in kept_committed(site) {
        if site.live() == Some(r) {
            out.push((r, "live"));
        } else if release_kept(site, r, dir) {
            out.push((r, "committed"));
        }
    }
    out
}

fn post(action: &str, csrf: &str, label: &str, class: &str) -> Markup {
    html! {
        form.inline method="post" action=(action) {
            (csrf_field(csrf))
            button type="submit" class=(class) { (label) }
        }
    }
}

/// The page: one section per site, each refreshed live.
pub(crate) fn page(m: &Inner, csrf: &str) -> Result<Markup, DbError> {
    let sites = m.db.sites()?;
    let mut sections = Vec::new();
    for s in &sites {
        sections.push(site_section(m, s, &m.db.checkpoints(&s.name)?, csrf));
    }
    Ok(html! {
        p.note {
            "A checkpoint is a complete, compressed copy of a site's live content kept by the \
             manager. Restoring one brings every server of the site's group to it as a new \
             release (a job of kind restore). Switch makes a kept release live; roll back to \
             goes back to an earlier committed release and drops the ones after it."
        }
        @if sites.is_empty() { p.dim { "No sites yet: create one on " a href="/console/sites" { "Sites and groups" } "." } }
        @for s in sections { (s) }
    })
}

fn site_section(m: &Inner, s: &HostedSite, cps: &[Checkpoint], csrf: &str) -> Markup {
    let site = enc(&s.name);
    let base = format!("/console/sites/{site}");
    let snapshots = m.snapshots(&s.name);
    let kept = kept(m, s);
    html! {
        section.site id=(format!("site-{}", s.name)) data-live {
            h2 { "Site " (s.name) }
            p.dim {
                "live release " (s.live().map_or("none".into(), |v| v.to_string()))
                "; servers keep " (s.keep_releases) " releases; the manager keeps " (s.keep_checkpoints) " checkpoints"
            }
            h3 { "Checkpoints" }
            @if cps.is_empty() { p.dim { "No checkpoints of " (s.name) " yet." } } @else {
                table.checkpoints {
                    tr { th { "id" } th { "taken" } th { "of release" } th { "size" } th { "content" } th { "blake3" } th { "note" } th { "" } }
                    @for c in cps.iter().rev() {
                        tr id=(format!("checkpoint-{}-{}", s.name, c.id)) {
                            td.num { (c.id) }
                            td { (time(c.created_ms)) }
                            td.num { (c.release) }
                            td.num { (bytes(c.size)) }
                            td.num { (c.entries) " entries, " (bytes(c.content_bytes)) }
                            td { code title=(c.blake3) { (c.blake3.get(..16).unwrap_or(&c.blake3)) } }
                            td { (c.note.as_deref().unwrap_or("")) }
                            td {
                                (post(&format!("{base}/checkpoints/{}/restore", c.id), csrf, "Restore", "restore"))
                                " "
                                (post(&format!("{base}/checkpoints/{}/delete", c.id), csrf, "Delete", "delete"))
                            }
                        }
                    }
                }
            }
            form.box.create method="post" action=(format!("{base}/checkpoints")) {
                (csrf_field(csrf))
                label for=(format!("note-{}", s.name)) { "note" }
                input id=(format!("note-{}", s.name)) name="note" maxlength="1024" placeholder="why this checkpoint";
                button type="submit" { "Create checkpoint" }
                @if s.live().is_none() { span.dim { " (needs a live release)" } }
            }
            h3 { "Releases the servers keep" }
            @if kept.is_empty() { p.dim { "None yet." } } @else {
                table.releases {
                    tr { th { "release" } th { "state" } th { "" } }
                    @for (r, state) in &kept {
                        tr id=(format!("release-{}-{r}", s.name)) {
                            td.num { (r) }
                            td { (state) }
                            td {
                                @if *state != "live" {
                                    (post(&format!("{base}/releases/{r}/switch"), csrf, "Switch to", "switch"))
                                }
                                @if *state == "committed" {
                                    " " (post(&format!("{base}/releases/{r}/rollback"), csrf, "Roll back to", "rollback"))
                                }
                            }
                        }
                    }
                }
            }
            h3 { "Snapshots" }
            @match snapshots {
                Err(e) => p.flash.error { "The snapshots could not be listed: " (e.to_string()) },
                Ok(list) if list.is_empty() => p.dim { "No snapshots." },
                Ok(list) => table.snapshots {
                    tr { th { "release" } th { "state" } th { "follows checkpoint" } }
                    @for sn in &list {
                        tr id=(format!("snapshot-{}-{}", s.name, sn.release)) {
                            td.num { (sn.release) } td { (sn.state) }
                            td.num { (sn.follows_checkpoint.map_or("—".into(), |c| c.to_string())) }
                        }
                    }
                },
            }
        }
    }
}

/// A one-off job of the site, due now, with the default policy (commit: auto).
fn job(
    m: &Inner,
    name: String,
    kind: JobKind,
    site: &str,
    payload: Payload,
) -> Result<String, WriteError> {
    super::actions::new_job(m, super::actions::one_off(&name, kind, site, payload))
}

fn number(what: &str, v: &str) -> Result<u64, ManagerError> {
    v.parse().map_err(|_| ManagerError::Invalid(format!("`{v}` is not a {what}")))
}

/// The actions under `/console/sites/{site}/` this page posts to; `None` for any other path.
pub(crate) fn action(
    m: &Inner,
    site: &str,
    rest: &[&str],
    note: &str,
) -> Option<Result<String, WriteError>> {
    Some(match rest {
        ["checkpoints"] => {
            if let Err(e) = crate::versions_api::check_note(note) {
                return Some(Err(e.into()));
            }
            let note = (!note.is_empty()).then(|| note.to_string());
            job(
                m,
                format!("checkpoint of {site}"),
                JobKind::Checkpoint,
                site,
                Payload::CreateCheckpoint { note },
            )
        }
        ["checkpoints", id, "restore"] => {
            number("checkpoint id", id).map_err(Into::into).and_then(|id| {
                job(
                    m,
                    format!("restore checkpoint {id} of {site}"),
                    JobKind::Restore,
                    site,
                    Payload::Checkpoint { id },
                )
            })
        }
        ["checkpoints", id, "delete"] => {
            number("checkpoint id", id).map_err(Into::into).and_then(|id| {
                m.delete_checkpoint(site, id, "by an operator, from the console")
                    .map(|c| {
                        format!(
                            "Checkpoint {} of site {site} (release {}) deleted.",
                            c.id, c.release
                        )
                    })
                    .map_err(Into::into)
            })
        }
        ["releases", r, "switch"] => number("release", r).map_err(Into::into).and_then(|serial| {
            job(
                m,
                format!("switch {site} to release {serial}"),
                JobKind::Switch,
                site,
                Payload::Switch { serial },
            )
        }),
        ["releases", r, "rollback"] => number("release", r).map_err(Into::into).and_then(|to| {
            job(
                m,
                format!("roll {site} back to release {to}"),
                JobKind::Rollback,
                site,
                Payload::Rollback { to: Some(to) },
            )
        }),
        _ => return None,
    })
}

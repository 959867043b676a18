//! The console's pages with forms: sites and content groups (create, edit, publish, roll back)
//! and jobs (create one-off or recurring, cancel, retry). Each form posts to an action in
//! [`super::actions`] with the session's CSRF token.

use maud::{Markup, html};

use crate::db::DbError;
use crate::model::{Job, JobState};
use crate::server::Inner;

use super::layout::{button, csrf_field, span, time};
use super::pages::{enc, rollback_button};

pub(crate) fn sites(m: &Inner, csrf: &str) -> Result<Markup, DbError> {
    let sites = m.db.sites()?;
    let groups = m.db.groups()?;
    Ok(html! {
        h2 { "Sites" }
        div #sites data-live {
            table {
                tr { th { "site" } th { "content group" } th { "staging" } th { "newest serial" } th { "live" } th { "prepared" } th { "committed" } th { "" } }
                @for s in &sites {
                    tr id=(format!("site-{}", s.name)) {
                        td { (s.name) } td { (s.content_group) } td { code { (s.staging) } }
                        td.num { (s.serial) }
                        td.num.live-release { (s.live().map(|v| v.to_string()).unwrap_or("—".into())) }
                        td.num { (s.prepared.map(|v| v.to_string()).unwrap_or("—".into())) }
                        td { @for r in &s.committed { (r) " " } }
                        td {
                            (button(&format!("/console/sites/{}/publish", enc(&s.name)), csrf, "Publish staging"))
                            " "
                            @if s.committed.len() >= 2 { (rollback_button(&s.name, csrf)) }
                        }
                    }
                }
            }
        }
        form.box #site-form method="post" action="/console/sites" {
            (csrf_field(csrf))
            label for="site-name" { "site name" } input #site-name name="name" required;
            label for="site-group" { "content group" }
            select #site-group name="content_group" {
                @for g in &groups { option value=(g.name) { (g.name) } }
            }
            label for="site-staging" { "staging directory" } input #site-staging name="staging" required size="50";
            label for="site-keep" { "releases kept (live included)" } input #site-keep name="keep_releases" inputmode="numeric" placeholder="2";
            label for="site-keep-cp" { "checkpoints kept" } input #site-keep-cp name="keep_checkpoints" inputmode="numeric" placeholder="5";
            button type="submit" { "Create or edit site" }
        }
        h2 { "Content groups" }
        div #groups data-live {
            table {
                tr { th { "group" } th { "servers" } }
                @for g in &groups {
                    tr { td { (g.name) } td { (g.servers.len()) ": " (g.servers.join(", ")) } }
                }
            }
        }
        form.box #group-form method="post" action="/console/groups" {
            (csrf_field(csrf))
            label for="group-name" { "group name" } input #group-name name="name" required;
            label for="group-servers" { "servers (spaces, commas or lines)" }
            textarea #group-servers name="servers" rows="3" cols="50" {}
            button type="submit" { "Create or edit group" }
        }
    })
}

/// What a job does, in words.
fn what(j: &Job) -> String {
    format!("{:?} of {}", j.spec.kind, j.spec.site).to_lowercase()
}

fn state(s: &JobState) -> Markup {
    match s {
        JobState::Idle => html! { span.dim { "idle" } },
        JobState::Running { run } => {
            html! { span.warn { "running " a href=(format!("/console/runs/{run}")) { "run " (run) } } }
        }
        JobState::Done => html! { span.ok { "done" } },
        JobState::Cancelled { reason } => html! { span.bad { "cancelled" } ": " (reason) },
        JobState::Aborted { run, by, .. } => {
            html! { span.bad { "aborted" } " (run " (run) ", by " (by) ")" }
        }
    }
}

pub(crate) fn jobs(m: &Inner, now: u64, csrf: &str) -> Result<Markup, DbError> {
    let mut jobs = m.db.jobs()?;
    jobs.reverse();
    let sites = m.db.sites()?;
    Ok(html! {
        div #jobs data-live {
            table {
                tr { th { "job" } th { "name" } th { "what" } th { "state" } th { "next run" } th { "every" } th { "attempts" } th { "last reason" } th { "" } }
                @for j in &jobs {
                    tr id=(format!("job-{}", j.id)) {
                        td.num { (j.id) } td { (j.spec.name) } td { (what(j)) }
                        td.state { (state(&j.state)) }
                        td { @if j.state == JobState::Idle { (time(j.next_run_ms)) @if j.next_run_ms > now { " (in " (span(j.next_run_ms - now)) ")" } } }
                        td { (j.spec.every_ms.map(span).unwrap_or_else(|| "once".into())) }
                        td.num { (j.attempts) }
                        td { (j.last_reason.clone().unwrap_or_default())
                             @if let Some(pc) = &j.pending_commit { " release " (pc.release) " waits for its commit" } }
                        td {
                            @match j.state {
                                JobState::Idle => (button(&format!("/console/jobs/{}/cancel", j.id), csrf, "Cancel")),
                                JobState::Running { .. } => (button(&format!("/console/jobs/{}/abort", j.id), csrf, "Abort")),
                                JobState::Done | JobState::Cancelled { .. } | JobState::Aborted { .. } => (button(&format!("/console/jobs/{}/retry", j.id), csrf, "Run again")),
                            }
                        }
                    }
                }
            }
        }
        h2 { "New job" }
        form.box #job-form method="post" action="/console/jobs" {
            (csrf_field(csrf))
            label for="job-name" { "name" } input #job-name name="name" required;
            label for="job-site" { "site" }
            select #job-site name="site" { @for s in &sites { option value=(s.name) { (s.name) } } }
            label for="job-what" { "what" }
            select #job-what name="what" {
                option value="publish" { "publish the staging tree" }
                option value="file" { "publish an assignment file" }
                option value="replicate" { "replicate the live release" }
                option value="commit" { "commit the prepared release" }
                option value="rollback" { "roll back one release" }
                option value="hot" { "hot content: staging files to N servers" }
            }
            label for="job-file" { "assignment file (for a file)" } input #job-file name="file" size="50";
            label for="job-hot-paths" { "hot paths (for hot content; space-separated)" } input #job-hot-paths name="hot_paths" size="50";
            label for="job-hot-count" { "hot servers: how many (the manager picks)" } input #job-hot-count name="hot_count" inputmode="numeric" placeholder="1";
            label for="job-start" { "start in (seconds)" } input #job-start name="start_in_s" inputmode="numeric" placeholder="0";
            label for="job-every" { "repeat every (seconds; empty: once)" } input #job-every name="every_s" inputmode="numeric";
            label for="job-commit" { "commit" }
            select #job-commit name="commit" { option value="auto" { "automatically after distribution" } option value="manual" { "by an operator's commit job" } }
            label for="job-quorum" { "quorum (% of the group)" } input #job-quorum name="quorum" inputmode="numeric" placeholder="100";
            label for="job-failure" { "on failure" }
            select #job-failure name="on_failure" { option value="retry" { "retry (3 attempts, 30 s apart)" } option value="cancel" { "cancel" } }
            button type="submit" { "Create job" }
        }
    })
}

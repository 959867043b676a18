//! The console's actions (POST forms, CSRF already checked): they change the store as the API's
//! routes do — one write transaction with its history line — and answer with the page to go back
//! to and a message for it. Names are checked by the same rule as the API's
//! ([`crate::names::check_name`]).

use std::collections::HashMap;

use crate::model::{
    CommitPolicy, ContentGroup, HostedSite, JobKind, JobPolicy, JobSpec, JobState, OnFailure,
    Payload, Quorum, default_keep_releases,
};
use crate::names::check_name;
use crate::now_ms;
use crate::server::{Inner, ManagerError};

type Form = HashMap<String, String>;

/// Performs the action at `path`: the page to redirect to and what to tell the operator.
pub(crate) fn handle(m: &Inner, path: &str, form: &Form) -> (String, String) {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let decoded: Vec<String> = parts
        .iter()
        .map(|p| percent_encoding::percent_decode_str(p).decode_utf8_lossy().into_owned())
        .collect();
    let parts: Vec<&str> = decoded.iter().map(String::as_str).collect();
    let (back, result) = match parts[..] {
        ["console", "groups"] => ("/console/sites", set_group(m, form)),
        ["console", "sites"] => ("/console/sites", set_site(m, form)),
        ["console", "sites", site, "publish"] => (
            "/console/jobs",
            new_job(
                m,
                one_off(&format!("publish {site}"), JobKind::Publish, site, Payload::Staging),
            ),
        ),
        ["console", "sites", site, "rollback"] => (
            "/console/jobs",
            new_job(
                m,
                one_off(
                    &format!("roll back {site}"),
                    JobKind::Rollback,
                    site,
                    Payload::Rollback { to: None },
                ),
            ),
        ),
        ["console", "jobs"] => ("/console/jobs", job_from_form(form).and_then(|s| new_job(m, s))),
        ["console", "jobs", id, "cancel"] => ("/console/jobs", cancel(m, id)),
        ["console", "jobs", id, "retry"] => ("/console/jobs", retry(m, id)),
        _ => ("/console/", Err(ManagerError::NotFound("no such action".into()))),
    };
    let msg = match result {
        Ok(done) => done,
        Err(e) => format!("Nothing was changed: {e}"),
    };
    (back.to_string(), msg)
}

fn field<'a>(form: &'a Form, name: &str) -> &'a str {
    form.get(name).map(|s| s.trim()).unwrap_or("")
}

fn name(what: &'static str, v: &str) -> Result<(), ManagerError> {
    check_name(what, v).map_err(|e| ManagerError::Invalid(e.to_string()))
}

/// `""` → `None`; a number → it; anything else names the field.
fn number(form: &Form, f: &str) -> Result<Option<u64>, ManagerError> {
    match field(form, f) {
        "" => Ok(None),
        v => v
            .parse()
            .map(Some)
            .map_err(|_| ManagerError::Invalid(format!("{f} `{v}`: not a whole number"))),
    }
}

fn set_group(m: &Inner, form: &Form) -> Result<String, ManagerError> {
    let group = field(form, "name");
    name("content group name", group)?;
    let servers: Vec<String> = field(form, "servers")
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    for s in &servers {
        name("server name", s)?;
    }
    let g = ContentGroup { name: group.to_string(), servers };
    m.db.write(|t| {
        t.put_group(&g)?;
        let line = format!("content group {} set: {} servers", g.name, g.servers.len());
        t.log(now_ms(), None, None, line.clone())?;
        Ok::<_, ManagerError>(line)
    })
}

fn set_site(m: &Inner, form: &Form) -> Result<String, ManagerError> {
    let site = field(form, "name");
    name("site name", site)?;
    let group = field(form, "content_group");
    name("content_group", group)?;
    if m.db.group(group)?.is_none() {
        return Err(ManagerError::NotFound(format!("content group {group} does not exist")));
    }
    let staging = field(form, "staging");
    if !std::path::Path::new(staging).is_dir() {
        return Err(ManagerError::Invalid(format!(
            "staging `{staging}` is not a directory on the manager's machine"
        )));
    }
    let keep = number(form, "keep_releases")?
        .map(|k| {
            u32::try_from(k).map_err(|_| ManagerError::Invalid("keep_releases is too large".into()))
        })
        .transpose()?;
    m.db.write(|t| {
        // Serials and release history are the manager's; an edit keeps them.
        let old = m.db.site(site)?;
        let s = HostedSite {
            name: site.to_string(),
            content_group: group.to_string(),
            staging: staging.to_string(),
            keep_releases: keep
                .or(old.as_ref().map(|o| o.keep_releases))
                .unwrap_or_else(default_keep_releases),
            ..old.unwrap_or(HostedSite {
                name: String::new(),
                content_group: String::new(),
                staging: String::new(),
                serial: 0,
                prepared: None,
                committed: vec![],
                keep_releases: 0,
                keep_checkpoints: crate::model::default_keep_checkpoints(),
                holders: Default::default(),
            })
        };
        t.put_site(&s)?;
        let line = format!("site {} set: content group {}, staging {}", s.name, group, staging);
        t.log(now_ms(), None, None, line.clone())?;
        Ok::<_, ManagerError>(line)
    })
}

fn one_off(job: &str, kind: JobKind, site: &str, payload: Payload) -> JobSpec {
    JobSpec {
        name: job.to_string(),
        kind,
        site: site.to_string(),
        payload,
        start_at_ms: 0,
        every_ms: None,
        policy: JobPolicy::default(),
    }
}

/// The job form: what (publish, file, replicate, commit, rollback), when, how often, policy.
fn job_from_form(form: &Form) -> Result<JobSpec, ManagerError> {
    let (kind, payload) = match field(form, "what") {
        "publish" => (JobKind::Publish, Payload::Staging),
        "file" => match field(form, "file") {
            "" => {
                return Err(ManagerError::Invalid("an assignment file job needs the file".into()));
            }
            f => (JobKind::Publish, Payload::File { path: f.to_string() }),
        },
        "replicate" => (JobKind::Replicate, Payload::Live { servers: vec![] }),
        "commit" => (JobKind::Commit, Payload::Commit { serial: None }),
        "rollback" => (JobKind::Rollback, Payload::Rollback { to: None }),
        other => {
            return Err(ManagerError::Invalid(format!(
                "what `{other}`: one of publish, file, replicate, commit, rollback"
            )));
        }
    };
    let mut spec = one_off(field(form, "name"), kind, field(form, "site"), payload);
    if spec.name.is_empty() {
        spec.name = format!("{kind:?} of {}", spec.site).to_lowercase();
    }
    if let Some(s) = number(form, "start_in_s")?.filter(|s| *s > 0) {
        spec.start_at_ms = now_ms() + s.saturating_mul(1000);
    }
    spec.every_ms = number(form, "every_s")?.filter(|s| *s > 0).map(|s| s.saturating_mul(1000));
    spec.policy.commit =
        if field(form, "commit") == "manual" { CommitPolicy::Manual } else { CommitPolicy::Auto };
    if let Some(q) = number(form, "quorum")? {
        let pct = u8::try_from(q)
            .ok()
            .filter(|p| *p <= 100)
            .ok_or_else(|| ManagerError::Invalid(format!("quorum {q}: a percentage, 0 to 100")))?;
        spec.policy.quorum = Quorum { min_percent: pct, ..Quorum::default() };
    }
    if field(form, "on_failure") == "cancel" {
        spec.policy.on_failure = OnFailure::Cancel;
    }
    Ok(spec)
}

fn new_job(m: &Inner, spec: JobSpec) -> Result<String, ManagerError> {
    name("site", &spec.site)?;
    if m.db.site(&spec.site)?.is_none() {
        return Err(ManagerError::NotFound(format!("site {} does not exist", spec.site)));
    }
    let now = now_ms();
    m.db.write(|t| {
        let j = t.insert_job(spec.clone(), now)?;
        let line =
            format!("job {} created: {:?} of site {}", j.spec.name, j.spec.kind, j.spec.site);
        t.log(now, Some(j.id), None, line)?;
        Ok::<_, ManagerError>(format!("Job {} created: {}.", j.id, j.spec.name))
    })
}

fn job_id(id: &str) -> Result<u64, ManagerError> {
    id.parse().map_err(|_| ManagerError::Invalid(format!("`{id}` is not a job id")))
}

fn cancel(m: &Inner, id: &str) -> Result<String, ManagerError> {
    let id = job_id(id)?;
    m.db.write(|t| {
        let mut j = m.db.job(id)?.ok_or_else(|| ManagerError::NotFound(format!("job {id}")))?;
        if let JobState::Running { run } = j.state {
            return Err(ManagerError::Invalid(format!(
                "job {id} is running (run {run}); it can be cancelled when the run ends"
            )));
        }
        j.state = JobState::Cancelled { reason: "cancelled by an operator".into() };
        t.put_job(&j)?;
        t.log(now_ms(), Some(id), None, "cancelled by an operator")?;
        Ok(format!("Job {id} cancelled."))
    })
}

/// A finished or cancelled job again: a new job with the same spec, due now.
fn retry(m: &Inner, id: &str) -> Result<String, ManagerError> {
    let id = job_id(id)?;
    let j = m.db.job(id)?.ok_or_else(|| ManagerError::NotFound(format!("job {id}")))?;
    if matches!(j.state, JobState::Idle | JobState::Running { .. }) {
        return Err(ManagerError::Invalid(format!("job {id} has not ended")));
    }
    new_job(m, JobSpec { start_at_ms: 0, ..j.spec })
}

//! The console's actions (POST forms, CSRF already checked): they read the form and make the
//! same write as the API's route ([`crate::writes`]: the same checks, the same transaction and
//! history line), and answer with the page to go back to and a message for it.

use std::collections::HashMap;

use crate::model::{
    CommitPolicy, JobKind, JobPolicy, JobSpec, JobState, OnFailure, Payload, Quorum,
};
use crate::now_ms;
use crate::server::{Inner, ManagerError};
use crate::writes::{self, WriteError};

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
        ["console", "jobs"] => {
            ("/console/jobs", job_from_form(form).map_err(Into::into).and_then(|s| new_job(m, s)))
        }
        ["console", "jobs", id, "cancel"] => ("/console/jobs", cancel(m, id)),
        ["console", "jobs", id, "retry"] => ("/console/jobs", retry(m, id)),
        ["console", "sites", site, ref rest @ ..] => {
            match super::checkpoints::action(m, site, rest, field(form, "note")) {
                Some(r) => ("/console/checkpoints", r),
                None => ("/console/", Err(ManagerError::NotFound("no such action".into()).into())),
            }
        }
        ["console", "jobs", id, "abort"] => ("/console/jobs", crate::abort::from_console(m, id)),
        _ => ("/console/", Err(ManagerError::NotFound("no such action".into()).into())),
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

fn set_group(m: &Inner, form: &Form) -> Result<String, WriteError> {
    let servers: Vec<String> = field(form, "servers")
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    Ok(writes::put_group(&m.db, field(form, "name"), servers, now_ms())?.history)
}

fn set_site(m: &Inner, form: &Form) -> Result<String, WriteError> {
    let count = |f: &str| -> Result<Option<u32>, ManagerError> {
        number(form, f)?
            .map(|k| {
                u32::try_from(k).map_err(|_| ManagerError::Invalid(format!("{f} is too large")))
            })
            .transpose()
    };
    let set = writes::SiteSettings {
        content_group: field(form, "content_group").to_string(),
        staging: field(form, "staging").to_string(),
        keep_releases: count("keep_releases")?,
        keep_checkpoints: count("keep_checkpoints")?,
        filter: None,
        compression: None,
        golive: None,
        refresh: None,
    };
    Ok(writes::put_site(&m.db, field(form, "name"), &set, now_ms())?.history)
}

pub(super) fn one_off(job: &str, kind: JobKind, site: &str, payload: Payload) -> JobSpec {
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
        "hot" => {
            let paths: Vec<String> =
                field(form, "hot_paths").split_whitespace().map(str::to_string).collect();
            let count = match field(form, "hot_count").trim() {
                "" => 1,
                n => n.parse::<u32>().map_err(|_| {
                    ManagerError::Invalid(format!("hot servers `{n}`: a whole number"))
                })?,
            };
            (JobKind::Hot, Payload::Hot { paths, servers: vec![], count: Some(count) })
        }
        other => {
            return Err(ManagerError::Invalid(format!(
                "what `{other}`: one of publish, file, replicate, commit, rollback, hot"
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
        // The range (0 to 100) is `validate::job`'s rule; this only has to fit the field.
        let pct = u8::try_from(q)
            .map_err(|_| ManagerError::Invalid(format!("quorum {q} is not a percentage")))?;
        spec.policy.quorum = Quorum { min_percent: pct, ..Quorum::default() };
    }
    if field(form, "on_failure") == "cancel" {
        spec.policy.on_failure = OnFailure::Cancel;
    }
    Ok(spec)
}

pub(super) fn new_job(m: &Inner, spec: JobSpec) -> Result<String, WriteError> {
    let j = writes::create_job(&m.db, &m.cfg.data_dir, spec, now_ms())?;
    Ok(format!("Job {} created: {}.", j.id, j.spec.name))
}

fn job_id(id: &str) -> Result<u64, ManagerError> {
    id.parse().map_err(|_| ManagerError::Invalid(format!("`{id}` is not a job id")))
}

fn cancel(m: &Inner, id: &str) -> Result<String, WriteError> {
    let id = job_id(id)?;
    writes::cancel_job(&m.db, id, now_ms())?;
    Ok(format!("Job {id} cancelled."))
}

/// A finished or cancelled job again: a new job with the same spec, due now.
fn retry(m: &Inner, id: &str) -> Result<String, WriteError> {
    let id = job_id(id)?;
    let j = m.db.job(id)?.ok_or_else(|| ManagerError::NotFound(format!("no job {id}")))?;
    if matches!(j.state, JobState::Idle | JobState::Running { .. }) {
        return Err(ManagerError::Invalid(format!("job {id} has not ended")).into());
    }
    new_job(m, JobSpec { start_at_ms: 0, ..j.spec })
}

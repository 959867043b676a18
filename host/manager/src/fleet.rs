//! Plugins across the fleet (`cmover plugin publish|rollback --group`, job kind `plugin`): a
//! component and its manifest, kept by the manager under `<data>/plugins-published/`, travel
//! to a content group's servers as a signed plugin run (`cm_assignment::plugin_run`) through
//! the same tree and MCTP as content; each server installs it through its plugin store or
//! refuses it and reports why.
//!
//! Canary: the first run goes to `canary` servers and carries the rest in `then`; once it
//! succeeds a second job publishes to them. Rollback: a run that fails (any refusal: the
//! quorum of a plugin job is the whole group), or a failed first content run on a server that
//! installed the new version, starts a job that publishes the group's previous version — the
//! newest plugin job of the group and name that ended done with another version — again, with
//! the reason in its payload and the history.

use std::path::{Path, PathBuf};

use crate::db::Db;
use crate::model::{
    CommitPolicy, Job, JobKind, JobPolicy, JobSpec, JobState, OnFailure, Payload, Quorum,
    ServerOutcome,
};
use crate::server::ManagerError;

/// Largest component the manager accepts for publishing.
pub const MAX_COMPONENT: usize = cm_assignment::plugin_run::MAX_COMPONENT as usize;

/// What an operator publishes (`POST /api/v1/plugins/publish`).
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    pub group: String,
    /// The component, base64.
    pub component: String,
    /// The manifest's TOML text.
    pub manifest: String,
    /// Servers that get it first; the rest once they all installed it.
    #[serde(default)]
    pub canary: Option<u32>,
}

/// `POST /api/v1/plugins/rollback`: the group's previous version of plugin `name`.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    pub group: String,
    pub name: String,
}

fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("plugins-published")
}

/// Where the manager keeps a published component (by its BLAKE3).
pub fn component_path(data_dir: &Path, version: &str) -> PathBuf {
    dir(data_dir).join(format!("{version}.wasm"))
}

/// Where the manager keeps a published manifest (by the BLAKE3 of its text).
pub fn manifest_path(data_dir: &Path, manifest: &str) -> PathBuf {
    dir(data_dir).join(format!("manifest-{manifest}.toml"))
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> ManagerError {
    move |source| ManagerError::Io { what, source }
}

/// A site of `group`: a plugin run's header names one the servers serve.
fn site_of_group(db: &Db, group: &str) -> Result<String, ManagerError> {
    db.group(group)?
        .ok_or_else(|| ManagerError::NotFound(format!("no content group `{group}`")))?;
    db.sites()?.into_iter().find(|s| s.content_group == group).map(|s| s.name).ok_or_else(|| {
        ManagerError::Invalid(format!(
            "content group `{group}` has no hosted site: its servers serve nothing a plugin run could name"
        ))
    })
}

/// Keeps the component and manifest and creates the publish job (the canary's, when asked).
pub fn publish(
    db: &Db,
    data_dir: &Path,
    req: PublishRequest,
    now: u64,
) -> Result<Job, ManagerError> {
    use base64::Engine as _;
    let component = base64::engine::general_purpose::STANDARD
        .decode(req.component.as_bytes())
        .map_err(|e| ManagerError::Invalid(format!("component: not base64: {e}")))?;
    if component.len() > MAX_COMPONENT {
        return Err(ManagerError::Invalid(format!(
            "component: {} bytes, more than {MAX_COMPONENT}",
            component.len()
        )));
    }
    let manifest = cm_plugin_host::PluginManifest::parse(&req.manifest, "manifest")
        .map_err(|e| ManagerError::Invalid(e.to_string()))?;
    let site = site_of_group(db, &req.group)?;
    let servers = db.group(&req.group)?.map(|g| g.servers).unwrap_or_default();
    let version = blake3::hash(&component).to_hex().to_string();
    let manifest_hash = blake3::hash(req.manifest.as_bytes()).to_hex().to_string();
    std::fs::create_dir_all(dir(data_dir)).map_err(io("creating plugins-published".into()))?;
    write_once(&component_path(data_dir, &version), &component)?;
    write_once(&manifest_path(data_dir, &manifest_hash), req.manifest.as_bytes())?;
    let (first, then) = match req.canary {
        Some(n) if (n as usize) < servers.len() && n > 0 => {
            let (a, b) = servers.split_at(n as usize);
            (a.to_vec(), b.to_vec())
        }
        _ => (Vec::new(), Vec::new()),
    };
    let payload = Payload::Plugin {
        name: manifest.name.clone(),
        version,
        manifest: manifest_hash,
        group: req.group,
        servers: first,
        then,
        rollback: None,
        confirmed: Vec::new(),
    };
    insert(db, site, payload, now)
}

/// Creates the job that brings `group` back to the version of `name` it ran before `away`
/// (`None`: the version it runs now), saying why; `None` when there is none (logged).
pub fn rollback(
    db: &Db,
    group: &str,
    name: &str,
    away: Option<&str>,
    why: &str,
    now: u64,
) -> Result<Option<Job>, ManagerError> {
    let site = site_of_group(db, group)?;
    let jobs = db.jobs()?;
    let away = match away {
        Some(v) => v.to_string(),
        None => match latest_done(&jobs, group, name, None).map(|j| &j.spec.payload) {
            Some(Payload::Plugin { version, .. }) => version.clone(),
            _ => {
                return Err(ManagerError::NotFound(format!(
                    "plugin {name} was never published to group {group}"
                )));
            }
        },
    };
    let previous = jobs.iter().rev().find(|j| {
        is_done_plugin(j, group, name)
            && matches!(&j.spec.payload, Payload::Plugin { version, .. } if *version != away)
    });
    let Some(prev) = previous else {
        let line =
            format!("plugin {name} on group {group}: {why}; no previous version to roll back to");
        db.write(|t| t.log(now, None, None, line.clone()))?;
        return Ok(None);
    };
    let Payload::Plugin { version, manifest, .. } = prev.spec.payload.clone() else {
        unreachable!()
    };
    let payload = Payload::Plugin {
        name: name.to_string(),
        version,
        manifest,
        group: group.to_string(),
        servers: Vec::new(),
        then: Vec::new(),
        rollback: Some(why.to_string()),
        confirmed: Vec::new(),
    };
    insert(db, site, payload, now).map(Some)
}

fn is_done_plugin(j: &Job, group: &str, name: &str) -> bool {
    j.state == JobState::Done
        && matches!(&j.spec.payload, Payload::Plugin { group: g, name: n, .. }
            if g == group && n == name)
}

/// The newest plugin job of `group` and `name` that ended done (the version the group runs),
/// optionally only among those that reached `server`.
fn latest_done<'a>(
    jobs: &'a [Job],
    group: &str,
    name: &str,
    server: Option<&str>,
) -> Option<&'a Job> {
    jobs.iter().rev().find(|j| {
        is_done_plugin(j, group, name)
            && server.is_none_or(|s| {
                matches!(&j.spec.payload, Payload::Plugin { servers, .. }
                    if servers.is_empty() || servers.iter().any(|x| x == s))
            })
    })
}

fn insert(db: &Db, site: String, payload: Payload, now: u64) -> Result<Job, ManagerError> {
    let Payload::Plugin { name, version, group, servers, then, rollback, .. } = &payload else {
        unreachable!()
    };
    let to = match servers.is_empty() {
        true => format!("group {group}"),
        false => format!("canary {} of group {group}", servers.join(", ")),
    };
    let what = match rollback {
        Some(_) => "rollback of plugin",
        None => "plugin",
    };
    let spec = JobSpec {
        name: format!("{what} {name} {} to {to}", &version[..12]),
        kind: JobKind::Plugin,
        site,
        payload: payload.clone(),
        start_at_ms: 0,
        every_ms: None,
        // Every server must install it; a failure is rolled back, not retried.
        policy: JobPolicy {
            quorum: Quorum { min_percent: 100, min_servers: 1 },
            commit: CommitPolicy::Manual,
            on_failure: OnFailure::Cancel,
            run_timeout_ms: 120_000,
            ..JobPolicy::default()
        },
    };
    db.write(|t| {
        let j = t.insert_job(spec, now)?;
        let mut line = format!("job {} created", j.spec.name);
        if let Some(why) = rollback {
            line += &format!(": {why}");
        }
        if !then.is_empty() {
            line += &format!("; then {} once the canary installed it", then.join(", "));
        }
        t.log(now, Some(j.id), None, line)?;
        Ok::<_, ManagerError>(j)
    })
}

fn write_once(path: &Path, bytes: &[u8]) -> Result<(), ManagerError> {
    if path.exists() {
        return Ok(());
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io(format!("renaming into {}", path.display())))
}

/// After a plugin run: the rest after a successful canary, a rollback after a failure.
pub(crate) fn plugin_run_ended(
    db: &Db,
    job: &Job,
    ok: bool,
    reports: &[(String, ServerOutcome)],
    now: u64,
) -> Result<(), ManagerError> {
    let Payload::Plugin { name, version, group, then, rollback: was_rollback, .. } =
        &job.spec.payload
    else {
        return Ok(());
    };
    if ok {
        if !then.is_empty() {
            let mut payload = job.spec.payload.clone();
            if let Payload::Plugin { servers, then, .. } = &mut payload {
                *servers = std::mem::take(then);
            }
            db.write(|t| {
                let line = format!("plugin {name}: the canary installed it; the rest follows");
                t.log(now, Some(job.id), None, line)
            })?;
            insert(db, job.spec.site.clone(), payload, now)?;
        }
        return Ok(());
    }
    if was_rollback.is_some() {
        // A rollback that fails is not rolled back again: the operator is told.
        let line = format!("plugin {name}: the rollback on group {group} failed; see its run");
        return Ok(db.write(|t| t.log(now, Some(job.id), None, line.clone()))?);
    }
    let why = refusals(reports);
    let why = format!("plugin {name} {} refused: {why}", &version[..12]);
    rollback(db, group, name, Some(version), &why, now).map(|_| ())
}

/// The servers that did not install it, and why.
fn refusals(reports: &[(String, ServerOutcome)]) -> String {
    let bad: Vec<String> = reports
        .iter()
        .filter_map(|(s, o)| match o {
            ServerOutcome::Succeeded => None,
            ServerOutcome::Failed { reason } => Some(format!("{s}: {reason}")),
            other => Some(format!("{s}: {other:?}")),
        })
        .collect();
    if bad.is_empty() { "the run failed".into() } else { bad.join("; ") }
}

/// After a content run of `group`: a server's first content run with a newly published
/// plugin version either confirms it or, failed, rolls the group back.
pub(crate) fn content_run_ended(
    db: &Db,
    group: &str,
    reports: &[(String, ServerOutcome)],
    now: u64,
) -> Result<(), ManagerError> {
    let jobs = db.jobs()?;
    let names: std::collections::BTreeSet<String> = jobs
        .iter()
        .filter_map(|j| match &j.spec.payload {
            Payload::Plugin { group: g, name, .. } if g == group => Some(name.clone()),
            _ => None,
        })
        .collect();
    for name in names {
        for (server, outcome) in reports {
            let Some(p) = latest_done(&jobs, group, &name, Some(server)) else { continue };
            let Payload::Plugin { rollback: None, confirmed, version, .. } = &p.spec.payload else {
                continue;
            };
            if confirmed.contains(server) {
                continue;
            }
            match outcome {
                ServerOutcome::Succeeded => {
                    let id = p.id;
                    db.write(|t| {
                        let Some(mut j) = db.job(id)? else { return Ok(()) };
                        if let Payload::Plugin { confirmed, .. } = &mut j.spec.payload {
                            confirmed.push(server.clone());
                        }
                        t.put_job(&j)
                    })?;
                }
                ServerOutcome::Failed { reason } => {
                    let why = format!(
                        "the first content run with plugin {name} {} failed on {server}: {reason}",
                        &version[..12]
                    );
                    rollback(db, group, &name, Some(version), &why, now)?;
                    return Ok(());
                }
                _ => {}
            }
        }
    }
    Ok(())
}

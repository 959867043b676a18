//! The operator's writes — a content group, a hosted site, a new job, cancelling a job — shared
//! by the API's routes and the console's forms, so each rule and each history line exists once.
//! Every write checks its input first (names by [`crate::names`], everything else by
//! [`crate::validate`]), then stores it in one transaction with its history line.

use std::path::Path;

use thiserror::Error;

use crate::db::{Db, DbError};
use serde::{Deserialize, Serialize};

use crate::model::{
    Compression, ContentFilter, ContentGroup, HostedSite, Job, JobSpec, JobState,
    default_keep_checkpoints, default_keep_releases,
};
use crate::names::{NameError, check_name};
use crate::server::ManagerError;
use crate::validate::{self, FieldError};

/// Why a write did not happen.
#[derive(Debug, Error)]
pub enum WriteError {
    /// The input was refused before anything was stored (answered 400 naming the field).
    #[error("{0}")]
    Refused(FieldError),
    /// The store refused or failed, or the record is missing or in the wrong state.
    #[error(transparent)]
    Failed(#[from] ManagerError),
}

impl From<FieldError> for WriteError {
    fn from(e: FieldError) -> WriteError {
        WriteError::Refused(e)
    }
}

impl From<NameError> for WriteError {
    fn from(e: NameError) -> WriteError {
        // The message names the field already ("site name `..`: …").
        WriteError::Refused(FieldError { field: None, message: e.to_string() })
    }
}

impl From<DbError> for WriteError {
    fn from(e: DbError) -> WriteError {
        WriteError::Failed(e.into())
    }
}

/// A stored record and the history line written with it.
pub struct Written<T> {
    pub record: T,
    pub history: String,
}

/// Creates or replaces a content group.
pub fn put_group(
    db: &Db,
    name: &str,
    servers: Vec<String>,
    now: u64,
) -> Result<Written<ContentGroup>, WriteError> {
    check_name("content group name", name)?;
    for s in &servers {
        check_name("server name", s)?;
    }
    let g = ContentGroup { name: name.to_string(), servers };
    db.write(|t| {
        t.put_group(&g)?;
        let history = format!("content group {} set: {} servers", g.name, g.servers.len());
        t.log(now, None, None, history.clone())?;
        Ok(Written { record: g.clone(), history })
    })
}

/// A hosted site as an operator sets it (the body of `PUT /api/v1/sites/NAME`).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct SiteSettings {
    pub content_group: String,
    pub staging: String,
    /// Releases the servers keep, live included (default 2, or the site's current setting).
    #[serde(default)]
    pub keep_releases: Option<u32>,
    /// Checkpoints kept (default 5, or the site's current setting).
    #[serde(default)]
    pub keep_checkpoints: Option<u32>,
    /// Include/exclude globs of the staging tree (default none, or the site's current setting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<ContentFilter>,
    /// The compression policy (default level 3, or the site's current setting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<Compression>,
    /// Go-live settings (default: none, or the site's current setting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub golive: Option<crate::golive::GoLive>,
    /// What follows a commit: caches' path limit, search refresh (default: 1 000 paths, no
    /// search engine; or the site's current setting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh: Option<crate::search_refresh::RefreshSettings>,
}

/// Creates or edits a hosted site; an edit keeps the manager's serials and release history
/// (and each `keep_*` setting not given).
pub fn put_site(
    db: &Db,
    name: &str,
    set: &SiteSettings,
    now: u64,
) -> Result<Written<HostedSite>, WriteError> {
    let (content_group, staging) = (set.content_group.as_str(), set.staging.as_str());
    check_name("site name", name)?;
    check_name("content_group", content_group)?;
    validate::site(content_group, staging, set.keep_releases, db)?;
    let old = db.site(name)?;
    let filter = set.filter.clone().or(old.as_ref().map(|o| o.filter.clone())).unwrap_or_default();
    let compression =
        set.compression.clone().or(old.as_ref().map(|o| o.compression.clone())).unwrap_or_default();
    crate::filter::check(&filter, &compression)
        .map_err(|e| FieldError::new(&e.field, e.why.clone()))?;
    if let Some(g) = &set.golive {
        crate::golive::check(g).map_err(|(field, why)| FieldError::new(&field, why))?;
    }
    let refresh =
        set.refresh.clone().or(old.as_ref().map(|o| o.refresh.clone())).unwrap_or_default();
    refresh.check().map_err(|e| FieldError::new(e.field, e.why))?;
    db.write(|t| {
        let old = db.site(name)?;
        let s = HostedSite {
            name: name.to_string(),
            content_group: content_group.to_string(),
            staging: staging.to_string(),
            serial: old.as_ref().map_or(0, |o| o.serial),
            prepared: old.as_ref().and_then(|o| o.prepared),
            keep_releases: set
                .keep_releases
                .or(old.as_ref().map(|o| o.keep_releases))
                .unwrap_or_else(default_keep_releases),
            keep_checkpoints: set
                .keep_checkpoints
                .or(old.as_ref().map(|o| o.keep_checkpoints))
                .unwrap_or_else(default_keep_checkpoints),
            committed: old.as_ref().map(|o| o.committed.clone()).unwrap_or_default(),
            removed: old.as_ref().map(|o| o.removed.clone()).unwrap_or_default(),
            filter: filter.clone(),
            compression: compression.clone(),
            golive: set.golive.clone().or(old.as_ref().and_then(|o| o.golive.clone())),
            rotation: old.as_ref().map(|o| o.rotation.clone()).unwrap_or_default(),
            refresh: refresh.clone(),
            built: old.as_ref().map(|o| o.built.clone()).unwrap_or_default(),
            hot: old.as_ref().map(|o| o.hot.clone()).unwrap_or_default(),
            holders: old.map(|o| o.holders).unwrap_or_default(),
        };
        t.put_site(&s)?;
        let history =
            format!("site {} set: content group {content_group}, staging {staging}", s.name);
        t.log(now, None, None, history.clone())?;
        Ok(Written { record: s, history })
    })
}

/// Creates a job (due at its `start_at_ms`). `data_dir` holds the snapshots that say which
/// releases the servers still keep (a rollback or switch to any other is refused here).
pub fn create_job(db: &Db, data_dir: &Path, spec: JobSpec, now: u64) -> Result<Job, WriteError> {
    check_name("site", &spec.site)?;
    validate::job(&spec, db)?;
    crate::versions_api::check_job(db, data_dir, &spec)?;
    db.write(|t| {
        let j = t.insert_job(spec, now)?;
        let line =
            format!("job {} created: {:?} of site {}", j.spec.name, j.spec.kind, j.spec.site);
        t.log(now, Some(j.id), None, line)?;
        Ok(j)
    })
}

/// Cancels a job that is not running (a running job can be cancelled when its run ends).
pub fn cancel_job(db: &Db, id: u64, now: u64) -> Result<Job, WriteError> {
    db.write(|t| {
        let mut j = db.job(id)?.ok_or_else(|| ManagerError::NotFound(format!("no job {id}")))?;
        if let JobState::Running { run } = j.state {
            return Err(ManagerError::Invalid(format!(
                "job {id} is running (run {run}); it can be cancelled when the run ends"
            ))
            .into());
        }
        j.state = JobState::Cancelled { reason: "cancelled by an operator".into() };
        t.put_job(&j)?;
        t.log(now, Some(id), None, "cancelled by an operator")?;
        Ok(j)
    })
}

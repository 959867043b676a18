//! Validation of what an operator writes through the API, before anything is stored: bodies
//! decode with the failing field named (`policy.quorum.min_percent`), unknown fields are
//! refused rather than silently ignored, a job's kind must match its payload, and what a record
//! points at (a site's staging directory and content group, a job's site and file) must exist.
//! Every refusal is a [`FieldError`], answered `400 {"error": …, "field": …}`.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::path::Path;

use crate::db::{Db, DbError};
use crate::model::{JobSpec, OnFailure, Payload};

/// A refused request body: which field, and why (with the accepted values when there is a set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path of the field (`payload.type`); `None` for the body as a whole.
    pub field: Option<String>,
    pub message: String,
}

impl FieldError {
    pub fn new(field: &str, message: impl Into<String>) -> FieldError {
        FieldError { field: Some(field.to_string()), message: message.into() }
    }

    /// The JSON error body.
    pub fn body(&self) -> Value {
        serde_json::json!({ "error": self.message, "field": self.field })
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{field}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for FieldError {}

impl From<DbError> for FieldError {
    fn from(e: DbError) -> FieldError {
        FieldError { field: None, message: e.to_string() }
    }
}

/// Decodes a request body into `T`, naming the failing field, and refuses fields `T` does not
/// have (found by comparing the body with `T` encoded again: whatever the body holds that the
/// re-encoded value lacks was ignored by serde).
pub fn decode<T: DeserializeOwned + Serialize>(body: &Value) -> Result<T, FieldError> {
    let value: T = serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        let mut field = (path != ".").then_some(path);
        // "missing field `x`" is reported at the enclosing object: name the field itself.
        if let Some(name) = inner.strip_prefix("missing field `").and_then(|r| r.split('`').next())
        {
            field = Some(match field {
                Some(p) => format!("{p}.{name}"),
                None => name.to_string(),
            });
        }
        FieldError { field, message: inner }
    })?;
    let again = serde_json::to_value(&value)
        .map_err(|e| FieldError { field: None, message: format!("re-encoding the body: {e}") })?;
    if let Some(field) = unknown_field(body, &again, "") {
        return Err(unknown(field));
    }
    Ok(value)
}

fn unknown(field: String) -> FieldError {
    let message = format!("unknown field `{}`", field.rsplit('.').next().unwrap_or(&field));
    FieldError { field: Some(field), message: format!("{message}; see docs/api.md") }
}

/// The first key of `sent` (depth first) that `kept` lacks, as a dotted path.
fn unknown_field(sent: &Value, kept: &Value, at: &str) -> Option<String> {
    let join = |k: &str| if at.is_empty() { k.to_string() } else { format!("{at}.{k}") };
    match (sent, kept) {
        (Value::Object(s), Value::Object(k)) => s.iter().find_map(|(key, v)| match k.get(key) {
            None => Some(join(key)),
            Some(kv) => unknown_field(v, kv, &join(key)),
        }),
        (Value::Array(s), Value::Array(k)) => s
            .iter()
            .zip(k)
            .enumerate()
            .find_map(|(i, (sv, kv))| unknown_field(sv, kv, &join(&i.to_string()))),
        _ => None,
    }
}

/// The longest a job may wait for servers to have space (`policy.space.wait_ms`).
pub const MAX_SPACE_WAIT_MS: u64 = 7 * 24 * 3_600_000;

/// The payload types each job kind accepts (by their JSON names). A kind not listed accepts
/// any payload (a kind added later states its own rule here).
const KIND_PAYLOADS: &[(&str, &[&str])] = &[
    ("publish", &["staging", "file"]),
    ("replicate", &["staging", "live", "file"]),
    ("synchronize", &["catch_up"]),
    ("commit", &["commit"]),
    ("rollback", &["rollback"]),
    ("switch", &["switch"]),
    ("restore", &["checkpoint"]),
    ("checkpoint", &["create_checkpoint"]),
    ("remove", &["remove"]),
    ("hot", &["hot"]),
];

/// A hot job: its paths are files of the staging tree the site admits (`hot::check_paths`),
/// its servers named (members of the group) or counted, not both; the site has a live release.
fn hot(
    spec: &JobSpec,
    paths: &[String],
    servers: &[String],
    count: Option<u32>,
    db: &Db,
) -> Result<(), FieldError> {
    let site = db
        .site(&spec.site)?
        .ok_or_else(|| FieldError::new("site", format!("no hosted site `{}`", spec.site)))?;
    crate::hot::check_paths(&site, paths)
        .map_err(|e| FieldError::new("payload.paths", e.to_string()))?;
    if site.live().is_none() {
        return Err(FieldError::new(
            "site",
            format!(
                "site `{}` has nothing live yet: hot content overlays the live release",
                site.name
            ),
        ));
    }
    match (servers.is_empty(), count) {
        (true, None | Some(0)) => Err(FieldError::new(
            "payload.count",
            "name the servers (`servers`) or how many the manager picks (`count` ≥ 1)",
        )),
        (false, Some(_)) => Err(FieldError::new(
            "payload.count",
            "`servers` and `count` exclude each other: name the servers or count them",
        )),
        (false, None) => {
            let group = db.group(&site.content_group)?.map(|g| g.servers).unwrap_or_default();
            for s in servers {
                crate::names::check_name("payload.servers", s)
                    .map_err(|e| FieldError::new("payload.servers", e.to_string()))?;
                if !group.contains(s) {
                    return Err(FieldError::new(
                        "payload.servers",
                        format!("`{s}` is not a server of content group `{}`", site.content_group),
                    ));
                }
            }
            Ok(())
        }
        (true, Some(_)) => Ok(()),
    }
}

/// Checks a decoded job spec against the database: its site exists, its kind matches its
/// payload, its policy's values are in range, a file payload names a file.
pub fn job(spec: &JobSpec, db: &Db) -> Result<(), FieldError> {
    let encoded = serde_json::to_value(spec)
        .map_err(|e| FieldError { field: None, message: format!("encoding the job: {e}") })?;
    let kind = encoded["kind"].as_str().unwrap_or_default();
    let payload = encoded["payload"]["type"].as_str().unwrap_or_default();
    if let Some((_, accepted)) = KIND_PAYLOADS.iter().find(|(k, _)| *k == kind)
        && !accepted.contains(&payload)
    {
        return Err(FieldError::new(
            "payload.type",
            format!(
                "a `{kind}` job cannot carry a `{payload}` payload; accepted for `{kind}`: {}",
                quoted(accepted)
            ),
        ));
    }
    if db.site(&spec.site)?.is_none() {
        let known: Vec<String> = db.sites()?.into_iter().map(|s| s.name).collect();
        return Err(FieldError::new(
            "site",
            format!(
                "no hosted site `{}` (create it with PUT /api/v1/sites/{}); sites: {}",
                spec.site,
                spec.site,
                list_or_none(&known)
            ),
        ));
    }
    if let Payload::File { path } = &spec.payload
        && !Path::new(path).is_file()
    {
        return Err(FieldError::new(
            "payload.path",
            format!("no assignment file `{path}` on the manager's machine"),
        ));
    }
    if let Payload::Live { servers } | Payload::CatchUp { servers } | Payload::Remove { servers } =
        &spec.payload
    {
        for s in servers {
            crate::names::check_name("payload.servers", s)
                .map_err(|e| FieldError::new("payload.servers", e.to_string()))?;
        }
    }
    if let Payload::Plugin { .. } = &spec.payload {
        return Err(FieldError::new(
            "payload",
            "a plugin is published with POST /api/v1/plugins/publish (`cmover plugin publish`), not as a job",
        ));
    }
    if let Payload::Remove { servers } = &spec.payload {
        crate::remove::check(spec, servers, db)?;
    }
    if let Payload::Hot { paths, servers, count } = &spec.payload {
        hot(spec, paths, servers, *count, db)?;
    }
    let p = &spec.policy;
    if p.quorum.min_percent > 100 {
        return Err(FieldError::new(
            "policy.quorum.min_percent",
            format!("{} is not a percentage: accepted 0 to 100", p.quorum.min_percent),
        ));
    }
    if p.run_timeout_ms == 0 {
        return Err(FieldError::new("policy.run_timeout_ms", "must be at least 1"));
    }
    if let OnFailure::Retry { max_attempts: 0, .. } = p.on_failure {
        return Err(FieldError::new(
            "policy.on_failure.max_attempts",
            "must be at least 1 (or use {\"action\": \"cancel\"})",
        ));
    }
    if p.space.wait_ms == 0 || p.space.wait_ms > MAX_SPACE_WAIT_MS {
        return Err(FieldError::new(
            "policy.space.wait_ms",
            format!(
                "{} is out of range: accepted 1 to {MAX_SPACE_WAIT_MS} (7 days)",
                p.space.wait_ms
            ),
        ));
    }
    if spec.every_ms == Some(0) {
        return Err(FieldError::new("every_ms", "must be at least 1 (or null for a one-off job)"));
    }
    Ok(())
}

/// Checks a site's references: its content group exists and its staging directory is an
/// absolute path to a directory on the manager's machine.
pub fn site(
    content_group: &str,
    staging: &str,
    keep_releases: Option<u32>,
    db: &Db,
) -> Result<(), FieldError> {
    if db.group(content_group)?.is_none() {
        let known: Vec<String> = db.groups()?.into_iter().map(|g| g.name).collect();
        return Err(FieldError::new(
            "content_group",
            format!(
                "no content group `{content_group}` (create it with PUT /api/v1/groups/{content_group}); groups: {}",
                list_or_none(&known)
            ),
        ));
    }
    let path = Path::new(staging);
    if !path.is_absolute() {
        return Err(FieldError::new(
            "staging",
            format!("`{staging}` is not an absolute path (the manager resolves no relative paths)"),
        ));
    }
    if !path.is_dir() {
        return Err(FieldError::new(
            "staging",
            format!("no directory `{staging}` on the manager's machine"),
        ));
    }
    if keep_releases == Some(0) {
        return Err(FieldError::new(
            "keep_releases",
            "must be at least 1 (live's snapshot is the next delta's base)",
        ));
    }
    Ok(())
}

fn quoted(names: &[&str]) -> String {
    names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
}

fn list_or_none(names: &[String]) -> String {
    if names.is_empty() { "none yet".into() } else { names.join(", ") }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{JobPolicy, OnBlocked};

    fn spec(v: Value) -> Result<JobSpec, FieldError> {
        decode::<JobSpec>(&v)
    }

    #[test]
    fn a_partial_policy_takes_each_missing_field_s_default() {
        let s = spec(serde_json::json!({
            "name": "p", "kind": "publish", "site": "www", "payload": {"type": "staging"},
            "policy": {"quorum": {"min_percent": 50}, "on_conflict": "cancel"}
        }))
        .unwrap();
        let d = JobPolicy::default();
        assert_eq!(s.policy.quorum.min_percent, 50);
        assert_eq!(s.policy.quorum.min_servers, d.quorum.min_servers);
        assert_eq!(s.policy.on_conflict, OnBlocked::Cancel);
        assert_eq!(
            (s.policy.on_failure, s.policy.run_timeout_ms, s.policy.defer_ms),
            (d.on_failure, d.run_timeout_ms, d.defer_ms)
        );
        let s = spec(serde_json::json!({
            "name": "p", "kind": "publish", "site": "www", "payload": {"type": "staging"},
            "policy": {"on_failure": {"action": "retry", "max_attempts": 5}}
        }))
        .unwrap();
        assert_eq!(s.policy.on_failure, OnFailure::Retry { max_attempts: 5, delay_ms: 30_000 });
    }

    #[test]
    fn errors_name_the_field_and_the_accepted_values() {
        let base = serde_json::json!({
            "name": "p", "kind": "publish", "site": "www", "payload": {"type": "staging"}
        });
        let mut bad = base.clone();
        bad["kind"] = "pubish".into();
        let e = spec(bad).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("kind"));
        assert!(e.message.contains("`publish`") && e.message.contains("`rollback`"), "{e:?}");

        let mut bad = base.clone();
        bad["policy"] = serde_json::json!({"on_conflict": "wait"});
        let e = spec(bad).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("policy.on_conflict"), "{e:?}");
        assert!(e.message.contains("`queue`"), "{e:?}");

        let mut bad = base.clone();
        bad["policy"] = serde_json::json!({"quorum": {"min_percnt": 50}});
        let e = spec(bad).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("policy.quorum.min_percnt"), "{e:?}");

        let mut bad = base.clone();
        bad.as_object_mut().unwrap().remove("site");
        let e = spec(bad).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("site"), "{e:?}");

        let mut ok = base.clone();
        ok["kind"] = "rollback".into();
        ok["payload"] = serde_json::json!({"type": "rollback", "to": 3});
        spec(ok).expect("a rollback to a given serial is a valid spec");
    }

    #[test]
    fn every_job_kind_names_its_payloads() {
        use crate::model::JobKind::*;
        for kind in [
            Publish,
            Replicate,
            Synchronize,
            Commit,
            Rollback,
            Switch,
            Restore,
            Checkpoint,
            Remove,
            Hot,
        ] {
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.name(), "the API's spelling");
            assert!(
                KIND_PAYLOADS.iter().any(|(k, _)| *k == kind.name()),
                "{} has no line in KIND_PAYLOADS",
                kind.name()
            );
        }
    }
}

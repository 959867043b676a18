//! The operator routes of a site's versions (`docs/manager.md`): checkpoints (create, list,
//! delete) and snapshots, and the up-front checks of the jobs that name a release or a
//! checkpoint. The routes sit under `/api/v1/sites/{site}/` and take the operator role like
//! every operator route (checked by `api::handle` before this is reached).

use std::path::Path;
use std::sync::Arc;

use hyper::body::{Body as _, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;

use cm_tree::http::{self, Body};

use crate::db::Db;
use crate::model::{JobSpec, Payload};
use crate::names::check_name;
use crate::server::{Inner, ManagerError};

/// Longest checkpoint note kept (bytes).
const MAX_NOTE: usize = 1024;

/// A checkpoint's note: at most [`MAX_NOTE`] bytes, no control characters (API and console).
pub(crate) fn check_note(n: &str) -> Result<(), ManagerError> {
    if n.len() > MAX_NOTE || n.chars().any(char::is_control) {
        return Err(ManagerError::Invalid(format!(
            "note: at most {MAX_NOTE} bytes, no control characters"
        )));
    }
    Ok(())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    #[serde(default)]
    note: Option<String>,
}

fn fail(e: ManagerError) -> Response<Body> {
    let status = match e {
        ManagerError::NotFound(_) => StatusCode::NOT_FOUND,
        ManagerError::Invalid(_) | ManagerError::Prepare(_) => StatusCode::BAD_REQUEST,
        ManagerError::Checkpoint(crate::checkpoint::CheckpointError::NothingLive { .. }) => {
            StatusCode::CONFLICT
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    http::error(status, &e.to_string())
}

fn answer<T: serde::Serialize>(ok: StatusCode, r: Result<T, ManagerError>) -> Response<Body> {
    match r {
        Ok(v) => http::json(ok, &v),
        Err(e) => fail(e),
    }
}

/// `/api/v1/sites/{site}/{rest..}`: checkpoints and snapshots.
pub(crate) async fn site_route(
    m: Arc<Inner>,
    method: Method,
    site: &str,
    rest: &[&str],
    req: Request<Incoming>,
) -> Response<Body> {
    if let Err(e) = check_name("site name", site) {
        return http::error(StatusCode::BAD_REQUEST, &e.to_string());
    }
    let site = site.to_string();
    let known = m.db.site(&site).map_err(ManagerError::from).and_then(|s| {
        s.ok_or_else(|| ManagerError::NotFound(format!("hosted site {site} does not exist")))
    });
    if let Err(e) = known {
        return fail(e);
    }
    match (method, rest) {
        (Method::POST, ["checkpoints"]) => {
            // The body is optional: none, `{}` or `{"note": "..."}`.
            let b: CreateBody = if req.body().size_hint().exact() == Some(0) {
                CreateBody::default()
            } else {
                match http::read_json(req).await {
                    Ok(b) => b,
                    Err(r) => return r,
                }
            };
            if let Some(Err(e)) = b.note.as_deref().map(check_note) {
                return http::error(StatusCode::BAD_REQUEST, &e.to_string());
            }
            let r = tokio::task::spawn_blocking(move || m.create_checkpoint(&site, b.note, None))
                .await
                .unwrap_or_else(|e| Err(ManagerError::Invalid(format!("checkpoint task: {e}"))));
            answer(StatusCode::CREATED, r)
        }
        (Method::GET, ["checkpoints"]) => {
            answer(StatusCode::OK, m.db.checkpoints(&site).map_err(Into::into))
        }
        (Method::DELETE, ["checkpoints", id]) => match id.parse::<u64>() {
            Ok(id) => answer(StatusCode::OK, m.delete_checkpoint(&site, id, "by an operator")),
            Err(_) => http::error(StatusCode::BAD_REQUEST, &format!("`{id}` is not an id")),
        },
        (Method::GET, ["snapshots"]) => answer(StatusCode::OK, m.snapshots(&site)),
        _ => http::error(StatusCode::NOT_FOUND, "no such operator endpoint"),
    }
}

fn refused(e: crate::prepare::PrepareError) -> ManagerError {
    ManagerError::Invalid(e.to_string())
}

/// Refuses, before a job is stored, what the manager already knows cannot work (after
/// `validate::job` has matched the payload to the kind): a checkpoint that does not exist, a
/// rollback or switch to a release the servers no longer keep.
pub(crate) fn check_job(db: &Db, data_dir: &Path, spec: &JobSpec) -> Result<(), ManagerError> {
    let invalid = |why: String| Err(ManagerError::Invalid(why));
    let Some(site) = db.site(&spec.site)? else { return Ok(()) };
    match &spec.payload {
        Payload::Checkpoint { id } if db.checkpoint(&site.name, *id)?.is_none() => {
            return invalid(format!("checkpoint {id} of site {} does not exist", site.name));
        }
        Payload::Rollback { to: Some(to) } => {
            crate::prepare::check_rollback(&site, Some(*to), data_dir).map_err(refused)?;
        }
        Payload::Switch { serial } => {
            crate::prepare::check_switch(&site, *serial, data_dir).map_err(refused)?
        }
        Payload::CreateCheckpoint { note: Some(n) } if n.len() > MAX_NOTE => {
            return invalid(format!("note: at most {MAX_NOTE} bytes"));
        }
        _ => {}
    }
    Ok(())
}

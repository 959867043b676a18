//! The manager's HTTP API (JSON). Operators configure and run jobs; agents (group leaders) report
//! discovery, walk the tree and send reports. Every route except `/healthz` needs the right
//! role — from a bearer token, or over mutual TLS from the client certificate — checked before
//! the body is read: an unauthenticated request changes nothing. Reference: `docs/manager.md`.

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use std::sync::Arc;

use cm_tree::blob::serve_blob;
use cm_tree::http::{self, Body, Role};
use cm_tree::message::{DiscoveryReport, NextChild, SegmentReport, TreeCall};
use cm_tree::tls::PeerCertificate;

use crate::model::{ContentGroup, HostedSite, JobSpec, JobState, default_keep_releases};
use crate::names::{NameError, check_name};
use crate::now_ms;
use crate::server::{Inner, ManagerError};
use crate::tree::{Next, Node};

fn fail(e: ManagerError) -> Response<Body> {
    let status = match e {
        ManagerError::NotFound(_) => StatusCode::NOT_FOUND,
        ManagerError::Invalid(_) => StatusCode::BAD_REQUEST,
        ManagerError::TooMany(_) => StatusCode::TOO_MANY_REQUESTS,
        ManagerError::Forbidden(_) => StatusCode::FORBIDDEN,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    http::error(status, &e.to_string())
}

fn ok_or_fail<T: serde::Serialize>(r: Result<T, ManagerError>) -> Response<Body> {
    match r {
        Ok(v) => http::json(StatusCode::OK, &v),
        Err(e) => fail(e),
    }
}

/// Checks a name from the request ([`check_name`]) or returns 400 naming the field from the
/// enclosing handler.
macro_rules! name {
    ($field:expr, $value:expr) => {
        if let Err(e) = check_name($field, $value) {
            return bad_name(e);
        }
    };
}

fn bad_name(e: NameError) -> Response<Body> {
    http::error(StatusCode::BAD_REQUEST, &e.to_string())
}

/// Reads the JSON body or returns the error response from the enclosing handler.
macro_rules! body {
    ($req:expr) => {
        match http::read_json($req).await {
            Ok(v) => v,
            Err(r) => return r,
        }
    };
}

#[derive(Deserialize)]
struct GroupBody {
    servers: Vec<String>,
}

#[derive(Deserialize)]
struct SiteBody {
    content_group: String,
    staging: String,
    /// Snapshots kept: the last this many committed releases (default 2, or the site's current setting).
    #[serde(default)]
    keep_releases: Option<u32>,
    /// Checkpoints kept (default 5, or the site's current setting).
    #[serde(default)]
    keep_checkpoints: Option<u32>,
}

#[derive(Deserialize)]
struct RankBody {
    rank: Option<u32>,
}

pub(crate) async fn handle(m: Arc<Inner>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    if path == "/healthz" {
        return http::json(StatusCode::OK, &serde_json::json!({ "manager": true }));
    }
    let Some(role) = m.tokens.role(&req) else {
        return http::error(
            StatusCode::UNAUTHORIZED,
            "a valid bearer token (or a client certificate naming a role) is required",
        );
    };
    let parts: Vec<String> = path.trim_matches('/').split('/').map(str::to_string).collect();
    let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
    let method = req.method().clone();
    match role {
        Role::Operator => operator(m, method, &parts, req).await,
        Role::Agent => agent(m, method, &parts, req).await,
        // The manager's own certificate opens the group leaders' endpoints, not its API.
        Role::Manager => http::error(
            StatusCode::FORBIDDEN,
            "a manager certificate has no routes on the manager's API",
        ),
    }
}

/// Parses an id path segment or returns 400 from the enclosing handler.
macro_rules! id {
    ($s:expr) => {
        match $s.parse::<u64>() {
            Ok(v) => v,
            Err(_) => {
                return http::error(StatusCode::BAD_REQUEST, &format!("`{}` is not an id", $s))
            }
        }
    };
}

async fn operator(
    m: Arc<Inner>,
    method: Method,
    parts: &[&str],
    req: Request<Incoming>,
) -> Response<Body> {
    let now = now_ms();
    match (method, parts) {
        (Method::PUT, ["api", "v1", "groups", name]) => {
            name!("content group name", name);
            let b: GroupBody = body!(req);
            for s in &b.servers {
                name!("server name", s);
            }
            let g = ContentGroup { name: name.to_string(), servers: b.servers };
            ok_or_fail(m.db.write(|t| {
                t.put_group(&g)?;
                t.log(
                    now,
                    None,
                    None,
                    format!("content group {} set: {} servers", g.name, g.servers.len()),
                )?;
                Ok::<_, ManagerError>(g.clone())
            }))
        }
        (Method::GET, ["api", "v1", "groups"]) => ok_or_fail(m.db.groups().map_err(Into::into)),
        (Method::PUT, ["api", "v1", "sites", name]) => {
            name!("site name", name);
            let b: SiteBody = body!(req);
            name!("content_group", &b.content_group);
            ok_or_fail(m.db.write(|t| {
                // Serials and release history are the manager's; an operator edit keeps them.
                let old = m.db.site(name)?;
                let s = HostedSite {
                    name: name.to_string(),
                    content_group: b.content_group.clone(),
                    staging: b.staging.clone(),
                    serial: old.as_ref().map_or(0, |o| o.serial),
                    prepared: old.as_ref().and_then(|o| o.prepared),
                    keep_releases: b
                        .keep_releases
                        .or(old.as_ref().map(|o| o.keep_releases))
                        .unwrap_or_else(default_keep_releases),
                    committed: old.as_ref().map(|o| o.committed.clone()).unwrap_or_default(),
                    keep_checkpoints: b
                        .keep_checkpoints
                        .or(old.as_ref().map(|o| o.keep_checkpoints))
                        .unwrap_or_else(crate::model::default_keep_checkpoints),
                    holders: old.map(|o| o.holders).unwrap_or_default(),
                };
                t.put_site(&s)?;
                Ok::<_, ManagerError>(s.clone())
            }))
        }
        (Method::GET, ["api", "v1", "sites"]) => ok_or_fail(m.db.sites().map_err(Into::into)),
        (Method::POST, ["api", "v1", "jobs"]) => {
            let spec: JobSpec = body!(req);
            name!("site", &spec.site);
            if let Err(e) = crate::versions_api::check_job(&m, &spec) {
                return fail(e);
            }
            match m.db.write(|t| {
                let j = t.insert_job(spec.clone(), now)?;
                t.log(
                    now,
                    Some(j.id),
                    None,
                    format!(
                        "job {} created: {:?} of site {}",
                        j.spec.name, j.spec.kind, j.spec.site
                    ),
                )?;
                Ok::<_, ManagerError>(j)
            }) {
                Ok(j) => http::json(StatusCode::CREATED, &j),
                Err(e) => fail(e),
            }
        }
        (Method::GET, ["api", "v1", "jobs"]) => ok_or_fail(m.db.jobs().map_err(Into::into)),
        (Method::GET, ["api", "v1", "jobs", job]) => {
            let job = id!(job);
            ok_or_fail(
                m.db.job(job)
                    .map_err(Into::into)
                    .and_then(|j| j.ok_or_else(|| ManagerError::NotFound(format!("job {job}")))),
            )
        }
        (Method::POST, ["api", "v1", "jobs", job, "cancel"]) => {
            let job = id!(job);
            ok_or_fail(m.db.write(|t| {
                let mut j =
                    m.db.job(job)?.ok_or_else(|| ManagerError::NotFound(format!("job {job}")))?;
                if let JobState::Running { run } = j.state {
                    return Err(ManagerError::Invalid(format!(
                        "job {job} is running (run {run}); it can be cancelled when the run ends"
                    )));
                }
                j.state = JobState::Cancelled { reason: "cancelled by an operator".into() };
                t.put_job(&j)?;
                t.log(now, Some(job), None, "cancelled by an operator")?;
                Ok(j)
            }))
        }
        (Method::GET, ["api", "v1", "runs", run]) => {
            let run = id!(run);
            ok_or_fail((|| {
                let r =
                    m.db.run(run)?.ok_or_else(|| ManagerError::NotFound(format!("run {run}")))?;
                let reports = m.db.reports(run)?;
                Ok(serde_json::json!({ "run": r, "reports": reports }))
            })())
        }
        (Method::GET, ["api", "v1", "runs"]) => ok_or_fail(m.db.runs().map_err(Into::into)),
        (Method::GET, ["api", "v1", "segments"]) => ok_or_fail(m.db.segments().map_err(Into::into)),
        (Method::PUT, ["api", "v1", "segments", name, "rank"]) => {
            let b: RankBody = body!(req);
            ok_or_fail(m.db.write(|t| {
                let mut s =
                    m.db.segment(name)?
                        .ok_or_else(|| ManagerError::NotFound(format!("segment {name}")))?;
                s.static_rank = b.rank;
                t.put_segment(&s)?;
                Ok::<_, ManagerError>(s)
            }))
        }
        (Method::GET, ["api", "v1", "servers"]) => ok_or_fail(m.db.servers().map_err(Into::into)),
        (Method::GET, ["api", "v1", "history"]) => ok_or_fail(m.db.history().map_err(Into::into)),
        (method, ["api", "v1", "sites", site, rest @ ..]) if !rest.is_empty() => {
            crate::versions_api::site_route(m, method, site, rest, req).await
        }
        _ => http::error(StatusCode::NOT_FOUND, "no such operator endpoint"),
    }
}

async fn agent(
    m: Arc<Inner>,
    method: Method,
    parts: &[&str],
    req: Request<Incoming>,
) -> Response<Body> {
    match (method, parts) {
        (Method::POST, ["api", "v1", "discovery"]) => {
            // Over mutual TLS the report speaks only for the server the certificate names.
            let cert = req.extensions().get::<PeerCertificate>().cloned();
            let r: DiscoveryReport = body!(req);
            ok_or_fail(m.discovery(r, cert.as_ref()))
        }
        (Method::GET, ["dist", run, "blob"]) => {
            let run = id!(run);
            match m.active(run) {
                Some(a) => serve_blob(&a.blob, &req),
                None => {
                    http::error(StatusCode::NOT_FOUND, &format!("run {run} is not distributing"))
                }
            }
        }
        (Method::POST, ["api", "v1", "dist", run, what]) => {
            let run = id!(run);
            let call: TreeCall = body!(req);
            match *what {
                "next" => ok_or_fail(next(&m, run, &call.segment)),
                "received" => {
                    ok_or_fail(m.received(run, &call.segment).map(|_| serde_json::json!({})))
                }
                "dead" => ok_or_fail(
                    m.leader_unreachable(run, &call.segment)
                        .await
                        .map(|dead| serde_json::json!({ "dead": dead })),
                ),
                "reparent" => ok_or_fail(m.reparent(run, &call.segment).await),
                _ => http::error(StatusCode::NOT_FOUND, "no such tree endpoint"),
            }
        }
        (Method::POST, ["api", "v1", "runs", run, "report"]) => {
            let run = id!(run);
            let report: SegmentReport = body!(req);
            ok_or_fail(
                m.segment_report(run, &report)
                    .map(|accepted| serde_json::json!({ "accepted": accepted })),
            )
        }
        _ => http::error(StatusCode::NOT_FOUND, "no such agent endpoint"),
    }
}

/// Seed: "the GL requests another GL address from the CCM". `child: null` ends the GL's forwarding.
fn next(m: &Inner, run_id: u64, segment: &str) -> Result<NextChild, ManagerError> {
    let Some(active) = m.active(run_id) else { return Ok(NextChild { child: None }) };
    let requester = Node::Leader(segment.to_string());
    let next = active.plan.lock().unwrap_or_else(|p| p.into_inner()).next_for(&requester);
    let Next::Serve(child) = next else { return Ok(NextChild { child: None }) };
    let run = m.db.run(run_id)?.ok_or_else(|| ManagerError::NotFound(format!("run {run_id}")))?;
    Ok(NextChild { child: m.child_target(&run, &active, &child, &requester) })
}

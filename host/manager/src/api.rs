//! The manager's HTTP API (JSON). Operators configure and run jobs; agents (group leaders) report
//! discovery, walk the tree and send reports. Every route except `/healthz` needs the right
//! role — from a bearer token, or over mutual TLS from the client certificate — checked before
//! the body is read: an unauthenticated request changes nothing. Reference: `docs/manager.md`.

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

use cm_tree::blob::serve_blob;
use cm_tree::http::{self, Body, Role};
use cm_tree::message::{DiscoveryReport, NextChild, SegmentReport, TreeCall};
use cm_tree::tls::PeerCertificate;

use crate::model::JobSpec;
use crate::now_ms;
use crate::server::{Inner, ManagerError};
use crate::tree::{Next, Node};
use crate::validate::{self, FieldError};
use crate::writes::{self, WriteError};

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

/// `400 {"error": …, "field": …}`: a body refused by validation.
fn field_error(e: FieldError) -> Response<Body> {
    http::json(StatusCode::BAD_REQUEST, &e.body())
}

/// The answer to one of the operator's writes ([`writes`]): the record with `status`, 400 naming
/// the field, or the failure's status.
fn written<T: serde::Serialize>(r: Result<T, WriteError>, status: StatusCode) -> Response<Body> {
    match r {
        Ok(v) => http::json(status, &v),
        Err(WriteError::Refused(e)) => field_error(e),
        Err(WriteError::Failed(e)) => fail(e),
    }
}

fn ok_or_fail<T: serde::Serialize>(r: Result<T, ManagerError>) -> Response<Body> {
    match r {
        Ok(v) => http::json(StatusCode::OK, &v),
        Err(e) => fail(e),
    }
}

/// A record an operator's request created (201), or the error's status.
fn created<T: Serialize>(r: Result<T, ManagerError>) -> Response<Body> {
    match r {
        Ok(v) => http::json(StatusCode::CREATED, &v),
        Err(e) => fail(e),
    }
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

/// Reads an operator's JSON body into `$t`, refusing unknown fields and naming the field that
/// does not decode ([`validate::decode`]), or returns the error response.
macro_rules! checked_body {
    ($req:expr, $t:ty) => {{
        let raw: serde_json::Value = body!($req);
        match validate::decode::<$t>(&raw) {
            Ok(v) => v,
            Err(e) => return field_error(e),
        }
    }};
}

#[derive(Deserialize, Serialize)]
struct GroupBody {
    servers: Vec<String>,
}

#[derive(Deserialize, Serialize)]
struct RankBody {
    rank: Option<u32>,
}

pub(crate) async fn handle(m: Arc<Inner>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    if path == "/healthz" {
        // `active`: whether this replica is the one that writes (a load balancer may route by it).
        let active = m.is_active();
        return http::json(
            StatusCode::OK,
            &serde_json::json!({ "manager": true, "active": active }),
        );
    }
    if crate::console::owns(&path) {
        return crate::console::handle(m, req).await;
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
    let query = req.uri().query().map(str::to_string);
    match (method, parts) {
        (Method::PUT, ["api", "v1", "groups", name]) => {
            let b = checked_body!(req, GroupBody);
            written(
                writes::put_group(&m.db, name, b.servers, now).map(|w| w.record),
                StatusCode::OK,
            )
        }
        (Method::GET, ["api", "v1", "groups"]) => ok_or_fail(m.db.groups().map_err(Into::into)),
        (Method::GET, ["api", "v1", "groups", name]) => {
            ok_or_fail(m.db.group(name).map_err(Into::into).and_then(|g| {
                g.ok_or_else(|| ManagerError::NotFound(format!("no content group `{name}`")))
            }))
        }
        (Method::PUT, ["api", "v1", "sites", name]) => {
            let b = checked_body!(req, writes::SiteSettings);
            let w = writes::put_site(&m.db, name, &b, now);
            written(w.map(|w| w.record), StatusCode::OK)
        }
        (Method::GET, ["api", "v1", "sites"]) => ok_or_fail(m.db.sites().map_err(Into::into)),
        (Method::GET, ["api", "v1", "sites", name]) => {
            ok_or_fail(m.db.site(name).map_err(Into::into).and_then(|s| {
                s.ok_or_else(|| ManagerError::NotFound(format!("no hosted site `{name}`")))
            }))
        }
        (Method::POST, ["api", "v1", "jobs"]) => {
            let spec = checked_body!(req, JobSpec);
            written(writes::create_job(&m.db, &m.cfg.data_dir, spec, now), StatusCode::CREATED)
        }
        (Method::POST, ["api", "v1", "plugins", "publish"]) => {
            let b = checked_body!(req, crate::fleet::PublishRequest);
            let r = crate::fleet::publish(&m.db, &m.cfg.data_dir, b, now);
            m.wake.notify_one();
            created(r)
        }
        (Method::POST, ["api", "v1", "plugins", "rollback"]) => {
            let b = checked_body!(req, crate::fleet::RollbackRequest);
            let r = crate::fleet::rollback(&m.db, &b.group, &b.name, None, "by an operator", now)
                .and_then(|j| {
                    j.ok_or_else(|| {
                        ManagerError::Invalid(format!(
                            "plugin {} on group {}: no previous version to roll back to",
                            b.name, b.group
                        ))
                    })
                });
            m.wake.notify_one();
            created(r)
        }
        (Method::GET, ["api", "v1", "jobs"]) => ok_or_fail(m.db.jobs().map_err(Into::into)),
        (Method::GET, ["api", "v1", "jobs", job]) => {
            let job = id!(job);
            ok_or_fail(
                m.db.job(job)
                    .map_err(Into::into)
                    .and_then(|j| j.ok_or_else(|| ManagerError::NotFound(format!("no job {job}")))),
            )
        }
        (Method::POST, ["api", "v1", "jobs", job, "abort"]) => {
            crate::abort::answer(&m, id!(job), &req, now)
        }
        (Method::POST, ["api", "v1", "jobs", job, "approve"]) => {
            written(crate::golive::approve(&m.db, id!(job), "an operator", now), StatusCode::OK)
        }
        (Method::POST, ["api", "v1", "jobs", job, "cancel"]) => {
            written(writes::cancel_job(&m.db, id!(job), now), StatusCode::OK)
        }
        (Method::GET, ["api", "v1", "runs", run]) => {
            let run = id!(run);
            ok_or_fail((|| {
                let r =
                    m.db.run(run)?
                        .ok_or_else(|| ManagerError::NotFound(format!("no run {run}")))?;
                let reports = m.db.reports(run)?;
                Ok(serde_json::json!({ "run": r, "reports": reports }))
            })())
        }
        (Method::GET, ["api", "v1", "runs"]) => {
            let q = match Filter::parse(query.as_deref()) {
                Ok(q) => q,
                Err(e) => return field_error(e),
            };
            ok_or_fail(m.db.runs().map_err(Into::into).map(|runs| {
                q.keep(runs.into_iter().filter(|r| q.job.is_none_or(|j| r.job == j)).collect())
            }))
        }
        (Method::GET, ["api", "v1", "segments"]) => ok_or_fail(m.db.segments().map_err(Into::into)),
        (Method::PUT, ["api", "v1", "segments", name, "rank"]) => {
            let b = checked_body!(req, RankBody);
            ok_or_fail(m.db.write(|t| {
                let mut s =
                    m.db.segment(name)?
                        .ok_or_else(|| ManagerError::NotFound(format!("no segment `{name}`")))?;
                s.static_rank = b.rank;
                t.put_segment(&s)?;
                Ok::<_, ManagerError>(s)
            }))
        }
        (Method::GET, ["api", "v1", "servers"]) => ok_or_fail(m.db.servers().map_err(Into::into)),
        (Method::GET, ["api", "v1", "history"]) => {
            let q = match Filter::parse(query.as_deref()) {
                Ok(q) => q,
                Err(e) => return field_error(e),
            };
            ok_or_fail(m.db.history().map_err(Into::into).map(|h| {
                q.keep(
                    h.into_iter()
                        .filter(|e| q.job.is_none_or(|j| e.job == Some(j)))
                        .filter(|e| q.run.is_none_or(|r| e.run == Some(r)))
                        .collect(),
                )
            }))
        }
        (Method::GET, ["api", "v1", "events"]) => {
            match crate::events::parse_filter(req.uri().query()) {
                Ok(f) => crate::events::stream(&m.db, f),
                Err(e) => http::error(StatusCode::BAD_REQUEST, &e),
            }
        }
        (method, ["api", "v1", "sites", site, rest @ ..]) if !rest.is_empty() => {
            crate::versions_api::site_route(m, method, site, rest, req).await
        }
        (method, parts) => http::error(
            StatusCode::NOT_FOUND,
            &format!("no operator endpoint {method} /{}; docs/api.md lists them", parts.join("/")),
        ),
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
        (Method::POST, ["api", "v1", "runs", run, "caches"]) => {
            let run = id!(run);
            let report: cm_tree::cache::CacheReport = body!(req);
            ok_or_fail(
                m.cache_report(run, &report)
                    .map(|accepted| serde_json::json!({ "accepted": accepted })),
            )
        }
        (Method::POST, ["api", "v1", "runs", run, "report"]) => {
            let run = id!(run);
            let report: SegmentReport = body!(req);
            ok_or_fail(
                m.segment_report(run, &report)
                    .map(|accepted| serde_json::json!({ "accepted": accepted })),
            )
        }
        (method, parts) => http::error(
            StatusCode::NOT_FOUND,
            &format!("no agent endpoint {method} /{}", parts.join("/")),
        ),
    }
}

/// The query of a list (`GET /api/v1/history?job=3&limit=20`): which entries, and at most how
/// many of the newest.
#[derive(Default)]
struct Filter {
    job: Option<u64>,
    run: Option<u64>,
    limit: Option<usize>,
}

impl Filter {
    fn parse(query: Option<&str>) -> Result<Filter, FieldError> {
        let mut f = Filter::default();
        for pair in query.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let number = || {
                value.parse::<u64>().map_err(|_| {
                    FieldError::new(key, format!("`{value}` is not a non-negative integer"))
                })
            };
            match key {
                "job" => f.job = Some(number()?),
                "run" => f.run = Some(number()?),
                "limit" => f.limit = Some(number()? as usize),
                _ => {
                    return Err(FieldError::new(
                        key,
                        "unknown query parameter; accepted: `job`, `run`, `limit`",
                    ));
                }
            }
        }
        Ok(f)
    }

    /// The newest `limit` of `items` (oldest first, as stored).
    fn keep<T>(&self, mut items: Vec<T>) -> Vec<T> {
        if let Some(n) = self.limit
            && items.len() > n
        {
            items.drain(..items.len() - n);
        }
        items
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

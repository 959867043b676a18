//! Several manager replicas on one PostgreSQL store, one active. The active one holds the lease
//! (`db::postgres::lease`), renewing it every third of its time to live; only it runs the
//! scheduler and the runs' trees, and the database refuses writes from any other (the fencing
//! token). Standbys answer reads from the shared database and redirect writes (307) to the
//! active one's URL; a standby that takes the lease over resumes the runs that were
//! distributing, as a restarted manager does. A redb store has one replica, always active.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hyper::{Method, Request, Response, StatusCode};

use cm_tree::http::{self, Body};

use crate::db::postgres::LeaseHolder;
use crate::server::Inner;

/// This replica's place among replicas.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// Unique among the replicas of one database (a restarted process is a new replica).
    pub id: String,
    /// The API's URL as clients reach it: where standbys redirect writes to.
    pub url: String,
    /// A lease not renewed for this long lapses and a standby takes over.
    pub lease_ttl: Duration,
}

/// Whether this replica is the active one.
#[derive(Default)]
pub(crate) struct Role {
    active: AtomicBool,
}

impl Role {
    pub(crate) fn is_active(&self) -> bool {
        self.active.load(Ordering::SeqCst)
    }
    /// Sets the role; `true` when it changed.
    fn set(&self, active: bool) -> bool {
        self.active.swap(active, Ordering::SeqCst) != active
    }
}

impl Inner {
    pub(crate) fn is_active(&self) -> bool {
        self.role.is_active()
    }

    /// Becomes the active replica: resumes the runs that were distributing and wakes the
    /// scheduler.
    pub(crate) fn take_over(self: &Arc<Self>) -> Result<(), crate::server::ManagerError> {
        if !self.role.set(true) {
            return Ok(());
        }
        tracing::info!("active replica: scheduler and runs start here");
        self.resume_runs()?;
        self.wake.notify_one();
        Ok(())
    }

    /// Stops acting: the scheduler idles and the runs' monitors end (their state is in the
    /// database, for the replica that took over).
    fn step_down(&self) {
        if !self.role.set(false) {
            return;
        }
        tracing::warn!("lost the lease: standby from now on (another replica is active)");
        let runs: Vec<_> = self.runs.lock().unwrap_or_else(|p| p.into_inner()).drain().collect();
        for (_, r) in runs {
            r.changed.notify_waiters();
        }
    }
}

/// Holds (or waits for) the lease for as long as the manager runs.
pub(crate) async fn hold_lease(inner: Arc<Inner>, me: ReplicaConfig) {
    let holder = LeaseHolder { id: me.id.clone(), url: me.url.clone() };
    let mut last_held: Option<Instant> = None;
    loop {
        let (i, h, ttl) = (inner.clone(), holder.clone(), me.lease_ttl);
        let asked = tokio::task::spawn_blocking(move || match i.db.postgres() {
            Some(pg) => pg.hold_lease(&h, ttl),
            None => Ok(Some(0)),
        })
        .await;
        let held = match asked {
            Ok(Ok(token)) => {
                last_held = token.map(|_| Instant::now());
                token.is_some()
            }
            Ok(Err(e)) => {
                tracing::warn!("renewing the lease: {e}");
                // Unsure: keep acting until the lease would have lapsed (the fence guards writes).
                last_held.is_some_and(|t| t.elapsed() < me.lease_ttl)
            }
            Err(e) => {
                tracing::error!("the lease task: {e}");
                false
            }
        };
        if held && !inner.is_active() {
            if let Err(e) = inner.take_over() {
                tracing::error!("taking over: {e}");
            }
        } else if !held && inner.is_active() {
            inner.step_down();
        }
        tokio::time::sleep(me.lease_ttl / 3).await;
    }
}

/// Gives the lease up (a clean shutdown) so a standby takes over at once.
pub(crate) fn release(inner: &Inner, me: &ReplicaConfig) {
    if let Some(pg) = inner.db.postgres() {
        let holder = LeaseHolder { id: me.id.clone(), url: me.url.clone() };
        if let Err(e) = pg.release_lease(&holder) {
            tracing::warn!("releasing the lease: {e}");
        }
    }
}

/// A request a standby does not serve itself: a write by an authenticated client (or through
/// the console, whose forms carry their own session).
pub(crate) fn redirected<B>(inner: &Inner, req: &Request<B>) -> bool {
    let write = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    write
        && !inner.is_active()
        && (inner.tokens.role(req).is_some() || req.uri().path().starts_with("/console"))
}

/// `307` to the active replica, the same path and query (the client repeats the method and
/// body there); `503` while no replica holds the lease.
pub(crate) fn redirect<B>(inner: &Inner, req: &Request<B>) -> Response<Body> {
    let lease = inner.db.postgres().map(|pg| pg.lease());
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    match lease {
        Some(Ok(l)) if l.live && !l.holder.url.is_empty() && l.holder.url != inner.url => {
            let location = format!("{}{path}", l.holder.url.trim_end_matches('/'));
            let mut r = http::error(
                StatusCode::TEMPORARY_REDIRECT,
                &format!("this manager is a standby; the active one is {}", l.holder.url),
            );
            if let Ok(v) = location.parse() {
                r.headers_mut().insert(hyper::header::LOCATION, v);
            }
            r
        }
        Some(Err(e)) => http::error(StatusCode::SERVICE_UNAVAILABLE, &format!("standby: {e}")),
        _ => {
            let mut r = http::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "this manager is a standby and no replica is active right now; retry shortly",
            );
            r.headers_mut()
                .insert(hyper::header::RETRY_AFTER, hyper::header::HeaderValue::from_static("1"));
            r
        }
    }
}

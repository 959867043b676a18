//! The manager's Prometheus metrics: runs by kind and outcome, their durations, group leaders
//! lost during runs, and how long scrapes take to answer. The tree's bytes and the HTTP
//! requests by route are `cm_tree::metrics`'. `/metrics` is served on the API's port to the
//! operator role or the scrape token ([`cm_tree::metrics::Exposition`]).

use std::sync::{Arc, LazyLock};

use cm_tree::http::{Body, Role};
use hyper::body::Incoming;
use hyper::{Request, Response};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::model::{JobKind, Run};

/// The API's routes, for the `route` label of `cmover_http_requests` (anything else: `other`).
pub const ROUTES: &[&str] = &[
    "GET /healthz",
    "GET /metrics",
    "PUT /api/v1/groups/{name}",
    "GET /api/v1/groups",
    "PUT /api/v1/sites/{name}",
    "GET /api/v1/sites",
    "POST /api/v1/jobs",
    "GET /api/v1/jobs",
    "GET /api/v1/jobs/{id}",
    "POST /api/v1/plugins/publish",
    "POST /api/v1/plugins/rollback",
    "POST /api/v1/jobs/{id}/cancel",
    "GET /api/v1/runs",
    "GET /api/v1/runs/{id}",
    "GET /api/v1/segments",
    "PUT /api/v1/segments/{name}/rank",
    "GET /api/v1/servers",
    "GET /api/v1/history",
    "GET /api/v1/events",
    "POST /api/v1/discovery",
    "GET /dist/{id}/blob",
    "POST /api/v1/dist/{id}/next",
    "POST /api/v1/dist/{id}/received",
    "POST /api/v1/dist/{id}/dead",
    "POST /api/v1/dist/{id}/reparent",
    "POST /api/v1/runs/{id}/report",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RunLabels {
    /// publish, replicate, synchronize, commit, rollback (a publish's commit stage: commit).
    pub kind: &'static str,
    /// succeeded or failed.
    pub outcome: &'static str,
}

/// A server's interpreter plugin as it last reported it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabels {
    pub server: String,
    pub plugin: String,
    /// The short hash `cmover plugin list` shows.
    pub version: String,
    pub blake3: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

struct ManagerMetrics {
    runs: Family<RunLabels, Counter>,
    run_seconds: Family<KindLabel, Histogram>,
    leaders_lost: Counter,
    plugin_reports_refused: Counter,
    server_plugin: Family<PluginLabels, Gauge>,
    /// Each server's current labels in `server_plugin`, so a swap replaces its series.
    server_plugin_now: std::sync::Mutex<std::collections::BTreeMap<String, PluginLabels>>,
}

static MANAGER: LazyLock<ManagerMetrics> = LazyLock::new(|| ManagerMetrics {
    runs: Family::default(),
    // 0.1 s to ~30 min.
    run_seconds: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.1, 2.0, 15))),
    leaders_lost: Counter::default(),
    plugin_reports_refused: Counter::default(),
    server_plugin: Family::default(),
    server_plugin_now: Default::default(),
});

/// Adds the manager's metrics to the process's registry.
pub fn register(registry: &mut Registry) {
    let m = &*MANAGER;
    registry.register("cmover_runs", "Runs ended, by kind and outcome", m.runs.clone());
    registry.register(
        "cmover_run_duration_seconds",
        "Time from a run's start to its outcome (distribution, apply and reports; for a commit run, the commit)",
        m.run_seconds.clone(),
    );
    registry.register(
        "cmover_tree_leaders_lost",
        "Group leaders found unreachable during a run (their children re-parented: a failover in the tree)",
        m.leaders_lost.clone(),
    );
    registry.register(
        "cmover_server_plugin",
        "1 for the interpreter plugin version each server last reported (labels: server, plugin, version, blake3)",
        m.server_plugin.clone(),
    );
    registry.register(
        "cmover_plugin_reports_refused",
        "Discovery reports refused because the plugins they relay were malformed or too many",
        m.plugin_reports_refused.clone(),
    );
}

/// A run of a job of `kind` ended (`ok`: it met its quorum) at `now_ms`.
pub fn run_ended(run: &Run, kind: JobKind, ok: bool, now_ms: u64) {
    let kind = if run.commit_of.is_some() { "commit" } else { kind.name() };
    let outcome = if ok { "succeeded" } else { "failed" };
    MANAGER.runs.get_or_create(&RunLabels { kind, outcome }).inc();
    let secs = now_ms.saturating_sub(run.started_ms) as f64 / 1000.0;
    MANAGER.run_seconds.get_or_create(&KindLabel { kind }).observe(secs);
}

/// Server `server` reported running `plugin` (`None`: nothing reported yet).
pub fn server_plugin(server: &str, plugin: Option<&crate::model::PluginIdentity>) {
    let m = &*MANAGER;
    let mut now = m.server_plugin_now.lock().unwrap_or_else(|p| p.into_inner());
    let new = plugin.map(|p| PluginLabels {
        server: server.to_string(),
        plugin: p.name.clone(),
        version: p.version.clone(),
        blake3: p.blake3.clone(),
    });
    if now.get(server) == new.as_ref() {
        return;
    }
    if let Some(old) = now.remove(server) {
        m.server_plugin.remove(&old);
    }
    if let Some(l) = new {
        m.server_plugin.get_or_create(&l).set(1);
        now.insert(server.to_string(), l);
    }
}

/// A run's group leader did not answer and was routed around.
pub fn leader_lost() {
    MANAGER.leaders_lost.inc();
}

/// A discovery report's plugins were refused (nothing of the report was stored).
pub fn plugin_report_refused() {
    MANAGER.plugin_reports_refused.inc();
}

/// Plugin reports refused so far (tests read it).
pub fn plugin_reports_refused() -> u64 {
    MANAGER.plugin_reports_refused.get()
}

/// Every API request passes here: `/metrics` is answered (operator role or scrape token), the
/// rest goes to the API; each answer is counted by route pattern and status.
pub(crate) async fn answer(m: Arc<crate::server::Inner>, req: Request<Incoming>) -> Response<Body> {
    let route = cm_tree::metrics::route_label(req.method(), req.uri().path(), ROUTES);
    let r = match (&m.cfg.metrics, route) {
        _ if crate::replica::redirected(&m, &req) => crate::replica::redirect(&m, &req),
        (Some(e), "GET /metrics") => {
            let operator = m.tokens.role(&req) == Some(Role::Operator);
            e.respond(&req, operator)
        }
        _ => crate::api::handle(m, req).await,
    };
    cm_tree::metrics::request(route, r.status());
    r
}

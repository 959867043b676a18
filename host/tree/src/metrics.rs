//! Prometheus metrics both node kinds share: bytes each tree hop sent and received, HTTP
//! requests by route and status, and the `/metrics` exposition with its scrape token.
//!
//! Each crate owns the counters it increments in a `metrics.rs` of its own (statics, so a call
//! site is one line) and adds them to the process's one [`Registry`] with its `register`; the
//! process serves that registry with [`exposition`]. Label values come from fixed sets (route
//! patterns, outcomes), never from a request, so a client cannot grow the registry.

use std::sync::{Arc, LazyLock, RwLock};

use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::http::{self, Body};

/// One HTTP request answered: which route (a pattern like `/api/v1/jobs/{id}`) and its status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub status: u16,
}

/// The tree's counters.
pub struct TreeMetrics {
    /// Assignment bytes this node sent to its children (blob responses).
    pub bytes_sent: Counter,
    /// Assignment bytes this node received from its parent (verified or not).
    pub bytes_received: Counter,
    pub requests: Family<RequestLabels, Counter>,
}

static TREE: LazyLock<TreeMetrics> = LazyLock::new(|| TreeMetrics {
    bytes_sent: Counter::default(),
    bytes_received: Counter::default(),
    requests: Family::default(),
});

/// Adds the tree's metrics to the process's registry.
pub fn register(registry: &mut Registry) {
    let t = &*TREE;
    registry.register(
        "cmover_tree_bytes_sent",
        "Assignment bytes this node sent down the tree (to its children)",
        t.bytes_sent.clone(),
    );
    registry.register(
        "cmover_tree_bytes_received",
        "Assignment bytes this node received from its parent in the tree",
        t.bytes_received.clone(),
    );
    registry.register(
        "cmover_http_requests",
        "HTTP requests answered, by route pattern and status",
        t.requests.clone(),
    );
}

/// `n` assignment bytes went to a child.
pub fn sent(n: u64) {
    TREE.bytes_sent.inc_by(n);
}

/// `n` assignment bytes came from the parent.
pub fn received(n: u64) {
    TREE.bytes_received.inc_by(n);
}

/// A request to `route` was answered `status`.
pub fn request(route: &'static str, status: StatusCode) {
    TREE.requests.get_or_create(&RequestLabels { route, status: status.as_u16() }).inc();
}

/// The route pattern a request matches, for the `route` label: `patterns` are like
/// `"GET /api/v1/jobs/{id}"`, where `{id}` matches a number and `{name}` any one segment.
/// Anything else is `"other"`, so a client's made-up paths all share one label.
pub fn route_label(method: &hyper::Method, path: &str, patterns: &[&'static str]) -> &'static str {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    patterns
        .iter()
        .find(|p| {
            let Some((m, route)) = p.split_once(' ') else { return false };
            let want: Vec<&str> = route.trim_matches('/').split('/').collect();
            m == method.as_str()
                && want.len() == parts.len()
                && want.iter().zip(&parts).all(|(w, got)| match *w {
                    "{id}" => !got.is_empty() && got.bytes().all(|b| b.is_ascii_digit()),
                    "{name}" => !got.is_empty(),
                    w => w == *got,
                })
        })
        .copied()
        .unwrap_or("other")
}

/// The scrape token (`--metrics-token-file`): only its BLAKE3 hash is kept, compared in
/// constant time; [`ScrapeToken::replace`] takes a new one (SIGHUP). `None`: no token, so only
/// the process's other credentials (the manager's operator role) open `/metrics`.
#[derive(Clone, Default)]
pub struct ScrapeToken(Arc<RwLock<Option<blake3::Hash>>>);

impl ScrapeToken {
    pub fn new(token: Option<&str>) -> ScrapeToken {
        let t = ScrapeToken::default();
        t.replace(token);
        t
    }

    pub fn replace(&self, token: Option<&str>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) =
            token.map(|t| blake3::hash(t.as_bytes()));
    }

    /// Whether the request presents the scrape token as its bearer token.
    pub fn admits<B>(&self, req: &Request<B>) -> bool {
        let Some(want) = *self.0.read().unwrap_or_else(|p| p.into_inner()) else { return false };
        http::bearer(req).is_some_and(|t| blake3::hash(t.as_bytes()) == want)
    }
}

/// What a process serves at `/metrics`: its one registry, and the scrape token that opens it.
#[derive(Clone)]
pub struct Exposition {
    pub registry: Arc<Registry>,
    pub token: ScrapeToken,
}

impl std::fmt::Debug for Exposition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Exposition { .. }")
    }
}

impl Exposition {
    /// The `/metrics` answer: the registry in the Prometheus text format (OpenMetrics), or 401
    /// unless `authorized` (the caller's own check, e.g. the operator role) or the scrape token
    /// admits the request.
    pub fn respond<B>(&self, req: &Request<B>, authorized: bool) -> Response<Body> {
        if !authorized && !self.token.admits(req) {
            return http::error(
                StatusCode::UNAUTHORIZED,
                "/metrics needs the scrape token (or an operator's credentials) as a bearer token",
            );
        }
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            return http::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("encoding metrics: {e}"),
            );
        }
        let mut r = Response::new(http::full(text));
        r.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        );
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::AUTHORIZATION;

    fn req(token: Option<&str>) -> Request<()> {
        let mut b = Request::builder().uri("/metrics");
        if let Some(t) = token {
            b = b.header(AUTHORIZATION, format!("Bearer {t}"));
        }
        b.body(()).unwrap()
    }

    #[test]
    fn routes_are_labelled_by_pattern_and_unknown_paths_share_one_label() {
        use hyper::Method;
        let p = ["GET /api/v1/jobs/{id}", "PUT /api/v1/sites/{name}", "GET /healthz"];
        assert_eq!(route_label(&Method::GET, "/api/v1/jobs/17", &p), "GET /api/v1/jobs/{id}");
        assert_eq!(route_label(&Method::GET, "/api/v1/jobs/x", &p), "other");
        assert_eq!(route_label(&Method::PUT, "/api/v1/sites/www", &p), "PUT /api/v1/sites/{name}");
        assert_eq!(route_label(&Method::POST, "/healthz", &p), "other");
        assert_eq!(route_label(&Method::GET, "/healthz", &p), "GET /healthz");
    }

    #[test]
    fn metrics_are_refused_without_credentials_and_served_with_the_token() {
        let mut registry = Registry::default();
        register(&mut registry);
        sent(5);
        request("/x", StatusCode::OK);
        let e = Exposition {
            registry: Arc::new(registry),
            token: ScrapeToken::new(Some("scrape-token-0123")),
        };
        assert_eq!(e.respond(&req(None), false).status(), StatusCode::UNAUTHORIZED);
        assert_eq!(e.respond(&req(Some("wrong")), false).status(), StatusCode::UNAUTHORIZED);
        assert_eq!(e.respond(&req(Some("scrape-token-0123")), false).status(), StatusCode::OK);
        assert_eq!(e.respond(&req(None), true).status(), StatusCode::OK);
        e.token.replace(None);
        assert_eq!(
            e.respond(&req(Some("scrape-token-0123")), false).status(),
            StatusCode::UNAUTHORIZED
        );
    }
}

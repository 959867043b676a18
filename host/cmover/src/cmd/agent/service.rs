//! The agent as a service: its `[metrics]` and `[log]` settings, the `/metrics` listener
//! (plain HTTP, the scrape token required: the agent knows no operator token), SIGHUP reload
//! and `--check-config`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use cm_agent::node::ServerAgent;
use cm_tree::http::{self, Body};
use cm_tree::metrics::{Exposition, ScrapeToken};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::{AgentSettings, RunArgs};
use crate::logging::{self, LogArgs, LogFormat};

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub(super) struct MetricsSection {
    listen: Option<SocketAddr>,
    token_file: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub(super) struct LogSection {
    level: Option<String>,
    format: Option<LogFormat>,
}

/// `[metrics]` and `[log]`, resolved.
pub(super) struct ServiceSettings {
    /// Where `/metrics` is served, and the scrape token's file and value.
    metrics: Option<(SocketAddr, PathBuf, String)>,
    log_level: Option<String>,
    log_format: LogFormat,
}

impl ServiceSettings {
    pub(super) fn resolve(
        a: &RunArgs,
        m: &MetricsSection,
        l: &LogSection,
    ) -> anyhow::Result<ServiceSettings> {
        let listen = a.metrics_listen.or(m.listen);
        let token_file = a.metrics_token_file.clone().or(m.token_file.clone());
        let metrics = match (listen, token_file) {
            (None, None) => None,
            (Some(addr), Some(f)) => {
                let token = crate::service::read_secret(&f, "[metrics] token_file")?;
                Some((addr, f, token))
            }
            (Some(_), None) => bail!(
                "[metrics] listen is set but [metrics] token_file is not: /metrics is never served without a scrape token"
            ),
            (None, Some(_)) => bail!("[metrics] token_file is set but [metrics] listen is not"),
        };
        if let Some(level) = &l.level {
            logging::parse_level(level).context("[log] level")?;
        }
        Ok(ServiceSettings {
            metrics,
            log_level: l.level.clone(),
            log_format: l.format.unwrap_or_default(),
        })
    }
}

/// Installs the logger: flags over `[log]`, `RUST_LOG` over both.
pub(super) fn init_logging(log: &LogArgs, s: &ServiceSettings) -> anyhow::Result<()> {
    let level = log.log_level.clone().or(s.log_level.clone());
    logging::init(log.log_format.unwrap_or(s.log_format), level.as_deref())
}

/// The process's one metrics registry: the agent's (with the plugin calls') and the tree's.
fn registry() -> Arc<prometheus_client::registry::Registry> {
    let mut r = prometheus_client::registry::Registry::default();
    cm_tree::metrics::register(&mut r);
    cm_agent::metrics::register(&mut r);
    Arc::new(r)
}

/// The bound `/metrics` listener, not yet answering.
pub(super) struct MetricsServer {
    listener: TcpListener,
    exposition: Exposition,
}

/// The scrape token of the running process (replaced on SIGHUP).
static SCRAPE: std::sync::OnceLock<ScrapeToken> = std::sync::OnceLock::new();

impl MetricsServer {
    /// Binds `[metrics] listen` (before the agent joins, so a taken port fails the start).
    pub(super) async fn bind(s: &ServiceSettings) -> anyhow::Result<Option<MetricsServer>> {
        let Some((addr, _, token)) = &s.metrics else { return Ok(None) };
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("[metrics] listen: binding {addr}"))?;
        let scrape = SCRAPE.get_or_init(ScrapeToken::default).clone();
        scrape.replace(Some(token));
        let token = scrape;
        Ok(Some(MetricsServer { listener, exposition: Exposition { registry: registry(), token } }))
    }

    pub(super) fn spawn(self) -> JoinHandle<()> {
        let e = self.exposition;
        tokio::spawn(http::serve(self.listener, move |req| {
            let e = e.clone();
            async move { answer(&e, req) }
        }))
    }
}

fn answer(e: &Exposition, req: Request<Incoming>) -> Response<Body> {
    let r = if req.uri().path() == "/metrics" && req.method() == hyper::Method::GET {
        e.respond(&req, false)
    } else {
        http::error(StatusCode::NOT_FOUND, "only GET /metrics is served here")
    };
    let route = if r.status() == StatusCode::NOT_FOUND { "other" } else { "GET /metrics" };
    cm_tree::metrics::request(route, r.status());
    r
}

/// SIGHUP: re-reads `[log] level` and the scrape token (flags still win) and rescans the
/// plugin store. Everything else needs a restart, which the log says.
pub(super) fn reload(
    a: &RunArgs,
    log: &LogArgs,
    running: &ServiceSettings,
    agent: Option<&ServerAgent>,
) {
    let file = match super::read_file(a.config.as_ref()) {
        Ok(f) => f,
        Err(e) => {
            tracing::error!("SIGHUP: {e:#}; nothing reloaded");
            return;
        }
    };
    let new = match ServiceSettings::resolve(a, &file.metrics, &file.log) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("SIGHUP: {e:#}; nothing reloaded");
            return;
        }
    };
    let mut done = Vec::new();
    if let Some(level) = log.log_level.clone().or(new.log_level.clone()) {
        match logging::set_level(&level) {
            Ok(true) => done.push("[log] level"),
            Ok(false) => tracing::info!("SIGHUP: RUST_LOG is set and wins over [log] level"),
            Err(e) => tracing::error!("SIGHUP: [log] level: {e:#}"),
        }
    }
    match (&running.metrics, &new.metrics, SCRAPE.get()) {
        (Some((addr, ..)), Some((new_addr, _, token)), Some(scrape)) => {
            scrape.replace(Some(token));
            done.push("[metrics] token_file");
            if addr != new_addr {
                tracing::warn!(
                    "SIGHUP: [metrics] listen changed; it takes effect only after a restart"
                );
            }
        }
        (None, None, _) => {}
        _ => tracing::warn!("SIGHUP: [metrics] was turned on or off; that takes a restart"),
    }
    if let Some(agent) = agent {
        let events = agent.rescan_plugins();
        done.push("plugin store rescanned");
        for ev in events {
            tracing::info!("SIGHUP: plugin store: {ev:?}");
        }
    }
    tracing::info!(
        reloaded = %done.join(", "),
        "SIGHUP: reloaded; every other setting (segment, channels, site, tokens, keys, TLS) takes a restart"
    );
}

/// `cmover agent --check-config`: the settings resolved (files read, keys and certificates
/// loaded) or the first problem, naming its key.
pub(super) fn check(resolved: anyhow::Result<AgentSettings>) -> anyhow::Result<()> {
    let s = resolved.context("configuration refused")?;
    if let Some(agent) = &s.agent {
        cm_agent::node::sites::check_sites(&agent.sites)
            .map_err(|e| anyhow::anyhow!("configuration refused: [site]: {e}"))?;
        let roots = agent.sites.iter().map(|site| ("[site] root", &site.root));
        for (key, path) in roots.chain([("[plugins] store", &agent.plugin_store)]) {
            let parent_ok = path.exists()
                || path.parent().is_some_and(|p| p.as_os_str().is_empty() || p.is_dir());
            if !parent_ok {
                bail!(
                    "configuration refused: {key}: neither {} nor its parent directory exists",
                    path.display()
                );
            }
            if path.exists() && !path.is_dir() {
                bail!("configuration refused: {key}: {} is not a directory", path.display());
            }
        }
    }
    println!(
        "configuration OK: node {} ({}) on segment {}, control channel {}, {}",
        s.election.node,
        s.name,
        s.segment,
        s.election.control_channel,
        match &s.agent {
            Some(_) => "server agent",
            None => "election only",
        }
    );
    Ok(())
}

//! `cmover manager`: runs the Content Control Manager (database, HTTP API, scheduler, tree root)
//! as a service. Settings come from a TOML file and flags ([`config`]; `--check-config` checks
//! them and exits). `/metrics` is served on the API's port to the operator role or the scrape
//! token. SIGTERM (or Ctrl-C) stops gracefully: no new connection or job, requests in flight
//! finish within the grace period, runs in flight resume at the next start; SIGHUP re-reads
//! the token files and the log level (`docs/operations.md`). systemd is told READY=1 once the
//! API serves, RELOADING=1 and STOPPING=1.

mod config;

use anyhow::{Context, bail};
use cm_manager::server::{Manager, ManagerConfig};
use cm_tree::metrics::{Exposition, ScrapeToken};
use cm_tree::tls::{CertRole, Tls, TlsFiles};
use std::path::PathBuf;
use std::sync::Arc;

pub use config::Args;

use crate::logging::{self, LogArgs};
use crate::service::{self, Request, Signals};

/// Mutual TLS (`cmover cert`): all three files, or none for plain HTTP with bearer tokens.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct TlsArgs {
    /// The cluster CA's certificate: clients must present a certificate it signed.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// This node's certificate (`cmover cert issue`).
    #[arg(long, requires_all = ["tls_ca", "tls_key"])]
    pub tls_cert: Option<PathBuf>,
    /// This node's private key.
    #[arg(long, requires_all = ["tls_ca", "tls_cert"])]
    pub tls_key: Option<PathBuf>,
}

impl TlsArgs {
    pub fn files(&self) -> Option<TlsFiles> {
        Some(TlsFiles {
            ca: self.tls_ca.clone()?,
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
        })
    }
}

/// Loads a node's TLS identity and checks its role is `want`.
pub fn load_tls(files: &TlsFiles, want: CertRole) -> anyhow::Result<Tls> {
    let tls = Tls::load(files).context("loading the TLS certificate")?;
    if tls.role != Some(want) {
        bail!(
            "{} is not a {} certificate (it names {}); issue one with `cmover cert issue --role {}`",
            files.cert.display(),
            want.name(),
            tls.role.map_or("no role", |r| r.name()),
            want.name()
        );
    }
    Ok(tls)
}

/// The process's one metrics registry: the manager's, the tree's.
fn registry() -> Arc<prometheus_client::registry::Registry> {
    let mut r = prometheus_client::registry::Registry::default();
    cm_tree::metrics::register(&mut r);
    cm_manager::metrics::register(&mut r);
    Arc::new(r)
}

pub async fn run(a: Args, log: LogArgs) -> anyhow::Result<()> {
    let s = match config::resolve(&a) {
        Ok(s) => s,
        Err(problems) if a.check_config => {
            eprint!("configuration has {} problem(s):\n{problems}", problems.0.len());
            bail!("configuration refused");
        }
        Err(problems) => bail!("cannot start the manager:\n{problems}"),
    };
    if a.check_config {
        println!(
            "configuration OK: API on {}, data in {}{}",
            s.listen,
            s.data_dir.display(),
            if s.signer.is_none() {
                " (warning: no signing key: agents refuse every run)"
            } else {
                ""
            }
        );
        return Ok(());
    }
    let level = log.log_level.clone().or(s.log_level.clone());
    logging::init(log.log_format.unwrap_or(s.log_format), level.as_deref())?;
    crate::raise_fd_limit();
    let scrape = ScrapeToken::new(s.metrics_token.as_ref().map(|t| t.value.as_str()));
    let mut cfg =
        ManagerConfig::new(s.data_dir.clone(), &s.operator_token.value, &s.agent_token.value);
    cfg.tls = s.tls.as_ref().map(|t| t.1.clone());
    cfg.listen = s.listen;
    cfg.tree.root_fanout = s.root_fanout;
    cfg.tree.leader_fanout = s.leader_fanout;
    cfg.tree.star_max = s.star_max;
    cfg.chunk_size = s.chunk_kib << 10;
    cfg.tick = s.tick;
    cfg.max_segment_members = s.max_segment_members;
    cfg.shutdown_grace = s.shutdown_grace;
    cfg.store = s.store.clone();
    if cfg.store.as_ref().is_some_and(|s| matches!(s, cm_manager::db::StoreSpec::Postgres(_))) {
        let scheme = if cfg.tls.is_some() { "https" } else { "http" };
        let url = s.advertise_url.clone().unwrap_or_else(|| format!("{scheme}://{}", s.listen));
        cfg.replica = Some(cm_manager::replica::ReplicaConfig {
            // A restarted process is a new replica: the id never outlives the process.
            id: format!("{url} pid {} {:08x}", std::process::id(), rand::random::<u32>()),
            url,
            lease_ttl: s.lease_ttl,
        });
    }
    cfg.metrics = Some(Exposition { registry: registry(), token: scrape.clone() });
    if let Some((_, secret)) = &s.seal_secret {
        cfg.seal = Some(cm_manager::prepare::SealKey::derive(secret));
    }
    match &s.signer {
        Some((_, k)) => {
            tracing::info!(public_key = %k.public_key().to_hex(), "signing runs");
            cfg.signer = Some(k.clone());
        }
        None => eprintln!(
            "warning: no --signing-key: runs go out unsigned and every agent will refuse them"
        ),
    }
    // Installed before the API serves: from here on SIGTERM and SIGHUP are ours.
    let mut signals = Signals::install()?;
    let m = Manager::start(cfg).await.context("starting the manager")?;
    tracing::info!(url = m.url(), data = %s.data_dir.display(), "manager running");
    println!("manager listening on {} (data in {})", m.url(), s.data_dir.display());
    service::ready(&format!("serving on {}", m.url()));
    loop {
        match signals.next().await {
            Request::Stop => break,
            Request::Reload => {
                service::reloading();
                reload(&a, &log, &s, &m, &scrape);
                service::ready(&format!("serving on {}", m.url()));
            }
        }
    }
    service::stopping();
    tracing::info!(grace = ?s.shutdown_grace, "stopping: no new connections; finishing requests in flight");
    let drained = m.shutdown().await;
    if !drained {
        tracing::warn!("some requests were still in flight at the end of the grace period");
    }
    tracing::info!("manager stopped; runs in flight resume at the next start");
    Ok(())
}

/// SIGHUP: re-reads the settings; takes the new operator and agent tokens (from their files),
/// the scrape token and the log level; names every other changed key as needing a restart.
fn reload(a: &Args, log: &LogArgs, running: &config::Settings, m: &Manager, scrape: &ScrapeToken) {
    let new = match config::resolve(a) {
        Ok(s) => s,
        Err(problems) => {
            tracing::error!("SIGHUP: the settings have problems; nothing reloaded:\n{problems}");
            return;
        }
    };
    m.replace_tokens(&new.operator_token.value, &new.agent_token.value);
    scrape.replace(new.metrics_token.as_ref().map(|t| t.value.as_str()));
    let mut done = vec![
        "auth.operator_token_file",
        "auth.agent_token_file (accepted token)",
        "auth.metrics_token_file",
    ];
    if let Some(level) = log.log_level.clone().or(new.log_level.clone()) {
        match logging::set_level(&level) {
            Ok(true) => done.push("log.level"),
            Ok(false) => tracing::info!("SIGHUP: RUST_LOG is set and wins over log.level"),
            Err(e) => tracing::error!("SIGHUP: log.level: {e:#}"),
        }
    }
    let before = running.restart_only();
    for (key, value) in new.restart_only() {
        if before.iter().any(|(k, v)| *k == key && *v != value) {
            tracing::warn!("SIGHUP: {key} changed; it takes effect only after a restart");
        }
    }
    tracing::info!(reloaded = %done.join(", "), "SIGHUP: settings reloaded");
}

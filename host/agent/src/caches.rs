//! A GL keeps its segment's caches fresh: once the servers of its segment committed a run that
//! changed what is live, it hands the run's [`CacheOrder`] (signed by the manager with the
//! notification) to every cache-invalidator plugin its config names (`[[caches]]`), then
//! reports each cache's outcome to the manager, which writes it into the history.
//!
//! - Paths are invalidated in batches of `batch`; the whole site is purged when the order says
//!   so. Each call is tried up to `attempts` times (a pause growing by 200 ms between them); a
//!   batch that still fails is reported with its error, and the other batches go on.
//! - Optional warming: the changed (not the removed) paths are fetched through the cache
//!   (`HEAD`, which Varnish and nginx turn into a `GET` of the backend and cache) at most
//!   `warm_concurrency` at a time.
//! - None of it delays the commit: it starts after the GL sent its segment's report, in a task
//!   of its own. The manager hears when it is done (a report even with no cache configured):
//!   a rolling switch puts the group back into rotation only then.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cm_plugin_host::{CacheInvalidator, PluginError};
use cm_tree::cache::{CacheChange, CacheOrder, CacheOutcome, CacheReport, MAX_SUMMARY};
use cm_tree::http::JsonClient;
use cm_tree::message::{Notification, SegmentReport};
use serde::Deserialize;

use crate::node::Shared;

/// How long a GL offers its report of the cache calls to the manager's replicas.
const CACHE_PATIENCE: Duration = Duration::from_secs(60);

/// One cache in front of this segment's servers (`[[caches]]` in the agent's settings). Every
/// agent of the segment that may lead it carries the same list.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// The cache-invalidator plugin in this agent's store (`cmover plugin install`): its
    /// manifest grants it the cache's endpoints.
    pub plugin: String,
    /// Only orders of this hosted site (default: every site this agent serves).
    #[serde(default)]
    pub site: Option<String>,
    /// The name the plugin gets as `site` — the `Host` the cache keys on (default: the site).
    #[serde(default)]
    pub host: Option<String>,
    /// Paths per `invalidate` call.
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// Tries per call before it counts as failed.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// Fetch the changed paths through the cache after invalidating them: the cache's
    /// `host:port` (`None`: no warming).
    #[serde(default)]
    pub warm_through: Option<SocketAddr>,
    /// Most warming fetches in flight.
    #[serde(default = "default_warm_concurrency")]
    pub warm_concurrency: usize,
}

fn default_batch() -> usize {
    100
}

fn default_attempts() -> u32 {
    3
}

fn default_warm_concurrency() -> usize {
    4
}

impl CacheConfig {
    /// Checks the settings; the error names the key.
    pub fn check(&self) -> Result<(), String> {
        let plain = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_';
        if self.plugin.is_empty() || self.plugin.len() > 64 || !self.plugin.bytes().all(plain) {
            return Err(format!("[[caches]] plugin `{}`: 1 to 64 of [a-z0-9_-]", self.plugin));
        }
        if !(1..=10_000).contains(&self.batch) {
            return Err(format!("[[caches]] batch = {}: 1 to 10000", self.batch));
        }
        if !(1..=10).contains(&self.attempts) {
            return Err(format!("[[caches]] attempts = {}: 1 to 10", self.attempts));
        }
        if !(1..=64).contains(&self.warm_concurrency) {
            return Err(format!(
                "[[caches]] warm_concurrency = {}: 1 to 64",
                self.warm_concurrency
            ));
        }
        Ok(())
    }
}

/// The GL's segment reported `notification`'s run: if it carries a cache order and some
/// server committed, tell the caches (in a task of its own) and report to the manager — also
/// with no cache configured (an empty report), since a rolling switch waits for it before
/// the group goes back into rotation.
pub fn after_report(shared: Arc<Shared>, notification: &Notification, report: &SegmentReport) {
    let Some(order) = notification.cache.clone() else { return };
    let caches: Vec<CacheConfig> = shared
        .cfg
        .caches
        .iter()
        .filter(|c| c.site.as_ref().is_none_or(|s| *s == order.site))
        .cloned()
        .collect();
    let run = notification.run;
    if report.succeeded.is_empty() {
        tracing::info!(run, "no server of the segment committed: the caches are left alone");
        return;
    }
    let (segment, leader) = (report.segment.clone(), report.leader.clone());
    tokio::spawn(async move {
        let mut outcomes = Vec::new();
        for cache in &caches {
            let outcome = call(&shared, cache, &order).await;
            if outcome.ok {
                tracing::info!(run, cache = %outcome.cache, "{}", outcome.summary);
            } else {
                tracing::warn!(run, cache = %outcome.cache, "{}", outcome.summary);
            }
            outcomes.push(outcome);
        }
        let report = CacheReport { segment, leader, caches: outcomes };
        let path = format!("/api/v1/runs/{run}/caches");
        let sent = shared.managers.post::<_, serde_json::Value>(&path, &report, CACHE_PATIENCE);
        if let Err(e) = sent.await {
            tracing::error!(run, "the manager never took the report of the cache calls: {e}");
        }
    });
}

/// Runs `f` on a blocking thread (plugin calls block) up to `attempts` times; the error of
/// the last try.
async fn with_attempts<F>(attempts: u32, f: F) -> Result<(), String>
where
    F: Fn() -> Result<(), PluginError> + Send + Sync + Clone + 'static,
{
    let mut last = String::new();
    for attempt in 1..=attempts {
        let call = f.clone();
        match tokio::task::spawn_blocking(call).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => last = e.to_string(),
            Err(e) => last = e.to_string(),
        }
        if attempt < attempts {
            tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
        }
    }
    Err(format!("failed after {attempts} attempts: {last}"))
}

/// One cache's calls for `order`, worded for the history.
async fn call(shared: &Shared, cache: &CacheConfig, order: &CacheOrder) -> CacheOutcome {
    let name = cache.plugin.clone();
    let fail =
        |summary: String| CacheOutcome { cache: name.clone(), ok: false, summary: clip(summary) };
    let plugin: CacheInvalidator = match shared.applier.cache_invalidator(&cache.plugin) {
        Ok(p) => p,
        Err(e) => return fail(format!("not usable: {e}")),
    };
    let host = cache.host.clone().unwrap_or_else(|| order.site.clone());
    match &order.change {
        CacheChange::Site { reason } => {
            let (p, h) = (plugin.clone(), host.clone());
            match with_attempts(cache.attempts, move || p.purge_site(&h)).await {
                Ok(()) => CacheOutcome {
                    cache: name.clone(),
                    ok: true,
                    summary: clip(format!("purged the whole site {host} ({reason})")),
                },
                Err(e) => fail(format!("purging the whole site {host}: {e}")),
            }
        }
        CacheChange::Paths { changed, removed } => {
            let all: Vec<String> = changed.iter().chain(removed).cloned().collect();
            let batches: Vec<Vec<String>> =
                all.chunks(cache.batch).map(<[String]>::to_vec).collect();
            let (mut done, mut error) = (0usize, None);
            for (i, batch) in batches.iter().enumerate() {
                let (p, h, b) = (plugin.clone(), host.clone(), Arc::new(batch.clone()));
                match with_attempts(cache.attempts, move || p.invalidate(&h, &b)).await {
                    Ok(()) => done += batch.len(),
                    Err(e) if error.is_none() => error = Some(format!("batch {} {e}", i + 1)),
                    Err(_) => {}
                }
            }
            let n = batches.len();
            let mut summary = match &error {
                None => format!(
                    "purged {done} paths of {host} in {n} batch{}",
                    if n == 1 { "" } else { "es" }
                ),
                Some(e) => format!("purged {done} of {} paths of {host}; {e}", all.len()),
            };
            if let Some(through) = cache.warm_through {
                let (ok, tried) = warm(through, &host, changed, cache.warm_concurrency).await;
                summary += &format!("; warmed {ok} of {tried} changed paths through {through}");
            }
            CacheOutcome { cache: name.clone(), ok: error.is_none(), summary: clip(summary) }
        }
    }
}

/// Fetches each of `paths` through the cache at `through` (`HEAD`, `Host: host`), at most
/// `concurrency` at a time; (answered with a success, tried).
async fn warm(
    through: SocketAddr,
    host: &str,
    paths: &[String],
    concurrency: usize,
) -> (usize, usize) {
    // No token: the cache is not ours to authenticate to.
    let client = JsonClient::new("", Duration::from_secs(10));
    let gate = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    for path in paths {
        let (client, gate) = (client.clone(), gate.clone());
        let (url, host) = (format!("http://{through}{path}"), host.to_string());
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await.ok()?;
            client.send(hyper::Method::HEAD, &url, None, &[("host", host)]).await.ok()
        });
    }
    let mut ok = 0;
    while let Some(r) = tasks.join_next().await {
        if matches!(r, Ok(Some(_))) {
            ok += 1;
        }
    }
    (ok, paths.len())
}

/// A summary cut to what the manager accepts.
fn clip(mut s: String) -> String {
    if s.len() > MAX_SUMMARY {
        let mut end = MAX_SUMMARY - 3;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_with_defaults_and_are_checked() {
        let c: CacheConfig = serde_json::from_str(r#"{"plugin": "varnish"}"#).unwrap();
        assert_eq!((c.batch, c.attempts, c.warm_concurrency, c.warm_through), (100, 3, 4, None));
        assert_eq!(c.check(), Ok(()));
        let bad = CacheConfig { batch: 0, ..c.clone() };
        assert!(bad.check().unwrap_err().contains("batch"));
        let bad = CacheConfig { plugin: "Bad Name".into(), ..c };
        assert!(bad.check().unwrap_err().contains("plugin"));
        assert!(serde_json::from_str::<CacheConfig>(r#"{"plugin": "v", "bogus": 1}"#).is_err());
        assert_eq!(clip("é".repeat(400)).len(), MAX_SUMMARY - 1);
    }
}

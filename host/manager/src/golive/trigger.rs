//! The driver of the hot rules (`rules.rs`): every `golive.hot_poll_ms` it asks each site's
//! load-balancer plugin for its request rates (`path-rates`, e.g. HAProxy `show table`), lets
//! the site's `HotTrigger` decide, and starts each decided path as an ordinary `hot` job
//! (the same one `POST /api/v1/jobs` creates), once the path passes the site's checks.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::{Balancer, content_path};
use crate::model::{JobKind, JobPolicy, JobSpec, JobState, OnFailure, Payload};
use crate::now_ms;
use crate::server::{Inner, ManagerError};

/// The busiest paths considered per poll (the balancer's table is the clients' doing).
const MAX_RATES: usize = 256;

impl Inner {
    /// Polls the balancers of the sites with hot rules whose poll is due.
    pub(super) fn hot_rules_tick(self: &Arc<Self>) -> Result<(), ManagerError> {
        let now = now_ms();
        for site in self.db.sites()? {
            let Some(g) = site.golive.clone() else { continue };
            let (Some(lb), Some(_)) = (g.load_balancer.clone(), g.hot_pool.as_ref()) else {
                continue;
            };
            if g.hot_rules.is_empty() || !self.golive.claim_poll(&site.name, now, g.hot_poll_ms) {
                continue;
            }
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me.hot_rules_pass(&site.name, &lb).await {
                    tracing::warn!(site = site.name, "hot rules: {e}");
                }
                me.golive.poll_done(&site.name);
            });
        }
        Ok(())
    }

    async fn hot_rules_pass(&self, name: &str, lb: &str) -> Result<(), ManagerError> {
        let data = self.cfg.data_dir.clone();
        let lb = lb.to_string();
        let rates = tokio::task::spawn_blocking(move || {
            Balancer::open(&data, &lb).and_then(|b| b.path_rates()).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| ManagerError::Invalid(format!("hot rules task: {e}")))?
        .map_err(ManagerError::Invalid)?;
        let now = now_ms();
        let Some(site) = self.db.site(name)? else { return Ok(()) };
        let Some(g) = site.golive.clone() else { return Ok(()) };
        let mut per_s: BTreeMap<String, f64> = BTreeMap::new();
        for r in rates.iter().take(MAX_RATES) {
            if let Some(path) = content_path(&r.path) {
                let rate = r.requests as f64 * 1_000.0 / r.period_ms.max(1) as f64;
                *per_s.entry(path).or_default() += rate;
            }
        }
        // Hot now: live as hot content, or named by a hot job of the site not yet ended.
        let mut hot: BTreeSet<String> = site.hot.values().flat_map(|h| h.paths.clone()).collect();
        for j in self.db.jobs()? {
            if j.spec.site == name
                && j.spec.kind == JobKind::Hot
                && matches!(j.state, JobState::Idle | JobState::Running { .. })
                && let Payload::Hot { paths, .. } = &j.spec.payload
            {
                hot.extend(paths.iter().cloned());
            }
        }
        let starts = self.golive.with_trigger(name, |t| t.observe(&g.hot_rules, now, &per_s, &hot));
        for s in starts {
            let over = now.saturating_sub(s.over_since_ms);
            let head = format!(
                "hot rule `{}` of site {name}: {} at {:.1} requests/s for {over} ms",
                s.rule, s.path, s.rate_per_s
            );
            if let Err(e) = crate::hot::check_paths(&site, std::slice::from_ref(&s.path)) {
                tracing::info!("{head}: not started: {e}");
                continue;
            }
            let spec = JobSpec {
                name: format!("hot-{}", s.rule),
                kind: JobKind::Hot,
                site: name.to_string(),
                payload: Payload::Hot {
                    paths: vec![s.path.clone()],
                    servers: vec![],
                    count: Some(s.servers),
                },
                start_at_ms: 0,
                every_ms: None,
                policy: JobPolicy { on_failure: OnFailure::Cancel, ..JobPolicy::default() },
            };
            let line = match crate::writes::create_job(&self.db, &self.cfg.data_dir, spec, now) {
                Ok(j) => format!("{head}: started hot job {} to {} servers", j.id, s.servers),
                Err(e) => format!("{head}: hot job refused: {e}"),
            };
            self.db.write(|t| t.log(now, None, None, line.clone()))?;
            self.wake.notify_one();
        }
        Ok(())
    }
}

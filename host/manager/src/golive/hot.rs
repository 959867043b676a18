//! The balancer is told who holds hot content: after a run that changes it (a hot job, or a
//! commit, rollback, switch or remove that ends an overlay), the site's `hot_pool` is made to
//! hold exactly the servers with a hot release live — each added at its configured address
//! (`golive.servers`), or put back in rotation if it is there drained — and no other server of
//! the site. Then the balancer is told which URL paths are hot (`route-paths`: an HAProxy map
//! that a `use_backend <hot_pool> if { path,map(..) -m found }` rule reads), so exactly those
//! paths go to the pool and only there. Order keeps every request answerable: holders join
//! first, the routes change next, servers leave last (an overlay that ended is unrouted before
//! its servers leave). Only the manager's signed assignments ever put content on a server; the
//! balancer learns where it already is.

use std::collections::BTreeMap;
use std::sync::Arc;

use cm_plugin_host::ServerState;

use super::Balancer;
use crate::model::HostedSite;
use crate::now_ms;
use crate::server::{Inner, ManagerError};

/// What the hot pool must change: per server, add (with its address), undrain, or remove.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HotStep {
    Add(String),
    Undrain,
    Remove,
}

/// The URL paths hot content is served at (each hot file's, and its directory's for an
/// `index.html`), sorted.
pub fn hot_routes(site: &HostedSite) -> Vec<String> {
    let mut out = Vec::new();
    for h in site.hot.values() {
        for p in &h.paths {
            crate::live_change::urls(p, &mut out);
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The steps that bring the pool from `states` (per server of the site's go-live settings,
/// as the balancer reports them) to exactly the holders of hot content.
pub fn hot_steps(
    site: &HostedSite,
    addresses: &BTreeMap<String, String>,
    states: &BTreeMap<String, ServerState>,
) -> Vec<(String, HotStep)> {
    let mut steps = Vec::new();
    for (server, address) in addresses {
        let holds = site.hot.contains_key(server);
        match (holds, states.get(server).copied().unwrap_or(ServerState::Absent)) {
            (true, ServerState::Absent) => {
                steps.push((server.clone(), HotStep::Add(address.clone())))
            }
            (true, ServerState::Drain | ServerState::Maint) => {
                steps.push((server.clone(), HotStep::Undrain))
            }
            (false, ServerState::Ready | ServerState::Drain | ServerState::Maint) => {
                steps.push((server.clone(), HotStep::Remove))
            }
            _ => {}
        }
    }
    steps
}

impl Inner {
    /// Tells the balancer of `site` (if it has a hot pool) who holds hot content now, off the
    /// scheduler's thread; the outcome goes to the history.
    pub(crate) fn tell_balancer_hot(self: &Arc<Self>, site: String) {
        let me = self.clone();
        tokio::spawn(async move {
            if let Err(e) = me.hot_pool_pass(&site).await {
                let line = format!("hot content of site {site}: balancer not told: {e}");
                tracing::warn!("{line}");
                let _ = me.db.write(|t| t.log(now_ms(), None, None, line.clone()));
            }
        });
    }

    async fn hot_pool_pass(&self, name: &str) -> Result<(), ManagerError> {
        let Some(site) = self.db.site(name)? else { return Ok(()) };
        let Some(g) = site.golive.clone() else { return Ok(()) };
        let (Some(lb), Some(pool)) = (g.load_balancer.clone(), g.hot_pool.clone()) else {
            return Ok(());
        };
        let data = self.cfg.data_dir.clone();
        let record = site.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let b = Balancer::open(&data, &lb).map_err(|e| e.to_string())?;
            let mut states = BTreeMap::new();
            for s in g.servers.keys() {
                let st = b.state(&format!("{pool}/{s}")).map_err(|e| e.to_string())?;
                states.insert(s.clone(), st);
            }
            let steps = hot_steps(&record, &g.servers, &states);
            let (leave, join): (Vec<_>, Vec<_>) =
                steps.into_iter().partition(|(_, st)| *st == HotStep::Remove);
            let mut done = Vec::new();
            let mut step = |s: String, step: HotStep| {
                let n = format!("{pool}/{s}");
                let r = match &step {
                    HotStep::Add(address) => b.add(&n, address),
                    HotStep::Undrain => b.undrain(&n),
                    HotStep::Remove => b.remove(&n),
                };
                done.push((s, step, r.map_err(|e| e.to_string())));
            };
            for (s, st) in join {
                step(s, st);
            }
            let routes = hot_routes(&record);
            let routed = b.route_paths(&pool, &routes).map(|()| routes).map_err(|e| e.to_string());
            for (s, st) in leave {
                step(s, st);
            }
            Ok::<_, String>((pool, done, routed))
        })
        .await
        .map_err(|e| ManagerError::Invalid(format!("hot pool task: {e}")))?
        .map_err(ManagerError::Invalid)?;
        let (pool, done, routed) = outcome;
        let holders: Vec<String> = site.hot.keys().cloned().collect();
        let mut line = format!(
            "hot content of site {name}: balancer pool {pool} routes to {}",
            if holders.is_empty() { "no server".to_string() } else { holders.join(", ") }
        );
        for (s, step, r) in &done {
            let what = match step {
                HotStep::Add(_) => "added",
                HotStep::Undrain => "put back",
                HotStep::Remove => "removed",
            };
            match r {
                Ok(()) => line.push_str(&format!("; {s} {what}")),
                Err(e) => line.push_str(&format!("; {s} not {what}: {e}")),
            }
        }
        match routed {
            Ok(r) if r.is_empty() => line.push_str("; no path routed to it"),
            Ok(r) => line.push_str(&format!("; paths routed to it: {}", r.join(" "))),
            Err(e) => line.push_str(&format!("; paths not routed: {e}")),
        }
        self.db.write(|t| t.log(now_ms(), None, None, line.clone()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_holds_exactly_the_holders() {
        let site: HostedSite = serde_json::from_value(serde_json::json!({
            "name": "www", "content_group": "g", "staging": "/s", "committed": [3],
            "hot": {"a": {"release": 4, "base": 3, "paths": ["x"], "run": 1},
                    "b": {"release": 4, "base": 3, "paths": ["x"], "run": 1}}
        }))
        .unwrap();
        let addresses: BTreeMap<String, String> =
            ["a", "b", "c", "d"].map(|s| (s.to_string(), format!("{s}:80"))).into();
        let states: BTreeMap<String, ServerState> =
            [("b", ServerState::Maint), ("c", ServerState::Ready), ("d", ServerState::Absent)]
                .map(|(s, st)| (s.to_string(), st))
                .into();
        assert_eq!(hot_routes(&site), vec!["/x".to_string()]);
        assert_eq!(
            hot_steps(&site, &addresses, &states),
            vec![
                ("a".to_string(), HotStep::Add("a:80".into())),
                ("b".to_string(), HotStep::Undrain),
                ("c".to_string(), HotStep::Remove),
            ]
        );
    }
}

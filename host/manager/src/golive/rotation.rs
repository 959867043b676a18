//! Rotation follows health (issue 17 §3): for a site with a load balancer, a server that is
//! behind the site's live release (its apply or commit failed, or it is new), or that stopped
//! reporting, is drained; once it holds the live release and reports again it is undrained.
//! Each change is one history line (and so an event); a server changes at most once per the
//! site's `rotation_interval_ms`, so a server hovering at the edge does not flap. Sites with
//! a roll or a run in progress are left to them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::balancer::Balancer;
use crate::model::HostedSite;
use crate::now_ms;
use crate::server::{Inner, ManagerError};

/// A server rotation (or a roll) took out of the balancer, or put back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rotated {
    /// Out of rotation now.
    pub drained: bool,
    pub changed_ms: u64,
    pub reason: String,
}

/// Rotation's passes: at most one a second, one at a time.
#[derive(Default)]
pub(super) struct Pass {
    last: Option<Instant>,
    running: bool,
}

/// Records servers a roll left drained (failed health checks), so rotation keeps them out
/// until they caught up.
pub(super) fn left_drained(site: &mut HostedSite, failed: &BTreeMap<String, String>, now: u64) {
    for (s, why) in failed {
        site.rotation
            .insert(s.clone(), Rotated { drained: true, changed_ms: now, reason: why.clone() });
    }
}

/// Why `server` should be out of rotation, if it should.
fn out_because(site: &HostedSite, server: &str, live: &BTreeMap<String, String>) -> Option<String> {
    let release = site.live()?;
    if !live.contains_key(server) {
        return Some("stopped reporting".into());
    }
    match site.holders.get(server) {
        Some(h) if *h == release => None,
        Some(h) => Some(format!("holds release {h}, live is {release}")),
        None => Some(format!("does not hold live release {release}")),
    }
}

impl Inner {
    /// Starts a rotation pass when one is due and none is running.
    pub(super) fn rotation_tick(self: &Arc<Self>) -> Result<(), ManagerError> {
        for site in self.golive.take_hot_due() {
            self.tell_balancer_hot(site);
        }
        {
            let mut pass = self.golive.rotation.lock().unwrap_or_else(|p| p.into_inner());
            if pass.running || pass.last.is_some_and(|l| l.elapsed() < Duration::from_secs(1)) {
                return Ok(());
            }
            (pass.running, pass.last) = (true, Some(Instant::now()));
        }
        let me = self.clone();
        tokio::spawn(async move {
            if let Err(e) = me.rotation_pass().await {
                tracing::warn!("rotation: {e}");
            }
            me.golive.rotation.lock().unwrap_or_else(|p| p.into_inner()).running = false;
        });
        Ok(())
    }

    async fn rotation_pass(self: &Arc<Self>) -> Result<(), ManagerError> {
        let now = now_ms();
        let jobs = self.db.jobs()?;
        let live = self.live_servers(now)?;
        for site in self.db.sites()? {
            let Some(g) = site.golive.clone() else { continue };
            let Some(lb) = g.load_balancer.clone() else { continue };
            let busy = jobs.iter().any(|j| {
                j.spec.site == site.name
                    && (j.roll.as_ref().is_some_and(|r| !r.ended())
                        || matches!(j.state, crate::model::JobState::Running { .. }))
            });
            if !g.rotation || busy {
                continue;
            }
            let mut changes = Vec::new();
            for server in g.servers.keys() {
                let now_out = site.rotation.get(server).is_some_and(|r| r.drained);
                let recent = site
                    .rotation
                    .get(server)
                    .is_some_and(|r| now < r.changed_ms + g.rotation_interval_ms);
                match out_because(&site, server, &live) {
                    Some(why) if !now_out && !recent => changes.push((server.clone(), true, why)),
                    None if now_out && !recent => {
                        changes.push((server.clone(), false, "caught up".to_string()))
                    }
                    _ => {}
                }
            }
            if changes.is_empty() {
                continue;
            }
            let (data, pool, todo) = (self.cfg.data_dir.clone(), g.pool.clone(), changes.clone());
            let results = tokio::task::spawn_blocking(move || {
                let b = Balancer::open(&data, &lb).map_err(|e| e.to_string())?;
                Ok::<_, String>(
                    todo.iter()
                        .map(|(s, drain, _)| {
                            let name = format!("{pool}/{s}");
                            let r = if *drain { b.drain(&name) } else { b.undrain(&name) };
                            r.map_err(|e| e.to_string())
                        })
                        .collect::<Vec<_>>(),
                )
            })
            .await
            .map_err(|e| ManagerError::Invalid(format!("rotation task: {e}")))?
            .map_err(ManagerError::Invalid)?;
            self.db.write(|t| {
                let Some(mut s) = self.db.site(&site.name)? else {
                    return Ok::<_, ManagerError>(());
                };
                for ((server, drain, why), result) in changes.iter().zip(&results) {
                    let verb = if *drain { "drained" } else { "undrained" };
                    match result {
                        Ok(()) => {
                            s.rotation.insert(
                                server.clone(),
                                Rotated { drained: *drain, changed_ms: now, reason: why.clone() },
                            );
                            t.log(
                                now,
                                None,
                                None,
                                format!("rotation: {server} of site {} {verb}: {why}", site.name),
                            )?;
                        }
                        Err(e) => t.log(
                            now,
                            None,
                            None,
                            format!("rotation: {server} of site {} not {verb}: {e}", site.name),
                        )?,
                    }
                }
                t.put_site(&s).map_err(ManagerError::from)
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behind_or_silent_servers_are_out() {
        let mut site: HostedSite = serde_json::from_value(serde_json::json!({
            "name": "www", "content_group": "g", "staging": "/s", "committed": [3, 5],
            "holders": {"a": 5, "b": 3}
        }))
        .unwrap();
        let live: BTreeMap<String, String> =
            [("a", "seg"), ("b", "seg")].map(|(s, g)| (s.to_string(), g.to_string())).into();
        assert_eq!(out_because(&site, "a", &live), None);
        assert!(out_because(&site, "b", &live).unwrap().contains("holds release 3"));
        assert!(out_because(&site, "c", &live).unwrap().contains("stopped reporting"));
        site.committed.clear();
        assert_eq!(out_because(&site, "b", &live), None, "nothing live yet: nothing to follow");
    }
}

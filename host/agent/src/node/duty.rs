//! Group-leader duties, started when this server wins its segment's election and stopped when
//! it loses it: the tree endpoint (cm-tree's [`LeaderNode`]), discovery reports to the
//! manager (at once, on every join or leave, and periodically), and the segment's side of each
//! run ([`SegmentDelivery`]): apply it here, deliver it by MCTP to the members, wait (bounded)
//! for their apply reports, and consolidate.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cm_mctp::SenderConfig;
use cm_tree::BoxFuture;
use cm_tree::leader::{
    DeliveryOutcome, LeaderConfig, LeaderError, LeaderNode, LinkWatch, LocalDelivery,
};
use cm_tree::manifest::Manifest;
use cm_tree::member_state::{MemberStates, PluginIdentity};
use cm_tree::message::{DiscoveryReport, MemberApplyReport};
use cm_tree::space::FsSpace;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{Shared, apply_report};
use crate::leader::{MctpDelivery, SegmentMembers};

/// The running duties of a GL.
pub struct GlDuty {
    node: LeaderNode,
    discovery: JoinHandle<()>,
}

impl GlDuty {
    pub async fn start(shared: Arc<Shared>) -> Result<GlDuty, LeaderError> {
        let c = &shared.cfg;
        let mut lc =
            LeaderConfig::new(&c.segment, &c.name, &c.agent_token, &c.state_dir.join("gl"));
        lc.listen = c.leader_listen;
        lc.tls = c.tls.clone();
        lc.manager_keys = c.manager_keys.clone();
        lc.managers = Some(shared.managers.clone());
        let delivery = Arc::new(SegmentDelivery {
            shared: shared.clone(),
            settled: Instant::now() + c.registration_settle,
        });
        let node = LeaderNode::start(lc, delivery).await?;
        let addr = advertised(node.addr, &shared);
        tracing::info!(segment = %c.segment, %addr, "group leader: tree endpoint up");
        let discovery =
            tokio::spawn(discovery_loop(shared.clone(), addr, node.links(), node.member_states()));
        Ok(GlDuty { node, discovery })
    }

    /// `host:port` members and the manager reach this GL at.
    pub fn address(&self, shared: &Shared) -> SocketAddr {
        advertised(self.node.addr, shared)
    }

    pub fn stop(self) {
        self.node.stop();
        self.discovery.abort();
    }
}

/// A wildcard listen address is advertised as the node's own interface address.
fn advertised(bound: SocketAddr, shared: &Shared) -> SocketAddr {
    if bound.ip().is_unspecified() {
        SocketAddr::new(shared.cfg.data.interface.into(), bound.port())
    } else {
        bound
    }
}

/// The segment as this GL sees it now: server name → election node id (= MCTP member id),
/// this GL included.
fn segment_now(shared: &Shared) -> BTreeMap<String, u64> {
    let st = shared.status.borrow();
    let mut m: BTreeMap<String, u64> =
        st.members.iter().map(|m| (m.registration.name.clone(), m.node)).collect();
    m.insert(shared.cfg.name.clone(), st.node);
    m
}

fn discovery_report(
    shared: &Shared,
    addr: SocketAddr,
    links: &LinkWatch,
    states: &MemberStates,
) -> DiscoveryReport {
    let c = &shared.cfg;
    let measured = crate::election::measure_priority_inputs(&c.state_dir);
    let members: Vec<String> = segment_now(shared).into_keys().collect();
    // Only registered members' plugins and spaces are relayed (the rest are forgotten).
    let plugins = states.plugins_of(&members);
    let spaces = states.spaces_of(&members);
    DiscoveryReport {
        segment: c.segment.clone(),
        leader: c.name.clone(),
        address: addr.to_string(),
        location: c.location.clone(),
        // Cores × MHz in GHz·cores, at least 1 so an unmeasured CPU still sorts.
        cpu_power: (measured.cpu_cores.saturating_mul(measured.cpu_mhz) / 1000).max(1),
        free_disk: measured.free_disk_mib.saturating_mul(1 << 20),
        // The members this GL serves: the connections its delivery fans out to.
        connections: u32::try_from(members.len().saturating_sub(1)).unwrap_or(u32::MAX),
        members,
        // Measured from this GL's own transfers (the manager shapes the tree with them).
        links: links.rates(),
        plugins,
        spaces,
    }
}

/// How long one discovery report follows the manager's replicas before the loop says so.
const DISCOVERY_PATIENCE: Duration = Duration::from_secs(10);

/// Reports the segment to the manager now, again on every join or leave or change of a
/// member's plugin or space, and every `discovery_interval` (which also carries the link rates measured
/// meanwhile); a failed report is retried.
async fn discovery_loop(
    shared: Arc<Shared>,
    addr: SocketAddr,
    links: LinkWatch,
    states: Arc<MemberStates>,
) {
    if shared.managers.is_empty() {
        tracing::warn!("no manager URL configured: this GL reports its segment to no one");
        return;
    }
    let mut status = shared.status.clone();
    type Sent = (Vec<String>, BTreeMap<String, PluginIdentity>, BTreeMap<String, FsSpace>);
    let mut last: Option<Sent> = None;
    let mut next_periodic = Instant::now();
    let mut failures = 0u32;
    loop {
        let report = discovery_report(&shared, addr, &links, &states);
        // Members send a new space only when it moved by 1 %, so a change here is worth a report.
        let due = last.as_ref().is_none_or(|(m, p, s)| {
            *m != report.members || *p != report.plugins || *s != report.spaces
        }) || Instant::now() >= next_periodic;
        if due {
            // The follower moves among the replicas; this loop only paces and logs.
            let sent = shared.managers.post::<_, serde_json::Value>(
                "/api/v1/discovery",
                &report,
                DISCOVERY_PATIENCE,
            );
            match sent.await {
                Ok(_) => {
                    tracing::info!(segment = %report.segment, members = report.members.len(), "discovery report sent");
                    last = Some((report.members, report.plugins, report.spaces));
                    next_periodic = Instant::now() + shared.cfg.discovery_interval;
                    failures = 0;
                }
                Err(e) => {
                    failures += 1;
                    // Said once, then every 50th retry (~100 s at the longest backoff).
                    if failures == 1 || failures.is_multiple_of(10) {
                        let managers = shared.managers.urls().join(", ");
                        tracing::warn!(
                            "{}; retrying (attempt {failures})",
                            report_failure(&managers, &report.segment, &e)
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(failures.min(20))))
                        .await;
                    continue;
                }
            }
        }
        tokio::select! {
            r = status.changed() => if r.is_err() { return },
            // Members report their plugins at about the same moments: one report for a burst.
            _ = states.changed() => tokio::time::sleep(Duration::from_millis(200)).await,
            _ = tokio::time::sleep_until(next_periodic) => {}
        }
    }
}

/// Why a discovery report did not get through, in words an operator can act on.
fn report_failure(manager: &str, segment: &str, e: &cm_tree::http::ClientError) -> String {
    use cm_tree::http::ClientError;
    match e {
        ClientError::Transport { source, .. } => {
            let mut cause: &dyn std::error::Error = source;
            while let Some(inner) = cause.source() {
                cause = inner;
            }
            format!(
                "cannot reach the manager at {manager} to report segment {segment}: {cause} \
                 (is the manager running, and is `[manager] url` or --manager right?)"
            )
        }
        ClientError::Timeout { after, .. } => format!(
            "the manager at {manager} did not answer segment {segment}'s report within {after:?}"
        ),
        ClientError::Status { status, body, .. } => format!(
            "the manager at {manager} refused segment {segment}'s report ({status}): {body}"
        ),
        other => format!("reporting segment {segment} to the manager at {manager}: {other}"),
    }
}

/// The GL's [`LocalDelivery`]: apply here, MCTP to the members, collect apply reports.
pub struct SegmentDelivery {
    shared: Arc<Shared>,
    /// Before this, members may still be registering with this new GL.
    settled: Instant,
}

impl LocalDelivery for SegmentDelivery {
    fn deliver(
        &self,
        run: u64,
        assignment: PathBuf,
        manifest: Manifest,
    ) -> BoxFuture<'static, DeliveryOutcome> {
        self.deliver_to(run, assignment, manifest, Vec::new())
    }

    fn deliver_to(
        &self,
        run: u64,
        assignment: PathBuf,
        manifest: Manifest,
        servers: Vec<String>,
    ) -> BoxFuture<'static, DeliveryOutcome> {
        let (shared, settled) = (self.shared.clone(), self.settled);
        Box::pin(async move {
            // A GL elected mid-job is re-notified at once; its members re-register within a
            // heartbeat or so. Delivering before they did would leave them out of the run.
            if Instant::now() < settled {
                tracing::info!(
                    run,
                    "new group leader: letting the members register before delivering"
                );
                tokio::time::sleep_until(settled).await;
            }
            deliver(shared, run, assignment, manifest, servers).await
        })
    }

    fn member_report(&self, report: MemberApplyReport) -> bool {
        tracing::debug!(run = report.run, server = %report.server, ok = report.error.is_none(), "apply report");
        self.shared.board.insert(report);
        true
    }

    /// The manager aborted the run (cm-tree checked the order's signature): this GL's own
    /// prepared release goes; members learn it from this GL's answers.
    fn abort(&self, order: &cm_tree::abort::AbortOrder) {
        super::abort::discard(&self.shared, order);
    }

    /// The segment reported a run: a commit's cache order goes to the segment's caches.
    fn reported(
        &self,
        notification: &cm_tree::message::Notification,
        report: &cm_tree::message::SegmentReport,
    ) {
        crate::caches::after_report(self.shared.clone(), notification, report);
    }
}

/// Delivers `run` to the servers of the segment it targets (`servers`; empty: all of them):
/// the others are left out of the MCTP session, whose announcement names the targets, so they
/// ignore it (and would skip it anyway: they ask, see `member.rs`).
async fn deliver(
    shared: Arc<Shared>,
    run: u64,
    assignment: PathBuf,
    manifest: Manifest,
    servers: Vec<String>,
) -> DeliveryOutcome {
    let mut segment = segment_now(&shared);
    // Nothing the manager did not sign is relayed: check it before any MCTP session.
    let checked = {
        let (applier, file) = (shared.applier.clone(), assignment.clone());
        tokio::task::spawn_blocking(move || applier.check(&file).map_err(|e| e.to_string())).await
    };
    if let Err(why) = checked.unwrap_or_else(|e| Err(e.to_string())) {
        tracing::warn!(run, "refusing to relay the run: {why}");
        let mut out = DeliveryOutcome::default();
        for name in segment.keys().filter(|n| servers.is_empty() || servers.contains(n)) {
            out.failed.push((name.clone(), format!("refused by the group leader: {why}")));
        }
        return out;
    }
    let mut not_for = Vec::new();
    if !servers.is_empty() {
        segment.retain(|name, id| {
            let targeted = servers.contains(name);
            if !targeted {
                not_for.push(*id);
            }
            targeted
        });
    }
    let me = shared.cfg.name.clone();
    // This GL is a server of the segment too: it applies from the copy the tree brought.
    let own = segment.contains_key(&me).then(|| {
        let (shared, file) = (shared.clone(), assignment.clone());
        tokio::spawn(async move {
            let report = apply_report(&shared, run, file).await;
            shared.board.insert(report);
        })
    });
    let members: BTreeMap<String, u64> =
        segment.iter().filter(|(n, _)| **n != me).map(|(n, id)| (n.clone(), *id)).collect();
    // One session at a time on the data channel, until the members that received it have
    // reported (so none is still lingering in this session when the next one is announced).
    let channel = if members.is_empty() { None } else { Some(shared.data_channel.lock().await) };
    let mctp = if members.is_empty() {
        DeliveryOutcome::default()
    } else {
        let d = &shared.cfg.data;
        let mut config = SenderConfig::new(d.channel, d.report_port);
        config.frame_size = d.frame_size;
        // Members accept only fresh sessions of the GL they follow: this node, this run of
        // it (the election's incarnation), the next session of the process.
        let (node, incarnation) = {
            let st = shared.status.borrow();
            (st.node, st.incarnation)
        };
        config.origin = crate::mctp::next_origin(node, Some(incarnation));
        // The registered members the run is not for (a replicate to some servers): the
        // announcement names them, so they neither receive it nor report on it. Anyone else
        // may join, a target that registers while the run is under way included.
        config.not_for = not_for;
        if let Some(r) = d.max_rate {
            config.max_rate = r;
            config.initial_rate = config.initial_rate.min(r);
        }
        let delivery = MctpDelivery {
            config,
            interface: d.interface,
            ttl: d.ttl,
            secret: shared.cfg.secret.clone(),
            segment: SegmentMembers { members: members.clone() },
        };
        delivery.deliver(run, assignment, manifest).await
    };
    let applies_here = own.is_some();
    if let Some(own) = own {
        let _ = own.await;
    }
    // Wait for the apply report of everyone MCTP says holds the assignment (and this GL's);
    // members MCTP never heard from are not waited for, but a report from one still counts
    // (it applied the run before, from an earlier GL).
    let mut wanted: BTreeSet<String> = mctp.succeeded.iter().cloned().collect();
    if applies_here {
        wanted.insert(me);
    }
    let deadline = Instant::now() + shared.cfg.report_wait;
    let mut reports = shared.board.wait_for(run, &wanted, deadline).await;
    drop(channel);
    reports.retain(|name, _| servers.is_empty() || servers.contains(name));
    let out = consolidate(&segment, &mctp, &reports, shared.cfg.report_wait);
    tracing::info!(
        run,
        succeeded = out.succeeded.len(),
        failed = out.failed.len(),
        missing = out.missing.len(),
        "segment report"
    );
    out
}

/// One consolidated report from the segment, the MCTP outcome and the apply reports:
/// succeeded = applied; failed = apply error, MCTP incomplete, or received but no apply report
/// in time (each with its reason); missing = never heard from.
pub fn consolidate(
    segment: &BTreeMap<String, u64>,
    mctp: &DeliveryOutcome,
    reports: &BTreeMap<String, MemberApplyReport>,
    waited: Duration,
) -> DeliveryOutcome {
    let mut out = DeliveryOutcome::default();
    let names: BTreeSet<&String> = segment.keys().chain(reports.keys()).collect();
    for name in names {
        if let Some(r) = reports.get(name) {
            match &r.error {
                None => out.succeeded.push(name.clone()),
                Some(e) => out.failed.push((name.clone(), format!("apply failed: {e}"))),
            }
        } else if let Some((_, why)) = mctp.failed.iter().find(|(n, _)| n == name) {
            out.failed.push((name.clone(), why.clone()));
        } else if mctp.succeeded.contains(name) {
            out.failed.push((
                name.clone(),
                format!("received the assignment but sent no apply report within {waited:?}"),
            ));
        } else {
            out.missing.push(name.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rep(server: &str, error: Option<&str>) -> MemberApplyReport {
        MemberApplyReport {
            server: server.into(),
            node: 0,
            run: 1,
            error: error.map(str::to_string),
            live: Some(1),
            summary: String::new(),
            site: "www".into(),
        }
    }

    #[test]
    fn consolidation_names_every_server_once_with_a_reason() {
        let segment: BTreeMap<String, u64> =
            [("gl", 1), ("a", 2), ("b", 3), ("c", 4), ("d", 5), ("e", 6)]
                .map(|(n, i)| (n.to_string(), i))
                .into();
        let mctp = DeliveryOutcome {
            succeeded: vec!["a".into(), "b".into(), "c".into()],
            failed: vec![("d".into(), "MCTP incomplete: 3 frames missing".into())],
            missing: vec!["e".into()],
        };
        let reports: BTreeMap<String, MemberApplyReport> = [
            rep("gl", None),
            rep("a", None),
            rep("b", Some("base mismatch")),
            rep("e", None),
            rep("late", None),
        ]
        .into_iter()
        .map(|r| (r.server.clone(), r))
        .collect();
        let out = consolidate(&segment, &mctp, &reports, Duration::from_secs(3));
        assert_eq!(out.succeeded, ["a", "e", "gl", "late"]);
        assert_eq!(out.failed.len(), 3);
        assert!(out.failed.contains(&("b".into(), "apply failed: base mismatch".into())));
        assert!(out.failed.iter().any(|(n, r)| n == "c" && r.contains("no apply report")));
        assert!(out.failed.contains(&("d".into(), "MCTP incomplete: 3 frames missing".into())));
        assert!(out.missing.is_empty());
        let none =
            consolidate(&segment, &DeliveryOutcome::default(), &BTreeMap::new(), Duration::ZERO);
        assert_eq!(none.missing.len(), 6);
    }
}

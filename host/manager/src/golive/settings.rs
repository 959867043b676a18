//! What an operator configures for go-live (site settings `golive`, job policy `go_live`) and
//! what the manager records of a rolling commit in progress (`Job::roll`).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::model::Payload;

/// How a release goes live on a site's servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "policy", deny_unknown_fields)]
pub enum GoLivePolicy {
    /// Every server switches at once (one commit run): the default.
    #[default]
    AllAtOnce,
    /// Groups of `group` servers, one after the other: drain, commit, health check, undrain.
    Rolling {
        group: GroupSize,
        #[serde(default)]
        on_health_failure: OnHealthFailure,
    },
    /// The first group alone, then `pause`, then the rest in groups of the same size.
    Canary {
        group: GroupSize,
        pause: Pause,
        #[serde(default)]
        on_health_failure: OnHealthFailure,
    },
}

impl GoLivePolicy {
    pub fn name(&self) -> &'static str {
        match self {
            GoLivePolicy::AllAtOnce => "all-at-once",
            GoLivePolicy::Rolling { .. } => "rolling",
            GoLivePolicy::Canary { .. } => "canary",
        }
    }

    pub fn on_health_failure(&self) -> OnHealthFailure {
        match self {
            GoLivePolicy::AllAtOnce => OnHealthFailure::Stop,
            GoLivePolicy::Rolling { on_health_failure, .. }
            | GoLivePolicy::Canary { on_health_failure, .. } => *on_health_failure,
        }
    }
}

/// The size of a group: `{"servers": K}` or `{"percent": P}` of the servers (rounded up, at
/// least one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupSize {
    Servers(u32),
    Percent(u8),
}

impl GroupSize {
    /// Servers per group out of `total`.
    pub fn of(self, total: usize) -> usize {
        let n = match self {
            GroupSize::Servers(k) => k as usize,
            GroupSize::Percent(p) => (total * usize::from(p.min(100))).div_ceil(100),
        };
        n.clamp(1, total.max(1))
    }
}

/// A canary's pause after its first group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "until", deny_unknown_fields)]
pub enum Pause {
    /// Go on by itself after `ms`.
    Timer { ms: u64 },
    /// Go on when an operator approves (`POST /api/v1/jobs/{id}/approve`, `cmover job approve`).
    Approval,
}

/// What a failed health check does to the rest of a roll.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnHealthFailure {
    /// No further group goes live; the job ends cancelled, naming the failed servers.
    #[default]
    Stop,
    /// The failed servers stay drained on their old release; the other groups go on.
    Continue,
}

/// A site's go-live settings (`PUT /api/v1/sites/{name}` field `golive`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GoLive {
    /// The site's default policy (a job's `policy.go_live` overrides it).
    #[serde(default)]
    pub policy: GoLivePolicy,
    /// The load-balancer plugin, by name, in the manager's plugin store (`<data>/plugins`,
    /// installed with `cmover plugin install --store`): its manifest holds the endpoint grants.
    /// `None`: groups are not drained (health checks still run).
    #[serde(default)]
    pub load_balancer: Option<String>,
    /// The balancer's pool (an HAProxy backend): server `s` is `"<pool>/s"` to the plugin.
    #[serde(default)]
    pub pool: String,
    /// The pool that serves hot content (an HAProxy backend the balancer's own rules send hot
    /// paths to): after each change of who holds hot content, exactly the holders are in it
    /// (added at their address, removed when their overlay ends; `golive/hot.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hot_pool: Option<String>,
    /// Each server's HTTP address (`host:port`) for the balancer and the health checks. The
    /// operator's word, never a server's: a server cannot point its health check elsewhere.
    #[serde(default)]
    pub servers: BTreeMap<String, String>,
    #[serde(default)]
    pub health: HealthCheck,
    /// After the balancer reports a group draining, the longest its open sessions get to end
    /// before it switches: the drain polls the balancer's `sessions` and goes on as soon as
    /// none is left (a balancer that cannot count them gets the whole grace).
    #[serde(default = "default_drain_grace_ms")]
    pub drain_grace_ms: u64,
    /// How long the balancer may take to report a drained server as draining.
    #[serde(default = "default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
    /// Rotation follows health (servers behind, failed or silent drained; undrained once they
    /// caught up): on unless `false`.
    #[serde(default = "default_true")]
    pub rotation: bool,
    /// A server's rotation changes at most once per this many ms (no flapping).
    #[serde(default = "default_rotation_interval_ms")]
    pub rotation_interval_ms: u64,
    /// After a group switched, how long its undrain waits for the GLs' reports that the
    /// caches in front of it were invalidated (a cache never serves the group's old release
    /// once it is back in rotation).
    #[serde(default = "default_cache_wait_ms")]
    pub cache_wait_ms: u64,
    /// Rules that start hot content from the balancer's request rates (`rules.rs`); they
    /// need `load_balancer` and `hot_pool`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hot_rules: Vec<super::HotRule>,
    /// How often the balancer's rates are read for the rules.
    #[serde(default = "default_hot_poll_ms")]
    pub hot_poll_ms: u64,
}

fn default_hot_poll_ms() -> u64 {
    1_000
}

fn default_drain_grace_ms() -> u64 {
    2_000
}
fn default_drain_timeout_ms() -> u64 {
    30_000
}
fn default_true() -> bool {
    true
}
fn default_rotation_interval_ms() -> u64 {
    10_000
}
fn default_cache_wait_ms() -> u64 {
    30_000
}
fn default_health_timeout_ms() -> u64 {
    5_000
}

/// The health check after a group switched: each path fetched from each server's address
/// must answer 200 with exactly the bytes of that file in the new release (BLAKE3 against the
/// manager's snapshot of it). No paths: no check.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// URL paths, each also a file of the release (`/release.txt` is `release.txt`).
    #[serde(default)]
    pub paths: Vec<String>,
    /// The `Host` header sent (default: the server's address).
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default = "default_health_timeout_ms")]
    pub timeout_ms: u64,
}

/// A rolling (or canary) switch in progress or ended, kept in the job record so it survives a
/// manager restart: every step is written before it is acted on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Roll {
    pub policy: GoLivePolicy,
    /// What each group's run carries (a commit of `release`, a rollback, a switch).
    pub payload: Payload,
    /// The release the servers switch to (what the health check compares against).
    pub release: u64,
    /// The release live before: where a group that fails its health check goes back to.
    pub previous: Option<u64>,
    pub groups: Vec<Vec<String>>,
    /// The group being switched (== `groups.len()` once every group is done).
    pub current: usize,
    pub step: RollStep,
    /// An operator approved the canary's pause.
    #[serde(default)]
    pub approved: bool,
    /// Servers switched and healthy.
    #[serde(default)]
    pub live: Vec<String>,
    /// Servers left drained on their old release, and why.
    #[serde(default)]
    pub failed: BTreeMap<String, String>,
    /// Who aborted the roll: the servers switched go back to `previous`, every other server
    /// returns to rotation, and the roll ends.
    #[serde(default)]
    pub aborted: Option<String>,
    /// The current group's switch run changed what is live: its segments' GLs still to report
    /// their cache calls before the group goes back into rotation.
    #[serde(default)]
    pub caches: Option<CacheWait>,
}

/// A group's undrain waiting for the cache reports of its switch run (`cache_report.rs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheWait {
    pub run: u64,
    /// When the run ended: the wait is bounded by `GoLive::cache_wait_ms` from here.
    pub since_ms: u64,
    /// Segments with a server that switched whose GL has not reported yet.
    pub segments: Vec<String>,
}

/// Whether a group may go back into rotation as far as its caches go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CachesDone {
    /// Every segment reported (or the run had nothing for the caches).
    Yes,
    /// Not yet: reports are missing and there is time left.
    Waiting,
    /// The wait is over with these segments silent: the group goes on without them.
    TimedOut(Vec<String>),
}

impl CacheWait {
    /// Whether the group may go on, given the segments that reported the run's cache calls
    /// (`Run::caches_reported`).
    pub fn done(&self, now_ms: u64, limit_ms: u64, reported: &BTreeSet<String>) -> CachesDone {
        let silent: Vec<String> =
            self.segments.iter().filter(|s| !reported.contains(*s)).cloned().collect();
        if silent.is_empty() {
            CachesDone::Yes
        } else if now_ms < self.since_ms.saturating_add(limit_ms) {
            CachesDone::Waiting
        } else {
            CachesDone::TimedOut(silent)
        }
    }
}

/// Where a roll is; each step is done by `roll.rs` and then replaced by the next.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "step")]
pub enum RollStep {
    /// Take the current group out of rotation and let its sessions end.
    Drain,
    /// The group's run (`None` until it is started).
    Switch { run: Option<u64> },
    /// Health-check the group's servers that switched.
    Check { switched: Vec<String> },
    /// Send the servers that failed their check back to `previous`.
    Back { servers: Vec<String>, run: Option<u64> },
    /// Put the group's healthy servers back into rotation.
    Undrain,
    /// The canary's pause, since `since_ms`.
    Pause { since_ms: u64 },
    /// Ended: every group done (`stopped`: a failed check stopped it, or an operator aborted).
    Ended { stopped: Option<String> },
}

impl Roll {
    /// Keeps what an operator said in `stored` (the roll as the database has it now) while this
    /// copy was being worked on: an abort, an approval.
    pub fn keep_operator_inputs(&mut self, stored: &Roll) {
        self.approved |= stored.approved;
        if self.aborted.is_none() {
            self.aborted.clone_from(&stored.aborted);
        }
    }

    /// The run the roll waits for, if any.
    pub fn waits_for(&self) -> Option<u64> {
        match &self.step {
            RollStep::Switch { run } | RollStep::Back { run, .. } => *run,
            _ => None,
        }
    }

    pub fn ended(&self) -> bool {
        matches!(self.step, RollStep::Ended { .. })
    }
}

/// Splits `servers` (sorted) into the policy's groups.
pub fn groups(policy: GoLivePolicy, servers: &[String]) -> Vec<Vec<String>> {
    let size = match policy {
        GoLivePolicy::AllAtOnce => servers.len().max(1),
        GoLivePolicy::Rolling { group, .. } | GoLivePolicy::Canary { group, .. } => {
            group.of(servers.len())
        }
    };
    let mut sorted = servers.to_vec();
    sorted.sort();
    sorted.chunks(size).map(<[String]>::to_vec).collect()
}

/// Checks go-live settings: `(field path, why)` of the first problem.
pub fn check(g: &GoLive) -> Result<(), (String, String)> {
    let bad = |f: &str, why: String| Err((format!("golive.{f}"), why));
    if let GoLivePolicy::Rolling { group, .. } | GoLivePolicy::Canary { group, .. } = g.policy {
        match group {
            GroupSize::Servers(0) => return bad("policy.group", "a group of 0 servers".into()),
            GroupSize::Percent(p) if p == 0 || p > 100 => {
                return bad("policy.group", format!("{p} % is not within 1..=100"));
            }
            _ => {}
        }
    }
    if g.load_balancer.is_some() {
        let name = g.load_balancer.as_deref().unwrap_or("");
        if let Err(e) = crate::names::check_name("golive.load_balancer", name) {
            return bad("load_balancer", e.to_string());
        }
        if g.pool.is_empty() || g.pool.contains(['/', ' ', '\n']) {
            return bad("pool", format!("`{}` is not a pool name (no `/`, no spaces)", g.pool));
        }
        if let Some(hp) = &g.hot_pool
            && (hp.is_empty() || hp.contains(['/', ' ', '\n', '\r', '\t']) || *hp == g.pool)
        {
            return bad(
                "hot_pool",
                format!("`{hp}` is not a pool name (no `/`, no spaces, not `pool`)"),
            );
        }
    }
    if !g.hot_rules.is_empty() && (g.load_balancer.is_none() || g.hot_pool.is_none()) {
        return bad("hot_rules", "rules need `load_balancer` and `hot_pool`".into());
    }
    if g.hot_poll_ms < 100 {
        return bad("hot_poll_ms", "at least 100 ms".into());
    }
    super::check_rules(&g.hot_rules)?;
    for (name, address) in &g.servers {
        if address.parse::<std::net::SocketAddr>().is_err() {
            return bad(
                &format!("servers.{name}"),
                format!("`{address}` is not an address `ip:port`"),
            );
        }
    }
    for p in &g.health.paths {
        if !p.starts_with('/') || p.split('/').any(|c| c == "..") || p.contains(['?', '#', ' ']) {
            return bad("health.paths", format!("`{p}` is not an absolute URL path of a file"));
        }
    }
    if g.health.host.as_deref().is_some_and(|h| h.is_empty() || h.contains(['\r', '\n', ' '])) {
        return bad("health.host", "not a host name".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("s{i}")).collect()
    }

    #[test]
    fn groups_by_count_and_percent() {
        let rolling =
            |group| GoLivePolicy::Rolling { group, on_health_failure: Default::default() };
        assert_eq!(groups(rolling(GroupSize::Servers(1)), &names(4)).len(), 4);
        assert_eq!(
            groups(rolling(GroupSize::Servers(3)), &names(4)),
            vec![names(3), vec!["s3".to_string()]]
        );
        assert_eq!(groups(rolling(GroupSize::Percent(50)), &names(4)).len(), 2);
        assert_eq!(groups(rolling(GroupSize::Percent(1)), &names(4)).len(), 4);
        assert_eq!(groups(GoLivePolicy::AllAtOnce, &names(4)), vec![names(4)]);
    }

    #[test]
    fn a_group_waits_for_its_segments_cache_reports_within_a_bound() {
        let w = CacheWait { run: 7, since_ms: 1_000, segments: vec!["a".into(), "b".into()] };
        let reported = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(w.done(1_500, 30_000, &reported(&[])), CachesDone::Waiting);
        assert_eq!(w.done(1_500, 30_000, &reported(&["a", "c"])), CachesDone::Waiting);
        assert_eq!(
            w.done(31_000, 30_000, &reported(&["a"])),
            CachesDone::TimedOut(vec!["b".into()])
        );
        assert_eq!(w.done(1_500, 30_000, &reported(&["b", "a"])), CachesDone::Yes);
    }

    #[test]
    fn settings_parse_and_check() {
        let g: GoLive = serde_json::from_value(serde_json::json!({
            "policy": {"policy": "canary", "group": {"servers": 1}, "pause": {"until": "approval"}},
            "load_balancer": "lb", "pool": "app",
            "servers": {"a": "127.0.0.1:8080"},
            "health": {"paths": ["/release.txt"]}
        }))
        .unwrap();
        assert!(check(&g).is_ok());
        assert_eq!(g.drain_grace_ms, 2_000);
        assert_eq!(g.cache_wait_ms, 30_000);
        let mut bad = g.clone();
        bad.servers.insert("b".into(), "elsewhere".into());
        assert_eq!(check(&bad).unwrap_err().0, "golive.servers.b");
        let mut bad = g.clone();
        bad.health.paths = vec!["/../etc/passwd".into()];
        assert_eq!(check(&bad).unwrap_err().0, "golive.health.paths");
        let mut bad = g;
        bad.policy = GoLivePolicy::Rolling {
            group: GroupSize::Percent(0),
            on_health_failure: OnHealthFailure::Stop,
        };
        assert_eq!(check(&bad).unwrap_err().0, "golive.policy.group");
    }
}

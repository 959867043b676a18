//! The agent's Prometheus metrics: the election (state changes, leaderships won and lost,
//! failovers), the GL's MCTP sessions (passes, repairs, rate and loss), and applies by kind
//! and outcome with their durations. The tree's bytes and the GL endpoint's requests are
//! `cm_tree::metrics`', plugin calls `cm_plugin_host::metrics`'. An agent serves them on its
//! metrics address (`[metrics] listen`), to the scrape token only.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cm_election::{Event, State};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::mctp::SendOutcome;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    to: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApplyLabels {
    /// The assignment's type: publish, commit, rollback, replicate… (unknown: unreadable).
    kind: &'static str,
    outcome: &'static str,
}

struct AgentMetrics {
    state_changes: Family<StateLabel, Counter>,
    leaderships: Counter,
    leaderships_lost: Counter,
    failovers: Counter,
    is_leader: Gauge,
    /// The leader last followed (`u64::MAX`: none yet), to tell a failover from a first election.
    last_leader: AtomicU64,
    sessions: Family<OutcomeLabel, Counter>,
    passes: Counter,
    frames_sent: Counter,
    repairs: Counter,
    rate: Gauge,
    loss: Gauge<f64, AtomicU64>,
    applies: Family<ApplyLabels, Counter>,
    apply_seconds: Family<ApplyLabels, Histogram>,
}

static AGENT: LazyLock<AgentMetrics> = LazyLock::new(|| AgentMetrics {
    state_changes: Family::default(),
    leaderships: Counter::default(),
    leaderships_lost: Counter::default(),
    failovers: Counter::default(),
    is_leader: Gauge::default(),
    last_leader: AtomicU64::new(u64::MAX),
    sessions: Family::default(),
    passes: Counter::default(),
    frames_sent: Counter::default(),
    repairs: Counter::default(),
    rate: Gauge::default(),
    loss: Gauge::default(),
    applies: Family::default(),
    // 1 ms to ~30 s.
    apply_seconds: Family::new_with_constructor(|| {
        Histogram::new(exponential_buckets(0.001, 2.0, 16))
    }),
});

/// Adds the agent's metrics (and the plugin calls') to the process's registry.
pub fn register(registry: &mut Registry) {
    let a = &*AGENT;
    cm_plugin_host::metrics::register(registry);
    registry.register(
        "cmover_election_state_changes",
        "Election state changes, by the state entered",
        a.state_changes.clone(),
    );
    registry.register(
        "cmover_election_leaderships",
        "Times this node became its segment's group leader",
        a.leaderships.clone(),
    );
    registry.register(
        "cmover_election_leaderships_lost",
        "Times this node stopped being its segment's group leader",
        a.leaderships_lost.clone(),
    );
    registry.register(
        "cmover_election_failovers",
        "Times the segment's group leader changed from one node to another (seen by this node)",
        a.failovers.clone(),
    );
    registry.register(
        "cmover_election_is_leader",
        "1 while this node is its segment's group leader",
        a.is_leader.clone(),
    );
    registry.register(
        "cmover_mctp_sessions",
        "MCTP sessions this node sent as group leader, by outcome (complete: every member has it)",
        a.sessions.clone(),
    );
    registry.register("cmover_mctp_passes", "MCTP passes over the file", a.passes.clone());
    registry.register(
        "cmover_mctp_frames_sent",
        "MCTP data frames sent (first copies and repairs)",
        a.frames_sent.clone(),
    );
    registry.register(
        "cmover_mctp_repair_frames",
        "MCTP frames re-sent because members reported them missing (NAKs served, plain or coded)",
        a.repairs.clone(),
    );
    registry.register(
        "cmover_mctp_rate_bytes_per_second",
        "The MCTP sending rate at the end of the last session, after adaptation",
        a.rate.clone(),
    );
    registry.register(
        "cmover_mctp_loss_ratio",
        "Repair frames over frames sent in the last session (the loss the members saw)",
        a.loss.clone(),
    );
    registry.register(
        "cmover_applies",
        "Assignments applied, by kind and outcome",
        a.applies.clone(),
    );
    registry.register(
        "cmover_apply_duration_seconds",
        "Time to apply one assignment (build a release, or for commit and rollback switch live)",
        a.apply_seconds.clone(),
    );
}

fn state_name(s: State) -> &'static str {
    match s {
        State::GlKnown => "gl_known",
        State::GlUnknown => "gl_unknown",
        State::GlIsMe => "gl_is_me",
        State::VotingOpen => "voting_open",
        State::Concede => "concede",
    }
}

/// Counts what an election event changes.
pub fn election(ev: &Event) {
    let a = &*AGENT;
    match ev {
        Event::StateChanged { to, .. } => {
            a.state_changes.get_or_create(&StateLabel { to: state_name(*to) }).inc();
        }
        Event::BecameLeader => {
            a.leaderships.inc();
            a.is_leader.set(1);
        }
        Event::LostLeadership => {
            a.leaderships_lost.inc();
            a.is_leader.set(0);
        }
        Event::LeaderChanged { leader: Some(new) } => {
            let before = a.last_leader.swap(*new, Ordering::Relaxed);
            if before != u64::MAX && before != *new {
                a.failovers.inc();
            }
        }
        _ => {}
    }
}

/// A GL's MCTP session ended (`None`: it failed before a report).
pub fn mctp_session(out: Option<&SendOutcome>) {
    let a = &*AGENT;
    let Some(out) = out else {
        a.sessions.get_or_create(&OutcomeLabel { outcome: "failed" }).inc();
        return;
    };
    let outcome = if out.report.incomplete.is_empty() { "complete" } else { "incomplete" };
    a.sessions.get_or_create(&OutcomeLabel { outcome }).inc();
    let st = &out.stats;
    a.passes.inc_by(u64::from(st.passes));
    a.frames_sent.inc_by(st.frames_sent);
    let repairs = st.repairs + st.coded_frames;
    a.repairs.inc_by(repairs);
    a.rate.set(i64::try_from(out.final_rate).unwrap_or(i64::MAX));
    a.loss.set(if st.frames_sent == 0 { 0.0 } else { repairs as f64 / st.frames_sent as f64 });
}

/// One apply of an assignment of type `kind` ended (`ok`: live or the release is as asked).
pub fn applied(kind: &'static str, ok: bool, took: Duration) {
    let labels = ApplyLabels { kind, outcome: if ok { "ok" } else { "failed" } };
    AGENT.applies.get_or_create(&labels).inc();
    AGENT.apply_seconds.get_or_create(&labels).observe(took.as_secs_f64());
}

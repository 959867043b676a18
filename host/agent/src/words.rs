//! Election events in words, for the log: "seg0-1 is now the group leader of seg0", not a
//! Debug dump of the event. Every event is also counted ([`crate::metrics::election`]).

use cm_election::{Event, LeaveReason, State};

use crate::election::ElectionStatus;

/// Who this node is, for the sentences.
#[derive(Debug, Clone)]
pub struct Speaker {
    /// This server's name (its registration name).
    pub name: String,
    pub node: u64,
    pub segment: String,
}

fn state_words(s: State) -> &'static str {
    match s {
        State::GlKnown => "following a known group leader",
        State::GlUnknown => "looking for a group leader",
        State::GlIsMe => "group leader",
        State::VotingOpen => "voting",
        State::Concede => "conceding to a stronger candidate",
    }
}

/// The sentence for `ev`, or `None` for events not worth a line (heartbeat payloads).
/// `status` names other nodes where it knows them (a leader knows its members).
pub fn describe(me: &Speaker, ev: &Event, status: &ElectionStatus) -> Option<String> {
    let name_of = |node: u64| {
        status
            .members
            .iter()
            .find(|m| m.node == node)
            .map(|m| format!("{} (node {node})", m.registration.name))
            .unwrap_or_else(|| format!("node {node}"))
    };
    let (who, seg) = (&me.name, &me.segment);
    Some(match ev {
        Event::StateChanged { from, to } => {
            format!("{who}: election state {} → {}", state_words(*from), state_words(*to))
        }
        Event::BecameLeader => {
            format!("{who} is now the group leader of {seg} (incarnation {})", status.incarnation)
        }
        Event::LostLeadership => format!("{who} is no longer the group leader of {seg}"),
        Event::LeaderChanged { leader: Some(l) } if *l == me.node => return None,
        Event::LeaderChanged { leader: Some(l) } => {
            format!("{who} follows {} as the group leader of {seg}", name_of(*l))
        }
        Event::LeaderChanged { leader: None } => {
            format!("{who}: {seg} has no group leader; an election is running")
        }
        Event::MemberJoined(m) => {
            format!("{} (node {}) joined {seg}, led by {who}", m.registration.name, m.node)
        }
        Event::MemberLeft { node, reason } => format!(
            "{} left {seg} ({})",
            name_of(*node),
            match reason {
                LeaveReason::Left => "said goodbye",
                LeaveReason::TimedOut => "not heard from within the member timeout",
            }
        ),
        Event::MembersChanged { count } => format!("{seg} now has {count} registered members"),
        Event::Registered { leader } => {
            format!("{who} is registered with {} in {seg}", name_of(*leader))
        }
        Event::ChannelMove { channel } => format!("{seg} moves its control channel to {channel}"),
        Event::DataChannelAssigned { group, channel } => {
            format!("content group {group} of {seg} sends on data channel {channel}")
        }
        Event::LeaderPayload { .. } => return None,
    })
}

/// Logs `ev` in words (state changes and member counts at debug, the rest at info) and counts
/// it.
pub fn log_event(me: &Speaker, ev: &Event, status: &ElectionStatus) {
    crate::metrics::election(ev);
    let Some(line) = describe(me, ev, status) else { return };
    match ev {
        Event::StateChanged { .. } | Event::MembersChanged { .. } => tracing::debug!("{line}"),
        _ => tracing::info!("{line}"),
    }
}

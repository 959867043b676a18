//! Scripted scenarios on the simulated network, one protocol rule each.

use std::net::SocketAddr;
use std::time::Duration;

use cm_election::sim::{NetConfig, Sim, check_local};
use cm_election::wire::{self, Header, Message};
use cm_election::{
    ClaimKey, Config, DataChannelPool, Eligibility, Event, Instant, LeaveReason, Priority,
    PriorityInputs, Registration, State,
};

const HB: Duration = Duration::from_millis(100);
const SECRET: &[u8] = b"scenario secret";

fn channel() -> SocketAddr {
    "239.9.9.9:7000".parse().unwrap()
}

/// A node whose priority is fixed by its operator weight.
fn node(id: u64, weight: u8) -> Config {
    let mut c = Config::new(0xAB, id, 0, SECRET, channel(), HB);
    c.priority = PriorityInputs {
        operator_weight: weight,
        cpu_cores: 4,
        cpu_mhz: 2000,
        ..Default::default()
    };
    c.registration = Registration {
        name: format!("bes-{id}"),
        address: format!("10.1.0.{id}:7001"),
        ..Default::default()
    };
    c
}

fn sim(configs: Vec<Config>) -> Sim {
    let mut s = Sim::new(1, configs, NetConfig::perfect());
    s.log = Some(Vec::new());
    for i in 0..s.nodes.len() {
        s.start(i);
    }
    s
}

fn after(s: &Sim, d: Duration) -> Instant {
    s.now + d
}

fn run(s: &mut Sim, d: Duration) {
    let until = after(s, d);
    s.run_until(until, check_local).unwrap();
}

fn leader_id(s: &Sim) -> Option<u64> {
    s.agreed_leader().map(|l| s.nodes[l].config.node)
}

/// Every local invariant, and nobody but node index `l` ever leads.
fn nobody_leads_but(l: usize) -> impl Fn(&Sim) -> Result<(), String> {
    move |s: &Sim| {
        check_local(s)?;
        match s.live().find(|&(i, e)| i != l && e.is_leader()) {
            Some((_, e)) => Err(format!("node {} leads beside the incumbent", e.node())),
            None => Ok(()),
        }
    }
}

fn events_of(s: &Sim, node: u64) -> Vec<Event> {
    s.log
        .as_ref()
        .unwrap()
        .iter()
        .filter(|(_, n, _)| *n == node)
        .map(|(_, _, e)| e.clone())
        .collect()
}

#[test]
fn strongest_wins_and_everyone_registers() {
    let mut s = sim(vec![node(1, 10), node(2, 30), node(3, 20)]);
    run(&mut s, HB * 20);
    assert_eq!(leader_id(&s), Some(2));
    let l = s.agreed_leader().unwrap();
    assert!(s.members_converged(l));
    let leader = s.nodes[l].election.as_ref().unwrap();
    let members: Vec<u64> = leader.members().map(|m| m.node).collect();
    assert_eq!(members, vec![1, 3]);
    assert_eq!(leader.members().next().unwrap().registration.name, "bes-1");
    let ev = events_of(&s, 2);
    assert!(ev.contains(&Event::BecameLeader));
    assert_eq!(ev.iter().filter(|e| matches!(e, Event::MemberJoined(_))).count(), 2);
    assert!(events_of(&s, 1).contains(&Event::Registered { leader: 2 }));
    // The states went through Fig. 5: unknown → voting open → GL is me.
    assert!(ev.contains(&Event::StateChanged { from: State::GlUnknown, to: State::VotingOpen }));
    assert!(ev.contains(&Event::StateChanged { from: State::VotingOpen, to: State::GlIsMe }));
    // The weaker nodes conceded (an LC heard before sending one) and then knew the leader.
    assert!(
        events_of(&s, 1)
            .contains(&Event::StateChanged { from: State::Concede, to: State::GlKnown })
    );
}

#[test]
fn equal_priorities_break_ties_by_node_id() {
    let mut s = sim(vec![node(5, 7), node(9, 7), node(7, 7)]);
    run(&mut s, HB * 20);
    assert_eq!(leader_id(&s), Some(9));
}

#[test]
fn ineligible_never_leads_and_preassigned_outranks_priority() {
    let mut a = node(1, 200);
    a.eligibility = Eligibility::Ineligible;
    let mut s = sim(vec![a, node(2, 5), node(3, 9)]);
    run(&mut s, HB * 20);
    assert_eq!(leader_id(&s), Some(3));
    s.crash(2);
    s.crash(1);
    run(&mut s, HB * 20);
    // Node 1 alone and ineligible: nobody leads, node 1 never claims.
    assert_eq!(s.nodes[0].election.as_ref().unwrap().state(), State::GlUnknown);

    let pre = vec![2];
    let configs: Vec<Config> = [node(1, 50), node(2, 1), node(3, 60)]
        .into_iter()
        .map(|mut c| {
            c.preassigned = pre.clone();
            c
        })
        .collect();
    let mut s = sim(configs);
    run(&mut s, HB * 20);
    assert_eq!(leader_id(&s), Some(2));
}

#[test]
fn a_stronger_newcomer_does_not_depose_the_incumbent() {
    let mut s = Sim::new(3, vec![node(1, 10), node(2, 20), node(3, 250)], NetConfig::perfect());
    s.start(0);
    s.start(1);
    run(&mut s, HB * 20);
    assert_eq!(leader_id(&s), Some(2));
    s.start(2);
    run(&mut s, HB * 40);
    assert_eq!(leader_id(&s), Some(2), "sticky incumbent");
    assert!(s.members_converged(s.agreed_leader().unwrap()));
}

#[test]
fn leader_crash_fails_over_within_the_bound_to_the_strongest() {
    let mut s = sim(vec![node(1, 10), node(2, 30), node(3, 20), node(4, 5)]);
    run(&mut s, HB * 30);
    assert_eq!(leader_id(&s), Some(2));
    s.crash(1);
    let crashed = s.now;
    let bound = s.nodes[0].config.timing.failover_bound(s.net.max_delay);
    let at = s
        .run_until_true(crashed + bound * 3, check_local, |s| s.agreed_leader().is_some())
        .unwrap()
        .unwrap();
    assert!(at - crashed <= bound, "{:?} > {:?}", at - crashed, bound);
    assert_eq!(leader_id(&s), Some(3));
    run(&mut s, HB * 10);
    let l = s.agreed_leader().unwrap();
    assert!(s.members_converged(l));
}

#[test]
fn partition_heals_into_one_leader_without_heartbeat_battles() {
    let mut s = sim(vec![node(1, 10), node(2, 30), node(3, 20), node(4, 5)]);
    run(&mut s, HB * 20);
    s.partition = Some(vec![0, 0, 1, 1]);
    run(&mut s, HB * 30);
    // Each side has its own leader.
    assert!(s.nodes[1].election.as_ref().unwrap().is_leader());
    assert!(s.nodes[2].election.as_ref().unwrap().is_leader());
    s.partition = None;
    let healed = s.now;
    run(&mut s, HB * 60);
    assert_eq!(leader_id(&s), Some(2));
    assert!(s.members_converged(1));
    // Node 3 answered node 2's heartbeat with a claim (voting reopened), not a heartbeat battle.
    let log = s.log.as_ref().unwrap();
    assert!(log.iter().any(|(t, n, e)| *t >= healed
        && *n == 3
        && *e == Event::StateChanged { from: State::GlIsMe, to: State::VotingOpen }));
    assert!(log.iter().any(|(t, n, e)| *t >= healed && *n == 3 && *e == Event::LostLeadership));
}

#[test]
fn member_crash_is_detected_and_reported() {
    let mut s = sim(vec![node(1, 10), node(2, 30), node(3, 20)]);
    run(&mut s, HB * 20);
    s.crash(2);
    let timeout = s.nodes[0].config.timing.member_timeout;
    run(&mut s, timeout + HB * 2);
    assert!(
        events_of(&s, 2).contains(&Event::MemberLeft { node: 3, reason: LeaveReason::TimedOut })
    );
    let leader = s.nodes[1].election.as_ref().unwrap();
    assert_eq!(leader.members().map(|m| m.node).collect::<Vec<_>>(), vec![1]);
    // It comes back and registers again.
    s.start(2);
    run(&mut s, HB * 20);
    assert!(s.members_converged(1));
}

#[test]
fn graceful_leave_and_resignation() {
    let mut s = sim(vec![node(1, 10), node(2, 30), node(3, 20)]);
    run(&mut s, HB * 20);
    s.with_node(0, |e, now| e.leave(now));
    run(&mut s, HB);
    assert!(events_of(&s, 2).contains(&Event::MemberLeft { node: 1, reason: LeaveReason::Left }));
    s.crash(0);
    // The leader resigns: node 3 takes over sooner than silence detection alone would allow.
    s.with_node(1, |e, now| e.leave(now));
    let resigned = s.now;
    let timeout = s.nodes[2].config.timing.leader_timeout;
    let at = s.run_until_true(resigned + timeout * 3, check_local, |s| {
        s.nodes[2].election.as_ref().unwrap().is_leader()
    });
    let at = at.unwrap().unwrap();
    assert!(at - resigned < timeout, "resignation should beat silence detection");
}

#[test]
fn control_channel_move_takes_everyone_along() {
    let mut s = sim(vec![node(1, 10), node(2, 30), node(3, 20)]);
    run(&mut s, HB * 20);
    let new: SocketAddr = "239.9.9.10:7002".parse().unwrap();
    // A member that misses the move announcement follows from the lingering repeats.
    s.partition = Some(vec![0, 1, 1]);
    s.with_node(1, |e, now| e.move_control_channel(now, new).unwrap()).unwrap();
    run(&mut s, HB / 2);
    s.partition = None;
    run(&mut s, HB * 30);
    for (_, e) in s.live() {
        assert_eq!(e.control_channel(), new);
    }
    assert_eq!(leader_id(&s), Some(2));
    assert!(events_of(&s, 1).contains(&Event::ChannelMove { channel: new }));
    // Only a leader may move the channel.
    let err = s.with_node(0, |e, now| e.move_control_channel(now, channel())).unwrap();
    assert!(err.is_err());
}

#[test]
fn data_channels_are_assigned_per_content_group() {
    let configs: Vec<Config> = [(1, 10, vec!["web"]), (2, 30, vec![]), (3, 20, vec!["web", "img"])]
        .into_iter()
        .map(|(id, w, groups)| {
            let mut c = node(id, w);
            c.registration.content_groups = groups.into_iter().map(String::from).collect();
            c.data_channels =
                Some(DataChannelPool { first: "239.10.0.1:7100".parse().unwrap(), count: 8 });
            c
        })
        .collect();
    let mut s = sim(configs);
    run(&mut s, HB * 20);
    let leader = s.nodes[1].election.as_ref().unwrap();
    assert_eq!(leader.data_channels().len(), 2);
    let web = leader.data_channels()["web"];
    let m3 = s.nodes[2].election.as_ref().unwrap();
    assert_eq!(m3.data_channels()["web"], web);
    assert!(m3.data_channels().contains_key("img"));
    assert!(!s.nodes[0].election.as_ref().unwrap().data_channels().contains_key("img"));
    // The manager reassigns a group.
    let moved: SocketAddr = "239.10.1.1:7100".parse().unwrap();
    s.with_node(1, |e, now| e.set_data_channel(now, "web".into(), moved).unwrap());
    run(&mut s, HB);
    assert!(
        events_of(&s, 1)
            .contains(&Event::DataChannelAssigned { group: "web".into(), channel: moved })
    );
}

#[test]
fn heartbeat_payload_reaches_members_once_per_change() {
    let mut s = sim(vec![node(1, 10), node(2, 30)]);
    run(&mut s, HB * 20);
    s.with_node(1, |e, _| e.set_heartbeat_payload(b"mctp session 7".to_vec()).unwrap());
    run(&mut s, HB * 10);
    let got: Vec<_> =
        events_of(&s, 1).into_iter().filter(|e| matches!(e, Event::LeaderPayload { .. })).collect();
    assert_eq!(got, vec![Event::LeaderPayload { leader: 2, payload: b"mctp session 7".to_vec() }]);
    let payload_of = |s: &Sim, i: usize| {
        s.nodes[i].election.as_ref().unwrap().leader_payload().map(<[u8]>::to_vec)
    };
    assert_eq!(
        payload_of(&s, 0),
        Some(b"mctp session 7".to_vec()),
        "the member reads its leader's payload"
    );
    assert_eq!(payload_of(&s, 1), Some(b"mctp session 7".to_vec()), "the leader reads its own");
    // The leader dies: no leader, no payload; the next leader's (empty) payload replaces it.
    s.crash(1);
    let no_leader = |s: &Sim| s.nodes[0].election.as_ref().unwrap().leader().is_none();
    assert!(s.run_until_true(after(&s, HB * 10), |_| Ok(()), no_leader).unwrap().is_some());
    assert_eq!(payload_of(&s, 0), None, "no leader known, no payload");
    run(&mut s, HB * 10);
    assert_eq!(payload_of(&s, 0), Some(Vec::new()), "node 1 leads itself with an empty payload");
    let too_big = s.with_node(0, |e, _| e.set_heartbeat_payload(vec![0; 5000])).unwrap();
    assert!(too_big.is_err());
}

#[test]
fn forged_foreign_replayed_and_truncated_datagrams_change_nothing() {
    let mut s = sim(vec![node(1, 10), node(2, 30)]);
    run(&mut s, HB * 20);
    let before = s.nodes[0].election.as_ref().unwrap().stats();
    // A very strong claim from an outsider with the wrong secret, one for another cluster,
    // a replay of an old genuine heartbeat, and a truncated one.
    let strong = ClaimKey { rank: 255, incumbent: true, priority: Priority::MAX, node: 66 };
    let wrong_key = Config::derive_key(b"not the secret");
    let right_key = Config::derive_key(SECRET);
    let h = Header { cluster: 0xAB, sender: 66, incarnation: u64::MAX, seq: 1 };
    let forged = wire::seal(&wrong_key, &h, &Message::LeaderClaim { key: strong }).unwrap();
    let foreign = wire::seal(
        &right_key,
        &Header { cluster: 0xAC, ..h },
        &Message::LeaderClaim { key: strong },
    )
    .unwrap();
    let genuine = wire::seal(
        &right_key,
        &Header { sender: 2, incarnation: 1, seq: 1, ..h },
        &Message::LeaderAlive { key: ClaimKey { node: 2, ..strong }, members: 0, payload: vec![] },
    )
    .unwrap();
    for bytes in
        [forged.clone(), foreign, genuine.clone(), forged[..20].to_vec(), vec![], b"CMEL".to_vec()]
    {
        s.inject(0, bytes);
    }
    run(&mut s, HB * 20);
    let after = s.nodes[0].election.as_ref().unwrap().stats();
    assert_eq!(after.forged - before.forged, 1);
    assert_eq!(after.foreign - before.foreign, 1);
    assert_eq!(after.replayed - before.replayed, 1);
    assert_eq!(after.malformed - before.malformed, 3);
    assert_eq!(leader_id(&s), Some(2));
    assert!(!s.log.as_ref().unwrap().iter().any(|(_, _, e)| *e == Event::LostLeadership));
}

#[test]
fn restarted_nodes_come_back_on_the_moved_channel_without_a_split_brain() {
    let mut s = sim(vec![node(1, 10), node(2, 30), node(3, 20)]);
    run(&mut s, HB * 20);
    let new: SocketAddr = "239.9.9.11:7003".parse().unwrap();
    s.with_node(1, |e, now| e.move_control_channel(now, new).unwrap()).unwrap();
    // Long past the lingering announcements on the old channel.
    let linger = s.nodes[0].config.timing.channel_move_linger;
    run(&mut s, linger + HB * 10);
    assert!(s.nodes.iter().all(|n| {
        n.saved.as_ref().is_some_and(|st| st.control_channel == new && st.channel_epoch == 1)
    }));

    // A member crashes and restarts: it resumes on the new channel and registers again.
    s.crash(0);
    run(&mut s, HB * 5);
    s.start(0);
    assert_eq!(s.nodes[0].election.as_ref().unwrap().control_channel(), new);
    run(&mut s, HB * 20);
    assert_eq!(leader_id(&s), Some(2));
    assert!(s.members_converged(1));
    // The datagrams it had accepted before the crash were replayed to it at once: refused.
    assert!(s.nodes[0].election.as_ref().unwrap().stats().replayed > 0);

    // The leader crashes; node 3 takes over on the new channel; the old leader restarts there
    // and joins as a member (with no memory of the move it would claim alone on the old one).
    s.crash(1);
    run(&mut s, HB * 20);
    assert_eq!(leader_id(&s), Some(3));
    s.start(1);
    let done = |s: &Sim| s.agreed_leader() == Some(2) && s.members_converged(2);
    let one_leader = |s: &Sim| {
        check_local(s)?;
        let leaders = s.live().filter(|(_, e)| e.is_leader()).count();
        if leaders > 1 {
            Err(format!("{leaders} leaders at {:?}:{}", s.now, s.describe()))
        } else {
            Ok(())
        }
    };
    let deadline = after(&s, HB * 40);
    assert!(s.run_until_true(deadline, one_leader, done).unwrap().is_some(), "{}", s.describe());
    assert_eq!(s.nodes[1].election.as_ref().unwrap().control_channel(), new);
}

#[test]
fn an_operator_configured_channel_overrides_the_saved_one() {
    let mut s = sim(vec![node(1, 10), node(2, 30)]);
    run(&mut s, HB * 20);
    let moved: SocketAddr = "239.9.9.12:7004".parse().unwrap();
    s.with_node(1, |e, now| e.move_control_channel(now, moved).unwrap()).unwrap();
    run(&mut s, HB * 5);
    s.crash(0);
    s.crash(1);
    let configured: SocketAddr = "239.9.9.13:7005".parse().unwrap();
    for n in &mut s.nodes {
        n.config.control_channel = configured;
    }
    s.start(0);
    s.start(1);
    run(&mut s, HB * 20);
    for (_, e) in s.live() {
        assert_eq!(e.control_channel(), configured);
    }
    assert_eq!(leader_id(&s), Some(2));
}

#[test]
fn resume_refuses_another_nodes_state_and_a_stale_incarnation() {
    let mut s = sim(vec![node(1, 10), node(2, 30)]);
    run(&mut s, HB * 20);
    let saved = s.nodes[0].saved.clone().unwrap();
    let mut cfg = s.nodes[0].config.clone();
    cfg.incarnation = saved.incarnation;
    let stale = cm_election::Election::resume(cfg.clone(), Instant::ZERO, 1, Some(&saved));
    assert!(matches!(
        stale,
        Err(cm_election::ConfigError::Restart(
            cm_election::RestartStateError::StaleIncarnation { .. }
        ))
    ));
    cfg.incarnation = cm_election::next_incarnation(Some(&saved), 0);
    assert!(cm_election::Election::resume(cfg.clone(), Instant::ZERO, 1, Some(&saved)).is_ok());
    let other = s.nodes[1].saved.clone().unwrap();
    let wrong = cm_election::Election::resume(cfg, Instant::ZERO, 1, Some(&other));
    assert!(matches!(
        wrong,
        Err(cm_election::ConfigError::Restart(cm_election::RestartStateError::OtherNode {
            node: 2,
            ..
        }))
    ));
}

#[test]
fn a_node_down_through_a_move_finds_the_segment_from_the_leaders_reannouncements() {
    let mut s = sim(vec![node(1, 10), node(2, 30), node(3, 20)]);
    run(&mut s, HB * 20);
    s.crash(0);
    let new: SocketAddr = "239.9.9.14:7006".parse().unwrap();
    s.with_node(1, |e, now| e.move_control_channel(now, new).unwrap()).unwrap();
    let t = s.nodes[0].config.timing.clone();
    run(&mut s, t.channel_move_linger + HB * 5);
    // Back on the channel it knew, long after the lingering announcements stopped.
    s.start(0);
    assert_eq!(s.nodes[0].election.as_ref().unwrap().control_channel(), channel());
    let done = |s: &Sim| s.agreed_leader() == Some(1) && s.members_converged(1);
    // It hears the move before it would claim: nobody else ever leads.
    let one_leader = nobody_leads_but(1);
    let deadline =
        after(&s, t.leader_timeout + t.registration_spread + t.report_delay_max + t.member_refresh);
    assert!(s.run_until_true(deadline, one_leader, done).unwrap().is_some(), "{}", s.describe());
    assert_eq!(s.nodes[0].election.as_ref().unwrap().control_channel(), new);
    assert_eq!(s.nodes[0].saved.as_ref().unwrap().old_channels, vec![channel()]);
}

#[test]
fn a_new_node_configured_with_the_original_channel_joins_after_a_move() {
    let mut s =
        Sim::new(1, vec![node(1, 10), node(2, 30), node(3, 20), node(4, 40)], NetConfig::perfect());
    for i in 0..3 {
        s.start(i);
    }
    run(&mut s, HB * 20);
    let new: SocketAddr = "239.9.9.15:7007".parse().unwrap();
    s.with_node(1, |e, now| e.move_control_channel(now, new).unwrap()).unwrap();
    let t = s.nodes[0].config.timing.clone();
    run(&mut s, t.channel_move_linger * 3);
    s.start(3);
    let done = |s: &Sim| s.agreed_leader() == Some(1) && s.members_converged(1);
    // It hears the move before it would claim: nobody else ever leads.
    let one_leader = nobody_leads_but(1);
    let deadline =
        after(&s, t.leader_timeout + t.registration_spread + t.report_delay_max + t.member_refresh);
    assert!(s.run_until_true(deadline, one_leader, done).unwrap().is_some(), "{}", s.describe());
    assert_eq!(s.nodes[3].election.as_ref().unwrap().control_channel(), new);
}

#[test]
fn a_crash_counts_as_a_recent_failure_and_a_clean_leave_does_not() {
    let mut steady = node(1, 10);
    steady.priority.uptime_secs = 604_800;
    let mut s = sim(vec![steady, node(2, 30)]);
    run(&mut s, HB * 20);
    let failures =
        |s: &Sim| s.nodes[0].election.as_ref().unwrap().config().priority.recent_failures;
    let priority = |s: &Sim| s.nodes[0].election.as_ref().unwrap().claim_key(s.now).priority;
    assert_eq!(failures(&s), 0);
    let before = priority(&s);
    s.crash(0);
    s.start(0);
    assert_eq!(failures(&s), 1, "the crashed run is a failure");
    assert!(priority(&s) < before, "and lowers the priority");
    run(&mut s, HB * 20);
    s.with_node(0, |e, now| e.leave(now));
    s.crash(0);
    s.start(0);
    assert_eq!(failures(&s), 1, "a clean stop is not a failure; the earlier crash still counts");
}

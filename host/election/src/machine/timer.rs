//! The election's timers as one table: one slot per [`Timer`], each armed or not.
//!
//! Each timer belongs either to one state of the machine (it is cleared when the machine leaves
//! that state, see [`Timer::state`]) or to leading (cleared when leadership is lost), so every
//! armed timer is one that matters now and [`Timers::next`], the earliest armed one, is the
//! machine's next deadline (with the member expiries and the channel-move linger, which keep
//! their own times).

use cm_sansio::Instant;

use super::State;

/// One of the machine's timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Timer {
    /// GL known: no LA from the leader by then → GL unknown.
    LeaderDeadline,
    /// GL unknown: send our claim then.
    Claim,
    /// Voting open: the window ends → GL is me.
    WindowEnd,
    /// Concede: no LA by then → GL unknown.
    ConcedeUntil,
    /// GL is me: the next LA.
    Heartbeat,
    /// GL known: (re-)register with the leader then.
    Register,
    /// Leading: the next member report.
    Report,
    /// Leading: announce the move again on the channels the segment left.
    Reannounce,
}

impl Timer {
    const COUNT: usize = 8;
    const ALL: [Timer; Timer::COUNT] = [
        Timer::LeaderDeadline,
        Timer::Claim,
        Timer::WindowEnd,
        Timer::ConcedeUntil,
        Timer::Heartbeat,
        Timer::Register,
        Timer::Report,
        Timer::Reannounce,
    ];

    /// The state this timer belongs to; `None` for the leader's timers (they live while
    /// leading, which spans GL is me and a vote the leader reopened).
    fn state(self) -> Option<State> {
        match self {
            Timer::LeaderDeadline | Timer::Register => Some(State::GlKnown),
            Timer::Claim => Some(State::GlUnknown),
            Timer::WindowEnd => Some(State::VotingOpen),
            Timer::ConcedeUntil => Some(State::Concede),
            Timer::Heartbeat => Some(State::GlIsMe),
            Timer::Report | Timer::Reannounce => None,
        }
    }
}

/// The table: when each timer fires, if armed.
#[derive(Debug, Clone, Default)]
pub(crate) struct Timers([Option<Instant>; Timer::COUNT]);

impl Timers {
    pub(crate) fn get(&self, t: Timer) -> Option<Instant> {
        self.0[t as usize]
    }

    pub(crate) fn set(&mut self, t: Timer, at: Instant) {
        self.0[t as usize] = Some(at);
    }

    pub(crate) fn put(&mut self, t: Timer, at: Option<Instant>) {
        self.0[t as usize] = at;
    }

    pub(crate) fn clear(&mut self, t: Timer) {
        self.0[t as usize] = None;
    }

    /// Armed and due at `now`.
    pub(crate) fn due(&self, t: Timer, now: Instant) -> bool {
        self.get(t).is_some_and(|at| at <= now)
    }

    /// Disarms the timers of `state` (the machine is leaving it).
    pub(crate) fn leave_state(&mut self, state: State) {
        for t in Timer::ALL {
            if t.state() == Some(state) {
                self.clear(t);
            }
        }
    }

    /// The earliest armed timer.
    pub(crate) fn next(&self) -> Option<Instant> {
        self.0.iter().flatten().min().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Instant {
        Instant::from_nanos(ms * 1_000_000)
    }

    #[test]
    fn next_is_the_earliest_armed() {
        let mut t = Timers::default();
        assert_eq!(t.next(), None);
        t.set(Timer::Report, at(30));
        t.set(Timer::Claim, at(10));
        t.set(Timer::Heartbeat, at(20));
        assert_eq!(t.next(), Some(at(10)));
        assert!(t.due(Timer::Claim, at(10)) && !t.due(Timer::Heartbeat, at(10)));
        t.clear(Timer::Claim);
        assert_eq!(t.next(), Some(at(20)));
    }

    #[test]
    fn leaving_a_state_disarms_only_its_timers() {
        let mut t = Timers::default();
        for (i, timer) in Timer::ALL.into_iter().enumerate() {
            t.set(timer, at(i as u64));
        }
        t.leave_state(State::GlKnown);
        assert_eq!(t.get(Timer::LeaderDeadline), None);
        assert_eq!(t.get(Timer::Register), None);
        assert_eq!(t.get(Timer::Claim), Some(at(1)));
        t.leave_state(State::GlIsMe);
        assert_eq!(t.get(Timer::Heartbeat), None);
        assert_eq!(t.get(Timer::Report), Some(at(6)), "leading's timers outlive the states");
    }
}

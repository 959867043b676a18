//! Pacing: when the next datagram of a pass may go out (a token bucket in time units).
//!
//! Every datagram books its sending time at the current rate (`wire bytes / rate`) after the
//! previous one's. Up to one burst of credit may be banked, so a sender woken late sends what
//! was due back to back, but an idle moment never turns into a long burst that overruns the
//! members' socket buffers.

use cm_sansio::Instant;
use std::time::Duration;

#[derive(Debug, Clone)]
pub(super) struct Pacer {
    /// When the next datagram is due (without the burst's credit).
    next_send: Instant,
    /// Sending time that may go out back to back.
    burst: Duration,
}

impl Pacer {
    pub(super) fn new(now: Instant, burst: Duration) -> Self {
        Pacer { next_send: now, burst }
    }

    /// The earliest time the next datagram may go out.
    pub(super) fn ready_at(&self) -> Instant {
        self.next_send - self.burst
    }

    pub(super) fn is_ready(&self, now: Instant) -> bool {
        now >= self.ready_at()
    }

    /// A datagram of `wire_len` bytes goes out at `now`, at `rate` bytes per second.
    pub(super) fn on_sent(&mut self, now: Instant, wire_len: u64, rate: u64) {
        // Never bank more than one burst of credit.
        let base = self.next_send.max(now - self.burst);
        self.next_send = base + Duration::from_nanos(wire_len * 1_000_000_000 / rate.max(1));
    }

    /// A pass starts at `now`: it does not send ahead of the time already booked.
    pub(super) fn start_pass(&mut self, now: Instant) {
        self.next_send = self.next_send.max(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn one_burst_back_to_back_then_the_rate() {
        let t0 = Instant::from_nanos(1_000_000_000);
        let mut p = Pacer::new(t0, 2 * MS);
        // 1 000 bytes at 1 MB/s: 1 ms each. The first, then a burst's worth (2 ms) go out at
        // once; the fourth waits its turn.
        assert!(p.is_ready(t0));
        p.on_sent(t0, 1000, 1_000_000);
        assert!(p.is_ready(t0));
        p.on_sent(t0, 1000, 1_000_000);
        assert!(p.is_ready(t0));
        p.on_sent(t0, 1000, 1_000_000);
        assert!(!p.is_ready(t0));
        assert_eq!(p.ready_at(), t0 + MS);
    }

    #[test]
    fn idle_time_banks_one_burst_only() {
        let t0 = Instant::from_nanos(1_000_000_000);
        let mut p = Pacer::new(t0, 2 * MS);
        let later = t0 + Duration::from_secs(1);
        let mut sent = 0;
        while p.is_ready(later) {
            p.on_sent(later, 1000, 1_000_000);
            sent += 1;
        }
        assert_eq!(
            sent, 5,
            "a burst banked, a burst booked ahead and the one due: not a second's worth"
        );
    }

    #[test]
    fn a_new_pass_does_not_send_ahead_of_what_is_booked() {
        let t0 = Instant::from_nanos(1_000_000_000);
        let mut p = Pacer::new(t0, Duration::ZERO);
        p.on_sent(t0, 10_000, 1_000_000); // booked until t0 + 10 ms
        p.start_pass(t0 + MS);
        assert_eq!(p.ready_at(), t0 + 10 * MS);
        p.start_pass(t0 + 20 * MS);
        assert_eq!(p.ready_at(), t0 + 20 * MS);
    }

    #[test]
    fn a_zero_rate_does_not_divide_by_zero() {
        let mut p = Pacer::new(Instant::ZERO, Duration::ZERO);
        p.on_sent(Instant::ZERO, 1, 0);
        assert_eq!(p.ready_at(), Instant::from_nanos(1_000_000_000));
    }
}

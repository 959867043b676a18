//! Rate control: the sending rate, between the configured floor and cap.
//!
//! Loss on a LAN is mostly receivers overrun, so the rate follows what members say they lack:
//! after each pass from the share of frames NACKed, and during a pass from each checkpoint's
//! worst gap share and from how far the slowest member lags behind the sender (its socket
//! buffer filling). Back off hard when a large share is missing, gently when a little is, and
//! probe upward when almost nothing is.

use super::SenderConfig;
use super::peers::Peer;
use crate::wire;

#[derive(Debug, Clone)]
pub(super) struct RateControl {
    /// Bytes per second of datagrams.
    rate: u64,
    min: u64,
    max: u64,
    /// Lag (payload bytes) past which a member is falling behind.
    max_lag: u64,
    frame_size: u16,
}

/// Where the slowest members stand, from their latest checkpoint answers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Lag {
    /// Payload bytes the furthest-behind member is behind the sender.
    pub bytes: u64,
    /// Payload bytes per second taken in by the slowest of the members falling behind.
    pub intake: Option<f64>,
}

impl RateControl {
    pub(super) fn new(cfg: &SenderConfig) -> Self {
        RateControl {
            rate: cfg.initial_rate,
            min: cfg.min_rate,
            max: cfg.max_rate,
            max_lag: cfg.max_lag_bytes,
            frame_size: cfg.frame_size,
        }
    }

    pub(super) fn rate(&self) -> u64 {
        self.rate
    }

    /// End of a pass: `nacked` of the `sent` frames were reported missing.
    pub(super) fn after_pass(&mut self, nacked: u32, sent: u32) {
        let share = f64::from(nacked) / f64::from(sent.max(1));
        let factor = if share > 0.25 {
            0.6
        } else if share > 0.10 {
            0.85
        } else if share < 0.03 {
            1.25
        } else {
            1.0
        };
        self.rate = ((self.rate as f64 * factor) as u64).clamp(self.min, self.max);
    }

    /// The slowest of `members`, each with its lag in payload bytes. One that fell far behind
    /// (crashed, or overflowed long ago) is left to the end-of-pass repair rather than stall
    /// everyone; the intake that matters is that of the members falling behind.
    pub(super) fn slowest<'a>(&self, members: impl Iterator<Item = (u64, &'a Peer)>) -> Lag {
        let (bytes, intake) = members.filter(|(lag, _)| *lag <= 4 * self.max_lag).fold(
            (0, None::<f64>),
            |(lag, intake), (l, p)| {
                let i = if l > self.max_lag / 2 { p.intake() } else { None };
                (
                    lag.max(l),
                    match (intake, i) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    },
                )
            },
        );
        Lag { bytes, intake }
    }

    /// Mid-pass, from checkpoint answers: down when a member's window misses a large `share`
    /// (it is overrun, or the network is congested) or when a member lags far behind the sender
    /// (its socket buffer is filling: it would soon drop), gently up when every answer is good.
    pub(super) fn after_checkpoint(&mut self, share: f64, lag: Lag) {
        let mut factor: f64 = if share > 0.25 {
            0.6
        } else if share > 0.10 {
            0.85
        } else {
            1.15
        };
        if lag.bytes > self.max_lag / 2 {
            factor = factor.min(1.0);
        }
        let mut rate = self.rate as f64 * factor;
        if lag.bytes > self.max_lag {
            // Falling behind: send a little slower than the slowest lagging member takes data
            // in, so its backlog drains — a measured target, not a cut per checkpoint (the
            // answers come late, by the backlog itself, and repeated cuts would overshoot).
            let wire = f64::from(self.frame_size) + wire::DATA_OVERHEAD as f64;
            // At most halved per checkpoint: one member descheduled for a while measures a
            // tiny intake that says little about the next moment.
            rate = match lag.intake {
                Some(i) => rate
                    .min(0.9 * i * wire / f64::from(self.frame_size))
                    .max(self.rate as f64 * 0.5),
                None => rate * 0.8,
            };
        }
        self.rate = (rate as u64).clamp(self.min, self.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cm_sansio::Instant;
    use std::time::Duration;

    fn control(initial: u64) -> RateControl {
        let mut cfg = SenderConfig::new("239.1.2.3:5000".parse().unwrap(), 5001);
        cfg.initial_rate = initial;
        cfg.min_rate = 1_000_000;
        cfg.max_rate = 100_000_000;
        cfg.max_lag_bytes = 12 << 20;
        RateControl::new(&cfg)
    }

    const FINE: Lag = Lag { bytes: 0, intake: None };

    #[test]
    fn after_a_pass_the_nack_share_sets_the_factor() {
        for (nacked, rate) in [(30, 6_000_000), (20, 8_500_000), (5, 10_000_000), (1, 12_500_000)] {
            let mut r = control(10_000_000);
            r.after_pass(nacked, 100);
            assert_eq!(r.rate(), rate, "{nacked} of 100 missing");
        }
        let mut r = control(10_000_000);
        r.after_pass(0, 0);
        assert_eq!(r.rate(), 12_500_000, "nothing sent counts as nothing missing");
    }

    #[test]
    fn the_rate_stays_within_floor_and_cap() {
        let mut r = control(90_000_000);
        r.after_pass(0, 100);
        assert_eq!(r.rate(), 100_000_000);
        let mut r = control(1_200_000);
        r.after_checkpoint(0.5, FINE);
        assert_eq!(r.rate(), 1_000_000);
    }

    #[test]
    fn mid_pass_gap_share_and_lag() {
        let mut r = control(10_000_000);
        r.after_checkpoint(0.3, FINE);
        assert_eq!(r.rate(), 6_000_000);
        let mut r = control(10_000_000);
        r.after_checkpoint(0.0, FINE);
        assert_eq!(r.rate(), 11_500_000, "every answer good: gently up");
        let mut r = control(10_000_000);
        r.after_checkpoint(0.0, Lag { bytes: 7 << 20, intake: None });
        assert_eq!(r.rate(), 10_000_000, "lagging by half the limit: no higher");
        let mut r = control(10_000_000);
        r.after_checkpoint(0.0, Lag { bytes: 13 << 20, intake: None });
        assert_eq!(r.rate(), 8_000_000, "falling behind, intake unknown: down a fifth");
        let mut r = control(10_000_000);
        r.after_checkpoint(0.0, Lag { bytes: 13 << 20, intake: Some(6_000_000.0) });
        let wire = 1400.0 + wire::DATA_OVERHEAD as f64;
        assert_eq!(
            r.rate(),
            (0.9 * 6_000_000.0 * wire / 1400.0) as u64,
            "a little under its intake"
        );
        let mut r = control(10_000_000);
        r.after_checkpoint(0.0, Lag { bytes: 13 << 20, intake: Some(1000.0) });
        assert_eq!(r.rate(), 5_000_000, "at most halved at once");
    }

    #[test]
    fn the_slowest_member_counts_unless_it_is_far_gone() {
        let r = control(10_000_000);
        let mut slow = Peer::new(true, None);
        for (ms, bytes) in [(0, 0), (10, 1_000_000), (20, 2_000_000)] {
            slow.answered(Instant::ZERO + Duration::from_millis(ms), bytes);
        }
        let fast = Peer::new(true, None);
        let lag = r.slowest([(1 << 20, &fast), (8 << 20, &slow), (60 << 20, &fast)].into_iter());
        assert_eq!(lag, Lag { bytes: 8 << 20, intake: Some(100_000_000.0) });
        let lag = r.slowest([(1 << 20, &slow)].into_iter());
        assert_eq!(lag, Lag { bytes: 1 << 20, intake: None }, "not behind: intake not asked");
    }
}

//! The small kit the sans-IO protocol cores (`cm-election`, `cm-mctp`) share.
//!
//! A core never reads a clock nor owns a socket: its driver passes the time in as an
//! [`Instant`] and sends what the core hands out as a [`Transmit`] to a [`Dest`]. Both cores use
//! these same types, so a driver or simulator that knows one core reads the other alike.

use std::net::SocketAddr;
use std::ops::{Add, Sub};
use std::time::Duration;

/// A point in time as a protocol core sees it: nanoseconds since an origin its driver chose
/// (process start for a real driver, zero for a simulation). Arithmetic saturates rather than
/// panics, so a hostile or huge duration from the wire can never overflow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Instant(u64);

impl Instant {
    /// The driver's origin.
    pub const ZERO: Instant = Instant(0);

    /// The instant `d` after the origin (saturating at about 584 years).
    pub fn from_origin(d: Duration) -> Instant {
        Instant(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }

    /// The instant `nanos` nanoseconds after the origin.
    pub const fn from_nanos(nanos: u64) -> Instant {
        Instant(nanos)
    }

    /// How long after the origin this is.
    pub fn since_origin(self) -> Duration {
        Duration::from_nanos(self.0)
    }

    /// How long after `earlier` this is; zero if `earlier` is in fact later.
    pub fn saturating_since(self, earlier: Instant) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Add<Duration> for Instant {
    type Output = Instant;
    fn add(self, d: Duration) -> Instant {
        Instant(self.0.saturating_add(nanos(d)))
    }
}

impl Sub<Duration> for Instant {
    type Output = Instant;
    fn sub(self, d: Duration) -> Instant {
        Instant(self.0.saturating_sub(nanos(d)))
    }
}

impl Sub<Instant> for Instant {
    type Output = Duration;
    fn sub(self, earlier: Instant) -> Duration {
        self.saturating_since(earlier)
    }
}

/// Where a datagram a core hands out goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dest {
    /// The core's own group: the segment's control channel for the election; for MCTP the
    /// session's data channel and every member that can only be reached by unicast.
    Group,
    /// Another multicast channel (the election's old control channel after a move).
    Channel(SocketAddr),
    /// One peer, by unicast.
    To(SocketAddr),
}

/// A datagram for the driver to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub dest: Dest,
    pub payload: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates() {
        let t = Instant::from_nanos(5);
        assert_eq!(t - Duration::from_nanos(10), Instant::ZERO);
        assert_eq!(t + Duration::MAX, Instant::from_nanos(u64::MAX));
        assert_eq!(Instant::ZERO - t, Duration::ZERO);
        assert_eq!(t - Instant::from_nanos(2), Duration::from_nanos(3));
        assert_eq!(
            Instant::from_origin(Duration::from_millis(1)).since_origin(),
            Duration::from_millis(1)
        );
    }
}

//! The protocol's notion of time: an opaque monotonic instant supplied by the caller.
//!
//! The core never reads a clock. A driver maps its own clock onto [`Instant`] (e.g. the time
//! since it started); the simulation uses virtual time. Only differences matter.

use std::ops::{Add, Sub};
use std::time::Duration;

/// A point on the caller's monotonic clock, as the time elapsed since an arbitrary origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Instant(Duration);

impl Instant {
    /// The origin.
    pub const ZERO: Instant = Instant(Duration::ZERO);

    /// The instant `d` after the origin.
    pub fn from_origin(d: Duration) -> Self {
        Instant(d)
    }

    /// Time since the origin.
    pub fn since_origin(self) -> Duration {
        self.0
    }

    /// `self - earlier`, or zero when `earlier` is later.
    pub fn saturating_since(self, earlier: Instant) -> Duration {
        self.0.saturating_sub(earlier.0)
    }
}

impl Add<Duration> for Instant {
    type Output = Instant;
    fn add(self, d: Duration) -> Instant {
        Instant(self.0.saturating_add(d))
    }
}

impl Sub<Instant> for Instant {
    type Output = Duration;
    /// Saturating: an earlier minus a later instant is zero, never a panic.
    fn sub(self, earlier: Instant) -> Duration {
        self.saturating_since(earlier)
    }
}

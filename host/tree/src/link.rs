//! What a node measures of its links, passively from the transfers it does: [`LinkRates`] (the
//! figures a GL reports to the manager, which shapes later trees from them) and [`UploadMeter`]
//! (a node's sending, counted over the time any child was pulling). Sans-IO: the caller passes
//! the time.

use serde::{Deserialize, Serialize};

/// Link speeds a GL measured passively from the transfers it did (bytes/s; 0 = not measured):
/// what it received from its parent, per second of fetching, and what it sent to all its
/// children together, per second during which at least one child was pulling. Both are lower
/// bounds on the link: a pipelined GL receives no faster than its parent sends, and sends no
/// faster than it receives or its children take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LinkRates {
    pub upload_bps: u64,
    pub download_bps: u64,
}

impl LinkRates {
    /// `bytes` moved in `micros` microseconds, as bytes/s (0 when nothing was timed).
    pub fn rate(bytes: u64, micros: u64) -> u64 {
        if micros == 0 {
            0
        } else {
            u64::try_from(u128::from(bytes) * 1_000_000 / u128::from(micros)).unwrap_or(u64::MAX)
        }
    }
}

/// Accumulates one node's sending: bytes handed to children and the time during which at least
/// one child stream was open. Sans-IO: the driver passes the time (microseconds on any clock
/// that only moves forward).
#[derive(Debug, Clone, Default)]
pub struct UploadMeter {
    open: usize,
    busy_since: u64,
    busy_micros: u64,
    bytes: u64,
}

impl UploadMeter {
    pub fn stream_opened(&mut self, now: u64) {
        if self.open == 0 {
            self.busy_since = now;
        }
        self.open += 1;
    }

    pub fn sent(&mut self, bytes: u64) {
        self.bytes += bytes;
    }

    pub fn stream_closed(&mut self, now: u64) {
        self.open = self.open.saturating_sub(1);
        if self.open == 0 {
            self.busy_micros += now.saturating_sub(self.busy_since);
        }
    }

    /// Bytes/s over the busy time so far (streams still open count up to `now`); `None` below
    /// `min_bytes`, where connection set-up and the last chunk's wait say more than the link.
    pub fn rate(&self, now: u64, min_bytes: u64) -> Option<u64> {
        let busy =
            self.busy_micros + if self.open > 0 { now.saturating_sub(self.busy_since) } else { 0 };
        (self.bytes >= min_bytes && busy > 0).then(|| LinkRates::rate(self.bytes, busy))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_meter_counts_busy_time_once_for_overlapping_streams() {
        let mut m = UploadMeter::default();
        assert_eq!(m.rate(10, 0), None);
        m.stream_opened(1_000_000);
        m.stream_opened(1_500_000);
        m.sent(3_000_000);
        m.stream_closed(2_000_000);
        assert_eq!(
            m.rate(2_500_000, 1),
            Some(2_000_000),
            "one busy second and a half so far, counted once"
        );
        m.stream_closed(3_000_000);
        assert_eq!(
            m.rate(9_000_000, 1),
            Some(1_500_000),
            "idle time after the last stream does not count"
        );
        assert_eq!(m.rate(9_000_000, 4_000_000), None, "too few bytes to say");
        m.stream_opened(10_000_000);
        m.sent(1_000_000);
        m.stream_closed(11_000_000);
        assert_eq!(m.rate(12_000_000, 1), Some(1_333_333));
        assert_eq!(LinkRates::rate(5, 0), 0);
    }
}

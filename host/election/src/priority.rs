//! Priority from measured parameters (claim 2 of the seed) and the total order of claims.
//!
//! A node's [`Priority`] is `operator_weight << 16 | measured`, where `measured` is a 16-bit
//! score in `[0, 65535]`:
//!
//! ```text
//! compute     = min(1, cpu_cores * cpu_mhz / 64_000)          (64 GHz-cores saturate)
//! memory      = min(1, free_memory_mib / 65_536)              (64 GiB saturates)
//! disk        = min(1, free_disk_mib / 1_048_576)             (1 TiB saturates)
//! reliability = min(1, uptime_secs / 604_800) * 0.5^recent_failures   (a week of uptime)
//! freshness   = 1 / (1 + content_lag_secs / 3_600)            (an hour behind halves it)
//! members     = min(1, members_known / 256)                   (what a former GL knew)
//! score       = 0.25 compute + 0.10 memory + 0.10 disk + 0.25 reliability
//!             + 0.20 freshness + 0.10 members
//! measured    = round(score * 65535)
//! ```
//!
//! The operator weight (0–255) sits in the high bits, so it dominates every measurement: an
//! operator can always force an order. Claims are compared by [`ClaimKey`]: pre-assigned rank,
//! then the sticky-incumbent flag, then priority, then node id (ties broken by id).

/// A node's identity on the segment, unique within the cluster (configured by the operator).
pub type NodeId = u64;

/// What the agent measured about this server; the inputs of the priority formula.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PriorityInputs {
    pub cpu_cores: u32,
    pub cpu_mhz: u32,
    pub free_memory_mib: u64,
    pub free_disk_mib: u64,
    pub uptime_secs: u64,
    /// Crashes or failed assignments in the recent past (each one halves reliability).
    pub recent_failures: u32,
    /// How far this server's content is behind the newest it knows of (a newcomer is far behind
    /// and should spend its resources catching up, not leading).
    pub content_lag_secs: u64,
    /// Operator preference, dominating all measurements.
    pub operator_weight: u8,
}

/// A claim's strength from measured parameters. Higher is stronger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Priority(pub u32);

impl Priority {
    /// The strongest possible priority.
    pub const MAX: Priority = Priority((255 << 16) | 0xFFFF);

    /// The priority as a fraction of [`Priority::MAX`], in `[0, 1]`.
    pub fn fraction(self) -> f64 {
        f64::from(self.0) / f64::from(Self::MAX.0)
    }
}

fn ratio(value: f64, full: f64) -> f64 {
    (value / full).clamp(0.0, 1.0)
}

impl PriorityInputs {
    /// The priority formula documented at the top of this module. `members_known` is the number
    /// of members this node had registered when it last was group leader (0 if never).
    pub fn priority(&self, members_known: usize) -> Priority {
        let compute = ratio(f64::from(self.cpu_cores) * f64::from(self.cpu_mhz), 64_000.0);
        let memory = ratio(self.free_memory_mib as f64, 65_536.0);
        let disk = ratio(self.free_disk_mib as f64, 1_048_576.0);
        let reliability = ratio(self.uptime_secs as f64, 604_800.0)
            * 0.5f64.powi(self.recent_failures.min(64) as i32);
        let freshness = 1.0 / (1.0 + self.content_lag_secs as f64 / 3_600.0);
        let members = ratio(members_known as f64, 256.0);
        let score = 0.25 * compute
            + 0.10 * memory
            + 0.10 * disk
            + 0.25 * reliability
            + 0.20 * freshness
            + 0.10 * members;
        let measured = (score.clamp(0.0, 1.0) * 65_535.0).round() as u32;
        Priority((u32::from(self.operator_weight) << 16) | measured)
    }
}

/// The strength of a Leader Claim (or of a leader's heartbeat), totally ordered: the larger key
/// wins. Field order is the comparison order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClaimKey {
    /// 0 for a node not on the operator's pre-assigned list; otherwise `255 - position`, so the
    /// first listed leader ranks highest.
    pub rank: u8,
    /// Sticky incumbent: set by a node that is, or very recently was, group leader. It outranks
    /// any priority, so a stronger newcomer does not depose a working leader, and a leader that
    /// was only briefly silent reclaims its role.
    pub incumbent: bool,
    pub priority: Priority,
    pub node: NodeId,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_weight_dominates_measurements() {
        let strong = PriorityInputs {
            cpu_cores: 64,
            cpu_mhz: 4000,
            free_memory_mib: 1 << 20,
            free_disk_mib: 1 << 30,
            uptime_secs: 10_000_000,
            ..Default::default()
        };
        let weighted = PriorityInputs { operator_weight: 1, ..Default::default() };
        assert!(weighted.priority(0) > strong.priority(1000));
        assert!(strong.priority(0).0 <= 0xFFFF);
    }

    #[test]
    fn each_measurement_counts_in_the_right_direction() {
        let base = PriorityInputs {
            cpu_cores: 4,
            cpu_mhz: 2000,
            uptime_secs: 3600,
            content_lag_secs: 60,
            ..Default::default()
        };
        let p = base.priority(0);
        assert!(PriorityInputs { cpu_cores: 8, ..base }.priority(0) > p);
        assert!(PriorityInputs { free_memory_mib: 4096, ..base }.priority(0) > p);
        assert!(PriorityInputs { free_disk_mib: 100_000, ..base }.priority(0) > p);
        assert!(PriorityInputs { uptime_secs: 86_400, ..base }.priority(0) > p);
        assert!(PriorityInputs { recent_failures: 2, ..base }.priority(0) < p);
        assert!(PriorityInputs { content_lag_secs: 86_400, ..base }.priority(0) < p);
        assert!(base.priority(50) > p);
        assert!(Priority::MAX.fraction() == 1.0 && Priority(0).fraction() == 0.0);
    }

    #[test]
    fn claim_keys_order_rank_then_incumbent_then_priority_then_id() {
        let k =
            |rank, incumbent, p, node| ClaimKey { rank, incumbent, priority: Priority(p), node };
        assert!(k(1, false, 0, 0) > k(0, true, 999, 9));
        assert!(k(0, true, 0, 0) > k(0, false, 999, 9));
        assert!(k(0, false, 5, 0) > k(0, false, 4, 9));
        assert!(k(0, false, 5, 2) > k(0, false, 5, 1));
    }
}

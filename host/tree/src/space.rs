//! Free space on a server: what a member measures of its site root's filesystem (`statvfs`)
//! and reports to its GL with its other state ([`crate::member_state::MemberState::space`]),
//! which the GL relays to the manager in its discovery report (`DiscoveryReport::spaces`). The
//! manager compares it with what a run will write on the server before it distributes the run.
//!
//! It is a report from whoever holds the agent token: checked ([`FsSpace::check`]) by the GL and
//! by the manager, and at worst it makes a run skip, wait for, or fail on that server.

use serde::{Deserialize, Serialize};

/// Space and inodes of one filesystem as an unprivileged writer sees them (`f_bavail`,
/// `f_favail`): what the agent may still use. `total_inodes` 0 means the filesystem has no
/// fixed inode count (btrfs, for one), so inodes are never short there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsSpace {
    pub free_bytes: u64,
    pub total_bytes: u64,
    pub free_inodes: u64,
    pub total_inodes: u64,
}

/// Why a space report was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpaceError {
    #[error("space report: {free} free bytes of {total} in all")]
    Bytes { free: u64, total: u64 },
    #[error("space report: {free} free inodes of {total} in all")]
    Inodes { free: u64, total: u64 },
}

impl FsSpace {
    /// Free never above the total (inodes: unless the total is 0, "no fixed count").
    pub fn check(&self) -> Result<(), SpaceError> {
        if self.free_bytes > self.total_bytes {
            return Err(SpaceError::Bytes { free: self.free_bytes, total: self.total_bytes });
        }
        if self.total_inodes != 0 && self.free_inodes > self.total_inodes {
            return Err(SpaceError::Inodes { free: self.free_inodes, total: self.total_inodes });
        }
        Ok(())
    }

    /// Whether `self` differs from `sent` enough to report again before the periodic resend:
    /// by at least 1 % of the filesystem's bytes or inodes. (Any write changes the figures; a
    /// report for each would flood the GL and the manager.)
    pub fn moved_from(&self, sent: &FsSpace) -> bool {
        let step = |total: u64| (total / 100).max(1);
        self.total_bytes != sent.total_bytes
            || self.total_inodes != sent.total_inodes
            || self.free_bytes.abs_diff(sent.free_bytes) >= step(self.total_bytes)
            || self.free_inodes.abs_diff(sent.free_inodes) >= step(self.total_inodes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fs(free_bytes: u64, free_inodes: u64) -> FsSpace {
        FsSpace { free_bytes, total_bytes: 10_000, free_inodes, total_inodes: 1_000 }
    }

    #[test]
    fn free_is_never_above_the_total() {
        assert!(fs(10_000, 1_000).check().is_ok());
        assert!(matches!(fs(10_001, 0).check(), Err(SpaceError::Bytes { .. })));
        assert!(matches!(fs(0, 1_001).check(), Err(SpaceError::Inodes { .. })));
        let no_inode_limit = FsSpace { total_inodes: 0, ..fs(5, 77) };
        assert!(no_inode_limit.check().is_ok());
    }

    #[test]
    fn a_change_of_one_percent_is_reported_again() {
        let sent = fs(5_000, 500);
        assert!(!fs(5_099, 509).moved_from(&sent));
        assert!(fs(5_100, 500).moved_from(&sent));
        assert!(fs(5_000, 490).moved_from(&sent));
        assert!(FsSpace { total_bytes: 20_000, ..sent }.moved_from(&sent));
    }
}

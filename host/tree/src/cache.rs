//! Keeping caches fresh after a commit: what the manager tells a GL to invalidate
//! ([`CacheOrder`], carried in the signed [`Notification`](crate::message::Notification) of a
//! run that changes what is live) and what the GL tells the manager it did ([`CacheReport`]).
//!
//! The path list is part of the notification, so the manager's signature covers it: a GL
//! invalidates only what the manager said changed, never a list a relay made up.

use serde::{Deserialize, Serialize};

/// Most cache outcomes one [`CacheReport`] may carry (one per configured cache).
pub const MAX_CACHES_PER_REPORT: usize = 32;
/// Longest summary of one cache call a report may carry (bytes).
pub const MAX_SUMMARY: usize = 512;

/// What a run that changes the live release asks of the caches in front of its servers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheOrder {
    /// The hosted site whose live content changed.
    pub site: String,
    /// The release live before the run (`None`: nothing was live).
    pub from: Option<u64>,
    /// The release the run makes live.
    pub to: u64,
    pub change: CacheChange,
}

/// Which URLs changed, or that the whole site must go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum CacheChange {
    /// URL paths (`/`-prefixed, percent-encoded) whose content changed or appeared
    /// (`changed`: worth warming) and that are gone (`removed`).
    Paths { changed: Vec<String>, removed: Vec<String> },
    /// Drop everything cached for the site: the paths are unknown (a snapshot is no longer
    /// kept) or more than the site's `cache_max_paths`. `reason` says which.
    Site { reason: String },
}

impl CacheOrder {
    /// One line for logs and the history: "37 paths (3 removed)" or "the whole site (why)".
    pub fn describe(&self) -> String {
        match &self.change {
            CacheChange::Paths { changed, removed } => {
                format!("{} paths ({} removed)", changed.len() + removed.len(), removed.len())
            }
            CacheChange::Site { reason } => format!("the whole site ({reason})"),
        }
    }
}

/// What one cache did with a run's [`CacheOrder`], as the GL reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheOutcome {
    /// The cache-invalidator plugin's name in the GL's store.
    pub cache: String,
    /// Every call it needed succeeded (warming aside).
    pub ok: bool,
    /// Words for the history: "purged 37 paths in 1 batch", "failed after 3 attempts: …".
    pub summary: String,
}

/// A GL's report of its segment's cache calls for one run
/// (`POST /api/v1/runs/{run}/caches`, agent credentials).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheReport {
    pub segment: String,
    pub leader: String,
    pub caches: Vec<CacheOutcome>,
}

/// Why a [`CacheReport`] is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CacheReportError {
    #[error("a cache report carries at most {MAX_CACHES_PER_REPORT} caches, this one {0}")]
    TooMany(usize),
    #[error("cache name `{0}` is not 1 to 64 of [a-z0-9_-]")]
    BadName(String),
    #[error("the summary of cache `{cache}` is {len} bytes; at most {MAX_SUMMARY}")]
    LongSummary { cache: String, len: usize },
}

impl CacheReport {
    /// Checks what the manager will write into its history: bounded, plain names, summaries
    /// of bounded length without control characters.
    pub fn check(&self) -> Result<(), CacheReportError> {
        if self.caches.len() > MAX_CACHES_PER_REPORT {
            return Err(CacheReportError::TooMany(self.caches.len()));
        }
        for c in &self.caches {
            let plain =
                |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_';
            if c.cache.is_empty() || c.cache.len() > 64 || !c.cache.bytes().all(plain) {
                return Err(CacheReportError::BadName(c.cache.chars().take(80).collect()));
            }
            if c.summary.len() > MAX_SUMMARY {
                return Err(CacheReportError::LongSummary {
                    cache: c.cache.clone(),
                    len: c.summary.len(),
                });
            }
        }
        Ok(())
    }
}

/// `summary` with control characters replaced (a history line stays one line).
pub fn one_line(summary: &str) -> String {
    summary.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(cache: &str, summary: &str) -> CacheReport {
        CacheReport {
            segment: "s".into(),
            leader: "l".into(),
            caches: vec![CacheOutcome { cache: cache.into(), ok: true, summary: summary.into() }],
        }
    }

    #[test]
    fn reports_are_bounded_and_named_plainly() {
        assert_eq!(report("varnish", "purged 3 paths").check(), Ok(()));
        assert!(matches!(report("Var nish", "x").check(), Err(CacheReportError::BadName(_))));
        assert!(matches!(report("", "x").check(), Err(CacheReportError::BadName(_))));
        let long = "x".repeat(MAX_SUMMARY + 1);
        assert!(matches!(report("v", &long).check(), Err(CacheReportError::LongSummary { .. })));
        let mut many = report("v", "x");
        many.caches = vec![many.caches[0].clone(); MAX_CACHES_PER_REPORT + 1];
        assert!(matches!(many.check(), Err(CacheReportError::TooMany(_))));
        assert_eq!(one_line("a\nb\rc"), "a b c");
    }

    #[test]
    fn an_order_describes_itself() {
        let o = CacheOrder {
            site: "www".into(),
            from: Some(1),
            to: 2,
            change: CacheChange::Paths { changed: vec!["/a".into()], removed: vec!["/b".into()] },
        };
        assert_eq!(o.describe(), "2 paths (1 removed)");
        let json = serde_json::to_value(&o).unwrap();
        assert_eq!(json["change"]["kind"], "paths");
    }
}

//! The Content Control Manager (CCM): what only the manager does. The tree's transfers, messages
//! and HTTP/TLS plumbing it shares with the group leaders are `cm-tree`'s.
//!
//! Pure decision logic lives in small modules with no IO, testable on their own:
//! [`scheduler`] (which due jobs start, which conflict), [`policy`] (quorum, what a failure does to
//! a job) and [`tree`] (the dynamic distribution tree of seed Fig. 7, re-parenting around dead
//! leaders; its shape from the GLs' measured links).
//!
//! The IO around them: [`db`] (redb or PostgreSQL), [`replica`] (several replicas on
//! PostgreSQL, one active), [`prepare`] (payload → assignment file, snapshots),
//! [`server`] (the manager: scheduler loop and runs), `api` (its HTTP routes), `runs` and
//! `discovery` (a run's steps; segments and the GLs' reports), [`checkpoint`] (a site's
//! checkpoints and their restore), `unchanged` (a recurring publish whose staging did not
//! change makes no release), [`ca`] (the cluster's certificate authority, `cmover cert`) and
//! [`metrics`] (Prometheus counters). [`names`]: the one rule for names from outside (sites,
//! groups, segments, servers); [`validate`]: what an operator writes, checked before it is
//! stored; [`writes`]: the operator's writes, shared by the API and the console; [`events`]: the
//! event bus and its Server-Sent Events; `console`: the browser console on the manager's port.
//! [`golive`]: rolling and canary switches through a load-balancer plugin, health checks, and
//! rotation following health.
//! After a commit: [`live_change`] (what changed, the caches' signed order), `cache_report`
//! (the GLs' cache outcomes into the history) and [`search_refresh`] (IndexNow, sitemap ping).
//! [`space`]: each server's free space against what a run will write there, checked before it
//! distributes.

pub mod abort;
mod api;
pub mod ca;
mod cache_report;
pub mod checkpoint;
mod console;
pub mod db;
mod discovery;
pub mod events;
pub mod filter;
pub mod fleet;
pub mod golive;
pub mod hot;
pub mod live_change;
pub mod metrics;
pub mod model;
pub mod names;
pub mod policy;
pub mod prepare;
mod remove;
pub mod replica;
mod runs;
pub mod scheduler;
pub mod search_refresh;
pub mod server;
pub mod space;
pub mod sync;
pub mod tree;
mod unchanged;
pub mod validate;
mod versions_api;
pub mod writes;

/// Milliseconds since the Unix epoch: the manager's one notion of wall-clock time. Pure logic
/// takes `now_ms` as an argument; only the IO edges call this.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch as `YYYY-MM-DD HH:MM:SS` (UTC): the one way the console
/// and the operator CLI print a time.
pub fn utc_time(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

//! The Content Control Manager (CCM): what only the manager does. The tree's transfers, messages
//! and HTTP/TLS plumbing it shares with the group leaders are `cm-tree`'s.
//!
//! Pure decision logic lives in small modules with no IO, testable on their own:
//! [`scheduler`] (which due jobs start, which conflict), [`policy`] (quorum, what a failure does to
//! a job) and [`tree`] (the dynamic distribution tree of seed Fig. 7, re-parenting around dead
//! leaders; its shape from the GLs' measured links).
//!
//! The IO around them: [`db`] (redb), [`prepare`] (payload → assignment file, snapshots),
//! [`server`] (the manager: scheduler loop and runs), `api` (its HTTP routes), `runs` and
//! `discovery` (a run's steps; segments and the GLs' reports), [`checkpoint`] (a site's
//! checkpoints and their restore), `unchanged` (a recurring publish whose staging did not
//! change makes no release), [`ca`] (the cluster's certificate authority, `cmover cert`) and
//! [`metrics`] (Prometheus counters). [`names`]: the one rule for names from outside (sites,
//! groups, segments, servers); [`validate`]: what an operator writes, checked before it is
//! stored; [`writes`]: the operator's writes, shared by the API and the console; [`events`]: the
//! event bus and its Server-Sent Events; `console`: the browser console on the manager's port.

pub mod abort;
mod api;
pub mod ca;
pub mod checkpoint;
mod console;
pub mod db;
mod discovery;
pub mod events;
pub mod filter;
pub mod metrics;
pub mod model;
pub mod names;
pub mod policy;
pub mod prepare;
mod remove;
mod runs;
pub mod scheduler;
pub mod server;
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

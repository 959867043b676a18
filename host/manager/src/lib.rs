//! The Content Control Manager (CCM) and the store-and-forward tree of group leaders.
//!
//! Pure decision logic lives in small modules with no IO, testable on their own:
//! [`scheduler`] (which due jobs start, which conflict), [`policy`] (quorum, what a failure does to
//! a job), [`tree`] (the dynamic distribution tree of seed Fig. 7, re-parenting around dead
//! leaders) and [`manifest`] (per-chunk BLAKE3 of an assignment so every hop verifies before it
//! forwards).
//!
//! The IO around them: [`db`] (redb), [`http`] (hyper plumbing, roles from bearer tokens or
//! client certificates), [`tls`] (mutual TLS and the cluster CA), [`blob`]
//! (an assignment file served while it still arrives), [`forward`] (one forwarding slot of a tree
//! node), [`server`] (the manager: scheduler loop and runs), `api` (its HTTP routes) and [`leader`]
//! (a group leader's side of the tree: fetch with resume, forward, deliver, report).

mod api;
pub mod blob;
pub mod cluster;
pub mod db;
mod discovery;
pub mod forward;
pub mod http;
pub mod leader;
pub mod manifest;
pub mod model;
pub mod policy;
pub mod prepare;
mod runs;
pub mod scheduler;
pub mod server;
pub mod tls;
pub mod tree;

/// Milliseconds since the Unix epoch: the manager's one notion of wall-clock time. Pure logic
/// takes `now_ms` as an argument; only the IO edges call this.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

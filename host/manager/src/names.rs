//! The one rule for names that come in from outside (sites, content groups, segments, servers).
//! It lives in `cm_assignment::names` so the assignment header's site field and the agent's
//! configuration are checked by the same rule; re-exported here for the manager's callers.

pub use cm_assignment::names::{MAX_NAME, NameError, check_name};

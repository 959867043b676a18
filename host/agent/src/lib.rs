//! Tokio drivers that put the sans-IO protocol cores on real sockets, and the server agent
//! (`cmover agent`) with its status port. Everything here is thin: protocol decisions live in the
//! cores, the distribution tree's group-leader node in `cm-tree`.

pub mod caches;
pub mod election;
pub mod launch;
pub mod leader;
pub mod mctp;
pub mod metrics;
pub mod node;
pub mod status;
pub mod words;

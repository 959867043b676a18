//! Tokio drivers that put the sans-IO protocol cores on real sockets, and the server agent
//! (`cmover agent`). Everything here is thin: protocol decisions live in the cores.

pub mod election;
pub mod launch;
pub mod leader;
pub mod mctp;
pub mod mctp_hash;
pub mod node;

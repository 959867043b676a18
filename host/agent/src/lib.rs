//! Tokio drivers that put the sans-IO protocol cores on real sockets, and the server agent (`cmover agent`).

//! Tokio driver for `cm-election` over real UDP multicast.

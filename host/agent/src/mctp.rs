//! Tokio driver for `cm-mctp` over real UDP multicast.

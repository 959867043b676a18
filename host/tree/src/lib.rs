//! The store-and-forward distribution tree (seed Figs. 6 and 7) as both of its kinds of node run
//! it: the manager at the root and every group leader (GL) below it. The manager decides the
//! shape (`cm_manager::tree`); this crate moves the bytes and carries the messages.
//!
//! - [`manifest`]: an assignment's size, BLAKE3 and per-chunk BLAKE3, so every hop verifies
//!   before it forwards. [`message`]: what the nodes tell each other (JSON over HTTP).
//!   [`link`]: the link rates a GL measures (sans-IO).
//! - [`blob`]: an assignment served while it still arrives (verified prefix only, `Range`
//!   resume, a window of recent chunks in memory) and fetched from a parent.
//!   [`forward`]: one forwarding slot ("whom next?" until the null address).
//! - [`leader`]: a GL's node — notify, fetch, forward, hand to the segment ([`leader::LocalDelivery`]),
//!   report.
//! - [`http`] (hyper accept loop, JSON client, roles) and [`tls`] (a node's rustls identity and
//!   the role its certificate names): the plumbing both the manager and a GL need.
//! - [`metrics`]: the tree's Prometheus counters and the `/metrics` exposition.
//! - [`cache`]: the manager's signed cache order for a run that changes what is live, and the
//!   GL's report of its segment's cache calls.
//! - [`space`]: a server's free space and inodes, reported with its member state.
//! - [`managers`]: the one follower of the active manager replica every manager call goes through.
//!
//! A GL (the agent) depends on this crate and not on the manager's.

use std::future::Future;
use std::pin::Pin;

pub mod abort;
pub mod blob;
pub mod cache;
pub mod forward;
pub mod http;
pub mod leader;
pub mod link;
pub mod managers;
pub mod manifest;
pub mod member_state;
pub mod message;
pub mod metrics;
pub mod space;
pub mod targets;
pub mod tls;

/// A boxed future, for the tree's object-safe traits (`ChildSource`, `LocalDelivery`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

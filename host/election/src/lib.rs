//! Sans-IO group-leader election and registration for one LAN segment (seed Fig. 5).
//!
//! No sockets, no clocks, no tokio: inputs are `(now, from, datagram)` and timer expiries,
//! outputs are datagrams ([`Election::poll_transmit`]), the next timer
//! ([`Election::poll_timeout`]) and events ([`Election::poll_event`]). Randomness comes from a
//! seed given to [`Election::new`]. The protocol, message layouts, priority formula and timing
//! bounds are written up in `docs/election.md`.
//!
//! - [`machine`]: the five-state machine, registration, member liveness, channel moves.
//! - [`priority`]: the priority formula and the order of claims.
//! - [`wire`]: the authenticated datagram codec; [`replay`]: replay windows.
//! - [`restart`]: what a node carries across restarts (incarnation, control channel, windows).
//! - `sim` (feature `sim`): the deterministic network simulator used by the tests and benches;
//!   release binaries do not carry it.
//!
//! Time and outgoing datagrams are the shared sans-IO kit's ([`cm_sansio`]): the driver passes
//! an [`Instant`] in and sends each [`Transmit`] to its [`Dest`] (`Group` is the current control
//! channel, `Channel` an earlier one after a move). They are re-exported here.

pub mod config;
pub mod machine;
pub mod priority;
pub mod replay;
pub mod restart;
#[cfg(feature = "sim")]
pub mod sim;
pub mod wire;

pub use cm_sansio::{Dest, Instant, Transmit};
pub use config::{Config, ConfigError, DataChannelPool, Eligibility, Registration, Timing};
pub use machine::{Election, Event, LeaveReason, Member, RequestError, State, Stats};
pub use priority::{ClaimKey, NodeId, Priority, PriorityInputs};
pub use replay::ReplayRecord;
pub use restart::{RestartState, RestartStateError, Save, next_incarnation, recent_failures};
pub use wire::DropReason;

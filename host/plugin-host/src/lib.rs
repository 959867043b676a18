//! The sandboxed WebAssembly plugin runtime: wasmtime components, the host side of the WIT
//! interfaces (`wit/`), the plugin store and hot swap.
//!
//! `cm-site` drives the interpreter through [`Command`] batches; payload bytes stream from a
//! [`PayloadReader`] and never enter the guest in one piece.

mod command;
mod error;

pub use command::{Command, CommandReport, DeltaOp, MemoryPayload, PayloadReader};
pub use error::{FailureCause, InstallError, PluginError};

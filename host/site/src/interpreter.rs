//! The interpreter a site applies commands through: the calls of the WIT `content-interpreter`
//! world, as a trait. The WebAssembly interpreter plugin (`cm-plugin-host` implements this
//! trait for its interpreter handle) and [`NativeInterpreter`](crate::NativeInterpreter) are
//! its two implementations; cm-site itself knows neither wasmtime nor the plugin host.
//!
//! A command that fails is reported in its [`CommandReport`] (the site then discards the
//! release); an [`InterpreterError`] is a failure of the call as a whole.

use std::error::Error;
use std::path::Path;

use cm_assignment::StreamedCommand;

/// What cm-site needs from an interpreter.
pub trait Interpreter {
    /// Applies one batch of commands to the staging tree at `staging_root`; one report per
    /// command, in order.
    fn apply(
        &mut self,
        staging_root: &Path,
        batch: Vec<StreamedCommand>,
    ) -> Result<Vec<CommandReport>, InterpreterError>;
    /// Release `serial` is about to go live; an error vetoes the commit.
    fn commit(&mut self, serial: u64) -> Result<(), InterpreterError>;
    /// Release `serial` is being abandoned or rolled back from.
    fn rollback(&mut self, serial: u64) -> Result<(), InterpreterError>;
}

/// The outcome of one command of a batch, as the interpreter reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandReport {
    /// Index of the command in its batch.
    pub index: u32,
    /// `Err` holds the interpreter's message naming the path and the cause.
    pub outcome: Result<(), String>,
}

/// Why a call into an interpreter failed as a whole.
#[derive(Debug, thiserror::Error)]
pub enum InterpreterError {
    /// The interpreter's own error, typed by its implementation (for the plugin, a
    /// `cm_plugin_host::PluginError`: not installed, site not granted, trapped, out of time or
    /// memory, a hook's veto); `downcast_ref` recovers it.
    #[error(transparent)]
    Failed(Box<dyn Error + Send + Sync + 'static>),
    /// The interpreter answered a batch with a different number of reports.
    #[error("{got} reports for {expected} commands")]
    BadReports { expected: usize, got: usize },
}

impl InterpreterError {
    /// Wraps an implementation's error.
    pub fn failed(e: impl Error + Send + Sync + 'static) -> Self {
        InterpreterError::Failed(Box::new(e))
    }

    /// The implementation's error, when it is an `E`.
    pub fn downcast_ref<E: Error + 'static>(&self) -> Option<&E> {
        match self {
            InterpreterError::Failed(e) => e.downcast_ref(),
            InterpreterError::BadReports { .. } => None,
        }
    }
}

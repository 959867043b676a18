//! The native interpreter: executes commands with the reference semantics of
//! `cm_assignment::reference`, in this process. It is what the tests compare the WebAssembly
//! interpreter plugin against, and what `cmover` uses when no interpreter plugin is installed
//! for a site (`--native`).

use std::path::Path;

use cm_assignment::{Command, StreamedCommand, reference};

use crate::{CommandReport, Interpreter, InterpreterError};

/// Runs commands natively (no sandbox).
#[derive(Debug, Default)]
pub struct NativeInterpreter;

impl Interpreter for NativeInterpreter {
    fn apply(
        &mut self,
        staging_root: &Path,
        batch: Vec<StreamedCommand>,
    ) -> Result<Vec<CommandReport>, InterpreterError> {
        Ok(batch
            .into_iter()
            .enumerate()
            .map(|(i, cmd)| {
                let outcome = run(staging_root, cmd).map_err(|(path, e)| format!("{path}: {e}"));
                CommandReport { index: i as u32, outcome }
            })
            .collect())
    }

    fn commit(&mut self, _serial: u64) -> Result<(), InterpreterError> {
        Ok(())
    }

    fn rollback(&mut self, _serial: u64) -> Result<(), InterpreterError> {
        Ok(())
    }
}

fn run(root: &Path, cmd: StreamedCommand) -> Result<(), (String, reference::ApplyError)> {
    let path = cmd.path().to_owned();
    let r = match cmd {
        Command::MakeDir { path, mode } => reference::make_dir(root, &path, mode),
        Command::WriteFile { path, mode, mtime, mut payload, .. } => {
            let len = payload.size();
            reference::write_file(root, &path, mode, mtime, &mut payload, len, None)
        }
        Command::ApplyDelta { path, base, mode, mtime, ops, mut payload, .. } => {
            reference::apply_delta(root, &path, &base, mode, mtime, &ops, &mut payload, None)
        }
        Command::Remove { path, recursive } => reference::remove(root, &path, recursive),
        Command::Rename { from, to } => reference::rename(root, &from, &to),
        Command::Symlink { path, target } => reference::make_symlink(root, &path, &target),
        Command::SetMode { path, mode } => reference::set_mode(root, &path, mode),
    };
    r.map_err(|e| (path, e))
}

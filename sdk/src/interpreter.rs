//! The interpreter world's short route: implement [`Interpreter`] (every method has a useful
//! default) and export it with [`interpreter!`](crate::interpreter).

pub use crate::bindings::contentmover::plugin::payload::DataSource;
pub use crate::bindings::contentmover::plugin::staging;
pub use crate::bindings::exports::contentmover::plugin::content_interpreter::{
    ApplyDelta, Command, CommandReport, CopyRange, DeltaOp, MakeDir, Remove, Rename, SetMode,
    Symlink, WriteFile,
};

/// A content interpreter. The defaults carry out every command with [`execute`] and accept
/// every commit and rollback, so `impl Interpreter for MyPlugin {}` is already a working
/// interpreter; override what your site kind needs.
pub trait Interpreter {
    /// Carry out one command on the staging tree. `Err` is reported for this command only;
    /// the batch goes on.
    fn command(command: Command) -> Result<(), String> {
        execute(command)
    }

    /// The release `serial` is about to go live; `Err` vetoes the commit.
    fn commit(_serial: u64) -> Result<(), String> {
        Ok(())
    }

    /// The release `serial` is being abandoned or rolled back from.
    fn rollback(_serial: u64) -> Result<(), String> {
        Ok(())
    }

    /// Run at install and hot swap; `Err` keeps the previous version installed.
    fn self_check() -> Result<(), String> {
        Ok(())
    }
}

/// Apply `commands` one by one with `I::command`, one report per command.
pub fn apply_each<I: Interpreter>(commands: Vec<Command>) -> Vec<CommandReport> {
    commands
        .into_iter()
        .enumerate()
        .map(|(index, command)| CommandReport { index: index as u32, outcome: I::command(command) })
        .collect()
}

/// Carry out one command on the staging tree the standard way: payload and delta bytes are
/// copied host-side, every written file is a fresh inode renamed into place.
pub fn execute(command: Command) -> Result<(), String> {
    match command {
        Command::MakeDir(c) => staging::make_dir(&c.path, c.mode).map_err(message),
        Command::WriteFile(c) => {
            let writer = staging::create_file(&c.path).map_err(message)?;
            writer.copy_from_source(&c.data, c.data.size()).map_err(message)?;
            staging::FileWriter::finish(writer, c.mode, c.mtime).map(drop).map_err(message)
        }
        Command::ApplyDelta(c) => {
            let base = staging::open_file(&c.base).map_err(message)?;
            let writer = staging::create_file(&c.path).map_err(message)?;
            for op in &c.ops {
                match op {
                    DeltaOp::Copy(range) => writer.copy_from_file(&base, range.offset, range.len),
                    DeltaOp::Insert(len) => writer.copy_from_source(&c.data, *len),
                }
                .map_err(message)?;
            }
            staging::FileWriter::finish(writer, c.mode, c.mtime).map(drop).map_err(message)
        }
        Command::Remove(c) => staging::remove(&c.path, c.recursive).map_err(message),
        Command::Rename(c) => staging::rename(&c.from, &c.to).map_err(message),
        Command::Symlink(c) => staging::symlink(&c.path, &c.target).map_err(message),
        Command::SetMode(c) => staging::set_mode(&c.path, c.mode).map_err(message),
    }
}

/// A one-line description of a command (for logs and audits).
pub fn describe(command: &Command) -> String {
    match command {
        Command::MakeDir(c) => format!("make-dir {} {:o}", c.path, c.mode),
        Command::WriteFile(c) => {
            format!("write-file {} {:o} mtime={} {} bytes", c.path, c.mode, c.mtime, c.data.size())
        }
        Command::ApplyDelta(c) => format!(
            "apply-delta {} base={} {:o} mtime={} {} ops {} bytes",
            c.path,
            c.base,
            c.mode,
            c.mtime,
            c.ops.len(),
            c.data.size()
        ),
        Command::Remove(c) => format!("remove {} recursive={}", c.path, c.recursive),
        Command::Rename(c) => format!("rename {} -> {}", c.from, c.to),
        Command::Symlink(c) => format!("symlink {} -> {}", c.path, c.target),
        Command::SetMode(c) => format!("set-mode {} {:o}", c.path, c.mode),
    }
}

/// The host's staging message (it already names the path and the cause).
fn message(error: staging::Error) -> String {
    error.message
}

/// Export a type implementing [`Interpreter`] as the plugin's `content-interpreter` (every
/// call first installs the panic hook).
#[macro_export]
macro_rules! interpreter {
    ($plugin:ident) => {
        impl $crate::bindings::exports::contentmover::plugin::content_interpreter::Guest for $plugin {
            fn apply(commands: ::std::vec::Vec<$crate::Command>) -> ::std::vec::Vec<$crate::CommandReport> {
                $crate::install_panic_hook();
                $crate::apply_each::<$plugin>(commands)
            }
            fn commit(serial: u64) -> ::std::result::Result<(), ::std::string::String> {
                $crate::install_panic_hook();
                <$plugin as $crate::Interpreter>::commit(serial)
            }
            fn rollback(serial: u64) -> ::std::result::Result<(), ::std::string::String> {
                $crate::install_panic_hook();
                <$plugin as $crate::Interpreter>::rollback(serial)
            }
            fn self_check() -> ::std::result::Result<(), ::std::string::String> {
                $crate::install_panic_hook();
                <$plugin as $crate::Interpreter>::self_check()
            }
        }
        $crate::bindings::export_interpreter!($plugin with_types_in $crate::bindings);
    };
}

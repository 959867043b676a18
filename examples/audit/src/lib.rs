//! An interpreter plugin that records every command it sees in the host's log, then carries
//! it out the standard way. A whole plugin in a dozen lines.

use cm_plugin_sdk::{Command, Interpreter, describe, execute, log};

struct Audit;

impl Interpreter for Audit {
    fn command(command: Command) -> Result<(), String> {
        let line = describe(&command);
        let outcome = execute(command);
        log::write(log::Level::Info, &format!("audit: {line}: {outcome:?}"));
        outcome
    }

    fn commit(serial: u64) -> Result<(), String> {
        log::write(log::Level::Info, &format!("audit: commit {serial}"));
        Ok(())
    }
}

cm_plugin_sdk::interpreter!(Audit);

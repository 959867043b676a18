//! Test plugin for hot swap: a normal interpreter that also writes `.answered-by` holding
//! its version into the staging tree after every batch, so a test can tell which version
//! answered each call. Built twice: version 1, and version 2 with the `v2` feature.

use cm_plugin_sdk::{Command, CommandReport, Interpreter, staging};

const VERSION: &[u8] = if cfg!(feature = "v2") { b"2" } else { b"1" };

struct Swap;

impl Interpreter for Swap {}

impl cm_plugin_sdk::bindings::exports::contentmover::plugin::content_interpreter::Guest for Swap {
    fn apply(commands: Vec<Command>) -> Vec<CommandReport> {
        let reports = cm_plugin_sdk::apply_each::<Swap>(commands);
        let signed = staging::create_file(".answered-by").and_then(|writer| {
            writer.write(VERSION)?;
            staging::FileWriter::finish(writer, 0o644, 0)
        });
        if let Err(e) = signed {
            panic!("test-swap could not sign its batch: {}", e.message);
        }
        reports
    }
    fn commit(serial: u64) -> Result<(), String> {
        <Swap as Interpreter>::commit(serial)
    }
    fn rollback(serial: u64) -> Result<(), String> {
        <Swap as Interpreter>::rollback(serial)
    }
    fn self_check() -> Result<(), String> {
        Ok(())
    }
}

cm_plugin_sdk::bindings::export_interpreter!(Swap with_types_in cm_plugin_sdk::bindings);

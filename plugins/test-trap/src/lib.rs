//! Test plugin: passes its self-check, then traps (a Rust panic is a wasm `unreachable`) on
//! every batch, so the host's trap handling can be tested.

use cm_plugin_sdk::{Command, Interpreter};

struct Trap;

impl Interpreter for Trap {
    fn command(command: Command) -> Result<(), String> {
        panic!("test-trap refuses {}", cm_plugin_sdk::describe(&command));
    }
}

cm_plugin_sdk::interpreter!(Trap);

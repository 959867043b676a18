//! Test plugin: reads the manifest's `[config]` through the `config` interface. Every command
//! logs `config <key>=<value>` for each entry; with `refuse` set, every command fails with
//! that value as its message; otherwise it is carried out. With `fail-self-check` set, the
//! self-check fails with that value.

use cm_plugin_sdk::{Command, Interpreter, config, log};

struct ConfigEcho;

impl Interpreter for ConfigEcho {
    fn command(command: Command) -> Result<(), String> {
        for (key, value) in config::entries() {
            log::write(log::Level::Info, &format!("config {key}={value}"));
        }
        if let Some(why) = config::get("refuse") {
            return Err(format!("refused by config: {why}"));
        }
        cm_plugin_sdk::execute(command)
    }

    fn self_check() -> Result<(), String> {
        match config::get("fail-self-check") {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }
}

cm_plugin_sdk::interpreter!(ConfigEcho);

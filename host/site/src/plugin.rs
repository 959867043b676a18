//! The interpreter plugin as a site's [`Interpreter`]: each batch goes to the plugin's current
//! version through `cm-plugin-host` (a fresh sandboxed instance per call, with the manifest's
//! deadline and memory cap, confined to the staging tree by its capability).

use std::path::Path;

use cm_plugin_host::{Command, CommandReport, PluginError};

use crate::Interpreter;

impl Interpreter for cm_plugin_host::Interpreter {
    fn apply(
        &mut self,
        staging_root: &Path,
        batch: Vec<Command>,
    ) -> Result<Vec<CommandReport>, PluginError> {
        cm_plugin_host::Interpreter::apply(self, staging_root, batch)
    }

    fn commit(&mut self, serial: u64) -> Result<(), PluginError> {
        cm_plugin_host::Interpreter::commit(self, serial)
    }

    fn rollback(&mut self, serial: u64) -> Result<(), PluginError> {
        cm_plugin_host::Interpreter::rollback(self, serial)
    }
}

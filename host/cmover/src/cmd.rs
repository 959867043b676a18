//! One module per subcommand group. Each exposes its clap arguments and an async `run`.

pub mod agent;
pub mod assignment;
pub mod cert;
pub mod checkpoint;
pub mod demo;
pub mod manager;
pub mod mctp;
pub mod ops;
pub mod plugin;
pub mod run;
pub mod site;

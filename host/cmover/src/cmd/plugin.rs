//! `cmover plugin ...`: the plugin store (install with hot swap, list, inspect, remove,
//! rollback).

use std::path::PathBuf;

use anyhow::Context;
use cm_plugin_host::{PluginManifest, PluginRuntime, PluginStore, RuntimeConfig};

#[derive(clap::Args)]
pub struct StoreArgs {
    /// The plugin store directory.
    #[arg(long, default_value = "/var/lib/cmover/plugins")]
    store: PathBuf,
}

#[derive(clap::Subcommand)]
pub enum Command {
    /// Install a component under its manifest's name; replaces (hot-swaps) an installed
    /// version only if the new one validates and passes its self-check.
    Install {
        /// The component (.wasm).
        file: PathBuf,
        /// The operator's manifest (TOML): name, world, limits, grants.
        #[arg(long)]
        manifest: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List installed plugins: name, world, version, size, earlier versions.
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Describe a component file: world, imports, exports, size, hash.
    Inspect { file: PathBuf },
    /// Uninstall a plugin.
    Remove {
        name: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Restore the version installed before the current one.
    Rollback {
        name: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

fn open(store: &StoreArgs) -> anyhow::Result<PluginStore> {
    let config = RuntimeConfig {
        compiled_cache: Some(PluginStore::compiled_cache_dir(&store.store)),
        ..Default::default()
    };
    let runtime = PluginRuntime::new(config)?;
    Ok(PluginStore::open(runtime, &store.store)?)
}

pub async fn run(command: Command) -> anyhow::Result<()> {
    // Plugin calls compile and run WebAssembly synchronously: keep them off the async threads.
    tokio::task::spawn_blocking(move || run_blocking(command)).await?
}

fn run_blocking(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Install { file, manifest, store } => {
            let manifest = PluginManifest::load(&manifest)?;
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let installed = open(&store)?.install(&bytes, manifest, &file.display().to_string())?;
            match installed.replaced {
                Some(old) => println!(
                    "{} ({}): {} replaces {old}",
                    installed.name, installed.world, installed.version
                ),
                None => println!(
                    "{} ({}): {} installed",
                    installed.name, installed.world, installed.version
                ),
            }
        }
        Command::List { store } => {
            // Listing reads only: a store that does not exist has nothing installed, and is not
            // created by looking.
            if !store.store.is_dir() {
                println!("no plugins installed (no store at {})", store.store.display());
                return Ok(());
            }
            println!("{:<20} {:<18} {:<12} {:>9}  previous", "name", "world", "version", "bytes");
            for p in open(&store)?.list() {
                println!(
                    "{:<20} {:<18} {:<12} {:>9}  {}",
                    p.name,
                    p.world.name(),
                    p.version,
                    p.size,
                    p.previous.join(" ")
                );
            }
        }
        Command::Inspect { file } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let runtime = PluginRuntime::new(RuntimeConfig::default())?;
            let info = cm_plugin_host::inspect(&runtime, &bytes, &file.display().to_string())?;
            println!("file:    {}", file.display());
            println!("world:   {}", info.world.map_or("(none)", |w| w.name()));
            println!("size:    {} bytes", info.size);
            println!("blake3:  {}", info.blake3);
            println!("imports: {}", info.imports.join(", "));
            println!("exports: {}", info.exports.join(", "));
            if let Some(problem) = info.problem {
                println!("problem: {problem}");
            }
        }
        Command::Remove { name, store } => {
            open(&store)?.remove(&name)?;
            println!("{name}: removed");
        }
        Command::Rollback { name, store } => {
            let restored = open(&store)?.rollback(&name)?;
            println!(
                "{}: rolled back to {} (was {})",
                restored.name,
                restored.version,
                restored.replaced.unwrap_or_default()
            );
        }
    }
    Ok(())
}

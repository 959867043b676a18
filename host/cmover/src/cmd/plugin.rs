//! `cmover plugin ...`: the author's tools (`new`, `build`, `test`: `plugin/new.rs`,
//! `plugin/build.rs`, `plugin/trial.rs`) and the plugin store (install with hot swap, list,
//! inspect, remove, rollback).
//!
//! The store commands use the agent's store unless `--store` names another: the one its
//! settings file (`--agent-config`, by default the packaged `/etc/cmover/agent.toml` when it
//! exists) names, else `<data_dir>/plugins`, exactly as the agent resolves it. An interpreter
//! installed under the name a site of the agent applies with (`plugin` in its `[site]` entry,
//! `interpreter` by default) must be granted that site.

mod build;
mod fleet;
mod new;
mod trial;

use std::path::{Path, PathBuf};

use anyhow::Context;
use cm_plugin_host::{PluginManifest, PluginRuntime, PluginStore, RuntimeConfig, World};

/// The agent settings file the packaged service uses.
const AGENT_CONFIG: &str = "/etc/cmover/agent.toml";

#[derive(clap::Args)]
pub struct StoreArgs {
    /// The plugin store directory. Default: the agent's (`[plugins] store` of its settings,
    /// else `<[node] data_dir>/plugins`).
    #[arg(long)]
    store: Option<PathBuf>,
    /// The agent's settings file, for its store and its site. Default: /etc/cmover/agent.toml
    /// if it exists.
    #[arg(long)]
    agent_config: Option<PathBuf>,
}

impl StoreArgs {
    /// The store directory and the agent's plugin requirements.
    fn resolve(&self) -> anyhow::Result<(PathBuf, super::agent::AgentPlugins)> {
        let config = self
            .agent_config
            .clone()
            .or_else(|| Path::new(AGENT_CONFIG).is_file().then(|| AGENT_CONFIG.into()));
        let agent = super::agent::agent_plugins(config.as_ref())?;
        Ok((self.store.clone().unwrap_or_else(|| agent.store.clone()), agent))
    }
}

#[derive(clap::Subcommand)]
pub enum Command {
    /// Start a plugin: a crate in ./NAME with the SDK, a manifest template and a test.
    New {
        /// The plugin's name (crate, component and installed name): [a-z0-9-].
        name: String,
        /// interpreter, cache-invalidator or load-balancer.
        #[arg(long, default_value = "interpreter")]
        world: String,
        /// Where the SDK comes from: a version (default: this binary's), git=URL[#REV], or
        /// path=DIR (a checkout of this repository's `sdk/`).
        #[arg(long)]
        sdk: Option<String>,
        /// The crate's directory (default: ./NAME).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Build the plugin crate at DIR into a component (wasm32, componentized in-process);
    /// prints its world, size and BLAKE3.
    Build {
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
    /// Apply an assignment with the plugin (a crate DIR after `plugin build`, or a .wasm
    /// FILE) in a temporary site; show the tree, each command's report and the log.
    Test {
        plugin: PathBuf,
        /// The assignment to apply.
        #[arg(long, conflicts_with = "staging", required_unless_present = "staging")]
        assignment: Option<PathBuf>,
        /// Build a publish assignment from this staging tree first.
        #[arg(long)]
        staging: Option<PathBuf>,
        /// The manifest (default: DIR/manifest.toml; for a FILE, an interpreter granted --site).
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// The site's name (the manifest must grant it).
        #[arg(long, default_value = "www")]
        site: String,
        /// Build the site here and keep it (default: a temporary directory).
        #[arg(long)]
        site_dir: Option<PathBuf>,
    },
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
    /// Restore the version installed before the current one: in this host's store, or with
    /// --group on every server of a content group, through the manager.
    Rollback {
        name: String,
        /// Roll the group back (the manager publishes its previous version of NAME).
        #[arg(long)]
        group: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        connect: crate::client::ConnectArgs,
    },
    /// Publish a component to every server of a content group through the manager: signed,
    /// through the tree like content; each server validates and hot-swaps it, or refuses it
    /// and the group is rolled back to its previous version.
    Publish(fleet::PublishArgs),
}

/// Open the store; the agent's interpreters must keep their sites granted.
fn open(store: &StoreArgs) -> anyhow::Result<PluginStore> {
    let (dir, agent) = store.resolve()?;
    let config = RuntimeConfig {
        compiled_cache: Some(PluginStore::compiled_cache_dir(&dir)),
        ..Default::default()
    };
    let runtime = PluginRuntime::new(config)?;
    let opened = PluginStore::open(runtime, &dir)
        .with_context(|| format!("plugin store {}", dir.display()))?;
    for (plugin, sites) in &agent.required {
        let sites: Vec<&str> = sites.iter().map(String::as_str).collect();
        opened.require_sites(plugin, &sites);
    }
    Ok(opened)
}

pub async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Publish(args) => return fleet::publish(args).await,
        Command::Rollback { name, group: Some(group), connect, .. } => {
            return fleet::rollback(&connect, &group, &name).await;
        }
        _ => {}
    }
    // Plugin calls compile and run WebAssembly synchronously: keep them off the async threads.
    tokio::task::spawn_blocking(move || run_blocking(command)).await?
}

fn run_blocking(command: Command) -> anyhow::Result<()> {
    match command {
        Command::New { name, world, sdk, dir } => {
            let world = World::from_name(&world).with_context(|| {
                format!("--world {world}: one of interpreter, cache-invalidator, load-balancer")
            })?;
            let sdk = new::SdkSpec::parse(&sdk.unwrap_or_else(new::default_sdk))?;
            let dir = dir.unwrap_or_else(|| PathBuf::from(&name));
            new::create(&dir, &name, world, &sdk)?;
            println!("created {} ({world} plugin `{name}`)", dir.display());
            println!("next: cmover plugin build {}", dir.display());
        }
        Command::Build { dir } => {
            let built = build::build(&dir)?;
            println!("component {}", built.path.display());
            println!("world:    {}", built.world);
            println!("size:     {} bytes", built.size);
            println!("blake3:   {}", built.blake3);
        }
        Command::Test { plugin, assignment, staging, manifest, site, site_dir } => {
            trial::run(trial::Trial { plugin, manifest, assignment, staging, site, site_dir })?
        }
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
            let (dir, _) = store.resolve()?;
            if !dir.is_dir() {
                println!("no plugins installed (no store at {})", dir.display());
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
        Command::Publish(_) => unreachable!("handled in run"),
        Command::Rollback { name, store, .. } => {
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

//! `cmover plugin build [DIR]`: the plugin crate at DIR compiled for wasm32 with the toolchain
//! this machine has, componentized in-process, written to `DIR/target/component/<crate>.wasm`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use cm_plugin_build::{Build, Toolchain, componentize};
use cm_plugin_host::{PluginRuntime, RuntimeConfig};
use serde::Deserialize;

/// A built component and what it is.
pub struct Built {
    pub path: PathBuf,
    pub world: String,
    pub size: u64,
    pub blake3: String,
}

#[derive(Deserialize)]
struct CargoToml {
    package: Package,
}

#[derive(Deserialize)]
struct Package {
    name: String,
}

/// Where `plugin build` puts the component of the crate at `dir`.
pub fn component_path(dir: &Path) -> anyhow::Result<PathBuf> {
    Ok(dir.join("target/component").join(format!("{}.wasm", package_name(dir)?)))
}

fn package_name(dir: &Path) -> anyhow::Result<String> {
    let path = dir.join("Cargo.toml");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!("reading {} (is {} a plugin crate?)", path.display(), dir.display())
    })?;
    let cargo: CargoToml =
        toml::from_str(&text).with_context(|| format!("{}: no [package] name", path.display()))?;
    Ok(cargo.package.name)
}

/// Build the crate at `dir` into a component and describe it.
pub fn build(dir: &Path) -> anyhow::Result<Built> {
    let dir = std::fs::canonicalize(dir)
        .with_context(|| format!("plugin crate {}: no such directory", dir.display()))?;
    let package = package_name(&dir)?;
    let toolchain = Toolchain::detect()?;
    eprintln!("building {package} for wasm32 with {}", toolchain.describe());
    let target_dir = dir.join("target");
    let core = toolchain.build(&Build {
        workspace: &dir,
        package: &package,
        features: &[],
        target_dir: &target_dir,
        locked: false,
        // Panic locations name the crate's files, not where this machine keeps them.
        remap: vec![(dir.clone(), package.as_str()), (cm_plugin_build::cargo_home(), "/cargo")],
    })?;
    let component = componentize(&package, &core)?;
    let path = component_path(&dir)?;
    std::fs::create_dir_all(path.parent().expect("in target/component"))
        .with_context(|| format!("creating {}", target_dir.display()))?;
    std::fs::write(&path, &component).with_context(|| format!("writing {}", path.display()))?;
    // The world as the host will see it (and any import the host would refuse).
    let runtime = PluginRuntime::new(RuntimeConfig { max_instances: 1, ..Default::default() })?;
    let info = cm_plugin_host::inspect(&runtime, &component, &path.display().to_string())?;
    if let Some(problem) = info.problem {
        anyhow::bail!("{}: built, but the host would refuse it: {problem}", path.display());
    }
    Ok(Built {
        path,
        world: info.world.map_or_else(|| "(none)".into(), |w| w.name().to_string()),
        size: info.size,
        blake3: info.blake3,
    })
}

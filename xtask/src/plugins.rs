//! Building the plugins into components, and checking the committed ones are not stale.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, ensure};
use cm_plugin_build::{Build, Toolchain, componentize};
use serde::{Deserialize, Serialize};

/// One component to build: a cargo package of a plugin workspace, with features.
struct Plugin {
    /// Name of the component in `plugins/dist/` (`<name>.wasm`).
    name: &'static str,
    /// The cargo workspace holding the package, relative to the repository root.
    workspace: &'static str,
    /// The package's directory, relative to the repository root.
    dir: &'static str,
    package: &'static str,
    features: &'static [&'static str],
}

const PLUGINS: &[Plugin] = &[
    plugin("interpreter", "plugins", "cm-plugin-interpreter", &[]),
    plugin("varnish", "plugins", "cm-plugin-varnish", &[]),
    plugin("nginx", "plugins", "cm-plugin-nginx", &[]),
    plugin("haproxy", "plugins", "cm-plugin-haproxy", &[]),
    plugin("test-trap", "plugins", "cm-plugin-test-trap", &[]),
    plugin("test-loop", "plugins", "cm-plugin-test-loop", &[]),
    plugin("test-hog", "plugins", "cm-plugin-test-hog", &[]),
    plugin("test-escape", "plugins", "cm-plugin-test-escape", &[]),
    plugin("test-flood", "plugins", "cm-plugin-test-flood", &[]),
    plugin("test-config", "plugins", "cm-plugin-test-config", &[]),
    Plugin {
        name: "test-swap-v1",
        dir: "plugins/test-swap",
        ..plugin("", "plugins", "cm-plugin-test-swap", &[])
    },
    Plugin {
        name: "test-swap-v2",
        dir: "plugins/test-swap",
        ..plugin("", "plugins", "cm-plugin-test-swap", &["v2"])
    },
    Plugin {
        name: "audit",
        workspace: "examples/audit",
        dir: "examples/audit",
        package: "audit",
        features: &[],
    },
];

/// A plugin of the `plugins/` workspace living in `plugins/<name>`.
const fn plugin(
    name: &'static str,
    workspace: &'static str,
    package: &'static str,
    features: &'static [&'static str],
) -> Plugin {
    Plugin { name, workspace, dir: name, package, features }
}

impl Plugin {
    fn dir(&self) -> String {
        if self.dir.contains('/') { self.dir.to_string() } else { format!("plugins/{}", self.dir) }
    }
}

/// Sources every plugin depends on besides its own crate and workspace.
const SHARED_SOURCES: &[&str] = &["sdk/wit", "sdk/Cargo.toml", "sdk/src"];

/// `plugins/dist/manifest.toml`.
#[derive(Serialize, Deserialize, Default)]
struct Manifest {
    #[serde(default, rename = "plugin")]
    plugins: Vec<Entry>,
}

#[derive(Serialize, Deserialize, Clone, PartialEq)]
struct Entry {
    name: String,
    file: String,
    size: u64,
    #[serde(rename = "component-blake3")]
    component_blake3: String,
    #[serde(rename = "sources-blake3")]
    sources_blake3: String,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the repository")
        .to_path_buf()
}

fn dist() -> PathBuf {
    root().join("plugins/dist")
}

const MANIFEST_HEADER: &str = "# Written by `cargo xtask plugins`; checked by `cargo xtask plugins --check`.\n# component-blake3: the .wasm next to this file; sources-blake3: everything it was built from.\n\n";

pub fn build_all() -> anyhow::Result<()> {
    let root = root();
    let toolchain = Toolchain::detect()?;
    eprintln!("building {} plugins with {}", PLUGINS.len(), toolchain.describe());
    std::fs::create_dir_all(dist())?;
    let mut manifest = Manifest::default();
    for plugin in PLUGINS {
        // All plugins share one target directory, so the standard library is built once.
        let core = toolchain.build(&Build {
            workspace: &root.join(plugin.workspace),
            package: plugin.package,
            features: plugin.features,
            target_dir: &root.join("plugins/target"),
            locked: true,
            // Reproducible components: no machine paths in panic locations.
            remap: vec![(root.clone(), "/cm"), (cm_plugin_build::cargo_home(), "/cargo")],
        })?;
        let component = componentize(plugin.package, &core)
            .with_context(|| format!("plugin `{}`", plugin.name))?;
        let file = format!("{}.wasm", plugin.name);
        std::fs::write(dist().join(&file), &component)?;
        eprintln!("  {:<14} {:>7} bytes", plugin.name, component.len());
        manifest.plugins.push(Entry {
            name: plugin.name.into(),
            file,
            size: component.len() as u64,
            component_blake3: blake3::hash(&component).to_hex().to_string(),
            sources_blake3: sources_hash(&root, plugin)?,
        });
    }
    let text = MANIFEST_HEADER.to_string() + &toml::to_string(&manifest)?;
    std::fs::write(dist().join("manifest.toml"), text)?;
    eprintln!("wrote {}", dist().display());
    Ok(())
}

pub fn check() -> anyhow::Result<()> {
    let root = root();
    let path = dist().join("manifest.toml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let manifest: Manifest =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let committed: BTreeMap<&str, &Entry> =
        manifest.plugins.iter().map(|e| (e.name.as_str(), e)).collect();
    let mut problems = Vec::new();
    for plugin in PLUGINS {
        let Some(entry) = committed.get(plugin.name) else {
            problems.push(format!("{}: missing from the manifest", plugin.name));
            continue;
        };
        if sources_hash(&root, plugin)? != entry.sources_blake3 {
            problems
                .push(format!("{}: sources changed since its component was built", plugin.name));
        }
        match std::fs::read(dist().join(&entry.file)) {
            Ok(bytes) if blake3::hash(&bytes).to_hex().as_str() == entry.component_blake3 => {}
            Ok(_) => problems
                .push(format!("{}: {} does not match its manifest hash", plugin.name, entry.file)),
            Err(e) => problems.push(format!("{}: {}: {e}", plugin.name, entry.file)),
        }
    }
    for name in committed.keys().filter(|name| !PLUGINS.iter().any(|p| p.name == **name)) {
        problems.push(format!("{name}: in the manifest but no longer built"));
    }
    ensure!(
        problems.is_empty(),
        "plugins/dist is stale; run `cargo xtask plugins` and commit plugins/dist:\n  {}",
        problems.join("\n  ")
    );
    eprintln!("plugins/dist is up to date ({} plugins)", PLUGINS.len());
    Ok(())
}

/// BLAKE3 over everything a plugin is built from: its crate, its workspace's manifest and
/// lock file, the SDK and the WIT, and its features. Paths are relative, sorted, and framed
/// with their lengths, so the hash is the same on every clone.
fn sources_hash(root: &Path, plugin: &Plugin) -> anyhow::Result<String> {
    let mut files = Vec::new();
    collect(root, &root.join(plugin.dir()), &mut files)?;
    for shared in
        [format!("{}/Cargo.toml", plugin.workspace), format!("{}/Cargo.lock", plugin.workspace)]
            .iter()
            .map(String::as_str)
            .chain(SHARED_SOURCES.iter().copied())
    {
        collect(root, &root.join(shared), &mut files)?;
    }
    files.sort();
    files.dedup();
    let mut hasher = blake3::Hasher::new();
    hasher.update(format!("features={:?}\n", plugin.features).as_bytes());
    for relative in files {
        let bytes = std::fs::read(root.join(&relative))?;
        hasher.update(&(relative.len() as u64).to_le_bytes());
        hasher.update(relative.as_bytes());
        hasher.update(&(bytes.len() as u64).to_le_bytes());
        hasher.update(&bytes);
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// Every file under `path` (or `path` itself), as '/'-separated paths relative to `root`,
/// skipping build output.
fn collect(root: &Path, path: &Path, out: &mut Vec<String>) -> anyhow::Result<()> {
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)? {
            let entry = entry?;
            if entry.file_name() == "target" {
                continue;
            }
            collect(root, &entry.path(), out)?;
        }
    } else {
        let relative = path
            .strip_prefix(root)?
            .components()
            .map(|c| c.as_os_str().to_string_lossy())
            .collect::<Vec<_>>();
        out.push(relative.join("/"));
    }
    Ok(())
}

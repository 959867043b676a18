//! `cmover plugin new NAME --world WORLD`: a plugin crate that builds outside this repository
//! — the SDK from a version or a git URL, a manifest template with its grants explained, a
//! test of the plugin's own logic (`cargo test`) and a tiny staging tree for
//! `cmover plugin test`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use cm_plugin_host::World;

/// Where the generated crate takes `cm-plugin-sdk` from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SdkSpec {
    /// A crates.io version requirement (`0.1`).
    Version(String),
    /// A git repository holding the SDK (`git=URL`, optionally `#REV`).
    Git { url: String, rev: Option<String> },
    /// A local checkout (`path=DIR`), for tests and CI of this repository.
    Path(PathBuf),
}

impl SdkSpec {
    /// `0.1`, `git=https://…[#rev]` or `path=DIR`.
    pub fn parse(spec: &str) -> anyhow::Result<SdkSpec> {
        if let Some(url) = spec.strip_prefix("git=") {
            let (url, rev) = match url.split_once('#') {
                Some((url, rev)) => (url, Some(rev.to_string())),
                None => (url, None),
            };
            if url.is_empty() {
                bail!("--sdk git=URL needs a URL");
            }
            return Ok(SdkSpec::Git { url: url.into(), rev });
        }
        if let Some(path) = spec.strip_prefix("path=") {
            let path = std::fs::canonicalize(path)
                .with_context(|| format!("--sdk path={path}: no such directory"))?;
            if !path.join("Cargo.toml").is_file() {
                bail!("--sdk path={}: no Cargo.toml there", path.display());
            }
            return Ok(SdkSpec::Path(path));
        }
        let version_like = !spec.is_empty()
            && spec.bytes().all(|b| b.is_ascii_digit() || b".^~=<>*, ".contains(&b));
        if !version_like {
            bail!("--sdk {spec:?}: give a version (0.1), git=URL[#REV] or path=DIR");
        }
        Ok(SdkSpec::Version(spec.into()))
    }

    /// The dependency line's table body (without features).
    fn source(&self) -> String {
        let quote = |s: &str| toml::Value::String(s.into()).to_string();
        match self {
            SdkSpec::Version(v) => format!("version = {}", quote(v)),
            SdkSpec::Git { url, rev: Some(rev) } => {
                format!("git = {}, rev = {}", quote(url), quote(rev))
            }
            SdkSpec::Git { url, rev: None } => format!("git = {}", quote(url)),
            SdkSpec::Path(path) => format!("path = {}", quote(&path.to_string_lossy())),
        }
    }
}

/// The SDK version a new plugin depends on by default: the one this binary was built with.
pub fn default_sdk() -> String {
    let version = env!("CARGO_PKG_VERSION");
    let minor = version.rsplit_once('.').map_or(version, |(head, _)| head);
    minor.to_string()
}

/// Write the crate `dir` (which must not exist) for plugin `name` of `world`.
pub fn create(dir: &Path, name: &str, world: World, sdk: &SdkSpec) -> anyhow::Result<()> {
    let name_ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.as_bytes()[0].is_ascii_lowercase();
    if !name_ok {
        bail!(
            "plugin name {name:?}: 1-64 of [a-z0-9-], starting with a letter (it names the crate, the component and the installed plugin)"
        );
    }
    if dir.exists() {
        bail!("{} already exists; pick another name or directory", dir.display());
    }
    let files = [
        ("Cargo.toml", cargo_toml(name, world, sdk)),
        ("manifest.toml", manifest(name, world)),
        ("src/lib.rs", lib_rs(name, world)),
        (".gitignore", "/target\n".to_string()),
        ("test/staging/index.html", "<h1>Hello from the plugin's test site</h1>\n".into()),
        ("test/staging/css/site.css", "h1 { color: teal; }\n".into()),
    ];
    for (file, text) in files {
        let path = dir.join(file);
        std::fs::create_dir_all(path.parent().expect("a file in the crate"))
            .with_context(|| format!("creating {}", path.display()))?;
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn cargo_toml(name: &str, world: World, sdk: &SdkSpec) -> String {
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
# The WebAssembly module `cmover plugin build` turns into a component. `cargo test` still runs
# the unit tests of your own logic natively.
crate-type = ["cdylib"]

[dependencies]
cm-plugin-sdk = {{ {source}, default-features = false, features = ["{world}"] }}

[profile.release]
# Small components: size-optimised, LTO, no unwinding (a panic is logged, then traps).
opt-level = "s"
lto = true
codegen-units = 1
panic = "abort"
strip = true

# A workspace of its own: the plugin builds for wasm32, apart from any host workspace.
[workspace]
"#,
        source = sdk.source(),
        world = world.name(),
    )
}

fn manifest(name: &str, world: World) -> String {
    let grants = match world {
        World::Interpreter => r#"[grants]
# The sites whose staging trees this interpreter may change ("*": every site). It must
# include the agent's `[site] name` (default "www"), or the install is refused.
sites = ["www"]

# Endpoints the plugin may call, by the name it uses (it never sees the address):
# [grants.endpoints.search]
# http = "127.0.0.1:9200"     # or tcp = "host:port", or unix = "/run/app.sock"
# timeout-ms = 2000
# max-response-kib = 256
"#
        .to_string(),
        World::CacheInvalidator | World::LoadBalancer => {
            let (endpoint, address) = match world {
                World::CacheInvalidator => ("cache1", "http = \"127.0.0.1:6081\""),
                _ => ("lb", "unix = \"/run/haproxy/admin.sock\""),
            };
            format!(
                r#"# Endpoints the plugin may call, by the name it uses (it never sees the address); a
# {world} needs at least one. `endpoint::granted()` lists them.
[grants.endpoints.{endpoint}]
{address}      # or tcp = "host:port", or unix = "/path", or http = "host:port"
timeout-ms = 2000
max-response-kib = 256
"#,
                world = world.name()
            )
        }
    };
    let name_line = match world {
        // The one name an agent looks its interpreter up by.
        World::Interpreter => format!(
            "# The agent applies its site with the interpreter installed as `interpreter`: this\n# name replaces the default one. (Another name installs beside it, unused by the agent.)\nname = \"interpreter\"      # plugin `{name}`"
        ),
        _ => format!("name = \"{name}\""),
    };
    format!(
        r#"# The operator's manifest of plugin `{name}`: what it may touch and how much it may use.
# `cmover plugin install <component> --manifest manifest.toml` installs it under `name`.
{name_line}
world = "{world}"

# Per-call limits (defaults shown).
[limits]
memory-mib = 64       # linear memory of one instance
deadline-ms = 10000   # one call into the plugin

{grants}
# Settings handed to the plugin (`config::get`, `config::entries`): strings only, at most 64
# keys, 4 KiB a value.
[config]
log-commands = "true"
"#,
        world = world.name()
    )
}

fn lib_rs(name: &str, world: World) -> String {
    let test = r#"
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_setting_is_on_only_when_it_says_true() {
        assert!(enabled(Some("true")));
        assert!(!enabled(Some("false")));
        assert!(!enabled(None));
    }
}
"#;
    let enabled = r#"
/// Whether a `[config]` setting is on.
fn enabled(setting: Option<&str>) -> bool {
    setting == Some("true")
}
"#;
    let body = match world {
        World::Interpreter => {
            r#"use cm_plugin_sdk::{Command, Interpreter, config, log};

struct Plugin;

impl Interpreter for Plugin {
    /// Carry out one command on the staging tree (the new release being built).
    fn command(command: Command) -> Result<(), String> {
        if enabled(config::get("log-commands").as_deref()) {
            log::write(log::Level::Info, &cm_plugin_sdk::describe(&command));
        }
        cm_plugin_sdk::execute(command)
    }

    // Also available, with working defaults: commit(serial), rollback(serial), self_check().
}

cm_plugin_sdk::interpreter!(Plugin);
"#
        }
        World::CacheInvalidator => {
            r#"use cm_plugin_sdk::endpoint::{self, HttpRequest};
use cm_plugin_sdk::{CacheInvalidator, config, log};

struct Plugin;

/// Send `method path` with `Host: site` to every granted cache.
fn send_all(method: &str, site: &str, path: &str) -> Result<(), String> {
    for cache in endpoint::granted() {
        let request = HttpRequest {
            method: method.into(),
            path: path.into(),
            headers: vec![("Host".into(), site.into())],
            body: Vec::new(),
        };
        let response = endpoint::http(&cache, &request).map_err(|e| e.message)?;
        if !(200..300).contains(&response.status) {
            return Err(format!("{cache}: {method} {path}: HTTP {}", response.status));
        }
    }
    Ok(())
}

impl CacheInvalidator for Plugin {
    fn invalidate(site: String, paths: Vec<String>) -> Result<(), String> {
        for path in &paths {
            if enabled(config::get("log-commands").as_deref()) {
                log::write(log::Level::Info, &format!("PURGE {path} ({site})"));
            }
            send_all("PURGE", &site, path)?;
        }
        Ok(())
    }

    fn purge_site(site: String) -> Result<(), String> {
        send_all("BAN", &site, "/")
    }

    fn self_check() -> Result<(), String> {
        if endpoint::granted().is_empty() { Err("no endpoint granted".into()) } else { Ok(()) }
    }
}

cm_plugin_sdk::cache_invalidator!(Plugin);
"#
        }
        World::LoadBalancer => {
            r#"use cm_plugin_sdk::{LoadBalancer, ServerState, config, endpoint, log};

struct Plugin;

/// Send one command to the first granted endpoint and return its answer.
fn send(command: &str) -> Result<String, String> {
    let lb = endpoint::granted().into_iter().next().ok_or("no endpoint granted")?;
    if enabled(config::get("log-commands").as_deref()) {
        log::write(log::Level::Info, command);
    }
    let answer = endpoint::exchange(&lb, format!("{command}\n").as_bytes()).map_err(|e| e.message)?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

impl LoadBalancer for Plugin {
    fn drain(server: String) -> Result<(), String> {
        send(&format!("set server {server} state drain")).map(drop)
    }
    fn undrain(server: String) -> Result<(), String> {
        send(&format!("set server {server} state ready")).map(drop)
    }
    fn add(server: String, address: String) -> Result<(), String> {
        send(&format!("add server {server} {address}")).map(drop)
    }
    fn remove(server: String) -> Result<(), String> {
        send(&format!("del server {server}")).map(drop)
    }
    fn state(server: String) -> Result<ServerState, String> {
        let answer = send(&format!("get server {server} state"))?;
        Ok(if answer.contains("drain") { ServerState::Drain } else { ServerState::Ready })
    }
    fn self_check() -> Result<(), String> {
        if endpoint::granted().is_empty() { Err("no endpoint granted".into()) } else { Ok(()) }
    }
}

cm_plugin_sdk::load_balancer!(Plugin);
"#
        }
    };
    format!(
        "//! `{name}`: a Content Mover {world} plugin (`cmover plugin new`).\n//!\n//! Build: `cmover plugin build`; try: `cmover plugin test . --staging test/staging`;\n//! unit tests of your own logic: `cargo test`.\n\n{body}{enabled}{test}",
        world = world.name()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdk_specs() {
        assert_eq!(SdkSpec::parse("0.1").unwrap(), SdkSpec::Version("0.1".into()));
        assert_eq!(
            SdkSpec::parse("git=https://example.com/cm.git#abc").unwrap(),
            SdkSpec::Git { url: "https://example.com/cm.git".into(), rev: Some("abc".into()) }
        );
        assert!(SdkSpec::parse("../sdk").is_err());
        assert!(SdkSpec::parse("path=/does/not/exist").is_err());
        assert!(SdkSpec::parse("git=").is_err());
    }

    #[test]
    fn every_world_gives_a_manifest_the_host_accepts() {
        for world in World::ALL {
            let text = manifest("my-plugin", world);
            let parsed = cm_plugin_host::PluginManifest::parse(&text, "manifest.toml")
                .unwrap_or_else(|e| panic!("{world}: {e}\n{text}"));
            parsed.check_grants("manifest.toml").unwrap();
            assert_eq!(parsed.config.get("log-commands").map(String::as_str), Some("true"));
            let cargo: toml::Table =
                toml::from_str(&cargo_toml("my-plugin", world, &SdkSpec::Version("0.1".into())))
                    .unwrap();
            assert!(cargo["dependencies"]["cm-plugin-sdk"]["version"].as_str() == Some("0.1"));
        }
    }

    #[test]
    fn names_that_are_not_crate_and_plugin_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sdk = SdkSpec::Version("0.1".into());
        for bad in ["", "My", "1st", "a b", "a_b"] {
            assert!(
                create(&dir.path().join("x"), bad, World::Interpreter, &sdk).is_err(),
                "{bad:?}"
            );
        }
        create(&dir.path().join("ok"), "ok", World::Interpreter, &sdk).unwrap();
        let again = create(&dir.path().join("ok"), "ok", World::Interpreter, &sdk).unwrap_err();
        assert!(again.to_string().contains("already exists"), "{again}");
    }
}

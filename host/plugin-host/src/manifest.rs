//! The per-plugin manifest (TOML) the operator writes: which world the plugin implements,
//! its limits, and its grants (which sites, which endpoints). A plugin gets nothing it was
//! not granted here.
//!
//! ```toml
//! name = "varnish"
//! world = "cache-invalidator"
//!
//! [limits]
//! memory-mib = 32
//! deadline-ms = 5000
//! log-lines = 1000          # per call; more are dropped and counted (one summary record)
//! log-kib = 256
//! extra-write-mib = 16      # written beyond what the call's batch declares; more fails the call
//! extra-files = 64          # created beyond what the call's batch declares; more fails the call
//! open-files = 64           # readers and writers held at once; more fails the call
//!
//! [grants]
//! sites = ["www"]            # interpreters: sites whose staging trees it may change ("*": any)
//!
//! [grants.endpoints.cache1]  # the plugin says "cache1", never the address
//! http = "127.0.0.1:6081"    # or tcp = "host:port", or unix = "/run/haproxy/admin.sock"
//! timeout-ms = 2000
//! max-response-kib = 256
//!
//! [config]                   # handed to the plugin (`config.get`, `config.entries`)
//! batch-size = "64"          # strings only; at most 64 keys, 4 KiB a value, 16 KiB in all
//! ```
//!
//! Checks come in two steps, so an error says the most useful thing first:
//! [`PluginManifest::parse`] checks the manifest alone (name, world, limits, endpoints,
//! config); [`PluginManifest::check_grants`] checks the grants the world needs, and runs when
//! the component is loaded, after its world was compared with the manifest's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::endpoint::{Endpoint, EndpointAddress, Endpoints};
use crate::error::InstallError;

/// The three plugin worlds of `wit/worlds.wit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum World {
    Interpreter,
    CacheInvalidator,
    LoadBalancer,
}

impl World {
    pub const ALL: [World; 3] = [World::Interpreter, World::CacheInvalidator, World::LoadBalancer];

    /// The world's WIT name.
    pub fn name(self) -> &'static str {
        match self {
            World::Interpreter => "interpreter",
            World::CacheInvalidator => "cache-invalidator",
            World::LoadBalancer => "load-balancer",
        }
    }

    pub fn from_name(name: &str) -> Option<World> {
        World::ALL.into_iter().find(|w| w.name() == name)
    }

    /// The interface a component of this world exports (without the package version).
    pub(crate) fn export(self) -> &'static str {
        match self {
            World::Interpreter => "contentmover:plugin/content-interpreter",
            World::CacheInvalidator => "contentmover:plugin/cache-invalidation",
            World::LoadBalancer => "contentmover:plugin/load-balancing",
        }
    }

    /// The host interfaces a component of this world may import.
    pub(crate) fn imports(self) -> &'static [&'static str] {
        match self {
            World::Interpreter => &[
                "contentmover:plugin/log",
                "contentmover:plugin/config",
                "contentmover:plugin/payload",
                "contentmover:plugin/staging",
                "contentmover:plugin/endpoint",
            ],
            World::CacheInvalidator | World::LoadBalancer => &[
                "contentmover:plugin/log",
                "contentmover:plugin/config",
                "contentmover:plugin/endpoint",
            ],
        }
    }
}

impl std::fmt::Display for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A plugin manifest, as parsed from TOML.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PluginManifest {
    /// The name the plugin is installed (and hot-swapped) under.
    pub name: String,
    /// The world it implements: `interpreter`, `cache-invalidator` or `load-balancer`.
    pub world: String,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub grants: Grants,
    /// The plugin's settings (`config` interface): string keys to string values.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "config_table"
    )]
    pub config: BTreeMap<String, String>,
    /// Where the manifest was read from, for errors (not part of its identity).
    #[serde(skip)]
    pub origin: ManifestOrigin,
}

/// Where a manifest came from (a file's path, or a description); compares equal to every
/// other origin, so the same manifest read from two places is the same manifest.
#[derive(Debug, Clone, Default)]
pub struct ManifestOrigin(pub Option<String>);

impl PartialEq for ManifestOrigin {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// Most keys a `[config]` table may have.
pub const MAX_CONFIG_KEYS: usize = 64;
/// Longest value of one `[config]` key, bytes.
pub const MAX_CONFIG_VALUE: usize = 4 << 10;
/// Most bytes of keys and values in all.
pub const MAX_CONFIG_TOTAL: usize = 16 << 10;

/// `[config]`: every value must be a string (a number or a table is refused with the key).
fn config_table<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    let raw = BTreeMap::<String, toml::Value>::deserialize(deserializer)?;
    raw.into_iter()
        .map(|(key, value)| match value {
            toml::Value::String(text) => Ok((key, text)),
            other => Err(serde::de::Error::custom(format!(
                "config.{key}: values are strings (write {}), found a {}",
                toml::Value::String(other.to_string()),
                other.type_str()
            ))),
        })
        .collect()
}

/// Per-call limits. Besides time and memory, the host's other resources (`quota.rs`): log
/// records, bytes written and files created (beyond what the call's batch declares), open files.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Limits {
    /// Linear memory cap of one instance, MiB.
    #[serde(default = "Limits::default_memory_mib")]
    pub memory_mib: u64,
    /// Deadline of one call into the plugin, milliseconds.
    #[serde(default = "Limits::default_deadline_ms")]
    pub deadline_ms: u64,
    /// Log records one call may write; later ones are dropped and counted.
    #[serde(default = "Limits::default_log_lines")]
    pub log_lines: u64,
    /// Log bytes one call may write, KiB; past it records are dropped and counted.
    #[serde(default = "Limits::default_log_kib")]
    pub log_kib: u64,
    /// Bytes one call may write beyond what its batch declares (the payload lengths of its
    /// write-file and apply-delta commands), MiB.
    #[serde(default = "Limits::default_extra_write_mib")]
    pub extra_write_mib: u64,
    /// Files, directories and links one call may create beyond what its batch declares.
    #[serde(default = "Limits::default_extra_files")]
    pub extra_files: u64,
    /// Files (readers and writers) a plugin instance may hold open at once.
    #[serde(default = "Limits::default_open_files")]
    pub open_files: u64,
}

impl Limits {
    fn default_memory_mib() -> u64 {
        64
    }
    fn default_deadline_ms() -> u64 {
        10_000
    }
    fn default_log_lines() -> u64 {
        1_000
    }
    fn default_log_kib() -> u64 {
        256
    }
    fn default_extra_write_mib() -> u64 {
        16
    }
    fn default_extra_files() -> u64 {
        64
    }
    fn default_open_files() -> u64 {
        64
    }
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_mib: Self::default_memory_mib(),
            deadline_ms: Self::default_deadline_ms(),
            log_lines: Self::default_log_lines(),
            log_kib: Self::default_log_kib(),
            extra_write_mib: Self::default_extra_write_mib(),
            extra_files: Self::default_extra_files(),
            open_files: Self::default_open_files(),
        }
    }
}

/// What the plugin may touch.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Grants {
    /// Sites whose staging trees an interpreter may change; `"*"` grants every site.
    #[serde(default)]
    pub sites: Vec<String>,
    /// Endpoints by the name the plugin uses.
    #[serde(default)]
    pub endpoints: BTreeMap<String, EndpointGrant>,
}

/// One endpoint: exactly one of `http`, `tcp`, `unix`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct EndpointGrant {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unix: Option<PathBuf>,
    #[serde(default = "EndpointGrant::default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "EndpointGrant::default_max_response_kib")]
    pub max_response_kib: u64,
}

impl EndpointGrant {
    fn default_timeout_ms() -> u64 {
        5_000
    }
    fn default_max_response_kib() -> u64 {
        1_024
    }
}

impl PluginManifest {
    /// Parse and validate a manifest; `origin` names it in errors.
    /// Parse and check the manifest alone; the grants are checked when the component is
    /// loaded ([`PluginManifest::check_grants`]).
    pub fn parse(text: &str, origin: &str) -> Result<Self, InstallError> {
        let mut manifest: PluginManifest = toml::from_str(text)
            .map_err(|e| InstallError::Manifest { path: origin.into(), reason: e.to_string() })?;
        manifest.origin = ManifestOrigin(Some(origin.into()));
        manifest.validate_shape(origin)?;
        Ok(manifest)
    }

    /// Where this manifest was read from (or `fallback` when it was built in code).
    pub fn origin_or<'a>(&'a self, fallback: &'a str) -> &'a str {
        self.origin.0.as_deref().unwrap_or(fallback)
    }

    pub fn load(path: &Path) -> Result<Self, InstallError> {
        let text = std::fs::read_to_string(path).map_err(|e| InstallError::Manifest {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a manifest always serializes")
    }

    /// The world this manifest names (validated by [`PluginManifest::parse`]).
    pub fn world(&self) -> Option<World> {
        World::from_name(&self.world)
    }

    /// Check the whole manifest: [`PluginManifest::validate_shape`], then
    /// [`PluginManifest::check_grants`].
    pub fn validate(&self, origin: &str) -> Result<(), InstallError> {
        self.validate_shape(origin)?;
        self.check_grants(origin)
    }

    /// Check everything that needs neither the component nor the grants: a usable name, a
    /// known world, positive limits, endpoints with exactly one address, a bounded `[config]`.
    pub fn validate_shape(&self, origin: &str) -> Result<(), InstallError> {
        let bad = |reason: String| InstallError::Manifest { path: origin.into(), reason };
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !name_ok {
            return Err(bad(format!("name `{}` must be 1-64 of [a-z0-9_-]", self.name)));
        }
        self.world().ok_or_else(|| {
            bad(format!(
                "world `{}` is not one of interpreter, cache-invalidator, load-balancer",
                self.world
            ))
        })?;
        if self.limits.memory_mib == 0 || self.limits.deadline_ms == 0 {
            return Err(bad("limits.memory-mib and limits.deadline-ms must be positive".into()));
        }
        for (name, grant) in &self.grants.endpoints {
            let kinds = [grant.http.is_some(), grant.tcp.is_some(), grant.unix.is_some()]
                .iter()
                .filter(|k| **k)
                .count();
            if kinds != 1 {
                return Err(bad(format!("endpoint `{name}` needs exactly one of http, tcp, unix")));
            }
        }
        self.validate_config().map_err(bad)
    }

    fn validate_config(&self) -> Result<(), String> {
        if self.config.len() > MAX_CONFIG_KEYS {
            return Err(format!(
                "[config] has {} keys; at most {MAX_CONFIG_KEYS}",
                self.config.len()
            ));
        }
        let mut total = 0;
        for (key, value) in &self.config {
            let key_ok = !key.is_empty()
                && key.len() <= 64
                && key
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
            if !key_ok {
                return Err(format!("config key `{key}` must be 1-64 of [a-z0-9_.-]"));
            }
            if value.len() > MAX_CONFIG_VALUE {
                return Err(format!(
                    "config.{key} is {} bytes; at most {MAX_CONFIG_VALUE}",
                    value.len()
                ));
            }
            total += key.len() + value.len();
        }
        if total > MAX_CONFIG_TOTAL {
            return Err(format!("[config] is {total} bytes in all; at most {MAX_CONFIG_TOTAL}"));
        }
        Ok(())
    }

    /// Check the grants the manifest's world needs (an interpreter: sites; the others: an
    /// endpoint). `origin` names the manifest in the error.
    pub fn check_grants(&self, origin: &str) -> Result<(), InstallError> {
        let Some(world) = self.world() else { return self.validate_shape(origin) };
        let missing = |what: &str| InstallError::MissingGrant {
            manifest: origin.into(),
            plugin: self.name.clone(),
            what: what.into(),
        };
        match world {
            World::Interpreter if self.grants.sites.is_empty() => Err(missing(
                "an interpreter needs `grants.sites` (the sites it may change, or \"*\")",
            )),
            World::CacheInvalidator | World::LoadBalancer if self.grants.endpoints.is_empty() => {
                Err(missing(&format!(
                    "a {world} needs at least one endpoint in `grants.endpoints`"
                )))
            }
            _ => Ok(()),
        }
    }

    /// Whether this plugin may change `site`'s staging tree.
    pub fn grants_site(&self, site: &str) -> bool {
        self.grants.sites.iter().any(|s| s == "*" || s == site)
    }

    pub(crate) fn endpoints(&self) -> Endpoints {
        let by_name = self
            .grants
            .endpoints
            .iter()
            .map(|(name, grant)| {
                let address = match (&grant.http, &grant.tcp, &grant.unix) {
                    (Some(http), _, _) => EndpointAddress::Http(http.clone()),
                    (_, Some(tcp), _) => EndpointAddress::Tcp(tcp.clone()),
                    (_, _, Some(unix)) => EndpointAddress::Unix(unix.clone()),
                    _ => unreachable!("validated: exactly one address"),
                };
                let endpoint = Endpoint {
                    address,
                    timeout: Duration::from_millis(grant.timeout_ms),
                    max_response_bytes: grant.max_response_kib << 10,
                };
                (name.clone(), endpoint)
            })
            .collect();
        Endpoints::new(by_name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_validates() {
        let m = PluginManifest::parse(
            "name = \"lb\"\nworld = \"load-balancer\"\n[grants.endpoints.haproxy]\nunix = \"/run/haproxy.sock\"\n",
            "lb.toml",
        )
        .unwrap();
        assert_eq!(m.world(), Some(World::LoadBalancer));
        assert_eq!(m.limits, Limits::default());
        assert_eq!(PluginManifest::parse(&m.to_toml(), "again").unwrap(), m);
    }

    #[test]
    fn refuses_what_is_wrong() {
        let err = |text: &str| match PluginManifest::parse(text, "m.toml") {
            Ok(parsed) => parsed.validate("m.toml").unwrap_err().to_string(),
            Err(e) => e.to_string(),
        };
        assert!(err("name = \"x\"\nworld = \"printer\"\n").contains("world `printer`"));
        assert!(err("name = \"X Y\"\nworld = \"interpreter\"\n").contains("name `X Y`"));
        assert!(err("name = \"x\"\nworld = \"interpreter\"\n").contains("grants.sites"));
        assert!(err("name = \"x\"\nworld = \"cache-invalidator\"\n").contains("grants.endpoints"));
        assert!(err("name = \"x\"\nworld = \"load-balancer\"\n[grants.endpoints.a]\nhttp = \"a:1\"\ntcp = \"a:2\"\n").contains("exactly one"));
        assert!(err("name = \"x\"\nworld = \"interpreter\"\nsurprise = 1\n").contains("surprise"));
        assert!(err("name = \"x\"\nworld = \"interpreter\"\n").starts_with("manifest m.toml"));
    }

    #[test]
    fn config_is_strings_and_bounded() {
        let base = "name = \"x\"\nworld = \"interpreter\"\n[grants]\nsites = [\"*\"]\n[config]\n";
        let parse = |config: &str| PluginManifest::parse(&format!("{base}{config}"), "m.toml");
        let m = parse("batch-size = \"64\"\nurl = \"http://a/b\"\n").unwrap();
        assert_eq!(m.config.get("batch-size").map(String::as_str), Some("64"));
        assert_eq!(PluginManifest::parse(&m.to_toml(), "again").unwrap(), m);
        let err = |config: &str| parse(config).unwrap_err().to_string();
        let number = err("batch-size = 64\n");
        assert!(
            number.contains("config.batch-size: values are strings (write \"64\")"),
            "{number}"
        );
        assert!(number.starts_with("manifest m.toml"), "{number}");
        assert!(err("nested = { a = \"b\" }\n").contains("config.nested"));
        assert!(err("\"Bad Key\" = \"v\"\n").contains("config key `Bad Key`"));
        let long = format!("big = \"{}\"\n", "x".repeat(MAX_CONFIG_VALUE + 1));
        assert!(err(&long).contains("config.big is 4097 bytes"));
        let many: String = (0..=MAX_CONFIG_KEYS).map(|i| format!("k{i} = \"v\"\n")).collect();
        assert!(err(&many).contains("keys; at most 64"));
        let total: String =
            (0..5).map(|i| format!("k{i} = \"{}\"\n", "x".repeat(MAX_CONFIG_VALUE))).collect();
        assert!(err(&total).contains("bytes in all"));
    }
}

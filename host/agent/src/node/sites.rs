//! The hosted sites one agent serves: each its own root (releases, `current`, history,
//! `newest-serial` and built records — so serials are per site), its own interpreter plugin
//! from the agent's plugin store, granted that site. An assignment names its site in its
//! header (signed by the manager), and is applied to that site's root or, when this server
//! serves no site of that name, refused and reported — never applied elsewhere.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use cm_assignment::format::{HEADER_LEN, Header};
use cm_assignment::names::check_name;
use cm_plugin_host::PluginStore;
use cm_site::{Site, SiteConfig};

use super::AgentError;

/// The plugin an agent uses for a site whose configuration names none.
pub const DEFAULT_PLUGIN: &str = "interpreter";

/// One hosted site as the agent's configuration gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteSpec {
    /// The site's name: what assignment headers name, and what the plugin must be granted.
    pub name: String,
    /// Its directory: `releases/<serial>`, the `current` link, the history.
    pub root: PathBuf,
    /// The interpreter plugin (its name in the agent's plugin store) that applies its content.
    pub plugin: String,
}

impl SiteSpec {
    /// A site applied by the default interpreter plugin.
    pub fn new(name: &str, root: impl Into<PathBuf>) -> SiteSpec {
        SiteSpec { name: name.into(), root: root.into(), plugin: DEFAULT_PLUGIN.into() }
    }
}

/// Why a set of sites cannot be served together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SitesError {
    #[error("no site configured")]
    None,
    #[error(transparent)]
    Name(#[from] cm_assignment::names::NameError),
    #[error("site {0} is configured twice")]
    Twice(String),
    #[error("sites {a} and {b} share the root {root}: each site needs a directory of its own")]
    SharedRoot { a: String, b: String, root: String },
    #[error("the root of site {inner} ({inner_root}) lies inside the root of site {outer}")]
    Nested { inner: String, inner_root: String, outer: String },
}

/// Checks that `sites` can be served together: at least one, names by the one name rule and
/// plugin names too, no name twice, and roots that are distinct and not nested (a site's
/// releases must never be another site's content).
pub fn check_sites(sites: &[SiteSpec]) -> Result<(), SitesError> {
    if sites.is_empty() {
        return Err(SitesError::None);
    }
    let mut names = BTreeSet::new();
    for s in sites {
        check_name("site name", &s.name)?;
        check_name("site plugin", &s.plugin)?;
        if !names.insert(&s.name) {
            return Err(SitesError::Twice(s.name.clone()));
        }
    }
    for a in sites {
        for b in sites.iter().filter(|b| b.name != a.name) {
            if a.root == b.root {
                return Err(SitesError::SharedRoot {
                    a: a.name.clone(),
                    b: b.name.clone(),
                    root: a.root.display().to_string(),
                });
            }
            if a.root.starts_with(&b.root) {
                return Err(SitesError::Nested {
                    inner: a.name.clone(),
                    inner_root: a.root.display().to_string(),
                    outer: b.name.clone(),
                });
            }
        }
    }
    Ok(())
}

/// A site being served: its cm-site handle, its interpreter, and the lock that serialises its
/// applies (another site's applies go on meanwhile).
pub(super) struct ServedSite {
    pub spec: SiteSpec,
    pub site: Site,
    pub interpreter: cm_plugin_host::Interpreter,
    pub lock: Mutex<()>,
}

/// Opens every site of `specs` (checked with [`check_sites`] by the caller) and its
/// interpreter from `store`. A plugin name missing from the store gets the bundled
/// interpreter (`default_interpreter`), granted every site that names it, so a fresh server
/// needs nothing but the binary.
pub(super) fn open_sites(
    specs: &[SiteSpec],
    store: &PluginStore,
    store_dir: &Path,
    default_interpreter: &[u8],
    checks: &SiteConfig,
) -> Result<Vec<ServedSite>, AgentError> {
    let plugins: BTreeSet<&str> = specs.iter().map(|s| s.plugin.as_str()).collect();
    for plugin in plugins {
        let granted: Vec<&str> =
            specs.iter().filter(|s| s.plugin == plugin).map(|s| s.name.as_str()).collect();
        // A version that drops one of these sites is refused when installed or followed, not
        // at the next publish.
        store.require_sites(plugin, &granted);
        if store.slot(plugin).is_ok() {
            continue;
        }
        let manifest = cm_plugin_host::bundled::interpreter_manifest(plugin, &granted);
        store.install(default_interpreter, manifest, "bundled interpreter.wasm").map_err(
            |source| AgentError::PluginStore {
                what: format!(
                    "installing the bundled interpreter as {plugin} into {}",
                    store_dir.display()
                ),
                source: Box::new(source),
            },
        )?;
        tracing::info!(store = %store_dir.display(), plugin, sites = ?granted, "installed the bundled interpreter plugin");
    }
    specs
        .iter()
        .map(|spec| {
            let site = Site::open(&spec.root, checks.clone())
                .map_err(|e| AgentError::Site(Box::new(e)))?;
            let interpreter = store.interpreter(&spec.plugin, &spec.name).map_err(|source| {
                AgentError::Plugin {
                    what: format!("interpreter {} for site {}", spec.plugin, spec.name),
                    source: Box::new(source),
                }
            })?;
            Ok(ServedSite { spec: spec.clone(), site, interpreter, lock: Mutex::new(()) })
        })
        .collect()
}

/// The site an assignment file names in its header. Only read here to pick the root: the
/// apply then checks every byte (the header included) against the manager's signature, so a
/// header changed on the way fails there, whichever site it was sent to.
pub fn site_of(file: &Path) -> Result<String, String> {
    let f = File::open(file).map_err(|e| format!("opening the assignment: {e}"))?;
    let mut hb = [0u8; HEADER_LEN];
    f.read_exact_at(&mut hb, 0).map_err(|e| format!("reading the assignment's header: {e}"))?;
    Header::decode(&hb).map(|h| h.site).map_err(|e| format!("the assignment's header: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sites_need_names_of_their_own_and_roots_apart() {
        let www = SiteSpec::new("www", "/srv/www");
        let shop = SiteSpec::new("shop", "/srv/shop");
        assert_eq!(check_sites(&[www.clone(), shop.clone()]), Ok(()));
        assert_eq!(check_sites(&[]), Err(SitesError::None));
        assert_eq!(
            check_sites(&[www.clone(), SiteSpec::new("www", "/srv/other")]),
            Err(SitesError::Twice("www".into()))
        );
        assert!(matches!(
            check_sites(&[www.clone(), SiteSpec::new("shop", "/srv/www")]),
            Err(SitesError::SharedRoot { .. })
        ));
        assert!(matches!(
            check_sites(&[www.clone(), SiteSpec::new("shop", "/srv/www/releases")]),
            Err(SitesError::Nested { .. })
        ));
        let e = check_sites(&[SiteSpec::new("../x", "/srv/x")]).unwrap_err();
        assert!(e.to_string().starts_with("site name `../x`"), "{e}");
        let mut bad_plugin = shop;
        bad_plugin.plugin = "a/b".into();
        assert!(check_sites(&[www, bad_plugin]).unwrap_err().to_string().contains("site plugin"));
    }
}

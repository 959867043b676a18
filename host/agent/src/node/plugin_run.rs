//! A plugin run (`AssignmentType::Plugin`, `cmover plugin publish`): the manager's signed
//! component and manifest, installed into this server's plugin store through the store's own
//! install — validated (a component of the manifest's world, grants, the sites this agent
//! requires of an interpreter), self-checked, then hot-swapped — or refused with the reason,
//! which the server reports like any failed apply.
//!
//! Stricter than content: a plugin run must carry a pinned manager key's signature even where
//! signatures are otherwise off, and must be newer than every plugin run installed here, so a
//! relay replaying an old genuine run cannot swap an older version back in.

use std::path::Path;

use cm_assignment::AssignmentReader;
use cm_assignment::plugin_run::read_plugin_run;
use cm_plugin_host::{PluginManifest, PluginStore};
use cm_site::SiteConfig;

use super::sites::ServedSite;

/// Verifies and installs the plugin run at `file`. `serials` is the file recording the
/// newest plugin run installed. Ok: one line for the outcome; Err: why it was refused.
pub(super) fn install(
    file: &Path,
    checks: &SiteConfig,
    store: &PluginStore,
    sites: &[ServedSite],
    serials: &Path,
) -> Result<String, String> {
    let mut r = AssignmentReader::open(file).map_err(|e| format!("plugin run: {e}"))?;
    if let Some(k) = &checks.cipher {
        r.decrypt_with(k).map_err(|e| format!("plugin run: {e}"))?;
    }
    let Some(signers) = checks.signers.as_ref() else {
        return Err("plugin run refused: this server pins no manager key, and a plugin run \
                    must be signed by one"
            .into());
    };
    r.verify(checks.key.as_ref(), Some(signers)).map_err(|e| format!("plugin run refused: {e}"))?;
    let serial = r.header().serial;
    let newest = std::fs::read_to_string(serials)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    if serial <= newest {
        return Err(format!(
            "plugin run refused: serial {serial} is not newer than plugin run {newest} installed here (a replay)"
        ));
    }
    let run = read_plugin_run(&r).map_err(|e| e.to_string())?;
    let origin = format!("the manifest of plugin run serial {serial}");
    let manifest = PluginManifest::parse(&run.manifest, &origin).map_err(|e| e.to_string())?;
    // A site's plugin must be an interpreter: a store accepts any world under any name.
    if let Some(s) = sites.iter().find(|s| s.spec.plugin == manifest.name)
        && manifest.world != "interpreter"
    {
        return Err(format!(
            "plugin {} is a {} but site {} applies its content with it: an interpreter is required; refused, the live version stays",
            manifest.name, manifest.world, s.spec.name
        ));
    }
    let name = manifest.name.clone();
    let installed = store
        .install(&run.component, manifest, &format!("plugin run serial {serial}"))
        .map_err(|e| format!("plugin {name} refused: {e}"))?;
    write_atomic(serials, serial.to_string().as_bytes())
        .map_err(|e| format!("plugin {name} installed, but recording serial {serial}: {e}"))?;
    Ok(match installed.replaced {
        Some(old) => format!("plugin {name} {} installed (was {old})", installed.version),
        None => format!("plugin {name} {} installed", installed.version),
    })
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)
}

//! The plugin assignment (`AssignmentType::Plugin`): a plugin component and its manifest for
//! the servers' plugin stores, carried like content — the same header, trailer, seal and
//! manager signature, the same tree and MCTP transport — so no second transport or trust path
//! exists for plugins. The body is exactly two write-file commands, [`COMPONENT`] then
//! [`MANIFEST`]; a server reads them into memory (bounded here) only after
//! [`AssignmentReader::verify`] passed, and installs them through its plugin store.

use std::io::Read;
use std::path::Path;

use crate::format::{AssignmentType, Command};
use crate::policy::CompressionPolicy;
use crate::read::{AssignmentReader, ReadError};
use crate::write::{AssignmentWriter, Meta, WriteError};
use crate::{Header, SealKey, SigningKey};

/// The component's path in the body.
pub const COMPONENT: &str = "component.wasm";
/// The manifest's path in the body.
pub const MANIFEST: &str = "manifest.toml";
/// Largest component a plugin run carries.
pub const MAX_COMPONENT: u64 = 64 << 20;
/// Largest manifest a plugin run carries.
pub const MAX_MANIFEST: u64 = 64 << 10;

/// What a plugin run carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginRun {
    pub component: Vec<u8>,
    pub manifest: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PluginRunError {
    #[error("a {0} assignment is not a plugin run")]
    NotAPluginRun(AssignmentType),
    #[error("plugin run: {0}")]
    Read(#[from] ReadError),
    #[error("plugin run: {0}")]
    Shape(String),
}

/// Writes the plugin run of `component` and `manifest` (files on the manager) to `out`,
/// signed with `signer`. `meta.kind` is forced to [`AssignmentType::Plugin`].
pub fn build_plugin_run(
    out: &Path,
    mut meta: Meta,
    component: &Path,
    manifest: &Path,
    seal: Option<SealKey>,
    signer: Option<SigningKey>,
) -> Result<Header, WriteError> {
    meta.kind = AssignmentType::Plugin;
    let mut w = AssignmentWriter::create(out, meta, CompressionPolicy::none(), seal)?;
    if let Some(k) = signer {
        w.sign_with(k);
    }
    for (path, src) in [(COMPONENT, component), (MANIFEST, manifest)] {
        let f = std::fs::File::open(src).map_err(|source| WriteError::Io {
            what: format!("opening {}", src.display()),
            source,
        })?;
        w.write_file(path, 0o644, 0, &f)?;
    }
    w.finish()
}

/// Reads a verified plugin run: exactly [`COMPONENT`] then [`MANIFEST`], each within its bound
/// and matching the BLAKE3 its command names. Call [`AssignmentReader::verify`] first: this
/// trusts the signature, not the bytes' origin.
pub fn read_plugin_run(r: &AssignmentReader) -> Result<PluginRun, PluginRunError> {
    if r.header().kind != AssignmentType::Plugin {
        return Err(PluginRunError::NotAPluginRun(r.header().kind));
    }
    let shape = |why: &str| PluginRunError::Shape(why.to_string());
    let mut files = Vec::new();
    for item in r.commands() {
        let (_, cmd) = item?;
        let Command::WriteFile { path, payload, hash, .. } = cmd else {
            return Err(shape("carries a command other than write-file"));
        };
        let (want, max) = match files.len() {
            0 => (COMPONENT, MAX_COMPONENT),
            1 => (MANIFEST, MAX_MANIFEST),
            _ => return Err(shape("carries more than a component and a manifest")),
        };
        if path != want {
            return Err(PluginRunError::Shape(format!("expected {want}, found {path:?}")));
        }
        if payload.len > max {
            return Err(PluginRunError::Shape(format!(
                "{path} is {} bytes, more than {max}",
                payload.len
            )));
        }
        let mut bytes = Vec::with_capacity(payload.len as usize);
        r.payload(&payload)?
            .read_to_end(&mut bytes)
            .map_err(|source| ReadError::Io { what: "reading a plugin run's payload", source })?;
        if *blake3::hash(&bytes).as_bytes() != hash {
            return Err(PluginRunError::Shape(format!("{path} does not match its BLAKE3")));
        }
        files.push(bytes);
    }
    let [component, manifest]: [Vec<u8>; 2] =
        files.try_into().map_err(|_| shape("lacks its component or its manifest"))?;
    let manifest = String::from_utf8(manifest).map_err(|_| shape("manifest is not UTF-8"))?;
    Ok(PluginRun { component, manifest })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sign::SigningKey;

    fn meta() -> Meta {
        Meta {
            kind: AssignmentType::Plugin,
            serial: 7,
            job_id: 1,
            base_serial: 0,
            target_serial: 0,
            site: "www".into(),
        }
    }

    #[test]
    fn a_plugin_run_round_trips_signed_and_a_flipped_byte_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let (c, m, out) = (d.path().join("c.wasm"), d.path().join("m.toml"), d.path().join("a"));
        std::fs::write(&c, b"\0asm component bytes").unwrap();
        std::fs::write(&m, "name = \"interpreter\"\n").unwrap();
        let key = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap();
        let trusted = crate::TrustedKeys::new([key.public_key()]);
        build_plugin_run(&out, meta(), &c, &m, None, Some(key)).unwrap();
        let r = AssignmentReader::open(&out).unwrap();
        r.verify(None, Some(&trusted)).unwrap();
        let run = read_plugin_run(&r).unwrap();
        assert_eq!(run.component, b"\0asm component bytes");
        assert_eq!(run.manifest, "name = \"interpreter\"\n");

        let mut bytes = std::fs::read(&out).unwrap();
        let last = bytes.len() - 3;
        bytes[last] ^= 1;
        std::fs::write(&out, &bytes).unwrap();
        let r = AssignmentReader::open(&out).unwrap();
        assert!(r.verify(None, Some(&trusted)).is_err());
    }

    #[test]
    fn content_is_not_a_plugin_run() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("a");
        let m = Meta { kind: AssignmentType::Commit, target_serial: 3, ..meta() };
        crate::detect::build_switch(&out, m, None, None).unwrap();
        let r = AssignmentReader::open(&out).unwrap();
        assert!(matches!(read_plugin_run(&r), Err(PluginRunError::NotAPluginRun(_))));
    }
}

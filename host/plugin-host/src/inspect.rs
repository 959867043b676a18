//! `cmover plugin inspect`: what a component is, before anyone installs it.

use crate::error::InstallError;
use crate::manifest::World;
use crate::runtime::PluginRuntime;

/// What a component file contains.
#[derive(Debug, Clone)]
pub struct ComponentInfo {
    /// The Content Mover world it implements, if any.
    pub world: Option<World>,
    pub imports: Vec<String>,
    pub exports: Vec<String>,
    pub size: u64,
    pub blake3: String,
    /// Why it could not be installed as it is (unknown imports), if anything.
    pub problem: Option<String>,
}

/// Compile (or load from the compiled cache) `bytes` and describe it.
pub fn inspect(
    runtime: &PluginRuntime,
    bytes: &[u8],
    file: &str,
) -> Result<ComponentInfo, InstallError> {
    let compiled = runtime.compile(bytes, file)?;
    let world = runtime.world_of(&compiled.component, file).ok();
    let problem = match world {
        Some(world) => {
            runtime.check_imports(&compiled.component, world, file).err().map(|e| e.to_string())
        }
        None => Some(runtime.world_of(&compiled.component, file).unwrap_err().to_string()),
    };
    Ok(ComponentInfo {
        world,
        imports: runtime.imports(&compiled.component),
        exports: runtime.exports(&compiled.component),
        size: bytes.len() as u64,
        blake3: compiled.hash.to_hex().to_string(),
        problem,
    })
}

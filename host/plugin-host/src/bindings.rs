//! Host-side bindings generated from `sdk/wit/` (one module per world). The interfaces the worlds
//! share (`log`, `config`, `payload`, `staging`, `endpoint`) are generated once, in `interpreter`, and
//! reused by the other worlds, so the host implements each of them exactly once.

/// World `interpreter`.
pub mod interpreter {
    wasmtime::component::bindgen!({
        path: "../../sdk/wit",
        world: "interpreter",
        imports: { default: trappable },
        with: {
            "contentmover:plugin/payload.data-source": crate::sandbox::DataSource,
            "contentmover:plugin/staging.file-reader": crate::staging::FileReader,
            "contentmover:plugin/staging.file-writer": crate::staging::FileWriter,
        },
    });
}

/// World `cache-invalidator`.
pub mod cache_invalidator {
    wasmtime::component::bindgen!({
        path: "../../sdk/wit",
        world: "cache-invalidator",
        imports: { default: trappable },
        with: {
            "contentmover:plugin/log": super::interpreter::contentmover::plugin::log,
            "contentmover:plugin/config": super::interpreter::contentmover::plugin::config,
            "contentmover:plugin/endpoint": super::interpreter::contentmover::plugin::endpoint,
        },
    });
}

/// World `load-balancer`.
pub mod load_balancer {
    wasmtime::component::bindgen!({
        path: "../../sdk/wit",
        world: "load-balancer",
        imports: { default: trappable },
        with: {
            "contentmover:plugin/log": super::interpreter::contentmover::plugin::log,
            "contentmover:plugin/config": super::interpreter::contentmover::plugin::config,
            "contentmover:plugin/endpoint": super::interpreter::contentmover::plugin::endpoint,
        },
    });
}

pub use interpreter::contentmover::plugin::{config, endpoint, log, payload, staging};

//! The Content Mover plugin SDK.
//!
//! A plugin is a WebAssembly component targeting one world of the `contentmover:plugin` WIT
//! package (bundled in this crate's `wit/`): `interpreter` (the default feature), `cache-invalidator` or
//! `load-balancer`. Enable exactly one of those features.
//!
//! The short route, an interpreter that logs every command and then carries it out:
//!
//! ```ignore
//! use cm_plugin_sdk::{Command, Interpreter, log};
//!
//! struct Audit;
//!
//! impl Interpreter for Audit {
//!     fn command(command: Command) -> Result<(), String> {
//!         log::write(log::Level::Info, &cm_plugin_sdk::describe(&command));
//!         cm_plugin_sdk::execute(command)
//!     }
//! }
//!
//! cm_plugin_sdk::interpreter!(Audit);
//! ```
//!
//! Every export the SDK's macros make first installs a panic hook ([`install_panic_hook`]) that
//! writes the panic message through `log` (level `error`) before the trap, so the host's error
//! says why the plugin stopped. The manifest's `[config]` table is read with [`config::get`] and
//! [`config::entries`].
//!
//! The raw route stays open: the generated bindings are in [`bindings`], and their `export!`
//! macros (`export_interpreter!`, `export_cache_invalidator!`, `export_load_balancer!`) take a
//! type implementing the generated `Guest` trait directly.

#[cfg(any(
    all(feature = "interpreter", feature = "cache-invalidator"),
    all(feature = "interpreter", feature = "load-balancer"),
    all(feature = "cache-invalidator", feature = "load-balancer"),
))]
compile_error!(
    "a plugin targets exactly one world: enable one of the features `interpreter`, `cache-invalidator`, `load-balancer` (use `default-features = false` for the last two)"
);

pub use wit_bindgen;

// The generated bindings name this crate by its public path, which must also resolve inside it.
extern crate self as cm_plugin_sdk;

/// The wit-bindgen output for the enabled world.
pub mod bindings {
    #[cfg(feature = "interpreter")]
    wit_bindgen::generate!({
        path: "wit",
        world: "interpreter",
        pub_export_macro: true,
        export_macro_name: "export_interpreter",
        default_bindings_module: "cm_plugin_sdk::bindings",
        runtime_path: "cm_plugin_sdk::wit_bindgen::rt",
    });

    #[cfg(feature = "cache-invalidator")]
    wit_bindgen::generate!({
        path: "wit",
        world: "cache-invalidator",
        pub_export_macro: true,
        export_macro_name: "export_cache_invalidator",
        default_bindings_module: "cm_plugin_sdk::bindings",
        runtime_path: "cm_plugin_sdk::wit_bindgen::rt",
    });

    #[cfg(feature = "load-balancer")]
    wit_bindgen::generate!({
        path: "wit",
        world: "load-balancer",
        pub_export_macro: true,
        export_macro_name: "export_load_balancer",
        default_bindings_module: "cm_plugin_sdk::bindings",
        runtime_path: "cm_plugin_sdk::wit_bindgen::rt",
    });
}

pub use bindings::contentmover::plugin::{config, endpoint, log};

mod panic;
pub use panic::install_panic_hook;

#[cfg(feature = "interpreter")]
mod interpreter;
#[cfg(feature = "interpreter")]
pub use interpreter::*;

#[cfg(feature = "cache-invalidator")]
pub use bindings::exports::contentmover::plugin::cache_invalidation::Guest as CacheInvalidator;

#[cfg(feature = "load-balancer")]
pub use bindings::exports::contentmover::plugin::load_balancing::{PathRate, ServerState};

/// What a load-balancer plugin implements. `route_paths`, `path_rates` and `sessions` came
/// after the first release: a plugin without them keeps the default, which answers an error
/// saying the balancer does not support it.
#[cfg(feature = "load-balancer")]
pub trait LoadBalancer {
    fn drain(server: String) -> Result<(), String>;
    fn undrain(server: String) -> Result<(), String>;
    fn add(server: String, address: String) -> Result<(), String>;
    fn remove(server: String) -> Result<(), String>;
    fn state(server: String) -> Result<ServerState, String>;
    fn self_check() -> Result<(), String>;
    fn route_paths(pool: String, paths: Vec<String>) -> Result<(), String> {
        let _ = (pool, paths);
        Err("unsupported: this load-balancer plugin does not route request paths".into())
    }
    fn path_rates() -> Result<Vec<PathRate>, String> {
        Err("unsupported: this load-balancer plugin does not count request rates".into())
    }
    fn sessions(server: String) -> Result<u32, String> {
        let _ = server;
        Err("unsupported: this load-balancer plugin does not count sessions".into())
    }
}

/// Export a type implementing [`CacheInvalidator`] as the plugin's `cache-invalidation`
/// (every call first installs the panic hook).
#[cfg(feature = "cache-invalidator")]
#[macro_export]
macro_rules! cache_invalidator {
    ($plugin:ident) => {
        const _: () = {
            use ::std::string::String;
            use ::std::vec::Vec;
            use $crate::CacheInvalidator as Guest;
            struct Exported;
            impl Guest for Exported {
                fn invalidate(site: String, paths: Vec<String>) -> Result<(), String> {
                    $crate::install_panic_hook();
                    <$plugin as Guest>::invalidate(site, paths)
                }
                fn purge_site(site: String) -> Result<(), String> {
                    $crate::install_panic_hook();
                    <$plugin as Guest>::purge_site(site)
                }
                fn self_check() -> Result<(), String> {
                    $crate::install_panic_hook();
                    <$plugin as Guest>::self_check()
                }
            }
    $crate::bindings::export_cache_invalidator!(Exported with_types_in $crate::bindings);
        };
    };
}

/// Export a type implementing [`LoadBalancer`] as the plugin's `load-balancing` (every call
/// first installs the panic hook).
#[cfg(feature = "load-balancer")]
#[macro_export]
macro_rules! load_balancer {
    ($plugin:ident) => {
        const _: () = {
            use ::std::string::String;
            use ::std::vec::Vec;
            use $crate::LoadBalancer as Plugin;
            use $crate::bindings::exports::contentmover::plugin::load_balancing::Guest;
            struct Exported;
            impl Guest for Exported {
                fn drain(server: String) -> Result<(), String> {
                    $crate::install_panic_hook();
                    <$plugin as Plugin>::drain(server)
                }
                fn undrain(server: String) -> Result<(), String> {
                    $crate::install_panic_hook();
                    <$plugin as Plugin>::undrain(server)
                }
                fn add(server: String, address: String) -> Result<(), String> {
                    $crate::install_panic_hook();
                    <$plugin as Plugin>::add(server, address)
                }
                fn remove(server: String) -> Result<(), String> {
                    $crate::install_panic_hook();
                    <$plugin as Plugin>::remove(server)
                }
                fn state(server: String) -> Result<$crate::ServerState, String> {
                    $crate::install_panic_hook();
                    <$plugin as Plugin>::state(server)
                }
                fn route_paths(pool: String, paths: Vec<String>) -> Result<(), String> {
                    $crate::install_panic_hook();
                    <$plugin as Plugin>::route_paths(pool, paths)
                }
                fn path_rates() -> Result<Vec<$crate::PathRate>, String> {
                    $crate::install_panic_hook();
                    <$plugin as Plugin>::path_rates()
                }
                fn sessions(server: String) -> Result<u32, String> {
                    $crate::install_panic_hook();
                    <$plugin as Plugin>::sessions(server)
                }
                fn self_check() -> Result<(), String> {
                    $crate::install_panic_hook();
                    <$plugin as Plugin>::self_check()
                }
            }
    $crate::bindings::export_load_balancer!(Exported with_types_in $crate::bindings);
        };
    };
}

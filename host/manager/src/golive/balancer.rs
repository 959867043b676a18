//! The manager's side of the load-balancer plugin world: the plugin comes from the manager's
//! own plugin store (`<data>/plugins`, installed by whoever administers the manager's machine
//! with `cmover plugin install --store`), so the endpoint grants (the balancer's socket or
//! address) are the host administrator's, never an API caller's; site settings only pick a
//! plugin by name. Every call blocks (a fresh sandboxed instance), so it runs on a blocking
//! thread.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cm_plugin_host::{
    LoadBalancer, PathRate, PluginRuntime, PluginStore, RuntimeConfig, ServerState,
};
use thiserror::Error;

/// Why a balancer step failed.
#[derive(Debug, Error)]
pub enum BalancerError {
    #[error("load balancer `{name}`: plugin store {store}: {why}")]
    Store { name: String, store: String, why: String },
    #[error("load balancer `{name}`: {action} {server}: {why}")]
    Call { name: String, action: &'static str, server: String, why: String },
    #[error(
        "load balancer `{name}`: {server} not reported draining within {waited_ms} ms (last: {last:?})"
    )]
    NotDrained { name: String, server: String, waited_ms: u64, last: ServerState },
}

/// The manager's plugin store directory.
pub fn store_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("plugins")
}

/// One load-balancer plugin of the manager's store, opened for a step of a roll.
pub struct Balancer {
    name: String,
    lb: LoadBalancer,
    // Kept alive as long as the handle.
    _store: PluginStore,
}

impl Balancer {
    /// Opens the store (compiled components cached in it) and the plugin `name`, which must
    /// implement the load-balancer world.
    pub fn open(data_dir: &Path, name: &str) -> Result<Balancer, BalancerError> {
        let dir = store_dir(data_dir);
        let err = |why: String| BalancerError::Store {
            name: name.into(),
            store: dir.display().to_string(),
            why,
        };
        let runtime = PluginRuntime::new(RuntimeConfig {
            compiled_cache: Some(PluginStore::compiled_cache_dir(&dir)),
            max_instances: 4,
            max_memory_mib: 64,
            ..RuntimeConfig::default()
        })
        .map_err(|e| err(e.to_string()))?;
        let store = PluginStore::open(runtime, &dir).map_err(|e| err(e.to_string()))?;
        let lb = store.load_balancer(name).map_err(|e| err(e.to_string()))?;
        Ok(Balancer { name: name.into(), lb, _store: store })
    }

    fn call_err(&self, action: &'static str, server: &str, e: impl ToString) -> BalancerError {
        BalancerError::Call {
            name: self.name.clone(),
            action,
            server: server.into(),
            why: e.to_string(),
        }
    }

    pub fn drain(&self, server: &str) -> Result<(), BalancerError> {
        self.lb.drain(server).map_err(|e| self.call_err("drain", server, e))
    }

    pub fn undrain(&self, server: &str) -> Result<(), BalancerError> {
        self.lb.undrain(server).map_err(|e| self.call_err("undrain", server, e))
    }

    pub fn add(&self, server: &str, address: &str) -> Result<(), BalancerError> {
        self.lb.add(server, address).map_err(|e| self.call_err("add", server, e))
    }

    pub fn remove(&self, server: &str) -> Result<(), BalancerError> {
        self.lb.remove(server).map_err(|e| self.call_err("remove", server, e))
    }

    pub fn state(&self, server: &str) -> Result<ServerState, BalancerError> {
        self.lb.state(server).map_err(|e| self.call_err("state", server, e))
    }

    /// Sends exactly `paths` (URL paths) to `pool` (`pool` names the routing, not a server).
    pub fn route_paths(&self, pool: &str, paths: &[String]) -> Result<(), BalancerError> {
        self.lb.route_paths(pool, paths).map_err(|e| self.call_err("route-paths", pool, e))
    }

    /// The balancer's request counts per URL path.
    pub fn path_rates(&self) -> Result<Vec<PathRate>, BalancerError> {
        self.lb.path_rates().map_err(|e| self.call_err("path-rates", "", e))
    }

    /// Drains `server` and waits (polling `state`, at most `timeout`) until the balancer
    /// reports it out of rotation for new requests.
    pub fn drain_and_wait(&self, server: &str, timeout: Duration) -> Result<(), BalancerError> {
        self.drain(server)?;
        let start = Instant::now();
        loop {
            let last = self.state(server)?;
            if matches!(last, ServerState::Drain | ServerState::Maint) {
                return Ok(());
            }
            if start.elapsed() >= timeout {
                return Err(BalancerError::NotDrained {
                    name: self.name.clone(),
                    server: server.into(),
                    waited_ms: timeout.as_millis() as u64,
                    last,
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

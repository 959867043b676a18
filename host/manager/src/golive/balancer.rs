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

/// How often a drain polls the drained servers' sessions.
const SESSIONS_POLL: Duration = Duration::from_millis(50);

/// How a drain's wait for the drained servers' sessions ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DrainWait {
    /// Every drained server's sessions ended.
    Ended { after_ms: u64 },
    /// The grace (`drain_grace_ms`, the upper bound) passed with `open` sessions left.
    GraceOver { open: u64, grace_ms: u64 },
    /// The balancer could not count sessions: the whole grace is waited, as before counting.
    Uncounted { why: String, grace_ms: u64 },
}

impl std::fmt::Display for DrainWait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DrainWait::Ended { after_ms } => write!(f, "sessions ended after {after_ms} ms"),
            DrainWait::GraceOver { open, grace_ms } => write!(
                f,
                "{open} session{} still open after the {grace_ms} ms grace: switching anyway",
                if *open == 1 { "" } else { "s" }
            ),
            DrainWait::Uncounted { why, grace_ms } => {
                write!(f, "sessions not counted ({why}): waited the {grace_ms} ms grace")
            }
        }
    }
}

/// The wait decision after one poll that counted `open` sessions `elapsed` after the wait
/// began: done (how), or `None` to poll again.
pub fn sessions_wait(open: u64, elapsed: Duration, grace: Duration) -> Option<DrainWait> {
    if open == 0 {
        Some(DrainWait::Ended { after_ms: elapsed.as_millis() as u64 })
    } else if elapsed >= grace {
        Some(DrainWait::GraceOver { open, grace_ms: grace.as_millis() as u64 })
    } else {
        None
    }
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

    /// The sessions `server` holds on the balancer now.
    pub fn sessions(&self, server: &str) -> Result<u32, BalancerError> {
        self.lb.sessions(server).map_err(|e| self.call_err("sessions", server, e))
    }

    /// Polls `sessions` of every drained server until none holds one or `grace` has passed.
    /// A balancer that cannot count them (a plugin answering "unsupported", or any error)
    /// ends the poll at once: the caller then waits out the grace.
    pub fn wait_sessions(&self, servers: &[String], grace: Duration) -> DrainWait {
        let start = Instant::now();
        let grace_ms = grace.as_millis() as u64;
        loop {
            let mut open = 0u64;
            for s in servers {
                match self.sessions(s) {
                    Ok(n) => open += u64::from(n),
                    Err(e) => return DrainWait::Uncounted { why: e.to_string(), grace_ms },
                }
            }
            match sessions_wait(open, start.elapsed(), grace) {
                Some(done) => return done,
                None => {
                    std::thread::sleep(SESSIONS_POLL.min(grace.saturating_sub(start.elapsed())))
                }
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_millis(2_000);

    #[test]
    fn no_open_session_ends_the_wait_even_at_once() {
        assert_eq!(sessions_wait(0, Duration::ZERO, GRACE), Some(DrainWait::Ended { after_ms: 0 }));
        let ended = sessions_wait(0, Duration::from_millis(340), GRACE).unwrap();
        assert_eq!(ended.to_string(), "sessions ended after 340 ms");
    }

    #[test]
    fn open_sessions_are_waited_for_until_the_grace_and_no_longer() {
        assert_eq!(sessions_wait(3, Duration::from_millis(1_999), GRACE), None);
        let over = sessions_wait(2, GRACE, GRACE).unwrap();
        assert_eq!(over, DrainWait::GraceOver { open: 2, grace_ms: 2_000 });
        assert_eq!(
            over.to_string(),
            "2 sessions still open after the 2000 ms grace: switching anyway"
        );
        // Sessions ending at the last poll count as ended, not as a grace overrun.
        assert!(matches!(sessions_wait(0, GRACE * 2, GRACE), Some(DrainWait::Ended { .. })));
    }

    #[test]
    fn a_zero_grace_never_waits() {
        let done = sessions_wait(1, Duration::ZERO, Duration::ZERO);
        assert_eq!(done, Some(DrainWait::GraceOver { open: 1, grace_ms: 0 }));
    }
}

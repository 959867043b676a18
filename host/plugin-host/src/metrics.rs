//! Prometheus counters of plugin calls: every call (a stateless world's call on a fresh
//! instance, or one call of an interpreter session) by outcome, so traps, deadline hits,
//! memory and quota breaches are visible next to the successes. The process adds them to its
//! registry with [`register`].

use std::sync::LazyLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::{FailureCause, PluginError};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    /// ok, deadline, trap, memory, quota, instantiate, veto, error.
    outcome: &'static str,
}

static CALLS: LazyLock<Family<CallLabels, Counter>> = LazyLock::new(Family::default);

/// Adds the plugin calls to the process's registry.
pub fn register(registry: &mut Registry) {
    registry.register(
        "cmover_plugin_calls",
        "Plugin calls by outcome (deadline: stopped at its deadline; trap: the guest trapped)",
        CALLS.clone(),
    );
}

/// One call ended with `outcome`.
pub(crate) fn call<T>(outcome: &Result<T, PluginError>) {
    let outcome = match outcome {
        Ok(_) => "ok",
        Err(PluginError::Failed { cause, .. }) => match cause {
            FailureCause::Deadline { .. } => "deadline",
            FailureCause::Trap(_) => "trap",
            FailureCause::MemoryLimit { .. } => "memory",
            FailureCause::Quota(_) => "quota",
            FailureCause::Instantiate(_) => "instantiate",
        },
        Err(PluginError::Vetoed { .. }) => "veto",
        Err(_) => "error",
    };
    CALLS.get_or_create(&CallLabels { outcome }).inc();
}

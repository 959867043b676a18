//! A panic says why: the message goes through the host's `log` before the trap.
//!
//! A Rust panic in a plugin is a wasm `unreachable` (panic = "abort"): without this hook the
//! host only sees a trap and a backtrace of numbered wasm functions. The hook writes
//! `panicked at <file>:<line>: <message>` at level `error`; the host puts the last such record
//! in the call's error.

use std::sync::Once;

use crate::log;

static INSTALL: Once = Once::new();

/// Install the panic hook (once per instance; later calls cost one atomic load). The SDK's
/// export macros call it at the start of every export; call it yourself when exporting with
/// the raw `export_*!` macros.
pub fn install_panic_hook() {
    INSTALL.call_once(|| std::panic::set_hook(Box::new(report)));
}

fn report(info: &std::panic::PanicHookInfo<'_>) {
    let payload = info.payload();
    let message = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(a panic without a message)");
    let text = match info.location() {
        Some(at) => format!("panicked at {}:{}: {message}", at.file(), at.line()),
        None => format!("panicked: {message}"),
    };
    log::write(log::Level::Error, &text);
}

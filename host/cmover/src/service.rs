//! What the long-running commands (`cmover manager`, `cmover agent`) share as services: the
//! signals they act on (SIGTERM and SIGINT stop gracefully, SIGHUP reloads) and systemd's
//! readiness protocol (`Type=notify`: READY=1 once serving, RELOADING=1 while a SIGHUP is
//! handled, STOPPING=1 when stopping; nothing is sent without `NOTIFY_SOCKET`).

use std::path::Path;

use anyhow::{Context, bail};
use sd_notify::NotifyState;
use tokio::signal::unix::{Signal, SignalKind, signal};

/// What a signal asks of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Stop,
    Reload,
}

/// SIGTERM, SIGINT and SIGHUP, installed at once (so none kills the process from then on).
pub struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    pub fn install() -> anyhow::Result<Signals> {
        let on = |k: SignalKind, name: &str| {
            signal(k).with_context(|| format!("installing the {name} handler"))
        };
        Ok(Signals {
            term: on(SignalKind::terminate(), "SIGTERM")?,
            int: on(SignalKind::interrupt(), "SIGINT")?,
            hup: on(SignalKind::hangup(), "SIGHUP")?,
        })
    }

    /// The next request.
    pub async fn next(&mut self) -> Request {
        tokio::select! {
            _ = self.term.recv() => Request::Stop,
            _ = self.int.recv() => Request::Stop,
            _ = self.hup.recv() => Request::Reload,
        }
    }
}

fn notify(state: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!("telling the service manager ({state:?}): {e}");
    }
}

/// The process serves (READY=1).
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A SIGHUP is being handled (RELOADING=1); [`ready`] ends it.
pub fn reloading() {
    let mut state = vec![NotifyState::Reloading];
    // systemd's notify-reload wants the reload's start time; plain `notify` units ignore it.
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        state.push(now);
    }
    notify(&state);
}

/// The process is stopping (STOPPING=1).
pub fn stopping() {
    notify(&[NotifyState::Stopping]);
}

/// A secret from a file (trimmed; at least 16 characters), with `key` naming the setting.
pub fn read_secret(path: &Path, key: &str) -> anyhow::Result<String> {
    let s = std::fs::read_to_string(path)
        .with_context(|| format!("{key}: cannot read {}", path.display()))?;
    let s = s.trim().to_string();
    if s.len() < 16 {
        bail!("{key}: the secret in {} must be at least 16 characters", path.display());
    }
    Ok(s)
}

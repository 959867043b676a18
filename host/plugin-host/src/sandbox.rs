//! Per-call sandbox state (the `T` of every `Store<T>`): the resource table, the memory cap,
//! the quotas (`quota.rs`), the capabilities this call was granted (one staging tree, some
//! endpoints), and the host side of the small `payload`, `log` and `config` interfaces.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::Arc;

use wasmtime::ResourceLimiter;
use wasmtime::component::{Resource, ResourceTable};

use crate::bindings::{config, log, payload};
use crate::endpoint::Endpoints;
use crate::quota::Quotas;
use crate::staging::Staging;
use cm_assignment::PayloadReader;

/// Receives every record a plugin writes through the `log` interface (besides `tracing`).
pub type LogSink = Arc<dyn Fn(&str, LogLevel, &str) + Send + Sync>;

/// Level of a plugin's log record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// Longest log message kept; the rest is cut (a plugin cannot flood the host's log).
const MAX_LOG_MESSAGE: usize = 4096;

/// How the SDK's panic hook starts its record (`cm-plugin-sdk`'s `panic.rs`).
const PANIC_PREFIX: &str = "panicked";

/// Largest chunk a guest may ask `data-source.read` for in one call.
const MAX_READ_CHUNK: u32 = 1 << 20;

pub(crate) struct HostState {
    pub table: ResourceTable,
    pub memory: MemoryCap,
    /// The plugin's name, for logs and messages.
    pub plugin: Arc<str>,
    /// The one staging tree this call may touch, if any.
    pub staging: Option<Staging>,
    pub endpoints: Arc<Endpoints>,
    pub log_sink: Option<LogSink>,
    pub quotas: Quotas,
    /// The manifest's `[config]` table (validated: bounded, strings only).
    pub config: Arc<BTreeMap<String, String>>,
    /// The last `panicked at …` record the SDK's panic hook wrote in this call (kept even when
    /// the log quota drops it), so a trap says why.
    pub panic: Option<String>,
}

impl HostState {
    /// One record to `tracing` and the sink (quotas already applied).
    fn emit(&self, level: LogLevel, message: &str) {
        let plugin = &*self.plugin;
        match level {
            LogLevel::Trace => tracing::trace!(plugin, "{message}"),
            LogLevel::Debug => tracing::debug!(plugin, "{message}"),
            LogLevel::Info => tracing::info!(plugin, "{message}"),
            LogLevel::Warn => tracing::warn!(plugin, "{message}"),
            LogLevel::Error => tracing::error!(plugin, "{message}"),
        }
        if let Some(sink) = &self.log_sink {
            sink(plugin, level, message);
        }
    }

    /// A call ended: say how many of its log records the quota dropped, if any.
    pub(crate) fn end_call(&mut self) {
        if let Some(summary) = self.quotas.take_dropped_summary() {
            self.emit(LogLevel::Warn, &summary);
        }
    }
}

/// `ResourceLimiter` enforcing one plugin's memory cap. A refused growth is remembered so
/// the trap that usually follows (a Rust guest aborts on allocation failure) is reported as
/// what it is: the memory limit.
pub(crate) struct MemoryCap {
    pub limit_bytes: u64,
    /// Set when a growth was refused: the size the guest asked for.
    pub refused: Option<u64>,
}

/// Most table elements an instance may have (indirect-call tables are small).
const MAX_TABLE_ELEMENTS: usize = 100_000;

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired as u64 > self.limit_bytes {
            self.refused = Some(desired as u64);
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// Host side of `payload.data-source`: one command's bytes, read front to back.
pub struct DataSource {
    reader: Box<dyn PayloadReader>,
}

impl DataSource {
    pub(crate) fn new(reader: Box<dyn PayloadReader>) -> Self {
        Self { reader }
    }

    pub(crate) fn size(&self) -> u64 {
        self.reader.size()
    }

    /// Fill as much of `buf` as the reader gives before its end; 0 means exhausted.
    pub(crate) fn read_some(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut filled = 0;
        while filled < buf.len() {
            match self.reader.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(filled)
    }
}

impl payload::Host for HostState {}

impl payload::HostDataSource for HostState {
    fn size(&mut self, source: Resource<DataSource>) -> wasmtime::Result<u64> {
        Ok(self.table.get(&source)?.size())
    }

    fn read(
        &mut self,
        source: Resource<DataSource>,
        max_len: u32,
    ) -> wasmtime::Result<Result<Vec<u8>, String>> {
        let source = self.table.get_mut(&source)?;
        let mut buf = vec![0; max_len.min(MAX_READ_CHUNK) as usize];
        Ok(match source.read_some(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                Ok(buf)
            }
            Err(e) => Err(format!("reading payload: {e}")),
        })
    }

    fn drop(&mut self, source: Resource<DataSource>) -> wasmtime::Result<()> {
        self.table.delete(source)?;
        Ok(())
    }
}

impl log::Host for HostState {
    fn write(&mut self, level: log::Level, message: String) -> wasmtime::Result<()> {
        let mut message = message;
        if message.len() > MAX_LOG_MESSAGE {
            let mut cut = MAX_LOG_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str(" [truncated]");
        }
        if matches!(level, log::Level::Error) && message.starts_with(PANIC_PREFIX) {
            self.panic = Some(message.clone());
        }
        if !self.quotas.log(message.len()) {
            return Ok(());
        }
        let level = match level {
            log::Level::Trace => LogLevel::Trace,
            log::Level::Debug => LogLevel::Debug,
            log::Level::Info => LogLevel::Info,
            log::Level::Warn => LogLevel::Warn,
            log::Level::Error => LogLevel::Error,
        };
        self.emit(level, &message);
        Ok(())
    }
}

impl config::Host for HostState {
    fn get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        Ok(self.config.get(&key).cloned())
    }

    fn entries(&mut self) -> wasmtime::Result<Vec<(String, String)>> {
        Ok(self.config.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    }
}

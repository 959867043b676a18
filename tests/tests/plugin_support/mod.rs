//! Shared by the `plugin_*` tests: the runtime, components from `plugins/dist`, manifests.

#![allow(dead_code)]

use std::path::Path;
use std::sync::{Arc, Mutex};

use cm_assignment::{Command, MemoryPayload, StreamedCommand};
use cm_plugin_host::{
    LoadedPlugin, LogLevel, PluginManifest, PluginRuntime, RuntimeConfig, bundled,
};

/// The bytes of a component built from this repository (`plugins/dist/<name>.wasm`).
pub fn component(name: &str) -> Vec<u8> {
    let path = bundled::dist_dir().join(format!("{name}.wasm"));
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run `cargo xtask plugins`)", path.display()))
}

/// Every log record plugins wrote, as (plugin, level, message).
pub type Logs = Arc<Mutex<Vec<(String, LogLevel, String)>>>;

/// A runtime whose plugin logs are captured.
pub fn runtime() -> (PluginRuntime, Logs) {
    let logs: Logs = Arc::default();
    let sink = logs.clone();
    let config = RuntimeConfig {
        max_instances: 32,
        log_sink: Some(Arc::new(move |plugin: &str, level, message: &str| {
            sink.lock().unwrap().push((plugin.to_string(), level, message.to_string()))
        })),
        ..Default::default()
    };
    (PluginRuntime::new(config).expect("runtime"), logs)
}

/// An interpreter manifest granting every site, with the given limits.
pub fn interpreter_manifest(name: &str, memory_mib: u64, deadline_ms: u64) -> PluginManifest {
    let mut manifest = bundled::interpreter_manifest(name, &["*"]);
    manifest.limits.memory_mib = memory_mib;
    manifest.limits.deadline_ms = deadline_ms;
    manifest
}

/// Load `plugins/dist/<file>.wasm` as interpreter `name`.
pub fn load_interpreter(runtime: &PluginRuntime, file: &str) -> Arc<LoadedPlugin> {
    LoadedPlugin::load(runtime, &component(file), interpreter_manifest(file, 64, 2_000), file)
        .expect("load")
}

/// The default interpreter still works on this runtime.
pub fn host_still_works(runtime: &PluginRuntime) {
    let staging = tempfile::tempdir().unwrap();
    let reports = load_interpreter(runtime, "interpreter")
        .interpreter_session(staging.path())
        .unwrap()
        .apply(vec![write("ok.txt", b"ok")])
        .unwrap();
    assert!(reports[0].outcome.is_ok());
    assert_eq!(std::fs::read(staging.path().join("ok.txt")).unwrap(), b"ok");
}

pub fn write(path: &str, bytes: &[u8]) -> StreamedCommand {
    Command::WriteFile {
        path: path.into(),
        mode: 0o644,
        mtime: 1_700_000_000,
        payload: MemoryPayload::boxed(bytes),
        hash: *blake3::hash(bytes).as_bytes(),
    }
}

/// Every path under `root`, relative, sorted (to prove nothing appeared elsewhere).
pub fn tree(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            out.push(path.strip_prefix(root).unwrap().display().to_string());
            if entry.file_type().unwrap().is_dir() {
                walk(root, &path, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

/// The `cmover` binary of this build (see `cm_tests::cmover_bin`).
pub fn cmover() -> std::path::PathBuf {
    cm_tests::cmover_bin()
}

/// Run `cmover <args>`; its output (stdout and stderr) and whether it succeeded.
pub fn run_cmover(args: &[&std::ffi::OsStr]) -> (bool, String) {
    let output = std::process::Command::new(cmover()).args(args).output().expect("cmover runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// Poll `done` every 20 ms for at most `within`; whether it came true.
pub fn wait_until(within: std::time::Duration, mut done: impl FnMut() -> bool) -> bool {
    let started = std::time::Instant::now();
    while started.elapsed() < within {
        if done() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    done()
}

/// A tiny HTTP origin on loopback: every request gets `"<name> <host><path> #<n>"`, where
/// `n` counts the requests this origin served, cacheable for an hour. Stops when dropped.
pub struct Origin {
    pub address: String,
    pub served: Arc<std::sync::atomic::AtomicU64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Origin {
    pub fn start(name: &str) -> Origin {
        use std::io::{BufRead, BufReader, Write};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let served = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (name, counter, stopped) = (name.to_string(), served.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopped.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                stream.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
                let mut reader = BufReader::new(stream);
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).is_err() {
                    continue;
                }
                let mut host = String::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(value) = line.to_ascii_lowercase().strip_prefix("host:") {
                        host = value.trim().to_string();
                    }
                }
                let path = request_line.split_whitespace().nth(1).unwrap_or("?").to_string();
                let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                let body = format!("{name} {host}{path} #{n}");
                let mut stream = reader.into_inner();
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nCache-Control: max-age=3600\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Origin { address, served, stop, thread: Some(thread) }
    }

    pub fn port(&self) -> u16 {
        self.address.rsplit(':').next().unwrap().parse().unwrap()
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = std::net::TcpStream::connect(&self.address);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `GET path` with `Host: host` from `address` on a fresh connection: (status, body).
pub fn http_get(address: &str, host: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address)?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let status = answer.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body).to_string();
    Ok((status, body))
}

/// A child process killed (and reaped) when the guard drops.
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A free loopback TCP port for a server started next (`cm_agent::launch::free_port`: never the
/// same one twice in this process).
pub fn free_port() -> u16 {
    cm_agent::launch::free_port().expect("a free loopback port")
}

/// The first of `candidates` that exists.
pub fn find_binary(candidates: &[&str]) -> Option<std::path::PathBuf> {
    candidates.iter().map(std::path::PathBuf::from).find(|p| p.exists())
}

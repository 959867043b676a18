//! The web stack in front of a [`crate::cluster::TestCluster`], real processes all: one
//! **nginx** per server serving that server's site `current`, **HAProxy** in front of them
//! (runtime API on a Unix socket, each server named as its agent, cookie persistence), and a
//! steady **load client** reading sessions of several files through a front address. The
//! go-live tests (`tests/golive_*.rs`) use it through [`crate::golive::GoLiveStack`], which
//! puts a cache (Varnish) in front of HAProxy and hands the load client its address.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A free loopback TCP port for a server started next (`cm_agent::launch::free_port`: never the
/// same one twice in this process).
pub fn free_port() -> u16 {
    cm_agent::launch::free_port().expect("a free loopback port")
}

fn find(binaries: &[&str]) -> Option<PathBuf> {
    binaries.iter().map(PathBuf::from).find(|p| p.exists())
}

/// Waits (bounded) until `address` accepts TCP connections.
fn wait_listening(address: &str, what: &str) -> anyhow::Result<()> {
    let start = Instant::now();
    while TcpStream::connect(address).is_err() {
        if start.elapsed() > Duration::from_secs(10) {
            bail!("{what} did not listen on {address}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// One nginx serving a site root (the agent's `releases/`+`current` directory) on a loopback
/// port. `extra` goes into its `server` block (e.g. a location that answers wrongly).
pub struct Nginx {
    child: Child,
    dir: tempfile::TempDir,
    pub address: String,
    root: PathBuf,
}

impl Nginx {
    /// `None` when nginx is not installed.
    pub fn start(site_root: &Path, extra: &str) -> anyhow::Result<Option<Nginx>> {
        let Some(bin) = find(&["/usr/sbin/nginx", "/usr/bin/nginx"]) else { return Ok(None) };
        let dir = tempfile::tempdir()?;
        let address = format!("127.0.0.1:{}", free_port());
        let root = site_root.join("current");
        write_nginx_config(dir.path(), &address, &root, extra)?;
        let child = Command::new(bin)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nginx")?;
        let n = Nginx { child, dir, address, root };
        wait_listening(&n.address, "nginx")?;
        Ok(Some(n))
    }

    /// Rewrites the `server` block's `extra` and reloads nginx gracefully (SIGHUP: open
    /// connections finish on the old workers).
    pub fn reload(&self, extra: &str) -> anyhow::Result<()> {
        write_nginx_config(self.dir.path(), &self.address, &self.root, extra)?;
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, rustix::process::Signal::HUP)?;
        Ok(())
    }
}

/// nginx's configuration in `dir`: one server on `address` serving `root`, no access log,
/// every temporary path inside `dir`.
fn write_nginx_config(dir: &Path, address: &str, root: &Path, extra: &str) -> anyhow::Result<()> {
    let d = dir.display();
    // Run as root (CI containers), the workers stay root so they can read the test's files.
    let user = if rustix::process::geteuid().is_root() { "user root root;" } else { "" };
    let config = format!(
        "{user}\ndaemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 512; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  \
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
         default_type text/html;\n  keepalive_timeout 5s;\n  \
         server {{\n    listen {address};\n    root {root};\n    {extra}\n  }}\n}}\n",
        root = root.display(),
    );
    std::fs::write(dir.join("nginx.conf"), config)?;
    Ok(())
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// HAProxy in front of `servers` (name → address): backend `app`, round robin, a `SRV`
/// cookie pinning a client's session to one server, the runtime API on a Unix socket.
pub struct Haproxy {
    child: Child,
    _dir: tempfile::TempDir,
    pub socket: PathBuf,
    /// The frontend's address.
    pub front: String,
    /// The map file hot paths are routed by ([`Haproxy::start_routed`]), empty at start.
    pub hot_map: Option<PathBuf>,
}

/// HAProxy `server` lines for `servers` (name → address), each pinned by the `SRV` cookie.
fn server_lines(servers: &BTreeMap<String, String>) -> String {
    servers
        .iter()
        .map(|(name, address)| format!("  server {name} {address} cookie {name}\n"))
        .collect()
}

impl Haproxy {
    /// `None` when HAProxy is not installed.
    pub fn start(servers: &BTreeMap<String, String>) -> anyhow::Result<Option<Haproxy>> {
        Self::start_on(&format!("127.0.0.1:{}", free_port()), servers)
    }

    /// [`Haproxy::start`] with its frontend on `front` (e.g. already named to a cache).
    pub fn start_on(
        front: &str,
        servers: &BTreeMap<String, String>,
    ) -> anyhow::Result<Option<Haproxy>> {
        Self::configured(front, &server_lines(servers), "", "")
    }

    /// [`Haproxy::start`] with `rules` added to the frontend (before its default backend) and
    /// `backends` after backend `app` (e.g. a hot-content pool and the rule that uses it).
    pub fn start_with(
        servers: &BTreeMap<String, String>,
        rules: &str,
        backends: &str,
    ) -> anyhow::Result<Option<Haproxy>> {
        let front = format!("127.0.0.1:{}", free_port());
        Self::configured(&front, &server_lines(servers), rules, backends)
    }

    /// HAProxy routing hot content as the manager tells it: a path in the map file
    /// [`Haproxy::hot_map`] goes to backend `hot` (empty at start), and a stick table `rates`
    /// counts each path's requests per second (`http_req_rate(1s)`).
    pub fn start_routed(servers: &BTreeMap<String, String>) -> anyhow::Result<Option<Haproxy>> {
        let front = format!("127.0.0.1:{}", free_port());
        let dir = tempfile::tempdir()?;
        let map = dir.path().join("hot.map");
        std::fs::write(&map, "")?;
        let rules = format!(
            "  http-request track-sc0 path table rates
  use_backend hot if {{ path,map({}) -m found }}
",
            map.display()
        );
        let backends = "backend hot\n  balance roundrobin\n\n\
             backend rates\n  stick-table type string len 256 size 10k expire 10s store http_req_rate(1s)\n";
        let h = Self::configured_in(dir, &front, &server_lines(servers), &rules, backends)?;
        Ok(h.map(|mut h| {
            h.hot_map = Some(map);
            h
        }))
    }

    /// HAProxy whose backend `app` holds `server_lines` (HAProxy `server` lines as given).
    pub fn with_lines(front: &str, server_lines: &str) -> anyhow::Result<Option<Haproxy>> {
        Self::configured(front, server_lines, "", "")
    }

    fn configured(
        front: &str,
        server_lines: &str,
        rules: &str,
        backends: &str,
    ) -> anyhow::Result<Option<Haproxy>> {
        Self::configured_in(tempfile::tempdir()?, front, server_lines, rules, backends)
    }

    fn configured_in(
        dir: tempfile::TempDir,
        front: &str,
        server_lines: &str,
        rules: &str,
        backends: &str,
    ) -> anyhow::Result<Option<Haproxy>> {
        let Some(bin) = find(&["/usr/sbin/haproxy", "/usr/bin/haproxy"]) else { return Ok(None) };
        let socket = dir.path().join("admin.sock");
        let config = format!(
            "global\n  stats socket {} mode 600 level admin\n\n\
             defaults\n  mode http\n  option http-keep-alive\n  timeout connect 2s\n  timeout client 10s\n  timeout server 10s\n  retries 3\n  option redispatch\n\n\
             frontend web\n  bind {front}\n{rules}  default_backend app\n\n\
             backend app\n  balance roundrobin\n  cookie SRV insert indirect nocache\n{server_lines}\n{backends}",
            socket.display()
        );
        let config_path = dir.path().join("haproxy.cfg");
        std::fs::write(&config_path, config)?;
        let child = Command::new(bin)
            .arg("-f")
            .arg(&config_path)
            .arg("-db")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting haproxy")?;
        let started = Instant::now();
        while !socket.exists() {
            if started.elapsed() > Duration::from_secs(10) {
                bail!("haproxy did not open its socket");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        wait_listening(front, "haproxy")?;
        Ok(Some(Haproxy { child, _dir: dir, socket, front: front.to_string(), hot_map: None }))
    }

    /// One runtime-API command's answer.
    pub fn command(&self, line: &str) -> anyhow::Result<String> {
        let mut stream = std::os::unix::net::UnixStream::connect(&self.socket)?;
        stream.write_all(format!("{line}\n").as_bytes())?;
        stream.shutdown(std::net::Shutdown::Write)?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        Ok(answer)
    }

    /// HAProxy's own word on `server`'s admin state (bits: 0x01 maintenance, 0x08 drain).
    pub fn admin_state(&self, server: &str) -> anyhow::Result<u32> {
        let mut stream = std::os::unix::net::UnixStream::connect(&self.socket)?;
        stream.write_all(b"show servers state app\n")?;
        stream.shutdown(std::net::Shutdown::Write)?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        let line = answer
            .lines()
            .find(|l| l.split_whitespace().nth(3) == Some(server))
            .with_context(|| format!("{server} in {answer}"))?;
        Ok(line.split_whitespace().nth(6).unwrap_or("").parse()?)
    }

    /// The manifest granting the HAProxy load-balancer plugin this HAProxy's socket.
    pub fn plugin_manifest(&self, name: &str) -> String {
        let mut m = format!(
            "name = \"{name}\"\nworld = \"load-balancer\"\n[grants.endpoints.haproxy]\nunix = \"{}\"\n",
            self.socket.display()
        );
        if let Some(map) = &self.hot_map {
            m.push_str(&format!(
                "[config]\nhot-map = \"{}\"\nrate-table = \"rates\"\n",
                map.display()
            ));
        }
        m
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 GET on a fresh connection: status, the `SRV` cookie it set, the body.
pub fn get(
    front: &str,
    path: &str,
    cookie: Option<&str>,
) -> std::io::Result<(u16, Option<String>, String)> {
    let mut stream = TcpStream::connect(front)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let cookie = cookie.map(|c| format!("Cookie: SRV={c}\r\n")).unwrap_or_default();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: www\r\n{cookie}Connection: close\r\n\r\n")?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let set = head.lines().find_map(|l| {
        let v =
            l.strip_prefix("Set-Cookie: SRV=").or_else(|| l.strip_prefix("set-cookie: SRV="))?;
        Some(v.split(';').next().unwrap_or("").to_string())
    });
    Ok((status, set, body.to_string()))
}

/// What a load client saw.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    pub requests: u64,
    pub sessions: u64,
    /// Each failed request: status (0: connection error, reset or timeout) and what.
    pub failures: Vec<String>,
    /// Sessions that read files of more than one release (the markers they saw).
    pub mixed: Vec<BTreeSet<String>>,
    /// Every release marker seen.
    pub markers: BTreeSet<String>,
    /// Each answered request's time from connect to the end of the answer, in µs.
    pub latencies_us: Vec<u32>,
}

impl LoadReport {
    /// The `q` quantile (0..=1) of the latencies, in ms.
    pub fn latency_ms(&self, q: f64) -> f64 {
        let mut all = self.latencies_us.clone();
        all.sort_unstable();
        let i = ((all.len() as f64 - 1.0) * q).round().max(0.0) as usize;
        all.get(i).map_or(0.0, |us| f64::from(*us) / 1000.0)
    }
}

/// A steady load: `clients` threads, each reading sessions of `per_session` files (the first
/// request picks a server, its cookie pins the rest), one request per `pace`. Each file's
/// body carries a release marker `marker(body)` extracts; a session must see one.
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<LoadReport>>,
}

impl Load {
    pub fn start(
        front: &str,
        paths: Vec<String>,
        clients: usize,
        per_session: usize,
        pace: Duration,
        marker: fn(&str) -> Option<String>,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let paths = Arc::new(paths);
        let threads = (0..clients)
            .map(|c| {
                let (stop, paths, front) = (stop.clone(), paths.clone(), front.to_string());
                std::thread::spawn(move || {
                    let mut r = LoadReport::default();
                    let mut next = c * 7919;
                    while !stop.load(Ordering::Relaxed) {
                        r.sessions += 1;
                        let mut cookie: Option<String> = None;
                        let mut seen = BTreeSet::new();
                        for _ in 0..per_session {
                            next = (next + 104_729) % paths.len();
                            let path = &paths[next];
                            r.requests += 1;
                            let asked = Instant::now();
                            let answer = get(&front, path, cookie.as_deref());
                            if answer.is_ok() {
                                let us = asked.elapsed().as_micros();
                                r.latencies_us.push(u32::try_from(us).unwrap_or(u32::MAX));
                            }
                            match answer {
                                Ok((200, set, body)) => {
                                    if cookie.is_none() {
                                        cookie = set;
                                    }
                                    match marker(&body) {
                                        Some(m) => {
                                            seen.insert(m);
                                        }
                                        None => {
                                            r.failures.push(format!("{path}: 200 without a marker"))
                                        }
                                    }
                                }
                                Ok((status, _, body)) => r.failures.push(format!(
                                    "{path}: HTTP {status}: {}",
                                    body.chars().take(80).collect::<String>()
                                )),
                                Err(e) => r.failures.push(format!("{path}: {e}")),
                            }
                            std::thread::sleep(pace);
                        }
                        if seen.len() > 1 {
                            r.mixed.push(seen.clone());
                        }
                        r.markers.extend(seen);
                    }
                    r
                })
            })
            .collect();
        Load { stop, threads }
    }

    /// Stops the clients and adds up what they saw.
    pub fn stop(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = LoadReport::default();
        for t in self.threads {
            let r = t.join().unwrap_or_default();
            all.requests += r.requests;
            all.sessions += r.sessions;
            all.failures.extend(r.failures);
            all.mixed.extend(r.mixed);
            all.markers.extend(r.markers);
            all.latencies_us.extend(r.latencies_us);
        }
        all
    }
}

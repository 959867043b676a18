//! A cluster of real `cmover` processes on this machine: a manager and, per segment, agents with
//! their own directories, control and data multicast groups on 127.0.0.1. Used by `cmover demo`
//! and the end-to-end tests (they pass the `cmover` binary to run).
//!
//! Every process is held by a [`ProcessGuard`] that kills it on drop, so a panicking test or an
//! interrupted demo leaves nothing running. Each process logs to `<dir>/logs/<name>.log`.

use std::collections::BTreeSet;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A child process killed (SIGKILL) when dropped.
pub struct ProcessGuard {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl ProcessGuard {
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> io::Result<ProcessGuard> {
        if let Some(dir) = log.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let out = std::fs::File::create(&log)?;
        cmd.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
        let child = cmd.spawn().map_err(|e| io::Error::other(format!("starting {name}: {e}")))?;
        Ok(ProcessGuard { name: name.into(), child: Some(child), log })
    }

    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Kills at once, like a crash (SIGKILL), and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Asks it to stop (SIGTERM: an agent leaves its segment gracefully), kills it after `grace`.
    /// Returns how it exited when it stopped by itself within `grace`.
    pub fn terminate(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        self.signal(&c, libc::SIGTERM);
        let end = Instant::now() + grace;
        while Instant::now() < end {
            if let Ok(Some(status)) = c.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    /// Freezes it (SIGSTOP): alive but silent, like a process stuck or cut off.
    pub fn pause(&self) {
        if let Some(c) = &self.child {
            self.signal(c, libc::SIGSTOP);
        }
    }

    /// Lets a paused process go on (SIGCONT).
    pub fn unpause(&self) {
        if let Some(c) = &self.child {
            self.signal(c, libc::SIGCONT);
        }
    }

    /// Sends SIGHUP (reload) to the running process.
    pub fn hangup(&self) {
        if let Some(c) = &self.child {
            self.signal(c, libc::SIGHUP);
        }
    }

    fn signal(&self, c: &Child, signal: i32) {
        if let Ok(pid) = i32::try_from(c.id()) {
            // SAFETY: kill(2) on the pid of a child we have not reaped yet.
            unsafe { libc::kill(pid, signal) };
        }
    }

    /// The last `lines` lines of its log (for failure messages).
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A free TCP port on 127.0.0.1 (free when asked; the caller binds it soon after). Taken below
/// the kernel's ephemeral range (32768 and up), where no outgoing connection of another
/// process can take it before the caller binds it, and never handed out twice by this process:
/// tests running side by side start their processes on ports drawn here, and two draws of one
/// port before either is bound would otherwise both see it free.
pub fn free_port() -> io::Result<u16> {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut handed = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..1000 {
        let port = rand::random_range(20_000..32_000);
        if !handed.contains(&port) && TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            handed.insert(port);
            return Ok(port);
        }
    }
    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port();
    handed.insert(port);
    Ok(port)
}

/// A random hex token of `bytes` random bytes.
pub fn token(bytes: usize) -> String {
    (0..bytes).map(|_| format!("{:02x}", rand::random::<u8>())).collect()
}

/// The manager process.
pub struct ManagerProcess {
    pub guard: ProcessGuard,
    pub url: String,
    pub operator_token: String,
    pub agent_token: String,
    pub agent_token_file: PathBuf,
    /// The scrape token `/metrics` takes (the manager's and every agent's), and its file.
    pub metrics_token: String,
    pub metrics_token_file: PathBuf,
    /// Its settings file (`cmover manager --config`).
    pub config_file: PathBuf,
    /// With mutual TLS: the cluster CA's directory (`cmover cert init`), from which each agent
    /// gets its certificate, and the operator's certificate files.
    pub tls: Option<ClusterTls>,
    /// The manager's signing key (`cmover cert signing-key`) and the public key agents pin.
    pub signing_key_file: PathBuf,
    pub public_key_file: PathBuf,
    /// The secret the manager seals with (`--seal-secret-file`), when sealing.
    pub seal_secret_file: Option<PathBuf>,
    /// Every replica's URL, for the agents started after it is set (they follow the active
    /// one); empty: `url` alone.
    pub replica_urls: Vec<String>,
}

/// A cluster's TLS material on disk.
#[derive(Debug, Clone)]
pub struct ClusterTls {
    pub ca_dir: PathBuf,
    pub operator: cm_tree::tls::TlsFiles,
}

impl ManagerProcess {
    /// A client for the operator's API: the operator's certificate over TLS, else its token.
    pub fn operator_client(&self) -> io::Result<cm_tree::http::JsonClient> {
        let tls = match &self.tls {
            Some(t) => Some(cm_tree::tls::Tls::load(&t.operator).map_err(io::Error::other)?),
            None => None,
        };
        Ok(cm_tree::http::JsonClient::with_tls(
            &self.operator_token,
            Duration::from_secs(30),
            tls.as_ref(),
        ))
    }
}

/// `cmover cert issue`: a certificate for `name` with `role` into `out`, valid at 127.0.0.1.
pub fn issue_cert(
    bin: &Path,
    ca_dir: &Path,
    name: &str,
    role: &str,
    out: &Path,
) -> io::Result<cm_tree::tls::TlsFiles> {
    run_cmover(
        bin,
        &[
            "cert",
            "issue",
            "--ca",
            &ca_dir.display().to_string(),
            "--name",
            name,
            "--role",
            role,
            "--host",
            "127.0.0.1",
            "--host",
            "localhost",
            "--out",
            &out.display().to_string(),
        ],
    )?;
    Ok(cm_tree::tls::TlsFiles::in_dir(out, name))
}

/// Runs a short `cmover` command to its end; its output is in the error when it fails.
fn run_cmover(bin: &Path, args: &[&str]) -> io::Result<()> {
    let out = Command::new(bin).args(args).stdin(Stdio::null()).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "cmover {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

/// How to run the manager.
#[derive(Debug, Clone)]
pub struct ManagerOptions {
    pub tick_ms: u64,
    pub star_max: usize,
    pub root_fanout: usize,
    pub leader_fanout: usize,
    pub chunk_kib: u32,
    /// Mutual TLS: a cluster CA in `dir/ca`, certificates for the manager, the operator and
    /// each agent (`cmover cert`); the API and the tree over HTTPS.
    pub tls: bool,
    /// Seal every assignment with a secret in `dir/secrets/seal.key` (agents get it too).
    pub seal: bool,
    /// `manager.store` (`None`: redb in the data directory).
    pub store: Option<String>,
    /// `manager.lease_ttl_ms` (PostgreSQL store).
    pub lease_ttl_ms: Option<u64>,
}

impl Default for ManagerOptions {
    fn default() -> Self {
        ManagerOptions {
            tick_ms: 100,
            star_max: 3,
            root_fanout: 2,
            leader_fanout: 2,
            chunk_kib: 64,
            tls: false,
            seal: false,
            store: None,
            lease_ttl_ms: None,
        }
    }
}

/// Starts `cmover manager` in `dir/manager` and waits until it accepts connections.
pub fn start_manager(bin: &Path, dir: &Path, o: &ManagerOptions) -> io::Result<ManagerProcess> {
    let (operator_token, agent_token) = (token(24), token(24));
    let secrets = dir.join("secrets");
    std::fs::create_dir_all(&secrets)?;
    let (op_file, agent_file) = (secrets.join("operator.token"), secrets.join("agent.token"));
    std::fs::write(&op_file, &operator_token)?;
    std::fs::write(&agent_file, &agent_token)?;
    let (metrics_token, metrics_token_file) = (token(24), secrets.join("metrics.token"));
    std::fs::write(&metrics_token_file, &metrics_token)?;
    let port = free_port()?;
    // The manager runs from a settings file (`cmover manager --check-config` accepts it), as an
    // operator's would; docs/manager.example.toml explains each key.
    let q = |p: &Path| format!("\"{}\"", p.display());
    let mut config = format!(
        "[manager]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = {data}\ntick_ms = {tick}\n\n\
         [auth]\noperator_token_file = {op}\nagent_token_file = {agent}\nmetrics_token_file = {metrics}\n\n\
         [tree]\nroot_fanout = {rf}\nleader_fanout = {lf}\nstar_max = {sm}\nchunk_kib = {ck}\n\n",
        data = q(&dir.join("manager")),
        tick = o.tick_ms,
        op = q(&op_file),
        agent = q(&agent_file),
        metrics = q(&metrics_token_file),
        rf = o.root_fanout,
        lf = o.leader_fanout,
        sm = o.star_max,
        ck = o.chunk_kib,
    );
    if let Some(store) = &o.store {
        config = config.replacen("[manager]\n", &format!("[manager]\nstore = \"{store}\"\n"), 1);
    }
    if let Some(ttl) = o.lease_ttl_ms {
        config = config.replacen("[manager]\n", &format!("[manager]\nlease_ttl_ms = {ttl}\n"), 1);
    }
    // Every run is signed: the key is made once (`cmover cert signing-key`) and kept across
    // restarts; agents pin its public half.
    let (signing_key_file, public_key_file) =
        (secrets.join("manager-signing.pk8"), secrets.join("manager-signing.pub"));
    if !signing_key_file.exists() {
        let dir = secrets.display().to_string();
        run_cmover(bin, &["cert", "signing-key", "--dir", &dir, "--name", "manager-signing"])?;
    }
    config += &format!("[signing]\nkey_file = {}\n", q(&signing_key_file));
    let seal_secret_file = if o.seal {
        let f = secrets.join("seal.key");
        if !f.exists() {
            std::fs::write(&f, token(32))?;
        }
        config += &format!("seal_secret_file = {}\n", q(&f));
        Some(f)
    } else {
        None
    };
    let tls = if o.tls {
        let ca_dir = dir.join("ca");
        run_cmover(bin, &["cert", "init", "--dir", &ca_dir.display().to_string()])?;
        let certs = dir.join("certs");
        let m = issue_cert(bin, &ca_dir, "manager", "manager", &certs.join("manager"))?;
        config +=
            &format!("\n[tls]\nca = {}\ncert = {}\nkey = {}\n", q(&m.ca), q(&m.cert), q(&m.key));
        let operator = issue_cert(bin, &ca_dir, "operator", "operator", &certs.join("operator"))?;
        Some(ClusterTls { ca_dir, operator })
    } else {
        None
    };
    let config_file = dir.join("manager.toml");
    std::fs::write(&config_file, config)?;
    let guard = spawn_manager(bin, &config_file, port, "manager")?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    Ok(ManagerProcess {
        guard,
        url: format!("{scheme}://127.0.0.1:{port}"),
        operator_token,
        agent_token,
        agent_token_file: agent_file,
        metrics_token,
        metrics_token_file,
        config_file,
        tls,
        signing_key_file,
        public_key_file,
        seal_secret_file,
        replica_urls: Vec::new(),
    })
}

/// Runs `cmover manager --config FILE` and waits until it accepts connections on `port`.
fn spawn_manager(bin: &Path, config: &Path, port: u16, name: &str) -> io::Result<ProcessGuard> {
    let mut cmd = Command::new(bin);
    cmd.arg("manager").arg("--config").arg(config);
    let log = config.parent().unwrap_or(Path::new(".")).join(format!("logs/{name}.log"));
    let mut guard = ProcessGuard::spawn(name, cmd, log)?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let end = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if !guard.is_running() || Instant::now() > end {
            return Err(io::Error::other(format!(
                "the manager did not start:\n{}",
                guard.log_tail(20)
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(guard)
}

/// Another replica of `first` (a manager on a PostgreSQL store): the same settings, tokens,
/// keys and data directory (the shared directory of assignment files and snapshots), its own
/// port. Returns it as a [`ManagerProcess`] whose `url` is its own.
pub fn start_replica(bin: &Path, first: &ManagerProcess, name: &str) -> io::Result<ManagerProcess> {
    let port = free_port()?;
    let config = std::fs::read_to_string(&first.config_file)?;
    let listen = config
        .lines()
        .find(|l| l.starts_with("listen = "))
        .ok_or_else(|| io::Error::other("the first replica's settings have no listen key"))?;
    let config = config.replacen(listen, &format!("listen = \"127.0.0.1:{port}\""), 1);
    let config_file = first.config_file.with_file_name(format!("{name}.toml"));
    std::fs::write(&config_file, config)?;
    let guard = spawn_manager(bin, &config_file, port, name)?;
    let scheme = if first.tls.is_some() { "https" } else { "http" };
    Ok(ManagerProcess {
        guard,
        url: format!("{scheme}://127.0.0.1:{port}"),
        config_file,
        operator_token: first.operator_token.clone(),
        agent_token: first.agent_token.clone(),
        agent_token_file: first.agent_token_file.clone(),
        metrics_token: first.metrics_token.clone(),
        metrics_token_file: first.metrics_token_file.clone(),
        tls: first.tls.clone(),
        signing_key_file: first.signing_key_file.clone(),
        public_key_file: first.public_key_file.clone(),
        seal_secret_file: first.seal_secret_file.clone(),
        replica_urls: Vec::new(),
    })
}

/// One agent to start.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    pub name: String,
    /// Election node id (= MCTP member id).
    pub node_id: u64,
    pub segment: String,
    pub location: String,
    pub control: SocketAddr,
    pub data: SocketAddr,
    pub heartbeat_ms: u64,
    pub report_wait_ms: u64,
    pub site_name: String,
    /// Operator weight (0–255): the highest is elected first.
    pub weight: u8,
    /// Cap on the GL's MCTP rate (tests slow a distribution down with it).
    pub max_rate_mbps: Option<u64>,
    /// The seal secret this agent is given.
    pub seal: AgentSeal,
    /// The manager public key file it pins (`None`: the manager's; a test's rogue agent pins
    /// another).
    pub manager_key: Option<PathBuf>,
    /// Sites it serves besides `site_name` (each at `sites/<name>` in its directory); none: the
    /// one-site `[site]` form, else `[[site]]` entries.
    pub more_sites: Vec<ExtraSite>,
    /// More settings appended to its config file (e.g. `[[caches]]`); empty: none.
    pub extra_toml: String,
}

/// A further site an agent serves, and the interpreter plugin (its store name) that applies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraSite {
    pub name: String,
    pub plugin: String,
}

/// Which seal secret an agent gets (`[site] seal_secret_file`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum AgentSeal {
    /// The manager's, if it seals (what a real cluster does).
    #[default]
    FromManager,
    /// This file (a test's wrong secret).
    File(PathBuf),
    /// None, whatever the manager does.
    Off,
}

/// A running agent process and where its things are.
pub struct AgentProcess {
    pub spec: AgentSpec,
    pub guard: ProcessGuard,
    pub status: SocketAddr,
    /// Its `/metrics` (the manager's scrape token opens it).
    pub metrics: SocketAddr,
    pub dir: PathBuf,
    pub site_root: PathBuf,
    /// The root of each further site (`spec.more_sites`), by name.
    pub more_roots: std::collections::BTreeMap<String, PathBuf>,
}

impl AgentProcess {
    /// The root of its site `name` (`site_root` for `spec.site_name`).
    pub fn root_of(&self, name: &str) -> Option<&Path> {
        if name == self.spec.site_name {
            return Some(&self.site_root);
        }
        self.more_roots.get(name).map(PathBuf::as_path)
    }
}

impl AgentProcess {
    /// Its `cmover agent status` JSON.
    pub fn status(&self) -> io::Result<serde_json::Value> {
        let mut s = TcpStream::connect_timeout(&self.status, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        serde_json::from_str(&body).map_err(io::Error::other)
    }
}

/// Starts `cmover agent` for `spec` in `root/servers/<name>`, sharing the cluster secret file
/// and the manager's agent token file.
pub fn start_agent(
    bin: &Path,
    root: &Path,
    manager: &ManagerProcess,
    secret_file: &Path,
    spec: &AgentSpec,
) -> io::Result<AgentProcess> {
    let dir = root.join("servers").join(&spec.name);
    std::fs::create_dir_all(&dir)?;
    let status = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
    let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
    let site_root = dir.join("site");
    // With TLS, the agent's own certificate (its server name, valid at 127.0.0.1).
    let tls = match &manager.tls {
        Some(t) => {
            // A restarted agent keeps the certificate it had.
            let mut f = cm_tree::tls::TlsFiles::in_dir(&dir.join("certs"), &spec.name);
            if !f.cert.exists() {
                f = issue_cert(bin, &t.ca_dir, &spec.name, "agent", &dir.join("certs"))?;
            }
            format!(
                "\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
                f.ca.display(),
                f.cert.display(),
                f.key.display()
            )
        }
        None => String::new(),
    };
    let seal = match &spec.seal {
        AgentSeal::FromManager => manager.seal_secret_file.clone(),
        AgentSeal::File(f) => Some(f.clone()),
        AgentSeal::Off => None,
    };
    let seal =
        seal.map(|f| format!("seal_secret_file = \"{}\"\n", f.display())).unwrap_or_default();
    let more_roots: std::collections::BTreeMap<String, PathBuf> =
        spec.more_sites.iter().map(|s| (s.name.clone(), dir.join("sites").join(&s.name))).collect();
    // One site: the `[site]` table; several: `[[site]]` entries, the first `site_name` at `site`.
    let sites = if spec.more_sites.is_empty() {
        format!("[site]\nroot = \"{}\"\nname = \"{}\"\n{seal}", site_root.display(), spec.site_name)
    } else {
        let mut t = format!(
            "[[site]]\nroot = \"{}\"\nname = \"{}\"\n{seal}",
            site_root.display(),
            spec.site_name
        );
        for s in &spec.more_sites {
            t += &format!(
                "\n[[site]]\nroot = \"{}\"\nname = \"{}\"\nplugin = \"{}\"\n",
                more_roots[&s.name].display(),
                s.name,
                s.plugin
            );
        }
        t
    };
    let config = format!(
        "[node]\nid = {id}\nname = \"{name}\"\ndata_dir = \"{dir}\"\n\n\
         [segment]\nname = \"{segment}\"\ncontrol_channel = \"{control}\"\ninterface = \"127.0.0.1\"\nloopback = true\nsecret_file = \"{secret}\"\n\n\
         [election]\nheartbeat_ms = {hb}\noperator_weight = {weight}\n\n\
         [status]\nlisten = \"{status}\"\n\n\
         [metrics]\nlisten = \"{metrics}\"\ntoken_file = \"{metrics_token}\"\n\n\
         [manager]\nurl = {url}\ntoken_file = \"{token}\"\npublic_key_file = \"{public_key}\"\n\n\
         {sites}\n\
         [plugins]\nstore = \"{plugins}\"\n\n\
         [data]\nchannel = \"{data}\"\nframe_size = 8192\nsession_timeout_ms = 5000\n{rate}\n\
         [leader]\nlocation = \"{location}\"\nreport_wait_ms = {wait}\ndiscovery_interval_ms = 5000\n{tls}\n{extra}",
        id = spec.node_id,
        name = spec.name,
        dir = dir.display(),
        segment = spec.segment,
        control = spec.control,
        secret = secret_file.display(),
        hb = spec.heartbeat_ms,
        weight = spec.weight,
        // One URL in the single form, several (replicas) as a list.
        url = match manager.replica_urls.as_slice() {
            [] => format!("{:?}", manager.url),
            urls => format!("{urls:?}"),
        },
        token = manager.agent_token_file.display(),
        metrics_token = manager.metrics_token_file.display(),
        public_key = spec.manager_key.as_ref().unwrap_or(&manager.public_key_file).display(),
        plugins = dir.join("plugins").display(),
        data = spec.data,
        location = spec.location,
        wait = spec.report_wait_ms,
        rate = spec.max_rate_mbps.map(|r| format!("max_rate_mbps = {r}\n")).unwrap_or_default(),
        extra = spec.extra_toml,
    );
    let config_file = dir.join("agent.toml");
    std::fs::File::create(&config_file)?.write_all(config.as_bytes())?;
    let mut cmd = Command::new(bin);
    cmd.arg("agent").arg("--config").arg(&config_file);
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    let guard =
        ProcessGuard::spawn(&spec.name, cmd, root.join("logs").join(format!("{}.log", spec.name)))?;
    Ok(AgentProcess { spec: spec.clone(), guard, status, metrics, dir, site_root, more_roots })
}

/// Writes a fresh cluster secret into `dir/secrets/cluster.key`.
pub fn write_secret(dir: &Path) -> io::Result<PathBuf> {
    let secrets = dir.join("secrets");
    std::fs::create_dir_all(&secrets)?;
    let f = secrets.join("cluster.key");
    std::fs::write(&f, token(32))?;
    Ok(f)
}

//! `cmover agent`: run a server agent (cm-agent's `ServerAgent`): it joins its segment's
//! election, receives assignments by MCTP on the segment's data channel, applies them to its
//! site through the WebAssembly interpreter plugin and reports each outcome to its group
//! leader; when elected GL it serves the distribution tree, reports the segment to the manager,
//! delivers each run to the members and sends one consolidated report. `cmover agent status`
//! asks a running agent for its role, leader, members and the last runs it applied.
//!
//! With neither a manager URL nor a data channel it runs the election only (no agent token,
//! no site): a segment's election and `cmover agent status`, nothing else.
//!
//! Settings come from a TOML file (`--config`) and flags (flags win); `docs/agent.example.toml`
//! lists every key with its default, docs/agent.md explains each. `--check-config` checks them
//! and exits. As a service ([`service`]): `/metrics` on `[metrics] listen` to the scrape token,
//! SIGTERM leaves the segment gracefully, SIGHUP re-reads the log level and the scrape token
//! and rescans the plugin store, systemd is told READY=1 once the agent has joined.

mod service;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use cm_agent::election::{self as driver, DriverConfig};
use cm_agent::node::sites::{SiteSpec, check_sites};
use cm_agent::node::{AgentConfig, DataChannel, ServerAgent};
use cm_agent::status::{self, StatusServer, StatusSource};
use cm_agent::words::{self, Speaker};
use cm_assignment::names::DEFAULT_SITE;
use cm_election::{Config, DataChannelPool, Eligibility, Registration};
use cm_tree::tls::{CertRole, TlsFiles};
use serde::Deserialize;
use serde_json::Value;

const DEFAULT_STATUS: &str = "127.0.0.1:7710";

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Show a running agent's election state, leader and members.
    Status {
        /// The agent's status address (`[status] listen`).
        #[arg(long, default_value = DEFAULT_STATUS)]
        status: SocketAddr,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Flags for running an agent; each overrides the same setting in the `--config` file.
#[derive(clap::Args, Default, Clone)]
struct RunArgs {
    /// TOML settings file (docs/agent.example.toml lists every key).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Check the settings (file and flags) and exit: 0 when they are good, 1 naming the
    /// problem's key. Starts nothing.
    #[arg(long)]
    check_config: bool,
    /// Serve Prometheus `/metrics` here [metrics.listen; none: not served].
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// File holding the scrape token `/metrics` requires [metrics.token_file].
    #[arg(long)]
    metrics_token_file: Option<PathBuf>,
    #[arg(long)]
    node_id: Option<u64>,
    #[arg(long)]
    name: Option<String>,
    /// The segment's name (reported to the manager; default cluster id derives from it).
    #[arg(long)]
    segment: Option<String>,
    #[arg(long)]
    cluster_id: Option<u64>,
    /// Control channel, multicast group and port, e.g. 239.192.0.1:7700.
    #[arg(long)]
    control: Option<SocketAddr>,
    /// Interface address for multicast (IP_MULTICAST_IF).
    #[arg(long)]
    interface: Option<Ipv4Addr>,
    /// File holding the cluster secret (else the CM_CLUSTER_SECRET variable).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Where `cmover agent status` reaches this agent.
    #[arg(long)]
    status: Option<SocketAddr>,
    #[arg(long)]
    heartbeat_ms: Option<u64>,
    /// Operator weight 0–255: dominates the measured priority.
    #[arg(long)]
    weight: Option<u8>,
    /// Never become group leader.
    #[arg(long)]
    ineligible: bool,
    /// Content group this server belongs to (repeatable).
    #[arg(long = "content-group")]
    content_groups: Vec<String>,
    /// State directory (default for the site, plugin store, received assignments).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The manager's base URL, e.g. http://10.0.0.1:7700; with replicas, every one's
    /// (repeat the flag or separate by commas): the agent follows the active one.
    #[arg(long, value_delimiter = ',')]
    manager: Vec<String>,
    /// File holding the agents' bearer token (else $CMOVER_AGENT_TOKEN).
    #[arg(long)]
    agent_token_file: Option<PathBuf>,
    /// The manager's public signing key(s), one per line (`cmover cert signing-key`): only
    /// notifications and assignments it signed are acted on. Without it nothing is applied.
    #[arg(long)]
    manager_key: Option<PathBuf>,
    /// The secret the manager seals with (`cmover manager --seal-secret-file`): only sealed
    /// assignments are applied, and encrypted ones are decrypted with the key derived from it.
    #[arg(long)]
    seal_secret_file: Option<PathBuf>,
    /// The site directory (releases and the `current` link), of the one site (`[site]`).
    #[arg(long)]
    site_root: Option<PathBuf>,
    /// The hosted site's name, of the one site (`[site]`); several sites are `[[site]]`
    /// entries of the settings file.
    #[arg(long)]
    site_name: Option<String>,
    /// The plugin store directory.
    #[arg(long)]
    plugin_store: Option<PathBuf>,
    /// The segment's MCTP data channel, multicast group and port.
    #[arg(long)]
    data_channel: Option<SocketAddr>,
    /// UDP port on the GL for members' MCTP reports (default: data channel port + 1).
    #[arg(long)]
    report_port: Option<u16>,
    /// The GL's tree endpoint address.
    #[arg(long)]
    leader_listen: Option<SocketAddr>,
    /// Location or time zone reported to the manager.
    #[arg(long)]
    location: Option<String>,
    /// How long a GL waits for members' apply reports, milliseconds.
    #[arg(long)]
    report_wait_ms: Option<u64>,
    #[command(flatten)]
    tls: super::manager::TlsArgs,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct AgentFile {
    node: NodeSection,
    segment: SegmentSection,
    election: ElectionSection,
    status: StatusSection,
    manager: ManagerSection,
    /// `[site]` (one site) or `[[site]]` (several): see [`sites_of`].
    site: Option<toml::Value>,
    plugins: PluginsSection,
    data: DataSection,
    leader: LeaderSection,
    tls: TlsSection,
    metrics: service::MetricsSection,
    log: service::LogSection,
    /// The caches in front of this segment (`[[caches]]`, cm-agent's `caches.rs`).
    caches: Vec<cm_agent::caches::CacheConfig>,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct TlsSection {
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct ManagerSection {
    /// One URL, or every replica's as a list.
    url: Option<OneOrMany>,
    token_file: Option<PathBuf>,
    public_key_file: Option<PathBuf>,
}

/// `url = "http://m:7700"` or `url = ["http://m1:7700", "http://m2:7700"]`.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(u) => vec![u],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct SiteSection {
    root: Option<PathBuf>,
    name: Option<String>,
    /// The interpreter plugin (its name in the plugin store); default `interpreter`.
    plugin: Option<String>,
    /// The cluster's seal secret (one for every site; given once).
    seal_secret_file: Option<PathBuf>,
}

/// The sites of the settings file: `[site]` is one site (name default `www`, root default
/// `DATA_DIR/site`, which `--site-name`/`--site-root` override); `[[site]]` entries are several,
/// each with its name and root. Also returns the seal secret file, given in at most one entry.
fn sites_of(
    value: Option<toml::Value>,
    data_dir: &Path,
    name_flag: Option<String>,
    root_flag: Option<PathBuf>,
) -> anyhow::Result<(Vec<SiteSpec>, Option<PathBuf>)> {
    let entries: Vec<SiteSection> = match value {
        None => vec![SiteSection::default()],
        Some(toml::Value::Array(a)) => {
            let entries = a
                .into_iter()
                .enumerate()
                .map(|(i, v)| v.try_into().with_context(|| format!("[[site]] entry {}", i + 1)))
                .collect::<anyhow::Result<Vec<SiteSection>>>()?;
            if entries.is_empty() {
                bail!("[[site]]: no site given");
            }
            if name_flag.is_some() || root_flag.is_some() {
                bail!(
                    "--site-name and --site-root set the one site of a [site] table; with [[site]] entries give each its name and root in the file"
                );
            }
            entries
        }
        Some(v) => vec![v.try_into().context("[site]")?],
    };
    let single = entries.len() == 1;
    let mut seal = None;
    let mut sites = Vec::with_capacity(entries.len());
    for (i, e) in entries.into_iter().enumerate() {
        if let Some(f) = e.seal_secret_file {
            if seal.as_ref().is_some_and(|s| *s != f) {
                bail!("[[site]] entry {}: a second seal_secret_file (the cluster has one)", i + 1);
            }
            seal = Some(f);
        }
        let spec = if single {
            let name = name_flag.clone().or(e.name).unwrap_or_else(|| DEFAULT_SITE.into());
            let root = root_flag.clone().or(e.root).unwrap_or_else(|| data_dir.join("site"));
            SiteSpec::new(&name, root)
        } else {
            let name = e.name.with_context(|| format!("[[site]] entry {}: no name", i + 1))?;
            let root =
                e.root.with_context(|| format!("[[site]] entry {} ({name}): no root", i + 1))?;
            SiteSpec::new(&name, root)
        };
        sites.push(SiteSpec { plugin: e.plugin.unwrap_or(spec.plugin.clone()), ..spec });
    }
    check_sites(&sites).context("[site]")?;
    Ok((sites, seal))
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct PluginsSection {
    store: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct DataSection {
    channel: Option<SocketAddr>,
    report_port: Option<u16>,
    frame_size: Option<u16>,
    max_rate_mbps: Option<u64>,
    session_timeout_ms: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct LeaderSection {
    listen: Option<SocketAddr>,
    location: Option<String>,
    report_wait_ms: Option<u64>,
    discovery_interval_ms: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct NodeSection {
    id: Option<u64>,
    name: Option<String>,
    address: Option<String>,
    data_dir: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct SegmentSection {
    name: Option<String>,
    cluster_id: Option<u64>,
    control_channel: Option<SocketAddr>,
    interface: Option<Ipv4Addr>,
    ttl: Option<u32>,
    loopback: Option<bool>,
    secret_file: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct ElectionSection {
    heartbeat_ms: Option<u64>,
    eligible: Option<bool>,
    preassigned: Vec<u64>,
    preassigned_only: bool,
    operator_weight: Option<u8>,
    recent_failures: u32,
    content_lag_secs: u64,
    content_groups: Vec<String>,
    data_channel_pool: Option<SocketAddr>,
    data_channel_count: Option<u16>,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct StatusSection {
    listen: Option<SocketAddr>,
}

/// Everything a running agent needs, resolved from file and flags.
struct AgentSettings {
    segment: String,
    election: Config,
    driver: DriverConfig,
    status: SocketAddr,
    /// The election's restart state lives here (`data_dir/state`).
    state_dir: PathBuf,
    /// `None`: an election-only agent (no manager and no data channel configured): it takes
    /// part in its segment's election and answers `cmover agent status`, and carries no content.
    agent: Option<AgentConfig>,
    /// This server's name, for the log's sentences.
    name: String,
    /// `/metrics`, logging: what a SIGHUP can change.
    service: service::ServiceSettings,
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "server".into())
}

/// The default cluster id: the first 8 bytes of BLAKE3 of the segment name.
fn cluster_id_of(segment: &str) -> u64 {
    let h = blake3::hash(segment.as_bytes());
    u64::from_be_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

fn load_secret(file: Option<&PathBuf>) -> anyhow::Result<Vec<u8>> {
    let secret = match file {
        Some(p) => std::fs::read(p).with_context(|| {
            format!("[segment] secret_file: reading the cluster secret from {}", p.display())
        })?,
        None => match std::env::var("CM_CLUSTER_SECRET") {
            Ok(s) => s.into_bytes(),
            Err(_) => bail!(
                "no cluster secret: set [segment] secret_file, pass --secret-file, or set CM_CLUSTER_SECRET"
            ),
        },
    };
    if secret.len() < 16 {
        bail!("the cluster secret is {} bytes; use at least 16", secret.len());
    }
    Ok(secret)
}

/// The agents' bearer token from a file or `$CMOVER_AGENT_TOKEN`.
fn token(file: Option<&PathBuf>) -> anyhow::Result<String> {
    let t = match file {
        Some(p) => std::fs::read_to_string(p).with_context(|| format!("reading the agent token from {}", p.display()))?,
        None => std::env::var("CMOVER_AGENT_TOKEN")
            .context("no agent token: set [manager] token_file, pass --agent-token-file, or set CMOVER_AGENT_TOKEN")?,
    };
    let t = t.trim().to_string();
    if t.len() < 16 {
        bail!("the agent token must be at least 16 characters");
    }
    Ok(t)
}

/// The plugin store of an agent whose settings do not name one (`cmover plugin` uses the same).
fn default_store(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("plugins")
}

/// What `cmover plugin` takes from an agent's settings file: its plugin store, and for each
/// interpreter plugin the sites it must stay granted.
pub(crate) struct AgentPlugins {
    pub store: PathBuf,
    pub required: std::collections::BTreeMap<String, Vec<String>>,
}

/// The plugin store and sites an agent run with `config` (or none) uses, resolved as the agent
/// resolves them.
pub(crate) fn agent_plugins(config: Option<&PathBuf>) -> anyhow::Result<AgentPlugins> {
    let file = read_file(config)?;
    let data_dir = file.node.data_dir.unwrap_or_else(|| PathBuf::from("."));
    let (sites, _) = sites_of(file.site, &data_dir, None, None)?;
    let mut required = std::collections::BTreeMap::<String, Vec<String>>::new();
    for s in sites {
        required.entry(s.plugin).or_default().push(s.name);
    }
    Ok(AgentPlugins {
        store: file.plugins.store.unwrap_or_else(|| default_store(&data_dir)),
        required,
    })
}

/// Reads `--config` (if any).
fn read_file(config: Option<&PathBuf>) -> anyhow::Result<AgentFile> {
    Ok(match config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            toml::from_str(&text)
                .with_context(|| format!("parsing agent settings {}", p.display()))?
        }
        None => AgentFile::default(),
    })
}

impl RunArgs {
    fn resolve(self) -> anyhow::Result<AgentSettings> {
        let file = read_file(self.config.as_ref())?;
        for cache in &file.caches {
            cache.check().map_err(anyhow::Error::msg)?;
        }
        let service = service::ServiceSettings::resolve(&self, &file.metrics, &file.log)?;
        let (n, seg, el) = (file.node, file.segment, file.election);
        let (mf, pf, df, lf) = (file.manager, file.plugins, file.data, file.leader);
        let tls_files = match (self.tls.files(), file.tls) {
            (Some(f), _) => Some(f),
            (None, TlsSection { ca: Some(ca), cert: Some(cert), key: Some(key) }) => {
                Some(TlsFiles { ca, cert, key })
            }
            (None, TlsSection { ca: None, cert: None, key: None }) => None,
            (None, _) => bail!("[tls] needs all of ca, cert and key"),
        };
        let node = self.node_id.or(n.id).context("no node id: set [node] id or pass --node-id")?;
        let segment = self
            .segment
            .or(seg.name)
            .context("no segment name: set [segment] name or pass --segment")?;
        let control = self
            .control
            .or(seg.control_channel)
            .context("no control channel: set [segment] control_channel or pass --control")?;
        let interface = self.interface.or(seg.interface).unwrap_or(Ipv4Addr::LOCALHOST);
        let driver = DriverConfig {
            interface,
            ttl: seg.ttl.unwrap_or(1),
            loopback: seg.loopback.unwrap_or(interface.is_loopback()),
        };
        let secret = load_secret(self.secret_file.as_ref().or(seg.secret_file.as_ref()))?;
        let heartbeat =
            Duration::from_millis(self.heartbeat_ms.or(el.heartbeat_ms).unwrap_or(1000));
        let cluster = self.cluster_id.or(seg.cluster_id).unwrap_or_else(|| cluster_id_of(&segment));
        let incarnation =
            SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_micros() as u64);
        let mut cfg = Config::new(cluster, node, incarnation, &secret, control, heartbeat);
        let data_dir = self.data_dir.or(n.data_dir).unwrap_or_else(|| PathBuf::from("."));
        cfg.priority = driver::measure_priority_inputs(&data_dir);
        cfg.priority.operator_weight = self.weight.or(el.operator_weight).unwrap_or(0);
        cfg.priority.recent_failures = el.recent_failures;
        cfg.priority.content_lag_secs = el.content_lag_secs;
        if self.ineligible || el.eligible == Some(false) {
            cfg.eligibility = Eligibility::Ineligible;
        }
        cfg.preassigned = el.preassigned;
        cfg.preassigned_only = el.preassigned_only;
        let groups =
            if self.content_groups.is_empty() { el.content_groups } else { self.content_groups };
        let name = self.name.or(n.name).unwrap_or_else(host_name);
        cfg.registration = Registration {
            name: name.clone(),
            address: n.address.unwrap_or_else(|| IpAddr::V4(interface).to_string()),
            cpu_cores: u16::try_from(cfg.priority.cpu_cores).unwrap_or(u16::MAX),
            cpu_mhz: cfg.priority.cpu_mhz,
            free_disk_mib: cfg.priority.free_disk_mib,
            content_groups: groups,
        };
        cfg.data_channels = el
            .data_channel_pool
            .map(|first| DataChannelPool { first, count: el.data_channel_count.unwrap_or(64) });
        cfg.validate().context("election settings")?;
        let status = self
            .status
            .or(file.status.listen)
            .unwrap_or_else(|| DEFAULT_STATUS.parse().expect("literal"));
        let manager_urls: Vec<String> = if self.manager.is_empty() {
            mf.url.map(OneOrMany::into_vec).unwrap_or_default()
        } else {
            self.manager
        };
        let manager_urls: Vec<String> =
            manager_urls.iter().map(|u| u.trim().trim_end_matches('/').to_string()).collect();
        for u in &manager_urls {
            let uri: hyper::Uri = u
                .parse()
                .with_context(|| format!("the manager URL {u:?} ([manager] url or --manager)"))?;
            if uri.scheme().is_none() || uri.authority().is_none() {
                bail!(
                    "the manager URL {u:?} is not http(s)://host:port ([manager] url or --manager)"
                );
            }
        }
        let channel = match (self.data_channel.or(df.channel), manager_urls.first()) {
            (Some(c), _) => c,
            // Nothing to receive content on and no one to take it from: election only.
            (None, None) => {
                return Ok(AgentSettings {
                    segment,
                    election: cfg,
                    driver,
                    status,
                    state_dir: data_dir.join("state"),
                    agent: None,
                    name,
                    service,
                });
            }
            (None, Some(_)) => bail!(
                "no data channel: set [data] channel or pass --data-channel (a server agent with a manager receives content on it)"
            ),
        };
        let data = DataChannel {
            channel,
            report_port: self
                .report_port
                .or(df.report_port)
                .unwrap_or_else(|| channel.port().wrapping_add(1)),
            interface,
            ttl: driver.ttl,
            frame_size: df.frame_size.unwrap_or(1400).clamp(512, 60_000),
            max_rate: df.max_rate_mbps.map(|m| m.saturating_mul(1_000_000 / 8)),
            session_timeout: Duration::from_millis(df.session_timeout_ms.unwrap_or(10_000)),
        };
        let tls = tls_files.map(|f| super::manager::load_tls(&f, CertRole::Agent)).transpose()?;
        if let (Some(_), Some(url)) =
            (&tls, manager_urls.iter().find(|u| !u.starts_with("https://")))
        {
            bail!("with [tls] the manager's URL must be https:// (it is {url})");
        }
        let token_file = self.agent_token_file.as_ref().or(mf.token_file.as_ref());
        // Over mutual TLS the agent certificate stands in for the token.
        let agent_token = match (&tls, token_file, std::env::var_os("CMOVER_AGENT_TOKEN")) {
            (Some(_), None, None) => String::new(),
            _ => token(token_file)?,
        };
        let manager_keys = match self.manager_key.as_ref().or(mf.public_key_file.as_ref()) {
            Some(f) => cm_assignment::TrustedKeys::load(f)
                .with_context(|| format!("the manager's public key {}", f.display()))?,
            None => {
                eprintln!(
                    "warning: no manager public key ([manager] public_key_file or --manager-key): this server will refuse every assignment"
                );
                cm_assignment::TrustedKeys::default()
            }
        };
        let (sites, site_seal) = sites_of(file.site, &data_dir, self.site_name, self.site_root)?;
        let seal_secret = match self.seal_secret_file.as_ref().or(site_seal.as_ref()) {
            Some(f) => Some(
                std::fs::read(f)
                    .with_context(|| format!("reading the seal secret from {}", f.display()))?,
            ),
            None => None,
        };
        let name_for_log = name.clone();
        let agent = AgentConfig {
            manager_keys,
            seal: seal_secret.as_deref().map(cm_assignment::SealKey::derive),
            cipher: seal_secret.as_deref().map(cm_assignment::CipherKey::derive),
            name,
            segment: segment.clone(),
            location: self.location.or(lf.location).unwrap_or_else(|| "unknown".into()),
            manager_urls,
            agent_token,
            tls,
            secret,
            sites,
            plugin_store: self
                .plugin_store
                .or(pf.store)
                .unwrap_or_else(|| default_store(&data_dir)),
            default_interpreter: cm_plugin_host::bundled::INTERPRETER,
            state_dir: data_dir.join("state"),
            data,
            leader_listen: self
                .leader_listen
                .or(lf.listen)
                .unwrap_or(SocketAddr::new(IpAddr::V4(interface), 0)),
            report_wait: Duration::from_millis(
                self.report_wait_ms.or(lf.report_wait_ms).unwrap_or(30_000),
            ),
            discovery_interval: Duration::from_millis(lf.discovery_interval_ms.unwrap_or(30_000)),
            registration_settle: heartbeat * 3,
            caches: file.caches,
        };
        Ok(AgentSettings {
            segment,
            election: cfg,
            driver,
            status,
            state_dir: data_dir.join("state"),
            agent: Some(agent),
            name: name_for_log,
            service,
        })
    }
}

impl Args {
    /// `cmover agent status` (a short command), not a running agent.
    pub fn is_status(&self) -> bool {
        matches!(self.command, Some(Command::Status { .. }))
    }
}

pub async fn run(args: Args, log: crate::logging::LogArgs) -> anyhow::Result<()> {
    match args.command {
        Some(Command::Status { status, json }) => show_status(status, json).await,
        None if args.run.check_config => service::check(args.run.resolve()),
        None => {
            let settings = args.run.clone().resolve()?;
            service::init_logging(&log, &settings.service)?;
            crate::raise_fd_limit();
            run_agent(settings, args.run, log).await
        }
    }
}

async fn run_agent(
    s: AgentSettings,
    args: RunArgs,
    log: crate::logging::LogArgs,
) -> anyhow::Result<()> {
    let node = s.election.node;
    let status_port = StatusServer::bind(s.status).await?;
    let metrics = service::MetricsServer::bind(&s.service).await?;
    let mut signals = crate::service::Signals::install()?;
    let control = s.election.control_channel;
    // The election's incarnation and replay windows survive restarts (the driver's state file).
    let state = driver::StateFile::in_dir(&s.state_dir);
    std::fs::create_dir_all(&s.state_dir)
        .with_context(|| format!("creating {}", s.state_dir.display()))?;
    let handle = driver::spawn_persistent(s.election, s.driver, rand::random(), state)
        .context("joining the segment")?;
    let mut events = handle.subscribe();
    let election_status = handle.watch_status();
    let (agent, election_only) = match s.agent {
        Some(cfg) => (
            Some(ServerAgent::start(cfg, handle).await.context("starting the server agent")?),
            None,
        ),
        None => {
            tracing::info!(node, "no manager and no data channel configured: election only");
            (None, Some(handle))
        }
    };
    let source = match &agent {
        Some(a) => StatusSource::Agent(a.status_reader()),
        None => StatusSource::Election(election_status.clone()),
    };
    let status_task = status_port.spawn(s.segment.clone(), source);
    let metrics_task = metrics.map(|m| m.spawn());
    tracing::info!(node, segment = %s.segment, %control, status = %s.status, "agent joined the segment");
    crate::service::ready(&format!("{} joined segment {}", s.name, s.segment));
    let me = Speaker { name: s.name.clone(), node, segment: s.segment.clone() };
    let mut check = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Ok(ev) => words::log_event(&me, &ev, &election_status.borrow()),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => tracing::warn!(node, missed = n, "event log fell behind"),
                Err(_) => bail!("the election task stopped"),
            },
            _ = check.tick() => {}
            r = signals.next() => match r {
                crate::service::Request::Stop => break,
                crate::service::Request::Reload => {
                    crate::service::reloading();
                    service::reload(&args, &log, &s.service, agent.as_ref());
                    crate::service::ready(&format!("{} joined segment {}", s.name, s.segment));
                }
            },
        }
        let finished = match (&agent, &election_only) {
            (Some(a), _) => a.is_finished(),
            (None, Some(h)) => h.is_finished(),
            (None, None) => true,
        };
        if finished {
            bail!("the agent stopped (election or agent task ended)");
        }
    }
    crate::service::stopping();
    tracing::info!(node, "leaving the segment");
    status_task.abort();
    if let Some(t) = metrics_task {
        t.abort();
    }
    match (agent, election_only) {
        (Some(a), _) => a.leave().await?,
        (None, Some(h)) => h.leave().await?,
        (None, None) => {}
    }
    Ok(())
}

/// `cmover agent status`: the agent's status document, worded (or raw with `--json`).
async fn show_status(addr: SocketAddr, raw: bool) -> anyhow::Result<()> {
    let v = status::fetch(addr).await?;
    if raw {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let leader = match (&v["leader"], v["is_leader"].as_bool()) {
        (_, Some(true)) => "this node".to_owned(),
        (Value::Null, _) => "unknown (election in progress)".to_owned(),
        (l, _) => format!("node {l}"),
    };
    println!("node      {} on segment {}", v["node"], v["segment"].as_str().unwrap_or("?"));
    println!(
        "role      {} (election state {})",
        v["role"].as_str().unwrap_or("?"),
        v["state"].as_str().unwrap_or("?")
    );
    println!(
        "leader    {leader}{}",
        v["gl_url"].as_str().map(|u| format!(" at {u}")).unwrap_or_default()
    );
    println!("control   {}", v["control_channel"].as_str().unwrap_or("?"));
    if let Some(r) = v["registered_with"].as_u64() {
        println!("registered with node {r}");
    }
    if let Some(members) =
        v["members"].as_array().filter(|_| v["is_leader"].as_bool() == Some(true))
    {
        println!("members   {}", members.len());
        println!("  {:>20}  {:<24} {:<22} {:<22} groups", "node", "name", "address", "source");
        for m in members {
            println!(
                "  {:>20}  {:<24} {:<22} {:<22} {}",
                m["node"],
                m["name"].as_str().unwrap_or(""),
                m["address"].as_str().unwrap_or(""),
                m["source"].as_str().unwrap_or(""),
                m["content_groups"]
                    .as_array()
                    .map(|g| g.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(","))
                    .unwrap_or_default()
            );
        }
    }
    if let Some(dc) = v["data_channels"].as_object().filter(|d| !d.is_empty()) {
        let list: Vec<String> =
            dc.iter().map(|(g, a)| format!("{g}={}", a.as_str().unwrap_or("?"))).collect();
        println!("data      {}", list.join(" "));
    }
    match v["sites"].as_array().filter(|s| s.len() > 1) {
        // Several sites: one line each.
        Some(sites) => {
            for s in sites {
                let live = s["live"]
                    .as_u64()
                    .map_or("nothing live yet".to_string(), |l| format!("live release {l}"));
                println!(
                    "site      {} at {} ({live}; plugin {} {})",
                    s["name"].as_str().unwrap_or("?"),
                    s["root"].as_str().unwrap_or("?"),
                    s["plugin"].as_str().unwrap_or("?"),
                    s["interpreter"].as_str().unwrap_or("not installed")
                );
            }
        }
        None => {
            match (v["site_root"].as_str(), v["live"].as_u64()) {
                (None, _) => {
                    println!("site      none: election only (no manager, no data channel)")
                }
                (Some(root), Some(l)) => println!("site      {root} (live release {l})"),
                (Some(root), None) => println!("site      {root} (nothing live yet)"),
            }
            if v["site_root"].is_string() {
                println!("interpreter {}", v["interpreter"].as_str().unwrap_or("not installed"));
            }
        }
    }
    if let Some(runs) = v["applied"].as_array().filter(|r| !r.is_empty()) {
        println!("last runs applied");
        for r in runs {
            let what = match r["error"].as_str() {
                None => r["summary"].as_str().unwrap_or("").to_string(),
                Some(e) => format!("FAILED: {e}"),
            };
            let by = r["interpreter"]
                .as_str()
                .map(|v| format!(" (interpreter {v})"))
                .unwrap_or_default();
            let site = r["site"]
                .as_str()
                .filter(|s| !s.is_empty())
                .map(|s| format!("{s}: "))
                .unwrap_or_default();
            println!("  run {:>6}  {site}{what}{by}", r["run"]);
        }
    }
    if let Some(n) = v["save_errors"].as_u64().filter(|n| *n > 0) {
        println!(
            "WARNING   {n} election restart states could not be saved (see the agent's log): a restart resumes from an older state"
        );
    }
    let st = &v["stats"];
    println!(
        "datagrams received {} accepted {} dropped: forged {} replayed {} foreign {} malformed {}; sent {}",
        st["received"],
        st["accepted"],
        st["forged"],
        st["replayed"],
        st["foreign"],
        st["malformed"],
        st["sent"]
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sites(toml_text: &str) -> anyhow::Result<Vec<SiteSpec>> {
        let file: AgentFile = toml::from_str(toml_text)?;
        sites_of(file.site, Path::new("/data"), None, None).map(|(s, _)| s)
    }

    #[test]
    fn one_site_table_or_several_site_entries() {
        // Nothing, or `[site]`: one site, the defaults filling in.
        assert_eq!(sites("").unwrap(), [SiteSpec::new("www", "/data/site")]);
        assert_eq!(
            sites("[site]\nname = \"docs\"\n").unwrap(),
            [SiteSpec::new("docs", "/data/site")]
        );
        let two = sites(
            "[[site]]\nname = \"www\"\nroot = \"/srv/www\"\n\n\
             [[site]]\nname = \"shop\"\nroot = \"/srv/shop\"\nplugin = \"shop-interpreter\"\n",
        )
        .unwrap();
        assert_eq!(two[0], SiteSpec::new("www", "/srv/www"));
        assert_eq!((two[1].name.as_str(), two[1].plugin.as_str()), ("shop", "shop-interpreter"));
        for (bad, says) in [
            ("[[site]]\nroot = \"/srv/a\"\n[[site]]\nname = \"b\"\nroot = \"/srv/b\"\n", "no name"),
            ("[[site]]\nname = \"a\"\n[[site]]\nname = \"b\"\nroot = \"/srv/b\"\n", "no root"),
            (
                "[[site]]\nname = \"a\"\nroot = \"/srv/a\"\n[[site]]\nname = \"a\"\nroot = \"/srv/b\"\n",
                "twice",
            ),
            (
                "[[site]]\nname = \"a\"\nroot = \"/srv\"\n[[site]]\nname = \"b\"\nroot = \"/srv/b\"\n",
                "inside",
            ),
            ("[site]\nname = \"..\"\n", "site name `..`"),
            ("[site]\nnmae = \"www\"\n", "unknown field"),
        ] {
            let e = format!("{:#}", sites(bad).unwrap_err());
            assert!(e.contains(says), "{bad}: {e}");
        }
        let file: AgentFile =
            toml::from_str("[[site]]\nname = \"a\"\nroot = \"/srv/a\"\n").unwrap();
        let e = sites_of(file.site, Path::new("/d"), Some("x".into()), None).unwrap_err();
        assert!(e.to_string().contains("--site-name"), "{e}");
    }
}

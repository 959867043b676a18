//! `cmover agent`: run a server agent that joins its segment's election; `cmover agent status`:
//! ask a running agent for its state, its leader and (on the leader) the registered members.
//!
//! Settings come from a TOML file (`--config`) and flags (flags win). The file has one section
//! per concern so later duties (the GL's reports, MCTP receiving) add sections of their own:
//!
//! ```toml
//! [node]
//! id = 7                          # unique in the cluster
//! name = "bes-7"                  # default: the host name
//! address = "10.0.0.7"            # where the leader reaches this server; default: the interface
//! data_dir = "/var/lib/cmover"    # measured for free disk space
//!
//! [segment]
//! name = "dc1-rack3"
//! cluster_id = 1                  # default: derived from the segment name
//! control_channel = "239.192.0.1:7700"
//! interface = "10.0.0.7"          # IP_MULTICAST_IF; 127.0.0.1 for a loopback cluster
//! ttl = 1
//! loopback = true                 # IP_MULTICAST_LOOP, needed for several agents on one host
//! secret_file = "/etc/cmover/cluster.key"   # or the CM_CLUSTER_SECRET variable
//!
//! [election]
//! heartbeat_ms = 1000
//! eligible = true
//! preassigned = [1, 2]
//! preassigned_only = false
//! operator_weight = 0
//! recent_failures = 0
//! content_lag_secs = 0
//! content_groups = ["web"]
//! data_channel_pool = "239.192.1.1:7800"
//! data_channel_count = 64
//!
//! [status]
//! listen = "127.0.0.1:7710"
//! ```

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use cm_agent::election::{self as driver, DriverConfig, ElectionStatus};
use cm_election::{Config, DataChannelPool, Eligibility, Event, Registration};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

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
#[derive(clap::Args, Default)]
struct RunArgs {
    /// TOML settings file (see `cmover agent --help` and docs/election.md).
    #[arg(long)]
    config: Option<PathBuf>,
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
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct AgentFile {
    node: NodeSection,
    segment: SegmentSection,
    election: ElectionSection,
    status: StatusSection,
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
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_owned()).unwrap_or_else(|_| "server".into())
}

/// The default cluster id: the first 8 bytes of BLAKE3 of the segment name.
fn cluster_id_of(segment: &str) -> u64 {
    let h = blake3::hash(segment.as_bytes());
    u64::from_be_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

fn load_secret(file: Option<&PathBuf>) -> anyhow::Result<Vec<u8>> {
    let secret = match file {
        Some(p) => std::fs::read(p).with_context(|| format!("reading the cluster secret from {}", p.display()))?,
        None => match std::env::var("CM_CLUSTER_SECRET") {
            Ok(s) => s.into_bytes(),
            Err(_) => bail!("no cluster secret: set [segment] secret_file, pass --secret-file, or set CM_CLUSTER_SECRET"),
        },
    };
    if secret.len() < 16 {
        bail!("the cluster secret is {} bytes; use at least 16", secret.len());
    }
    Ok(secret)
}

impl RunArgs {
    fn resolve(self) -> anyhow::Result<AgentSettings> {
        let file: AgentFile = match &self.config {
            Some(p) => {
                let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
                toml::from_str(&text).with_context(|| format!("parsing agent settings {}", p.display()))?
            }
            None => AgentFile::default(),
        };
        let (n, seg, el) = (file.node, file.segment, file.election);
        let node = self.node_id.or(n.id).context("no node id: set [node] id or pass --node-id")?;
        let segment = self.segment.or(seg.name).context("no segment name: set [segment] name or pass --segment")?;
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
        let heartbeat = Duration::from_millis(self.heartbeat_ms.or(el.heartbeat_ms).unwrap_or(1000));
        let cluster = self.cluster_id.or(seg.cluster_id).unwrap_or_else(|| cluster_id_of(&segment));
        let incarnation = SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_micros() as u64);
        let mut cfg = Config::new(cluster, node, incarnation, &secret, control, heartbeat);
        let data_dir = n.data_dir.unwrap_or_else(|| PathBuf::from("."));
        cfg.priority = driver::measure_priority_inputs(&data_dir);
        cfg.priority.operator_weight = self.weight.or(el.operator_weight).unwrap_or(0);
        cfg.priority.recent_failures = el.recent_failures;
        cfg.priority.content_lag_secs = el.content_lag_secs;
        if self.ineligible || el.eligible == Some(false) {
            cfg.eligibility = Eligibility::Ineligible;
        }
        cfg.preassigned = el.preassigned;
        cfg.preassigned_only = el.preassigned_only;
        let groups = if self.content_groups.is_empty() { el.content_groups } else { self.content_groups };
        cfg.registration = Registration {
            name: self.name.or(n.name).unwrap_or_else(host_name),
            address: n.address.unwrap_or_else(|| IpAddr::V4(interface).to_string()),
            cpu_cores: u16::try_from(cfg.priority.cpu_cores).unwrap_or(u16::MAX),
            cpu_mhz: cfg.priority.cpu_mhz,
            free_disk_mib: cfg.priority.free_disk_mib,
            content_groups: groups,
        };
        cfg.data_channels = el.data_channel_pool.map(|first| DataChannelPool { first, count: el.data_channel_count.unwrap_or(64) });
        cfg.validate().context("election settings")?;
        let status = self.status.or(file.status.listen).unwrap_or_else(|| DEFAULT_STATUS.parse().expect("literal"));
        Ok(AgentSettings { segment, election: cfg, driver, status })
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Some(Command::Status { status, json }) => show_status(status, json).await,
        None => run_agent(args.run.resolve()?).await,
    }
}

async fn run_agent(s: AgentSettings) -> anyhow::Result<()> {
    let node = s.election.node;
    let listener = TcpListener::bind(s.status).await.with_context(|| format!("binding the status address {}", s.status))?;
    let control = s.election.control_channel;
    let handle = driver::spawn(s.election, s.driver, rand::random()).context("joining the segment")?;
    tracing::info!(node, segment = %s.segment, %control, status = %s.status, "agent joined the segment");
    let mut events = handle.subscribe();
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Ok(ev) => log_event(node, &ev),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => tracing::warn!(node, missed = n, "event log fell behind"),
                Err(_) => bail!("the election task stopped"),
            },
            conn = listener.accept() => {
                if let Ok((mut stream, _)) = conn {
                    let body = status_json(&s.segment, &handle.status()).to_string();
                    tokio::spawn(async move { let _ = stream.write_all(body.as_bytes()).await; });
                }
            }
            _ = tokio::signal::ctrl_c() => {
                tracing::info!(node, "leaving the segment");
                handle.leave().await?;
                return Ok(());
            }
        }
        if handle.is_finished() {
            bail!("the election task stopped");
        }
    }
}

fn log_event(node: u64, ev: &Event) {
    match ev {
        Event::StateChanged { from, to } => tracing::debug!(node, ?from, ?to, "election state"),
        Event::LeaderPayload { .. } => tracing::debug!(node, "leader heartbeat payload changed"),
        other => tracing::info!(node, event = ?other, "election"),
    }
}

fn status_json(segment: &str, s: &ElectionStatus) -> Value {
    let members: Vec<Value> = s
        .members
        .iter()
        .map(|m| {
            json!({
                "node": m.node,
                "name": m.registration.name,
                "address": m.registration.address,
                "source": m.source.to_string(),
                "content_groups": m.registration.content_groups,
                "cpu_cores": m.registration.cpu_cores,
                "free_disk_mib": m.registration.free_disk_mib,
            })
        })
        .collect();
    let st = &s.stats;
    json!({
        "node": s.node,
        "segment": segment,
        "state": format!("{:?}", s.state),
        "leader": s.leader,
        "is_leader": s.is_leader,
        "registered_with": s.registered_with,
        "control_channel": s.control_channel.to_string(),
        "data_channels": s.data_channels.iter().map(|(g, a)| (g.clone(), Value::from(a.to_string()))).collect::<serde_json::Map<_, _>>(),
        "members": members,
        "stats": {
            "received": st.received, "accepted": st.accepted, "malformed": st.malformed,
            "foreign": st.foreign, "forged": st.forged, "replayed": st.replayed,
            "sent": st.sent, "send_errors": s.send_errors,
        },
    })
}

async fn show_status(addr: SocketAddr, raw: bool) -> anyhow::Result<()> {
    let mut stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .with_context(|| format!("timed out connecting to the agent at {addr}"))?
        .with_context(|| format!("no agent answers at {addr}"))?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut body))
        .await
        .context("timed out reading the agent's status")??;
    let v: Value = serde_json::from_str(&body).context("the agent's status is not JSON")?;
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
    println!("state     {}", v["state"].as_str().unwrap_or("?"));
    println!("leader    {leader}");
    println!("control   {}", v["control_channel"].as_str().unwrap_or("?"));
    if let Some(r) = v["registered_with"].as_u64() {
        println!("registered with node {r}");
    }
    if let Some(members) = v["members"].as_array().filter(|_| v["is_leader"].as_bool() == Some(true)) {
        println!("members   {}", members.len());
        println!("  {:>20}  {:<24} {:<22} {:<22} groups", "node", "name", "address", "source");
        for m in members {
            println!(
                "  {:>20}  {:<24} {:<22} {:<22} {}",
                m["node"],
                m["name"].as_str().unwrap_or(""),
                m["address"].as_str().unwrap_or(""),
                m["source"].as_str().unwrap_or(""),
                m["content_groups"].as_array().map(|g| g.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(",")).unwrap_or_default()
            );
        }
    }
    if let Some(dc) = v["data_channels"].as_object().filter(|d| !d.is_empty()) {
        let list: Vec<String> = dc.iter().map(|(g, a)| format!("{g}={}", a.as_str().unwrap_or("?"))).collect();
        println!("data      {}", list.join(" "));
    }
    let st = &v["stats"];
    println!(
        "datagrams received {} accepted {} dropped: forged {} replayed {} foreign {} malformed {}; sent {}",
        st["received"], st["accepted"], st["forged"], st["replayed"], st["foreign"], st["malformed"], st["sent"]
    );
    Ok(())
}

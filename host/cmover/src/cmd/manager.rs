//! `cmover manager`: runs the Content Control Manager (database, HTTP API, scheduler, tree root).

use anyhow::{Context, bail};
use cm_manager::server::{Manager, ManagerConfig};
use cm_tree::tls::{CertRole, Tls, TlsFiles};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(clap::Args)]
pub struct Args {
    /// Address of the HTTP API (operators and group leaders).
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub listen: SocketAddr,
    /// Database, assignments and snapshots live here.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// File holding the operators' bearer token (else $CMOVER_OPERATOR_TOKEN).
    #[arg(long)]
    pub operator_token_file: Option<PathBuf>,
    /// File holding the agents' bearer token (else $CMOVER_AGENT_TOKEN).
    #[arg(long)]
    pub agent_token_file: Option<PathBuf>,
    /// File holding the cluster secret that seals assignments (servers must share it).
    #[arg(long)]
    pub seal_secret_file: Option<PathBuf>,
    /// The manager's Ed25519 signing key (PKCS#8, `cmover cert signing-key`): every assignment
    /// and notification is signed with it; agents pin its public key and refuse anything else.
    #[arg(long)]
    pub signing_key: Option<PathBuf>,
    /// Children the manager serves at once.
    #[arg(long, default_value_t = 2)]
    pub root_fanout: usize,
    /// Children each group leader serves at once.
    #[arg(long, default_value_t = 2)]
    pub leader_fanout: usize,
    /// Up to this many group leaders the manager serves each itself (a star).
    #[arg(long, default_value_t = 3)]
    pub star_max: usize,
    /// Chunk size of the per-chunk BLAKE3 manifest, KiB.
    #[arg(long, default_value_t = 1024)]
    pub chunk_kib: u32,
    /// Scheduler period, milliseconds.
    #[arg(long, default_value_t = 500)]
    pub tick_ms: u64,
    /// Most members a group leader's discovery report may list (a segment's size); longer
    /// reports are refused.
    #[arg(long, default_value_t = 1024)]
    pub max_segment_members: usize,
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// Mutual TLS (`cmover cert`): all three files, or none for plain HTTP with bearer tokens.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct TlsArgs {
    /// The cluster CA's certificate: clients must present a certificate it signed.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// This node's certificate (`cmover cert issue`).
    #[arg(long, requires_all = ["tls_ca", "tls_key"])]
    pub tls_cert: Option<PathBuf>,
    /// This node's private key.
    #[arg(long, requires_all = ["tls_ca", "tls_cert"])]
    pub tls_key: Option<PathBuf>,
}

impl TlsArgs {
    pub fn files(&self) -> Option<TlsFiles> {
        Some(TlsFiles {
            ca: self.tls_ca.clone()?,
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
        })
    }
}

/// Loads a node's TLS identity and checks its role is `want`.
pub fn load_tls(files: &TlsFiles, want: CertRole) -> anyhow::Result<Tls> {
    let tls = Tls::load(files).context("loading the TLS certificate")?;
    if tls.role != Some(want) {
        bail!(
            "{} is not a {} certificate (it names {}); issue one with `cmover cert issue --role {}`",
            files.cert.display(),
            want.name(),
            tls.role.map_or("no role", |r| r.name()),
            want.name()
        );
    }
    Ok(tls)
}

/// A token nobody knows (TLS mode without token files).
fn random_token() -> String {
    (0..32).map(|_| format!("{:02x}", rand::random::<u8>())).collect()
}

fn secret(file: Option<&Path>, env: &str, what: &str) -> anyhow::Result<String> {
    let s = match file {
        Some(f) => std::fs::read_to_string(f)
            .with_context(|| format!("reading the {what} from {}", f.display()))?,
        None => std::env::var(env).with_context(|| {
            format!("the {what}: pass --{}-file or set ${env}", what.replace(' ', "-"))
        })?,
    };
    let s = s.trim().to_string();
    if s.len() < 16 {
        bail!("the {what} must be at least 16 characters");
    }
    Ok(s)
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    let tls = a.tls.files().map(|f| load_tls(&f, CertRole::Manager)).transpose()?;
    let token =
        |file: Option<&Path>, env: &str, what: &str| match (&tls, file, std::env::var_os(env)) {
            // Over mutual TLS the certificates carry the roles; tokens are not needed (nor consulted).
            (Some(_), None, None) => Ok(random_token()),
            _ => secret(file, env, what),
        };
    let operator =
        token(a.operator_token_file.as_deref(), "CMOVER_OPERATOR_TOKEN", "operator token")?;
    let agent = token(a.agent_token_file.as_deref(), "CMOVER_AGENT_TOKEN", "agent token")?;
    if operator == agent {
        bail!("the operator and agent tokens must differ");
    }
    let mut cfg = ManagerConfig::new(a.data_dir.clone(), &operator, &agent);
    cfg.tls = tls;
    cfg.listen = a.listen;
    cfg.tree.root_fanout = a.root_fanout;
    cfg.tree.leader_fanout = a.leader_fanout;
    cfg.tree.star_max = a.star_max;
    cfg.chunk_size = a.chunk_kib.clamp(4, 65536) << 10;
    cfg.tick = Duration::from_millis(a.tick_ms.max(10));
    cfg.max_segment_members = a.max_segment_members;
    if let Some(f) = &a.seal_secret_file {
        let s = std::fs::read(f)
            .with_context(|| format!("reading the seal secret from {}", f.display()))?;
        cfg.seal = Some(cm_manager::prepare::SealKey::derive(&s));
    }
    match &a.signing_key {
        Some(f) => {
            let k = cm_assignment::SigningKey::load(f)
                .with_context(|| format!("the signing key {}", f.display()))?;
            tracing::info!(public_key = %k.public_key().to_hex(), "signing runs");
            cfg.signer = Some(k);
        }
        None => eprintln!(
            "warning: no --signing-key: runs go out unsigned and every agent will refuse them"
        ),
    }
    let m = Manager::start(cfg).await.context("starting the manager")?;
    tracing::info!(url = m.url(), data = %a.data_dir.display(), "manager running");
    println!("manager listening on {} (data in {})", m.url(), a.data_dir.display());
    tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")?;
    Ok(())
}

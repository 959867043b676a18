//! The manager's settings: a TOML file (`--config`, `docs/manager.example.toml` lists every
//! key) and flags, a flag winning over the file's key. [`resolve`] reads and checks everything
//! that can be checked without starting (files readable, secrets long enough, keys and
//! certificates loadable, addresses and numbers in range) and reports every problem at once,
//! each naming its key, for `--check-config` and for a start that cannot go ahead.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use cm_tree::tls::{CertRole, Tls, TlsFiles};
use serde::Deserialize;

use crate::logging::LogFormat;

/// The defaults a key takes when neither the file nor a flag sets it.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7700";
const DEFAULT_TICK_MS: u64 = 500;
const DEFAULT_GRACE_MS: u64 = 10_000;

#[derive(Deserialize, Default, Debug)]
#[serde(default, deny_unknown_fields)]
pub struct ManagerFile {
    manager: ManagerSection,
    auth: AuthSection,
    signing: SigningSection,
    tree: TreeSection,
    tls: TlsSection,
    log: LogSection,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default, deny_unknown_fields)]
struct ManagerSection {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    store: Option<String>,
    advertise_url: Option<String>,
    lease_ttl_ms: Option<u64>,
    tick_ms: Option<u64>,
    max_segment_members: Option<usize>,
    shutdown_grace_ms: Option<u64>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default, deny_unknown_fields)]
struct AuthSection {
    operator_token_file: Option<PathBuf>,
    agent_token_file: Option<PathBuf>,
    metrics_token_file: Option<PathBuf>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default, deny_unknown_fields)]
struct SigningSection {
    key_file: Option<PathBuf>,
    seal_secret_file: Option<PathBuf>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default, deny_unknown_fields)]
struct TreeSection {
    root_fanout: Option<usize>,
    leader_fanout: Option<usize>,
    star_max: Option<usize>,
    chunk_kib: Option<u32>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default, deny_unknown_fields)]
struct TlsSection {
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default, deny_unknown_fields)]
struct LogSection {
    level: Option<String>,
    format: Option<LogFormat>,
}

/// The manager's flags; each overrides the config key named in its help.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Args {
    /// TOML settings file (docs/manager.example.toml lists every key).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Check the settings (file and flags) and exit: 0 when they are good, 1 with every
    /// problem listed by key. Starts nothing.
    #[arg(long)]
    pub check_config: bool,
    /// Address of the HTTP API (operators and group leaders) [manager.listen; 127.0.0.1:7700].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Database, assignments and snapshots live here [manager.data_dir; required].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Where the records live: redb:PATH, or postgres://user@host/db for several replicas of
    /// which one is active [manager.store; redb:<data_dir>/manager.redb].
    #[arg(long)]
    pub store: Option<String>,
    /// The API's URL as clients reach it; standbys redirect writes there (PostgreSQL store)
    /// [manager.advertise_url; from --listen].
    #[arg(long)]
    pub advertise_url: Option<String>,
    /// A replica's lease lapses this long after its last renewal and a standby takes over,
    /// milliseconds, at least 1000 [manager.lease_ttl_ms; 10000].
    #[arg(long)]
    pub lease_ttl_ms: Option<u64>,
    /// File holding the operators' bearer token, else $CMOVER_OPERATOR_TOKEN
    /// [auth.operator_token_file].
    #[arg(long)]
    pub operator_token_file: Option<PathBuf>,
    /// File holding the agents' bearer token, else $CMOVER_AGENT_TOKEN [auth.agent_token_file].
    #[arg(long)]
    pub agent_token_file: Option<PathBuf>,
    /// File holding the scrape token that opens /metrics besides the operator token
    /// [auth.metrics_token_file; none: operators only].
    #[arg(long)]
    pub metrics_token_file: Option<PathBuf>,
    /// File holding the cluster secret that seals assignments (servers must share it)
    /// [signing.seal_secret_file].
    #[arg(long)]
    pub seal_secret_file: Option<PathBuf>,
    /// The manager's Ed25519 signing key (PKCS#8, `cmover cert signing-key`): every assignment
    /// and notification is signed with it; agents pin its public key and refuse anything else
    /// [signing.key_file].
    #[arg(long)]
    pub signing_key: Option<PathBuf>,
    /// Children the manager serves at once [tree.root_fanout; 2].
    #[arg(long)]
    pub root_fanout: Option<usize>,
    /// Children each group leader serves at once [tree.leader_fanout; 2].
    #[arg(long)]
    pub leader_fanout: Option<usize>,
    /// Up to this many group leaders the manager serves each itself (a star) [tree.star_max; 3].
    #[arg(long)]
    pub star_max: Option<usize>,
    /// Chunk size of the per-chunk BLAKE3 manifest, KiB, 4 to 65536 [tree.chunk_kib; 1024].
    #[arg(long)]
    pub chunk_kib: Option<u32>,
    /// Scheduler period, milliseconds, at least 10 [manager.tick_ms; 500].
    #[arg(long)]
    pub tick_ms: Option<u64>,
    /// Most members a group leader's discovery report may list (a segment's size); longer
    /// reports are refused [manager.max_segment_members; 1024].
    #[arg(long)]
    pub max_segment_members: Option<usize>,
    /// On SIGTERM, how long requests in flight may take to finish, milliseconds
    /// [manager.shutdown_grace_ms; 10000].
    #[arg(long)]
    pub shutdown_grace_ms: Option<u64>,
    #[command(flatten)]
    pub tls: super::TlsArgs,
}

/// Everything the manager runs with, resolved and checked.
pub struct Settings {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// `None`: redb in the data directory.
    pub store: Option<cm_manager::db::StoreSpec>,
    pub advertise_url: Option<String>,
    pub lease_ttl: Duration,
    pub operator_token: Secret,
    pub agent_token: Secret,
    /// `None`: /metrics opens to the operator role only.
    pub metrics_token: Option<Secret>,
    pub seal_secret: Option<(PathBuf, Vec<u8>)>,
    pub signer: Option<(PathBuf, cm_assignment::SigningKey)>,
    pub tls: Option<(TlsFiles, Tls)>,
    pub root_fanout: usize,
    pub leader_fanout: usize,
    pub star_max: usize,
    pub chunk_kib: u32,
    pub tick: Duration,
    pub max_segment_members: usize,
    pub shutdown_grace: Duration,
    pub log_level: Option<String>,
    pub log_format: LogFormat,
}

/// A secret and where it came from (a file can be re-read on SIGHUP; the environment cannot).
#[derive(Clone)]
pub struct Secret {
    pub value: String,
    pub file: Option<PathBuf>,
}

impl Settings {
    /// The settings a SIGHUP cannot change, as (key, value) pairs to compare.
    pub fn restart_only(&self) -> Vec<(&'static str, String)> {
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        vec![
            ("manager.listen", self.listen.to_string()),
            ("manager.data_dir", self.data_dir.display().to_string()),
            ("manager.store", format!("{:?}", self.store.as_ref().map(|s| s.to_string()))),
            ("manager.advertise_url", format!("{:?}", self.advertise_url)),
            ("manager.lease_ttl_ms", self.lease_ttl.as_millis().to_string()),
            ("manager.tick_ms", self.tick.as_millis().to_string()),
            ("manager.max_segment_members", self.max_segment_members.to_string()),
            ("manager.shutdown_grace_ms", self.shutdown_grace.as_millis().to_string()),
            ("signing.key_file", format!("{:?}", self.signer.as_ref().map(|s| &s.0))),
            ("signing.seal_secret_file", format!("{:?}", self.seal_secret.as_ref().map(|s| &s.0))),
            ("tls", format!("{:?}", self.tls.as_ref().map(|t| &t.0))),
            ("tree.root_fanout", self.root_fanout.to_string()),
            ("tree.leader_fanout", self.leader_fanout.to_string()),
            ("tree.star_max", self.star_max.to_string()),
            ("tree.chunk_kib", self.chunk_kib.to_string()),
            ("log.format", format!("{:?}", self.log_format)),
            ("auth.agent_token_file", format!("{:?}", path(&self.agent_token.file))),
        ]
    }
}

/// Every problem found, each naming its key.
#[derive(Debug, Default)]
pub struct Problems(pub Vec<String>);

impl Problems {
    fn add(&mut self, key: &str, what: impl std::fmt::Display) {
        self.0.push(format!("{key}: {what}"));
    }

    /// `r`'s value, or `None` with its error recorded under `key`.
    fn take<T>(&mut self, key: &str, r: anyhow::Result<T>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.add(key, format!("{e:#}"));
                None
            }
        }
    }
}

impl std::fmt::Display for Problems {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for p in &self.0 {
            writeln!(f, "  {p}")?;
        }
        Ok(())
    }
}

/// Reads `--config` (if any).
pub fn read_file(path: Option<&Path>) -> anyhow::Result<ManagerFile> {
    let Some(p) = path else { return Ok(ManagerFile::default()) };
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    toml::from_str(&text).with_context(|| format!("{}", p.display()))
}

fn secret_from(file: Option<&Path>, env: &str, key: &str) -> anyhow::Result<Secret> {
    match file {
        Some(f) => Ok(Secret { value: crate::service::read_secret(f, key)?, file: Some(f.into()) }),
        None => {
            let v = std::env::var(env)
                .with_context(|| format!("not set: set {key} (or its flag) or ${env}"))?;
            let v = v.trim().to_string();
            anyhow::ensure!(v.len() >= 16, "${env} must be at least 16 characters");
            Ok(Secret { value: v, file: None })
        }
    }
}

/// A token nobody knows (TLS mode without token files).
fn random_token() -> String {
    (0..32).map(|_| format!("{:02x}", rand::random::<u8>())).collect()
}

/// Resolves file and flags into [`Settings`], or every problem found.
pub fn resolve(a: &Args) -> Result<Settings, Problems> {
    let mut p = Problems::default();
    let f = match read_file(a.config.as_deref()) {
        Ok(f) => f,
        Err(e) => {
            p.add("--config", format!("{e:#}"));
            return Err(p);
        }
    };
    let (m, auth, sg, tree, lg) = (f.manager, f.auth, f.signing, f.tree, f.log);
    let listen = a.listen.or(m.listen).unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("literal"));
    if listen.port() == 0 {
        p.add("manager.listen", "port 0 is not an address agents and operators can be given");
    }
    let data_dir = a.data_dir.clone().or(m.data_dir);
    match &data_dir {
        None => p.add("manager.data_dir", "not set (or pass --data-dir)"),
        Some(d) if d.exists() && !d.is_dir() => {
            p.add("manager.data_dir", format!("{} is not a directory", d.display()))
        }
        Some(d)
            if !d.exists()
                && !d.parent().is_some_and(|up| up.as_os_str().is_empty() || up.is_dir()) =>
        {
            p.add(
                "manager.data_dir",
                format!("neither {} nor its parent directory exists", d.display()),
            )
        }
        Some(_) => {}
    }
    let store = a.store.clone().or(m.store).and_then(|spec| {
        p.take("manager.store", spec.parse::<cm_manager::db::StoreSpec>().map_err(Into::into))
    });
    let advertise_url = a.advertise_url.clone().or(m.advertise_url);
    if let Some(u) = &advertise_url
        && !(u.starts_with("http://") || u.starts_with("https://"))
    {
        p.add("manager.advertise_url", format!("{u:?} is not an http:// or https:// URL"));
    }
    let lease_ttl_ms = a.lease_ttl_ms.or(m.lease_ttl_ms).unwrap_or(10_000);
    if lease_ttl_ms < 1000 {
        p.add("manager.lease_ttl_ms", format!("{lease_ttl_ms} is below 1000"));
    }
    let tls_files = match (a.tls.files(), f.tls) {
        (Some(files), _) => Some(files),
        (None, TlsSection { ca: Some(ca), cert: Some(cert), key: Some(key) }) => {
            Some(TlsFiles { ca, cert, key })
        }
        (None, TlsSection { ca: None, cert: None, key: None }) => None,
        (None, _) => {
            p.add("tls", "needs all of ca, cert and key");
            None
        }
    };
    let tls = tls_files.and_then(|files| {
        let tls = p.take("tls.cert", super::load_tls(&files, CertRole::Manager));
        tls.map(|t| (files, t))
    });
    let token =
        |file: Option<PathBuf>, env: &str, key: &str| match (&tls, &file, std::env::var_os(env)) {
            // Over mutual TLS the certificates carry the roles; tokens are not needed (nor consulted).
            (Some(_), None, None) => Ok(Secret { value: random_token(), file: None }),
            _ => secret_from(file.as_deref(), env, key),
        };
    let op_key = "auth.operator_token_file";
    let operator = p.take(
        op_key,
        token(
            a.operator_token_file.clone().or(auth.operator_token_file),
            "CMOVER_OPERATOR_TOKEN",
            op_key,
        ),
    );
    let ag_key = "auth.agent_token_file";
    let agent = p.take(
        ag_key,
        token(a.agent_token_file.clone().or(auth.agent_token_file), "CMOVER_AGENT_TOKEN", ag_key),
    );
    if let (Some(o), Some(g)) = (&operator, &agent)
        && o.value == g.value
    {
        p.add(ag_key, "the operator and agent tokens must differ");
    }
    let mt_key = "auth.metrics_token_file";
    let metrics_token = a.metrics_token_file.clone().or(auth.metrics_token_file).and_then(|f| {
        let s = p.take(mt_key, crate::service::read_secret(&f, mt_key))?;
        Some(Secret { value: s, file: Some(f) })
    });
    if let (Some(mt), Some(o), Some(g)) = (&metrics_token, &operator, &agent)
        && (mt.value == o.value || mt.value == g.value)
    {
        p.add(mt_key, "the scrape token must differ from the operator and agent tokens");
    }
    let seal_secret = a.seal_secret_file.clone().or(sg.seal_secret_file).and_then(|f| {
        let s = std::fs::read(&f).with_context(|| format!("cannot read {}", f.display()));
        p.take("signing.seal_secret_file", s).map(|s| (f, s))
    });
    let signer = a.signing_key.clone().or(sg.key_file).and_then(|f| {
        let k = cm_assignment::SigningKey::load(&f).with_context(|| format!("{}", f.display()));
        p.take("signing.key_file", k).map(|k| (f, k))
    });
    let positive = |p: &mut Problems, key: &str, v: usize| {
        if v == 0 {
            p.add(key, "must be at least 1");
        }
        v
    };
    let root_fanout =
        positive(&mut p, "tree.root_fanout", a.root_fanout.or(tree.root_fanout).unwrap_or(2));
    let leader_fanout =
        positive(&mut p, "tree.leader_fanout", a.leader_fanout.or(tree.leader_fanout).unwrap_or(2));
    let star_max = a.star_max.or(tree.star_max).unwrap_or(3);
    let chunk_kib = a.chunk_kib.or(tree.chunk_kib).unwrap_or(1024);
    if !(4..=65536).contains(&chunk_kib) {
        p.add("tree.chunk_kib", format!("{chunk_kib} is outside 4..=65536"));
    }
    let tick_ms = a.tick_ms.or(m.tick_ms).unwrap_or(DEFAULT_TICK_MS);
    if tick_ms < 10 {
        p.add("manager.tick_ms", format!("{tick_ms} is below 10"));
    }
    let max_segment_members = positive(
        &mut p,
        "manager.max_segment_members",
        a.max_segment_members.or(m.max_segment_members).unwrap_or(1024),
    );
    let grace = a.shutdown_grace_ms.or(m.shutdown_grace_ms).unwrap_or(DEFAULT_GRACE_MS);
    let log_level = lg.level;
    if let Some(l) = &log_level {
        p.take("log.level", crate::logging::parse_level(l).map(|_| ()));
    }
    match (data_dir, operator, agent) {
        (Some(data_dir), Some(operator_token), Some(agent_token)) if p.0.is_empty() => {
            Ok(Settings {
                listen,
                data_dir,
                store,
                advertise_url,
                lease_ttl: Duration::from_millis(lease_ttl_ms),
                operator_token,
                agent_token,
                metrics_token,
                seal_secret,
                signer,
                tls,
                root_fanout,
                leader_fanout,
                star_max,
                chunk_kib,
                tick: Duration::from_millis(tick_ms),
                max_segment_members,
                shutdown_grace: Duration::from_millis(grace),
                log_level,
                log_format: lg.format.unwrap_or_default(),
            })
        }
        _ => Err(p),
    }
}

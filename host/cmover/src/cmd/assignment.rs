//! `cmover assignment ...`: build an assignment from a staging tree and the shadow copy, show
//! one, apply one to a local site.

use std::path::PathBuf;

use anyhow::{Context, bail};
use cm_assignment::{AssignmentReader, AssignmentType, BuildOptions, Command as Cmd, CompressionPolicy, Meta, SealKey};
use cm_site::{NativeInterpreter, Site, SiteConfig};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Compare STAGING with SHADOW (the servers' content) and write the assignment to FILE.
    Build(BuildArgs),
    /// Print an assignment's header and commands (checking its hashes).
    Show {
        file: PathBuf,
        /// Check the seal with the key derived from this secret file.
        #[arg(long)]
        secret_file: Option<PathBuf>,
    },
    /// Verify FILE and apply it to the site at DIR (builds a release; commit/rollback/switch
    /// assignments move live).
    Apply {
        file: PathBuf,
        #[arg(long)]
        site: PathBuf,
        #[command(flatten)]
        site_args: SiteArgs,
    },
}

#[derive(clap::Args)]
pub struct BuildArgs {
    /// The new content.
    #[arg(long, required_unless_present_any = ["no_body"])]
    staging: Option<PathBuf>,
    /// What the servers hold now; omitted: an empty tree (replicate, restore).
    #[arg(long)]
    shadow: Option<PathBuf>,
    #[arg(short, long)]
    output: PathBuf,
    /// publish, replicate, synchronize, restore, remove, rollback, switch, commit, hot-content.
    #[arg(long = "type", default_value = "publish")]
    kind: String,
    /// Default: the current unix time in seconds.
    #[arg(long)]
    serial: Option<u64>,
    /// The release live must be for this assignment to apply (0: no check).
    #[arg(long, default_value_t = 0)]
    base_serial: u64,
    /// For commit and switch: the release to make live.
    #[arg(long, default_value_t = 0)]
    target: u64,
    #[arg(long, default_value_t = 0)]
    job: u64,
    /// Seal with the key derived from this secret file.
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Store every payload raw.
    #[arg(long)]
    no_compress: bool,
    /// Build a header-only assignment (rollback, switch, commit).
    #[arg(long, hide = true, default_value_t = false)]
    no_body: bool,
}

/// Site options shared with `cmover site`.
#[derive(clap::Args, Clone)]
pub struct SiteArgs {
    /// Previous releases kept for rollback.
    #[arg(long, default_value_t = 2)]
    pub backups: usize,
    /// Accept only assignments sealed with the key derived from this secret file.
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
}

impl SiteArgs {
    pub fn open(&self, dir: &std::path::Path) -> anyhow::Result<Site> {
        let config = SiteConfig { backups: self.backups, key: key(&self.secret_file)?, ..SiteConfig::default() };
        Ok(Site::open(dir, config)?)
    }
}

fn key(secret_file: &Option<PathBuf>) -> anyhow::Result<Option<SealKey>> {
    secret_file
        .as_ref()
        .map(|f| std::fs::read(f).map(|s| SealKey::derive(&s)).with_context(|| format!("reading {}", f.display())))
        .transpose()
}

fn parse_kind(s: &str) -> anyhow::Result<AssignmentType> {
    AssignmentType::ALL.into_iter().find(|t| t.name() == s).with_context(|| format!("unknown assignment type {s:?}"))
}

pub async fn run(command: Command) -> anyhow::Result<()> {
    // File system work: off the async runtime's worker threads.
    tokio::task::spawn_blocking(move || run_blocking(command)).await?
}

fn run_blocking(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Build(a) => build(a),
        Command::Show { file, secret_file } => show(&file, key(&secret_file)?),
        Command::Apply { file, site, site_args } => {
            let site = site_args.open(&site)?;
            let r = site.apply(&file, &mut NativeInterpreter)?;
            if r.already_applied {
                println!("release {} already built; nothing to do", r.serial);
            } else if let Some(live) = r.now_live {
                println!("{} {}: release {live} is live", r.kind, r.serial);
            } else {
                println!(
                    "{} {}: release {} built ({} commands, {} files linked from live, {} bytes written); commit to make it live",
                    r.kind, r.serial, r.serial, r.commands, r.linked, r.bytes_written
                );
            }
            Ok(())
        }
    }
}

fn build(a: BuildArgs) -> anyhow::Result<()> {
    let kind = parse_kind(&a.kind)?;
    let serial = a.serial.unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_secs()));
    let meta = Meta { kind, serial, job_id: a.job, base_serial: a.base_serial, target_serial: a.target };
    let seal = key(&a.secret_file)?;
    if kind.is_switch_only() {
        let h = cm_assignment::detect::build_switch(&a.output, meta, seal)?;
        println!("{} assignment {} written to {}", h.kind, h.serial, a.output.display());
        return Ok(());
    }
    let Some(staging) = a.staging else { bail!("--staging is required for a {kind} assignment") };
    let mut opts = BuildOptions::new(kind, serial);
    opts.meta = meta;
    opts.seal = seal;
    if a.no_compress {
        opts.policy = CompressionPolicy::none();
    }
    let shadow = if kind.builds_from_empty() { None } else { a.shadow.as_deref() };
    let t = std::time::Instant::now();
    let r = cm_assignment::build(&staging, shadow, &a.output, &opts)?;
    println!(
        "{kind} {serial} → {}: {} bytes; {} new, {} changed ({} as deltas, {} literal bytes), {} deleted, {} unchanged; {:.3} s",
        a.output.display(),
        r.file_len,
        r.new,
        r.changed,
        r.deltas,
        r.literal_bytes,
        r.deleted,
        r.unchanged,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn show(file: &std::path::Path, key: Option<SealKey>) -> anyhow::Result<()> {
    let r = AssignmentReader::open(file).with_context(|| format!("assignment {}", file.display()))?;
    let h = r.header();
    println!("assignment {}", file.display());
    println!("  type {}  serial {}  job {}  base {}  target {}", h.kind, h.serial, h.job_id, h.base_serial, h.target_serial);
    println!("  commands {}  body {} bytes  data {} bytes  flags {:#04x}", h.command_count, h.body_len, h.data_len, h.flags);
    println!("  data BLAKE3 {}", blake3::Hash::from_bytes(h.data_hash).to_hex());
    match r.verify(key.as_ref()) {
        Ok(()) => println!("  hashes: ok"),
        Err(e) => println!("  hashes: FAILED: {e}"),
    }
    for c in r.commands() {
        let (i, cmd) = c.with_context(|| format!("assignment {}", file.display()))?;
        let line = match &cmd {
            Cmd::MakeDir { path, mode } => format!("make-dir {path} {mode:o}"),
            Cmd::WriteFile { path, mode, payload, .. } => {
                format!("write-file {path} {mode:o} {} bytes ({} stored, {:?})", payload.len, payload.stored_len, payload.codec)
            }
            Cmd::ApplyDelta { path, base, mode, ops, payload, len, .. } => format!(
                "apply-delta {path} base={base} {mode:o} → {len} bytes: {} ops, {} literal bytes ({} stored)",
                ops.len(),
                payload.len,
                payload.stored_len
            ),
            Cmd::Remove { path, recursive } => format!("remove {path}{}", if *recursive { " (recursive)" } else { "" }),
            Cmd::Rename { from, to } => format!("rename {from} → {to}"),
            Cmd::Symlink { path, target } => format!("symlink {path} → {target}"),
            Cmd::SetMode { path, mode } => format!("set-mode {path} {mode:o}"),
        };
        println!("  {i:>6}  {line}");
    }
    Ok(())
}

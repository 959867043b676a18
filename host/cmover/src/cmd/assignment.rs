//! `cmover assignment ...`: build an assignment from a staging tree and the shadow copy, show
//! one, apply one to a local site.

use std::path::PathBuf;

use anyhow::{Context, bail};
use cm_assignment::{
    AssignmentReader, AssignmentType, BuildOptions, CipherKey, Command as Cmd, CompressionPolicy,
    Meta, SealKey, SigningKey, TrustedKeys,
};
use cm_plugin_host::{
    LoadedPlugin, PluginManifest, PluginRuntime, PluginSlot, PluginStore, RuntimeConfig, bundled,
};
use cm_site::{Interpreter, NativeInterpreter, Site, SiteConfig, SpecialBits};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Compare STAGING with SHADOW (the servers' content) and write the assignment to FILE.
    Build(BuildArgs),
    /// Print an assignment's header and commands (checking its hashes).
    Show {
        file: PathBuf,
        /// Check the seal (and decrypt) with the keys derived from this secret file.
        #[arg(long)]
        secret_file: Option<PathBuf>,
        /// Check the signature against these manager public keys (one per line).
        #[arg(long)]
        manager_key: Option<PathBuf>,
    },
    /// Verify FILE and apply it to the site at DIR (builds a release; commit/rollback/switch
    /// assignments move live).
    Apply {
        file: PathBuf,
        #[arg(long)]
        site: PathBuf,
        #[command(flatten)]
        site_args: SiteArgs,
        #[command(flatten)]
        interpreter: InterpreterArgs,
    },
}

#[derive(clap::Args)]
pub struct BuildArgs {
    /// The new content (not for the header-only types: rollback, switch, commit).
    #[arg(long)]
    staging: Option<PathBuf>,
    /// What the servers hold now; omitted: an empty tree (replicate, restore).
    #[arg(long)]
    shadow: Option<PathBuf>,
    #[arg(short, long)]
    output: PathBuf,
    /// publish, replicate, synchronize, restore, remove, rollback, switch, commit, hot-content.
    #[arg(long = "type", default_value = "publish")]
    kind: String,
    /// The assignment's serial: unique and increasing per site (the release it builds is
    /// `releases/<serial>`). Give it, or `--site`.
    #[arg(long, required_unless_present = "site")]
    serial: Option<u64>,
    /// Take the serial from the site at DIR: one past every serial it applied.
    #[arg(long, value_name = "DIR", conflicts_with = "serial")]
    site: Option<PathBuf>,
    /// The release live must be for this assignment to apply (0: no check).
    #[arg(long, default_value_t = 0)]
    base_serial: u64,
    /// For commit and switch: the release to make live.
    #[arg(long, default_value_t = 0)]
    target: u64,
    #[arg(long, default_value_t = 0)]
    job: u64,
    /// The hosted site it is for (the header's site field): an agent applies it to the root of
    /// the site of this name, and refuses it when it serves none.
    #[arg(long, value_name = "NAME", default_value = cm_assignment::names::DEFAULT_SITE)]
    site_name: String,
    /// Seal with the key derived from this secret file.
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Also encrypt the data part with the cipher key derived from --secret-file.
    #[arg(long, requires = "secret_file")]
    encrypt: bool,
    /// Sign with this Ed25519 key (PKCS#8, `cmover cert signing-key`).
    #[arg(long)]
    signing_key: Option<PathBuf>,
    /// Store every payload raw.
    #[arg(long)]
    no_compress: bool,
    /// setuid, setgid and sticky bits in staging: `strip` them (counted) or `refuse` the build.
    #[arg(long, default_value = "strip", value_parser = parse_special_bits)]
    special_bits: SpecialBits,
}

fn parse_special_bits(s: &str) -> Result<SpecialBits, String> {
    SpecialBits::parse(s).ok_or_else(|| format!("{s:?}: expected strip or refuse"))
}

fn parse_owner(s: &str) -> Result<(u32, u32), String> {
    let bad = || format!("{s:?}: expected UID:GID (numbers)");
    let (u, g) = s.split_once(':').ok_or_else(bad)?;
    Ok((u.parse().map_err(|_| bad())?, g.parse().map_err(|_| bad())?))
}

/// Site options shared with `cmover site`.
#[derive(clap::Args, Clone)]
pub struct SiteArgs {
    /// Previous releases kept for rollback.
    #[arg(long, default_value_t = 2)]
    pub backups: usize,
    /// Accept only assignments sealed with the key derived from this secret file (and decrypt
    /// encrypted ones with the cipher key derived from it).
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    /// setuid, setgid and sticky bits in content: `strip` them (counted) or `refuse` the apply.
    #[arg(long, default_value = "strip", value_parser = parse_special_bits)]
    pub special_bits: SpecialBits,
    /// UID:GID every entry of a release is given (when running as root).
    #[arg(long, value_parser = parse_owner)]
    pub owner: Option<(u32, u32)>,
    /// Accept only assignments signed by one of these manager public keys (one per line).
    #[arg(long, conflicts_with = "unsigned")]
    pub manager_key: Option<PathBuf>,
    /// Apply assignments whatever their signature (a hand-built one); without it, applying
    /// needs --manager-key.
    #[arg(long)]
    pub unsigned: bool,
}

impl SiteArgs {
    pub fn open(&self, dir: &std::path::Path) -> anyhow::Result<Site> {
        let secret = read_secret(&self.secret_file)?;
        let config = SiteConfig {
            backups: self.backups,
            key: secret.as_deref().map(SealKey::derive),
            cipher: secret.as_deref().map(CipherKey::derive),
            special_bits: self.special_bits,
            owner: self.owner,
            signers: self.manager_key.as_deref().map(load_keys).transpose()?,
            ..SiteConfig::default()
        };
        Ok(Site::open(dir, config)?)
    }
}

/// Which interpreter carries out the commands (shared with `cmover site`).
#[derive(clap::Args, Clone)]
pub struct InterpreterArgs {
    /// The interpreter plugin: a component file (`.wasm`), or the name of a plugin installed in
    /// --plugin-store. Default: the bundled default interpreter plugin.
    #[arg(long, conflicts_with = "native")]
    pub interpreter: Option<String>,
    /// The plugin store holding --interpreter NAME.
    #[arg(long)]
    pub plugin_store: Option<PathBuf>,
    /// Carry out commands natively in this process instead of in the plugin sandbox.
    #[arg(long)]
    pub native: bool,
}

/// The chosen interpreter; a plugin keeps its runtime alive beside it.
pub enum ChosenInterpreter {
    Native(NativeInterpreter),
    Plugin { interp: cm_plugin_host::Interpreter, _runtime: PluginRuntime },
}

impl ChosenInterpreter {
    pub fn get(&mut self) -> &mut dyn Interpreter {
        match self {
            ChosenInterpreter::Native(n) => n,
            ChosenInterpreter::Plugin { interp, .. } => interp,
        }
    }
}

impl InterpreterArgs {
    /// Loads the interpreter for the site at `site_dir`. A plugin is granted that site by its
    /// directory name (a store plugin's own manifest must grant it).
    pub fn load(&self, site_dir: &std::path::Path) -> anyhow::Result<ChosenInterpreter> {
        if self.native {
            return Ok(ChosenInterpreter::Native(NativeInterpreter));
        }
        let site = std::fs::canonicalize(site_dir)
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "site".into());
        let component = |runtime: &PluginRuntime,
                         bytes: &[u8],
                         origin: &str|
         -> anyhow::Result<cm_plugin_host::Interpreter> {
            let manifest: PluginManifest =
                bundled::interpreter_manifest("interpreter", &[site.as_str()]);
            let plugin = LoadedPlugin::load(runtime, bytes, manifest, origin)
                .with_context(|| format!("loading interpreter {origin}"))?;
            Ok(cm_plugin_host::Interpreter::new(PluginSlot::new(plugin), &site)?)
        };
        let (interp, runtime) = match (&self.interpreter, &self.plugin_store) {
            (None, _) => {
                let runtime = PluginRuntime::new(RuntimeConfig::default())?;
                (component(&runtime, bundled::INTERPRETER, "bundled interpreter.wasm")?, runtime)
            }
            (Some(name), Some(store)) if !name.ends_with(".wasm") => {
                let config = RuntimeConfig {
                    compiled_cache: Some(PluginStore::compiled_cache_dir(store)),
                    ..RuntimeConfig::default()
                };
                let runtime = PluginRuntime::new(config)?;
                let store = PluginStore::open(runtime.clone(), store)
                    .with_context(|| format!("plugin store {}", store.display()))?;
                (
                    store
                        .interpreter(name, &site)
                        .with_context(|| format!("interpreter plugin {name:?}"))?,
                    runtime,
                )
            }
            (Some(file), _) => {
                let bytes = std::fs::read(file).with_context(|| format!("reading interpreter component {file} (give --plugin-store to name an installed plugin)"))?;
                let runtime = PluginRuntime::new(RuntimeConfig::default())?;
                (component(&runtime, &bytes, file)?, runtime)
            }
        };
        Ok(ChosenInterpreter::Plugin { interp, _runtime: runtime })
    }
}

fn load_keys(f: &std::path::Path) -> anyhow::Result<TrustedKeys> {
    TrustedKeys::load(f).with_context(|| format!("manager public key {}", f.display()))
}

fn read_secret(secret_file: &Option<PathBuf>) -> anyhow::Result<Option<Vec<u8>>> {
    secret_file
        .as_ref()
        .map(|f| std::fs::read(f).with_context(|| format!("reading {}", f.display())))
        .transpose()
}

fn parse_kind(s: &str) -> anyhow::Result<AssignmentType> {
    AssignmentType::ALL
        .into_iter()
        .find(|t| t.name() == s)
        .with_context(|| format!("unknown assignment type {s:?}"))
}

pub async fn run(command: Command) -> anyhow::Result<()> {
    // File system work: off the async runtime's worker threads.
    tokio::task::spawn_blocking(move || run_blocking(command)).await?
}

fn run_blocking(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Build(a) => build(a),
        Command::Show { file, secret_file, manager_key } => {
            let keys = manager_key.as_deref().map(load_keys).transpose()?;
            show(&file, read_secret(&secret_file)?, keys.as_ref())
        }
        Command::Apply { file, site, site_args, interpreter } => {
            if site_args.manager_key.is_none() && !site_args.unsigned {
                bail!(
                    "pass --manager-key FILE to check the manager's signature, or --unsigned to apply an assignment nobody vouched for"
                );
            }
            let site = site_args.open(&site)?;
            let mut interp = interpreter.load(site.root())?;
            let r = site.apply(&file, interp.get())?;
            if r.modes_stripped > 0 {
                println!(
                    "{} entries had setuid, setgid or sticky bits: stripped (site policy)",
                    r.modes_stripped
                );
            }
            if r.already_applied {
                println!(
                    "release {} already built from this very assignment; nothing to do",
                    r.serial
                );
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
    let serial = match (a.serial, &a.site) {
        (Some(s), _) => s,
        (None, Some(dir)) => Site::open(dir, SiteConfig::default())
            .and_then(|site| site.next_serial())
            .with_context(|| format!("reading the next serial of the site at {}", dir.display()))?,
        (None, None) => bail!("give --serial N or --site DIR"),
    };
    let meta = Meta {
        kind,
        serial,
        job_id: a.job,
        base_serial: a.base_serial,
        target_serial: a.target,
        site: a.site_name.clone(),
    };
    let secret = read_secret(&a.secret_file)?;
    let seal = secret.as_deref().map(SealKey::derive);
    let signer = match &a.signing_key {
        Some(f) => {
            Some(SigningKey::load(f).with_context(|| format!("signing key {}", f.display()))?)
        }
        None => None,
    };
    if kind.is_switch_only() {
        let h = cm_assignment::detect::build_switch(&a.output, meta, seal, signer)?;
        println!("{} assignment {} written to {}", h.kind, h.serial, a.output.display());
        return Ok(());
    }
    let Some(staging) = a.staging else { bail!("--staging is required for a {kind} assignment") };
    let mut opts = BuildOptions::new(kind, serial);
    opts.meta = meta;
    opts.seal = seal;
    opts.signer = signer;
    if a.encrypt {
        opts.cipher = secret.as_deref().map(CipherKey::derive);
    }
    if a.no_compress {
        opts.policy = CompressionPolicy::none();
    }
    opts.special_bits = a.special_bits;
    let shadow = if kind.builds_from_empty() { None } else { a.shadow.as_deref() };
    let t = std::time::Instant::now();
    let r = cm_assignment::build(&staging, shadow, &a.output, &opts)?;
    if r.modes_stripped > 0 {
        println!(
            "{} staging entries had setuid, setgid or sticky bits: stripped",
            r.modes_stripped
        );
    }
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

fn show(
    file: &std::path::Path,
    secret: Option<Vec<u8>>,
    keys: Option<&TrustedKeys>,
) -> anyhow::Result<()> {
    let mut r =
        AssignmentReader::open(file).with_context(|| format!("assignment {}", file.display()))?;
    if let Some(s) = &secret {
        r.decrypt_with(&CipherKey::derive(s))
            .with_context(|| format!("assignment {}", file.display()))?;
    }
    let key = secret.as_deref().map(SealKey::derive);
    let h = r.header();
    println!("assignment {}", file.display());
    println!(
        "  site {}  type {}  serial {}  job {}  base {}  target {}",
        h.site, h.kind, h.serial, h.job_id, h.base_serial, h.target_serial
    );
    println!(
        "  commands {}  body {} bytes  data {} bytes  flags {:#04x}",
        h.command_count, h.body_len, h.data_len, h.flags
    );
    println!("  data BLAKE3 {}", blake3::Hash::from_bytes(h.data_hash).to_hex());
    match r.verify(key.as_ref(), keys) {
        Ok(()) if keys.is_some() => println!("  hashes and signature: ok"),
        Ok(()) => println!("  hashes: ok"),
        Err(e) => println!("  hashes: FAILED: {e}"),
    }
    for c in r.commands() {
        let (i, cmd) = c.with_context(|| format!("assignment {}", file.display()))?;
        let line = match &cmd {
            Cmd::MakeDir { path, mode } => format!("make-dir {path} {mode:o}"),
            Cmd::WriteFile { path, mode, payload, .. } => {
                format!(
                    "write-file {path} {mode:o} {} bytes ({} stored, {:?})",
                    payload.len, payload.stored_len, payload.codec
                )
            }
            Cmd::ApplyDelta { path, base, mode, ops, payload, len, .. } => format!(
                "apply-delta {path} base={base} {mode:o} → {len} bytes: {} ops, {} literal bytes ({} stored)",
                ops.len(),
                payload.len,
                payload.stored_len
            ),
            Cmd::Remove { path, recursive } => {
                format!("remove {path}{}", if *recursive { " (recursive)" } else { "" })
            }
            Cmd::Rename { from, to } => format!("rename {from} → {to}"),
            Cmd::Symlink { path, target } => format!("symlink {path} → {target}"),
            Cmd::SetMode { path, mode } => format!("set-mode {path} {mode:o}"),
        };
        println!("  {i:>6}  {line}");
    }
    if r.has_tree() {
        let n = r.tree().count();
        println!("  tree manifest: {n} entries (the whole resulting tree, checked before commit)");
    }
    Ok(())
}

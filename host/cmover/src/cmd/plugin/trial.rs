//! `cmover plugin test DIR|FILE --assignment FILE | --staging DIR`: an interpreter plugin
//! applies an assignment into a temporary site, as an agent would, and the command shows the
//! resulting tree, each command's report and the plugin's log lines. Other worlds run their
//! self-check.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use cm_assignment::{BuildOptions, Command as Cmd, StreamedCommand};
use cm_plugin_host::{
    LoadedPlugin, LogLevel, PluginManifest, PluginRuntime, PluginSlot, RuntimeConfig, World,
    bundled,
};
use cm_site::{CommandReport, Interpreter, InterpreterError, Site, SiteConfig};

/// What to try the plugin on.
pub struct Trial {
    /// A plugin crate (its built component and `manifest.toml`) or a component file.
    pub plugin: PathBuf,
    pub manifest: Option<PathBuf>,
    pub assignment: Option<PathBuf>,
    pub staging: Option<PathBuf>,
    /// The site's name (the manifest must grant it).
    pub site: String,
    /// Keep the site here instead of in a temporary directory.
    pub site_dir: Option<PathBuf>,
}

type Logs = Arc<Mutex<Vec<(LogLevel, String)>>>;

/// The component and the manifest to try.
fn plugin_files(trial: &Trial) -> anyhow::Result<(PathBuf, PluginManifest)> {
    let (component, default_manifest) = if trial.plugin.is_dir() {
        let component = super::build::component_path(&trial.plugin)?;
        if !component.is_file() {
            bail!(
                "{} is not built yet: run `cmover plugin build {}` first",
                component.display(),
                trial.plugin.display()
            );
        }
        (component, Some(trial.plugin.join("manifest.toml")))
    } else {
        (trial.plugin.clone(), None)
    };
    let manifest = match trial.manifest.as_ref().or(default_manifest.as_ref()) {
        Some(path) => PluginManifest::load(path)?,
        // A lone component: an interpreter granted the test site.
        None => bundled::interpreter_manifest("interpreter", &[trial.site.as_str()]),
    };
    Ok((component, manifest))
}

pub fn run(trial: Trial) -> anyhow::Result<()> {
    let (component, manifest) = plugin_files(&trial)?;
    let logs: Logs = Arc::default();
    let sink = logs.clone();
    let runtime = PluginRuntime::new(RuntimeConfig {
        max_instances: 4,
        log_sink: Some(Arc::new(move |_, level, message: &str| {
            sink.lock().unwrap_or_else(|e| e.into_inner()).push((level, message.to_string()))
        })),
        ..Default::default()
    })?;
    let bytes =
        std::fs::read(&component).with_context(|| format!("reading {}", component.display()))?;
    let plugin = LoadedPlugin::load(&runtime, &bytes, manifest, &component.display().to_string())?;
    println!("plugin  {} ({}, {})", plugin.name(), plugin.world(), plugin.version());
    let outcome = match plugin.world() {
        World::Interpreter => apply(&trial, plugin),
        world => {
            println!("a {world} applies no assignment: running its self-check");
            plugin.self_check().map_err(anyhow::Error::from)
        }
    };
    print_logs(&logs);
    outcome
}

fn apply(trial: &Trial, plugin: Arc<LoadedPlugin>) -> anyhow::Result<()> {
    let temp = tempfile::tempdir()?;
    let root = match &trial.site_dir {
        Some(dir) => dir.clone(),
        None => temp.path().join(&trial.site),
    };
    let site = Site::open(&root, SiteConfig::default())
        .with_context(|| format!("opening the test site {}", root.display()))?;
    let assignment = match (&trial.assignment, &trial.staging) {
        (Some(file), None) => file.clone(),
        (None, Some(staging)) => {
            let file = temp.path().join("from-staging.cma");
            let serial = site.next_serial()?;
            let options = BuildOptions::new(cm_assignment::AssignmentType::Publish, serial);
            cm_assignment::build(staging, None, &file, &options)
                .with_context(|| format!("building an assignment from {}", staging.display()))?;
            file
        }
        _ => bail!("give --assignment FILE or --staging DIR"),
    };
    let interpreter = cm_plugin_host::Interpreter::new(PluginSlot::new(plugin), &trial.site)?;
    let mut recorder = Recorder { inner: interpreter, reports: Vec::new() };
    let applied = site.apply(&assignment, &mut recorder);
    println!("commands");
    for (command, outcome) in &recorder.reports {
        match outcome {
            Ok(()) => println!("  ok      {command}"),
            Err(message) => println!("  FAILED  {command}: {message}"),
        }
    }
    let report = applied.with_context(|| format!("applying {}", assignment.display()))?;
    let release = site.release_path(report.serial);
    println!(
        "release {} ({} commands, {} bytes written)",
        report.serial, report.commands, report.bytes_written
    );
    print_tree(&release, &release)?;
    if trial.site_dir.is_some() {
        println!("site kept at {}", root.display());
    }
    Ok(())
}

/// Every entry under `dir`, sorted, with its size or link target.
fn print_tree(root: &Path, dir: &Path) -> anyhow::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let relative = path.strip_prefix(root).unwrap_or(&path).display();
        let meta = entry.file_type()?;
        if meta.is_symlink() {
            println!("  {relative} -> {}", std::fs::read_link(&path)?.display());
        } else if meta.is_dir() {
            println!("  {relative}/");
            print_tree(root, &path)?;
        } else {
            println!("  {relative}  {} bytes", entry.metadata()?.len());
        }
    }
    Ok(())
}

fn print_logs(logs: &Logs) {
    let logs = logs.lock().unwrap_or_else(|e| e.into_inner());
    println!("log ({} lines)", logs.len());
    for (level, message) in logs.iter() {
        println!("  {:<5}  {message}", format!("{level:?}").to_lowercase());
    }
}

/// The plugin as the site's interpreter, remembering each command and its report.
struct Recorder {
    inner: cm_plugin_host::Interpreter,
    reports: Vec<(String, Result<(), String>)>,
}

impl Interpreter for Recorder {
    fn apply(
        &mut self,
        staging_root: &Path,
        batch: Vec<StreamedCommand>,
    ) -> Result<Vec<CommandReport>, InterpreterError> {
        let described: Vec<String> = batch.iter().map(describe).collect();
        let reports = self.inner.apply(staging_root, batch)?;
        for report in &reports {
            let command = described.get(report.index as usize).cloned().unwrap_or_default();
            self.reports.push((command, report.outcome.clone()));
        }
        Ok(reports)
    }

    fn commit(&mut self, serial: u64) -> Result<(), InterpreterError> {
        Interpreter::commit(&mut self.inner, serial)
    }

    fn rollback(&mut self, serial: u64) -> Result<(), InterpreterError> {
        Interpreter::rollback(&mut self.inner, serial)
    }
}

fn describe(command: &StreamedCommand) -> String {
    match command {
        Cmd::MakeDir { path, mode } => format!("make-dir {path} {mode:o}"),
        Cmd::WriteFile { path, mode, payload, .. } => {
            format!("write-file {path} {mode:o} {} bytes", payload.size())
        }
        Cmd::ApplyDelta { path, base, len, .. } => {
            format!("apply-delta {path} base={base} → {len} bytes")
        }
        Cmd::Remove { path, .. } => format!("remove {path}"),
        Cmd::Rename { from, to } => format!("rename {from} → {to}"),
        Cmd::Symlink { path, target } => format!("symlink {path} → {target}"),
        Cmd::SetMode { path, mode } => format!("set-mode {path} {mode:o}"),
    }
}

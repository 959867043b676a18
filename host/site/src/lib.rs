//! A hosted site on a server: releases, applying an assignment through the interpreter into a
//! new release, and atomic, crash-safe commit and rollback.
//!
//! The live tree is `SITE/current`, a symlink to `releases/<serial>`. Applying an assignment
//! builds `releases/<serial>` next to live (hard links to live's unchanged files, plus the
//! changes made by the interpreter); live is untouched until commit, which renames a new
//! `current` link over the old one. See [`layout`] for the on-disk rules that make every step
//! atomic and crash-safe.

mod apply;
mod beneath;
mod built;
mod clone;
mod hot;
mod interpreter;
pub mod layout;
pub mod native;
mod remove;
mod replay;
mod verify;

use std::fmt;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use cm_assignment::{AssignmentReader, AssignmentType, CipherKey, ReadError, SealKey, TrustedKeys};

pub use cm_assignment::policy::SpecialBits;

pub use apply::ApplyCause;
pub use interpreter::{CommandReport, Interpreter, InterpreterError};
pub use native::NativeInterpreter;

/// How a site is run.
#[derive(Debug, Clone)]
pub struct SiteConfig {
    /// Previous releases kept for rollback (besides live and prepared ones).
    pub backups: usize,
    /// When set, only assignments sealed with this key are accepted.
    pub key: Option<SealKey>,
    /// When set, only assignments signed by one of these manager keys are accepted (an empty
    /// set refuses everything). `None`: signatures are not checked (hand tools only).
    pub signers: Option<TrustedKeys>,
    /// Decrypts encrypted assignments (one without it is refused before anything is applied).
    pub cipher: Option<CipherKey>,
    /// Most commands per interpreter call.
    pub batch_commands: usize,
    /// What becomes of setuid, setgid and sticky bits in content (default: stripped).
    pub special_bits: SpecialBits,
    /// `uid:gid` every entry of a release is given when the site runs as root (otherwise
    /// everything belongs to the user the site runs as). `None`: left as created.
    pub owner: Option<(u32, u32)>,
}

impl Default for SiteConfig {
    fn default() -> Self {
        SiteConfig {
            backups: 2,
            key: None,
            signers: None,
            cipher: None,
            batch_commands: 256,
            special_bits: SpecialBits::Strip,
            owner: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    #[error("assignment {file}: {source}; nothing applied, live unchanged")]
    Read { file: PathBuf, source: ReadError },
    #[error(
        "assignment {file} ({kind} serial {serial}): {cause}; release {serial} discarded, live unchanged"
    )]
    Apply { file: PathBuf, kind: AssignmentType, serial: u64, cause: ApplyCause },
    #[error("site {site}: {what}: {source}")]
    Io { site: PathBuf, what: String, source: io::Error },
    #[error(
        "assignment {file} ({kind} serial {serial}) is not newer than serial {newest} this site already applied: refusing a replay; live unchanged"
    )]
    Replay { file: PathBuf, kind: AssignmentType, serial: u64, newest: u64 },
    #[error(
        "assignment {file} ({kind} serial {serial}): release {serial} was built from a different assignment (blake3 {built_by}, this one is {this}); refused, nothing changed: serials are unique per site (build with the site's next serial)"
    )]
    SerialReused {
        file: PathBuf,
        kind: AssignmentType,
        serial: u64,
        built_by: String,
        this: String,
    },
    #[error(
        "assignment {file} is a plugin run, not content: it goes to the plugin store, never to a site"
    )]
    NotContent { file: PathBuf },
    #[error("site {site}: there is no release {serial}")]
    NoRelease { site: PathBuf, serial: u64 },
    #[error("site {site}: no prepared release to commit")]
    NothingPrepared { site: PathBuf },
    #[error("site {site}: no earlier release to roll back to")]
    NoPrevious { site: PathBuf },
    #[error(
        "site {site}: release {serial} was not committed before the live one: no rollback to it"
    )]
    NotCommitted { site: PathBuf, serial: u64 },
    #[error(
        "site {site}: the interpreter vetoed {what} of release {serial}: {source}; live unchanged"
    )]
    Vetoed { site: PathBuf, what: &'static str, serial: u64, source: InterpreterError },
}

/// What an apply did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    pub kind: AssignmentType,
    pub serial: u64,
    pub commands: u64,
    /// Files linked from live into the new release.
    pub linked: u64,
    /// Bytes of files written by the interpreter (checked against the assignment).
    pub bytes_written: u64,
    /// The release that is live afterwards, when this apply switched it.
    pub now_live: Option<u64>,
    /// The release already existed: the assignment had been applied before.
    pub already_applied: bool,
    /// Entries whose setuid, setgid or sticky bits the site's policy cleared.
    pub modes_stripped: u64,
}

/// A release's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseState {
    Live,
    /// Committed earlier; a rollback target.
    Backup,
    /// Built and never committed (or rolled back from): a commit or switch target.
    Prepared,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub current: Option<u64>,
    pub history: Vec<u64>,
    pub releases: Vec<(u64, ReleaseState)>,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.current {
            Some(c) => writeln!(f, "live: release {c}")?,
            None => writeln!(f, "live: none (nothing committed yet)")?,
        }
        for (s, st) in &self.releases {
            writeln!(
                f,
                "  {s:>12}  {}",
                match st {
                    ReleaseState::Live => "live",
                    ReleaseState::Backup => "backup",
                    ReleaseState::Prepared => "prepared",
                }
            )?;
        }
        Ok(())
    }
}

/// The release depth a signed switching assignment carries (see `docs/assignment-format.md`:
/// the base-serial field of rollback, switch and commit): committed releases kept, live
/// included. `None` (0, or another type): the site's own setting.
fn release_depth(h: &cm_assignment::Header) -> Option<usize> {
    (h.kind.is_switch_only() && h.base_serial != 0)
        .then(|| usize::try_from(h.base_serial.min(u64::from(u32::MAX))).unwrap_or(usize::MAX))
}

/// One site directory.
#[derive(Debug)]
pub struct Site {
    root: PathBuf,
    config: SiteConfig,
}

/// Holds the site's lock for one operation.
struct Locked(#[allow(dead_code)] File);

impl Site {
    /// Opens (creating if needed) the site at `root` and repairs what an interrupted operation
    /// left: half-built releases and trash are removed, `history` is reconciled with `current`.
    pub fn open(root: &Path, config: SiteConfig) -> Result<Site, SiteError> {
        let site = Site { root: root.to_path_buf(), config };
        fs::create_dir_all(root.join(layout::RELEASES)).map_err(site.io("creating the site"))?;
        let _lock = site.lock()?;
        site.recover()?;
        Ok(site)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The live tree's path (follow it to read live content).
    pub fn live_path(&self) -> PathBuf {
        self.root.join(layout::CURRENT)
    }

    pub fn release_path(&self, serial: u64) -> PathBuf {
        layout::release_dir(&self.root, serial)
    }

    /// The serial the next assignment built for this site should carry: one past every serial
    /// it applied, built or committed (serials are unique and increasing per site).
    pub fn next_serial(&self) -> Result<u64, SiteError> {
        let newest = replay::newest(&self.root).map_err(self.io("reading the newest serial"))?;
        Ok(newest + 1)
    }

    /// The owner entries are given: the configured one, when this process may give files away.
    fn owner(&self) -> Option<(u32, u32)> {
        self.config.owner.filter(|_| rustix::process::geteuid().is_root())
    }

    fn io(&self, what: impl Into<String>) -> impl FnOnce(io::Error) -> SiteError {
        let (site, what) = (self.root.clone(), what.into());
        move |source| SiteError::Io { site, what, source }
    }

    fn lock(&self) -> Result<Locked, SiteError> {
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.root.join(".lock"))
            .map_err(self.io("opening the lock file"))?;
        f.lock().map_err(self.io("locking the site"))?;
        Ok(Locked(f))
    }

    fn recover(&self) -> Result<(), SiteError> {
        for left in layout::leftovers(&self.root).map_err(self.io("listing releases"))? {
            tracing::warn!(path = %left.display(), "removing what an interrupted operation left");
            layout::remove_tree(&left).map_err(self.io(format!("removing {}", left.display())))?;
        }
        for e in fs::read_dir(&self.root).map_err(self.io("listing the site"))? {
            let e = e.map_err(self.io("listing the site"))?;
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(".current-") || name.starts_with(".history-") {
                fs::remove_file(e.path()).map_err(self.io(format!("removing {name}")))?;
            }
        }
        // A hot release overlays its base, which is what the history ends with (`hot.rs`).
        let current = hot::committed_live(&self.root).map_err(self.io("reading `current`"))?;
        let mut history = layout::read_history(&self.root).map_err(self.io("reading history"))?;
        let fixed = match current {
            Some(c) if history.last() != Some(&c) => {
                match history.iter().rposition(|s| *s == c) {
                    // A rollback or switch was journalled but `current` not switched yet.
                    Some(at) => history.truncate(at + 1),
                    // A commit was journalled... or `current` moved without us: trust `current`.
                    None => history.push(c),
                }
                true
            }
            None if !history.is_empty() => {
                history.clear();
                true
            }
            _ => false,
        };
        if fixed {
            layout::write_history(&self.root, &history).map_err(self.io("repairing history"))?;
        }
        Ok(())
    }

    pub fn status(&self) -> Result<Status, SiteError> {
        let current = layout::current_serial(&self.root).map_err(self.io("reading `current`"))?;
        let history = layout::read_history(&self.root).map_err(self.io("reading history"))?;
        let releases = layout::list_releases(&self.root)
            .map_err(self.io("listing releases"))?
            .into_iter()
            .map(|s| {
                let st = if Some(s) == current {
                    ReleaseState::Live
                } else if history.contains(&s) {
                    ReleaseState::Backup
                } else {
                    ReleaseState::Prepared
                };
                (s, st)
            })
            .collect();
        Ok(Status { current, history, releases })
    }

    /// Verifies and applies the assignment at `file`: builds a release, or (commit, rollback,
    /// switch) moves `current`. On any failure live is unchanged and the partial release is gone.
    pub fn apply(
        &self,
        file: &Path,
        interp: &mut dyn Interpreter,
    ) -> Result<ApplyReport, SiteError> {
        let _lock = self.lock()?;
        let read_err = |source| SiteError::Read { file: file.to_path_buf(), source };
        let mut reader = AssignmentReader::open(file).map_err(read_err)?;
        if let Some(k) = &self.config.cipher {
            reader.decrypt_with(k).map_err(read_err)?;
        }
        reader.verify(self.config.key.as_ref(), self.config.signers.as_ref()).map_err(read_err)?;
        let h = reader.header().clone();
        let newest = replay::newest(&self.root).map_err(self.io("reading the newest serial"))?;
        if replay::must_be_newer(h.kind) && h.serial <= newest {
            return Err(SiteError::Replay {
                file: file.to_path_buf(),
                kind: h.kind,
                serial: h.serial,
                newest,
            });
        }
        let report = self.apply_verified(&reader, &h, interp)?;
        replay::record(&self.root, h.serial).map_err(self.io("recording the newest serial"))?;
        Ok(report)
    }

    fn apply_verified(
        &self,
        reader: &AssignmentReader,
        h: &cm_assignment::Header,
        interp: &mut dyn Interpreter,
    ) -> Result<ApplyReport, SiteError> {
        let keep = release_depth(h);
        let switched = |now_live| ApplyReport {
            kind: h.kind,
            serial: h.serial,
            commands: 0,
            linked: 0,
            bytes_written: 0,
            now_live: Some(now_live),
            already_applied: false,
            modes_stripped: 0,
        };
        match h.kind {
            AssignmentType::Commit => {
                let target = match h.target_serial {
                    0 => self
                        .newest_prepared()?
                        .ok_or_else(|| SiteError::NothingPrepared { site: self.root.clone() })?,
                    t => t,
                };
                self.commit_locked(target, keep, interp).map(switched)
            }
            AssignmentType::Rollback => {
                let to = (h.target_serial != 0).then_some(h.target_serial);
                self.rollback_locked(to, keep, interp).map(switched)
            }
            AssignmentType::Switch => {
                self.commit_locked(h.target_serial, keep, interp).map(switched)
            }
            AssignmentType::Plugin => {
                Err(SiteError::NotContent { file: reader.path().to_path_buf() })
            }
            AssignmentType::RemoveSite => {
                remove::remove_content(self)?;
                Ok(ApplyReport { now_live: None, ..switched(0) })
            }
            _ => {
                let mut report = apply::build_release(self, reader, interp)?;
                if h.kind == AssignmentType::HotContent && !report.already_applied {
                    report.now_live = Some(self.go_hot(h.serial, h.base_serial, interp)?);
                }
                Ok(report)
            }
        }
    }

    fn newest_prepared(&self) -> Result<Option<u64>, SiteError> {
        let st = self.status()?;
        Ok(st.releases.iter().rev().find(|(_, s)| *s == ReleaseState::Prepared).map(|(s, _)| *s))
    }

    /// Makes release `serial` live (None: the newest prepared one). Returns the live serial.
    pub fn commit(
        &self,
        serial: Option<u64>,
        interp: &mut dyn Interpreter,
    ) -> Result<u64, SiteError> {
        let _lock = self.lock()?;
        let serial = match serial {
            Some(s) => s,
            None => self
                .newest_prepared()?
                .ok_or_else(|| SiteError::NothingPrepared { site: self.root.clone() })?,
        };
        self.commit_locked(serial, None, interp)
    }

    /// Switches live back to the release committed before the current one.
    pub fn rollback(&self, interp: &mut dyn Interpreter) -> Result<u64, SiteError> {
        let _lock = self.lock()?;
        self.rollback_locked(None, None, interp)
    }

    /// Switches live back to release `to`, committed earlier and still kept: every release
    /// committed after it leaves the history (as a rollback of several steps at once).
    pub fn rollback_to(&self, to: u64, interp: &mut dyn Interpreter) -> Result<u64, SiteError> {
        let _lock = self.lock()?;
        self.rollback_locked(Some(to), None, interp)
    }

    /// Removes release `serial` if it is prepared (built, never committed): an aborted run's
    /// release, or one a newer build superseded. Live and committed releases are never touched.
    /// Returns whether a release was removed.
    pub fn discard_prepared(&self, serial: u64) -> Result<bool, SiteError> {
        let _lock = self.lock()?;
        let st = self.status()?;
        if !st.releases.iter().any(|(s, state)| *s == serial && *state == ReleaseState::Prepared) {
            return Ok(false);
        }
        layout::discard(&self.root, &self.release_path(serial))
            .map_err(self.io(format!("removing prepared release {serial}")))?;
        built::forget(&self.root, serial)
            .map_err(self.io(format!("forgetting release {serial}")))?;
        Ok(true)
    }

    /// `keep`: committed releases kept, live included (from a signed assignment's header);
    /// `None`: the site's own setting.
    fn commit_locked(
        &self,
        serial: u64,
        keep: Option<usize>,
        interp: &mut dyn Interpreter,
    ) -> Result<u64, SiteError> {
        let Some(Agreed { hot }) = self.agree_switch(serial, interp)? else { return Ok(serial) };
        let mut history = layout::read_history(&self.root).map_err(self.io("reading history"))?;
        // Back from a hot overlay to its base: the base is committed already.
        if !(hot.is_some() && history.last() == Some(&serial)) {
            history.push(serial);
            // Journal first, then the atomic switch (see `layout`).
            layout::write_history(&self.root, &history).map_err(self.io("writing history"))?;
        }
        layout::switch_current(&self.root, serial).map_err(self.io("switching `current`"))?;
        self.leave_hot(hot)?;
        self.prune(serial, &history, keep)?;
        Ok(serial)
    }

    /// Makes the hot release `serial`, built on the committed live release `base`, live at
    /// once without committing it (`hot.rs`); a hot release live before it is discarded.
    fn go_hot(
        &self,
        serial: u64,
        base: u64,
        interp: &mut dyn Interpreter,
    ) -> Result<u64, SiteError> {
        if base == 0 {
            // Nothing live to overlay: the release is simply committed.
            return self.commit_locked(serial, None, interp);
        }
        let Some(Agreed { hot: before }) = self.agree_switch(serial, interp)? else {
            return Ok(serial);
        };
        hot::record(&self.root, hot::Hot { serial, base })
            .map_err(self.io("recording the hot release"))?;
        layout::switch_current(&self.root, serial).map_err(self.io("switching `current`"))?;
        if let Some(b) = before {
            self.discard_release(b.serial)?;
        }
        Ok(serial)
    }

    /// What every switch to `serial` does first: `None` when it is live already; otherwise the
    /// interpreter agreed to it, and the hot release live before it (if any) is known.
    fn agree_switch(
        &self,
        serial: u64,
        interp: &mut dyn Interpreter,
    ) -> Result<Option<Agreed>, SiteError> {
        if !self.release_path(serial).is_dir() {
            return Err(SiteError::NoRelease { site: self.root.clone(), serial });
        }
        let current = layout::current_serial(&self.root).map_err(self.io("reading `current`"))?;
        if current == Some(serial) {
            return Ok(None);
        }
        let hot = hot::live_hot(&self.root, current).map_err(self.io("reading `hot`"))?;
        interp.commit(serial).map_err(|source| SiteError::Vetoed {
            site: self.root.clone(),
            what: "commit",
            serial,
            source,
        })?;
        Ok(Some(Agreed { hot }))
    }

    /// After `current` moved off a hot release: forget and discard it.
    fn leave_hot(&self, hot: Option<hot::Hot>) -> Result<(), SiteError> {
        let Some(h) = hot else { return Ok(()) };
        hot::clear(&self.root).map_err(self.io("clearing `hot`"))?;
        self.discard_release(h.serial)
    }

    fn discard_release(&self, serial: u64) -> Result<(), SiteError> {
        layout::discard(&self.root, &self.release_path(serial))
            .map_err(self.io(format!("removing release {serial}")))?;
        built::forget(&self.root, serial).map_err(self.io(format!("forgetting release {serial}")))
    }

    fn rollback_locked(
        &self,
        to: Option<u64>,
        keep: Option<usize>,
        interp: &mut dyn Interpreter,
    ) -> Result<u64, SiteError> {
        let current = layout::current_serial(&self.root).map_err(self.io("reading `current`"))?;
        let hot = hot::live_hot(&self.root, current).map_err(self.io("reading `hot`"))?;
        let mut history = layout::read_history(&self.root).map_err(self.io("reading history"))?;
        let (Some(cur), true) = (current, history.len() >= 2) else {
            return Err(SiteError::NoPrevious { site: self.root.clone() });
        };
        // Where in the history live goes back to: the entry before live, or `to`'s last one.
        let at = match to {
            None => history.len() - 2,
            Some(t) => history[..history.len() - 1]
                .iter()
                .rposition(|s| *s == t)
                .ok_or(SiteError::NotCommitted { site: self.root.clone(), serial: t })?,
        };
        let target = history[at];
        if !self.release_path(target).is_dir() {
            return Err(SiteError::NoRelease { site: self.root.clone(), serial: target });
        }
        interp.rollback(cur).map_err(|source| SiteError::Vetoed {
            site: self.root.clone(),
            what: "rollback",
            serial: cur,
            source,
        })?;
        history.truncate(at + 1);
        layout::write_history(&self.root, &history).map_err(self.io("writing history"))?;
        layout::switch_current(&self.root, target).map_err(self.io("switching `current`"))?;
        self.leave_hot(hot)?;
        self.prune(target, &history, keep)?;
        Ok(target)
    }

    /// Deletes releases beyond the release depth: keeps live and the last `depth - 1` other
    /// committed releases (`depth`: the assignment's, else `backups + 1` from the config), and
    /// releases newer than live that are not in the history (prepared).
    fn prune(&self, live: u64, history: &[u64], depth: Option<usize>) -> Result<(), SiteError> {
        let backups = depth.map_or(self.config.backups, |d| d.saturating_sub(1));
        let mut keep = vec![live];
        for s in history.iter().rev() {
            if keep.len() > backups {
                break;
            }
            if !keep.contains(s) {
                keep.push(*s);
            }
        }
        for s in layout::list_releases(&self.root).map_err(self.io("listing releases"))? {
            let prepared = s > live && !history.contains(&s);
            if !keep.contains(&s) && !prepared {
                layout::discard(&self.root, &self.release_path(s))
                    .map_err(self.io(format!("removing release {s}")))?;
                built::forget(&self.root, s).map_err(self.io(format!("forgetting release {s}")))?;
            }
        }
        Ok(())
    }
}

/// A switch the interpreter agreed to (`Site::agree_switch`): the hot release live before it.
struct Agreed {
    hot: Option<hot::Hot>,
}

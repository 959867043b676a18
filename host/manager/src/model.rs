//! The manager's records: what the database stores and the HTTP API carries (JSON via serde).
//! See `docs/manager.md` for the schema. The messages of the tree itself (notifications, a GL's
//! discovery and segment reports) are `cm_tree::message`'s.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use cm_tree::link::LinkRates;
use cm_tree::manifest::Manifest;
pub use cm_tree::member_state::PluginIdentity;
pub use cm_tree::space::FsSpace;

/// A backend server as the manager knows it from its segment's discovery reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerRecord {
    pub name: String,
    /// Segment the server was last reported in.
    pub segment: String,
    /// False once its GL reported it left (or the whole segment went silent).
    pub live: bool,
    /// When its segment or liveness last changed (written only on a change).
    pub last_seen_ms: u64,
    /// The interpreter plugin it last reported (through its GL's discovery report).
    #[serde(default)]
    pub plugin: Option<PluginIdentity>,
    /// The free space and inodes of its site root's filesystem, as last reported (`space.rs`).
    #[serde(default)]
    pub space: Option<FsSpace>,
    /// When `space` was reported (ms since the epoch; 0: never).
    #[serde(default)]
    pub space_ms: u64,
}

/// A segment record. `static_rank` is the operator's override of the tree order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentRecord {
    pub name: String,
    pub leader: String,
    pub address: String,
    pub location: String,
    pub cpu_power: u32,
    pub free_disk: u64,
    pub connections: u32,
    pub members: Vec<String>,
    pub last_report_ms: u64,
    /// Operator-pinned position in the distribution order (lower first); `None` = sorted.
    pub static_rank: Option<u32>,
    /// Every leader change, oldest first (server name, time): the segment outlives its GLs.
    pub leader_history: Vec<(String, u64)>,
    /// The link speeds its GL last reported (kept across GL changes until the new GL measures).
    #[serde(default)]
    pub links: Option<LinkRates>,
}

/// A content group: the servers that receive a hosted site's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentGroup {
    pub name: String,
    pub servers: Vec<String>,
}

/// A hosted site: a staging tree published to one content group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostedSite {
    pub name: String,
    pub content_group: String,
    /// Where the operator's staging tree is, on the manager's machine.
    pub staging: String,
    /// Serial of the newest assignment built for the site (every assignment gets the next one).
    #[serde(default)]
    pub serial: u64,
    /// The newest release distributed successfully and not yet committed.
    #[serde(default)]
    pub prepared: Option<u64>,
    /// Releases committed, oldest first; the last is live on the servers (rollback pops it).
    #[serde(default)]
    pub committed: Vec<u64>,
    /// Snapshots (shadow copies) kept: the last this many committed releases (rollback targets and
    /// delta bases), besides the prepared one and any newer than live. The rest are pruned.
    #[serde(default = "default_keep_releases")]
    pub keep_releases: u32,
    /// Per server, the release the manager last saw it commit (or roll back to): a server of the
    /// content group without the live release gets a replicate run.
    #[serde(default)]
    pub holders: BTreeMap<String, u64>,
    /// Checkpoints kept (the oldest are deleted past this many).
    #[serde(default = "default_keep_checkpoints")]
    pub keep_checkpoints: u32,
    /// Servers the site's content was removed from (a `remove` job): the manager does not bring
    /// them up to date on its own; a replicate or synchronize job naming them does.
    #[serde(default)]
    pub removed: std::collections::BTreeSet<String>,
    /// Which staging paths make a release (`filter.rs`).
    #[serde(default)]
    pub filter: ContentFilter,
    /// How the site's assignments compress payloads.
    #[serde(default)]
    pub compression: Compression,
    /// Go-live: policy, load balancer, server addresses, health check (`golive/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub golive: Option<crate::golive::GoLive>,
    /// Servers rotation took out of the balancer (behind, failed, silent), and when each
    /// last changed (`golive/rotation.rs`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rotation: BTreeMap<String, crate::golive::Rotated>,
    /// What follows a commit: the caches' path limit and the search-engine refresh
    /// (`live_change.rs`, `search_refresh.rs`).
    #[serde(default)]
    pub refresh: crate::search_refresh::RefreshSettings,
    /// Per server, the newest release it reported built (and the run that built it), committed
    /// or not: a server that built live but missed its commit gets just the commit (`sync.rs`).
    #[serde(default)]
    pub built: BTreeMap<String, BuiltRelease>,
    /// Per server, the hot release it has live over the committed live release (`hot.rs`):
    /// not out of date, so not caught up; gone with the next commit, rollback or switch there.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub hot: BTreeMap<String, HotHolding>,
}

/// A hot release live on a server: the committed release `base` plus `paths` from staging.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HotHolding {
    pub release: u64,
    pub base: u64,
    pub paths: Vec<String>,
    /// The run that made it live.
    pub run: u64,
}

/// A release a server reported built, and the run that built it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuiltRelease {
    pub release: u64,
    pub run: u64,
}

/// Which paths of the staging tree reach the servers: globs over the path relative to the
/// staging root (`**/*.tmp`, `private/**`). A path any `exclude` glob matches is left out (a
/// directory with everything below it); when `include` is not empty a file or symlink must
/// match one of its globs. Directories are kept unless excluded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentFilter {
    #[serde(default)]
    pub include: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
}

/// A site's compression policy (cm-assignment's `CompressionPolicy`): the zstd `level` (1 to
/// 19; 0 stores every payload raw), files smaller than `min_size` bytes stored raw, and the file
/// types (extensions, without the dot, any case) stored raw: `skip_extensions` (`None`: the
/// built-in list of formats already compressed — jpg, png, zip, woff2…).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compression {
    #[serde(default = "default_compression_level")]
    pub level: i32,
    #[serde(default = "default_compression_min_size")]
    pub min_size: u64,
    #[serde(default)]
    pub skip_extensions: Option<Vec<String>>,
}

fn default_compression_level() -> i32 {
    3
}

fn default_compression_min_size() -> u64 {
    128
}

impl Default for Compression {
    fn default() -> Self {
        Compression {
            level: default_compression_level(),
            min_size: default_compression_min_size(),
            skip_extensions: None,
        }
    }
}

pub fn default_keep_checkpoints() -> u32 {
    5
}

/// A checkpoint: a complete, compressed copy of a site's live snapshot in the manager's data
/// directory (`checkpoints/<site>/<id>.cma`), to restore later (`checkpoint.rs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub site: String,
    /// Per site, increasing.
    pub id: u64,
    /// The live release it copies.
    pub release: u64,
    pub created_ms: u64,
    #[serde(default)]
    pub note: Option<String>,
    /// Bytes of the archive.
    pub size: u64,
    /// BLAKE3 of the archive (hex), checked before every use.
    pub blake3: String,
    /// Entries (files, directories, symlinks) and bytes of files of the content, uncompressed.
    pub entries: u64,
    pub content_bytes: u64,
}

/// A snapshot of the manager (the shadow copy of a release) as the API lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub release: u64,
    /// `live`, `committed`, `prepared` or `building` (newer than live, not committed).
    pub state: String,
    /// The newest checkpoint taken of a release at or before this one: the one it follows.
    pub follows_checkpoint: Option<u64>,
}

pub fn default_keep_releases() -> u32 {
    2
}

impl HostedSite {
    pub fn live(&self) -> Option<u64> {
        self.committed.last().copied()
    }
}

/// What a job carries to the servers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Payload {
    /// A ready-made assignment file, sent as opaque bytes.
    File { path: String },
    /// Built by the manager (cm-assignment): the site's staging tree against the snapshot of what
    /// is live on the servers (the shadow copy); the new snapshot is kept for the next delta.
    Staging,
    /// Header only: make release `serial` live (`None`: the site's newest prepared release).
    Commit { serial: Option<u64> },
    /// Header only: switch back to the release committed before the live one, or (`to`) to an
    /// earlier committed release the servers still keep (the releases after it leave the history).
    Rollback {
        #[serde(default)]
        to: Option<u64>,
    },
    /// Header only: make the kept release `serial` live (a committed one still kept, or the
    /// prepared one); it becomes the newest committed release.
    Switch { serial: u64 },
    /// A checkpoint's content, built as a new release against the live snapshot (or whole, when
    /// that is smaller) and committed like any release: the job kind `restore`.
    Checkpoint { id: u64 },
    /// No assignment: a checkpoint of the site's live snapshot (the job kind `checkpoint`).
    CreateCheckpoint {
        #[serde(default)]
        note: Option<String>,
    },
    /// The site's live release, whole (replicate type, built from empty) from its snapshot, with
    /// the live serial, to `servers` of the content group (empty: all of it): brings servers that
    /// lack it (e.g. one that just joined) up to date.
    Live {
        #[serde(default)]
        servers: Vec<String>,
    },
    /// Synchronize (the job kind `synchronize`): servers of the content group (or `servers` of
    /// it) that do not hold the live release catch up, grouped by the release they hold: a delta
    /// from that release's snapshot to live where the manager still keeps it, else the live
    /// release whole. One assignment (and run, then its commit) per group (`sync.rs`).
    CatchUp {
        #[serde(default)]
        servers: Vec<String>,
    },
    /// Destructive: the site's content (releases, live link, history) removed from `servers` of
    /// the content group (empty: the whole group) by a header-only `remove-site` assignment; the
    /// job kind `remove` (`remove.rs`).
    Remove {
        #[serde(default)]
        servers: Vec<String>,
    },
    /// Hot content (the job kind `hot`): the live release plus `paths` (files of the staging
    /// tree, relative to it) as one hot-content release, live at once on `servers` of the
    /// content group, or — `servers` empty — on `count` live, up-to-date servers the manager
    /// picks, spread over segments (written into `servers` when the job first runs).
    Hot {
        paths: Vec<String>,
        #[serde(default)]
        servers: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        count: Option<u32>,
    },
    /// A plugin for the servers' plugin stores (the job kind `plugin`, `fleet.rs`): the
    /// component `version` (its BLAKE3) with the manifest `manifest` (the manifest text's
    /// BLAKE3), both kept by the manager, sent to `servers` of `group` (empty: all of it) as a
    /// signed plugin run. `then`: the servers published to once this (canary) run succeeded.
    /// `rollback`: why this run brings a previous version back (`None`: a publish).
    /// `confirmed`: servers whose first content run with this version succeeded.
    Plugin {
        name: String,
        version: String,
        manifest: String,
        group: String,
        #[serde(default)]
        servers: Vec<String>,
        #[serde(default)]
        then: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rollback: Option<String>,
        #[serde(default)]
        confirmed: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    Publish,
    Replicate,
    Synchronize,
    Commit,
    Rollback,
    Switch,
    Restore,
    Checkpoint,
    Remove,
    Hot,
    Plugin,
}

impl JobKind {
    /// The kind as the API spells it (`"publish"`).
    pub fn name(self) -> &'static str {
        match self {
            JobKind::Publish => "publish",
            JobKind::Replicate => "replicate",
            JobKind::Synchronize => "synchronize",
            JobKind::Commit => "commit",
            JobKind::Rollback => "rollback",
            JobKind::Switch => "switch",
            JobKind::Restore => "restore",
            JobKind::Checkpoint => "checkpoint",
            JobKind::Remove => "remove",
            JobKind::Hot => "hot",
            JobKind::Plugin => "plugin",
        }
    }
}

/// Enough live servers for a run: at least `min_servers`, and at least `min_percent` of the group.
/// A field left out takes its default (100 %, 1 server).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Quorum {
    pub min_percent: u8,
    pub min_servers: u32,
}

impl Default for Quorum {
    fn default() -> Self {
        Quorum { min_percent: 100, min_servers: 1 }
    }
}

/// What a failed run does to its job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "action")]
pub enum OnFailure {
    /// Run again after `delay_ms`, at most `max_attempts` runs in all.
    Retry {
        #[serde(default = "default_max_attempts")]
        max_attempts: u32,
        #[serde(default = "default_retry_delay_ms")]
        delay_ms: u64,
    },
    Cancel,
}

fn default_max_attempts() -> u32 {
    3
}

fn default_retry_delay_ms() -> u64 {
    30_000
}

/// What a due job does when it conflicts with a running one (same site, overlapping servers),
/// or when the quorum is short before it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnBlocked {
    /// Stay idle and try again (conflict: when the other job ends; quorum: after `defer_ms`).
    Queue,
    Cancel,
}

/// Whether a release that reached its quorum goes live without an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommitPolicy {
    /// The manager sends the commit assignment to the servers that hold the release, in the same job.
    #[default]
    Auto,
    /// The release stays prepared until an operator's commit job.
    Manual,
}

/// A field left out takes its value from [`JobPolicy::default`] (a partial policy is accepted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct JobPolicy {
    pub quorum: Quorum,
    /// What happens after a run that builds a release reached the quorum.
    #[serde(default)]
    pub commit: CommitPolicy,
    pub on_failure: OnFailure,
    pub on_conflict: OnBlocked,
    pub on_quorum_shortfall: OnBlocked,
    /// How long a quorum shortfall defers the job.
    pub defer_ms: u64,
    /// A run that has not heard from every segment after this long ends; silent servers count as missing.
    pub run_timeout_ms: u64,
    /// How a release of this job goes live (`None`: the site's `golive.policy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub go_live: Option<crate::golive::GoLivePolicy>,
    /// What a run does with servers short of the space it needs (`space.rs`).
    #[serde(default)]
    pub space: SpacePolicy,
}

/// The space check before a run distributes (`space.rs`): each server's need (what it will
/// write, plus the reserve) against the free space and inodes it reported. A field left out
/// takes its default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SpacePolicy {
    /// What the run does when servers are short.
    pub on_short: OnSpaceShort,
    /// How long `wait` waits, from when it first found servers short (then the run fails).
    pub wait_ms: u64,
    /// Bytes and inodes every server must keep free beyond what the run writes (by default
    /// what the agents' interpreter plugins keep free: 64 MiB and 4,096 inodes).
    pub reserve_bytes: u64,
    pub reserve_inodes: u64,
}

impl Default for SpacePolicy {
    fn default() -> Self {
        SpacePolicy {
            on_short: OnSpaceShort::Fail,
            wait_ms: 600_000,
            reserve_bytes: 64 << 20,
            reserve_inodes: 4096,
        }
    }
}

/// What a run does with servers short of space, before it distributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnSpaceShort {
    /// The run fails before any byte moves (retried or cancelled per `on_failure`).
    #[default]
    Fail,
    /// The run goes on without them; they count against the quorum as failures.
    Skip,
    /// The job waits (up to `wait_ms`), re-checked as servers report their space, then fails.
    Wait,
}

impl OnSpaceShort {
    pub fn name(self) -> &'static str {
        match self {
            OnSpaceShort::Fail => "fail",
            OnSpaceShort::Skip => "skip",
            OnSpaceShort::Wait => "wait",
        }
    }
}

impl Default for JobPolicy {
    fn default() -> Self {
        JobPolicy {
            quorum: Quorum::default(),
            commit: CommitPolicy::Auto,
            on_failure: OnFailure::Retry {
                max_attempts: default_max_attempts(),
                delay_ms: default_retry_delay_ms(),
            },
            on_conflict: OnBlocked::Queue,
            on_quorum_shortfall: OnBlocked::Queue,
            defer_ms: 30_000,
            run_timeout_ms: 600_000,
            go_live: None,
            space: SpacePolicy::default(),
        }
    }
}

/// What an operator submits: what, where, when, how often, and the policies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    pub name: String,
    pub kind: JobKind,
    /// The hosted site; its content group says where.
    pub site: String,
    pub payload: Payload,
    /// First run at or after this time (ms since the epoch); 0 = now.
    #[serde(default)]
    pub start_at_ms: u64,
    /// Repeat every this many ms after a successful run; `None` = once.
    #[serde(default)]
    pub every_ms: Option<u64>,
    #[serde(default)]
    pub policy: JobPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum JobState {
    /// Waiting for `next_run_ms` (seed: "idle").
    Idle,
    Running {
        run: u64,
    },
    Done,
    Cancelled {
        reason: String,
    },
    /// An operator stopped its run `run` (`POST /api/v1/jobs/{id}/abort`): nothing of the run
    /// went live; `by` says who (how they authenticated), `at_ms` when.
    Aborted {
        run: u64,
        by: String,
        at_ms: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: u64,
    pub spec: JobSpec,
    pub state: JobState,
    pub next_run_ms: u64,
    /// Runs started since the last success.
    pub attempts: u32,
    /// Why the job last did not run or failed (quorum shortfall, conflict, failure), for the console.
    pub last_reason: Option<String>,
    /// A release this job distributed that still has to be committed: the job's next run is its
    /// commit run (set when a distribution run met its quorum under `CommitPolicy::Auto`).
    #[serde(default)]
    pub pending_commit: Option<PendingCommit>,
    /// A rolling or canary switch of this job, in progress or ended (`golive/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roll: Option<crate::golive::Roll>,
    /// Servers were short of space and the policy waits: since when, and who needed what.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub space_wait: Option<SpaceWait>,
    /// An all-at-once run changed what is live: the job stays running until its segments'
    /// GLs report their cache calls, bounded (`golive/caches.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_wait: Option<crate::golive::CacheWait>,
}

/// A job waiting for servers to have the space its run needs (`SpacePolicy::on_short` `wait`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpaceWait {
    /// When servers were first found short (the wait ends `wait_ms` after it).
    pub since_ms: u64,
    /// Each short server's need, bytes and inodes (reserve included), when last checked.
    pub needs: BTreeMap<String, (u64, u64)>,
}

/// A distributed release waiting for its commit run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingCommit {
    pub release: u64,
    /// The run that distributed it.
    pub distributed_by: u64,
    /// The servers that reported it built: the commit goes to them.
    pub holders: Vec<String>,
}

/// How far one segment got in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SegmentStatus {
    Pending,
    /// Its GL holds the whole assignment, verified.
    Received,
    /// Its GL sent the consolidated report.
    Reported,
    /// Its GL died or could not be reached and no new GL picked the run up.
    Lost,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentRun {
    pub leader: String,
    pub address: String,
    pub status: SegmentStatus,
    /// The servers of this segment the run targets.
    pub servers: Vec<String>,
    /// Its GL reported the run's cache calls (`cache_report.rs`).
    #[serde(default)]
    pub caches_reported: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "phase")]
pub enum RunPhase {
    Distributing,
    Succeeded,
    Failed {
        reason: String,
    },
    /// Stopped by an operator (`by`, at `at_ms`): the servers discard what it prepared.
    Aborted {
        by: String,
        at_ms: u64,
    },
}

/// One run of a job: persisted at every step so a manager restart resumes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    pub id: u64,
    pub job: u64,
    pub started_ms: u64,
    pub deadline_ms: u64,
    pub phase: RunPhase,
    /// The assignment's serial when the manager built it (publish, commit, rollback).
    #[serde(default)]
    pub serial: Option<u64>,
    /// The release this run builds on the servers (what a commit makes live), when known.
    #[serde(default)]
    pub release: Option<u64>,
    /// Set on a commit run that follows a distribution run automatically: that run's id.
    #[serde(default)]
    pub commit_of: Option<u64>,
    /// For a run that changes live: what the GLs tell their caches (`live_change.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<cm_tree::cache::CacheOrder>,
    pub manifest: Manifest,
    /// Bytes each server writes for this run (new and changed files' contents, directories),
    /// before the reserve and the GL's copy of the assignment (`space.rs`).
    pub disk_needed: u64,
    pub segments: BTreeMap<String, SegmentRun>,
}

impl Run {
    /// The segments whose GL reported this run's cache calls.
    pub fn caches_reported(&self) -> std::collections::BTreeSet<String> {
        self.segments.iter().filter(|(_, s)| s.caches_reported).map(|(n, _)| n.clone()).collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum ServerOutcome {
    Succeeded,
    Failed {
        reason: String,
    },
    /// The GL never heard from it.
    Missing,
}

/// One line of the history log of every assignment run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub seq: u64,
    pub at_ms: u64,
    pub job: Option<u64>,
    pub run: Option<u64>,
    pub event: String,
}

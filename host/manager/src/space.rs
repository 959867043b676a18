//! Space per server, checked before a run distributes (issue 16 §7).
//!
//! Every server reports the free space and inodes of its site root's filesystem (`statvfs`,
//! relayed by its GL: `cm_tree::space`, stored in its `ServerRecord`). A run's need is what a
//! server will write to build the release ([`need_of`]): the uncompressed bytes of every new
//! and changed file (the assignment's `write-file` and `apply-delta` commands, each rounded up
//! to whole 4 KiB blocks) and one block per directory, and an inode for each written file,
//! directory and symlink of the new release (unchanged files are hard links from live: no data,
//! no inode). On a GL, the stored copy of the assignment comes on top; on every server, the
//! policy's reserve. Header-only runs (commit, rollback, switch, remove) write nothing and are
//! not checked.
//!
//! Servers short of it ([`shortfalls`]) are named before any byte moves, with need against
//! free, and the job's [`SpacePolicy`] decides: `fail` (the run fails), `skip` (the run goes on
//! without them; they count as failed against the quorum) or `wait` (the job waits, re-checked
//! as servers report their space, up to `wait_ms`, then fails). A server that never reported
//! its space is not checked (an older agent); the run's history says so.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use cm_assignment::{AssignmentReader, Command, TreeKind};
use cm_tree::space::FsSpace;

use crate::model::{Job, JobState, Run, RunPhase, ServerOutcome, SpacePolicy, SpaceWait};
use crate::server::{Inner, ManagerError};

/// The block a file's or directory's bytes are counted in (the common page and block size).
const BLOCK: u64 = 4096;

/// What one server writes to build a release, before the reserve and a GL's copy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteNeed {
    pub bytes: u64,
    pub inodes: u64,
}

impl WriteNeed {
    /// Nothing to write: a header-only assignment, never checked.
    pub fn is_nothing(&self) -> bool {
        self.bytes == 0 && self.inodes == 0
    }
}

fn blocks(len: u64) -> u64 {
    len.div_ceil(BLOCK).saturating_mul(BLOCK)
}

/// The need of the assignment at `path`, read from its commands and its tree manifest (the
/// body is never encrypted, so no key is needed).
pub fn need_of(path: &Path) -> Result<WriteNeed, cm_assignment::ReadError> {
    let reader = AssignmentReader::open(path)?;
    let mut need = WriteNeed::default();
    let mut made = WriteNeed::default();
    for c in reader.commands() {
        let (_, c) = c?;
        match c {
            Command::WriteFile { payload, .. } => {
                need.bytes = need.bytes.saturating_add(blocks(payload.len));
                need.inodes += 1;
            }
            Command::ApplyDelta { len, .. } => {
                need.bytes = need.bytes.saturating_add(blocks(len));
                need.inodes += 1;
            }
            Command::MakeDir { .. } => {
                made.bytes += BLOCK;
                made.inodes += 1;
            }
            Command::Symlink { .. } => made.inodes += 1,
            Command::Remove { .. } | Command::Rename { .. } | Command::SetMode { .. } => {}
        }
    }
    if reader.header().command_count == 0 && !reader.has_tree() {
        return Ok(WriteNeed::default());
    }
    if reader.has_tree() {
        // The release is a fresh tree: every directory and symlink of it is new (files not
        // written are hard links). Without a manifest, the commands' own are all we know.
        made = WriteNeed::default();
        for e in reader.tree() {
            match e?.kind {
                TreeKind::Dir { .. } => {
                    made.bytes += BLOCK;
                    made.inodes += 1;
                }
                TreeKind::Symlink { .. } => made.inodes += 1,
                TreeKind::File { .. } => {}
            }
        }
    }
    // The release's own directory.
    Ok(WriteNeed {
        bytes: need.bytes.saturating_add(made.bytes).saturating_add(BLOCK),
        inodes: need.inodes + made.inodes + 1,
    })
}

/// A server of the run as the space check sees it.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub server: String,
    /// It is its segment's GL: it also stores the assignment.
    pub leader: bool,
    pub space: Option<FsSpace>,
}

/// A server short of what the run needs there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortfall {
    pub server: String,
    pub need_bytes: u64,
    pub need_inodes: u64,
    pub free: FsSpace,
}

impl Shortfall {
    fn inodes_short(&self) -> bool {
        self.free.total_inodes != 0 && self.free.free_inodes < self.need_inodes
    }
}

impl fmt::Display for Shortfall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} needs {} and {} inodes, has {} free",
            self.server,
            human(self.need_bytes),
            self.need_inodes,
            human(self.free.free_bytes)
        )?;
        match self.free.total_inodes {
            0 => write!(f, " (no inode limit)"),
            _ => write!(f, " and {} inodes", self.free.free_inodes),
        }?;
        if self.inodes_short() && self.free.free_bytes >= self.need_bytes {
            write!(f, " (short of inodes)")?;
        }
        Ok(())
    }
}

/// Bytes in words, exact: `12.3 MiB (12902400 bytes)`.
pub fn human(n: u64) -> String {
    match n >= 1 << 10 {
        true => format!("{} ({n} bytes)", short_bytes(n)),
        false => format!("{n} bytes"),
    }
}

/// Bytes in words, short: `12.3 MiB`.
pub fn short_bytes(n: u64) -> String {
    let units = [("TiB", 1u64 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    match units.iter().find(|(_, u)| n >= *u) {
        Some((name, u)) => format!("{:.1} {name}", n as f64 / *u as f64),
        None => format!("{n} B"),
    }
}

/// A server's reported space in one cell: `3.9 MiB of 4.0 MiB free, 1020 of 1024 inodes`.
pub fn describe_space(s: &FsSpace) -> String {
    let bytes = format!("{} of {} free", short_bytes(s.free_bytes), short_bytes(s.total_bytes));
    match s.total_inodes {
        0 => bytes,
        t => format!("{bytes}, {} of {t} inodes", s.free_inodes),
    }
}

/// The servers short of `need` (plus the reserve, plus `copy_bytes` on a GL), and those that
/// never reported their space (not checked).
pub fn shortfalls(
    need: WriteNeed,
    copy_bytes: u64,
    policy: &SpacePolicy,
    servers: &[Candidate],
) -> (Vec<Shortfall>, Vec<String>) {
    let mut short = Vec::new();
    let mut unknown = Vec::new();
    for c in servers {
        let Some(free) = c.space else {
            unknown.push(c.server.clone());
            continue;
        };
        let copy = if c.leader { blocks(copy_bytes) } else { 0 };
        let s = Shortfall {
            server: c.server.clone(),
            need_bytes: need.bytes.saturating_add(copy).saturating_add(policy.reserve_bytes),
            need_inodes: need.inodes + u64::from(c.leader) + policy.reserve_inodes,
            free,
        };
        if free.free_bytes < s.need_bytes || s.inodes_short() {
            short.push(s);
        }
    }
    (short, unknown)
}

/// The shortfalls in one line (the first 8 named, then how many more).
pub fn describe(short: &[Shortfall]) -> String {
    let mut line: Vec<String> = short.iter().take(8).map(Shortfall::to_string).collect();
    if short.len() > 8 {
        line.push(format!("and {} more", short.len() - 8));
    }
    line.join("; ")
}

/// What the policy makes of servers short of space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Nobody is short: go on.
    Go,
    /// Leave these out (recorded as failed) and go on.
    Skip(Vec<Shortfall>),
    /// Wait: the job is due again at `recheck_ms` with this wait recorded.
    Wait { wait: SpaceWait, until_ms: u64 },
    /// Fail the run before it distributes, with this reason.
    Fail { reason: String, short: Vec<Shortfall> },
}

/// How often a waiting job looks again when no space report has woken it.
pub const RECHECK_MS: u64 = 5_000;

/// Applies the policy to the shortfalls found at `now` (`waiting`: the job's wait so far).
pub fn decide(
    policy: &SpacePolicy,
    short: Vec<Shortfall>,
    waiting: Option<&SpaceWait>,
    now: u64,
) -> Verdict {
    if short.is_empty() {
        return Verdict::Go;
    }
    let what = describe(&short);
    match policy.on_short {
        crate::model::OnSpaceShort::Skip => Verdict::Skip(short),
        crate::model::OnSpaceShort::Fail => Verdict::Fail {
            reason: format!("not enough space before distribution (policy fail): {what}"),
            short,
        },
        crate::model::OnSpaceShort::Wait => {
            let since_ms = waiting.map_or(now, |w| w.since_ms);
            let until_ms = since_ms.saturating_add(policy.wait_ms);
            if now >= until_ms {
                let reason = format!(
                    "not enough space before distribution after waiting {} s (policy wait): {what}",
                    policy.wait_ms / 1000
                );
                return Verdict::Fail { reason, short };
            }
            let needs =
                short.iter().map(|s| (s.server.clone(), (s.need_bytes, s.need_inodes))).collect();
            Verdict::Wait { wait: SpaceWait { since_ms, needs }, until_ms }
        }
    }
}

/// For a job already waiting: whether a server it waits for is still short by the last need
/// known (then the job need not prepare its assignment again to find out).
pub fn still_short(wait: &SpaceWait, spaces: &BTreeMap<String, Option<FsSpace>>) -> bool {
    wait.needs.iter().any(|(server, (bytes, inodes))| match spaces.get(server) {
        Some(Some(free)) => {
            free.free_bytes < *bytes || (free.total_inodes != 0 && free.free_inodes < *inodes)
        }
        // Gone or no longer reporting: preparing again decides.
        _ => false,
    })
}

/// What [`Inner::check_space`] leaves the launch to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SpaceGate {
    /// Distribute (to the servers left).
    Go,
    /// The job waits or the run failed before distribution: nothing more to do now.
    Stop,
}

impl Inner {
    /// A job waiting for space whose short servers are, by their latest reports, still short
    /// of the need found last time, and whose wait has not run out: due again later, without
    /// preparing its assignment again. Returns true then.
    pub(crate) fn still_waiting_for_space(
        &self,
        job: &Job,
        now: u64,
    ) -> Result<bool, ManagerError> {
        let Some(wait) = &job.space_wait else { return Ok(false) };
        let until = wait.since_ms.saturating_add(job.spec.policy.space.wait_ms);
        if now >= until {
            return Ok(false);
        }
        let mut spaces = BTreeMap::new();
        for server in wait.needs.keys() {
            spaces.insert(server.clone(), self.db.server(server)?.and_then(|r| r.space));
        }
        if !still_short(wait, &spaces) {
            return Ok(false);
        }
        self.db.write(|t| {
            let mut j = job.clone();
            j.next_run_ms = now.saturating_add(RECHECK_MS).min(until);
            t.put_job(&j)
        })?;
        Ok(true)
    }

    /// The space check of `run` before it distributes (module doc): leaves short servers out
    /// of its segments (`skip`, recorded in `outcomes`), or makes the job wait, or fails it.
    pub(crate) fn check_space(
        &self,
        job: &Job,
        run: &mut Run,
        outcomes: &mut Vec<(String, ServerOutcome)>,
        need: WriteNeed,
        now: u64,
    ) -> Result<SpaceGate, ManagerError> {
        if need.is_nothing() {
            return Ok(SpaceGate::Go);
        }
        let policy = &job.spec.policy.space;
        let mut candidates = Vec::new();
        for seg in run.segments.values() {
            for server in &seg.servers {
                let space = self.db.server(server)?.and_then(|r| r.space);
                candidates.push(Candidate {
                    server: server.clone(),
                    leader: seg.leader == *server,
                    space,
                });
            }
        }
        let (short, unknown) = shortfalls(need, run.manifest.size, policy, &candidates);
        if !unknown.is_empty() {
            let line = format!(
                "space not checked on {}: they have not reported it",
                unknown.iter().take(8).cloned().collect::<Vec<_>>().join(", ")
            );
            self.db.write(|t| t.log(now, Some(job.id), Some(run.id), line.clone()))?;
        }
        match decide(policy, short, job.space_wait.as_ref(), now) {
            Verdict::Go => Ok(SpaceGate::Go),
            Verdict::Skip(short) => {
                for s in &short {
                    for seg in run.segments.values_mut() {
                        seg.servers.retain(|x| *x != s.server);
                    }
                    let reason = format!("not enough space (policy skip): {s}");
                    outcomes.push((s.server.clone(), ServerOutcome::Failed { reason }));
                }
                run.segments.retain(|_, seg| !seg.servers.is_empty());
                let line = format!(
                    "before distribution: {} servers short of space, left out (policy skip): {}",
                    short.len(),
                    describe(&short)
                );
                self.db.write(|t| t.log(now, Some(job.id), Some(run.id), line.clone()))?;
                Ok(SpaceGate::Go)
            }
            Verdict::Wait { wait, until_ms } => {
                let reason = format!(
                    "waiting for space until {} UTC (policy wait): {}",
                    crate::utc_time(until_ms),
                    describe_needs(&wait)
                );
                // One history line per change of who is short, not one per look.
                let news =
                    job.space_wait.as_ref().is_none_or(|w| w.needs.keys().ne(wait.needs.keys()));
                self.db.write(|t| {
                    let mut j = job.clone();
                    j.next_run_ms = now.saturating_add(RECHECK_MS).min(until_ms);
                    j.space_wait = Some(wait.clone());
                    j.last_reason = Some(reason.clone());
                    t.put_job(&j)?;
                    if news {
                        t.log(now, Some(j.id), None, format!("before distribution: {reason}"))?;
                    }
                    Ok::<_, ManagerError>(())
                })?;
                Ok(SpaceGate::Stop)
            }
            Verdict::Fail { reason, short } => {
                self.fail_before_distribution(job, run, &reason, &short, now)?;
                Ok(SpaceGate::Stop)
            }
        }
    }

    /// Records run `run` as failed before it distributed (each short server failed with its
    /// need against its free space) and moves the job on per `on_failure`.
    fn fail_before_distribution(
        &self,
        job: &Job,
        run: &Run,
        reason: &str,
        short: &[Shortfall],
        now: u64,
    ) -> Result<(), ManagerError> {
        let next = crate::policy::after_failure(&job.spec.policy, job.attempts + 1, now, reason);
        self.db.write(|t| {
            let mut r = run.clone();
            r.phase = RunPhase::Failed { reason: reason.to_string() };
            t.put_run(&r)?;
            for s in short {
                let why = format!("not enough space: {s}");
                t.put_report(run.id, &s.server, &ServerOutcome::Failed { reason: why })?;
            }
            let mut j = job.clone();
            (j.state, j.next_run_ms, j.attempts) =
                (next.state.clone(), next.next_run_ms, next.attempts);
            j.space_wait = None;
            j.last_reason = Some(reason.to_string());
            t.put_job(&j)?;
            t.log(
                now,
                Some(job.id),
                Some(run.id),
                format!(
                    "run failed before distribution, no byte sent: {reason}; job now {:?}",
                    next.state
                ),
            )?;
            Ok::<_, ManagerError>(())
        })?;
        Ok(())
    }

    /// A server reported a new space: every job waiting for space looks again at once.
    pub(crate) fn space_reported(&self, now: u64) -> Result<(), ManagerError> {
        let waiting: Vec<Job> = self
            .db
            .jobs()?
            .into_iter()
            .filter(|j| j.space_wait.is_some() && j.state == JobState::Idle && j.next_run_ms > now)
            .collect();
        if waiting.is_empty() {
            return Ok(());
        }
        self.db.write(|t| {
            for j in &waiting {
                let mut j = j.clone();
                j.next_run_ms = now;
                t.put_job(&j)?;
            }
            Ok::<_, ManagerError>(())
        })?;
        self.wake.notify_one();
        Ok(())
    }
}

/// The needs a job waits for, in one line.
fn describe_needs(wait: &SpaceWait) -> String {
    let mut line: Vec<String> = wait
        .needs
        .iter()
        .take(8)
        .map(|(s, (b, i))| format!("{s} needs {} and {i} inodes", human(*b)))
        .collect();
    if wait.needs.len() > 8 {
        line.push(format!("and {} more", wait.needs.len() - 8));
    }
    line.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::OnSpaceShort;

    fn space(free_bytes: u64, free_inodes: u64) -> Option<FsSpace> {
        Some(FsSpace { free_bytes, total_bytes: 1 << 30, free_inodes, total_inodes: 1 << 20 })
    }

    fn policy(on_short: OnSpaceShort) -> SpacePolicy {
        SpacePolicy { on_short, wait_ms: 1_000, reserve_bytes: 100, reserve_inodes: 2 }
    }

    #[test]
    fn the_need_counts_written_files_directories_and_a_gls_copy() {
        let d = tempfile::tempdir().unwrap();
        let (live, next) = (d.path().join("live"), d.path().join("next"));
        std::fs::create_dir_all(live.join("a")).unwrap();
        std::fs::write(live.join("a/same.txt"), "same".repeat(5000)).unwrap();
        std::fs::write(live.join("changed.txt"), "x".repeat(10)).unwrap();
        crate::prepare::copy_tree(&live, &next).unwrap();
        std::fs::write(next.join("changed.txt"), "y".repeat(5000)).unwrap();
        std::fs::write(next.join("new.bin"), vec![7u8; 9000]).unwrap();
        std::os::unix::fs::symlink("new.bin", next.join("link")).unwrap();
        let out = d.path().join("a.cma");
        let opts = cm_assignment::BuildOptions::new(cm_assignment::AssignmentType::Publish, 2);
        cm_assignment::build(&next, Some(&live), &out, &opts).unwrap();
        let need = need_of(&out).unwrap();
        // changed.txt: 2 blocks, new.bin: 3 blocks; directories `a` and the release: 2 blocks.
        assert_eq!(need.bytes, 4096 * 7, "{need:?}");
        // 2 files written, directory `a`, the symlink, the release directory.
        assert_eq!(need.inodes, 5, "{need:?}");
        let servers = [
            Candidate { server: "gl".into(), leader: true, space: space(4096 * 7 + 100, 100) },
            Candidate { server: "m".into(), leader: false, space: space(4096 * 7 + 100, 100) },
            Candidate { server: "old".into(), leader: false, space: None },
        ];
        let (short, unknown) = shortfalls(need, 1, &policy(OnSpaceShort::Fail), &servers);
        assert_eq!(short.len(), 1, "only the GL stores the assignment too");
        assert_eq!((short[0].server.as_str(), short[0].need_bytes), ("gl", 4096 * 8 + 100));
        assert_eq!(unknown, ["old"]);
        assert!(short[0].to_string().starts_with("gl needs 32.1 KiB (32868 bytes) and 8 inodes"));
    }

    #[test]
    fn a_header_only_assignment_needs_nothing() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("c.cma");
        let site: crate::model::HostedSite = serde_json::from_value(
            serde_json::json!({ "name": "www", "content_group": "g", "staging": "/nowhere" }),
        )
        .unwrap();
        let ctx = crate::prepare::Context { data_dir: d.path(), seal: None, signer: None };
        let kind = cm_assignment::AssignmentType::Commit;
        crate::prepare::switching(kind, 1, 2, 0, &site, ctx, &out, String::new()).unwrap();
        assert!(need_of(&out).unwrap().is_nothing());
    }

    #[test]
    fn inodes_alone_can_be_short() {
        let need = WriteNeed { bytes: 10, inodes: 50 };
        let c = [Candidate { server: "s".into(), leader: false, space: space(1 << 20, 40) }];
        let (short, _) = shortfalls(need, 0, &policy(OnSpaceShort::Fail), &c);
        assert!(short[0].to_string().ends_with("(short of inodes)"), "{}", short[0]);
        let no_limit = [Candidate {
            space: Some(FsSpace { total_inodes: 0, free_inodes: 0, ..space(1 << 20, 0).unwrap() }),
            ..c[0].clone()
        }];
        assert!(shortfalls(need, 0, &policy(OnSpaceShort::Fail), &no_limit).0.is_empty());
    }

    #[test]
    fn each_policy_decides() {
        let s = Shortfall {
            server: "s".into(),
            need_bytes: 9,
            need_inodes: 1,
            free: space(1, 9).unwrap(),
        };
        assert_eq!(decide(&policy(OnSpaceShort::Fail), vec![], None, 0), Verdict::Go);
        assert!(
            matches!(decide(&policy(OnSpaceShort::Skip), vec![s.clone()], None, 0), Verdict::Skip(v) if v.len() == 1)
        );
        let Verdict::Fail { reason: why, .. } =
            decide(&policy(OnSpaceShort::Fail), vec![s.clone()], None, 0)
        else {
            panic!()
        };
        assert!(
            why.contains("policy fail): s needs 9 bytes and 1 inodes, has 1 bytes free"),
            "{why}"
        );
        let Verdict::Wait { wait, until_ms } =
            decide(&policy(OnSpaceShort::Wait), vec![s.clone()], None, 500)
        else {
            panic!()
        };
        assert_eq!((wait.since_ms, until_ms), (500, 1_500));
        let spaces: BTreeMap<String, Option<FsSpace>> = [("s".to_string(), space(1, 9))].into();
        assert!(still_short(&wait, &spaces));
        let spaces: BTreeMap<String, Option<FsSpace>> = [("s".to_string(), space(9, 9))].into();
        assert!(!still_short(&wait, &spaces));
        assert!(matches!(
            decide(&policy(OnSpaceShort::Wait), vec![s], Some(&wait), 1_500),
            Verdict::Fail { reason, .. } if reason.contains("after waiting 1 s")
        ));
    }
}

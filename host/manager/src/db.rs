//! The manager's database (redb). Records are JSON values (serde) in one table per kind; keys are
//! names (servers, segments, groups, sites) or ids (jobs, runs, history). Every state change of a
//! job or run is one write transaction, so a manager killed at any point restarts from a
//! consistent state. Schema: `docs/manager.md`.

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Serialize, de::DeserializeOwned};
use std::path::Path;
use thiserror::Error;

use crate::events::{Bus, Change, Event};
use crate::model::{
    Checkpoint, ContentGroup, HistoryEntry, HostedSite, Job, JobSpec, JobState, Run, SegmentRecord,
    ServerOutcome, ServerRecord,
};

type StrTable = TableDefinition<'static, &'static str, &'static [u8]>;
type IdTable = TableDefinition<'static, u64, &'static [u8]>;

const SERVERS: StrTable = TableDefinition::new("servers");
const SEGMENTS: StrTable = TableDefinition::new("segments");
const GROUPS: StrTable = TableDefinition::new("content_groups");
const SITES: StrTable = TableDefinition::new("hosted_sites");
/// Key: `{run:020}/{server}`, so one run's reports are one key range.
const REPORTS: StrTable = TableDefinition::new("server_reports");
const JOBS: IdTable = TableDefinition::new("jobs");
const RUNS: IdTable = TableDefinition::new("runs");
const HISTORY: IdTable = TableDefinition::new("history");
/// Key: `{site}/{id:020}`, so one site's checkpoints are one key range, oldest first.
const CHECKPOINTS: StrTable = TableDefinition::new("checkpoints");
const COUNTERS: TableDefinition<'static, &'static str, u64> = TableDefinition::new("counters");

#[derive(Debug, Error)]
pub enum DbError {
    #[error("database: {0}")]
    Redb(#[from] redb::Error),
    #[error("database record {table}/{key} does not decode: {source}")]
    Decode { table: &'static str, key: String, source: serde_json::Error },
    #[error("encoding a record: {0}")]
    Encode(#[from] serde_json::Error),
    /// redb's lock on the file is held: by another manager process, or this one.
    #[error(
        "another manager holds the data directory {dir} (its database {file} is open and locked); \
         stop that manager or give this one another --data-dir"
    )]
    HeldByAnother { dir: String, file: String },
}

fn redb_err(e: impl Into<redb::Error>) -> DbError {
    DbError::Redb(e.into())
}

fn decode<T: DeserializeOwned>(
    table: &'static str,
    key: impl ToString,
    bytes: &[u8],
) -> Result<T, DbError> {
    serde_json::from_slice(bytes).map_err(|source| DbError::Decode {
        table,
        key: key.to_string(),
        source,
    })
}

fn report_key(run: u64, server: &str) -> String {
    format!("{run:020}/{server}")
}

fn checkpoint_key(site: &str, id: u64) -> String {
    format!("{site}/{id:020}")
}

/// One write transaction; dropped without [`Db::write`] returning Ok, nothing of it is kept.
pub struct Txn<'a> {
    tx: &'a WriteTransaction,
    /// What the transaction changed, published once it commits (only while somebody listens).
    bus: &'a Bus,
    changes: std::cell::RefCell<Vec<Event>>,
}

impl Txn<'_> {
    fn note(&self, c: Change<'_>) {
        if self.bus.listened() {
            self.changes.borrow_mut().push(c.event());
        }
    }
    fn put_str<T: Serialize>(&self, t: StrTable, key: &str, v: &T) -> Result<(), DbError> {
        let bytes = serde_json::to_vec(v)?;
        self.tx.open_table(t).map_err(redb_err)?.insert(key, bytes.as_slice()).map_err(redb_err)?;
        Ok(())
    }
    fn put_id<T: Serialize>(&self, t: IdTable, key: u64, v: &T) -> Result<(), DbError> {
        let bytes = serde_json::to_vec(v)?;
        self.tx.open_table(t).map_err(redb_err)?.insert(key, bytes.as_slice()).map_err(redb_err)?;
        Ok(())
    }
    fn next_id(&self, counter: &str) -> Result<u64, DbError> {
        let mut t = self.tx.open_table(COUNTERS).map_err(redb_err)?;
        let id = t.get(counter).map_err(redb_err)?.map(|g| g.value()).unwrap_or(0) + 1;
        t.insert(counter, id).map_err(redb_err)?;
        Ok(id)
    }

    pub fn put_server(&self, s: &ServerRecord) -> Result<(), DbError> {
        self.note(Change::Server(s));
        self.put_str(SERVERS, &s.name, s)
    }
    pub fn put_segment(&self, s: &SegmentRecord) -> Result<(), DbError> {
        self.note(Change::Segment(s));
        self.put_str(SEGMENTS, &s.name, s)
    }
    pub fn put_group(&self, g: &ContentGroup) -> Result<(), DbError> {
        self.put_str(GROUPS, &g.name, g)
    }
    pub fn put_site(&self, s: &HostedSite) -> Result<(), DbError> {
        self.note(Change::Site(s));
        self.put_str(SITES, &s.name, s)
    }
    pub fn put_job(&self, j: &Job) -> Result<(), DbError> {
        self.note(Change::Job(j));
        self.put_id(JOBS, j.id, j)
    }
    pub fn put_run(&self, r: &Run) -> Result<(), DbError> {
        self.note(Change::Run(r));
        self.put_id(RUNS, r.id, r)
    }
    pub fn put_report(&self, run: u64, server: &str, o: &ServerOutcome) -> Result<(), DbError> {
        self.note(Change::Report(run, server, o));
        self.put_str(REPORTS, &report_key(run, server), o)
    }

    pub fn put_checkpoint(&self, c: &Checkpoint) -> Result<(), DbError> {
        self.put_str(CHECKPOINTS, &checkpoint_key(&c.site, c.id), c)
    }
    pub fn remove_checkpoint(&self, site: &str, id: u64) -> Result<(), DbError> {
        let mut t = self.tx.open_table(CHECKPOINTS).map_err(redb_err)?;
        t.remove(checkpoint_key(site, id).as_str()).map_err(redb_err)?;
        Ok(())
    }
    /// The next checkpoint id of `site` (ids are per site and never reused).
    pub fn next_checkpoint_id(&self, site: &str) -> Result<u64, DbError> {
        self.next_id(&format!("checkpoint/{site}"))
    }

    /// A new job, idle, first due at its start time.
    pub fn insert_job(&self, spec: JobSpec, now_ms: u64) -> Result<Job, DbError> {
        let id = self.next_id("job")?;
        let job = Job {
            id,
            next_run_ms: if spec.start_at_ms == 0 { now_ms } else { spec.start_at_ms },
            spec,
            state: JobState::Idle,
            attempts: 0,
            last_reason: None,
            pending_commit: None,
            roll: None,
            space_wait: None,
        };
        self.put_job(&job)?;
        Ok(job)
    }

    pub fn next_run_id(&self) -> Result<u64, DbError> {
        self.next_id("run")
    }

    /// Appends to the history log of assignment runs.
    pub fn log(
        &self,
        at_ms: u64,
        job: Option<u64>,
        run: Option<u64>,
        event: impl Into<String>,
    ) -> Result<(), DbError> {
        let seq = self.next_id("history")?;
        let entry = HistoryEntry { seq, at_ms, job, run, event: event.into() };
        self.note(Change::History(&entry));
        self.put_id(HISTORY, seq, &entry)
    }
}

pub struct Db {
    db: Database,
    events: Bus,
}

impl Db {
    /// Opens (or creates) the database file.
    pub fn open(path: &Path) -> Result<Db, DbError> {
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => DbError::HeldByAnother {
                dir: path.parent().unwrap_or(path).display().to_string(),
                file: path.display().to_string(),
            },
            e => redb_err(e),
        })?;
        // Create every table up front so readers never meet a missing one.
        let tx = db.begin_write().map_err(redb_err)?;
        for t in [SERVERS, SEGMENTS, GROUPS, SITES, REPORTS, CHECKPOINTS] {
            tx.open_table(t).map_err(redb_err)?;
        }
        for t in [JOBS, RUNS, HISTORY] {
            tx.open_table(t).map_err(redb_err)?;
        }
        tx.open_table(COUNTERS).map_err(redb_err)?;
        tx.commit().map_err(redb_err)?;
        Ok(Db { db, events: Bus::default() })
    }

    /// Runs `f` in one write transaction and commits it if `f` succeeds.
    pub fn write<R, E: From<DbError>>(
        &self,
        f: impl FnOnce(&Txn<'_>) -> Result<R, E>,
    ) -> Result<R, E> {
        let tx = self.db.begin_write().map_err(redb_err)?;
        let txn = Txn { tx: &tx, bus: &self.events, changes: Default::default() };
        let r = f(&txn)?;
        let changes = txn.changes.take();
        tx.commit().map_err(redb_err)?;
        for e in changes {
            self.events.publish(e);
        }
        Ok(r)
    }

    /// The event bus every committed write publishes to ([`crate::events`]).
    pub fn events(&self) -> &Bus {
        &self.events
    }

    fn get_str<T: DeserializeOwned>(
        &self,
        t: StrTable,
        name: &'static str,
        key: &str,
    ) -> Result<Option<T>, DbError> {
        let tx = self.db.begin_read().map_err(redb_err)?;
        let table = tx.open_table(t).map_err(redb_err)?;
        let v = table.get(key).map_err(redb_err)?;
        v.map(|g| decode(name, key, g.value())).transpose()
    }
    fn get_id<T: DeserializeOwned>(
        &self,
        t: IdTable,
        name: &'static str,
        key: u64,
    ) -> Result<Option<T>, DbError> {
        let tx = self.db.begin_read().map_err(redb_err)?;
        let table = tx.open_table(t).map_err(redb_err)?;
        let v = table.get(key).map_err(redb_err)?;
        v.map(|g| decode(name, key, g.value())).transpose()
    }
    fn list_str<T: DeserializeOwned>(
        &self,
        t: StrTable,
        name: &'static str,
    ) -> Result<Vec<T>, DbError> {
        let tx = self.db.begin_read().map_err(redb_err)?;
        let table = tx.open_table(t).map_err(redb_err)?;
        let mut out = Vec::new();
        for e in table.iter().map_err(redb_err)? {
            let (k, v) = e.map_err(redb_err)?;
            out.push(decode(name, k.value(), v.value())?);
        }
        Ok(out)
    }
    fn list_id<T: DeserializeOwned>(
        &self,
        t: IdTable,
        name: &'static str,
    ) -> Result<Vec<T>, DbError> {
        let tx = self.db.begin_read().map_err(redb_err)?;
        let table = tx.open_table(t).map_err(redb_err)?;
        let mut out = Vec::new();
        for e in table.iter().map_err(redb_err)? {
            let (k, v) = e.map_err(redb_err)?;
            out.push(decode(name, k.value(), v.value())?);
        }
        Ok(out)
    }

    pub fn server(&self, name: &str) -> Result<Option<ServerRecord>, DbError> {
        self.get_str(SERVERS, "servers", name)
    }
    pub fn servers(&self) -> Result<Vec<ServerRecord>, DbError> {
        self.list_str(SERVERS, "servers")
    }
    pub fn segment(&self, name: &str) -> Result<Option<SegmentRecord>, DbError> {
        self.get_str(SEGMENTS, "segments", name)
    }
    pub fn segments(&self) -> Result<Vec<SegmentRecord>, DbError> {
        self.list_str(SEGMENTS, "segments")
    }
    pub fn group(&self, name: &str) -> Result<Option<ContentGroup>, DbError> {
        self.get_str(GROUPS, "content_groups", name)
    }
    pub fn groups(&self) -> Result<Vec<ContentGroup>, DbError> {
        self.list_str(GROUPS, "content_groups")
    }
    pub fn site(&self, name: &str) -> Result<Option<HostedSite>, DbError> {
        self.get_str(SITES, "hosted_sites", name)
    }
    pub fn sites(&self) -> Result<Vec<HostedSite>, DbError> {
        self.list_str(SITES, "hosted_sites")
    }
    pub fn job(&self, id: u64) -> Result<Option<Job>, DbError> {
        self.get_id(JOBS, "jobs", id)
    }
    pub fn jobs(&self) -> Result<Vec<Job>, DbError> {
        self.list_id(JOBS, "jobs")
    }
    pub fn run(&self, id: u64) -> Result<Option<Run>, DbError> {
        self.get_id(RUNS, "runs", id)
    }
    pub fn runs(&self) -> Result<Vec<Run>, DbError> {
        self.list_id(RUNS, "runs")
    }
    pub fn history(&self) -> Result<Vec<HistoryEntry>, DbError> {
        self.list_id(HISTORY, "history")
    }

    /// One page of the history, newest first: at most `limit` entries older than `before` (a
    /// sequence number; `None`: from the newest) that `keep` accepts, and whether older ones
    /// that `keep` accepts remain.
    pub fn history_page(
        &self,
        before: Option<u64>,
        limit: usize,
        keep: impl Fn(&HistoryEntry) -> bool,
    ) -> Result<(Vec<HistoryEntry>, bool), DbError> {
        let tx = self.db.begin_read().map_err(redb_err)?;
        let table = tx.open_table(HISTORY).map_err(redb_err)?;
        let mut out = Vec::new();
        for e in table.range(..before.unwrap_or(u64::MAX)).map_err(redb_err)?.rev() {
            let (k, v) = e.map_err(redb_err)?;
            let entry: HistoryEntry = decode("history", k.value(), v.value())?;
            if keep(&entry) {
                if out.len() == limit {
                    return Ok((out, true));
                }
                out.push(entry);
            }
        }
        Ok((out, false))
    }

    pub fn checkpoint(&self, site: &str, id: u64) -> Result<Option<Checkpoint>, DbError> {
        self.get_str(CHECKPOINTS, "checkpoints", &checkpoint_key(site, id))
    }

    /// A site's checkpoints, oldest first.
    pub fn checkpoints(&self, site: &str) -> Result<Vec<Checkpoint>, DbError> {
        Ok(self.prefixed(CHECKPOINTS, "checkpoints", site)?.into_iter().map(|(_, c)| c).collect())
    }

    /// Every server's outcome in `run`, by server name.
    pub fn reports(&self, run: u64) -> Result<Vec<(String, ServerOutcome)>, DbError> {
        self.prefixed(REPORTS, "server_reports", &format!("{run:020}"))
    }

    /// The records whose key is `{prefix}/…`, in key order, with the rest of their key.
    fn prefixed<T: DeserializeOwned>(
        &self,
        t: StrTable,
        name: &'static str,
        prefix: &str,
    ) -> Result<Vec<(String, T)>, DbError> {
        let tx = self.db.begin_read().map_err(redb_err)?;
        let table = tx.open_table(t).map_err(redb_err)?;
        let lo = format!("{prefix}/");
        let hi = format!("{prefix}0"); // '0' sorts right after '/'
        let mut out = Vec::new();
        for e in table.range(lo.as_str()..hi.as_str()).map_err(redb_err)? {
            let (k, v) = e.map_err(redb_err)?;
            let rest = k.value()[lo.len()..].to_string();
            out.push((rest, decode(name, k.value(), v.value())?));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{JobKind, Payload};

    #[test]
    fn records_survive_reopen_and_reports_stay_per_run() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.redb");
        let spec = JobSpec {
            name: "pub".into(),
            kind: JobKind::Publish,
            site: "s".into(),
            payload: Payload::File { path: "x".into() },
            start_at_ms: 0,
            every_ms: None,
            policy: Default::default(),
        };
        {
            let db = Db::open(&path).unwrap();
            let job = db
                .write(|t| {
                    let j = t.insert_job(spec.clone(), 77)?;
                    t.put_report(1, "a", &ServerOutcome::Succeeded)?;
                    t.put_report(1, "b", &ServerOutcome::Missing)?;
                    t.put_report(12, "a", &ServerOutcome::Failed { reason: "disk".into() })?;
                    t.log(77, Some(j.id), None, "created")?;
                    Ok::<_, DbError>(j)
                })
                .unwrap();
            assert_eq!((job.id, job.next_run_ms), (1, 77));
            // A failed transaction leaves nothing behind.
            let r: Result<(), DbError> = db.write(|t| {
                t.insert_job(spec.clone(), 1)?;
                Err(DbError::Encode(serde_json::from_str::<u8>("x").unwrap_err()))
            });
            assert!(r.is_err());
        }
        let db = Db::open(&path).unwrap();
        assert_eq!(db.jobs().unwrap().len(), 1);
        assert_eq!(db.job(1).unwrap().unwrap().spec, spec);
        assert_eq!(
            db.reports(1).unwrap(),
            vec![("a".into(), ServerOutcome::Succeeded), ("b".into(), ServerOutcome::Missing)]
        );
        assert_eq!(db.reports(12).unwrap().len(), 1);
        assert_eq!(db.history().unwrap()[0].event, "created");
        let (page, more) = db.history_page(None, 10, |_| true).unwrap();
        assert_eq!((page.len(), more), (1, false));
        let j2 = db.write(|t| t.insert_job(spec.clone(), 5)).unwrap();
        assert_eq!(j2.id, 2, "ids keep counting after a failed transaction and a reopen");
    }

    #[test]
    fn history_pages_newest_first_with_a_filter() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("m.redb")).unwrap();
        db.write(|t| {
            for i in 0..25u64 {
                t.log(i, Some(i % 2), None, format!("line {i}"))?;
            }
            Ok::<_, DbError>(())
        })
        .unwrap();
        let (first, more) = db.history_page(None, 10, |e| e.job == Some(1)).unwrap();
        let seqs: Vec<u64> = first.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [24, 22, 20, 18, 16, 14, 12, 10, 8, 6]);
        assert!(more);
        let (rest, more) = db.history_page(Some(6), 10, |e| e.job == Some(1)).unwrap();
        assert_eq!(rest.iter().map(|e| e.seq).collect::<Vec<_>>(), [4, 2]);
        assert!(!more);
    }
}

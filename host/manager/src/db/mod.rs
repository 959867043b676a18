//! The manager's database. Records are JSON values (serde) in one table per kind; keys are
//! names (servers, segments, groups, sites) or ids (jobs, runs, history). Every state change of a
//! job or run is one write transaction, so a manager killed at any point restarts from a
//! consistent state. Two engines under one typed API ([`engine`]): embedded redb (the default,
//! one file in the data directory) and PostgreSQL (several replicas, one active:
//! [`postgres`]). Schema: `docs/manager.md`.

pub mod engine;
pub mod postgres;
mod redb_engine;

use serde::{Serialize, de::DeserializeOwned};
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thiserror::Error;

use crate::events::{Bus, Change, Event};
use crate::model::{
    Checkpoint, ContentGroup, HistoryEntry, HostedSite, Job, JobSpec, JobState, Run, SegmentRecord,
    ServerOutcome, ServerRecord,
};
use engine::{Engine, EngineTxn, Key, Span, Table};
use postgres::PgEngine;

#[derive(Debug, Error)]
pub enum DbError {
    #[error("database: {0}")]
    Redb(#[from] redb::Error),
    #[error("database (PostgreSQL): {0}")]
    Postgres(::postgres::Error),
    /// The write carried a fencing token the lease no longer has: another replica took over.
    #[error("this manager is not the active replica any more; the database refused its write: {0}")]
    Fenced(String),
    #[error(
        "database schema version {found} is newer than this manager knows ({known}); upgrade the manager"
    )]
    SchemaTooNew { found: usize, known: usize },
    #[error("database schema migration {version} failed: {source}")]
    Migration { version: usize, source: ::postgres::Error },
    #[error("database: {0}")]
    Thread(String),
    #[error("database table {table} has no key {key:?} of that kind")]
    KeyKind { table: &'static str, key: String },
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

impl From<::postgres::Error> for DbError {
    fn from(e: ::postgres::Error) -> DbError {
        match e.as_db_error() {
            Some(d) if d.code().code() == postgres::schema::FENCED => {
                DbError::Fenced(d.message().to_string())
            }
            _ => DbError::Postgres(e),
        }
    }
}

fn decode<T: DeserializeOwned>(
    table: Table,
    key: impl ToString,
    bytes: &[u8],
) -> Result<T, DbError> {
    serde_json::from_slice(bytes).map_err(|source| DbError::Decode {
        table: table.name(),
        key: key.to_string(),
        source,
    })
}

fn report_key(run: u64, server: &str) -> Key {
    Key::Str(format!("{run:020}/{server}"))
}

fn checkpoint_key(site: &str, id: u64) -> Key {
    Key::Str(format!("{site}/{id:020}"))
}

/// Where the manager keeps its records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreSpec {
    /// A redb file (`redb:PATH`).
    Redb(PathBuf),
    /// A PostgreSQL database, by connection URL (`postgres://…` or `postgresql://…`).
    Postgres(String),
}

#[derive(Debug, Error)]
#[error("store {given:?}: expected redb:PATH, postgres://… or postgresql://…")]
pub struct BadStoreSpec {
    pub given: String,
}

impl std::str::FromStr for StoreSpec {
    type Err = BadStoreSpec;
    fn from_str(s: &str) -> Result<StoreSpec, BadStoreSpec> {
        if let Some(path) = s.strip_prefix("redb:").filter(|p| !p.is_empty()) {
            Ok(StoreSpec::Redb(path.into()))
        } else if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Ok(StoreSpec::Postgres(s.to_string()))
        } else {
            Err(BadStoreSpec { given: s.to_string() })
        }
    }
}

impl std::fmt::Display for StoreSpec {
    /// The spec with no password in it (for logs and the console).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreSpec::Redb(p) => write!(f, "redb:{}", p.display()),
            StoreSpec::Postgres(url) => match url.split_once('@') {
                Some((_, host)) => write!(f, "postgres://…@{host}"),
                None => f.write_str(url),
            },
        }
    }
}

/// One write transaction; dropped without [`Db::write`] returning Ok, nothing of it is kept.
pub struct Txn<'a> {
    tx: RefCell<Box<dyn EngineTxn + 'a>>,
    /// What the transaction changed, published once it commits (only while somebody listens).
    bus: &'a Bus,
    changes: RefCell<Vec<Event>>,
}

impl Txn<'_> {
    fn note(&self, c: Change<'_>) {
        if self.bus.listened() {
            self.changes.borrow_mut().push(c.event());
        }
    }
    fn put<T: Serialize>(&self, t: Table, key: Key, v: &T) -> Result<(), DbError> {
        let bytes = serde_json::to_vec(v)?;
        self.tx.borrow_mut().put(t, &key, &bytes)
    }
    fn next_id(&self, counter: &str) -> Result<u64, DbError> {
        self.tx.borrow_mut().next(counter)
    }

    pub fn put_server(&self, s: &ServerRecord) -> Result<(), DbError> {
        self.note(Change::Server(s));
        self.put(Table::Servers, Key::Str(s.name.clone()), s)
    }
    pub fn put_segment(&self, s: &SegmentRecord) -> Result<(), DbError> {
        self.note(Change::Segment(s));
        self.put(Table::Segments, Key::Str(s.name.clone()), s)
    }
    pub fn put_group(&self, g: &ContentGroup) -> Result<(), DbError> {
        self.put(Table::Groups, Key::Str(g.name.clone()), g)
    }
    pub fn put_site(&self, s: &HostedSite) -> Result<(), DbError> {
        self.note(Change::Site(s));
        self.put(Table::Sites, Key::Str(s.name.clone()), s)
    }
    pub fn put_job(&self, j: &Job) -> Result<(), DbError> {
        self.note(Change::Job(j));
        self.put(Table::Jobs, Key::Id(j.id), j)
    }
    pub fn put_run(&self, r: &Run) -> Result<(), DbError> {
        self.note(Change::Run(r));
        self.put(Table::Runs, Key::Id(r.id), r)
    }
    pub fn put_report(&self, run: u64, server: &str, o: &ServerOutcome) -> Result<(), DbError> {
        self.note(Change::Report(run, server, o));
        self.put(Table::Reports, report_key(run, server), o)
    }

    pub fn put_checkpoint(&self, c: &Checkpoint) -> Result<(), DbError> {
        self.put(Table::Checkpoints, checkpoint_key(&c.site, c.id), c)
    }
    pub fn remove_checkpoint(&self, site: &str, id: u64) -> Result<(), DbError> {
        self.tx.borrow_mut().delete(Table::Checkpoints, &checkpoint_key(site, id))
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
            cache_wait: None,
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
        self.put(Table::History, Key::Id(seq), &entry)
    }
}

pub struct Db {
    engine: Arc<dyn Engine>,
    /// The same engine when it is PostgreSQL: the lease of the active replica lives there.
    pg: Option<Arc<PgEngine>>,
    events: Bus,
}

impl Db {
    /// Opens (or creates) a redb database file.
    pub fn open(path: &Path) -> Result<Db, DbError> {
        let engine = redb_engine::RedbEngine::open(path)?;
        Ok(Db { engine: Arc::new(engine), pg: None, events: Bus::default() })
    }

    /// Connects to a PostgreSQL database and brings its schema up to date. Writes need the
    /// lease ([`PgEngine::hold_lease`]) first.
    pub fn open_postgres(url: &str) -> Result<Db, DbError> {
        let pg = Arc::new(PgEngine::open(url)?);
        Ok(Db { engine: pg.clone(), pg: Some(pg), events: Bus::default() })
    }

    pub fn open_store(spec: &StoreSpec) -> Result<Db, DbError> {
        match spec {
            StoreSpec::Redb(path) => Db::open(path),
            StoreSpec::Postgres(url) => Db::open_postgres(url),
        }
    }

    /// The PostgreSQL engine, when the store is one (replicas and their lease).
    pub fn postgres(&self) -> Option<&PgEngine> {
        self.pg.as_deref()
    }

    /// Runs `f` in one write transaction and commits it if `f` succeeds.
    pub fn write<R, E: From<DbError>>(
        &self,
        f: impl FnOnce(&Txn<'_>) -> Result<R, E>,
    ) -> Result<R, E> {
        let txn = Txn {
            tx: RefCell::new(self.engine.begin()?),
            bus: &self.events,
            changes: Default::default(),
        };
        let r = f(&txn)?;
        let changes = txn.changes.take();
        txn.tx.into_inner().commit()?;
        for e in changes {
            self.events.publish(e);
        }
        Ok(r)
    }

    /// The event bus every committed write publishes to ([`crate::events`]).
    pub fn events(&self) -> &Bus {
        &self.events
    }

    fn get<T: DeserializeOwned>(&self, t: Table, key: Key) -> Result<Option<T>, DbError> {
        self.engine.get(t, &key)?.map(|v| decode(t, &key, &v)).transpose()
    }
    fn list<T: DeserializeOwned>(&self, t: Table) -> Result<Vec<T>, DbError> {
        let rows = self.engine.range(t, &Span::default())?;
        rows.into_iter().map(|(k, v)| decode(t, &k, &v)).collect()
    }

    pub fn server(&self, name: &str) -> Result<Option<ServerRecord>, DbError> {
        self.get(Table::Servers, Key::Str(name.into()))
    }
    pub fn servers(&self) -> Result<Vec<ServerRecord>, DbError> {
        self.list(Table::Servers)
    }
    pub fn segment(&self, name: &str) -> Result<Option<SegmentRecord>, DbError> {
        self.get(Table::Segments, Key::Str(name.into()))
    }
    pub fn segments(&self) -> Result<Vec<SegmentRecord>, DbError> {
        self.list(Table::Segments)
    }
    pub fn group(&self, name: &str) -> Result<Option<ContentGroup>, DbError> {
        self.get(Table::Groups, Key::Str(name.into()))
    }
    pub fn groups(&self) -> Result<Vec<ContentGroup>, DbError> {
        self.list(Table::Groups)
    }
    pub fn site(&self, name: &str) -> Result<Option<HostedSite>, DbError> {
        self.get(Table::Sites, Key::Str(name.into()))
    }
    pub fn sites(&self) -> Result<Vec<HostedSite>, DbError> {
        self.list(Table::Sites)
    }
    pub fn job(&self, id: u64) -> Result<Option<Job>, DbError> {
        self.get(Table::Jobs, Key::Id(id))
    }
    pub fn jobs(&self) -> Result<Vec<Job>, DbError> {
        self.list(Table::Jobs)
    }
    pub fn run(&self, id: u64) -> Result<Option<Run>, DbError> {
        self.get(Table::Runs, Key::Id(id))
    }
    pub fn runs(&self) -> Result<Vec<Run>, DbError> {
        self.list(Table::Runs)
    }
    pub fn history(&self) -> Result<Vec<HistoryEntry>, DbError> {
        self.list(Table::History)
    }

    /// One page of the history, newest first: at most `limit` entries older than `before` (a
    /// sequence number; `None`: from the newest) that `keep` accepts, and whether older ones
    /// that `keep` accepts remain. Reads the log in batches, newest first, until it has enough.
    pub fn history_page(
        &self,
        before: Option<u64>,
        limit: usize,
        keep: impl Fn(&HistoryEntry) -> bool,
    ) -> Result<(Vec<HistoryEntry>, bool), DbError> {
        const BATCH: usize = 256;
        let mut out = Vec::new();
        let mut hi = before.unwrap_or(u64::MAX);
        loop {
            let span =
                Span { lo: None, hi: Some(Key::Id(hi)), newest_first: true, limit: Some(BATCH) };
            let rows = self.engine.range(Table::History, &span)?;
            let exhausted = rows.len() < BATCH;
            for (k, v) in rows {
                let entry: HistoryEntry = decode(Table::History, &k, &v)?;
                hi = entry.seq;
                if keep(&entry) {
                    if out.len() == limit {
                        return Ok((out, true));
                    }
                    out.push(entry);
                }
            }
            if exhausted {
                return Ok((out, false));
            }
        }
    }

    pub fn checkpoint(&self, site: &str, id: u64) -> Result<Option<Checkpoint>, DbError> {
        self.get(Table::Checkpoints, checkpoint_key(site, id))
    }

    /// A site's checkpoints, oldest first.
    pub fn checkpoints(&self, site: &str) -> Result<Vec<Checkpoint>, DbError> {
        Ok(self.prefixed(Table::Checkpoints, site)?.into_iter().map(|(_, c)| c).collect())
    }

    /// Every server's outcome in `run`, by server name.
    pub fn reports(&self, run: u64) -> Result<Vec<(String, ServerOutcome)>, DbError> {
        self.prefixed(Table::Reports, &format!("{run:020}"))
    }

    /// The records whose key is `{prefix}/…`, in key order, with the rest of their key.
    fn prefixed<T: DeserializeOwned>(
        &self,
        t: Table,
        prefix: &str,
    ) -> Result<Vec<(String, T)>, DbError> {
        let lo = format!("{prefix}/");
        let hi = format!("{prefix}0"); // '0' sorts right after '/'
        let span =
            Span { lo: Some(Key::Str(lo.clone())), hi: Some(Key::Str(hi)), ..Span::default() };
        let mut out = Vec::new();
        for (k, v) in self.engine.range(t, &span)? {
            let Key::Str(key) = &k else {
                return Err(DbError::KeyKind { table: t.name(), key: k.to_string() });
            };
            let rest = key.get(lo.len()..).unwrap_or_default().to_string();
            out.push((rest, decode(t, &k, &v)?));
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

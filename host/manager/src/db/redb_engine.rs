//! The embedded engine (the default): one redb file, a table per kind. Its file format is the one
//! the manager always wrote, so an existing data directory opens unchanged.

use std::ops::Bound;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use super::DbError;
use super::engine::{Engine, EngineTxn, Key, Span, Table};

type StrTable = TableDefinition<'static, &'static str, &'static [u8]>;
type IdTable = TableDefinition<'static, u64, &'static [u8]>;
const COUNTERS: TableDefinition<'static, &'static str, u64> = TableDefinition::new("counters");

fn str_table(t: Table) -> StrTable {
    TableDefinition::new(t.name())
}
fn id_table(t: Table) -> IdTable {
    TableDefinition::new(t.name())
}

pub(super) fn redb_err(e: impl Into<redb::Error>) -> DbError {
    DbError::Redb(e.into())
}

fn wrong_key(t: Table, key: &Key) -> DbError {
    DbError::KeyKind { table: t.name(), key: key.to_string() }
}

pub struct RedbEngine {
    db: Database,
}

impl RedbEngine {
    /// Opens (or creates) the database file.
    pub fn open(path: &Path) -> Result<RedbEngine, DbError> {
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => DbError::HeldByAnother {
                dir: path.parent().unwrap_or(path).display().to_string(),
                file: path.display().to_string(),
            },
            e => redb_err(e),
        })?;
        // Create every table up front so readers never meet a missing one.
        let tx = db.begin_write().map_err(redb_err)?;
        for t in Table::ALL {
            if t.by_id() {
                tx.open_table(id_table(t)).map_err(redb_err)?;
            } else {
                tx.open_table(str_table(t)).map_err(redb_err)?;
            }
        }
        tx.open_table(COUNTERS).map_err(redb_err)?;
        tx.commit().map_err(redb_err)?;
        Ok(RedbEngine { db })
    }
}

fn bounds<'k, K: ?Sized>(lo: Option<&'k K>, hi: Option<&'k K>) -> (Bound<&'k K>, Bound<&'k K>) {
    (lo.map_or(Bound::Unbounded, Bound::Included), hi.map_or(Bound::Unbounded, Bound::Excluded))
}

/// The records of an iterator over a table, newest first or not, at most `limit`.
fn collect<I, K>(
    iter: I,
    span: &Span,
    key: impl Fn(K) -> Key,
) -> Result<Vec<(Key, Vec<u8>)>, DbError>
where
    I: DoubleEndedIterator<Item = Result<(K, Vec<u8>), redb::StorageError>>,
{
    let limit = span.limit.unwrap_or(usize::MAX);
    let iter: Box<dyn Iterator<Item = _>> =
        if span.newest_first { Box::new(iter.rev()) } else { Box::new(iter) };
    let mut out = Vec::new();
    for e in iter.take(limit) {
        let (k, v) = e.map_err(redb_err)?;
        out.push((key(k), v));
    }
    Ok(out)
}

impl Engine for RedbEngine {
    fn get(&self, t: Table, key: &Key) -> Result<Option<Vec<u8>>, DbError> {
        let tx = self.db.begin_read().map_err(redb_err)?;
        match (t.by_id(), key) {
            (false, Key::Str(k)) => {
                let table = tx.open_table(str_table(t)).map_err(redb_err)?;
                Ok(table.get(k.as_str()).map_err(redb_err)?.map(|g| g.value().to_vec()))
            }
            (true, Key::Id(k)) => {
                let table = tx.open_table(id_table(t)).map_err(redb_err)?;
                Ok(table.get(*k).map_err(redb_err)?.map(|g| g.value().to_vec()))
            }
            _ => Err(wrong_key(t, key)),
        }
    }

    fn range(&self, t: Table, span: &Span) -> Result<Vec<(Key, Vec<u8>)>, DbError> {
        let tx = self.db.begin_read().map_err(redb_err)?;
        if t.by_id() {
            let id = |k: &Option<Key>| match k {
                None => Ok(None),
                Some(Key::Id(n)) => Ok(Some(*n)),
                Some(k) => Err(wrong_key(t, k)),
            };
            let (lo, hi) = (id(&span.lo)?, id(&span.hi)?);
            let table = tx.open_table(id_table(t)).map_err(redb_err)?;
            let r = table.range::<u64>(bounds(lo.as_ref(), hi.as_ref())).map_err(redb_err)?;
            collect(r.map(|e| e.map(|(k, v)| (k.value(), v.value().to_vec()))), span, Key::Id)
        } else {
            let s = |k: &Option<Key>| match k {
                None => Ok(None),
                Some(Key::Str(s)) => Ok(Some(s.clone())),
                Some(k) => Err(wrong_key(t, k)),
            };
            let (lo, hi) = (s(&span.lo)?, s(&span.hi)?);
            let table = tx.open_table(str_table(t)).map_err(redb_err)?;
            let r = table.range::<&str>(bounds(lo.as_deref(), hi.as_deref())).map_err(redb_err)?;
            collect(
                r.map(|e| e.map(|(k, v)| (k.value().to_string(), v.value().to_vec()))),
                span,
                Key::Str,
            )
        }
    }

    fn begin(&self) -> Result<Box<dyn EngineTxn + '_>, DbError> {
        Ok(Box::new(RedbTxn(self.db.begin_write().map_err(redb_err)?)))
    }
}

struct RedbTxn(WriteTransaction);

impl EngineTxn for RedbTxn {
    fn put(&mut self, t: Table, key: &Key, value: &[u8]) -> Result<(), DbError> {
        match (t.by_id(), key) {
            (false, Key::Str(k)) => {
                let mut table = self.0.open_table(str_table(t)).map_err(redb_err)?;
                table.insert(k.as_str(), value).map_err(redb_err)?;
            }
            (true, Key::Id(k)) => {
                let mut table = self.0.open_table(id_table(t)).map_err(redb_err)?;
                table.insert(*k, value).map_err(redb_err)?;
            }
            _ => return Err(wrong_key(t, key)),
        }
        Ok(())
    }

    fn delete(&mut self, t: Table, key: &Key) -> Result<(), DbError> {
        match (t.by_id(), key) {
            (false, Key::Str(k)) => {
                let mut table = self.0.open_table(str_table(t)).map_err(redb_err)?;
                table.remove(k.as_str()).map_err(redb_err)?;
            }
            (true, Key::Id(k)) => {
                let mut table = self.0.open_table(id_table(t)).map_err(redb_err)?;
                table.remove(*k).map_err(redb_err)?;
            }
            _ => return Err(wrong_key(t, key)),
        }
        Ok(())
    }

    fn next(&mut self, counter: &str) -> Result<u64, DbError> {
        let mut t = self.0.open_table(COUNTERS).map_err(redb_err)?;
        let id = t.get(counter).map_err(redb_err)?.map(|g| g.value()).unwrap_or(0) + 1;
        t.insert(counter, id).map_err(redb_err)?;
        Ok(id)
    }

    fn commit(self: Box<Self>) -> Result<(), DbError> {
        self.0.commit().map_err(redb_err)
    }
}

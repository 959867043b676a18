//! What a storage engine gives [`super::Db`]: bytes by table and key, ordered ranges, and write
//! transactions with counters. The typed records, their keys and the event bus stay above it, so
//! the two engines ([`super::redb_engine`], [`super::postgres`]) store exactly the same thing.

use super::DbError;

/// The tables, one per kind of record. Each is keyed either by a string or by a number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    Servers,
    Segments,
    Groups,
    Sites,
    /// Key: `{run:020}/{server}`, so one run's reports are one key range.
    Reports,
    /// Key: `{site}/{id:020}`, so one site's checkpoints are one key range, oldest first.
    Checkpoints,
    Jobs,
    Runs,
    History,
}

impl Table {
    pub const ALL: [Table; 9] = [
        Table::Servers,
        Table::Segments,
        Table::Groups,
        Table::Sites,
        Table::Reports,
        Table::Checkpoints,
        Table::Jobs,
        Table::Runs,
        Table::History,
    ];

    /// The table's name in either engine (and in decode errors).
    pub fn name(self) -> &'static str {
        match self {
            Table::Servers => "servers",
            Table::Segments => "segments",
            Table::Groups => "content_groups",
            Table::Sites => "hosted_sites",
            Table::Reports => "server_reports",
            Table::Checkpoints => "checkpoints",
            Table::Jobs => "jobs",
            Table::Runs => "runs",
            Table::History => "history",
        }
    }

    /// Keyed by a number (`Key::Id`) rather than a string.
    pub fn by_id(self) -> bool {
        matches!(self, Table::Jobs | Table::Runs | Table::History)
    }
}

/// A record's key; strings order bytewise, ids numerically, in both engines.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    Str(String),
    Id(u64),
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Key::Str(s) => f.write_str(s),
            Key::Id(n) => write!(f, "{n}"),
        }
    }
}

/// Which records of a table a [`Engine::range`] returns: `lo <= key < hi`, in key order or
/// newest (highest key) first, at most `limit` of them.
#[derive(Clone, Debug, Default)]
pub struct Span {
    pub lo: Option<Key>,
    pub hi: Option<Key>,
    pub newest_first: bool,
    pub limit: Option<usize>,
}

/// A storage engine. Reads see committed data only; one write transaction at a time.
pub trait Engine: Send + Sync {
    fn get(&self, t: Table, key: &Key) -> Result<Option<Vec<u8>>, DbError>;
    fn range(&self, t: Table, span: &Span) -> Result<Vec<(Key, Vec<u8>)>, DbError>;
    /// A write transaction; dropped without [`EngineTxn::commit`], nothing of it is kept.
    fn begin(&self) -> Result<Box<dyn EngineTxn + '_>, DbError>;
}

/// One write transaction of an [`Engine`].
pub trait EngineTxn {
    fn put(&mut self, t: Table, key: &Key, value: &[u8]) -> Result<(), DbError>;
    fn delete(&mut self, t: Table, key: &Key) -> Result<(), DbError>;
    /// The counter's next value (1 first), kept only if the transaction commits.
    fn next(&mut self, counter: &str) -> Result<u64, DbError>;
    fn commit(self: Box<Self>) -> Result<(), DbError>;
}

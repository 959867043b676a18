//! The PostgreSQL engine: the same tables as redb (`schema.rs`), shared by several manager
//! replicas of which one, the lease holder, writes (`lease.rs`).
//!
//! The `postgres` client is blocking and runs a Tokio runtime of its own inside, which must not
//! be entered from the manager's tasks. So every connection lives on a thread of its own and
//! takes work over a channel: a writer (one transaction at a time, as in redb), two readers, and
//! one for the lease, so renewing it never waits behind API reads. A connection that broke is
//! opened again for the next piece of work.

mod lease;
pub mod schema;

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, Sender, SyncSender, channel, sync_channel};
use std::sync::{Arc, Mutex};

use postgres::{Client, NoTls, Statement, Transaction};

use super::DbError;
use super::engine::{Engine, EngineTxn, Key, Span, Table};
pub use lease::{LeaseHolder, LeaseView};

const READERS: usize = 2;

/// A connection and the statements prepared on it.
struct Conn {
    url: String,
    client: Option<Client>,
    statements: HashMap<String, Statement>,
}

impl Conn {
    fn client(&mut self) -> Result<&mut Client, DbError> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.statements.clear();
            self.client = Some(Client::connect(&self.url, NoTls)?);
        }
        Ok(self.client.as_mut().expect("just connected"))
    }
}

/// `sql` prepared once per connection.
fn prepared(
    statements: &mut HashMap<String, Statement>,
    c: &mut impl postgres::GenericClient,
    sql: String,
) -> Result<Statement, DbError> {
    if let Some(s) = statements.get(&sql) {
        return Ok(s.clone());
    }
    let s = c.prepare(&sql)?;
    statements.insert(sql, s.clone());
    Ok(s)
}

type Job = Box<dyn FnOnce(&mut Conn) + Send>;

/// Starts `n` threads sharing one queue of work, each with its own connection to `url`.
fn workers(url: &str, n: usize, name: &str) -> Result<Sender<Job>, DbError> {
    let (tx, rx) = channel::<Job>();
    let rx = Arc::new(Mutex::new(rx));
    for i in 0..n {
        let (rx, url) = (rx.clone(), url.to_string());
        std::thread::Builder::new()
            .name(format!("cm-pg-{name}-{i}"))
            .spawn(move || {
                let mut conn = Conn { url, client: None, statements: HashMap::new() };
                loop {
                    let job = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                        Ok(job) => job,
                        Err(_) => return, // the engine was dropped
                    };
                    job(&mut conn);
                }
            })
            .map_err(|e| DbError::Thread(e.to_string()))?;
    }
    Ok(tx)
}

/// Runs `f` on one of `to`'s threads and waits for its answer.
fn call<R: Send + 'static>(
    to: &Sender<Job>,
    f: impl FnOnce(&mut Conn) -> Result<R, DbError> + Send + 'static,
) -> Result<R, DbError> {
    let (reply, answer) = sync_channel(1);
    to.send(Box::new(move |conn| {
        let _ = reply.send(f(conn));
    }))
    .map_err(|_| DbError::Thread("the PostgreSQL threads stopped".into()))?;
    answer.recv().map_err(|_| DbError::Thread("a PostgreSQL thread stopped mid-call".into()))?
}

/// The fencing token this replica writes with (`None`: not the active replica; its writes fail).
type Token = Arc<Mutex<Option<i64>>>;

pub struct PgEngine {
    readers: Sender<Job>,
    writer: Sender<Job>,
    control: Sender<Job>,
    token: Token,
}

impl PgEngine {
    /// Connects to `url` (a `postgres://` URL or a `key=value` string) and migrates the schema.
    pub fn open(url: &str) -> Result<PgEngine, DbError> {
        let control = workers(url, 1, "control")?;
        call(&control, |c| schema::migrate(c.client()?))?;
        Ok(PgEngine {
            readers: workers(url, READERS, "read")?,
            writer: workers(url, 1, "write")?,
            control,
            token: Default::default(),
        })
    }

    /// The fencing token this replica holds, if any.
    pub fn token(&self) -> Option<i64> {
        *self.token.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes from now on carry `token` (used by tests to act as a replica that was deposed).
    pub fn set_token(&self, token: Option<i64>) {
        *self.token.lock().unwrap_or_else(|p| p.into_inner()) = token;
    }
}

/// A bound of an id table: PostgreSQL's `bigint` is signed, ids stay far below its top.
fn id_param(t: Table, n: u64) -> Result<i64, DbError> {
    i64::try_from(n).map_err(|_| DbError::KeyKind { table: t.name(), key: n.to_string() })
}

fn key_of(t: Table, row: &postgres::Row) -> Key {
    if t.by_id() { Key::Id(row.get::<_, i64>(0) as u64) } else { Key::Str(row.get(0)) }
}

/// A key as a statement parameter, checked against the table's kind.
fn param(t: Table, key: &Key) -> Result<Box<dyn postgres::types::ToSql + Sync + Send>, DbError> {
    match (t.by_id(), key) {
        (false, Key::Str(s)) => Ok(Box::new(s.clone())),
        (true, Key::Id(n)) => Ok(Box::new(id_param(t, *n)?)),
        _ => Err(DbError::KeyKind { table: t.name(), key: key.to_string() }),
    }
}

impl Engine for PgEngine {
    fn get(&self, t: Table, key: &Key) -> Result<Option<Vec<u8>>, DbError> {
        let k = param(t, key)?;
        let sql = format!("SELECT value FROM {} WHERE key = $1", schema::table(t));
        call(&self.readers, move |conn| {
            conn.client()?;
            let Conn { client, statements, .. } = conn;
            let c = client.as_mut().expect("connected above");
            let s = prepared(statements, c, sql)?;
            Ok(c.query_opt(&s, &[&*k])?.map(|r| r.get(0)))
        })
    }

    fn range(&self, t: Table, span: &Span) -> Result<Vec<(Key, Vec<u8>)>, DbError> {
        let mut conds = Vec::new();
        let mut params: Vec<Box<dyn postgres::types::ToSql + Sync + Send>> = Vec::new();
        if let Some(lo) = &span.lo {
            params.push(param(t, lo)?);
            conds.push(format!("key >= ${}", params.len()));
        }
        if let Some(hi) = &span.hi {
            // Ids above bigint's top are above every stored id: no bound.
            if !matches!(hi, Key::Id(n) if *n > i64::MAX as u64) {
                params.push(param(t, hi)?);
                conds.push(format!("key < ${}", params.len()));
            }
        }
        let sql = format!(
            "SELECT key, value FROM {} {} ORDER BY key {} {}",
            schema::table(t),
            if conds.is_empty() { String::new() } else { format!("WHERE {}", conds.join(" AND ")) },
            if span.newest_first { "DESC" } else { "ASC" },
            span.limit.map(|n| format!("LIMIT {n}")).unwrap_or_default(),
        );
        call(&self.readers, move |conn| {
            conn.client()?;
            let Conn { client, statements, .. } = conn;
            let c = client.as_mut().expect("connected above");
            let s = prepared(statements, c, sql)?;
            let refs: Vec<&(dyn postgres::types::ToSql + Sync)> =
                params.iter().map(|p| &**p as &(dyn postgres::types::ToSql + Sync)).collect();
            let rows = c.query(&s, &refs)?;
            Ok(rows.iter().map(|r| (key_of(t, r), r.get(1))).collect())
        })
    }

    fn begin(&self) -> Result<Box<dyn EngineTxn + '_>, DbError> {
        let (ops, queue) = channel::<TxMsg>();
        let (ready, started) = sync_channel(1);
        let token = self.token();
        self.writer
            .send(Box::new(move |conn| run_transaction(conn, token, ready, queue)))
            .map_err(|_| DbError::Thread("the PostgreSQL writer stopped".into()))?;
        started
            .recv()
            .map_err(|_| DbError::Thread("the PostgreSQL writer stopped mid-call".into()))??;
        Ok(Box::new(PgTxn { ops }))
    }
}

/// The statements prepared on a connection, by their SQL.
type Statements = HashMap<String, Statement>;

/// One step of a transaction, run on the writer's thread.
type Step = Box<dyn FnOnce(&mut Transaction<'_>, &mut Statements) + Send>;

enum TxMsg {
    Step(Step),
    Commit(SyncSender<Result<(), DbError>>),
}

/// The writer thread's side of a transaction: steps until a commit, or a rollback when the
/// caller drops it.
fn run_transaction(
    conn: &mut Conn,
    token: Option<i64>,
    ready: SyncSender<Result<(), DbError>>,
    queue: Receiver<TxMsg>,
) {
    if let Err(e) = conn.client() {
        let _ = ready.send(Err(e));
        return;
    }
    let Conn { client, statements, .. } = conn;
    let begun = client.as_mut().expect("connected above").transaction();
    let mut tx = match begun.map_err(DbError::from) {
        Ok(tx) => tx,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    if let Some(t) = token
        && let Err(e) = tx.execute("SELECT set_config('cm.token', $1, true)", &[&t.to_string()])
    {
        let _ = ready.send(Err(e.into()));
        return;
    }
    let _ = ready.send(Ok(()));
    while let Ok(msg) = queue.recv() {
        match msg {
            TxMsg::Step(f) => f(&mut tx, statements),
            TxMsg::Commit(reply) => {
                let _ = reply.send(tx.commit().map_err(DbError::from));
                return;
            }
        }
    }
}

struct PgTxn {
    ops: Sender<TxMsg>,
}

impl PgTxn {
    fn step<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Transaction<'_>, &mut HashMap<String, Statement>) -> Result<R, DbError>
        + Send
        + 'static,
    ) -> Result<R, DbError> {
        let (reply, answer) = sync_channel(1);
        self.ops
            .send(TxMsg::Step(Box::new(move |tx, st| {
                let _ = reply.send(f(tx, st));
            })))
            .map_err(|_| DbError::Thread("the PostgreSQL writer stopped".into()))?;
        answer
            .recv()
            .map_err(|_| DbError::Thread("the PostgreSQL writer stopped mid-call".into()))?
    }
}

impl EngineTxn for PgTxn {
    fn put(&mut self, t: Table, key: &Key, value: &[u8]) -> Result<(), DbError> {
        let (k, v) = (param(t, key)?, value.to_vec());
        self.step(move |tx, st| {
            let sql = format!(
                "INSERT INTO {} (key, value) VALUES ($1, $2) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                schema::table(t)
            );
            let s = prepared(st, tx, sql)?;
            tx.execute(&s, &[&*k, &v])?;
            Ok(())
        })
    }

    fn delete(&mut self, t: Table, key: &Key) -> Result<(), DbError> {
        let k = param(t, key)?;
        self.step(move |tx, st| {
            let s = prepared(st, tx, format!("DELETE FROM {} WHERE key = $1", schema::table(t)))?;
            tx.execute(&s, &[&*k])?;
            Ok(())
        })
    }

    fn next(&mut self, counter: &str) -> Result<u64, DbError> {
        let name = counter.to_string();
        self.step(move |tx, st| {
            let sql = "INSERT INTO cm_counters (name, value) VALUES ($1, 1) \
                       ON CONFLICT (name) DO UPDATE SET value = cm_counters.value + 1 \
                       RETURNING value";
            let s = prepared(st, tx, sql.to_string())?;
            Ok(tx.query_one(&s, &[&name])?.get::<_, i64>(0) as u64)
        })
    }

    fn commit(self: Box<Self>) -> Result<(), DbError> {
        let (reply, answer) = sync_channel(1);
        self.ops
            .send(TxMsg::Commit(reply))
            .map_err(|_| DbError::Thread("the PostgreSQL writer stopped".into()))?;
        answer
            .recv()
            .map_err(|_| DbError::Thread("the PostgreSQL writer stopped mid-call".into()))?
    }
}

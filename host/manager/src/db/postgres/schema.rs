//! The PostgreSQL schema, as numbered migrations. `cm_schema_version` holds how many are applied;
//! a manager applies the missing ones at start (under an advisory lock, so replicas starting
//! together do not race) and refuses a database migrated by a newer manager.

use postgres::Client;

use super::super::DbError;
use super::super::engine::Table;

/// Any number will do so long as nothing else on the database takes the same advisory lock.
const MIGRATION_LOCK: i64 = 0x636d_6f76_6572; // "cmover"

/// The table of `t` in PostgreSQL.
pub fn table(t: Table) -> String {
    format!("cm_{}", t.name())
}

/// Migration 1: a table per kind of record (the keys' order is bytewise, as in redb) and the
/// counters.
fn v1() -> String {
    let mut sql = String::new();
    for t in Table::ALL {
        let key = if t.by_id() { "bigint" } else { "text COLLATE \"C\"" };
        sql.push_str(&format!(
            "CREATE TABLE {} (key {key} PRIMARY KEY, value bytea NOT NULL);\n",
            table(t)
        ));
    }
    sql.push_str(
        "CREATE TABLE cm_counters (name text COLLATE \"C\" PRIMARY KEY, value bigint NOT NULL);\n",
    );
    sql
}

/// Migration 2: the active replica's lease and its fencing token. Every statement that writes a
/// record or a counter must run in a transaction that set `cm.token` to the lease's current
/// token; a replica deposed by a newer lease gets its writes refused here, in the database. The
/// lease row is read `FOR SHARE`, so a takeover waits for the transactions in flight under the
/// old token and every later one sees the new token.
fn v2() -> String {
    let mut sql = String::from(
        "CREATE TABLE cm_lease (
            id integer PRIMARY KEY CHECK (id = 1),
            holder text NOT NULL,
            url text NOT NULL,
            token bigint NOT NULL,
            expires_at timestamptz NOT NULL
        );
        INSERT INTO cm_lease VALUES (1, '', '', 0, 'epoch');
        CREATE FUNCTION cm_fence() RETURNS trigger LANGUAGE plpgsql AS $$
        DECLARE
            held bigint;
            given text := current_setting('cm.token', true);
        BEGIN
            SELECT token INTO held FROM cm_lease WHERE id = 1 FOR SHARE;
            IF given IS NULL OR given = '' OR given::bigint <> held THEN
                RAISE EXCEPTION 'cm fenced: write with token % refused, the lease is at %',
                    coalesce(nullif(given, ''), 'none'), held
                    USING ERRCODE = 'CMF01';
            END IF;
            RETURN NULL;
        END $$;\n",
    );
    let tables = Table::ALL.iter().map(|t| table(*t)).chain(["cm_counters".to_string()]);
    for t in tables {
        sql.push_str(&format!(
            "CREATE TRIGGER {t}_fence BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON {t}
             FOR EACH STATEMENT EXECUTE FUNCTION cm_fence();\n"
        ));
    }
    sql
}

/// Every migration, in order; never edit one that shipped, add the next.
fn migrations() -> Vec<String> {
    vec![v1(), v2()]
}

/// The SQLSTATE the fence raises.
pub const FENCED: &str = "CMF01";

/// Brings the schema to this manager's version.
pub fn migrate(client: &mut Client) -> Result<(), DbError> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS cm_schema_version (version integer NOT NULL)")?;
    let found: Option<i32> =
        tx.query_opt("SELECT version FROM cm_schema_version", &[])?.map(|r| r.get(0));
    let all = migrations();
    let known = all.len();
    let found_n = found.unwrap_or(0).max(0) as usize;
    if found_n > known {
        return Err(DbError::SchemaTooNew { found: found_n, known });
    }
    for (i, m) in all.iter().enumerate().skip(found_n) {
        tx.batch_execute(m).map_err(|source| DbError::Migration { version: i + 1, source })?;
    }
    let v = known as i32;
    if found.is_none() {
        tx.execute("INSERT INTO cm_schema_version VALUES ($1)", &[&v])?;
    } else {
        tx.execute("UPDATE cm_schema_version SET version = $1", &[&v])?;
    }
    tx.commit()?;
    Ok(())
}

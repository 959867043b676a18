//! The manager's store contract, run against both engines: embedded redb and PostgreSQL (a
//! throwaway cluster per test, `cm_tests::postgres`). What one engine keeps, orders, counts and
//! throws away, the other must too. Then what only PostgreSQL has: migrations, and the lease's
//! fencing token checked by the database.

use std::time::Duration;

use cm_manager::db::postgres::LeaseHolder;
use cm_manager::db::{Db, DbError, StoreSpec};
use cm_manager::model::{
    Checkpoint, HostedSite, JobKind, JobSpec, Payload, ServerOutcome, ServerRecord,
};
use cm_tests::postgres::PgCluster;

fn spec(name: &str) -> JobSpec {
    JobSpec {
        name: name.into(),
        kind: JobKind::Publish,
        site: "s".into(),
        payload: Payload::File { path: "x".into() },
        start_at_ms: 0,
        every_ms: None,
        policy: Default::default(),
    }
}

fn server(name: &str) -> ServerRecord {
    ServerRecord {
        name: name.into(),
        segment: "seg".into(),
        live: true,
        last_seen_ms: 0,
        plugin: None,
        space: None,
        space_ms: 0,
    }
}

fn replica(id: &str) -> LeaseHolder {
    LeaseHolder { id: id.into(), url: format!("http://{id}.invalid") }
}

/// A PostgreSQL store on a new database of `pg`, holding the lease (so it may write).
fn pg_db(pg: &PgCluster, name: &str) -> anyhow::Result<Db> {
    let db = Db::open_store(&StoreSpec::Postgres(pg.create_db(name)?))?;
    let token = db
        .postgres()
        .expect("a PostgreSQL store")
        .hold_lease(&replica("a"), Duration::from_secs(60))?;
    assert!(token.is_some(), "a fresh database's lease is free");
    Ok(db)
}

/// What every engine must do, on an empty store.
fn contract(db: &Db) {
    // Records by name and id, replaced in place.
    let job = db
        .write(|t| {
            let j = t.insert_job(spec("one"), 77)?;
            t.put_server(&server("web-b"))?;
            t.put_server(&server("web-a"))?;
            t.put_server(&server("Web-z"))?;
            t.put_report(1, "a", &ServerOutcome::Succeeded)?;
            t.put_report(1, "b", &ServerOutcome::Missing)?;
            t.put_report(12, "a", &ServerOutcome::Failed { reason: "disk\u{0}full ✗".into() })?;
            t.put_report(100, "z", &ServerOutcome::Succeeded)?;
            t.log(77, Some(j.id), None, "created")?;
            Ok::<_, DbError>(j)
        })
        .unwrap();
    assert_eq!((job.id, job.next_run_ms), (1, 77));
    assert_eq!(db.job(1).unwrap().unwrap().spec, spec("one"));
    assert!(db.job(2).unwrap().is_none());
    assert!(db.server("nope").unwrap().is_none());
    // String keys order bytewise (upper case before lower), as redb's &str keys do.
    let names: Vec<String> = db.servers().unwrap().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["Web-z", "web-a", "web-b"]);
    // One run's reports are exactly its key range (run 1 is not run 12's or 100's prefix).
    assert_eq!(
        db.reports(1).unwrap(),
        vec![("a".into(), ServerOutcome::Succeeded), ("b".into(), ServerOutcome::Missing)]
    );
    assert_eq!(
        db.reports(12).unwrap(),
        vec![("a".into(), ServerOutcome::Failed { reason: "disk\u{0}full ✗".into() })],
        "any string survives, NUL included"
    );
    assert!(db.reports(2).unwrap().is_empty());

    // A failed transaction leaves nothing behind, and its counters do not move.
    let r: Result<(), DbError> = db.write(|t| {
        t.insert_job(spec("lost"), 1)?;
        t.put_server(&server("ghost"))?;
        Err(DbError::Encode(serde_json::from_str::<u8>("x").unwrap_err()))
    });
    assert!(r.is_err());
    assert!(db.server("ghost").unwrap().is_none());
    assert_eq!(db.jobs().unwrap().len(), 1);
    let j2 = db.write(|t| t.insert_job(spec("two"), 5)).unwrap();
    assert_eq!(j2.id, 2, "the failed transaction's id was not kept");
    let mut again = j2.clone();
    again.attempts = 3;
    db.write(|t| t.put_job(&again)).unwrap();
    assert_eq!(db.job(2).unwrap().unwrap().attempts, 3);
    assert_eq!(db.jobs().unwrap().iter().map(|j| j.id).collect::<Vec<_>>(), [1, 2]);

    // Checkpoints: per site, oldest first, ids per site, removal.
    let cp = |site: &str, id: u64| Checkpoint {
        site: site.into(),
        id,
        release: id,
        created_ms: id,
        note: None,
        size: 1,
        blake3: String::new(),
        entries: 1,
        content_bytes: 1,
    };
    db.write(|t| {
        for site in ["s", "s2"] {
            for _ in 0..3 {
                let id = t.next_checkpoint_id(site)?;
                t.put_checkpoint(&cp(site, id))?;
            }
        }
        t.remove_checkpoint("s", 2)
    })
    .unwrap();
    let ids =
        |site: &str| db.checkpoints(site).unwrap().into_iter().map(|c| c.id).collect::<Vec<_>>();
    assert_eq!(ids("s"), [1, 3]);
    assert_eq!(ids("s2"), [1, 2, 3]);
    assert!(db.checkpoint("s", 2).unwrap().is_none());
    assert_eq!(db.checkpoint("s2", 2).unwrap(), Some(cp("s2", 2)));

    // Sites round-trip whole.
    let site: HostedSite = serde_json::from_value(serde_json::json!({
        "name": "s", "content_group": "g", "staging": "/srv/s", "committed": [1, 2]
    }))
    .unwrap();
    db.write(|t| t.put_site(&site)).unwrap();
    assert_eq!(db.site("s").unwrap(), Some(site.clone()));
    assert_eq!(db.sites().unwrap(), vec![site]);

    // History: pages newest first across the engine's read batches, filtered.
    db.write(|t| {
        for i in 0..600u64 {
            t.log(i, Some(i % 3), None, format!("line {i}"))?;
        }
        Ok::<_, DbError>(())
    })
    .unwrap();
    assert_eq!(db.history().unwrap().len(), 601);
    let (page, more) = db.history_page(None, 5, |e| e.job == Some(0)).unwrap();
    assert_eq!(page.iter().map(|e| e.seq).collect::<Vec<_>>(), [599, 596, 593, 590, 587]);
    assert!(more);
    // The filter matches only the oldest entries: the page walks past several batches.
    let (page, more) = db.history_page(None, 10, |e| e.event == "created" || e.at_ms < 2).unwrap();
    assert_eq!(page.iter().map(|e| e.seq).collect::<Vec<_>>(), [3, 2, 1]);
    assert!(!more);
    let (page, more) = db.history_page(Some(3), 10, |_| true).unwrap();
    assert_eq!(page.iter().map(|e| e.seq).collect::<Vec<_>>(), [2, 1]);
    assert!(!more);
}

#[test]
fn redb_keeps_the_contract_and_its_records_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.redb");
    contract(&Db::open_store(&StoreSpec::Redb(path.clone())).unwrap());
    let db = Db::open(&path).unwrap();
    assert_eq!(db.jobs().unwrap().len(), 2);
    assert_eq!(db.write(|t| t.insert_job(spec("three"), 1)).unwrap().id, 3);
}

#[test]
fn postgres_keeps_the_contract_and_its_records_across_a_reconnect() -> anyhow::Result<()> {
    let Some(pg) = PgCluster::start()? else { return Ok(()) };
    let first = pg_db(&pg, "contract")?;
    contract(&first);
    first.postgres().unwrap().release_lease(&replica("a"))?;
    // A second connection (another replica, or the manager restarted) sees all of it, and the
    // schema is not migrated twice.
    let db = Db::open_postgres(&pg.url("contract"))?;
    assert_eq!(db.jobs()?.len(), 2);
    assert_eq!(pg.psql("contract", "SELECT version FROM cm_schema_version")?.trim(), "2");
    let token = db.postgres().unwrap().hold_lease(&replica("a2"), Duration::from_secs(60))?;
    assert_eq!(token, Some(2), "the released lease is taken at once, with the next token");
    assert_eq!(db.write(|t| t.insert_job(spec("three"), 1))?.id, 3);
    Ok(())
}

#[test]
fn postgres_refuses_a_schema_newer_than_the_manager() -> anyhow::Result<()> {
    let Some(pg) = PgCluster::start()? else { return Ok(()) };
    drop(pg_db(&pg, "newer")?);
    pg.psql("newer", "UPDATE cm_schema_version SET version = 99")?;
    match Db::open_postgres(&pg.url("newer")) {
        Err(DbError::SchemaTooNew { found: 99, known: 2 }) => Ok(()),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a manager opened a schema newer than it knows"),
    }
}

#[test]
fn the_database_refuses_writes_without_the_current_fencing_token() -> anyhow::Result<()> {
    let Some(pg) = PgCluster::start()? else { return Ok(()) };
    let url = pg.create_db("fence")?;
    let a = Db::open_postgres(&url)?;
    let b = Db::open_postgres(&url)?;
    let (pa, pb) = (a.postgres().unwrap(), b.postgres().unwrap());
    let short = Duration::from_millis(300);

    // Nobody holds the lease: no write gets in, not even a counter.
    assert!(matches!(a.write(|t| t.insert_job(spec("x"), 1)), Err(DbError::Fenced(_))));

    let ta = pa.hold_lease(&replica("a"), short)?.expect("a takes the free lease");
    assert_eq!(pb.hold_lease(&replica("b"), short)?, None, "b cannot take a live lease");
    assert_eq!(pa.lease()?.holder, replica("a"));
    a.write(|t| t.put_server(&server("one")))?;
    assert!(matches!(b.write(|t| t.put_server(&server("two"))), Err(DbError::Fenced(_))));

    // a stops renewing; once the lease lapses b takes it with the next token.
    let tb = loop {
        if let Some(t) = pb.hold_lease(&replica("b"), Duration::from_secs(60))? {
            break t;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(tb > ta);
    b.write(|t| t.put_server(&server("two")))?;
    // a still believes it is active (it has not renewed): the database refuses it all the same.
    assert_eq!(pa.token(), Some(ta));
    let refused = a.write(|t| t.put_server(&server("three")));
    assert!(matches!(refused, Err(DbError::Fenced(_))), "{refused:?}");
    // Even a write bypassing the manager's code with an old token is refused.
    let sql = format!(
        "BEGIN; SELECT set_config('cm.token', '{ta}', true); \
         INSERT INTO cm_servers VALUES ('four', '{{}}'); COMMIT;"
    );
    assert!(pg.psql("fence", &sql).is_err());
    assert!(a.server("three")?.is_none() && a.server("four")?.is_none());
    // a's next renewal tells it it was deposed.
    assert_eq!(pa.hold_lease(&replica("a"), short)?, None);
    assert_eq!(pa.token(), None);
    // A clean release hands over at once.
    pb.release_lease(&replica("b"))?;
    assert!(pa.hold_lease(&replica("a"), short)?.is_some_and(|t| t > tb));
    Ok(())
}

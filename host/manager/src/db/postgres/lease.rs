//! The active replica's lease (the `cm_lease` row, schema migration 2). A replica holds it by
//! renewing it before it lapses; a lapsed lease is taken with the next fencing token, which the
//! database then demands of every write (`schema.rs`'s fence), so the previous holder's writes
//! are refused even if it does not know yet that it lost. Times are the database's clock, so
//! replicas' clocks need not agree.

use std::time::Duration;

use super::super::DbError;
use super::{PgEngine, call};

/// A replica: its id (unique among replicas) and the URL its API is reached at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseHolder {
    pub id: String,
    pub url: String,
}

/// The lease as the database has it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseView {
    pub holder: LeaseHolder,
    pub token: i64,
    /// Not lapsed: its holder is the active replica.
    pub live: bool,
}

impl PgEngine {
    /// Renews the lease this replica holds, or takes it if it lapsed. Returns the token this
    /// replica writes with from now on; `None`: another replica holds it (this one's writes are
    /// refused from now on).
    pub fn hold_lease(&self, me: &LeaseHolder, ttl: Duration) -> Result<Option<i64>, DbError> {
        let (me, secs, held) = (me.clone(), ttl.as_secs_f64(), self.token());
        let token = call(&self.control, move |conn| {
            let c = conn.client()?;
            if let Some(t) = held {
                let renewed = c.query_opt(
                    "UPDATE cm_lease SET expires_at = clock_timestamp() + make_interval(secs => $3),
                         url = $2
                     WHERE id = 1 AND holder = $1 AND token = $4 RETURNING token",
                    &[&me.id, &me.url, &secs, &t],
                )?;
                if renewed.is_some() {
                    return Ok(Some(t));
                }
            }
            let taken = c.query_opt(
                "UPDATE cm_lease SET holder = $1, url = $2, token = token + 1,
                     expires_at = clock_timestamp() + make_interval(secs => $3)
                 WHERE id = 1 AND expires_at < clock_timestamp() RETURNING token",
                &[&me.id, &me.url, &secs],
            )?;
            Ok(taken.map(|r| r.get::<_, i64>(0)))
        })?;
        self.set_token(token);
        Ok(token)
    }

    /// Gives the lease up at once (a clean shutdown), so a standby need not wait for it to lapse.
    pub fn release_lease(&self, me: &LeaseHolder) -> Result<(), DbError> {
        let Some(t) = self.token() else { return Ok(()) };
        self.set_token(None);
        let id = me.id.clone();
        call(&self.control, move |conn| {
            conn.client()?.execute(
                "UPDATE cm_lease SET expires_at = 'epoch' WHERE id = 1 AND holder = $1 AND token = $2",
                &[&id, &t],
            )?;
            Ok(())
        })
    }

    /// Who holds the lease.
    pub fn lease(&self) -> Result<LeaseView, DbError> {
        call(&self.control, |conn| {
            let r = conn.client()?.query_one(
                "SELECT holder, url, token, expires_at > clock_timestamp() FROM cm_lease WHERE id = 1",
                &[],
            )?;
            Ok(LeaseView {
                holder: LeaseHolder { id: r.get(0), url: r.get(1) },
                token: r.get(2),
                live: r.get(3),
            })
        })
    }
}

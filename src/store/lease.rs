//! Mailbox leases: with several instances on one database, each mailbox is worked by
//! one instance at a time.
//!
//! A lease is the `lease_owner` / `lease_expires_at` pair of the mailbox's
//! `mailbox_state` row. The holder renews it well before it expires; another instance
//! takes it over only once it has expired. Times come from the database's clock, so
//! instances whose clocks disagree still agree on who holds a lease. Every batch renews
//! the lease inside its own transaction ([`fence`]): an instance that lost its lease
//! (paused, cut off) cannot commit anything afterwards, and on PostgreSQL the row lock
//! taken there makes a takeover wait for the batch in flight.

use sqlx::{AnyConnection, Row};

use super::{Context, Store, StoreError};

/// The database's clock as unix seconds.
fn db_now(conn: &AnyConnection) -> &'static str {
    if conn.backend_name().eq_ignore_ascii_case("sqlite") {
        "CAST(strftime('%s', 'now') AS BIGINT)"
    } else {
        "CAST(EXTRACT(EPOCH FROM now()) AS BIGINT)"
    }
}

/// Who holds a lease, until when (database clock), and the database's time now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseHolder {
    pub holder: String,
    pub expires_at: i64,
    pub now: i64,
}

impl Store {
    /// Takes (or keeps) the lease on `mailbox` for `ttl_secs`. True when `holder` has it.
    pub async fn lease_acquire(
        &self,
        mailbox: &str,
        holder: &str,
        ttl_secs: i64,
    ) -> Result<bool, StoreError> {
        let mut wtx = self.begin_write().await?;
        let now = db_now(wtx.conn());
        let sql = format!(
            "INSERT INTO mailbox_state (mailbox, updated_at, lease_owner, lease_expires_at) \
             VALUES ($1, {now}, $2, {now} + $3) \
             ON CONFLICT (mailbox) DO UPDATE SET lease_owner = excluded.lease_owner, \
               lease_expires_at = excluded.lease_expires_at \
             WHERE mailbox_state.lease_owner IS NULL OR mailbox_state.lease_owner = excluded.lease_owner \
               OR mailbox_state.lease_expires_at IS NULL OR mailbox_state.lease_expires_at < {now}"
        );
        let done = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(mailbox)
            .bind(holder)
            .bind(ttl_secs)
            .execute(wtx.conn())
            .await
            .ctx("take a mailbox lease")?;
        wtx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    /// Takes the lease on `mailbox` from `from`, who is known to be gone, whether or
    /// not it has expired. False when `from` no longer holds it.
    pub async fn lease_take_over(
        &self,
        mailbox: &str,
        from: &str,
        holder: &str,
        ttl_secs: i64,
    ) -> Result<bool, StoreError> {
        let mut wtx = self.begin_write().await?;
        let sql = format!(
            "UPDATE mailbox_state SET lease_owner = $3, lease_expires_at = {} + $4 \
             WHERE mailbox = $1 AND lease_owner = $2",
            db_now(wtx.conn())
        );
        let done = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(mailbox)
            .bind(from)
            .bind(holder)
            .bind(ttl_secs)
            .execute(wtx.conn())
            .await
            .ctx("take over a mailbox lease")?;
        wtx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    /// Extends the lease `holder` has on `mailbox`. False when it is no longer theirs.
    pub async fn lease_renew(
        &self,
        mailbox: &str,
        holder: &str,
        ttl_secs: i64,
    ) -> Result<bool, StoreError> {
        let mut wtx = self.begin_write().await?;
        let kept = fence(wtx.conn(), mailbox, holder, ttl_secs).await?;
        wtx.commit().await?;
        Ok(kept)
    }

    /// Gives the lease up (on shutdown), so another instance can take over at once.
    pub async fn lease_release(&self, mailbox: &str, holder: &str) -> Result<(), StoreError> {
        let mut wtx = self.begin_write().await?;
        sqlx::query(
            "UPDATE mailbox_state SET lease_owner = NULL, lease_expires_at = NULL \
             WHERE mailbox = $1 AND lease_owner = $2",
        )
        .bind(mailbox)
        .bind(holder)
        .execute(wtx.conn())
        .await
        .ctx("release a mailbox lease")?;
        wtx.commit().await?;
        Ok(())
    }

    /// The current holder of a mailbox's lease, if any.
    pub async fn lease_holder(&self, mailbox: &str) -> Result<Option<LeaseHolder>, StoreError> {
        let mut conn = self.acquire().await?;
        let sql = format!(
            "SELECT lease_owner, lease_expires_at, {} FROM mailbox_state \
             WHERE mailbox = $1 AND lease_owner IS NOT NULL",
            db_now(&conn)
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(mailbox)
            .fetch_optional(&mut *conn)
            .await
            .ctx("read a mailbox lease")?;
        row.map(|r| {
            Ok(LeaseHolder {
                holder: r.try_get(0).ctx("read a mailbox lease")?,
                expires_at: r.try_get(1).ctx("read a mailbox lease")?,
                now: r.try_get(2).ctx("read a mailbox lease")?,
            })
        })
        .transpose()
    }
}

/// Renews the lease inside the caller's transaction. False when `holder` lost it.
pub async fn fence(
    conn: &mut AnyConnection,
    mailbox: &str,
    holder: &str,
    ttl_secs: i64,
) -> Result<bool, StoreError> {
    let sql = format!(
        "UPDATE mailbox_state SET lease_expires_at = {} + $3 \
         WHERE mailbox = $1 AND lease_owner = $2",
        db_now(conn)
    );
    let done = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(mailbox)
        .bind(holder)
        .bind(ttl_secs)
        .execute(&mut *conn)
        .await
        .ctx("renew a mailbox lease")?;
    Ok(done.rows_affected() == 1)
}

/// A live instance, as its heartbeat row and the leases it holds say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveInstance {
    pub holder: String,
    /// The mailboxes it is configured to work. `None`: a version that did not say.
    pub mailboxes: Option<Vec<String>>,
    /// Mailbox leases it holds now.
    pub held: usize,
}

/// What a heartbeat sees: the live instances, this one included, and the mailboxes
/// nobody holds (given back and not yet taken, or their holder gone).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Beat {
    pub live: Vec<LiveInstance>,
    pub unheld: Vec<String>,
}

impl Store {
    /// Records that `holder`, configured with `mailboxes`, is alive for `ttl_secs` more,
    /// and forgets instances gone for a long time. Returns the live instances, this one
    /// included, and the mailboxes nobody holds.
    pub async fn instance_beat(
        &self,
        holder: &str,
        ttl_secs: i64,
        mailboxes: &[String],
    ) -> Result<Beat, StoreError> {
        let mut wtx = self.begin_write().await?;
        let now = db_now(wtx.conn());
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO instances (holder, started_at, expires_at, mailboxes) \
             VALUES ($1, {now}, {now} + $2, $3) \
             ON CONFLICT (holder) DO UPDATE SET expires_at = excluded.expires_at, \
               mailboxes = excluded.mailboxes"
        )))
        .bind(holder)
        .bind(ttl_secs)
        .bind(mailboxes.join(" "))
        .execute(wtx.conn())
        .await
        .ctx("record this instance")?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM instances WHERE expires_at < {now} - 86400"
        )))
        .execute(wtx.conn())
        .await
        .ctx("forget old instances")?;
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT i.holder, i.mailboxes, \
               (SELECT COUNT(*) FROM mailbox_state s \
                WHERE s.lease_owner = i.holder AND s.lease_expires_at >= {now}) \
             FROM instances i WHERE i.expires_at >= {now} ORDER BY i.holder"
        )))
        .fetch_all(wtx.conn())
        .await
        .ctx("list live instances")?;
        let unheld: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT mailbox FROM mailbox_state \
             WHERE lease_owner IS NULL OR lease_expires_at IS NULL OR lease_expires_at < {now} \
             ORDER BY mailbox"
        )))
        .fetch_all(wtx.conn())
        .await
        .ctx("list unheld mailboxes")?;
        wtx.commit().await?;
        let live = rows
            .iter()
            .map(|r| {
                let mailboxes: Option<String> = r.try_get(1).ctx("list live instances")?;
                let held: i64 = r.try_get(2).ctx("list live instances")?;
                Ok(LiveInstance {
                    holder: r.try_get(0).ctx("list live instances")?,
                    mailboxes: mailboxes
                        .map(|m| m.split_whitespace().map(str::to_string).collect()),
                    held: usize::try_from(held).unwrap_or(0),
                })
            })
            .collect::<Result<_, StoreError>>()?;
        Ok(Beat { live, unheld })
    }

    /// The instances that announced themselves, alive or not yet forgotten.
    pub async fn instance_holders(&self) -> Result<Vec<String>, StoreError> {
        let mut conn = self.acquire().await?;
        sqlx::query_scalar("SELECT holder FROM instances ORDER BY holder")
            .fetch_all(&mut *conn)
            .await
            .ctx("list instances")
    }

    /// This instance stops (its mailboxes' leases were released).
    pub async fn instance_leave(&self, holder: &str) -> Result<(), StoreError> {
        let mut wtx = self.begin_write().await?;
        sqlx::query("DELETE FROM instances WHERE holder = $1")
            .bind(holder)
            .execute(wtx.conn())
            .await
            .ctx("remove this instance")?;
        wtx.commit().await
    }
}

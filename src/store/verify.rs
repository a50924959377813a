//! Verification tokens, held requests and expiry: the SQL behind the confirmation pages
//! and the daemon's clean-up.

use sqlx::{AnyConnection, Row};

use crate::address::EmailAddress;
use crate::keys::{DeskKey, RequestKey};

use super::{Context, Store, StoreError};

/// What a token stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    pub account_id: i64,
    pub address: String,
    pub display_name: Option<String>,
    pub account_status: String,
    /// `verification` or `invitation`.
    pub purpose: String,
    pub expires_at: i64,
    pub used_at: Option<i64>,
}

/// A held request waiting for its reporter's confirmation.
#[derive(Debug, Clone)]
pub struct HeldRequest {
    pub id: i64,
    pub key: RequestKey,
    pub desk: DeskKey,
    pub subject: String,
    /// The To/Cc of the message, decided when it is released.
    pub recipients: Vec<(EmailAddress, Option<String>)>,
    /// The ledger row of the message that created it.
    pub ledger_id: Option<i64>,
}

/// Looks up a token by its hash. With `lock`, the account row stays locked until the
/// transaction ends (PostgreSQL), so expiry cannot remove an account being confirmed:
/// both take the account's lock first.
pub async fn token_info(
    conn: &mut AnyConnection,
    token_hash: &str,
    lock: bool,
) -> Result<Option<TokenInfo>, StoreError> {
    let sql = format!(
        "SELECT t.account_id, a.address, a.display_name, a.status, t.purpose, t.expires_at, t.used_at \
         FROM verification_tokens t JOIN accounts a ON a.id = t.account_id WHERE t.token_hash = $1{}",
        if lock {
            super::pg_only(conn, " FOR UPDATE OF a")
        } else {
            ""
        }
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(token_hash)
        .fetch_optional(&mut *conn)
        .await
        .ctx("look up a token")?;
    let Some(row) = row else { return Ok(None) };
    Ok(Some(TokenInfo {
        account_id: row.try_get(0).ctx("read token")?,
        address: row.try_get(1).ctx("read token")?,
        display_name: row.try_get(2).ctx("read token")?,
        account_status: row.try_get(3).ctx("read token")?,
        purpose: row.try_get(4).ctx("read token")?,
        expires_at: row.try_get(5).ctx("read token")?,
        used_at: row.try_get(6).ctx("read token")?,
    }))
}

/// Marks a token used. False when someone used it first (the page was submitted twice).
pub async fn use_token(
    conn: &mut AnyConnection,
    token_hash: &str,
    now: i64,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE verification_tokens SET used_at = $1 WHERE token_hash = $2 AND used_at IS NULL",
    )
    .bind(now)
    .bind(token_hash)
    .execute(&mut *conn)
    .await
    .ctx("use a token")?;
    Ok(done.rows_affected() == 1)
}

/// A pending account becomes active (a deactivated one stays deactivated); a name given
/// on the confirmation page replaces the one from the mail header.
pub async fn activate_account(
    conn: &mut AnyConnection,
    account_id: i64,
    display_name: Option<&str>,
    now: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE accounts SET status = CASE WHEN status = 'pending' THEN 'active' ELSE status END, \
           verified_at = COALESCE(verified_at, $1), display_name = COALESCE($2, display_name), \
           updated_at = $1 WHERE id = $3",
    )
    .bind(now)
    .bind(display_name)
    .bind(account_id)
    .execute(&mut *conn)
    .await
    .ctx("activate an account")?;
    Ok(())
}

/// The held requests an account reported, with the To/Cc they were sent to.
pub async fn held_requests_of(
    conn: &mut AnyConnection,
    account_id: i64,
) -> Result<Vec<HeldRequest>, StoreError> {
    let rows = sqlx::query(
        "SELECT r.id, r.request_key, r.desk, r.subject, \
           (SELECT MIN(l.id) FROM ledger l WHERE l.request_key = r.request_key) \
         FROM requests r WHERE r.reporter_account_id = $1 AND r.status = 'held' ORDER BY r.id",
    )
    .bind(account_id)
    .fetch_all(&mut *conn)
    .await
    .ctx("find held requests")?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let id: i64 = row.try_get(0).ctx("read held request")?;
        let key: String = row.try_get(1).ctx("read held request")?;
        let desk: String = row.try_get(2).ctx("read held request")?;
        let recipients = sqlx::query(
            "SELECT address, display_name FROM held_recipients WHERE request_id = $1 ORDER BY position",
        )
        .bind(id)
        .fetch_all(&mut *conn)
        .await
        .ctx("read held recipients")?
        .iter()
        .filter_map(|r| {
            let a: String = r.try_get(0).ok()?;
            let n: Option<String> = r.try_get(1).ok()?;
            Some((EmailAddress::parse(&a).ok()?, n))
        })
        .collect();
        out.push(HeldRequest {
            id,
            key: RequestKey::parse(&key)
                .map_err(|_| StoreError::Corrupt(format!("request key {key:?}")))?,
            desk: DeskKey::parse(&desk)
                .map_err(|_| StoreError::Corrupt(format!("desk key {desk:?}")))?,
            subject: row.try_get(3).ctx("read held request")?,
            recipients,
            ledger_id: row.try_get(4).ctx("read held request")?,
        });
    }
    Ok(out)
}

/// What the clean-up did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Expired {
    pub requests: Vec<String>,
    pub accounts: Vec<String>,
}

impl Store {
    /// Held requests past their time become `expired`; pending accounts that were sent
    /// nothing for `hold_ttl_secs` and have no request still held are removed (they never
    /// confirmed; writing again starts over). Each gets an audit entry. Every write is
    /// guarded by the status it expects, and accounts are locked first (PostgreSQL), so
    /// a confirmation racing with expiry wins or loses whole.
    pub async fn expire(&self, now: i64, hold_ttl_secs: i64) -> Result<Expired, StoreError> {
        let mut wtx = self.begin_write().await?;
        let conn = wtx.conn();
        let mut out = Expired::default();
        let rows = sqlx::query(
            "SELECT id, request_key, desk, reporter_address FROM requests \
             WHERE status = 'held' AND held_until IS NOT NULL AND held_until <= $1",
        )
        .bind(now)
        .fetch_all(&mut *conn)
        .await
        .ctx("find held requests to expire")?;
        for row in &rows {
            let id: i64 = row.try_get(0).ctx("read request")?;
            let key: String = row.try_get(1).ctx("read request")?;
            let desk: String = row.try_get(2).ctx("read request")?;
            let reporter: String = row.try_get(3).ctx("read request")?;
            let done = sqlx::query(
                "UPDATE requests SET status = 'expired', updated_at = $1 WHERE id = $2 AND status = 'held'",
            )
            .bind(now)
            .bind(id)
            .execute(&mut *conn)
            .await
            .ctx("expire a held request")?;
            if done.rows_affected() == 0 {
                continue; // released by a confirmation meanwhile
            }
            audit_event(
                conn,
                now,
                Some(&desk),
                Some(&key),
                &reporter,
                "requester",
                &format!("{reporter} did not confirm their address in time; {key} expired"),
            )
            .await?;
            out.requests.push(key);
        }
        // The clock restarts with every mail sent to the address: a resent link gets
        // its full time.
        let stale = "status = 'pending' \
             AND (CASE WHEN last_verification_sent_at > created_at \
                  THEN last_verification_sent_at ELSE created_at END) <= $1 \
             AND NOT EXISTS (SELECT 1 FROM requests r WHERE r.reporter_account_id = accounts.id \
                  AND r.status = 'held' AND r.held_until > $2)";
        let accounts = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT id, address FROM accounts WHERE {stale}"
        )))
        .bind(now - hold_ttl_secs)
        .bind(now)
        .fetch_all(&mut *conn)
        .await
        .ctx("find pending accounts to expire")?;
        let lock = format!(
            "SELECT id FROM accounts WHERE id = $3 AND {stale}{}",
            super::pg_only(conn, " FOR UPDATE")
        );
        for row in &accounts {
            let id: i64 = row.try_get(0).ctx("read account")?;
            let address: String = row.try_get(1).ctx("read account")?;
            let still: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(lock.as_str()))
                .bind(now - hold_ttl_secs)
                .bind(now)
                .bind(id)
                .fetch_optional(&mut *conn)
                .await
                .ctx("lock a pending account")?;
            if still.is_none() {
                continue; // confirmed, or written to, meanwhile
            }
            for sql in [
                "UPDATE requests SET reporter_account_id = NULL WHERE reporter_account_id = $1",
                "DELETE FROM participants WHERE account_id = $1",
                "DELETE FROM accounts WHERE id = $1",
            ] {
                sqlx::query(sql)
                    .bind(id)
                    .execute(&mut *conn)
                    .await
                    .ctx("remove an expired pending account")?;
            }
            audit_event(
                conn,
                now,
                None,
                None,
                &address,
                "account",
                &format!(
                    "{address} never confirmed their address; the pending account was removed"
                ),
            )
            .await?;
            out.accounts.push(address);
        }
        wtx.commit().await?;
        Ok(out)
    }
}

/// An audit entry that is not a message's decision (expiry).
async fn audit_event(
    conn: &mut AnyConnection,
    now: i64,
    desk: Option<&str>,
    request: Option<&str>,
    address: &str,
    role: &str,
    explanation: &str,
) -> Result<(), StoreError> {
    let decision = serde_json::json!({
        "action": "expire",
        "reason": "verification_expired",
        "explanation": explanation,
        "desk": desk,
        "request": request,
        "address": address,
    });
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO audit (ledger_id, created_at, desk, action, reason, request_key, decision) \
         VALUES (NULL, $1, $2, 'expire', 'verification_expired', $3, $4) RETURNING id",
    )
    .bind(now)
    .bind(desk)
    .bind(request)
    .bind(decision.to_string())
    .fetch_one(&mut *conn)
    .await
    .ctx("write an audit row")?;
    sqlx::query(
        "INSERT INTO audit_addresses (audit_id, address, role, outcome, reason) \
         VALUES ($1, $2, $3, 'expired', 'verification_expired')",
    )
    .bind(id)
    .bind(address)
    .bind(role)
    .execute(&mut *conn)
    .await
    .ctx("index an audit row")?;
    Ok(())
}

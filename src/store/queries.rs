//! Read models for the CLI and the outbox worker's queue operations.

use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use super::{Backend, Context, Store, StoreError};

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RequestRow {
    pub key: String,
    pub desk: String,
    pub status: String,
    pub reporter: String,
    pub subject: String,
    pub created_at: i64,
    pub participants: i64,
    pub comments: i64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PersonRow {
    pub address: String,
    pub display_name: Option<String>,
    pub kind: String,
    pub status: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CommentRow {
    pub author: String,
    pub body: String,
    pub created_at: i64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AttachmentRow {
    pub filename: String,
    pub content_type: String,
    pub size: i64,
    pub sha256: String,
    /// The comment it came with: its place in the request's comment list, from 1.
    /// `None`: it came with the message that opened the request.
    pub comment: Option<usize>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RequestDetail {
    #[serde(flatten)]
    pub request: RequestRow,
    pub description: String,
    pub held_until: Option<i64>,
    pub participant_list: Vec<PersonRow>,
    pub comment_list: Vec<CommentRow>,
    pub attachments: Vec<AttachmentRow>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AccountRow {
    pub address: String,
    pub display_name: Option<String>,
    pub kind: String,
    pub status: String,
    pub origin: String,
    pub created_at: i64,
    pub organizations: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AuditEntry {
    pub at: i64,
    pub desk: Option<String>,
    pub action: String,
    pub reason: String,
    pub request: Option<String>,
    pub role: String,
    pub outcome: String,
    pub address_reason: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AccountDetail {
    #[serde(flatten)]
    pub account: AccountRow,
    pub verified_at: Option<i64>,
    /// When a permanent bounce of our mail to the address arrived, or a relay refused it
    /// as a recipient: we send it no more mail.
    pub undeliverable_at: Option<i64>,
    /// Temporary failures of our mail to the address.
    pub soft_bounces: i64,
    pub desks: Vec<String>,
    pub reported: Vec<String>,
    pub participating: Vec<String>,
    pub history: Vec<AuditEntry>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LedgerRow {
    pub id: i64,
    pub source: String,
    pub source_ref: String,
    pub desk: Option<String>,
    pub message_id: Option<String>,
    pub action: String,
    pub reason: String,
    pub detail: Option<String>,
    pub request: Option<String>,
    pub sender: Option<String>,
    pub subject: Option<String>,
    pub processed_at: i64,
    pub quarantine_ref: Option<String>,
}

/// One worker's claim on an outbox row: the row, its `attempts` and its lease's end
/// (`next_attempt_at`) as the claim set them. Another claim counts one more attempt and
/// sets its own lease; `outbox retry` resets the attempts, but a claim after it ends its
/// lease at another time: together they name this claim alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxClaim {
    pub id: i64,
    pub attempts: i64,
    pub until: i64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct OutboxRow {
    pub id: i64,
    pub kind: String,
    pub desk: Option<String>,
    pub to: String,
    pub from: String,
    pub subject: String,
    /// Not printed: until sent it may hold a one-time link.
    #[serde(skip_serializing)]
    pub body_text: String,
    #[serde(skip_serializing)]
    pub body_html: Option<String>,
    pub message_id: String,
    pub in_reply_to: Option<String>,
    pub request: Option<String>,
    pub status: String,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub last_error: Option<String>,
    pub created_at: i64,
}

impl OutboxRow {
    /// The claim this row was handed out under ([`Store::claim_outbox`]).
    pub fn claim(&self) -> OutboxClaim {
        OutboxClaim {
            id: self.id,
            attempts: self.attempts,
            until: self.next_attempt_at,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct RequestFilter {
    pub desk: Option<String>,
    pub status: Option<String>,
    pub reporter: Option<String>,
    pub limit: i64,
}

fn request_row(row: &AnyRow) -> Result<RequestRow, StoreError> {
    Ok(RequestRow {
        key: row.try_get(0).ctx("read request")?,
        desk: row.try_get(1).ctx("read request")?,
        status: row.try_get(2).ctx("read request")?,
        reporter: row.try_get(3).ctx("read request")?,
        subject: row.try_get(4).ctx("read request")?,
        created_at: row.try_get(5).ctx("read request")?,
        participants: row.try_get(6).ctx("read request")?,
        comments: row.try_get(7).ctx("read request")?,
    })
}

const REQUEST_COLUMNS: &str = "r.request_key, r.desk, r.status, r.reporter_address, r.subject, r.created_at, \
     (SELECT COUNT(*) FROM participants p WHERE p.request_id = r.id), \
     (SELECT COUNT(*) FROM comments c WHERE c.request_id = r.id)";

fn ledger_row(row: &AnyRow) -> Result<LedgerRow, StoreError> {
    Ok(LedgerRow {
        id: row.try_get(0).ctx("read ledger")?,
        source: row.try_get(1).ctx("read ledger")?,
        source_ref: row.try_get(2).ctx("read ledger")?,
        desk: row.try_get(3).ctx("read ledger")?,
        message_id: row.try_get(4).ctx("read ledger")?,
        action: row.try_get(5).ctx("read ledger")?,
        reason: row.try_get(6).ctx("read ledger")?,
        detail: row.try_get(7).ctx("read ledger")?,
        request: row.try_get(8).ctx("read ledger")?,
        sender: row.try_get(9).ctx("read ledger")?,
        subject: row.try_get(10).ctx("read ledger")?,
        processed_at: row.try_get(11).ctx("read ledger")?,
        quarantine_ref: row.try_get(12).ctx("read ledger")?,
    })
}

const LEDGER_COLUMNS: &str = "id, source, source_ref, desk, message_id, action, reason, detail, \
     request_key, sender, subject, processed_at, quarantine_ref";

fn outbox_row(row: &AnyRow) -> Result<OutboxRow, StoreError> {
    Ok(OutboxRow {
        id: row.try_get(0).ctx("read outbox")?,
        kind: row.try_get(1).ctx("read outbox")?,
        desk: row.try_get(2).ctx("read outbox")?,
        to: row.try_get(3).ctx("read outbox")?,
        from: row.try_get(4).ctx("read outbox")?,
        subject: row.try_get(5).ctx("read outbox")?,
        body_text: row.try_get(6).ctx("read outbox")?,
        message_id: row.try_get(7).ctx("read outbox")?,
        in_reply_to: row.try_get(8).ctx("read outbox")?,
        request: row.try_get(9).ctx("read outbox")?,
        status: row.try_get(10).ctx("read outbox")?,
        attempts: row.try_get(11).ctx("read outbox")?,
        next_attempt_at: row.try_get(12).ctx("read outbox")?,
        last_error: row.try_get(13).ctx("read outbox")?,
        created_at: row.try_get(14).ctx("read outbox")?,
        body_html: row.try_get(15).ctx("read outbox")?,
    })
}

const OUTBOX_COLUMNS: &str = "id, kind, desk, to_address, from_address, subject, body_text, message_id, \
     in_reply_to, request_key, status, attempts, next_attempt_at, last_error, created_at, body_html";

impl Store {
    pub async fn list_requests(&self, f: &RequestFilter) -> Result<Vec<RequestRow>, StoreError> {
        let mut conn = self.acquire().await?;
        let sql = format!(
            "SELECT {REQUEST_COLUMNS} FROM requests r \
             WHERE ($1 = '' OR r.desk = $1) AND ($2 = '' OR r.status = $2) AND ($3 = '' OR r.reporter_address = $3) \
             ORDER BY r.id DESC LIMIT $4"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(f.desk.clone().unwrap_or_default())
            .bind(f.status.clone().unwrap_or_default())
            .bind(f.reporter.clone().unwrap_or_default())
            .bind(if f.limit > 0 { f.limit } else { 100 })
            .fetch_all(&mut *conn)
            .await
            .ctx("list requests")?;
        rows.iter().map(request_row).collect()
    }

    pub async fn show_request(&self, key: &str) -> Result<RequestDetail, StoreError> {
        let mut conn = self.acquire().await?;
        let sql = format!(
            "SELECT {REQUEST_COLUMNS}, r.id, r.description, r.held_until FROM requests r WHERE r.request_key = $1"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(key)
            .fetch_optional(&mut *conn)
            .await
            .ctx("load a request")?
            .ok_or_else(|| StoreError::NotFound(format!("no request {key}")))?;
        let request = request_row(&row)?;
        let id: i64 = row.try_get(8).ctx("read request")?;
        let description: String = row.try_get(9).ctx("read request")?;
        let held_until: Option<i64> = row.try_get(10).ctx("read request")?;
        let participant_list = sqlx::query(
            "SELECT a.address, a.display_name, a.kind, a.status FROM participants p \
             JOIN accounts a ON a.id = p.account_id WHERE p.request_id = $1 ORDER BY a.address",
        )
        .bind(id)
        .fetch_all(&mut *conn)
        .await
        .ctx("load participants")?
        .iter()
        .map(|r| {
            Ok(PersonRow {
                address: r.try_get(0).ctx("read participant")?,
                display_name: r.try_get(1).ctx("read participant")?,
                kind: r.try_get(2).ctx("read participant")?,
                status: r.try_get(3).ctx("read participant")?,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
        let comment_list = sqlx::query(
            "SELECT author_address, body, created_at FROM comments WHERE request_id = $1 ORDER BY id",
        )
        .bind(id)
        .fetch_all(&mut *conn)
        .await
        .ctx("load comments")?
        .iter()
        .map(|r| {
            Ok(CommentRow {
                author: r.try_get(0).ctx("read comment")?,
                body: r.try_get(1).ctx("read comment")?,
                created_at: r.try_get(2).ctx("read comment")?,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
        // A comment's place in the list: comments are listed by id too.
        let attachments = sqlx::query(
            "SELECT a.filename, a.content_type, a.size, a.sha256, \
               (SELECT COUNT(*) FROM comments c WHERE c.request_id = a.request_id AND c.id <= a.comment_id) \
             FROM attachments a WHERE a.request_id = $1 ORDER BY a.id",
        )
        .bind(id)
        .fetch_all(&mut *conn)
        .await
        .ctx("load attachments")?
        .iter()
        .map(|r| {
            let place: Option<i64> = r.try_get(4).ctx("read attachment")?;
            Ok(AttachmentRow {
                filename: r.try_get(0).ctx("read attachment")?,
                content_type: r.try_get(1).ctx("read attachment")?,
                size: r.try_get(2).ctx("read attachment")?,
                sha256: r.try_get(3).ctx("read attachment")?,
                comment: place.filter(|n| *n > 0).map(|n| n as usize),
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(RequestDetail {
            request,
            description,
            held_until,
            participant_list,
            comment_list,
            attachments,
        })
    }

    /// Writes the content of the attachment with SHA-256 `sha256` to `out`, a piece at a
    /// time (see `attachment_chunks`; blobs from before it hold their content whole).
    /// Returns the bytes written.
    pub async fn write_attachment(
        &self,
        sha256: &str,
        out: &mut (dyn std::io::Write + Send),
    ) -> Result<u64, StoreError> {
        let mut conn = self.acquire().await?;
        let whole: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT content FROM attachment_blobs WHERE sha256 = $1")
                .bind(sha256)
                .fetch_optional(&mut *conn)
                .await
                .ctx("read an attachment")?;
        let Some(whole) = whole else {
            return Err(StoreError::NotFound(format!("no attachment {sha256}")));
        };
        let write = |out: &mut (dyn std::io::Write + Send), bytes: &[u8]| {
            out.write_all(bytes)
                .map_err(|e| StoreError::Corrupt(format!("cannot write the attachment: {e}")))
        };
        let mut written = whole.len() as u64;
        write(out, &whole)?;
        let mut seq = 0i64;
        loop {
            let piece: Option<Vec<u8>> = sqlx::query_scalar(
                "SELECT content FROM attachment_chunks WHERE sha256 = $1 AND seq = $2",
            )
            .bind(sha256)
            .bind(seq)
            .fetch_optional(&mut *conn)
            .await
            .ctx("read a piece of an attachment")?;
            let Some(piece) = piece else { break };
            written += piece.len() as u64;
            write(out, &piece)?;
            seq += 1;
        }
        Ok(written)
    }

    pub async fn list_accounts(
        &self,
        kind: Option<&str>,
        status: Option<&str>,
        limit: i64,
    ) -> Result<Vec<AccountRow>, StoreError> {
        let mut conn = self.acquire().await?;
        let rows = sqlx::query(
            "SELECT id, address, display_name, kind, status, origin, created_at FROM accounts \
             WHERE ($1 = '' OR kind = $1) AND ($2 = '' OR status = $2) ORDER BY address LIMIT $3",
        )
        .bind(kind.unwrap_or_default())
        .bind(status.unwrap_or_default())
        .bind(if limit > 0 { limit } else { 1000 })
        .fetch_all(&mut *conn)
        .await
        .ctx("list accounts")?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: i64 = row.try_get(0).ctx("read account")?;
            out.push(account_row(&mut conn, id, row).await?);
        }
        Ok(out)
    }

    pub async fn show_account(&self, address: &str) -> Result<AccountDetail, StoreError> {
        let mut conn = self.acquire().await?;
        let row = sqlx::query(
            "SELECT id, address, display_name, kind, status, origin, created_at, verified_at, undeliverable_at, \
               soft_bounces FROM accounts WHERE address = $1",
        )
        .bind(address)
        .fetch_optional(&mut *conn)
        .await
        .ctx("load an account")?
        .ok_or_else(|| StoreError::NotFound(format!("no account {address}")))?;
        let id: i64 = row.try_get(0).ctx("read account")?;
        let account = account_row(&mut conn, id, &row).await?;
        let desks: Vec<String> = sqlx::query_scalar(
            "SELECT desk FROM desk_customers WHERE account_id = $1 \
             UNION SELECT od.desk FROM organization_desks od JOIN organization_members m \
               ON m.organization_id = od.organization_id WHERE m.account_id = $1 \
             UNION SELECT gd.desk FROM group_desks gd JOIN group_members gm \
               ON gm.group_id = gd.group_id WHERE gm.account_id = $1 ORDER BY 1",
        )
        .bind(id)
        .fetch_all(&mut *conn)
        .await
        .ctx("load desks of an account")?;
        let reported: Vec<String> = sqlx::query_scalar(
            "SELECT request_key FROM requests WHERE reporter_address = $1 ORDER BY id",
        )
        .bind(address)
        .fetch_all(&mut *conn)
        .await
        .ctx("load reported requests")?;
        let participating: Vec<String> = sqlx::query_scalar(
            "SELECT r.request_key FROM participants p JOIN requests r ON r.id = p.request_id \
             WHERE p.account_id = $1 ORDER BY r.id",
        )
        .bind(id)
        .fetch_all(&mut *conn)
        .await
        .ctx("load participations")?;
        let history = audit_for(&mut conn, address).await?;
        Ok(AccountDetail {
            account,
            verified_at: row.try_get(7).ctx("read account")?,
            undeliverable_at: row.try_get(8).ctx("read account")?,
            soft_bounces: row.try_get(9).ctx("read account")?,
            desks,
            reported,
            participating,
            history,
        })
    }

    /// Every decision that touched `address`, oldest first.
    pub async fn audit_for_address(&self, address: &str) -> Result<Vec<AuditEntry>, StoreError> {
        let mut conn = self.acquire().await?;
        audit_for(&mut conn, address).await
    }

    pub async fn list_ledger(
        &self,
        action: Option<&str>,
        limit: i64,
    ) -> Result<Vec<LedgerRow>, StoreError> {
        let mut conn = self.acquire().await?;
        let sql = format!(
            "SELECT {LEDGER_COLUMNS} FROM ledger WHERE ($1 = '' OR action = $1) ORDER BY id DESC LIMIT $2"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(action.unwrap_or_default())
            .bind(if limit > 0 { limit } else { 100 })
            .fetch_all(&mut *conn)
            .await
            .ctx("list the ledger")?;
        rows.iter().map(ledger_row).collect()
    }

    /// Quarantined messages not yet released.
    pub async fn list_quarantine(&self) -> Result<Vec<LedgerRow>, StoreError> {
        let mut conn = self.acquire().await?;
        let sql = format!(
            "SELECT {LEDGER_COLUMNS} FROM ledger WHERE action = 'quarantine' AND released_at IS NULL ORDER BY id"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(&mut *conn)
            .await
            .ctx("list quarantine")?;
        rows.iter().map(ledger_row).collect()
    }

    /// Where a source put a quarantined message (e.g. the IMAP folder and UID it was
    /// moved to).
    pub async fn set_quarantine_ref(
        &self,
        ledger_id: i64,
        reference: &str,
    ) -> Result<(), StoreError> {
        let mut conn = self.write_conn().await?;
        sqlx::query("UPDATE ledger SET quarantine_ref = $1 WHERE id = $2")
            .bind(reference)
            .bind(ledger_id)
            .execute(&mut *conn)
            .await
            .ctx("record where a quarantined message is")?;
        Ok(())
    }

    /// Of the given source references, those the ledger has a record of.
    pub async fn recorded_refs(
        &self,
        source: &str,
        references: &[String],
    ) -> Result<std::collections::HashSet<String>, StoreError> {
        let mut out = std::collections::HashSet::new();
        let mut conn = self.acquire().await?;
        for chunk in references.chunks(500) {
            let sql = format!(
                "SELECT source_ref FROM ledger WHERE source = $1 AND source_ref IN ({})",
                super::placeholders(2, chunk.len())
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(source);
            for r in chunk {
                q = q.bind(r.as_str());
            }
            for row in q
                .fetch_all(&mut *conn)
                .await
                .ctx("find recorded messages")?
            {
                out.insert(row.try_get(0).ctx("read ledger")?);
            }
        }
        Ok(out)
    }

    /// Quarantined messages from `source` whose recorded location is still
    /// `placeholder`: the move to the quarantine folder was never confirmed.
    pub async fn unmoved_quarantine(
        &self,
        source: &str,
        placeholder: &str,
    ) -> Result<Vec<(i64, String)>, StoreError> {
        let mut conn = self.acquire().await?;
        let rows = sqlx::query(
            "SELECT id, source_ref FROM ledger WHERE source = $1 AND action = 'quarantine' \
             AND released_at IS NULL AND quarantine_ref = $2",
        )
        .bind(source)
        .bind(placeholder)
        .fetch_all(&mut *conn)
        .await
        .ctx("find unmoved quarantined messages")?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get(0).ctx("read ledger")?,
                    r.try_get(1).ctx("read ledger")?,
                ))
            })
            .collect()
    }

    /// UIDVALIDITY and the last UID committed for an IMAP mailbox.
    pub async fn mailbox_state(&self, mailbox: &str) -> Result<Option<(i64, i64)>, StoreError> {
        let mut conn = self.acquire().await?;
        let row = sqlx::query("SELECT uidvalidity, last_uid FROM mailbox_state WHERE mailbox = $1")
            .bind(mailbox)
            .fetch_optional(&mut *conn)
            .await
            .ctx("read mailbox progress")?;
        match row {
            Some(r) => {
                let v: Option<i64> = r.try_get(0).ctx("read mailbox progress")?;
                let u: Option<i64> = r.try_get(1).ctx("read mailbox progress")?;
                Ok(v.map(|v| (v, u.unwrap_or(0))))
            }
            None => Ok(None),
        }
    }

    /// Starts a mailbox's progress at `last_uid` (first contact, UIDVALIDITY change); it
    /// is also remembered as the mailbox's first UID ([`Store::mailbox_first_uid`]).
    /// `new_after` (first contact with `start = "new"`) is kept until replaced: `None`
    /// leaves the recorded one.
    pub async fn set_mailbox_state(
        &self,
        mailbox: &str,
        uidvalidity: i64,
        last_uid: i64,
        new_after: Option<i64>,
        now: i64,
    ) -> Result<(), StoreError> {
        let mut wtx = self.begin_write().await?;
        save_mailbox_state(wtx.conn(), mailbox, uidvalidity, last_uid, now).await?;
        sqlx::query(
            "UPDATE mailbox_state SET first_uid = $1, new_after = COALESCE($3, new_after), \
               acked_uid = NULL WHERE mailbox = $2",
        )
        .bind(last_uid)
        .bind(mailbox)
        .bind(new_after)
        .execute(wtx.conn())
        .await
        .ctx("record where mailbox progress starts")?;
        wtx.commit().await
    }

    /// The UID a mailbox's progress started from: everything above it up to the last
    /// UID was committed by us. `None` when it was started before this was recorded.
    pub async fn mailbox_first_uid(&self, mailbox: &str) -> Result<Option<i64>, StoreError> {
        self.mailbox_state_value(mailbox, "first_uid").await
    }

    /// The UID up to which every message of a mailbox is acknowledged, if recorded.
    pub async fn mailbox_acked_uid(&self, mailbox: &str) -> Result<Option<i64>, StoreError> {
        self.mailbox_state_value(mailbox, "acked_uid").await
    }

    /// With `start = "new"`: the newest INTERNALDATE that was in the folder at first
    /// contact (Unix seconds), if it was recorded.
    pub async fn mailbox_new_after(&self, mailbox: &str) -> Result<Option<i64>, StoreError> {
        self.mailbox_state_value(mailbox, "new_after").await
    }

    /// A Maildir mailbox: when intake first watched it (Unix seconds), recorded as its
    /// `new_after` on the first call (`since`: now). Mail delivered before then that
    /// another program moved to `cur/` was never meant for intake, and the sweep of
    /// `cur/` leaves it be.
    pub async fn maildir_watched_since(
        &self,
        mailbox: &str,
        since: i64,
    ) -> Result<i64, StoreError> {
        let mut wtx = self.begin_write().await?;
        let recorded: Option<i64> = sqlx::query_scalar(
            "INSERT INTO mailbox_state (mailbox, updated_at, new_after) VALUES ($1, $2, $3) \
             ON CONFLICT (mailbox) DO UPDATE SET \
               new_after = COALESCE(mailbox_state.new_after, excluded.new_after) \
             RETURNING new_after",
        )
        .bind(mailbox)
        .bind(crate::now())
        .bind(since)
        .fetch_one(wtx.conn())
        .await
        .ctx("record when the mailbox was first watched")?;
        wtx.commit().await?;
        Ok(recorded.unwrap_or(since))
    }

    /// One optional number of a mailbox's progress row (`column` is ours, not input).
    async fn mailbox_state_value(
        &self,
        mailbox: &str,
        column: &'static str,
    ) -> Result<Option<i64>, StoreError> {
        let mut conn = self.acquire().await?;
        let value: Option<Option<i64>> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT {column} FROM mailbox_state WHERE mailbox = $1"
        )))
        .bind(mailbox)
        .fetch_optional(&mut *conn)
        .await
        .ctx("read mailbox progress")?;
        Ok(value.flatten())
    }

    pub async fn mark_released(&self, ledger_id: i64, now: i64) -> Result<(), StoreError> {
        let mut conn = self.write_conn().await?;
        sqlx::query("UPDATE ledger SET released_at = $1 WHERE id = $2")
            .bind(now)
            .bind(ledger_id)
            .execute(&mut *conn)
            .await
            .ctx("mark a quarantined message released")?;
        Ok(())
    }

    /// Counts of ledger rows by action and reason, for summaries.
    pub async fn ledger_counts(&self) -> Result<Vec<(String, String, i64)>, StoreError> {
        let mut conn = self.acquire().await?;
        let rows = sqlx::query(
            "SELECT action, reason, COUNT(*) FROM ledger GROUP BY action, reason ORDER BY action, reason",
        )
        .fetch_all(&mut *conn)
        .await
        .ctx("count the ledger")?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get(0).ctx("read counts")?,
                    r.try_get(1).ctx("read counts")?,
                    r.try_get(2).ctx("read counts")?,
                ))
            })
            .collect()
    }

    pub async fn list_outbox(
        &self,
        status: Option<&str>,
        limit: i64,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        let mut conn = self.acquire().await?;
        let sql = format!(
            "SELECT {OUTBOX_COLUMNS} FROM outbox WHERE ($1 = '' OR status = $1) ORDER BY id DESC LIMIT $2"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(status.unwrap_or_default())
            .bind(if limit > 0 { limit } else { 100 })
            .fetch_all(&mut *conn)
            .await
            .ctx("list the outbox")?;
        rows.iter().map(outbox_row).collect()
    }

    /// Claims up to `limit` due outbox rows for sending: they are marked `sending` with a
    /// lease (`next_attempt_at = now + lease_secs`), so a worker that dies mid-send leaves
    /// them to be picked up again when the lease runs out. On PostgreSQL concurrent
    /// workers skip each other's rows (`FOR UPDATE SKIP LOCKED`).
    pub async fn claim_outbox(
        &self,
        limit: i64,
        now: i64,
        lease_secs: i64,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        let mut wtx = self.begin_write().await?;
        let lock = match self.backend {
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        };
        let sql = format!(
            "SELECT {OUTBOX_COLUMNS} FROM outbox WHERE status IN ('pending', 'sending') \
             AND next_attempt_at <= $1 ORDER BY next_attempt_at, id LIMIT $2{lock}"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(now)
            .bind(limit)
            .fetch_all(wtx.conn())
            .await
            .ctx("find due outgoing mail")?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut r = outbox_row(row)?;
            sqlx::query(
                "UPDATE outbox SET status = 'sending', attempts = attempts + 1, next_attempt_at = $1 WHERE id = $2",
            )
            .bind(now + lease_secs)
            .bind(r.id)
            .execute(wtx.conn())
            .await
            .ctx("claim outgoing mail")?;
            r.attempts += 1;
            r.next_attempt_at = now + lease_secs;
            r.status = "sending".into();
            out.push(r);
        }
        wtx.commit().await?;
        Ok(out)
    }

    /// Due mail to an address marked undeliverable since it was queued (a permanent
    /// bounce of other mail, while this one waited for a retry) would only bounce too:
    /// it goes dead unsent. Run once per outbox pass, before its claims.
    pub async fn outbox_drop_undeliverable(&self, now: i64) -> Result<u64, StoreError> {
        let mut conn = self.write_conn().await?;
        let done = sqlx::query(
            "UPDATE outbox SET status = 'dead', \
               last_error = 'not sent: the address was marked undeliverable (a permanent bounce or refusal)' \
             WHERE status IN ('pending', 'sending') AND next_attempt_at <= $1 \
               AND EXISTS (SELECT 1 FROM accounts a WHERE a.address = outbox.to_address \
                 AND a.undeliverable_at IS NOT NULL)",
        )
        .bind(now)
        .execute(&mut *conn)
        .await
        .ctx("drop mail to undeliverable addresses")?;
        Ok(done.rows_affected())
    }

    /// Whether the claim `claim` (the row's `attempts` once claimed, see [`OutboxClaim`])
    /// is still this worker's and has not run out at `now`: checked before sending, so a
    /// worker that was frozen past its lease does not send what another has claimed.
    pub async fn outbox_claim_holds(
        &self,
        claim: OutboxClaim,
        now: i64,
    ) -> Result<bool, StoreError> {
        let mut conn = self.acquire().await?;
        let held: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT id FROM outbox WHERE {CLAIM_HELD} AND next_attempt_at > $4"
        )))
        .bind(claim.id)
        .bind(claim.attempts)
        .bind(claim.until)
        .bind(now)
        .fetch_optional(&mut *conn)
        .await
        .ctx("check a claim on outgoing mail")?;
        Ok(held.is_some())
    }

    /// Marks a mail sent. The body of mail carrying a one-time link is cleared: the token
    /// must not outlive its delivery in the database. False (nothing changed) when the
    /// claim had passed to another worker meanwhile.
    pub async fn outbox_sent(&self, claim: OutboxClaim, now: i64) -> Result<bool, StoreError> {
        let mut conn = self.write_conn().await?;
        let done = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE outbox SET status = 'sent', sent_at = $4, last_error = NULL, \
               body_text = CASE WHEN kind IN ('verification', 'invitation') \
                 THEN '(sent; the one-time link is not kept)' ELSE body_text END, \
               body_html = CASE WHEN kind IN ('verification', 'invitation') THEN NULL ELSE body_html END \
             WHERE {CLAIM_HELD}"
        )))
        .bind(claim.id)
        .bind(claim.attempts)
        .bind(claim.until)
        .bind(now)
        .execute(&mut *conn)
        .await
        .ctx("mark mail sent")?;
        Ok(done.rows_affected() > 0)
    }

    /// Records a failed attempt: retried at `retry_at`, or `dead` when `retry_at` is None.
    /// False (nothing changed) when the claim had passed to another worker meanwhile: its
    /// outcome, perhaps `sent`, stands.
    pub async fn outbox_failed(
        &self,
        claim: OutboxClaim,
        error: &str,
        retry_at: Option<i64>,
    ) -> Result<bool, StoreError> {
        let mut conn = self.write_conn().await?;
        match retry_at {
            Some(at) => {
                let done = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "UPDATE outbox SET status = 'pending', next_attempt_at = $4, last_error = $5 \
                     WHERE {CLAIM_HELD}"
                )))
                .bind(claim.id)
                .bind(claim.attempts)
                .bind(claim.until)
                .bind(at)
                .bind(error.chars().take(1000).collect::<String>())
                .execute(&mut *conn)
                .await
                .ctx("record a failed send")?;
                Ok(done.rows_affected() > 0)
            }
            None => outbox_dead(&mut conn, claim, error).await,
        }
    }

    /// Records that the relay refused a mail's recipient for good: the mail is dead and
    /// the account at `to` (the row's address) is marked undeliverable, as a permanent
    /// bounce marks it, so no more invitations or verification mail are queued for it.
    pub async fn outbox_refused(
        &self,
        claim: OutboxClaim,
        to: &str,
        error: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let mut wtx = self.begin_write().await?;
        let held = outbox_dead(wtx.conn(), claim, error).await?;
        // The refusal stands whoever holds the mail now: the address is undeliverable.
        super::bounce::mark_undeliverable(wtx.conn(), to, now).await?;
        wtx.commit().await?;
        Ok(held)
    }

    /// Takes back refusals believed before the relay was suspected (see the outbox's
    /// `REFUSED_IN_A_ROW`): each (address, outbox id, when marked) — the account's mark,
    /// if it is still the one made then, is cleared, and the mail, if still dead, is
    /// due again at `retry_at`. Returns how many mails were revived.
    pub async fn outbox_unrefuse(
        &self,
        marks: &[(String, i64, i64)],
        retry_at: i64,
        now: i64,
    ) -> Result<u64, StoreError> {
        let mut wtx = self.begin_write().await?;
        let mut revived = 0;
        for (address, id, at) in marks {
            sqlx::query(
                "UPDATE accounts SET undeliverable_at = NULL, updated_at = $1 \
                 WHERE address = $2 AND undeliverable_at = $3",
            )
            .bind(now)
            .bind(address)
            .bind(at)
            .execute(wtx.conn())
            .await
            .ctx("take back an undeliverable mark")?;
            revived += sqlx::query(
                "UPDATE outbox SET status = 'pending', next_attempt_at = $1 \
                 WHERE id = $2 AND status = 'dead'",
            )
            .bind(retry_at)
            .bind(id)
            .execute(wtx.conn())
            .await
            .ctx("retry mail refused by a suspect relay")?
            .rows_affected();
        }
        wtx.commit().await?;
        Ok(revived)
    }

    /// Gives a claimed mail back unsent (a worker stopping before it got to it, a relay
    /// that was unavailable): pending again, due at `now`, and the attempt the claim
    /// counted is not counted. `error`, when given, becomes its last error, so `outbox
    /// list` says why it waits. False when the claim had passed to another worker.
    pub async fn outbox_release(
        &self,
        claim: OutboxClaim,
        now: i64,
        error: Option<&str>,
    ) -> Result<bool, StoreError> {
        let mut conn = self.write_conn().await?;
        let done = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE outbox SET status = 'pending', attempts = attempts - 1, next_attempt_at = $4, \
               last_error = COALESCE($5, last_error) WHERE {CLAIM_HELD}"
        )))
        .bind(claim.id)
        .bind(claim.attempts)
        .bind(claim.until)
        .bind(now)
        .bind(error)
        .execute(&mut *conn)
        .await
        .ctx("give back a claim on outgoing mail")?;
        Ok(done.rows_affected() > 0)
    }

    /// Puts dead (or all failed) mail back in the queue. Returns how many rows changed.
    pub async fn outbox_retry(&self, id: Option<i64>, now: i64) -> Result<u64, StoreError> {
        let mut conn = self.write_conn().await?;
        let done = sqlx::query(
            "UPDATE outbox SET status = 'pending', attempts = 0, next_attempt_at = $1 \
             WHERE status = 'dead' AND ($2 < 0 OR id = $2)",
        )
        .bind(now)
        .bind(id.unwrap_or(-1))
        .execute(&mut *conn)
        .await
        .ctx("retry dead mail")?;
        Ok(done.rows_affected())
    }

    /// Deletes mail sent before `before`, [`PRUNE_CHUNK`] rows per statement so no
    /// statement holds the outbox long. Returns how many rows went.
    pub async fn prune_sent(&self, before: i64) -> Result<u64, StoreError> {
        let mut deleted = 0;
        loop {
            let mut conn = self.write_conn().await?;
            let done = sqlx::query(
                "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox \
                 WHERE status = 'sent' AND sent_at < $1 ORDER BY sent_at LIMIT $2)",
            )
            .bind(before)
            .bind(PRUNE_CHUNK)
            .execute(&mut *conn)
            .await
            .ctx("delete old sent mail")?;
            deleted += done.rows_affected();
            if done.rows_affected() < PRUNE_CHUNK as u64 {
                return Ok(deleted);
            }
        }
    }

    /// Pending outbox rows (for metrics and shutdown).
    pub async fn outbox_depth(&self) -> Result<i64, StoreError> {
        let mut conn = self.acquire().await?;
        sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE status IN ('pending', 'sending')")
            .fetch_one(&mut *conn)
            .await
            .ctx("count the outbox")
    }
}

/// Sent mail deleted per statement by [`Store::prune_sent`].
const PRUNE_CHUNK: i64 = 5_000;

async fn account_row(
    conn: &mut AnyConnection,
    id: i64,
    row: &AnyRow,
) -> Result<AccountRow, StoreError> {
    let organizations: Vec<String> = sqlx::query_scalar(
        "SELECT o.name FROM organization_members m JOIN organizations o ON o.id = m.organization_id \
         WHERE m.account_id = $1 ORDER BY o.name",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await
    .ctx("load organizations of an account")?;
    Ok(AccountRow {
        address: row.try_get(1).ctx("read account")?,
        display_name: row.try_get(2).ctx("read account")?,
        kind: row.try_get(3).ctx("read account")?,
        status: row.try_get(4).ctx("read account")?,
        origin: row.try_get(5).ctx("read account")?,
        created_at: row.try_get(6).ctx("read account")?,
        organizations,
    })
}

async fn audit_for(conn: &mut AnyConnection, address: &str) -> Result<Vec<AuditEntry>, StoreError> {
    let rows = sqlx::query(
        "SELECT a.created_at, a.desk, a.action, a.reason, a.request_key, x.role, x.outcome, x.reason \
         FROM audit_addresses x JOIN audit a ON a.id = x.audit_id WHERE x.address = $1 ORDER BY a.id",
    )
    .bind(address)
    .fetch_all(&mut *conn)
    .await
    .ctx("load the audit trail")?;
    rows.iter()
        .map(|r| {
            Ok(AuditEntry {
                at: r.try_get(0).ctx("read audit")?,
                desk: r.try_get(1).ctx("read audit")?,
                action: r.try_get(2).ctx("read audit")?,
                reason: r.try_get(3).ctx("read audit")?,
                request: r.try_get(4).ctx("read audit")?,
                role: r.try_get(5).ctx("read audit")?,
                outcome: r.try_get(6).ctx("read audit")?,
                address_reason: r.try_get(7).ctx("read audit")?,
            })
        })
        .collect()
}

/// The condition that an outbox row is still under an [`OutboxClaim`], bound as $1 (id),
/// $2 (attempts) and $3 (until).
const CLAIM_HELD: &str =
    "id = $1 AND status = 'sending' AND attempts = $2 AND next_attempt_at = $3";

/// Marks a claimed mail dead with `error`. Dead mail keeps its body (and link, which
/// expires on its own) so that `outbox retry` can send it once the cause is fixed.
/// False (nothing changed) when the claim had passed to another worker.
async fn outbox_dead(
    conn: &mut AnyConnection,
    claim: OutboxClaim,
    error: &str,
) -> Result<bool, StoreError> {
    let done = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE outbox SET status = 'dead', last_error = $4 WHERE {CLAIM_HELD}"
    )))
    .bind(claim.id)
    .bind(claim.attempts)
    .bind(claim.until)
    .bind(error.chars().take(1000).collect::<String>())
    .execute(&mut *conn)
    .await
    .ctx("record a mail as dead")?;
    Ok(done.rows_affected() > 0)
}

/// Records a mailbox's progress on the caller's transaction.
/// Records that every message of `mailbox` up to `acked_uid` is acknowledged (never
/// lowered, and only under the same UIDVALIDITY).
pub async fn save_mailbox_acked(
    conn: &mut AnyConnection,
    mailbox: &str,
    uidvalidity: i64,
    acked_uid: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE mailbox_state SET acked_uid = $3 WHERE mailbox = $1 AND uidvalidity = $2 \
         AND (acked_uid IS NULL OR acked_uid < $3)",
    )
    .bind(mailbox)
    .bind(uidvalidity)
    .bind(acked_uid)
    .execute(&mut *conn)
    .await
    .ctx("record how far a mailbox is acknowledged")?;
    Ok(())
}

pub async fn save_mailbox_state(
    conn: &mut AnyConnection,
    mailbox: &str,
    uidvalidity: i64,
    last_uid: i64,
    now: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO mailbox_state (mailbox, uidvalidity, last_uid, updated_at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (mailbox) DO UPDATE SET uidvalidity = excluded.uidvalidity, \
           last_uid = excluded.last_uid, updated_at = excluded.updated_at",
    )
    .bind(mailbox)
    .bind(uidvalidity)
    .bind(last_uid)
    .bind(now)
    .execute(&mut *conn)
    .await
    .ctx("record mailbox progress")?;
    Ok(())
}

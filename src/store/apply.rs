//! Applying a [`Decision`]: accounts, request or comment, participants, attachments,
//! tokens, outbox rows, the audit row and the ledger outcome, all on the caller's
//! transaction so they commit (or vanish) together.

use std::collections::{HashMap, HashSet};

use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::{AnyConnection, Row};

use crate::address::EmailAddress;
use crate::keys::{DeskKey, RequestKey};
use crate::message::InboundMessage;
use crate::policy::{
    AccountKind, AccountStatus, Action, Decision, EmailIntent, EmailKind, MailCounts,
    ParticipantOutcome, Reason,
};

use super::directory::DirectoryIndex;
use super::facts::Known;
use super::{Context, StoreError, placeholders};

/// Where a message came from: `maildir:inbox` + file name, `stdin` + a hash, ...
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceRef {
    pub source: String,
    pub reference: String,
}

/// What a template needs to write one mail.
#[derive(Debug, Clone)]
pub struct MailContext<'a> {
    pub kind: EmailKind,
    pub desk: &'a DeskKey,
    pub to: &'a EmailAddress,
    pub display_name: Option<&'a str>,
    pub request: Option<&'a RequestKey>,
    /// Subject of the message that caused the mail.
    pub original_subject: Option<&'a str>,
    /// The confirmation token for verification and invitation mail (never stored).
    pub token: Option<&'a str>,
    /// Why, for rejection notices.
    pub about: Option<Reason>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedMail {
    pub from: String,
    pub subject: String,
    pub body_text: String,
    /// An HTML alternative, when the template has one.
    pub body_html: Option<String>,
}

/// Writes outgoing mail; implemented by the outbox module's templates.
pub trait MailRenderer: Send + Sync {
    fn render(&self, ctx: &MailContext<'_>) -> RenderedMail;
    /// Domain of the Message-IDs we generate.
    fn message_id_domain(&self) -> &str;
    /// How long a verification or invitation link stays valid, in seconds.
    fn token_ttl_secs(&self) -> i64;
}

/// What applying changed, for logs and metrics.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyResult {
    pub request: Option<RequestKey>,
    pub accounts_created: Vec<(EmailAddress, AccountKind)>,
    pub emails_queued: usize,
}

/// A quarantined message's ledger row.
#[derive(Debug, Clone)]
pub struct QuarantineRecord {
    pub source: SourceRef,
    pub reason: Reason,
    pub detail: String,
    pub content_hash: String,
    pub size: u64,
    pub message_id: Option<String>,
    pub sender: Option<String>,
    pub subject: Option<String>,
    /// Where the message now is (file path, or IMAP folder and UID).
    pub quarantine_ref: String,
}

/// The key that makes a message unique per desk: its Message-ID when it has one (the
/// same message delivered twice differs in its Received headers), else its content.
pub fn dedupe_key(desk: Option<&DeskKey>, msg: &InboundMessage, content_hash: &str) -> String {
    let desk = desk.map(DeskKey::as_str).unwrap_or("-");
    match &msg.message_id {
        Some(id) => format!("{desk}:mid:{id}"),
        None => format!("{desk}:sha:{content_hash}"),
    }
}

/// Inserts the ledger row that claims `msg` for `desk`. `None` means it was already
/// processed: the caller treats it as a duplicate and changes nothing else.
pub async fn claim_ledger(
    conn: &mut AnyConnection,
    source: &SourceRef,
    msg: &InboundMessage,
    content_hash: &str,
    desk: Option<&DeskKey>,
    now: i64,
) -> Result<Option<i64>, StoreError> {
    let item = ClaimItem {
        source,
        msg,
        content_hash,
        desk,
    };
    let mut claimed = claim_ledger_batch(conn, std::slice::from_ref(&item), now).await?;
    Ok(claimed.pop().flatten())
}

/// What [`claim_ledger_batch`] claims for one message.
pub struct ClaimItem<'a> {
    pub source: &'a SourceRef,
    pub msg: &'a InboundMessage,
    pub content_hash: &'a str,
    pub desk: Option<&'a DeskKey>,
}

/// [`claim_ledger`] for many messages in one statement per [`CHUNK`], in order: the
/// result has one entry per item, `None` for a message already processed — before, or
/// earlier in `items` (the first of two copies claims it).
pub async fn claim_ledger_batch(
    conn: &mut AnyConnection,
    items: &[ClaimItem<'_>],
    now: i64,
) -> Result<Vec<Option<i64>>, StoreError> {
    let keys: Vec<String> = items
        .iter()
        .map(|i| dedupe_key(i.desk, i.msg, i.content_hash))
        .collect();
    let mut claimed: HashMap<String, i64> = HashMap::with_capacity(items.len());
    // Inserted in key order, so the rows' locks are taken in one order by every
    // instance: two batches claiming overlapping messages (one message in two mailboxes)
    // wait for each other instead of deadlocking. Results are matched by key.
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by(|a, b| keys[*a].cmp(&keys[*b]));
    for part in order.chunks(CHUNK) {
        let sql = format!(
            "INSERT INTO ledger (source, source_ref, desk, message_id, content_hash, dedupe_key, \
               action, reason, sender, subject, size, processed_at) \
             VALUES {} ON CONFLICT (dedupe_key) DO NOTHING RETURNING id, dedupe_key",
            values_list(conn, part.len(), 12)
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for &ix in part {
            let (i, key) = (&items[ix], &keys[ix]);
            q = q
                .bind(&i.source.source)
                .bind(&i.source.reference)
                .bind(i.desk.map(DeskKey::as_str))
                .bind(i.msg.message_id.as_deref())
                .bind(i.content_hash)
                .bind(key.as_str())
                .bind("pending")
                .bind("pending")
                .bind(i.msg.from_mailbox().map(|m| m.address.as_str()))
                .bind(i.msg.subject.as_deref())
                .bind(i.msg.size as i64)
                .bind(now);
        }
        for row in q
            .fetch_all(&mut *conn)
            .await
            .ctx("claim messages in the ledger")?
        {
            let id: i64 = row.try_get(0).ctx("read ledger id")?;
            let key: String = row.try_get(1).ctx("read ledger id")?;
            claimed.insert(key, id);
        }
    }
    // Only the first item with a key gets its row.
    Ok(keys.iter().map(|k| claimed.remove(k)).collect())
}

/// Records a quarantined message. Quarantining the same content again (after a crash
/// before the source was acknowledged, or after a release that failed again) updates the
/// existing row instead of adding one.
pub async fn record_quarantine(
    conn: &mut AnyConnection,
    rec: &QuarantineRecord,
    now: i64,
) -> Result<i64, StoreError> {
    sqlx::query_scalar(
        "INSERT INTO ledger (source, source_ref, message_id, content_hash, dedupe_key, action, reason, \
           detail, sender, subject, size, processed_at, quarantine_ref) \
         VALUES ($1, $2, $3, $4, $5, 'quarantine', $6, $7, $8, $9, $10, $11, $12) \
         ON CONFLICT (dedupe_key) DO UPDATE SET reason = excluded.reason, detail = excluded.detail, \
           processed_at = excluded.processed_at, quarantine_ref = excluded.quarantine_ref, \
           source = excluded.source, source_ref = excluded.source_ref, released_at = NULL \
         RETURNING id",
    )
    .bind(&rec.source.source)
    .bind(&rec.source.reference)
    .bind(rec.message_id.as_deref())
    .bind(&rec.content_hash)
    .bind(format!("quarantine:{}", rec.content_hash))
    .bind(rec.reason.code())
    .bind(&rec.detail)
    .bind(rec.sender.as_deref())
    .bind(rec.subject.as_deref())
    .bind(rec.size as i64)
    .bind(now)
    .bind(&rec.quarantine_ref)
    .fetch_one(&mut *conn)
    .await
    .ctx("record the quarantined message")
}

/// Everything `apply` needs besides the connection.
pub struct ApplyInput<'a> {
    pub msg: &'a InboundMessage,
    pub decision: &'a Decision,
    /// Ids found while gathering the facts.
    pub known: &'a Known,
    /// The message's ledger row (for a release: the held message's, if known).
    pub ledger_id: Option<i64>,
    /// How long a request created held waits for its reporter's confirmation.
    pub hold_ttl_secs: i64,
    pub now: i64,
    pub orgs: &'a DirectoryIndex,
    pub renderer: &'a dyn MailRenderer,
}

/// `($1, $2, ...), (...)`: placeholders for a multi-row VALUES list of `rows` rows of
/// `cols` columns, for a statement with no other parameters.
///
/// On SQLite they are plain `?`: sqlx looks up every *named* parameter by name, which is
/// linear in the number of parameters, so a 1,000-parameter statement with `$N` spends
/// most of its time in `sqlite3_bind_parameter_name`.
fn values_list(conn: &AnyConnection, rows: usize, cols: usize) -> String {
    let sqlite = conn.backend_name().eq_ignore_ascii_case("sqlite");
    let mut s = String::with_capacity(rows * cols * 5);
    let mut n = 1;
    for r in 0..rows {
        if r > 0 {
            s.push_str(", ");
        }
        s.push('(');
        for c in 0..cols {
            if c > 0 {
                s.push_str(", ");
            }
            if sqlite {
                s.push('?');
            } else {
                s.push('$');
                s.push_str(&n.to_string());
            }
            n += 1;
        }
        s.push(')');
    }
    s
}

/// An account the decision creates.
struct NewAccount<'a> {
    address: &'a EmailAddress,
    display_name: Option<&'a str>,
    kind: AccountKind,
    status: AccountStatus,
}

/// Rows every message produces that nothing later in the same batch reads — the ledger
/// outcome, the audit row and outgoing mail — collected and written with one statement
/// each per batch instead of per message.
///
/// Made with [`Deferred::holding_rows`], it also holds the accounts and requests the
/// batch creates, with ids reserved ahead ([`IdPool`]), so a message costs no statement of
/// its own. Whatever reads them first writes them ([`Deferred::flush_threads`]): finding
/// the request a reply belongs to, looking up a person again ([`Deferred::holds_account_for`]),
/// attachments and held recipients (which refer to the request), a delivery report.
#[derive(Debug, Default)]
pub struct Deferred {
    /// Accounts and requests wait for the flush (else they are written at once).
    hold_rows: bool,
    account_ids: IdPool,
    request_ids: IdPool,
    /// Accounts to create, by address; written before anything that refers to them.
    accounts: Vec<AccountInsert>,
    pending_accounts: HashMap<String, i64>,
    /// New accounts joining the organizations of their domains: (organization, account).
    joins: Vec<(i64, i64)>,
    requests: Vec<RequestInsert>,
    /// Bytes of request text held, so a batch of long messages is written early.
    held_bytes: usize,
    /// Request numbers handed out in this batch: desk → last number. Read once per desk
    /// and batch, written back at the flush.
    counters: HashMap<String, i64>,
    outcomes: Vec<(i64, &'static str, &'static str, Option<String>, String)>,
    /// Mail queued in the last hour before this batch started (read when first needed).
    hour_base: Option<u32>,
    /// Mail of this batch already flushed (careful mode flushes message by message).
    flushed_mail: u32,
    /// Verification tokens: (hash, account, purpose, created, expires).
    tokens: Vec<(String, i64, &'static str, i64, i64)>,
    audits: Vec<AuditRow>,
    outbox: Vec<OutboxRowInsert>,
    /// Participants: (request, account, added at).
    participants: Vec<(i64, i64, i64)>,
    /// Message-IDs that thread into requests: (desk, Message-ID, request, direction).
    /// Read by the next message that is a reply: [`Deferred::flush_threads`] first.
    thread_refs: Vec<(String, String, i64, &'static str)>,
    /// Mail to each address in the 24 hours before the batch, for the addresses
    /// [`Deferred::prefetch_mail_counts`] counted, plus what this batch flushed since.
    day_counts: HashMap<String, u32>,
}

/// One index entry of an audit row: address, role, outcome, reason.
type AuditAddress = (String, &'static str, &'static str, &'static str);

#[derive(Debug)]
struct AuditRow {
    ledger_id: Option<i64>,
    created_at: i64,
    desk: Option<String>,
    action: &'static str,
    reason: &'static str,
    request_key: Option<String>,
    decision: String,
    /// The facts the decision was made on (`intake simulate`), for message decisions.
    facts: Option<String>,
    addresses: Vec<AuditAddress>,
}

#[derive(Debug)]
struct OutboxRowInsert {
    kind: &'static str,
    desk: String,
    to: String,
    from: String,
    subject: String,
    body: String,
    html: Option<String>,
    message_id: String,
    in_reply_to: Option<String>,
    request_key: Option<String>,
    now: i64,
    ledger_id: Option<i64>,
}

#[derive(Debug)]
struct AccountInsert {
    id: i64,
    address: String,
    display_name: Option<String>,
    kind: AccountKind,
    status: AccountStatus,
    now: i64,
    verification_sent_at: Option<i64>,
}

#[derive(Debug)]
struct RequestInsert {
    id: i64,
    key: String,
    desk: String,
    number: i64,
    reporter: String,
    reporter_id: Option<i64>,
    subject: String,
    description: String,
    held_until: Option<i64>,
    now: i64,
}

/// Ids reserved for rows not written yet. PostgreSQL: taken from the table's identity
/// sequence a block at a time (other instances take theirs from the same sequence);
/// SQLite: counted up from the highest id, which holds because the write transaction
/// excludes every other writer and every insert into the table in it takes its id here.
#[derive(Debug, Default)]
struct IdPool {
    /// Reserved and unused, the next one last.
    free: Vec<i64>,
    /// SQLite: the next id (once read).
    next: Option<i64>,
    /// PostgreSQL: how many to reserve per round trip (0: [`ID_BLOCK`]).
    block: i64,
}

/// At most this many ids are reserved from PostgreSQL's sequence per round trip
/// (unused ones are simply skipped).
const ID_BLOCK: i64 = 64;

/// Request text held before the pending rows are written anyway.
const HELD_BYTES: usize = 4 << 20;

impl IdPool {
    fn with_block(block: i64) -> IdPool {
        IdPool {
            block,
            ..IdPool::default()
        }
    }

    async fn take(
        &mut self,
        conn: &mut AnyConnection,
        table: &'static str,
    ) -> Result<i64, StoreError> {
        if conn.backend_name().eq_ignore_ascii_case("sqlite") {
            let next = match self.next {
                Some(n) => n,
                None => {
                    let sql = format!("SELECT COALESCE(MAX(id), 0) FROM {table}");
                    let max: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                        .fetch_one(&mut *conn)
                        .await
                        .ctx("reserve ids")?;
                    max + 1
                }
            };
            self.next = Some(next + 1);
            return Ok(next);
        }
        if self.free.is_empty() {
            let mut ids: Vec<i64> = sqlx::query_scalar(
                "SELECT nextval(pg_get_serial_sequence($1, 'id')) FROM generate_series(1, $2)",
            )
            .bind(table)
            .bind(if self.block > 0 { self.block } else { ID_BLOCK })
            .fetch_all(&mut *conn)
            .await
            .ctx("reserve ids")?;
            ids.sort_unstable_by(|a, b| b.cmp(a));
            self.free = ids;
        }
        self.free
            .pop()
            .ok_or_else(|| StoreError::Corrupt("the id sequence returned nothing".into()))
    }
}

/// Rows per multi-row statement, well under SQLite's and PostgreSQL's parameter limits.
pub(super) const CHUNK: usize = 400;

impl Deferred {
    /// A `Deferred` that also holds the accounts and requests the batch creates until
    /// something reads them (see [`Deferred`]). Only for a batch run straight through: an
    /// account another instance created meanwhile fails the flush
    /// ([`StoreError::Conflict`]), and the batch is run again with a plain `Deferred`,
    /// which writes them at once and takes the other's account.
    /// `messages`: how many the batch has, so PostgreSQL ids are reserved in blocks
    /// that fit it (a message arriving alone under IDLE takes one, not 64).
    pub fn holding_rows(messages: usize) -> Deferred {
        let block = i64::try_from(messages)
            .unwrap_or(ID_BLOCK)
            .clamp(1, ID_BLOCK);
        Deferred {
            hold_rows: true,
            account_ids: IdPool::with_block(block),
            request_ids: IdPool::with_block(block),
            ..Deferred::default()
        }
    }

    /// Whether an account for one of `msg`'s addresses is waiting to be written (looking
    /// them up again must see it: flush first).
    pub fn holds_account_for(&self, msg: &InboundMessage) -> bool {
        !self.pending_accounts.is_empty()
            && msg
                .from_mailbox()
                .into_iter()
                .chain(msg.recipients())
                .any(|m| self.pending_accounts.contains_key(m.address.as_str()))
    }

    /// Writes the accounts and requests waiting, and the organization memberships of the
    /// accounts.
    async fn flush_rows(&mut self, conn: &mut AnyConnection) -> Result<(), StoreError> {
        let mut accounts = std::mem::take(&mut self.accounts);
        // In one order everywhere, so two instances inserting overlapping accounts wait
        // for each other instead of deadlocking.
        accounts.sort_unstable_by(|a, b| a.address.cmp(&b.address));
        for chunk in accounts.chunks(CHUNK) {
            let sql = format!(
                "INSERT INTO accounts (id, address, display_name, kind, status, origin, created_at, \
                   updated_at, last_verification_sent_at) \
                 VALUES {} ON CONFLICT (address) DO NOTHING RETURNING id",
                values_list(conn, chunk.len(), 9)
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for a in chunk {
                q = q
                    .bind(a.id)
                    .bind(a.address.as_str())
                    .bind(a.display_name.as_deref())
                    .bind(a.kind.as_str())
                    .bind(a.status.as_str())
                    .bind("mail")
                    .bind(a.now)
                    .bind(a.now)
                    .bind(a.verification_sent_at);
            }
            let written = q.fetch_all(&mut *conn).await.ctx("create accounts")?;
            if written.len() < chunk.len() {
                let ids: std::collections::HashSet<i64> = written
                    .iter()
                    .filter_map(|r| r.try_get::<i64, _>(0).ok())
                    .collect();
                let taken: Vec<&str> = chunk
                    .iter()
                    .filter(|a| !ids.contains(&a.id))
                    .map(|a| a.address.as_str())
                    .collect();
                return Err(StoreError::Conflict(format!(
                    "accounts created meanwhile by someone else: {}",
                    taken.join(", ")
                )));
            }
        }
        self.pending_accounts.clear();
        for chunk in std::mem::take(&mut self.joins).chunks(CHUNK) {
            join_organizations(conn, chunk).await?;
        }
        for chunk in std::mem::take(&mut self.requests).chunks(CHUNK) {
            let sql = format!(
                "INSERT INTO requests (id, request_key, desk, number, reporter_address, reporter_account_id, \
                   subject, description, status, created_at, updated_at, held_until) VALUES {}",
                values_list(conn, chunk.len(), 12)
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for r in chunk {
                q = q
                    .bind(r.id)
                    .bind(r.key.as_str())
                    .bind(r.desk.as_str())
                    .bind(r.number)
                    .bind(r.reporter.as_str())
                    .bind(r.reporter_id)
                    .bind(r.subject.as_str())
                    .bind(r.description.as_str())
                    .bind(if r.held_until.is_some() {
                        "held"
                    } else {
                        "open"
                    })
                    .bind(r.now)
                    .bind(r.now)
                    .bind(r.held_until);
            }
            q.execute(&mut *conn).await.ctx("create requests")?;
        }
        self.held_bytes = 0;
        Ok(())
    }

    /// The next request number on `desk`. The counter row is created if missing and
    /// locked for the rest of the transaction (SQLite: we hold the write lock already;
    /// PostgreSQL: `FOR UPDATE`), so concurrent instances never hand out a number twice.
    async fn next_number(
        &mut self,
        conn: &mut AnyConnection,
        desk: &DeskKey,
    ) -> Result<i64, StoreError> {
        if !self.counters.contains_key(desk.as_str()) {
            sqlx::query(
                "INSERT INTO desk_counters (desk, last_number) VALUES ($1, 0) ON CONFLICT (desk) DO NOTHING",
            )
            .bind(desk.as_str())
            .execute(&mut *conn)
            .await
            .ctx("create the request counter")?;
            let sql = format!(
                "SELECT last_number FROM desk_counters WHERE desk = $1{}",
                super::pg_only(conn, " FOR UPDATE")
            );
            let last: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .bind(desk.as_str())
                .fetch_one(&mut *conn)
                .await
                .ctx("read the request counter")?;
            self.counters.insert(desk.to_string(), last);
        }
        let last = self
            .counters
            .get_mut(desk.as_str())
            .ok_or_else(|| StoreError::Corrupt("request counter vanished".into()))?;
        *last += 1;
        Ok(*last)
    }

    /// Counts the mail sent to `addresses` in the 24 hours before `now` (one query per
    /// [`CHUNK`]), so [`Deferred::mail_counts`] need not ask again for them.
    pub async fn prefetch_mail_counts(
        &mut self,
        conn: &mut AnyConnection,
        addresses: &[&EmailAddress],
        now: i64,
    ) -> Result<(), StoreError> {
        let missing: Vec<&str> = addresses
            .iter()
            .map(|a| a.as_str())
            .filter(|a| !self.day_counts.contains_key(*a))
            .collect();
        for part in missing.chunks(CHUNK) {
            for (to, n) in day_counts(conn, part, now).await? {
                self.day_counts.insert(to, n);
            }
            for a in part {
                self.day_counts.entry((*a).to_string()).or_insert(0);
            }
        }
        Ok(())
    }

    /// Mail sent recently to `recipients` and in total, counting what this batch queued.
    pub async fn mail_counts(
        &mut self,
        conn: &mut AnyConnection,
        recipients: &[&EmailAddress],
        now: i64,
    ) -> Result<MailCounts, StoreError> {
        let mut counts = MailCounts::default();
        if !recipients.is_empty() {
            let unknown: Vec<&str> = recipients
                .iter()
                .map(|r| r.as_str())
                .filter(|r| !self.day_counts.contains_key(*r))
                .collect();
            let mut found: HashMap<String, u32> = HashMap::new();
            if !unknown.is_empty() {
                found = day_counts(conn, &unknown, now).await?.into_iter().collect();
            }
            for r in recipients {
                let n = found
                    .get(r.as_str())
                    .or_else(|| self.day_counts.get(r.as_str()))
                    .copied()
                    .unwrap_or(0);
                if n > 0 {
                    counts.per_recipient.insert((*r).clone(), n);
                }
            }
            for r in recipients {
                let queued = self.outbox.iter().filter(|o| o.to == r.as_str()).count() as u32;
                if queued > 0 {
                    *counts.per_recipient.entry((*r).clone()).or_insert(0) += queued;
                }
            }
        }
        let base = match self.hour_base {
            Some(b) => b,
            None => {
                let n: i64 =
                    sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE created_at >= $1")
                        .bind(now - 3600)
                        .fetch_one(&mut *conn)
                        .await
                        .ctx("count mail of the last hour")?;
                let b = u32::try_from(n).unwrap_or(u32::MAX);
                self.hour_base = Some(b);
                self.flushed_mail = 0;
                b
            }
        };
        counts.last_hour = base + self.flushed_mail + self.outbox.len() as u32;
        Ok(counts)
    }

    /// Writes the accounts, requests, participants and Message-IDs collected so far:
    /// before looking for the request a reply belongs to, or for people again, which
    /// reads them.
    pub async fn flush_threads(&mut self, conn: &mut AnyConnection) -> Result<(), StoreError> {
        self.flush_rows(conn).await?;
        for chunk in std::mem::take(&mut self.participants).chunks(CHUNK) {
            let sql = format!(
                "INSERT INTO participants (request_id, account_id, added_at) VALUES {} ON CONFLICT DO NOTHING",
                values_list(conn, chunk.len(), 3)
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (request, account, at) in chunk {
                q = q.bind(*request).bind(*account).bind(*at);
            }
            q.execute(&mut *conn).await.ctx("add participants")?;
        }
        for chunk in std::mem::take(&mut self.thread_refs).chunks(CHUNK) {
            let sql = format!(
                "INSERT INTO thread_refs (desk, message_id, request_id, direction) VALUES {} ON CONFLICT DO NOTHING",
                values_list(conn, chunk.len(), 4)
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (desk, mid, request, direction) in chunk {
                q = q
                    .bind(desk.as_str())
                    .bind(mid.as_str())
                    .bind(*request)
                    .bind(*direction);
            }
            q.execute(&mut *conn).await.ctx("remember Message-IDs")?;
        }
        Ok(())
    }

    /// Writes everything collected so far.
    pub async fn flush(&mut self, conn: &mut AnyConnection) -> Result<(), StoreError> {
        self.flush_threads(conn).await?;
        if self.hour_base.is_some() {
            self.flushed_mail += self.outbox.len() as u32;
        }
        for o in &self.outbox {
            if let Some(n) = self.day_counts.get_mut(&o.to) {
                *n += 1;
            }
        }
        for (desk, last) in &self.counters {
            sqlx::query("UPDATE desk_counters SET last_number = $2 WHERE desk = $1")
                .bind(desk.as_str())
                .bind(*last)
                .execute(&mut *conn)
                .await
                .ctx("store the request counter")?;
        }
        for chunk in std::mem::take(&mut self.outcomes).chunks(CHUNK) {
            let sql = format!(
                "UPDATE ledger SET action = v.column2, reason = v.column3, request_key = v.column4, \
                 detail = v.column5 FROM (VALUES {}) AS v WHERE ledger.id = v.column1",
                values_list(conn, chunk.len(), 5)
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (id, action, reason, key, detail) in chunk {
                q = q
                    .bind(*id)
                    .bind(*action)
                    .bind(*reason)
                    .bind(key.as_deref())
                    .bind(detail.as_str());
            }
            q.execute(&mut *conn)
                .await
                .ctx("record outcomes in the ledger")?;
        }
        for chunk in std::mem::take(&mut self.tokens).chunks(CHUNK) {
            let sql = format!(
                "INSERT INTO verification_tokens (token_hash, account_id, purpose, created_at, expires_at) VALUES {}",
                values_list(conn, chunk.len(), 5)
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (hash, account, purpose, created, expires) in chunk {
                q = q
                    .bind(hash.as_str())
                    .bind(*account)
                    .bind(*purpose)
                    .bind(*created)
                    .bind(*expires);
            }
            q.execute(&mut *conn)
                .await
                .ctx("store verification tokens")?;
        }
        for chunk in std::mem::take(&mut self.audits).chunks(CHUNK) {
            let sql = format!(
                "INSERT INTO audit (ledger_id, created_at, desk, action, reason, request_key, decision, facts) \
                 VALUES {} RETURNING id, ledger_id",
                values_list(conn, chunk.len(), 8)
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for a in chunk {
                q = q
                    .bind(a.ledger_id)
                    .bind(a.created_at)
                    .bind(a.desk.as_deref())
                    .bind(a.action)
                    .bind(a.reason)
                    .bind(a.request_key.as_deref())
                    .bind(a.decision.as_str())
                    .bind(a.facts.as_deref());
            }
            let mut audit_ids: HashMap<i64, i64> = HashMap::new();
            for row in q.fetch_all(&mut *conn).await.ctx("write audit rows")? {
                let id: i64 = row.try_get(0).ctx("read audit id")?;
                let ledger: i64 = row.try_get(1).ctx("read audit id")?;
                audit_ids.insert(ledger, id);
            }
            let rows: Vec<(i64, &AuditAddress)> = chunk
                .iter()
                .filter_map(|a| {
                    a.ledger_id
                        .and_then(|l| audit_ids.get(&l))
                        .map(|id| (*id, &a.addresses))
                })
                .flat_map(|(id, addrs)| addrs.iter().map(move |x| (id, x)))
                .collect();
            for part in rows.chunks(CHUNK) {
                let sql = format!(
                    "INSERT INTO audit_addresses (audit_id, address, role, outcome, reason) VALUES {}",
                    values_list(conn, part.len(), 5)
                );
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
                for (id, (address, role, outcome, reason)) in part {
                    q = q
                        .bind(*id)
                        .bind(address.as_str())
                        .bind(*role)
                        .bind(*outcome)
                        .bind(*reason);
                }
                q.execute(&mut *conn).await.ctx("index audit rows")?;
            }
        }
        for chunk in std::mem::take(&mut self.outbox).chunks(CHUNK) {
            let sql = format!(
                "INSERT INTO outbox (kind, desk, to_address, from_address, subject, body_text, body_html, \
                   message_id, in_reply_to, request_key, status, attempts, next_attempt_at, created_at, ledger_id) \
                 VALUES {}",
                values_list(conn, chunk.len(), 15)
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for o in chunk {
                q = q
                    .bind(o.kind)
                    .bind(o.desk.as_str())
                    .bind(o.to.as_str())
                    .bind(o.from.as_str())
                    .bind(o.subject.as_str())
                    .bind(o.body.as_str())
                    .bind(o.html.as_deref())
                    .bind(o.message_id.as_str())
                    .bind(o.in_reply_to.as_deref())
                    .bind(o.request_key.as_deref())
                    .bind("pending")
                    .bind(0i64)
                    .bind(o.now)
                    .bind(o.now)
                    .bind(o.ledger_id);
            }
            q.execute(&mut *conn).await.ctx("queue outgoing mail")?;
        }
        Ok(())
    }
}

/// Mail sent to each of `addresses` in the 24 hours before `now` (addresses with none
/// are left out).
async fn day_counts(
    conn: &mut AnyConnection,
    addresses: &[&str],
    now: i64,
) -> Result<Vec<(String, u32)>, StoreError> {
    let sql = format!(
        "SELECT to_address, COUNT(*) FROM outbox WHERE created_at >= $1 AND to_address IN ({}) \
         GROUP BY to_address",
        placeholders(2, addresses.len())
    );
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(now - 86_400);
    for a in addresses {
        q = q.bind(*a);
    }
    let mut out = Vec::new();
    for row in q
        .fetch_all(&mut *conn)
        .await
        .ctx("count mail per recipient")?
    {
        let to: String = row.try_get(0).ctx("read mail count")?;
        let n: i64 = row.try_get(1).ctx("read mail count")?;
        out.push((to, u32::try_from(n).unwrap_or(u32::MAX)));
    }
    Ok(out)
}

/// Applies `decision` on the caller's transaction. Ledger outcome, audit and outgoing
/// mail go to `deferred`, which the caller flushes before committing.
///
/// Statements are batched (multi-row inserts; ids known from gathering the facts)
/// because every statement is a round trip to the database.
///
/// The audit row records `facts`, the facts the decision was made on (`intake
/// simulate`); `None` for decisions the policy did not make (no desk).
pub async fn apply(
    conn: &mut AnyConnection,
    input: ApplyInput<'_>,
    facts: Option<&crate::policy::Facts>,
    deferred: &mut Deferred,
) -> Result<ApplyResult, StoreError> {
    let d = input.decision;
    let now = input.now;
    let facts = super::import::facts_json(&input, facts);
    let mut result = ApplyResult::default();
    let mut request: Option<(i64, RequestKey)> = None;
    let active = matches!(
        d.action,
        Action::CreateRequest | Action::AddComment | Action::HoldForVerification
    );
    let held = d.action == Action::HoldForVerification;
    let ids =
        resolve_accounts(conn, &input, active, active && !held, &mut result, deferred).await?;
    let bounced = match &input.msg.bounce {
        Some(b) if d.reason == Reason::DeliveryStatusNotification => {
            // It marks accounts: any of them may be waiting to be written.
            deferred.flush_rows(conn).await?;
            super::bounce::record_bounce(conn, b, now).await?
        }
        _ => Vec::new(),
    };

    if active && let (Some(desk), Some(address)) = (&d.desk, &d.requester.address) {
        let requester_id = ids.get(address.as_str()).copied();
        // The comment the message became, if it is one: its attachments belong to it.
        let mut comment_id = None;
        let (request_id, key) = match (&d.request, input.known.thread_request) {
            (Some(key), Some(id)) => {
                // Finding the thread wrote what was waiting; a request of this batch is
                // in the table by now.
                comment_id = Some(add_comment(conn, id, address, input.msg, now).await?);
                (id, key.clone())
            }
            (Some(key), None) => {
                return Err(StoreError::Corrupt(format!(
                    "the decision comments on {key} but its id is unknown"
                )));
            }
            (None, _) => {
                let number = deferred.next_number(conn, desk).await?;
                create_request(
                    conn,
                    number,
                    desk,
                    address,
                    requester_id,
                    input.msg,
                    held.then_some(now + input.hold_ttl_secs),
                    now,
                    deferred,
                )
                .await?
            }
        };
        let waiting_recipients = held
            && d.participants
                .iter()
                .any(|p| p.reason == crate::policy::Reason::RequestHeld);
        if !input.msg.attachments.is_empty() || waiting_recipients {
            // Their rows refer to the request.
            deferred.flush_rows(conn).await?;
        }
        store_attachments(conn, request_id, comment_id, input.msg, now).await?;
        if held {
            // Their participants are decided when the request is released. A follow-up
            // on the sender's held request adds the addresses it does not have yet.
            let (mut known, first) = match d.request {
                Some(_) => held_recipients(conn, request_id).await?,
                None => (HashSet::new(), 0),
            };
            let waiting: Vec<&crate::policy::ParticipantDecision> = d
                .participants
                .iter()
                .filter(|p| p.reason == crate::policy::Reason::RequestHeld)
                .filter(|p| known.insert(p.address.to_string()))
                .collect();
            if !waiting.is_empty() {
                let sql = format!(
                    "INSERT INTO held_recipients (request_id, position, address, display_name) VALUES {}",
                    values_list(conn, waiting.len(), 4)
                );
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
                for (i, p) in waiting.iter().enumerate() {
                    q = q
                        .bind(request_id)
                        .bind(first + i as i64)
                        .bind(p.address.as_str())
                        .bind(p.display_name.as_deref());
                }
                q.execute(&mut *conn)
                    .await
                    .ctx("remember who a held request was for")?;
            }
        }
        if !held {
            add_participants(d, &ids, request_id, now, deferred);
        }
        request = Some((request_id, key));
    }
    result.request = request.as_ref().map(|(_, k)| k.clone());

    let outbound = queue_emails(&input, &ids, request.as_ref(), deferred);
    result.emails_queued = d.emails.len();
    if let (Some(desk), Some((request_id, _))) = (&d.desk, &request) {
        remember_message_ids(
            desk,
            *request_id,
            &outbound,
            input.msg.message_id.as_deref(),
            deferred,
        );
    }

    let request_key = result.request.as_ref().map(|k| k.to_string());
    if let Some(ledger_id) = input.ledger_id {
        deferred.outcomes.push((
            ledger_id,
            d.action.as_str(),
            d.reason.code(),
            request_key.clone(),
            d.explanation.clone(),
        ));
    }
    let mut audit = audit_row(&input, request_key);
    audit.facts = facts;
    for b in bounced {
        if !audit.addresses.iter().any(|a| a.0 == b.0 && a.1 == b.1) {
            audit.addresses.push(b);
        }
    }
    deferred.audits.push(audit);
    Ok(result)
}

/// Writes one audit row at once (for events outside a message batch).
/// The addresses a held request waits to decide on, and the next free position.
async fn held_recipients(
    conn: &mut AnyConnection,
    request_id: i64,
) -> Result<(HashSet<String>, i64), StoreError> {
    let rows = sqlx::query("SELECT position, address FROM held_recipients WHERE request_id = $1")
        .bind(request_id)
        .fetch_all(&mut *conn)
        .await
        .ctx("read who a held request is for")?;
    let mut known = HashSet::new();
    let mut next = 0;
    for row in &rows {
        let position: i64 = row.try_get(0).ctx("read held recipients")?;
        known.insert(row.try_get::<String, _>(1).ctx("read held recipients")?);
        next = next.max(position + 1);
    }
    Ok((known, next))
}

async fn write_audit(conn: &mut AnyConnection, a: &AuditRow) -> Result<(), StoreError> {
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO audit (ledger_id, created_at, desk, action, reason, request_key, decision) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
    )
    .bind(a.ledger_id)
    .bind(a.created_at)
    .bind(a.desk.as_deref())
    .bind(a.action)
    .bind(a.reason)
    .bind(a.request_key.as_deref())
    .bind(a.decision.as_str())
    .fetch_one(&mut *conn)
    .await
    .ctx("write an audit row")?;
    for (address, role, outcome, reason) in &a.addresses {
        sqlx::query(
            "INSERT INTO audit_addresses (audit_id, address, role, outcome, reason) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT DO NOTHING",
        )
        .bind(id)
        .bind(address.as_str())
        .bind(*role)
        .bind(*outcome)
        .bind(*reason)
        .execute(&mut *conn)
        .await
        .ctx("index an audit row")?;
    }
    Ok(())
}

/// Adds every participant the decision keeps (deferred: see [`Deferred::flush_threads`]).
fn add_participants(
    d: &Decision,
    ids: &HashMap<String, i64>,
    request_id: i64,
    now: i64,
    deferred: &mut Deferred,
) {
    deferred.participants.extend(
        d.participants
            .iter()
            .filter(|p| p.outcome != ParticipantOutcome::Drop)
            .filter_map(|p| ids.get(p.address.as_str()).copied())
            .map(|account| (request_id, account, now)),
    );
}

/// Message-IDs that thread into the request: the inbound message's and the mail we send
/// (deferred: a later message in the batch that replies to them flushes them first).
fn remember_message_ids(
    desk: &DeskKey,
    request_id: i64,
    outbound: &[String],
    inbound: Option<&str>,
    deferred: &mut Deferred,
) {
    let refs = outbound
        .iter()
        .map(|m| (m.as_str(), "outbound"))
        .chain(inbound.map(|m| (m, "inbound")));
    deferred.thread_refs.extend(
        refs.map(|(mid, direction)| (desk.to_string(), mid.to_string(), request_id, direction)),
    );
}

/// Releases a held request once its reporter confirmed their address: its To/Cc are
/// handled by `decision` (decided just now, under the policy in force), invitations are
/// queued, and the request opens. The audit row says `release`. The caller opened the
/// request first ([`open_held_request`]).
pub async fn apply_release(
    conn: &mut AnyConnection,
    input: ApplyInput<'_>,
    request_id: i64,
    key: &RequestKey,
    deferred: &mut Deferred,
) -> Result<ApplyResult, StoreError> {
    let mut result = ApplyResult::default();
    let ids = resolve_accounts(conn, &input, false, true, &mut result, deferred).await?;
    add_participants(input.decision, &ids, request_id, input.now, deferred);
    let request = (request_id, key.clone());
    let outbound = queue_emails(&input, &ids, Some(&request), deferred);
    result.emails_queued = input.decision.emails.len();
    remember_message_ids(key.desk(), request_id, &outbound, None, deferred);
    let mut audit = audit_row(&input, Some(key.to_string()));
    audit.action = "release";
    audit.reason = Reason::AddressConfirmed.code();
    write_audit(conn, &audit).await?;
    result.request = Some(key.clone());
    Ok(result)
}

/// Creates the accounts the decision creates (requester and/or participants) and returns
/// the ids of every account the rest of applying needs; fills in missing display names
/// and notes when a verification link is mailed again.
async fn resolve_accounts(
    conn: &mut AnyConnection,
    input: &ApplyInput<'_>,
    with_requester: bool,
    with_participants: bool,
    result: &mut ApplyResult,
    deferred: &mut Deferred,
) -> Result<HashMap<String, i64>, StoreError> {
    let d = input.decision;
    let now = input.now;
    // Accounts that get a verification or invitation link: their "last sent" time is set.
    let mailed: Vec<&EmailAddress> = d
        .emails
        .iter()
        .filter(|e| e.kind != EmailKind::RejectionNotice)
        .map(|e| &e.to)
        .collect();

    // Accounts: the ids of existing ones are known; create the new ones.
    let mut ids: HashMap<String, i64> = input
        .known
        .accounts
        .iter()
        .map(|(a, (id, _))| (a.clone(), *id))
        .collect();
    let mut creates: Vec<NewAccount<'_>> = Vec::new();
    let mut names: Vec<(&EmailAddress, &str)> = Vec::new();
    if with_requester && let Some(address) = &d.requester.address {
        if let Some(kind) = d.requester.account.created_kind() {
            creates.push(NewAccount {
                address,
                display_name: d.requester.display_name.as_deref(),
                kind,
                status: d.requester.new_status.unwrap_or(AccountStatus::Active),
            });
        } else if let Some(n) = &d.requester.display_name {
            names.push((address, n));
        }
    }
    if with_participants {
        for p in &d.participants {
            match p.outcome.created_kind() {
                Some(kind) => creates.push(NewAccount {
                    address: &p.address,
                    display_name: p.display_name.as_deref(),
                    kind,
                    status: p.new_status.unwrap_or(AccountStatus::Active),
                }),
                None if p.outcome == ParticipantOutcome::AddExisting => {
                    if let Some(n) = &p.display_name {
                        names.push((&p.address, n));
                    }
                }
                None => {}
            }
        }
    }
    let created = create_accounts(conn, &creates, &mailed, now, input.orgs, deferred).await?;
    for c in &creates {
        if let Some(id) = created.get(c.address.as_str()) {
            result.accounts_created.push((c.address.clone(), c.kind));
            ids.insert(c.address.to_string(), *id);
        }
    }
    // Someone else created one of them meanwhile (another instance): look it up.
    let missing: Vec<&str> = creates
        .iter()
        .map(|c| c.address.as_str())
        .filter(|a| !ids.contains_key(*a))
        .collect();
    if !missing.is_empty() {
        let sql = format!(
            "SELECT id, address FROM accounts WHERE address IN ({})",
            placeholders(1, missing.len())
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for a in &missing {
            q = q.bind(*a);
        }
        for row in q.fetch_all(&mut *conn).await.ctx("look up account ids")? {
            ids.insert(
                row.try_get(1).ctx("read account")?,
                row.try_get(0).ctx("read account")?,
            );
        }
    }
    // Existing accounts without a name take the one from the message header.
    for (address, name) in names {
        if let Some((id, false)) = input.known.accounts.get(address.as_str()) {
            sqlx::query("UPDATE accounts SET display_name = $1 WHERE id = $2")
                .bind(name)
                .bind(*id)
                .execute(&mut *conn)
                .await
                .ctx("set a display name")?;
        }
    }
    // Existing (pending) accounts that are mailed a link again.
    let resent: Vec<i64> = mailed
        .iter()
        .filter(|a| !created.contains_key(a.as_str()))
        .filter_map(|a| input.known.accounts.get(a.as_str()).map(|(id, _)| *id))
        .collect();
    if !resent.is_empty() {
        let sql = format!(
            "UPDATE accounts SET last_verification_sent_at = $1 WHERE id IN ({})",
            placeholders(2, resent.len())
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(now);
        for id in resent {
            q = q.bind(id);
        }
        q.execute(&mut *conn)
            .await
            .ctx("note the verification mail")?;
    }

    Ok(ids)
}

/// The audit row holding the whole decision, with one index entry per address it
/// touched (for `intake audit ADDRESS`).
fn audit_row(input: &ApplyInput<'_>, request_key: Option<String>) -> AuditRow {
    let d = input.decision;
    let mut addresses: Vec<AuditAddress> = Vec::new();
    if let Some(a) = &d.requester.address {
        addresses.push((
            a.to_string(),
            "requester",
            d.requester.account.as_str(),
            d.requester.reason.code(),
        ));
    }
    for p in &d.participants {
        addresses.push((
            p.address.to_string(),
            "participant",
            p.outcome.as_str(),
            p.reason.code(),
        ));
    }
    for e in &d.emails {
        addresses.push((e.to.to_string(), "email", e.kind.as_str(), "queued"));
    }
    // The primary key is (audit, address, role): keep the first of any repeats.
    let mut seen = std::collections::HashSet::new();
    addresses.retain(|(a, role, _, _)| seen.insert((a.clone(), *role)));
    AuditRow {
        ledger_id: input.ledger_id,
        created_at: input.now,
        desk: d.desk.as_ref().map(|k| k.to_string()),
        action: d.action.as_str(),
        reason: d.reason.code(),
        request_key,
        decision: serde_json::to_string(d).unwrap_or_default(),
        facts: None,
        addresses,
    }
}

/// Creates accounts in one statement (an address created meanwhile by someone else is
/// left alone) and joins the new ones to the organizations of their domains. Returns the
/// addresses actually created. With `deferred` holding rows, they are only reserved an
/// id here and written at its flush.
async fn create_accounts(
    conn: &mut AnyConnection,
    accounts: &[NewAccount<'_>],
    mailed: &[&EmailAddress],
    now: i64,
    orgs: &DirectoryIndex,
    deferred: &mut Deferred,
) -> Result<HashMap<String, i64>, StoreError> {
    let mut created = HashMap::new();
    if accounts.is_empty() {
        return Ok(created);
    }
    let sent_at = |a: &NewAccount<'_>| mailed.contains(&a.address).then_some(now);
    if deferred.hold_rows
        && accounts
            .iter()
            .any(|a| deferred.pending_accounts.contains_key(a.address.as_str()))
    {
        // An earlier message of the batch creates one of them too (the caller should
        // have flushed before looking them up): write those, then go the careful way.
        deferred.flush_rows(conn).await?;
        // SQLite numbers the row itself: count from the highest id again afterwards.
        deferred.account_ids = IdPool::with_block(deferred.account_ids.block);
    } else if deferred.hold_rows {
        for a in accounts {
            if created.contains_key(a.address.as_str()) {
                continue;
            }
            let id = deferred.account_ids.take(conn, "accounts").await?;
            deferred
                .joins
                .extend(orgs.matching(a.address.domain()).map(|o| (o.id, id)));
            deferred.accounts.push(AccountInsert {
                id,
                address: a.address.to_string(),
                display_name: a.display_name.map(str::to_string),
                kind: a.kind,
                status: a.status,
                now,
                verification_sent_at: sent_at(a),
            });
            deferred.pending_accounts.insert(a.address.to_string(), id);
            created.insert(a.address.to_string(), id);
        }
        return Ok(created);
    }
    let sql = format!(
        "INSERT INTO accounts (address, display_name, kind, status, origin, created_at, updated_at, \
           last_verification_sent_at) \
         VALUES {} ON CONFLICT (address) DO NOTHING RETURNING id, address",
        values_list(conn, accounts.len(), 8)
    );
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
    for a in accounts {
        q = q
            .bind(a.address.as_str())
            .bind(a.display_name)
            .bind(a.kind.as_str())
            .bind(a.status.as_str())
            .bind("mail")
            .bind(now)
            .bind(now)
            .bind(sent_at(a));
    }
    let rows = q.fetch_all(&mut *conn).await.ctx("create accounts")?;
    let mut joins: Vec<(i64, i64)> = Vec::new();
    for row in rows {
        let id: i64 = row.try_get(0).ctx("read new account")?;
        let address: String = row.try_get(1).ctx("read new account")?;
        let domain = address.rsplit_once('@').map(|(_, d)| d).unwrap_or_default();
        joins.extend(orgs.matching(domain).map(|o| (o.id, id)));
        created.insert(address, id);
    }
    for chunk in joins.chunks(CHUNK) {
        join_organizations(conn, chunk).await?;
    }
    Ok(created)
}

/// Adds new accounts to organizations: (organization, account).
async fn join_organizations(
    conn: &mut AnyConnection,
    joins: &[(i64, i64)],
) -> Result<(), StoreError> {
    if joins.is_empty() {
        return Ok(());
    }
    let sql = format!(
        "INSERT INTO organization_members (organization_id, account_id, origin) VALUES {} \
         ON CONFLICT DO NOTHING",
        values_list(conn, joins.len(), 3)
    );
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
    for (org, account) in joins {
        q = q.bind(*org).bind(*account).bind("mail");
    }
    q.execute(&mut *conn).await.ctx("join organizations")?;
    Ok(())
}

/// Creates a request: at once, or with `deferred` holding rows, an id now and the row
/// at its flush.
#[allow(clippy::too_many_arguments)]
async fn create_request(
    conn: &mut AnyConnection,
    number: i64,
    desk: &DeskKey,
    reporter: &EmailAddress,
    reporter_id: Option<i64>,
    msg: &InboundMessage,
    held_until: Option<i64>,
    now: i64,
    deferred: &mut Deferred,
) -> Result<(i64, RequestKey), StoreError> {
    let key = RequestKey::new(desk.clone(), number as u64);
    let subject = msg.subject.as_deref().unwrap_or("(no subject)");
    if deferred.hold_rows {
        let id = deferred.request_ids.take(conn, "requests").await?;
        deferred.held_bytes += subject.len() + msg.text_body.len();
        deferred.requests.push(RequestInsert {
            id,
            key: key.to_string(),
            desk: desk.to_string(),
            number,
            reporter: reporter.to_string(),
            reporter_id,
            subject: subject.to_string(),
            description: msg.text_body.clone(),
            held_until,
            now,
        });
        if deferred.held_bytes > HELD_BYTES {
            deferred.flush_rows(conn).await?;
        }
        return Ok((id, key));
    }
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO requests (request_key, desk, number, reporter_address, reporter_account_id, \
           subject, description, status, created_at, updated_at, held_until) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $10) RETURNING id",
    )
    .bind(key.to_string())
    .bind(desk.as_str())
    .bind(number)
    .bind(reporter.as_str())
    .bind(reporter_id)
    .bind(subject)
    .bind(&msg.text_body)
    .bind(if held_until.is_some() { "held" } else { "open" })
    .bind(now)
    .bind(held_until)
    .fetch_one(&mut *conn)
    .await
    .ctx("create the request")?;
    Ok((id, key))
}

async fn add_comment(
    conn: &mut AnyConnection,
    request_id: i64,
    author: &EmailAddress,
    msg: &InboundMessage,
    now: i64,
) -> Result<i64, StoreError> {
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO comments (request_id, author_address, body, message_id, created_at) \
         VALUES ($1, $2, $3, $4, $5) RETURNING id",
    )
    .bind(request_id)
    .bind(author.as_str())
    .bind(&msg.text_body)
    .bind(msg.message_id.as_deref())
    .bind(now)
    .fetch_one(&mut *conn)
    .await
    .ctx("add the comment")?;
    sqlx::query("UPDATE requests SET updated_at = $1 WHERE id = $2")
        .bind(now)
        .bind(request_id)
        .execute(&mut *conn)
        .await
        .ctx("touch the request")?;
    Ok(id)
}

/// The size of the pieces attachment content is stored in (`attachment_chunks`).
pub const ATTACHMENT_CHUNK: usize = 1 << 20;

/// Attachments are stored in the database, content-addressed by SHA-256 so the same file
/// sent twice is stored once; they commit with the request like everything else. The
/// content goes in as pieces of [`ATTACHMENT_CHUNK`] bytes: each bound parameter is
/// copied by the driver and again by the database client, and a 20 MB file copied whole
/// three times would triple the daemon's memory for it.
async fn store_attachments(
    conn: &mut AnyConnection,
    request_id: i64,
    comment_id: Option<i64>,
    msg: &InboundMessage,
    now: i64,
) -> Result<(), StoreError> {
    for a in &msg.attachments {
        let sha = hex::encode(Sha256::digest(&a.content));
        let new: Option<String> = sqlx::query_scalar(
            "INSERT INTO attachment_blobs (sha256, size, content) VALUES ($1, $2, $3) \
             ON CONFLICT DO NOTHING RETURNING sha256",
        )
        .bind(&sha)
        .bind(a.content.len() as i64)
        .bind(&[][..])
        .fetch_optional(&mut *conn)
        .await
        .ctx("store an attachment")?;
        if new.is_some() {
            for (seq, piece) in a.content.chunks(ATTACHMENT_CHUNK).enumerate() {
                sqlx::query(
                    "INSERT INTO attachment_chunks (sha256, seq, content) VALUES ($1, $2, $3)",
                )
                .bind(&sha)
                .bind(seq as i64)
                .bind(piece)
                .execute(&mut *conn)
                .await
                .ctx("store a piece of an attachment")?;
            }
        }
        sqlx::query(
            "INSERT INTO attachments (request_id, comment_id, filename, content_type, size, sha256, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(request_id)
        .bind(comment_id)
        .bind(&a.filename)
        .bind(&a.content_type)
        .bind(a.content.len() as i64)
        .bind(&sha)
        .bind(now)
        .execute(&mut *conn)
        .await
        .ctx("record an attachment")?;
    }
    Ok(())
}

/// 256 random bits, URL-safe hex. Only its SHA-256 is stored.
pub fn new_token() -> (String, String) {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let token = hex::encode(bytes);
    let hash = token_hash(&token);
    (token, hash)
}

pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Renders and queues the decision's mail: tokens (hashed) for verification and
/// invitation links, then the outbox rows, each in one statement. Returns the
/// Message-IDs of the queued mail.
fn queue_emails(
    input: &ApplyInput<'_>,
    ids: &HashMap<String, i64>,
    request: Option<&(i64, RequestKey)>,
    deferred: &mut Deferred,
) -> Vec<String> {
    let d = input.decision;
    let now = input.now;
    let Some(desk) = &d.desk else {
        return Vec::new();
    };
    let ttl = input.renderer.token_ttl_secs();
    let mut tokens: Vec<(String, i64, &'static str)> = Vec::new();
    let mut rows: Vec<(&EmailIntent, RenderedMail, String)> = Vec::new();
    for email in &d.emails {
        let account = ids.get(email.to.as_str()).copied();
        let token = match (email.kind, account) {
            (EmailKind::Verification | EmailKind::Invitation, Some(account_id)) => {
                let (token, hash) = new_token();
                tokens.push((hash, account_id, email.kind.as_str()));
                Some(token)
            }
            _ => None,
        };
        let display_name = if Some(&email.to) == d.requester.address.as_ref() {
            d.requester.display_name.as_deref()
        } else {
            d.participants
                .iter()
                .find(|p| p.address == email.to)
                .and_then(|p| p.display_name.as_deref())
        };
        let mail = input.renderer.render(&MailContext {
            kind: email.kind,
            desk,
            to: &email.to,
            display_name,
            request: request.map(|(_, k)| k),
            original_subject: input.msg.subject.as_deref(),
            token: token.as_deref(),
            about: email.about,
        });
        let mut rnd = [0u8; 12];
        rand::rng().fill_bytes(&mut rnd);
        let message_id = format!(
            "{}.{}@{}",
            email.kind.as_str(),
            hex::encode(rnd),
            input.renderer.message_id_domain()
        );
        rows.push((email, mail, message_id));
    }
    for (hash, account, purpose) in tokens {
        deferred
            .tokens
            .push((hash, account, purpose, now, now + ttl));
    }
    let mut message_ids = Vec::with_capacity(rows.len());
    for (email, mail, message_id) in rows {
        deferred.outbox.push(OutboxRowInsert {
            kind: email.kind.as_str(),
            desk: desk.to_string(),
            to: email.to.to_string(),
            from: mail.from,
            subject: mail.subject,
            body: mail.body_text,
            html: mail.body_html,
            message_id: message_id.clone(),
            in_reply_to: input.msg.message_id.clone(),
            request_key: request.map(|(_, k)| k.to_string()),
            now,
            ledger_id: input.ledger_id,
        });
        message_ids.push(message_id);
    }
    message_ids
}

/// Opens a held request being released; `false` when it is no longer held (expired
/// meanwhile: on PostgreSQL this waits for an expiry in flight, then sees its outcome).
pub async fn open_held_request(
    conn: &mut AnyConnection,
    request_id: i64,
    now: i64,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE requests SET status = 'open', held_until = NULL, updated_at = $1 \
         WHERE id = $2 AND status = 'held'",
    )
    .bind(now)
    .bind(request_id)
    .execute(&mut *conn)
    .await
    .ctx("open the released request")?;
    Ok(done.rows_affected() == 1)
}

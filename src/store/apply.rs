//! Applying a [`Decision`]: accounts, request or comment, participants, attachments,
//! tokens, outbox rows, the audit row and the ledger outcome, all on the caller's
//! transaction so they commit (or vanish) together.

use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::{AnyConnection, Row};

use crate::address::EmailAddress;
use crate::keys::{DeskKey, RequestKey};
use crate::message::InboundMessage;
use crate::policy::{
    AccountKind, AccountOutcome, AccountStatus, Action, Decision, EmailIntent, EmailKind,
    ParticipantOutcome, Reason,
};

use super::directory::OrgIndex;
use super::{Context, StoreError};

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
    pub participants_added: usize,
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
pub fn dedupe_key(desk: Option<&DeskKey>, msg: &InboundMessage) -> String {
    let desk = desk.map(DeskKey::as_str).unwrap_or("-");
    match &msg.message_id {
        Some(id) => format!("{desk}:mid:{id}"),
        None => format!("{desk}:sha:{}", msg.content_hash),
    }
}

/// Inserts the ledger row that claims `msg` for `desk`. `None` means it was already
/// processed: the caller treats it as a duplicate and changes nothing else.
pub async fn claim_ledger(
    conn: &mut AnyConnection,
    source: &SourceRef,
    msg: &InboundMessage,
    desk: Option<&DeskKey>,
    now: i64,
) -> Result<Option<i64>, StoreError> {
    sqlx::query_scalar(
        "INSERT INTO ledger (source, source_ref, desk, message_id, content_hash, dedupe_key, \
           action, reason, sender, subject, size, processed_at) \
         VALUES ($1, $2, $3, $4, $5, $6, 'pending', 'pending', $7, $8, $9, $10) \
         ON CONFLICT (dedupe_key) DO NOTHING RETURNING id",
    )
    .bind(&source.source)
    .bind(&source.reference)
    .bind(desk.map(DeskKey::as_str))
    .bind(msg.message_id.as_deref())
    .bind(&msg.content_hash)
    .bind(dedupe_key(desk, msg))
    .bind(msg.from_mailbox().map(|m| m.address.as_str()))
    .bind(msg.subject.as_deref())
    .bind(msg.size as i64)
    .bind(now)
    .fetch_optional(&mut *conn)
    .await
    .ctx("claim the message in the ledger")
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
    pub ledger_id: i64,
    pub now: i64,
    pub orgs: &'a OrgIndex,
    pub renderer: &'a dyn MailRenderer,
}

/// Applies `decision` on the caller's transaction and records the outcome.
pub async fn apply(
    conn: &mut AnyConnection,
    input: ApplyInput<'_>,
) -> Result<ApplyResult, StoreError> {
    let d = input.decision;
    let now = input.now;
    let mut result = ApplyResult::default();
    let mut request: Option<(i64, RequestKey)> = None;

    if let (Some(desk), Some(address)) = (&d.desk, &d.requester.address)
        && matches!(
            d.action,
            Action::CreateRequest | Action::AddComment | Action::HoldForVerification
        )
    {
        let requester_id = match d.requester.account {
            AccountOutcome::Existing => {
                touch_account(conn, address, d.requester.display_name.as_deref()).await?
            }
            AccountOutcome::CreateInternal | AccountOutcome::CreatePortalOnly => {
                let kind = d
                    .requester
                    .account
                    .created_kind()
                    .unwrap_or(AccountKind::PortalOnly);
                let status = d.requester.new_status.unwrap_or(AccountStatus::Active);
                let (id, created) = create_account(
                    conn,
                    address,
                    d.requester.display_name.as_deref(),
                    kind,
                    status,
                    now,
                    input.orgs,
                )
                .await?;
                if created {
                    result.accounts_created.push((address.clone(), kind));
                }
                Some(id)
            }
            AccountOutcome::None => None,
        };

        let held = d.action == Action::HoldForVerification;
        let (request_id, key) = match &d.request {
            Some(key) => {
                let id: i64 = sqlx::query_scalar("SELECT id FROM requests WHERE request_key = $1")
                    .bind(key.to_string())
                    .fetch_one(&mut *conn)
                    .await
                    .ctx("find the request to comment on")?;
                add_comment(conn, id, address, input.msg, now).await?;
                (id, key.clone())
            }
            None => {
                create_request(
                    conn,
                    desk,
                    address,
                    requester_id,
                    input.msg,
                    held,
                    now + input.renderer.token_ttl_secs(),
                    now,
                )
                .await?
            }
        };
        store_attachments(conn, request_id, input.msg, now).await?;
        if let Some(mid) = &input.msg.message_id {
            sqlx::query(
                "INSERT INTO thread_refs (desk, message_id, request_id, direction) \
                 VALUES ($1, $2, $3, 'inbound') ON CONFLICT DO NOTHING",
            )
            .bind(desk.as_str())
            .bind(mid)
            .bind(request_id)
            .execute(&mut *conn)
            .await
            .ctx("remember the Message-ID")?;
        }

        if !held {
            for p in &d.participants {
                let account_id = match p.outcome {
                    ParticipantOutcome::Drop => continue,
                    ParticipantOutcome::AddExisting => {
                        touch_account(conn, &p.address, p.display_name.as_deref()).await?
                    }
                    ParticipantOutcome::CreateInternal | ParticipantOutcome::CreatePortalOnly => {
                        let kind = p.outcome.created_kind().unwrap_or(AccountKind::PortalOnly);
                        let (id, created) = create_account(
                            conn,
                            &p.address,
                            p.display_name.as_deref(),
                            kind,
                            p.new_status.unwrap_or(AccountStatus::Active),
                            now,
                            input.orgs,
                        )
                        .await?;
                        if created {
                            result.accounts_created.push((p.address.clone(), kind));
                        }
                        Some(id)
                    }
                };
                if let Some(account_id) = account_id {
                    let added = sqlx::query(
                        "INSERT INTO participants (request_id, account_id, added_at) VALUES ($1, $2, $3) \
                         ON CONFLICT DO NOTHING",
                    )
                    .bind(request_id)
                    .bind(account_id)
                    .bind(now)
                    .execute(&mut *conn)
                    .await
                    .ctx("add a participant")?;
                    result.participants_added += added.rows_affected() as usize;
                }
            }
        }
        request = Some((request_id, key));
    }
    result.request = request.as_ref().map(|(_, k)| k.clone());

    for email in &d.emails {
        queue_email(conn, &input, email, request.as_ref()).await?;
        result.emails_queued += 1;
    }

    let audit_id: i64 = sqlx::query_scalar(
        "INSERT INTO audit (ledger_id, created_at, desk, action, reason, request_key, decision) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
    )
    .bind(input.ledger_id)
    .bind(now)
    .bind(d.desk.as_ref().map(DeskKey::as_str))
    .bind(d.action.as_str())
    .bind(d.reason.code())
    .bind(result.request.as_ref().map(|k| k.to_string()))
    .bind(serde_json::to_string(d).unwrap_or_default())
    .fetch_one(&mut *conn)
    .await
    .ctx("write the audit row")?;
    let mut touched: Vec<(&EmailAddress, &str, String, &str)> = Vec::new();
    if let Some(a) = &d.requester.address {
        touched.push((
            a,
            "requester",
            serde_plain(&d.requester.account),
            d.requester.reason.code(),
        ));
    }
    for p in &d.participants {
        touched.push((
            &p.address,
            "participant",
            p.outcome.as_str().to_string(),
            p.reason.code(),
        ));
    }
    for e in &d.emails {
        touched.push((&e.to, "email", e.kind.as_str().to_string(), "queued"));
    }
    for (address, role, outcome, reason) in touched {
        sqlx::query(
            "INSERT INTO audit_addresses (audit_id, address, role, outcome, reason) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        )
        .bind(audit_id)
        .bind(address.as_str())
        .bind(role)
        .bind(outcome)
        .bind(reason)
        .execute(&mut *conn)
        .await
        .ctx("index the audit row")?;
    }

    sqlx::query(
        "UPDATE ledger SET action = $1, reason = $2, request_key = $3, detail = $4 WHERE id = $5",
    )
    .bind(d.action.as_str())
    .bind(d.reason.code())
    .bind(result.request.as_ref().map(|k| k.to_string()))
    .bind(&d.explanation)
    .bind(input.ledger_id)
    .execute(&mut *conn)
    .await
    .ctx("record the outcome in the ledger")?;
    Ok(result)
}

fn serde_plain<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

/// Returns the id of an existing account, filling in its display name if it had none.
async fn touch_account(
    conn: &mut AnyConnection,
    address: &EmailAddress,
    display_name: Option<&str>,
) -> Result<Option<i64>, StoreError> {
    let row = sqlx::query("SELECT id, display_name FROM accounts WHERE address = $1")
        .bind(address.as_str())
        .fetch_optional(&mut *conn)
        .await
        .ctx("find an account")?;
    let Some(row) = row else { return Ok(None) };
    let id: i64 = row.try_get(0).ctx("read account")?;
    let current: Option<String> = row.try_get(1).ctx("read account")?;
    if current.is_none()
        && let Some(name) = display_name
    {
        sqlx::query("UPDATE accounts SET display_name = $1 WHERE id = $2")
            .bind(name)
            .bind(id)
            .execute(&mut *conn)
            .await
            .ctx("set a display name")?;
    }
    Ok(Some(id))
}

/// Creates an account (or finds the one created meanwhile) and joins the organizations
/// whose domains match its address. Returns the id and whether it was created.
async fn create_account(
    conn: &mut AnyConnection,
    address: &EmailAddress,
    display_name: Option<&str>,
    kind: AccountKind,
    status: AccountStatus,
    now: i64,
    orgs: &OrgIndex,
) -> Result<(i64, bool), StoreError> {
    let inserted: Option<i64> = sqlx::query_scalar(
        "INSERT INTO accounts (address, display_name, kind, status, origin, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, 'mail', $5, $5) ON CONFLICT (address) DO NOTHING RETURNING id",
    )
    .bind(address.as_str())
    .bind(display_name)
    .bind(kind.as_str())
    .bind(status.as_str())
    .bind(now)
    .fetch_optional(&mut *conn)
    .await
    .ctx("create an account")?;
    let Some(id) = inserted else {
        let id = touch_account(conn, address, display_name)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("account {address} vanished")))?;
        return Ok((id, false));
    };
    for org in orgs.matching(address.domain()) {
        sqlx::query(
            "INSERT INTO organization_members (organization_id, account_id, origin) \
             VALUES ($1, $2, 'mail') ON CONFLICT DO NOTHING",
        )
        .bind(org.id)
        .bind(id)
        .execute(&mut *conn)
        .await
        .ctx("join an organization")?;
    }
    Ok((id, true))
}

#[allow(clippy::too_many_arguments)]
async fn create_request(
    conn: &mut AnyConnection,
    desk: &DeskKey,
    reporter: &EmailAddress,
    reporter_id: Option<i64>,
    msg: &InboundMessage,
    held: bool,
    held_until: i64,
    now: i64,
) -> Result<(i64, RequestKey), StoreError> {
    let number: i64 = sqlx::query_scalar(
        "INSERT INTO desk_counters (desk, last_number) VALUES ($1, 1) \
         ON CONFLICT (desk) DO UPDATE SET last_number = desk_counters.last_number + 1 \
         RETURNING last_number",
    )
    .bind(desk.as_str())
    .fetch_one(&mut *conn)
    .await
    .ctx("number the request")?;
    let key = RequestKey::new(desk.clone(), number as u64);
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
    .bind(msg.subject.as_deref().unwrap_or("(no subject)"))
    .bind(&msg.text_body)
    .bind(if held { "held" } else { "open" })
    .bind(now)
    .bind(held.then_some(held_until))
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

/// Attachments are stored in the database, content-addressed by SHA-256 so the same file
/// sent twice is stored once; they commit with the request like everything else.
async fn store_attachments(
    conn: &mut AnyConnection,
    request_id: i64,
    msg: &InboundMessage,
    now: i64,
) -> Result<(), StoreError> {
    for a in &msg.attachments {
        let sha = hex::encode(Sha256::digest(&a.content));
        sqlx::query(
            "INSERT INTO attachment_blobs (sha256, size, content) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(&sha)
        .bind(a.content.len() as i64)
        .bind(a.content.as_slice())
        .execute(&mut *conn)
        .await
        .ctx("store an attachment")?;
        sqlx::query(
            "INSERT INTO attachments (request_id, filename, content_type, size, sha256, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(request_id)
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

async fn queue_email(
    conn: &mut AnyConnection,
    input: &ApplyInput<'_>,
    email: &EmailIntent,
    request: Option<&(i64, RequestKey)>,
) -> Result<(), StoreError> {
    let d = input.decision;
    let now = input.now;
    let Some(desk) = &d.desk else { return Ok(()) };
    let token = match email.kind {
        EmailKind::Verification | EmailKind::Invitation => {
            let account_id: Option<i64> =
                sqlx::query_scalar("SELECT id FROM accounts WHERE address = $1")
                    .bind(email.to.as_str())
                    .fetch_optional(&mut *conn)
                    .await
                    .ctx("find the account to verify")?;
            match account_id {
                Some(account_id) => {
                    let (token, hash) = new_token();
                    sqlx::query(
                        "INSERT INTO verification_tokens (token_hash, account_id, purpose, created_at, expires_at) \
                         VALUES ($1, $2, $3, $4, $5)",
                    )
                    .bind(&hash)
                    .bind(account_id)
                    .bind(email.kind.as_str())
                    .bind(now)
                    .bind(now + input.renderer.token_ttl_secs())
                    .execute(&mut *conn)
                    .await
                    .ctx("store a verification token")?;
                    sqlx::query("UPDATE accounts SET last_verification_sent_at = $1 WHERE id = $2")
                        .bind(now)
                        .bind(account_id)
                        .execute(&mut *conn)
                        .await
                        .ctx("note the verification mail")?;
                    Some(token)
                }
                None => None,
            }
        }
        EmailKind::RejectionNotice => None,
    };
    let display_name = if Some(&email.to) == d.requester.address.as_ref() {
        d.requester.display_name.as_deref()
    } else {
        d.participants
            .iter()
            .find(|p| p.address == email.to)
            .and_then(|p| p.display_name.as_deref())
    };
    let ctx = MailContext {
        kind: email.kind,
        desk,
        to: &email.to,
        display_name,
        request: request.map(|(_, k)| k),
        original_subject: input.msg.subject.as_deref(),
        token: token.as_deref(),
        about: email.about,
    };
    let mail = input.renderer.render(&ctx);
    let mut rnd = [0u8; 12];
    rand::rng().fill_bytes(&mut rnd);
    let message_id = format!(
        "{}.{}@{}",
        email.kind.as_str(),
        hex::encode(rnd),
        input.renderer.message_id_domain()
    );
    sqlx::query(
        "INSERT INTO outbox (kind, desk, to_address, from_address, subject, body_text, message_id, \
           in_reply_to, request_key, status, attempts, next_attempt_at, created_at, ledger_id) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'pending', 0, $10, $10, $11)",
    )
    .bind(email.kind.as_str())
    .bind(desk.as_str())
    .bind(email.to.as_str())
    .bind(&mail.from)
    .bind(&mail.subject)
    .bind(&mail.body_text)
    .bind(&message_id)
    .bind(input.msg.message_id.as_deref())
    .bind(request.map(|(_, k)| k.to_string()))
    .bind(now)
    .bind(input.ledger_id)
    .execute(&mut *conn)
    .await
    .ctx("queue outgoing mail")?;
    if let Some((request_id, _)) = request {
        sqlx::query(
            "INSERT INTO thread_refs (desk, message_id, request_id, direction) \
             VALUES ($1, $2, $3, 'outbound') ON CONFLICT DO NOTHING",
        )
        .bind(desk.as_str())
        .bind(&message_id)
        .bind(*request_id)
        .execute(&mut *conn)
        .await
        .ctx("remember the outgoing Message-ID")?;
    }
    Ok(())
}

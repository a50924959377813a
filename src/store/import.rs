//! What `intake import` and `intake simulate` keep besides the ledger.
//!
//! - **Import progress.** How far an mbox import got (`import_progress`): the end of the
//!   last committed message, with fingerprints of the part of the file already read, so a
//!   second run skips that part without reading it and notices a file that was rewritten
//!   meanwhile. It is written *after* each batch commits: when the process dies in between,
//!   the progress lags behind and the ledger turns the repeated messages into no-ops.
//! - **Decision facts.** The [`Facts`] every message was decided on, stored with its audit
//!   row (`audit.facts`, JSON). The raw message is not kept, and the directory changes as
//!   mail arrives (the first message of a sender creates the account the second one finds),
//!   so deciding a message again under another policy is only meaningful on the facts as
//!   they were: `intake simulate` reads them back with [`decode_facts`].

use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::address::EmailAddress;
use crate::keys::{DeskKey, RequestKey};
use crate::message::{AuthResult, Signals};
use crate::policy::{
    AccountFacts, AccountKind, AccountStatus, Facts, Person, RequestStatus, Thread, ThreadMatch,
};

use super::apply::ApplyInput;
use super::{Context, Store, StoreError};

/// How far the import of one mbox file got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportProgress {
    /// `import:` and the file's canonical path.
    pub source: String,
    /// SHA-256 of the file's first `min(64 KiB, offset)` bytes.
    pub head_sha256: String,
    /// The end of the last committed message: the next run starts reading here.
    pub offset: u64,
    /// SHA-256 of the 4 KiB before `offset`.
    pub tail_sha256: String,
    /// Messages before `offset`.
    pub messages: u64,
    /// The file's size when this was recorded.
    pub file_size: u64,
    pub updated_at: i64,
}

/// One recorded decision of a message, for `intake simulate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedDecision {
    /// The audit row's id (pages are read in id order).
    pub id: i64,
    pub ledger_id: Option<i64>,
    pub at: i64,
    pub desk: Option<String>,
    pub request_key: Option<String>,
    pub source: Option<String>,
    pub source_ref: Option<String>,
    /// The decision as recorded (JSON, the decision contract).
    pub decision: String,
    /// The facts it was made on (JSON, see [`encode_facts`]); `None` for messages decided
    /// before intake recorded them.
    pub facts: Option<String>,
}

impl Store {
    pub async fn import_progress(
        &self,
        source: &str,
    ) -> Result<Option<ImportProgress>, StoreError> {
        let mut conn = self.acquire().await?;
        let row = sqlx::query(
            "SELECT head_sha256, byte_offset, tail_sha256, messages, file_size, updated_at \
             FROM import_progress WHERE source = $1",
        )
        .bind(source)
        .fetch_optional(&mut *conn)
        .await
        .ctx("read import progress")?;
        let Some(row) = row else {
            return Ok(None);
        };
        let offset: i64 = row.try_get(1).ctx("read import progress")?;
        let messages: i64 = row.try_get(3).ctx("read import progress")?;
        let file_size: i64 = row.try_get(4).ctx("read import progress")?;
        Ok(Some(ImportProgress {
            source: source.to_string(),
            head_sha256: row.try_get(0).ctx("read import progress")?,
            offset: u64::try_from(offset).unwrap_or(0),
            tail_sha256: row.try_get(2).ctx("read import progress")?,
            messages: u64::try_from(messages).unwrap_or(0),
            file_size: u64::try_from(file_size).unwrap_or(0),
            updated_at: row.try_get(5).ctx("read import progress")?,
        }))
    }

    /// Records how far an import got (after the batch up to `offset` committed).
    pub async fn save_import_progress(&self, p: &ImportProgress) -> Result<(), StoreError> {
        let mut conn = self.write_conn().await?;
        sqlx::query(
            "INSERT INTO import_progress (source, head_sha256, byte_offset, tail_sha256, messages, \
               file_size, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (source) DO UPDATE SET head_sha256 = excluded.head_sha256, \
               byte_offset = excluded.byte_offset, tail_sha256 = excluded.tail_sha256, \
               messages = excluded.messages, file_size = excluded.file_size, \
               updated_at = excluded.updated_at",
        )
        .bind(&p.source)
        .bind(&p.head_sha256)
        .bind(i64::try_from(p.offset).unwrap_or(i64::MAX))
        .bind(&p.tail_sha256)
        .bind(i64::try_from(p.messages).unwrap_or(i64::MAX))
        .bind(i64::try_from(p.file_size).unwrap_or(i64::MAX))
        .bind(p.updated_at)
        .execute(&mut *conn)
        .await
        .ctx("record import progress")?;
        Ok(())
    }

    /// Decisions about messages recorded at or after `since`, in audit order, `limit` at a
    /// time after audit id `after` (read page by page: a month of mail does not fit in
    /// memory at once). Only decisions about messages: not releases, expiries or CLI
    /// changes. Reads only.
    pub async fn recorded_decisions(
        &self,
        since: i64,
        after: i64,
        limit: i64,
    ) -> Result<Vec<RecordedDecision>, StoreError> {
        let mut conn = self.acquire().await?;
        let rows = sqlx::query(
            "SELECT a.id, a.ledger_id, a.created_at, a.desk, a.request_key, l.source, l.source_ref, \
               a.decision, a.facts \
             FROM audit a JOIN ledger l ON l.id = a.ledger_id \
             WHERE a.created_at >= $1 AND a.id > $2 \
               AND a.action IN ('create_request', 'add_comment', 'hold_for_verification', 'reject', 'ignore') \
             ORDER BY a.id LIMIT $3",
        )
        .bind(since)
        .bind(after)
        .bind(limit)
        .fetch_all(&mut *conn)
        .await
        .ctx("read recorded decisions")?;
        rows.iter()
            .map(|r| {
                Ok(RecordedDecision {
                    id: r.try_get(0).ctx("read a recorded decision")?,
                    ledger_id: r.try_get(1).ctx("read a recorded decision")?,
                    at: r.try_get(2).ctx("read a recorded decision")?,
                    desk: r.try_get(3).ctx("read a recorded decision")?,
                    request_key: r.try_get(4).ctx("read a recorded decision")?,
                    source: r.try_get(5).ctx("read a recorded decision")?,
                    source_ref: r.try_get(6).ctx("read a recorded decision")?,
                    decision: r.try_get(7).ctx("read a recorded decision")?,
                    facts: r.try_get(8).ctx("read a recorded decision")?,
                })
            })
            .collect()
    }

    /// The fingerprint of the `[directory]` the database was last synced with.
    pub async fn directory_fingerprint(&self) -> Result<Option<String>, StoreError> {
        let mut conn = self.acquire().await?;
        sqlx::query_scalar("SELECT value FROM meta WHERE key = 'directory_fingerprint'")
            .fetch_optional(&mut *conn)
            .await
            .ctx("read the directory fingerprint")
    }

    /// True when the schema has the tables and columns of migration 0006 (simulate does
    /// not migrate: it writes nothing).
    pub async fn has_decision_facts(&self) -> Result<bool, StoreError> {
        let mut conn = self.acquire().await?;
        Ok(sqlx::query("SELECT facts FROM audit WHERE 1 = 0")
            .fetch_optional(&mut *conn)
            .await
            .is_ok())
    }
}

/// The facts `input`'s decision was made on, as JSON for its audit row; `None` for
/// decisions that were not made by the policy on a desk (no desk, unknown desk).
///
/// The sender's recent requests are in them only when the pipeline counted them (a
/// rate limit is configured), so `intake simulate` cannot show what adding a first
/// rate limit would do.
pub(crate) fn facts_json(input: &ApplyInput<'_>, given: Option<&Facts>) -> Option<String> {
    let (Some(_), Some(_)) = (input.ledger_id, input.decision.desk.as_ref()) else {
        return None;
    };
    given.map(encode_facts)
}

/// Facts as stored JSON (format version 1).
pub fn encode_facts(facts: &Facts) -> String {
    serde_json::to_string(&FactsRecord::from(facts)).unwrap_or_default()
}

/// Facts from stored JSON.
pub fn decode_facts(json: &str) -> Result<Facts, StoreError> {
    let record: FactsRecord = serde_json::from_str(json)
        .map_err(|e| StoreError::Corrupt(format!("recorded decision facts: {e}")))?;
    record.into_facts()
}

// The stored form. `policy` and `message` types are Serialize only and their enums have
// no stable string form for reading back, so the record mirrors them field by field; the
// conversions destructure exhaustively, so a field added to `Facts`, `Person` or
// `Signals` does not compile until it is recorded here too.

#[derive(Serialize, Deserialize)]
struct FactsRecord {
    v: u32,
    now: i64,
    desk: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    message_id: Option<String>,
    #[serde(default)]
    signals: SignalsRecord,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    auth_results: Vec<AuthRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sender: Option<PersonRecord>,
    #[serde(default)]
    sender_recent_requests: u32,
    #[serde(default)]
    recipients: Vec<PersonRecord>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    invalid_recipients: Vec<String>,
    #[serde(default)]
    omitted_recipients: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    thread: Option<ThreadRecord>,
}

#[derive(Default, Serialize, Deserialize)]
#[serde(default)]
struct SignalsRecord {
    #[serde(skip_serializing_if = "Option::is_none")]
    auto_submitted: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    precedence: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    list_id: Option<String>,
    #[serde(skip_serializing_if = "is_false")]
    list_unsubscribe: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    auto_response_suppress: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    autoreply_marker: Option<String>,
    #[serde(skip_serializing_if = "is_false")]
    from_mail_system: bool,
    #[serde(skip_serializing_if = "is_false")]
    bounce: bool,
    #[serde(skip_serializing_if = "is_false")]
    failed_recipients: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    report_type: Option<String>,
    #[serde(skip_serializing_if = "is_false")]
    null_return_path: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    loop_ids: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message_id_domain: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    exchange_auth_as: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct AuthRecord {
    header_index: usize,
    authserv_id: String,
    method: String,
    result: String,
    #[serde(default)]
    properties: Vec<(String, String)>,
}

#[derive(Serialize, Deserialize)]
struct PersonRecord {
    address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    display_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    account: Option<AccountRecord>,
    #[serde(default, skip_serializing_if = "is_false")]
    agent: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    domain_organizations: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    domain_desk_organizations: Vec<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    undeliverable: bool,
}

#[derive(Serialize, Deserialize)]
struct AccountRecord {
    kind: String,
    status: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    organizations: Vec<String>,
    #[serde(default)]
    desk_customer: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_verification_sent_at: Option<i64>,
}

#[derive(Serialize, Deserialize)]
struct ThreadRecord {
    key: String,
    status: String,
    matched_by: String,
    reporter: String,
    #[serde(default)]
    reporter_organizations: Vec<String>,
    #[serde(default)]
    participants: Vec<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl From<&Facts> for FactsRecord {
    fn from(f: &Facts) -> Self {
        let Facts {
            now,
            desk,
            message_id,
            duplicate: _,
            signals,
            auth_results,
            // Only a confirmation sets it; imported mail never is one.
            sender_confirmed: _,
            sender,
            sender_recent_requests,
            recipients,
            invalid_recipients,
            omitted_recipients,
            thread,
        } = f;
        FactsRecord {
            v: 1,
            now: *now,
            desk: desk.to_string(),
            message_id: message_id.clone(),
            signals: SignalsRecord::from(signals),
            auth_results: auth_results.iter().map(AuthRecord::from).collect(),
            sender: sender.as_ref().map(PersonRecord::from),
            sender_recent_requests: *sender_recent_requests,
            recipients: recipients.iter().map(PersonRecord::from).collect(),
            invalid_recipients: invalid_recipients.clone(),
            omitted_recipients: *omitted_recipients,
            thread: thread.as_ref().map(ThreadRecord::from),
        }
    }
}

impl From<&Signals> for SignalsRecord {
    fn from(s: &Signals) -> Self {
        let Signals {
            auto_submitted,
            precedence,
            list_id,
            list_unsubscribe,
            auto_response_suppress,
            autoreply_marker,
            from_mail_system,
            bounce,
            failed_recipients,
            report_type,
            null_return_path,
            loop_ids,
            message_id_domain,
            exchange_auth_as,
        } = s.clone();
        SignalsRecord {
            auto_submitted,
            precedence,
            list_id,
            list_unsubscribe,
            auto_response_suppress,
            autoreply_marker,
            from_mail_system,
            bounce,
            failed_recipients,
            report_type,
            null_return_path,
            loop_ids,
            message_id_domain,
            exchange_auth_as,
        }
    }
}

impl From<SignalsRecord> for Signals {
    fn from(s: SignalsRecord) -> Self {
        let SignalsRecord {
            auto_submitted,
            precedence,
            list_id,
            list_unsubscribe,
            auto_response_suppress,
            autoreply_marker,
            from_mail_system,
            bounce,
            failed_recipients,
            report_type,
            null_return_path,
            loop_ids,
            message_id_domain,
            exchange_auth_as,
        } = s;
        Signals {
            auto_submitted,
            precedence,
            list_id,
            list_unsubscribe,
            auto_response_suppress,
            autoreply_marker,
            from_mail_system,
            bounce,
            failed_recipients,
            report_type,
            null_return_path,
            loop_ids,
            message_id_domain,
            exchange_auth_as,
        }
    }
}

impl From<&AuthResult> for AuthRecord {
    fn from(a: &AuthResult) -> Self {
        let AuthResult {
            header_index,
            authserv_id,
            method,
            result,
            properties,
        } = a.clone();
        AuthRecord {
            header_index,
            authserv_id,
            method,
            result,
            properties,
        }
    }
}

impl From<AuthRecord> for AuthResult {
    fn from(a: AuthRecord) -> Self {
        AuthResult {
            header_index: a.header_index,
            authserv_id: a.authserv_id,
            method: a.method,
            result: a.result,
            properties: a.properties,
        }
    }
}

impl From<&Person> for PersonRecord {
    fn from(p: &Person) -> Self {
        let Person {
            address,
            display_name,
            account,
            agent,
            domain_organizations,
            domain_desk_organizations,
            undeliverable,
        } = p;
        PersonRecord {
            address: address.to_string(),
            display_name: display_name.clone(),
            account: account.as_ref().map(|a| {
                let AccountFacts {
                    kind,
                    status,
                    organizations,
                    desk_customer,
                    last_verification_sent_at,
                } = a;
                AccountRecord {
                    kind: kind.as_str().to_string(),
                    status: status.as_str().to_string(),
                    organizations: organizations.clone(),
                    desk_customer: *desk_customer,
                    last_verification_sent_at: *last_verification_sent_at,
                }
            }),
            agent: *agent,
            domain_organizations: domain_organizations.clone(),
            domain_desk_organizations: domain_desk_organizations.clone(),
            undeliverable: *undeliverable,
        }
    }
}

impl From<&Thread> for ThreadRecord {
    fn from(t: &Thread) -> Self {
        let Thread {
            key,
            status,
            matched_by,
            reporter,
            reporter_organizations,
            participants,
        } = t;
        ThreadRecord {
            key: key.to_string(),
            status: status.as_str().to_string(),
            matched_by: match matched_by {
                ThreadMatch::MessageId => "message_id",
                ThreadMatch::SubjectKey => "subject_key",
            }
            .to_string(),
            reporter: reporter.to_string(),
            reporter_organizations: reporter_organizations.clone(),
            participants: participants.iter().map(ToString::to_string).collect(),
        }
    }
}

fn corrupt(what: &str, value: &str) -> StoreError {
    StoreError::Corrupt(format!("recorded decision facts: {what} {value:?}"))
}

fn address(s: &str) -> Result<EmailAddress, StoreError> {
    EmailAddress::parse(s).map_err(|_| corrupt("address", s))
}

impl FactsRecord {
    fn into_facts(self) -> Result<Facts, StoreError> {
        if self.v != 1 {
            return Err(corrupt("format version", &self.v.to_string()));
        }
        Ok(Facts {
            now: self.now,
            desk: DeskKey::parse(&self.desk).map_err(|_| corrupt("desk", &self.desk))?,
            message_id: self.message_id,
            duplicate: false,
            signals: self.signals.into(),
            auth_results: self.auth_results.into_iter().map(Into::into).collect(),
            sender_confirmed: false,
            sender: self.sender.map(PersonRecord::into_person).transpose()?,
            sender_recent_requests: self.sender_recent_requests,
            recipients: self
                .recipients
                .into_iter()
                .map(PersonRecord::into_person)
                .collect::<Result<_, _>>()?,
            invalid_recipients: self.invalid_recipients,
            omitted_recipients: self.omitted_recipients,
            thread: self.thread.map(ThreadRecord::into_thread).transpose()?,
        })
    }
}

impl PersonRecord {
    fn into_person(self) -> Result<Person, StoreError> {
        let account = match self.account {
            None => None,
            Some(a) => Some(AccountFacts {
                kind: AccountKind::parse(&a.kind)
                    .ok_or_else(|| corrupt("account kind", &a.kind))?,
                status: AccountStatus::parse(&a.status)
                    .ok_or_else(|| corrupt("account status", &a.status))?,
                organizations: a.organizations,
                desk_customer: a.desk_customer,
                last_verification_sent_at: a.last_verification_sent_at,
            }),
        };
        Ok(Person {
            address: address(&self.address)?,
            display_name: self.display_name,
            account,
            agent: self.agent,
            domain_organizations: self.domain_organizations,
            domain_desk_organizations: self.domain_desk_organizations,
            undeliverable: self.undeliverable,
        })
    }
}

impl ThreadRecord {
    fn into_thread(self) -> Result<Thread, StoreError> {
        Ok(Thread {
            key: RequestKey::parse(&self.key).map_err(|_| corrupt("request key", &self.key))?,
            status: RequestStatus::parse(&self.status)
                .ok_or_else(|| corrupt("request status", &self.status))?,
            matched_by: match self.matched_by.as_str() {
                "message_id" => ThreadMatch::MessageId,
                "subject_key" => ThreadMatch::SubjectKey,
                other => return Err(corrupt("thread match", other)),
            },
            reporter: address(&self.reporter)?,
            reporter_organizations: self.reporter_organizations,
            participants: self
                .participants
                .iter()
                .map(|a| address(a))
                .collect::<Result<_, _>>()?,
        })
    }
}

#[cfg(test)]
#[path = "import_tests.rs"]
mod tests;

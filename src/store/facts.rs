//! Gathering [`Facts`] for a message: what the directory knows about every address on it,
//! and which request it may belong to.

use std::collections::HashMap;

use sqlx::{AnyConnection, Row};

use crate::address::EmailAddress;
use crate::keys::{DeskKey, RequestKey};
use crate::message::InboundMessage;
use crate::policy::{
    AccountFacts, AccountKind, AccountStatus, Facts, Person, RequestStatus, Thread, ThreadMatch,
};

use super::directory::DirectoryIndex;
use super::{Context, StoreError, placeholders};

/// Database ids found while gathering facts, so applying the decision need not look
/// them up again.
#[derive(Debug, Clone, Default)]
pub struct Known {
    /// Existing accounts by canonical address: id, and whether it has a display name.
    pub accounts: HashMap<String, (i64, bool)>,
    /// The id of the request in `Facts::thread`.
    pub thread_request: Option<i64>,
}

/// Facts plus the ids behind them.
#[derive(Debug, Clone)]
pub struct Gathered {
    pub facts: Facts,
    pub known: Known,
}

/// What a batch has looked up so far: people by desk and address, and requests per
/// reporter in the last hour, so a batch asks the database once for all its messages
/// instead of once per message (every statement is a round trip).
///
/// The batch's own writes make entries stale: after applying a message the caller
/// [`forgets`](Lookups::forget) every address the message touched (or
/// [`clears`](Lookups::clear) everything, after a bounce), and counts the requests it
/// created ([`Lookups::created_request`]). Other writers (another instance, an admin)
/// are seen at the next batch, as they would be a moment later anyway.
#[derive(Debug, Default)]
pub struct Lookups {
    /// (desk, address) → the person and the id behind them.
    people: HashMap<(String, String), Looked>,
    /// (desk, reporter address) → requests created since `now - 1 h`, for the senders
    /// this batch has asked about.
    recent: HashMap<(String, String), i64>,
}

impl Lookups {
    /// Looks up `addresses` on `desk` (one query for everything not already known).
    pub async fn prefetch(
        &mut self,
        conn: &mut AnyConnection,
        desk: &DeskKey,
        addresses: &[&EmailAddress],
        orgs: &DirectoryIndex,
    ) -> Result<(), StoreError> {
        let missing: Vec<&EmailAddress> = addresses
            .iter()
            .copied()
            .filter(|a| {
                !self
                    .people
                    .contains_key(&(desk.to_string(), a.as_str().to_string()))
            })
            .collect();
        for part in missing.chunks(super::apply::CHUNK) {
            let found = lookup_people(conn, desk, part, orgs).await?;
            for (address, entry) in found {
                self.people.insert((desk.to_string(), address), entry);
            }
        }
        Ok(())
    }

    /// Counts the requests `senders` opened on `desk` in the hour before `now` (one
    /// query for those not already counted).
    pub async fn prefetch_recent(
        &mut self,
        conn: &mut AnyConnection,
        desk: &DeskKey,
        senders: &[&EmailAddress],
        now: i64,
    ) -> Result<(), StoreError> {
        let missing: Vec<&str> = senders
            .iter()
            .map(|a| a.as_str())
            .filter(|a| {
                !self
                    .recent
                    .contains_key(&(desk.to_string(), (*a).to_string()))
            })
            .collect();
        for part in missing.chunks(super::apply::CHUNK) {
            let sql = format!(
                "SELECT reporter_address, COUNT(*) FROM requests WHERE desk = $1 AND created_at >= $2 \
                 AND reporter_address IN ({}) GROUP BY reporter_address",
                placeholders(3, part.len())
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(desk.as_str())
                .bind(now - 3600);
            for a in part {
                q = q.bind(*a);
            }
            for a in part {
                self.recent.insert((desk.to_string(), (*a).to_string()), 0);
            }
            for row in q.fetch_all(&mut *conn).await.ctx("count recent requests")? {
                let address: String = row.try_get(0).ctx("read request count")?;
                let n: i64 = row.try_get(1).ctx("read request count")?;
                self.recent.insert((desk.to_string(), address), n);
            }
        }
        Ok(())
    }

    /// The batch created a request for `reporter` on `desk`.
    pub fn created_request(&mut self, desk: &DeskKey, reporter: &EmailAddress) {
        if let Some(n) = self
            .recent
            .get_mut(&(desk.to_string(), reporter.as_str().to_string()))
        {
            *n += 1;
        }
    }

    /// `address` may have changed: look it up again when next needed.
    pub fn forget(&mut self, address: &EmailAddress) {
        self.people.retain(|(_, a), _| a != address.as_str());
    }

    /// Everything may have changed.
    pub fn clear(&mut self) {
        self.people.clear();
    }
}

/// Builds the facts for `msg` on `desk`. `duplicate` comes from the ledger insert; a
/// duplicate needs no directory lookups (it will be ignored whatever they say).
/// `lookups` holds what the batch already knows (see [`Lookups`]).
#[allow(clippy::too_many_arguments)]
pub async fn gather_facts(
    conn: &mut AnyConnection,
    msg: &InboundMessage,
    desk: &DeskKey,
    orgs: &DirectoryIndex,
    now: i64,
    duplicate: bool,
    count_recent: bool,
    lookups: &mut Lookups,
) -> Result<Gathered, StoreError> {
    let mut known = Known::default();
    if duplicate {
        let mut facts = assemble_facts(msg, desk, orgs, now, HashMap::new());
        facts.duplicate = true;
        return Ok(Gathered { facts, known });
    }
    let mut seen = std::collections::HashSet::new();
    let addresses: Vec<&EmailAddress> = msg
        .from_mailbox()
        .into_iter()
        .chain(msg.recipients())
        .map(|m| &m.address)
        .filter(|a| seen.insert(*a))
        .collect();
    lookups.prefetch(conn, desk, &addresses, orgs).await?;
    let mut people = HashMap::with_capacity(addresses.len());
    for a in &addresses {
        let key = (desk.to_string(), a.as_str().to_string());
        let (person, id) = lookups.people.get(&key).cloned().ok_or_else(|| {
            StoreError::Corrupt(format!(
                "{a} was looked up but is not in the batch's lookups"
            ))
        })?;
        if let Some(id) = id {
            known.accounts.insert(key.1.clone(), id);
        }
        people.insert(key.1, person);
    }
    let mut facts = assemble_facts(msg, desk, orgs, now, people);
    if let Some((id, thread)) = find_thread(conn, msg, desk).await? {
        known.thread_request = Some(id);
        facts.thread = Some(thread);
    }
    if count_recent && let Some(s) = &facts.sender {
        lookups
            .prefetch_recent(conn, desk, &[&s.address], now)
            .await?;
        let n = lookups
            .recent
            .get(&(desk.to_string(), s.address.as_str().to_string()))
            .copied()
            .unwrap_or(0);
        facts.sender_recent_requests = u32::try_from(n).unwrap_or(u32::MAX);
    }
    Ok(Gathered { facts, known })
}

/// Facts from the message and what is `known` about its addresses (anyone not in
/// `known` is a stranger to the directory), without a thread and without counts. Pure:
/// also what the decision-path benchmark uses.
pub fn assemble_facts(
    msg: &InboundMessage,
    desk: &DeskKey,
    orgs: &DirectoryIndex,
    now: i64,
    mut known: HashMap<String, Person>,
) -> Facts {
    let mut person = |address: &EmailAddress, display_name: &Option<String>| -> Person {
        let mut p = known
            .remove(address.as_str())
            .unwrap_or_else(|| blank_person(address, desk, orgs));
        p.display_name = display_name.clone();
        p
    };
    let sender = msg
        .from_mailbox()
        .map(|s| person(&s.address, &s.display_name));
    let recipients: Vec<Person> = msg
        .recipients()
        .iter()
        .map(|r| match &sender {
            // The same address may be both sender and recipient; the lookup was shared.
            Some(s) if s.address == r.address => {
                let mut p = s.clone();
                p.display_name = r.display_name.clone();
                p
            }
            _ => person(&r.address, &r.display_name),
        })
        .collect();
    Facts {
        now,
        desk: desk.clone(),
        message_id: msg.message_id.clone(),
        duplicate: false,
        signals: msg.signals.clone(),
        auth_results: msg.auth_results.clone(),
        sender_confirmed: false,
        sender,
        sender_recent_requests: 0,
        recipients,
        invalid_recipients: msg.invalid_recipients.clone(),
        omitted_recipients: msg.omitted_recipients,
        thread: None,
    }
}

/// A person the directory knows nothing about yet, with the organizations their domain
/// would put them in.
fn blank_person(address: &EmailAddress, desk: &DeskKey, orgs: &DirectoryIndex) -> Person {
    let mut p = Person::new(address.clone());
    p.agent = orgs.is_agent(address.as_str(), desk.as_str());
    for org in orgs.matching(address.domain()) {
        p.domain_organizations.push(org.name.clone());
        if org.desks.iter().any(|d| d == desk.as_str()) {
            p.domain_desk_organizations.push(org.name.clone());
        }
    }
    p
}

/// A person as the directory knows them, and their account's id and whether it has a
/// display name.
type Looked = (Person, Option<(i64, bool)>);

/// Looks up accounts, memberships, desk-customer links and agents for `addresses`.
async fn lookup_people(
    conn: &mut AnyConnection,
    desk: &DeskKey,
    addresses: &[&EmailAddress],
    orgs: &DirectoryIndex,
) -> Result<HashMap<String, Looked>, StoreError> {
    let mut out: HashMap<String, Looked> = HashMap::with_capacity(addresses.len());
    if addresses.is_empty() {
        return Ok(out);
    }
    for a in addresses {
        out.insert(a.as_str().to_string(), (blank_person(a, desk, orgs), None));
    }

    // One query for accounts, their organizations and whether they are customers of
    // this desk (explicitly, or through an organization or group linked to it).
    let sql = format!(
        "SELECT a.id, a.address, a.kind, a.status, a.last_verification_sent_at, a.undeliverable_at, \
           CASE WHEN EXISTS (SELECT 1 FROM desk_customers dc WHERE dc.account_id = a.id AND dc.desk = $1) \
             OR EXISTS (SELECT 1 FROM organization_members m2 JOIN organization_desks od \
                        ON od.organization_id = m2.organization_id WHERE m2.account_id = a.id AND od.desk = $1) \
             OR EXISTS (SELECT 1 FROM group_members gm JOIN group_desks gd \
                        ON gd.group_id = gm.group_id WHERE gm.account_id = a.id AND gd.desk = $1) \
           THEN 1 ELSE 0 END AS desk_customer, o.name, \
           CASE WHEN a.display_name IS NULL THEN 0 ELSE 1 END AS named \
         FROM accounts a \
         LEFT JOIN organization_members m ON m.account_id = a.id \
         LEFT JOIN organizations o ON o.id = m.organization_id \
         WHERE a.address IN ({})",
        placeholders(2, addresses.len())
    );
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(desk.as_str());
    for a in addresses {
        q = q.bind(a.as_str());
    }
    let rows = q.fetch_all(&mut *conn).await.ctx("look up accounts")?;
    for row in rows {
        let address: String = row.try_get(1).ctx("read account")?;
        let org: Option<String> = row.try_get(7).ctx("read account")?;
        let Some((p, known)) = out.get_mut(&address) else {
            continue;
        };
        if p.account.is_none() {
            let id: i64 = row.try_get(0).ctx("read account")?;
            let named: i64 = row.try_get(8).ctx("read account")?;
            *known = Some((id, named != 0));
            let kind: String = row.try_get(2).ctx("read account")?;
            let status: String = row.try_get(3).ctx("read account")?;
            let last_sent: Option<i64> = row.try_get(4).ctx("read account")?;
            let undeliverable: Option<i64> = row.try_get(5).ctx("read account")?;
            let desk_customer: i64 = row.try_get(6).ctx("read account")?;
            let kind = AccountKind::parse(&kind).ok_or_else(|| {
                StoreError::Corrupt(format!("account {address} has kind {kind:?}"))
            })?;
            let status = AccountStatus::parse(&status).ok_or_else(|| {
                StoreError::Corrupt(format!("account {address} has status {status:?}"))
            })?;
            p.undeliverable = undeliverable.is_some();
            p.account = Some(AccountFacts {
                kind,
                status,
                organizations: Vec::new(),
                desk_customer: desk_customer != 0,
                last_verification_sent_at: last_sent,
            });
        }
        if let (Some(org), Some(acc)) = (org, p.account.as_mut()) {
            acc.organizations.push(org);
        }
    }
    Ok(out)
}

/// Whether finding `msg`'s request reads anything: it has In-Reply-To or References,
/// or a request key in its subject.
pub fn may_thread(msg: &InboundMessage) -> bool {
    !msg.in_reply_to.is_empty()
        || !msg.references.is_empty()
        || msg
            .subject
            .as_deref()
            .is_some_and(|s| !RequestKey::find_in_subject(s).is_empty())
}

/// Finds the request a reply belongs to: by In-Reply-To/References first, then by a
/// `[KEY-N]` in the subject (the policy checks the sender is on that request).
async fn find_thread(
    conn: &mut AnyConnection,
    msg: &InboundMessage,
    desk: &DeskKey,
) -> Result<Option<(i64, Thread)>, StoreError> {
    let mut ids: Vec<&str> = msg.in_reply_to.iter().map(String::as_str).collect();
    for r in msg.references.iter().rev() {
        if !ids.contains(&r.as_str()) {
            ids.push(r);
        }
    }
    ids.truncate(50);
    if !ids.is_empty() {
        let sql = format!(
            // Only requests that can be threaded into: a reply to an expired held
            // request falls through to the key in its subject.
            "SELECT t.request_id FROM thread_refs t JOIN requests r ON r.id = t.request_id \
             WHERE t.desk = $1 AND r.status IN ('open', 'held') AND t.message_id IN ({}) \
             ORDER BY t.request_id DESC LIMIT 1",
            placeholders(2, ids.len())
        );
        let mut q = sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql)).bind(desk.as_str());
        for id in &ids {
            q = q.bind(*id);
        }
        if let Some(request_id) = q.fetch_optional(&mut *conn).await.ctx("find thread")? {
            return load_thread(conn, request_id, ThreadMatch::MessageId).await;
        }
    }
    if let Some(subject) = &msg.subject {
        for key in RequestKey::find_in_subject(subject) {
            if key.desk() != desk {
                continue;
            }
            let id: Option<i64> = sqlx::query_scalar(
                "SELECT id FROM requests WHERE request_key = $1 AND status IN ('open', 'held')",
            )
            .bind(key.to_string())
            .fetch_optional(&mut *conn)
            .await
            .ctx("find request by key")?;
            if let Some(id) = id {
                return load_thread(conn, id, ThreadMatch::SubjectKey).await;
            }
        }
    }
    Ok(None)
}

async fn load_thread(
    conn: &mut AnyConnection,
    request_id: i64,
    matched_by: ThreadMatch,
) -> Result<Option<(i64, Thread)>, StoreError> {
    let Some(row) = sqlx::query(
        "SELECT request_key, status, reporter_address, reporter_account_id FROM requests WHERE id = $1",
    )
    .bind(request_id)
    .fetch_optional(&mut *conn)
    .await
    .ctx("load request")?
    else {
        return Ok(None);
    };
    let key: String = row.try_get(0).ctx("read request")?;
    let status: String = row.try_get(1).ctx("read request")?;
    let reporter: String = row.try_get(2).ctx("read request")?;
    let reporter_account: Option<i64> = row.try_get(3).ctx("read request")?;
    let Some(status) = RequestStatus::parse(&status) else {
        // Expired held requests are not threaded into.
        return Ok(None);
    };
    let key =
        RequestKey::parse(&key).map_err(|_| StoreError::Corrupt(format!("request key {key:?}")))?;
    let reporter = EmailAddress::parse(&reporter)
        .map_err(|_| StoreError::Corrupt(format!("reporter address {reporter:?}")))?;
    let participants: Vec<String> = sqlx::query_scalar(
        "SELECT a.address FROM participants p JOIN accounts a ON a.id = p.account_id WHERE p.request_id = $1",
    )
    .bind(request_id)
    .fetch_all(&mut *conn)
    .await
    .ctx("load participants")?;
    let reporter_organizations: Vec<String> = match reporter_account {
        Some(id) => sqlx::query_scalar(
            "SELECT o.name FROM organization_members m JOIN organizations o ON o.id = m.organization_id \
             WHERE m.account_id = $1",
        )
        .bind(id)
        .fetch_all(&mut *conn)
        .await
        .ctx("load reporter organizations")?,
        None => Vec::new(),
    };
    Ok(Some((
        request_id,
        Thread {
            key,
            status,
            matched_by,
            reporter,
            reporter_organizations,
            participants: participants
                .iter()
                .filter_map(|a| EmailAddress::parse(a).ok())
                .collect(),
        },
    )))
}

//! The directory as administrators change it from the command line: accounts,
//! organizations, desk customers and agents.
//!
//! Every row written here has origin `cli`, and every change writes an audit row (with no
//! ledger row, like expiry) indexed by the addresses it touched, so `intake audit ADDRESS`
//! answers "who added this person, and when". Rows that came from configuration (origin
//! `config`) are refused: [`Store::sync_directory`] would put them back, so the place to
//! change them is the configuration file. Each change is one write transaction that
//! checks what it changes inside that transaction.

use std::collections::{BTreeSet, HashMap};

use serde::Serialize;
use sqlx::{AnyConnection, Row};

use crate::address::{DomainPattern, EmailAddress};
use crate::keys::DeskKey;
use crate::policy::{AccountKind, AccountStatus};

use super::directory::DirectoryIndex;
use super::{Context, Store, StoreError, pg_only};

/// The origin of every row these commands write, and the reason code of their audit rows.
pub const CLI_ORIGIN: &str = "cli";

/// Why an administrative change was not made.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// What the change names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The change makes no sense as asked (a duplicate, merging an account into itself).
    #[error("{0}")]
    Refused(String),
    /// The row belongs to the `[directory]` section of the configuration.
    #[error(
        "{what} is managed in the configuration file ({section}); edit the configuration file instead"
    )]
    ConfigOwned { what: String, section: &'static str },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// When a change is made and by whom (the operator's login name, when known).
#[derive(Debug, Clone)]
pub struct Actor {
    pub now: i64,
    pub user: Option<String>,
}

/// An account to create with `intake accounts add`.
#[derive(Debug, Clone)]
pub struct NewAccount {
    pub address: EmailAddress,
    pub display_name: Option<String>,
    pub kind: AccountKind,
    pub organizations: Vec<String>,
    pub desks: Vec<DeskKey>,
}

/// What `accounts add` created.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AddedAccount {
    pub address: String,
    pub display_name: Option<String>,
    pub kind: String,
    pub status: String,
    pub origin: String,
    /// Named ones and those whose domains match the address.
    pub organizations: Vec<String>,
    pub desks: Vec<String>,
}

/// A status change; `changed` is false when the account already had that status.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct StatusChange {
    pub address: String,
    pub previous: String,
    pub status: String,
    pub changed: bool,
}

/// What a merge moved from one account to the other.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct MergeReport {
    pub from: String,
    pub into: String,
    /// Keys of the requests whose reporter is now `into`.
    pub requests: Vec<String>,
    /// Requests `from` took part in (`into` takes part in all of them now, unless it
    /// reports them).
    pub participations: Vec<String>,
    pub organizations: Vec<String>,
    pub groups: Vec<String>,
    pub desks: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct OrganizationRow {
    pub name: String,
    pub origin: String,
    pub domains: Vec<String>,
    pub desks: Vec<String>,
    pub members: i64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct MemberRow {
    pub address: String,
    pub display_name: Option<String>,
    pub kind: String,
    pub status: String,
    /// Who made the link: `config`, `mail` (domain match) or `cli`.
    pub origin: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct OrganizationDetail {
    #[serde(flatten)]
    pub organization: OrganizationRow,
    pub created_at: i64,
    pub member_list: Vec<MemberRow>,
}

/// One way an account is a customer of a desk.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DeskCustomerRow {
    pub address: String,
    pub display_name: Option<String>,
    pub kind: String,
    pub status: String,
    /// `direct` (a desk-customer link), `organization` or `group`.
    pub via: String,
    /// The organization or group, for `via` other than `direct`.
    pub via_name: Option<String>,
    /// Who made the link (for a group: the group's origin).
    pub origin: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AgentRow {
    pub address: String,
    pub display_name: Option<String>,
    pub desks: Vec<String>,
    pub origin: String,
}

/// The parts of an account a change looks at.
#[derive(Debug, Clone)]
struct AccountRef {
    id: i64,
    address: String,
    display_name: Option<String>,
    kind: String,
    status: String,
    origin: String,
    created_at: i64,
    verified_at: Option<i64>,
}

impl AccountRef {
    /// Refuses accounts the configuration owns.
    fn not_config(&self) -> Result<(), AdminError> {
        if self.origin == "config" {
            return Err(AdminError::ConfigOwned {
                what: format!("account {}", self.address),
                section: "[[directory.accounts]]",
            });
        }
        Ok(())
    }

    fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "address": self.address,
            "display_name": self.display_name,
            "kind": self.kind,
            "status": self.status,
            "origin": self.origin,
            "created_at": self.created_at,
            "verified_at": self.verified_at,
        })
    }
}

const ACCOUNT_COLUMNS: &str =
    "id, address, display_name, kind, status, origin, created_at, verified_at";

fn account_ref(row: &sqlx::any::AnyRow) -> Result<AccountRef, StoreError> {
    Ok(AccountRef {
        id: row.try_get(0).ctx("read account")?,
        address: row.try_get(1).ctx("read account")?,
        display_name: row.try_get(2).ctx("read account")?,
        kind: row.try_get(3).ctx("read account")?,
        status: row.try_get(4).ctx("read account")?,
        origin: row.try_get(5).ctx("read account")?,
        created_at: row.try_get(6).ctx("read account")?,
        verified_at: row.try_get(7).ctx("read account")?,
    })
}

/// The account of `address`, locked until the transaction ends (PostgreSQL; SQLite's
/// write transaction already excludes other writers).
async fn lock_account(
    conn: &mut AnyConnection,
    address: &EmailAddress,
) -> Result<AccountRef, AdminError> {
    let sql = format!(
        "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE address = $1{}",
        pg_only(conn, " FOR UPDATE")
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(address.as_str())
        .fetch_optional(&mut *conn)
        .await
        .ctx("look up an account")?
        .ok_or_else(|| AdminError::NotFound(format!("no account {address}")))?;
    Ok(account_ref(&row)?)
}

/// An organization's id and origin, locked like [`lock_account`].
async fn lock_organization(
    conn: &mut AnyConnection,
    name: &str,
) -> Result<(i64, String), AdminError> {
    let sql = format!(
        "SELECT id, origin FROM organizations WHERE name = $1{}",
        pg_only(conn, " FOR UPDATE")
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(name)
        .fetch_optional(&mut *conn)
        .await
        .ctx("look up an organization")?
        .ok_or_else(|| AdminError::NotFound(format!("no organization {name:?}")))?;
    Ok((
        row.try_get(0).ctx("read organization")?,
        row.try_get(1).ctx("read organization")?,
    ))
}

/// One audit row for an administrative change.
struct Note<'a> {
    /// `add_account`, `merge`, `add_member`, ...
    action: &'static str,
    desk: Option<&'a str>,
    explanation: String,
    /// Whatever else is worth keeping (merged into the stored decision object).
    details: serde_json::Value,
    /// `(address, role, outcome)` for every address the change touched.
    addresses: Vec<(String, String, &'static str)>,
}

/// Writes an audit row with no ledger row (the pattern of expiry's entries) and indexes
/// it by address, so `intake audit ADDRESS` lists it.
async fn write_audit(
    conn: &mut AnyConnection,
    actor: &Actor,
    note: Note<'_>,
) -> Result<(), StoreError> {
    let mut decision = serde_json::json!({
        "action": note.action,
        "reason": CLI_ORIGIN,
        "origin": CLI_ORIGIN,
        "explanation": note.explanation,
        "desk": note.desk,
        "user": actor.user,
    });
    if let (Some(obj), serde_json::Value::Object(details)) =
        (decision.as_object_mut(), note.details)
    {
        for (k, v) in details {
            obj.entry(k).or_insert(v);
        }
    }
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO audit (ledger_id, created_at, desk, action, reason, request_key, decision) \
         VALUES (NULL, $1, $2, $3, $4, NULL, $5) RETURNING id",
    )
    .bind(actor.now)
    .bind(note.desk)
    .bind(note.action)
    .bind(CLI_ORIGIN)
    .bind(decision.to_string())
    .fetch_one(&mut *conn)
    .await
    .ctx("write an audit row")?;
    for (address, role, outcome) in &note.addresses {
        sqlx::query(
            "INSERT INTO audit_addresses (audit_id, address, role, outcome, reason) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        )
        .bind(id)
        .bind(address.as_str())
        .bind(role.as_str())
        .bind(*outcome)
        .bind(CLI_ORIGIN)
        .execute(&mut *conn)
        .await
        .ctx("index an audit row")?;
    }
    Ok(())
}

/// Names in the order given, without repeats.
fn unique<T: Clone + Ord>(items: &[T]) -> Vec<T> {
    let mut seen = BTreeSet::new();
    items
        .iter()
        .filter(|i| seen.insert((*i).clone()))
        .cloned()
        .collect()
}

impl Store {
    /// Creates an active account with origin `cli`, joined to the named organizations and
    /// to those whose domains match the address (as accounts created from mail are), and
    /// a direct customer of `desks`. Refuses an address that already has an account.
    pub async fn add_account(
        &self,
        actor: &Actor,
        new: &NewAccount,
    ) -> Result<AddedAccount, AdminError> {
        let mut wtx = self.begin_write().await?;
        let conn = wtx.conn();
        let address = new.address.as_str();
        let existing: Option<String> =
            sqlx::query_scalar("SELECT origin FROM accounts WHERE address = $1")
                .bind(address)
                .fetch_optional(&mut *conn)
                .await
                .ctx("look up an account")?;
        if let Some(origin) = existing {
            return Err(AdminError::Refused(format!(
                "{address} already has an account (origin {origin}); see `intake accounts show {address}`"
            )));
        }
        let mut orgs: Vec<(i64, String)> = Vec::new();
        for name in unique(&new.organizations) {
            let (id, _) = lock_organization(conn, &name).await?;
            orgs.push((id, name));
        }
        let index = DirectoryIndex::load(conn).await?;
        for o in index.matching(new.address.domain()) {
            if !orgs.iter().any(|(id, _)| *id == o.id) {
                orgs.push((o.id, o.name.clone()));
            }
        }
        let id: Option<i64> = sqlx::query_scalar(
            "INSERT INTO accounts (address, display_name, kind, status, origin, created_at, updated_at, verified_at) \
             VALUES ($1, $2, $3, 'active', $4, $5, $5, $5) ON CONFLICT (address) DO NOTHING RETURNING id",
        )
        .bind(address)
        .bind(new.display_name.as_deref())
        .bind(new.kind.as_str())
        .bind(CLI_ORIGIN)
        .bind(actor.now)
        .fetch_optional(&mut *conn)
        .await
        .ctx("create an account")?;
        let Some(id) = id else {
            return Err(AdminError::Refused(format!(
                "{address} already has an account"
            )));
        };
        for (org, _) in &orgs {
            sqlx::query(
                "INSERT INTO organization_members (organization_id, account_id, origin) \
                 VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            )
            .bind(*org)
            .bind(id)
            .bind(CLI_ORIGIN)
            .execute(&mut *conn)
            .await
            .ctx("join an organization")?;
        }
        let desks: Vec<String> = unique(&new.desks)
            .iter()
            .map(|d| d.as_str().to_string())
            .collect();
        for desk in &desks {
            sqlx::query(
                "INSERT INTO desk_customers (desk, account_id, origin) VALUES ($1, $2, $3) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(desk.as_str())
            .bind(id)
            .bind(CLI_ORIGIN)
            .execute(&mut *conn)
            .await
            .ctx("add a desk customer")?;
        }
        let mut organizations: Vec<String> = orgs.into_iter().map(|(_, n)| n).collect();
        organizations.sort();
        let added = AddedAccount {
            address: address.to_string(),
            display_name: new.display_name.clone(),
            kind: new.kind.as_str().to_string(),
            status: AccountStatus::Active.as_str().to_string(),
            origin: CLI_ORIGIN.to_string(),
            organizations,
            desks,
        };
        write_audit(
            conn,
            actor,
            Note {
                action: "add_account",
                desk: None,
                explanation: format!(
                    "{address} was given an active {} account from the command line",
                    added.kind
                ),
                details: serde_json::json!({
                    "address": address,
                    "display_name": added.display_name,
                    "kind": added.kind,
                    "organizations": added.organizations,
                    "desks": added.desks,
                }),
                addresses: vec![(address.to_string(), "account".into(), "added")],
            },
        )
        .await?;
        wtx.commit().await?;
        Ok(added)
    }

    /// Deactivates (`Deactivated`) or reactivates (`Active`) an account. Reactivation
    /// applies to deactivated accounts only: a pending one has not confirmed its address.
    pub async fn set_account_status(
        &self,
        actor: &Actor,
        address: &EmailAddress,
        status: AccountStatus,
    ) -> Result<StatusChange, AdminError> {
        let mut wtx = self.begin_write().await?;
        let conn = wtx.conn();
        let acc = lock_account(conn, address).await?;
        acc.not_config()?;
        let mut change = StatusChange {
            address: acc.address.clone(),
            previous: acc.status.clone(),
            status: status.as_str().to_string(),
            changed: acc.status != status.as_str(),
        };
        if !change.changed {
            wtx.rollback().await?;
            return Ok(change);
        }
        let (action, outcome) = match status {
            AccountStatus::Deactivated => ("deactivate", "deactivated"),
            AccountStatus::Active if acc.status == AccountStatus::Pending.as_str() => {
                return Err(AdminError::Refused(format!(
                    "{address} is pending: it has not confirmed its address, and only a \
                     deactivated account can be reactivated"
                )));
            }
            AccountStatus::Active => ("reactivate", "reactivated"),
            AccountStatus::Pending => {
                return Err(AdminError::Refused(
                    "an account cannot be made pending again".into(),
                ));
            }
        };
        sqlx::query("UPDATE accounts SET status = $1, updated_at = $2 WHERE id = $3")
            .bind(status.as_str())
            .bind(actor.now)
            .bind(acc.id)
            .execute(&mut *conn)
            .await
            .ctx("change an account's status")?;
        write_audit(
            conn,
            actor,
            Note {
                action,
                desk: None,
                explanation: format!(
                    "{address} was {outcome} from the command line (it was {})",
                    acc.status
                ),
                details: serde_json::json!({
                    "address": address.as_str(),
                    "previous_status": acc.status,
                    "status": status.as_str(),
                }),
                addresses: vec![(acc.address.clone(), "account".into(), outcome)],
            },
        )
        .await?;
        wtx.commit().await?;
        change.changed = true;
        Ok(change)
    }

    /// Clears an account's undeliverable mark (a permanent bounce of our mail, or a relay
    /// refusing the address) and its soft-bounce count: mail to it is queued again.
    /// Returns since when it was marked; `None` when it was not (nothing changes).
    pub async fn mark_deliverable(
        &self,
        actor: &Actor,
        address: &EmailAddress,
    ) -> Result<Option<i64>, AdminError> {
        let mut wtx = self.begin_write().await?;
        let conn = wtx.conn();
        let acc = lock_account(conn, address).await?;
        let since: Option<i64> =
            sqlx::query_scalar("SELECT undeliverable_at FROM accounts WHERE id = $1")
                .bind(acc.id)
                .fetch_one(&mut *conn)
                .await
                .ctx("read an account")?;
        let Some(since) = since else {
            wtx.rollback().await?;
            return Ok(None);
        };
        sqlx::query(
            "UPDATE accounts SET undeliverable_at = NULL, soft_bounces = 0, updated_at = $1 \
             WHERE id = $2",
        )
        .bind(actor.now)
        .bind(acc.id)
        .execute(&mut *conn)
        .await
        .ctx("mark an address deliverable")?;
        write_audit(
            conn,
            actor,
            Note {
                action: "mark_deliverable",
                desk: None,
                explanation: format!(
                    "{address} was marked deliverable again from the command line \
                     (undeliverable since {since})"
                ),
                details: serde_json::json!({
                    "address": address.as_str(),
                    "undeliverable_since": since,
                }),
                addresses: vec![(acc.address.clone(), "account".into(), "deliverable")],
            },
        )
        .await?;
        wtx.commit().await?;
        Ok(Some(since))
    }

    /// Sets an account's display name. Returns the previous one, and whether it changed.
    pub async fn rename_account(
        &self,
        actor: &Actor,
        address: &EmailAddress,
        name: &str,
    ) -> Result<(Option<String>, bool), AdminError> {
        let mut wtx = self.begin_write().await?;
        let conn = wtx.conn();
        let acc = lock_account(conn, address).await?;
        acc.not_config()?;
        if acc.display_name.as_deref() == Some(name) {
            wtx.rollback().await?;
            return Ok((acc.display_name, false));
        }
        sqlx::query("UPDATE accounts SET display_name = $1, updated_at = $2 WHERE id = $3")
            .bind(name)
            .bind(actor.now)
            .bind(acc.id)
            .execute(&mut *conn)
            .await
            .ctx("rename an account")?;
        write_audit(
            conn,
            actor,
            Note {
                action: "rename",
                desk: None,
                explanation: format!("{address} was renamed to {name:?} from the command line"),
                details: serde_json::json!({
                    "address": address.as_str(),
                    "previous_name": acc.display_name,
                    "display_name": name,
                }),
                addresses: vec![(acc.address.clone(), "account".into(), "renamed")],
            },
        )
        .await?;
        wtx.commit().await?;
        Ok((acc.display_name, true))
    }

    /// Moves everything of `from` to `into` — reported requests, participations,
    /// organization, group and desk-customer memberships — and removes `from`. Links
    /// `into` already has are kept as they are; `into` does not become a participant of
    /// a request it now reports. The audit row keeps `from`'s address and account as it
    /// was, and `intake audit FROM` still lists its history.
    pub async fn merge_accounts(
        &self,
        actor: &Actor,
        from: &EmailAddress,
        into: &EmailAddress,
    ) -> Result<MergeReport, AdminError> {
        if from == into {
            return Err(AdminError::Refused(format!(
                "cannot merge {from} into itself"
            )));
        }
        let mut wtx = self.begin_write().await?;
        let conn = wtx.conn();
        // Both rows locked in one statement, in id order, so two merges running at once
        // in opposite directions cannot deadlock.
        let sql = format!(
            "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE address IN ($1, $2) ORDER BY id{}",
            pg_only(conn, " FOR UPDATE")
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(from.as_str())
            .bind(into.as_str())
            .fetch_all(&mut *conn)
            .await
            .ctx("look up accounts")?;
        let mut accounts: HashMap<String, AccountRef> = HashMap::new();
        for row in &rows {
            let a = account_ref(row)?;
            accounts.insert(a.address.clone(), a);
        }
        let src = accounts
            .remove(from.as_str())
            .ok_or_else(|| AdminError::NotFound(format!("no account {from}")))?;
        let dst = accounts
            .remove(into.as_str())
            .ok_or_else(|| AdminError::NotFound(format!("no account {into}")))?;
        // The configuration would create `from` again at the next sync.
        src.not_config()?;

        let requests: Vec<String> = sqlx::query_scalar(
            "SELECT request_key FROM requests WHERE reporter_account_id = $1 ORDER BY id",
        )
        .bind(src.id)
        .fetch_all(&mut *conn)
        .await
        .ctx("find reported requests")?;
        let participations: Vec<String> = sqlx::query_scalar(
            "SELECT r.request_key FROM participants p JOIN requests r ON r.id = p.request_id \
             WHERE p.account_id = $1 ORDER BY r.id",
        )
        .bind(src.id)
        .fetch_all(&mut *conn)
        .await
        .ctx("find participations")?;
        let organizations: Vec<String> = sqlx::query_scalar(
            "SELECT o.name FROM organization_members m JOIN organizations o ON o.id = m.organization_id \
             WHERE m.account_id = $1 ORDER BY o.name",
        )
        .bind(src.id)
        .fetch_all(&mut *conn)
        .await
        .ctx("find organizations")?;
        let groups: Vec<String> = sqlx::query_scalar(
            "SELECT g.name FROM group_members m JOIN customer_groups g ON g.id = m.group_id \
             WHERE m.account_id = $1 ORDER BY g.name",
        )
        .bind(src.id)
        .fetch_all(&mut *conn)
        .await
        .ctx("find groups")?;
        let desks: Vec<String> = sqlx::query_scalar(
            "SELECT desk FROM desk_customers WHERE account_id = $1 ORDER BY desk",
        )
        .bind(src.id)
        .fetch_all(&mut *conn)
        .await
        .ctx("find desks")?;

        // `into` reports these now; a reporter is never also a participant.
        sqlx::query(
            "DELETE FROM participants WHERE account_id = $1 \
             AND request_id IN (SELECT id FROM requests WHERE reporter_account_id = $2)",
        )
        .bind(dst.id)
        .bind(src.id)
        .execute(&mut *conn)
        .await
        .ctx("merge requests")?;
        sqlx::query(
            "UPDATE requests SET reporter_account_id = $1, reporter_address = $2 \
             WHERE reporter_account_id = $3",
        )
        .bind(dst.id)
        .bind(dst.address.as_str())
        .bind(src.id)
        .execute(&mut *conn)
        .await
        .ctx("merge requests")?;
        // Each statement copies what `into` lacks (ON CONFLICT DO NOTHING), then
        // deleting `from` removes its own rows (they cascade).
        let copies: [(&str, &'static str); 4] = [
            (
                "INSERT INTO participants (request_id, account_id, added_at) \
                 SELECT p.request_id, $1, p.added_at FROM participants p \
                 JOIN requests r ON r.id = p.request_id \
                 WHERE p.account_id = $2 AND (r.reporter_account_id IS NULL OR r.reporter_account_id <> $1) \
                 ON CONFLICT DO NOTHING",
                "merge participations",
            ),
            (
                "INSERT INTO organization_members (organization_id, account_id, origin) \
                 SELECT organization_id, $1, 'cli' FROM organization_members WHERE account_id = $2 \
                 ON CONFLICT DO NOTHING",
                "merge organization memberships",
            ),
            (
                "INSERT INTO group_members (group_id, account_id) \
                 SELECT group_id, $1 FROM group_members WHERE account_id = $2 \
                 ON CONFLICT DO NOTHING",
                "merge group memberships",
            ),
            (
                "INSERT INTO desk_customers (desk, account_id, origin) \
                 SELECT desk, $1, 'cli' FROM desk_customers WHERE account_id = $2 \
                 ON CONFLICT DO NOTHING",
                "merge desk customers",
            ),
        ];
        for (sql, what) in copies {
            sqlx::query(sql)
                .bind(dst.id)
                .bind(src.id)
                .execute(&mut *conn)
                .await
                .ctx(what)?;
        }
        // The name of the person is kept when `into` has none (configuration owns the
        // names of its accounts).
        if dst.origin != "config" && dst.display_name.is_none() && src.display_name.is_some() {
            sqlx::query("UPDATE accounts SET display_name = $1, updated_at = $2 WHERE id = $3")
                .bind(src.display_name.as_deref())
                .bind(actor.now)
                .bind(dst.id)
                .execute(&mut *conn)
                .await
                .ctx("merge display names")?;
        }
        sqlx::query("DELETE FROM accounts WHERE id = $1")
            .bind(src.id)
            .execute(&mut *conn)
            .await
            .ctx("remove a merged account")?;
        let report = MergeReport {
            from: src.address.clone(),
            into: dst.address.clone(),
            requests,
            participations,
            organizations,
            groups,
            desks,
        };
        write_audit(
            conn,
            actor,
            Note {
                action: "merge",
                desk: None,
                explanation: format!(
                    "the account {from} was merged into {into} from the command line and removed"
                ),
                details: serde_json::json!({
                    "from": src.summary(),
                    "into": dst.address,
                    "requests": report.requests,
                    "participations": report.participations,
                    "organizations": report.organizations,
                    "groups": report.groups,
                    "desks": report.desks,
                }),
                addresses: vec![
                    (src.address.clone(), "merged_from".into(), "merged"),
                    (dst.address.clone(), "merged_into".into(), "merged"),
                ],
            },
        )
        .await?;
        wtx.commit().await?;
        Ok(report)
    }

    /// Every organization with its domains, desks and number of members.
    pub async fn list_organizations(&self) -> Result<Vec<OrganizationRow>, StoreError> {
        let mut conn = self.acquire().await?;
        let rows = sqlx::query(
            "SELECT o.id, o.name, o.origin, \
               (SELECT COUNT(*) FROM organization_members m WHERE m.organization_id = o.id) \
             FROM organizations o ORDER BY o.name",
        )
        .fetch_all(&mut *conn)
        .await
        .ctx("list organizations")?;
        let mut domains = pairs(
            &mut conn,
            "SELECT organization_id, pattern FROM organization_domains ORDER BY pattern",
            "list organization domains",
        )
        .await?;
        let mut desks = pairs(
            &mut conn,
            "SELECT organization_id, desk FROM organization_desks ORDER BY desk",
            "list organization desks",
        )
        .await?;
        rows.iter()
            .map(|row| {
                let id: i64 = row.try_get(0).ctx("read organization")?;
                Ok(OrganizationRow {
                    name: row.try_get(1).ctx("read organization")?,
                    origin: row.try_get(2).ctx("read organization")?,
                    domains: domains.remove(&id).unwrap_or_default(),
                    desks: desks.remove(&id).unwrap_or_default(),
                    members: row.try_get(3).ctx("read organization")?,
                })
            })
            .collect()
    }

    /// One organization with its members.
    pub async fn show_organization(&self, name: &str) -> Result<OrganizationDetail, AdminError> {
        let mut conn = self.acquire().await?;
        let row =
            sqlx::query("SELECT id, name, origin, created_at FROM organizations WHERE name = $1")
                .bind(name)
                .fetch_optional(&mut *conn)
                .await
                .ctx("load an organization")?
                .ok_or_else(|| AdminError::NotFound(format!("no organization {name:?}")))?;
        let id: i64 = row.try_get(0).ctx("read organization")?;
        let column = |sql: &'static str| sqlx::query_scalar::<_, String>(sql).bind(id);
        let domains = column(
            "SELECT pattern FROM organization_domains WHERE organization_id = $1 ORDER BY pattern",
        )
        .fetch_all(&mut *conn)
        .await
        .ctx("load organization domains")?;
        let desks =
            column("SELECT desk FROM organization_desks WHERE organization_id = $1 ORDER BY desk")
                .fetch_all(&mut *conn)
                .await
                .ctx("load organization desks")?;
        let member_list = sqlx::query(
            "SELECT a.address, a.display_name, a.kind, a.status, m.origin \
             FROM organization_members m JOIN accounts a ON a.id = m.account_id \
             WHERE m.organization_id = $1 ORDER BY a.address",
        )
        .bind(id)
        .fetch_all(&mut *conn)
        .await
        .ctx("load organization members")?
        .iter()
        .map(|r| {
            Ok(MemberRow {
                address: r.try_get(0).ctx("read member")?,
                display_name: r.try_get(1).ctx("read member")?,
                kind: r.try_get(2).ctx("read member")?,
                status: r.try_get(3).ctx("read member")?,
                origin: r.try_get(4).ctx("read member")?,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(OrganizationDetail {
            organization: OrganizationRow {
                name: row.try_get(1).ctx("read organization")?,
                origin: row.try_get(2).ctx("read organization")?,
                domains,
                desks,
                members: member_list.len() as i64,
            },
            created_at: row.try_get(3).ctx("read organization")?,
            member_list,
        })
    }

    /// Creates an organization with origin `cli`. Its domains assign accounts created
    /// from now on; existing accounts are joined with `add-member`.
    pub async fn add_organization(
        &self,
        actor: &Actor,
        name: &str,
        domains: &[DomainPattern],
        desks: &[DeskKey],
    ) -> Result<OrganizationRow, AdminError> {
        let mut wtx = self.begin_write().await?;
        let conn = wtx.conn();
        let id: Option<i64> = sqlx::query_scalar(
            "INSERT INTO organizations (name, origin, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO NOTHING RETURNING id",
        )
        .bind(name)
        .bind(CLI_ORIGIN)
        .bind(actor.now)
        .fetch_optional(&mut *conn)
        .await
        .ctx("create an organization")?;
        let Some(id) = id else {
            return Err(AdminError::Refused(format!(
                "organization {name:?} already exists"
            )));
        };
        let domains: Vec<String> =
            unique(&domains.iter().map(|d| d.to_string()).collect::<Vec<_>>());
        let desks: Vec<String> = unique(
            &desks
                .iter()
                .map(|d| d.as_str().to_string())
                .collect::<Vec<_>>(),
        );
        for d in &domains {
            sqlx::query(
                "INSERT INTO organization_domains (organization_id, pattern) VALUES ($1, $2) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(id)
            .bind(d.as_str())
            .execute(&mut *conn)
            .await
            .ctx("add an organization domain")?;
        }
        for d in &desks {
            sqlx::query(
                "INSERT INTO organization_desks (organization_id, desk) VALUES ($1, $2) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(id)
            .bind(d.as_str())
            .execute(&mut *conn)
            .await
            .ctx("link an organization to a desk")?;
        }
        write_audit(
            conn,
            actor,
            Note {
                action: "add_organization",
                desk: None,
                explanation: format!("organization {name:?} was created from the command line"),
                details: serde_json::json!({
                    "organization": name,
                    "domains": domains,
                    "desks": desks,
                }),
                addresses: Vec::new(),
            },
        )
        .await?;
        wtx.commit().await?;
        Ok(OrganizationRow {
            name: name.to_string(),
            origin: CLI_ORIGIN.to_string(),
            domains,
            desks,
            members: 0,
        })
    }

    /// Removes an organization made with the CLI, and with it its memberships, domains
    /// and desk links. Returns the addresses that were members.
    pub async fn remove_organization(
        &self,
        actor: &Actor,
        name: &str,
    ) -> Result<Vec<String>, AdminError> {
        let mut wtx = self.begin_write().await?;
        let conn = wtx.conn();
        let (id, origin) = lock_organization(conn, name).await?;
        if origin == "config" {
            return Err(AdminError::ConfigOwned {
                what: format!("organization {name:?}"),
                section: "[[directory.organizations]]",
            });
        }
        let members: Vec<String> = sqlx::query_scalar(
            "SELECT a.address FROM organization_members m JOIN accounts a ON a.id = m.account_id \
             WHERE m.organization_id = $1 ORDER BY a.address",
        )
        .bind(id)
        .fetch_all(&mut *conn)
        .await
        .ctx("find organization members")?;
        // Memberships, domains and desk links cascade.
        sqlx::query("DELETE FROM organizations WHERE id = $1")
            .bind(id)
            .execute(&mut *conn)
            .await
            .ctx("remove an organization")?;
        let role = format!("member:{name}");
        write_audit(
            conn,
            actor,
            Note {
                action: "remove_organization",
                desk: None,
                explanation: format!(
                    "organization {name:?} was removed from the command line, with its {} member(s)",
                    members.len()
                ),
                details: serde_json::json!({ "organization": name, "members": members }),
                addresses: members
                    .iter()
                    .map(|m| (m.clone(), role.clone(), "removed"))
                    .collect(),
            },
        )
        .await?;
        wtx.commit().await?;
        Ok(members)
    }

    /// Makes an account a member of an organization (origin `cli`).
    pub async fn add_organization_member(
        &self,
        actor: &Actor,
        name: &str,
        address: &EmailAddress,
    ) -> Result<(), AdminError> {
        let mut wtx = self.begin_write().await?;
        let conn = wtx.conn();
        let (org, _) = lock_organization(conn, name).await?;
        let acc = lock_account(conn, address).await?;
        let done = sqlx::query(
            "INSERT INTO organization_members (organization_id, account_id, origin) \
             VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(org)
        .bind(acc.id)
        .bind(CLI_ORIGIN)
        .execute(&mut *conn)
        .await
        .ctx("add an organization member")?;
        if done.rows_affected() == 0 {
            return Err(AdminError::Refused(format!(
                "{address} is already a member of {name:?}"
            )));
        }
        write_audit(
            conn,
            actor,
            Note {
                action: "add_member",
                desk: None,
                explanation: format!(
                    "{address} was made a member of organization {name:?} from the command line"
                ),
                details: serde_json::json!({ "organization": name, "address": address.as_str() }),
                addresses: vec![(acc.address, format!("member:{name}"), "added")],
            },
        )
        .await?;
        wtx.commit().await?;
        Ok(())
    }

    /// Removes a membership that the configuration did not make.
    pub async fn remove_organization_member(
        &self,
        actor: &Actor,
        name: &str,
        address: &EmailAddress,
    ) -> Result<(), AdminError> {
        let mut wtx = self.begin_write().await?;
        let conn = wtx.conn();
        let (org, _) = lock_organization(conn, name).await?;
        let acc = lock_account(conn, address).await?;
        let origin: Option<String> = sqlx::query_scalar(
            "SELECT origin FROM organization_members WHERE organization_id = $1 AND account_id = $2",
        )
        .bind(org)
        .bind(acc.id)
        .fetch_optional(&mut *conn)
        .await
        .ctx("find a membership")?;
        match origin.as_deref() {
            None => {
                return Err(AdminError::NotFound(format!(
                    "{address} is not a member of {name:?}"
                )));
            }
            Some("config") => {
                return Err(AdminError::ConfigOwned {
                    what: format!("the membership of {address} in {name:?}"),
                    section: "[[directory.accounts]] organizations",
                });
            }
            Some(_) => {}
        }
        sqlx::query(
            "DELETE FROM organization_members WHERE organization_id = $1 AND account_id = $2",
        )
        .bind(org)
        .bind(acc.id)
        .execute(&mut *conn)
        .await
        .ctx("remove an organization member")?;
        write_audit(
            conn,
            actor,
            Note {
                action: "remove_member",
                desk: None,
                explanation: format!(
                    "{address} was removed from organization {name:?} from the command line"
                ),
                details: serde_json::json!({
                    "organization": name,
                    "address": address.as_str(),
                    "previous_origin": origin,
                }),
                addresses: vec![(acc.address, format!("member:{name}"), "removed")],
            },
        )
        .await?;
        wtx.commit().await?;
        Ok(())
    }

    /// Everyone who is a customer of `desk`: directly, or through an organization or a
    /// group linked to it (one row per way).
    pub async fn list_desk_customers(
        &self,
        desk: &DeskKey,
    ) -> Result<Vec<DeskCustomerRow>, StoreError> {
        let mut conn = self.acquire().await?;
        let rows = sqlx::query(
            "SELECT a.address, a.display_name, a.kind, a.status, 'direct' AS via, \
               CAST(NULL AS TEXT) AS via_name, dc.origin \
             FROM desk_customers dc JOIN accounts a ON a.id = dc.account_id WHERE dc.desk = $1 \
             UNION ALL \
             SELECT a.address, a.display_name, a.kind, a.status, 'organization', o.name, m.origin \
             FROM organization_desks od JOIN organizations o ON o.id = od.organization_id \
             JOIN organization_members m ON m.organization_id = od.organization_id \
             JOIN accounts a ON a.id = m.account_id WHERE od.desk = $1 \
             UNION ALL \
             SELECT a.address, a.display_name, a.kind, a.status, 'group', g.name, g.origin \
             FROM group_desks gd JOIN customer_groups g ON g.id = gd.group_id \
             JOIN group_members gm ON gm.group_id = gd.group_id \
             JOIN accounts a ON a.id = gm.account_id WHERE gd.desk = $1 \
             ORDER BY 1, 5, 6",
        )
        .bind(desk.as_str())
        .fetch_all(&mut *conn)
        .await
        .ctx("list desk customers")?;
        rows.iter()
            .map(|r| {
                Ok(DeskCustomerRow {
                    address: r.try_get(0).ctx("read desk customer")?,
                    display_name: r.try_get(1).ctx("read desk customer")?,
                    kind: r.try_get(2).ctx("read desk customer")?,
                    status: r.try_get(3).ctx("read desk customer")?,
                    via: r.try_get(4).ctx("read desk customer")?,
                    via_name: r.try_get(5).ctx("read desk customer")?,
                    origin: r.try_get(6).ctx("read desk customer")?,
                })
            })
            .collect()
    }

    /// Makes an account a direct customer of `desk` (origin `cli`).
    pub async fn add_desk_customer(
        &self,
        actor: &Actor,
        desk: &DeskKey,
        address: &EmailAddress,
    ) -> Result<(), AdminError> {
        let mut wtx = self.begin_write().await?;
        let conn = wtx.conn();
        let acc = lock_account(conn, address).await?;
        let done = sqlx::query(
            "INSERT INTO desk_customers (desk, account_id, origin) VALUES ($1, $2, $3) \
             ON CONFLICT DO NOTHING",
        )
        .bind(desk.as_str())
        .bind(acc.id)
        .bind(CLI_ORIGIN)
        .execute(&mut *conn)
        .await
        .ctx("add a desk customer")?;
        if done.rows_affected() == 0 {
            return Err(AdminError::Refused(format!(
                "{address} is already a customer of desk {desk}"
            )));
        }
        write_audit(
            conn,
            actor,
            Note {
                action: "add_customer",
                desk: Some(desk.as_str()),
                explanation: format!(
                    "{address} was made a customer of desk {desk} from the command line"
                ),
                details: serde_json::json!({ "address": address.as_str() }),
                addresses: vec![(acc.address, "customer".into(), "added")],
            },
        )
        .await?;
        wtx.commit().await?;
        Ok(())
    }

    /// Removes a direct desk-customer link the configuration did not make. Returns the
    /// organizations and groups through which the account is still a customer.
    pub async fn remove_desk_customer(
        &self,
        actor: &Actor,
        desk: &DeskKey,
        address: &EmailAddress,
    ) -> Result<Vec<String>, AdminError> {
        let mut wtx = self.begin_write().await?;
        let conn = wtx.conn();
        let acc = lock_account(conn, address).await?;
        let origin: Option<String> = sqlx::query_scalar(
            "SELECT origin FROM desk_customers WHERE desk = $1 AND account_id = $2",
        )
        .bind(desk.as_str())
        .bind(acc.id)
        .fetch_optional(&mut *conn)
        .await
        .ctx("find a desk customer")?;
        let through: Vec<String> = sqlx::query_scalar(
            "SELECT 'organization ' || o.name FROM organization_desks od \
             JOIN organizations o ON o.id = od.organization_id \
             JOIN organization_members m ON m.organization_id = od.organization_id \
             WHERE od.desk = $1 AND m.account_id = $2 \
             UNION ALL SELECT 'group ' || g.name FROM group_desks gd \
             JOIN customer_groups g ON g.id = gd.group_id \
             JOIN group_members gm ON gm.group_id = gd.group_id \
             WHERE gd.desk = $1 AND gm.account_id = $2 ORDER BY 1",
        )
        .bind(desk.as_str())
        .bind(acc.id)
        .fetch_all(&mut *conn)
        .await
        .ctx("find desk links")?;
        match origin.as_deref() {
            None if through.is_empty() => {
                return Err(AdminError::NotFound(format!(
                    "{address} is not a customer of desk {desk}"
                )));
            }
            None => {
                return Err(AdminError::NotFound(format!(
                    "{address} is not a direct customer of desk {desk}; it is one through {}",
                    through.join(", ")
                )));
            }
            Some("config") => {
                return Err(AdminError::ConfigOwned {
                    what: format!("{address} as a customer of desk {desk}"),
                    section: "[[directory.accounts]] desks",
                });
            }
            Some(_) => {}
        }
        sqlx::query("DELETE FROM desk_customers WHERE desk = $1 AND account_id = $2")
            .bind(desk.as_str())
            .bind(acc.id)
            .execute(&mut *conn)
            .await
            .ctx("remove a desk customer")?;
        write_audit(
            conn,
            actor,
            Note {
                action: "remove_customer",
                desk: Some(desk.as_str()),
                explanation: format!(
                    "{address} was removed as a customer of desk {desk} from the command line"
                ),
                details: serde_json::json!({
                    "address": address.as_str(),
                    "previous_origin": origin,
                    "still_through": through,
                }),
                addresses: vec![(acc.address, "customer".into(), "removed")],
            },
        )
        .await?;
        wtx.commit().await?;
        Ok(through)
    }

    /// Every agent with its desks.
    pub async fn list_agents(&self) -> Result<Vec<AgentRow>, StoreError> {
        let mut conn = self.acquire().await?;
        let rows =
            sqlx::query("SELECT id, address, display_name, origin FROM agents ORDER BY address")
                .fetch_all(&mut *conn)
                .await
                .ctx("list agents")?;
        let mut desks = pairs(
            &mut conn,
            "SELECT agent_id, desk FROM agent_desks ORDER BY desk",
            "list agent desks",
        )
        .await?;
        rows.iter()
            .map(|r| {
                let id: i64 = r.try_get(0).ctx("read agent")?;
                Ok(AgentRow {
                    address: r.try_get(1).ctx("read agent")?,
                    display_name: r.try_get(2).ctx("read agent")?,
                    desks: desks.remove(&id).unwrap_or_default(),
                    origin: r.try_get(3).ctx("read agent")?,
                })
            })
            .collect()
    }

    /// Makes `address` an agent of `desks` (origin `cli`); an agent made with the CLI
    /// before gets the desks it does not have yet. Returns the desks added.
    pub async fn add_agent(
        &self,
        actor: &Actor,
        address: &EmailAddress,
        display_name: Option<&str>,
        desks: &[DeskKey],
    ) -> Result<Vec<String>, AdminError> {
        let mut wtx = self.begin_write().await?;
        let conn = wtx.conn();
        let sql = format!(
            "SELECT id, origin FROM agents WHERE address = $1{}",
            pg_only(conn, " FOR UPDATE")
        );
        let existing = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(address.as_str())
            .fetch_optional(&mut *conn)
            .await
            .ctx("look up an agent")?;
        let id: i64 = match existing {
            Some(row) => {
                let origin: String = row.try_get(1).ctx("read agent")?;
                if origin == "config" {
                    return Err(AdminError::ConfigOwned {
                        what: format!("agent {address}"),
                        section: "[[directory.agents]]",
                    });
                }
                let id: i64 = row.try_get(0).ctx("read agent")?;
                if let Some(name) = display_name {
                    sqlx::query("UPDATE agents SET display_name = $1 WHERE id = $2")
                        .bind(name)
                        .bind(id)
                        .execute(&mut *conn)
                        .await
                        .ctx("rename an agent")?;
                }
                id
            }
            None => {
                let id: Option<i64> = sqlx::query_scalar(
                    "INSERT INTO agents (address, display_name, origin) VALUES ($1, $2, $3) \
                     ON CONFLICT (address) DO NOTHING RETURNING id",
                )
                .bind(address.as_str())
                .bind(display_name)
                .bind(CLI_ORIGIN)
                .fetch_optional(&mut *conn)
                .await
                .ctx("create an agent")?;
                id.ok_or_else(|| {
                    AdminError::Refused(format!(
                        "{address} was made an agent by someone else meanwhile; run the command again"
                    ))
                })?
            }
        };
        let mut added = Vec::new();
        for desk in unique(desks) {
            let done = sqlx::query(
                "INSERT INTO agent_desks (agent_id, desk) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            )
            .bind(id)
            .bind(desk.as_str())
            .execute(&mut *conn)
            .await
            .ctx("add an agent desk")?;
            if done.rows_affected() > 0 {
                added.push(desk.as_str().to_string());
            }
        }
        if added.is_empty() {
            let names: Vec<&str> = desks.iter().map(DeskKey::as_str).collect();
            return Err(AdminError::Refused(format!(
                "{address} is already an agent of {}",
                names.join(", ")
            )));
        }
        for desk in &added {
            write_audit(
                conn,
                actor,
                Note {
                    action: "add_agent",
                    desk: Some(desk.as_str()),
                    explanation: format!(
                        "{address} was made an agent of desk {desk} from the command line"
                    ),
                    details: serde_json::json!({ "address": address.as_str(), "display_name": display_name }),
                    addresses: vec![(address.to_string(), "agent".into(), "added")],
                },
            )
            .await?;
        }
        wtx.commit().await?;
        Ok(added)
    }

    /// Removes an agent made with the CLI from all its desks. Returns those desks.
    pub async fn remove_agent(
        &self,
        actor: &Actor,
        address: &EmailAddress,
    ) -> Result<Vec<String>, AdminError> {
        let mut wtx = self.begin_write().await?;
        let conn = wtx.conn();
        let sql = format!(
            "SELECT id, origin FROM agents WHERE address = $1{}",
            pg_only(conn, " FOR UPDATE")
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(address.as_str())
            .fetch_optional(&mut *conn)
            .await
            .ctx("look up an agent")?
            .ok_or_else(|| AdminError::NotFound(format!("no agent {address}")))?;
        let id: i64 = row.try_get(0).ctx("read agent")?;
        let origin: String = row.try_get(1).ctx("read agent")?;
        if origin == "config" {
            return Err(AdminError::ConfigOwned {
                what: format!("agent {address}"),
                section: "[[directory.agents]]",
            });
        }
        let desks: Vec<String> =
            sqlx::query_scalar("SELECT desk FROM agent_desks WHERE agent_id = $1 ORDER BY desk")
                .bind(id)
                .fetch_all(&mut *conn)
                .await
                .ctx("find agent desks")?;
        // Its desk links cascade.
        sqlx::query("DELETE FROM agents WHERE id = $1")
            .bind(id)
            .execute(&mut *conn)
            .await
            .ctx("remove an agent")?;
        // One entry per desk, like `add`; an agent of no desk still leaves one.
        let per_desk: Vec<Option<&str>> = if desks.is_empty() {
            vec![None]
        } else {
            desks.iter().map(|d| Some(d.as_str())).collect()
        };
        for desk in per_desk {
            write_audit(
                conn,
                actor,
                Note {
                    action: "remove_agent",
                    desk,
                    explanation: format!(
                        "{address} is no longer an agent{} (removed from the command line)",
                        desk.map(|d| format!(" of desk {d}")).unwrap_or_default()
                    ),
                    details: serde_json::json!({ "address": address.as_str() }),
                    addresses: vec![(address.to_string(), "agent".into(), "removed")],
                },
            )
            .await?;
        }
        wtx.commit().await?;
        Ok(desks)
    }
}

/// `(id, text)` rows grouped by id, in query order.
async fn pairs(
    conn: &mut AnyConnection,
    sql: &'static str,
    context: &'static str,
) -> Result<HashMap<i64, Vec<String>>, StoreError> {
    let mut out: HashMap<i64, Vec<String>> = HashMap::new();
    for row in sqlx::query(sql).fetch_all(&mut *conn).await.ctx(context)? {
        let id: i64 = row.try_get(0).ctx(context)?;
        let value: String = row.try_get(1).ctx(context)?;
        out.entry(id).or_default().push(value);
    }
    Ok(out)
}

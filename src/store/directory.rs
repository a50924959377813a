//! The directory: accounts, organizations, groups, desk customers and agents.
//!
//! The `[directory]` section of the configuration is declarative: [`Store::sync_directory`]
//! makes the rows that came from configuration (origin `config`) match it, and leaves
//! everything created from mail or the CLI alone.

use sqlx::{AnyConnection, Row};

use crate::address::DomainPattern;
use crate::config::DirectoryConfig;

use super::{Context, Store, StoreError, placeholders};

/// What a directory sync changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DirectorySync {
    pub organizations: usize,
    pub accounts: usize,
    pub agents: usize,
    pub groups: usize,
    /// Group members listed in configuration that have no account (skipped).
    pub missing_group_members: Vec<String>,
}

/// One organization with its domain patterns and linked desks.
#[derive(Debug, Clone)]
pub struct OrgInfo {
    pub id: i64,
    pub name: String,
    pub patterns: Vec<DomainPattern>,
    pub desks: Vec<String>,
}

/// The small, rarely changing part of the directory — organizations with their domains,
/// and agents — loaded once per batch instead of queried for every address.
#[derive(Debug, Clone, Default)]
pub struct DirectoryIndex {
    pub orgs: Vec<OrgInfo>,
    /// `(address, desk)` of every agent.
    pub agents: std::collections::HashSet<(String, String)>,
}

impl DirectoryIndex {
    pub async fn load(conn: &mut AnyConnection) -> Result<DirectoryIndex, StoreError> {
        let rows = sqlx::query(
            "SELECT o.id, o.name, d.pattern FROM organizations o \
             LEFT JOIN organization_domains d ON d.organization_id = o.id ORDER BY o.name",
        )
        .fetch_all(&mut *conn)
        .await
        .ctx("load organizations")?;
        let mut orgs: Vec<OrgInfo> = Vec::new();
        for row in rows {
            let id: i64 = row.try_get(0).ctx("read organization")?;
            let name: String = row.try_get(1).ctx("read organization")?;
            let pattern: Option<String> = row.try_get(2).ctx("read organization")?;
            if orgs.last().is_none_or(|o| o.id != id) {
                orgs.push(OrgInfo {
                    id,
                    name,
                    patterns: Vec::new(),
                    desks: Vec::new(),
                });
            }
            if let (Some(p), Some(org)) = (pattern, orgs.last_mut())
                && let Ok(p) = DomainPattern::parse(&p)
            {
                org.patterns.push(p);
            }
        }
        let links = sqlx::query("SELECT organization_id, desk FROM organization_desks")
            .fetch_all(&mut *conn)
            .await
            .ctx("load organization desks")?;
        for row in links {
            let id: i64 = row.try_get(0).ctx("read organization desk")?;
            let desk: String = row.try_get(1).ctx("read organization desk")?;
            if let Some(o) = orgs.iter_mut().find(|o| o.id == id) {
                o.desks.push(desk);
            }
        }
        let agents = sqlx::query(
            "SELECT a.address, d.desk FROM agents a JOIN agent_desks d ON d.agent_id = a.id",
        )
        .fetch_all(&mut *conn)
        .await
        .ctx("load agents")?
        .iter()
        .map(|row| {
            Ok((
                row.try_get(0).ctx("read agent")?,
                row.try_get(1).ctx("read agent")?,
            ))
        })
        .collect::<Result<_, StoreError>>()?;
        Ok(DirectoryIndex { orgs, agents })
    }

    /// True when `address` is an agent of `desk`.
    pub fn is_agent(&self, address: &str, desk: &str) -> bool {
        self.agents
            .contains(&(address.to_string(), desk.to_string()))
    }

    /// Organizations whose domains match `domain`.
    pub fn matching<'a>(&'a self, domain: &'a str) -> impl Iterator<Item = &'a OrgInfo> + 'a {
        self.orgs
            .iter()
            .filter(move |o| o.patterns.iter().any(|p| p.matches(domain)))
    }
}

impl Store {
    /// Makes the configuration-owned part of the directory match `dir`, in one
    /// transaction. Unless `force`, skips the work when the database already holds this
    /// exact configuration (cheap for `intake deliver`, which runs once per message).
    /// Returns whether it synced.
    pub async fn sync_directory(
        &self,
        dir: &DirectoryConfig,
        now: i64,
        force: bool,
    ) -> Result<Option<DirectorySync>, StoreError> {
        let fingerprint = directory_fingerprint(dir);
        if !force {
            let current = self.directory_fingerprint().await?;
            if current.as_deref() == Some(fingerprint.as_str()) {
                return Ok(None);
            }
        }
        let mut wtx = self.begin_write().await?;
        let report = sync(wtx.conn(), dir, now).await?;
        sqlx::query(
            "INSERT INTO meta (key, value) VALUES ('directory_fingerprint', $1) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(&fingerprint)
        .execute(wtx.conn())
        .await
        .ctx("store the directory fingerprint")?;
        wtx.commit().await?;
        Ok(Some(report))
    }
}

async fn sync(
    conn: &mut AnyConnection,
    dir: &DirectoryConfig,
    now: i64,
) -> Result<DirectorySync, StoreError> {
    let mut report = DirectorySync::default();

    // Organizations.
    let names: Vec<&str> = dir.organizations.iter().map(|o| o.name.as_str()).collect();
    delete_missing(conn, "organizations", "name", &names).await?;
    for org in &dir.organizations {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO organizations (name, origin, created_at) VALUES ($1, 'config', $2) \
             ON CONFLICT (name) DO UPDATE SET origin = 'config' RETURNING id",
        )
        .bind(&org.name)
        .bind(now)
        .fetch_one(&mut *conn)
        .await
        .ctx("upsert organization")?;
        sqlx::query("DELETE FROM organization_domains WHERE organization_id = $1")
            .bind(id)
            .execute(&mut *conn)
            .await
            .ctx("replace organization domains")?;
        for d in &org.domains {
            sqlx::query(
                "INSERT INTO organization_domains (organization_id, pattern) VALUES ($1, $2) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(id)
            .bind(d.to_string())
            .execute(&mut *conn)
            .await
            .ctx("insert organization domain")?;
        }
        sqlx::query("DELETE FROM organization_desks WHERE organization_id = $1")
            .bind(id)
            .execute(&mut *conn)
            .await
            .ctx("replace organization desks")?;
        for desk in &org.desks {
            sqlx::query(
                "INSERT INTO organization_desks (organization_id, desk) VALUES ($1, $2) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(id)
            .bind(desk.as_str())
            .execute(&mut *conn)
            .await
            .ctx("insert organization desk")?;
        }
        report.organizations += 1;
    }

    // Accounts: configuration owns their kind, status, organizations and desks.
    sqlx::query("DELETE FROM organization_members WHERE origin = 'config'")
        .execute(&mut *conn)
        .await
        .ctx("clear configured memberships")?;
    sqlx::query("DELETE FROM desk_customers WHERE origin = 'config'")
        .execute(&mut *conn)
        .await
        .ctx("clear configured desk customers")?;
    for acc in &dir.accounts {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO accounts (address, display_name, kind, status, origin, created_at, updated_at, verified_at) \
             VALUES ($1, $2, $3, $4, 'config', $5, $5, CASE WHEN $4 = 'active' THEN $5 ELSE NULL END) \
             ON CONFLICT (address) DO UPDATE SET \
               display_name = COALESCE(excluded.display_name, accounts.display_name), \
               kind = excluded.kind, status = excluded.status, origin = 'config', \
               updated_at = excluded.updated_at \
             RETURNING id",
        )
        .bind(acc.address.as_str())
        .bind(acc.display_name.as_deref())
        .bind(acc.kind.as_str())
        .bind(acc.status.as_str())
        .bind(now)
        .fetch_one(&mut *conn)
        .await
        .ctx("upsert account")?;
        for org in &acc.organizations {
            sqlx::query(
                "INSERT INTO organization_members (organization_id, account_id, origin) \
                 SELECT id, $2, 'config' FROM organizations WHERE name = $1 \
                 ON CONFLICT (organization_id, account_id) DO UPDATE SET origin = 'config'",
            )
            .bind(org.as_str())
            .bind(id)
            .execute(&mut *conn)
            .await
            .ctx("insert membership")?;
        }
        for desk in &acc.desks {
            sqlx::query(
                "INSERT INTO desk_customers (desk, account_id, origin) VALUES ($1, $2, 'config') \
                 ON CONFLICT (desk, account_id) DO UPDATE SET origin = 'config'",
            )
            .bind(desk.as_str())
            .bind(id)
            .execute(&mut *conn)
            .await
            .ctx("insert desk customer")?;
        }
        report.accounts += 1;
    }

    // Agents.
    let agent_addrs: Vec<&str> = dir.agents.iter().map(|a| a.address.as_str()).collect();
    delete_missing(conn, "agents", "address", &agent_addrs).await?;
    for agent in &dir.agents {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO agents (address, display_name, origin) VALUES ($1, $2, 'config') \
             ON CONFLICT (address) DO UPDATE SET display_name = excluded.display_name, origin = 'config' \
             RETURNING id",
        )
        .bind(agent.address.as_str())
        .bind(agent.display_name.as_deref())
        .fetch_one(&mut *conn)
        .await
        .ctx("upsert agent")?;
        sqlx::query("DELETE FROM agent_desks WHERE agent_id = $1")
            .bind(id)
            .execute(&mut *conn)
            .await
            .ctx("replace agent desks")?;
        for desk in &agent.desks {
            sqlx::query(
                "INSERT INTO agent_desks (agent_id, desk) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            )
            .bind(id)
            .bind(desk.as_str())
            .execute(&mut *conn)
            .await
            .ctx("insert agent desk")?;
        }
        report.agents += 1;
    }

    // Groups.
    let group_names: Vec<&str> = dir.groups.iter().map(|g| g.name.as_str()).collect();
    delete_missing(conn, "customer_groups", "name", &group_names).await?;
    for group in &dir.groups {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO customer_groups (name, origin) VALUES ($1, 'config') \
             ON CONFLICT (name) DO UPDATE SET origin = 'config' RETURNING id",
        )
        .bind(&group.name)
        .fetch_one(&mut *conn)
        .await
        .ctx("upsert group")?;
        for table in ["group_members", "group_desks"] {
            let sql = format!("DELETE FROM {table} WHERE group_id = $1");
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(id)
                .execute(&mut *conn)
                .await
                .ctx("replace group links")?;
        }
        for member in &group.members {
            let done = sqlx::query(
                "INSERT INTO group_members (group_id, account_id) \
                 SELECT $1, id FROM accounts WHERE address = $2 ON CONFLICT DO NOTHING",
            )
            .bind(id)
            .bind(member.as_str())
            .execute(&mut *conn)
            .await
            .ctx("insert group member")?;
            if done.rows_affected() == 0 {
                report.missing_group_members.push(member.to_string());
            }
        }
        for desk in &group.desks {
            sqlx::query(
                "INSERT INTO group_desks (group_id, desk) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            )
            .bind(id)
            .bind(desk.as_str())
            .execute(&mut *conn)
            .await
            .ctx("insert group desk")?;
        }
        report.groups += 1;
    }
    Ok(report)
}

/// Deletes configuration-owned rows of `table` whose `column` is not in `keep`.
async fn delete_missing(
    conn: &mut AnyConnection,
    table: &'static str,
    column: &'static str,
    keep: &[&str],
) -> Result<(), StoreError> {
    let sql = if keep.is_empty() {
        format!("DELETE FROM {table} WHERE origin = 'config'")
    } else {
        format!(
            "DELETE FROM {table} WHERE origin = 'config' AND {column} NOT IN ({})",
            placeholders(1, keep.len())
        )
    };
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
    for k in keep {
        q = q.bind(*k);
    }
    q.execute(&mut *conn)
        .await
        .ctx("remove entries no longer configured")?;
    Ok(())
}

/// The fingerprint of a `[directory]` section, as `sync_directory` records it.
pub fn directory_fingerprint(dir: &DirectoryConfig) -> String {
    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(format!("{dir:?}")))
}

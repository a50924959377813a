//! The directory commands: `accounts add|deactivate|reactivate|deliverable|rename|merge`, `orgs`,
//! `desks customers` and `agents`.
//!
//! Tables for people, `--json` for scripts. A refused change (bad input, a duplicate, a
//! row the configuration owns) prints `intake: REASON` and exits 65 (EX_DATAERR); a name
//! that does not exist exits 69, like `accounts show`. Database trouble travels up as an
//! error like everywhere else (75 when retrying may help).

use std::sync::Arc;

use clap::{Args, Subcommand, ValueEnum};

use crate::address::{DomainPattern, EmailAddress};
use crate::config::Config;
use crate::keys::DeskKey;
use crate::policy::{AccountKind, AccountStatus};
use crate::store::{Actor, AdminError, NewAccount, Store};

use super::table::Table;
use super::{EX_DATAERR, EX_OK, open_store, print_json, when};

/// Exit code for a name that does not exist (as `accounts show` and `requests show` use).
const EX_NOTFOUND: u8 = 69;

/// The subcommands of `intake accounts` that change the directory.
#[derive(Debug, Subcommand)]
pub enum AccountsAdminCommand {
    /// Create an active account (origin cli). Without --kind it is internal on an
    /// approved domain and portal_only elsewhere; it joins the organizations whose
    /// domains match, besides those named with --org.
    Add(AddAccountArgs),
    /// Deactivate an account: its mail is then rejected (account_deactivated).
    Deactivate {
        /// The account's email address.
        address: String,
        /// Print JSON instead of a table (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Make a deactivated account active again.
    Reactivate {
        /// The account's email address.
        address: String,
        /// Print JSON instead of a table (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Clear an address's undeliverable mark (a permanent bounce, or the relay refused
    /// it), so that mail to it is queued again.
    Deliverable {
        /// The account's email address.
        address: String,
        /// Print JSON instead of a table (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Set an account's display name.
    Rename {
        /// The account's email address.
        address: String,
        /// The new display name.
        #[arg(long, required = true)]
        name: String,
        /// Print JSON instead of a table (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Move FROM's requests, participations and memberships to INTO, then remove FROM
    /// (its address and account are kept in the audit log).
    Merge {
        /// The account to merge away.
        #[arg(value_name = "FROM_ADDRESS")]
        from: String,
        /// The account that stays.
        #[arg(value_name = "INTO_ADDRESS")]
        into: String,
        /// Print JSON instead of a table (for scripts).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct AddAccountArgs {
    /// The account's email address.
    address: String,
    /// Display name.
    #[arg(long)]
    name: Option<String>,
    /// internal or portal_only (default: internal on an approved domain, portal_only elsewhere).
    #[arg(long, value_enum)]
    kind: Option<KindArg>,
    /// An organization to join (repeatable).
    #[arg(long = "org", value_name = "ORG")]
    orgs: Vec<String>,
    /// A desk to make the account a customer of (repeatable).
    #[arg(long = "desk", value_name = "DESK")]
    desks: Vec<String>,
    /// Print JSON instead of a table (for scripts).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum KindArg {
    Internal,
    #[value(name = "portal_only", alias = "portal-only")]
    PortalOnly,
}

/// `intake orgs`.
#[derive(Debug, Subcommand)]
pub enum OrgsCommand {
    /// List organizations.
    List {
        /// Print JSON instead of a table (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// An organization with its domains, desks and members.
    Show {
        /// The organization's name.
        name: String,
        /// Print JSON instead of a table (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Create an organization (origin cli). Its domains assign accounts created from
    /// now on; --desk makes its members customers of that desk.
    Add {
        /// The organization's name.
        name: String,
        /// A domain (`example.com`) or all its subdomains (`*.example.com`); repeatable.
        #[arg(long = "domain", value_name = "DOMAIN")]
        domains: Vec<String>,
        /// A desk whose customers the members become (repeatable).
        #[arg(long = "desk", value_name = "DESK")]
        desks: Vec<String>,
        /// Print JSON instead of a table (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Remove an organization made with the CLI, with its memberships.
    Remove {
        /// The organization's name.
        name: String,
        /// Print JSON instead of a table (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Make an account a member.
    AddMember {
        /// The organization's name.
        name: String,
        /// The account's email address.
        address: String,
        /// Print JSON instead of a table (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Remove a membership (not one the configuration made).
    RemoveMember {
        /// The organization's name.
        name: String,
        /// The account's email address.
        address: String,
        /// Print JSON instead of a table (for scripts).
        #[arg(long)]
        json: bool,
    },
}

/// `intake desks`.
#[derive(Debug, Subcommand)]
pub enum DesksCommand {
    /// The customers of a desk: accounts linked to it directly, or through an
    /// organization or group.
    #[command(subcommand)]
    Customers(CustomersCommand),
}

#[derive(Debug, Subcommand)]
pub enum CustomersCommand {
    /// List a desk's customers.
    List {
        /// The desk key, e.g. IT.
        desk: String,
        /// Print JSON instead of a table (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Make an account a customer of the desk.
    Add {
        /// The desk key, e.g. IT.
        desk: String,
        /// The account's email address.
        address: String,
        /// Print JSON instead of a table (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Remove a direct customer link (not one the configuration made).
    Remove {
        /// The desk key, e.g. IT.
        desk: String,
        /// The account's email address.
        address: String,
        /// Print JSON instead of a table (for scripts).
        #[arg(long)]
        json: bool,
    },
}

/// `intake agents`.
#[derive(Debug, Subcommand)]
pub enum AgentsCommand {
    /// List agents and their desks.
    List {
        /// Print JSON instead of a table (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Make an address an agent of desks (an agent added before gets the new desks).
    Add {
        /// The agent's email address.
        address: String,
        /// A desk the agent works on (repeatable).
        #[arg(long = "desk", value_name = "DESK", required = true)]
        desks: Vec<String>,
        /// Display name.
        #[arg(long)]
        name: Option<String>,
        /// Print JSON instead of a table (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Remove an agent made with the CLI, from all its desks.
    Remove {
        /// The agent's email address.
        address: String,
        /// Print JSON instead of a table (for scripts).
        #[arg(long)]
        json: bool,
    },
}

/// Why a command did not do what it was asked.
enum Failure {
    /// Bad input, a duplicate, a row the configuration owns: 65.
    Refused(String),
    /// A name that does not exist: 69.
    NotFound(String),
    Internal(anyhow::Error),
}

impl Failure {
    fn from_admin(e: AdminError, config: &Config) -> Failure {
        match e {
            AdminError::NotFound(m) => Failure::NotFound(m),
            AdminError::Refused(m) => Failure::Refused(m),
            e @ AdminError::ConfigOwned { .. } => {
                Failure::Refused(format!("{e}\n  configuration file: {}", config.origin))
            }
            // The StoreError itself, so that `exit_code_for` sees whether it is transient.
            AdminError::Store(e) => Failure::Internal(e.into()),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Internal(e)
    }
}

impl From<crate::store::StoreError> for Failure {
    fn from(e: crate::store::StoreError) -> Self {
        Failure::Internal(e.into())
    }
}

/// Prints a failure the way `main_exit` prints errors, and gives its exit code.
fn finish(result: Result<(), Failure>) -> anyhow::Result<u8> {
    match result {
        Ok(()) => Ok(EX_OK),
        Err(Failure::Refused(m)) => {
            eprintln!("intake: {m}");
            Ok(EX_DATAERR)
        }
        Err(Failure::NotFound(m)) => {
            eprintln!("intake: {m}");
            Ok(EX_NOTFOUND)
        }
        Err(Failure::Internal(e)) => Err(e),
    }
}

/// Who is making the change, for the audit row: the login name when there is one.
fn actor() -> Actor {
    Actor {
        now: crate::now(),
        user: ["SUDO_USER", "USER", "LOGNAME"]
            .iter()
            .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty())),
    }
}

fn address(input: &str) -> Result<EmailAddress, Failure> {
    EmailAddress::parse(input).map_err(|e| Failure::Refused(e.to_string()))
}

/// An address that may be a person: not one of the desks' own addresses.
fn person(config: &Config, input: &str) -> Result<EmailAddress, Failure> {
    let a = address(input)?;
    if let Some(desk) = config.policy.desk_for_address(&a) {
        return Err(Failure::Refused(format!(
            "{a} is an address of desk {}, not a person",
            desk.key
        )));
    }
    Ok(a)
}

/// A configured desk.
fn desk(config: &Config, input: &str) -> Result<DeskKey, Failure> {
    let key = DeskKey::parse(input).map_err(|e| Failure::Refused(e.to_string()))?;
    if config.policy.desk(&key).is_none() {
        let known: Vec<&str> = config.policy.desks.iter().map(|d| d.key.as_str()).collect();
        return Err(Failure::Refused(format!(
            "desk {key} is not configured (configured desks: {})",
            known.join(", ")
        )));
    }
    Ok(key)
}

fn desks(config: &Config, inputs: &[String]) -> Result<Vec<DeskKey>, Failure> {
    inputs.iter().map(|d| desk(config, d)).collect()
}

fn org_name(input: &str) -> Result<String, Failure> {
    let name = input.trim();
    if name.is_empty() || name.chars().any(char::is_control) {
        return Err(Failure::Refused(format!(
            "{input:?} is not an organization name"
        )));
    }
    Ok(name.to_string())
}

fn display_name(input: &str, address: &EmailAddress) -> Result<String, Failure> {
    crate::address::clean_display_name(input, Some(address))
        .ok_or_else(|| Failure::Refused(format!("{input:?} is not a usable display name")))
}

fn plural(n: usize, word: &str) -> String {
    format!("{n} {word}{}", if n == 1 { "" } else { "s" })
}

fn or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_string()
    } else {
        items.join(", ")
    }
}

/// `intake accounts add|deactivate|reactivate|rename|merge`.
pub(super) async fn accounts(
    config: &Config,
    store: &Store,
    cmd: AccountsAdminCommand,
) -> anyhow::Result<u8> {
    finish(run_accounts(config, store, cmd).await)
}

async fn run_accounts(
    config: &Config,
    store: &Store,
    cmd: AccountsAdminCommand,
) -> Result<(), Failure> {
    let admin = |e| Failure::from_admin(e, config);
    match cmd {
        AccountsAdminCommand::Add(a) => {
            let address = person(config, &a.address)?;
            let kind = match a.kind {
                Some(KindArg::Internal) => AccountKind::Internal,
                Some(KindArg::PortalOnly) => AccountKind::PortalOnly,
                None if config.policy.access.is_approved(address.domain()) => AccountKind::Internal,
                None => AccountKind::PortalOnly,
            };
            let display_name = match &a.name {
                Some(n) => Some(display_name(n, &address)?),
                None => None,
            };
            let organizations = a
                .orgs
                .iter()
                .map(|o| org_name(o))
                .collect::<Result<Vec<_>, _>>()?;
            let new = NewAccount {
                desks: desks(config, &a.desks)?,
                address,
                display_name,
                kind,
                organizations,
            };
            let added = store.add_account(&actor(), &new).await.map_err(admin)?;
            if a.json {
                print_json(&added)?;
            } else {
                out!(
                    "added {} ({}, {}); organizations: {}; customer of desks: {}",
                    added.address,
                    added.kind,
                    added.status,
                    or_none(&added.organizations),
                    or_none(&added.desks)
                );
            }
        }
        AccountsAdminCommand::Deactivate { address: a, json } => {
            status(config, store, &a, AccountStatus::Deactivated, json).await?;
        }
        AccountsAdminCommand::Reactivate { address: a, json } => {
            status(config, store, &a, AccountStatus::Active, json).await?;
        }
        AccountsAdminCommand::Deliverable { address: a, json } => {
            let address = address(&a)?;
            let since = store
                .mark_deliverable(&actor(), &address)
                .await
                .map_err(admin)?;
            if json {
                print_json(&serde_json::json!({
                    "address": address,
                    "undeliverable_since": since,
                    "changed": since.is_some(),
                }))?;
            } else if let Some(since) = since {
                out!(
                    "{address} is deliverable again (was undeliverable since {})",
                    when(since)
                );
            } else {
                out!("{address} was not marked undeliverable; nothing changed");
            }
        }
        AccountsAdminCommand::Rename {
            address: a,
            name,
            json,
        } => {
            let address = address(&a)?;
            let name = display_name(&name, &address)?;
            let (previous, changed) = store
                .rename_account(&actor(), &address, &name)
                .await
                .map_err(admin)?;
            if json {
                print_json(&serde_json::json!({
                    "address": address,
                    "display_name": name,
                    "previous": previous,
                    "changed": changed,
                }))?;
            } else if changed {
                out!(
                    "{address} renamed from {} to {name:?}",
                    previous.map_or_else(|| "(no name)".to_string(), |p| format!("{p:?}"))
                );
            } else {
                out!("{address} is already named {name:?}; nothing changed");
            }
        }
        AccountsAdminCommand::Merge { from, into, json } => {
            let from = address(&from)?;
            let into = address(&into)?;
            let report = store
                .merge_accounts(&actor(), &from, &into)
                .await
                .map_err(admin)?;
            if json {
                print_json(&report)?;
            } else {
                out!("merged {} into {} and removed it", report.from, report.into);
                let mut t = Table::new(&["MOVED", "COUNT", "WHICH"]);
                for (what, items) in [
                    ("requests reported", &report.requests),
                    ("participations", &report.participations),
                    ("organizations", &report.organizations),
                    ("groups", &report.groups),
                    ("desks (customer)", &report.desks),
                ] {
                    t.row(vec![
                        what.to_string(),
                        items.len().to_string(),
                        items.join(", "),
                    ]);
                }
                out_text!("{t}");
            }
        }
    }
    Ok(())
}

async fn status(
    config: &Config,
    store: &Store,
    input: &str,
    target: AccountStatus,
    json: bool,
) -> Result<(), Failure> {
    let address = address(input)?;
    let change = store
        .set_account_status(&actor(), &address, target)
        .await
        .map_err(|e| Failure::from_admin(e, config))?;
    if json {
        print_json(&change)?;
    } else if change.changed {
        out!(
            "{} is now {} (was {})",
            change.address,
            change.status,
            change.previous
        );
    } else {
        out!(
            "{} is already {}; nothing changed",
            change.address,
            change.status
        );
    }
    Ok(())
}

/// `intake orgs ...`.
pub(super) async fn orgs(config: Arc<Config>, cmd: OrgsCommand) -> anyhow::Result<u8> {
    let store = open_store(&config).await?;
    finish(run_orgs(&config, &store, cmd).await)
}

async fn run_orgs(config: &Config, store: &Store, cmd: OrgsCommand) -> Result<(), Failure> {
    let admin = |e| Failure::from_admin(e, config);
    match cmd {
        OrgsCommand::List { json } => {
            let rows = store.list_organizations().await?;
            if json {
                print_json(&rows)?;
            } else {
                let mut t = Table::new(&["NAME", "ORIGIN", "MEMBERS", "DOMAINS", "DESKS"]);
                for o in rows {
                    t.row(vec![
                        o.name,
                        o.origin,
                        o.members.to_string(),
                        o.domains.join(", "),
                        o.desks.join(", "),
                    ]);
                }
                out_text!("{t}");
            }
        }
        OrgsCommand::Show { name, json } => {
            let o = store
                .show_organization(&org_name(&name)?)
                .await
                .map_err(admin)?;
            if json {
                print_json(&o)?;
            } else {
                out!(
                    "{}  (origin: {})",
                    o.organization.name,
                    o.organization.origin
                );
                out!("created: {}", when(o.created_at));
                out!("domains: {}", or_none(&o.organization.domains));
                out!("desks: {}", or_none(&o.organization.desks));
                out!("members: {}", o.organization.members);
                let mut t = Table::new(&["ADDRESS", "NAME", "KIND", "STATUS", "ORIGIN"]);
                for m in o.member_list {
                    t.row(vec![
                        m.address,
                        m.display_name.unwrap_or_default(),
                        m.kind,
                        m.status,
                        m.origin,
                    ]);
                }
                out_text!("{t}");
            }
        }
        OrgsCommand::Add {
            name,
            domains,
            desks: desk_args,
            json,
        } => {
            let name = org_name(&name)?;
            let domains = domains
                .iter()
                .map(|d| DomainPattern::parse(d).map_err(|e| Failure::Refused(e.to_string())))
                .collect::<Result<Vec<_>, _>>()?;
            let desks = desks(config, &desk_args)?;
            let row = store
                .add_organization(&actor(), &name, &domains, &desks)
                .await
                .map_err(admin)?;
            if json {
                print_json(&row)?;
            } else {
                out!(
                    "added organization {:?}; domains: {}; desks: {}",
                    row.name,
                    or_none(&row.domains),
                    or_none(&row.desks)
                );
            }
        }
        OrgsCommand::Remove { name, json } => {
            let name = org_name(&name)?;
            let members = store
                .remove_organization(&actor(), &name)
                .await
                .map_err(admin)?;
            if json {
                print_json(&serde_json::json!({ "organization": name, "members": members }))?;
            } else {
                out!(
                    "removed organization {name:?} and its {}",
                    plural(members.len(), "membership")
                );
            }
        }
        OrgsCommand::AddMember {
            name,
            address: a,
            json,
        } => {
            let name = org_name(&name)?;
            let address = address(&a)?;
            store
                .add_organization_member(&actor(), &name, &address)
                .await
                .map_err(admin)?;
            if json {
                print_json(&serde_json::json!({ "organization": name, "added": address }))?;
            } else {
                out!("{address} is now a member of {name:?}");
            }
        }
        OrgsCommand::RemoveMember {
            name,
            address: a,
            json,
        } => {
            let name = org_name(&name)?;
            let address = address(&a)?;
            store
                .remove_organization_member(&actor(), &name, &address)
                .await
                .map_err(admin)?;
            if json {
                print_json(&serde_json::json!({ "organization": name, "removed": address }))?;
            } else {
                out!("{address} is no longer a member of {name:?}");
            }
        }
    }
    Ok(())
}

/// `intake desks customers ...`.
pub(super) async fn desks_command(config: Arc<Config>, cmd: DesksCommand) -> anyhow::Result<u8> {
    let store = open_store(&config).await?;
    let DesksCommand::Customers(cmd) = cmd;
    finish(run_customers(&config, &store, cmd).await)
}

async fn run_customers(
    config: &Config,
    store: &Store,
    cmd: CustomersCommand,
) -> Result<(), Failure> {
    let admin = |e| Failure::from_admin(e, config);
    match cmd {
        CustomersCommand::List { desk: d, json } => {
            let key = desk(config, &d)?;
            let rows = store.list_desk_customers(&key).await?;
            if json {
                print_json(&rows)?;
            } else {
                let mut t = Table::new(&["ADDRESS", "NAME", "KIND", "STATUS", "VIA", "ORIGIN"]);
                for r in rows {
                    let via = match r.via_name {
                        Some(n) => format!("{} {n}", r.via),
                        None => r.via,
                    };
                    t.row(vec![
                        r.address,
                        r.display_name.unwrap_or_default(),
                        r.kind,
                        r.status,
                        via,
                        r.origin,
                    ]);
                }
                out_text!("{t}");
            }
        }
        CustomersCommand::Add {
            desk: d,
            address: a,
            json,
        } => {
            let key = desk(config, &d)?;
            let address = address(&a)?;
            store
                .add_desk_customer(&actor(), &key, &address)
                .await
                .map_err(admin)?;
            if json {
                print_json(&serde_json::json!({ "desk": key, "added": address }))?;
            } else {
                out!("{address} is now a customer of desk {key}");
            }
        }
        CustomersCommand::Remove {
            desk: d,
            address: a,
            json,
        } => {
            let key = desk(config, &d)?;
            let address = address(&a)?;
            let through = store
                .remove_desk_customer(&actor(), &key, &address)
                .await
                .map_err(admin)?;
            if json {
                print_json(&serde_json::json!({
                    "desk": key,
                    "removed": address,
                    "still_through": through,
                }))?;
            } else if through.is_empty() {
                out!("{address} is no longer a customer of desk {key}");
            } else {
                out!(
                    "{address} is no longer a direct customer of desk {key}, but still one through {}",
                    through.join(", ")
                );
            }
        }
    }
    Ok(())
}

/// `intake agents ...`.
pub(super) async fn agents(config: Arc<Config>, cmd: AgentsCommand) -> anyhow::Result<u8> {
    let store = open_store(&config).await?;
    finish(run_agents(&config, &store, cmd).await)
}

async fn run_agents(config: &Config, store: &Store, cmd: AgentsCommand) -> Result<(), Failure> {
    let admin = |e| Failure::from_admin(e, config);
    match cmd {
        AgentsCommand::List { json } => {
            let rows = store.list_agents().await?;
            if json {
                print_json(&rows)?;
            } else {
                let mut t = Table::new(&["ADDRESS", "NAME", "DESKS", "ORIGIN"]);
                for r in rows {
                    t.row(vec![
                        r.address,
                        r.display_name.unwrap_or_default(),
                        r.desks.join(", "),
                        r.origin,
                    ]);
                }
                out_text!("{t}");
            }
        }
        AgentsCommand::Add {
            address: a,
            desks: desk_args,
            name,
            json,
        } => {
            let address = person(config, &a)?;
            let desks = desks(config, &desk_args)?;
            let name = match &name {
                Some(n) => Some(display_name(n, &address)?),
                None => None,
            };
            let added = store
                .add_agent(&actor(), &address, name.as_deref(), &desks)
                .await
                .map_err(admin)?;
            if json {
                print_json(&serde_json::json!({ "address": address, "desks_added": added }))?;
            } else {
                out!("{address} is now an agent of {}", added.join(", "));
            }
        }
        AgentsCommand::Remove { address: a, json } => {
            let address = address(&a)?;
            let desks = store
                .remove_agent(&actor(), &address)
                .await
                .map_err(admin)?;
            if json {
                print_json(&serde_json::json!({ "address": address, "desks_removed": desks }))?;
            } else {
                out!(
                    "{address} is no longer an agent (was one of {})",
                    or_none(&desks)
                );
            }
        }
    }
    Ok(())
}

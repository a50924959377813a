//! `intake simulate --config NEW.toml [--since 30d]`: what a changed policy would have
//! decided differently about recent mail, before it is switched on.
//!
//! Raw messages are not kept, and deciding again from the directory as it is *now* would
//! be wrong: the accounts the first messages created would make every later decision look
//! like "existing account". So every message's decision is stored with the facts it was
//! made on (`audit.facts`, since migration 0006: what the directory knew about each
//! address, the message's signals, its thread). Simulate reads them back, runs the pure
//! `policy::decide` under NEW's policy and compares the result with the decision recorded
//! then.
//!
//! Messages are decided in the order they arrived, and what the new policy would have done
//! differently is carried forward ([`World`]): an account it would not have created is
//! absent from the facts of the person's later messages (one it would have created is
//! present, pending or active as it would have been), and a request it would not have
//! opened is no thread for the replies to it. Not carried forward: rate-limit counts,
//! participants a request would have had, requests only the new policy would open (the
//! replies to them are decided as the new requests or rejections they were), and changes
//! made since by people (a verified address, an account added with the CLI) beyond what
//! the recorded facts show.
//!
//! Nothing is written: the database is opened without migrating it and without syncing
//! NEW's `[directory]`; NEW's directory is not applied to the recorded facts either
//! (simulate says so when it differs from the one in the database). Mail rate limits are
//! not simulated: mail is compared as the policy intends it, before limits.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use anyhow::Context;
use secrecy::ExposeSecret;
use serde::Serialize;
use serde_json::Value;

use std::collections::HashMap;

use crate::config::Config;
use crate::policy::{self, AccountFacts, AccountKind, AccountStatus, Facts, Policy, RequestStatus};
use crate::store::{RecordedDecision, Store};

use super::table::Table;
use super::{EX_OK, when};

/// sysexits' usage error.
const EX_USAGE: u8 = 64;
/// Examples printed per group (`--json` has them all).
const EXAMPLES: usize = 5;
/// Recorded decisions read per query.
const PAGE: i64 = 500;

/// Kinds of difference, in the order they are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
enum Group {
    RequestsRejected,
    RequestsAccepted,
    RequestsChanged,
    RejectionsChanged,
    AccountsNotCreated,
    AccountsCreated,
    AccountsChanged,
    ParticipantsDropped,
    ParticipantsAdded,
    ParticipantsChanged,
    MailNotSent,
    MailSent,
}

impl Group {
    fn title(self) -> &'static str {
        match self {
            Group::RequestsRejected => "requests and comments that would be rejected or ignored",
            Group::RequestsAccepted => "messages that would become requests or comments",
            Group::RequestsChanged => "requests and comments that would be handled differently",
            Group::RejectionsChanged => "messages rejected or ignored for another reason",
            Group::AccountsNotCreated => "accounts that would not be created",
            Group::AccountsCreated => "accounts that would be created",
            Group::AccountsChanged => "accounts that would be created differently",
            Group::ParticipantsDropped => "participants that would be dropped",
            Group::ParticipantsAdded => "participants that would be added",
            Group::ParticipantsChanged => "participants that would be added differently",
            Group::MailNotSent => "mail that would not be sent",
            Group::MailSent => "mail that would be sent",
        }
    }

    fn code(self) -> String {
        match serde_json::to_value(self) {
            Ok(Value::String(s)) => s,
            _ => String::new(),
        }
    }
}

/// One difference for one address of one message.
#[derive(Debug, Clone, Serialize)]
struct Change {
    group: Group,
    /// When the message was decided.
    at: i64,
    desk: Option<String>,
    /// The request the message created or joined then.
    request: Option<String>,
    message_id: Option<String>,
    address: Option<String>,
    /// `message`, `requester`, `participant` or `email`.
    role: &'static str,
    before: String,
    after: String,
}

#[derive(Debug, Default)]
struct Simulation {
    /// Decisions decided again.
    decided: u64,
    /// Of those, decisions that would change.
    changed: u64,
    /// Decisions recorded without their facts (before migration 0006).
    without_facts: u64,
    /// Messages that reached no desk (routing is not simulated).
    unrouted: u64,
    /// Decisions whose recorded facts or decision could not be read.
    unreadable: u64,
    changes: Vec<Change>,
    /// How the world would differ so far.
    world: World,
}

pub async fn simulate(config: Arc<Config>, since: &str, json: bool) -> anyhow::Result<u8> {
    let now = crate::now();
    let Some(since_ts) = parse_since(since, now) else {
        eprintln!(
            "intake: --since {since:?}: give a duration back from now (30d, 12h, 90m) or a date (2026-11-01)"
        );
        return Ok(EX_USAGE);
    };
    if let Some(path) = sqlite_path(config.database.url.expose_secret())
        && !path.exists()
    {
        anyhow::bail!(
            "there is no database at {} (database.url of {})",
            path.display(),
            config.origin
        );
    }
    // Connect only: `open` would migrate, and `open_store` would sync NEW's directory.
    let store = Store::connect(&config.database)
        .await
        .with_context(|| format!("cannot open database {}", config.database.redacted_url()))?;
    if !store.has_decision_facts().await? {
        anyhow::bail!(
            "database {} does not record decision facts yet: run `intake migrate` with the \
             configuration in force (not the new one) and let mail arrive",
            config.database.redacted_url()
        );
    }
    let directory_differs = store.directory_fingerprint().await?.as_deref()
        != Some(crate::store::directory_fingerprint(&config.directory).as_str());
    let mut sim = Simulation::default();
    let mut after = 0;
    loop {
        let page = store.recorded_decisions(since_ts, after, PAGE).await?;
        let Some(last) = page.last() else {
            break;
        };
        after = last.id;
        for recorded in &page {
            sim.add(recorded, &config.policy);
        }
    }
    store.close().await;
    if json {
        print_json(&sim, &config, since_ts, directory_differs)?;
    } else {
        print_text(&sim, &config, since_ts, directory_differs)?;
    }
    Ok(EX_OK)
}

/// `30d`, `12h`, `90m`, `3600` (seconds) back from `now`, or a date `2026-11-01` (UTC).
fn parse_since(since: &str, now: i64) -> Option<i64> {
    if let Some(d) = crate::config::parse_duration(since) {
        return Some(now.saturating_sub(i64::try_from(d.as_secs()).unwrap_or(i64::MAX)));
    }
    let date = time::Date::parse(
        since.trim(),
        &time::macros::format_description!("[year]-[month]-[day]"),
    )
    .ok()?;
    Some(date.midnight().assume_utc().unix_timestamp())
}

/// The file of a `sqlite:` URL.
fn sqlite_path(url: &str) -> Option<std::path::PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or(rest);
    (!path.is_empty() && path != ":memory:").then(|| std::path::PathBuf::from(path))
}

impl Simulation {
    fn add(&mut self, recorded: &RecordedDecision, policy: &Policy) {
        let Ok(before) = serde_json::from_str::<Value>(&recorded.decision) else {
            self.unreadable += 1;
            return;
        };
        let Some(facts_json) = &recorded.facts else {
            if before["reason"] == "unknown_desk" {
                self.unrouted += 1;
            } else {
                self.without_facts += 1;
            }
            return;
        };
        let Ok(mut facts) = crate::store::decode_facts(facts_json) else {
            self.unreadable += 1;
            return;
        };
        let recorded_accounts = accounts_of(&facts);
        self.world.adjust(&mut facts);
        let decision = policy::decide(&facts, policy);
        let Ok(after) = serde_json::to_value(&decision) else {
            self.unreadable += 1;
            return;
        };
        self.decided += 1;
        let (before_summary, after_summary) = (Summary::of(&before), Summary::of(&after));
        self.world.record(
            recorded,
            (&before_summary, &recorded_accounts),
            (&after_summary, &accounts_of(&facts)),
        );
        let changes = compare(&before_summary, &after_summary);
        if changes.is_empty() {
            return;
        }
        self.changed += 1;
        let message_id = before["message_id"].as_str().map(String::from);
        for (group, address, role, before, after) in changes {
            self.changes.push(Change {
                group,
                at: recorded.at,
                desk: recorded.desk.clone(),
                request: recorded.request_key.clone(),
                message_id: message_id.clone(),
                address,
                role,
                before,
                after,
            });
        }
    }
}

/// An account as far as deciding goes.
type AccountState = Option<(AccountKind, AccountStatus)>;

/// The account state of every person on a message, by address.
fn accounts_of(facts: &Facts) -> HashMap<String, AccountState> {
    facts
        .sender
        .iter()
        .chain(&facts.recipients)
        .map(|p| {
            (
                p.address.to_string(),
                p.account.as_ref().map(|a| (a.kind, a.status)),
            )
        })
        .collect()
}

/// Where the world under the new policy has diverged from the recorded one so far.
#[derive(Debug, Default)]
struct World {
    /// By address: (account in the recorded world, account under the new policy, when the
    /// new policy sent it a verification link), for addresses where they differ.
    accounts: HashMap<String, (AccountState, AccountState, Option<i64>)>,
    /// By request key: its status under the new policy (`None`: never opened), for
    /// requests the recorded decisions opened differently.
    requests: HashMap<String, Option<RequestStatus>>,
}

impl World {
    /// Turns facts of the recorded world into facts of the new one.
    fn adjust(&self, facts: &mut Facts) {
        for p in facts.sender.iter_mut().chain(facts.recipients.iter_mut()) {
            let Some((recorded, new, verification)) = self.accounts.get(p.address.as_str()) else {
                continue;
            };
            match (&mut p.account, new) {
                // It exists only because the recorded policy created it.
                (Some(_), None) if recorded.is_some() => p.account = None,
                // Unless people changed it since (a confirmed address, say).
                (Some(acc), Some((kind, status))) if *recorded == Some((acc.kind, acc.status)) => {
                    acc.kind = *kind;
                    acc.status = *status;
                    acc.last_verification_sent_at = *verification;
                }
                (None, Some((kind, status))) if recorded.is_none() => {
                    // As an account created from mail: in the organizations of its domain.
                    p.account = Some(AccountFacts {
                        kind: *kind,
                        status: *status,
                        organizations: p.domain_organizations.clone(),
                        desk_customer: !p.domain_desk_organizations.is_empty(),
                        last_verification_sent_at: *verification,
                    });
                }
                _ => {}
            }
        }
        if let Some(t) = &mut facts.thread
            && let Some(status) = self.requests.get(&t.key.to_string())
        {
            match status {
                Some(s) => t.status = *s,
                None => facts.thread = None,
            }
        }
    }

    /// Notes what one message changed in each world.
    fn record(
        &mut self,
        recorded: &RecordedDecision,
        (before, before_accounts): (&Summary, &HashMap<String, AccountState>),
        (after, after_accounts): (&Summary, &HashMap<String, AccountState>),
    ) {
        let mut people: Vec<(&str, &Outcome, &Outcome)> = Vec::new();
        if let Some(r) = &before.requester {
            people.push((r, &before.account, &after.account));
        }
        for (address, b) in &before.participants {
            if let Some((_, a)) = after.participants.iter().find(|(x, _)| x == address) {
                people.push((address, b, a));
            }
        }
        for (address, b, a) in people {
            let old = b
                .created()
                .or(before_accounts.get(address).copied().flatten());
            let new = a
                .created()
                .or(after_accounts.get(address).copied().flatten());
            if old == new {
                self.accounts.remove(address);
                continue;
            }
            let verification = after
                .mail
                .contains(&(address.to_string(), "verification".to_string()))
                .then_some(recorded.at)
                .or_else(|| self.accounts.get(address).and_then(|e| e.2));
            self.accounts
                .insert(address.to_string(), (old, new, verification));
        }
        // A request the recorded decision opened.
        if before.request.is_none()
            && let Some(key) = &recorded.request_key
            && let Some(old) = before.opened()
            && after.opened() != Some(old)
        {
            self.requests.insert(key.clone(), after.opened());
        }
    }
}

/// What is compared of a decision (recorded, or made now).
#[derive(Debug, Default)]
struct Summary {
    action: String,
    reason: String,
    /// The request it comments on or joins.
    request: Option<String>,
    requester: Option<String>,
    account: Outcome,
    /// address → outcome, in decision order.
    participants: Vec<(String, Outcome)>,
    /// Mail the policy sends: (to, kind), before rate limits.
    mail: BTreeSet<(String, String)>,
}

/// An account or participant outcome with its reason.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Outcome {
    outcome: String,
    new_status: Option<String>,
    reason: String,
}

impl Outcome {
    fn of(v: &Value, key: &str) -> Outcome {
        Outcome {
            outcome: text(&v[key]),
            new_status: v["new_status"].as_str().map(String::from),
            reason: text(&v["reason"]),
        }
    }

    fn creates(&self) -> bool {
        self.outcome.starts_with("create_")
    }

    /// The account it creates.
    fn created(&self) -> AccountState {
        let kind = match self.outcome.as_str() {
            "create_internal" => AccountKind::Internal,
            "create_portal_only" => AccountKind::PortalOnly,
            _ => return None,
        };
        let status = self
            .new_status
            .as_deref()
            .and_then(AccountStatus::parse)
            .unwrap_or(AccountStatus::Active);
        Some((kind, status))
    }

    /// Added to the request (existing or new account).
    fn kept(&self) -> bool {
        self.outcome == "add_existing" || self.creates()
    }

    fn describe(&self) -> String {
        match &self.new_status {
            Some(status) if self.creates() => {
                format!("{}, {status} ({})", self.outcome, self.reason)
            }
            _ => format!("{} ({})", self.outcome, self.reason),
        }
    }
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

impl Summary {
    fn of(d: &Value) -> Summary {
        let mut mail = BTreeSet::new();
        for key in ["emails", "emails_suppressed"] {
            for e in d[key].as_array().into_iter().flatten() {
                mail.insert((text(&e["to"]), text(&e["kind"])));
            }
        }
        Summary {
            action: text(&d["action"]),
            reason: text(&d["reason"]),
            request: d["request"].as_str().map(String::from),
            requester: d["requester"]["address"].as_str().map(String::from),
            account: Outcome::of(&d["requester"], "account"),
            participants: d["participants"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| (text(&p["address"]), Outcome::of(p, "outcome")))
                .collect(),
            mail,
        }
    }

    /// The status of the request a new message opens, if it opens one.
    fn opened(&self) -> Option<RequestStatus> {
        match (self.action.as_str(), &self.request) {
            ("create_request", None) => Some(RequestStatus::Open),
            ("hold_for_verification", None) => Some(RequestStatus::Held),
            _ => None,
        }
    }

    fn is_active(&self) -> bool {
        matches!(
            self.action.as_str(),
            "create_request" | "add_comment" | "hold_for_verification"
        )
    }

    fn participant(&self, address: &str) -> Outcome {
        self.participants
            .iter()
            .find(|(a, _)| a == address)
            .map(|(_, o)| o.clone())
            .unwrap_or_else(|| Outcome {
                outcome: "none".into(),
                new_status: None,
                reason: self.reason.clone(),
            })
    }
}

type Difference = (Group, Option<String>, &'static str, String, String);

/// The differences between a decision as recorded and as it would be.
fn compare(before: &Summary, after: &Summary) -> Vec<Difference> {
    let mut out: Vec<Difference> = Vec::new();
    if (&before.action, &before.reason) != (&after.action, &after.reason) {
        let group = match (before.is_active(), after.is_active()) {
            (true, false) => Group::RequestsRejected,
            (false, true) => Group::RequestsAccepted,
            (true, true) => Group::RequestsChanged,
            (false, false) => Group::RejectionsChanged,
        };
        out.push((
            group,
            before.requester.clone().or_else(|| after.requester.clone()),
            "message",
            format!("{} ({})", before.action, before.reason),
            format!("{} ({})", after.action, after.reason),
        ));
    }
    if let Some(group) = account_change(&before.account, &after.account) {
        out.push((
            group,
            before.requester.clone().or_else(|| after.requester.clone()),
            "requester",
            before.account.describe(),
            after.account.describe(),
        ));
    }
    let mut addresses: Vec<&str> = Vec::new();
    for (a, _) in before.participants.iter().chain(&after.participants) {
        if !addresses.contains(&a.as_str()) {
            addresses.push(a);
        }
    }
    for address in addresses {
        let (b, a) = (before.participant(address), after.participant(address));
        // A held request's To/Cc are decided when it is released, under the policy then
        // in force: there is nothing to compare yet.
        if b == a || b.reason == "request_held" || a.reason == "request_held" {
            continue;
        }
        let group = match (b.kept(), a.kept()) {
            (true, false) => Some(Group::ParticipantsDropped),
            (false, true) => Some(Group::ParticipantsAdded),
            (true, true) if (&b.outcome, &b.new_status) != (&a.outcome, &a.new_status) => {
                Some(Group::ParticipantsChanged)
            }
            _ => None,
        };
        if let Some(group) = group {
            out.push((
                group,
                Some(address.to_string()),
                "participant",
                b.describe(),
                a.describe(),
            ));
        }
        if let Some(group) = account_change(&b, &a) {
            out.push((
                group,
                Some(address.to_string()),
                "participant",
                b.describe(),
                a.describe(),
            ));
        }
    }
    for (to, kind) in before.mail.difference(&after.mail) {
        out.push((
            Group::MailNotSent,
            Some(to.clone()),
            "email",
            kind.clone(),
            "none".into(),
        ));
    }
    for (to, kind) in after.mail.difference(&before.mail) {
        out.push((
            Group::MailSent,
            Some(to.clone()),
            "email",
            "none".into(),
            kind.clone(),
        ));
    }
    out
}

/// How an account creation changes, if it does.
fn account_change(before: &Outcome, after: &Outcome) -> Option<Group> {
    match (before.creates(), after.creates()) {
        (true, false) => Some(Group::AccountsNotCreated),
        (false, true) => Some(Group::AccountsCreated),
        (true, true)
            if (&before.outcome, &before.new_status) != (&after.outcome, &after.new_status) =>
        {
            Some(Group::AccountsChanged)
        }
        _ => None,
    }
}

fn by_group(sim: &Simulation) -> BTreeMap<Group, Vec<&Change>> {
    let mut groups: BTreeMap<Group, Vec<&Change>> = BTreeMap::new();
    for c in &sim.changes {
        groups.entry(c.group).or_default().push(c);
    }
    groups
}

const DIRECTORY_NOTE: &str = "its [directory] differs from the one the database was last synced \
     with; simulate decides on the directory as it was when each message arrived, so the \
     directory changes are not part of this simulation";

fn print_json(
    sim: &Simulation,
    config: &Config,
    since: i64,
    directory_differs: bool,
) -> anyhow::Result<()> {
    let counts: BTreeMap<String, usize> = by_group(sim)
        .iter()
        .map(|(g, v)| (g.code(), v.len()))
        .collect();
    let mut out = serde_json::to_string_pretty(&serde_json::json!({
        "config": config.origin,
        "since": since,
        "decided": sim.decided,
        "changed": sim.changed,
        "unchanged": sim.decided - sim.changed,
        "without_facts": sim.without_facts,
        "unrouted": sim.unrouted,
        "unreadable": sim.unreadable,
        "directory_differs": directory_differs,
        "counts": counts,
        "changes": sim.changes,
    }))?;
    out.push('\n');
    emit(&out)
}

fn print_text(
    sim: &Simulation,
    config: &Config,
    since: i64,
    directory_differs: bool,
) -> anyhow::Result<()> {
    use std::fmt::Write;
    let plural = |n: u64| if n == 1 { "" } else { "s" };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} message{} decided since {} under {}: {} would change, {} would not",
        sim.decided,
        plural(sim.decided),
        when(since),
        config.origin,
        sim.changed,
        sim.decided - sim.changed
    );
    if sim.without_facts > 0 {
        let _ = writeln!(
            out,
            "{} message{} decided before decisions recorded their facts (migration 0006) could not be decided again",
            sim.without_facts,
            plural(sim.without_facts),
        );
    }
    if sim.unrouted > 0 {
        let _ = writeln!(
            out,
            "{} message{} that reached no desk {} not decided again (routing is not simulated)",
            sim.unrouted,
            plural(sim.unrouted),
            if sim.unrouted == 1 { "was" } else { "were" }
        );
    }
    if sim.unreadable > 0 {
        let _ = writeln!(
            out,
            "{} recorded decision{} could not be read and {} left out",
            sim.unreadable,
            plural(sim.unreadable),
            if sim.unreadable == 1 { "was" } else { "were" }
        );
    }
    if directory_differs {
        let _ = writeln!(out, "note: {}: {DIRECTORY_NOTE}", config.origin);
    }
    for (group, changes) in by_group(sim) {
        let _ = writeln!(out, "\n{}: {}", group.title(), changes.len());
        let mut t = Table::new(&["WHEN", "DESK", "REQUEST", "ADDRESS", "NOW", "WOULD BE"]);
        for c in changes.iter().take(EXAMPLES) {
            t.row(vec![
                when(c.at),
                c.desk.clone().unwrap_or_default(),
                c.request.clone().unwrap_or_default(),
                c.address.clone().unwrap_or_default(),
                c.before.clone(),
                c.after.clone(),
            ]);
        }
        for line in t.to_string().lines() {
            let _ = writeln!(out, "  {line}");
        }
        if changes.len() > EXAMPLES {
            let _ = writeln!(
                out,
                "  … and {} more (--json lists them all)",
                changes.len() - EXAMPLES
            );
        }
    }
    emit(&out)
}

/// Writes the report to standard output; a reader that went away (`| head`) is no error.
fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

#[cfg(test)]
#[path = "simulate_tests.rs"]
mod tests;

//! Configuration: a TOML file (or the embedded defaults), overridden by environment
//! variables `INTAKE__SECTION__KEY`, read once into raw settings and validated once into
//! a typed [`Config`].
//!
//! Validation collects every problem instead of stopping at the first, and names each by
//! its key and the file (or "the environment") it came from, so `intake check-config`
//! can print them all. Secrets can always be read from files (`*_file` keys), which is
//! how systemd credentials arrive.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::address::{AddressError, DomainPattern, EmailAddress};
use crate::keys::DeskKey;
use crate::policy::{
    AccountKind, AccountStatus, AddressRule, ChannelAccess, Desk, Hygiene, MailLimits, Policy,
    Sharing, Signup, SiteAccess, StrangerReplies, Trust, UnknownParticipants,
};

/// The configuration used when neither `--config` nor `$CONFIGURATION_DIRECTORY` is given.
pub const EMBEDDED_DEFAULTS: &str = include_str!("../config.example.toml");
const EMBEDDED_ORIGIN: &str = "embedded defaults";

/// One problem with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// The file the key came from, "the environment", or "embedded defaults".
    pub origin: String,
    /// The key, as `section.key` or `desks[0].sharing`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.origin, self.key, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot load configuration from {origin}: {message}")]
    Load { origin: String, message: String },
    #[error("invalid configuration ({} problem{}):\n{}", .0.len(), if .0.len() == 1 { "" } else { "s" }, issues_list(.0))]
    Invalid(Vec<ConfigIssue>),
}

fn issues_list(issues: &[ConfigIssue]) -> String {
    issues
        .iter()
        .map(|i| format!("  {i}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Where the configuration comes from.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    File(PathBuf),
    Embedded,
}

impl ConfigSource {
    /// `--config FILE` wins; then `$CONFIGURATION_DIRECTORY/intake.toml` (systemd's
    /// `ConfigurationDirectory=`); then the embedded defaults.
    pub fn locate(explicit: Option<&Path>) -> ConfigSource {
        if let Some(p) = explicit {
            return ConfigSource::File(p.to_path_buf());
        }
        if let Some(dir) = std::env::var_os("CONFIGURATION_DIRECTORY") {
            // systemd may pass several directories separated by ':'; the first is ours.
            let first = dir
                .to_string_lossy()
                .split(':')
                .next()
                .unwrap_or_default()
                .to_string();
            if !first.is_empty() {
                return ConfigSource::File(Path::new(&first).join("intake.toml"));
            }
        }
        ConfigSource::Embedded
    }

    pub fn describe(&self) -> String {
        match self {
            ConfigSource::File(p) => p.display().to_string(),
            ConfigSource::Embedded => EMBEDDED_ORIGIN.to_string(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Typed configuration

#[derive(Clone)]
pub struct DatabaseConfig {
    pub url: SecretString,
    pub max_connections: u32,
    /// How long an instance's claim on a mailbox lasts without renewal: how soon
    /// another instance takes over when it dies.
    pub mailbox_lease: Duration,
    /// PostgreSQL: how long a transaction of ours may sit waiting for us before the
    /// server ends the session (`idle_in_transaction_session_timeout`), so an instance
    /// that froze mid-batch cannot hold its locks (a desk's counter) for ever.
    pub idle_transaction_timeout: Duration,
}

impl DatabaseConfig {
    pub fn is_sqlite(&self) -> bool {
        self.url.expose_secret().starts_with("sqlite:")
    }

    /// The URL with any password replaced, for logs and errors.
    pub fn redacted_url(&self) -> String {
        redact_url(self.url.expose_secret())
    }
}

impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &self.redacted_url())
            .field("max_connections", &self.max_connections)
            .field("mailbox_lease", &self.mailbox_lease)
            .field("idle_transaction_timeout", &self.idle_transaction_timeout)
            .finish()
    }
}

/// Replaces the password in `scheme://user:password@host` and in a `password=` query
/// parameter with `***`.
pub fn redact_url(url: &str) -> String {
    let url = redact_userinfo(url);
    match url.split_once('?') {
        Some((base, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => p.to_string(),
                })
                .collect();
            format!("{base}?{}", params.join("&"))
        }
        None => url,
    }
}

fn redact_userinfo(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            let masked = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                user.to_string()
            };
            format!(
                "{}://{}@{}{}",
                &url[..scheme_end],
                masked,
                &authority[at + 1..],
                &rest[authority_end..]
            )
        }
        None => url.to_string(),
    }
}

/// What happens to a message in its mailbox once its outcome is committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum After {
    /// Flag it Seen (Maildir: move to `cur/` with the S flag).
    Seen,
    /// Move it into this folder (Maildir: a Maildir++ subfolder `.NAME`).
    Move(String),
    /// Delete it (IMAP: `\Deleted` and UID EXPUNGE).
    Delete,
}

#[derive(Debug, Clone)]
pub struct MaildirConfig {
    pub path: PathBuf,
    pub poll_interval: Duration,
    pub after: After,
    /// Maildir++ folder for quarantined mail.
    pub quarantine_folder: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImapTls {
    /// TLS from the first byte (port 993).
    Implicit,
    /// Plain connection upgraded with STARTTLS (port 143).
    StartTls,
    /// No TLS: only for loopback, or with `allow_plaintext = true`.
    None,
}

/// Where an OAuth2 access token comes from.
#[derive(Debug, Clone)]
pub enum TokenSource {
    /// Read from this file at every (re)connect; something else keeps it fresh.
    File(PathBuf),
    /// Printed by this command (run with `sh -c`); cached for `lifetime`, then run again.
    Command { command: String, lifetime: Duration },
}

#[derive(Clone)]
pub enum ImapAuth {
    Password(SecretString),
    XOAuth2(TokenSource),
}

impl fmt::Debug for ImapAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImapAuth::Password(_) => f.write_str("Password(***)"),
            ImapAuth::XOAuth2(t) => f.debug_tuple("XOAuth2").field(t).finish(),
        }
    }
}

/// Which messages a mailbox seen for the first time starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// Everything already in the folder.
    All,
    /// Only mail that arrives from now on.
    New,
}

#[derive(Debug, Clone)]
pub struct ImapConfig {
    pub host: String,
    pub port: u16,
    pub tls: ImapTls,
    /// Extra CA certificates (PEM) trusted besides the system roots.
    pub ca_file: Option<PathBuf>,
    pub username: String,
    pub auth: ImapAuth,
    pub folder: String,
    pub after: After,
    pub quarantine_folder: String,
    /// Use IDLE when the server offers it.
    pub idle: bool,
    /// IDLE is re-issued after this long (RFC 2177: well inside 29 minutes).
    pub idle_timeout: Duration,
    /// Polling interval when IDLE is off or not offered.
    pub poll_interval: Duration,
    pub batch_size: usize,
    pub start: StartAt,
    pub connect_timeout: Duration,
    /// How long the server may stay silent while a reply is due (not in IDLE).
    pub reply_timeout: Duration,
    /// A message whose body the server keeps failing to return (a file it cannot read,
    /// a broken message) is quarantined once it has failed for this long, in 3 tries
    /// at least; the mail behind it waits until then.
    pub unfetchable_after: Duration,
}

impl ImapConfig {
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

#[derive(Debug, Clone)]
pub enum MailboxKind {
    Maildir(MaildirConfig),
    Imap(Box<ImapConfig>),
}

#[derive(Debug, Clone)]
pub struct MailboxConfig {
    pub name: String,
    pub desk: DeskKey,
    pub kind: MailboxKind,
}

#[derive(Debug, Clone)]
pub struct OutboxConfig {
    /// Where mail is written when no SMTP server is configured.
    pub dir: PathBuf,
    pub from_name: String,
    pub message_id_domain: String,
    pub max_attempts: u32,
    pub poll_interval: Duration,
    /// Directory with template overrides (`verification.txt`, ...).
    pub templates_dir: Option<PathBuf>,
    /// Delay before the first retry of a failed send (later ones double).
    pub retry_first: Duration,
    /// Verification and invitation mail to one address per 24 hours.
    pub max_per_recipient_per_day: u32,
    /// Verification and invitation mail in total per hour.
    pub max_per_hour: u32,
    /// How long sent mail stays in the outbox before it is deleted; `None` keeps it.
    pub keep_sent: Option<Duration>,
}

/// How long sent mail is kept by default.
pub const DEFAULT_KEEP_SENT: Duration = Duration::from_secs(90 * 86_400);
/// The shortest `outbox.keep_sent`: a bounce can come days after the mail (a relay
/// retries for up to five), and the mail limits count the last 24 hours.
pub const MIN_KEEP_SENT: Duration = Duration::from_secs(7 * 86_400);

#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Where the verification pages and `/healthz` are served; `None` turns the server off.
    pub listen: Option<SocketAddr>,
    pub public_url: String,
    /// Bearer token for `/audit` and `/metrics`; without it they answer loopback peers only.
    pub audit_token: Option<SecretString>,
    /// How long a client has to send a request's headers, and how long an idle
    /// keep-alive connection stays open.
    pub read_timeout: Duration,
    /// Connections served at once; more wait to be accepted.
    pub max_connections: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTls {
    Implicit,
    StartTls,
    None,
}

/// The SMTP relay outgoing mail goes through; without it mail is written to files.
#[derive(Clone)]
pub struct SmtpConfig {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    pub ca_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<SecretString>,
    pub timeout: Duration,
    /// The name we give in EHLO.
    pub hello_name: Option<String>,
}

impl SmtpConfig {
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

impl fmt::Debug for SmtpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct OrganizationEntry {
    pub name: String,
    pub domains: Vec<DomainPattern>,
    pub desks: Vec<DeskKey>,
}

#[derive(Debug, Clone)]
pub struct AccountEntry {
    pub address: EmailAddress,
    pub display_name: Option<String>,
    pub kind: AccountKind,
    pub status: AccountStatus,
    pub organizations: Vec<String>,
    pub desks: Vec<DeskKey>,
}

#[derive(Debug, Clone)]
pub struct AgentEntry {
    pub address: EmailAddress,
    pub display_name: Option<String>,
    pub desks: Vec<DeskKey>,
}

#[derive(Debug, Clone)]
pub struct GroupEntry {
    pub name: String,
    pub members: Vec<EmailAddress>,
    pub desks: Vec<DeskKey>,
}

/// The declarative part of the directory, synced into the database at start.
#[derive(Debug, Clone, Default)]
pub struct DirectoryConfig {
    pub organizations: Vec<OrganizationEntry>,
    pub accounts: Vec<AccountEntry>,
    pub agents: Vec<AgentEntry>,
    pub groups: Vec<GroupEntry>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it was read from (a file path or "embedded defaults").
    pub origin: String,
    pub database: DatabaseConfig,
    pub policy: Policy,
    /// Outgoing `From` per desk.
    pub desk_from: HashMap<DeskKey, EmailAddress>,
    pub verification_ttl: Duration,
    /// Held requests and pending accounts expire after this long.
    pub hold_ttl: Duration,
    pub max_message_size: u64,
    /// Where messages from `deliver` and `process` are kept when quarantined.
    pub quarantine_dir: PathBuf,
    pub mailboxes: Vec<MailboxConfig>,
    pub outbox: OutboxConfig,
    pub smtp: Option<SmtpConfig>,
    pub http: HttpConfig,
    pub directory: DirectoryConfig,
}

impl Config {
    /// Loads and validates the configuration from `source` and the process environment.
    pub fn load(source: &ConfigSource) -> Result<Config, ConfigError> {
        Self::load_with_env(source, None)
    }

    /// Like [`Config::load`], with an explicit environment (tests pass their own).
    pub fn load_with_env(
        source: &ConfigSource,
        env: Option<HashMap<String, String>>,
    ) -> Result<Config, ConfigError> {
        let origin = source.describe();
        let mut builder = config::Config::builder();
        builder = match source {
            ConfigSource::File(path) => {
                if !path.is_file() {
                    return Err(ConfigError::Load {
                        origin,
                        message: "no such file".into(),
                    });
                }
                builder.add_source(
                    config::File::from(path.as_path())
                        .format(config::FileFormat::Toml)
                        .required(true),
                )
            }
            ConfigSource::Embedded => builder.add_source(config::File::from_str(
                EMBEDDED_DEFAULTS,
                config::FileFormat::Toml,
            )),
        };
        let mut environment = config::Environment::with_prefix("INTAKE")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",");
        for key in LIST_KEYS {
            environment = environment.with_list_parse_key(key);
        }
        if let Some(env) = env {
            environment = environment.source(Some(env.into_iter().collect()));
        }
        let built = builder
            .add_source(environment)
            .build()
            .map_err(|e| ConfigError::Load {
                origin: origin.clone(),
                message: e.to_string(),
            })?;

        let mut unknown: Vec<String> = Vec::new();
        let raw: Result<RawConfig, _> = {
            let mut record = |path: serde_ignored::Path<'_>| unknown.push(path.to_string());
            let de = serde_ignored::Deserializer::new(built.clone(), &mut record);
            serde_path_to_error::deserialize(de)
        };
        let locate = |key: &str| -> String {
            // The config crate records file origins as paths relative to the working
            // directory; there is only one file, so name it as the operator gave it.
            match find_value(&built.cache, key).and_then(|v| v.origin()) {
                Some(o) if o == "the environment" => o.to_string(),
                _ => origin.clone(),
            }
        };
        let raw = match raw {
            Ok(raw) => raw,
            Err(e) => {
                let key = config_path(&e.path().to_string());
                return Err(ConfigError::Invalid(vec![ConfigIssue {
                    origin: locate(&key),
                    key,
                    message: e.into_inner().to_string(),
                }]));
            }
        };
        let mut v = Validator {
            issues: Vec::new(),
            locate: &locate,
        };
        for path in unknown {
            let key = config_path(&path);
            v.issue(&key, "unknown key");
        }
        let config = v.validate(raw, &origin);
        if v.issues.is_empty()
            && let Some(config) = config
        {
            return Ok(config);
        }
        Err(ConfigError::Invalid(v.issues))
    }
}

/// Finds the value at `a.b[0].c` (or its nearest existing parent, so an unknown or
/// missing key is attributed to the table it sits in).
fn find_value<'v>(root: &'v config::Value, key: &str) -> Option<&'v config::Value> {
    let mut cur = root;
    let mut last_with_origin = None;
    for seg in key.split('.') {
        let (name, indices) = match seg.find('[') {
            Some(i) => (&seg[..i], &seg[i..]),
            None => (seg, ""),
        };
        if !name.is_empty() {
            let config::ValueKind::Table(t) = &cur.kind else {
                break;
            };
            let Some(next) = t.get(name) else { break };
            cur = next;
        }
        for idx in indices
            .split(['[', ']'])
            .filter(|s| !s.is_empty())
            .filter_map(|s| s.parse::<usize>().ok())
        {
            let config::ValueKind::Array(a) = &cur.kind else {
                return last_with_origin.or(Some(cur));
            };
            let Some(next) = a.get(idx) else {
                return last_with_origin.or(Some(cur));
            };
            cur = next;
        }
        if cur.origin().is_some() {
            last_with_origin = Some(cur);
        }
    }
    if cur.origin().is_some() {
        Some(cur)
    } else {
        last_with_origin
    }
}

/// Keys whose environment override is a comma-separated list.
const LIST_KEYS: &[&str] = &[
    "customer_access.approved_domains",
    "customer_access.external_domains",
    "trust.authserv_ids",
    "hygiene.blocked",
];

/// `desks.0.sharing` (serde_ignored / path_to_error form) → `desks[0].sharing`.
fn config_path(path: &str) -> String {
    let mut out = String::new();
    for seg in path.split('.') {
        if seg.is_empty() || seg == "?" {
            continue;
        }
        if seg.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(seg);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Raw configuration, as written

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct RawConfig {
    database: RawDatabase,
    customer_access: RawAccess,
    trust: RawTrust,
    hygiene: RawHygiene,
    desks: Vec<RawDesk>,
    mailboxes: Vec<RawMailbox>,
    outbox: RawOutbox,
    http: RawHttp,
    limits: RawLimits,
    quarantine: RawQuarantine,
    smtp: Option<RawSmtp>,
    directory: RawDirectory,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct RawDatabase {
    url: Option<String>,
    url_file: Option<String>,
    max_connections: Option<u32>,
    mailbox_lease: Option<String>,
    idle_transaction_timeout: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct RawAccess {
    approved_domains: Vec<String>,
    portal_only_accounts: Option<bool>,
    external_domains: Vec<String>,
    signup: Option<String>,
    verification_ttl: Option<String>,
    verification_resend_interval: Option<String>,
    hold_ttl: Option<String>,
    rejection_notices: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct RawTrust {
    authserv_ids: Vec<String>,
    microsoft365: bool,
    require_authentication: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct RawHygiene {
    max_participants: Option<usize>,
    blocked: Vec<String>,
    allowed: Vec<String>,
    mailing_lists: Option<String>,
    max_requests_per_sender_per_hour: Option<u32>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct RawDesk {
    key: String,
    name: Option<String>,
    addresses: Vec<String>,
    from: Option<String>,
    channel_access: Option<String>,
    sharing: Option<String>,
    unknown_participants: Option<String>,
    agents_may_add_customers: Option<bool>,
    blocked: Vec<String>,
    allowed: Vec<String>,
    stranger_replies: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct RawMailbox {
    name: String,
    kind: String,
    path: Option<String>,
    desk: String,
    poll_interval: Option<String>,
    after: Option<String>,
    quarantine_folder: Option<String>,
    // IMAP
    host: Option<String>,
    port: Option<u16>,
    tls: Option<String>,
    allow_plaintext: Option<bool>,
    ca_file: Option<String>,
    username: Option<String>,
    password: Option<String>,
    password_file: Option<String>,
    auth: Option<String>,
    token_file: Option<String>,
    token_command: Option<String>,
    token_lifetime: Option<String>,
    folder: Option<String>,
    idle: Option<bool>,
    idle_timeout: Option<String>,
    batch_size: Option<usize>,
    start: Option<String>,
    connect_timeout: Option<String>,
    reply_timeout: Option<String>,
    unfetchable_after: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct RawOutbox {
    dir: Option<String>,
    from_name: Option<String>,
    message_id_domain: Option<String>,
    max_attempts: Option<u32>,
    poll_interval: Option<String>,
    templates_dir: Option<String>,
    max_per_recipient_per_day: Option<u32>,
    max_per_hour: Option<u32>,
    retry_first: Option<String>,
    keep_sent: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct RawSmtp {
    host: Option<String>,
    port: Option<u16>,
    tls: Option<String>,
    allow_plaintext: Option<bool>,
    ca_file: Option<String>,
    username: Option<String>,
    password: Option<String>,
    password_file: Option<String>,
    timeout: Option<String>,
    hello_name: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct RawQuarantine {
    dir: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct RawHttp {
    listen: Option<String>,
    public_url: Option<String>,
    audit_token: Option<String>,
    audit_token_file: Option<String>,
    read_timeout: Option<String>,
    max_connections: Option<usize>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct RawLimits {
    max_message_size: Option<RawSize>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawSize {
    Bytes(u64),
    Text(String),
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct RawDirectory {
    organizations: Vec<RawOrganization>,
    accounts: Vec<RawAccount>,
    agents: Vec<RawAgent>,
    groups: Vec<RawGroup>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct RawOrganization {
    name: String,
    domains: Vec<String>,
    desks: Vec<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct RawAccount {
    address: String,
    display_name: Option<String>,
    kind: Option<String>,
    status: Option<String>,
    organizations: Vec<String>,
    desks: Vec<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct RawAgent {
    address: String,
    display_name: Option<String>,
    desks: Vec<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct RawGroup {
    name: String,
    members: Vec<String>,
    desks: Vec<String>,
}

// ---------------------------------------------------------------------------------------
// Validation

struct Validator<'a> {
    issues: Vec<ConfigIssue>,
    locate: &'a dyn Fn(&str) -> String,
}

impl Validator<'_> {
    fn issue(&mut self, key: &str, message: impl Into<String>) {
        self.issues.push(ConfigIssue {
            origin: (self.locate)(key),
            key: key.to_string(),
            message: message.into(),
        });
    }

    fn choice<T: Copy>(
        &mut self,
        key: &str,
        value: Option<&str>,
        default: T,
        choices: &[(&str, T)],
    ) -> T {
        let Some(value) = value else { return default };
        match choices.iter().find(|(name, _)| *name == value) {
            Some((_, v)) => *v,
            None => {
                let names: Vec<String> = choices.iter().map(|(n, _)| format!("{n:?}")).collect();
                self.issue(key, format!("{value:?} is not one of {}", names.join(", ")));
                default
            }
        }
    }

    fn rules(&mut self, key: &str, values: &[String]) -> Vec<AddressRule> {
        let mut out = Vec::new();
        for (i, b) in values.iter().enumerate() {
            match AddressRule::parse(b) {
                Ok(r) => out.push(r),
                Err(e) => self.issue(&format!("{key}[{i}]"), address_message(&e)),
            }
        }
        out
    }

    fn duration(&mut self, key: &str, value: Option<&str>, default: Duration) -> Duration {
        match value {
            None => default,
            Some(v) => parse_duration(v).unwrap_or_else(|| {
                self.issue(
                    key,
                    format!("{v:?} is not a duration like \"30s\", \"5m\", \"72h\" or \"7d\""),
                );
                default
            }),
        }
    }

    /// `outbox.keep_sent`: a duration of at least [`MIN_KEEP_SENT`], or "forever".
    fn keep_sent(&mut self, value: Option<&str>) -> Option<Duration> {
        const KEY: &str = "outbox.keep_sent";
        if value.is_some_and(|v| v.trim().eq_ignore_ascii_case("forever")) {
            return None;
        }
        let keep = self.duration(KEY, value, DEFAULT_KEEP_SENT);
        if keep < MIN_KEEP_SENT {
            self.issue(
                KEY,
                format!(
                    "{keep:?} is too short: bounces are matched to sent mail and mail limits count it, so keep it at least 7d (or \"forever\")"
                ),
            );
        }
        Some(keep)
    }

    fn address(&mut self, key: &str, value: &str) -> Option<EmailAddress> {
        match EmailAddress::parse(value) {
            Ok(a) => Some(a),
            Err(e) => {
                self.issue(key, address_message(&e));
                None
            }
        }
    }

    fn domains(&mut self, key: &str, values: &[String]) -> Vec<DomainPattern> {
        let mut out = Vec::new();
        for (i, d) in values.iter().enumerate() {
            match DomainPattern::parse(d) {
                Ok(p) => out.push(p),
                Err(e) => self.issue(&format!("{key}[{i}]"), address_message(&e)),
            }
        }
        out
    }

    fn desk_refs(&mut self, key: &str, values: &[String], known: &HashSet<String>) -> Vec<DeskKey> {
        let mut out = Vec::new();
        for (i, d) in values.iter().enumerate() {
            if !known.contains(d) {
                self.issue(&format!("{key}[{i}]"), format!("unknown desk {d:?}"));
                continue;
            }
            if let Ok(k) = DeskKey::parse(d) {
                out.push(k);
            }
        }
        out
    }

    fn secret(
        &mut self,
        key: &str,
        inline: Option<String>,
        file: Option<String>,
    ) -> Option<String> {
        match (inline, file) {
            (Some(_), Some(_)) => {
                self.issue(
                    &format!("{key}_file"),
                    format!("set either {key} or {key}_file, not both"),
                );
                None
            }
            (Some(v), None) => Some(v),
            (None, Some(path)) => match std::fs::read_to_string(&path) {
                Ok(s) => Some(s.trim_end_matches(['\r', '\n']).to_string()),
                Err(e) => {
                    self.issue(&format!("{key}_file"), format!("cannot read {path}: {e}"));
                    None
                }
            },
            (None, None) => None,
        }
    }

    fn validate(&mut self, raw: RawConfig, origin: &str) -> Option<Config> {
        // Database.
        let url = self
            .secret("database.url", raw.database.url, raw.database.url_file)
            .unwrap_or_else(|| "sqlite://var/intake.db".to_string());
        if !(url.starts_with("sqlite:")
            || url.starts_with("postgres:")
            || url.starts_with("postgresql:"))
        {
            self.issue(
                "database.url",
                format!(
                    "{} is neither a sqlite:// nor a postgres:// URL",
                    redact_url(&url)
                ),
            );
        }
        let max_connections = raw.database.max_connections.unwrap_or(8);
        if max_connections == 0 {
            self.issue("database.max_connections", "must be at least 1");
        }
        let mailbox_lease = self.duration(
            "database.mailbox_lease",
            raw.database.mailbox_lease.as_deref(),
            Duration::from_secs(30),
        );
        if mailbox_lease < Duration::from_secs(3) || mailbox_lease > Duration::from_secs(3600) {
            self.issue(
                "database.mailbox_lease",
                "must be between 3s and 1h (renewed every third of it)",
            );
        }
        let idle_transaction_timeout = self.duration(
            "database.idle_transaction_timeout",
            raw.database.idle_transaction_timeout.as_deref(),
            Duration::from_secs(60),
        );
        if idle_transaction_timeout < Duration::from_secs(1)
            || idle_transaction_timeout > Duration::from_secs(3600)
        {
            self.issue(
                "database.idle_transaction_timeout",
                "must be between 1s and 1h",
            );
        }

        // Site customer access.
        let a = raw.customer_access;
        let approved_domains =
            self.domains("customer_access.approved_domains", &a.approved_domains);
        let external_domains =
            self.domains("customer_access.external_domains", &a.external_domains);
        let signup = self.choice(
            "customer_access.signup",
            a.signup.as_deref(),
            Signup::Verify,
            &[
                ("closed", Signup::Closed),
                ("verify", Signup::Verify),
                ("open", Signup::Open),
            ],
        );
        let verification_ttl = self.duration(
            "customer_access.verification_ttl",
            a.verification_ttl.as_deref(),
            Duration::from_secs(72 * 3600),
        );
        let resend = self.duration(
            "customer_access.verification_resend_interval",
            a.verification_resend_interval.as_deref(),
            Duration::from_secs(3600),
        );
        let hold_ttl = self.duration(
            "customer_access.hold_ttl",
            a.hold_ttl.as_deref(),
            Duration::from_secs(7 * 86400),
        );

        // Trust.
        let authserv_ids: Vec<String> = raw
            .trust
            .authserv_ids
            .iter()
            .map(|s| s.trim().to_ascii_lowercase())
            .collect();
        for (i, id) in authserv_ids.iter().enumerate() {
            if id.is_empty() || id.contains(char::is_whitespace) || id.contains(';') {
                self.issue(
                    &format!("trust.authserv_ids[{i}]"),
                    format!("{id:?} is not an authserv-id (a host name such as mx.example.com)"),
                );
            }
        }
        let require_authentication = raw.trust.require_authentication.unwrap_or(true);
        let microsoft365 = raw.trust.microsoft365;
        if require_authentication && authserv_ids.is_empty() && !microsoft365 {
            self.issue(
                "trust.require_authentication",
                "is on (the default) but trust.authserv_ids is empty, so no internal sender could ever be believed: name your MTA's authserv-id (or set microsoft365 = true for a Microsoft 365 mailbox), or set require_authentication = false",
            );
        }

        // Desks.
        if raw.desks.is_empty() {
            self.issue("desks", "at least one [[desks]] entry is needed");
        }
        let mut desks = Vec::new();
        let mut desk_from = HashMap::new();
        let mut desk_keys = HashSet::new();
        let mut address_owner: HashMap<EmailAddress, String> = HashMap::new();
        for (i, d) in raw.desks.into_iter().enumerate() {
            let k = format!("desks[{i}]");
            let key = match DeskKey::parse(&d.key) {
                Ok(key) => {
                    if !desk_keys.insert(d.key.clone()) {
                        self.issue(
                            &format!("{k}.key"),
                            format!("desk {:?} is defined twice", d.key),
                        );
                    }
                    Some(key)
                }
                Err(e) => {
                    self.issue(&format!("{k}.key"), e.to_string());
                    None
                }
            };
            if d.addresses.is_empty() {
                self.issue(
                    &format!("{k}.addresses"),
                    "a desk needs at least one address",
                );
            }
            let mut addresses = Vec::new();
            for (j, a) in d.addresses.iter().enumerate() {
                let ak = format!("{k}.addresses[{j}]");
                if let Some(addr) = self.address(&ak, a) {
                    if let Some(other) = address_owner.get(&addr) {
                        self.issue(&ak, format!("{addr} is already an address of desk {other}"));
                    } else {
                        address_owner.insert(addr.clone(), d.key.clone());
                        addresses.push(addr);
                    }
                }
            }
            let from = match &d.from {
                Some(f) => self.address(&format!("{k}.from"), f),
                None => addresses.first().cloned(),
            };
            let channel_access = self.choice(
                &format!("{k}.channel_access"),
                d.channel_access.as_deref(),
                ChannelAccess::Open,
                &[
                    ("open", ChannelAccess::Open),
                    ("restricted", ChannelAccess::Restricted),
                ],
            );
            let sharing = self.choice(
                &format!("{k}.sharing"),
                d.sharing.as_deref(),
                Sharing::Organization,
                &[
                    ("none", Sharing::None),
                    ("organization", Sharing::Organization),
                    ("any", Sharing::Any),
                ],
            );
            let unknown_participants = self.choice(
                &format!("{k}.unknown_participants"),
                d.unknown_participants.as_deref(),
                UnknownParticipants::Drop,
                &[
                    ("drop", UnknownParticipants::Drop),
                    ("create", UnknownParticipants::Create),
                ],
            );
            let desk_blocked = self.rules(&format!("{k}.blocked"), &d.blocked);
            let desk_allowed = self.rules(&format!("{k}.allowed"), &d.allowed);
            let stranger_replies = self.choice(
                &format!("{k}.stranger_replies"),
                d.stranger_replies.as_deref(),
                StrangerReplies::NewRequest,
                &[
                    ("new_request", StrangerReplies::NewRequest),
                    ("comment", StrangerReplies::Comment),
                ],
            );
            if let Some(key) = key {
                if let Some(from) = from {
                    desk_from.insert(key.clone(), from);
                }
                desks.push(Desk {
                    name: d.name.unwrap_or_else(|| key.to_string()),
                    key,
                    addresses,
                    channel_access,
                    sharing,
                    unknown_participants,
                    agents_may_add_customers: d.agents_may_add_customers.unwrap_or(false),
                    blocked: desk_blocked,
                    allowed: desk_allowed,
                    stranger_replies,
                });
            }
        }

        // Mailboxes.
        let mut mailboxes = Vec::new();
        let mut mailbox_names = HashSet::new();
        // What each mailbox reads, and which mailbox read it first: two mailboxes on one
        // folder would both take (move, flag, delete) every message.
        let mut read_by: HashMap<String, String> = HashMap::new();
        let mut written_by: HashMap<String, String> = HashMap::new();
        for (i, m) in raw.mailboxes.into_iter().enumerate() {
            let k = format!("mailboxes[{i}]");
            let name = m.name.clone();
            if m.name.trim().is_empty() {
                self.issue(&format!("{k}.name"), "a mailbox needs a name");
            } else if !valid_folder(&m.name) {
                self.issue(
                    &format!("{k}.name"),
                    format!(
                        "{:?} is not a mailbox name (letters, digits, '.', '-', '_')",
                        m.name
                    ),
                );
            } else if !mailbox_names.insert(m.name.clone()) {
                self.issue(
                    &format!("{k}.name"),
                    format!("mailbox {:?} is defined twice", m.name),
                );
            }
            let desk = if desk_keys.contains(&m.desk) {
                DeskKey::parse(&m.desk).ok()
            } else {
                self.issue(&format!("{k}.desk"), format!("unknown desk {:?}", m.desk));
                None
            };
            let after = match m.after.as_deref() {
                None | Some("seen") => After::Seen,
                Some("delete") => After::Delete,
                Some(other) => match other.strip_prefix("move:") {
                    Some(folder) if valid_folder(folder) => After::Move(folder.to_string()),
                    _ => {
                        self.issue(
                            &format!("{k}.after"),
                            format!(
                                "{other:?} is not one of \"seen\", \"delete\", \"move:FOLDER\""
                            ),
                        );
                        After::Seen
                    }
                },
            };
            let quarantine_folder = m
                .quarantine_folder
                .clone()
                .unwrap_or_else(|| "Quarantine".into());
            if !valid_folder(&quarantine_folder) {
                self.issue(
                    &format!("{k}.quarantine_folder"),
                    format!("{quarantine_folder:?} is not a folder name"),
                );
            }
            let kind = match m.kind.as_str() {
                "maildir" => {
                    let path = match m.path.as_deref().map(str::trim) {
                        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
                        _ => {
                            self.issue(&format!("{k}.path"), "a maildir mailbox needs a path");
                            None
                        }
                    };
                    let poll_interval = self.duration(
                        &format!("{k}.poll_interval"),
                        m.poll_interval.as_deref(),
                        Duration::from_secs(2),
                    );
                    path.map(|path| {
                        MailboxKind::Maildir(MaildirConfig {
                            path,
                            poll_interval,
                            after,
                            quarantine_folder,
                        })
                    })
                }
                "imap" => self
                    .imap(&k, m, after, quarantine_folder)
                    .map(|c| MailboxKind::Imap(Box::new(c))),
                other => {
                    self.issue(
                        &format!("{k}.kind"),
                        format!(
                            "{other:?} is not a supported mailbox kind (\"maildir\", \"imap\")"
                        ),
                    );
                    None
                }
            };
            if let Some(kind) = &kind {
                let (key, reads, writes) = places(kind);
                let clash = read_by
                    .get(&reads)
                    .or_else(|| written_by.get(&reads))
                    .map(|first| (format!("{k}.{key}"), first.clone()))
                    .or_else(|| {
                        writes.iter().find_map(|w| {
                            read_by
                                .get(w)
                                .map(|first| (format!("{k}.after"), first.clone()))
                        })
                    });
                if let Some((key, first)) = clash {
                    self.issue(
                        &key,
                        format!(
                            "mailbox {name:?} and mailbox {first:?} read the same folder, or one reads where the other files mail (after = \"move:...\", quarantine_folder): mail would be taken twice; keep them apart"
                        ),
                    );
                }
                read_by.entry(reads).or_insert_with(|| name.clone());
                for w in writes {
                    written_by.entry(w).or_insert_with(|| name.clone());
                }
            }
            if let (Some(desk), Some(kind)) = (desk, kind) {
                mailboxes.push(MailboxConfig { name, desk, kind });
            }
        }

        // Outbox and HTTP.
        let message_id_domain = match raw.outbox.message_id_domain {
            Some(d) => match crate::address::Domain::parse(&d) {
                Ok(d) => d.to_string(),
                Err(e) => {
                    self.issue("outbox.message_id_domain", address_message(&e));
                    String::new()
                }
            },
            None => desks
                .first()
                .and_then(|d| d.addresses.first())
                .map(|a| format!("intake.{}", a.domain()))
                .unwrap_or_else(|| "intake.invalid".into()),
        };
        let outbox = OutboxConfig {
            dir: PathBuf::from(raw.outbox.dir.unwrap_or_else(|| "var/outbox".into())),
            from_name: raw
                .outbox
                .from_name
                .unwrap_or_else(|| "Service desk".into()),
            max_attempts: raw.outbox.max_attempts.unwrap_or(12).max(1),
            poll_interval: self.duration(
                "outbox.poll_interval",
                raw.outbox.poll_interval.as_deref(),
                Duration::from_secs(1),
            ),
            message_id_domain: message_id_domain.clone(),
            templates_dir: raw.outbox.templates_dir.map(PathBuf::from),
            retry_first: self.duration(
                "outbox.retry_first",
                raw.outbox.retry_first.as_deref(),
                Duration::from_secs(30),
            ),
            max_per_recipient_per_day: raw.outbox.max_per_recipient_per_day.unwrap_or(3),
            max_per_hour: raw.outbox.max_per_hour.unwrap_or(200),
            keep_sent: self.keep_sent(raw.outbox.keep_sent.as_deref()),
        };
        let smtp = raw.smtp.and_then(|raw| self.smtp(raw));
        let listen = match raw.http.listen.as_deref() {
            None => "127.0.0.1:8080".parse().ok(),
            Some("") | Some("off") => None,
            Some(s) => match s.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    self.issue(
                        "http.listen",
                        format!("{s:?} is not an address like 127.0.0.1:8080"),
                    );
                    None
                }
            },
        };
        let public_url = raw.http.public_url.unwrap_or_else(|| {
            format!(
                "http://{}",
                listen
                    .map(|a| a.to_string())
                    .unwrap_or_else(|| "localhost:8080".into())
            )
        });
        if !(public_url.starts_with("http://") || public_url.starts_with("https://")) {
            self.issue(
                "http.public_url",
                format!("{public_url:?} must start with http:// or https://"),
            );
        }
        let read_timeout = self.duration(
            "http.read_timeout",
            raw.http.read_timeout.as_deref(),
            Duration::from_secs(30),
        );
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&read_timeout) {
            self.issue("http.read_timeout", "must be from 1s to 1h");
        }
        let http_max_connections = raw.http.max_connections.unwrap_or(256);
        if !(1..=100_000).contains(&http_max_connections) {
            self.issue("http.max_connections", "must be from 1 to 100000");
        }
        let token_key = if raw.http.audit_token_file.is_some() {
            "http.audit_token_file"
        } else {
            "http.audit_token"
        };
        let audit_token = self
            .secret(
                "http.audit_token",
                raw.http.audit_token,
                raw.http.audit_token_file,
            )
            .filter(|t| {
                // It travels in an Authorization header and guards the audit log.
                let problem = if t.len() < 16 {
                    "the token is too short: use at least 16 characters (e.g. from `openssl rand -hex 32`)"
                } else if !t.bytes().all(|b| b.is_ascii_graphic()) {
                    "the token may only contain visible ASCII characters (no spaces)"
                } else {
                    return true;
                };
                self.issue(token_key, problem);
                false
            })
            .map(SecretString::from);
        let max_message_size = match raw.limits.max_message_size {
            None => 30 * 1024 * 1024,
            Some(RawSize::Bytes(b)) => b,
            Some(RawSize::Text(t)) => parse_size(&t).unwrap_or_else(|| {
                self.issue(
                    "limits.max_message_size",
                    format!("{t:?} is not a size like \"25MB\""),
                );
                30 * 1024 * 1024
            }),
        };

        // Hygiene.
        let blocked = self.rules("hygiene.blocked", &raw.hygiene.blocked);
        let allowed = self.rules("hygiene.allowed", &raw.hygiene.allowed);
        let ignore_mailing_lists = self.choice(
            "hygiene.mailing_lists",
            raw.hygiene.mailing_lists.as_deref(),
            true,
            &[("ignore", true), ("accept", false)],
        );

        let directory = self.directory(raw.directory, &desk_keys);

        let policy = Policy {
            access: SiteAccess {
                approved_domains,
                portal_only_accounts: a.portal_only_accounts.unwrap_or(true),
                external_domains,
                signup,
                verification_resend_secs: resend.as_secs() as i64,
                rejection_notices: a.rejection_notices.unwrap_or(false),
            },
            trust: Trust {
                authserv_ids,
                microsoft365,
                require_authentication,
            },
            mail_limits: MailLimits {
                per_recipient_per_day: outbox.max_per_recipient_per_day,
                per_hour: outbox.max_per_hour,
            },
            hygiene: Hygiene {
                max_participants: raw.hygiene.max_participants.unwrap_or(50),
                blocked,
                allowed,
                ignore_mailing_lists,
                max_requests_per_sender_per_hour: raw
                    .hygiene
                    .max_requests_per_sender_per_hour
                    .unwrap_or(30),
                loop_id: message_id_domain.clone(),
                message_id_domain,
            },
            desks,
        };
        Some(Config {
            origin: origin.to_string(),
            database: DatabaseConfig {
                url: SecretString::from(url),
                max_connections,
                mailbox_lease,
                idle_transaction_timeout,
            },
            policy,
            desk_from,
            verification_ttl,
            hold_ttl,
            max_message_size,
            quarantine_dir: PathBuf::from(
                raw.quarantine
                    .dir
                    .unwrap_or_else(|| "var/quarantine".into()),
            ),
            mailboxes,
            outbox,
            smtp,
            http: HttpConfig {
                listen,
                public_url,
                audit_token,
                read_timeout: read_timeout.clamp(Duration::from_secs(1), Duration::from_secs(3600)),
                max_connections: http_max_connections.clamp(1, 100_000),
            },
            directory,
        })
    }

    fn smtp(&mut self, m: RawSmtp) -> Option<SmtpConfig> {
        let host = match m.host.as_deref().map(str::trim) {
            Some(h) if !h.is_empty() => h.to_string(),
            _ => {
                self.issue(
                    "smtp.host",
                    "[smtp] needs a host (remove the section to write mail to files)",
                );
                return None;
            }
        };
        let tls = self.choice(
            "smtp.tls",
            m.tls.as_deref(),
            SmtpTls::StartTls,
            &[
                ("implicit", SmtpTls::Implicit),
                ("starttls", SmtpTls::StartTls),
                ("none", SmtpTls::None),
            ],
        );
        let loopback = is_loopback(&host);
        if tls == SmtpTls::None && !loopback && !m.allow_plaintext.unwrap_or(false) {
            self.issue(
                "smtp.tls",
                format!("\"none\" would send mail (and any password) in clear to {host}; use \"implicit\" or \"starttls\", or set allow_plaintext = true"),
            );
        }
        let port = m.port.unwrap_or(match tls {
            SmtpTls::Implicit => 465,
            SmtpTls::StartTls => 587,
            SmtpTls::None => 25,
        });
        let password = self.secret("smtp.password", m.password, m.password_file);
        if password.is_some() && m.username.is_none() {
            self.issue("smtp.username", "a password needs a username");
        }
        let ca_file = m.ca_file.map(PathBuf::from);
        if let Some(f) = &ca_file
            && !f.is_file()
        {
            self.issue("smtp.ca_file", format!("cannot read {}", f.display()));
        }
        let timeout = self.duration(
            "smtp.timeout",
            m.timeout.as_deref(),
            Duration::from_secs(30),
        );
        Some(SmtpConfig {
            host,
            port,
            tls,
            ca_file,
            username: m.username,
            password: password.map(SecretString::from),
            timeout,
            hello_name: m.hello_name,
        })
    }

    fn imap(
        &mut self,
        k: &str,
        m: RawMailbox,
        after: After,
        quarantine_folder: String,
    ) -> Option<ImapConfig> {
        let host = match m.host.as_deref().map(str::trim) {
            Some(h) if !h.is_empty() => h.to_string(),
            _ => {
                self.issue(&format!("{k}.host"), "an imap mailbox needs a host");
                return None;
            }
        };
        let tls = self.choice(
            &format!("{k}.tls"),
            m.tls.as_deref(),
            ImapTls::Implicit,
            &[
                ("implicit", ImapTls::Implicit),
                ("starttls", ImapTls::StartTls),
                ("none", ImapTls::None),
            ],
        );
        let loopback = is_loopback(&host);
        if tls == ImapTls::None && !loopback && !m.allow_plaintext.unwrap_or(false) {
            self.issue(
                &format!("{k}.tls"),
                format!(
                    "\"none\" would send the password in clear to {host}; use \"implicit\" or \"starttls\", or set allow_plaintext = true"
                ),
            );
        }
        let port = m.port.unwrap_or(match tls {
            ImapTls::Implicit => 993,
            ImapTls::StartTls | ImapTls::None => 143,
        });
        let username = match m.username {
            Some(u) if !u.trim().is_empty() => u,
            _ => {
                self.issue(&format!("{k}.username"), "an imap mailbox needs a username");
                String::new()
            }
        };
        let auth = match m.auth.as_deref().unwrap_or("password") {
            "password" => {
                match self.secret(&format!("{k}.password"), m.password, m.password_file) {
                    Some(p) => Some(ImapAuth::Password(SecretString::from(p))),
                    None => {
                        self.issue(
                            &format!("{k}.password_file"),
                            "auth = \"password\" needs password_file (or password)",
                        );
                        None
                    }
                }
            }
            "xoauth2" => match (m.token_file, m.token_command) {
                (Some(f), None) => Some(ImapAuth::XOAuth2(TokenSource::File(PathBuf::from(f)))),
                (None, Some(c)) => {
                    let lifetime = self.duration(
                        &format!("{k}.token_lifetime"),
                        m.token_lifetime.as_deref(),
                        Duration::from_secs(45 * 60),
                    );
                    Some(ImapAuth::XOAuth2(TokenSource::Command {
                        command: c,
                        lifetime,
                    }))
                }
                _ => {
                    self.issue(
                        &format!("{k}.token_file"),
                        "auth = \"xoauth2\" needs exactly one of token_file and token_command",
                    );
                    None
                }
            },
            other => {
                self.issue(
                    &format!("{k}.auth"),
                    format!("{other:?} is not one of \"password\", \"xoauth2\""),
                );
                None
            }
        };
        let folder = m.folder.unwrap_or_else(|| "INBOX".into());
        if folder.trim().is_empty() || folder.contains(['\r', '\n', '"']) {
            self.issue(
                &format!("{k}.folder"),
                format!("{folder:?} is not a folder name"),
            );
        }
        // IMAP's INBOX is case-insensitive; other names compared as written.
        let same = |a: &str, b: &str| {
            a == b || (a.eq_ignore_ascii_case("INBOX") && b.eq_ignore_ascii_case("INBOX"))
        };
        if same(&quarantine_folder, &folder) {
            self.issue(
                &format!("{k}.quarantine_folder"),
                format!("{quarantine_folder:?} is the folder being read: quarantined mail would be read again"),
            );
        }
        if let After::Move(dest) = &after
            && same(dest, &folder)
        {
            self.issue(
                &format!("{k}.after"),
                format!(
                    "\"move:{dest}\" moves mail into the folder being read: it would be read again"
                ),
            );
        }
        let idle_timeout = self.duration(
            &format!("{k}.idle_timeout"),
            m.idle_timeout.as_deref(),
            Duration::from_secs(25 * 60),
        );
        if idle_timeout >= Duration::from_secs(29 * 60) || idle_timeout < Duration::from_secs(1) {
            self.issue(
                &format!("{k}.idle_timeout"),
                "must be between 1s and 29m: servers may drop an IDLE after 30 minutes (RFC 2177)",
            );
        }
        let poll_interval = self.duration(
            &format!("{k}.poll_interval"),
            m.poll_interval.as_deref(),
            Duration::from_secs(60),
        );
        let batch_size = m.batch_size.unwrap_or(250);
        if batch_size == 0 || batch_size > 5000 {
            self.issue(&format!("{k}.batch_size"), "must be between 1 and 5000");
        }
        let start = self.choice(
            &format!("{k}.start"),
            m.start.as_deref(),
            StartAt::All,
            &[("all", StartAt::All), ("new", StartAt::New)],
        );
        let ca_file = m.ca_file.map(PathBuf::from);
        if let Some(f) = &ca_file
            && !f.is_file()
        {
            self.issue(
                &format!("{k}.ca_file"),
                format!("cannot read {}", f.display()),
            );
        }
        let connect_timeout = self.duration(
            &format!("{k}.connect_timeout"),
            m.connect_timeout.as_deref(),
            Duration::from_secs(30),
        );
        let reply_timeout = self.duration(
            &format!("{k}.reply_timeout"),
            m.reply_timeout.as_deref(),
            Duration::from_secs(120),
        );
        if reply_timeout < Duration::from_secs(1) {
            self.issue(&format!("{k}.reply_timeout"), "must be at least 1s");
        }
        let unfetchable_after = self.duration(
            &format!("{k}.unfetchable_after"),
            m.unfetchable_after.as_deref(),
            Duration::from_secs(600),
        );
        if unfetchable_after < Duration::from_secs(1)
            || unfetchable_after > Duration::from_secs(7 * 24 * 3600)
        {
            self.issue(
                &format!("{k}.unfetchable_after"),
                "must be between 1s and 7d (a server that throttles refuses bodies for a while; the mail behind waits this long)",
            );
        }
        Some(ImapConfig {
            host,
            port,
            tls,
            ca_file,
            username,
            auth: auth?,
            folder,
            after,
            quarantine_folder,
            idle: m.idle.unwrap_or(true),
            idle_timeout,
            poll_interval,
            batch_size: batch_size.clamp(1, 5000),
            start,
            connect_timeout,
            reply_timeout,
            unfetchable_after,
        })
    }

    fn directory(&mut self, raw: RawDirectory, desk_keys: &HashSet<String>) -> DirectoryConfig {
        let mut out = DirectoryConfig::default();
        let mut org_names = HashSet::new();
        for (i, o) in raw.organizations.into_iter().enumerate() {
            let k = format!("directory.organizations[{i}]");
            if o.name.trim().is_empty() {
                self.issue(&format!("{k}.name"), "an organization needs a name");
                continue;
            }
            if !org_names.insert(o.name.clone()) {
                self.issue(
                    &format!("{k}.name"),
                    format!("organization {:?} is defined twice", o.name),
                );
            }
            let domains = self.domains(&format!("{k}.domains"), &o.domains);
            let desks = self.desk_refs(&format!("{k}.desks"), &o.desks, desk_keys);
            out.organizations.push(OrganizationEntry {
                name: o.name,
                domains,
                desks,
            });
        }
        let mut seen = HashSet::new();
        for (i, a) in raw.accounts.into_iter().enumerate() {
            let k = format!("directory.accounts[{i}]");
            let Some(address) = self.address(&format!("{k}.address"), &a.address) else {
                continue;
            };
            if !seen.insert(address.clone()) {
                self.issue(
                    &format!("{k}.address"),
                    format!("{address} is listed twice"),
                );
            }
            let kind = self.choice(
                &format!("{k}.kind"),
                a.kind.as_deref(),
                AccountKind::PortalOnly,
                &[
                    ("internal", AccountKind::Internal),
                    ("portal_only", AccountKind::PortalOnly),
                ],
            );
            let status = self.choice(
                &format!("{k}.status"),
                a.status.as_deref(),
                AccountStatus::Active,
                &[
                    ("active", AccountStatus::Active),
                    ("pending", AccountStatus::Pending),
                    ("deactivated", AccountStatus::Deactivated),
                ],
            );
            for (j, o) in a.organizations.iter().enumerate() {
                if !org_names.contains(o) {
                    self.issue(
                        &format!("{k}.organizations[{j}]"),
                        format!("unknown organization {o:?}"),
                    );
                }
            }
            let desks = self.desk_refs(&format!("{k}.desks"), &a.desks, desk_keys);
            out.accounts.push(AccountEntry {
                display_name: a
                    .display_name
                    .and_then(|n| crate::address::clean_display_name(&n, None)),
                address,
                kind,
                status,
                organizations: a.organizations,
                desks,
            });
        }
        let mut seen_agents = HashSet::new();
        for (i, a) in raw.agents.into_iter().enumerate() {
            let k = format!("directory.agents[{i}]");
            let Some(address) = self.address(&format!("{k}.address"), &a.address) else {
                continue;
            };
            if !seen_agents.insert(address.clone()) {
                self.issue(
                    &format!("{k}.address"),
                    format!("{address} is listed twice"),
                );
            }
            if a.desks.is_empty() {
                self.issue(&format!("{k}.desks"), "an agent needs at least one desk");
            }
            let desks = self.desk_refs(&format!("{k}.desks"), &a.desks, desk_keys);
            out.agents.push(AgentEntry {
                address,
                display_name: a
                    .display_name
                    .and_then(|n| crate::address::clean_display_name(&n, None)),
                desks,
            });
        }
        let mut group_names = HashSet::new();
        for (i, g) in raw.groups.into_iter().enumerate() {
            let k = format!("directory.groups[{i}]");
            if g.name.trim().is_empty() {
                self.issue(&format!("{k}.name"), "a group needs a name");
                continue;
            }
            if !group_names.insert(g.name.clone()) {
                self.issue(
                    &format!("{k}.name"),
                    format!("group {:?} is defined twice", g.name),
                );
            }
            let mut members = Vec::new();
            for (j, m) in g.members.iter().enumerate() {
                if let Some(a) = self.address(&format!("{k}.members[{j}]"), m) {
                    members.push(a);
                }
            }
            let desks = self.desk_refs(&format!("{k}.desks"), &g.desks, desk_keys);
            out.groups.push(GroupEntry {
                name: g.name,
                members,
                desks,
            });
        }
        out
    }
}

/// Whether `host` names this machine: `localhost` (any case) or a loopback address.
fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Where a mailbox reads (the key naming it, and the place) and where it files mail
/// (its `after = "move:..."` folder and quarantine folder), as comparable strings: a
/// Maildir by its absolute path (resolved when it exists), an IMAP folder by account
/// and name (INBOX in any case).
fn places(kind: &MailboxKind) -> (String, String, Vec<String>) {
    match kind {
        MailboxKind::Maildir(md) => {
            // The folders under the resolved path: the same names, symlinked or not,
            // whether or not they exist yet.
            let path = std::fs::canonicalize(&md.path)
                .or_else(|_| std::path::absolute(&md.path))
                .unwrap_or_else(|_| md.path.clone());
            let dir = |p: &std::path::Path| {
                format!("maildir {}", p.display().to_string().trim_end_matches('/'))
            };
            let folder = |name: &str| dir(&path.join(format!(".{name}")));
            let mut writes = vec![folder(&md.quarantine_folder)];
            if let After::Move(f) = &md.after {
                writes.push(folder(f));
            }
            ("path".into(), dir(&path), writes)
        }
        MailboxKind::Imap(imap) => {
            let folder = |name: &str| {
                format!(
                    "imap {}@{}:{} {}",
                    imap.username.to_lowercase(),
                    imap.host.to_ascii_lowercase(),
                    imap.port,
                    if name.eq_ignore_ascii_case("INBOX") {
                        "INBOX"
                    } else {
                        name
                    }
                )
            };
            let mut writes = vec![folder(&imap.quarantine_folder)];
            if let After::Move(f) = &imap.after {
                writes.push(folder(f));
            }
            ("folder".into(), folder(&imap.folder), writes)
        }
    }
}

fn valid_folder(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn address_message(e: &AddressError) -> String {
    e.to_string()
}

/// Parses `30s`, `5m`, `72h`, `7d`, `250ms` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let secs = match unit.trim() {
        "" | "s" => return Some(Duration::from_secs(n)),
        "ms" => return Some(Duration::from_millis(n)),
        "m" | "min" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return None,
    };
    n.checked_mul(secs).map(Duration::from_secs)
}

/// Parses `25MB`, `512KiB`, `1G` or a bare number of bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        "g" | "gb" | "gib" => 1024 * 1024 * 1024,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// A summary of what is configured, for logs and `check-config`.
pub fn summary(config: &Config) -> BTreeMap<&'static str, String> {
    let mut m = BTreeMap::new();
    m.insert("database", config.database.redacted_url());
    m.insert(
        "desks",
        config
            .policy
            .desks
            .iter()
            .map(|d| d.key.to_string())
            .collect::<Vec<_>>()
            .join(", "),
    );
    m.insert(
        "mailboxes",
        config
            .mailboxes
            .iter()
            .map(|m| m.name.clone())
            .collect::<Vec<_>>()
            .join(", "),
    );
    m
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;

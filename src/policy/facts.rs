//! What is known when a decision is made: the message's signals and the directory's
//! knowledge of every address on it. The store gathers these; the engine only reads them.

use serde::Serialize;

use crate::address::EmailAddress;
use crate::keys::{DeskKey, RequestKey};
use crate::message::{AuthResult, Signals};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountKind {
    Internal,
    PortalOnly,
}

impl AccountKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AccountKind::Internal => "internal",
            AccountKind::PortalOnly => "portal_only",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "internal" => Some(AccountKind::Internal),
            "portal_only" => Some(AccountKind::PortalOnly),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountStatus {
    Pending,
    Active,
    Deactivated,
}

impl AccountStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AccountStatus::Pending => "pending",
            AccountStatus::Active => "active",
            AccountStatus::Deactivated => "deactivated",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(AccountStatus::Pending),
            "active" => Some(AccountStatus::Active),
            "deactivated" => Some(AccountStatus::Deactivated),
            _ => None,
        }
    }
}

/// An existing account, as the directory knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountFacts {
    pub kind: AccountKind,
    pub status: AccountStatus,
    /// Organizations the account belongs to.
    pub organizations: Vec<String>,
    /// A customer of this desk: linked explicitly, or through an organization or group
    /// linked to the desk.
    pub desk_customer: bool,
    /// When the last verification mail was queued for this account (unix seconds).
    pub last_verification_sent_at: Option<i64>,
}

/// One address on the message with what the directory knows about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Person {
    pub address: EmailAddress,
    pub display_name: Option<String>,
    pub account: Option<AccountFacts>,
    /// An agent of the desk the message is for.
    pub agent: bool,
    /// Organizations whose email domains match the address (a new account joins them).
    pub domain_organizations: Vec<String>,
    /// Organizations whose email domains match the address and that are linked to the desk.
    pub domain_desk_organizations: Vec<String>,
    /// Undeliverable (hard bounced): we never mail it.
    pub undeliverable: bool,
}

impl Person {
    pub fn new(address: EmailAddress) -> Self {
        Person {
            address,
            display_name: None,
            account: None,
            agent: false,
            domain_organizations: Vec::new(),
            domain_desk_organizations: Vec::new(),
            undeliverable: false,
        }
    }

    /// Organizations this person belongs to, or would belong to once their account exists.
    pub fn organizations(&self) -> &[String] {
        match &self.account {
            Some(a) => &a.organizations,
            None => &self.domain_organizations,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestStatus {
    Open,
    Held,
}

impl RequestStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestStatus::Open => "open",
            RequestStatus::Held => "held",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "open" => Some(RequestStatus::Open),
            "held" => Some(RequestStatus::Held),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ThreadMatch {
    /// In-Reply-To or References named a message stored for the request.
    MessageId,
    /// The subject carried the request's key.
    SubjectKey,
}

/// An existing request this message may belong to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Thread {
    pub key: RequestKey,
    pub status: RequestStatus,
    pub matched_by: ThreadMatch,
    pub reporter: EmailAddress,
    pub reporter_organizations: Vec<String>,
    pub participants: Vec<EmailAddress>,
}

impl Thread {
    pub fn involves(&self, address: &EmailAddress) -> bool {
        &self.reporter == address || self.participants.contains(address)
    }
}

/// Everything `decide` looks at.
#[derive(Debug, Clone)]
pub struct Facts {
    /// The decision time, unix seconds. The engine never reads a clock.
    pub now: i64,
    pub desk: DeskKey,
    pub message_id: Option<String>,
    /// The message was already processed (same Message-ID or content on this desk).
    pub duplicate: bool,
    pub signals: Signals,
    pub auth_results: Vec<AuthResult>,
    /// The sender has just confirmed their address with the link we mailed to it (a
    /// held request being released): as good as an authenticated message.
    pub sender_confirmed: bool,
    /// The From address, if it parsed.
    pub sender: Option<Person>,
    /// Sender requests made on this desk recently, for the rate limit.
    pub sender_recent_requests: u32,
    /// To and Cc, deduplicated, in header order.
    pub recipients: Vec<Person>,
    /// Addresses in To/Cc that did not parse (reported, never acted on).
    pub invalid_recipients: Vec<String>,
    /// To/Cc addresses beyond what is read from one message (never acted on).
    pub omitted_recipients: usize,
    pub thread: Option<Thread>,
}

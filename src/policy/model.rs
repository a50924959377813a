//! The policy as configured: site customer access, trust, hygiene and desks.
//!
//! These are validated values (see `config.rs` for where they come from); the decision
//! engine reads them and nothing else.

use serde::Serialize;

use crate::address::{DomainPattern, EmailAddress, any_matches};
use crate::keys::DeskKey;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Signup {
    /// No account is created from email; mail from unknown senders is not processed.
    Closed,
    /// Accounts are created pending; the request is held until the address is confirmed.
    Verify,
    /// Accounts and requests are created at once; an invitation lets the person confirm.
    Open,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelAccess {
    Open,
    Restricted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Sharing {
    None,
    Organization,
    Any,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownParticipants {
    Drop,
    Create,
}

/// Site-wide customer access: who may get an account at all.
#[derive(Debug, Clone)]
pub struct SiteAccess {
    pub approved_domains: Vec<DomainPattern>,
    pub portal_only_accounts: bool,
    pub external_domains: Vec<DomainPattern>,
    pub signup: Signup,
    /// A pending sender who writes again gets the verification link again at most this often.
    pub verification_resend_secs: i64,
    /// Send a short notice to a rejected sender. Only ever sent to authenticated senders
    /// and never for hygiene outcomes, so it cannot become backscatter.
    pub rejection_notices: bool,
}

impl SiteAccess {
    pub fn is_approved(&self, domain: &str) -> bool {
        any_matches(&self.approved_domains, domain)
    }
}

/// Which `Authentication-Results` headers to believe, and whether internal and agent
/// identities must be authenticated.
#[derive(Debug, Clone)]
pub struct Trust {
    pub authserv_ids: Vec<String>,
    /// The mailbox is at Microsoft 365: Exchange Online writes its
    /// `Authentication-Results` without an authserv-id, as the topmost one.
    pub microsoft365: bool,
    pub require_authentication: bool,
}

/// One rule of a block list: an exact address, or a domain pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressRule {
    Address(EmailAddress),
    Domain(DomainPattern),
}

impl AddressRule {
    pub fn parse(input: &str) -> Result<Self, crate::address::AddressError> {
        if input.contains('@') {
            Ok(AddressRule::Address(EmailAddress::parse(input)?))
        } else {
            Ok(AddressRule::Domain(DomainPattern::parse(input)?))
        }
    }

    pub fn matches(&self, address: &EmailAddress) -> bool {
        match self {
            AddressRule::Address(a) => a == address,
            AddressRule::Domain(p) => p.matches(address.domain()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Hygiene {
    /// At most this many To/Cc addresses are considered; the rest are dropped.
    pub max_participants: usize,
    pub blocked: Vec<AddressRule>,
    /// Senders whose automatic mail (Auto-Submitted, bulk, lists, auto-reply markers) is
    /// still processed. Never bypasses loops, block lists, bounces or customer access.
    pub allowed: Vec<AddressRule>,
    /// Ignore mail from mailing lists (List-Id / List-Unsubscribe).
    pub ignore_mailing_lists: bool,
    /// New requests one sender may open per hour on a desk; 0 means no limit.
    pub max_requests_per_sender_per_hour: u32,
    /// The value of our own `X-Intake-Loop` header; mail carrying it came from us.
    pub loop_id: String,
    /// The domain of Message-IDs we generate; a message with such an ID is our own.
    pub message_id_domain: String,
}

/// One desk: a service project reached by its own addresses.
#[derive(Debug, Clone)]
pub struct Desk {
    pub key: DeskKey,
    pub name: String,
    pub addresses: Vec<EmailAddress>,
    pub channel_access: ChannelAccess,
    pub sharing: Sharing,
    pub unknown_participants: UnknownParticipants,
    pub agents_may_add_customers: bool,
    /// Per-desk block and allow lists, on top of the site's.
    pub blocked: Vec<AddressRule>,
    pub allowed: Vec<AddressRule>,
    /// What a reply from someone not on the request becomes.
    pub stranger_replies: StrangerReplies,
}

/// A reply (matched by In-Reply-To/References) from someone who is not the reporter, a
/// participant or an agent of the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StrangerReplies {
    /// A new request of their own (the default: nobody joins a request by replying).
    NewRequest,
    /// A comment on the request (subject keys alone still never thread a stranger).
    Comment,
}

/// How much mail we send, so a flood of forged senders cannot make us a spam cannon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MailLimits {
    /// Mail to one address per 24 hours.
    pub per_recipient_per_day: u32,
    /// Mail in total per hour.
    pub per_hour: u32,
}

/// Everything the decision engine needs from configuration.
#[derive(Debug, Clone)]
pub struct Policy {
    pub access: SiteAccess,
    pub trust: Trust,
    pub hygiene: Hygiene,
    pub mail_limits: MailLimits,
    pub desks: Vec<Desk>,
}

impl Policy {
    pub fn desk(&self, key: &DeskKey) -> Option<&Desk> {
        self.desks.iter().find(|d| &d.key == key)
    }

    /// True when `address` reaches any desk (desk addresses are never people).
    pub fn is_desk_address(&self, address: &EmailAddress) -> bool {
        self.desks.iter().any(|d| d.addresses.contains(address))
    }

    /// The desk an address belongs to, if any.
    pub fn desk_for_address(&self, address: &EmailAddress) -> Option<&Desk> {
        self.desks.iter().find(|d| d.addresses.contains(address))
    }
}

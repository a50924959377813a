//! The decision contract: what `intake explain` prints and the audit log stores.
//!
//! Keys and codes here are shared with operators and tests: add, never rename.

use serde::Serialize;

use crate::address::EmailAddress;
use crate::keys::{DeskKey, RequestKey};

use super::facts::{AccountKind, AccountStatus};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    CreateRequest,
    AddComment,
    HoldForVerification,
    Reject,
    Ignore,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::CreateRequest => "create_request",
            Action::AddComment => "add_comment",
            Action::HoldForVerification => "hold_for_verification",
            Action::Reject => "reject",
            Action::Ignore => "ignore",
        }
    }
}

macro_rules! reasons {
    ($($variant:ident => $code:literal,)+) => {
        /// Every reason code intake gives, for actions, requesters and participants.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Reason {
            $($variant,)+
        }

        impl Reason {
            /// Every reason, in declaration order.
            pub const ALL: &'static [Reason] = &[$(Reason::$variant,)+];

            /// The code as it appears in JSON, the ledger and metrics.
            pub fn code(self) -> &'static str {
                match self {
                    $(Reason::$variant => $code,)+
                }
            }

            pub fn parse(code: &str) -> Option<Reason> {
                match code {
                    $($code => Some(Reason::$variant),)+
                    _ => None,
                }
            }
        }
    };
}

reasons! {
    AutoSubmitted => "auto_submitted",
    BulkPrecedence => "bulk_precedence",
    DeliveryStatusNotification => "delivery_status_notification",
    FeedbackReport => "feedback_report",
    MailingList => "mailing_list",
    MailLoop => "mail_loop",
    OwnAddressSender => "own_address_sender",
    BlockedSender => "blocked_sender",
    DuplicateMessage => "duplicate_message",
    NoValidSender => "no_valid_sender",
    Oversized => "oversized",
    Unparseable => "unparseable",
    ProcessingFailed => "processing_failed",
    UnknownDesk => "unknown_desk",
    RateLimited => "rate_limited",
    NewRequest => "new_request",
    ReplyToRequest => "reply_to_request",
    PendingVerification => "pending_verification",
    ExistingAccount => "existing_account",
    ApprovedDomain => "approved_domain",
    ExternalDomainAllowed => "external_domain_allowed",
    SignupClosed => "signup_closed",
    DomainNotAllowed => "domain_not_allowed",
    PortalOnlyDisabled => "portal_only_disabled",
    NotDeskCustomer => "not_desk_customer",
    AccountDeactivated => "account_deactivated",
    UnauthenticatedSender => "unauthenticated_sender",
    Agent => "agent",
    SharingDisabled => "sharing_disabled",
    SharingAny => "sharing_any",
    SharedOrganization => "shared_organization",
    NotInOrganization => "not_in_organization",
    UnknownParticipantDropped => "unknown_participant_dropped",
    UnknownParticipantCreated => "unknown_participant_created",
    AddedByAgent => "added_by_agent",
    AgentsMayNotAddCustomers => "agents_may_not_add_customers",
    OwnAddress => "own_address",
    IsRequester => "is_requester",
    AlreadyParticipant => "already_participant",
    TooManyParticipants => "too_many_participants",
    RequestHeld => "request_held",
    MailRateLimited => "mail_rate_limited",
    NoReplyAddress => "no_reply_address",
    AddressConfirmed => "address_confirmed",
    VerificationExpired => "verification_expired",
    MessageNotProcessed => "message_not_processed",
}

impl Serialize for Reason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.code())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountOutcome {
    Existing,
    CreateInternal,
    CreatePortalOnly,
    None,
}

impl AccountOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            AccountOutcome::Existing => "existing",
            AccountOutcome::CreateInternal => "create_internal",
            AccountOutcome::CreatePortalOnly => "create_portal_only",
            AccountOutcome::None => "none",
        }
    }

    pub fn created_kind(self) -> Option<AccountKind> {
        match self {
            AccountOutcome::CreateInternal => Some(AccountKind::Internal),
            AccountOutcome::CreatePortalOnly => Some(AccountKind::PortalOnly),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ParticipantOutcome {
    AddExisting,
    CreateInternal,
    CreatePortalOnly,
    Drop,
}

impl ParticipantOutcome {
    pub fn created_kind(self) -> Option<AccountKind> {
        match self {
            ParticipantOutcome::CreateInternal => Some(AccountKind::Internal),
            ParticipantOutcome::CreatePortalOnly => Some(AccountKind::PortalOnly),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ParticipantOutcome::AddExisting => "add_existing",
            ParticipantOutcome::CreateInternal => "create_internal",
            ParticipantOutcome::CreatePortalOnly => "create_portal_only",
            ParticipantOutcome::Drop => "drop",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RequesterDecision {
    pub address: Option<EmailAddress>,
    pub display_name: Option<String>,
    pub account: AccountOutcome,
    /// Status a newly created account gets (`pending` under signup verify).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_status: Option<AccountStatus>,
    pub reason: Reason,
    pub explanation: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ParticipantDecision {
    pub address: EmailAddress,
    pub display_name: Option<String>,
    pub outcome: ParticipantOutcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_status: Option<AccountStatus>,
    pub reason: Reason,
    pub explanation: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EmailKind {
    Verification,
    Invitation,
    RejectionNotice,
}

impl EmailKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EmailKind::Verification => "verification",
            EmailKind::Invitation => "invitation",
            EmailKind::RejectionNotice => "rejection_notice",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "verification" => Some(EmailKind::Verification),
            "invitation" => Some(EmailKind::Invitation),
            "rejection_notice" => Some(EmailKind::RejectionNotice),
            _ => None,
        }
    }
}

/// A mail the decision would have sent but did not (rate limits).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SuppressedEmail {
    pub to: EmailAddress,
    pub kind: EmailKind,
    pub reason: Reason,
    pub explanation: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EmailIntent {
    pub to: EmailAddress,
    pub kind: EmailKind,
    /// The reason behind a rejection notice.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub about: Option<Reason>,
}

/// The whole decision for one message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub action: Action,
    pub reason: Reason,
    pub explanation: String,
    pub desk: Option<DeskKey>,
    /// The request a comment goes to (or a held request it joins).
    pub request: Option<RequestKey>,
    pub message_id: Option<String>,
    pub requester: RequesterDecision,
    pub participants: Vec<ParticipantDecision>,
    /// To/Cc entries that were not valid addresses.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub invalid_recipients: Vec<String>,
    /// To/Cc addresses beyond the number read from one message.
    #[serde(skip_serializing_if = "is_zero")]
    pub omitted_recipients: usize,
    pub emails: Vec<EmailIntent>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub emails_suppressed: Vec<SuppressedEmail>,
}

impl Decision {
    /// True when the decision creates or changes nothing but the ledger and audit rows.
    pub fn is_passive(&self) -> bool {
        matches!(self.action, Action::Reject | Action::Ignore)
    }

    /// A decision for a message that never reached the policy (no desk, unparseable...).
    pub fn ignored(reason: Reason, explanation: impl Into<String>) -> Self {
        let explanation = explanation.into();
        Decision {
            action: Action::Ignore,
            reason,
            explanation: explanation.clone(),
            desk: None,
            request: None,
            message_id: None,
            requester: RequesterDecision {
                address: None,
                display_name: None,
                account: AccountOutcome::None,
                new_status: None,
                reason,
                explanation,
            },
            participants: Vec::new(),
            invalid_recipients: Vec::new(),
            omitted_recipients: 0,
            emails: Vec::new(),
            emails_suppressed: Vec::new(),
        }
    }

    /// Every address this decision touched: requester, participants and mail recipients.
    pub fn addresses(&self) -> Vec<&EmailAddress> {
        let mut out: Vec<&EmailAddress> = Vec::new();
        out.extend(self.requester.address.iter());
        out.extend(self.participants.iter().map(|p| &p.address));
        out.extend(self.emails.iter().map(|e| &e.to));
        out.sort();
        out.dedup();
        out
    }

    /// A short multi-line text rendering for people (`--format text`).
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "action: {} ({})",
            self.action.as_str(),
            self.reason.code()
        );
        let _ = writeln!(s, "  {}", self.explanation);
        if let Some(d) = &self.desk {
            let _ = writeln!(s, "desk: {d}");
        }
        if let Some(r) = &self.request {
            let _ = writeln!(s, "request: {r}");
        }
        match &self.requester.address {
            Some(a) => {
                let _ = writeln!(
                    s,
                    "requester: {a} — account {} ({})",
                    serde_plain(&self.requester.account),
                    self.requester.reason.code()
                );
            }
            None => {
                let _ = writeln!(s, "requester: none ({})", self.requester.reason.code());
            }
        }
        let _ = writeln!(s, "  {}", self.requester.explanation);
        for p in &self.participants {
            let _ = writeln!(
                s,
                "participant: {} — {} ({})",
                p.address,
                p.outcome.as_str(),
                p.reason.code()
            );
            let _ = writeln!(s, "  {}", p.explanation);
        }
        for bad in &self.invalid_recipients {
            let _ = writeln!(s, "invalid recipient: {bad:?}");
        }
        for e in &self.emails {
            let _ = writeln!(s, "email: {} to {}", e.kind.as_str(), e.to);
        }
        for e in &self.emails_suppressed {
            let _ = writeln!(
                s,
                "email not sent: {} to {} ({}: {})",
                e.kind.as_str(),
                e.to,
                e.reason.code(),
                e.explanation
            );
        }
        s
    }
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn serde_plain<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => String::from("?"),
    }
}

#[cfg(test)]
#[path = "decision_tests.rs"]
mod tests;

//! The pure decision engine.
//!
//! `decide(&Facts, &Policy) -> Decision` is synchronous and deterministic: no IO, no
//! async, no clock (the time comes in as `Facts::now`). The explain command, the daemon
//! and the audit log all print the same `Decision`.

mod decide;
pub mod decision;
pub mod facts;
mod limits;
pub mod model;
pub mod trust;

pub use decide::{decide, trust_verdict};
pub use decision::{
    AccountOutcome, Action, Decision, EmailIntent, EmailKind, ParticipantDecision,
    ParticipantOutcome, Reason, RequesterDecision, SuppressedEmail,
};
pub use facts::{
    AccountFacts, AccountKind, AccountStatus, Facts, Person, RequestStatus, Thread, ThreadMatch,
};
pub use limits::{MailCounts, limit_emails};
pub use model::{
    AddressRule, ChannelAccess, Desk, Hygiene, MailLimits, Policy, Sharing, Signup, SiteAccess,
    StrangerReplies, Trust, UnknownParticipants,
};

#[cfg(test)]
mod tests;

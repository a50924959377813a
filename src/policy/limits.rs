//! Mail rate limits: the second, pure step of a decision that sends mail. The caller
//! counts what was sent recently (only when the decision sends anything) and
//! [`limit_emails`] moves what is over the limits to `emails_suppressed`.

use std::collections::HashMap;

use crate::address::EmailAddress;

use super::decision::{Decision, Reason, SuppressedEmail};
use super::model::MailLimits;

/// Mail sent recently.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MailCounts {
    /// Per recipient, in the last 24 hours.
    pub per_recipient: HashMap<EmailAddress, u32>,
    /// In total, in the last hour.
    pub last_hour: u32,
}

/// Suppresses the decision's mail that would go over `limits`.
pub fn limit_emails(decision: &mut Decision, counts: &MailCounts, limits: &MailLimits) {
    let mut per_recipient = counts.per_recipient.clone();
    let mut total = counts.last_hour;
    let emails = std::mem::take(&mut decision.emails);
    for e in emails {
        let sent = per_recipient.entry(e.to.clone()).or_insert(0);
        if limits.per_recipient_per_day > 0 && *sent >= limits.per_recipient_per_day {
            decision.emails_suppressed.push(SuppressedEmail {
                explanation: format!(
                    "{} already got {} mail from us in the last 24 hours (limit {})",
                    e.to, sent, limits.per_recipient_per_day
                ),
                to: e.to,
                kind: e.kind,
                reason: Reason::MailRateLimited,
            });
            continue;
        }
        if limits.per_hour > 0 && total >= limits.per_hour {
            decision.emails_suppressed.push(SuppressedEmail {
                explanation: format!(
                    "{total} mails were queued in the last hour (limit {})",
                    limits.per_hour
                ),
                to: e.to,
                kind: e.kind,
                reason: Reason::MailRateLimited,
            });
            continue;
        }
        *sent += 1;
        total += 1;
        decision.emails.push(e);
    }
}

#[cfg(test)]
#[path = "limits_tests.rs"]
mod tests;

//! Unit tests for `src/policy/limits.rs`.

use super::*;
use crate::policy::{Decision, EmailIntent, EmailKind, Reason};

fn addr(s: &str) -> EmailAddress {
    EmailAddress::parse(s).unwrap()
}

fn decision(to: &[&str]) -> Decision {
    let mut d = Decision::ignored(Reason::NewRequest, "x");
    d.emails = to
        .iter()
        .map(|a| EmailIntent {
            to: addr(a),
            kind: EmailKind::Invitation,
            about: None,
        })
        .collect();
    d
}

#[test]
fn per_recipient_and_global_limits() {
    let limits = MailLimits {
        per_recipient_per_day: 2,
        per_hour: 3,
    };
    let mut counts = MailCounts::default();
    counts.per_recipient.insert(addr("a@x.example"), 2);
    let mut d = decision(&["a@x.example", "b@x.example", "b@x.example", "b@x.example"]);
    limit_emails(&mut d, &counts, &limits);
    let sent: Vec<&str> = d.emails.iter().map(|e| e.to.as_str()).collect();
    assert_eq!(sent, ["b@x.example", "b@x.example"]);
    assert_eq!(d.emails_suppressed.len(), 2);
    assert!(
        d.emails_suppressed
            .iter()
            .all(|e| e.reason == Reason::MailRateLimited)
    );

    counts.last_hour = 3;
    let mut d = decision(&["c@x.example"]);
    limit_emails(&mut d, &counts, &limits);
    assert!(d.emails.is_empty());
    assert!(d.emails_suppressed[0].explanation.contains("last hour"));
}

#[test]
fn zero_means_no_limit() {
    let limits = MailLimits {
        per_recipient_per_day: 0,
        per_hour: 0,
    };
    let counts = MailCounts {
        last_hour: 1_000_000,
        ..Default::default()
    };
    let mut d = decision(&["a@x.example"; 10]);
    limit_emails(&mut d, &counts, &limits);
    assert_eq!(d.emails.len(), 10);
}

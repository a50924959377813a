//! Table-driven tests for every setting that changes an outcome, and property tests for
//! the invariants admins rely on.

use proptest::prelude::*;

use super::*;
use crate::address::{DomainPattern, EmailAddress};
use crate::keys::{DeskKey, RequestKey};
use crate::message::{Signals, auth::parse_header};

const NOW: i64 = 1_800_000_000;

fn addr(s: &str) -> EmailAddress {
    EmailAddress::parse(s).unwrap()
}

fn policy() -> Policy {
    Policy {
        access: SiteAccess {
            approved_domains: vec![DomainPattern::parse("corp.example").unwrap()],
            portal_only_accounts: true,
            external_domains: vec![],
            signup: Signup::Open,
            verification_resend_secs: 3600,
            rejection_notices: false,
        },
        trust: Trust {
            authserv_ids: vec!["mx.desk.example".into()],
            microsoft365: false,
            require_authentication: true,
        },
        hygiene: Hygiene {
            max_participants: 50,
            blocked: vec![],
            allowed: vec![],
            ignore_mailing_lists: true,
            max_requests_per_sender_per_hour: 30,
            loop_id: "intake.desk.example".into(),
            message_id_domain: "intake.desk.example".into(),
        },
        mail_limits: MailLimits {
            per_recipient_per_day: 3,
            per_hour: 200,
        },
        desks: vec![
            Desk {
                key: DeskKey::parse("IT").unwrap(),
                name: "IT".into(),
                addresses: vec![addr("it@desk.example"), addr("help@desk.example")],
                channel_access: ChannelAccess::Open,
                sharing: Sharing::Any,
                unknown_participants: UnknownParticipants::Drop,
                agents_may_add_customers: false,
                blocked: vec![],
                allowed: vec![],
                stranger_replies: StrangerReplies::NewRequest,
            },
            Desk {
                key: DeskKey::parse("HR").unwrap(),
                name: "HR".into(),
                addresses: vec![addr("hr@desk.example")],
                channel_access: ChannelAccess::Restricted,
                sharing: Sharing::None,
                unknown_participants: UnknownParticipants::Drop,
                agents_may_add_customers: false,
                blocked: vec![],
                allowed: vec![],
                stranger_replies: StrangerReplies::NewRequest,
            },
        ],
    }
}

fn account(kind: AccountKind, status: AccountStatus) -> AccountFacts {
    AccountFacts {
        kind,
        status,
        organizations: vec![],
        desk_customer: false,
        last_verification_sent_at: None,
    }
}

/// A person with an active account on `orgs`.
fn member(a: &str, kind: AccountKind, orgs: &[&str]) -> Person {
    let mut p = Person::new(addr(a));
    let mut acc = account(kind, AccountStatus::Active);
    acc.organizations = orgs.iter().map(|o| o.to_string()).collect();
    p.account = Some(acc);
    p
}

fn stranger(a: &str) -> Person {
    Person::new(addr(a))
}

fn facts(sender: Person, recipients: Vec<Person>) -> Facts {
    Facts {
        now: NOW,
        desk: DeskKey::parse("IT").unwrap(),
        message_id: Some("m1@mail.example".into()),
        duplicate: false,
        signals: Signals::default(),
        auth_results: vec![],
        sender_confirmed: false,
        sender: Some(sender),
        sender_recent_requests: 0,
        recipients,
        invalid_recipients: vec![],
        omitted_recipients: 0,
        thread: None,
    }
}

fn dmarc_pass(domain: &str) -> Vec<crate::message::AuthResult> {
    parse_header(
        0,
        &format!("mx.desk.example; dmarc=pass header.from={domain}"),
    )
}

fn outcomes(d: &Decision) -> Vec<(String, ParticipantOutcome, Reason)> {
    d.participants
        .iter()
        .map(|p| (p.address.to_string(), p.outcome, p.reason))
        .collect()
}

fn emails(d: &Decision) -> Vec<(String, EmailKind)> {
    d.emails
        .iter()
        .map(|e| (e.to.to_string(), e.kind))
        .collect()
}

/// One row of the table: a name, how to change the policy, the facts, and what must come out.
struct Case {
    name: &'static str,
    policy: fn(&mut Policy),
    facts: fn() -> Facts,
    action: Action,
    reason: Reason,
    account: AccountOutcome,
}

fn no_change(_: &mut Policy) {}

fn it(p: &mut Policy) -> &mut Desk {
    &mut p.desks[0]
}

fn cases() -> Vec<Case> {
    vec![
        // Hygiene: ignored before any access decision.
        Case {
            name: "duplicate",
            policy: no_change,
            facts: || {
                let mut f = facts(stranger("ann@ext.example"), vec![]);
                f.duplicate = true;
                f
            },
            action: Action::Ignore,
            reason: Reason::DuplicateMessage,
            account: AccountOutcome::None,
        },
        Case {
            name: "no valid sender",
            policy: no_change,
            facts: || {
                let mut f = facts(
                    stranger("ann@ext.example"),
                    vec![stranger("bob@ext.example")],
                );
                f.sender = None;
                f
            },
            action: Action::Ignore,
            reason: Reason::NoValidSender,
            account: AccountOutcome::None,
        },
        Case {
            name: "auto-submitted auto-replied",
            policy: no_change,
            facts: || {
                let mut f = facts(stranger("ann@ext.example"), vec![]);
                f.signals.auto_submitted = Some("auto-replied".into());
                f
            },
            action: Action::Ignore,
            reason: Reason::AutoSubmitted,
            account: AccountOutcome::None,
        },
        Case {
            name: "auto-submitted no is a person",
            policy: no_change,
            facts: || {
                let mut f = facts(stranger("ann@ext.example"), vec![]);
                f.signals.auto_submitted = Some("no".into());
                f
            },
            action: Action::CreateRequest,
            reason: Reason::NewRequest,
            account: AccountOutcome::CreatePortalOnly,
        },
        Case {
            name: "vendor auto-reply marker",
            policy: no_change,
            facts: || {
                let mut f = facts(stranger("ann@ext.example"), vec![]);
                f.signals.autoreply_marker = Some("X-Autoreply".into());
                f
            },
            action: Action::Ignore,
            reason: Reason::AutoSubmitted,
            account: AccountOutcome::None,
        },
        Case {
            name: "x-auto-response-suppress oof",
            policy: no_change,
            facts: || {
                let mut f = facts(stranger("ann@ext.example"), vec![]);
                f.signals.auto_response_suppress = Some("OOF, AutoReply".into());
                f
            },
            action: Action::Ignore,
            reason: Reason::AutoSubmitted,
            account: AccountOutcome::None,
        },
        Case {
            name: "precedence bulk",
            policy: no_change,
            facts: || {
                let mut f = facts(stranger("ann@ext.example"), vec![]);
                f.signals.precedence = Some("bulk".into());
                f
            },
            action: Action::Ignore,
            reason: Reason::BulkPrecedence,
            account: AccountOutcome::None,
        },
        Case {
            name: "precedence junk",
            policy: no_change,
            facts: || {
                let mut f = facts(stranger("ann@ext.example"), vec![]);
                f.signals.precedence = Some("junk".into());
                f
            },
            action: Action::Ignore,
            reason: Reason::BulkPrecedence,
            account: AccountOutcome::None,
        },
        Case {
            name: "precedence list",
            policy: no_change,
            facts: || {
                let mut f = facts(stranger("ann@ext.example"), vec![]);
                f.signals.precedence = Some("list".into());
                f
            },
            action: Action::Ignore,
            reason: Reason::BulkPrecedence,
            account: AccountOutcome::None,
        },
        Case {
            name: "delivery status report",
            policy: no_change,
            facts: || {
                let mut f = facts(stranger("postmaster@ext.example"), vec![]);
                f.signals.report_type = Some("delivery-status".into());
                f
            },
            action: Action::Ignore,
            reason: Reason::DeliveryStatusNotification,
            account: AccountOutcome::None,
        },
        Case {
            name: "null return path",
            policy: no_change,
            facts: || {
                let mut f = facts(stranger("ann@ext.example"), vec![]);
                f.signals.null_return_path = true;
                f
            },
            action: Action::Ignore,
            reason: Reason::DeliveryStatusNotification,
            account: AccountOutcome::None,
        },
        Case {
            name: "mailer-daemon sender",
            policy: no_change,
            facts: || facts(stranger("MAILER-DAEMON@mx.ext.example"), vec![]),
            action: Action::Ignore,
            reason: Reason::DeliveryStatusNotification,
            account: AccountOutcome::None,
        },
        Case {
            name: "own desk address sender",
            policy: no_change,
            facts: || facts(stranger("hr@desk.example"), vec![]),
            action: Action::Ignore,
            reason: Reason::OwnAddressSender,
            account: AccountOutcome::None,
        },
        Case {
            name: "our loop header",
            policy: no_change,
            facts: || {
                let mut f = facts(stranger("ann@ext.example"), vec![]);
                f.signals.loop_ids = vec!["intake.desk.example".into()];
                f
            },
            action: Action::Ignore,
            reason: Reason::MailLoop,
            account: AccountOutcome::None,
        },
        Case {
            name: "someone else's loop header is not ours",
            policy: no_change,
            facts: || {
                let mut f = facts(stranger("ann@ext.example"), vec![]);
                f.signals.loop_ids = vec!["intake.other.example".into()];
                f
            },
            action: Action::CreateRequest,
            reason: Reason::NewRequest,
            account: AccountOutcome::CreatePortalOnly,
        },
        Case {
            name: "our own message-id coming back",
            policy: no_change,
            facts: || {
                let mut f = facts(stranger("ann@ext.example"), vec![]);
                f.signals.message_id_domain = Some("intake.desk.example".into());
                f
            },
            action: Action::Ignore,
            reason: Reason::MailLoop,
            account: AccountOutcome::None,
        },
        Case {
            name: "blocked address",
            policy: |p| p.hygiene.blocked = vec![AddressRule::parse("ann@ext.example").unwrap()],
            facts: || facts(stranger("ann@ext.example"), vec![]),
            action: Action::Ignore,
            reason: Reason::BlockedSender,
            account: AccountOutcome::None,
        },
        Case {
            name: "blocked subdomain pattern",
            policy: |p| p.hygiene.blocked = vec![AddressRule::parse("*.spam.example").unwrap()],
            facts: || facts(stranger("x@mx1.spam.example"), vec![]),
            action: Action::Ignore,
            reason: Reason::BlockedSender,
            account: AccountOutcome::None,
        },
        Case {
            name: "subdomain pattern does not block the parent",
            policy: |p| p.hygiene.blocked = vec![AddressRule::parse("*.spam.example").unwrap()],
            facts: || facts(stranger("x@spam.example"), vec![]),
            action: Action::CreateRequest,
            reason: Reason::NewRequest,
            account: AccountOutcome::CreatePortalOnly,
        },
        Case {
            name: "mailing list",
            policy: no_change,
            facts: || {
                let mut f = facts(stranger("ann@ext.example"), vec![]);
                f.signals.list_id = Some("<deals.vendor.example>".into());
                f
            },
            action: Action::Ignore,
            reason: Reason::MailingList,
            account: AccountOutcome::None,
        },
        Case {
            name: "mailing lists accepted when configured",
            policy: |p| p.hygiene.ignore_mailing_lists = false,
            facts: || {
                let mut f = facts(stranger("ann@ext.example"), vec![]);
                f.signals.list_unsubscribe = true;
                f
            },
            action: Action::CreateRequest,
            reason: Reason::NewRequest,
            account: AccountOutcome::CreatePortalOnly,
        },
        Case {
            name: "allow list lets automatic mail through",
            policy: |p| p.hygiene.allowed = vec![AddressRule::parse("monitor.example").unwrap()],
            facts: || {
                let mut f = facts(stranger("alerts@monitor.example"), vec![]);
                f.signals.auto_submitted = Some("auto-generated".into());
                f.signals.precedence = Some("bulk".into());
                f
            },
            action: Action::CreateRequest,
            reason: Reason::NewRequest,
            account: AccountOutcome::CreatePortalOnly,
        },
        Case {
            name: "a desk's allow list works like the site's",
            policy: |p| it(p).allowed = vec![AddressRule::parse("alerts@monitor.example").unwrap()],
            facts: || {
                let mut f = facts(stranger("alerts@monitor.example"), vec![]);
                f.signals.autoreply_marker = Some("X-Autoreply".into());
                f
            },
            action: Action::CreateRequest,
            reason: Reason::NewRequest,
            account: AccountOutcome::CreatePortalOnly,
        },
        Case {
            name: "allow list never lets bounces through",
            policy: |p| p.hygiene.allowed = vec![AddressRule::parse("monitor.example").unwrap()],
            facts: || {
                let mut f = facts(stranger("alerts@monitor.example"), vec![]);
                f.signals.null_return_path = true;
                f
            },
            action: Action::Ignore,
            reason: Reason::DeliveryStatusNotification,
            account: AccountOutcome::None,
        },
        Case {
            name: "allow list never beats the block list",
            policy: |p| {
                p.hygiene.allowed = vec![AddressRule::parse("monitor.example").unwrap()];
                it(p).blocked = vec![AddressRule::parse("monitor.example").unwrap()];
            },
            facts: || facts(stranger("alerts@monitor.example"), vec![]),
            action: Action::Ignore,
            reason: Reason::BlockedSender,
            account: AccountOutcome::None,
        },
        Case {
            name: "allow list never beats customer access",
            policy: |p| {
                p.hygiene.allowed = vec![AddressRule::parse("monitor.example").unwrap()];
                p.access.signup = Signup::Closed;
            },
            facts: || {
                let mut f = facts(stranger("alerts@monitor.example"), vec![]);
                f.signals.auto_submitted = Some("auto-generated".into());
                f
            },
            action: Action::Reject,
            reason: Reason::SignupClosed,
            account: AccountOutcome::None,
        },
        Case {
            name: "feedback report",
            policy: no_change,
            facts: || {
                let mut f = facts(stranger("feedback@isp.example"), vec![]);
                f.signals.report_type = Some("feedback-report".into());
                f
            },
            action: Action::Ignore,
            reason: Reason::FeedbackReport,
            account: AccountOutcome::None,
        },
        Case {
            name: "MAILER-DAEMON with an empty address is a bounce",
            policy: no_change,
            facts: || {
                let mut f = facts(stranger("x@ext.example"), vec![]);
                f.sender = None;
                f.signals.from_mail_system = true;
                f
            },
            action: Action::Ignore,
            reason: Reason::DeliveryStatusNotification,
            account: AccountOutcome::None,
        },
        // Trust.
        Case {
            name: "unauthenticated internal sender",
            policy: no_change,
            facts: || facts(stranger("eve@corp.example"), vec![]),
            action: Action::Reject,
            reason: Reason::UnauthenticatedSender,
            account: AccountOutcome::None,
        },
        Case {
            name: "forged authentication-results from an untrusted id",
            policy: no_change,
            facts: || {
                let mut f = facts(stranger("eve@corp.example"), vec![]);
                f.auth_results =
                    parse_header(0, "evil.example; dmarc=pass header.from=corp.example");
                f
            },
            action: Action::Reject,
            reason: Reason::UnauthenticatedSender,
            account: AccountOutcome::None,
        },
        Case {
            name: "authenticated internal sender gets an internal account",
            policy: no_change,
            facts: || {
                let mut f = facts(stranger("ida@corp.example"), vec![]);
                f.auth_results = dmarc_pass("corp.example");
                f
            },
            action: Action::CreateRequest,
            reason: Reason::NewRequest,
            account: AccountOutcome::CreateInternal,
        },
        Case {
            name: "internal sender without the trust rule",
            policy: |p| p.trust.require_authentication = false,
            facts: || facts(stranger("ida@corp.example"), vec![]),
            action: Action::CreateRequest,
            reason: Reason::NewRequest,
            account: AccountOutcome::CreateInternal,
        },
        Case {
            name: "without the trust rule, our MTA's DMARC fail still rejects an internal sender",
            policy: |p| p.trust.require_authentication = false,
            facts: || {
                let mut f = facts(stranger("ida@corp.example"), vec![]);
                f.auth_results = parse_header(
                    0,
                    "mx.desk.example; dmarc=fail (p=reject) header.from=corp.example",
                );
                f
            },
            action: Action::Reject,
            reason: Reason::UnauthenticatedSender,
            account: AccountOutcome::None,
        },
        Case {
            name: "without the trust rule, a forged agent failing DMARC gets no agent rights",
            policy: |p| p.trust.require_authentication = false,
            facts: || {
                let mut p = member("agnes@corp.example", AccountKind::Internal, &[]);
                p.agent = true;
                let mut f = facts(p, vec![]);
                f.auth_results = parse_header(
                    0,
                    "mx.desk.example; spf=fail smtp.mailfrom=x@evil.example; dmarc=fail header.from=corp.example",
                );
                f
            },
            action: Action::Reject,
            reason: Reason::UnauthenticatedSender,
            account: AccountOutcome::None,
        },
        Case {
            name: "without the trust rule, a DMARC fail for another domain or from an untrusted id counts for nothing",
            policy: |p| p.trust.require_authentication = false,
            facts: || {
                let mut f = facts(stranger("ida@corp.example"), vec![]);
                f.auth_results =
                    parse_header(0, "mx.desk.example; dmarc=fail header.from=other.example");
                f.auth_results.extend(parse_header(
                    1,
                    "evil.example; dmarc=fail header.from=corp.example",
                ));
                f
            },
            action: Action::CreateRequest,
            reason: Reason::NewRequest,
            account: AccountOutcome::CreateInternal,
        },
        Case {
            name: "unauthenticated internal agent gets no agent rights",
            policy: no_change,
            facts: || {
                let mut p = member("agnes@corp.example", AccountKind::Internal, &[]);
                p.agent = true;
                facts(p, vec![])
            },
            action: Action::Reject,
            reason: Reason::UnauthenticatedSender,
            account: AccountOutcome::None,
        },
        Case {
            name: "existing internal account on another domain must authenticate",
            policy: no_change,
            facts: || {
                facts(
                    member("cto@holding.example", AccountKind::Internal, &[]),
                    vec![],
                )
            },
            action: Action::Reject,
            reason: Reason::UnauthenticatedSender,
            account: AccountOutcome::None,
        },
        Case {
            name: "unauthenticated external agent is rejected, not taken as a customer",
            policy: no_change,
            facts: || {
                let mut p = stranger("contractor@ext.example");
                p.agent = true;
                facts(p, vec![])
            },
            action: Action::Reject,
            reason: Reason::UnauthenticatedSender,
            account: AccountOutcome::None,
        },
        // Site customer access.
        Case {
            name: "signup closed rejects unknown senders",
            policy: |p| p.access.signup = Signup::Closed,
            facts: || facts(stranger("ann@ext.example"), vec![]),
            action: Action::Reject,
            reason: Reason::SignupClosed,
            account: AccountOutcome::None,
        },
        Case {
            name: "signup closed accepts existing accounts",
            policy: |p| p.access.signup = Signup::Closed,
            facts: || {
                facts(
                    member("ann@ext.example", AccountKind::PortalOnly, &[]),
                    vec![],
                )
            },
            action: Action::CreateRequest,
            reason: Reason::NewRequest,
            account: AccountOutcome::Existing,
        },
        Case {
            name: "signup verify holds the request",
            policy: |p| p.access.signup = Signup::Verify,
            facts: || facts(stranger("ann@ext.example"), vec![]),
            action: Action::HoldForVerification,
            reason: Reason::PendingVerification,
            account: AccountOutcome::CreatePortalOnly,
        },
        Case {
            name: "portal-only accounts switched off",
            policy: |p| p.access.portal_only_accounts = false,
            facts: || facts(stranger("ann@ext.example"), vec![]),
            action: Action::Reject,
            reason: Reason::PortalOnlyDisabled,
            account: AccountOutcome::None,
        },
        Case {
            name: "portal-only off still lets approved domains in",
            policy: |p| {
                p.access.portal_only_accounts = false;
                p.trust.require_authentication = false;
            },
            facts: || facts(stranger("ida@corp.example"), vec![]),
            action: Action::CreateRequest,
            reason: Reason::NewRequest,
            account: AccountOutcome::CreateInternal,
        },
        Case {
            name: "external domain not on the list",
            policy: |p| {
                p.access.external_domains = vec![DomainPattern::parse("partner.example").unwrap()]
            },
            facts: || facts(stranger("ann@ext.example"), vec![]),
            action: Action::Reject,
            reason: Reason::DomainNotAllowed,
            account: AccountOutcome::None,
        },
        Case {
            name: "external domain on the list",
            policy: |p| {
                p.access.external_domains = vec![DomainPattern::parse("partner.example").unwrap()]
            },
            facts: || facts(stranger("pat@partner.example"), vec![]),
            action: Action::CreateRequest,
            reason: Reason::NewRequest,
            account: AccountOutcome::CreatePortalOnly,
        },
        Case {
            name: "approved domain wins over the external list",
            policy: |p| {
                p.access.external_domains = vec![DomainPattern::parse("corp.example").unwrap()];
                p.trust.require_authentication = false;
            },
            facts: || facts(stranger("ida@corp.example"), vec![]),
            action: Action::CreateRequest,
            reason: Reason::NewRequest,
            account: AccountOutcome::CreateInternal,
        },
        // Requester status.
        Case {
            name: "deactivated account",
            policy: no_change,
            facts: || {
                let mut p = stranger("ann@ext.example");
                p.account = Some(account(AccountKind::PortalOnly, AccountStatus::Deactivated));
                facts(p, vec![])
            },
            action: Action::Reject,
            reason: Reason::AccountDeactivated,
            account: AccountOutcome::None,
        },
        Case {
            name: "pending account holds again",
            policy: no_change,
            facts: || {
                let mut p = stranger("ann@ext.example");
                p.account = Some(account(AccountKind::PortalOnly, AccountStatus::Pending));
                facts(p, vec![])
            },
            action: Action::HoldForVerification,
            reason: Reason::PendingVerification,
            account: AccountOutcome::Existing,
        },
        // Desk channel access.
        Case {
            name: "restricted desk rejects strangers",
            policy: |p| it(p).channel_access = ChannelAccess::Restricted,
            facts: || facts(stranger("ann@ext.example"), vec![]),
            action: Action::Reject,
            reason: Reason::NotDeskCustomer,
            account: AccountOutcome::None,
        },
        Case {
            name: "restricted desk rejects accounts that are not its customers",
            policy: |p| it(p).channel_access = ChannelAccess::Restricted,
            facts: || {
                facts(
                    member("ann@ext.example", AccountKind::PortalOnly, &[]),
                    vec![],
                )
            },
            action: Action::Reject,
            reason: Reason::NotDeskCustomer,
            account: AccountOutcome::None,
        },
        Case {
            name: "restricted desk accepts its customers",
            policy: |p| it(p).channel_access = ChannelAccess::Restricted,
            facts: || {
                let mut p = member("ann@ext.example", AccountKind::PortalOnly, &[]);
                if let Some(a) = p.account.as_mut() {
                    a.desk_customer = true;
                }
                facts(p, vec![])
            },
            action: Action::CreateRequest,
            reason: Reason::NewRequest,
            account: AccountOutcome::Existing,
        },
        Case {
            name: "restricted desk accepts its authenticated agents",
            policy: |p| it(p).channel_access = ChannelAccess::Restricted,
            facts: || {
                let mut p = stranger("agnes@corp.example");
                p.agent = true;
                let mut f = facts(p, vec![]);
                f.auth_results = dmarc_pass("corp.example");
                f
            },
            action: Action::CreateRequest,
            reason: Reason::NewRequest,
            account: AccountOutcome::None,
        },
        Case {
            name: "rate limited",
            policy: no_change,
            facts: || {
                let mut f = facts(
                    member("ann@ext.example", AccountKind::PortalOnly, &[]),
                    vec![],
                );
                f.sender_recent_requests = 30;
                f
            },
            action: Action::Reject,
            reason: Reason::RateLimited,
            account: AccountOutcome::None,
        },
    ]
}

#[test]
fn table_of_requester_outcomes() {
    let mut failures = Vec::new();
    for case in cases() {
        let mut p = policy();
        (case.policy)(&mut p);
        let f = (case.facts)();
        let d = decide(&f, &p);
        if d.action != case.action || d.reason != case.reason || d.requester.account != case.account
        {
            failures.push(format!(
                "{}: got {:?}/{:?}/{:?}, want {:?}/{:?}/{:?} — {}",
                case.name,
                d.action,
                d.reason,
                d.requester.account,
                case.action,
                case.reason,
                case.account,
                d.explanation
            ));
        }
        assert!(!d.explanation.is_empty(), "{}: no explanation", case.name);
        assert!(
            !d.requester.explanation.is_empty(),
            "{}: no requester explanation",
            case.name
        );
        if d.is_passive() {
            assert!(
                d.participants
                    .iter()
                    .all(|p| p.outcome == ParticipantOutcome::Drop),
                "{}: a passive decision added participants",
                case.name
            );
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn help_desk_ccs_an_outsider_without_minting_accounts() {
    // The story from the design: an agent answers an outsider and Cc's the desk.
    let p = policy();
    let mut agent = stranger("agnes@corp.example");
    agent.agent = true;
    let mut f = facts(
        agent,
        vec![
            stranger("olga@outside.example"),
            stranger("it@desk.example"),
        ],
    );
    f.auth_results = dmarc_pass("corp.example");
    let d = decide(&f, &p);
    assert_eq!(d.action, Action::CreateRequest);
    assert_eq!(d.requester.reason, Reason::Agent);
    assert_eq!(
        outcomes(&d),
        vec![
            (
                "olga@outside.example".into(),
                ParticipantOutcome::Drop,
                Reason::AgentsMayNotAddCustomers
            ),
            (
                "it@desk.example".into(),
                ParticipantOutcome::Drop,
                Reason::OwnAddress
            ),
        ]
    );
    assert!(
        d.emails.is_empty(),
        "no invitation may go out: {:?}",
        d.emails
    );

    // When the desk allows it, the same mail creates the outsider's account.
    let mut p = policy();
    it(&mut p).agents_may_add_customers = true;
    let d = decide(&f, &p);
    assert_eq!(
        d.participants[0].outcome,
        ParticipantOutcome::CreatePortalOnly
    );
    assert_eq!(d.participants[0].reason, Reason::AddedByAgent);
    assert_eq!(
        emails(&d),
        vec![("olga@outside.example".into(), EmailKind::Invitation)]
    );
}

#[test]
fn participants_under_each_sharing_setting() {
    let sender = || member("ann@acme.example", AccountKind::PortalOnly, &["Acme"]);
    let recipients = || {
        vec![
            member("bea@acme.example", AccountKind::PortalOnly, &["Acme"]),
            member("cy@other.example", AccountKind::PortalOnly, &["Other"]),
            {
                let mut p = stranger("dan@acme.example");
                p.domain_organizations = vec!["Acme".into()];
                p
            },
            stranger("eli@nowhere.example"),
            stranger("ida@corp.example"),
        ]
    };
    let run = |sharing: Sharing, unknown: UnknownParticipants| {
        let mut p = policy();
        it(&mut p).sharing = sharing;
        it(&mut p).unknown_participants = unknown;
        outcomes(&decide(&facts(sender(), recipients()), &p))
            .into_iter()
            .map(|(_, o, r)| (o, r))
            .collect::<Vec<_>>()
    };
    use ParticipantOutcome::*;
    assert_eq!(
        run(Sharing::None, UnknownParticipants::Create),
        vec![(Drop, Reason::SharingDisabled); 5]
    );
    assert_eq!(
        run(Sharing::Any, UnknownParticipants::Drop),
        vec![
            (AddExisting, Reason::SharingAny),
            (AddExisting, Reason::SharingAny),
            (Drop, Reason::UnknownParticipantDropped),
            (Drop, Reason::UnknownParticipantDropped),
            (Drop, Reason::UnknownParticipantDropped),
        ]
    );
    assert_eq!(
        run(Sharing::Any, UnknownParticipants::Create),
        vec![
            (AddExisting, Reason::SharingAny),
            (AddExisting, Reason::SharingAny),
            (CreatePortalOnly, Reason::UnknownParticipantCreated),
            (CreatePortalOnly, Reason::UnknownParticipantCreated),
            (CreateInternal, Reason::UnknownParticipantCreated),
        ]
    );
    assert_eq!(
        run(Sharing::Organization, UnknownParticipants::Create),
        vec![
            (AddExisting, Reason::SharedOrganization),
            (Drop, Reason::NotInOrganization),
            (CreatePortalOnly, Reason::UnknownParticipantCreated),
            (Drop, Reason::NotInOrganization),
            (Drop, Reason::NotInOrganization),
        ]
    );
    assert_eq!(
        run(Sharing::Organization, UnknownParticipants::Drop),
        vec![
            (AddExisting, Reason::SharedOrganization),
            (Drop, Reason::NotInOrganization),
            (Drop, Reason::UnknownParticipantDropped),
            (Drop, Reason::UnknownParticipantDropped),
            (Drop, Reason::UnknownParticipantDropped),
        ]
    );
}

#[test]
fn participant_creation_follows_site_access() {
    let recipients = || vec![stranger("x@ext.example"), stranger("y@partner.example")];
    let sender = || member("ann@ext.example", AccountKind::PortalOnly, &[]);
    let base = || {
        let mut p = policy();
        it(&mut p).unknown_participants = UnknownParticipants::Create;
        p
    };
    let mut p = base();
    p.access.signup = Signup::Closed;
    let d = decide(&facts(sender(), recipients()), &p);
    assert!(
        d.participants
            .iter()
            .all(|x| x.reason == Reason::SignupClosed)
    );

    let mut p = base();
    p.access.external_domains = vec![DomainPattern::parse("partner.example").unwrap()];
    let d = decide(&facts(sender(), recipients()), &p);
    assert_eq!(d.participants[0].reason, Reason::DomainNotAllowed);
    assert_eq!(
        d.participants[1].outcome,
        ParticipantOutcome::CreatePortalOnly
    );

    let mut p = base();
    p.access.portal_only_accounts = false;
    let d = decide(&facts(sender(), recipients()), &p);
    assert!(
        d.participants
            .iter()
            .all(|x| x.reason == Reason::PortalOnlyDisabled)
    );

    let mut p = base();
    p.access.signup = Signup::Verify;
    let d = decide(&facts(sender(), recipients()), &p);
    assert!(
        d.participants
            .iter()
            .all(|x| x.new_status == Some(AccountStatus::Pending))
    );
    assert_eq!(d.emails.len(), 2);
    assert!(d.emails.iter().all(|e| e.kind == EmailKind::Invitation));
}

#[test]
fn special_participants() {
    let mut p = policy();
    it(&mut p).unknown_participants = UnknownParticipants::Create;
    p.hygiene.max_participants = 2;
    let mut agent = member("agnes@corp.example", AccountKind::Internal, &[]);
    agent.agent = true;
    let mut gone = member("old@ext.example", AccountKind::PortalOnly, &[]);
    if let Some(a) = gone.account.as_mut() {
        a.status = AccountStatus::Deactivated;
    }
    let f = facts(
        member("ann@ext.example", AccountKind::PortalOnly, &[]),
        vec![
            stranger("help@desk.example"),
            member("ann@ext.example", AccountKind::PortalOnly, &[]),
            agent,
            gone,
            stranger("a@ext.example"),
            stranger("b@ext.example"),
        ],
    );
    let d = decide(&f, &p);
    let reasons: Vec<Reason> = d.participants.iter().map(|p| p.reason).collect();
    assert_eq!(
        reasons,
        vec![
            Reason::OwnAddress,
            Reason::IsRequester,
            Reason::Agent,
            Reason::AccountDeactivated,
            Reason::UnknownParticipantCreated,
            Reason::TooManyParticipants,
        ]
    );
}

#[test]
fn restricted_desk_never_creates_participants() {
    let mut p = policy();
    it(&mut p).channel_access = ChannelAccess::Restricted;
    it(&mut p).unknown_participants = UnknownParticipants::Create;
    it(&mut p).agents_may_add_customers = true;
    let mut sender = member("ann@ext.example", AccountKind::PortalOnly, &[]);
    if let Some(a) = sender.account.as_mut() {
        a.desk_customer = true;
    }
    let mut customer = member("bea@ext.example", AccountKind::PortalOnly, &[]);
    if let Some(a) = customer.account.as_mut() {
        a.desk_customer = true;
    }
    let f = facts(
        sender,
        vec![
            customer,
            member("cy@ext.example", AccountKind::PortalOnly, &[]),
            stranger("dan@ext.example"),
        ],
    );
    let d = decide(&f, &p);
    assert_eq!(
        outcomes(&d)
            .into_iter()
            .map(|(_, o, r)| (o, r))
            .collect::<Vec<_>>(),
        vec![
            (ParticipantOutcome::AddExisting, Reason::SharingAny),
            (ParticipantOutcome::Drop, Reason::NotDeskCustomer),
            (ParticipantOutcome::Drop, Reason::NotDeskCustomer),
        ]
    );
}

fn thread(reporter: &str, participants: &[&str], matched_by: ThreadMatch) -> Thread {
    Thread {
        key: RequestKey::parse("IT-42").unwrap(),
        status: RequestStatus::Open,
        matched_by,
        reporter: addr(reporter),
        reporter_organizations: vec!["Acme".into()],
        participants: participants.iter().map(|a| addr(a)).collect(),
    }
}

#[test]
fn replies_thread_only_for_people_on_the_request() {
    let p = policy();
    // The reporter replies: a comment; Cc'd people follow the participant policy.
    let mut f = facts(
        member("ann@acme.example", AccountKind::PortalOnly, &["Acme"]),
        vec![
            member("bea@acme.example", AccountKind::PortalOnly, &["Acme"]),
            member("cy@acme.example", AccountKind::PortalOnly, &["Acme"]),
        ],
    );
    f.thread = Some(thread(
        "ann@acme.example",
        &["bea@acme.example"],
        ThreadMatch::MessageId,
    ));
    let d = decide(&f, &p);
    assert_eq!(d.action, Action::AddComment);
    assert_eq!(
        d.request.as_ref().map(|k| k.to_string()).as_deref(),
        Some("IT-42")
    );
    assert_eq!(d.participants[0].reason, Reason::AlreadyParticipant);
    assert_eq!(d.participants[1].reason, Reason::SharingAny);
    // A participant whose account was deactivated since is not added again.
    let mut gone = member("bea@acme.example", AccountKind::PortalOnly, &["Acme"]);
    if let Some(a) = gone.account.as_mut() {
        a.status = AccountStatus::Deactivated;
    }
    let mut f2 = f.clone();
    f2.recipients = vec![gone];
    let d = decide(&f2, &p);
    assert_eq!(d.participants[0].outcome, ParticipantOutcome::Drop);
    assert_eq!(d.participants[0].reason, Reason::AccountDeactivated);

    // A participant replies and Cc's the reporter: the reporter is not added again.
    let mut f = facts(
        member("bea@acme.example", AccountKind::PortalOnly, &["Acme"]),
        vec![member(
            "ann@acme.example",
            AccountKind::PortalOnly,
            &["Acme"],
        )],
    );
    f.thread = Some(thread(
        "ann@acme.example",
        &["bea@acme.example"],
        ThreadMatch::SubjectKey,
    ));
    let d = decide(&f, &p);
    assert_eq!(d.action, Action::AddComment);
    assert_eq!(d.participants[0].reason, Reason::IsRequester);

    // A stranger who guessed the key opens a new request instead.
    let mut f = facts(stranger("mallory@evil.example"), vec![]);
    f.thread = Some(thread("ann@acme.example", &[], ThreadMatch::SubjectKey));
    let d = decide(&f, &p);
    assert_eq!(d.action, Action::CreateRequest);
    assert!(d.request.is_none());
    assert!(
        d.explanation.contains("not on that request"),
        "{}",
        d.explanation
    );

    // A desk may let strangers' replies (matched by Message-ID, never by subject key)
    // become comments.
    let mut open_desk = policy();
    it(&mut open_desk).stranger_replies = StrangerReplies::Comment;
    let mut f = facts(stranger("fay@ext.example"), vec![]);
    f.thread = Some(thread("ann@acme.example", &[], ThreadMatch::MessageId));
    assert_eq!(decide(&f, &open_desk).action, Action::AddComment);
    f.thread = Some(thread("ann@acme.example", &[], ThreadMatch::SubjectKey));
    assert_eq!(decide(&f, &open_desk).action, Action::CreateRequest);

    // An authenticated agent of the desk may always comment.
    let mut agent = stranger("agnes@corp.example");
    agent.agent = true;
    let mut f = facts(agent, vec![]);
    f.auth_results = dmarc_pass("corp.example");
    f.thread = Some(thread("ann@acme.example", &[], ThreadMatch::SubjectKey));
    assert_eq!(decide(&f, &p).action, Action::AddComment);

    // Comments are not rate limited.
    let mut f = facts(
        member("ann@acme.example", AccountKind::PortalOnly, &["Acme"]),
        vec![],
    );
    f.sender_recent_requests = 1000;
    f.thread = Some(thread("ann@acme.example", &[], ThreadMatch::MessageId));
    assert_eq!(decide(&f, &p).action, Action::AddComment);
}

/// A request still held after its reporter confirmed is one they left unticked on the
/// confirmation page (forged in their name): a reply to it — theirs, or the forger's with
/// the Message-ID they know — opens a new request, and its Cc's are not added to the
/// disowned one. An agent may still comment on it.
#[test]
fn a_reply_to_a_held_request_its_confirmed_reporter_disowned_is_new() {
    let p = policy();
    let mut s = stranger("ann@ext.example");
    s.account = Some(account(AccountKind::PortalOnly, AccountStatus::Active));
    let mut f = facts(s, vec![stranger("bob@ext.example")]);
    let mut t = thread("ann@ext.example", &[], ThreadMatch::MessageId);
    t.status = RequestStatus::Held;
    f.thread = Some(t.clone());
    let d = decide(&f, &p);
    assert_eq!(d.action, Action::CreateRequest, "{}", d.to_text());
    assert!(d.request.is_none(), "{}", d.to_text());
    assert!(
        d.explanation.contains("IT-42, which is held"),
        "{}",
        d.explanation
    );

    let mut agent = member("agnes@corp.example", AccountKind::Internal, &[]);
    agent.agent = true;
    let mut f = facts(agent, vec![]);
    f.auth_results = dmarc_pass("corp.example");
    f.thread = Some(t);
    let d = decide(&f, &p);
    assert_eq!(d.action, Action::AddComment, "{}", d.to_text());
}

#[test]
fn pending_sender_replying_to_held_request_joins_it() {
    let p = policy();
    let mut s = stranger("ann@ext.example");
    s.account = Some(account(AccountKind::PortalOnly, AccountStatus::Pending));
    let mut f = facts(s, vec![stranger("bob@ext.example")]);
    let mut t = thread("ann@ext.example", &[], ThreadMatch::MessageId);
    t.status = RequestStatus::Held;
    f.thread = Some(t);
    let d = decide(&f, &p);
    assert_eq!(d.action, Action::HoldForVerification);
    assert_eq!(
        d.request.as_ref().map(|k| k.to_string()).as_deref(),
        Some("IT-42")
    );
    assert_eq!(d.participants[0].reason, Reason::RequestHeld);

    // A pending participant of an open request comments on it like anyone on it.
    let mut s = stranger("bea@ext.example");
    s.account = Some(account(AccountKind::PortalOnly, AccountStatus::Pending));
    let mut f = facts(s, vec![]);
    f.thread = Some(thread(
        "ann@ext.example",
        &["bea@ext.example"],
        ThreadMatch::MessageId,
    ));
    let d = decide(&f, &p);
    assert_eq!(d.action, Action::AddComment);
    assert!(d.emails.is_empty());

    // Strangers' replies may be comments on this desk, but a pending account that is not
    // on the request is held like anyone unconfirmed: in a request of its own, as is an
    // unconfirmed stranger's reply under signup = verify. Nothing unconfirmed reaches
    // IT-42.
    let mut open_desk = policy();
    it(&mut open_desk).stranger_replies = StrangerReplies::Comment;
    let mut s = stranger("cy@ext.example");
    s.account = Some(account(AccountKind::PortalOnly, AccountStatus::Pending));
    let mut f = facts(s, vec![stranger("dan@ext.example")]);
    f.thread = Some(thread("ann@ext.example", &[], ThreadMatch::MessageId));
    let d = decide(&f, &open_desk);
    assert_eq!(d.action, Action::HoldForVerification, "{}", d.to_text());
    assert!(d.request.is_none(), "{}", d.to_text());
    assert!(
        d.explanation.contains("waits as a request of its own"),
        "{}",
        d.explanation
    );
    assert_eq!(d.participants[0].reason, Reason::RequestHeld);
    open_desk.access.signup = Signup::Verify;
    let mut f = facts(stranger("fay@ext.example"), vec![]);
    f.thread = Some(thread("ann@ext.example", &[], ThreadMatch::MessageId));
    let d = decide(&f, &open_desk);
    assert_eq!(d.action, Action::HoldForVerification, "{}", d.to_text());
    assert!(d.request.is_none(), "{}", d.to_text());
}

#[test]
fn verification_is_resent_at_most_once_per_interval() {
    let p = policy();
    let pending = |last: Option<i64>| {
        let mut s = stranger("ann@ext.example");
        let mut a = account(AccountKind::PortalOnly, AccountStatus::Pending);
        a.last_verification_sent_at = last;
        s.account = Some(a);
        decide(&facts(s, vec![]), &p)
    };
    assert_eq!(
        emails(&pending(None)),
        vec![("ann@ext.example".into(), EmailKind::Verification)]
    );
    assert!(emails(&pending(Some(NOW - 60))).is_empty());
    assert_eq!(pending(Some(NOW - 3600)).emails.len(), 1);
}

#[test]
fn new_accounts_get_the_right_mail_and_status() {
    let mut p = policy();
    p.access.signup = Signup::Verify;
    let d = decide(&facts(stranger("ann@ext.example"), vec![]), &p);
    assert_eq!(d.requester.new_status, Some(AccountStatus::Pending));
    assert_eq!(
        emails(&d),
        vec![("ann@ext.example".into(), EmailKind::Verification)]
    );
    p.access.signup = Signup::Open;
    let d = decide(&facts(stranger("ann@ext.example"), vec![]), &p);
    assert_eq!(d.requester.new_status, Some(AccountStatus::Active));
    assert_eq!(
        emails(&d),
        vec![("ann@ext.example".into(), EmailKind::Invitation)]
    );
    // Undeliverable addresses get accounts but no mail.
    let mut s = stranger("ann@ext.example");
    s.undeliverable = true;
    assert!(decide(&facts(s, vec![]), &p).emails.is_empty());
}

#[test]
fn rejection_notices_only_to_authenticated_senders() {
    let mut p = policy();
    p.access.rejection_notices = true;
    p.access.signup = Signup::Closed;
    let d = decide(&facts(stranger("ann@ext.example"), vec![]), &p);
    assert_eq!(d.action, Action::Reject);
    assert!(
        d.emails.is_empty(),
        "a forged From must not get backscatter"
    );
    let mut f = facts(stranger("ann@ext.example"), vec![]);
    f.auth_results = dmarc_pass("ext.example");
    let d = decide(&f, &p);
    assert_eq!(
        emails(&d),
        vec![("ann@ext.example".into(), EmailKind::RejectionNotice)]
    );
    assert_eq!(d.emails[0].about, Some(Reason::SignupClosed));
    // Never for hygiene outcomes.
    f.signals.auto_submitted = Some("auto-replied".into());
    assert!(decide(&f, &p).emails.is_empty());
}

#[test]
fn unknown_desk_is_ignored() {
    let mut f = facts(stranger("ann@ext.example"), vec![]);
    f.desk = DeskKey::parse("NOPE").unwrap();
    let d = decide(&f, &policy());
    assert_eq!((d.action, d.reason), (Action::Ignore, Reason::UnknownDesk));
}

#[test]
fn decision_json_has_the_contract_keys() {
    let d = decide(
        &facts(
            stranger("ann@ext.example"),
            vec![stranger("bob@ext.example")],
        ),
        &policy(),
    );
    let v = serde_json::to_value(&d).unwrap();
    for key in [
        "action",
        "reason",
        "desk",
        "request",
        "requester",
        "participants",
        "emails",
    ] {
        assert!(v.get(key).is_some(), "missing {key}: {v}");
    }
    assert_eq!(v["action"], "create_request");
    assert_eq!(v["requester"]["account"], "create_portal_only");
    assert_eq!(v["requester"]["address"], "ann@ext.example");
    assert_eq!(v["participants"][0]["outcome"], "drop");
    assert_eq!(
        v["participants"][0]["reason"],
        "unknown_participant_dropped"
    );
    assert_eq!(v["emails"][0]["kind"], "invitation");
}

// ---------------------------------------------------------------------------------------
// Property tests

fn arb_person(domains: &'static [&'static str]) -> impl Strategy<Value = Person> {
    (
        "[a-e]{1,3}",
        prop::sample::select(domains),
        prop::option::of((
            prop::sample::select(vec![AccountKind::Internal, AccountKind::PortalOnly]),
            prop::sample::select(vec![
                AccountStatus::Active,
                AccountStatus::Pending,
                AccountStatus::Deactivated,
            ]),
            any::<bool>(),
            prop::collection::vec(prop::sample::select(vec!["Acme", "Other"]), 0..2),
        )),
        any::<bool>(),
        prop::collection::vec(prop::sample::select(vec!["Acme", "Other"]), 0..2),
    )
        .prop_map(|(local, domain, acc, agent, domain_orgs)| {
            let mut p = Person::new(addr(&format!("{local}@{domain}")));
            p.account = acc.map(|(kind, status, desk_customer, orgs)| AccountFacts {
                kind,
                status,
                organizations: orgs.into_iter().map(String::from).collect(),
                desk_customer,
                last_verification_sent_at: None,
            });
            p.agent = agent;
            p.domain_organizations = domain_orgs.into_iter().map(String::from).collect();
            p
        })
}

const DOMAINS: &[&str] = &[
    "corp.example",
    "ext.example",
    "partner.example",
    "desk.example",
];

fn arb_policy() -> impl Strategy<Value = Policy> {
    (
        prop::sample::select(vec![Signup::Closed, Signup::Verify, Signup::Open]),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        prop::sample::select(vec![ChannelAccess::Open, ChannelAccess::Restricted]),
        prop::sample::select(vec![Sharing::None, Sharing::Organization, Sharing::Any]),
        prop::sample::select(vec![UnknownParticipants::Drop, UnknownParticipants::Create]),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(
                signup,
                portal_only,
                external_list,
                require_auth,
                access,
                sharing,
                unknown,
                agents_add,
                notices,
            )| {
                let mut p = policy();
                p.access.signup = signup;
                p.access.portal_only_accounts = portal_only;
                p.access.rejection_notices = notices;
                if external_list {
                    p.access.external_domains = vec![
                        DomainPattern::parse("partner.example").unwrap(),
                        DomainPattern::parse("corp.example").unwrap(),
                    ];
                }
                p.trust.require_authentication = require_auth;
                let d = it(&mut p);
                d.channel_access = access;
                d.sharing = sharing;
                d.unknown_participants = unknown;
                d.agents_may_add_customers = agents_add;
                p
            },
        )
}

fn arb_facts() -> impl Strategy<Value = Facts> {
    (
        arb_person(DOMAINS),
        prop::collection::vec(arb_person(DOMAINS), 0..6),
        any::<bool>(),
        prop::option::of(prop::sample::select(vec![
            "auto-replied",
            "no",
            "auto-generated",
        ])),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(sender, recipients, authenticated, auto, duplicate, dsn)| {
                let domain = sender.address.domain().to_string();
                let mut f = facts(sender, recipients);
                if authenticated {
                    f.auth_results = dmarc_pass(&domain);
                }
                f.signals.auto_submitted = auto.map(String::from);
                f.duplicate = duplicate;
                f.signals.null_return_path = dsn;
                f
            },
        )
}

fn creates_anything(d: &Decision) -> bool {
    d.requester.account.created_kind().is_some()
        || d.participants
            .iter()
            .any(|p| p.outcome.created_kind().is_some())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn restricted_desk_never_creates_accounts(p in arb_policy(), f in arb_facts()) {
        let d = decide(&f, &p);
        if p.desks[0].channel_access == ChannelAccess::Restricted {
            prop_assert!(!creates_anything(&d), "{}", d.to_text());
        }
    }

    #[test]
    fn drop_never_creates_participant_accounts(p in arb_policy(), f in arb_facts()) {
        let d = decide(&f, &p);
        let desk = &p.desks[0];
        let agent_may = f.sender.as_ref().is_some_and(|s| s.agent) && desk.agents_may_add_customers;
        if desk.unknown_participants == UnknownParticipants::Drop && !agent_may {
            prop_assert!(d.participants.iter().all(|x| x.outcome.created_kind().is_none()), "{}", d.to_text());
        }
    }

    #[test]
    fn nothing_is_sent_or_created_for_ignored_mail(p in arb_policy(), f in arb_facts()) {
        let d = decide(&f, &p);
        if d.action == Action::Ignore {
            prop_assert!(d.emails.is_empty());
            prop_assert!(!creates_anything(&d));
            prop_assert!(d.participants.iter().all(|x| x.outcome == ParticipantOutcome::Drop));
        }
        if d.action == Action::Reject {
            prop_assert!(!creates_anything(&d));
            prop_assert!(d.emails.iter().all(|e| e.kind == EmailKind::RejectionNotice));
        }
    }

    #[test]
    fn approved_domains_always_win(p in arb_policy(), f in arb_facts()) {
        let d = decide(&f, &p);
        if let Some(a) = &d.requester.address && a.domain() == "corp.example" {
            prop_assert_ne!(d.requester.account, AccountOutcome::CreatePortalOnly);
        }
        for x in &d.participants {
            if x.address.domain() == "corp.example" {
                prop_assert_ne!(x.outcome, ParticipantOutcome::CreatePortalOnly);
            }
        }
    }

    #[test]
    fn one_entry_per_recipient_and_every_outcome_explained(p in arb_policy(), f in arb_facts()) {
        let d = decide(&f, &p);
        prop_assert_eq!(d.participants.len(), f.recipients.len());
        prop_assert!(d.participants.iter().all(|x| !x.explanation.is_empty()));
        prop_assert!(!d.requester.explanation.is_empty());
        prop_assert_eq!(&d, &decide(&f, &p), "decide must be deterministic");
    }

    #[test]
    fn unauthenticated_internal_identities_get_nothing(p in arb_policy(), f in arb_facts()) {
        let d = decide(&f, &p);
        if p.trust.require_authentication && f.auth_results.is_empty()
            && let Some(s) = &f.sender
            && (s.address.domain() == "corp.example"
                || s.account.as_ref().is_some_and(|a| a.kind == AccountKind::Internal))
        {
            prop_assert!(d.is_passive(), "{}", d.to_text());
        }
    }
}

#[test]
fn no_reply_addresses_get_no_mail_and_no_new_account() {
    let mut p = policy();
    it(&mut p).unknown_participants = UnknownParticipants::Create;
    let f = facts(
        stranger("noreply@vendor.example"),
        vec![
            stranger("no-reply+alerts@vendor.example"),
            stranger("olga@outside.example"),
        ],
    );
    let d = decide(&f, &p);
    // The request is still opened (an alert, a vendor's notice): only mail and accounts
    // for addresses nobody reads are left out.
    assert_eq!(d.action, Action::CreateRequest);
    assert_eq!(
        emails(&d),
        vec![("olga@outside.example".into(), EmailKind::Invitation)]
    );
    let suppressed: Vec<(String, EmailKind, Reason)> = d
        .emails_suppressed
        .iter()
        .map(|e| (e.to.to_string(), e.kind, e.reason))
        .collect();
    assert_eq!(
        suppressed,
        vec![(
            "noreply@vendor.example".into(),
            EmailKind::Invitation,
            Reason::NoReplyAddress
        )]
    );
    assert_eq!(
        outcomes(&d),
        vec![
            (
                "no-reply+alerts@vendor.example".into(),
                ParticipantOutcome::Drop,
                Reason::NoReplyAddress
            ),
            (
                "olga@outside.example".into(),
                ParticipantOutcome::CreatePortalOnly,
                Reason::UnknownParticipantCreated
            ),
        ]
    );
    // Under signup = verify a no-reply sender could never confirm: no pending account
    // waits for a link nobody reads, and the decision says why.
    p.access.signup = Signup::Verify;
    let d = decide(&f, &p);
    assert_eq!(d.action, Action::Reject, "{}", d.to_text());
    assert_eq!(d.reason, Reason::NoReplyAddress);
    assert!(d.emails.is_empty(), "{}", d.to_text());
    assert_eq!(d.requester.account, AccountOutcome::None, "{}", d.to_text());
    assert!(
        d.explanation.contains("cannot confirm"),
        "{}",
        d.explanation
    );
    // An ordinary sender under verify is still held for verification.
    let f = facts(stranger("olga@outside.example"), vec![]);
    assert_eq!(decide(&f, &p).action, Action::HoldForVerification);
}

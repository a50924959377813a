//! The decision engine: facts and policy in, a [`Decision`] out. No IO, no clock.
//!
//! The order of the checks is part of the contract, because the first reason that applies
//! is the one reported:
//! 1. duplicate, no valid sender, hygiene (loops, own addresses, block list, bounces,
//!    automatic mail, bulk mail) — `ignore`, nothing created, nothing sent;
//! 2. trust — an internal identity that is not authenticated is rejected;
//! 3. rate limit for new requests;
//! 4. the requester: existing account (deactivated, restricted desk, pending) or a new
//!    one under site customer access (signup, approved domains, portal-only switch,
//!    external domains);
//! 5. every To/Cc address under the desk's sharing and unknown-participant settings.

use crate::address::EmailAddress;

use super::decision::{
    AccountOutcome, Action, Decision, EmailIntent, EmailKind, ParticipantDecision,
    ParticipantOutcome, Reason, SuppressedEmail,
};
use super::facts::{AccountKind, AccountStatus, Facts, Person, Thread};
use super::model::{ChannelAccess, Desk, Policy, Sharing, Signup, SiteAccess, UnknownParticipants};
use super::trust::{self, TrustVerdict};

/// Decides what to do with one message.
pub fn decide(facts: &Facts, policy: &Policy) -> Decision {
    let Some(desk) = policy.desk(&facts.desk) else {
        return Decision::ignored(
            Reason::UnknownDesk,
            format!("desk {} is not configured", facts.desk),
        );
    };
    let mut decision = Decision::ignored(Reason::NoValidSender, String::new());
    decision.desk = Some(desk.key.clone());
    decision.message_id = facts.message_id.clone();
    decision.invalid_recipients = facts.invalid_recipients.clone();
    decision.omitted_recipients = facts.omitted_recipients;

    if facts.duplicate {
        return finish_passive(
            decision,
            policy,
            facts,
            Action::Ignore,
            Reason::DuplicateMessage,
            "this message was already processed for this desk".into(),
        );
    }
    // Hygiene first: a bounce from `MAILER-DAEMON <>` is a bounce, not a message without
    // a sender.
    if let Some((reason, text)) = hygiene(facts, policy, desk, facts.sender.as_ref()) {
        if let Some(s) = &facts.sender {
            decision.requester.address = Some(s.address.clone());
            decision.requester.display_name = s.display_name.clone();
        }
        return finish_passive(decision, policy, facts, Action::Ignore, reason, text);
    }
    let Some(sender) = &facts.sender else {
        return finish_passive(
            decision,
            policy,
            facts,
            Action::Ignore,
            Reason::NoValidSender,
            "the From header has no valid address".into(),
        );
    };
    decision.requester.address = Some(sender.address.clone());
    decision.requester.display_name = sender.display_name.clone();

    // Trust: internal identities must be authenticated when required; where that is not
    // required, our MTA saying DMARC fail for the From domain still counts against them.
    let verdict = sender_verdict(facts, policy, sender.address.domain());
    let authenticated =
        verdict.authenticated || (!policy.trust.require_authentication && !verdict.dmarc_failed);
    // An agent on an outside domain claims more than a customer would: believed
    // unauthenticated, a forger could comment as them on requests they are on.
    let claims_internal = sender.agent
        || policy.access.is_approved(sender.address.domain())
        || sender
            .account
            .as_ref()
            .is_some_and(|a| a.kind == AccountKind::Internal);
    if !authenticated && claims_internal {
        let what = if sender.agent {
            "an agent address"
        } else {
            "an internal address"
        };
        return finish_passive(
            decision,
            policy,
            facts,
            Action::Reject,
            Reason::UnauthenticatedSender,
            format!(
                "{} is {what} but the message is not authenticated ({})",
                sender.address, verdict.detail
            ),
        );
    }
    let is_agent = sender.agent && authenticated;
    let agent_note = if sender.agent && !is_agent {
        " (agent rights ignored: not authenticated)"
    } else {
        ""
    };

    // Threading: only people already on the request (or agents) may comment on it. A
    // held request waits for its reporter's confirmation: only they, while still
    // pending, add to it (an agent may too). Once confirmed, one still held is one they
    // left unticked (or the policy refused to open): a reply to it opens a new request
    // instead of adding its To/Cc to the one they disowned.
    let pending = sender
        .account
        .as_ref()
        .is_some_and(|a| a.status == AccountStatus::Pending);
    let disowned =
        |t: &&Thread| t.status == super::facts::RequestStatus::Held && !is_agent && !pending;
    let thread = facts.thread.as_ref().filter(|t| {
        !disowned(t)
            && (is_agent
                || t.involves(&sender.address)
                || (t.matched_by == super::facts::ThreadMatch::MessageId
                    && desk.stranger_replies == super::model::StrangerReplies::Comment))
    });
    let stranger_note = match (&facts.thread, thread) {
        (Some(t), None) if disowned(&t) => format!(
            "; it refers to {}, which is held and was not opened when its reporter confirmed, so it is treated as new",
            t.key
        ),
        (Some(t), None) => format!(
            "; it refers to {} but {} is not on that request, so it is treated as new",
            t.key, sender.address
        ),
        _ => String::new(),
    };

    // Rate limit for new requests from customers.
    if thread.is_none()
        && !is_agent
        && policy.hygiene.max_requests_per_sender_per_hour > 0
        && facts.sender_recent_requests >= policy.hygiene.max_requests_per_sender_per_hour
    {
        return finish_passive(
            decision,
            policy,
            facts,
            Action::Reject,
            Reason::RateLimited,
            format!(
                "{} opened {} requests in the last hour (limit {})",
                sender.address,
                facts.sender_recent_requests,
                policy.hygiene.max_requests_per_sender_per_hour
            ),
        );
    }

    // The requester.
    // Only a sender who is on the request: a stranger's reply let through by
    // stranger_replies = comment does not make a pending account skip verification.
    let on_open_thread = thread.is_some_and(|t| {
        t.status == super::facts::RequestStatus::Open && t.involves(&sender.address)
    });
    let requester = match requester(
        sender,
        desk,
        &policy.access,
        is_agent,
        on_open_thread,
        facts.now,
    ) {
        Ok(r) => r,
        Err((reason, text)) => {
            let text = format!("{text}{agent_note}");
            let mut d = finish_passive(decision, policy, facts, Action::Reject, reason, text);
            if policy.access.rejection_notices
                && verdict.authenticated
                && !sender.undeliverable
                && reason_deserves_notice(reason)
            {
                mail(
                    &mut d,
                    &sender.address,
                    EmailKind::RejectionNotice,
                    Some(reason),
                );
            }
            return d;
        }
    };
    decision.requester.account = requester.account;
    decision.requester.new_status = requester.new_status;
    decision.requester.reason = requester.reason;
    decision.requester.explanation = format!("{}{agent_note}", requester.explanation);
    if let Some(kind) = requester.email
        && !sender.undeliverable
    {
        mail(&mut decision, &sender.address, kind, None);
    }

    if requester.hold {
        decision.action = Action::HoldForVerification;
        decision.reason = Reason::PendingVerification;
        // A follow-up goes on the sender's own held request. A reply to any other
        // request waits as a held request of its own: nothing unconfirmed is added to a
        // request others see.
        let own_held = thread.filter(|t| {
            t.status == super::facts::RequestStatus::Held && t.involves(&sender.address)
        });
        decision.request = own_held.map(|t| t.key.clone());
        let not_on = match (thread, own_held) {
            (Some(t), None) => format!(
                "; the reply to {} waits as a request of its own, so nothing unconfirmed is added to {}",
                t.key, t.key
            ),
            _ => String::new(),
        };
        decision.explanation = format!(
            "{} has not confirmed their address yet; the request is held until they do{stranger_note}{not_on}",
            sender.address
        );
        decision.participants = facts
            .recipients
            .iter()
            .map(|p| {
                own_address(p, policy).unwrap_or_else(|| {
                    drop(
                        p,
                        Reason::RequestHeld,
                        "decided when the held request is released".into(),
                    )
                })
            })
            .collect();
        return decision;
    }

    match thread {
        Some(t) => {
            decision.action = Action::AddComment;
            decision.reason = Reason::ReplyToRequest;
            decision.request = Some(t.key.clone());
            decision.explanation = format!(
                "a reply to {} (matched by {}) from {}",
                t.key,
                match t.matched_by {
                    super::facts::ThreadMatch::MessageId => "In-Reply-To/References",
                    super::facts::ThreadMatch::SubjectKey => "the key in the subject",
                },
                if is_agent {
                    "an agent"
                } else {
                    "someone on the request"
                }
            );
        }
        None => {
            decision.action = Action::CreateRequest;
            decision.reason = Reason::NewRequest;
            decision.explanation = format!(
                "a new request on {} from {}{stranger_note}",
                desk.key, sender.address
            );
        }
    }

    // Participants.
    let ctx = ParticipantContext {
        policy,
        desk,
        sender: &sender.address,
        sender_is_agent: is_agent,
        requester_orgs: match thread {
            Some(t) => &t.reporter_organizations,
            None => sender.organizations(),
        },
        thread,
    };
    let mut considered = 0usize;
    for p in &facts.recipients {
        let pd = participant(p, &ctx, &mut considered);
        if pd.outcome.created_kind().is_some() && !p.undeliverable {
            mail(&mut decision, &p.address, EmailKind::Invitation, None);
        }
        decision.participants.push(pd);
    }
    decision
}

/// Plans a mail to `to`; one to a no-reply address is recorded as suppressed instead
/// (nobody reads it; it would only come back as a bounce or sit in a dead mailbox).
fn mail(d: &mut Decision, to: &EmailAddress, kind: EmailKind, about: Option<Reason>) {
    if to.is_no_reply() {
        d.emails_suppressed.push(SuppressedEmail {
            to: to.clone(),
            kind,
            reason: Reason::NoReplyAddress,
            explanation: format!("{to} is a no-reply address"),
        });
        return;
    }
    d.emails.push(EmailIntent {
        to: to.clone(),
        kind,
        about,
    });
}

fn reason_deserves_notice(reason: Reason) -> bool {
    matches!(
        reason,
        Reason::SignupClosed
            | Reason::DomainNotAllowed
            | Reason::PortalOnlyDisabled
            | Reason::NotDeskCustomer
            | Reason::AccountDeactivated
    )
}

/// Fills in a reject/ignore decision: the requester gets no account, every participant
/// is dropped, and no mail is sent.
fn finish_passive(
    mut d: Decision,
    policy: &Policy,
    facts: &Facts,
    action: Action,
    reason: Reason,
    explanation: String,
) -> Decision {
    d.action = action;
    d.reason = reason;
    d.explanation = explanation.clone();
    d.requester.account = AccountOutcome::None;
    d.requester.new_status = None;
    d.requester.reason = reason;
    d.requester.explanation = explanation;
    d.emails.clear();
    d.participants = facts
        .recipients
        .iter()
        .map(|p| {
            own_address(p, policy).unwrap_or_else(|| {
                drop(
                    p,
                    Reason::MessageNotProcessed,
                    format!("the message was not processed ({})", reason.code()),
                )
            })
        })
        .collect();
    d
}

/// Desk addresses are never people: on To/Cc they are dropped as `own_address`,
/// whatever else happens to the message.
fn own_address(p: &Person, policy: &Policy) -> Option<ParticipantDecision> {
    policy.desk_for_address(&p.address).map(|d| {
        drop(
            p,
            Reason::OwnAddress,
            format!("{} is an address of desk {}", p.address, d.key),
        )
    })
}

fn hygiene(
    facts: &Facts,
    policy: &Policy,
    desk: &Desk,
    sender: Option<&Person>,
) -> Option<(Reason, String)> {
    let s = &facts.signals;
    let h = &policy.hygiene;
    if s.loop_ids.iter().any(|id| id == &h.loop_id) {
        return Some((
            Reason::MailLoop,
            "the message carries our own X-Intake-Loop header".into(),
        ));
    }
    if s.message_id_domain.as_deref() == Some(h.message_id_domain.as_str()) {
        return Some((
            Reason::MailLoop,
            format!(
                "the message's own Message-ID is on our domain {}",
                h.message_id_domain
            ),
        ));
    }
    if let Some(sender) = sender {
        if let Some(d) = policy.desk_for_address(&sender.address) {
            return Some((
                Reason::OwnAddressSender,
                format!("{} is an address of desk {}", sender.address, d.key),
            ));
        }
        if h.blocked.iter().any(|r| r.matches(&sender.address)) {
            return Some((
                Reason::BlockedSender,
                format!("{} is on the block list", sender.address),
            ));
        }
        if desk.blocked.iter().any(|r| r.matches(&sender.address)) {
            return Some((
                Reason::BlockedSender,
                format!("{} is on desk {}'s block list", sender.address, desk.key),
            ));
        }
    }
    match s.report_type.as_deref() {
        Some("delivery-status") => {
            return Some((
                Reason::DeliveryStatusNotification,
                "a delivery status notification (multipart/report; report-type=delivery-status)"
                    .into(),
            ));
        }
        Some("feedback-report") => {
            return Some((
                Reason::FeedbackReport,
                "an abuse or feedback report (multipart/report; report-type=feedback-report)"
                    .into(),
            ));
        }
        Some(other) => {
            return Some((
                Reason::AutoSubmitted,
                format!("an automatic report (multipart/report; report-type={other})"),
            ));
        }
        None => {}
    }
    if s.bounce {
        return Some((
            Reason::DeliveryStatusNotification,
            "a delivery failure report".into(),
        ));
    }
    if s.null_return_path {
        return Some((
            Reason::DeliveryStatusNotification,
            "the envelope sender is empty (Return-Path: <>), as for bounces".into(),
        ));
    }
    if s.from_mail_system || sender.is_some_and(|p| p.address.is_mailer_daemon()) {
        return Some((
            Reason::DeliveryStatusNotification,
            "the sender is a mail system (MAILER-DAEMON, postmaster)".into(),
        ));
    }
    // Automatic mail, unless the sender is on an allow list.
    if let Some(p) = sender
        && (h.allowed.iter().any(|r| r.matches(&p.address))
            || desk.allowed.iter().any(|r| r.matches(&p.address)))
    {
        return None;
    }
    if let Some(v) = &s.auto_submitted
        && v != "no"
    {
        return Some((
            Reason::AutoSubmitted,
            format!("Auto-Submitted: {v} (RFC 3834)"),
        ));
    }
    if let Some(marker) = &s.autoreply_marker {
        return Some((
            Reason::AutoSubmitted,
            format!("the message carries an auto-reply marker ({marker})"),
        ));
    }
    if let Some(v) = &s.auto_response_suppress {
        let lower = v.to_ascii_lowercase();
        if lower.contains("all") || lower.contains("oof") || lower.contains("autoreply") {
            return Some((
                Reason::AutoSubmitted,
                format!("X-Auto-Response-Suppress: {v} marks automatic mail"),
            ));
        }
    }
    if let Some(p) = &s.precedence
        && matches!(p.as_str(), "bulk" | "junk" | "list")
    {
        return Some((Reason::BulkPrecedence, format!("Precedence: {p}")));
    }
    if h.ignore_mailing_lists && (s.list_id.is_some() || s.list_unsubscribe) {
        return Some((
            Reason::MailingList,
            match &s.list_id {
                Some(id) => format!("mail from the mailing list {id}"),
                None => "mail from a mailing list (List-Unsubscribe)".into(),
            },
        ));
    }
    None
}

struct RequesterOutcome {
    account: AccountOutcome,
    new_status: Option<AccountStatus>,
    reason: Reason,
    explanation: String,
    /// Hold the request for verification.
    hold: bool,
    email: Option<EmailKind>,
}

/// `on_open_thread`: the sender is on an open request this message replies to. A
/// pending account (a participant added before confirming) may comment there: they were
/// put on the conversation, and holding their reply would hide it from it.
fn requester(
    sender: &Person,
    desk: &Desk,
    access: &SiteAccess,
    is_agent: bool,
    on_open_thread: bool,
    now: i64,
) -> Result<RequesterOutcome, (Reason, String)> {
    let addr = &sender.address;
    let restricted = desk.channel_access == ChannelAccess::Restricted;
    if let Some(acc) = &sender.account {
        if acc.status == AccountStatus::Deactivated {
            return Err((
                Reason::AccountDeactivated,
                format!("the account {addr} is deactivated"),
            ));
        }
        if is_agent {
            return Ok(existing(
                Reason::Agent,
                format!("{addr} is an agent of desk {}", desk.key),
            ));
        }
        if restricted && !acc.desk_customer {
            return Err((
                Reason::NotDeskCustomer,
                format!(
                    "desk {} is restricted and {addr} is not one of its customers",
                    desk.key
                ),
            ));
        }
        if acc.status == AccountStatus::Pending && !on_open_thread {
            let due = acc
                .last_verification_sent_at
                .is_none_or(|t| now - t >= access.verification_resend_secs);
            return Ok(RequesterOutcome {
                account: AccountOutcome::Existing,
                new_status: None,
                reason: Reason::PendingVerification,
                explanation: if due {
                    format!("{addr} has a pending account; the verification link is sent again")
                } else {
                    format!("{addr} has a pending account; a verification link was sent recently")
                },
                hold: true,
                email: due.then_some(EmailKind::Verification),
            });
        }
        let how = if restricted {
            format!("a customer of restricted desk {}", desk.key)
        } else {
            format!("an existing {} account", acc.kind.as_str())
        };
        return Ok(existing(
            Reason::ExistingAccount,
            format!("{addr} has {how}"),
        ));
    }
    if is_agent {
        return Ok(RequesterOutcome {
            account: AccountOutcome::None,
            new_status: None,
            reason: Reason::Agent,
            explanation: format!("{addr} is an agent of desk {}", desk.key),
            hold: false,
            email: None,
        });
    }
    if restricted {
        return Err((
            Reason::NotDeskCustomer,
            format!(
                "desk {} is restricted to its customers and never creates accounts; {addr} has none",
                desk.key
            ),
        ));
    }
    if access.signup == Signup::Closed {
        return Err((
            Reason::SignupClosed,
            format!("{addr} has no account and signup from email is closed"),
        ));
    }
    let (kind, why) = site_account_kind(access, addr)?;
    let account = match kind {
        AccountKind::Internal => AccountOutcome::CreateInternal,
        AccountKind::PortalOnly => AccountOutcome::CreatePortalOnly,
    };
    let reason = match kind {
        AccountKind::Internal => Reason::ApprovedDomain,
        AccountKind::PortalOnly => Reason::ExternalDomainAllowed,
    };
    if access.signup == Signup::Verify && addr.is_no_reply() {
        // No link can reach it: a pending account would wait for nobody and its request
        // expire unseen.
        return Err((
            Reason::NoReplyAddress,
            format!(
                "{why}, but {addr} is a no-reply address: it cannot confirm a verification link, so under signup = verify no account is created and no request opened"
            ),
        ));
    }
    Ok(match access.signup {
        Signup::Verify => RequesterOutcome {
            account,
            new_status: Some(AccountStatus::Pending),
            reason,
            explanation: format!(
                "{why}; signup is verify, so the account is created pending and a verification link is sent"
            ),
            hold: true,
            email: Some(EmailKind::Verification),
        },
        // Closed was handled above; Open creates the account at once.
        Signup::Open | Signup::Closed => RequesterOutcome {
            account,
            new_status: Some(AccountStatus::Active),
            reason,
            explanation: format!(
                "{why}; signup is open, so the account is created with an invitation"
            ),
            hold: false,
            email: Some(EmailKind::Invitation),
        },
    })
}

fn existing(reason: Reason, explanation: String) -> RequesterOutcome {
    RequesterOutcome {
        account: AccountOutcome::Existing,
        new_status: None,
        reason,
        explanation,
        hold: false,
        email: None,
    }
}

/// What kind of account site customer access allows for a new address, or why none.
/// Approved domains take precedence over everything about external customers.
fn site_account_kind(
    access: &SiteAccess,
    addr: &EmailAddress,
) -> Result<(AccountKind, String), (Reason, String)> {
    let domain = addr.domain();
    if access.is_approved(domain) {
        return Ok((
            AccountKind::Internal,
            format!("{domain} is an approved domain, so {addr} gets an internal account"),
        ));
    }
    if !access.portal_only_accounts {
        return Err((
            Reason::PortalOnlyDisabled,
            format!("{domain} is not an approved domain and portal-only accounts are switched off"),
        ));
    }
    if !access.external_domains.is_empty()
        && !crate::address::any_matches(&access.external_domains, domain)
    {
        return Err((
            Reason::DomainNotAllowed,
            format!("{domain} is neither an approved domain nor in external_domains"),
        ));
    }
    Ok((
        AccountKind::PortalOnly,
        format!("{domain} may have portal-only accounts, so {addr} gets one"),
    ))
}

struct ParticipantContext<'a> {
    policy: &'a Policy,
    desk: &'a Desk,
    sender: &'a EmailAddress,
    sender_is_agent: bool,
    requester_orgs: &'a [String],
    thread: Option<&'a Thread>,
}

fn drop(p: &Person, reason: Reason, explanation: String) -> ParticipantDecision {
    ParticipantDecision {
        address: p.address.clone(),
        display_name: p.display_name.clone(),
        outcome: ParticipantOutcome::Drop,
        new_status: None,
        reason,
        explanation,
    }
}

fn keep(
    p: &Person,
    outcome: ParticipantOutcome,
    new_status: Option<AccountStatus>,
    reason: Reason,
    explanation: String,
) -> ParticipantDecision {
    ParticipantDecision {
        address: p.address.clone(),
        display_name: p.display_name.clone(),
        outcome,
        new_status,
        reason,
        explanation,
    }
}

fn shares_organization(a: &[String], b: &[String]) -> Option<String> {
    a.iter().find(|o| b.contains(o)).cloned()
}

fn participant(
    p: &Person,
    ctx: &ParticipantContext<'_>,
    considered: &mut usize,
) -> ParticipantDecision {
    let addr = &p.address;
    let desk = ctx.desk;
    if let Some(d) = ctx.policy.desk_for_address(addr) {
        return drop(
            p,
            Reason::OwnAddress,
            format!("{addr} is an address of desk {}", d.key),
        );
    }
    if addr == ctx.sender {
        return drop(p, Reason::IsRequester, format!("{addr} sent the message"));
    }
    if let Some(t) = ctx.thread
        && &t.reporter == addr
    {
        return drop(p, Reason::IsRequester, format!("{addr} reported {}", t.key));
    }
    if p.agent {
        return drop(
            p,
            Reason::Agent,
            format!("{addr} is an agent of desk {}", desk.key),
        );
    }
    *considered += 1;
    let cap = ctx.policy.hygiene.max_participants;
    if *considered > cap {
        return drop(
            p,
            Reason::TooManyParticipants,
            format!("only the first {cap} To/Cc addresses are considered"),
        );
    }
    if desk.sharing == Sharing::None {
        return drop(
            p,
            Reason::SharingDisabled,
            format!("desk {} does not share requests with To/Cc", desk.key),
        );
    }
    // Before "already a participant": a deactivated account is never added, nor its
    // name taken from the message, even on a request it was on.
    if p.account
        .as_ref()
        .is_some_and(|a| a.status == AccountStatus::Deactivated)
    {
        return drop(
            p,
            Reason::AccountDeactivated,
            format!("the account {addr} is deactivated"),
        );
    }
    if let Some(t) = ctx.thread
        && t.participants.contains(addr)
    {
        return keep(
            p,
            ParticipantOutcome::AddExisting,
            None,
            Reason::AlreadyParticipant,
            format!("{addr} is already a participant of {}", t.key),
        );
    }
    let restricted = desk.channel_access == ChannelAccess::Restricted;
    let org_sharing = desk.sharing == Sharing::Organization && !ctx.sender_is_agent;
    if let Some(acc) = &p.account {
        if restricted && !acc.desk_customer {
            return drop(
                p,
                Reason::NotDeskCustomer,
                format!(
                    "desk {} is restricted and {addr} is not one of its customers",
                    desk.key
                ),
            );
        }
        if org_sharing {
            return match shares_organization(&acc.organizations, ctx.requester_orgs) {
                Some(org) => keep(
                    p,
                    ParticipantOutcome::AddExisting,
                    None,
                    Reason::SharedOrganization,
                    format!("{addr} shares organization {org} with the requester"),
                ),
                None => drop(
                    p,
                    Reason::NotInOrganization,
                    format!("{addr} shares no organization with the requester"),
                ),
            };
        }
        let (reason, why) = if ctx.sender_is_agent {
            (Reason::AddedByAgent, "an agent addressed them")
        } else {
            (Reason::SharingAny, "the desk shares with anyone addressed")
        };
        return keep(
            p,
            ParticipantOutcome::AddExisting,
            None,
            reason,
            format!("{addr} has an account and {why}"),
        );
    }
    // No account.
    if addr.is_no_reply() {
        return drop(
            p,
            Reason::NoReplyAddress,
            format!("{addr} is a no-reply address: no account is made for it"),
        );
    }
    if restricted {
        return drop(
            p,
            Reason::NotDeskCustomer,
            format!(
                "desk {} is restricted and never creates accounts; {addr} has none",
                desk.key
            ),
        );
    }
    if ctx.sender_is_agent {
        if !desk.agents_may_add_customers {
            return drop(
                p,
                Reason::AgentsMayNotAddCustomers,
                format!(
                    "{addr} has no account and agents of desk {} may not add new customers by email",
                    desk.key
                ),
            );
        }
    } else if desk.unknown_participants == UnknownParticipants::Drop {
        return drop(
            p,
            Reason::UnknownParticipantDropped,
            format!(
                "{addr} has no account and desk {} drops unknown participants",
                desk.key
            ),
        );
    }
    if org_sharing && shares_organization(&p.domain_organizations, ctx.requester_orgs).is_none() {
        return drop(
            p,
            Reason::NotInOrganization,
            format!("{addr} would not share an organization with the requester"),
        );
    }
    let access = &ctx.policy.access;
    if access.signup == Signup::Closed {
        return drop(
            p,
            Reason::SignupClosed,
            format!("{addr} has no account and signup from email is closed"),
        );
    }
    match site_account_kind(access, addr) {
        Err((reason, text)) => drop(p, reason, text),
        Ok((kind, why)) => {
            let outcome = match kind {
                AccountKind::Internal => ParticipantOutcome::CreateInternal,
                AccountKind::PortalOnly => ParticipantOutcome::CreatePortalOnly,
            };
            let status = match access.signup {
                Signup::Verify => AccountStatus::Pending,
                Signup::Open | Signup::Closed => AccountStatus::Active,
            };
            let reason = if ctx.sender_is_agent {
                Reason::AddedByAgent
            } else {
                Reason::UnknownParticipantCreated
            };
            keep(
                p,
                outcome,
                Some(status),
                reason,
                format!("{why}; an invitation is sent"),
            )
        }
    }
}

/// Exposed for the trust explanation in `explain --format text`.
pub fn trust_verdict(facts: &Facts, policy: &Policy) -> Option<TrustVerdict> {
    facts
        .sender
        .as_ref()
        .map(|s| sender_verdict(facts, policy, s.address.domain()))
}

/// Whether the sender is who the From says: confirmed by our link just now, or
/// authenticated by the receiving MTA.
fn sender_verdict(facts: &Facts, policy: &Policy, from_domain: &str) -> TrustVerdict {
    if facts.sender_confirmed {
        return TrustVerdict {
            authenticated: true,
            method: Some("link"),
            detail: "the address was confirmed with the link mailed to it".into(),
            dmarc_failed: false,
        };
    }
    trust::verdict(
        &policy.trust,
        from_domain,
        &facts.auth_results,
        &facts.signals.exchange_auth_as,
        policy.access.is_approved(from_domain),
    )
}

use serde_json::json;

use super::*;

fn groups(before: Value, after: Value) -> Vec<(Group, Option<String>, String, String)> {
    compare(&Summary::of(&before), &Summary::of(&after))
        .into_iter()
        .map(|(g, a, _, b, n)| (g, a, b, n))
        .collect()
}

fn new_request(account: &str, participants: Value, emails: Value) -> Value {
    json!({
        "action": "create_request", "reason": "new_request",
        "requester": {"address": "olga@outside.example", "account": account,
                      "new_status": "active", "reason": "external_domain_allowed"},
        "participants": participants,
        "emails": emails,
    })
}

fn rejected(reason: &str, participants: Value) -> Value {
    json!({
        "action": "reject", "reason": reason,
        "requester": {"address": "olga@outside.example", "account": "none", "reason": reason},
        "participants": participants,
        "emails": [],
    })
}

#[test]
fn the_same_decision_is_no_change() {
    let d = new_request(
        "create_portal_only",
        json!([{"address": "bob@acme.example", "outcome": "add_existing", "reason": "shared_organization"}]),
        json!([{"to": "olga@outside.example", "kind": "invitation"}]),
    );
    assert!(groups(d.clone(), d).is_empty());
}

#[test]
fn a_rejection_lists_the_request_the_account_the_participants_and_the_mail() {
    let before = new_request(
        "create_portal_only",
        json!([
            {"address": "bob@acme.example", "outcome": "add_existing", "reason": "shared_organization"},
            {"address": "it@desk.example", "outcome": "drop", "reason": "own_address"},
        ]),
        json!([{"to": "olga@outside.example", "kind": "invitation"}]),
    );
    let after = rejected(
        "not_desk_customer",
        json!([
            {"address": "bob@acme.example", "outcome": "drop", "reason": "message_not_processed"},
            {"address": "it@desk.example", "outcome": "drop", "reason": "own_address"},
        ]),
    );
    let olga = Some("olga@outside.example".to_string());
    let bob = Some("bob@acme.example".to_string());
    assert_eq!(
        groups(before.clone(), after.clone()),
        [
            (
                Group::RequestsRejected,
                olga.clone(),
                "create_request (new_request)".into(),
                "reject (not_desk_customer)".into()
            ),
            (
                Group::AccountsNotCreated,
                olga.clone(),
                "create_portal_only, active (external_domain_allowed)".into(),
                "none (not_desk_customer)".into()
            ),
            (
                Group::ParticipantsDropped,
                bob.clone(),
                "add_existing (shared_organization)".into(),
                "drop (message_not_processed)".into()
            ),
            (
                Group::MailNotSent,
                olga.clone(),
                "invitation".into(),
                "none".into()
            ),
        ]
    );
    // And the other way round.
    let back: Vec<Group> = groups(after, before).into_iter().map(|g| g.0).collect();
    assert_eq!(
        back,
        [
            Group::RequestsAccepted,
            Group::AccountsCreated,
            Group::ParticipantsAdded,
            Group::MailSent
        ]
    );
}

#[test]
fn held_participants_are_not_compared_and_suppressed_mail_counts_as_sent() {
    let before = json!({
        "action": "create_request", "reason": "new_request",
        "requester": {"address": "olga@outside.example", "account": "create_portal_only",
                      "new_status": "active", "reason": "external_domain_allowed"},
        "participants": [{"address": "bob@acme.example", "outcome": "add_existing", "reason": "shared_organization"}],
        "emails": [],
        "emails_suppressed": [{"to": "olga@outside.example", "kind": "invitation", "reason": "mail_rate_limited"}],
    });
    let after = json!({
        "action": "hold_for_verification", "reason": "pending_verification",
        "requester": {"address": "olga@outside.example", "account": "create_portal_only",
                      "new_status": "pending", "reason": "external_domain_allowed"},
        "participants": [{"address": "bob@acme.example", "outcome": "drop", "reason": "request_held"}],
        "emails": [{"to": "olga@outside.example", "kind": "verification"}],
    });
    let got: Vec<(Group, String, String)> = groups(before, after)
        .into_iter()
        .map(|(g, _, b, a)| (g, b, a))
        .collect();
    assert_eq!(
        got,
        [
            (
                Group::RequestsChanged,
                "create_request (new_request)".into(),
                "hold_for_verification (pending_verification)".into()
            ),
            (
                Group::AccountsChanged,
                "create_portal_only, active (external_domain_allowed)".into(),
                "create_portal_only, pending (external_domain_allowed)".into()
            ),
            (Group::MailNotSent, "invitation".into(), "none".into()),
            (Group::MailSent, "none".into(), "verification".into()),
        ]
    );
}

#[test]
fn since_takes_durations_and_dates() {
    assert_eq!(parse_since("30d", 100 * 86_400), Some(70 * 86_400));
    assert_eq!(parse_since("12h", 86_400), Some(43_200));
    assert_eq!(parse_since("1970-01-02", 0), Some(86_400));
    assert_eq!(parse_since("yesterday", 0), None);
}

#[test]
fn sqlite_paths_from_urls() {
    assert_eq!(
        sqlite_path("sqlite://var/intake.db?mode=rwc"),
        Some(std::path::PathBuf::from("var/intake.db"))
    );
    assert_eq!(
        sqlite_path("sqlite:/tmp/x.db"),
        Some(std::path::PathBuf::from("/tmp/x.db"))
    );
    assert_eq!(sqlite_path("sqlite::memory:"), None);
    assert_eq!(sqlite_path("postgres://db/intake"), None);
}

//! Every policy path through the real binary, on SQLite and on PostgreSQL: `explain`
//! prints the contract without side effects, `process` applies the same decision.

use serde_json::Value;

use crate::harness::*;

/// What a fixture must produce.
struct Expect<'a> {
    action: &'a str,
    reason: &'a str,
    account: &'a str,
    participants: &'a [(&'a str, &'a str, &'a str)],
    emails: &'a [(&'a str, &'a str)],
}

fn assert_decision(d: &Value, e: &Expect<'_>, context: &str) {
    assert_eq!(d["action"], e.action, "{context}: action in {d:#}");
    assert_eq!(d["reason"], e.reason, "{context}: reason in {d:#}");
    assert_eq!(
        d["requester"]["account"], e.account,
        "{context}: requester in {d:#}"
    );
    // Desk addresses on To/Cc are always dropped; the tables list them only where they
    // are the point of the test.
    let desk_addresses = ["it@desk.example", "help@desk.example", "hr@desk.example"];
    let mut got = participants(d);
    for (address, outcome, reason) in &got {
        if desk_addresses.contains(&address.as_str()) {
            assert_eq!(
                outcome, "drop",
                "{context}: desk address {address} in {d:#}"
            );
            assert_eq!(reason, "own_address", "{context}: desk address {address}");
        }
    }
    got.retain(|(a, _, _)| {
        !desk_addresses.contains(&a.as_str()) || e.participants.iter().any(|(x, _, _)| x == a)
    });
    assert_eq!(
        got,
        strings(e.participants),
        "{context}: participants in {d:#}"
    );
    let want: Vec<(String, String)> = e
        .emails
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(emails(d), want, "{context}: emails in {d:#}");
    assert!(
        d["explanation"].as_str().is_some_and(|s| !s.is_empty()),
        "{context}: no explanation"
    );
}

/// Explains `fixture` (which must change nothing), then processes it and checks that the
/// outcome recorded is the same decision.
fn explain_then_process(env: &Env, fixture_name: &str, e: &Expect<'_>) -> Value {
    let context = format!("{fixture_name} on {:?}", env.backend);
    let before_requests = env.requests().len();
    let before_accounts = env.account_addresses();
    let d = env.explain(fixture_name);
    assert_decision(&d, e, &format!("explain {context}"));
    assert_eq!(
        env.requests().len(),
        before_requests,
        "{context}: explain created a request"
    );
    assert_eq!(
        env.account_addresses(),
        before_accounts,
        "{context}: explain created an account"
    );

    let report = env.process(&[fixture_name]);
    assert_eq!(report["processed"], 1, "{context}: {report}");
    let outcome = &report["outcomes"][0];
    assert_eq!(
        outcome["action"], e.action,
        "{context}: process gave {report}"
    );
    assert_eq!(
        outcome["reason"], e.reason,
        "{context}: process gave {report}"
    );
    d
}

/// A new request from an internal sender, who gets an account and `emails`.
fn internal_account_created<'a>(emails: &'a [(&'a str, &'a str)]) -> Expect<'a> {
    Expect {
        action: "create_request",
        reason: "new_request",
        account: "create_internal",
        participants: &[],
        emails,
    }
}

fn env(backend: Backend) -> Env {
    Env::new(backend, &Site::default(), &DeskSettings::default())
}

#[test]
fn new_outsider_gets_portal_account_and_cc_is_dropped() {
    for backend in BACKENDS {
        let env = env(backend);
        explain_then_process(
            &env,
            "outsider-new.eml",
            &Expect {
                action: "create_request",
                reason: "new_request",
                account: "create_portal_only",
                participants: &[("bob@ext.example", "drop", "unknown_participant_dropped")],
                emails: &[("olga@outside.example", "invitation")],
            },
        );
        let requests = env.requests();
        assert_eq!(requests.len(), 1);
        assert_eq!(requests[0]["key"], "IT-1");
        assert_eq!(requests[0]["reporter"], "olga@outside.example");
        assert_eq!(requests[0]["status"], "open");
        let accounts = env.accounts();
        let olga = accounts
            .iter()
            .find(|a| a["address"] == "olga@outside.example")
            .expect("olga has an account");
        assert_eq!(olga["kind"], "portal_only");
        assert_eq!(olga["display_name"], "Olga Outsider");
        assert!(
            !env.account_addresses()
                .contains(&"bob@ext.example".to_string())
        );
        // The invitation was written by the file transport, with our headers.
        let files = env.outbox_files();
        assert_eq!(files.len(), 1, "{files:?}");
        let mail = std::fs::read_to_string(&files[0]).unwrap();
        assert!(mail.contains("To: olga@outside.example"), "{mail}");
        assert!(mail.contains("Auto-Submitted: auto-replied"), "{mail}");
        assert!(mail.contains("[IT-1]"));
        assert!(mail.contains(&format!("http://127.0.0.1:{}/verify/", env.http_port)));
    }
}

/// An alert from a no-reply address still opens a request; nobody reads mail sent
/// there, so its invitation is suppressed, and a no-reply Cc gets no account.
#[test]
fn a_no_reply_sender_opens_a_request_but_gets_no_mail() {
    for backend in BACKENDS {
        let env = env(backend);
        let d = explain_then_process(
            &env,
            "no-reply-sender.eml",
            &Expect {
                action: "create_request",
                reason: "new_request",
                account: "create_portal_only",
                participants: &[(
                    "no-reply+ops@alerts.vendor.example",
                    "drop",
                    "no_reply_address",
                )],
                emails: &[],
            },
        );
        assert_eq!(
            d["emails_suppressed"][0]["to"], "noreply@alerts.vendor.example",
            "{d:#}"
        );
        assert_eq!(d["emails_suppressed"][0]["reason"], "no_reply_address");
        assert_eq!(env.requests().len(), 1);
        assert!(
            !env.account_addresses()
                .contains(&"no-reply+ops@alerts.vendor.example".to_string())
        );
        assert_eq!(env.outbox_files(), Vec::<std::path::PathBuf>::new());
    }
}

#[test]
fn help_desk_ccs_an_outsider_and_no_account_is_minted() {
    for backend in BACKENDS {
        let env = env(backend);
        explain_then_process(
            &env,
            "helpdesk-cc-outsider.eml",
            &Expect {
                action: "create_request",
                reason: "new_request",
                account: "none",
                participants: &[
                    (
                        "olga@outside.example",
                        "drop",
                        "agents_may_not_add_customers",
                    ),
                    ("it@desk.example", "drop", "own_address"),
                    ("carol@corp.example", "drop", "agents_may_not_add_customers"),
                ],
                emails: &[],
            },
        );
        let addresses = env.account_addresses();
        assert!(
            !addresses.contains(&"olga@outside.example".to_string()),
            "{addresses:?}"
        );
        assert!(!addresses.contains(&"carol@corp.example".to_string()));
        assert!(env.outbox_files().is_empty());

        // The desk that wants it: agents may add customers.
        let env = Env::new(
            backend,
            &Site::default(),
            &DeskSettings {
                agents_may_add: true,
                ..DeskSettings::default()
            },
        );
        explain_then_process(
            &env,
            "helpdesk-cc-outsider.eml",
            &Expect {
                action: "create_request",
                reason: "new_request",
                account: "none",
                participants: &[
                    (
                        "olga@outside.example",
                        "create_portal_only",
                        "added_by_agent",
                    ),
                    ("it@desk.example", "drop", "own_address"),
                    ("carol@corp.example", "create_internal", "added_by_agent"),
                ],
                emails: &[
                    ("olga@outside.example", "invitation"),
                    ("carol@corp.example", "invitation"),
                ],
            },
        );
        let detail = env.request("IT-1");
        let parts: Vec<&str> = detail["participant_list"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["address"].as_str())
            .collect();
        assert_eq!(parts, ["carol@corp.example", "olga@outside.example"]);
    }
}

#[test]
fn trust_rule_on_internal_senders() {
    for backend in BACKENDS {
        let env = env(backend);
        explain_then_process(
            &env,
            "internal-authenticated.eml",
            &internal_account_created(&[("ida@corp.example", "invitation")]),
        );
        explain_then_process(
            &env,
            "internal-forged.eml",
            &Expect {
                action: "reject",
                reason: "unauthenticated_sender",
                account: "none",
                participants: &[],
                emails: &[],
            },
        );
        assert!(
            !env.account_addresses()
                .contains(&"ceo@corp.example".to_string())
        );
    }
}

/// A Microsoft 365 mailbox: Exchange Online writes its `Authentication-Results` without
/// an authserv-id. With `trust.microsoft365` the topmost such header is believed; a
/// sender's own, lower down, is not; without the setting none is.
#[test]
fn trust_rule_at_microsoft_365() {
    for backend in BACKENDS {
        let env = env(backend);
        let rejected = Expect {
            action: "reject",
            reason: "unauthenticated_sender",
            account: "none",
            participants: &[],
            emails: &[],
        };
        let d = env.explain("m365-authenticated.eml");
        assert_decision(&d, &rejected, "m365-authenticated.eml without microsoft365");
        let d = env.explain("m365-colleague.eml");
        assert_decision(&d, &rejected, "m365-colleague.eml without microsoft365");

        let text = std::fs::read_to_string(&env.config).unwrap();
        let on = text.replace("[trust]\n", "[trust]\nmicrosoft365 = true\n");
        assert_ne!(on, text, "no [trust] section to change");
        std::fs::write(&env.config, on).unwrap();
        explain_then_process(
            &env,
            "m365-authenticated.eml",
            &internal_account_created(&[("ida@corp.example", "invitation")]),
        );
        // A colleague in the same tenant: no passing header, Exchange Online's mark.
        explain_then_process(
            &env,
            "m365-colleague.eml",
            &internal_account_created(&[("carl@corp.example", "invitation")]),
        );
        let d = explain_then_process(&env, "m365-forged.eml", &rejected);
        assert!(
            d.to_string()
                .contains("Microsoft 365 reports DMARC fail for corp.example"),
            "{d:#}"
        );
    }
}

#[test]
fn hygiene_ignores_automatic_mail() {
    for backend in BACKENDS {
        let env = env(backend);
        for (fixture_name, reason) in [
            ("auto-reply.eml", "auto_submitted"),
            ("bulk.eml", "bulk_precedence"),
            ("bounce.eml", "delivery_status_notification"),
            ("own-address.eml", "own_address_sender"),
            ("loop.eml", "mail_loop"),
            ("no-from.eml", "no_valid_sender"),
        ] {
            explain_then_process(
                &env,
                fixture_name,
                &Expect {
                    action: "ignore",
                    reason,
                    account: "none",
                    participants: &[],
                    emails: &[],
                },
            );
        }
        assert!(env.requests().is_empty());
        assert!(
            env.outbox_files().is_empty(),
            "nothing is sent for ignored mail"
        );
    }
}

#[test]
fn sharing_and_unknown_participants() {
    type Outcomes = &'static [(&'static str, &'static str, &'static str)];
    let cases: [(&str, &str, Outcomes); 4] = [
        (
            "organization",
            "create",
            &[
                ("bea@acme.example", "add_existing", "shared_organization"),
                ("cy@other.example", "drop", "not_in_organization"),
                (
                    "dan@acme.example",
                    "create_portal_only",
                    "unknown_participant_created",
                ),
                ("eli@nowhere.example", "drop", "not_in_organization"),
            ],
        ),
        (
            "any",
            "drop",
            &[
                ("bea@acme.example", "add_existing", "sharing_any"),
                ("cy@other.example", "add_existing", "sharing_any"),
                ("dan@acme.example", "drop", "unknown_participant_dropped"),
                ("eli@nowhere.example", "drop", "unknown_participant_dropped"),
            ],
        ),
        (
            "any",
            "create",
            &[
                ("bea@acme.example", "add_existing", "sharing_any"),
                ("cy@other.example", "add_existing", "sharing_any"),
                (
                    "dan@acme.example",
                    "create_portal_only",
                    "unknown_participant_created",
                ),
                (
                    "eli@nowhere.example",
                    "create_portal_only",
                    "unknown_participant_created",
                ),
            ],
        ),
        (
            "none",
            "create",
            &[
                ("bea@acme.example", "drop", "sharing_disabled"),
                ("cy@other.example", "drop", "sharing_disabled"),
                ("dan@acme.example", "drop", "sharing_disabled"),
                ("eli@nowhere.example", "drop", "sharing_disabled"),
            ],
        ),
    ];
    for backend in BACKENDS {
        for (sharing, unknown, want) in cases {
            let env = Env::new(
                backend,
                &Site::default(),
                &DeskSettings {
                    sharing,
                    unknown,
                    ..DeskSettings::default()
                },
            );
            let created: Vec<(&str, &str)> = want
                .iter()
                .filter(|(_, o, _)| o.starts_with("create"))
                .map(|(a, _, _)| (*a, "invitation"))
                .collect();
            explain_then_process(
                &env,
                "cc-colleagues.eml",
                &Expect {
                    action: "create_request",
                    reason: "new_request",
                    account: "existing",
                    participants: want,
                    emails: &created,
                },
            );
            let detail = env.request("IT-1");
            let mut added: Vec<String> = detail["participant_list"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|p| p["address"].as_str().map(String::from))
                .collect();
            added.sort();
            let mut expected: Vec<String> = want
                .iter()
                .filter(|(_, o, _)| *o != "drop")
                .map(|(a, _, _)| a.to_string())
                .collect();
            expected.sort();
            assert_eq!(added, expected, "{sharing}/{unknown} on {backend:?}");
            // A new account joins the organization of its domain.
            if unknown == "create" && sharing != "none" {
                let dan = env.json(&["accounts", "show", "dan@acme.example", "--json"]);
                assert_eq!(dan["organizations"][0], "Acme", "{dan:#}");
            }
        }
    }
}

#[test]
fn replies_become_comments_only_for_people_on_the_request() {
    for backend in BACKENDS {
        let env = env(backend);
        env.process(&["outsider-new.eml"]);
        explain_then_process(
            &env,
            "reply-by-reporter.eml",
            &Expect {
                action: "add_comment",
                reason: "reply_to_request",
                account: "existing",
                participants: &[("fay@outside.example", "drop", "unknown_participant_dropped")],
                emails: &[],
            },
        );
        let d = explain_then_process(
            &env,
            "reply-stranger-subject-key.eml",
            &Expect {
                action: "create_request",
                reason: "new_request",
                account: "create_portal_only",
                participants: &[],
                emails: &[("mallory@evil.example", "invitation")],
            },
        );
        assert!(
            d["explanation"]
                .as_str()
                .unwrap()
                .contains("not on that request")
        );
        let d = explain_then_process(
            &env,
            "reply-reporter-subject-key.eml",
            &Expect {
                action: "add_comment",
                reason: "reply_to_request",
                account: "existing",
                participants: &[],
                emails: &[],
            },
        );
        assert_eq!(d["request"], "IT-1");
        let it1 = env.request("IT-1");
        let authors: Vec<&str> = it1["comment_list"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c["author"].as_str())
            .collect();
        assert_eq!(authors, ["olga@outside.example", "olga@outside.example"]);
        assert_eq!(env.request("IT-2")["reporter"], "mallory@evil.example");
    }
}

#[test]
fn site_customer_access_settings() {
    for backend in BACKENDS {
        let closed = Env::new(
            backend,
            &Site {
                signup: "closed",
                ..Site::default()
            },
            &DeskSettings::default(),
        );
        explain_then_process(
            &closed,
            "outsider-new.eml",
            &Expect {
                action: "reject",
                reason: "signup_closed",
                account: "none",
                participants: &[("bob@ext.example", "drop", "message_not_processed")],
                emails: &[],
            },
        );
        // Existing accounts still get in when signup is closed.
        explain_then_process(
            &closed,
            "cc-colleagues.eml",
            &Expect {
                action: "create_request",
                reason: "new_request",
                account: "existing",
                participants: &[
                    ("bea@acme.example", "add_existing", "shared_organization"),
                    ("cy@other.example", "drop", "not_in_organization"),
                    ("dan@acme.example", "drop", "unknown_participant_dropped"),
                    ("eli@nowhere.example", "drop", "unknown_participant_dropped"),
                ],
                emails: &[],
            },
        );

        let verify = Env::new(
            backend,
            &Site {
                signup: "verify",
                ..Site::default()
            },
            &DeskSettings::default(),
        );
        explain_then_process(
            &verify,
            "outsider-new.eml",
            &Expect {
                action: "hold_for_verification",
                reason: "pending_verification",
                account: "create_portal_only",
                participants: &[("bob@ext.example", "drop", "request_held")],
                emails: &[("olga@outside.example", "verification")],
            },
        );
        let requests = verify.requests();
        assert_eq!(requests[0]["status"], "held");
        let olga = verify.json(&["accounts", "show", "olga@outside.example", "--json"]);
        assert_eq!(olga["status"], "pending");
        // Writing again soon: held again, no second link.
        explain_then_process(
            &verify,
            "pending-followup.eml",
            &Expect {
                action: "hold_for_verification",
                reason: "pending_verification",
                account: "existing",
                participants: &[],
                emails: &[],
            },
        );

        let no_portal = Env::new(
            backend,
            &Site {
                portal_only: false,
                ..Site::default()
            },
            &DeskSettings::default(),
        );
        explain_then_process(
            &no_portal,
            "outsider-new.eml",
            &Expect {
                action: "reject",
                reason: "portal_only_disabled",
                account: "none",
                participants: &[("bob@ext.example", "drop", "message_not_processed")],
                emails: &[],
            },
        );

        let partners = Env::new(
            backend,
            &Site {
                external: &["partner.example"],
                ..Site::default()
            },
            &DeskSettings::sharing_any(),
        );
        explain_then_process(
            &partners,
            "outsider-new.eml",
            &Expect {
                action: "reject",
                reason: "domain_not_allowed",
                account: "none",
                participants: &[("bob@ext.example", "drop", "message_not_processed")],
                emails: &[],
            },
        );
        explain_then_process(
            &partners,
            "partner.eml",
            &Expect {
                action: "create_request",
                reason: "new_request",
                account: "create_portal_only",
                participants: &[
                    (
                        "quinn@partner.example",
                        "create_portal_only",
                        "unknown_participant_created",
                    ),
                    ("rob@outside.example", "drop", "domain_not_allowed"),
                ],
                emails: &[
                    ("pat@partner.example", "invitation"),
                    ("quinn@partner.example", "invitation"),
                ],
            },
        );
    }
}

#[test]
fn deactivated_and_restricted() {
    for backend in BACKENDS {
        let env = env(backend);
        explain_then_process(
            &env,
            "deactivated.eml",
            &Expect {
                action: "reject",
                reason: "account_deactivated",
                account: "none",
                participants: &[],
                emails: &[],
            },
        );
        explain_then_process(
            &env,
            "restricted-stranger.eml",
            &Expect {
                action: "reject",
                reason: "not_desk_customer",
                account: "none",
                participants: &[],
                emails: &[],
            },
        );
        explain_then_process(
            &env,
            "restricted-customer.eml",
            &Expect {
                action: "create_request",
                reason: "new_request",
                account: "existing",
                participants: &[("olga@outside.example", "drop", "not_desk_customer")],
                emails: &[],
            },
        );
        let keys: Vec<String> = env
            .requests()
            .iter()
            .filter_map(|r| r["key"].as_str().map(String::from))
            .collect();
        assert_eq!(keys, ["HR-1"]);
        assert!(
            !env.account_addresses()
                .contains(&"olga@outside.example".to_string())
        );
    }
}

#[test]
fn duplicates_unparseable_attachments_and_encodings() {
    for backend in BACKENDS {
        let env = env(backend);
        env.process(&["outsider-new.eml"]);
        let again = env.process(&["outsider-new.eml"]);
        assert_eq!(
            again["outcomes"][0]["reason"], "duplicate_message",
            "{again}"
        );
        assert_eq!(env.requests().len(), 1);
        assert_eq!(
            env.explain("outsider-new.eml")["reason"],
            "duplicate_message"
        );

        let q = env.process(&["unparseable.eml"]);
        assert_eq!(q["outcomes"][0]["action"], "quarantine", "{q}");
        assert_eq!(q["outcomes"][0]["reason"], "unparseable");
        let listed = env.json(&["quarantine", "list", "--json"]);
        assert_eq!(listed[0]["reason"], "unparseable", "{listed}");
        let kept = listed[0]["quarantine_ref"].as_str().unwrap();
        assert_eq!(
            std::fs::read(kept).unwrap(),
            std::fs::read(fixture("unparseable.eml")).unwrap(),
            "the quarantined copy is the message"
        );

        let d = env.explain("attachment.eml");
        assert_eq!(d["desk"], "IT", "routed by Delivered-To: {d:#}");
        env.process(&["attachment.eml"]);
        let req = env.request("IT-2");
        assert_eq!(req["subject"], "Screenshot of the érror");
        assert_eq!(req["attachments"][0]["filename"], "screen shot.pdf");
        assert_eq!(req["attachments"][0]["content_type"], "application/pdf");
        assert!(
            req["description"].as_str().unwrap().contains("attached"),
            "{req:#}"
        );
        assert!(!req["description"].as_str().unwrap().contains("<b>"));

        let d = env.explain("encoded-names.eml");
        assert_eq!(d["requester"]["address"], "juergen.mueller@outside.example");
        assert_eq!(d["requester"]["display_name"], "Jürgen Müller");
        assert_eq!(
            participants(&d),
            strings(&[
                ("it@desk.example", "drop", "own_address"),
                (
                    "john.smith@outside.example",
                    "drop",
                    "unknown_participant_dropped"
                ),
                (
                    "renee@outside.example",
                    "drop",
                    "unknown_participant_dropped"
                ),
            ])
        );
    }
}

#[test]
fn audit_answers_why_someone_has_an_account() {
    for backend in BACKENDS {
        let env = env(backend);
        env.process(&["outsider-new.eml", "reply-by-reporter.eml"]);
        let history = env.json(&["audit", "olga@outside.example", "--json"]);
        let rows = history.as_array().unwrap();
        assert!(
            rows.iter().any(|r| r["role"] == "requester"
                && r["outcome"] == "create_portal_only"
                && r["address_reason"] == "external_domain_allowed"),
            "{history:#}"
        );
        assert!(rows.iter().any(|r| r["action"] == "add_comment"));
        let bob = env.json(&["audit", "bob@ext.example", "--json"]);
        assert_eq!(bob[0]["outcome"], "drop");
        assert_eq!(bob[0]["address_reason"], "unknown_participant_dropped");
    }
}

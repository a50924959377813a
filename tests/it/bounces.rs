//! Bounces of our own mail, end to end: the invitation intake sent comes back as a
//! delivery report; a permanent failure marks the account undeliverable (no more mail
//! to it), a temporary one counts; a forged report about mail we never sent changes
//! nothing.

use crate::harness::*;

fn header(raw: &str, name: &str) -> String {
    raw.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(':'))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no {name} in:\n{raw}"))
}

/// A standard delivery status notification (RFC 3464) for `recipient`.
fn dsn(name: &str, recipient: &str, status: &str, original_id: &str) -> String {
    format!(
        "Return-Path: <>\r\nFrom: Mail Delivery System <MAILER-DAEMON@mx.outside.example>\r\n\
         To: it@desk.example\r\nSubject: Undelivered Mail Returned to Sender\r\n\
         Message-ID: <{name}@mx.outside.example>\r\nAuto-Submitted: auto-replied\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\r\n\r\n\
         --B\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n\r\n\
         --B\r\nContent-Type: message/delivery-status\r\n\r\n\
         Reporting-MTA: dns; mx.outside.example\r\n\r\n\
         Final-Recipient: rfc822; {recipient}\r\nAction: failed\r\nStatus: {status}\r\n\
         Diagnostic-Code: smtp; {code} {status} mailbox problem\r\n\r\n\
         --B\r\nContent-Type: text/rfc822-headers\r\n\r\n\
         From: it@desk.example\r\nTo: {recipient}\r\nMessage-ID: <{original_id}>\r\n\
         Subject: Welcome\r\n\r\n--B--\r\n",
        code = if status.starts_with('5') { 550 } else { 452 },
    )
}

fn process_raw(env: &Env, name: &str, raw: &str) -> serde_json::Value {
    let path = env.path(&format!("{name}.eml"));
    std::fs::write(&path, raw).unwrap();
    env.json(&["process", "--json", path.to_str().unwrap()])
}

/// Message-IDs of the invitations intake wrote, by recipient.
fn invitations(env: &Env) -> Vec<(String, String)> {
    env.outbox_files()
        .iter()
        .map(|p| {
            let raw = std::fs::read_to_string(p).unwrap();
            let id = header(&raw, "Message-ID");
            (
                header(&raw, "To"),
                id.trim_matches(|c| c == '<' || c == '>').to_string(),
            )
        })
        .collect()
}

#[test]
fn bounces_of_our_mail_mark_the_address() {
    for backend in BACKENDS {
        let env = Env::new(backend, &Site::default(), &DeskSettings::default());
        env.process(&["outsider-new.eml"]);
        let sent = invitations(&env);
        let (to, id) = sent
            .iter()
            .find(|(to, _)| to.contains("olga@outside.example"))
            .unwrap_or_else(|| panic!("no invitation to olga: {sent:?}"));
        assert!(to.contains("olga@outside.example"));

        // A forged report naming olga, about mail we never sent: nothing changes.
        let forged = process_raw(
            &env,
            "forged",
            &dsn(
                "forged",
                "olga@outside.example",
                "5.1.1",
                "made-up@intake.desk.example",
            ),
        );
        assert_eq!(forged["outcomes"][0]["action"], "ignore", "{forged:#}");
        assert_eq!(
            forged["outcomes"][0]["reason"],
            "delivery_status_notification"
        );
        let olga = env.json(&["accounts", "show", "olga@outside.example", "--json"]);
        assert!(olga["undeliverable_at"].is_null(), "{olga:#}");

        // A temporary failure of our invitation counts, and marks nothing.
        process_raw(
            &env,
            "soft",
            &dsn("soft", "olga@outside.example", "4.2.2", id),
        );
        let olga = env.json(&["accounts", "show", "olga@outside.example", "--json"]);
        assert_eq!(olga["soft_bounces"], 1, "{olga:#}");
        assert!(olga["undeliverable_at"].is_null());

        // A permanent one marks the address undeliverable, with the reason in the audit
        // and on the outbox row.
        process_raw(
            &env,
            "hard",
            &dsn("hard", "olga@outside.example", "5.1.1", id),
        );
        let olga = env.json(&["accounts", "show", "olga@outside.example", "--json"]);
        assert!(olga["undeliverable_at"].is_i64(), "{olga:#}");
        let audit = env.json(&["audit", "olga@outside.example", "--json"]);
        let text = audit.to_string();
        assert!(text.contains("bounce_permanent"), "{audit:#}");
        let outbox = env.json(&["outbox", "list", "--json"]);
        assert!(
            outbox.to_string().contains("bounced (permanent) 5.1.1"),
            "{outbox:#}"
        );

        // Her next request is taken, and nothing is mailed (the policy's side of
        // `undeliverable` is covered by the table tests in src/policy/tests.rs).
        let next = env.process(&["pending-followup.eml"]);
        assert_eq!(next["outcomes"][0]["action"], "create_request", "{next:#}");
        assert_eq!(next["mail_sent"], 0, "{next:#}");
        assert_eq!(invitations(&env).len(), sent.len(), "nothing more was sent");
    }
}

#[test]
fn a_bounced_verification_mail_marks_the_pending_account() {
    for backend in BACKENDS {
        let site = Site {
            signup: "verify",
            ..Site::default()
        };
        let env = Env::new(backend, &site, &DeskSettings::default());
        let first = env.process(&["outsider-new.eml"]);
        assert_eq!(
            first["outcomes"][0]["action"], "hold_for_verification",
            "{first:#}"
        );
        let sent = invitations(&env);
        let (_, id) = sent
            .iter()
            .find(|(to, _)| to.contains("olga@outside.example"))
            .unwrap_or_else(|| panic!("no verification mail to olga: {sent:?}"));
        let olga = env.json(&["accounts", "show", "olga@outside.example", "--json"]);
        assert_eq!(olga["status"], "pending", "{olga:#}");

        process_raw(
            &env,
            "hard",
            &dsn("hard", "olga@outside.example", "5.1.1", id),
        );
        // The pending account the link was for is the one marked: no more links go to
        // an address that cannot receive them.
        let olga = env.json(&["accounts", "show", "olga@outside.example", "--json"]);
        assert_eq!(olga["status"], "pending", "{olga:#}");
        assert!(olga["undeliverable_at"].is_i64(), "{olga:#}");
        let outbox = env.json(&["outbox", "list", "--json"]);
        let text = outbox.to_string();
        assert!(text.contains("verification"), "{outbox:#}");
        assert!(text.contains("bounced (permanent) 5.1.1"), "{outbox:#}");
    }
}

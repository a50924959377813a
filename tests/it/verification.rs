//! Verification and invitation mail end to end: a real SMTP server (aiosmtpd), the
//! confirmation page in headless Chromium, held requests released, expiry, SMTP outages,
//! rate limits and header injection.

use std::time::Duration;

use crate::browser::{Browser, http};
use crate::harness::*;
use crate::smtp::{Mode, Smtp, verification_link, wait_for_messages};

const WAIT: Duration = Duration::from_secs(30);

fn verify_site() -> Site {
    Site {
        signup: "verify",
        ..Site::default()
    }
}

fn drop_in_maildir(env: &Env, name: &str, raw: &[u8]) {
    let maildir = env.path("maildir");
    for d in ["new", "cur", "tmp"] {
        std::fs::create_dir_all(maildir.join(d)).unwrap();
    }
    std::fs::write(maildir.join("tmp").join(name), raw).unwrap();
    std::fs::rename(
        maildir.join("tmp").join(name),
        maildir.join("new").join(name),
    )
    .unwrap();
}

fn account(env: &Env, address: &str) -> serde_json::Value {
    env.json(&["accounts", "show", address, "--json"])
}

fn header<'a>(raw: &'a str, name: &str) -> Vec<&'a str> {
    let head = raw.split("\r\n\r\n").next().unwrap_or(raw);
    let head = head.split("\n\n").next().unwrap_or(head);
    head.lines()
        .filter(|l| {
            l.len() > name.len()
                && l[..name.len()].eq_ignore_ascii_case(name)
                && l.as_bytes()[name.len()] == b':'
        })
        .map(|l| l[name.len() + 1..].trim())
        .collect()
}

#[test]
fn browser_confirms_the_address_and_the_held_request_is_released() {
    for backend in BACKENDS {
        let smtp = Smtp::start(Mode::Plain, None);
        let env = Env::with_extra(
            backend,
            &verify_site(),
            &DeskSettings::sharing_any(),
            &smtp.toml(""),
        );
        let daemon = start_daemon(&env);
        drop_in_maildir(
            &env,
            "1.eml",
            &std::fs::read(fixture("outsider-new.eml")).unwrap(),
        );

        let mail = wait_for_messages(&smtp, 1, WAIT).remove(0);
        let text = String::from_utf8_lossy(&mail).to_string();
        assert_eq!(header(&text, "To"), ["olga@outside.example"], "{text}");
        // It answers her message (RFC 3834).
        assert_eq!(header(&text, "Auto-Submitted"), ["auto-replied"]);
        assert_eq!(header(&text, "X-Intake-Loop"), ["intake.desk.example"]);
        assert!(
            text.contains("multipart/alternative"),
            "text and HTML: {text}"
        );
        let link = verification_link(&mail).expect("a link in the mail");
        assert!(link.starts_with(&format!("http://127.0.0.1:{}/verify/", env.http_port)));

        assert_eq!(account(&env, "olga@outside.example")["status"], "pending");
        assert_eq!(env.request("IT-1")["status"], "held");
        // Before confirming she writes again, on the same thread, Cc'ing Carl (and Bob
        // again): it goes on her held request, and Carl waits to be decided with Bob.
        drop_in_maildir(
            &env,
            "2.eml",
            b"From: Olga Outsider <olga@outside.example>\r\nTo: it@desk.example\r\n\
              Cc: Carl <carl@ext.example>, bob@ext.example\r\nSubject: Re: Printer on fire\r\n\
              Message-ID: <outsider-2@mail.outside.example>\r\n\
              In-Reply-To: <outsider-1@mail.outside.example>\r\n\r\nIt spreads.\r\n",
        );
        daemon.wait_for("the follow-up on IT-1", WAIT, || {
            env.request("IT-1")["comments"] == 1
        });
        assert_eq!(env.request("IT-1")["status"], "held");

        let browser = Browser::start();
        browser.goto(&link);
        let page = browser.text();
        assert!(page.contains("Confirm your address"), "{page}");
        assert!(page.contains("olga@outside.example"), "{page}");
        // Opening the link (as a mail scanner would) changed nothing.
        assert_eq!(account(&env, "olga@outside.example")["status"], "pending");
        assert_eq!(env.request("IT-1")["status"], "held");

        browser.fill("#display_name", "Olga O.");
        browser.click("#confirm");
        let start = std::time::Instant::now();
        while !browser.text().contains("is confirmed") {
            assert!(start.elapsed() < WAIT, "{}", browser.text());
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(browser.text().contains("IT-1"), "{}", browser.text());

        let olga = account(&env, "olga@outside.example");
        assert_eq!(olga["status"], "active", "{olga:#}");
        assert_eq!(olga["display_name"], "Olga O.");
        let it1 = env.request("IT-1");
        assert_eq!(it1["status"], "open");
        // The Cc's are handled now, under the policy in force: Bob and Carl get accounts
        // and mail.
        let mut parts: Vec<&str> = it1["participant_list"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["address"].as_str())
            .collect();
        parts.sort();
        assert_eq!(parts, ["bob@ext.example", "carl@ext.example"]);
        let mails = wait_for_messages(&smtp, 3, WAIT);
        let mut invited: Vec<String> = mails[1..]
            .iter()
            .map(|m| {
                let text = String::from_utf8_lossy(m).to_string();
                assert!(text.contains("[IT-1]"), "{text}");
                header(&text, "To").concat()
            })
            .collect();
        invited.sort();
        assert_eq!(invited, ["bob@ext.example", "carl@ext.example"]);

        // The link is single use.
        let path = link.splitn(4, '/').nth(3).map(|p| format!("/{p}")).unwrap();
        let (status, _, body) = http(
            env.http_port,
            "POST",
            &path,
            Some(("application/x-www-form-urlencoded", b"display_name=Mallory")),
        );
        assert_eq!(status, 410, "{body}");
        assert!(body.contains("already used"));
        assert_eq!(
            account(&env, "olga@outside.example")["display_name"],
            "Olga O."
        );
        let audit = env.json(&["audit", "olga@outside.example", "--json"]);
        assert!(
            audit
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["action"] == "release"),
            "{audit:#}"
        );
        daemon.stop();
    }
}

#[test]
fn get_never_confirms_and_expired_or_unknown_links_say_so() {
    for backend in BACKENDS {
        let smtp = Smtp::start(Mode::Plain, None);
        let env = Env::with_extra(
            backend,
            &verify_site(),
            &DeskSettings::default(),
            &smtp.toml(""),
        );
        let text = std::fs::read_to_string(&env.config).unwrap().replace(
            "[customer_access]",
            "[customer_access]\nverification_ttl = \"2s\"\nhold_ttl = \"3s\"",
        );
        std::fs::write(&env.config, text).unwrap();
        let daemon = start_daemon(&env);
        drop_in_maildir(
            &env,
            "1.eml",
            &std::fs::read(fixture("outsider-new.eml")).unwrap(),
        );
        let mail = wait_for_messages(&smtp, 1, WAIT).remove(0);
        let link = verification_link(&mail).unwrap();
        let path = link.splitn(4, '/').nth(3).map(|p| format!("/{p}")).unwrap();
        for _ in 0..3 {
            let (status, head, body) = http(env.http_port, "GET", &path, None);
            assert_eq!(status, 200, "{body}");
            assert!(body.contains("<form method=\"post\""));
            assert!(
                head.to_ascii_lowercase()
                    .contains("referrer-policy: no-referrer")
            );
            assert!(
                head.contains("default-src 'none'"),
                "no external assets: {head}"
            );
        }
        assert_eq!(account(&env, "olga@outside.example")["status"], "pending");

        let (status, _, body) = http(env.http_port, "GET", "/verify/not-a-token", None);
        assert_eq!(status, 404);
        assert!(body.contains("not valid"));
        let (status, _, _) = http(
            env.http_port,
            "GET",
            &format!("/verify/{}", "a".repeat(64)),
            None,
        );
        assert_eq!(status, 404);

        std::thread::sleep(Duration::from_millis(2500));
        let (status, _, body) = http(env.http_port, "GET", &path, None);
        assert_eq!(status, 410);
        assert!(body.contains("expired"), "{body}");
        let (status, _, _) = http(
            env.http_port,
            "POST",
            &path,
            Some(("application/x-www-form-urlencoded", b"display_name=x")),
        );
        assert_eq!(status, 410);
        assert_eq!(account(&env, "olga@outside.example")["status"], "pending");
        daemon.stop();

        // Past hold_ttl the held request expires and the pending account goes, with an audit.
        std::thread::sleep(Duration::from_millis(1000));
        let expired = env.json(&["expire", "--json"]);
        assert_eq!(expired["requests"][0], "IT-1", "{expired}");
        assert_eq!(expired["accounts"][0], "olga@outside.example");
        assert_eq!(env.request("IT-1")["status"], "expired");
        let audit = env.json(&["audit", "olga@outside.example", "--json"]);
        assert!(
            audit
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["action"] == "expire"),
            "{audit:#}"
        );
        // Writing again starts over with a new pending account and link.
        let again = env.process(&["pending-followup.eml"]);
        assert_eq!(again["outcomes"][0]["action"], "hold_for_verification");
    }
}

/// A daemon under signup = verify that held the mail in `fixture_name` and sent its
/// sender a link: the relay (keep it alive), the environment, the daemon and the
/// link's path.
fn held_with_a_link(
    backend: Backend,
    desk: &DeskSettings,
    fixture_name: &str,
) -> (Smtp, Env, Daemon, String) {
    let smtp = Smtp::start(Mode::Plain, None);
    let env = Env::with_extra(backend, &verify_site(), desk, &smtp.toml(""));
    let daemon = start_daemon(&env);
    drop_in_maildir(
        &env,
        "1.eml",
        &std::fs::read(fixture(fixture_name)).unwrap(),
    );
    let mail = wait_for_messages(&smtp, 1, WAIT).remove(0);
    let link = verification_link(&mail).unwrap();
    let path = link.splitn(4, '/').nth(3).map(|p| format!("/{p}")).unwrap();
    (smtp, env, daemon, path)
}

/// The confirmation page lists the requests waiting, each ticked: one the person did
/// not send (written in their name while the link waited, Cc'ing someone) they untick,
/// and it stays held — nobody on it is invited — while the rest opens.
#[test]
fn a_request_unticked_on_the_confirmation_page_stays_held() {
    for backend in BACKENDS {
        let (smtp, env, daemon, path) =
            held_with_a_link(backend, &DeskSettings::sharing_any(), "outsider-new.eml");
        drop_in_maildir(
            &env,
            "2.eml",
            b"From: Olga Outsider <olga@outside.example>\r\nTo: it@desk.example\r\n\
              Cc: Vic Tim <vic@target.example>\r\nSubject: Please add my colleague\r\n\
              Message-ID: <forged-olga@evil.example>\r\n\r\nAdd them to everything.\r\n",
        );
        daemon.wait_for("the second held request", WAIT, || {
            env.requests().len() == 2
        });
        assert_eq!(env.request("IT-2")["status"], "held");

        let browser = Browser::start();
        browser.goto(&format!("http://127.0.0.1:{}{path}", env.http_port));
        let page = browser.text();
        assert!(page.contains("IT-1: Printer on fire"), "{page}");
        assert!(page.contains("IT-2: Please add my colleague"), "{page}");
        browser.click("input[name='open:IT-2']");
        browser.click("#confirm");
        let start = std::time::Instant::now();
        while !browser.text().contains("is confirmed") {
            assert!(start.elapsed() < WAIT, "{}", browser.text());
            std::thread::sleep(Duration::from_millis(50));
        }
        let page = browser.source();
        assert!(
            page.contains("<ul id=\"released\"><li>IT-1</li></ul>"),
            "{page}"
        );
        assert!(
            page.contains("<ul id=\"left-held\"><li>IT-2</li></ul>"),
            "{page}"
        );
        assert_eq!(env.request("IT-1")["status"], "open");
        assert_eq!(env.request("IT-2")["status"], "held");
        // A reply to the disowned request (the forger knows its Message-ID) does not
        // revive it: it opens a request of its own.
        drop_in_maildir(
            &env,
            "3.eml",
            b"From: Olga Outsider <olga@outside.example>\r\nTo: it@desk.example\r\n\
              Cc: Wes <wes@target.example>\r\nSubject: Re: Please add my colleague\r\n\
              Message-ID: <forged-olga-2@evil.example>\r\n\
              In-Reply-To: <forged-olga@evil.example>\r\n\r\nAnd them.\r\n",
        );
        daemon.wait_for("the reply as a request of its own", WAIT, || {
            env.requests().len() == 3
        });
        let it2 = env.request("IT-2");
        assert_eq!(it2["status"], "held", "{it2:#}");
        assert_eq!(it2["comments"], 0, "{it2:#}");
        // Bob, on IT-1, is invited, and Wes on the new request; Vic, on the unticked
        // one, gets nothing.
        wait_for_messages(&smtp, 3, WAIT);
        daemon.stop();
        let to: Vec<String> = smtp
            .messages()
            .iter()
            .map(|m| header(&String::from_utf8_lossy(m), "To").concat())
            .collect();
        assert!(to.iter().any(|t| t.contains("bob@ext.example")), "{to:?}");
        assert!(
            to.iter().any(|t| t.contains("wes@target.example")),
            "{to:?}"
        );
        assert!(
            !to.iter().any(|t| t.contains("vic@target.example")),
            "{to:?}"
        );
        let accounts = env.account_addresses();
        assert!(
            !accounts.contains(&"vic@target.example".to_string()),
            "{accounts:?}"
        );
    }
}

/// Under signup = verify, a new colleague from an approved domain (authenticated, or
/// they would be rejected) is held like anyone; confirming the link opens the request,
/// the link standing for the authentication the held message had.
#[test]
fn a_confirmed_colleague_from_an_approved_domain_gets_the_request_opened() {
    for backend in BACKENDS {
        let (_smtp, env, daemon, path) = held_with_a_link(
            backend,
            &DeskSettings::default(),
            "internal-authenticated.eml",
        );
        assert_eq!(env.request("IT-1")["status"], "held");
        let (status, _, body) = http(
            env.http_port,
            "POST",
            &path,
            Some(("application/x-www-form-urlencoded", b"display_name=Ida")),
        );
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("IT-1"), "{body}");
        daemon.stop();
        assert_eq!(env.request("IT-1")["status"], "open");
        let ida = account(&env, "ida@corp.example");
        assert_eq!(ida["status"], "active", "{ida:#}");
        assert_eq!(ida["kind"], "internal", "{ida:#}");
    }
}

/// A link to an account deactivated since it was sent confirms nothing: the page says
/// the address cannot be confirmed, the button does nothing, and the link is not used up.
#[test]
fn a_link_to_a_deactivated_account_confirms_nothing() {
    for backend in BACKENDS {
        let (_smtp, env, daemon, path) =
            held_with_a_link(backend, &DeskSettings::default(), "outsider-new.eml");
        env.json(&["accounts", "deactivate", "olga@outside.example", "--json"]);
        let (status, _, body) = http(env.http_port, "GET", &path, None);
        assert_eq!(status, 403, "{body}");
        assert!(body.contains("cannot be confirmed"), "{body}");
        assert!(!body.contains("<form"), "{body}");
        let (status, _, body) = http(
            env.http_port,
            "POST",
            &path,
            Some(("application/x-www-form-urlencoded", b"display_name=x")),
        );
        assert_eq!(status, 403, "{body}");
        daemon.stop();
        let olga = account(&env, "olga@outside.example");
        assert_eq!(olga["status"], "deactivated", "{olga:#}");
        assert!(olga["verified_at"].is_null(), "{olga:#}");
        assert_eq!(env.request("IT-1")["status"], "held");
    }
}

#[test]
fn smtp_down_then_up_loses_and_doubles_nothing() {
    for backend in BACKENDS {
        let mut smtp = Smtp::stopped(Mode::Plain);
        let env = Env::with_extra(
            backend,
            &verify_site(),
            &DeskSettings::default(),
            &smtp.toml(""),
        );
        let text = std::fs::read_to_string(&env.config)
            .unwrap()
            .replace("[outbox]", "[outbox]\nretry_first = \"1s\"");
        std::fs::write(&env.config, text).unwrap();
        let daemon = start_daemon(&env);
        drop_in_maildir(
            &env,
            "1.eml",
            &std::fs::read(fixture("outsider-new.eml")).unwrap(),
        );
        daemon.wait_for("a failed send", WAIT, || {
            env.json(&["outbox", "list", "--json"])
                .as_array()
                .is_some_and(|a| a.iter().any(|m| m["last_error"].is_string()))
        });
        smtp.launch();
        wait_for_messages(&smtp, 1, Duration::from_secs(60));
        std::thread::sleep(Duration::from_secs(3));
        let log = daemon.stop();
        assert_eq!(smtp.messages().len(), 1, "sent exactly once");
        let outbox = env.json(&["outbox", "list", "--json"]);
        assert_eq!(outbox[0]["status"], "sent", "{outbox:#}");
        assert!(outbox[0]["attempts"].as_i64().unwrap() >= 2);
        assert!(log.contains("the SMTP relay is unavailable"), "{log}");
    }
}

#[test]
fn starttls_and_implicit_tls_with_auth() {
    for backend in BACKENDS {
        for mode in [Mode::StartTls, Mode::Implicit] {
            let smtp = Smtp::start(mode, Some(("intake", "smtp-s3cret")));
            let env = Env::with_extra(
                backend,
                &verify_site(),
                &DeskSettings::default(),
                &smtp.toml(""),
            );
            let report = env.process(&["outsider-new.eml"]);
            let outbox = env.json(&["outbox", "list", "--json"]);
            assert_eq!(report["mail_sent"], 1, "{mode:?}: {report} {outbox:#}");
            let mails = smtp.messages();
            assert_eq!(mails.len(), 1, "{mode:?}");
            assert!(String::from_utf8_lossy(&mails[0]).contains("olga@outside.example"));
        }
        // A wrong password: the mail is retried later, not lost and not sent.
        let smtp = Smtp::start(Mode::StartTls, Some(("intake", "right")));
        let env = Env::with_extra(
            backend,
            &verify_site(),
            &DeskSettings::default(),
            &smtp.toml(""),
        );
        std::fs::write(smtp.dir.path().join("smtp-password"), "wrong").unwrap();
        let report = env.process(&["outsider-new.eml"]);
        assert_eq!(report["mail_sent"], 0);
        let outbox = env.json(&["outbox", "list", "--json"]);
        assert!(
            outbox[0]["last_error"]
                .as_str()
                .unwrap()
                .contains(&smtp.port.to_string()),
            "{outbox:#}"
        );
        assert!(smtp.messages().is_empty());
    }
}

/// Queues one verification mail per outsider `olga{i}` (processed without sending),
/// then sends them all in one `intake outbox send` pass.
fn queue_and_send(env: &Env, outsiders: std::ops::Range<usize>) {
    let paths: Vec<String> = outsiders
        .map(|i| {
            let path = env.path(&format!("olga-{i}.eml"));
            std::fs::write(
                &path,
                format!(
                    "From: Olga {i} <olga{i}@outside.example>\r\nTo: it@desk.example\r\n\
                     Subject: printer {i}\r\nMessage-ID: <olga-{i}@outside.example>\r\n\r\nhi\r\n"
                ),
            )
            .unwrap();
            path.to_str().unwrap().to_string()
        })
        .collect();
    let mut args = vec!["process", "--json", "--no-send"];
    args.extend(paths.iter().map(String::as_str));
    env.json(&args);
    let out = env.intake(&["outbox", "send"]);
    assert!(out.status.success(), "{out:?}");
}

/// Sent mail older than outbox.keep_sent is deleted by `intake expire` (and the daemon's
/// hourly pass); newer sent mail and mail not yet sent stay.
#[test]
fn expire_deletes_sent_mail_past_keep_sent_and_nothing_else() {
    for backend in BACKENDS {
        let env = Env::new(backend, &verify_site(), &DeskSettings::default());
        let text = std::fs::read_to_string(&env.config)
            .unwrap()
            .replace("[outbox]", "[outbox]\nkeep_sent = \"30d\"");
        std::fs::write(&env.config, text).unwrap();
        queue_and_send(&env, 0..3);
        let path = env.path("late.eml");
        std::fs::write(
            &path,
            "From: Late <late@outside.example>\r\nTo: it@desk.example\r\n\
             Subject: late\r\nMessage-ID: <late@outside.example>\r\n\r\nhi\r\n",
        )
        .unwrap();
        env.json(&["process", "--json", "--no-send", path.to_str().unwrap()]);
        let age = |to: &str| {
            let sql = format!(
                "UPDATE outbox SET sent_at = sent_at - 31 * 86400 WHERE to_address = '{to}'"
            );
            assert_eq!(env.sql(&sql), 1, "{backend:?}");
        };
        let left = || {
            let outbox = env.json(&["outbox", "list", "--json"]);
            let mut left: Vec<String> = outbox
                .as_array()
                .unwrap()
                .iter()
                .map(|m| format!("{} {}", m["to"].as_str().unwrap(), m["status"]))
                .collect();
            left.sort();
            left
        };

        // One went out 31 days ago: the daemon deletes it as it starts, and sends the
        // pending one.
        age("olga0@outside.example");
        let daemon = start_daemon(&env);
        daemon.wait_for("the old sent mail to go", WAIT, || {
            left().len() == 3 && daemon.log().contains("deleted sent mail")
        });
        daemon.stop();
        assert_eq!(
            left(),
            [
                "late@outside.example \"sent\"",
                "olga1@outside.example \"sent\"",
                "olga2@outside.example \"sent\""
            ],
            "{backend:?}"
        );

        // Another: `intake expire` deletes it.
        age("olga1@outside.example");
        let expired = env.json(&["expire", "--json"]);
        assert_eq!(expired["sent_mail_deleted"], 1, "{backend:?}: {expired}");
        assert_eq!(
            left(),
            [
                "late@outside.example \"sent\"",
                "olga2@outside.example \"sent\""
            ],
            "{backend:?}"
        );
        let again = env.json(&["expire", "--json"]);
        assert_eq!(again["sent_mail_deleted"], 0, "{backend:?}: {again}");
    }
}

/// An outbox pass sends its mail over one connection (TLS and AUTH once), up to
/// MAX_PER_CONNECTION mails, and a later pass opens a new one.
#[test]
fn one_connection_carries_an_outbox_pass() {
    for backend in BACKENDS {
        for mode in [Mode::Plain, Mode::StartTls, Mode::Implicit] {
            let smtp = Smtp::start(mode, Some(("intake", "smtp-s3cret")));
            let env = Env::with_extra(
                backend,
                &verify_site(),
                &DeskSettings::default(),
                &smtp.toml(""),
            );
            queue_and_send(&env, 0..4);
            assert_eq!(smtp.messages().len(), 4, "{mode:?}");
            assert_eq!(
                smtp.connections(),
                1,
                "{mode:?}: one connection for the pass"
            );
            // The next pass does not reuse the closed connection.
            queue_and_send(&env, 4..5);
            assert_eq!(smtp.messages().len(), 5, "{mode:?}");
            assert_eq!(smtp.connections(), 2, "{mode:?}");
            let outbox = env.json(&["outbox", "list", "--json"]);
            let rows = outbox.as_array().unwrap();
            assert_eq!(rows.len(), 5);
            assert!(rows.iter().all(|r| r["status"] == "sent"), "{outbox:#}");
        }
    }
}

/// A relay that refuses a session's third mail with 421 (its per-session limit): the
/// mail goes out at once on a new connection, not after the retry delay.
#[test]
fn a_relay_session_limit_costs_no_retry() {
    for backend in BACKENDS {
        let mut smtp = Smtp::stopped(Mode::Plain);
        smtp.per_session = 2;
        smtp.launch();
        let env = Env::with_extra(
            backend,
            &verify_site(),
            &DeskSettings::default(),
            &smtp.toml(""),
        );
        queue_and_send(&env, 0..5);
        assert_eq!(smtp.messages().len(), 5);
        assert_eq!(smtp.connections(), 3, "2 + 2 + 1 mails");
        let outbox = env.json(&["outbox", "list", "--json"]);
        for row in outbox.as_array().unwrap() {
            assert_eq!(row["status"], "sent", "{outbox:#}");
            assert_eq!(row["attempts"], 1, "{outbox:#}");
        }
    }
}

/// A relay that refuses our sender address (Postfix's smtpd_sender_login_maps, a login
/// that may not send as the desk) is misconfigured, the same for every mail: the mail
/// stays queued, the log says what to fix, and once it is fixed the mail goes out. It
/// used to be dead at once, as if the recipient had been refused.
#[test]
fn a_relay_refusing_our_sender_keeps_the_mail_queued() {
    for backend in BACKENDS {
        let mut smtp = Smtp::stopped(Mode::Plain);
        smtp.sender_reply =
            "553 5.7.1 <it@desk.example>: Sender address rejected: not owned by user intake".into();
        smtp.launch();
        let env = Env::with_extra(
            backend,
            &verify_site(),
            &DeskSettings::default(),
            &smtp.toml(""),
        );
        let text = std::fs::read_to_string(&env.config)
            .unwrap()
            .replace("[outbox]", "[outbox]\nretry_first = \"1s\"");
        std::fs::write(&env.config, text).unwrap();
        let path = fixture("outsider-new.eml").display().to_string();
        let out = env.intake(&["process", "--json", &path]);
        assert!(out.status.success(), "{out:?}");
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(log.contains("refuses our sender address"), "{log}");
        let outbox = env.json(&["outbox", "list", "--json"]);
        assert_eq!(outbox[0]["status"], "pending", "{outbox:#}");
        let error = outbox[0]["last_error"].as_str().unwrap();
        assert!(error.contains("MAIL FROM"), "{error}");
        assert!(error.contains("Sender address rejected"), "{error}");
        assert!(smtp.messages().is_empty());

        // The relay's configuration is fixed: the next pass after the retry time sends it.
        smtp.stop();
        smtp.sender_reply.clear();
        smtp.launch();
        std::thread::sleep(Duration::from_millis(2500));
        let out = env.intake(&["outbox", "send"]);
        assert!(out.status.success(), "{out:?}");
        assert_eq!(smtp.messages().len(), 1);
        let outbox = env.json(&["outbox", "list", "--json"]);
        assert_eq!(outbox[0]["status"], "sent", "{outbox:#}");
        assert_eq!(outbox[0]["attempts"], 2, "{outbox:#}");
    }
}

/// A recipient the relay refuses at RCPT TO (an unknown mailbox) is as undeliverable as
/// one a permanent bounce named: the verification mail is dead at once, and when she
/// writes again no new link is queued for her (without the mark one is, once the resend
/// interval has passed).
#[test]
fn a_recipient_the_relay_refuses_is_marked_undeliverable() {
    for backend in BACKENDS {
        let mut smtp = Smtp::stopped(Mode::Plain);
        smtp.refused_recipients = vec![(
            "olga@outside.example".into(),
            "550 5.1.1 <olga@outside.example>: Recipient address rejected: User unknown in \
             local recipient table"
                .into(),
        )];
        smtp.launch();
        let env = Env::with_extra(
            backend,
            &verify_site(),
            &DeskSettings::default(),
            &smtp.toml(""),
        );
        let text = std::fs::read_to_string(&env.config).unwrap().replace(
            "[customer_access]",
            "[customer_access]\nverification_resend_interval = \"1s\"",
        );
        std::fs::write(&env.config, text).unwrap();
        let to_olga = |env: &Env| -> Vec<serde_json::Value> {
            let outbox = env.json(&["outbox", "list", "--json"]);
            outbox
                .as_array()
                .unwrap()
                .iter()
                .filter(|m| m["to"] == "olga@outside.example")
                .cloned()
                .collect()
        };
        let first = env.process(&["outsider-new.eml"]);
        assert_eq!(
            first["outcomes"][0]["action"], "hold_for_verification",
            "{first:#}"
        );
        let mail = to_olga(&env);
        assert_eq!(mail.len(), 1, "{mail:#?}");
        assert_eq!(mail[0]["status"], "dead", "{mail:#?}");
        assert_eq!(mail[0]["attempts"], 1, "{mail:#?}");
        let error = mail[0]["last_error"].as_str().unwrap();
        assert!(error.contains("RCPT TO"), "{error}");
        assert!(error.contains("User unknown"), "{error}");
        let olga = account(&env, "olga@outside.example");
        assert!(olga["undeliverable_at"].is_i64(), "{olga:#}");

        std::thread::sleep(Duration::from_millis(1500));
        let next = env.process(&["pending-followup.eml"]);
        assert_eq!(to_olga(&env).len(), 1, "no new link: {next:#}");
        assert!(smtp.messages().is_empty());

        // The admin clears the mark (the mailbox exists after all): links are queued again.
        let cleared = env.json(&["accounts", "deliverable", "olga@outside.example", "--json"]);
        assert_eq!(cleared["changed"], true, "{cleared:#}");
        assert!(account(&env, "olga@outside.example")["undeliverable_at"].is_null());
        let again = env.json(&["accounts", "deliverable", "olga@outside.example", "--json"]);
        assert_eq!(again["changed"], false, "{again:#}");
        std::thread::sleep(Duration::from_millis(1500));
        let later = env.process(&["attachment.eml"]);
        assert_eq!(to_olga(&env).len(), 2, "a new link: {later:#}");
        let audit = env.json(&["audit", "olga@outside.example", "--json"]);
        assert!(audit.to_string().contains("mark_deliverable"), "{audit:#}");
    }
}

#[test]
fn header_injection_from_inbound_mail_goes_nowhere() {
    for backend in BACKENDS {
        let smtp = Smtp::start(Mode::Plain, None);
        let env = Env::with_extra(
            backend,
            &verify_site(),
            &DeskSettings::default(),
            &smtp.toml(""),
        );
        let path = env.path("evil.eml");
        std::fs::write(
            &path,
            "From: =?utf-8?q?Evil=0D=0ABcc=3A_victim=40else=2Eexample?= <olga@outside.example>\r\n\
         To: it@desk.example\r\n\
         Subject: =?utf-8?q?Hello=0D=0ABcc=3A_victim2=40else=2Eexample=0D=0A=0D=0Abody?=\r\n\
         Message-ID: <evil-1@outside.example>\r\n\r\nhi\r\n",
        )
        .unwrap();
        let report = env.json(&["process", "--json", path.to_str().unwrap()]);
        assert_eq!(report["mail_sent"], 1, "{report}");
        let mail = String::from_utf8_lossy(&smtp.messages()[0]).to_string();
        assert!(header(&mail, "Bcc").is_empty(), "{mail}");
        assert_eq!(
            header(&mail, "X-RcptTo"),
            ["olga@outside.example"],
            "one recipient: {mail}"
        );
        assert_eq!(header(&mail, "Subject").len(), 1);
        assert!(!mail.contains("victim@else.example\r\n"));
    }
}

#[test]
fn mail_rate_limits_per_recipient_and_per_hour() {
    for backend in BACKENDS {
        // Per recipient: a pending sender writing again and again gets one link a day.
        let env = Env::new(backend, &verify_site(), &DeskSettings::default());
        let text = std::fs::read_to_string(&env.config)
            .unwrap()
            .replace(
                "[customer_access]",
                "[customer_access]\nverification_resend_interval = \"0s\"",
            )
            .replace("[outbox]", "[outbox]\nmax_per_recipient_per_day = 1");
        std::fs::write(&env.config, text).unwrap();
        env.process(&["outsider-new.eml"]);
        let d = env.explain("pending-followup.eml");
        assert!(d["emails"].as_array().unwrap().is_empty(), "{d:#}");
        assert_eq!(
            d["emails_suppressed"][0]["reason"], "mail_rate_limited",
            "{d:#}"
        );
        env.process(&["pending-followup.eml"]);
        assert_eq!(
            env.json(&["outbox", "list", "--json"])
                .as_array()
                .unwrap()
                .len(),
            1
        );

        // Per hour: at most N links in total, whoever asks.
        let env = Env::new(backend, &verify_site(), &DeskSettings::default());
        let text = std::fs::read_to_string(&env.config)
            .unwrap()
            .replace("[outbox]", "[outbox]\nmax_per_hour = 2");
        std::fs::write(&env.config, text).unwrap();
        let report = env.process(&[
            "outsider-new.eml",
            "partner.eml",
            "reply-stranger-subject-key.eml",
        ]);
        assert_eq!(report["processed"], 3);
        assert_eq!(
            env.json(&["outbox", "list", "--json"])
                .as_array()
                .unwrap()
                .len(),
            2
        );
        // The third sender's account is still pending, its request held: writing again later works.
        assert_eq!(account(&env, "mallory@evil.example")["status"], "pending");
    }
}

#[test]
fn healthz_reports_database_and_mailboxes() {
    for backend in BACKENDS {
        let env = Env::new(backend, &Site::default(), &DeskSettings::default());
        let daemon = start_daemon(&env);
        daemon.wait_for("the HTTP server", WAIT, || {
            std::net::TcpStream::connect(("127.0.0.1", env.http_port)).is_ok()
        });
        daemon.wait_for("a healthy inbox", WAIT, || {
            let (status, _, body) = http(env.http_port, "GET", "/healthz", None);
            status == 200 && body.contains("\"inbox\"")
        });
        let (_, _, body) = http(env.http_port, "GET", "/healthz", None);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["status"], "ok");
        assert_eq!(v["database"]["ok"], true);
        assert_eq!(v["mailboxes"]["inbox"]["ok"], true);
        daemon.stop();
    }
}

#[test]
fn templates_can_be_overridden_by_files() {
    for backend in BACKENDS {
        let env = Env::new(backend, &verify_site(), &DeskSettings::default());
        let templates = env.path("templates");
        std::fs::create_dir_all(&templates).unwrap();
        std::fs::write(
        templates.join("verification.txt"),
        "Subject: Bitte bestätigen ({{desk_name}})\n\nHallo {{name}}, bitte hier klicken: {{link}}\n",
    )
    .unwrap();
        std::fs::write(
            templates.join("verification.html"),
            "<p>Hallo {{name}} &mdash; <a href=\"{{link}}\">bestätigen</a></p>",
        )
        .unwrap();
        let text = std::fs::read_to_string(&env.config).unwrap().replace(
            "[outbox]",
            &format!("[outbox]\ntemplates_dir = \"{}\"", templates.display()),
        );
        std::fs::write(&env.config, text).unwrap();
        env.process(&["encoded-names.eml"]);
        let file = env.outbox_files().remove(0);
        let raw = std::fs::read(&file).unwrap();
        let parsed = intake::message::parse(&raw).unwrap();
        assert_eq!(
            parsed.subject.as_deref(),
            Some("Bitte bestätigen (IT Service Desk)")
        );
        assert!(
            parsed
                .text_body
                .contains("Hallo Jürgen Müller, bitte hier klicken: http"),
            "{}",
            parsed.text_body
        );
        let text = String::from_utf8_lossy(&raw);
        assert!(text.contains("text/html"), "{text}");
        // A broken override is a configuration error, named with its file.
        std::fs::write(templates.join("invitation.txt"), "no subject line here").unwrap();
        let out = env.intake(&["check-config"]);
        assert_eq!(out.status.code(), Some(78));
        assert!(String::from_utf8_lossy(&out.stdout).contains("invitation.txt"));
    }
}

#[test]
fn a_pending_account_outlives_its_first_request_while_another_is_held() {
    for backend in BACKENDS {
        let env = Env::new(backend, &verify_site(), &DeskSettings::default());
        let text = std::fs::read_to_string(&env.config)
            .unwrap()
            .replace("[customer_access]", "[customer_access]\nhold_ttl = \"3s\"");
        std::fs::write(&env.config, text).unwrap();
        let first = env.process(&["outsider-new.eml"]);
        assert_eq!(first["outcomes"][0]["action"], "hold_for_verification");
        std::thread::sleep(Duration::from_millis(2000));
        let second = env.process(&["pending-followup.eml"]);
        assert_eq!(second["outcomes"][0]["action"], "hold_for_verification");
        std::thread::sleep(Duration::from_millis(1500));
        // The first hold is over; the account waits for the second.
        let expired = env.json(&["expire", "--json"]);
        assert_eq!(
            expired["requests"],
            serde_json::json!(["IT-1"]),
            "{expired}"
        );
        assert_eq!(expired["accounts"], serde_json::json!([]), "{expired}");
        assert_eq!(account(&env, "olga@outside.example")["status"], "pending");
        std::thread::sleep(Duration::from_millis(2000));
        let expired = env.json(&["expire", "--json"]);
        assert_eq!(
            expired["requests"],
            serde_json::json!(["IT-2"]),
            "{expired}"
        );
        assert_eq!(
            expired["accounts"],
            serde_json::json!(["olga@outside.example"])
        );
    }
}

/// A reply whose In-Reply-To names a message of an expired held request still finds the
/// open request whose key is in its subject.
#[test]
fn a_reply_naming_an_expired_request_falls_back_to_the_key_in_its_subject() {
    for backend in BACKENDS {
        let env = Env::new(backend, &verify_site(), &DeskSettings::default());
        let first = env.process(&["outsider-new.eml"]);
        assert_eq!(first["outcomes"][0]["action"], "hold_for_verification");
        env.sql("UPDATE requests SET held_until = 1 WHERE request_key = 'IT-1'");
        let expired = env.json(&["expire", "--json"]);
        assert_eq!(expired["requests"][0], "IT-1", "{expired}");
        // Olga's account is active now (as if confirmed later), and she opens IT-2.
        env.sql("UPDATE accounts SET status = 'active' WHERE address = 'olga@outside.example'");
        let write = |name: &str, text: &str| {
            let path = env.path(name);
            std::fs::write(&path, text).unwrap();
            env.json(&["process", "--json", path.to_str().unwrap()])
        };
        let second = write(
            "new.eml",
            "From: Olga <olga@outside.example>\r\nTo: it@desk.example\r\n\
             Subject: Scanner jammed\r\nMessage-ID: <outsider-5@mail.outside.example>\r\n\r\nhi\r\n",
        );
        assert_eq!(
            second["outcomes"][0]["action"], "create_request",
            "{second}"
        );
        assert_eq!(env.request("IT-2")["status"], "open");
        // Her reply quotes the old thread too.
        let reply = write(
            "reply.eml",
            "From: Olga <olga@outside.example>\r\nTo: it@desk.example\r\n\
             Subject: Re: [IT-2] Scanner jammed\r\nMessage-ID: <outsider-6@mail.outside.example>\r\n\
             In-Reply-To: <outsider-1@mail.outside.example>\r\n\r\nstill\r\n",
        );
        assert_eq!(reply["outcomes"][0]["action"], "add_comment", "{reply}");
        assert_eq!(env.request("IT-2")["comments"], 1);
        assert_eq!(env.requests().len(), 2);
    }
}

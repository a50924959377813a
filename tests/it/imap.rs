//! The IMAP source against a real Dovecot: IDLE and polling, every `after` mode,
//! quarantine (oversized without download, unparseable), UIDVALIDITY changes, a server
//! restart mid-backlog, refused logins, implicit TLS and STARTTLS.

use std::time::Duration;

use crate::dovecot::Dovecot;
use crate::harness::*;

const WAIT: Duration = Duration::from_secs(30);

fn message(i: usize, extra_headers: &str) -> Vec<u8> {
    format!(
        "From: Sender {i} <sender{i}@outside.example>\r\nTo: it@desk.example\r\n\
         Subject: Problem {i}\r\nMessage-ID: <imap-{i}@outside.example>\r\n{extra_headers}\r\n\
         Body of message {i}.\r\n"
    )
    .into_bytes()
}

fn env_with(dovecot: &Dovecot, backend: Backend, mailbox_extra: &str, extra: &str) -> Env {
    Env::with_extra(
        backend,
        &Site::default(),
        &DeskSettings::default(),
        &format!("{}\n{extra}", dovecot.mailbox_toml(mailbox_extra)),
    )
}

fn request_count(env: &Env) -> usize {
    env.json(&["requests", "list", "--json", "--limit", "100000"])
        .as_array()
        .map(Vec::len)
        .unwrap_or(0)
}

/// `total` messages in INBOX.
fn append_backlog(dovecot: &Dovecot, total: usize) {
    let mut imap = dovecot.client();
    for i in 0..total {
        imap.append("INBOX", &message(i, ""));
    }
    imap.logout();
}

/// One request per message of [`append_backlog`], none twice.
fn assert_each_message_once(env: &Env, total: usize) {
    let requests = env.json(&["requests", "list", "--json", "--limit", "100000"]);
    let mut subjects: Vec<&str> = requests
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["subject"].as_str())
        .collect();
    assert_eq!(subjects.len(), total, "one request per message");
    subjects.sort();
    subjects.dedup();
    assert_eq!(subjects.len(), total, "no message twice");
}

#[test]
fn idle_pushes_new_mail_and_seen_mode_flags_it() {
    for backend in BACKENDS {
        let dovecot = Dovecot::start();
        let mut imap = dovecot.client();
        imap.append("INBOX", &message(1, ""));
        // Polling every 10 minutes: only IDLE can deliver the second message in time.
        // The server may be silent for a second when a reply is due, not in IDLE. IDLE
        // is re-issued every second (RFC 2177: the server may drop an IDLE after 29
        // minutes; `idle_timeout` stays well inside), on the same connection.
        let env = env_with(
            &dovecot,
            backend,
            "poll_interval = \"10m\"\nreply_timeout = \"1s\"\nidle_timeout = \"1s\"",
            "",
        );
        let daemon = start_daemon_with(&env, &[("INTAKE_LOG", "info,intake::mailbox::imap=debug")]);
        daemon.wait_for("the backlog", WAIT, || request_count(&env) == 1);
        std::thread::sleep(Duration::from_millis(3500));
        imap.append("INBOX", &message(2, ""));
        daemon.wait_for("the message pushed by IDLE", WAIT, || {
            request_count(&env) == 2
        });
        daemon.wait_for("both flagged seen", WAIT, || imap.status("INBOX") == (2, 0));
        let log = daemon.stop();
        assert!(log.contains("idle=true"), "{log}");
        assert_eq!(log.matches("connected").count(), 1, "{log}");
        let idles = log.matches("waiting in IDLE").count();
        assert!(idles >= 3, "IDLE re-issued {idles} times in 3.5 s:\n{log}");
        assert!(
            !log.contains("mailbox connection failed"),
            "a quiet IDLE is not a silent server:\n{log}"
        );
        let state = env.json(&["requests", "list", "--json"]);
        assert_eq!(state[0]["reporter"], "sender2@outside.example");
    }
}

#[test]
fn polling_when_idle_is_off() {
    for backend in BACKENDS {
        let dovecot = Dovecot::start();
        let env = env_with(
            &dovecot,
            backend,
            "idle = false\npoll_interval = \"200ms\"",
            "",
        );
        let daemon = start_daemon(&env);
        let mut imap = dovecot.client();
        for i in 0..3 {
            imap.append("INBOX", &message(i, ""));
        }
        daemon.wait_for("three requests", WAIT, || request_count(&env) == 3);
        let log = daemon.stop();
        assert!(log.contains("idle=false"), "{log}");
    }
}

#[test]
fn move_and_delete_modes() {
    for backend in BACKENDS {
        let dovecot = Dovecot::start();
        let mut imap = dovecot.client();
        for i in 0..5 {
            imap.append("INBOX", &message(i, ""));
        }
        let env = env_with(&dovecot, backend, "after = \"move:Processed\"", "");
        let daemon = start_daemon(&env);
        daemon.wait_for("all moved to Processed", WAIT, || {
            imap.status("INBOX").0 == 0 && imap.status("Processed") == (5, 0)
        });
        daemon.stop();
        assert_eq!(request_count(&env), 5);

        // Deleting takes our own messages only (UID EXPUNGE, UIDPLUS): a message someone
        // flagged \Deleted in their mail client, not yet expunged, stays (a plain
        // EXPUNGE would take it too). It is older than our first start: not ours.
        let dovecot = Dovecot::start();
        let mut imap = dovecot.client();
        imap.append("INBOX", &message(99, ""));
        let mut other = dovecot.client();
        other.command("SELECT INBOX");
        other.command("UID STORE 1 +FLAGS (\\Deleted)");
        other.logout();
        let env = env_with(&dovecot, backend, "start = \"new\"\nafter = \"delete\"", "");
        let daemon = start_daemon(&env);
        daemon.wait_for("the mailbox to be watched", WAIT, || {
            daemon.log().contains("idle=true")
        });
        for i in 0..5 {
            imap.append("INBOX", &message(i, ""));
        }
        daemon.wait_for("all five processed and deleted", WAIT, || {
            request_count(&env) == 5 && imap.status("INBOX").0 <= 1
        });
        daemon.stop();
        assert_eq!(request_count(&env), 5);
        assert_eq!(imap.status("Quarantine").0, 0);
        assert_eq!(
            imap.status("INBOX").0,
            1,
            "the other client's \\Deleted message stays"
        );
        let mut other = dovecot.client();
        other.command("EXAMINE INBOX");
        let left = other.command("UID FETCH 1:* (UID FLAGS)").join("\n");
        assert!(
            left.contains("UID 1 ") && left.contains("\\Deleted"),
            "{left}"
        );
    }
}

/// Scattered UIDs (mail deleted by others in between) make long UID sets: every command
/// stays within the server's line limit (6,000 bytes here; RFC 7162 asks clients to keep
/// within 8,192). Before, a batch named all its UIDs in one FETCH and one MOVE.
#[test]
fn scattered_uids_stay_within_the_servers_line_limit() {
    for backend in BACKENDS {
        let dovecot = Dovecot::start();
        // Ten-digit UIDs, every other one expunged: 700 left, about 7,700 bytes as a set.
        dovecot.doveadm(&[
            "mailbox",
            "update",
            "-u",
            crate::dovecot::USER,
            "--min-next-uid",
            "1000000000",
            "INBOX",
        ]);
        append_backlog(&dovecot, 1400);
        let mut imap = dovecot.client();
        imap.command("SELECT INBOX");
        for first in (0..1400).step_by(200) {
            let evens: Vec<String> = (first..first + 200)
                .step_by(2)
                .map(|i| (1_000_000_000 + i).to_string())
                .collect();
            imap.command(&format!(
                "UID STORE {} +FLAGS.SILENT (\\Deleted)",
                evens.join(",")
            ));
        }
        imap.command("EXPUNGE");
        imap.logout();
        dovecot.restart_with_line_limit(6000);
        let env = env_with(
            &dovecot,
            backend,
            "batch_size = 1000\nafter = \"move:Processed\"",
            "",
        );
        let daemon = start_daemon(&env);
        let mut imap = dovecot.client();
        daemon.wait_for("all 700 processed and moved", WAIT, || {
            imap.status("Processed").0 == 700
        });
        let log = daemon.stop();
        assert_eq!(request_count(&env), 700);
        assert_eq!(imap.status("INBOX").0, 0);
        assert!(!log.contains("mailbox connection failed"), "{log}");
    }
}

#[test]
fn start_new_leaves_existing_mail_alone() {
    for backend in BACKENDS {
        let dovecot = Dovecot::start();
        let mut imap = dovecot.client();
        for i in 0..3 {
            imap.append("INBOX", &message(i, ""));
        }
        let env = env_with(
            &dovecot,
            backend,
            "start = \"new\"\nafter = \"move:Processed\"",
            "",
        );
        let daemon = start_daemon(&env);
        // Only mail that arrives after the first start is taken.
        daemon.wait_for("the mailbox to be watched", WAIT, || {
            daemon.log().contains("idle=true")
        });
        imap.append("INBOX", &message(10, ""));
        daemon.wait_for("the new message moved", WAIT, || {
            imap.status("Processed").0 == 1
        });
        daemon.stop();
        // A restart keeps the recorded position: the old mail is still untouched.
        let daemon = start_daemon(&env);
        imap.append("INBOX", &message(11, ""));
        daemon.wait_for("the second new message moved", WAIT, || {
            imap.status("Processed").0 == 2
        });
        let log = daemon.stop();
        assert!(!log.contains("processing again"), "{log}");
        assert_eq!(imap.status("INBOX"), (3, 3));
        assert_eq!(request_count(&env), 2);
    }
}

#[test]
fn a_duplicate_committed_but_not_acknowledged_is_acknowledged_after_a_reconnect() {
    for backend in BACKENDS {
        let dovecot = Dovecot::start();
        let mut imap = dovecot.client();
        // The same message twice: the second is a duplicate, which gets no ledger row.
        imap.append("INBOX", &message(1, ""));
        imap.append("INBOX", &message(1, ""));
        let env = env_with(&dovecot, backend, "", "");
        let daemon = start_daemon(&env);
        daemon.wait_for("both flagged seen", WAIT, || imap.status("INBOX") == (2, 0));
        daemon.stop();
        assert_eq!(request_count(&env), 1);
        // As if the connection had dropped between the commit and the acknowledgement.
        imap.command("SELECT INBOX");
        imap.command("UID STORE 1:2 -FLAGS.SILENT (\\Seen)");
        imap.command("CLOSE");
        assert_eq!(imap.status("INBOX"), (2, 2));
        let daemon = start_daemon(&env);
        daemon.wait_for("both flagged seen again", WAIT, || {
            imap.status("INBOX") == (2, 0)
        });
        let log = daemon.stop();
        assert!(log.contains("processing again"), "{log}");
        assert_eq!(request_count(&env), 1, "nothing processed twice");
    }
}

/// With after = "seen", staff who mark processed mail unread again (a to-do habit)
/// keep it unread: after a reconnect only what was committed and never acknowledged is
/// looked at again, not everything unread.
#[test]
fn mail_marked_unread_by_staff_stays_unread_after_a_reconnect() {
    for backend in BACKENDS {
        let dovecot = Dovecot::start();
        let mut imap = dovecot.client();
        let env = env_with(&dovecot, backend, "", "");
        let daemon = start_daemon(&env);
        // One at a time: each commit records how far the one before was acknowledged.
        for i in 1..=3 {
            imap.append("INBOX", &message(i, ""));
            daemon.wait_for("the message flagged seen", WAIT, || {
                imap.status("INBOX") == (i as u32, 0)
            });
        }
        daemon.stop();
        imap.command("SELECT INBOX");
        imap.command("UID STORE 1:2 -FLAGS.SILENT (\\Seen)");
        imap.command("CLOSE");
        assert_eq!(imap.status("INBOX"), (3, 2));
        let daemon = start_daemon(&env);
        // A new message after the reconnect: by then the leftover pass has run.
        imap.append("INBOX", &message(4, ""));
        daemon.wait_for("the new message", WAIT, || request_count(&env) == 4);
        daemon.wait_for("it flagged seen", WAIT, || imap.status("INBOX") == (4, 2));
        let log = daemon.stop();
        assert!(!log.contains("processing again"), "{log}");
        assert_eq!(imap.status("INBOX"), (4, 2), "still unread");
    }
}

#[test]
fn oversized_is_quarantined_without_download_and_can_be_released() {
    for backend in BACKENDS {
        let dovecot = Dovecot::start();
        let mut imap = dovecot.client();
        let mut big = message(1, "");
        big.extend(std::iter::repeat_n(b'x', 50_000));
        big.extend_from_slice(b"\r\n");
        imap.append("INBOX", &big);
        let env = env_with(
            &dovecot,
            backend,
            "",
            "[limits]\nmax_message_size = 20000\n",
        );
        let daemon = start_daemon(&env);
        daemon.wait_for("the big message in Quarantine", WAIT, || {
            imap.status("Quarantine").0 == 1 && imap.status("INBOX").0 == 0
        });
        daemon.stop();
        let q = env.json(&["quarantine", "list", "--json"]);
        assert_eq!(q[0]["reason"], "oversized", "{q:#}");
        assert_eq!(
            q[0]["sender"], "sender1@outside.example",
            "headers were read: {q:#}"
        );
        let reference = q[0]["quarantine_ref"].as_str().unwrap().to_string();
        assert!(
            reference.starts_with("imap:support:Quarantine:"),
            "{reference}"
        );
        // Dovecot logs how many body bytes each session sent: none of this message's.
        let log = dovecot.log();
        let sent: u64 = log
            .lines()
            .filter_map(|l| l.split("body_bytes=").nth(1))
            .filter_map(|v| {
                v.split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum();
        assert!(
            sent < 50_000,
            "the oversized body was downloaded ({sent} body bytes):\n{log}"
        );
        assert_eq!(request_count(&env), 0);

        // Raise the limit and release it: processed, and out of quarantine.
        let text = std::fs::read_to_string(&env.config)
            .unwrap()
            .replace("max_message_size = 20000", "max_message_size = 200000");
        std::fs::write(&env.config, text).unwrap();
        let id = q[0]["id"].as_i64().unwrap().to_string();
        // A recreated quarantine folder (new UIDVALIDITY): the UID could name another
        // message, so release refuses, touching nothing.
        let recorded: u32 = reference.rsplit(':').nth(1).unwrap().parse().unwrap();
        dovecot.change_uidvalidity("Quarantine", recorded + 7);
        let out = env.intake(&["quarantine", "release", &id]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("was recreated"), "{err}");
        assert_eq!(request_count(&env), 0);
        assert_eq!(imap.status("Quarantine").0, 1);
        dovecot.change_uidvalidity("Quarantine", recorded);
        let out = env.intake(&["quarantine", "release", &id]);
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(request_count(&env), 1);
        assert_eq!(imap.status("Quarantine").0, 0);
        assert_eq!(
            imap.status("INBOX"),
            (1, 0),
            "back in the folder, flagged seen"
        );
    }
}

#[test]
fn unparseable_goes_to_quarantine_and_the_rest_flows() {
    for backend in BACKENDS {
        let dovecot = Dovecot::start();
        let mut imap = dovecot.client();
        imap.append("INBOX", &message(1, ""));
        imap.append("INBOX", b"\x00\x01\x02 not a message at all \xff\xfe");
        imap.append("INBOX", &message(3, ""));
        let env = env_with(&dovecot, backend, "", "");
        let daemon = start_daemon(&env);
        daemon.wait_for("quarantine and two requests", WAIT, || {
            imap.status("Quarantine").0 == 1 && request_count(&env) == 2
        });
        daemon.stop();
        let q = env.json(&["quarantine", "list", "--json"]);
        assert_eq!(q.as_array().unwrap().len(), 1);
        assert_eq!(q[0]["reason"], "unparseable");
        assert_eq!(q[0]["source"], "imap:support");
    }
}

#[test]
fn uidvalidity_change_rescans_without_duplicates() {
    for backend in BACKENDS {
        let dovecot = Dovecot::start();
        let mut imap = dovecot.client();
        for i in 0..4 {
            imap.append("INBOX", &message(i, ""));
        }
        let env = env_with(&dovecot, backend, "", "");
        let daemon = start_daemon(&env);
        daemon.wait_for("four requests", WAIT, || request_count(&env) == 4);
        daemon.wait_for("all seen", WAIT, || imap.status("INBOX") == (4, 0));
        daemon.stop();
        // The server renumbers the folder; one new message arrives meanwhile.
        dovecot.change_uidvalidity("INBOX", 4242);
        let mut imap = dovecot.client();
        imap.append("INBOX", &message(9, ""));
        let daemon = start_daemon(&env);
        daemon.wait_for("the new message", WAIT, || request_count(&env) == 5);
        std::thread::sleep(Duration::from_millis(500));
        let log = daemon.stop();
        assert!(log.contains("UIDVALIDITY changed"), "{log}");
        assert_eq!(request_count(&env), 5, "the rescan created no duplicates");
    }
}

#[test]
fn after_a_uidvalidity_change_start_new_still_leaves_the_old_mail_alone() {
    for backend in BACKENDS {
        let dovecot = Dovecot::start();
        let mut imap = dovecot.client();
        // Mail from before the first start, as a mailbox has it: older.
        for i in 0..3 {
            imap.append_dated("INBOX", Some("02-Jan-2024 09:00:00 +0000"), &message(i, ""));
        }
        let env = env_with(&dovecot, backend, "start = \"new\"", "");
        let daemon = start_daemon(&env);
        daemon.wait_for("the mailbox to be watched", WAIT, || {
            daemon.log().contains("idle=true")
        });
        for i in 10..12 {
            imap.append("INBOX", &message(i, ""));
        }
        daemon.wait_for("two requests", WAIT, || request_count(&env) == 2);
        daemon.wait_for("both seen", WAIT, || imap.status("INBOX") == (5, 3));
        daemon.stop();
        // The folder is renumbered (a migration, a rebuilt index); one message arrives
        // meanwhile, and one moved in from elsewhere that keeps its old date.
        dovecot.change_uidvalidity("INBOX", 4242);
        let mut imap = dovecot.client();
        imap.append("INBOX", &message(12, ""));
        imap.append_dated(
            "INBOX",
            Some("03-Jan-2024 09:00:00 +0000"),
            &message(13, ""),
        );
        let daemon = start_daemon(&env);
        daemon.wait_for("the two new messages", WAIT, || request_count(&env) == 4);
        daemon.wait_for("all but the old mail seen", WAIT, || {
            imap.status("INBOX") == (7, 3)
        });
        std::thread::sleep(Duration::from_millis(500));
        let log = daemon.stop();
        assert!(
            log.contains("mail from before the first start is left alone"),
            "{log}"
        );
        assert_eq!(
            request_count(&env),
            4,
            "no request from the old mail, none twice"
        );
    }
}

#[test]
fn dovecot_restart_mid_backlog_loses_and_doubles_nothing() {
    for backend in BACKENDS {
        let dovecot = Dovecot::start();
        let total = 2000;
        append_backlog(&dovecot, total);
        // Small batches, so the backlog takes a while and the crash lands inside one. A
        // short reply timeout: a SELECT the restarted server leaves unanswered (below) is
        // given up in seconds, not the default two minutes.
        let env = env_with(
            &dovecot,
            backend,
            "batch_size = 10\nreply_timeout = \"5s\"",
            "",
        );
        let daemon = start_daemon(&env);
        daemon.wait_for("the first requests", WAIT, || request_count(&env) > 0);
        dovecot.crash_restart();
        let after_first = request_count(&env);
        // After a kill mid-write Dovecot may keep the folder locked until it judges the
        // lock stale (seen in CI: SELECT unanswered for 20 s and more); intake keeps
        // reconnecting meanwhile.
        daemon.wait_for("some more requests", Duration::from_secs(240), || {
            request_count(&env) > after_first
        });
        dovecot.restart();
        daemon.wait_for("the whole backlog", Duration::from_secs(180), || {
            request_count(&env) >= total
        });
        let mut imap = dovecot.client();
        daemon.wait_for("everything flagged seen", WAIT, || {
            imap.status("INBOX") == (total as u32, 0)
        });
        let log = daemon.stop();
        assert!(
            after_first < total,
            "the crash came after the backlog was done"
        );
        assert!(
            log.contains("mailbox connection failed"),
            "the crash was noticed:\n{log}"
        );
        assert_each_message_once(&env, total);
    }
}

#[test]
fn a_server_that_stops_answering_is_left_and_reconnected() {
    for backend in BACKENDS {
        let dovecot = Dovecot::start();
        let total = 300;
        append_backlog(&dovecot, total);
        let env = env_with(
            &dovecot,
            backend,
            "batch_size = 10\nreply_timeout = \"2s\"",
            "",
        );
        let daemon = start_daemon(&env);
        daemon.wait_for("the first requests", WAIT, || request_count(&env) > 0);
        // The process serving intake (and our own client) freezes: connections stay
        // open, nothing answers.
        dovecot.signal_imap("STOP");
        daemon.wait_for("the silence noticed", WAIT, || {
            daemon.log().contains("the server sent nothing for 2s")
        });
        dovecot.signal_imap("CONT");
        daemon.wait_for("the whole backlog", Duration::from_secs(120), || {
            request_count(&env) >= total
        });
        let mut imap = dovecot.client();
        daemon.wait_for("everything flagged seen", WAIT, || {
            imap.status("INBOX") == (total as u32, 0)
        });
        let log = daemon.stop();
        let failed = log
            .lines()
            .find(|l| l.contains("mailbox connection failed"))
            .unwrap_or_default();
        assert!(
            failed.contains(&format!("127.0.0.1:{}", dovecot.port)),
            "{log}"
        );
        assert_each_message_once(&env, total);
    }
}

#[test]
fn wrong_password_is_reported_with_host_and_port() {
    for backend in BACKENDS {
        let dovecot = Dovecot::start();
        let env = env_with(&dovecot, backend, "", "");
        std::fs::write(dovecot.dir.path().join("imap-password"), "wrong").unwrap();
        let daemon = start_daemon(&env);
        let address = format!("127.0.0.1:{}", dovecot.port);
        daemon.wait_for("the refused login in the log", WAIT, || {
            daemon.log().contains("refused the login")
        });
        let log = daemon.stop();
        let line = log
            .lines()
            .find(|l| l.contains("refused the login"))
            .unwrap_or_default()
            .to_string();
        assert!(line.contains(&address), "{line}");
        assert!(line.contains("desk"), "{line}");
        assert!(!log.contains("wrong"), "the password must not be logged");
    }
}

#[test]
fn implicit_tls_and_starttls() {
    for backend in BACKENDS {
        for (tls, port) in [("implicit", 0), ("starttls", 1)] {
            let dovecot = Dovecot::start();
            let mut imap = dovecot.client();
            imap.append("INBOX", &message(1, ""));
            let port = if port == 0 {
                dovecot.tls_port
            } else {
                dovecot.port
            };
            let mailbox = dovecot
                .mailbox_toml(&format!("ca_file = \"{}\"", dovecot.ca_file.display()))
                .replace("tls = \"none\"", &format!("tls = \"{tls}\""))
                .replace("host = \"127.0.0.1\"", "host = \"localhost\"")
                .replace(
                    &format!("port = {}", dovecot.port),
                    &format!("port = {port}"),
                );
            let env = Env::with_extra(
                backend,
                &Site::default(),
                &DeskSettings::default(),
                &mailbox,
            );
            let daemon = start_daemon(&env);
            daemon.wait_for(&format!("a request over {tls}"), WAIT, || {
                request_count(&env) == 1
            });
            daemon.stop();
            assert!(
                dovecot.log().contains("TLS"),
                "{tls}: the session was encrypted"
            );
        }
        // Without the CA the certificate is refused.
        let dovecot = Dovecot::start();
        let mailbox = dovecot
            .mailbox_toml("")
            .replace("tls = \"none\"", "tls = \"implicit\"")
            .replace(
                &format!("port = {}", dovecot.port),
                &format!("port = {}", dovecot.tls_port),
            );
        let env = Env::with_extra(
            backend,
            &Site::default(),
            &DeskSettings::default(),
            &mailbox,
        );
        let daemon = start_daemon(&env);
        daemon.wait_for("the TLS failure in the log", WAIT, || {
            daemon.log().contains("TLS with")
        });
        daemon.stop();
    }
}

#[test]
fn xoauth2_token_from_a_command_or_a_file_refreshed_on_reconnect() {
    // The token printed by a command, or read from a file a helper keeps fresh.
    for (backend, source) in BACKENDS
        .into_iter()
        .flat_map(|b| [(b, "token_command = \"cat "), (b, "token_file = \"")])
    {
        let dovecot = Dovecot::start_with_oauth();
        dovecot.accept_token("token-one");
        let token_file = dovecot.dir.path().join("current-token");
        std::fs::write(&token_file, "token-one\n").unwrap();
        let mailbox = dovecot
            .mailbox_toml(&format!(
                "auth = \"xoauth2\"\n{source}{}\"\ntoken_lifetime = \"1s\"",
                token_file.display()
            ))
            .lines()
            .filter(|l| !l.starts_with("password_file"))
            .collect::<Vec<_>>()
            .join("\n");
        let env = Env::with_extra(
            backend,
            &Site::default(),
            &DeskSettings::default(),
            &mailbox,
        );
        let mut imap = dovecot.client();
        imap.append("INBOX", &message(1, ""));
        let daemon = start_daemon(&env);
        daemon.wait_for("a request over XOAUTH2", WAIT, || request_count(&env) == 1);
        // The token rotates and the server drops the session: the next connection must run
        // the command again (the cached token is past its lifetime) and get in.
        dovecot.accept_token("token-two");
        std::fs::write(&token_file, "token-two\n").unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        dovecot.kick();
        let mut imap = dovecot.client();
        imap.append("INBOX", &message(2, ""));
        daemon.wait_for("a request after the token changed", WAIT, || {
            request_count(&env) == 2
        });
        // A token the server refuses: the refusal is logged with the server's reason
        // (its XOAUTH2 error continuation, answered with an empty line as RFC 7628 asks).
        dovecot.accept_token("token-three");
        std::thread::sleep(Duration::from_millis(1100));
        dovecot.kick();
        daemon.wait_for("the refusal with its reason", WAIT, || {
            daemon.log().contains("\"status\"")
        });
        let log = daemon.log();
        let line = log.lines().find(|l| l.contains("\"status\"")).unwrap();
        assert!(line.contains("refused"), "{line}");
        daemon.stop();
        let log = dovecot.log();
        assert!(log.contains("method=XOAUTH2"), "{log}");
        assert!(
            !daemon_log_has_token(&env, "token-two"),
            "tokens must not be logged"
        );
    }
}

fn daemon_log_has_token(env: &Env, token: &str) -> bool {
    std::fs::read_dir(env.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
        .any(|e| {
            std::fs::read_to_string(e.path())
                .unwrap_or_default()
                .contains(token)
        })
}

#[test]
fn a_broken_mailbox_does_not_stop_the_others() {
    for backend in BACKENDS {
        let dovecot = Dovecot::start();
        let dead_port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let broken = dovecot
            .mailbox_toml("")
            .replace("name = \"support\"", "name = \"broken\"")
            .replace(
                &format!("port = {}", dovecot.port),
                &format!("port = {dead_port}"),
            );
        let env = Env::with_extra(
            backend,
            &Site::default(),
            &DeskSettings::default(),
            &format!("{}\n{broken}", dovecot.mailbox_toml("")),
        );
        let daemon = start_daemon(&env);
        let mut imap = dovecot.client();
        imap.append("INBOX", &message(1, ""));
        daemon.wait_for("the working mailbox's request", WAIT, || {
            request_count(&env) == 1
        });
        daemon.wait_for("the broken mailbox's error", WAIT, || {
            daemon.log().contains(&format!("127.0.0.1:{dead_port}"))
        });
        // /healthz says which mailbox is down, with the outermost message only.
        let (status, _, body) = crate::browser::http(env.http_port, "GET", "/healthz", None);
        assert_eq!(status, 503, "{body}");
        let health: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(health["status"], "degraded");
        assert_eq!(health["mailboxes"]["support"]["ok"], true, "{health:#}");
        assert_eq!(health["mailboxes"]["broken"]["ok"], false, "{health:#}");
        let error = health["mailboxes"]["broken"]["last_error"]
            .as_str()
            .unwrap();
        assert!(error.contains("cannot connect"), "{error}");
        assert!(
            !error.contains("os error"),
            "only the outermost message: {error}"
        );
        // Through a proxy (no token set): the state, not why, and no audit page.
        let proxy = [("X-Forwarded-For", "192.0.2.7")];
        let (status, _, body) = crate::audit_view::get(env.http_port, "/healthz", &proxy);
        assert_eq!(status, 503, "{body}");
        let health: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(health["mailboxes"]["broken"]["ok"], false, "{health:#}");
        assert!(
            health["mailboxes"]["broken"]["last_error"].is_null(),
            "{health:#}"
        );
        let (status, _, _) = crate::audit_view::get(env.http_port, "/audit", &proxy);
        assert_eq!(status, 403);
        let log = daemon.stop();
        assert!(
            log.contains("os error"),
            "the log has the whole chain: {log}"
        );
        assert!(log.contains("mailbox broken: cannot connect"), "{log}");
    }
}

/// `systemctl restart` after a crash: the new process takes the mailbox from its dead
/// predecessor on the same machine at once, instead of waiting out the lease.
#[test]
fn a_restarted_instance_takes_its_dead_predecessors_lease_at_once() {
    restarted_instance_takes_over_at_once(start_daemon_with);
}

/// The same under the systemd unit's `ProcSubset=pid`, which hides /proc/sys (the boot
/// id and the host name): the restarted process still knows its predecessor was here.
#[test]
fn under_proc_subset_pid_a_restarted_instance_still_takes_over_at_once() {
    restarted_instance_takes_over_at_once(start_daemon_with_proc_subset_pid);
}

fn restarted_instance_takes_over_at_once(start: fn(&Env, &[(&str, &str)]) -> Daemon) {
    for backend in BACKENDS {
        let dovecot = Dovecot::start();
        let mut imap = dovecot.client();
        imap.append("INBOX", &message(1, ""));
        let env = env_with(&dovecot, backend, "poll_interval = \"10m\"", "");
        // A lease far longer than the waits below: only the takeover can be in time.
        let vars = [("INTAKE__DATABASE__MAILBOX_LEASE", "10m")];
        let first = start(&env, &vars);
        first.wait_for("the first message", WAIT, || request_count(&env) == 1);
        first.kill();
        imap.append("INBOX", &message(2, ""));
        let second = start(&env, &vars);
        second.wait_for("the message after the restart", WAIT, || {
            request_count(&env) == 2
        });
        let log = second.stop();
        assert!(
            log.contains("took over the lease of an instance on this machine that is gone"),
            "{log}"
        );
        assert!(
            log.contains("forgot an instance on this machine that is gone"),
            "{log}"
        );
    }
}

/// Messages over 1 MiB are fetched in pieces: one exactly two pieces long and one
/// ending in a short piece both arrive whole (their attachments come back byte for byte).
#[test]
fn large_messages_are_fetched_in_pieces_and_arrive_whole() {
    for backend in BACKENDS {
        let dovecot = Dovecot::start();
        let mut imap = dovecot.client();
        let mut files = Vec::new();
        for (n, target) in [(1usize, 2 * 1024 * 1024), (2, 3_300_000)] {
            let head = format!(
                "From: <big{n}@out.example>\r\nTo: it@desk.example\r\nSubject: Big {n}\r\n\
                 Message-ID: <big-{n}@out.example>\r\nMIME-Version: 1.0\r\n\
                 Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n\
                 --b\r\nContent-Type: text/plain\r\n\r\nAttached.\r\n\
                 --b\r\nContent-Type: application/octet-stream\r\n\
                 Content-Disposition: attachment; filename=\"big.bin\"\r\n\
                 Content-Transfer-Encoding: base64\r\n\r\n"
            );
            let tail = "\r\n--b--\r\n";
            // Base64 lines of 76 + CRLF: pick the file size so the message is `target`
            // bytes long, padding the rest of the head with a header.
            let room = target - head.len() - tail.len() - 200;
            let lines = room / 78;
            let file: Vec<u8> = (0..lines * 57)
                .map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_left(n as u32) as u8)
                .collect();
            let encoded = base64(&file);
            let body: Vec<&str> = encoded
                .as_bytes()
                .chunks(76)
                .map(|c| std::str::from_utf8(c).unwrap())
                .collect();
            let mut msg = format!("{head}{}{tail}", body.join("\r\n"));
            let pad = target - msg.len();
            assert!(pad > 20, "room for the padding header");
            msg = format!("X-Pad: {}\r\n{msg}", "p".repeat(pad - 9));
            assert_eq!(msg.len(), target);
            imap.append("INBOX", msg.as_bytes());
            files.push(file);
        }
        let env = env_with(&dovecot, backend, "poll_interval = \"10m\"", "");
        let daemon = start_daemon(&env);
        daemon.wait_for("both large messages", WAIT, || request_count(&env) == 2);
        daemon.wait_for("both flagged seen", WAIT, || imap.status("INBOX") == (2, 0));
        daemon.stop();
        for (i, file) in files.iter().enumerate() {
            let key = format!("IT-{}", i + 1);
            let out = env.intake(&["requests", "attachment", &key, "1"]);
            assert!(out.status.success(), "{out:?}");
            assert!(out.stdout == *file, "{key}: attachment differs");
        }
    }
}

/// A server that refuses to acknowledge (here: no right to insert into the Processed
/// folder, as when that folder is over quota) does not stop the mailbox: its messages
/// are processed and stay in INBOX flagged read, and new mail keeps coming in. Once the
/// server allows it again, the next connection moves them, processing none twice. A
/// Processed folder deleted meanwhile is created again on the spot.
#[test]
fn a_refused_acknowledgement_leaves_mail_in_place_and_the_mailbox_goes_on() {
    for backend in BACKENDS {
        let dovecot = Dovecot::start_with_acl();
        let mut imap = dovecot.client();
        imap.command("CREATE Processed");
        // Every right but i (insert).
        dovecot.set_acl("Processed owner lrwstekxa\n");
        for i in 0..3 {
            imap.append("INBOX", &message(i, ""));
        }
        let env = env_with(&dovecot, backend, "after = \"move:Processed\"", "");
        let daemon = start_daemon(&env);
        daemon.wait_for("three requests", WAIT, || request_count(&env) == 3);
        imap.append("INBOX", &message(3, ""));
        daemon.wait_for("the next message too", WAIT, || request_count(&env) == 4);
        daemon.wait_for("all read and still in INBOX", WAIT, || {
            imap.status("INBOX") == (4, 0)
        });
        assert_eq!(imap.status("Processed").0, 0);
        let log = daemon.log();
        assert!(
            log.contains("the server refused to acknowledge processed messages")
                && log.contains("Permission denied"),
            "{log}"
        );
        assert!(!log.contains("mailbox connection failed"), "{log}");

        // Allowed again: the next connection moves them.
        dovecot.set_acl("");
        dovecot.kick();
        let mut imap = dovecot.client();
        daemon.wait_for("moved at the next connection", WAIT, || {
            imap.status("INBOX").0 == 0 && imap.status("Processed").0 == 4
        });
        let failures = daemon.log().matches("mailbox connection failed").count();
        const LEFTOVERS: &str = "processing again messages committed before the last disconnect";
        let leftover_passes = daemon.log().matches(LEFTOVERS).count();

        // Refused again, then allowed: the next batch takes the refused ones along.
        dovecot.set_acl("Processed owner lrwstekxa\n");
        imap.append("INBOX", &message(4, ""));
        daemon.wait_for("the fifth processed, in INBOX", WAIT, || {
            request_count(&env) == 5 && imap.status("INBOX") == (1, 0)
        });
        dovecot.set_acl("");
        imap.append("INBOX", &message(5, ""));
        daemon.wait_for("both moved with the next batch", WAIT, || {
            imap.status("INBOX").0 == 0 && imap.status("Processed").0 == 6
        });
        // By the retry after the batch; on a loaded machine the session may have been
        // started again meanwhile (a lease renewed late, say), and then the new
        // session's leftover pass moved it.
        let log = daemon.log();
        assert!(
            log.contains("messages the server refused before are acknowledged now")
                || log.matches(LEFTOVERS).count() > leftover_passes,
            "{log}"
        );

        imap.command("DELETE Processed");
        imap.append("INBOX", &message(6, ""));
        daemon.wait_for("moved into a new Processed", WAIT, || {
            imap.status("INBOX").0 == 0 && imap.status("Processed").0 == 1
        });
        let log = daemon.stop();
        assert!(log.contains("the folder was gone"), "{log}");
        assert_eq!(
            log.matches("mailbox connection failed").count(),
            failures,
            "no reconnect for a refusal or a missing folder:\n{log}"
        );
        assert_each_message_once(&env, 7);
    }
}

/// A server without MOVE (RFC 6851): intake moves with COPY, STORE \Deleted and UID
/// EXPUNGE, processed mail and quarantined mail alike.
#[test]
fn without_move_mail_is_copied_and_expunged() {
    for backend in BACKENDS {
        let dovecot = Dovecot::start_with_acl_without_move();
        let mut imap = dovecot.client();
        for i in 0..3 {
            imap.append("INBOX", &message(i, ""));
        }
        imap.append("INBOX", b"\x00\x01 not a message\r\n");
        let env = env_with(&dovecot, backend, "after = \"move:Processed\"", "");
        let daemon = start_daemon(&env);
        daemon.wait_for("moved by copy and expunge", WAIT, || {
            imap.status("INBOX").0 == 0
                && imap.status("Processed") == (3, 0)
                && imap.status("Quarantine").0 == 1
        });
        let log = daemon.stop();
        assert!(!log.contains("mailbox connection failed"), "{log}");
        assert_each_message_once(&env, 3);
    }
}

/// A message the server cannot read (Dovecot logs the error and ends the session at the
/// FETCH) is tried again, with growing pauses between logins, and quarantined once it
/// has failed for `unfetchable_after`; the mail behind it then flows. Before, intake
/// logged in again every second, and the setting was a fixed ten minutes.
#[test]
fn a_message_the_server_cannot_read_is_quarantined_and_the_rest_flows() {
    for backend in BACKENDS {
        let dovecot = Dovecot::start();
        append_backlog(&dovecot, 3);
        // The second message's file (Maildir: names sort in delivery order).
        let new = dovecot
            .dir
            .path()
            .join("mail")
            .join(crate::dovecot::USER)
            .join("new");
        let mut files: Vec<_> = std::fs::read_dir(&new)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert_eq!(files.len(), 3);
        let status = std::process::Command::new("chmod")
            .arg("000")
            .arg(&files[1])
            .status()
            .unwrap();
        assert!(status.success());
        let env = env_with(&dovecot, backend, "unfetchable_after = \"3s\"", "");
        let daemon = start_daemon(&env);
        daemon.wait_for("the two readable messages", WAIT, || {
            request_count(&env) == 2
        });
        let mut imap = dovecot.client();
        daemon.wait_for("the unreadable one quarantined", WAIT, || {
            imap.status("Quarantine").0 == 1
        });
        let log = daemon.stop();
        assert!(
            log.contains("server keeps returning no body; quarantining"),
            "{log}"
        );
        let quarantined = env.json(&["quarantine", "list", "--json"]);
        let rows = quarantined.as_array().unwrap();
        assert_eq!(rows.len(), 1, "{quarantined}");
        assert!(rows[0].to_string().contains("no body"), "{quarantined}");
        // Backing off: the pauses between logins grow (they stayed at a second).
        let pauses: Vec<f64> = log
            .split("retry_in=")
            .skip(1)
            .filter_map(|rest| {
                let value = rest.split_whitespace().next()?;
                match value.strip_suffix("ms") {
                    Some(ms) => ms.parse::<f64>().ok().map(|ms| ms / 1000.0),
                    None => value.strip_suffix('s')?.parse().ok(),
                }
            })
            .collect();
        assert!(
            pauses.iter().any(|&p| p >= 1.4),
            "pauses {pauses:?}:\n{log}"
        );
        let reporters: Vec<String> = env
            .requests()
            .iter()
            .map(|r| r["reporter"].as_str().unwrap().to_string())
            .collect();
        assert!(reporters.contains(&"sender0@outside.example".to_string()));
        assert!(reporters.contains(&"sender2@outside.example".to_string()));
    }
}

//! Unit tests for `src/outbox/mod.rs`.

use super::*;
use crate::testing::{BACKENDS, store};

fn row() -> OutboxRow {
    OutboxRow {
        id: 7,
        kind: "invitation".into(),
        desk: Some("IT".into()),
        to: "ann@example.com".into(),
        from: "it@desk.example".into(),
        subject: "Hello\r\nBcc: evil@example.net".into(),
        body_text: "body".into(),
        message_id: "invitation.abc@intake.desk.example".into(),
        in_reply_to: Some("orig@mail.example.com".into()),
        request: Some("IT-1".into()),
        status: "sending".into(),
        attempts: 1,
        next_attempt_at: 0,
        last_error: None,
        created_at: 1_700_000_000,
        body_html: Some("<p>body</p>".into()),
    }
}

#[test]
fn stamps_and_cannot_be_injected() {
    let stamp = Stamp {
        from_name: "Help \"Desk\"\r\nBcc: x@y.z".into(),
        loop_id: "intake.desk.example".into(),
    };
    let m = build_message(&row(), &stamp).unwrap();
    let text = String::from_utf8(m.formatted()).unwrap();
    assert!(text.contains("Auto-Submitted: auto-replied"), "{text}");
    assert!(text.contains("X-Intake-Loop: intake.desk.example"));
    assert!(text.contains("Message-ID: <invitation.abc@intake.desk.example>"));
    assert!(text.contains("In-Reply-To: <orig@mail.example.com>"));
    for line in text.lines() {
        assert!(!line.starts_with("Bcc:"), "header injected: {text}");
    }
    // The round trip through our own parser sees one To and no Bcc.
    let parsed = crate::message::parse(text.as_bytes()).unwrap();
    assert_eq!(parsed.to.len(), 1);
    assert_eq!(
        parsed.signals.auto_submitted.as_deref(),
        Some("auto-replied")
    );
    // Not in answer to a message: generated, not replied.
    let unprompted = OutboxRow {
        in_reply_to: None,
        ..row()
    };
    let text = String::from_utf8(build_message(&unprompted, &stamp).unwrap().formatted()).unwrap();
    assert!(text.contains("Auto-Submitted: auto-generated"), "{text}");
    assert!(!text.contains("In-Reply-To"), "{text}");
}

#[test]
fn backoff_grows_and_is_capped() {
    let first = backoff_secs(1, 30);
    assert!((30..=36).contains(&first), "{first}");
    assert!(backoff_secs(3, 30) >= 120);
    assert!(backoff_secs(50, 30) <= 3600 + 720);
}

/// Queues one invitation to `to`, due since `due`.
async fn queue(store: &Store, to: &str, due: i64) {
    let mut c = store.acquire().await.unwrap();
    sqlx::query(
        "INSERT INTO outbox (kind, desk, to_address, from_address, subject, body_text, \
         message_id, status, attempts, next_attempt_at, created_at) \
         VALUES ('invitation', 'IT', $1, 'it@desk.example', 's', 'b', $3, 'pending', 0, $2, $2)",
    )
    .bind(to)
    .bind(due)
    .bind(format!("{to}.invitation@x"))
    .execute(&mut *c)
    .await
    .unwrap();
}

/// An active account at `address`.
async fn account(store: &Store, address: &str) {
    let mut c = store.acquire().await.unwrap();
    sqlx::query(
        "INSERT INTO accounts (address, kind, status, origin, created_at, updated_at) \
         VALUES ($1, 'portal_only', 'active', 'test', 0, 0)",
    )
    .bind(address)
    .execute(&mut *c)
    .await
    .unwrap();
}

fn worker(store: &Store, transport: Transport) -> Worker {
    Worker {
        store: store.clone(),
        transport,
        stamp: Stamp {
            from_name: "Desk".into(),
            loop_id: "l".into(),
        },
        max_attempts: 12,
        poll_interval: Duration::from_secs(1),
        retry_first_secs: 30,
        claim_lease_secs: 30,
        pass: Default::default(),
        relay: Default::default(),
    }
}

/// A pass that began long ago (a long backlog) used its start time for the retry time:
/// a failed mail was due again at once and retried in the same pass, twelve times in a
/// row, and was dead within seconds of a transient failure.
#[tokio::test]
async fn a_long_pass_does_not_burn_a_failed_mails_retries() {
    for backend in BACKENDS {
        eprintln!("on {backend:?}");
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), backend).await;
        let real_now = crate::now();
        queue(&store, "ann@example.com", real_now - 10).await;
        // Writing fails every time (the directory is a regular file): a transient error.
        let blocker = dir.path().join("not-a-dir");
        std::fs::write(&blocker, "x").unwrap();
        let worker = worker(
            &store,
            Transport::File(FileTransport::new(blocker.join("sub"))),
        );
        let report = worker.drain_once(real_now - 7200).await.unwrap();
        assert_eq!(
            report,
            DrainReport {
                sent: 0,
                failed: 1,
                dead: 0,
                given_back: 0,
            }
        );
        let rows = store.list_outbox(None, 10).await.unwrap();
        assert_eq!(rows[0].attempts, 1);
        assert_eq!(rows[0].status, "pending");
        assert!(
            rows[0].next_attempt_at >= real_now + 30,
            "retry at {} (now {real_now})",
            rows[0].next_attempt_at
        );
    }
}

/// A relay on loopback that answers MAIL FROM with `mail`, RCPT TO with `rcpt` and the
/// end of the message with `end`; everything else is accepted.
async fn fake_relay(mail: &'static str, rcpt: &'static str, end: &'static str) -> u16 {
    slow_relay(mail, rcpt, end, Duration::ZERO).await
}

/// [`fake_relay`], answering the end of each message only after `end_delay`.
async fn slow_relay(
    mail: &'static str,
    rcpt: &'static str,
    end: &'static str,
    end_delay: Duration,
) -> u16 {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (r, mut w) = socket.into_split();
                let mut r = BufReader::new(r);
                w.write_all(b"220 fake ESMTP\r\n").await.unwrap();
                let mut line = String::new();
                let mut in_data = false;
                loop {
                    line.clear();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let command = line.to_ascii_uppercase();
                    let reply = if in_data {
                        if line != ".\r\n" {
                            continue;
                        }
                        in_data = false;
                        tokio::time::sleep(end_delay).await;
                        end
                    } else if command.starts_with("EHLO") {
                        "250-fake\r\n250 8BITMIME"
                    } else if command.starts_with("MAIL") {
                        mail
                    } else if command.starts_with("RCPT") {
                        rcpt
                    } else if command.starts_with("DATA") {
                        in_data = true;
                        "354 go ahead"
                    } else if command.starts_with("QUIT") {
                        let _ = w.write_all(b"221 bye\r\n").await;
                        return;
                    } else {
                        "250 ok"
                    };
                    w.write_all(format!("{reply}\r\n").as_bytes())
                        .await
                        .unwrap();
                }
            });
        }
    });
    port
}

fn smtp_transport(port: u16) -> SmtpTransport {
    SmtpTransport::new(&crate::config::SmtpConfig {
        host: "127.0.0.1".into(),
        port,
        tls: crate::config::SmtpTls::None,
        ca_file: None,
        username: None,
        password: None,
        timeout: Duration::from_secs(5),
        hello_name: None,
    })
    .unwrap()
}

const OK: &str = "250 2.0.0 ok";

/// What a refusal means depends on the command it answered: a relay refusing our
/// sender address (a configuration problem) used to kill every mail at once, as if
/// each recipient had been refused.
#[tokio::test]
async fn a_refused_sender_is_retried_and_a_refused_recipient_is_not() {
    let stamp = Stamp {
        from_name: "Desk".into(),
        loop_id: "l".into(),
    };
    let message = build_message(&row(), &stamp).unwrap();
    // (MAIL reply, RCPT reply, reply after the message, permanent, sender refused)
    let cases: &[(&'static str, &'static str, &'static str, bool, bool)] = &[
        // Postfix, smtpd_sender_login_maps.
        (
            "553 5.7.1 <it@desk.example>: Sender address rejected: not owned by user intake",
            OK,
            OK,
            false,
            true,
        ),
        // Exchange Online, a mailbox the login may not send as.
        (
            "550 5.7.60 SMTP; Client does not have permissions to send as this sender",
            OK,
            OK,
            false,
            true,
        ),
        ("550 sender refused", OK, OK, false, true),
        ("451 4.3.0 try again later", OK, OK, false, false),
        // The recipient's mailbox does not exist.
        (
            OK,
            "550 5.1.1 <ann@example.com>: Recipient address rejected: User unknown",
            OK,
            true,
            false,
        ),
        (
            OK,
            "553 5.1.3 bad recipient address syntax",
            OK,
            true,
            false,
        ),
        // Without an enhanced status a refusal cannot be told from "relay not permitted":
        // retried, and the address not marked.
        (OK, "550 no such user", OK, false, false),
        (OK, "550 relay not permitted", OK, false, false),
        // Postfix refuses a bad sender at RCPT TO by default (smtpd_delay_reject).
        (
            OK,
            "553 5.7.1 <it@desk.example>: Sender address rejected: not owned by user intake",
            OK,
            false,
            true,
        ),
        (
            OK,
            "550 5.1.8 <it@desk.example>: Sender address rejected: Domain not found",
            OK,
            false,
            true,
        ),
        (OK, "550 5.1.7 bad sender mailbox syntax", OK, false, true),
        // Relaying denied: the relay's configuration, not the mailbox.
        (OK, "550 5.7.1 Unable to relay", OK, false, false),
        (
            OK,
            "554 5.7.1 <ann@example.com>: Relay access denied",
            OK,
            false,
            false,
        ),
        (OK, "450 4.2.0 greylisted", OK, false, false),
        // Exchange checks the recipient after the message.
        (
            OK,
            OK,
            "550 5.1.10 RESOLVER.ADR.RecipientNotFound; not found",
            true,
            false,
        ),
        // Content refused after the message: not the recipient's fault.
        (OK, OK, "550 5.7.1 message refused as spam", false, false),
    ];
    for &(mail, rcpt, end, permanent, sender_refused) in cases {
        let transport = smtp_transport(fake_relay(mail, rcpt, end).await);
        let e = transport.send(&message).await.unwrap_err();
        let text = error_chain(&e);
        assert_eq!(e.is_permanent(), permanent, "{text}");
        assert_eq!(e.is_sender_refused(), sender_refused, "{text}");
        if sender_refused && mail != OK {
            assert!(text.contains("MAIL FROM"), "{text}");
        }
    }
    // All accepted: sent.
    let transport = smtp_transport(fake_relay(OK, OK, OK).await);
    transport.send(&message).await.unwrap();
    transport.finish().await;
}

/// Through the worker: a refused sender leaves the mail pending for a retry.
#[tokio::test]
async fn a_refused_sender_leaves_the_mail_queued() {
    for backend in BACKENDS {
        eprintln!("on {backend:?}");
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), backend).await;
        let now = crate::now();
        account(&store, "ann@example.com").await;
        queue(&store, "ann@example.com", now - 10).await;
        let port = fake_relay(
            "553 5.7.1 <it@desk.example>: Sender address rejected: not owned by user intake",
            OK,
            OK,
        )
        .await;
        let worker = worker(&store, Transport::Smtp(smtp_transport(port)));
        let report = worker.drain_once(now).await.unwrap();
        assert_eq!(report.failed, 1, "{report:?}");
        assert_eq!(report.dead, 0, "{report:?}");
        let rows = store.list_outbox(None, 10).await.unwrap();
        assert_eq!(rows[0].status, "pending");
        let error = rows[0].last_error.as_deref().unwrap();
        assert!(error.contains("Sender address rejected"), "{error}");
        let ann = store.show_account("ann@example.com").await.unwrap();
        assert_eq!(ann.undeliverable_at, None, "our sender, not her address");
    }
}

/// A recipient the relay refuses for good is as undeliverable as one a permanent bounce
/// named: the mail is dead and the account marked, so nothing more is queued for it.
#[tokio::test]
async fn a_refused_recipient_is_marked_undeliverable() {
    for backend in BACKENDS {
        eprintln!("on {backend:?}");
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), backend).await;
        let now = crate::now();
        account(&store, "ann@example.com").await;
        queue(&store, "ann@example.com", now - 10).await;
        let port = fake_relay(
            OK,
            "550 5.1.1 <ann@example.com>: Recipient address rejected: User unknown",
            OK,
        )
        .await;
        let worker = worker(&store, Transport::Smtp(smtp_transport(port)));
        let report = worker.drain_once(now).await.unwrap();
        assert_eq!(report.dead, 1, "{report:?}");
        let rows = store.list_outbox(None, 10).await.unwrap();
        assert_eq!(rows[0].status, "dead");
        let error = rows[0].last_error.as_deref().unwrap();
        assert!(error.contains("User unknown"), "{error}");
        let ann = store.show_account("ann@example.com").await.unwrap();
        assert!(ann.undeliverable_at.is_some_and(|at| at >= now), "{ann:?}");
    }
}

/// A relay whose recipient lookup is broken refuses everyone with 5.1.1: once a few
/// different recipients were refused in a row, with no mail taken in between, the relay
/// is suspected, not the addresses — the marks made in that run are taken back and their
/// mail retried, and the rest are retried too — until it takes a mail again.
#[tokio::test]
async fn a_relay_refusing_everyone_does_not_make_everyone_undeliverable() {
    for backend in BACKENDS {
        eprintln!("on {backend:?}");
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), backend).await;
        let now = crate::now();
        let people: Vec<String> = (0..7).map(|i| format!("p{i}@example.com")).collect();
        for p in &people {
            account(&store, p).await;
            queue(&store, p, now - 10).await;
        }
        let refusing = fake_relay(OK, "550 5.1.1 User unknown in virtual alias table", OK).await;
        let w = worker(&store, Transport::Smtp(smtp_transport(refusing)));
        let report = w.drain_once(now).await.unwrap();
        assert_eq!(
            (report.sent, report.dead, report.failed),
            (
                0,
                REFUSED_IN_A_ROW - 1,
                people.len() - (REFUSED_IN_A_ROW - 1)
            ),
            "as they happened: {report:?}"
        );
        for p in &people {
            let a = store.show_account(p).await.unwrap();
            assert!(a.undeliverable_at.is_none(), "{p} is still marked: {a:?}");
        }
        let rows = store.list_outbox(None, 10).await.unwrap();
        assert!(
            rows.iter()
                .all(|r| r.status == "pending" && r.next_attempt_at > now),
            "{rows:?}"
        );

        // The relay takes a mail: refusals are believed again.
        let accepting = fake_relay(OK, OK, OK).await;
        let w = Worker {
            transport: Transport::Smtp(smtp_transport(accepting)),
            ..w
        };
        queue(&store, "fine@example.com", now - 10).await;
        assert_eq!(w.drain_once(now).await.unwrap().sent, 1);
        let w = Worker {
            transport: Transport::Smtp(smtp_transport(refusing)),
            ..w
        };
        account(&store, "gone@example.com").await;
        queue(&store, "gone@example.com", now - 10).await;
        assert_eq!(w.drain_once(now).await.unwrap().dead, 1);
        let gone = store.show_account("gone@example.com").await.unwrap();
        assert!(gone.undeliverable_at.is_some(), "{gone:?}");
    }
}

/// Past the first half of its claim, a mail starts only if the claim holds for a whole
/// send more (a send started near its end could still run when another worker claims
/// the mail): the second mail of a claim whose lease is nearly gone after a slow first
/// send is given back uncounted, for the next claim.
#[tokio::test]
async fn a_mail_is_not_started_on_a_claim_too_short_for_a_send() {
    for backend in BACKENDS {
        eprintln!("on {backend:?}");
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), backend).await;
        let now = crate::now();
        queue(&store, "ann@example.com", now - 10).await;
        queue(&store, "bob@example.com", now - 10).await;
        let port = slow_relay(OK, OK, OK, Duration::from_millis(1200)).await;
        let mut w = worker(&store, Transport::Smtp(smtp_transport(port)));
        w.claim_lease_secs = 2;
        let report = w.drain_while(now, || true).await.unwrap();
        // The first went out; the second, claimed with it, was given back, then claimed
        // again (due at once) and sent in the same pass, on a fresh claim.
        assert_eq!((report.sent, report.given_back), (2, 1), "{report:?}");
        let rows = store.list_outbox(None, 10).await.unwrap();
        let attempts: Vec<i64> = rows.iter().map(|r| r.attempts).collect();
        assert_eq!(
            attempts,
            [1, 1],
            "the mail given back counted no attempt: {rows:?}"
        );
    }
}

/// A relay that cannot be reached kills no mail (a long outage used to make every
/// queued mail dead, verification links too): the mail tried counts the attempt, the
/// rest of the claim goes back untried, each says why it waits, and the worker leaves
/// the relay alone for a pause before trying again, then sends.
#[tokio::test]
async fn an_unreachable_relay_counts_no_attempt_and_pauses_the_queue() {
    for backend in BACKENDS {
        eprintln!("on {backend:?}");
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), backend).await;
        let now = crate::now();
        queue(&store, "ann@example.com", now - 10).await;
        queue(&store, "bob@example.com", now - 10).await;
        // A port nobody listens on (bound, then closed).
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut w = worker(&store, Transport::Smtp(smtp_transport(port)));
        w.retry_first_secs = 1;
        let report = w.drain_once(now).await.unwrap();
        assert_eq!(
            (report.sent, report.failed, report.dead),
            (0, 1, 0),
            "{report:?}"
        );
        let mut rows: Vec<(String, i64)> = store
            .list_outbox(None, 10)
            .await
            .unwrap()
            .into_iter()
            .inspect(|r| assert!(r.last_error.is_some(), "{r:?}"))
            .map(|r| (r.status, r.attempts))
            .collect();
        rows.sort();
        assert_eq!(rows, [("pending".into(), 0), ("pending".into(), 1)]);
        // At its last attempt, a mail does not die of the relay being away.
        let mut c = store.acquire().await.unwrap();
        sqlx::query("UPDATE outbox SET attempts = 12")
            .execute(&mut *c)
            .await
            .unwrap();
        drop(c);
        // Paused: a pass right away does not even try.
        let report = w.drain_once(crate::now()).await.unwrap();
        assert_eq!(report, DrainReport::default());
        // After the pause it tries again; still away, and nothing dies of it.
        tokio::time::sleep(Duration::from_millis(1300)).await;
        let report = w.drain_once(crate::now()).await.unwrap();
        assert_eq!((report.failed, report.dead), (1, 0), "{report:?}");
        assert!(
            store
                .list_outbox(None, 10)
                .await
                .unwrap()
                .iter()
                .all(|r| r.status == "pending")
        );
        // The relay is back (here: on another port), and the pause (now doubled) over.
        let back = fake_relay(OK, OK, OK).await;
        let w = Worker {
            transport: Transport::Smtp(smtp_transport(back)),
            ..w
        };
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let report = w.drain_once(crate::now()).await.unwrap();
        assert_eq!(report.sent, 2, "{report:?}");
        for row in store.list_outbox(None, 10).await.unwrap() {
            assert_eq!(row.status, "sent", "{row:?}");
        }
    }
}

/// Mail waiting for a retry to an address marked undeliverable meanwhile (a permanent
/// bounce of other mail) is not sent: it would only bounce too. Mail to others is.
#[tokio::test]
async fn due_mail_to_an_address_marked_undeliverable_meanwhile_is_not_sent() {
    for backend in BACKENDS {
        eprintln!("on {backend:?}");
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), backend).await;
        let now = crate::now();
        account(&store, "ann@example.com").await;
        queue(&store, "ann@example.com", now - 10).await;
        queue(&store, "bob@example.com", now - 10).await;
        let mut c = store.acquire().await.unwrap();
        sqlx::query("UPDATE accounts SET undeliverable_at = $1 WHERE address = 'ann@example.com'")
            .bind(now - 5)
            .execute(&mut *c)
            .await
            .unwrap();
        drop(c);
        // What a pass does first, then its claims.
        store.outbox_drop_undeliverable(now).await.unwrap();
        let claimed = store.claim_outbox(10, now, 30).await.unwrap();
        let to: Vec<&str> = claimed.iter().map(|r| r.to.as_str()).collect();
        assert_eq!(to, ["bob@example.com"]);
        let rows = store.list_outbox(Some("dead"), 10).await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].to, "ann@example.com");
        assert!(
            rows[0]
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("undeliverable")),
            "{:?}",
            rows[0]
        );
    }
}

/// The last pass at shutdown starts no mail after its deadline but lets the one being
/// sent finish: cut short after the relay took it, it would have gone out again after
/// the restart. The other claimed mail is given back unsent, its attempt not counted.
#[tokio::test]
async fn the_last_pass_lets_the_mail_in_flight_finish_and_gives_the_rest_back() {
    for backend in BACKENDS {
        eprintln!("on {backend:?}");
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), backend).await;
        let now = crate::now();
        for to in ["ann@example.com", "bob@example.com", "cy@example.com"] {
            queue(&store, to, now - 10).await;
        }
        let slow = Duration::from_millis(1500);
        let port = slow_relay(OK, OK, OK, slow).await;
        let worker = worker(&store, Transport::Smtp(smtp_transport(port)));
        let started = std::time::Instant::now();
        let report = worker
            .drain_before(now, started + Duration::from_millis(300))
            .await
            .unwrap();
        assert!(
            started.elapsed() >= slow,
            "the mail in flight was cut short"
        );
        assert_eq!(report.sent, 1, "{report:?}");
        let rows = store.list_outbox(None, 10).await.unwrap();
        let status: Vec<(&str, i64)> = rows
            .iter()
            .map(|r| (r.status.as_str(), r.attempts))
            .collect();
        assert_eq!(
            status.iter().filter(|s| **s == ("sent", 1)).count(),
            1,
            "{status:?}"
        );
        assert_eq!(
            status.iter().filter(|s| **s == ("pending", 0)).count(),
            2,
            "{status:?}"
        );
        // Given back due at once: the next start sends them without waiting for a lease.
        let due = store.claim_outbox(10, crate::now(), 30).await.unwrap();
        assert_eq!(due.len(), 2);
    }
}

/// The last pass waits for the running worker's pass, which starts no mail once
/// shutdown begins but finishes (and records) the one in flight: the two never send side
/// by side, and nothing is left claimed.
#[tokio::test]
async fn the_last_pass_waits_for_the_running_workers_mail_in_flight() {
    for backend in BACKENDS {
        eprintln!("on {backend:?}");
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), backend).await;
        let now = crate::now();
        for to in ["ann@example.com", "bob@example.com", "cy@example.com"] {
            queue(&store, to, now - 10).await;
        }
        let slow = Duration::from_millis(1500);
        let port = slow_relay(OK, OK, OK, slow).await;
        let worker = std::sync::Arc::new(worker(&store, Transport::Smtp(smtp_transport(port))));
        let shutdown = tokio_util::sync::CancellationToken::new();
        let running = {
            let worker = worker.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                worker
                    .drain_while(now, || !shutdown.is_cancelled())
                    .await
                    .unwrap()
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        shutdown.cancel();
        let started = std::time::Instant::now();
        let last = worker
            .drain_before(now, started + Duration::from_millis(200))
            .await
            .unwrap();
        let first = running.await.unwrap();
        assert_eq!(first.sent, 1, "{first:?}");
        // It waited for the mail in flight, by then its own time was up: it sent nothing.
        assert!(started.elapsed() >= Duration::from_millis(1000));
        assert_eq!(last.sent, 0, "{last:?}");
        let rows = store.list_outbox(None, 10).await.unwrap();
        let mut status: Vec<(&str, i64)> = rows
            .iter()
            .map(|r| (r.status.as_str(), r.attempts))
            .collect();
        status.sort();
        assert_eq!(status, [("pending", 0), ("pending", 0), ("sent", 1)]);
    }
}

/// A worker frozen past its claim's lease finds, when it wakes, that another worker has
/// claimed the mail since: it may not send it, and its outcome (here a failure, which
/// would have put a sent mail back in the queue) changes nothing.
#[tokio::test]
async fn a_claim_another_worker_took_over_records_nothing() {
    for backend in BACKENDS {
        eprintln!("on {backend:?}");
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), backend).await;
        let t = crate::now();
        queue(&store, "ann@example.com", t - 10).await;
        let first = store.claim_outbox(2, t, 1).await.unwrap();
        assert_eq!(first.len(), 1);
        let a = first[0].claim();
        assert!(store.outbox_claim_holds(a, t).await.unwrap());
        // The lease ran out: another worker claims the mail and sends it.
        let second = store.claim_outbox(2, t + 5, 30).await.unwrap();
        let b = second[0].claim();
        assert_eq!((b.id, b.attempts), (a.id, a.attempts + 1));
        assert!(!store.outbox_claim_holds(a, t + 5).await.unwrap());
        assert!(store.outbox_sent(b, t + 6).await.unwrap());
        // The first worker wakes up with a failure to record.
        assert!(
            !store
                .outbox_failed(a, "timed out", Some(t + 60))
                .await
                .unwrap()
        );
        assert!(!store.outbox_sent(a, t + 7).await.unwrap());
        let row = &store.list_outbox(None, 10).await.unwrap()[0];
        assert_eq!(row.status, "sent");
        assert_eq!(row.attempts, 2);
        assert_eq!(row.last_error, None);
    }
}

/// `outbox retry` starts a dead mail's attempts again, so a later claim can have the
/// attempts of a claim long gone: its lease's end tells them apart.
#[tokio::test]
async fn a_claim_from_before_a_retry_does_not_hold() {
    for backend in BACKENDS {
        eprintln!("on {backend:?}");
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), backend).await;
        let t = crate::now();
        queue(&store, "ann@example.com", t - 10).await;
        let a = store.claim_outbox(2, t - 5, 1).await.unwrap()[0].claim();
        let b = store.claim_outbox(2, t, 30).await.unwrap()[0].claim();
        assert!(store.outbox_failed(b, "refused", None).await.unwrap());
        assert_eq!(store.outbox_retry(Some(a.id), t).await.unwrap(), 1);
        let c = store.claim_outbox(2, t + 1, 30).await.unwrap()[0].claim();
        assert_eq!(
            c.attempts, a.attempts,
            "the retry started the attempts again"
        );
        assert!(!store.outbox_claim_holds(a, t + 1).await.unwrap());
        assert!(!store.outbox_sent(a, t + 2).await.unwrap());
        assert!(store.outbox_claim_holds(c, t + 1).await.unwrap());
        assert!(store.outbox_sent(c, t + 2).await.unwrap());
    }
}

use super::*;
use crate::policy::{Action, Reason};
use crate::testing::{BACKENDS, pipeline};

/// A delivery report (RFC 3464) from a customer's mail server.
fn dsn(id: &str) -> Vec<u8> {
    format!(
        "Return-Path: <>\r\nFrom: Mail Delivery System <MAILER-DAEMON@mx.outside.example>\r\n\
         To: it@desk.example\r\nSubject: Undelivered Mail Returned to Sender\r\n\
         Message-ID: <{id}@mx.outside.example>\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\r\n\r\n\
         --B\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n\r\n\
         --B\r\nContent-Type: message/delivery-status\r\n\r\n\
         Reporting-MTA: dns; mx.outside.example\r\n\r\n\
         Final-Recipient: rfc822; olga@outside.example\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n\
         --B--\r\n"
    )
    .into_bytes()
}

/// The size a source announces (IMAP's RFC822.SIZE) may differ from the bytes it sent;
/// the message is still whole and its delivery report is read (which recipient failed,
/// how): only an oversized message, of which we hold the head, is not.
#[test]
fn a_delivery_report_is_read_whatever_size_the_source_announced() {
    let raw = dsn("dsn-1");
    let max = 1_000_000;
    for (announced, read) in [
        (raw.len() as u64, true),
        (raw.len() as u64 + 1, true),
        (raw.len() as u64 - 1, true),
        (max, true),
        (max + 1, false),
    ] {
        let env = Envelope {
            size: announced,
            raw: raw.clone(),
            source: SourceRef {
                source: "test".into(),
                reference: "1".into(),
            },
            desk: None,
            quarantine_ref: String::new(),
            content_hash: None,
            fetch_error: None,
            truncated: false,
        };
        let msg = Prepared::new(&env, max).msg.unwrap();
        assert_eq!(msg.bounce.is_some(), read, "announced {announced}");
        if read {
            let report = msg.bounce.unwrap();
            assert!(
                format!("{report:?}").contains("olga@outside.example"),
                "{report:?}"
            );
        }
    }
}

/// And end to end: such a report is not a request.
#[tokio::test]
async fn a_delivery_report_with_another_announced_size_opens_no_request() {
    for backend in BACKENDS {
        eprintln!("on {backend:?}");
        let dir = tempfile::tempdir().unwrap();
        let pipeline = pipeline(dir.path(), backend).await;
        let raw = dsn("dsn-2");
        let env = Envelope {
            size: raw.len() as u64 + 4096,
            raw,
            source: SourceRef {
                source: "test".into(),
                reference: "2".into(),
            },
            desk: None,
            quarantine_ref: String::new(),
            content_hash: None,
            fetch_error: None,
            truncated: false,
        };
        let outcomes = pipeline.process_batch(&[env], crate::now()).await.unwrap();
        let Outcome::Decided { decision, .. } = &outcomes[0] else {
            panic!("{:?}", outcomes[0]);
        };
        assert_eq!(
            decision.reason,
            Reason::DeliveryStatusNotification,
            "{decision:?}"
        );
        assert_ne!(decision.action, Action::CreateRequest);
    }
}

/// Only the head of a message that was over the limit when the source read it: still
/// quarantined as oversized after a reload raised the limit above its size, never decided
/// (and acknowledged) as if the head were all of it.
#[tokio::test]
async fn a_head_read_under_a_lower_limit_is_quarantined_whatever_the_limit_is_now() {
    for backend in BACKENDS {
        eprintln!("on {backend:?}");
        let dir = tempfile::tempdir().unwrap();
        let pipeline = pipeline(dir.path(), backend).await;
        let head = "From: Olga <olga@outside.example>\r\nTo: support@desk.example\r\n\
                    Subject: Logs\r\nMessage-ID: <head-1@outside.example>\r\n\r\nThe logs:\r\n";
        let mut env = envelope("head-1", head.to_string());
        env.size = 200_000;
        env.truncated = true;
        assert!(env.size < pipeline.config().max_message_size);
        let outcomes = pipeline.process_batch(&[env], crate::now()).await.unwrap();
        let Outcome::Quarantined { reason, detail, .. } = &outcomes[0] else {
            panic!("{:?}", outcomes[0]);
        };
        assert_eq!(*reason, Reason::Oversized);
        assert!(detail.contains("only its head"), "{detail}");
    }
}

fn envelope(reference: &str, raw: String) -> Envelope {
    Envelope {
        size: raw.len() as u64,
        raw: raw.into_bytes(),
        source: SourceRef {
            source: "test".into(),
            reference: reference.into(),
        },
        desk: None,
        quarantine_ref: String::new(),
        content_hash: None,
        fetch_error: None,
        truncated: false,
    }
}

/// What a batch returns carries the keys of the requests it made: the new request's,
/// and the one a reply in the same batch joined.
#[tokio::test]
async fn a_batch_returns_the_keys_of_the_requests_it_made() {
    for backend in BACKENDS {
        eprintln!("on {backend:?}");
        let dir = tempfile::tempdir().unwrap();
        let pipeline = pipeline(dir.path(), backend).await;
        let first = envelope(
            "1",
            "From: Olga <olga@outside.example>\r\nTo: it@desk.example\r\nSubject: Printer\r\n\
             Message-ID: <p1@outside.example>\r\n\r\nIt is broken.\r\n"
                .into(),
        );
        let second = envelope(
            "2",
            "From: Olga <olga@outside.example>\r\nTo: it@desk.example\r\nSubject: Re: Printer\r\n\
             Message-ID: <p2@outside.example>\r\nIn-Reply-To: <p1@outside.example>\r\n\r\nStill.\r\n"
                .into(),
        );
        let third = envelope(
            "3",
            "From: Piet <piet@outside.example>\r\nTo: it@desk.example\r\nSubject: Screen\r\n\
             Message-ID: <p3@outside.example>\r\n\r\nDark.\r\n"
                .into(),
        );
        let outcomes = pipeline
            .process_batch(&[first, second, third], crate::now())
            .await
            .unwrap();
        let keys: Vec<(Option<String>, Option<String>)> = outcomes
            .iter()
            .map(|o| match o {
                Outcome::Decided { decision, applied } => (
                    applied.request.as_ref().map(|k| k.to_string()),
                    decision.request.as_ref().map(|k| k.to_string()),
                ),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            keys,
            vec![
                (Some("IT-1".into()), None),
                (Some("IT-1".into()), Some("IT-1".into())),
                (Some("IT-2".into()), None),
            ]
        );
    }
}

/// A panic of ours while processing one message (a bug that message meets) quarantines
/// that message, with what the panic said, and leaves nothing of it behind; the other
/// messages of the batch commit. Before, the panic ended the mailbox's task and the
/// daemon, which met the same message again after its restart.
#[tokio::test]
async fn a_message_that_panics_is_quarantined_and_the_batch_goes_on() {
    for backend in BACKENDS {
        eprintln!("on {backend:?}");
        let dir = tempfile::tempdir().unwrap();
        let pipeline = pipeline(dir.path(), backend).await;
        let mail = |n: u32, from: &str, subject: &str| {
            envelope(
                &n.to_string(),
                format!(
                    "From: {from}\r\nTo: it@desk.example\r\nSubject: {subject}\r\n\
                     Message-ID: <panic-{n}@outside.example>\r\n\r\nHello.\r\n"
                ),
            )
        };
        let batch = [
            mail(1, "olga@outside.example", "Printer"),
            mail(
                2,
                "mallory@outside.example",
                "Screen [intake-test-panic:apply]",
            ),
            mail(3, "piet@outside.example", "Mouse"),
        ];
        let outcomes = pipeline.process_batch(&batch, crate::now()).await.unwrap();
        let requests: Vec<Option<String>> = outcomes
            .iter()
            .map(|o| match o {
                Outcome::Decided { applied, .. } => applied.request.as_ref().map(|k| k.to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(
            requests,
            vec![Some("IT-1".into()), None, Some("IT-2".into())]
        );
        let Outcome::Quarantined { reason, detail, .. } = &outcomes[1] else {
            panic!("{:?}", outcomes[1]);
        };
        assert_eq!(*reason, Reason::ProcessingFailed);
        assert!(
            detail.contains("panicked: asked to by the test message"),
            "{detail}"
        );
        // Mallory's account went with the rolled-back message: a later one creates it.
        let later = pipeline
            .process_batch(
                &[mail(4, "mallory@outside.example", "Screen")],
                crate::now(),
            )
            .await
            .unwrap();
        let Outcome::Decided { applied, .. } = &later[0] else {
            panic!("{:?}", later[0]);
        };
        assert_eq!(
            applied.request.as_ref().map(|k| k.to_string()),
            Some("IT-3".into())
        );
        assert!(
            applied
                .accounts_created
                .iter()
                .any(|(a, _)| a.as_str() == "mallory@outside.example"),
            "{applied:?}"
        );
    }
}

/// A panic while reading ahead for the batch fails only that pass: the careful pass
/// goes on message by message, and here (the panic was in the reading ahead only)
/// every message goes through.
#[tokio::test]
async fn a_panic_while_reading_ahead_leaves_the_batch_to_the_careful_pass() {
    for backend in BACKENDS {
        eprintln!("on {backend:?}");
        let dir = tempfile::tempdir().unwrap();
        let pipeline = pipeline(dir.path(), backend).await;
        let mail = |n: u32, subject: &str| {
            envelope(
                &n.to_string(),
                format!(
                    "From: olga@outside.example\r\nTo: it@desk.example\r\nSubject: {subject}\r\n\
                     Message-ID: <ahead-{n}@outside.example>\r\n\r\nHello.\r\n"
                ),
            )
        };
        let batch = [
            mail(1, "Printer"),
            mail(2, "Screen [intake-test-panic:ahead]"),
        ];
        let outcomes = pipeline.process_batch(&batch, crate::now()).await.unwrap();
        let requests: Vec<Option<String>> = outcomes
            .iter()
            .map(|o| match o {
                Outcome::Decided { applied, .. } => applied.request.as_ref().map(|k| k.to_string()),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(requests, vec![Some("IT-1".into()), Some("IT-2".into())]);
    }
}

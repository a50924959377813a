//! Unit tests for `src/outbox/mod.rs`.

use super::*;

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
    assert!(text.contains("Auto-Submitted: auto-generated"));
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
        Some("auto-generated")
    );
}

#[test]
fn backoff_grows_and_is_capped() {
    let first = backoff_secs(1, 30);
    assert!((30..=36).contains(&first), "{first}");
    assert!(backoff_secs(3, 30) >= 120);
    assert!(backoff_secs(50, 30) <= 3600 + 720);
}

//! Unit tests for `src/message/mod.rs`.

use super::*;
use proptest::prelude::*;

#[test]
fn parses_addresses_groups_and_signals() {
    let raw = b"From: =?UTF-8?Q?J=C3=BCrgen_M=C3=BCller?= <Juergen@Example.COM>\r\n\
To: undisclosed-recipients:;\r\n\
Cc: Team: a@example.com, \"B\" <b@Example.com>;, not an address, c@example.org\r\n\
Subject: [IT-7] Printer\r\n\
Message-ID: <abc@Mail.Example.com>\r\n\
In-Reply-To: <x@y.z>\r\n\
References: <r1@y.z> <x@y.z>\r\n\
Auto-Submitted: auto-replied; owner-email=x@y.z\r\n\
Precedence: Bulk\r\n\
Return-Path: <>\r\n\
Delivered-To: it@desk.example\r\n\
Authentication-Results: mx.desk.example; dmarc=pass header.from=example.com\r\n\
\r\n\
Hello\r\n";
    let m = parse(raw).unwrap();
    assert_eq!(m.from[0].address.as_str(), "juergen@example.com");
    assert_eq!(m.from[0].display_name.as_deref(), Some("Jürgen Müller"));
    assert!(m.to.is_empty());
    let cc: Vec<_> = m.cc.iter().map(|c| c.address.as_str()).collect();
    assert_eq!(cc, ["a@example.com", "b@example.com", "c@example.org"]);
    assert_eq!(m.message_id.as_deref(), Some("abc@mail.example.com"));
    assert_eq!(m.in_reply_to, ["x@y.z"]);
    assert_eq!(m.references, ["r1@y.z", "x@y.z"]);
    assert_eq!(m.signals.auto_submitted.as_deref(), Some("auto-replied"));
    assert_eq!(m.signals.precedence.as_deref(), Some("bulk"));
    assert!(m.signals.null_return_path);
    assert_eq!(m.delivered_to[0].as_str(), "it@desk.example");
    assert_eq!(m.auth_results.len(), 1);
    assert_eq!(m.text_body.trim(), "Hello");
    assert_eq!(
        m.signals.message_id_domain.as_deref(),
        Some("mail.example.com")
    );
}

#[test]
fn html_only_body_becomes_text() {
    let raw = b"From: a@example.com\r\nContent-Type: text/html\r\n\r\n<p>Hello <b>there</b></p>";
    let m = parse(raw).unwrap();
    assert!(m.text_body.contains("Hello"));
    assert!(!m.text_body.contains("<b>"));
}

#[test]
fn rejects_non_messages() {
    assert_eq!(parse(b"").unwrap_err(), ParseError::Empty);
    assert_eq!(parse(b" \r\n ").unwrap_err(), ParseError::Empty);
    assert!(parse(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1\x00\x00binary").is_err());
}

#[test]
fn nul_bytes_and_huge_message_ids_are_tamed() {
    let long_id = "x".repeat(3000);
    let raw = format!(
        "From: a@example.com\r\nMessage-ID: <{long_id}@example.com>\r\nIn-Reply-To: <{long_id}@EXAMPLE.com>\r\n\
         Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\naGkAdGhlcmU=\r\n"
    );
    let m = parse(raw.as_bytes()).unwrap();
    let id = m.message_id.clone().unwrap();
    assert!(id.starts_with("sha256:") && id.len() < 100, "{id}");
    assert_eq!(m.in_reply_to, [id], "the same ID hashes the same way");
    assert_eq!(m.text_body, "hithere");
}

#[test]
fn address_lists_are_bounded_and_deduplicated() {
    let mut raw = String::from("From: a@example.com\r\nCc: ");
    for i in 0..(MAX_ADDRESSES + 500) {
        raw.push_str(&format!("u{}@example.com, ", i % (MAX_ADDRESSES + 200)));
    }
    raw.push_str("last@example.com\r\n\r\nbody");
    let m = parse_headers(raw.as_bytes()).unwrap();
    assert_eq!(m.cc.len(), MAX_ADDRESSES);
    assert!(m.omitted_recipients > 0);
    assert_eq!(m.recipients().len(), MAX_ADDRESSES);
}

#[test]
fn leading_blank_lines_are_skipped() {
    let m = parse(b"  \r\n\r\nFrom: a@example.com\r\nSubject: hi\r\n\r\nbody").unwrap();
    assert_eq!(m.from[0].address.as_str(), "a@example.com");
    assert_eq!(m.text_body.trim(), "body");
}

#[test]
fn headers_only_leaves_the_body_for_later() {
    let raw = b"From: a@example.com\r\nContent-Type: multipart/report; report-type=delivery-status; boundary=b\r\n\r\n--b\r\n\r\ntext\r\n--b--\r\n";
    let m = parse_headers(raw).unwrap();
    assert!(m.text_body.is_empty());
    assert_eq!(m.signals.report_type.as_deref(), Some("delivery-status"));
    assert_eq!(parse_body(raw).text.trim(), "text");
}

#[test]
fn attachments_are_decoded() {
    let raw = b"From: a@example.com\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nbody\r\n--b\r\nContent-Type: application/pdf; name=\"../../x.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\naGVsbG8=\r\n--b--\r\n";
    let m = parse(raw).unwrap();
    assert_eq!(m.attachments.len(), 1);
    assert_eq!(m.attachments[0].filename, "x.pdf");
    assert_eq!(m.attachments[0].content, b"hello");
    assert_eq!(m.attachments[0].content_type, "application/pdf");
}

proptest! {
    #[test]
    fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let _ = parse(&bytes);
    }

    #[test]
    fn parse_never_panics_on_header_soup(
        headers in proptest::collection::vec(("(From|To|Cc|Subject|Message-ID|References|Authentication-Results|Content-Type)", "\\PC{0,60}"), 0..8),
        body in "\\PC{0,200}",
    ) {
        let mut raw = String::new();
        for (k, v) in headers { raw.push_str(&format!("{k}: {v}\r\n")); }
        raw.push_str("\r\n");
        raw.push_str(&body);
        let _ = parse(raw.as_bytes());
    }
}

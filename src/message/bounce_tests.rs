//! Unit tests for `src/message/bounce.rs`.

use super::*;
use proptest::prelude::*;

fn addresses(b: &Bounce) -> Vec<&str> {
    b.recipients
        .iter()
        .map(|r| r.address.as_ref().map_or("-", |a| a.as_str()))
        .collect()
}

const RFC3464: &str = "Return-Path: <>\r\n\
From: Mail Delivery System <MAILER-DAEMON@mx.example.net>\r\n\
To: desk@desk.example\r\n\
Subject: Undelivered Mail Returned to Sender\r\n\
Auto-Submitted: auto-replied\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=delivery-status;\r\n\
\tboundary=\"BOUNDARY\"\r\n\
\r\n\
--BOUNDARY\r\n\
Content-Type: text/plain; charset=us-ascii\r\n\
\r\n\
I'm sorry to have to inform you that your message could not\r\n\
be delivered to one or more recipients.\r\n\
\r\n\
<Ann@Example.COM>: host mx.example.com said: 550 5.1.1 User unknown\r\n\
\r\n\
--BOUNDARY\r\n\
Content-Type: message/delivery-status\r\n\
\r\n\
Reporting-MTA: dns; mx.example.net\r\n\
Arrival-Date: Mon, 1 Jan 2024 10:00:00 +0000\r\n\
\r\n\
Final-Recipient: rfc822; Ann@Example.COM\r\n\
Original-Recipient: rfc822;ann@example.com\r\n\
Action: failed\r\n\
Status: 5.1.1\r\n\
Remote-MTA: dns; mx.example.com\r\n\
Diagnostic-Code: smtp; 550 5.1.1 <ann@example.com>: Recipient address\r\n\
\trejected: User unknown in virtual mailbox table\r\n\
\r\n\
Final-Recipient: rfc822; bob@example.org\r\n\
Action: failed\r\n\
Status: 5.2.2\r\n\
Diagnostic-Code: smtp; 552 5.2.2 Mailbox full\r\n\
\r\n\
--BOUNDARY\r\n\
Content-Type: message/rfc822\r\n\
\r\n\
From: IT Desk <desk@desk.example>\r\n\
To: ann@example.com, bob@example.org\r\n\
Subject: Please confirm your address\r\n\
Message-ID: <verify-123@Desk.Example>\r\n\
\r\n\
Click the link.\r\n\
\r\n\
--BOUNDARY--\r\n";

#[test]
fn rfc3464_dsn() {
    let b = detect(RFC3464.as_bytes()).expect("a DSN");
    assert_eq!(b.format, BounceFormat::Dsn);
    assert_eq!(addresses(&b), ["ann@example.com", "bob@example.org"]);
    let ann = &b.recipients[0];
    assert_eq!(ann.status.as_deref(), Some("5.1.1"));
    assert_eq!(ann.action.as_deref(), Some("failed"));
    assert!(ann.permanent);
    assert_eq!(
        ann.diagnostic.as_deref(),
        Some(
            "550 5.1.1 <ann@example.com>: Recipient address rejected: User unknown in \
             virtual mailbox table"
        )
    );
    // 5.2.2 is a permanent status even though the mailbox may empty later.
    assert_eq!(b.recipients[1].status.as_deref(), Some("5.2.2"));
    assert!(b.recipients[1].permanent);
    assert_eq!(
        b.original_message_id.as_deref(),
        Some("verify-123@desk.example")
    );
    assert!(b.is_failure());
    // The same report with bare LF.
    let lf = RFC3464.replace("\r\n", "\n");
    assert_eq!(detect(lf.as_bytes()), Some(b));
}

#[test]
fn exim_text_bounce_with_x_failed_recipients() {
    let raw = r#"Return-path: <>
From: Mail Delivery System <Mailer-Daemon@mail.example.net>
To: desk@desk.example
Subject: Mail delivery failed: returning message to sender
X-Failed-Recipients: carol@example.com, dave@example.org
Auto-Submitted: auto-replied

This message was created automatically by mail delivery software.

A message that you sent could not be delivered to one or more of its
recipients. This is a permanent error. The following address(es) failed:

  carol@example.com
    SMTP error from remote mail server after RCPT TO:<carol@example.com>:
    host mx.example.com [192.0.2.1]: 550 5.1.1 <carol@example.com>: User unknown
  dave@example.org
    SMTP error from remote mail server after RCPT TO:<dave@example.org>:
    host mx.example.org [192.0.2.2]: 452 4.2.2 Mailbox over quota

------ This is a copy of the message, including all the headers. ------

Return-path: <desk@desk.example>
From: desk@desk.example
To: carol@example.com, dave@example.org
Subject: Your request
Message-Id: <E1abc-0001@desk.example>

Hello
"#;
    let b = detect(raw.as_bytes()).expect("an Exim bounce");
    assert_eq!(b.format, BounceFormat::Heuristic);
    assert_eq!(addresses(&b), ["carol@example.com", "dave@example.org"]);
    assert_eq!(b.recipients[0].status.as_deref(), Some("5.1.1"));
    assert!(b.recipients[0].permanent);
    assert_eq!(b.recipients[1].status.as_deref(), Some("4.2.2"));
    assert!(!b.recipients[1].permanent);
    assert!(
        b.recipients[0]
            .diagnostic
            .as_deref()
            .is_some_and(|d| d.contains("User unknown") && !d.contains("over quota"))
    );
    assert_eq!(
        b.original_message_id.as_deref(),
        Some("E1abc-0001@desk.example")
    );
}

#[test]
fn delayed_dsn_is_not_permanent() {
    let raw = "From: MAILER-DAEMON@mx.example.net (Mail Delivery System)\n\
To: desk@desk.example\n\
Subject: Delayed Mail (still being retried)\n\
Content-Type: multipart/report; report-type=delivery-status; boundary=\"b\"\n\
\n\
--b\n\
Content-Type: text/plain\n\
\n\
This is the mail system at host mx.example.net.\n\
\n\
####################################################################\n\
# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #\n\
####################################################################\n\
\n\
--b\n\
Content-Type: message/delivery-status\n\
\n\
Reporting-MTA: dns; mx.example.net\n\
\n\
Final-Recipient: rfc822; erin@example.com\n\
Action: delayed\n\
Status: 4.4.1\n\
Diagnostic-Code: X-Postfix; connect to mx.example.com[192.0.2.9]:25: Connection\n\
\ttimed out\n\
Will-Retry-Until: Fri, 5 Jan 2024 10:00:00 +0000\n\
\n\
--b--\n";
    let b = detect(raw.as_bytes()).expect("a delay DSN");
    assert_eq!(b.format, BounceFormat::Dsn);
    assert_eq!(addresses(&b), ["erin@example.com"]);
    let r = &b.recipients[0];
    assert_eq!(r.status.as_deref(), Some("4.4.1"));
    assert_eq!(r.action.as_deref(), Some("delayed"));
    assert!(!r.permanent);
    assert_eq!(
        r.diagnostic.as_deref(),
        Some("connect to mx.example.com[192.0.2.9]:25: Connection timed out")
    );
    assert!(b.is_failure());
}

#[test]
fn quoted_original_message_id_ties_a_bounce_to_our_mail() {
    // qmail: no MIME, the original follows a marker line.
    let raw = "Return-Path: <>\n\
From: MAILER-DAEMON@mx.example.jp\n\
To: verify@desk.example\n\
Subject: failure notice\n\
\n\
Hi. This is the qmail-send program at mx.example.jp.\n\
I'm afraid I wasn't able to deliver your message to the following addresses.\n\
This is a permanent error; I've given up. Sorry it didn't work out.\n\
\n\
<frank@example.jp>:\n\
Sorry, no mailbox here by that name. (#5.1.1)\n\
\n\
--- Below this line is a copy of the message.\n\
\n\
Return-Path: <verify@desk.example>\n\
From: IT Desk <verify@desk.example>\n\
To: frank@example.jp\n\
Subject: Confirm your address\n\
Message-ID:\n\
\t<Verify-7f3a.42@Desk.Example>\n\
\n\
Please click.\n";
    let b = detect(raw.as_bytes()).expect("a qmail bounce");
    assert_eq!(addresses(&b), ["frank@example.jp"]);
    assert_eq!(b.recipients[0].status.as_deref(), Some("5.1.1"));
    assert!(b.recipients[0].permanent);
    assert_eq!(
        b.original_message_id.as_deref(),
        Some(crate::message::clean_message_id("<Verify-7f3a.42@Desk.Example>").as_str())
    );
    assert_eq!(
        b.original_message_id.as_deref(),
        Some("Verify-7f3a.42@desk.example")
    );
}

#[test]
fn text_rfc822_headers_give_the_original_message_id() {
    let raw = RFC3464.replace(
        "Content-Type: message/rfc822\r\n",
        "Content-Type: text/rfc822-headers\r\n",
    );
    let b = detect(raw.as_bytes()).expect("a DSN");
    assert_eq!(
        b.original_message_id.as_deref(),
        Some("verify-123@desk.example")
    );
}

#[test]
fn auto_reply_is_not_a_bounce() {
    let raw = "Return-Path: <>\n\
From: Grace <grace@example.com>\n\
To: desk@desk.example\n\
Subject: Automatic reply: Your request\n\
Auto-Submitted: auto-replied\n\
X-Auto-Response-Suppress: All\n\
\n\
I am out of the office until Monday and your message will not be read before.\n\
Messages could not be delivered to me in person; for urgent matters contact\n\
helpdesk@example.com.\n";
    assert_eq!(detect(raw.as_bytes()), None);
    // A vacation notice sent by a mail system on behalf of the user is no bounce either.
    let raw = raw.replace(
        "From: Grace <grace@example.com>",
        "From: MAILER-DAEMON@example.com",
    );
    assert_eq!(detect(raw.as_bytes()), None);
}

#[test]
fn feedback_reports_and_read_receipts_are_not_bounces() {
    let arf = "From: feedback@isp.example\n\
To: abuse@desk.example\n\
Subject: FW: Your request\n\
Content-Type: multipart/report; report-type=feedback-report; boundary=\"f\"\n\
\n\
--f\n\
Content-Type: text/plain\n\
\n\
This is an email abuse report.\n\
--f\n\
Content-Type: message/feedback-report\n\
\n\
Feedback-Type: abuse\n\
Original-Rcpt-To: henry@isp.example\n\
--f--\n";
    assert_eq!(detect(arf.as_bytes()), None);
    let mdn = arf
        .replace(
            "feedback-report; boundary",
            "disposition-notification; boundary",
        )
        .replace(
            "message/feedback-report",
            "message/disposition-notification",
        );
    assert_eq!(detect(mdn.as_bytes()), None);
}

#[test]
fn success_dsn_marks_nobody_undeliverable() {
    let raw = RFC3464
        .replace("Action: failed", "Action: delivered")
        .replace("Status: 5.1.1", "Status: 2.0.0")
        .replace("Status: 5.2.2", "Status: 2.0.0");
    let b = detect(raw.as_bytes()).expect("a DSN");
    assert_eq!(b.format, BounceFormat::Dsn);
    assert!(b.recipients.iter().all(|r| !r.permanent && r.is_success()));
    assert!(!b.is_failure());
}

#[test]
fn dsn_without_blank_lines_between_recipients() {
    let raw = "From: postmaster@mx.example.net\n\
Subject: Delivery Status Notification (Failure)\n\
Content-Type: multipart/report; report-type=delivery-status; boundary=\"x\"\n\
\n\
--x\n\
Content-Type: message/delivery-status\n\
\n\
Reporting-MTA: dns; mx.example.net\n\
Action: failed\n\
Final-Recipient: rfc822;ivy@example.com\n\
Status: 5.0.0\n\
Final-Recipient: rfc822;jack@example.com\n\
Action: failed\n\
Status: 5.1.1\n\
--x--\n";
    let b = detect(raw.as_bytes()).expect("a DSN");
    assert_eq!(addresses(&b), ["ivy@example.com", "jack@example.com"]);
    assert_eq!(b.recipients[1].status.as_deref(), Some("5.1.1"));
}

#[test]
fn a_person_writing_from_postmaster_is_not_a_bounce() {
    let raw = "Return-Path: <postmaster@example.com>\n\
From: Postmaster <postmaster@example.com>\n\
To: desk@desk.example\n\
Subject: Our mail server is down\n\
\n\
Hello, since this morning mail to us is undeliverable. Can you help?\n";
    assert_eq!(detect(raw.as_bytes()), None);
}

#[test]
fn normal_mail_is_not_a_bounce() {
    let raw = "From: Kim <kim@example.com>\n\
To: desk@desk.example\n\
Subject: Fwd: Undelivered Mail Returned to Sender\n\
\n\
Why did this bounce?\n\
\n\
> This is the mail system at host mx.example.net.\n\
> <lee@example.org>: host mx.example.org said: 550 5.1.1 User unknown\n";
    assert_eq!(detect(raw.as_bytes()), None);
}

#[test]
fn amazon_ses_notifications() {
    let raw = "From: SES <no-reply@sns.amazonaws.com>\n\
Subject: AWS Notification Message\n\
Content-Type: text/plain; charset=UTF-8\n\
\n\
{\"notificationType\":\"Bounce\",\"bounce\":{\"bounceType\":\"Permanent\",\
\"bouncedRecipients\":[{\"emailAddress\":\"mia@example.com\",\"action\":\"failed\",\
\"status\":\"5.1.1\",\"diagnosticCode\":\"smtp; 550 5.1.1 user unknown\"}]}}\n";
    let b = detect(raw.as_bytes()).expect("an SES bounce");
    assert_eq!(addresses(&b), ["mia@example.com"]);
    assert!(b.recipients[0].permanent);
    assert_eq!(
        b.recipients[0].diagnostic.as_deref(),
        Some("550 5.1.1 user unknown")
    );
    let complaint = raw.replace("\"Bounce\"", "\"Complaint\"");
    assert_eq!(detect(complaint.as_bytes()), None);
}

#[test]
fn status_codes_in_text() {
    assert_eq!(
        find_status_code("said: 550 5.1.1 <a@b.c>").as_deref(),
        Some("5.1.1")
    );
    assert_eq!(
        find_status_code("#550 5.0.911 x").as_deref(),
        Some("5.0.911")
    );
    assert_eq!(find_status_code("host 192.0.2.5.1.1 and 10.4.2.2"), None);
    assert_eq!(find_status_code("Exim 4.92.3 and Postfix 3.5.6"), None);
    assert_eq!(find_status_code("(#5.1.1)").as_deref(), Some("5.1.1"));
    assert_eq!(find_status_code("4.4.7."), Some("4.4.7".to_string()));
    assert_eq!(
        find_failure_code("250 2.1.5 Ok ... 451 4.3.0 Error").as_deref(),
        Some("4.3.0")
    );
    assert_eq!(find_reply_class("host said: 550 no"), Some(5));
    assert_eq!(find_reply_class("ERROR_CODE :421, x"), Some(4));
    assert_eq!(find_reply_class("mx.example.com:587 refused"), None);
}

#[test]
fn empty_and_garbage_input() {
    assert_eq!(detect(b""), None);
    assert_eq!(detect(b"\r\n\r\n   \n"), None);
    assert_eq!(detect(b"not a message at all"), None);
    assert_eq!(detect(&[0xff, 0xfe, b'\n', b'@', b'@', 0]), None);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn never_panics_on_arbitrary_bytes(raw in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = detect(&raw);
    }

    #[test]
    fn never_panics_on_mangled_reports(cut in 0usize..RFC3464.len(), junk in "[ -~\r\n]{0,64}") {
        let mut raw = RFC3464.as_bytes()[..cut].to_vec();
        raw.extend_from_slice(junk.as_bytes());
        raw.extend_from_slice(&RFC3464.as_bytes()[cut..]);
        let _ = detect(&raw);
    }
}

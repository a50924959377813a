//! Bounces: delivery status notifications (RFC 3464) and the many non-standard formats
//! MTAs send, reduced to who could not be reached and how permanently.
//!
//! [`detect`] is pure and never panics. It parses the message once with mail-parser and
//! decides from structure and strong signals only:
//!
//! * a `message/delivery-status` (or `message/global-delivery-status`) part, or a
//!   `multipart/report; report-type=delivery-status`: [`BounceFormat::Dsn`] when the
//!   delivery-status part is there, its per-recipient blocks are the recipients;
//! * an `X-Failed-Recipients` header (Exim, Gmail, Google Groups);
//! * a mail-system sender (MAILER-DAEMON, "Mail Delivery System", also
//!   `From: MAILER-DAEMON <>`) with a typical subject or body phrase (qmail, Exim,
//!   Postfix, Sendmail, Exchange/Office 365, Yahoo, Lotus Notes, Japanese carriers, ...);
//!   a postmaster sender, who may be a person, needs more: both phrases, or one plus a
//!   null `Return-Path`, `Auto-Submitted` or the returned original, or an SMTP transcript;
//! * a null `Return-Path` with failure wording and a failure subject or the returned
//!   original;
//! * Amazon SES bounce and delivery notifications delivered by SNS email, and fml
//!   mailing-list refusals.
//!
//! Feedback reports (ARF, `report-type=feedback-report`), read receipts
//! (`disposition-notification`) and auto-replies are not bounces: `None`. Neither is a
//! bounce that a person forwards (it comes from the person, with no machine marks): that
//! is a question for the service desk.
//!
//! Success DSNs (every recipient `Action: delivered`, `relayed` or `expanded`, or a 2.x.x
//! status) are returned as a [`Bounce`] too, so the caller never opens a request for them,
//! but their recipients have `permanent == false`: [`Bounce::is_failure`] is false for
//! them and they must not mark anyone undeliverable.
//!
//! Permanence follows the status class, never the reason: `5.x.x` is permanent (even
//! "mailbox full" 5.2.2), `4.x.x` is temporary (even a final "gave up after 5 days"
//! 4.4.7), `Action: delayed`/`delivered`/`relayed`/`expanded` are never permanent.
//! Without an enhanced status code the SMTP reply code class decides (5xx/4xx), then the
//! action (`failed` is permanent, an unknown one is not), then the wording: a delay
//! warning, or giving up after temporary failures ("retry timeout exceeded"), is
//! temporary; any other failure notice is permanent.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::OnceLock;

use mail_parser::{Address, HeaderName, Message, MessageParser, MimeHeaders, PartType};

use crate::address::EmailAddress;
use crate::message::{clean_message_id, one_line};

/// What a delivery report says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bounce {
    /// In the order the report lists them.
    pub recipients: Vec<BounceRecipient>,
    /// Message-ID of the message that bounced, if the report includes its headers
    /// (`message/rfc822`, `text/rfc822-headers`, or quoted headers), cleaned with
    /// [`clean_message_id`].
    pub original_message_id: Option<String>,
    pub format: BounceFormat,
}

/// One recipient of a delivery report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BounceRecipient {
    /// The failed recipient (Final-Recipient, else Original-Recipient, X-Failed-Recipients,
    /// or the report's text).
    pub address: Option<EmailAddress>,
    /// Enhanced status code (RFC 3463) like `5.1.1`, when found.
    pub status: Option<String>,
    /// DSN `Action`, lowercased: failed, delayed, delivered, relayed, expanded.
    pub action: Option<String>,
    /// One line, at most [`MAX_DIAGNOSTIC_CHARS`] characters.
    pub diagnostic: Option<String>,
    /// True for a hard bounce (5.x.x, or Action failed without a 4.x.x status); false for a
    /// soft or temporary one (4.x.x, Action delayed) and for success notices.
    pub permanent: bool,
}

/// How the report was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BounceFormat {
    /// RFC 3464: a `message/delivery-status` part.
    Dsn,
    /// Anything else: vendor text, `X-Failed-Recipients`, notification services.
    Heuristic,
}

impl Bounce {
    /// True unless every recipient was delivered, relayed or expanded (a success DSN).
    pub fn is_failure(&self) -> bool {
        self.recipients.is_empty() || self.recipients.iter().any(|r| !r.is_success())
    }
}

impl BounceRecipient {
    /// Action delivered, relayed or expanded, or a 2.x.x status: the report says the
    /// message got through.
    pub fn is_success(&self) -> bool {
        matches!(
            self.action.as_deref(),
            Some("delivered" | "relayed" | "expanded")
        ) || self.status.as_deref().is_some_and(|s| s.starts_with('2'))
    }
}

/// The diagnostic is cut to this many characters.
pub const MAX_DIAGNOSTIC_CHARS: usize = 500;
/// At most this many bytes of each text part are scanned.
const SCAN_LIMIT: usize = 256 * 1024;
/// At most this many recipients are read from one report.
const MAX_RECIPIENTS: usize = 1000;
/// Failure and delay wording is looked for in this many bytes of the report's prose.
const PHRASE_SCAN_LIMIT: usize = 32 * 1024;
/// At most this many recipients are read from a report's prose.
const MAX_TEXT_RECIPIENTS: usize = 100;
/// At most this many text parts are scanned.
const MAX_TEXT_PARTS: usize = 8;

/// Whether a message's headers leave room for a delivery report, so that [`detect`]
/// (a full MIME parse) runs only for those. Deliberately broad: every report the
/// corpus test recognises passes it (see `tests/bounces.rs`); mail from people, with a
/// person's From, no report type, a normal Return-Path and an ordinary subject, does not.
pub fn worth_checking(msg: &crate::message::InboundMessage) -> bool {
    let s = &msg.signals;
    if s.report_type.is_some()
        || s.null_return_path
        || s.from_mail_system
        || s.failed_recipients
        || s.auto_submitted.as_deref().is_some_and(|v| v != "no")
    {
        return true;
    }
    let Some(from) = msg.from_mailbox() else {
        return true;
    };
    let local = from.address.local_part();
    let domain = from.address.domain();
    let name = from
        .display_name
        .as_deref()
        .unwrap_or_default()
        .to_ascii_lowercase();
    if from.address.is_mailer_daemon()
        || local.contains("daemon")
        || local.contains("bounce")
        || local.contains("postmaster")
        || local.contains("post_master")
        || local.contains("noreply")
        || local.contains("no-reply")
        || local.ends_with("-admin")
        || local.starts_with("fml")
        || domain.ends_with("amazonaws.com")
        || domain.ends_with("amazonses.com")
        || name.contains("mail deliver")
        || name.contains("postmaster")
        || name.contains("daemon")
    {
        return true;
    }
    let subject = msg
        .subject
        .as_deref()
        .unwrap_or_default()
        .to_ascii_lowercase();
    // Substrings: "deliver" also stands for undeliverable and non-delivery, "fail"
    // for failure and failed, "return" for returned. Not "problem": it is in many a
    // customer's subject ("Problem with the VPN") and in no report subject without
    // "deliver" too; every report in the corpus passes on its headers before this.
    [
        "deliver",
        "return",
        "fail",
        "bounce",
        "rejected",
        "error",
        "notification",
        "warning",
        "delay",
        "unable",
        "could not",
        "mail system",
        "エラー",
        "不達",
        "配信",
    ]
    .iter()
    .any(|w| subject.contains(w))
}

/// Whether the message is a delivery failure report, and what it says. `raw` is the whole
/// message. Never panics.
pub fn detect(raw: &[u8]) -> Option<Bounce> {
    let raw = trim_leading_blank_lines(raw);
    if raw.is_empty() {
        return None;
    }
    std::panic::catch_unwind(AssertUnwindSafe(|| {
        let parsed = parser().parse(raw)?;
        analyse(&parsed)
    }))
    .ok()
    .flatten()
}

/// MIME, address, Message-ID and subject headers parsed; the rest (Received above all)
/// stays raw, as in [`crate::message`].
fn parser() -> &'static MessageParser {
    static PARSER: OnceLock<MessageParser> = OnceLock::new();
    PARSER.get_or_init(|| {
        MessageParser::new()
            .with_mime_headers()
            .with_address_headers()
            .with_message_ids()
            .header_text(HeaderName::Subject)
    })
}

/// Skips leading lines that are blank or whitespace only.
fn trim_leading_blank_lines(raw: &[u8]) -> &[u8] {
    let mut start = 0;
    while start < raw.len() {
        let rest = &raw[start..];
        let end = rest.iter().position(|&b| b == b'\n');
        let line = match end {
            Some(i) => &rest[..i],
            None => rest,
        };
        if !line.iter().all(|b| b.is_ascii_whitespace()) {
            return rest;
        }
        match end {
            Some(i) => start += i + 1,
            None => return &raw[raw.len()..],
        }
    }
    &raw[raw.len()..]
}

// ---------------------------------------------------------------------------------------
// Facts about the message
// ---------------------------------------------------------------------------------------

/// What the top-level headers say.
#[derive(Default)]
struct Envelope {
    /// Unfolded, ASCII-lowercased `From` header as written.
    from_raw: String,
    /// Lowercased addresses of the bounce's own From/To/Reply-To/Return-Path: never the
    /// failed recipient.
    own_addresses: Vec<String>,
    subject: String,
    null_return_path: bool,
    failed_recipients: Vec<String>,
    report_type: Option<String>,
    autoreply_header: bool,
    auto_submitted: Option<String>,
    ses_sender: bool,
    fml_list: bool,
}

/// The message that bounced, as far as the report includes it.
#[derive(Default)]
struct Original {
    message_id: Option<String>,
    recipients: Vec<String>,
    senders: Vec<String>,
    found: bool,
}

#[derive(Default)]
struct Parts {
    dsn: Vec<String>,
    negative_report: bool,
    texts: Vec<String>,
    htmls: Vec<String>,
    original: Original,
}

fn analyse(msg: &Message<'_>) -> Option<Bounce> {
    let env = envelope(msg);
    if matches!(
        env.report_type.as_deref(),
        Some("feedback-report" | "disposition-notification")
    ) {
        return None;
    }
    let mut parts = collect_parts(msg);
    if parts.negative_report && parts.dsn.is_empty() {
        return None;
    }
    if parts.texts.is_empty() {
        parts.texts = std::mem::take(&mut parts.htmls)
            .into_iter()
            .map(|h| cap(mail_parser::decoders::html::html_to_text(&h)))
            .collect();
    }
    let (notice, quoted) = notice_text(&parts.texts);
    if !parts.original.found
        && let Some(q) = quoted
    {
        let mut original = Original::default();
        read_original_headers(q, &mut original);
        parts.original = original;
    }
    // Wording is looked for near the top: reports say what they are in the first lines.
    let notice_lc = head(&notice, PHRASE_SCAN_LIMIT).to_ascii_lowercase();
    let lines = Lines::new(&notice);

    // RFC 3464.
    let mut dsn_recipients = Vec::new();
    let mut dsn_message_id = None;
    for body in &parts.dsn {
        let (recipients, mid) = parse_dsn(body);
        dsn_recipients.extend(recipients);
        if dsn_message_id.is_none() {
            dsn_message_id = mid;
        }
    }
    let is_dsn = !parts.dsn.is_empty();
    let structural = is_dsn || env.report_type.as_deref() == Some("delivery-status");

    let mut exclude: Vec<String> = env.own_addresses.clone();
    for s in &parts.original.senders {
        push_unique(&mut exclude, s);
    }

    let original_message_id = parts
        .original
        .message_id
        .clone()
        .or(dsn_message_id)
        .or_else(|| quoted_message_id(&parts.texts))
        .map(|m| clean_message_id(&m))
        .filter(|m| !m.is_empty());

    if structural {
        let mut recipients = dsn_recipients;
        if recipients.is_empty() {
            recipients = heuristic_recipients(&env, &parts, &notice, &notice_lc, &lines, &exclude);
        } else {
            fill_from_text(&mut recipients, &env, &lines, &exclude);
        }
        return Some(Bounce {
            recipients,
            original_message_id,
            format: if is_dsn {
                BounceFormat::Dsn
            } else {
                BounceFormat::Heuristic
            },
        });
    }

    if env.ses_sender {
        return ses_notification(&parts.texts).map(|recipients| Bounce {
            recipients,
            original_message_id: None,
            format: BounceFormat::Heuristic,
        });
    }

    if !looks_like_bounce(&env, &notice_lc, parts.original.found) {
        return None;
    }
    let recipients = heuristic_recipients(&env, &parts, &notice, &notice_lc, &lines, &exclude);
    Some(Bounce {
        recipients,
        original_message_id,
        format: BounceFormat::Heuristic,
    })
}

fn envelope(msg: &Message<'_>) -> Envelope {
    let mut env = Envelope {
        subject: msg.subject().unwrap_or("").to_ascii_lowercase(),
        ..Envelope::default()
    };
    for (name, raw_value) in msg.headers_raw() {
        let name = name.to_ascii_lowercase();
        if !matches!(
            name.as_str(),
            "from"
                | "return-path"
                | "x-failed-recipients"
                | "auto-submitted"
                | "x-autoreply"
                | "x-autorespond"
                | "x-auto-reply"
                | "x-autoresponder"
                | "x-autogenerated"
                | "x-ms-exchange-inbox-rules-loop"
                | "x-mlserver"
        ) {
            continue;
        }
        let value = one_line(raw_value, 4096);
        match name.as_str() {
            "from" if env.from_raw.is_empty() => env.from_raw = value.to_ascii_lowercase(),
            "return-path" => {
                let v = value.trim();
                let local = v
                    .trim_matches(['<', '>'])
                    .split('@')
                    .next()
                    .unwrap_or("")
                    .to_ascii_lowercase();
                // Null, or the null sender as some MTAs rewrite it.
                if v == "<>"
                    || v.is_empty()
                    || v == "<<>>"
                    || matches!(local.as_str(), "mailer-daemon" | "double-bounce")
                {
                    env.null_return_path = true;
                } else if let Some(a) = first_address(v) {
                    push_unique(&mut env.own_addresses, &a);
                }
            }
            "x-failed-recipients" => {
                for a in addresses_in(&value) {
                    push_unique(&mut env.failed_recipients, &a.1);
                }
            }
            "auto-submitted" if env.auto_submitted.is_none() => {
                env.auto_submitted = Some(value.to_ascii_lowercase());
            }
            "x-autoreply"
            | "x-autorespond"
            | "x-auto-reply"
            | "x-autoresponder"
            | "x-autogenerated"
            | "x-ms-exchange-inbox-rules-loop" => {
                env.autoreply_header = true;
            }
            "x-mlserver" if value.to_ascii_lowercase().contains("fml") => env.fml_list = true,
            _ => {}
        }
    }
    for header in [msg.from(), msg.to(), msg.reply_to(), msg.sender()]
        .into_iter()
        .flatten()
    {
        for a in address_list(header) {
            push_unique(&mut env.own_addresses, &a);
        }
    }
    env.ses_sender = env.from_raw.contains("no-reply@sns.amazonaws.com");
    if let Some(ct) = msg.root_part().content_type()
        && ct.ctype().eq_ignore_ascii_case("multipart")
        && ct
            .subtype()
            .is_some_and(|s| s.eq_ignore_ascii_case("report"))
    {
        env.report_type = Some(
            ct.attribute("report-type")
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase(),
        );
    }
    env
}

fn address_list(address: &Address<'_>) -> Vec<String> {
    address
        .iter()
        .filter_map(|a| a.address.as_deref())
        .filter_map(|a| EmailAddress::parse(a).ok())
        .map(|a| a.as_str().to_string())
        .collect()
}

fn collect_parts(msg: &Message<'_>) -> Parts {
    let mut parts = Parts::default();
    for (index, part) in msg.parts.iter().enumerate() {
        if index > 0 && !parts.original.found {
            // The original's headers spilled into a MIME part's own headers (a part that
            // begins without a blank line before the returned message).
            if let Some(id) = part
                .headers()
                .iter()
                .find(|h| h.name == HeaderName::MessageId)
                .and_then(|h| h.value.as_text())
            {
                parts.original.found = true;
                parts.original.message_id = Some(id.to_string());
            }
        }
        let (ctype, subtype) = match part.content_type() {
            Some(ct) => (
                ct.ctype().to_ascii_lowercase(),
                ct.subtype().unwrap_or("").to_ascii_lowercase(),
            ),
            None => (String::new(), String::new()),
        };
        match (ctype.as_str(), subtype.as_str()) {
            ("message", "delivery-status" | "global-delivery-status") => {
                parts.dsn.push(cap_bytes(part.contents()));
                continue;
            }
            ("message", "feedback-report" | "disposition-notification")
            | ("message", "global-disposition-notification") => {
                parts.negative_report = true;
                continue;
            }
            ("text", "rfc822-headers") | ("text", "rfc822-header") => {
                if !parts.original.found {
                    read_original_headers(&cap_bytes(part.contents()), &mut parts.original);
                }
                continue;
            }
            _ => {}
        }
        match &part.body {
            PartType::Message(nested) if !parts.original.found => {
                read_original(nested, &mut parts.original);
            }
            PartType::Text(text) => {
                if ctype == "message" {
                    // A message/rfc822 the parser could not read as a message.
                    if !parts.original.found {
                        read_original_headers(&cap(text.to_string()), &mut parts.original);
                    }
                } else if parts.texts.len() < MAX_TEXT_PARTS {
                    parts.texts.push(cap_str(text));
                }
            }
            PartType::Html(html) if parts.htmls.len() < MAX_TEXT_PARTS => {
                parts.htmls.push(cap_str(html));
            }
            // A multipart without a usable boundary, or text the parser gave up on.
            PartType::Binary(bin) | PartType::InlineBinary(bin)
                if matches!(ctype.as_str(), "multipart" | "text" | "")
                    && parts.texts.len() < MAX_TEXT_PARTS =>
            {
                parts.texts.push(cap_bytes(bin));
            }
            PartType::Binary(bin) | PartType::InlineBinary(bin)
                if ctype == "message" && !parts.original.found =>
            {
                read_original_headers(&cap_bytes(bin), &mut parts.original);
            }
            _ => {}
        }
    }
    parts
}

fn read_original(nested: &Message<'_>, original: &mut Original) {
    original.found = true;
    original.message_id = nested.message_id().map(str::to_string);
    for a in nested
        .to()
        .into_iter()
        .chain(nested.cc())
        .flat_map(address_list)
    {
        push_unique(&mut original.recipients, &a);
    }
    for a in nested
        .from()
        .into_iter()
        .chain(nested.sender())
        .chain(nested.reply_to())
        .flat_map(address_list)
    {
        push_unique(&mut original.senders, &a);
    }
    if let Some(rp) = nested.return_address()
        && let Ok(a) = EmailAddress::parse(rp)
    {
        push_unique(&mut original.senders, a.as_str());
    }
    if original.message_id.is_none() && nested.parts.is_empty() {
        read_original_headers(&String::from_utf8_lossy(nested.raw_message()), original);
    }
}

/// Reads Message-ID, To/Cc and From of the original from a header block given as text.
fn read_original_headers(text: &str, original: &mut Original) {
    original.found = true;
    for (name, value) in header_fields(text, true) {
        match name.as_str() {
            "message-id" if original.message_id.is_none() => {
                if let Some(id) = message_id_token(&value) {
                    original.message_id = Some(id);
                }
            }
            "to" | "cc" => {
                for (_, a) in addresses_in(&value) {
                    push_unique(&mut original.recipients, &a);
                }
            }
            "from" | "sender" | "reply-to" | "return-path" => {
                for (_, a) in addresses_in(&value) {
                    push_unique(&mut original.senders, &a);
                }
            }
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------
// RFC 3464
// ---------------------------------------------------------------------------------------

/// Header-style fields of `text`, names lowercased, folded lines joined. With
/// `stop_at_blank`, reading ends at the first blank line after a field.
fn header_fields(text: &str, stop_at_blank: bool) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in text.lines().take(20_000) {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            if stop_at_blank && !out.is_empty() {
                break;
            }
            continue;
        }
        if line.starts_with([' ', '\t']) {
            if let Some(last) = out.last_mut() {
                last.1.push(' ');
                last.1.push_str(line.trim());
            }
            continue;
        }
        if let Some((name, value)) = line.split_once(':')
            && is_field_name(name)
        {
            out.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }
    out
}

fn is_field_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 76
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A DSN recipient block being read.
#[derive(Default)]
struct DsnRecipient {
    final_recipient: Option<String>,
    original_recipient: Option<String>,
    action: Option<String>,
    status: Option<String>,
    diagnostic: Option<String>,
    has_recipient_field: bool,
}

impl DsnRecipient {
    fn repeats(&self, name: &str) -> bool {
        match name {
            "final-recipient" => self.final_recipient.is_some(),
            "original-recipient" => self.original_recipient.is_some(),
            "action" => self.action.is_some(),
            "status" => self.status.is_some(),
            _ => false,
        }
    }

    fn set(&mut self, name: &str, value: String) {
        match name {
            "final-recipient" => {
                self.final_recipient = Some(value);
                self.has_recipient_field = true;
            }
            "original-recipient" => {
                self.original_recipient = Some(value);
                self.has_recipient_field = true;
            }
            "action" => {
                self.action = value
                    .split(|c: char| c.is_whitespace() || c == '(' || c == ';')
                    .find(|t| !t.is_empty())
                    .map(|t| t.to_ascii_lowercase());
            }
            "status" => self.status = Some(value),
            _ => {}
        }
    }

    fn is_empty(&self) -> bool {
        !self.has_recipient_field && self.action.is_none() && self.status.is_none()
    }

    fn finish(self) -> BounceRecipient {
        let address = self
            .final_recipient
            .as_deref()
            .and_then(dsn_address)
            .or_else(|| self.original_recipient.as_deref().and_then(dsn_address));
        let status = self
            .status
            .as_deref()
            .and_then(find_status_code)
            .or_else(|| self.diagnostic.as_deref().and_then(find_status_code));
        let reply_class = self.diagnostic.as_deref().and_then(find_reply_class);
        let permanent = permanence(
            self.action.as_deref(),
            status.as_deref(),
            reply_class,
            false,
        );
        BounceRecipient {
            address,
            status,
            action: self.action,
            diagnostic: self
                .diagnostic
                .map(|d| one_line(strip_diagnostic_type(&d), MAX_DIAGNOSTIC_CHARS))
                .filter(|d| !d.is_empty()),
            permanent,
        }
    }
}

/// Recipients and the per-message `X-Original-Message-ID` of a delivery-status body.
fn parse_dsn(body: &str) -> (Vec<BounceRecipient>, Option<String>) {
    let mut recipients: Vec<BounceRecipient> = Vec::new();
    let mut message_id = None;
    let mut current = DsnRecipient::default();
    // Fields are read block by block (blocks are separated by blank lines); a repeated
    // recipient field also starts a new recipient, for reports without blank lines.
    let mut pending: Vec<(String, String)> = Vec::new();
    let mut blocks: Vec<Vec<(String, String)>> = Vec::new();
    for line in body.lines().take(50_000) {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            if !pending.is_empty() {
                blocks.push(std::mem::take(&mut pending));
            }
            continue;
        }
        if line.starts_with([' ', '\t']) {
            if let Some(last) = pending.last_mut() {
                last.1.push(' ');
                last.1.push_str(line.trim());
            }
            continue;
        }
        if let Some((name, value)) = line.split_once(':')
            && is_field_name(name.trim())
        {
            pending.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }
    if !pending.is_empty() {
        blocks.push(pending);
    }

    for block in blocks {
        let has_recipient = block
            .iter()
            .any(|(n, _)| n == "final-recipient" || n == "original-recipient");
        let has_result = block.iter().any(|(n, _)| n == "action" || n == "status");
        if !has_recipient && !has_result {
            for (name, value) in &block {
                if matches!(
                    name.as_str(),
                    "x-original-message-id" | "original-message-id"
                ) && message_id.is_none()
                {
                    message_id = message_id_token(value);
                }
            }
            continue;
        }
        if !has_recipient && current.has_recipient_field && current.action.is_none() {
            // Action/Status separated from their recipient by a blank line: same recipient.
        } else if !current.is_empty() {
            push_recipient(&mut recipients, std::mem::take(&mut current));
        }
        for (name, value) in block {
            match name.as_str() {
                "final-recipient" | "original-recipient" | "action" | "status"
                    if current.repeats(&name) =>
                {
                    // The same field again in one block: the next recipient begins (some
                    // MTAs leave out the blank line between recipients).
                    push_recipient(&mut recipients, std::mem::take(&mut current));
                    current.set(&name, value);
                }
                "final-recipient" | "original-recipient" | "action" | "status" => {
                    current.set(&name, value);
                }
                "diagnostic-code" if current.diagnostic.is_none() => {
                    current.diagnostic = Some(value);
                }
                "x-original-message-id" | "original-message-id" if message_id.is_none() => {
                    message_id = message_id_token(&value);
                }
                _ => {}
            }
        }
    }
    if !current.is_empty() {
        push_recipient(&mut recipients, current);
    }
    (recipients, message_id)
}

fn push_recipient(recipients: &mut Vec<BounceRecipient>, r: DsnRecipient) {
    if recipients.len() < MAX_RECIPIENTS && !r.is_empty() {
        recipients.push(r.finish());
    }
}

/// `rfc822; <a@b.c>` → the address.
fn dsn_address(value: &str) -> Option<EmailAddress> {
    let v = match value.split_once(';') {
        Some((kind, rest)) if is_field_name(kind.trim()) => rest,
        _ => value,
    };
    let v = v.trim();
    let v = v.split(" (").next().unwrap_or(v).trim();
    EmailAddress::parse(v)
        .ok()
        .or_else(|| first_address(v).and_then(|a| EmailAddress::parse(&a).ok()))
}

/// `smtp; 550 ...` → `550 ...`.
fn strip_diagnostic_type(value: &str) -> &str {
    match value.split_once(';') {
        Some((kind, rest)) if is_field_name(kind.trim()) && kind.len() <= 20 => rest.trim(),
        _ => value.trim(),
    }
}

/// Decides hard or soft, see the module documentation.
fn permanence(
    action: Option<&str>,
    status: Option<&str>,
    reply_class: Option<u8>,
    delay_wording: bool,
) -> bool {
    if matches!(
        action,
        Some("delayed" | "delivered" | "relayed" | "expanded")
    ) {
        return false;
    }
    match status.and_then(|s| s.bytes().next()) {
        Some(b'5') => return true,
        Some(b'4' | b'2') => return false,
        _ => {}
    }
    match reply_class {
        Some(5) => return true,
        Some(4) => return false,
        _ => {}
    }
    match action {
        Some("failed") => true,
        // An action we do not know, without any code: nothing says the address is bad.
        Some(_) => false,
        None => !delay_wording,
    }
}

// ---------------------------------------------------------------------------------------
// Non-standard reports
// ---------------------------------------------------------------------------------------

/// Local parts and display-name words of mail systems: never a person.
const DAEMON_MARKERS: &[&str] = &[
    "mailer-daemon",
    "mailer daemon",
    "mailer_daemon",
    "mailerdaemon",
    "mail-daemon",
    "mail delivery",
    "mail deliver system",
    "mail.delivery.system",
    "ndr administrator",
    "interscan",
];

/// Senders that are mail administrators: usually the mail system, sometimes a person
/// writing about mail problems.
const ADMIN_MARKERS: &[&str] = &["postmaster", "post_master", "mail administrator"];

/// Subject phrases of failure and delay notices.
const SUBJECT_PHRASES: &[&str] = &[
    "undeliverable",
    "undelivered",
    "undeliverd",
    "returned mail",
    "returned to sender",
    "returning message",
    "delivery status notification",
    "delivery notification",
    "delivery failure",
    "delivery failed",
    "delivery has failed",
    "failed delivery",
    "failure delivery",
    "failure notice",
    "delivery error",
    "delivery problem",
    "could not be delivered",
    "couldn't be delivered",
    "not delivered",
    "non-delivery",
    "nondeliverable",
    "non deliverable",
    "mail system error",
    "delayed mail",
    "message delayed",
    "delivery delayed",
    "warning: message",
    "could not send",
    "mail failure",
    "mail delivery",
    "error sending your mail",
    "email delivery error",
    "delivery status",
    "permanent error",
    "メールエラー",
    "配信エラー",
    "送信エラー",
];

/// Body phrases of failure and delay notices (ASCII-lowercased text).
const BODY_PHRASES: &[&str] = &[
    "this is the qmail-send program",
    "this message was created automatically by mail delivery software",
    "delivery has failed to these recipients",
    "could not be delivered",
    "couldn't be delivered",
    "could not deliver",
    "was not delivered",
    "wasn't delivered",
    "not be delivered",
    "has not yet been delivered",
    "unable to deliver",
    "failed to deliver",
    "delivery to the following recipient",
    "did not reach the following recipient",
    "delivery to the following recipients",
    "the following address(es) failed",
    "the following addresses had permanent fatal errors",
    "the following recipient(s) could not be reached",
    "following recipients",
    "transcript of session follows",
    "the original message was received at",
    "permanent error",
    "permanent fatal error",
    "permanent failure",
    "delivery failed",
    "delivery failure",
    "message delivery has failed",
    "undeliverable",
    "undelivered",
    "user unknown",
    "unknown user",
    "no such user",
    "invalid recipient",
    "recipient address rejected",
    "mailbox unavailable",
    "mailbox is full",
    "mailbox full",
    "over quota",
    "returned to sender",
    "returned mail",
    "could not send message",
    "could not send mail",
    "error occurred while sending",
    "there was an error sending",
    "error message below",
    "invalid user address",
    "your message to",
    "remote host said",
    "送信できませんでした",
    "配信できませんでした",
    "届きませんでした",
    "送信に失敗",
    "宛先",
];

/// Wording of delay warnings (the message is still queued).
const DELAY_PHRASES: &[&str] = &[
    "delayed",
    "(delay)",
    "still being retried",
    "will continue",
    "will keep trying",
    "will be retried",
    "will retry",
    "has not yet been delivered",
    "not yet been delivered",
    "could not send message for past",
    "could not send mail for past",
    "warning: could not",
    "warning--could not",
    "delivery status notification: warning",
    "delivery status notification (delay)",
];

/// Wording of reports that give up after temporary failures: the address was never
/// refused, so without a status code such a report is not a hard bounce.
const EXPIRY_PHRASES: &[&str] = &[
    "retry timeout exceeded",
    "retry time not reached",
    "have been failing for a long time",
    "in the queue too long",
    "too long in queue",
    "message expired",
    "envelope expired",
    "delivery time expired",
    "cannot send message for",
    "could not send message for",
    "could not be delivered within",
];

/// Subjects of auto-replies and out-of-office notices.
const AUTOREPLY_SUBJECTS: &[&str] = &[
    "auto:",
    "automatic reply",
    "auto reply",
    "auto-reply",
    "autoreply",
    "autorespons",
    "auto response",
    "out of office",
    "out of the office",
    "away until",
    "vacation",
    "abwesenheit",
    "absence",
];

fn contains_any(haystack: &str, needles: &[&str]) -> bool {
    needles.iter().any(|n| haystack.contains(n))
}

/// KDDI (au) returns mail from `no-reply@` addresses of these domains.
const CARRIER_BOUNCE_DOMAINS: &[&str] = &[".dion.ne.jp", "auone-net.jp"];

fn looks_like_bounce(env: &Envelope, notice_lc: &str, returns_original: bool) -> bool {
    if !env.failed_recipients.is_empty() {
        return true;
    }
    let subject_phrase = contains_any(&env.subject, SUBJECT_PHRASES);
    let body_phrase = contains_any(notice_lc, BODY_PHRASES);
    let daemon = contains_any(&env.from_raw, DAEMON_MARKERS)
        || (env.from_raw.contains("no-reply@")
            && contains_any(&env.from_raw, CARRIER_BOUNCE_DOMAINS));
    let admin = contains_any(&env.from_raw, ADMIN_MARKERS);
    let autoreply = contains_any(&env.subject, AUTOREPLY_SUBJECTS) || env.autoreply_header;
    if autoreply && !((daemon || admin) && subject_phrase) {
        return false;
    }
    if env.fml_list
        && (env.subject.contains("are not member") || env.subject.contains("loop alert"))
    {
        return true;
    }
    // Machine-made: a null sender, Auto-Submitted, or the returned original attached.
    let automatic = env.null_return_path
        || env
            .auto_submitted
            .as_deref()
            .is_some_and(|a| !a.starts_with("no"))
        || returns_original;
    if daemon {
        return subject_phrase || body_phrase;
    }
    if admin {
        // A postmaster may write to the service desk about mail problems in person: the
        // sender alone needs both wordings, or one plus a machine mark or an SMTP
        // transcript.
        let transcript = notice_lc.contains("rcpt to")
            && notice_lc.lines().any(|l| find_reply_class(l).is_some());
        return (subject_phrase && body_phrase)
            || (automatic && (subject_phrase || body_phrase))
            || (transcript && body_phrase);
    }
    // A null sender alone is common to all automatic mail; with failure wording and
    // either a failure subject or the returned original, it is a bounce.
    env.null_return_path && body_phrase && (subject_phrase || returns_original)
}

/// The human-readable part of the report: each text part up to the point where the
/// original message is quoted.
/// Also returns the text after the first such point: the quoted original.
fn notice_text(texts: &[String]) -> (String, Option<&str>) {
    let mut out = String::new();
    let mut quoted = None;
    for text in texts {
        let mut offset = 0;
        for line in text.split_inclusive('\n') {
            offset += line.len();
            if is_original_marker(&line.to_ascii_lowercase()) {
                if quoted.is_none() {
                    quoted = text.get(offset..);
                }
                break;
            }
            if out.len() >= SCAN_LIMIT {
                break;
            }
            out.push_str(line.trim_end_matches(['\r', '\n']));
            out.push('\n');
        }
    }
    (out, quoted)
}

fn is_original_marker(line_lc: &str) -> bool {
    let t = line_lc.trim().trim_start_matches('>').trim();
    if t.contains("below this line is a copy of the message")
        || t.contains("this is a copy of the message")
        || t.contains("this is a copy of your message")
        || t.contains("below is a copy of")
        || t.contains("included is a copy of")
        || t.contains("copy of the message header")
        || t.contains("copy of the original message")
        || t.contains("original message follows")
        || t.contains("unsent message follows")
        || t.contains("message headers follow")
        || t.contains("original message headers")
        || t.contains("header of the original message")
        || t.contains("headers of the original message")
        || t.starts_with("content-type: message/rfc822")
    {
        return true;
    }
    let ruled = t.starts_with("--")
        || t.starts_with("==")
        || t.starts_with("**")
        || t.starts_with("__")
        || t.ends_with("--");
    ruled
        && contains_any(
            t,
            &[
                "original message",
                "copy of",
                "message follows",
                "returned message",
                "header follows",
                "headers follow",
                "original mail",
                "message text follows",
                "original e-mail",
                "message header",
            ],
        )
}

/// Lines that name addresses which are not failed recipients: the original's headers,
/// envelope senders, message ids.
fn is_excluded_line(line_lc: &str) -> bool {
    let t = line_lc.trim().trim_start_matches(['>', ' ']).trim_start();
    const PREFIXES: &[&str] = &[
        "from:",
        "sender:",
        "reply-to:",
        "return-path:",
        "message-id:",
        "message id:",
        "in-reply-to:",
        "references:",
        "received:",
        "errors-to:",
        "envelope-from",
        "mail from",
        ">>> mail from",
        "resent-from:",
        "list-",
        "dkim-signature",
        "x-",
        "cc:",
        "date:",
        "by ",
        "id ",
        "for <",
        "(envelope-from",
    ];
    PREFIXES.iter().any(|p| t.starts_with(p))
        || t.contains("mail from:")
        || t.contains("message-id")
        || t.contains("envelope-from")
}

/// Addresses that are never the failed recipient.
fn is_excluded_address(address: &str, exclude: &[String]) -> bool {
    let local = address.split('@').next().unwrap_or("");
    exclude.iter().any(|e| e == address)
        || matches!(
            local,
            "mailer-daemon" | "postmaster" | "mailer_daemon" | "post_master" | "abuse"
        )
}

/// Failed recipients of a non-standard report, in order, with their codes.
fn heuristic_recipients(
    env: &Envelope,
    parts: &Parts,
    notice: &str,
    notice_lc: &str,
    lines: &Lines<'_>,
    exclude: &[String],
) -> Vec<BounceRecipient> {
    let delay = contains_any(&env.subject, DELAY_PHRASES) || contains_any(notice_lc, DELAY_PHRASES);
    let expiry = contains_any(notice_lc, EXPIRY_PHRASES);

    // DSN fields quoted in the text (broken MIME, forwarded or inline reports).
    let mut embedded = Vec::new();
    if notice_lc.contains("final-recipient:") {
        let start = notice_lc.find("final-recipient:").unwrap_or(0);
        let from = notice[..start].rfind('\n').map_or(0, |i| i + 1);
        let block: String = notice[from..]
            .lines()
            .map(|l| l.trim_start_matches(['>', ' ']))
            .collect::<Vec<_>>()
            .join("\n");
        embedded = parse_dsn(&block).0;
        embedded.retain(|r| r.address.is_some());
    }

    let mut addresses: Vec<String> = env.failed_recipients.clone();
    if addresses.is_empty() && !embedded.is_empty() {
        return embedded;
    }
    if addresses.is_empty() {
        addresses = if env.fml_list {
            // fml names the list that refused the post first, then its help addresses.
            lines
                .addresses
                .iter()
                .flatten()
                .map(|(_, a)| a)
                .find(|a| !is_excluded_address(a, exclude))
                .cloned()
                .into_iter()
                .collect()
        } else {
            text_addresses(lines, |a| is_excluded_address(a, exclude))
        };
    }
    if addresses.is_empty() {
        // Nothing but addresses we took for the sender's or the mail system's: a message
        // to oneself, or to postmaster. Only the report's own From is never the recipient.
        let from = first_address(&env.from_raw);
        addresses = text_addresses(lines, |a| Some(a) == from.as_deref());
    }
    if addresses.is_empty() && parts.original.recipients.len() == 1 {
        addresses = parts.original.recipients.clone();
    }
    if addresses.is_empty() && env.fml_list {
        // A mailing list refusing the post: the list is who could not be reached.
        addresses = parts.original.recipients.clone();
    }
    let global_status = find_failure_code(notice);
    let global_reply = lines
        .text
        .iter()
        .filter(|l| looks_like_smtp_line(l))
        .find_map(|l| find_reply_class(l));

    addresses.truncate(MAX_TEXT_RECIPIENTS);
    let candidates = addresses.clone();
    addresses
        .into_iter()
        .map(|a| {
            let window = recipient_window(&a, &candidates, lines);
            let status = find_failure_code(&window).or_else(|| global_status.clone());
            let reply = find_reply_class(&window).or(global_reply);
            let from_embedded = embedded
                .iter()
                .find(|r| r.address.as_ref().is_some_and(|x| x.as_str() == a));
            if let Some(r) = from_embedded {
                return r.clone();
            }
            let address = EmailAddress::parse(&a).ok();
            // Wording about giving up after temporary failures counts only where it is
            // next to this address, or when the report names no other recipient.
            let window_lc = window.to_ascii_lowercase();
            let expired =
                contains_any(&window_lc, EXPIRY_PHRASES) || (expiry && candidates.len() == 1);
            let permanent = permanence(None, status.as_deref(), reply, delay || expired);
            let diagnostic =
                Some(one_line(&window, MAX_DIAGNOSTIC_CHARS)).filter(|d| !d.is_empty());
            BounceRecipient {
                address,
                status,
                action: None,
                diagnostic,
                permanent,
            }
        })
        .collect()
}

/// The addresses a report's text names as failed, in order.
///
/// Lines that quote senders or ids are skipped. An address counts as named as a
/// recipient when it starts its line (`<a@b>: host said`, Exim's indented list) or follows
/// words like "to" or "recipient", or when its line carries an SMTP code or failure
/// wording; other mentions ("please contact support@...") are used only when there is
/// nothing better. When the report introduces a list ("did not reach the following
/// recipient(s):"), addresses after that line are preferred over earlier ones (Exchange
/// repeats the original To: above the list).
fn text_addresses(lines: &Lines<'_>, excluded: impl Fn(&str) -> bool) -> Vec<String> {
    let intro = lines
        .lower
        .iter()
        .position(|l| contains_any(l, LIST_INTROS));
    // (address, line, named as a recipient)
    let mut found: Vec<(String, usize, bool)> = Vec::new();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, ((line, lc), addresses)) in lines
        .text
        .iter()
        .zip(&lines.lower)
        .zip(&lines.addresses)
        .enumerate()
    {
        if addresses.is_empty() || is_excluded_line(lc) {
            continue;
        }
        let evidence = find_reply_class(line).is_some()
            || find_status_code(line).is_some()
            || contains_any(lc, FAILURE_WORDS);
        for (offset, a) in addresses {
            if excluded(a) {
                continue;
            }
            let named = evidence || names_recipient(lc.get(..*offset).unwrap_or(""));
            if let Some(entry) = seen.get(a.as_str()).and_then(|&k| found.get_mut(k)) {
                // Named once is enough; prefer the occurrence in the introduced list.
                entry.2 |= named;
                if intro.is_some_and(|n| entry.1 < n && i >= n) {
                    entry.1 = i;
                }
            } else if found.len() < MAX_RECIPIENTS {
                seen.insert(a, found.len());
                found.push((a.clone(), i, named));
            }
        }
    }
    if let Some(n) = intro
        && found.iter().any(|(_, line, _)| *line >= n)
    {
        found.retain(|(_, line, _)| *line >= n);
    }
    if found.iter().any(|(_, _, named)| *named) {
        found.retain(|(_, _, named)| *named);
    }
    found.into_iter().map(|(a, _, _)| a).collect()
}

/// Lines that introduce the list of failed recipients.
const LIST_INTROS: &[&str] = &[
    "following recipient",
    "following address",
    "following list of recipients",
    "following destination",
    "to these recipients",
    "did not reach",
    "address(es) failed",
];

/// Words of a line that says why delivery to an address failed.
const FAILURE_WORDS: &[&str] = &[
    "unknown",
    "said",
    "rcpt",
    "not found",
    "does not exist",
    "doesn't exist",
    "no such",
    "rejected",
    "refused",
    "failed",
    "failure",
    "invalid",
    "error",
    "quota",
    "full",
    "could not be delivered",
    "couldn't be delivered",
    "not delivered",
    "disabled",
    "unavailable",
    "expired",
    "timed out",
    "blocked",
    "denied",
    "unreachable",
    "undeliverable",
];

/// Whether the text before an address on its line introduces a recipient.
fn names_recipient(before_lc: &str) -> bool {
    let t = before_lc
        .trim_end()
        .trim_end_matches(['<', '"', '\'', '(', '['])
        .trim_end();
    let bare = t.trim_start_matches(|c: char| {
        c.is_whitespace()
            || matches!(
                c,
                '<' | '"' | '\'' | '*' | '-' | '>' | '(' | '[' | '#' | '.'
            )
    });
    bare.is_empty()
        || [
            "to:",
            "to",
            "rcpt to:",
            "recipient:",
            "recipient",
            "recipients:",
            "address:",
            "addressee:",
            "user",
            "user:",
            "mailbox",
            "mailbox:",
            "failed:",
            "for",
        ]
        .iter()
        .any(|w| t.ends_with(w))
}

/// DSN recipients without an address (a file path, `@domain`) get the failed addresses
/// the text names that no other recipient has; recipients without a status get the code
/// printed next to their address.
fn fill_from_text(
    recipients: &mut [BounceRecipient],
    env: &Envelope,
    lines: &Lines<'_>,
    exclude: &[String],
) {
    let missing_address = recipients.iter().any(|r| r.address.is_none());
    let missing_status = recipients.iter().any(|r| r.status.is_none());
    if !missing_address && !missing_status {
        return;
    }
    let mut candidates = env.failed_recipients.clone();
    for a in text_addresses(lines, |a| is_excluded_address(a, exclude)) {
        push_unique(&mut candidates, &a);
    }
    if missing_address {
        let mut unused = candidates.iter().filter(|c| {
            !recipients
                .iter()
                .any(|r| r.address.as_ref().is_some_and(|a| a.as_str() == c.as_str()))
        });
        let mut found = Vec::new();
        for (i, r) in recipients.iter().enumerate() {
            if r.address.is_none()
                && let Some(a) = unused.next()
            {
                found.push((i, a.clone()));
            }
        }
        for (i, a) in found {
            if let Some(r) = recipients.get_mut(i) {
                r.address = EmailAddress::parse(&a).ok();
            }
        }
    }
    for r in recipients.iter_mut().filter(|r| r.status.is_none()) {
        let Some(address) = r.address.as_ref() else {
            continue;
        };
        let window = recipient_window(address.as_str(), &candidates, lines);
        if let Some(status) = find_status_code(&window) {
            if !r.is_success() && r.action.as_deref() != Some("delayed") {
                r.permanent = status.starts_with('5');
            }
            r.status = Some(status);
        }
        if r.diagnostic.is_none() && !window.is_empty() {
            r.diagnostic = Some(one_line(&window, MAX_DIAGNOSTIC_CHARS));
        }
    }
}

/// The lines where `address` appears, each with the lines that follow it up to a blank
/// line or another recipient's address.
fn recipient_window(address: &str, candidates: &[String], lines: &Lines<'_>) -> String {
    let mut out = String::new();
    let mut next = 0;
    for &i in lines.occurrences.get(address).into_iter().flatten() {
        if i < next || out.len() >= 4096 {
            continue;
        }
        let (Some(text), Some(lower)) = (lines.text.get(i), lines.lower.get(i)) else {
            continue;
        };
        if is_excluded_line(lower) {
            continue;
        }
        // The address line itself only when it says more than the address.
        let rest = lower.replace(address, "");
        if rest.chars().filter(|c| c.is_alphanumeric()).count() > 2 {
            out.push_str(text.trim());
            out.push(' ');
        }
        let mut j = i + 1;
        while j <= i + 8 {
            let (Some(l), Some(addresses)) = (lines.text.get(j), lines.addresses.get(j)) else {
                break;
            };
            let l = l.trim();
            if l.is_empty() {
                break;
            }
            let other_recipient = addresses
                .iter()
                .any(|(_, a)| a != address && candidates.contains(a));
            if other_recipient && !looks_like_smtp_line(l) {
                break;
            }
            out.push_str(l);
            out.push(' ');
            j += 1;
        }
        next = j;
    }
    out
}

/// The report's prose split into lines once, with the addresses on each line.
struct Lines<'a> {
    text: Vec<&'a str>,
    /// ASCII-lowercased, same byte offsets as `text`.
    lower: Vec<String>,
    addresses: Vec<Vec<(usize, String)>>,
    /// Line numbers where each address occurs.
    occurrences: HashMap<String, Vec<usize>>,
}

impl<'a> Lines<'a> {
    fn new(notice: &'a str) -> Lines<'a> {
        let text: Vec<&str> = notice.lines().collect();
        let lower = text.iter().map(|l| l.to_ascii_lowercase()).collect();
        let mut occurrences: HashMap<String, Vec<usize>> = HashMap::new();
        let mut total = 0usize;
        let addresses = text
            .iter()
            .enumerate()
            .map(|(i, l)| {
                if total >= MAX_RECIPIENTS * 4 {
                    return Vec::new();
                }
                let found = addresses_in(l);
                total += found.len();
                for (_, a) in &found {
                    let at = occurrences.entry(a.clone()).or_default();
                    if at.last() != Some(&i) {
                        at.push(i);
                    }
                }
                found
            })
            .collect();
        Lines {
            text,
            lower,
            addresses,
            occurrences,
        }
    }
}

fn looks_like_smtp_line(line: &str) -> bool {
    let lc = line.to_ascii_lowercase();
    contains_any(
        &lc,
        &[
            "said", "<<<", "smtp", "error", "reply", "response", "remote", "rcpt", "550", "554",
            "553", "552", "551", "421", "450", "451", "452",
        ],
    )
}

/// The first RFC 3463 enhanced status code in `text`: `[245].[0-7].[0-9]{1,3}`, not part
/// of a longer dotted number (an IP address or a version).
fn find_status_code(text: &str) -> Option<String> {
    let b = text.as_bytes();
    for i in 0..b.len() {
        if !matches!(b[i], b'2' | b'4' | b'5') {
            continue;
        }
        if i > 0 && (b[i - 1].is_ascii_alphanumeric() || matches!(b[i - 1], b'.' | b'-')) {
            continue;
        }
        if b.get(i + 1) != Some(&b'.')
            || !b.get(i + 2).is_some_and(|d| (b'0'..=b'7').contains(d))
            || b.get(i + 3) != Some(&b'.')
        {
            continue;
        }
        let detail = i + 4;
        let mut end = detail;
        while end < b.len() && end < detail + 3 && b[end].is_ascii_digit() {
            end += 1;
        }
        if end == detail {
            continue;
        }
        let boundary = match b.get(end) {
            None => true,
            Some(c) if c.is_ascii_alphanumeric() => false,
            Some(b'.') => !b.get(end + 1).is_some_and(u8::is_ascii_digit),
            Some(_) => true,
        };
        if boundary {
            return text.get(i..end).map(str::to_string);
        }
    }
    None
}

/// The first enhanced status code of class 4 or 5 in `text`: in a report's prose or an
/// SMTP transcript, a 2.x.x code is a step that went well.
fn find_failure_code(text: &str) -> Option<String> {
    let mut rest = text;
    while let Some(code) = find_status_code(rest) {
        if !code.starts_with('2') {
            return Some(code);
        }
        let at = rest
            .find(code.as_str())
            .map_or(rest.len(), |i| i + code.len());
        rest = rest.get(at..).unwrap_or("");
    }
    None
}

/// The class (4 or 5) of the first SMTP reply code in `text`.
fn find_reply_class(text: &str) -> Option<u8> {
    let b = text.as_bytes();
    for i in 0..b.len().saturating_sub(2) {
        if !matches!(b[i], b'4' | b'5')
            || !(b'0'..=b'5').contains(&b[i + 1])
            || !b[i + 2].is_ascii_digit()
        {
            continue;
        }
        // Not inside a longer token (a number, a host name, a port "host:587"), but
        // "ERROR_CODE :421" is a reply code.
        let before_ok = i == 0
            || !(b[i - 1].is_ascii_alphanumeric()
                || matches!(b[i - 1], b'.' | b':' | b'-' | b'/' | b'+' | b'@' | b'_'))
            || (b[i - 1] == b':' && i >= 2 && b[i - 2] == b' ');
        let after_ok = b
            .get(i + 3)
            .is_none_or(|c| matches!(c, b' ' | b'-' | b'\t' | b'\r' | b'\n' | b')' | b','));
        if before_ok && after_ok {
            return Some(b[i] - b'0');
        }
    }
    None
}

// ---------------------------------------------------------------------------------------
// Amazon SES notifications (SNS email)
// ---------------------------------------------------------------------------------------

/// Recipients of an SES `Bounce` or `Delivery` notification; `None` for anything else
/// (complaints above all).
fn ses_notification(texts: &[String]) -> Option<Vec<BounceRecipient>> {
    let text = texts
        .first()?
        .replace("\\\"", "\"")
        .replace("!\n ", "")
        .replace("!\r\n ", "");
    let kind = json_string_after(&text, "\"notificationType\"")
        .or_else(|| json_string_after(&text, "\"eventType\""))?;
    match kind.as_str() {
        "Bounce" => {
            let start = text.find("\"bouncedRecipients\"")?;
            let section = &text[start..];
            let end = section.find(']').unwrap_or(section.len());
            let section = &section[..end];
            let bounce_type = json_string_after(&text, "\"bounceType\"");
            let mut out = Vec::new();
            for item in section.split("\"emailAddress\"").skip(1) {
                let address =
                    json_string_after(item, "").and_then(|a| EmailAddress::parse(&a).ok());
                let status =
                    json_string_after(item, "\"status\"").and_then(|s| find_status_code(&s));
                let action = json_string_after(item, "\"action\"").map(|a| a.to_ascii_lowercase());
                let diagnostic = json_string_after(item, "\"diagnosticCode\"")
                    .map(|d| one_line(strip_diagnostic_type(&d), MAX_DIAGNOSTIC_CHARS));
                let mut permanent = permanence(action.as_deref(), status.as_deref(), None, false);
                if status.is_none() {
                    permanent = bounce_type.as_deref() == Some("Permanent");
                }
                out.push(BounceRecipient {
                    address,
                    status,
                    action,
                    diagnostic,
                    permanent,
                });
            }
            Some(out)
        }
        "Delivery" => {
            let start = text.find("\"delivery\"")?;
            let section = &text[start..];
            let rstart = section.find("\"recipients\"")?;
            let list = &section[rstart..];
            let end = list.find(']').unwrap_or(list.len());
            let status =
                json_string_after(section, "\"smtpResponse\"").and_then(|s| find_status_code(&s));
            Some(
                addresses_in(&list[..end])
                    .into_iter()
                    .map(|(_, a)| BounceRecipient {
                        address: EmailAddress::parse(&a).ok(),
                        status: status.clone(),
                        action: Some("delivered".to_string()),
                        diagnostic: None,
                        permanent: false,
                    })
                    .collect(),
            )
        }
        _ => None,
    }
}

/// The JSON string value following `key` (`"key" : "value"`), unescaped minimally.
fn json_string_after(text: &str, key: &str) -> Option<String> {
    let rest = &text[text.find(key)? + key.len()..];
    let rest = rest
        .trim_start()
        .strip_prefix(':')?
        .trim_start()
        .strip_prefix('"')?;
    let end = rest.find('"')?;
    Some(rest[..end].to_string())
}

// ---------------------------------------------------------------------------------------
// Text helpers
// ---------------------------------------------------------------------------------------

/// Message-ID of quoted original headers in the text parts.
fn quoted_message_id(texts: &[String]) -> Option<String> {
    for text in texts {
        for line in text.lines() {
            let t = line.trim().trim_start_matches(['>', ' ', '\t']);
            let Some((name, value)) = t.split_once(':') else {
                continue;
            };
            if name.trim().eq_ignore_ascii_case("message-id")
                && let Some(id) = message_id_token(value)
            {
                return Some(id);
            }
        }
    }
    None
}

/// `<id@host>` (or a bare `id@host`) from a header value.
fn message_id_token(value: &str) -> Option<String> {
    let v = value.trim();
    if let Some(start) = v.find('<') {
        let rest = &v[start + 1..];
        let end = rest.find('>')?;
        let id = rest[..end].trim();
        return (!id.is_empty()).then(|| id.to_string());
    }
    let id = v.split_whitespace().next()?;
    id.contains('@').then(|| id.to_string())
}

/// The first address in `text` (canonical form).
fn first_address(text: &str) -> Option<String> {
    addresses_in(text).into_iter().next().map(|(_, a)| a)
}

/// Valid addresses in `text` with their byte offsets, canonical (lowercase) form.
fn addresses_in(text: &str) -> Vec<(usize, String)> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut search = 0;
    while let Some(rel) = b
        .get(search..)
        .and_then(|s| s.iter().position(|&c| c == b'@'))
    {
        let at = search + rel;
        search = at + 1;
        let mut start = at;
        while start > 0 && is_local_char(b[start - 1]) {
            start -= 1;
        }
        while start < at && b[start] == b'.' {
            start += 1;
        }
        let mut end = at + 1;
        while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'.' || b[end] == b'-')
        {
            end += 1;
        }
        while end > at + 1 && matches!(b[end - 1], b'.' | b'-') {
            end -= 1;
        }
        if start == at || end <= at + 1 {
            continue;
        }
        let Some(candidate) = text.get(start..end) else {
            continue;
        };
        let domain = &candidate[at - start + 1..];
        if !domain.contains('.') {
            continue;
        }
        if let Ok(a) = EmailAddress::parse(candidate) {
            out.push((start, a.as_str().to_string()));
        }
        search = end.max(search);
        if out.len() >= MAX_RECIPIENTS {
            break;
        }
    }
    out
}

fn is_local_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+/=?^_`{|}~.-".contains(&c)
}

fn push_unique(list: &mut Vec<String>, item: &str) {
    if !list.iter().any(|x| x == item) {
        list.push(item.to_string());
    }
}

/// The first `max` bytes of `s`, cut at a character boundary.
fn head(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn cap(mut s: String) -> String {
    let end = head(&s, SCAN_LIMIT).len();
    s.truncate(end);
    s
}

fn cap_str(s: &str) -> String {
    head(s, SCAN_LIMIT).to_string()
}

fn cap_bytes(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.len().min(SCAN_LIMIT)]).into_owned()
}

#[cfg(test)]
#[path = "bounce_tests.rs"]
mod tests;

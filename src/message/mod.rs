//! The parsed domain message. The only module that knows mail-parser.
//!
//! [`parse`] never panics: anything that is not recognisably an RFC 5322 message is a
//! [`ParseError`] (the pipeline quarantines it), and everything else becomes an
//! [`InboundMessage`] whose addresses are validated [`EmailAddress`]es. Addresses that do
//! not validate are kept as strings so a decision can say they were ignored.

pub mod auth;
pub mod bounce;

use std::panic::AssertUnwindSafe;
use std::sync::OnceLock;

use mail_parser::{Address, HeaderName, HeaderValue, MessageParser, MimeHeaders, PartType};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::address::{EmailAddress, clean_display_name};

pub use auth::AuthResult;

/// Why raw bytes are not a message we can work with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("message is empty")]
    Empty,
    #[error("no RFC 5322 header fields found")]
    NoHeaders,
    #[error("the MIME parser failed on this message")]
    ParserFailed,
}

/// A name and a validated address from an address header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mailbox {
    pub address: EmailAddress,
    pub display_name: Option<String>,
}

/// A file attached to the message (content decoded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub filename: String,
    pub content_type: String,
    pub content: Vec<u8>,
}

/// Header-level facts used to recognise automatic mail (RFC 3834 and friends).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Signals {
    /// `Auto-Submitted` value, lowercased, without parameters.
    pub auto_submitted: Option<String>,
    /// `Precedence` value, lowercased.
    pub precedence: Option<String>,
    pub list_id: Option<String>,
    pub list_unsubscribe: bool,
    /// `X-Auto-Response-Suppress` value.
    pub auto_response_suppress: Option<String>,
    /// `X-Autoreply`, `X-Autorespond`, `X-Apple-Action: VACATION` and similar vendor
    /// markers: the header that marked it.
    pub autoreply_marker: Option<String>,
    /// The From names a mail system (MAILER-DAEMON, postmaster, Mail Delivery System),
    /// even when its address is empty or broken (`From: MAILER-DAEMON <>`).
    pub from_mail_system: bool,
    /// The message is a delivery report (see `message::bounce`): set by
    /// [`check_bounce`].
    pub bounce: bool,
    /// An `X-Failed-Recipients` header (Exim, Gmail).
    pub failed_recipients: bool,
    /// `report-type` of a `multipart/report` (delivery-status, disposition-notification,
    /// feedback-report), lowercased.
    pub report_type: Option<String>,
    /// `Return-Path: <>`.
    pub null_return_path: bool,
    /// Values of our own `X-Intake-Loop` header.
    pub loop_ids: Vec<String>,
    /// The domain part of the message's own Message-ID, lowercased.
    pub message_id_domain: Option<String>,
    /// Values of `X-MS-Exchange-Organization-AuthAs` (`internal`, `anonymous`, ...),
    /// lowercased: how Exchange Online saw the sender (see `trust.microsoft365`).
    pub exchange_auth_as: Vec<String>,
}

/// A parsed inbound message: everything downstream needs, owned.
#[derive(Debug, Clone)]
pub struct InboundMessage {
    pub message_id: Option<String>,
    pub in_reply_to: Vec<String>,
    pub references: Vec<String>,
    pub subject: Option<String>,
    /// `Date` as unix seconds.
    pub date: Option<i64>,
    pub from: Vec<Mailbox>,
    /// `From` entries that were present but not valid addresses.
    pub invalid_from: Vec<String>,
    pub sender: Option<Mailbox>,
    pub reply_to: Vec<Mailbox>,
    pub to: Vec<Mailbox>,
    pub cc: Vec<Mailbox>,
    /// To/Cc entries that were present but not valid addresses.
    pub invalid_recipients: Vec<String>,
    /// To/Cc entries beyond [`MAX_ADDRESSES`], not read.
    pub omitted_recipients: usize,
    /// `Delivered-To` and `X-Original-To`: the envelope recipients as the MTA saw them.
    pub delivered_to: Vec<EmailAddress>,
    /// `Return-Path` as written (`<>` for the null sender).
    pub return_path: Option<String>,
    pub signals: Signals,
    /// What a delivery report says, when the message is one ([`check_bounce`]).
    pub bounce: Option<bounce::Bounce>,
    pub auth_results: Vec<AuthResult>,
    /// The text body; converted from HTML when the message has no text part.
    pub text_body: String,
    pub attachments: Vec<Attachment>,
    pub size: usize,
}

/// The content of a message: what a request or comment stores.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Body {
    /// The text body; converted from HTML when the message has no text part.
    pub text: String,
    pub attachments: Vec<Attachment>,
}

impl InboundMessage {
    /// The requester candidate: the first valid `From` address.
    pub fn from_mailbox(&self) -> Option<&Mailbox> {
        self.from.first()
    }

    /// A message built from stored parts rather than parsed: used to re-decide a held
    /// request's To/Cc when it is released.
    pub fn synthetic(from: Mailbox, to: Vec<Mailbox>, subject: &str) -> InboundMessage {
        InboundMessage {
            message_id: None,
            in_reply_to: Vec::new(),
            references: Vec::new(),
            subject: Some(subject.to_string()),
            date: None,
            from: vec![from],
            invalid_from: Vec::new(),
            sender: None,
            reply_to: Vec::new(),
            to,
            cc: Vec::new(),
            invalid_recipients: Vec::new(),
            omitted_recipients: 0,
            delivered_to: Vec::new(),
            return_path: None,
            signals: Signals::default(),
            bounce: None,
            auth_results: Vec::new(),
            text_body: String::new(),
            attachments: Vec::new(),
            size: 0,
        }
    }

    /// Fills in the body parsed by [`parse_body`].
    pub fn set_body(&mut self, body: Body) {
        self.text_body = body.text;
        self.attachments = body.attachments;
    }

    /// To followed by Cc, deduplicated by canonical address, first occurrence wins.
    pub fn recipients(&self) -> Vec<&Mailbox> {
        let mut seen = std::collections::HashSet::with_capacity(self.to.len() + self.cc.len());
        self.to
            .iter()
            .chain(self.cc.iter())
            .filter(|m| seen.insert(&m.address))
            .collect()
    }
}

/// SHA-256 of raw bytes as lowercase hex: the ledger's content identity.
pub fn content_hash(raw: &[u8]) -> String {
    hex::encode(Sha256::digest(raw))
}

/// The parser: MIME, date, address, Message-ID and subject headers are parsed; all others
/// stay raw (we read the few we need from the raw text, and never tokenize `Received`,
/// which is costly).
fn parser() -> &'static MessageParser {
    static PARSER: OnceLock<MessageParser> = OnceLock::new();
    PARSER.get_or_init(|| {
        MessageParser::new()
            .with_mime_headers()
            .with_date_headers()
            .with_address_headers()
            .with_message_ids()
            .header_text(HeaderName::Subject)
    })
}

/// Skips leading lines that are blank or whitespace only; some MTAs and exports put
/// them before the first header.
fn trim_leading_blank_lines(raw: &[u8]) -> &[u8] {
    let mut start = 0;
    loop {
        let rest = &raw[start..];
        let line_end = rest.iter().position(|&b| b == b'\n');
        let line = match line_end {
            Some(i) => &rest[..i],
            None => rest,
        };
        if line.is_empty() && line_end.is_none() {
            return rest;
        }
        if !line.iter().all(|b| b.is_ascii_whitespace()) {
            return rest;
        }
        match line_end {
            Some(i) => start += i + 1,
            None => return &raw[raw.len()..],
        }
    }
}

/// Runs mail-parser, turning a panic inside it into an error: our contract is that
/// parsing never panics, whatever the input.
fn run_parser<'x>(
    raw: &'x [u8],
    headers_only: bool,
) -> Result<mail_parser::Message<'x>, ParseError> {
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        if headers_only {
            parser().parse_headers(raw)
        } else {
            parser().parse(raw)
        }
    }));
    match result {
        Ok(Some(m)) => Ok(m),
        Ok(None) => Err(ParseError::NoHeaders),
        Err(_) => Err(ParseError::ParserFailed),
    }
}

/// Parses headers and body. Never panics.
pub fn parse(raw: &[u8]) -> Result<InboundMessage, ParseError> {
    let mut msg = parse_headers(raw)?;
    check_bounce(&mut msg, raw);
    msg.set_body(parse_body(raw));
    Ok(msg)
}

/// Reads a delivery report out of the message when its headers make that worth the
/// cost (a full MIME parse): sets `bounce` and `signals.bounce`. Ordinary mail from
/// people does not pass the header check and costs nothing more.
pub fn check_bounce(msg: &mut InboundMessage, raw: &[u8]) {
    if bounce::worth_checking(msg) {
        msg.bounce = bounce::detect(raw);
        msg.signals.bounce = msg.bounce.is_some();
    }
}

/// Parses the body: text (HTML converted when there is no text part) and attachments.
/// Never panics; a body the MIME parser cannot read is empty.
pub fn parse_body(raw: &[u8]) -> Body {
    let raw = trim_leading_blank_lines(raw);
    let Ok(parsed) = run_parser(raw, false) else {
        return Body::default();
    };
    let text = body_text(&parsed);
    let mut parsed = parsed;
    let ids = parsed.attachments.clone();
    let attachments = ids
        .into_iter()
        .enumerate()
        .filter_map(|(i, id)| {
            let part = parsed.parts.get_mut(id as usize)?;
            if part.contents().is_empty() {
                return None;
            }
            let content_type: String = part
                .content_type()
                .map(|ct| match ct.subtype() {
                    Some(sub) => format!("{}/{}", ct.ctype(), sub),
                    None => ct.ctype().to_string(),
                })
                .unwrap_or_else(|| match &part.body {
                    PartType::Message(_) => "message/rfc822".to_string(),
                    PartType::Text(_) => "text/plain".to_string(),
                    _ => "application/octet-stream".to_string(),
                })
                .to_ascii_lowercase()
                .chars()
                .filter(|c| !c.is_control())
                .take(200)
                .collect();
            let filename = part
                .attachment_name()
                .map(sanitize_filename)
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| format!("attachment-{}", i + 1));
            // Decoded content is moved out, not copied: a large attachment is held once.
            let content = match std::mem::take(&mut part.body) {
                PartType::Binary(bin) | PartType::InlineBinary(bin) => bin.into_owned(),
                PartType::Text(text) | PartType::Html(text) => text.into_owned().into_bytes(),
                other => {
                    part.body = other;
                    part.contents().to_vec()
                }
            };
            Some(Attachment {
                filename,
                content_type,
                content,
            })
        })
        .collect();
    Body { text, attachments }
}

/// Parses the headers only: everything a decision needs, without decoding the body
/// (the body is read only for messages that become requests or comments). The returned
/// message has an empty body. Never panics.
pub fn parse_headers(raw: &[u8]) -> Result<InboundMessage, ParseError> {
    if raw.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(ParseError::Empty);
    }
    let size = raw.len();
    let raw = trim_leading_blank_lines(raw);
    let parsed = run_parser(raw, true)?;
    let root_headers = parsed.root_part().headers();
    let known_header = root_headers.iter().any(|h| {
        !matches!(h.name, mail_parser::HeaderName::Other(_))
            || h.name.as_str().to_ascii_lowercase().starts_with("x-")
    });
    if root_headers.is_empty() || !known_header {
        return Err(ParseError::NoHeaders);
    }

    let mut invalid_from = Vec::new();
    let mut omitted = 0usize;
    let from = collect_mailboxes(
        parsed.header_values("From"),
        &mut invalid_from,
        &mut omitted,
    );
    let mut invalid_recipients = Vec::new();
    let mut omitted_recipients = 0usize;
    let to = collect_mailboxes(
        parsed.header_values("To"),
        &mut invalid_recipients,
        &mut omitted_recipients,
    );
    let cc = collect_mailboxes(
        parsed.header_values("Cc"),
        &mut invalid_recipients,
        &mut omitted_recipients,
    );
    let mut ignored = Vec::new();
    let sender = collect_mailboxes(parsed.header_values("Sender"), &mut ignored, &mut omitted)
        .into_iter()
        .next();
    let reply_to = collect_mailboxes(parsed.header_values("Reply-To"), &mut ignored, &mut omitted);

    let mut delivered_to = Vec::new();
    let mut auth_results = Vec::new();
    let mut signals = Signals::default();
    let mut return_path = None;
    let mut ar_index = 0usize;
    for (name, value) in parsed.headers_raw() {
        let value = value.trim();
        match name.to_ascii_lowercase().as_str() {
            "delivered-to" | "x-original-to" => {
                if let Ok(a) = EmailAddress::parse(value)
                    && !delivered_to.contains(&a)
                {
                    delivered_to.push(a);
                }
            }
            "authentication-results" => {
                auth_results.extend(auth::parse_header(ar_index, &unfold(value)));
                ar_index += 1;
            }
            "auto-submitted" if signals.auto_submitted.is_none() => {
                signals.auto_submitted = Some(first_token(value));
            }
            "precedence" if signals.precedence.is_none() => {
                signals.precedence = Some(first_token(value));
            }
            "list-id" if signals.list_id.is_none() => {
                signals.list_id = Some(unfold(value));
            }
            "list-unsubscribe" => signals.list_unsubscribe = true,
            "x-ms-exchange-organization-authas" => {
                signals.exchange_auth_as.push(first_token(value));
            }
            "x-auto-response-suppress" if signals.auto_response_suppress.is_none() => {
                signals.auto_response_suppress = Some(unfold(value));
            }
            "x-autoreply" | "x-autorespond" | "x-auto-reply" | "x-autoresponder"
            | "x-autogenerated" | "x-vacation" => {
                signals.autoreply_marker = Some(name.to_string());
            }
            "x-apple-action" if value.to_ascii_lowercase().contains("vacation") => {
                signals.autoreply_marker = Some(format!("{name}: {value}"));
            }
            "x-post-messageclass" if value.to_ascii_lowercase().contains("autoresponder") => {
                signals.autoreply_marker = Some(format!("{name}: {value}"));
            }
            "from" => {
                let lower = value.to_ascii_lowercase();
                signals.from_mail_system = lower.contains("mailer-daemon")
                    || lower.contains("postmaster@")
                    || lower.contains("mail delivery subsystem")
                    || lower.contains("mail delivery system");
            }
            "x-intake-loop" => signals.loop_ids.push(unfold(value)),
            "x-failed-recipients" => signals.failed_recipients = true,
            "return-path" if return_path.is_none() => {
                let v = unfold(value);
                signals.null_return_path = v.trim() == "<>" || v.trim().is_empty();
                return_path = Some(v);
            }
            _ => {}
        }
    }
    if let Some(ct) = parsed.root_part().content_type()
        && ct.ctype().eq_ignore_ascii_case("multipart")
        && ct
            .subtype()
            .is_some_and(|s| s.eq_ignore_ascii_case("report"))
    {
        signals.report_type = Some(
            ct.attribute("report-type")
                .unwrap_or("unknown")
                .to_ascii_lowercase(),
        );
    }

    let message_id = parsed.message_id().map(clean_message_id);
    signals.message_id_domain = message_id
        .as_deref()
        .and_then(|m| m.rsplit_once('@'))
        .map(|(_, d)| d.to_ascii_lowercase());

    Ok(InboundMessage {
        in_reply_to: message_ids(parsed.in_reply_to()),
        references: message_ids(parsed.references()),
        subject: parsed.subject().map(|s| one_line(s, 500)),
        date: parsed.date().map(|d| d.to_timestamp()),
        message_id,
        from,
        invalid_from,
        sender,
        reply_to,
        to,
        cc,
        invalid_recipients,
        omitted_recipients,
        delivered_to,
        return_path,
        signals,
        bounce: None,
        auth_results,
        text_body: String::new(),
        attachments: Vec::new(),
        size,
    })
}

fn body_text(parsed: &mail_parser::Message<'_>) -> String {
    let mut out = String::new();
    for i in 0..parsed.text_body.len() {
        if let Some(t) = parsed.body_text(i) {
            if !out.is_empty() {
                out.push('\n');
            }
            out.push_str(&t);
        }
    }
    // A decoded body may contain NUL, which PostgreSQL refuses in text columns.
    if out.contains('\0') {
        out.retain(|c| c != '\0');
    }
    out
}

/// At most this many To/Cc (and From) addresses are read from one message; the rest are
/// counted in `omitted_recipients`. The policy considers far fewer anyway
/// (`hygiene.max_participants`), and this bounds the work a hostile message can cause.
pub const MAX_ADDRESSES: usize = 1000;

fn collect_mailboxes<'a>(
    values: impl Iterator<Item = &'a HeaderValue<'a>>,
    invalid: &mut Vec<String>,
    omitted: &mut usize,
) -> Vec<Mailbox> {
    let mut out: Vec<Mailbox> = Vec::new();
    let mut seen: std::collections::HashSet<EmailAddress> = std::collections::HashSet::new();
    for value in values {
        let HeaderValue::Address(address) = value else {
            if let Some(text) = value.as_text()
                && !text.trim().is_empty()
            {
                invalid.push(one_line(text, 200));
            }
            continue;
        };
        let addrs: Vec<&mail_parser::Addr<'_>> = match address {
            Address::List(list) => list.iter().collect(),
            // Group syntax, including `undisclosed-recipients:;` (a group with no members).
            Address::Group(groups) => groups.iter().flat_map(|g| g.addresses.iter()).collect(),
        };
        for addr in addrs {
            let Some(raw) = addr.address.as_deref() else {
                // A name without an address (e.g. a bare group name): nothing to act on.
                continue;
            };
            if out.len() >= MAX_ADDRESSES {
                *omitted += 1;
                continue;
            }
            match EmailAddress::parse(raw) {
                Ok(address) => {
                    if !seen.insert(address.clone()) {
                        continue;
                    }
                    let display_name = addr
                        .name
                        .as_deref()
                        .and_then(|n| clean_display_name(n, Some(&address)));
                    out.push(Mailbox {
                        address,
                        display_name,
                    });
                }
                Err(_) if invalid.len() < MAX_ADDRESSES => invalid.push(one_line(raw, 200)),
                Err(_) => *omitted += 1,
            }
        }
    }
    out
}

fn message_ids(value: &HeaderValue<'_>) -> Vec<String> {
    match value {
        HeaderValue::Text(t) => vec![clean_message_id(t)],
        HeaderValue::TextList(list) => list.iter().map(|t| clean_message_id(t)).collect(),
        _ => Vec::new(),
    }
    .into_iter()
    .filter(|s| !s.is_empty())
    .collect()
}

/// Message-IDs are compared without angle brackets and surrounding whitespace; the
/// domain part is case-insensitive, the local part is kept as is.
///
/// An ID longer than 250 bytes is replaced by `sha256:` and its hash, the same for every
/// occurrence, so it still threads and deduplicates but fits any index (PostgreSQL limits
/// index entries to about 2.7 KB).
pub fn clean_message_id(raw: &str) -> String {
    let t = raw
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .trim();
    let t = one_line(t, 995);
    let t = match t.rsplit_once('@') {
        Some((local, domain)) => format!("{local}@{}", domain.to_ascii_lowercase()),
        None => t,
    };
    if t.len() > 250 {
        format!("sha256:{}", hex::encode(Sha256::digest(t.as_bytes())))
    } else {
        t
    }
}

fn first_token(value: &str) -> String {
    unfold(value)
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

fn unfold(value: &str) -> String {
    one_line(value, 4096)
}

/// Collapses line breaks and control characters to spaces and caps the length.
pub fn one_line(s: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max_chars));
    let mut last_space = false;
    for c in s.chars().take(max_chars) {
        if c.is_control() || c.is_whitespace() {
            if !last_space && !out.is_empty() {
                out.push(' ');
            }
            last_space = true;
        } else {
            out.push(c);
            last_space = false;
        }
    }
    while out.ends_with(' ') {
        out.pop();
    }
    out
}

fn sanitize_filename(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or(name);
    one_line(base, 200)
        .chars()
        .filter(|c| !matches!(c, '\0'..='\x1f'))
        .collect::<String>()
        .trim_start_matches('.')
        .to_string()
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;

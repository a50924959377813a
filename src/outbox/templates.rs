//! The text of the mail we send. Built-in templates can be overridden by files in
//! `[outbox] templates_dir`: `verification.txt`, `invitation.txt` and
//! `rejection_notice.txt` (a `Subject:` line, a blank line and the plain-text body), and
//! `verification.html`, `invitation.html`, `rejection_notice.html` (the HTML body; mail is
//! sent as text and HTML alternatives). `{{name}}`, `{{address}}`, `{{desk}}`,
//! `{{desk_name}}`, `{{link}}`, `{{request}}`, `{{subject}}`, `{{reason}}` and
//! `{{expires_hours}}` are replaced (HTML-escaped in the HTML body).

use std::collections::HashMap;

use crate::address::EmailAddress;
use crate::config::Config;
use crate::keys::DeskKey;
use crate::policy::{EmailKind, Reason};
use crate::store::{MailContext, MailRenderer, RenderedMail};

const VERIFICATION: &str = "Subject: Please confirm your address for {{desk_name}}{{request_tag}}

Hello {{name}},

we received your message \"{{subject}}\" at {{desk_name}}. Before we open a request
for you, please confirm that {{address}} is your address:

  {{link}}

The link opens a page where you confirm; opening it alone changes nothing. It works for
{{expires_hours}} hours. If you did not write to us, ignore this mail and nothing happens.
";

const INVITATION: &str = "Subject: Your request at {{desk_name}}{{request_tag}}

Hello {{name}},

{{desk_name}} has opened a request for the message \"{{subject}}\" and added you to it.
You can confirm your address and choose how your name is shown here:

  {{link}}

The link works for {{expires_hours}} hours. Replies to this mail reach the desk.
";

const REJECTION_NOTICE: &str = "Subject: We could not accept your message at {{desk_name}}

Hello {{name}},

your message \"{{subject}}\" to {{desk_name}} was not turned into a request:
{{reason}}.

If you think this is a mistake, please contact the team that runs this desk another way.
";

const HTML_FRAME_START: &str = "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{{desk_name}}</title></head>\n<body style=\"font-family: sans-serif; line-height: 1.5; max-width: 40em\">\n";
const HTML_FRAME_END: &str = "</body></html>\n";

const VERIFICATION_HTML: &str = "<p>Hello {{name}},</p>
<p>we received your message &ldquo;{{subject}}&rdquo; at {{desk_name}}. Before we open a request
for you, please confirm that <strong>{{address}}</strong> is your address:</p>
<p><a href=\"{{link}}\">Confirm my address</a></p>
<p>The link opens a page where you confirm; opening it alone changes nothing. It works for
{{expires_hours}} hours. If you did not write to us, ignore this mail and nothing happens.</p>
";

const INVITATION_HTML: &str = "<p>Hello {{name}},</p>
<p>{{desk_name}} has opened a request for the message &ldquo;{{subject}}&rdquo; and added you to it.
You can confirm your address and choose how your name is shown:</p>
<p><a href=\"{{link}}\">Confirm my address</a></p>
<p>The link works for {{expires_hours}} hours. Replies to this mail reach the desk.</p>
";

const REJECTION_NOTICE_HTML: &str = "<p>Hello {{name}},</p>
<p>your message &ldquo;{{subject}}&rdquo; to {{desk_name}} was not turned into a request:
{{reason}}.</p>
<p>If you think this is a mistake, please contact the team that runs this desk another way.</p>
";

/// Escapes text for HTML element content and attribute values.
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("cannot read template {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("template {path} must start with a \"Subject:\" line followed by a blank line")]
    NoSubject { path: String },
}

#[derive(Debug, Clone)]
struct Template {
    subject: String,
    body: String,
    html: String,
}

impl Template {
    fn parse(text: &str, path: &str) -> Result<Template, TemplateError> {
        let text = text.replace("\r\n", "\n");
        let (head, body) = text
            .split_once("\n\n")
            .ok_or_else(|| TemplateError::NoSubject { path: path.into() })?;
        let subject = head
            .strip_prefix("Subject:")
            .ok_or_else(|| TemplateError::NoSubject { path: path.into() })?;
        Ok(Template {
            subject: subject.trim().to_string(),
            body: body.to_string(),
            html: String::new(),
        })
    }
}

/// Renders our mail; implements the store's [`MailRenderer`].
#[derive(Debug, Clone)]
pub struct Templates {
    templates: HashMap<&'static str, Template>,
    desk_from: HashMap<DeskKey, EmailAddress>,
    desk_names: HashMap<DeskKey, String>,
    fallback_from: String,
    message_id_domain: String,
    ttl_secs: i64,
    public_url: String,
}

impl Templates {
    pub fn from_config(config: &Config) -> Result<Templates, TemplateError> {
        let mut templates = HashMap::new();
        for (kind, builtin, builtin_html) in [
            (EmailKind::Verification, VERIFICATION, VERIFICATION_HTML),
            (EmailKind::Invitation, INVITATION, INVITATION_HTML),
            (
                EmailKind::RejectionNotice,
                REJECTION_NOTICE,
                REJECTION_NOTICE_HTML,
            ),
        ] {
            let name = kind.as_str();
            let read = |file: String| -> Result<Option<(String, String)>, TemplateError> {
                match &config.outbox.templates_dir {
                    Some(dir) if dir.join(&file).is_file() => {
                        let path = dir.join(&file);
                        let text = std::fs::read_to_string(&path).map_err(|source| {
                            TemplateError::Read {
                                path: path.display().to_string(),
                                source,
                            }
                        })?;
                        Ok(Some((text, path.display().to_string())))
                    }
                    _ => Ok(None),
                }
            };
            let mut t = match read(format!("{name}.txt"))? {
                Some((text, path)) => Template::parse(&text, &path)?,
                None => Template::parse(builtin, "built-in")?,
            };
            t.html = match read(format!("{name}.html"))? {
                Some((html, _)) => html,
                None => format!("{HTML_FRAME_START}{builtin_html}{HTML_FRAME_END}"),
            };
            templates.insert(name, t);
        }
        Ok(Templates {
            templates,
            desk_from: config.desk_from.clone(),
            desk_names: config
                .policy
                .desks
                .iter()
                .map(|d| (d.key.clone(), d.name.clone()))
                .collect(),
            fallback_from: config
                .desk_from
                .values()
                .next()
                .map(|a| a.to_string())
                .unwrap_or_else(|| format!("intake@{}", config.outbox.message_id_domain)),
            message_id_domain: config.outbox.message_id_domain.clone(),
            ttl_secs: config.verification_ttl.as_secs() as i64,
            public_url: config.http.public_url.trim_end_matches('/').to_string(),
        })
    }

    /// The link a person follows to confirm their address.
    pub fn link(&self, token: &str) -> String {
        format!("{}/verify/{token}", self.public_url)
    }
}

fn reason_sentence(reason: Option<Reason>) -> &'static str {
    match reason {
        Some(Reason::SignupClosed) => {
            "this desk only accepts requests from people who already have an account"
        }
        Some(Reason::DomainNotAllowed) => "accounts are not created for addresses on your domain",
        Some(Reason::PortalOnlyDisabled) => {
            "this desk does not create accounts for external addresses"
        }
        Some(Reason::NotDeskCustomer) => "this desk only accepts requests from its own customers",
        Some(Reason::AccountDeactivated) => "your account is deactivated",
        _ => "it was not accepted",
    }
}

/// Puts the values of `vars` in place of their `{{key}}`s, in one pass over `text`: a
/// value is never read for placeholders itself (a name or subject written as
/// `{{link}}` stays that text). Unknown placeholders are left as they are.
fn fill(text: &str, vars: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(text.len() + 256);
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let value = after.find("}}").and_then(|end| {
            let key = &after[..end];
            vars.iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| (*v, end + 2))
        });
        match value {
            Some((v, used)) => {
                out.push_str(v);
                rest = &after[used..];
            }
            None => {
                out.push_str("{{");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// How much of a name or subject from inbound mail our mail quotes. Verification mail
/// goes to whatever From a message claims, so what it quotes is the sender's text in
/// our name: kept short, it is no vehicle for someone else's advertising.
const QUOTED_NAME_CHARS: usize = 60;
const QUOTED_SUBJECT_CHARS: usize = 100;

impl MailRenderer for Templates {
    fn render(&self, ctx: &MailContext<'_>) -> RenderedMail {
        let desk_name = self
            .desk_names
            .get(ctx.desk)
            .cloned()
            .unwrap_or_else(|| ctx.desk.to_string());
        let link = ctx.token.map(|t| self.link(t)).unwrap_or_default();
        let request = ctx.request.map(|r| r.to_string()).unwrap_or_default();
        let request_tag = if request.is_empty() {
            String::new()
        } else {
            format!(" [{request}]")
        };
        let name = crate::message::one_line(
            ctx.display_name.unwrap_or_else(|| ctx.to.local_part()),
            QUOTED_NAME_CHARS,
        );
        let hours = (self.ttl_secs / 3600).max(1).to_string();
        let subject_text = quoted_subject(ctx.original_subject.unwrap_or("(no subject)"));
        let vars = [
            ("name", name.as_str()),
            ("address", ctx.to.as_str()),
            ("desk", ctx.desk.as_str()),
            ("desk_name", desk_name.as_str()),
            ("link", link.as_str()),
            ("request", request.as_str()),
            ("request_tag", request_tag.as_str()),
            ("subject", subject_text.as_str()),
            ("reason", reason_sentence(ctx.about)),
            ("expires_hours", hours.as_str()),
        ];
        // from_config inserts a template for every EmailKind, so the lookup cannot miss.
        let t = &self.templates[ctx.kind.as_str()];
        let escaped: Vec<(&str, String)> = vars.iter().map(|(k, v)| (*k, html_escape(v))).collect();
        let html_vars: Vec<(&str, &str)> = escaped.iter().map(|(k, v)| (*k, v.as_str())).collect();
        RenderedMail {
            from: self
                .desk_from
                .get(ctx.desk)
                .map(|a| a.to_string())
                .unwrap_or_else(|| self.fallback_from.clone()),
            // Subjects are single lines: anything from inbound mail was flattened when it
            // was parsed, and the template's own line breaks are removed here.
            subject: crate::message::one_line(&fill(&t.subject, &vars), 300),
            body_text: fill(&t.body, &vars),
            body_html: Some(fill(&t.html, &html_vars)),
        }
    }

    fn message_id_domain(&self) -> &str {
        &self.message_id_domain
    }

    fn token_ttl_secs(&self) -> i64 {
        self.ttl_secs
    }
}

/// An inbound subject as our mail quotes it: one line, at most [`QUOTED_SUBJECT_CHARS`],
/// with `…` where it was cut.
fn quoted_subject(subject: &str) -> String {
    // Whitespace runs collapse, so more than the quote's length is read; a subject
    // longer than that window is cut whatever it collapses to.
    let window = 4 * QUOTED_SUBJECT_CHARS;
    let line = crate::message::one_line(subject, window);
    let beyond = subject.chars().nth(window).is_some();
    if beyond || line.chars().count() > QUOTED_SUBJECT_CHARS {
        let cut: String = line.chars().take(QUOTED_SUBJECT_CHARS - 1).collect();
        format!("{}…", cut.trim_end())
    } else {
        line
    }
}

/// Checks that the configured templates load (used by `check-config`).
pub fn check(config: &Config) -> Result<(), TemplateError> {
    Templates::from_config(config).map(|_| ())
}

#[cfg(test)]
#[path = "templates_tests.rs"]
mod tests;

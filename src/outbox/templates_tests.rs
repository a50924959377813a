//! Unit tests for `src/outbox/templates.rs`.

use super::*;
use crate::address::EmailAddress;
use crate::store::MailRenderer;

#[test]
fn placeholders_are_filled_in_one_pass() {
    let vars = [("name", "{{link}}"), ("link", "https://desk/verify/t")];
    assert_eq!(
        fill("Hello {{name}}, {{link}} {{unknown}} {{", &vars),
        "Hello {{link}}, https://desk/verify/t {{unknown}} {{"
    );
}

#[test]
fn what_verification_mail_quotes_from_the_sender_is_short_and_inert() {
    let config =
        Config::load_with_env(&crate::config::ConfigSource::Embedded, Some(HashMap::new()))
            .unwrap();
    let templates = Templates::from_config(&config).unwrap();
    let desk = config.policy.desks[0].key.clone();
    let to = EmailAddress::parse("victim@example.net").unwrap();
    let name = format!("{{{{link}}}} {}", "Cheap pills at pills.example ".repeat(5));
    let subject = format!("WIN {}", "big at casino.example ".repeat(30));
    let mail = templates.render(&MailContext {
        kind: EmailKind::Verification,
        desk: &desk,
        to: &to,
        display_name: Some(&name),
        request: None,
        original_subject: Some(&subject),
        token: Some("tok"),
        about: None,
    });
    let link = templates.link("tok");
    assert_eq!(
        mail.body_text.matches(&link).count(),
        1,
        "{}",
        mail.body_text
    );
    assert!(
        mail.body_text.contains("Hello {{link}} Cheap pills"),
        "{}",
        mail.body_text
    );
    let quoted_name = crate::message::one_line(&name, QUOTED_NAME_CHARS);
    assert!(mail.body_text.contains(&format!("Hello {quoted_name},")));
    assert!(
        !mail
            .body_text
            .contains(&name.trim_end()[..QUOTED_NAME_CHARS + 5])
    );
    let quoted = quoted_subject(&subject);
    assert!(quoted.chars().count() <= QUOTED_SUBJECT_CHARS && quoted.chars().count() > 90);
    assert!(quoted.ends_with('…'));
    assert!(
        mail.body_text.contains(&format!("\"{quoted}\"")),
        "{}",
        mail.body_text
    );
    assert_eq!(quoted_subject("Printer on fire"), "Printer on fire");
    // Whitespace that collapses does not hide that the subject was cut.
    let spaced = format!(
        "Printer{}on fire and the rest of a long story",
        " ".repeat(150)
    );
    assert_eq!(
        quoted_subject(&spaced),
        "Printer on fire and the rest of a long story"
    );
    let cut = quoted_subject(&format!("{}{}", "a b ".repeat(30), "end ".repeat(200)));
    assert!(
        cut.ends_with('…') && cut.chars().count() <= QUOTED_SUBJECT_CHARS,
        "{cut}"
    );
    let hidden = quoted_subject(&format!("short{}tail", " ".repeat(1000)));
    assert_eq!(hidden, "short…");
}

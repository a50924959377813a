//! Unit tests for `src/address.rs`.

use super::*;
use proptest::prelude::*;

#[test]
fn canonical_form_lowercases_and_strips_brackets() {
    let a = EmailAddress::parse(" <Ann.Lee@Example.COM> ").unwrap();
    assert_eq!(a.as_str(), "ann.lee@example.com");
    assert_eq!(a.local_part(), "ann.lee");
    assert_eq!(a.domain(), "example.com");
}

#[test]
fn idna_domains_are_normalized() {
    let a = EmailAddress::parse("ann@Bücher.example").unwrap();
    let b = EmailAddress::parse("ANN@xn--bcher-kva.example").unwrap();
    assert_eq!(a, b);
    assert_eq!(a.domain(), "xn--bcher-kva.example");
}

#[test]
fn rejects_malformed_addresses() {
    for bad in [
        "",
        "ann",
        "@example.com",
        "ann@",
        "ann@exa mple.com",
        "ann@-example.com",
        "an n@example.com",
        "ann..lee@example.com",
        "ann@example..com",
        "a<b@example.com",
        "ann@example.com\r\nBcc: x@y.z",
    ] {
        assert!(
            EmailAddress::parse(bad).is_err(),
            "{bad:?} should be rejected"
        );
    }
}

#[test]
fn quoted_local_parts_are_kept() {
    let a = EmailAddress::parse("\"Ann Lee\"@example.com").unwrap();
    assert_eq!(a.as_str(), "\"ann lee\"@example.com");
}

#[test]
fn domain_patterns() {
    let exact = DomainPattern::parse("Example.com").unwrap();
    let sub = DomainPattern::parse("*.example.com").unwrap();
    assert!(exact.matches("example.com"));
    assert!(!exact.matches("eu.example.com"));
    assert!(sub.matches("eu.example.com"));
    assert!(!sub.matches("example.com"));
    assert!(!sub.matches("badexample.com"));
    assert!(DomainPattern::parse("*.").is_err());
    assert!(DomainPattern::parse("exa mple.com").is_err());
}

#[test]
fn display_names_cannot_carry_line_breaks() {
    let name = clean_display_name("Ann\r\nBcc: evil@example.com", None).unwrap();
    assert!(!name.contains('\r') && !name.contains('\n'));
    assert_eq!(name, "Ann Bcc: evil@example.com");
    let a = EmailAddress::parse("ann@example.com").unwrap();
    assert_eq!(clean_display_name("'ann@example.com'", Some(&a)), None);
    assert_eq!(
        clean_display_name("  \"Ann  Lee\" ", None).unwrap(),
        "Ann Lee"
    );
}

proptest! {
    #[test]
    fn parse_never_panics(s in ".{0,80}") {
        let _ = EmailAddress::parse(&s);
        let _ = DomainPattern::parse(&s);
        let _ = clean_display_name(&s, None);
    }

    #[test]
    fn canonicalization_is_idempotent(
        local in "[A-Za-z0-9._%+-]{1,20}",
        domain in "[A-Za-z0-9]{1,10}(\\.[A-Za-z]{2,6}){1,2}",
    ) {
        let input = format!("{local}@{domain}");
        if let Ok(a) = EmailAddress::parse(&input) {
            let again = EmailAddress::parse(a.as_str()).unwrap();
            prop_assert_eq!(&a, &again);
            let upper = EmailAddress::parse(&input.to_uppercase()).unwrap();
            prop_assert_eq!(a, upper);
        }
    }

    #[test]
    fn cleaned_names_have_no_control_characters(s in "\\PC{0,40}[\r\n\t]{0,3}\\PC{0,40}") {
        if let Some(n) = clean_display_name(&s, None) {
            prop_assert!(!n.chars().any(|c| c.is_control()));
        }
    }
}

#[test]
fn no_reply_addresses() {
    let no_reply = |s: &str| EmailAddress::parse(s).unwrap().is_no_reply();
    for a in [
        "noreply@x.example",
        "No-Reply@x.example",
        "no_reply@x.example",
        "donotreply@x.example",
        "do-not-reply@x.example",
        "noreply-billing@x.example",
        "no-reply.alerts@x.example",
        "noreply+42@x.example",
    ] {
        assert!(no_reply(a), "{a}");
    }
    for a in [
        "reply@x.example",
        "noreplyx@x.example",
        "nono-reply@x.example",
        "info@noreply.example",
        "mailer-daemon@x.example",
    ] {
        assert!(!no_reply(a), "{a}");
    }
}

//! Unit tests for `src/policy/trust.rs`.

use super::*;
use crate::message::auth::parse_header;

fn trust() -> Trust {
    Trust {
        authserv_ids: vec!["mx.desk.example".into()],
        microsoft365: false,
        require_authentication: true,
    }
}

/// The verdict on `Authentication-Results` alone.
fn verdict(trust: &Trust, from_domain: &str, results: &[AuthResult]) -> TrustVerdict {
    super::verdict(trust, from_domain, results, &[], true)
}

fn results(headers: &[&str]) -> Vec<AuthResult> {
    headers
        .iter()
        .enumerate()
        .flat_map(|(i, h)| parse_header(i, h))
        .collect()
}

#[test]
fn dmarc_pass_from_trusted_id() {
    let r = results(&["mx.desk.example; dmarc=pass header.from=corp.example"]);
    let v = verdict(&trust(), "corp.example", &r);
    assert!(v.authenticated);
    assert_eq!(v.method, Some("dmarc"));
}

#[test]
fn untrusted_authserv_id_is_ignored() {
    let r = results(&["evil.example; dmarc=pass header.from=corp.example"]);
    assert!(!verdict(&trust(), "corp.example", &r).authenticated);
}

#[test]
fn only_the_topmost_trusted_header_counts() {
    // A forged header lower down (added before our MTA saw it) must not win.
    let r = results(&[
        "mx.desk.example; dmarc=fail header.from=corp.example",
        "mx.desk.example; dmarc=pass header.from=corp.example",
    ]);
    assert!(!verdict(&trust(), "corp.example", &r).authenticated);
}

#[test]
fn dkim_and_spf_need_alignment() {
    let r = results(&["mx.desk.example; dkim=pass header.d=mailer.example"]);
    assert!(!verdict(&trust(), "corp.example", &r).authenticated);
    let r = results(&["mx.desk.example; dkim=pass header.d=corp.example"]);
    assert!(verdict(&trust(), "eu.corp.example", &r).authenticated);
    let r = results(&["mx.desk.example; spf=pass smtp.mailfrom=bounce@corp.example"]);
    assert_eq!(verdict(&trust(), "corp.example", &r).method, Some("spf"));
    let r = results(&["mx.desk.example; dkim=pass header.d=example"]);
    assert!(!verdict(&trust(), "corp.example", &r).authenticated);
}

/// Relaxed alignment works both ways round, as in DMARC: a signing or bounce domain
/// under the From domain aligns with it; a single label never does, nor a sibling or a
/// look-alike.
#[test]
fn alignment_is_relaxed_both_ways() {
    let r = results(&["mx.desk.example; dkim=pass header.d=mail.corp.example"]);
    assert_eq!(verdict(&trust(), "corp.example", &r).method, Some("dkim"));
    let r = results(&["mx.desk.example; spf=pass smtp.mailfrom=bounce@em.corp.example"]);
    assert_eq!(verdict(&trust(), "corp.example", &r).method, Some("spf"));
    let r = results(&["mx.desk.example; dkim=pass header.d=corp.example.evil"]);
    assert!(!verdict(&trust(), "corp.example", &r).authenticated);
    let r = results(&["mx.desk.example; dkim=pass header.d=evilcorp.example"]);
    assert!(!verdict(&trust(), "corp.example", &r).authenticated);
    let r = results(&["mx.desk.example; dkim=pass header.d=a.corp.example"]);
    assert!(!verdict(&trust(), "b.corp.example", &r).authenticated);
    // A From on a bare label (a typo, a forger's) is aligned with nothing under it.
    let r = results(&["mx.desk.example; dkim=pass header.d=corp.example"]);
    assert!(!verdict(&trust(), "example", &r).authenticated);
}

#[test]
fn dmarc_pass_for_another_domain_does_not_count() {
    let r = results(&["mx.desk.example; dmarc=pass header.from=other.example"]);
    assert!(!verdict(&trust(), "corp.example", &r).authenticated);
}

/// Our MTA's header reporting nothing (`none`) is still the topmost trusted one: a
/// forged pass below it, carrying our id, does not count.
#[test]
fn a_topmost_header_reporting_nothing_shadows_a_forged_one_below() {
    let r = results(&[
        "mx.desk.example; none",
        "mx.desk.example; dmarc=pass header.from=corp.example",
    ]);
    assert!(!verdict(&trust(), "corp.example", &r).authenticated);
}

/// A DMARC pass that does not name the From domain it evaluated says nothing about
/// this From.
#[test]
fn dmarc_pass_without_header_from_does_not_count() {
    let r = results(&["mx.desk.example; dmarc=pass"]);
    assert!(!verdict(&trust(), "corp.example", &r).authenticated);
}

fn microsoft365() -> Trust {
    Trust {
        authserv_ids: vec![],
        microsoft365: true,
        require_authentication: true,
    }
}

/// At Microsoft 365 the topmost header, without an authserv-id, is Exchange Online's:
/// believed with `microsoft365`, never without it, and a lower one never.
#[test]
fn microsoft_365_believes_only_the_topmost_header_without_an_id() {
    let real = "spf=pass smtp.mailfrom=corp.example; dkim=pass header.d=corp.example;\
                dmarc=pass action=none header.from=corp.example;compauth=pass reason=100";
    let r = results(&[real]);
    assert_eq!(
        verdict(&microsoft365(), "corp.example", &r).method,
        Some("dmarc")
    );
    assert!(!verdict(&trust(), "corp.example", &r).authenticated);
    // The sender's own, below Exchange Online's failing one, does not count.
    let r = results(&[
        "spf=pass smtp.mailfrom=evil.example; dmarc=fail action=oreject header.from=corp.example",
        real,
    ]);
    let v = verdict(&microsoft365(), "corp.example", &r);
    assert!(!v.authenticated && v.dmarc_failed, "{v:?}");
    // Nor below a header with some other id on top.
    let r = results(&["mx.elsewhere.example; none", real]);
    assert!(!verdict(&microsoft365(), "corp.example", &r).authenticated);
    // A configured id still counts beside it.
    let both = Trust {
        authserv_ids: vec!["mx.desk.example".into()],
        ..microsoft365()
    };
    let r = results(&["mx.desk.example; dkim=pass header.d=corp.example"]);
    assert!(verdict(&both, "corp.example", &r).authenticated);
}

/// Mail between the tenant's own mailboxes: no passing header, but Exchange Online marks
/// it Internal. Believed only with `microsoft365`, only when every such mark says so,
/// and never against a DMARC fail.
#[test]
fn microsoft_365_believes_its_internal_mark() {
    let none =
        results(&["dkim=none header.d=none;dmarc=none action=none header.from=corp.example"]);
    let internal = vec!["internal".to_string()];
    let v = super::verdict(&microsoft365(), "corp.example", &none, &internal, true);
    assert_eq!(v.method, Some("exchange"), "{v:?}");
    let v = super::verdict(&microsoft365(), "corp.example", &[], &internal, true);
    assert_eq!(v.method, Some("exchange"), "{v:?}");
    assert!(!super::verdict(&trust(), "corp.example", &none, &internal, true).authenticated);
    for marks in [
        vec![],
        vec!["anonymous".to_string()],
        vec!["internal".to_string(), "anonymous".to_string()],
    ] {
        let v = super::verdict(&microsoft365(), "corp.example", &none, &marks, true);
        assert!(!v.authenticated, "{marks:?}: {v:?}");
    }
    let failed = results(&[
        "spf=fail smtp.mailfrom=evil.example;dmarc=fail action=oreject header.from=corp.example",
    ]);
    assert!(
        !super::verdict(&microsoft365(), "corp.example", &failed, &internal, true).authenticated
    );
}

/// A DMARC fail stands whatever else passed: a domain with strict alignment fails a pass
/// for a subdomain (a vendor's, an ESP's) on purpose.
#[test]
fn a_dmarc_fail_is_not_overridden_by_a_relaxed_pass() {
    for header in [
        "mx.desk.example; spf=pass smtp.mailfrom=x@em.corp.example; dmarc=fail header.from=corp.example",
        "mx.desk.example; dkim=pass header.d=vendor.corp.example; dmarc=fail header.from=corp.example",
        "mx.desk.example; dkim=pass header.d=corp.example; dmarc=fail header.from=corp.example",
    ] {
        let v = verdict(&trust(), "corp.example", &results(&[header]));
        assert!(!v.authenticated && v.dmarc_failed, "{header}: {v:?}");
    }
    let m365 = results(&[
        "spf=pass smtp.mailfrom=em.corp.example;dmarc=fail action=oreject header.from=corp.example;compauth=fail reason=000",
    ]);
    let v = verdict(&microsoft365(), "corp.example", &m365);
    assert!(!v.authenticated && v.dmarc_failed, "{v:?}");
    // DMARC none (no policy published): the aligned pass decides.
    let r = results(&[
        "mx.desk.example; dkim=pass header.d=mail.corp.example; dmarc=none header.from=corp.example",
    ]);
    assert_eq!(verdict(&trust(), "corp.example", &r).method, Some("dkim"));
}

/// The domain the MTA names is compared canonically: a trailing dot, case or a Unicode
/// spelling is the same domain, for a pass as for a fail.
#[test]
fn dmarc_domains_are_compared_canonically() {
    let r = results(&["mx.desk.example; dmarc=fail header.from=Corp.Example."]);
    assert!(verdict(&trust(), "corp.example", &r).dmarc_failed);
    let r = results(&["mx.desk.example; dmarc=fail header.from=bücher.example"]);
    assert!(verdict(&trust(), "xn--bcher-kva.example", &r).dmarc_failed);
    let r = results(&["mx.desk.example; dmarc=pass header.from=bücher.example"]);
    assert!(verdict(&trust(), "xn--bcher-kva.example", &r).authenticated);
    let r = results(&["mx.desk.example; dkim=pass header.d=BÜCHER.example."]);
    assert!(verdict(&trust(), "xn--bcher-kva.example", &r).authenticated);
}

/// Exchange's Internal mark says where the mail came from, not whose the From is: it
/// vouches only for our own (approved) domains.
#[test]
fn the_internal_mark_vouches_only_for_our_domains() {
    let internal = vec!["internal".to_string()];
    let v = super::verdict(&microsoft365(), "partner.example", &[], &internal, false);
    assert!(!v.authenticated, "{v:?}");
}

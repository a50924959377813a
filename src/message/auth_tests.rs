//! Unit tests for `src/message/auth.rs`.

use super::*;
use proptest::prelude::*;

#[test]
fn parses_a_typical_header() {
    let v = "mx.example.com;\r\n  dkim=pass (2048-bit key) header.d=example.com header.s=sel header.b=\"AbC;d\";\r\n  spf=pass (sender IP is 192.0.2.1) smtp.mailfrom=bounce.example.com;\r\n  dmarc=pass (p=REJECT) header.from=example.com";
    let r = parse_header(0, v);
    assert_eq!(r.len(), 3);
    assert_eq!(r[0].authserv_id, "mx.example.com");
    assert_eq!(r[0].method, "dkim");
    assert_eq!(r[0].result, "pass");
    assert_eq!(r[0].property("header.d"), Some("example.com"));
    assert_eq!(r[0].property("header.b"), Some("AbC;d"));
    assert_eq!(r[1].property("smtp.mailfrom"), Some("bounce.example.com"));
    assert_eq!(r[2].method, "dmarc");
    assert_eq!(r[2].property("header.from"), Some("example.com"));
}

#[test]
fn version_and_none() {
    // A header that reports nothing still says who wrote it (it shadows lower ones).
    let none = parse_header(0, "mx.example.com 1; none");
    assert_eq!(none.len(), 1);
    assert_eq!(none[0].authserv_id, "mx.example.com");
    assert_eq!(
        (none[0].method.as_str(), none[0].result.as_str()),
        ("none", "none")
    );
    let r = parse_header(2, "MX.Example.COM 1; dkim/1 = FAIL header.d = x.org");
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].header_index, 2);
    assert_eq!(r[0].authserv_id, "mx.example.com");
    assert_eq!(r[0].result, "fail");
    assert_eq!(r[0].property("header.d"), Some("x.org"));
}

#[test]
fn comments_nest() {
    let r = parse_header(
        0,
        "mx (a (b) c); spf=pass (x (y) z) smtp.mailfrom=a.example",
    );
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].property("smtp.mailfrom"), Some("a.example"));
}

/// `\"` inside a quoted string does not end it: a `;` after it cannot start a result
/// of its own (an envelope sender chosen by the attacker is quoted in our header).
#[test]
fn an_escaped_quote_does_not_end_a_quoted_string() {
    let r = parse_header(
        0,
        r#"mx.example.com; spf=none smtp.mailfrom="\"a;dmarc=pass;b\"@evil.example""#,
    );
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].method, "spf");
    assert!(!r.iter().any(|x| x.method == "dmarc"));
}

proptest! {
    #[test]
    fn never_panics(s in "\\PC{0,200}") {
        let _ = parse_header(0, &s);
    }
}

/// Exchange Online writes no authserv-id: the results are read all the same, under the
/// empty id (which only `trust.microsoft365` believes).
#[test]
fn a_header_without_an_authserv_id_as_exchange_online_writes_it() {
    let r = parse_header(
        0,
        "spf=pass (sender IP is 203.0.113.7) smtp.mailfrom=corp.example; dkim=pass \
         (signature was verified) header.d=corp.example;dmarc=pass action=none \
         header.from=corp.example;compauth=pass reason=100",
    );
    let methods: Vec<(&str, &str, &str)> = r
        .iter()
        .map(|x| (x.authserv_id.as_str(), x.method.as_str(), x.result.as_str()))
        .collect();
    assert_eq!(
        methods,
        [
            ("", "spf", "pass"),
            ("", "dkim", "pass"),
            ("", "dmarc", "pass"),
            ("", "compauth", "pass")
        ]
    );
    assert_eq!(r[0].property("smtp.mailfrom"), Some("corp.example"));
    assert_eq!(r[2].property("header.from"), Some("corp.example"));
    // With an id, the first part is the id, not a result.
    let r = parse_header(0, "mx.example.com; spf=pass smtp.mailfrom=corp.example");
    assert_eq!((r.len(), r[0].authserv_id.as_str()), (1, "mx.example.com"));
}

/// A quoted authserv-id may hold `=`: it is still the id, not a result.
#[test]
fn a_quoted_id_with_an_equals_sign_is_an_id() {
    let r = parse_header(0, "\"mx=1.desk.example\"; dkim=pass header.d=corp.example");
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].authserv_id, "mx=1.desk.example");
    assert_eq!(
        (r[0].method.as_str(), r[0].result.as_str()),
        ("dkim", "pass")
    );
}

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
    assert!(parse_header(0, "mx.example.com 1; none").is_empty());
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

proptest! {
    #[test]
    fn never_panics(s in "\\PC{0,200}") {
        let _ = parse_header(0, &s);
    }
}

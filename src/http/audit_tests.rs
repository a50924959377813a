//! Unit tests for `src/http/audit.rs`: the access rule, filters and escaping.

use super::*;

fn peer(s: &str) -> Option<SocketAddr> {
    Some(s.parse().unwrap())
}

fn auth(v: &str) -> HeaderValue {
    HeaderValue::from_str(v).unwrap()
}

#[test]
fn without_a_token_only_loopback_peers_are_allowed() {
    for ok in [
        "127.0.0.1:5000",
        "127.8.9.10:1",
        "[::1]:80",
        "[::ffff:127.0.0.1]:80",
    ] {
        assert_eq!(authorize(peer(ok), false, None, None), Ok(()), "{ok}");
    }
    for bad in [
        "10.0.0.1:5000",
        "192.0.2.7:1",
        "[2001:db8::1]:80",
        "[::ffff:10.0.0.1]:80",
    ] {
        assert_eq!(
            authorize(peer(bad), false, None, None),
            Err(Denied::NotLoopback),
            "{bad}"
        );
    }
    // No connection info at all: refused, not assumed local.
    assert_eq!(authorize(None, false, None, None), Err(Denied::NotLoopback));
    // A bearer header means nothing when no token is configured.
    assert_eq!(
        authorize(
            peer("10.0.0.1:1"),
            false,
            Some(&auth("Bearer anything")),
            None
        ),
        Err(Denied::NotLoopback)
    );
}

#[test]
fn with_a_token_everyone_needs_it_loopback_included() {
    let token = SecretString::from("s3cret-token-0123456789");
    let t = Some(&token);
    assert_eq!(
        authorize(peer("127.0.0.1:1"), false, None, t),
        Err(Denied::MissingToken)
    );
    assert_eq!(
        authorize(
            peer("127.0.0.1:1"),
            false,
            Some(&auth("Bearer wrong-token-0123456789")),
            t
        ),
        Err(Denied::WrongToken)
    );
    // A prefix or an extension of the token is not the token.
    for near in ["s3cret-token-012345678", "s3cret-token-01234567890"] {
        assert_eq!(
            authorize(
                peer("10.0.0.1:1"),
                false,
                Some(&auth(&format!("Bearer {near}"))),
                t
            ),
            Err(Denied::WrongToken)
        );
    }
    for scheme in ["Bearer", "bearer", "BEARER"] {
        assert_eq!(
            authorize(
                peer("10.0.0.1:1"),
                false,
                Some(&auth(&format!("{scheme} s3cret-token-0123456789"))),
                t
            ),
            Ok(())
        );
    }
    assert_eq!(
        authorize(
            None,
            false,
            Some(&auth("Bearer s3cret-token-0123456789")),
            t
        ),
        Ok(())
    );
    // Other schemes, or the token without a scheme, are missing tokens.
    for other in [
        "Basic czNjcmV0",
        "s3cret-token-0123456789",
        "Bearer",
        "Bearer  ",
    ] {
        assert_eq!(
            authorize(peer("127.0.0.1:1"), false, Some(&auth(other)), t),
            Err(Denied::MissingToken),
            "{other}"
        );
    }
}

#[test]
fn filters_are_canonicalised_and_bounded() {
    let q = AuditQuery {
        address: Some("  Olga@Outside.Example ".into()),
        desk: Some("it".into()),
        action: Some("Create_Request".into()),
        reason: Some(" new_request".into()),
        before: Some("17".into()),
        limit: Some("100000".into()),
    };
    let f = Filter::from_query(&q);
    assert_eq!(f.address, "olga@outside.example");
    assert_eq!(f.desk, "IT");
    assert_eq!(f.action, "create_request");
    assert_eq!(f.reason, "new_request");
    assert_eq!(f.before, Some(17));
    assert_eq!(f.limit, MAX_LIMIT);
    let f = Filter::from_query(&AuditQuery {
        address: Some("not an address".into()),
        before: Some("-3".into()),
        limit: Some("x".into()),
        ..AuditQuery::default()
    });
    assert_eq!(f.address, "not an address");
    assert_eq!(f.before, None);
    assert_eq!(f.limit, DEFAULT_LIMIT);
    assert_eq!(
        f.query_string(),
        "address=not%20an%20address",
        "percent-encoded, default limit left out"
    );
}

fn row(id: i64, subject: &str, name: &str) -> DecisionRow {
    DecisionRow {
        id,
        at: 1_795_000_000,
        desk: Some("IT".into()),
        action: "create_request".into(),
        reason: "new_request".into(),
        request: Some("IT-1".into()),
        subject: Some(subject.into()),
        decision: serde_json::json!({
            "action": "create_request",
            "reason": "new_request",
            "explanation": format!("a new request from \"{name}\""),
            "requester": {"address": "olga@outside.example", "display_name": name,
                          "account": "create_portal_only", "reason": "external_domain_allowed"},
            "participants": [{"address": "bob@ext.example", "display_name": "<b>Bob</b>",
                              "outcome": "drop", "reason": "unknown_participant_dropped"}],
            "emails": [{"to": "olga@outside.example", "kind": "invitation"}],
        }),
    }
}

#[test]
fn everything_from_mail_is_escaped() {
    let evil = "<script>alert(1)</script>";
    let rows = vec![row(7, evil, "\"><img src=x onerror=alert(2)>")];
    let filter = Filter::from_query(&AuditQuery {
        address: Some("\"><script>x</script>".into()),
        ..AuditQuery::default()
    });
    let chart = BTreeMap::new();
    let html = render_page(&PageData {
        filter: &filter,
        desks: &["IT".to_string()],
        rows: &rows,
        more: false,
        chart: &chart,
        first_day: 20_000,
        days: CHART_DAYS,
    });
    assert!(!html.contains("<script"), "{html}");
    assert!(!html.contains("<img"), "{html}");
    assert!(!html.contains("<b>Bob"), "{html}");
    assert!(
        html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{html}"
    );
    assert!(
        html.contains("&quot;&gt;&lt;img src=x onerror=alert(2)&gt;"),
        "{html}"
    );
    assert!(
        html.contains("value=\"&quot;&gt;&lt;script&gt;x&lt;/script&gt;\""),
        "{html}"
    );
    assert!(html.contains("<td class=\"reason\">new_request</td>"));
    assert!(html.contains("unknown_participant_dropped"));
}

#[test]
fn the_older_link_continues_after_the_last_row_with_the_same_filters() {
    let rows = vec![row(9, "a", "A"), row(5, "b", "B")];
    let filter = Filter::from_query(&AuditQuery {
        action: Some("create_request".into()),
        reason: Some("a&b".into()),
        ..AuditQuery::default()
    });
    let chart = BTreeMap::new();
    let data = |more| PageData {
        filter: &filter,
        desks: &[],
        rows: &rows,
        more,
        chart: &chart,
        first_day: 20_000,
        days: 3,
    };
    let html = render_page(&data(true));
    assert!(
        html.contains("href=\"/audit?action=create_request&amp;reason=a%26b&amp;before=5\""),
        "{html}"
    );
    assert!(!render_page(&data(false)).contains("id=\"older\""));
}

#[test]
fn the_chart_has_a_group_per_day_and_a_bar_per_action_and_day() {
    let mut chart: BTreeMap<i64, BTreeMap<String, u64>> = BTreeMap::new();
    chart
        .entry(101)
        .or_default()
        .insert("create_request".into(), 4);
    chart.entry(101).or_default().insert("ignore".into(), 1);
    chart.entry(103).or_default().insert("reject".into(), 2);
    // Outside the window: not drawn.
    chart.entry(90).or_default().insert("reject".into(), 50);
    let svg = render_chart(&chart, 100, 5);
    assert_eq!(svg.matches("<g class=\"day\"").count(), 5, "{svg}");
    assert_eq!(svg.matches("<rect class=\"bar\"").count(), 3, "{svg}");
    assert!(svg.contains("data-action=\"create_request\" data-count=\"4\""));
    // The tallest day fills the plot; the scale's top label is its total.
    assert!(svg.contains(">5</text>"), "{svg}");
    assert!(
        svg.contains("height=\"112.0\""),
        "4 of 5 → 112 of 140 px: {svg}"
    );
    assert!(!svg.contains("data-count=\"50\""));
    assert!(svg.contains("<title id=\"chart-title\">"));
}

/// Behind a reverse proxy on the same host every client arrives from loopback: without
/// a token, a request that came through a proxy (it says so in its headers) is refused.
#[test]
fn without_a_token_a_proxied_request_is_refused() {
    assert_eq!(
        authorize(peer("127.0.0.1:1"), true, None, None),
        Err(Denied::Proxied)
    );
    let token = SecretString::from("s3cret-token-0123456789");
    assert_eq!(
        authorize(
            peer("127.0.0.1:1"),
            true,
            Some(&auth("Bearer s3cret-token-0123456789")),
            Some(&token)
        ),
        Ok(())
    );
    let mut headers = HeaderMap::new();
    assert!(!proxied(&headers));
    for name in ["forwarded", "x-forwarded-for", "x-real-ip"] {
        headers.clear();
        headers.insert(name, HeaderValue::from_static("192.0.2.7"));
        assert!(proxied(&headers), "{name}");
    }
}

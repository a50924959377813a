//! Unit tests for `src/metrics.rs`: the exposition format, escaping and the histogram.

use super::*;

#[test]
fn label_values_escape_backslash_quote_and_newline() {
    assert_eq!(escape_label_value("plain"), "plain");
    assert_eq!(escape_label_value(r"a\b"), r"a\\b");
    assert_eq!(escape_label_value("say \"hi\""), r#"say \"hi\""#);
    assert_eq!(escape_label_value("two\nlines"), r"two\nlines");
    // Carriage returns, tabs and non-ASCII pass through: the format only escapes three.
    assert_eq!(escape_label_value("tab\there ü"), "tab\there ü");
    assert_eq!(escape_label_value("\\\"\n"), r#"\\\"\n"#);
}

#[test]
fn help_escapes_backslash_and_newline_but_not_quotes() {
    assert_eq!(escape_help("a \"b\" c"), "a \"b\" c");
    assert_eq!(escape_help("a\\b\nc"), r"a\\b\nc");
}

#[test]
fn values_use_prometheus_float_syntax() {
    assert_eq!(format_value(2.0), "2");
    assert_eq!(format_value(0.0), "0");
    assert_eq!(format_value(0.005), "0.005");
    assert_eq!(format_value(1.5), "1.5");
    assert_eq!(format_value(60.0), "60");
    assert_eq!(format_value(f64::INFINITY), "+Inf");
    assert_eq!(format_value(f64::NEG_INFINITY), "-Inf");
    assert_eq!(format_value(f64::NAN), "NaN");
    assert_eq!(format_value(123456789.0), "123456789");
}

#[test]
fn samples_with_and_without_labels() {
    let mut e = Exposition::default();
    e.family("x_total", Kind::Counter, "Things.\nMore.");
    e.sample("x_total", &[], 3.0);
    e.sample("x_total", &[("a", "1"), ("b", "q\"uo\\te\n")], 0.5);
    assert_eq!(
        e.finish(),
        "# HELP x_total Things.\\nMore.\n\
         # TYPE x_total counter\n\
         x_total 3\n\
         x_total{a=\"1\",b=\"q\\\"uo\\\\te\\n\"} 0.5\n"
    );
}

#[test]
fn histogram_buckets_are_cumulative_and_end_with_inf() {
    let h = Histogram::new();
    h.observe(Duration::from_millis(1)); // ≤ 0.005
    h.observe(Duration::from_millis(5)); // exactly 0.005: in that bucket (le is ≤)
    h.observe(Duration::from_millis(7)); // ≤ 0.01
    h.observe_many(Duration::from_millis(300), 3); // ≤ 0.5
    h.observe(Duration::from_secs(120)); // over every bound: +Inf only
    h.observe_many(Duration::from_secs(1), 0); // nothing
    let s = h.snapshot();
    assert_eq!(s.count, 7);
    assert!(
        (s.sum - (0.001 + 0.005 + 0.007 + 0.9 + 120.0)).abs() < 1e-9,
        "{s:?}"
    );
    let at = |bound: f64| {
        s.buckets
            .iter()
            .find(|(b, _)| (*b - bound).abs() < 1e-12)
            .map(|(_, n)| *n)
            .unwrap()
    };
    assert_eq!(at(0.005), 2);
    assert_eq!(at(0.01), 3);
    assert_eq!(at(0.25), 3);
    assert_eq!(at(0.5), 6);
    assert_eq!(at(60.0), 6);
    assert_eq!(s.buckets.len(), LATENCY_BUCKETS_MICROS.len());
    assert!(
        s.buckets
            .windows(2)
            .all(|w| w[0].1 <= w[1].1 && w[0].0 < w[1].0)
    );

    let mut e = Exposition::default();
    e.histogram("lat_seconds", "Latency.", &s);
    let text = e.finish();
    assert!(text.starts_with("# HELP lat_seconds Latency.\n# TYPE lat_seconds histogram\n"));
    assert!(
        text.contains("lat_seconds_bucket{le=\"0.005\"} 2\n"),
        "{text}"
    );
    assert!(
        text.contains("lat_seconds_bucket{le=\"0.5\"} 6\n"),
        "{text}"
    );
    assert!(text.contains("lat_seconds_bucket{le=\"60\"} 6\n"), "{text}");
    assert!(
        text.contains("lat_seconds_bucket{le=\"+Inf\"} 7\n"),
        "{text}"
    );
    assert!(text.contains("lat_seconds_count 7\n"), "{text}");
    assert!(text.contains("lat_seconds_sum 120.913\n"), "{text}");
    let inf = text.find("le=\"+Inf\"").unwrap();
    assert!(inf < text.find("lat_seconds_sum").unwrap());
}

#[test]
fn a_snapshot_stays_consistent_while_others_observe() {
    let h = std::sync::Arc::new(Histogram::new());
    let writers: Vec<_> = (0..4)
        .map(|i| {
            let h = h.clone();
            std::thread::spawn(move || {
                for k in 0..20_000u64 {
                    h.observe(Duration::from_micros((k * 37 + i) % 90_000_000));
                }
            })
        })
        .collect();
    for _ in 0..200 {
        let s = h.snapshot();
        let last = s.buckets.last().map(|(_, n)| *n).unwrap_or(0);
        assert!(last <= s.count, "{s:?}");
        assert!(s.buckets.windows(2).all(|w| w[0].1 <= w[1].1));
    }
    for w in writers {
        w.join().unwrap();
    }
    assert_eq!(h.snapshot().count, 80_000);
}

fn sample_snapshot() -> Snapshot {
    let mut db = DatabaseCounts::default();
    db.messages
        .insert(("create_request".into(), "new_request".into()), 2);
    db.messages
        .insert(("ignore".into(), "auto_submitted".into()), 1);
    db.accounts_created.insert("internal".into(), 0);
    db.accounts_created.insert("portal_only".into(), 1);
    db.participants_dropped
        .insert("unknown_participant_dropped".into(), 3);
    db.outbox.insert("pending".into(), 1);
    db.outbox.insert("sending".into(), 0);
    db.outbox.insert("dead".into(), 0);
    db.send_failures = 4;
    let h = Histogram::new();
    h.observe_many(Duration::from_millis(20), 3);
    Snapshot {
        database: Some(db),
        mailboxes: vec![
            MailboxLag {
                mailbox: "inbox".into(),
                up: true,
                lag_seconds: 0,
            },
            MailboxLag {
                mailbox: "we\"ird\\name".into(),
                up: false,
                lag_seconds: 42,
            },
        ],
        processing: h.snapshot(),
    }
}

#[test]
fn render_writes_every_family_once_before_its_samples() {
    let text = render(&sample_snapshot());
    for line in [
        "intake_database_up 1",
        "intake_messages_total{action=\"create_request\",reason=\"new_request\"} 2",
        "intake_messages_total{action=\"ignore\",reason=\"auto_submitted\"} 1",
        "intake_accounts_created_total{kind=\"internal\"} 0",
        "intake_accounts_created_total{kind=\"portal_only\"} 1",
        "intake_participants_dropped_total{reason=\"unknown_participant_dropped\"} 3",
        "intake_outbox_messages{status=\"pending\"} 1",
        "intake_outbox_messages{status=\"dead\"} 0",
        "intake_outbox_send_failures_total 4",
        "intake_mailbox_up{mailbox=\"inbox\"} 1",
        "intake_mailbox_up{mailbox=\"we\\\"ird\\\\name\"} 0",
        "intake_mailbox_lag_seconds{mailbox=\"we\\\"ird\\\\name\"} 42",
        "intake_message_processing_seconds_bucket{le=\"0.01\"} 0",
        "intake_message_processing_seconds_bucket{le=\"0.025\"} 3",
        "intake_message_processing_seconds_count 3",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in:\n{text}"
        );
    }
    // Each family has exactly one HELP and one TYPE, and they come before its samples.
    let mut declared: Vec<&str> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split(' ').next().unwrap();
            assert!(!declared.contains(&name), "{name} declared twice");
            declared.push(name);
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let name = line.split(['{', ' ']).next().unwrap();
        let family = declared.last().copied().unwrap_or_default();
        assert!(
            name == family
                || (name.starts_with(family)
                    && ["_bucket", "_sum", "_count"].contains(&&name[family.len()..])),
            "sample {name} outside its family {family}:\n{text}"
        );
        // `name{labels} value` or `name value`, the value a float.
        let value = line.rsplit(' ').next().unwrap();
        assert!(
            value.parse::<f64>().is_ok() || value == "+Inf",
            "bad value in {line:?}"
        );
    }
    assert_eq!(declared.len(), 9, "{declared:?}");
    assert!(text.ends_with('\n'));
}

#[test]
fn without_the_database_only_process_metrics_are_written() {
    let mut s = sample_snapshot();
    s.database = None;
    let text = render(&s);
    assert!(text.lines().any(|l| l == "intake_database_up 0"), "{text}");
    assert!(!text.contains("intake_messages_total"), "{text}");
    assert!(!text.contains("intake_outbox_messages"), "{text}");
    assert!(text.contains("intake_message_processing_seconds_count 3"));
    assert!(text.contains("intake_mailbox_lag_seconds{mailbox=\"inbox\"} 0"));
}

#[test]
fn mailbox_lag_counts_from_when_it_stopped_working() {
    let healthy = SourceHealth {
        ok: true,
        last_ok: Some(100),
        last_error: None,
        since: 50,
    };
    // Healthy IMAP sits in IDLE long after its last reported success: no lag.
    assert_eq!(
        MailboxLag::from_health("m", &healthy, 10_000).lag_seconds,
        0
    );
    let failing = SourceHealth {
        ok: false,
        last_ok: Some(100),
        last_error: Some("refused".into()),
        since: 900,
    };
    let lag = MailboxLag::from_health("m", &failing, 1_000);
    assert!(!lag.up);
    assert_eq!(lag.lag_seconds, 100);
    // A clock that went backwards never gives a negative lag.
    assert_eq!(MailboxLag::from_health("m", &failing, 800).lag_seconds, 0);
}

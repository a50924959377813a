//! The operator endpoints of `intake run`: the `/audit` page in headless Chromium
//! (rows, filters, the chart, escaping of mail-supplied text), its access rule (loopback
//! only, or a bearer token), and `/metrics` after real messages went through the daemon.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::browser::{Browser, http};
use crate::harness::*;
use crate::smtp::{Mode, Smtp};

const WAIT: Duration = Duration::from_secs(30);

/// A message whose display name and subject are markup.
const EVIL: &str = "From: \"<script>alert('name')</script>\" <eve@outside.example>\r\n\
To: IT Desk <it@desk.example>\r\n\
Subject: <script>alert(1)</script> printer & <b>fax</b>\r\n\
Date: Mon, 23 Nov 2026 12:00:00 +0100\r\n\
Message-ID: <evil-audit-1@outside.example>\r\n\
\r\n\
Hello.\r\n";

/// The messages every test here feeds, oldest first: (file name in the maildir, path).
fn messages(env: &Env) -> Vec<(String, PathBuf)> {
    let evil = env.path("evil.eml");
    std::fs::write(&evil, EVIL).unwrap();
    vec![
        ("1.eml".into(), fixture("outsider-new.eml")),
        ("2.eml".into(), fixture("auto-reply.eml")),
        ("3.eml".into(), fixture("internal-forged.eml")),
        ("4.eml".into(), evil),
    ]
}

/// Drops each message into the daemon's Maildir and waits until it was committed (the
/// daemon moves it out of `new/` only after the commit). Returns the decisions `explain`
/// gave just before each was delivered.
fn feed(env: &Env, daemon: &Daemon) -> Vec<Value> {
    let maildir = env.path("maildir");
    for d in ["new", "cur", "tmp"] {
        std::fs::create_dir_all(maildir.join(d)).unwrap();
    }
    let mut decisions = Vec::new();
    for (name, path) in messages(env) {
        decisions.push(env.json(&["explain", path.to_str().unwrap(), "--format", "json"]));
        std::fs::copy(&path, maildir.join("tmp").join(&name)).unwrap();
        std::fs::rename(
            maildir.join("tmp").join(&name),
            maildir.join("new").join(&name),
        )
        .unwrap();
        daemon.wait_for(&format!("{name} to be processed"), WAIT, || {
            !maildir.join("new").join(&name).exists()
        });
    }
    decisions
}

fn wait_for_http(env: &Env, daemon: &Daemon) {
    daemon.wait_for("the HTTP server", WAIT, || {
        TcpStream::connect(("127.0.0.1", env.http_port)).is_ok()
    });
}

/// A GET with extra request headers (the harness's `http()` sends none). Returns
/// (status, head, body).
pub(crate) fn get(port: u16, path: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut request =
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .expect("read the response");
    let text = String::from_utf8_lossy(&response).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

/// `series{labels}` → value of every sample line.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad line {l:?}"));
            let value = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("bad value in {l:?}")),
            };
            (series.to_string(), value)
        })
        .collect()
}

fn metrics(env: &Env) -> BTreeMap<String, f64> {
    let (status, head, body) = http(env.http_port, "GET", "/metrics", None);
    assert_eq!(status, 200, "{head}\n{body}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    parse_metrics(&body)
}

/// Rows of the decision table in a page's source.
fn row_count(source: &str) -> usize {
    source.matches("<tr class=\"decision\"").count()
}

fn wait_for_page(browser: &Browser, what: &str, mut done: impl FnMut(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        let source = browser.source();
        if done(&source) {
            return source;
        }
        assert!(
            start.elapsed() < WAIT,
            "timed out waiting for {what}:\n{source}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn audit_page_lists_filters_charts_and_escapes_in_a_browser() {
    for backend in BACKENDS {
        let env = Env::new(backend, &Site::default(), &DeskSettings::default());
        let daemon = start_daemon(&env);
        wait_for_http(&env, &daemon);
        feed(&env, &daemon);

        // Loopback and no token configured: allowed, with the strict headers.
        let (status, head, body) = http(env.http_port, "GET", "/audit", None);
        assert_eq!(status, 200, "{body}");
        let lower = head.to_ascii_lowercase();
        assert!(head.contains("default-src 'none'"), "{head}");
        assert!(lower.contains("referrer-policy: no-referrer"), "{head}");
        assert!(lower.contains("content-type: text/html"), "{head}");
        assert!(!body.contains("<script"), "raw markup from mail: {body}");

        let browser = Browser::start();
        browser.goto(&format!("http://127.0.0.1:{}/audit", env.http_port));
        assert_eq!(browser.title(), "Audit log");
        let source = browser.source();
        assert_eq!(row_count(&source), 4, "{source}");
        // Newest first: the last message fed is on top.
        let first = source.find("eve@outside.example").expect("eve's row");
        let olga = source.find("olga@outside.example").expect("olga's row");
        assert!(first < olga, "newest first:\n{source}");
        // The chart: one group per day of the window, one bar per action with decisions
        // (all of them today): create_request ×2, ignore, reject.
        assert!(source.contains("<svg"), "{source}");
        assert_eq!(source.matches("class=\"day\"").count(), 14, "{source}");
        assert_eq!(source.matches("class=\"bar\"").count(), 3, "{source}");
        assert!(
            source.contains("data-action=\"create_request\" data-count=\"2\""),
            "{source}"
        );

        // Mail-supplied markup is text, not markup: no element was made from it.
        let text = browser.text();
        assert!(
            text.contains("<script>alert(1)</script> printer & <b>fax</b>"),
            "{text}"
        );
        assert!(text.contains("<script>alert('name')</script>"), "{text}");
        assert!(!source.contains("<script"), "{source}");
        assert!(!source.contains("<b>fax"), "{source}");

        // Filter by address with the form: only the decisions that touched bob remain.
        browser.fill("#address", "Bob@Ext.Example");
        browser.click("#filter");
        let source = wait_for_page(&browser, "the filtered page", |s| {
            s.contains("value=\"bob@ext.example\"")
        });
        assert_eq!(row_count(&source), 1, "{source}");
        assert!(source.contains("Printer on fire"), "{source}");
        assert!(!source.contains("eve@outside.example"), "{source}");
        assert_eq!(source.matches("class=\"bar\"").count(), 1, "{source}");

        // Olga: her request and her auto-reply, nothing of eve's or the forged CEO's.
        browser.fill("#address", "olga@outside.example");
        browser.click("#filter");
        let source = wait_for_page(&browser, "olga's decisions", |s| {
            s.contains("value=\"olga@outside.example\"")
        });
        let audit = env.json(&["audit", "olga@outside.example", "--json"]);
        let mut touched: Vec<String> = audit
            .as_array()
            .unwrap()
            .iter()
            .map(|a| format!("{}{}{}", a["at"], a["action"], a["reason"]))
            .collect();
        touched.dedup();
        assert_eq!(row_count(&source), touched.len(), "{source}");
        assert!(row_count(&source) >= 1);
        assert!(!source.contains("eve@outside.example"), "{source}");
        assert!(!source.contains("ceo@corp.example"), "{source}");

        // Filter by action with the select: only the rejected forgery.
        browser.fill("#address", "");
        browser.click("#action option[value=\"reject\"]");
        browser.click("#filter");
        let source = wait_for_page(&browser, "the rejected decisions", |s| {
            s.contains("<option value=\"reject\" selected")
        });
        assert_eq!(row_count(&source), 1, "{source}");
        assert!(source.contains("unauthenticated_sender"), "{source}");
        assert!(source.contains("ceo@corp.example"), "{source}");

        // Paging: one row per page, the "older" link walks back through all four.
        browser.goto(&format!("http://127.0.0.1:{}/audit?limit=1", env.http_port));
        let mut seen = Vec::new();
        loop {
            let source = browser.source();
            assert_eq!(row_count(&source), 1, "{source}");
            let id = source
                .split("<tr class=\"decision\" data-id=\"")
                .nth(1)
                .and_then(|s| s.split('"').next())
                .unwrap()
                .to_string();
            seen.push(id);
            if !source.contains("id=\"older\"") {
                break;
            }
            browser.click("#older");
            let before = seen.len();
            wait_for_page(&browser, "the older page", |s| {
                s.contains("id=\"newest\"")
                    && !s.contains(&format!("data-id=\"{}\"", seen[before - 1]))
            });
        }
        assert_eq!(seen.len(), 4, "{seen:?}");
        let mut ids: Vec<i64> = seen.iter().map(|s| s.parse().unwrap()).collect();
        let shown = ids.clone();
        ids.sort_by(|a, b| b.cmp(a));
        ids.dedup();
        assert_eq!(ids, shown, "newest first, no repeats");
        drop(browser);
        daemon.stop();
    }
}

#[test]
fn a_token_is_required_from_everyone_once_configured() {
    for backend in BACKENDS {
        let env = Env::new(backend, &Site::default(), &DeskSettings::default());
        let token = "tok-0123456789abcdef-XYZ";
        let token_file = env.path("audit-token");
        std::fs::write(&token_file, format!("{token}\n")).unwrap();
        let text = std::fs::read_to_string(&env.config).unwrap().replace(
            "[http]\n",
            &format!("[http]\naudit_token_file = \"{}\"\n", token_file.display()),
        );
        std::fs::write(&env.config, &text).unwrap();
        let daemon = start_daemon(&env);
        wait_for_http(&env, &daemon);

        for path in ["/audit", "/metrics"] {
            // Loopback is not enough once a token is set (a local reverse proxy is loopback).
            let (status, _, body) = get(env.http_port, path, &[]);
            assert_eq!(status, 403, "{path} without a token: {body}");
            assert!(!body.contains("Audit log"), "{body}");
            let (status, _, _) = get(
                env.http_port,
                path,
                &[("Authorization", "Bearer tok-0123456789abcdef-XY")],
            );
            assert_eq!(status, 403, "{path} with a wrong token");
            let (status, _, _) = get(env.http_port, path, &[("Authorization", token)]);
            assert_eq!(status, 403, "{path} without the Bearer scheme");
            let auth = format!("Bearer {token}");
            let (status, _, body) = get(env.http_port, path, &[("Authorization", &auth)]);
            assert_eq!(status, 200, "{path} with the token: {body}");
        }
        let auth = format!("Bearer {token}");
        let (_, _, body) = get(env.http_port, "/metrics", &[("Authorization", &auth)]);
        assert!(body.lines().any(|l| l == "intake_database_up 1"), "{body}");
        // The verification pages and /healthz are not behind the token.
        let (status, _, _) = get(env.http_port, "/healthz", &[]);
        assert_eq!(status, 200);
        daemon.stop();

        // A token too short to be a secret, or set twice, is a configuration error with its key.
        std::fs::write(&token_file, "short").unwrap();
        let out = env.intake(&["check-config"]);
        assert_eq!(out.status.code(), Some(78));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("http.audit_token_file: the token is too short"),
            "{stdout}"
        );
        std::fs::write(&token_file, token).unwrap();
        let both = text.replace("[http]\n", &format!("[http]\naudit_token = \"{token}\"\n"));
        std::fs::write(&env.config, both).unwrap();
        let out = env.intake(&["check-config"]);
        assert_eq!(out.status.code(), Some(78));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(
                "http.audit_token_file: set either http.audit_token or http.audit_token_file"
            ),
            "{stdout}"
        );
    }
}

#[test]
fn metrics_count_what_the_daemon_processed() {
    for backend in BACKENDS {
        // SMTP is down: the invitations stay in the outbox; the one tried fails (the
        // other waits untried while the worker pauses for the relay).
        let smtp = Smtp::stopped(Mode::Plain);
        let env = Env::with_extra(
            backend,
            &Site::default(),
            &DeskSettings::default(),
            &smtp.toml(""),
        );
        let daemon = start_daemon(&env);
        wait_for_http(&env, &daemon);
        let before = metrics(&env);
        assert_eq!(before["intake_database_up"], 1.0);
        assert_eq!(before["intake_message_processing_seconds_count"], 0.0);
        let decisions = feed(&env, &daemon);

        daemon.wait_for("an invitation to fail", WAIT, || {
            metrics(&env)
                .get("intake_outbox_send_failures_total")
                .is_some_and(|n| *n >= 1.0)
        });
        let m = metrics(&env);
        let at = |series: &str| -> f64 {
            *m.get(series)
                .unwrap_or_else(|| panic!("{backend:?}: no {series} in {m:#?}"))
        };
        assert_eq!(
            at("intake_messages_total{action=\"create_request\",reason=\"new_request\"}"),
            2.0
        );
        assert_eq!(
            at("intake_messages_total{action=\"ignore\",reason=\"auto_submitted\"}"),
            1.0
        );
        assert_eq!(
            at("intake_messages_total{action=\"reject\",reason=\"unauthenticated_sender\"}"),
            1.0
        );
        let total: f64 = m
            .iter()
            .filter(|(k, _)| k.starts_with("intake_messages_total{"))
            .map(|(_, v)| v)
            .sum();
        assert_eq!(total, 4.0, "{m:#?}");

        // The histogram saw every message the daemon processed, once.
        assert_eq!(at("intake_message_processing_seconds_count"), 4.0);
        assert_eq!(
            at("intake_message_processing_seconds_bucket{le=\"+Inf\"}"),
            4.0
        );
        assert!(at("intake_message_processing_seconds_sum") > 0.0);
        assert!(
            at("intake_message_processing_seconds_bucket{le=\"60\"}") <= 4.0
                && at("intake_message_processing_seconds_bucket{le=\"0.005\"}")
                    <= at("intake_message_processing_seconds_bucket{le=\"60\"}")
        );

        // Accounts created, by kind, as the directory has them.
        let accounts = env.accounts();
        let made = |kind: &str| {
            accounts
                .iter()
                .filter(|a| a["origin"] == "mail" && a["kind"] == kind)
                .count() as f64
        };
        assert_eq!(made("portal_only"), 2.0, "olga and eve: {accounts:#?}");
        assert_eq!(
            at("intake_accounts_created_total{kind=\"portal_only\"}"),
            made("portal_only")
        );
        assert_eq!(
            at("intake_accounts_created_total{kind=\"internal\"}"),
            made("internal")
        );

        // Dropped participants: what the decisions said, by reason.
        let mut dropped: BTreeMap<String, f64> = BTreeMap::new();
        for (_, outcome, reason) in decisions.iter().flat_map(participants) {
            if outcome == "drop" && reason != "request_held" {
                *dropped.entry(reason).or_default() += 1.0;
            }
        }
        assert!(
            dropped.get("own_address").is_some_and(|n| *n >= 2.0),
            "{dropped:?}"
        );
        for (reason, n) in &dropped {
            assert_eq!(
                at(&format!(
                    "intake_participants_dropped_total{{reason=\"{reason}\"}}"
                )),
                *n,
                "{reason}"
            );
        }
        let reported: f64 = m
            .iter()
            .filter(|(k, _)| k.starts_with("intake_participants_dropped_total{"))
            .map(|(_, v)| v)
            .sum();
        assert_eq!(reported, dropped.values().sum::<f64>(), "{m:#?}");

        // The outbox: two invitations waiting, none dead; a failure counted.
        assert_eq!(
            at("intake_outbox_messages{status=\"pending\"}")
                + at("intake_outbox_messages{status=\"sending\"}"),
            2.0
        );
        assert_eq!(at("intake_outbox_messages{status=\"dead\"}"), 0.0);
        assert!(at("intake_outbox_send_failures_total") >= 1.0);

        // The maildir works: up, no lag.
        assert_eq!(at("intake_mailbox_up{mailbox=\"inbox\"}"), 1.0);
        assert_eq!(at("intake_mailbox_lag_seconds{mailbox=\"inbox\"}"), 0.0);

        // The same page queries on this backend: bob was on one message.
        let (status, _, body) = http(
            env.http_port,
            "GET",
            "/audit?address=bob%40ext.example",
            None,
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(row_count(&body), 1, "{backend:?}: {body}");
        assert_eq!(body.matches("class=\"bar\"").count(), 1, "{body}");
        let (_, _, body) = http(env.http_port, "GET", "/audit?action=ignore", None);
        assert_eq!(row_count(&body), 1, "{backend:?}: {body}");
        assert!(body.contains("auto_submitted"));
        daemon.stop();
    }
}

/// The pages are reachable from outside: a client that sends no complete request
/// headers is cut off after `http.read_timeout`, one dripping a body gets 408 after
/// twice that, and past `http.max_connections` a new connection waits for a slot
/// instead of being served beside the others.
#[test]
fn slow_clients_are_cut_off_and_connections_are_limited() {
    use std::io::ErrorKind;
    for backend in BACKENDS {
        let env = Env::new(backend, &Site::default(), &DeskSettings::default());
        let text = std::fs::read_to_string(&env.config).unwrap().replace(
            "[http]\n",
            "[http]\nread_timeout = \"2s\"\nmax_connections = 1\n",
        );
        std::fs::write(&env.config, &text).unwrap();
        let daemon = start_daemon(&env);
        wait_for_http(&env, &daemon);
        // Let the probe's connection give its slot back.
        daemon.wait_for("a free connection slot", WAIT, || {
            get(env.http_port, "/healthz", &[]).0 == 200
        });

        // A takes the only slot, with half a request.
        let mut a = TcpStream::connect(("127.0.0.1", env.http_port)).unwrap();
        a.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
        // B sends a whole request but is not served while A holds the slot.
        let mut b = TcpStream::connect(("127.0.0.1", env.http_port)).unwrap();
        b.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        b.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut buf = [0u8; 64];
        let early = b.read(&mut buf);
        assert!(
            early
                .as_ref()
                .is_err_and(|e| matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)),
            "B was served beside A: {early:?}"
        );
        // A is cut off (no response to half a request), which frees the slot for B.
        a.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut rest = Vec::new();
        let cut = a.read_to_end(&mut rest);
        assert!(
            cut.is_ok()
                || cut
                    .as_ref()
                    .is_err_and(|e| e.kind() == ErrorKind::ConnectionReset),
            "A was not closed within 10 s: {cut:?}"
        );
        let rest = String::from_utf8_lossy(&rest);
        assert!(!rest.contains("200 OK"), "A was answered: {rest}");
        b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut response = Vec::new();
        b.read_to_end(&mut response).unwrap();
        let response = String::from_utf8_lossy(&response);
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");

        // A confirmation whose body never comes in full gets 408, and the slot back.
        let mut c = TcpStream::connect(("127.0.0.1", env.http_port)).unwrap();
        c.write_all(
            b"POST /verify/abc HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\nname=A",
        )
        .unwrap();
        c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut all = Vec::new();
        let ended = c.read_to_end(&mut all);
        let all = String::from_utf8_lossy(&all);
        assert!(ended.is_ok(), "not closed within 15 s: {ended:?} {all}");
        assert!(all.starts_with("HTTP/1.1 408"), "{all}");
        assert_eq!(get(env.http_port, "/healthz", &[]).0, 200);

        // An idle keep-alive connection is closed too, after answering.
        let mut d = TcpStream::connect(("127.0.0.1", env.http_port)).unwrap();
        d.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        d.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut all = Vec::new();
        let ended = d.read_to_end(&mut all);
        assert!(
            ended.is_ok(),
            "idle connection not closed within 10 s: {ended:?}"
        );
        assert!(String::from_utf8_lossy(&all).starts_with("HTTP/1.1 200"));
        daemon.stop();

        // Out-of-range settings are named with their key.
        for (from, to, says) in [
            (
                "read_timeout = \"2s\"",
                "read_timeout = \"0s\"",
                "http.read_timeout: must be from 1s to 1h",
            ),
            (
                "read_timeout = \"2s\"",
                "read_timeout = \"2h\"",
                "http.read_timeout: must be from 1s to 1h",
            ),
            (
                "max_connections = 1",
                "max_connections = 0",
                "http.max_connections: must be from 1 to 100000",
            ),
        ] {
            std::fs::write(&env.config, text.replace(from, to)).unwrap();
            let out = env.intake(&["check-config"]);
            assert_eq!(out.status.code(), Some(78));
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(stdout.contains(says), "{stdout}");
        }
    }
}

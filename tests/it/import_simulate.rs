//! `intake import` (mbox and Maildir backlogs, resumable) and `intake simulate` (a changed
//! policy decided again on the recorded facts, without writing anything).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::*;

/// One small message from its own sender to the IT desk.
fn message(i: usize, body: &str) -> String {
    format!(
        "From: Customer {i} <c{i}@cust{}.example>\nTo: IT Desk <it@desk.example>\n\
         Subject: Backlog message {i}\nMessage-ID: <backlog-{i}@mail.example>\n\
         Date: Mon, 23 Nov 2026 10:00:00 +0000\n\n{body}\n",
        i % 10
    )
}

/// An mbox as an mboxrd writer makes it (body `From ` lines escaped).
fn write_mbox(path: &Path, messages: &[Vec<u8>]) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create mbox"));
    for m in messages {
        f.write_all(b"From MAILER-DAEMON Mon Nov 23 10:00:00 2026\n")
            .expect("write");
        f.write_all(m).expect("write");
        f.write_all(b"\n").expect("write");
    }
    f.flush().expect("flush");
}

fn count(report: &Value, action: &str) -> u64 {
    report["outcomes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|o| o["action"] == action)
        .filter_map(|o| o["count"].as_u64())
        .sum()
}

fn all_requests(env: &Env) -> Vec<Value> {
    match env.json(&["requests", "list", "--json", "--limit", "100000"]) {
        Value::Array(a) => a,
        other => panic!("requests list is not an array: {other}"),
    }
}

#[test]
fn mbox_import_creates_requests_and_a_second_run_skips_it_all() {
    for backend in BACKENDS {
        let env = Env::new(backend, &Site::default(), &DeskSettings::default());
        let mut messages: Vec<Vec<u8>> = (0..297)
            .map(|i| message(i, "The VPN drops every few minutes.").into_bytes())
            .collect();
        // A body line that an mboxrd writer escaped.
        messages.push(
            message(1000, "Hello,\n>From the top of the building we see smoke.").into_bytes(),
        );
        // A CRLF message.
        messages.push(
            message(1001, "Sent from a CRLF system.")
                .replace('\n', "\r\n")
                .into_bytes(),
        );
        // Garbage: quarantined, not lost.
        let junk = std::fs::read(fixture("unparseable.eml")).expect("fixture");
        messages.push(junk.clone());
        let mbox = env.path("backlog.mbox");
        write_mbox(&mbox, &messages);
        // The last message without a final newline.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&mbox)
            .expect("open mbox");
        f.write_all(b"From MAILER-DAEMON Mon Nov 23 10:00:00 2026\n")
            .expect("write");
        f.write_all(message(1002, "no newline at the end").trim_end().as_bytes())
            .expect("write");
        drop(f);

        let report = env.json(&[
            "import",
            "--json",
            "--no-send",
            mbox.to_str().expect("utf-8"),
        ]);
        assert_eq!(report["imported"], 301, "{report}");
        assert_eq!(report["skipped"], 0, "{report}");
        assert_eq!(report["quarantined"], 1, "{report}");
        assert_eq!(report["interrupted"], false, "{report}");
        assert_eq!(count(&report, "create_request"), 300, "{report}");
        assert_eq!(count(&report, "quarantine"), 1, "{report}");
        let requests = all_requests(&env);
        assert_eq!(requests.len(), 300);

        let key_of = |subject: &str| -> String {
            requests
                .iter()
                .find(|r| r["subject"] == subject)
                .and_then(|r| r["key"].as_str())
                .unwrap_or_else(|| panic!("no request {subject:?}"))
                .to_string()
        };
        let escaped = env.request(&key_of("Backlog message 1000"));
        let text = escaped["description"].as_str().expect("description");
        assert!(
            text.contains("\nFrom the top of the building") && !text.contains(">From"),
            "{text:?}"
        );
        let crlf = env.request(&key_of("Backlog message 1001"));
        assert!(
            crlf["description"]
                .as_str()
                .is_some_and(|d| d.contains("Sent from a CRLF system.")),
            "{crlf}"
        );
        let last = env.request(&key_of("Backlog message 1002"));
        assert!(
            last["description"]
                .as_str()
                .is_some_and(|d| d.contains("no newline at the end")),
            "{last}"
        );
        // The quarantined message is kept as it was in the mbox (plus the line end the
        // mbox gave it).
        let q = env.json(&["quarantine", "list", "--json"]);
        let kept = q[0]["quarantine_ref"].as_str().expect("quarantine_ref");
        let mut expected = junk.clone();
        expected.push(b'\n');
        assert_eq!(std::fs::read(kept).expect("quarantined file"), expected);
        assert!(
            q[0]["source"]
                .as_str()
                .is_some_and(|s| s.starts_with("import:") && s.ends_with("backlog.mbox")),
            "{q}"
        );

        // Again: nothing is read, and it says so.
        let again = env.json(&[
            "import",
            "--json",
            "--no-send",
            mbox.to_str().expect("utf-8"),
        ]);
        assert_eq!(again["imported"], 0, "{again}");
        assert_eq!(again["skipped"], 301, "{again}");
        let out = env.intake(&["import", "--no-send", mbox.to_str().expect("utf-8")]);
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("nothing new") && text.contains("301 skipped (imported before"),
            "{text}"
        );
        assert_eq!(all_requests(&env).len(), 300);

        // Mail appended to an mbox is picked up from where the last run stopped.
        let growing = env.path("growing.mbox");
        write_mbox(&growing, &[message(2000, "first").into_bytes()]);
        let first = env.json(&[
            "import",
            "--json",
            "--no-send",
            growing.to_str().expect("utf-8"),
        ]);
        assert_eq!(first["imported"], 1, "{first}");
        let mut more = Vec::new();
        more.extend_from_slice(b"From MAILER-DAEMON Mon Nov 23 10:00:00 2026\n");
        more.extend_from_slice(message(2001, "appended later").as_bytes());
        more.push(b'\n');
        std::fs::OpenOptions::new()
            .append(true)
            .open(&growing)
            .expect("open mbox")
            .write_all(&more)
            .expect("append");
        let appended = env.json(&[
            "import",
            "--json",
            "--no-send",
            growing.to_str().expect("utf-8"),
        ]);
        assert_eq!(appended["imported"], 1, "{appended}");
        assert_eq!(appended["skipped"], 1, "{appended}");
        assert_eq!(count(&appended, "create_request"), 1, "{appended}");

        // A rewritten file is read from the start again; the ledger skips what was done.
        write_mbox(
            &mbox,
            &[
                message(3000, "a new first message").into_bytes(),
                message(0, "The VPN drops every few minutes.").into_bytes(),
            ],
        );
        let rewritten = env.json(&[
            "import",
            "--json",
            "--no-send",
            mbox.to_str().expect("utf-8"),
        ]);
        assert_eq!(rewritten["imported"], 2, "{rewritten}");
        assert_eq!(count(&rewritten, "create_request"), 1, "{rewritten}");
        assert_eq!(count(&rewritten, "ignore"), 1, "{rewritten}");
        assert!(
            rewritten["sources"][0]["restarted"].is_string(),
            "{rewritten}"
        );
        assert_eq!(all_requests(&env).len(), 303);
    }
}

#[test]
fn a_killed_import_resumes_and_processes_everything_once() {
    for backend in BACKENDS {
        let env = Env::new(backend, &Site::default(), &DeskSettings::default());
        let total = 3000;
        let messages: Vec<Vec<u8>> = (0..total)
            .map(|i| message(i, "The VPN drops every few minutes.").into_bytes())
            .collect();
        let mbox = env.path("big.mbox");
        write_mbox(&mbox, &messages);

        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(&env.config)
            .args(["import", "--json", "--no-send"])
            .arg(&mbox)
            .current_dir(env.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start intake import");
        // Kill it once at least one batch has committed.
        let started = Instant::now();
        loop {
            assert!(
                child.try_wait().expect("wait").is_none(),
                "the import finished before it could be killed: make the mbox bigger"
            );
            let newest = env.json(&["requests", "list", "--json", "--limit", "1"]);
            if newest.as_array().is_some_and(|a| !a.is_empty()) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "no batch committed"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
        let before = all_requests(&env).len();
        assert!(
            before > 0 && before < total,
            "killed after {before} requests"
        );

        let report = env.json(&[
            "import",
            "--json",
            "--no-send",
            mbox.to_str().expect("utf-8"),
        ]);
        // It starts right after the last batch the killed run committed (the progress commits
        // with the batch): nothing is read twice, nothing turns up as a duplicate.
        assert_eq!(report["skipped"], before, "{report}");
        assert_eq!(report["imported"], total - before, "{report}");
        assert_eq!(
            count(&report, "create_request") as usize,
            total - before,
            "{report}"
        );
        assert_eq!(count(&report, "ignore"), 0, "{report}");
        assert!(
            report["sources"][0]["resumed_at"]
                .as_u64()
                .is_some_and(|b| b > 0),
            "{report}"
        );

        let requests = all_requests(&env);
        assert_eq!(requests.len(), total);
        let mut subjects: Vec<&str> = requests
            .iter()
            .filter_map(|r| r["subject"].as_str())
            .collect();
        subjects.sort();
        subjects.dedup();
        assert_eq!(subjects.len(), total, "a message was processed twice");

        let third = env.json(&[
            "import",
            "--json",
            "--no-send",
            mbox.to_str().expect("utf-8"),
        ]);
        assert_eq!(third["imported"], 0, "{third}");
        assert_eq!(third["skipped"], total, "{third}");
    }
}

#[test]
fn an_interrupted_import_finishes_its_batch_and_says_to_run_again() {
    for backend in BACKENDS {
        let env = Env::new(backend, &Site::default(), &DeskSettings::default());
        let total = 3000;
        let messages: Vec<Vec<u8>> = (0..total)
            .map(|i| message(i, "The VPN drops every few minutes.").into_bytes())
            .collect();
        let mbox = env.path("big.mbox");
        write_mbox(&mbox, &messages);
        let child = Command::new(BIN)
            .arg("--config")
            .arg(&env.config)
            .args(["import", "--json", "--no-send"])
            .arg(&mbox)
            .current_dir(env.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start intake import");
        let started = Instant::now();
        while all_requests(&env).is_empty() {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "no batch committed"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let status = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        let out = child.wait_with_output().expect("wait");
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
        let stderr = String::from_utf8_lossy(&out.stderr);
        if report["interrupted"] == true {
            assert!(
                stderr.contains("interrupted, run again to continue"),
                "{stderr}"
            );
            // Whole batches only: what it reports is what it committed.
            let imported = report["imported"].as_u64().expect("imported");
            assert_eq!(all_requests(&env).len() as u64, imported);
            assert!(imported < total as u64);
        }
        let rest = env.json(&[
            "import",
            "--json",
            "--no-send",
            mbox.to_str().expect("utf-8"),
        ]);
        assert_eq!(
            rest["skipped"].as_u64().unwrap_or(0) + rest["imported"].as_u64().unwrap_or(0),
            total as u64,
            "{rest}"
        );
        assert_eq!(count(&rest, "ignore"), 0, "{rest}");
        assert_eq!(all_requests(&env).len(), total);
    }
}

#[test]
fn maildir_import_reads_cur_and_new_and_skips_what_it_did() {
    for backend in BACKENDS {
        let env = Env::new(backend, &Site::default(), &DeskSettings::default());
        let maildir = env.path("backlog");
        for sub in ["cur", "new", "tmp"] {
            std::fs::create_dir_all(maildir.join(sub)).expect("mkdir");
        }
        for i in 0..6 {
            let (sub, name) = if i % 2 == 0 {
                ("cur", format!("170000000{i}.M1P1.host:2,S"))
            } else {
                ("new", format!("170000000{i}.M1P1.host"))
            };
            std::fs::write(maildir.join(sub).join(name), message(i, "from a Maildir"))
                .expect("write");
        }
        // Being delivered: not a message yet.
        std::fs::write(maildir.join("tmp").join("x"), "partial").expect("write");
        let report = env.json(&[
            "import",
            "--json",
            "--no-send",
            maildir.to_str().expect("utf-8"),
        ]);
        assert_eq!(report["imported"], 6, "{report}");
        assert_eq!(count(&report, "create_request"), 6, "{report}");
        assert_eq!(report["sources"][0]["kind"], "maildir", "{report}");
        // The files stay where they are.
        assert_eq!(
            std::fs::read_dir(maildir.join("new"))
                .expect("list")
                .count(),
            3
        );

        // A file that moved from new/ to cur/ meanwhile is the same message; a new one
        // is imported.
        let moved = maildir.join("new").join("1700000001.M1P1.host");
        std::fs::rename(&moved, maildir.join("cur").join("1700000001.M1P1.host:2,S"))
            .expect("move");
        std::fs::write(
            maildir.join("new").join("1700000009.M1P1.host"),
            message(9, "arrived later"),
        )
        .expect("write");
        let again = env.json(&[
            "import",
            "--json",
            "--no-send",
            maildir.to_str().expect("utf-8"),
        ]);
        assert_eq!(again["imported"], 1, "{again}");
        assert_eq!(again["skipped"], 6, "{again}");
        assert_eq!(all_requests(&env).len(), 7);
    }
}

#[test]
fn import_refuses_what_is_neither_mbox_nor_maildir() {
    for backend in BACKENDS {
        let env = Env::new(backend, &Site::default(), &DeskSettings::default());
        let out = env.intake(&[
            "import",
            fixture("outsider-new.eml").to_str().expect("utf-8"),
        ]);
        assert_eq!(out.status.code(), Some(65));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("neither an mbox file"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(all_requests(&env).is_empty());
    }
}

/// `intake --config FILE simulate ARGS...` in the test's directory.
fn simulate(env: &Env, config: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--config")
        .arg(config)
        .arg("simulate")
        .args(args)
        .current_dir(env.dir.path())
        .env_remove("CONFIGURATION_DIRECTORY")
        .stdin(Stdio::null())
        .output()
        .expect("run intake simulate")
}

fn simulate_json(env: &Env, config: &Path) -> Value {
    let out = simulate(env, config, &["--json"]);
    assert!(
        out.status.success(),
        "simulate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// The changes of one group: (address, before, after).
fn changes(report: &Value, group: &str) -> Vec<(String, String, String)> {
    let mut v: Vec<(String, String, String)> = report["changes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["group"] == group)
        .map(|c| {
            (
                c["address"].as_str().unwrap_or_default().to_string(),
                c["before"].as_str().unwrap_or_default().to_string(),
                c["after"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

/// A copy of the test's configuration with `from` replaced by `to`.
fn variant(env: &Env, name: &str, edits: &[(&str, &str)]) -> std::path::PathBuf {
    let mut text = std::fs::read_to_string(&env.config).expect("config");
    for (from, to) in edits {
        assert!(text.contains(from), "{from:?} not in the config");
        text = text.replacen(from, to, 1);
    }
    let path = env.path(name);
    std::fs::write(&path, text).expect("write config");
    path
}

/// Everything a simulation must leave alone, as the CLI shows it.
fn snapshot(env: &Env) -> Vec<Value> {
    vec![
        env.json(&["requests", "list", "--json", "--limit", "1000"]),
        env.json(&["accounts", "list", "--json"]),
        env.json(&["outbox", "list", "--json"]),
        env.json(&["quarantine", "list", "--json"]),
        env.json(&["audit", "olga@outside.example", "--json"]),
        env.json(&["audit", "pat@partner.example", "--json"]),
        env.json(&["audit", "ann@acme.example", "--json"]),
    ]
}

#[test]
fn simulate_shows_what_a_changed_policy_would_do_and_writes_nothing() {
    fn t(a: &str, b: &str, c: &str) -> (String, String, String) {
        (a.to_string(), b.to_string(), c.to_string())
    }
    for backend in BACKENDS {
        let env = Env::new(backend, &Site::default(), &DeskSettings::default());
        // Olga opens IT-1 and replies to it; Ann (a customer of IT through Acme) and Pat
        // write too.
        let processed = env.process(&[
            "outsider-new.eml",
            "reply-by-reporter.eml",
            "cc-colleagues.eml",
            "partner.eml",
        ]);
        assert_eq!(processed["processed"], 4, "{processed}");
        let before = snapshot(&env);

        // The policy in force, decided again: nothing changes. (The recorded facts are
        // the ones the decisions were made on.)
        let same = simulate_json(&env, &env.config);
        assert_eq!(same["decided"], 4, "{same}");
        assert_eq!(same["changed"], 0, "{same}");
        assert_eq!(same["without_facts"], 0, "{same}");
        assert_eq!(same["directory_differs"], false, "{same}");

        // IT restricted to its customers, and a directory entry that must not be synced.
        let restricted = variant(
            &env,
            "restricted.toml",
            &[
                (
                    "channel_access = \"open\"",
                    "channel_access = \"restricted\"",
                ),
                (
                    "[[directory.accounts]]\naddress = \"ann@acme.example\"",
                    "[[directory.accounts]]\naddress = \"zed@new.example\"\n\n[[directory.accounts]]\naddress = \"ann@acme.example\"",
                ),
            ],
        );
        let report = simulate_json(&env, &restricted);
        assert_eq!(report["decided"], 4, "{report}");
        assert_eq!(report["changed"], 3, "{report}");
        assert_eq!(report["unchanged"], 1, "{report}");
        assert_eq!(report["directory_differs"], true, "{report}");
        // Olga's reply is rejected too: without her first message there is neither her
        // account nor IT-1.
        assert_eq!(
            changes(&report, "requests_rejected"),
            [
                t(
                    "olga@outside.example",
                    "add_comment (reply_to_request)",
                    "reject (not_desk_customer)"
                ),
                t(
                    "olga@outside.example",
                    "create_request (new_request)",
                    "reject (not_desk_customer)"
                ),
                t(
                    "pat@partner.example",
                    "create_request (new_request)",
                    "reject (not_desk_customer)"
                ),
            ],
            "{report}"
        );
        let not_created: Vec<String> = changes(&report, "accounts_not_created")
            .into_iter()
            .map(|c| c.0)
            .collect();
        assert_eq!(
            not_created,
            ["olga@outside.example", "pat@partner.example"],
            "{report}"
        );
        assert_eq!(report["counts"]["requests_rejected"], 3, "{report}");
        assert_eq!(report["counts"]["accounts_not_created"], 2, "{report}");
        assert!(
            !report["changes"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["address"] == "ann@acme.example"),
            "Ann is a customer of IT through Acme: {report}"
        );
        // The text report names them too.
        let out = simulate(&env, &restricted, &["--since", "1d"]);
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("accounts that would not be created: 2")
                && text.contains("olga@outside.example")
                && text.contains("reject (not_desk_customer)")
                && text.contains("[directory] differs"),
            "{text}"
        );

        // Signup closed: nobody new gets in, and so neither does Olga's reply.
        let closed = variant(
            &env,
            "closed.toml",
            &[("signup = \"open\"", "signup = \"closed\"")],
        );
        let report = simulate_json(&env, &closed);
        assert_eq!(
            changes(&report, "requests_rejected"),
            [
                t(
                    "olga@outside.example",
                    "add_comment (reply_to_request)",
                    "reject (signup_closed)"
                ),
                t(
                    "olga@outside.example",
                    "create_request (new_request)",
                    "reject (signup_closed)"
                ),
                t(
                    "pat@partner.example",
                    "create_request (new_request)",
                    "reject (signup_closed)"
                ),
            ],
            "{report}"
        );
        assert_eq!(report["directory_differs"], false, "{report}");

        // Signup verify instead of open: held, not opened; pending accounts; verification
        // mail (once: the reply comes within the resend interval).
        let verify = variant(
            &env,
            "verify.toml",
            &[("signup = \"open\"", "signup = \"verify\"")],
        );
        let report = simulate_json(&env, &verify);
        assert_eq!(
            changes(&report, "requests_changed"),
            [
                t(
                    "olga@outside.example",
                    "add_comment (reply_to_request)",
                    "hold_for_verification (pending_verification)"
                ),
                t(
                    "olga@outside.example",
                    "create_request (new_request)",
                    "hold_for_verification (pending_verification)"
                ),
                t(
                    "pat@partner.example",
                    "create_request (new_request)",
                    "hold_for_verification (pending_verification)"
                ),
            ],
            "{report}"
        );
        assert_eq!(
            changes(&report, "mail_sent"),
            [
                t("olga@outside.example", "none", "verification"),
                t("pat@partner.example", "none", "verification"),
            ],
            "{report}"
        );
        assert_eq!(changes(&report, "accounts_changed").len(), 2, "{report}");

        // Only messages since --since are decided again.
        let out = simulate(&env, &restricted, &["--json", "--since", "2099-01-01"]);
        assert!(out.status.success());
        let none: Value = serde_json::from_slice(&out.stdout).expect("JSON");
        assert_eq!(none["decided"], 0, "{none}");

        // Nothing was written: not the decisions, not NEW's directory.
        assert_eq!(snapshot(&env), before);
        assert!(
            !env.account_addresses()
                .contains(&"zed@new.example".to_string())
        );
    }
}

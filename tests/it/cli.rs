//! The command line: config validation, MTA pipe delivery and its exit codes, defaults.

use std::process::{Command, Stdio};

use crate::harness::*;

#[test]
fn check_config_names_every_problem_with_key_and_file() {
    for backend in BACKENDS {
        let env = Env::new(backend, &Site::default(), &DeskSettings::default());
        let out = env.intake(&["check-config"]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("OK: "));

        let bad = env.path("bad.toml");
        std::fs::write(
            &bad,
            r#"
[customer_access]
signup = "sometimes"
approved_domains = ["corp.example", "not a domain"]
[trust]
require_authentication = false
[[desks]]
key = "IT"
addresses = ["it@desk.example"]
sharing = "everybody"
[[desks]]
key = "HR"
addresses = ["it@desk.example"]
[[mailboxes]]
name = "inbox"
kind = "maildir"
path = "x"
desk = "SALES"
[[directory.agents]]
address = "agnes@corp.example"
desks = ["IT"]
colour = "blue"
"#,
        )
        .unwrap();
        let out = Command::new(BIN)
            .arg("--config")
            .arg(&bad)
            .arg("check-config")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(78));
        let text = String::from_utf8_lossy(&out.stdout);
        let file = bad.display().to_string();
        for key in [
            "customer_access.signup",
            "customer_access.approved_domains[1]",
            "desks[0].sharing",
            "desks[1].addresses[0]",
            "mailboxes[0].desk",
            "directory.agents[0].colour",
        ] {
            assert!(
                text.lines()
                    .any(|l| l.starts_with(&format!("{file}: {key}: "))),
                "no line for {key}:\n{text}"
            );
        }
        assert!(text.contains("6 problems found"), "{text}");

        // The daemon refuses to start on it, with the same messages.
        let out = Command::new(BIN)
            .arg("--config")
            .arg(&bad)
            .arg("run")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(78));
        assert!(String::from_utf8_lossy(&out.stderr).contains("desks[0].sharing"));

        // A missing file is named too.
        let out = Command::new(BIN)
            .args(["--config", "/nonexistent/intake.toml", "check-config"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(78));
        assert!(String::from_utf8_lossy(&out.stdout).contains("/nonexistent/intake.toml"));
    }
}

#[test]
fn environment_overrides_config_keys() {
    for backend in BACKENDS {
        let env = Env::new(backend, &Site::default(), &DeskSettings::default());
        let out = Command::new(BIN)
            .arg("--config")
            .arg(&env.config)
            .args(["explain", fixture("outsider-new.eml").to_str().unwrap()])
            .current_dir(env.dir.path())
            .env("INTAKE__CUSTOMER_ACCESS__SIGNUP", "closed")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let d: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(d["reason"], "signup_closed");
    }
}

#[test]
fn deliver_exit_codes() {
    for backend in BACKENDS {
        let env = Env::new(backend, &Site::default(), &DeskSettings::default());
        let raw = std::fs::read(fixture("outsider-new.eml")).unwrap();
        let out = env.intake_with_stdin(&["deliver"], Some(&raw));
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(env.requests().len(), 1);
        // Redelivery by the MTA: accepted, nothing new.
        let out = env.intake_with_stdin(&["deliver"], Some(&raw));
        assert_eq!(out.status.code(), Some(0));
        assert!(String::from_utf8_lossy(&out.stderr).contains("duplicate_message"));
        assert_eq!(env.requests().len(), 1);
        // Garbage is accepted into quarantine, not bounced and not lost.
        let junk = std::fs::read(fixture("unparseable.eml")).unwrap();
        let out = env.intake_with_stdin(&["deliver", "--desk", "HR"], Some(&junk));
        assert_eq!(out.status.code(), Some(0));
        let q = env.json(&["quarantine", "list", "--json"]);
        let kept = q[0]["quarantine_ref"].as_str().unwrap();
        assert_eq!(std::fs::read(kept).unwrap(), junk);
    }

    // Database unavailable: 75, so the MTA keeps the message and retries.
    let env = Env::new(Backend::Sqlite, &Site::default(), &DeskSettings::default());
    let text = std::fs::read_to_string(&env.config).unwrap().replace(
        &env.database_url,
        "postgres://postgres@127.0.0.1:1/none?connect_timeout=2",
    );
    std::fs::write(&env.config, text).unwrap();
    let raw = std::fs::read(fixture("outsider-new.eml")).unwrap();
    let out = env.intake_with_stdin(&["deliver"], Some(&raw));
    assert_eq!(
        out.status.code(),
        Some(75),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // An unknown --desk is a usage problem, not a temporary one.
    let env = Env::new(Backend::Sqlite, &Site::default(), &DeskSettings::default());
    let out = env.intake_with_stdin(&["deliver", "--desk", "NOPE"], Some(&raw));
    assert_ne!(out.status.code(), Some(0));
    assert_ne!(out.status.code(), Some(75));
}

#[test]
fn explain_text_format_reads_well() {
    for backend in BACKENDS {
        let env = Env::new(backend, &Site::default(), &DeskSettings::default());
        let out = env.intake(&[
            "explain",
            fixture("helpdesk-cc-outsider.eml").to_str().unwrap(),
            "--format",
            "text",
        ]);
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("action: create_request (new_request)"),
            "{text}"
        );
        assert!(
            text.contains(
                "participant: olga@outside.example — drop (agents_may_not_add_customers)"
            )
        );
    }
}

/// `intake ... | head`: output to a reader that has gone is no panic and no error.
#[test]
fn listings_into_a_closed_pipe_end_quietly() {
    for backend in BACKENDS {
        let env = Env::new(backend, &Site::default(), &DeskSettings::default());
        env.process(&["helpdesk-cc-outsider.eml"]);
        let bad = env.path("bad.toml");
        std::fs::write(&bad, "[customer_access]\nsignup = \"sometimes\"\n").unwrap();
        let explain = fixture("helpdesk-cc-outsider.eml");
        let explain = explain.to_str().unwrap();
        for (config, args, code) in [
            (&env.config, &["requests", "list"][..], 0),
            (&env.config, &["accounts", "list"], 0),
            (&env.config, &["outbox", "list"], 0),
            (&env.config, &["explain", explain], 0),
            (&env.config, &["check-config"], 0),
            // A failure being reported stays one.
            (&bad, &["check-config"], 78),
        ] {
            let mut child = Command::new(BIN)
                .arg("--config")
                .arg(config)
                .args(args)
                .current_dir(env.dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            // Close the read end before intake writes anything: every write is EPIPE.
            drop(child.stdout.take());
            let out = child.wait_with_output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
            assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        }
    }
}

#[test]
fn embedded_defaults_run_on_a_fresh_directory() {
    let dir = tempfile::tempdir().unwrap();
    let maildir = dir.path().join("var/maildir/new");
    std::fs::create_dir_all(&maildir).unwrap();
    std::fs::copy(fixture("outsider-new.eml"), maildir.join("1.eml")).unwrap();
    // `intake process` with no --config uses the embedded defaults (SQLite under var/).
    let out = Command::new(BIN)
        .args(["process", "var/maildir", "--json"])
        .current_dir(dir.path())
        .env_remove("CONFIGURATION_DIRECTORY")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["outcomes"][0]["action"], "create_request",
        "{report}"
    );
    assert!(dir.path().join("var/intake.db").exists());
    assert_eq!(
        std::fs::read_dir(dir.path().join("var/outbox"))
            .unwrap()
            .count(),
        1
    );

    // $CONFIGURATION_DIRECTORY/intake.toml is found without --config.
    let conf = tempfile::tempdir().unwrap();
    std::fs::write(
        conf.path().join("intake.toml"),
        "[trust]\nrequire_authentication = false\n[[desks]]\nkey = \"OPS\"\naddresses = [\"ops@x.example\"]\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .env("CONFIGURATION_DIRECTORY", conf.path())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("desks: OPS"));
}

/// A 2.5 MB attachment is stored in pieces and comes back whole; the same file sent
/// again is stored once and still comes back whole from the second request.
#[test]
fn attachments_are_stored_in_pieces_and_come_back_whole() {
    for backend in BACKENDS {
        let env = Env::new(backend, &Site::default(), &DeskSettings::default());
        let file: Vec<u8> = (0..2_500_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let encoded = base64(&file);
        let wrapped: Vec<&str> = encoded
            .as_bytes()
            .chunks(76)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        let dir = env.path("mail");
        std::fs::create_dir_all(&dir).unwrap();
        for n in 1..=2 {
            let msg = format!(
                "From: <x{n}@out.example>\r\nTo: it@desk.example\r\nSubject: Logs {n}\r\n\
                 Message-ID: <att-{n}@out.example>\r\nMIME-Version: 1.0\r\n\
                 Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n\
                 --b\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n\
                 --b\r\nContent-Type: application/octet-stream\r\n\
                 Content-Disposition: attachment; filename=\"logs.bin\"\r\n\
                 Content-Transfer-Encoding: base64\r\n\r\n{}\r\n--b--\r\n",
                wrapped.join("\r\n")
            );
            std::fs::write(dir.join(format!("{n}.eml")), msg).unwrap();
        }
        let out = env.intake(&["process", "--no-send", dir.to_str().unwrap()]);
        assert!(out.status.success(), "{out:?}");
        for key in ["IT-1", "IT-2"] {
            let shown = env.request(key);
            assert_eq!(shown["attachments"][0]["size"], 2_500_000, "{shown:#}");
            let path = env.path(&format!("{key}.bin"));
            let out = env.intake(&[
                "requests",
                "attachment",
                key,
                "1",
                "--output",
                path.to_str().unwrap(),
            ]);
            assert!(out.status.success(), "{out:?}");
            assert!(
                std::fs::read(&path).unwrap() == file,
                "{key}: content differs"
            );
        }
        // To stdout as well; and a missing number is a clear error.
        let out = env.intake(&["requests", "attachment", "IT-1", "1"]);
        assert!(out.status.success() && out.stdout == file);
        let out = env.intake(&["requests", "attachment", "IT-1", "2"]);
        assert_eq!(out.status.code(), Some(69));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("IT-1 has 1 attachment(s)"),
            "{out:?}"
        );
        // A reply's attachment belongs to the comment it came with.
        let reply = env.path("reply.eml");
        std::fs::write(
            &reply,
            "From: <x1@out.example>\r\nTo: it@desk.example\r\nSubject: Re: Logs 1\r\n\
             Message-ID: <att-3@out.example>\r\nIn-Reply-To: <att-1@out.example>\r\n\
             MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n\
             --b\r\nContent-Type: text/plain\r\n\r\nMore.\r\n\
             --b\r\nContent-Type: text/plain; name=\"more.txt\"\r\n\
             Content-Disposition: attachment; filename=\"more.txt\"\r\n\r\nmore logs\r\n--b--\r\n",
        )
        .unwrap();
        let out = env.intake(&["process", "--no-send", reply.to_str().unwrap()]);
        assert!(out.status.success(), "{out:?}");
        let shown = env.request("IT-1");
        assert_eq!(shown["comments"], 1, "{shown:#}");
        assert!(shown["attachments"][0]["comment"].is_null(), "{shown:#}");
        assert_eq!(shown["attachments"][1]["filename"], "more.txt", "{shown:#}");
        assert_eq!(shown["attachments"][1]["comment"], 1, "{shown:#}");
    }
}

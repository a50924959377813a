//! Hostile or broken input and broken surroundings: nothing lost, nothing blocked.

use std::time::Duration;

use crate::harness::*;

fn write(env: &Env, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = env.path(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn nul_bytes_and_huge_message_ids_work_on_both_backends() {
    for backend in BACKENDS {
        let env = Env::new(backend, &Site::default(), &DeskSettings::default());
        let long_id = "a".repeat(3000);
        let nul = write(
            &env,
            "nul.eml",
            b"From: Olga <olga@outside.example>\r\nTo: it@desk.example\r\nSubject: nul\r\n\
              Message-ID: <nul-1@outside.example>\r\nContent-Type: text/plain\r\n\
              Content-Transfer-Encoding: base64\r\n\r\naGkAdGhlcmU=\r\n",
        );
        let long = write(
            &env,
            "long.eml",
            format!(
                "From: Olga <olga@outside.example>\r\nTo: it@desk.example\r\nSubject: long id\r\n\
                 Message-ID: <{long_id}@outside.example>\r\n\r\nbody\r\n"
            )
            .as_bytes(),
        );
        let reply = write(
            &env,
            "reply.eml",
            format!(
                "From: Olga <olga@outside.example>\r\nTo: it@desk.example\r\nSubject: Re: long id\r\n\
                 Message-ID: <reply-1@outside.example>\r\nIn-Reply-To: <{long_id}@outside.example>\r\n\r\nmore\r\n"
            )
            .as_bytes(),
        );
        let report = env.json(&[
            "process",
            "--json",
            nul.to_str().unwrap(),
            long.to_str().unwrap(),
            reply.to_str().unwrap(),
        ]);
        let outcomes: Vec<(String, String)> = report["outcomes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| {
                (
                    o["action"].as_str().unwrap().into(),
                    o["reason"].as_str().unwrap().into(),
                )
            })
            .collect();
        assert!(
            outcomes.contains(&("create_request".into(), "new_request".into()))
                && outcomes.contains(&("add_comment".into(), "reply_to_request".into())),
            "{backend:?}: {report}"
        );
        assert!(
            !outcomes.iter().any(|(a, _)| a == "quarantine"),
            "{backend:?}: {report}"
        );
        let first = env.request("IT-1");
        assert_eq!(first["description"].as_str().unwrap().trim(), "hithere");
        // Processing it again is a duplicate, also with the hashed Message-ID.
        let again = env.json(&["process", "--json", long.to_str().unwrap()]);
        assert_eq!(again["outcomes"][0]["reason"], "duplicate_message");
    }
}

#[test]
fn thousands_of_recipients_are_bounded() {
    for backend in BACKENDS {
        let env = Env::new(backend, &Site::default(), &DeskSettings::sharing_any());
        let mut raw = String::from(
            "From: Olga <olga@outside.example>\r\nTo: it@desk.example\r\nSubject: spam\r\nMessage-ID: <many@x.example>\r\nCc: ",
        );
        for i in 0..20_000 {
            raw.push_str(&format!("p{i}@outside.example, "));
        }
        raw.push_str("last@outside.example\r\n\r\nbody\r\n");
        let path = write(&env, "many.eml", raw.as_bytes());
        let d = env.json(&["explain", path.to_str().unwrap()]);
        assert!(
            d["omitted_recipients"].as_u64().unwrap() > 18_000,
            "{}",
            d["omitted_recipients"]
        );
        let parts = d["participants"].as_array().unwrap();
        assert!(parts.len() <= 1001);
        let created = parts
            .iter()
            .filter(|p| p["outcome"] == "create_portal_only")
            .count();
        assert_eq!(
            created, 50,
            "hygiene.max_participants caps who is considered"
        );
        let report = env.json(&["process", "--json", path.to_str().unwrap()]);
        assert_eq!(report["outcomes"][0]["action"], "create_request");
    }
}

#[test]
fn deliver_streams_an_oversized_message_to_quarantine() {
    for backend in BACKENDS {
        let env = Env::with_extra(
            backend,
            &Site::default(),
            &DeskSettings::default(),
            "[limits]\nmax_message_size = 100000\n",
        );
        let mut big = std::fs::read(fixture("outsider-new.eml")).unwrap();
        for i in 0..20_000 {
            big.extend_from_slice(format!("line {i} of a very long message\n").as_bytes());
        }
        let out = env.intake_with_stdin(&["deliver"], Some(&big));
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let q = env.json(&["quarantine", "list", "--json"]);
        assert_eq!(q[0]["reason"], "oversized", "{q:#}");
        assert_eq!(q[0]["sender"], "olga@outside.example");
        let kept = std::fs::read(q[0]["quarantine_ref"].as_str().unwrap()).unwrap();
        assert_eq!(kept, big, "the whole message is kept");

        // The same from a file given to `intake process`: the ledger names the copy kept.
        let file = env.path("big.eml");
        let mut other = big.clone();
        other.extend_from_slice(b"one more line\n");
        std::fs::write(&file, &other).unwrap();
        env.json(&["process", "--json", "--no-send", file.to_str().unwrap()]);
        let q = env.json(&["quarantine", "list", "--json"]);
        let rows = q.as_array().unwrap();
        assert_eq!(rows.len(), 2, "{q:#}");
        for row in rows {
            let kept = std::fs::read(row["quarantine_ref"].as_str().unwrap()).unwrap();
            assert!(kept == big || kept == other, "{row:#}");
        }
    }
}

#[test]
fn a_file_that_cannot_be_acknowledged_blocks_nothing() {
    for backend in BACKENDS {
        let env = Env::new(backend, &Site::default(), &DeskSettings::default());
        let maildir = env.path("maildir");
        for d in ["new", "cur", "tmp"] {
            std::fs::create_dir_all(maildir.join(d)).unwrap();
        }
        std::fs::copy(fixture("outsider-new.eml"), maildir.join("new/1.eml")).unwrap();
        std::fs::copy(fixture("cc-colleagues.eml"), maildir.join("new/2.eml")).unwrap();
        // Moving 1.eml to cur/ will fail: a non-empty directory sits where it would go.
        std::fs::create_dir_all(maildir.join("cur/1.eml:2,S/x")).unwrap();
        let daemon = start_daemon(&env);
        daemon.wait_for("the second message", Duration::from_secs(20), || {
            maildir.join("cur/2.eml:2,S").exists()
        });
        std::thread::sleep(Duration::from_secs(1));
        let started = std::time::Instant::now();
        let log = daemon.stop();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "shutdown was slow"
        );
        let warnings = log.matches("cannot acknowledge message").count();
        assert!(
            (1..=2).contains(&warnings),
            "{warnings} warnings: the loop spun\n{log}"
        );
        assert_eq!(env.requests().len(), 2);
    }
}

//! Two `intake process` runs at once on the same database: request numbers stay unique
//! and gap-free, nothing is processed twice.

use std::process::{Command, Stdio};

use crate::harness::*;

fn write_messages(dir: &std::path::Path, prefix: &str, count: usize) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..count {
        let text = format!(
            "From: Sender {i} <s{i}.{prefix}@outside.example>\nTo: it@desk.example\n\
             Cc: cc{i}.{prefix}@outside.example\nSubject: {prefix} number {i}\n\
             Message-ID: <{prefix}-{i}@outside.example>\n\nHello {i}\n"
        );
        std::fs::write(dir.join(format!("{prefix}-{i:04}.eml")), text).unwrap();
    }
}

#[test]
fn concurrent_processes_share_one_database() {
    for backend in BACKENDS {
        let env = Env::new(
            backend,
            &Site::default(),
            &DeskSettings {
                sharing: "any",
                unknown: "create",
                ..DeskSettings::default()
            },
        );
        let a = env.path("a");
        let b = env.path("b");
        write_messages(&a, "a", 300);
        write_messages(&b, "b", 300);
        // Both runs also see an overlap of 100 messages: processed once in total.
        for i in 0..100 {
            let name = format!("a-{i:04}.eml");
            std::fs::copy(a.join(&name), b.join(format!("overlap-{name}"))).unwrap();
        }
        let run = |dir: &std::path::Path| {
            Command::new(BIN)
                .arg("--config")
                .arg(&env.config)
                .args(["process", "--json", "--no-send"])
                .arg(dir)
                .current_dir(env.dir.path())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        };
        let (pa, pb) = (run(&a), run(&b));
        for p in [pa, pb] {
            let out = p.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{backend:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let requests = env.json(&["requests", "list", "--json", "--limit", "1000"]);
        let mut numbers: Vec<u64> = requests
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r["key"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches("IT-")
                    .parse()
                    .unwrap()
            })
            .collect();
        numbers.sort();
        assert_eq!(numbers, (1..=600).collect::<Vec<u64>>(), "{backend:?}");
        // Every Cc got exactly one account (600 senders + 600 Cc's + the directory's 5).
        let accounts = env.json(&["accounts", "list", "--json", "--limit", "5000"]);
        assert_eq!(accounts.as_array().unwrap().len(), 1205, "{backend:?}");
    }
}

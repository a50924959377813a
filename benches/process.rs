//! End to end: `intake process` of generated messages into SQLite with durable commits
//! (WAL, synchronous=FULL), through the real release binary.
//!
//! `cargo bench --bench process` (10,000 messages), or
//! `cargo bench --bench process -- 100000` for another count. Set
//! `INTAKE_BENCH_DATABASE_URL=postgres://...` to measure PostgreSQL instead (the database
//! must be empty). Prints messages per second and the outcome mix.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_intake");

/// A deterministic mix: new requests from external and internal senders with Cc's,
/// replies to earlier requests, auto-replies and bulk mail, some attachments.
fn generate(dir: &Path, count: usize) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut rng: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let body = "Hello,\n\nthe VPN drops every few minutes since this morning. I restarted the \
                laptop twice and it did not help. Could you have a look?\n\nThanks\n"
        .repeat(3);
    for i in 0..count {
        let kind = next() % 100;
        let sender_n = next() % 2000;
        let (from, extra) = if kind < 12 {
            (
                format!("Staff {sender_n} <staff{sender_n}@example.com>"),
                "Authentication-Results: mx.example.com; dmarc=pass header.from=example.com\n"
                    .to_string(),
            )
        } else {
            (
                format!(
                    "Customer {sender_n} <c{sender_n}@cust{}.example>",
                    sender_n % 50
                ),
                String::new(),
            )
        };
        let mut headers = format!(
            "Return-Path: <bounce@mail.example>\nReceived: from mx (mx [192.0.2.1]) by mx.example.com with ESMTPS id {i}; Mon, 23 Nov 2026 10:00:00 +0000\n{extra}From: {from}\nTo: Support <support@example.com>\nMessage-ID: <gen-{i}@mail.example>\nDate: Mon, 23 Nov 2026 10:00:00 +0000\n"
        );
        let mut subject = format!("Problem number {i}");
        if (12..22).contains(&kind) && i > 10 {
            let parent = next() as usize % i;
            headers.push_str(&format!(
                "In-Reply-To: <gen-{parent}@mail.example>\nReferences: <gen-{parent}@mail.example>\n"
            ));
            subject = format!("Re: Problem number {parent}");
        } else if (22..27).contains(&kind) {
            headers.push_str("Auto-Submitted: auto-replied\n");
            subject = format!("Out of office: {subject}");
        } else if (27..30).contains(&kind) {
            headers.push_str("Precedence: bulk\n");
        }
        let ccs = next() % 4;
        if ccs > 0 {
            let list: Vec<String> = (0..ccs)
                .map(|k| format!("cc{}@cust{}.example", next() % 3000, (sender_n + k) % 50))
                .collect();
            headers.push_str(&format!("Cc: {}\n", list.join(", ")));
        }
        headers.push_str(&format!("Subject: {subject}\n"));
        let message = if next() % 20 == 0 {
            format!(
                "{headers}MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=b{i}\n\n--b{i}\nContent-Type: text/plain\n\n{body}\n--b{i}\nContent-Type: application/octet-stream; name=log{i}.txt\nContent-Transfer-Encoding: base64\n\n{}\n--b{i}--\n",
                "bG9nIGxpbmUgZm9yIHRoZSBiZW5jaG1hcmsK".repeat(40)
            )
        } else {
            format!("{headers}\n{body}")
        };
        let mut f = std::fs::File::create(dir.join(format!("{i:07}.eml")))?;
        f.write_all(message.as_bytes())?;
    }
    Ok(())
}

fn main() {
    let count: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(10_000);
    let work = tempfile::tempdir().expect("temp dir");
    let mail = work.path().join("mail");
    generate(&mail, count).expect("generate messages");
    let database = std::env::var("INTAKE_BENCH_DATABASE_URL")
        .unwrap_or_else(|_| format!("sqlite://{}/intake.db", work.path().display()));
    let config = work.path().join("intake.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[database]
url = "{database}"
[customer_access]
approved_domains = ["example.com"]
signup = "open"
[trust]
authserv_ids = ["mx.example.com"]
[hygiene]
max_requests_per_sender_per_hour = 0
[[desks]]
key = "HELP"
addresses = ["support@example.com"]
sharing = "any"
unknown_participants = "create"
[outbox]
dir = "{dir}/outbox"
[quarantine]
dir = "{dir}/quarantine"
"#,
            dir = work.path().display()
        ),
    )
    .expect("write config");

    let started = Instant::now();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .args(["process", "--json", "--no-send"])
        .arg(&mail)
        .current_dir(work.path())
        .output()
        .expect("run intake process");
    let wall = started.elapsed();
    assert!(
        out.status.success(),
        "intake process failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json report");
    let processed = report["processed"].as_u64().unwrap_or(0);
    let seconds = report["seconds"].as_f64().unwrap_or(f64::NAN);
    assert_eq!(processed as usize, count, "{report}");
    println!(
        "intake process: {processed} messages into {} in {seconds:.2}s = {:.0} msg/s \
         (wall clock including start-up and migration: {:.2}s)",
        if database.starts_with("sqlite") {
            "SQLite (WAL, synchronous=FULL)"
        } else {
            "PostgreSQL"
        },
        processed as f64 / seconds,
        wall.as_secs_f64()
    );
    if let Some(outcomes) = report["outcomes"].as_array() {
        for o in outcomes {
            println!(
                "  {:<16} {:<28} {}",
                o["action"].as_str().unwrap_or(""),
                o["reason"].as_str().unwrap_or(""),
                o["count"]
            );
        }
    }
}

//! IMAP end to end against a real Dovecot (not a timed test; figures for the notes).
//!
//! `cargo bench --bench imap -- [N] [--postgres] [--big] [--mailboxes M] [--instances K]
//! [--desk-per-mailbox] [--attach KB] [--no-latency]`:
//! 1. backlog: N messages (default 10,000; with `--attach KB` each with an attachment
//!    of that size) appended, spread over M folders (default 1), plus with `--big` one
//!    25 MB message; then the raw rate of `UID FETCH 1:* BODY.PEEK[]` of every folder
//!    (the ceiling); then K `intake run` instances
//!    (default 1) until every message is in the ledger — messages per second end to
//!    end, and the largest peak RSS of any instance;
//! 2. latency under IDLE (unless `--no-latency`): 200 single APPENDs, each timed
//!    until its ledger row exists (p50, p90, p99, max).
//!
//! Dovecot stores the mail as a Maildir; `INTAKE_DOVECOT_FORMAT=mdbox` for backlogs of
//! 100,000 (appending to a Maildir slows down as it grows: 35,000 in 9 minutes).
//!
//! The database is SQLite in a temp dir, or with `--postgres` a throwaway PostgreSQL
//! cluster with its default, durable settings (fsync on), started like the tests do;
//! `INTAKE_BENCH_DATABASE_URL=postgres://...` uses an existing empty database instead.
//! `INTAKE_BENCH_LOG=PATH` keeps each instance's log in `PATH.K` (else in the temp dir).
//! `INTAKE_BENCH_LOG_LEVEL` sets their `INTAKE_LOG` (default `warn`); `INTAKE_BENCH_WRAP`
//! runs them under a profiler (see `wrapped`).

#[path = "../tests/it/dovecot.rs"]
mod dovecot;
#[allow(dead_code, unused_imports)]
#[path = "../tests/it/harness.rs"]
mod harness;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dovecot::{Dovecot, PASSWORD, USER};

const BIN: &str = env!("CARGO_BIN_EXE_intake");

/// With `--attach KB`: each message carries an attachment of that many KB (base64).
static ATTACH_KB: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn message(i: usize) -> Vec<u8> {
    let text = "Hello,\r\n\r\nthe VPN drops every few minutes since this morning. I restarted the \
                laptop twice and it did not help. Could you have a look?\r\n\r\nThanks\r\n"
        .repeat(3);
    let attach = ATTACH_KB.load(std::sync::atomic::Ordering::Relaxed);
    let (content_type, body) = if attach == 0 {
        (String::new(), text)
    } else {
        let mut body = format!(
            "--b\r\nContent-Type: text/plain\r\n\r\n{text}--b\r\n\
             Content-Type: application/octet-stream; name=\"log.bin\"\r\n\
             Content-Transfer-Encoding: base64\r\n\r\n"
        );
        base64_noise(&mut body, attach * 1024, i as u32 + 1);
        body.push_str("--b--\r\n");
        (
            "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n".to_string(),
            body,
        )
    };
    format!(
        "From: Customer {i} <c{}@cust{}.example>\r\nTo: support@desk.example\r\n\
         Cc: cc{i}@cust{}.example\r\nSubject: Problem {i}\r\nMessage-ID: <bench-{i}@mail.example>\r\n\
         Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n{content_type}\r\n{body}",
        i % 2000,
        i % 50,
        i % 50
    )
    .into_bytes()
}

/// Appends about `bytes` of base64 lines (76 characters) of xorshift noise.
fn base64_noise(out: &mut String, bytes: usize, seed: u32) {
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut x: u32 = 2463534242 ^ seed;
    let end = out.len() + bytes;
    while out.len() < end {
        for _ in 0..76 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            out.push(alphabet[(x % 64) as usize] as char);
        }
        out.push_str("\r\n");
    }
}

/// Appends with pipelining (a window of APPENDs in flight): fast enough for big backlogs.
fn append_many(port: u16, folder: &str, count: usize, from: usize) {
    append_with(port, folder, count, from, message)
}

/// A message with a 25 MB attachment (base64), from a customer, in the backlog.
fn big_message(i: usize) -> Vec<u8> {
    let mut out = format!(
        "From: Big Sender <big@cust1.example>\r\nTo: support@desk.example\r\n\
         Subject: Logs attached {i}\r\nMessage-ID: <bench-big-{i}@mail.example>\r\n\
         MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n\
         --b\r\nContent-Type: text/plain\r\n\r\nThe logs are attached.\r\n\
         --b\r\nContent-Type: application/octet-stream; name=\"logs.bin\"\r\n\
         Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=\"logs.bin\"\r\n\r\n"
    )
    .into_bytes();
    let mut noise = String::new();
    base64_noise(&mut noise, 25 * 1024 * 1024 - out.len(), 0);
    out.extend_from_slice(noise.as_bytes());
    out.extend_from_slice(b"--b--\r\n");
    out
}

fn append_with(port: u16, folder: &str, count: usize, from: usize, make: fn(usize) -> Vec<u8>) {
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let mut writer = stream.try_clone().expect("clone");
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).expect("greeting");
    write!(writer, "a LOGIN {USER} \"{PASSWORD}\"\r\n").expect("login");
    loop {
        line.clear();
        reader.read_line(&mut line).expect("login reply");
        if line.starts_with("a ") {
            assert!(line.starts_with("a OK"), "{line}");
            break;
        }
    }
    let mut outstanding = 0usize;
    let mut i = 0usize;
    while i < count || outstanding > 0 {
        while i < count && outstanding < 64 {
            let m = make(from + i);
            write!(writer, "x{i} APPEND {folder} {{{}+}}\r\n", m.len()).expect("append");
            writer.write_all(&m).expect("append body");
            writer.write_all(b"\r\n").expect("append end");
            outstanding += 1;
            i += 1;
        }
        line.clear();
        reader.read_line(&mut line).expect("append reply");
        if line.starts_with('x') {
            assert!(line.contains(" OK "), "{line}");
            outstanding -= 1;
        }
    }
}

/// One `UID FETCH 1:* (UID BODY.PEEK[])` of the whole folder; returns (messages, bytes).
fn raw_fetch(port: u16, folder: &str) -> (usize, usize) {
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let mut writer = stream.try_clone().expect("clone");
    let mut reader = BufReader::with_capacity(1 << 20, stream);
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line).expect("greeting");
    write!(
        writer,
        "a LOGIN {USER} \"{PASSWORD}\"\r\nb SELECT {folder}\r\nc UID FETCH 1:* (UID BODY.PEEK[])\r\n"
    )
    .expect("write");
    let (mut messages, mut bytes) = (0usize, 0usize);
    loop {
        line.clear();
        reader.read_until(b'\n', &mut line).expect("read");
        let text = String::from_utf8_lossy(&line);
        if text.starts_with("c ") {
            assert!(text.starts_with("c OK"), "{text}");
            return (messages, bytes);
        }
        if let Some(open) = text
            .trim_end()
            .strip_suffix('}')
            .and_then(|t| t.rfind('{').map(|i| t[i + 1..].to_string()))
        {
            let n: usize = open.parse().expect("literal size");
            let mut buf = vec![0u8; n];
            reader.read_exact(&mut buf).expect("literal");
            messages += 1;
            bytes += n;
        }
    }
}

/// Messages with an outcome in the ledger, read directly from the database.
struct Ledger {
    store: intake::store::Store,
    rt: tokio::runtime::Runtime,
}

impl Ledger {
    fn open(config: &std::path::Path) -> Ledger {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let config =
            intake::config::Config::load(&intake::config::ConfigSource::File(config.to_path_buf()))
                .expect("config");
        let store = rt
            .block_on(intake::store::Store::open(&config.database))
            .expect("database");
        Ledger { store, rt }
    }

    fn count(&self) -> i64 {
        self.rt
            .block_on(self.store.ledger_counts())
            .map(|rows| {
                rows.iter()
                    .filter(|(action, _, _)| action != "pending")
                    .map(|(_, _, n)| n)
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Outgoing mail: (queued in all, sent).
    fn outbox(&self) -> (i64, i64) {
        self.rt
            .block_on(
                sqlx::query_as::<_, (i64, i64)>(
                    "SELECT COUNT(*), COUNT(*) FILTER (WHERE status = 'sent') FROM outbox",
                )
                .fetch_one(self.store.pool()),
            )
            .unwrap_or((0, 0))
    }
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU seconds (user + system) the process has used so far, from /proc/PID/stat.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces):
    // utime and stime are the 12th and 13th of them, in clock ticks (100 per second).
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let ticks: Vec<f64> = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|t| t.parse().ok())
        .collect();
    ticks.iter().sum::<f64>() / 100.0
}

/// Dovecot's own IDLE delay: APPEND on one connection, time until another connection in
/// IDLE sees `EXISTS`. This is the floor under intake's latency.
fn raw_idle_latency(port: u16, samples: usize, from: usize) -> Vec<Duration> {
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let mut writer = stream.try_clone().expect("clone");
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).expect("greeting");
    write!(
        writer,
        "a LOGIN {USER} \"{PASSWORD}\"\r\nb SELECT INBOX\r\nc IDLE\r\n"
    )
    .expect("idle");
    loop {
        line.clear();
        reader.read_line(&mut line).expect("read");
        if line.starts_with('+') {
            break;
        }
    }
    let mut appender = dovecot::ImapClient::connect(port);
    let mut out = Vec::with_capacity(samples);
    for k in 0..samples {
        let t = Instant::now();
        appender.append("INBOX", &message(from + k));
        loop {
            line.clear();
            reader.read_line(&mut line).expect("read");
            if line.contains("EXISTS") {
                break;
            }
        }
        out.push(t.elapsed());
    }
    write!(writer, "DONE\r\n").expect("done");
    out
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

struct Opts {
    count: usize,
    postgres: bool,
    /// Each mailbox feeds its own desk (else all feed desk IT).
    desk_per_mailbox: bool,
    big: bool,
    mailboxes: usize,
    instances: usize,
    latency: bool,
    /// KB of attachment in every message (0: a short text message).
    attach_kb: usize,
}

fn options() -> Opts {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
    };
    Opts {
        // The first number that is not a flag's value.
        count: args
            .iter()
            .enumerate()
            .filter(|(i, _)| {
                *i == 0
                    || !matches!(
                        args[i - 1].as_str(),
                        "--mailboxes" | "--instances" | "--attach"
                    )
            })
            .find_map(|(_, a)| a.parse().ok())
            .unwrap_or(10_000),
        postgres: args.iter().any(|a| a == "--postgres"),
        big: args.iter().any(|a| a == "--big"),
        mailboxes: value("--mailboxes").unwrap_or(1).max(1),
        instances: value("--instances").unwrap_or(1).max(1),
        latency: !args.iter().any(|a| a == "--no-latency"),
        desk_per_mailbox: args.iter().any(|a| a == "--desk-per-mailbox"),
        attach_kb: value("--attach").unwrap_or(0),
    }
}

/// `intake ARGS`, or with `INTAKE_BENCH_WRAP="perf record -g -o F --"` run under that
/// command (for profiles; the CPU and RSS figures are then the wrapper's).
fn wrapped(args: &[&str]) -> Command {
    let wrap = std::env::var("INTAKE_BENCH_WRAP").unwrap_or_default();
    let mut words = wrap.split_whitespace();
    let mut cmd = match words.next() {
        Some(first) => {
            let mut c = Command::new(first);
            c.args(words).arg(BIN);
            c
        }
        None => Command::new(BIN),
    };
    cmd.args(args);
    cmd
}

fn folder_name(i: usize) -> String {
    if i == 0 {
        "INBOX".into()
    } else {
        format!("Box{i}")
    }
}

/// The desk mailbox `m` feeds: IT, or with a desk per mailbox IT, D1, D2, ...
fn desk_name(per_mailbox: bool, m: usize) -> String {
    if per_mailbox && m > 0 {
        format!("D{m}")
    } else {
        "IT".to_string()
    }
}

fn main() {
    let opts = options();
    ATTACH_KB.store(opts.attach_kb, std::sync::atomic::Ordering::Relaxed);
    let count = opts.count;
    let dovecot = Dovecot::start();
    let work = tempfile::tempdir().expect("temp dir");
    let mut admin = dovecot.client();
    for m in 1..opts.mailboxes {
        admin.command(&format!("CREATE {}", folder_name(m)));
    }
    let started = Instant::now();
    let per = count / opts.mailboxes;
    for m in 0..opts.mailboxes {
        let n = if m + 1 == opts.mailboxes {
            count - per * m
        } else {
            per
        };
        append_many(dovecot.port, &folder_name(m), n, m * per);
        if m == 0 && opts.big {
            append_with(dovecot.port, "INBOX", 1, 0, big_message);
        }
    }
    let total = count + usize::from(opts.big);
    println!(
        "appended {total} messages ({} folders{}) in {:.1}s",
        opts.mailboxes,
        if opts.big { ", one of 25 MB" } else { "" },
        started.elapsed().as_secs_f64()
    );

    let started = Instant::now();
    let (mut n, mut bytes) = (0, 0);
    for m in 0..opts.mailboxes {
        let (a, b) = raw_fetch(dovecot.port, &folder_name(m));
        n += a;
        bytes += b;
    }
    let raw = started.elapsed();
    assert_eq!(n, total);
    println!(
        "raw UID FETCH 1:* BODY.PEEK[]: {n} messages, {:.1} MB in {:.2}s = {:.0} msg/s",
        bytes as f64 / 1e6,
        raw.as_secs_f64(),
        n as f64 / raw.as_secs_f64()
    );

    let database = match std::env::var("INTAKE_BENCH_DATABASE_URL") {
        Ok(url) => url,
        Err(_) if opts.postgres => {
            // SAFETY: set before any thread that reads the environment is started.
            unsafe { std::env::set_var("INTAKE_PG_DURABLE", "1") };
            harness::postgres_database()
        }
        Err(_) => format!("sqlite://{}/intake.db", work.path().display()),
    };
    let backend = if database.starts_with("postgres") {
        "PostgreSQL"
    } else {
        "SQLite"
    };
    let mailboxes: String = (0..opts.mailboxes)
        .map(|m| {
            dovecot
                .mailbox_toml("poll_interval = \"1h\"")
                .replace("name = \"support\"", &format!("name = \"mb{m}\""))
                .replace(
                    "folder = \"INBOX\"",
                    &format!("folder = \"{}\"", folder_name(m)),
                )
                .replace(
                    "desk = \"IT\"",
                    &format!("desk = \"{}\"", desk_name(opts.desk_per_mailbox, m)),
                )
        })
        .collect();
    // Further desks, one per mailbox after the first, with `--desk-per-mailbox`.
    let desks: String = (1..opts.mailboxes)
        .filter(|_| opts.desk_per_mailbox)
        .map(|m| {
            format!(
                "[[desks]]\nkey = \"{}\"\naddresses = [\"support{m}@desk.example\"]\n\
                 sharing = \"any\"\nunknown_participants = \"create\"\n",
                desk_name(true, m)
            )
        })
        .collect();
    let config = work.path().join("intake.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[database]
url = "{database}"
[limits]
max_message_size = 67108864
[customer_access]
approved_domains = ["desk.example"]
signup = "open"
[trust]
require_authentication = false
[hygiene]
max_requests_per_sender_per_hour = 0
[[desks]]
key = "IT"
addresses = ["support@desk.example"]
sharing = "any"
unknown_participants = "create"
{desks}
{mailboxes}
[outbox]
dir = "{dir}/outbox"
poll_interval = "1h"
"#,
            dir = work.path().display()
        ),
    )
    .expect("config");
    let config_arg = config.display().to_string();
    let started = Instant::now();
    let mut children = Vec::new();
    for k in 0..opts.instances {
        let log = std::fs::File::create(
            std::env::var("INTAKE_BENCH_LOG")
                .map(|l| std::path::PathBuf::from(format!("{l}.{k}")))
                .unwrap_or_else(|_| work.path().join(format!("intake-{k}.log"))),
        )
        .expect("log");
        children.push(
            wrapped(&["--config", &config_arg, "run"])
                .current_dir(work.path())
                .env(
                    "INTAKE_LOG",
                    std::env::var("INTAKE_BENCH_LOG_LEVEL").unwrap_or_else(|_| "warn".into()),
                )
                .env("INTAKE__HTTP__LISTEN", "127.0.0.1:0")
                .stdout(Stdio::null())
                .stderr(Stdio::from(log))
                .spawn()
                .expect("intake run"),
        );
    }
    let pids: Vec<u32> = children.iter().map(|c| c.id()).collect();
    let ledger = Ledger::open(&config);
    let mut done = 0;
    while done < total as i64 {
        std::thread::sleep(Duration::from_millis(100));
        done = ledger.count();
        assert!(
            started.elapsed() < Duration::from_secs(3600),
            "backlog not done after an hour ({done})"
        );
    }
    let e2e = started.elapsed();
    let (queued, sent) = ledger.outbox();
    let rss = pids.iter().map(|p| peak_rss_kib(*p)).max().unwrap_or(0);
    let cpu: f64 = pids.iter().map(|p| cpu_secs(*p)).sum();
    println!(
        "intake run ×{} on {backend}: {total} messages in {:.2}s = {:.0} msg/s end to end ({:.0}% of the raw fetch rate), largest peak RSS {} MiB, intake CPU {cpu:.2}s ({:.0} µs per message)",
        opts.instances,
        e2e.as_secs_f64(),
        total as f64 / e2e.as_secs_f64(),
        100.0 * (total as f64 / e2e.as_secs_f64()) / (n as f64 / raw.as_secs_f64()),
        rss / 1024,
        cpu * 1e6 / total as f64
    );
    println!(
        "outgoing mail sent while the backlog went in: {sent} of {queued} queued (file transport)"
    );

    if opts.latency {
        // Latency under IDLE: one message at a time.
        let mut latencies = Vec::with_capacity(200);
        let mut client = dovecot.client();
        for k in 0..200 {
            let before = ledger.count();
            let t = Instant::now();
            client.append("INBOX", &message(count + k));
            loop {
                if ledger.count() > before {
                    break;
                }
                std::thread::sleep(Duration::from_micros(500));
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "message {k} never arrived"
                );
            }
            latencies.push(t.elapsed());
        }
        latencies.sort();
        println!(
            "IDLE latency, APPEND to committed request over 200 messages (database polled every 0.5 ms): p50 {:?}, p90 {:?}, p99 {:?}, max {:?}",
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.9),
            percentile(&latencies, 0.99),
            latencies[latencies.len() - 1]
        );
    }
    for (pid, mut child) in pids.iter().zip(children) {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let _ = child.wait();
    }
    if opts.latency {
        let mut raw_idle = raw_idle_latency(dovecot.port, 50, count + 1000);
        raw_idle.sort();
        println!(
            "Dovecot alone, APPEND to EXISTS in another session's IDLE, 50 messages: p50 {:?}, p99 {:?}",
            percentile(&raw_idle, 0.5),
            percentile(&raw_idle, 0.99)
        );
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average: {}", load.trim());
}

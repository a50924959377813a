//! The bounce parser (`intake::message::bounce::detect`) against the real-world corpus in
//! `shared/corpus` (see its README.md): sisimai's ground truth, false positives on normal
//! mail, and robustness on every message.
//!
//! The corpus is not part of the repository. It is found at `$INTAKE_CORPUS` if set, else
//! at `$CARGO_MANIFEST_DIR/../shared/corpus`, else at `/work/shared/corpus`; when none
//! exists the tests fail (they never skip).
//!
//! `BOUNCE_DUMP=1 cargo test --test bounces -- --nocapture` prints what was read from
//! every sisimai sample.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use intake::message::bounce::{Bounce, detect};

// ---------------------------------------------------------------------------------------
// Locating and reading the corpus
// ---------------------------------------------------------------------------------------

fn corpus_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        if let Some(dir) = std::env::var_os("INTAKE_CORPUS") {
            let dir = PathBuf::from(dir);
            assert!(
                dir.join("INDEX.tsv").is_file(),
                "INTAKE_CORPUS is set to {} but that directory has no INDEX.tsv; \
                 point it at the email corpus (the folder holding INDEX.tsv and README.md)",
                dir.display()
            );
            return dir;
        }
        let candidates = [
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/corpus"),
            PathBuf::from("/work/shared/corpus"),
        ];
        for dir in &candidates {
            if dir.join("INDEX.tsv").is_file() {
                return dir.clone();
            }
        }
        panic!(
            "email corpus not found: set INTAKE_CORPUS, or put it at {} or {} \
             (a folder holding INDEX.tsv); these tests do not skip without it",
            candidates[0].display(),
            candidates[1].display()
        );
    })
}

const SISIMAI: &str = "sisimai-set-of-emails";

fn read(rel: &str) -> Vec<u8> {
    let path = corpus_root().join(rel);
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn read_text(rel: &str) -> String {
    String::from_utf8(read(rel)).unwrap_or_else(|e| panic!("{rel} is not UTF-8: {e}"))
}

/// Runs `detect` and turns a panic into a test failure naming the file.
fn detect_file(rel: &str, raw: &[u8]) -> Option<Bounce> {
    catch_unwind(AssertUnwindSafe(|| detect(raw)))
        .unwrap_or_else(|_| panic!("detect panicked on {rel}"))
}

/// Path relative to the corpus root, with `/` separators.
fn rel(path: &Path) -> String {
    path.strip_prefix(corpus_root())
        .unwrap_or(path)
        .components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read corpus folder {}: {e}", dir.display()));
    for entry in entries {
        let path = entry
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
            .path();
        if path.is_dir() {
            walk(&path, out);
        } else if path.is_file() {
            out.push(path);
        }
    }
}

/// Every message file in the corpus (metadata and ground-truth files left out), sorted.
fn message_files() -> Vec<String> {
    let mut all = Vec::new();
    walk(corpus_root(), &mut all);
    let mut out: Vec<String> = all
        .iter()
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
            !matches!(name, "MANIFEST.tsv" | "INDEX.tsv" | "README.md")
                && !matches!(ext.to_ascii_lowercase().as_str(), "json" | "xml" | "tsv")
        })
        .map(|p| rel(p))
        .collect();
    out.sort();
    assert!(
        out.len() > 1000,
        "corpus at {} looks incomplete: {} message files",
        corpus_root().display(),
        out.len()
    );
    out
}

/// INDEX.tsv: path → category.
fn index_categories() -> BTreeMap<String, String> {
    let text = read_text("INDEX.tsv");
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .expect("INDEX.tsv is empty")
        .split('\t')
        .collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .unwrap_or_else(|| panic!("INDEX.tsv has no {name:?} column: {header:?}"))
    };
    let (path_col, category_col) = (col("path"), col("category"));
    let map: BTreeMap<String, String> = lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (
                f.get(path_col).unwrap_or(&"").to_string(),
                f.get(category_col).unwrap_or(&"").to_string(),
            )
        })
        .collect();
    assert!(map.len() > 1000, "INDEX.tsv has only {} rows", map.len());
    map
}

/// One row of EXPECTED-go-sisimai.tsv.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Expected {
    /// Relative to the corpus root.
    file: String,
    recipient_index: usize,
    delivery_status: String,
    reason: String,
    hard_bounce: Option<bool>,
}

fn expected_rows() -> Vec<Expected> {
    let rel_tsv = format!("{SISIMAI}/EXPECTED-go-sisimai.tsv");
    let text = read_text(&rel_tsv);
    let mut lines = text.lines().filter(|l| !l.starts_with('#'));
    let header: Vec<&str> = lines
        .next()
        .expect("EXPECTED-go-sisimai.tsv has no header")
        .split('\t')
        .collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .unwrap_or_else(|| panic!("{rel_tsv} has no {name:?} column: {header:?}"))
    };
    let (file, index, status, reason, hard) = (
        col("file"),
        col("recipient_index"),
        col("delivery_status"),
        col("reason"),
        col("hard_bounce"),
    );
    let mut rows: Vec<Expected> = lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            let get = |i: usize| f.get(i).copied().unwrap_or("").trim().to_string();
            Expected {
                file: format!("{SISIMAI}/{}", get(file)),
                recipient_index: get(index)
                    .parse()
                    .unwrap_or_else(|_| panic!("{rel_tsv}: bad recipient_index in {l:?}")),
                delivery_status: get(status),
                reason: get(reason),
                hard_bounce: match get(hard).as_str() {
                    "true" => Some(true),
                    "false" => Some(false),
                    _ => None,
                },
            }
        })
        .collect();
    // The table repeats a few rows verbatim (rhost-kddi-01, -02): count each once.
    rows.sort();
    rows.dedup();
    assert!(rows.len() > 500, "{rel_tsv} has only {} rows", rows.len());
    rows
}

/// Ground-truth rows that describe delivery reports: ARF feedback and RFC 3834
/// auto-replies are not bounces for us. Rows with reason `delivered` (success DSNs) stay:
/// `detect` returns them as a `Bounce` whose recipients are `delivered` and not
/// permanent, so no request is opened and nobody is marked undeliverable.
fn bounce_rows() -> Vec<Expected> {
    expected_rows()
        .into_iter()
        .filter(|r| r.reason != "feedback" && r.reason != "vacation")
        .collect()
}

fn percent(n: usize, d: usize) -> f64 {
    if d == 0 {
        0.0
    } else {
        n as f64 * 100.0 / d as f64
    }
}

fn describe(b: &Bounce) -> String {
    let recipients: Vec<String> = b
        .recipients
        .iter()
        .map(|r| {
            format!(
                "{} {} {} {}",
                r.address.as_ref().map_or("-", |a| a.as_str()),
                r.status.as_deref().unwrap_or("-"),
                r.action.as_deref().unwrap_or("-"),
                if r.permanent { "hard" } else { "soft" }
            )
        })
        .collect();
    format!(
        "{:?} mid={} [{}]",
        b.format,
        b.original_message_id.as_deref().unwrap_or("-"),
        recipients.join("; ")
    )
}

// ---------------------------------------------------------------------------------------
// 1. Recognition
// ---------------------------------------------------------------------------------------

#[test]
fn recognises_sisimai_delivery_reports() {
    let files: BTreeSet<String> = bounce_rows().into_iter().map(|r| r.file).collect();
    let dump = std::env::var_os("BOUNCE_DUMP").is_some();
    let started = Instant::now();
    let mut missed = Vec::new();
    for file in &files {
        let result = detect_file(file, &read(file));
        if dump {
            println!(
                "{file}: {}",
                result.as_ref().map_or("None".to_string(), describe)
            );
        }
        if result.is_none() {
            missed.push(file.as_str());
        }
    }
    let recognised = files.len() - missed.len();
    let rate = percent(recognised, files.len());
    println!(
        "recognised {recognised} of {} ({rate:.1}%) in {:?}",
        files.len(),
        started.elapsed()
    );
    if !missed.is_empty() {
        println!("not recognised: {missed:#?}");
    }
    assert!(
        rate >= 99.0,
        "only {rate:.1}% of sisimai delivery reports recognised; missed: {missed:#?}"
    );
}

// ---------------------------------------------------------------------------------------
// 2. Failed recipients
// ---------------------------------------------------------------------------------------

/// Matching rule, per expected (file, recipient_index) row of a recognised report (rows
/// listed verbatim twice count once; feedback and vacation rows are not reports):
///
/// 1. our `recipients[recipient_index - 1]` exists and has an address (the table has no
///    addresses to compare with), and
/// 2. when sisimai's `delivery_status` has class 5, our `permanent` is true; class 4 or 2
///    (temporary, or a success DSN): `permanent` is false; and
/// 3. when sisimai says `hard_bounce` true, our `permanent` is true.
///
/// sisimai's `hard_bounce` is a verdict on its *reason*, not on the status class: it is
/// false for every reason but user/host unknown and a few more, so "5.2.2 mailbox full" or
/// "5.7.1 blocked" are `hard_bounce=false` there while our contract says 5.x.x is
/// permanent. Requiring `permanent == hard_bounce` on those rows would contradict the
/// documented meaning of `permanent`, so `hard_bounce=false` is not used against a class 5
/// row; that literal agreement is printed for information. One row
/// (lhost-postfix-05, 4.1.1 userunknown) has class 4 and `hard_bounce=true` at once: its
/// class and its flag contradict each other, so only rule 1 applies to it.
///
/// Known honest misses: sisimai invents statuses such as 5.0.947 ("expired") for reports
/// that say "delayed"/"retry timeout exceeded" (we call those temporary), prefers the
/// Diagnostic-Code over a contradicting Status field (we keep the Status), and two files
/// (rfc3464-28, rhost-cox-01) hold two messages each, of which `detect` reads the first.
#[test]
fn failed_recipients_match() {
    let rows = bounce_rows();
    let mut results: BTreeMap<String, Option<Bounce>> = BTreeMap::new();
    let mut checked = 0usize;
    let mut matched = 0usize;
    let mut literal_checked = 0usize;
    let mut literal_agree = 0usize;
    let mut failures = Vec::new();
    for row in &rows {
        let result = results
            .entry(row.file.clone())
            .or_insert_with(|| detect_file(&row.file, &read(&row.file)));
        let Some(bounce) = result else {
            continue; // counted by recognises_sisimai_delivery_reports
        };
        checked += 1;
        let recipient = bounce.recipients.get(row.recipient_index.wrapping_sub(1));
        let class = row.delivery_status.bytes().next();
        let verdict = match recipient {
            None => Err("no recipient at this index".to_string()),
            Some(r) if r.address.is_none() => Err("recipient without an address".to_string()),
            Some(r) => {
                if let (Some(hard), Some(b'4' | b'5')) = (row.hard_bounce, class) {
                    literal_checked += 1;
                    if hard == r.permanent {
                        literal_agree += 1;
                    }
                }
                let contradictory = class == Some(b'4') && row.hard_bounce == Some(true);
                let expected_permanent = match class {
                    _ if contradictory => None,
                    Some(b'5') => Some(true),
                    Some(b'4' | b'2') => Some(false),
                    _ if row.hard_bounce == Some(true) => Some(true),
                    _ => None,
                };
                match expected_permanent {
                    Some(p) if p != r.permanent => Err(format!(
                        "permanent={} but sisimai says {} ({}, hard_bounce {:?})",
                        r.permanent, row.delivery_status, row.reason, row.hard_bounce
                    )),
                    _ => Ok(()),
                }
            }
        };
        match verdict {
            Ok(()) => matched += 1,
            Err(why) => failures.push(format!(
                "{} #{}: {why}; we read {}",
                row.file,
                row.recipient_index,
                describe(bounce)
            )),
        }
    }
    let rate = percent(matched, checked);
    println!("failed recipients match: {matched} of {checked} rows ({rate:.1}%)");
    println!(
        "for information, literal permanent == sisimai hard_bounce on 4.x.x/5.x.x rows: \
         {literal_agree} of {literal_checked} ({:.1}%)",
        percent(literal_agree, literal_checked)
    );
    if !failures.is_empty() {
        println!("mismatches: {failures:#?}");
    }
    assert!(rate >= 95.0, "failed recipients match only {rate:.1}%");
}

// ---------------------------------------------------------------------------------------
// 3. False positives
// ---------------------------------------------------------------------------------------

/// Messages outside the `bounce` category of INDEX.tsv (a guess from headers) that are
/// delivery reports all the same.
const NOT_REALLY_NON_BOUNCES: &[(&str, &str)] = &[
    (
        "php-bounce-handler/eml/exchange1.eml",
        "Exchange DSN with blank lines before the headers; INDEX guessed malformed",
    ),
    (
        "php-bounce-handler/eml/exchange2.eml",
        "Exchange DSN with blank lines before the headers; INDEX guessed malformed",
    ),
    (
        "php-bounce-handler/eml/exchange3.eml",
        "Exchange DSN with blank lines before the headers; INDEX guessed malformed",
    ),
];

#[test]
fn no_false_positives_on_normal_mail() {
    let categories = index_categories();
    let exceptions: BTreeMap<&str, &str> = NOT_REALLY_NON_BOUNCES.iter().copied().collect();
    let mut checked = 0usize;
    let mut false_positives = Vec::new();
    let mut excepted = Vec::new();
    for (path, category) in &categories {
        if category == "bounce" || path.starts_with(&format!("{SISIMAI}/")) {
            continue;
        }
        checked += 1;
        if let Some(b) = detect_file(path, &read(path)) {
            match exceptions.get(path.as_str()) {
                Some(why) => excepted.push(format!("{path}: {why}")),
                None => false_positives.push(format!("{path} ({category}): {}", describe(&b))),
            }
        }
    }
    println!(
        "false positives: {} of {checked} non-bounce messages ({} listed exceptions: {excepted:#?})",
        false_positives.len(),
        excepted.len()
    );
    for path in exceptions.keys() {
        assert!(
            categories.contains_key(*path),
            "exception {path} is not in INDEX.tsv"
        );
    }
    assert!(
        false_positives.is_empty(),
        "detect() took normal mail for a bounce: {false_positives:#?}"
    );
}

/// Known non-bounces that INDEX.tsv files as `bounce` or that live in the sisimai set:
/// ARF complaints, auto-replies, sisimai's own negative samples, a postmaster's normal mail.
#[test]
fn feedback_reports_and_auto_replies_are_not_bounces() {
    let mut files: Vec<String> = expected_rows()
        .into_iter()
        .filter(|r| r.reason == "feedback" || r.reason == "vacation")
        .map(|r| r.file)
        .collect();
    files.extend(
        [
            "flanker/messages/complaints/aol.eml",
            "flanker/messages/complaints/yahoo.eml",
            "flanker/messages/long-links.eml",
            "flanker/messages/disposition-notification.eml",
            "mimekit/messages/disposition-notification.txt",
            "sisimai-set-of-emails/maildir/not/is-not-bounce-01.eml",
            "sisimai-set-of-emails/maildir/not/is-not-bounce-02.eml",
        ]
        .map(String::from),
    );
    files.sort();
    files.dedup();
    let mut wrong = Vec::new();
    for file in &files {
        if let Some(b) = detect_file(file, &read(file)) {
            wrong.push(format!("{file}: {}", describe(&b)));
        }
    }
    println!(
        "feedback reports, auto-replies and other non-bounces taken for bounces: {} of {}",
        wrong.len(),
        files.len()
    );
    assert!(wrong.is_empty(), "not bounces: {wrong:#?}");
}

// ---------------------------------------------------------------------------------------
// 4. Robustness
// ---------------------------------------------------------------------------------------

fn to_crlf(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() + raw.len() / 20);
    for (i, &b) in raw.iter().enumerate() {
        if b == b'\n' && (i == 0 || raw[i - 1] != b'\r') {
            out.push(b'\r');
        }
        out.push(b);
    }
    out
}

#[test]
fn every_corpus_message_without_panic() {
    let files = message_files();
    let started = Instant::now();
    let mut recognised = 0usize;
    let mut crlf_differs = Vec::new();
    for file in &files {
        let raw = read(file);
        let plain = detect_file(file, &raw);
        let crlf = detect_file(&format!("{file} (CRLF)"), &to_crlf(&raw));
        recognised += usize::from(plain.is_some());
        if plain.is_some() != crlf.is_some() {
            crlf_differs.push(file.clone());
        }
    }
    println!(
        "{} messages through detect as-is and as CRLF without a panic in {:?}; {recognised} \
         recognised as delivery reports; recognition differs with CRLF for {crlf_differs:?}",
        files.len(),
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------
// 6. The header gate the pipeline uses before `detect`
// ---------------------------------------------------------------------------------------

/// The pipeline runs `detect` (a full MIME parse) only when `worth_checking` says the
/// headers leave room for a report. Every report `detect` recognises anywhere in the
/// corpus must pass the gate; the share of other mail that passes is printed (it only
/// costs time).
#[test]
fn the_header_gate_lets_every_report_through() {
    let mut reports = 0usize;
    let mut blocked = Vec::new();
    let mut others = 0usize;
    let mut others_passed = 0usize;
    for file in message_files() {
        let raw = read(&file);
        let Ok(msg) = intake::message::parse_headers(&raw) else {
            continue;
        };
        let gate = intake::message::bounce::worth_checking(&msg);
        if detect_file(&file, &raw).is_some() {
            reports += 1;
            if !gate {
                blocked.push(file);
            }
        } else {
            others += 1;
            others_passed += usize::from(gate);
        }
    }
    println!(
        "gate: {} of {reports} reports pass; {others_passed} of {others} other messages \
         ({:.1}%) are parsed in full for nothing",
        reports - blocked.len(),
        percent(others_passed, others)
    );
    assert!(
        blocked.is_empty(),
        "reports the gate keeps out: {blocked:#?}"
    );
}

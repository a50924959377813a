//! Integration tests over the real-world email corpus in `shared/corpus` (see its README.md).
//!
//! The corpus is not part of the repository. It is found at `$INTAKE_CORPUS` if set, else
//! at `$CARGO_MANIFEST_DIR/../shared/corpus`, else at `/work/shared/corpus`; when none
//! exists the tests fail (they never skip silently).

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use intake::address::EmailAddress;
use intake::message::{InboundMessage, ParseError, parse};
use serde_json::Value;

// ---------------------------------------------------------------------------------------
// Locating and walking the corpus
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

/// Path relative to the corpus root, with `/` separators (as INDEX.tsv writes them).
fn rel(path: &Path) -> String {
    path.strip_prefix(corpus_root())
        .unwrap_or(path)
        .components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

/// True for files that are corpus metadata or ground truth rather than messages.
fn is_metadata(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    matches!(name, "MANIFEST.tsv" | "INDEX.tsv" | "README.md")
        || matches!(ext.to_ascii_lowercase().as_str(), "json" | "xml" | "tsv")
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

/// Every message file in the corpus, sorted.
fn message_files() -> Vec<PathBuf> {
    let mut all = Vec::new();
    walk(corpus_root(), &mut all);
    all.retain(|p| !is_metadata(p));
    all.sort();
    all
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// One row of INDEX.tsv.
struct IndexRow {
    path: String,
    category: String,
}

fn index_rows() -> Vec<IndexRow> {
    let path = corpus_root().join("INDEX.tsv");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
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
    lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let fields: Vec<&str> = l.split('\t').collect();
            IndexRow {
                path: fields.get(path_col).unwrap_or(&"").to_string(),
                category: fields.get(category_col).unwrap_or(&"").to_string(),
            }
        })
        .collect()
}

/// `parse`, with a panic turned into `Err(message)`.
fn parse_catching(raw: &[u8]) -> Result<Result<InboundMessage, ParseError>, String> {
    catch_unwind(AssertUnwindSafe(|| parse(raw))).map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic payload".to_string())
    })
}

/// Bare LF becomes CRLF; existing CRLF is kept.
fn lf_to_crlf(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() + raw.len() / 32);
    for (i, &b) in raw.iter().enumerate() {
        if b == b'\n' && (i == 0 || raw[i - 1] != b'\r') {
            out.push(b'\r');
        }
        out.push(b);
    }
    out
}

/// CRLF becomes LF; a lone CR is kept.
fn crlf_to_lf(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    for (i, &b) in raw.iter().enumerate() {
        if b == b'\r' && raw.get(i + 1) == Some(&b'\n') {
            continue;
        }
        out.push(b);
    }
    out
}

fn addresses(mailboxes: &[intake::message::Mailbox]) -> Vec<String> {
    mailboxes
        .iter()
        .map(|m| m.address.as_str().to_string())
        .collect()
}

// ---------------------------------------------------------------------------------------
// 1. Robustness: every message parses (Ok or Err) without a panic
// ---------------------------------------------------------------------------------------

/// The messages that are not messages at all; everything else must parse.
const NOT_MESSAGES: &[(&str, &str)] = &[
    ("ruby-mail/emails/sample_output_multipart", "Empty"),
    ("spamassassin/spam/bsmtpnull", "Empty"),
    (
        "james-mime4j/testmsgs/malformedHeader-noheader.msg",
        "NoHeaders",
    ),
    (
        "james-mime4j/testmsgs/malformedHeaderStartsBody-noheader.msg",
        "NoHeaders",
    ),
    ("spamscope-mail-parser/mails/mail_outlook_1", "NoHeaders"),
];

#[test]
fn every_corpus_message_parses_without_panic() {
    let started = Instant::now();
    let files = message_files();
    let index = index_rows();

    let mut ok = 0usize;
    let mut errors: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut panics: Vec<String> = Vec::new();
    let mut variant_ok_err_changes = 0usize;
    let mut bytes = 0usize;

    for path in &files {
        let raw = read(path);
        bytes += raw.len();
        let name = rel(path);
        let mut record_panic =
            |label: &str, msg: String| panics.push(format!("{name} ({label}): {msg}"));
        let original_ok = match parse_catching(&raw) {
            Ok(Ok(_)) => {
                ok += 1;
                true
            }
            Ok(Err(e)) => {
                errors
                    .entry(format!("{e:?}"))
                    .or_default()
                    .push(name.clone());
                false
            }
            Err(msg) => {
                record_panic("as is", msg);
                false
            }
        };
        for (label, variant) in [
            ("LF->CRLF", lf_to_crlf(&raw)),
            ("CRLF->LF", crlf_to_lf(&raw)),
        ] {
            if variant == raw {
                continue;
            }
            match parse_catching(&variant) {
                Ok(r) => {
                    if r.is_ok() != original_ok {
                        variant_ok_err_changes += 1;
                        println!(
                            "note: {name} {label}: parse went from {} to {}",
                            if original_ok { "Ok" } else { "Err" },
                            if r.is_ok() { "Ok" } else { "Err" }
                        );
                    }
                }
                Err(msg) => record_panic(label, msg),
            }
        }
    }

    let error_total: usize = errors.values().map(Vec::len).sum();
    println!(
        "corpus: {} message files ({} KiB) in {:.2?}: {ok} Ok, {error_total} Err, \
         {} panics",
        files.len(),
        bytes / 1024,
        started.elapsed(),
        panics.len()
    );
    for (kind, names) in &errors {
        println!("  Err {kind}: {} ({})", names.len(), names.join(", "));
    }
    println!("  Ok/Err changed by a line-ending conversion: {variant_ok_err_changes}");
    assert!(
        panics.is_empty(),
        "parse panicked on:\n{}",
        panics.join("\n")
    );
    let mut failed: Vec<(String, String)> = errors
        .iter()
        .flat_map(|(kind, names)| names.iter().map(move |n| (n.clone(), kind.clone())))
        .collect();
    failed.sort();
    let mut expected: Vec<(String, String)> = NOT_MESSAGES
        .iter()
        .map(|(n, k)| (n.to_string(), k.to_string()))
        .collect();
    expected.sort();
    assert_eq!(failed, expected, "only the non-messages may fail to parse");

    let visited: std::collections::HashSet<String> = files.iter().map(|p| rel(p)).collect();
    let not_visited: Vec<&str> = index
        .iter()
        .map(|r| r.path.as_str())
        .filter(|p| !visited.contains(*p))
        .collect();
    assert!(
        not_visited.is_empty(),
        "INDEX.tsv paths missing from the corpus or not visited: {not_visited:?}"
    );
    assert!(
        files.len() >= index.len(),
        "visited {} files but INDEX.tsv lists {} messages",
        files.len(),
        index.len()
    );
    assert!(
        files.len() > 1000,
        "only {} message files found under {}; is the corpus complete?",
        files.len(),
        corpus_root().display()
    );
}

// ---------------------------------------------------------------------------------------
// 2. From/To/Cc against the stalwart mail-parser ground truth
// ---------------------------------------------------------------------------------------

/// Files whose ground truth we knowingly do not reproduce, with the reason.
/// Each entry is (path relative to the corpus, header, reason).
const STALWART_EXCEPTIONS: &[(&str, &str, &str)] = &[];

/// Addresses of the `from`/`to`/`cc` headers of the root part in a stalwart JSON dump,
/// canonicalized and deduplicated in order. Addresses `EmailAddress` rejects are returned
/// separately (second element), as written.
fn ground_truth(json: &Value, header: &str) -> (Vec<String>, Vec<String>) {
    let headers = json
        .pointer("/parts/0/headers")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let mut out: Vec<String> = Vec::new();
    let mut rejected: Vec<String> = Vec::new();
    for h in headers {
        // Known headers are a string ("from", "reply_to"); others are {"other": "Name"}.
        let name = match &h["name"] {
            Value::String(s) => s.as_str(),
            Value::Object(o) => o.get("other").and_then(Value::as_str).unwrap_or(""),
            _ => "",
        };
        if !name.eq_ignore_ascii_case(header) {
            continue;
        }
        let mut raw: Vec<&str> = Vec::new();
        if let Some(list) = h.pointer("/value/Address/List").and_then(Value::as_array) {
            raw.extend(list.iter().filter_map(|a| a["address"].as_str()));
        }
        if let Some(groups) = h.pointer("/value/Address/Group").and_then(Value::as_array) {
            for g in groups {
                if let Some(list) = g["addresses"].as_array() {
                    raw.extend(list.iter().filter_map(|a| a["address"].as_str()));
                }
            }
        }
        for a in raw {
            match EmailAddress::parse(a) {
                Ok(a) => {
                    let a = a.as_str().to_string();
                    if !out.contains(&a) {
                        out.push(a);
                    }
                }
                Err(_) => rejected.push(a.to_string()),
            }
        }
    }
    (out, rejected)
}

#[test]
fn stalwart_ground_truth_addresses_match() {
    let dir = corpus_root().join("stalwart-mail-parser/eml");
    let mut files = Vec::new();
    walk(&dir, &mut files);
    files.retain(|p| p.extension().is_some_and(|e| e == "eml"));
    files.sort();

    let mut compared = 0usize;
    let mut with_addresses = 0usize;
    let mut matched = 0usize;
    let mut mismatches: Vec<String> = Vec::new();
    let mut excused: Vec<String> = Vec::new();
    let mut rejected_truth: Vec<String> = Vec::new();
    let mut stale_exceptions: Vec<&str> = STALWART_EXCEPTIONS.iter().map(|e| e.0).collect();

    for path in &files {
        let json_path = path.with_extension("json");
        if !json_path.is_file() {
            continue;
        }
        let name = rel(path);
        let json: Value = serde_json::from_slice(&read(&json_path))
            .unwrap_or_else(|e| panic!("{}: bad JSON: {e}", json_path.display()));
        let parsed = parse(&read(path)).ok();
        compared += 1;
        let mut file_ok = true;
        let mut any_truth = false;
        for header in ["from", "to", "cc"] {
            let (expected, rejected) = ground_truth(&json, header);
            rejected_truth.extend(rejected.iter().map(|a| format!("{name} {header}: {a:?}")));
            any_truth |= !expected.is_empty();
            let actual = match (&parsed, header) {
                (None, _) => Vec::new(),
                (Some(m), "from") => addresses(&m.from),
                (Some(m), "to") => addresses(&m.to),
                (Some(m), _) => addresses(&m.cc),
            };
            if expected == actual {
                continue;
            }
            file_ok = false;
            let line = format!("{name} {header}: expected {expected:?}, got {actual:?}");
            match STALWART_EXCEPTIONS
                .iter()
                .find(|(p, h, _)| *p == name && *h == header)
            {
                Some((_, _, reason)) => {
                    stale_exceptions.retain(|p| *p != name);
                    excused.push(format!("{line} (known: {reason})"));
                }
                None => mismatches.push(line),
            }
        }
        with_addresses += usize::from(any_truth);
        matched += usize::from(file_ok);
    }

    println!(
        "stalwart ground truth: {compared} files compared ({with_addresses} with From/To/Cc \
         addresses), {matched} match exactly ({:.1}%), {} known exceptions, {} mismatches",
        100.0 * matched as f64 / compared.max(1) as f64,
        excused.len(),
        mismatches.len()
    );
    println!(
        "  ground-truth addresses EmailAddress rejects (left out of the comparison): {}",
        rejected_truth.len()
    );
    for line in &rejected_truth {
        println!("    {line}");
    }
    for line in &excused {
        println!("  {line}");
    }
    for line in &mismatches {
        println!("  MISMATCH {line}");
    }

    assert!(
        compared > 50 && with_addresses > 50,
        "only {compared} stalwart files compared ({with_addresses} with addresses)"
    );
    assert!(
        mismatches.is_empty(),
        "From/To/Cc differ from the stalwart ground truth:\n{}",
        mismatches.join("\n")
    );
    assert!(
        stale_exceptions.is_empty(),
        "these known exceptions now match; remove them from STALWART_EXCEPTIONS: \
         {stale_exceptions:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 3. Automatic mail: auto-replies and bounces carry signals
// ---------------------------------------------------------------------------------------

/// sisimai auto-replies our signals do not (yet) recognise as automatic, with the reason.
/// The test fails when an entry starts being recognised, so the list only shrinks.
const AUTOREPLY_EXCEPTIONS: &[(&str, &str)] = &[
    (
        "sisimai-set-of-emails/maildir/bsd/rfc3834-02.eml",
        "Exchange auto-reply: only Return-Path <> and X-Auto-Response-Suppress: All, \
         no Auto-Submitted/Precedence/X-Autoreply",
    ),
    (
        "sisimai-set-of-emails/maildir/bsd/rfc3834-04.eml",
        "Exchange auto-reply: only Return-Path <> and X-Auto-Response-Suppress: All, \
         no Auto-Submitted/Precedence/X-Autoreply",
    ),
];

fn is_automatic(m: &InboundMessage) -> bool {
    let s = &m.signals;
    s.auto_submitted.as_deref().is_some_and(|v| v != "no")
        || s.autoreply_marker.is_some()
        || s.precedence
            .as_deref()
            .is_some_and(|p| matches!(p, "bulk" | "junk" | "list"))
}

fn looks_like_bounce(m: &InboundMessage) -> bool {
    m.signals.report_type.as_deref() == Some("delivery-status")
        || m.signals.null_return_path
        || m.from.iter().any(|f| f.address.is_mailer_daemon())
}

#[test]
fn auto_replies_and_bounces_have_signals() {
    // RFC 3834 auto-replies from sisimai (bsd/ and its CRLF copies in dos/).
    let mut files = Vec::new();
    walk(&corpus_root().join("sisimai-set-of-emails"), &mut files);
    files.retain(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("rfc3834-"))
    });
    files.sort();
    assert!(
        files.len() >= 6,
        "expected the sisimai rfc3834-* samples, found {files:?}"
    );

    let mut failures = Vec::new();
    let mut excused = Vec::new();
    let mut stale: Vec<&str> = Vec::new();
    for path in &files {
        let name = rel(path);
        let m = parse(&read(path)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let automatic = is_automatic(&m);
        match AUTOREPLY_EXCEPTIONS.iter().find(|(p, _)| *p == name) {
            Some((_, reason)) if !automatic => {
                excused.push(format!("{name} (known: {reason}) signals: {:?}", m.signals));
            }
            Some((path, _)) => stale.push(path),
            None if !automatic => failures.push(format!("{name}: {:?}", m.signals)),
            None => {}
        }
    }
    println!(
        "auto-replies: {} rfc3834 samples, {} recognised, {} known exceptions",
        files.len(),
        files.len() - failures.len() - excused.len(),
        excused.len()
    );
    for line in &excused {
        println!("  {line}");
    }
    assert!(
        failures.is_empty(),
        "auto-replies without an automatic-mail signal:\n{}",
        failures.join("\n")
    );
    assert!(
        stale.is_empty(),
        "these auto-replies are now recognised; remove them from AUTOREPLY_EXCEPTIONS: {stale:?}"
    );

    // Bounces, as INDEX.tsv guesses them.
    let bounces: Vec<IndexRow> = index_rows()
        .into_iter()
        .filter(|r| r.category == "bounce")
        .collect();
    let mut by_signal: BTreeMap<&str, usize> = BTreeMap::new();
    let mut recognised = 0usize;
    let mut unrecognised: Vec<&str> = Vec::new();
    for row in &bounces {
        let Ok(m) = parse(&read(&corpus_root().join(&row.path))) else {
            unrecognised.push(&row.path);
            continue;
        };
        if m.signals.report_type.as_deref() == Some("delivery-status") {
            *by_signal.entry("report-type=delivery-status").or_default() += 1;
        }
        if m.signals.null_return_path {
            *by_signal.entry("Return-Path <>").or_default() += 1;
        }
        if m.from.iter().any(|f| f.address.is_mailer_daemon()) {
            *by_signal
                .entry("From mailer-daemon/postmaster")
                .or_default() += 1;
        }
        if looks_like_bounce(&m) {
            recognised += 1;
        } else {
            unrecognised.push(&row.path);
        }
    }
    let ratio = recognised as f64 / bounces.len().max(1) as f64;
    println!(
        "bounces: {recognised}/{} INDEX bounce rows carry a bounce signal ({:.1}%); by signal: \
         {by_signal:?}",
        bounces.len(),
        100.0 * ratio
    );
    println!(
        "  without a bounce signal (or not parsed): {}",
        unrecognised.join(", ")
    );
    assert!(!bounces.is_empty(), "INDEX.tsv has no bounce rows");
    assert!(
        ratio > 0.5,
        "only {:.1}% of bounces carry a bounce signal",
        100.0 * ratio
    );
}

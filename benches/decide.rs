//! The decision path — parse + classify + decide — over the real-world corpus in
//! `../shared/corpus` (or `$INTAKE_CORPUS`), one message at a time on one core.
//!
//! `cargo bench --bench decide`. Throughput is reported in messages per second.

use std::path::{Path, PathBuf};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

use intake::config::{Config, ConfigSource};
use intake::keys::DeskKey;
use intake::store::{DirectoryIndex, assemble_facts};

fn corpus_dir() -> PathBuf {
    let candidates = [
        std::env::var_os("INTAKE_CORPUS").map(PathBuf::from),
        Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/corpus")),
        Some(PathBuf::from("/work/shared/corpus")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.is_dir())
        .expect("the corpus (set INTAKE_CORPUS)")
}

fn messages(dir: &Path, out: &mut Vec<Vec<u8>>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.filter_map(|e| e.ok()).collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        if path.is_dir() {
            messages(&path, out);
            continue;
        }
        let name = e.file_name().to_string_lossy().to_string();
        let skip = [".tsv", ".md", ".json", ".xml"];
        if skip.iter().any(|s| name.ends_with(s)) {
            continue;
        }
        if let Ok(raw) = std::fs::read(&path) {
            out.push(raw);
        }
    }
}

fn bench(c: &mut Criterion) {
    let mut corpus = Vec::new();
    messages(&corpus_dir(), &mut corpus);
    assert!(corpus.len() > 1000, "corpus has {} messages", corpus.len());
    let bytes: usize = corpus.iter().map(Vec::len).sum();
    eprintln!("corpus: {} messages, {} bytes", corpus.len(), bytes);
    let config = Config::load(&ConfigSource::Embedded).expect("embedded config");
    let desk = DeskKey::parse("HELP").expect("desk");
    let orgs = DirectoryIndex::default();
    let now = 1_800_000_000;

    let mut group = c.benchmark_group("decision_path");
    group.sample_size(20);
    group.throughput(Throughput::Elements(corpus.len() as u64));
    // What the pipeline runs before every decision: headers parsed, signals classified,
    // the policy applied. Bodies are decoded only for messages that become requests.
    group.bench_function("headers_classify_decide", |b| {
        b.iter(|| {
            let mut created = 0usize;
            for raw in &corpus {
                if let Ok(msg) = intake::message::parse_headers(raw) {
                    let facts = assemble_facts(&msg, &desk, &orgs, now, Default::default());
                    let d = intake::policy::decide(&facts, &config.policy);
                    created += usize::from(d.action == intake::policy::Action::CreateRequest);
                }
            }
            std::hint::black_box(created)
        })
    });
    // The same plus decoding every body and attachment (the worst case: every message
    // becomes a request).
    group.bench_function("full_parse_classify_decide", |b| {
        b.iter(|| {
            let mut n = 0usize;
            for raw in &corpus {
                if let Ok(msg) = intake::message::parse(raw) {
                    let facts = assemble_facts(&msg, &desk, &orgs, now, Default::default());
                    n += intake::policy::decide(&facts, &config.policy)
                        .participants
                        .len();
                    n += msg.text_body.len();
                }
            }
            std::hint::black_box(n)
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

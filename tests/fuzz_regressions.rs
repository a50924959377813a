//! Every input under `fixtures/fuzz/` once broke the decision path (found by
//! `scripts/fuzz`); each must now go through parse → classify → decide with its
//! invariants holding (`intake::fuzzing::decision_path`), as must the hand-written
//! fixtures in `fixtures/mail/`.

use std::path::Path;

fn replay(dir: &str) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("fixture directory") {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            continue;
        }
        let raw = std::fs::read(&path).unwrap();
        let result = std::panic::catch_unwind(|| intake::fuzzing::decision_path(&raw));
        assert!(
            result.is_ok(),
            "{} breaks the decision path",
            path.display()
        );
        n += 1;
    }
    n
}

#[test]
fn fuzz_findings_stay_fixed() {
    replay("fixtures/fuzz");
}

#[test]
fn the_fixtures_hold_the_decision_invariants() {
    assert!(replay("fixtures/mail") >= 20);
}

//! Unit tests for `src/policy/decision.rs`.

use super::*;

#[test]
fn reason_codes_round_trip_and_are_unique() {
    let mut seen = std::collections::HashSet::new();
    for r in Reason::ALL {
        assert_eq!(Reason::parse(r.code()), Some(*r));
        assert!(seen.insert(r.code()), "duplicate code {}", r.code());
        assert_eq!(serde_json::to_value(r).unwrap(), r.code());
    }
}

//! Unit tests for `src/keys.rs`.

use super::*;
use proptest::prelude::*;

#[test]
fn desk_keys() {
    assert!(DeskKey::parse("IT").is_ok());
    assert!(DeskKey::parse("ACME_2").is_ok());
    for bad in ["", "it", "2IT", "I-T", "VERYLONGKEY1"] {
        assert!(DeskKey::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn request_keys_round_trip() {
    let k = RequestKey::parse("IT-42").unwrap();
    assert_eq!(k.desk().as_str(), "IT");
    assert_eq!(k.number(), 42);
    assert_eq!(k.to_string(), "IT-42");
    assert!(RequestKey::parse("IT-").is_err());
    assert!(RequestKey::parse("IT-4x").is_err());
    assert!(RequestKey::parse("it-4").is_err());
}

#[test]
fn subject_keys() {
    let keys = RequestKey::find_in_subject("Re: [IT-42] printer [x] [HR-7] [IT-42]");
    assert_eq!(
        keys.iter().map(|k| k.to_string()).collect::<Vec<_>>(),
        ["IT-42", "HR-7"]
    );
    assert!(RequestKey::find_in_subject("no keys [it-1] [").is_empty());
}

proptest! {
    #[test]
    fn subject_scan_never_panics(s in "\\PC{0,100}") {
        let _ = RequestKey::find_in_subject(&s);
    }
}

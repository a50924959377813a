use std::io::BufReader;

use proptest::prelude::*;

use super::*;

fn read_all(data: &[u8], offset: u64, max_size: u64) -> Vec<MboxMessage> {
    // A tiny buffer, so lines and From_ lines straddle buffer refills.
    let input = BufReader::with_capacity(7, &data[offset as usize..]);
    MboxReader::new(input, offset, max_size, None)
        .expect("an mbox")
        .collect::<Result<Vec<_>, _>>()
        .expect("readable")
}

fn bodies(messages: &[MboxMessage]) -> Vec<String> {
    messages
        .iter()
        .map(|m| String::from_utf8_lossy(&m.message.raw).into_owned())
        .collect()
}

/// What an mboxrd writer does.
fn write_mboxrd(messages: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in messages {
        out.extend_from_slice(b"From sender@example.com Mon Nov 23 10:00:00 2026\n");
        for line in m.split_inclusive('\n') {
            if is_escaped_from(line.as_bytes()) || line.starts_with("From ") {
                out.push(b'>');
            }
            out.extend_from_slice(line.as_bytes());
        }
        out.push(b'\n');
    }
    out
}

const THREE: &str = "From a@example.com Mon Nov 23 10:00:00 2026\n\
Subject: one\n\
\n\
first\n\
\n\
From b@example.com Mon Nov 23 10:01:00 2026\n\
Subject: two\n\
\n\
second\n\
\n\
From c@example.com Mon Nov 23 10:02:00 2026\n\
Subject: three\n\
\n\
third\n";

#[test]
fn splits_messages_and_drops_the_separating_blank_line() {
    let messages = read_all(THREE.as_bytes(), 0, u64::MAX);
    assert_eq!(
        bodies(&messages),
        [
            "Subject: one\n\nfirst\n",
            "Subject: two\n\nsecond\n",
            "Subject: three\n\nthird\n"
        ]
    );
    // Offsets point at the From_ lines; each message ends where the next begins.
    assert_eq!(messages[0].offset, 0);
    assert_eq!(messages[0].end, messages[1].offset);
    assert_eq!(messages[1].end, messages[2].offset);
    assert_eq!(messages[2].end, THREE.len() as u64);
    for m in &messages {
        assert!(THREE[m.offset as usize..].starts_with("From "));
        assert_eq!(m.message.size, m.message.raw.len() as u64);
        assert_eq!(
            m.message.sha256,
            crate::message::content_hash(&m.message.raw)
        );
        assert!(m.message.spilled.is_none());
    }
}

#[test]
fn resumes_at_a_recorded_offset() {
    let all = read_all(THREE.as_bytes(), 0, u64::MAX);
    let rest = read_all(THREE.as_bytes(), all[0].end, u64::MAX);
    assert_eq!(bodies(&rest), bodies(&all[1..]));
    assert_eq!(rest[0].offset, all[1].offset);
    // At the very end: nothing more.
    assert!(read_all(THREE.as_bytes(), THREE.len() as u64, u64::MAX).is_empty());
    // Not at a message boundary: refused, so the caller can start over.
    let inside = (all[0].offset + 3) as usize;
    let err = MboxReader::new(&THREE.as_bytes()[inside..], inside as u64, u64::MAX, None)
        .err()
        .expect("no From_ line there");
    assert!(matches!(err, MboxError::NoFromLine(n) if n == inside as u64));
}

#[test]
fn unescapes_mboxrd_from_lines() {
    let data = "From a@example.com Mon Nov 23 10:00:00 2026\n\
Subject: quoting\n\
\n\
>From the top\n\
>>From a quote\n\
>Fromage is cheese\n\
> From with a space\n\
From here on it is a body line (no blank line before, no time)\n\
\n\
>From after a blank line\n";
    let messages = read_all(data.as_bytes(), 0, u64::MAX);
    assert_eq!(
        bodies(&messages),
        ["Subject: quoting\n\n\
From the top\n\
>From a quote\n\
>Fromage is cheese\n\
> From with a space\n\
From here on it is a body line (no blank line before, no time)\n\
\n\
From after a blank line\n"]
    );
}

#[test]
fn crlf_files_keep_their_line_ends() {
    let data = "From a@example.com Mon Nov 23 10:00:00 2026\r\n\
Subject: one\r\n\r\nfirst\r\n>From x\r\n\r\n\
From b@example.com Mon Nov 23 10:01:00 2026\r\n\
Subject: two\r\n\r\nsecond\r\n\r\n";
    let messages = read_all(data.as_bytes(), 0, u64::MAX);
    assert_eq!(
        bodies(&messages),
        [
            "Subject: one\r\n\r\nfirst\r\nFrom x\r\n",
            "Subject: two\r\n\r\nsecond\r\n"
        ]
    );
}

#[test]
fn last_message_without_a_final_newline() {
    let data = "From a@example.com Mon Nov 23 10:00:00 2026\nSubject: one\n\nno newline at the end";
    let messages = read_all(data.as_bytes(), 0, u64::MAX);
    assert_eq!(bodies(&messages), ["Subject: one\n\nno newline at the end"]);
    assert_eq!(messages[0].end, data.len() as u64);
}

#[test]
fn separators_without_a_blank_line_are_recognised_by_their_date() {
    let data = "From a@example.com Mon Nov 23 10:00:00 2026\nSubject: one\n\nbody\n\
From b@example.com Mon Nov 23 10:01:00 2026\nSubject: two\n\nbody\n";
    let messages = read_all(data.as_bytes(), 0, u64::MAX);
    assert_eq!(
        bodies(&messages),
        ["Subject: one\n\nbody\n", "Subject: two\n\nbody\n"]
    );
}

#[test]
fn empty_input_and_non_mbox_input() {
    assert!(read_all(b"", 0, u64::MAX).is_empty());
    assert!(matches!(
        MboxReader::new(&b"Subject: not an mbox\n\nhi\n"[..], 0, u64::MAX, None),
        Err(MboxError::NoFromLine(0))
    ));
    // An empty message between two separators is a message (the pipeline quarantines it).
    let data =
        "From a Mon Nov 23 10:00:00 2026\n\nFrom b Mon Nov 23 10:00:00 2026\nSubject: x\n\nbody\n";
    assert_eq!(
        bodies(&read_all(data.as_bytes(), 0, u64::MAX)),
        ["", "Subject: x\n\nbody\n"]
    );
}

#[test]
fn long_lines_are_read_in_pieces() {
    let long = "x".repeat(200_000);
    let data = format!(
        "From a@example.com Mon Nov 23 10:00:00 2026 {long}\nSubject: long\n\n{long}\nFrom not a separator {long}\n\nFrom b@example.com Mon Nov 23 10:01:00 2026\nSubject: two\n\nbody\n"
    );
    let messages = read_all(data.as_bytes(), 0, u64::MAX);
    assert_eq!(messages.len(), 2);
    assert_eq!(
        bodies(&messages)[0],
        format!("Subject: long\n\n{long}\nFrom not a separator {long}\n")
    );
    assert_eq!(bodies(&messages)[1], "Subject: two\n\nbody\n");
}

#[test]
fn oversized_messages_keep_their_head_and_spill_the_rest() {
    let dir = tempfile::tempdir().expect("temp dir");
    let big_body = "0123456789abcdef\n".repeat(10_000); // 170,000 bytes
    let message = format!("Subject: big\nFrom: a@example.com\n\n{big_body}");
    let data = format!(
        "From a@example.com Mon Nov 23 10:00:00 2026\n{message}\nFrom b@example.com Mon Nov 23 10:01:00 2026\nSubject: small\n\nbody\n"
    );
    let input = BufReader::new(data.as_bytes());
    let messages: Vec<MboxMessage> = MboxReader::new(input, 0, 100_000, Some(dir.path()))
        .expect("an mbox")
        .collect::<Result<_, _>>()
        .expect("readable");
    assert_eq!(messages.len(), 2);
    let big = &messages[0].message;
    assert_eq!(big.size, message.len() as u64);
    assert_eq!(big.raw.len(), OVERSIZED_HEAD);
    assert!(message.as_bytes().starts_with(&big.raw));
    assert_eq!(big.sha256, crate::message::content_hash(message.as_bytes()));
    let spilled = big.spilled.as_ref().expect("spilled");
    assert_eq!(spilled, &dir.path().join(format!("{}.eml", big.sha256)));
    assert_eq!(
        std::fs::read(spilled).expect("spilled file"),
        message.as_bytes()
    );
    // The next message is whole, and nothing else was left in the directory.
    assert_eq!(bodies(&messages[1..]), ["Subject: small\n\nbody\n"]);
    let files: Vec<_> = std::fs::read_dir(dir.path())
        .expect("list")
        .filter_map(Result::ok)
        .collect();
    assert_eq!(files.len(), 1);
}

#[test]
fn message_files_read_like_mbox_messages() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("m.eml");
    std::fs::write(&path, "Subject: x\n\nbody\n").expect("write");
    let small = read_file(&path, 1000, Some(dir.path()))
        .expect("read")
        .expect("exists");
    assert_eq!(small.raw, b"Subject: x\n\nbody\n");
    assert!(small.spilled.is_none());
    let spill = dir.path().join("q");
    let big = read_file(&path, 5, Some(&spill))
        .expect("read")
        .expect("exists");
    assert_eq!(big.size, 17);
    assert_eq!(
        std::fs::read(big.spilled.expect("spilled")).expect("copy"),
        b"Subject: x\n\nbody\n"
    );
    assert!(
        read_file(&dir.path().join("gone"), 5, None)
            .expect("not an error")
            .is_none()
    );
}

#[test]
fn is_mbox_looks_at_the_first_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mbox = dir.path().join("a.mbox");
    std::fs::write(&mbox, THREE).expect("write");
    assert!(is_mbox(&mbox).expect("readable"));
    let eml = dir.path().join("a.eml");
    std::fs::write(&eml, "Subject: x\n\n").expect("write");
    assert!(!is_mbox(&eml).expect("readable"));
}

proptest! {
    /// Whatever the messages contain, writing them as mboxrd and reading them back gives
    /// them back, and every recorded end is a place a reader can resume from.
    #[test]
    fn mboxrd_round_trip(
        messages in proptest::collection::vec(
            proptest::collection::vec(
                prop_oneof![
                    Just(String::new()),
                    Just("From x".to_string()),
                    Just(">From y".to_string()),
                    Just(">>>From z".to_string()),
                    Just("From 10:00 to 12:00".to_string()),
                    Just("\r".to_string()),
                    "[ -~]{0,20}",
                ],
                0..8,
            )
            .prop_map(|lines| lines.iter().map(|l| format!("{l}\n")).collect::<String>()),
            1..6,
        )
    ) {
        let data = write_mboxrd(&messages);
        let read = read_all(&data, 0, u64::MAX);
        prop_assert_eq!(bodies(&read), messages.clone());
        for (i, m) in read.iter().enumerate() {
            let rest = read_all(&data, m.end, u64::MAX);
            prop_assert_eq!(bodies(&rest), messages[i + 1..].to_vec());
        }
    }
}

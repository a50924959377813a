//! A batch decides every message as if it came alone: the batch reads ahead (ledger
//! claims, people, counts) and defers writes, and none of that may change an outcome
//! when later messages depend on earlier ones in the same batch.

use std::path::Path;

use serde_json::Value;

use crate::harness::*;

/// Messages that each depend on the ones before: a reply by Message-ID and one by
/// subject key to a request opened earlier in the batch, a sender over the hourly
/// request limit, the same message twice, someone Cc'd earlier writing in, and one
/// address mailed more often than its daily limit allows.
fn write_messages(dir: &Path) {
    let messages = [
        "From: Xavier <x@out.example>\r\nTo: it@desk.example\r\nCc: Yvonne <y@out.example>\r\n\
         Subject: Printer on fire\r\nMessage-ID: <m1@out.example>\r\n\r\nHelp.\r\n",
        "From: Yvonne <y@out.example>\r\nTo: it@desk.example\r\nSubject: Re: Printer on fire\r\n\
         In-Reply-To: <m1@out.example>\r\nReferences: <m1@out.example>\r\n\
         Message-ID: <m2@out.example>\r\n\r\nStill burning.\r\n",
        "From: Xavier <x@out.example>\r\nTo: it@desk.example\r\nSubject: Second thing\r\n\
         Message-ID: <m3@out.example>\r\n\r\nAlso this.\r\n",
        "From: Xavier <x@out.example>\r\nTo: it@desk.example\r\nSubject: Third thing\r\n\
         Message-ID: <m4@out.example>\r\n\r\nAnd this.\r\n",
        "From: Xavier <x@out.example>\r\nTo: it@desk.example\r\nCc: Yvonne <y@out.example>\r\n\
         Subject: Printer on fire\r\nMessage-ID: <m1@out.example>\r\n\r\nHelp.\r\n",
        "From: Zoe <z@out.example>\r\nTo: it@desk.example\r\nCc: Xavier <x@out.example>, \
         Walt <w@out.example>\r\nSubject: Desk chair\r\nMessage-ID: <m6@out.example>\r\n\r\nBroken.\r\n",
        "From: Yvonne <y@out.example>\r\nTo: it@desk.example\r\nSubject: Re: [IT-1] Printer on fire\r\n\
         Message-ID: <m7@out.example>\r\n\r\nOut now.\r\n",
        "From: Walt <w@out.example>\r\nTo: it@desk.example\r\nCc: Zoe <z@out.example>\r\n\
         Subject: Lamp\r\nMessage-ID: <m8@out.example>\r\n\r\nFlickers.\r\n",
        "From: Ann <a@out.example>\r\nTo: it@desk.example\r\nCc: Bob <b@out.example>\r\n\
         Subject: Keyboard\r\nMessage-ID: <m9@out.example>\r\n\r\nSticky keys.\r\n",
        "From: Bob <b@out.example>\r\nTo: it@desk.example\r\nSubject: Mouse\r\n\
         Message-ID: <m10@out.example>\r\n\r\nGone.\r\n",
        "From: Carl <c@out.example>\r\nTo: it@desk.example\r\nCc: Dora <d@out.example>\r\n\
         Subject: Screen\r\nMessage-ID: <m11@out.example>\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n\
         Photo attached.\r\n--b\r\nContent-Type: image/png; name=\"s.png\"\r\n\
         Content-Disposition: attachment; filename=\"s.png\"\r\nContent-Transfer-Encoding: base64\r\n\r\n\
         aGVsbG8=\r\n--b--\r\n",
        "From: Dora <d@out.example>\r\nTo: it@desk.example\r\nSubject: Re: [IT-7] Screen\r\n\
         Message-ID: <m12@out.example>\r\n\r\nSame here.\r\n",
    ];
    std::fs::create_dir_all(dir).unwrap();
    for (i, m) in messages.iter().enumerate() {
        std::fs::write(dir.join(format!("{:02}.eml", i + 1)), m).unwrap();
    }
}

fn env(backend: Backend) -> Env {
    let desk = DeskSettings::sharing_any();
    let env = Env::new(backend, &Site::default(), &desk);
    let text = std::fs::read_to_string(&env.config)
        .unwrap()
        .replace("[outbox]", "[outbox]\nmax_per_recipient_per_day = 1")
        .replace(
            "[customer_access]",
            "[hygiene]\nmax_requests_per_sender_per_hour = 2\n\n[customer_access]",
        );
    std::fs::write(&env.config, text).unwrap();
    env
}

/// What the database says happened, without ids, times and tokens.
fn state(env: &Env) -> Value {
    let strip = |mut v: Value, keep: &[&str]| {
        if let Value::Array(items) = &mut v {
            for item in items {
                if let Value::Object(o) = item {
                    o.retain(|k, _| keep.contains(&k.as_str()));
                }
            }
        }
        v
    };
    let requests = env.json(&["requests", "list", "--json"]);
    let details: Vec<Value> = requests
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let mut d = env.request(r["key"].as_str().unwrap());
            for k in ["created_at", "updated_at", "id", "held_until"] {
                strip_key(&mut d, k);
            }
            d
        })
        .collect();
    // Every decision about every address: action, reason and each address's outcome.
    let audit: Vec<Value> = ["x", "y", "z", "w", "a", "b", "c", "d"]
        .iter()
        .map(|who| {
            let mut a = env.json(&["audit", &format!("{who}@out.example"), "--json"]);
            for k in ["created_at", "id", "ledger_id", "at"] {
                strip_key(&mut a, k);
            }
            a
        })
        .collect();
    serde_json::json!({
        "audit": audit,
        "requests": details,
        "accounts": strip(env.json(&["accounts", "list", "--json"]), &["address", "kind", "status", "display_name"]),
        "outbox": strip(env.json(&["outbox", "list", "--json"]), &["to", "kind", "request", "subject"]),
    })
}

fn strip_key(v: &mut Value, key: &str) {
    match v {
        Value::Object(o) => {
            o.remove(key);
            for x in o.values_mut() {
                strip_key(x, key);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| strip_key(x, key)),
        _ => {}
    }
}

#[test]
fn a_batch_decides_like_one_message_at_a_time() {
    for backend in BACKENDS {
        let together = env(backend);
        let dir = together.path("mail");
        write_messages(&dir);
        let out = together.intake(&["process", "--no-send", dir.to_str().unwrap()]);
        assert!(out.status.success(), "{out:?}");
        // Straight through: what the batch held back was written before anything read it
        // (a row written too late fails the batch, which is then redone message by message).
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(!log.contains("message by message"), "{log}");

        let alone = env(backend);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for f in &files {
            let out = alone.intake(&["process", "--no-send", f.to_str().unwrap()]);
            assert!(out.status.success(), "{out:?}");
        }

        let (a, b) = (state(&together), state(&alone));
        assert_eq!(a, b, "one batch:\n{a:#}\none at a time:\n{b:#}");
        // And the dependencies really were exercised.
        let requests = a["requests"].as_array().unwrap();
        assert_eq!(requests.len(), 7, "IT-1..7 (m4 over the limit): {a:#}");
        let first = requests.iter().find(|r| r["key"] == "IT-1").expect("IT-1");
        let text = first.to_string();
        assert!(
            text.contains("Still burning"),
            "reply by Message-ID: {first:#}"
        );
        assert!(text.contains("Out now"), "reply by subject key: {first:#}");
        // Cc'd on a request of the batch, then writing in: an account already.
        let bob = a["accounts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["address"] == "b@out.example")
            .count();
        assert_eq!(bob, 1, "{a:#}");
        let screen = requests
            .iter()
            .find(|r| r["key"] == "IT-7")
            .expect("IT-7")
            .to_string();
        assert!(
            screen.contains("s.png") && screen.contains("Same here"),
            "attachment and reply: {screen}"
        );
        let to_x = a["outbox"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|o| o["to"] == "x@out.example")
            .count();
        assert!(to_x <= 1, "one mail a day to x: {a:#}");
    }
}

/// Held requests (unknown senders on a desk that verifies them) remember who they were
/// for; two in one batch go straight through, each with its own recipients.
#[test]
fn held_requests_in_one_batch_keep_their_recipients() {
    for backend in BACKENDS {
        let site = Site {
            signup: "verify",
            ..Site::default()
        };
        let desk = DeskSettings::sharing_any();
        let env = Env::new(backend, &site, &desk);
        let dir = env.path("mail");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(fixture("outsider-new.eml"), dir.join("1.eml")).unwrap();
        std::fs::write(
            dir.join("2.eml"),
            "From: Pat <pat@else.example>\r\nTo: it@desk.example\r\nCc: Quinn <q@else.example>\r\n\
             Subject: Door stuck\r\nMessage-ID: <door@else.example>\r\n\r\nIt is stuck.\r\n",
        )
        .unwrap();
        let out = env.intake(&["process", "--no-send", dir.to_str().unwrap()]);
        assert!(out.status.success(), "{out:?}");
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(!log.contains("message by message"), "{log}");
        for (key, cc) in [("IT-1", "bob@ext.example"), ("IT-2", "q@else.example")] {
            assert_eq!(env.request(key)["status"], "held", "{key}");
            let audit = env.json(&["audit", cc, "--json"]).to_string();
            assert!(audit.contains(key), "{cc} waits on {key}: {audit}");
        }
    }
}

use super::*;

fn person(address: &str) -> Person {
    Person::new(EmailAddress::parse(address).expect("test address"))
}

fn full_facts() -> Facts {
    let mut sender = person("Olga@Outside.Example");
    sender.display_name = Some("Olga \"O\" Outsider".into());
    sender.account = Some(AccountFacts {
        kind: AccountKind::PortalOnly,
        status: AccountStatus::Pending,
        organizations: vec!["Outside".into()],
        desk_customer: true,
        last_verification_sent_at: Some(1_700_000_000),
    });
    sender.undeliverable = true;
    let mut agent = person("agnes@corp.example");
    agent.agent = true;
    let mut stranger = person("bob@acme.example");
    stranger.domain_organizations = vec!["Acme".into(), "Acme EU".into()];
    stranger.domain_desk_organizations = vec!["Acme".into()];
    Facts {
        now: 1_800_000_000,
        desk: DeskKey::parse("IT").expect("desk"),
        message_id: Some("m-1@outside.example".into()),
        duplicate: false,
        signals: Signals {
            auto_submitted: Some("auto-replied".into()),
            precedence: Some("bulk".into()),
            list_id: Some("<list.example>".into()),
            list_unsubscribe: true,
            auto_response_suppress: Some("All".into()),
            autoreply_marker: Some("X-Autoreply".into()),
            from_mail_system: true,
            bounce: true,
            failed_recipients: true,
            report_type: Some("delivery-status".into()),
            null_return_path: true,
            loop_ids: vec!["intake.desk.example".into()],
            message_id_domain: Some("outside.example".into()),
            exchange_auth_as: vec!["internal".into()],
        },
        auth_results: vec![AuthResult {
            header_index: 0,
            authserv_id: "mx.desk.example".into(),
            method: "dmarc".into(),
            result: "pass".into(),
            properties: vec![("header.from".into(), "outside.example".into())],
        }],
        sender_confirmed: false,
        sender: Some(sender),
        sender_recent_requests: 7,
        recipients: vec![agent, stranger],
        invalid_recipients: vec!["not an address".into()],
        omitted_recipients: 3,
        thread: Some(Thread {
            key: RequestKey::parse("IT-42").expect("key"),
            status: RequestStatus::Held,
            matched_by: ThreadMatch::SubjectKey,
            reporter: EmailAddress::parse("olga@outside.example").expect("address"),
            reporter_organizations: vec!["Outside".into()],
            participants: vec![EmailAddress::parse("cy@other.example").expect("address")],
        }),
    }
}

#[test]
fn facts_survive_the_round_trip() {
    let facts = full_facts();
    let json = encode_facts(&facts);
    let back = decode_facts(&json).expect("decode");
    assert_eq!(back.now, facts.now);
    assert_eq!(back.desk, facts.desk);
    assert_eq!(back.message_id, facts.message_id);
    assert!(!back.duplicate);
    assert_eq!(back.signals, facts.signals);
    assert_eq!(back.auth_results, facts.auth_results);
    assert_eq!(back.sender, facts.sender);
    assert_eq!(back.sender_recent_requests, facts.sender_recent_requests);
    assert_eq!(back.recipients, facts.recipients);
    assert_eq!(back.invalid_recipients, facts.invalid_recipients);
    assert_eq!(back.omitted_recipients, facts.omitted_recipients);
    assert_eq!(back.thread, facts.thread);
    assert_eq!(encode_facts(&back), json);
}

#[test]
fn empty_facts_are_small_and_survive() {
    let facts = Facts {
        now: 1,
        desk: DeskKey::parse("HR").expect("desk"),
        message_id: None,
        duplicate: false,
        signals: Signals::default(),
        auth_results: Vec::new(),
        sender_confirmed: false,
        sender: None,
        sender_recent_requests: 0,
        recipients: Vec::new(),
        invalid_recipients: Vec::new(),
        omitted_recipients: 0,
        thread: None,
    };
    let json = encode_facts(&facts);
    assert!(json.len() < 120, "{json}");
    let back = decode_facts(&json).expect("decode");
    assert_eq!(back.desk, facts.desk);
    assert!(back.sender.is_none() && back.thread.is_none());
}

#[test]
fn bad_records_are_corrupt_not_panics() {
    for bad in [
        "",
        "{}",
        r#"{"v":2,"now":1,"desk":"IT"}"#,
        r#"{"v":1,"now":1,"desk":"it"}"#,
        r#"{"v":1,"now":1,"desk":"IT","sender":{"address":"nobody"}}"#,
        r#"{"v":1,"now":1,"desk":"IT","sender":{"address":"a@b.example","account":{"kind":"boss","status":"active"}}}"#,
    ] {
        assert!(
            matches!(decode_facts(bad), Err(StoreError::Corrupt(_))),
            "{bad:?} decoded"
        );
    }
}

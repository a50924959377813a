//! The decision path as one function, for fuzzing: parse (headers, bounce report, body)
//! → classify → decide under several policies, checking the decision's invariants.
//!
//! `fuzz/` (cargo-fuzz, run by `scripts/fuzz`) calls it with generated input, and
//! `tests/fuzz_regressions.rs` with every input under `fixtures/fuzz/` that once broke
//! something. A panic anywhere is a finding.

use std::sync::OnceLock;

use crate::config::{Config, ConfigSource};
use crate::keys::DeskKey;
use crate::message;
use crate::policy::{
    AccountOutcome, Action, ChannelAccess, ParticipantOutcome, Policy, Signup, UnknownParticipants,
    decide,
};
use crate::store::{DirectoryIndex, assemble_facts};

struct Setup {
    desk: DeskKey,
    orgs: DirectoryIndex,
    policies: Vec<Policy>,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        // Cannot fail: the embedded configuration is compiled in, and
        // config_tests::embedded_defaults_are_valid loads it the same way (empty
        // environment) and asserts it is valid and has a desk.
        let config = Config::load_with_env(&ConfigSource::Embedded, Some(Default::default()))
            .expect("the embedded configuration is valid");
        let base = config.policy.clone();
        let desk = base.desks[0].key.clone();
        let mut policies = Vec::new();
        for signup in [Signup::Open, Signup::Verify, Signup::Closed] {
            for restricted in [false, true] {
                let mut p = base.clone();
                p.access.signup = signup;
                let d = &mut p.desks[0];
                d.channel_access = if restricted {
                    ChannelAccess::Restricted
                } else {
                    ChannelAccess::Open
                };
                d.unknown_participants = if restricted {
                    UnknownParticipants::Drop
                } else {
                    UnknownParticipants::Create
                };
                p.trust.require_authentication = !restricted;
                policies.push(p);
            }
        }
        Setup {
            desk,
            orgs: DirectoryIndex::default(),
            policies,
        }
    })
}

/// Runs one input through the decision path. Panics on a broken invariant (and, being
/// the code under test, wherever that code panics).
pub fn decision_path(raw: &[u8]) {
    let s = setup();
    let Ok(mut msg) = message::parse_headers(raw) else {
        return;
    };
    message::check_bounce(&mut msg, raw);
    let now = 1_800_000_000;
    for policy in &s.policies {
        let facts = assemble_facts(&msg, &s.desk, &s.orgs, now, Default::default());
        let d = decide(&facts, policy);
        let desk = &policy.desks[0];
        let created = matches!(
            d.requester.account,
            AccountOutcome::CreateInternal | AccountOutcome::CreatePortalOnly
        ) || d
            .participants
            .iter()
            .any(|p| p.outcome.created_kind().is_some());
        if d.is_passive() {
            assert!(!created, "a passive decision creates no account: {d:?}");
        }
        if d.action == Action::Ignore {
            assert!(d.emails.is_empty(), "ignored mail sends nothing: {d:?}");
        }
        if desk.channel_access == ChannelAccess::Restricted {
            assert!(!created, "a restricted desk creates no account: {d:?}");
        }
        if desk.unknown_participants == UnknownParticipants::Drop {
            assert!(
                d.participants
                    .iter()
                    .all(|p| p.outcome != ParticipantOutcome::CreatePortalOnly
                        && p.outcome != ParticipantOutcome::CreateInternal),
                "drop creates no participant accounts: {d:?}"
            );
        }
        for p in &d.participants {
            assert!(
                !policy.is_desk_address(&p.address) || p.outcome == ParticipantOutcome::Drop,
                "a desk address is never a participant: {d:?}"
            );
        }
        assert!(
            d.emails.iter().all(|e| !policy.is_desk_address(&e.to)),
            "we never mail our own desk addresses: {d:?}"
        );
        // What `intake explain` and the audit log write. A `Decision` has only string
        // map keys and no fallible Serialize impls, so this cannot fail; if it ever
        // did, the panic is the fuzzer's finding, which is this function's purpose.
        serde_json::to_string(&d).expect("a decision serializes");
    }
    msg.set_body(message::parse_body(raw));
}

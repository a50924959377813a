//! The directory commands (`accounts add|deactivate|reactivate|rename|merge`, `orgs`,
//! `desks customers`, `agents`) through the real binary, on SQLite and PostgreSQL: what
//! they change is what the policy then sees, every change is in `intake audit`, and rows
//! the configuration owns are refused and survive a directory sync untouched.

use std::process::Output;

use serde_json::Value;

use crate::harness::*;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs a command that must succeed; returns its stdout.
fn ok(env: &Env, args: &[&str]) -> String {
    let out = env.intake(args);
    assert!(
        out.status.success(),
        "intake {args:?} failed ({:?}) on {:?}:\n{}\n{}",
        out.status.code(),
        env.backend,
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command that must fail with `code`; returns its stderr.
fn fails(env: &Env, args: &[&str], code: i32) -> String {
    let out = env.intake(args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "intake {args:?} on {:?}:\n{}\n{}",
        env.backend,
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    stderr(&out)
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// `(action, role, outcome)` of every audit entry for `address`, oldest first.
fn audit(env: &Env, address: &str) -> Vec<(String, String, String)> {
    env.json(&["audit", address, "--json"])
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    (
                        e["action"].as_str().unwrap_or_default().to_string(),
                        e["role"].as_str().unwrap_or_default().to_string(),
                        e["outcome"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn audit_of(env: &Env, address: &str, action: &str) -> Vec<Value> {
    env.json(&["audit", address, "--json"])
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|e| e["action"] == action)
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn accounts_add_deactivate_reactivate_rename_reach_the_policy() {
    for backend in BACKENDS {
        let env = Env::new(backend, &Site::default(), &DeskSettings::default());
        // HR is restricted: a stranger is refused until made its customer.
        assert_eq!(
            env.explain("restricted-stranger.eml")["reason"],
            "not_desk_customer"
        );

        let added = env.json(&[
            "accounts",
            "add",
            "Olga@Outside.example",
            "--name",
            "Olga Outsider",
            "--desk",
            "HR",
            "--json",
        ]);
        assert_eq!(added["address"], "olga@outside.example", "{added}");
        assert_eq!(added["kind"], "portal_only", "{added}");
        assert_eq!(added["desks"], serde_json::json!(["HR"]), "{added}");
        let shown = env.json(&["accounts", "show", "olga@outside.example", "--json"]);
        assert_eq!(shown["origin"], "cli", "{shown}");
        assert_eq!(shown["status"], "active", "{shown}");
        assert_eq!(shown["display_name"], "Olga Outsider", "{shown}");
        assert_eq!(strs(&shown["desks"]), ["HR"], "{shown}");
        let d = env.explain("restricted-stranger.eml");
        assert_eq!(d["action"], "create_request", "{d:#}");
        assert_eq!(d["requester"]["account"], "existing", "{d:#}");

        // Refusals: a second account, a desk's own address, unknown desks and orgs.
        let e = fails(&env, &["accounts", "add", "olga@outside.example"], 65);
        assert!(e.contains("already has an account"), "{e}");
        let e = fails(&env, &["accounts", "add", "it@desk.example"], 65);
        assert!(e.contains("address of desk IT"), "{e}");
        let e = fails(
            &env,
            &["accounts", "add", "x@ext.example", "--desk", "NOPE"],
            65,
        );
        assert!(e.contains("not configured"), "{e}");
        fails(&env, &["accounts", "add", "not-an-address"], 65);
        fails(
            &env,
            &["accounts", "add", "x@ext.example", "--org", "Nope"],
            69,
        );
        assert!(
            !env.account_addresses()
                .contains(&"x@ext.example".to_string()),
            "a refused add left an account"
        );

        // Kind follows the approved domains unless given; organizations follow domains.
        let internal = env.json(&["accounts", "add", "ida@corp.example", "--json"]);
        assert_eq!(internal["kind"], "internal", "{internal}");
        let portal = env.json(&[
            "accounts",
            "add",
            "ivo@corp.example",
            "--kind",
            "portal_only",
            "--org",
            "Other",
            "--json",
        ]);
        assert_eq!(portal["kind"], "portal_only", "{portal}");
        assert_eq!(strs(&portal["organizations"]), ["Other"], "{portal}");
        let dan = env.json(&["accounts", "add", "dan@acme.example", "--json"]);
        assert_eq!(strs(&dan["organizations"]), ["Acme"], "{dan}");
        let shown = env.json(&["accounts", "show", "dan@acme.example", "--json"]);
        assert_eq!(strs(&shown["organizations"]), ["Acme"], "{shown}");

        // Deactivated is what the policy reads as deactivated.
        let change = env.json(&["accounts", "deactivate", "olga@outside.example", "--json"]);
        assert_eq!(change["status"], "deactivated", "{change}");
        assert_eq!(change["changed"], true, "{change}");
        assert_eq!(
            env.explain("restricted-stranger.eml")["reason"],
            "account_deactivated"
        );
        let again = ok(&env, &["accounts", "deactivate", "olga@outside.example"]);
        assert!(again.contains("already deactivated"), "{again}");
        ok(&env, &["accounts", "reactivate", "olga@outside.example"]);
        let shown = env.json(&["accounts", "show", "olga@outside.example", "--json"]);
        assert_eq!(shown["status"], "active", "{shown}");
        assert_eq!(
            env.explain("restricted-stranger.eml")["action"],
            "create_request"
        );

        ok(
            &env,
            &[
                "accounts",
                "rename",
                "olga@outside.example",
                "--name",
                "Olga O.",
            ],
        );
        let shown = env.json(&["accounts", "show", "olga@outside.example", "--json"]);
        assert_eq!(shown["display_name"], "Olga O.", "{shown}");

        // Configured accounts are changed in the configuration file, not here.
        for args in [
            &["accounts", "deactivate", "ann@acme.example"][..],
            &["accounts", "rename", "ann@acme.example", "--name", "X"][..],
            &["accounts", "reactivate", "gone@ext.example"][..],
        ] {
            let e = fails(&env, args, 65);
            assert!(e.contains("edit the configuration file"), "{e}");
            assert!(e.contains(env.config.to_str().unwrap()), "{e}");
        }
        let ann = env.json(&["accounts", "show", "ann@acme.example", "--json"]);
        assert_eq!(ann["status"], "active");
        assert_eq!(ann["display_name"], "Ann Acme");
        assert_eq!(
            env.explain("deactivated.eml")["reason"],
            "account_deactivated"
        );
        fails(&env, &["accounts", "deactivate", "nobody@ext.example"], 69);

        // Every change is in the audit log, in order, with the CLI as its reason.
        assert_eq!(
            audit(&env, "olga@outside.example"),
            [
                ("add_account", "account", "added"),
                ("deactivate", "account", "deactivated"),
                ("reactivate", "account", "reactivated"),
                ("rename", "account", "renamed"),
            ]
            .map(|(a, r, o)| (a.to_string(), r.to_string(), o.to_string())),
            "on {backend:?}"
        );
        let entry = &env.json(&["audit", "olga@outside.example", "--json"])[0];
        assert_eq!(entry["reason"], "cli", "{entry}");
        assert!(audit(&env, "ann@acme.example").is_empty());
    }
}

const FIRST: &str = "Return-Path: <olga@outside.example>\r
Authentication-Results: mx.desk.example; spf=pass smtp.mailfrom=outside.example\r
From: Olga <olga@outside.example>\r
To: IT Desk <it@desk.example>\r
Cc: Olga at work <olga@work.example>\r
Subject: Laptop will not boot\r
Date: Mon, 23 Nov 2026 09:00:00 +0100\r
Message-ID: <merge-1@outside.example>\r
\r
It shows a blinking cursor.\r
";

const SECOND: &str = "Return-Path: <dora@ext.example>\r
Authentication-Results: mx.desk.example; spf=pass smtp.mailfrom=ext.example\r
From: Dora <dora@ext.example>\r
To: IT Desk <it@desk.example>\r
Cc: olga@outside.example, olga@work.example\r
Subject: Shared drive is full\r
Date: Mon, 23 Nov 2026 10:00:00 +0100\r
Message-ID: <merge-2@ext.example>\r
\r
Nothing can be saved.\r
";

fn participant_addresses(request: &Value) -> Vec<String> {
    request["participant_list"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["address"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn merge_moves_everything_without_duplicates_and_keeps_the_old_address() {
    let desk = DeskSettings::sharing_any();
    for backend in BACKENDS {
        let env = Env::new(backend, &Site::default(), &desk);
        for (name, text) in [("first.eml", FIRST), ("second.eml", SECOND)] {
            std::fs::write(env.path(name), text).unwrap();
        }
        let first = env.path("first.eml").display().to_string();
        let second = env.path("second.eml").display().to_string();
        ok(&env, &["process", "--json", &first, &second]);
        // Both addresses are on IT-2; olga@outside.example reports IT-1.
        let it1 = env.request("IT-1");
        assert_eq!(it1["reporter"], "olga@outside.example", "{it1}");
        assert_eq!(participant_addresses(&it1), ["olga@work.example"]);
        let it2 = env.request("IT-2");
        assert_eq!(
            participant_addresses(&it2),
            ["olga@outside.example", "olga@work.example"]
        );
        // Memberships on both sides, some shared.
        ok(&env, &["orgs", "add", "Partners"]);
        for args in [
            &["orgs", "add-member", "Partners", "olga@outside.example"][..],
            &["orgs", "add-member", "Partners", "olga@work.example"][..],
            &["orgs", "add-member", "Acme", "olga@outside.example"][..],
            &["desks", "customers", "add", "HR", "olga@outside.example"][..],
            &["desks", "customers", "add", "HR", "olga@work.example"][..],
        ] {
            ok(&env, args);
        }
        let from_before = env.json(&["accounts", "show", "olga@outside.example", "--json"]);

        let report = env.json(&[
            "accounts",
            "merge",
            "olga@outside.example",
            "olga@work.example",
            "--json",
        ]);
        assert_eq!(strs(&report["requests"]), ["IT-1"], "{report}");
        assert_eq!(strs(&report["participations"]), ["IT-2"], "{report}");
        assert_eq!(
            strs(&report["organizations"]),
            ["Acme", "Partners"],
            "{report}"
        );
        assert_eq!(strs(&report["desks"]), ["HR"], "{report}");

        fails(&env, &["accounts", "show", "olga@outside.example"], 69);
        let into = env.json(&["accounts", "show", "olga@work.example", "--json"]);
        assert_eq!(strs(&into["organizations"]), ["Acme", "Partners"], "{into}");
        assert_eq!(strs(&into["desks"]), ["HR", "IT"], "{into}");
        assert_eq!(strs(&into["reported"]), ["IT-1"], "{into}");
        // It reports IT-1 now, so it is no longer a participant of it.
        assert_eq!(strs(&into["participating"]), ["IT-2"], "{into}");
        let it1 = env.request("IT-1");
        assert_eq!(it1["reporter"], "olga@work.example", "{it1}");
        assert!(participant_addresses(&it1).is_empty(), "{it1}");
        assert_eq!(
            participant_addresses(&env.request("IT-2")),
            ["olga@work.example"]
        );
        let by_reporter = env.json(&[
            "requests",
            "list",
            "--reporter",
            "olga@work.example",
            "--json",
        ]);
        assert_eq!(by_reporter.as_array().map(Vec::len), Some(1));

        // The old address keeps its history, and the merge says what it was.
        let from_audit = audit(&env, "olga@outside.example");
        assert!(
            from_audit.len() > 1,
            "the decisions about the old address are gone: {from_audit:?}"
        );
        assert_eq!(
            from_audit
                .last()
                .map(|(a, r, o)| (a.as_str(), r.as_str(), o.as_str())),
            Some(("merge", "merged_from", "merged"))
        );
        assert!(
            audit(&env, "olga@work.example")
                .iter()
                .any(|(a, r, _)| a == "merge" && r == "merged_into")
        );
        assert_eq!(
            from_before["organizations"],
            serde_json::json!(["Acme", "Partners"])
        );

        // Refusals.
        let e = fails(
            &env,
            &[
                "accounts",
                "merge",
                "olga@work.example",
                "olga@work.example",
            ],
            65,
        );
        assert!(e.contains("into itself"), "{e}");
        let e = fails(
            &env,
            &["accounts", "merge", "ann@acme.example", "olga@work.example"],
            65,
        );
        assert!(e.contains("configuration"), "{e}");
        fails(
            &env,
            &[
                "accounts",
                "merge",
                "olga@outside.example",
                "olga@work.example",
            ],
            69,
        );

        // A configured account can receive a merge; its own settings stay.
        let text = ok(
            &env,
            &["accounts", "merge", "olga@work.example", "bea@acme.example"],
        );
        assert!(text.contains("requests reported"), "{text}");
        let bea = env.json(&["accounts", "show", "bea@acme.example", "--json"]);
        assert_eq!(bea["origin"], "config", "{bea}");
        assert_eq!(strs(&bea["reported"]), ["IT-1"], "{bea}");
        assert_eq!(strs(&bea["organizations"]), ["Acme", "Partners"], "{bea}");
    }
}

#[test]
fn orgs_desk_customers_and_agents_survive_a_directory_sync() {
    for backend in BACKENDS {
        let env = Env::new(backend, &Site::default(), &DeskSettings::default());
        let names = |env: &Env| -> Vec<String> {
            env.json(&["orgs", "list", "--json"])
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|o| o["name"].as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        assert_eq!(names(&env), ["Acme", "Other"]);

        // Organizations.
        let org = env.json(&[
            "orgs",
            "add",
            "Partners",
            "--domain",
            "partner.example",
            "--domain",
            "*.partner.example",
            "--desk",
            "HR",
            "--json",
        ]);
        assert_eq!(org["origin"], "cli", "{org}");
        assert_eq!(
            strs(&org["domains"]),
            ["partner.example", "*.partner.example"]
        );
        fails(&env, &["orgs", "add", "Partners"], 65);
        fails(
            &env,
            &["orgs", "add", "Bad", "--domain", "not a domain"],
            65,
        );
        fails(&env, &["orgs", "add", "Bad", "--desk", "NOPE"], 65);
        assert_eq!(names(&env), ["Acme", "Other", "Partners"]);
        let table = ok(&env, &["orgs", "list"]);
        assert!(table.starts_with("NAME"), "{table}");
        assert!(
            table
                .lines()
                .any(|l| l.starts_with("Partners") && l.contains("cli")),
            "{table}"
        );
        // A new account on its domain joins it, and through it becomes an HR customer.
        ok(&env, &["accounts", "add", "pat@sales.partner.example"]);
        let shown = env.json(&["orgs", "show", "Partners", "--json"]);
        assert_eq!(shown["members"], 1, "{shown}");
        assert_eq!(
            shown["member_list"][0]["address"],
            "pat@sales.partner.example"
        );
        fails(&env, &["orgs", "show", "Nope"], 69);
        // Configured organizations and memberships stay as configured.
        let e = fails(&env, &["orgs", "remove", "Acme"], 65);
        assert!(e.contains("edit the configuration file"), "{e}");
        let e = fails(
            &env,
            &["orgs", "remove-member", "Acme", "ann@acme.example"],
            65,
        );
        assert!(e.contains("edit the configuration file"), "{e}");
        ok(
            &env,
            &["orgs", "add-member", "Acme", "pat@sales.partner.example"],
        );
        fails(
            &env,
            &["orgs", "add-member", "Acme", "pat@sales.partner.example"],
            65,
        );
        fails(
            &env,
            &["orgs", "add-member", "Acme", "nobody@ext.example"],
            69,
        );
        ok(
            &env,
            &["orgs", "remove-member", "Acme", "pat@sales.partner.example"],
        );
        fails(
            &env,
            &["orgs", "remove-member", "Acme", "pat@sales.partner.example"],
            69,
        );

        // Desk customers: direct links, and the ones through organizations.
        let customers = |env: &Env, desk: &str| -> Vec<(String, String, String)> {
            env.json(&["desks", "customers", "list", desk, "--json"])
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|c| {
                            (
                                c["address"].as_str().unwrap_or_default().to_string(),
                                c["via"].as_str().unwrap_or_default().to_string(),
                                c["origin"].as_str().unwrap_or_default().to_string(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        let row = |a: &str, v: &str, o: &str| (a.to_string(), v.to_string(), o.to_string());
        assert_eq!(
            customers(&env, "HR"),
            [
                row("pat@sales.partner.example", "organization", "cli"),
                row("vic@ext.example", "direct", "config"),
            ]
        );
        ok(&env, &["accounts", "add", "quinn@ext.example"]);
        ok(
            &env,
            &["desks", "customers", "add", "HR", "quinn@ext.example"],
        );
        fails(
            &env,
            &["desks", "customers", "add", "HR", "quinn@ext.example"],
            65,
        );
        ok(
            &env,
            &[
                "desks",
                "customers",
                "add",
                "HR",
                "pat@sales.partner.example",
            ],
        );
        let still = ok(
            &env,
            &[
                "desks",
                "customers",
                "remove",
                "HR",
                "pat@sales.partner.example",
            ],
        );
        assert!(still.contains("organization Partners"), "{still}");
        let e = fails(
            &env,
            &["desks", "customers", "remove", "HR", "vic@ext.example"],
            65,
        );
        assert!(e.contains("edit the configuration file"), "{e}");
        let e = fails(&env, &["desks", "customers", "list", "NOPE"], 65);
        assert!(e.contains("not configured"), "{e}");
        let table = ok(&env, &["desks", "customers", "list", "IT"]);
        assert!(
            table
                .lines()
                .any(|l| l.starts_with("ann@acme.example") && l.contains("organization Acme")),
            "{table}"
        );

        // Agents.
        ok(
            &env,
            &[
                "agents",
                "add",
                "tom@corp.example",
                "--desk",
                "IT",
                "--name",
                "Tom",
            ],
        );
        fails(
            &env,
            &["agents", "add", "tom@corp.example", "--desk", "IT"],
            65,
        );
        ok(&env, &["agents", "add", "tom@corp.example", "--desk", "HR"]);
        let e = fails(
            &env,
            &["agents", "add", "agnes@corp.example", "--desk", "IT"],
            65,
        );
        assert!(e.contains("edit the configuration file"), "{e}");
        fails(&env, &["agents", "remove", "agnes@corp.example"], 65);
        fails(
            &env,
            &["agents", "add", "hr@desk.example", "--desk", "IT"],
            65,
        );
        let agents = |env: &Env| -> Vec<(String, Vec<String>, String)> {
            env.json(&["agents", "list", "--json"])
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|g| {
                            (
                                g["address"].as_str().unwrap_or_default().to_string(),
                                strs(&g["desks"]),
                                g["origin"].as_str().unwrap_or_default().to_string(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        let agent = |a: &str, d: &[&str], o: &str| {
            (
                a.to_string(),
                d.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                o.to_string(),
            )
        };
        let expected_agents = [
            agent("agnes@corp.example", &["HR", "IT"], "config"),
            agent("tom@corp.example", &["HR", "IT"], "cli"),
        ];
        assert_eq!(agents(&env), expected_agents);

        // The configuration changes (a new organization, so the sync runs): what the
        // CLI made is left alone.
        let mut config = std::fs::read_to_string(&env.config).unwrap();
        config.push_str(
            "\n[[directory.organizations]]\nname = \"Third\"\ndomains = [\"third.example\"]\n",
        );
        std::fs::write(&env.config, config).unwrap();
        assert_eq!(names(&env), ["Acme", "Other", "Partners", "Third"]);
        assert_eq!(agents(&env), expected_agents);
        assert_eq!(
            customers(&env, "HR"),
            [
                row("pat@sales.partner.example", "organization", "cli"),
                row("quinn@ext.example", "direct", "cli"),
                row("vic@ext.example", "direct", "config"),
            ]
        );
        let partners = env.json(&["orgs", "show", "Partners", "--json"]);
        assert_eq!(partners["origin"], "cli", "{partners}");
        assert_eq!(strs(&partners["desks"]), ["HR"], "{partners}");
        assert_eq!(partners["members"], 1, "{partners}");

        // Removing what the CLI made.
        let removed = env.json(&["orgs", "remove", "Partners", "--json"]);
        assert_eq!(strs(&removed["members"]), ["pat@sales.partner.example"]);
        let pat = env.json(&["accounts", "show", "pat@sales.partner.example", "--json"]);
        assert!(strs(&pat["organizations"]).is_empty(), "{pat}");
        ok(&env, &["agents", "remove", "tom@corp.example"]);
        fails(&env, &["agents", "remove", "tom@corp.example"], 69);
        assert_eq!(agents(&env), expected_agents[..1]);

        // And all of it is in the audit log.
        assert_eq!(
            audit(&env, "pat@sales.partner.example"),
            [
                ("add_account", "account", "added"),
                ("add_member", "member:Acme", "added"),
                ("remove_member", "member:Acme", "removed"),
                ("add_customer", "customer", "added"),
                ("remove_customer", "customer", "removed"),
                ("remove_organization", "member:Partners", "removed"),
            ]
            .map(|(a, r, o)| (a.to_string(), r.to_string(), o.to_string()))
        );
        let tom = audit_of(&env, "tom@corp.example", "add_agent");
        let desks: Vec<&str> = tom.iter().filter_map(|e| e["desk"].as_str()).collect();
        assert_eq!(desks, ["IT", "HR"]);
        let tom_removed = audit_of(&env, "tom@corp.example", "remove_agent");
        assert_eq!(tom_removed.len(), 2, "{tom_removed:?}");
        let text = ok(&env, &["audit", "quinn@ext.example"]);
        assert!(
            text.lines()
                .any(|l| l.contains("HR") && l.contains("add_customer (cli)")),
            "{text}"
        );
    }
}

//! The man pages in `man/` (packaged by `cargo deb`) are generated from the same clap
//! definitions as `--help`, so they cannot drift: this test regenerates them and fails
//! when the committed ones differ. `INTAKE_UPDATE_MAN=1 cargo test --test manpages`
//! rewrites them.
//!
//! It also holds `--help` to explaining everything: every command and every option has a
//! description.

use std::collections::BTreeMap;
use std::path::Path;

use clap::CommandFactory;
use intake::cli::Cli;

fn pages(dir: &Path) -> BTreeMap<String, String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "1"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&p).unwrap())
        })
        .collect()
}

#[test]
fn man_pages_match_the_help_text() {
    let tmp = tempfile::tempdir().unwrap();
    clap_mangen::generate_to(Cli::command(), tmp.path()).unwrap();
    let fresh = pages(tmp.path());
    assert!(fresh.contains_key("intake.1") && fresh.contains_key("intake-run.1"));
    assert!(fresh.len() > 30, "one page per command: {:?}", fresh.keys());

    let committed_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("man");
    if std::env::var_os("INTAKE_UPDATE_MAN").is_some() {
        std::fs::create_dir_all(&committed_dir).unwrap();
        for old in pages(&committed_dir).keys() {
            std::fs::remove_file(committed_dir.join(old)).unwrap();
        }
        for (name, text) in &fresh {
            std::fs::write(committed_dir.join(name), text).unwrap();
        }
    }
    let committed = pages(&committed_dir);
    let stale: Vec<_> = fresh
        .iter()
        .filter(|(name, text)| committed.get(*name) != Some(text))
        .map(|(name, _)| name.as_str())
        .chain(
            committed
                .keys()
                .filter(|name| !fresh.contains_key(*name))
                .map(String::as_str),
        )
        .collect();
    assert!(
        stale.is_empty(),
        "man/ is out of date ({stale:?}): run INTAKE_UPDATE_MAN=1 cargo test --test manpages"
    );
}

#[test]
fn every_command_and_option_is_explained() {
    fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
        let path = format!("{path} {}", cmd.get_name());
        if cmd.get_about().is_none() && cmd.get_long_about().is_none() {
            missing.push(format!("{path}: no description"));
        }
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if matches!(id, "help" | "version") || arg.is_hide_set() {
                continue;
            }
            if arg.get_help().is_none() && arg.get_long_help().is_none() {
                missing.push(format!("{path} {id}: no description"));
            }
        }
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            walk(sub, &path, missing);
        }
    }
    let mut cmd = Cli::command();
    cmd.build();
    let mut missing = Vec::new();
    walk(&cmd, "", &mut missing);
    assert!(missing.is_empty(), "{}", missing.join("\n"));
}

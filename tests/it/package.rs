//! The Debian package: `cargo deb` (cargo-deb, installed by `.ci/run`) packs the binary,
//! the systemd unit, the example configuration, the README and a man page per command.
//! The package is unpacked (not installed: a test must not change the machine) and what
//! it holds is run: the binary checks the packaged configuration, the unit points at the
//! packaged binary and passes `systemd-analyze verify`, the man pages render.
//!
//! The binary packed is the one this test run built (`--profile dev --no-build`), so the
//! test costs no release build; `cargo deb` alone makes the release package.

use std::path::Path;
use std::process::Command;

use super::harness::BIN;

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_deb_holds_binary_unit_config_and_man_pages() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("deb");
    let built = Command::new("cargo")
        .args(["deb", "--no-build", "--profile", "dev", "--fast", "--quiet"])
        .arg("--output")
        .arg(&out_dir)
        .current_dir(manifest)
        .output()
        .expect("cargo");
    assert!(
        built.status.success(),
        "cargo deb failed (is cargo-deb installed? `cargo install cargo-deb --locked`): {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let deb = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("a .deb");

    let info = run(Command::new("dpkg-deb").arg("--info").arg(&deb));
    assert!(info.contains("Package: intake"), "{info}");
    assert!(info.contains("Section: mail"), "{info}");
    let listing = run(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    for path in [
        "./usr/bin/intake",
        "./usr/lib/systemd/system/intake.service",
        "./usr/share/doc/intake/config.example.toml",
        "./usr/share/doc/intake/README.md",
        "./usr/share/man/man1/intake.1",
        "./usr/share/man/man1/intake-run.1",
        "./usr/share/man/man1/intake-accounts-merge.1",
        "./usr/share/man/man1/intake-simulate.1",
    ] {
        assert!(
            listing.lines().any(|l| l.contains(path)),
            "{path} is not in the package:\n{listing}"
        );
    }
    // Installing must not start a service that has no configuration yet.
    let control = tmp.path().join("control");
    run(Command::new("dpkg-deb")
        .arg("--control")
        .arg(&deb)
        .arg(&control));
    let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
    assert!(postinst.contains("daemon-reload"), "{postinst}");
    assert!(
        !postinst.contains("deb-systemd-invoke start"),
        "the package starts the service on install:\n{postinst}"
    );

    let root = tmp.path().join("root");
    run(Command::new("dpkg-deb")
        .arg("--extract")
        .arg(&deb)
        .arg(&root));
    let bin = root.join("usr/bin/intake");
    let version = run(Command::new(&bin).arg("--version"));
    assert!(version.starts_with("intake "), "{version}");
    assert_eq!(version, run(Command::new(BIN).arg("--version")));
    let checked = run(Command::new(&bin)
        .arg("check-config")
        .arg("--config")
        .arg(root.join("usr/share/doc/intake/config.example.toml"))
        .env_remove("CONFIGURATION_DIRECTORY"));
    assert!(checked.starts_with("OK"), "{checked}");

    let unit_path = root.join("usr/lib/systemd/system/intake.service");
    let unit = std::fs::read_to_string(&unit_path).unwrap();
    for line in unit.lines().filter(|l| l.starts_with("Exec")) {
        let program = line
            .split_once('=')
            .unwrap()
            .1
            .split_whitespace()
            .next()
            .unwrap();
        let program = program.trim_start_matches(['-', '@', '+', '!']);
        let packaged = root.join(program.trim_start_matches('/'));
        assert!(
            packaged.is_file() || Path::new(program).is_file(),
            "{line}: {program} is neither in the package nor on the system"
        );
    }
    // The unit file itself, as systemd reads it (the binary it names is the packaged one,
    // so verify a copy pointing at it).
    let copy = tmp.path().join("intake.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/bin/intake", &bin.display().to_string()),
    )
    .unwrap();
    let verify = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .expect("systemd-analyze");
    let complaints = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success()
            && !complaints.contains("intake.service:")
            && !complaints.contains("Unknown"),
        "systemd-analyze verify: {complaints}"
    );

    // The man pages are roff that renders: the command list of intake(1) and the options
    // of a subcommand appear in the output.
    let man1 = root.join("usr/share/man/man1");
    let page = |name: &str| {
        let gz = man1.join(format!("{name}.1.gz"));
        let plain = man1.join(format!("{name}.1"));
        let text = if gz.is_file() {
            run(Command::new("gzip").arg("-dc").arg(&gz))
        } else {
            std::fs::read_to_string(&plain).unwrap()
        };
        assert!(text.contains(".TH"), "{name}: {text}");
        // roff escapes hyphens.
        text.replace("\\-", "-")
    };
    let main = page("intake");
    for command in ["run", "check-config", "simulate", "import", "audit"] {
        assert!(main.contains(command), "intake(1) lists {command}");
    }
    let merge = page("intake-accounts-merge");
    assert!(merge.contains("The account that stays"), "{merge}");
}

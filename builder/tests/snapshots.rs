//! Snapshot tests of the `nodeflash` command line: the `--help` of every
//! command and subcommand, and the errors people meet first (an unknown
//! profile, a bad profile with its file:line:column and key, bad usage).
//!
//! Each case runs the built binary and compares its exit code, stdout and
//! stderr with `builder/tests/snapshots/NAME.txt`. After an intended change,
//! rewrite the files and review the diff:
//!
//! ```sh
//! UPDATE_SNAPSHOTS=1 cargo test -p nodeflash-builder --test snapshots
//! git diff builder/tests/snapshots
//! ```
//!
//! The commands are taken from the command line's definition, so a new
//! subcommand without a snapshot fails, and so does a snapshot file that no
//! case writes. The output does not depend on the terminal: clap is built
//! without `wrap_help` (a fixed width), stdout and stderr are pipes (no
//! colour), and every path in the cases is relative.

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::CommandFactory;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the builder is in the workspace")
        .to_path_buf()
}

fn snapshot_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots")
}

/// One run of `nodeflash ARGS` in `cwd`.
struct Case {
    name: String,
    args: Vec<String>,
    cwd: PathBuf,
}

impl Case {
    fn new(name: &str, args: &[&str], cwd: &Path) -> Self {
        Case {
            name: name.to_string(),
            args: args.iter().map(|a| a.to_string()).collect(),
            cwd: cwd.to_path_buf(),
        }
    }

    /// What the snapshot holds: the command, its exit code and its output.
    fn run(&self) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_nodeflash"))
            .args(&self.args)
            .current_dir(&self.cwd)
            .env("COLUMNS", "100")
            .env("NO_COLOR", "1")
            .env_remove("CLICOLOR_FORCE")
            .output()
            .expect("nodeflash runs");
        format!(
            "$ {}\nexit: {}\n--- stdout\n{}--- stderr\n{}",
            std::iter::once("nodeflash")
                .chain(self.args.iter().map(String::as_str))
                .collect::<Vec<_>>()
                .join(" "),
            out.status
                .code()
                .map_or("signal".to_string(), |c| c.to_string()),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

/// Every command path of the command line, from its definition: `[]`,
/// `["build"]`, `["profile", "show"]`, …
fn command_paths(cmd: &clap::Command, prefix: &[String], out: &mut Vec<Vec<String>>) {
    out.push(prefix.to_vec());
    for sub in cmd.get_subcommands() {
        if sub.get_name() == "help" {
            continue;
        }
        let mut path = prefix.to_vec();
        path.push(sub.get_name().to_string());
        command_paths(sub, &path, out);
    }
}

fn help_cases() -> Vec<Case> {
    let mut paths = Vec::new();
    command_paths(&nodeflash_builder::cli::Cli::command(), &[], &mut paths);
    paths
        .iter()
        .map(|path| {
            let mut name = vec!["help", "nodeflash"];
            name.extend(path.iter().map(String::as_str));
            let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
            args.push("--help");
            Case::new(&name.join("-"), &args, &repo())
        })
        .collect()
}

/// A directory with one valid and two invalid profiles.
fn bad_profiles() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("bad.toml"),
        "name = \"bad\"\n[disk]\nselect = { serial = \"X\" }\nesp-size = \"lots\"\n[pool]\n",
    )
    .expect("write bad.toml");
    // A value `zpool create` refuses (issue 16): refused at build time.
    std::fs::write(
        dir.path().join("ashift.toml"),
        "name = \"ashift\"\n[disk]\nselect = { serial = \"X\" }\n[pool]\noptions = { ashift = \"99\" }\n",
    )
    .expect("write ashift.toml");
    std::fs::write(
        dir.path().join("good.toml"),
        "name = \"good\"\n[disk]\nselect = { serial = \"S1\" }\n[pool]\n",
    )
    .expect("write good.toml");
    std::fs::create_dir(dir.path().join("empty")).expect("an empty directory");
    dir
}

fn error_cases(profiles: &Path) -> Vec<Case> {
    let repo = repo();
    vec![
        Case::new(
            "error-unknown-profile",
            &["profile", "show", "nosuch"],
            &repo,
        ),
        Case::new(
            "error-unknown-profile-plan",
            &["plan", "--profile", "nosuch", "--machine", "node.json"],
            &repo,
        ),
        Case::new(
            "error-missing-facts",
            &[
                "plan",
                "--profile",
                "alrest",
                "--machine",
                "no-such-facts.json",
            ],
            &repo,
        ),
        Case::new(
            "error-bad-profile",
            &["profile", "show", "bad.toml"],
            profiles,
        ),
        Case::new(
            "error-bad-profile-check",
            &["profile", "check", "--profiles-dir", "."],
            profiles,
        ),
        Case::new(
            "error-bad-profile-check-json",
            &["profile", "check", "--profiles-dir", ".", "--json"],
            profiles,
        ),
        Case::new(
            "usage-missing-argument",
            &["build", "--profile", "alrest"],
            &repo,
        ),
        Case::new("usage-unknown-command", &["frobnicate"], &repo),
        Case::new(
            "usage-unknown-flag",
            &["profile", "show", "alrest", "--yaml"],
            &repo,
        ),
        Case::new("usage-no-command", &[], &repo),
        // Outside the repository: `profiles` is not there.
        Case::new(
            "error-no-profiles-dir",
            &["profile", "show", "alrest"],
            &profiles.join("empty"),
        ),
        Case::new(
            "error-no-profiles-dir-check",
            &["profile", "check"],
            &profiles.join("empty"),
        ),
        // What people type: named profiles, a path, and --json.
        Case::new(
            "profile-check-files",
            &["profile", "check", "alrest", "./profiles/qemu.toml"],
            &repo,
        ),
        Case::new(
            "error-profile-check-file",
            &[
                "profile",
                "check",
                "--profiles-dir",
                ".",
                "good",
                "bad.toml",
            ],
            profiles,
        ),
    ]
}

/// Compares (or with `UPDATE_SNAPSHOTS=1`, writes) the snapshots of `cases`.
fn check(cases: &[Case]) {
    let update = std::env::var_os("UPDATE_SNAPSHOTS").is_some_and(|v| v == "1");
    let dir = snapshot_dir();
    std::fs::create_dir_all(&dir).expect("snapshot directory");
    let mut failed = Vec::new();
    for case in cases {
        let got = case.run();
        let path = dir.join(format!("{}.txt", case.name));
        if update {
            std::fs::write(&path, &got).expect("write snapshot");
            continue;
        }
        match std::fs::read_to_string(&path) {
            Ok(want) if want == got => {}
            Ok(want) => failed.push(format!(
                "{} differs\n=== snapshot\n{want}=== now\n{got}",
                path.display()
            )),
            Err(_) => failed.push(format!("{} is missing; now:\n{got}", path.display())),
        }
    }
    assert!(
        failed.is_empty(),
        "{}\n\nIf the change is intended: UPDATE_SNAPSHOTS=1 cargo test -p nodeflash-builder --test snapshots",
        failed.join("\n")
    );
}

#[test]
fn help_of_every_command() {
    let cases = help_cases();
    assert!(cases.len() >= 12, "{} commands", cases.len());
    check(&cases);
}

#[test]
fn errors_and_bad_usage() {
    let profiles = bad_profiles();
    check(&error_cases(profiles.path()));
}

#[test]
fn exit_codes_are_the_documented_ones() {
    let profiles = bad_profiles();
    for case in error_cases(profiles.path()) {
        let text = case.run();
        let want = if case.name.starts_with("usage-") {
            "exit: 2\n"
        } else if case.name.starts_with("error-") {
            "exit: 1\n"
        } else {
            "exit: 0\n"
        };
        assert!(text.contains(want), "{}: {text}", case.name);
    }
    for case in help_cases() {
        let text = case.run();
        assert!(text.contains("exit: 0\n"), "{}: {text}", case.name);
        assert!(
            text.contains("Examples:\n  ")
                && text.contains("Exit status: 0 ")
                && text.contains(", 2 bad usage"),
            "{} has no examples or exit status: {text}",
            case.name
        );
    }
}

#[test]
fn every_snapshot_file_belongs_to_a_case() {
    let profiles = bad_profiles();
    let names: Vec<String> = help_cases()
        .into_iter()
        .chain(error_cases(profiles.path()))
        .map(|c| format!("{}.txt", c.name))
        .collect();
    let Ok(entries) = std::fs::read_dir(snapshot_dir()) else {
        return;
    };
    let stale: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !names.contains(n))
        .collect();
    assert!(
        stale.is_empty(),
        "snapshot files no case writes (remove them): {stale:?}"
    );
}

//! The stand-in flake (`tests/fixtures/flake`), set up for real Nix: copied
//! into a directory with Debian's static busybox and the NixOS module
//! `nodeflash nixos-module` generates from a profile, as a git repository
//! with every file added (Nix sees only those).

use std::path::{Path, PathBuf};
use std::process::Command;

/// `tests/fixtures/flake`.
pub fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/flake")
}

fn run(c: &mut Command) -> String {
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("cannot run {c:?}: {e}"));
    assert!(
        out.status.success(),
        "{c:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Writes the flake into `dir` for `profile` and returns `dir`.
pub fn standin_flake(dir: &Path, profile: &nodeflash_installer::profile::Profile) -> PathBuf {
    std::fs::create_dir_all(dir.join("bb")).expect("mkdir");
    std::fs::copy(fixture().join("flake.nix"), dir.join("flake.nix")).expect("flake.nix");
    std::fs::copy("/bin/busybox", dir.join("bb/busybox"))
        .expect("/bin/busybox (package busybox-static)");
    std::fs::write(
        dir.join("nodeflash.nix"),
        nodeflash_installer::nixos::flake_module(profile, "the test's profile"),
    )
    .expect("nodeflash.nix");
    let git = |args: &[&str]| {
        run(Command::new("git")
            .args(["-c", "user.name=t", "-c", "user.email=t@t"])
            .args(args)
            .current_dir(dir))
    };
    git(&["init", "-q"]);
    git(&["add", "-A"]);
    dir.to_path_buf()
}

/// `nix-store ARGS` on the host.
pub fn nix_store(args: &[&str]) -> String {
    run(Command::new("nix-store").args(args))
}

/// `nix-instantiate --eval --strict --json FILE -A ATTR`, parsed.
pub fn eval(file: &Path, attr: &str) -> serde_json::Value {
    let out = run(Command::new("nix-instantiate")
        .args(["--eval", "--strict", "--json"])
        .arg(file)
        .args(["-A", attr]));
    serde_json::from_str(&out).expect("nix-instantiate prints JSON")
}

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
    standin_flake_with(dir, profile, None)
}

/// [`standin_flake`] whose systems boot and hold a Nix: with `iso`, the
/// flake also gets `boot/` (the check system's kernel and initrd and
/// systemd-boot, from that image) and `nixbin/` (the host's Debian Nix and
/// the libraries it loads, see [`copy_nix`]).
pub fn standin_flake_with(
    dir: &Path,
    profile: &nodeflash_installer::profile::Profile,
    iso: Option<&Path>,
) -> PathBuf {
    if let Some(iso) = iso {
        let boot = dir.join("boot");
        crate::check_system(iso, &boot);
        crate::systemd_boot_of(iso, &boot.join("systemd-bootx64.efi"));
        copy_nix(&dir.join("nixbin"));
    }
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

/// Copies the host's `nix` (Debian's nix-bin, dynamically linked) into
/// `dir` with every library `ldd` lists, under their sonames, into
/// `dir/lib` (the dynamic loader as `lib/ld-linux-x86-64.so.2`).
pub fn copy_nix(dir: &Path) {
    let nix = run(Command::new("sh").args(["-c", "command -v nix"]));
    let nix = std::fs::canonicalize(nix.trim()).expect("nix (package nix-bin)");
    let lib = dir.join("lib");
    std::fs::create_dir_all(&lib).expect("mkdir");
    std::fs::copy(&nix, dir.join("nix")).expect("copy nix");
    let ldd = run(Command::new("ldd").arg(&nix));
    for line in ldd.lines() {
        let line = line.trim();
        // `libfoo.so.1 => /lib/…/libfoo.so.1 (0x…)` or `/lib64/ld-linux-x86-64.so.2 (0x…)`
        let (name, path) = match line.split_once(" => ") {
            Some((name, rest)) => (name.to_string(), rest.split(' ').next().unwrap_or("")),
            None => {
                let path = line.split(' ').next().unwrap_or("");
                let name = Path::new(path)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                (name, path)
            }
        };
        if !path.starts_with('/') {
            continue; // linux-vdso.so.1
        }
        std::fs::copy(path, lib.join(&name)).unwrap_or_else(|e| panic!("copy {path}: {e}"));
    }
    assert!(
        lib.join("ld-linux-x86-64.so.2").is_file(),
        "ldd {} lists no ld-linux-x86-64.so.2",
        nix.display()
    );
}

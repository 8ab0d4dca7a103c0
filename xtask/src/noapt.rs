//! The build with the host's `apt` and `dpkg` hidden (issue 21): a private
//! mount namespace masks their programs with a stub that fails and puts an
//! empty directory over `/etc/apt`; the mirror then comes from the
//! environment. The ISO it builds from the same lock must be byte-identical
//! to the ordinary build's. A build without a mirror and one from a lock
//! with a wrong sha256 must each fail with their message.
//!
//! What is reused: the compiled ZFS modules (cache entry `zfs-modules`,
//! keyed by the sha256 of the headers, of `zfs-dkms` and the compiler's
//! version) are copied from the ordinary cache, since compiling them takes
//! minutes and does not touch apt or dpkg. Everything else, the package
//! lists, every `.deb`, their unpacked trees, the initramfs, the EFI image
//! and the ISO, is made again in an empty cache.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use nodeflash_builder::cache::{sha256_file, Cache};
use nodeflash_builder::steps;

/// The programs masked.
const HIDDEN: &[&str] = &[
    "apt",
    "apt-get",
    "apt-cache",
    "apt-config",
    "dpkg",
    "dpkg-deb",
    "dpkg-query",
];

/// Runs `argv` in a private mount namespace where [`HIDDEN`] fail and
/// `/etc/apt` is empty; a user namespace too when not root. The wrapper
/// first checks that `apt-get` and `dpkg-deb` really fail.
fn hidden(work: &Path, argv: &[&std::ffi::OsStr]) -> Result<Command> {
    let stub = work.join("hidden-stub");
    std::fs::write(
        &stub,
        "#!/bin/sh\necho \"$0 is hidden by nodeflash's no-apt test\" >&2\nexit 127\n",
    )
    .with_context(|| format!("cannot write {}", stub.display()))?;
    let script = format!(
        r#"set -e
stub="$1"; shift
for p in {programs}; do
  for d in /usr/bin /bin /usr/sbin /sbin /usr/local/bin; do
    if [ -e "$d/$p" ]; then mount --bind "$stub" "$d/$p"; fi
  done
done
mkdir -p /etc/apt
mount -t tmpfs nodeflash-no-apt /etc/apt
if apt-get --version >/dev/null 2>&1 || dpkg-deb --version >/dev/null 2>&1; then
  echo "apt-get or dpkg-deb still runs: the namespace hides nothing" >&2
  exit 1
fi
exec "$@"
"#,
        programs = HIDDEN.join(" ")
    );
    let mut c = Command::new("unshare");
    if !super::is_root() {
        c.arg("--user").arg("--map-root-user");
    }
    c.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
        "sh",
    ])
    .arg(&stub)
    .args(argv);
    c.env_remove("NODEFLASH_DEBIAN_MIRROR")
        .env_remove("NODEFLASH_DEBIAN_SECURITY_MIRROR");
    Ok(c)
}

/// Runs `c` and returns (success, stderr), its output also shown.
fn run(c: &mut Command) -> Result<(bool, String)> {
    let out = c.output().with_context(|| format!("cannot run {c:?}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    eprint!("{stderr}");
    Ok((out.status.success(), stderr))
}

/// The check: the hidden-apt build of profile `qemu` against the ordinary
/// one at `ordinary_iso`, then the two refusals.
pub fn check(ordinary_iso: &Path, installer: &Path) -> Result<()> {
    let nodeflash = super::build_nodeflash()?;
    let work = super::target_dir().join("no-apt");
    if work.exists() {
        std::fs::remove_dir_all(&work)
            .with_context(|| format!("cannot remove {}", work.display()))?;
    }
    let cache = work.join("cache");
    std::fs::create_dir_all(&cache)
        .with_context(|| format!("cannot create {}", cache.display()))?;
    let shared = Cache::from_env()?;
    let modules = shared.root().join("zfs-modules");
    if modules.is_dir() {
        super::run_visible(Command::new("cp").arg("-a").arg(&modules).arg(&cache))?;
    }
    let mirrors = nodeflash_builder::debian::configured_mirrors()
        .context("the no-apt build needs the mirror the ordinary build used")?;
    let profiles = super::root().join("profiles");
    let out_dir = work.join("out");
    let os = |s: &Path| s.as_os_str().to_owned();
    let build_argv = |profile: &Path, out: &Path| {
        vec![
            os(&nodeflash),
            "build".into(),
            "--profile".into(),
            os(profile),
            "--installer".into(),
            os(installer),
            "--out-dir".into(),
            os(out),
            "--locked".into(),
        ]
    };

    // 1. The build, with the mirror from the environment.
    let argv = build_argv(&profiles.join("qemu.toml"), &out_dir);
    let refs: Vec<&std::ffi::OsStr> = argv.iter().map(|s| s.as_os_str()).collect();
    let mut c = hidden(&work, &refs)?;
    c.env("NODEFLASH_CACHE", &cache);
    for (var, uri) in &mirrors {
        c.env(var, uri);
    }
    let started = std::time::Instant::now();
    let (ok, _) = steps::step(
        "Building profile qemu with apt and dpkg hidden (empty cache but the ZFS modules)",
        || run(&mut c),
    )?;
    if !ok {
        bail!("the build with apt and dpkg hidden failed (its output is above)");
    }
    let iso = out_dir.join("qemu.iso");
    let (a, b) = (sha256_file(ordinary_iso)?, sha256_file(&iso)?);
    if a != b {
        bail!(
            "the ISO built with apt and dpkg hidden ({}, sha256 {b}) differs from the ordinary \
             build's ({}, sha256 {a})",
            iso.display(),
            ordinary_iso.display()
        );
    }
    steps::note(&format!(
        "no-apt build: {} is byte-identical to {} (sha256 {a}, {} bytes), built in {:.0?}",
        iso.display(),
        ordinary_iso.display(),
        std::fs::metadata(&iso).map(|m| m.len()).unwrap_or(0),
        started.elapsed()
    ));

    // 2. No mirror: neither the environment nor /etc/apt names one.
    let empty = work.join("cache-no-mirror");
    let mut c = hidden(&work, &refs)?;
    c.env("NODEFLASH_CACHE", &empty);
    let (ok, stderr) = steps::step("Building with no mirror configured", || run(&mut c))?;
    let want = "no Debian mirror configured: set NODEFLASH_DEBIAN_MIRROR";
    if ok || !stderr.contains(want) {
        bail!("a build with no mirror did not fail with `{want}…`");
    }

    // 3. A lock whose sha256 of one package is wrong.
    let tampered = work.join("tampered");
    std::fs::create_dir_all(&tampered)
        .with_context(|| format!("cannot create {}", tampered.display()))?;
    std::fs::copy(profiles.join("qemu.toml"), tampered.join("qemu.toml"))
        .context("cannot copy profiles/qemu.toml")?;
    let lock = std::fs::read_to_string(profiles.join("inputs.lock"))
        .context("cannot read profiles/inputs.lock")?;
    let (name, sha) = tamper_target(&lock)?;
    let wrong = "0".repeat(64);
    std::fs::write(tampered.join("inputs.lock"), lock.replace(&sha, &wrong))
        .context("cannot write the tampered lock")?;
    let argv = build_argv(&tampered.join("qemu.toml"), &tampered.join("out"));
    let refs: Vec<&std::ffi::OsStr> = argv.iter().map(|s| s.as_os_str()).collect();
    let mut c = hidden(&work, &refs)?;
    c.env("NODEFLASH_CACHE", &cache);
    for (var, uri) in &mirrors {
        c.env(var, uri);
    }
    let (ok, stderr) = steps::step(
        &format!("Building from a lock with a wrong sha256 for {name}"),
        || run(&mut c),
    )?;
    let want = format!(
        "but {} pins {wrong}: refusing it",
        tampered.join("inputs.lock").display()
    );
    if ok || !stderr.contains(&want) || !stderr.contains(&name) {
        bail!("a build from a tampered lock did not fail with `…{name}…{want}`");
    }
    Ok(())
}

/// The package of `lock` (TOML) whose sha256 the tampering test changes:
/// `libkeyutils1`, small and pinned in every lock.
fn tamper_target(lock: &str) -> Result<(String, String)> {
    let name = "libkeyutils1";
    let at = lock
        .find(&format!("name = \"{name}\""))
        .with_context(|| format!("profiles/inputs.lock pins no {name}"))?;
    let sha = lock[at..]
        .lines()
        .find_map(|l| l.strip_prefix("sha256 = \""))
        .and_then(|l| l.strip_suffix('"'))
        .with_context(|| format!("profiles/inputs.lock has no sha256 for {name}"))?;
    Ok((name.to_string(), sha.to_string()))
}

/// Where the ordinary build of profile `qemu` writes its ISO.
pub fn ordinary_iso() -> PathBuf {
    super::target_dir().join("nodeflash/qemu.iso")
}

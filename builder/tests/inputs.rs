//! The inputs lock records; it does not block (issue 15). A lock whose pin
//! Debian has dropped, `linux-kbuild-6.1` 6.1.192-2 as it happened, builds
//! by re-pinning that package from today's archive, and `--locked` refuses
//! it with the command that fixes it. Needs the network (Debian's archive),
//! the installer and the filled cache of `cargo xtask test`.

use std::path::Path;
use std::process::{Command, Output};

use nodeflash_builder::cache::{sha256_file, Cache};
use nodeflash_builder::inputs::Lock;

/// The pin that Debian replaced a week after it was written: a real
/// package's old version and the sha256 that version had.
const STALE_NAME: &str = "linux-kbuild-6.1";
const STALE_VERSION: &str = "6.1.192-2";
const STALE_SHA256: &str = "7e852381f1c455a439230ea3261e3669f2307afdbed57db0fc08ed8ffa689f60";

fn nodeflash(profile: &Path, installer: &Path, cache: &Path, locked: bool) -> Output {
    let out_dir = profile.with_file_name("out");
    let mut c = Command::new(env!("CARGO_BIN_EXE_nodeflash"));
    c.arg("build")
        .arg("--profile")
        .arg(profile)
        .arg("--installer")
        .arg(installer)
        .arg("--out-dir")
        .arg(&out_dir)
        .env("NODEFLASH_CACHE", cache);
    if locked {
        c.arg("--locked");
    }
    let out = c.output().expect("nodeflash runs");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    out
}

/// A cache that holds everything of `shared` but the `.deb` files of
/// `package`, and no package lists: what a machine sees that built before
/// the pin went stale, minus that package (so it must come from the
/// archive), without compiling OpenZFS again.
fn cache_without(shared: &Path, into: &Path, lock: &Lock, package: &str) {
    let dropped: Vec<String> = lock
        .debian
        .iter()
        .flat_map(|d| &d.packages)
        .filter(|p| p.name == package)
        .map(|p| format!("{}.deb", p.sha256))
        .chain([format!("{STALE_SHA256}.deb")])
        .collect();
    std::fs::create_dir_all(into.join("debs")).expect("cache dir");
    for entry in std::fs::read_dir(shared).expect("shared cache").flatten() {
        let name = entry.file_name();
        match name.to_str() {
            Some("debs") => {
                for deb in std::fs::read_dir(entry.path()).expect("debs").flatten() {
                    let n = deb.file_name().to_string_lossy().into_owned();
                    if !dropped.contains(&n) && !n.starts_with('.') {
                        std::os::unix::fs::symlink(deb.path(), into.join("debs").join(&n))
                            .expect("link a .deb");
                    }
                }
            }
            // apt's lists of the old builder, and the package indices
            // (fetched again from the signed InRelease of today)
            Some("apt" | "debian-index") => {}
            _ => std::os::unix::fs::symlink(entry.path(), into.join(&name)).expect("link"),
        }
    }
}

#[test]
fn a_stale_pin_is_repinned_by_a_build_and_refused_with_locked() {
    let Some(installer) = std::env::var_os("NODEFLASH_TEST_INSTALLER") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "NODEFLASH_TEST_INSTALLER is not set: run the tests with `cargo xtask test`"
        );
        eprintln!("skipped: NODEFLASH_TEST_INSTALLER is not set (`cargo xtask test` sets it)");
        return;
    };
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let t = tempfile::tempdir().expect("tempdir");
    let profile = t.path().join("lab/alrest.toml");
    std::fs::create_dir_all(profile.parent().expect("dir")).expect("mkdir");
    std::fs::copy(repo.join("profiles/alrest.toml"), &profile).expect("copy the profile");

    let current = Lock::load(&repo.join("profiles/inputs.lock")).expect("the lock");
    let mut stale = current.clone();
    let pin = stale
        .debian
        .as_mut()
        .and_then(|d| d.packages.iter_mut().find(|p| p.name == STALE_NAME))
        .expect("the lock pins linux-kbuild-6.1");
    pin.version = STALE_VERSION.into();
    pin.sha256 = STALE_SHA256.into();
    let lock_path = t.path().join("lab/inputs.lock");
    stale.save(&lock_path).expect("write the stale lock");
    let stale_text = std::fs::read_to_string(&lock_path).expect("read");

    let cache = t.path().join("cache");
    let shared = Cache::from_env().expect("cache");
    cache_without(shared.root(), &cache, &current, STALE_NAME);

    // --locked: refused, with the command that fixes it, the lock untouched.
    let out = nodeflash(&profile, Path::new(&installer), &cache, true);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "--locked built with a stale pin");
    for want in [
        "cannot download linux-kbuild-6.1 6.1.192-2 pinned in",
        "Debian no longer publishes that version",
        "--locked forbids re-pinning",
        "run `cargo xtask update-inputs --profile",
    ] {
        assert!(err.contains(want), "no {want:?} in:\n{err}");
    }
    assert_eq!(
        std::fs::read_to_string(&lock_path).expect("read"),
        stale_text
    );

    // The default: re-pinned from today's archive, said in one line, the
    // lock rewritten, the new .deb checked and cached, the image built.
    let out = nodeflash(&profile, Path::new(&installer), &cache, false);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the build failed:\n{err}");
    let line = err
        .lines()
        .find(|l| l.contains("inputs: linux-kbuild-6.1 6.1.192-2 → "))
        .unwrap_or_else(|| panic!("no re-pin line in:\n{err}"));
    assert!(
        line.ends_with("(the pinned version is no longer published)"),
        "{line}"
    );
    let repinned = Lock::load(&lock_path).expect("the rewritten lock");
    let (old, new) = (
        stale.debian.as_ref().expect("debian"),
        repinned.debian.as_ref().expect("debian"),
    );
    assert_eq!(
        new.kernel_release, old.kernel_release,
        "the kernel ABI moved"
    );
    for (o, n) in old.packages.iter().zip(&new.packages) {
        if o.name == STALE_NAME {
            assert_eq!(n.name, STALE_NAME);
            assert_ne!(n.version, STALE_VERSION);
            assert_ne!(n.sha256, STALE_SHA256);
            let deb = cache.join("debs").join(format!("{}.deb", n.sha256));
            assert!(
                !deb.is_symlink(),
                "{} was not fetched from the archive",
                deb.display()
            );
            assert_eq!(sha256_file(&deb).expect("the fetched .deb"), n.sha256);
            assert!(line.contains(&format!("→ {} (", n.version)), "{line}");
        } else {
            assert_eq!(o, n, "a pin that was still published changed");
        }
    }
    let summary: serde_json::Value = serde_json::from_slice(
        &std::fs::read(t.path().join("lab/out/alrest.json")).expect("the summary"),
    )
    .expect("JSON");
    let kbuild = &new
        .packages
        .iter()
        .find(|p| p.name == STALE_NAME)
        .expect("pin");
    assert!(
        summary["packages"]
            .as_array()
            .expect("packages")
            .iter()
            .any(|p| p["name"] == STALE_NAME && p["version"] == kbuild.version.as_str()),
        "the summary does not name {} {}",
        kbuild.name,
        kbuild.version
    );

    // Now in the cache: --locked builds it as pinned.
    let out = nodeflash(&profile, Path::new(&installer), &cache, true);
    assert!(out.status.success(), "--locked with a current lock failed");
}

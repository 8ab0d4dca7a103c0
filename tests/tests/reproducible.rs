//! Same inputs, same ISO bytes: the `qemu` image rebuilt from the cached
//! inputs (initramfs, EFI image and ISO written anew) equals the first build.

use nodeflash_builder::build::{build, BuildOptions};
use nodeflash_builder::cache::Cache;
use nodeflash_tests::{env_path, images_dir};

#[test]
fn rebuilding_gives_identical_iso_bytes() {
    let first = images_dir().join("qemu.iso.sha256");
    let first = std::fs::read_to_string(&first)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", first.display()));
    let out = tempfile::tempdir().expect("tempdir");
    let profiles = env_path("NODEFLASH_PROFILES");
    let installer = env_path("NODEFLASH_TEST_INSTALLER");
    let summary = build(&BuildOptions {
        profile: profiles.join("qemu.toml"),
        installer,
        out_dir: out.path().to_path_buf(),
        cache: Cache::from_env().expect("cache"),
        reuse_artifacts: false,
        lock_mode: nodeflash_builder::inputs::LockMode::Locked,
    })
    .expect("rebuild");
    assert_eq!(
        first.split_whitespace().next(),
        Some(summary.iso_sha256.as_str()),
        "the rebuilt ISO differs"
    );
}

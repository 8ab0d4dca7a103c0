//! Same inputs, same ISO bytes: the `qemu` image rebuilt from the cached
//! inputs (initramfs, EFI image and ISO written anew) equals the first build.

use std::path::PathBuf;

use nodeflash_builder::build::{build, BuildOptions};
use nodeflash_builder::cache::Cache;
use nodeflash_tests::images_dir;

#[test]
fn rebuilding_gives_identical_iso_bytes() {
    let first = images_dir().join("qemu.iso.sha256");
    let first = std::fs::read_to_string(&first)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", first.display()));
    let out = tempfile::tempdir().expect("tempdir");
    let profiles = PathBuf::from(
        std::env::var_os("NODEFLASH_PROFILES")
            .expect("NODEFLASH_PROFILES is set by cargo xtask test"),
    );
    let installer = PathBuf::from(
        std::env::var_os("NODEFLASH_TEST_INSTALLER")
            .expect("NODEFLASH_TEST_INSTALLER is set by cargo xtask test"),
    );
    let summary = build(&BuildOptions {
        profile: profiles.join("qemu.toml"),
        installer,
        out_dir: out.path().to_path_buf(),
        cache: Cache::from_env().expect("cache"),
        reuse_artifacts: false,
    })
    .expect("rebuild");
    assert_eq!(
        first.split_whitespace().next(),
        Some(summary.iso_sha256.as_str()),
        "the rebuilt ISO differs"
    );
}

//! The images carry nothing of the build host: its home and user, the
//! repository's and the cache's absolute paths, its host name, secret-looking
//! environment values and SSH private keys are searched for in every layer
//! of the built ISOs, decompressed (see `nodeflash_tests::scan`).

use std::path::Path;

use nodeflash_tests::images_dir;
use nodeflash_tests::scan::{host_needles, Scanner};

/// The repository (the tests crate's parent directory).
fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is in the repository")
}

fn scan(name: &str) {
    let iso = images_dir().join(name);
    assert!(
        iso.is_file(),
        "{} is missing: build it with `cargo xtask build-iso`",
        iso.display()
    );
    let scratch = tempfile::tempdir().expect("tempdir");
    let mut s = Scanner::new(host_needles(repo()));
    let needles: Vec<String> = s.needles().map(|n| n.what.clone()).collect();
    eprintln!("{name}: searching for {}", needles.join("; "));
    s.iso(&iso, scratch.path())
        .unwrap_or_else(|e| panic!("cannot read {}: {e:#}", iso.display()));
    eprintln!("{name}: {} layers read", s.layers.len());

    // Every layer was reached: a skipped layer would hide a leak.
    for (layer, why) in [
        (format!("{name}:/nodeflash/profile.toml"), "ISO9660 files"),
        (format!("{name} › ESP:/nodeflash/initrd.zst"), "ESP files"),
        (
            format!("{name} › ESP:/nodeflash/initrd.zst › zstd › cpio:/init"),
            "the initramfs",
        ),
    ] {
        assert!(
            s.layers.contains(&layer),
            "{why} were not read: no layer {layer:?}"
        );
    }
    assert!(
        s.unreadable.is_empty(),
        "layers that could not be read:\n  {}",
        s.unreadable.join("\n  ")
    );
    assert!(
        s.hits.is_empty(),
        "{name} carries the build host's paths or secrets:\n  {}",
        s.findings()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n  ")
    );
}

#[test]
fn the_qemu_image_carries_nothing_of_the_build_host() {
    scan("qemu.iso");
}

#[test]
fn the_alrest_image_carries_nothing_of_the_build_host() {
    scan("alrest.iso");
}

/// The payload's layers (manifest, every store file, the check system's
/// initramfs inside the store) are read too.
#[test]
fn the_store_payload_is_read_to_its_files() {
    let iso = images_dir().join("qemu.iso");
    let scratch = tempfile::tempdir().expect("tempdir");
    let mut s = Scanner::new(Vec::new());
    s.iso(&iso, scratch.path())
        .unwrap_or_else(|e| panic!("cannot read {}: {e:#}", iso.display()));
    let payload = "qemu.iso:/nodeflash/store.nfp";
    assert!(s.layers.contains(&format!("{payload} › manifest")));
    let store_files = s
        .layers
        .iter()
        .filter(|l| l.starts_with(&format!("{payload} › store:/")))
        .count();
    assert!(store_files >= 300, "only {store_files} store files read");
    assert!(
        s.layers
            .iter()
            .any(|l| l.starts_with(&format!("{payload} › store:/"))
                && l.ends_with("› zstd › cpio:/init")),
        "the check system's initramfs in the store was not opened"
    );
}

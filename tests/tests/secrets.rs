//! The images carry nothing of the build host: its home and user, the
//! repository's and the cache's absolute paths, its host name, secret-looking
//! environment values and SSH private keys are searched for in every layer
//! of the built ISOs, decompressed (see `nodeflash_tests::scan`).

use std::path::Path;

use nodeflash_tests::images_dir;
use nodeflash_tests::scan::{host_needles, Needle, Scanner};

/// Strings known to be in an image, searched for with the needles: their
/// hits show that a needle in these layers would be found and reported.
const CANARY: &str = "canary: ";

/// The repository (the tests crate's parent directory).
fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is in the repository")
}

/// Scans the image `name` with the host's needles and `canaries`; fails on
/// any hit of a host needle. Returns the scanner, canary hits included.
fn scan(name: &str, canaries: &[&str]) -> Scanner {
    let iso = images_dir().join(name);
    assert!(
        iso.is_file(),
        "{} is missing: build it with `cargo xtask build-iso`",
        iso.display()
    );
    let scratch = tempfile::tempdir().expect("tempdir");
    let mut needles = host_needles(repo());
    needles.extend(canaries.iter().map(|c| Needle {
        what: format!("{CANARY}{c}"),
        bytes: c.as_bytes().to_vec(),
        secret: false,
    }));
    let mut s = Scanner::new(needles);
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
    let leaks: Vec<_> = s
        .findings()
        .into_iter()
        .filter(|h| !h.needle.starts_with(CANARY))
        .collect();
    assert!(
        leaks.is_empty(),
        "{name} carries the build host's paths or secrets:\n  {}",
        leaks
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n  ")
    );
    s
}

/// Also: the payload's layers (manifest, every store file, the check
/// system's initramfs inside the store) were read.
#[test]
fn the_qemu_image_carries_nothing_of_the_build_host() {
    // The default node's host name is in the profile (on the ISO and in
    // the initramfs); the check system's store path is in the manifest.
    let s = scan("qemu.iso", &["qemu-node", "-nodeflash-check-system"]);
    let found = |needle: &str, place: &str| {
        s.findings()
            .iter()
            .any(|h| h.needle == format!("{CANARY}{needle}") && h.place == place)
    };
    for (needle, place) in [
        ("qemu-node", "qemu.iso:/nodeflash/profile.toml"),
        (
            "qemu-node",
            "qemu.iso › ESP:/nodeflash/initrd.zst › zstd › cpio:/etc/nodeflash/profile.toml",
        ),
        (
            "-nodeflash-check-system",
            "qemu.iso:/nodeflash/store.nfp › manifest",
        ),
    ] {
        assert!(
            found(needle, place),
            "the canary {needle:?} was not reported in {place}: {:?}",
            s.findings()
        );
    }
    let payload = "qemu.iso:/nodeflash/store.nfp";
    assert!(s.layers.contains(&format!("{payload} › manifest")));
    let store_files = s
        .layers
        .iter()
        .filter(|l| l.starts_with(&format!("{payload} › store:/")))
        .count();
    // The profile's synthetic store has 300 files.
    assert!(store_files >= 300, "only {store_files} store files read");
    assert!(
        s.layers
            .iter()
            .any(|l| l.starts_with(&format!("{payload} › store:/"))
                && l.ends_with("› zstd › cpio:/init")),
        "the check system's initramfs in the store was not opened"
    );
}

#[test]
fn the_alrest_image_carries_nothing_of_the_build_host() {
    scan("alrest.iso", &[]);
}

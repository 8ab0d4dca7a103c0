//! A root pool across two NVMe disks (`[disk] members`, `[pool] vdev =
//! "mirror"`) in QEMU, from disko's example/zfs.nix translated
//! (`tests/fixtures/disko/zfs.toml`: the pool's root dataset as `/`, a
//! dataset without a mountpoint, a legacy one, a volume, user properties):
//! the install lays out both disks with an ESP each and creates one mirror
//! vdev; the installed node then boots with both disks, and with each disk
//! removed in turn (from the ESP of the disk that is left), its check
//! system reporting the pool ONLINE, then DEGRADED with the store intact.
//! Refusals leave every disk byte-identical.

use std::path::{Path, PathBuf};

use nodeflash_tests::{
    assert_console, build_profile_file, build_variant, console_json, esp_boot_entries,
    payload_digest, Boot, DiskImage, Nvme, Vm, VmConfig,
};

const GIB: u64 = 1 << 30;

/// The `qemu` profile with a second disk (serial NFTEST0002) in a mirror,
/// `members` as given.
fn mirror_iso(dir: &Path, members: &str) -> PathBuf {
    build_variant(
        dir,
        "qemu",
        |p| {
            p.replace(
                "max-size = \"8GiB\" }\n",
                &format!("max-size = \"8GiB\" }}\nmembers = {members}\n"),
            )
            .replace(
                "[pool]\nname = \"rpool\"\n",
                "[pool]\nname = \"rpool\"\nvdev = \"mirror\"\n",
            )
        },
        &[],
    )
}

/// Boots `cfg` until it powers off; the console.
fn run(cfg: &VmConfig) -> String {
    let mut vm = Vm::start(cfg).expect("qemu starts");
    let console = vm.wait_for_poweroff().unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("{console}");
    console
}

/// Boots the installed node from `disks` (no stick) and returns its check
/// report (`nodeflash-check:`).
fn boot_disks(disks: &[Nvme]) -> serde_json::Value {
    let mut cfg = VmConfig::new(PathBuf::new(), Boot::Disk);
    cfg.nvme = disks.to_vec();
    console_json(&run(&cfg), "nodeflash-check: ")
}

/// (depth, state) of the check report's vdev tree, and the leaf names.
fn tree(check: &serde_json::Value) -> Vec<(u64, String)> {
    check["vdevs"]
        .as_array()
        .unwrap_or_else(|| panic!("no vdevs in the check report: {check:#}"))
        .iter()
        .map(|v| {
            (
                v["depth"].as_u64().expect("depth"),
                v["state"].as_str().expect("state").to_string(),
            )
        })
        .collect()
}

#[test]
fn a_mirror_installs_and_boots_from_either_disk_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/disko/zfs.toml");
    let iso = build_profile_file(dir.path(), &fixture);
    let a = Nvme::create(dir.path(), "a.img", GIB, "NFTEST0001").expect("disk a");
    let b = Nvme::create(dir.path(), "b.img", GIB, "NFTEST0002").expect("disk b");
    let mut cfg = VmConfig::new(iso.clone(), Boot::UsbStick);
    cfg.nvme = vec![a.clone(), b.clone()];
    let console = run(&cfg);
    assert_console(&console, "nodeflash: done in");
    assert_console(&console, "plan: disk 1 of 2 of pool zroot:");
    assert_console(&console, "plan: disk 2 of 2 of pool zroot:");
    assert_console(
        &console,
        "(the pool survives 1 of 2 disks lost); an ESP with the boot files on every disk",
    );
    assert_console(
        &console,
        "plan:   zvol zroot/zfs_testvolume volsize=10.0 MiB (10485760 bytes)",
    );
    assert_console(&console, "pool zroot created on mirror /dev/nvme");
    let pool = console_json(&console, "nodeflash-pool: ");
    assert_eq!(pool["pool_properties"]["health"], "ONLINE", "{pool:#}");
    // What disko's example describes, as ZFS reports it.
    let ds = &pool["datasets"];
    assert_eq!(ds["zroot"]["com.sun:auto-snapshot"], "false", "{pool:#}");
    assert_eq!(
        ds["zroot/zfs_fs"]["com.sun:auto-snapshot"], "true",
        "{pool:#}"
    );
    assert_eq!(ds["zroot/zfs_testvolume"]["type"], "volume", "{pool:#}");
    assert_eq!(
        ds["zroot/zfs_testvolume"]["volsize"], "10485760",
        "{pool:#}"
    );
    assert_eq!(pool["pool_properties"]["bootfs"], "zroot", "{pool:#}");
    // systemd-boot and the entry on both ESPs.
    for d in [&a, &b] {
        assert_eq!(
            esp_boot_entries(d),
            Some(vec!["::/loader/entries/nodeflash.conf".to_string()]),
            "the ESP of {}",
            d.serial
        );
    }
    let digest = payload_digest(&iso);

    let both = boot_disks(&[a.clone(), b.clone()]);
    assert_eq!(both["problems"], serde_json::json!([]), "{both:#}");
    assert_eq!(both["health"], "ONLINE");
    assert_eq!(
        tree(&both),
        [
            (0, "ONLINE".to_string()),
            (1, "ONLINE".to_string()),
            (2, "ONLINE".to_string()),
            (2, "ONLINE".to_string())
        ],
        "{both:#}"
    );
    assert!(
        both["vdevs"][1]["name"]
            .as_str()
            .is_some_and(|n| n.starts_with("mirror-")),
        "{both:#}"
    );
    assert_eq!(both["store"]["digest"], digest.as_str());
    let mut names: Vec<&String> = both["datasets"]
        .as_object()
        .expect("datasets")
        .keys()
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "zroot",
            "zroot/zfs_fs",
            "zroot/zfs_legacy_fs",
            "zroot/zfs_testvolume",
            "zroot/zfs_unmounted_fs"
        ],
        "{both:#}"
    );
    for (name, mountpoint) in [
        ("zroot", "/"),
        ("zroot/zfs_fs", "/zfs_fs"),
        ("zroot/zfs_unmounted_fs", "none"),
        ("zroot/zfs_legacy_fs", "legacy"),
        ("zroot/zfs_testvolume", "-"),
    ] {
        assert_eq!(
            both["datasets"][name]["mountpoint"], mountpoint,
            "{name}: {both:#}"
        );
        assert_eq!(
            both["datasets"][name]["compression"], "lz4",
            "{name}: {both:#}"
        );
    }

    // Each disk alone: it boots from its own ESP, the pool is DEGRADED
    // (one side of the mirror missing) and the store is whole.
    for (left, gone) in [(&a, &b), (&b, &a)] {
        let check = boot_disks(std::slice::from_ref(left));
        assert_eq!(
            check["health"], "DEGRADED",
            "{} alone: {check:#}",
            left.serial
        );
        assert_eq!(
            check["problems"],
            serde_json::json!(["pool zroot is DEGRADED, not ONLINE"]),
            "{} alone: {check:#}",
            left.serial
        );
        let t = tree(&check);
        assert_eq!(
            t[..2],
            [(0, "DEGRADED".into()), (1, "DEGRADED".into())],
            "{check:#}"
        );
        // One side ONLINE; the other missing: UNAVAIL, or FAULTED when the
        // kernel gave its old path to the disk that is left.
        let leaves: Vec<&str> = t[2..].iter().map(|(_, s)| s.as_str()).collect();
        assert_eq!(leaves.len(), 2, "{check:#}");
        assert_eq!(
            leaves.iter().filter(|s| **s == "ONLINE").count(),
            1,
            "{check:#}"
        );
        assert!(
            leaves
                .iter()
                .any(|s| ["UNAVAIL", "REMOVED", "FAULTED"].contains(s)),
            "{} missing: {check:#}",
            gone.serial
        );
        assert_eq!(check["store"]["verified"], true, "{check:#}");
        assert_eq!(check["store"]["digest"], digest.as_str());
    }
}

/// disko's example/zfs-impermanence.nix translated: one disk, and the
/// `blank` snapshot of the root dataset taken right after its creation.
#[test]
fn disko_impermanence_installs_with_a_blank_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fixture =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/disko/zfs-impermanence.toml");
    let iso = build_profile_file(dir.path(), &fixture);
    let disk = Nvme::create(dir.path(), "a.img", GIB, "NFTEST0001").expect("disk");
    let mut cfg = VmConfig::new(iso.clone(), Boot::UsbStick);
    cfg.nvme = vec![disk.clone()];
    let console = run(&cfg);
    assert_console(&console, "nodeflash: done in");
    assert_console(
        &console,
        "plan:   snapshot zroot/local/root@blank, taken before anything is written to it",
    );
    let pool = console_json(&console, "nodeflash-pool: ");
    assert_eq!(
        pool["datasets"]["zroot/local/root@blank"]["type"], "snapshot",
        "{pool:#}"
    );
    let check = boot_disks(std::slice::from_ref(&disk));
    assert_eq!(check["problems"], serde_json::json!([]), "{check:#}");
    assert!(
        check["datasets"]["zroot/local/root@blank"].is_object(),
        "{check:#}"
    );
    assert_eq!(
        check["datasets"]["zroot/local/root"]["mountpoint"], "/",
        "{check:#}"
    );
    assert_eq!(check["store"]["digest"], payload_digest(&iso).as_str());
}

#[test]
fn member_selections_that_do_not_resolve_leave_every_disk_unchanged() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The member's rules match two disks (NFTEST0002 and NFTEST0003).
    let iso = mirror_iso(dir.path(), "[ { bus = \"nvme\", min-size = \"3GiB\" } ]");
    let a = Nvme::create(dir.path(), "a.img", 2 * GIB, "NFTEST0001").expect("disk a");
    let b = Nvme::create(dir.path(), "b.img", 4 * GIB, "NFTEST0002").expect("disk b");
    let c = Nvme::create(dir.path(), "c.img", 4 * GIB, "NFTEST0004").expect("disk c");
    let before: Vec<String> = [&a, &b, &c].iter().map(|d| d.sha256()).collect();
    let mut cfg = VmConfig::new(iso, Boot::UsbStick);
    cfg.nvme = vec![a.clone(), b.clone(), c.clone()];
    let console = run(&cfg);
    assert_console(
        &console,
        "2 disks match the profile's [disk] members[0] rules, refusing to guess",
    );
    assert_console(&console, "nodeflash: FAILED");
    let after: Vec<String> = [&a, &b, &c].iter().map(|d| d.sha256()).collect();
    assert_eq!(after, before, "a disk was changed");

    // The member holds a file system: refused as the first disk would be,
    // after the first disk was found empty, and neither is written.
    let dir = tempfile::tempdir().expect("tempdir");
    let iso = mirror_iso(
        dir.path(),
        "[ { serial = \"NFTEST0002\", bus = \"nvme\" } ]",
    );
    let a = Nvme::create(dir.path(), "a.img", 2 * GIB, "NFTEST0001").expect("disk a");
    let b = Nvme::create(dir.path(), "b.img", 2 * GIB, "NFTEST0002").expect("disk b");
    let status = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&b.image)
        .status()
        .expect("mkfs.ext4 runs (package e2fsprogs)");
    assert!(status.success());
    let before = (a.sha256(), b.sha256());
    let mut cfg = VmConfig::new(iso, Boot::UsbStick);
    cfg.nvme = vec![a.clone(), b.clone()];
    let console = run(&cfg);
    assert_console(&console, "disk nvme1n1 is not empty");
    assert_console(&console, "nothing was written");
    assert_eq!((a.sha256(), b.sha256()), before, "a disk was changed");
}

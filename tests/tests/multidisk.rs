//! A root pool across two NVMe disks (`[disk] members`, `[pool] vdev =
//! "mirror"`) and two data pools on three virtio disks in QEMU, from
//! disko's example/zfs.nix (`tests/fixtures/disko/zfs.toml`: the pool's
//! root dataset as `/`, a dataset without a mountpoint, a legacy one, a
//! volume, user properties) with the `[[pools]]` of disko's
//! example/non-root-zfs.nix (`non-root-zfs.toml`: `storage`, a mirror, and
//! `storage2`, one disk) added: the install lays out both NVMe disks with
//! an ESP each, creates the root mirror and the data pools; the installed
//! node then boots with every disk, and with each NVMe disk removed in
//! turn (from the ESP of the disk that is left; the second time one of
//! `storage`'s disks is removed too), its check system reporting each
//! pool ONLINE or DEGRADED as expected, with the store intact.
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
    boot_with(disks, &[])
}

/// [`boot_disks`] with virtio disks too.
fn boot_with(disks: &[Nvme], virtio: &[Nvme]) -> serde_json::Value {
    let mut cfg = VmConfig::new(PathBuf::new(), Boot::Disk);
    cfg.nvme = disks.to_vec();
    cfg.virtio = virtio.to_vec();
    console_json(&run(&cfg), "nodeflash-check: ")
}

/// The `nodeflash-pool:` line of pool `name` (the data pools' come first).
fn pool_json(console: &str, name: &str) -> serde_json::Value {
    console
        .lines()
        .filter_map(|l| l.strip_prefix("nodeflash-pool: "))
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("pool json"))
        .find(|v| v["pool"] == name)
        .unwrap_or_else(|| panic!("no nodeflash-pool line for {name}"))
}

/// The check report's data pool `name`.
fn data_pool<'a>(check: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    check["data_pools"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["pool"] == name))
        .unwrap_or_else(|| panic!("no data pool {name} in the check report: {check:#}"))
}

/// zfs.toml with the `[[pools]]` of non-root-zfs.toml added (they are the
/// last part of that file), written into `dir`.
fn zfs_with_data_pools(dir: &Path) -> PathBuf {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/disko");
    let zfs = std::fs::read_to_string(fixtures.join("zfs.toml")).expect("zfs.toml");
    let other = std::fs::read_to_string(fixtures.join("non-root-zfs.toml")).expect("non-root");
    // From the first `[[pools]]` table (not the comment that names it).
    let start = other
        .find("\n[[pools]]\n")
        .expect("a [[pools]] table in non-root-zfs.toml");
    let pools = &other[start..];
    let src = dir.join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    let path = src.join("disko-zfs-and-data-pools.toml");
    std::fs::write(&path, format!("{zfs}\n{pools}")).expect("write the profile");
    path
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
    let fixture = zfs_with_data_pools(dir.path());
    let iso = build_profile_file(dir.path(), &fixture);
    let a = Nvme::create(dir.path(), "a.img", GIB, "NFTEST0001").expect("disk a");
    let b = Nvme::create(dir.path(), "b.img", GIB, "NFTEST0002").expect("disk b");
    // The data pools' disks: `storage` (c, d) and `storage2` (e).
    let c = Nvme::create(dir.path(), "c.img", GIB / 2, "NFDATA0001").expect("disk c");
    let d = Nvme::create(dir.path(), "d.img", GIB / 2, "NFDATA0002").expect("disk d");
    let e = Nvme::create(dir.path(), "e.img", GIB / 2, "NFDATA0003").expect("disk e");
    let mut cfg = VmConfig::new(iso.clone(), Boot::UsbStick);
    cfg.nvme = vec![a.clone(), b.clone()];
    cfg.virtio = vec![c.clone(), d.clone(), e.clone()];
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
    assert_console(
        &console,
        "plan:   dataset zroot/zfs_legacy_fs mountpoint=legacy canmount=on, mounted at /zfs_legacy_fs (mount -t zfs)\n",
    );
    assert_console(
        &console,
        "plan: mounts, parents first: / (zroot), /zfs_fs (zroot/zfs_fs), /zfs_legacy_fs (zroot/zfs_legacy_fs)\n",
    );
    assert_console(
        &console,
        "plan: data pool storage: one mirror vdev of /dev/vda1, /dev/vdb1 (the pool survives 1 of 2 disks lost)",
    );
    assert_console(
        &console,
        "plan:   dataset storage/dataset mountpoint=/storage/dataset canmount=on, mounted",
    );
    assert_console(
        &console,
        "plan:   dataset storage2 mountpoint=/storage2 canmount=off\n",
    );
    assert_console(
        &console,
        "data pool storage created on mirror /dev/vda1 /dev/vdb1",
    );
    assert_console(&console, "data pool storage2 created on /dev/vdc1");
    let hostid = pool_json(&console, "zroot")["hostid"].clone();
    for (name, datasets) in [
        ("storage", ["storage", "storage/dataset"]),
        ("storage2", ["storage2", "storage2/dataset"]),
    ] {
        let p = pool_json(&console, name);
        assert_eq!(p["pool_properties"]["health"], "ONLINE", "{p:#}");
        // The node's host ID in the labels: the installed system imports it.
        assert_eq!(p["hostid"], hostid, "{p:#}");
        let got: Vec<&String> = p["datasets"]
            .as_object()
            .expect("datasets")
            .keys()
            .collect();
        assert_eq!(got, datasets, "{p:#}");
    }
    let pool = pool_json(&console, "zroot");
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

    let data = [c.clone(), d.clone(), e.clone()];
    let both = boot_with(&[a.clone(), b.clone()], &data);
    assert_eq!(both["problems"], serde_json::json!([]), "{both:#}");
    // The data pools as disko's example describes them, mounted by the check.
    let storage = data_pool(&both, "storage");
    assert_eq!(storage["health"], "ONLINE", "{both:#}");
    assert_eq!(
        tree(storage),
        [
            (0, "ONLINE".to_string()),
            (1, "ONLINE".to_string()),
            (2, "ONLINE".to_string()),
            (2, "ONLINE".to_string())
        ],
        "{both:#}"
    );
    assert_eq!(
        storage["mounted"],
        serde_json::json!([
            { "dataset": "storage", "mountpoint": "/storage" },
            { "dataset": "storage/dataset", "mountpoint": "/storage/dataset" }
        ]),
        "{both:#}"
    );
    let storage2 = data_pool(&both, "storage2");
    assert_eq!(storage2["health"], "ONLINE", "{both:#}");
    assert_eq!(
        storage2["datasets"]["storage2"]["canmount"], "off",
        "{both:#}"
    );
    assert_eq!(
        storage2["mounted"],
        serde_json::json!([{ "dataset": "storage2/dataset", "mountpoint": "/storage2/dataset" }]),
        "{both:#}"
    );
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
    // The install report records every disk it wrote, with its pool.
    let written: Vec<(String, String)> = both["install_disks"]
        .as_array()
        .expect("install_disks")
        .iter()
        .map(|d| {
            (
                d["pool"].as_str().expect("pool").to_string(),
                d["disk"]["serial"].as_str().expect("serial").to_string(),
            )
        })
        .collect();
    assert_eq!(
        written,
        [
            ("zroot", "NFTEST0001"),
            ("zroot", "NFTEST0002"),
            ("storage", "NFDATA0001"),
            ("storage", "NFDATA0002"),
            ("storage2", "NFDATA0003")
        ]
        .map(|(p, s)| (p.to_string(), s.to_string())),
        "{both:#}"
    );
    // The legacy dataset, mounted where the profile says by `mount -t zfs`.
    assert!(
        both["mounted"]
            .as_array()
            .expect("mounted")
            .contains(&serde_json::json!({
                "dataset": "zroot/zfs_legacy_fs",
                "mountpoint": "/zfs_legacy_fs",
                "legacy": true
            })),
        "{both:#}"
    );
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

    // Each NVMe disk alone: it boots from its own ESP, the root pool is
    // DEGRADED (one side of the mirror missing) and the store is whole.
    // With b alone, `storage` lost disk d too: DEGRADED; `storage2` is whole.
    for (left, gone, virtio) in [
        (&a, &b, vec![c.clone(), d.clone(), e.clone()]),
        (&b, &a, vec![c.clone(), e.clone()]),
    ] {
        let check = boot_with(std::slice::from_ref(left), &virtio);
        assert_eq!(
            check["health"], "DEGRADED",
            "{} alone: {check:#}",
            left.serial
        );
        let storage_lost_one = virtio.len() == 2;
        let mut problems = vec!["pool zroot is DEGRADED, not ONLINE"];
        if storage_lost_one {
            problems.push("pool storage is DEGRADED, not ONLINE");
        }
        assert_eq!(
            check["problems"],
            serde_json::json!(problems),
            "{} alone: {check:#}",
            left.serial
        );
        let storage = data_pool(&check, "storage");
        assert_eq!(
            storage["health"],
            if storage_lost_one {
                "DEGRADED"
            } else {
                "ONLINE"
            },
            "{check:#}"
        );
        assert_eq!(
            storage["mounted"].as_array().map(Vec::len),
            Some(2),
            "{check:#}"
        );
        assert_eq!(
            data_pool(&check, "storage2")["health"],
            "ONLINE",
            "{check:#}"
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
    // A data pool's disk rules match two virtio disks: refused, with the
    // root pool's disks resolved and empty, and no disk written.
    let dir = tempfile::tempdir().expect("tempdir");
    let iso = build_variant(
        dir.path(),
        "qemu",
        |p| {
            format!(
                "{p}\n[[pools]]\nname = \"tank\"\ndisks = [ {{ bus = \"virtio\", min-size = \"100MiB\" }} ]\n"
            )
        },
        &[],
    );
    let a = Nvme::create(dir.path(), "a.img", 2 * GIB, "NFTEST0001").expect("disk a");
    let c = Nvme::create(dir.path(), "c.img", GIB / 4, "NFDATA0001").expect("disk c");
    let d = Nvme::create(dir.path(), "d.img", GIB / 4, "NFDATA0002").expect("disk d");
    let before: Vec<String> = [&a, &c, &d].iter().map(|x| x.sha256()).collect();
    let mut cfg = VmConfig::new(iso, Boot::UsbStick);
    cfg.nvme = vec![a.clone()];
    cfg.virtio = vec![c.clone(), d.clone()];
    let console = run(&cfg);
    assert_console(
        &console,
        "2 disks match the profile's [[pools]] tank disks[0] rules, refusing to guess",
    );
    assert_console(&console, "nodeflash: FAILED");
    let after: Vec<String> = [&a, &c, &d].iter().map(|x| x.sha256()).collect();
    assert_eq!(after, before, "a disk was changed");
}

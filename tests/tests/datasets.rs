//! Dataset trees and pools as the installed system will see them, in QEMU
//! (issue 17, cases 1-3): a boot-environment layout whose root is
//! `canmount=noauto` and whose `/nix` is inherited is installed into the
//! right datasets; an old pool of the profile's name on a second disk is
//! refused before anything is written.

use std::io::Read;

use nodeflash_tests::{
    assert_console, boot_installed, boot_stick, boot_to_poweroff, build_variant, console_json,
    images_dir, payload_digest, printed_hostid, Boot, Nvme, VmConfig,
};

/// The `qemu` profile's datasets replaced by a boot-environment layout:
/// `ROOT` (off), `ROOT/nixos` at `/` (noauto), `ROOT/nixos/nix` with no
/// mountpoint (ZFS gives it `/nix`), and `home` whose mountpoint is given
/// in `options`.
fn boot_environment(profile: &str) -> String {
    let start = profile.find("[[pool.datasets]]").expect("datasets");
    let end = profile.find("[payload]").expect("payload");
    format!(
        "{}{}{}",
        &profile[..start],
        r#"[[pool.datasets]]
name = "ROOT"
options = { canmount = "off" }
[[pool.datasets]]
name = "ROOT/nixos"
mountpoint = "/"
options = { canmount = "noauto" }
[[pool.datasets]]
name = "ROOT/nixos/nix"
[[pool.datasets]]
name = "home"
options = { mountpoint = "/home" }

"#,
        &profile[end..]
    )
}

#[test]
fn a_noauto_root_and_an_inherited_nix_dataset_receive_the_install() {
    let dir = tempfile::tempdir().expect("tempdir");
    let iso = build_variant(dir.path(), "qemu", boot_environment, &[]);
    let disk = Nvme::create(dir.path(), "nvme.img", 2 << 30, "NFTEST0001").expect("disk");
    let console = boot_stick(&iso, &disk);
    assert_console(&console, "nodeflash: done in");
    assert_console(
        &console,
        "plan: mounts, parents first: / (rpool/ROOT/nixos), /home (rpool/home), /nix (rpool/ROOT/nixos/nix)",
    );
    assert!(
        !console.contains("no dataset is mounted at /"),
        "the noauto root was mounted for the install"
    );
    let pool = console_json(&console, "nodeflash-pool: ");
    assert_eq!(pool["pool_properties"]["bootfs"], "rpool/ROOT/nixos");
    assert_eq!(
        pool["datasets"]["rpool/ROOT/nixos/nix"]["mountpoint"],
        "/nix"
    );
    let hostid = printed_hostid(&console);

    // The installed disk, as its own system mounts it: the store must be
    // in the /nix dataset (a store copied into `/` would be covered by it),
    // and the host files, keys and report on the root dataset.
    let check = boot_installed(&disk);
    assert_eq!(check["problems"], serde_json::json!([]), "{check:#}");
    assert_eq!(check["hostname"], "qemu-node");
    assert_eq!(check["hostid_etc"], hostid.as_str());
    assert_eq!(check["bootfs"], "rpool/ROOT/nixos");
    assert_eq!(
        check["mounted"],
        serde_json::json!([
            { "dataset": "rpool/ROOT/nixos", "mountpoint": "/" },
            { "dataset": "rpool/home", "mountpoint": "/home" },
            { "dataset": "rpool/ROOT/nixos/nix", "mountpoint": "/nix" },
        ])
    );
    assert_eq!(
        check["ssh_keys"],
        serde_json::json!(["SHA256:+DiY3wvvV6TuJJhbpZisF/zLDA0zPMSvHdkr4UvCOqU"])
    );
    assert_eq!(check["store"]["verified"], true, "{check:#}");
    assert_eq!(check["store"]["digest"], payload_digest(&iso));
}

/// True when the first and last MiB of the image are zero.
fn untouched(disk: &Nvme) -> bool {
    let mut f = std::fs::File::open(&disk.image).expect("open the disk image");
    let len = f.metadata().expect("metadata").len();
    let mut buf = vec![0u8; 1 << 20];
    f.read_exact(&mut buf).expect("read the start");
    let head = buf.iter().all(|b| *b == 0);
    use std::io::{Seek, SeekFrom};
    f.seek(SeekFrom::Start(len - (1 << 20))).expect("seek");
    f.read_exact(&mut buf).expect("read the end");
    head && buf.iter().all(|b| *b == 0)
}

#[test]
fn an_old_pool_of_the_same_name_on_a_second_disk_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let iso = images_dir().join("qemu.iso");
    // An earlier install leaves an `rpool` on what becomes the second disk.
    let old = Nvme::create(dir.path(), "old.img", 2 << 30, "NFTEST0001").expect("disk");
    assert_console(&boot_stick(&iso, &old), "nodeflash: done in");

    let old = Nvme {
        serial: "NFTEST0002".into(),
        ..old
    };
    let new = Nvme::create(dir.path(), "new.img", 2 << 30, "NFTEST0001").expect("disk");
    let mut cfg = VmConfig::new(iso, Boot::UsbStick);
    cfg.nvme = vec![new.clone(), old];
    let console = boot_to_poweroff(&cfg);
    assert_console(&console, "nodeflash: FAILED:");
    assert_console(&console, "holds an old ZFS pool named rpool on /dev/nvme");
    assert_console(&console, "p3 (pool GUID ");
    // Both disks are named, and how to resolve it.
    assert_console(&console, "serial \"NFTEST0002\"");
    assert_console(&console, "to be created on nvme");
    assert_console(&console, "zpool labelclear -f /dev/");
    assert_console(&console, "choose another name in the profile's [pool] name");
    // The facts show what was found.
    let facts = console_json(&console, "nodeflash-facts: ");
    let found: Vec<String> = facts["block_devices"]
        .as_array()
        .expect("disks")
        .iter()
        .flat_map(|d| d["zfs_pools"].as_array().cloned().unwrap_or_default())
        .map(|p| format!("{} {}", p["pool"], p["device"]))
        .collect();
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].starts_with("\"rpool\" \"nvme"), "{found:?}");
    assert!(untouched(&new), "nothing was written on the new disk");
}

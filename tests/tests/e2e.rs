//! The whole story in QEMU: the `qemu` stick installs an empty NVMe disk and
//! powers off; then the disk boots alone (OVMF → systemd-boot → the
//! installed kernel and the check system's stage 1), imports its pool
//! without `-f` and reports what it finds, which must be what the profile
//! asked for and what the install reported.

use nodeflash_tests::{
    assert_console, assert_installed, boot_installed, boot_to_poweroff, console_json, images_dir,
    payload_digest, printed_hostid, Boot, Nvme, VmConfig,
};

#[test]
fn installed_disk_boots_and_is_what_was_installed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = Nvme::create(dir.path(), "nvme.img", 2 << 30, "NFTEST0001").expect("disk");

    // 1. Install from the stick.
    let mut cfg = VmConfig::new(images_dir().join("qemu.iso"), Boot::UsbStick);
    cfg.nvme.push(disk.clone());
    let install = boot_to_poweroff(&cfg);
    assert_console(&install, "nodeflash: done in");
    assert_console(&install, "boot loader: systemd-boot");
    let hostid = printed_hostid(&install);
    let store = console_json(&install, "nodeflash-store: ");
    let facts = console_json(&install, "nodeflash-pool: ");

    // 2. Boot the disk alone.
    let check = boot_installed(&disk);
    assert_installed(
        &check,
        "qemu-node",
        &hostid,
        store["tree_digest"].as_str().expect("digest"),
    );
    assert_eq!(check["pool_guid"], facts["pool_properties"]["guid"]);
    assert_eq!(check["store"]["files"], store["files"]);
    assert_eq!(
        store["tree_digest"],
        payload_digest(&images_dir().join("qemu.iso")),
        "the tree read back at install time is the payload's"
    );

    // The install report on the disk adds up to the whole install.
    let total = check["install_total_secs"].as_f64().expect("report total");
    let sum: f64 = check["install_phases"]
        .as_array()
        .expect("phases")
        .iter()
        .map(|p| p["secs"].as_f64().expect("secs"))
        .sum();
    assert!((sum - total).abs() < 0.01, "phases {sum} vs total {total}");
    assert!(
        check["install_log_lines"].as_u64().unwrap_or(0) > 20,
        "the install's console is on the disk: {check:#}"
    );
    let names: Vec<&str> = check["install_phases"]
        .as_array()
        .expect("phases")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    for want in ["partitioning", "pool", "store copy", "boot loader"] {
        assert!(names.contains(&want), "phase {want} in {names:?}");
    }
    eprintln!("install: {total:.1} s from /init, phases {names:?}");
}

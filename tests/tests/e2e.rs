//! The whole story in QEMU: the `qemu` stick installs an empty NVMe disk and
//! powers off; then the disk boots alone (OVMF → systemd-boot → the
//! installed kernel and the check system's stage 1), imports its pool
//! without `-f` and reports what it finds, which must be what the profile
//! asked for and what the install reported.

use std::path::PathBuf;

use nodeflash_tests::{
    assert_console, console_json, images_dir, load_profile, Boot, Nvme, Vm, VmConfig,
};

#[test]
fn installed_disk_boots_and_is_what_was_installed() {
    let profile = load_profile("qemu");
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = Nvme::create(dir.path(), "nvme.img", 2 << 30, "NFTEST0001").expect("disk");

    // 1. Install from the stick.
    let mut cfg = VmConfig::new(images_dir().join("qemu.iso"), Boot::UsbStick);
    cfg.nvme.push(disk.clone());
    let mut vm = Vm::start(&cfg).expect("qemu starts");
    let install = vm.wait_for_poweroff().unwrap_or_else(|e| panic!("{e:#}"));
    drop(vm);
    eprintln!("{install}");
    assert_console(&install, "nodeflash: done in");
    assert_console(&install, "boot loader: systemd-boot");
    let hostid = install
        .lines()
        .find_map(|l| l.strip_prefix("host id: "))
        .and_then(|l| l.split_whitespace().next())
        .expect("the host ID is printed")
        .to_string();
    let store = console_json(&install, "nodeflash-store: ");
    let facts = console_json(&install, "nodeflash-pool: ");

    // 2. Boot the disk alone.
    let mut cfg = VmConfig::new(PathBuf::new(), Boot::Disk);
    cfg.nvme.push(disk);
    let mut vm = Vm::start(&cfg).expect("qemu starts");
    let boot = vm.wait_for_poweroff().unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("{boot}");
    let check = console_json(&boot, "nodeflash-check: ");
    assert_eq!(check["problems"], serde_json::json!([]), "{check:#}");
    assert_eq!(check["ok"], true);
    assert_eq!(
        check["hostname"], "qemu-node",
        "the generic node's host name"
    );
    assert_eq!(check["hostid"], hostid.as_str());
    assert_eq!(check["hostid_live"], hostid.as_str());
    assert_eq!(check["hostid_etc"], hostid.as_str());
    assert_eq!(check["pool"], profile.pool.name.to_string());
    assert_eq!(check["health"], "ONLINE");
    assert_eq!(check["pool_guid"], facts["pool_properties"]["guid"]);
    for d in &profile.pool.datasets {
        let name = format!("{}/{}", profile.pool.name, d.name.get_ref());
        let got = &check["datasets"][&name];
        assert!(
            got.is_object(),
            "dataset {name} on the installed pool: {check:#}"
        );
        if let Some(m) = &d.mountpoint {
            assert_eq!(got["mountpoint"], m.get_ref().0.as_str(), "{name}");
        }
    }
    // The profile's inline key, as `ssh-keygen -lf` prints it.
    assert_eq!(
        check["ssh_keys"],
        serde_json::json!(["SHA256:+DiY3wvvV6TuJJhbpZisF/zLDA0zPMSvHdkr4UvCOqU"])
    );
    assert_eq!(check["store"]["verified"], true, "{check:#}");
    assert_eq!(check["store"]["digest"], store["tree_digest"]);
    assert_eq!(check["store"]["files"], store["files"]);

    // The install report on the disk adds up to the whole install.
    let total = check["install_total_secs"].as_f64().expect("report total");
    let sum: f64 = check["install_phases"]
        .as_array()
        .expect("phases")
        .iter()
        .map(|p| p["secs"].as_f64().expect("secs"))
        .sum();
    assert!((sum - total).abs() < 0.01, "phases {sum} vs total {total}");
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

//! Installing again: after a power cut in the middle of the store copy
//! (an unfinished install counts as empty, even with `wipe = "if-empty"`),
//! and over a finished install (refused with `if-empty`; with
//! `wipe = "always"` installed again). The result boots and is what a clean
//! install gives.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nodeflash_tests::{
    assert_console, assert_installed, boot_installed, boot_stick, build_variant, esp_boot_entries,
    images_dir, payload_digest, printed_hostid, Boot, DiskImage, Nvme, Vm, VmConfig,
};

/// The `qemu` image with `wipe = "always"`.
fn image(dir: &Path) -> PathBuf {
    build_variant(
        dir,
        "qemu",
        |p| p.replace("wipe = \"if-empty\"", "wipe = \"always\""),
        &[],
    )
}

fn install(iso: &Path, disk: &Nvme) -> String {
    let console = boot_stick(iso, disk);
    assert_console(&console, "nodeflash: done in");
    console
}

/// Milliseconds after the pool is created at which the power is cut: from
/// `NODEFLASH_CUT_MS`, or drawn from the clock (printed, to replay a run).
fn cut_after() -> Duration {
    let ms = std::env::var("NODEFLASH_CUT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .subsec_nanos();
            u64::from(nanos % 1500)
        });
    eprintln!("power cut {ms} ms after the pool is created (NODEFLASH_CUT_MS={ms} replays it)");
    Duration::from_millis(ms)
}

/// Issue 19: a power cut in the middle of the store copy leaves an
/// unfinished install (the GPT's mark is still there), which the same stick,
/// with `wipe = "if-empty"`, counts as empty: it installs the disk again,
/// and the disk boots with the check result of a clean install. The same
/// stick once more then refuses the finished install and leaves it as it is.
#[test]
fn a_power_cut_mid_copy_counts_as_empty_and_a_finished_install_does_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The qemu image as built: `wipe = "if-empty"`.
    let iso = images_dir().join("qemu.iso");
    let disk = Nvme::create(dir.path(), "nvme.img", 2 << 30, "NFTEST0001").expect("disk");

    let mut cfg = VmConfig::new(iso.clone(), Boot::UsbStick);
    cfg.nvme.push(disk.clone());
    let mut vm = Vm::start(&cfg).expect("qemu starts");
    vm.wait_for_console("pool rpool created")
        .unwrap_or_else(|e| panic!("{e:#}"));
    std::thread::sleep(cut_after());
    let console = vm.power_cut();
    eprintln!("{console}");
    assert!(
        !console.contains("boot loader: systemd-boot"),
        "the cut came after the boot loader: the test did not cut the copy"
    );
    // Half-written: partitioned and formatted, but nothing to boot.
    assert_eq!(esp_boot_entries(&disk), Some(Vec::new()), "no boot entry");

    let console = install(&iso, &disk);
    assert_console(
        &console,
        "plan: the disk holds an unfinished nodeflash install (its GPT names the ESP \"nodeflash unfinished install\"): it counts as empty",
    );
    assert_console(&console, "plan: wipe what is there: ");
    assert_console(
        &console,
        "install finished: the ESP of /dev/nvme0n1 is named \"ESP\"",
    );
    let hostid = printed_hostid(&console);
    let check = boot_installed(&disk);
    assert_installed(&check, "qemu-node", &hostid, &payload_digest(&iso));

    // A finished install is data: refused, and left byte for byte.
    let before = disk.sha256();
    let console = boot_stick(&iso, &disk);
    assert_console(&console, "disk nvme0n1 is not empty (");
    assert_console(&console, "nodeflash: FAILED");
    assert!(
        !console.contains("unfinished nodeflash install"),
        "{console}"
    );
    assert_eq!(disk.sha256(), before, "the finished install was changed");
}

#[test]
fn installing_twice_gives_the_same_system() {
    let dir = tempfile::tempdir().expect("tempdir");
    let iso = image(dir.path());
    let disk = Nvme::create(dir.path(), "nvme.img", 2 << 30, "NFTEST0001").expect("disk");
    let first = install(&iso, &disk);
    assert_eq!(esp_boot_entries(&disk).map(|e| e.len()), Some(1));
    let second = install(&iso, &disk);
    assert_console(&second, "plan: wipe what is there: ");
    let hostid = printed_hostid(&second);
    assert_eq!(hostid, printed_hostid(&first), "the same host ID");
    let check = boot_installed(&disk);
    assert_installed(&check, "qemu-node", &hostid, &payload_digest(&iso));
    // A new pool, not the old one kept.
    let guid = |c: &str| {
        nodeflash_tests::console_json(c, "nodeflash-pool: ")["pool_properties"]["guid"].clone()
    };
    assert_ne!(guid(&first), guid(&second));
    assert_eq!(check["pool_guid"], guid(&second));
}

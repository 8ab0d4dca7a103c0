//! Installing again: after a power cut in the middle of the store copy, and
//! over a finished install. With `wipe = "always"` the stick installs the
//! disk again, and the result boots and is what a clean install gives.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nodeflash_tests::{
    assert_console, assert_installed, boot_installed, boot_stick, build_variant, esp_boot_entries,
    payload_digest, printed_hostid, Boot, Nvme, Vm, VmConfig,
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

#[test]
fn a_power_cut_during_the_copy_leaves_nothing_bootable_and_a_reinstall_succeeds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let iso = image(dir.path());
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
    let hostid = printed_hostid(&console);
    let check = boot_installed(&disk);
    assert_installed(&check, "qemu-node", &hostid, &payload_digest(&iso));
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

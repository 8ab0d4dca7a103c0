//! Faults: a stick whose store payload is damaged (found while the store is
//! copied; nothing is made bootable; the console is kept on the pool), and a
//! machine with no disk but the stick.

use std::io::{Read, Seek, SeekFrom, Write};
use std::process::Command;

use nodeflash_installer::payload::{Header, HEADER_LEN};
use nodeflash_tests::{
    assert_console, build_variant, check_unbootable, esp_boot_entries, images_dir, printed_hostid,
    Boot, DiskImage, Nvme, Vm, VmConfig,
};

/// Byte offset of a file in an ISO image, from xorriso's report.
fn offset_in_iso(iso: &std::path::Path, path: &str) -> u64 {
    let out = Command::new("xorriso")
        .arg("-indev")
        .arg(iso)
        .args(["-find", path, "-exec", "report_lba", "--"])
        .output()
        .expect("xorriso runs");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let line = text
        .lines()
        .find(|l| l.starts_with("File data lba:") && l.contains(path))
        .unwrap_or_else(|| panic!("no LBA for {path}: {text}"));
    let lba: u64 = line
        .split(',')
        .nth(1)
        .expect("lba")
        .trim()
        .parse()
        .expect("lba");
    lba * 2048
}

#[test]
fn a_damaged_payload_is_found_and_nothing_is_made_bootable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let iso = dir.path().join("damaged.iso");
    std::fs::copy(images_dir().join("qemu.iso"), &iso).expect("copy the ISO");
    let start = offset_in_iso(&iso, "/nodeflash/store.nfp");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&iso)
        .expect("open");
    let mut header = [0u8; HEADER_LEN];
    f.seek(SeekFrom::Start(start)).expect("seek");
    f.read_exact(&mut header).expect("read the payload header");
    let header = Header::parse(&header).expect("the payload is where xorriso says");
    // Flip bytes in the middle of the frames: header and manifest stay intact,
    // so this is only found when the data is read.
    let at = start + HEADER_LEN as u64 + header.manifest_len + header.frames_len / 2;
    let mut bytes = [0u8; 64];
    f.seek(SeekFrom::Start(at)).expect("seek");
    f.read_exact(&mut bytes).expect("read");
    for b in &mut bytes {
        *b ^= 0x5a;
    }
    f.seek(SeekFrom::Start(at)).expect("seek");
    f.write_all(&bytes).expect("damage the payload");
    drop(f);

    let disk = Nvme::create(dir.path(), "nvme.img", 2 << 30, "NFTEST0001").expect("disk");
    let mut cfg = VmConfig::new(iso, Boot::UsbStick);
    cfg.nvme.push(disk.clone());
    let mut vm = Vm::start(&cfg).expect("qemu starts");
    let console = vm.wait_for_poweroff().unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("{console}");
    assert_console(
        &console,
        "nodeflash: FAILED: the store was not copied completely, so the disk was not made bootable",
    );
    assert!(
        console.contains("is damaged (store path")
            || console.contains("content does not match the payload manifest"),
        "the damage is named"
    );
    assert!(
        !console.contains("boot loader: systemd-boot"),
        "no boot loader was written"
    );

    // The ESP is a FAT file system the installer made, with no boot entry.
    assert_eq!(esp_boot_entries(&disk), Some(Vec::new()), "no boot entry");

    // The pool existed: the console of the failed install is on it, and the
    // pool was exported. The disk cannot boot, so the check system of the
    // (undamaged) image is started directly to look.
    assert_console(
        &console,
        "this console is saved on the disk as rpool/safe/root:/var/log/nodeflash/install-failed.log",
    );
    let check = check_unbootable(
        &images_dir().join("qemu.iso"),
        &disk,
        &printed_hostid(&console),
    );
    assert_eq!(check["ok"], false);
    let log: Vec<&str> = check["failed_install_log"]
        .as_array()
        .unwrap_or_else(|| panic!("no failed install log on the disk: {check:#}"))
        .iter()
        .filter_map(|l| l.as_str())
        .collect();
    assert!(
        log.iter()
            .any(|l| l.starts_with("nodeflash: FAILED: the store was not copied completely")),
        "{log:#?}"
    );
    assert!(log
        .iter()
        .any(|l| l.starts_with("partitioned /dev/nvme0n1")));
    assert!(
        check["problems"]
            .as_array()
            .expect("problems")
            .iter()
            .any(|p| p
                .as_str()
                .is_some_and(|p| p.starts_with("an install failed on this disk"))),
        "{check:#}"
    );
}

/// No disk but the stick: the stick matches the size rule but is never a
/// candidate (it is the boot medium, and removable); the installer waits for
/// a disk, then lists what it saw and stops.
#[test]
fn without_a_disk_nothing_is_chosen_not_even_the_stick() {
    let dir = tempfile::tempdir().expect("tempdir");
    let iso = build_variant(
        dir.path(),
        "qemu",
        |p| {
            p.replace(
                "select = { serial = \"NFTEST0001\", bus = \"nvme\", max-size = \"8GiB\" }",
                "select = { max-size = \"8GiB\" }",
            )
            .replace("device-timeout-secs = 60", "device-timeout-secs = 10")
        },
        &[],
    );
    let mut vm = Vm::start(&VmConfig::new(iso, Boot::UsbStick)).expect("qemu starts");
    let console = vm.wait_for_poweroff().unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("{console}");
    assert_console(
        &console,
        "nodeflash: FAILED: no disk matches the profile's [disk] select rules",
    );
    assert_console(&console, "not chosen, it is the boot medium");
    assert!(!console.contains("partitioned"), "nothing was written");
    assert!(
        !console.contains("this console is saved on the disk"),
        "there is no pool to keep the console"
    );
}

/// A disk that has all but stopped answering (QEMU's null-co driver, each
/// request answered after 200 s):
/// the installer blocks in the kernel, and after a minute of silence the
/// console shows the kernel's blocked tasks with their stacks, instead of
/// hanging without a word (nixos-anywhere #368; issue 19's one hang).
///
/// Not in the default suite: in 2 of 4 runs here the report came late
/// (once at 212 s instead of about 65 s) or not within 420 s, a cause not
/// yet found (issue 19). Run it with
/// `cargo test -p nodeflash-tests --test faults -- --ignored a_stalled_disk`
/// with the environment `cargo xtask test` sets (see tests/src/lib.rs).
#[test]
#[ignore = "the stall report's timing under TCG is not yet understood (issue 19)"]
fn a_stalled_disk_gets_the_kernels_blocked_tasks_on_the_console() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut disk = Nvme::create(dir.path(), "slow.img", 2 << 30, "NFTEST0001").expect("disk image");
    disk.latency_secs = Some(200);
    let mut cfg = VmConfig::new(images_dir().join("qemu.iso"), Boot::UsbStick);
    cfg.nvme.push(disk);
    cfg.timeout = std::time::Duration::from_secs(420);
    let mut vm = Vm::start(&cfg).expect("qemu starts");
    vm.wait_for_console("stall: end of the kernel's report")
        .unwrap_or_else(|e| panic!("{e:#}"));
    let console = vm.console();
    eprintln!("{console}");
    assert_console(
        &console,
        "stall: nothing happened for 60 s; the kernel's blocked tasks follow",
    );
    // SysRq w lists the tasks in uninterruptible sleep (D), PID 1 among
    // them, with their kernel stacks.
    let blocked: Vec<&str> = console
        .lines()
        .filter(|l| l.starts_with("kernel: task:") && l.contains("state:D"))
        .collect();
    assert!(
        blocked.iter().any(|l| l.contains(" pid:1 ")),
        "PID 1 is not among the blocked tasks: {blocked:?}"
    );
    assert!(
        console
            .lines()
            .any(|l| l.starts_with("kernel:  ") && l.contains("+0x")),
        "no stack frames on the console"
    );
}

/// Issue 16, item 3: a panic ends with the profile's failure policy. The
/// `qemu` profile says `on-failure = "poweroff"`: before, a panic halted
/// whatever the profile said, and this run would never end. The panic is
/// asked for on the kernel command line (`nodeflash.fault=panic`, see
/// `pid1::PANIC_WORD`): no input is known to reach a panic.
#[test]
fn a_panic_ends_with_the_profiles_failure_policy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let iso = build_variant(
        dir.path(),
        "qemu",
        |p| {
            p.replace(
                "cmdline = \"console=tty0 console=ttyS0,115200 quiet\"",
                "cmdline = \"console=tty0 console=ttyS0,115200 quiet nodeflash.fault=panic\"",
            )
        },
        &[],
    );
    let disk = Nvme::create(dir.path(), "nvme.img", 2 << 30, "NFTEST0001").expect("disk");
    let before = disk.sha256();
    let mut cfg = VmConfig::new(iso, Boot::UsbStick);
    cfg.nvme = vec![disk.clone()];
    let mut vm = Vm::start(&cfg).expect("qemu starts");
    let console = vm.wait_for_poweroff().unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("{console}");
    assert_console(&console, "nodeflash: internal error:");
    assert_console(&console, "nodeflash: FAILED: the installer panicked");
    assert_console(&console, "nodeflash: powering off");
    assert!(
        !console.contains("nodeflash: halted"),
        "the policy is poweroff"
    );
    assert_eq!(disk.sha256(), before, "the disk was changed");
}

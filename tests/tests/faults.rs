//! Faults: a stick whose store payload is damaged (found before the disk is
//! touched), a machine with no disk but the stick, a stalled disk, a panic.

use std::io::{Read, Seek, SeekFrom, Write};
use std::process::Command;

use nodeflash_installer::payload::{Payload, HEADER_LEN};
use nodeflash_tests::{
    assert_console, boot_to_poweroff, build_variant, images_dir, Boot, DiskImage, Nvme, Vm,
    VmConfig,
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

/// A stick whose payload has a damaged frame (header and manifest intact):
/// every frame is read and checked against its sha256 before the disk is
/// touched, so the install stops before partitioning, names the frame, its
/// store paths and what to do, and the disk is byte for byte what it was
/// (issue 19).
#[test]
fn a_damaged_payload_frame_is_found_before_the_disk_is_touched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let iso = dir.path().join("damaged.iso");
    std::fs::copy(images_dir().join("qemu.iso"), &iso).expect("copy the ISO");
    let start = offset_in_iso(&iso, "/nodeflash/store.nfp");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&iso)
        .expect("open");
    f.seek(SeekFrom::Start(start)).expect("seek");
    let Payload {
        header, manifest, ..
    } = Payload::open(&mut f).expect("the payload is where xorriso says");
    // Flip bytes in the middle of the frames: header and manifest stay intact,
    // so this is only found when the data is read.
    let into_frames = header.frames_len / 2;
    let mut end = 0;
    let hit = manifest
        .frames
        .iter()
        .position(|f| {
            end += f.len;
            end > into_frames
        })
        .expect("a frame holds the damage");
    let store_path = manifest.store_path_of_frame(hit).to_string();
    let at = start + HEADER_LEN as u64 + header.manifest_len + into_frames;
    let mut bytes = [0u8; 16];
    f.seek(SeekFrom::Start(at)).expect("seek");
    f.read_exact(&mut bytes).expect("read");
    for b in &mut bytes {
        *b ^= 0x5a;
    }
    f.seek(SeekFrom::Start(at)).expect("seek");
    f.write_all(&bytes).expect("damage the payload");
    drop(f);

    let disk = Nvme::create(dir.path(), "nvme.img", 2 << 30, "NFTEST0001").expect("disk");
    let before = disk.sha256();
    let mut cfg = VmConfig::new(iso, Boot::UsbStick);
    cfg.nvme.push(disk.clone());
    let console = boot_to_poweroff(&cfg);
    assert_console(&console, "store: checking every frame of the payload");
    // The failure and its causes, up to PID 1's last word.
    let failed = console
        .split_once("nodeflash: FAILED: ")
        .and_then(|(_, rest)| rest.split_once("nodeflash: nothing more will be done"))
        .expect("a FAILED line and its causes")
        .0;
    for want in [
        "is damaged; nothing was written to any disk. Write the image to the stick again",
        &format!(
            "payload frame {hit} of {} is damaged (store path",
            manifest.frames.len()
        ),
        &store_path,
        "its sha256 does not match the manifest",
    ] {
        assert!(failed.contains(want), "{want:?} is not in {failed:?}");
    }
    assert!(!console.contains("partitioned"), "nothing was partitioned");
    assert!(
        !console.contains("this console is saved on the disk"),
        "there is no pool to keep the console"
    );
    assert_eq!(disk.sha256(), before, "the disk was changed");
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
    let console = boot_to_poweroff(&VmConfig::new(iso, Boot::UsbStick));
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
    let console = boot_to_poweroff(&cfg);
    assert_console(&console, "nodeflash: internal error:");
    assert_console(&console, "nodeflash: FAILED: the installer panicked");
    assert_console(&console, "nodeflash: powering off");
    assert!(
        !console.contains("nodeflash: halted"),
        "the policy is poweroff"
    );
    assert_eq!(disk.sha256(), before, "the disk was changed");
}

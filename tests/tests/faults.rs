//! Faults: a stick whose store payload is damaged. The damage is found while
//! the store is copied, the install stops naming it, and nothing is made
//! bootable: the target's ESP gets no boot entry.

use std::io::{Read, Seek, SeekFrom, Write};
use std::process::Command;

use nodeflash_installer::payload::{Header, HEADER_LEN};
use nodeflash_tests::{assert_console, images_dir, Boot, Nvme, Vm, VmConfig};

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

    // The ESP (partition 1, at 1 MiB) holds no boot entry: read it with mtools.
    let out = Command::new("mdir")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(format!("{}@@1M", disk.image.display()))
        .arg("::/loader/entries")
        .output()
        .expect("mdir runs (package mtools)");
    assert!(
        !out.status.success() || !String::from_utf8_lossy(&out.stdout).contains("conf"),
        "the ESP has a boot entry: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // …and it is a FAT file system the installer made, not an empty disk.
    let out = Command::new("mdir")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(format!("{}@@1M", disk.image.display()))
        .arg("::/")
        .output()
        .expect("mdir runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

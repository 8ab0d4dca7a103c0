//! Partitioning in QEMU: the planned table lands on the NVMe disk, and every
//! refusal leaves every disk byte-for-byte unchanged.

use std::process::Command;

use nodeflash_installer::facts::{BlockDevice, Facts};
use nodeflash_installer::profile::Profile;
use nodeflash_tests::{
    assert_console, boot_to_poweroff, images_dir, Boot, DiskImage, Nvme, VmConfig,
};

const GIB: u64 = 1 << 30;

fn install(disks: &[Nvme]) -> String {
    install_with("qemu", disks)
}

fn install_with(profile: &str, disks: &[Nvme]) -> String {
    let mut cfg = VmConfig::new(images_dir().join(format!("{profile}.iso")), Boot::UsbStick);
    cfg.nvme = disks.to_vec();
    boot_to_poweroff(&cfg)
}

fn profile() -> Profile {
    nodeflash_tests::load_profile("qemu")
}

/// The partitions the installer must write on `disk`, from the same plan code.
fn expected(disk: &Nvme, size: u64) -> Vec<(u32, u64, u64, String)> {
    let facts = Facts {
        block_devices: vec![BlockDevice::fixed(
            "nvme0n1",
            size,
            disk.logical_block_size,
            "nvme",
            &disk.serial,
        )],
        ..Facts::default()
    };
    let plan = nodeflash_installer::plan::plan(&profile(), &facts).expect("plan");
    plan.partitions
        .iter()
        .map(|p| (p.number, p.first_lba, p.last_lba, p.type_guid.to_string()))
        .collect()
}

fn table(disk: &Nvme) -> Vec<(u32, u64, u64, String)> {
    let lbs = if disk.logical_block_size == 4096 {
        gpt::disk::LogicalBlockSize::Lb4096
    } else {
        gpt::disk::LogicalBlockSize::Lb512
    };
    let gpt = gpt::GptConfig::new()
        .logical_block_size(lbs)
        .open(&disk.image)
        .expect("the disk has a valid GPT");
    gpt.partitions()
        .iter()
        .map(|(n, p)| {
            (
                *n,
                p.first_lba,
                p.last_lba,
                p.part_type_guid.guid.to_string().to_uppercase(),
            )
        })
        .collect()
}

fn installs(lbs: u32) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut disk = Nvme::create(dir.path(), "nvme.img", 2 * GIB, "NFTEST0001").expect("disk");
    disk.logical_block_size = lbs;
    let console = install(std::slice::from_ref(&disk));
    assert_console(&console, "plan: install on nvme0n1");
    assert_console(&console, "partitioned /dev/nvme0n1");
    assert_console(&console, "/dev/nvme0n1p3 Zfs partition GUID");
    assert_console(&console, "nodeflash: powering off");
    assert_eq!(table(&disk), expected(&disk, 2 * GIB));
    // util-linux reads the ESP as FAT32 and the swap area (offsets in bytes).
    let esp = &expected(&disk, 2 * GIB)[0];
    let out = Command::new("blkid")
        .args([
            "-p",
            "-o",
            "export",
            "-O",
            &(esp.1 * u64::from(lbs)).to_string(),
        ])
        .arg(&disk.image)
        .output()
        .expect("blkid runs");
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.contains("VERSION=FAT32") && out.contains("LABEL=ESP"),
        "{out}"
    );
}

#[test]
fn installs_the_planned_layout() {
    installs(512);
}

#[test]
fn installs_on_a_4kn_disk() {
    installs(4096);
}

#[test]
fn refuses_a_disk_with_a_partition_table_and_leaves_it_unchanged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = Nvme::create(dir.path(), "nvme.img", 2 * GIB, "NFTEST0001").expect("disk");
    let status = Command::new("sfdisk")
        .arg("--quiet")
        .arg(&disk.image)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin
                .take()
                .expect("stdin")
                .write_all(b"label: gpt\n,100MiB,L\n")?;
            c.wait()
        })
        .expect("sfdisk runs");
    assert!(status.success());
    let before = disk.sha256();
    let console = install(std::slice::from_ref(&disk));
    assert_console(&console, "disk nvme0n1 is not empty (partitions nvme0n1p1, GPT partition table); nothing was written");
    assert_console(&console, "nodeflash: FAILED");
    assert_eq!(disk.sha256(), before, "the disk was changed");
}

#[test]
fn refuses_two_matching_disks_and_leaves_both_unchanged() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Two disks that both match `bus = "nvme"` and the size range, as two
    // identical drives would in a node. (Two QEMU disks with one serial do
    // not work: Linux rejects the second controller of the same subsystem.)
    let a = Nvme::create(dir.path(), "a.img", 2 * GIB, "NFTEST0001").expect("disk a");
    let b = Nvme::create(dir.path(), "b.img", 2 * GIB, "NFTEST0002").expect("disk b");
    let (ha, hb) = (a.sha256(), b.sha256());
    let console = install_with("qemu-bus", &[a.clone(), b.clone()]);
    assert_console(
        &console,
        "2 disks match the profile's [disk] select rules, refusing to guess",
    );
    assert_console(&console, "nvme0n1 (2.0 GiB");
    assert_console(&console, "nvme1n1 (2.0 GiB");
    assert_eq!((a.sha256(), b.sha256()), (ha, hb), "a disk was changed");
}

#[test]
fn refuses_a_disk_that_is_too_small() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = Nvme::create(dir.path(), "nvme.img", 700 << 20, "NFTEST0001").expect("disk");
    let before = disk.sha256();
    let console = install(std::slice::from_ref(&disk));
    assert_console(&console, "disk nvme0n1 is too small");
    assert_eq!(disk.sha256(), before, "the disk was changed");
}

/// Issue 17, item 4: an ESP that is FAT32 with 512-byte sectors (so the
/// profile check passes) but not with 4096-byte ones is refused by the plan
/// on a 4Kn disk, before anything is written, and the run ends with the
/// profile's `on-failure = "poweroff"`.
#[test]
fn an_esp_too_small_for_fat32_on_a_4kn_disk_is_refused_and_the_disk_unchanged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let iso = nodeflash_tests::build_variant(
        dir.path(),
        "qemu",
        |p| p.replace("esp-size = \"512MiB\"", "esp-size = \"64MiB\""),
        &[],
    );
    let mut disk = Nvme::create(dir.path(), "nvme.img", 2 * GIB, "NFTEST0001").expect("disk");
    disk.logical_block_size = 4096;
    let before = disk.sha256();
    let mut cfg = VmConfig::new(iso, Boot::UsbStick);
    cfg.nvme = vec![disk.clone()];
    let console = boot_to_poweroff(&cfg);
    assert_console(
        &console,
        "the ESP (64MiB) cannot be FAT32 on disk nvme0n1, which has 4096-byte sectors",
    );
    assert_console(&console, "at least 257MiB");
    assert_console(&console, "nodeflash: powering off");
    assert_eq!(disk.sha256(), before, "the disk was changed");
}

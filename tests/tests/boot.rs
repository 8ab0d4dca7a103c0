//! The built `qemu` image booted in QEMU under UEFI, as a USB stick and as a CD.

use nodeflash_tests::{
    assert_console, boot_to_poweroff, images_dir, Boot, DiskImage, Nvme, VmConfig,
};

fn summary() -> serde_json::Value {
    let path = images_dir().join("qemu.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).expect("build summary is JSON")
}

fn boot(boot: Boot) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = VmConfig::new(images_dir().join("qemu.iso"), boot);
    cfg.nvme
        .push(Nvme::create(dir.path(), "nvme.img", 2 << 30, "NFTEST0001").expect("disk image"));
    boot_to_poweroff(&cfg)
}

fn assert_common(console: &str) {
    let s = summary();
    let id = s["image_id"].as_str().expect("image_id");
    assert_console(
        console,
        &format!(
            "nodeflash {} · profile qemu · image {}",
            env!("CARGO_PKG_VERSION"),
            &id[..12]
        ),
    );
    assert_console(console, "kernel modules in");
    assert_console(
        console,
        "disk: nvme0n1 size=2.0 GiB (2147483648 bytes) lbs=512 bus=nvme model=\"QEMU NVMe Ctrl\" serial=\"NFTEST0001\"",
    );
    assert_console(console, "net: eth0 mac=52:54:00:12:34:56 carrier=up");
    assert_console(console, "nodeflash: done in");
    assert_console(console, "nodeflash: powering off");
    assert!(
        !console.contains("warning:"),
        "unexpected warning on the console:\n{console}"
    );
}

#[test]
fn boots_from_usb_stick() {
    let console = boot(Boot::UsbStick);
    assert_common(&console);
    assert_console(&console, "boot medium: /dev/sda");
    assert_console(&console, "bus=usb");
    assert!(
        console
            .lines()
            .any(|l| l.starts_with("disk: sda ") && l.ends_with(" boot-medium")),
        "the stick is not marked as the boot medium:\n{console}"
    );
}

#[test]
fn boots_from_cdrom() {
    let console = boot(Boot::Cdrom);
    assert_common(&console);
    assert_console(&console, "boot medium: /dev/sr0");
}

/// Issue 17, case 11: the stick carries the drivers a homelab node is likely
/// to need (Intel VMD, SAS/RAID HBAs, eMMC, 10G NICs, USB Ethernet) with the
/// firmware Debian packages for them; the boots above load every module
/// without a warning. Read from the built ISO's initramfs.
#[test]
fn the_image_carries_homelab_drivers_and_their_firmware() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let mut s = nodeflash_tests::scan::Scanner::new(Vec::new());
    s.iso(&images_dir().join("qemu.iso"), scratch.path())
        .expect("read the ISO");
    let initramfs = "qemu.iso › ESP:/nodeflash/initrd.zst › zstd › cpio:";
    let files: Vec<&str> = s
        .layers
        .iter()
        .filter_map(|l| l.strip_prefix(initramfs))
        .collect();
    for module in [
        "vmd",
        "mpt3sas",
        "megaraid_sas",
        "sdhci-pci",
        "mmc_block",
        "ixgbe",
        "i40e",
        "mlx4_en",
        "mlx5_core",
        "bnxt_en",
        "tg3",
        "atlantic",
        "r8152",
        "ax88179_178a",
        "cdc_ether",
        "r8169",
    ] {
        assert!(
            files
                .iter()
                .any(|f| f.starts_with("/lib/modules/") && f.ends_with(&format!("/{module}.ko"))),
            "{module}.ko is not in the initramfs"
        );
    }
    // r8169 (RTL8125 2.5G), r8152 (USB) and tg3 load these.
    for fw in [
        "/lib/firmware/rtl_nic/rtl8125a-3.fw",
        "/lib/firmware/rtl_nic/rtl8153a-4.fw",
        "/lib/firmware/tigon/tg3_tso5.bin",
    ] {
        assert!(files.contains(&fw), "{fw} is not in the initramfs");
    }
    let s = summary();
    let n = s["firmware_files"].as_u64().expect("firmware_files");
    assert_eq!(
        n as usize,
        files
            .iter()
            // files are below a vendor directory: /lib/firmware/rtl_nic/…
            .filter(|f| f.starts_with("/lib/firmware/") && f.matches('/').count() == 4)
            .count(),
        "the summary's firmware count is not what the initramfs holds"
    );
}

/// Issue 17, case 12: a machine with Secure Boot on and Microsoft's keys
/// enrolled (as consumer boards ship) starts the stick through Debian's
/// signed chain (shim, GRUB, the kernel) and the installer stops with what
/// to do, before loading the unsigned ZFS modules and before any disk is
/// opened: the NVMe disk is byte for byte what it was.
#[test]
fn under_secure_boot_the_stick_starts_and_stops_before_touching_the_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = Nvme::create(dir.path(), "nvme.img", 2 << 30, "NFTEST0001").expect("disk image");
    // Something to lose: a GPT and bytes at both ends.
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&disk.image)
            .expect("open the disk image");
        f.write_all(&[0xa5; 1 << 20]).expect("write");
        f.seek(SeekFrom::End(-(1 << 20))).expect("seek");
        f.write_all(&[0x5a; 1 << 20]).expect("write");
    }
    let before = disk.sha256();
    let mut cfg = VmConfig::new(images_dir().join("qemu.iso"), Boot::UsbStick);
    cfg.nvme.push(disk.clone());
    cfg.secure_boot = true;
    let console = boot_to_poweroff(&cfg);
    // The signed chain ran: GRUB, then the installer as PID 1.
    assert_console(&console, "Booting `nodeflash qemu");
    assert_console(&console, "nodeflash 0.1.0 · profile qemu");
    assert_console(
        &console,
        &format!(
            "nodeflash: FAILED: {}",
            nodeflash_installer::secureboot::REFUSAL
                .lines()
                .next()
                .expect("first line")
        ),
    );
    assert_console(&console, "turn Secure Boot off in the firmware setup");
    assert_console(&console, "lanzaboote");
    assert_console(&console, "nodeflash: powering off");
    // Stopped before the modules and the disks.
    for never in [
        "kernel modules in",
        "inventory after",
        "EKEYREJECTED",
        "partitioned",
    ] {
        assert!(
            !console.contains(never),
            "{never:?} on the console:\n{console}"
        );
    }
    assert_eq!(disk.sha256(), before, "the disk was changed");
}

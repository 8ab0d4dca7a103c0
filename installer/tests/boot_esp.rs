//! systemd-boot written onto the ESP that `disk::partition` formats, on image
//! files, then checked with independent tools: `fsck.fat -n` (dosfstools)
//! and `mcopy`/`mdir` (mtools) reading every file back byte for byte.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nodeflash_installer::boot::{install_systemd_boot, BootEntry, BootFiles};
use nodeflash_installer::disk::partition;
use nodeflash_installer::facts::{BlockDevice, Facts};
use nodeflash_installer::plan::{plan, PartKind};
use nodeflash_installer::profile::Profile;
use sha2::{Digest, Sha256};

const PROFILE: &str = "name = \"t\"\n[disk]\nselect = { serial = \"NFTEST0001\" }\nesp-size = \"300MiB\"\nswap-size = \"64MiB\"\nwipe = \"always\"\n[pool]\n";

/// Whether the checking tools are there; the reason to skip if not.
fn tools() -> Result<(), String> {
    for (tool, package) in [("fsck.fat", "dosfstools"), ("mcopy", "mtools")] {
        if Command::new(tool).arg("--version").output().is_err() {
            return Err(format!(
                "skipped: {tool} is not installed (apt-get install {package})"
            ));
        }
    }
    Ok(())
}

fn tool(cmd: &mut Command) -> Output {
    cmd.env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Deterministic bytes that differ per `seed`.
fn bytes(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// A disk image partitioned by the installer, and its ESP copied out into a
/// file of its own (as the partition's device node shows it).
fn esp_of_partitioned_disk(dir: &Path, lbs: u32) -> PathBuf {
    let size = 1u64 << 30;
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(size))
        .expect("image file");
    let facts = Facts {
        block_devices: vec![BlockDevice::fixed(
            "nvme0n1",
            size,
            lbs,
            "nvme",
            "NFTEST0001",
        )],
        ..Facts::default()
    };
    let plan = plan(&Profile::parse(PROFILE, "t.toml").expect("profile"), &facts).expect("plan");
    partition(&plan, &img, &[]).expect("partition");
    let esp = &plan.partitions[0];
    assert_eq!(esp.kind, PartKind::Esp);
    let lbs = u64::from(lbs);
    let mut from = std::fs::File::open(&img).expect("open image");
    from.seek(SeekFrom::Start(esp.first_lba * lbs))
        .expect("seek to the ESP");
    let out = dir.join("esp.img");
    let mut to = std::fs::File::create(&out).expect("esp file");
    let n = std::io::copy(&mut from.take(esp.sectors() * lbs), &mut to).expect("copy the ESP");
    assert_eq!(n, esp.sectors() * lbs);
    out
}

struct Inputs {
    efi: PathBuf,
    entry: BootEntry,
}

fn inputs(dir: &Path, seed: u32, kernel_len: usize, initrd_len: usize) -> Inputs {
    let efi = dir.join(format!("systemd-bootx64-{seed}.efi"));
    let kernel = dir.join(format!("vmlinuz-{seed}"));
    let initrd = dir.join(format!("initrd-{seed}"));
    std::fs::write(&efi, bytes(120_000, seed)).expect("efi");
    std::fs::write(&kernel, bytes(kernel_len, seed + 1)).expect("kernel");
    std::fs::write(&initrd, bytes(initrd_len, seed + 2)).expect("initrd");
    Inputs {
        efi,
        entry: BootEntry {
            id: "nodeflash".into(),
            title: format!("NixOS alrest-1 (install {seed})"),
            kernel,
            initrd,
            cmdline: "init=/nix/store/abc-nixos-system/init root=zfs:rpool/safe/root console=ttyS0"
                .into(),
        },
    }
}

/// What each file on the ESP must hold.
fn expected(i: &Inputs) -> Vec<(&'static str, Vec<u8>)> {
    let read = |p: &Path| std::fs::read(p).expect("input");
    vec![
        ("EFI/BOOT/BOOTX64.EFI", read(&i.efi)),
        ("EFI/systemd/systemd-bootx64.efi", read(&i.efi)),
        ("EFI/nodeflash/nodeflash/vmlinuz", read(&i.entry.kernel)),
        ("EFI/nodeflash/nodeflash/initrd", read(&i.entry.initrd)),
        (
            "loader/loader.conf",
            b"timeout 3\ndefault nodeflash.conf\neditor no\n".to_vec(),
        ),
        (
            "loader/entries/nodeflash.conf",
            format!(
                "title {}\nlinux /EFI/nodeflash/nodeflash/vmlinuz\ninitrd /EFI/nodeflash/nodeflash/initrd\noptions {}\n",
                i.entry.title, i.entry.cmdline
            )
            .into_bytes(),
        ),
    ]
}

fn fsck_clean(esp: &Path) {
    let out = tool(Command::new("fsck.fat").arg("-n").arg(esp));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "fsck.fat -n: {text}");
    // A clean run prints the version and one summary line ("ESP: 8 files, …").
    assert!(
        text.lines().count() <= 2 && text.contains(" files, "),
        "fsck.fat -n: {text}"
    );
}

fn mcopy(esp: &Path, path: &str) -> Output {
    tool(
        Command::new("mcopy")
            .arg("-n")
            .arg("-i")
            .arg(esp)
            .arg(format!("::/{path}"))
            .arg("-"),
    )
}

fn check_contents(esp: &Path, want: &[(&str, Vec<u8>)], written: &BootFiles) {
    for (path, content) in want {
        let out = mcopy(esp, path);
        assert!(
            out.status.success(),
            "mcopy {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stdout == *content, "{path} differs on the ESP");
    }
    let report: Vec<(String, u64, String)> = written
        .files
        .iter()
        .map(|f| (f.path.clone(), f.bytes, f.sha256.clone()))
        .collect();
    let want: Vec<(String, u64, String)> = want
        .iter()
        .map(|(p, c)| {
            (
                p.to_string(),
                c.len() as u64,
                hex::encode(Sha256::digest(c)),
            )
        })
        .collect();
    assert_eq!(report, want);
    // Only the entry: no temporary file left beside it.
    let out = tool(
        Command::new("mdir")
            .args(["-b", "-i"])
            .arg(esp)
            .arg("::/loader/entries"),
    );
    let listing = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        listing.split_whitespace().collect::<Vec<_>>(),
        ["::/loader/entries/nodeflash.conf"],
        "{listing}"
    );
}

fn install_twice(lbs: u32) {
    if let Err(skip) = tools() {
        eprintln!("{skip}");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let esp = esp_of_partitioned_disk(dir.path(), lbs);
    // The initrd is larger than the write-back cache (16 MiB).
    let first = inputs(dir.path(), 1, 3 << 20, (20 << 20) + 123);
    let written = install_systemd_boot(&esp, &first.efi, &first.entry).expect("install");
    assert_eq!(written.esp, esp.display().to_string());
    fsck_clean(&esp);
    check_contents(&esp, &expected(&first), &written);

    // Installing again replaces every file, shorter ones included.
    let second = inputs(dir.path(), 7, (1 << 20) + 1, 5 << 20);
    let written = install_systemd_boot(&esp, &second.efi, &second.entry).expect("reinstall");
    fsck_clean(&esp);
    check_contents(&esp, &expected(&second), &written);
}

#[test]
fn systemd_boot_on_a_512_byte_sector_esp() {
    install_twice(512);
}

#[test]
fn systemd_boot_on_a_4kn_esp() {
    install_twice(4096);
}

#[test]
fn a_failed_install_leaves_no_entry() {
    if let Err(skip) = tools() {
        eprintln!("{skip}");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    // A 40 MiB FAT32 volume: the smallest that is FAT32 with 512-byte clusters.
    let esp = dir.path().join("small.img");
    {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&esp)
            .expect("small image");
        f.set_len(40 << 20).expect("size");
        let opts = fatfs::FormatVolumeOptions::new().fat_type(fatfs::FatType::Fat32);
        fatfs::format_volume(&mut f, opts).expect("format");
    }
    // The initrd does not fit: the install stops after the kernel.
    let i = inputs(dir.path(), 3, 1 << 20, 45 << 20);
    let e = install_systemd_boot(&esp, &i.efi, &i.entry).expect_err("no space for the initrd");
    let msg = format!("{e:#}");
    assert!(
        msg.contains("EFI/nodeflash/nodeflash/initrd") && msg.contains(&esp.display().to_string()),
        "{msg}"
    );
    // What was written before is readable; no entry points at the partial initrd.
    let out = mcopy(&esp, "EFI/nodeflash/nodeflash/vmlinuz");
    assert!(out.status.success() && out.stdout.len() == 1 << 20);
    for path in [
        "loader/entries/nodeflash.conf",
        "loader/entries/nodeflash.tmp",
        "loader/loader.conf",
    ] {
        assert!(!mcopy(&esp, path).status.success(), "{path} exists");
    }

    // A missing source is found before the ESP is touched.
    let before = std::fs::read(&esp).expect("read");
    let mut missing = i.entry.clone();
    missing.kernel = dir.path().join("no-such-kernel");
    let e = install_systemd_boot(&esp, &i.efi, &missing).expect_err("missing kernel");
    assert!(format!("{e:#}").contains("no-such-kernel"), "{e:#}");
    assert!(std::fs::read(&esp).expect("read") == before);
}

//! `nodeflash flash`: writes an ISO onto a USB stick and reads it back.
//!
//! The worst thing this command can do is overwrite the wrong disk, so the
//! decision is made from facts read beforehand ([`DeviceFacts`], from a
//! sysfs root and the text of `/proc/self/mountinfo` and `/proc/swaps`) by a
//! pure function ([`decide`]), tested on captured sysfs trees.
//!
//! The rules (see docs/flash.md):
//! - a whole disk only: a partition is refused with the name of its disk, a
//!   character device or any other kind of file is refused;
//! - removable: sysfs `removable` = 1, or the disk hangs below a USB device
//!   (many USB sticks and USB disks report `removable` = 0). This is the rule
//!   udisks and Fedora Media Writer apply (removable, or connection bus USB).
//!   An internal disk (NVMe, SATA, eMMC) is refused; `--force DEVICE` can
//!   override this, naming the device a second time;
//! - not larger than `--max-size` (128 GiB by default): a 2 TB "USB stick" is
//!   most likely a backup disk; `--force DEVICE` can override this too;
//! - never forced: in use (the disk or one of its partitions is mounted, is
//!   active swap, or is held by device-mapper, RAID, LUKS), read-only, without
//!   a medium, or too small for the image. Writing also opens the disk with
//!   `O_EXCL`, so the kernel refuses a disk that became busy since.
//!
//! A regular file (or a path that does not exist yet) is a valid target:
//! that is how images are copied and how the tests run.
//!
//! The read-back check reads the target with `O_DIRECT` on a block device,
//! so the bytes come from the device and not from the page cache. On a
//! regular file the best available is `posix_fadvise(DONTNEED)` after
//! `fsync`, which drops the clean cached pages on most file systems (not on
//! tmpfs, where the page cache is the storage).

mod device;
mod io;
mod policy;

pub use device::*;
pub use io::*;
pub use policy::*;

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nodeflash_installer::units::{human_bytes, human_rate};
use serde::Serialize;

use crate::steps;

/// The default of `--max-size`: larger disks are rarely USB sticks.
pub const DEFAULT_MAX_SIZE: u64 = 128 << 30;

/// What `nodeflash flash` did.
#[derive(Debug, Clone, Serialize)]
pub struct FlashReport {
    pub iso: PathBuf,
    pub target: PathBuf,
    pub sha256: String,
    pub sha256_file_checked: bool,
    pub write: Pass,
    pub verify: Pass,
    /// How the read-back avoided the page cache: `O_DIRECT` or `fadvise`.
    pub read_back: &'static str,
}

impl FlashReport {
    pub fn text(&self) -> String {
        let line = |p: &Pass| {
            format!(
                "{} in {:.1}s ({})",
                human_bytes(p.bytes),
                p.secs,
                human_rate(p.bytes, Duration::from_secs_f64(p.secs))
            )
        };
        format!(
            "{} → {}: written and verified\nsha256:  {}{}\nwrite:   {}\nverify:  {} (read back with {})",
            self.iso.display(),
            self.target.display(),
            self.sha256,
            if self.sha256_file_checked {
                " (matches the .sha256 file)"
            } else {
                ""
            },
            line(&self.write),
            line(&self.verify),
            self.read_back
        )
    }
}

/// Writes `iso` to the already-accepted `target` and verifies it.
pub fn flash(iso: &Path, target: &Target) -> Result<FlashReport> {
    let (sha256, checked) = check_image(iso)?;
    let (path, direct) = match target {
        Target::File(p) => {
            if fs::canonicalize(p).ok() == fs::canonicalize(iso).ok() && p.exists() {
                bail!("{} is the image itself: give another target", p.display());
            }
            (p.clone(), None)
        }
        Target::Disk { path, rdev, facts } => (
            path.clone(),
            Some(Direct {
                logical_block_size: facts.disk.logical_block_size,
                rdev: *rdev,
            }),
        ),
    };
    let write = write_image(iso, &path, direct)?;
    let verify = verify(iso, &path, &sha256, direct.is_some())?;
    Ok(FlashReport {
        iso: iso.to_path_buf(),
        target: path,
        sha256,
        sha256_file_checked: checked,
        write,
        verify,
        read_back: if direct.is_some() {
            "O_DIRECT"
        } else {
            "fadvise"
        },
    })
}

/// The options of `nodeflash flash`.
#[derive(Debug, Clone)]
pub struct Options {
    pub iso: Option<PathBuf>,
    pub device: Option<PathBuf>,
    /// `--force` named `device` again.
    pub forced: bool,
    pub max_size: u64,
    pub json: bool,
    /// `/sys` and `/proc`, or captured copies.
    pub sysfs: PathBuf,
    pub proc: PathBuf,
}

/// Whether two paths name the same device or file (`--force` must repeat
/// DEVICE): the same block device number, or the same resolved path.
pub fn same_device(a: &Path, b: &Path) -> bool {
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(ma), Ok(mb))
            if ma.file_type().is_block_device() && mb.file_type().is_block_device() =>
        {
            ma.rdev() == mb.rdev()
        }
        _ => match (fs::canonicalize(a), fs::canonicalize(b)) {
            (Ok(ca), Ok(cb)) => ca == cb,
            _ => a == b,
        },
    }
}

/// `nodeflash flash`: the listing without a device, else the checks, the
/// write and the read-back.
pub fn command(o: &Options) -> Result<()> {
    let mountinfo_path = o.proc.join("self/mountinfo");
    let mountinfo = fs::read_to_string(&mountinfo_path)
        .with_context(|| format!("cannot read {}", mountinfo_path.display()))?;
    // /proc/swaps is missing without swap support in the kernel.
    let swaps = fs::read_to_string(o.proc.join("swaps")).unwrap_or_default();
    let image_size = match &o.iso {
        Some(iso) => Some(
            fs::metadata(iso)
                .with_context(|| format!("cannot read the image {}", iso.display()))?
                .len(),
        ),
        None => None,
    };
    let policy = Policy {
        max_size: o.max_size,
        image_size,
        forced: o.forced,
    };
    let (Some(iso), Some(device)) = (&o.iso, &o.device) else {
        let listed = list(&o.sysfs, &mountinfo, &swaps, &policy)?;
        if o.json {
            println!("{}", serde_json::to_string_pretty(&listed)?);
        } else {
            print!("{}", format_listing(&listed));
        }
        let Some(first) = listed.iter().find(|l| l.verdict.accepted) else {
            bail!("no disk here can be written: plug in a USB stick (the refused disks are listed with their reasons)");
        };
        if !o.json {
            println!(
                "write one with: nodeflash flash {} {}",
                o.iso
                    .as_deref()
                    .map_or("IMAGE.iso".into(), |p| p.display().to_string()),
                first.device.path.display()
            );
        }
        return Ok(());
    };
    let target = classify(device, &o.sysfs, &mountinfo, &swaps)?;
    if let Target::Disk { facts: d, .. } = &target {
        let verdict = decide(d, &policy);
        if !verdict.accepted {
            let mut msg = format!("refusing to write {}:", device.display());
            for r in &verdict.refusals {
                let _ = write!(msg, "\n  {}: {}\n    fix: {}", r.rule, r.message, r.fix);
            }
            bail!(msg);
        }
        for r in &verdict.refusals {
            steps::note(&format!("forced: {} ({})", r.message, r.rule));
        }
        steps::note(&format!(
            "writing {} to {} ({}, {}, {}, serial {}): everything on it is overwritten",
            iso.display(),
            d.path.display(),
            d.description(),
            human_bytes(d.disk.size_bytes),
            d.disk.bus,
            d.disk.serial.as_deref().unwrap_or("-")
        ));
    }
    let report = flash(iso, &target)?;
    if o.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", report.text());
    }
    Ok(())
}

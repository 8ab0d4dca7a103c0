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

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{IsTerminal, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nodeflash_installer::facts::{
    bus_from_path, human_bytes, read_trimmed, sorted_entries, vpd_serial,
};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::steps;

/// The default of `--max-size`: larger disks are rarely USB sticks.
pub const DEFAULT_MAX_SIZE: u64 = 128 << 30;

/// Writes and reads in blocks of this size.
const BLOCK: usize = 4 << 20;

/// Alignment of the buffers, enough for `O_DIRECT` on any logical block size.
const ALIGN: usize = 4096;

/// What the kernel tells of one whole disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceFacts {
    /// Kernel name, e.g. `sdb`.
    pub name: String,
    /// `/dev/NAME`.
    pub path: PathBuf,
    pub size_bytes: u64,
    pub logical_block_size: u32,
    /// sysfs `removable`.
    pub removable: bool,
    pub read_only: bool,
    /// `usb`, `nvme`, `ata`, `mmc`, `virtio`, `scsi` or `other`.
    pub transport: String,
    pub vendor: Option<String>,
    pub model: Option<String>,
    pub serial: Option<String>,
    /// The disk's partitions (kernel names).
    pub partitions: Vec<String>,
    /// `(device, mount point)` for the disk and its partitions.
    #[serde(serialize_with = "mount_objects")]
    pub mounts: Vec<(String, String)>,
    /// Active swap on the disk or its partitions (device names).
    pub swaps: Vec<String>,
    /// `(device, holder)`: device-mapper, RAID or LUKS on top of them.
    #[serde(serialize_with = "holder_objects")]
    pub holders: Vec<(String, String)>,
}

/// `[{"device": …, "mount_point": …}]` in JSON.
fn mount_objects<S: serde::Serializer>(v: &[(String, String)], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(
        v.iter()
            .map(|(d, m)| serde_json::json!({ "device": d, "mount_point": m })),
    )
}

/// `[{"device": …, "holder": …}]` in JSON.
fn holder_objects<S: serde::Serializer>(v: &[(String, String)], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(
        v.iter()
            .map(|(d, h)| serde_json::json!({ "device": d, "holder": h })),
    )
}

/// Mount points in `/proc/self/mountinfo` text: `(major:minor, source, mount point)`.
pub fn parse_mountinfo(text: &str) -> Vec<(String, String, String)> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let dash = fields.iter().position(|f| *f == "-")?;
            let devno = fields.get(2)?;
            let mount_point = fields.get(4)?;
            let source = fields.get(dash + 2)?;
            Some((devno.to_string(), unescape(source), unescape(mount_point)))
        })
        .collect()
}

/// Undoes the octal escapes of mountinfo (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let n = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            if let Ok(c) = u8::try_from(n) {
                out.push(c);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Active swap devices and files in `/proc/swaps` text.
pub fn parse_swaps(text: &str) -> Vec<String> {
    text.lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .map(unescape)
        .collect()
}

/// The `serial` of the nearest USB device above `dir` in the device tree.
fn usb_serial(sysfs: &Path, dir: &Path) -> Option<String> {
    let top = fs::canonicalize(sysfs.join("devices")).ok()?;
    let mut d = fs::canonicalize(dir).ok()?;
    while d.starts_with(&top) && d != top {
        if d.join("idVendor").exists() || d.join("serial").is_file() {
            if let Some(s) = read_trimmed(&d.join("serial")) {
                return Some(s);
            }
        }
        if !d.pop() {
            break;
        }
    }
    None
}

impl DeviceFacts {
    /// Reads the facts of the whole disk `name` (e.g. `sdb`) from a sysfs
    /// root (`/sys`), and the text of `/proc/self/mountinfo` and `/proc/swaps`.
    pub fn read(sysfs: &Path, name: &str, mountinfo: &str, swaps: &str) -> Result<Self> {
        let dir = sysfs.join("class/block").join(name);
        if !dir.exists() {
            bail!("no block device {name} in {}", sysfs.display());
        }
        let real =
            fs::canonicalize(&dir).with_context(|| format!("cannot resolve {}", dir.display()))?;
        let num = |p: &str| read_trimmed(&dir.join(p)).and_then(|s| s.parse::<u64>().ok());
        let devno = |d: &Path| read_trimmed(&d.join("dev")).unwrap_or_default();
        let partitions: Vec<String> = sorted_entries(&dir)
            .into_iter()
            .filter(|e| dir.join(e).join("partition").exists())
            .collect();
        // The disk and its partitions, by name and by major:minor.
        let mut members = vec![(name.to_string(), devno(&dir))];
        for p in &partitions {
            members.push((p.clone(), devno(&dir.join(p))));
        }
        let mut mounts = Vec::new();
        for (devnum, source, mount_point) in parse_mountinfo(mountinfo) {
            for (member, member_devno) in &members {
                if (!member_devno.is_empty() && devnum == *member_devno)
                    || source == format!("/dev/{member}")
                {
                    mounts.push((member.clone(), mount_point.clone()));
                    break;
                }
            }
        }
        let active_swaps = parse_swaps(swaps);
        let swaps = members
            .iter()
            .filter(|(m, _)| active_swaps.contains(&format!("/dev/{m}")))
            .map(|(m, _)| m.clone())
            .collect();
        let mut holders = Vec::new();
        for (member, _) in &members {
            let member_dir = if member == name {
                dir.clone()
            } else {
                dir.join(member)
            };
            for h in sorted_entries(&member_dir.join("holders")) {
                holders.push((member.clone(), h));
            }
        }
        let device = dir.join("device");
        let serial = read_trimmed(&device.join("serial"))
            .or_else(|| vpd_serial(&device.join("vpd_pg80")))
            .or_else(|| usb_serial(sysfs, &real));
        Ok(Self {
            name: name.to_string(),
            path: Path::new("/dev").join(name),
            size_bytes: num("size").unwrap_or(0) * 512,
            logical_block_size: num("queue/logical_block_size")
                .and_then(|v| u32::try_from(v).ok())
                .unwrap_or(512),
            removable: num("removable") == Some(1),
            read_only: num("ro") == Some(1),
            transport: bus_from_path(name, &real.to_string_lossy()).to_string(),
            // virtio and NVMe put a PCI vendor ID (`0x1af4`) there, not a name.
            vendor: read_trimmed(&device.join("vendor")).filter(|v| !v.starts_with("0x")),
            model: read_trimmed(&device.join("model")),
            serial,
            partitions,
            mounts,
            swaps,
            holders,
        })
    }

    /// `SanDisk Ultra Fit`, or `-`.
    pub fn description(&self) -> String {
        let parts: Vec<&str> = [self.vendor.as_deref(), self.model.as_deref()]
            .into_iter()
            .flatten()
            .collect();
        if parts.is_empty() {
            "-".into()
        } else {
            parts.join(" ")
        }
    }
}

/// What the decision depends on besides the device.
#[derive(Debug, Clone)]
pub struct Policy {
    pub max_size: u64,
    /// The image's size, when there is one (a disk must hold it).
    pub image_size: Option<u64>,
    /// `--force` named this very device.
    pub forced: bool,
}

/// One rule a device breaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refusal {
    /// `not-removable`, `too-large`, `mounted`, `swap`, `held`, `read-only`,
    /// `no-medium` or `too-small`.
    pub rule: &'static str,
    /// What is wrong, naming the device.
    pub message: String,
    /// What to do about it.
    pub fix: String,
    /// Whether `--force DEVICE` overrides it.
    pub forcible: bool,
}

/// The decision on one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub accepted: bool,
    pub refusals: Vec<Refusal>,
}

/// Decides whether `d` may be overwritten. Pure: facts in, verdict out.
pub fn decide(d: &DeviceFacts, policy: &Policy) -> Verdict {
    let dev = d.path.display().to_string();
    let mut refusals = Vec::new();
    let mut refuse = |rule, message: String, fix: String, forcible| {
        refusals.push(Refusal {
            rule,
            message,
            fix,
            forcible,
        });
    };
    if !d.mounts.is_empty() {
        let list: Vec<String> = d
            .mounts
            .iter()
            .map(|(dev, mp)| format!("/dev/{dev} on {mp}"))
            .collect();
        // By mount point: a device mounted in several places needs one
        // umount for each, deepest first.
        let mut points: Vec<&str> = d.mounts.iter().map(|(_, mp)| mp.as_str()).collect();
        points.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
        points.dedup();
        let cmds: Vec<String> = points.iter().map(|mp| format!("umount {mp}")).collect();
        refuse(
            "mounted",
            format!("{dev} is mounted ({})", list.join(", ")),
            format!(
                "unmount it first (`{}`) if it really is the stick to overwrite; --force does not override this",
                cmds.join("; ")
            ),
            false,
        );
    }
    if !d.swaps.is_empty() {
        let list: Vec<String> = d.swaps.iter().map(|s| format!("/dev/{s}")).collect();
        refuse(
            "swap",
            format!("{dev} holds active swap ({})", list.join(", ")),
            format!(
                "turn it off first (`swapoff {}`); --force does not override this",
                list.join(" ")
            ),
            false,
        );
    }
    if !d.holders.is_empty() {
        let list: Vec<String> = d
            .holders
            .iter()
            .map(|(dev, h)| format!("/dev/{dev} is held by {h}"))
            .collect();
        refuse(
            "held",
            format!("{dev} is in use: {}", list.join(", ")),
            "close what uses it first (`cryptsetup close`, `vgchange -an`, `mdadm --stop`); --force does not override this".into(),
            false,
        );
    }
    if d.read_only {
        refuse(
            "read-only",
            format!("{dev} is read-only (sysfs ro=1)"),
            "slide the write-protect switch of the card or stick to unlocked and plug it in again"
                .into(),
            false,
        );
    }
    if d.size_bytes == 0 {
        refuse(
            "no-medium",
            format!("{dev} has no medium (size 0)"),
            "insert the card into the reader, or plug the stick in again".into(),
            false,
        );
    } else if let Some(image) = policy.image_size.filter(|&n| n > d.size_bytes) {
        refuse(
            "too-small",
            format!(
                "{dev} ({}) is smaller than the image ({})",
                human_bytes(d.size_bytes),
                human_bytes(image)
            ),
            "use a larger stick".into(),
            false,
        );
    }
    if !d.removable && d.transport != "usb" {
        refuse(
            "not-removable",
            format!(
                "{dev} is not a removable disk (sysfs removable=0, transport {}): likely an internal disk",
                d.transport
            ),
            format!("pick a USB stick (`nodeflash flash` lists them); if {dev} really is the stick, add --force {dev}"),
            true,
        );
    }
    if d.size_bytes > policy.max_size {
        refuse(
            "too-large",
            format!(
                "{dev} ({}) is larger than --max-size ({}): likely not a USB stick",
                human_bytes(d.size_bytes),
                human_bytes(policy.max_size)
            ),
            format!("if {dev} really is the stick, raise --max-size or add --force {dev}"),
            true,
        );
    }
    let accepted = refusals.iter().all(|r| r.forcible && policy.forced);
    Verdict { accepted, refusals }
}

/// The devices the listing skips: virtual ones and optical drives.
fn is_listed(name: &str) -> bool {
    !["loop", "ram", "zram", "dm-", "md", "nbd", "zd", "sr", "fd"]
        .iter()
        .any(|p| name.starts_with(p))
}

/// One line of the listing.
#[derive(Debug, Clone, Serialize)]
pub struct Listed {
    #[serde(flatten)]
    pub device: DeviceFacts,
    #[serde(flatten)]
    pub verdict: Verdict,
}

/// Every whole disk of `sysfs` with its verdict (nothing forced).
pub fn list(sysfs: &Path, mountinfo: &str, swaps: &str, policy: &Policy) -> Result<Vec<Listed>> {
    let policy = Policy {
        forced: false,
        ..policy.clone()
    };
    sorted_entries(&sysfs.join("block"))
        .into_iter()
        .filter(|n| is_listed(n))
        .map(|name| {
            let device = DeviceFacts::read(sysfs, &name, mountinfo, swaps)?;
            let verdict = decide(&device, &policy);
            Ok(Listed { device, verdict })
        })
        .collect()
}

/// The listing for people: the disks it would accept, then the refused
/// ones with their reasons.
pub fn format_listing(listed: &[Listed]) -> String {
    let mut out = String::new();
    let line = |out: &mut String, l: &Listed| {
        let d = &l.device;
        let _ = writeln!(
            out,
            "  {:<14} {:>10}  {:<28} {:<6} serial {}",
            d.path.display(),
            human_bytes(d.size_bytes),
            d.description(),
            d.transport,
            d.serial.as_deref().unwrap_or("-"),
        );
    };
    let (ok, refused): (Vec<&Listed>, Vec<&Listed>) =
        listed.iter().partition(|l| l.verdict.accepted);
    let _ = writeln!(out, "accepted ({}):", ok.len());
    if ok.is_empty() {
        let _ = writeln!(out, "  none: plug in a USB stick");
    }
    for l in &ok {
        line(&mut out, l);
    }
    if !refused.is_empty() {
        let _ = writeln!(out, "refused ({}):", refused.len());
    }
    for l in &refused {
        line(&mut out, l);
        for r in &l.verdict.refusals {
            let _ = writeln!(out, "      {}: {}", r.rule, r.message);
        }
    }
    out
}

/// What the target path is.
#[derive(Debug)]
pub enum Target {
    /// A regular file, or a path that does not exist yet.
    File(PathBuf),
    /// A whole disk: the path given, its device number, its facts.
    Disk {
        path: PathBuf,
        rdev: u64,
        facts: Box<DeviceFacts>,
    },
}

/// Classifies `path`: a regular file, a new file, or a whole disk (whose
/// facts are read). Partitions, character devices and other kinds of file
/// are refused.
pub fn classify(path: &Path, sysfs: &Path, mountinfo: &str, swaps: &str) -> Result<Target> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Target::File(path.to_path_buf()))
        }
        Err(e) => return Err(e).with_context(|| format!("cannot inspect {}", path.display())),
    };
    let ft = meta.file_type();
    if ft.is_file() {
        return Ok(Target::File(path.to_path_buf()));
    }
    if ft.is_char_device() {
        bail!(
            "{} is a character device, not a disk: give the stick's block device, e.g. /dev/sdX (`nodeflash flash` lists them)",
            path.display()
        );
    }
    if !ft.is_block_device() {
        bail!(
            "{} is neither a block device nor a regular file: give the stick's block device, e.g. /dev/sdX (`nodeflash flash` lists them)",
            path.display()
        );
    }
    let rdev = meta.rdev();
    let devno = format!(
        "{}:{}",
        nix::sys::stat::major(rdev),
        nix::sys::stat::minor(rdev)
    );
    let name = kernel_name(sysfs, &devno).with_context(|| {
        format!(
            "cannot find {} ({devno}) in {}",
            path.display(),
            sysfs.display()
        )
    })?;
    if let Some(disk) = partition_parent(sysfs, &name) {
        bail!(
            "{} is a partition of /dev/{disk}: the image must be written to the whole disk, give /dev/{disk}",
            path.display()
        );
    }
    Ok(Target::Disk {
        path: path.to_path_buf(),
        rdev,
        facts: Box::new(DeviceFacts::read(sysfs, &name, mountinfo, swaps)?),
    })
}

/// The kernel name of the block device `major:minor`.
pub fn kernel_name(sysfs: &Path, devno: &str) -> Result<String> {
    let link = sysfs.join("dev/block").join(devno);
    let real =
        fs::canonicalize(&link).with_context(|| format!("cannot resolve {}", link.display()))?;
    Ok(real
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default())
}

/// For a partition, the kernel name of its disk.
pub fn partition_parent(sysfs: &Path, name: &str) -> Option<String> {
    let dir = sysfs.join("class/block").join(name);
    if !dir.join("partition").exists() {
        return None;
    }
    let real = fs::canonicalize(&dir).ok()?;
    Some(real.parent()?.file_name()?.to_string_lossy().into_owned())
}

/// A buffer of `len` bytes aligned for `O_DIRECT`, kept in an owning Vec.
struct Aligned {
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Self {
        let buf = vec![0u8; len + ALIGN];
        let start = buf.as_ptr().align_offset(ALIGN);
        Self { buf, start, len }
    }
    fn get(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

/// Reads until `buf` is full or the end of the file; returns the count.
fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Progress of one pass: a bar when stderr is a terminal, else a plain
/// line every few seconds (and nothing when quiet).
pub struct Progress {
    what: String,
    total: u64,
    bar: Option<indicatif::ProgressBar>,
    started: Instant,
    last_line: Instant,
    interval: Duration,
}

impl Progress {
    pub fn new(what: &str, total: u64) -> Self {
        let bar = (std::io::stderr().is_terminal() && !steps::quiet()).then(|| {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "    {msg} [{elapsed_precise}] {bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.set_message(what.to_string());
            bar
        });
        let now = Instant::now();
        Self {
            what: what.to_string(),
            total,
            bar,
            started: now,
            last_line: now,
            interval: Duration::from_secs(5),
        }
    }

    pub fn set(&mut self, done: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(done);
        } else if !steps::quiet() && self.last_line.elapsed() >= self.interval {
            self.last_line = Instant::now();
            eprintln!(
                "    {}: {} of {} ({:.0}%), {}",
                self.what,
                human_bytes(done),
                human_bytes(self.total),
                done as f64 * 100.0 / self.total.max(1) as f64,
                rate(done, self.started.elapsed())
            );
        }
    }

    fn finish(self) -> Duration {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        self.started.elapsed()
    }
}

/// `35.2 MiB/s`.
pub fn rate(bytes: u64, took: Duration) -> String {
    let secs = took.as_secs_f64().max(1e-6);
    format!("{}/s", human_bytes((bytes as f64 / secs) as u64))
}

/// The sha256 of a file.
pub fn sha256_of(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(hex::encode(h.finalize()))
}

/// Checks the ISO against `NAME.iso.sha256` beside it (the builder writes
/// one); returns the ISO's sha256 and whether a sha256 file was there.
pub fn check_image(iso: &Path) -> Result<(String, bool)> {
    let sha = sha256_of(iso)?;
    let mut side = iso.as_os_str().to_owned();
    side.push(".sha256");
    let side = PathBuf::from(side);
    let text = match fs::read_to_string(&side) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((sha, false)),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", side.display())),
    };
    let want = text
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    if want.len() != 64 || !want.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("{} does not hold a sha256 (64 hex digits)", side.display());
    }
    if want != sha {
        bail!(
            "{} does not match {}: its sha256 is {sha}, the file says {want}; the image is damaged or was changed since it was built: build it again",
            iso.display(),
            side.display()
        );
    }
    Ok((sha, true))
}

/// How a pass went.
#[derive(Debug, Clone, Serialize)]
pub struct Pass {
    pub bytes: u64,
    pub secs: f64,
}

/// A disk as checked: its logical block size and device number.
#[derive(Debug, Clone, Copy)]
pub struct Direct {
    pub logical_block_size: u32,
    pub rdev: u64,
}

/// Writes `iso` onto `target` in 4 MiB blocks and syncs it. On a disk
/// (`direct`), the writes bypass the page cache, the disk is opened
/// exclusively and must still be the device that was checked; the tail is
/// padded with zeros to a whole logical block.
pub fn write_image(iso: &Path, target: &Path, direct: Option<Direct>) -> Result<Pass> {
    let mut src = File::open(iso).with_context(|| format!("cannot open {}", iso.display()))?;
    let len = src
        .metadata()
        .with_context(|| format!("cannot inspect {}", iso.display()))?
        .len();
    let mut opts = OpenOptions::new();
    opts.write(true);
    if direct.is_some() {
        opts.custom_flags((nix::fcntl::OFlag::O_DIRECT | nix::fcntl::OFlag::O_EXCL).bits());
    } else {
        opts.create(true);
    }
    let mut dst = opts.open(target).map_err(|e| {
        if e.raw_os_error() == Some(nix::libc::EBUSY) {
            anyhow::anyhow!(
                "{} is in use (mounted, swap or held since it was checked): unmount it and try again",
                target.display()
            )
        } else {
            anyhow::Error::new(e).context(format!("cannot open {} for writing", target.display()))
        }
    })?;
    if let Some(d) = direct {
        let rdev = dst
            .metadata()
            .with_context(|| format!("cannot inspect {}", target.display()))?
            .rdev();
        if rdev != d.rdev {
            bail!(
                "{} changed since it was checked (device {}:{} instead of {}:{}): run the command again",
                target.display(),
                nix::sys::stat::major(rdev),
                nix::sys::stat::minor(rdev),
                nix::sys::stat::major(d.rdev),
                nix::sys::stat::minor(d.rdev)
            );
        }
    }
    let mut buf = Aligned::new(BLOCK);
    let mut progress = Progress::new(&format!("writing {}", target.display()), len);
    let mut done = 0u64;
    loop {
        let n = read_full(&mut src, buf.get())
            .with_context(|| format!("cannot read {}", iso.display()))?;
        if n == 0 {
            break;
        }
        let mut chunk = n;
        if let Some(d) = direct {
            let lbs = d.logical_block_size.max(512) as usize;
            if n % lbs != 0 {
                chunk = n.div_ceil(lbs) * lbs;
                buf.get()[n..chunk].fill(0);
            }
        }
        dst.write_all(&buf.get()[..chunk])
            .with_context(|| format!("cannot write {} at byte {done}", target.display()))?;
        done += n as u64;
        progress.set(done);
        if n < BLOCK {
            break;
        }
    }
    if done != len {
        bail!(
            "{} changed while it was written ({done} of {len} bytes read)",
            iso.display()
        );
    }
    if direct.is_none() {
        dst.set_len(len)
            .with_context(|| format!("cannot truncate {}", target.display()))?;
    }
    dst.sync_all()
        .with_context(|| format!("cannot sync {}", target.display()))?;
    let took = progress.finish();
    Ok(Pass {
        bytes: len,
        secs: took.as_secs_f64(),
    })
}

/// Reads the first `len` bytes of `target` back (with `O_DIRECT` when
/// `direct`, else after dropping its cached pages), compares them with
/// `iso` and checks their sha256 against `iso_sha256`. A difference is an
/// error naming the first differing byte.
pub fn verify(iso: &Path, target: &Path, iso_sha256: &str, direct: bool) -> Result<Pass> {
    let mut src = File::open(iso).with_context(|| format!("cannot open {}", iso.display()))?;
    let len = src
        .metadata()
        .with_context(|| format!("cannot inspect {}", iso.display()))?
        .len();
    let mut opts = OpenOptions::new();
    opts.read(true);
    if direct {
        opts.custom_flags(nix::fcntl::OFlag::O_DIRECT.bits());
    }
    let mut dst = opts
        .open(target)
        .with_context(|| format!("cannot open {} to read it back", target.display()))?;
    if !direct {
        // Best effort: the clean pages of a synced file are dropped, so the
        // reads below go to the storage (not possible on tmpfs).
        let _ = nix::fcntl::posix_fadvise(
            &dst,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
    }
    let mut want = vec![0u8; BLOCK];
    let mut got = Aligned::new(BLOCK);
    let mut h = Sha256::new();
    let mut progress = Progress::new(&format!("verifying {}", target.display()), len);
    let mut done = 0u64;
    while done < len {
        let n = read_full(&mut src, &mut want)
            .with_context(|| format!("cannot read {}", iso.display()))?;
        if n == 0 {
            bail!("{} got shorter while it was verified", iso.display());
        }
        // With O_DIRECT, read whole blocks (the device is larger than the image).
        let ask = if direct { n.div_ceil(ALIGN) * ALIGN } else { n };
        let k = read_full(&mut dst, &mut got.get()[..ask])
            .with_context(|| format!("cannot read {} back at byte {done}", target.display()))?;
        let got = &got.get()[..k.min(n)];
        if let Some(i) = got.iter().zip(&want[..n]).position(|(a, b)| a != b) {
            let at = done + i as u64;
            bail!(
                "{} does not hold the image: first difference at byte {at} (0x{at:x}); the stick may be failing or fake: write it again or use another stick",
                target.display()
            );
        }
        if got.len() < n {
            let at = done + got.len() as u64;
            bail!(
                "{} does not hold the image: it ends at byte {at}, the image has {len} bytes",
                target.display()
            );
        }
        h.update(got);
        done += n as u64;
        progress.set(done);
    }
    let sha = hex::encode(h.finalize());
    if sha != iso_sha256 {
        bail!(
            "{} reads back with sha256 {sha}, the image's is {iso_sha256}",
            target.display()
        );
    }
    let took = progress.finish();
    Ok(Pass {
        bytes: len,
        secs: took.as_secs_f64(),
    })
}

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
                rate(p.bytes, Duration::from_secs_f64(p.secs))
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
                logical_block_size: facts.logical_block_size,
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
            human_bytes(d.size_bytes),
            d.transport,
            d.serial.as_deref().unwrap_or("-")
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A sysfs tree captured from a laptop with six disks plugged in (see
    /// tests/fixtures/flash/README.md), with its mountinfo and swaps.
    fn fixture() -> (PathBuf, String, String) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/flash");
        let read = |n: &str| fs::read_to_string(dir.join(n)).expect("fixture file");
        (
            dir.join("sys"),
            read("proc/self/mountinfo"),
            read("proc/swaps"),
        )
    }

    fn facts(name: &str) -> DeviceFacts {
        let (sys, mi, sw) = fixture();
        DeviceFacts::read(&sys, name, &mi, &sw).expect("facts")
    }

    fn policy() -> Policy {
        Policy {
            max_size: DEFAULT_MAX_SIZE,
            image_size: Some(700 << 20),
            forced: false,
        }
    }

    fn rules(v: &Verdict) -> Vec<&'static str> {
        v.refusals.iter().map(|r| r.rule).collect()
    }

    #[test]
    fn usb_stick_is_accepted() {
        let d = facts("sda");
        assert_eq!(d.path, Path::new("/dev/sda"));
        assert_eq!(d.size_bytes, 60063744 * 512);
        assert_eq!(d.transport, "usb");
        assert!(d.removable && !d.read_only);
        assert_eq!(d.description(), "SanDisk Ultra Fit");
        assert_eq!(d.serial.as_deref(), Some("4C530001230913117105"));
        assert_eq!(d.partitions, ["sda1"]);
        assert!(d.mounts.is_empty() && d.swaps.is_empty() && d.holders.is_empty());
        let v = decide(&d, &policy());
        assert!(v.accepted, "{v:#?}");
        assert!(v.refusals.is_empty());
    }

    #[test]
    fn internal_nvme_is_refused_and_mounted_is_never_forced() {
        let d = facts("nvme0n1");
        assert_eq!(d.transport, "nvme");
        assert_eq!(d.serial.as_deref(), Some("S4EWNX0R123456"));
        assert_eq!(
            d.mounts,
            [
                ("nvme0n1p2".to_string(), "/".to_string()),
                ("nvme0n1p1".to_string(), "/boot/efi".to_string())
            ]
        );
        let v = decide(&d, &policy());
        assert!(!v.accepted);
        assert_eq!(rules(&v), ["mounted", "not-removable", "too-large"]);
        let forced = decide(
            &d,
            &Policy {
                forced: true,
                ..policy()
            },
        );
        assert!(!forced.accepted, "--force never overrides mounted");
        let m = &v.refusals[0];
        assert!(
            m.message.contains("/dev/nvme0n1 is mounted"),
            "{}",
            m.message
        );
        assert!(
            m.fix.contains("(`umount /boot/efi; umount /`)"),
            "{}",
            m.fix
        );
        assert!(!m.forcible);
    }

    #[test]
    fn sata_disk_is_refused_unless_forced() {
        let d = facts("sdb");
        assert_eq!(d.transport, "ata");
        assert_eq!(
            d.serial.as_deref(),
            Some("WD-WCC4E1234567"),
            "from VPD page 0x80"
        );
        let small = Policy {
            max_size: 8 << 40,
            ..policy()
        };
        let v = decide(&d, &small);
        assert_eq!(rules(&v), ["not-removable"]);
        assert!(!v.accepted);
        let r = &v.refusals[0];
        assert!(
            r.message.contains("/dev/sdb is not a removable disk"),
            "{}",
            r.message
        );
        assert!(r.fix.contains("--force /dev/sdb"), "{}", r.fix);
        assert!(
            decide(
                &d,
                &Policy {
                    forced: true,
                    ..small
                }
            )
            .accepted
        );
    }

    #[test]
    fn mounted_stick_is_refused_with_the_mount_point() {
        let d = facts("sdc");
        assert_eq!(
            d.mounts,
            [("sdc1".to_string(), "/media/alice/MY STICK".to_string())]
        );
        let v = decide(
            &d,
            &Policy {
                forced: true,
                ..policy()
            },
        );
        assert_eq!(rules(&v), ["mounted"]);
        assert!(!v.accepted);
        assert!(v.refusals[0]
            .message
            .contains("/dev/sdc1 on /media/alice/MY STICK"));
    }

    #[test]
    fn large_usb_disk_is_refused_over_the_limit() {
        let d = facts("sdd");
        assert!(!d.removable, "removable=0, but on the USB transport");
        assert_eq!(d.transport, "usb");
        let v = decide(&d, &policy());
        assert_eq!(rules(&v), ["too-large"]);
        assert!(
            v.refusals[0].message.contains("2.0 TB") || v.refusals[0].message.contains("1.8 TiB"),
            "{}",
            v.refusals[0].message
        );
        assert!(
            decide(
                &d,
                &Policy {
                    forced: true,
                    ..policy()
                }
            )
            .accepted
        );
        assert!(
            decide(
                &d,
                &Policy {
                    max_size: 4 << 40,
                    ..policy()
                }
            )
            .accepted
        );
    }

    #[test]
    fn read_only_card_is_refused_even_forced() {
        let d = facts("sde");
        assert!(d.read_only);
        let v = decide(
            &d,
            &Policy {
                forced: true,
                ..policy()
            },
        );
        assert_eq!(rules(&v), ["read-only"]);
        assert!(!v.accepted);
        assert!(v.refusals[0].fix.contains("write-protect"));
    }

    #[test]
    fn swap_and_holders_are_in_use() {
        let d = facts("sdf");
        assert_eq!(d.swaps, ["sdf2"]);
        assert_eq!(d.holders, [("sdf1".to_string(), "dm-0".to_string())]);
        let v = decide(
            &d,
            &Policy {
                forced: true,
                ..policy()
            },
        );
        assert_eq!(rules(&v), ["swap", "held"]);
        assert!(!v.accepted);
        assert!(v.refusals[0].fix.contains("swapoff /dev/sdf2"));
    }

    #[test]
    fn too_small_and_no_medium() {
        let mut d = facts("sda");
        let big = Policy {
            image_size: Some(64 << 30),
            ..policy()
        };
        assert_eq!(rules(&decide(&d, &big)), ["too-small"]);
        d.size_bytes = 0;
        assert_eq!(rules(&decide(&d, &policy())), ["no-medium"]);
    }

    #[test]
    fn partitions_name_their_disk() {
        let (sys, _, _) = fixture();
        assert_eq!(kernel_name(&sys, "8:33").expect("8:33"), "sdc1");
        assert_eq!(partition_parent(&sys, "sdc1").as_deref(), Some("sdc"));
        assert_eq!(
            partition_parent(&sys, "nvme0n1p2").as_deref(),
            Some("nvme0n1")
        );
        assert_eq!(partition_parent(&sys, "sdc"), None);
    }

    #[test]
    fn listing_accepts_sticks_and_gives_reasons() {
        let (sys, mi, sw) = fixture();
        let listed = list(&sys, &mi, &sw, &policy()).expect("list");
        let names: Vec<(&str, bool)> = listed
            .iter()
            .map(|l| (l.device.name.as_str(), l.verdict.accepted))
            .collect();
        assert_eq!(
            names,
            [
                ("nvme0n1", false),
                ("sda", true),
                ("sdb", false),
                ("sdc", false),
                ("sdd", false),
                ("sde", false),
                ("sdf", false)
            ],
            "loop0 and sr0 are not listed"
        );
        let text = format_listing(&listed);
        assert!(text.starts_with("accepted (1):\n  /dev/sda "), "{text}");
        assert!(text.contains("SanDisk Ultra Fit"), "{text}");
        assert!(text.contains("refused (6):"), "{text}");
        assert!(
            text.contains("      read-only: /dev/sde is read-only"),
            "{text}"
        );
        assert!(
            text.contains("      not-removable: /dev/sdb is not a removable disk"),
            "{text}"
        );
    }

    #[test]
    fn mountinfo_and_swaps_parse() {
        let m = parse_mountinfo("118 26 8:33 / /media/a\\040b rw - exfat /dev/sdc1 rw\n");
        assert_eq!(
            m,
            [("8:33".into(), "/dev/sdc1".into(), "/media/a b".into())]
        );
        assert_eq!(
            parse_swaps("Filename Type Size Used Priority\n/swap\\040file file 1 0 -2\n"),
            ["/swap file"]
        );
    }

    #[test]
    fn round_trip_on_a_file() {
        let t = tempfile::tempdir().expect("tempdir");
        let iso = t.path().join("x.iso");
        // Not a multiple of the block size, and more than one block.
        let data: Vec<u8> = (0..(BLOCK + 12345)).map(|i| (i * 7 % 251) as u8).collect();
        fs::write(&iso, &data).expect("write iso");
        let out = t.path().join("stick.img");
        fs::write(&out, vec![0xffu8; BLOCK * 3]).expect("an old, larger image");
        let r = flash(&iso, &Target::File(out.clone())).expect("flash");
        assert_eq!(fs::read(&out).expect("read"), data);
        assert_eq!(r.sha256, hex::encode(Sha256::digest(&data)));
        assert_eq!(
            (r.write.bytes, r.verify.bytes),
            (data.len() as u64, data.len() as u64)
        );
        assert!(!r.sha256_file_checked);
        assert_eq!(r.read_back, "fadvise");
    }

    #[test]
    fn verify_names_the_first_difference() {
        let t = tempfile::tempdir().expect("tempdir");
        let iso = t.path().join("x.iso");
        let data: Vec<u8> = (0..(BLOCK * 2 + 100)).map(|i| (i % 253) as u8).collect();
        fs::write(&iso, &data).expect("write iso");
        let sha = sha256_of(&iso).expect("sha");
        let bad = t.path().join("bad.img");
        let mut copy = data.clone();
        let at = BLOCK + 4242;
        copy[at] ^= 0x40;
        fs::write(&bad, &copy).expect("write");
        let e = format!(
            "{:#}",
            verify(&iso, &bad, &sha, false).expect_err("mismatch")
        );
        assert!(
            e.contains(&format!("first difference at byte {at} (0x{at:x})")),
            "{e}"
        );
        assert!(e.contains(&bad.display().to_string()), "{e}");
        // A target that stops short.
        fs::write(&bad, &data[..BLOCK + 7]).expect("write");
        let e = format!("{:#}", verify(&iso, &bad, &sha, false).expect_err("short"));
        assert!(e.contains(&format!("ends at byte {}", BLOCK + 7)), "{e}");
        // The same bytes verify.
        fs::write(&bad, &data).expect("write");
        verify(&iso, &bad, &sha, false).expect("equal bytes verify");
    }

    #[test]
    fn the_sha256_file_is_checked_first() {
        let t = tempfile::tempdir().expect("tempdir");
        let iso = t.path().join("n.iso");
        fs::write(&iso, b"image").expect("write");
        let good = hex::encode(Sha256::digest(b"image"));
        fs::write(t.path().join("n.iso.sha256"), format!("{good}  n.iso\n")).expect("write");
        assert_eq!(check_image(&iso).expect("matches"), (good, true));
        fs::write(
            t.path().join("n.iso.sha256"),
            format!("{}  n.iso\n", "0".repeat(64)),
        )
        .expect("write");
        let out = t.path().join("out.img");
        let e = format!(
            "{:#}",
            flash(&iso, &Target::File(out.clone())).expect_err("damaged")
        );
        assert!(
            e.contains("does not match") && e.contains("n.iso.sha256"),
            "{e}"
        );
        assert!(!out.exists(), "nothing written");
    }
}

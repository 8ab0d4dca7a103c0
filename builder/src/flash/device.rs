//! What the kernel tells of a disk: its facts from sysfs, what
//! `/proc/self/mountinfo` and `/proc/swaps` say uses it, and what a target
//! path is.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nodeflash_installer::facts::{bus_from_path, read_trimmed, sorted_entries, BlockDevice};
use serde::Serialize;

/// What the kernel tells of one whole disk: the installer's model of a
/// disk ([`BlockDevice`], shared with `nodeflash facts` and the plan) and
/// what uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceFacts {
    /// Name, size, logical block size, bus, removable, read-only, model,
    /// serial (for a USB stick, the USB device's serial when the disk has none).
    pub disk: BlockDevice,
    /// `/dev/NAME`.
    pub path: PathBuf,
    pub vendor: Option<String>,
    /// The disk's partitions (kernel names).
    pub partitions: Vec<String>,
    /// `(device, mount point)` for the disk and its partitions.
    pub mounts: Vec<(String, String)>,
    /// Active swap on the disk or its partitions (device names).
    pub swaps: Vec<String>,
    /// `(device, holder)`: device-mapper, RAID or LUKS on top of them.
    pub holders: Vec<(String, String)>,
}

/// [`DeviceFacts`] as `nodeflash flash --json` prints it.
#[derive(Serialize)]
struct DeviceJson<'a> {
    name: &'a str,
    path: &'a Path,
    size_bytes: u64,
    logical_block_size: u32,
    removable: bool,
    read_only: bool,
    /// `usb`, `nvme`, `ata`, `mmc`, `virtio`, `scsi` or `other`.
    transport: &'static str,
    vendor: &'a Option<String>,
    model: &'a Option<String>,
    serial: &'a Option<String>,
    partitions: &'a [String],
    #[serde(serialize_with = "mount_objects")]
    mounts: &'a [(String, String)],
    swaps: &'a [String],
    #[serde(serialize_with = "holder_objects")]
    holders: &'a [(String, String)],
}

impl Serialize for DeviceFacts {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let d = &self.disk;
        DeviceJson {
            name: &d.name,
            path: &self.path,
            size_bytes: d.size_bytes,
            logical_block_size: d.logical_block_size,
            removable: d.removable,
            read_only: d.read_only,
            transport: d.bus.as_str(),
            vendor: &self.vendor,
            model: &d.model,
            serial: &d.serial,
            partitions: &self.partitions,
            mounts: &self.mounts,
            swaps: &self.swaps,
            holders: &self.holders,
        }
        .serialize(s)
    }
}

/// `[{"device": …, "mount_point": …}]` in JSON.
fn mount_objects<S: serde::Serializer>(v: &&[(String, String)], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(
        v.iter()
            .map(|(d, m)| serde_json::json!({ "device": d, "mount_point": m })),
    )
}

/// `[{"device": …, "holder": …}]` in JSON.
fn holder_objects<S: serde::Serializer>(v: &&[(String, String)], s: S) -> Result<S::Ok, S::Error> {
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
        let mut disk = BlockDevice::read(name, &dir, bus_from_path(name, &real.to_string_lossy()));
        disk.serial = disk.serial.or_else(|| usb_serial(sysfs, &real));
        Ok(Self {
            path: Path::new("/dev").join(name),
            // virtio and NVMe put a PCI vendor ID (`0x1af4`) there, not a name.
            vendor: read_trimmed(&dir.join("device/vendor")).filter(|v| !v.starts_with("0x")),
            disk,
            partitions,
            mounts,
            swaps,
            holders,
        })
    }

    /// `SanDisk Ultra Fit`, or `-`.
    pub fn description(&self) -> String {
        let parts: Vec<&str> = [self.vendor.as_deref(), self.disk.model.as_deref()]
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

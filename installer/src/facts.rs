//! Facts about the machine, read from sysfs: block devices, network
//! interfaces and DMI identity. Reading takes the sysfs root as a parameter,
//! so plans can be computed from captured facts on any host.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Facts {
    pub dmi: Dmi,
    pub block_devices: Vec<BlockDevice>,
    pub net: Vec<NetInterface>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dmi {
    pub sys_vendor: Option<String>,
    pub product_name: Option<String>,
    pub product_serial: Option<String>,
    pub product_uuid: Option<String>,
}

/// The bus a disk hangs on: in the profile's `[disk] select` (where
/// `sata` and `ata` name the same bus, and `other` is not accepted) and in
/// the facts read from sysfs ([`bus_from_path`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Bus {
    Nvme,
    /// SATA/ATA disks (facts say `ata`; `ata` is accepted here too).
    #[serde(alias = "ata")]
    Sata,
    Virtio,
    /// Disks behind USB: never chosen unless the rule names this bus.
    Usb,
    /// SCSI and SAS disks (not ATA, not USB).
    Scsi,
    /// eMMC and SD cards.
    Mmc,
    /// Any other bus (facts only; a profile cannot ask for it).
    #[serde(skip)]
    Other,
}

impl Bus {
    /// The bus as the facts name it (`nodeflash facts`, `nodeflash flash
    /// --json`, the inventory): `nvme`, `ata`, `virtio`, `usb`, `scsi`,
    /// `mmc` or `other`.
    pub fn as_str(self) -> &'static str {
        match self {
            Bus::Nvme => "nvme",
            Bus::Sata => "ata",
            Bus::Virtio => "virtio",
            Bus::Usb => "usb",
            Bus::Scsi => "scsi",
            Bus::Mmc => "mmc",
            Bus::Other => "other",
        }
    }

    /// The same as [`Bus::as_str`].
    pub fn facts_name(self) -> &'static str {
        self.as_str()
    }
}

impl std::fmt::Display for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A facts name (`ata`, `nvme`, …; `sata` too); anything else is [`Bus::Other`].
impl From<&str> for Bus {
    fn from(name: &str) -> Self {
        match name {
            "nvme" => Bus::Nvme,
            "ata" | "sata" => Bus::Sata,
            "virtio" => Bus::Virtio,
            "usb" => Bus::Usb,
            "scsi" => Bus::Scsi,
            "mmc" => Bus::Mmc,
            _ => Bus::Other,
        }
    }
}

/// Compares with a facts name, as [`Bus::as_str`] gives it.
impl PartialEq<&str> for Bus {
    fn eq(&self, name: &&str) -> bool {
        self.as_str() == *name
    }
}

/// [`BlockDevice::bus`] in JSON: the facts name.
mod bus_by_facts_name {
    use super::Bus;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bus: &Bus, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(bus.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bus, D::Error> {
        Ok(Bus::from(String::deserialize(d)?.as_str()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockDevice {
    /// Kernel name, e.g. `nvme0n1`.
    pub name: String,
    pub size_bytes: u64,
    pub logical_block_size: u32,
    pub model: Option<String>,
    pub serial: Option<String>,
    /// WWN, or the NVMe EUI/NGUID (`/sys/block/X/wwid`).
    pub wwn: Option<String>,
    /// The bus, named in JSON as [`Bus::as_str`] does (`ata`, `other`).
    #[serde(with = "bus_by_facts_name")]
    pub bus: Bus,
    pub removable: bool,
    pub read_only: bool,
    /// True for the medium this image was booted from (set by the installer).
    #[serde(default)]
    pub boot_medium: bool,
    /// Marked hidden in sysfs (`/sys/block/X/hidden`): a per-path node of a
    /// native NVMe multipath disk (`nvme0c0n1`), never a disk to install on.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hidden: bool,
    /// What the installer found on the disk: partition tables, file systems,
    /// ZFS labels (empty for an empty disk, or when not looked at).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signatures: Vec<String>,
    /// Whether the disk's first and last MiB were read for `signatures`
    /// (the installer does; `nodeflash facts` only as root). Without it an
    /// empty `signatures` says nothing about the disk.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub contents_read: bool,
    /// ZFS pools whose labels are on the disk or its partitions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub zfs_pools: Vec<ZfsPoolLabel>,
    /// The disk's GPT carries nodeflash's mark of an install that did not
    /// finish ([`crate::disk::UNFINISHED_NAME`], read by [`crate::disk::look_at`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unfinished_install: bool,
}

/// A ZFS vdev label found on a disk or partition: the pool it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZfsPoolLabel {
    /// The device holding the label (`sda3`, or the disk itself).
    pub device: String,
    /// The pool's name (the label's `name`).
    pub pool: String,
    /// The label's `pool_guid`, in decimal as `zpool import` prints it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guid: Option<String>,
    /// The label's `state`: 0 active, 1 exported, 2 destroyed, 3 spare,
    /// 4 L2ARC (`pool_state_t`, OpenZFS `include/sys/fs/zfs.h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<u64>,
}

impl ZfsPoolLabel {
    /// True when `zpool import NAME` would see this pool: active or
    /// exported (a destroyed pool needs `-D`; spares and caches have no pool of their own).
    pub fn importable(&self) -> bool {
        matches!(self.state, None | Some(0) | Some(1))
    }
}

impl BlockDevice {
    /// What sysfs tells of the whole disk `name` in its directory `dir`
    /// (`/sys/block/NAME` or `/sys/class/block/NAME`) on `bus`: size,
    /// logical block size, model, serial (`device/serial`, else VPD page
    /// 0x80, else the disk's own `serial`), WWN (`wwid`), removable, read-only and hidden. Attributes that
    /// cannot be read are None, 0, 512 (the block size) or false.
    pub fn read(name: &str, dir: &Path, bus: Bus) -> Self {
        let num = |p: &str| read_trimmed(&dir.join(p)).and_then(|s| s.parse::<u64>().ok());
        // NVMe: device/serial; SCSI/SATA: VPD page 0x80; virtio-blk: the
        // disk's own `serial` (drivers/block/virtio_blk.c).
        let serial = read_trimmed(&dir.join("device/serial"))
            .or_else(|| vpd_serial(&dir.join("device/vpd_pg80")))
            .or_else(|| read_trimmed(&dir.join("serial")));
        let wwn =
            read_trimmed(&dir.join("wwid")).or_else(|| read_trimmed(&dir.join("device/wwid")));
        BlockDevice {
            bus,
            size_bytes: num("size").unwrap_or(0) * 512,
            logical_block_size: num("queue/logical_block_size")
                .and_then(|v| u32::try_from(v).ok())
                .unwrap_or(512),
            model: read_trimmed(&dir.join("device/model")),
            serial,
            wwn,
            removable: num("removable") == Some(1),
            read_only: num("ro") == Some(1),
            boot_medium: false,
            hidden: num("hidden") == Some(1),
            signatures: Vec::new(),
            contents_read: false,
            zfs_pools: Vec::new(),
            unfinished_install: false,
            name: name.to_string(),
        }
    }

    /// A fixed, writable disk with a serial (captured facts, tests).
    pub fn fixed(
        name: &str,
        size_bytes: u64,
        logical_block_size: u32,
        bus: &str,
        serial: &str,
    ) -> Self {
        Self {
            name: name.into(),
            size_bytes,
            logical_block_size,
            model: None,
            serial: Some(serial.into()),
            wwn: None,
            bus: bus.into(),
            removable: false,
            read_only: false,
            boot_medium: false,
            hidden: false,
            signatures: Vec::new(),
            contents_read: false,
            zfs_pools: Vec::new(),
            unfinished_install: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetInterface {
    pub name: String,
    pub mac: Option<String>,
    /// None while the link is down or the driver cannot tell.
    pub carrier: Option<bool>,
}

/// A sysfs attribute without surrounding whitespace and NULs; None when
/// it cannot be read or is empty.
pub fn read_trimmed(path: &Path) -> Option<String> {
    let s = fs::read_to_string(path).ok()?;
    let s = s.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    (!s.is_empty()).then(|| s.to_string())
}

/// The names in a directory, sorted; empty when it cannot be read.
pub fn sorted_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Devices that are never install targets nor boot media of interest.
fn is_virtual(name: &str) -> bool {
    ["loop", "ram", "zram", "dm-", "md", "zd", "nbd"]
        .iter()
        .any(|p| name.starts_with(p))
}

/// The serial number of a SCSI/ATA device from VPD page 0x80 (4-byte header).
pub fn vpd_serial(path: &Path) -> Option<String> {
    let page = fs::read(path).ok()?;
    let s = String::from_utf8_lossy(page.get(4..)?).trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn bus_of(sysfs: &Path, name: &str) -> Bus {
    // /sys/block/X is a symlink into /sys/devices/…; its path tells the bus.
    let target = fs::read_link(sysfs.join("block").join(name))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    bus_from_path(name, &target)
}

/// The bus of disk `name` from its path in the device tree
/// (`…/devices/pci…/usb2/…/block/sda`).
pub fn bus_from_path(name: &str, device_path: &str) -> Bus {
    // USB first: whatever is behind a USB port is removable in practice.
    if device_path.contains("/usb") {
        Bus::Usb
    } else if name.starts_with("nvme") || device_path.contains("/nvme") {
        Bus::Nvme
    } else if name.starts_with("mmcblk") || device_path.contains("/mmc") {
        Bus::Mmc
    } else if name.starts_with("vd") || device_path.contains("/virtio") {
        Bus::Virtio
    } else if device_path.contains("/ata") {
        Bus::Sata
    } else if name.starts_with("sd") || name.starts_with("sr") {
        Bus::Scsi
    } else {
        Bus::Other
    }
}

impl Facts {
    /// Reads the facts from a sysfs tree (`/sys` on a live machine).
    pub fn read(sysfs: &Path) -> Facts {
        let dmi_dir = sysfs.join("class/dmi/id");
        let dmi = Dmi {
            sys_vendor: read_trimmed(&dmi_dir.join("sys_vendor")),
            product_name: read_trimmed(&dmi_dir.join("product_name")),
            product_serial: read_trimmed(&dmi_dir.join("product_serial")),
            product_uuid: read_trimmed(&dmi_dir.join("product_uuid")),
        };
        let mut block_devices = Vec::new();
        for name in sorted_entries(&sysfs.join("block")) {
            if is_virtual(&name) {
                continue;
            }
            let dir = sysfs.join("block").join(&name);
            let bus = bus_of(sysfs, &name);
            block_devices.push(BlockDevice::read(&name, &dir, bus));
        }
        let mut net = Vec::new();
        for name in sorted_entries(&sysfs.join("class/net")) {
            if name == "lo" {
                continue;
            }
            let dir = sysfs.join("class/net").join(&name);
            net.push(NetInterface {
                mac: read_trimmed(&dir.join("address")),
                // Reading `carrier` fails while the interface is down.
                carrier: read_trimmed(&dir.join("carrier")).map(|c| c == "1"),
                name,
            });
        }
        Facts {
            dmi,
            block_devices,
            net,
        }
    }

    /// The inventory as a few plain lines for the console.
    pub fn inventory(&self) -> String {
        let mut out = String::new();
        let d = &self.dmi;
        let _ = writeln!(
            out,
            "machine: {} {} serial={} uuid={}",
            d.sys_vendor.as_deref().unwrap_or("?"),
            d.product_name.as_deref().unwrap_or("?"),
            d.product_serial.as_deref().unwrap_or("-"),
            d.product_uuid.as_deref().unwrap_or("-"),
        );
        if self.block_devices.is_empty() {
            let _ = writeln!(out, "disk: none found");
        }
        for b in &self.block_devices {
            let _ = writeln!(
                out,
                "disk: {} size={} ({} bytes) lbs={} bus={} model={:?} serial={:?} wwn={:?}{}{}{}{}",
                b.name,
                human_bytes(b.size_bytes),
                b.size_bytes,
                b.logical_block_size,
                b.bus,
                b.model.as_deref().unwrap_or(""),
                b.serial.as_deref().unwrap_or(""),
                b.wwn.as_deref().unwrap_or(""),
                if b.removable { " removable" } else { "" },
                if b.read_only { " read-only" } else { "" },
                if b.boot_medium { " boot-medium" } else { "" },
                if b.hidden { " hidden" } else { "" },
            );
            if !b.signatures.is_empty() {
                let _ = writeln!(out, "  holds: {}", b.signatures.join(", "));
            }
        }
        if self.net.is_empty() {
            let _ = writeln!(out, "net: none found");
        }
        for n in &self.net {
            let carrier = match n.carrier {
                Some(true) => "up",
                Some(false) => "no-carrier",
                None => "unknown",
            };
            let _ = writeln!(
                out,
                "net: {} mac={} carrier={carrier}",
                n.name,
                n.mac.as_deref().unwrap_or("-")
            );
        }
        out
    }
}

/// Sizes for people; defined in [`crate::units`] (kept here for its callers).
pub use crate::units::human_bytes;

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn write(root: &Path, rel: &str, content: &str) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().expect("has parent")).expect("mkdir");
        fs::write(p, content).expect("write fixture");
    }

    /// A captured-style sysfs: one NVMe disk, one USB stick, a loop device and a NIC.
    fn fixture() -> tempfile::TempDir {
        let t = tempfile::tempdir().expect("tempdir");
        let r = t.path();
        let nvme = "devices/pci0000:00/0000:00:04.0/nvme/nvme0/nvme0n1";
        let usb =
            "devices/pci0000:00/0000:00:03.0/usb2/2-1/2-1:1.0/host0/target0:0:0/0:0:0:0/block/sda";
        write(r, &format!("{nvme}/size"), "4194304\n");
        write(r, &format!("{nvme}/queue/logical_block_size"), "4096\n");
        write(r, &format!("{nvme}/removable"), "0\n");
        write(r, &format!("{nvme}/ro"), "0\n");
        write(
            r,
            &format!("{nvme}/wwid"),
            "eui.0000000001000000e4d25c0000000001\n",
        );
        write(
            r,
            &format!("{nvme}/device/serial"),
            "NFTEST0001          \n",
        );
        write(
            r,
            &format!("{nvme}/device/model"),
            "QEMU NVMe Ctrl                          \n",
        );
        write(r, &format!("{usb}/size"), "2048\n");
        write(r, &format!("{usb}/removable"), "1\n");
        write(r, &format!("{usb}/device/model"), "QEMU HARDDISK   \n");
        fs::create_dir_all(r.join("block")).expect("mkdir block");
        symlink(format!("../{nvme}"), r.join("block/nvme0n1")).expect("symlink");
        symlink(format!("../{usb}"), r.join("block/sda")).expect("symlink");
        // A hidden per-path node of a multipath NVMe disk (same serial).
        let path = "devices/virtual/nvme-subsystem/nvme-subsys0/nvme0c0n1";
        write(r, &format!("{path}/size"), "4194304\n");
        write(r, &format!("{path}/hidden"), "1\n");
        write(r, &format!("{path}/device/serial"), "NFTEST0001\n");
        write(r, &format!("{nvme}/hidden"), "0\n");
        symlink(format!("../{path}"), r.join("block/nvme0c0n1")).expect("symlink");
        write(r, "block/loop0/size", "0\n");
        write(r, "class/net/lo/address", "00:00:00:00:00:00\n");
        write(r, "class/net/eth0/address", "52:54:00:12:34:56\n");
        write(r, "class/net/eth0/carrier", "1\n");
        write(r, "class/dmi/id/product_serial", "NODE-1\n");
        t
    }

    #[test]
    fn one_bus_for_facts_and_profile() {
        // Facts name the bus as sysfs paths give it, `other` included.
        for bus in [
            Bus::Nvme,
            Bus::Sata,
            Bus::Virtio,
            Bus::Usb,
            Bus::Scsi,
            Bus::Mmc,
            Bus::Other,
        ] {
            let mut d = BlockDevice::fixed("x", 1, 512, bus.as_str(), "S");
            assert_eq!(d.bus, bus);
            let json = serde_json::to_value(&d).expect("json");
            assert_eq!(json["bus"], bus.as_str());
            d = serde_json::from_value(json).expect("back");
            assert_eq!(d.bus, bus);
        }
        assert_eq!(
            bus_from_path("sda", "../devices/pci0000:00/0000:00:1f.2/ata1/host0"),
            Bus::Sata
        );
        // A profile names SATA `sata` (or `ata`) and cannot ask for `other`.
        let bus = |t: &str| serde_json::from_str::<Bus>(t);
        assert_eq!(bus("\"sata\"").expect("sata"), Bus::Sata);
        assert_eq!(bus("\"ata\"").expect("ata"), Bus::Sata);
        assert!(bus("\"other\"").is_err());
        assert_eq!(serde_json::to_string(&Bus::Sata).expect("json"), "\"sata\"");
    }
    #[test]
    fn reads_disks_nics_and_dmi() {
        let t = fixture();
        let f = Facts::read(t.path());
        assert_eq!(f.dmi.product_serial.as_deref(), Some("NODE-1"));
        assert_eq!(f.block_devices.len(), 3, "{f:#?}");
        let hidden = &f.block_devices[0];
        assert_eq!((hidden.name.as_str(), hidden.hidden), ("nvme0c0n1", true));
        let nvme = &f.block_devices[1];
        assert!(!nvme.hidden);
        assert_eq!(nvme.name, "nvme0n1");
        assert_eq!(nvme.size_bytes, 2 << 30);
        assert_eq!(nvme.logical_block_size, 4096);
        assert_eq!(nvme.serial.as_deref(), Some("NFTEST0001"));
        assert_eq!(nvme.model.as_deref(), Some("QEMU NVMe Ctrl"));
        assert_eq!(nvme.bus, "nvme");
        assert!(!nvme.removable);
        let usb = &f.block_devices[2];
        assert_eq!(
            (usb.name.as_str(), usb.bus.as_str(), usb.removable),
            ("sda", "usb", true)
        );
        assert_eq!(usb.logical_block_size, 512, "default when sysfs lacks it");
        assert_eq!(f.net.len(), 1);
        assert_eq!(f.net[0].carrier, Some(true));
        let inv = f.inventory();
        assert!(
            inv.contains("disk: nvme0n1 size=2.0 GiB (2147483648 bytes) lbs=4096 bus=nvme"),
            "{inv}"
        );
        assert!(inv.contains("serial=\"NFTEST0001\""), "{inv}");
        assert!(
            inv.contains("wwn=\"eui.0000000001000000e4d25c0000000001\""),
            "{inv}"
        );
        assert!(
            inv.contains("disk: nvme0c0n1 ") && inv.contains(" hidden\n"),
            "{inv}"
        );
        // Facts round-trip through JSON (the `--machine FACTS.json` form).
        let json = serde_json::to_string(&f).expect("serialize");
        assert_eq!(serde_json::from_str::<Facts>(&json).expect("parse"), f);
    }
}

//! Carrying out a [`Plan`] on a disk: what is on it (signatures), wiping,
//! the GPT, the ESP's FAT32 and the swap header. Everything is written
//! through the whole-disk handle at the planned offsets, so the same code
//! runs on a block device and on a plain image file (host tests).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::plan::{PartKind, Plan};

use crate::units::MIB;

/// Looks at the first and last MiB of a disk (and its partition list in
/// sysfs) and names what it finds; empty means the disk is empty.
pub fn signatures(dev: &Path, size: u64, partitions: &[String]) -> Result<Vec<String>> {
    let mut f =
        File::open(dev).with_context(|| format!("cannot open {} to look at it", dev.display()))?;
    let head_len = size.min(MIB) as usize;
    let mut head = vec![0u8; head_len];
    f.read_exact(&mut head)
        .with_context(|| format!("cannot read the start of {}", dev.display()))?;
    let tail_start = size.saturating_sub(MIB).max(head_len as u64);
    let mut tail = vec![0u8; (size - tail_start) as usize];
    f.seek(SeekFrom::Start(tail_start))
        .and_then(|_| f.read_exact(&mut tail))
        .with_context(|| format!("cannot read the end of {}", dev.display()))?;
    Ok(classify(&head, &tail, partitions))
}

/// Looks at what is on the disk `b` as the node's plan needs it (its device
/// node in `dev`, its partitions in the sysfs tree `sys`): fills in
/// `signatures` ([`signatures`], plus one `ZFS pool NAME on DEVICE` per
/// label) and `zfs_pools` (the ZFS vdev labels on the disk or its
/// partitions), and sets `contents_read`. Errors: the device cannot be
/// opened or read (e.g. not root); `b` is then left as it was.
pub fn look_at(sys: &Path, dev: &Path, b: &mut crate::facts::BlockDevice) -> Result<()> {
    let node = dev.join(&b.name);
    let parts = old_partitions(sys, &b.name);
    let names: Vec<String> = parts.iter().map(|(n, _, _)| n.clone()).collect();
    let mut signatures = signatures(&node, b.size_bytes, &names)?;
    let mut f = File::open(&node).with_context(|| format!("cannot open {}", node.display()))?;
    let vdevs = std::iter::once((b.name.clone(), 0, b.size_bytes)).chain(parts);
    let pools: Vec<crate::facts::ZfsPoolLabel> = vdevs
        .filter_map(|(device, start, len)| {
            let l = read_label_pool(&mut f, start, len)?;
            Some(crate::facts::ZfsPoolLabel {
                device,
                pool: l.name,
                guid: l.guid.map(|g| g.to_string()),
                state: l.state,
            })
        })
        .collect();
    for l in &pools {
        signatures.push(format!("ZFS pool {} on {}", l.pool, l.device));
    }
    let mut head = vec![0u8; b.size_bytes.min(MIB) as usize];
    f.seek(SeekFrom::Start(0))
        .and_then(|_| f.read_exact(&mut head))
        .with_context(|| format!("cannot read the start of {}", node.display()))?;
    b.unfinished_install = gpt_names(&head).iter().any(|n| n == UNFINISHED_NAME);
    b.signatures = signatures;
    b.zfs_pools = pools;
    b.contents_read = true;
    Ok(())
}

/// The GPT name the ESP carries while nodeflash installs the disk; it is
/// renamed to its planned name ([`mark_finished`]) only when the install
/// succeeded. A disk whose GPT has it holds an unfinished nodeflash install,
/// which `wipe = "if-empty"` counts as empty.
pub const UNFINISHED_NAME: &str = "nodeflash unfinished install";

/// The partition names of the primary GPT in `head` (the disk's first
/// bytes, sector size 512 or 4096): the header (`EFI PART` at LBA 1) gives
/// the entries' LBA (offset 72), count (80) and size (84); each entry's
/// name is 72 bytes of UTF-16LE at offset 56 (UEFI 2.10, 5.3.2 and 5.3.3).
/// Entries outside `head`, and unused ones (zero type GUID), are skipped.
pub fn gpt_names(head: &[u8]) -> Vec<String> {
    let le = |b: &[u8]| b.iter().rev().fold(0u64, |v, x| (v << 8) | u64::from(*x));
    let Some(lbs) = [512usize, 4096]
        .into_iter()
        .find(|l| head.get(*l..*l + 8) == Some(b"EFI PART"))
    else {
        return Vec::new();
    };
    let h = &head[lbs..];
    let (Some(lba), Some(count), Some(size)) = (h.get(72..80), h.get(80..84), h.get(84..88)) else {
        return Vec::new();
    };
    let (lba, count, size) = (le(lba) as usize, le(count) as usize, le(size) as usize);
    if size < 128 {
        return Vec::new();
    }
    (0..count.min(1024))
        .filter_map(|i| {
            let at = lba.checked_mul(lbs)?.checked_add(i * size)?;
            let e = head.get(at..at + 128)?;
            if e[..16].iter().all(|b| *b == 0) {
                return None;
            }
            let units: Vec<u16> = e[56..128]
                .chunks(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .take_while(|u| *u != 0)
                .collect();
            Some(String::from_utf16_lossy(&units))
        })
        .collect()
}

/// The `gpt` crate's block size for a disk of `lbs`-byte logical sectors
/// (512, else 4096: the plan allows no other).
fn gpt_block_size(lbs: u64) -> gpt::disk::LogicalBlockSize {
    match lbs {
        512 => gpt::disk::LogicalBlockSize::Lb512,
        _ => gpt::disk::LogicalBlockSize::Lb4096,
    }
}

/// Clears nodeflash's mark on a disk whose install succeeded: renames the
/// ESP (partition `esp_number`) in both GPTs from [`UNFINISHED_NAME`] to
/// `name`, nothing else changed. `dev` is the whole disk (or an image
/// file), `lbs` its sector size. Errors name the device.
pub fn mark_finished(dev: &Path, lbs: u64, esp_number: u32, name: &str) -> Result<()> {
    let mut file = open_for_writing(dev)?;
    let block_size = gpt_block_size(lbs);
    let mut gpt = gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(block_size)
        .open_from_device(&mut file)
        .with_context(|| format!("cannot read the GPT of {}", dev.display()))?;
    let mut parts = gpt.take_partitions();
    let esp = parts
        .get_mut(&esp_number)
        .filter(|p| p.name == UNFINISHED_NAME)
        .with_context(|| {
            format!(
                "partition {esp_number} of {} does not carry the mark of an unfinished install",
                dev.display()
            )
        })?;
    esp.name = name.to_string();
    gpt.update_partitions(parts)
        .and_then(|()| gpt.write().map(drop))
        .with_context(|| {
            format!(
                "cannot rename partition {esp_number} in the GPT of {}",
                dev.display()
            )
        })?;
    file.sync_all()
        .with_context(|| format!("cannot flush {}", dev.display()))
}

/// Names the signatures in the first and last MiB of a disk.
pub fn classify(head: &[u8], tail: &[u8], partitions: &[String]) -> Vec<String> {
    let at = |buf: &[u8], off: usize, magic: &[u8]| buf.get(off..off + magic.len()) == Some(magic);
    let mut found = Vec::new();
    if !partitions.is_empty() {
        found.push(format!("partitions {}", partitions.join(" ")));
    }
    if at(head, 512, b"EFI PART") || at(head, 4096, b"EFI PART") {
        found.push("GPT partition table".into());
    } else if tail.len() >= 4096
        && (at(tail, tail.len() - 512, b"EFI PART") || at(tail, tail.len() - 4096, b"EFI PART"))
    {
        found.push("backup GPT header".into());
    } else if at(head, 510, &[0x55, 0xAA])
        && (0..4).any(|i| head.get(446 + 16 * i + 4).is_some_and(|t| *t != 0))
    {
        found.push("MBR partition table".into());
    }
    let fs: [(&str, usize, &[u8]); 9] = [
        ("ext2/3/4 file system", 1080, &[0x53, 0xEF]),
        ("XFS file system", 0, b"XFSB"),
        ("btrfs file system", 65600, b"_BHRfS_M"),
        ("FAT file system", 54, b"FAT1"),
        ("FAT32 file system", 82, b"FAT32"),
        ("swap", 4086, b"SWAPSPACE2"),
        ("swap", 4086, b"SWAP-SPACE"),
        ("ISO9660 file system", 32769, b"CD001"),
        ("LUKS header", 0, b"LUKS\xba\xbe"),
    ];
    for (name, off, magic) in fs {
        if at(head, off, magic) && !found.iter().any(|f| f == name) {
            found.push(name.to_string());
        }
    }
    // ZFS uberblocks (magic 0x00bab10c) sit 1 KiB-aligned in the labels at
    // both ends of a vdev.
    let magic = 0x00ba_b10c_u64.to_le_bytes();
    let zfs = |buf: &[u8]| buf.chunks(1024).any(|c| c.starts_with(&magic));
    if zfs(head) || zfs(tail) {
        found.push("ZFS label".into());
    }
    if found.is_empty() && (head.iter().any(|b| *b != 0) || tail.iter().any(|b| *b != 0)) {
        found.push("unrecognised data in the first or last MiB".into());
    }
    found
}

/// One vdev label (`vdev_label_t`, OpenZFS `include/sys/vdev_impl.h`):
/// 8 KiB blank, 8 KiB boot header, the 112 KiB packed nvlist, then the
/// uberblock ring.
const LABEL_BYTES: u64 = 256 << 10;
const LABEL_NVLIST_OFFSET: u64 = 16 << 10;
const LABEL_NVLIST_BYTES: usize = 112 << 10;

/// Where the four labels of a vdev of `len` bytes start, relative to the
/// vdev: two at the front, two at the end of the size rounded down to
/// 256 KiB (`vdev_label_offset`, OpenZFS `module/zfs/vdev_label.c`).
pub fn label_offsets(len: u64) -> Vec<u64> {
    let aligned = len / LABEL_BYTES * LABEL_BYTES;
    if aligned < 4 * LABEL_BYTES {
        return Vec::new();
    }
    vec![
        0,
        LABEL_BYTES,
        aligned - 2 * LABEL_BYTES,
        aligned - LABEL_BYTES,
    ]
}

/// What a label's nvlist says about its pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelPool {
    pub name: String,
    pub guid: Option<u64>,
    pub state: Option<u64>,
}

/// Reads `name`, `pool_guid` and `state` from a label's packed nvlist: XDR
/// encoding (header byte 0 = 1), then version and flags, then pairs of
/// (encoded size, decoded size, name, type, count, value) ending with an
/// encoded size of 0 (`nvs_xdr_nvp_op`, OpenZFS `module/nvpair/nvpair.c`).
/// Types: 8 = uint64 (8 bytes), 9 = string (length + bytes, padded to 4).
/// None when it is not an XDR nvlist or has no pool name.
pub fn parse_label_nvlist(buf: &[u8]) -> Option<LabelPool> {
    let u32_at =
        |o: usize| -> Option<u32> { Some(u32::from_be_bytes(buf.get(o..o + 4)?.try_into().ok()?)) };
    let u64_at =
        |o: usize| -> Option<u64> { Some(u64::from_be_bytes(buf.get(o..o + 8)?.try_into().ok()?)) };
    let string_at = |o: usize| -> Option<(String, usize)> {
        let len = u32_at(o)? as usize;
        let bytes = buf.get(o + 4..o + 4 + len)?;
        Some((
            String::from_utf8_lossy(bytes).into_owned(),
            o + 4 + len.div_ceil(4) * 4,
        ))
    };
    if buf.first() != Some(&1) {
        return None;
    }
    let (mut name, mut guid, mut state) = (None, None, None);
    let mut pos = 12;
    for _ in 0..4096 {
        let size = u32_at(pos)? as usize;
        if size == 0 {
            break;
        }
        let (key, after) = string_at(pos + 8)?;
        let (kind, value) = (u32_at(after)?, after + 8);
        match (key.as_str(), kind) {
            ("name", 9) => name = Some(string_at(value)?.0),
            ("pool_guid", 8) => guid = u64_at(value),
            ("state", 8) => state = u64_at(value),
            _ => {}
        }
        pos = pos.checked_add(size)?;
    }
    Some(LabelPool {
        name: name?,
        guid,
        state,
    })
}

/// The pool named in the first readable label of the vdev at `start`
/// (`len` bytes) of `f`.
pub fn read_label_pool(f: &mut File, start: u64, len: u64) -> Option<LabelPool> {
    let mut buf = vec![0u8; LABEL_NVLIST_BYTES];
    label_offsets(len).into_iter().find_map(|off| {
        f.seek(SeekFrom::Start(start + off + LABEL_NVLIST_OFFSET))
            .and_then(|_| f.read_exact(&mut buf))
            .ok()?;
        parse_label_nvlist(&buf)
    })
}

/// What the disk looks like after [`partition`].
#[derive(Debug, Clone, Serialize)]
pub struct Layout {
    pub disk_guid: String,
    pub partitions: Vec<Partition>,
    pub esp_volume_id: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Partition {
    pub number: u32,
    pub kind: PartKind,
    pub guid: String,
    /// `/dev/nvme0n1p1` on a machine; empty on an image file.
    pub device: String,
}

/// A window of a file, seen as a file of its own.
struct Slice<'a> {
    file: &'a mut File,
    start: u64,
    len: u64,
    pos: u64,
}

impl Read for Slice<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (buf.len() as u64).min(self.len.saturating_sub(self.pos)) as usize;
        self.file.seek(SeekFrom::Start(self.start + self.pos))?;
        let n = self.file.read(&mut buf[..n])?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for Slice<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.pos + buf.len() as u64 > self.len {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "write past the end of the partition",
            ));
        }
        self.file.seek(SeekFrom::Start(self.start + self.pos))?;
        let n = self.file.write(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl Seek for Slice<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.pos = seek_position(self.pos, self.len, to)?;
        Ok(self.pos)
    }
}

/// Where a seek from `pos` in a window of `len` bytes lands.
pub(crate) fn seek_position(pos: u64, len: u64, to: SeekFrom) -> io::Result<u64> {
    match to {
        SeekFrom::Start(p) => Some(p),
        SeekFrom::End(d) => len.checked_add_signed(d),
        SeekFrom::Current(d) => pos.checked_add_signed(d),
    }
    .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"))
}

fn zero(file: &mut File, what: &str, offset: u64, len: u64) -> Result<()> {
    let buf = vec![0u8; len as usize];
    file.seek(SeekFrom::Start(offset))
        .and_then(|_| file.write_all(&buf))
        .with_context(|| format!("cannot clear {what} at byte {offset}"))
}

/// Zeroes the first and last MiB of a region (labels, tables, superblocks).
fn clear_ends(file: &mut File, what: &str, start: u64, len: u64) -> Result<()> {
    let n = len.min(MIB);
    zero(file, what, start, n)?;
    zero(file, what, start + len - n, n)
}

/// The kernel name of partition `n` of `disk` (`nvme0n1p1`, `sda1`).
pub fn partition_name(disk: &str, n: u32) -> String {
    if disk.ends_with(|c: char| c.is_ascii_digit()) {
        format!("{disk}p{n}")
    } else {
        format!("{disk}{n}")
    }
}

/// Old partitions of a disk from sysfs: (name, start byte, length in bytes).
pub fn old_partitions(sysfs: &Path, disk: &str) -> Vec<(String, u64, u64)> {
    let dir = sysfs.join("block").join(disk);
    let mut parts: Vec<(String, u64, u64)> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let num = |f: &str| {
                        std::fs::read_to_string(e.path().join(f))
                            .ok()?
                            .trim()
                            .parse::<u64>()
                            .ok()
                    };
                    (name.starts_with(disk))
                        .then(|| Some((name.clone(), num("start")? * 512, num("size")? * 512)))?
                })
                .collect()
        })
        .unwrap_or_default();
    parts.sort();
    parts
}

/// Opens a block device (exclusively: that fails while anything has it
/// mounted or open) or an image file for reading and writing.
pub fn open_for_writing(dev: &Path) -> Result<File> {
    let is_block = std::fs::metadata(dev)
        .with_context(|| format!("cannot stat {}", dev.display()))?
        .file_type()
        .is_block_device();
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(if is_block { nix::libc::O_EXCL } else { 0 })
        .open(dev)
        .with_context(|| format!("cannot open {} for writing (is it in use?)", dev.display()))
}

/// Wipes (if planned) and partitions the disk at `dev` (a block device or an
/// image file), formats the ESP and writes the swap header.
/// `old` lists the old partitions (start, length in bytes) to clear.
pub fn partition(plan: &Plan, dev: &Path, old: &[(u64, u64)]) -> Result<Layout> {
    partition_file(plan, dev, open_for_writing(dev)?, old)
}

/// [`partition`] on `file`, `dev` opened by [`open_for_writing`] (the
/// install opens every disk of the pool before it writes to the first).
pub fn partition_file(
    plan: &Plan,
    dev: &Path,
    mut file: File,
    old: &[(u64, u64)],
) -> Result<Layout> {
    let is_block = file
        .metadata()
        .with_context(|| format!("cannot stat {}", dev.display()))?
        .file_type()
        .is_block_device();
    let size = plan.disk.size_bytes;
    let lbs = u64::from(plan.logical_block_size);
    // Old labels and tables first: every old partition's ends, then the disk's.
    for (start, len) in old {
        clear_ends(
            &mut file,
            &format!("an old partition of {}", dev.display()),
            *start,
            *len,
        )?;
    }
    clear_ends(&mut file, &dev.display().to_string(), 0, size)?;
    for p in &plan.partitions {
        clear_ends(
            &mut file,
            &format!("partition {} of {}", p.number, dev.display()),
            p.first_lba * lbs,
            p.sectors() * lbs,
        )?;
    }

    let block_size = gpt_block_size(lbs);
    let mut gpt = gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(block_size)
        .create_from_device(&mut file, None)
        .with_context(|| format!("cannot start a GPT on {}", dev.display()))?;
    for p in &plan.partitions {
        let ty = match p.kind {
            PartKind::Esp => gpt::partition_types::EFI,
            PartKind::Swap => gpt::partition_types::LINUX_SWAP,
            PartKind::Zfs => gpt::partition_types::MACOS_ZFS,
        };
        debug_assert_eq!(ty.guid.to_string().to_uppercase(), p.type_guid);
        // The ESP carries the mark of an unfinished install until the end;
        // on a whole disk of a pool (no ESP) its one ZFS partition does.
        let has_esp = plan.partitions.iter().any(|x| x.kind == PartKind::Esp);
        let name = match p.kind {
            PartKind::Esp => UNFINISHED_NAME,
            PartKind::Zfs if !has_esp => UNFINISHED_NAME,
            _ => &p.name,
        };
        gpt.add_partition_at(name, p.number, p.first_lba, p.sectors(), ty, 0)
            .with_context(|| {
                format!(
                    "cannot add partition {} to the GPT of {}",
                    p.number,
                    dev.display()
                )
            })?;
    }
    let disk_guid = gpt.guid().to_string().to_uppercase();
    let guids: Vec<String> = plan
        .partitions
        .iter()
        .map(|p| {
            gpt.partitions()
                .get(&p.number)
                .map(|e| e.part_guid.to_string().to_uppercase())
                .unwrap_or_default()
        })
        .collect();
    gpt.write()
        .with_context(|| format!("cannot write the GPT of {}", dev.display()))?;
    let mbr =
        gpt::mbr::ProtectiveMBR::with_lb_size(u32::try_from(size / lbs - 1).unwrap_or(u32::MAX));
    mbr.overwrite_lba0(&mut file)
        .with_context(|| format!("cannot write the protective MBR of {}", dev.display()))?;

    let mut esp_volume_id = String::new();
    for (p, guid) in plan.partitions.iter().zip(&guids) {
        let mut slice = Slice {
            file: &mut file,
            start: p.first_lba * lbs,
            len: p.sectors() * lbs,
            pos: 0,
        };
        match p.kind {
            PartKind::Esp => {
                let id =
                    u32::from_str_radix(&guid.replace('-', "")[..8], 16).unwrap_or(0x4e46_4c53);
                format_esp(&mut slice, lbs, p.sectors(), id)
                    .with_context(|| format!("cannot format the ESP on {}", dev.display()))?;
                esp_volume_id = format!("{:04X}-{:04X}", id >> 16, id & 0xffff);
            }
            PartKind::Swap => write_swap_header(&mut slice, guid)
                .with_context(|| format!("cannot write the swap header on {}", dev.display()))?,
            PartKind::Zfs => {}
        }
    }
    file.sync_all()
        .with_context(|| format!("cannot flush {}", dev.display()))?;

    let mut partitions = Vec::new();
    for (p, guid) in plan.partitions.iter().zip(guids) {
        partitions.push(Partition {
            number: p.number,
            kind: p.kind,
            guid,
            device: if is_block {
                format!("/dev/{}", partition_name(&plan.disk.name, p.number))
            } else {
                String::new()
            },
        });
    }
    if is_block {
        reread_partitions(&file, dev)?;
        let nodes: Vec<PathBuf> = partitions
            .iter()
            .map(|p| PathBuf::from(&p.device))
            .collect();
        wait_for_nodes(&nodes, Duration::from_secs(10))?;
    }
    Ok(Layout {
        disk_guid,
        partitions,
        esp_volume_id,
    })
}

/// FAT32 needs at least this many clusters; fewer make FAT16 or FAT12
/// (Microsoft's FAT specification, "FAT type determination"; fatfs 0.3.6
/// `src/fs.rs` `FAT32_MIN_CLUSTERS`).
pub const FAT32_MIN_CLUSTERS: u64 = 65_525;
/// The most clusters fatfs 0.3.6 gives a FAT32 volume (`FAT32_MAX_CLUSTERS`).
pub const FAT32_MAX_CLUSTERS: u64 = 0x0FFF_FFF4;

/// The number of clusters `format_esp` gets when it formats `sectors`
/// sectors of `lbs` bytes (512 or 4096) as FAT32, or None when fatfs cannot
/// lay out such a volume at all (too few sectors, or more than 2^32 - 1).
///
/// This is fatfs 0.3.6's own geometry for a FAT32 request, as in its
/// `src/boot_sector.rs` (`determine_bytes_per_cluster`,
/// `determine_sectors_per_fat`, `try_fs_geometry`): 512-byte clusters up to
/// 260 MiB, 4 KiB up to 8 GiB, then 1 KiB per 2 GiB, never smaller than a
/// sector nor larger than 32 KiB; 8 reserved sectors and 2 FATs of 32-bit
/// entries. The volume is FAT32 when the count is between
/// [`FAT32_MIN_CLUSTERS`] and [`FAT32_MAX_CLUSTERS`]; otherwise fatfs falls
/// back to FAT16 (or fails). A unit test formats real volumes at the edges
/// with fatfs to hold this to the library.
pub fn fat32_clusters(sectors: u64, lbs: u64) -> Option<u64> {
    const KIB: u64 = 1 << 10;
    if !(lbs == 512 || lbs == 4096) || sectors > u64::from(u32::MAX) {
        return None;
    }
    let total_bytes = sectors * lbs;
    let bytes_per_cluster = if total_bytes <= 260 * MIB {
        512
    } else if total_bytes <= 8 << 30 {
        4 * KIB
    } else {
        total_bytes.next_power_of_two() / (2 << 30) * KIB
    }
    .clamp(lbs, 32 * KIB);
    let per_cluster = bytes_per_cluster / lbs;
    let (reserved, fats) = (8, 2);
    if sectors <= reserved + 8 {
        return None;
    }
    let t1 = sectors - reserved + 2 * per_cluster;
    let t2 = per_cluster * lbs * 8 / 32 + fats;
    let per_fat = t1.div_ceil(t2);
    let data = sectors.checked_sub(reserved + fats * per_fat)?;
    Some(data / per_cluster)
}

/// Why an ESP of `bytes` cannot be FAT32 on a disk with `lbs`-byte sectors
/// (the size is rounded up to whole sectors, as the plan does), or None when
/// it can. UEFI firmware is only required to read FAT32 on a fixed disk
/// (UEFI specification 2.10, 13.3.1.1).
pub fn esp_fat32_problem(bytes: u64, lbs: u64) -> Option<String> {
    let sectors = bytes.div_ceil(lbs.max(1));
    if sectors > u64::from(u32::MAX) {
        return Some(format!(
            "{sectors} sectors of {lbs} bytes are more than FAT32 can count (2^32 - 1)"
        ));
    }
    match fat32_clusters(sectors, lbs) {
        Some(n) if n > FAT32_MAX_CLUSTERS => Some(format!(
            "it would have {n} clusters, more than FAT32's {FAT32_MAX_CLUSTERS}"
        )),
        Some(n) if n >= FAT32_MIN_CLUSTERS => None,
        _ => Some(format!(
            "FAT32 needs at least {FAT32_MIN_CLUSTERS} clusters, which takes at least {} \
             with {lbs}-byte sectors",
            crate::profile::Size(min_esp_bytes(lbs))
        )),
    }
}

/// The smallest ESP in bytes (whole MiB) that is FAT32 with `lbs`-byte
/// sectors: 33 MiB for 512, 257 MiB for 4096.
pub fn min_esp_bytes(lbs: u64) -> u64 {
    (1..=1024)
        .map(|mib| mib * MIB)
        .find(|b| fat32_clusters(b / lbs, lbs).is_some_and(|n| n >= FAT32_MIN_CLUSTERS))
        .unwrap_or(1 << 30)
}

fn format_esp(slice: &mut Slice<'_>, lbs: u64, sectors: u64, volume_id: u32) -> Result<()> {
    let opts = fatfs::FormatVolumeOptions::new()
        .fat_type(fatfs::FatType::Fat32)
        .bytes_per_sector(u16::try_from(lbs).context("sector size")?)
        .total_sectors(u32::try_from(sectors).context("ESP too large")?)
        .volume_label(*b"ESP        ")
        .volume_id(volume_id);
    fatfs::format_volume(&mut *slice, opts).context("fatfs cannot format it")?;
    slice.seek(SeekFrom::Start(0))?;
    let fs = fatfs::FileSystem::new(&mut *slice, fatfs::FsOptions::new())
        .context("cannot read the new FAT back")?;
    if fs.fat_type() != fatfs::FatType::Fat32 {
        bail!(
            "the ESP came out as {:?}, not FAT32: make esp-size at least {}",
            fs.fat_type(),
            crate::profile::Size(min_esp_bytes(lbs))
        );
    }
    Ok(())
}

/// A Linux swap header (`SWAPSPACE2`, version 1) with UUID and label.
fn write_swap_header(slice: &mut Slice<'_>, guid: &str) -> Result<()> {
    const PAGE: u64 = 4096;
    let pages = slice.len / PAGE;
    if pages < 10 {
        bail!("swap partition is too small");
    }
    let mut page = vec![0u8; PAGE as usize];
    page[1024..1028].copy_from_slice(&1u32.to_le_bytes());
    page[1028..1032].copy_from_slice(
        &u32::try_from(pages - 1)
            .context("swap too large")?
            .to_le_bytes(),
    );
    let uuid = uuid::Uuid::parse_str(guid).unwrap_or_else(|_| uuid::Uuid::new_v4());
    page[1036..1052].copy_from_slice(uuid.as_bytes());
    page[1052..1056].copy_from_slice(b"swap");
    page[4086..4096].copy_from_slice(b"SWAPSPACE2");
    slice.seek(SeekFrom::Start(0))?;
    slice.write_all(&page)?;
    Ok(())
}

nix::ioctl_none!(blkrrpart, 0x12, 95);

/// Tells the kernel to read the new partition table.
fn reread_partitions(file: &File, dev: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: BLKRRPART takes no argument; the fd is an open block device.
    unsafe { blkrrpart(file.as_raw_fd()) }.with_context(|| {
        format!(
            "the kernel cannot re-read the partition table of {} (BLKRRPART)",
            dev.display()
        )
    })?;
    Ok(())
}

/// Waits until every node exists (devtmpfs creates them; there is no udev).
fn wait_for_nodes(nodes: &[PathBuf], timeout: Duration) -> Result<()> {
    let missing = || -> Vec<String> {
        nodes
            .iter()
            .filter(|n| !n.exists())
            .map(|p| p.display().to_string())
            .collect()
    };
    if crate::wait::wait_until(timeout, Duration::from_millis(50), || {
        missing().is_empty().then_some(())
    })
    .is_none()
    {
        bail!(
            "the partition nodes {} did not appear within {}s after re-reading the table",
            missing().join(", "),
            timeout.as_secs()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_finds_tables_file_systems_and_zfs() {
        let mut head = vec![0u8; MIB as usize];
        let tail = vec![0u8; MIB as usize];
        assert!(classify(&head, &tail, &[]).is_empty());
        head[512..520].copy_from_slice(b"EFI PART");
        assert_eq!(classify(&head, &tail, &[]), ["GPT partition table"]);
        let mut head = vec![0u8; MIB as usize];
        head[1080..1082].copy_from_slice(&[0x53, 0xEF]);
        assert_eq!(classify(&head, &tail, &[]), ["ext2/3/4 file system"]);
        let mut tail = vec![0u8; MIB as usize];
        tail[128 * 1024..128 * 1024 + 8].copy_from_slice(&0x00ba_b10c_u64.to_le_bytes());
        assert!(classify(&head, &tail, &[]).contains(&"ZFS label".to_string()));
        let head = vec![1u8; 4096];
        assert_eq!(
            classify(&head, &[], &[]),
            ["unrecognised data in the first or last MiB"]
        );
        assert_eq!(classify(&[], &[], &["sda1".into()]), ["partitions sda1"]);
    }

    /// Formats `sectors` sectors of `lbs` bytes with fatfs as the installer
    /// does (a sparse file) and says whether it came out FAT32.
    fn formats_as_fat32(sectors: u64, lbs: u64) -> bool {
        let mut file = tempfile::tempfile().expect("temp file");
        file.set_len(sectors * lbs).expect("sparse file");
        let mut slice = Slice {
            file: &mut file,
            start: 0,
            len: sectors * lbs,
            pos: 0,
        };
        format_esp(&mut slice, lbs, sectors, 1).is_ok()
    }

    #[test]
    fn the_fat32_minimum_is_fatfs_own_for_both_sector_sizes() {
        // The example: 32 MiB is FAT16 on every disk.
        for lbs in [512, 4096] {
            assert!(esp_fat32_problem(32 << 20, lbs).is_some(), "{lbs}");
            assert!(esp_fat32_problem(0, lbs).is_some(), "{lbs}");
        }
        assert_eq!(min_esp_bytes(512), 33 << 20);
        assert_eq!(min_esp_bytes(4096), 257 << 20);
        // The smallest FAT32 volume by the formula, to the sector, and one
        // sector less, are formatted for real: fatfs agrees at both edges.
        for lbs in [512u64, 4096] {
            let min = (1..=(300 << 20) / lbs)
                .find(|&n| fat32_clusters(n, lbs).is_some_and(|c| c >= FAT32_MIN_CLUSTERS))
                .expect("a minimum below 300 MiB");
            assert!(formats_as_fat32(min, lbs), "{min} sectors of {lbs}");
            assert!(
                !formats_as_fat32(min - 1, lbs),
                "{} sectors of {lbs}",
                min - 1
            );
            assert!(esp_fat32_problem(min * lbs, lbs).is_none());
            assert!(esp_fat32_problem((min - 1) * lbs, lbs).is_some());
        }
        // Across the cluster-size steps (260 MiB, 8 GiB) the formula and
        // fatfs agree too, and the shipped sizes are FAT32 on both.
        for (mib, lbs) in [
            (260, 512),
            (261, 512),
            (512, 4096),
            (1024, 512),
            (8193, 4096),
        ] {
            let sectors = (mib << 20) / lbs;
            assert_eq!(
                formats_as_fat32(sectors, lbs),
                esp_fat32_problem(mib << 20, lbs).is_none(),
                "{mib} MiB with {lbs}-byte sectors"
            );
        }
        // Too large: more sectors than FAT32 counts, or too many clusters.
        assert!(esp_fat32_problem(3 << 40, 512).is_some());
        assert!(esp_fat32_problem(10 << 40, 4096).is_some());
        assert!(esp_fat32_problem(1 << 40, 512).is_none());
    }

    #[test]
    fn partition_names() {
        assert_eq!(partition_name("nvme0n1", 3), "nvme0n1p3");
        assert_eq!(partition_name("sda", 1), "sda1");
    }
}

#[cfg(test)]
mod label_tests {
    use super::*;

    /// An XDR nvlist as OpenZFS packs a label's (nvpair.c): header, version,
    /// flags, pairs, end marker.
    fn xdr_nvlist(pairs: &[(&str, u32, Vec<u8>)]) -> Vec<u8> {
        fn string(s: &str) -> Vec<u8> {
            let mut v = (s.len() as u32).to_be_bytes().to_vec();
            v.extend(s.as_bytes());
            v.resize(4 + s.len().div_ceil(4) * 4, 0);
            v
        }
        let mut out = vec![1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        for (name, kind, value) in pairs {
            let mut body = string(name);
            body.extend(kind.to_be_bytes());
            body.extend(1u32.to_be_bytes());
            body.extend(value);
            let size = 8 + body.len() as u32;
            out.extend(size.to_be_bytes());
            out.extend(size.to_be_bytes());
            out.extend(body);
        }
        out.extend([0; 8]);
        out
    }

    fn label(name: &str, state: u64) -> Vec<u8> {
        let s = |v: &str| {
            let mut b = (v.len() as u32).to_be_bytes().to_vec();
            b.extend(v.as_bytes());
            b.resize(4 + v.len().div_ceil(4) * 4, 0);
            b
        };
        xdr_nvlist(&[
            ("version", 8, 5000u64.to_be_bytes().to_vec()),
            ("name", 9, s(name)),
            ("state", 8, state.to_be_bytes().to_vec()),
            ("txg", 8, 4u64.to_be_bytes().to_vec()),
            (
                "pool_guid",
                8,
                8157623019134458711u64.to_be_bytes().to_vec(),
            ),
            ("hostname", 9, s("(none)")),
        ])
    }

    #[test]
    fn reads_the_pool_name_from_a_label_nvlist() {
        let got = parse_label_nvlist(&label("rpool", 1)).expect("label");
        assert_eq!(
            got,
            LabelPool {
                name: "rpool".into(),
                guid: Some(8157623019134458711),
                state: Some(1)
            }
        );
        assert_eq!(parse_label_nvlist(&[0u8; 64]), None, "not XDR");
        assert_eq!(
            parse_label_nvlist(&label("rpool", 1)[..40]),
            None,
            "cut short"
        );
    }

    #[test]
    fn finds_a_pool_in_a_partition_from_any_of_its_labels() {
        // A 4 MiB "partition" at 1 MiB of a 6 MiB image, with only its
        // third label intact (the front ones overwritten).
        let (start, len) = (1u64 << 20, 4u64 << 20);
        let mut img = vec![0u8; 6 << 20];
        let third = start + label_offsets(len)[2] + LABEL_NVLIST_OFFSET;
        let l = label("rpool", 0);
        img[third as usize..third as usize + l.len()].copy_from_slice(&l);
        let t = tempfile::NamedTempFile::new().expect("tmp");
        std::fs::write(t.path(), &img).expect("write");
        let mut f = File::open(t.path()).expect("open");
        assert_eq!(
            read_label_pool(&mut f, start, len).map(|l| l.name),
            Some("rpool".into())
        );
        assert_eq!(
            read_label_pool(&mut f, 0, 1 << 20),
            None,
            "too small for labels"
        );
        assert_eq!(
            label_offsets(len),
            [0, 256 << 10, len - (512 << 10), len - (256 << 10)]
        );
        // What `nodeflash facts` and the node record for that disk: a
        // sysfs with the partition at 1 MiB, the disk as `dev/vdz`.
        let root = tempfile::tempdir().expect("tempdir");
        let part = root.path().join("sys/block/vdz/vdz3");
        std::fs::create_dir_all(&part).expect("mkdir");
        std::fs::write(part.join("start"), "2048\n").expect("start");
        std::fs::write(part.join("size"), "8192\n").expect("size");
        std::fs::create_dir_all(root.path().join("dev")).expect("mkdir");
        std::fs::copy(t.path(), root.path().join("dev/vdz")).expect("copy");
        let mut b = crate::facts::BlockDevice::fixed("vdz", 6 << 20, 512, "virtio", "S");
        look_at(&root.path().join("sys"), &root.path().join("dev"), &mut b).expect("look");
        assert_eq!(b.zfs_pools.len(), 1, "{b:?}");
        assert_eq!(
            (b.zfs_pools[0].device.as_str(), b.zfs_pools[0].pool.as_str()),
            ("vdz3", "rpool")
        );
        assert_eq!(b.zfs_pools[0].guid.as_deref(), Some("8157623019134458711"));
        assert!(
            b.signatures.contains(&"partitions vdz3".to_string()),
            "{b:?}"
        );
        assert!(
            b.signatures.contains(&"ZFS pool rpool on vdz3".to_string()),
            "{b:?}"
        );
    }
}

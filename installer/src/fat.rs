//! What nodeflash needs to know of FAT beyond what the `fatfs` crate does:
//! where things are in a volume ([`Layout`], from its boot sector), and the
//! repair of the directories fatfs 0.3.6 writes ([`fix_dot_entries`]). The
//! builder's ESP image (`builder/src/efi.rs`, FAT12/16/32 in memory) and the
//! installer's ESP on the disk (`boot.rs`, FAT32 on the partition) share it.
//!
//! Offsets and rules are those of Microsoft's FAT specification ("FAT: General
//! Overview of On-Disk Format", 1.03): the BPB fields at their byte offsets,
//! the cluster-count thresholds 4085 and 65525 that decide the FAT type.

use std::collections::BTreeSet;
use std::io::{Read, Seek, SeekFrom, Write};

use anyhow::{bail, Context, Result};

/// Where things are in a FAT volume, from its 512-byte boot sector. Offsets
/// and sizes are in bytes from the start of the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// 12, 16 or 32, from the count of clusters.
    pub fat_bits: u32,
    /// The first FAT.
    pub fat_offset: u64,
    /// FAT12/16: the fixed root directory region (offset, length); FAT32: empty.
    pub root_region: (u64, u64),
    /// FAT32: the first cluster of the root directory; FAT12/16: 0.
    pub root_cluster: u32,
    /// Cluster 2.
    pub data_offset: u64,
    pub cluster_size: u64,
    /// Data clusters (numbered from 2).
    pub clusters: u32,
    /// The volume's size as the boot sector gives it.
    pub volume_bytes: u64,
}

impl Layout {
    /// Reads the boot sector `b`. Errors: no `55 AA` signature, a sector size
    /// other than 512 to 4096, a cluster size that is not a power of two, no
    /// FAT or no reserved sector, or no data clusters.
    pub fn parse(b: &[u8; 512]) -> Result<Self> {
        let u16_at = |i: usize| u64::from(u16::from_le_bytes([b[i], b[i + 1]]));
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let sector = u16_at(11);
        let per_cluster = u64::from(b[13]);
        let (reserved, fats, root_entries) = (u16_at(14), u64::from(b[16]), u16_at(17));
        if b[510..512] != [0x55, 0xAA]
            || ![512, 1024, 2048, 4096].contains(&sector)
            || !per_cluster.is_power_of_two()
            || fats == 0
            || reserved == 0
        {
            bail!("no FAT file system (bad boot sector)");
        }
        let total = match u16_at(19) {
            0 => u64::from(u32_at(32)),
            n => n,
        };
        let fat_sectors = match u16_at(22) {
            0 => u64::from(u32_at(36)),
            n => n,
        };
        let root_sectors = (root_entries * 32).div_ceil(sector);
        let data_sector = reserved + fats * fat_sectors + root_sectors;
        if data_sector >= total {
            bail!("no FAT file system (no data clusters)");
        }
        let clusters = (total - data_sector) / per_cluster;
        let fat_bits = if clusters < 4085 {
            12
        } else if clusters < 65525 {
            16
        } else {
            32
        };
        Ok(Layout {
            fat_bits,
            fat_offset: reserved * sector,
            root_region: if fat_bits == 32 {
                (0, 0)
            } else {
                ((data_sector - root_sectors) * sector, root_sectors * sector)
            },
            root_cluster: if fat_bits == 32 { u32_at(44) } else { 0 },
            data_offset: data_sector * sector,
            cluster_size: per_cluster * sector,
            clusters: u32::try_from(clusters).context("too many clusters for FAT")?,
            volume_bytes: total * sector,
        })
    }

    /// Reads the boot sector of the volume at the start of `disk`.
    pub fn read<D: Read + Seek>(disk: &mut D) -> Result<Self> {
        let mut boot = [0u8; 512];
        disk.seek(SeekFrom::Start(0))
            .and_then(|_| disk.read_exact(&mut boot))
            .context("cannot read the boot sector")?;
        Self::parse(&boot)
    }

    /// The byte offset of data cluster `c` (2 or more).
    pub fn cluster_offset(&self, c: u32) -> u64 {
        self.data_offset + u64::from(c.saturating_sub(2)) * self.cluster_size
    }

    /// The clusters of the chain that starts at `first`, following the FAT.
    /// Errors: a chain longer than the volume (a loop), or a read error.
    pub fn chain<D: Read + Seek>(&self, disk: &mut D, first: u32) -> Result<Vec<u32>> {
        let mut chain = Vec::new();
        let mut c = first;
        while (2..self.clusters + 2).contains(&c) {
            if chain.len() > self.clusters as usize {
                bail!("the cluster chain at {first} loops");
            }
            chain.push(c);
            c = self.next_cluster(disk, c)?;
        }
        Ok(chain)
    }

    fn next_cluster<D: Read + Seek>(&self, disk: &mut D, c: u32) -> Result<u32> {
        let n = u64::from(c);
        let mut e = [0u8; 4];
        let (at, len) = match self.fat_bits {
            12 => (n * 3 / 2, 2),
            16 => (n * 2, 2),
            _ => (n * 4, 4),
        };
        disk.seek(SeekFrom::Start(self.fat_offset + at))?;
        disk.read_exact(&mut e[..len])?;
        let v = u32::from_le_bytes(e);
        Ok(match self.fat_bits {
            12 if c.is_multiple_of(2) => v & 0xfff,
            12 => (v >> 4) & 0xfff,
            16 => v & 0xffff,
            _ => v & 0x0fff_ffff,
        })
    }
}

const ATTR_LFN: u8 = 0x0f;
const ATTR_VOLUME: u8 = 0x08;
const ATTR_DIR: u8 = 0x10;
const DOT: &[u8; 11] = b".          ";
const DOTDOT: &[u8; 11] = b"..         ";

/// Works around two fatfs 0.3.6 bugs in the directories it creates: it puts
/// a long-name entry before each of "." and ".." (fsck.fat then reports the
/// directory as damaged), and on FAT32 a first-level directory's ".." names
/// the root's cluster instead of 0. Walks every directory of the volume at
/// the start of `disk` and rewrites the first slots of the ones that show
/// either; a fixed tree is left byte for byte alone. Errors: a bad boot
/// sector, a directory reachable twice or without a cluster, an I/O error.
pub fn fix_dot_entries<D: Read + Write + Seek>(disk: &mut D) -> Result<()> {
    let fat = Layout::read(disk)?;
    // First cluster of each directory to visit (0: the root), and whether its
    // parent is the root.
    let mut pending = vec![(0u32, false)];
    let mut visited = BTreeSet::new();
    let mut buf = Vec::new();
    while let Some((dir, parent_is_root)) = pending.pop() {
        if !visited.insert(dir) {
            bail!("the directory at cluster {dir} is reachable twice");
        }
        // Byte ranges of the directory's entries.
        let ranges: Vec<(u64, u64)> = if dir == 0 && fat.fat_bits != 32 {
            vec![fat.root_region]
        } else {
            let first = if dir == 0 { fat.root_cluster } else { dir };
            let chain = fat.chain(disk, first)?;
            if chain.is_empty() {
                bail!("the directory at cluster {first} has no cluster");
            }
            chain
                .iter()
                .map(|&c| (fat.cluster_offset(c), fat.cluster_size))
                .collect()
        };
        if dir != 0 {
            let mut slots = [0u8; 128];
            disk.seek(SeekFrom::Start(ranges[0].0))?;
            disk.read_exact(&mut slots)?;
            if fix_first_slots(&mut slots, parent_is_root && fat.fat_bits == 32) {
                disk.seek(SeekFrom::Start(ranges[0].0))?;
                disk.write_all(&slots)?;
            }
        }
        'ranges: for (offset, len) in ranges {
            buf.resize(len as usize, 0);
            disk.seek(SeekFrom::Start(offset))?;
            disk.read_exact(&mut buf)?;
            for e in buf.chunks_exact(32) {
                match e[0] {
                    0 => break 'ranges,
                    0xe5 => continue,
                    _ => {}
                }
                let (attr, name) = (e[11], &e[..11]);
                if attr == ATTR_LFN
                    || attr & ATTR_VOLUME != 0
                    || attr & ATTR_DIR == 0
                    || name == DOT
                    || name == DOTDOT
                {
                    continue;
                }
                let high = u32::from(u16::from_le_bytes([e[20], e[21]]));
                let low = u32::from(u16::from_le_bytes([e[26], e[27]]));
                pending.push(((high << 16) | low, dir == 0));
            }
        }
    }
    Ok(())
}

/// Rewrites the first four slots of a directory, [LFN, ".", LFN, ".."], as
/// [".", "..", deleted, deleted], and points ".." at cluster 0 if
/// `dotdot_to_root`. True if anything changed.
fn fix_first_slots(slots: &mut [u8; 128], dotdot_to_root: bool) -> bool {
    let name = |s: &[u8; 128], i: usize| s[i * 32..i * 32 + 11].to_vec();
    let attr = |s: &[u8; 128], i: usize| s[i * 32 + 11];
    let mut changed = false;
    if attr(slots, 0) == ATTR_LFN
        && name(slots, 1) == DOT
        && attr(slots, 2) == ATTR_LFN
        && name(slots, 3) == DOTDOT
    {
        slots.copy_within(32..64, 0);
        slots.copy_within(96..128, 32);
        slots[64..128].fill(0);
        slots[64] = 0xe5;
        slots[96] = 0xe5;
        changed = true;
    }
    // The high and low halves of ".."'s first cluster.
    if dotdot_to_root
        && name(slots, 1) == DOTDOT
        && (slots[52..54] != [0, 0] || slots[58..60] != [0, 0])
    {
        slots[52..54].fill(0);
        slots[58..60].fill(0);
        changed = true;
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A volume of `mib` MiB in memory, as fatfs formats it.
    fn volume(mib: usize, fat: fatfs::FatType) -> Cursor<Vec<u8>> {
        let mut disk = Cursor::new(vec![0u8; mib << 20]);
        let opts = fatfs::FormatVolumeOptions::new().fat_type(fat);
        fatfs::format_volume(&mut disk, opts).expect("format");
        disk.set_position(0);
        disk
    }

    #[test]
    fn layouts_of_the_three_fat_types() {
        for (mib, ty, bits) in [
            (1, fatfs::FatType::Fat12, 12),
            (16, fatfs::FatType::Fat16, 16),
            (40, fatfs::FatType::Fat32, 32),
        ] {
            let mut disk = volume(mib, ty);
            let l = Layout::read(&mut disk).expect("layout");
            assert_eq!(l.fat_bits, bits, "{mib} MiB");
            assert_eq!(l.volume_bytes, (mib as u64) << 20);
            assert_eq!(l.root_cluster, if bits == 32 { 2 } else { 0 });
            assert_eq!(l.root_region.1 == 0, bits == 32);
        }
        let e = Layout::parse(&[0; 512]).expect_err("zeros");
        assert!(format!("{e:#}").contains("no FAT"), "{e:#}");
    }

    #[test]
    fn first_slots_are_reordered_and_dotdot_pointed_at_the_root() {
        let mut slots = [0u8; 128];
        slots[11] = ATTR_LFN;
        slots[32..43].copy_from_slice(DOT);
        slots[43] = ATTR_DIR;
        slots[58] = 5;
        slots[64 + 11] = ATTR_LFN;
        slots[96..107].copy_from_slice(DOTDOT);
        slots[107] = ATTR_DIR;
        slots[122] = 2;
        assert!(fix_first_slots(&mut slots, false));
        assert_eq!(&slots[..11], DOT);
        assert_eq!(slots[26], 5);
        assert_eq!(&slots[32..43], DOTDOT);
        assert_eq!(slots[58], 2);
        assert_eq!((slots[64], slots[96]), (0xe5, 0xe5));
        let fixed = slots;
        assert!(!fix_first_slots(&mut slots, false));
        assert_eq!(slots, fixed);
        assert!(fix_first_slots(&mut slots, true));
        assert_eq!(slots[58], 0);
    }

    #[test]
    fn fixes_dot_entries_of_new_directories_on_every_fat_type() {
        for (mib, ty) in [
            (1, fatfs::FatType::Fat12),
            (16, fatfs::FatType::Fat16),
            (40, fatfs::FatType::Fat32),
        ] {
            let mut disk = volume(mib, ty);
            {
                let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new()).expect("fs");
                fs.root_dir().create_dir("EFI").expect("EFI");
                fs.root_dir().create_dir("EFI/BOOT").expect("EFI/BOOT");
                fs.unmount().expect("unmount");
            }
            let fat = Layout::read(&mut disk).expect("layout");
            let root = if fat.fat_bits == 32 {
                fat.cluster_offset(fat.root_cluster)
            } else {
                fat.root_region.0
            } as usize;
            let cl = |e: &[u8]| u32::from(u16::from_le_bytes([e[26], e[27]]));
            let efi = disk.get_ref()[root..root + 512]
                .chunks(32)
                .find(|e| &e[..11] == b"EFI        ")
                .map(cl)
                .expect("EFI in the root");
            let slots = |d: &Cursor<Vec<u8>>, c: u32| {
                let o = fat.cluster_offset(c) as usize;
                d.get_ref()[o..o + 128].to_vec()
            };
            let before = slots(&disk, efi);
            assert_eq!(before[11], ATTR_LFN, "fatfs 0.3.6 bug is gone? {before:?}");
            fix_dot_entries(&mut disk).expect("fix");
            let after = slots(&disk, efi);
            assert_eq!(&after[..11], DOT, "{ty:?}");
            assert_eq!(&after[32..43], DOTDOT, "{ty:?}");
            assert_eq!(cl(&after[..32]), efi, ". names the directory itself");
            assert_eq!(cl(&after[32..64]), 0, ".. of a first-level directory is 0");
            assert_eq!((after[64], after[96]), (0xe5, 0xe5));
            // EFI/BOOT was fixed too, and fatfs still reads the tree.
            disk.set_position(0);
            let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new()).expect("fs");
            let names = |d: fatfs::Dir<'_, _>| -> Vec<String> {
                d.iter().map(|e| e.expect("entry").file_name()).collect()
            };
            assert_eq!(
                names(fs.root_dir().open_dir("EFI").expect("EFI")),
                [".", "..", "BOOT"]
            );
            assert_eq!(
                names(fs.root_dir().open_dir("EFI/BOOT").expect("BOOT")),
                [".", ".."]
            );
            drop(fs);
            let before = disk.get_ref().clone();
            fix_dot_entries(&mut disk).expect("second fix");
            assert!(*disk.get_ref() == before, "a fixed tree is left alone");
        }
    }
}

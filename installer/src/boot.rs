//! systemd-boot on the target's ESP, written with `fatfs` through the
//! partition's device node (no mount, no vfat module).
//!
//! Layout on the ESP (paths from its root):
//!
//! - `EFI/BOOT/BOOTX64.EFI`: systemd-boot on the removable-media path, which
//!   firmware without boot variables falls through to;
//! - `EFI/systemd/systemd-bootx64.efi`: the same, where `bootctl` puts it;
//! - `EFI/nodeflash/<id>/vmlinuz` and `EFI/nodeflash/<id>/initrd`;
//! - `loader/loader.conf`: `timeout 3`, `default <id>.conf`, `editor no`;
//! - `loader/entries/<id>.conf`: the entry, written last.

use std::collections::{btree_map, BTreeMap};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One systemd-boot entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootEntry {
    /// File name stem of the entry and of its directory, e.g. `nodeflash`.
    pub id: String,
    pub title: String,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The kernel command line.
    pub cmdline: String,
}

/// A file written to the ESP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootFile {
    /// Path from the ESP's root, e.g. `EFI/BOOT/BOOTX64.EFI`.
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

/// What [`install_systemd_boot`] wrote, in the order it wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootFiles {
    /// The ESP device (or image file).
    pub esp: String,
    pub files: Vec<BootFile>,
}

/// Where the entry's kernel and initrd go on the ESP (without a leading `/`).
pub fn kernel_dir(id: &str) -> String {
    format!("EFI/nodeflash/{id}")
}

/// `loader/loader.conf`.
pub fn loader_conf(id: &str) -> String {
    format!("timeout 3\ndefault {id}.conf\neditor no\n")
}

/// `loader/entries/<id>.conf`.
pub fn entry_conf(entry: &BootEntry) -> String {
    let dir = kernel_dir(&entry.id);
    format!(
        "title {}\nlinux /{dir}/vmlinuz\ninitrd /{dir}/initrd\noptions {}\n",
        entry.title, entry.cmdline
    )
}

fn check_entry(entry: &BootEntry) -> Result<()> {
    let id_ok = !entry.id.is_empty()
        && entry.id.len() <= 64
        && !entry.id.starts_with('.')
        && entry
            .id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !id_ok {
        bail!(
            "boot entry id {:?} must be 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'",
            entry.id
        );
    }
    for (what, v) in [("title", &entry.title), ("command line", &entry.cmdline)] {
        if v.contains(['\n', '\r']) {
            bail!("the boot entry's {what} {v:?} must be one line");
        }
    }
    Ok(())
}

/// Installs systemd-boot and one entry on the FAT32 file system at `esp`
/// (the ESP's partition device, or an image file holding only the FAT
/// volume) and returns what it wrote.
///
/// Order, so that a disk left half-written by a failure never has a boot
/// entry that points at missing or partial files: every source is opened
/// before the ESP is touched; an old `loader/entries/<id>.conf` is removed
/// first; then the directories, systemd-boot (both paths), the kernel, the
/// initrd and `loader/loader.conf` are written, the device synced after each;
/// the entry is written last, as `<id>.tmp` (systemd-boot reads only
/// `*.conf`), synced, and renamed to `<id>.conf`, synced again. Files that
/// exist are replaced. fatfs writes no timestamps (they stay 0).
pub fn install_systemd_boot(
    esp: &Path,
    systemd_boot_efi: &Path,
    entry: &BootEntry,
) -> Result<BootFiles> {
    check_entry(entry)?;
    let dir = kernel_dir(&entry.id);
    let open = |p: &Path| File::open(p).with_context(|| format!("cannot open {}", p.display()));
    let sources = [
        ("EFI/BOOT/BOOTX64.EFI".to_string(), open(systemd_boot_efi)?),
        (
            "EFI/systemd/systemd-bootx64.efi".to_string(),
            open(systemd_boot_efi)?,
        ),
        (format!("{dir}/vmlinuz"), open(&entry.kernel)?),
        (format!("{dir}/initrd"), open(&entry.initrd)?),
    ];
    let entry_path = format!("loader/entries/{}.conf", entry.id);
    let entry_tmp = format!("loader/entries/{}.tmp", entry.id);

    let mut file = crate::disk::open_for_writing(esp)?;
    let len = file
        .seek(SeekFrom::End(0))
        .with_context(|| format!("cannot find the size of {}", esp.display()))?;
    // fsync through a second descriptor while fatfs holds the first.
    let syncer = file
        .try_clone()
        .with_context(|| format!("cannot duplicate the descriptor of {}", esp.display()))?;
    let sync = || {
        syncer
            .sync_all()
            .with_context(|| format!("cannot sync {}", esp.display()))
    };
    let mut disk = Cached::new(file, len);
    let mut boot_sector = [0u8; 512];
    disk.read_at(0, &mut boot_sector)
        .with_context(|| format!("cannot read the boot sector of {}", esp.display()))?;
    fat32(&boot_sector).with_context(|| format!("{} is not usable", esp.display()))?;
    let on = |what: &str| format!("cannot {what} on {}", esp.display());

    // Remove the old entry, then create the directories, then fix what
    // fatfs gets wrong in them (see `fix_dot_entries`).
    {
        let fs = mount(&mut disk, esp)?;
        let root = fs.root_dir();
        for old in [&entry_path, &entry_tmp] {
            match root.remove(old) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| on(&format!("remove the old {old}"))),
            }
        }
        // fatfs creates one level at a time.
        let mut dirs: Vec<&str> = vec!["EFI", "EFI/BOOT", "EFI/systemd", "EFI/nodeflash", &dir];
        dirs.extend(["loader", "loader/entries"]);
        for d in dirs {
            root.create_dir(d)
                .with_context(|| on(&format!("create directory {d}")))?;
        }
        drop(root);
        fs.unmount().with_context(|| on("update the FAT"))?;
    }
    crate::fat::fix_dot_entries(&mut disk).with_context(|| on("fix the new directories"))?;
    disk.flush().with_context(|| on("write the directories"))?;
    sync()?;

    let mut written = Vec::new();
    let fs = mount(&mut disk, esp)?;
    let root = fs.root_dir();
    let mut put = |path: &str, src: &mut dyn Read| -> Result<()> {
        let mut f = root
            .create_file(path)
            .with_context(|| on(&format!("create {path}")))?;
        // An existing file keeps its content until cut.
        let (bytes, sha256) = f
            .truncate()
            .and_then(|()| copy_hashed(src, &mut f))
            .and_then(|n| f.flush().map(|()| n))
            .with_context(|| on(&format!("write {path}")))?;
        drop(f);
        sync()?;
        written.push(BootFile {
            path: path.to_string(),
            bytes,
            sha256,
        });
        Ok(())
    };
    for (path, mut src) in sources {
        put(&path, &mut src)?;
    }
    put("loader/loader.conf", &mut loader_conf(&entry.id).as_bytes())?;
    put(&entry_tmp, &mut entry_conf(entry).as_bytes())?;
    root.rename(&entry_tmp, &root, &entry_path)
        .with_context(|| on(&format!("rename {entry_tmp} to {entry_path}")))?;
    drop(root);
    // Counts the free clusters if the FSInfo sector says "unknown" (as
    // fatfs formats it), so that unmount records the count.
    fs.stats().with_context(|| on("count the free clusters"))?;
    fs.unmount().with_context(|| on("update the FAT"))?;
    disk.flush().with_context(|| on("write the boot entry"))?;
    sync()?;
    if let Some(last) = written.last_mut() {
        last.path = entry_path;
    }
    Ok(BootFiles {
        esp: esp.display().to_string(),
        files: written,
    })
}

/// fatfs on the cached device (it must start reading at offset 0).
fn mount<'a>(disk: &'a mut Cached, esp: &Path) -> Result<fatfs::FileSystem<&'a mut Cached>> {
    disk.seek(SeekFrom::Start(0))
        .and_then(|_| fatfs::FileSystem::new(disk, fatfs::FsOptions::new()))
        .with_context(|| format!("cannot read the FAT file system on {}", esp.display()))
}

/// Copies `src` into `dst` and returns the bytes copied and their sha256.
fn copy_hashed(src: &mut dyn Read, dst: &mut impl Write) -> io::Result<(u64, String)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = src.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        dst.write_all(&buf[..k])?;
        n += k as u64;
    }
    Ok((n, hex::encode(h.finalize())))
}

const BLOCK: usize = 4096;
/// Blocks held before dirty ones are written back and all are dropped (16 MiB).
const MAX_BLOCKS: usize = 4096;

struct Block {
    data: Vec<u8>,
    dirty: bool,
}

/// A write-back cache of 4 KiB blocks in front of the device: fatfs reads
/// and writes the FAT and directories a few bytes at a time. `flush` writes
/// the dirty blocks (adjacent ones together) but does not fsync.
struct Cached {
    file: File,
    len: u64,
    pos: u64,
    blocks: BTreeMap<u64, Block>,
}

impl Cached {
    fn new(file: File, len: u64) -> Self {
        Cached {
            file,
            len,
            pos: 0,
            blocks: BTreeMap::new(),
        }
    }

    /// Block `idx`, read from the device unless `whole` (about to be overwritten).
    fn block(&mut self, idx: u64, whole: bool) -> io::Result<&mut Block> {
        if !self.blocks.contains_key(&idx) && self.blocks.len() >= MAX_BLOCKS {
            self.write_back()?;
            self.blocks.clear();
        }
        match self.blocks.entry(idx) {
            btree_map::Entry::Occupied(e) => Ok(e.into_mut()),
            btree_map::Entry::Vacant(v) => {
                let mut data = vec![0u8; BLOCK];
                if !whole {
                    let start = idx * BLOCK as u64;
                    let n = (self.len - start).min(BLOCK as u64) as usize;
                    self.file.read_exact_at(&mut data[..n], start)?;
                }
                Ok(v.insert(Block { data, dirty: false }))
            }
        }
    }

    fn write_back(&mut self) -> io::Result<()> {
        let (file, len) = (&self.file, self.len);
        let mut run: Vec<u8> = Vec::new();
        let mut run_start = 0u64;
        for (idx, b) in self.blocks.iter_mut().filter(|(_, b)| b.dirty) {
            let start = idx * BLOCK as u64;
            if !run.is_empty() && (run_start + run.len() as u64 != start || run.len() >= 1 << 20) {
                file.write_all_at(&run, run_start)?;
                run.clear();
            }
            if run.is_empty() {
                run_start = start;
            }
            let n = (len - start).min(BLOCK as u64) as usize;
            run.extend_from_slice(&b.data[..n]);
            b.dirty = false;
        }
        if !run.is_empty() {
            file.write_all_at(&run, run_start)?;
        }
        Ok(())
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.seek(SeekFrom::Start(offset))?;
        self.read_exact(buf)
    }
}

impl Read for Cached {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.len || buf.is_empty() {
            return Ok(0);
        }
        let off = (self.pos % BLOCK as u64) as usize;
        let n = buf
            .len()
            .min(BLOCK - off)
            .min((self.len - self.pos) as usize);
        let b = self.block(self.pos / BLOCK as u64, false)?;
        buf[..n].copy_from_slice(&b.data[off..off + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for Cached {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.pos >= self.len {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "write past the end of the device",
            ));
        }
        let off = (self.pos % BLOCK as u64) as usize;
        let n = buf
            .len()
            .min(BLOCK - off)
            .min((self.len - self.pos) as usize);
        let b = self.block(self.pos / BLOCK as u64, off == 0 && n == BLOCK)?;
        b.data[off..off + n].copy_from_slice(&buf[..n]);
        b.dirty = true;
        self.pos += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.write_back()
    }
}

impl Seek for Cached {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.pos = crate::disk::seek_position(self.pos, self.len, to)?;
        Ok(self.pos)
    }
}

/// The layout of the FAT32 volume whose boot sector is `b`: an ESP on a
/// disk is FAT32 (UEFI 2.10, 13.3.1.1). Errors: no FAT, or FAT12/16.
fn fat32(b: &[u8; 512]) -> Result<crate::fat::Layout> {
    let layout = crate::fat::Layout::parse(b)?;
    if layout.fat_bits != 32 {
        bail!("the FAT file system is FAT12 or FAT16, not FAT32 as an ESP on a disk must be");
    }
    Ok(layout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A FAT32 volume of 40 MiB in memory, as fatfs formats it.
    fn volume() -> Cursor<Vec<u8>> {
        let mut disk = Cursor::new(vec![0u8; 40 << 20]);
        let opts = fatfs::FormatVolumeOptions::new().fat_type(fatfs::FatType::Fat32);
        fatfs::format_volume(&mut disk, opts).expect("format");
        disk.set_position(0);
        disk
    }

    #[test]
    fn fat32_only() {
        let disk = volume();
        let boot: [u8; 512] = disk.get_ref()[..512].try_into().expect("512 bytes");
        let fat = fat32(&boot).expect("FAT32");
        assert_eq!((fat.root_cluster, fat.cluster_size), (2, 512));
        let mut small = Cursor::new(vec![0u8; 8 << 20]);
        fatfs::format_volume(&mut small, fatfs::FormatVolumeOptions::new()).expect("format");
        let boot: [u8; 512] = small.get_ref()[..512].try_into().expect("512 bytes");
        let e = fat32(&boot).expect_err("FAT16");
        assert!(format!("{e:#}").contains("not FAT32"), "{e:#}");
        assert!(format!("{:#}", fat32(&[0; 512]).expect_err("zeros")).contains("no FAT"));
    }

    #[test]
    fn cache_reads_writes_and_writes_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("dev");
        // Not a multiple of the block size: the last block is partial.
        std::fs::write(&path, vec![7u8; 3 * BLOCK + 100]).expect("write");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open");
        let mut c = Cached::new(file, 3 * BLOCK as u64 + 100);
        c.seek(SeekFrom::Start(BLOCK as u64 - 2)).expect("seek");
        c.write_all(b"abcd").expect("write across blocks");
        c.seek(SeekFrom::Start(2 * BLOCK as u64)).expect("seek");
        c.write_all(&vec![1u8; BLOCK + 100])
            .expect("whole block and tail");
        assert!(c.write_all(b"x").is_err(), "past the end");
        let mut back = [0u8; 6];
        c.read_at(BLOCK as u64 - 3, &mut back).expect("read");
        assert_eq!(&back, b"\x07abcd\x07");
        // Nothing reached the file before the flush.
        assert_eq!(std::fs::read(&path).expect("read")[BLOCK - 2], 7);
        c.flush().expect("flush");
        let mut want = vec![7u8; 3 * BLOCK + 100];
        want[BLOCK - 2..BLOCK + 2].copy_from_slice(b"abcd");
        want[2 * BLOCK..].fill(1);
        assert!(std::fs::read(&path).expect("read") == want);
    }

    #[test]
    fn entry_text_and_id_checks() {
        let e = BootEntry {
            id: "nodeflash".into(),
            title: "NixOS (alrest-1)".into(),
            kernel: "/k".into(),
            initrd: "/i".into(),
            cmdline: "init=/nix/store/x/init root=zfs:rpool/safe/root".into(),
        };
        assert_eq!(
            entry_conf(&e),
            "title NixOS (alrest-1)\nlinux /EFI/nodeflash/nodeflash/vmlinuz\ninitrd /EFI/nodeflash/nodeflash/initrd\noptions init=/nix/store/x/init root=zfs:rpool/safe/root\n"
        );
        assert_eq!(
            loader_conf("nodeflash"),
            "timeout 3\ndefault nodeflash.conf\neditor no\n"
        );
        check_entry(&e).expect("valid");
        for id in ["", ".x", "a/b", "a b"] {
            let bad = BootEntry {
                id: id.into(),
                ..e.clone()
            };
            assert!(check_entry(&bad).is_err(), "{id:?}");
        }
        let bad = BootEntry {
            cmdline: "a\nb".into(),
            ..e
        };
        assert!(format!("{:#}", check_entry(&bad).expect_err("newline")).contains("one line"));
    }
}

//! The EFI system partition image: a FAT filesystem written with `fatfs`.
//!
//! The image is built in memory (an ESP holds a few tens of MB), which also
//! spares fatfs its many small unbuffered reads and writes, and then written
//! out in one go. Every timestamp is fixed, so the same files give the same
//! image.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Cursor, Read, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use fatfs::{Date, DateTime, FileSystem, FormatVolumeOptions, FsOptions, Time, TimeProvider};

use crate::initramfs::Source;

use nodeflash_installer::units::MIB;
/// Room for the reserved sectors and a FAT12/16 root directory region.
const FIXED_OVERHEAD: u64 = 64 * 1024;
/// Free space left on top of the files.
const SLACK: u64 = MIB;
/// Directory entry size, and the characters one long-name entry holds.
const DIR_ENTRY: u64 = 32;
const LFN_CHARS: u64 = 13;

/// One file of the FAT image: its path inside the image
/// ("EFI/BOOT/BOOTX64.EFI") and its content.
#[derive(Debug, Clone)]
pub struct FatFile {
    /// Path inside the image, components separated by '/'.
    pub path: String,
    /// Where the content comes from.
    pub source: Source,
}

/// Gives fatfs a constant time (2020-01-01 00:00:00) for every timestamp.
#[derive(Debug)]
struct FixedTime;

const FIXED_DATE: Date = Date {
    year: 2020,
    month: 1,
    day: 1,
};

impl TimeProvider for FixedTime {
    fn get_current_date(&self) -> Date {
        FIXED_DATE
    }

    fn get_current_date_time(&self) -> DateTime {
        let time = Time {
            hour: 0,
            min: 0,
            sec: 0,
            millis: 0,
        };
        DateTime {
            date: FIXED_DATE,
            time,
        }
    }
}

static FIXED_TIME: FixedTime = FixedTime;

fn fs_options() -> FsOptions {
    FsOptions::new()
        .time_provider(&FIXED_TIME)
        .update_accessed_date(false)
}

/// A file to write: its path components and its size.
struct Planned<'a> {
    file: &'a FatFile,
    parts: Vec<&'a str>,
    size: u64,
}

/// Writes a FAT image holding `files` to `out` and returns its size in bytes.
///
/// The image is sized automatically (files rounded up to clusters, plus
/// directories, FAT overhead and 1 MiB of slack, rounded up to a whole MiB);
/// fatfs picks the FAT type from that size (FAT16 for a few tens of MB).
/// `label` (at most 11 characters, uppercased and padded with spaces) and
/// `volume_id` go into the boot sector. Directories are created as needed,
/// files are written in the given order and every timestamp is
/// 2020-01-01 00:00:00. Paths are compared case-insensitively, as FAT does; a
/// duplicate is an error.
pub fn write_fat_image(out: &Path, label: &str, volume_id: u32, files: &[FatFile]) -> Result<u64> {
    let label_bytes = volume_label(label)?;
    let planned = plan(files)?;

    // The FATs take at most 1/64 of the data: two copies of 4 bytes for each
    // 512-byte cluster.
    let mut size = round_up(
        data_bytes(&planned, 4096) * 65 / 64 + FIXED_OVERHEAD + SLACK,
        MIB,
    );
    let mut image = loop {
        let len = usize::try_from(size).context("fat image too large")?;
        let mut image = Cursor::new(vec![0u8; len]);
        let options = FormatVolumeOptions::new()
            .volume_label(label_bytes)
            .volume_id(volume_id);
        fatfs::format_volume(&mut image, options).with_context(|| {
            format!(
                "cannot format a {size}-byte fat image for {}",
                out.display()
            )
        })?;
        image.set_position(0);
        let fs = FileSystem::new(&mut image, fs_options())
            .with_context(|| format!("cannot mount the new fat image for {}", out.display()))?;
        let stats = fs.stats().context("cannot read fat image statistics")?;
        let cluster = u64::from(stats.cluster_size());
        let free = u64::from(stats.free_clusters()) * cluster;
        let needed = data_bytes(&planned, cluster);
        if free < needed {
            // The FAT layout fatfs picked left less room than estimated.
            drop(fs);
            size += round_up(needed - free, MIB);
            continue;
        }
        for item in &planned {
            write_file(&fs, item).with_context(|| {
                format!("cannot write {} into {}", item.file.path, out.display())
            })?;
        }
        fs.unmount()
            .with_context(|| format!("cannot unmount the fat image for {}", out.display()))?;
        break image.into_inner();
    };
    nodeflash_installer::fat::fix_dot_entries(&mut Cursor::new(&mut image[..])).with_context(
        || {
            format!(
                "cannot fix the directories of the fat image for {}",
                out.display()
            )
        },
    )?;

    std::fs::write(out, &image).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(image.len() as u64)
}

/// Reads a file back from a FAT image (tests, checks); the whole image is
/// loaded in memory.
pub fn read_fat_file(image: &Path, path: &str) -> Result<Vec<u8>> {
    let bytes = std::fs::read(image).with_context(|| format!("cannot read {}", image.display()))?;
    let mut disk = Cursor::new(bytes);
    let fs = FileSystem::new(&mut disk, fs_options())
        .with_context(|| format!("cannot mount fat image {}", image.display()))?;
    let mut file = fs
        .root_dir()
        .open_file(path)
        .with_context(|| format!("cannot open {path} in fat image {}", image.display()))?;
    let mut content = Vec::new();
    file.read_to_end(&mut content)
        .with_context(|| format!("cannot read {path} in fat image {}", image.display()))?;
    Ok(content)
}

/// Turns `label` into the 11 bytes of a FAT volume label.
fn volume_label(label: &str) -> Result<[u8; 11]> {
    let upper = label.to_ascii_uppercase();
    if upper.is_empty() || upper.len() > 11 {
        bail!("fat volume label {label:?} must have 1 to 11 characters");
    }
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b" !#$%&'()-@^_`{}~".contains(&b);
    if !upper.bytes().all(allowed) {
        bail!("fat volume label {label:?} has a character fat does not allow");
    }
    let mut bytes = [b' '; 11];
    bytes[..upper.len()].copy_from_slice(upper.as_bytes());
    Ok(bytes)
}

/// Checks every path and stats every source.
fn plan(files: &[FatFile]) -> Result<Vec<Planned<'_>>> {
    let mut seen = BTreeSet::new();
    let mut planned = Vec::with_capacity(files.len());
    for file in files {
        let parts: Vec<&str> = file.path.split('/').collect();
        if parts.iter().any(|part| part.is_empty()) {
            bail!("fat image path {:?} has an empty component", file.path);
        }
        if parts.iter().any(|part| *part == "." || *part == "..") {
            bail!(
                "fat image path {:?} has a \".\" or \"..\" component",
                file.path
            );
        }
        if !seen.insert(file.path.to_uppercase()) {
            bail!("fat image path {:?} is given twice", file.path);
        }
        let size = file
            .source
            .size()
            .with_context(|| format!("cannot read the source of fat image file {}", file.path))?;
        planned.push(Planned { file, parts, size });
    }
    Ok(planned)
}

/// Bytes of data clusters the files and their directories need with
/// `cluster`-byte clusters; every name is counted with long-name entries.
fn data_bytes(planned: &[Planned], cluster: u64) -> u64 {
    // Directory (by its path components) -> bytes of entries in it.
    let mut dirs: BTreeMap<&[&str], u64> = BTreeMap::new();
    dirs.insert(&[], 0);
    for item in planned {
        for depth in 1..=item.parts.len() {
            let name = item.parts[depth - 1];
            let entry = DIR_ENTRY * (1 + (name.chars().count() as u64).div_ceil(LFN_CHARS));
            let is_new = depth == item.parts.len() || !dirs.contains_key(&item.parts[..depth]);
            if is_new {
                *dirs.entry(&item.parts[..depth - 1]).or_insert(0) += entry;
            }
            if depth < item.parts.len() {
                // "." and "..".
                dirs.entry(&item.parts[..depth]).or_insert(2 * DIR_ENTRY);
            }
        }
    }
    let files: u64 = planned
        .iter()
        .map(|item| round_up(item.size, cluster))
        .sum();
    let dirs: u64 = dirs.values().map(|bytes| round_up(*bytes, cluster)).sum();
    files + dirs
}

/// Creates the directories of one file and writes it.
fn write_file<T: fatfs::ReadWriteSeek>(fs: &FileSystem<T>, item: &Planned) -> Result<()> {
    let (name, parents) = item.parts.split_last().context("empty path")?;
    let mut dir = fs.root_dir();
    for (depth, part) in parents.iter().enumerate() {
        dir = dir
            .create_dir(part)
            .with_context(|| format!("cannot create directory {}", parents[..=depth].join("/")))?;
    }
    let mut file = dir.create_file(name).context("cannot create the file")?;
    item.file.source.copy_to(item.size, &mut file)?;
    file.flush().context("cannot flush the file")?;
    Ok(())
}

fn round_up(value: u64, multiple: u64) -> u64 {
    value.div_ceil(multiple) * multiple
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn bytes(path: &str, content: &[u8]) -> FatFile {
        FatFile {
            path: path.to_owned(),
            source: Source::Bytes(content.to_vec()),
        }
    }

    fn content(file: &FatFile) -> Vec<u8> {
        match &file.source {
            Source::Bytes(bytes) => bytes.clone(),
            Source::Path(path) => std::fs::read(path).expect("read source"),
        }
    }

    /// Files in nested directories: a 3 MB one from a path, an empty one, and
    /// a directory spanning several clusters with a subdirectory at its end.
    fn sample(dir: &Path) -> Vec<FatFile> {
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let big_path = dir.join("vmlinuz");
        std::fs::write(&big_path, big).expect("write big file");
        let mut files = vec![
            bytes("EFI/BOOT/BOOTX64.EFI", b"MZ fake systemd-boot"),
            bytes("loader/loader.conf", b"timeout 0\ndefault nodeflash.conf\n"),
            bytes("loader/entries/nodeflash.conf", b"title nodeflash\n"),
            FatFile {
                path: "vmlinuz".to_owned(),
                source: Source::Path(big_path),
            },
            bytes("loader/entries/empty.conf", b""),
            bytes("a/long/path name with spaces/a-long-file-name.txt", b"x"),
        ];
        for i in 0..60 {
            files.push(bytes(
                &format!("many/file{i}.conf"),
                i.to_string().as_bytes(),
            ));
        }
        files.push(bytes("many/sub/last", b"last"));
        files
    }

    /// Runs `fsck.fat -n` on `image` when dosfstools is installed.
    fn fsck(image: &Path) {
        match Command::new("fsck.fat").arg("-n").arg(image).output() {
            Ok(output) => {
                let report = String::from_utf8_lossy(&output.stdout);
                assert!(output.status.success(), "fsck.fat: {report}");
                // Only the version line and the summary: no warnings.
                assert_eq!(report.lines().count(), 2, "fsck.fat: {report}");
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                nodeflash_installer::testing::require_or_skip(
                    "fsck.fat is not installed (package dosfstools)",
                );
            }
            Err(err) => panic!("cannot run fsck.fat: {err}"),
        }
    }

    fn fat_type(image: &Path) -> fatfs::FatType {
        let mut disk = Cursor::new(std::fs::read(image).expect("read image"));
        let fs = FileSystem::new(&mut disk, fs_options()).expect("mount");
        fs.fat_type()
    }

    #[test]
    fn files_read_back_with_label_volume_id_and_fixed_times() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = sample(dir.path());
        let image = dir.path().join("esp.img");
        let size = write_fat_image(&image, "nodeflash", 0x1234_abcd, &files).expect("write image");
        assert_eq!(size, std::fs::metadata(&image).expect("stat image").len());
        assert_eq!(size % MIB, 0);
        for file in &files {
            let read = read_fat_file(&image, &file.path).expect("read back");
            assert!(read == content(file), "{}", file.path);
        }

        let mut disk = Cursor::new(std::fs::read(&image).expect("read image"));
        let fs = FileSystem::new(&mut disk, fs_options()).expect("mount");
        assert_eq!(fs.volume_label(), "NODEFLASH");
        assert_eq!(fs.volume_id(), 0x1234_abcd);
        let label = fs.read_volume_label_from_root_dir().expect("root label");
        assert_eq!(label.as_deref(), Some("NODEFLASH"));
        let dir = fs.root_dir().open_dir("loader/entries").expect("open dir");
        let names: Vec<String> = dir.iter().map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(names, [".", "..", "nodeflash.conf", "empty.conf"]);
        for entry in fs.root_dir().iter().map(|e| e.expect("entry")) {
            assert_eq!(entry.created().date, FIXED_DATE, "{}", entry.file_name());
            let modified = entry.modified();
            assert_eq!(modified.date, FIXED_DATE, "{}", entry.file_name());
            let time = (modified.time.hour, modified.time.min, modified.time.sec);
            assert_eq!(time, (0, 0, 0), "{}", entry.file_name());
        }
    }

    #[test]
    fn two_writes_are_byte_identical() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = sample(dir.path());
        let first = dir.path().join("first.img");
        let second = dir.path().join("second.img");
        write_fat_image(&first, "ESP", 7, &files).expect("write first");
        write_fat_image(&second, "ESP", 7, &files).expect("write second");
        let first = std::fs::read(first).expect("read first");
        assert!(first == std::fs::read(second).expect("read second"));
    }

    #[test]
    fn fsck_fat_accepts_fat12_and_fat16_images() {
        let dir = tempfile::tempdir().expect("tempdir");
        let small = dir.path().join("small.img");
        let files = [bytes("EFI/BOOT/BOOTX64.EFI", b"MZ"), bytes("a/b/c/d", b"d")];
        write_fat_image(&small, "ESP", 7, &files).expect("write small image");
        assert_eq!(fat_type(&small), fatfs::FatType::Fat12);
        fsck(&small);

        let sample_image = dir.path().join("sample.img");
        write_fat_image(&sample_image, "ESP", 7, &sample(dir.path())).expect("write image");
        assert_eq!(fat_type(&sample_image), fatfs::FatType::Fat16);
        fsck(&sample_image);
    }

    #[test]
    fn forty_megabytes_give_fat16_with_room_to_spare() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = [
            bytes("EFI/BOOT/BOOTX64.EFI", &[1; 120_000]),
            bytes("vmlinuz", &[2; 10_000_000]),
            bytes("initrd.zst", &[3; 30_000_000]),
        ];
        let image = dir.path().join("esp.img");
        let size = write_fat_image(&image, "ESP", 1, &files).expect("write image");
        let total: u64 = 40_120_000;
        assert!(size > total && size <= total + 3 * MIB, "{size}");
        assert_eq!(fat_type(&image), fatfs::FatType::Fat16);
        let mut disk = Cursor::new(std::fs::read(&image).expect("read image"));
        let fs = FileSystem::new(&mut disk, fs_options()).expect("mount");
        let stats = fs.stats().expect("stats");
        let free = u64::from(stats.free_clusters()) * u64::from(stats.cluster_size());
        assert!(free >= SLACK / 2, "{free}");
        drop(fs);
        fsck(&image);
    }

    /// Builds a 1 GiB image in memory (a few seconds).
    #[test]
    fn fat32_image_passes_fsck() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sparse = dir.path().join("sparse");
        let file = std::fs::File::create(&sparse).expect("create sparse file");
        file.set_len(520 * MIB).expect("size sparse file");
        let files = [
            FatFile {
                path: "big/zeros".to_owned(),
                source: Source::Path(sparse),
            },
            bytes("EFI/BOOT/BOOTX64.EFI", b"MZ"),
            bytes("loader/entries/a.conf", b"a"),
        ];
        let image = dir.path().join("esp.img");
        write_fat_image(&image, "ESP", 1, &files).expect("write image");
        assert_eq!(fat_type(&image), fatfs::FatType::Fat32);
        assert_eq!(
            read_fat_file(&image, "loader/entries/a.conf").expect("read"),
            b"a"
        );
        fsck(&image);
    }

    #[test]
    fn empty_image_is_valid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("esp.img");
        let size = write_fat_image(&image, "ESP", 7, &[]).expect("write image");
        assert_eq!(size, 2 * MIB);
        fsck(&image);
        let err = read_fat_file(&image, "missing").expect_err("no such file");
        assert!(format!("{err:#}").contains("missing"), "{err:#}");
    }

    #[test]
    fn bad_paths_labels_and_sources_are_errors_naming_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("esp.img");
        for path in ["EFI//BOOTX64.EFI", "/EFI/BOOTX64.EFI", "EFI/", "", "a/../b"] {
            let err = write_fat_image(&image, "ESP", 1, &[bytes(path, b"x")]).expect_err(path);
            assert!(format!("{err:#}").contains(&format!("{path:?}")), "{err:#}");
        }
        let twice = [bytes("EFI/x", b"1"), bytes("efi/X", b"2")];
        let err = write_fat_image(&image, "ESP", 1, &twice).expect_err("duplicate");
        assert!(format!("{err:#}").contains("efi/X"), "{err:#}");

        let missing = FatFile {
            path: "vmlinuz".to_owned(),
            source: Source::Path(dir.path().join("does-not-exist")),
        };
        let err = write_fat_image(&image, "ESP", 1, &[missing]).expect_err("missing source");
        let message = format!("{err:#}");
        assert!(
            message.contains("does-not-exist") && message.contains("vmlinuz"),
            "{message}"
        );

        for label in ["", "TWELVE CHARS", "A.B", "É"] {
            let err = write_fat_image(&image, label, 1, &[]).expect_err(label);
            assert!(format!("{err:#}").contains("label"), "{err:#}");
        }
        assert!(!image.exists());
    }
}

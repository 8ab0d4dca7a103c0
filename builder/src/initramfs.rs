//! A deterministic initramfs: a cpio "newc" archive, optionally zstd-compressed.
//!
//! Entries are kept sorted by path (compared component by component, so a
//! directory always comes right before its contents) and written with fixed
//! metadata: uid 0, gid 0, mtime 0, dev 0 and inode numbers counted from 1 in
//! output order. The same entries therefore always give the same bytes,
//! whatever order they were added in.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// Worker threads used by [`Initramfs::write_zstd`]; fixed so the output does
/// not depend on the build machine.
const ZSTD_WORKERS: u32 = 4;

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const PERMISSION_BITS: u32 = 0o7777;

/// Where a file's bytes come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A file on the build host, read (streamed) when the output is written.
    Path(PathBuf),
    /// Bytes held in memory.
    Bytes(Vec<u8>),
}

impl Source {
    /// Returns the size of the content in bytes (a path is stat'ed).
    pub fn size(&self) -> Result<u64> {
        match self {
            Source::Path(path) => {
                let meta = std::fs::metadata(path)
                    .with_context(|| format!("cannot stat {}", path.display()))?;
                if !meta.is_file() {
                    bail!("{} is not a regular file", path.display());
                }
                Ok(meta.len())
            }
            Source::Bytes(bytes) => Ok(bytes.len() as u64),
        }
    }

    /// Copies the content to `out`, checking that it is exactly `size` bytes
    /// long (a file that changed size since [`Source::size`] is an error).
    pub fn copy_to<W: Write + ?Sized>(&self, size: u64, out: &mut W) -> Result<()> {
        match self {
            Source::Path(path) => {
                let file =
                    File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
                let copied = io::copy(&mut (&file).take(size), out)
                    .with_context(|| format!("cannot copy {}", path.display()))?;
                let mut extra = [0u8; 1];
                let more = (&file)
                    .read(&mut extra)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                if copied != size || more != 0 {
                    bail!("{} changed size while being read", path.display());
                }
            }
            Source::Bytes(bytes) => {
                if bytes.len() as u64 != size {
                    bail!(
                        "in-memory content is {} bytes, expected {size}",
                        bytes.len()
                    );
                }
                out.write_all(bytes)
                    .context("cannot write in-memory content")?;
            }
        }
        Ok(())
    }
}

/// One entry of the archive.
#[derive(Debug, Clone)]
pub enum Entry {
    /// A directory with its permission bits.
    Dir {
        /// Permission bits, e.g. 0o755.
        mode: u32,
    },
    /// A regular file with its permission bits and content.
    File {
        /// Permission bits, e.g. 0o644.
        mode: u32,
        /// Where the content comes from.
        source: Source,
    },
    /// A symbolic link (mode 0o777) pointing at `target`.
    Symlink {
        /// The link target, stored as the entry's content.
        target: String,
    },
}

/// An initramfs being assembled: entries keyed by path, written in sorted order.
#[derive(Debug, Default)]
pub struct Initramfs {
    entries: BTreeMap<Vec<String>, Entry>,
}

/// Splits an absolute path ("/lib/x") into its components, ignoring empty and
/// "." components.
///
/// # Panics
///
/// Panics on a ".." component: paths are built by the builder itself, so one
/// is a programming error.
fn components(path: &str) -> Vec<String> {
    path.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .map(|c| {
            assert!(c != "..", "initramfs path {path:?} has a \"..\" component");
            c.to_owned()
        })
        .collect()
}

impl Initramfs {
    /// Creates an empty initramfs.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a file at `path` (absolute, e.g. "/init" or "/lib/x/libc.so.6"),
    /// creating missing parent directories with mode 0o755.
    ///
    /// `mode` is the permission bits (0o755, 0o644); the file type bits are
    /// added by the writer. Adding a path that already exists replaces the
    /// previous entry.
    ///
    /// # Panics
    ///
    /// Panics if `path` is the root or has a ".." component.
    pub fn add_file(&mut self, path: &str, mode: u32, source: Source) {
        let mode = mode & PERMISSION_BITS;
        self.insert(path, Entry::File { mode, source });
    }

    /// Adds a directory at `path` with the permission bits `mode`, creating
    /// missing parents with mode 0o755; an existing entry is replaced. Adding
    /// the root ("/") does nothing: the kernel provides it.
    ///
    /// # Panics
    ///
    /// Panics if `path` has a ".." component.
    pub fn add_dir(&mut self, path: &str, mode: u32) {
        if components(path).is_empty() {
            return;
        }
        let mode = mode & PERMISSION_BITS;
        self.insert(path, Entry::Dir { mode });
    }

    /// Adds a symbolic link at `path` pointing at `target`, creating missing
    /// parents with mode 0o755; an existing entry is replaced.
    ///
    /// # Panics
    ///
    /// Panics if `path` is the root or has a ".." component.
    pub fn add_symlink(&mut self, path: &str, target: &str) {
        let target = target.to_owned();
        self.insert(path, Entry::Symlink { target });
    }

    fn insert(&mut self, path: &str, entry: Entry) {
        let key = components(path);
        assert!(!key.is_empty(), "initramfs path {path:?} names the root");
        for depth in 1..key.len() {
            self.entries
                .entry(key[..depth].to_vec())
                .or_insert(Entry::Dir { mode: 0o755 });
        }
        self.entries.insert(key, entry);
    }

    /// Returns whether an entry exists at `path`.
    pub fn contains(&self, path: &str) -> bool {
        self.entries.contains_key(&components(path))
    }

    /// Returns the number of entries, implicit parent directories included.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Returns whether the archive has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Returns the sha256 (hex) over every entry in output order (path, kind,
    /// mode, symlink target or file bytes), skipping the exact paths in
    /// `exclude` (not their contents, for a directory). The same content gives
    /// the same hash, whatever the insertion order.
    pub fn content_hash(&self, exclude: &[&str]) -> Result<String> {
        let exclude: Vec<Vec<String>> = exclude.iter().map(|path| components(path)).collect();
        let mut hasher = Sha256::new();
        for (key, entry) in &self.entries {
            if exclude.contains(key) {
                continue;
            }
            let name = key.join("/");
            hasher.update(name.as_bytes());
            hasher.update([0]);
            match entry {
                Entry::Dir { mode } => {
                    hasher.update(b"d");
                    hasher.update(mode.to_le_bytes());
                }
                Entry::Symlink { target } => {
                    hasher.update(b"l");
                    hasher.update((target.len() as u64).to_le_bytes());
                    hasher.update(target.as_bytes());
                }
                Entry::File { mode, source } => {
                    let size = source
                        .size()
                        .with_context(|| format!("cannot hash initramfs file {name}"))?;
                    hasher.update(b"f");
                    hasher.update(mode.to_le_bytes());
                    hasher.update(size.to_le_bytes());
                    source
                        .copy_to(size, &mut hasher)
                        .with_context(|| format!("cannot hash initramfs file {name}"))?;
                }
            }
        }
        Ok(hex::encode(hasher.finalize()))
    }

    /// Writes the uncompressed newc archive to `out` (not buffered here: wrap
    /// a file in a `BufWriter`); returns the number of bytes written.
    pub fn write_cpio<W: Write>(&self, out: W) -> Result<u64> {
        let mut out = CountingWriter {
            inner: out,
            count: 0,
        };
        for (index, (key, entry)) in self.entries.iter().enumerate() {
            let name = key.join("/");
            let parent = &key[..key.len() - 1];
            if !parent.is_empty() && !matches!(self.entries.get(parent), Some(Entry::Dir { .. })) {
                bail!("parent of initramfs entry {name} is not a directory");
            }
            let ino = u32::try_from(index + 1).context("too many initramfs entries")?;
            let header = cpio::NewcBuilder::new(&name)
                .ino(ino)
                .uid(0)
                .gid(0)
                .mtime(0)
                .nlink(1);
            write_entry(header, entry, &mut out)
                .with_context(|| format!("cannot write initramfs entry {name}"))?;
        }
        cpio::newc::trailer(&mut out).context("cannot write initramfs trailer")?;
        out.flush().context("cannot flush initramfs")?;
        Ok(out.count)
    }

    /// Writes the archive compressed with zstd at `level` (with a content
    /// checksum, on a fixed number of worker threads) to the file `path`;
    /// returns the compressed size.
    pub fn write_zstd(&self, path: &Path, level: i32) -> Result<u64> {
        let file =
            File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        self.append_zstd(file, level)
            .with_context(|| format!("cannot write {}", path.display()))?;
        let size = std::fs::metadata(path)
            .with_context(|| format!("cannot stat {}", path.display()))?
            .len();
        Ok(size)
    }

    /// Writes the archive as one zstd frame at `level` (as
    /// [`Initramfs::write_zstd`]) to the end of `file`: after another
    /// archive, the kernel unpacks both in order (an initramfs is any number
    /// of archives back to back, each compressed or not: the kernel's
    /// Documentation/driver-api/early-userspace/buffer-format.rst).
    pub fn append_zstd(&self, file: File, level: i32) -> Result<()> {
        let mut encoder = zstd::Encoder::new(BufWriter::new(file), level)
            .context("cannot start zstd compression")?;
        encoder
            .include_checksum(true)
            .context("cannot set zstd parameters")?;
        encoder
            .multithread(ZSTD_WORKERS)
            .context("cannot set zstd parameters")?;
        self.write_cpio(&mut encoder)?;
        encoder
            .finish()
            .and_then(|buffered| buffered.into_inner().map_err(|e| e.into_error()))
            .map(drop)
            .context("cannot finish the zstd frame")
    }

    /// Splits the archive in two: the entries at or below the paths of
    /// `top` (absolute, e.g. `/init`, `/etc/nodeflash`), with copies of
    /// their parent directories so that the second archive stands on its
    /// own, and everything else (without the directories that hold only
    /// `top`'s paths). Returns (everything else, top).
    pub fn split(&self, top: &[&str]) -> (Initramfs, Initramfs) {
        let tops: Vec<Vec<String>> = top.iter().map(|p| components(p)).collect();
        let (mut rest, mut upper) = (Initramfs::new(), Initramfs::new());
        for (key, entry) in &self.entries {
            if !tops.iter().any(|t| key.starts_with(t)) {
                rest.entries.insert(key.clone(), entry.clone());
                continue;
            }
            for depth in 1..key.len() {
                let parent = &key[..depth];
                if let Some(dir) = self.entries.get(parent) {
                    upper.entries.insert(parent.to_vec(), dir.clone());
                }
            }
            upper.entries.insert(key.clone(), entry.clone());
        }
        // A directory that holds nothing but `top`'s paths goes with them
        // alone, so that the rest does not depend on what `top` holds
        // (deepest first: `/usr` once `/usr/lib` is gone).
        let mut parents: Vec<&Vec<String>> = upper
            .entries
            .keys()
            .filter(|k| rest.entries.contains_key(*k))
            .collect();
        parents.sort_by_key(|k| std::cmp::Reverse(k.len()));
        for k in parents {
            let holds_more = rest
                .entries
                .keys()
                .any(|r| r.len() > k.len() && r.starts_with(k));
            if !holds_more {
                rest.entries.remove(k);
            }
        }
        (rest, upper)
    }
}

/// Writes one entry (header and content) with the file type, mode and nlink
/// it needs.
fn write_entry<W: Write>(header: cpio::NewcBuilder, entry: &Entry, out: &mut W) -> Result<()> {
    match entry {
        Entry::Dir { mode } => {
            header
                .mode(S_IFDIR | mode)
                .nlink(2)
                .write(out, 0)
                .finish()?;
        }
        Entry::Symlink { target } => {
            let size = u32::try_from(target.len()).context("symlink target too long")?;
            let mut writer = header.mode(S_IFLNK | 0o777).write(out, size);
            writer.write_all(target.as_bytes())?;
            writer.finish()?;
        }
        Entry::File { mode, source } => {
            let size = source.size()?;
            let size32 = u32::try_from(size).context("file larger than 4 GiB")?;
            let mut writer = header.mode(S_IFREG | mode).write(out, size32);
            source.copy_to(size, &mut writer)?;
            writer.finish()?;
        }
    }
    Ok(())
}

/// A writer that counts the bytes going through it.
struct CountingWriter<W> {
    inner: W,
    count: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.count += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// One entry as read back from an archive.
    #[derive(Debug)]
    struct ReadEntry {
        name: String,
        ino: u32,
        mode: u32,
        uid: u32,
        gid: u32,
        mtime: u32,
        nlink: u32,
        content: Vec<u8>,
    }

    fn read_archive(bytes: &[u8]) -> Vec<ReadEntry> {
        let mut entries = Vec::new();
        let mut input = bytes;
        loop {
            let mut reader = cpio::NewcReader::new(input).expect("valid newc header");
            if reader.entry().is_trailer() {
                break;
            }
            let e = reader.entry();
            let mut entry = ReadEntry {
                name: e.name().to_owned(),
                ino: e.ino(),
                mode: e.mode(),
                uid: e.uid(),
                gid: e.gid(),
                mtime: e.mtime(),
                nlink: e.nlink(),
                content: Vec::new(),
            };
            reader
                .read_to_end(&mut entry.content)
                .expect("entry content");
            entries.push(entry);
            input = reader.finish().expect("finish entry");
        }
        entries
    }

    fn cpio_bytes(initramfs: &Initramfs) -> Vec<u8> {
        let mut out = Vec::new();
        let written = initramfs.write_cpio(&mut out).expect("write cpio");
        assert_eq!(written, out.len() as u64);
        out
    }

    /// An archive with every kind of entry and both kinds of sources.
    fn sample(dir: &Path) -> Initramfs {
        let data_path = dir.join("data.bin");
        std::fs::write(&data_path, b"from a file\n").expect("write sample file");
        let mut initramfs = Initramfs::new();
        initramfs.add_file("/init", 0o755, Source::Bytes(b"#!/bin/sh\n".to_vec()));
        initramfs.add_file("/lib/x/data.bin", 0o644, Source::Path(data_path));
        initramfs.add_symlink("/bin/sh", "busybox");
        initramfs.add_dir("/proc", 0o555);
        initramfs.add_file("/empty", 0o600, Source::Bytes(Vec::new()));
        initramfs
    }

    #[test]
    fn cpio_round_trip_keeps_names_modes_and_contents() {
        let dir = tempfile::tempdir().expect("tempdir");
        let initramfs = sample(dir.path());
        assert_eq!(initramfs.len(), 8);
        assert!(!initramfs.is_empty());
        assert!(initramfs.contains("/lib/x"));
        assert!(initramfs.contains("lib/x/data.bin"));
        assert!(!initramfs.contains("/lib/y"));

        let entries = read_archive(&cpio_bytes(&initramfs));
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/sh",
                "empty",
                "init",
                "lib",
                "lib/x",
                "lib/x/data.bin",
                "proc"
            ]
        );
        let expected: [(u32, u32, &[u8]); 8] = [
            (0o040755, 2, b""),
            (0o120777, 1, b"busybox"),
            (0o100600, 1, b""),
            (0o100755, 1, b"#!/bin/sh\n"),
            (0o040755, 2, b""),
            (0o040755, 2, b""),
            (0o100644, 1, b"from a file\n"),
            (0o040555, 2, b""),
        ];
        for (index, (entry, (mode, nlink, content))) in entries.iter().zip(expected).enumerate() {
            assert_eq!(entry.ino as usize, index + 1, "{}", entry.name);
            assert_eq!(entry.mode, mode, "{}", entry.name);
            assert_eq!(entry.nlink, nlink, "{}", entry.name);
            assert_eq!(entry.content, content, "{}", entry.name);
            assert_eq!(
                (entry.uid, entry.gid, entry.mtime),
                (0, 0, 0),
                "{}",
                entry.name
            );
        }
    }

    #[test]
    fn output_is_independent_of_insertion_order() {
        let paths = ["/a-c/f", "/a/b/f", "/a.d", "/a/b-c", "/z", "/a/b/c/d"];
        let mut forward = Initramfs::new();
        for path in paths {
            forward.add_file(path, 0o644, Source::Bytes(path.as_bytes().to_vec()));
        }
        let mut backward = Initramfs::new();
        for path in paths.iter().rev() {
            backward.add_file(path, 0o644, Source::Bytes(path.as_bytes().to_vec()));
        }
        let bytes = cpio_bytes(&forward);
        assert_eq!(bytes, cpio_bytes(&backward));

        let names: Vec<String> = read_archive(&bytes).into_iter().map(|e| e.name).collect();
        assert_eq!(
            names,
            ["a", "a/b", "a/b/c", "a/b/c/d", "a/b/f", "a/b-c", "a-c", "a-c/f", "a.d", "z"]
        );
    }

    #[test]
    fn adding_a_path_twice_replaces_it() {
        let mut initramfs = Initramfs::new();
        initramfs.add_file("/etc/x", 0o644, Source::Bytes(b"old".to_vec()));
        initramfs.add_file("//etc/./x", 0o600, Source::Bytes(b"new".to_vec()));
        initramfs.add_dir("/etc", 0o700);
        assert_eq!(initramfs.len(), 2);
        let entries = read_archive(&cpio_bytes(&initramfs));
        assert_eq!(entries[0].mode, 0o040700);
        assert_eq!(entries[1].mode, 0o100600);
        assert_eq!(entries[1].content, b"new");
    }

    #[test]
    fn parent_that_is_not_a_directory_is_an_error() {
        let mut initramfs = Initramfs::new();
        initramfs.add_file("/a", 0o644, Source::Bytes(Vec::new()));
        initramfs.add_file("/a/b", 0o644, Source::Bytes(Vec::new()));
        let err = initramfs.write_cpio(io::sink()).expect_err("file parent");
        assert!(format!("{err:#}").contains("a/b"), "{err:#}");
    }

    #[test]
    fn missing_source_file_is_an_error_naming_it() {
        let mut initramfs = Initramfs::new();
        initramfs.add_file("/x", 0o644, Source::Path("/nonexistent/nodeflash".into()));
        let err = initramfs
            .write_cpio(io::sink())
            .expect_err("missing source");
        assert!(
            format!("{err:#}").contains("/nonexistent/nodeflash"),
            "{err:#}"
        );
        let err = initramfs.content_hash(&[]).expect_err("missing source");
        assert!(
            format!("{err:#}").contains("/nonexistent/nodeflash"),
            "{err:#}"
        );
    }

    #[test]
    fn copy_to_rejects_a_size_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        std::fs::write(&path, b"12345").expect("write file");
        let source = Source::Path(path);
        let mut out = Vec::new();
        source.copy_to(5, &mut out).expect("right size");
        assert_eq!(out, b"12345");
        for wrong in [4, 6] {
            let err = source
                .copy_to(wrong, &mut Vec::new())
                .expect_err("wrong size");
            assert!(format!("{err:#}").contains("changed size"), "{err:#}");
        }
    }

    #[test]
    fn content_hash_tracks_content_and_ignores_excluded_paths() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut initramfs = sample(dir.path());
        let hash = initramfs.content_hash(&[]).expect("hash");
        assert_eq!(hash.len(), 64);
        assert_eq!(hash, sample(dir.path()).content_hash(&[]).expect("hash"));

        let excluded = initramfs.content_hash(&["/etc/build-id"]).expect("hash");
        assert_eq!(excluded, hash);
        initramfs.add_file("/etc/build-id", 0o644, Source::Bytes(b"1".to_vec()));
        let with_id = initramfs.content_hash(&["/etc/build-id"]).expect("hash");
        initramfs.add_file("/etc/build-id", 0o644, Source::Bytes(b"2".to_vec()));
        assert_eq!(
            initramfs.content_hash(&["/etc/build-id"]).expect("hash"),
            with_id
        );
        assert_ne!(initramfs.content_hash(&[]).expect("hash"), with_id);

        initramfs.add_file("/init", 0o755, Source::Bytes(b"#!/bin/sH\n".to_vec()));
        assert_ne!(
            initramfs.content_hash(&["/etc/build-id"]).expect("hash"),
            with_id
        );
        initramfs.add_file("/init", 0o744, Source::Bytes(b"#!/bin/sh\n".to_vec()));
        assert_ne!(
            initramfs.content_hash(&["/etc/build-id"]).expect("hash"),
            with_id
        );
    }

    #[test]
    fn zstd_output_decompresses_to_the_cpio_and_is_reproducible() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut initramfs = sample(dir.path());
        // Several MB of compressible but varied data, to use several zstd jobs.
        let big: Vec<u8> = (0..6_000_000u32)
            .flat_map(|i| (i / 7).to_le_bytes())
            .collect();
        initramfs.add_file("/big", 0o644, Source::Bytes(big));
        let cpio = cpio_bytes(&initramfs);

        let first = dir.path().join("first.zst");
        let second = dir.path().join("second.zst");
        let size = initramfs.write_zstd(&first, 3).expect("write zstd");
        initramfs.write_zstd(&second, 3).expect("write zstd");
        let first_bytes = std::fs::read(&first).expect("read first");
        assert_eq!(size, first_bytes.len() as u64);
        assert!(size < cpio.len() as u64);
        assert_eq!(first_bytes, std::fs::read(&second).expect("read second"));
        let decoded = zstd::decode_all(first_bytes.as_slice()).expect("decode");
        assert_eq!(decoded, cpio);
    }

    #[test]
    fn a_split_archive_holds_every_entry_once_and_its_top_stands_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut initramfs = sample(dir.path());
        initramfs.add_dir("/etc", 0o700);
        initramfs.add_file("/etc/fstab", 0o644, Source::Bytes(Vec::new()));
        let profile = Source::Bytes(b"x".to_vec());
        initramfs.add_file("/etc/nodeflash/profile.toml", 0o644, profile);
        let efi = Source::Bytes(b"e".to_vec());
        initramfs.add_file("/usr/lib/nodeflash/boot.efi", 0o644, efi);
        let tops = ["/init", "/etc/nodeflash", "/usr/lib/nodeflash"];
        let (rest, top) = initramfs.split(&tops);
        let names =
            |fs: &Initramfs| -> Vec<String> { fs.entries.keys().map(|k| k.join("/")).collect() };
        assert_eq!(
            names(&top),
            [
                "etc",
                "etc/nodeflash",
                "etc/nodeflash/profile.toml",
                "init",
                "usr",
                "usr/lib",
                "usr/lib/nodeflash",
                "usr/lib/nodeflash/boot.efi",
            ]
        );
        // A parent directory keeps its mode; one that holds only the top's
        // paths (/usr) is in the top alone, one that holds more (/etc) in both.
        assert!(matches!(
            top.entries[&components("/etc")],
            Entry::Dir { mode: 0o700 }
        ));
        assert!(rest.contains("/etc/fstab") && rest.contains("/etc"));
        assert!(!rest.contains("/usr") && !rest.contains("/usr/lib"));
        assert!(!rest.contains("/init") && !rest.contains("/etc/nodeflash"));
        let mut all = names(&rest);
        all.extend(names(&top));
        all.sort();
        all.dedup();
        assert_eq!(all, names(&initramfs));
        // The rest does not depend on the top: the same without /usr/lib/nodeflash.
        let mut without = sample(dir.path());
        without.add_dir("/etc", 0o700);
        without.add_file("/etc/fstab", 0o644, Source::Bytes(Vec::new()));
        assert_eq!(
            without.split(&tops).0.content_hash(&[]).expect("hash"),
            rest.content_hash(&[]).expect("hash")
        );
        // Two frames back to back: each decodes to its own archive.
        let both = dir.path().join("both.zst");
        rest.write_zstd(&both, 3).expect("write the rest");
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&both)
            .expect("open");
        top.append_zstd(file, 3).expect("append the top");
        let decoded =
            zstd::decode_all(std::fs::read(&both).expect("read").as_slice()).expect("decode");
        assert_eq!(decoded, [cpio_bytes(&rest), cpio_bytes(&top)].concat());
    }

    #[test]
    fn external_tools_list_the_archive() {
        let dir = tempfile::tempdir().expect("tempdir");
        let archive = dir.path().join("initramfs.cpio");
        let file = File::create(&archive).expect("create archive");
        sample(dir.path()).write_cpio(file).expect("write cpio");
        let expected = "bin\nbin/sh\nempty\ninit\nlib\nlib/x\nlib/x/data.bin\nproc\n";

        let mut ran = false;
        let tools: [(&str, &[&str]); 2] = [
            ("cpio", &["-i", "-t", "--quiet"]),
            ("bsdtar", &["-t", "-f", "-"]),
        ];
        for (tool, args) in tools {
            let input = File::open(&archive).expect("open archive");
            match Command::new(tool).args(args).stdin(input).output() {
                Ok(output) => {
                    assert!(output.status.success(), "{tool}: {output:?}");
                    assert_eq!(String::from_utf8_lossy(&output.stdout), expected, "{tool}");
                    ran = true;
                }
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => panic!("cannot run {tool}: {err}"),
            }
        }
        if !ran {
            nodeflash_installer::testing::require_or_skip(
                "neither cpio nor bsdtar is installed (package cpio)",
            );
        }
    }
}

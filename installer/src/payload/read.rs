//! Reading a payload: header and manifest checked up front, then the frames
//! read in one sequential stream and decompressed, hashed and written by
//! worker threads. Every file's bytes are checked against the manifest
//! before they are written.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions, Permissions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use super::{check_path, Counters, Entry, Header, Manifest, HEADER_LEN, STORE_MTIME};

/// A run of a file's bytes in a frame.
#[derive(Debug, Clone, Copy)]
struct Piece {
    entry: usize,
    offset: u64,
    len: u64,
    /// Which part of a large file this is.
    chunk: Option<usize>,
}

/// An opened payload whose header and manifest have been checked.
#[derive(Debug)]
pub struct Payload<R> {
    reader: R,
    pub header: Header,
    pub manifest: Manifest,
    pieces: Vec<Vec<Piece>>,
    /// With [`Payload::keep_only`]: the store paths that are written.
    keep: Option<BTreeSet<String>>,
}

/// What [`Payload::check_frames`] read.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FramesChecked {
    pub frames: usize,
    /// Compressed bytes read (all frames).
    pub bytes: u64,
    pub secs: f64,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ExtractStats {
    pub files: usize,
    pub bytes: u64,
    pub payload_bytes: u64,
}

impl<R: Read> Payload<R> {
    /// Reads and checks the header and manifest: nothing is written yet.
    pub fn open(mut reader: R) -> Result<Self> {
        let mut h = [0u8; HEADER_LEN];
        reader
            .read_exact(&mut h)
            .context("cannot read the payload header (is the payload truncated?)")?;
        let header = Header::parse(&h)?;
        let mut compressed = vec![0u8; header.manifest_len as usize];
        reader
            .read_exact(&mut compressed)
            .context("cannot read the payload manifest (is the payload truncated?)")?;
        if Sha256::digest(&compressed).as_slice() != header.manifest_sha256 {
            bail!("the payload manifest is damaged (its sha256 does not match the header)");
        }
        let json = zstd::stream::decode_all(compressed.as_slice())
            .context("cannot decompress the payload manifest")?;
        let manifest: Manifest =
            serde_json::from_slice(&json).context("cannot parse the payload manifest")?;
        let pieces = check(&header, &manifest)?;
        Ok(Self {
            reader,
            header,
            manifest,
            pieces,
            keep: None,
        })
    }

    /// Makes [`Payload::extract`] write only the entries of these store
    /// paths (names, `HASH-NAME`): one node's closure out of a payload that
    /// holds several. Every frame is still read and every file checked.
    /// Errors when a path is not in the payload.
    pub fn keep_only(&mut self, store_paths: BTreeSet<String>) -> Result<()> {
        let have: BTreeSet<&str> = self.manifest.store_paths().into_iter().collect();
        if let Some(missing) = store_paths.iter().find(|p| !have.contains(p.as_str())) {
            bail!("store path {missing} is not in the payload");
        }
        self.keep = Some(store_paths);
        Ok(())
    }

    /// The manifest of what [`Payload::extract`] writes: all of it, or the
    /// entries of the store paths given to [`Payload::keep_only`].
    pub fn written(&self) -> Manifest {
        match &self.keep {
            None => self.manifest.clone(),
            Some(keep) => Manifest {
                entries: self
                    .manifest
                    .entries
                    .iter()
                    .filter(|e| keep.contains(e.store_path()))
                    .cloned()
                    .collect(),
                ..self.manifest.clone()
            },
        }
    }

    /// Byte offset of frame 0 in the payload file.
    pub fn frames_offset(&self) -> u64 {
        HEADER_LEN as u64 + self.header.manifest_len
    }

    /// Reads every frame from `frames` (the payload file positioned at
    /// [`Payload::frames_offset`]) in one sequential stream, one `read` per
    /// frame, and checks each frame's compressed bytes against its sha256
    /// in the manifest on `threads` hashing threads; then checks that
    /// nothing follows the last frame. Nothing is decompressed or written:
    /// this is the check of the whole payload before the disk is touched.
    /// Adds compressed bytes to `counters.payload_bytes`. Errors name the
    /// first damaged frame, its store paths, and what to do.
    pub fn check_frames(
        &self,
        mut frames: impl Read,
        threads: usize,
        counters: &Counters,
    ) -> Result<FramesChecked> {
        let m = &self.manifest;
        let n = m.frames.len();
        let started = std::time::Instant::now();
        let stop = AtomicBool::new(false);
        let failure: Mutex<Option<anyhow::Error>> = Mutex::new(None);
        let fail = |e: anyhow::Error| {
            stop.store(true, Ordering::Relaxed);
            if let Ok(mut f) = failure.lock() {
                f.get_or_insert(e);
            }
        };
        let names = |i: usize| {
            let paths = m.store_paths_of_frame(i);
            let more = paths.len().saturating_sub(3);
            let mut s = paths[..paths.len().min(3)].join(", ");
            if more > 0 {
                s.push_str(&format!(" and {more} more"));
            }
            if paths.len() == 1 {
                format!("store path {s}")
            } else {
                format!("store paths {s}")
            }
        };
        let threads = threads.max(1);
        let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, Vec<u8>)>(threads * 2);
        let rx = Mutex::new(rx);
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| loop {
                    let job = match rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    let Ok((i, data)) = job else { return };
                    if stop.load(Ordering::Relaxed) {
                        continue;
                    }
                    if hex::encode(Sha256::digest(&data)) != m.frames[i].sha256 {
                        return fail(anyhow::anyhow!(
                            "payload frame {i} of {n} is damaged ({}): its sha256 does not match the manifest",
                            names(i)
                        ));
                    }
                });
            }
            send_frames(&mut frames, m, counters, &stop, &fail, tx, &|i| {
                format!(
                    "cannot read payload frame {i} of {n} ({}): the payload is truncated or unreadable",
                    names(i)
                )
            });
        });
        if let Some(e) = failure.into_inner().ok().flatten() {
            return Err(e);
        }
        ensure_nothing_follows(&mut frames)?;
        Ok(FramesChecked {
            frames: n,
            bytes: m.frames.iter().map(|f| f.len).sum(),
            secs: started.elapsed().as_secs_f64(),
        })
    }

    pub fn manifest_sha256(&self) -> String {
        hex::encode(self.header.manifest_sha256)
    }

    /// Reads every frame, checks every file against the manifest and, with
    /// `dest`, writes the tree there (a new or empty directory) with the
    /// manifest's modes and modification time 1.
    pub fn extract(
        self,
        dest: Option<&Path>,
        threads: usize,
        counters: &Counters,
    ) -> Result<ExtractStats> {
        let Payload {
            mut reader,
            manifest,
            pieces,
            keep,
            ..
        } = self;
        // Entries not written (another node's store paths): checked only.
        let skip: Vec<bool> = manifest
            .entries
            .iter()
            .map(|e| keep.as_ref().is_some_and(|k| !k.contains(e.store_path())))
            .collect();
        let threads = threads.max(1);
        let mask = umask();
        if let Some(dest) = dest {
            check_empty(dest)?;
        }
        // Entries before this index exist (directories, links, empty files):
        // a worker writes a frame's files once their directories are there.
        let prepared = AtomicUsize::new(if dest.is_some() { 0 } else { usize::MAX });
        if dest.is_none() {
            let empty = manifest
                .entries
                .iter()
                .filter(|e| matches!(e, Entry::File { size: 0, .. }))
                .count();
            counters.files.fetch_add(empty as u64, Ordering::Relaxed);
        }
        let remaining: Vec<AtomicU32> = manifest
            .entries
            .iter()
            .map(|e| match e {
                Entry::File { chunks, .. } => AtomicU32::new(chunks.len() as u32),
                _ => AtomicU32::new(0),
            })
            .collect();
        let stop = AtomicBool::new(false);
        let failure: Mutex<Option<anyhow::Error>> = Mutex::new(None);
        let fail = |e: anyhow::Error| {
            stop.store(true, Ordering::Relaxed);
            if let Ok(mut f) = failure.lock() {
                f.get_or_insert(e);
            }
        };
        let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, Vec<u8>)>(threads * 2);
        let rx = Mutex::new(rx);
        let n = manifest.frames.len();
        std::thread::scope(|s| {
            if let Some(dest) = dest {
                s.spawn(|| {
                    if let Err(e) = prepare(dest, &manifest, &skip, mask, &prepared, counters) {
                        fail(e);
                    }
                });
            }
            for _ in 0..threads {
                s.spawn(|| {
                    let mut z = match zstd::bulk::Decompressor::new() {
                        Ok(z) => z,
                        Err(e) => return fail(anyhow::Error::new(e).context("cannot set up zstd")),
                    };
                    let mut out = Vec::new();
                    loop {
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        let Ok((i, data)) = job else { return };
                        let last = pieces[i].iter().map(|p| p.entry).max().unwrap_or(0);
                        while prepared.load(Ordering::Acquire) <= last
                            && !stop.load(Ordering::Relaxed)
                        {
                            std::thread::sleep(std::time::Duration::from_micros(200));
                        }
                        if stop.load(Ordering::Relaxed) {
                            continue;
                        }
                        let w = Worker {
                            manifest: &manifest,
                            skip: &skip,
                            dest,
                            remaining: &remaining,
                            counters,
                            mask,
                        };
                        if let Err(e) = w.frame(i, &data, &pieces[i], &mut z, &mut out) {
                            return fail(e);
                        }
                    }
                });
            }
            send_frames(&mut reader, &manifest, counters, &stop, &fail, tx, &|i| {
                format!(
                    "the payload is truncated: cannot read frame {i} of {n} (store path {})",
                    manifest.store_path_of_frame(i)
                )
            });
        });
        if let Some(e) = failure.into_inner().ok().flatten() {
            return Err(e);
        }
        ensure_nothing_follows(&mut reader)?;
        if let Some(dest) = dest {
            finalize(dest, &manifest, &skip)?;
        }
        Ok(ExtractStats {
            files: manifest.files(),
            bytes: manifest.bytes(),
            payload_bytes: manifest.frames.iter().map(|f| f.len).sum(),
        })
    }
}

/// Reads the manifest's frames from `reader` in order, one `read_exact` per
/// frame, and sends each (index, compressed bytes) to the workers on `tx`,
/// until `stop` is set or the workers are gone; adds the compressed bytes to
/// `counters.payload_bytes`. A short read goes to `fail` with the context
/// `cannot_read(frame index)`.
fn send_frames(
    reader: &mut impl Read,
    m: &Manifest,
    counters: &Counters,
    stop: &AtomicBool,
    fail: &dyn Fn(anyhow::Error),
    tx: std::sync::mpsc::SyncSender<(usize, Vec<u8>)>,
    cannot_read: &dyn Fn(usize) -> String,
) {
    for (i, frame) in m.frames.iter().enumerate() {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let mut data = vec![0u8; frame.len as usize];
        if let Err(e) = reader.read_exact(&mut data) {
            fail(anyhow::Error::new(e).context(cannot_read(i)));
            break;
        }
        counters
            .payload_bytes
            .fetch_add(frame.len, Ordering::Relaxed);
        if tx.send((i, data)).is_err() {
            break;
        }
    }
}

/// Fails when `reader` (past the last frame) still has data: the payload is
/// damaged or not what its header says.
fn ensure_nothing_follows(reader: &mut impl Read) -> Result<()> {
    let mut extra = [0u8; 1];
    if reader.read(&mut extra).context("cannot read the payload")? != 0 {
        bail!(
            "the payload has data after its last frame: it is damaged or not what the header says"
        );
    }
    Ok(())
}

/// Checks that the manifest describes a tree that can be extracted safely
/// and that its frames are exactly covered by file data; returns each
/// frame's pieces.
fn check(header: &Header, m: &Manifest) -> Result<Vec<Vec<Piece>>> {
    if m.version != header.version || m.frame_size != header.frame_size {
        bail!("the payload manifest does not match its header");
    }
    let total = m
        .frames
        .iter()
        .try_fold(0u64, |sum, f| sum.checked_add(f.len));
    if total != Some(header.frames_len) {
        bail!("the payload manifest's frames do not add up to the header's length");
    }
    let fs = u64::from(m.frame_size);
    // A frame is never empty, and zstd never makes it larger than this (the
    // reader allocates a frame's compressed length before reading it).
    let max_len = zstd::zstd_safe::compress_bound(m.frame_size as usize) as u64;
    if let Some(i) = m
        .frames
        .iter()
        .position(|f| f.size > fs || f.size == 0 || f.len == 0 || f.len > max_len)
    {
        bail!("payload frame {i} has an impossible size");
    }
    for (i, f) in m.frames.iter().enumerate() {
        check_hash(&format!("payload frame {i}"), &f.sha256)?;
    }
    let mut pieces: Vec<Vec<Piece>> = vec![Vec::new(); m.frames.len()];
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    let mut dirs: BTreeSet<&str> = BTreeSet::new();
    for (i, e) in m.entries.iter().enumerate() {
        let path = e.path();
        check_path(path)?;
        if !seen.insert(path) {
            bail!("{path} appears twice in the payload manifest");
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            if !dirs.contains(parent) {
                bail!("{path} comes before its directory in the payload manifest");
            }
        }
        match e {
            Entry::Dir { mode, .. } => {
                check_mode(path, *mode)?;
                dirs.insert(path);
            }
            Entry::Symlink { target, .. } => {
                if target.is_empty() || target.contains('\0') {
                    bail!("{path}: bad symlink target in the payload manifest");
                }
            }
            Entry::File {
                mode,
                size,
                sha256,
                frame,
                offset,
                chunks,
                ..
            } => {
                check_mode(path, *mode)?;
                check_hash(path, sha256)?;
                let frame = *frame as usize;
                if *size == 0 {
                    continue;
                }
                if *size <= fs {
                    let end = offset.checked_add(*size);
                    if !chunks.is_empty()
                        || m.frames
                            .get(frame)
                            .is_none_or(|f| end.is_none_or(|end| end > f.size))
                    {
                        bail!("{path}: its place in the payload is out of range");
                    }
                    pieces[frame].push(Piece {
                        entry: i,
                        offset: *offset,
                        len: *size,
                        chunk: None,
                    });
                } else {
                    if *offset != 0 || chunks.len() as u64 != size.div_ceil(fs) {
                        bail!("{path}: its parts in the payload do not match its size");
                    }
                    for (c, h) in chunks.iter().enumerate() {
                        check_hash(path, h)?;
                        let len = fs.min(size - c as u64 * fs);
                        if m.frames.get(frame + c).is_none_or(|f| f.size != len) {
                            bail!("{path}: its parts in the payload are out of range");
                        }
                        pieces[frame + c].push(Piece {
                            entry: i,
                            offset: 0,
                            len,
                            chunk: Some(c),
                        });
                    }
                }
            }
        }
    }
    for (i, p) in pieces.iter_mut().enumerate() {
        p.sort_by_key(|p| p.offset);
        let mut end = 0;
        for piece in p.iter() {
            if piece.offset != end {
                bail!("payload frame {i} has overlapping or missing file data");
            }
            end += piece.len;
        }
        if end != m.frames[i].size {
            bail!("payload frame {i} has data that belongs to no file");
        }
    }
    Ok(pieces)
}

fn check_mode(path: &str, mode: u32) -> Result<()> {
    if mode & !0o777 != 0 {
        bail!("{path}: mode {mode:o} is not allowed in a store");
    }
    Ok(())
}

fn check_hash(path: &str, h: &str) -> Result<()> {
    if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("{path}: bad sha256 in the payload manifest");
    }
    Ok(())
}

fn store_time() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(STORE_MTIME as u64)
}

/// The process's umask (read by setting it and setting it back).
fn umask() -> u32 {
    use nix::sys::stat::{umask, Mode};
    let old = umask(Mode::from_bits_truncate(0o022));
    umask(old);
    old.bits()
}

/// The directory to extract into must be new or empty.
fn check_empty(dest: &Path) -> Result<()> {
    if dest.exists() {
        let mut rd =
            std::fs::read_dir(dest).with_context(|| format!("cannot read {}", dest.display()))?;
        if rd.next().is_some() {
            bail!(
                "{} is not empty: the store is extracted into an empty directory",
                dest.display()
            );
        }
        Ok(())
    } else {
        std::fs::create_dir_all(dest).with_context(|| format!("cannot create {}", dest.display()))
    }
}

/// Creates directories (writable until [`finalize`]), symlinks and empty
/// files in order, beside the workers, telling them how far it got.
fn prepare(
    dest: &Path,
    m: &Manifest,
    skip: &[bool],
    mask: u32,
    prepared: &AtomicUsize,
    counters: &Counters,
) -> Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o755);
    for (i, e) in m.entries.iter().enumerate() {
        let path = dest.join(e.path());
        match e {
            // Not written, but read and checked like the rest: counted, so
            // that progress reaches the whole payload's file count.
            Entry::File { size: 0, .. } if skip[i] => {
                counters.files.fetch_add(1, Ordering::Relaxed);
            }
            _ if skip[i] => {}
            Entry::Dir { .. } => builder
                .create(&path)
                .with_context(|| format!("cannot create directory {}", path.display()))?,
            Entry::Symlink { target, .. } => std::os::unix::fs::symlink(target, &path)
                .with_context(|| format!("cannot create symlink {}", path.display()))?,
            Entry::File { mode, size: 0, .. } => {
                let f = create(&path, *mode)?;
                seal(&f, *mode, &path, mode & mask != 0)?;
                counters.files.fetch_add(1, Ordering::Relaxed);
            }
            Entry::File { .. } => {}
        }
        prepared.store(i + 1, Ordering::Release);
    }
    Ok(())
}

/// A new file with its final mode (as root, writing it still works).
fn create(path: &Path, mode: u32) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))
}

/// Gives a written file the store's modification time, and its mode when
/// it was not created with it (the umask took bits away, or it was a part).
fn seal(f: &File, mode: u32, path: &Path, chmod: bool) -> Result<()> {
    if chmod {
        f.set_permissions(Permissions::from_mode(mode))
            .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    }
    f.set_modified(store_time())
        .with_context(|| format!("cannot set the time of {}", path.display()))
}

/// Directory modes and times (deepest first, after everything is written)
/// and symlink times.
fn finalize(dest: &Path, m: &Manifest, skip: &[bool]) -> Result<()> {
    use nix::sys::stat::{utimensat, UtimensatFlags};
    use nix::sys::time::TimeSpec;
    let mtime = TimeSpec::new(STORE_MTIME, 0);
    m.entries.iter().zip(skip).rev().try_for_each(|(e, skip)| {
        if *skip {
            return Ok(());
        }
        let path = dest.join(e.path());
        let time = |follow| {
            utimensat(
                nix::fcntl::AT_FDCWD,
                &path,
                &TimeSpec::UTIME_OMIT,
                &mtime,
                follow,
            )
            .with_context(|| format!("cannot set the time of {}", path.display()))
        };
        match e {
            Entry::Dir { mode, .. } => {
                std::fs::set_permissions(&path, Permissions::from_mode(*mode))
                    .with_context(|| format!("cannot set the mode of {}", path.display()))?;
                time(UtimensatFlags::FollowSymlink)
            }
            Entry::Symlink { .. } => time(UtimensatFlags::NoFollowSymlink),
            Entry::File { .. } => Ok(()),
        }
    })
}

struct Worker<'a> {
    manifest: &'a Manifest,
    skip: &'a [bool],
    dest: Option<&'a Path>,
    remaining: &'a [AtomicU32],
    counters: &'a Counters,
    mask: u32,
}

impl Worker<'_> {
    fn frame(
        &self,
        i: usize,
        data: &[u8],
        pieces: &[Piece],
        z: &mut zstd::bulk::Decompressor<'static>,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let m = self.manifest;
        let want = m.frames[i].size as usize;
        out.clear();
        out.reserve(want);
        let damaged = || {
            format!(
                "payload frame {i} of {} is damaged (store path {})",
                m.frames.len(),
                m.store_path_of_frame(i)
            )
        };
        let n = z.decompress_to_buffer(data, out).with_context(damaged)?;
        if n != want {
            bail!("{}: {n} bytes instead of {want}", damaged());
        }
        for p in pieces {
            let Entry::File {
                path,
                mode,
                sha256,
                chunks,
                ..
            } = &m.entries[p.entry]
            else {
                bail!("internal error: frame {i} names an entry that is not a file");
            };
            let bytes = &out[p.offset as usize..(p.offset + p.len) as usize];
            let want_hash = p.chunk.map_or(sha256, |c| &chunks[c]);
            if hex::encode(Sha256::digest(bytes)) != *want_hash {
                bail!(
                    "{path}: content does not match the payload manifest (store path {}); the payload is damaged",
                    m.entries[p.entry].store_path()
                );
            }
            let dest = self.dest.filter(|_| !self.skip[p.entry]);
            let file = match (dest, p.chunk) {
                (None, _) => None,
                (Some(dest), None) => {
                    let full = dest.join(path);
                    let mut f = create(&full, *mode)?;
                    f.write_all(bytes)
                        .with_context(|| format!("cannot write {}", full.display()))?;
                    Some((f, full))
                }
                (Some(dest), Some(c)) => {
                    let full = dest.join(path);
                    let f = OpenOptions::new()
                        .write(true)
                        .create(true)
                        .mode(0o600)
                        .custom_flags(nix::libc::O_NOFOLLOW)
                        .open(&full)
                        .with_context(|| format!("cannot create {}", full.display()))?;
                    f.write_all_at(bytes, c as u64 * u64::from(m.frame_size))
                        .with_context(|| format!("cannot write {}", full.display()))?;
                    Some((f, full))
                }
            };
            // A large file is done when its last part, whichever, is written.
            let done =
                p.chunk.is_none() || self.remaining[p.entry].fetch_sub(1, Ordering::AcqRel) == 1;
            if done {
                if let Some((f, full)) = &file {
                    seal(f, *mode, full, p.chunk.is_some() || mode & self.mask != 0)?;
                }
                self.counters.files.fetch_add(1, Ordering::Relaxed);
            }
            self.counters.bytes.fetch_add(p.len, Ordering::Relaxed);
        }
        Ok(())
    }
}

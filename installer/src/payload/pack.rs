//! Packing a store tree into a payload file.
//!
//! Store paths are packed in the order of their names without the hash
//! (`HASH-NAME` by `NAME`, then by the whole name; see [`store_name`]), so a
//! store path that Nix rebuilds (a new hash, the same name) keeps its place.
//! Frames never cross a *unit*: a store path whose files hold at least a
//! quarter of the frame size is a unit of its own, and smaller store paths
//! are gathered into buckets of consecutive paths (at most one frame size of
//! data) whose ends are picked by the paths' names without the hash (a
//! bucket ends after a path whose `NAME`'s sha256 starts with a byte
//! divisible by [`BUCKET_CUT`]), so that adding or removing one small path
//! changes only its own bucket, and a rebuilt one (new hash, same name)
//! changes only the bucket it stays in. A unit's frames depend on nothing
//! but its files and the compression settings, which is what lets
//! [`FrameCache`] keep them from one pack to the next.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Read, Seek, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{tree, Counters, Entry, Frame, Header, Manifest, FORMAT_VERSION, MAX_FRAME_SIZE};

/// Version of the packer's layout (where files go in frames, what a unit
/// is); part of every [`FrameCache`] key. Version 2 cut frames at units;
/// version 3 orders store paths by their names without the hash and cuts
/// buckets by those names; version 4 keeps a frame that does not compress
/// at zstd's level 1 ([`Compressors::frame`]); version 5 lets that level
/// 1 see the whole frame (long-distance matching), so a frame that repeats
/// itself further apart than level 1's window is not kept.
pub const LAYOUT_VERSION: u32 = 5;

/// A frame that zstd's level 1 shrinks by less than this (percent) is kept
/// as level 1 wrote it: already compressed data (a kernel, an xz module, a
/// zstd initramfs, images) gains a fraction of a percent at level 17, at
/// over 50 times the CPU time.
pub const INCOMPRESSIBLE_PERCENT: usize = 3;

/// A bucket of small store paths ends after a path whose name without the
/// hash has a sha256 starting with a multiple of this (about one path in 8).
pub const BUCKET_CUT: u8 = 8;

/// Nix's base-32 alphabet (`nix32Chars`, Nix's src/libutil/hash.cc).
const NIX32: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// The name of a store path without its hash: `NAME` for `HASH-NAME` where
/// `HASH` is 32 characters of Nix's base-32 alphabet (a store path's hash
/// part, Nix's src/libstore/path.cc `StorePath::HashLen`); the whole
/// name for anything else.
fn store_name(path: &str) -> &str {
    match path.as_bytes().get(..33) {
        Some([hash @ .., b'-']) if hash.iter().all(|c| NIX32.contains(c)) => &path[33..],
        _ => path,
    }
}

/// Puts the store paths of `entries` (in walk order: each top-level entry
/// followed by what it contains) in the packer's order, by [`store_name`]
/// then by the whole name; each store path's entries stay in walk order.
fn order_store_paths(entries: Vec<Entry>) -> Vec<Entry> {
    let mut spans: Vec<Vec<Entry>> = Vec::new();
    for e in entries {
        match spans.last_mut() {
            Some(span) if e.path().contains('/') => span.push(e),
            _ => spans.push(vec![e]),
        }
    }
    spans.sort_by(|a, b| {
        let (a, b) = (a[0].path(), b[0].path());
        (store_name(a), a).cmp(&(store_name(b), b))
    });
    spans.into_iter().flatten().collect()
}

/// Where the compressed frames of each unit are kept between packs: one file
/// per unit, named by the sha256 of everything its frames are made from
/// (layout and format versions, zstd version, level, frame size, each
/// file's path and size, and, unless `names_are_content`, each file's
/// sha256). A hit has its modification time set to now, which is what the
/// builder's size bound (`nodeflash cache gc`) evicts by.
#[derive(Debug, Clone)]
pub struct FrameCache {
    /// The directory of the entries (created when missing).
    pub dir: PathBuf,
    /// Whether a store path's name stands for its content, as in a Nix
    /// store (`/nix/store/HASH-NAME` never changes once built). When false,
    /// every file is hashed before packing and the hashes are part of the key.
    pub names_are_content: bool,
}

#[derive(Debug, Clone)]
pub struct PackOptions {
    /// zstd level of every frame ([`super::DEFAULT_LEVEL`] by default).
    pub level: i32,
    /// Uncompressed bytes per frame.
    pub frame_size: u32,
    /// Compression threads.
    pub threads: usize,
    /// Nix's registration of the closure, carried for `nix-store --load-db`.
    pub registration: Option<String>,
    /// Pack only these entries of the source directory (a closure's store paths).
    pub only: Option<Vec<String>>,
    /// Reuse and keep each unit's compressed frames here.
    pub cache: Option<FrameCache>,
}

impl Default for PackOptions {
    fn default() -> Self {
        Self {
            level: super::DEFAULT_LEVEL,
            frame_size: super::DEFAULT_FRAME_SIZE,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            registration: None,
            only: None,
            cache: None,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PackStats {
    pub files: usize,
    pub bytes: u64,
    pub frames: usize,
    pub payload_bytes: u64,
    /// sha256 of the compressed manifest (in the header): names the payload.
    pub manifest_sha256: String,
    /// Digest of the tree (see [`super::digest`]).
    pub tree_digest: String,
    /// Units with data (see the module's description).
    #[serde(default)]
    pub units: usize,
    /// Units whose frames came from the [`FrameCache`].
    #[serde(default)]
    pub units_reused: usize,
    /// Uncompressed bytes that were compressed in this pack.
    #[serde(default)]
    pub bytes_compressed: u64,
    /// Cache entries found damaged (their unit was compressed again and the
    /// entry rewritten).
    #[serde(default)]
    pub cache_damaged: usize,
}

/// A run of a file's bytes in a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Piece {
    entry: usize,
    file_offset: u64,
    len: u64,
}

/// Frames compressed by one worker in a row: one frame of small files, or
/// every frame of one large file (so its whole-file hash is computed in order).
#[derive(Debug, PartialEq, Eq)]
struct Group {
    frames: Vec<Vec<Piece>>,
    large: Option<usize>,
}

/// Bytes of file data in an entry.
fn data_len(e: &Entry) -> u64 {
    match e {
        Entry::File { size, .. } => *size,
        _ => 0,
    }
}

/// Cuts the entries (in payload order, see [`order_store_paths`]; each store
/// path's entries in a row) into units, as ranges of entries.
fn units(entries: &[Entry], frame_size: u64) -> Vec<Range<usize>> {
    let mut spans: Vec<(Range<usize>, u64)> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        match spans.last_mut() {
            Some((r, bytes)) if e.path().contains('/') => {
                r.end = i + 1;
                *bytes += data_len(e);
            }
            _ => spans.push((i..i + 1, data_len(e))),
        }
    }
    let small = frame_size / 4;
    let mut out = Vec::new();
    let mut bucket: Option<(Range<usize>, u64)> = None;
    for (span, bytes) in spans {
        if bytes >= small {
            out.extend(bucket.take().map(|b| b.0));
            out.push(span);
            continue;
        }
        match &mut bucket {
            Some((r, b)) if *b + bytes <= frame_size => {
                r.end = span.end;
                *b += bytes;
            }
            _ => {
                out.extend(bucket.take().map(|b| b.0));
                bucket = Some((span.clone(), bytes));
            }
        }
        let name = store_name(entries[span.start].path());
        if Sha256::digest(name.as_bytes())[0] % BUCKET_CUT == 0 {
            out.extend(bucket.take().map(|b| b.0));
        }
    }
    out.extend(bucket.map(|b| b.0));
    out
}

/// Places every file's data in frames and records the place in its entry;
/// no frame crosses a unit. Returns the groups and each unit's range of them.
fn layout(
    entries: &mut [Entry],
    frame_size: u64,
    units: &[Range<usize>],
) -> (Vec<Group>, Vec<Range<usize>>) {
    let mut groups: Vec<Group> = Vec::new();
    let mut unit_groups = Vec::with_capacity(units.len());
    let mut cur: Vec<Piece> = Vec::new();
    let mut cur_len = 0u64;
    let mut next_frame = 0u32;
    let flush =
        |groups: &mut Vec<Group>, cur: &mut Vec<Piece>, cur_len: &mut u64, next: &mut u32| {
            if !cur.is_empty() {
                groups.push(Group {
                    frames: vec![std::mem::take(cur)],
                    large: None,
                });
                *next += 1;
                *cur_len = 0;
            }
        };
    for unit in units {
        let first_group = groups.len();
        for i in unit.clone() {
            let Entry::File {
                size,
                frame,
                offset,
                ..
            } = &mut entries[i]
            else {
                continue;
            };
            let size = *size;
            if size == 0 {
                (*frame, *offset) = (0, 0);
            } else if size > frame_size {
                flush(&mut groups, &mut cur, &mut cur_len, &mut next_frame);
                let k = size.div_ceil(frame_size);
                (*frame, *offset) = (next_frame, 0);
                groups.push(Group {
                    frames: (0..k)
                        .map(|c| {
                            vec![Piece {
                                entry: i,
                                file_offset: c * frame_size,
                                len: frame_size.min(size - c * frame_size),
                            }]
                        })
                        .collect(),
                    large: Some(i),
                });
                next_frame += k as u32;
            } else {
                if cur_len + size > frame_size {
                    flush(&mut groups, &mut cur, &mut cur_len, &mut next_frame);
                }
                (*frame, *offset) = (next_frame, cur_len);
                cur.push(Piece {
                    entry: i,
                    file_offset: 0,
                    len: size,
                });
                cur_len += size;
            }
        }
        flush(&mut groups, &mut cur, &mut cur_len, &mut next_frame);
        unit_groups.push(first_group..groups.len());
    }
    (groups, unit_groups)
}

/// What a worker made of one job.
struct Packed {
    job: usize,
    /// Compressed frames and their uncompressed sizes.
    frames: Vec<(Vec<u8>, u64)>,
    /// The frames' sha256, when they came from the cache (already checked).
    frame_sha256: Option<Vec<String>>,
    hashes: Vec<(usize, String)>,
    chunks: Vec<(usize, Vec<String>)>,
    /// Compressed in this pack (not loaded from the cache).
    fresh: bool,
    /// A cache entry was there but damaged.
    damaged: bool,
}

/// One piece of work, in payload order.
#[derive(Debug, Clone, Copy)]
enum Job {
    /// Compress this group.
    Group(usize),
    /// Load this unit from the cache (or compress it whole if the entry is damaged).
    Cached(usize),
}

/// Everything about the units that workers and the writer share.
struct Plan<'a> {
    src: &'a Path,
    entries: &'a [Entry],
    groups: &'a [Group],
    units: &'a [Range<usize>],
    unit_groups: &'a [Range<usize>],
    /// Each unit's cache entry, when caching.
    unit_files: Vec<Option<PathBuf>>,
    /// sha256 of every non-empty file, when the names do not stand for content.
    known: Option<HashMap<usize, String>>,
    jobs: Vec<Job>,
    job_unit: Vec<usize>,
    frame_size: u64,
}

/// Packs the tree under `src` into the payload file `out` (written beside
/// and renamed into place). With `opts.cache`, units found there are not
/// compressed again, and new units are added to it; the payload is the same,
/// byte for byte, either way.
pub fn pack(src: &Path, out: &Path, opts: &PackOptions, counters: &Counters) -> Result<PackStats> {
    if opts.frame_size == 0 || opts.frame_size > MAX_FRAME_SIZE {
        bail!(
            "frame size {} is out of range (1..={MAX_FRAME_SIZE})",
            opts.frame_size
        );
    }
    let mut entries = order_store_paths(
        tree::walk(src, opts.only.as_deref())?
            .into_iter()
            .map(|(e, _)| e)
            .collect(),
    );
    if entries.is_empty() {
        bail!("{} is empty: there is no store to pack", src.display());
    }
    let units = units(&entries, opts.frame_size.into());
    let (groups, unit_groups) = layout(&mut entries, opts.frame_size.into(), &units);
    // Empty files have no data in any frame.
    for e in &mut entries {
        if let Entry::File {
            size: 0, sha256, ..
        } = e
        {
            *sha256 = hex::encode(Sha256::digest(b""));
            counters.files.fetch_add(1, Ordering::Relaxed);
        }
    }
    let plan = plan(src, &entries, &groups, &units, &unit_groups, opts)?;
    let frames_tmp = sibling(out, "frames.tmp");
    let result = write_frames(&plan, opts, counters, &frames_tmp);
    let (frames, hashes, mut stats) = match result {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_file(&frames_tmp);
            return Err(e);
        }
    };
    for (i, h) in hashes.files {
        if let Entry::File { sha256, .. } = &mut entries[i] {
            *sha256 = h;
        }
    }
    for (i, c) in hashes.chunks {
        if let Entry::File { chunks, .. } = &mut entries[i] {
            *chunks = c;
        }
    }
    let manifest = Manifest {
        version: FORMAT_VERSION,
        frame_size: opts.frame_size,
        frames,
        entries,
        registration: opts.registration.clone(),
    };
    let finished = finish(out, &manifest, &frames_tmp);
    let _ = std::fs::remove_file(&frames_tmp);
    let (header, payload_bytes) = finished?;
    stats.files = manifest.files();
    stats.bytes = manifest.bytes();
    stats.frames = manifest.frames.len();
    stats.payload_bytes = payload_bytes;
    stats.manifest_sha256 = hex::encode(header.manifest_sha256);
    stats.tree_digest = super::digest(&manifest.entries);
    Ok(stats)
}

/// Decides which units come from the cache and lists the jobs.
fn plan<'a>(
    src: &'a Path,
    entries: &'a [Entry],
    groups: &'a [Group],
    units: &'a [Range<usize>],
    unit_groups: &'a [Range<usize>],
    opts: &PackOptions,
) -> Result<Plan<'a>> {
    let mut known = None;
    let mut unit_files = vec![None; units.len()];
    if let Some(cache) = &opts.cache {
        std::fs::create_dir_all(&cache.dir)
            .with_context(|| format!("cannot create {}", cache.dir.display()))?;
        if !cache.names_are_content {
            let files: Vec<(usize, &str)> = entries
                .iter()
                .enumerate()
                .filter(|(_, e)| data_len(e) > 0)
                .map(|(i, e)| (i, e.path()))
                .collect();
            let hashed = tree::hash_files(src, &files, opts.threads)?;
            known = Some(hashed.into_iter().collect::<HashMap<_, _>>());
        }
        for (u, unit) in units.iter().enumerate() {
            if unit_groups[u].is_empty() {
                continue;
            }
            let key = unit_key(&entries[unit.clone()], unit.start, opts, known.as_ref());
            unit_files[u] = Some(cache.dir.join(format!("{key}.nfu")));
        }
    }
    let mut jobs = Vec::new();
    let mut job_unit = Vec::new();
    for (u, gs) in unit_groups.iter().enumerate() {
        if gs.is_empty() {
            continue;
        }
        if unit_files[u].as_ref().is_some_and(|f| f.is_file()) {
            jobs.push(Job::Cached(u));
            job_unit.push(u);
        } else {
            for g in gs.clone() {
                jobs.push(Job::Group(g));
                job_unit.push(u);
            }
        }
    }
    Ok(Plan {
        src,
        entries,
        groups,
        units,
        unit_groups,
        unit_files,
        known,
        jobs,
        job_unit,
        frame_size: opts.frame_size.into(),
    })
}

/// The cache key of the unit whose entries (from index `first`) are
/// `entries`: the sha256 of everything its frames are made from.
fn unit_key(
    entries: &[Entry],
    first: usize,
    opts: &PackOptions,
    known: Option<&HashMap<usize, String>>,
) -> String {
    let mut h = Sha256::new();
    let mut part = |p: &[u8]| {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    };
    part(b"nodeflash payload unit");
    part(&LAYOUT_VERSION.to_le_bytes());
    part(&FORMAT_VERSION.to_le_bytes());
    part(&zstd::zstd_safe::version_number().to_le_bytes());
    part(&opts.level.to_le_bytes());
    part(&opts.frame_size.to_le_bytes());
    for (k, e) in entries.iter().enumerate() {
        if data_len(e) == 0 {
            continue;
        }
        part(e.path().as_bytes());
        part(&data_len(e).to_le_bytes());
        if let Some(h) = known.and_then(|k2| k2.get(&(first + k))) {
            part(h.as_bytes());
        }
    }
    hex::encode(h.finalize())
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{suffix}"));
    path.with_file_name(name)
}

#[derive(Default)]
struct Hashes {
    files: Vec<(usize, String)>,
    chunks: Vec<(usize, Vec<String>)>,
}

/// A cache entry: the unit's frames back to back, then this as JSON, then
/// the JSON's length (8 bytes, little-endian).
#[derive(Debug, Serialize, Deserialize)]
struct CachedUnit {
    /// Every non-empty file of the unit, in payload order.
    files: Vec<CachedFile>,
    frames: Vec<Frame>,
}

#[derive(Debug, Serialize, Deserialize)]
struct CachedFile {
    path: String,
    size: u64,
    sha256: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    chunks: Vec<String>,
}

/// A cache entry being written by the writer.
struct Storing {
    unit: usize,
    tmp: PathBuf,
    out: BufWriter<File>,
    frames: Vec<Frame>,
    hashes: Hashes,
}

/// Compresses (or loads) the jobs on worker threads and writes their frames in order.
fn write_frames(
    plan: &Plan,
    opts: &PackOptions,
    counters: &Counters,
    tmp: &Path,
) -> Result<(Vec<Frame>, Hashes, PackStats)> {
    let file = File::create(tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let (tx, rx) = std::sync::mpsc::channel::<Result<Packed>>();
    let mut frames = Vec::new();
    let mut hashes = Hashes::default();
    let mut stats = PackStats {
        files: 0,
        bytes: 0,
        frames: 0,
        payload_bytes: 0,
        manifest_sha256: String::new(),
        tree_digest: String::new(),
        units: plan.unit_groups.iter().filter(|g| !g.is_empty()).count(),
        units_reused: 0,
        bytes_compressed: 0,
        cache_damaged: 0,
    };
    let mut storing: Option<Storing> = None;
    let result = std::thread::scope(|s| -> Result<()> {
        // However the writer below leaves (an error, a panic), the other
        // threads stop: `read_ahead` sees `stop`, and a worker's send fails
        // once `rx` is dropped with this closure.
        let _stop = StopOnDrop(&stop);
        let rx = rx;
        s.spawn(|| read_ahead(plan, &next, &stop));
        for _ in 0..opts.threads.max(1) {
            let tx = tx.clone();
            let (next, stop) = (&next, &stop);
            s.spawn(move || {
                let mut z = match Compressors::new(opts.level, opts.frame_size) {
                    Ok(z) => z,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                while !stop.load(Ordering::Relaxed) {
                    let j = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&job) = plan.jobs.get(j) else { break };
                    let r = run_job(plan, j, job, &mut z, counters);
                    let failed = r.is_err();
                    if tx.send(r).is_err() || failed {
                        break;
                    }
                }
            });
        }
        drop(tx);
        let mut pending: BTreeMap<usize, Packed> = BTreeMap::new();
        let mut written = 0;
        for r in rx.iter() {
            let p = match r {
                Ok(p) => p,
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            };
            pending.insert(p.job, p);
            while let Some(p) = pending.remove(&written) {
                let u = plan.job_unit[written];
                if p.damaged {
                    stats.cache_damaged += 1;
                }
                if p.fresh {
                    stats.bytes_compressed += p.frames.iter().map(|f| f.1).sum::<u64>();
                } else {
                    stats.units_reused += 1;
                }
                if p.fresh && storing.is_none() {
                    if let Some(path) = &plan.unit_files[u] {
                        storing = Some(start_entry(u, path)?);
                    }
                }
                for (k, (data, size)) in p.frames.iter().enumerate() {
                    w.write_all(data)
                        .with_context(|| format!("cannot write {}", tmp.display()))?;
                    counters
                        .payload_bytes
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    let sha256 = match p.frame_sha256.as_ref().and_then(|v| v.get(k)) {
                        Some(h) => h.clone(),
                        None => hex::encode(Sha256::digest(data)),
                    };
                    let frame = Frame {
                        len: data.len() as u64,
                        size: *size,
                        sha256,
                    };
                    if let Some(st) = storing.as_mut() {
                        st.out
                            .write_all(data)
                            .with_context(|| format!("cannot write {}", st.tmp.display()))?;
                        st.frames.push(frame.clone());
                    }
                    frames.push(frame);
                }
                if let Some(st) = storing.as_mut() {
                    st.hashes.files.extend(p.hashes.iter().cloned());
                    st.hashes.chunks.extend(p.chunks.iter().cloned());
                }
                hashes.files.extend(p.hashes);
                hashes.chunks.extend(p.chunks);
                written += 1;
                let unit_done = plan.job_unit.get(written) != Some(&u);
                if unit_done {
                    if let Some(st) = storing.take() {
                        finish_entry(plan, st)?;
                    }
                }
            }
        }
        if written != plan.jobs.len() {
            bail!("a compression thread stopped early");
        }
        Ok(())
    });
    if let Some(st) = storing {
        let _ = std::fs::remove_file(&st.tmp);
    }
    result?;
    w.flush()
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    Ok((frames, hashes, stats))
}

/// Sets its flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// How many jobs the read-ahead thread may be ahead of the compressors.
const READ_AHEAD_JOBS: usize = 8;

/// Reads the files of the next jobs (or their cache entries) once, in job
/// order, at most [`READ_AHEAD_JOBS`] ahead of the compressors, so that
/// they find them in the page cache instead of waiting for the disk between
/// two frames, as mksquashfs's reader thread does for its compressors.
/// Errors are left to the workers, which read everything again.
fn read_ahead(plan: &Plan, next: &AtomicUsize, stop: &AtomicBool) {
    let mut buf = vec![0u8; 1 << 20];
    let mut read_all = |path: &Path| {
        if let Ok(mut f) = File::open(path) {
            while matches!(f.read(&mut buf), Ok(n) if n > 0) {}
        }
    };
    for (j, job) in plan.jobs.iter().enumerate() {
        while j >= next.load(Ordering::Relaxed) + READ_AHEAD_JOBS {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        if stop.load(Ordering::Relaxed) {
            return;
        }
        // Behind the compressors: they have read it themselves.
        if j < next.load(Ordering::Relaxed) {
            continue;
        }
        match *job {
            Job::Group(g) => {
                let mut last = None;
                for piece in plan.groups[g].frames.iter().flatten() {
                    if last != Some(piece.entry) {
                        last = Some(piece.entry);
                        read_all(&plan.src.join(plan.entries[piece.entry].path()));
                    }
                }
            }
            Job::Cached(u) => {
                if let Some(path) = &plan.unit_files[u] {
                    read_all(path);
                }
            }
        }
    }
}

fn start_entry(unit: usize, path: &Path) -> Result<Storing> {
    let tmp = sibling(path, &format!("{}.tmp", std::process::id()));
    let f = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    Ok(Storing {
        unit,
        tmp,
        out: BufWriter::with_capacity(1 << 20, f),
        frames: Vec::new(),
        hashes: Hashes::default(),
    })
}

/// Writes the entry's trailer and moves it into place.
fn finish_entry(plan: &Plan, mut st: Storing) -> Result<()> {
    let Some(dest) = plan.unit_files[st.unit].as_ref() else {
        bail!("internal error: unit {} has no cache entry", st.unit);
    };
    let sums: HashMap<usize, String> = st.hashes.files.drain(..).collect();
    let chunks: HashMap<usize, Vec<String>> = st.hashes.chunks.drain(..).collect();
    let mut files = Vec::new();
    for i in plan.units[st.unit].clone() {
        let e = &plan.entries[i];
        if data_len(e) == 0 {
            continue;
        }
        files.push(CachedFile {
            path: e.path().to_string(),
            size: data_len(e),
            sha256: sums.get(&i).cloned().unwrap_or_default(),
            chunks: chunks.get(&i).cloned().unwrap_or_default(),
        });
    }
    let json = serde_json::to_vec(&CachedUnit {
        files,
        frames: std::mem::take(&mut st.frames),
    })
    .context("cannot serialize a frame cache entry")?;
    let written = st
        .out
        .write_all(&json)
        .and_then(|()| st.out.write_all(&(json.len() as u64).to_le_bytes()))
        .and_then(|()| st.out.flush())
        .with_context(|| format!("cannot write {}", st.tmp.display()))
        .and_then(|()| {
            std::fs::rename(&st.tmp, dest)
                .with_context(|| format!("cannot move {} to {}", st.tmp.display(), dest.display()))
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&st.tmp);
    }
    written
}

fn run_job(
    plan: &Plan,
    j: usize,
    job: Job,
    z: &mut Compressors,
    counters: &Counters,
) -> Result<Packed> {
    match job {
        Job::Group(g) => {
            let mut p = pack_group(plan.src, plan.entries, &plan.groups[g], z, counters)?;
            p.job = j;
            Ok(p)
        }
        Job::Cached(u) => {
            let Some(path) = plan.unit_files[u].as_ref() else {
                bail!("internal error: unit {u} has no cache entry");
            };
            match load_entry(plan, u, path) {
                Ok(mut p) => {
                    // The entry's modification time is its last use, for
                    // the size bound; a file that cannot be touched is only
                    // evicted sooner.
                    let _ =
                        File::open(path).and_then(|f| f.set_modified(std::time::SystemTime::now()));
                    p.job = j;
                    let unit = &plan.units[u];
                    let entries = &plan.entries[unit.clone()];
                    counters
                        .bytes
                        .fetch_add(entries.iter().map(data_len).sum::<u64>(), Ordering::Relaxed);
                    counters.files.fetch_add(
                        entries.iter().filter(|e| data_len(e) > 0).count() as u64,
                        Ordering::Relaxed,
                    );
                    Ok(p)
                }
                Err(_) => {
                    // Damaged: compress the unit again; the writer replaces the entry.
                    let mut whole = Packed {
                        job: j,
                        frames: Vec::new(),
                        frame_sha256: None,
                        hashes: Vec::new(),
                        chunks: Vec::new(),
                        fresh: true,
                        damaged: true,
                    };
                    for g in plan.unit_groups[u].clone() {
                        let p = pack_group(plan.src, plan.entries, &plan.groups[g], z, counters)?;
                        whole.frames.extend(p.frames);
                        whole.hashes.extend(p.hashes);
                        whole.chunks.extend(p.chunks);
                    }
                    Ok(whole)
                }
            }
        }
    }
}

/// Reads unit `u`'s cache entry and checks it against the unit: the same
/// files with the same sizes (and hashes, when known), the same frame sizes,
/// every frame's sha256. Any difference is an error (the entry is damaged).
fn load_entry(plan: &Plan, u: usize, path: &Path) -> Result<Packed> {
    use std::io::SeekFrom;
    let read_err = || format!("cannot read {}", path.display());
    let damaged = || format!("frame cache entry {} is damaged", path.display());
    let mut f = File::open(path).with_context(read_err)?;
    let n = f.metadata().with_context(read_err)?.len();
    // The trailer first; each frame is then read into its own buffer, so the
    // unit is in memory once.
    let mut len = [0u8; 8];
    f.seek(SeekFrom::Start(n.checked_sub(8).with_context(damaged)?))
        .and_then(|_| f.read_exact(&mut len))
        .with_context(read_err)?;
    let json_len = u64::from_le_bytes(len);
    let json_start = (n - 8).checked_sub(json_len).with_context(damaged)?;
    let mut json = vec![0u8; usize::try_from(json_len).with_context(damaged)?];
    f.seek(SeekFrom::Start(json_start))
        .and_then(|_| f.read_exact(&mut json))
        .with_context(read_err)?;
    let cached: CachedUnit = serde_json::from_slice(&json).with_context(damaged)?;
    drop(json);
    let unit = plan.units[u].clone();
    let files: Vec<usize> = unit.filter(|&i| data_len(&plan.entries[i]) > 0).collect();
    if files.len() != cached.files.len() {
        bail!("{}", damaged());
    }
    let mut hashes = Vec::new();
    let mut chunks = Vec::new();
    for (&i, c) in files.iter().zip(&cached.files) {
        let e = &plan.entries[i];
        if c.path != e.path()
            || c.size != data_len(e)
            || c.sha256.len() != 64
            || c.chunks.len() as u64
                != if c.size > plan.frame_size {
                    c.size.div_ceil(plan.frame_size)
                } else {
                    0
                }
            || c.chunks.iter().any(|h| h.len() != 64)
            || plan
                .known
                .as_ref()
                .is_some_and(|k| k.get(&i) != Some(&c.sha256))
        {
            bail!("{}", damaged());
        }
        hashes.push((i, c.sha256.clone()));
        if !c.chunks.is_empty() {
            chunks.push((i, c.chunks.clone()));
        }
    }
    let want: Vec<u64> = plan.unit_groups[u]
        .clone()
        .flat_map(|g| plan.groups[g].frames.iter())
        .map(|pieces| pieces.iter().map(|p| p.len).sum())
        .collect();
    if want.len() != cached.frames.len()
        || want.iter().zip(&cached.frames).any(|(w, f)| *w != f.size)
    {
        bail!("{}", damaged());
    }
    let mut frames = Vec::with_capacity(want.len());
    let mut sums = Vec::with_capacity(want.len());
    let mut at = 0u64;
    f.seek(SeekFrom::Start(0)).with_context(read_err)?;
    for fr in &cached.frames {
        let end = at
            .checked_add(fr.len)
            .filter(|&e| e <= json_start)
            .with_context(damaged)?;
        let mut data = vec![0u8; usize::try_from(fr.len).with_context(damaged)?];
        f.read_exact(&mut data).with_context(read_err)?;
        if hex::encode(Sha256::digest(&data)) != fr.sha256 {
            bail!("{}", damaged());
        }
        frames.push((data, fr.size));
        sums.push(fr.sha256.clone());
        at = end;
    }
    if at != json_start {
        bail!("{}", damaged());
    }
    Ok(Packed {
        job: 0,
        frames,
        frame_sha256: Some(sums),
        hashes,
        chunks,
        fresh: false,
        damaged: false,
    })
}

fn compressor(level: i32) -> Result<zstd::bulk::Compressor<'static>> {
    let mut z = zstd::bulk::Compressor::new(level).context("cannot set up zstd")?;
    z.include_checksum(true).context("cannot set up zstd")?;
    z.include_contentsize(true).context("cannot set up zstd")?;
    Ok(z)
}

/// A worker's compressors: the payload's level, and level 1 to find the
/// frames that do not compress.
struct Compressors {
    level: i32,
    at_level: zstd::bulk::Compressor<'static>,
    fast: zstd::bulk::Compressor<'static>,
}

impl Compressors {
    /// `frame_size` in bytes: level 1's window covers it, with
    /// long-distance matching (`zstd --long`), as level 17's does, so data
    /// that repeats itself far apart in a frame counts as compressible.
    fn new(level: i32, frame_size: u32) -> Result<Self> {
        let mut fast = compressor(1)?;
        let window = frame_size.max(1 << 10).next_power_of_two().trailing_zeros();
        fast.set_parameter(zstd::zstd_safe::CParameter::WindowLog(window))
            .context("cannot set up zstd")?;
        fast.set_parameter(zstd::zstd_safe::CParameter::EnableLongDistanceMatching(
            true,
        ))
        .context("cannot set up zstd")?;
        Ok(Compressors {
            level,
            at_level: compressor(level)?,
            fast,
        })
    }

    /// `data` as one zstd frame (with checksum and content size). Level 1
    /// first: when that saves less than [`INCOMPRESSIBLE_PERCENT`] of
    /// `data`, its frame is kept; otherwise `data` is compressed again at
    /// the payload's level. Returns the frame.
    fn frame(&mut self, data: &[u8]) -> std::io::Result<Vec<u8>> {
        if self.level > 1 {
            let fast = self.fast.compress(data)?;
            if fast.len() * 100 > data.len() * (100 - INCOMPRESSIBLE_PERCENT) {
                return Ok(fast);
            }
        }
        self.at_level.compress(data)
    }
}

fn pack_group(
    src: &Path,
    entries: &[Entry],
    group: &Group,
    z: &mut Compressors,
    counters: &Counters,
) -> Result<Packed> {
    let mut packed = Packed {
        job: 0,
        frames: Vec::with_capacity(group.frames.len()),
        frame_sha256: None,
        hashes: Vec::new(),
        chunks: Vec::new(),
        fresh: true,
        damaged: false,
    };
    let mut large_chunks = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    // A large file is read in order across its frames.
    let mut large: Option<(File, Sha256, PathBuf)> = None;
    for pieces in &group.frames {
        buf.clear();
        for piece in pieces {
            let e = &entries[piece.entry];
            let path = src.join(e.path());
            let start = buf.len();
            buf.resize(start + piece.len as usize, 0);
            if group.large.is_some() {
                if large.is_none() {
                    let f = File::open(&path)
                        .with_context(|| format!("cannot open {}", path.display()))?;
                    large = Some((f, Sha256::new(), path.clone()));
                }
                let Some((f, whole, _)) = large.as_mut() else {
                    bail!("internal error: no open file for {}", path.display());
                };
                f.read_exact(&mut buf[start..]).with_context(|| {
                    format!(
                        "cannot read {} (did it change while packing?)",
                        path.display()
                    )
                })?;
                whole.update(&buf[start..]);
                large_chunks.push(hex::encode(Sha256::digest(&buf[start..])));
            } else {
                let mut f =
                    File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
                f.read_exact(&mut buf[start..]).with_context(|| {
                    format!(
                        "cannot read {} (did it change while packing?)",
                        path.display()
                    )
                })?;
                packed
                    .hashes
                    .push((piece.entry, hex::encode(Sha256::digest(&buf[start..]))));
                counters.files.fetch_add(1, Ordering::Relaxed);
            }
            counters.bytes.fetch_add(piece.len, Ordering::Relaxed);
        }
        let data = z.frame(&buf).with_context(|| {
            format!(
                "cannot compress frame {} of the payload",
                packed.frames.len()
            )
        })?;
        packed.frames.push((data, buf.len() as u64));
    }
    if let (Some(i), Some((mut f, whole, path))) = (group.large, large) {
        let pos = f
            .stream_position()
            .with_context(|| format!("cannot read {}", path.display()))?;
        let len = f
            .metadata()
            .with_context(|| format!("cannot stat {}", path.display()))?
            .len();
        if pos != len {
            bail!("{} changed while packing", path.display());
        }
        packed.hashes.push((i, hex::encode(whole.finalize())));
        packed.chunks.push((i, large_chunks));
        counters.files.fetch_add(1, Ordering::Relaxed);
    }
    Ok(packed)
}

/// Writes header, manifest and frames to `out` (through a temporary file).
fn finish(out: &Path, manifest: &Manifest, frames_tmp: &Path) -> Result<(Header, u64)> {
    let json = serde_json::to_vec(manifest).context("cannot serialize the payload manifest")?;
    let mut z = compressor(19)?;
    let compressed = z
        .compress(&json)
        .context("cannot compress the payload manifest")?;
    let frames_len = std::fs::metadata(frames_tmp)
        .with_context(|| format!("cannot stat {}", frames_tmp.display()))?
        .len();
    let header = Header {
        version: FORMAT_VERSION,
        frame_size: manifest.frame_size,
        manifest_len: compressed.len() as u64,
        manifest_sha256: Sha256::digest(&compressed).into(),
        frames_len,
    };
    let tmp = sibling(out, "tmp");
    let write = || -> Result<()> {
        let mut f =
            File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(&header.to_bytes())
            .and_then(|()| f.write_all(&compressed))
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        let mut frames = File::open(frames_tmp)
            .with_context(|| format!("cannot open {}", frames_tmp.display()))?;
        std::io::copy(&mut frames, &mut f)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, out)
            .with_context(|| format!("cannot move {} to {}", tmp.display(), out.display()))
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok((header.clone(), header.total_len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_that_does_not_compress_is_kept_at_level_1() {
        // Already compressed data stands in as pseudo-random bytes (xorshift).
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..1 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let size = crate::payload::DEFAULT_FRAME_SIZE;
        let mut z = Compressors::new(crate::payload::DEFAULT_LEVEL, size).expect("compressors");
        let frame = z.frame(&noise).expect("frame");
        assert!(frame == z.fast.compress(&noise).expect("level 1"));
        assert!(frame.len() > noise.len() * 97 / 100);
        // The same noise twice, 1 MiB apart (beyond plain level 1's window
        // for a frame this size): it compresses, so level 17 writes it.
        let twice = [noise.as_slice(), &noise].concat();
        let frame = z.frame(&twice).expect("frame");
        assert!(
            frame.len() < noise.len() + noise.len() / 50,
            "{}",
            frame.len()
        );
        assert!(zstd::bulk::decompress(&frame, twice.len()).expect("decompress") == twice);
        // Text compresses: the payload's level, smaller than level 1's.
        let words = [
            "store", "path", "nix", "zfs", "pool", "dataset", "boot", "frame",
        ];
        let text: Vec<u8> = (0..200_000usize)
            .flat_map(|i| format!("{} {}\n", words[i % 8], words[i * 7 % 5]).into_bytes())
            .collect();
        let level1 = compressor(1)
            .expect("zstd")
            .compress(&text)
            .expect("level 1");
        let frame = z.frame(&text).expect("frame");
        assert!(
            frame.len() < level1.len(),
            "{} vs {}",
            frame.len(),
            level1.len()
        );
        assert!(zstd::bulk::decompress(&frame, text.len()).expect("decompress") == text);
        // At level 1 itself: one pass, plain level 1.
        let mut one = Compressors::new(1, size).expect("compressors");
        assert!(one.frame(&text).expect("frame") == level1);
    }

    fn file(path: &str, size: u64) -> Entry {
        Entry::File {
            path: path.into(),
            mode: 0o444,
            size,
            sha256: String::new(),
            frame: 99,
            offset: 99,
            chunks: Vec::new(),
        }
    }

    fn place(e: &Entry) -> (u32, u64) {
        match e {
            Entry::File { frame, offset, .. } => (*frame, *offset),
            _ => (0, 0),
        }
    }

    /// Store paths `name` with one file of `size` bytes each.
    fn store(paths: &[(String, u64)]) -> Vec<Entry> {
        let mut v = Vec::new();
        for (name, size) in paths {
            v.push(Entry::Dir {
                path: name.clone(),
                mode: 0o555,
            });
            v.push(file(&format!("{name}/f"), *size));
        }
        v
    }

    /// The store path names of each unit.
    fn unit_names(entries: &[Entry], frame_size: u64) -> Vec<Vec<String>> {
        units(entries, frame_size)
            .into_iter()
            .map(|r| {
                entries[r]
                    .iter()
                    .filter(|e| !e.path().contains('/'))
                    .map(|e| e.path().to_string())
                    .collect()
            })
            .collect()
    }

    #[test]
    fn small_paths_share_buckets_whose_ends_follow_the_names() {
        let name = |i: u32| format!("{}-p{i}", hex::encode(Sha256::digest(i.to_le_bytes())));
        let mut paths: Vec<(String, u64)> = (0..300).map(|i| (name(i), 10)).collect();
        // Two large paths are units of their own.
        paths.push((name(1000), 250));
        paths.push((name(1001), 1000));
        paths.sort();
        let before = unit_names(&store(&paths), 1000);
        assert!(before.contains(&vec![name(1000)]) && before.contains(&vec![name(1001)]));
        let buckets = before.len() - 2;
        // About one small path in BUCKET_CUT ends a bucket.
        assert!((20..=60).contains(&buckets), "{buckets} buckets");
        // Every small path is in exactly one unit, in order.
        let flat: Vec<String> = before.iter().flatten().cloned().collect();
        let mut sorted = flat.clone();
        sorted.sort();
        assert_eq!(flat, sorted);
        assert_eq!(flat.len(), 302);
        // One small path more changes one bucket (its own), no other.
        paths.push((name(5000), 10));
        paths.sort();
        let after = unit_names(&store(&paths), 1000);
        let changed = after.iter().filter(|u| !before.contains(u)).count();
        assert_eq!(changed, 1, "{changed} units differ");
        // A bucket holds at most one frame size of data.
        let big: Vec<(String, u64)> = (0..40).map(|i| (name(i), 200)).collect();
        let mut big = big;
        big.sort();
        for u in unit_names(&store(&big), 1000) {
            assert!(u.len() * 200 <= 1000, "{u:?}");
        }
    }

    /// A Nix-like store path name: a 32-character base-32 hash from `seed`, then `name`.
    fn nix_name(seed: u32, name: &str) -> String {
        let hash: String = Sha256::digest(seed.to_le_bytes())
            .iter()
            .take(32)
            .map(|b| char::from(NIX32[usize::from(b % 32)]))
            .collect();
        format!("{hash}-{name}")
    }

    #[test]
    fn store_paths_are_ordered_by_name_without_the_hash() {
        assert_eq!(store_name(&nix_name(1, "etc")), "etc");
        assert_eq!(store_name("not-a-store-path"), "not-a-store-path");
        // 32 characters but not Nix's alphabet ('e' is not in it).
        assert_eq!(
            store_name("eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-x"),
            "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-x"
        );
        let a = "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-a";
        let b = "00000000000000000000000000000000-b";
        let b2 = "11111111111111111111111111111111-b";
        let entries = store(&[(b2.into(), 1), (b.into(), 2), (a.into(), 3)]);
        let mut walked = entries.clone();
        walked.sort_by(|x, y| x.path().cmp(y.path()));
        let ordered = order_store_paths(walked);
        let paths: Vec<&str> = ordered.iter().map(Entry::path).collect();
        let want = [
            a.to_string(),
            format!("{a}/f"),
            b.to_string(),
            format!("{b}/f"),
            b2.to_string(),
            format!("{b2}/f"),
        ];
        assert_eq!(paths, want);
        // The tree's digest does not depend on the order.
        assert_eq!(
            super::super::digest(&ordered),
            super::super::digest(&entries)
        );
    }

    #[test]
    fn a_rebuilt_small_path_changes_only_its_own_bucket() {
        let names: Vec<String> = (0..300).map(|i| format!("p{i}")).collect();
        let paths = |renamed: Option<usize>| -> Vec<Entry> {
            let mut walked = store(
                &names
                    .iter()
                    .enumerate()
                    .map(|(i, n)| {
                        let seed = if renamed == Some(i) { 10_000 + i } else { i };
                        (nix_name(seed as u32, n), 10)
                    })
                    .collect::<Vec<_>>(),
            );
            // The walk's order: by the whole name.
            let mut spans: Vec<Vec<Entry>> = walked.chunks(2).map(<[Entry]>::to_vec).collect();
            spans.sort_by(|a, b| a[0].path().cmp(b[0].path()));
            walked = spans.concat();
            order_store_paths(walked)
        };
        let before = unit_names(&paths(None), 1000);
        assert!(before.len() > 20, "{} units", before.len());
        for renamed in (0..300).step_by(23) {
            let after = unit_names(&paths(Some(renamed)), 1000);
            assert_eq!(after.len(), before.len(), "renaming p{renamed}");
            let changed = after.iter().filter(|u| !before.contains(u)).count();
            assert_eq!(changed, 1, "renaming p{renamed}: {changed} units differ");
        }
    }

    #[test]
    fn small_files_share_frames_and_large_files_get_their_own() {
        let mut entries = vec![
            Entry::Dir {
                path: "a".into(),
                mode: 0o555,
            },
            file("a/1", 6),
            file("a/2", 4),
            file("a/empty", 0),
            file("a/3", 3),
            file("a/big", 25),
            file("a/4", 10),
        ];
        let one_unit = std::iter::once(0..entries.len()).collect::<Vec<_>>();
        let (groups, _) = layout(&mut entries, 10, &one_unit);
        let places: Vec<(u32, u64)> = entries[1..].iter().map(place).collect();
        // 1 and 2 fill frame 0; 3 starts frame 1; big takes frames 2..5; 4 is frame 5.
        assert_eq!(places, [(0, 0), (0, 6), (0, 0), (1, 0), (2, 0), (5, 0)]);
        assert_eq!(groups.len(), 4);
        assert_eq!(groups[2].large, Some(5));
        let lens: Vec<u64> = groups[2].frames.iter().map(|f| f[0].len).collect();
        assert_eq!(lens, [10, 10, 5]);
        assert_eq!(groups[2].frames[2][0].file_offset, 20);
        assert_eq!(
            groups[3].frames,
            vec![vec![Piece {
                entry: 6,
                file_offset: 0,
                len: 10
            }]]
        );
    }
}

//! Packing a store tree into a payload file.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use super::{tree, Counters, Entry, Frame, Header, Manifest, FORMAT_VERSION, MAX_FRAME_SIZE};

#[derive(Debug, Clone)]
pub struct PackOptions {
    /// zstd level of every frame (19, as the NixOS ISO's squashfs).
    pub level: i32,
    /// Uncompressed bytes per frame.
    pub frame_size: u32,
    /// Compression threads.
    pub threads: usize,
    /// Nix's registration of the closure, carried for `nix-store --load-db`.
    pub registration: Option<String>,
    /// Pack only these entries of the source directory (a closure's store paths).
    pub only: Option<Vec<String>>,
}

impl Default for PackOptions {
    fn default() -> Self {
        Self {
            level: 19,
            frame_size: super::DEFAULT_FRAME_SIZE,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            registration: None,
            only: None,
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

/// Places every file's data in frames and records the place in its entry.
fn layout(entries: &mut [Entry], frame_size: u64) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
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
    for (i, e) in entries.iter_mut().enumerate() {
        let Entry::File {
            size,
            frame,
            offset,
            ..
        } = e
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
    groups
}

/// What a worker made of one group.
struct Packed {
    group: usize,
    frames: Vec<(Vec<u8>, u64)>,
    hashes: Vec<(usize, String)>,
    chunks: Vec<String>,
}

/// Packs the tree under `src` into the payload file `out` (written beside
/// and renamed into place).
pub fn pack(src: &Path, out: &Path, opts: &PackOptions, counters: &Counters) -> Result<PackStats> {
    if opts.frame_size == 0 || opts.frame_size > MAX_FRAME_SIZE {
        bail!(
            "frame size {} is out of range (1..={MAX_FRAME_SIZE})",
            opts.frame_size
        );
    }
    let mut entries: Vec<Entry> = tree::walk(src, opts.only.as_deref())?
        .into_iter()
        .map(|(e, _)| e)
        .collect();
    if entries.is_empty() {
        bail!("{} is empty: there is no store to pack", src.display());
    }
    let groups = layout(&mut entries, opts.frame_size.into());
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
    let frames_tmp = sibling(out, "frames.tmp");
    let result = write_frames(src, &entries, &groups, opts, counters, &frames_tmp);
    let frames = match result {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_file(&frames_tmp);
            return Err(e);
        }
    };
    let (frames, hashes) = frames;
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
    Ok(PackStats {
        files: manifest.files(),
        bytes: manifest.bytes(),
        frames: manifest.frames.len(),
        payload_bytes,
        manifest_sha256: hex::encode(header.manifest_sha256),
        tree_digest: super::digest(&manifest.entries),
    })
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

/// Compresses the groups on worker threads and writes their frames in order.
fn write_frames(
    src: &Path,
    entries: &[Entry],
    groups: &[Group],
    opts: &PackOptions,
    counters: &Counters,
    tmp: &Path,
) -> Result<(Vec<Frame>, Hashes)> {
    let file = File::create(tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let (tx, rx) = std::sync::mpsc::channel::<Result<Packed>>();
    let mut frames = Vec::new();
    let mut hashes = Hashes::default();
    std::thread::scope(|s| -> Result<()> {
        for _ in 0..opts.threads.max(1) {
            let tx = tx.clone();
            let (next, stop) = (&next, &stop);
            s.spawn(move || {
                let mut z = match compressor(opts.level) {
                    Ok(z) => z,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                while !stop.load(Ordering::Relaxed) {
                    let g = next.fetch_add(1, Ordering::Relaxed);
                    let Some(group) = groups.get(g) else { break };
                    let r = pack_group(src, entries, g, group, &mut z, counters);
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
            pending.insert(p.group, p);
            while let Some(p) = pending.remove(&written) {
                for (data, size) in &p.frames {
                    w.write_all(data)
                        .with_context(|| format!("cannot write {}", tmp.display()))?;
                    counters
                        .payload_bytes
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    frames.push(Frame {
                        len: data.len() as u64,
                        size: *size,
                        sha256: hex::encode(Sha256::digest(data)),
                    });
                }
                hashes.files.extend(p.hashes);
                if let Some(i) = groups[written].large {
                    hashes.chunks.push((i, p.chunks));
                }
                written += 1;
            }
        }
        if written != groups.len() {
            bail!("a compression thread stopped early");
        }
        Ok(())
    })?;
    w.flush()
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    Ok((frames, hashes))
}

fn compressor(level: i32) -> Result<zstd::bulk::Compressor<'static>> {
    let mut z = zstd::bulk::Compressor::new(level).context("cannot set up zstd")?;
    z.include_checksum(true).context("cannot set up zstd")?;
    z.include_contentsize(true).context("cannot set up zstd")?;
    Ok(z)
}

fn pack_group(
    src: &Path,
    entries: &[Entry],
    g: usize,
    group: &Group,
    z: &mut zstd::bulk::Compressor<'static>,
    counters: &Counters,
) -> Result<Packed> {
    let mut packed = Packed {
        group: g,
        frames: Vec::with_capacity(group.frames.len()),
        hashes: Vec::new(),
        chunks: Vec::new(),
    };
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
                packed
                    .chunks
                    .push(hex::encode(Sha256::digest(&buf[start..])));
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
        let data = z.compress(&buf).with_context(|| {
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
        let groups = layout(&mut entries, 10);
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

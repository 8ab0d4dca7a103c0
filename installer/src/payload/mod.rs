//! The store payload: a store tree packed into one file that is read front to
//! back in one stream, cut into independent zstd frames so that
//! decompression, hashing and writing run in parallel, and carrying a
//! manifest with every file's path, mode, size, link target and sha256.
//! `docs/payload.md` describes the format; [`pack`] writes it, [`Payload`]
//! reads, checks and extracts it, [`scan`] and [`compare`] check a tree.

mod pack;
mod read;
mod tree;

use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::units::{mb_per_s, mib};

pub use pack::{pack, FrameCache, PackOptions, PackStats, LAYOUT_VERSION};
pub use read::{ExtractStats, FramesChecked, Payload};
pub use tree::{compare, digest, scan};

/// First bytes of every payload.
pub const MAGIC: [u8; 8] = *b"NFPAYLD\0";
/// Version of the format; a reader refuses any other. Version 2 added each
/// frame's sha256 (of its compressed bytes), so that the whole payload can
/// be checked by one plain read before anything is written.
pub const FORMAT_VERSION: u32 = 2;
/// Length of the fixed header before the manifest.
pub const HEADER_LEN: usize = 64;
/// zstd level of the frames unless the packer is told otherwise. 17, not
/// the NixOS ISO's 19: on 4 MiB frames it packs in about mksquashfs's time
/// (zstd -19, 1 MiB blocks) and is still smaller than its image, where 19
/// takes about 1.2x as long for 0.8 % less (measured, docs/payload.md "Pack
/// speed").
pub const DEFAULT_LEVEL: i32 = 17;
/// Uncompressed bytes per frame unless the packer is told otherwise.
pub const DEFAULT_FRAME_SIZE: u32 = 4 << 20;
/// The largest frame a reader accepts (bounds its memory: two frames per worker).
pub const MAX_FRAME_SIZE: u32 = 64 << 20;
/// The largest manifest a reader accepts.
const MAX_MANIFEST_LEN: u64 = 1 << 30;
/// Modification time of everything in a Nix store.
pub const STORE_MTIME: i64 = 1;

/// The fixed header at offset 0 (all integers little-endian).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub frame_size: u32,
    /// Compressed length of the manifest that follows the header.
    pub manifest_len: u64,
    /// sha256 of the compressed manifest.
    pub manifest_sha256: [u8; 32],
    /// Bytes of all frames, which follow the manifest.
    pub frames_len: u64,
}

impl Header {
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&self.frame_size.to_le_bytes());
        b[16..24].copy_from_slice(&self.manifest_len.to_le_bytes());
        b[24..56].copy_from_slice(&self.manifest_sha256);
        b[56..64].copy_from_slice(&self.frames_len.to_le_bytes());
        b
    }

    pub fn parse(b: &[u8; HEADER_LEN]) -> Result<Self> {
        if b[0..8] != MAGIC {
            bail!("not a nodeflash payload (bad magic)");
        }
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut v = [0u8; 8];
            v.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(v)
        };
        let header = Header {
            version: u32_at(8),
            frame_size: u32_at(12),
            manifest_len: u64_at(16),
            manifest_sha256: {
                let mut h = [0u8; 32];
                h.copy_from_slice(&b[24..56]);
                h
            },
            frames_len: u64_at(56),
        };
        if header.version != FORMAT_VERSION {
            bail!(
                "payload format version {} is not supported (this nodeflash reads version {FORMAT_VERSION} only{}); \
                 pack it again with this nodeflash (`nodeflash build` or `nodeflash payload pack`)",
                header.version,
                if header.version < FORMAT_VERSION {
                    ": older versions have no sha256 per frame"
                } else {
                    ""
                }
            );
        }
        if header.frame_size == 0 || header.frame_size > MAX_FRAME_SIZE {
            bail!("payload frame size {} is out of range", header.frame_size);
        }
        if header.manifest_len == 0 || header.manifest_len > MAX_MANIFEST_LEN {
            bail!(
                "payload manifest length {} is out of range",
                header.manifest_len
            );
        }
        Ok(header)
    }

    /// Length of the whole payload file.
    pub fn total_len(&self) -> u64 {
        HEADER_LEN as u64 + self.manifest_len + self.frames_len
    }
}

/// What the payload carries, in the order it is written and extracted:
/// every directory before what it contains.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub frame_size: u32,
    pub frames: Vec<Frame>,
    pub entries: Vec<Entry>,
    /// Nix's closure registration (`nix-store --load-db` input), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration: Option<String>,
}

/// One independent zstd frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frame {
    /// Compressed length.
    pub len: u64,
    /// Uncompressed length.
    pub size: u64,
    /// sha256 of the compressed bytes (hex): [`Payload::check_frames`]
    /// checks every frame with it before anything is written.
    pub sha256: String,
}

/// One item of the tree; paths are relative to the store directory and use `/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Entry {
    Dir {
        path: String,
        mode: u32,
    },
    /// A regular file. Its data starts at `offset` in frame `frame`; a file
    /// larger than the frame size fills frames `frame..frame + chunks.len()`
    /// on its own, from offset 0, and `chunks` holds each part's sha256.
    File {
        path: String,
        mode: u32,
        size: u64,
        sha256: String,
        #[serde(default)]
        frame: u32,
        #[serde(default)]
        offset: u64,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        chunks: Vec<String>,
    },
    Symlink {
        path: String,
        target: String,
    },
}

impl Entry {
    pub fn path(&self) -> &str {
        match self {
            Entry::Dir { path, .. } | Entry::File { path, .. } | Entry::Symlink { path, .. } => {
                path
            }
        }
    }

    /// The store path (first component) this entry belongs to.
    pub fn store_path(&self) -> &str {
        let p = self.path();
        p.split('/').next().unwrap_or(p)
    }

    /// What the entry is, without where its data sits in the payload: two
    /// trees are the same when these lines are.
    pub fn identity(&self) -> String {
        match self {
            Entry::Dir { path, mode } => format!("d {mode:o} {path}"),
            Entry::File {
                path,
                mode,
                size,
                sha256,
                ..
            } => format!("f {mode:o} {size} {sha256} {path}"),
            Entry::Symlink { path, target } => format!("l {path} -> {target}"),
        }
    }
}

/// The entries of `nix-store --dump-db` output (the `--load-db` format:
/// per path its `/nix/store` path, NAR hash, NAR size, deriver, number of
/// references, then the references; Nix's `makeValidityRegistration`,
/// src/libstore/store-api.cc) whose path is one of `keep` (store path names).
/// Errors when the text does not have that form.
pub fn filter_registration(
    text: &str,
    keep: &std::collections::BTreeSet<String>,
) -> anyhow::Result<String> {
    use anyhow::Context;
    let mut lines = text.lines();
    let mut out = String::new();
    while let Some(path) = lines.next() {
        if path.is_empty() {
            continue;
        }
        let mut record = vec![path];
        for _ in 0..3 {
            record.push(
                lines
                    .next()
                    .context("the registration ends inside a record")?,
            );
        }
        let n = lines
            .next()
            .context("the registration ends inside a record")?;
        record.push(n);
        let n: usize = n
            .parse()
            .with_context(|| format!("the registration of {path} has no reference count"))?;
        for _ in 0..n {
            record.push(
                lines
                    .next()
                    .context("the registration ends inside a record")?,
            );
        }
        let name = path
            .strip_prefix("/nix/store/")
            .with_context(|| format!("{path} in the registration is not in /nix/store"))?;
        if keep.contains(name) {
            for l in record {
                out.push_str(l);
                out.push('\n');
            }
        }
    }
    Ok(out)
}

impl Manifest {
    pub fn files(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| matches!(e, Entry::File { .. }))
            .count()
    }

    /// Uncompressed bytes of all files.
    pub fn bytes(&self) -> u64 {
        self.entries
            .iter()
            .map(|e| match e {
                Entry::File { size, .. } => *size,
                _ => 0,
            })
            .sum()
    }

    /// The top-level store paths, sorted by name (the manifest has them in
    /// the packer's order).
    pub fn store_paths(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .entries
            .iter()
            .filter(|e| !e.path().contains('/'))
            .map(Entry::path)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The store path whose data is in frame `i` (for error messages).
    pub fn store_path_of_frame(&self, i: usize) -> &str {
        self.store_paths_of_frame(i).first().copied().unwrap_or("?")
    }

    /// Every store path with data in frame `i`, in manifest order, once each.
    pub fn store_paths_of_frame(&self, i: usize) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .entries
            .iter()
            .filter_map(|e| match e {
                Entry::File {
                    frame,
                    size,
                    chunks,
                    ..
                } if *size > 0 && {
                    let first = *frame as usize;
                    i >= first && i < first + chunks.len().max(1)
                } =>
                {
                    Some(e.store_path())
                }
                _ => None,
            })
            .collect();
        v.dedup();
        v
    }
}

/// Progress of a pack, extract or verify, read by a reporter thread.
#[derive(Debug, Default)]
pub struct Counters {
    /// Uncompressed file bytes done.
    pub bytes: AtomicU64,
    pub files: AtomicU64,
    /// Compressed payload bytes read or written.
    pub payload_bytes: AtomicU64,
}

impl Counters {
    pub fn snapshot(&self) -> (u64, u64, u64) {
        (
            self.bytes.load(Ordering::Relaxed),
            self.files.load(Ordering::Relaxed),
            self.payload_bytes.load(Ordering::Relaxed),
        )
    }

    /// One plain progress line, for consoles that are not terminals.
    pub fn line(&self, total_bytes: u64, total_files: u64, elapsed: std::time::Duration) -> String {
        let (bytes, files, _) = self.snapshot();
        let secs = elapsed.as_secs_f64().max(0.001);
        let rate = bytes as f64 / secs;
        let eta = if rate > 0.0 {
            format!(
                ", ETA {:.0}s",
                total_bytes.saturating_sub(bytes) as f64 / rate
            )
        } else {
            String::new()
        };
        format!(
            "{:.1}/{:.1} MiB, {files}/{total_files} files, {:.1} MB/s{eta}",
            mib(bytes),
            mib(total_bytes),
            mb_per_s(bytes, secs)
        )
    }
}

/// A path of the manifest that extraction may create: relative, no `.` or
/// `..`, no empty component, no NUL.
pub(crate) fn check_path(p: &str) -> Result<()> {
    if p.is_empty()
        || p.starts_with('/')
        || p.contains('\0')
        || p.split('/').any(|c| c.is_empty() || c == "." || c == "..")
    {
        bail!("unsafe path {p:?} in the payload manifest");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_rejects_damage() {
        let h = Header {
            version: FORMAT_VERSION,
            frame_size: DEFAULT_FRAME_SIZE,
            manifest_len: 1234,
            manifest_sha256: [7; 32],
            frames_len: 99,
        };
        let b = h.to_bytes();
        assert_eq!(Header::parse(&b).expect("parses"), h);
        assert_eq!(h.total_len(), 64 + 1234 + 99);
        let mut bad = b;
        bad[0] = b'X';
        assert!(format!("{:#}", Header::parse(&bad).expect_err("magic")).contains("magic"));
        let mut bad = b;
        bad[8] = 1;
        let old = format!("{:#}", Header::parse(&bad).expect_err("version"));
        assert!(
            old.contains("format version 1 is not supported")
                && old.contains("no sha256 per frame")
                && old.contains("pack it again"),
            "{old}"
        );
        bad[8] = 3;
        assert!(format!("{:#}", Header::parse(&bad).expect_err("version")).contains("version 3"));
        let mut bad = b;
        bad[12..16].copy_from_slice(&(MAX_FRAME_SIZE + 1).to_le_bytes());
        assert!(Header::parse(&bad).is_err());
    }

    #[test]
    fn registration_is_filtered_by_record() {
        let text = "/nix/store/a-x\nsha256:1\n10\n\n1\n/nix/store/b-y\n\
                    /nix/store/b-y\nsha256:2\n20\n/nix/store/d-y.drv\n0\n\
                    /nix/store/c-z\nsha256:3\n30\n\n2\n/nix/store/a-x\n/nix/store/b-y\n";
        let keep = ["a-x", "b-y"].map(String::from).into_iter().collect();
        assert_eq!(
            filter_registration(text, &keep).expect("filters"),
            "/nix/store/a-x\nsha256:1\n10\n\n1\n/nix/store/b-y\n\
             /nix/store/b-y\nsha256:2\n20\n/nix/store/d-y.drv\n0\n"
        );
        assert!(filter_registration("/nix/store/a-x\nsha256:1\n", &keep).is_err());
    }

    #[test]
    fn unsafe_paths_are_refused() {
        for p in ["", "/etc", "a/../b", "a//b", "./a", "a/.", "a\0b"] {
            assert!(check_path(p).is_err(), "{p:?}");
        }
        for p in ["abc-foo", "abc-foo/bin/x", "abc-foo/.hidden", "a/..b"] {
            assert!(check_path(p).is_ok(), "{p:?}");
        }
    }

    #[test]
    fn progress_line_reads_plainly() {
        let c = Counters::default();
        c.bytes.store(5 << 20, Ordering::Relaxed);
        c.files.store(10, Ordering::Relaxed);
        let line = c.line(10 << 20, 20, std::time::Duration::from_secs(1));
        assert!(
            line.starts_with("5.0/10.0 MiB, 10/20 files, 5.2 MB/s, ETA 1s"),
            "{line}"
        );
    }
}

//! The content-addressed cache: downloaded packages, extracted trees,
//! compiled ZFS modules and packed artefacts, each under a key that is the
//! hash of everything it was made from. An entry is built in a temporary
//! directory and renamed into place, so a crash never leaves half an entry.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    /// `NODEFLASH_CACHE`, else `$XDG_CACHE_HOME/nodeflash`, else `~/.cache/nodeflash`.
    pub fn from_env() -> Result<Self> {
        let root = if let Some(dir) = std::env::var_os("NODEFLASH_CACHE") {
            PathBuf::from(dir)
        } else if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
            PathBuf::from(dir).join("nodeflash")
        } else {
            let home = std::env::var_os("HOME")
                .context("neither NODEFLASH_CACHE, XDG_CACHE_HOME nor HOME is set")?;
            PathBuf::from(home).join(".cache/nodeflash")
        };
        Self::at(root)
    }

    pub fn at(root: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&root)
            .with_context(|| format!("cannot create cache directory {}", root.display()))?;
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where entry `kind/key` goes, and its (created) parent directory.
    fn slot(&self, kind: &str, key: &str) -> Result<(PathBuf, PathBuf)> {
        let parent = self.root.join(kind);
        std::fs::create_dir_all(&parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
        Ok((parent.join(key), parent))
    }

    /// Whether entry `kind/key` is in the cache.
    pub fn has(&self, kind: &str, key: &str) -> bool {
        self.root.join(kind).join(key).exists()
    }

    /// The directory `kind/key`, made by `build` if it is not in the cache yet.
    /// `build` gets an empty directory to fill.
    pub fn dir(
        &self,
        kind: &str,
        key: &str,
        build: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<PathBuf> {
        let (dest, parent) = self.slot(kind, key)?;
        if dest.is_dir() {
            return Ok(dest);
        }
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{key}."))
            .tempdir_in(&parent)
            .with_context(|| {
                format!(
                    "cannot create a temporary directory in {}",
                    parent.display()
                )
            })?;
        build(tmp.path())?;
        let tmp = tmp.keep();
        if let Err(e) = std::fs::rename(&tmp, &dest) {
            // Another build made the same entry meanwhile: same key, same
            // content, so keep theirs.
            let _ = std::fs::remove_dir_all(&tmp);
            if !dest.is_dir() {
                return Err(e).with_context(|| {
                    format!("cannot move {} to {}", tmp.display(), dest.display())
                });
            }
        }
        Ok(dest)
    }

    /// The file `kind/key`, made by `build` (which writes the given path) if absent.
    pub fn file(
        &self,
        kind: &str,
        key: &str,
        build: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<PathBuf> {
        let (dest, parent) = self.slot(kind, key)?;
        if dest.is_file() {
            touch(&dest);
            return Ok(dest);
        }
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{key}."))
            .tempfile_in(&parent)
            .with_context(|| format!("cannot create a temporary file in {}", parent.display()))?;
        build(tmp.path())?;
        tmp.persist(&dest)
            .with_context(|| format!("cannot move a temporary file to {}", dest.display()))?;
        Ok(dest)
    }
}

/// The kinds of entry the size bound applies to: what each build makes
/// anew when its inputs change (packed payloads, the frames of their units,
/// initramfs, EFI images and ISOs, one of each per installer binary and
/// profile). Everything else in the cache (packages, extracted trees,
/// compiled modules) is pinned by a lock and kept.
pub const BOUNDED_KINDS: [&str; 5] = ["payload", "frames", "initrd", "efi", "iso"];

/// The size bound of [`BOUNDED_KINDS`] unless `NODEFLASH_CACHE_MAX` says
/// otherwise: 20 GiB.
pub const DEFAULT_MAX_BYTES: u64 = 20 << 30;

/// What [`Cache::gc`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct GcStats {
    pub removed: usize,
    pub removed_bytes: u64,
    pub kept: usize,
    pub kept_bytes: u64,
}

impl Cache {
    /// The size bound: `NODEFLASH_CACHE_MAX` (a size such as `20GiB`), else
    /// [`DEFAULT_MAX_BYTES`]. Errors when the variable is not a size.
    pub fn max_bytes_from_env() -> Result<u64> {
        match std::env::var("NODEFLASH_CACHE_MAX") {
            Ok(v) => v
                .parse::<nodeflash_installer::profile::Size>()
                .map(|s| s.0)
                .map_err(|e| anyhow::anyhow!("NODEFLASH_CACHE_MAX={v:?} is not a size: {e}")),
            Err(_) => Ok(DEFAULT_MAX_BYTES),
        }
    }

    /// Evicts the least recently used entries of [`BOUNDED_KINDS`] until
    /// they hold at most `max_bytes` in all. An entry's last use is its
    /// modification time ([`Cache::file`] and the packer's frame cache set
    /// it on every hit). `keep` is never removed (what the running build
    /// uses); temporary files (names starting with `.` or ending in `.tmp`)
    /// are left alone. Builds that share the cache may run it at once: an
    /// entry another one removed first counts as removed.
    /// Errors name the entry that cannot be read or removed.
    pub fn gc(&self, max_bytes: u64, keep: &[&Path]) -> Result<GcStats> {
        let mut entries = Vec::new();
        for kind in BOUNDED_KINDS {
            let dir = self.root.join(kind);
            let list = match std::fs::read_dir(&dir) {
                Ok(l) => l,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).with_context(|| format!("cannot read {}", dir.display())),
            };
            for e in list {
                let e = e.with_context(|| format!("cannot read {}", dir.display()))?;
                // Temporary files: `.name` here, `name.PID.tmp` from the packer.
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') || name.ends_with(".tmp") {
                    continue;
                }
                let path = e.path();
                // Another build's gc may have removed it since the listing.
                let meta = match std::fs::symlink_metadata(&path) {
                    Ok(m) => m,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => {
                        return Err(e).with_context(|| format!("cannot stat {}", path.display()))
                    }
                };
                if !meta.is_file() {
                    continue;
                }
                let used = meta
                    .modified()
                    .with_context(|| format!("cannot stat {}", path.display()))?;
                entries.push((used, path, meta.len()));
            }
        }
        // Oldest first; the name breaks ties so the order is the same every time.
        entries.sort();
        let mut total: u64 = entries.iter().map(|e| e.2).sum();
        let mut stats = GcStats::default();
        for (_, path, len) in entries {
            if total > max_bytes && !keep.iter().any(|k| *k == path) {
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(e).with_context(|| format!("cannot remove {}", path.display()))
                    }
                }
                total -= len;
                stats.removed += 1;
                stats.removed_bytes += len;
            } else {
                stats.kept += 1;
                stats.kept_bytes += len;
            }
        }
        Ok(stats)
    }
}

/// Marks a file as used now (its modification time), for [`Cache::gc`]. A
/// file that cannot be touched is only evicted sooner, so failures are ignored.
pub fn touch(path: &Path) {
    let _ = std::fs::File::open(path).and_then(|f| f.set_modified(std::time::SystemTime::now()));
}

/// sha256 of a list of strings, unambiguously joined; hex.
pub fn key_of<I: IntoIterator<Item = S>, S: AsRef<[u8]>>(parts: I) -> String {
    let mut h = Sha256::new();
    for p in parts {
        let p = p.as_ref();
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    hex::encode(h.finalize())
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_built_once() {
        let t = tempfile::tempdir().expect("tempdir");
        let cache = Cache::at(t.path().to_path_buf()).expect("cache");
        let mut builds = 0;
        for _ in 0..2 {
            let d = cache
                .dir("x", "k1", |d| {
                    builds += 1;
                    std::fs::write(d.join("f"), "v").map_err(Into::into)
                })
                .expect("dir");
            assert_eq!(std::fs::read_to_string(d.join("f")).expect("read"), "v");
        }
        assert_eq!(builds, 1);
        // A failed build leaves nothing behind.
        assert!(cache.dir("x", "k2", |_| anyhow::bail!("nope")).is_err());
        assert!(!t.path().join("x/k2").exists());
        assert_eq!(
            std::fs::read_dir(t.path().join("x")).expect("ls").count(),
            1
        );
    }

    #[test]
    fn gc_evicts_the_least_recently_used_down_to_the_bound() {
        use std::time::{Duration, SystemTime};
        let t = tempfile::tempdir().expect("tempdir");
        let cache = Cache::at(t.path().to_path_buf()).expect("cache");
        let base = SystemTime::now() - Duration::from_secs(3600);
        let mut paths = Vec::new();
        for (i, kind) in ["payload", "iso", "frames", "initrd", "efi"]
            .iter()
            .enumerate()
        {
            let p = cache
                .file(kind, &format!("e{i}"), |out| {
                    std::fs::write(out, vec![0u8; 100]).map_err(Into::into)
                })
                .expect("file");
            let f = std::fs::File::open(&p).expect("open");
            f.set_modified(base + Duration::from_secs(i as u64 * 10))
                .expect("mtime");
            paths.push(p);
        }
        // Not bounded: another kind, and a temporary file.
        cache
            .file("deb", "big", |out| {
                std::fs::write(out, vec![0u8; 1000]).map_err(Into::into)
            })
            .expect("file");
        std::fs::write(t.path().join("frames/.partial"), vec![0u8; 1000]).expect("write");
        // A hit makes e0 the most recent; e1 is kept because it is in use.
        cache
            .file("payload", "e0", |_| anyhow::bail!("not built again"))
            .expect("hit");
        let stats = cache.gc(250, &[&paths[1]]).expect("gc");
        assert_eq!(
            stats,
            GcStats {
                removed: 3,
                removed_bytes: 300,
                kept: 2,
                kept_bytes: 200
            }
        );
        let left: Vec<bool> = paths.iter().map(|p| p.exists()).collect();
        assert_eq!(left, [true, true, false, false, false]);
        assert!(t.path().join("deb/big").exists() && t.path().join("frames/.partial").exists());
        // Under the bound nothing goes.
        assert_eq!(cache.gc(1000, &[]).expect("gc").removed, 0);
    }

    #[test]
    fn keys_are_unambiguous() {
        assert_ne!(key_of(["ab", "c"]), key_of(["a", "bc"]));
        assert_eq!(key_of(["a"]), key_of(["a"]));
    }
}

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
    fn keys_are_unambiguous() {
        assert_ne!(key_of(["ab", "c"]), key_of(["a", "bc"]));
        assert_eq!(key_of(["a"]), key_of(["a"]));
    }
}

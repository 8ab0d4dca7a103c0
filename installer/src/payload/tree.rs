//! Walking a store tree in the payload's order, hashing it, and comparing a
//! tree on disk with a manifest.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use super::{Entry, STORE_MTIME};

/// The tree under `root` in payload order (sorted by name, every directory
/// before its contents), file hashes left empty. Only directories, regular
/// files and symlinks with UTF-8 names and no setuid, setgid or sticky bits
/// can be in a store.
/// With `only`, just those top-level entries (the store paths of a closure).
pub(crate) fn walk(root: &Path, only: Option<&[String]>) -> Result<Vec<(Entry, i64)>> {
    let mut out = Vec::new();
    walk_dir(root, "", only, &mut out)?;
    Ok(out)
}

fn walk_dir(
    root: &Path,
    rel: &str,
    only: Option<&[String]>,
    out: &mut Vec<(Entry, i64)>,
) -> Result<()> {
    let dir = root.join(rel);
    let mut names: Vec<std::ffi::OsString> = std::fs::read_dir(&dir)
        .with_context(|| format!("cannot read directory {}", dir.display()))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("cannot read directory {}", dir.display()))?;
    names.sort();
    if let Some(only) = only {
        names.retain(|n| only.iter().any(|o| n.as_os_str() == o.as_str()));
        if names.len() != only.len() {
            bail!(
                "{}: some of the closure's store paths are missing",
                dir.display()
            );
        }
    }
    for name in names {
        let name = name.into_string().map_err(|n| {
            anyhow::anyhow!(
                "{}: file name {n:?} is not UTF-8, which the payload cannot carry",
                dir.display()
            )
        })?;
        let path = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        let full = root.join(&path);
        let meta = std::fs::symlink_metadata(&full)
            .with_context(|| format!("cannot stat {}", full.display()))?;
        let mode = meta.permissions().mode() & 0o7777;
        let ft = meta.file_type();
        if !ft.is_symlink() && mode & 0o7000 != 0 {
            bail!(
                "{} has setuid, setgid or sticky bits ({mode:o}), which a store does not carry",
                full.display()
            );
        }
        let mtime = meta.mtime();
        if ft.is_dir() {
            out.push((
                Entry::Dir {
                    path: path.clone(),
                    mode,
                },
                mtime,
            ));
            walk_dir(root, &path, None, out)?;
        } else if ft.is_file() {
            out.push((
                Entry::File {
                    path,
                    mode,
                    size: meta.len(),
                    sha256: String::new(),
                    frame: 0,
                    offset: 0,
                    chunks: Vec::new(),
                },
                mtime,
            ));
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&full)
                .with_context(|| format!("cannot read symlink {}", full.display()))?;
            let target = target.into_os_string().into_string().map_err(|t| {
                anyhow::anyhow!("{}: link target {t:?} is not UTF-8", full.display())
            })?;
            out.push((Entry::Symlink { path, target }, mtime));
        } else {
            bail!(
                "{} is not a directory, regular file or symlink, which a store does not hold",
                full.display()
            );
        }
    }
    Ok(())
}

/// sha256 of a file, read in large blocks.
pub(crate) fn hash_file(path: &Path) -> Result<String> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Nix's own directory in the store, `/nix/store/.links` (the hard links of
/// `nix-store --optimise`; every local store creates it when it opens,
/// `linksDir` in Nix's src/libstore/local-store.cc): not a store path, so
/// [`scan`] leaves it out.
pub const NIX_LINKS_DIR: &str = ".links";

/// The tree under `root` with every file hashed (on `threads` threads), and
/// each entry's modification time; a top-level [`NIX_LINKS_DIR`] is left out.
pub fn scan(root: &Path, threads: usize) -> Result<Vec<(Entry, i64)>> {
    let mut entries = walk(root, None)?;
    entries.retain(|(e, _)| {
        let p = e.path();
        p != NIX_LINKS_DIR
            && !p
                .strip_prefix(NIX_LINKS_DIR)
                .is_some_and(|rest| rest.starts_with('/'))
    });
    let files: Vec<(usize, &str)> = entries
        .iter()
        .enumerate()
        .filter(|(_, e)| matches!(e.0, Entry::File { .. }))
        .map(|(i, e)| (i, e.0.path()))
        .collect();
    let hashes = hash_files(root, &files, threads)?;
    for (i, h) in hashes {
        if let Entry::File { sha256, .. } = &mut entries[i].0 {
            *sha256 = h;
        }
    }
    Ok(entries)
}

/// The sha256 (hex) of every file `(index, path under root)` in `files`, on
/// `threads` threads, as `(index, sha256)` in no particular order. Errors
/// name the file that cannot be read.
pub(crate) fn hash_files(
    root: &Path,
    files: &[(usize, &str)],
    threads: usize,
) -> Result<Vec<(usize, String)>> {
    let next = AtomicUsize::new(0);
    let hashes: Vec<Result<Vec<(usize, String)>>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&(i, path)) = files.get(k) else {
                            break;
                        };
                        done.push((i, hash_file(&root.join(path))?));
                    }
                    Ok(done)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a hashing thread panicked")))
            })
            .collect()
    });
    let mut out = Vec::with_capacity(files.len());
    for part in hashes {
        out.extend(part?);
    }
    Ok(out)
}

/// sha256 over the entries' identities (one line each, `\n`-terminated),
/// taken in walk order (sorted by path, component by component, so a
/// directory comes before its contents): equal for equal trees, whatever
/// the order of the input (the packer puts store paths in its own order,
/// see `pack.rs`) or the payload's layout.
pub fn digest<'a>(entries: impl IntoIterator<Item = &'a Entry>) -> String {
    let mut sorted: Vec<&Entry> = entries.into_iter().collect();
    sorted.sort_by(|a, b| a.path().split('/').cmp(b.path().split('/')));
    let mut h = Sha256::new();
    for e in sorted {
        h.update(e.identity().as_bytes());
        h.update(b"\n");
    }
    hex::encode(h.finalize())
}

/// Checks a scanned tree against the manifest's entries: the same paths with
/// the same type, mode, size, content and link target, nothing more, and
/// (when `store_mtime`) every modification time 1 as Nix leaves it. The
/// error lists the first differences.
pub fn compare(expected: &[Entry], scanned: &[(Entry, i64)], store_mtime: bool) -> Result<()> {
    let want: BTreeMap<&str, &Entry> = expected.iter().map(|e| (e.path(), e)).collect();
    let have: BTreeMap<&str, &(Entry, i64)> = scanned.iter().map(|e| (e.0.path(), e)).collect();
    let mut problems = Vec::new();
    for (path, e) in &want {
        match have.get(path) {
            None => problems.push(format!("missing: {path}")),
            Some((h, mtime)) => {
                if h.identity() != e.identity() {
                    problems.push(format!(
                        "differs: {path} (want {}, found {})",
                        e.identity(),
                        h.identity()
                    ));
                } else if store_mtime && *mtime != STORE_MTIME {
                    problems.push(format!("mtime {mtime} instead of {STORE_MTIME}: {path}"));
                }
            }
        }
    }
    for path in have.keys() {
        if !want.contains_key(path) {
            problems.push(format!("not in the manifest: {path}"));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    let n = problems.len();
    problems.truncate(10);
    bail!(
        "the tree differs from the payload manifest in {n} place{}:\n  {}",
        if n == 1 { "" } else { "s" },
        problems.join("\n  ")
    )
}

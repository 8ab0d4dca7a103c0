//! Scanning a built image for what it must not carry from the build host:
//! its home, the repository's and the cache's absolute paths, its host and
//! user name, secret-looking environment values, SSH private keys.
//!
//! Every layer is read, decompressed where it is compressed: the ISO file
//! itself, the ISO9660 files, the appended EFI system partition and its
//! files, zstd streams (the initramfs, the payload's frames) and cpio
//! "newc" archives (several concatenated segments too), the store payload's
//! manifest and every file it holds. A hit names the needle and the layer
//! path, e.g. `qemu.iso › ESP:/nodeflash/initrd.zst › zstd › cpio:/init`.

use std::fmt;
use std::io::{Cursor, Read};
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use memchr::memmem;

/// The first bytes of a zstd frame.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// The first bytes of a cpio "newc" (and "crc") entry.
const NEWC_MAGIC: &[u8] = b"07070";
/// A decompressed layer larger than this is an error (nothing in an image is).
const MAX_DECOMPRESSED: u64 = 4 << 30;
/// Shorter needles would match by chance in compressed data.
pub const MIN_NEEDLE: usize = 5;
/// Type GUID of an EFI system partition, as it is stored in a GPT entry.
const ESP_GUID: [u8; 16] = [
    0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e, 0xc9, 0x3b,
];

/// Something of the build host's that must not be in an image.
#[derive(Debug, Clone)]
pub struct Needle {
    /// What it is, e.g. `the repository path /src/nodeflash`. A secret's
    /// description names where it came from, never its value.
    pub what: String,
    pub bytes: Vec<u8>,
    /// Its value and the bytes around a hit are not printed.
    pub secret: bool,
}

impl Needle {
    pub fn path(what: &str, path: &Path) -> Needle {
        Needle {
            what: format!("{what} {}", path.display()),
            bytes: path.as_os_str().as_encoded_bytes().to_vec(),
            secret: false,
        }
    }
}

/// A needle found in a layer.
#[derive(Debug, Clone)]
pub struct Hit {
    pub needle: String,
    pub place: String,
    pub offset: usize,
    pub count: usize,
    /// The bytes around the first occurrence (none for a secret).
    pub context: Option<String>,
}

impl fmt::Display for Hit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} in {} at byte {} ({} time{})",
            self.needle,
            self.place,
            self.offset,
            self.count,
            if self.count == 1 { "" } else { "s" }
        )?;
        if let Some(c) = &self.context {
            write!(f, ": …{c}…")?;
        }
        Ok(())
    }
}

/// The needles and what was found, and every layer read.
pub struct Scanner {
    needles: Vec<(Needle, memmem::Finder<'static>)>,
    pub hits: Vec<Hit>,
    /// Every layer scanned, by its place.
    pub layers: Vec<String>,
    /// Layers that looked compressed or archived but could not be read.
    pub unreadable: Vec<String>,
}

impl fmt::Debug for Scanner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scanner")
            .field("needles", &self.needles.len())
            .field("hits", &self.hits)
            .field("layers", &self.layers.len())
            .field("unreadable", &self.unreadable)
            .finish()
    }
}

impl Scanner {
    /// Needles shorter than [`MIN_NEEDLE`] are dropped; duplicates are kept once.
    pub fn new(needles: Vec<Needle>) -> Scanner {
        let mut kept: Vec<(Needle, memmem::Finder<'static>)> = Vec::new();
        for n in needles {
            if n.bytes.len() < MIN_NEEDLE || kept.iter().any(|(k, _)| k.bytes == n.bytes) {
                continue;
            }
            let finder = memmem::Finder::new(&n.bytes).into_owned();
            kept.push((n, finder));
        }
        Scanner {
            needles: kept,
            hits: Vec::new(),
            layers: Vec::new(),
            unreadable: Vec::new(),
        }
    }

    /// The hits, each needle reported in the innermost layers it was found
    /// in (a file's hit is not repeated for the archive around it).
    pub fn findings(&self) -> Vec<&Hit> {
        self.hits
            .iter()
            .filter(|h| {
                !self.hits.iter().any(|inner| {
                    inner.needle == h.needle
                        && inner.place.len() > h.place.len()
                        && inner.place.starts_with(&h.place)
                })
            })
            .collect()
    }

    pub fn needles(&self) -> impl Iterator<Item = &Needle> {
        self.needles.iter().map(|(n, _)| n)
    }

    /// Scans `data` and what is inside it: a zstd stream is decompressed, a
    /// cpio archive is opened, each result scanned the same way.
    pub fn blob(&mut self, place: &str, data: &[u8]) {
        self.layers.push(place.to_string());
        self.find(place, data);
        if data.starts_with(&ZSTD_MAGIC) {
            match decompress(data) {
                Ok(inner) => self.blob(&format!("{place} › zstd"), &inner),
                Err(e) => self.unreadable.push(format!("{place}: {e:#}")),
            }
        } else if data.starts_with(NEWC_MAGIC) {
            if let Err(e) = self.cpio(place, data) {
                self.unreadable.push(format!("{place}: {e:#}"));
            }
        }
    }

    /// The needles in `data` itself, without looking inside it.
    fn find(&mut self, place: &str, data: &[u8]) {
        for (needle, finder) in &self.needles {
            let mut found = finder.find_iter(data);
            let Some(first) = found.next() else { continue };
            let context = (!needle.secret).then(|| {
                let start = first.saturating_sub(40);
                let end = (first + needle.bytes.len() + 60).min(data.len());
                String::from_utf8_lossy(&data[start..end])
                    .chars()
                    .map(|c| if c.is_control() { '.' } else { c })
                    .collect()
            });
            self.hits.push(Hit {
                needle: needle.what.clone(),
                place: place.to_string(),
                offset: first,
                count: 1 + found.count(),
                context,
            });
        }
    }

    /// Every entry of a newc archive, and what follows its trailer: another
    /// archive, compressed or not (the kernel reads such concatenations).
    fn cpio(&mut self, place: &str, data: &[u8]) -> Result<()> {
        let mut pos = 0;
        let mut segment = 1;
        while pos < data.len() {
            if data[pos..].starts_with(&ZSTD_MAGIC) {
                // A compressed segment runs to the end (zstd refuses anything after it).
                let inner = decompress(&data[pos..])?;
                self.blob(&format!("{place} › segment {segment} › zstd"), &inner);
                return Ok(());
            }
            if !data[pos..].starts_with(NEWC_MAGIC) {
                bail!("byte {pos}: neither a cpio entry nor a zstd stream");
            }
            let (name, body, next) = newc_entry(data, pos)?;
            pos = next;
            if name == "TRAILER!!!" {
                segment += 1;
                while pos < data.len() && data[pos] == 0 {
                    pos += 1;
                }
                continue;
            }
            let inner = format!("{place} › cpio:/{name}");
            if body.is_empty() {
                self.layers.push(inner);
            } else {
                self.blob(&inner, body);
            }
        }
        Ok(())
    }

    /// Every file below `dir`, named `place:/relative/path`.
    pub fn tree(&mut self, place: &str, dir: &Path) -> Result<()> {
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            let mut entries: Vec<_> = std::fs::read_dir(&d)
                .with_context(|| format!("cannot read {}", d.display()))?
                .collect::<std::io::Result<_>>()
                .with_context(|| format!("cannot read {}", d.display()))?;
            entries.sort_by_key(|e| e.file_name());
            for e in entries {
                let path = e.path();
                let rel = path
                    .strip_prefix(dir)
                    .unwrap_or(&path)
                    .display()
                    .to_string();
                let kind = e
                    .file_type()
                    .with_context(|| format!("cannot stat {}", path.display()))?;
                if kind.is_dir() {
                    stack.push(path);
                } else if kind.is_symlink() {
                    let target = std::fs::read_link(&path)
                        .with_context(|| format!("cannot read link {}", path.display()))?;
                    let target = target.as_os_str().as_encoded_bytes().to_vec();
                    self.blob(&format!("{place}:/{rel} (link target)"), &target);
                } else if kind.is_file() {
                    let data = std::fs::read(&path)
                        .with_context(|| format!("cannot read {}", path.display()))?;
                    self.blob(&format!("{place}:/{rel}"), &data);
                }
            }
        }
        Ok(())
    }

    /// Every file of a FAT image (and the image's own bytes).
    pub fn fat(&mut self, place: &str, image: Vec<u8>) -> Result<()> {
        self.blob(place, &image);
        let fs = fatfs::FileSystem::new(Cursor::new(image), fatfs::FsOptions::new())
            .with_context(|| format!("{place}: not a FAT file system"))?;
        let mut stack = vec![(fs.root_dir(), String::new())];
        while let Some((dir, prefix)) = stack.pop() {
            for entry in dir.iter() {
                let entry = entry.with_context(|| format!("{place}: cannot read {prefix}/"))?;
                let name = entry.file_name();
                if name == "." || name == ".." {
                    continue;
                }
                let path = format!("{prefix}/{name}");
                if entry.is_dir() {
                    stack.push((entry.to_dir(), path));
                } else {
                    let mut data = Vec::new();
                    entry
                        .to_file()
                        .read_to_end(&mut data)
                        .with_context(|| format!("{place}: cannot read {path}"))?;
                    self.blob(&format!("{place}:{path}"), &data);
                }
            }
        }
        Ok(())
    }

    /// A store payload: its raw bytes, its manifest, and every file it holds
    /// (extracted, so checked against the manifest, into `scratch`).
    pub fn payload(&mut self, place: &str, file: &Path, scratch: &Path) -> Result<()> {
        use nodeflash_installer::payload::{Counters, Payload};
        let raw = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
        // Not `blob`: the frames are separate zstd streams, read by the extract.
        self.layers.push(place.to_string());
        self.find(place, &raw);
        let p = Payload::open(Cursor::new(raw)).with_context(|| format!("{place}: cannot open"))?;
        let manifest =
            serde_json::to_vec_pretty(&p.manifest).context("cannot serialize the manifest")?;
        self.blob(&format!("{place} › manifest"), &manifest);
        let dest = scratch.join("store");
        p.extract(Some(&dest), 2, &Counters::default())
            .with_context(|| format!("{place}: cannot extract into {}", dest.display()))?;
        self.tree(&format!("{place} › store"), &dest)
    }

    /// A built ISO: its bytes, its ISO9660 files (the payload opened), the
    /// appended EFI system partition and its files. `scratch` is an empty
    /// directory for the extracted files.
    pub fn iso(&mut self, iso: &Path, scratch: &Path) -> Result<()> {
        let name = iso
            .file_name()
            .map_or("image".into(), |n| n.to_string_lossy().into_owned());
        let bytes = std::fs::read(iso).with_context(|| format!("cannot read {}", iso.display()))?;
        self.layers.push(name.clone());
        self.find(&name, &bytes);
        let files = scratch.join("iso9660");
        let out = Command::new("xorriso")
            .args(["-osirrox", "on", "-indev"])
            .arg(iso)
            .args(["-extract", "/"])
            .arg(&files)
            .output()
            .context("cannot run xorriso (package xorriso)")?;
        if !out.status.success() {
            bail!(
                "xorriso cannot extract {}: {}",
                iso.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let payload = files.join("nodeflash/store.nfp");
        if payload.exists() {
            let moved = scratch.join("store.nfp");
            std::fs::rename(&payload, &moved)
                .with_context(|| format!("cannot move {}", payload.display()))?;
            self.payload(
                &format!("{name}:/nodeflash/store.nfp"),
                &moved,
                &scratch.join("payload"),
            )?;
        }
        self.tree(&name, &files)?;
        let esps = esp_ranges(&bytes)?;
        if esps.is_empty() {
            bail!("{name}: no EFI system partition in its GPT");
        }
        for (i, range) in esps.into_iter().enumerate() {
            let esp = bytes
                .get(range.clone())
                .with_context(|| format!("{name}: ESP {range:?} is past the end of the image"))?
                .to_vec();
            let place = if i == 0 {
                format!("{name} › ESP")
            } else {
                format!("{name} › ESP {}", i + 1)
            };
            self.fat(&place, esp)?;
        }
        Ok(())
    }
}

/// Decompresses a zstd stream (several frames too), bounded.
pub fn decompress(data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    zstd::stream::read::Decoder::new(data)
        .context("cannot start zstd")?
        .take(MAX_DECOMPRESSED + 1)
        .read_to_end(&mut out)
        .context("not a valid zstd stream")?;
    if out.len() as u64 > MAX_DECOMPRESSED {
        bail!("decompresses to more than {MAX_DECOMPRESSED} bytes");
    }
    Ok(out)
}

/// The file `path` (as the archive names it, without a leading `/`) of an
/// initramfs as the builder writes it: zstd-compressed cpio "newc"
/// archives back to back (or plain ones). Errors when the data is neither,
/// or `path` is missing.
pub fn initramfs_file(data: &[u8], path: &str) -> Result<Vec<u8>> {
    let mut pos = 0;
    while pos < data.len() {
        if data[pos..].starts_with(&ZSTD_MAGIC) {
            return initramfs_file(&decompress(&data[pos..])?, path);
        }
        if !data[pos..].starts_with(NEWC_MAGIC) {
            bail!("byte {pos}: neither a cpio entry nor a zstd stream");
        }
        let (name, body, next) = newc_entry(data, pos)?;
        if name == path {
            return Ok(body.to_vec());
        }
        pos = next;
        while name == "TRAILER!!!" && pos < data.len() && data[pos] == 0 {
            pos += 1;
        }
    }
    bail!("{path} is not in the initramfs")
}

/// The newc entry at `pos`: its name, its data and where the next one starts.
fn newc_entry(data: &[u8], pos: usize) -> Result<(String, &[u8], usize)> {
    let header = data
        .get(pos..pos + 110)
        .with_context(|| format!("byte {pos}: cpio header cut short"))?;
    let field = |i: usize| -> Result<usize> {
        let hex = std::str::from_utf8(&header[6 + 8 * i..14 + 8 * i])
            .ok()
            .and_then(|s| usize::from_str_radix(s, 16).ok());
        hex.with_context(|| format!("byte {pos}: bad cpio header field {i}"))
    };
    let (filesize, namesize) = (field(6)?, field(11)?);
    let align = |n: usize| n.div_ceil(4) * 4;
    let name_end = pos + 110 + namesize;
    let name = data
        .get(pos + 110..name_end.saturating_sub(1))
        .with_context(|| format!("byte {pos}: cpio name cut short"))?;
    let name = String::from_utf8_lossy(name).into_owned();
    let body_start = align(name_end);
    let body = data
        .get(body_start..body_start + filesize)
        .with_context(|| format!("{name}: cpio data cut short"))?;
    Ok((name, body, align(body_start + filesize)))
}

/// Byte ranges of the EFI system partitions in the image's GPT (512-byte
/// sectors, as xorriso writes it).
pub fn esp_ranges(image: &[u8]) -> Result<Vec<std::ops::Range<usize>>> {
    let header = image.get(512..512 + 92).context("no GPT header")?;
    if &header[..8] != b"EFI PART" {
        bail!("no GPT header at sector 1");
    }
    let u64_at = |b: &[u8], i: usize| {
        let mut v = [0u8; 8];
        v.copy_from_slice(&b[i..i + 8]);
        u64::from_le_bytes(v) as usize
    };
    let u32_at =
        |b: &[u8], i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]) as usize;
    let (table, count, size) = (u64_at(header, 72), u32_at(header, 80), u32_at(header, 84));
    if !(128..=4096).contains(&size) || count > 1024 {
        bail!("implausible GPT entry table ({count} entries of {size} bytes)");
    }
    let mut esps = Vec::new();
    for i in 0..count {
        let at = table * 512 + i * size;
        let entry = image.get(at..at + size).context("GPT entries cut short")?;
        if entry[..16] == ESP_GUID {
            let (first, last) = (u64_at(entry, 32), u64_at(entry, 40));
            esps.push(first * 512..(last + 1) * 512);
        }
    }
    Ok(esps)
}

/// The build host's paths, names and secrets, from its environment and
/// files. `repo` is the repository's absolute path.
pub fn host_needles(repo: &Path) -> Vec<Needle> {
    let mut needles = vec![Needle::path("the repository path", repo)];
    let env = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    let home = env("HOME").map(std::path::PathBuf::from);
    if let Some(home) = &home {
        // A home such as /root or / is too common a string on its own: its
        // build-host parts are searched for instead (not `.ssh`: the
        // installer rightly writes the target's /root/.ssh; the host's keys
        // are needles of their own).
        let generic =
            home.components().count() <= 2 && home.ends_with("root") || home == Path::new("/");
        if generic {
            for sub in [".cargo", ".rustup", ".cache"] {
                needles.push(Needle::path(
                    "a path in the build host's home",
                    &home.join(sub),
                ));
            }
        } else {
            needles.push(Needle::path("the build host's home", home));
        }
    }
    for (var, what) in [
        ("CARGO_HOME", "the cargo home"),
        ("RUSTUP_HOME", "the rustup home"),
        ("CARGO_TARGET_DIR", "the cargo target directory"),
    ] {
        if let Some(v) = env(var) {
            needles.push(Needle::path(&format!("{what} (${var})"), Path::new(&v)));
        }
    }
    if let Ok(cache) = nodeflash_builder::cache::Cache::from_env() {
        needles.push(Needle::path("the nodeflash cache", cache.root()));
    }
    for var in ["USER", "LOGNAME"] {
        if let Some(user) = env(var).and_then(|u| u.into_string().ok()) {
            if user != "root" {
                // As a path component: a bare name may be an ordinary word.
                needles.push(Needle {
                    what: format!("the build user's name (${var}) as a path component"),
                    bytes: format!("/{user}/").into_bytes(),
                    secret: false,
                });
            }
        }
    }
    if let Ok(host) = std::fs::read_to_string("/etc/hostname") {
        let host = host.trim();
        if host.len() >= 6 && !["localhost", "debian", "ubuntu", "nixos"].contains(&host) {
            needles.push(Needle {
                what: format!("the build host's name {host:?} (/etc/hostname)"),
                bytes: host.as_bytes().to_vec(),
                secret: false,
            });
        }
    }
    needles.extend(secret_values(std::env::vars_os().filter_map(|(n, v)| {
        Some((n.into_string().ok()?, v.into_string().ok()?))
    })));
    if let Some(home) = &home {
        needles.extend(ssh_private_keys(&home.join(".ssh")));
    }
    needles
}

/// The values (8 characters or more) of the variables whose names say they
/// hold a secret: TOKEN, SECRET, PASSWORD, PASSWD or KEY in any case.
pub fn secret_values(vars: impl Iterator<Item = (String, String)>) -> Vec<Needle> {
    vars.filter(|(name, value)| {
        let upper = name.to_ascii_uppercase();
        value.len() >= 8
            && ["TOKEN", "SECRET", "PASSWORD", "PASSWD", "KEY"]
                .iter()
                .any(|w| upper.contains(w))
    })
    .map(|(name, value)| Needle {
        what: format!("the value of ${name}"),
        bytes: value.into_bytes(),
        secret: true,
    })
    .collect()
}

/// A line of the base64 body of each private key in `dir` (`id_*` without `.pub`).
pub fn ssh_private_keys(dir: &Path) -> Vec<Needle> {
    let mut needles = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return needles;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("id_") || name.ends_with(".pub") {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        let body: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("-----") && !l.contains(':'))
            .collect();
        // The second line: the first is mostly the format's fixed header.
        if let Some(line) = body.get(1).or(body.first()) {
            needles.push(Needle {
                what: format!("the SSH private key {}", e.path().display()),
                bytes: line.as_bytes().to_vec(),
                secret: true,
            });
        }
    }
    needles
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A newc entry, as the kernel reads it.
    fn newc(name: &str, data: &[u8]) -> Vec<u8> {
        let mut out = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            1,
            0o100644,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        )
        .into_bytes();
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out.extend_from_slice(data);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out
    }

    fn archive(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut a: Vec<u8> = files.iter().flat_map(|(n, d)| newc(n, d)).collect();
        a.extend(newc("TRAILER!!!", b""));
        a
    }

    fn needle(s: &str) -> Needle {
        Needle {
            what: format!("planted {s}"),
            bytes: s.as_bytes().to_vec(),
            secret: false,
        }
    }

    #[test]
    fn finds_a_needle_in_the_second_compressed_segment_of_an_initramfs() {
        let first = archive(&[("init", b"just the installer"), ("etc/x", b"")]);
        let inner = archive(&[("lib/secret.conf", b"path=/home/builder/src/nodeflash\n")]);
        // As the kernel reads it: a compressed archive after the first one.
        let mut both = first;
        both.extend(zstd::encode_all(inner.as_slice(), 3).expect("zstd"));
        let initrd = zstd::encode_all(both.as_slice(), 3).expect("zstd");
        let mut s = Scanner::new(vec![needle("/home/builder"), needle("/not/there")]);
        s.blob("initrd.zst", &initrd);
        assert!(s.unreadable.is_empty(), "{:?}", s.unreadable);
        assert_eq!(
            s.hits.len(),
            2,
            "the segment and the file in it: {:?}",
            s.hits
        );
        let findings = s.findings();
        assert_eq!(findings.len(), 1, "{findings:?}");
        let hit = findings[0].to_string();
        assert_eq!(
            hit,
            "planted /home/builder in initrd.zst › zstd › segment 2 › zstd › cpio:/lib/secret.conf \
             at byte 5 (1 time): …path=/home/builder/src/nodeflash.…"
        );
        assert!(s
            .layers
            .iter()
            .any(|l| l == "initrd.zst › zstd › cpio:/init"));
    }

    #[test]
    fn secrets_are_named_not_shown_and_short_needles_are_dropped() {
        let s = Scanner::new(vec![
            needle("abc"),
            Needle {
                what: "the value of $API_TOKEN".into(),
                bytes: b"hunter2-hunter2".to_vec(),
                secret: true,
            },
        ]);
        assert_eq!(s.needles().count(), 1);
        let mut s = s;
        s.blob("profile.toml", b"keys = [\"hunter2-hunter2\"]");
        let hit = s.hits[0].to_string();
        assert_eq!(
            hit,
            "the value of $API_TOKEN in profile.toml at byte 9 (1 time)"
        );
        assert!(!hit.contains("hunter2"));
    }

    #[test]
    fn damaged_layers_are_reported_not_skipped() {
        let mut s = Scanner::new(vec![needle("/home/builder")]);
        let mut cut = zstd::encode_all(&b"x".repeat(1000)[..], 3).expect("zstd");
        cut.truncate(cut.len() - 3);
        s.blob("cut.zst", &cut);
        let mut bad = archive(&[("a", b"1234")]);
        bad.truncate(114);
        s.blob("bad.cpio", &bad);
        s.fat("esp", vec![0u8; 4096]).expect_err("not a FAT image");
        assert_eq!(s.unreadable.len(), 2, "{:?}", s.unreadable);
        assert!(
            s.unreadable[0].starts_with("cut.zst: "),
            "{:?}",
            s.unreadable
        );
        assert!(
            s.unreadable[1].contains("bad.cpio: a: cpio data cut short"),
            "{:?}",
            s.unreadable
        );
    }

    #[test]
    fn finds_the_esp_in_a_gpt() {
        let mut image = vec![0u8; 4096];
        image[512..520].copy_from_slice(b"EFI PART");
        image[512 + 72..512 + 80].copy_from_slice(&2u64.to_le_bytes());
        image[512 + 80..512 + 84].copy_from_slice(&4u32.to_le_bytes());
        image[512 + 84..512 + 88].copy_from_slice(&128u32.to_le_bytes());
        let second = 1024 + 128;
        image[second..second + 16].copy_from_slice(&ESP_GUID);
        image[second + 32..second + 40].copy_from_slice(&6u64.to_le_bytes());
        image[second + 40..second + 48].copy_from_slice(&7u64.to_le_bytes());
        let esps = esp_ranges(&image).expect("gpt");
        assert_eq!(esps.len(), 1);
        assert_eq!(esps[0], 3072..4096);
        assert!(esp_ranges(&[0u8; 1024]).is_err());
    }

    #[test]
    fn secret_looking_variables_are_needles() {
        let vars = [
            ("GITHUB_TOKEN", "ghp_0123456789"),
            ("aws_secret_access_key", "abcdefgh"),
            ("DB_PASSWORD", "short"),
            ("PATH", "/usr/local/bin:/usr/bin"),
            ("SSH_KEY_PASSPHRASE_FILE", "/etc/k/pass"),
        ]
        .map(|(n, v)| (n.to_string(), v.to_string()));
        let n = secret_values(vars.into_iter());
        let names: Vec<&str> = n.iter().map(|n| n.what.as_str()).collect();
        assert_eq!(
            names,
            [
                "the value of $GITHUB_TOKEN",
                "the value of $aws_secret_access_key",
                "the value of $SSH_KEY_PASSPHRASE_FILE"
            ]
        );
        assert!(n.iter().all(|n| n.secret));
    }

    #[test]
    fn private_key_bodies_are_needles() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("id_ed25519"),
            "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\nQyNTUxOQAAACD1secretbody\n-----END OPENSSH PRIVATE KEY-----\n",
        )
        .expect("write");
        std::fs::write(dir.path().join("id_ed25519.pub"), "ssh-ed25519 AAAA x").expect("write");
        std::fs::write(dir.path().join("known_hosts"), "h ssh-ed25519 AAAA").expect("write");
        let n = ssh_private_keys(dir.path());
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].bytes, b"QyNTUxOQAAACD1secretbody");
        assert!(n[0].secret);
    }
}

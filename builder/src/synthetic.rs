//! A deterministic synthetic Nix store, for tests and benchmarks.
//!
//! [`generate`] writes exactly `files` regular files holding exactly `bytes`
//! bytes in total; directories and symlinks come on top of those numbers.
//! The files are spread over store paths named like Nix's
//! (`<32 chars of Nix base32>-<name>-<version>`, about one per 40 files; a few
//! are single files rather than directories), in trees like real packages
//! (`bin/`, `lib/`, `share/…`, `include/…`, several levels deep). Content is a
//! mix of text drawn from a fixed word list, ELF-like binaries with repeated
//! structures and some random bytes, so that it compresses roughly like a
//! real store (zstd -19: about 2.7x). There are a few empty files, a few large
//! ones (4 to 8 MiB, from 32 MiB of `bytes` on), names of up to 255 bytes, and
//! symlinks that are relative, absolute (`/nix/store/<other path>/…`) or
//! dangling.
//!
//! Modes and times are what Nix leaves in a store: files 0444 (0555 when
//! executable), directories 0555, every mtime 1 (symlinks included). The
//! output directory itself is left as it was. Everything derives from the
//! seed through a small PRNG of our own (splitmix64), so the same spec gives
//! the same tree, byte for byte, on any machine.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{symlink, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{bail, Context, Result};
use nix::sys::stat::{utimensat, UtimensatFlags};
use nix::sys::time::TimeSpec;

/// What to generate: `files` regular files of `bytes` bytes in total.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spec {
    pub files: u64,
    pub bytes: u64,
    pub seed: u64,
}

/// What was generated (`dirs` counts the store-path directories too).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
    pub store_paths: u64,
}

/// Changes whenever the same spec would give a different tree (for caches of generated stores).
pub const VERSION: u32 = 1;

use nodeflash_installer::units::MIB;
const FILES_PER_STORE_PATH: u64 = 40;
const NAME_MAX: usize = 255;
const NIX_BASE32: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

#[rustfmt::skip]
const PACKAGES: &[&str] = &[
    "glibc", "openssl", "zlib", "bash", "coreutils", "python3", "perl", "systemd", "util-linux",
    "gcc", "libffi", "ncurses", "readline", "sqlite", "curl", "git", "openssh", "zstd", "xz",
    "bzip2", "gnugrep", "gnused", "gawk", "findutils", "diffutils", "iproute2", "kmod", "dbus",
    "linux-pam", "shadow", "nix", "boost", "icu4c", "libxml2", "expat", "pcre2", "gmp", "mpfr",
    "attr", "acl", "libcap", "e2fsprogs", "zfs-user", "tzdata", "nss-cacert", "libseccomp", "llvm",
    "rustc", "go", "nodejs", "mailcap", "gettext", "libidn2", "libunistring", "lz4", "brotli",
    "elfutils", "jq", "htop", "tmux",
];

const OUTPUTS: &[&str] = &["dev", "lib", "man", "doc", "bin"];

/// Names of the directories inside packages (a few, so that directories hold several files).
const SUBDIRS: &[&str] = &[
    "core",
    "util",
    "tests",
    "data",
    "common",
    "internal",
    "backends",
    "templates",
];

const LOCALES: &[&str] = &["de", "fr", "es", "ja", "pt_BR", "ru", "zh_CN", "sv"];

/// Words of the text content and of most names.
#[rustfmt::skip]
const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "for", "that", "with", "this", "on", "as", "be", "by",
    "are", "if", "or", "not", "from", "at", "an", "it", "return", "self", "def", "class", "import",
    "const", "static", "struct", "int", "char", "void", "unsigned", "size_t", "NULL", "None",
    "True", "False", "else", "elif", "while", "break", "continue", "include", "define", "ifdef",
    "endif", "typedef", "enum", "value", "name", "path", "file", "buffer", "length", "error",
    "result", "config", "option", "default", "string", "list", "index", "count", "data", "type",
    "object", "module", "package", "version", "license", "copyright", "free", "software",
    "permission", "granted", "without", "warranty", "merchantability", "fitness", "purpose",
    "distributed", "hope", "useful", "should", "have", "received", "copy", "general", "public",
    "library", "program", "function", "argument", "parameter", "returns", "pointer", "memory",
    "allocate", "release", "handle", "stream", "input", "output", "read", "write", "open", "close",
    "socket", "address", "network", "server", "client", "request", "response", "header", "body",
    "message", "format", "parse", "token", "node", "tree", "hash", "table", "key", "cache", "lock",
    "thread", "signal", "process", "user", "group", "mode", "flags", "status", "check", "test",
    "assert", "debug", "info", "warning", "usage", "example", "see", "also", "manual", "page",
    "section", "description", "synopsis", "options", "environment", "variable", "directory",
    "system", "kernel", "device", "driver", "start", "stop", "init", "load", "save", "update",
    "remove", "create", "delete", "find", "match", "pattern", "regex", "encode", "decode",
    "compress", "archive", "python", "perl", "shell", "script", "build", "install", "prefix",
    "lib", "bin", "share", "doc", "locale", "time", "date", "zone", "utf8", "ascii", "unicode",
];

const PUNCTUATION: &[&str] = &["", "", "", ";", ".", ",", ":", " {", " }", "()", " = 0;"];

const TEXT_EXTENSIONS: &[&str] = &["py", "h", "pm", "txt", "conf", "js", "md", "nix", "html"];

const OPCODES: &[u8] = &[
    0x48, 0x89, 0x8b, 0xe8, 0x0f, 0xc3, 0x00, 0x41, 0x4c, 0x83, 0x85, 0x74, 0x75, 0xeb, 0x31, 0xff,
    0x66, 0x90, 0xc7, 0x8d,
];

/// splitmix64: tiny, fast, and the same stream everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when n is 0).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }

    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.below(xs.len() as u64) as usize]
    }

    fn word(&mut self) -> &'static str {
        self.pick(WORDS)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Content {
    Text,
    Elf,
    Random,
}

struct FilePlan {
    path: String,
    size: u64,
    exec: bool,
    content: Content,
    seed: u64,
}

/// The whole tree, decided before anything is written.
#[derive(Default)]
struct Plan {
    store_paths: Vec<String>,
    dirs: BTreeSet<String>,
    taken: BTreeSet<String>,
    files: Vec<FilePlan>,
    links: Vec<(String, String)>,
}

impl Plan {
    /// Reserves `path` for a file or symlink and records its parents; false
    /// when it (or a parent) is already used.
    fn claim(&mut self, path: &str) -> bool {
        if self.taken.contains(path) || self.dirs.contains(path) {
            return false;
        }
        let parents: Vec<&str> = path.match_indices('/').map(|(i, _)| &path[..i]).collect();
        if parents.iter().any(|p| self.taken.contains(*p)) {
            return false;
        }
        self.dirs.extend(parents.iter().map(|p| p.to_string()));
        self.taken.insert(path.to_string());
        true
    }

    /// Claims `dir/name`, or `dir/name.N` for the first free N; returns the path.
    fn claim_free(&mut self, dir: &str, name: &str) -> String {
        let name = &name[..name.len().min(NAME_MAX)];
        let path = format!("{dir}/{name}");
        if self.claim(&path) {
            return path;
        }
        (1u64..1000)
            .map(|n| {
                let mut name = name.to_string();
                let suffix = format!(".{n}");
                name.truncate(NAME_MAX - suffix.len());
                format!("{dir}/{name}{suffix}")
            })
            .find(|p| self.claim(p))
            .unwrap_or(path)
    }
}

fn store_hash(rng: &mut Rng) -> String {
    (0..32)
        .map(|_| char::from(NIX_BASE32[rng.below(32) as usize]))
        .collect()
}

fn version(rng: &mut Rng) -> String {
    match rng.below(3) {
        0 => format!("{}.{}", rng.below(10), rng.below(40)),
        _ => format!("{}.{}.{}", rng.below(10), rng.below(40), rng.below(20)),
    }
}

/// Splits `total` over `weights` exactly (the rounding remainder goes to the first ones).
fn scale(weights: &[u64], total: u64) -> Vec<u64> {
    let sum: u128 = weights.iter().map(|&w| u128::from(w)).sum();
    if sum == 0 {
        return vec![0; weights.len()];
    }
    let mut out: Vec<u64> = weights
        .iter()
        .map(|&w| (u128::from(w) * u128::from(total) / sum) as u64)
        .collect();
    // Each share lost less than one to rounding: at most one each to add back.
    let rest = total - out.iter().sum::<u64>();
    for v in out.iter_mut().take(rest as usize) {
        *v += 1;
    }
    out
}

/// Roughly log-uniform weights between `lo` and `lo << steps`.
fn log_weight(rng: &mut Rng, lo: u64, steps: u64) -> u64 {
    let base = lo << rng.below(steps);
    base + rng.below(base)
}

/// Every file's size, in random order: a few empty, a few large, the rest
/// spread log-uniformly (64 B to 256 KiB before scaling) over what is left.
fn file_sizes(rng: &mut Rng, files: u64, bytes: u64) -> Vec<u64> {
    let empty = if files >= 20 {
        (files / 400).clamp(1, 50)
    } else {
        0
    };
    let large_count = if files >= 20 && bytes >= 32 * MIB {
        (bytes / (128 * MIB)).clamp(1, 8)
    } else {
        0
    };
    let large: Vec<u64> = (0..large_count)
        .map(|_| 4 * MIB + 1 + rng.below(4 * MIB))
        .collect();
    let rest = files - empty - large_count;
    let weights: Vec<u64> = (0..rest).map(|_| log_weight(rng, 64, 12)).collect();
    let mut sizes = scale(&weights, bytes - large.iter().sum::<u64>());
    sizes.extend(large);
    sizes.extend((0..empty).map(|_| 0));
    for i in (1..sizes.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        sizes.swap(i, j);
    }
    sizes
}

/// A name of exactly `len` bytes made of words.
fn long_name(rng: &mut Rng, len: usize) -> String {
    let mut name = String::from(rng.word());
    while name.len() < len {
        name.push('-');
        name.push_str(rng.word());
    }
    name.truncate(len - 3);
    name.push_str(".md");
    name
}

/// Adds one file of `size` bytes to the store path `sp` (a package named `pname`).
/// `style` picks which few kinds of directories a store path has (real
/// packages have a handful, not all of them).
fn add_file(
    plan: &mut Plan,
    rng: &mut Rng,
    (sp, pname, style): (&str, &str, u64),
    size: u64,
    index: u64,
) {
    let seed = rng.next();
    let w1 = rng.word();
    let w2 = rng.word();
    let ext = rng.pick(TEXT_EXTENSIONS);
    let roll = match size {
        0 => 50,
        s if s > 4 * MIB => 20,
        _ => rng.below(100),
    };
    let (dir, name, exec, content) = if index % 300 == 150 {
        let len = NAME_MAX - (index / 300 % 40) as usize;
        let name = long_name(rng, len);
        (format!("share/doc/{pname}"), name, false, Content::Text)
    } else {
        match roll {
            0..=11 => ("bin".into(), format!("{pname}-{w1}"), true, Content::Elf),
            12..=17 => (
                if roll % 2 == 0 {
                    "bin".into()
                } else {
                    format!("libexec/{pname}")
                },
                w1.to_string(),
                true,
                Content::Text,
            ),
            18..=35 => {
                let dir = match rng.below(3) {
                    0 => "lib".to_string(),
                    1 => format!("lib/{pname}"),
                    _ => format!("lib/{pname}/plugins/{}", rng.pick(&SUBDIRS[..2])),
                };
                (
                    dir,
                    format!("lib{w1}.so.{}", rng.below(8)),
                    true,
                    Content::Elf,
                )
            }
            36..=69 => {
                let d1 = rng.pick(&SUBDIRS[..4]);
                let d2 = rng.pick(&SUBDIRS[4..6]);
                let d3 = rng.pick(&SUBDIRS[6..]);
                let dir = match (style >> (3 * rng.below(2))) % 6 {
                    0 => format!("lib/python3.11/site-packages/{pname}/{d1}/{d2}"),
                    1 => format!("share/{pname}/{d1}/{d2}/{d3}"),
                    2 => format!("include/{pname}/{d1}"),
                    3 => format!("share/man/man{}", [1, 5, 8][rng.below(3) as usize]),
                    4 => format!("lib/perl5/site_perl/5.38/{d1}/{d2}"),
                    _ => format!("share/doc/{pname}"),
                };
                (dir, format!("{w1}_{w2}.{ext}"), false, Content::Text)
            }
            70..=77 => (
                format!(
                    "share/locale/{}/LC_MESSAGES",
                    LOCALES[((style >> 8) + rng.below(2)) as usize % LOCALES.len()]
                ),
                format!("{pname}-{w1}.mo"),
                false,
                Content::Text,
            ),
            78..=90 => (
                format!("lib/{pname}"),
                format!("lib{w1}.a"),
                false,
                Content::Elf,
            ),
            _ => {
                let (dir, ext) = match rng.below(3) {
                    0 => ("share/icons/hicolor/48x48/apps".to_string(), "png"),
                    1 => (format!("share/{pname}/{}", rng.pick(SUBDIRS)), "gz"),
                    _ => (format!("lib/{pname}/{}", rng.pick(SUBDIRS)), "zip"),
                };
                (dir, format!("{w1}.{ext}"), false, Content::Random)
            }
        }
    };
    let path = plan.claim_free(&format!("{sp}/{dir}"), &name);
    plan.files.push(FilePlan {
        path,
        size,
        exec,
        content,
        seed,
    });
}

/// `to` (relative to the store) as seen from the directory `from_dir`.
fn relative(from_dir: &str, to: &str) -> String {
    let from: Vec<&str> = from_dir.split('/').collect();
    let to: Vec<&str> = to.split('/').collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut parts: Vec<&str> = vec![".."; from.len() - common];
    parts.extend(&to[common..]);
    parts.join("/")
}

fn plan(spec: &Spec) -> Result<Plan> {
    if spec.files == 0 && spec.bytes > 0 {
        bail!("cannot put {} bytes in zero files", spec.bytes);
    }
    let mut rng = Rng(spec.seed ^ 0x6e6f_6465_666c_6173);
    let mut plan = Plan::default();
    let count = spec.files.div_ceil(FILES_PER_STORE_PATH).max(1);
    // (store path, package name, is a single file)
    let mut paths: Vec<(String, &str, bool)> = Vec::new();
    let mut singles = 0;
    for i in 0..count {
        let pname = rng.pick(PACKAGES);
        let single = i > 0 && singles + 1 < spec.files && rng.below(30) == 0;
        let mut name = format!("{}-{pname}-{}", store_hash(&mut rng), version(&mut rng));
        if single {
            name.push_str(if rng.below(2) == 0 {
                ".patch"
            } else {
                ".tar.xz"
            });
            singles += 1;
        } else if rng.below(4) == 0 {
            name = format!("{name}-{}", rng.pick(OUTPUTS));
        }
        paths.push((name, pname, single));
    }
    let sizes = file_sizes(&mut rng, spec.files, spec.bytes);
    let dir_paths = paths.iter().filter(|p| !p.2).count();
    let weights: Vec<u64> = (0..dir_paths).map(|_| log_weight(&mut rng, 1, 8)).collect();
    let mut per_dir_path = scale(&weights, spec.files - singles).into_iter();
    let mut size_iter = sizes.into_iter();
    let mut index = 0;
    let mut per_path: Vec<Vec<usize>> = Vec::new();
    for (sp, pname, single) in &paths {
        plan.store_paths.push(sp.clone());
        let first = plan.files.len();
        if *single {
            let size = size_iter.next().unwrap_or(0);
            plan.taken.insert(sp.clone());
            let content = if sp.ends_with(".patch") {
                Content::Text
            } else {
                Content::Random
            };
            let seed = rng.next();
            plan.files.push(FilePlan {
                path: sp.clone(),
                size,
                exec: false,
                content,
                seed,
            });
            index += 1;
        } else {
            plan.dirs.insert(sp.clone());
            let style = rng.next();
            for _ in 0..per_dir_path.next().unwrap_or(0) {
                let size = size_iter.next().unwrap_or(0);
                add_file(&mut plan, &mut rng, (sp, pname, style), size, index);
                index += 1;
            }
        }
        per_path.push((first..plan.files.len()).collect());
    }
    add_links(&mut plan, &mut rng, &paths, &per_path);
    Ok(plan)
}

/// About one symlink per six files of each directory store path: relative
/// ones inside it, absolute ones into other store paths, and dangling ones.
fn add_links(
    plan: &mut Plan,
    rng: &mut Rng,
    paths: &[(String, &str, bool)],
    per_path: &[Vec<usize>],
) {
    let mut kind = 0u64;
    for (i, (sp, pname, single)) in paths.iter().enumerate() {
        if *single {
            continue;
        }
        let own = &per_path[i];
        let links = own.len() as u64 / 6 + rng.below(2);
        for _ in 0..links {
            let w = rng.word();
            let (dir, name, target) = match kind % 6 {
                0..=2 if !own.is_empty() => {
                    let file = &plan.files[own[rng.below(own.len() as u64) as usize]].path;
                    let (fdir, fname) = file.rsplit_once('/').unwrap_or((sp, file));
                    let dir = match kind % 3 {
                        0 => fdir.to_string(),
                        1 => format!("{sp}/bin"),
                        _ => format!("{sp}/share/{pname}/links"),
                    };
                    let name = format!("{w}-{}", fname.split('.').next().unwrap_or(fname));
                    let target = relative(&dir, file);
                    (dir, name, target)
                }
                0..=4 => {
                    let other = rng.below(paths.len() as u64) as usize;
                    let theirs = &per_path[other];
                    let target = if !theirs.is_empty() && rng.below(4) > 0 {
                        plan.files[theirs[rng.below(theirs.len() as u64) as usize]]
                            .path
                            .clone()
                    } else {
                        paths[other].0.clone()
                    };
                    (
                        format!("{sp}/lib"),
                        format!("{w}-{}", paths[other].1),
                        format!("/nix/store/{target}"),
                    )
                }
                _ => {
                    let target = if kind % 12 == 5 {
                        format!("missing-{}.conf", rng.word())
                    } else {
                        format!(
                            "/nix/store/{}-{pname}-missing/lib/lib{w}.so",
                            store_hash(rng)
                        )
                    };
                    (format!("{sp}/share/{pname}"), format!("{w}-old"), target)
                }
            };
            kind += 1;
            let path = plan.claim_free(&dir, &name);
            plan.links.push((path, target));
        }
    }
}

fn text(rng: &mut Rng, out: &mut Vec<u8>, len: usize) {
    let end = out.len() + len;
    while out.len() < end {
        let r = rng.next();
        let indent = [0, 0, 2, 4, 4, 8][(r % 6) as usize];
        out.resize(out.len() + indent, b' ');
        let words = 3 + (r >> 8) % 10;
        let mut bits = rng.next();
        for i in 0..words {
            if i > 0 {
                out.push(b' ');
            }
            if i % 8 == 7 {
                bits = rng.next();
            }
            out.extend_from_slice(WORDS[(bits & 0xff) as usize % WORDS.len()].as_bytes());
            bits >>= 8;
        }
        out.extend_from_slice(
            PUNCTUATION[((r >> 16) % PUNCTUATION.len() as u64) as usize].as_bytes(),
        );
        out.push(b'\n');
    }
    out.truncate(end);
}

/// An ELF header, then code from a small per-file instruction set, symbol
/// names and a symbol table.
fn elf(rng: &mut Rng, out: &mut Vec<u8>, len: usize) {
    let start = out.len();
    let end = start + len;
    out.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0\x03\0\x3e\0\x01\0\0\0");
    out.resize(start + 64, 0);
    let mut dict: Vec<(Vec<u8>, bool)> = Vec::new();
    for _ in 0..64 {
        let n = 1 + rng.below(6) as usize;
        let mut ins = vec![OPCODES[rng.below(OPCODES.len() as u64) as usize]];
        ins.extend((1..n).map(|_| rng.next() as u8));
        dict.push((ins, rng.below(10) < 3));
    }
    let code_end = start + len * 6 / 10;
    while out.len() < code_end {
        let r = rng.next();
        let (ins, imm) = &dict[((r & 63).min((r >> 6) & 63)) as usize];
        out.extend_from_slice(ins);
        if *imm {
            let v = match (r >> 12) & 3 {
                0 => (r >> 16) & 0xff,
                1 | 2 => (r >> 16) & 0xfff,
                _ => r >> 32,
            } as u32;
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    let strings_end = start + len * 8 / 10;
    while out.len() < strings_end {
        out.extend_from_slice(b"_ZN");
        for _ in 0..2 + rng.below(3) {
            let w = rng.word();
            out.extend_from_slice(w.len().to_string().as_bytes());
            out.extend_from_slice(w.as_bytes());
        }
        out.extend_from_slice(b"E\0");
    }
    let (mut name, mut addr) = (1u32, 0x1000u64);
    while out.len() < end {
        let r = rng.next();
        name += 5 + (r % 40) as u32;
        addr += 16 * (1 + (r >> 16) % 64);
        out.extend_from_slice(&name.to_le_bytes());
        out.push([0x12, 0x11, 0x22, 0x10][((r >> 8) % 4) as usize]);
        out.push(0);
        out.extend_from_slice(&(1 + ((r >> 10) % 14) as u16).to_le_bytes());
        out.extend_from_slice(&addr.to_le_bytes());
        out.extend_from_slice(&((r >> 32) % 2048).to_le_bytes());
    }
    out.truncate(end);
}

fn random(rng: &mut Rng, out: &mut Vec<u8>, len: usize) {
    let end = out.len() + len;
    while out.len() < end {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    out.truncate(end);
}

fn set_mtime_1(path: &Path) -> Result<()> {
    utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &TimeSpec::UTIME_OMIT,
        &TimeSpec::new(1, 0),
        UtimensatFlags::NoFollowSymlink,
    )
    .with_context(|| format!("cannot set the mtime of {}", path.display()))
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", path.display()))
}

/// Writes the synthetic store of `spec` into `out`, which must not exist or be empty.
pub fn generate(out: &Path, spec: &Spec) -> Result<Stats> {
    if out.exists() {
        let mut entries =
            fs::read_dir(out).with_context(|| format!("cannot read {}", out.display()))?;
        if entries.next().is_some() {
            bail!("{} is not empty", out.display());
        }
    } else {
        fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    }
    let plan = plan(spec)?;
    for dir in &plan.dirs {
        let path = out.join(dir);
        fs::create_dir(&path).with_context(|| format!("cannot create {}", path.display()))?;
    }
    let mut buf = Vec::new();
    for f in &plan.files {
        let mut rng = Rng(f.seed);
        buf.clear();
        let len = f.size as usize;
        match f.content {
            Content::Text => text(&mut rng, &mut buf, len),
            Content::Elf => elf(&mut rng, &mut buf, len),
            Content::Random => random(&mut rng, &mut buf, len),
        }
        let path = out.join(&f.path);
        let mode = if f.exec { 0o555 } else { 0o444 };
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        file.write_all(&buf)
            .with_context(|| format!("cannot write {}", path.display()))?;
        file.set_permissions(fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot set the mode of {}", path.display()))?;
        drop(file);
        set_mtime_1(&path)?;
    }
    for (link, target) in &plan.links {
        let path = out.join(link);
        symlink(target, &path)
            .with_context(|| format!("cannot create the symlink {}", path.display()))?;
        set_mtime_1(&path)?;
    }
    let mut dirs: Vec<&String> = plan.dirs.iter().collect();
    dirs.sort_by_key(|d| std::cmp::Reverse(d.matches('/').count()));
    for dir in dirs {
        let path = out.join(dir);
        set_mode(&path, 0o555)?;
        set_mtime_1(&path)?;
    }
    Ok(Stats {
        files: plan.files.len() as u64,
        dirs: plan.dirs.len() as u64,
        symlinks: plan.links.len() as u64,
        bytes: plan.files.iter().map(|f| f.size).sum(),
        store_paths: plan.store_paths.len() as u64,
    })
}

/// Removes a tree like `generate`'s, whose directories are read-only.
pub fn remove_tree(path: &Path) -> Result<()> {
    fn make_writable(dir: &Path) -> Result<()> {
        set_mode(dir, 0o755)?;
        for entry in fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
            let entry = entry.with_context(|| format!("cannot read {}", dir.display()))?;
            let kind = entry
                .file_type()
                .with_context(|| format!("cannot stat {}", entry.path().display()))?;
            if kind.is_dir() {
                make_writable(&entry.path())?;
            }
        }
        Ok(())
    }
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot stat {}", path.display())),
        Ok(m) if m.is_dir() => make_writable(path)?,
        Ok(_) => {}
    }
    fs::remove_dir_all(path).with_context(|| format!("cannot remove {}", path.display()))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::os::unix::fs::MetadataExt;
    use std::path::PathBuf;

    use sha2::{Digest, Sha256};

    use super::*;

    /// Every entry under `root`: kind, mode, mtime, and content hash or link target.
    fn snapshot(root: &Path) -> BTreeMap<String, String> {
        fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
            for entry in fs::read_dir(dir).expect("read dir") {
                let path = entry.expect("entry").path();
                let m = fs::symlink_metadata(&path).expect("stat");
                let rel = path
                    .strip_prefix(root)
                    .expect("under root")
                    .display()
                    .to_string();
                let head = format!("{:o} {}", m.mode() & 0o7777, m.mtime());
                let what = if m.is_dir() {
                    walk(root, &path, out);
                    format!("d {head}")
                } else if m.is_symlink() {
                    let target = fs::read_link(&path).expect("readlink");
                    format!("l {head} {}", target.display())
                } else {
                    let hash = Sha256::digest(fs::read(&path).expect("read"));
                    format!("f {head} {} {}", m.len(), hex::encode(hash))
                };
                out.insert(rel, what);
            }
        }
        let mut out = BTreeMap::new();
        walk(root, root, &mut out);
        out
    }

    /// A generated store in a temporary directory, removed on drop (its
    /// directories are read-only, which `TempDir` cannot remove unless root).
    struct Generated {
        _tmp: tempfile::TempDir,
        out: PathBuf,
    }

    impl Drop for Generated {
        fn drop(&mut self) {
            let _ = remove_tree(&self.out);
        }
    }

    fn generated(spec: &Spec) -> (Generated, PathBuf, Stats) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let out = tmp.path().join("store");
        let stats = generate(&out, spec).expect("generate");
        (
            Generated {
                _tmp: tmp,
                out: out.clone(),
            },
            out,
            stats,
        )
    }

    const QEMU: Spec = Spec {
        files: 300,
        bytes: 8 << 20,
        seed: 1,
    };

    #[test]
    fn same_spec_same_tree() {
        let (_a, a, sa) = generated(&QEMU);
        let (_b, b, sb) = generated(&QEMU);
        assert_eq!(sa, sb);
        let (snap_a, snap_b) = (snapshot(&a), snapshot(&b));
        assert!(snap_a.len() > 300);
        assert_eq!(snap_a, snap_b);
        remove_tree(&a).expect("remove");
        assert!(!a.exists());
    }

    #[test]
    fn other_seed_other_tree() {
        let (_a, a, _) = generated(&QEMU);
        let (_b, b, _) = generated(&Spec { seed: 2, ..QEMU });
        let (snap_a, snap_b) = (snapshot(&a), snapshot(&b));
        assert!(snap_a.keys().all(|k| !snap_b.contains_key(k)));
    }

    #[test]
    fn counts_modes_times_and_links_are_as_nix_leaves_them() {
        let spec = Spec {
            files: 2000,
            bytes: 40 << 20,
            seed: 7,
        };
        let (_t, out, stats) = generated(&spec);
        let snap = snapshot(&out);
        let kinds = |k: char| snap.values().filter(|v| v.starts_with(k)).count() as u64;
        assert_eq!(stats.files, 2000);
        assert_eq!(stats.bytes, 40 << 20);
        assert_eq!(kinds('f'), stats.files);
        assert_eq!(kinds('d'), stats.dirs);
        assert_eq!(kinds('l'), stats.symlinks);
        assert_eq!(stats.store_paths, 50);
        let mut total = 0;
        let (mut empty, mut large, mut exec) = (0, 0, 0);
        for (path, v) in &snap {
            let f: Vec<&str> = v.split(' ').collect();
            assert_eq!(f[2], "1", "mtime of {path}");
            match f[0] {
                "d" => assert_eq!(f[1], "555", "{path}"),
                "f" => {
                    assert!(f[1] == "444" || f[1] == "555", "{path}: {}", f[1]);
                    exec += u64::from(f[1] == "555");
                    let len: u64 = f[3].parse().expect("size");
                    total += len;
                    empty += u64::from(len == 0);
                    large += u64::from(len > 4 << 20);
                }
                _ => {}
            }
        }
        assert_eq!(total, spec.bytes);
        assert!(
            empty >= 1 && large >= 1 && exec >= 1,
            "{empty} {large} {exec}"
        );
        let names: Vec<&str> = snap
            .keys()
            .map(|k| k.rsplit('/').next().unwrap_or(k))
            .collect();
        assert!(names.iter().all(|n| n.len() <= 255));
        assert!(names.iter().any(|n| n.len() == 255));
        let store_path = |s: &str| {
            let (hash, rest) = s.split_at(32);
            hash.bytes().all(|c| NIX_BASE32.contains(&c)) && rest.starts_with('-')
        };
        assert!(snap
            .keys()
            .filter(|k| !k.contains('/'))
            .all(|k| store_path(k)));
        let (mut relative, mut absolute, mut dangling) = (0, 0, 0);
        for (path, v) in snap.iter().filter(|(_, v)| v.starts_with('l')) {
            let target = v.splitn(4, ' ').nth(3).expect("target");
            let resolved = if let Some(abs) = target.strip_prefix("/nix/store/") {
                absolute += 1;
                assert!(store_path(abs), "{path} -> {target}");
                out.join(abs)
            } else {
                relative += 1;
                out.join(path).parent().expect("parent").join(target)
            };
            dangling += u64::from(!resolved.exists());
        }
        assert!(
            relative > 0 && absolute > 0 && dangling > 0,
            "{relative} {absolute} {dangling}"
        );
    }

    #[test]
    fn small_specs() {
        for files in [0, 1, 2, 19] {
            let spec = Spec {
                files,
                bytes: files * 100,
                seed: 3,
            };
            let (_t, _, stats) = generated(&spec);
            assert_eq!((stats.files, stats.bytes), (files, files * 100));
        }
        assert!(generate(
            Path::new("/nonexistent-dir/x"),
            &Spec {
                files: 0,
                bytes: 1,
                seed: 0
            }
        )
        .is_err());
    }

    #[test]
    fn refuses_a_non_empty_directory() {
        let tmp = tempfile::tempdir().expect("tempdir");
        fs::write(tmp.path().join("x"), "x").expect("write");
        let err = generate(tmp.path(), &QEMU).expect_err("not empty");
        assert!(err.to_string().contains("is not empty"), "{err}");
    }
}

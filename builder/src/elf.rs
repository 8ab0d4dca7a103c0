//! The shared libraries that programs need, found from their ELF
//! `PT_INTERP` and `DT_NEEDED` entries inside a sysroot of extracted Debian
//! packages (never from the host's libraries or `ldd`).

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsString;
use std::fs::File;
use std::path::{Component, Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use object::elf::{FileHeader32, FileHeader64, DT_NEEDED, DT_NULL, DT_RPATH, DT_RUNPATH};
use object::read::elf::{Dyn, FileHeader, ProgramHeader};
use object::read::{ReadCache, ReadRef};
use object::{Endianness, FileKind};

/// Where libraries are looked for in the sysroot, in this order.
const LIB_DIRS: [&str; 5] = [
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/lib",
    "/usr/lib",
];

/// Where every library is placed in the image.
const IMAGE_LIB_DIR: &str = "/lib/x86_64-linux-gnu";

/// How many symbolic links one path may go through (as Linux's `ELOOP`).
const MAX_LINKS: usize = 40;

/// The dynamic-linking facts of one ELF file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ElfDeps {
    /// The program interpreter (`PT_INTERP`), e.g. `/lib64/ld-linux-x86-64.so.2`.
    pub interp: Option<String>,
    /// The `DT_NEEDED` entries, in order.
    pub needed: Vec<String>,
    /// The `DT_RUNPATH` directories, or the `DT_RPATH` ones if there is no
    /// `DT_RUNPATH` (as the dynamic linker does).
    pub runpath: Vec<String>,
}

/// Reads `PT_INTERP` and `DT_NEEDED`/`DT_RUNPATH`/`DT_RPATH` of an ELF file.
/// A static binary gives `interp` `None` and `needed` empty.
pub fn read_deps(path: &Path) -> Result<ElfDeps> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let data = ReadCache::new(file);
    let deps = match FileKind::parse(&data) {
        Ok(FileKind::Elf32) => elf_deps::<FileHeader32<Endianness>, _>(&data),
        Ok(FileKind::Elf64) => elf_deps::<FileHeader64<Endianness>, _>(&data),
        _ => bail!("{} is not an elf file", path.display()),
    };
    deps.with_context(|| format!("cannot read {} as an elf file", path.display()))
}

fn elf_deps<'data, Elf, R>(data: R) -> Result<ElfDeps>
where
    Elf: FileHeader<Endian = Endianness>,
    R: ReadRef<'data>,
{
    let header = Elf::parse(data)?;
    let endian = header.endian()?;
    let mut deps = ElfDeps::default();
    for segment in header.program_headers(endian, data)? {
        if let Some(interp) = segment.interpreter(endian, data)? {
            deps.interp = Some(String::from_utf8_lossy(interp).into_owned());
        }
    }
    let sections = header.sections(endian, data)?;
    let Some((entries, strings_index)) = sections.dynamic(endian, data)? else {
        return Ok(deps);
    };
    let strings = sections.strings(endian, data, strings_index)?;
    let mut rpath = Vec::new();
    for entry in entries {
        let string = || -> Result<String> {
            let offset = entry.val32(endian).context("bad dynamic string offset")?;
            let bytes = strings
                .get(offset)
                .map_err(|()| anyhow!("bad dynamic string offset {offset}"))?;
            Ok(String::from_utf8_lossy(bytes).into_owned())
        };
        let tag = entry.tag32(endian);
        if tag == Some(DT_NULL) {
            break;
        }
        let list = match tag {
            Some(DT_NEEDED) => {
                deps.needed.push(string()?);
                continue;
            }
            Some(DT_RUNPATH) => &mut deps.runpath,
            Some(DT_RPATH) => &mut rpath,
            _ => continue,
        };
        let dirs = string()?;
        list.extend(dirs.split(':').filter(|d| !d.is_empty()).map(String::from));
    }
    if deps.runpath.is_empty() {
        deps.runpath = rpath;
    }
    Ok(deps)
}

/// A file to put into the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFile {
    /// Absolute path in the image.
    pub image_path: PathBuf,
    /// The real file on the host, symlinks resolved.
    pub source: PathBuf,
}

/// The libraries (and the program interpreter) that `binaries` need,
/// transitively, found in `sysroot` under the `DT_RUNPATH` (or `DT_RPATH`)
/// directories of the object that needs them (re-rooted at the sysroot;
/// entries with `$ORIGIN` and the like are ignored), then under
/// `lib/x86_64-linux-gnu`, `usr/lib/x86_64-linux-gnu`, `lib64`, `lib`,
/// `usr/lib`. Each library is placed at `/lib/x86_64-linux-gnu/<soname>` in
/// the image; the interpreter at its `PT_INTERP` path (e.g.
/// `/lib64/ld-linux-x86-64.so.2`). Sorted by `image_path`, no duplicates.
/// `binaries` are host paths (they may live outside the sysroot) and are not
/// part of the result.
///
/// A missing library is an error: "libfoo.so.1, needed by <binary or
/// library path>, is not in <sysroot>".
pub fn closure(sysroot: &Path, binaries: &[PathBuf]) -> Result<Vec<ImageFile>> {
    let mut files = BTreeMap::new();
    let mut todo: VecDeque<PathBuf> = binaries.iter().cloned().collect();
    while let Some(object) = todo.pop_front() {
        let deps = read_deps(&object)?;
        if let Some(interp) = &deps.interp {
            if let Entry::Vacant(entry) = files.entry(PathBuf::from(interp)) {
                let source = find_file(sysroot, entry.key())?.with_context(|| {
                    format!(
                        "{interp}, the interpreter of {}, is not in {}",
                        object.display(),
                        sysroot.display()
                    )
                })?;
                entry.insert(source);
            }
        }
        let runpath = deps
            .runpath
            .iter()
            .filter(|d| d.starts_with('/') && !d.contains('$'))
            .map(String::as_str);
        let dirs: Vec<&str> = runpath.chain(LIB_DIRS).collect();
        for name in &deps.needed {
            let image_path = Path::new(IMAGE_LIB_DIR).join(name);
            if files.contains_key(&image_path) {
                continue;
            }
            let mut source = None;
            for dir in &dirs {
                source = find_file(sysroot, &Path::new(dir).join(name))?;
                if source.is_some() {
                    break;
                }
            }
            let source = source.with_context(|| {
                format!(
                    "{name}, needed by {}, is not in {}",
                    object.display(),
                    sysroot.display()
                )
            })?;
            files.insert(image_path, source.clone());
            todo.push_back(source);
        }
    }
    let files = files.into_iter();
    Ok(files
        .map(|(image_path, source)| ImageFile { image_path, source })
        .collect())
}

/// Resolves `path` (absolute, as seen inside sysroot) to a real file on the
/// host, following symlinks inside the sysroot: an absolute link target is
/// re-rooted at the sysroot and `..` stops at the sysroot, as in a chroot.
pub fn resolve_in(sysroot: &Path, path: &Path) -> Result<PathBuf> {
    lookup(sysroot, path)?
        .with_context(|| format!("{} is not in {}", path.display(), sysroot.display()))
}

/// [`resolve_in`] for a regular file, `None` if there is none at `path`.
fn find_file(sysroot: &Path, path: &Path) -> Result<Option<PathBuf>> {
    Ok(lookup(sysroot, path)?.filter(|p| p.is_file()))
}

/// [`resolve_in`], `None` if `path` does not exist.
fn lookup(sysroot: &Path, path: &Path) -> Result<Option<PathBuf>> {
    /// The components still to walk, the next one last.
    fn parts(path: &Path) -> impl Iterator<Item = OsString> + '_ {
        path.components().rev().filter_map(|c| match c {
            Component::Normal(name) => Some(name.to_owned()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
    }
    let mut todo: Vec<OsString> = parts(path).collect();
    let mut inside = PathBuf::new();
    let mut links = 0;
    while let Some(part) = todo.pop() {
        if part == ".." {
            inside.pop();
            continue;
        }
        let host = sysroot.join(&inside).join(&part);
        let meta = match std::fs::symlink_metadata(&host) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot stat {}", host.display())),
        };
        if meta.file_type().is_symlink() {
            links += 1;
            if links > MAX_LINKS {
                bail!(
                    "too many symbolic links resolving {} in {}",
                    path.display(),
                    sysroot.display()
                );
            }
            let target = std::fs::read_link(&host)
                .with_context(|| format!("cannot read symbolic link {}", host.display()))?;
            if target.has_root() {
                inside = PathBuf::new();
            }
            todo.extend(parts(&target));
        } else if meta.is_dir() || todo.is_empty() {
            inside.push(part);
        } else {
            return Ok(None); // a file used as a directory
        }
    }
    Ok(Some(sysroot.join(inside)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    const INTERP: &str = "/lib64/ld-linux-x86-64.so.2";

    fn exe() -> PathBuf {
        std::env::current_exe().expect("current_exe")
    }

    fn mkdirs(path: &Path) {
        std::fs::create_dir_all(path).expect("create_dir_all");
    }

    /// A sysroot holding the libraries the test executable needs, copied
    /// from the host: libc as `libc-real.so` behind a relative symlink, the
    /// interpreter behind an absolute symlink, other libraries under
    /// `usr/lib/x86_64-linux-gnu`. Returns it with the expected closure.
    fn make_sysroot() -> (tempfile::TempDir, Vec<ImageFile>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let lib = root.join("lib/x86_64-linux-gnu");
        let usr_lib = root.join("usr/lib/x86_64-linux-gnu");
        mkdirs(&lib);
        mkdirs(&usr_lib);
        mkdirs(&root.join("lib64"));
        let host = closure(Path::new("/"), &[exe()]).expect("host closure");
        let mut expected = Vec::new();
        for file in host {
            let name = file.image_path.file_name().expect("file name");
            let source = if file.image_path == Path::new(INTERP) {
                symlink(
                    "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
                    root.join("lib64/ld-linux-x86-64.so.2"),
                )
                .expect("symlink interpreter");
                lib.join("ld-linux-x86-64.so.2")
            } else if name == "libc.so.6" {
                std::fs::copy(&file.source, lib.join("libc-real.so")).expect("copy libc");
                symlink("libc-real.so", lib.join("libc.so.6")).expect("symlink libc");
                lib.join("libc-real.so")
            } else if name == "ld-linux-x86-64.so.2" {
                std::fs::copy(&file.source, lib.join(name)).expect("copy ld.so");
                lib.join(name)
            } else {
                std::fs::copy(&file.source, usr_lib.join(name)).expect("copy library");
                usr_lib.join(name)
            };
            expected.push(ImageFile {
                image_path: file.image_path,
                source,
            });
        }
        (dir, expected)
    }

    #[test]
    fn read_deps_of_test_executable() {
        let deps = read_deps(&exe()).expect("read_deps");
        assert_eq!(deps.interp.as_deref(), Some(INTERP));
        assert!(deps.needed.iter().any(|n| n == "libc.so.6"), "{deps:?}");
    }

    #[test]
    fn read_deps_without_dynamic_section() {
        use object::write::Object;
        use object::{Architecture, BinaryFormat};
        let dir = tempfile::tempdir().expect("tempdir");
        let obj = Object::new(BinaryFormat::Elf, Architecture::X86_64, Endianness::Little);
        let path = dir.path().join("static.o");
        std::fs::write(&path, obj.write().expect("write elf")).expect("write file");
        assert_eq!(read_deps(&path).expect("read_deps"), ElfDeps::default());

        let script = dir.path().join("script");
        std::fs::write(&script, "#!/bin/sh\n").expect("write script");
        let err = read_deps(&script).expect_err("not elf").to_string();
        assert!(
            err.contains("script") && err.contains("not an elf file"),
            "{err}"
        );
    }

    #[test]
    fn closure_against_host_root() {
        let binaries = [exe(), PathBuf::from("/bin/sh")];
        let files = closure(Path::new("/"), &binaries).expect("closure");
        let paths: Vec<&Path> = files.iter().map(|f| f.image_path.as_path()).collect();
        assert!(paths.contains(&Path::new("/lib/x86_64-linux-gnu/libc.so.6")));
        assert!(paths.contains(&Path::new(INTERP)));
        assert!(paths.windows(2).all(|w| w[0] < w[1]), "{paths:?}");
        for file in &files {
            let meta = std::fs::symlink_metadata(&file.source).expect("stat source");
            assert!(meta.is_file(), "{file:?}");
        }
    }

    #[test]
    fn closure_in_constructed_sysroot() {
        let (dir, expected) = make_sysroot();
        let files = closure(dir.path(), &[exe()]).expect("closure");
        assert_eq!(files, expected);
        assert!(files.iter().any(|f| f.source.ends_with("libc-real.so")));
    }

    #[test]
    fn closure_missing_library() {
        let (dir, _) = make_sysroot();
        std::fs::remove_file(dir.path().join("lib/x86_64-linux-gnu/libc.so.6")).expect("rm libc");
        let err = closure(dir.path(), &[exe()]).expect_err("libc is missing");
        let want = format!(
            "libc.so.6, needed by {}, is not in {}",
            exe().display(),
            dir.path().display()
        );
        assert_eq!(err.to_string(), want);
    }

    #[test]
    fn symlink_loop_is_an_error() {
        let (dir, _) = make_sysroot();
        let lib = dir.path().join("lib/x86_64-linux-gnu");
        std::fs::remove_file(lib.join("libc.so.6")).expect("rm libc");
        symlink("libc-loop.so", lib.join("libc.so.6")).expect("symlink");
        symlink("/lib/x86_64-linux-gnu/libc.so.6", lib.join("libc-loop.so")).expect("symlink");
        let err = closure(dir.path(), &[exe()]).expect_err("loop");
        assert!(err.to_string().contains("too many symbolic links"), "{err}");
        let err = resolve_in(dir.path(), Path::new("/lib/x86_64-linux-gnu/libc.so.6"));
        assert!(err.is_err());
    }

    #[test]
    fn resolve_in_stays_inside_sysroot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        mkdirs(&root.join("etc"));
        mkdirs(&root.join("lib"));
        std::fs::write(root.join("etc/hostname"), "inside\n").expect("write");
        symlink("../../../../../../etc/hostname", root.join("lib/up")).expect("symlink");
        symlink("/etc/hostname", root.join("lib/abs")).expect("symlink");
        symlink("/etc/passwd", root.join("lib/host-only")).expect("symlink");
        let inside = root.join("etc/hostname");
        for link in ["/lib/up", "/lib/abs", "lib/../lib/./abs"] {
            let got = resolve_in(root, Path::new(link)).expect("resolve");
            assert_eq!(got, inside, "{link}");
        }
        let err = resolve_in(root, Path::new("/lib/host-only")).expect_err("not in sysroot");
        assert!(err.to_string().contains("/lib/host-only"), "{err}");
        assert!(resolve_in(root, Path::new("/etc/hostname/x")).is_err());
    }
}

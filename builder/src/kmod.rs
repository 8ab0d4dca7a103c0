//! Kernel module dependency resolution from the `.modinfo` section of each
//! `.ko` file, for kernel trees that ship without `modules.dep` (Debian's
//! linux-image packages).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use object::elf::FileHeader64;
use object::read::elf::{FileHeader, SectionHeader};
use object::read::ReadCache;
use object::Endianness;

/// What a module's `.modinfo` says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModInfo {
    /// The module name, normalized (`-` replaced with `_`).
    pub name: String,
    /// Modules that must be loaded first (`depends=`), normalized.
    pub depends: Vec<String>,
    /// Optional modules or aliases to load first (`softdep=pre: ...`), normalized.
    pub softdep_pre: Vec<String>,
    /// Optional modules or aliases to load after it (`softdep=post: ...`), normalized.
    pub softdep_post: Vec<String>,
    /// Other names the module answers to (`alias=`), normalized.
    pub aliases: Vec<String>,
    /// Firmware files it may load (`firmware=`), relative to `/lib/firmware`.
    pub firmware: Vec<String>,
}

/// A module name or alias with `-` replaced by `_`, as modprobe compares them.
fn normalize(name: &str) -> String {
    name.trim().replace('-', "_")
}

/// Parses the raw bytes of a `.modinfo` section; `fallback_name` (the file
/// stem) is used when there is no `name=`. Names normalized.
pub fn parse_modinfo(section: &[u8], fallback_name: &str) -> ModInfo {
    let mut info = ModInfo::default();
    for entry in section.split(|&b| b == 0) {
        let entry = String::from_utf8_lossy(entry);
        let Some((key, value)) = entry.split_once('=') else {
            continue;
        };
        match key {
            "name" => info.name = normalize(value),
            "firmware" => info.firmware.push(value.trim().to_string()),
            "depends" => info.depends.extend(
                value
                    .split(',')
                    .filter(|d| !d.trim().is_empty())
                    .map(normalize),
            ),
            "softdep" => {
                // `pre: a b post: c`; words before any marker are ignored.
                let mut list = None;
                for word in value.split_whitespace() {
                    match word {
                        "pre:" => list = Some(&mut info.softdep_pre),
                        "post:" => list = Some(&mut info.softdep_post),
                        _ => {
                            if let Some(list) = list.as_mut() {
                                list.push(normalize(word));
                            }
                        }
                    }
                }
            }
            "alias" => info.aliases.push(normalize(value)),
            _ => {}
        }
    }
    if info.name.is_empty() {
        info.name = normalize(fallback_name);
    }
    info
}

/// Reads the `.modinfo` section of a `.ko` file, reading only the ELF
/// header, the section headers and the needed sections from disk.
pub fn read_modinfo(path: &Path) -> Result<ModInfo> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let data = ReadCache::new(file);
    let section = modinfo_section(&data)
        .with_context(|| format!("cannot read {} as a 64-bit elf file", path.display()))?;
    let section = section.with_context(|| format!("{} has no .modinfo section", path.display()))?;
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy())
        .unwrap_or_default();
    Ok(parse_modinfo(section, &stem))
}

/// The contents of the `.modinfo` section, if there is one.
fn modinfo_section(data: &ReadCache<File>) -> object::read::Result<Option<&[u8]>> {
    let header = FileHeader64::<Endianness>::parse(data)?;
    let endian = header.endian()?;
    let sections = header.sections(endian, data)?;
    match sections.section_by_name(endian, b".modinfo") {
        Some((_, section)) => Ok(Some(section.data(endian, data)?)),
        None => Ok(None),
    }
}

/// The modules of one kernel: their paths, what they depend on, their
/// aliases, and which modules are built into the kernel.
#[derive(Debug, Default)]
pub struct ModuleIndex {
    /// Module name -> (path relative to `lib/modules/<release>`, modinfo).
    modules: BTreeMap<String, (PathBuf, ModInfo)>,
    /// Alias -> names of the modules that provide it.
    aliases: BTreeMap<String, BTreeSet<String>>,
    /// Names of the modules built into the kernel.
    builtin: BTreeSet<String>,
}

impl ModuleIndex {
    /// Scans every `*.ko` below `root` (the `lib/modules/<release>` dir) with
    /// paths relative to root, and reads `root/modules.builtin` if present.
    pub fn scan(root: &Path) -> Result<Self> {
        let mut index = Self::default();
        index.add_tree(root, Path::new(""))?;
        let builtin = root.join("modules.builtin");
        if builtin.exists() {
            let text = std::fs::read_to_string(&builtin)
                .with_context(|| format!("cannot read {}", builtin.display()))?;
            for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
                let name = Path::new(line)
                    .file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default();
                index.add_builtin(name.strip_suffix(".ko").unwrap_or(&name));
            }
        }
        Ok(index)
    }

    /// Adds every `*.ko` below `dir`, recorded with relative path
    /// `prefix/<path relative to dir>` (used for out-of-tree ZFS modules
    /// placed under `extra/zfs`). A module name already present is an error
    /// naming both paths. Symbolic links are not followed.
    pub fn add_tree(&mut self, dir: &Path, prefix: &Path) -> Result<()> {
        let mut entries = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read directory {}", dir.display()))?
            .collect::<std::io::Result<Vec<_>>>()
            .with_context(|| format!("cannot read directory {}", dir.display()))?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            let rel = prefix.join(entry.file_name());
            let kind = entry
                .file_type()
                .with_context(|| format!("cannot stat {}", path.display()))?;
            if kind.is_dir() {
                self.add_tree(&path, &rel)?;
            } else if kind.is_file() && path.extension().is_some_and(|e| e == "ko") {
                let info = read_modinfo(&path)?;
                if let Some((other, _)) = self.modules.get(&info.name) {
                    bail!(
                        "module {} is both {} and {}",
                        info.name,
                        other.display(),
                        rel.display()
                    );
                }
                self.add(rel, info);
            }
        }
        Ok(())
    }

    /// Adds one module (for unit tests and for callers that already parsed
    /// it). A module of the same name is replaced.
    pub fn add(&mut self, rel_path: PathBuf, info: ModInfo) {
        for alias in &info.aliases {
            self.aliases
                .entry(alias.clone())
                .or_default()
                .insert(info.name.clone());
        }
        self.modules.insert(info.name.clone(), (rel_path, info));
    }

    /// Marks a name as built into the kernel.
    pub fn add_builtin(&mut self, name: &str) {
        self.builtin.insert(normalize(name));
    }

    /// The modules a name stands for: itself if it is a module, nothing if
    /// it is built in, else every module that has it as an alias (sorted).
    /// `None` if it is unknown.
    fn lookup(&self, name: &str) -> Option<Vec<&str>> {
        let name = normalize(name);
        if self.builtin.contains(&name) {
            Some(Vec::new())
        } else if let Some((key, _)) = self.modules.get_key_value(&name) {
            Some(vec![key.as_str()])
        } else {
            let providers = self.aliases.get(&name)?;
            Some(providers.iter().map(String::as_str).collect())
        }
    }

    /// The load order for `wanted` (module names or aliases): every module
    /// after all its `depends` and `softdep pre`, `softdep post` modules
    /// after it; built-in modules are skipped (they need no loading); each
    /// module once. Deterministic: a depth-first post-order walk following
    /// `wanted`, then for each module its softdep pre, depends and softdep
    /// post lists in order. Returns relative paths.
    ///
    /// A wanted name that is neither a module, an alias nor built in, a
    /// `depends` entry that is not found, and a cycle of `depends` are
    /// errors. Softdeps are optional: targets that are not found are
    /// skipped, and so is a softdep that would close a cycle.
    /// An alias that several modules provide (`crct10dif` -> generic and
    /// pclmul) brings all of them, sorted by name, so that a generic fallback
    /// is there when the CPU lacks the accelerated variant.
    pub fn resolve(&self, wanted: &[String]) -> Result<Vec<PathBuf>> {
        let mut walk = Walk {
            index: self,
            done: BTreeSet::new(),
            stack: Vec::new(),
            order: Vec::new(),
        };
        for name in wanted {
            let modules = self.lookup(name).with_context(|| {
                format!("{name} is neither a module, an alias nor built into the kernel")
            })?;
            for module in modules {
                walk.visit(module, false)?;
            }
        }
        Ok(walk.order)
    }

    /// Number of modules known (for messages).
    pub fn len(&self) -> usize {
        self.modules.len()
    }

    /// Whether no module is known.
    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }
}

/// The state of one [`ModuleIndex::resolve`] walk.
struct Walk<'a> {
    index: &'a ModuleIndex,
    /// Modules already in `order`.
    done: BTreeSet<&'a str>,
    /// Modules being visited, outermost first (to find and report cycles).
    stack: Vec<&'a str>,
    /// The load order so far.
    order: Vec<PathBuf>,
}

impl<'a> Walk<'a> {
    /// Adds `name` after what it needs. `soft`: reached through a softdep,
    /// so a cycle is broken here instead of being an error (e.g. `vfio` has
    /// `softdep post: vfio_iommu_type1`, which depends on `vfio`).
    fn visit(&mut self, name: &'a str, soft: bool) -> Result<()> {
        if self.done.contains(name) {
            return Ok(());
        }
        if let Some(start) = self.stack.iter().position(|&n| n == name) {
            if soft {
                return Ok(());
            }
            let mut cycle = self.stack[start..].to_vec();
            cycle.push(name);
            bail!("module dependency cycle: {}", cycle.join(" -> "));
        }
        let Some((path, info)) = self.index.modules.get(name) else {
            return Ok(());
        };
        self.stack.push(name);
        for dep in &info.softdep_pre {
            for module in self.index.lookup(dep).unwrap_or_default() {
                self.visit(module, true)?;
            }
        }
        for dep in &info.depends {
            let modules = self.index.lookup(dep).with_context(|| {
                format!("module {name} depends on {dep}, which is not a known module")
            })?;
            for module in modules {
                self.visit(module, false)?;
            }
        }
        self.stack.pop();
        self.done.insert(name);
        self.order.push(path.clone());
        for dep in &info.softdep_post {
            for module in self.index.lookup(dep).unwrap_or_default() {
                self.visit(module, true)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn module(name: &str, depends: &[&str], pre: &[&str], aliases: &[&str]) -> ModInfo {
        ModInfo {
            name: normalize(name),
            depends: depends.iter().map(|d| normalize(d)).collect(),
            softdep_pre: pre.iter().map(|d| normalize(d)).collect(),
            softdep_post: Vec::new(),
            aliases: aliases.iter().map(|d| normalize(d)).collect(),
            firmware: Vec::new(),
        }
    }

    /// Builds a relocatable x86_64 ELF file with the given `.modinfo` bytes.
    fn ko_bytes(modinfo: &[u8]) -> Vec<u8> {
        use object::write::Object;
        use object::{Architecture, BinaryFormat, SectionKind};
        let mut obj = Object::new(BinaryFormat::Elf, Architecture::X86_64, Endianness::Little);
        let text = obj.add_section(Vec::new(), b".text".to_vec(), SectionKind::Text);
        obj.append_section_data(text, &[0xc3], 1);
        let section = obj.add_section(Vec::new(), b".modinfo".to_vec(), SectionKind::ReadOnlyData);
        obj.append_section_data(section, modinfo, 1);
        obj.write().expect("writing a test elf file")
    }

    #[test]
    fn parse_modinfo_fields() {
        let info = parse_modinfo(
            b"version=1.0\0license=GPL\0softdep=pre: crct10dif\0depends=crct10dif_common,t10-pi\0\
              alias=crypto-crct10dif\0alias=crct10dif\0softdep=post: foo-bar pre: x\0name=crc_t10dif\0\
              firmware=rtl_nic/rtl8125a-3.fw\0\0",
            "ignored",
        );
        assert_eq!(
            info,
            ModInfo {
                name: "crc_t10dif".into(),
                depends: names(&["crct10dif_common", "t10_pi"]),
                softdep_pre: names(&["crct10dif", "x"]),
                softdep_post: names(&["foo_bar"]),
                aliases: names(&["crypto_crct10dif", "crct10dif"]),
                firmware: names(&["rtl_nic/rtl8125a-3.fw"]),
            }
        );
    }

    #[test]
    fn parse_modinfo_empty_depends_and_missing_name() {
        let info = parse_modinfo(b"depends=\0license=GPL\0", "nvme-core");
        assert_eq!(info.name, "nvme_core");
        assert!(info.depends.is_empty());
        assert!(info.softdep_pre.is_empty() && info.softdep_post.is_empty());
        assert!(parse_modinfo(b"", "a-b").aliases.is_empty());
    }

    #[test]
    fn read_modinfo_from_elf() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nvme-core.ko");
        std::fs::write(&path, ko_bytes(b"depends=t10-pi\0name=nvme_core\0"))
            .expect("writing test module");
        let info = read_modinfo(&path).expect("reading modinfo");
        assert_eq!(info.name, "nvme_core");
        assert_eq!(info.depends, names(&["t10_pi"]));

        let bad = dir.path().join("bad.ko");
        std::fs::write(&bad, b"not an elf file").expect("writing test file");
        let err = format!("{:#}", read_modinfo(&bad).expect_err("not elf"));
        assert!(err.contains("bad.ko"), "{err}");
    }

    /// The real NVMe chain of Debian's 6.1 kernel, plus a built-in module.
    fn nvme_index() -> ModuleIndex {
        let mut index = ModuleIndex::default();
        let mods = [
            ("kernel/lib/crc64.ko", module("crc64", &[], &[], &[])),
            (
                "kernel/lib/crc64-rocksoft.ko",
                module("crc64_rocksoft", &["crc64"], &["crc64"], &[]),
            ),
            (
                "kernel/crypto/crct10dif_common.ko",
                module("crct10dif_common", &[], &[], &[]),
            ),
            (
                "kernel/crypto/crct10dif_generic.ko",
                module(
                    "crct10dif_generic",
                    &["crct10dif_common"],
                    &[],
                    &["crct10dif", "crypto-crct10dif"],
                ),
            ),
            (
                "kernel/arch/x86/crypto/crct10dif-pclmul.ko",
                module(
                    "crct10dif_pclmul",
                    &["crct10dif_common"],
                    &[],
                    &["crct10dif", "crypto-crct10dif"],
                ),
            ),
            (
                "kernel/lib/crc-t10dif.ko",
                module("crc_t10dif", &["crct10dif_common"], &["crct10dif"], &[]),
            ),
            (
                "kernel/block/t10-pi.ko",
                module("t10_pi", &["crc-t10dif", "crc64-rocksoft"], &[], &[]),
            ),
            (
                "kernel/drivers/nvme/host/nvme-core.ko",
                module("nvme_core", &["t10-pi", "crc32c"], &["missing-soft"], &[]),
            ),
            (
                "kernel/drivers/nvme/host/nvme.ko",
                module("nvme", &["nvme-core"], &[], &[]),
            ),
        ];
        for (path, info) in mods {
            index.add(PathBuf::from(path), info);
        }
        index.add_builtin("crc32c");
        index
    }

    #[test]
    fn resolve_nvme_chain() {
        let index = nvme_index();
        assert_eq!(index.len(), 9);
        let order = index
            .resolve(&names(&["nvme", "crc64"]))
            .expect("resolving nvme");
        let expected = [
            "kernel/crypto/crct10dif_common.ko",
            "kernel/crypto/crct10dif_generic.ko",
            "kernel/arch/x86/crypto/crct10dif-pclmul.ko",
            "kernel/lib/crc-t10dif.ko",
            "kernel/lib/crc64.ko",
            "kernel/lib/crc64-rocksoft.ko",
            "kernel/block/t10-pi.ko",
            "kernel/drivers/nvme/host/nvme-core.ko",
            "kernel/drivers/nvme/host/nvme.ko",
        ];
        assert_eq!(order, expected.map(PathBuf::from));
        // Built-in wanted names need nothing; aliases bring every provider.
        assert!(index
            .resolve(&names(&["crc32c"]))
            .expect("builtin")
            .is_empty());
        assert_eq!(
            index
                .resolve(&names(&["crypto-crct10dif"]))
                .expect("alias")
                .len(),
            3
        );
    }

    #[test]
    fn resolve_softdep_post() {
        let mut index = ModuleIndex::default();
        let mut a = module("a", &[], &[], &[]);
        a.softdep_post = names(&["b", "nowhere"]);
        index.add("a.ko".into(), a);
        index.add("b.ko".into(), module("b", &["a"], &[], &[]));
        let order = index.resolve(&names(&["a"])).expect("resolving");
        assert_eq!(order, [PathBuf::from("a.ko"), PathBuf::from("b.ko")]);
    }

    #[test]
    fn resolve_unknown_wanted() {
        let err = nvme_index()
            .resolve(&names(&["nvme", "no_such_module"]))
            .expect_err("unknown name");
        assert!(err.to_string().contains("no_such_module"), "{err}");
    }

    #[test]
    fn resolve_missing_depends() {
        let mut index = ModuleIndex::default();
        index.add("a.ko".into(), module("a", &["gone"], &[], &[]));
        let err = index.resolve(&names(&["a"])).expect_err("missing depends");
        let msg = err.to_string();
        assert!(msg.contains("module a ") && msg.contains("gone"), "{msg}");
    }

    #[test]
    fn resolve_cycle() {
        let mut index = ModuleIndex::default();
        index.add("a.ko".into(), module("a", &["b"], &[], &[]));
        index.add("b.ko".into(), module("b", &["c"], &[], &[]));
        index.add("c.ko".into(), module("c", &["a"], &[], &[]));
        let err = index.resolve(&names(&["a"])).expect_err("cycle");
        assert!(err.to_string().contains("a -> b -> c -> a"), "{err}");

        // A softdep back to a module being resolved is not an error: vfio has
        // `softdep=post: vfio_iommu_type1`, which depends on vfio.
        let mut index = ModuleIndex::default();
        let mut vfio = module("vfio", &[], &[], &[]);
        vfio.softdep_post = names(&["vfio_iommu_type1"]);
        index.add("vfio.ko".into(), vfio);
        let type1 = module("vfio_iommu_type1", &["vfio"], &[], &[]);
        index.add("vfio_iommu_type1.ko".into(), type1);
        for wanted in ["vfio", "vfio_iommu_type1"] {
            let order = index.resolve(&names(&[wanted])).expect("softdep back edge");
            let expected = ["vfio.ko", "vfio_iommu_type1.ko"];
            assert_eq!(order, expected.map(PathBuf::from), "{wanted}");
        }
    }

    #[test]
    fn scan_tree() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let sub = root.join("kernel/drivers/nvme/host");
        std::fs::create_dir_all(&sub).expect("mkdir");
        std::fs::write(
            sub.join("nvme.ko"),
            ko_bytes(b"depends=nvme-core\0name=nvme\0"),
        )
        .expect("write nvme.ko");
        std::fs::write(sub.join("nvme-core.ko"), ko_bytes(b"depends=crc32c\0"))
            .expect("write nvme-core.ko");
        std::fs::write(sub.join("README"), b"not a module").expect("write README");
        std::fs::write(
            root.join("modules.builtin"),
            "kernel/crypto/crc32c_generic.ko\nkernel/lib/crc32c.ko\n",
        )
        .expect("write modules.builtin");

        let mut index = ModuleIndex::scan(root).expect("scan");
        assert_eq!(index.len(), 2);
        let order = index.resolve(&names(&["nvme"])).expect("resolve");
        assert_eq!(
            order,
            [
                PathBuf::from("kernel/drivers/nvme/host/nvme-core.ko"),
                PathBuf::from("kernel/drivers/nvme/host/nvme.ko"),
            ]
        );

        // Out-of-tree modules get the prefix; a duplicate name is an error.
        let extra = tempfile::tempdir().expect("tempdir");
        std::fs::write(extra.path().join("zfs.ko"), ko_bytes(b"name=zfs\0")).expect("write zfs.ko");
        index
            .add_tree(extra.path(), Path::new("extra/zfs"))
            .expect("add_tree");
        assert_eq!(
            index.resolve(&names(&["zfs"])).expect("resolve zfs"),
            [PathBuf::from("extra/zfs/zfs.ko")]
        );
        let err = index
            .add_tree(root, Path::new("again"))
            .expect_err("duplicate");
        let msg = err.to_string();
        assert!(
            msg.contains("kernel/drivers/nvme/host/nvme-core.ko")
                && msg.contains("again/kernel/drivers/nvme/host/nvme-core.ko"),
            "{msg}"
        );
    }
}

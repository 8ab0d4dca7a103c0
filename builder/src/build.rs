//! `nodeflash build`: a profile in, a bootable hybrid ISO out.
//!
//! inputs (cached) → module order → initramfs → EFI image → ISO. Every
//! artefact is cached under the image ID, the hash of everything the image
//! boots, so a build with nothing changed only checks hashes.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nodeflash_installer::image::{
    BootInfo, ImageInfo, Mode, PayloadInfo, CA_DIR, IMAGE_INFO_PATH, PAYLOAD_ISO_PATH,
    PROFILE_PATH, SYSTEMD_BOOT_PATH,
};
use nodeflash_installer::profile::{BootSystem, Profile};
use serde::{Deserialize, Serialize};

use crate::cache::{key_of, sha256_file, Cache};
use crate::debian::Debian;
use crate::efi::{write_fat_image, FatFile};
use crate::initramfs::{Initramfs, Source};
use crate::inputs::{BuildInputs, LockMode, PackageVersion, Provider};
use crate::kmod::ModuleIndex;
use crate::{elf, iso, steps, tools};
use nodeflash_installer::units::human_bytes;

/// Modules every image loads (their dependencies are resolved from
/// `.modinfo`): boot media, disks, common NICs and ZFS.
pub const DEFAULT_MODULES: &[&str] = &[
    // USB sticks and CDs
    "xhci_pci",
    "ehci_pci",
    "usb_storage",
    "uas",
    "sd_mod",
    "sr_mod",
    "isofs",
    // the target's ESP on /boot, and EFI variables, for a NixOS system's
    // own boot loader installation
    "vfat",
    "nls_cp437",
    "nls_ascii",
    "efivarfs",
    // target disks
    "crc64_rocksoft_generic",
    "nvme",
    "ahci",
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    // Intel VMD (the firmware's "RAID" mode hides NVMe drives behind it),
    // SAS/RAID HBAs, eMMC in mini PCs
    "vmd",
    "mpt3sas",
    "megaraid_sas",
    "sdhci_pci",
    "mmc_block",
    // network: on-board, the 10G cards homelabs buy second-hand, USB adapters
    "virtio_net",
    "e1000",
    "e1000e",
    "igb",
    "igc",
    "r8169",
    "tg3",
    "ixgbe",
    "i40e",
    "mlx4_en",
    "mlx5_core",
    "bnxt_en",
    "atlantic",
    "r8152",
    "ax88179_178a",
    "cdc_ether",
    // storage
    "zfs",
];

/// Compression of the initramfs. Part of the image ID: it changes the bytes.
const INITRD_ZSTD_LEVEL: i32 = 10;

/// Version of the way the initramfs, EFI image and ISO are written. Part of
/// the image ID, so cached artefacts are not reused across a change: bump it
/// whenever a writer's output changes (the reproducibility test catches a
/// forgotten bump: the rebuilt ISO then differs from the cached one).
const ARTEFACT_FORMAT: &str = "9";

/// The paths of the initramfs that change from one profile or installer to
/// the next: its second, small archive. The first (programs, libraries,
/// kernel modules, firmware) is compressed once per content and cached.
const INITRD_TOP: [&str; 3] = ["/init", "/etc/nodeflash", "/usr/lib/nodeflash"];

/// Writes the initramfs `fs` to `out` as two zstd archives back to back,
/// which the kernel unpacks in order: everything but [`INITRD_TOP`]
/// (compressed once per content: kind `initrd` of `stored`, keyed by its
/// content hash, shared by every profile and installer with the same
/// programs, modules and firmware), then the [`INITRD_TOP`] paths.
fn write_initrd(fs: &Initramfs, out: &Path, stored: &Stored) -> Result<()> {
    let (rest, top) = fs.split(&INITRD_TOP);
    let key = key_of([
        rest.content_hash(&[])?.as_str(),
        &INITRD_ZSTD_LEVEL.to_string(),
        ARTEFACT_FORMAT,
    ]);
    let base = stored("initrd", &format!("{key}.base.cpio.zst"), &|p| {
        rest.write_zstd(p, INITRD_ZSTD_LEVEL).map(drop)
    })?;
    std::fs::copy(&base, out)
        .with_context(|| format!("cannot copy {} to {}", base.display(), out.display()))?;
    let file = std::fs::OpenOptions::new()
        .append(true)
        .open(out)
        .with_context(|| format!("cannot open {}", out.display()))?;
    top.append_zstd(file, INITRD_ZSTD_LEVEL)
        .with_context(|| format!("cannot write {}", out.display()))
}

/// A file of the cache (kind, key), written by the function when missing.
type Stored<'a> = dyn Fn(&str, &str, &dyn Fn(&Path) -> Result<()>) -> Result<PathBuf> + 'a;

#[derive(Debug)]
pub struct BuildOptions {
    pub profile: PathBuf,
    /// The installer binary that becomes `/init`.
    pub installer: PathBuf,
    pub out_dir: PathBuf,
    pub cache: Cache,
    /// Take the initramfs, EFI image and ISO from the cache when their
    /// inputs are unchanged (false rebuilds them from the cached inputs).
    pub reuse_artifacts: bool,
    /// Whether the build may re-pin packages the archive has dropped and
    /// rewrite the lock (cargo's `--locked` is [`LockMode::Locked`]).
    pub lock_mode: LockMode,
}

/// What a build made; also written next to the ISO as `<profile>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BuildSummary {
    pub profile: String,
    pub iso: PathBuf,
    pub iso_bytes: u64,
    pub iso_sha256: String,
    pub image_id: String,
    pub kernel_release: String,
    pub initrd_bytes: u64,
    pub modules: usize,
    /// The packages the image was made from, with their exact versions.
    #[serde(default)]
    pub packages: Vec<PackageVersion>,
    /// Firmware files the image carries for its drivers, and their bytes.
    #[serde(default)]
    pub firmware_files: usize,
    #[serde(default)]
    pub firmware_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<PayloadInfo>,
    /// The profile's `[[nodes]]`.
    pub nodes: Vec<NodeSummary>,
    /// What a machine that matches no node becomes (`[default-node]`);
    /// none when such a machine is refused.
    pub default_node: Option<NodeSummary>,
    /// What the installed disk boots (`[boot]`), or that it boots nothing.
    #[serde(default)]
    pub boot: BootSummary,
    /// What the build found worth a warning (also printed on stderr), e.g.
    /// nodes that nobody can log in to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// What the installed disk will boot, from the profile's `[boot]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSummary {
    /// Whether the installer makes the disk bootable.
    pub bootable: bool,
    /// In words: the system and its boot loader, or why nothing boots.
    pub what: String,
}

impl BootSummary {
    /// The summary of a profile's `[boot]` (docs/profile.md, `[boot]`).
    pub fn of(profile: &Profile) -> Self {
        let Some(b) = &profile.boot else {
            return Self {
                bootable: false,
                what: "nothing: the disk will not boot, because the profile has no [boot] \
                       (no boot loader is written; see docs/flake.md)"
                    .into(),
            };
        };
        let what = match b.system {
            BootSystem::Nixos => match b.nixos_toplevel(&profile.payload) {
                Some(top) if !top.is_empty() => format!(
                    "the NixOS system {top}, whose own boot loader installation \
                     (switch-to-configuration boot) runs on the node"
                ),
                _ => "each node's own NixOS system from the flake, whose own boot loader \
                         installation (switch-to-configuration boot) runs on the node; a machine \
                         that matches no node is refused unless [default-node] has a `system`"
                    .into(),
            },
            BootSystem::Generic => format!(
                "systemd-boot, with the kernel {} and initrd {} of the store",
                b.kernel.as_deref().unwrap_or("?"),
                b.initrd.as_deref().unwrap_or("?")
            ),
            BootSystem::Check => {
                "systemd-boot, with nodeflash's check system (a test system that reports on the pool)"
                    .into()
            }
        };
        Self {
            bootable: true,
            what,
        }
    }
}

/// Who gets root's SSH access on a node: `[ssh]`'s users and inline keys,
/// and the node's own `keys`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootSsh {
    /// Users whose keys the node fetches from `key-url` when it installs.
    pub github_users: Vec<String>,
    /// Where each user's keys come from (`key-url` with `{user}` replaced),
    /// in the order of `github_users`.
    pub key_urls: Vec<String>,
    /// The inline keys, `[ssh] keys` then the node's `keys`.
    pub keys: Vec<KeySummary>,
}

impl RootSsh {
    /// Whether nobody gets access.
    pub fn is_nobody(&self) -> bool {
        self.github_users.is_empty() && self.keys.is_empty()
    }
}

/// An inline SSH key, as `ssh-keygen -l` names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeySummary {
    /// The key type, e.g. `ssh-ed25519`.
    pub kind: String,
    /// `SHA256:…`.
    pub fingerprint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

impl std::fmt::Display for KeySummary {
    /// `ssh-ed25519 SHA256:… comment`, as `ssh-keygen -l` puts it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.kind, self.fingerprint)?;
        match &self.comment {
            Some(c) => write!(f, " {c}"),
            None => Ok(()),
        }
    }
}

impl RootSsh {
    /// Root's access on a node with `node_keys` of its own. Keys that do not
    /// parse (the profile check refuses them) are left out.
    pub fn of(ssh: &nodeflash_installer::profile::Ssh, node_keys: &[String]) -> Self {
        let keys = ssh
            .keys
            .iter()
            .chain(node_keys)
            .filter_map(|k| nodeflash_installer::net::keys::parse_line(k, "").ok())
            .map(|k| KeySummary {
                fingerprint: k.fingerprint(),
                kind: k.kind,
                comment: k.comment,
            })
            .collect();
        Self {
            github_users: ssh.github_users.clone(),
            key_urls: ssh
                .github_users
                .iter()
                .map(|u| ssh.key_url.replace("{user}", u))
                .collect(),
            keys,
        }
    }
}

/// Warnings about a profile's nodes: those that nobody can log in to.
pub fn node_warnings(nodes: &[NodeSummary], default_node: Option<&NodeSummary>) -> Vec<String> {
    let nobody: Vec<&str> = nodes
        .iter()
        .chain(default_node)
        .filter(|n| n.root_ssh.is_nobody())
        .map(|n| n.name.as_str())
        .collect();
    if nobody.is_empty() {
        return Vec::new();
    }
    vec![format!(
        "nobody gets root SSH on {}: no one can log in to {} over SSH; \
         set `[ssh] github-users = [\"YOUR-GITHUB-USER\"]` or `keys = [\"ssh-ed25519 …\"]` in the profile",
        nobody.join(", "),
        if nobody.len() == 1 { "it" } else { "them" }
    )]
}

/// A node the image knows, with the host ID to put into its NixOS
/// configuration (`networking.hostId`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSummary {
    /// The host name (for the default node, its template).
    pub name: String,
    /// 8 hex digits, or `derive` / `random`: chosen on the machine, and
    /// printed on its console.
    pub hostid: String,
    /// Whether it has `match` rules, without which the stick never chooses it.
    pub recognisable: bool,
    /// Who gets root's SSH access on it.
    #[serde(default)]
    pub root_ssh: RootSsh,
}

impl NodeSummary {
    /// The nodes and the default node of a profile.
    pub fn of(profile: &Profile) -> (Vec<NodeSummary>, Option<NodeSummary>) {
        let nodes = profile
            .nodes
            .iter()
            .map(|n| NodeSummary {
                name: n.name.get_ref().to_string(),
                hostid: String::from(n.hostid),
                recognisable: n.matches != Default::default(),
                root_ssh: RootSsh::of(&profile.ssh, &n.keys),
            })
            .collect();
        let d = &profile.default_node;
        let default = d.install.then(|| NodeSummary {
            name: d.hostname.clone(),
            hostid: String::from(d.hostid),
            recognisable: true,
            root_ssh: RootSsh::of(&profile.ssh, &[]),
        });
        (nodes, default)
    }
}

/// Resolves `NAME` to `profiles/NAME.toml`, or takes a path as it is.
pub fn profile_path(name_or_path: &str, profiles_dir: &Path) -> PathBuf {
    if name_or_path.ends_with(".toml") || name_or_path.contains('/') {
        PathBuf::from(name_or_path)
    } else {
        profiles_dir.join(format!("{name_or_path}.toml"))
    }
}

/// [`profile_path`], with an error listing the profiles there when a
/// profile name has no file.
pub fn find_profile(name_or_path: &str, profiles_dir: &Path) -> Result<PathBuf> {
    let path = profile_path(name_or_path, profiles_dir);
    if path.exists() || path != profiles_dir.join(format!("{name_or_path}.toml")) {
        return Ok(path);
    }
    if !profiles_dir.is_dir() {
        bail!(
            "no profile `{name_or_path}`: {}",
            no_profiles_dir(profiles_dir)
        );
    }
    let mut names: Vec<String> = std::fs::read_dir(profiles_dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.strip_suffix(".toml").map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    if names.is_empty() {
        bail!(
            "no profile `{name_or_path}`: {} holds no profiles (*.toml); \
             give --profiles-dir, or a path to a .toml file",
            profiles_dir.display()
        );
    }
    bail!(
        "no profile `{name_or_path}` in {}; the profiles there: {}",
        profiles_dir.display(),
        names.join(", ")
    )
}

/// Why a profiles directory that is not there holds no profiles, and how
/// to point at the right one.
pub fn no_profiles_dir(profiles_dir: &Path) -> String {
    format!(
        "the profiles directory `{}` does not exist here; run from the repository's root, \
         give --profiles-dir DIR, or a path to a .toml file",
        profiles_dir.display()
    )
}

/// The provider a profile asks for.
///
/// The lock is `[inputs] lock` (default `inputs.lock`) in the profile's
/// directory, as Cargo.lock sits beside Cargo.toml; a build creates it when
/// it is missing (unless `--locked`), and `update-inputs --profile P`
/// updates the lock that profile uses.
pub fn provider(profile: &Profile, profile_path: &Path) -> Box<dyn Provider> {
    let dir = profile_path.parent().unwrap_or(Path::new("."));
    match profile.inputs.provider {
        nodeflash_installer::profile::Provider::Debian => Box::new(Debian {
            lock_path: dir.join(&profile.inputs.lock),
            profile_arg: shown_path(profile_path),
        }),
    }
}

/// `path` relative to the current directory when it is below it, for
/// messages that give a command to type.
fn shown_path(path: &Path) -> String {
    let cwd = std::env::current_dir().unwrap_or_default();
    path.strip_prefix(&cwd)
        .unwrap_or(path)
        .display()
        .to_string()
}

pub fn build(opts: &BuildOptions) -> Result<BuildSummary> {
    let profile = Profile::load(&opts.profile)?;
    tools::require(&tools::for_profile(&profile))?;
    let name = profile.name.to_string();
    let inputs = provider(&profile, &opts.profile).provide(&opts.cache, opts.lock_mode)?;

    let (modules, firmware) = steps::step("Resolving kernel modules", || {
        let modules = module_order(&opts.cache, &inputs, &profile)?;
        let firmware = firmware_for(&inputs, &modules)?;
        Ok((modules, firmware))
    })?;
    let profile_dir = opts.profile.parent().unwrap_or(Path::new("."));
    let check_system = match &profile.boot {
        Some(b) if b.system == BootSystem::Check => {
            Some(steps::step("Writing the check system", || {
                check_system(opts, &inputs, &profile, &modules, &firmware, profile_dir)
            })?)
        }
        _ => None,
    };
    let packed =
        crate::payload::prepare(&profile, &opts.profile, &opts.cache, check_system.as_ref())?;
    let boot = profile.boot.as_ref().map(|b| match &check_system {
        Some(sys) => BootInfo {
            kernel: format!("{}/kernel", sys.name),
            initrd: format!("{}/initrd", sys.name),
            cmdline: b.cmdline.clone(),
            check: true,
            nixos: None,
            nixos_per_node: false,
        },
        None if profile.payload.flake.is_some() => BootInfo {
            kernel: String::new(),
            initrd: String::new(),
            cmdline: b.cmdline.clone(),
            check: false,
            nixos: None,
            nixos_per_node: true,
        },
        None => BootInfo {
            kernel: b.kernel.clone().unwrap_or_default(),
            initrd: b.initrd.clone().unwrap_or_default(),
            cmdline: b.cmdline.clone(),
            check: false,
            nixos: b.nixos_toplevel(&profile.payload),
            nixos_per_node: false,
        },
    });
    if let (Some(b), Some(p)) = (&boot, &packed) {
        if b.nixos_per_node {
            for s in p.systems.values().chain(&p.default_system) {
                let one = BootInfo {
                    nixos: Some(s.toplevel.clone()),
                    ..b.clone()
                };
                check_boot_paths(&one, &p.path, &opts.profile)?;
            }
        } else {
            check_boot_paths(b, &p.path, &opts.profile)?;
        }
    }
    let (initramfs, info) = steps::step("Assembling initramfs", || {
        assemble(
            &opts.installer,
            &inputs,
            &profile,
            &modules,
            &firmware,
            Extras {
                packed: packed.as_ref(),
                boot: boot.clone(),
                mode: Mode::Install,
            },
            profile_dir,
        )
    })?;
    let stored = |kind: &str, key: &str, build: &dyn Fn(&Path) -> Result<()>| -> Result<PathBuf> {
        if opts.reuse_artifacts {
            opts.cache.file(kind, key, build)
        } else {
            let dir = opts.cache.root().join("rebuilt");
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let path = dir.join(key);
            build(&path)?;
            Ok(path)
        }
    };
    let artefact = |kind: &str, ext: &str, build: &dyn Fn(&Path) -> Result<()>| {
        stored(kind, &format!("{}.{ext}", info.image_id), build)
    };
    let initrd = steps::step("Writing initramfs", || {
        artefact("initrd", "cpio.zst", &|p| {
            write_initrd(&initramfs, p, &stored)
        })
    })?;
    let efi = steps::step("Writing EFI image", || {
        artefact("efi", "img", &|p| {
            write_efi(p, &inputs, &initrd, &profile, &info)
        })
    })?;
    std::fs::create_dir_all(&opts.out_dir)
        .with_context(|| format!("cannot create {}", opts.out_dir.display()))?;
    let iso_path = opts.out_dir.join(format!("{name}.iso"));
    let cached_iso = steps::long_step("Writing ISO", || {
        artefact("iso", "iso", &|p| {
            let root = tempfile::tempdir().context("cannot create the ISO root directory")?;
            let dir = root.path().join("nodeflash");
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            std::fs::write(dir.join("image.json"), image_json(&info)?)
                .context("cannot write image.json")?;
            std::fs::write(dir.join("profile.toml"), profile.to_toml())
                .context("cannot write profile.toml")?;
            let label = format!("NODEFLASH_{}", name.to_uppercase().replace('-', "_"));
            let grafts: Vec<(&str, &Path)> = packed
                .iter()
                .map(|p| (PAYLOAD_ISO_PATH, p.path.as_path()))
                .collect();
            iso::write_hybrid_iso(
                p,
                root.path(),
                &grafts,
                &efi,
                &label[..label.len().min(32)],
                &info.volume_set_id(),
                GRUB_CFG_PATH,
            )
        })
    })?;
    // The cache's bound, after every build: what this one uses is kept.
    let max = Cache::max_bytes_from_env()?;
    let mut keep = vec![initrd.as_path(), efi.as_path(), cached_iso.as_path()];
    keep.extend(packed.iter().map(|p| p.path.as_path()));
    let gc = opts.cache.gc(max, &keep)?;
    if gc.removed > 0 {
        steps::note(&format!(
            "cache bound {}: evicted {} least recently used payloads, frames and images ({})",
            human_bytes(max),
            gc.removed,
            human_bytes(gc.removed_bytes)
        ));
    }
    let tmp = opts.out_dir.join(format!(".{name}.iso.tmp"));
    std::fs::copy(&cached_iso, &tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &iso_path)
        .with_context(|| format!("cannot write {}", iso_path.display()))?;
    let sha = sha256_file(&iso_path)?;
    std::fs::write(
        opts.out_dir.join(format!("{name}.iso.sha256")),
        format!("{sha}  {name}.iso\n"),
    )
    .context("cannot write the ISO's sha256 file")?;
    let (nodes, default_node) = NodeSummary::of(&profile);
    let warnings = node_warnings(&nodes, default_node.as_ref());
    for w in &warnings {
        steps::note(&format!("warning: {w}"));
    }
    let summary = BuildSummary {
        profile: name.clone(),
        iso_bytes: std::fs::metadata(&iso_path).map(|m| m.len()).unwrap_or(0),
        iso: iso_path,
        iso_sha256: sha,
        image_id: info.image_id.clone(),
        kernel_release: info.kernel_release.clone(),
        initrd_bytes: std::fs::metadata(&initrd).map(|m| m.len()).unwrap_or(0),
        modules: info.modules.len(),
        packages: info.packages.clone(),
        firmware_files: firmware.files.len(),
        firmware_bytes: firmware.bytes,
        payload: info.payload.clone(),
        nodes,
        default_node,
        boot: BootSummary::of(&profile),
        warnings,
    };
    let json =
        serde_json::to_string_pretty(&summary).context("cannot serialize the build summary")?;
    std::fs::write(opts.out_dir.join(format!("{name}.json")), json + "\n")
        .context("cannot write the build summary")?;
    Ok(summary)
}

fn image_json(info: &ImageInfo) -> Result<String> {
    Ok(serde_json::to_string_pretty(info).context("cannot serialize image info")? + "\n")
}

/// The firmware files the image carries: every `firmware=` file that one of
/// `modules` names (relative to `/lib/firmware`) and one of the inputs'
/// firmware trees holds, symlinks followed; and the names no tree holds
/// (drivers name firmware for every chip they know; most load without it).
#[derive(Debug, Clone, Default)]
pub struct Firmware {
    /// (path below `/lib/firmware`, file on the build host)
    pub files: Vec<(String, PathBuf)>,
    pub missing: Vec<String>,
    /// Bytes of `files`.
    pub bytes: u64,
}

fn firmware_for(inputs: &BuildInputs, modules: &[String]) -> Result<Firmware> {
    let mut names = std::collections::BTreeSet::new();
    for rel in modules {
        let path = module_source(inputs, rel);
        names.extend(crate::kmod::read_modinfo(&path)?.firmware);
    }
    let mut fw = Firmware::default();
    for name in names {
        let found = inputs
            .firmware
            .iter()
            .map(|d| d.join(&name))
            .find_map(|p| std::fs::canonicalize(p).ok().filter(|p| p.is_file()));
        match found {
            Some(file) => {
                fw.bytes += std::fs::metadata(&file)
                    .with_context(|| format!("cannot stat {}", file.display()))?
                    .len();
                fw.files.push((name, file));
            }
            None => fw.missing.push(name),
        }
    }
    Ok(fw)
}

/// Where module `rel` (relative to `lib/modules/<release>`) is on the build host.
fn module_source(inputs: &BuildInputs, rel: &str) -> PathBuf {
    inputs
        .extra_modules
        .iter()
        .find_map(|(dir, prefix)| {
            Path::new(rel)
                .strip_prefix(prefix)
                .ok()
                .map(|r| dir.join(r))
        })
        .unwrap_or_else(|| inputs.modules_root.join(rel))
}

/// The modules to load, in order, cached by the inputs and the wanted list.
fn module_order(cache: &Cache, inputs: &BuildInputs, profile: &Profile) -> Result<Vec<String>> {
    let wanted: Vec<String> = DEFAULT_MODULES
        .iter()
        .map(|m| m.to_string())
        .chain(profile.image.modules.iter().cloned())
        .collect();
    let key = key_of(
        [inputs.id.as_str()]
            .into_iter()
            .chain(wanted.iter().map(String::as_str)),
    );
    let path = cache.file("module-order", &key, |p| {
        let mut index = ModuleIndex::scan(&inputs.modules_root)?;
        for (dir, prefix) in &inputs.extra_modules {
            index.add_tree(dir, prefix)?;
        }
        let order = index.resolve(&wanted)?;
        let lines: Vec<String> = order.iter().map(|p| p.display().to_string()).collect();
        std::fs::write(p, lines.join("\n") + "\n")
            .with_context(|| format!("cannot write {}", p.display()))
    })?;
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(text
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

/// What an initramfs carries besides the installer, its tools and modules.
struct Extras<'a> {
    packed: Option<&'a crate::payload::Packed>,
    boot: Option<BootInfo>,
    mode: Mode,
}

/// The files `[boot]` names must be in the payload, so that a wrong path
/// fails the build and not the install.
fn check_boot_paths(boot: &BootInfo, payload: &Path, profile: &Path) -> Result<()> {
    let file = std::fs::File::open(payload)
        .with_context(|| format!("cannot open {}", payload.display()))?;
    let manifest = nodeflash_installer::payload::Payload::open(file)
        .with_context(|| format!("cannot read {}", payload.display()))?
        .manifest;
    let wanted: Vec<(&str, String)> = match &boot.nixos {
        Some(top) => vec![
            ("toplevel", format!("{top}/bin/switch-to-configuration")),
            ("toplevel", format!("{top}/activate")),
        ],
        None => vec![
            ("kernel", boot.kernel.clone()),
            ("initrd", boot.initrd.clone()),
        ],
    };
    for (key, path) in wanted {
        if !manifest.entries.iter().any(|e| e.path() == path) {
            bail!(
                "{}: `boot.{key}`: the payload has no /nix/store/{path}",
                profile.display()
            );
        }
    }
    Ok(())
}

/// nodeflash's check system, a store path of the payload: the kernel, and
/// an initramfs whose `/init` is the installer in check mode.
#[derive(Debug, Clone)]
pub struct CheckSystem {
    /// Store path name, `HASH-nodeflash-check-system`.
    pub name: String,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

fn check_system(
    opts: &BuildOptions,
    inputs: &BuildInputs,
    profile: &Profile,
    modules: &[String],
    firmware: &Firmware,
    profile_dir: &Path,
) -> Result<CheckSystem> {
    let (fs, info) = assemble(
        &opts.installer,
        inputs,
        profile,
        modules,
        firmware,
        Extras {
            packed: None,
            boot: None,
            mode: Mode::Check,
        },
        profile_dir,
    )?;
    let stored = |kind: &str, key: &str, build: &dyn Fn(&Path) -> Result<()>| {
        opts.cache.file(kind, key, build)
    };
    let initrd = opts
        .cache
        .file("initrd", &format!("{}.cpio.zst", info.image_id), |p| {
            write_initrd(&fs, p, &stored)
        })?;
    // Named like a store path, by what it holds.
    let digest = key_of([info.image_id.as_str(), &sha256_file(&inputs.kernel)?]);
    let hash: String = digest
        .bytes()
        .take(32)
        .map(|b| char::from(b"0123456789abcdfghijklmnpqrsvwxyz"[usize::from(b % 32)]))
        .collect();
    Ok(CheckSystem {
        name: format!("{hash}-nodeflash-check-system"),
        kernel: inputs.kernel.clone(),
        initrd,
    })
}

/// The initramfs contents and the image info that describes them.
fn assemble(
    installer: &Path,
    inputs: &BuildInputs,
    profile: &Profile,
    modules: &[String],
    firmware: &Firmware,
    extras: Extras,
    profile_dir: &Path,
) -> Result<(Initramfs, ImageInfo)> {
    let Extras { packed, boot, mode } = extras;
    if !installer.is_file() {
        bail!(
            "installer binary {} does not exist (build it with `cargo xtask build-iso`)",
            installer.display()
        );
    }
    let mut fs = Initramfs::new();
    for dir in [
        "/proc",
        "/sys",
        "/dev",
        "/run",
        "/tmp",
        "/mnt",
        "/etc/nodeflash",
    ] {
        fs.add_dir(dir, 0o755);
    }
    fs.add_file("/init", 0o755, Source::Path(installer.to_path_buf()));
    let mut binaries = vec![installer.to_path_buf()];
    for prog in &inputs.programs {
        let real = elf::resolve_in(&inputs.sysroot, prog)?;
        fs.add_file(
            &prog.display().to_string(),
            0o755,
            Source::Path(real.clone()),
        );
        binaries.push(real);
    }
    for lib in elf::closure(&inputs.sysroot, &binaries)? {
        fs.add_file(
            &lib.image_path.display().to_string(),
            0o755,
            Source::Path(lib.source),
        );
    }
    let release = &inputs.kernel_release;
    for rel in modules {
        fs.add_file(
            &format!("/lib/modules/{release}/{rel}"),
            0o644,
            Source::Path(module_source(inputs, rel)),
        );
    }
    for (name, file) in &firmware.files {
        fs.add_file(
            &format!("/lib/firmware/{name}"),
            0o644,
            Source::Path(file.clone()),
        );
    }
    fs.add_file(
        PROFILE_PATH,
        0o644,
        Source::Bytes(profile.to_toml().into_bytes()),
    );
    if !profile.ssh.ca_certificates.is_empty() {
        fs.add_dir(CA_DIR, 0o755);
    }
    for (i, ca) in profile.ssh.ca_certificates.iter().enumerate() {
        let path = profile_dir.join(ca);
        let pem = std::fs::read(&path)
            .with_context(|| format!("cannot read the CA certificate {}", path.display()))?;
        fs.add_file(&format!("{CA_DIR}/{i}.pem"), 0o644, Source::Bytes(pem));
    }
    if mode == Mode::Install && boot.is_some() {
        fs.add_dir("/usr/lib/nodeflash", 0o755);
        fs.add_file(
            SYSTEMD_BOOT_PATH,
            0o644,
            Source::Path(inputs.systemd_boot.clone()),
        );
    }
    let content = fs.content_hash(&[IMAGE_INFO_PATH])?;
    let payload = packed.map(|p| PayloadInfo {
        path: PAYLOAD_ISO_PATH.to_string(),
        bytes: p.bytes,
        manifest_sha256: p.manifest_sha256.clone(),
        files: p.files,
        store_bytes: p.store_bytes,
        systems: p.systems.clone(),
        default_system: p.default_system.clone(),
    });
    let image_id = key_of([
        content.as_str(),
        payload.as_ref().map_or("", |p| p.manifest_sha256.as_str()),
        &sha256_file(&inputs.kernel)?,
        &sha256_file(&inputs.systemd_boot)?,
        &sha256_file(&inputs.shim)?,
        &sha256_file(&inputs.grub)?,
        &profile.image.cmdline,
        &INITRD_ZSTD_LEVEL.to_string(),
        &serde_json::to_string(&(&boot, mode, &inputs.packages))
            .context("cannot serialize the boot info")?,
        ARTEFACT_FORMAT,
        env!("CARGO_PKG_VERSION"),
    ]);
    let info = ImageInfo {
        version: env!("CARGO_PKG_VERSION").to_string(),
        profile: profile.name.to_string(),
        image_id,
        kernel_release: release.clone(),
        modules: modules.to_vec(),
        payload,
        boot,
        mode,
        packages: inputs.packages.clone(),
    };
    fs.add_file(
        IMAGE_INFO_PATH,
        0o644,
        Source::Bytes(image_json(&info)?.into_bytes()),
    );
    Ok((fs, info))
}

/// Where Debian's signed GRUB (`grubx64.efi` of `grub-efi-amd64-signed`)
/// reads its configuration: the image embeds the prefix `/EFI/debian` (on
/// the device it was started from) and a memdisk `grub.cfg` that sources
/// `$prefix/grub.cfg` when that directory exists (Debian's
/// `debian/build-efi-images` in the grub2 source; read from the image's
/// `mods` section, see docs/secure-boot.md).
pub const GRUB_CFG_PATH: &str = "EFI/debian/grub.cfg";

/// The FAT image, booted through Debian's signed chain so that it also
/// starts under Secure Boot: shim at the removable path
/// `EFI/BOOT/BOOTX64.EFI`, the signed GRUB beside it as `grubx64.efi`
/// (shim's default loader, looked up in its own directory), GRUB's
/// configuration at [`GRUB_CFG_PATH`], the kernel and the initramfs.
fn write_efi(
    out: &Path,
    inputs: &BuildInputs,
    initrd: &Path,
    profile: &Profile,
    info: &ImageInfo,
) -> Result<()> {
    let files = [
        ("EFI/BOOT/BOOTX64.EFI", Source::Path(inputs.shim.clone())),
        ("EFI/BOOT/grubx64.efi", Source::Path(inputs.grub.clone())),
        (
            GRUB_CFG_PATH,
            Source::Bytes(grub_cfg(profile, info.short_id())?.into_bytes()),
        ),
        ("nodeflash/vmlinuz", Source::Path(inputs.kernel.clone())),
        ("nodeflash/initrd.zst", Source::Path(initrd.to_path_buf())),
    ];
    let files: Vec<FatFile> = files
        .into_iter()
        .map(|(path, source)| FatFile {
            path: path.to_string(),
            source,
        })
        .collect();
    let id = u32::from_str_radix(&info.image_id[..8], 16).context("image id is not hex")?;
    write_fat_image(out, "NODEFLASH", id, &files)?;
    Ok(())
}

/// GRUB's configuration on the stick: boot the installer at once, with the
/// profile's kernel command line. The kernel and initramfs are read from
/// GRUB's `$root`, the partition GRUB itself was started from.
///
/// Each word of `[image] cmdline` is single-quoted for GRUB's shell-like
/// parser (grub.texi, "Shell-like scripting"); a command line with quotes,
/// backslashes or control characters is refused, since GRUB would escape
/// them (`grub-core/lib/cmdline.c`) and the kernel would see other bytes
/// than the profile's.
fn grub_cfg(profile: &Profile, short_id: &str) -> Result<String> {
    let cmdline = &profile.image.cmdline;
    if let Some(c) = cmdline
        .chars()
        .find(|c| matches!(c, '"' | '\'' | '\\') || c.is_control())
    {
        bail!(
            "profile {}: [image] cmdline holds {c:?}, which the stick's boot loader (GRUB) \
             cannot pass to the kernel unchanged: remove it",
            profile.name
        );
    }
    let words: Vec<String> = cmdline
        .split_whitespace()
        .map(|w| format!("'{w}'"))
        .collect();
    Ok(format!(
        "set timeout=0\nset default=0\nmenuentry 'nodeflash {} ({})' {{\n    linux /nodeflash/vmlinuz {}\n    initrd /nodeflash/initrd.zst\n}}\n",
        profile.name,
        short_id,
        words.join(" ")
    ))
}

#[cfg(test)]
mod grub_tests {
    use super::*;

    fn profile(cmdline: &str) -> Profile {
        Profile::parse(
            &format!(
                "name = \"t\"\n[image]\ncmdline = {cmdline:?}\n[disk]\nselect = {{ serial = \"S\" }}\n"
            ),
            "t.toml",
        )
        .expect("profile")
    }

    #[test]
    fn grub_boots_the_installer_at_once_with_the_profiles_command_line() {
        let cfg = grub_cfg(
            &profile("console=ttyS0,115200 quiet a=$x;b"),
            "0123456789ab",
        )
        .expect("cfg");
        assert_eq!(
            cfg,
            "set timeout=0\nset default=0\nmenuentry 'nodeflash t (0123456789ab)' {\n    \
             linux /nodeflash/vmlinuz 'console=ttyS0,115200' 'quiet' 'a=$x;b'\n    \
             initrd /nodeflash/initrd.zst\n}\n"
        );
        for bad in ["a=\"b c\"", "it's", "a\\b"] {
            let e = grub_cfg(&profile(bad), "0").expect_err("refused");
            assert!(format!("{e:#}").contains("[image] cmdline holds"), "{e:#}");
        }
    }
}

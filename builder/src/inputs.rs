//! Build inputs: the kernel, its modules, OpenZFS modules built for it, the
//! ZFS userspace with its libraries, systemd-boot, and the stick's signed
//! boot chain (shim and GRUB). A [`Provider`] turns a
//! lock file of pinned versions into files on disk, through the cache.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::cache::Cache;

/// Everything an image is made from, on the local disk.
#[derive(Debug, Clone)]
pub struct BuildInputs {
    /// Kernel release, e.g. `6.1.0-56-amd64`.
    pub kernel_release: String,
    /// The kernel image (bzImage).
    pub kernel: PathBuf,
    /// `lib/modules/<release>` of the kernel package.
    pub modules_root: PathBuf,
    /// Out-of-tree modules (OpenZFS): a directory of `.ko` files and the
    /// path below `lib/modules/<release>` where they go.
    pub extra_modules: Vec<(PathBuf, PathBuf)>,
    /// A tree holding the ZFS userspace and every library it may need.
    pub sysroot: PathBuf,
    /// Programs from `sysroot` to put into the image (absolute paths inside it).
    pub programs: Vec<PathBuf>,
    /// systemd-boot's EFI binary (the installed disk's boot loader).
    pub systemd_boot: PathBuf,
    /// shim signed by Microsoft's UEFI CA: the stick's `EFI/BOOT/BOOTX64.EFI`.
    pub shim: PathBuf,
    /// GRUB signed by Debian: the stick's `EFI/BOOT/grubx64.efi`, which
    /// shim starts.
    pub grub: PathBuf,
    /// Directories laid out as `/lib/firmware`, searched in order for the
    /// firmware files the image's modules name.
    pub firmware: Vec<PathBuf>,
    /// Hash of every pinned input: same ID, same files.
    pub id: String,
    /// Every package the image was made from, with its exact version, in
    /// the lock's order (the summary and `image.json` name them).
    pub packages: Vec<PackageVersion>,
}

pub use nodeflash_installer::image::PackageVersion;

/// How a build treats its lock file; the words and meaning are cargo's
/// (`cargo build --locked`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LockMode {
    /// Use the pinned versions while they can be had (the cache, or the
    /// archive); re-pin a package the archive no longer publishes, create a
    /// missing lock, and write the lock back.
    #[default]
    Update,
    /// Fail instead of changing the lock in any way.
    Locked,
}

/// A pin that changed: `from` (none when the package was not pinned
/// before) to `to`, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Repin {
    pub from: Option<PackageVersion>,
    pub to: PackageVersion,
    pub reason: String,
}

impl std::fmt::Display for Repin {
    /// `linux-kbuild-6.1 6.1.192-2 → 6.1.192-3 (the pinned version is no
    /// longer published)`; the name is repeated when it changes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let to = &self.to;
        match &self.from {
            Some(from) if from.name == to.name => write!(
                f,
                "{} {} → {} ({})",
                to.name, from.version, to.version, self.reason
            ),
            Some(from) => write!(
                f,
                "{} {} → {} {} ({})",
                from.name, from.version, to.name, to.version, self.reason
            ),
            None => write!(f, "{} {} ({})", to.name, to.version, self.reason),
        }
    }
}

/// A source of build inputs (Debian packages today; nixpkgs could be another).
pub trait Provider {
    /// Fetches, verifies and prepares every input, from the cache when it
    /// can. With [`LockMode::Update`] a pin the source no longer publishes
    /// is replaced (one line per change on stderr) and the lock rewritten;
    /// with [`LockMode::Locked`] that is an error naming the fix.
    fn provide(&self, cache: &Cache, mode: LockMode) -> Result<BuildInputs>;
    /// Pins the newest available versions in the lock file; returns the
    /// changes.
    fn update_lock(&self, cache: &Cache) -> Result<Vec<Repin>>;
    /// Checks every pin against the live source with the package lists and
    /// packages of `cache` only (give it an empty one to see what a new
    /// machine sees), and returns what a build would re-pin. Writes nothing
    /// but `cache`.
    fn check(&self, cache: &Cache) -> Result<Vec<Repin>>;
}

/// The lock file: pinned versions with their sha256.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Lock {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debian: Option<crate::debian::DebianLock>,
}

impl Lock {
    /// The lock at `path`; an error naming the file (and `cargo xtask
    /// update-inputs`) when it is missing or invalid.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read the inputs lock {}; create it with `cargo xtask update-inputs`",
                path.display()
            )
        })?;
        toml::from_str(&text).with_context(|| format!("invalid inputs lock {}", path.display()))
    }

    /// The lock at `path`, or none when there is no such file.
    pub fn load_if_present(path: &Path) -> Result<Option<Self>> {
        if path.exists() {
            Self::load(path).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Writes the lock to `path` (through a temporary file beside it, so a
    /// crash never leaves half a lock).
    pub fn save(&self, path: &Path) -> Result<()> {
        let body = toml::to_string_pretty(self).context("cannot serialize the inputs lock")?;
        let text = format!(
            "# Pinned build inputs with their sha256. Generated by `cargo xtask update-inputs`; do not edit.\n\n{body}"
        );
        let tmp = path.with_extension("lock.tmp");
        std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
    }
}

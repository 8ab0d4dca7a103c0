//! The profile: one TOML file that describes a whole install.
//!
//! Parsing rejects unknown keys and reports every error with the file, line,
//! column and the dotted key at fault. Values that can be checked on their own
//! (sizes, host IDs, names, mountpoints) are checked while parsing, so their
//! errors carry a position too; checks across several keys run in
//! [`Profile::validate`] and point at the item they concern.
//!
//! The model (the serde types, [`Size`], [`HostId`], the checked names) is
//! here; the cross-key rules, one function per group, are in `validate.rs`;
//! [`ProfileError`] and how an error's key is found in the source are in
//! `error.rs`.
//!
//! The format is documented in `docs/profile.md`.

mod error;
mod validate;

pub use error::ProfileError;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use toml::Spanned;

/// A whole install, as written in `profiles/NAME.toml`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Profile {
    /// Short name, used for the image file name and printed at boot.
    pub name: Name,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default)]
    pub inputs: Inputs,
    #[serde(default)]
    pub image: Image,
    /// Required: there is no safe default for the disk to wipe.
    pub disk: Disk,
    /// The root pool: on the ZFS partitions of `[disk]`'s disks.
    #[serde(default)]
    pub pool: Pool,
    /// Data pools (`[[pools]]`): each on whole disks of its own (`disks`),
    /// created by the installer and imported by the installed system.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<Pool>,
    #[serde(default)]
    pub payload: Payload,
    #[serde(default)]
    pub ssh: Ssh,
    /// What boots the installed disk; absent: no boot loader is written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<Boot>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<Node>,
    #[serde(default)]
    pub default_node: DefaultNode,
    #[serde(default)]
    pub finish: Finish,
}

/// Where the kernel, the ZFS modules and tools and the boot loader come from.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Inputs {
    #[serde(default)]
    pub provider: Provider,
    /// Lock file with the pinned package versions and their sha256, relative
    /// to the profile file.
    #[serde(default = "default_lock")]
    pub lock: String,
}

impl Default for Inputs {
    fn default() -> Self {
        Self {
            provider: Provider::default(),
            lock: default_lock(),
        }
    }
}

fn default_lock() -> String {
    "inputs.lock".into()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Provider {
    /// Debian bookworm packages (kernel, zfs-dkms, zfsutils-linux, systemd-boot).
    #[default]
    Debian,
}

/// The boot image itself.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Image {
    /// Kernel command line of the installer.
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    /// Kernel modules loaded at boot in addition to the built-in set (boot
    /// media, NVMe, ZFS, common NICs). Dependencies are resolved by the builder.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub modules: Vec<String>,
    /// How long the installer waits for its boot medium and the target disk.
    #[serde(default = "default_device_timeout")]
    pub device_timeout_secs: u32,
}

impl Default for Image {
    fn default() -> Self {
        Self {
            cmdline: default_cmdline(),
            modules: Vec::new(),
            device_timeout_secs: default_device_timeout(),
        }
    }
}

fn default_cmdline() -> String {
    "console=tty0 console=ttyS0,115200 quiet".into()
}

fn default_device_timeout() -> u32 {
    30
}

/// The target disk and its layout.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Disk {
    /// Rules that must all hold for the one disk to install on.
    pub select: DiskSelect,
    #[serde(default)]
    pub wipe: Wipe,
    #[serde(default = "default_esp_size")]
    pub esp_size: Size,
    /// Swap partition size; absent means no swap partition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_size: Option<Size>,
    /// The other disks of the root pool's vdev (`[pool] vdev`), each chosen
    /// by rules of its own (the keys of `select`); each gets the same layout
    /// as the disk of `select` (ESP, swap, ZFS). Empty: one disk.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<DiskSelect>,
}

fn default_esp_size() -> Size {
    Size(1 << 30)
}

/// Disk selection rules, from most to least specific.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DiskSelect {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wwn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_size: Option<Size>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_size: Option<Size>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bus: Option<Bus>,
    /// A kernel name such as `nvme0n1`: only allowed with a size range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

/// The bus of a disk; one type for the profile and the facts.
pub use crate::facts::Bus;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Wipe {
    /// Refuse a disk with a partition table, a filesystem or a ZFS label.
    #[default]
    IfEmpty,
    /// Wipe whatever is there (reinstall).
    Always,
}

/// The ZFS pool and its dataset tree.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Pool {
    #[serde(default = "default_pool_name")]
    pub name: PoolName,
    /// Pool properties (`zpool create -o`).
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// Properties of the root dataset (`zpool create -O`).
    #[serde(default)]
    pub root_options: BTreeMap<String, String>,
    #[serde(default)]
    pub datasets: Vec<Dataset>,
    /// How the root pool's disks (`[disk] select` and `members`) are
    /// joined: one vdev of this type.
    #[serde(default)]
    pub vdev: Vdev,
    /// Volumes, created after the datasets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub zvols: Vec<Zvol>,
    /// A data pool's disks (`[[pools]]` only; the root pool's are
    /// `[disk] select` and `members`), each by rules of its own, used
    /// whole: one GPT partition with all of the disk.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskSelect>,
    /// Separate intent log (`log`, zpoolconcepts(7)): whole disks; two or
    /// more make a mirror.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub log: Vec<DiskSelect>,
    /// L2ARC read cache (`cache`): whole disks, never mirrored (ZFS
    /// does not mirror cache devices; losing one loses no data).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cache: Vec<DiskSelect>,
    /// Metadata and small blocks (`special`): whole disks; two or more make
    /// a mirror. Losing it loses the pool, so a redundant pool needs a
    /// mirrored one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub special: Vec<DiskSelect>,
}

impl Pool {
    /// The classes of devices beside the data vdev, as `zpool create` names
    /// them (zpoolconcepts(7)), with the pool's rules for each, in the
    /// order they are given to `zpool create`.
    pub fn aux_classes(&self) -> [(&'static str, &[DiskSelect]); 3] {
        [
            ("special", &self.special),
            ("log", &self.log),
            ("cache", &self.cache),
        ]
    }
}

/// The root pool's vdev type, as `zpool create` names it (zpoolconcepts(7)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Vdev {
    /// One disk (no `[disk] members`).
    #[default]
    Single,
    /// Every disk holds a copy; the pool survives all but one disk.
    Mirror,
    /// Single parity: survives one disk, at least 2 disks.
    Raidz1,
    /// Double parity: survives two disks, at least 3 disks.
    Raidz2,
}

impl Vdev {
    /// The word before the devices in `zpool create` (none for one disk).
    pub fn keyword(self) -> Option<&'static str> {
        match self {
            Vdev::Single => None,
            Vdev::Mirror => Some("mirror"),
            Vdev::Raidz1 => Some("raidz1"),
            Vdev::Raidz2 => Some("raidz2"),
        }
    }

    /// The fewest disks `zpool create` accepts for this type: a mirror 2,
    /// raidzN N + 1 (`is_grouping` in OpenZFS's `cmd/zpool/zpool_vdev.c`).
    pub fn min_disks(self) -> usize {
        match self {
            Vdev::Single => 1,
            Vdev::Mirror | Vdev::Raidz1 => 2,
            Vdev::Raidz2 => 3,
        }
    }

    /// How many disks may fail with the pool still imported.
    pub fn tolerates(self, disks: usize) -> usize {
        match self {
            Vdev::Single => 0,
            Vdev::Mirror => disks.saturating_sub(1),
            Vdev::Raidz1 => 1,
            Vdev::Raidz2 => 2,
        }
    }
}

fn default_pool_name() -> PoolName {
    PoolName("rpool".into())
}

impl Default for Pool {
    fn default() -> Self {
        Self {
            name: default_pool_name(),
            options: BTreeMap::new(),
            root_options: BTreeMap::new(),
            datasets: Vec::new(),
            vdev: Vdev::default(),
            zvols: Vec::new(),
            disks: Vec::new(),
            log: Vec::new(),
            cache: Vec::new(),
            special: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Dataset {
    /// Name below the pool, e.g. `local/nix`.
    pub name: Spanned<DatasetName>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mountpoint: Option<Spanned<Mountpoint>>,
    /// Where a dataset whose mountpoint is `legacy` is mounted (by
    /// `mount -t zfs`, and a `fileSystems` entry of the installed NixOS):
    /// ZFS leaves a legacy dataset to fstab, so the path is the profile's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub legacy_mount: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub options: BTreeMap<String, String>,
    /// Snapshots taken right after `zfs create`, before anything is written
    /// to the dataset (`blank`: the "erase your darlings" rollback point).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<String>,
}

/// A ZFS volume (`zfs create -V`), e.g. a VM's disk.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Zvol {
    /// Name below the pool; its parent is the pool or a dataset of
    /// `[[pool.datasets]]`.
    pub name: Spanned<DatasetName>,
    /// The volume's size; a multiple of its `volblocksize` (8K unless
    /// `options` sets it, OpenZFS 2.1.11's default).
    pub volsize: Size,
    /// Volume properties (`zfs create -o`), checked as ZFS checks them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub options: BTreeMap<String, String>,
    /// Swap on this volume: always refused (see [`Profile::parse`]'s
    /// check), the key exists to say why.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub swap: bool,
}

/// What is copied into the store: one of `closure`, `store` or `synthetic`
/// (or none: an install without a store).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Payload {
    /// A Nix store path (a NixOS system's top level): its closure is listed
    /// with `nix-store -qR` on the build host, which needs Nix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closure: Option<String>,
    /// A flake (a path, relative to the profile, or a flake reference) whose
    /// `nixosConfigurations.<node>.config.system.build.toplevel` is each
    /// node's system: the builder runs `nix build` for every node and packs
    /// the union of their closures once (docs/flake.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flake: Option<String>,
    /// A directory laid out as a store (its entries are store paths), for
    /// build hosts without Nix; relative to the profile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// The closure's registration (`nix-store --dump-db` / closure-info
    /// format) for `store`; relative to the profile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration: Option<String>,
    /// A deterministic synthetic store (tests and benchmarks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synthetic: Option<Synthetic>,
    /// zstd level of the packed store (`payload::DEFAULT_LEVEL`, 17).
    #[serde(default = "default_level")]
    pub level: i32,
    /// Threads writing the store on the node (default: one per CPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<u32>,
}

fn default_level() -> i32 {
    crate::payload::DEFAULT_LEVEL
}

impl Default for Payload {
    fn default() -> Self {
        Self {
            closure: None,
            flake: None,
            store: None,
            registration: None,
            synthetic: None,
            level: default_level(),
            workers: None,
        }
    }
}

impl Payload {
    pub fn is_empty(&self) -> bool {
        self.closure.is_none()
            && self.flake.is_none()
            && self.store.is_none()
            && self.synthetic.is_none()
    }
}

/// The flake attribute of a node's system when the profile does not name
/// one: `nixosConfigurations.<name>.config.system.build.toplevel`, what
/// `nixos-rebuild --flake .#<name>` builds.
pub fn default_system_attr(name: &str) -> String {
    format!("nixosConfigurations.\"{name}\".config.system.build.toplevel")
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Synthetic {
    pub files: u64,
    pub bytes: Size,
    #[serde(default)]
    pub seed: u64,
}

/// SSH keys installed for root.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Ssh {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub github_users: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<String>,
    /// Where a user's keys are fetched from; `{user}` is replaced.
    #[serde(default = "default_key_url")]
    pub key_url: String,
    /// Stop before touching the disk when the keys cannot be fetched.
    #[serde(default = "yes")]
    pub required: bool,
    /// Allow a plain `http://` key URL.
    #[serde(default)]
    pub allow_http: bool,
    /// How long all attempts to fetch one user's keys may take, retries included.
    #[serde(default = "default_fetch_timeout")]
    pub fetch_timeout_secs: u32,
    /// PEM files with CA certificates trusted for `key-url` besides the
    /// Mozilla roots, relative to the profile file (the builder copies them
    /// into the image).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ca_certificates: Vec<String>,
}

impl Default for Ssh {
    fn default() -> Self {
        Self {
            github_users: Vec::new(),
            keys: Vec::new(),
            key_url: default_key_url(),
            required: true,
            allow_http: false,
            fetch_timeout_secs: default_fetch_timeout(),
            ca_certificates: Vec::new(),
        }
    }
}

fn default_fetch_timeout() -> u32 {
    120
}

fn default_key_url() -> String {
    "https://github.com/{user}.keys".into()
}

fn yes() -> bool {
    true
}

/// One machine of the cluster, recognised by its hardware.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Node {
    pub name: Spanned<Hostname>,
    #[serde(default)]
    pub hostid: HostId,
    #[serde(default, rename = "match")]
    pub matches: NodeMatch,
    /// Disk rules for this node instead of `[disk] select`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskSelect>,
    /// SSH keys for root on this node only, besides `[ssh]`'s.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<String>,
    /// With `[payload] flake`: the flake attribute of this node's system
    /// (default: [`default_system_attr`] of its name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
}

/// Facts that recognise a machine; every given fact must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NodeMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dmi_serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_uuid: Option<String>,
    /// Six hex pairs separated by `:` (as sysfs shows a NIC's address).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "mac_address"
    )]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_serial: Option<String>,
}

/// A MAC address as `/sys/class/net/*/address` shows it, any case:
/// `52:54:00:aa:bb:02`. Anything else could never match a NIC.
fn mac_address<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let s = String::deserialize(d)?;
    let parts: Vec<&str> = s.split(':').collect();
    let ok = parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
    if ok {
        Ok(Some(s))
    } else {
        Err(serde::de::Error::custom(format!(
            "`{s}` is not a MAC address: write six hex pairs separated by `:`, e.g. \
             52:54:00:aa:bb:02"
        )))
    }
}

/// A `[default-node] hostname` template: `{serial}` is the one placeholder
/// (`nodes.rs` replaces it with the DMI serial); any other `{…}`, or a
/// lone brace, would be turned into `-` without a word.
fn hostname_template<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    let rest = s.replace("{serial}", "");
    if let Some(at) = rest.find(['{', '}']) {
        let bad = rest[at..]
            .find('}')
            .map_or(&rest[at..], |end| &rest[at..at + end + 1]);
        return Err(serde::de::Error::custom(format!(
            "unknown placeholder `{bad}` in host name template `{s}`: only `{{serial}}` is \
             replaced (by the DMI serial)"
        )));
    }
    if rest.is_empty() && !s.contains("{serial}") {
        return Err(serde::de::Error::custom("empty host name template"));
    }
    Ok(s)
}

impl NodeMatch {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// What a machine that matches no node becomes.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DefaultNode {
    /// Install a generic node (true) or refuse (false).
    #[serde(default = "yes")]
    pub install: bool,
    /// Host name; `{serial}` is replaced by the DMI serial.
    #[serde(
        default = "default_hostname_template",
        deserialize_with = "hostname_template"
    )]
    pub hostname: String,
    #[serde(default)]
    pub hostid: HostId,
    /// With `[payload] flake`: the flake attribute of the generic node's
    /// system. None: the generic node gets no system from the flake (its
    /// host ID may only be known on the machine; docs/flake.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
}

impl Default for DefaultNode {
    fn default() -> Self {
        Self {
            install: true,
            hostname: default_hostname_template(),
            hostid: HostId::Derive,
            system: None,
        }
    }
}

fn default_hostname_template() -> String {
    "install".into()
}

/// What boots the installed disk: systemd-boot on its ESP and one entry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Boot {
    pub system: BootSystem,
    /// For `generic`: the kernel, as a path in the store (`HASH-NAME/…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// For `generic`: the initrd, as a path in the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// For `nixos`: the system's top-level store path (`HASH-nixos-system-…`);
    /// by default the payload's `closure`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub toplevel: Option<String>,
    /// Kernel command line of the installed system (`generic` and `check`).
    #[serde(default = "default_boot_cmdline")]
    pub cmdline: String,
}

fn default_boot_cmdline() -> String {
    "console=tty0 console=ttyS0,115200".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootSystem {
    /// A kernel and initrd of the store, named by `kernel` and `initrd`.
    Generic,
    /// nodeflash's own small system, added to the store by the builder: its
    /// stage 1 imports the pool, mounts it and prints what it finds (tests).
    Check,
    /// A NixOS system: the installer does what `nixos-install` does once the
    /// store is in place and runs the system's own `switch-to-configuration
    /// boot` in a chroot of the installed root, with the ESP on `/boot`.
    Nixos,
}

impl Boot {
    /// The NixOS top-level store path name, for `system = "nixos"`.
    pub fn nixos_toplevel(&self, payload: &Payload) -> Option<String> {
        (self.system == BootSystem::Nixos).then(|| {
            self.toplevel.clone().unwrap_or_else(|| {
                let closure = payload.closure.as_deref().unwrap_or_default();
                closure.trim_start_matches("/nix/store/").to_string()
            })
        })
    }
}

/// What the installer does when it is done, and when it fails.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Finish {
    #[serde(default)]
    pub on_success: OnSuccess,
    #[serde(default)]
    pub on_failure: OnFailure,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnSuccess {
    #[default]
    Poweroff,
    Reboot,
    Halt,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnFailure {
    /// Keep the message on screen and wait for a person.
    #[default]
    Halt,
    Poweroff,
}

/// A byte count written as `512MiB`, `1GiB`, `1TB` or a plain number of bytes.
///
/// Units: `B`, `KiB`, `MiB`, `GiB`, `TiB` (powers of two) and `KB`/`kB`,
/// `MB`, `GB`, `TB` (powers of ten). A bare `K`, `M`, `G` or `T` is refused:
/// `1T` reads as 1 TiB to ZFS and Linux tools but as 1 TB on a drive's
/// label, and a `min-size = "1T"` taken as TiB would refuse a 1 TB drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct Size(pub u64);

impl TryFrom<String> for Size {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Size> for String {
    fn from(s: Size) -> String {
        s.to_string()
    }
}

impl std::str::FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        if num.is_empty() {
            return Err(format!(
                "invalid size `{s}`: expected a number and a unit, e.g. \"512MiB\" or \"1TB\""
            ));
        }
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            u @ ("K" | "M" | "G" | "T" | "k" | "m" | "g" | "t") => {
                let u = u.to_ascii_uppercase();
                let n = num;
                return Err(format!(
                    "`{s}` is ambiguous: write `{n}{u}iB` (binary, as ZFS and Linux count) or \
                     `{n}{u}B` (decimal, as drives are sold)"
                ));
            }
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            u => {
                return Err(format!(
                "unknown size unit `{u}` in `{s}` (use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB)"
            ))
            }
        };
        let bytes = if let Some((int, frac)) = num.split_once('.') {
            let int: u64 = int.parse().map_err(|_| format!("invalid size `{s}`"))?;
            // 10^20 does not fit in a u64: more decimals than that are refused.
            let scale = u32::try_from(frac.len())
                .ok()
                .and_then(|n| 10u64.checked_pow(n))
                .ok_or_else(|| format!("invalid size `{s}`: too many decimals"))?;
            let frac: u64 = frac.parse().map_err(|_| format!("invalid size `{s}`"))?;
            int.checked_mul(mult)
                .and_then(|v| v.checked_add(frac.checked_mul(mult)? / scale))
        } else {
            num.parse::<u64>()
                .map_err(|_| format!("invalid size `{s}`"))?
                .checked_mul(mult)
        };
        bytes
            .map(Size)
            .ok_or_else(|| format!("size `{s}` is too large"))
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 8] = [
            ("TiB", 1 << 40),
            ("TB", 1_000_000_000_000),
            ("GiB", 1 << 30),
            ("GB", 1_000_000_000),
            ("MiB", 1 << 20),
            ("MB", 1_000_000),
            ("KiB", 1 << 10),
            ("KB", 1_000),
        ];
        for (unit, m) in UNITS {
            if self.0 >= m && self.0.is_multiple_of(m) {
                return write!(f, "{}{unit}", self.0 / m);
            }
        }
        write!(f, "{}B", self.0)
    }
}

/// A ZFS host ID: 8 hex digits, derived from the machine, or random.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub enum HostId {
    Fixed(u32),
    /// A stable hash of the machine's identity (reinstalls keep it).
    #[default]
    Derive,
    Random,
}

impl TryFrom<String> for HostId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "derive" => Ok(Self::Derive),
            "random" => Ok(Self::Random),
            hex if hex.len() == 8 && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
                let v = u32::from_str_radix(hex, 16).map_err(|e| e.to_string())?;
                if v == 0 {
                    Err("host ID 00000000 is not valid: ZFS treats it as \"no host ID\"".into())
                } else {
                    Ok(Self::Fixed(v))
                }
            }
            _ => Err(format!(
                "invalid host ID `{s}`: expected 8 hex digits (e.g. 472479d4), \"derive\" or \"random\""
            )),
        }
    }
}

impl From<HostId> for String {
    fn from(h: HostId) -> String {
        match h {
            HostId::Fixed(v) => format!("{v:08x}"),
            HostId::Derive => "derive".into(),
            HostId::Random => "random".into(),
        }
    }
}

macro_rules! checked_string {
    ($(#[$m:meta])* $name:ident, $check:expr) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(pub String);

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                let check: fn(&str) -> Result<(), String> = $check;
                check(&s).map(|()| Self(s))
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

checked_string!(
    /// A profile name: lowercase letters, digits and `-`, used in file names.
    Name,
    |s| {
        if !s.is_empty()
            && s.len() <= 32
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            Ok(())
        } else {
            Err(format!("invalid name `{s}`: use 1-32 lowercase letters, digits or `-`"))
        }
    }
);

checked_string!(
    /// A host name (RFC 1123 label).
    Hostname,
    |s| {
        let ok = !s.is_empty()
            && s.len() <= 63
            && !s.starts_with('-')
            && !s.ends_with('-')
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(())
        } else {
            Err(format!("invalid host name `{s}`: use 1-63 lowercase letters, digits or `-`, not at either end"))
        }
    }
);

checked_string!(
    /// A ZFS pool name, as `zpool create` accepts it
    /// ([`crate::zprop::check_pool_name`], `module/zcommon/zfs_namecheck.c`).
    PoolName,
    crate::zprop::check_pool_name
);

checked_string!(
    /// A ZFS dataset name below the pool (`local/nix`), as `zfs create`
    /// accepts it ([`crate::zprop::check_dataset_name`],
    /// `module/zcommon/zfs_namecheck.c`).
    DatasetName,
    crate::zprop::check_dataset_name
);

checked_string!(
    /// An absolute mount point, `legacy` or `none`.
    Mountpoint,
    |s| {
        if s == "legacy" || s == "none" || (s.starts_with('/') && !s.contains("//") && !s.split('/').any(|c| c == "..")) {
            Ok(())
        } else {
            Err(format!("invalid mountpoint `{s}`: use an absolute path, \"legacy\" or \"none\""))
        }
    }
);

impl Profile {
    /// Reads and validates a profile file.
    pub fn load(path: &Path) -> Result<Self> {
        let src = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read profile {}", path.display()))?;
        Ok(Self::parse(&src, &path.display().to_string())?)
    }

    /// Parses and validates profile text; `file` is used in error messages.
    /// Errors: the first problem, with its line, column and key
    /// ([`ProfileError`]).
    pub fn parse(src: &str, file: &str) -> Result<Self, ProfileError> {
        let de = toml::Deserializer::new(src);
        let profile: Profile = serde_path_to_error::deserialize(de)
            .map_err(|e| ProfileError::from_toml(src, file, e))?;
        profile
            .validate()
            .map_err(|p| ProfileError::from_problem(src, file, &profile, p))?;
        Ok(profile)
    }

    /// The profile as resolved TOML: every default filled in.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print profile: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) const MINIMAL: &str = r#"
name = "t"
[disk]
select = { serial = "S1" }
[pool]
"#;

    pub(super) fn err(src: &str) -> ProfileError {
        Profile::parse(src, "t.toml").expect_err("profile should be refused")
    }

    /// The line (1-based) of the first line of `src` that contains `text`.
    pub(super) fn line_of(src: &str, text: &str) -> usize {
        src.lines()
            .position(|l| l.contains(text))
            .expect("text in src")
            + 1
    }

    /// Refused, with this key, on the line that holds `at`, and a message
    /// containing `want`.
    pub(super) fn refused(src: &str, key: &str, at: &str, want: &str) {
        let e = err(src);
        assert_eq!(e.key, key, "{e}");
        assert_eq!(e.line, line_of(src, at), "{e}");
        assert!(e.message.contains(want), "{e}");
        assert!(e.to_string().starts_with("t.toml:"), "{e}");
    }

    #[test]
    fn minimal_profile_gets_defaults() {
        let p = Profile::parse(MINIMAL, "t.toml").expect("valid");
        assert_eq!(p.pool.name.0, "rpool");
        assert_eq!(p.disk.esp_size, Size(1 << 30));
        assert_eq!(p.disk.wipe, Wipe::IfEmpty);
        assert_eq!(p.finish.on_success, OnSuccess::Poweroff);
        assert_eq!(p.finish.on_failure, OnFailure::Halt);
        assert!(p.ssh.required);
        // The resolved form parses back to the same thing.
        let again = Profile::parse(&p.to_toml(), "resolved").expect("resolved profile parses");
        assert_eq!(again.to_toml(), p.to_toml());
    }

    #[test]
    fn bad_value_names_key() {
        let src = MINIMAL.replace(
            "[pool]",
            "[pool]\n[[nodes]]\nname = \"logos\"\nhostid = \"xyz\"\n",
        );
        let e = err(&src);
        assert_eq!(e.key, "nodes[0].hostid", "{e}");
        assert_eq!(e.line, 8, "{e}");
        assert!(e.message.contains("8 hex digits"), "{e}");
    }

    #[test]
    fn bad_size_and_enum() {
        let e = err(&MINIMAL.replace("select =", "esp-size = \"1 parsec\"\nselect ="));
        assert_eq!(e.key, "disk.esp-size", "{e}");
        assert!(e.message.contains("unit"), "{e}");
        let e = err(&format!(
            "{}\n[finish]\non-success = \"reboot\"\n",
            MINIMAL.replace("select =", "wipe = \"always\"\nselect =")
        ));
        assert_eq!(e.key, "finish.on-success");
        assert!(e.message.contains("reboot loop"), "{}", e.message);
        let e = err(&MINIMAL.replace("select =", "wipe = \"sometimes\"\nselect ="));
        assert_eq!(e.key, "disk.wipe", "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!("1GiB".parse::<Size>(), Ok(Size(1 << 30)));
        assert_eq!("1TB".parse::<Size>(), Ok(Size(1_000_000_000_000)));
        assert_eq!("1.5GiB".parse::<Size>(), Ok(Size(3 << 29)));
        assert_eq!("4096".parse::<Size>(), Ok(Size(4096)));
        assert!("-1G".parse::<Size>().is_err());
        assert!("99999999999TiB".parse::<Size>().is_err());
        // Found while writing the `profile` fuzz target: 20 decimals overflowed
        // the scale (a panic with overflow checks, a wrong size without).
        assert_eq!(
            "1.0000000000000000000GiB".parse::<Size>(),
            Ok(Size(1 << 30)),
            "19 decimals"
        );
        let e = "1.00000000000000000000GiB"
            .parse::<Size>()
            .expect_err("20 decimals");
        assert!(e.contains("too many decimals"), "{e}");
        assert_eq!(Size(1 << 30).to_string(), "1GiB");
        assert_eq!(Size(900_000_000_000).to_string(), "900GB");
    }

    #[test]
    fn pool_and_dataset_names_follow_zfs() {
        for name in [
            "mirror", "log", "1pool", "raidz2", "spare1", "draid", "rp/ool",
        ] {
            let src = MINIMAL.replace("[pool]", &format!("[pool]\nname = \"{name}\""));
            let e = err(&src);
            assert_eq!(e.key, "pool.name", "{name}: {e}");
            assert_eq!(
                e.line,
                line_of(&src, &format!("name = \"{name}\"")),
                "{name}: {e}"
            );
        }
        let src = MINIMAL.replace("[pool]", "[pool]\nname = \"mirror\"");
        refused(&src, "pool.name", "mirror", "reserved");
        let src = format!("{MINIMAL}[[pool.datasets]]\nname = \"nix@x\"\n");
        refused(
            &src,
            "pool.datasets[0].name",
            "nix@x",
            "invalid character `@`",
        );
        for name in ["tank", "Data", "c0pool"] {
            let src = MINIMAL.replace("[pool]", &format!("[pool]\nname = \"{name}\""));
            Profile::parse(&src, "t.toml").expect(name);
        }
    }

    #[test]
    fn ambiguous_size_units_are_refused() {
        let src = MINIMAL.replace("serial = \"S1\"", "bus = \"nvme\", min-size = \"1T\"");
        refused(
            &src,
            "disk.select.min-size",
            "min-size",
            "`1T` is ambiguous",
        );
        assert!(err(&src).message.contains("`1TiB`") && err(&src).message.contains("`1TB`"));
        for bad in ["1K", "512M", "1G", "2t"] {
            assert!(bad.parse::<Size>().is_err(), "{bad}");
        }
        assert_eq!("1TiB".parse::<Size>(), Ok(Size(1 << 40)));
        assert_eq!("1kB".parse::<Size>(), Ok(Size(1000)));
    }

    #[test]
    fn a_bad_mac_and_an_unknown_placeholder_are_refused_with_their_line() {
        let src = format!("{MINIMAL}[[nodes]]\nname = \"a\"\nmatch = {{ mac = \"not-a-mac\" }}\n");
        refused(
            &src,
            "nodes[0].match.mac",
            "not-a-mac",
            "is not a MAC address",
        );
        for bad in ["52:54:00:aa:bb", "52-54-00-aa-bb-02", "52:54:00:aa:bb:0g"] {
            let src = format!("{MINIMAL}[[nodes]]\nname = \"a\"\nmatch = {{ mac = \"{bad}\" }}\n");
            assert!(err(&src).message.contains("not a MAC address"), "{bad}");
        }
        let src = format!("{MINIMAL}[default-node]\nhostname = \"node-{{uuid}}\"\n");
        refused(
            &src,
            "default-node.hostname",
            "node-{uuid}",
            "unknown placeholder `{uuid}`",
        );
        let src = format!("{MINIMAL}[default-node]\nhostname = \"node-{{serial\"\n");
        assert!(
            err(&src).message.contains("unknown placeholder"),
            "lone brace"
        );
        let ok = format!(
            "{MINIMAL}[default-node]\nhostname = \"node-{{serial}}\"\n[[nodes]]\nname = \"a\"\nmatch = {{ mac = \"52:54:00:AA:bb:02\" }}\n"
        );
        Profile::parse(&ok, "t.toml").expect("valid");
    }
}

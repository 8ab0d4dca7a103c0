//! The profile: one TOML file that describes a whole install.
//!
//! Parsing rejects unknown keys and reports every error with the file, line,
//! column and the dotted key at fault. Values that can be checked on their own
//! (sizes, host IDs, names, mountpoints) are checked while parsing, so their
//! errors carry a position too; checks across several keys run in
//! [`Profile::validate`] and point at the item they concern.
//!
//! The format is documented in `docs/profile.md`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;
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

impl DiskSelect {
    /// At least one rule; a device name only with a size range; a sane
    /// range. On error: the key below the selector, and the message.
    fn check(&self) -> Result<(), (String, String)> {
        if *self == Self::default() {
            return Err((
                String::new(),
                "give at least one rule (serial, wwn, model, min-size/max-size, bus)".into(),
            ));
        }
        if self.device.is_some() && (self.min_size.is_none() || self.max_size.is_none()) {
            return Err((
                ".device".into(),
                "a device name is not a safe selector on its own: add min-size and max-size".into(),
            ));
        }
        if let (Some(lo), Some(hi)) = (self.min_size, self.max_size) {
            if lo > hi {
                return Err((
                    String::new(),
                    format!("min-size {lo} is larger than max-size {hi}"),
                ));
            }
        }
        Ok(())
    }
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

impl Ssh {
    /// The key URL, user names, inline keys and CA file names. On error: the
    /// key below `ssh`, and the message.
    fn check(&self) -> Result<(), (String, String)> {
        let url = &self.key_url;
        if url.starts_with("http://") && !self.allow_http {
            return Err((
                ".key-url".into(),
                "keys over plain http are refused: use https, or set `allow-http = true`".into(),
            ));
        }
        if !url.starts_with("https://") && !url.starts_with("http://") {
            return Err((".key-url".into(), format!("`{url}` is not an https:// URL")));
        }
        if let Err(e) = crate::net::url::check_url(&url.replace("{user}", "user")) {
            return Err((".key-url".into(), format!("`{url}`: {e}")));
        }
        if !self.github_users.is_empty() && !url.contains("{user}") {
            return Err((
                ".key-url".into(),
                format!("`{url}` has no `{{user}}` to replace with each of `github-users`"),
            ));
        }
        for (i, user) in self.github_users.iter().enumerate() {
            let ok = !user.is_empty()
                && user
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !ok {
                return Err((
                    format!(".github-users[{i}]"),
                    format!("`{user}` is not a user name (letters, digits, `-`, `_`, `.`)"),
                ));
            }
        }
        for (i, key) in self.keys.iter().enumerate() {
            crate::net::keys::parse_line(key, "").map_err(|e| (format!(".keys[{i}]"), e))?;
        }
        for (i, path) in self.ca_certificates.iter().enumerate() {
            if path.trim().is_empty() {
                return Err((format!(".ca-certificates[{i}]"), "empty file name".into()));
            }
        }
        Ok(())
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

/// A profile error with its place in the file.
#[derive(Debug)]
pub struct ProfileError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ProfileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if !self.key.is_empty() {
            write!(f, "`{}`: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ProfileError {}

/// Where a key without a recorded span is written: the first line that
/// assigns its last component (`compresion = …` or `compresion=` in a table).
fn find_key(src: &str, key: &str) -> Option<Range<usize>> {
    let last = key.rsplit('.').next()?.split('[').next()?;
    let mut offset = 0;
    for line in src.split_inclusive('\n') {
        let code = line.split('#').next().unwrap_or("");
        for (i, _) in code.match_indices(last) {
            let before = code[..i].chars().next_back();
            let after = code[i + last.len()..].trim_start();
            let starts =
                before.is_none_or(|c| c == ' ' || c == '{' || c == ',' || c == '\t' || c == '"');
            // A quoted key (`"feature@x" = …`) ends with its quote and `=`;
            // a quoted value that happens to be the key's name does not.
            let quoted = after
                .strip_prefix('"')
                .is_some_and(|a| a.trim_start().starts_with('='));
            if starts && (after.starts_with('=') || quoted) {
                return Some(offset + i..offset + i + last.len());
            }
        }
        offset += line.len();
    }
    None
}

/// serde's "missing field `x`" with what to write instead, for the
/// sections and keys that have no default.
fn explain_missing(key: &str, message: &str) -> String {
    let Some(field) = message
        .strip_prefix("missing field `")
        .and_then(|m| m.strip_suffix('`'))
    else {
        return message.to_string();
    };
    match (key, field) {
        ("", "disk") => "the profile has no [disk] section: add one with `select = { … }`, the \
                         rules that choose the disk to install on (it has no default, because \
                         that disk is wiped; see docs/profile.md)"
            .into(),
        ("disk", "select") => {
            "[disk] has no `select`: give the rules that choose the disk to \
                               install on, e.g. `select = { serial = \"…\" }` (see docs/profile.md)"
                .into()
        }
        ("", "name") => "the profile has no `name` (lowercase letters, digits, `-`)".into(),
        _ => format!("`{field}` is required here"),
    }
}

fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(src.len());
    let before = &src[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
    (line, col)
}

/// The checks of one pool's own tree, `[pool]` or `[[pools]]` N (`prefix`
/// is `pool` or `pools[N]`): dataset parents defined first, unique names,
/// unique mountpoints, ZFS names and properties ([`crate::zprop`]),
/// snapshots and volumes. Returns the dataset names.
/// A validation problem: the span (when known), the key and the message.
type Problem = (Option<Range<usize>>, String, String);

fn check_pool_tree(pool: &Pool, prefix: &str) -> Result<BTreeSet<String>, Problem> {
    // Datasets: parents defined first, names unique, mountpoints unique.
    let mut names = BTreeSet::new();
    for (i, ds) in pool.datasets.iter().enumerate() {
        let key = format!("{prefix}.datasets[{i}]");
        let name = &ds.name.get_ref().0;
        if let Some((parent, _)) = name.rsplit_once('/') {
            if !names.contains(parent) {
                return Err((
                    Some(ds.name.span()),
                    format!("{key}.name"),
                    format!("parent dataset `{parent}` of `{name}` is not defined before it"),
                ));
            }
        }
        if !names.insert(name.clone()) {
            return Err((
                Some(ds.name.span()),
                format!("{key}.name"),
                format!("dataset `{name}` is defined twice"),
            ));
        }
    }
    // Mountpoints as ZFS will have them (inherited, normalised) are unique.
    crate::datasets::tree(pool).map_err(|e| {
        let ds = e.dataset.and_then(|i| pool.datasets.get(i));
        let span = ds.map(|d| match &d.mountpoint {
            Some(m) if e.key.ends_with("].mountpoint") => m.span(),
            _ => d.name.span(),
        });
        let key = match e.key.strip_prefix("pool.") {
            Some(rest) => format!("{prefix}.{rest}"),
            None => e.key,
        };
        (span, key, e.message)
    })?;
    // ZFS names and property values as the node's ZFS checks them
    // (`crate::zprop`, from OpenZFS 2.1.11's own tables).
    let pool_name = &pool.name.0;
    for (i, ds) in pool.datasets.iter().enumerate() {
        crate::zprop::check_full_dataset_name(pool_name, &ds.name.get_ref().0).map_err(|e| {
            (
                Some(ds.name.span()),
                format!("{prefix}.datasets[{i}].name"),
                e,
            )
        })?;
    }
    for (k, v) in &pool.options {
        crate::zprop::check_pool_property(k, v)
            .map_err(|e| (None, format!("{prefix}.options.{k}"), e))?;
    }
    let mut dataset_options = vec![(format!("{prefix}.root-options"), &pool.root_options)];
    for (i, ds) in pool.datasets.iter().enumerate() {
        dataset_options.push((format!("{prefix}.datasets[{i}].options"), &ds.options));
    }
    for &(ref key, options) in &dataset_options {
        for (k, v) in options {
            crate::zprop::check_dataset_property(k, v)
                .map_err(|e| (None, format!("{key}.{k}"), e))?;
        }
        crate::zprop::check_encryption(options)
            .map_err(|(k, e)| (None, format!("{key}.{k}"), e))?;
    }
    crate::zprop::check_features(
        &pool.options,
        dataset_options.iter().map(|(k, o)| (k.clone(), *o)),
    )
    .map_err(|(k, e)| (None, k, e))?;
    check_snapshots_and_zvols(pool, prefix, &names)?;
    Ok(names)
}

/// Snapshot names (one component, as `zfs snapshot` takes it) and the
/// volumes: a parent that exists (`names`: the datasets), a unique name,
/// a `volsize` that is a positive multiple of `volblocksize` (a power of
/// two from 512 to 128K; `zfs_prop.c`, and libzfs's "volume size must
/// be a multiple of volume block size"), properties as for datasets, no
/// `mountpoint`/`canmount` (filesystem properties), and no swap.
fn check_snapshots_and_zvols(
    pool: &Pool,
    prefix: &str,
    names: &BTreeSet<String>,
) -> Result<(), (Option<Range<usize>>, String, String)> {
    for (i, ds) in pool.datasets.iter().enumerate() {
        let mut seen = BTreeSet::new();
        for (j, snap) in ds.snapshots.iter().enumerate() {
            let key = format!("{prefix}.datasets[{i}].snapshots[{j}]");
            crate::zprop::check_dataset_name(snap)
                .and_then(|()| {
                    if snap.contains('/') {
                        Err(format!(
                            "snapshot name `{snap}` has a `/`: give the name after the `@` only"
                        ))
                    } else {
                        Ok(())
                    }
                })
                .map_err(|e| (Some(ds.name.span()), key.clone(), e))?;
            if !seen.insert(snap) {
                return Err((
                    Some(ds.name.span()),
                    key,
                    format!("snapshot `{snap}` is given twice"),
                ));
            }
        }
    }
    let pool_name = &pool.name.0;
    let mut taken = names.clone();
    for (i, z) in pool.zvols.iter().enumerate() {
        let key = format!("{prefix}.zvols[{i}]");
        let span = Some(z.name.span());
        let name = &z.name.get_ref().0;
        if z.swap {
            return Err((
                span,
                format!("{key}.swap"),
                "swap on a ZFS volume can deadlock the machine under memory pressure (ZFS \
                 needs memory to write the pages the kernel is swapping out to free memory; \
                 openzfs/zfs#7734, open): use `[disk] swap-size`, a swap partition on \
                 every disk of the pool"
                    .into(),
            ));
        }
        if let Some((parent, _)) = name.rsplit_once('/') {
            if !names.contains(parent) {
                return Err((
                    span,
                    format!("{key}.name"),
                    format!("parent dataset `{parent}` of volume `{name}` is not among the pool's datasets"),
                ));
            }
        }
        if !taken.insert(name.clone()) {
            return Err((
                span,
                format!("{key}.name"),
                format!("`{name}` is defined twice"),
            ));
        }
        crate::zprop::check_full_dataset_name(pool_name, name)
            .map_err(|e| (span.clone(), format!("{key}.name"), e))?;
        let block = match z.options.get("volblocksize") {
            Some(v) => match crate::zprop::parse_number(v) {
                Some(b) if b.is_power_of_two() && (512..=128 << 10).contains(&b) => b,
                _ => {
                    return Err((
                        span,
                        format!("{key}.options.volblocksize"),
                        format!("volblocksize `{v}` is not a power of two from 512 to 128K"),
                    ))
                }
            },
            None => 8 << 10,
        };
        if z.volsize.0 == 0 || z.volsize.0 % block != 0 {
            return Err((
                span,
                format!("{key}.volsize"),
                format!(
                    "volsize {} is not a positive multiple of the volume's block size ({})",
                    z.volsize,
                    Size(block)
                ),
            ));
        }
        for (k, v) in &z.options {
            if k == "volblocksize" {
                continue;
            }
            if matches!(k.as_str(), "mountpoint" | "canmount" | "recordsize") {
                return Err((
                    span,
                    format!("{key}.options.{k}"),
                    format!("`{k}` is a file system property; a volume does not take it"),
                ));
            }
            crate::zprop::check_dataset_property(k, v)
                .map_err(|e| (span.clone(), format!("{key}.options.{k}"), e))?;
        }
        crate::zprop::check_encryption(&z.options)
            .map_err(|(k, e)| (span.clone(), format!("{key}.options.{k}"), e))?;
    }
    Ok(())
}

impl Profile {
    /// Reads and validates a profile file.
    pub fn load(path: &Path) -> Result<Self> {
        let src = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read profile {}", path.display()))?;
        Ok(Self::parse(&src, &path.display().to_string())?)
    }

    /// Parses and validates profile text; `file` is used in error messages.
    pub fn parse(src: &str, file: &str) -> Result<Self, ProfileError> {
        let error = |span: Option<Range<usize>>, key: String, message: String| {
            let (line, column) = span.map_or((1, 1), |s| line_col(src, s.start));
            ProfileError {
                file: file.to_string(),
                line,
                column,
                key,
                message,
            }
        };
        let de = toml::Deserializer::new(src);
        let profile: Profile = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            // `Spanned` values add a private path component.
            let key = key.replace(".$__serde_spanned_private_value", "");
            let key = if key == "." { String::new() } else { key };
            let raw = inner.message().trim();
            let message = explain_missing(&key, raw);
            // A missing key is named like any other: `disk`, `disk.select`.
            let key = match raw
                .strip_prefix("missing field `")
                .and_then(|m| m.strip_suffix('`'))
            {
                Some(field) if key.is_empty() => field.to_string(),
                Some(field) => format!("{key}.{field}"),
                None => key,
            };
            error(inner.span(), key, message)
        })?;
        profile.validate().map_err(|(span, key, msg)| {
            // A key of `[[pools]]` N is looked for from that table on, one
            // of its `datasets` N from that one on.
            let index = |k: &str, prefix: &str| -> Option<(usize, String)> {
                let rest = k.strip_prefix(prefix)?;
                let (n, rest) = rest.split_once(']')?;
                Some((n.parse().ok()?, rest.trim_start_matches('.').to_string()))
            };
            let (pool, rest, table_from) = match index(&key, "pools[") {
                Some((n, rest)) => (
                    profile.pools.get(n),
                    rest,
                    src.match_indices("[[pools]]")
                        .nth(n)
                        .map_or(0, |(at, _)| at),
                ),
                None => (
                    Some(&profile.pool),
                    key.strip_prefix("pool.").unwrap_or_default().to_string(),
                    0,
                ),
            };
            let from = index(&rest, "datasets[")
                .and_then(|(i, _)| pool?.datasets.get(i))
                .map_or(table_from, |d| {
                    let at = d.name.span().start;
                    src[..at].rfind("[[").unwrap_or(at)
                });
            // A key left out (a default) is shown at its table.
            let span = span
                .or_else(|| find_key(&src[from..], &key).map(|r| r.start + from..r.end + from))
                .or((from > 0).then_some(from..from));
            error(span, key, msg)
        })?;
        Ok(profile)
    }

    /// Checks that span several keys. Returns the span, key and message of the
    /// first problem.
    fn validate(&self) -> Result<(), (Option<Range<usize>>, String, String)> {
        check_pool_tree(&self.pool, "pool")?;
        if !self.pool.disks.is_empty() {
            return Err((
                None,
                "pool.disks".into(),
                "the root pool's disks are [disk] `select` and `members`; `disks` is for a data \
                 pool ([[pools]])"
                    .into(),
            ));
        }
        self.check_data_pools()?;
        self.check_sizes()?;
        self.disk
            .select
            .check()
            .map_err(|(sub, msg)| (None, format!("disk.select{sub}"), msg))?;
        for (i, m) in self.disk.members.iter().enumerate() {
            m.check()
                .map_err(|(sub, msg)| (None, format!("disk.members[{i}]{sub}"), msg))?;
            let same = std::iter::once(&self.disk.select).chain(&self.disk.members[..i]);
            if same.clone().any(|o| o == m) {
                return Err((
                    None,
                    format!("disk.members[{i}]"),
                    "these rules are given twice: each disk of the pool needs rules of its own \
                     (a serial or wwn each)"
                        .into(),
                ));
            }
        }
        let disks = 1 + self.disk.members.len();
        let vdev = self.pool.vdev;
        if vdev == Vdev::Single && disks > 1 {
            return Err((
                None,
                "pool.vdev".into(),
                format!(
                    "[disk] names {disks} disks (select and members) and the pool's vdev is \
                     `single`: say how they are joined, `mirror`, `raidz1` or `raidz2` \
                     (a stripe, which loses the pool with any one disk, is not offered)"
                ),
            ));
        }
        if disks < vdev.min_disks() {
            return Err((
                None,
                "pool.vdev".into(),
                format!(
                    "a {} needs at least {} disks and [disk] names {disks} (select and members); \
                     add disks to `members`",
                    vdev.keyword().unwrap_or("single"),
                    vdev.min_disks()
                ),
            ));
        }
        if self.disk.wipe == Wipe::Always && self.finish.on_success == OnSuccess::Reboot {
            return Err((
                None,
                "finish.on-success".into(),
                "`reboot` with `disk.wipe = \"always\"` installs again at every boot while the \
                 stick is in (a reboot loop): use `poweroff` or `halt`, or `wipe = \"if-empty\"`"
                    .into(),
            ));
        }
        let p = &self.payload;
        let sources = [
            p.closure.is_some(),
            p.flake.is_some(),
            p.store.is_some(),
            p.synthetic.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() > 1 {
            return Err((
                None,
                "payload".into(),
                "give one of `closure`, `flake`, `store` or `synthetic`, not several".into(),
            ));
        }
        if p.flake.is_none() {
            if let Some(i) = self.nodes.iter().position(|n| n.system.is_some()) {
                return Err((
                    Some(self.nodes[i].name.span()),
                    format!("nodes[{i}].system"),
                    "a node's `system` is a flake attribute: it needs `flake` in [payload]".into(),
                ));
            }
            if self.default_node.system.is_some() {
                return Err((
                    None,
                    "default-node.system".into(),
                    "the default node's `system` is a flake attribute: it needs `flake` in [payload]"
                        .into(),
                ));
            }
        }
        // The generic node's system is built before any machine is seen:
        // it can only hold a host ID the profile fixes (docs/flake.md).
        if self.default_node.system.is_some()
            && !matches!(self.default_node.hostid, HostId::Fixed(_))
        {
            return Err((
                None,
                "default-node.hostid".into(),
                "a default node with its own `system` needs a fixed `hostid` (8 hex digits): \
                 its system is built before the machine is seen, so it cannot hold a host ID \
                 derived there; put the same ID into that system's networking.hostId \
                 (`nodeflash nixos-module` writes it as `default`)"
                    .into(),
            ));
        }
        if p.registration.is_some() && p.store.is_none() {
            return Err((
                None,
                "payload.registration".into(),
                "`registration` goes with `store` (a closure brings its own)".into(),
            ));
        }
        if let Some(c) = &p.closure {
            if !c.starts_with("/nix/store/") {
                return Err((
                    None,
                    "payload.closure".into(),
                    format!(
                        "{c:?} is not a /nix/store path: give the store path itself \
                         (for `./result`, what `readlink -f result` prints); `store` is for \
                         a directory of store paths copied from another machine"
                    ),
                ));
            }
        }
        if let Some(boot) = &self.boot {
            match boot.system {
                BootSystem::Generic => {
                    if boot.kernel.is_none() || boot.initrd.is_none() || p.is_empty() {
                        return Err((
                            None,
                            "boot".into(),
                            "a `generic` system needs `kernel` and `initrd` from the payload"
                                .into(),
                        ));
                    }
                }
                BootSystem::Nixos if p.flake.is_some() => {
                    if boot.toplevel.is_some() || boot.kernel.is_some() || boot.initrd.is_some() {
                        return Err((
                            None,
                            "boot".into(),
                            "with a `flake`, each node's system is its own flake attribute \
                             (`system` of [[nodes]]): give no `toplevel`, `kernel` or `initrd`"
                                .into(),
                        ));
                    }
                }
                BootSystem::Nixos => {
                    if boot.kernel.is_some() || boot.initrd.is_some() {
                        return Err((
                            None,
                            "boot".into(),
                            "a `nixos` system installs its own kernel and initrd: \
                             give `toplevel` (or a `closure`), not `kernel` or `initrd`"
                                .into(),
                        ));
                    }
                    let toplevel = boot.nixos_toplevel(p).unwrap_or_default();
                    if p.is_empty()
                        || toplevel.contains('/')
                        || crate::payload::check_path(&toplevel).is_err()
                    {
                        return Err((
                            None,
                            "boot.toplevel".into(),
                            format!(
                                "{toplevel:?} is not a store path name (`HASH-nixos-system-…`); \
                                 a `nixos` system needs `toplevel` or a `closure` in [payload]"
                            ),
                        ));
                    }
                }
                BootSystem::Check => {
                    if p.closure.is_some() || p.store.is_some() || p.flake.is_some() {
                        return Err((
                            None,
                            "boot.system".into(),
                            "the `check` system goes with a synthetic store or none".into(),
                        ));
                    }
                }
            }
            for (key, path) in [("kernel", &boot.kernel), ("initrd", &boot.initrd)] {
                if let Some(path) = path {
                    if crate::payload::check_path(path).is_err() {
                        return Err((
                            None,
                            format!("boot.{key}"),
                            format!("{path:?} is not a path in the store (`HASH-NAME/…`)"),
                        ));
                    }
                }
            }
        }
        // As mounted by the install (inherited mountpoints and canmount count).
        let holds_store = crate::datasets::mounts(&self.pool)
            .iter()
            .any(|m| ["/", "/nix", "/nix/store"].contains(&m.mountpoint.as_str()));
        if !p.is_empty() && !holds_store {
            return Err((
                None,
                "payload".into(),
                "no dataset is mounted at /, /nix or /nix/store to hold the store".into(),
            ));
        }
        if !(1..=22).contains(&p.level) {
            return Err((
                None,
                "payload.level".into(),
                format!("zstd level {} is out of range (1 to 22)", p.level),
            ));
        }
        if p.workers == Some(0) {
            return Err((
                None,
                "payload.workers".into(),
                "at least one worker is needed".into(),
            ));
        }
        for (i, node) in self.nodes.iter().enumerate() {
            for (k, key) in node.keys.iter().enumerate() {
                crate::net::keys::parse_line(key, "")
                    .map_err(|e| (Some(node.name.span()), format!("nodes[{i}].keys[{k}]"), e))?;
            }
            if let Some(sel) = &node.disk {
                sel.check().map_err(|(sub, msg)| {
                    (Some(node.name.span()), format!("nodes[{i}].disk{sub}"), msg)
                })?;
            }
        }
        // Nodes: unique names, host IDs and match rules.
        let mut seen_names = BTreeSet::new();
        let mut seen_ids = BTreeMap::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let name = &node.name.get_ref().0;
            let key = format!("nodes[{i}]");
            if !seen_names.insert(name.clone()) {
                return Err((
                    Some(node.name.span()),
                    format!("{key}.name"),
                    format!("node `{name}` is defined twice"),
                ));
            }
            if let HostId::Fixed(id) = node.hostid {
                if let Some(other) = seen_ids.insert(id, name.clone()) {
                    return Err((
                        Some(node.name.span()),
                        format!("{key}.hostid"),
                        format!("host ID {id:08x} is also given to node `{other}`"),
                    ));
                }
            }
            if !node.matches.is_empty() {
                if let Some(other) = self.nodes[..i].iter().find(|n| n.matches == node.matches) {
                    return Err((
                        Some(node.name.span()),
                        format!("{key}.match"),
                        format!(
                            "node `{name}` has the same match rules as node `{}`",
                            other.name.get_ref()
                        ),
                    ));
                }
            }
        }
        self.ssh
            .check()
            .map_err(|(key, msg)| (None, format!("ssh{key}"), msg))
    }

    /// The data pools (`[[pools]]`) and every pool's whole-disk devices:
    /// names unique among all pools, each tree as [`check_pool_tree`]
    /// checks it, enough disks for the vdev (`zpool create` refuses fewer:
    /// `is_grouping` in OpenZFS's `cmd/zpool/zpool_vdev.c`), a `special`
    /// class as redundant as a redundant pool (zpool refuses a single
    /// special device beside a mirror or raidz with "mismatched replication
    /// level", and losing it loses the pool), no rules given twice in the
    /// whole profile, no data pool dataset at `/` and no mountpoint shared
    /// between pools.
    fn check_data_pools(&self) -> Result<(), (Option<Range<usize>>, String, String)> {
        let mut names = vec![self.pool.name.0.clone()];
        let mut mounts: Vec<(String, String)> = crate::datasets::mounts(&self.pool)
            .into_iter()
            .map(|m| (m.mountpoint, "[pool]".to_string()))
            .collect();
        let mut rules: Vec<(String, &DiskSelect)> =
            vec![("disk.select".to_string(), &self.disk.select)];
        for (i, m) in self.disk.members.iter().enumerate() {
            rules.push((format!("disk.members[{i}]"), m));
        }
        let mut all_pools = vec![("pool".to_string(), &self.pool)];
        for (n, pool) in self.pools.iter().enumerate() {
            all_pools.push((format!("pools[{n}]"), pool));
        }
        for (prefix, pool) in &all_pools {
            let data = *prefix != "pool";
            if data {
                check_pool_tree(pool, prefix)?;
                let name = &pool.name.0;
                if names.contains(name) {
                    return Err((
                        None,
                        format!("{prefix}.name"),
                        format!(
                            "pool name `{name}` is used twice: give each [[pools]] entry a \
                             `name` of its own (the root pool is `{}`)",
                            self.pool.name
                        ),
                    ));
                }
                names.push(name.clone());
                let disks = pool.disks.len();
                if disks == 0 {
                    return Err((
                        None,
                        format!("{prefix}.disks"),
                        "a data pool needs `disks`: the rules of each disk it is made of".into(),
                    ));
                }
                if pool.vdev == Vdev::Single && disks > 1 {
                    return Err((
                        None,
                        format!("{prefix}.vdev"),
                        format!(
                            "`disks` names {disks} disks and the vdev is `single`: say how they \
                             are joined, `mirror`, `raidz1` or `raidz2` (a stripe, which loses \
                             the pool with any one disk, is not offered)"
                        ),
                    ));
                }
                if disks < pool.vdev.min_disks() {
                    return Err((
                        None,
                        format!("{prefix}.vdev"),
                        format!(
                            "a {} needs at least {} disks and `disks` names {disks}",
                            pool.vdev.keyword().unwrap_or("single"),
                            pool.vdev.min_disks()
                        ),
                    ));
                }
                for m in crate::datasets::mounts(pool) {
                    if m.mountpoint == "/" {
                        return Err((
                            None,
                            prefix.to_string(),
                            format!(
                                "dataset {} of data pool {name} is mounted at /: the root file \
                                 system comes from the root pool ([pool])",
                                m.dataset
                            ),
                        ));
                    }
                    // What the installed system needs from the root pool;
                    // a data pool mounted over it hides it once imported.
                    let covers = |sys: &str| {
                        sys == m.mountpoint
                            || sys.starts_with(&format!("{}/", m.mountpoint))
                            || m.mountpoint.starts_with(&format!("{sys}/"))
                    };
                    if let Some(sys) = ["/boot", "/etc", "/nix/store"]
                        .into_iter()
                        .find(|s| covers(s))
                    {
                        return Err((
                            None,
                            prefix.to_string(),
                            format!(
                                "dataset {} of data pool {name} is mounted at {}, over {sys}, \
                                 which the installed system needs from the root pool ([pool])",
                                m.dataset, m.mountpoint
                            ),
                        ));
                    }
                    if let Some((_, other)) = mounts.iter().find(|(mp, _)| *mp == m.mountpoint) {
                        return Err((
                            None,
                            prefix.to_string(),
                            format!(
                                "dataset {} is mounted at {}, where a dataset of {other} is \
                                 mounted too",
                                m.dataset, m.mountpoint
                            ),
                        ));
                    }
                    mounts.push((m.mountpoint, format!("[[pools]] {name}")));
                }
                for (i, d) in pool.disks.iter().enumerate() {
                    rules.push((format!("{prefix}.disks[{i}]"), d));
                }
            }
            if pool.vdev != Vdev::Single && pool.special.len() == 1 {
                return Err((
                    None,
                    format!("{prefix}.special"),
                    format!(
                        "one `special` disk beside a {} vdev: the special class holds the \
                         pool's metadata and losing it loses the pool, so it needs the pool's \
                         redundancy (zpool refuses it: \"mismatched replication level\"); \
                         give two or more disks (a mirror)",
                        pool.vdev.keyword().unwrap_or("single")
                    ),
                ));
            }
            for (class, list) in pool.aux_classes() {
                for (i, d) in list.iter().enumerate() {
                    rules.push((format!("{prefix}.{class}[{i}]"), d));
                }
            }
        }
        for (i, (key, sel)) in rules.iter().enumerate() {
            sel.check()
                .map_err(|(sub, msg)| (None, format!("{key}{sub}"), msg))?;
            if let Some((other, _)) = rules[..i].iter().find(|(_, o)| o == sel) {
                return Err((
                    None,
                    key.clone(),
                    format!(
                        "these rules are given twice (also as {other}): each disk needs rules \
                         of its own (a serial or wwn each)"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The sizes of `[disk]` against what the firmware, the kernel and ZFS
    /// accept on any disk: an ESP that is FAT32 with 512- or 4096-byte
    /// sectors ([`crate::disk::esp_fat32_problem`]; the plan checks the
    /// disk's own sector size), a swap partition of 10 to 2^32 pages of
    /// 4 KiB (mkswap's minimum, and the header's 32-bit page count), and a
    /// `max-size` that leaves room for the layout.
    fn check_sizes(&self) -> Result<(), (Option<Range<usize>>, String, String)> {
        let esp = self.disk.esp_size;
        let problems: Vec<String> = [512, 4096]
            .iter()
            .filter_map(|&lbs| crate::disk::esp_fat32_problem(esp.0, lbs))
            .collect();
        if problems.len() == 2 {
            return Err((
                None,
                "disk.esp-size".into(),
                format!(
                    "an ESP of {esp} cannot be FAT32 (UEFI firmware reads FAT32 from a disk): {}",
                    problems.join("; ")
                ),
            ));
        }
        if let Some(swap) = self.disk.swap_size {
            const PAGE: u64 = 4096;
            if swap.0 < 10 * PAGE {
                return Err((
                    None,
                    "disk.swap-size".into(),
                    format!(
                        "a swap partition of {swap} is too small: Linux needs at least 40KiB \
                         (10 pages); leave `swap-size` out for no swap"
                    ),
                ));
            }
            if swap.0 / PAGE > u64::from(u32::MAX) {
                return Err((
                    None,
                    "disk.swap-size".into(),
                    format!("a swap partition of {swap} is larger than Linux can use (16TiB)"),
                ));
            }
        }
        for (key, secs, what) in [
            (
                "image.device-timeout-secs",
                self.image.device_timeout_secs,
                "the stick and the disks need a moment to appear after the kernel starts",
            ),
            (
                "ssh.fetch-timeout-secs",
                self.ssh.fetch_timeout_secs,
                "no attempt to fetch keys could be made",
            ),
        ] {
            if secs == 0 {
                return Err((
                    None,
                    key.into(),
                    format!("0 seconds: {what}; use at least 1"),
                ));
            }
        }
        let mib = |s: Size| s.0.div_ceil(crate::plan::ALIGN_BYTES) * crate::plan::ALIGN_BYTES;
        let needed = crate::plan::ALIGN_BYTES
            + mib(esp)
            + self.disk.swap_size.map_or(0, mib)
            + crate::plan::MIN_ZFS_BYTES
            + crate::plan::ALIGN_BYTES;
        let mut selects = vec![("disk.select".to_string(), &self.disk.select, None)];
        for (i, m) in self.disk.members.iter().enumerate() {
            selects.push((format!("disk.members[{i}]"), m, None));
        }
        for (i, node) in self.nodes.iter().enumerate() {
            if let Some(sel) = &node.disk {
                selects.push((format!("nodes[{i}].disk"), sel, Some(node.name.span())));
            }
        }
        for (key, sel, span) in selects {
            if let Some(max) = sel.max_size {
                if max.0 < needed {
                    return Err((
                        span,
                        format!("{key}.max-size"),
                        format!(
                            "no disk of at most {max} can hold the layout, which needs at least \
                             {} (ESP {esp}, swap {}, ZFS at least {})",
                            Size(needed),
                            self.disk.swap_size.map_or("none".into(), |s| s.to_string()),
                            Size(crate::plan::MIN_ZFS_BYTES)
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The profile as resolved TOML: every default filled in.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print profile: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
name = "t"
[disk]
select = { serial = "S1" }
[pool]
"#;

    fn err(src: &str) -> ProfileError {
        Profile::parse(src, "t.toml").expect_err("profile should be refused")
    }

    #[test]
    fn several_disks_need_a_vdev_type_and_enough_disks() {
        let two = "name = \"t\"\n[disk]\nselect = { serial = \"A\" }\nmembers = [ { serial = \"B\" } ]\n[pool]\n";
        let e = err(two);
        assert_eq!(e.key, "pool.vdev", "{e}");
        assert!(
            e.message.contains("names 2 disks")
                && e.message.contains("`mirror`, `raidz1` or `raidz2`"),
            "{e}"
        );
        let e = err(&format!("{two}vdev = \"raidz2\"\n"));
        assert_eq!(e.key, "pool.vdev", "{e}");
        assert!(
            e.message
                .contains("a raidz2 needs at least 3 disks and [disk] names 2"),
            "{e}"
        );
        let e =
            err("name = \"t\"\n[disk]\nselect = { serial = \"A\" }\n[pool]\nvdev = \"mirror\"\n");
        assert!(e.message.contains("a mirror needs at least 2 disks"), "{e}");
        let e = err("name = \"t\"\n[disk]\nselect = { serial = \"A\" }\nmembers = [ { serial = \"A\" } ]\n[pool]\nvdev = \"mirror\"\n");
        assert_eq!(e.key, "disk.members[0]", "{e}");
        assert_eq!((e.line, e.column), (4, 1), "{e}");
        assert!(e.message.contains("given twice"), "{e}");
        let e = err("name = \"t\"\n[disk]\nselect = { serial = \"A\" }\nmembers = [ { } ]\n[pool]\nvdev = \"mirror\"\n");
        assert_eq!(e.key, "disk.members[0]", "{e}");
        let e = err("name = \"t\"\n[disk]\nselect = { serial = \"A\" }\nmembers = [ { serial = \"B\", max-size = \"100MiB\" } ]\n[pool]\nvdev = \"mirror\"\n");
        assert_eq!(e.key, "disk.members[0].max-size", "{e}");
        let p = Profile::parse(&format!("{two}vdev = \"mirror\"\n"), "t.toml").expect("mirror");
        assert_eq!(p.pool.vdev, Vdev::Mirror);
        let again = Profile::parse(&p.to_toml(), "resolved").expect("resolved profile parses");
        assert_eq!(again.disk.members, p.disk.members);
    }

    #[test]
    fn data_pools_are_checked_with_their_line_and_key() {
        let base = "name = \"t\"\n[disk]\nselect = { serial = \"A\" }\n";
        let tank = |body: &str| format!("{base}[[pools]]\nname = \"tank\"\n{body}");
        // A whole data pool: mirror, special mirror, log, cache, datasets, a volume.
        let src = tank(
            "vdev = \"mirror\"\ndisks = [ { serial = \"D1\" }, { serial = \"D2\" } ]\n\
             special = [ { serial = \"S1\" }, { serial = \"S2\" } ]\nlog = [ { serial = \"L1\" } ]\n\
             cache = [ { serial = \"C1\" } ]\nroot-options = { compression = \"zstd\" }\n\
             [[pools.datasets]]\nname = \"media\"\nmountpoint = \"/srv/media\"\n\
             [[pools.zvols]]\nname = \"vm0\"\nvolsize = \"1GiB\"\n",
        );
        let p = Profile::parse(&src, "t.toml").expect("data pool");
        assert_eq!(p.pools[0].disks.len(), 2);
        let again = Profile::parse(&p.to_toml(), "resolved").expect("resolved profile parses");
        assert_eq!(again.pools[0].special, p.pools[0].special);
        refused(
            &tank("disks = [ { serial = \"D1\" }, { serial = \"D2\" } ]\n"),
            "pools[0].vdev",
            "[[pools]]",
            "`disks` names 2 disks and the vdev is `single`",
        );
        refused(
            &tank("vdev = \"raidz2\"\ndisks = [ { serial = \"D1\" }, { serial = \"D2\" } ]\n"),
            "pools[0].vdev",
            "vdev = ",
            "a raidz2 needs at least 3 disks",
        );
        refused(
            &tank(""),
            "pools[0].disks",
            "[[pools]]",
            "a data pool needs `disks`",
        );
        refused(
            &format!("{base}[[pools]]\ndisks = [ {{ serial = \"D1\" }} ]\n"),
            "pools[0].name",
            "[[pools]]",
            "pool name `rpool` is used twice",
        );
        refused(
            &tank("disks = [ { serial = \"A\" } ]\n"),
            "pools[0].disks[0]",
            "disks = ",
            "given twice (also as disk.select)",
        );
        refused(
            &tank("vdev = \"mirror\"\ndisks = [ { serial = \"D1\" }, { serial = \"D2\" } ]\nspecial = [ { serial = \"S1\" } ]\n"),
            "pools[0].special",
            "special = ",
            "mismatched replication level",
        );
        refused(
            &tank("disks = [ { serial = \"D1\" } ]\nroot-options = { mountpoint = \"/\" }\n"),
            "pools[0]",
            "[[pools]]",
            "the root file system comes from the root pool",
        );
        refused(
            &tank("disks = [ { serial = \"D1\" } ]\nroot-options = { mountpoint = \"/nix\" }\n"),
            "pools[0]",
            "[[pools]]",
            "mounted at /nix, over /nix/store, which the installed system needs from the root pool",
        );
        refused(
            &tank("disks = [ { serial = \"D1\" } ]\n[[pools.datasets]]\nname = \"a/b\"\n"),
            "pools[0].datasets[0].name",
            "name = \"a/b\"",
            "parent dataset `a` of `a/b` is not defined before it",
        );
        refused(
            &tank("disks = [ { serial = \"D1\" } ]\n[[pools.datasets]]\nname = \"x\"\noptions = { compresion = \"lz4\" }\n"),
            "pools[0].datasets[0].options.compresion",
            "options = { compresion",
            "compresion",
        );
        refused(
            &format!(
                "{base}[pool]\nroot-options = {{ mountpoint = \"/srv\" }}\n[[pools]]\nname = \"tank\"\n\
                 disks = [ {{ serial = \"D1\" }} ]\nroot-options = {{ mountpoint = \"/srv\" }}\n"
            ),
            "pools[0]",
            "[[pools]]",
            "where a dataset of [pool] is mounted too",
        );
        refused(
            &format!("{base}[pool]\ndisks = [ {{ serial = \"D1\" }} ]\n"),
            "pool.disks",
            "disks = ",
            "`disks` is for a data pool",
        );
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
    fn payload_sources_are_checked() {
        let with =
            |payload: &str, datasets: &str| format!("{MINIMAL}{datasets}\n[payload]\n{payload}\n");
        let root = "[[pool.datasets]]\nname = \"root\"\nmountpoint = \"/\"";
        let e = err(&with(
            "store = \"s\"\nsynthetic = { files = 1, bytes = \"1KiB\" }",
            root,
        ));
        assert!(e.message.contains("not several"), "{e}");
        let e = err(&with("store = \"s\"", ""));
        assert!(
            e.message
                .contains("no dataset is mounted at /, /nix or /nix/store"),
            "{e}"
        );
        let e = err(&with("closure = \"./result\"", root));
        assert_eq!(e.key, "payload.closure", "{e}");
        assert!(e.message.contains("readlink -f result"), "{e}");
        let e = err(&with(
            "registration = \"r\"\nsynthetic = { files = 1, bytes = \"1KiB\" }",
            root,
        ));
        assert_eq!(e.key, "payload.registration", "{e}");
        let e = err(&with("store = \"s\"\nlevel = 30", root));
        assert!(e.message.contains("zstd level 30"), "{e}");
        let p = Profile::parse(&with("store = \"s\"\nworkers = 4", root), "t.toml").expect("valid");
        assert_eq!(
            (p.payload.level, p.payload.workers),
            (crate::payload::DEFAULT_LEVEL, Some(4))
        );
    }

    #[test]
    fn flake_rules_are_checked() {
        let root = "[[pool.datasets]]\nname = \"r\"\nmountpoint = \"/\"\n";
        let with =
            |payload: &str, rest: &str| format!("{MINIMAL}{root}\n[payload]\n{payload}\n{rest}");
        let e = err(&with("flake = \"f\"\nclosure = \"/nix/store/a-b\"", ""));
        assert_eq!(e.key, "payload", "{e}");
        let e = err(&with(
            "flake = \"f\"",
            "[boot]\nsystem = \"nixos\"\ntoplevel = \"a-nixos-system-x\"\n",
        ));
        assert_eq!(e.key, "boot", "{e}");
        let e = err(&with(
            "synthetic = { files = 1, bytes = \"1KiB\" }",
            "[[nodes]]\nname = \"n\"\nsystem = \"x\"\n",
        ));
        assert_eq!(e.key, "nodes[0].system", "{e}");
        let p = Profile::parse(
            &with(
                "flake = \"f\"",
                "[boot]\nsystem = \"nixos\"\n[[nodes]]\nname = \"n\"\nsystem = \"x\"\n",
            ),
            "t.toml",
        )
        .expect("a flake profile");
        assert_eq!(p.nodes[0].system.as_deref(), Some("x"));
        // The generic node's own system goes with a fixed host ID only.
        let e = err(&with(
            "flake = \"f\"",
            "[boot]\nsystem = \"nixos\"\n[default-node]\nsystem = \"d\"\n",
        ));
        assert_eq!(e.key, "default-node.hostid", "{e}");
        assert!(e.message.contains("needs a fixed `hostid`"), "{e}");
        let p = Profile::parse(
            &with(
                "flake = \"f\"",
                "[boot]\nsystem = \"nixos\"\n[default-node]\nsystem = \"d\"\nhostid = \"00c0ffee\"\n",
            ),
            "t.toml",
        )
        .expect("a default system with a fixed host ID");
        assert_eq!(p.default_node.system.as_deref(), Some("d"));
        assert_eq!(
            default_system_attr("kos-mos"),
            "nixosConfigurations.\"kos-mos\".config.system.build.toplevel"
        );
    }

    #[test]
    fn unknown_key_names_line_column_and_key() {
        let e =
            err("name = \"t\"\n[disk]\nselect = { serial = \"S1\" }\nwipes = \"always\"\n[pool]\n");
        assert_eq!((e.line, e.column), (4, 1), "{e}");
        assert!(e.message.contains("unknown field `wipes`"), "{e}");
        assert!(e.to_string().starts_with("t.toml:4:1: "), "{e}");
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
    fn missing_parent_dataset() {
        let src = format!("{MINIMAL}[[pool.datasets]]\nname = \"local/nix\"\n");
        let e = err(&src);
        assert_eq!(e.key, "pool.datasets[0].name");
        assert_eq!(e.line, 7, "{e}");
        assert!(e.message.contains("parent dataset `local`"), "{e}");
    }

    #[test]
    fn duplicate_mountpoint_and_relative_mountpoint() {
        let src = format!(
            "{MINIMAL}[[pool.datasets]]\nname = \"a\"\nmountpoint = \"/x\"\n[[pool.datasets]]\nname = \"b\"\nmountpoint = \"/x\"\n"
        );
        assert!(err(&src).message.contains("already used"));
        let src = format!("{MINIMAL}[[pool.datasets]]\nname = \"a\"\nmountpoint = \"x\"\n");
        assert_eq!(err(&src).key, "pool.datasets[0].mountpoint");
    }

    #[test]
    fn device_name_needs_size_range() {
        let e = err(&MINIMAL.replace("serial = \"S1\"", "device = \"nvme0n1\""));
        assert!(e.message.contains("not a safe selector"), "{e}");
    }

    #[test]
    fn a_nodes_disk_rules_are_checked_like_the_profiles() {
        let src = format!("{MINIMAL}[[nodes]]\nname = \"a\"\ndisk = {{}}\n");
        let e = err(&src);
        assert_eq!(e.key, "nodes[0].disk", "{e}");
        assert!(e.message.contains("at least one rule"), "{e}");
    }

    #[test]
    fn duplicate_host_ids_refused() {
        let src = format!(
            "{MINIMAL}[[nodes]]\nname = \"a\"\nhostid = \"472479d4\"\n[[nodes]]\nname = \"b\"\nhostid = \"472479D4\"\n"
        );
        assert!(err(&src).message.contains("also given"));
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
    fn unknown_zfs_property_is_refused_with_its_line() {
        let src = MINIMAL.replace(
            "[pool]",
            "[pool]\nroot-options = { compression = \"zstd\", compresion = \"zstd\" }",
        );
        let e = err(&src);
        assert_eq!(e.key, "pool.root-options.compresion", "{e}");
        assert_eq!((e.line, e.column), (6, 40), "{e}");
        // User properties and pool features are accepted.
        let ok = MINIMAL.replace("[pool]", "[pool]\noptions = { \"feature@zstd_compress\" = \"enabled\" }\nroot-options = { \"com.example:tag\" = \"x\" }");
        Profile::parse(&ok, "t.toml").expect("valid");
    }

    #[test]
    fn ssh_section_is_checked() {
        let with = |ssh: &str| MINIMAL.replace("[pool]", &format!("[ssh]\n{ssh}\n[pool]"));
        let ok = with(
            "github-users = [\"alice\", \"bob-2\"]\nkey-url = \"https://keys.example:8443/u/{user}\"\nca-certificates = [\"ca.pem\"]",
        );
        let p = Profile::parse(&ok, "t.toml").expect("valid");
        assert_eq!(p.ssh.ca_certificates, ["ca.pem"]);
        let again = Profile::parse(&p.to_toml(), "resolved").expect("resolved profile parses");
        assert_eq!(again.ssh.ca_certificates, ["ca.pem"]);
        for (ssh, key, want) in [
            (
                "key-url = \"http://x/{user}\"",
                "ssh.key-url",
                "plain http are refused",
            ),
            (
                "key-url = \"ftp://x/{user}\"",
                "ssh.key-url",
                "not an https:// URL",
            ),
            (
                "key-url = \"https://:9/{user}\"",
                "ssh.key-url",
                "no valid host name",
            ),
            (
                "github-users = [\"a\"]\nkey-url = \"https://x/keys\"",
                "ssh.key-url",
                "no `{user}`",
            ),
            (
                "github-users = [\"a/../b\"]",
                "ssh.github-users[0]",
                "not a user name",
            ),
            (
                "keys = [\"ssh-ed25519 !!\"]",
                "ssh.keys[0]",
                "not valid base64",
            ),
            (
                "ca-certificates = [\"\"]",
                "ssh.ca-certificates[0]",
                "empty file name",
            ),
        ] {
            let src = with(ssh);
            let e = err(&src);
            assert_eq!(e.key, key, "{e}");
            assert!(e.message.contains(want), "{e}");
            // The error points at the line that sets the key.
            let field = key["ssh.".len()..].split('[').next().unwrap_or_default();
            let line = src
                .lines()
                .position(|l| l.starts_with(field))
                .expect("key set");
            assert_eq!(e.line, line + 1, "{e}");
        }
        // Plain http when allowed; no `{user}` needed without users.
        Profile::parse(
            &with("allow-http = true\nkey-url = \"http://10.0.2.2:8080/keys\""),
            "t.toml",
        )
        .expect("valid");
    }

    /// The line (1-based) of the first line of `src` that contains `text`.
    fn line_of(src: &str, text: &str) -> usize {
        src.lines()
            .position(|l| l.contains(text))
            .expect("text in src")
            + 1
    }

    /// Refused, with this key, on the line that holds `at`, and a message
    /// containing `want`.
    fn refused(src: &str, key: &str, at: &str, want: &str) {
        let e = err(src);
        assert_eq!(e.key, key, "{e}");
        assert_eq!(e.line, line_of(src, at), "{e}");
        assert!(e.message.contains(want), "{e}");
        assert!(e.to_string().starts_with("t.toml:"), "{e}");
    }

    #[test]
    fn zfs_property_values_are_checked_with_their_line() {
        let with = |pool: &str| MINIMAL.replace("[pool]", &format!("[pool]\n{pool}"));
        // The issue's example: ashift 99 passed every check before.
        refused(
            &with("options = { ashift = \"99\", autotrim = \"on\" }"),
            "pool.options.ashift",
            "ashift",
            "out of range: use 9 to 16",
        );
        refused(
            &with("root-options = { compression = \"zstd-42\" }"),
            "pool.root-options.compression",
            "compression",
            "not a value of `compression`",
        );
        refused(
            &with("root-options = { xattr = \"sa\", acltype = \"posix1e\" }"),
            "pool.root-options.acltype",
            "acltype",
            "not a value",
        );
        // A dataset's option is found in that dataset's table, not in an
        // earlier one that sets the same property well.
        let src = format!(
            "{MINIMAL}[[pool.datasets]]\nname = \"a\"\noptions = {{ recordsize = \"1M\" }}\n\
             [[pool.datasets]]\nname = \"b\"\noptions = {{ recordsize = \"96K\" }}\n"
        );
        refused(
            &src,
            "pool.datasets[1].options.recordsize",
            "96K",
            "power of two from 512 to 1M",
        );
        // The issue's encryption example is refused, saying why.
        refused(
            &with(
                "root-options = { encryption = \"aes-256-gcm\", keyformat = \"passphrase\", keylocation = \"prompt\" }",
            ),
            "pool.root-options.keylocation",
            "keylocation",
            "an unattended install has nobody to answer",
        );
        refused(
            &with("root-options = { encryption = \"on\" }"),
            "pool.root-options.encryption",
            "encryption",
            "needs `keyformat`",
        );
        // A value that needs a pool feature the pool options turn off.
        refused(
            &with(
                "options = { \"feature@zstd_compress\" = \"disabled\" }\nroot-options = { compression = \"zstd\" }",
            ),
            "pool.root-options.compression",
            "compression",
            "needs the pool feature zstd_compress",
        );
        // Good values still pass.
        Profile::parse(
            &with(
                "options = { ashift = \"12\", autotrim = \"on\", \"feature@zstd_compress\" = \"enabled\" }\n\
                 root-options = { compression = \"zstd\", acltype = \"posixacl\", xattr = \"sa\", \
                 dnodesize = \"auto\", normalization = \"formD\", recordsize = \"128K\", atime = \"off\", \
                 canmount = \"off\", mountpoint = \"none\", \"com.example:tag\" = \"x\" }",
            ),
            "t.toml",
        )
        .expect("valid");
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
    fn esp_swap_and_size_fields_are_checked() {
        let disk = |extra: &str| MINIMAL.replace("select =", &format!("{extra}\nselect ="));
        // The issue's examples: 32 MiB is FAT16 everywhere; 0B panicked
        // inside the gpt crate on the node.
        for esp in ["32MiB", "0B", "1MiB"] {
            refused(
                &disk(&format!("esp-size = \"{esp}\"")),
                "disk.esp-size",
                "esp-size",
                "cannot be FAT32",
            );
        }
        refused(
            &disk("esp-size = \"20TiB\""),
            "disk.esp-size",
            "esp-size",
            "cannot be FAT32",
        );
        // FAT32 with 512-byte sectors: accepted here, the plan decides.
        Profile::parse(&disk("esp-size = \"64MiB\""), "t.toml").expect("64MiB");
        Profile::parse(&disk("esp-size = \"260MiB\""), "t.toml").expect("260MiB");
        refused(
            &disk("swap-size = \"0B\""),
            "disk.swap-size",
            "swap-size",
            "leave `swap-size` out",
        );
        refused(
            &MINIMAL.replace("serial = \"S1\"", "bus = \"nvme\", max-size = \"0B\""),
            "disk.select.max-size",
            "max-size",
            "no disk of at most 0B can hold the layout",
        );
        refused(
            &format!("{MINIMAL}[image]\ndevice-timeout-secs = 0\n"),
            "image.device-timeout-secs",
            "device-timeout-secs",
            "0 seconds",
        );
        refused(
            &format!("{MINIMAL}[ssh]\nfetch-timeout-secs = 0\n"),
            "ssh.fetch-timeout-secs",
            "fetch-timeout-secs",
            "0 seconds",
        );
        let src = format!("{MINIMAL}[[nodes]]\nname = \"a\"\ndisk = {{ serial = \"X\", max-size = \"512MiB\" }}\n");
        refused(
            &src,
            "nodes[0].disk.max-size",
            "name = \"a\"",
            "hold the layout",
        );
    }

    #[test]
    fn sections_with_defaults_may_be_left_out_and_disk_is_named() {
        // docs/profile.md gives a default for every [pool] key.
        let p = Profile::parse(
            "name = \"t\"\n[disk]\nselect = { serial = \"S1\" }\n",
            "t.toml",
        )
        .expect("no [pool]");
        assert_eq!(p.pool.name.0, "rpool");
        assert!(p.pool.datasets.is_empty());
        let e = err("name = \"t\"\n[pool]\n");
        assert!(e.to_string().starts_with("t.toml:1:1: `disk`: "), "{e}");
        assert!(e.message.contains("no [disk] section"), "{e}");
        let e = err("name = \"t\"\n[disk]\nwipe = \"always\"\n");
        assert!(e.message.contains("[disk] has no `select`"), "{e}");
        assert_eq!(e.key, "disk.select", "{e}");
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

    #[test]
    fn toml_syntax_error_has_position() {
        let e = err("name = \"t\"\n[disk\n");
        assert_eq!(e.line, 2, "{e}");
    }
}

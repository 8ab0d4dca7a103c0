//! What the builder tells the installer about the image it is part of.

use serde::{Deserialize, Serialize};

/// Where the builder puts [`ImageInfo`] in the initramfs.
pub const IMAGE_INFO_PATH: &str = "/etc/nodeflash/image.json";
/// Where the builder puts the resolved profile in the initramfs.
pub const PROFILE_PATH: &str = "/etc/nodeflash/profile.toml";
/// Where the builder puts the profile's extra CA certificates (`0.pem`, …).
pub const CA_DIR: &str = "/etc/nodeflash/ca";
/// A fixed floor for the node's clock, 2026-01-01T00:00:00Z: earlier than
/// any build of this version, so a clock before it is certainly wrong (not the
/// image's build time, which reproducible builds keep out of the image). TLS
/// errors then say to check the clock.
pub const NOT_BEFORE_UNIX: u64 = 1_767_225_600;

/// Prefix of the ISO9660 volume set ID; the image ID follows it.
pub const VOLSET_PREFIX: &str = "NODEFLASH_";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// nodeflash version that built the image.
    pub version: String,
    pub profile: String,
    /// sha256 of everything the image boots (kernel, command line, initramfs
    /// contents but this file): the same inputs give the same ID.
    pub image_id: String,
    /// Kernel release, e.g. `6.1.0-56-amd64`.
    pub kernel_release: String,
    /// Modules to load, in dependency order, relative to `/lib/modules/<release>`.
    pub modules: Vec<String>,
    /// The store payload on the boot medium, if the profile has a store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<PayloadInfo>,
    /// What the installer puts on the target's ESP, if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<BootInfo>,
    /// Install, or check an installed disk (the `check` system's stage 1).
    #[serde(default)]
    pub mode: Mode,
    /// The packages the image was made from (kernel, OpenZFS, systemd-boot
    /// and the ZFS tools' libraries), with their exact versions.
    #[serde(default)]
    pub packages: Vec<PackageVersion>,
}

/// A package and its exact version, e.g. `zfs-dkms` `2.1.11-1+deb12u1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageVersion {
    pub name: String,
    pub version: String,
}

impl std::fmt::Display for PackageVersion {
    /// `name version`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.name, self.version)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    #[default]
    Install,
    Check,
}

/// The installed system's boot entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootInfo {
    /// Kernel and initrd as paths in the store (`HASH-NAME/…`).
    pub kernel: String,
    pub initrd: String,
    pub cmdline: String,
    /// nodeflash's check system: its entry also carries the node's host ID
    /// (`nodeflash.hostid=`), as a NixOS initrd has it built in.
    pub check: bool,
    /// A NixOS system's top-level store path name: the installer runs its
    /// own boot loader installation instead of writing an entry itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nixos: Option<String>,
    /// With a flake: each node installs its own NixOS system, named in
    /// [`PayloadInfo::systems`] ([`ImageInfo::for_node`] resolves it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub nixos_per_node: bool,
}

/// Where the builder puts systemd-boot in the install initramfs.
pub const SYSTEMD_BOOT_PATH: &str = "/usr/lib/nodeflash/systemd-bootx64.efi";

/// Where the payload is and what it must be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadInfo {
    /// Path in the ISO9660 file system of the boot medium.
    pub path: String,
    /// Length of the payload file.
    pub bytes: u64,
    /// sha256 of its compressed manifest (in its header): names the payload.
    pub manifest_sha256: String,
    pub files: usize,
    /// Uncompressed bytes of the store.
    pub store_bytes: u64,
    /// With a flake: each node's own system (by node name), whose closure
    /// is what that node gets out of the payload.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub systems: std::collections::BTreeMap<String, NodeSystem>,
    /// With a flake: the generic node's system, if the profile names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_system: Option<NodeSystem>,
}

/// One node's NixOS system in a payload that holds several.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSystem {
    /// The top-level store path name, `HASH-nixos-system-…`.
    pub toplevel: String,
    /// Its closure (`nix-store -qR` on the build host), store path names.
    pub closure: Vec<String>,
    /// Uncompressed bytes of its closure's files.
    #[serde(default)]
    pub store_bytes: u64,
}

/// Where the builder puts the payload on the ISO.
pub const PAYLOAD_ISO_PATH: &str = "/nodeflash/store.nfp";

impl ImageInfo {
    /// The image as node `node` (None: the generic node) installs it. With
    /// a system per node (a flake), its boot is that node's toplevel and the
    /// second value is the closure to write out of the payload; a node the
    /// flake built no system for (the generic node without `system`) gets
    /// neither store nor boot loader. Otherwise the image as it is.
    pub fn for_node(&self, node: Option<&str>) -> (ImageInfo, Option<NodeSystem>) {
        let mut info = self.clone();
        if !self.per_node() {
            return (info, None);
        }
        let system = self.payload.as_ref().and_then(|p| match node {
            Some(n) => p.systems.get(n).cloned(),
            None => p.default_system.clone(),
        });
        match &system {
            Some(s) => {
                if let Some(b) = &mut info.boot {
                    b.nixos = Some(s.toplevel.clone());
                }
            }
            None => {
                info.boot = None;
                info.payload = None;
            }
        }
        (info, system)
    }

    /// Whether each node installs its own system (a flake profile).
    pub fn per_node(&self) -> bool {
        self.boot.as_ref().is_some_and(|b| b.nixos_per_node)
            || self.payload.as_ref().is_some_and(|p| !p.systems.is_empty())
    }

    /// Refuses the generic node (`node` None) of an image with a system per
    /// node when the flake built none for it (`[default-node] system`
    /// unset): its host ID is derived on the machine (`hostid`, 8 hex
    /// digits in the message), so no system built beforehand holds it in
    /// `networking.hostId`, which NixOS with ZFS needs (docs/flake.md). The
    /// error names the machine's DMI serial (else its first MAC) and the
    /// `[[nodes]]` entry that fixes it. Ok for every other case. Called at
    /// plan time, before anything is written.
    pub fn refuse_generic_without_system(
        &self,
        node: Option<&str>,
        facts: &crate::facts::Facts,
        hostid: u32,
    ) -> anyhow::Result<()> {
        let has_default = self
            .payload
            .as_ref()
            .is_some_and(|p| p.default_system.is_some());
        if node.is_some() || !self.per_node() || has_default {
            return Ok(());
        }
        let serial = facts
            .dmi
            .product_serial
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty());
        let mac = facts.net.iter().find_map(|n| n.mac.as_deref());
        let (who, rule) = match (serial, mac) {
            (Some(s), _) => (
                format!("SMBIOS serial {s:?}"),
                format!("match = {{ dmi-serial = {s:?} }}"),
            ),
            (None, Some(m)) => (
                format!("no SMBIOS serial, MAC {m}"),
                format!("match = {{ mac = {m:?} }}"),
            ),
            (None, None) => (
                "no SMBIOS serial, no MAC".to_string(),
                "match = { … }".to_string(),
            ),
        };
        anyhow::bail!(
            "this machine ({who}) matches no [[nodes]] entry, and the flake has no system for \
             the generic node: its host ID {hostid:08x} is derived here, so no system built \
             beforehand holds it as networking.hostId. Nothing was written. Add it to the \
             profile as [[nodes]] name = \"…\", hostid = \"{hostid:08x}\", {rule}, and build \
             the stick again (or give [default-node] a `system` and a fixed `hostid`)"
        )
    }

    /// The version of package `name` in the image, if it was made from it.
    pub fn package_version(&self, name: &str) -> Option<&str> {
        self.packages
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.version.as_str())
    }

    /// The kernel release with its package version, e.g. `6.1.0-56-amd64
    /// (6.1.192-2)`; the release alone when the image names no packages.
    pub fn kernel(&self) -> String {
        match self.package_version(&format!("linux-image-{}", self.kernel_release)) {
            Some(v) => format!("{} ({v})", self.kernel_release),
            None => self.kernel_release.clone(),
        }
    }

    /// The OpenZFS version the image's modules were compiled from
    /// (`zfs-dkms`), or `unknown`.
    pub fn openzfs(&self) -> &str {
        self.package_version("zfs-dkms").unwrap_or("unknown")
    }

    /// The ISO9660 volume set ID that marks the boot medium of this image.
    pub fn volume_set_id(&self) -> String {
        volume_set_id(&self.image_id)
    }

    /// A short form of the image ID for humans.
    pub fn short_id(&self) -> &str {
        &self.image_id[..self.image_id.len().min(12)]
    }
}

pub fn volume_set_id(image_id: &str) -> String {
    format!("{VOLSET_PREFIX}{}", &image_id[..image_id.len().min(32)]).to_uppercase()
}

/// The kernel command line word that makes a network boot: where the store
/// payload is, `nodeflash.payload=URL` (`nodeflash serve` writes it into its
/// iPXE script; the installer then reads the payload from there).
pub const PAYLOAD_URL_WORD: &str = "nodeflash.payload=";

/// The values of `word` (such as [`PAYLOAD_URL_WORD`]) on the kernel command
/// line `cmdline`, in their order; each caller says whether the first or the
/// last one counts.
pub fn cmdline_values<'a>(
    cmdline: &'a str,
    word: &'a str,
) -> impl DoubleEndedIterator<Item = &'a str> + 'a {
    cmdline
        .split_whitespace()
        .filter_map(move |w| w.strip_prefix(word))
}
/// The kernel command line word that sets the payload stream's stall bound
/// in seconds (`nodeflash serve --payload-stall`).
pub const PAYLOAD_STALL_WORD: &str = "nodeflash.payload-stall=";

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> ImageInfo {
        let system = |top: &str| NodeSystem {
            toplevel: top.into(),
            closure: vec![top.into(), "s-shared".into()],
            store_bytes: 1,
        };
        ImageInfo {
            version: "0".into(),
            profile: "p".into(),
            image_id: "i".into(),
            kernel_release: "k".into(),
            modules: Vec::new(),
            payload: Some(PayloadInfo {
                path: PAYLOAD_ISO_PATH.into(),
                bytes: 1,
                manifest_sha256: "m".into(),
                files: 1,
                store_bytes: 1,
                systems: [("alpha".to_string(), system("a-nixos-system-alpha"))]
                    .into_iter()
                    .collect(),
                default_system: None,
            }),
            boot: Some(BootInfo {
                kernel: String::new(),
                initrd: String::new(),
                cmdline: String::new(),
                check: false,
                nixos: None,
                nixos_per_node: true,
            }),
            mode: Mode::Install,
            packages: Vec::new(),
        }
    }

    #[test]
    fn each_node_gets_its_own_system_and_the_generic_node_none() {
        let (alpha, system) = info().for_node(Some("alpha"));
        assert_eq!(
            alpha.boot.and_then(|b| b.nixos).as_deref(),
            Some("a-nixos-system-alpha")
        );
        assert_eq!(
            system.map(|s| s.closure),
            Some(vec!["a-nixos-system-alpha".to_string(), "s-shared".into()])
        );
        // No system for it in the flake: neither store nor boot loader.
        let (generic, system) = info().for_node(None);
        assert!(system.is_none() && generic.boot.is_none() && generic.payload.is_none());
        // Without per-node systems the image is as it is.
        let mut plain = info();
        if let Some(b) = plain.boot.as_mut() {
            b.nixos_per_node = false;
        }
        if let Some(p) = plain.payload.as_mut() {
            p.systems.clear();
        }
        assert_eq!(plain.for_node(None).0, plain);
    }

    fn facts(serial: Option<&str>, mac: Option<&str>) -> crate::facts::Facts {
        let mut f = crate::facts::Facts::default();
        f.dmi.product_serial = serial.map(str::to_string);
        if let Some(m) = mac {
            f.net.push(crate::facts::NetInterface {
                name: "eth0".into(),
                mac: Some(m.into()),
                carrier: None,
            });
        }
        f
    }

    #[test]
    fn the_generic_node_without_a_system_is_refused_with_its_node_entry() {
        let err = info()
            .refuse_generic_without_system(None, &facts(Some("NF-OTHER"), None), 0x1234abcd)
            .expect_err("refused")
            .to_string();
        assert!(err.contains("SMBIOS serial \"NF-OTHER\""), "{err}");
        assert!(err.contains("hostid = \"1234abcd\""), "{err}");
        assert!(
            err.contains("match = { dmi-serial = \"NF-OTHER\" }"),
            "{err}"
        );
        assert!(err.contains("Nothing was written"), "{err}");
        // Without a serial, by its MAC.
        let err = info()
            .refuse_generic_without_system(None, &facts(None, Some("52:54:00:00:00:09")), 1)
            .expect_err("refused")
            .to_string();
        assert!(
            err.contains("match = { mac = \"52:54:00:00:00:09\" }"),
            "{err}"
        );
        // A node of the profile, a default system, or no flake: no refusal.
        let f = facts(Some("X"), None);
        assert!(info()
            .refuse_generic_without_system(Some("alpha"), &f, 1)
            .is_ok());
        let mut with_default = info();
        if let Some(p) = with_default.payload.as_mut() {
            p.default_system = Some(NodeSystem {
                toplevel: "d-nixos-system-default".into(),
                closure: vec!["d-nixos-system-default".into()],
                store_bytes: 1,
            });
        }
        assert!(with_default
            .refuse_generic_without_system(None, &f, 1)
            .is_ok());
        let mut plain = info();
        if let Some(b) = plain.boot.as_mut() {
            b.nixos_per_node = false;
        }
        if let Some(p) = plain.payload.as_mut() {
            p.systems.clear();
        }
        assert!(plain.refuse_generic_without_system(None, &f, 1).is_ok());
    }
}

//! Host tools the builder and the tests run, and the Debian packages that
//! provide them. A missing tool is reported once, with the exact fix.

use std::path::Path;

use anyhow::{bail, Result};

/// (program, Debian package) the image build needs (`nodeflash build`):
/// no `apt` or `dpkg`, Debian's packages are read by the builder itself.
pub const BUILD_TOOLS: &[(&str, &str)] = &[
    // the signature of the Debian archive's InRelease (archive.rs)
    ("gpgv", "gpgv"),
    ("xorriso", "xorriso"),
    ("make", "make"),
    ("gcc-12", "gcc-12"),
    ("strip", "binutils"),
    // OpenZFS's configure (scripts/enum-extract.pl needs Getopt::Std, which
    // Debian's perl-base lacks: the presence of `perl` does not prove it)
    ("perl", "perl"),
];

/// (program, Debian package) compiling the installer needs (`cargo xtask`):
/// the C parts of its crates (zstd, ring) for the static musl target.
pub const INSTALLER_TOOLS: &[(&str, &str)] = &[("musl-gcc", "musl-tools")];

/// (program or file, Debian package) the QEMU tests need.
/// What `run-vm` needs: QEMU and the UEFI firmware.
pub const VM_TOOLS: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "ovmf"),
];

pub const TEST_TOOLS: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "ovmf"),
    // Secure Boot firmware and Microsoft's keys (boot::under_secure_boot_…)
    ("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd", "ovmf"),
    ("/usr/share/OVMF/OVMF_VARS_4M.ms.fd", "ovmf"),
    // independent readers of what the builder writes, for cross-checks
    ("fsck.fat", "dosfstools"),
    ("cpio", "cpio"),
    ("sfdisk", "fdisk"),
    ("blkid", "util-linux"),
    ("mcopy", "mtools"),
    // the DHCP client's test peer, and a reference for key fingerprints
    ("dnsmasq", "dnsmasq-base"),
    ("ip", "iproute2"),
    // the network boot test: iPXE for UEFI, served over TFTP
    (crate::serve::IPXE_EFI, "ipxe"),
    ("ssh-keygen", "openssh-client"),
    // the private mount namespace of the no-apt build (xtask/src/noapt.rs)
    ("unshare", "util-linux"),
    // signs a Release in archive.rs's test of the InRelease check
    ("gpg", "gnupg"),
    // the shell of the stand-in NixOS system's scripts (static)
    ("/bin/busybox", "busybox-static"),
];

/// (program or file, Debian package) `nodeflash serve` needs for proxy
/// DHCP and TFTP: dnsmasq, and iPXE for UEFI.
pub const SERVE_TOOLS: &[(&str, &str)] = &[
    ("dnsmasq", "dnsmasq-base"),
    (crate::serve::IPXE_EFI, "ipxe"),
];

/// (program, Debian package) a profile that builds or lists Nix store paths
/// needs (`[payload] flake` or `closure`), and the tests that run real Nix.
pub const NIX_TOOLS: &[(&str, &str)] = &[
    ("nix", "nix-bin"),
    ("nix-store", "nix-bin"),
    ("nix-instantiate", "nix-bin"),
    ("git", "git"),
];

/// The host tools building `profile` needs: [`BUILD_TOOLS`], and
/// [`NIX_TOOLS`] when the profile builds or lists Nix store paths.
pub fn for_profile(
    profile: &nodeflash_installer::profile::Profile,
) -> Vec<(&'static str, &'static str)> {
    let p = &profile.payload;
    let nix = p.flake.is_some() || p.closure.is_some();
    BUILD_TOOLS
        .iter()
        .chain(if nix { NIX_TOOLS } else { &[] })
        .copied()
        .collect()
}

/// (program, Debian package) `cargo xtask bench store` compares against.
pub const BENCH_TOOLS: &[(&str, &str)] = &[
    ("mksquashfs", "squashfs-tools"),
    ("unsquashfs", "squashfs-tools"),
];

fn present(tool: &str) -> bool {
    if tool.starts_with('/') {
        return Path::new(tool).exists();
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// The Debian packages whose tools are missing, without duplicates.
pub fn missing_packages(tools: &[(&str, &str)]) -> Vec<String> {
    let mut pkgs: Vec<String> = tools
        .iter()
        .filter(|(tool, _)| !present(tool))
        .map(|(_, pkg)| pkg.to_string())
        .collect();
    pkgs.sort();
    pkgs.dedup();
    pkgs
}

/// Fails with one message naming every missing tool's package.
pub fn require(tools: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&(&str, &str)> = tools.iter().filter(|(t, _)| !present(t)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = missing
        .iter()
        .map(|(t, p)| format!("{t} (package {p})"))
        .collect();
    bail!(
        "missing host tools: {}\n  on Debian or Ubuntu install them with: sudo apt-get install {}\n  \
         (`cargo xtask build-iso` installs them itself there when run as root); on other \
         distributions install the same programs (README.md, \"Set-up\")",
        names.join(", "),
        missing_packages(tools).join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tool_names_package_and_fix() {
        let err = require(&[("sh", "dash"), ("nodeflash-no-such-tool", "nodeflash-pkg")])
            .expect_err("missing");
        let msg = err.to_string();
        assert!(
            msg.contains("nodeflash-no-such-tool (package nodeflash-pkg)"),
            "{msg}"
        );
        assert!(msg.contains("sudo apt-get install nodeflash-pkg"), "{msg}");
        assert!(!msg.contains("dash"), "{msg}");
        assert!(require(&[("sh", "dash")]).is_ok());
    }
}

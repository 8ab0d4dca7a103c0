//! What an install leaves for NixOS: a module with the node's host name,
//! host ID and root's SSH keys, for the system's configuration to import;
//! the system profile; and the system's own boot loader installation.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use nix::mount::{MntFlags, MsFlags};

use crate::cmd;
use crate::net::KeySet;

/// Where the module goes, under the installed root.
pub const MODULE_PATH: &str = "/etc/nixos/nodeflash.nix";

/// A Nix string literal.
fn quote(s: &str) -> String {
    format!(
        "\"{}\"",
        s.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace("${", "\\${")
    )
}

/// The module's text.
pub fn module(hostname: &str, hostid: u32, keys: &KeySet) -> String {
    let keys: String = keys
        .keys
        .iter()
        .map(|k| format!("    {}\n", quote(&k.line())))
        .collect();
    format!(
        "# Written by nodeflash when it installed this node. Import it from\n\
         # configuration.nix so that NixOS keeps this host name, host ID and keys.\n\
         {{ ... }}:\n\
         {{\n  \
           networking.hostName = {};\n  \
           networking.hostId = \"{hostid:08x}\";\n  \
           users.users.root.openssh.authorizedKeys.keys = [\n{keys}  ];\n\
         }}\n",
        quote(hostname)
    )
}

/// Writes the module under `root`.
pub fn write_module(root: &Path, hostname: &str, hostid: u32, keys: &KeySet) -> Result<()> {
    let path = root.join(MODULE_PATH.trim_start_matches('/'));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(&path, module(hostname, hostid, keys))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The installed system's profile, as `nix-env -p … --set` leaves it.
pub const SYSTEM_PROFILE: &str = "/nix/var/nix/profiles/system";

/// Points the system profile under `root` at `toplevel` (a store path name)
/// as its generation 1, and marks the root as NixOS (`/etc/NIXOS`): what
/// `nixos-install` does once the store is in place.
pub fn set_system_profile(root: &Path, toplevel: &str) -> Result<()> {
    let profile = root.join(SYSTEM_PROFILE.trim_start_matches('/'));
    let dir = profile
        .parent()
        .context("the system profile has no parent")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let generation = dir.join("system-1-link");
    for (link, target) in [
        (&generation, format!("/nix/store/{toplevel}")),
        (&profile, "system-1-link".to_string()),
    ] {
        if link.symlink_metadata().is_ok() {
            std::fs::remove_file(link)
                .with_context(|| format!("cannot remove {}", link.display()))?;
        }
        std::os::unix::fs::symlink(&target, link)
            .with_context(|| format!("cannot link {} to {target}", link.display()))?;
    }
    let etc = root.join("etc");
    std::fs::create_dir_all(&etc).with_context(|| format!("cannot create {}", etc.display()))?;
    std::fs::write(etc.join("NIXOS"), b"")
        .with_context(|| format!("cannot write {}", etc.join("NIXOS").display()))
}

/// File systems mounted for a chroot, unmounted in reverse order.
#[derive(Default)]
struct Mounts(Vec<PathBuf>);

impl Mounts {
    fn mount(
        &mut self,
        source: &str,
        target: PathBuf,
        fstype: Option<&str>,
        flags: MsFlags,
    ) -> Result<()> {
        std::fs::create_dir_all(&target)
            .with_context(|| format!("cannot create {}", target.display()))?;
        nix::mount::mount(Some(source), &target, fstype, flags, None::<&str>)
            .with_context(|| format!("cannot mount {source} on {}", target.display()))?;
        self.0.push(target);
        Ok(())
    }

    /// Unmounts everything (detached, with what was mounted below it).
    fn unmount(mut self) -> Result<()> {
        let mut result = Ok(());
        while let Some(target) = self.0.pop() {
            if let Err(e) = nix::mount::umount2(&target, MntFlags::MNT_DETACH) {
                result = Err(anyhow::anyhow!("cannot unmount {}: {e}", target.display()));
            }
        }
        result
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        for target in self.0.drain(..).rev() {
            let _ = nix::mount::umount2(&target, MntFlags::MNT_DETACH);
        }
    }
}

/// Runs the installed NixOS system's own boot loader installation, as
/// `nixos-install` does through `nixos-enter`: with the ESP `esp` on
/// `/boot`, `/dev`, `/proc`, `/sys` (with `efivarfs` when the firmware has
/// EFI variables) and a tmpfs on `/run`, it runs the system's `activate`
/// (whose failure is only reported, as `nixos-enter` has it), then
/// `switch-to-configuration boot` with `NIXOS_INSTALL_BOOTLOADER=1` in a
/// chroot of `root` (whose file systems are mounted). Without EFI
/// variables the firmware only finds the removable path
/// `EFI/BOOT/BOOTX64.EFI`: it is filled from systemd-boot when the system
/// left it empty. Returns warnings.
pub fn install_boot_loader(root: &Path, esp: &Path, log: &dyn Fn(&str)) -> Result<Vec<String>> {
    let efi_vars = Path::new("/sys/firmware/efi").exists() && mount_efivarfs();
    let mut mounts = Mounts::default();
    let esp_name = esp.display().to_string();
    mounts.mount(&esp_name, root.join("boot"), Some("vfat"), MsFlags::empty())?;
    let rbind = MsFlags::MS_BIND | MsFlags::MS_REC;
    mounts.mount("/dev", root.join("dev"), None, rbind)?;
    mounts.mount("proc", root.join("proc"), Some("proc"), MsFlags::empty())?;
    mounts.mount("/sys", root.join("sys"), None, rbind)?;
    mounts.mount(
        "tmpfs",
        root.join("run"),
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
    )?;
    let env = [
        (
            "PATH",
            format!("{SYSTEM_PROFILE}/sw/bin:/run/current-system/sw/bin"),
        ),
        (
            "LOCALE_ARCHIVE",
            format!("{SYSTEM_PROFILE}/sw/lib/locale/locale-archive"),
        ),
    ];
    let mut warnings = Vec::new();
    log(&format!("in the installed root {}:", root.display()));
    let activate = crate::cmd::run(
        cmd::in_root(
            &mut Command::new(format!("{SYSTEM_PROFILE}/activate")),
            root,
        )
        .env_clear()
        .envs(env.clone())
        .env("IN_NIXOS_ENTER", "1"),
    );
    match activate {
        Ok(out) => out.lines().for_each(log),
        Err(e) => warnings.push(format!("the system's activation script failed: {e:#}")),
    }
    let out = crate::cmd::run(
        cmd::in_root(
            &mut Command::new(format!("{SYSTEM_PROFILE}/bin/switch-to-configuration")),
            root,
        )
        .arg("boot")
        .env_clear()
        .envs(env)
        .env("NIXOS_INSTALL_BOOTLOADER", "1"),
    )
    .context("the system's boot loader installation (`switch-to-configuration boot`) failed")?;
    out.lines().for_each(log);
    let boot = root.join("boot");
    let removable = boot.join("EFI/BOOT/BOOTX64.EFI");
    let systemd_boot = boot.join("EFI/systemd/systemd-bootx64.efi");
    if !removable.exists() {
        if systemd_boot.exists() {
            std::fs::create_dir_all(boot.join("EFI/BOOT"))
                .with_context(|| format!("cannot create EFI/BOOT on {esp_name}"))?;
            std::fs::copy(&systemd_boot, &removable).with_context(|| {
                format!("cannot copy systemd-boot to EFI/BOOT/BOOTX64.EFI on {esp_name}")
            })?;
            log("boot loader: systemd-boot copied to the removable path EFI/BOOT/BOOTX64.EFI");
        } else if !efi_vars {
            bail!(
                "after `switch-to-configuration boot`, {esp_name} has no EFI/BOOT/BOOTX64.EFI and \
                 this firmware has no EFI variables: nothing would boot. Set \
                 `boot.loader.efi.canTouchEfiVariables = false` and use systemd-boot, or GRUB \
                 with `efiInstallAsRemovable = true`"
            );
        }
    }
    nix::unistd::sync();
    mounts.unmount()?;
    Ok(warnings)
}

/// Mounts `efivarfs` for the installer (and with it the chroot); false when
/// the firmware's variables are not available.
fn mount_efivarfs() -> bool {
    let target = "/sys/firmware/efi/efivars";
    match nix::mount::mount(
        Some("efivarfs"),
        target,
        Some("efivarfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    ) {
        Ok(()) | Err(nix::errno::Errno::EBUSY) => true,
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_carries_identity_and_quoted_keys() {
        let mut keys = KeySet::default();
        let key = crate::net::keys::parse_line(
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl a\"${b}",
            "test",
        )
        .expect("key");
        keys.add(key);
        let text = module("kos-mos", 0x472479d4, &keys);
        assert!(
            text.contains("networking.hostName = \"kos-mos\";"),
            "{text}"
        );
        assert!(text.contains("networking.hostId = \"472479d4\";"), "{text}");
        assert!(
            text.contains("\"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl a\\\"\\${b}\""),
            "{text}"
        );
        assert_eq!(quote(r"a\b"), r#""a\\b""#);
    }

    #[test]
    fn system_profile_is_generation_one() {
        let root = tempfile::tempdir().expect("tempdir");
        for _ in 0..2 {
            set_system_profile(root.path(), "abc-nixos-system-n1").expect("profile");
        }
        let dir = root.path().join("nix/var/nix/profiles");
        assert_eq!(
            std::fs::read_link(dir.join("system")).expect("link"),
            Path::new("system-1-link")
        );
        assert_eq!(
            std::fs::read_link(dir.join("system-1-link")).expect("link"),
            Path::new("/nix/store/abc-nixos-system-n1")
        );
        assert!(root.path().join("etc/NIXOS").is_file());
    }
}

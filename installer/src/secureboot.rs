//! Whether UEFI Secure Boot is enforced on this machine, read from the
//! firmware's variables (efivarfs), and the refusal that follows: the stick
//! starts under Secure Boot through Debian's signed chain (shim, GRUB, the
//! kernel), but its OpenZFS modules are compiled by the builder and signed
//! by no key the machine trusts. Debian's kernel locks itself down when
//! Secure Boot is on (`CONFIG_LOCK_DOWN_IN_EFI_SECURE_BOOT`) and then
//! refuses unsigned modules with `EKEYREJECTED` ("Key was rejected by
//! service"), so the install could not go past loading them.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// Where efivarfs is mounted (Documentation/filesystems/efivarfs.rst).
pub const EFIVARS: &str = "/sys/firmware/efi/efivars";
/// The global variable saying whether the firmware enforces Secure Boot
/// (UEFI 2.10, 3.3 "Globally Defined Variables": `SecureBoot`, a UINT8,
/// 1 enforcing, 0 not), as efivarfs names it: `Name-VendorGuid`, with
/// `EFI_GLOBAL_VARIABLE` = {8BE4DF61-93CA-11d2-AA0D-00E098032B8C} (UEFI
/// 2.10, 3.3; edk2 `MdePkg/Include/Guid/GlobalVariable.h`).
pub const SECURE_BOOT_VAR: &str = "SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c";
/// The global variable saying the platform has no Platform Key yet
/// (`SetupMode`, UINT8: 1 in setup mode, where nothing is enforced).
pub const SETUP_MODE_VAR: &str = "SetupMode-8be4df61-93ca-11d2-aa0d-00e098032b8c";
/// shim's copy of its "insecure mode" (`mokutil --disable-validation`) for
/// the OS, in shim's vendor GUID.
pub const MOK_SB_STATE_RT_VAR: &str = "MokSBStateRT-605dab50-e046-4300-abb6-3dd810dd8b23";
/// `EFI_VARIABLE_NON_VOLATILE` (UEFI 2.10, 8.2 "Variable Services").
const NON_VOLATILE: u32 = 0x1;

/// One EFI variable as efivarfs shows it: 4 bytes of attributes
/// (little-endian `EFI_VARIABLE_*` bits), then the data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EfiVar {
    pub attributes: u32,
    pub data: Vec<u8>,
}

/// Parses the content of an efivarfs file.
///
/// Errors when `bytes` is shorter than the 4 bytes of attributes.
pub fn parse_var(bytes: &[u8]) -> Result<EfiVar> {
    let Some((attrs, data)) = bytes.split_first_chunk::<4>() else {
        bail!(
            "{} bytes, fewer than the 4 bytes of attributes",
            bytes.len()
        );
    };
    Ok(EfiVar {
        attributes: u32::from_le_bytes(*attrs),
        data: data.to_vec(),
    })
}

impl EfiVar {
    /// The value of a UINT8 variable (`SecureBoot`, `SetupMode`,
    /// `MokSBStateRT`); errors when the data is not exactly one byte.
    pub fn u8_value(&self) -> Result<u8> {
        match self.data.as_slice() {
            [v] => Ok(*v),
            d => bail!("{} bytes of data where one byte was expected", d.len()),
        }
    }
}

/// What the firmware's variables say about Secure Boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecureBoot {
    /// Enforced: the kernel is locked down and refuses unsigned modules.
    Enforced,
    /// Not enforced, and why (no such variable, off, setup mode, shim's
    /// insecure mode).
    Off(&'static str),
    /// A variable could not be read or made no sense.
    Unknown(String),
}

/// Reads Secure Boot's state from the variables in `efivars` (a mounted
/// efivarfs, or a directory laid out like one), with the kernel's own
/// rules (`drivers/firmware/efi/libstub/secureboot.c`,
/// `efi_get_secureboot`): enforced when `SecureBoot` is 1, unless
/// `SetupMode` is 1, or shim's `MokSBStateRT` is 1 and not non-volatile.
pub fn state(efivars: &Path) -> SecureBoot {
    let read = |name: &str| -> Result<Option<u8>> {
        let path = efivars.join(name);
        match std::fs::read(&path) {
            Ok(b) => {
                let var = parse_var(&b).with_context(|| format!("{}", path.display()))?;
                if name == MOK_SB_STATE_RT_VAR && var.attributes & NON_VOLATILE != 0 {
                    // The kernel ignores a non-volatile copy: anyone could have set it.
                    return Ok(None);
                }
                Ok(Some(
                    var.u8_value()
                        .with_context(|| format!("{}", path.display()))?,
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    };
    let result = (|| -> Result<SecureBoot> {
        match read(SECURE_BOOT_VAR)? {
            None => return Ok(SecureBoot::Off("the firmware has no SecureBoot variable")),
            Some(0) => return Ok(SecureBoot::Off("SecureBoot is 0")),
            Some(_) => {}
        }
        if read(SETUP_MODE_VAR)? == Some(1) {
            return Ok(SecureBoot::Off("the firmware is in setup mode"));
        }
        if read(MOK_SB_STATE_RT_VAR)? == Some(1) {
            return Ok(SecureBoot::Off("shim's validation is disabled"));
        }
        Ok(SecureBoot::Enforced)
    })();
    result.unwrap_or_else(|e| SecureBoot::Unknown(format!("{e:#}")))
}

/// The refusal printed when Secure Boot is enforced: what happened, that
/// nothing was written, what to do now, and what the installed system
/// needs for Secure Boot later.
pub const REFUSAL: &str = "Secure Boot is on in this machine's firmware: the stick's ZFS kernel \
modules are not signed by a key the machine trusts, so the kernel would refuse to load them \
(\"Key was rejected by service\"); nothing was written to any disk
  to install: turn Secure Boot off in the firmware setup (often under Boot or Security: \
\"Secure Boot\" → Disabled, or \"OS Type\" → \"Other OS\"), then boot the stick again
  for Secure Boot on the installed system later: it needs a boot chain signed with keys the \
firmware trusts; for NixOS, lanzaboote (https://github.com/nix-community/lanzaboote) signs the \
boot loader and kernels with your own keys, which you enroll in the firmware, and then Secure \
Boot can be turned back on";

/// Stops the install when Secure Boot is enforced, before any module of
/// the image is loaded but `efivarfs` (signed by Debian like every module
/// of its kernel) and before any disk is opened. Without EFI (a BIOS boot)
/// or with Secure Boot off it does nothing; when the variables cannot be
/// read it says so and goes on (the module loads then show the cause).
///
/// Errors: [`REFUSAL`] when Secure Boot is enforced.
#[cfg(feature = "pid1")]
pub(crate) fn refuse_if_enforced(info: &crate::image::ImageInfo) -> Result<()> {
    if !Path::new("/sys/firmware/efi").exists() {
        crate::say!("Secure Boot: off (not started through UEFI)");
        return Ok(());
    }
    let dir = Path::new("/lib/modules").join(&info.kernel_release);
    if let Some(rel) = info
        .modules
        .iter()
        .find(|m| Path::new(m).file_name().is_some_and(|n| n == "efivarfs.ko"))
    {
        // EEXIST (loaded) and errors alike: the mount below tells.
        if let Ok(f) = std::fs::File::open(dir.join(rel)) {
            let _ = nix::kmod::finit_module(&f, c"", nix::kmod::ModuleInitFlags::empty());
        }
    }
    match nix::mount::mount(
        Some("efivarfs"),
        EFIVARS,
        Some("efivarfs"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        None::<&str>,
    ) {
        Ok(()) | Err(nix::errno::Errno::EBUSY) => {}
        Err(e) => {
            crate::say!("warning: cannot tell whether Secure Boot is on: cannot mount efivarfs on {EFIVARS}: {e}");
            return Ok(());
        }
    }
    match state(Path::new(EFIVARS)) {
        SecureBoot::Enforced => bail!("{REFUSAL}"),
        SecureBoot::Off(why) => {
            crate::say!("Secure Boot: off ({why})");
            Ok(())
        }
        SecureBoot::Unknown(why) => {
            crate::say!("warning: cannot tell whether Secure Boot is on: {why}");
            Ok(())
        }
    }
}

/// What to add to a module load that failed with `EKEYREJECTED`.
pub const KEY_REJECTED_HINT: &str = "the module is not signed by a key this kernel trusts, \
and the kernel refuses such modules when Secure Boot is on: turn Secure Boot off in the \
firmware setup";

#[cfg(test)]
mod tests {
    use super::*;

    fn var(attributes: u32, data: &[u8]) -> Vec<u8> {
        let mut v = attributes.to_le_bytes().to_vec();
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn efivarfs_files_are_attributes_then_data() {
        // NV | BS | RT, as OVMF sets SecureBoot's (read-only, volatile: BS | RT).
        assert_eq!(
            parse_var(&[0x06, 0, 0, 0, 1]).expect("parsed"),
            EfiVar {
                attributes: 6,
                data: vec![1]
            }
        );
        assert_eq!(
            parse_var(&[7, 0, 0, 0, 0])
                .expect("parsed")
                .u8_value()
                .expect("u8"),
            0
        );
        assert!(parse_var(&[6, 0, 0]).is_err());
        let e = parse_var(&[6, 0, 0, 0])
            .expect("parsed")
            .u8_value()
            .expect_err("no data");
        assert_eq!(
            format!("{e:#}"),
            "0 bytes of data where one byte was expected"
        );
        assert!(parse_var(&[6, 0, 0, 0, 1, 0])
            .expect("parsed")
            .u8_value()
            .is_err());
    }

    #[test]
    fn secure_boot_state_follows_the_kernels_rules() {
        let t = tempfile::tempdir().expect("tempdir");
        let write =
            |name: &str, bytes: &[u8]| std::fs::write(t.path().join(name), bytes).expect("write");
        let rm = |name: &str| {
            let _ = std::fs::remove_file(t.path().join(name));
        };
        assert_eq!(
            state(t.path()),
            SecureBoot::Off("the firmware has no SecureBoot variable")
        );
        write(SECURE_BOOT_VAR, &var(6, &[0]));
        assert_eq!(state(t.path()), SecureBoot::Off("SecureBoot is 0"));
        write(SECURE_BOOT_VAR, &var(6, &[1]));
        assert_eq!(state(t.path()), SecureBoot::Enforced);
        write(SETUP_MODE_VAR, &var(6, &[0]));
        assert_eq!(state(t.path()), SecureBoot::Enforced);
        write(SETUP_MODE_VAR, &var(6, &[1]));
        assert_eq!(
            state(t.path()),
            SecureBoot::Off("the firmware is in setup mode")
        );
        rm(SETUP_MODE_VAR);
        // shim's insecure mode counts only from its volatile copy.
        write(MOK_SB_STATE_RT_VAR, &var(7, &[1]));
        assert_eq!(state(t.path()), SecureBoot::Enforced);
        write(MOK_SB_STATE_RT_VAR, &var(6, &[1]));
        assert_eq!(
            state(t.path()),
            SecureBoot::Off("shim's validation is disabled")
        );
        rm(MOK_SB_STATE_RT_VAR);
        write(SECURE_BOOT_VAR, &[6, 0]);
        match state(t.path()) {
            SecureBoot::Unknown(why) => assert!(
                why.contains(SECURE_BOOT_VAR) && why.contains("fewer than the 4 bytes"),
                "{why}"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_refusal_says_what_to_do_now_and_later() {
        let first = REFUSAL.lines().next().expect("a first line");
        assert!(first.starts_with("Secure Boot is on"), "{first}");
        assert!(
            first.ends_with("nothing was written to any disk"),
            "{first}"
        );
        assert!(REFUSAL.contains("turn Secure Boot off in the firmware setup"));
        assert!(REFUSAL.contains("lanzaboote"));
    }
}

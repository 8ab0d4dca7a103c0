//! A NixOS system's own boot loader installation, in QEMU.
//!
//! Nothing here can build a real NixOS system (no Nix, no nixpkgs), so the
//! payload carries a stand-in: a store path with the two programs
//! `nixos-install` runs, `activate` and `bin/switch-to-configuration`, as
//! busybox scripts. They check the chroot they run in (the installed root
//! with its datasets, the ESP on `/boot`, `/dev`, `/proc`, `/sys`, a tmpfs
//! on `/run`, the system profile, `/etc/NIXOS`, `NIXOS_INSTALL_BOOTLOADER`)
//! and write what NixOS's systemd-boot installer writes: systemd-boot, the
//! kernel and initrd (nodeflash's check system, so that the test can see
//! the result) and a loader entry. What is tested is the installer's side;
//! a real NixOS system's scripts are not.

use std::path::{Path, PathBuf};

use nodeflash_tests::{
    assert_console, assert_installed, boot_installed, boot_stick, build_variant, check_system,
    check_unbootable, esp_boot_entries, images_dir, payload_digest, printed_hostid, Nvme,
};

const BUSYBOX: &str = "0000000000000000000000000000000b-busybox";
const SYSTEM: &str = "0000000000000000000000000000000s-nixos-system-standin";
const BROKEN: &str = "0000000000000000000000000000000x-nixos-system-broken";

/// Checks the chroot and installs like NixOS's systemd-boot builder would.
const SWITCH: &str = r#"
fail() { echo "standin: $*" >&2; exit 1; }
[ "$1" = boot ] || fail "called with '$1', not 'boot'"
[ "$NIXOS_INSTALL_BOOTLOADER" = 1 ] || fail "NIXOS_INSTALL_BOOTLOADER is not 1"
[ -c /dev/null ] || fail "no /dev/null"
[ -r /proc/self/mounts ] || fail "no /proc"
[ -d /sys/block ] || fail "no /sys"
grep -q ' /boot vfat ' /proc/self/mounts || fail "the ESP is not on /boot"
grep -q ' /run tmpfs ' /proc/self/mounts || fail "no tmpfs on /run"
grep -q ' / zfs ' /proc/self/mounts || fail "the root dataset is not /"
grep -q ' /nix zfs ' /proc/self/mounts || fail "the /nix dataset is not mounted"
[ -e /run/standin-activated ] || fail "activate did not run first"
[ -e /etc/NIXOS ] || fail "no /etc/NIXOS"
[ "$(readlink /nix/var/nix/profiles/system)" = system-1-link ] || fail "no system profile"
[ "$(readlink /nix/var/nix/profiles/system-1-link)" = "$SELF" ] || fail "the profile is not this system"
echo "standin: environment ok"
hostid=$(od -An -tx4 /etc/hostid | tr -d ' \n')
mkdir -p /boot/EFI/systemd /boot/EFI/nixos /boot/loader/entries
cp "$SELF/systemd-bootx64.efi" /boot/EFI/systemd/systemd-bootx64.efi
cp "$SELF/kernel" /boot/EFI/nixos/kernel.efi
cp "$SELF/initrd" /boot/EFI/nixos/initrd.efi
printf 'default nixos-generation-1.conf\ntimeout 0\n' > /boot/loader/loader.conf
printf 'title NixOS stand-in\nlinux /EFI/nixos/kernel.efi\ninitrd /EFI/nixos/initrd.efi\noptions console=ttyS0,115200 quiet nodeflash.hostid=%s\n' "$hostid" > /boot/loader/entries/nixos-generation-1.conf
echo "standin: installed systemd-boot and nixos-generation-1.conf"
"#;

fn script(dir: &Path, name: &str, body: &str, store_path: &str) {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    let text = format!(
        "#!/nix/store/{BUSYBOX}/bin/busybox sh\nexport PATH=/nix/store/{BUSYBOX}/bin\nSELF=/nix/store/{store_path}\n{body}"
    );
    std::fs::write(&path, text).expect("write a script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// Whether an ELF64 executable names a program interpreter (PT_INTERP),
/// i.e. is dynamically linked.
fn has_interpreter(elf: &[u8]) -> bool {
    let u16_at = |o: usize| usize::from(u16::from_le_bytes([elf[o], elf[o + 1]]));
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().expect("8 bytes"));
    let phoff = usize::try_from(phoff).expect("offset");
    (0..u16_at(0x38)).any(|i| {
        let at = phoff + i * u16_at(0x36);
        u32::from_le_bytes(elf[at..at + 4].try_into().expect("4 bytes")) == 3
    })
}

/// A store with busybox, the stand-in system and a broken one.
fn standin_store(store: &Path) {
    // busybox, static (Debian's busybox-static), with its applets as links.
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (package busybox-static)");
    assert!(
        !has_interpreter(&busybox),
        "/bin/busybox is not static: install busybox-static"
    );
    let bin = store.join(BUSYBOX).join("bin");
    std::fs::create_dir_all(&bin).expect("mkdir");
    std::fs::write(bin.join("busybox"), busybox).expect("busybox");
    std::fs::set_permissions(
        bin.join("busybox"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    for applet in [
        "sh", "grep", "readlink", "od", "tr", "mkdir", "cp", "printf", "echo", "touch", "cat",
    ] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).expect("applet link");
    }

    // The stand-in: the check system's kernel and initrd, and the
    // systemd-boot the qemu image installs on the nodes.
    let system = store.join(SYSTEM);
    let qemu = images_dir().join("qemu.iso");
    let (kernel, initrd) = check_system(&qemu, &system);
    assert!(kernel.is_file() && initrd.is_file());
    nodeflash_tests::systemd_boot_of(&qemu, &system.join("systemd-bootx64.efi"));
    script(
        &system,
        "activate",
        "touch /run/standin-activated\necho standin: activated\n",
        SYSTEM,
    );
    script(&system, "bin/switch-to-configuration", SWITCH, SYSTEM);

    let broken = store.join(BROKEN);
    script(&broken, "activate", "exit 0\n", BROKEN);
    script(
        &broken,
        "bin/switch-to-configuration",
        "echo 'standin: the boot loader cannot be installed' >&2\nexit 3\n",
        BROKEN,
    );
}

/// The `qemu` image with the stand-in store as its payload and `toplevel`
/// as its NixOS system.
fn image(dir: &Path, toplevel: &str) -> PathBuf {
    let store = dir.join("store");
    if !store.exists() {
        standin_store(&store);
    }
    build_variant(
        dir,
        "qemu",
        |p| {
            p.replace(
                "synthetic = { files = 300, bytes = \"8MiB\", seed = 1 }",
                "store = \"store\"",
            )
            .replace(
                "system = \"check\"",
                &format!("system = \"nixos\"\ntoplevel = \"{toplevel}\""),
            )
        },
        &[],
    )
}

#[test]
fn a_nixos_system_installs_its_own_boot_loader_and_boots() {
    let dir = tempfile::tempdir().expect("tempdir");
    let iso = image(dir.path(), SYSTEM);
    let disk = Nvme::create(dir.path(), "nvme.img", 2 << 30, "NFTEST0001").expect("disk");
    let console = boot_stick(&iso, &disk);
    assert_console(&console, "nodeflash: done in");
    assert_console(&console, "standin: activated");
    assert_console(&console, "standin: environment ok");
    assert_console(
        &console,
        &format!("boot loader: installed by {SYSTEM}'s switch-to-configuration"),
    );
    // systemd-boot on the removable path, copied by the installer: the
    // stand-in, like `bootctl` without EFI variables, did not write it.
    assert_console(
        &console,
        "systemd-boot copied to the removable path EFI/BOOT/BOOTX64.EFI",
    );
    assert_eq!(
        esp_boot_entries(&disk),
        Some(vec!["::/loader/entries/nixos-generation-1.conf".to_string()])
    );

    let check = boot_installed(&disk);
    assert_installed(
        &check,
        "qemu-node",
        &printed_hostid(&console),
        &payload_digest(&iso),
    );
    assert_eq!(check["nixos_system"], format!("/nix/store/{SYSTEM}"));
}

#[test]
fn a_failed_nixos_boot_loader_installation_is_a_failed_install() {
    let dir = tempfile::tempdir().expect("tempdir");
    let iso = image(dir.path(), BROKEN);
    let disk = Nvme::create(dir.path(), "nvme.img", 2 << 30, "NFTEST0001").expect("disk");
    let console = boot_stick(&iso, &disk);
    assert_console(
        &console,
        "nodeflash: FAILED: the system's boot loader installation (`switch-to-configuration boot`) failed",
    );
    assert_console(&console, "standin: the boot loader cannot be installed");
    assert!(
        !console.contains("nodeflash: done"),
        "no success after a failed step"
    );
    assert!(!console.contains("boot loader: installed by"));
    assert_eq!(esp_boot_entries(&disk), Some(Vec::new()), "no boot entry");
    assert_console(&console, "this console is saved on the disk as");
    // The failure is on the disk, for whoever looks at it later.
    let check = check_unbootable(
        &images_dir().join("qemu.iso"),
        &disk,
        &printed_hostid(&console),
    );
    assert_eq!(check["nixos_system"], format!("/nix/store/{BROKEN}"));
    assert!(check["failed_install_log"].is_array(), "{check:#}");
}

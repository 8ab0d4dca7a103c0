//! The hybrid ISO: ISO9660 plus the EFI image appended as a real GPT EFI
//! system partition, so the same file boots as a CD and from a USB stick
//! written with `dd` (xorriso does the layout).

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use nodeflash_installer::cmd;

/// GPT type GUID of an EFI system partition.
const ESP_TYPE: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";

/// Fixed timestamp for every date in the ISO unless `SOURCE_DATE_EPOCH` is
/// set (2020-01-01T00:00:00Z): same inputs, same bytes.
const DEFAULT_EPOCH: &str = "1577836800";

/// Writes `out` from the files in `root`, the files `grafts` (path in the
/// ISO, file on the host: large files are not copied) and the FAT image `efi_img`.
pub fn write_iso(
    out: &Path,
    root: &Path,
    grafts: &[(&str, &Path)],
    efi_img: &Path,
    volume_id: &str,
    volume_set: &str,
) -> Result<()> {
    let epoch = std::env::var("SOURCE_DATE_EPOCH").unwrap_or_else(|_| DEFAULT_EPOCH.to_string());
    if out.exists() {
        std::fs::remove_file(out).with_context(|| format!("cannot remove {}", out.display()))?;
    }
    cmd::run(
        Command::new("xorriso")
            .env("SOURCE_DATE_EPOCH", &epoch)
            .args(["-as", "mkisofs", "-quiet", "-iso-level", "3", "-R", "-J"])
            .args(["-V", volume_id, "-volset", volume_set])
            // File dates come from the temporary root otherwise.
            .args(["--set_all_file_dates", &format!("={epoch}")])
            .args([
                "-partition_offset",
                "16",
                "-append_partition",
                "2",
                ESP_TYPE,
            ])
            .arg(efi_img)
            .args([
                "-appended_part_as_gpt",
                "-e",
                "--interval:appended_partition_2:all::",
                "-no-emul-boot",
            ])
            .arg("-o")
            .arg(out)
            .arg("-graft-points")
            .arg(format!("/={}", root.display()))
            .args(
                grafts
                    .iter()
                    .map(|(iso_path, file)| format!("{iso_path}={}", file.display())),
            ),
    )
    .with_context(|| format!("cannot write the ISO {}", out.display()))?;
    Ok(())
}

/// Where GRUB looks when started from a CD. Booted from El Torito, Debian's
/// signed GRUB finds no device for its embedded prefix `/EFI/debian` (the
/// El Torito image is no partition it knows), so its memdisk `grub.cfg`
/// searches for the file `/.disk/info` and sources `/boot/grub/grub.cfg` of
/// that file system: here, the ISO9660 tree (Debian's
/// `debian/build-efi-images`; the memdisk is in the image's `mods` section).
pub const CD_MARKER: &str = ".disk/info";
/// See [`CD_MARKER`].
pub const CD_GRUB_CFG: &str = "boot/grub/grub.cfg";

/// Writes the ISO as [`write_iso`] does, with the files GRUB needs to boot
/// from a CD: [`CD_MARKER`] and [`CD_GRUB_CFG`], which opens the appended
/// EFI partition as a loopback device by its place in the ISO (a GRUB block
/// list, in 512-byte sectors) and sources the same `esp_grub_cfg` (a path
/// inside the EFI image) as a USB boot.
///
/// The place is known only once xorriso has laid the ISO out: the ISO is
/// written once with the numbers zeroed, then again with the numbers of the
/// first layout (they have a fixed width, so the layout stays the same,
/// which is checked).
pub fn write_hybrid_iso(
    out: &Path,
    root: &Path,
    grafts: &[(&str, &Path)],
    efi_img: &Path,
    volume_id: &str,
    volume_set: &str,
    esp_grub_cfg: &str,
) -> Result<()> {
    let marker = root.join(CD_MARKER);
    let cfg = root.join(CD_GRUB_CFG);
    for f in [&marker, &cfg] {
        if let Some(dir) = f.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
    }
    std::fs::write(&marker, format!("nodeflash {volume_id}\n"))
        .with_context(|| format!("cannot write {}", marker.display()))?;
    let write_cfg = |esp: (u64, u64)| -> Result<()> {
        let text = cd_grub_cfg(volume_id, esp, esp_grub_cfg);
        std::fs::write(&cfg, text).with_context(|| format!("cannot write {}", cfg.display()))
    };
    write_cfg((0, 0))?;
    write_iso(out, root, grafts, efi_img, volume_id, volume_set)?;
    let first = esp_extent(out)?;
    write_cfg(first)?;
    write_iso(out, root, grafts, efi_img, volume_id, volume_set)?;
    let second = esp_extent(out)?;
    if first != second {
        bail!(
            "the EFI partition of {} moved between two layouts ({first:?}, then {second:?})",
            out.display()
        );
    }
    Ok(())
}

/// GRUB's configuration on the ISO9660 tree (see [`write_hybrid_iso`]):
/// `esp` is the EFI partition's (first sector, sectors), in 512-byte
/// sectors. The block list is padded with spaces to a fixed width (GRUB
/// reads its numbers with `grub_strtoull(…, 0)`: a leading zero would mean
/// octal).
fn cd_grub_cfg(volume_id: &str, esp: (u64, u64), esp_grub_cfg: &str) -> String {
    let blocks = format!("{}+{}", esp.0, esp.1);
    format!(
        "search --no-floppy --set=root --label '{volume_id}'\n\
         loopback esp ($root){blocks:<41}\n\
         set root=(esp)\n\
         source /{esp_grub_cfg}\n"
    )
}

/// Partition 2 of the ISO's GPT (the EFI partition xorriso appends): its
/// first sector and its length, in 512-byte sectors (UEFI 2.10, 5.3.2-5.3.3:
/// the header at LBA 1, the entries where it says).
pub fn esp_extent(iso: &Path) -> Result<(u64, u64)> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f =
        std::fs::File::open(iso).with_context(|| format!("cannot open {}", iso.display()))?;
    let mut header = [0u8; 92];
    f.seek(SeekFrom::Start(512))
        .and_then(|_| f.read_exact(&mut header))
        .with_context(|| format!("cannot read the GPT header of {}", iso.display()))?;
    if &header[..8] != b"EFI PART" {
        bail!("{} has no GPT", iso.display());
    }
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
    let entries = u64_at(&header, 72);
    let entry_size = u32::from_le_bytes(header[84..88].try_into().unwrap_or([0; 4]));
    let mut entry = vec![0u8; usize::try_from(entry_size).unwrap_or(128).max(56)];
    f.seek(SeekFrom::Start(entries * 512 + u64::from(entry_size)))
        .and_then(|_| f.read_exact(&mut entry))
        .with_context(|| format!("cannot read the GPT entries of {}", iso.display()))?;
    let (first, last) = (u64_at(&entry, 32), u64_at(&entry, 40));
    if first == 0 || last < first {
        bail!("{} has no partition 2 in its GPT", iso.display());
    }
    Ok((first, last - first + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cd_config_keeps_its_length_whatever_the_numbers() {
        let a = cd_grub_cfg("NODEFLASH_QEMU", (0, 0), "EFI/debian/grub.cfg");
        let b = cd_grub_cfg("NODEFLASH_QEMU", (51232, 59392), "EFI/debian/grub.cfg");
        assert_eq!(a.len(), b.len());
        assert!(
            b.contains("loopback esp ($root)51232+59392 "),
            "no leading zeros (GRUB would read octal): {b}"
        );
        assert!(b.ends_with("source /EFI/debian/grub.cfg\n"), "{b}");
    }

    #[test]
    fn the_esp_is_found_in_the_gpt() {
        let t = tempfile::tempdir().expect("tempdir");
        let iso = t.path().join("x.iso");
        let mut bytes = vec![0u8; 4096];
        bytes[512..520].copy_from_slice(b"EFI PART");
        bytes[512 + 72..512 + 80].copy_from_slice(&2u64.to_le_bytes());
        bytes[512 + 84..512 + 88].copy_from_slice(&128u32.to_le_bytes());
        let second = 1024 + 128;
        bytes[second + 32..second + 40].copy_from_slice(&100u64.to_le_bytes());
        bytes[second + 40..second + 48].copy_from_slice(&199u64.to_le_bytes());
        std::fs::write(&iso, &bytes).expect("write");
        assert_eq!(esp_extent(&iso).expect("extent"), (100, 100));
        bytes[512] = b'X';
        std::fs::write(&iso, &bytes).expect("write");
        assert!(esp_extent(&iso).is_err());
    }
}

//! The hybrid ISO: ISO9660 plus the EFI image appended as a real GPT EFI
//! system partition, so the same file boots as a CD and from a USB stick
//! written with `dd` (xorriso does the layout).

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
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

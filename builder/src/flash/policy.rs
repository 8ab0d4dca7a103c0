//! The pure decision whether a disk may be overwritten (the rules in the
//! module documentation of [`super`]), and the listing of every disk.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use nodeflash_installer::facts::{human_bytes, sorted_entries};
use serde::Serialize;

use super::device::DeviceFacts;

/// What the decision depends on besides the device.
#[derive(Debug, Clone)]
pub struct Policy {
    pub max_size: u64,
    /// The image's size, when there is one (a disk must hold it).
    pub image_size: Option<u64>,
    /// `--force` named this very device.
    pub forced: bool,
}

/// One rule a device breaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refusal {
    /// `not-removable`, `too-large`, `mounted`, `swap`, `held`, `read-only`,
    /// `no-medium` or `too-small`.
    pub rule: &'static str,
    /// What is wrong, naming the device.
    pub message: String,
    /// What to do about it.
    pub fix: String,
    /// Whether `--force DEVICE` overrides it.
    pub forcible: bool,
}

/// The decision on one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub accepted: bool,
    pub refusals: Vec<Refusal>,
}

/// Decides whether `d` may be overwritten. Pure: facts in, verdict out.
pub fn decide(d: &DeviceFacts, policy: &Policy) -> Verdict {
    let dev = d.path.display().to_string();
    let mut refusals = Vec::new();
    let mut refuse = |rule, message: String, fix: String, forcible| {
        refusals.push(Refusal {
            rule,
            message,
            fix,
            forcible,
        });
    };
    if !d.mounts.is_empty() {
        let list: Vec<String> = d
            .mounts
            .iter()
            .map(|(dev, mp)| format!("/dev/{dev} on {mp}"))
            .collect();
        // By mount point: a device mounted in several places needs one
        // umount for each, deepest first.
        let mut points: Vec<&str> = d.mounts.iter().map(|(_, mp)| mp.as_str()).collect();
        points.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
        points.dedup();
        let cmds: Vec<String> = points.iter().map(|mp| format!("umount {mp}")).collect();
        refuse(
            "mounted",
            format!("{dev} is mounted ({})", list.join(", ")),
            format!(
                "unmount it first (`{}`) if it really is the stick to overwrite; --force does not override this",
                cmds.join("; ")
            ),
            false,
        );
    }
    if !d.swaps.is_empty() {
        let list: Vec<String> = d.swaps.iter().map(|s| format!("/dev/{s}")).collect();
        refuse(
            "swap",
            format!("{dev} holds active swap ({})", list.join(", ")),
            format!(
                "turn it off first (`swapoff {}`); --force does not override this",
                list.join(" ")
            ),
            false,
        );
    }
    if !d.holders.is_empty() {
        let list: Vec<String> = d
            .holders
            .iter()
            .map(|(dev, h)| format!("/dev/{dev} is held by {h}"))
            .collect();
        refuse(
            "held",
            format!("{dev} is in use: {}", list.join(", ")),
            "close what uses it first (`cryptsetup close`, `vgchange -an`, `mdadm --stop`); --force does not override this".into(),
            false,
        );
    }
    if d.disk.read_only {
        refuse(
            "read-only",
            format!("{dev} is read-only (sysfs ro=1)"),
            "slide the write-protect switch of the card or stick to unlocked and plug it in again"
                .into(),
            false,
        );
    }
    if d.disk.size_bytes == 0 {
        refuse(
            "no-medium",
            format!("{dev} has no medium (size 0)"),
            "insert the card into the reader, or plug the stick in again".into(),
            false,
        );
    } else if let Some(image) = policy.image_size.filter(|&n| n > d.disk.size_bytes) {
        refuse(
            "too-small",
            format!(
                "{dev} ({}) is smaller than the image ({})",
                human_bytes(d.disk.size_bytes),
                human_bytes(image)
            ),
            "use a larger stick".into(),
            false,
        );
    }
    if !d.disk.removable && d.disk.bus != "usb" {
        refuse(
            "not-removable",
            format!(
                "{dev} is not a removable disk (sysfs removable=0, transport {}): likely an internal disk",
                d.disk.bus
            ),
            format!("pick a USB stick (`nodeflash flash` lists them); if {dev} really is the stick, add --force {dev}"),
            true,
        );
    }
    if d.disk.size_bytes > policy.max_size {
        refuse(
            "too-large",
            format!(
                "{dev} ({}) is larger than --max-size ({}): likely not a USB stick",
                human_bytes(d.disk.size_bytes),
                human_bytes(policy.max_size)
            ),
            format!("if {dev} really is the stick, raise --max-size or add --force {dev}"),
            true,
        );
    }
    let accepted = refusals.iter().all(|r| r.forcible && policy.forced);
    Verdict { accepted, refusals }
}

/// The devices the listing skips: virtual ones and optical drives.
fn is_listed(name: &str) -> bool {
    !["loop", "ram", "zram", "dm-", "md", "nbd", "zd", "sr", "fd"]
        .iter()
        .any(|p| name.starts_with(p))
}

/// One line of the listing.
#[derive(Debug, Clone, Serialize)]
pub struct Listed {
    #[serde(flatten)]
    pub device: DeviceFacts,
    #[serde(flatten)]
    pub verdict: Verdict,
}

/// Every whole disk of `sysfs` with its verdict (nothing forced).
pub fn list(sysfs: &Path, mountinfo: &str, swaps: &str, policy: &Policy) -> Result<Vec<Listed>> {
    let policy = Policy {
        forced: false,
        ..policy.clone()
    };
    sorted_entries(&sysfs.join("block"))
        .into_iter()
        .filter(|n| is_listed(n))
        .map(|name| {
            let device = DeviceFacts::read(sysfs, &name, mountinfo, swaps)?;
            let verdict = decide(&device, &policy);
            Ok(Listed { device, verdict })
        })
        .collect()
}

/// The listing for people: the disks it would accept, then the refused
/// ones with their reasons.
pub fn format_listing(listed: &[Listed]) -> String {
    let mut out = String::new();
    let line = |out: &mut String, l: &Listed| {
        let d = &l.device;
        let _ = writeln!(
            out,
            "  {:<14} {:>10}  {:<28} {:<6} serial {}",
            d.path.display(),
            human_bytes(d.disk.size_bytes),
            d.description(),
            d.disk.bus,
            d.disk.serial.as_deref().unwrap_or("-"),
        );
    };
    let (ok, refused): (Vec<&Listed>, Vec<&Listed>) =
        listed.iter().partition(|l| l.verdict.accepted);
    let _ = writeln!(out, "accepted ({}):", ok.len());
    if ok.is_empty() {
        let _ = writeln!(out, "  none: plug in a USB stick");
    }
    for l in &ok {
        line(&mut out, l);
    }
    if !refused.is_empty() {
        let _ = writeln!(out, "refused ({}):", refused.len());
    }
    for l in &refused {
        line(&mut out, l);
        for r in &l.verdict.refusals {
            let _ = writeln!(out, "      {}: {}", r.rule, r.message);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::PathBuf;

    use super::*;
    use crate::flash::{
        kernel_name, parse_mountinfo, parse_swaps, partition_parent, DEFAULT_MAX_SIZE,
    };

    /// A sysfs tree captured from a laptop with six disks plugged in (see
    /// tests/fixtures/flash/README.md), with its mountinfo and swaps.
    fn fixture() -> (PathBuf, String, String) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/flash");
        let read = |n: &str| fs::read_to_string(dir.join(n)).expect("fixture file");
        (
            dir.join("sys"),
            read("proc/self/mountinfo"),
            read("proc/swaps"),
        )
    }

    fn facts(name: &str) -> DeviceFacts {
        let (sys, mi, sw) = fixture();
        DeviceFacts::read(&sys, name, &mi, &sw).expect("facts")
    }

    fn policy() -> Policy {
        Policy {
            max_size: DEFAULT_MAX_SIZE,
            image_size: Some(700 << 20),
            forced: false,
        }
    }

    fn rules(v: &Verdict) -> Vec<&'static str> {
        v.refusals.iter().map(|r| r.rule).collect()
    }

    #[test]
    fn usb_stick_is_accepted() {
        let d = facts("sda");
        assert_eq!(d.path, Path::new("/dev/sda"));
        assert_eq!(d.disk.size_bytes, 60063744 * 512);
        assert_eq!(d.disk.bus, "usb");
        assert!(d.disk.removable && !d.disk.read_only);
        assert_eq!(d.description(), "SanDisk Ultra Fit");
        assert_eq!(d.disk.serial.as_deref(), Some("4C530001230913117105"));
        assert_eq!(d.partitions, ["sda1"]);
        assert!(d.mounts.is_empty() && d.swaps.is_empty() && d.holders.is_empty());
        let v = decide(&d, &policy());
        assert!(v.accepted, "{v:#?}");
        assert!(v.refusals.is_empty());
    }

    #[test]
    fn internal_nvme_is_refused_and_mounted_is_never_forced() {
        let d = facts("nvme0n1");
        assert_eq!(d.disk.bus, "nvme");
        assert_eq!(d.disk.serial.as_deref(), Some("S4EWNX0R123456"));
        assert_eq!(
            d.mounts,
            [
                ("nvme0n1p2".to_string(), "/".to_string()),
                ("nvme0n1p1".to_string(), "/boot/efi".to_string())
            ]
        );
        let v = decide(&d, &policy());
        assert!(!v.accepted);
        assert_eq!(rules(&v), ["mounted", "not-removable", "too-large"]);
        let forced = decide(
            &d,
            &Policy {
                forced: true,
                ..policy()
            },
        );
        assert!(!forced.accepted, "--force never overrides mounted");
        let m = &v.refusals[0];
        assert!(
            m.message.contains("/dev/nvme0n1 is mounted"),
            "{}",
            m.message
        );
        assert!(
            m.fix.contains("(`umount /boot/efi; umount /`)"),
            "{}",
            m.fix
        );
        assert!(!m.forcible);
    }

    #[test]
    fn sata_disk_is_refused_unless_forced() {
        let d = facts("sdb");
        assert_eq!(d.disk.bus, "ata");
        assert_eq!(
            d.disk.serial.as_deref(),
            Some("WD-WCC4E1234567"),
            "from VPD page 0x80"
        );
        let small = Policy {
            max_size: 8 << 40,
            ..policy()
        };
        let v = decide(&d, &small);
        assert_eq!(rules(&v), ["not-removable"]);
        assert!(!v.accepted);
        let r = &v.refusals[0];
        assert!(
            r.message.contains("/dev/sdb is not a removable disk"),
            "{}",
            r.message
        );
        assert!(r.fix.contains("--force /dev/sdb"), "{}", r.fix);
        assert!(
            decide(
                &d,
                &Policy {
                    forced: true,
                    ..small
                }
            )
            .accepted
        );
    }

    #[test]
    fn mounted_stick_is_refused_with_the_mount_point() {
        let d = facts("sdc");
        assert_eq!(
            d.mounts,
            [("sdc1".to_string(), "/media/alice/MY STICK".to_string())]
        );
        let v = decide(
            &d,
            &Policy {
                forced: true,
                ..policy()
            },
        );
        assert_eq!(rules(&v), ["mounted"]);
        assert!(!v.accepted);
        assert!(v.refusals[0]
            .message
            .contains("/dev/sdc1 on /media/alice/MY STICK"));
    }

    #[test]
    fn large_usb_disk_is_refused_over_the_limit() {
        let d = facts("sdd");
        assert!(!d.disk.removable, "removable=0, but on the USB transport");
        assert_eq!(d.disk.bus, "usb");
        let v = decide(&d, &policy());
        assert_eq!(rules(&v), ["too-large"]);
        assert!(
            v.refusals[0].message.contains("2.0 TB") || v.refusals[0].message.contains("1.8 TiB"),
            "{}",
            v.refusals[0].message
        );
        assert!(
            decide(
                &d,
                &Policy {
                    forced: true,
                    ..policy()
                }
            )
            .accepted
        );
        assert!(
            decide(
                &d,
                &Policy {
                    max_size: 4 << 40,
                    ..policy()
                }
            )
            .accepted
        );
    }

    #[test]
    fn read_only_card_is_refused_even_forced() {
        let d = facts("sde");
        assert!(d.disk.read_only);
        let v = decide(
            &d,
            &Policy {
                forced: true,
                ..policy()
            },
        );
        assert_eq!(rules(&v), ["read-only"]);
        assert!(!v.accepted);
        assert!(v.refusals[0].fix.contains("write-protect"));
    }

    #[test]
    fn swap_and_holders_are_in_use() {
        let d = facts("sdf");
        assert_eq!(d.swaps, ["sdf2"]);
        assert_eq!(d.holders, [("sdf1".to_string(), "dm-0".to_string())]);
        let v = decide(
            &d,
            &Policy {
                forced: true,
                ..policy()
            },
        );
        assert_eq!(rules(&v), ["swap", "held"]);
        assert!(!v.accepted);
        assert!(v.refusals[0].fix.contains("swapoff /dev/sdf2"));
    }

    #[test]
    fn too_small_and_no_medium() {
        let mut d = facts("sda");
        let big = Policy {
            image_size: Some(64 << 30),
            ..policy()
        };
        assert_eq!(rules(&decide(&d, &big)), ["too-small"]);
        d.disk.size_bytes = 0;
        assert_eq!(rules(&decide(&d, &policy())), ["no-medium"]);
    }

    #[test]
    fn partitions_name_their_disk() {
        let (sys, _, _) = fixture();
        assert_eq!(kernel_name(&sys, "8:33").expect("8:33"), "sdc1");
        assert_eq!(partition_parent(&sys, "sdc1").as_deref(), Some("sdc"));
        assert_eq!(
            partition_parent(&sys, "nvme0n1p2").as_deref(),
            Some("nvme0n1")
        );
        assert_eq!(partition_parent(&sys, "sdc"), None);
    }

    #[test]
    fn listing_accepts_sticks_and_gives_reasons() {
        let (sys, mi, sw) = fixture();
        let listed = list(&sys, &mi, &sw, &policy()).expect("list");
        let names: Vec<(&str, bool)> = listed
            .iter()
            .map(|l| (l.device.disk.name.as_str(), l.verdict.accepted))
            .collect();
        assert_eq!(
            names,
            [
                ("nvme0n1", false),
                ("sda", true),
                ("sdb", false),
                ("sdc", false),
                ("sdd", false),
                ("sde", false),
                ("sdf", false)
            ],
            "loop0 and sr0 are not listed"
        );
        let text = format_listing(&listed);
        assert!(text.starts_with("accepted (1):\n  /dev/sda "), "{text}");
        assert!(text.contains("SanDisk Ultra Fit"), "{text}");
        assert!(text.contains("refused (6):"), "{text}");
        assert!(
            text.contains("      read-only: /dev/sde is read-only"),
            "{text}"
        );
        assert!(
            text.contains("      not-removable: /dev/sdb is not a removable disk"),
            "{text}"
        );
    }

    #[test]
    fn mountinfo_and_swaps_parse() {
        let m = parse_mountinfo("118 26 8:33 / /media/a\\040b rw - exfat /dev/sdc1 rw\n");
        assert_eq!(
            m,
            [("8:33".into(), "/dev/sdc1".into(), "/media/a b".into())]
        );
        assert_eq!(
            parse_swaps("Filename Type Size Used Priority\n/swap\\040file file 1 0 -2\n"),
            ["/swap file"]
        );
    }
}

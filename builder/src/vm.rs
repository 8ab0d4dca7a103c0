//! QEMU command lines for booting images: one code path for
//! `nodeflash run-vm` (the console on the terminal) and the QEMU tests'
//! harness (the console captured to a file).
//!
//! The machine is what a node looks like: UEFI (OVMF, with a fresh copy of
//! its variable store), q35, the image as a USB stick on xHCI (or a CD),
//! NVMe disks backed by raw image files, a user-mode NIC. KVM is used only
//! when a short probe shows that it works (on some hosts a KVM guest
//! hangs), otherwise TCG; `NODEFLASH_ACCEL=kvm|tcg` forces one.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nodeflash_installer::cmd;
use nodeflash_installer::facts::human_bytes;
use nodeflash_installer::profile::{Profile, Size};

use crate::steps;

/// Where the OVMF firmware is: `(code, variables template)`, in the order
/// the distributions install it (Debian's 4 MiB build first).
const OVMF_CANDIDATES: &[(&str, &str)] = &[
    (
        "/usr/share/OVMF/OVMF_CODE_4M.fd",
        "/usr/share/OVMF/OVMF_VARS_4M.fd",
    ),
    (
        "/usr/share/OVMF/OVMF_CODE.fd",
        "/usr/share/OVMF/OVMF_VARS.fd",
    ),
    (
        "/usr/share/edk2/ovmf/OVMF_CODE.fd",
        "/usr/share/edk2/ovmf/OVMF_VARS.fd",
    ),
    (
        "/usr/share/edk2/x64/OVMF_CODE.4m.fd",
        "/usr/share/edk2/x64/OVMF_VARS.4m.fd",
    ),
    (
        "/usr/share/edk2-ovmf/x64/OVMF_CODE.fd",
        "/usr/share/edk2-ovmf/x64/OVMF_VARS.fd",
    ),
];

/// The OVMF code and variables template: `NODEFLASH_OVMF_CODE` and
/// `NODEFLASH_OVMF_VARS` when set, else the first installed candidate.
pub fn ovmf() -> Result<(PathBuf, PathBuf)> {
    if let (Some(code), Some(vars)) = (
        std::env::var_os("NODEFLASH_OVMF_CODE"),
        std::env::var_os("NODEFLASH_OVMF_VARS"),
    ) {
        return Ok((code.into(), vars.into()));
    }
    OVMF_CANDIDATES
        .iter()
        .find(|(code, vars)| Path::new(code).is_file() && Path::new(vars).is_file())
        .map(|(code, vars)| (PathBuf::from(code), PathBuf::from(vars)))
        .with_context(|| {
            format!(
                "no OVMF firmware found (looked for {}): install the package ovmf, or set NODEFLASH_OVMF_CODE and NODEFLASH_OVMF_VARS",
                OVMF_CANDIDATES
                    .iter()
                    .map(|(c, _)| *c)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

/// How the ISO is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Boot {
    /// A USB stick on an xHCI controller (what `dd` onto a stick gives).
    UsbStick,
    /// A CD-ROM drive.
    Cdrom,
    /// No stick: the firmware boots the first NVMe disk (an installed node).
    Disk,
}

/// An NVMe disk backed by a raw image file.
#[derive(Debug, Clone)]
pub struct Nvme {
    pub image: PathBuf,
    pub serial: String,
    pub logical_block_size: u32,
    /// A disk that answers every request only after this many seconds and
    /// holds nothing (QEMU's `null-co` driver with `latency-ns`; `image` is
    /// then not used): a disk that has all but stopped answering.
    pub latency_secs: Option<u64>,
}

impl Nvme {
    /// Creates an empty (sparse) disk image of `size` bytes.
    pub fn create(dir: &Path, name: &str, size: u64, serial: &str) -> Result<Self> {
        let image = dir.join(name);
        let f = std::fs::File::create(&image)
            .with_context(|| format!("cannot create {}", image.display()))?;
        f.set_len(size)
            .with_context(|| format!("cannot size {}", image.display()))?;
        Ok(Self {
            image,
            serial: serial.to_string(),
            logical_block_size: 512,
            latency_secs: None,
        })
    }
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone)]
pub enum Console {
    /// Captured to a file.
    File(PathBuf),
    /// This terminal, multiplexed with QEMU's monitor (`Ctrl-A X` quits,
    /// `Ctrl-A H` lists the keys).
    Terminal,
}

/// What the VM is made of.
#[derive(Debug, Clone)]
pub struct Machine {
    /// The image (unused for [`Boot::Disk`]).
    pub iso: PathBuf,
    pub boot: Boot,
    pub nvme: Vec<Nvme>,
    pub memory_mib: u32,
    pub cpus: u32,
    /// SMBIOS system serial (`-smbios type=1,serial=…`).
    pub smbios_serial: Option<String>,
    /// MAC address of the NIC (QEMU's default otherwise).
    pub mac: Option<String>,
    /// With [`Boot::Disk`]: start this kernel and initrd with this command
    /// line instead of the disk's boot loader (QEMU's `-kernel`), e.g. to
    /// look at a disk that was deliberately left unbootable.
    pub kernel: Option<(PathBuf, PathBuf, String)>,
}

impl Machine {
    pub fn new(iso: PathBuf, boot: Boot) -> Self {
        Self {
            iso,
            boot,
            nvme: Vec::new(),
            memory_mib: 2048,
            cpus: 1,
            smbios_serial: None,
            mac: None,
            kernel: None,
        }
    }
}

/// Whether KVM works here: `NODEFLASH_ACCEL=kvm|tcg` decides, else OVMF
/// under `-accel kvm` must print on the serial port within a few seconds.
/// Probed once per process.
pub fn kvm_works() -> bool {
    static KVM: OnceLock<bool> = OnceLock::new();
    *KVM.get_or_init(|| match std::env::var("NODEFLASH_ACCEL").as_deref() {
        Ok("tcg") => false,
        Ok("kvm") => true,
        _ => probe_kvm().unwrap_or(false),
    })
}

fn probe_kvm() -> Result<bool> {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Ok(false);
    }
    // The probe boots the same firmware, machine and CPU as the VMs: on some
    // hosts a KVM guest starts but OVMF hangs, or QEMU refuses the host CPU.
    let dir = tempfile::tempdir().context("cannot create the KVM probe's directory")?;
    let serial = dir.path().join("serial.log");
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-machine",
            "q35",
            "-nodefaults",
            "-display",
            "none",
            "-m",
            "256",
        ])
        .args(firmware_and_serial(
            dir.path(),
            &Console::File(serial.clone()),
        )?)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start qemu-system-x86_64 (package qemu-system-x86)")?;
    // OVMF prints on the serial port within a second or two under KVM.
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut ok = false;
    while Instant::now() < deadline {
        if std::fs::metadata(&serial).is_ok_and(|m| m.len() > 0) {
            ok = true;
            break;
        }
        if child.try_wait()?.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    eprintln!(
        "qemu: KVM probe {}",
        if ok {
            "passed: using KVM"
        } else {
            "failed: using TCG"
        }
    );
    Ok(ok)
}

/// OVMF (code read-only, a fresh copy of the variables in `dir`) and the
/// serial port.
fn firmware_and_serial(dir: &Path, console: &Console) -> Result<Vec<String>> {
    let (code, template) = ovmf()?;
    let vars = dir.join("OVMF_VARS.fd");
    std::fs::copy(&template, &vars)
        .with_context(|| format!("cannot copy {} to {}", template.display(), vars.display()))?;
    Ok(vec![
        "-drive".into(),
        format!(
            "if=pflash,format=raw,unit=0,readonly=on,file={}",
            code.display()
        ),
        "-drive".into(),
        format!("if=pflash,format=raw,unit=1,file={}", vars.display()),
        "-serial".into(),
        match console {
            Console::File(path) => format!("file:{}", path.display()),
            Console::Terminal => "mon:stdio".into(),
        },
    ])
}

/// The QEMU command for `m`, its firmware variables in `dir` (which must
/// outlive the VM). `kvm` is usually [`kvm_works`].
pub fn command(m: &Machine, kvm: bool, console: &Console, dir: &Path) -> Result<Command> {
    let mut c = Command::new("qemu-system-x86_64");
    if kvm {
        c.args(["-accel", "kvm", "-cpu", "host"]);
    } else {
        c.args(["-accel", "tcg", "-cpu", "max"]);
    }
    c.args([
        "-machine",
        "q35",
        "-smp",
        &m.cpus.to_string(),
        "-m",
        &m.memory_mib.to_string(),
    ])
    .args([
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-vga",
        "none",
    ])
    .args(firmware_and_serial(dir, console)?);
    let mut nic = "user,model=virtio-net-pci".to_string();
    if let Some(mac) = &m.mac {
        nic.push_str(&format!(",mac={mac}"));
    }
    c.args(["-nic", &nic]);
    if let Some(serial) = &m.smbios_serial {
        c.args(["-smbios", &format!("type=1,serial={serial}")]);
    }
    match m.boot {
        Boot::UsbStick => {
            c.args(["-device", "qemu-xhci,id=xhci"])
                .arg("-drive")
                .arg(format!(
                    "if=none,id=stick,format=raw,readonly=on,file={}",
                    m.iso.display()
                ))
                .args([
                    "-device",
                    "usb-storage,bus=xhci.0,drive=stick,removable=on,bootindex=1",
                ]);
        }
        Boot::Cdrom => {
            c.arg("-drive")
                .arg(format!(
                    "if=none,id=cd,media=cdrom,readonly=on,file={}",
                    m.iso.display()
                ))
                .args(["-device", "ide-cd,drive=cd,bootindex=1"]);
        }
        Boot::Disk => {
            if let Some((kernel, initrd, append)) = &m.kernel {
                c.arg("-kernel")
                    .arg(kernel)
                    .arg("-initrd")
                    .arg(initrd)
                    .args(["-append", append]);
            }
        }
    }
    for (i, d) in m.nvme.iter().enumerate() {
        c.arg("-drive")
            .arg(format!(
                "if=none,id=nvme{i},format=raw,{}",
                match d.latency_secs {
                    Some(s) => format!(
                        "file=null-co://,file.size={},file.latency-ns={}",
                        std::fs::metadata(&d.image).map_or(0, |m| m.len()),
                        s * 1_000_000_000
                    ),
                    None => format!("file={}", d.image.display()),
                }
            ))
            .arg("-device")
            .arg(format!(
                "nvme,drive=nvme{i},serial={},logical_block_size={lbs},physical_block_size={lbs}{boot}",
                d.serial,
                lbs = d.logical_block_size,
                boot = if m.boot == Boot::Disk && i == 0 { ",bootindex=1" } else { "" }
            ));
    }
    Ok(c)
}

/// Which boots `run-vm` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Boots {
    /// The image as a USB stick, with the NVMe disk.
    Stick,
    /// The NVMe disk alone (an installed node).
    Disk,
    /// The stick, then the disk alone.
    Both,
}

/// The default serial of `run-vm`'s disk when the profile names none.
pub const DEFAULT_DISK_SERIAL: &str = "NFVM0001";
/// The default size of `run-vm`'s disk when the profile has no size rule.
pub const DEFAULT_DISK_SIZE: u64 = 64 << 30;

pub const RUN_VM_HELP: &str = "Examples:
  nodeflash run-vm --profile qemu                 # target/nodeflash/qemu.iso, a disk its rules accept
  nodeflash run-vm --iso my.iso --disk node.img   # keep the disk to boot it again later
  nodeflash run-vm --iso my.iso --boot stick --disk-size 1TB --disk-serial S4EWNX0R123456
  nodeflash run-vm --boot disk --disk node.img
  cargo xtask run-vm --profile alrest             # builds the ISO first

The serial console is this terminal: Ctrl-A X quits QEMU, Ctrl-A H lists the keys.
The disk is a sparse NVMe image (a fresh temporary one unless --disk); with
--profile, its size and serial follow the profile's [disk] select rules.
KVM is used when a short probe shows it works, else TCG (NODEFLASH_ACCEL=kvm|tcg
forces one). Needs qemu-system-x86 and ovmf.

Exit status: 0 the VMs ran and QEMU exited normally, 1 error, 2 bad usage.";

/// The options of `nodeflash run-vm` (and `cargo xtask run-vm`).
#[derive(Debug, Clone, clap::Args)]
pub struct RunVmArgs {
    /// The image to boot [default with --profile: target/nodeflash/PROFILE.iso].
    #[arg(long)]
    pub iso: Option<PathBuf>,
    /// The profile the image was built from: the disk follows its rules.
    #[arg(long)]
    pub profile: Option<String>,
    /// Which boots: the stick (installing), the disk alone, or both in turn.
    #[arg(long, value_enum, default_value = "both")]
    pub boot: Boots,
    /// Keep the NVMe disk in this file (created sparse when missing, else reused).
    #[arg(long)]
    pub disk: Option<PathBuf>,
    /// Size of a new disk [default: from the profile's rules, else 64GiB].
    #[arg(long)]
    pub disk_size: Option<Size>,
    /// NVMe serial of the disk [default: the profile's, else NFVM0001].
    #[arg(long)]
    pub disk_serial: Option<String>,
    /// Memory in MiB.
    #[arg(long, default_value_t = 2048)]
    pub memory: u32,
    #[arg(long, default_value_t = 2)]
    pub cpus: u32,
}

/// A disk size and serial the profile's `[disk] select` rules accept (on
/// the NVMe bus): its serial, and a size in its range (64 GiB when that
/// fits).
pub fn disk_for_profile(p: &Profile) -> (u64, Option<String>) {
    let s = &p.disk.select;
    let min = s.min_size.map(|v| v.0);
    let max = s.max_size.map(|v| v.0);
    let size = match (min, max) {
        (Some(lo), Some(hi)) if DEFAULT_DISK_SIZE < lo || DEFAULT_DISK_SIZE > hi => lo / 2 + hi / 2,
        (Some(lo), None) if DEFAULT_DISK_SIZE < lo => lo,
        (None, Some(hi)) if DEFAULT_DISK_SIZE > hi => hi,
        _ => DEFAULT_DISK_SIZE,
    };
    // Whole MiB, as a real disk would be.
    (size & !((1 << 20) - 1), s.serial.clone())
}

/// `run-vm`: boots the stick with the disk, then the disk alone, with the
/// console on this terminal.
pub fn run_command(a: &RunVmArgs, profiles_dir: &Path) -> Result<()> {
    let profile = match &a.profile {
        Some(name) => Some(Profile::load(&crate::build::profile_path(
            name,
            profiles_dir,
        ))?),
        None => None,
    };
    let (size, serial) = profile
        .as_ref()
        .map_or((DEFAULT_DISK_SIZE, None), disk_for_profile);
    let size = a.disk_size.map_or(size, |s| s.0);
    let serial = a
        .disk_serial
        .clone()
        .or(serial)
        .unwrap_or_else(|| DEFAULT_DISK_SERIAL.into());
    let iso = a.iso.clone().or_else(|| {
        profile
            .as_ref()
            .map(|p| Path::new("target/nodeflash").join(format!("{}.iso", p.name)))
    });
    let stick = a.boot != Boots::Disk;
    let iso = match (stick, iso) {
        (true, Some(iso)) => {
            if !iso.is_file() {
                bail!(
                    "no image {}: build it first (`cargo xtask build-iso --profile NAME`)",
                    iso.display()
                );
            }
            iso
        }
        (true, None) => bail!("give the image to boot: --iso ISO or --profile NAME"),
        (false, _) => PathBuf::new(),
    };
    if a.boot == Boots::Disk && a.disk.is_none() {
        bail!("--boot disk needs --disk PATH (a disk installed by an earlier run)");
    }
    if serial.is_empty() || serial.len() > 20 {
        bail!("the NVMe serial {serial:?} must have 1 to 20 characters");
    }
    let dir = tempfile::tempdir().context("cannot create the VM's directory")?;
    let disk_path = a
        .disk
        .clone()
        .unwrap_or_else(|| dir.path().join("nvme.img"));
    let disk = if disk_path.exists() {
        let len = std::fs::metadata(&disk_path)
            .with_context(|| format!("cannot inspect {}", disk_path.display()))?
            .len();
        steps::note(&format!(
            "disk: reusing {} ({}), NVMe serial {serial}",
            disk_path.display(),
            human_bytes(len)
        ));
        Nvme {
            image: disk_path,
            serial,
            logical_block_size: 512,
            latency_secs: None,
        }
    } else {
        if a.boot == Boots::Disk {
            bail!(
                "no disk {}: install it first (--boot stick or both)",
                disk_path.display()
            );
        }
        let parent = match disk_path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let name = disk_path
            .file_name()
            .with_context(|| format!("{} is not a file name", disk_path.display()))?;
        let d = Nvme::create(parent, &name.to_string_lossy(), size, &serial)?;
        steps::note(&format!(
            "disk: new sparse {} of {} ({size} bytes), NVMe serial {serial}{}",
            d.image.display(),
            human_bytes(size),
            if a.disk.is_none() {
                ", removed at the end"
            } else {
                ""
            }
        ));
        d
    };
    let kvm = kvm_works();
    let boot = |what: &str, m: &Machine| -> Result<()> {
        steps::note(&format!(
            "{what} ({}, {} MiB, {} CPUs); the console follows, Ctrl-A X quits",
            if kvm { "KVM" } else { "TCG, slow" },
            m.memory_mib,
            m.cpus
        ));
        let mut c = command(m, kvm, &Console::Terminal, dir.path())?;
        cmd::run_attached(&mut c).context("the VM failed")
    };
    let machine = |iso: PathBuf, b: Boot| Machine {
        nvme: vec![disk.clone()],
        memory_mib: a.memory,
        cpus: a.cpus,
        ..Machine::new(iso, b)
    };
    if stick {
        boot(
            &format!("booting {} as a USB stick", iso.display()),
            &machine(iso.clone(), Boot::UsbStick),
        )?;
    }
    if a.boot != Boots::Stick {
        boot(
            &format!("booting the disk {} alone", disk.image.display()),
            &machine(PathBuf::new(), Boot::Disk),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(c: &Command) -> Vec<String> {
        c.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    fn with_fake_ovmf<T>(f: impl FnOnce(&Path) -> T) -> T {
        let t = tempfile::tempdir().expect("tempdir");
        std::fs::write(t.path().join("code.fd"), b"code").expect("write");
        std::fs::write(t.path().join("vars.fd"), b"vars").expect("write");
        std::env::set_var("NODEFLASH_OVMF_CODE", t.path().join("code.fd"));
        std::env::set_var("NODEFLASH_OVMF_VARS", t.path().join("vars.fd"));
        f(t.path())
    }

    #[test]
    fn stick_and_disk_command_lines() {
        with_fake_ovmf(|fw| {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut m = Machine::new(PathBuf::from("/images/q.iso"), Boot::UsbStick);
            m.nvme.push(Nvme {
                image: PathBuf::from("/d/n.img"),
                serial: "NFTEST0001".into(),
                logical_block_size: 4096,
                latency_secs: None,
            });
            let c = command(&m, false, &Console::Terminal, dir.path()).expect("command");
            let a = args(&c).join(" ");
            assert!(
                a.starts_with("-accel tcg -cpu max -machine q35 -smp 1 -m 2048"),
                "{a}"
            );
            assert!(
                a.contains(&format!(
                    "unit=0,readonly=on,file={}",
                    fw.join("code.fd").display()
                )),
                "{a}"
            );
            assert!(
                a.contains(&format!(
                    "unit=1,file={}",
                    dir.path().join("OVMF_VARS.fd").display()
                )),
                "{a}"
            );
            assert_eq!(
                std::fs::read(dir.path().join("OVMF_VARS.fd")).expect("vars copied"),
                b"vars"
            );
            assert!(a.contains("-serial mon:stdio"), "{a}");
            assert!(a.contains("-device qemu-xhci,id=xhci -drive if=none,id=stick,format=raw,readonly=on,file=/images/q.iso"), "{a}");
            assert!(
                a.contains("usb-storage,bus=xhci.0,drive=stick,removable=on,bootindex=1"),
                "{a}"
            );
            assert!(a.ends_with("nvme,drive=nvme0,serial=NFTEST0001,logical_block_size=4096,physical_block_size=4096"), "{a}");
            m.boot = Boot::Disk;
            let c =
                command(&m, true, &Console::File("/t/c.log".into()), dir.path()).expect("command");
            let a = args(&c).join(" ");
            assert!(a.starts_with("-accel kvm -cpu host"), "{a}");
            assert!(a.contains("-serial file:/t/c.log"), "{a}");
            assert!(!a.contains("stick"), "{a}");
            assert!(a.ends_with("physical_block_size=4096,bootindex=1"), "{a}");
        });
    }

    #[test]
    fn disk_follows_the_profile_rules() {
        let profiles = Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiles");
        let qemu = Profile::load(&profiles.join("qemu.toml")).expect("qemu profile");
        assert_eq!(
            disk_for_profile(&qemu),
            (8 << 30, Some("NFTEST0001".into()))
        );
        let alrest = Profile::load(&profiles.join("alrest.toml")).expect("alrest profile");
        let (size, serial) = disk_for_profile(&alrest);
        assert!(
            (900_000_000_000..=1_100_000_000_000).contains(&size),
            "{size}"
        );
        assert_eq!(serial, None);
    }
}

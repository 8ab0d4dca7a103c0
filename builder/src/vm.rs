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
use std::time::Duration;

use anyhow::{bail, Context, Result};
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

/// OVMF built with Secure Boot, and a variables template with Microsoft's
/// keys enrolled and Secure Boot on (what a consumer board ships with):
/// `(code, variables template)`, in the order they are looked for.
const OVMF_SECURE_BOOT_CANDIDATES: &[(&str, &str)] = &[
    // Debian, Ubuntu (package ovmf)
    (
        "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd",
        "/usr/share/OVMF/OVMF_VARS_4M.ms.fd",
    ),
    // Fedora (edk2-ovmf)
    (
        "/usr/share/edk2/ovmf/OVMF_CODE.secboot.fd",
        "/usr/share/edk2/ovmf/OVMF_VARS.secboot.fd",
    ),
];

/// The Secure Boot OVMF: `NODEFLASH_OVMF_SB_CODE` and
/// `NODEFLASH_OVMF_SB_VARS` when set, else the first installed candidate.
/// It needs SMM (`-machine q35,smm=on`) and a secure flash
/// (`-global driver=cfi.pflash01,property=secure,value=on`), which
/// [`command`] adds.
pub fn ovmf_secure_boot() -> Result<(PathBuf, PathBuf)> {
    if let (Some(code), Some(vars)) = (
        std::env::var_os("NODEFLASH_OVMF_SB_CODE"),
        std::env::var_os("NODEFLASH_OVMF_SB_VARS"),
    ) {
        return Ok((code.into(), vars.into()));
    }
    OVMF_SECURE_BOOT_CANDIDATES
        .iter()
        .find(|(code, vars)| Path::new(code).is_file() && Path::new(vars).is_file())
        .map(|(code, vars)| (PathBuf::from(code), PathBuf::from(vars)))
        .with_context(|| {
            format!(
                "no OVMF firmware with Secure Boot found (looked for {}): install the package ovmf, \
                 or set NODEFLASH_OVMF_SB_CODE and NODEFLASH_OVMF_SB_VARS",
                OVMF_SECURE_BOOT_CANDIDATES
                    .iter()
                    .map(|(c, v)| format!("{c} with {v}"))
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
    /// No stick: the firmware boots from the network (PXE) on the NIC,
    /// which should be a [`Machine::tap`] on a LAN with a boot server.
    Network,
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
    /// Disks on virtio (`virtio-blk-pci`, `/dev/vdX` in the guest), after
    /// the NVMe disks; `logical_block_size` and `latency_secs` are not used.
    pub virtio: Vec<Nvme>,
    pub memory_mib: u32,
    pub cpus: u32,
    /// SMBIOS system serial (`-smbios type=1,serial=…`).
    pub smbios_serial: Option<String>,
    /// MAC address of the NIC (QEMU's default otherwise).
    pub mac: Option<String>,
    /// The NIC on this host's tap interface (`-netdev tap`, made
    /// beforehand) instead of QEMU's user networking.
    pub tap: Option<String>,
    /// With [`Boot::Disk`]: start this kernel and initrd with this command
    /// line instead of the disk's boot loader (QEMU's `-kernel`), e.g. to
    /// look at a disk that was deliberately left unbootable.
    pub kernel: Option<(PathBuf, PathBuf, String)>,
    /// Firmware with Secure Boot on and Microsoft's keys enrolled
    /// ([`ovmf_secure_boot`]) instead of plain OVMF.
    pub secure_boot: bool,
}

impl Machine {
    pub fn new(iso: PathBuf, boot: Boot) -> Self {
        Self {
            iso,
            boot,
            nvme: Vec::new(),
            virtio: Vec::new(),
            memory_mib: 2048,
            cpus: 1,
            smbios_serial: None,
            mac: None,
            tap: None,
            kernel: None,
            secure_boot: false,
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
            false,
        )?)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start qemu-system-x86_64 (package qemu-system-x86)")?;
    // OVMF prints on the serial port within a second or two under KVM.
    let printed = nodeflash_installer::wait::wait_until(
        Duration::from_secs(8),
        Duration::from_millis(100),
        || {
            if std::fs::metadata(&serial).is_ok_and(|m| m.len() > 0) {
                Some(true)
            } else {
                // Exited (or cannot be asked): no point waiting.
                (!matches!(child.try_wait(), Ok(None))).then_some(false)
            }
        },
    );
    let ok = printed == Some(true);
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

/// OVMF (code read-only, a fresh copy of the variables in `dir`; with
/// Secure Boot when `secure_boot`) and the serial port.
fn firmware_and_serial(dir: &Path, console: &Console, secure_boot: bool) -> Result<Vec<String>> {
    let (code, template) = if secure_boot {
        ovmf_secure_boot()?
    } else {
        ovmf()?
    };
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
    // Secure Boot OVMF keeps its variables behind SMM: without SMM and a
    // secure flash it does not start (OvmfPkg/README, "SMM support").
    let machine = if m.secure_boot { "q35,smm=on" } else { "q35" };
    c.args([
        "-machine",
        machine,
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
    .args(firmware_and_serial(dir, console, m.secure_boot)?);
    if m.secure_boot {
        c.args(["-global", "driver=cfi.pflash01,property=secure,value=on"]);
    }
    let mac = m.mac.as_ref().map(|mac| format!(",mac={mac}"));
    match &m.tap {
        Some(tap) => {
            c.arg("-netdev")
                .arg(format!("tap,id=net0,ifname={tap},script=no,downscript=no"))
                .arg("-device")
                .arg(format!(
                    "virtio-net-pci,netdev=net0{}{}",
                    mac.unwrap_or_default(),
                    if m.boot == Boot::Network {
                        ",bootindex=1"
                    } else {
                        ""
                    }
                ));
        }
        None => {
            c.args([
                "-nic",
                &format!("user,model=virtio-net-pci{}", mac.unwrap_or_default()),
            ]);
        }
    }
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
        Boot::Network => {}
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
    for (i, d) in m.virtio.iter().enumerate() {
        c.arg("-drive")
            .arg(format!(
                "if=none,id=vd{i},format=raw,file={}",
                d.image.display()
            ))
            .arg("-device")
            .arg(format!("virtio-blk-pci,drive=vd{i},serial={}", d.serial));
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

The installer's outcome is read from its console: after `nodeflash: FAILED` the VM is
stopped (also when the profile halts on failure) and the disk is not booted; a halt
after success stops the VM too. The disk is not booted either when the install wrote
no boot loader (a profile without [boot]). The last line is the verdict (`run-vm: …`).

Exit status: 0 the install succeeded (and the disk's check system, if any, reports
ok), 1 the install failed or did not finish, or an error, 2 bad usage.";

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

/// The console lines of the installer that `run-vm` reads. They are written
/// by `installer/src/pid1.rs` (`print_failure`, `Finish::apply`, `check`)
/// and `installer/src/install/mod.rs` (the warning of a profile without
/// `[boot]`); a unit test checks that those files still print them.
pub mod protocol {
    /// The install failed; the rest of the line is the error.
    pub const FAILED: &str = "nodeflash: FAILED: ";
    /// The install finished (`nodeflash: done in 12.3s`).
    pub const DONE: &str = "nodeflash: done in ";
    /// The installer halted (the machine stays on).
    pub const HALTED: &str = "nodeflash: halted; the machine can be switched off";
    /// The installer could not power off or reboot and halted.
    pub const HALTED_INSTEAD: &str = "halted instead";
    /// The installer wrote no boot loader.
    pub const NO_BOOT_LOADER: &str = "no boot loader is written";
    /// The check system's report on an installed disk (JSON follows).
    pub const CHECK: &str = "nodeflash-check: ";
}

/// What a VM's console said, read line by line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsoleWatch {
    /// The `nodeflash: FAILED: …` message.
    pub failed: Option<String>,
    /// `nodeflash: done in …` was printed.
    pub done: bool,
    /// The installer said it writes no boot loader.
    pub no_boot_loader: bool,
    /// The guest halted: it will never end by itself.
    pub halted: bool,
    /// The check system's report (`nodeflash-check:`), as JSON.
    pub check: Option<serde_json::Value>,
}

impl ConsoleWatch {
    /// Takes one console line (without its line end); true when the VM
    /// should be stopped now (the guest halted).
    pub fn line(&mut self, line: &str) -> bool {
        use protocol::*;
        let line = line.trim_end_matches('\r');
        if let Some(i) = line.find(FAILED) {
            self.failed
                .get_or_insert_with(|| line[i + FAILED.len()..].trim().to_string());
        } else if line.contains(DONE) {
            self.done = true;
        } else if line.contains(NO_BOOT_LOADER) {
            self.no_boot_loader = true;
        } else if let Some(i) = line.find(CHECK) {
            self.check = serde_json::from_str(&line[i + CHECK.len()..]).ok();
        }
        if line.contains(HALTED)
            || (line.contains("nodeflash: cannot power off") && line.contains(HALTED_INSTEAD))
        {
            self.halted = true;
        }
        self.halted
    }

    /// The verdict on an install (`run-vm: …`), and whether it succeeded.
    pub fn install_verdict(&self) -> (bool, String) {
        match (&self.failed, self.done) {
            // A message that goes on below (`…; the disks here:`) points up.
            (Some(e), _) => match e.strip_suffix(':') {
                Some(e) => (false, format!("the install FAILED: {e} (above)")),
                None => (false, format!("the install FAILED: {e}")),
            },
            (None, true) => (true, "the install succeeded".into()),
            (None, false) => (
                false,
                "the install did not finish: the VM ended before the installer printed \
                 `nodeflash: done` or `nodeflash: FAILED`"
                    .into(),
            ),
        }
    }
}

/// Runs QEMU with the serial console (and monitor) on this terminal: the
/// guest's output is copied to stdout as it comes and read by a
/// [`ConsoleWatch`]. When the guest halts, QEMU is stopped with SIGTERM
/// (QEMU then restores the terminal). Errors: QEMU cannot be started, or
/// exits with a failure status that is not the stop.
fn run_watched(c: &mut Command) -> Result<ConsoleWatch> {
    use std::io::{Read, Write};
    let line = format!("{c:?}");
    let mut child = c
        .stdin(Stdio::inherit())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start qemu-system-x86_64 (package qemu-system-x86)")?;
    let mut out = child.stdout.take().context("qemu's stdout")?;
    let mut watch = ConsoleWatch::default();
    let mut stopped = false;
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = [0u8; 4096];
    let stdout = std::io::stdout();
    loop {
        let n = match out.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("cannot read the VM's console"),
        };
        {
            let mut o = stdout.lock();
            let _ = o.write_all(&buf[..n]);
            let _ = o.flush();
        }
        pending.extend_from_slice(&buf[..n]);
        while let Some(i) = pending.iter().position(|&b| b == b'\n') {
            let l: Vec<u8> = pending.drain(..=i).collect();
            let stop = watch.line(String::from_utf8_lossy(&l[..l.len() - 1]).as_ref());
            if stop && !stopped {
                stopped = true;
                steps::note("the guest halted: stopping the VM");
                // SIGTERM: QEMU shuts down cleanly and restores the terminal.
                // SAFETY: kill(2) on our own child, which has not been
                // waited for yet, so its pid is not reused.
                unsafe { nix::libc::kill(child.id() as nix::libc::pid_t, nix::libc::SIGTERM) };
            }
        }
    }
    if !pending.is_empty() {
        watch.line(String::from_utf8_lossy(&pending).as_ref());
    }
    let status = child
        .wait()
        .with_context(|| format!("cannot wait for `{line}`"))?;
    if !status.success() && !stopped {
        bail!("`{line}` failed ({status}); its messages are above");
    }
    Ok(watch)
}

/// `run-vm`: boots the stick with the disk, then the disk alone, with the
/// console on this terminal, and prints the verdict line. False when the
/// install failed or did not finish (the disk is then not booted), or when
/// the disk's check system reports a problem; errors when a VM cannot run.
pub fn run_command(a: &RunVmArgs, profiles_dir: &Path) -> Result<bool> {
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
    let boot = |what: &str, m: &Machine| -> Result<ConsoleWatch> {
        steps::note(&format!(
            "{what} ({}, {} MiB, {} CPUs); the console follows, Ctrl-A X quits",
            if kvm { "KVM" } else { "TCG, slow" },
            m.memory_mib,
            m.cpus
        ));
        let mut c = command(m, kvm, &Console::Terminal, dir.path())?;
        run_watched(&mut c).context("the VM failed")
    };
    let machine = |iso: PathBuf, b: Boot| Machine {
        nvme: vec![disk.clone()],
        memory_mib: a.memory,
        cpus: a.cpus,
        ..Machine::new(iso, b)
    };
    let mut verdict = Vec::new();
    if stick {
        let watch = boot(
            &format!("booting {} as a USB stick", iso.display()),
            &machine(iso.clone(), Boot::UsbStick),
        )?;
        let (ok, text) = watch.install_verdict();
        verdict.push(text);
        if !ok {
            if a.boot == Boots::Both {
                verdict.push("the disk was not booted".into());
            }
            return verdict_end(false, &verdict);
        }
        if a.boot == Boots::Both && watch.no_boot_loader {
            verdict.push(
                "the disk was not booted: the install wrote no boot loader (the profile has no [boot])"
                    .into(),
            );
            return verdict_end(true, &verdict);
        }
    }
    if a.boot != Boots::Stick {
        let watch = boot(
            &format!("booting the disk {} alone", disk.image.display()),
            &machine(PathBuf::new(), Boot::Disk),
        )?;
        match &watch.check {
            Some(c) if c["ok"] == true => {
                verdict.push("the disk booted and its check system reports ok".into())
            }
            Some(c) => {
                verdict.push(format!(
                    "the disk booted, but its check system reports a problem: {c}"
                ));
                return verdict_end(false, &verdict);
            }
            None => verdict.push("the disk booted and the VM ended".into()),
        }
    }
    verdict_end(true, &verdict)
}

/// Prints the one verdict line on stdout (after the console); `ok` back.
fn verdict_end(ok: bool, parts: &[String]) -> Result<bool> {
    println!("run-vm: {}", parts.join("; "));
    Ok(ok)
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
        std::fs::write(t.path().join("sb-code.fd"), b"sb code").expect("write");
        std::fs::write(t.path().join("ms-vars.fd"), b"ms vars").expect("write");
        std::env::set_var("NODEFLASH_OVMF_SB_CODE", t.path().join("sb-code.fd"));
        std::env::set_var("NODEFLASH_OVMF_SB_VARS", t.path().join("ms-vars.fd"));
        f(t.path())
    }

    #[test]
    fn virtio_disks_come_after_the_nvme_disks() {
        with_fake_ovmf(|_| {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut m = Machine::new(PathBuf::from("/images/q.iso"), Boot::Disk);
            for (list, image, serial) in [
                (&mut m.nvme, "/d/n.img", "NFTEST0001"),
                (&mut m.virtio, "/d/v.img", "NFDATA0001"),
            ] {
                list.push(Nvme {
                    image: PathBuf::from(image),
                    serial: serial.into(),
                    logical_block_size: 512,
                    latency_secs: None,
                });
            }
            let c = command(&m, false, &Console::Terminal, dir.path()).expect("command");
            let a = args(&c).join(" ");
            assert!(
                a.ends_with(
                    "serial=NFTEST0001,logical_block_size=512,physical_block_size=512,bootindex=1 \
                     -drive if=none,id=vd0,format=raw,file=/d/v.img \
                     -device virtio-blk-pci,drive=vd0,serial=NFDATA0001"
                ),
                "{a}"
            );
        });
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
    fn secure_boot_needs_smm_a_secure_flash_and_microsofts_keys() {
        with_fake_ovmf(|fw| {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut m = Machine::new(PathBuf::from("/images/q.iso"), Boot::UsbStick);
            m.secure_boot = true;
            let c = command(&m, false, &Console::Terminal, dir.path()).expect("command");
            let a = args(&c).join(" ");
            assert!(a.contains("-machine q35,smm=on "), "{a}");
            assert!(
                a.contains("-global driver=cfi.pflash01,property=secure,value=on"),
                "{a}"
            );
            assert!(
                a.contains(&format!(
                    "unit=0,readonly=on,file={}",
                    fw.join("sb-code.fd").display()
                )),
                "{a}"
            );
            assert_eq!(
                std::fs::read(dir.path().join("OVMF_VARS.fd")).expect("vars copied"),
                b"ms vars"
            );
        });
    }

    #[test]
    fn the_installer_still_prints_the_lines_run_vm_reads() {
        let pid1 = include_str!("../../installer/src/pid1.rs");
        let install = include_str!("../../installer/src/install/mod.rs");
        for (src, needle) in [
            (pid1, "\"nodeflash: FAILED: {e}\""),
            (pid1, "\"nodeflash: done in {"),
            (pid1, protocol::HALTED),
            (pid1, protocol::HALTED_INSTEAD),
            (pid1, "\"nodeflash-check: {}\""),
            (install, protocol::NO_BOOT_LOADER),
        ] {
            assert!(
                src.contains(needle),
                "the installer no longer prints {needle:?}"
            );
        }
    }

    fn watch(console: &str) -> (ConsoleWatch, bool) {
        let mut w = ConsoleWatch::default();
        let mut stop = false;
        for l in console.lines() {
            stop |= w.line(l);
        }
        (w, stop)
    }

    #[test]
    fn a_failed_install_that_halts_stops_the_vm_with_a_failed_verdict() {
        let (w, stop) = watch(
            "nodeflash 0.1.0 · profile alrest\r\n\
             nodeflash: FAILED: no disk matches the profile's [disk] select rules; the disks here:\r\n\
             \x20 caused by: x\r\n\
             nodeflash: nothing more will be done; fix the cause above and boot the stick again\r\n\
             nodeflash: halted; the machine can be switched off\r\n",
        );
        assert!(stop);
        assert_eq!(
            w.install_verdict(),
            (
                false,
                "the install FAILED: no disk matches the profile's [disk] select rules; the disks here (above)"
                    .into()
            )
        );
    }

    #[test]
    fn a_successful_install_without_boot_is_ok_and_marks_no_boot_loader() {
        let (w, stop) = watch(
            "warning: the profile has no [boot]: no boot loader is written\n\
             nodeflash: done in 51.2s\nnodeflash: powering off\n",
        );
        assert!(!stop);
        assert!(w.no_boot_loader);
        assert_eq!(w.install_verdict(), (true, "the install succeeded".into()));
        // A halt after success stops the VM too.
        let (_, stop) =
            watch("nodeflash: done in 1.0s\nnodeflash: halted; the machine can be switched off\n");
        assert!(stop);
        // Quit before the end: no verdict of success.
        let (w, _) = watch("nodeflash 0.1.0\ninventory after 4.1s:\n");
        assert!(!w.install_verdict().0);
        let (w, _) = watch("nodeflash-check: {\"ok\":true}\n");
        assert_eq!(w.check, Some(serde_json::json!({"ok": true})));
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

//! The QEMU harness of the end-to-end tests.
//!
//! A [`Vm`] boots an image under OVMF with the serial console captured to a
//! file. It is always killed when dropped, and every failure carries the tail
//! of its console. KVM is used only when a short probe shows that it works
//! (on some hosts a KVM guest hangs); otherwise TCG.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// An environment variable `cargo xtask test` sets.
pub fn env_path(name: &str) -> PathBuf {
    match std::env::var_os(name) {
        Some(p) => PathBuf::from(p),
        None => panic!("{name} is not set: run the tests with `cargo xtask test`"),
    }
}

/// A profile of `profiles/`, as the tests' images were built from it.
pub fn load_profile(name: &str) -> nodeflash_installer::profile::Profile {
    let path = env_path("NODEFLASH_PROFILES").join(format!("{name}.toml"));
    nodeflash_installer::profile::Profile::load(&path)
        .unwrap_or_else(|e| panic!("cannot load {}: {e:#}", path.display()))
}

/// Builds a variant of a profile of `profiles/` into `dir`: `edit` changes
/// its text, `files` are written beside it (e.g. a CA certificate). The
/// build reuses the cached inputs, so it takes seconds.
pub fn build_variant(
    dir: &Path,
    profile: &str,
    edit: impl FnOnce(&str) -> String,
    files: &[(&str, &str)],
) -> PathBuf {
    let profiles = env_path("NODEFLASH_PROFILES");
    let base = std::fs::read_to_string(profiles.join(format!("{profile}.toml")))
        .unwrap_or_else(|e| panic!("cannot read profile {profile}: {e}"));
    let text = edit(&base);
    assert_ne!(text, base, "the edit changed nothing in {profile}.toml");
    let path = dir.join(format!("{profile}.toml"));
    std::fs::write(&path, text).expect("write the profile");
    for (name, content) in files {
        std::fs::write(dir.join(name), content).expect("write a file beside the profile");
    }
    std::fs::copy(profiles.join("inputs.lock"), dir.join("inputs.lock")).expect("copy the lock");
    nodeflash_builder::build::build(&nodeflash_builder::build::BuildOptions {
        profile: path,
        installer: env_path("NODEFLASH_TEST_INSTALLER"),
        out_dir: dir.join("out"),
        cache: nodeflash_builder::cache::Cache::from_env().expect("cache"),
        reuse_artifacts: true,
    })
    .unwrap_or_else(|e| panic!("cannot build the {profile} variant: {e:#}"))
    .iso
}

/// The JSON of the first console line starting with `prefix`, e.g.
/// `nodeflash-pool: `.
pub fn console_json(console: &str, prefix: &str) -> serde_json::Value {
    let line = console
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line on the console"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{prefix}: {e}"))
}

/// Where `cargo xtask test` put the built images.
pub fn images_dir() -> PathBuf {
    match std::env::var_os("NODEFLASH_TEST_IMAGES") {
        Some(d) => PathBuf::from(d),
        None => panic!("NODEFLASH_TEST_IMAGES is not set: run the tests with `cargo xtask test`, which builds the images first"),
    }
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
        })
    }
}

impl Nvme {
    /// sha256 of the whole disk image, to show that a refusal left it unchanged.
    pub fn sha256(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        let mut f = std::fs::File::open(&self.image)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.image.display()));
        std::io::copy(&mut f, &mut h)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", self.image.display()));
        hex::encode(h.finalize())
    }
}

#[derive(Debug, Clone)]
pub struct VmConfig {
    pub iso: PathBuf,
    pub boot: Boot,
    pub nvme: Vec<Nvme>,
    pub memory_mib: u32,
    pub timeout: Duration,
    /// SMBIOS system serial (`-smbios type=1,serial=…`).
    pub smbios_serial: Option<String>,
    /// MAC address of the NIC (QEMU's default otherwise).
    pub mac: Option<String>,
}

impl VmConfig {
    pub fn new(iso: PathBuf, boot: Boot) -> Self {
        Self {
            iso,
            boot,
            nvme: Vec::new(),
            memory_mib: 2048,
            timeout: Duration::from_secs(300),
            smbios_serial: None,
            mac: None,
        }
    }
}

/// A running VM. Dropping it kills QEMU.
pub struct Vm {
    child: Child,
    console: PathBuf,
    timeout: Duration,
    started: Instant,
    _dir: tempfile::TempDir,
}

/// Whether KVM works here: OVMF under `-accel kvm` must print on the serial
/// port within a few seconds.
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
    // The probe boots the same firmware, machine and CPU as the tests: on some
    // hosts a KVM guest starts but OVMF hangs, or QEMU refuses the host CPU.
    let dir = tempfile::tempdir()?;
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
        .args(firmware_and_serial(dir.path(), &serial)?)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
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
        "harness: KVM probe {}",
        if ok {
            "passed: using KVM"
        } else {
            "failed: using TCG"
        }
    );
    Ok(ok)
}

/// OVMF (code read-only, a fresh copy of the variables in `dir`) and the
/// serial port captured to `serial`.
fn firmware_and_serial(dir: &Path, serial: &Path) -> Result<Vec<String>> {
    let vars = dir.join("OVMF_VARS.fd");
    std::fs::copy(OVMF_VARS, &vars)
        .with_context(|| format!("cannot copy {OVMF_VARS} (package ovmf)"))?;
    Ok(vec![
        "-drive".into(),
        format!("if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"),
        "-drive".into(),
        format!("if=pflash,format=raw,unit=1,file={}", vars.display()),
        "-serial".into(),
        format!("file:{}", serial.display()),
    ])
}

impl Vm {
    pub fn start(cfg: &VmConfig) -> Result<Vm> {
        let dir = tempfile::tempdir().context("cannot create the VM directory")?;
        let console = dir.path().join("console.log");
        let mut c = Command::new("qemu-system-x86_64");
        if kvm_works() {
            c.args(["-accel", "kvm", "-cpu", "host"]);
        } else {
            c.args(["-accel", "tcg", "-cpu", "max"]);
        }
        c.args([
            "-machine",
            "q35",
            "-smp",
            "1",
            "-m",
            &cfg.memory_mib.to_string(),
        ])
        .args([
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-vga",
            "none",
        ])
        .args(firmware_and_serial(dir.path(), &console)?);
        let mut nic = "user,model=virtio-net-pci".to_string();
        if let Some(mac) = &cfg.mac {
            nic.push_str(&format!(",mac={mac}"));
        }
        c.args(["-nic", &nic]);
        if let Some(serial) = &cfg.smbios_serial {
            c.args(["-smbios", &format!("type=1,serial={serial}")]);
        }
        match cfg.boot {
            Boot::UsbStick => {
                c.args(["-device", "qemu-xhci,id=xhci"])
                    .arg("-drive")
                    .arg(format!(
                        "if=none,id=stick,format=raw,readonly=on,file={}",
                        cfg.iso.display()
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
                        cfg.iso.display()
                    ))
                    .args(["-device", "ide-cd,drive=cd,bootindex=1"]);
            }
            Boot::Disk => {}
        }
        for (i, d) in cfg.nvme.iter().enumerate() {
            c.arg("-drive")
                .arg(format!("if=none,id=nvme{i},format=raw,file={}", d.image.display()))
                .arg("-device")
                .arg(format!(
                    "nvme,drive=nvme{i},serial={},logical_block_size={lbs},physical_block_size={lbs}{boot}",
                    d.serial,
                    lbs = d.logical_block_size,
                    boot = if cfg.boot == Boot::Disk && i == 0 { ",bootindex=1" } else { "" }
                ));
        }
        let child = c
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start qemu-system-x86_64 (package qemu-system-x86)")?;
        Ok(Vm {
            child,
            console,
            timeout: cfg.timeout,
            started: Instant::now(),
            _dir: dir,
        })
    }

    /// Everything the guest printed so far.
    pub fn console(&self) -> String {
        std::fs::read(&self.console)
            .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
            .unwrap_or_default()
    }

    /// The last lines of the console, for failure messages.
    pub fn console_tail(&self, lines: usize) -> String {
        let text = self.console();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Waits until QEMU exits on its own (the guest powered off) or the
    /// timeout passes; returns the console.
    pub fn wait_for_poweroff(&mut self) -> Result<String> {
        loop {
            if let Some(status) = self.child.try_wait()? {
                return self.finished(status);
            }
            if self.started.elapsed() > self.timeout {
                let _ = self.child.kill();
                bail!(
                    "the VM did not power off within {}s; console tail:\n{}",
                    self.timeout.as_secs(),
                    self.console_tail(60)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn finished(&mut self, status: ExitStatus) -> Result<String> {
        if !status.success() {
            let mut stderr = String::new();
            if let Some(mut e) = self.child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut stderr);
            }
            bail!(
                "qemu exited with {status}: {stderr}\nconsole tail:\n{}",
                self.console_tail(60)
            );
        }
        eprintln!(
            "harness: VM powered off after {:.1}s",
            self.started.elapsed().as_secs_f64()
        );
        Ok(self.console())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asserts that the console holds `needle`, showing its tail otherwise.
#[track_caller]
pub fn assert_console(console: &str, needle: &str) {
    if !console.contains(needle) {
        let all: Vec<&str> = console.lines().collect();
        let tail = all[all.len().saturating_sub(60)..].join("\n");
        panic!("the console does not show {needle:?}; its tail:\n{tail}");
    }
}
pub mod https;
pub mod scan;

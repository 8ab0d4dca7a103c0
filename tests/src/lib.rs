//! The QEMU harness of the end-to-end tests.
//!
//! A [`Vm`] boots an image under OVMF with the serial console captured to a
//! file. It is always killed when dropped, and every failure carries the tail
//! of its console. The QEMU command line is the builder's
//! (`nodeflash_builder::vm`, shared with `nodeflash run-vm`), KVM included
//! only when its probe shows that it works.

use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nodeflash_builder::vm::{self, Machine};

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

pub use nodeflash_builder::vm::{Boot, Nvme};

/// The sha256 of a disk image, to show that a refusal left it unchanged.
pub trait DiskImage {
    fn sha256(&self) -> String;
}

impl DiskImage for Nvme {
    fn sha256(&self) -> String {
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

impl Vm {
    pub fn start(cfg: &VmConfig) -> Result<Vm> {
        let dir = tempfile::tempdir().context("cannot create the VM directory")?;
        let console = dir.path().join("console.log");
        let machine = Machine {
            nvme: cfg.nvme.clone(),
            memory_mib: cfg.memory_mib,
            smbios_serial: cfg.smbios_serial.clone(),
            mac: cfg.mac.clone(),
            ..Machine::new(cfg.iso.clone(), cfg.boot)
        };
        let mut c = vm::command(
            &machine,
            vm::kvm_works(),
            &vm::Console::File(console.clone()),
            dir.path(),
        )?;
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

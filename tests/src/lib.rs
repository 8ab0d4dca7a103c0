//! The QEMU harness of the end-to-end tests.
//!
//! A [`Vm`] boots an image under OVMF with the serial console captured to a
//! file. It is always killed when dropped, and every failure carries the tail
//! of its console. The QEMU command line is the builder's
//! (`nodeflash_builder::vm`, shared with `nodeflash run-vm`), KVM included
//! only when its probe shows that it works.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
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
        lock_mode: nodeflash_builder::inputs::LockMode::Locked,
    })
    .unwrap_or_else(|e| panic!("cannot build the {profile} variant: {e:#}"))
    .iso
}

/// Builds the profile at `path` (e.g. a fixture) into `dir`, with the lock
/// of `profiles/` beside it; returns the ISO.
pub fn build_profile_file(dir: &Path, path: &Path) -> PathBuf {
    let profiles = env_path("NODEFLASH_PROFILES");
    let name = path.file_name().expect("a file name");
    let copy = dir.join(name);
    std::fs::copy(path, &copy).expect("copy the profile");
    std::fs::copy(profiles.join("inputs.lock"), dir.join("inputs.lock")).expect("copy the lock");
    nodeflash_builder::build::build(&nodeflash_builder::build::BuildOptions {
        profile: copy,
        installer: env_path("NODEFLASH_TEST_INSTALLER"),
        out_dir: dir.join("out"),
        cache: nodeflash_builder::cache::Cache::from_env().expect("cache"),
        reuse_artifacts: true,
        lock_mode: nodeflash_builder::inputs::LockMode::Locked,
    })
    .unwrap_or_else(|e| panic!("cannot build {}: {e:#}", path.display()))
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

/// Copies the file at `path` in an ISO to `dest` (with xorriso).
pub fn extract_from_iso(iso: &Path, path: &str, dest: &Path) {
    let out = Command::new("xorriso")
        .args(["-osirrox", "on", "-indev"])
        .arg(iso)
        .args(["-extract", path])
        .arg(dest)
        .output()
        .expect("xorriso runs");
    assert!(
        out.status.success(),
        "cannot extract {path} from {}: {}",
        iso.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The host ID the installer printed (`host id: 0a1b2c3d (…`).
pub fn printed_hostid(console: &str) -> String {
    console
        .lines()
        .find_map(|l| l.strip_prefix("host id: "))
        .and_then(|l| l.split_whitespace().next())
        .expect("the host ID is printed")
        .to_string()
}

/// Boots `iso` as a USB stick with `disk` until it powers off; returns the
/// console (also printed, for a failing test's output).
pub fn boot_stick(iso: &Path, disk: &Nvme) -> String {
    let mut cfg = VmConfig::new(iso.to_path_buf(), Boot::UsbStick);
    cfg.nvme.push(disk.clone());
    let mut vm = Vm::start(&cfg).expect("qemu starts");
    let console = vm.wait_for_poweroff().unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("{console}");
    console
}

/// Boots `disk` alone, as an installed node, and returns what its check
/// system prints (`nodeflash-check:`).
pub fn boot_installed(disk: &Nvme) -> serde_json::Value {
    let mut cfg = VmConfig::new(PathBuf::new(), Boot::Disk);
    cfg.nvme.push(disk.clone());
    check_console(cfg)
}

/// Starts the check system that `iso`'s payload carries directly (QEMU's
/// `-kernel`, not the disk's boot loader) on `disk`, with `hostid`: it
/// reports what is on a disk that was left unbootable on purpose.
pub fn check_unbootable(iso: &Path, disk: &Nvme, hostid: &str) -> serde_json::Value {
    let dir = tempfile::tempdir().expect("tempdir");
    let (kernel, initrd) = check_system(iso, dir.path());
    let mut cfg = VmConfig::new(PathBuf::new(), Boot::Disk);
    cfg.nvme.push(disk.clone());
    cfg.kernel = Some((
        kernel,
        initrd,
        format!("console=ttyS0,115200 quiet nodeflash.hostid={hostid}"),
    ));
    check_console(cfg)
}

/// Copies the kernel and initrd of the check system in `iso`'s payload
/// into `dir`.
pub fn check_system(iso: &Path, dir: &Path) -> (PathBuf, PathBuf) {
    use nodeflash_installer::payload;
    let tmp = tempfile::tempdir().expect("tempdir");
    let packed = tmp.path().join("store.nfp");
    extract_from_iso(iso, "/nodeflash/store.nfp", &packed);
    let store = tmp.path().join("store");
    payload::Payload::open(std::fs::File::open(&packed).expect("payload"))
        .expect("the payload opens")
        .extract(Some(&store), 2, &payload::Counters::default())
        .expect("the payload extracts");
    let system = std::fs::read_dir(&store)
        .expect("store")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with("-nodeflash-check-system"))
        .expect("the payload holds the check system");
    std::fs::create_dir_all(dir).expect("mkdir");
    for name in ["kernel", "initrd"] {
        std::fs::copy(system.join(name), dir.join(name)).expect("copy");
    }
    (dir.join("kernel"), dir.join("initrd"))
}

fn check_console(cfg: VmConfig) -> serde_json::Value {
    let mut vm = Vm::start(&cfg).expect("qemu starts");
    let console = vm.wait_for_poweroff().unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("{console}");
    console_json(&console, "nodeflash-check: ")
}

/// Writes to `dest` the systemd-boot that the image `iso` installs on the
/// nodes (its initramfs's `/usr/lib/nodeflash/systemd-bootx64.efi`; the
/// stick itself boots through shim and GRUB). For stand-in systems that
/// install systemd-boot as NixOS does.
pub fn systemd_boot_of(iso: &Path, dest: &Path) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let initrd = tmp.path().join("initrd.zst");
    esp_file(iso, "::/nodeflash/initrd.zst", &initrd);
    let data = std::fs::read(&initrd).expect("initrd");
    let efi = scan::initramfs_file(&data, "usr/lib/nodeflash/systemd-bootx64.efi")
        .unwrap_or_else(|e| panic!("{}: {e:#}", iso.display()));
    std::fs::write(dest, efi).expect("systemd-bootx64.efi");
}

/// Copies a file out of the ESP appended to an ISO (mtools).
pub fn esp_file(iso: &Path, path: &str, dest: &Path) {
    let out = Command::new("sfdisk")
        .arg("--json")
        .arg(iso)
        .output()
        .expect("sfdisk runs");
    let table: serde_json::Value = serde_json::from_slice(&out.stdout).expect("sfdisk JSON");
    let start = table["partitiontable"]["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .find(|p| p["type"] == "C12A7328-F81F-11D2-BA4B-00A0C93EC93B")
        .and_then(|p| p["start"].as_u64())
        .expect("the ISO has an ESP");
    let out = Command::new("mcopy")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(format!("{}@@{}", iso.display(), start * 512))
        .arg(path)
        .arg(dest)
        .output()
        .expect("mcopy runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
    /// Disks on virtio (`/dev/vdX`), see [`nodeflash_builder::vm::Machine::virtio`].
    pub virtio: Vec<Nvme>,
    pub memory_mib: u32,
    /// vCPUs (`-smp`): `NODEFLASH_TEST_CPUS`, else 1.
    pub cpus: u32,
    pub timeout: Duration,
    /// SMBIOS system serial (`-smbios type=1,serial=…`).
    pub smbios_serial: Option<String>,
    /// MAC address of the NIC (QEMU's default otherwise).
    pub mac: Option<String>,
    /// See [`nodeflash_builder::vm::Machine::tap`].
    pub tap: Option<String>,
    /// Run QEMU in this network namespace (`ip netns exec`).
    pub netns: Option<String>,
    /// See [`nodeflash_builder::vm::Machine::kernel`].
    pub kernel: Option<(PathBuf, PathBuf, String)>,
    /// See [`nodeflash_builder::vm::Machine::secure_boot`].
    pub secure_boot: bool,
}

impl VmConfig {
    pub fn new(iso: PathBuf, boot: Boot) -> Self {
        Self {
            iso,
            boot,
            nvme: Vec::new(),
            virtio: Vec::new(),
            memory_mib: 2048,
            cpus: std::env::var("NODEFLASH_TEST_CPUS")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|n| *n > 0)
                .unwrap_or(1),
            timeout: Duration::from_secs(300),
            smbios_serial: None,
            mac: None,
            tap: None,
            netns: None,
            kernel: None,
            secure_boot: false,
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
            virtio: cfg.virtio.clone(),
            memory_mib: cfg.memory_mib,
            cpus: cfg.cpus,
            smbios_serial: cfg.smbios_serial.clone(),
            mac: cfg.mac.clone(),
            tap: cfg.tap.clone(),
            kernel: cfg.kernel.clone(),
            secure_boot: cfg.secure_boot,
            ..Machine::new(cfg.iso.clone(), cfg.boot)
        };
        let c = vm::command(
            &machine,
            vm::kvm_works(),
            &vm::Console::File(console.clone()),
            dir.path(),
        )?;
        let mut c = match &cfg.netns {
            Some(ns) => {
                let mut n = Command::new("ip");
                n.args(["netns", "exec", ns])
                    .arg(c.get_program())
                    .args(c.get_args());
                n
            }
            None => c,
        };
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

    /// Waits until the console shows `needle` (the VM keeps running).
    pub fn wait_for_console(&mut self, needle: &str) -> Result<()> {
        loop {
            if self.console().contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "qemu exited ({status}) before the console showed {needle:?}; console tail:\n{}",
                    self.console_tail(60)
                );
            }
            if self.started.elapsed() > self.timeout {
                bail!(
                    "the console did not show {needle:?} within {}s; console tail:\n{}",
                    self.timeout.as_secs(),
                    self.console_tail(60)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Cuts the power: kills QEMU at once, whatever the guest is doing.
    pub fn power_cut(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.console()
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

/// The boot entries on the ESP of an installed disk (partition 1, at
/// 1 MiB), read with mtools: empty when there are none or no
/// `loader/entries` directory; None when there is no FAT file system.
pub fn esp_boot_entries(disk: &Nvme) -> Option<Vec<String>> {
    let mdir = |dir: &str| {
        Command::new("mdir")
            .env("MTOOLS_SKIP_CHECK", "1")
            .args(["-b", "-i"])
            .arg(format!("{}@@1M", disk.image.display()))
            .arg(dir)
            .output()
            .expect("mdir runs (package mtools)")
    };
    if !mdir("::/").status.success() {
        return None;
    }
    let out = mdir("::/loader/entries");
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.ends_with(".conf"))
            .map(str::to_string)
            .collect(),
    )
}

/// Asserts that a check report (`nodeflash-check:`) shows the `qemu`
/// profile installed as asked: no problems, the host name and ID, every
/// dataset with its mountpoint, the profile's key, and a store whose tree
/// is exactly `store_digest` (the payload's, as the host reads it).
#[track_caller]
pub fn assert_installed(
    check: &serde_json::Value,
    hostname: &str,
    hostid: &str,
    store_digest: &str,
) {
    let profile = load_profile("qemu");
    assert_eq!(check["problems"], serde_json::json!([]), "{check:#}");
    assert_eq!(check["ok"], true);
    assert_eq!(check["hostname"], hostname);
    assert_eq!(check["hostid"], hostid);
    assert_eq!(check["hostid_live"], hostid);
    assert_eq!(check["hostid_etc"], hostid);
    assert_eq!(check["pool"], profile.pool.name.to_string());
    assert_eq!(check["health"], "ONLINE");
    for d in &profile.pool.datasets {
        let name = format!("{}/{}", profile.pool.name, d.name.get_ref());
        let got = &check["datasets"][&name];
        assert!(
            got.is_object(),
            "dataset {name} on the installed pool: {check:#}"
        );
        if let Some(m) = &d.mountpoint {
            assert_eq!(got["mountpoint"], m.get_ref().0.as_str(), "{name}");
        }
    }
    // The profile's inline key, as `ssh-keygen -lf` prints it.
    assert_eq!(
        check["ssh_keys"],
        serde_json::json!(["SHA256:+DiY3wvvV6TuJJhbpZisF/zLDA0zPMSvHdkr4UvCOqU"])
    );
    assert_eq!(check["store"]["verified"], true, "{check:#}");
    assert_eq!(check["store"]["digest"], store_digest);
    assert_eq!(check["failed_install_log"], serde_json::Value::Null);
}

/// The tree digest of the payload on an ISO, read on the host.
pub fn payload_digest(iso: &Path) -> String {
    use nodeflash_installer::payload;
    let dir = tempfile::tempdir().expect("tempdir");
    let packed = dir.path().join("store.nfp");
    extract_from_iso(iso, "/nodeflash/store.nfp", &packed);
    let manifest = payload::Payload::open(std::fs::File::open(&packed).expect("payload"))
        .expect("the payload opens")
        .manifest;
    payload::digest(&manifest.entries)
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
pub mod flake;
pub mod https;
pub mod scan;

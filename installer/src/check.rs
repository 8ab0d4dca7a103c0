//! The installed system check: stage 1 of the installed disk (the installer
//! booted from the target's ESP in check mode) imports the pool the way the
//! installed system will, without `-f`, mounts its datasets read-only on
//! `/sysroot`, and reports what it finds: host IDs, hostname, pool and
//! datasets, SSH keys, the install report, and the store compared with the
//! manifest the installer saved ([`save_manifest`]).
//!
//! The parts that touch ZFS (import, mount, export) cannot run on a build
//! host; they are kept to a few plain calls. What decides anything (the
//! `zpool import` listing, the mount order, the host ID file, the report and
//! its problems) is in pure functions with unit tests.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::mount::MsFlags;
use serde::Serialize;

use crate::cmd;
use crate::mount::Mounts;
use crate::payload::{self, Manifest};
use crate::report::{self, InstallReport, Phase};
use crate::zfs;

/// Where the check mounts the installed system.
pub const SYSROOT: &str = "/sysroot";
/// The payload manifest on the target, from its root (zstd-compressed JSON).
pub const MANIFEST_PATH: &str = "var/log/nodeflash/store-manifest.json.zst";
/// How long the check waits for the pool to show up in `zpool import`.
pub const IMPORT_TIMEOUT: Duration = Duration::from_secs(30);

/// Saves the store's manifest as `<root>/var/log/nodeflash/store-manifest.json.zst`
/// (mode 0644) for the check to compare the store with.
pub fn save_manifest(root: &Path, manifest: &Manifest) -> Result<()> {
    let dir = report::log_dir(root)?;
    let path = root.join(MANIFEST_PATH);
    let json = serde_json::to_vec(manifest).context("cannot serialize the store manifest")?;
    let packed = zstd::encode_all(json.as_slice(), 9)
        .with_context(|| format!("cannot compress the store manifest for {}", dir.display()))?;
    report::write_file(&path, &packed)
}

/// Reads what [`save_manifest`] wrote under `root`.
pub fn load_manifest(root: &Path) -> Result<Manifest> {
    let path = root.join(MANIFEST_PATH);
    let packed = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let json = zstd::decode_all(packed.as_slice())
        .with_context(|| format!("cannot decompress {}", path.display()))?;
    serde_json::from_slice(&json).with_context(|| format!("cannot parse {}", path.display()))
}

/// What the check found; PID 1 prints it as one `nodeflash-check: {json}` line.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CheckReport {
    /// No problems.
    pub ok: bool,
    pub problems: Vec<String>,
    pub pool: String,
    pub pool_guid: Option<String>,
    pub health: Option<String>,
    pub bootfs: Option<String>,
    /// The host ID the check was told to expect (8 hex digits).
    pub hostid: String,
    /// `spl_hostid` of the running kernel.
    pub hostid_live: Option<String>,
    /// `/etc/hostid` of the installed system.
    pub hostid_etc: Option<String>,
    pub hostname: Option<String>,
    /// Datasets mounted, in mount order.
    pub mounted: Vec<Mounted>,
    /// Dataset → `mountpoint` and `compression`.
    pub datasets: DatasetProps,
    /// Fingerprints of root's `authorized_keys`.
    pub ssh_keys: Vec<String>,
    pub install_total_secs: Option<f64>,
    pub install_phases: Vec<Phase>,
    /// Every disk the install report records, with its pool.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub install_disks: Vec<crate::report::WrittenDisk>,
    /// None when the install copied no store (no saved manifest).
    pub store: Option<StoreCheck>,
    /// Lines of the successful install's console log on the disk.
    pub install_log_lines: Option<usize>,
    /// The console of a failed install left on the disk, if any.
    pub failed_install_log: Option<Vec<String>>,
    /// The store path the NixOS system profile points at, when there is one.
    pub nixos_system: Option<String>,
    /// The pool's vdev tree as `zpool status -P` shows it, the pool first.
    pub vdevs: Vec<VdevStatus>,
    /// The data pools (`[[pools]]`), each imported, read and exported after
    /// the root pool; their problems are in `problems` too.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub data_pools: Vec<DataPoolCheck>,
    pub check_secs: f64,
}

/// What the check found of one data pool.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DataPoolCheck {
    pub pool: String,
    pub pool_guid: Option<String>,
    pub health: Option<String>,
    /// The vdev tree as `zpool status -P` shows it (`special`, `logs` and
    /// `cache` headers at depth 0).
    pub vdevs: Vec<VdevStatus>,
    /// Datasets mounted read-only under [`SYSROOT`], in mount order.
    pub mounted: Vec<Mounted>,
    /// Dataset, volume or snapshot → property → value (`type`,
    /// `mountpoint`, `compression`, `volsize` and what the profile sets).
    pub datasets: DatasetProps,
    pub problems: Vec<String>,
}

impl CheckReport {
    /// Adds the data pools' checks; their problems join the report's.
    pub fn add_data_pools(&mut self, pools: Vec<DataPoolCheck>) {
        for p in &pools {
            self.problems.extend(p.problems.iter().cloned());
        }
        self.ok = self.problems.is_empty();
        self.data_pools = pools;
    }
}

/// Checks a data pool: waits for it, imports it read-only without `-f`
/// (the host ID is already set by [`run_check`]), mounts its datasets
/// read-only under [`SYSROOT`], reads its vdev tree, health and
/// `properties` (comma-separated, [`crate::zfs::reported_properties`]) of
/// every dataset, unmounts and exports it. `legacy` as for [`run_check`]. A pool that cannot be imported
/// is a problem in the result, not an error; `expected` are dataset and
/// volume names relative to the pool.
pub fn check_data_pool(
    pool: &str,
    expected: &[String],
    properties: &str,
    legacy: &[Mounted],
    log: &dyn Fn(&str),
) -> DataPoolCheck {
    let mut out = DataPoolCheck {
        pool: pool.to_string(),
        ..DataPoolCheck::default()
    };
    let imported = wait_for_pool(pool, IMPORT_TIMEOUT).and_then(|_| {
        cmd::run(Command::new("zpool").args([
            "import",
            "-d",
            "/dev",
            "-N",
            "-o",
            "readonly=on",
            "-o",
            "cachefile=none",
            pool,
        ]))
        .with_context(|| format!("data pool {pool} does not import without -f"))
    });
    if let Err(e) = imported {
        out.problems.push(format!("{e:#}"));
        return out;
    }
    let mut mounts = Mounts::default();
    match mount_all(pool, &mut mounts, true, legacy) {
        Ok(order) => out.mounted = order,
        Err(e) => out.problems.push(format!("{e:#}")),
    }
    log(&format!(
        "check: data pool {pool}: mounted {} datasets",
        out.mounted.len()
    ));
    match pool_properties(pool) {
        Ok(p) => {
            out.pool_guid = p.get("guid").cloned();
            out.health = p.get("health").cloned();
        }
        Err(e) => out
            .problems
            .push(format!("pool properties of {pool}: {e:#}")),
    }
    match cmd::run(Command::new("zpool").args(["status", "-P", pool])) {
        Ok(t) => out.vdevs = parse_status_config(&t),
        Err(e) => out.problems.push(format!("vdevs of {pool}: {e:#}")),
    }
    match zfs::dataset_properties(pool, properties) {
        Ok(d) => out.datasets = d,
        Err(e) => out
            .problems
            .push(format!("dataset properties of {pool}: {e:#}")),
    }
    if let Some(h) = out.health.as_ref().filter(|h| *h != "ONLINE") {
        out.problems.push(format!("pool {pool} is {h}, not ONLINE"));
    }
    for d in expected {
        let full = format!("{pool}/{d}");
        if !out.datasets.contains_key(&full) {
            out.problems.push(format!("dataset {full} is missing"));
        }
    }
    if let Err(e) = mounts.unmount() {
        out.problems.push(format!("{e:#}"));
    }
    if let Err(e) = cmd::run(Command::new("zpool").args(["export", pool])) {
        out.problems
            .push(format!("cannot export pool {pool} after the check: {e:#}"));
    }
    out
}

/// One line of the `config:` tree of `zpool status -P` (zpool-status(8)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VdevStatus {
    /// 0 for the pool, 1 for its top-level vdevs (`mirror-0`, or a disk),
    /// 2 for their disks; section headers (`logs`, `cache`) are 0.
    pub depth: usize,
    /// The vdev's name, a device path, or a GUID for a missing device.
    pub name: String,
    /// `ONLINE`, `DEGRADED`, `UNAVAIL`, `FAULTED`, … (empty for headers).
    pub state: String,
    /// For a missing device, the path it had (`was /dev/nvme1n1p3`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub was: Option<String>,
}

/// The vdev tree of `zpool status -P` output: the lines after the
/// `NAME STATE READ WRITE CKSUM` header up to the first empty line. Each
/// level is indented by two more spaces after the leading tab
/// (`print_status_config` in OpenZFS's `cmd/zpool/zpool_main.c`).
pub fn parse_status_config(out: &str) -> Vec<VdevStatus> {
    let mut lines = out.lines().skip_while(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        !(w.first() == Some(&"NAME") && w.get(1) == Some(&"STATE"))
    });
    let Some(header) = lines.next() else {
        return Vec::new();
    };
    let base = header.trim_start_matches('\t').len() - header.trim_start().len();
    let mut vdevs = Vec::new();
    for line in lines {
        if line.trim().is_empty() {
            break;
        }
        let body = line.trim_start_matches('\t');
        let indent = body.len() - body.trim_start().len();
        let words: Vec<&str> = body.split_whitespace().collect();
        let Some(name) = words.first() else { continue };
        let was = body.find(" was ").map(|i| body[i + 5..].trim().to_string());
        vdevs.push(VdevStatus {
            depth: indent.saturating_sub(base) / 2,
            name: name.to_string(),
            state: words.get(1).map_or(String::new(), |s| s.to_string()),
            was,
        });
    }
    vdevs
}

pub use crate::datasets::Mounted;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoreCheck {
    /// The tree is exactly what the manifest lists.
    pub verified: bool,
    /// `payload::digest` of the tree on the pool and of the manifest.
    pub digest: String,
    pub manifest_digest: String,
    pub files: usize,
    pub bytes: u64,
    /// The first differences, when not verified.
    pub differences: Option<String>,
}

/// One pool in the `zpool import` listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Importable {
    pub name: String,
    pub id: String,
    pub state: String,
    /// First line of `status:`, if any (e.g. "The pool was last accessed by another system.").
    pub status: Option<String>,
}

/// Parses the listing `zpool import` prints without a pool name.
pub fn parse_import_list(out: &str) -> Vec<Importable> {
    let mut pools: Vec<Importable> = Vec::new();
    for line in out.lines() {
        let Some((key, value)) = line.trim().split_once(": ").or_else(|| {
            line.trim()
                .strip_suffix(':')
                .map(|k| (k, ""))
                .filter(|(k, _)| !k.contains(' '))
        }) else {
            continue;
        };
        let value = value.trim().to_string();
        match key {
            "pool" => pools.push(Importable {
                name: value,
                id: String::new(),
                state: String::new(),
                status: None,
            }),
            "id" | "state" | "status" => {
                let Some(p) = pools.last_mut() else { continue };
                match key {
                    "id" => p.id = value,
                    "state" => p.state = value,
                    _ => p.status = Some(value),
                }
            }
            _ => {}
        }
    }
    pools
}

/// `plan` when exactly one of its datasets is at `/`.
fn one_root(plan: Vec<Mounted>) -> Result<Vec<Mounted>> {
    let roots: Vec<&str> = plan
        .iter()
        .filter(|m| m.mountpoint == "/")
        .map(|m| m.dataset.as_str())
        .collect();
    match roots.len() {
        1 => {}
        0 => bail!("no dataset has mountpoint / (and canmount not off)"),
        _ => bail!("several datasets have mountpoint /: {}", roots.join(", ")),
    }
    Ok(plan)
}

/// The datasets to mount, in order, from `zfs list -H -p -o
/// name,mountpoint,canmount -r <pool>` (whose values are already the
/// effective ones): what the installed system mounts, by the installer's
/// own rule ([`crate::datasets::mount_order`]). A root pool's plan must
/// then pass [`one_root`]; a data pool needs no dataset at `/`.
pub fn mount_plan(list: &str) -> Result<Vec<Mounted>> {
    let mut tree = Vec::new();
    for line in list.lines().filter(|l| !l.is_empty()) {
        let cols: Vec<&str> = line.split('\t').collect();
        let [name, mountpoint, canmount] = cols.as_slice() else {
            bail!("unexpected line in zfs list output: {line:?}");
        };
        // `-` for snapshots and volumes, which are never mounted.
        let Some(canmount) = crate::datasets::CanMount::parse(canmount) else {
            continue;
        };
        tree.push(crate::datasets::Effective {
            name: name.to_string(),
            mountpoint: crate::datasets::normalise(mountpoint),
            inherited_from: None,
            canmount,
            legacy_mount: None,
            key: String::new(),
        });
    }
    Ok(crate::datasets::mount_order(&tree))
}

/// `/etc/hostid` as ZFS reads it: 4 bytes in host order (little-endian on x86_64).
pub fn parse_hostid_file(bytes: &[u8]) -> Result<u32> {
    let b: [u8; 4] = bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("{} bytes instead of 4", bytes.len()))?;
    Ok(u32::from_ne_bytes(b))
}

/// `/sys/module/spl/parameters/spl_hostid` (decimal, or hex with 0x).
pub fn parse_spl_hostid(text: &str) -> Result<u32> {
    let t = text.trim();
    let v = match t.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => t.parse::<u64>(),
    }
    .with_context(|| format!("spl_hostid {t:?} is not a number"))?;
    u32::try_from(v).with_context(|| format!("spl_hostid {t:?} is out of range"))
}

/// Dataset → property → value.
pub type DatasetProps = BTreeMap<String, BTreeMap<String, String>>;

/// What was read from the mounted system; an error is kept as its text.
#[derive(Debug, Clone, Default)]
pub struct Gathered {
    pub hostname: Option<Result<String, String>>,
    pub hostid_etc: Option<Result<u32, String>>,
    pub hostid_live: Option<Result<u32, String>>,
    /// `zpool get` property → value.
    pub pool_properties: Option<Result<BTreeMap<String, String>, String>>,
    pub datasets: Option<Result<DatasetProps, String>>,
    pub mounted: Vec<Mounted>,
    pub ssh_keys: Option<Result<Vec<String>, String>>,
    pub install: Option<Result<InstallReport, String>>,
    /// None: no saved manifest, no store was installed.
    pub store: Option<Result<StoreCheck, String>>,
    pub install_log: Option<Result<String, String>>,
    /// None: no failed install left its console.
    pub failed_log: Option<Result<String, String>>,
    /// Where the NixOS system profile points (through its generation link).
    pub nixos_system: Option<String>,
    /// `zpool status -P`'s vdev tree; None: not read (no problem either).
    pub vdevs: Option<Result<Vec<VdevStatus>, String>>,
}

/// The report and its problems from what was gathered. `expected_datasets`
/// are names relative to the pool (as in the profile).
pub fn build_report(
    pool: &str,
    hostid: u32,
    expected_datasets: &[String],
    g: Gathered,
    check_secs: f64,
) -> CheckReport {
    let mut problems = Vec::new();
    let hostname: Option<String> = take(&mut problems, "hostname", g.hostname);
    let etc: Option<u32> = take(&mut problems, "/etc/hostid", g.hostid_etc);
    let live: Option<u32> = take(&mut problems, "spl_hostid", g.hostid_live);
    let props: Option<BTreeMap<String, String>> =
        take(&mut problems, "pool properties", g.pool_properties);
    let datasets: Option<BTreeMap<_, _>> = take(&mut problems, "dataset properties", g.datasets);
    let keys: Option<Vec<String>> = take(&mut problems, "ssh keys", g.ssh_keys);
    let install: Option<InstallReport> = take(&mut problems, "install report", g.install);
    let vdevs = match g.vdevs {
        None => None,
        Some(r) => take(&mut problems, "vdevs", Some(r)),
    };
    let store = match g.store {
        None => None,
        Some(r) => take(&mut problems, "store", Some(r)),
    };
    for (what, v) in [
        ("/etc/hostid of the installed system", etc),
        ("spl_hostid", live),
    ] {
        if let Some(v) = v.filter(|v| *v != hostid) {
            problems.push(format!("{what} is {v:08x}, not {hostid:08x}"));
        }
    }
    let prop = |k: &str| props.as_ref().and_then(|p| p.get(k)).cloned();
    if let Some(h) = prop("health").filter(|h| h != "ONLINE") {
        problems.push(format!("pool {pool} is {h}, not ONLINE"));
    }
    let datasets = datasets.unwrap_or_default();
    for d in expected_datasets {
        let full = format!("{pool}/{d}");
        if !datasets.contains_key(&full) {
            problems.push(format!("dataset {full} is missing"));
        }
    }
    if keys.as_ref().is_some_and(Vec::is_empty) {
        problems.push("root's authorized_keys holds no key: nobody can log in over SSH".into());
    }
    let install_log: Option<String> = take(&mut problems, "install log", g.install_log);
    let failed: Option<Vec<String>> = g
        .failed_log
        .and_then(|r| take(&mut problems, "failed install log", Some(r)))
        .map(|t| t.lines().map(str::to_string).collect());
    if let Some(lines) = &failed {
        let why = lines
            .iter()
            .find(|l| l.starts_with("nodeflash: FAILED"))
            .map_or("no FAILED line", String::as_str);
        problems.push(format!("an install failed on this disk: {why}"));
    }
    if let Some(s) = store.as_ref().filter(|s| !s.verified) {
        problems.push(format!(
            "the store differs from the installed manifest: {}",
            s.differences.as_deref().unwrap_or("?")
        ));
    }
    CheckReport {
        ok: problems.is_empty(),
        problems,
        pool: pool.to_string(),
        pool_guid: prop("guid"),
        health: prop("health"),
        bootfs: prop("bootfs"),
        hostid: format!("{hostid:08x}"),
        hostid_live: live.map(|v| format!("{v:08x}")),
        hostid_etc: etc.map(|v| format!("{v:08x}")),
        hostname,
        mounted: g.mounted,
        datasets,
        ssh_keys: keys.unwrap_or_default(),
        install_total_secs: install.as_ref().map(|r| r.total_secs),
        install_disks: install
            .as_ref()
            .map(|r| r.disks.clone())
            .unwrap_or_default(),
        install_phases: install.map(|r| r.phases).unwrap_or_default(),
        store,
        install_log_lines: install_log.map(|t| t.lines().count()),
        failed_install_log: failed,
        nixos_system: g.nixos_system,
        vdevs: vdevs.unwrap_or_default(),
        data_pools: Vec::new(),
        check_secs,
    }
}

/// The value, or None with a problem naming `what`.
fn take<T>(problems: &mut Vec<String>, what: &str, r: Option<Result<T, String>>) -> Option<T> {
    match r {
        Some(Ok(v)) => Some(v),
        Some(Err(e)) => {
            problems.push(format!("{what}: {e}"));
            None
        }
        None => {
            problems.push(format!("{what}: not read"));
            None
        }
    }
}

/// Compares the store under `root` with the manifest saved there; None if
/// no manifest was saved.
pub fn check_store(root: &Path, threads: usize) -> Result<Option<StoreCheck>> {
    if !root.join(MANIFEST_PATH).exists() {
        return Ok(None);
    }
    let manifest = load_manifest(root)?;
    let scanned = payload::scan(&root.join("nix/store"), threads)?;
    let differences = payload::compare(&manifest.entries, &scanned, true)
        .err()
        .map(|e| format!("{e:#}"));
    Ok(Some(StoreCheck {
        verified: differences.is_none(),
        digest: payload::digest(scanned.iter().map(|e| &e.0)),
        manifest_digest: payload::digest(&manifest.entries),
        files: manifest.files(),
        bytes: manifest.bytes(),
        differences,
    }))
}

/// Reads everything but the pool's properties from the system mounted at `root`.
pub fn gather_files(root: &Path, threads: usize) -> Gathered {
    let text = |e: anyhow::Error| format!("{e:#}");
    let read = |rel: &str| {
        let p = root.join(rel);
        std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))
    };
    let hostname = read("etc/hostname").and_then(|b| {
        let h = String::from_utf8_lossy(&b).trim().to_string();
        if h.is_empty() {
            bail!("{} is empty", root.join("etc/hostname").display());
        }
        Ok(h)
    });
    let hostid_etc = read("etc/hostid").and_then(|b| {
        parse_hostid_file(&b).with_context(|| format!("{}", root.join("etc/hostid").display()))
    });
    let keys_path = root.join("root/.ssh/authorized_keys");
    let ssh_keys = read("root/.ssh/authorized_keys").and_then(|b| {
        let keys = crate::net::keys::parse_keys(
            &String::from_utf8_lossy(&b),
            &keys_path.display().to_string(),
        )?;
        Ok(keys.iter().map(|k| k.fingerprint()).collect())
    });
    Gathered {
        hostname: Some(hostname.map_err(text)),
        hostid_etc: Some(hostid_etc.map_err(text)),
        ssh_keys: Some(ssh_keys.map_err(text)),
        install: Some(InstallReport::read(root).map_err(text)),
        store: check_store(root, threads).map_err(text).transpose(),
        install_log: Some(
            read(&format!(
                "{}/{}",
                crate::report::LOG_DIR,
                crate::report::INSTALL_LOG
            ))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .map_err(text),
        ),
        failed_log: {
            let rel = format!("{}/{}", crate::report::LOG_DIR, crate::report::FAILED_LOG);
            root.join(&rel).exists().then(|| {
                read(&rel)
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .map_err(text)
            })
        },
        nixos_system: {
            let profile = root.join(crate::nixos::SYSTEM_PROFILE.trim_start_matches('/'));
            std::fs::read_link(&profile)
                .and_then(|generation| std::fs::read_link(profile.with_file_name(generation)))
                .ok()
                .map(|t| t.display().to_string())
        },
        ..Gathered::default()
    }
}

/// Runs the check: host ID, wait for the pool, import it read-only without
/// `-f`, mount its datasets read-only on [`SYSROOT`], gather, unmount,
/// export. An error means the pool could not be imported or mounted;
/// everything else found wrong is in [`CheckReport::problems`].
/// `expected_datasets` are dataset names relative to the pool (as in the
/// profile); `legacy` the legacy datasets with their `legacy-mount`
/// ([`crate::datasets::Mounted::legacy`]), mounted with the others; `log`
/// gets progress lines (`console::say`).
pub fn run_check(
    pool: &str,
    hostid: u32,
    expected_datasets: &[String],
    legacy: &[Mounted],
    log: &dyn Fn(&str),
) -> Result<CheckReport> {
    let started = Instant::now();
    zfs::set_live_hostid(hostid)?;
    log(&format!(
        "check: host id {hostid:08x}; waiting up to {}s for pool {pool}",
        IMPORT_TIMEOUT.as_secs()
    ));
    let listed = wait_for_pool(pool, IMPORT_TIMEOUT)?;
    if let Some(status) = &listed.status {
        log(&format!("check: zpool import says: {status}"));
    }
    cmd::run(Command::new("zpool").args([
        "import",
        "-d",
        "/dev",
        "-N",
        "-o",
        "readonly=on",
        "-o",
        "cachefile=none",
        pool,
    ]))
    .with_context(|| {
        format!(
            "pool {pool} does not import without -f with host id {hostid:08x}: \
             the installer wrote another host ID, or it did not export the pool"
        )
    })?;
    let mut mounts = Mounts::default();
    let gathered = mount_all(pool, &mut mounts, false, legacy).map(|order| {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        log(&format!("check: mounted {} datasets; reading", order.len()));
        let mut g = gather_files(Path::new(SYSROOT), threads);
        g.mounted = order;
        g.hostid_live = Some(
            std::fs::read_to_string("/sys/module/spl/parameters/spl_hostid")
                .context("cannot read /sys/module/spl/parameters/spl_hostid")
                .and_then(|t| parse_spl_hostid(&t))
                .map_err(|e| format!("{e:#}")),
        );
        g.pool_properties = Some(pool_properties(pool).map_err(|e| format!("{e:#}")));
        g.vdevs = Some(
            cmd::run(Command::new("zpool").args(["status", "-P", pool]))
                .map(|out| parse_status_config(&out))
                .map_err(|e| format!("{e:#}")),
        );
        g.datasets = Some(dataset_properties(pool).map_err(|e| format!("{e:#}")));
        g
    });
    // Unmount and export whatever happened above.
    let cleanup = mounts.unmount();
    let exported = cmd::run(Command::new("zpool").args(["export", pool]));
    let gathered = gathered?;
    cleanup?;
    exported.with_context(|| format!("cannot export pool {pool} after the check"))?;
    Ok(build_report(
        pool,
        hostid,
        expected_datasets,
        gathered,
        started.elapsed().as_secs_f64(),
    ))
}

/// Waits until `zpool import` lists `pool` (an empty listing is an error exit).
fn wait_for_pool(pool: &str, timeout: Duration) -> Result<Importable> {
    crate::wait::wait_until(timeout, Duration::from_secs(1), || {
        cmd::run(Command::new("zpool").args(["import", "-d", "/dev"]))
            .map(|out| parse_import_list(&out))
            .unwrap_or_default()
            .into_iter()
            .find(|p| p.name == pool)
    })
    .with_context(|| {
        format!(
            "pool {pool} did not show up in `zpool import -d /dev` within {}s \
             (is the zfs module loaded, and is this the installed disk?)",
            timeout.as_secs()
        )
    })
}

/// Mounts the pool's datasets read-only under [`SYSROOT`] in [`mount_plan`]
/// order into `mounts`, which unmounts them even after an error.
/// `legacy`: the pool's legacy datasets with their `legacy-mount` (from
/// the profile: ZFS does not know where they go), mounted in their turn.
fn mount_all(
    pool: &str,
    mounts: &mut Mounts,
    data: bool,
    legacy: &[Mounted],
) -> Result<Vec<Mounted>> {
    let list = cmd::run(Command::new("zfs").args([
        "list",
        "-H",
        "-p",
        "-o",
        "name,mountpoint,canmount",
        "-r",
        pool,
    ]))?;
    let mut order = mount_plan(&list).with_context(|| format!("cannot mount pool {pool}"))?;
    order.extend(legacy.iter().cloned());
    let depth = |m: &Mounted| m.mountpoint.split('/').filter(|c| !c.is_empty()).count();
    order.sort_by(|a, b| (depth(a), &a.mountpoint).cmp(&(depth(b), &b.mountpoint)));
    // The root pool needs its `/`, a legacy one counted.
    let order = if data {
        order
    } else {
        one_root(order).with_context(|| format!("cannot mount pool {pool}"))?
    };
    for m in &order {
        // A data pool's mountpoint is not in the initramfs; the root pool's
        // are directories of their read-only parents already.
        let target = Path::new(SYSROOT).join(m.mountpoint.trim_start_matches('/'));
        // mount.zfs's marker of a ZFS-managed mountpoint; not for legacy.
        let data = (!m.legacy).then_some("zfsutil");
        mounts.mount(&m.dataset, target, Some("zfs"), MsFlags::MS_RDONLY, data)?;
    }
    Ok(order)
}

fn pool_properties(pool: &str) -> Result<BTreeMap<String, String>> {
    let out =
        cmd::run(Command::new("zpool").args(["get", "-H", "-p", "guid,health,bootfs", pool]))?;
    Ok(zfs::parse_get(&out)?
        .into_iter()
        .map(|p| (p.property, p.value))
        .collect())
}

fn dataset_properties(pool: &str) -> Result<DatasetProps> {
    zfs::dataset_properties(pool, "mountpoint,compression")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::Entry;

    #[test]
    fn parses_the_vdev_tree_of_zpool_status() {
        // As OpenZFS 2.1 prints a mirror with one disk missing.
        let out = "  pool: rpool\n state: DEGRADED\nstatus: One or more devices could not be used because the label is missing or\n\tinvalid.\nconfig:\n\n\tNAME                STATE     READ WRITE CKSUM\n\trpool               DEGRADED     0     0     0\n\t  mirror-0          DEGRADED     0     0     0\n\t    /dev/nvme0n1p3  ONLINE       0     0     0\n\t    4223018364471364  UNAVAIL      0     0     0  was /dev/nvme1n1p3\n\nerrors: No known data errors\n";
        let v = parse_status_config(out);
        let rows: Vec<(usize, &str, &str, Option<&str>)> = v
            .iter()
            .map(|v| (v.depth, v.name.as_str(), v.state.as_str(), v.was.as_deref()))
            .collect();
        assert_eq!(
            rows,
            [
                (0, "rpool", "DEGRADED", None),
                (1, "mirror-0", "DEGRADED", None),
                (2, "/dev/nvme0n1p3", "ONLINE", None),
                (2, "4223018364471364", "UNAVAIL", Some("/dev/nvme1n1p3")),
            ]
        );
        assert!(parse_status_config("no pools available\n").is_empty());
    }

    #[test]
    fn parses_the_import_listing() {
        // As `zpool import` prints it for a pool exported by another host.
        let out = "   pool: rpool\n     id: 8157623019134458711\n  state: ONLINE\n status: The pool was last accessed by another system.\n action: The pool can be imported using its name or numeric identifier and\n\tthe '-f' flag.\n   see: https://openzfs.github.io/openzfs-docs/msg/ZFS-8000-EY\n config:\n\n\trpool       ONLINE\n\t  vda3      ONLINE\n\n   pool: tank\n     id: 42\n  state: DEGRADED\n config:\n\n\ttank        DEGRADED\n";
        let pools = parse_import_list(out);
        assert_eq!(
            pools,
            [
                Importable {
                    name: "rpool".into(),
                    id: "8157623019134458711".into(),
                    state: "ONLINE".into(),
                    status: Some("The pool was last accessed by another system.".into()),
                },
                Importable {
                    name: "tank".into(),
                    id: "42".into(),
                    state: "DEGRADED".into(),
                    status: None,
                },
            ]
        );
        assert!(parse_import_list("no pools available to import\n").is_empty());
    }

    #[test]
    fn mounts_root_first_then_by_depth() {
        let list = "rpool\tnone\toff\nrpool/local\tnone\ton\nrpool/local/nix\t/nix\ton\nrpool/safe\tnone\toff\nrpool/safe/home/alice\t/home/alice\ton\nrpool/safe/home\t/home\ton\nrpool/safe/root\t/\tnoauto\nrpool/safe/tmp\t/tmp\tnoauto\nrpool/legacy\tlegacy\ton\n";
        let plan: Vec<(String, String)> = mount_plan(list)
            .and_then(one_root)
            .expect("plan")
            .into_iter()
            .map(|m| (m.dataset, m.mountpoint))
            .collect();
        let want = [
            ("rpool/safe/root", "/"),
            ("rpool/safe/home", "/home"),
            ("rpool/local/nix", "/nix"),
            ("rpool/safe/home/alice", "/home/alice"),
        ];
        assert_eq!(plan, want.map(|(a, b)| (a.to_string(), b.to_string())));
        let e = mount_plan("rpool\tnone\ton\nrpool/nix\t/nix\ton\n")
            .and_then(one_root)
            .expect_err("no root");
        assert!(format!("{e:#}").contains("no dataset has mountpoint /"));
        let e = mount_plan("rpool/a\t/\ton\nrpool/b\t/\ton\n")
            .and_then(one_root)
            .expect_err("two roots");
        assert!(format!("{e:#}").contains("rpool/a, rpool/b"));
        assert!(mount_plan("rpool/off\t/\toff\n")
            .and_then(one_root)
            .is_err());
        assert!(mount_plan("rpool\t/\n").and_then(one_root).is_err());
    }

    #[test]
    fn host_id_files() {
        let id = 0x472479d4;
        assert_eq!(
            parse_hostid_file(&zfs::hostid_file(id)).expect("4 bytes"),
            id
        );
        assert_eq!(
            parse_hostid_file(&[0xd4, 0x79, 0x24, 0x47]).expect("4 bytes"),
            id
        );
        assert!(
            format!("{:#}", parse_hostid_file(b"472479d4\n").expect_err("text"))
                .contains("9 bytes instead of 4")
        );
        assert_eq!(
            parse_spl_hostid("1193441748\n").expect("decimal"),
            0x472279d4
        );
        assert_eq!(parse_spl_hostid("0x472479d4").expect("hex"), id);
        assert!(parse_spl_hostid("x").is_err());
        assert!(parse_spl_hostid("4294967296").is_err());
    }

    fn good() -> Gathered {
        let mut props = BTreeMap::new();
        props.insert("guid".to_string(), "123".to_string());
        props.insert("health".to_string(), "ONLINE".to_string());
        props.insert("bootfs".to_string(), "rpool/safe/root".to_string());
        let mut ds = BTreeMap::new();
        for name in ["rpool", "rpool/safe/root", "rpool/local/nix"] {
            ds.insert(
                name.to_string(),
                BTreeMap::from([("compression".to_string(), "zstd".to_string())]),
            );
        }
        Gathered {
            hostname: Some(Ok("alrest-1".into())),
            hostid_etc: Some(Ok(0x472479d4)),
            hostid_live: Some(Ok(0x472479d4)),
            pool_properties: Some(Ok(props)),
            datasets: Some(Ok(ds)),
            mounted: vec![Mounted {
                dataset: "rpool/safe/root".into(),
                mountpoint: "/".into(),
                legacy: false,
            }],
            ssh_keys: Some(Ok(vec!["SHA256:x".into()])),
            install: Some(Ok(InstallReport {
                total_secs: 42.0,
                phases: vec![report::phase("store".into(), 30.0, Some(1000))],
                ..InstallReport::default()
            })),
            store: None,
            install_log: Some(Ok("nodeflash 0.1.0\nnodeflash: done in 1.0s\n".into())),
            failed_log: None,
            nixos_system: None,
            vdevs: None,
        }
    }

    #[test]
    fn a_good_install_has_no_problems() {
        let expected = ["safe/root".to_string(), "local/nix".to_string()];
        let r = build_report("rpool", 0x472479d4, &expected, good(), 1.5);
        assert!(r.ok, "{:?}", r.problems);
        assert_eq!(r.hostid, "472479d4");
        assert_eq!(r.hostid_etc.as_deref(), Some("472479d4"));
        assert_eq!(r.pool_guid.as_deref(), Some("123"));
        assert_eq!(r.bootfs.as_deref(), Some("rpool/safe/root"));
        assert_eq!(r.install_total_secs, Some(42.0));
        assert_eq!(r.install_phases.len(), 1);
        assert_eq!(r.install_log_lines, Some(2));
        assert_eq!(r.failed_install_log, None);
        let line = serde_json::to_string(&r).expect("json");
        assert!(line.starts_with("{\"ok\":true,\"problems\":[]"), "{line}");
    }

    #[test]
    fn problems_are_named() {
        let mut g = good();
        g.hostid_etc = Some(Ok(0x11111111));
        g.hostname = Some(Err("cannot read /sysroot/etc/hostname".into()));
        g.pool_properties = Some(Ok(BTreeMap::from([(
            "health".to_string(),
            "DEGRADED".to_string(),
        )])));
        g.ssh_keys = Some(Ok(Vec::new()));
        g.install = None;
        g.store = Some(Ok(StoreCheck {
            verified: false,
            digest: "a".into(),
            manifest_digest: "b".into(),
            files: 1,
            bytes: 1,
            differences: Some("missing: abc-foo".into()),
        }));
        g.failed_log = Some(Ok(
            "partitioned\nnodeflash: FAILED: the store was not copied\n  caused by: x\n".into(),
        ));
        let r = build_report("rpool", 0x472479d4, &["safe/home".to_string()], g, 1.0);
        assert!(!r.ok);
        assert_eq!(
            r.problems,
            [
                "hostname: cannot read /sysroot/etc/hostname",
                "install report: not read",
                "/etc/hostid of the installed system is 11111111, not 472479d4",
                "pool rpool is DEGRADED, not ONLINE",
                "dataset rpool/safe/home is missing",
                "root's authorized_keys holds no key: nobody can log in over SSH",
                "an install failed on this disk: nodeflash: FAILED: the store was not copied",
                "the store differs from the installed manifest: missing: abc-foo",
            ]
        );
        assert_eq!(r.failed_install_log.map(|l| l.len()), Some(3));
    }

    #[test]
    fn manifest_round_trip_and_store_check() {
        let root = tempfile::tempdir().expect("tempdir");
        assert_eq!(check_store(root.path(), 2).expect("no manifest"), None);
        let store = root.path().join("nix/store/abc-foo");
        std::fs::create_dir_all(&store).expect("store");
        std::fs::write(store.join("hello"), b"hello\n").expect("file");
        let scanned = payload::scan(&root.path().join("nix/store"), 2).expect("scan");
        let manifest = Manifest {
            version: payload::FORMAT_VERSION,
            frame_size: payload::DEFAULT_FRAME_SIZE,
            entries: scanned.iter().map(|e| e.0.clone()).collect(),
            ..Manifest::default()
        };
        save_manifest(root.path(), &manifest).expect("save");
        assert_eq!(load_manifest(root.path()).expect("load"), manifest);
        // Written by hand, so the modification times are not Nix's.
        let s = check_store(root.path(), 2).expect("check").expect("store");
        assert!(!s.verified);
        assert!(
            s.differences.as_deref().unwrap_or("").contains("mtime"),
            "{s:?}"
        );
        let t = std::time::UNIX_EPOCH + Duration::from_secs(1);
        for p in [store.join("hello"), store.clone()] {
            std::fs::File::open(&p)
                .and_then(|f| f.set_modified(t))
                .expect("mtime");
        }
        let s = check_store(root.path(), 2).expect("check").expect("store");
        assert!(s.verified, "{s:?}");
        assert_eq!(s.digest, s.manifest_digest);
        assert_eq!((s.files, s.bytes), (1, 6));
        // A changed file is found.
        let mut m = manifest.clone();
        if let Some(Entry::File { sha256, .. }) = m.entries.last_mut() {
            *sha256 = "0".repeat(64);
        }
        save_manifest(root.path(), &m).expect("save");
        let s = check_store(root.path(), 2).expect("check").expect("store");
        assert!(!s.verified && s.digest != s.manifest_digest, "{s:?}");
        std::fs::write(root.path().join(MANIFEST_PATH), b"junk").expect("junk");
        let e = check_store(root.path(), 2).expect_err("junk manifest");
        assert!(
            format!("{e:#}").contains("store-manifest.json.zst"),
            "{e:#}"
        );
    }

    #[test]
    fn gathers_files_of_an_installed_root() {
        let root = tempfile::tempdir().expect("tempdir");
        let r = root.path();
        std::fs::create_dir_all(r.join("etc")).expect("etc");
        std::fs::create_dir_all(r.join("root/.ssh")).expect("ssh");
        std::fs::write(r.join("etc/hostname"), "alrest-1\n").expect("hostname");
        std::fs::write(r.join("etc/hostid"), zfs::hostid_file(0x472479d4)).expect("hostid");
        let mut keys = crate::net::keys::KeySet::default();
        keys.add(
            crate::net::keys::parse_line(crate::net::keys::tests::ED25519, "inline").expect("key"),
        );
        std::fs::write(r.join("root/.ssh/authorized_keys"), keys.authorized_keys()).expect("keys");
        let g = gather_files(r, 2);
        assert_eq!(g.hostname, Some(Ok("alrest-1".into())));
        assert_eq!(g.hostid_etc, Some(Ok(0x472479d4)));
        assert_eq!(g.ssh_keys, Some(Ok(vec![keys.keys[0].fingerprint()])));
        assert!(g.store.is_none());
        let e = match &g.install {
            Some(Err(e)) => e.clone(),
            other => panic!("{other:?}"),
        };
        assert!(e.contains("install.json"), "{e}");
    }
}

//! The install report: what was installed where, how long each phase took,
//! saved on the target as `/var/log/nodeflash/install.json` (and a short
//! human summary as `install.txt`). Fields are plain values so that PID 1
//! fills them from `disk::Layout`, `zfs::PoolFacts` and `net::keys::KeySet`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{self, DirBuilder, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::boot::BootFiles;

/// The report's directory on the target, from its root.
pub const LOG_DIR: &str = "var/log/nodeflash";
pub const REPORT_JSON: &str = "install.json";
pub const REPORT_TXT: &str = "install.txt";
/// Everything the installer said on the console, for a successful install.
pub const INSTALL_LOG: &str = "install.log";
/// The console of a failed install, written to the pool when it exists.
pub const FAILED_LOG: &str = "install-failed.log";

/// One timed phase of the install.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Phase {
    pub name: String,
    pub secs: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mb_s: Option<f64>,
}

/// Name of the bucket [`Phases::finish`] adds for the time outside any phase.
pub const OTHER: &str = "other";

/// Records phases one after another: starting a phase ends the current one.
#[derive(Debug)]
pub struct Phases {
    started: Instant,
    done: Vec<Phase>,
    current: Option<(String, Instant)>,
}

impl Phases {
    /// `started`: when `/init` started.
    pub fn new(started: Instant) -> Self {
        Phases {
            started,
            done: Vec::new(),
            current: None,
        }
    }

    /// Ends the current phase, if any, and starts `name`.
    pub fn start(&mut self, name: &str) {
        self.end();
        self.current = Some((name.to_string(), Instant::now()));
    }

    /// Ends the current phase and returns its seconds (0 if there was none).
    pub fn end(&mut self) -> f64 {
        self.end_with(None)
    }

    /// Ends the current phase, which moved `bytes` (for its MB/s).
    pub fn end_bytes(&mut self, bytes: u64) -> f64 {
        self.end_with(Some(bytes))
    }

    fn end_with(&mut self, bytes: Option<u64>) -> f64 {
        let Some((name, t)) = self.current.take() else {
            return 0.0;
        };
        let secs = t.elapsed().as_secs_f64();
        self.done.push(phase(name, secs, bytes));
        secs
    }

    /// The phases so far (the current one not included).
    /// Seconds since `/init` started.
    pub fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    pub fn done(&self) -> &[Phase] {
        &self.done
    }

    /// Ends the current phase and returns the phases, with an [`OTHER`]
    /// bucket for the time spent outside them, and the seconds since `/init`
    /// started (never less than the sum of the phases).
    pub fn finish(mut self) -> (Vec<Phase>, f64) {
        self.end();
        let total = self.started.elapsed().as_secs_f64();
        let sum: f64 = self.done.iter().map(|p| p.secs).sum();
        self.done
            .push(phase(OTHER.to_string(), (total - sum).max(0.0), None));
        (self.done, total.max(sum))
    }
}

/// A phase with its MB/s if it moved bytes.
pub fn phase(name: String, secs: f64, bytes: Option<u64>) -> Phase {
    Phase {
        name,
        secs,
        bytes,
        mb_s: bytes.map(|b| crate::units::mb_per_s(b, secs)),
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeReport {
    pub hostname: String,
    /// How it was matched (`nodes::Identity::reason`).
    pub matched_by: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DiskReport {
    /// Kernel name, e.g. `nvme0n1`.
    pub name: String,
    pub model: Option<String>,
    pub serial: Option<String>,
    pub size_bytes: u64,
}

/// One disk the install partitioned, with the pool it belongs to.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WrittenDisk {
    /// The root pool's or a data pool's name.
    pub pool: String,
    pub disk: DiskReport,
    pub gpt_disk_guid: String,
    pub partitions: Vec<PartitionReport>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PartitionReport {
    pub number: u32,
    /// `esp`, `swap` or `zfs`.
    pub kind: String,
    pub device: String,
    pub guid: String,
}

impl From<&crate::disk::Partition> for PartitionReport {
    fn from(p: &crate::disk::Partition) -> Self {
        PartitionReport {
            number: p.number,
            kind: format!("{:?}", p.kind).to_lowercase(),
            device: p.device.clone(),
            guid: p.guid.clone(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PoolReport {
    pub name: String,
    pub guid: String,
    /// Dataset → property → value (`zfs::PoolFacts::datasets`).
    pub datasets: BTreeMap<String, BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KeyReport {
    pub fingerprint: String,
    pub kind: String,
    pub comment: Option<String>,
    pub source: String,
}

impl From<&crate::net::keys::Key> for KeyReport {
    fn from(k: &crate::net::keys::Key) -> Self {
        KeyReport {
            fingerprint: k.fingerprint(),
            kind: k.kind.clone(),
            comment: k.comment.clone(),
            source: k.source.clone(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PayloadReport {
    pub manifest_sha256: String,
    pub files: usize,
    pub bytes: u64,
    /// Compressed bytes read from the boot medium.
    pub payload_bytes: u64,
    pub copy_secs: f64,
    pub copy_mb_s: f64,
    /// Sequential read of the payload from the boot medium, caches dropped.
    pub raw_read_mb_s: f64,
    /// Copy time over the time a plain read of the payload takes.
    pub copy_to_read_ratio: f64,
    /// Digest of the tree read back from the imported pool.
    pub tree_digest: String,
    /// `tree_digest` equals the digest of the manifest's entries
    /// ([`crate::payload::digest`]): the tree read back is the manifest's.
    pub verified: bool,
}

/// Everything about one install.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InstallReport {
    pub nodeflash_version: String,
    pub profile: String,
    pub image_id: String,
    /// Kernel release and package version, e.g. `6.1.0-56-amd64 (6.1.192-2)`.
    #[serde(default)]
    pub kernel: String,
    /// OpenZFS version of the image's modules and tools, e.g. `2.1.11-1+deb12u1`.
    #[serde(default)]
    pub openzfs: String,
    pub node: NodeReport,
    /// 8 hex digits.
    pub hostid: String,
    /// The root pool's first disk (its GPT and partitions below); every
    /// disk is in `disks`.
    pub disk: DiskReport,
    pub gpt_disk_guid: String,
    pub partitions: Vec<PartitionReport>,
    pub esp_volume_id: String,
    /// Every disk written, in the plan's order: the root pool's, then the
    /// whole disks (the root pool's classes, the data pools).
    #[serde(default)]
    pub disks: Vec<WrittenDisk>,
    pub pool: PoolReport,
    pub ssh_keys: Vec<KeyReport>,
    pub payload: Option<PayloadReport>,
    pub boot: Option<BootFiles>,
    pub phases: Vec<Phase>,
    /// Seconds from `/init` to the end of the install.
    pub total_secs: f64,
    pub warnings: Vec<String>,
}

const MB: f64 = crate::units::MB as f64;

impl InstallReport {
    /// A few lines for a person: node, host ID, disk, pool, keys, store,
    /// phases and total.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "nodeflash {}: profile {}, image {}, kernel {}, OpenZFS {}",
            self.nodeflash_version, self.profile, self.image_id, self.kernel, self.openzfs
        );
        let _ = writeln!(s, "node: {} ({})", self.node.hostname, self.node.matched_by);
        let _ = writeln!(s, "host id: {}", self.hostid);
        let d = &self.disk;
        let _ = writeln!(
            s,
            "disk: {} {} (serial {}), {:.1} GB, GPT {}",
            d.name,
            d.model.as_deref().unwrap_or("?"),
            d.serial.as_deref().unwrap_or("?"),
            d.size_bytes as f64 / 1e9,
            self.gpt_disk_guid
        );
        let _ = writeln!(
            s,
            "pool: {} (guid {}), {} datasets",
            self.pool.name,
            self.pool.guid,
            // The profile's datasets, as the console counts them: not the
            // pool's own root dataset.
            self.pool
                .datasets
                .keys()
                .filter(|k| **k != self.pool.name)
                .count()
        );
        let _ = writeln!(s, "ssh keys: {}", self.ssh_keys.len());
        if let Some(p) = &self.payload {
            let _ = writeln!(
                s,
                "store: {} files, {:.1} MB, copied in {:.1}s ({:.1} MB/s; plain read {:.1} MB/s)",
                p.files,
                p.bytes as f64 / MB,
                p.copy_secs,
                p.copy_mb_s,
                p.raw_read_mb_s
            );
        }
        if let Some(b) = &self.boot {
            let _ = writeln!(
                s,
                "boot: {} files on the ESP {} ({})",
                b.files.len(),
                self.esp_volume_id,
                b.esp
            );
        }
        for p in &self.phases {
            let _ = write!(s, "  {:<16} {:>7.1}s", p.name, p.secs);
            if let (Some(b), Some(r)) = (p.bytes, p.mb_s) {
                let _ = write!(s, "  {:.1} MB, {r:.1} MB/s", b as f64 / MB);
            }
            s.push('\n');
        }
        let _ = writeln!(s, "total: {:.1}s", self.total_secs);
        for w in &self.warnings {
            let _ = writeln!(s, "warning: {w}");
        }
        s
    }

    /// Writes `<root>/var/log/nodeflash/install.json` (pretty JSON) and
    /// `install.txt` ([`Self::summary`]), mode 0644, creating missing
    /// directories with mode 0755.
    pub fn write(&self, root: &Path) -> Result<()> {
        let dir = log_dir(root)?;
        let json =
            serde_json::to_vec_pretty(self).context("cannot serialize the install report")?;
        write_file(&dir.join(REPORT_JSON), &json)?;
        write_file(&dir.join(REPORT_TXT), self.summary().as_bytes())
    }

    /// Reads `<root>/var/log/nodeflash/install.json`.
    pub fn read(root: &Path) -> Result<Self> {
        let path = root.join(LOG_DIR).join(REPORT_JSON);
        let text = fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_slice(&text).with_context(|| format!("cannot parse {}", path.display()))
    }
}

/// Writes the console's lines to `<root>/var/log/nodeflash/<name>`.
pub fn write_log(root: &Path, name: &str, lines: &[String]) -> Result<PathBuf> {
    let path = log_dir(root)?.join(name);
    let mut text = lines.join("\n");
    text.push('\n');
    write_file(&path, text.as_bytes())?;
    Ok(path)
}

/// `<root>/var/log/nodeflash`, its missing components created with mode 0755
/// (existing ones are left as they are).
pub(crate) fn log_dir(root: &Path) -> Result<PathBuf> {
    let mut dir = root.to_path_buf();
    for part in LOG_DIR.split('/') {
        dir.push(part);
        if dir.is_dir() {
            continue;
        }
        DirBuilder::new()
            .mode(0o755)
            .create(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        // Whatever the umask.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("cannot set the mode of {}", dir.display()))?;
    }
    Ok(dir)
}

/// Writes `path` with mode 0644 and syncs it.
pub(crate) fn write_file(path: &Path, data: &[u8]) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.set_permissions(fs::Permissions::from_mode(0o644))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::time::Duration;

    #[test]
    fn phases_add_up_with_an_other_bucket() {
        let started = Instant::now();
        std::thread::sleep(Duration::from_millis(20));
        let mut p = Phases::new(started);
        p.start("partition");
        std::thread::sleep(Duration::from_millis(30));
        p.start("pool");
        std::thread::sleep(Duration::from_millis(10));
        let secs = p.end_bytes(5_000_000);
        assert!(secs >= 0.01, "{secs}");
        assert_eq!(p.end(), 0.0, "nothing to end");
        p.start("keys");
        std::thread::sleep(Duration::from_millis(10));
        p.end();
        std::thread::sleep(Duration::from_millis(20));
        let (phases, total) = p.finish();
        let names: Vec<&str> = phases.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["partition", "pool", "keys", OTHER]);
        assert!(phases[0].secs >= 0.03, "{phases:?}");
        let named: f64 = phases[..3].iter().map(|p| p.secs).sum();
        assert!(total >= named, "{total} < {named}");
        // The time before the first phase and between phases is in "other".
        assert!(phases[3].secs >= 0.04, "{phases:?}");
        let all: f64 = phases.iter().map(|p| p.secs).sum();
        assert!((all - total).abs() < 1e-9, "{all} vs {total}");
        let pool = &phases[1];
        assert_eq!(pool.bytes, Some(5_000_000));
        let rate = pool.mb_s.expect("MB/s");
        assert!((rate - 5.0 / pool.secs).abs() < 1e-6, "{rate}");
        assert_eq!(phases[0].mb_s, None);
    }

    fn sample() -> InstallReport {
        let mut ds = BTreeMap::new();
        // The pool's root dataset, which the summary does not count.
        ds.insert("rpool".to_string(), BTreeMap::new());
        ds.insert(
            "rpool/safe/root".to_string(),
            BTreeMap::from([
                ("mountpoint".to_string(), "/".to_string()),
                ("compression".to_string(), "zstd".to_string()),
            ]),
        );
        InstallReport {
            nodeflash_version: "0.1.0".into(),
            profile: "alrest".into(),
            image_id: "ab12".into(),
            kernel: "6.1.0-56-amd64 (6.1.192-2)".into(),
            openzfs: "2.1.11-1+deb12u1".into(),
            node: NodeReport {
                hostname: "alrest-1".into(),
                matched_by: "dmi serial ABC".into(),
            },
            hostid: "472479d4".into(),
            disk: DiskReport {
                name: "nvme0n1".into(),
                model: Some("Samsung SSD 980".into()),
                serial: Some("S1".into()),
                size_bytes: 500_107_862_016,
            },
            gpt_disk_guid: "A-B".into(),
            partitions: vec![PartitionReport {
                number: 1,
                kind: "esp".into(),
                device: "/dev/nvme0n1p1".into(),
                guid: "C-D".into(),
            }],
            esp_volume_id: "1234-ABCD".into(),
            disks: Vec::new(),
            pool: PoolReport {
                name: "rpool".into(),
                guid: "1234567890".into(),
                datasets: ds,
            },
            ssh_keys: vec![KeyReport {
                fingerprint: "SHA256:x".into(),
                kind: "ssh-ed25519".into(),
                comment: None,
                source: "inline".into(),
            }],
            payload: Some(PayloadReport {
                manifest_sha256: "ff".into(),
                files: 10,
                bytes: 2_500_000_000,
                copy_secs: 10.0,
                copy_mb_s: 250.0,
                raw_read_mb_s: 400.0,
                ..Default::default()
            }),
            boot: Some(BootFiles {
                esp: "/dev/nvme0n1p1".into(),
                files: vec![crate::boot::BootFile {
                    path: "EFI/BOOT/BOOTX64.EFI".into(),
                    bytes: 1,
                    sha256: "00".into(),
                }],
            }),
            phases: vec![
                phase("store".into(), 10.0, Some(2_500_000_000)),
                phase(OTHER.into(), 1.25, None),
            ],
            total_secs: 11.25,
            warnings: vec!["no network".into()],
        }
    }

    #[test]
    fn summary_reads_plainly() {
        let s = sample().summary();
        for want in [
            "nodeflash 0.1.0: profile alrest, image ab12, kernel 6.1.0-56-amd64 (6.1.192-2), OpenZFS 2.1.11-1+deb12u1\n",
            "node: alrest-1 (dmi serial ABC)\n",
            "host id: 472479d4\n",
            "disk: nvme0n1 Samsung SSD 980 (serial S1), 500.1 GB, GPT A-B\n",
            "pool: rpool (guid 1234567890), 1 datasets\n",
            "ssh keys: 1\n",
            "store: 10 files, 2500.0 MB, copied in 10.0s (250.0 MB/s; plain read 400.0 MB/s)\n",
            "  store               10.0s  2500.0 MB, 250.0 MB/s\n",
            "  other                1.2s\n",
            "total: 11.2s\n",
            "warning: no network\n",
        ] {
            assert!(s.contains(want), "{want:?} not in\n{s}");
        }
    }

    #[test]
    fn writes_and_reads_back_with_modes() {
        let root = tempfile::tempdir().expect("tempdir");
        // An existing /var keeps its mode.
        fs::create_dir(root.path().join("var")).expect("var");
        fs::set_permissions(root.path().join("var"), fs::Permissions::from_mode(0o700))
            .expect("chmod");
        let report = sample();
        report.write(root.path()).expect("write");
        assert_eq!(InstallReport::read(root.path()).expect("read"), report);
        let dir = root.path().join(LOG_DIR);
        let mode = |p: &Path| fs::metadata(p).expect("stat").mode() & 0o7777;
        assert_eq!(mode(&root.path().join("var")), 0o700);
        assert_eq!(mode(&root.path().join("var/log")), 0o755);
        assert_eq!(mode(&dir), 0o755);
        assert_eq!(mode(&dir.join(REPORT_JSON)), 0o644);
        assert_eq!(mode(&dir.join(REPORT_TXT)), 0o644);
        assert_eq!(
            fs::read_to_string(dir.join(REPORT_TXT)).expect("txt"),
            report.summary()
        );
        // Writing again replaces both files.
        let mut again = report.clone();
        again.warnings.clear();
        again.write(root.path()).expect("rewrite");
        assert_eq!(InstallReport::read(root.path()).expect("read"), again);
        let e = InstallReport::read(&root.path().join("nowhere")).expect_err("missing");
        assert!(format!("{e:#}").contains("nowhere/var/log/nodeflash/install.json"));
    }
}

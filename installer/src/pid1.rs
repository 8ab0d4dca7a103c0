//! PID 1 of the install image: sets up the early userspace, loads the kernel
//! modules the builder chose, finds the boot medium, prints what it sees, and
//! finishes as the profile says. It never panics out and never exits: every
//! error is printed with its full chain, then the failure policy applies.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::mount::{mount, MsFlags};

use crate::facts::Facts;
use crate::image::{ImageInfo, IMAGE_INFO_PATH, PROFILE_PATH};
use crate::payload::Payload;
use crate::profile::{OnFailure, OnSuccess, Profile};
use crate::say;

/// Entry point of `/init`.
pub fn main() -> ! {
    if std::process::id() != 1 {
        eprintln!(
            "nodeflash-installer is the /init of a nodeflash image and only runs as PID 1; \
             on a build host use `nodeflash` (see `nodeflash --help`)"
        );
        std::process::exit(2);
    }
    std::panic::set_hook(Box::new(|info| {
        crate::console::say(&format!("nodeflash: internal error: {info}"));
    }));
    let started = Instant::now();
    let outcome = std::panic::catch_unwind(|| run(started));
    let (finish, result) = match outcome {
        Ok((finish, result)) => (finish, result),
        Err(_) => (
            Finish::Fail(OnFailure::Halt),
            Err(anyhow::anyhow!(
                "the installer panicked (see the message above)"
            )),
        ),
    };
    match result {
        Ok(()) => say!("nodeflash: done in {:.1}s", started.elapsed().as_secs_f64()),
        Err(e) => {
            say!("nodeflash: FAILED: {e}");
            for cause in e.chain().skip(1) {
                say!("  caused by: {cause}");
            }
            say!("nodeflash: nothing more will be done; fix the cause above and boot the stick again");
        }
    }
    finish.apply()
}

/// What to do at the end: the profile's policies, or safe defaults when the
/// profile could not even be read.
enum Finish {
    Done(OnSuccess),
    Fail(OnFailure),
}

impl Finish {
    fn apply(self) -> ! {
        use nix::sys::reboot::{reboot, RebootMode};
        nix::unistd::sync();
        let mode = match self {
            Finish::Done(OnSuccess::Poweroff) | Finish::Fail(OnFailure::Poweroff) => {
                say!("nodeflash: powering off");
                Some(RebootMode::RB_POWER_OFF)
            }
            Finish::Done(OnSuccess::Reboot) => {
                say!("nodeflash: rebooting");
                Some(RebootMode::RB_AUTOBOOT)
            }
            Finish::Done(OnSuccess::Halt) | Finish::Fail(OnFailure::Halt) => {
                say!("nodeflash: halted; the machine can be switched off");
                None
            }
        };
        if let Some(mode) = mode {
            let Err(e) = reboot(mode);
            say!("nodeflash: cannot power off or reboot ({e}); halted instead");
        }
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

fn run(started: Instant) -> (Finish, Result<()>) {
    if let Err(e) = early_mounts() {
        crate::console::open();
        return (Finish::Fail(OnFailure::Halt), Err(e));
    }
    crate::console::open();
    crate::cmd::set_logger(crate::console::say);
    // The kernel starts /init with an empty environment.
    std::env::set_var("PATH", "/sbin:/usr/sbin:/bin:/usr/bin");
    // Without udev, `zpool import` would wait 30 s per device for udev to
    // "initialise" it.
    std::env::set_var("ZPOOL_IMPORT_UDEV_TIMEOUT_MS", "0");
    let loaded = std::fs::read_to_string(PROFILE_PATH)
        .with_context(|| format!("cannot read {PROFILE_PATH}"))
        .and_then(|s| Ok(Profile::parse(&s, PROFILE_PATH)?))
        .and_then(|p| {
            let info = std::fs::read(IMAGE_INFO_PATH)
                .with_context(|| format!("cannot read {IMAGE_INFO_PATH}"))?;
            let info: ImageInfo = serde_json::from_slice(&info)
                .with_context(|| format!("cannot parse {IMAGE_INFO_PATH}"))?;
            Ok((p, info))
        });
    let (profile, info) = match loaded {
        Ok(v) => v,
        Err(e) => {
            return (
                Finish::Fail(OnFailure::Halt),
                Err(e.context("the image is damaged")),
            )
        }
    };
    say!(
        "nodeflash {} · profile {} · image {} · kernel {}",
        info.version,
        info.profile,
        info.short_id(),
        info.kernel_release
    );
    match install(&profile, &info, started) {
        Ok(()) => (Finish::Done(profile.finish.on_success), Ok(())),
        Err(e) => (Finish::Fail(profile.finish.on_failure), Err(e)),
    }
}

fn early_mounts() -> Result<()> {
    let none: Option<&str> = None;
    for (src, target, fstype) in [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
        ("tmpfs", "/run", "tmpfs"),
    ] {
        std::fs::create_dir_all(target).with_context(|| format!("cannot create {target}"))?;
        match mount(Some(src), target, Some(fstype), MsFlags::MS_NOSUID, none) {
            Ok(()) | Err(nix::errno::Errno::EBUSY) => {}
            Err(e) => bail!("cannot mount {fstype} on {target}: {e}"),
        }
    }
    Ok(())
}

/// The install itself: modules, boot medium, inventory, the plan, then the
/// disk. Everything that can fail without writing is done before writing.
fn install(profile: &Profile, info: &ImageInfo, started: Instant) -> Result<()> {
    load_modules(info);
    links_up();
    let timeout = Duration::from_secs(profile.image.device_timeout_secs.into());
    let boot = wait_for_boot_medium(info, timeout);
    settle_block_devices(Duration::from_secs(3));
    let facts = wait_for_target(profile, boot.as_deref(), timeout);
    say!(
        "inventory after {:.1}s:\n{}",
        started.elapsed().as_secs_f64(),
        facts.inventory().trim_end()
    );
    if boot.is_none() {
        say!(
            "warning: the boot medium (volume set {}) was not found within {}s",
            info.volume_set_id(),
            timeout.as_secs()
        );
    }
    say!(
        "nodeflash-facts: {}",
        serde_json::to_string(&facts).context("cannot serialize the facts")?
    );
    // Who this machine is and everything else that can fail is settled
    // before the disk is touched.
    let identity = crate::nodes::identify(profile, &facts)?;
    let select = identity
        .disk_select
        .as_ref()
        .unwrap_or(&profile.disk.select);
    let plan = crate::plan::plan_with(profile, select, &facts)?;
    let hostid = crate::zfs::resolve_hostid(identity.hostid, &facts, plan.disk.serial.as_deref())?;
    say!("node: {} ({})", identity.hostname, identity.reason);
    say!(
        "host id: {hostid:08x} (for a Morph/colmena manifest: networking.hostName = \"{}\"; networking.hostId = \"{hostid:08x}\";)",
        identity.hostname
    );
    say!("{}", plan.to_string().trim_end());
    let keys = ssh_keys(profile, &identity)?;
    let store = open_store(profile, info, boot.as_deref())?;

    // The plan names the disk by its kernel name: make sure that name still
    // is the disk that was chosen (same serial, model and size) right before writing.
    let now = Facts::read(Path::new("/sys"));
    let same = now.block_devices.iter().any(|d| {
        d.name == plan.disk.name
            && d.serial == plan.disk.serial
            && d.model == plan.disk.model
            && d.size_bytes == plan.disk.size_bytes
    });
    if !same {
        bail!(
            "{} is no longer the disk that was planned for (serial {:?}); nothing was written. Boot the stick again",
            plan.disk.name,
            plan.disk.serial.as_deref().unwrap_or("")
        );
    }
    let t = Instant::now();
    let dev = Path::new("/dev").join(&plan.disk.name);
    let old: Vec<(u64, u64)> = crate::disk::old_partitions(Path::new("/sys"), &plan.disk.name)
        .into_iter()
        .map(|(_, start, len)| (start, len))
        .collect();
    let layout = crate::disk::partition(&plan, &dev, &old)?;
    say!(
        "partitioned {} in {:.1}s: GPT disk GUID {}, ESP FAT32 volume {}",
        dev.display(),
        t.elapsed().as_secs_f64(),
        layout.disk_guid,
        layout.esp_volume_id
    );
    for p in &layout.partitions {
        say!("  {} {:?} partition GUID {}", p.device, p.kind, p.guid);
    }
    let zfs_dev = layout
        .partitions
        .last()
        .map(|p| p.device.clone())
        .context("the plan has no ZFS partition")?;
    make_pool(profile, &identity.hostname, hostid, &zfs_dev, store, &keys)
}

/// Root's SSH keys: the profile's and the node's inline keys, and the
/// users' keys fetched over HTTPS (network up first), all before the disk
/// is touched.
fn ssh_keys(profile: &Profile, identity: &crate::nodes::Identity) -> Result<crate::net::KeySet> {
    let mut ssh = profile.ssh.clone();
    ssh.keys.extend(identity.keys.iter().cloned());
    let mut cas: Vec<std::path::PathBuf> = std::fs::read_dir(crate::image::CA_DIR)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    cas.sort();
    let cas: Vec<Vec<u8>> = cas
        .iter()
        .map(|p| std::fs::read(p).with_context(|| format!("cannot read {}", p.display())))
        .collect::<Result<_>>()?;
    let not_before = std::time::UNIX_EPOCH + Duration::from_secs(crate::image::NOT_BEFORE_UNIX);
    let keys = crate::net::fetch_keys(&ssh, &cas, not_before, |l| say!("{l}"))
        .context("the SSH keys could not be fetched; nothing was written")?;
    if keys.is_empty() {
        say!("warning: no SSH keys: nobody will be able to log in to this node over SSH");
    }
    Ok(keys)
}

/// Where the store goes on the target (under the pool's altroot).
const STORE_DIR: &str = "/mnt/nix/store";
/// Where the boot medium is mounted.
const MEDIUM_DIR: &str = "/run/nodeflash/medium";

/// The store payload on the boot medium, opened and checked (length,
/// header, manifest and that it belongs to this image) before the disk is touched.
struct Store {
    file: std::path::PathBuf,
    payload: Payload<File>,
    workers: usize,
}

fn open_store(profile: &Profile, info: &ImageInfo, boot: Option<&str>) -> Result<Option<Store>> {
    let Some(want) = &info.payload else {
        return Ok(None);
    };
    let Some(boot) = boot else {
        bail!(
            "the boot medium (volume set {}) was not found, so the store cannot be copied; nothing was written. \
             Check that the stick is plugged in and was written with this image",
            info.volume_set_id()
        );
    };
    let dev = Path::new("/dev").join(boot);
    std::fs::create_dir_all(MEDIUM_DIR).with_context(|| format!("cannot create {MEDIUM_DIR}"))?;
    match mount(
        Some(&dev),
        MEDIUM_DIR,
        Some("iso9660"),
        MsFlags::MS_RDONLY,
        None::<&str>,
    ) {
        Ok(()) | Err(nix::errno::Errno::EBUSY) => {}
        Err(e) => bail!(
            "cannot mount the boot medium {} on {MEDIUM_DIR}: {e}",
            dev.display()
        ),
    }
    let file = Path::new(MEDIUM_DIR).join(want.path.trim_start_matches('/'));
    let len = std::fs::metadata(&file)
        .with_context(|| {
            format!(
                "cannot find the store payload {} on {}",
                want.path,
                dev.display()
            )
        })?
        .len();
    let damaged = "the stick is damaged or was not written completely: write the image to it again";
    if len != want.bytes {
        bail!(
            "the store payload on {} is {len} bytes instead of {}; {damaged}",
            dev.display(),
            want.bytes
        );
    }
    let f = File::open(&file).with_context(|| format!("cannot open {}", file.display()))?;
    let payload = Payload::open(f)
        .with_context(|| format!("{} on {}: {damaged}", want.path, dev.display()))?;
    if payload.manifest_sha256() != want.manifest_sha256 {
        bail!(
            "the store payload on {} does not belong to this image; {damaged}",
            dev.display()
        );
    }
    let workers = profile.payload.workers.map_or_else(
        // At least two, so that one writes while another waits on the disk.
        || std::thread::available_parallelism().map_or(2, |n| n.get().max(2)),
        |w| w as usize,
    );
    say!(
        "store: {} files, {:.1} MiB in {} store paths ({:.1} MiB packed on {}), {workers} workers",
        payload.manifest.files(),
        payload.manifest.bytes() as f64 / MIB,
        payload.manifest.store_paths().len(),
        len as f64 / MIB,
        dev.display()
    );
    Ok(Some(Store {
        file,
        payload,
        workers,
    }))
}

const MIB: f64 = 1024.0 * 1024.0;

/// What the copy did, for the console and the report.
#[derive(Debug, serde::Serialize)]
struct StoreReport {
    files: usize,
    bytes: u64,
    payload_bytes: u64,
    copy_secs: f64,
    copy_mb_s: f64,
    /// Sequential read of the payload from the boot medium, caches dropped.
    raw_read_mb_s: f64,
    /// Copy time over the time a plain read of the payload takes.
    copy_to_read_ratio: f64,
    /// Digest of the tree read back from the imported pool.
    tree_digest: String,
    verified: bool,
}

/// Writes the store into the mounted datasets, every file checked against
/// the manifest, with a plain progress line every few seconds.
fn copy_store(store: Store) -> Result<(crate::payload::Manifest, std::path::PathBuf, f64)> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let Store {
        file,
        payload,
        workers,
    } = store;
    let manifest = payload.manifest.clone();
    let (total, files) = (manifest.bytes(), manifest.files() as u64);
    let counters = crate::payload::Counters::default();
    let done = AtomicBool::new(false);
    let t = Instant::now();
    let result = std::thread::scope(|s| {
        s.spawn(|| {
            let mut last = Instant::now();
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                if last.elapsed() >= Duration::from_secs(5) {
                    say!("store: {}", counters.line(total, files, t.elapsed()));
                    last = Instant::now();
                }
            }
        });
        let r = payload.extract(Some(Path::new(STORE_DIR)), workers, &counters);
        done.store(true, Ordering::Relaxed);
        r
    });
    result.context("the store was not copied completely; the disk is not bootable")?;
    let secs = t.elapsed().as_secs_f64();
    // As Nix has it: sticky and group-writable.
    std::fs::set_permissions(
        STORE_DIR,
        std::os::unix::fs::PermissionsExt::from_mode(0o1775),
    )
    .with_context(|| format!("cannot set the mode of {STORE_DIR}"))?;
    say!(
        "store copied in {secs:.1}s: {}",
        counters.line(total, files, t.elapsed())
    );
    if let Some(reg) = &manifest.registration {
        register(&manifest, reg)?;
    }
    Ok((manifest, file, secs))
}

/// Loads the closure's registration into the installed Nix database with
/// the store's own `nix-store`, as `nixos-install` does.
fn register(manifest: &crate::payload::Manifest, registration: &str) -> Result<()> {
    let nix_store = manifest.entries.iter().find_map(|e| {
        let p = e.path();
        (p.ends_with("/bin/nix-store") && p.matches('/').count() == 2).then_some(p)
    });
    let Some(nix_store) = nix_store else {
        say!("store: no nix-store in the closure, so the registration is not loaded");
        return Ok(());
    };
    crate::cmd::run_with_input(
        std::process::Command::new("chroot").args([
            "/mnt",
            &format!("/nix/store/{nix_store}"),
            "--load-db",
        ]),
        registration.as_bytes(),
    )
    .context("cannot register the store paths with the installed Nix")?;
    say!(
        "store: registered {} store paths",
        manifest.store_paths().len()
    );
    Ok(())
}

/// Reads the tree back from the (read-only, freshly imported) pool and
/// checks it against the manifest: mounts just the dataset that holds the
/// store on /mnt.
fn check_store(profile: &Profile, manifest: &crate::payload::Manifest) -> Result<String> {
    let (dataset, mountpoint) = profile
        .pool
        .datasets
        .iter()
        .filter_map(|d| {
            let m = d.mountpoint.as_ref()?.get_ref().0.clone();
            Path::new("/nix/store")
                .starts_with(&m)
                .then(|| (format!("{}/{}", profile.pool.name, d.name.get_ref()), m))
        })
        .max_by_key(|(_, m)| m.len())
        .context("no dataset holds /nix/store")?;
    mount(
        Some(dataset.as_str()),
        "/mnt",
        Some("zfs"),
        MsFlags::MS_RDONLY,
        Some("zfsutil"),
    )
    .with_context(|| format!("cannot mount {dataset} read-only on /mnt"))?;
    let dir = Path::new("/mnt").join(
        Path::new("/nix/store")
            .strip_prefix(&mountpoint)
            .unwrap_or(Path::new("")),
    );
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let result = crate::payload::scan(&dir, threads).and_then(|scanned| {
        crate::payload::compare(&manifest.entries, &scanned, true)
            .context("the store read back from the pool is not what was written")?;
        Ok(crate::payload::digest(scanned.iter().map(|e| &e.0)))
    });
    nix::mount::umount("/mnt").with_context(|| format!("cannot unmount {dataset} from /mnt"))?;
    result
}

/// MB/s of a plain sequential read of (at most 256 MiB of) `file`, page cache dropped.
fn raw_read_speed(file: &Path) -> Result<f64> {
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("cannot drop the page cache")?;
    let mut f = File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    let mut buf = vec![0u8; 4 << 20];
    let (mut n, t) = (0u64, Instant::now());
    while n < 256 << 20 {
        let r = f
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", file.display()))?;
        if r == 0 {
            break;
        }
        n += r as u64;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64().max(1e-6) / 1e6)
}

/// Host ID, pool, datasets, `/etc/hostid` and `/etc/hostname` on the target, export, and a check
/// that the pool imports again without `-f`.
fn make_pool(
    profile: &Profile,
    hostname: &str,
    hostid: u32,
    device: &str,
    store: Option<Store>,
    keys: &crate::net::KeySet,
) -> Result<()> {
    use crate::zfs;
    let pool = profile.pool.name.to_string();
    zfs::set_live_hostid(hostid)?;
    let t = Instant::now();
    std::fs::create_dir_all("/mnt").context("cannot create /mnt")?;
    zfs::run_all(&zfs::create_commands(&profile.pool, device, "/mnt"))?;
    let root_mounted = profile
        .pool
        .datasets
        .iter()
        .any(|d| d.mountpoint.as_ref().is_some_and(|m| m.get_ref().0 == "/"));
    if root_mounted {
        std::fs::create_dir_all("/mnt/etc")
            .context("cannot create /mnt/etc on the root dataset")?;
        std::fs::write("/mnt/etc/hostid", zfs::hostid_file(hostid))
            .context("cannot write /mnt/etc/hostid")?;
        std::fs::write("/mnt/etc/hostname", format!("{hostname}\n"))
            .context("cannot write /mnt/etc/hostname")?;
    }
    say!(
        "pool {pool} created on {device} with {} datasets in {:.1}s",
        profile.pool.datasets.len(),
        t.elapsed().as_secs_f64()
    );
    let copied = store.map(copy_store).transpose()?;
    if root_mounted {
        crate::net::keys::write_authorized_keys(Path::new("/mnt"), keys)?;
        crate::nixos::write_module(Path::new("/mnt"), hostname, hostid, keys)?;
        say!(
            "wrote /root/.ssh/authorized_keys ({} keys) and {}",
            keys.len(),
            crate::nixos::MODULE_PATH
        );
    } else {
        say!("warning: no dataset is mounted at /, so no SSH keys or NixOS settings were written");
    }
    crate::cmd::run(std::process::Command::new("zpool").args(["export", &pool]))?;
    // The installed system must import the pool without -f: try it now.
    crate::cmd::run(std::process::Command::new("zpool").args([
        "import",
        "-N",
        "-o",
        "readonly=on",
        "-o",
        "cachefile=none",
        // Look only at the new partition: another disk may hold a pool of the same name.
        "-d",
        device,
        &pool,
    ]))
    .context("the new pool does not import without -f")?;
    let facts = zfs::pool_facts(&profile.pool, device);
    // The store as the pool holds it, after an export dropped its caches.
    let checked = copied
        .as_ref()
        .map(|(manifest, _, _)| check_store(profile, manifest));
    crate::cmd::run(std::process::Command::new("zpool").args(["export", &pool]))?;
    let facts = facts?;
    if let (Some((manifest, file, secs)), Some(digest)) = (copied, checked) {
        let digest = digest?;
        let raw = raw_read_speed(&file)?;
        let bytes = manifest.bytes();
        let payload_bytes: u64 = manifest.frames.iter().map(|f| f.len).sum();
        let report = StoreReport {
            files: manifest.files(),
            bytes,
            payload_bytes,
            copy_secs: secs,
            copy_mb_s: bytes as f64 / secs.max(1e-6) / 1e6,
            raw_read_mb_s: raw,
            copy_to_read_ratio: secs / (payload_bytes as f64 / 1e6 / raw.max(1e-6)).max(1e-6),
            tree_digest: digest,
            verified: true,
        };
        say!(
            "store verified on the pool: {} files; copy {:.1}s ({:.1} MB/s of store), plain read of the payload {:.1} MB/s, ratio {:.2}",
            report.files,
            report.copy_secs,
            report.copy_mb_s,
            report.raw_read_mb_s,
            report.copy_to_read_ratio
        );
        say!(
            "nodeflash-store: {}",
            serde_json::to_string(&report).context("cannot serialize the store report")?
        );
    }
    say!(
        "pool {pool} exported; it imports without -f (pool host id {})",
        facts.hostid.as_deref().unwrap_or("?")
    );
    say!(
        "nodeflash-pool: {}",
        serde_json::to_string(&facts).context("cannot serialize the pool facts")?
    );
    Ok(())
}

/// Reads the machine's facts, with what is on each candidate disk, until the
/// profile's target disk is there or `timeout` passes.
fn wait_for_target(profile: &Profile, boot: Option<&str>, timeout: Duration) -> Facts {
    let deadline = Instant::now() + timeout;
    loop {
        let mut facts = Facts::read(Path::new("/sys"));
        for b in &mut facts.block_devices {
            b.boot_medium = boot == Some(b.name.as_str());
            if !b.boot_medium && !b.removable && b.size_bytes > 0 {
                let parts: Vec<String> = crate::disk::old_partitions(Path::new("/sys"), &b.name)
                    .into_iter()
                    .map(|(name, _, _)| name)
                    .collect();
                b.signatures =
                    crate::disk::signatures(&Path::new("/dev").join(&b.name), b.size_bytes, &parts)
                        .unwrap_or_else(|e| vec![format!("unreadable: {e:#}")]);
            }
        }
        // A recognised node may have disk rules of its own.
        let select = crate::nodes::identify(profile, &facts)
            .ok()
            .and_then(|id| id.disk_select)
            .unwrap_or_else(|| profile.disk.select.clone());
        let waiting =
            matches!(crate::plan::select_disk(&select, &facts), Err(e) if e.matching == 0);
        if !waiting || Instant::now() >= deadline {
            return facts;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn load_modules(info: &ImageInfo) {
    let t = Instant::now();
    let dir = Path::new("/lib/modules").join(&info.kernel_release);
    let mut loaded = 0;
    for rel in &info.modules {
        let path = dir.join(rel);
        let result = File::open(&path)
            .map_err(|e| nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(nix::libc::EIO)))
            .and_then(|f| nix::kmod::finit_module(&f, c"", nix::kmod::ModuleInitFlags::empty()));
        match result {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => loaded += 1,
            // No such hardware or CPU feature (e.g. an accelerated crc variant).
            Err(nix::errno::Errno::ENODEV) => {}
            Err(e) => say!("warning: cannot load module {}: {e}", path.display()),
        }
    }
    say!(
        "loaded {loaded} of {} kernel modules in {:.1}s",
        info.modules.len(),
        t.elapsed().as_secs_f64()
    );
}

/// Brings every network interface up so that its carrier can be read.
fn links_up() {
    let Ok(entries) = std::fs::read_dir("/sys/class/net") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Err(e) = link_up(&name) {
            say!("warning: cannot bring up {name}: {e}");
        }
    }
}

fn link_up(name: &str) -> Result<()> {
    use nix::libc;
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= ifr.ifr_name.len() {
        bail!("interface name too long");
    }
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: ifr is a valid ifreq with a NUL-terminated name; the kernel
    // writes only the flags union member.
    if unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            libc::SIOCGIFFLAGS as libc::Ioctl,
            &mut ifr,
        )
    } < 0
    {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: SIOCGIFFLAGS filled ifru_flags.
    unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: as above.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as libc::Ioctl, &ifr) } < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

/// Reads the ISO9660 primary volume descriptor of a device and returns its
/// volume set ID.
fn iso_volume_set(dev: &Path) -> Option<String> {
    let mut f = File::open(dev).ok()?;
    let mut pvd = [0u8; 2048];
    f.seek(SeekFrom::Start(16 * 2048)).ok()?;
    f.read_exact(&mut pvd).ok()?;
    if pvd[0] != 1 || &pvd[1..6] != b"CD001" {
        return None;
    }
    Some(String::from_utf8_lossy(&pvd[190..318]).trim().to_string())
}

/// Waits until a whole disk carries this image's ISO volume set ID; returns
/// its kernel name.
fn wait_for_boot_medium(info: &ImageInfo, timeout: Duration) -> Option<String> {
    let want = info.volume_set_id();
    let deadline = Instant::now() + timeout;
    loop {
        let mut names: Vec<String> = std::fs::read_dir("/sys/block")
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        for name in names {
            if iso_volume_set(&Path::new("/dev").join(&name)).as_deref() == Some(want.as_str()) {
                say!("boot medium: /dev/{name}");
                return Some(name);
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits (at most `max`) until the set of block devices has not changed for
/// half a second, so that late-probing disks are in the inventory.
fn settle_block_devices(max: Duration) {
    let list = || {
        let mut v: Vec<_> = std::fs::read_dir("/sys/block")
            .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        v.sort();
        v
    };
    let deadline = Instant::now() + max;
    let mut last = list();
    let mut stable_since = Instant::now();
    while Instant::now() < deadline && stable_since.elapsed() < Duration::from_millis(500) {
        std::thread::sleep(Duration::from_millis(100));
        let now = list();
        if now != last {
            last = now;
            stable_since = Instant::now();
        }
    }
}

//! The store payload in the install: opened and checked from the boot
//! medium or over HTTP, pre-read with every frame checked before the disk
//! is touched, copied into the target's `/nix/store` (every file checked),
//! registered with the installed Nix, and read back from the pool.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::mount::{mount, MsFlags};

use crate::image::ImageInfo;
use crate::mount::Mounts;
use crate::payload::Payload;
use crate::profile::Profile;
use crate::progress::{Output, Progress};
use crate::say;

/// The store's line for the console and its part of the report.
pub(super) fn report_store(
    c: &Copied,
    raw: f64,
    digest: String,
) -> Result<crate::report::PayloadReport> {
    let bytes = c.manifest.bytes();
    let payload_bytes: u64 = c.manifest.frames.iter().map(|f| f.len).sum();
    let line = crate::report::PayloadReport {
        manifest_sha256: c.manifest_sha256.clone(),
        files: c.manifest.files(),
        bytes,
        payload_bytes,
        copy_secs: c.secs,
        copy_mb_s: crate::units::mb_per_s(bytes, c.secs),
        raw_read_mb_s: raw,
        copy_to_read_ratio: c.secs / (crate::units::mb(payload_bytes) / raw.max(1e-6)).max(1e-6),
        verified: digest == crate::payload::digest(&c.manifest.entries),
        tree_digest: digest,
    };
    if !line.verified {
        bail!(
            "the store read back from the pool (digest {}) is not the payload's (digest {})",
            line.tree_digest,
            crate::payload::digest(&c.manifest.entries)
        );
    }
    say!(
        "store verified on the pool: {} files; copy {:.1}s ({:.1} MB/s of store), plain read of the payload {:.1} MB/s, ratio {:.2}",
        line.files,
        line.copy_secs,
        line.copy_mb_s,
        line.raw_read_mb_s,
        line.copy_to_read_ratio
    );
    say!(
        "nodeflash-store: {}",
        serde_json::to_string(&line).context("cannot serialize the store report")?
    );
    Ok(line)
}

/// Where the store goes below the target root (the pools' altroot).
pub(super) const STORE_DIR: &str = "nix/store";
/// Where the boot medium is mounted.
const MEDIUM_DIR: &str = "/run/nodeflash/medium";

/// The store payload on the boot medium, opened and checked (length,
/// header, manifest and that it belongs to this image) before the disk is touched.
pub(super) struct Store {
    source: Source,
    payload: Payload<Box<dyn Read + Send>>,
    workers: usize,
}

/// Where the store payload is read from.
#[derive(Debug, Clone)]
pub(super) enum Source {
    /// The file on the mounted boot medium.
    File(PathBuf),
    /// A URL (`nodeflash.payload=` on the kernel command line, a network
    /// boot), read with range requests ([`crate::net::stream::RangeReader`]).
    Http(String),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Http(u) => write!(f, "{u}"),
        }
    }
}

/// The payload URL of the kernel command line, if any.
pub(super) fn payload_url() -> Option<String> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").ok()?;
    payload_url_of(&cmdline)
}

/// `nodeflash.payload=URL` of a kernel command line (the last one wins, as
/// the kernel does for its own parameters).
fn payload_url_of(cmdline: &str) -> Option<String> {
    crate::image::cmdline_values(cmdline, crate::image::PAYLOAD_URL_WORD)
        .rfind(|u| !u.is_empty())
        .map(str::to_string)
}

/// The stream policy, with `nodeflash.payload-stall=SECONDS` of the kernel
/// command line as its stall bound when given (the last one wins).
fn stream_policy_of(cmdline: &str) -> crate::net::stream::StreamPolicy {
    let mut policy = crate::net::stream::StreamPolicy::default();
    if let Some(secs) = crate::image::cmdline_values(cmdline, crate::image::PAYLOAD_STALL_WORD)
        .rev()
        .find_map(|s| s.parse::<u64>().ok())
    {
        policy.stall = Duration::from_secs(secs);
    }
    policy
}

/// The HTTP client and reader settings of a payload stream.
fn payload_stream(url: &str, range: (u64, u64, u64)) -> Result<crate::net::stream::RangeReader> {
    let cas = super::ca_certificates()?;
    let not_before = std::time::UNIX_EPOCH + Duration::from_secs(crate::image::NOT_BEFORE_UNIX);
    let client = crate::net::Client::new(&cas, true, not_before)?;
    crate::net::stream::RangeReader::new(
        client,
        url,
        range,
        stream_policy_of(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default()),
        |l| say!("{l}"),
    )
}

/// The store payload of a network boot: the network up, then the payload's
/// header and manifest read with range requests and checked as from the
/// stick (length, header, manifest, that it belongs to this image) before
/// the disk is touched. The frames are read later, by the pre-read and by
/// the copy, each with its own stream.
pub(super) fn open_store_http(
    profile: &Profile,
    info: &ImageInfo,
    url: &str,
    system: Option<&crate::image::NodeSystem>,
) -> Result<Option<Store>> {
    let Some(want) = &info.payload else {
        return Ok(None);
    };
    let lease = crate::net::up(&|l| say!("{l}")).with_context(|| {
        format!("no network, so the store payload {url} cannot be read; nothing was written")
    })?;
    say!(
        "store: payload over the network from {url} ({} bytes, to this node at {})",
        want.bytes,
        lease.describe()
    );
    let refused = "nothing was written. Check that `nodeflash serve` runs with this image";
    let total = want.bytes;
    let mut head = [0u8; crate::payload::HEADER_LEN];
    payload_stream(url, (0, head.len() as u64, total))?
        .read_exact(&mut head)
        .with_context(|| format!("cannot read the store payload's header from {url}; {refused}"))?;
    let header = crate::payload::Header::parse(&head)
        .with_context(|| format!("{url} is not this image's store payload; {refused}"))?;
    if header.total_len() != total {
        bail!(
            "the store payload at {url} says it is {} bytes instead of {total}; {refused}",
            header.total_len()
        );
    }
    let frames_at = crate::payload::HEADER_LEN as u64 + header.manifest_len;
    let manifest = payload_stream(url, (head.len() as u64, frames_at, total))?;
    let frames = payload_stream(url, (frames_at, total, total))?;
    let reader: Box<dyn Read + Send> =
        Box::new(std::io::Cursor::new(head).chain(manifest).chain(frames));
    let payload = Payload::open(reader).with_context(|| format!("{url}: {refused}"))?;
    finish_open(
        profile,
        payload,
        Source::Http(url.to_string()),
        system,
        want,
        refused,
    )
}

/// The store payload on the boot medium `boot` (a kernel name): mounted,
/// its file checked for length, header and manifest before the disk is
/// touched. `None` when the image has no payload; an error when the medium
/// is missing or the payload is not this image's.
pub(super) fn open_store(
    profile: &Profile,
    info: &ImageInfo,
    boot: Option<&str>,
    system: Option<&crate::image::NodeSystem>,
) -> Result<Option<Store>> {
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
    let reader: Box<dyn Read + Send> = Box::new(f);
    let payload = Payload::open(reader)
        .with_context(|| format!("{} on {}: {damaged}", want.path, dev.display()))?;
    say!("store: payload from the boot medium {}", dev.display());
    finish_open(profile, payload, Source::File(file), system, want, damaged)
}

/// The checks and settings common to both sources: the manifest is this
/// image's, the workers, this node's closure.
fn finish_open(
    profile: &Profile,
    mut payload: Payload<Box<dyn Read + Send>>,
    source: Source,
    system: Option<&crate::image::NodeSystem>,
    want: &crate::image::PayloadInfo,
    damaged: &str,
) -> Result<Option<Store>> {
    let len = want.bytes;
    if payload.manifest_sha256() != want.manifest_sha256 {
        bail!("the store payload {source} does not belong to this image; {damaged}");
    }
    let workers = profile.payload.workers.map_or_else(
        // At least two, so that one writes while another waits on the disk.
        || std::thread::available_parallelism().map_or(2, |n| n.get().max(2)),
        |w| w as usize,
    );
    say!(
        "store: {} files, {:.1} MiB in {} store paths ({:.1} MiB packed on {}), {workers} workers",
        payload.manifest.files(),
        crate::units::mib(payload.manifest.bytes()),
        payload.manifest.store_paths().len(),
        crate::units::mib(len),
        source
    );
    if let Some(system) = system {
        payload
            .keep_only(system.closure.iter().cloned().collect())
            .with_context(|| {
                format!(
                    "the payload {source} lacks part of {}'s closure; {damaged}",
                    system.toplevel
                )
            })?;
        let written = payload.written();
        say!(
            "store: this node's closure is {} files, {:.1} MiB in {} store paths",
            written.files(),
            crate::units::mib(written.bytes()),
            written.store_paths().len()
        );
    }
    Ok(Some(Store {
        source,
        payload,
        workers,
    }))
}

/// Reads the whole payload once, sequentially, and checks every frame
/// against its sha256 in the manifest ([`Payload::check_frames`]) before
/// the disk is touched. When the payload fits in the memory to spare, the
/// copy then reads it from the page cache; when it does not, the copy reads
/// the stick a second time, and checks every file again either way (so a
/// stick that fails between the two reads is still caught, after
/// partitioning). Errors name the damaged frame and its store paths.
pub(super) fn preread_store(store: &Store) -> Result<crate::payload::FramesChecked> {
    use std::io::{Seek, SeekFrom};
    let len = store.payload.header.total_len();
    let available = mem_available();
    say!(
        "store: checking every frame of the payload ({:.1} MiB) before the disk is touched",
        crate::units::mib(len)
    );
    let damaged = || match &store.source {
        Source::File(file) => format!(
            "the store payload {} on the stick is damaged; nothing was written to any disk. \
             Write the image to the stick again (use another stick if this happens again)",
            file.display()
        ),
        Source::Http(url) => format!(
            "the store payload {url} could not be read whole or is damaged; nothing was written \
             to any disk. Check the server (`nodeflash serve`) and the network, then boot again"
        ),
    };
    let f: Box<dyn Read + Send> = match &store.source {
        Source::File(file) => {
            let mut f =
                File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
            f.seek(SeekFrom::Start(store.payload.frames_offset()))
                .with_context(|| format!("cannot read {}", file.display()))?;
            Box::new(f)
        }
        Source::Http(url) => Box::new(payload_stream(
            url,
            (store.payload.frames_offset(), len, len),
        )?),
    };
    let counters = crate::payload::Counters::default();
    let frames_len = store.payload.header.frames_len;
    let checked = with_progress(
        &counters,
        |c| {
            let (_, _, read) = c.snapshot();
            format!(
                "store: checked {:.1}/{:.1} MiB of the payload",
                crate::units::mib(read),
                crate::units::mib(frames_len)
            )
        },
        || {
            store.payload.check_frames(
                std::io::BufReader::with_capacity(1 << 20, f),
                store.workers,
                &counters,
            )
        },
    )
    .with_context(damaged)?;
    let cached = match (&store.source, available) {
        (Source::Http(_), _) => {
            "the copy reads it from the server a second time, and checks every file again as it writes"
                .to_string()
        }
        (_, Some(a)) if len <= a / 2 => format!(
            "it fits in the memory to spare ({:.0} MiB available), so the copy reads it from the page cache",
            crate::units::mib(a)
        ),
        (_, Some(a)) => format!(
            "it is larger than the memory to spare ({:.0} MiB available): the copy reads the stick \
             a second time, and checks every file again as it writes",
            crate::units::mib(a)
        ),
        (_, None) => "the memory available is not known (no /proc/meminfo)".to_string(),
    };
    say!(
        "store: payload checked before the disk is touched: {} frames, {:.1} MiB in {:.1}s ({:.1} MB/s); {cached}",
        checked.frames,
        crate::units::mib(checked.bytes),
        checked.secs,
        crate::units::mb_per_s(checked.bytes, checked.secs)
    );
    Ok(checked)
}

/// `MemAvailable` of `/proc/meminfo`, in bytes.
fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Runs `f` while a thread prints `line(counters)` every 5 s.
fn with_progress<T>(
    counters: &crate::payload::Counters,
    line: impl Fn(&crate::payload::Counters) -> String + Sync + Send,
    f: impl FnOnce() -> T,
) -> T {
    Progress::bytes("store", None, Output::Log(crate::console::say))
        .lines(Duration::from_secs(5), |_, _| line(counters))
        .watch(|| 0, f)
}

/// Writes the store into the mounted datasets at `root`/nix/store, every
/// file checked against the manifest, with a plain progress line every few
/// seconds; then registers the closure with the installed Nix.
pub(super) fn copy_store(store: Store, root: &Path) -> Result<Copied> {
    let store_dir = root.join(STORE_DIR);
    let Store {
        source,
        payload,
        workers,
    } = store;
    // What is written: the whole payload, or this node's closure.
    let mut manifest = payload.written();
    if let Some(reg) = &manifest.registration {
        let keep = manifest
            .store_paths()
            .into_iter()
            .map(String::from)
            .collect();
        manifest.registration = Some(crate::payload::filter_registration(reg, &keep)?);
    }
    let manifest_sha256 = payload.manifest_sha256();
    // Progress counts every file read and checked, kept or not.
    let (total, files) = (payload.manifest.bytes(), payload.manifest.files() as u64);
    let counters = crate::payload::Counters::default();
    let t = Instant::now();
    let result = with_progress(
        &counters,
        |c| format!("store: {}", c.line(total, files, t.elapsed())),
        || payload.extract(Some(&store_dir), workers, &counters),
    );
    result.with_context(|| match &source {
        Source::File(_) => "the store was not copied completely, so the disk was not made bootable; if the payload is damaged, write the image to the stick again".to_string(),
        Source::Http(url) => format!("the store was not copied completely from {url}, so the disk was not made bootable; check the server and boot the node again"),
    })?;
    let secs = t.elapsed().as_secs_f64();
    // As Nix has it: sticky and group-writable.
    std::fs::set_permissions(
        &store_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o1775),
    )
    .with_context(|| format!("cannot set the mode of {}", store_dir.display()))?;
    say!(
        "store copied in {secs:.1}s: {}",
        counters.line(total, files, t.elapsed())
    );
    if let Some(reg) = &manifest.registration {
        register(&manifest, reg, root)?;
    }
    Ok(Copied {
        manifest,
        manifest_sha256,
        source,
        secs,
        preread_mb_s: 0.0,
    })
}

/// What [`copy_store`] copied.
pub(super) struct Copied {
    pub(super) manifest: crate::payload::Manifest,
    manifest_sha256: String,
    /// Where the payload was read from.
    pub(super) source: Source,
    secs: f64,
    /// The pre-read's speed, MB/s: over the network, the plain read.
    pub(super) preread_mb_s: f64,
}

/// Loads the closure's registration into the installed Nix database with
/// the store's own `nix-store` run in `root` (chroot), as `nixos-install` does.
fn register(manifest: &crate::payload::Manifest, registration: &str, root: &Path) -> Result<()> {
    let nix_store = manifest.entries.iter().find_map(|e| {
        let p = e.path();
        (p.ends_with("/bin/nix-store") && p.matches('/').count() == 2).then_some(p)
    });
    let Some(nix_store) = nix_store else {
        say!("store: no nix-store in the closure, so the registration is not loaded");
        return Ok(());
    };
    // The new root has no /etc/passwd yet (activation writes it), and Nix
    // asks who runs it (`getUserName`, src/libutil/util.cc): root, told.
    let nix = || {
        let mut c = Command::new(format!("/nix/store/{nix_store}"));
        c.env("USER", "root");
        c
    };
    crate::cmd::run_with_input(
        crate::cmd::in_root(&mut nix(), root).arg("--load-db"),
        registration.as_bytes(),
    )
    .context("cannot register the store paths with the installed Nix")?;
    say!(
        "store: registered {} store paths",
        manifest.store_paths().len()
    );
    // Nix's own view of what it was given: its database, and the files
    // against their NAR hashes.
    let run = |args: &[&str]| crate::cmd::run(crate::cmd::in_root(&mut nix(), root).args(args));
    // Without arguments: every path the database holds, in Nix's order
    // (by name, as the registration is), so equal means exactly these.
    let db = run(&["--dump-db"]).context("the installed Nix cannot list its database")?;
    run(&["--verify", "--check-contents"]).context(
        "the installed Nix finds the store invalid (`nix-store --verify --check-contents`)",
    )?;
    say!(
        "nodeflash-nixdb: {}",
        serde_json::json!({
            "paths": manifest.store_paths().len(),
            "dump_db_sha256": hex::encode(<sha2::Sha256 as sha2::Digest>::digest(db.as_bytes())),
            "same_as_registration": db == registration,
            "verify_check_contents": "ok",
        })
    );
    Ok(())
}

/// Reads the tree back from the freshly imported pool (after an export
/// dropped its caches) and checks it against the manifest: mounts just the
/// dataset that holds the store, read-only, on `root`. Returns the tree
/// digest of what was read ([`crate::payload::digest`]).
pub(super) fn check_store(
    profile: &Profile,
    manifest: &crate::payload::Manifest,
    root: &Path,
) -> Result<String> {
    let (dataset, mountpoint) =
        super::dataset_holding(profile, "/nix/store").context("no dataset holds /nix/store")?;
    let mut mounts = Mounts::default();
    mounts.zfs(&dataset, root, MsFlags::MS_RDONLY)?;
    let dir = root.join(
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
    mounts.unmount()?;
    result
}

/// MB/s of a plain sequential read of (at most 256 MiB of) `file`, page cache dropped.
pub(super) fn raw_read_speed(file: &Path) -> Result<f64> {
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
    Ok(crate::units::mb_per_s(n, t.elapsed().as_secs_f64()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_payload_url_is_read_from_the_kernel_command_line() {
        assert_eq!(super::payload_url_of("console=ttyS0 quiet"), None);
        assert_eq!(super::payload_url_of("nodeflash.payload= quiet"), None);
        assert_eq!(
            super::payload_url_of(
                "quiet nodeflash.payload=http://10.0.0.1:8080/p nodeflash.payload=http://h/q?mac=52:54:00:00:00:01 x"
            )
            .as_deref(),
            Some("http://h/q?mac=52:54:00:00:00:01")
        );
    }

    #[test]
    fn the_payload_stall_bound_is_read_from_the_kernel_command_line() {
        let default = crate::net::stream::StreamPolicy::default();
        assert_eq!(super::stream_policy_of("quiet"), default);
        assert_eq!(
            super::stream_policy_of("nodeflash.payload-stall=x"),
            default
        );
        let p = super::stream_policy_of("nodeflash.payload-stall=5 nodeflash.payload-stall=30");
        assert_eq!(p.stall, std::time::Duration::from_secs(30));
        assert_eq!(p.per_read, default.per_read);
    }
}

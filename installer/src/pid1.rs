//! PID 1 of the install image: sets up the early userspace, loads the kernel
//! modules the builder chose, finds the boot medium, prints what it sees, and
//! finishes as the profile says. It never panics out and never exits: every
//! error is printed with its full chain, then the failure policy applies.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::mount::{mount, MsFlags};

use crate::facts::Facts;
use crate::image::{ImageInfo, IMAGE_INFO_PATH, PROFILE_PATH};
use crate::profile::{OnFailure, OnSuccess, Profile};
use crate::say;

/// Seconds without a console line after which the kernel's blocked tasks
/// are printed: longer than any quiet phase of an install (progress lines
/// come every 5 s), shorter than the kernel's 120 s hung-task report and
/// the tests' VM timeouts.
const STALL_SECS: u64 = 60;

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
    guarded(&LOADED, |loaded| run(started, loaded)).apply()
}

/// The profile and the image's mode, once read: what a failure, a panic
/// included, needs to end as the profile says.
struct Loaded {
    profile: Profile,
    mode: crate::image::Mode,
}

/// Set by `run` as soon as the profile is read.
static LOADED: OnceLock<Loaded> = OnceLock::new();

/// Runs `body` and turns a panic in it into a failure like any other: it is
/// printed, the console is kept on the disk when there is a pool, and the
/// profile's `on-failure` applies if `body` got as far as reading the
/// profile into `loaded` (before that: halt, as for an unreadable profile).
fn guarded(
    loaded: &'static OnceLock<Loaded>,
    body: impl FnOnce(&'static OnceLock<Loaded>) -> Finish + std::panic::UnwindSafe,
) -> Finish {
    std::panic::catch_unwind(|| body(loaded)).unwrap_or_else(|_| {
        let e = anyhow::anyhow!("the installer panicked (see the message above)");
        // A second panic while saving the log must not skip the policy.
        std::panic::catch_unwind(|| fail(&e, loaded.get())).unwrap_or(Finish::Fail(
            loaded
                .get()
                .map_or(OnFailure::Halt, |l| l.profile.finish.on_failure),
        ))
    })
}

/// A failure: printed with its causes; in an install the console is saved
/// on the pool if there is one; then the profile's failure policy, or halt
/// when the profile could not be read.
fn fail(e: &anyhow::Error, loaded: Option<&Loaded>) -> Finish {
    print_failure(e);
    let Some(loaded) = loaded else {
        return Finish::Fail(OnFailure::Halt);
    };
    if loaded.mode == crate::image::Mode::Install {
        match crate::install::keep_failure_log(&loaded.profile) {
            Ok(Some(path)) => {
                say!("nodeflash: this console is saved on the disk as {path}; the pool is exported")
            }
            Ok(None) => {}
            Err(e) => say!("nodeflash: cannot save this console on the disk: {e:#}"),
        }
    }
    Finish::Fail(loaded.profile.finish.on_failure)
}

/// The failure and its causes on the console, and what to do.
fn print_failure(e: &anyhow::Error) {
    say!("nodeflash: FAILED: {e}");
    for cause in e.chain().skip(1) {
        say!("  caused by: {cause}");
    }
    say!("nodeflash: nothing more will be done; fix the cause above and boot the stick again");
}

/// What to do at the end: the profile's policies, or safe defaults when the
/// profile could not even be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Finish {
    Done(OnSuccess),
    Fail(OnFailure),
}

impl Finish {
    fn apply(self) -> ! {
        use nix::sys::reboot::{reboot, RebootMode};
        crate::console::stop_watching();
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

/// Everything but the final policy; prints the outcome. The profile, once
/// read, goes into `cell` for the failure path.
fn run(started: Instant, cell: &'static OnceLock<Loaded>) -> Finish {
    if let Err(e) = early_mounts() {
        crate::console::open();
        print_failure(&e);
        return Finish::Fail(OnFailure::Halt);
    }
    crate::console::open();
    crate::console::watch_for_stalls(std::time::Duration::from_secs(STALL_SECS), 3);
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
            print_failure(&e.context("the image is damaged"));
            return Finish::Fail(OnFailure::Halt);
        }
    };
    say!(
        "nodeflash {} · profile {} · image {} · kernel {} · OpenZFS {}",
        info.version,
        info.profile,
        info.short_id(),
        info.kernel(),
        info.openzfs()
    );
    let loaded = cell.get_or_init(|| Loaded {
        profile,
        mode: info.mode,
    });
    let profile = &loaded.profile;
    panic_if_asked();
    let result = match info.mode {
        crate::image::Mode::Install => crate::install::install(profile, &info, started),
        crate::image::Mode::Check => check(profile, &info),
    };
    match result {
        Ok(()) => {
            say!("nodeflash: done in {:.1}s", started.elapsed().as_secs_f64());
            Finish::Done(profile.finish.on_success)
        }
        Err(e) => fail(&e, Some(loaded)),
    }
}

/// The kernel command line word that makes the installer panic on purpose,
/// right after reading the profile: the QEMU test of the failure policy
/// (`faults::a_panic_ends_with_the_profiles_failure_policy`) needs a panic on
/// the node, and no input is known to cause one.
///
/// Why it may stay in every image: it does nothing unless the boot entry's
/// command line is edited, which needs the stick or the machine's console in
/// hand; it acts before any disk is opened; and what it leads to is the
/// failure path every other error takes (the message, then `on-failure`). It
/// is no more than pulling the stick out, said on the console.
pub const PANIC_WORD: &str = "nodeflash.fault=panic";

fn panic_if_asked() {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if cmdline.split_whitespace().any(|w| w == PANIC_WORD) {
        say!("nodeflash: {PANIC_WORD} is on the kernel command line: panicking on purpose");
        panic!("{PANIC_WORD} asked for a panic");
    }
}

/// Stage 1 of nodeflash's check system on an installed disk: import the
/// pool with the host ID the installer put on the command line, read what
/// the install left, print it as one JSON line.
fn check(profile: &Profile, info: &ImageInfo) -> Result<()> {
    load_modules(info);
    let cmdline = std::fs::read_to_string("/proc/cmdline").context("cannot read /proc/cmdline")?;
    let hostid = crate::image::cmdline_values(&cmdline, "nodeflash.hostid=")
        .next()
        .context("the kernel command line has no nodeflash.hostid=")?;
    let hostid = u32::from_str_radix(hostid, 16)
        .with_context(|| format!("nodeflash.hostid={hostid} is not 8 hex digits"))?;
    let datasets: Vec<String> = profile
        .pool
        .datasets
        .iter()
        .map(|d| d.name.get_ref().to_string())
        .collect();
    let legacy = |pool: &crate::profile::Pool| -> Vec<crate::datasets::Mounted> {
        crate::datasets::mounts(pool)
            .into_iter()
            .filter(|m| m.legacy)
            .collect()
    };
    let mut report = crate::check::run_check(
        &profile.pool.name.to_string(),
        hostid,
        &datasets,
        &legacy(&profile.pool),
        &|l| say!("{l}"),
    )?;
    let data_pools = profile
        .pools
        .iter()
        .map(|pool| {
            let expected: Vec<String> = pool
                .datasets
                .iter()
                .map(|d| d.name.get_ref().to_string())
                .chain(pool.zvols.iter().map(|z| z.name.get_ref().to_string()))
                .collect();
            let (_, props) = crate::zfs::reported_properties(pool);
            crate::check::check_data_pool(
                &pool.name.to_string(),
                &expected,
                &props.join(","),
                &legacy(pool),
                &|l| say!("{l}"),
            )
        })
        .collect();
    report.add_data_pools(data_pools);
    say!(
        "nodeflash-check: {}",
        serde_json::to_string(&report).context("cannot serialize the check report")?
    );
    Ok(())
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

/// Reads the machine's facts, with what is on each candidate disk, until the
/// profile's target disk is there or `timeout` passes.
pub(crate) fn wait_for_target(profile: &Profile, boot: Option<&str>, timeout: Duration) -> Facts {
    let deadline = Instant::now() + timeout;
    loop {
        let mut facts = Facts::read(Path::new("/sys"));
        for b in &mut facts.block_devices {
            b.boot_medium = boot == Some(b.name.as_str());
            if !b.boot_medium && !b.hidden && b.size_bytes > 0 {
                if let Err(e) = crate::disk::look_at(Path::new("/sys"), Path::new("/dev"), b) {
                    b.signatures = vec![format!("unreadable: {e:#}")];
                }
            }
        }
        // A recognised node may have disk rules of its own.
        let select = crate::nodes::identify(profile, &facts)
            .ok()
            .and_then(|id| id.disk_select)
            .unwrap_or_else(|| profile.disk.select.clone());
        // Every disk of the pool (`[disk] members` too) must have shown up.
        let waiting = crate::plan::selections(profile, &select).iter().any(
            |(_, sel)| matches!(crate::plan::select_disk(sel, &facts), Err(e) if e.matching == 0),
        );
        if !waiting || Instant::now() >= deadline {
            return facts;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

pub(crate) fn load_modules(info: &ImageInfo) {
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
            Err(e @ nix::errno::Errno::EKEYREJECTED) => say!(
                "warning: cannot load module {}: {e} ({})",
                path.display(),
                crate::secureboot::KEY_REJECTED_HINT
            ),
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
pub(crate) fn links_up() {
    let Ok(entries) = std::fs::read_dir("/sys/class/net") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Err(e) = crate::net::link::set_up(&name) {
            say!("warning: {e:#}");
        }
    }
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
pub(crate) fn wait_for_boot_medium(info: &ImageInfo, timeout: Duration) -> Option<String> {
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
pub(crate) fn settle_block_devices(max: Duration) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cell() -> &'static OnceLock<Loaded> {
        Box::leak(Box::new(OnceLock::new()))
    }

    fn loaded(on_failure: &str) -> Loaded {
        let src = format!(
            "name = \"t\"\n[disk]\nselect = {{ serial = \"S\" }}\n[finish]\non-failure = \"{on_failure}\"\n"
        );
        Loaded {
            profile: Profile::parse(&src, "t.toml").expect("profile"),
            // Check mode: the failure path does not look for a pool here.
            mode: crate::image::Mode::Check,
        }
    }

    /// The case: a panic after the profile was read ends with its
    /// `on-failure = "poweroff"`, not with a halt. This runs a real panic
    /// through the same `guarded` that `main` uses; only `Finish::apply`
    /// (the reboot(2) call) is left out.
    #[test]
    fn a_panic_ends_with_the_profiles_failure_policy() {
        let finish = guarded(cell(), |cell| {
            let _ = cell.set(loaded("poweroff"));
            panic!("test panic after the profile was read");
        });
        assert_eq!(finish, Finish::Fail(OnFailure::Poweroff));
        let finish = guarded(cell(), |cell| {
            let _ = cell.set(loaded("halt"));
            panic!("test panic after the profile was read");
        });
        assert_eq!(finish, Finish::Fail(OnFailure::Halt));
        // Before the profile is read there is no policy but halt.
        let finish = guarded(cell(), |_| panic!("test panic before the profile"));
        assert_eq!(finish, Finish::Fail(OnFailure::Halt));
        // Without a panic the body's own outcome stands.
        let finish = guarded(cell(), |_| Finish::Done(OnSuccess::Reboot));
        assert_eq!(finish, Finish::Done(OnSuccess::Reboot));
    }
}

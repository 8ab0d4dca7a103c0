//! PID 1 of the install image: sets up the early userspace, runs the install
//! (or, in a check image, the check system's stage 1), and finishes as the
//! profile says; the devices it waits for are [`crate::devices`]'s. It never
//! panics out and never exits: every error is printed with its full chain,
//! then the failure policy applies.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::mount::{mount, MsFlags};

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
    crate::devices::load_modules(info);
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

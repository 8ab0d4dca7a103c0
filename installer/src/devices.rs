//! The machine's devices as PID 1 brings them up, with no udev to say when
//! anything has appeared: the kernel modules the builder chose, the network
//! links, and the waits (each one [`wait_until`]) for the boot medium, for
//! the block devices to settle and for every disk the profile selects.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::facts::Facts;
use crate::image::ImageInfo;
use crate::profile::Profile;
use crate::say;
use crate::wait::wait_until;

/// Loads every module of `info.modules` (paths below
/// `/lib/modules/<kernel_release>`) with `finit_module(2)`, in order. A
/// module that is already there (EEXIST) counts as loaded; one for absent
/// hardware (ENODEV) is skipped; any other failure is a console warning, and
/// a rejected key names Secure Boot. Prints how many loaded and how long it
/// took.
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

/// Brings every network interface up so that its carrier can be read; a
/// failure is a console warning.
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

/// The kernel names of the whole disks (`/sys/block`), sorted.
fn whole_disks() -> Vec<String> {
    crate::facts::sorted_entries(Path::new("/sys/block"))
}

/// Reads the ISO 9660 primary volume descriptor of a device (sector 16 of
/// 2048 bytes, ECMA-119 8.4) and returns its volume set identifier (bytes
/// 190..318); None when the device cannot be read or holds no ISO 9660.
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

/// Waits at most `timeout`, looking every 200 ms, until a whole disk carries
/// this image's ISO volume set ID; returns its kernel name (`sda`), or None
/// when none has by then.
pub(crate) fn wait_for_boot_medium(info: &ImageInfo, timeout: Duration) -> Option<String> {
    let want = info.volume_set_id();
    let found = wait_until(timeout, Duration::from_millis(200), || {
        whole_disks().into_iter().find(|name| {
            iso_volume_set(&Path::new("/dev").join(name)).as_deref() == Some(want.as_str())
        })
    });
    if let Some(name) = &found {
        say!("boot medium: /dev/{name}");
    }
    found
}

/// Waits at most `max` until the set of whole disks has not changed for
/// half a second, so that late-probing disks are in the inventory.
pub(crate) fn settle_block_devices(max: Duration) {
    let mut last = whole_disks();
    let mut stable_since = Instant::now();
    wait_until(max, Duration::from_millis(100), || {
        let now = whole_disks();
        if now != last {
            last = now;
            stable_since = Instant::now();
        }
        (stable_since.elapsed() >= Duration::from_millis(500)).then_some(())
    });
}

/// The machine's facts (`/sys`), with what is on each candidate disk: every
/// whole disk but the boot medium (`boot`, a kernel name) and hidden or
/// empty ones is looked at ([`crate::disk::look_at`]); one that cannot be
/// read says so in its signatures.
fn inventory(boot: Option<&str>) -> Facts {
    let mut facts = Facts::read(Path::new("/sys"));
    for b in &mut facts.block_devices {
        b.boot_medium = boot == Some(b.name.as_str());
        if !b.boot_medium && !b.hidden && b.size_bytes > 0 {
            if let Err(e) = crate::disk::look_at(Path::new("/sys"), Path::new("/dev"), b) {
                b.signatures = vec![format!("unreadable: {e:#}")];
            }
        }
    }
    facts
}

/// Reads the machine's [`inventory`] every 500 ms until every disk the
/// profile selects (`[disk] select` and `members`, or the matching
/// `[[nodes]]` entry's rules) matches at least one disk, or `timeout`
/// passes; returns the last inventory either way (the plan then says what
/// is missing).
pub(crate) fn wait_for_target(profile: &Profile, boot: Option<&str>, timeout: Duration) -> Facts {
    let mut last = None;
    wait_until(timeout, Duration::from_millis(500), || {
        let facts = inventory(boot);
        // A recognised node may have disk rules of its own.
        let select = crate::nodes::identify(profile, &facts)
            .ok()
            .and_then(|id| id.disk_select)
            .unwrap_or_else(|| profile.disk.select.clone());
        let waiting = crate::plan::selections(profile, &select).iter().any(
            |(_, sel)| matches!(crate::plan::select_disk(sel, &facts), Err(e) if e.matching == 0),
        );
        last = Some(facts);
        (!waiting).then_some(())
    });
    last.unwrap_or_else(|| inventory(boot))
}

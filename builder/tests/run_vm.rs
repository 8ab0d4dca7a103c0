//! `nodeflash run-vm` boots the built `qemu` image: the stick installs the
//! disk the profile's rules accept and powers off, then the disk boots
//! alone; README's `alrest` image on a disk it refuses: the failed install
//! is reported and the disk is not booted; and README's step 3 as written.
//! Needs the images
//! `cargo xtask test` builds (NODEFLASH_TEST_IMAGES).

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Runs `nodeflash run-vm` with `args` (after `--profiles-dir`), stdin
/// closed; its exit status (none when it did not finish in 900 s), stderr
/// (the notes) and stdout (the console and the verdict line).
fn run_vm(
    profiles: &std::ffi::OsStr,
    args: &[&std::ffi::OsStr],
) -> (Option<ExitStatus>, String, String) {
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_nodeflash"))
        .arg("--profiles-dir")
        .arg(profiles)
        .arg("run-vm")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nodeflash runs");
    // Read both pipes beside the wait, so that neither fills up.
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        // The firmware prints bytes that are not UTF-8.
        let mut b = Vec::new();
        let _ = stdout.read_to_end(&mut b);
        String::from_utf8_lossy(&b).into_owned()
    });
    let err = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = stderr.read_to_end(&mut b);
        String::from_utf8_lossy(&b).into_owned()
    });
    let deadline = Instant::now() + Duration::from_secs(900);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let console = out.join().expect("stdout reader").replace('\r', "");
    let notes = err.join().expect("stderr reader");
    eprintln!(
        "run-vm took {:.1}s:\n{notes}\n{console}",
        started.elapsed().as_secs_f64()
    );
    (status, notes, console)
}

/// The test images and profiles, or none outside `cargo xtask test`.
fn env() -> Option<(PathBuf, std::ffi::OsString)> {
    match (
        std::env::var_os("NODEFLASH_TEST_IMAGES"),
        std::env::var_os("NODEFLASH_PROFILES"),
    ) {
        (Some(images), Some(profiles)) => Some((PathBuf::from(images), profiles)),
        _ => {
            eprintln!("skipped: NODEFLASH_TEST_IMAGES is not set (`cargo xtask test` sets it)");
            None
        }
    }
}

#[test]
fn run_vm_installs_then_boots_the_disk() {
    let Some((images, profiles)) = env() else {
        return;
    };
    let iso = images.join("qemu.iso");
    let t = tempfile::tempdir().expect("tempdir");
    let disk = t.path().join("node.img");
    let (status, notes, console) = run_vm(
        &profiles,
        &[
            "--profile".as_ref(),
            "qemu".as_ref(),
            "--cpus".as_ref(),
            "1".as_ref(),
            "--iso".as_ref(),
            iso.as_os_str(),
            "--disk".as_ref(),
            disk.as_os_str(),
        ],
    );
    let all = format!("{notes}\n{console}");
    let status = status.unwrap_or_else(|| panic!("run-vm did not finish in 900s:\n{all}"));
    assert!(status.success(), "run-vm failed ({status}):\n{all}");
    // The disk follows the qemu profile's rules: serial NFTEST0001, at most 8 GiB.
    assert!(
        notes.contains("new sparse")
            && notes.contains("of 8.0 GiB")
            && notes.contains("NFTEST0001"),
        "{notes}"
    );
    assert_eq!(
        std::fs::metadata(&disk).expect("--disk is kept").len(),
        8 << 30
    );
    // The stick's install, on the terminal (stdout) …
    for line in [
        "nodeflash: done in",
        "disk: nvme0n1 size=8.0 GiB (8589934592 bytes) lbs=512 bus=nvme model=\"QEMU NVMe Ctrl\" serial=\"NFTEST0001\"",
        "boot loader: systemd-boot",
        "nodeflash: powering off",
    ] {
        assert!(console.contains(line), "no {line:?} on the console:\n{all}");
    }
    // … then the installed disk alone: the check system reports on its pool.
    let check = console
        .lines()
        .find_map(|l| l.strip_prefix("nodeflash-check: "))
        .unwrap_or_else(|| panic!("the disk boot printed no check line:\n{all}"));
    let check: serde_json::Value = serde_json::from_str(check).expect("check JSON");
    assert_eq!(check["ok"], true, "{check:#}");
    assert!(
        console.find("nodeflash: done in") < console.find("nodeflash-check: "),
        "the install comes first"
    );
    // One verdict line, at the end.
    assert_eq!(
        console.lines().last(),
        Some("run-vm: the install succeeded; the disk booted and its check system reports ok"),
        "{all}"
    );
}

/// README's Alrest image on a disk its rules refuse (8 GiB, not 900 GB to
/// 1100 GB): the install fails before writing anything and the profile
/// halts on failure. run-vm stops the halted VM, does not boot the disk,
/// prints a FAILED verdict and exits with status 1.
#[test]
fn run_vm_stops_a_failed_install_and_does_not_boot_the_disk() {
    let Some((images, profiles)) = env() else {
        return;
    };
    let iso = images.join("alrest.iso");
    let (status, notes, console) = run_vm(
        &profiles,
        &[
            "--iso".as_ref(),
            iso.as_os_str(),
            "--disk-size".as_ref(),
            "8GiB".as_ref(),
            "--cpus".as_ref(),
            "1".as_ref(),
        ],
    );
    let all = format!("{notes}\n{console}");
    let status = status.unwrap_or_else(|| {
        panic!("run-vm did not finish in 900s (the halted VM was not stopped):\n{all}")
    });
    assert_eq!(status.code(), Some(1), "{all}");
    for line in [
        "nodeflash: FAILED: no disk matches the profile's [disk] select rules",
        "nodeflash: halted; the machine can be switched off",
    ] {
        assert!(console.contains(line), "no {line:?} on the console:\n{all}");
    }
    assert!(notes.contains("the guest halted: stopping the VM"), "{all}");
    // Only the stick was booted.
    assert!(notes.contains("as a USB stick"), "{all}");
    assert!(
        !notes.contains("booting the disk"),
        "the disk was booted:\n{all}"
    );
    let last = console.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(
            "run-vm: the install FAILED: no disk matches the profile's [disk] select rules"
        ) && last.ends_with("; the disks here (above); the disk was not booted"),
        "the last line is not the verdict: {last:?}\n{all}"
    );
    assert_eq!(console.matches("run-vm: ").count(), 1, "{all}");
}

/// README's step 3 as written, `nodeflash run-vm --iso
/// target/nodeflash/alrest.iso --disk-size 1TB`: the install succeeds, the
/// disk is not booted (Alrest has no [boot]), and the verdict is the line
/// README shows.
#[test]
fn readme_step_3_installs_alrest_and_says_the_disk_does_not_boot() {
    let Some((images, profiles)) = env() else {
        return;
    };
    let readme = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"),
    )
    .expect("README.md");
    assert!(
        readme.contains("nodeflash run-vm --iso target/nodeflash/alrest.iso --disk-size 1TB\n"),
        "README's step 3 command changed"
    );
    let want = "run-vm: the install succeeded; the disk was not booted: \
                the install wrote no boot loader (the profile has no [boot])";
    assert!(
        readme.contains(&format!("\n{want}\n")),
        "README does not show {want:?}"
    );
    let iso = images.join("alrest.iso");
    let (status, notes, console) = run_vm(
        &profiles,
        &[
            "--iso".as_ref(),
            iso.as_os_str(),
            "--disk-size".as_ref(),
            "1TB".as_ref(),
            "--cpus".as_ref(),
            "1".as_ref(),
        ],
    );
    let all = format!("{notes}\n{console}");
    let status = status.unwrap_or_else(|| panic!("run-vm did not finish in 900s:\n{all}"));
    assert!(status.success(), "run-vm failed ({status}):\n{all}");
    assert!(console.contains("nodeflash: done in"), "{all}");
    assert!(
        console.contains("warning: no SSH keys: nobody can log in to this node over SSH"),
        "{all}"
    );
    assert!(
        !notes.contains("booting the disk"),
        "the disk was booted:\n{all}"
    );
    assert_eq!(console.lines().last(), Some(want), "{all}");
}

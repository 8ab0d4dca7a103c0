//! `nodeflash run-vm` boots the built `qemu` image: the stick installs the
//! disk the profile's rules accept and powers off, then the disk boots
//! alone. Needs the images `cargo xtask test` builds (NODEFLASH_TEST_IMAGES).

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn run_vm_installs_then_boots_the_disk() {
    let (Some(images), Some(profiles)) = (
        std::env::var_os("NODEFLASH_TEST_IMAGES"),
        std::env::var_os("NODEFLASH_PROFILES"),
    ) else {
        eprintln!("skipped: NODEFLASH_TEST_IMAGES is not set (`cargo xtask test` sets it)");
        return;
    };
    let iso = PathBuf::from(images).join("qemu.iso");
    let t = tempfile::tempdir().expect("tempdir");
    let disk = t.path().join("node.img");
    let mut child = Command::new(env!("CARGO_BIN_EXE_nodeflash"))
        .arg("--profiles-dir")
        .arg(&profiles)
        .args(["run-vm", "--profile", "qemu", "--cpus", "1", "--iso"])
        .arg(&iso)
        .arg("--disk")
        .arg(&disk)
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
        // The firmware prints bytes that are not UTF-8.
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
}

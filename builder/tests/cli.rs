//! The `nodeflash` command line on the repository's profiles.

use std::path::Path;
use std::process::Command;

use nodeflash_installer::profile::{HostId, Profile};

fn profiles_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiles")
}

fn nodeflash(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_nodeflash"))
        .arg("--profiles-dir")
        .arg(profiles_dir())
        .args(args)
        .output()
        .expect("nodeflash runs")
}

#[test]
fn repository_profiles_are_valid() {
    let out = nodeflash(&["profile", "check"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("alrest.toml (alrest)") && stdout.contains("qemu.toml (qemu)"),
        "{stdout}"
    );
}

#[test]
fn alrest_is_the_seed_cluster() {
    let p = Profile::load(&profiles_dir().join("alrest.toml")).expect("alrest parses");
    let nodes: Vec<(String, HostId)> = p
        .nodes
        .iter()
        .map(|n| (n.name.get_ref().to_string(), n.hostid))
        .collect();
    assert_eq!(
        nodes,
        [
            ("kos-mos".to_string(), HostId::Fixed(0x472479d4)),
            ("logos".to_string(), HostId::Fixed(0xaeace675)),
            ("ontos".to_string(), HostId::Fixed(0x07602ecc)),
            ("pneuma".to_string(), HostId::Fixed(0x34fbd94b)),
        ]
    );
    let datasets: Vec<String> = p
        .pool
        .datasets
        .iter()
        .map(|d| d.name.get_ref().to_string())
        .collect();
    assert_eq!(
        datasets,
        [
            "local",
            "local/nix",
            "local/vms",
            "safe",
            "safe/home",
            "safe/root",
            "safe/vms"
        ]
    );
    assert_eq!(
        p.pool.root_options.get("compression").map(String::as_str),
        Some("zstd")
    );
    // As shipped, nobody's keys: README has the reader put their own user
    // in first, and the build warns until they do (no stranger gets root).
    assert!(p.ssh.github_users.is_empty(), "{:?}", p.ssh.github_users);
    assert!(p.ssh.keys.is_empty() && p.nodes.iter().all(|n| n.keys.is_empty()));
}

#[test]
fn show_prints_the_resolved_profile() {
    let out = nodeflash(&["profile", "show", "qemu"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    // Defaults are filled in and the output is itself a valid profile.
    assert!(
        text.contains("key-url = \"https://github.com/{user}.keys\""),
        "{text}"
    );
    Profile::parse(&text, "shown").expect("shown profile parses");
}

#[test]
fn bad_profile_names_file_line_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "name = \"bad\"\n[disk]\nselect = { serial = \"X\" }\nesp-size = \"lots\"\n[pool]\n",
    )
    .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_nodeflash"))
        .args(["profile", "show"])
        .arg(&bad)
        .output()
        .expect("nodeflash runs");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{}:4:12: `disk.esp-size`: invalid size `lots`",
            bad.display()
        )),
        "{stderr}"
    );
}

#[test]
fn plan_from_captured_facts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let facts = dir.path().join("facts.json");
    // A node of the alrest cluster: the boot stick and one 1 TB NVMe drive.
    std::fs::write(
        &facts,
        r#"{"dmi":{"sys_vendor":null,"product_name":null,"product_serial":null,"product_uuid":null},
            "block_devices":[
              {"name":"nvme0n1","size_bytes":1000204886016,"logical_block_size":512,"model":"WD Blue SN550 1TB",
               "serial":"21045X800123","wwn":null,"bus":"nvme","removable":false,"read_only":false},
              {"name":"sda","size_bytes":15728640000,"logical_block_size":512,"model":"Flash Disk",
               "serial":null,"wwn":null,"bus":"usb","removable":true,"read_only":false,"boot_medium":true}],
            "net":[]}"#,
    )
    .expect("write facts");
    let out = nodeflash(&[
        "plan",
        "--profile",
        "alrest",
        "--machine",
        facts.to_str().expect("utf-8 path"),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("node: install (no node of the profile matches: generic node)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("plan: install on nvme0n1 (931.5 GiB"),
        "{stdout}"
    );
    assert!(
        stdout.contains("1 ESP") && stdout.contains("2 swap") && stdout.contains("3 rpool"),
        "{stdout}"
    );
    assert!(stdout.contains("(32.0 GiB)"), "{stdout}");
    // The facts record nothing of the disk's contents: no claim that it is empty.
    assert!(!stdout.contains("is empty"), "{stdout}");
    assert!(
        stdout.contains("plan: what the disk holds is not known"),
        "{stdout}"
    );
    // What the install does besides partitioning, as disko's dry run shows it.
    for line in [
        // derived from the disk serial (no DMI UUID in these facts)
        "host id (networking.hostId): ",
        "pool: rpool on /dev/nvme0n1p3, ashift=12 autotrim=on; root dataset acltype=posixacl",
        "datasets: rpool/local, rpool/local/nix at /nix, rpool/local/vms, rpool/safe, \
         rpool/safe/home at /home, rpool/safe/root at /, rpool/safe/vms\n",
        "root SSH: nobody (no [ssh] github-users or keys): no one can log in over SSH\n",
        "payload: none (the profile has no [payload])\n",
        "boot: nothing: the disk will not boot, because the profile has no [boot]",
    ] {
        assert!(stdout.contains(line), "no {line:?} in\n{stdout}");
    }
    let hostid = nodeflash_installer::zfs::derive_hostid("disk-serial:21045X800123");
    assert!(
        stdout.contains(&format!(
            "host id (networking.hostId): {hostid:08x}, derived from the disk serial: \
             these facts have no DMI product UUID"
        )),
        "{stdout}"
    );
    // With the disk's contents captured (facts as root), a disk that holds
    // something is refused as the stick would refuse it.
    let text = std::fs::read_to_string(&facts).expect("facts").replacen(
        r#""removable":false,"read_only":false}"#,
        r#""removable":false,"read_only":false,"contents_read":true,"signatures":["GPT partition table"]}"#,
        1,
    );
    std::fs::write(&facts, text).expect("write facts");
    let out = nodeflash(&[
        "plan",
        "--profile",
        "alrest",
        "--machine",
        facts.to_str().expect("utf-8 path"),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("disk nvme0n1 is not empty (GPT partition table); nothing was written"),
        "{stderr}"
    );
}

/// The stick prints a machine's facts as a `nodeflash-facts: {…}` console
/// line; `plan --machine` takes a log holding it as it is.
#[test]
fn plan_takes_the_sticks_console_line_as_printed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("console.log");
    std::fs::write(
        &log,
        r#"nodeflash 0.1.0 · profile alrest · image 0123456789ab
nodeflash-facts: {"dmi":{"sys_vendor":null,"product_name":null,"product_serial":null,"product_uuid":null},"block_devices":[{"name":"nvme0n1","size_bytes":1000204886016,"logical_block_size":512,"model":"WD Blue SN550 1TB","serial":"21045X800123","wwn":null,"bus":"nvme","removable":false,"read_only":false}],"net":[]}
plan: install on nvme0n1
"#,
    )
    .expect("write the log");
    let out = nodeflash(&[
        "plan",
        "--profile",
        "alrest",
        "--machine",
        log.to_str().expect("utf-8 path"),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("plan: install on nvme0n1 (931.5 GiB"),
        "{stdout}"
    );
}

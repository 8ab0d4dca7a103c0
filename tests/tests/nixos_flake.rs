//! One stick for a NixOS cluster, in QEMU: a `flake` profile whose nodes'
//! systems real Nix builds from the stand-in flake (tests/fixtures/flake),
//! packed once. The same image installs node alpha and node beta, each
//! recognised by its SMBIOS serial; each disk then boots its own system and
//! holds its own closure only, registered in Nix's database as the build
//! host has it and checked by Nix (`nix-store --verify --check-contents`,
//! run on the node by the Nix the closure holds: Debian's nix-bin).

use std::collections::BTreeSet;
use std::process::Command;

use nodeflash_installer::payload::{self, Payload};
use nodeflash_installer::units::mib;
use nodeflash_tests::flake::{nix_store, standin_flake_with};
use nodeflash_tests::{
    assert_console, boot_installed, boot_to_poweroff, build_variant, console_json,
    extract_from_iso, images_dir, printed_hostid, Boot, DiskImage, Nvme, VmConfig,
};

/// The `qemu` profile with a flake for its nodes' systems and beta matched
/// by its SMBIOS serial.
fn edit(text: &str) -> String {
    text.replace(
        "synthetic = { files = 300, bytes = \"8MiB\", seed = 1 }",
        // Packed fast: the closures hold Nix's 70 MiB of libraries.
        "flake = \"flake\"\nlevel = 3",
    )
    .replace("system = \"check\"", "system = \"nixos\"")
    .replace(
        "match = { mac = \"52:54:00:00:be:7a\" }",
        "match = { dmi-serial = \"NF-BETA\" }",
    )
}

/// The nodes the test installs: name, SMBIOS serial, host ID.
const NODES: [(&str, &str, &str); 2] = [
    ("alpha", "NF-ALPHA", "0a1b2c3d"),
    ("beta", "NF-BETA", "0b2c3d4e"),
];

/// A file on the ESP of an installed disk (partition 1, at 1 MiB), by mtools.
fn esp_text(disk: &Nvme, path: &str) -> String {
    let out = Command::new("mtype")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(format!("{}@@1M", disk.image.display()))
        .arg(path)
        .output()
        .expect("mtype runs (package mtools)");
    assert!(
        out.status.success(),
        "{path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).replace('\r', "")
}

fn sha256_hex(text: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(text.as_bytes()))
}

#[test]
fn one_stick_installs_each_node_its_own_nix_built_system() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base =
        std::fs::read_to_string(nodeflash_tests::env_path("NODEFLASH_PROFILES").join("qemu.toml"))
            .expect("qemu.toml");
    let text = edit(&base);
    let draft = dir.path().join("draft.toml");
    std::fs::write(&draft, &text).expect("write");
    let profile = nodeflash_installer::profile::Profile::load(&draft).expect("the variant loads");
    // Systems that boot (the check system's kernel and initrd) and hold a Nix.
    let flake = standin_flake_with(
        &dir.path().join("flake"),
        &profile,
        Some(&images_dir().join("qemu.iso")),
    );
    let iso = build_variant(dir.path(), "qemu", edit, &[]);

    // What Nix built, on the build host.
    let attrs: Vec<String> = profile
        .nodes
        .iter()
        .map(|n| nodeflash_installer::profile::default_system_attr(&n.name.get_ref().0))
        .collect();
    let tops = nodeflash_builder::nix::build(&flake.display().to_string(), &attrs)
        .expect("nix builds the nodes' systems");
    let closure = |top: &str| -> BTreeSet<String> {
        nix_store(&["-qR", top])
            .lines()
            .map(|l| l.trim_start_matches("/nix/store/").to_string())
            .collect()
    };

    // The payload: every node's closure, each path once.
    let packed = dir.path().join("store.nfp");
    extract_from_iso(&iso, "/nodeflash/store.nfp", &packed);
    let open = || Payload::open(std::fs::File::open(&packed).expect("payload")).expect("opens");
    let all = open().manifest;
    let union: BTreeSet<String> = tops.iter().flat_map(|t| closure(t)).collect();
    assert_eq!(
        all.store_paths(),
        union.iter().map(String::as_str).collect::<Vec<_>>()
    );
    eprintln!(
        "payload: {} nodes {:.2} MiB of store, {:.2} MiB packed",
        tops.len(),
        mib(all.bytes()),
        mib(std::fs::metadata(&packed).expect("payload").len())
    );

    let mut times = Vec::new();
    for (name, serial, hostid) in NODES {
        let i = profile
            .nodes
            .iter()
            .position(|n| n.name.get_ref().0 == name)
            .expect("the node");
        let top = &tops[i];
        let toplevel = top.trim_start_matches("/nix/store/");
        let mine = closure(top);
        let others: Vec<&str> = tops
            .iter()
            .filter(|t| *t != top)
            .map(|t| t.trim_start_matches("/nix/store/"))
            .collect();
        for other in &others {
            assert!(!mine.contains(*other), "{name}'s closure holds {other}");
        }
        let mut node_payload = open();
        node_payload
            .keep_only(mine.clone())
            .expect("in the payload");
        let written = node_payload.written();
        eprintln!(
            "payload: {name} alone {:.2} MiB of store in {} paths",
            mib(written.bytes()),
            mine.len()
        );

        // The install, from the one stick.
        let disk =
            Nvme::create(dir.path(), &format!("{name}.img"), 2 << 30, "NFTEST0001").expect("disk");
        let mut cfg = VmConfig::new(iso.clone(), Boot::UsbStick);
        cfg.nvme.push(disk.clone());
        cfg.smbios_serial = Some(serial.to_string());
        let console = boot_to_poweroff(&cfg);
        assert_console(
            &console,
            &format!("node: {name} (matched dmi-serial={serial})"),
        );
        assert_console(&console, &format!("system: {toplevel} ("));
        assert_console(
            &console,
            &format!("standin: installed the boot entry of {name} {hostid}"),
        );
        assert_console(&console, "nodeflash: done in");
        // Nix's database on the disk, as the installed Nix lists it, is
        // the build host's registration of this closure, and Nix finds
        // every file as registered.
        let mut full: Vec<String> = mine.iter().map(|p| format!("/nix/store/{p}")).collect();
        full.sort();
        let mut args = vec!["--dump-db"];
        args.extend(full.iter().map(String::as_str));
        let host_db = nix_store(&args);
        let nixdb = console_json(&console, "nodeflash-nixdb: ");
        assert_eq!(nixdb["paths"], mine.len(), "{nixdb}");
        assert_eq!(nixdb["same_as_registration"], true, "{nixdb}");
        assert_eq!(nixdb["dump_db_sha256"], sha256_hex(&host_db), "{nixdb}");
        assert_eq!(nixdb["verify_check_contents"], "ok");

        // Its own system's boot entry.
        let entry = esp_text(&disk, "::/loader/entries/nixos-generation-1.conf");
        assert!(
            entry.contains(&format!("title NixOS stand-in {name}\n"))
                && entry.contains(&format!("nodeflash.hostid={hostid}\n")),
            "{entry}"
        );

        // The disk boots on its own, with the host ID its system baked in.
        let check = boot_installed(&disk);
        assert_eq!(check["problems"], serde_json::json!([]), "{check:#}");
        assert_eq!(check["hostname"], name);
        assert_eq!(check["hostid"], hostid);
        assert_eq!(check["hostid_live"], hostid);
        assert_eq!(check["hostid_etc"], hostid);
        assert_eq!(check["nixos_system"], top.as_str());
        // The store is exactly this node's closure.
        assert_eq!(check["store"]["verified"], true, "{check:#}");
        assert_eq!(check["store"]["digest"], payload::digest(&written.entries));
        assert_ne!(check["store"]["digest"], payload::digest(&all.entries));
        times.push((
            name,
            check["install_total_secs"].clone(),
            check["install_phases"].clone(),
        ));
    }
    for (name, total, phases) in times {
        eprintln!("install time: {name} {total} s; phases {phases}");
    }

    // A machine the flake built no system for is refused before the disk
    // is touched, with the [[nodes]] entry that would install it.
    let disk = Nvme::create(dir.path(), "other.img", 2 << 30, "NFTEST0001").expect("disk");
    let before = disk.sha256();
    let mut cfg = VmConfig::new(iso.clone(), Boot::UsbStick);
    cfg.nvme.push(disk.clone());
    cfg.smbios_serial = Some("NF-OTHER".into());
    let console = boot_to_poweroff(&cfg);
    let hostid = printed_hostid(&console);
    assert_console(
        &console,
        "nodeflash: FAILED: this machine (SMBIOS serial \"NF-OTHER\") matches no [[nodes]] entry",
    );
    assert_console(
        &console,
        &format!("hostid = \"{hostid}\", match = {{ dmi-serial = \"NF-OTHER\" }}"),
    );
    assert!(!console.contains("nodeflash: done"));
    assert_eq!(disk.sha256(), before, "the disk is untouched");
}

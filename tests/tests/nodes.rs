//! One image for the whole cluster: the `qemu` profile's nodes recognised by
//! SMBIOS serial and by MAC, the generic fallback, and the refusal when two
//! nodes match.

use nodeflash_tests::{
    assert_console, boot_to_poweroff, images_dir, Boot, DiskImage, Nvme, VmConfig,
};

fn boot(serial: Option<&str>, mac: Option<&str>, disk: &Nvme) -> String {
    let mut cfg = VmConfig::new(images_dir().join("qemu.iso"), Boot::UsbStick);
    cfg.nvme.push(disk.clone());
    cfg.smbios_serial = serial.map(str::to_string);
    cfg.mac = mac.map(str::to_string);
    boot_to_poweroff(&cfg)
}

fn disk(dir: &tempfile::TempDir) -> Nvme {
    Nvme::create(dir.path(), "nvme.img", 2 << 30, "NFTEST0001").expect("disk")
}

/// The node's host ID is in the new pool's label, not just on the console.
fn assert_installed_as(console: &str, hostname: &str, hostid: &str) {
    assert_console(console, "nodeflash: done in");
    assert_console(
        console,
        &format!("networking.hostName = \"{hostname}\"; networking.hostId = \"{hostid}\";"),
    );
    assert_console(
        console,
        &format!("it imports without -f (pool host id {hostid})"),
    );
}

#[test]
fn recognises_a_node_by_smbios_serial() {
    let dir = tempfile::tempdir().expect("tempdir");
    let console = boot(Some("NF-ALPHA"), None, &disk(&dir));
    assert_console(&console, "node: alpha (matched dmi-serial=NF-ALPHA)");
    assert_installed_as(&console, "alpha", "0a1b2c3d");
    // alpha's own key beside the profile's: two keys; other nodes get one.
    assert_console(&console, "wrote /root/.ssh/authorized_keys (2 keys)");
}

#[test]
fn recognises_a_node_by_mac() {
    let dir = tempfile::tempdir().expect("tempdir");
    let console = boot(None, Some("52:54:00:00:be:7a"), &disk(&dir));
    assert_console(&console, "node: beta (matched mac=52:54:00:00:be:7a)");
    assert_installed_as(&console, "beta", "0b2c3d4e");
    assert_console(&console, "wrote /root/.ssh/authorized_keys (1 keys)");
}

#[test]
fn an_unknown_machine_becomes_the_generic_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let console = boot(Some("NF-OTHER"), None, &disk(&dir));
    assert_console(
        &console,
        "node: qemu-node (no node of the profile matches: generic node)",
    );
    assert_console(&console, "networking.hostName = \"qemu-node\";");
}

#[test]
fn two_matching_nodes_are_refused_and_the_disk_is_unchanged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = disk(&dir);
    let before = d.sha256();
    let console = boot(Some("NF-ALPHA"), Some("52:54:00:00:be:7a"), &d);
    assert_console(
        &console,
        "2 nodes of the profile match this machine, refusing to guess; nothing was written",
    );
    assert_console(&console, "alpha: dmi-serial=NF-ALPHA");
    assert_console(&console, "beta: mac=52:54:00:00:be:7a");
    assert_eq!(d.sha256(), before, "the disk was changed");
}

#[test]
fn recognises_a_node_by_disk_serial_and_uses_its_own_disk_rules() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The profile's [disk] wants NFTEST0001; node gamma brings its own rules.
    let d = Nvme::create(dir.path(), "nvme.img", 2 << 30, "NFTEST0003").expect("disk");
    let console = boot(None, None, &d);
    assert_console(&console, "node: gamma (matched disk-serial=NFTEST0003)");
    assert_console(
        &console,
        "plan: install on nvme0n1 (2.0 GiB, model \"QEMU NVMe Ctrl\", serial \"NFTEST0003\"",
    );
    assert_installed_as(&console, "gamma", "0c3d4e5f");
}

/// README's way to read a machine's facts with the stick and change
/// nothing: `[default-node] install = false` and no node that matches. The
/// board reports a placeholder serial, as many consumer boards do; the
/// inventory also shows the MAC and the disk serial to match on instead.
#[test]
fn a_facts_stick_shows_the_machine_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let iso = nodeflash_tests::build_variant(
        dir.path(),
        "qemu",
        |p| p.replace("[default-node]\n", "[default-node]\ninstall = false\n"),
        &[],
    );
    let d = disk(&dir);
    let before = d.sha256();
    let mut cfg = VmConfig::new(iso, Boot::UsbStick);
    cfg.nvme.push(d.clone());
    cfg.smbios_serial = Some("To Be Filled By O.E.M.".into());
    cfg.mac = Some("52:54:00:12:34:99".into());
    let console = boot_to_poweroff(&cfg);
    assert_console(&console, "serial=To Be Filled By O.E.M.");
    assert_console(&console, "serial=\"NFTEST0001\"");
    assert_console(&console, "52:54:00:12:34:99");
    let facts = nodeflash_tests::console_json(&console, "nodeflash-facts: ");
    assert_eq!(facts["dmi"]["product_serial"], "To Be Filled By O.E.M.");
    assert_console(
        &console,
        "this machine matches no node of the profile and [default-node] install = false; nothing was written",
    );
    assert_eq!(d.sha256(), before, "the disk was changed");
}

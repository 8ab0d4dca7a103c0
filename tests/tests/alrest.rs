//! README's own image: the `alrest` profile (the seed's cluster) installs on
//! a node-sized 1 TB NVMe drive (a sparse image file). There is no internet
//! here, so the image under test differs from README's in what the reader is
//! told to change first: a GitHub user for root's keys, whose keys come from
//! the test's HTTPS server at 10.0.2.2.

use nodeflash_installer::net::keys::parse_line;
use nodeflash_tests::https::KeyServer;
use nodeflash_tests::{assert_console, boot_to_poweroff, build_variant, Boot, Nvme, VmConfig};

const ADMIN: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB/oDvZDOvsIcO07yOuLxZOeQQ78UJh0NTARK7EMiUtz admin@test";

/// The byte size of a common 1 TB NVMe drive.
const ONE_TB_DRIVE: u64 = 1_000_204_886_016;

#[test]
fn alrest_installs_on_a_1tb_nvme_drive() {
    let server = KeyServer::start(&[("/alrest-admin.keys", &[(200, ADMIN)])]).expect("key server");
    let dir = tempfile::tempdir().expect("tempdir");
    let key_url = format!(
        "[ssh]\nkey-url = \"https://10.0.2.2:{}/{{user}}.keys\"\nca-certificates = [\"test-ca.pem\"]\n",
        server.port()
    );
    let iso = build_variant(
        dir.path(),
        "alrest",
        |p| {
            // As shipped, nobody gets root's SSH access (README's step 1
            // has the reader put their own user in).
            assert!(
                p.contains("github-users = []"),
                "alrest.toml grants no one SSH"
            );
            p.replace("[ssh]\n", &key_url)
                .replace("github-users = []", "github-users = [\"alrest-admin\"]")
        },
        &[("test-ca.pem", &server.ca_pem())],
    );
    let mut cfg = VmConfig::new(iso, Boot::UsbStick);
    cfg.nvme
        .push(Nvme::create(dir.path(), "nvme.img", ONE_TB_DRIVE, "S4EWNX0R123456").expect("disk"));
    let console = boot_to_poweroff(&cfg);
    assert_console(&console, "nodeflash 0.1.0 · profile alrest");
    // The console and the install report name the exact kernel and OpenZFS
    // packages the image was made from: the lock's, as the build used it.
    let lock = nodeflash_builder::inputs::Lock::load(
        &nodeflash_tests::env_path("NODEFLASH_PROFILES").join("inputs.lock"),
    )
    .expect("the lock");
    let debian = lock.debian.expect("Debian pins");
    let version = |name: &str| {
        debian
            .packages
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.version.clone())
            .unwrap_or_else(|| panic!("the lock pins no {name}"))
    };
    let release = &debian.kernel_release;
    let kernel = format!("{release} ({})", version(&format!("linux-image-{release}")));
    let zfs = version("zfs-dkms");
    assert_console(&console, &format!("· kernel {kernel} · OpenZFS {zfs}"));
    assert_console(&console, &format!(", kernel {kernel}, OpenZFS {zfs}"));
    // No node has match rules yet: the generic node of the seed's stick.
    assert_console(
        &console,
        "node: install (no node of the profile matches: generic node)",
    );
    assert_console(&console, "plan: install on nvme0n1 (931.5 GiB");
    assert_console(
        &console,
        "2 swap   Swap sectors 2099200-69208063 (32.0 GiB)",
    );
    assert_console(
        &console,
        "pool rpool created on /dev/nvme0n1p3 with 7 datasets",
    );
    assert_console(&console, "it imports without -f");
    assert_console(
        &console,
        &parse_line(ADMIN, "test").expect("key").fingerprint(),
    );
    assert_console(&console, "wrote /root/.ssh/authorized_keys (1 keys)");
    assert_console(&console, "nodeflash: done in");
}

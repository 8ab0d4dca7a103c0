//! SSH keys in QEMU: the guest gets a DHCP lease from QEMU's user network and
//! fetches keys over HTTPS from a test server on the host (10.0.2.2), whose
//! CA the test generates and puts into an image built for it. Keys are
//! fetched before the disk is touched: when required keys cannot be had, the
//! disk is left as it was.

use std::path::{Path, PathBuf};

use nodeflash_installer::net::keys::parse_line;
use nodeflash_tests::https::KeyServer;
use nodeflash_tests::{assert_console, boot_stick, build_variant, DiskImage, Nvme};

const ALICE: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB/oDvZDOvsIcO07yOuLxZOeQQ78UJh0NTARK7EMiUtz alice@test";
const BOB: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBDMSgg36lthTqcXd7nckQmmzktYBRLCkKrO3CSElZHo5BQjDqfOP7qqNorvjdxyFQKNifzJ84QBuYV/nwC5Cmzk= bob@test";

/// The `qemu` image, with keys of `users` fetched from `port` on the host and
/// the test CA trusted.
fn image(dir: &Path, port: u16, ca_pem: &str, users: &[&str]) -> PathBuf {
    let users: Vec<String> = users.iter().map(|u| format!("\"{u}\"")).collect();
    let ssh = format!(
        "[ssh]\ngithub-users = [{}]\nkey-url = \"https://10.0.2.2:{port}/{{user}}.keys\"\n\
         ca-certificates = [\"test-ca.pem\"]\nfetch-timeout-secs = 10\n",
        users.join(", ")
    );
    build_variant(
        dir,
        "qemu",
        |p| p.replace("[ssh]\nrequired = false\n", &ssh),
        &[("test-ca.pem", ca_pem)],
    )
}

#[test]
fn keys_are_fetched_with_retries_and_installed() {
    let bob_twice = format!("{BOB}\n{ALICE}\n");
    let server = KeyServer::start(&[
        ("/alice.keys", &[(200, ALICE)]),
        // A server error first: retried.
        ("/bob.keys", &[(500, "busy"), (200, bob_twice.as_str())]),
    ])
    .expect("key server");
    let dir = tempfile::tempdir().expect("tempdir");
    let iso = image(
        dir.path(),
        server.port(),
        &server.ca_pem(),
        &["alice", "bob"],
    );
    let disk = Nvme::create(dir.path(), "nvme.img", 2 << 30, "NFTEST0001").expect("disk");
    let console = boot_stick(&iso, &disk);
    assert_console(&console, "nodeflash: done in");
    for key in [ALICE, BOB] {
        let fp = parse_line(key, "test").expect("key").fingerprint();
        assert_console(&console, &fp);
    }
    // Alice's key served twice is installed once, beside the profile's inline key.
    assert_console(&console, "wrote /root/.ssh/authorized_keys (3 keys)");
    let requests = server.requests();
    assert_eq!(
        requests.iter().filter(|r| r.contains("/bob.keys")).count(),
        2,
        "bob's keys were asked for again after the 500: {requests:?}"
    );
    // Everything about the network happened before the disk was touched.
    let fetched = console.find("key(s) of bob").expect("bob's keys");
    let partitioned = console.find("partitioned /dev/").expect("partitioned");
    assert!(fetched < partitioned);
}

#[test]
fn keys_that_cannot_be_had_leave_the_disk_unchanged() {
    let server = KeyServer::start(&[(
        "/carol.keys",
        &[(200, "<!DOCTYPE html><html><body>Sign in</body></html>")],
    )])
    .expect("key server");
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = Nvme::create(dir.path(), "nvme.img", 2 << 30, "NFTEST0001").expect("disk");
    let before = disk.sha256();

    // An HTML page instead of keys is refused, not installed.
    let iso = image(dir.path(), server.port(), &server.ca_pem(), &["carol"]);
    let console = boot_stick(&iso, &disk);
    assert_console(&console, "nodeflash: FAILED");
    assert_console(&console, "cannot get the SSH keys of carol");
    assert_console(&console, "nothing was written");
    assert_eq!(disk.sha256(), before, "the disk is unchanged");

    // The server gone: connection refused, retried within the time bound.
    drop(server);
    let console = boot_stick(&iso, &disk);
    assert_console(&console, "refused");
    assert_console(&console, "nodeflash: FAILED");
    assert_console(&console, "cannot get the SSH keys of carol");
    assert_eq!(disk.sha256(), before, "the disk is unchanged");
}

/// A server whose certificate the image does not trust (the image trusts
/// another CA): the handshake is refused at once, not retried, and nothing
/// is written.
#[test]
fn an_untrusted_certificate_is_refused_and_the_disk_unchanged() {
    let server = KeyServer::start(&[("/alice.keys", &[(200, ALICE)])]).expect("key server");
    let other = KeyServer::start(&[]).expect("another CA");
    let dir = tempfile::tempdir().expect("tempdir");
    let iso = image(dir.path(), server.port(), &other.ca_pem(), &["alice"]);
    let disk = Nvme::create(dir.path(), "nvme.img", 2 << 30, "NFTEST0001").expect("disk");
    let before = disk.sha256();
    let console = boot_stick(&iso, &disk);
    assert_console(
        &console,
        "nodeflash: FAILED: the SSH keys could not be fetched; nothing was written",
    );
    // Both test CAs have the same name: the certificate names the trusted
    // one as its issuer, but its signature is the other's.
    assert_console(
        &console,
        "TLS with 10.0.2.2 failed: certificate not trusted",
    );
    assert_console(&console, "(after 1 attempt)");
    assert_eq!(
        server.requests(),
        Vec::<String>::new(),
        "no request was sent"
    );
    assert_eq!(disk.sha256(), before, "the disk is unchanged");
}

//! What PID 1 does on the network: DHCP on the first wired interface with a
//! link, and the SSH keys fetched before the disk is touched.
//!
//! PID 1 calls [`fetch_keys`] (which calls [`bring_up`] only when there is
//! something to fetch), prints the keys, and after the install writes them
//! with [`keys::write_authorized_keys`].

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Result};

use super::dhcp::{self, Lease};
use super::fetch::Client;
use super::keys::{self, Key, KeySet};
use super::link;

use crate::profile::Ssh;

/// Where [`bring_up`] looks and writes, and how long it waits.
#[derive(Debug, Clone)]
pub struct NetConfig {
    pub sysfs: PathBuf,
    pub resolv_conf: PathBuf,
    /// For a link on any wired interface.
    pub link_timeout: Duration,
    /// For the DHCP lease.
    pub dhcp_timeout: Duration,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            sysfs: PathBuf::from("/sys"),
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
            link_timeout: Duration::from_secs(20),
            dhcp_timeout: Duration::from_secs(30),
        }
    }
}

/// Brings every wired interface up and asks for a DHCP lease on each one
/// that has a link, in parallel, as links appear; the first lease wins, is
/// configured (address, route, `resolv.conf`) and returned, and the console
/// says which interface answered. A node whose cable is in its second port,
/// or whose first port is on a network without DHCP, still gets an address.
///
/// Errors: no wired interface; no link on any within `link_timeout`; no
/// lease on any within `dhcp_timeout` (the error lists each interface's
/// failure).
pub fn bring_up(cfg: &NetConfig, log: &dyn Fn(&str)) -> Result<Lease> {
    if let Err(e) = link::set_up("lo") {
        log(&format!("net: warning: {e:#}"));
    }
    let names = link::ethernet_interfaces(&cfg.sysfs);
    for name in &names {
        if let Err(e) = link::set_up(name) {
            log(&format!("net: warning: {e:#}"));
        }
    }
    link::wait_for_carrier(&cfg.sysfs, &names, cfg.link_timeout)?;
    let deadline = Instant::now() + cfg.dhcp_timeout;
    let (tx, rx) = std::sync::mpsc::channel();
    let mut asked: Vec<String> = Vec::new();
    let mut failed: Vec<String> = Vec::new();
    loop {
        for name in &names {
            if asked.contains(name) || !link::has_carrier(&cfg.sysfs, name) {
                continue;
            }
            asked.push(name.clone());
            let mac = match link::hardware_address(name) {
                Ok(mac) => mac,
                Err(e) => {
                    failed.push(format!("{name}: {e:#}"));
                    continue;
                }
            };
            log(&format!("net: link on {name}; asking for a DHCP lease"));
            let (tx, name, left) = (
                tx.clone(),
                name.clone(),
                deadline.saturating_duration_since(Instant::now()),
            );
            // Detached: a slower interface's attempt ends at the deadline
            // on its own, after the first lease has been taken.
            std::thread::spawn(move || {
                let r = dhcp::acquire(&name, mac, left, &|_| {});
                let _ = tx.send((name, r));
            });
        }
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok((_, Ok(lease))) => {
                dhcp::configure(&lease)?;
                dhcp::write_resolv_conf(&cfg.resolv_conf, &lease)?;
                let others = asked.len().saturating_sub(1);
                log(&format!(
                    "net: {} (the first of {} interface{} with a link to answer)",
                    lease.describe(),
                    others + 1,
                    if others == 0 { "" } else { "s" }
                ));
                return Ok(lease);
            }
            Ok((name, Err(e))) => failed.push(format!("{name}: {e:#}")),
            Err(_) => {}
        }
        if failed.len() == asked.len() && Instant::now() >= deadline {
            bail!(
                "no DHCP lease on any interface with a link within {}s: {}",
                cfg.dhcp_timeout.as_secs(),
                failed.join("; ")
            );
        }
    }
}

/// [`bring_up`] with the defaults, once: a second call (the payload over
/// HTTP, then the keys) returns the first lease.
pub fn up(log: &dyn Fn(&str)) -> Result<Lease> {
    static LEASE: std::sync::Mutex<Option<Lease>> = std::sync::Mutex::new(None);
    let mut lease = LEASE
        .lock()
        .map_err(|_| anyhow!("the network lock is poisoned"))?;
    if let Some(l) = &*lease {
        return Ok(l.clone());
    }
    let l = bring_up(&NetConfig::default(), log)?;
    *lease = Some(l.clone());
    Ok(l)
}

/// The SSH keys for root: the profile's inline keys, and when users are
/// given, theirs fetched from `key-url` (after [`bring_up`] with the
/// defaults), checked and without duplicates. `extra_ca_pem` are the
/// profile's CA certificates; `not_before` is the image's build time.
///
/// With `required` (the default), a user whose keys cannot be fetched or who
/// has none is an error saying why; otherwise it is a warning through `log`
/// and the other keys are kept (the set may then be empty).
pub fn fetch_keys(
    ssh: &Ssh,
    extra_ca_pem: &[Vec<u8>],
    not_before: SystemTime,
    log: impl Fn(&str),
) -> Result<KeySet> {
    let connect = || {
        up(&log)?;
        let mut client = Client::new(extra_ca_pem, ssh.allow_http, not_before)?;
        client.policy.total = Duration::from_secs(ssh.fetch_timeout_secs.into());
        Ok(client)
    };
    collect_keys(ssh, connect, &log)
}

/// [`fetch_keys`] with the network and client given by `connect`, which is
/// called only when there are users to fetch.
pub fn collect_keys(
    ssh: &Ssh,
    connect: impl FnOnce() -> Result<Client>,
    log: &dyn Fn(&str),
) -> Result<KeySet> {
    let mut set = KeySet::default();
    for (i, line) in ssh.keys.iter().enumerate() {
        let key = keys::parse_line(line, &format!("inline key {}", i + 1))
            .map_err(|e| anyhow!("ssh.keys[{i}]: {e}"))?;
        add(&mut set, key, log);
    }
    if ssh.github_users.is_empty() {
        return Ok(set);
    }
    let users = ssh.github_users.join(", ");
    let client = match connect() {
        Ok(c) => c,
        Err(e) => {
            let e = e.context(format!("cannot fetch the SSH keys of {users}: no network"));
            return skip_or_fail(ssh, set, e, log);
        }
    };
    for user in &ssh.github_users {
        let url = ssh.key_url.replace("{user}", user);
        let source = format!("user {user} ({url})");
        let fetched = client
            .get(&url, log)
            .and_then(|text| keys::parse_keys(&text, &url));
        let fetched = match fetched {
            Ok(ks) if ks.is_empty() => Err(anyhow!("{url} lists no keys")),
            other => other,
        };
        match fetched {
            Ok(ks) => {
                let n = ks.len();
                for mut k in ks {
                    k.source = source.clone();
                    add(&mut set, k, log);
                }
                log(&format!("ssh: {n} key(s) of {user} from {url}"));
            }
            Err(e) => {
                let e = e.context(format!("cannot get the SSH keys of {user}"));
                set = skip_or_fail(ssh, set, e, log)?;
            }
        }
    }
    Ok(set)
}

/// Adds a key and says so (or that it is a duplicate).
fn add(set: &mut KeySet, key: Key, log: &dyn Fn(&str)) {
    let line = format!("{} {} ({})", key.fingerprint(), key.kind, key.source);
    if set.add(key) {
        log(&format!("ssh: key {line}"));
    } else {
        log(&format!("ssh: duplicate key {line} skipped"));
    }
}

/// A failed fetch: the error when keys are required, else a warning.
fn skip_or_fail(ssh: &Ssh, set: KeySet, e: anyhow::Error, log: &dyn Fn(&str)) -> Result<KeySet> {
    if ssh.required {
        return Err(e);
    }
    log(&format!(
        "ssh: warning: {e:#}; going on with {} key(s) (`required = false`)",
        set.len()
    ));
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::keys::tests::{ECDSA, ED25519};
    use crate::net::test_server::KeyServer;
    use anyhow::bail;
    use std::cell::RefCell;
    use std::time::UNIX_EPOCH;

    fn ssh(server: &KeyServer, users: &[&str], keys: &[&str], required: bool) -> Ssh {
        Ssh {
            github_users: users.iter().map(|u| u.to_string()).collect(),
            keys: keys.iter().map(|k| k.to_string()).collect(),
            key_url: server.url("/{user}.keys"),
            required,
            ..Ssh::default()
        }
    }

    fn connect(server: &KeyServer) -> impl FnOnce() -> Result<Client> {
        let ca = server.ca_pem().into_bytes();
        move || {
            let mut c = Client::new(&[ca], false, UNIX_EPOCH)?;
            c.policy.max_attempts = 2;
            c.policy.first_wait = Duration::from_millis(10);
            Ok(c)
        }
    }

    /// collect_keys, with its log.
    fn collect(
        ssh: &Ssh,
        connect: impl FnOnce() -> Result<Client>,
    ) -> (Result<KeySet>, Vec<String>) {
        let lines = RefCell::new(Vec::new());
        let r = collect_keys(ssh, connect, &|l: &str| {
            lines.borrow_mut().push(l.to_string())
        });
        (r, lines.into_inner())
    }

    fn no_network() -> Result<Client> {
        bail!("no link on eth0 after 20s: is a cable plugged in and the switch port up?")
    }

    #[test]
    fn inline_keys_need_no_network() {
        let server = KeyServer::start(&[]).expect("server");
        let s = ssh(&server, &[], &[ED25519, ECDSA, ED25519], true);
        let called = std::cell::Cell::new(false);
        let (r, log) = collect(&s, || {
            called.set(true);
            no_network()
        });
        let set = r.expect("inline keys");
        assert!(!called.get());
        assert_eq!(set.len(), 2);
        assert_eq!(set.keys[0].source, "inline key 1");
        assert!(
            log.iter().any(|l| l.starts_with("ssh: duplicate key")),
            "{log:?}"
        );
    }

    #[test]
    fn fetched_keys_join_inline_ones_without_duplicates() {
        let alice = format!("{ED25519}\n{ECDSA}\n");
        let server = KeyServer::start(&[
            ("/alice.keys", &[(200, alice.as_str())]),
            ("/bob.keys", &[(500, ""), (200, ECDSA)]),
        ])
        .expect("server");
        let s = ssh(&server, &["alice", "bob"], &[ED25519], true);
        let (r, log) = collect(&s, connect(&server));
        let set = r.expect("keys");
        let sources: Vec<&str> = set.keys.iter().map(|k| k.source.as_str()).collect();
        assert_eq!(
            sources,
            [
                "inline key 1",
                &format!("user alice ({})", server.url("/alice.keys"))
            ]
        );
        assert_eq!(server.requests(), ["/alice.keys", "/bob.keys", "/bob.keys"]);
        assert!(log.iter().any(|l| l.contains("HTTP status 500")), "{log:?}");
        assert!(
            log.iter()
                .any(|l| l.contains(&format!("ssh: key {}", set.keys[1].fingerprint()))),
            "{log:?}"
        );
    }

    #[test]
    fn required_keys_that_cannot_be_fetched_are_an_error() {
        let server = KeyServer::start(&[
            ("/empty.keys", &[(200, "\n")]),
            ("/html.keys", &[(200, "<html>login</html>")]),
        ])
        .expect("server");
        for (user, want) in [
            ("ghost", "HTTP status 404 Not Found (after 1 attempt)"),
            ("empty", "lists no keys"),
            ("html", "got an HTML page"),
        ] {
            let s = ssh(&server, &[user], &[ED25519], true);
            let msg = format!("{:#}", collect(&s, connect(&server)).0.expect_err(user));
            assert!(
                msg.starts_with(&format!("cannot get the SSH keys of {user}: ")),
                "{msg}"
            );
            assert!(msg.contains(want), "{msg}");
        }
        let s = ssh(&server, &["alice"], &[], true);
        let msg = format!("{:#}", collect(&s, no_network).0.expect_err("no network"));
        assert!(
            msg.starts_with("cannot fetch the SSH keys of alice: no network: no link on eth0"),
            "{msg}"
        );
    }

    #[test]
    fn optional_keys_that_cannot_be_fetched_are_a_warning() {
        let server = KeyServer::start(&[("/alice.keys", &[(200, ECDSA)])]).expect("server");
        let s = ssh(&server, &["ghost", "alice"], &[ED25519], false);
        let (r, log) = collect(&s, connect(&server));
        assert_eq!(r.expect("keys").len(), 2);
        assert!(
            log.iter().any(
                |l| l.starts_with("ssh: warning: cannot get the SSH keys of ghost")
                    && l.ends_with("going on with 1 key(s) (`required = false`)")
            ),
            "{log:?}"
        );
        let (r, log) = collect(&s, no_network);
        assert_eq!(r.expect("inline keys").len(), 1);
        assert!(
            log.iter()
                .any(|l| l.contains("no network: no link on eth0")),
            "{log:?}"
        );
    }

    #[test]
    fn a_bad_inline_key_is_an_error_even_when_not_required() {
        let server = KeyServer::start(&[]).expect("server");
        let s = ssh(&server, &[], &[ED25519, "ssh-dss AAAA"], false);
        let msg = format!("{:#}", collect(&s, no_network).0.expect_err("bad key"));
        assert!(msg.starts_with("ssh.keys[1]: ssh-dss"), "{msg}");
    }
}

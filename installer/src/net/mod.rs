//! The network: DHCP on the first wired interface with a link, HTTPS fetches,
//! and the SSH keys fetched with them before the disk is touched.

pub mod dhcp;
pub mod fetch;
pub mod keys;
pub mod link;

/// The HTTPS key server of the QEMU tests, shared with the unit tests here.
#[cfg(test)]
#[allow(dead_code)]
#[path = "../../../tests/src/https.rs"]
pub(crate) mod test_server;

//! The network: DHCP on the first wired interface with a link, HTTPS fetches,
//! and the SSH keys fetched with them before the disk is touched.

pub mod keys;

//! The network. Always built: the SSH key parser ([`keys`]) and the URL
//! check ([`url`]) that the builder's `profile check` uses too. Built with
//! the `pid1` feature only: DHCP ([`dhcp`], [`link`]), HTTPS fetches with
//! rustls ([`fetch`], [`stream`]) and what PID 1 does with them ([`node`]:
//! [`bring_up`], [`fetch_keys`]).

pub mod keys;
pub mod url;

#[cfg(feature = "pid1")]
pub mod dhcp;
#[cfg(feature = "pid1")]
pub mod fetch;
#[cfg(feature = "pid1")]
pub mod link;
#[cfg(feature = "pid1")]
mod node;
#[cfg(feature = "pid1")]
pub mod stream;

#[cfg(feature = "pid1")]
pub use dhcp::Lease;
#[cfg(feature = "pid1")]
pub use fetch::Client;
pub use keys::{Key, KeySet};
#[cfg(feature = "pid1")]
pub use node::*;

/// The HTTPS key server of the QEMU tests, shared with the unit tests here.
#[cfg(all(test, feature = "pid1"))]
#[allow(dead_code)]
#[path = "../../../tests/src/https.rs"]
pub(crate) mod test_server;

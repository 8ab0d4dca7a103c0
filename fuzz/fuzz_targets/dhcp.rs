//! The DHCP reply parser on arbitrary datagrams, and what the client makes
//! of a reply it accepts (the lease, its console line, resolv.conf).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodeflash_installer::net::dhcp::{parse_reply, resolv_conf, Lease};

fuzz_target!(|data: &[u8]| {
    // The client receives into a 1500-byte buffer.
    let data = &data[..data.len().min(1500)];
    let Ok(reply) = parse_reply(data) else {
        return;
    };
    // An OFFER followed by this ACK, and this reply on its own.
    let lease = Lease::from_replies("eth0", &reply, &reply);
    let _ = lease.describe();
    let _ = resolv_conf(&lease);
    assert!(lease.prefix_len() <= 32);
});

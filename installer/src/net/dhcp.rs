//! A small DHCPv4 client for one interface: DISCOVER, OFFER, REQUEST, ACK
//! over a UDP socket bound to port 68 on that interface, with the broadcast
//! flag set so replies reach an interface that has no address yet.
//!
//! Encoding and parsing are pure functions; [`acquire`] is the socket part.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use nix::sys::socket::{
    bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn,
};

pub const SERVER_PORT: u16 = 67;
pub const CLIENT_PORT: u16 = 68;
const MAGIC: [u8; 4] = [99, 130, 83, 99];
/// op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr,
/// chaddr (16), sname (64), file (128).
const FIXED: usize = 236;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    Discover = 1,
    Offer = 2,
    Request = 3,
    Decline = 4,
    Ack = 5,
    Nak = 6,
    Release = 7,
    Inform = 8,
}

impl MessageType {
    fn from_u8(v: u8) -> Option<Self> {
        use MessageType::*;
        [Discover, Offer, Request, Decline, Ack, Nak, Release, Inform]
            .into_iter()
            .find(|t| *t as u8 == v)
    }
}

/// A client message: DISCOVER, or REQUEST of `requested` from `server`.
pub fn encode(
    kind: MessageType,
    xid: u32,
    mac: [u8; 6],
    request: Option<(Ipv4Addr, Ipv4Addr)>,
) -> Vec<u8> {
    let mut p = vec![0u8; FIXED];
    p[0] = 1; // BOOTREQUEST
    p[1] = 1; // Ethernet
    p[2] = 6;
    p[4..8].copy_from_slice(&xid.to_be_bytes());
    p[10..12].copy_from_slice(&0x8000u16.to_be_bytes()); // broadcast replies
    p[28..34].copy_from_slice(&mac);
    p.extend_from_slice(&MAGIC);
    p.extend_from_slice(&[53, 1, kind as u8]);
    // Client identifier: hardware type and MAC.
    p.extend_from_slice(&[61, 7, 1]);
    p.extend_from_slice(&mac);
    if let Some((addr, server)) = request {
        p.extend_from_slice(&[50, 4]);
        p.extend_from_slice(&addr.octets());
        p.extend_from_slice(&[54, 4]);
        p.extend_from_slice(&server.octets());
    }
    // Parameters: subnet mask, router, DNS, lease time, server id.
    p.extend_from_slice(&[55, 5, 1, 3, 6, 51, 54]);
    // Maximum message size.
    p.extend_from_slice(&[57, 2]);
    p.extend_from_slice(&1500u16.to_be_bytes());
    p.push(255);
    // Some servers ignore requests shorter than a BOOTP packet.
    if p.len() < 300 {
        p.resize(300, 0);
    }
    p
}

/// A server's OFFER, ACK or NAK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub kind: MessageType,
    pub xid: u32,
    pub mac: [u8; 6],
    /// `yiaddr`: the address offered.
    pub your_addr: Ipv4Addr,
    pub server_id: Option<Ipv4Addr>,
    pub subnet_mask: Option<Ipv4Addr>,
    pub routers: Vec<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub lease_secs: Option<u32>,
    /// Option 56, e.g. why a NAK was sent.
    pub message: Option<String>,
}

fn addrs(v: &[u8]) -> Vec<Ipv4Addr> {
    v.chunks_exact(4)
        .map(|c| Ipv4Addr::new(c[0], c[1], c[2], c[3]))
        .collect()
}

/// Parses a server's reply (BOOTREPLY with a DHCP message type).
pub fn parse_reply(buf: &[u8]) -> Result<Reply, String> {
    if buf.len() < FIXED + 4 {
        return Err(format!("too short for DHCP ({} bytes)", buf.len()));
    }
    if buf[0] != 2 {
        return Err("not a BOOTREPLY".into());
    }
    if buf[1] != 1 || buf[2] != 6 {
        return Err("not for an Ethernet address".into());
    }
    if buf[FIXED..FIXED + 4] != MAGIC {
        return Err("no DHCP magic cookie".into());
    }
    let xid = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&buf[28..34]);
    let your_addr = Ipv4Addr::new(buf[16], buf[17], buf[18], buf[19]);
    let mut reply = Reply {
        kind: MessageType::Offer,
        xid,
        mac,
        your_addr,
        server_id: None,
        subnet_mask: None,
        routers: Vec::new(),
        dns: Vec::new(),
        lease_secs: None,
        message: None,
    };
    let mut kind = None;
    let mut opts = &buf[FIXED + 4..];
    while let Some((&code, rest)) = opts.split_first() {
        match code {
            0 => {
                opts = rest;
                continue;
            }
            255 => break,
            _ => {}
        }
        let (&len, rest) = rest
            .split_first()
            .ok_or_else(|| format!("option {code} has no length"))?;
        let value = rest
            .get(..len as usize)
            .ok_or_else(|| format!("option {code} is cut short"))?;
        opts = &rest[len as usize..];
        let one = || (value.len() == 4).then(|| addrs(value)[0]);
        match code {
            1 => reply.subnet_mask = one(),
            3 => reply.routers = addrs(value),
            6 => reply.dns = addrs(value),
            51 => reply.lease_secs = <[u8; 4]>::try_from(value).ok().map(u32::from_be_bytes),
            53 => kind = value.first().and_then(|&v| MessageType::from_u8(v)),
            54 => reply.server_id = one(),
            56 => reply.message = Some(String::from_utf8_lossy(value).into_owned()),
            _ => {}
        }
    }
    reply.kind = kind.ok_or("no DHCP message type")?;
    Ok(reply)
}

/// What the server gave this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub interface: String,
    pub address: Ipv4Addr,
    pub netmask: Ipv4Addr,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub lease_secs: Option<u32>,
    pub server: Ipv4Addr,
}

impl Lease {
    /// From the ACK (the OFFER fills in what the ACK leaves out).
    pub fn from_replies(interface: &str, offer: &Reply, ack: &Reply) -> Lease {
        let address = ack.your_addr;
        Lease {
            interface: interface.to_string(),
            address,
            netmask: ack
                .subnet_mask
                .or(offer.subnet_mask)
                .unwrap_or_else(|| classful_mask(address)),
            router: ack.routers.first().or(offer.routers.first()).copied(),
            dns: if ack.dns.is_empty() {
                offer.dns.clone()
            } else {
                ack.dns.clone()
            },
            lease_secs: ack.lease_secs.or(offer.lease_secs),
            server: ack
                .server_id
                .or(offer.server_id)
                .unwrap_or(Ipv4Addr::UNSPECIFIED),
        }
    }

    pub fn prefix_len(&self) -> u32 {
        u32::from(self.netmask).count_ones()
    }

    /// One line for the console.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "{}/{} on {}",
            self.address,
            self.prefix_len(),
            self.interface
        );
        match self.router {
            Some(r) => {
                let _ = write!(s, ", router {r}");
            }
            None => s.push_str(", no router"),
        }
        let dns: Vec<String> = self.dns.iter().map(|d| d.to_string()).collect();
        let _ = write!(
            s,
            ", DNS {}",
            if dns.is_empty() {
                "none".into()
            } else {
                dns.join(" ")
            }
        );
        if let Some(l) = self.lease_secs {
            let _ = write!(s, ", lease {l}s");
        }
        let _ = write!(s, " from {}", self.server);
        s
    }
}

/// The netmask of the address's class, for a server that sends none.
pub fn classful_mask(a: Ipv4Addr) -> Ipv4Addr {
    match a.octets()[0] {
        0..=127 => Ipv4Addr::new(255, 0, 0, 0),
        128..=191 => Ipv4Addr::new(255, 255, 0, 0),
        _ => Ipv4Addr::new(255, 255, 255, 0),
    }
}

/// `/etc/resolv.conf` for the lease's DNS servers (at most 3, as the
/// resolver reads).
pub fn resolv_conf(lease: &Lease) -> String {
    let mut s = String::from("# written by nodeflash from the DHCP lease\n");
    for d in lease.dns.iter().take(3) {
        let _ = writeln!(s, "nameserver {d}");
    }
    s
}

pub fn write_resolv_conf(path: &Path, lease: &Lease) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(path, resolv_conf(lease))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// How long to wait for a reply after sending for the `n`th time (0-based):
/// 1, 2, 4, 8 s, then 8 s.
pub fn retransmit_wait(n: u32) -> Duration {
    Duration::from_secs(1u64 << n.min(3))
}

/// A transaction ID that differs between machines and boots.
fn new_xid(mac: [u8; 6]) -> u32 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos() ^ d.as_secs() as u32)
        .unwrap_or(0);
    t ^ u32::from_be_bytes([mac[2], mac[3], mac[4], mac[5]]) ^ std::process::id()
}

/// A UDP socket on 0.0.0.0:68 bound to the interface, allowed to broadcast.
fn client_socket(ifname: &str) -> Result<UdpSocket> {
    let fd = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("cannot open the DHCP socket")?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).context("cannot set SO_REUSEADDR")?;
    setsockopt(&fd, sockopt::Broadcast, &true).context("cannot set SO_BROADCAST")?;
    setsockopt(&fd, sockopt::BindToDevice, &OsString::from(ifname))
        .with_context(|| format!("cannot bind the DHCP socket to {ifname}"))?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::new(0, 0, 0, 0, CLIENT_PORT),
    )
    .context("cannot bind the DHCP socket to port 68")?;
    Ok(UdpSocket::from(fd))
}

/// Sends `packet` and waits for a reply `wanted` accepts, retransmitting
/// with growing waits, until `deadline`.
fn exchange(
    sock: &UdpSocket,
    packet: &[u8],
    deadline: Instant,
    wanted: &dyn Fn(&Reply) -> bool,
) -> Result<Option<Reply>> {
    let to = SocketAddrV4::new(Ipv4Addr::BROADCAST, SERVER_PORT);
    let mut buf = [0u8; 1500];
    for n in 0.. {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        sock.send_to(packet, to)
            .context("cannot send a DHCP broadcast")?;
        let until = deadline.min(now + retransmit_wait(n));
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            sock.set_read_timeout(Some(left))
                .context("cannot set the DHCP socket timeout")?;
            match sock.recv_from(&mut buf) {
                Ok((len, _)) => {
                    if let Ok(reply) = parse_reply(&buf[..len]) {
                        if wanted(&reply) {
                            return Ok(Some(reply));
                        }
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e).context("cannot receive DHCP replies"),
            }
        }
    }
    Ok(None)
}

/// Gets a lease for `ifname` (up, with a link) whose MAC is `mac`, within
/// `timeout`. Does not configure the interface: see [`configure`].
pub fn acquire(ifname: &str, mac: [u8; 6], timeout: Duration, log: &dyn Fn(&str)) -> Result<Lease> {
    let deadline = Instant::now() + timeout;
    let sock = client_socket(ifname)?;
    let mut naks = 0;
    loop {
        let xid = new_xid(mac);
        let ours = |r: &Reply| r.xid == xid && r.mac == mac;
        let discover = encode(MessageType::Discover, xid, mac, None);
        let Some(offer) = exchange(&sock, &discover, deadline, &|r| {
            ours(r) && r.kind == MessageType::Offer && r.server_id.is_some()
        })?
        else {
            bail!(
                "no DHCP server answered on {ifname} within {}s",
                timeout.as_secs()
            );
        };
        let server = offer.server_id.unwrap_or(Ipv4Addr::UNSPECIFIED);
        log(&format!(
            "dhcp: {ifname}: offer of {} from {server}",
            offer.your_addr
        ));
        let request = encode(
            MessageType::Request,
            xid,
            mac,
            Some((offer.your_addr, server)),
        );
        let Some(ack) = exchange(&sock, &request, deadline, &|r| {
            ours(r)
                && matches!(r.kind, MessageType::Ack | MessageType::Nak)
                && r.server_id.is_none_or(|s| s == server)
        })?
        else {
            bail!(
                "the DHCP server {server} did not acknowledge {} on {ifname} within {}s",
                offer.your_addr,
                timeout.as_secs()
            );
        };
        if ack.kind == MessageType::Ack {
            return Ok(Lease::from_replies(ifname, &offer, &ack));
        }
        naks += 1;
        let why = ack.message.as_deref().unwrap_or("no reason given");
        if naks >= 3 {
            bail!("the DHCP server {server} refused the address on {ifname} three times ({why})");
        }
        log(&format!(
            "dhcp: {ifname}: {server} refused {} ({why}); starting over",
            offer.your_addr
        ));
    }
}

/// Gives the interface the lease's address, netmask and default route.
pub fn configure(lease: &Lease) -> Result<()> {
    super::link::set_address(&lease.interface, lease.address, lease.netmask)?;
    if let Some(router) = lease.router {
        super::link::add_default_route(&lease.interface, router)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command, Stdio};

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

    /// A server reply as slirp sends it (options 53, 54, 51, 1, 3, 6 in its
    /// order), built byte by byte.
    fn slirp_reply(kind: u8, xid: u32) -> Vec<u8> {
        let mut p = vec![0u8; FIXED];
        p[0] = 2;
        p[1] = 1;
        p[2] = 6;
        p[4..8].copy_from_slice(&xid.to_be_bytes());
        p[16..20].copy_from_slice(&[10, 0, 2, 15]);
        p[20..24].copy_from_slice(&[10, 0, 2, 2]);
        p[28..34].copy_from_slice(&MAC);
        p.extend_from_slice(&MAGIC);
        p.extend_from_slice(&[53, 1, kind]);
        p.extend_from_slice(&[54, 4, 10, 0, 2, 2]);
        p.extend_from_slice(&[51, 4, 0, 1, 0x51, 0x80]); // 86400
        p.extend_from_slice(&[1, 4, 255, 255, 255, 0]);
        p.extend_from_slice(&[3, 4, 10, 0, 2, 2]);
        p.extend_from_slice(&[0, 0]); // padding
        p.extend_from_slice(&[6, 8, 10, 0, 2, 3, 1, 1, 1, 1]);
        p.push(255);
        p.resize(548, 0);
        p
    }

    #[test]
    fn discover_and_request_layout() {
        let d = encode(MessageType::Discover, 0x01020304, MAC, None);
        assert_eq!(d.len(), 300);
        assert_eq!(&d[..4], &[1, 1, 6, 0]);
        assert_eq!(&d[4..8], &[1, 2, 3, 4]);
        assert_eq!(&d[10..12], &[0x80, 0], "broadcast flag");
        assert_eq!(&d[12..28], &[0; 16], "no addresses yet");
        assert_eq!(&d[28..34], &MAC);
        assert_eq!(&d[34..44], &[0; 10], "chaddr padding");
        assert_eq!(&d[236..240], &MAGIC);
        assert_eq!(&d[240..243], &[53, 1, 1]);
        assert!(!d.windows(2).any(|w| w == [50, 4]), "no requested address");
        let r = encode(
            MessageType::Request,
            7,
            MAC,
            Some((Ipv4Addr::new(10, 0, 2, 15), Ipv4Addr::new(10, 0, 2, 2))),
        );
        assert_eq!(&r[240..243], &[53, 1, 3]);
        let opts = &r[240..];
        assert!(opts.windows(6).any(|w| w == [50, 4, 10, 0, 2, 15]));
        assert!(opts.windows(6).any(|w| w == [54, 4, 10, 0, 2, 2]));
        assert!(opts.windows(7).any(|w| w == [55, 5, 1, 3, 6, 51, 54]));
        // Options end with 255, then only padding.
        let end = opts.iter().position(|&b| b == 255).expect("end option");
        assert!(opts[end + 1..].iter().all(|&b| b == 0));
    }

    #[test]
    fn our_own_request_is_not_a_reply() {
        let d = encode(MessageType::Discover, 1, MAC, None);
        assert_eq!(parse_reply(&d), Err("not a BOOTREPLY".to_string()));
    }

    #[test]
    fn parses_an_offer_and_an_ack() {
        let offer = parse_reply(&slirp_reply(2, 42)).expect("offer");
        assert_eq!(
            offer,
            Reply {
                kind: MessageType::Offer,
                xid: 42,
                mac: MAC,
                your_addr: Ipv4Addr::new(10, 0, 2, 15),
                server_id: Some(Ipv4Addr::new(10, 0, 2, 2)),
                subnet_mask: Some(Ipv4Addr::new(255, 255, 255, 0)),
                routers: vec![Ipv4Addr::new(10, 0, 2, 2)],
                dns: vec![Ipv4Addr::new(10, 0, 2, 3), Ipv4Addr::new(1, 1, 1, 1)],
                lease_secs: Some(86400),
                message: None,
            }
        );
        let ack = parse_reply(&slirp_reply(5, 42)).expect("ack");
        assert_eq!(ack.kind, MessageType::Ack);
        let lease = Lease::from_replies("eth0", &offer, &ack);
        assert_eq!(lease.prefix_len(), 24);
        assert_eq!(
            lease.describe(),
            "10.0.2.15/24 on eth0, router 10.0.2.2, DNS 10.0.2.3 1.1.1.1, lease 86400s from 10.0.2.2"
        );
        assert_eq!(
            resolv_conf(&lease),
            "# written by nodeflash from the DHCP lease\nnameserver 10.0.2.3\nnameserver 1.1.1.1\n"
        );
    }

    #[test]
    fn an_ack_without_options_keeps_the_offers() {
        let offer = parse_reply(&slirp_reply(2, 1)).expect("offer");
        let mut bare = slirp_reply(5, 1);
        bare.truncate(FIXED + 4);
        bare.extend_from_slice(&[53, 1, 5, 255]);
        let ack = parse_reply(&bare).expect("ack");
        assert_eq!((ack.subnet_mask, ack.lease_secs), (None, None));
        let lease = Lease::from_replies("eth0", &offer, &ack);
        assert_eq!(lease.netmask, Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(lease.router, Some(Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(lease.server, Ipv4Addr::new(10, 0, 2, 2));
        // Neither says: the class's mask.
        let none = Reply {
            subnet_mask: None,
            ..ack.clone()
        };
        assert_eq!(
            Lease::from_replies("eth0", &none, &none).netmask,
            Ipv4Addr::new(255, 0, 0, 0)
        );
        assert_eq!(
            classful_mask(Ipv4Addr::new(172, 16, 0, 1)),
            Ipv4Addr::new(255, 255, 0, 0)
        );
        assert_eq!(
            classful_mask(Ipv4Addr::new(192, 168, 1, 1)),
            Ipv4Addr::new(255, 255, 255, 0)
        );
    }

    #[test]
    fn a_nak_carries_its_message() {
        let mut p = slirp_reply(6, 9);
        p.truncate(FIXED + 4);
        p.extend_from_slice(&[53, 1, 6, 56, 5]);
        p.extend_from_slice(b"wrong");
        p.push(255);
        let nak = parse_reply(&p).expect("nak");
        assert_eq!(
            (nak.kind, nak.message.as_deref()),
            (MessageType::Nak, Some("wrong"))
        );
    }

    #[test]
    fn malformed_replies_are_refused() {
        let good = slirp_reply(2, 1);
        let mut no_cookie = good.clone();
        no_cookie[236] = 0;
        let mut cut = good[..FIXED + 4].to_vec();
        cut.extend_from_slice(&[53, 1, 2, 6, 8, 10, 0]);
        let mut no_type = good[..FIXED + 4].to_vec();
        no_type.push(255);
        for (p, want) in [
            (&good[..100], "too short"),
            (&no_cookie[..], "magic cookie"),
            (&cut[..], "option 6 is cut short"),
            (&no_type[..], "no DHCP message type"),
        ] {
            let e = parse_reply(p).expect_err(want);
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn retransmit_waits_double_then_stay() {
        let waits: Vec<u64> = (0..6).map(|n| retransmit_wait(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 8, 8]);
        assert_eq!(retransmit_wait(u32::MAX), Duration::from_secs(8));
    }

    /// A network namespace with a DHCP server in it, removed on drop.
    struct ServerNamespace {
        name: String,
        dnsmasq: Option<Child>,
    }

    impl Drop for ServerNamespace {
        fn drop(&mut self) {
            if let Some(mut c) = self.dnsmasq.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .status();
        }
    }

    /// A new named network namespace for a test's DHCP server, or none
    /// (the reason printed) when this host cannot make one: not root, no
    /// `ip` or `dnsmasq`.
    fn server_namespace(prefix: &str) -> Option<ServerNamespace> {
        if !crate::net::keys::tests::is_root() {
            crate::testing::require_or_skip("network namespaces need root");
            return None;
        }
        for (tool, arg) in [("ip", "-V"), ("dnsmasq", "--version")] {
            if Command::new(tool).arg(arg).output().is_err() {
                crate::testing::require_or_skip(&format!(
                    "{tool} is not installed (packages iproute2, dnsmasq-base)"
                ));
                return None;
            }
        }
        let name = format!("{prefix}-{}", std::process::id());
        if let Err(e) = ip(&["netns", "add", &name]) {
            crate::testing::require_or_skip(&format!("cannot create a network namespace: {e:#}"));
            return None;
        }
        Some(ServerNamespace {
            name,
            dnsmasq: None,
        })
    }

    /// dnsmasq in namespace `ns` on `iface`, leasing 10.77.0.50–60 with the
    /// router 10.77.0.1, its log to `log`; `extra` options added.
    fn start_dnsmasq(
        ns: &str,
        iface: &str,
        leases: &std::path::Path,
        log: std::fs::File,
        extra: &[&str],
    ) -> Child {
        Command::new("ip")
            .args(["netns", "exec", ns, "dnsmasq", "--keep-in-foreground"])
            .args([
                "--conf-file=/dev/null",
                "--port=0",
                "--user=root",
                "--log-dhcp",
            ])
            .arg(format!("--interface={iface}"))
            .args(["--bind-interfaces", "--log-facility=-"])
            .arg("--dhcp-range=10.77.0.50,10.77.0.60,255.255.255.0,1h")
            .arg("--dhcp-option=3,10.77.0.1")
            .args(extra)
            .arg(format!("--dhcp-leasefile={}", leases.display()))
            // Not /run/dnsmasq.pid: a killed instance leaves it behind, and
            // the next dnsmasq then refuses to start.
            .arg(format!(
                "--pid-file={}",
                leases.with_extension("pid").display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("dnsmasq starts")
    }

    fn ip(args: &[&str]) -> Result<String> {
        crate::cmd::run(Command::new("ip").args(args))
    }

    /// The real client against dnsmasq over a veth pair: the server end in a
    /// named namespace, the client end in a namespace of the test's own
    /// thread (so nothing on the host changes).
    #[test]
    fn leases_from_dnsmasq_in_a_network_namespace() {
        let Some(mut server) = server_namespace("nodeflash-dhcp") else {
            return;
        };
        let ns = server.name.clone();
        let dir = tempfile::tempdir().expect("tempdir");
        let leases = dir.path().join("leases");
        let log = std::fs::File::create(dir.path().join("dnsmasq.log")).expect("log file");
        // The client thread creates the veth pair; dnsmasq waits for its end.
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let ns2 = ns.clone();
        let client = std::thread::spawn(move || -> Result<(Lease, String, String)> {
            // SAFETY: unshare(CLONE_NEWNET) moves only this thread into a new
            // network namespace; commands it starts inherit it.
            if unsafe { nix::libc::unshare(nix::libc::CLONE_NEWNET) } != 0 {
                bail!("unshare: {}", io::Error::last_os_error());
            }
            let ns = ns2.as_str();
            ip(&[
                "link", "add", "nfc0", "type", "veth", "peer", "name", "nfs0", "netns", ns,
            ])?;
            ip(&["-n", ns, "addr", "add", "10.77.0.1/24", "dev", "nfs0"])?;
            ip(&["-n", ns, "link", "set", "nfs0", "up"])?;
            let _ = ready_tx.send(());
            go_rx.recv().context("the test gave up")?;
            crate::net::link::set_up("nfc0")?;
            let mac = crate::net::link::hardware_address("nfc0")?;
            let lease = acquire("nfc0", mac, Duration::from_secs(30), &|l| eprintln!("{l}"))?;
            configure(&lease)?;
            let addr = ip(&["-4", "-o", "addr", "show", "dev", "nfc0"])?;
            let route = ip(&["-4", "route", "show", "default"])?;
            Ok((lease, addr, route))
        });
        if ready_rx.recv().is_ok() {
            let child = start_dnsmasq(
                &ns,
                "nfs0",
                &leases,
                log,
                &["--dhcp-option=6,10.77.0.53,10.77.0.54"],
            );
            server.dnsmasq = Some(child);
            let _ = go_tx.send(());
        }
        let result = client.join().expect("client thread");
        let dnsmasq_log =
            std::fs::read_to_string(dir.path().join("dnsmasq.log")).unwrap_or_default();
        let (lease, addr, route) =
            result.unwrap_or_else(|e| panic!("{e:#}\ndnsmasq said:\n{dnsmasq_log}"));
        let a = lease.address.octets();
        assert!(
            a[..3] == [10, 77, 0] && (50..=60).contains(&a[3]),
            "{lease:?}"
        );
        assert_eq!(lease.netmask, Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(lease.router, Some(Ipv4Addr::new(10, 77, 0, 1)));
        assert_eq!(
            lease.dns,
            [Ipv4Addr::new(10, 77, 0, 53), Ipv4Addr::new(10, 77, 0, 54)]
        );
        assert_eq!(lease.lease_secs, Some(3600));
        assert_eq!(lease.server, Ipv4Addr::new(10, 77, 0, 1));
        assert!(
            addr.contains(&format!("inet {}/24 ", lease.address)),
            "{addr}"
        );
        assert!(route.contains("default via 10.77.0.1 dev nfc0"), "{route}");
        assert!(dnsmasq_log.contains("DHCPACK(nfs0)"), "{dnsmasq_log}");
        drop(server);
    }

    /// Issue 17, case 9: two NICs with a link, DHCP only behind the second
    /// (the first is on a network without a server, as a cable in the wrong
    /// port or a storage VLAN): `bring_up` asks on both and takes the lease
    /// of the one that answers. Real veth pairs and dnsmasq; the sysfs the
    /// interfaces are listed from is a fixture, since sysfs shows the host's
    /// network namespace, not the test thread's.
    #[test]
    fn the_lease_comes_from_whichever_interface_answers() {
        let Some(mut server) = server_namespace("nodeflash-dhcp2") else {
            return;
        };
        let ns = server.name.clone();
        let dir = tempfile::tempdir().expect("tempdir");
        let sysfs = dir.path().join("sys");
        for n in ["nfc0", "nfc1"] {
            let d = sysfs.join("class/net").join(n);
            std::fs::create_dir_all(&d).expect("fixture");
            std::fs::write(d.join("type"), "1\n").expect("type");
            std::fs::write(d.join("carrier"), "1\n").expect("carrier");
        }
        let resolv = dir.path().join("resolv.conf");
        let log = std::fs::File::create(dir.path().join("dnsmasq.log")).expect("log file");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let ns2 = ns.clone();
        let cfg = crate::net::NetConfig {
            sysfs,
            resolv_conf: resolv.clone(),
            link_timeout: Duration::from_secs(5),
            dhcp_timeout: Duration::from_secs(20),
        };
        let client = std::thread::spawn(move || -> Result<(Lease, Vec<String>)> {
            // SAFETY: as in the test above; threads this one starts share
            // its network namespace.
            if unsafe { nix::libc::unshare(nix::libc::CLONE_NEWNET) } != 0 {
                bail!("unshare: {}", io::Error::last_os_error());
            }
            let ns = ns2.as_str();
            for (c, s, net) in [
                ("nfc0", "nfs0", "10.78.0.1/24"),
                ("nfc1", "nfs1", "10.77.0.1/24"),
            ] {
                ip(&[
                    "link", "add", c, "type", "veth", "peer", "name", s, "netns", ns,
                ])?;
                ip(&["-n", ns, "addr", "add", net, "dev", s])?;
                ip(&["-n", ns, "link", "set", s, "up"])?;
            }
            let _ = ready_tx.send(());
            go_rx.recv().context("the test gave up")?;
            let lines = std::sync::Mutex::new(Vec::new());
            let lease = crate::net::bring_up(&cfg, &|l| {
                eprintln!("{l}");
                lines.lock().expect("log").push(l.to_string());
            })?;
            let lines = lines.into_inner().expect("log");
            Ok((lease, lines))
        });
        if ready_rx.recv().is_ok() {
            let child = start_dnsmasq(&ns, "nfs1", &dir.path().join("leases"), log, &[]);
            server.dnsmasq = Some(child);
            let _ = go_tx.send(());
        }
        let result = client.join().expect("client thread");
        let dnsmasq_log =
            std::fs::read_to_string(dir.path().join("dnsmasq.log")).unwrap_or_default();
        let (lease, lines) =
            result.unwrap_or_else(|e| panic!("{e:#}\ndnsmasq said:\n{dnsmasq_log}"));
        assert_eq!(lease.interface, "nfc1", "{lease:?}");
        for want in [
            "net: link on nfc0; asking for a DHCP lease",
            "net: link on nfc1; asking for a DHCP lease",
        ] {
            assert!(lines.iter().any(|l| l == want), "no {want:?} in {lines:?}");
        }
        let last = lines.last().expect("a line");
        assert!(
            last.contains(" on nfc1")
                && last.ends_with("(the first of 2 interfaces with a link to answer)"),
            "{last}"
        );
        assert!(
            std::fs::read_to_string(&resolv).is_ok(),
            "no resolv.conf written"
        );
        drop(server);
    }
}

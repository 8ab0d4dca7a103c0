//! Network interfaces without udev or `ip`: listing them and their link
//! state from sysfs, and the few ioctls that bring one up, give it an address
//! and a default route.

use std::ffi::CString;
use std::fs;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::libc;
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

/// Wired (Ethernet-type) interfaces in sysfs, sorted; never `lo`.
pub fn ethernet_interfaces(sysfs: &Path) -> Vec<String> {
    let dir = sysfs.join("class/net");
    let mut names: Vec<String> = fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    // ARPHRD_ETHER is 1; loopback, tunnels and the like are not.
    names.retain(|n| {
        n != "lo" && fs::read_to_string(dir.join(n).join("type")).is_ok_and(|t| t.trim() == "1")
    });
    names.sort();
    names
}

/// Whether the interface has a link (`carrier` reads 1; it cannot be read
/// while the interface is down).
pub fn has_carrier(sysfs: &Path, ifname: &str) -> bool {
    fs::read_to_string(sysfs.join("class/net").join(ifname).join("carrier"))
        .is_ok_and(|c| c.trim() == "1")
}

/// Waits until one of `names` (in order of preference) has a link; returns
/// its name. Checks at least once, then every 100 ms until `timeout`.
pub fn wait_for_carrier(sysfs: &Path, names: &[String], timeout: Duration) -> Result<String> {
    if names.is_empty() {
        bail!("no wired network interface found (is its driver in the image?)");
    }
    crate::wait::wait_until(timeout, Duration::from_millis(100), || {
        names.iter().find(|n| has_carrier(sysfs, n)).cloned()
    })
    .with_context(|| {
        format!(
            "no link on {} after {}s: is a cable plugged in and the switch port up?",
            names.join(", "),
            timeout.as_secs()
        )
    })
}

/// A socket for interface ioctls.
fn control_socket() -> Result<OwnedFd> {
    socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("cannot open a socket for interface configuration")
}

/// An `ifreq` naming `ifname`, everything else zero.
fn ifreq(ifname: &str) -> Result<libc::ifreq> {
    let name = ifname.as_bytes();
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(&0) {
        bail!("`{ifname}` is not a valid interface name");
    }
    // SAFETY: ifreq is plain data (names, addresses, integers, a pointer) for
    // which all zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name) {
        *dst = *src as libc::c_char;
    }
    Ok(req)
}

/// An IPv4 `sockaddr` (a `sockaddr_in` in `sockaddr`'s 16 bytes).
fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: both are 16-byte plain-data structs; this is how the kernel
    // reads an AF_INET address given as a sockaddr.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// One ioctl on `fd` with a pointer argument.
fn ioctl<T>(fd: &OwnedFd, request: libc::c_ulong, arg: &mut T, what: &str) -> Result<()> {
    // SAFETY: `arg` is a live, exclusively borrowed struct of the type the
    // request expects (checked at each call site).
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg as *mut T) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error()).context(what.to_string());
    }
    Ok(())
}

/// Sets IFF_UP on the interface.
pub fn set_up(ifname: &str) -> Result<()> {
    let fd = control_socket()?;
    let mut req = ifreq(ifname)?;
    let what = format!("cannot read the flags of {ifname}");
    ioctl(&fd, libc::SIOCGIFFLAGS, &mut req, &what)?;
    // SAFETY: SIOCGIFFLAGS filled in the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    ioctl(
        &fd,
        libc::SIOCSIFFLAGS,
        &mut req,
        &format!("cannot bring {ifname} up"),
    )
}

/// The interface's MAC address.
pub fn hardware_address(ifname: &str) -> Result<[u8; 6]> {
    let fd = control_socket()?;
    let mut req = ifreq(ifname)?;
    let what = format!("cannot read the MAC address of {ifname}");
    ioctl(&fd, libc::SIOCGIFHWADDR, &mut req, &what)?;
    // SAFETY: SIOCGIFHWADDR filled in the hwaddr member of the union.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (m, d) in mac.iter_mut().zip(data) {
        *m = d as u8;
    }
    Ok(mac)
}

/// Gives the interface its address and netmask.
pub fn set_address(ifname: &str, address: Ipv4Addr, netmask: Ipv4Addr) -> Result<()> {
    let fd = control_socket()?;
    let mut req = ifreq(ifname)?;
    req.ifr_ifru.ifru_addr = sockaddr(address);
    ioctl(
        &fd,
        libc::SIOCSIFADDR,
        &mut req,
        &format!("cannot set address {address} on {ifname}"),
    )?;
    let mut req = ifreq(ifname)?;
    req.ifr_ifru.ifru_netmask = sockaddr(netmask);
    ioctl(
        &fd,
        libc::SIOCSIFNETMASK,
        &mut req,
        &format!("cannot set netmask {netmask} on {ifname}"),
    )
}

/// Adds a default route through `gateway` on the interface (one that is
/// already there is fine).
pub fn add_default_route(ifname: &str, gateway: Ipv4Addr) -> Result<()> {
    let fd = control_socket()?;
    let dev = CString::new(ifname).context("interface name with a NUL byte")?;
    // SAFETY: rtentry is plain data for which all zero bytes are valid.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
    rt.rt_gateway = sockaddr(gateway);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    // The kernel only reads the name; `dev` outlives the call.
    rt.rt_dev = dev.as_ptr().cast_mut();
    let what = format!("cannot add a default route via {gateway} on {ifname}");
    match ioctl(&fd, libc::SIOCADDRT, &mut rt, &what) {
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .and_then(|io| io.raw_os_error())
                == Some(libc::EEXIST) =>
        {
            Ok(())
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, rel: &str, content: &str) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().expect("has parent")).expect("mkdir");
        fs::write(p, content).expect("write fixture");
    }

    #[test]
    fn lists_wired_interfaces_and_finds_the_one_with_a_link() {
        let t = tempfile::tempdir().expect("tempdir");
        let r = t.path();
        write(r, "class/net/lo/type", "772\n");
        write(r, "class/net/lo/carrier", "1\n");
        write(r, "class/net/sit0/type", "776\n");
        write(r, "class/net/enp2s0/type", "1\n");
        write(r, "class/net/enp2s0/carrier", "0\n");
        write(r, "class/net/enp1s0/type", "1\n");
        write(r, "class/net/eth9/type", "1\n"); // down: no carrier file
        let names = ethernet_interfaces(r);
        assert_eq!(names, ["enp1s0", "enp2s0", "eth9"]);
        let e = wait_for_carrier(r, &names, Duration::ZERO).expect_err("no link yet");
        assert_eq!(
            e.to_string(),
            "no link on enp1s0, enp2s0, eth9 after 0s: is a cable plugged in and the switch port up?"
        );
        write(r, "class/net/enp2s0/carrier", "1\n");
        assert_eq!(
            wait_for_carrier(r, &names, Duration::ZERO).expect("link"),
            "enp2s0"
        );
        let e = wait_for_carrier(r, &[], Duration::ZERO).expect_err("no NIC");
        assert!(e.to_string().contains("no wired network interface"), "{e}");
    }

    #[test]
    fn sockaddr_holds_the_address_in_network_order() {
        let sa = sockaddr(Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(sa.sa_family, libc::AF_INET as libc::sa_family_t);
        // sockaddr_in: port (2 bytes), then the address.
        let data: Vec<u8> = sa.sa_data.iter().map(|&b| b as u8).collect();
        assert_eq!(&data[..6], &[0, 0, 10, 0, 2, 15]);
    }

    #[test]
    fn bad_interface_names_are_refused() {
        for bad in ["", "a-name-that-is-too-long", "a\0b"] {
            assert!(ifreq(bad).is_err(), "{bad:?}");
        }
        let e = set_up("nodeflash-none").expect_err("no such interface");
        assert!(format!("{e:#}").contains("nodeflash-none"), "{e:#}");
    }
}

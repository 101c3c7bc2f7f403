//! Guest-side interface configuration, done by the guest init (PID 1)
//! before the command runs: loopback up, each leased interface's address,
//! netmask, MTU and link, and the default route. Plain `SIOCSIF*` and
//! `SIOCADDRT` ioctls on an `AF_INET` socket: no netlink stack in PID 1.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};

use crate::protocol::NicSpec;

fn inet_socket() -> Result<OwnedFd, String> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("socket for interface setup: {e}"))
}

fn ifreq(name: &str) -> Result<libc::ifreq, String> {
    // SAFETY: ifreq is plain old data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        return Err(format!("interface name {name:?} is too long"));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(req)
}

fn sockaddr(a: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(a).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the kernel reads
    // it as the sockaddr_in its family says it is.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ioctl(
    s: &OwnedFd,
    req: libc::c_ulong,
    arg: *mut libc::c_void,
    what: &str,
) -> Result<(), String> {
    // SAFETY: every caller passes a request whose argument is the pointed-to
    // structure (ifreq or rtentry), valid and writable for the call.
    if unsafe { libc::ioctl(s.as_raw_fd(), req, arg) } != 0 {
        return Err(format!("{what}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Bring interface `name` up.
pub fn up(name: &str) -> Result<(), String> {
    let s = inet_socket()?;
    let mut req = ifreq(name)?;
    ioctl(
        &s,
        libc::SIOCGIFFLAGS,
        &mut req as *mut _ as *mut _,
        &format!("SIOCGIFFLAGS {name}"),
    )?;
    // SAFETY: ifru_flags is the union member SIOCGIFFLAGS filled.
    unsafe {
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    ioctl(
        &s,
        libc::SIOCSIFFLAGS,
        &mut req as *mut _ as *mut _,
        &format!("SIOCSIFFLAGS {name}"),
    )
}

/// Give `nic.device` its address, netmask and MTU, and bring it up.
pub fn configure(nic: &NicSpec) -> Result<(), String> {
    let s = inet_socket()?;
    let name = nic.device.as_str();
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_addr = sockaddr(nic.address);
    ioctl(
        &s,
        libc::SIOCSIFADDR,
        &mut req as *mut _ as *mut _,
        &format!("set address of {name}"),
    )?;
    let mask = if nic.prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(nic.prefix.min(32)))
    };
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_netmask = sockaddr(Ipv4Addr::from(mask));
    ioctl(
        &s,
        libc::SIOCSIFNETMASK,
        &mut req as *mut _ as *mut _,
        &format!("set netmask of {name}"),
    )?;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_mtu = nic.mtu as libc::c_int;
    ioctl(
        &s,
        libc::SIOCSIFMTU,
        &mut req as *mut _ as *mut _,
        &format!("set MTU of {name}"),
    )?;
    up(name)
}

/// Add the default route through `gw`.
pub fn default_route(gw: Ipv4Addr) -> Result<(), String> {
    let s = inet_socket()?;
    // SAFETY: rtentry is plain old data; zeroed is a valid value.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
    rt.rt_gateway = sockaddr(gw);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    ioctl(
        &s,
        libc::SIOCADDRT,
        &mut rt as *mut _ as *mut _,
        &format!("add default route via {gw}"),
    )
}

/// Loopback, every interface, then the default route via the first one.
pub fn setup(nics: &[NicSpec]) -> Result<(), String> {
    up("lo")?;
    for n in nics {
        configure(n)?;
    }
    if let Some(first) = nics.first() {
        default_route(first.gateway)?;
    }
    Ok(())
}

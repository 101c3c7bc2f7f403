//! Collision domains as kernel bridges, and devices' interfaces as taps on
//! them, in the lab's network namespace. Plain ioctls (`SIOCBRADDBR`,
//! `SIOCBRADDIF`, `SIOCSIFFLAGS`): no netlink stack for three operations.

use std::os::fd::{AsRawFd, OwnedFd};

const SIOCBRADDBR: libc::c_ulong = 0x89a0;
const SIOCBRADDIF: libc::c_ulong = 0x89a2;

fn socket() -> Result<OwnedFd, String> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    socket(
        AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("socket for bridge setup: {e}"))
}

fn name_c(name: &str) -> Result<[libc::c_char; libc::IFNAMSIZ], String> {
    let mut out = [0 as libc::c_char; libc::IFNAMSIZ];
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(format!("interface name {name:?} is not valid"));
    }
    for (d, s) in out.iter_mut().zip(name.bytes()) {
        *d = libc::c_char::from_ne_bytes([s]);
    }
    Ok(out)
}

fn ifreq(name: &str) -> Result<libc::ifreq, String> {
    // SAFETY: ifreq is plain old data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    req.ifr_name = name_c(name)?;
    Ok(req)
}

fn check(r: libc::c_int, what: &str) -> Result<(), String> {
    if r < 0 {
        Err(format!("{what}: {}", std::io::Error::last_os_error()))
    } else {
        Ok(())
    }
}

/// Create bridge `name` and bring it up.
pub fn bridge(name: &str) -> Result<(), String> {
    let s = socket()?;
    let n = name_c(name)?;
    // SAFETY: SIOCBRADDBR reads a NUL-terminated name, which `n` is
    // (IFNAMSIZ bytes, the name shorter).
    let r = unsafe { libc::ioctl(s.as_raw_fd(), SIOCBRADDBR, n.as_ptr()) };
    check(r, &format!("create bridge {name}"))?;
    up(name)
}

/// Bring interface `name` up.
pub fn up(name: &str) -> Result<(), String> {
    let s = socket()?;
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFFLAGS fills the ifreq we pass, valid for the call.
    let r = unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
    check(r, &format!("read the flags of {name}"))?;
    // SAFETY: ifru_flags is the union member SIOCGIFFLAGS filled.
    unsafe {
        req.ifr_ifru.ifru_flags |= libc::c_short::try_from(libc::IFF_UP).unwrap_or(1);
    }
    // SAFETY: SIOCSIFFLAGS reads the ifreq, valid for the call.
    let r = unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &req) };
    check(r, &format!("bring up {name}"))
}

/// Put the existing interface `name` on bridge `bridge`, up.
pub fn attach(name: &str, bridge: &str) -> Result<(), String> {
    let index =
        nix::net::if_::if_nametoindex(name).map_err(|e| format!("find interface {name}: {e}"))?;
    let s = socket()?;
    let mut req = ifreq(bridge)?;
    req.ifr_ifru.ifru_ifindex =
        libc::c_int::try_from(index).map_err(|_| format!("{name}: index out of range"))?;
    // SAFETY: SIOCBRADDIF reads the ifreq (bridge name, port index), valid
    // for the call.
    let r = unsafe { libc::ioctl(s.as_raw_fd(), SIOCBRADDIF, &req) };
    check(r, &format!("attach {name} to bridge {bridge}"))?;
    up(name)
}

/// Create tap `name` on bridge `bridge`, up, and return its descriptor
/// (for UML's `fd` transport; the tap lives as long as the descriptor).
pub fn tap(name: &str, bridge: &str) -> Result<OwnedFd, String> {
    let fd = umlctl_netd::tap::create_fd(name).map_err(|e| {
        let denied = e.source.kind() == std::io::ErrorKind::PermissionDenied;
        if denied {
            format!(
                "{e}: this user may not open /dev/net/tun (it is 0666 on stock Debian, Ubuntu and Fedora); as root: chmod 0666 /dev/net/tun (or a udev rule: KERNEL==\"tun\", MODE=\"0666\"), or run the lab as root"
            )
        } else {
            e.to_string()
        }
    })?;
    attach(name, bridge)?;
    Ok(fd)
}

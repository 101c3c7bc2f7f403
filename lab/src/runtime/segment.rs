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
    set_up(name, true)
}

/// Set or clear interface `name`'s IFF_UP.
fn set_up(name: &str, on: bool) -> Result<(), String> {
    let s = socket()?;
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFFLAGS fills the ifreq we pass, valid for the call.
    let r = unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
    check(r, &format!("read the flags of {name}"))?;
    let flag = libc::c_short::try_from(libc::IFF_UP).unwrap_or(1);
    // SAFETY: ifru_flags is the union member SIOCGIFFLAGS filled.
    unsafe {
        if on {
            req.ifr_ifru.ifru_flags |= flag;
        } else {
            req.ifr_ifru.ifru_flags &= !flag;
        }
    }
    // SAFETY: SIOCSIFFLAGS reads the ifreq, valid for the call.
    let r = unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &req) };
    check(
        r,
        &format!("bring {} {name}", if on { "up" } else { "down" }),
    )
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

const SIOCBRDELBR: libc::c_ulong = 0x89a1;
const SIOCSIFVLAN: libc::c_ulong = 0x8983;
const ADD_VLAN_CMD: libc::c_int = 0;
const DEL_VLAN_CMD: libc::c_int = 1;

/// `struct vlan_ioctl_args` (linux/if_vlan.h).
#[repr(C)]
struct VlanArgs {
    cmd: libc::c_int,
    device1: [libc::c_char; 24],
    /// The union: `device2[24]`, or `VID` in its first four bytes.
    u: [u8; 24],
    vlan_qos: libc::c_short,
}

fn vlan_ioctl(cmd: libc::c_int, dev: &str, vid: u16, what: &str) -> Result<(), String> {
    let s = socket_inet()?;
    let mut a = VlanArgs {
        cmd,
        device1: [0; 24],
        u: [0; 24],
        vlan_qos: 0,
    };
    let n = name_c(dev)?;
    a.device1[..n.len()].copy_from_slice(&n);
    a.u[..4].copy_from_slice(&libc::c_int::from(vid).to_ne_bytes());
    // SAFETY: SIOCSIFVLAN reads a vlan_ioctl_args, which VlanArgs lays out
    // (repr(C)), valid for the call.
    let r = unsafe { libc::ioctl(s.as_raw_fd(), SIOCSIFVLAN, &mut a) };
    check(r, what)
}

fn socket_inet() -> Result<OwnedFd, String> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("socket for VLAN setup: {e}"))
}

/// Whether interface `name` exists in this network namespace.
pub fn exists(name: &str) -> bool {
    nix::net::if_::if_nametoindex(name).is_ok()
}

/// Create the 802.1Q VLAN `vid` on `parent`, named `PARENT.VID`, up.
pub fn add_vlan(parent: &str, vid: u16) -> Result<String, String> {
    let name = format!("{parent}.{vid}");
    vlan_ioctl(
        ADD_VLAN_CMD,
        parent,
        vid,
        &format!("create VLAN {vid} on {parent}"),
    )
    .map_err(|e| {
        // ENOPKG: no 8021q in this kernel (the ioctl's hook is unset).
        if e.contains("os error 65") {
            format!(
                "{e}: the host kernel has no 802.1Q VLAN support (module 8021q: `modprobe 8021q`)"
            )
        } else {
            e
        }
    })?;
    if !exists(&name) {
        // The host names VLANs another way (vconfig set_name_type): take
        // back what was made, under the names the kernel may have used.
        for other in [
            format!("vlan{vid:04}"),
            format!("vlan{vid}"),
            format!("{parent}.{vid:04}"),
        ] {
            if exists(&other) {
                let _ = vlan_ioctl(DEL_VLAN_CMD, &other, 0, "delete VLAN");
            }
        }
        return Err(format!(
            "create VLAN {vid} on {parent}: the host does not name VLANs PARENT.VID (vconfig set_name_type); create {name} yourself and lab.ext will use it"
        ));
    }
    up(&name)?;
    Ok(name)
}

/// Delete the VLAN interface `name`.
pub fn delete_vlan(name: &str) -> Result<(), String> {
    vlan_ioctl(DEL_VLAN_CMD, name, 0, &format!("delete VLAN {name}"))
}

/// Bring interface `name` down.
pub fn down(name: &str) -> Result<(), String> {
    set_up(name, false)
}

/// Delete bridge `name` (down first; its ports are let go).
pub fn delete_bridge(name: &str) -> Result<(), String> {
    down(name)?;
    let s = socket()?;
    let n = name_c(name)?;
    // SAFETY: SIOCBRDELBR reads a NUL-terminated name, which `n` is.
    let r = unsafe { libc::ioctl(s.as_raw_fd(), SIOCBRDELBR, n.as_ptr()) };
    check(r, &format!("delete bridge {name}"))
}

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GDRVINFO: u32 = 0x3;

/// The driver of interface `name` (`bridge`, `veth`, `tun`, …), as
/// `ethtool -i` reads it: in this thread's network namespace, whatever
/// /sys shows.
pub fn driver(name: &str) -> Result<String, String> {
    // struct ethtool_drvinfo: cmd, then driver[32], and 160 more bytes.
    let mut info = [0u8; 196];
    info[..4].copy_from_slice(&ETHTOOL_GDRVINFO.to_ne_bytes());
    let s = socket_inet()?;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_data = info.as_mut_ptr().cast();
    // SAFETY: SIOCETHTOOL with ETHTOOL_GDRVINFO writes at most
    // sizeof(struct ethtool_drvinfo) = 196 bytes to ifr_data, which points
    // at `info` (196 bytes, alive for the call).
    let r = unsafe { libc::ioctl(s.as_raw_fd(), SIOCETHTOOL, &mut req) };
    check(r, &format!("read the driver of {name}"))?;
    let d = &info[4..36];
    let end = d.iter().position(|&b| b == 0).unwrap_or(d.len());
    Ok(String::from_utf8_lossy(&d[..end]).into_owned())
}

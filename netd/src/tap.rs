//! Tap devices through the tun driver's ioctls on `/dev/net/tun`: a
//! persistent tap owned by a user (UML opens it by name), or an open tap
//! whose descriptor is handed over. Links are removed through netlink
//! ([`crate::link`]), which works whether or not someone has the tap open.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

const TUN: &str = "/dev/net/tun";
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

nix::ioctl_write_ptr_bad!(
    tun_set_iff,
    nix::request_code_write!(b'T', 202, std::mem::size_of::<libc::c_int>()),
    libc::ifreq
);
nix::ioctl_write_int_bad!(
    tun_set_persist,
    nix::request_code_write!(b'T', 203, std::mem::size_of::<libc::c_int>())
);
nix::ioctl_write_int_bad!(
    tun_set_owner,
    nix::request_code_write!(b'T', 204, std::mem::size_of::<libc::c_int>())
);

/// A tun operation that failed, with the device and the operation.
#[derive(Debug, thiserror::Error)]
#[error("{op} {name}: {source}")]
pub struct TapError {
    pub op: &'static str,
    pub name: String,
    #[source]
    pub source: std::io::Error,
}

fn err<'a>(op: &'static str, name: &'a str) -> impl FnOnce(nix::errno::Errno) -> TapError + 'a {
    move |e| TapError {
        op,
        name: name.to_string(),
        source: std::io::Error::from_raw_os_error(e as i32),
    }
}

/// Open `/dev/net/tun` and attach to (or create) tap `name`.
fn attach(name: &str) -> Result<OwnedFd, TapError> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(Path::new(TUN))
        .map_err(|source| TapError {
            op: "open /dev/net/tun for",
            name: name.to_string(),
            source,
        })?;
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= ifr.ifr_name.len() || name.bytes().any(|b| b == 0) {
        return Err(TapError {
            op: "name",
            name: name.to_string(),
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        });
    }
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = libc::c_char::from_ne_bytes([s]);
    }
    ifr.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI;
    // SAFETY: the fd is an open /dev/net/tun; ifr is a valid ifreq that
    // outlives the call.
    unsafe { tun_set_iff(f.as_raw_fd(), &ifr) }.map_err(err("TUNSETIFF", name))?;
    Ok(OwnedFd::from(f))
}

/// TUNSETOWNER's argument: the uid's bits as the ioctl's int (the kernel
/// reads them back as a uid_t, so uids above 2^31 pass unchanged).
fn uid_arg(uid: u32) -> libc::c_int {
    libc::c_int::from_ne_bytes(uid.to_ne_bytes())
}

/// Create tap `name` as persistent and owned by `uid`: the owner's UML can
/// then open it by name (if it may open `/dev/net/tun`).
pub fn create_owned(name: &str, uid: u32) -> Result<(), TapError> {
    let fd = attach(name)?;
    // SAFETY: fd is an attached tun fd; the arguments are plain integers.
    unsafe { tun_set_owner(fd.as_raw_fd(), uid_arg(uid)) }.map_err(err("TUNSETOWNER", name))?;
    // SAFETY: as above.
    unsafe { tun_set_persist(fd.as_raw_fd(), 1) }.map_err(err("TUNSETPERSIST", name))?;
    Ok(())
}

/// Give an existing persistent tap to another owner (needs CAP_NET_ADMIN):
/// a root umlctl hands the tap netd made for it to the unprivileged uid its
/// jailed UML runs as.
pub fn set_owner(name: &str, uid: u32) -> Result<(), TapError> {
    let fd = attach(name)?;
    // SAFETY: fd is an attached tun fd; the argument is a plain integer.
    unsafe { tun_set_owner(fd.as_raw_fd(), uid_arg(uid)) }.map_err(err("TUNSETOWNER", name))?;
    Ok(())
}

/// Create tap `name` and return its descriptor (no vnet header, as UML's
/// `fd` transport expects). The tap exists while the descriptor (or a copy
/// of it) is open.
pub fn create_fd(name: &str) -> Result<OwnedFd, TapError> {
    attach(name)
}

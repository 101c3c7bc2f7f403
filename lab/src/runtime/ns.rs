//! The lab's own network namespace (and, when umlctl is not root, its own
//! user namespace): the collision domains' bridges and the devices' taps
//! live there, and so do the devices' jails, so that nothing of the lab
//! touches the host's network and labs never see each other.
//!
//! No process is kept to hold the namespace: every device's tap
//! descriptor and jail keeps it alive, and it goes with the last device.
//! Later commands join it through a running device's jail (its PID 1).

use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

/// `NS_GET_USERNS` (linux/nsfs.h): the user namespace owning a namespace.
const NS_GET_USERNS: libc::c_ulong = 0xb701;

fn threads() -> usize {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn single_threaded() -> Result<(), String> {
    match threads() {
        1 => Ok(()),
        n => Err(format!(
            "internal: entering a lab's namespaces needs a single-threaded process ({n} threads)"
        )),
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The inode of this thread's network namespace (what tells one lab's
/// namespace from another, and from a recycled pid's).
pub fn current_netns() -> Result<u64, String> {
    fs::metadata("/proc/thread-self/ns/net")
        .map(|m| m.ino())
        .map_err(|e| format!("stat /proc/thread-self/ns/net: {e}"))
}

/// Move this process into a new network namespace, inside a new user
/// namespace (mapping only the invoking user) when umlctl is not root.
pub fn create() -> Result<(), String> {
    single_threaded()?;
    if is_root() {
        return nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("create the lab's network namespace: {e}"));
    }
    let uid = nix::unistd::geteuid().as_raw();
    let gid = nix::unistd::getegid().as_raw();
    nix::sched::unshare(
        nix::sched::CloneFlags::CLONE_NEWUSER | nix::sched::CloneFlags::CLONE_NEWNET,
    )
    .map_err(|e| {
        format!(
            "create the lab's user and network namespaces: {e}; unprivileged user namespaces must be enabled (see `umlctl doctor`)"
        )
    })?;
    let w = |p: &str, s: String| fs::write(p, s).map_err(|e| format!("write {p}: {e}"));
    w("/proc/self/setgroups", "deny".into())?;
    w("/proc/self/uid_map", format!("{uid} {uid} 1\n"))?;
    w("/proc/self/gid_map", format!("{gid} {gid} 1\n"))
}

/// Join the lab namespaces process `pid` is in (a device's jail),
/// provided its network namespace is still `netns` (the lab's, not a
/// recycled pid's).
pub fn join(pid: i32, netns: u64) -> Result<(), String> {
    single_threaded()?;
    let path = format!("/proc/{pid}/ns/net");
    let net = fs::File::open(&path).map_err(|e| format!("open {path}: {e}"))?;
    let ino = net
        .metadata()
        .map_err(|e| format!("stat {path}: {e}"))?
        .ino();
    if ino != netns {
        return Err(format!(
            "process {pid} is no longer in the lab's network namespace"
        ));
    }
    if !is_root() {
        // SAFETY: NS_GET_USERNS takes no argument and returns a new
        // descriptor (or -1) on a namespace descriptor we own.
        let fd = unsafe { libc::ioctl(net.as_raw_fd(), NS_GET_USERNS) };
        if fd < 0 {
            return Err(format!(
                "find the lab's user namespace: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: the ioctl returned a fresh descriptor that nothing else owns.
        let user = unsafe { OwnedFd::from_raw_fd(fd) };
        nix::sched::setns(&user, nix::sched::CloneFlags::CLONE_NEWUSER)
            .map_err(|e| format!("enter the lab's user namespace: {e}"))?;
    }
    nix::sched::setns(&net, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("enter the lab's network namespace: {e}"))
}

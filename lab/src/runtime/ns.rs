//! The lab's own network namespace (and, when umlctl is not root, its own
//! user namespace): the collision domains' bridges and the devices' taps
//! live there, and so do the devices' jails, so that nothing of the lab
//! touches the host's network and labs never see each other.
//!
//! No process is kept to hold the namespace: every device's tap
//! descriptor and jail keeps it alive, and it goes with the last device.
//! Later commands join it through a running device's jail (its PID 1).

use std::fs;
use std::io::Read;
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
///
/// A forked child makes the namespaces and holds them while `outside`
/// runs with this process still in the host's network namespace (given
/// the child's pid: what must reach the outside, the lab's user-mode
/// network stacks, starts there); then this process joins them.
pub fn create(outside: &mut dyn FnMut(i32) -> Result<(), String>) -> Result<(), String> {
    single_threaded()?;
    let root = is_root();
    let pipe =
        || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"));
    let (ready_r, ready_w) = pipe()?;
    let (go_r, go_w) = pipe()?;
    let mut flags = libc::CLONE_NEWNET;
    if !root {
        flags |= libc::CLONE_NEWUSER;
    }
    // SAFETY: this process is single-threaded (checked above); the child
    // makes only raw system calls (unshare, write, read, _exit).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: raw system calls on descriptors this process owns.
        unsafe {
            // The parent's ends: a copy of `go`'s write end here would keep
            // this child waiting for ever.
            libc::close(go_w.as_raw_fd());
            libc::close(ready_r.as_raw_fd());
            let ok: u8 = if libc::unshare(flags) == 0 { 0 } else { 1 };
            libc::write(ready_w.as_raw_fd(), (&ok as *const u8).cast(), 1);
            let mut b = 0u8;
            libc::read(go_r.as_raw_fd(), (&mut b as *mut u8).cast(), 1);
            libc::_exit(0)
        }
    }
    drop(ready_w);
    drop(go_r);
    let child = nix::unistd::Pid::from_raw(pid);
    let end = |go: OwnedFd| {
        drop(go);
        let _ = nix::sys::wait::waitpid(child, None);
    };
    let mut b = [1u8; 1];
    let mut ready = fs::File::from(ready_r);
    if ready.read_exact(&mut b).is_err() || b[0] != 0 {
        end(go_w);
        return Err(if root {
            "create the lab's network namespace: refused (a container without CAP_SYS_ADMIN?)"
                .into()
        } else {
            "create the lab's user and network namespaces: refused; unprivileged user namespaces must be enabled (see `umlctl doctor`)".into()
        });
    }
    let r = (|| {
        if !root {
            let uid = nix::unistd::geteuid().as_raw();
            let gid = nix::unistd::getegid().as_raw();
            let w = |p: String, s: String| fs::write(&p, s).map_err(|e| format!("write {p}: {e}"));
            w(format!("/proc/{pid}/setgroups"), "deny".into())?;
            w(format!("/proc/{pid}/uid_map"), format!("{uid} {uid} 1\n"))?;
            w(format!("/proc/{pid}/gid_map"), format!("{gid} {gid} 1\n"))?;
        }
        outside(pid)?;
        let open = |what: &str| {
            let p = format!("/proc/{pid}/ns/{what}");
            fs::File::open(&p).map_err(|e| format!("open {p}: {e}"))
        };
        if !root {
            nix::sched::setns(open("user")?, nix::sched::CloneFlags::CLONE_NEWUSER)
                .map_err(|e| format!("enter the lab's user namespace: {e}"))?;
        }
        nix::sched::setns(open("net")?, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("enter the lab's network namespace: {e}"))
    })();
    end(go_w);
    r
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

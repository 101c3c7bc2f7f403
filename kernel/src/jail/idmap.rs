//! Id-mapped binds: how a root-started jail lets its unprivileged uid open
//! files the user named without changing their owner or mode on disk.

use super::*;

/// What the UML process's uid can do with a file, judged by its mode bits.
pub(super) fn can_access(md: &fs::Metadata, uid: u32, gid: u32, write: bool) -> bool {
    if uid == 0 && md.uid() == 0 {
        // uid 0 without capabilities still owns root's files.
        return md.mode() & if write { 0o200 } else { 0o400 } != 0;
    }
    let (r, w) = if md.uid() == uid {
        (0o400, 0o200)
    } else if md.gid() == gid {
        (0o040, 0o020)
    } else {
        (0o004, 0o002)
    };
    md.mode() & if write { w } else { r } != 0
}

/// A user namespace whose only mapping makes host ids `from` appear as
/// `to`, for an idmapped mount; returned as an open namespace descriptor.
pub(super) fn idmap_userns(from: (u32, u32), to: (u32, u32)) -> Result<OwnedFd> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| Error::sys("pipe", crate::error::errno(e)))?;
    // SAFETY: the child only reads a pipe and exits (async-signal-safe);
    // the parent ends it with a byte and SIGKILL below.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_NEWUSER | libc::SIGCHLD) as libc::c_ulong,
            0,
            0,
            0,
            0,
        )
    };
    if pid < 0 {
        return Err(Error::sys(
            "create a user namespace for an id-mapped mount",
            io::Error::last_os_error(),
        ));
    }
    if pid == 0 {
        let mut b = [0u8; 1];
        // SAFETY: read(2) into a local buffer, then _exit.
        unsafe {
            libc::close(w.as_raw_fd());
            libc::read(r.as_raw_fd(), b.as_mut_ptr().cast(), 1);
            libc::_exit(0);
        }
    }
    drop(r);
    let pid = crate::num::pid(pid).as_raw();
    let res = (|| {
        // The idmap namespace's ids are the on-disk ids: on-disk `from`
        // (an id inside this namespace) maps to host `to`.
        fs::write(
            format!("/proc/{pid}/uid_map"),
            format!("{} {} 1\n", from.0, to.0),
        )?;
        fs::write(format!("/proc/{pid}/setgroups"), "deny")?;
        fs::write(
            format!("/proc/{pid}/gid_map"),
            format!("{} {} 1\n", from.1, to.1),
        )?;
        File::open(format!("/proc/{pid}/ns/user")).map(OwnedFd::from)
    })();
    // Told to go by a byte, and killed to be sure: never by EOF alone. A
    // sibling forked meanwhile by another thread (devices of a lab start
    // side by side) holds a copy of `w` until it execs, and may itself be
    // this same kind of child, waiting for the end of a pipe whose write
    // end this child holds: two such children waited for each other for
    // ever, and so did their parents here.
    let _ = nix::unistd::write(&w, b"x");
    drop(w);
    let _ = nix::sys::signal::kill(Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    let _ = nix::sys::wait::waitpid(Pid::from_raw(pid), None);
    res.map_err(|e| Error::sys("set up a user namespace for an id-mapped mount", e))
}

/// A bind of `src` attached nowhere yet (open_tree with OPEN_TREE_CLONE),
/// to be moved into a jail.
pub(super) fn detached_bind(src: &Path) -> Result<OwnedFd> {
    let c = cstr(src)?;
    // SAFETY: open_tree on a valid C string; returns a new descriptor.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            c.as_ptr(),
            OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(Error::io(
            "open_tree (bind for the jail)",
            src,
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: fd is a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(RawFd::try_from(fd).unwrap_or(-1)) })
}

/// A detached bind of `src` whose owner appears as `to` (and read-only
/// unless `writable`): how a root-started jail lets its unprivileged uid
/// open the user's files without changing them.
pub(super) fn idmapped_tree(src: &Path, writable: bool, to: (u32, u32)) -> Result<OwnedFd> {
    let md = fs::metadata(src).map_err(|e| Error::io("stat", src, e))?;
    let ns = idmap_userns((md.uid(), md.gid()), to)?;
    let tree = detached_bind(src)?;
    let mut attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP
            | MOUNT_ATTR_NOSUID
            | MOUNT_ATTR_NODEV
            | if writable { 0 } else { MOUNT_ATTR_RDONLY },
        attr_clr: 0,
        propagation: 0,
        userns_fd: u64::from(ns.as_raw_fd().unsigned_abs()),
    };
    let empty = c"";
    // SAFETY: mount_setattr reads `attr` (its size is passed) for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint,
            &mut attr as *mut MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        return Err(Error::Host {
            check: "jail",
            detail: format!(
                "the jail's uid {} cannot open {} (owner {}, mode {:o}) and the filesystem refused an id-mapped mount: {e}",
                to.0,
                src.display(),
                md.uid(),
                md.mode() & 0o7777
            ),
            fix: format!(
                "make {} {} by uid {} (e.g. chmod o+{}), or choose the jail's uid with --jail-uid (0 keeps root's identity, without capabilities)",
                src.display(),
                if writable { "writable" } else { "readable" },
                to.0,
                if writable { "rw" } else { "r" }
            ),
        });
    }
    Ok(tree)
}

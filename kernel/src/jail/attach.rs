//! Disks attached to a running guest: a file bound into its jail from
//! outside.

use super::*;

/// Make host file `src` appear at the same path inside the running jail
/// whose PID 1 is `jail_pid` (for disks attached to a running guest
/// through mconsole). The jail's uid is read from `uml_pid`.
///
/// `explicit`: the user named the file (it may be id-mapped for a jail uid
/// that cannot open it); `false` for a file only a COW header names.
pub fn attach(
    jail_pid: Pid,
    uml_pid: Pid,
    src: &Path,
    writable: bool,
    explicit: bool,
) -> Result<()> {
    let src = fs::canonicalize(src).map_err(|e| Error::io("resolve", src, e))?;
    let md = fs::metadata(&src).map_err(|e| Error::io("stat", &src, e))?;
    if md.is_dir() {
        return Err(Error::Usage(format!(
            "{} is a directory, not a disk",
            src.display()
        )));
    }
    let status = fs::read_to_string(format!("/proc/{uml_pid}/status"))
        .map_err(|e| Error::io("read", format!("/proc/{uml_pid}/status"), e))?;
    let id = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u32>().ok())
    };
    let (Some(u), Some(g)) = (id("Uid:"), id("Gid:")) else {
        return Err(Error::Usage(format!(
            "cannot read the guest's uid from /proc/{uml_pid}"
        )));
    };
    let root = is_root();
    let usable = can_access(&md, u, g, false) && (!writable || can_access(&md, u, g, true));
    if root && u != 0 && !usable && !explicit {
        return Err(Error::Host {
            check: "jail",
            detail: format!(
                "the guest's uid {u} cannot read {}, which a COW header names as a backing file",
                src.display()
            ),
            fix: format!("make it readable by uid {u} if you trust that overlay"),
        });
    }
    let tree = if root && u != 0 && !usable {
        idmapped_tree(&src, writable, (u, g))?
    } else {
        detached_bind(&src)?
    };
    let open_ns = |what: &str| {
        File::open(format!("/proc/{jail_pid}/ns/{what}"))
            .map(OwnedFd::from)
            .map_err(|e| Error::io("open", format!("/proc/{jail_pid}/ns/{what}"), e))
    };
    let userns = if root { None } else { Some(open_ns("user")?) };
    let mntns = open_ns("mnt")?;
    let mut dirs = Vec::new();
    for p in parents_of(Path::new("/"), &src) {
        dirs.push(cstr(p)?);
    }
    let target = cstr(&src)?;
    let mut set = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
    if !writable {
        set |= MOUNT_ATTR_RDONLY;
    }
    // A forked child enters the jail (a single-threaded process may join
    // a user namespace); it reports the failing step in its exit status.
    // SAFETY: the child makes raw system calls only, then _exit.
    let pid = unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_ulong, 0, 0, 0, 0) };
    if pid < 0 {
        return Err(Error::sys("fork", io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: as above.
        unsafe {
            let step = attach_child(
                userns.as_ref().map(|f| f.as_raw_fd()),
                mntns.as_raw_fd(),
                tree.as_raw_fd(),
                &dirs,
                &target,
                set,
            );
            libc::_exit(step);
        }
    }
    let mut st = 0;
    // SAFETY: waitpid writes the status into `st`.
    unsafe { libc::waitpid(crate::num::pid(pid).as_raw(), &mut st, 0) };
    let code = if libc::WIFEXITED(st) {
        libc::WEXITSTATUS(st)
    } else {
        255
    };
    if code == 0 {
        return Ok(());
    }
    let what = match code {
        1 => "join the guest's user namespace",
        2 => "join the guest's mount namespace",
        3 => "make the jail's root writable for a moment",
        4 => "create the disk's path in the jail",
        5 => "attach the disk in the jail",
        _ => "attach the disk in the jail",
    };
    Err(Error::Host {
        check: "jail",
        detail: format!("{what} ({})", src.display()),
        fix: "start the guest with the disk (`umlctl start --disk FILE`), or with --no-jail".into(),
    })
}

/// The jail side of [`attach`]. Returns 0, or the failing step.
///
/// # Safety
/// Runs in a forked child: raw system calls only.
pub(super) unsafe fn attach_child(
    userns: Option<RawFd>,
    mntns: RawFd,
    tree: RawFd,
    dirs: &[CString],
    target: &CString,
    set: u64,
) -> i32 {
    if let Some(u) = userns {
        if libc::setns(u, libc::CLONE_NEWUSER) != 0 {
            return 1;
        }
    }
    if libc::setns(mntns, libc::CLONE_NEWNS) != 0 || libc::chdir(c"/".as_ptr()) != 0 {
        return 2;
    }
    let setattr = |path: &std::ffi::CStr, set: u64, clr: u64| mount_setattr(path, false, set, clr);
    let root = c"/";
    if !setattr(root, 0, MOUNT_ATTR_RDONLY) {
        return 3;
    }
    let mut rc = 0;
    for d in dirs {
        if libc::mkdir(d.as_ptr(), 0o755) != 0 && errno() != libc::EEXIST {
            rc = 4;
        }
    }
    let mut st: libc::stat = std::mem::zeroed();
    if rc == 0
        && libc::fstatat(
            libc::AT_FDCWD,
            target.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        ) != 0
    {
        let fd = libc::open(
            target.as_ptr(),
            libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
            0o644,
        );
        if fd < 0 {
            rc = 4;
        } else {
            libc::close(fd);
        }
    }
    if rc == 0
        && (libc::syscall(
            libc::SYS_move_mount,
            tree,
            c"".as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        ) != 0
            || !setattr(target, set, 0))
    {
        rc = 5;
    }
    setattr(root, MOUNT_ATTR_RDONLY, 0);
    rc
}

//! The jail's side of `clone`: building the jail from a prepared
//! [`Plan`], dropping privileges, forking and exec'ing the program, and
//! the PID 1 that waits for it. Everything here runs in a child of a
//! multi-threaded process: raw system calls only, no allocation.

// Post-fork code passes small descriptors, pids and flags between the C
// integer types of the raw system calls; nothing here may allocate to
// report a failed conversion, and no value comes from outside.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]

use super::*;

/// Place `(source, target)` descriptors and mark every other one
/// close-on-exec. Async-signal-safe; returns an errno.
pub(crate) fn place_fds_raw(fds: &[(RawFd, i32)]) -> std::result::Result<(), i32> {
    // Move the sources out of the way first, so that placing one cannot
    // clobber another that sits on a target number.
    let mut high = [0i32; 64];
    if fds.len() > high.len() {
        return Err(libc::EMFILE);
    }
    let mut top = 2;
    for (i, (src, dst)) in fds.iter().enumerate() {
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a descriptor number.
        let h = unsafe { libc::fcntl(*src, libc::F_DUPFD_CLOEXEC, 100) };
        if h < 0 {
            return Err(errno());
        }
        high[i] = h;
        top = top.max(*dst);
    }
    for (i, (_, dst)) in fds.iter().enumerate() {
        // SAFETY: dup2 on descriptor numbers; clears close-on-exec on dst.
        if unsafe { libc::dup2(high[i], *dst) } < 0 {
            return Err(errno());
        }
    }
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets flags.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            (top + 1) as libc::c_uint,
            libc::c_uint::MAX,
            CLOSE_RANGE_CLOEXEC,
        );
    }
    Ok(())
}

pub(super) fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Report a failed step to the parent and exit.
///
/// # Safety
/// Async-signal-safe: write(2) and _exit(2) only.
pub(super) unsafe fn die(err_fd: RawFd, step: u32) -> ! {
    let e = errno();
    let mut rec = [0u8; 8];
    rec[..4].copy_from_slice(&step.to_ne_bytes());
    rec[4..].copy_from_slice(&e.to_ne_bytes());
    libc::write(err_fd, rec.as_ptr().cast(), rec.len());
    libc::_exit(126)
}

pub(super) fn opt_ptr(c: &Option<CString>) -> *const libc::c_char {
    c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr())
}

/// The jail's PID 1: build the jail, drop privileges, fork the program,
/// and wait for it.
///
/// # Safety
/// Runs in the child of a fork-like clone of a multi-threaded process:
/// only raw system calls, no allocation, on data prepared in `plan`.
pub(super) unsafe fn jail_init(
    plan: &Plan,
    sync_fd: RawFd,
    err_fd: RawFd,
    status_fd: RawFd,
    go_fd: RawFd,
) -> ! {
    if plan.die_with_parent {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
    }
    // Wait until the parent has written the id maps.
    let mut b = [0u8; 1];
    if libc::read(sync_fd, b.as_mut_ptr().cast(), 1) != 1 {
        die(err_fd, STEP_SYNC);
    }
    libc::close(sync_fd);
    for (i, op) in plan.ops.iter().enumerate() {
        let ok = match op {
            Op::Mount {
                src,
                dst,
                fstype,
                flags,
                data,
            } => {
                libc::mount(
                    opt_ptr(src),
                    dst.as_ptr(),
                    opt_ptr(fstype),
                    *flags,
                    opt_ptr(data).cast(),
                ) == 0
            }
            Op::SetAttr {
                path,
                set,
                recursive,
            } => mount_setattr(path, *recursive, *set, 0),
            Op::Mkdir { path, mode } => {
                libc::mkdir(path.as_ptr(), *mode) == 0 || errno() == libc::EEXIST
            }
            Op::Touch { path } => {
                let mut st: libc::stat = std::mem::zeroed();
                if libc::fstatat(
                    libc::AT_FDCWD,
                    path.as_ptr(),
                    &mut st,
                    libc::AT_SYMLINK_NOFOLLOW,
                ) == 0
                {
                    true
                } else {
                    let fd = libc::open(
                        path.as_ptr(),
                        libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                        0o644,
                    );
                    fd >= 0 && libc::close(fd) == 0
                }
            }
            Op::Write { path, data } => {
                let fd = libc::open(
                    path.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC | libc::O_CLOEXEC,
                    0o444,
                );
                fd >= 0 && {
                    let mut off = 0;
                    while off < data.len() {
                        let n = libc::write(fd, data[off..].as_ptr().cast(), data.len() - off);
                        if n <= 0 {
                            break;
                        }
                        off += n as usize;
                    }
                    libc::close(fd);
                    off == data.len()
                }
            }
            Op::Mknod {
                path,
                mode,
                dev,
                owner,
            } => {
                libc::mknod(path.as_ptr(), *mode, *dev) == 0
                    && libc::chown(path.as_ptr(), owner.0, owner.1) == 0
            }
            Op::MoveMount { fd, dst } => {
                libc::syscall(
                    libc::SYS_move_mount,
                    *fd,
                    c"".as_ptr(),
                    libc::AT_FDCWD,
                    dst.as_ptr(),
                    MOVE_MOUNT_F_EMPTY_PATH,
                ) == 0
            }
        };
        if !ok {
            die(err_fd, i as u32);
        }
    }
    // Switch root: the old one is stacked under the new and detached.
    if libc::chdir(plan.work.as_ptr()) != 0
        || libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) != 0
        || libc::umount2(c".".as_ptr(), libc::MNT_DETACH) != 0
        || libc::chdir(c"/".as_ptr()) != 0
    {
        die(err_fd, STEP_PIVOT);
    }
    if plan.empty_root
        && !mount_setattr(
            c"/",
            false,
            MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
            0,
        )
    {
        die(err_fd, STEP_ROOT_RO);
    }
    // No way back to privilege: empty bounding set, then the identity.
    for cap in 0..64 {
        libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
    }
    // Raw system calls: glibc's set*id wrappers would try to change the
    // credentials of every thread of the parent, which this copy does not
    // have, and wait for them forever.
    if let Some((u, g)) = plan.setid {
        let groups = [g];
        if libc::syscall(libc::SYS_setgroups, 1, groups.as_ptr()) != 0
            || libc::syscall(libc::SYS_setresgid, g, g, g) != 0
            || libc::syscall(libc::SYS_setresuid, u, u, u) != 0
        {
            die(err_fd, STEP_IDENTITY);
        }
    }
    // Nothing effective, permitted or inheritable, ambient cleared.
    let hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    libc::prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL,
        0,
        0,
        0,
    );
    if libc::syscall(libc::SYS_capset, &hdr as *const CapHeader, data.as_ptr()) != 0 {
        die(err_fd, STEP_CAPS);
    }
    if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
        die(err_fd, STEP_CAPS);
    }
    if plan.new_session {
        libc::setsid();
    }

    let child = libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_ulong, 0, 0, 0, 0);
    if child < 0 {
        die(err_fd, STEP_FORK);
    }
    if child == 0 {
        exec_program(plan, err_fd, go_fd);
    }
    // PID 1 keeps nothing of umlctl's: stdio on /dev/null, every other
    // descriptor closed but the status pipe.
    libc::close(err_fd);
    let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
    if null >= 0 {
        for fd in 0..3 {
            libc::dup2(null, fd);
        }
    }
    if status_fd > 3 {
        libc::syscall(libc::SYS_close_range, 3u32, (status_fd - 1) as u32, 0u32);
    }
    libc::syscall(
        libc::SYS_close_range,
        (status_fd.max(2) + 1) as u32,
        libc::c_uint::MAX,
        0u32,
    );
    loop {
        let mut st = 0;
        let p = libc::waitpid(-1, &mut st, 0);
        if p == child as i32 {
            if status_fd >= 0 {
                let b = st.to_ne_bytes();
                libc::write(status_fd, b.as_ptr().cast(), 4);
            }
            // Leaving ends the PID namespace: whatever UML left is killed.
            libc::_exit(0);
        }
        if p < 0 && errno() == libc::ECHILD {
            libc::_exit(0);
        }
    }
}

/// UML (≥ 6.? — 7.x does) turns address randomization off and, if that
/// changed anything, re-executes itself through `/proc/self/exe`, which a
/// jail without `/proc` does not have ("readlink failure"). Turning it off
/// before exec (the personality is inherited) spares it the re-exec.
/// Async-signal-safe.
pub(crate) fn no_address_randomization() {
    // SAFETY: personality(2) only changes this process's execution domain.
    unsafe {
        let cur = libc::personality(0xffff_ffff);
        if cur >= 0 {
            libc::personality((cur as libc::c_ulong) | libc::ADDR_NO_RANDOMIZE as libc::c_ulong);
        }
    }
}

/// The program's side: descriptors, directory, exec.
///
/// # Safety
/// As [`jail_init`].
pub(super) unsafe fn exec_program(plan: &Plan, err_fd: RawFd, go_fd: RawFd) -> ! {
    // The error pipe survives placement (close-on-exec, above the targets).
    let err_hi = libc::fcntl(err_fd, libc::F_DUPFD_CLOEXEC, 200);
    let err_fd = if err_hi >= 0 { err_hi } else { err_fd };
    if let Err(e) = place_fds_raw(&plan.fds) {
        *libc::__errno_location() = e;
        die(err_fd, STEP_FDS);
    }
    if libc::chdir(plan.cwd.as_ptr()) != 0 {
        die(err_fd, STEP_CHDIR);
    }
    // plan() refused anything longer, so nothing is cut here.
    let mut argv: [*const libc::c_char; MAX_ARGS + 1] = [std::ptr::null(); MAX_ARGS + 1];
    for (i, a) in plan.argv.iter().take(MAX_ARGS).enumerate() {
        argv[i] = a.as_ptr();
    }
    let mut envp: [*const libc::c_char; MAX_ENV + 1] = [std::ptr::null(); MAX_ENV + 1];
    for (i, e) in plan.envp.iter().take(MAX_ENV).enumerate() {
        envp[i] = e.as_ptr();
    }
    no_address_randomization();
    if plan.stop_before_exec {
        // A debugger attaches to this waiting process and follows it into
        // exec. Yama (where present) lets it: the debugger is no ancestor.
        // Waiting in read(2), not in a job-control stop: a stop would
        // outlive the debugger's detach (the kernel stops a detached task
        // again while its group is stopped).
        libc::prctl(
            libc::PR_SET_PTRACER,
            libc::PR_SET_PTRACER_ANY as libc::c_ulong,
            0,
            0,
            0,
        );
        let mut rec = [0u8; 8];
        rec[..4].copy_from_slice(&STEP_STOPPED.to_ne_bytes());
        if libc::write(err_fd, rec.as_ptr().cast(), rec.len()) != 8 {
            die(err_fd, STEP_EXEC);
        }
        let mut b = [0u8; 1];
        loop {
            let n = libc::read(go_fd, b.as_mut_ptr().cast(), 1);
            if n == 1 {
                break;
            }
            if n < 0 && errno() == libc::EINTR {
                continue;
            }
            // umlctl gave up (no debugger): never start the program.
            libc::_exit(126);
        }
    }
    libc::execve(plan.program.as_ptr(), argv.as_ptr(), envp.as_ptr());
    die(err_fd, STEP_EXEC)
}

pub(super) const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
pub(super) struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(super) struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

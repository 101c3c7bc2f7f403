//! The jail: every UML process umlctl starts runs inside one.
//!
//! UML runs the guest kernel as an ordinary host process, so a guest that
//! breaks out of the guest kernel (or simply mounts `hostfs`, which joins
//! whatever path the guest gives to UML's `hostfs=` prefix) acts with that
//! process's view and rights. The jail makes that view small, like
//! Firecracker's jailer:
//!
//! * a new **mount namespace** whose root is either an empty read-only
//!   tmpfs holding only what this guest needs ([`JailRoot::Empty`]: the
//!   kernel binary and its libraries, its disks, its run directory and a
//!   few device nodes, each bound at its own host path so that every path
//!   on UML's command line and in COW headers stays valid), or the host's
//!   root read-only, without set-uid or device files
//!   ([`JailRoot::HostReadOnly`], for `run` without `--image`); either way
//!   with a private `/dev/shm` (UML's memory file; exec allowed, sized to the
//!   guest), `/dev`, and no `/proc` or `/sys` of the host;
//! * a new **PID namespace**, so the UML process can neither see nor
//!   signal nor ptrace any host process, and every helper it forks dies
//!   with it. UML cannot be that namespace's PID 1 (its abort path signals
//!   itself, which PID 1 ignores), so a small forked process holds PID 1:
//!   it waits for UML, passes its wait status out, and exits;
//! * a new **network namespace** unless UML must open a host tap by name
//!   (abstract unix sockets and the host's network are out of reach), and
//!   new IPC and UTS namespaces;
//! * an **unprivileged identity**: a new user namespace mapping only the
//!   invoking user when umlctl is not root; when it is root, the uid given
//!   in [`JailSpec::uid`] (default 65534, "nobody"), reached by dropping
//!   root; in both cases an empty capability bounding set, no capabilities
//!   and `no_new_privs`;
//! * a **closed set of descriptors** and a **scrubbed environment**: UML
//!   gets exactly the descriptors and variables its launch names.
//!
//! Everything between `clone` and `execve` runs in a child of a
//! multi-threaded process, so it makes raw system calls only (`child`), on
//! data prepared beforehand (`plan`); a failing step reports its index and
//! errno through a pipe, and the parent turns that into an error naming the
//! step and the fix. `idmap` lets a root-started jail open the user's files;
//! `attach` binds a disk into a running jail.

use std::ffi::{CString, OsStr};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Component, Path, PathBuf};
use std::process::ExitStatus;

use nix::unistd::Pid;

use crate::error::{Error, Result};

mod attach;
mod child;
mod idmap;
mod plan;

pub use attach::attach;
pub(crate) use child::place_fds_raw;
use child::*;
use idmap::*;
pub use plan::MEMORY_DIR;
use plan::*;

/// The uid and gid UML runs as when umlctl is root and no other is asked
/// for (`nobody`/`nogroup` on Debian).
pub const DEFAULT_ROOT_JAIL_ID: u32 = 65534;

/// What the UML process sees as `/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JailRoot {
    /// An empty, read-only root: only the binds and device nodes.
    Empty,
    /// The host's root, read-only, no set-uid, no device files, with
    /// private `/tmp`, `/var/tmp`, `/run`, `/dev/shm` and empty `/proc`,
    /// `/sys`, `/dev` (binds go on top).
    HostReadOnly,
}

/// A host file or directory made visible in the jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// The host path (resolved).
    pub src: PathBuf,
    /// Where it appears in the jail (absolute; usually `src` itself).
    pub dst: PathBuf,
    pub writable: bool,
    /// Named by the user (a kernel, image, overlay or disk they gave), so a
    /// root umlctl may id-map it for a jail uid that could not open it.
    /// `false` for files only a COW header names: the jail's uid must be
    /// able to read those by itself.
    pub explicit: bool,
}

impl Bind {
    /// `path` at its own place, read-only.
    pub fn ro(path: impl Into<PathBuf>) -> Bind {
        let p = path.into();
        Bind {
            src: p.clone(),
            dst: p,
            writable: false,
            explicit: true,
        }
    }
    /// `path` at its own place, writable.
    pub fn rw(path: impl Into<PathBuf>) -> Bind {
        Bind {
            writable: true,
            ..Bind::ro(path)
        }
    }
}

/// Everything that describes a jail.
#[derive(Debug, Clone)]
pub struct JailSpec {
    pub root: JailRoot,
    pub binds: Vec<Bind>,
    /// Bind the host's `/dev/net/tun` (UML opens owned taps by name).
    pub tun: bool,
    /// Stay in the host's network namespace (needed for owned taps).
    pub share_net: bool,
    /// Size of the private tmpfs that holds UML's memory file ([`MEMORY_DIR`]).
    pub tmp_bytes: u64,
    /// When umlctl is root: the uid (and gid) UML runs as. `None`:
    /// [`DEFAULT_ROOT_JAIL_ID`] for an empty root; 0 for the host's root
    /// (whose point is to show the invoking user's files, read-only).
    /// Uid 0 is kept without any capability. Ignored (the invoking user)
    /// when umlctl is not root.
    pub uid: Option<u32>,
}

impl JailSpec {
    /// A jail with an empty root, for a guest with `mem_bytes` of memory.
    pub fn new(root: JailRoot, mem_bytes: u64) -> JailSpec {
        JailSpec {
            root,
            binds: Vec::new(),
            tun: false,
            share_net: false,
            tmp_bytes: tmp_size(mem_bytes),
            uid: None,
        }
    }

    /// Add a bind unless the same destination is already there.
    pub fn bind(&mut self, b: Bind) {
        if !self.binds.iter().any(|x| x.dst == b.dst) {
            self.binds.push(b);
        }
    }

    /// The (uid, gid) UML will run as, seen from the host.
    pub fn identity(&self) -> (u32, u32) {
        if is_root() {
            let id = self.uid.unwrap_or(match self.root {
                JailRoot::Empty => DEFAULT_ROOT_JAIL_ID,
                JailRoot::HostReadOnly => 0,
            });
            (id, id)
        } else {
            (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            )
        }
    }
}

/// The memory tmpfs must hold UML's memory file (as large as the guest's
/// memory) and a little more.
pub fn tmp_size(mem_bytes: u64) -> u64 {
    mem_bytes
        .saturating_add(mem_bytes / 8)
        .saturating_add(64 << 20)
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// How to start a program, jailed or not.
#[derive(Debug, Clone)]
pub struct Launch {
    pub program: PathBuf,
    /// `argv[1..]`.
    pub args: Vec<String>,
    /// The whole environment when jailed; added to umlctl's own when not.
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    /// Descriptors to place: (ours, the number the program gets). 0, 1 and
    /// 2 are its stdio; everything not listed is closed.
    pub fds: Vec<(RawFd, i32)>,
    /// Start a new session (not in our process group).
    pub new_session: bool,
    /// Kill the program (the whole jail) when this thread's process dies.
    pub die_with_parent: bool,
    /// Stop the program (SIGSTOP) just before it is executed, so that a
    /// debugger can attach and follow it into exec (jailed launches only).
    pub stop_before_exec: bool,
    /// The cgroup the program (and all it forks) runs in, from its first
    /// instruction.
    pub cgroup: Option<crate::cgroup::Cgroup>,
}

/// A started program.
#[derive(Debug)]
pub struct Spawned {
    /// The program's own process (UML), as the host sees it.
    pub pid: Pid,
    /// The jail's PID 1 (killing it kills everything in the jail).
    pub jail_pid: Option<Pid>,
    /// Where the jail's PID 1 writes the program's wait status.
    status: Option<File>,
    /// The program waits before its exec ([`Launch::stop_before_exec`])
    /// until [`Spawned::release`].
    pub stopped: bool,
    /// Written to let a waiting program go on to exec.
    go: Option<File>,
}

impl Spawned {
    /// The process to SIGKILL to end everything this launch started.
    pub fn kill_target(&self) -> Pid {
        self.jail_pid.unwrap_or(self.pid)
    }

    /// Wait for the program and return how it ended.
    pub fn wait(mut self) -> io::Result<ExitStatus> {
        let waited = self.jail_pid.unwrap_or(self.pid);
        let raw = loop {
            let mut st = 0;
            // SAFETY: waitpid writes the status into `st`.
            let r = unsafe { libc::waitpid(waited.as_raw(), &mut st, 0) };
            if r >= 0 {
                break st;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        if let Some(mut f) = self.status.take() {
            let mut b = [0u8; 4];
            if f.read_exact(&mut b).is_ok() {
                return Ok(ExitStatus::from_raw(i32::from_ne_bytes(b)));
            }
        }
        // No status from PID 1: the jail itself was killed.
        Ok(ExitStatus::from_raw(raw))
    }

    /// How the program ended, if it has (without waiting).
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        let waited = self.jail_pid.unwrap_or(self.pid);
        let mut st = 0;
        // SAFETY: waitpid writes the status into `st`.
        let r = unsafe { libc::waitpid(waited.as_raw(), &mut st, libc::WNOHANG) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        if r == 0 {
            return Ok(None);
        }
        if let Some(mut f) = self.status.take() {
            let mut b = [0u8; 4];
            if f.read_exact(&mut b).is_ok() {
                return Ok(Some(ExitStatus::from_raw(i32::from_ne_bytes(b))));
            }
        }
        Ok(Some(ExitStatus::from_raw(st)))
    }

    /// Let a program that waits before its exec go on.
    pub fn release(&mut self) -> io::Result<()> {
        match self.go.take() {
            Some(mut f) => f.write_all(b"g"),
            None => Ok(()),
        }
    }

    /// Forget the processes (a detached guest runs on without us).
    pub fn detach(self) {
        drop(self.status);
    }
}

/// Start `launch` without a jail (`--no-jail`).
pub fn spawn_unjailed(launch: &Launch) -> Result<Spawned> {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(&launch.program);
    cmd.args(&launch.args).current_dir(&launch.cwd);
    for (k, v) in &launch.env {
        cmd.env(k, v);
    }
    if !launch.env.iter().any(|(k, _)| k == "LD_PRELOAD") {
        cmd.env_remove("LD_PRELOAD");
    }
    let fds = launch.fds.clone();
    // The cgroup's files, opened here: the child writes "0" (itself) to
    // each before exec, so UML starts inside.
    let procs = launch
        .cgroup
        .iter()
        .flat_map(|c| c.procs_files())
        .map(|p| {
            fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .map_err(|e| Error::io("open", &p, e))
        })
        .collect::<Result<Vec<File>>>()?;
    let procs_fds: Vec<RawFd> = procs.iter().map(|f| f.as_raw_fd()).collect();
    let session = launch.new_session;
    let pdeath = launch.die_with_parent;
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe system calls (write, fcntl, dup2, close_range,
    // setsid, prctl).
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &procs_fds {
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            place_fds_raw(&fds).map_err(io::Error::from_raw_os_error)?;
            if session {
                libc::setsid();
            }
            if pdeath {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            }
            child::no_address_randomization();
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| Error::io("start", &launch.program, e))?;
    drop(procs);
    let pid = crate::num::pid(child.id());
    // The Child is not needed: waiting goes through waitpid.
    drop(child);
    Ok(Spawned {
        pid,
        jail_pid: None,
        status: None,
        stopped: false,
        go: None,
    })
}

// Constants of the new mount API (linux/mount.h), spelled out so that they
// do not depend on the libc crate's version.
pub(super) const AT_RECURSIVE: libc::c_uint = 0x8000;
pub(super) const MOUNT_ATTR_RDONLY: u64 = 0x1;
pub(super) const MOUNT_ATTR_NOSUID: u64 = 0x2;
pub(super) const MOUNT_ATTR_NODEV: u64 = 0x4;
pub(super) const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
pub(super) const OPEN_TREE_CLONE: libc::c_uint = 0x1;
pub(super) const OPEN_TREE_CLOEXEC: libc::c_uint = libc::O_CLOEXEC as libc::c_uint;
pub(super) const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
pub(super) const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;

/// `struct mount_attr` (linux/mount.h).
#[repr(C)]
pub(super) struct MountAttr {
    pub(super) attr_set: u64,
    pub(super) attr_clr: u64,
    pub(super) propagation: u64,
    pub(super) userns_fd: u64,
}

/// mount_setattr(2) on `path` (relative to the cwd): add `set`, remove
/// `clr`, on the mount at `path` or (with `recursive`) its whole tree.
/// A raw system call, async-signal-safe.
fn mount_setattr(path: &std::ffi::CStr, recursive: bool, set: u64, clr: u64) -> bool {
    let mut attr = MountAttr {
        attr_set: set,
        attr_clr: clr,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: `path` is NUL-terminated and `attr` lives for the call, whose
    // size is passed along.
    unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            if recursive { AT_RECURSIVE } else { 0 },
            &mut attr as *mut MountAttr,
            std::mem::size_of::<MountAttr>(),
        ) == 0
    }
}

/// The directory every jail's root is built on (nothing is ever mounted on
/// it outside a jail's private mount namespace).
fn work_dir() -> Result<PathBuf> {
    let d = crate::paths::cache_dir()?.join("jail-root");
    match fs::create_dir(&d) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::io("create", &d, e)),
    }
    Ok(d)
}

/// Make `path` (a file or directory umlctl created for this guest) usable
/// by the jail's uid when umlctl is root.
pub fn hand_over(spec: &JailSpec, path: &Path) -> Result<()> {
    if !is_root() {
        return Ok(());
    }
    let (u, g) = spec.identity();
    nix::unistd::chown(
        path,
        Some(nix::unistd::Uid::from_raw(u)),
        Some(nix::unistd::Gid::from_raw(g)),
    )
    .map_err(|e| {
        Error::io(
            "hand over to the jail's uid (chown)",
            path,
            crate::error::errno(e),
        )
    })
}

/// Whether a host-root jail hides `path` behind one of its private
/// mounts, below their mount point (so it must be bound to be seen).
pub fn hidden_in_host_root(path: &Path) -> bool {
    HOST_ROOT_PRIVATE
        .iter()
        .any(|p| path.starts_with(p) && path != Path::new(p))
}

/// When umlctl is root and UML will not be: give the owned taps (which
/// netd made for uid 0) to the jail's uid, so that UML may attach to them.
pub fn hand_over_taps(spec: &JailSpec, nics: &[crate::cmdline::Nic]) -> Result<()> {
    let (u, _) = spec.identity();
    if !is_root() || u == 0 {
        return Ok(());
    }
    for n in nics {
        if let crate::cmdline::NicTransport::Tap { ifname } = &n.transport {
            umlctl_netd::tap::set_owner(ifname, u).map_err(|e| Error::Host {
                check: "jail",
                detail: format!("cannot give tap {ifname} to the jail's uid {u}: {e}"),
                fix: "run umlctl in the network namespace netd runs in".into(),
            })?;
        }
    }
    Ok(())
}

/// Start `launch` inside the jail `spec`.
pub fn spawn(spec: &JailSpec, launch: &Launch, want_status: bool) -> Result<Spawned> {
    let work = work_dir()?;
    let root = is_root();
    let ident = spec.identity();
    // Binds the jail's uid could not open as they are: id-mapped (root).
    let mut idmaps = Vec::new();
    if root && ident.0 != 0 {
        for (i, b) in spec.binds.iter().enumerate() {
            let md = fs::metadata(&b.src).map_err(|e| Error::io("stat", &b.src, e))?;
            let need_write = b.writable && !md.is_dir();
            let ok = can_access(&md, ident.0, ident.1, false)
                && (!need_write || can_access(&md, ident.0, ident.1, true))
                && (!md.is_dir()
                    || md.mode() & 0o111 != 0 && can_access(&md, ident.0, ident.1, b.writable));
            if !ok && !b.explicit {
                return Err(Error::Host {
                    check: "jail",
                    detail: format!(
                        "the jail's uid {} cannot read {}, which a disk's COW header names as its backing file",
                        ident.0,
                        b.src.display()
                    ),
                    fix: format!(
                        "make {} readable by uid {} if you trust that overlay, or name the file yourself (--image)",
                        b.src.display(),
                        ident.0
                    ),
                });
            }
            if !ok {
                idmaps.push((i, idmapped_tree(&b.src, b.writable, ident)?));
            }
        }
    }
    let plan = plan(spec, launch, &work, &idmaps)?;

    let pipe = || {
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| Error::sys("pipe", crate::error::errno(e)))
    };
    let (sync_r, sync_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let status = if want_status { Some(pipe()?) } else { None };
    let go = if launch.stop_before_exec {
        Some(pipe()?)
    } else {
        None
    };
    let go_r = go.as_ref().map_or(-1, |(r, _)| r.as_raw_fd());

    let mut flags =
        libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    if !root {
        flags |= libc::CLONE_NEWUSER;
    }
    if !spec.share_net {
        flags |= libc::CLONE_NEWNET;
    }
    let status_w = status.as_ref().map(|(_, w)| w.as_raw_fd()).unwrap_or(-1);
    // SAFETY: a fork-like clone (no CLONE_VM, no stack); the child runs
    // `jail_init`, which makes only raw system calls on `plan` and never
    // returns.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            libc::c_ulong::from((flags | libc::SIGCHLD).unsigned_abs()),
            0,
            0,
            0,
            0,
        )
    };
    if pid < 0 {
        let e = io::Error::last_os_error();
        return Err(unavailable(&e, root));
    }
    if pid == 0 {
        // SAFETY: see above.
        unsafe { jail_init(&plan, sync_r.as_raw_fd(), err_w.as_raw_fd(), status_w, go_r) }
    }
    let jail_pid = crate::num::pid(pid);
    // Into the cgroup before anything in the jail runs (the child waits
    // for the sync byte below).
    if let Some(cg) = &launch.cgroup {
        if let Err(e) = cg.add(i32::try_from(pid).unwrap_or(-1)) {
            let _ = nix::sys::signal::kill(jail_pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(jail_pid, None);
            return Err(e);
        }
    }
    let go = go.map(|(r, w)| {
        drop(r);
        File::from(w)
    });
    drop(sync_r);
    drop(err_w);
    let status_r = status.map(|(r, w)| {
        drop(w);
        File::from(r)
    });
    let fail = |e: Error| -> Error {
        let _ = nix::sys::signal::kill(jail_pid, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(jail_pid, None);
        e
    };
    if !root {
        let (u, g) = ident;
        let maps = (|| -> io::Result<()> {
            fs::write(format!("/proc/{pid}/uid_map"), format!("{u} {u} 1\n"))?;
            fs::write(format!("/proc/{pid}/setgroups"), "deny")?;
            fs::write(format!("/proc/{pid}/gid_map"), format!("{g} {g} 1\n"))
        })();
        if let Err(e) = maps {
            return Err(fail(Error::Host {
                check: "jail",
                detail: format!("cannot map your uid into the jail's user namespace: {e}"),
                fix: "check that user namespaces are enabled (`umlctl doctor`), or run with --no-jail (the guest is then not contained)".into(),
            }));
        }
    }
    let mut sync = File::from(sync_w);
    if let Err(e) = sync.write_all(b"g") {
        return Err(fail(Error::sys("start the jail", e)));
    }
    drop(sync);
    // EOF: the program was exec'd (every copy of the write end is gone);
    // a STEP_STOPPED record: it waits for a debugger, just before exec.
    let mut rec = Vec::new();
    let mut err_r = File::from(err_r);
    let _ = (&mut err_r).take(8).read_to_end(&mut rec);
    let stopped = rec.len() == 8 && rec[..4] == STEP_STOPPED.to_ne_bytes();
    if !stopped {
        let _ = err_r.read_to_end(&mut rec);
    }
    if rec.len() >= 8 && !stopped {
        let step = u32::from_ne_bytes([rec[0], rec[1], rec[2], rec[3]]);
        let err = i32::from_ne_bytes([rec[4], rec[5], rec[6], rec[7]]);
        let e = io::Error::from_raw_os_error(err);
        return Err(fail(step_error(&plan, step, e, spec, launch)));
    }
    // The program is PID 1's only child.
    let uml = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|p| p.parse::<i32>().ok())
        })
        .map(Pid::from_raw)
        .unwrap_or(jail_pid);
    Ok(Spawned {
        pid: uml,
        jail_pid: Some(jail_pid),
        status: status_r,
        stopped,
        go: if stopped { go } else { None },
    })
}

/// The error for a jail that could not even be created.
fn unavailable(e: &io::Error, root: bool) -> Error {
    let userns = fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let fix = if !root && userns == Some(0) {
        "user namespaces are disabled (user.max_user_namespaces = 0): as root, `sysctl -w user.max_user_namespaces=15000` (and persist it in /etc/sysctl.d); or run with --no-jail, which gives up the guest's containment".to_string()
    } else if !root {
        "enable unprivileged user namespaces (Debian: `sysctl -w kernel.unprivileged_userns_clone=1`; Ubuntu ≥ 23.10: an AppArmor profile or `sysctl -w kernel.apparmor_restrict_unprivileged_userns=0`); or run with --no-jail, which gives up the guest's containment".to_string()
    } else {
        "the host refuses new namespaces to root (a container without CAP_SYS_ADMIN?); run umlctl where it may create namespaces, or with --no-jail, which gives up the guest's containment".to_string()
    };
    Error::Host {
        check: "jail",
        detail: format!(
            "cannot create the jail's namespaces ({}): {e}",
            if root {
                "mount, PID, network, IPC, UTS"
            } else {
                "user, mount, PID, network, IPC, UTS"
            }
        ),
        fix,
    }
}

fn step_error(plan: &Plan, step: u32, e: io::Error, spec: &JailSpec, launch: &Launch) -> Error {
    let (u, _) = spec.identity();
    let what = match step {
        STEP_SYNC => "wait for the user namespace's id maps".to_string(),
        STEP_PIVOT => "switch to the jail's root (pivot_root)".to_string(),
        STEP_ROOT_RO => "make the jail's root read-only".to_string(),
        STEP_IDENTITY => format!("become uid {u} in the jail"),
        STEP_CAPS => "drop capabilities in the jail".to_string(),
        STEP_FORK => "fork the jailed program".to_string(),
        STEP_FDS => "place the jailed program's descriptors".to_string(),
        STEP_CHDIR => format!("enter {} in the jail", launch.cwd.display()),
        STEP_EXEC => format!("execute {} in the jail", launch.program.display()),
        i => plan
            .descs
            .get(i as usize)
            .cloned()
            .unwrap_or_else(|| format!("jail step {i}")),
    };
    let fix = match (step, e.raw_os_error()) {
        (STEP_EXEC | STEP_CHDIR, Some(libc::EACCES)) => format!(
            "the jail runs UML as uid {u}, which may not open {}; make it (and its directories) readable by that uid, choose another with --jail-uid, or run with --no-jail",
            if step == STEP_EXEC { launch.program.display() } else { launch.cwd.display() }
        ),
        (_, Some(libc::EPERM) | Some(libc::EACCES)) => "the host does not let umlctl build the jail (user namespaces restricted, or a container without mount rights); see `umlctl doctor`, or run with --no-jail, which gives up the guest's containment".to_string(),
        (_, Some(libc::ENOSYS) | Some(libc::EINVAL)) => "the host kernel lacks a feature the jail needs (mount_setattr, Linux ≥ 5.12); see `umlctl doctor`, or run with --no-jail".to_string(),
        _ => "see `umlctl doctor`; --no-jail runs UML without a jail (the guest is then not contained)".to_string(),
    };
    Error::Host {
        check: "jail",
        detail: format!("{what}: {e}"),
        fix,
    }
}

/// Try to build a jail and start `/bin/true`-like nothing in it: what
/// `doctor` reports. Returns how it failed.
pub fn probe() -> Result<()> {
    let exe = crate::initroot::current_exe()?;
    let mut spec = JailSpec::new(JailRoot::Empty, 16 << 20);
    spec.bind(Bind::ro(&exe));
    for lib in crate::initroot::dynamic_deps(&exe)? {
        spec.bind(Bind::ro(lib));
    }
    let launch = Launch {
        program: exe,
        args: vec![],
        env: vec![(PROBE_ENV.into(), "1".into())],
        cwd: "/".into(),
        fds: vec![],
        new_session: false,
        die_with_parent: true,
        stop_before_exec: false,
        cgroup: None,
    };
    let s = spawn(&spec, &launch, true)?;
    let st = s
        .wait()
        .map_err(|e| Error::sys("wait for the jail probe", e))?;
    if st.code() == Some(0) {
        Ok(())
    } else {
        Err(Error::Host {
            check: "jail",
            detail: format!("a program in a test jail did not run ({st})"),
            fix: "run `umlctl doctor -v`; --no-jail runs UML without a jail".into(),
        })
    }
}

/// Set in the environment of umlctl started by [`probe`]; `main` must exit
/// 0 at once when it sees it.
pub const PROBE_ENV: &str = "UMLCTL_JAIL_PROBE";

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn paths_under_the_work_dir() {
        assert_eq!(
            under(Path::new("/w"), Path::new("/a/b/c")),
            PathBuf::from("/w/a/b/c")
        );
        assert_eq!(
            parents_of(Path::new("/w"), Path::new("/a/b/c")),
            vec![PathBuf::from("/w/a"), PathBuf::from("/w/a/b")]
        );
        assert!(parents_of(Path::new("/w"), Path::new("/a")).is_empty());
    }

    #[test]
    fn the_memory_tmpfs_holds_the_guest() {
        assert!(tmp_size(256 << 20) > 256 << 20);
        assert_eq!(tmp_size(u64::MAX), u64::MAX);
    }

    #[test]
    fn id_map_namespaces_made_side_by_side_never_wait_for_each_other() {
        // Devices of a lab boot side by side, each jail id-mapping its
        // binds: the short-lived children that hold those user namespaces
        // used to inherit each other's pipes and wait for each other's
        // EOF for ever (a lab start hung in CI).
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test makes id-mapped user namespaces: run the suite as root"
        );
        let (tx, rx) = std::sync::mpsc::channel();
        for _ in 0..4 {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for _ in 0..40 {
                    idmap_userns((0, 0), (65534, 65534)).unwrap();
                }
                tx.send(()).unwrap();
            });
        }
        for i in 0..4 {
            rx.recv_timeout(std::time::Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("{} of 4 threads still wait: deadlock", 4 - i));
        }
    }

    #[test]
    fn access_by_mode_bits() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        fs::write(&f, b"x").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap();
        let md = fs::metadata(&f).unwrap();
        let me = nix::unistd::getuid().as_raw();
        assert!(can_access(&md, md.uid(), md.gid(), true));
        assert!(!can_access(&md, me.wrapping_add(12345), 54321, false));
        fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).unwrap();
        let md = fs::metadata(&f).unwrap();
        assert!(can_access(&md, me.wrapping_add(12345), 54321, false));
        assert!(!can_access(&md, me.wrapping_add(12345), 54321, true));
    }
}

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
//! multi-threaded process, so it makes raw system calls only, on data
//! prepared beforehand ([`Plan`]); a failing step reports its index and
//! errno through a pipe, and the parent turns that into an error naming the
//! step and the fix.

use std::ffi::{CString, OsStr};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Component, Path, PathBuf};
use std::process::ExitStatus;

use nix::unistd::Pid;

use crate::error::{Error, Result};

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
    let session = launch.new_session;
    let pdeath = launch.die_with_parent;
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe system calls (fcntl, dup2, close_range, setsid, prctl).
    unsafe {
        cmd.pre_exec(move || {
            place_fds_raw(&fds).map_err(io::Error::from_raw_os_error)?;
            if session {
                libc::setsid();
            }
            if pdeath {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| Error::io("start", &launch.program, e))?;
    let pid = Pid::from_raw(child.id() as i32);
    // The Child is not needed: waiting goes through waitpid.
    drop(child);
    Ok(Spawned {
        pid,
        jail_pid: None,
        status: None,
    })
}

/// Place `(source, target)` descriptors and mark every other one
/// close-on-exec. Async-signal-safe; returns an errno.
fn place_fds_raw(fds: &[(RawFd, i32)]) -> std::result::Result<(), i32> {
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

fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

// Constants of the new mount API (linux/mount.h), spelled out so that they
// do not depend on the libc crate's version.
const AT_RECURSIVE: libc::c_uint = 0x8000;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const OPEN_TREE_CLONE: libc::c_uint = 0x1;
const OPEN_TREE_CLOEXEC: libc::c_uint = libc::O_CLOEXEC as libc::c_uint;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;

/// `struct mount_attr` (linux/mount.h).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// One step of building the jail, on prepared data.
enum Op {
    Mount {
        src: Option<CString>,
        dst: CString,
        fstype: Option<CString>,
        flags: libc::c_ulong,
        data: Option<CString>,
    },
    /// mount_setattr: add these attributes (recursively or not).
    SetAttr {
        path: CString,
        set: u64,
        recursive: bool,
    },
    Mkdir {
        path: CString,
        mode: libc::mode_t,
    },
    /// Create an empty file (a bind target) unless something is there.
    Touch {
        path: CString,
    },
    /// Create a file with this content.
    Write {
        path: CString,
        data: Vec<u8>,
    },
    /// Create a device node owned by (uid, gid).
    Mknod {
        path: CString,
        mode: libc::mode_t,
        dev: libc::dev_t,
        owner: (u32, u32),
    },
    /// Attach a detached mount tree (prepared by the parent) here.
    MoveMount {
        fd: RawFd,
        dst: CString,
    },
}

/// Steps outside the op list, for error reports.
const STEP_SYNC: u32 = 10_000;
const STEP_PIVOT: u32 = 10_001;
const STEP_ROOT_RO: u32 = 10_002;
const STEP_IDENTITY: u32 = 10_003;
const STEP_FORK: u32 = 10_004;
const STEP_FDS: u32 = 10_005;
const STEP_CHDIR: u32 = 10_006;
const STEP_EXEC: u32 = 10_007;
const STEP_CAPS: u32 = 10_008;

/// Everything the child needs, prepared before `clone`.
struct Plan {
    ops: Vec<Op>,
    descs: Vec<String>,
    /// The mount point the new root is built on.
    work: CString,
    empty_root: bool,
    /// Drop to this (uid, gid) with setresuid (root without a user
    /// namespace).
    setid: Option<(u32, u32)>,
    program: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    cwd: CString,
    fds: Vec<(RawFd, i32)>,
    new_session: bool,
    die_with_parent: bool,
}

fn cstr(p: impl AsRef<OsStr>) -> Result<CString> {
    CString::new(p.as_ref().as_bytes())
        .map_err(|_| Error::Usage(format!("path {:?} contains a NUL byte", p.as_ref())))
}

/// `work` + `dst` (an absolute path).
fn under(work: &Path, dst: &Path) -> PathBuf {
    let rel: PathBuf = dst
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect();
    work.join(rel)
}

/// Directories from `work` down to `dst`'s parent, shallowest first.
fn parents_of(work: &Path, dst: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut cur = work.to_path_buf();
    let comps: Vec<_> = dst
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect();
    for c in comps.iter().take(comps.len().saturating_sub(1)) {
        cur.push(c);
        out.push(cur.clone());
    }
    out
}

/// Host paths that private tmpfs mounts hide in a host-root jail.
const HOST_ROOT_PRIVATE: &[&str] = &["/tmp", "/var/tmp", "/run", "/proc", "/sys", "/dev"];

/// Where UML's memory file goes in the jail (its `TMPDIR`).
pub const MEMORY_DIR: &str = "/dev/shm";

/// Device nodes every jail gets.
const DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];

struct Builder {
    ops: Vec<Op>,
    descs: Vec<String>,
}

impl Builder {
    fn push(&mut self, op: Op, desc: String) {
        self.ops.push(op);
        self.descs.push(desc);
    }
    fn mkdir(&mut self, p: &Path, mode: libc::mode_t) -> Result<()> {
        self.push(
            Op::Mkdir {
                path: cstr(p)?,
                mode,
            },
            format!("create directory {} in the jail", p.display()),
        );
        Ok(())
    }
    fn tmpfs(&mut self, at: &Path, data: &str, what: &str) -> Result<()> {
        self.push(
            Op::Mount {
                src: Some(cstr("tmpfs")?),
                dst: cstr(at)?,
                fstype: Some(cstr("tmpfs")?),
                flags: libc::MS_NOSUID | libc::MS_NODEV,
                data: Some(cstr(data)?),
            },
            format!("mount a private tmpfs for {what}"),
        );
        Ok(())
    }
}

/// Prepare every step for `spec` and `launch`, with `work` as the mount
/// point of the new root and `idmaps` the detached idmapped trees for binds
/// the jail user could not otherwise open.
fn plan(
    spec: &JailSpec,
    launch: &Launch,
    work: &Path,
    idmaps: &[(usize, OwnedFd)],
) -> Result<Plan> {
    let mut b = Builder {
        ops: Vec::new(),
        descs: Vec::new(),
    };
    b.push(
        Op::Mount {
            src: None,
            dst: cstr("/")?,
            fstype: None,
            flags: libc::MS_REC | libc::MS_PRIVATE,
            data: None,
        },
        "make the jail's mounts private".into(),
    );
    match spec.root {
        JailRoot::Empty => {
            b.tmpfs(work, "mode=0755,size=4m,nr_inodes=4096", "the jail's root")?;
            for d in ["dev", "proc"] {
                b.mkdir(&work.join(d), 0o755)?;
            }
        }
        JailRoot::HostReadOnly => {
            b.push(
                Op::Mount {
                    src: Some(cstr("/")?),
                    dst: cstr(work)?,
                    fstype: None,
                    flags: libc::MS_BIND | libc::MS_REC,
                    data: None,
                },
                "bind the host's root into the jail".into(),
            );
            b.push(
                Op::SetAttr {
                    path: cstr(work)?,
                    set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
                    recursive: true,
                },
                "make the host's root read-only in the jail (mount_setattr, Linux ≥ 5.12)".into(),
            );
            for p in HOST_ROOT_PRIVATE {
                if !Path::new(p).is_dir() {
                    continue;
                }
                let at = under(work, Path::new(p));
                let opt = match *p {
                    "/tmp" | "/var/tmp" => "mode=1777,size=64m",
                    _ => "mode=0755,size=4m",
                };
                b.tmpfs(&at, opt, p)?;
            }
        }
    }
    // UML's memory file: a private tmpfs sized to the guest, exec allowed.
    let shm = work.join(MEMORY_DIR.trim_start_matches('/'));
    b.mkdir(&shm, 0o1777)?;
    b.tmpfs(
        &shm,
        &format!("mode=1777,size={}", spec.tmp_bytes),
        "UML's memory file",
    )?;
    // UML reads the host's CPU flags from /proc/cpuinfo; a copy gives it
    // them without any of procfs.
    let cpuinfo = fs::read("/proc/cpuinfo").unwrap_or_default();
    b.push(
        Op::Write {
            path: cstr(work.join("proc/cpuinfo"))?,
            data: cpuinfo,
        },
        "write the jail's /proc/cpuinfo".into(),
    );
    let mut devices: Vec<&str> = DEVICES.to_vec();
    if spec.tun {
        let net = work.join("dev/net");
        b.mkdir(&net, 0o755)?;
        let (u, g) = spec.identity();
        if is_root() && u != 0 {
            // The host's node is root's (0600): the jail gets its own, for
            // its uid only, on a small tmpfs that allows device nodes.
            b.push(
                Op::Mount {
                    src: Some(cstr("tmpfs")?),
                    dst: cstr(&net)?,
                    fstype: Some(cstr("tmpfs")?),
                    flags: libc::MS_NOSUID | libc::MS_NOEXEC,
                    data: Some(cstr("mode=0755,size=64k,nr_inodes=16")?),
                },
                "mount a tmpfs for /dev/net".into(),
            );
            b.push(
                Op::Mknod {
                    path: cstr(net.join("tun"))?,
                    mode: libc::S_IFCHR | 0o600,
                    dev: libc::makedev(10, 200),
                    owner: (u, g),
                },
                format!("create /dev/net/tun for uid {u} in the jail"),
            );
        } else {
            devices.push("/dev/net/tun");
        }
    }
    for d in devices {
        if fs::symlink_metadata(d).is_err() {
            continue;
        }
        let at = under(work, Path::new(d));
        b.push(
            Op::Touch { path: cstr(&at)? },
            format!("create {d} in the jail"),
        );
        b.push(
            Op::Mount {
                src: Some(cstr(d)?),
                dst: cstr(&at)?,
                fstype: None,
                flags: libc::MS_BIND,
                data: None,
            },
            format!("bind {d} into the jail"),
        );
    }
    for (i, bind) in spec.binds.iter().enumerate() {
        if !bind.dst.is_absolute() {
            return Err(Error::Usage(format!(
                "jail bind target {} is not absolute",
                bind.dst.display()
            )));
        }
        let md = fs::metadata(&bind.src).map_err(|e| Error::io("stat", &bind.src, e))?;
        if spec.root == JailRoot::HostReadOnly && !hidden_in_host_root(&bind.dst) {
            // In the host's read-only view already; a bind target there must
            // not pass through a symlink (it would resolve outside the jail
            // being built), so only resolved paths get their own mount.
            let parent = bind.dst.parent().unwrap_or(Path::new("/"));
            if fs::canonicalize(parent).ok().as_deref() != Some(parent) {
                continue;
            }
        }
        for p in parents_of(work, &bind.dst) {
            b.mkdir(&p, 0o755)?;
        }
        let at = under(work, &bind.dst);
        if md.is_dir() {
            b.mkdir(&at, 0o755)?;
        } else {
            b.push(
                Op::Touch { path: cstr(&at)? },
                format!("create {} in the jail", bind.dst.display()),
            );
        }
        if let Some((_, fd)) = idmaps.iter().find(|(j, _)| *j == i) {
            b.push(
                Op::MoveMount {
                    fd: fd.as_raw_fd(),
                    dst: cstr(&at)?,
                },
                format!("attach the id-mapped {} in the jail", bind.src.display()),
            );
            continue;
        }
        b.push(
            Op::Mount {
                src: Some(cstr(&bind.src)?),
                dst: cstr(&at)?,
                fstype: None,
                flags: libc::MS_BIND,
                data: None,
            },
            format!("bind {} into the jail", bind.src.display()),
        );
        let mut set = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
        if !bind.writable {
            set |= MOUNT_ATTR_RDONLY;
        }
        b.push(
            Op::SetAttr {
                path: cstr(&at)?,
                set,
                recursive: false,
            },
            format!("restrict {} in the jail", bind.src.display()),
        );
    }

    let setid = if is_root() {
        let (u, g) = spec.identity();
        Some((u, g))
    } else {
        None
    };
    let mut argv = vec![cstr(&launch.program)?];
    for a in &launch.args {
        argv.push(cstr(a)?);
    }
    let mut envp = Vec::new();
    for (k, v) in &launch.env {
        envp.push(cstr(format!("{k}={v}"))?);
    }
    Ok(Plan {
        ops: b.ops,
        descs: b.descs,
        work: cstr(work)?,
        empty_root: spec.root == JailRoot::Empty,
        setid,
        program: cstr(&launch.program)?,
        argv,
        envp,
        cwd: cstr(&launch.cwd)?,
        fds: launch.fds.clone(),
        new_session: launch.new_session,
        die_with_parent: launch.die_with_parent,
    })
}

/// What the UML process's uid can do with a file, judged by its mode bits.
fn can_access(md: &fs::Metadata, uid: u32, gid: u32, write: bool) -> bool {
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
fn idmap_userns(from: (u32, u32), to: (u32, u32)) -> Result<OwnedFd> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| Error::sys("pipe", crate::error::errno(e)))?;
    // SAFETY: the child only reads a pipe and exits (async-signal-safe).
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
    let pid = pid as i32;
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
    drop(w);
    let _ = nix::sys::wait::waitpid(Pid::from_raw(pid), None);
    res.map_err(|e| Error::sys("set up a user namespace for an id-mapped mount", e))
}

/// A detached bind of `src` whose owner appears as `to` (and read-only
/// unless `writable`): how a root-started jail lets its unprivileged uid
/// open the user's files without changing them.
fn idmapped_tree(src: &Path, writable: bool, to: (u32, u32)) -> Result<OwnedFd> {
    let md = fs::metadata(src).map_err(|e| Error::io("stat", src, e))?;
    let ns = idmap_userns((md.uid(), md.gid()), to)?;
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
    let tree = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let mut attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP
            | MOUNT_ATTR_NOSUID
            | MOUNT_ATTR_NODEV
            | if writable { 0 } else { MOUNT_ATTR_RDONLY },
        attr_clr: 0,
        propagation: 0,
        userns_fd: ns.as_raw_fd() as u64,
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
            (flags | libc::SIGCHLD) as libc::c_ulong,
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
        unsafe { jail_init(&plan, sync_r.as_raw_fd(), err_w.as_raw_fd(), status_w) }
    }
    let jail_pid = Pid::from_raw(pid as i32);
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
    // EOF: the program was exec'd (every copy of the write end is gone).
    let mut rec = Vec::new();
    let _ = File::from(err_r).read_to_end(&mut rec);
    if rec.len() >= 8 {
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

/// Report a failed step to the parent and exit.
///
/// # Safety
/// Async-signal-safe: write(2) and _exit(2) only.
unsafe fn die(err_fd: RawFd, step: u32) -> ! {
    let e = errno();
    let mut rec = [0u8; 8];
    rec[..4].copy_from_slice(&step.to_ne_bytes());
    rec[4..].copy_from_slice(&e.to_ne_bytes());
    libc::write(err_fd, rec.as_ptr().cast(), rec.len());
    libc::_exit(126)
}

fn opt_ptr(c: &Option<CString>) -> *const libc::c_char {
    c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr())
}

/// The jail's PID 1: build the jail, drop privileges, fork the program,
/// and wait for it.
///
/// # Safety
/// Runs in the child of a fork-like clone of a multi-threaded process:
/// only raw system calls, no allocation, on data prepared in `plan`.
unsafe fn jail_init(plan: &Plan, sync_fd: RawFd, err_fd: RawFd, status_fd: RawFd) -> ! {
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
            } => {
                let mut attr = MountAttr {
                    attr_set: *set,
                    attr_clr: 0,
                    propagation: 0,
                    userns_fd: 0,
                };
                libc::syscall(
                    libc::SYS_mount_setattr,
                    libc::AT_FDCWD,
                    path.as_ptr(),
                    if *recursive { AT_RECURSIVE } else { 0 },
                    &mut attr as *mut MountAttr,
                    std::mem::size_of::<MountAttr>(),
                ) == 0
            }
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
    if plan.empty_root {
        let mut attr = MountAttr {
            attr_set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        };
        if libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            c"/".as_ptr(),
            0,
            &mut attr as *mut MountAttr,
            std::mem::size_of::<MountAttr>(),
        ) != 0
        {
            die(err_fd, STEP_ROOT_RO);
        }
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
        exec_program(plan, err_fd);
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

/// The program's side: descriptors, directory, exec.
///
/// # Safety
/// As [`jail_init`].
unsafe fn exec_program(plan: &Plan, err_fd: RawFd) -> ! {
    // The error pipe survives placement (close-on-exec, above the targets).
    let top = plan.fds.iter().map(|(_, d)| *d).max().unwrap_or(2).max(2);
    let err_hi = libc::fcntl(err_fd, libc::F_DUPFD_CLOEXEC, 200);
    let err_fd = if err_hi >= 0 { err_hi } else { err_fd };
    if let Err(e) = place_fds_raw(&plan.fds) {
        *libc::__errno_location() = e;
        die(err_fd, STEP_FDS);
    }
    let _ = top;
    if libc::chdir(plan.cwd.as_ptr()) != 0 {
        die(err_fd, STEP_CHDIR);
    }
    let mut argv: [*const libc::c_char; 256] = [std::ptr::null(); 256];
    for (i, a) in plan.argv.iter().take(255).enumerate() {
        argv[i] = a.as_ptr();
    }
    let mut envp: [*const libc::c_char; 64] = [std::ptr::null(); 64];
    for (i, e) in plan.envp.iter().take(63).enumerate() {
        envp[i] = e.as_ptr();
    }
    libc::execve(plan.program.as_ptr(), argv.as_ptr(), envp.as_ptr());
    die(err_fd, STEP_EXEC)
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

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
        let c = cstr(&src)?;
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
                &src,
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: a new descriptor we own.
        unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
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
    unsafe { libc::waitpid(pid as i32, &mut st, 0) };
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
unsafe fn attach_child(
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
    let setattr = |path: &std::ffi::CStr, set: u64, clr: u64| {
        let mut attr = MountAttr {
            attr_set: set,
            attr_clr: clr,
            propagation: 0,
            userns_fd: 0,
        };
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            0,
            &mut attr as *mut MountAttr,
            std::mem::size_of::<MountAttr>(),
        ) == 0
    };
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

/// The host paths a jailed process at `pid` can see (its root's entries),
/// for tests and `doctor -v`.
pub fn visible_root(pid: Pid) -> io::Result<Vec<String>> {
    let mut v: Vec<String> = fs::read_dir(format!("/proc/{pid}/root"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    Ok(v)
}

/// Whether `path`'s mode lets everyone read it (used to decide which cache
/// files need no id mapping).
pub fn world_readable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o004 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

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

//! Host checks: the ones UML itself makes at start (ptrace, PTRACE_SYSEMU,
//! exec mappings in its temp directory), plus what umlctl needs around it
//! (Yama's ptrace scope, /dev/net/tun, the XSAVE size against the kernel).
//! Each check is one line with the fix when it fails.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use nix::sys::ptrace;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

use crate::inspect::{KernelInfo, Linkage};
use crate::xstate::{self, HostXstate, KernelFp};

/// The result of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Ok,
    /// Works, but something is worth knowing (or only some features fail).
    Warn,
    /// UML will not run as things are.
    Fail,
}

/// One host check.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub name: &'static str,
    pub level: Level,
    pub detail: String,
    /// How to fix it, when it is not `Ok`.
    pub fix: Option<String>,
}

fn ok(name: &'static str, detail: impl Into<String>) -> Check {
    Check {
        name,
        level: Level::Ok,
        detail: detail.into(),
        fix: None,
    }
}

fn bad(
    name: &'static str,
    level: Level,
    detail: impl Into<String>,
    fix: impl Into<String>,
) -> Check {
    Check {
        name,
        level,
        detail: detail.into(),
        fix: Some(fix.into()),
    }
}

/// Run every host check. `kernel` is the kernel that would be used, if one
/// was found (the XSAVE check compares against it).
pub fn host_checks(kernel: Option<&KernelInfo>, shim_enabled: bool) -> Vec<Check> {
    vec![
        check_yama(),
        check_sysemu(),
        check_tmp_exec(),
        check_tun(),
        check_slirp(),
        check_vlan(),
        check_passt(),
        check_gdb(),
        check_xstate(kernel, shim_enabled),
        check_jail(),
        check_limits(),
    ]
}

/// Whether `--cpu-quota`/`--memory-max` can get a cgroup here: one is made
/// and removed.
pub fn check_limits() -> Check {
    const NAME: &str = "cgroup limits";
    let limits = crate::cgroup::Limits {
        cpu_percent: Some(100),
        memory_max: Some(1 << 30),
    };
    match crate::cgroup::Cgroup::create(&format!("doctor-{}", std::process::id()), &limits) {
        Ok(cg) => {
            let where_ = cg
                .dirs
                .iter()
                .filter_map(|d| d.parent())
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ");
            cg.remove();
            ok(
                NAME,
                format!("--cpu-quota and --memory-max work (guest cgroups go under {where_})"),
            )
        }
        Err(crate::error::Error::Host { detail, fix, .. }) => bad(
            NAME,
            Level::Warn,
            format!("--cpu-quota and --memory-max are unavailable: {detail}"),
            fix,
        ),
        Err(e) => bad(
            NAME,
            Level::Warn,
            format!("--cpu-quota and --memory-max are unavailable: {e}"),
            "run umlctl as root, or in a cgroup delegated to you",
        ),
    }
}

fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false)
}

/// slirp4netns gives a lab's `bridged` devices their way out.
pub fn check_slirp() -> Check {
    const NAME: &str = "slirp4netns";
    if on_path(NAME) {
        ok(
            NAME,
            "found (a lab's bridged devices reach the outside through it)",
        )
    } else {
        bad(
            NAME,
            Level::Warn,
            "not found: labs with `bridged` devices (or `port`) cannot start (other labs can)",
            "apt-get install slirp4netns",
        )
    }
}

/// 802.1Q VLANs, for lab.ext's `IFACE.VID` lines: loaded (/proc/net/vlan),
/// built in, or a module the kernel loads on first use.
pub fn check_vlan() -> Check {
    const NAME: &str = "802.1Q VLANs";
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let modules = std::path::Path::new("/lib/modules").join(&release);
    let builtin = fs::read_to_string(modules.join("modules.builtin"))
        .is_ok_and(|t| t.lines().any(|l| l.ends_with("/8021q.ko")));
    let module = fs::read_to_string(modules.join("modules.dep"))
        .is_ok_and(|t| t.lines().any(|l| l.contains("/8021q.ko")));
    if std::path::Path::new("/proc/net/vlan").is_dir() || builtin || module {
        ok(NAME, "available (lab.ext lines IFACE.VID)")
    } else {
        bad(
            NAME,
            Level::Warn,
            format!("this kernel ({release}) has no 8021q support: lab.ext's VLAN lines (IFACE.VID) cannot be made (its other lines can)"),
            "a host kernel with CONFIG_VLAN_8021Q, then `modprobe 8021q`",
        )
    }
}

/// passt gives `--net user` guests their way out.
pub fn check_passt() -> Check {
    const NAME: &str = "passt";
    if on_path(NAME) {
        ok(
            NAME,
            "found (`--net user`: networking without root or netd)",
        )
    } else {
        bad(
            NAME,
            Level::Warn,
            "not found: `--net user` is unavailable (--net BRIDGE through netd still works)",
            "apt-get install passt",
        )
    }
}

/// gdb debugs guest kernels (`run --gdb`, `--gdb-batch`, `debug`); with
/// Yama at 1 an ordinary user may attach only to what the jail prepares
/// (`run --gdb`), not to a running guest (`debug`).
pub fn check_gdb() -> Check {
    const NAME: &str = "gdb";
    let Ok(p) = crate::gdb::find_gdb() else {
        return bad(
            NAME,
            Level::Warn,
            "not found: run --gdb, --gdb-batch and debug cannot debug guest kernels (everything else works)",
            "apt-get install gdb",
        );
    };
    let yama = fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    if yama == "1" && !nix::unistd::geteuid().is_root() {
        return bad(
            NAME,
            Level::Warn,
            format!(
                "{} found, but Yama's ptrace_scope 1 lets you attach only to your own descendants: run --gdb works, debug NAME does not",
                p.display()
            ),
            "run `umlctl debug` as root, or (as root) sysctl kernel.yama.ptrace_scope=0",
        );
    }
    ok(
        NAME,
        format!("{} (run --gdb, --gdb-batch, debug)", p.display()),
    )
}

/// Whether UML's jail can be built here: a real attempt (namespaces,
/// mounts, dropping privileges, starting a program inside).
pub fn check_jail() -> Check {
    const NAME: &str = "jail";
    match crate::jail::probe() {
        Ok(()) => {
            let spec = crate::jail::JailSpec::new(crate::jail::JailRoot::Empty, 0);
            let (u, _) = spec.identity();
            let ns = if nix::unistd::geteuid().is_root() {
                "mount, PID, network, IPC and UTS namespaces"
            } else {
                "user, mount, PID, network, IPC and UTS namespaces"
            };
            ok(
                NAME,
                format!("UML runs in {ns}, as uid {u}, without capabilities or host files"),
            )
        }
        Err(crate::error::Error::Host { detail, fix, .. }) => bad(NAME, Level::Fail, detail, fix),
        Err(e) => bad(
            NAME,
            Level::Fail,
            e.to_string(),
            "--no-jail runs UML without a jail (the guest is then not contained)",
        ),
    }
}

/// `kernel.yama.ptrace_scope`: 3 forbids ptrace entirely; 2 lets only
/// CAP_SYS_PTRACE trace, which UML (tracing its own children) lacks when
/// run by an ordinary user.
pub fn check_yama() -> Check {
    const NAME: &str = "yama ptrace_scope";
    let path = "/proc/sys/kernel/yama/ptrace_scope";
    let scope = match fs::read_to_string(path) {
        Ok(s) => s.trim().to_string(),
        Err(_) => return ok(NAME, "Yama is not enabled (no restriction)"),
    };
    let root = nix::unistd::geteuid().is_root();
    match scope.as_str() {
        "0" | "1" => ok(NAME, format!("{scope} (UML may trace its own children)")),
        "2" if root => ok(NAME, "2 (admin-only attach; you are root)"),
        "2" => bad(
            NAME,
            Level::Fail,
            "2: only processes with CAP_SYS_PTRACE may trace, so UML cannot run as an ordinary user",
            "sysctl kernel.yama.ptrace_scope=1 (as root)",
        ),
        other => bad(
            NAME,
            Level::Fail,
            format!("{other}: ptrace is disabled for everyone until reboot, and UML is built on ptrace"),
            "boot with kernel.yama.ptrace_scope=1 in /etc/sysctl.d (scope 3 cannot be lowered without a reboot)",
        ),
    }
}

/// The check UML makes first: a traced child's system call is emulated
/// with PTRACE_SYSEMU and its return value replaced.
pub fn check_sysemu() -> Check {
    const NAME: &str = "ptrace sysemu";
    match sysemu_probe() {
        Ok(()) => ok(NAME, "PTRACE_SYSEMU emulates a system call and sets its result"),
        Err(e) => bad(
            NAME,
            Level::Fail,
            e,
            "UML needs ptrace with PTRACE_SYSEMU (x86-64 Linux ≥ 2.6.14): do not run under a seccomp profile or container that blocks ptrace, nor under strace -f or a debugger",
        ),
    }
}

const MAGIC_RESULT: u64 = 0x5eed;

fn sysemu_probe() -> Result<(), String> {
    // SAFETY: the child only makes raw system calls, then _exit.
    let child = match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => unsafe {
            // SAFETY: raw syscalls in the forked child.
            if libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) != 0 {
                libc::_exit(3);
            }
            libc::kill(libc::getpid(), libc::SIGSTOP);
            let r = libc::syscall(libc::SYS_getpid);
            libc::_exit(if u64::try_from(r) == Ok(MAGIC_RESULT) {
                0
            } else {
                4
            });
        },
        ForkResult::Parent { child } => child,
    };
    let res = sysemu_drive(child);
    let _ = kill(child, Signal::SIGKILL);
    let _ = waitpid(child, None);
    res
}

fn sysemu_drive(child: Pid) -> Result<(), String> {
    match waitpid(child, None).map_err(|e| format!("waitpid: {e}"))? {
        WaitStatus::Stopped(_, Signal::SIGSTOP) => {}
        WaitStatus::Exited(_, 3) => return Err("PTRACE_TRACEME was refused".into()),
        other => return Err(format!("the traced child did not stop ({other:?})")),
    }
    ptrace::setoptions(child, ptrace::Options::PTRACE_O_TRACESYSGOOD)
        .map_err(|e| format!("PTRACE_SETOPTIONS: {e}"))?;
    for _ in 0..8 {
        ptrace::sysemu(child, None).map_err(|e| format!("PTRACE_SYSEMU: {e}"))?;
        match waitpid(child, None).map_err(|e| format!("waitpid: {e}"))? {
            WaitStatus::PtraceSyscall(_) => {}
            other => {
                return Err(format!(
                    "PTRACE_SYSEMU did not stop at a system call ({other:?})"
                ))
            }
        }
        let mut regs = ptrace::getregs(child).map_err(|e| format!("PTRACE_GETREGS: {e}"))?;
        if regs.orig_rax == libc::SYS_getpid as u64 {
            regs.rax = MAGIC_RESULT;
            ptrace::setregs(child, regs).map_err(|e| format!("PTRACE_SETREGS: {e}"))?;
            ptrace::cont(child, None).map_err(|e| format!("PTRACE_CONT: {e}"))?;
            return match waitpid(child, None).map_err(|e| format!("waitpid: {e}"))? {
                WaitStatus::Exited(_, 0) => Ok(()),
                WaitStatus::Exited(_, _) => {
                    Err("the emulated system call's result did not reach the child".into())
                }
                other => Err(format!("the child did not exit ({other:?})")),
            };
        }
        // Some other call (e.g. from libc around the stop): skip it too.
        regs.rax = 0;
        ptrace::setregs(child, regs).map_err(|e| format!("PTRACE_SETREGS: {e}"))?;
    }
    Err("never saw the child's getpid under PTRACE_SYSEMU".into())
}

/// The directory UML puts guest memory in: the first non-empty `$TMPDIR`,
/// `$TMP`, `$TEMP`; else /dev/shm if it is tmpfs; else /tmp.
pub fn uml_tempdir() -> PathBuf {
    for v in ["TMPDIR", "TMP", "TEMP"] {
        if let Some(d) = std::env::var_os(v).filter(|d| !d.is_empty()) {
            return PathBuf::from(d);
        }
    }
    let shm = Path::new("/dev/shm");
    if nix::sys::statfs::statfs(shm)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
    {
        return shm.to_path_buf();
    }
    PathBuf::from("/tmp")
}

/// Where an unjailed UML's memory file goes, and what to say about it.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryDir {
    /// The directory (UML gets it as `TMPDIR`).
    pub dir: PathBuf,
    /// Said always: the user's own `$TMPDIR` (or `$TMP`, `$TEMP`) was
    /// passed over.
    pub warning: Option<String>,
    /// Said under `-v`: UML's own default was passed over.
    pub note: Option<String>,
}

/// Choose the directory for an unjailed UML's memory file, which UML maps
/// executable: the user's `$TMPDIR` (`$TMP`, `$TEMP`) if set, else
/// /dev/shm if it is tmpfs, as UML itself would; if that directory is
/// mounted noexec (Docker's /dev/shm) or unusable, the first of umlctl's
/// runtime directory, /tmp and umlctl's cache directory where an
/// executable mapping works.
pub fn memory_dir_unjailed() -> Result<MemoryDir, crate::Error> {
    let explicit = ["TMPDIR", "TMP", "TEMP"].into_iter().find_map(|v| {
        std::env::var_os(v)
            .filter(|d| !d.is_empty())
            .map(|d| (v, PathBuf::from(d)))
    });
    let first = uml_tempdir();
    let first_err = match tmp_exec_probe(&first) {
        Ok(()) => {
            return Ok(MemoryDir {
                dir: first,
                warning: None,
                note: None,
            })
        }
        Err(e) => e,
    };
    let why = |e: &io::Error| {
        if e.raw_os_error() == Some(libc::EPERM) {
            "is mounted noexec".to_string()
        } else {
            format!("cannot hold it ({e})")
        }
    };
    let mut tried = vec![format!("{}: {}", first.display(), why(&first_err))];
    let candidates = [
        crate::paths::runtime_dir().ok(),
        Some(PathBuf::from("/tmp")),
        crate::paths::cache_dir().ok(),
    ];
    for dir in candidates.into_iter().flatten() {
        if dir == first {
            continue;
        }
        match tmp_exec_probe(&dir) {
            Ok(()) => {
                let said = format!(
                    "{} {}, and UML maps guest memory executable; its memory file goes in {} instead",
                    match explicit {
                        Some((var, _)) => format!("${var}={}", first.display()),
                        None => first.display().to_string(),
                    },
                    why(&first_err),
                    dir.display()
                );
                let (warning, note) = match explicit {
                    Some(_) => (Some(said), None),
                    None => (None, Some(said)),
                };
                return Ok(MemoryDir { dir, warning, note });
            }
            Err(e) => tried.push(format!("{}: {}", dir.display(), why(&e))),
        }
    }
    Err(crate::Error::Host {
        check: "exec mappings",
        detail: format!(
            "no directory can hold UML's guest memory (it is mapped executable):\n  {}",
            tried.join("\n  ")
        ),
        fix: "set TMPDIR to a writable directory on a filesystem without noexec (tmpfs is fastest), or drop --no-jail (a jail has its own tmpfs)".into(),
    })
}

/// UML maps its guest memory from a file in its temp directory with
/// PROT_EXEC; a `noexec` mount makes it exit at start. A jailed UML uses
/// the jail's own tmpfs, and an unjailed one a directory umlctl picks where
/// the mapping works, so this warns only when there is none.
pub fn check_tmp_exec() -> Check {
    const NAME: &str = "exec mappings";
    match memory_dir_unjailed() {
        Ok(MemoryDir {
            dir,
            warning: None,
            note: None,
        }) => ok(
            NAME,
            format!("PROT_EXEC mappings work in {}", dir.display()),
        ),
        Ok(MemoryDir { warning, note, .. }) => ok(
            NAME,
            format!(
                "{} (with --no-jail; jailed guests use the jail's own tmpfs)",
                warning.or(note).unwrap_or_default()
            ),
        ),
        Err(crate::Error::Host { detail, fix, .. }) => bad(
            NAME,
            Level::Warn,
            format!(
                "{detail}\n(matters only with --no-jail: jailed guests use the jail's own tmpfs)"
            ),
            fix,
        ),
        Err(e) => bad(
            NAME,
            Level::Warn,
            e.to_string(),
            "with --no-jail: set TMPDIR to a writable directory (tmpfs is fastest)",
        ),
    }
}

fn tmp_exec_probe(dir: &Path) -> io::Result<()> {
    let f = tempfile_in(dir)?;
    f.set_len(4096)?;
    // SAFETY: a fresh private mapping of a file we own, unmapped right away.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_EXEC,
            libc::MAP_PRIVATE,
            f.as_raw_fd(),
            0,
        );
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        libc::munmap(p, 4096);
    }
    Ok(())
}

/// An unnamed file in `dir`: O_TMPFILE, or where the filesystem lacks it,
/// a new name unlinked at once (as UML does itself).
fn tempfile_in(dir: &Path) -> io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .mode(0o600)
        .open(dir);
    match tmp {
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => tempfile::tempfile_in(dir),
        other => other,
    }
}

/// /dev/net/tun is needed for tap networking (`--net`), not for booting.
pub fn check_tun() -> Check {
    const NAME: &str = "/dev/net/tun";
    match fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun") {
        Ok(_) => ok(
            NAME,
            "present and openable (tap networking possible; labs can make their segments)",
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => bad(
            NAME,
            Level::Warn,
            "missing: guests cannot use tap networking (booting is unaffected)",
            "modprobe tun (as root), or in a container pass the device through (--device /dev/net/tun)",
        ),
        Err(e) => bad(
            NAME,
            Level::Warn,
            format!("not openable ({e}): taps must come from the umlctl netd helper, and labs (`lab start`) cannot make their segments"),
            "as root: chmod 0666 /dev/net/tun (what stock Debian, Ubuntu and Fedora give it; a udev rule KERNEL==\"tun\", MODE=\"0666\" keeps it), or run `umlctl netd` as root and use --net",
        ),
    }
}

/// The host's XSAVE area versus the kernel's FP buffer, and whether the
/// xstate shim will bridge the gap.
pub fn check_xstate(kernel: Option<&KernelInfo>, shim_enabled: bool) -> Check {
    const NAME: &str = "xsave size";
    let host = match xstate::probe_host_xstate() {
        Ok(h) => h,
        Err(e) => {
            return bad(
                NAME,
                Level::Fail,
                format!("cannot measure: {e}"),
                "see the ptrace checks above",
            )
        }
    };
    let host_txt = match host {
        HostXstate::Size { bytes } => format!("host XSAVE area {bytes} bytes"),
        HostXstate::Absent => "host has no XSTATE regset".to_string(),
    };
    let Some(k) = kernel else {
        return bad(
            NAME,
            Level::Warn,
            format!("{host_txt}; no kernel found to compare with"),
            "install a UML kernel (see `umlctl kernel info`)",
        );
    };
    match k.fp {
        KernelFp::Dynamic => ok(NAME, format!("{host_txt}; kernel {} sizes FP state at run time", k.version)),
        KernelFp::Fixed { bytes } if !k.fp.needs_shim(host) => ok(
            NAME,
            format!("{host_txt}; kernel {} handles up to {bytes} bytes, no shim needed", k.version),
        ),
        KernelFp::Fixed { bytes } => match (&k.linkage, shim_enabled) {
            (Linkage::Dynamic { .. }, true) => bad(
                NAME,
                Level::Warn,
                format!(
                    "{host_txt} > {bytes} bytes that kernel {} handles; umlctl preloads its xstate shim, so guests boot",
                    k.version
                ),
                "nothing to do; a kernel ≥ 6.13 would not need the shim",
            ),
            (Linkage::Dynamic { .. }, false) => bad(
                NAME,
                Level::Fail,
                format!(
                    "{host_txt} > {bytes} bytes that kernel {} handles, and the xstate shim is turned off: guests die at init (\"ptrace set fp regs failed, errno = 14\")",
                    k.version
                ),
                "drop --no-xstate-shim, or use a kernel ≥ 6.13",
            ),
            (Linkage::Static, _) => bad(
                NAME,
                Level::Fail,
                format!(
                    "{host_txt} > {bytes} bytes that kernel {} handles, and it is statically linked, so the xstate shim cannot be preloaded",
                    k.version
                ),
                "use a kernel ≥ 6.13 (or a dynamically linked build)",
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysemu_works_on_this_host() {
        // UML cannot run at all without it; the e2e suite depends on it.
        let c = check_sysemu();
        assert_eq!(c.level, Level::Ok, "{c:?}");
    }

    #[test]
    fn noexec_directory_is_reported() {
        // /proc is not a place for a tmpfile: the probe must fail, not pass.
        let e = tmp_exec_probe(Path::new("/proc")).unwrap_err();
        assert!(e.raw_os_error().is_some());
        assert!(tmp_exec_probe(&std::env::temp_dir()).is_ok());
    }
}

//! The host's XSAVE area size versus what a UML kernel can handle, and the
//! `LD_PRELOAD` shim that lets older kernels boot on hosts with a larger area.
//!
//! UML before 6.13 saves and restores guest FP state with a fixed
//! 2696-byte `PTRACE_SETREGSET(NT_X86_XSTATE)`. The host refuses a short SET
//! with EFAULT, so on hosts whose XSAVE area is larger (AMX: 11008 bytes) the
//! guest dies at init with "ptrace set fp regs failed, errno = 14". The shim
//! (`shim/xstate_shim.c`) turns a short SET into a full-size one.

use std::fs;
use std::path::PathBuf;

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};
use sha2::{Digest, Sha256};

use crate::error::{errno, Error, Result};
use crate::paths;

/// The XSTATE buffer size compiled into UML kernels before 6.13.
pub const LEGACY_UML_XSTATE: usize = 2696;

/// `NT_X86_XSTATE`, the regset note type for the XSAVE area.
const NT_X86_XSTATE: libc::c_int = 0x202;

/// The shim, built from `shim/xstate_shim.c` by `build.rs`.
pub static SHIM_SO: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/xstate_shim.so"));

/// What the host's ptrace reports for the XSTATE regset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HostXstate {
    /// The regset exists and has this many bytes.
    Size { bytes: usize },
    /// The host has no XSTATE regset (no XSAVE); only FXSAVE state.
    Absent,
}

impl HostXstate {
    /// Bytes of XSTATE, 0 when absent.
    pub fn bytes(self) -> usize {
        match self {
            HostXstate::Size { bytes } => bytes,
            HostXstate::Absent => 0,
        }
    }
}

/// The host's XSTATE size, measured once per host boot and remembered in
/// the runtime directory (the CPU and host kernel cannot change without a
/// reboot).
pub fn host_xstate() -> Result<HostXstate> {
    let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let boot_id = boot_id.trim();
    let cache = paths::runtime_dir()
        .ok()
        .filter(|_| !boot_id.is_empty())
        .map(|d| d.join(format!("xstate-{boot_id}")));
    if let Some(c) = &cache {
        match fs::read_to_string(c).ok().as_deref().map(str::trim) {
            Some("absent") => return Ok(HostXstate::Absent),
            Some(n) => {
                if let Ok(bytes) = n.parse() {
                    return Ok(HostXstate::Size { bytes });
                }
            }
            None => {}
        }
    }
    let h = probe_host_xstate()?;
    if let Some(c) = &cache {
        let text = match h {
            HostXstate::Size { bytes } => bytes.to_string(),
            HostXstate::Absent => "absent".into(),
        };
        let _ = paths::write_atomic(c, text.as_bytes(), 0o600);
    }
    Ok(h)
}

/// Measure the host's XSTATE regset size the way UML would meet it: fork a
/// child that stops under `PTRACE_TRACEME`, and ask for its XSTATE with a
/// buffer larger than any real one; the host truncates the answer to its
/// real size.
pub fn probe_host_xstate() -> Result<HostXstate> {
    // SAFETY: the child only calls async-signal-safe functions (ptrace,
    // kill, getpid, _exit) before exiting.
    let child = match unsafe { fork() }.map_err(|e| Error::sys("fork (xstate probe)", errno(e)))? {
        ForkResult::Child => {
            // SAFETY: plain syscalls in the forked child, then _exit.
            unsafe {
                if libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) != 0 {
                    libc::_exit(2);
                }
                libc::kill(libc::getpid(), libc::SIGSTOP);
                libc::_exit(0);
            }
        }
        ForkResult::Parent { child } => child,
    };
    let result = probe_stopped_child(child);
    let _ = kill(child, Signal::SIGKILL);
    let _ = waitpid(child, None);
    result
}

fn probe_stopped_child(child: Pid) -> Result<HostXstate> {
    match waitpid(child, None).map_err(|e| Error::sys("waitpid (xstate probe)", errno(e)))? {
        WaitStatus::Stopped(_, Signal::SIGSTOP) => {}
        WaitStatus::Exited(_, 2) => {
            return Err(Error::Host {
                check: "ptrace",
                detail: "PTRACE_TRACEME is refused on this host".into(),
                fix: "allow ptrace: set kernel.yama.ptrace_scope to 0 or 1, and do not run umlctl under a seccomp profile that blocks ptrace".into(),
            })
        }
        other => {
            return Err(Error::Host {
                check: "ptrace",
                detail: format!("the probe child did not stop as expected ({other:?})"),
                fix: "make sure umlctl is not itself being traced (strace -f, gdb)".into(),
            })
        }
    }
    let mut buf = vec![0u8; 256 * 1024];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: GETREGSET writes at most iov_len bytes into `buf`, which lives
    // until after the call; the tracee is stopped.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_GETREGSET,
            child.as_raw(),
            NT_X86_XSTATE as usize as *mut libc::c_void,
            &mut iov as *mut libc::iovec as *mut libc::c_void,
        )
    };
    if r == 0 {
        return Ok(HostXstate::Size { bytes: iov.iov_len });
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENODEV) | Some(libc::EINVAL) => Ok(HostXstate::Absent),
        _ => Err(Error::sys(
            "PTRACE_GETREGSET(NT_X86_XSTATE) on a stopped child",
            e,
        )),
    }
}

/// How much XSTATE a kernel can save and restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum KernelFp {
    /// A compile-time buffer of this many bytes (UML < 6.13).
    Fixed { bytes: usize },
    /// Sized at run time from the host (UML ≥ 6.13).
    Dynamic,
}

impl KernelFp {
    /// What a kernel of this release handles.
    pub fn for_release(release: (u32, u32, u32)) -> Self {
        if (release.0, release.1) >= (6, 13) {
            KernelFp::Dynamic
        } else {
            KernelFp::Fixed {
                bytes: LEGACY_UML_XSTATE,
            }
        }
    }

    /// Whether the kernel needs help on a host with this XSTATE.
    pub fn needs_shim(self, host: HostXstate) -> bool {
        match self {
            KernelFp::Dynamic => false,
            KernelFp::Fixed { bytes } => host.bytes() > bytes,
        }
    }
}

/// The shim written out under the cache, named by its content hash, so that
/// several umlctl versions can coexist and a file is never rewritten in place.
pub fn shim_path() -> Result<PathBuf> {
    let digest = Sha256::digest(SHIM_SO);
    let hex: String = digest.iter().take(12).map(|b| format!("{b:02x}")).collect();
    let dir = paths::cache_dir()?.join("shim");
    paths::ensure_dir(&dir)?;
    let path = dir.join(format!("xstate-{hex}.so"));
    match fs::read(&path) {
        Ok(existing) if existing == SHIM_SO => return Ok(path),
        _ => {}
    }
    paths::write_atomic(&path, SHIM_SO, 0o644)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_thresholds() {
        assert_eq!(
            KernelFp::for_release((6, 12, 117)),
            KernelFp::Fixed { bytes: 2696 }
        );
        assert_eq!(
            KernelFp::for_release((6, 1, 0)),
            KernelFp::Fixed { bytes: 2696 }
        );
        assert_eq!(KernelFp::for_release((6, 13, 0)), KernelFp::Dynamic);
        assert_eq!(KernelFp::for_release((7, 0, 0)), KernelFp::Dynamic);
    }

    #[test]
    fn shim_needed_only_when_host_is_larger() {
        let fixed = KernelFp::Fixed { bytes: 2696 };
        assert!(fixed.needs_shim(HostXstate::Size { bytes: 11008 }));
        assert!(!fixed.needs_shim(HostXstate::Size { bytes: 2696 }));
        assert!(!fixed.needs_shim(HostXstate::Size { bytes: 832 }));
        assert!(!fixed.needs_shim(HostXstate::Absent));
        assert!(!KernelFp::Dynamic.needs_shim(HostXstate::Size { bytes: 11008 }));
    }

    #[test]
    fn shim_is_a_shared_object_exporting_ptrace() {
        assert_eq!(&SHIM_SO[..4], b"\x7fELF");
        assert!(memchr::memmem::find(SHIM_SO, b"ptrace").is_some());
    }

    /// SET `len` bytes of XSTATE with a pattern in XMM0 on a stopped child;
    /// returns (SET result, whether a full GET afterwards shows the pattern).
    fn short_set_on_a_child(len: usize) -> (Result<(), i32>, bool) {
        // SAFETY: the test child only makes async-signal-safe calls.
        let child = match unsafe { fork() }.unwrap() {
            // SAFETY: plain system calls in the forked child, which exits.
            ForkResult::Child => unsafe {
                libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0);
                libc::kill(libc::getpid(), libc::SIGSTOP);
                libc::_exit(0);
            },
            ForkResult::Parent { child } => child,
        };
        assert!(matches!(
            waitpid(child, None).unwrap(),
            WaitStatus::Stopped(_, Signal::SIGSTOP)
        ));
        let regset = |req, buf: &mut Vec<u8>, len: usize| -> Result<usize, i32> {
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: len,
            };
            // SAFETY: iov describes `len` bytes of buf, which outlives the
            // call; the child is stopped under our trace.
            let r = unsafe {
                libc::ptrace(
                    req,
                    child.as_raw(),
                    NT_X86_XSTATE as usize as *mut libc::c_void,
                    &mut iov as *mut libc::iovec,
                )
            };
            if r == 0 {
                Ok(iov.iov_len)
            } else {
                Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
            }
        };
        let mut buf = vec![0u8; 64 * 1024];
        let full = regset(libc::PTRACE_GETREGSET, &mut buf, 64 * 1024).unwrap();
        assert!(full >= len);
        // XMM0 lives at offset 160 of the legacy area; mark SSE state as
        // present in the XSAVE header's xstate_bv (offset 512).
        let pattern: Vec<u8> = (0xA0..0xB0).collect();
        buf[160..176].copy_from_slice(&pattern);
        buf[512] |= 0x2;
        let set = regset(libc::PTRACE_SETREGSET, &mut buf, len).map(|_| ());
        let mut after = vec![0u8; 64 * 1024];
        regset(libc::PTRACE_GETREGSET, &mut after, 64 * 1024).unwrap();
        let _ = kill(child, Signal::SIGKILL);
        let _ = waitpid(child, None);
        (set, after[160..176] == pattern[..])
    }

    /// Run in a child process by `shim_turns_a_short_setregset_into_a_full_one`,
    /// with and without the shim preloaded.
    #[test]
    #[ignore = "helper, run by shim_turns_a_short_setregset_into_a_full_one"]
    fn short_setregset_child() {
        let (set, seen) = short_set_on_a_child(576);
        match set {
            Ok(()) => println!("set=ok seen={seen}"),
            Err(e) => println!("set=errno{e} seen={seen}"),
        }
    }

    #[test]
    fn shim_turns_a_short_setregset_into_a_full_one() {
        // A 576-byte SET (legacy area + header) is short on every host with
        // AVX, like UML's 2696 bytes are short on AMX hosts: the host
        // refuses it with EFAULT, and the shim must make it work.
        let host = probe_host_xstate().unwrap().bytes();
        assert!(
            host > 576,
            "this test needs an x86-64 host with XSAVE beyond SSE (got {host})"
        );
        let dir = tempfile::tempdir().unwrap();
        let so = dir.path().join("shim.so");
        std::fs::write(&so, SHIM_SO).unwrap();
        let exe = std::env::current_exe().unwrap();
        let child = |preload: Option<&std::path::Path>| {
            let mut c = std::process::Command::new(&exe);
            c.args([
                "--ignored",
                "--exact",
                "xstate::tests::short_setregset_child",
                "--nocapture",
                "--test-threads=1",
            ]);
            c.env_remove("LD_PRELOAD");
            if let Some(p) = preload {
                c.env("LD_PRELOAD", p);
            }
            let out = c.output().unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let without = child(None);
        assert!(
            without.contains("set=errno14"),
            "without the shim the host should refuse a short SET: {without}"
        );
        let with = child(Some(&so));
        assert!(
            with.contains("set=ok seen=true"),
            "with the shim the short SET should apply: {with}"
        );
    }

    #[test]
    fn probe_reports_a_plausible_size() {
        match probe_host_xstate().expect("probe") {
            HostXstate::Size { bytes } => assert!((512..=1 << 20).contains(&bytes), "{bytes}"),
            HostXstate::Absent => {}
        }
    }
}

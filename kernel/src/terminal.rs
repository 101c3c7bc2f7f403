//! Saving, changing and restoring a host terminal.

use std::os::fd::{BorrowedFd, RawFd};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::termios::{self, SetArg, Termios};

/// Restores a terminal's settings (termios and file status flags, which UML
/// changes to non-blocking) when dropped.
pub struct TermGuard {
    fd: RawFd,
    termios: Termios,
    flags: libc::c_int,
}

impl TermGuard {
    /// Remember `fd`'s settings; `None` if it is not a terminal.
    pub fn save(fd: RawFd) -> Option<TermGuard> {
        // SAFETY: the descriptor is only borrowed for this call.
        let bfd = unsafe { BorrowedFd::borrow_raw(fd) };
        let t = termios::tcgetattr(bfd).ok()?;
        let flags = fcntl(fd, FcntlArg::F_GETFL).unwrap_or(-1);
        Some(TermGuard {
            fd,
            termios: t,
            flags,
        })
    }

    /// Remember `fd`'s settings and put it in raw mode (every key passes
    /// through, no echo, no signals); `None` if it is not a terminal.
    pub fn raw(fd: RawFd) -> Option<TermGuard> {
        let g = TermGuard::save(fd)?;
        let mut t = g.termios.clone();
        termios::cfmakeraw(&mut t);
        // SAFETY: as in save().
        let bfd = unsafe { BorrowedFd::borrow_raw(fd) };
        let _ = termios::tcsetattr(bfd, SetArg::TCSANOW, &t);
        Some(g)
    }
}

impl Drop for TermGuard {
    fn drop(&mut self) {
        // SAFETY: as in save().
        let bfd = unsafe { BorrowedFd::borrow_raw(self.fd) };
        let _ = termios::tcsetattr(bfd, SetArg::TCSANOW, &self.termios);
        if self.flags >= 0 {
            let flags = OFlag::from_bits_truncate(self.flags);
            let _ = fcntl(self.fd, FcntlArg::F_SETFL(flags));
        }
    }
}

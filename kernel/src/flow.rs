//! Flow control shared by the host and the guest: [`Window`] (how much
//! may be in flight) and [`Filler`] (filling a ring slot from a stream —
//! the host's stdin, a command's output pipe in the guest).
//!
//! Every slot costs a `data` message and an `ack` on the serial lines,
//! whose input side UML reads one byte per host system call; so while a
//! stream floods, a slot should carry much. A writer that writes in small
//! pieces (`head -c` writes 8 KiB at a time) would otherwise send a slot per
//! piece. While a stream trickles, each piece goes at once, so output
//! appears as it is written and a line typed reaches the command.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Flow control: how much of a stream its reader has taken in all, so that
/// the writer keeps at most `window` units in flight — ring slots (`run`'s
/// streams, both ends), or bytes (`umlctl exec`'s serial lines, whose guest
/// tty must never fill).
pub(crate) struct Window {
    /// (units the reader has taken, the reader is gone)
    state: Mutex<(u64, bool)>,
    cv: std::sync::Condvar,
    window: u64,
}

impl Window {
    pub(crate) fn new(window: u64) -> Self {
        Window {
            state: Mutex::new((0, false)),
            cv: std::sync::Condvar::new(),
            window,
        }
    }

    pub(crate) fn grant(&self, consumed: u64) {
        if let Ok(mut s) = self.state.lock() {
            s.0 = s.0.max(consumed);
        }
        self.cv.notify_all();
    }

    pub(crate) fn close(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.1 = true;
        }
        self.cv.notify_all();
    }

    /// Wait until fewer than `window` of the `sent` units are unread; how
    /// many more may go. `None` once the reader is gone.
    pub(crate) fn room(&self, sent: u64) -> Option<u64> {
        let mut s = self.state.lock().ok()?;
        loop {
            if s.1 {
                return None;
            }
            let inflight = sent.saturating_sub(s.0);
            if inflight < self.window {
                return Some(self.window - inflight);
            }
            s = self.cv.wait(s).ok()?;
        }
    }
}

/// More than this in one [`WINDOW`] is a flood.
const FLOOD_BYTES: u64 = 1 << 20;
const WINDOW: Duration = Duration::from_millis(100);
/// While flooding, a slot waits this long at most for more data…
const GATHER: Duration = Duration::from_millis(2);
/// …unless it already holds this much.
const ENOUGH: usize = 256 * 1024;

/// One stream's fill state: how much went recently.
pub(crate) struct Filler {
    window: (Instant, u64),
}

impl Default for Filler {
    fn default() -> Self {
        Filler {
            window: (Instant::now(), 0),
        }
    }
}

impl Filler {
    /// Whether the stream is flooding (more than 1 MiB in the last 100 ms).
    pub(crate) fn flooding(&self) -> bool {
        self.window.1 > FLOOD_BYTES && self.window.0.elapsed() <= WINDOW
    }

    /// Read what `from` has, up to `buf`'s size: the first read waits;
    /// then, while the stream floods, more is gathered for up to 2 ms (or
    /// until 256 KiB are in); otherwise only what is ready at once. 0 means
    /// EOF, or an input that cannot be read (a closed descriptor).
    pub(crate) fn fill(&mut self, from: &mut File, buf: &mut [u8]) -> usize {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut n = 0;
        let mut deadline = None;
        loop {
            match from.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
            if n == buf.len() {
                break;
            }
            let wait = if self.flooding() && n < ENOUGH {
                let d = *deadline.get_or_insert_with(|| Instant::now() + GATHER);
                d.saturating_duration_since(Instant::now())
            } else {
                Duration::ZERO
            };
            let ms = u16::try_from(wait.as_millis()).unwrap_or(u16::MAX);
            // Sub-millisecond remainders round up to 1 ms, never down to 0.
            let timeout = if wait.is_zero() {
                PollTimeout::ZERO
            } else {
                PollTimeout::from(ms.max(1))
            };
            let mut fds = [PollFd::new(from.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, timeout) {
                Ok(1..) => {}
                _ => break,
            }
        }
        let now = Instant::now();
        if now - self.window.0 > WINDOW {
            self.window = (now, 0);
        }
        self.window.1 += n as u64;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_trickle_goes_at_once_and_a_flood_is_gathered() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let (mut r, mut w) = (File::from(r), File::from(w));
        let mut f = Filler::default();
        let mut buf = vec![0u8; 1 << 20];
        w.write_all(b"line\n").unwrap();
        assert_eq!(f.fill(&mut r, &mut buf), 5);
        assert!(!f.flooding());
        // A writer that floods in 8 KiB pieces, slower than the reader.
        let t = std::thread::spawn(move || {
            for _ in 0..2048 {
                w.write_all(&[7u8; 8192]).unwrap();
            }
        });
        let mut sizes = Vec::new();
        loop {
            let n = f.fill(&mut r, &mut buf);
            if n == 0 {
                break;
            }
            sizes.push(n);
        }
        t.join().unwrap();
        assert_eq!(sizes.iter().sum::<usize>(), 2048 * 8192);
        // Once flooding, slots carry more than one piece each.
        assert!(sizes.len() < 2048, "{} slots", sizes.len());
    }
}

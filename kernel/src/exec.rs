//! `umlctl exec`: run a command in a running detached guest, with stdout,
//! stderr and the exit status passed through (the same codes as `run`), an
//! optional pseudo-terminal (`-t`) and stdin (`-i`). It needs nothing in
//! the image: the guest's exec agent (forked by umlctl's init before the
//! image's init) serves one UML serial line per slot, and `start` gave UML
//! a FIFO pair per slot. An exec takes a free slot (a lock file), starts a
//! session with a fresh nonce (whatever an earlier, killed exec left on the
//! line is skipped), and speaks [`crate::execproto`].

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::error::{Error, Result};
use crate::execproto::{self as proto, kind, Ended, ExecSpec, SLOTS};
use crate::flow::Window;
use crate::instance::{self, State};

/// How long the agent may take to answer a new session.
const ANSWER: Duration = Duration::from_secs(10);

/// Run `spec` in guest `name`; the exit code to leave with. With a
/// terminal, its size is the host terminal's (stdin's).
pub fn exec(name: &str, spec: &ExecSpec) -> Result<i32> {
    exec_to(
        name,
        spec,
        true,
        &mut std::io::stdout(),
        &mut std::io::stderr(),
    )
}

/// Run `spec` (without stdin or a terminal) in guest `name` and keep what
/// it writes: its exit code, and the first [`OUTPUT_MAX`] bytes of its
/// stdout and stderr (a guest is not trusted to write little). Signals to
/// this process are not passed on (a probe, not the user's command).
pub fn output(name: &str, spec: &ExecSpec) -> Result<(i32, Vec<u8>, Vec<u8>)> {
    let mut spec = spec.clone();
    spec.stdin = false;
    spec.tty = false;
    let (mut out, mut err) = (Capped::default(), Capped::default());
    let code = exec_to(name, &spec, false, &mut out, &mut err)?;
    Ok((code, out.0, err.0))
}

/// How much of each stream [`output`] keeps.
pub const OUTPUT_MAX: usize = 64 * 1024;

/// A sink that keeps the first [`OUTPUT_MAX`] bytes and drops the rest.
#[derive(Default)]
struct Capped(Vec<u8>);

impl Write for Capped {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let room = OUTPUT_MAX.saturating_sub(self.0.len());
        self.0.extend_from_slice(&b[..b.len().min(room)]);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn exec_to(
    name: &str,
    spec: &ExecSpec,
    forward: bool,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> Result<i32> {
    let mut spec = spec.clone();
    if spec.tty && spec.rows == 0 {
        if let Some((rows, cols)) = crate::run::winsize(0) {
            spec.rows = rows;
            spec.cols = cols;
        }
    }
    let spec = &spec;
    if spec.argv.is_empty() {
        return Err(Error::Usage("exec needs a command after --".into()));
    }
    if spec.argv.iter().any(|a| a.contains('\0')) {
        return Err(Error::Usage("the command contains a NUL byte".into()));
    }
    let g = instance::load(name)?;
    let Connected {
        slot: _slot,
        tx,
        mut from_guest,
        mut dec,
        mut buf,
        ring,
    } = connect(&g, name, Some(spec))?;

    let credits = Arc::new(Window::new(crate::execproto::WINDOW));
    let ring_slots = Arc::new(Window::new(proto::ring::SLOTS));
    let _term = if spec.tty {
        crate::terminal::TermGuard::raw(0)
    } else {
        None
    };
    if spec.stdin {
        let tx = Arc::clone(&tx);
        let credits = Arc::clone(&credits);
        match ring {
            // Keystrokes on a terminal stay on the line.
            Some(ring) if !spec.tty => {
                let slots = Arc::clone(&ring_slots);
                std::thread::spawn(move || copy_stdin_ring(&tx, &credits, &ring, &slots));
            }
            _ => {
                std::thread::spawn(move || copy_stdin(&tx, &credits));
            }
        }
    }
    let close = || {
        credits.close();
        ring_slots.close();
    };
    if forward {
        forward_signals(spec.tty, Arc::clone(&tx))?;
    }

    let mut heard = Instant::now();
    loop {
        loop {
            let f = match dec.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    return Err(Error::Usage(format!(
                        "guest {name} sent a bad exec frame: {e}"
                    )))
                }
            };
            match f.kind {
                kind::CREDIT => {
                    if let Ok(c) = proto::credit(&f.payload) {
                        credits.grant(c);
                    }
                }
                kind::RING_ACK => {
                    if let Ok(n) = proto::ring_ack(&f.payload) {
                        ring_slots.grant(n);
                    }
                }
                kind::STDOUT => {
                    let _ = stdout.write_all(&f.payload);
                    let _ = stdout.flush();
                }
                kind::STDERR => {
                    let _ = stderr.write_all(&f.payload);
                    let _ = stderr.flush();
                }
                kind::EXIT => {
                    let ended = proto::ended(&f.payload).map_err(|e| {
                        Error::Usage(format!("guest {name} sent a bad exit status: {e}"))
                    })?;
                    return Ok(match ended {
                        Ended::Exited(c) => c,
                        Ended::Signaled(s) => crate::exit::signaled(s),
                    });
                }
                kind::ERROR => {
                    let (code, msg) = proto::error(&f.payload)
                        .map_err(|e| Error::Usage(format!("guest {name} sent a bad error: {e}")))?;
                    drop(_term);
                    let _ = writeln!(stderr, "umlctl: {msg}");
                    return Ok(code.into());
                }
                _ => {}
            }
        }
        match read_some(&mut from_guest, &mut buf, Duration::from_secs(1))? {
            Some(0) => {
                close();
                return Err(gone(name));
            }
            Some(n) => {
                heard = Instant::now();
                dec.push(&buf[..n]);
            }
            None => {
                // UML holds the FIFO's write side: a quiet line is normal,
                // a dead guest or agent (no heartbeat) is noticed here.
                if g.state() != State::Running {
                    close();
                    return Err(gone(name));
                }
                if heard.elapsed() > proto::ALIVE_TIMEOUT {
                    close();
                    return Err(Error::Usage(format!(
                        "guest {name}'s exec agent stopped answering (nothing for {} s); the command's fate is unknown",
                        proto::ALIVE_TIMEOUT.as_secs()
                    )));
                }
            }
        }
    }
}

/// A session on a slot, READY received.
struct Connected {
    /// Held for as long as the session runs.
    slot: Flock<File>,
    tx: Arc<Sender>,
    from_guest: File,
    dec: proto::Decoder,
    buf: Vec<u8>,
    /// The slot's stdin ring, if the agent offered it.
    ring: Option<File>,
}

/// Take a slot of running guest `g`, start a session and send `spec` (none:
/// only see that the agent answers).
fn connect(g: &instance::Guest, name: &str, spec: Option<&ExecSpec>) -> Result<Connected> {
    if g.state() != State::Running {
        return Err(Error::Usage(format!(
            "guest {name} is not running (see `umlctl ps --all`)"
        )));
    }
    let layout = &g.layout;
    if !layout.exec_in(0).exists() {
        return Err(Error::Usage(format!(
            "guest {name} has no exec slots (it was started by an older umlctl); restart it"
        )));
    }
    // A free slot: its lock is held for as long as this exec runs.
    // When all are busy, wait for one (chosen by pid, to spread waiters).
    let open_lock = |i: u32| {
        let p = layout.exec_lock(i);
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&p)
            .map_err(|e| Error::io("open", &p, e))
    };
    let mut slot = None;
    for i in 0..SLOTS {
        if let Ok(l) = Flock::lock(open_lock(i)?, FlockArg::LockExclusiveNonblock) {
            slot = Some((i, l));
            break;
        }
    }
    let (i, lock) = match slot {
        Some(s) => s,
        None => {
            let i = std::process::id() % SLOTS;
            let l = Flock::lock(open_lock(i)?, FlockArg::LockExclusive)
                .map_err(|(_, e)| Error::sys("wait for an exec slot", crate::error::errno(e)))?;
            (i, l)
        }
    };
    // UML holds both FIFOs open: no reader means no guest.
    let to_guest = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(layout.exec_in(i))
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENXIO) => Error::Usage(format!("guest {name} is not running")),
            _ => Error::io("open", layout.exec_in(i), e),
        })?;
    set_blocking(&to_guest)?;
    let mut from_guest = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(layout.exec_out(i))
        .map_err(|e| Error::io("open", layout.exec_out(i), e))?;
    // What an earlier exec on this slot left unread.
    let mut buf = vec![0u8; 64 * 1024];
    while matches!(from_guest.read(&mut buf), Ok(n) if n > 0) {}

    let nonce = nonce();
    let tx = Arc::new(Sender {
        file: Mutex::new(to_guest),
        sent: AtomicU64::new(0),
    });
    tx.send_uncounted(kind::HELLO, &nonce.to_le_bytes())?;
    if let Some(spec) = spec {
        let spec_bytes = serde_json::to_vec(spec).map_err(|e| Error::Usage(e.to_string()))?;
        tx.send(kind::SPEC, &spec_bytes)?;
    }

    let mut dec = proto::Decoder::default();
    let ready = proto::encode(kind::READY, &nonce.to_le_bytes());
    // An agent with a stdin ring says so just before READY.
    let ring_offer = proto::encode(kind::RING, &nonce.to_le_bytes());
    let mut offered = false;
    let deadline = Instant::now() + ANSWER;
    loop {
        offered |= dec.contains(&ring_offer);
        if dec.seek(&ready) {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Usage(format!(
                "guest {name}'s exec agent did not answer on slot {i} within {} s (is it still booting, or was it started with another init than umlctl's?)",
                ANSWER.as_secs()
            )));
        }
        match read_some(&mut from_guest, &mut buf, left)? {
            Some(0) => return Err(gone(name)),
            Some(n) => dec.push(&buf[..n]),
            None => {}
        }
    }
    // The READY frame itself.
    let _ = dec.next_frame();
    let ring = if offered {
        OpenOptions::new()
            .write(true)
            .open(layout.exec_ring(i))
            .ok()
    } else {
        None
    };
    Ok(Connected {
        slot: lock,
        tx,
        from_guest,
        dec,
        buf,
        ring,
    })
}

/// Give the guest's console (`tty1`) a size, as `umlctl console` does for
/// the host terminal it attaches.
pub fn console_size(name: &str, rows: u16, cols: u16) -> Result<()> {
    let g = instance::load(name)?;
    let c = connect(&g, name, None)?;
    c.tx.send(kind::TTY_SIZE, &proto::tty_size_payload(1, rows, cols))
}

/// Whether guest `name`'s exec agent answers now (`start --wait exec`).
pub fn ping(name: &str) -> Result<()> {
    let g = instance::load(name)?;
    connect(&g, name, None).map(|_| ())
}

fn gone(name: &str) -> Error {
    Error::Usage(format!("guest {name} stopped while the command ran"))
}

fn set_blocking(f: &File) -> Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let fl = fcntl(f.as_raw_fd(), FcntlArg::F_GETFL)
        .map_err(|e| Error::sys("fcntl", crate::error::errno(e)))?;
    let fl = OFlag::from_bits_truncate(fl) & !OFlag::O_NONBLOCK;
    fcntl(f.as_raw_fd(), FcntlArg::F_SETFL(fl))
        .map_err(|e| Error::sys("fcntl", crate::error::errno(e)))?;
    Ok(())
}

/// Read what is there within `wait`: `Some(0)` at EOF, `None` if nothing
/// came.
fn read_some(f: &mut File, buf: &mut [u8], wait: Duration) -> Result<Option<usize>> {
    let ms = u16::try_from(wait.as_millis()).unwrap_or(u16::MAX);
    let mut fds = [PollFd::new(f.as_fd_ref(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::from(ms)) {
        Ok(0) => return Ok(None),
        Ok(_) => {}
        Err(nix::errno::Errno::EINTR) => return Ok(None),
        Err(e) => return Err(Error::sys("poll", crate::error::errno(e))),
    }
    match f.read(buf) {
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(None),
        Err(e) => Err(Error::sys("read from the guest's exec line", e)),
    }
}

trait AsFdRef {
    fn as_fd_ref(&self) -> std::os::fd::BorrowedFd<'_>;
}

impl AsFdRef for File {
    fn as_fd_ref(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(self)
    }
}

/// The host end of a slot's input line; counts what it sends after HELLO
/// (the agent credits the same bytes).
struct Sender {
    file: Mutex<File>,
    sent: AtomicU64,
}

impl Sender {
    fn send(&self, k: u8, payload: &[u8]) -> Result<()> {
        let frame = proto::encode(k, payload);
        let mut f = self
            .file
            .lock()
            .map_err(|_| Error::Usage("exec line lock poisoned".into()))?;
        f.write_all(&frame)
            .map_err(|e| Error::sys("write to the guest's exec line", e))?;
        self.sent.fetch_add(frame.len() as u64, Ordering::SeqCst);
        Ok(())
    }

    fn send_uncounted(&self, k: u8, payload: &[u8]) -> Result<()> {
        let mut f = self
            .file
            .lock()
            .map_err(|_| Error::Usage("exec line lock poisoned".into()))?;
        f.write_all(&proto::encode(k, payload))
            .map_err(|e| Error::sys("write to the guest's exec line", e))
    }
}

/// Copy the host's stdin to the command, within the window the agent's
/// credits allow; then EOF.
fn copy_stdin(tx: &Sender, credits: &Window) {
    let mut stdin = std::io::stdin().lock();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        if !send_on_line(tx, credits, &buf[..n]) {
            return;
        }
    }
    let _ = tx.send(kind::STDIN_EOF, &[]);
}

/// Send `data` as STDIN frames within the window; `false` once the agent
/// is gone.
fn send_on_line(tx: &Sender, credits: &Window, data: &[u8]) -> bool {
    let mut off = 0;
    while off < data.len() {
        let sent = tx.sent.load(Ordering::SeqCst);
        let Some(room) = credits.room(sent) else {
            return false;
        };
        // The header counts against the window too.
        let room = usize::try_from(room).unwrap_or(usize::MAX);
        if room <= proto::HEADER {
            // Wait for more credit.
            if credits
                .room(sent + u64::try_from(room).unwrap_or(0))
                .is_none()
            {
                return false;
            }
            continue;
        }
        let k = (data.len() - off).min(room - proto::HEADER);
        if tx.send(kind::STDIN, &data[off..off + k]).is_err() {
            return false;
        }
        off += k;
    }
    true
}

/// Copy the host's stdin to the command through the slot's ring: each
/// piece (gathered while stdin floods, at once while it trickles) is
/// written into the next of [`proto::ring::SLOTS`] slots, then announced by
/// a STDIN_RING frame; a slot is written again only after the agent took
/// it. Then EOF. If the ring cannot be written (a full disk), the rest goes
/// on the line, in order.
fn copy_stdin_ring(tx: &Sender, credits: &Window, ring: &File, slots: &Window) {
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileExt;
    let Ok(fd) = std::io::stdin().as_fd().try_clone_to_owned() else {
        return;
    };
    let mut input = File::from(fd);
    let mut filler = crate::flow::Filler::default();
    let mut buf = vec![0u8; crate::num::usize_of(proto::ring::SLOT)];
    let frame = (proto::HEADER + 4) as u64;
    let mut seq = 0u64;
    let mut on_ring = true;
    loop {
        let n = filler.fill(&mut input, &mut buf);
        if n == 0 {
            break;
        }
        if slots.room(seq).is_none() {
            return;
        }
        if on_ring
            && ring
                .write_all_at(&buf[..n], proto::ring::offset(seq))
                .is_err()
        {
            eprintln!("umlctl: warning: cannot write the exec stdin ring (disk full?); stdin goes on the serial line");
            on_ring = false;
        }
        if !on_ring {
            if !send_on_line(tx, credits, &buf[..n]) {
                return;
            }
            continue;
        }
        // The frame counts against the line's window like any other.
        loop {
            let sent = tx.sent.load(Ordering::SeqCst);
            match credits.room(sent) {
                None => return,
                Some(r) if r >= frame => break,
                Some(r) => {
                    if credits.room(sent + r).is_none() {
                        return;
                    }
                }
            }
        }
        let len = u32::try_from(n).unwrap_or(u32::MAX);
        if tx.send(kind::STDIN_RING, &len.to_le_bytes()).is_err() {
            return;
        }
        seq += 1;
    }
    let _ = tx.send(kind::STDIN_EOF, &[]);
}

/// Ctrl-C and friends go to the command (its process group) without a
/// terminal; with one they are keys and pass as data. A window size
/// change reaches the command's terminal.
fn forward_signals(tty: bool, tx: Arc<Sender>) -> Result<()> {
    use signal_hook::consts::*;
    let list: Vec<i32> = if tty {
        vec![SIGWINCH, SIGTERM, SIGHUP]
    } else {
        vec![SIGINT, SIGTERM, SIGHUP, SIGQUIT]
    };
    let mut sigs = signal_hook::iterator::Signals::new(&list)
        .map_err(|e| Error::sys("install signal handlers", e))?;
    if tty {
        if let Some((rows, cols)) = crate::run::winsize(0) {
            let _ = tx.send(kind::WINSIZE, &proto::winsize_payload(rows, cols));
        }
    }
    std::thread::spawn(move || {
        for s in sigs.forever() {
            if s == SIGWINCH {
                if let Some((rows, cols)) = crate::run::winsize(0) {
                    let _ = tx.send(kind::WINSIZE, &proto::winsize_payload(rows, cols));
                }
            } else {
                let _ = tx.send(kind::SIGNAL, &s.to_le_bytes());
            }
        }
    });
    Ok(())
}

/// A session nonce: nothing an earlier session wrote can look like its
/// READY.
fn nonce() -> u64 {
    let mut b = [0u8; 8];
    if File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() << 30 ^ u64::from(d.subsec_nanos()))
            .unwrap_or(0);
        b = (u64::from(std::process::id()) ^ t).to_le_bytes();
    }
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod capped_tests {
    use super::*;

    #[test]
    fn a_probe_keeps_only_the_first_bytes_of_a_flood() {
        let mut c = Capped::default();
        for _ in 0..100 {
            assert_eq!(c.write(&[7u8; 4096]).unwrap(), 4096);
        }
        assert_eq!(c.0.len(), OUTPUT_MAX);
    }
}

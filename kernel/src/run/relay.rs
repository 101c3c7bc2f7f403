//! The stdio pumps between the host and UML's serial lines: output out,
//! flow-controlled stdin in, the kernel log and the status line read with
//! bounds.

#[allow(unused_imports)]
use super::*;

/// The last lines of the kernel log, for error messages.
#[derive(Default)]
pub(crate) struct LogTail {
    pub(crate) lines: VecDeque<String>,
    pub(crate) partial: Vec<u8>,
    pub(crate) panic: Option<String>,
}

impl LogTail {
    pub(crate) const KEEP: usize = 40;

    /// An unfinished line longer than this is cut (a guest may write to
    /// its console without ever ending a line).
    pub(crate) const MAX_PARTIAL: usize = 4096;

    pub(crate) fn push(&mut self, data: &[u8]) {
        self.partial.extend_from_slice(data);
        while let Some(pos) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=pos).collect();
            self.line(&line);
        }
        if self.partial.len() > Self::MAX_PARTIAL {
            let line = std::mem::take(&mut self.partial);
            self.line(&line);
        }
    }

    pub(crate) fn line(&mut self, line: &[u8]) {
        {
            let line = &line[..line.len().min(Self::MAX_PARTIAL)];
            let line = String::from_utf8_lossy(line).trim_end().to_string();
            if self.panic.is_none() {
                if let Some(i) = line.find("Kernel panic - not syncing:") {
                    self.panic = Some(line[i..].to_string());
                }
            }
            if line.is_empty() {
                return;
            }
            if self.lines.len() == Self::KEEP {
                self.lines.pop_front();
            }
            self.lines.push_back(line);
        }
    }

    pub(crate) fn tail(&self, n: usize) -> String {
        let skip = self.lines.len().saturating_sub(n);
        self.lines
            .iter()
            .skip(skip)
            .map(|l| format!("  | {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Copy `from` to the host fd `to` until EOF. When the host side breaks
/// (EPIPE), report it once and keep draining so the guest never blocks.
pub(crate) fn copy_out(mut from: File, to: RawFd, tx: Sender<Event>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut out = borrow_file(to);
        let mut buf = vec![0u8; 64 * 1024];
        let mut broken = false;
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            if !broken && out.write_all(&buf[..n]).is_err() {
                broken = true;
                let _ = tx.send(Event::OutputBroken);
            }
        }
    })
}

/// How much of stdin the guest's init has read (its `credit` records), so
/// that the copier keeps at most [`STDIN_WINDOW`] bytes in flight.
#[derive(Default)]
pub(crate) struct Credits {
    /// (bytes the guest has read, the status line has closed)
    pub(crate) state: Mutex<(u64, bool)>,
    pub(crate) cv: std::sync::Condvar,
}

impl Credits {
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

    /// Wait until fewer than [`STDIN_WINDOW`] of the `sent` bytes are
    /// unread; how many more may go. `None` once the guest is gone.
    pub(crate) fn room(&self, sent: u64) -> Option<u64> {
        let mut s = self.state.lock().ok()?;
        loop {
            if s.1 {
                return None;
            }
            let inflight = sent.saturating_sub(s.0);
            if inflight < STDIN_WINDOW {
                return Some(STDIN_WINDOW - inflight);
            }
            s = self.cv.wait(s).ok()?;
        }
    }
}

/// Copy the host's stdin into the guest's stdin line once the guest says
/// the line is ready (raw), at most [`STDIN_WINDOW`] bytes ahead of what the
/// guest has read, then announce the total. The pipe itself stays open: UML
/// would turn its EOF into a tty hangup that discards unread input; the
/// copier parks it in `keep`, which `run` drops once UML has exited.
pub(crate) fn copy_in(
    to: File,
    go: Receiver<()>,
    control: Sender<String>,
    keep: Arc<Mutex<Option<File>>>,
    credits: Arc<Credits>,
) {
    thread::spawn(move || {
        if go.recv().is_err() {
            return;
        }
        let mut to = to;
        let mut input = borrow_file(0);
        let mut buf = vec![0u8; 64 * 1024];
        let mut total: u64 = 0;
        loop {
            let n = match input.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            let mut chunk = &buf[..n];
            while !chunk.is_empty() {
                let Some(room) = credits.room(total) else {
                    return;
                };
                let k = chunk.len().min(usize::try_from(room).unwrap_or(usize::MAX));
                if to.write_all(&chunk[..k]).is_err() {
                    return;
                }
                total += k as u64;
                chunk = &chunk[k..];
            }
        }
        let _ = control.send(Control::StdinEof(total).encode());
        if let Ok(mut k) = keep.lock() {
            *k = Some(to);
        }
    });
}

/// Read the kernel log: to the console log file, to stderr with `-v`, and
/// into the tail kept for error messages.
pub(crate) fn read_log(
    mut from: File,
    mut file: Option<File>,
    verbose: bool,
    tail: Arc<Mutex<LogTail>>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = vec![0u8; 16 * 1024];
        let mut err = borrow_file(2);
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            if let Some(f) = file.as_mut() {
                let _ = f.write_all(&buf[..n]);
            }
            if verbose {
                let _ = err.write_all(&buf[..n]);
            }
            if let Ok(mut t) = tail.lock() {
                t.push(&buf[..n]);
            }
        }
    })
}

/// The longest status line a guest may send (the longest real one is an
/// init error message of a few hundred bytes).
pub const MAX_STATUS_LINE: usize = 16 * 1024;

/// Split `data` into lines for [`read_status`]: complete lines are handed
/// to `line`; an unfinished one is kept in `pending`, and `Err` reports a
/// line that grew past `max` (the guest's fault; it is dropped).
pub(crate) fn split_lines(
    pending: &mut Vec<u8>,
    data: &[u8],
    max: usize,
    mut line: impl FnMut(&[u8]),
) -> std::result::Result<(), ()> {
    let mut rest = data;
    while let Some(i) = memchr::memchr(b'\n', rest) {
        if pending.len() + i > max {
            pending.clear();
            return Err(());
        }
        pending.extend_from_slice(&rest[..i]);
        line(pending);
        pending.clear();
        rest = &rest[i + 1..];
    }
    if pending.len() + rest.len() > max {
        pending.clear();
        return Err(());
    }
    pending.extend_from_slice(rest);
    Ok(())
}

/// Read the status line: every record to the supervisor, at most
/// [`MAX_STATUS_LINE`] bytes each. A guest that sends more without a
/// newline is reported once ([`Event::Garbage`]) and the rest is drained
/// unread, so umlctl's memory does not grow with what the guest writes.
pub(crate) fn read_status(mut from: File, tx: Sender<Event>, credits: Arc<Credits>) {
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        let mut pending = Vec::new();
        let mut broken = false;
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            if broken {
                continue;
            }
            let mut records = Vec::new();
            let r = split_lines(
                &mut pending,
                &buf[..n],
                MAX_STATUS_LINE,
                |l| match Status::parse(&String::from_utf8_lossy(l)) {
                    Some(Status::Credit(c)) => credits.grant(c),
                    Some(s) => records.push(s),
                    None => {}
                },
            );
            for s in records {
                let _ = tx.send(Event::Status(s));
            }
            if r.is_err() {
                broken = true;
                let _ = tx.send(Event::Garbage(format!(
                    "the guest wrote more than {} KiB without a newline on umlctl's status line (/dev/ttyS{STATUS_LINE})",
                    MAX_STATUS_LINE / 1024
                )));
            }
        }
        credits.close();
        let _ = tx.send(Event::StatusEof);
    });
}

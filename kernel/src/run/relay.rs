//! The stdio pumps between the host and the guest: stdin in and stdout and
//! stderr out through the ring disk (see [`crate::protocol`]), the kernel
//! log and the status line read with bounds.

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

/// The host's end of the ring disk (see [`crate::protocol`]): a sparse
/// file in the run directory that UML serves to the guest as a disk.
pub(crate) fn create_ring(rundir: &Path) -> Result<(PathBuf, Arc<File>)> {
    let path = rundir.join("ring");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&path)
        .map_err(|e| Error::io("create the I/O ring disk", &path, e))?;
    f.set_len(ring::disk_len())
        .map_err(|e| Error::io("size the I/O ring disk", &path, e))?;
    Ok((path, Arc::new(f)))
}

/// Copy the host's stdin into the guest through the ring once the command
/// has started, a slot at a time, then announce the total.
pub(crate) fn copy_in(
    ring: Arc<File>,
    source: Option<File>,
    go: Receiver<()>,
    control: Sender<String>,
    credits: Arc<Window>,
) {
    thread::spawn(move || {
        if go.recv().is_err() {
            return;
        }
        let mut stdin = borrow_file(0);
        let mut other = source;
        let input: &mut File = match other.as_mut() {
            Some(f) => f,
            None => &mut stdin,
        };
        let mut buf = vec![0u8; crate::num::usize_of(ring::SLOT)];
        let mut total: u64 = 0;
        let mut seq: u64 = 0;
        let mut filler = crate::flow::Filler::default();
        loop {
            let n = filler.fill(input, &mut buf);
            if n == 0 {
                break;
            }
            if credits.room(seq).is_none()
                || ring
                    .write_all_at(&buf[..n], ring::offset(ring::STDIN, seq))
                    .is_err()
            {
                return;
            }
            // n ≤ SLOT (1 MiB).
            let len = u32::try_from(n).unwrap_or(u32::MAX);
            if control.send(Control::Data(len).encode()).is_err() {
                return;
            }
            seq += 1;
            total += n as u64;
        }
        let _ = control.send(Control::StdinEof(total).encode());
    });
}

/// One chunk of a guest → host stream, as the status line announced it.
pub(crate) enum Chunk {
    /// In the next ring slot, this long.
    Slot(u32),
    /// On the status line itself.
    Inline(Vec<u8>),
}

/// One guest → host stream (stdout or stderr): the status reader hands
/// over each chunk (a `data` record's length, or an `inline` record's
/// bytes); the copier reads a slot's chunk from the ring, writes it
/// to the host fd `to` and acknowledges it. When the host side breaks
/// (EPIPE: the reader went away), it tells the guest, which closes the
/// command's end (the writer gets SIGPIPE, as on the host), and keeps
/// acknowledging what is still in flight, so the guest never blocks.
pub(crate) fn copy_out(
    ring: Arc<File>,
    stream: u8,
    to: RawFd,
    control: Sender<String>,
) -> (SyncSender<Chunk>, thread::JoinHandle<()>) {
    let (data_tx, data_rx) = mpsc::sync_channel::<Chunk>(crate::num::usize_of(ring::SLOTS));
    let h = thread::spawn(move || {
        let mut out = borrow_file(to);
        let mut buf = vec![0u8; crate::num::usize_of(ring::SLOT)];
        let mut broken = false;
        for (seq, c) in (0u64..).zip(data_rx) {
            let chunk: &[u8] = match &c {
                Chunk::Inline(d) => d,
                Chunk::Slot(len) => {
                    let area = &mut buf[..crate::num::usize_of(u64::from(*len))];
                    if ring.read_exact_at(area, ring::offset(stream, seq)).is_err() {
                        break;
                    }
                    area
                }
            };
            if !broken && out.write_all(chunk).is_err() {
                broken = true;
                let _ = control.send(Control::Closed(stream).encode());
            }
            let count = seq + 1;
            let _ = control.send(Control::Ack { stream, count }.encode());
        }
    });
    (data_tx, h)
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
/// `data` records go to the stream's copier in `outputs` (indexed by
/// stream); a record for a stream without one is a protocol error.
pub(crate) fn read_status(
    mut from: File,
    tx: Sender<Event>,
    credits: Arc<Window>,
    outputs: [Option<SyncSender<Chunk>>; 3],
) {
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
            let mut stray = None;
            let r = split_lines(
                &mut pending,
                &buf[..n],
                MAX_STATUS_LINE,
                |l| match Status::parse(&String::from_utf8_lossy(l)) {
                    Some(Status::Ack(c)) => credits.grant(c),
                    Some(Status::Data { stream, len }) => {
                        match outputs.get(usize::from(stream)).and_then(Option::as_ref) {
                            Some(out) => {
                                let _ = out.send(Chunk::Slot(len));
                            }
                            None => stray = Some(stream),
                        }
                    }
                    Some(Status::Inline { stream, data }) => {
                        match outputs.get(usize::from(stream)).and_then(Option::as_ref) {
                            Some(out) => {
                                let _ = out.send(Chunk::Inline(data));
                            }
                            None => stray = Some(stream),
                        }
                    }
                    Some(s) => records.push(s),
                    None => {}
                },
            );
            if let Some(stream) = stray {
                broken = true;
                let _ = tx.send(Event::Garbage(format!(
                    "the guest sent data for stream {stream}, which this run does not relay"
                )));
            }
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
        drop(outputs);
        let _ = tx.send(Event::StatusEof);
    });
}

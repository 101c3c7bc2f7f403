//! `run`: boot a guest, run one command in it, and pass its stdio and exit
//! status through.
//!
//! The host side of the flow in DESIGN.md: locate and inspect the kernel,
//! decide on the xstate shim, lay out a run directory, wire the command's
//! stdio and the control/status lines to UML serial lines, start UML, and
//! supervise it (signals, timeout, output, kernel log) until it exits; then
//! turn whatever happened into one [`RunOutcome`] and remove everything the
//! run created.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::sys::signal::{kill, Signal};
use nix::unistd::{pipe2, Pid};

use crate::cmdline::{BootPlan, BootRoot, Chan, Disk};
use crate::error::{errno, Error, Result};
use crate::initroot;
use crate::jail::{Bind, JailRoot, JailSpec, Launch, Spawned};
use crate::locate::{locate, Located};
use crate::paths;
use crate::protocol::STDIN_WINDOW;
use crate::protocol::{Control, InitSpec, RootSpec, Status, TtySpec};
use crate::protocol::{CONTROL_LINE, STATUS_LINE, STDERR_LINE, STDIN_LINE, STDOUT_LINE};
use crate::xstate::{self, HostXstate};

/// Paths the guest sees as tmpfs when its root is the host filesystem.
pub const HOST_ROOT_TMPFS: &[&str] = &["/tmp", "/var/tmp", "/run"];

/// Default guest memory.
pub const DEFAULT_MEM: u64 = 256 << 20;

/// How long a forwarded signal may take to end the command before the
/// guest is stopped from the outside.
const SIGNAL_GRACE: Duration = Duration::from_secs(10);
/// How long UML may take to exit after a SIGTERM before it is killed.
const KILL_GRACE: Duration = Duration::from_secs(2);
/// How long UML may take to power off after the command ended.
const POWEROFF_GRACE: Duration = Duration::from_secs(10);

/// Whether to use the xstate shim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ShimMode {
    /// Use it when the host's XSAVE area is larger than the kernel handles.
    #[default]
    Auto,
    /// Never use it.
    Off,
    /// Always preload it (for testing the shim on hosts that do not need it).
    Always,
}

/// Whether the command gets an interactive terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TtyMode {
    /// When stdin and stdout are both terminals.
    #[default]
    Auto,
    Always,
    Never,
}

/// Everything that describes one `run`.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    /// `--kernel`; `None` searches the usual places.
    pub kernel: Option<PathBuf>,
    /// `--image`: ext4 root image, booted through a COW overlay.
    pub image: Option<PathBuf>,
    /// `--overlay`: a persistent overlay for the image (created if missing);
    /// `None` makes a throwaway one in the run directory.
    pub overlay: Option<PathBuf>,
    pub mem_bytes: u64,
    /// The command and its arguments.
    pub command: Vec<OsString>,
    /// `--env`: `(KEY, Some(VALUE))`, or `(KEY, None)` to pass the host's value.
    pub env: Vec<(OsString, Option<OsString>)>,
    pub workdir: Option<PathBuf>,
    pub timeout: Option<Duration>,
    /// Where kernel messages go (else they are kept only for error reports).
    pub console_log: Option<PathBuf>,
    /// Also copy kernel messages to stderr.
    pub verbose: bool,
    pub shim: ShimMode,
    pub tty: TtyMode,
    /// `--net`: a tap on each of these bridges, from netd.
    pub nets: Vec<String>,
    /// netd's socket (default: `$UMLCTL_NETD_SOCKET`, else /run/umlctl/netd.sock).
    pub netd_socket: Option<PathBuf>,
    /// How UML is confined.
    pub jail: JailOpts,
}

/// Whether and how UML runs jailed ([`crate::jail`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JailOpts {
    /// `false` (`--no-jail`): UML runs as umlctl's own process, seeing what
    /// umlctl sees.
    pub enabled: bool,
    /// `--jail-uid`: when umlctl is root, the uid UML runs as.
    pub uid: Option<u32>,
}

impl Default for JailOpts {
    fn default() -> Self {
        JailOpts {
            enabled: true,
            uid: None,
        }
    }
}

impl GuestSpec {
    /// A spec for `command` with defaults for everything else.
    pub fn new(command: Vec<OsString>) -> Self {
        GuestSpec {
            kernel: None,
            image: None,
            overlay: None,
            mem_bytes: DEFAULT_MEM,
            command,
            env: Vec::new(),
            workdir: None,
            timeout: None,
            console_log: None,
            verbose: false,
            shim: ShimMode::Auto,
            tty: TtyMode::Auto,
            nets: Vec::new(),
            netd_socket: None,
            jail: JailOpts::default(),
        }
    }
}

/// Guest interfaces from netd: the connection (which keeps the taps alive),
/// the command-line entries, the guest-side configuration, and the tap
/// descriptors UML inherits (fd mode), in order from fd [`FIRST_TAP_FD`].
pub struct Network {
    pub client: Option<umlctl_netd::client::Client>,
    pub nics: Vec<crate::cmdline::Nic>,
    pub specs: Vec<crate::protocol::NicSpec>,
    pub fds: Vec<OwnedFd>,
}

/// Where UML finds the first fd-mode tap descriptor.
pub const FIRST_TAP_FD: i32 = 8;

/// Ask netd for a tap on each bridge. An owned tap (UML opens it, with
/// offloads) when this process can open /dev/net/tun, else netd's
/// descriptor (the `fd` transport).
pub fn attach_network(
    bridges: &[String],
    socket: Option<&Path>,
    tag: Option<&str>,
) -> Result<Network> {
    use crate::cmdline::{Nic, NicTransport};
    use umlctl_netd::protocol::TapMode;
    let mut net = Network {
        client: None,
        nics: vec![],
        specs: vec![],
        fds: vec![],
    };
    if bridges.is_empty() {
        return Ok(net);
    }
    if bridges.len() > 16 {
        return Err(Error::Usage(format!(
            "{} --net given; at most 16",
            bridges.len()
        )));
    }
    let path = umlctl_netd::client::socket_path(socket);
    let mut client = umlctl_netd::client::Client::connect(&path)?;
    let mode = if umlctl_netd::client::can_open_tun() {
        TapMode::Owned
    } else {
        TapMode::Fd
    };
    for (i, bridge) in bridges.iter().enumerate() {
        let tag = tag.map(|t| format!("{t}/{i}"));
        let (lease, fd) = client.create_tap(bridge, mode, tag.as_deref())?;
        let transport = match fd {
            Some(fd) => {
                let n = FIRST_TAP_FD + net.fds.len() as i32;
                net.fds.push(fd);
                NicTransport::Fd { fd: n }
            }
            None => {
                if !Path::new("/sys/class/net").join(&lease.ifname).exists() {
                    return Err(Error::Usage(format!(
                        "netd's tap {} is not in this network namespace: run umlctl in the network namespace netd runs in",
                        lease.ifname
                    )));
                }
                NicTransport::Tap {
                    ifname: lease.ifname.clone(),
                }
            }
        };
        net.nics.push(Nic {
            transport,
            mac: lease.mac.clone(),
        });
        net.specs.push(crate::protocol::NicSpec {
            device: format!("vec{i}"),
            address: lease.address,
            prefix: lease.prefix,
            gateway: lease.gateway,
            mtu: lease.mtu,
            dns: lease.dns.clone(),
        });
    }
    net.client = Some(client);
    Ok(net)
}

/// Why the run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The command exited; the exit code is its status.
    Exited,
    /// The command was killed by a signal (exit code 128+N).
    Signaled,
    /// The command was not found (127).
    NotFound,
    /// The command could not be executed (126).
    NotExecutable,
    /// `--timeout` expired; the guest was stopped (124).
    Timeout,
    /// The guest kernel panicked (125).
    Panic,
    /// The guest did not get to run the command (125).
    BootFailed,
    /// umlctl was interrupted and the guest had to be stopped (128+N).
    Interrupted,
    /// The guest broke umlctl's protocol (e.g. an endless status line); it
    /// was stopped (125).
    Protocol,
    /// The guest shut itself down (poweroff, halt, reboot) while the
    /// command ran (125).
    Shutdown,
}

/// Wall-clock milestones of a run, in milliseconds.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timings {
    /// From starting UML to the command starting.
    pub boot_ms: Option<f64>,
    /// From the command starting to its end.
    pub command_ms: Option<f64>,
    /// From starting UML to UML having exited.
    pub total_ms: f64,
}

/// The result of a run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunOutcome {
    /// What umlctl exits with.
    pub exit_code: i32,
    pub reason: Reason,
    /// The signal, for `signaled` and `interrupted`.
    pub signal: Option<i32>,
    /// A human explanation for anything but a normal exit.
    pub message: Option<String>,
    pub kernel: PathBuf,
    pub kernel_version: String,
    pub xstate_shim: bool,
    pub timings: Timings,
}

enum Event {
    Status(Status),
    /// The status line reached its end (every writer, UML included, is gone).
    StatusEof,
    UmlExited(ExitStatus),
    Signal(i32),
    OutputBroken,
    /// The guest broke umlctl's protocol (what it did).
    Garbage(String),
}

fn is_tty(fd: RawFd) -> bool {
    // SAFETY: isatty on any integer is safe.
    unsafe { libc::isatty(fd) == 1 }
}

fn winsize(fd: RawFd) -> Option<(u16, u16)> {
    // SAFETY: TIOCGWINSZ writes a winsize into `ws`.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        (libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) == 0 && ws.ws_row > 0)
            .then_some((ws.ws_row, ws.ws_col))
    }
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    let ok = File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok();
    if !ok {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let seed = t ^ ((std::process::id() as u128) << 64);
        for (i, x) in b.iter_mut().enumerate() {
            *x = (seed >> ((i % 16) * 8)) as u8;
        }
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn cloexec_pipe() -> Result<(OwnedFd, OwnedFd)> {
    pipe2(OFlag::O_CLOEXEC).map_err(|e| Error::sys("pipe", errno(e)))
}

/// Borrow a raw host fd as a `File` without taking ownership.
fn borrow_file(fd: RawFd) -> ManuallyDrop<File> {
    // SAFETY: the File is never dropped (ManuallyDrop), so the descriptor
    // stays owned by whoever owns it.
    ManuallyDrop::new(unsafe { File::from_raw_fd(fd) })
}

/// The last lines of the kernel log, for error messages.
#[derive(Default)]
struct LogTail {
    lines: VecDeque<String>,
    partial: Vec<u8>,
    panic: Option<String>,
}

impl LogTail {
    const KEEP: usize = 40;

    /// An unfinished line longer than this is cut (a guest may write to
    /// its console without ever ending a line).
    const MAX_PARTIAL: usize = 4096;

    fn push(&mut self, data: &[u8]) {
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

    fn line(&mut self, line: &[u8]) {
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

    fn tail(&self, n: usize) -> String {
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
fn copy_out(mut from: File, to: RawFd, tx: Sender<Event>) -> thread::JoinHandle<()> {
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
struct Credits {
    /// (bytes the guest has read, the status line has closed)
    state: Mutex<(u64, bool)>,
    cv: std::sync::Condvar,
}

impl Credits {
    fn grant(&self, consumed: u64) {
        if let Ok(mut s) = self.state.lock() {
            s.0 = s.0.max(consumed);
        }
        self.cv.notify_all();
    }

    fn close(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.1 = true;
        }
        self.cv.notify_all();
    }

    /// Wait until fewer than [`STDIN_WINDOW`] of the `sent` bytes are
    /// unread; how many more may go. `None` once the guest is gone.
    fn room(&self, sent: u64) -> Option<u64> {
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
fn copy_in(
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
                let k = chunk.len().min(room as usize);
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
fn read_log(
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
fn split_lines(
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
fn read_status(mut from: File, tx: Sender<Event>, credits: Arc<Credits>) {
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

/// Kill every process that is still our descendant (UML helpers orphaned
/// by UML's exit are re-parented to us: we are a child subreaper).
fn kill_descendants() {
    fn children_of(pid: u32) -> Vec<u32> {
        let mut out = Vec::new();
        if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
            for t in tasks.flatten() {
                if let Ok(s) = fs::read_to_string(t.path().join("children")) {
                    out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
                }
            }
        }
        out
    }
    for _ in 0..5 {
        let mut todo = children_of(std::process::id());
        if todo.is_empty() {
            return;
        }
        let mut all = Vec::new();
        while let Some(p) = todo.pop() {
            todo.extend(children_of(p));
            all.push(p);
        }
        for p in &all {
            let _ = kill(Pid::from_raw(*p as i32), Signal::SIGKILL);
        }
        for p in &all {
            let _ = nix::sys::wait::waitpid(Pid::from_raw(*p as i32), None);
        }
    }
}

/// Where the guest's root comes from, resolved on the host.
enum Root {
    Host {
        init: PathBuf,
    },
    Image {
        image: PathBuf,
        initroot: initroot::InitRoot,
    },
}

/// Validate `--image` and return its absolute path.
fn check_image(p: &Path) -> Result<PathBuf> {
    let md = fs::metadata(p).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => Error::Usage(format!("image {} does not exist", p.display())),
        _ => Error::io("stat image", p, e),
    })?;
    use std::os::unix::fs::FileTypeExt;
    if !(md.is_file() || md.file_type().is_block_device()) {
        return Err(Error::Usage(format!(
            "image {} is not a regular file or block device",
            p.display()
        )));
    }
    if md.len() < 4096 && md.is_file() {
        return Err(Error::Usage(format!(
            "image {} is too small ({} bytes) to be a filesystem",
            p.display(),
            md.len()
        )));
    }
    File::open(p).map_err(|e| Error::io("open image for reading", p, e))?;
    fs::canonicalize(p).map_err(|e| Error::io("resolve", p, e))
}

/// Compose the command's environment.
fn guest_env(spec: &GuestSpec, tty: bool) -> Result<Vec<Vec<u8>>> {
    let mut env: Vec<(Vec<u8>, Vec<u8>)> = vec![
        (
            b"PATH".to_vec(),
            b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_vec(),
        ),
        (b"HOME".to_vec(), b"/root".to_vec()),
    ];
    if tty {
        let term = std::env::var_os("TERM").unwrap_or_else(|| "xterm".into());
        env.push((b"TERM".to_vec(), term.as_bytes().to_vec()));
    }
    for (k, v) in &spec.env {
        let kb = k.as_bytes();
        if kb.is_empty() || kb.contains(&b'=') || kb.contains(&0) {
            return Err(Error::Usage(format!("invalid --env name {:?}", k)));
        }
        let v = match v {
            Some(v) => v.clone(),
            None => match std::env::var_os(k) {
                Some(v) => v,
                None => continue,
            },
        };
        env.retain(|(ek, _)| ek != kb);
        env.push((kb.to_vec(), v.as_bytes().to_vec()));
    }
    Ok(env
        .into_iter()
        .map(|(mut k, v)| {
            k.push(b'=');
            k.extend_from_slice(&v);
            k
        })
        .collect())
}

/// A kernel ready to start: found, checked for the features a caller
/// needs, and with the xstate shim decided.
pub struct PreparedKernel {
    pub located: Located,
    pub host_xstate: HostXstate,
    /// Whether this host needs the shim for this kernel.
    pub needs_shim: bool,
    /// The shim to preload, if it will be used.
    pub shim: Option<PathBuf>,
}

impl PreparedKernel {
    /// UML's environment: in a jail the whole of it (a private `/tmp` for
    /// its memory file, the shim if used); without one, what is added to
    /// umlctl's own (the shim, or nothing: an LD_PRELOAD meant for
    /// something else is dropped).
    ///
    /// Unjailed, UML's memory file goes where an executable mapping works
    /// (see [`crate::preflight::memory_dir_unjailed`]); a change from what
    /// UML would pick is said under `verbose` (always, if it passes over
    /// the user's own `$TMPDIR`).
    pub fn uml_env(&self, jailed: bool, verbose: bool) -> Result<Vec<(String, String)>> {
        let mut env = Vec::new();
        if jailed {
            env.push(("TMPDIR".into(), crate::jail::MEMORY_DIR.into()));
            env.push(("PATH".into(), "/usr/bin:/bin".into()));
        } else {
            let m = crate::preflight::memory_dir_unjailed()?;
            if let Some(w) = &m.warning {
                eprintln!("umlctl: warning: {w}");
            }
            if let (Some(n), true) = (&m.note, verbose) {
                eprintln!("umlctl: {n}");
            }
            env.push(("TMPDIR".into(), m.dir.to_string_lossy().into_owned()));
        }
        if let Some(s) = &self.shim {
            env.push(("LD_PRELOAD".into(), s.to_string_lossy().into_owned()));
        }
        Ok(env)
    }

    /// A jail for this kernel: its binary, libraries and shim, read-only;
    /// the caller adds the guest's own files. `None` with `--no-jail`.
    pub fn jail(&self, root: JailRoot, mem_bytes: u64, opts: JailOpts) -> Option<JailSpec> {
        if !opts.enabled {
            return None;
        }
        let mut j = JailSpec::new(root, mem_bytes);
        j.uid = opts.uid;
        let info = &self.located.info;
        j.bind(Bind::ro(&info.path));
        for lib in &info.libs {
            j.bind(Bind::ro(lib));
        }
        if let Some(s) = &self.shim {
            j.bind(Bind::ro(s));
        }
        Some(j)
    }
}

/// Say loudly, once per command, what `--no-jail` gives up.
pub fn warn_unjailed() {
    eprintln!(
        "umlctl: warning: --no-jail: UML runs with your identity and sees every host file you can; \
a guest (even one booted from an image) that breaks out of its kernel acts as you on this host"
    );
}

/// Start UML: in `jail`, or (`None`) as a plain child process.
pub fn launch(jail: Option<&JailSpec>, l: &Launch, want_status: bool) -> Result<Spawned> {
    match jail {
        Some(j) => crate::jail::spawn(j, l, want_status),
        None => crate::jail::spawn_unjailed(l),
    }
}

/// Add the guest's disks to its jail: each file read-write (read-only if
/// the disk is), and the backing file its COW header names, read-only,
/// under both the resolved path and the path the header names. Backing
/// files the user did not name in `explicit` (an image given with
/// `--image`) must be readable by the jail's uid on their own: a COW file
/// cannot make a root umlctl open an arbitrary host file for the guest.
pub fn bind_disks(jail: &mut JailSpec, disks: &[Disk], explicit: &[PathBuf]) -> Result<()> {
    for d in disks {
        let file = fs::canonicalize(&d.file).map_err(|e| Error::io("resolve", &d.file, e))?;
        jail.bind(Bind {
            writable: !d.read_only,
            ..Bind::ro(&file)
        });
        // The path as given, when it is not itself a symlink (one in a bound
        // directory, as overlay.rs makes, resolves to `file` in the jail).
        let literal = std::path::absolute(&d.file).map_err(|e| Error::io("resolve", &d.file, e))?;
        let is_link = fs::symlink_metadata(&d.file).is_ok_and(|m| m.file_type().is_symlink());
        if literal != file && !is_link {
            jail.bind(Bind {
                src: file.clone(),
                dst: literal,
                writable: !d.read_only,
                explicit: true,
            });
        }
        if let Ok(c) = umlctl_imgtools::cow::Cow::open(&file) {
            let named = c.header.backing.clone();
            let real = c.backing_path();
            if let Ok(src) = fs::canonicalize(&real) {
                let explicit = explicit
                    .iter()
                    .any(|e| fs::canonicalize(e).is_ok_and(|e| e == src));
                jail.bind(Bind {
                    explicit,
                    ..Bind::ro(&src)
                });
                if named.is_absolute() && named != src {
                    jail.bind(Bind {
                        src,
                        dst: named,
                        writable: false,
                        explicit,
                    });
                }
            }
        }
    }
    Ok(())
}

/// Locate the kernel, require `features`, and decide on the xstate shim.
pub fn prepare_kernel(
    kernel: Option<&Path>,
    features: &[&str],
    mode: ShimMode,
) -> Result<PreparedKernel> {
    let located: Located = locate(kernel)?;
    let info = &located.info;
    info.require(features)?;
    let host_xstate = xstate::host_xstate()?;
    let needs_shim = info.fp.needs_shim(host_xstate);
    let use_shim = match mode {
        ShimMode::Auto => needs_shim,
        ShimMode::Off => false,
        ShimMode::Always => true,
    };
    if needs_shim && use_shim && info.linkage == crate::inspect::Linkage::Static {
        return Err(Error::KernelUnusable {
            path: info.path.clone(),
            reason: format!(
                "this {} kernel is statically linked and has a fixed {}-byte FP state buffer, but this host's XSAVE area is {} bytes, so it dies at init (\"ptrace set fp regs failed, errno = 14\") and the xstate shim cannot be preloaded into a static binary\nfix: use a kernel ≥ 6.13, or a dynamically linked build of this one",
                info.version,
                xstate::LEGACY_UML_XSTATE,
                host_xstate.bytes()
            ),
        });
    }
    let shim = if use_shim {
        Some(xstate::shim_path()?)
    } else {
        None
    };
    Ok(PreparedKernel {
        located,
        host_xstate,
        needs_shim,
        shim,
    })
}

/// Boot a guest, run `spec.command` in it, and report how it ended.
///
/// The command's stdin, stdout and stderr are this process's own. Errors
/// before the guest starts (no kernel, bad options, host problems) are
/// returned as `Err`; everything after is a [`RunOutcome`].
pub fn run(spec: &GuestSpec) -> Result<RunOutcome> {
    if spec.command.is_empty() {
        return Err(Error::Usage(
            "no command given: umlctl run [OPTIONS] -- CMD [ARGS...]".into(),
        ));
    }
    if spec.command.iter().any(|a| a.as_bytes().contains(&0)) {
        return Err(Error::Usage(
            "command arguments cannot contain NUL bytes".into(),
        ));
    }
    if spec.overlay.is_some() && spec.image.is_none() {
        return Err(Error::Usage(
            "--overlay needs --image (it is an overlay over that image)".into(),
        ));
    }
    let mut need = vec!["serial-lines", "devtmpfs", "exitcode", "tmpfs"];
    if spec.image.is_some() {
        need.extend(["ubd", "ext4"]);
    } else {
        need.push("hostfs");
    }
    if !spec.nets.is_empty() {
        need.push("vector-net");
    }
    let prep = prepare_kernel(spec.kernel.as_deref(), &need, spec.shim)?;
    // Held until the guest is gone: the taps live as long as this connection.
    let network = attach_network(&spec.nets, spec.netd_socket.as_deref(), None)?;
    let info = &prep.located.info;
    let use_shim = prep.shim.is_some();

    // Terminal or pipes.
    let interactive = match spec.tty {
        TtyMode::Auto => is_tty(0) && is_tty(1),
        TtyMode::Always => {
            if !is_tty(0) {
                return Err(Error::Usage(
                    "--tty always needs stdin to be a terminal".into(),
                ));
            }
            true
        }
        TtyMode::Never => false,
    };
    let stderr_on_tty = interactive && is_tty(2) && same_file(0, 2);

    // Root and working directory.
    let root = match &spec.image {
        Some(img) => Root::Image {
            image: check_image(img)?,
            initroot: initroot::prepare(&initroot::current_exe()?)?,
        },
        None => Root::Host {
            init: initroot::current_exe()?,
        },
    };
    let workdir: PathBuf = match (&spec.workdir, &root) {
        (Some(w), _) if !w.is_absolute() => {
            return Err(Error::Usage(format!(
                "--workdir {} must be an absolute path",
                w.display()
            )))
        }
        (Some(w), Root::Host { .. }) => {
            if !w.is_dir() {
                return Err(Error::Usage(format!(
                    "--workdir {} is not a directory on the host (without --image the guest sees the host's files)",
                    w.display()
                )));
            }
            w.clone()
        }
        (Some(w), Root::Image { .. }) => w.clone(),
        (None, Root::Host { .. }) => {
            std::env::current_dir().map_err(|e| Error::sys("find the current directory", e))?
        }
        (None, Root::Image { .. }) => PathBuf::from("/"),
    };

    let env = guest_env(spec, interactive)?;
    let tty_spec = interactive.then(|| {
        let (rows, cols) = winsize(1).or_else(|| winsize(0)).unwrap_or((24, 80));
        TtySpec {
            rows,
            cols,
            stderr_on_tty,
        }
    });
    let root_spec = match &root {
        Root::Host { .. } => {
            let binds = HOST_ROOT_TMPFS
                .iter()
                .filter(|t| workdir.starts_with(t) && workdir != Path::new(t))
                .map(|_| workdir.to_string_lossy().into_owned())
                .collect();
            RootSpec::Host {
                tmpfs: HOST_ROOT_TMPFS.iter().map(|s| s.to_string()).collect(),
                binds,
            }
        }
        Root::Image { .. } => RootSpec::Image {
            device: "/dev/ubda".into(),
        },
    };
    let init_spec = InitSpec {
        argv: spec.command.iter().map(|a| a.as_bytes().to_vec()).collect(),
        env,
        workdir: workdir.as_os_str().as_bytes().to_vec(),
        root: root_spec,
        hostname: "uml".into(),
        tty: tty_spec,
        nics: network.specs.clone(),
    };

    // The run directory: UML's instance directory and the overlay.
    let umid = format!("umlctl-{}", random_hex(6));
    let runtime = paths::runtime_dir()?;
    sweep_stale_rundirs(&runtime);
    let rundir = runtime.join(&umid);
    paths::ensure_private_dir(&rundir)?;
    let _cleanup = RunDirGuard(rundir.clone());
    fs::write(
        rundir.join(OWNER_FILE),
        process_identity(std::process::id()).unwrap_or_default(),
    )
    .map_err(|e| Error::io("write", rundir.join(OWNER_FILE), e))?;

    let console_log = match &spec.console_log {
        Some(p) => Some(File::create(p).map_err(|e| Error::io("create console log", p, e))?),
        None => None,
    };

    let (boot_root, init_path, disks) = match &root {
        Root::Host { init } => (BootRoot::Hostfs, init.clone(), vec![]),
        Root::Image { image, initroot } => (
            BootRoot::InitDisk { index: 1 },
            initroot.init.clone(),
            vec![
                Disk {
                    file: crate::overlay::prepare(image, spec.overlay.as_deref(), &rundir)?,
                    backing: None,
                    read_only: false,
                },
                Disk {
                    file: initroot.disk.clone(),
                    backing: None,
                    read_only: true,
                },
            ],
        ),
    };

    // The jail: UML sees its kernel files, its disks and its run directory
    // (image), or the host's root read-only (host root).
    let jail = match &root {
        Root::Host { init } => prep
            .jail(JailRoot::HostReadOnly, spec.mem_bytes, spec.jail)
            .map(|mut j| {
                // Under the jail's private /tmp, /run…: the init itself, and
                // the command's directory (the guest's hostfs reaches it).
                j.bind(Bind::ro(init));
                if crate::jail::hidden_in_host_root(&workdir) {
                    if let Ok(w) = fs::canonicalize(&workdir) {
                        j.bind(Bind::ro(w));
                    }
                }
                j
            }),
        Root::Image { .. } => prep.jail(JailRoot::Empty, spec.mem_bytes, spec.jail),
    };
    let mut jail = jail;
    if let Some(j) = jail.as_mut() {
        bind_disks(j, &disks, spec.image.as_slice())?;
        crate::jail::hand_over(j, &rundir)?;
        for d in &disks {
            if d.file.starts_with(&rundir) && !d.read_only {
                crate::jail::hand_over(j, &d.file)?;
            }
        }
        j.bind(Bind::rw(&rundir));
        if network
            .nics
            .iter()
            .any(|n| matches!(n.transport, crate::cmdline::NicTransport::Tap { .. }))
        {
            j.tun = true;
            j.share_net = true;
            crate::jail::hand_over_taps(j, &network.nics)?;
        }
    } else {
        warn_unjailed();
    }

    // The UML process's descriptors: 0 console in, 1+2 kernel log, 3 stdin
    // line, 4 stdout line, 5 stderr line, 6 control line, 7 status line.
    let (con_in_r, con_in_w) = cloexec_pipe()?;
    let (log_r, log_w) = cloexec_pipe()?;
    let (ctl_r, ctl_w) = cloexec_pipe()?;
    let (st_r, st_w) = cloexec_pipe()?;
    let (out_r, out_w) = cloexec_pipe()?;
    let (err_r, err_w) = cloexec_pipe()?;
    let mut stdin_w = None;
    let stdin_for_uml: OwnedFd = if interactive {
        // SAFETY: F_DUPFD_CLOEXEC of our stdin; the new fd is owned here.
        let fd = unsafe { libc::fcntl(0, libc::F_DUPFD_CLOEXEC, 3) };
        if fd < 0 {
            return Err(Error::sys("dup stdin", io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor we own.
        unsafe { OwnedFd::from_raw_fd(fd) }
    } else {
        let (r, w) = cloexec_pipe()?;
        stdin_w = Some(w);
        r
    };
    let lines = if interactive {
        vec![
            (STDIN_LINE, Chan::Fd(3), Chan::Fd(3)),
            (STDERR_LINE, Chan::Null, Chan::Fd(5)),
            (CONTROL_LINE, Chan::Fd(6), Chan::Null),
            (STATUS_LINE, Chan::Null, Chan::Fd(7)),
        ]
    } else {
        vec![
            (STDIN_LINE, Chan::Fd(3), Chan::Null),
            (STDOUT_LINE, Chan::Null, Chan::Fd(4)),
            (STDERR_LINE, Chan::Null, Chan::Fd(5)),
            (CONTROL_LINE, Chan::Fd(6), Chan::Null),
            (STATUS_LINE, Chan::Null, Chan::Fd(7)),
        ]
    };
    let plan = BootPlan {
        mem_bytes: spec.mem_bytes,
        umid: umid.clone(),
        uml_dir: rundir.clone(),
        root: boot_root,
        init: Some(init_path),
        notify: None,
        disks,
        console: (Chan::Fd(0), Chan::Fd(1)),
        lines,
        init_env: if std::env::var_os("UMLCTL_TRACE").is_some() {
            vec![("UMLCTL_TRACE".into(), "1".into())]
        } else {
            vec![]
        },
        nics: network.nics.clone(),
    };
    let args = plan.to_args()?;

    let term_guard = if interactive {
        crate::terminal::TermGuard::save(0)
    } else {
        None
    };

    // We adopt UML's helpers if UML dies, so that we can kill them.
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) has no memory effects.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };

    // 0 console in, 1+2 kernel log, 3..=7 the lines, then the fd-mode taps
    // from FIRST_TAP_FD (= 8).
    let mut fds: Vec<(RawFd, i32)> = vec![
        (con_in_r.as_raw_fd(), 0),
        (log_w.as_raw_fd(), 1),
        (log_w.as_raw_fd(), 2),
        (stdin_for_uml.as_raw_fd(), 3),
        (out_w.as_raw_fd(), 4),
        (err_w.as_raw_fd(), 5),
        (ctl_r.as_raw_fd(), 6),
        (st_w.as_raw_fd(), 7),
    ];
    for (i, f) in network.fds.iter().enumerate() {
        fds.push((f.as_raw_fd(), FIRST_TAP_FD + i as i32));
    }
    let uml_launch = Launch {
        program: info.path.clone(),
        args,
        env: prep.uml_env(jail.is_some(), spec.verbose)?,
        cwd: rundir.clone(),
        fds,
        new_session: false,
        die_with_parent: true,
    };

    let (tx, rx) = mpsc::channel::<Event>();
    let signals = install_signals(interactive, tx.clone())?;

    let reaper = crate::reaper::Reaper::spawn(&initroot::current_exe()?, &rundir)?;
    let t0 = Instant::now();
    let child = launch(jail.as_ref(), &uml_launch, true)?;
    reaper.watch(child.kill_target().as_raw() as u32);
    // Close our copies of the UML ends so that EOFs arrive when UML exits.
    drop((con_in_r, log_w, stdin_for_uml, out_w, err_w, ctl_r, st_w));
    let uml_pid = child.pid;
    let jail_pid = child.kill_target();

    let tail = Arc::new(Mutex::new(LogTail::default()));
    let log_thread = read_log(File::from(log_r), console_log, spec.verbose, tail.clone());
    let mut outputs = Vec::new();
    if !interactive {
        outputs.push(copy_out(File::from(out_r), 1, tx.clone()));
    } else {
        drop(out_r);
    }
    outputs.push(copy_out(File::from(err_r), 2, tx.clone()));
    let credits = Arc::new(Credits::default());
    read_status(File::from(st_r), tx.clone(), credits.clone());
    // One writer thread owns the control line, so that a guest that stops
    // reading it can never block the supervision loop.
    // Nothing is written before the guest has opened the line (`hello`).
    let (control_go, control_go_rx) = mpsc::channel::<()>();
    let control = {
        let (tx, rx) = mpsc::channel::<String>();
        let mut f = File::from(ctl_w);
        thread::spawn(move || {
            if control_go_rx.recv().is_err() {
                return;
            }
            for msg in rx {
                if f.write_all(msg.as_bytes()).is_err() {
                    break;
                }
            }
        });
        tx
    };
    let _ = control.send(init_spec.encode());
    let mut stdin_go = None;
    let stdin_keep: Arc<Mutex<Option<File>>> = Arc::default();
    if let Some(w) = stdin_w {
        let (go_tx, go_rx) = mpsc::channel();
        copy_in(
            File::from(w),
            go_rx,
            control.clone(),
            stdin_keep.clone(),
            credits.clone(),
        );
        stdin_go = Some(go_tx);
    }
    {
        let tx = tx.clone();
        thread::spawn(move || {
            if let Ok(st) = child.wait() {
                let _ = tx.send(Event::UmlExited(st));
            }
        });
    }
    drop(tx);

    let sup = supervise(
        &rx,
        &control,
        control_go,
        stdin_go,
        (uml_pid, jail_pid),
        spec.timeout,
        t0,
    );
    signals.close();
    drop(control);
    drop(con_in_w);

    kill_descendants();
    reaper.dismiss();
    if let Ok(mut k) = stdin_keep.lock() {
        k.take();
    }
    // UML and its helpers are gone, so the pipes reach EOF; join the output
    // copies so that every byte is out before we return.
    for h in outputs {
        let _ = h.join();
    }
    let _ = log_thread.join();
    drop(term_guard);

    let tail = tail
        .lock()
        .map(|t| (t.panic.clone(), t.tail(15)))
        .unwrap_or_default();
    Ok(outcome(
        sup,
        &prep.located,
        use_shim,
        prep.needs_shim && !use_shim,
        prep.host_xstate,
        tail,
        t0,
    ))
}

fn same_file(a: RawFd, b: RawFd) -> bool {
    let st = |fd| {
        nix::sys::stat::fstat(fd)
            .ok()
            .map(|s| (s.st_dev, s.st_ino, s.st_rdev))
    };
    st(a).is_some() && st(a) == st(b)
}

/// File in a run directory naming the umlctl process that owns it.
const OWNER_FILE: &str = "owner";

/// `pid:starttime` of a live process (the start time tells a reused pid
/// apart), or `None` if it is gone.
fn process_identity(pid: u32) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22 (starttime), counted after the ")" that ends the command name.
    let rest = &stat[stat.rfind(')')? + 1..];
    let start = rest.split_whitespace().nth(19)?;
    Some(format!("{pid}:{start}"))
}

/// Remove run directories whose umlctl was killed (SIGKILL, OOM) before it
/// could clean up. Its UML died with it (PR_SET_PDEATHSIG).
fn sweep_stale_rundirs(runtime: &Path) {
    let Ok(entries) = fs::read_dir(runtime) else {
        return;
    };
    for e in entries.flatten() {
        if !e.file_name().to_string_lossy().starts_with("umlctl-") {
            continue;
        }
        let Ok(owner) = fs::read_to_string(e.path().join(OWNER_FILE)) else {
            continue;
        };
        let alive = owner
            .split(':')
            .next()
            .and_then(|p| p.parse::<u32>().ok())
            .and_then(process_identity)
            .is_some_and(|id| id == owner);
        if !alive {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// Removes the run directory on every path out of `run`.
pub(crate) struct RunDirGuard(pub(crate) PathBuf);

impl Drop for RunDirGuard {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

struct Signals {
    handle: signal_hook::iterator::Handle,
}

impl Signals {
    fn close(self) {
        self.handle.close();
    }
}

fn install_signals(interactive: bool, tx: Sender<Event>) -> Result<Signals> {
    use signal_hook::consts::*;
    let mut list = vec![SIGINT, SIGTERM, SIGHUP, SIGQUIT];
    if interactive {
        list.push(SIGWINCH);
    }
    let mut sigs = signal_hook::iterator::Signals::new(&list)
        .map_err(|e| Error::sys("install signal handlers", e))?;
    let handle = sigs.handle();
    thread::spawn(move || {
        for s in sigs.forever() {
            if tx.send(Event::Signal(s)).is_err() {
                break;
            }
        }
    });
    Ok(Signals { handle })
}

/// What the supervision loop saw.
struct Supervised {
    uml: Option<ExitStatus>,
    final_status: Option<Status>,
    timed_out: bool,
    interrupted: Option<i32>,
    started: Option<Instant>,
    ended: Option<Instant>,
    exited_at: Instant,
    /// The guest broke the protocol (why).
    garbage: Option<String>,
}

fn supervise(
    rx: &Receiver<Event>,
    control: &Sender<String>,
    control_go: Sender<()>,
    mut stdin_go: Option<Sender<()>>,
    (uml, jail): (Pid, Pid),
    timeout: Option<Duration>,
    t0: Instant,
) -> Supervised {
    let mut s = Supervised {
        uml: None,
        final_status: None,
        timed_out: false,
        interrupted: None,
        started: None,
        ended: None,
        exited_at: t0,
        garbage: None,
    };
    let deadline = timeout.map(|t| t0 + t);
    // When set: SIGTERM UML at this instant (then SIGKILL after KILL_GRACE).
    let mut stop_at: Option<Instant> = None;
    let mut kill_at: Option<Instant> = None;
    // After UML exited: how long to wait for the rest of the status line.
    // UML's exit can be seen before the status reader has read (or sent)
    // the final record; deciding without it would turn a finished command
    // into "exited before the command finished".
    let mut drain_until: Option<Instant> = None;
    let mut status_eof = false;
    let send = |c: Control| {
        let _ = control.send(c.encode());
    };
    loop {
        let now = Instant::now();
        if let Some(t) = drain_until {
            if now >= t {
                break;
            }
        }
        let mut next = [
            deadline.filter(|_| !s.timed_out && s.uml.is_none()),
            stop_at,
            kill_at,
            drain_until,
        ]
        .into_iter()
        .flatten()
        .min();
        if let Some(d) = deadline.filter(|_| !s.timed_out && s.uml.is_none()) {
            if now >= d {
                s.timed_out = true;
                stop_at = Some(now);
                next = Some(now);
            }
        }
        if let Some(t) = stop_at {
            if now >= t {
                let _ = kill(uml, Signal::SIGTERM);
                stop_at = None;
                kill_at = Some(now + KILL_GRACE);
                next = kill_at;
            }
        }
        if let Some(t) = kill_at {
            if now >= t {
                // The jail's PID 1 (or UML itself, unjailed): everything goes.
                let _ = kill(jail, Signal::SIGKILL);
                kill_at = None;
                next = None;
            }
        }
        let ev = match next {
            Some(t) => match rx.recv_timeout(t.saturating_duration_since(Instant::now())) {
                Ok(ev) => ev,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            },
            None => match rx.recv() {
                Ok(ev) => ev,
                Err(_) => break,
            },
        };
        match ev {
            Event::UmlExited(st) => {
                s.uml = Some(st);
                s.exited_at = Instant::now();
                if s.final_status.is_some() || status_eof {
                    break;
                }
                // UML is reaped: no more signals to its pid (it may be reused).
                stop_at = None;
                kill_at = None;
                drain_until = Some(s.exited_at + Duration::from_secs(2));
            }
            Event::StatusEof => {
                status_eof = true;
                if s.uml.is_some() {
                    break;
                }
            }
            Event::Status(Status::Started) => {
                s.started = Some(Instant::now());
                if let Some(go) = stdin_go.take() {
                    let _ = go.send(());
                }
            }
            Event::Status(Status::Hello) => {
                let _ = control_go.send(());
            }
            Event::Status(Status::Ready) | Event::Status(Status::Credit(_)) => {}
            Event::Status(st) => {
                s.ended = Some(Instant::now());
                s.final_status = Some(st);
                if s.uml.is_some() {
                    break;
                }
                if stop_at.is_none() && kill_at.is_none() {
                    stop_at = Some(Instant::now() + POWEROFF_GRACE);
                }
            }
            Event::Signal(sig) if sig == signal_hook::consts::SIGWINCH => {
                if let Some((rows, cols)) = winsize(1).or_else(|| winsize(0)) {
                    send(Control::Winsize { rows, cols });
                }
            }
            Event::Signal(sig) => {
                if s.interrupted.is_none() && s.final_status.is_none() {
                    // First signal: hand it to the command, as if it had
                    // been sent to it directly.
                    s.interrupted = Some(sig);
                    send(Control::Signal(sig));
                    stop_at = Some(Instant::now() + SIGNAL_GRACE);
                } else {
                    // Again: stop the guest now.
                    s.interrupted.get_or_insert(sig);
                    if kill_at.is_none() {
                        stop_at = Some(Instant::now());
                    }
                }
            }
            Event::OutputBroken => send(Control::Signal(libc::SIGPIPE)),
            Event::Garbage(what) => {
                // The guest is not following the protocol: stop it now.
                if s.garbage.is_none() {
                    s.garbage = Some(what);
                    if kill_at.is_none() && s.uml.is_none() {
                        stop_at = Some(Instant::now());
                    }
                }
            }
        }
    }
    s
}

fn outcome(
    s: Supervised,
    located: &Located,
    shim_used: bool,
    shim_refused: bool,
    host: HostXstate,
    (panic, tail): (Option<String>, String),
    t0: Instant,
) -> RunOutcome {
    let ms =
        |a: Instant, b: Instant| (b.saturating_duration_since(a).as_secs_f64() * 1e6).round() / 1e3;
    let timings = Timings {
        boot_ms: s.started.map(|t| ms(t0, t)),
        command_ms: match (s.started, s.ended) {
            (Some(a), Some(b)) => Some(ms(a, b)),
            _ => None,
        },
        total_ms: ms(t0, s.exited_at),
    };
    let mut o = RunOutcome {
        exit_code: i32::from(crate::exit::FAILURE),
        reason: Reason::BootFailed,
        signal: None,
        message: None,
        kernel: located.info.path.clone(),
        kernel_version: located.info.version.clone(),
        xstate_shim: shim_used,
        timings,
    };
    if let Some(what) = s.garbage {
        o.reason = Reason::Protocol;
        o.message = Some(format!("{what}; the guest was stopped"));
        return o;
    }
    match s.final_status {
        Some(Status::Exit(c)) => {
            o.exit_code = i32::from(c);
            o.reason = Reason::Exited;
        }
        Some(Status::Signal { signal, .. }) => {
            o.exit_code = crate::exit::signaled(signal);
            o.reason = Reason::Signaled;
            o.signal = Some(signal);
        }
        Some(Status::NotFound(m)) => {
            o.exit_code = i32::from(crate::exit::NOT_FOUND);
            o.reason = Reason::NotFound;
            o.message = Some(m);
        }
        Some(Status::NotExecutable(m)) => {
            o.exit_code = i32::from(crate::exit::NOT_EXECUTABLE);
            o.reason = Reason::NotExecutable;
            o.message = Some(m);
        }
        Some(Status::Error(m)) => {
            o.message = Some(format!("the guest could not run the command: {m}"));
        }
        Some(Status::Hello)
        | Some(Status::Ready)
        | Some(Status::Started)
        | Some(Status::Credit(_))
        | None => {
            if s.timed_out {
                o.exit_code = i32::from(crate::exit::TIMEOUT);
                o.reason = Reason::Timeout;
                o.message = Some("timed out; the guest was stopped".into());
            } else if let Some(sig) = s.interrupted {
                o.exit_code = crate::exit::signaled(sig);
                o.reason = Reason::Interrupted;
                o.signal = Some(sig);
                o.message = Some(format!(
                    "interrupted by signal {sig}; the guest was stopped"
                ));
            } else {
                let uml = s.uml.map(|st| match (st.code(), st.signal()) {
                    (Some(c), _) => format!("exited with status {c}"),
                    (_, Some(6)) => "aborted (SIGABRT), as UML does on a kernel panic".into(),
                    (_, Some(sig)) => format!("was killed by signal {sig}"),
                    _ => "ended".into(),
                });
                let is_panic = panic.is_some() || s.uml.and_then(|st| st.signal()) == Some(6);
                // The command ran, and the kernel then exited by itself
                // (poweroff, halt, reboot from inside): a shutdown.
                let shut_down =
                    !is_panic && s.started.is_some() && s.uml.and_then(|st| st.code()).is_some();
                o.reason = if is_panic {
                    Reason::Panic
                } else if shut_down {
                    Reason::Shutdown
                } else {
                    Reason::BootFailed
                };
                let mut msg = match &panic {
                    Some(p) => format!("guest kernel panic: {p}"),
                    None if shut_down => {
                        "the guest shut down (poweroff, halt or reboot inside it) before the command finished".to_string()
                    }
                    None => format!(
                        "the guest kernel {} before the command finished",
                        uml.unwrap_or_else(|| "stopped".into())
                    ),
                };
                if tail.contains("ptrace set fp regs failed") {
                    msg.push_str(&format!(
                        "\nthe kernel cannot restore FP state on this host (XSAVE area {} bytes > {}).",
                        host.bytes(),
                        xstate::LEGACY_UML_XSTATE
                    ));
                    if shim_refused {
                        msg.push_str(" Drop --no-xstate-shim, or use a kernel ≥ 6.13.");
                    }
                }
                if !tail.is_empty() {
                    msg.push_str("\nlast kernel messages:\n");
                    msg.push_str(&tail);
                }
                o.message = Some(msg);
            }
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_tail_keeps_the_end_and_finds_panics() {
        let mut t = LogTail::default();
        for i in 0..100 {
            t.push(format!("line {i}\n").as_bytes());
        }
        t.push(b"Kernel panic - not syncing: Attempted to kill init! exitcode=0x0000000b\nmore");
        assert_eq!(
            t.panic.as_deref(),
            Some("Kernel panic - not syncing: Attempted to kill init! exitcode=0x0000000b")
        );
        let tail = t.tail(2);
        assert!(
            tail.contains("line 99") && tail.contains("Kernel panic"),
            "{tail}"
        );
        assert!(!tail.contains("line 98"));
    }

    #[test]
    fn log_tail_is_bounded_by_a_guest_that_never_ends_a_line() {
        let mut t = LogTail::default();
        for _ in 0..1000 {
            t.push(&[b'A'; 16 * 1024]);
        }
        assert!(t.partial.len() <= LogTail::MAX_PARTIAL);
        assert!(t.lines.iter().all(|l| l.len() <= LogTail::MAX_PARTIAL));
        assert!(t.lines.len() <= LogTail::KEEP);
        t.push(b"\nKernel panic - not syncing: x\n");
        assert!(t.panic.is_some());
    }

    #[test]
    fn status_lines_are_split_and_bounded() {
        let mut pending = Vec::new();
        let mut got = Vec::new();
        split_lines(&mut pending, b"hello\nrea", 16, |l| got.push(l.to_vec())).unwrap();
        split_lines(&mut pending, b"dy\nexit 3\n", 16, |l| got.push(l.to_vec())).unwrap();
        assert_eq!(
            got,
            vec![b"hello".to_vec(), b"ready".to_vec(), b"exit 3".to_vec()]
        );
        assert!(pending.is_empty());
        // Too long, in one piece or across reads: refused, nothing kept.
        assert!(split_lines(&mut pending, &[b'A'; 17], 16, |_| {}).is_err());
        assert!(pending.is_empty());
        split_lines(&mut pending, &[b'A'; 10], 16, |_| {}).unwrap();
        assert!(split_lines(&mut pending, &[b'A'; 10], 16, |_| {}).is_err());
        assert!(split_lines(&mut pending, b"AAAAAAAAAAAAAAAAAAAA\n", 16, |_| {}).is_err());
    }

    #[test]
    fn env_composition() {
        let mut s = GuestSpec::new(vec!["true".into()]);
        s.env = vec![
            ("A".into(), Some("1".into())),
            ("HOME".into(), Some("/home/x".into())),
        ];
        let env = guest_env(&s, false).unwrap();
        let env: Vec<String> = env
            .iter()
            .map(|e| String::from_utf8_lossy(e).into_owned())
            .collect();
        assert!(env.contains(&"A=1".to_string()));
        assert!(env.contains(&"HOME=/home/x".to_string()));
        assert!(!env.contains(&"HOME=/root".to_string()));
        assert!(env.iter().any(|e| e.starts_with("PATH=")));
        s.env = vec![("A=B".into(), Some("1".into()))];
        assert!(guest_env(&s, false).is_err());
    }
}

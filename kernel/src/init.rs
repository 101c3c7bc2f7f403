//! umlctl's init inside the guest (PID 1).
//!
//! The kernel starts the umlctl binary as `init=` through hostfs. It mounts
//! the pseudo filesystems, reads its [`InitSpec`] from the control line,
//! prepares the root (the host's `/` read-only with tmpfs over the writable
//! paths, or an ext4 image with the host filesystem detached), runs the
//! command with its stdio relayed through the ring disk (or on the terminal
//! line), reports how it ended on the status line and in `/proc/exitcode`,
//! and powers the guest off.
//!
//! Nothing here returns: every path ends in `reboot(RB_POWER_OFF)`. If the
//! init itself cannot go on it reports `error ...` and powers off, so the
//! host always learns what happened.

mod agent;
mod boot;
pub mod lab;
pub(crate) use boot::{BOOT_ENV, EXEC_ENV, EXEC_RINGS_ENV, HOSTNAME_ENV, INIT_ENV, STARTING_MARK};

use std::ffi::{CString, OsStr};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::signal::{kill, Signal};
use nix::sys::termios::{self, SetArg};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::protocol::STDIN_LINE;
use crate::protocol::{
    ring, Control, InitSpec, RootSpec, SpecDecoder, Status, CONTROL_LINE, STATUS_LINE,
};

/// Default `PATH` when the spec's environment has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn tty(n: u32) -> String {
    format!("/dev/ttyS{n}")
}

/// With `UMLCTL_TRACE` set on the host, `run` puts `UMLCTL_TRACE=1` on the
/// kernel command line (init gets it as environment); the init then logs its milestones (guest uptime in
/// seconds) to the console log.
fn tstamp(what: &str) {
    if std::env::var_os("UMLCTL_TRACE").is_some() {
        if let Ok(t) = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME) {
            console(&format!(
                "trace {:.3} {what}",
                t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9
            ));
        }
    }
}

/// Write a diagnostic to the kernel console (the console log on the host).
fn console(msg: &str) {
    if let Ok(mut f) = OpenOptions::new().write(true).open("/dev/console") {
        let _ = writeln!(f, "umlctl-init: {msg}");
    }
}

struct Guest {
    status: Option<File>,
}

impl Guest {
    fn report(&mut self, s: &Status) {
        if let Some(f) = self.status.as_mut() {
            let _ = f.write_all(s.encode().as_bytes());
            let _ = termios::tcdrain(f.as_fd());
        }
    }

    /// Report `msg` as an init failure and power off with status 125.
    fn fail(&mut self, msg: String) -> ! {
        console(&msg);
        self.report(&Status::Error(msg));
        power_off(crate::exit::FAILURE)
    }
}

/// Flush, record the exit code for UML and power the guest off.
fn power_off(code: u8) -> ! {
    let _ = fs::write("/proc/exitcode", format!("{code}\n"));
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    // reboot(2) does not return on success; if it did, there is nothing
    // better to do than to let the kernel panic on init's exit.
    std::process::exit(i32::from(code))
}

fn open_tty(n: u32, read: bool, write: bool) -> std::io::Result<File> {
    OpenOptions::new()
        .read(read)
        .write(write)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(tty(n))
}

fn make_raw(f: &impl AsFd) {
    if let Ok(mut t) = termios::tcgetattr(f) {
        termios::cfmakeraw(&mut t);
        let _ = termios::tcsetattr(f, SetArg::TCSANOW, &t);
    }
}

fn mount_fs(
    src: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), String> {
    let _ = fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(target);
    mount(Some(src), target, Some(fstype), flags, data)
        .map_err(|e| format!("mount {fstype} on {target}: {e}"))
}

fn mount_dev(root: &str) -> Result<(), String> {
    mount_fs(
        "devtmpfs",
        &format!("{root}/dev"),
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )
}

/// /proc, /sys, /dev/pts and /dev/shm under `root` ("" for /), with /dev
/// already mounted.
fn mount_pseudo(root: &str) -> Result<(), String> {
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("proc", &format!("{root}/proc"), "proc", nodev, None)?;
    mount_fs("sysfs", &format!("{root}/sys"), "sysfs", nodev, None)?;
    mount_fs(
        "devpts",
        &format!("{root}/dev/pts"),
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0620,ptmxmode=0666"),
    )?;
    mount_fs(
        "tmpfs",
        &format!("{root}/dev/shm"),
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    Ok(())
}

/// Bring up `lo` (SIOCGIFFLAGS / SIOCSIFFLAGS; no wrapper exists in nix).
fn setup_host_root(tmpfs: &[String], binds: &[String]) -> Result<(), String> {
    mount_pseudo("")?;
    for t in tmpfs {
        if !Path::new(t).is_dir() {
            continue;
        }
        let mode = if t == "/run" {
            "mode=0755"
        } else {
            "mode=1777"
        };
        mount_fs(
            "tmpfs",
            t,
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(mode),
        )?;
    }
    for b in binds {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(b)
            .map_err(|e| format!("mkdir {b}: {e}"))?;
        mount(
            Some("none"),
            b.as_str(),
            Some("hostfs"),
            MsFlags::MS_RDONLY,
            Some(b.as_str()),
        )
        .map_err(|e| format!("mount host directory {b}: {e}"))?;
    }
    Ok(())
}

/// Mount the image on `device` and make it the root, the init disk (or
/// the host filesystem) detached beneath it.
fn mount_image(device: &str) -> Result<(), String> {
    const NEWROOT: &str = "/newroot";
    let mut last = String::new();
    let mut mounted = false;
    for fstype in ["ext4", "ext3", "ext2"] {
        match mount(
            Some(device),
            NEWROOT,
            Some(fstype),
            MsFlags::empty(),
            None::<&str>,
        ) {
            Ok(()) => {
                mounted = true;
                break;
            }
            Err(e) => last = format!("{e}"),
        }
    }
    if !mounted {
        return Err(format!(
            "cannot mount the image ({device}) as ext4/ext3/ext2: {last}; is it an ext4 filesystem image?"
        ));
    }
    std::env::set_current_dir(NEWROOT).map_err(|e| format!("chdir {NEWROOT}: {e}"))?;
    nix::unistd::pivot_root(".", ".").map_err(|e| format!("pivot_root into the image: {e}"))?;
    // The old root (the host filesystem and its /dev) is now stacked on
    // "."; detach it, so nothing of the host stays reachable.
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| format!("detach the host filesystem: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))
}

fn setup_image_root(device: &str) -> Result<(), String> {
    mount_image(device)?;
    mount_dev("")?;
    mount_pseudo("")?;
    for t in ["/run", "/tmp"] {
        let _ = fs::DirBuilder::new().mode(0o755).create(t);
    }
    mount_fs(
        "tmpfs",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    Ok(())
}

/// Reads a serial line in chunks and hands out whole lines (each guest
/// system call costs a round trip through the UML kernel, so never read a
/// byte at a time).
struct LineReader {
    file: File,
    pending: Vec<u8>,
}

impl LineReader {
    fn new(file: File) -> Self {
        LineReader {
            file,
            pending: Vec::new(),
        }
    }

    /// The next line without its newline; `None` at EOF.
    fn next_line(&mut self) -> std::io::Result<Option<String>> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(pos) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=pos).collect();
                return Ok(Some(
                    String::from_utf8_lossy(&line[..line.len() - 1]).into_owned(),
                ));
            }
            match self.file.read(&mut buf) {
                Ok(0) => return Ok(None),
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Read the spec from the control line.
fn read_spec(control: &mut LineReader) -> Result<InitSpec, String> {
    let mut dec = SpecDecoder::default();
    loop {
        match control.next_line() {
            Ok(None) => return Err("the control line closed before the spec arrived".into()),
            Ok(Some(line)) => {
                if let Some(spec) = dec.feed(&line)? {
                    return Ok(spec);
                }
            }
            Err(e) => return Err(format!("read control line: {e}")),
        }
    }
}

/// What the control line tells the stdin relay, in order.
enum StdinMsg {
    /// The next stdin slot holds this many bytes.
    Data(u32),
    /// The host's stdin ended after this many bytes in all.
    Eof(u64),
}

/// How many slots of an output stream the host has consumed (closed once
/// its reader on the host is gone).
type OutCredits = crate::flow::Window;

/// Where the control loop sends what it reads besides signals.
struct ControlSinks {
    cmd: Pid,
    tty: Option<File>,
    stdin: Option<mpsc::Sender<StdinMsg>>,
    /// stdout's and stderr's credits, by stream.
    out: [Arc<OutCredits>; 2],
}

/// Apply control messages until the control line closes.
fn control_loop(mut control: LineReader, sinks: ControlSinks) {
    while let Ok(Some(line)) = control.next_line() {
        match Control::parse(&line) {
            Some(Control::Signal(sig)) => {
                if let Ok(sig) = Signal::try_from(sig) {
                    // The command leads its own process group.
                    let _ = kill(Pid::from_raw(-sinks.cmd.as_raw()), sig);
                }
            }
            Some(Control::Winsize { rows, cols }) => {
                if let Some(t) = &sinks.tty {
                    set_winsize(t, rows, cols);
                }
            }
            Some(Control::Data(len)) => {
                if let Some(s) = &sinks.stdin {
                    let _ = s.send(StdinMsg::Data(len));
                }
            }
            Some(Control::StdinEof(total)) => {
                if let Some(s) = &sinks.stdin {
                    let _ = s.send(StdinMsg::Eof(total));
                }
            }
            Some(Control::Ack { stream, count }) => {
                let i = usize::from(stream.saturating_sub(ring::STDOUT));
                if let Some(c) = sinks.out.get(i) {
                    c.grant(count);
                }
            }
            Some(Control::Closed(stream)) => {
                let i = usize::from(stream.saturating_sub(ring::STDOUT));
                if let Some(c) = sinks.out.get(i) {
                    c.close();
                }
            }
            None => {}
        }
    }
}

fn set_winsize(fd: &impl AsRawFd, rows: u16, cols: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize that lives for the call.
    unsafe {
        libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws);
    }
}

/// A slot-sized buffer aligned for `O_DIRECT` (a page), without unsafe
/// code: a larger vector, used from its first aligned byte.
struct SlotBuf {
    mem: Vec<u8>,
    start: usize,
}

impl SlotBuf {
    const PAGE: usize = 4096;

    fn new() -> Self {
        let mem = vec![0u8; crate::num::usize_of(ring::SLOT) + Self::PAGE];
        let start = mem.as_ptr().align_offset(Self::PAGE);
        SlotBuf { mem, start }
    }

    fn slot(&mut self) -> &mut [u8] {
        let end = self.start + crate::num::usize_of(ring::SLOT);
        &mut self.mem[self.start..end]
    }
}

/// The guest's end of the ring disk, opened for `O_DIRECT` so that every
/// access reaches the host's file, never a guest page cache.
fn open_ring(device: &str) -> Result<File, String> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
        .open(device)
        .map_err(|e| format!("open the I/O ring disk {device}: {e}"))
}

/// Relay stdin slots from the ring into the command's stdin pipe, each
/// acknowledged on the status line once copied, until the host's announced
/// total has passed; then close the pipe (the command sees EOF). If the
/// command closes its stdin first, slots are still acknowledged, so the
/// host is never stuck.
fn relay_stdin(ring: Arc<File>, sink: File, msgs: mpsc::Receiver<StdinMsg>, mut status: File) {
    let mut sink = Some(sink);
    let mut buf = SlotBuf::new();
    let mut seq: u64 = 0;
    let mut received: u64 = 0;
    let mut total = u64::MAX;
    while received < total {
        let Ok(msg) = msgs.recv() else {
            return;
        };
        let len = match msg {
            StdinMsg::Eof(t) => {
                total = t;
                continue;
            }
            StdinMsg::Data(len) => crate::num::usize_of(u64::from(len)),
        };
        let area = &mut buf.slot()[..ring::padded(len)];
        if ring
            .read_exact_at(area, ring::offset(ring::STDIN, seq))
            .is_err()
        {
            return;
        }
        seq += 1;
        received += len as u64;
        if let Some(s) = sink.as_mut() {
            if s.write_all(&area[..len]).is_err() {
                // The command closed its stdin: keep taking slots.
                sink = None;
            }
        }
        let _ = status.write_all(Status::Ack(seq).encode().as_bytes());
    }
    // Dropping the sink here: EOF for the command.
}

/// Relay the command's output pipe into the ring's `stream` until EOF,
/// announcing each slot on the status line once it is on the host's disk.
/// When the host says nobody reads the stream any more, the pipe is
/// closed: the command's next write gets SIGPIPE, as on the host.
///
/// While output trickles, the relay runs at real-time priority: woken by
/// the command's write, it runs before the command's next system call, so
/// what the command wrote reaches the host even if it then crashes the
/// guest (sysrq-c, a panic). While output floods, it runs at normal
/// priority, so that the command fills the pipe between its reads and
/// each slot carries much.
fn relay_out(
    mut from: File,
    ring: Arc<File>,
    stream: u8,
    credits: Arc<OutCredits>,
    mut status: File,
) -> std::thread::JoinHandle<()> {
    fn set_realtime(on: bool) {
        let param = libc::sched_param {
            sched_priority: i32::from(on),
        };
        let policy = if on {
            libc::SCHED_FIFO
        } else {
            libc::SCHED_OTHER
        };
        // SAFETY: sets the calling thread's own policy; param is valid.
        unsafe { libc::sched_setscheduler(0, policy, &param) };
    }
    let (up_tx, up_rx) = std::sync::mpsc::channel::<()>();
    let h = std::thread::spawn(move || {
        set_realtime(true);
        let mut realtime = true;
        let mut buf = SlotBuf::new();
        let _ = up_tx.send(());
        let mut filler = crate::flow::Filler::default();
        let mut seq: u64 = 0;
        loop {
            let n = filler.fill(&mut from, buf.slot());
            if n == 0 {
                break;
            }
            if realtime == filler.flooding() {
                realtime = !realtime;
                set_realtime(realtime);
            }
            if credits.room(seq).is_none() {
                break;
            }
            let record = if n <= ring::INLINE_MAX && !filler.flooding() {
                // A trickle goes on the status line: written without
                // sleeping, it is out before the command runs on (a ring
                // slot waits for the disk, and a command that crashes the
                // guest meanwhile would lose it).
                Status::Inline {
                    stream,
                    data: buf.slot()[..n].to_vec(),
                }
            } else {
                let area = &buf.slot()[..ring::padded(n)];
                if ring.write_all_at(area, ring::offset(stream, seq)).is_err() {
                    break;
                }
                // n ≤ SLOT (1 MiB).
                let len = u32::try_from(n).unwrap_or(u32::MAX);
                Status::Data { stream, len }
            };
            seq += 1;
            if status.write_all(record.encode().as_bytes()).is_err() {
                break;
            }
        }
    });
    // Started and at its priority before the command can write.
    let _ = up_rx.recv();
    h
}

/// The command's stdio in the guest.
enum GuestIo {
    /// Interactive: the command gets the terminal line itself (and its
    /// stderr too, or stderr goes through the ring).
    Tty { term: File, stderr_on_tty: bool },
    /// Pipes relayed through the ring.
    Ring,
}

fn open_stdio(spec: &InitSpec) -> Result<GuestIo, String> {
    let err = |n: u32, e: std::io::Error| format!("open {}: {e}", tty(n));
    match &spec.tty {
        Some(t) => {
            // The controlling terminal: no O_NOCTTY; the child makes it its
            // controlling tty after setsid().
            let term = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(tty(STDIN_LINE))
                .map_err(|e| err(STDIN_LINE, e))?;
            set_winsize(&term, t.rows, t.cols);
            Ok(GuestIo::Tty {
                term,
                stderr_on_tty: t.stderr_on_tty,
            })
        }
        None => Ok(GuestIo::Ring),
    }
}

/// A pipe whose buffer holds a whole ring slot, so that one read fills one
/// slot when the command writes fast.
fn slot_pipe() -> Result<(File, File), String> {
    let (r, w) = cloexec_pipe()?;
    let size = libc::c_int::try_from(ring::SLOT).unwrap_or(libc::c_int::MAX);
    // Best effort: a smaller pipe only means smaller slots.
    let _ = nix::fcntl::fcntl(w.as_raw_fd(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(size));
    Ok((r, w))
}

fn cloexec_pipe() -> Result<(File, File), String> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map(|(r, w)| (File::from(r), File::from(w)))
        .map_err(|e| format!("pipe: {e}"))
}

fn env_path(spec: &InitSpec) -> Vec<u8> {
    spec.env
        .iter()
        .find_map(|kv| kv.strip_prefix(b"PATH=").map(<[u8]>::to_vec))
        .unwrap_or_else(|| DEFAULT_PATH.as_bytes().to_vec())
}

/// Whether the command can be found, the way execvp would look for it.
fn resolve(spec: &InitSpec) -> Option<Vec<u8>> {
    let prog = spec.argv.first()?;
    if prog.is_empty() {
        return None;
    }
    if prog.contains(&b'/') {
        let p = if prog.starts_with(b"/") {
            prog.clone()
        } else {
            let mut w = spec.workdir.clone();
            w.push(b'/');
            w.extend_from_slice(prog);
            w
        };
        return Path::new(OsStr::from_bytes(&p))
            .exists()
            .then(|| prog.clone());
    }
    for dir in env_path(spec).split(|&b| b == b':') {
        let dir = if dir.is_empty() { b"." as &[u8] } else { dir };
        let mut cand = dir.to_vec();
        cand.push(b'/');
        cand.extend_from_slice(prog);
        let p = Path::new(OsStr::from_bytes(&cand));
        if p.is_file() {
            if let Ok(c) = CString::new(cand.clone()) {
                // SAFETY: access(2) on a valid C string.
                if unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0 {
                    return Some(cand);
                }
            }
        }
    }
    None
}

/// Entry point of PID 1 in the guest.
pub fn main() -> ! {
    tstamp("init");
    let mut g = Guest { status: None };
    // /dev first: the serial lines live there.
    if let Err(e) = mount_dev("") {
        if !Path::new("/dev/ttyS0").exists() {
            g.fail(format!("{e}; the kernel needs CONFIG_DEVTMPFS"));
        }
    }
    // `start`: boot the image's own init after setting the guest up.
    if let Some(device) = std::env::var_os(boot::BOOT_ENV) {
        boot::main(&device.to_string_lossy());
    }
    match open_tty(STATUS_LINE, false, true) {
        Ok(f) => {
            make_raw(&f);
            g.status = Some(f);
        }
        Err(e) => g.fail(format!(
            "open {}: {e}; the kernel needs CONFIG_SSL (UML serial lines)",
            tty(STATUS_LINE)
        )),
    }
    let control = match open_tty(CONTROL_LINE, true, false) {
        Ok(f) => f,
        Err(e) => g.fail(format!("open {}: {e}", tty(CONTROL_LINE))),
    };
    make_raw(&control);
    let mut control = LineReader::new(control);
    tstamp("hello");
    g.report(&Status::Hello);
    let spec = match read_spec(&mut control) {
        Ok(s) => s,
        Err(e) => g.fail(e),
    };
    tstamp("ready");
    g.report(&Status::Ready);
    // Before the root changes: the device node is in this /dev.
    let ring = match open_ring(&spec.ring) {
        Ok(f) => Arc::new(f),
        Err(e) => g.fail(e),
    };

    let root = match &spec.root {
        RootSpec::Host { tmpfs, binds } => setup_host_root(tmpfs, binds),
        RootSpec::Image { device } => setup_image_root(device),
    };
    if let Err(e) = root {
        g.fail(e);
    }
    tstamp("rootdone");
    let _ = nix::unistd::sethostname(&spec.hostname);
    if spec.nics.is_empty() {
        if let Err(e) = crate::guestnet::up("lo") {
            console(&e);
        }
    } else {
        match crate::guestnet::setup(&spec.nics) {
            Ok(None) => {}
            // The network works; only the resolver could not be pointed.
            Ok(Some(w)) => console(&format!("umlctl init: name servers: {w}")),
            Err(e) => g.fail(format!("network setup: {e}")),
        }
    }

    let io = match open_stdio(&spec) {
        Ok(s) => s,
        Err(e) => g.fail(e),
    };
    let workdir = Path::new(OsStr::from_bytes(&spec.workdir)).to_path_buf();
    if !workdir.is_dir() {
        g.fail(format!(
            "working directory {} does not exist in the guest",
            workdir.display()
        ));
    }
    let prog_name =
        String::from_utf8_lossy(spec.argv.first().map(Vec::as_slice).unwrap_or_default())
            .into_owned();
    let Some(resolved) = resolve(&spec) else {
        let msg = format!("{prog_name}: command not found");
        g.report(&Status::NotFound(msg));
        power_off(crate::exit::NOT_FOUND);
    };

    let mut cmd = Command::new(OsStr::from_bytes(&resolved));
    cmd.arg0(OsStr::from_bytes(&spec.argv[0]))
        .args(spec.argv[1..].iter().map(|a| OsStr::from_bytes(a)))
        .env_clear()
        .current_dir(&workdir);
    for kv in &spec.env {
        let (k, v) = match kv.iter().position(|&b| b == b'=') {
            Some(i) => (&kv[..i], &kv[i + 1..]),
            None => (&kv[..], &b""[..]),
        };
        cmd.env(OsStr::from_bytes(k), OsStr::from_bytes(v));
    }
    // Relays: the stdin pipe, [(output pipe, stream)].
    let mut stdin_relay = None;
    let mut out_relays = Vec::new();
    let mut term_for_control = None;
    let interactive = matches!(io, GuestIo::Tty { .. });
    let pipe = |g: &mut Guest| match slot_pipe() {
        Ok(p) => p,
        Err(e) => g.fail(e),
    };
    match io {
        GuestIo::Tty {
            term,
            stderr_on_tty,
        } => {
            let dup = |f: &File| f.try_clone().map_err(|e| format!("dup the terminal: {e}"));
            let (a, b, c) = match (dup(&term), dup(&term), dup(&term)) {
                (Ok(a), Ok(b), Ok(c)) => (a, b, c),
                (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => g.fail(e),
            };
            cmd.stdin(Stdio::from(a)).stdout(Stdio::from(b));
            if stderr_on_tty {
                cmd.stderr(Stdio::from(term));
            } else {
                let (err_r, err_w) = pipe(&mut g);
                cmd.stderr(Stdio::from(err_w));
                out_relays.push((err_r, ring::STDERR));
                drop(term);
            }
            term_for_control = Some(c);
        }
        GuestIo::Ring => {
            let (in_r, in_w) = pipe(&mut g);
            let (out_r, out_w) = pipe(&mut g);
            let (err_r, err_w) = pipe(&mut g);
            cmd.stdin(Stdio::from(in_r))
                .stdout(Stdio::from(out_w))
                .stderr(Stdio::from(err_w));
            stdin_relay = Some(in_w);
            out_relays.push((out_r, ring::STDOUT));
            out_relays.push((err_r, ring::STDERR));
        }
    }
    if interactive {
        // SAFETY: the closure runs in the forked child before exec and only
        // makes async-signal-safe system calls.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    } else {
        // Its own process group, so signals reach everything it starts.
        // Without a pre_exec closure std can use posix_spawn (vfork), which
        // in UML is much cheaper than fork: no address space to copy.
        cmd.process_group(0);
    }
    // The output relays run (at real-time priority, see relay_out) before
    // the command does, so none of its output waits on their start-up.
    let out_credits: [Arc<OutCredits>; 2] = [
        Arc::new(OutCredits::new(ring::SLOTS)),
        Arc::new(OutCredits::new(ring::SLOTS)),
    ];
    let mut outputs = Vec::new();
    for (from, stream) in out_relays {
        let credits = out_credits[usize::from(stream - ring::STDOUT)].clone();
        let status = match g.status.as_ref().map(File::try_clone) {
            Some(Ok(f)) => f,
            Some(Err(e)) => g.fail(format!("dup the status line: {e}")),
            None => g.fail("no status line".into()),
        };
        outputs.push(relay_out(from, ring.clone(), stream, credits, status));
    }
    // "started" goes out (and is drained to the host) before the command
    // exists: a command that powers the guest off at once (sysrq `o`,
    // `poweroff -f`) would otherwise win the race against the report, and
    // its shutdown would read as a boot failure. A command that cannot be
    // executed is still reported as such; its final status follows.
    tstamp("started");
    g.report(&Status::Started);
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let msg = format!("{prog_name}: {e}");
            if e.kind() == std::io::ErrorKind::NotFound {
                g.report(&Status::NotFound(msg));
                power_off(crate::exit::NOT_FOUND);
            }
            g.report(&Status::NotExecutable(msg));
            power_off(crate::exit::NOT_EXECUTABLE);
        }
    };
    // Drop the command's ends of the pipes here, so EOFs arrive when it
    // (and whatever inherited them) is gone.
    drop(cmd);
    let cmd_pid = crate::num::pid(child.id());

    let mut stdin_tx = None;
    if let Some(sink) = stdin_relay {
        let (tx, rx) = mpsc::channel();
        stdin_tx = Some(tx);
        let status = match g.status.as_ref().map(File::try_clone) {
            Some(Ok(f)) => f,
            Some(Err(e)) => g.fail(format!("dup the status line: {e}")),
            None => g.fail("no status line".into()),
        };
        let ring = ring.clone();
        std::thread::spawn(move || relay_stdin(ring, sink, rx, status));
    }
    let sinks = ControlSinks {
        cmd: cmd_pid,
        tty: term_for_control,
        stdin: stdin_tx,
        out: out_credits,
    };
    std::thread::spawn(move || control_loop(control, sinks));

    // Reap everything (we are PID 1) until the command ends.
    let status = loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == cmd_pid => {
                break Status::Exit(crate::num::exit_byte(code))
            }
            Ok(WaitStatus::Signaled(pid, sig, core)) if pid == cmd_pid => {
                break Status::Signal {
                    signal: sig as i32,
                    core,
                }
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => g.fail(format!("waitpid: {e}")),
        }
    };
    tstamp("cmdexit");
    // Whatever the command left running goes now, as in a container.
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    while let Ok(st) = waitpid(None, Some(WaitPidFlag::empty())) {
        if matches!(st, WaitStatus::StillAlive) {
            break;
        }
    }
    // The command's output must have left the guest before we report.
    for h in outputs {
        let _ = h.join();
    }
    tstamp("drained");
    // What the command sent over the network and the kernel still holds
    // (a sender that closed its socket and exited) leaves before power-off.
    if !spec.nics.is_empty() {
        crate::guestnet::wait_tcp_sent(std::time::Duration::from_secs(3));
    }
    nix::unistd::sync();
    if matches!(spec.root, RootSpec::Image { .. }) {
        let _ = mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        );
    }
    let code = match status {
        Status::Exit(c) => c,
        Status::Signal { signal, .. } => crate::num::exit_byte(crate::exit::signaled(signal)),
        _ => crate::exit::FAILURE,
    };
    g.report(&status);
    power_off(code)
}

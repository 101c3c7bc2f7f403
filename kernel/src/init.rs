//! umlctl's init inside the guest (PID 1).
//!
//! The kernel starts the umlctl binary as `init=` through hostfs. It mounts
//! the pseudo filesystems, reads its [`InitSpec`] from the control line,
//! prepares the root (the host's `/` read-only with tmpfs over the writable
//! paths, or an ext4 image with the host filesystem detached), runs the
//! command with its stdio on the serial lines, reports how it ended on the
//! status line and in `/proc/exitcode`, and powers the guest off.
//!
//! Nothing here returns: every path ends in `reboot(RB_POWER_OFF)`. If the
//! init itself cannot go on it reports `error ...` and powers off, so the
//! host always learns what happened.

mod agent;
mod boot;
pub(crate) use boot::{BOOT_ENV, EXEC_ENV, HOSTNAME_ENV, INIT_ENV, STARTING_MARK};

use std::ffi::{CString, OsStr};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::signal::{kill, Signal};
use nix::sys::termios::{self, SetArg};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::protocol::{
    Control, InitSpec, RootSpec, SpecDecoder, Status, CONTROL_LINE, STATUS_LINE,
};
use crate::protocol::{STDERR_LINE, STDIN_CREDIT_STEP, STDIN_LINE, STDOUT_LINE};

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

/// Where `stdin-eof` reaches the stdin relay.
#[derive(Clone)]
struct StdinEof {
    /// Total bytes the host sent, `u64::MAX` until it is known.
    total: Arc<AtomicU64>,
    /// Written to once `total` is set, to wake the relay.
    wake: Arc<OwnedFd>,
}

/// Apply control messages until the control line closes.
fn control_loop(mut control: LineReader, cmd: Pid, tty: Option<File>, eof: StdinEof) {
    while let Ok(Some(line)) = control.next_line() {
        match Control::parse(&line) {
            Some(Control::Signal(sig)) => {
                if let Ok(sig) = Signal::try_from(sig) {
                    // The command leads its own process group.
                    let _ = kill(Pid::from_raw(-cmd.as_raw()), sig);
                }
            }
            Some(Control::Winsize { rows, cols }) => {
                if let Some(t) = &tty {
                    set_winsize(t, rows, cols);
                }
            }
            Some(Control::StdinEof(total)) => {
                eof.total.store(total, Ordering::SeqCst);
                let _ = nix::unistd::write(eof.wake.as_fd(), b"x");
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

/// Relay the stdin line into the command's stdin pipe until the host's
/// announced total has passed, then close the pipe (the command sees EOF).
///
/// What has been read is reported on the status line (`credit N`, at least
/// every [`STDIN_CREDIT_STEP`] bytes): the host keeps less than the tty's
/// buffer in flight, so UML's line is never throttled (which would lose its
/// input interrupt for good).
fn relay_stdin(
    mut line: File,
    sink: File,
    eof: StdinEof,
    wake_r: OwnedFd,
    mut status: Option<File>,
) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut sink = Some(sink);
    let mut received: u64 = 0;
    let mut reported: u64 = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if received >= eof.total.load(Ordering::SeqCst) {
            return; // drops the sink: EOF for the command
        }
        let (line_ready, wake_ready) = {
            let mut fds = [
                PollFd::new(line.as_fd(), PollFlags::POLLIN),
                PollFd::new(wake_r.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return,
            }
            let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
            (ready(&fds[0]), ready(&fds[1]))
        };
        if wake_ready {
            let mut b = [0u8; 16];
            let _ = nix::unistd::read(wake_r.as_raw_fd(), &mut b);
        }
        if line_ready {
            let n = match line.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            received += n as u64;
            if received - reported >= STDIN_CREDIT_STEP {
                if let Some(st) = status.as_mut() {
                    let _ = st.write_all(Status::Credit(received).encode().as_bytes());
                }
                reported = received;
            }
            if let Some(s) = sink.as_mut() {
                if s.write_all(&buf[..n]).is_err() {
                    // The command closed its stdin; keep draining the line
                    // so the host is never stuck writing.
                    sink = None;
                }
            }
        }
    }
}

/// Relay the command's output pipe to a serial line until EOF.
///
/// While output trickles, the relay runs at real-time priority: woken by
/// the command's write, it runs before the command's next system call, so
/// what the command wrote reaches the host even if it then crashes the
/// guest (sysrq-c, a panic). While output floods, it runs at normal
/// priority, so that the command fills the pipe between its reads and the
/// serial line gets large writes (each one a host system call).
fn relay_out(mut from: File, mut to: File) -> std::thread::JoinHandle<File> {
    /// More than this in one `WINDOW` is a flood.
    const FLOOD_BYTES: u64 = 1 << 20;
    const WINDOW: std::time::Duration = std::time::Duration::from_millis(100);
    /// A read that waited this long means the flood is over.
    const IDLE: std::time::Duration = std::time::Duration::from_millis(20);
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
        let mut buf = vec![0u8; 64 * 1024];
        let _ = up_tx.send(());
        let mut window = (std::time::Instant::now(), 0u64);
        loop {
            let asked = std::time::Instant::now();
            let n = match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            let now = std::time::Instant::now();
            if !realtime && now - asked >= IDLE {
                set_realtime(true);
                realtime = true;
            }
            if now - window.0 > WINDOW {
                window = (now, 0);
            }
            window.1 += n as u64;
            if realtime && window.1 > FLOOD_BYTES {
                set_realtime(false);
                realtime = false;
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        to
    });
    // Started and at its priority before the command can write.
    let _ = up_rx.recv();
    h
}

/// The command's stdio in the guest.
enum GuestIo {
    /// Interactive: the command gets the terminal line itself.
    Tty { term: File, stderr: File },
    /// Pipes relayed to the raw stdin, stdout and stderr lines.
    Lines {
        stdin: File,
        stdout: File,
        stderr: File,
    },
}

fn open_stdio(spec: &InitSpec) -> Result<GuestIo, String> {
    let err = |n: u32, e: std::io::Error| format!("open {}: {e}", tty(n));
    let raw_line = |n: u32, read: bool| -> Result<File, String> {
        let f = open_tty(n, read, !read).map_err(|e| err(n, e))?;
        // Raw: no CR/LF translation, no echo, no special characters, so
        // bytes pass through exactly.
        make_raw(&f);
        Ok(f)
    };
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
            let stderr = if t.stderr_on_tty {
                term.try_clone().map_err(|e| err(STDIN_LINE, e))?
            } else {
                raw_line(STDERR_LINE, false)?
            };
            Ok(GuestIo::Tty { term, stderr })
        }
        None => Ok(GuestIo::Lines {
            stdin: raw_line(STDIN_LINE, true)?,
            stdout: raw_line(STDOUT_LINE, false)?,
            stderr: raw_line(STDERR_LINE, false)?,
        }),
    }
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
    // Relays: (stdin line, stdin pipe), [(output pipe, output line)].
    let mut stdin_relay = None;
    let mut out_relays = Vec::new();
    let mut term_for_control = None;
    // Lines to drain before reporting, when the command writes to them directly.
    let mut direct_lines: Vec<File> = Vec::new();
    let interactive = matches!(io, GuestIo::Tty { .. });
    match io {
        GuestIo::Tty { term, stderr } => {
            let dup = |f: &File| f.try_clone().map_err(|e| format!("dup the terminal: {e}"));
            let (a, b, c) = match (dup(&term), dup(&term), dup(&term)) {
                (Ok(a), Ok(b), Ok(c)) => (a, b, c),
                (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => g.fail(e),
            };
            cmd.stdin(Stdio::from(a))
                .stdout(Stdio::from(b))
                .stderr(Stdio::from(stderr));
            term_for_control = Some(c);
            drop(term);
        }
        GuestIo::Lines {
            stdin,
            stdout,
            stderr,
        } => {
            let (in_r, in_w, out_r, out_w, err_r, err_w) =
                match (cloexec_pipe(), cloexec_pipe(), cloexec_pipe()) {
                    (Ok((a, b)), Ok((c, d)), Ok((e, f))) => (a, b, c, d, e, f),
                    (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => g.fail(e),
                };
            cmd.stdin(Stdio::from(in_r))
                .stdout(Stdio::from(out_w))
                .stderr(Stdio::from(err_w));
            stdin_relay = Some((stdin, in_w));
            out_relays.push((out_r, stdout));
            out_relays.push((err_r, stderr));
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
    let outputs: Vec<_> = out_relays
        .into_iter()
        .map(|(from, to)| relay_out(from, to))
        .collect();
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

    let (wake_r, wake_w) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => g.fail(format!("pipe: {e}")),
    };
    let eof = StdinEof {
        total: Arc::new(AtomicU64::new(u64::MAX)),
        wake: Arc::new(wake_w),
    };
    if let Some((line, sink)) = stdin_relay {
        let eof = eof.clone();
        let status = g.status.as_ref().and_then(|f| f.try_clone().ok());
        std::thread::spawn(move || relay_stdin(line, sink, eof, wake_r, status));
    }
    tstamp("started");
    g.report(&Status::Started);
    std::thread::spawn(move || control_loop(control, cmd_pid, term_for_control, eof));

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
        if let Ok(line) = h.join() {
            direct_lines.push(line);
        }
    }
    for line in &direct_lines {
        let _ = termios::tcdrain(line.as_fd());
    }
    tstamp("drained");
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

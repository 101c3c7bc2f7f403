//! The guest's exec agent: forked by umlctl's init before the image's init
//! starts, so it needs nothing in the image. It serves one UML serial line
//! per exec slot ([`crate::execproto`]): a HELLO starts a session (ending
//! whatever the slot ran before), a SPEC runs a command with pipes or a
//! pseudo-terminal, and the command's output, exit status or failure go
//! back as frames. stdin is credited as the command takes it, so the host
//! never has more than [`WINDOW`] bytes in flight on the line; where the
//! slot has a ring disk ([`proto::ring`]), stdin comes through it instead,
//! a slot of up to 1 MiB per frame, acknowledged as taken.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::execproto::{self as proto, kind, Ended, ExecSpec, CREDIT_STEP};

/// Start the agent for serial lines `lines` (with the stdin ring disks
/// `rings`, in the same order, where given) in a child process; returns in
/// the parent (which goes on to exec the image's init).
pub(super) fn spawn(lines: Vec<u32>, rings: Vec<String>) {
    // SAFETY: umlctl's init is single-threaded here; the child only runs
    // Rust code of this process and never returns into the parent's state.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            let _ = nix::unistd::setsid();
            let handles: Vec<_> = lines
                .into_iter()
                .enumerate()
                .map(|(i, n)| {
                    let ring = rings.get(i).cloned().filter(|r| !r.is_empty());
                    std::thread::spawn(move || serve(n, ring))
                })
                .collect();
            for h in handles {
                let _ = h.join();
            }
            std::process::exit(0);
        }
        Ok(nix::unistd::ForkResult::Parent { .. }) => {}
        Err(e) => super::console(&format!("exec agent: fork: {e}")),
    }
}

/// The line, shared by the slot's threads; frames of an ended session
/// (`gen` moved on) are dropped.
struct Line {
    inner: Mutex<(File, u64)>,
    /// Bytes of the current session taken from the line (credited).
    taken: AtomicU64,
    reported: AtomicU64,
    /// The session whose command runs (0: none), for the heartbeat.
    running: AtomicU64,
}

impl Line {
    fn send(&self, gen: u64, k: u8, payload: &[u8]) {
        if let Ok(mut g) = self.inner.lock() {
            if g.1 == gen {
                let _ = g.0.write_all(&proto::encode(k, payload));
            }
        }
    }

    fn credit(&self, gen: u64, n: u64) {
        let t = self.taken.fetch_add(n, Ordering::SeqCst) + n;
        if t - self.reported.load(Ordering::SeqCst) >= CREDIT_STEP {
            self.reported.store(t, Ordering::SeqCst);
            self.send(gen, kind::CREDIT, &t.to_le_bytes());
        }
    }
}

struct Session {
    pgid: Pid,
    /// The command itself has exited: what it left running in the
    /// background (a daemon a startup script started) stays, as after
    /// `docker exec`.
    finished: Arc<std::sync::atomic::AtomicBool>,
    stdin: Option<Sender<Input>>,
    master: Option<Arc<OwnedFd>>,
    /// Ring slots announced so far this session.
    ring_seq: u64,
}

/// stdin for the command: bytes from the line, or the next ring slot
/// (its sequence number and length).
enum Input {
    Bytes(Vec<u8>),
    Ring(u64, usize),
}

fn serve(n: u32, ring_dev: Option<String>) {
    // The slot's ring, read with O_DIRECT (each slot straight from the
    // host's file); without it stdin stays on the line.
    let ring = ring_dev.and_then(|d| {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
            .open(&d)
            .map_err(|e| super::console(&format!("exec agent: open {d}: {e}")))
            .ok()
            .map(Arc::new)
    });
    let path = format!("/dev/ttyS{n}");
    let tty = match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) => {
            super::console(&format!("exec agent: open {path}: {e}"));
            return;
        }
    };
    super::make_raw(&tty);
    let Ok(out) = tty.try_clone() else {
        return;
    };
    let line = Arc::new(Line {
        inner: Mutex::new((out, 0)),
        taken: AtomicU64::new(0),
        reported: AtomicU64::new(0),
        running: AtomicU64::new(0),
    });
    // One heartbeat per slot (a thread per command would cost every exec a
    // thread creation in the guest): so the host can tell a quiet command
    // from a dead agent.
    {
        let line = Arc::clone(&line);
        std::thread::spawn(move || loop {
            std::thread::sleep(proto::ALIVE_EVERY);
            let gen = line.running.load(Ordering::SeqCst);
            if gen != 0 {
                line.send(gen, kind::ALIVE, &[]);
            }
        });
    }
    let mut input = tty;
    let mut dec = proto::Decoder::default();
    let mut gen = 0u64;
    let mut session: Option<Session> = None;
    let mut buf = vec![0u8; 8192];
    loop {
        let got = match input.read(&mut buf) {
            Ok(0) => {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                super::console(&format!("exec agent: read {path}: {e}"));
                return;
            }
        };
        dec.push(&buf[..got]);
        loop {
            let f = match dec.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    // Out of step: end the session; the host starts over
                    // with a HELLO, which the decoder finds again.
                    line.send(gen, kind::ERROR, &proto::error_payload(125, &e.to_string()));
                    end(&mut session);
                    dec = proto::Decoder::default();
                    break;
                }
            };
            let size = (proto::HEADER + f.payload.len()) as u64;
            match f.kind {
                kind::HELLO => {
                    let Ok(nonce) = proto::nonce(&f.payload) else {
                        continue;
                    };
                    end(&mut session);
                    gen += 1;
                    if let Ok(mut g) = line.inner.lock() {
                        g.1 = gen;
                    }
                    line.taken.store(0, Ordering::SeqCst);
                    line.reported.store(0, Ordering::SeqCst);
                    if ring.is_some() {
                        line.send(gen, kind::RING, &nonce.to_le_bytes());
                    }
                    line.send(gen, kind::READY, &nonce.to_le_bytes());
                    continue;
                }
                kind::SPEC if session.is_none() => {
                    line.credit(gen, size);
                    match proto::spec(&f.payload) {
                        Ok(spec) => match start(&spec, gen, &line, ring.clone()) {
                            Ok(s) => session = Some(s),
                            Err((code, msg)) => {
                                line.send(gen, kind::ERROR, &proto::error_payload(code, &msg))
                            }
                        },
                        Err(e) => {
                            line.send(gen, kind::ERROR, &proto::error_payload(125, &e.to_string()))
                        }
                    }
                    continue;
                }
                kind::STDIN => {
                    line.credit(gen, proto::HEADER as u64);
                    let len = f.payload.len() as u64;
                    match session.as_ref().and_then(|s| s.stdin.as_ref()) {
                        Some(tx) if tx.send(Input::Bytes(f.payload)).is_ok() => {}
                        // Nobody takes it: it is taken all the same.
                        _ => line.credit(gen, len),
                    }
                    continue;
                }
                kind::STDIN_RING => {
                    if let (Some(s), Ok(len)) = (session.as_mut(), proto::ring_len(&f.payload)) {
                        s.ring_seq += 1;
                        let seq = s.ring_seq;
                        let taken = s
                            .stdin
                            .as_ref()
                            .is_some_and(|tx| tx.send(Input::Ring(seq, len)).is_ok());
                        if !taken {
                            // Nobody takes it: it is taken all the same.
                            line.send(gen, kind::RING_ACK, &seq.to_le_bytes());
                        }
                    }
                }
                kind::STDIN_EOF => {
                    if let Some(s) = session.as_mut() {
                        s.stdin = None;
                    }
                }
                kind::SIGNAL => {
                    if let (Some(s), Ok(sig)) = (session.as_ref(), proto::signal(&f.payload)) {
                        if let Ok(sig) = Signal::try_from(sig) {
                            let _ = killpg(s.pgid, sig);
                        }
                    }
                }
                kind::TTY_SIZE => {
                    if let Ok((n, rows, cols)) = proto::tty_size(&f.payload) {
                        if let Ok(t) = OpenOptions::new()
                            .write(true)
                            .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
                            .open(format!("/dev/tty{n}"))
                        {
                            set_winsize(t.as_raw_fd(), rows, cols);
                        }
                    }
                }
                kind::WINSIZE => {
                    if let (Some(m), Ok((rows, cols))) = (
                        session.as_ref().and_then(|s| s.master.as_ref()),
                        proto::winsize(&f.payload),
                    ) {
                        set_winsize(m.as_raw_fd(), rows, cols);
                    }
                }
                _ => {}
            }
            line.credit(gen, size);
        }
    }
}

/// End the slot's session: if its command still runs (the host gave up on
/// it), its whole process group is killed.
fn end(session: &mut Option<Session>) {
    if let Some(s) = session.take() {
        if !s.finished.load(Ordering::SeqCst) {
            let _ = killpg(s.pgid, Signal::SIGKILL);
        }
    }
}

fn set_winsize(fd: i32, rows: u16, cols: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize that lives for the call.
    unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) };
}

/// A user of the guest: uid, gid, home, name.
struct User {
    uid: u32,
    gid: u32,
    home: String,
    name: String,
}

/// Look `who` (a name or a numeric uid) up in the guest's /etc/passwd.
fn user(who: Option<&str>) -> Result<User, String> {
    let who = who.unwrap_or("0");
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    for l in passwd.lines() {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 7 {
            continue;
        }
        if f[0] == who || f[2] == who {
            let (Ok(uid), Ok(gid)) = (f[2].parse(), f[3].parse()) else {
                continue;
            };
            return Ok(User {
                uid,
                gid,
                home: f[5].to_string(),
                name: f[0].to_string(),
            });
        }
    }
    match who.parse::<u32>() {
        Ok(uid) => Ok(User {
            uid,
            gid: uid,
            home: "/".into(),
            name: who.into(),
        }),
        Err(_) => Err(format!("no user {who:?} in the guest's /etc/passwd")),
    }
}

/// The command's environment: a login-like default, the lease variables,
/// then the user's `-e`.
fn environment(spec: &ExecSpec, u: &User) -> Vec<(String, String)> {
    let mut env: HashMap<String, String> = HashMap::new();
    env.insert(
        "PATH".into(),
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
    );
    env.insert("HOME".into(), u.home.clone());
    env.insert("USER".into(), u.name.clone());
    env.insert("LOGNAME".into(), u.name.clone());
    if spec.tty {
        env.insert(
            "TERM".into(),
            spec.term.clone().unwrap_or_else(|| "xterm".into()),
        );
    }
    for (k, v) in std::env::vars() {
        if k.starts_with("UMLCTL_NET") {
            env.insert(k, v);
        }
    }
    for (k, v) in &spec.env {
        env.insert(k.clone(), v.clone());
    }
    let mut v: Vec<_> = env.into_iter().collect();
    v.sort();
    v
}

fn start(
    spec: &ExecSpec,
    gen: u64,
    line: &Arc<Line>,
    ring: Option<Arc<File>>,
) -> Result<Session, (u8, String)> {
    let fail = |m: String| (crate::exit::FAILURE, m);
    let u = user(spec.user.as_deref()).map_err(fail)?;
    let cwd = spec.cwd.clone().unwrap_or_else(|| "/".into());
    if !std::path::Path::new(&cwd).is_dir() {
        return Err(fail(format!(
            "working directory {cwd} does not exist in the guest"
        )));
    }
    let mut cmd = Command::new(&spec.argv[0]);
    cmd.args(&spec.argv[1..])
        .env_clear()
        .envs(environment(spec, &u))
        .current_dir(&cwd)
        .uid(u.uid)
        .gid(u.gid);
    let mut master = None;
    let mut outputs: Vec<(u8, File)> = Vec::new();
    let mut stdin_sink: Option<File> = None;
    if spec.tty {
        let ws = libc::winsize {
            ws_row: if spec.rows == 0 { 24 } else { spec.rows },
            ws_col: if spec.cols == 0 { 80 } else { spec.cols },
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        ensure_devpts();
        let pty = nix::pty::openpty(Some(&ws), None)
            .map_err(|e| fail(format!("open a pseudo-terminal: {e}")))?;
        let slave = File::from(pty.slave);
        let dup = |f: &File| f.try_clone().map_err(|e| fail(format!("dup: {e}")));
        cmd.stdin(Stdio::from(dup(&slave)?))
            .stdout(Stdio::from(dup(&slave)?))
            .stderr(Stdio::from(slave));
        // SAFETY: setsid and TIOCSCTTY are async-signal-safe; the closure
        // touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()?;
                if libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let m = File::from(pty.master);
        outputs.push((
            kind::STDOUT,
            m.try_clone().map_err(|e| fail(format!("dup: {e}")))?,
        ));
        if spec.stdin {
            stdin_sink = Some(m.try_clone().map_err(|e| fail(format!("dup: {e}")))?);
        }
        master = Some(Arc::new(OwnedFd::from(m)));
    } else {
        cmd.stdin(if spec.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()?;
                Ok(())
            });
        }
    }
    let name = &spec.argv[0];
    let mut child = cmd.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            (crate::exit::NOT_FOUND, format!("{name}: command not found"))
        }
        std::io::ErrorKind::PermissionDenied => (
            crate::exit::NOT_EXECUTABLE,
            format!("{name}: permission denied"),
        ),
        _ => (crate::exit::NOT_EXECUTABLE, format!("{name}: {e}")),
    })?;
    drop(cmd);
    if let Some(o) = child.stdout.take() {
        outputs.push((kind::STDOUT, File::from(OwnedFd::from(o))));
    }
    if let Some(e) = child.stderr.take() {
        outputs.push((kind::STDERR, File::from(OwnedFd::from(e))));
    }
    if let Some(i) = child.stdin.take() {
        stdin_sink = Some(File::from(OwnedFd::from(i)));
    }
    let pgid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    // Output pumps; each says when it is done.
    let (done_tx, done_rx) = channel::<()>();
    let pumps = outputs.len();
    for (k, mut f) in outputs {
        let line = Arc::clone(line);
        let done = done_tx.clone();
        std::thread::spawn(move || {
            let mut b = vec![0u8; 16 * 1024];
            loop {
                match f.read(&mut b) {
                    Ok(0) => break,
                    Ok(n) => line.send(gen, k, &b[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    // EIO: a pseudo-terminal whose last user is gone.
                    Err(_) => break,
                }
            }
            let _ = done.send(());
        });
    }
    drop(done_tx);
    // stdin: written as the command takes it, credited (a ring slot:
    // acknowledged) as written.
    let stdin = stdin_sink.map(|mut sink| {
        let (tx, rx) = channel::<Input>();
        let line = Arc::clone(line);
        std::thread::spawn(move || {
            let mut open = true;
            let mut slot = None;
            for input in rx {
                match input {
                    Input::Bytes(chunk) => {
                        if open && sink.write_all(&chunk).is_err() {
                            // The command closed its stdin; the rest is
                            // taken and dropped, so the host is never stuck.
                            open = false;
                        }
                        line.credit(gen, chunk.len() as u64);
                    }
                    Input::Ring(seq, len) => {
                        let buf: &mut super::SlotBuf = slot.get_or_insert_with(super::SlotBuf::new);
                        let area = &mut buf.slot()[..crate::protocol::ring::padded(len)];
                        let read = ring.as_ref().is_some_and(|r| {
                            std::os::unix::fs::FileExt::read_exact_at(
                                &**r,
                                area,
                                proto::ring::offset(seq - 1),
                            )
                            .is_ok()
                        });
                        if !read {
                            super::console("exec agent: cannot read the stdin ring");
                            open = false;
                        }
                        if open && sink.write_all(&area[..len]).is_err() {
                            open = false;
                        }
                        line.send(gen, kind::RING_ACK, &seq.to_le_bytes());
                    }
                }
            }
            // Channel closed: EOF for a pipe (dropped here); a terminal
            // gets its end-of-file character.
            if open && spec_is_tty(&sink) {
                let _ = sink.write_all(&[4]);
            }
        });
        tx
    });
    // The slot's heartbeat runs while the command does.
    line.running.store(gen, Ordering::SeqCst);
    // The waiter: status after the output is drained (or given up on, when
    // a daemonized grandchild keeps it open).
    let line2 = Arc::clone(line);
    let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let finished2 = Arc::clone(&finished);
    std::thread::spawn(move || {
        let status = child.wait();
        finished2.store(true, Ordering::SeqCst);
        for _ in 0..pumps {
            if done_rx.recv_timeout(Duration::from_secs(2)).is_err() {
                break;
            }
        }
        let ended = match status {
            Ok(s) => match (s.code(), s.signal()) {
                (Some(c), _) => Ended::Exited(c),
                (None, Some(sig)) => Ended::Signaled(sig),
                (None, None) => Ended::Exited(crate::exit::FAILURE.into()),
            },
            Err(_) => Ended::Exited(crate::exit::FAILURE.into()),
        };
        line2.send(gen, kind::EXIT, &proto::ended_payload(ended));
        let _ = line2
            .running
            .compare_exchange(gen, 0, Ordering::SeqCst, Ordering::SeqCst);
    });
    Ok(Session {
        pgid,
        finished,
        stdin,
        master,
        ring_seq: 0,
    })
}

/// Pseudo-terminals need devpts on /dev/pts; systemd and sysvinit mount
/// it, a minimal init may not, so the agent does when it is missing.
fn ensure_devpts() {
    if std::path::Path::new("/dev/pts/ptmx").exists() {
        return;
    }
    let _ = std::fs::create_dir_all("/dev/pts");
    let _ = nix::mount::mount(
        Some("devpts"),
        "/dev/pts",
        Some("devpts"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NOEXEC,
        Some("mode=0620,ptmxmode=0666"),
    );
}

fn spec_is_tty(f: &File) -> bool {
    nix::unistd::isatty(f.as_raw_fd()).unwrap_or(false)
}

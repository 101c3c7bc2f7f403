//! Supervising a running guest: events from the pumps, signals, the
//! timeout, and the grace periods before UML is killed.

#[allow(unused_imports)]
use super::*;

/// How long a forwarded signal may take to end the command before the
/// guest is stopped from the outside.
pub(crate) const SIGNAL_GRACE: Duration = Duration::from_secs(10);
/// How long UML may take to exit after a SIGTERM before it is killed.
pub(crate) const KILL_GRACE: Duration = Duration::from_secs(2);
/// How long UML may take to power off after the command ended.
pub(crate) const POWEROFF_GRACE: Duration = Duration::from_secs(10);

pub(crate) enum Event {
    Status(Status),
    /// The status line reached its end (every writer, UML included, is gone).
    StatusEof,
    UmlExited(ExitStatus),
    Signal(i32),
    /// The guest broke umlctl's protocol (what it did).
    Garbage(String),
}

/// Kill every process that is still our descendant (UML helpers orphaned
/// by UML's exit are re-parented to us: we are a child subreaper).
pub(crate) fn kill_descendants() {
    pub(crate) fn children_of(pid: u32) -> Vec<u32> {
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
            let _ = kill(crate::num::pid(*p), Signal::SIGKILL);
        }
        for p in &all {
            let _ = nix::sys::wait::waitpid(crate::num::pid(*p), None);
        }
    }
}

pub(crate) struct Signals {
    pub(crate) handle: signal_hook::iterator::Handle,
}

impl Signals {
    pub(crate) fn close(self) {
        self.handle.close();
    }
}

pub(crate) fn install_signals(interactive: bool, tx: Sender<Event>) -> Result<Signals> {
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
pub(crate) struct Supervised {
    pub(crate) uml: Option<ExitStatus>,
    pub(crate) final_status: Option<Status>,
    pub(crate) timed_out: bool,
    pub(crate) interrupted: Option<i32>,
    pub(crate) hello: Option<Instant>,
    pub(crate) started: Option<Instant>,
    pub(crate) ended: Option<Instant>,
    pub(crate) exited_at: Instant,
    /// The guest broke the protocol (why).
    pub(crate) garbage: Option<String>,
}

pub(crate) fn supervise(
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
        hello: None,
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
                s.hello = Some(Instant::now());
                let _ = control_go.send(());
            }
            Event::Status(
                Status::Ready | Status::Ack(_) | Status::Data { .. } | Status::Inline { .. },
            ) => {}
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

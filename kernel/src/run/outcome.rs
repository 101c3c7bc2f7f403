//! What a run came to: the reason, the exit status and the timings.

#[allow(unused_imports)]
use super::*;

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
    /// From starting UML to umlctl's init running in the guest (the
    /// kernel's own boot).
    pub kernel_ms: Option<f64>,
    /// From starting UML to the command starting (the kernel's boot, then
    /// the init's: the spec, mounts, network, the ring).
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
    /// The mode the guest's processes ran in: `ptrace`, `seccomp`, or
    /// `auto` (seccomp where the host allowed it).
    pub userspace: &'static str,
    /// Boot-time initcalls the kernel skipped (`raid6_select_algo` unless
    /// `--full-boot`; see [`crate::run::RAID6_SELECT`]).
    pub skipped_initcalls: Vec<&'static str>,
    pub timings: Timings,
    /// With `--cpu-quota`/`--memory-max`: what the guest's cgroup saw.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limits: Option<crate::cgroup::Usage>,
}

pub(crate) fn outcome(
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
        kernel_ms: s.hello.map(|t| ms(t0, t)),
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
        userspace: "ptrace",
        skipped_initcalls: vec![],
        timings,
        limits: None,
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
        | Some(Status::Ack(_))
        | Some(Status::Data { .. })
        | Some(Status::Inline { .. })
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
                // The kernel said it was going down on purpose. UML can
                // still abort on its way out (under load, a process it
                // is killing at power-off trips its ptrace loop, which
                // ends in abort()): that is the shutdown, not a panic.
                let going_down = panic.is_none() && said_it_was_going_down(&tail);
                let aborted = s.uml.and_then(|st| st.signal()) == Some(6);
                let is_panic = panic.is_some() || (aborted && !going_down);
                // The command ran, and the kernel then exited by itself
                // (poweroff, halt, reboot from inside): a shutdown.
                let shut_down = !is_panic
                    && s.started.is_some()
                    && (s.uml.and_then(|st| st.code()).is_some() || aborted);
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

/// Whether the kernel's last message is its own power-off, halt or restart
/// notice (`kernel_power_off`, `kernel_halt`, `kernel_restart`).
fn said_it_was_going_down(tail: &str) -> bool {
    tail.lines()
        .map(|l| l.trim_start_matches([' ', '|']).trim())
        .rfind(|l| !l.is_empty())
        .is_some_and(|l| {
            [
                "reboot: Power down",
                "reboot: System halted",
                "reboot: Restarting system",
            ]
            .iter()
            .any(|m| l.starts_with(m))
        })
}

#[cfg(test)]
mod tests {
    use super::said_it_was_going_down;

    #[test]
    fn only_the_last_message_counts_as_going_down() {
        assert!(said_it_was_going_down(
            "  | sysrq: Power Off\n  | reboot: Power down\n"
        ));
        assert!(said_it_was_going_down("  | reboot: System halted"));
        assert!(said_it_was_going_down("  | reboot: Restarting system"));
        assert!(!said_it_was_going_down(
            "  | reboot: Power down\n  | Kernel panic - not syncing: x"
        ));
        assert!(!said_it_was_going_down("  | Run /init as init process"));
        assert!(!said_it_was_going_down(""));
    }
}

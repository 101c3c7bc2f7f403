//! Detached guests: `start`, `ps`, `stop`, `console`, `logs`, `ctl`, `gc`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use umlctl_kernel::cmdline::parse_size;
use umlctl_kernel::detached::{self, StartSpec, StopHow};
use umlctl_kernel::instance::{self, State};
use umlctl_kernel::ShimMode;

use crate::exit;

#[derive(Args)]
#[command(
    after_help = "Examples:\n  umlctl start --name web --image web.ext4 --overlay web.cow --mem 128M\n  umlctl ctl web proc meminfo\n  umlctl stop web"
)]
pub struct StartArgs {
    /// Guest name (unique per user; default: generated).
    #[arg(long)]
    name: Option<String>,
    /// Root filesystem image (ext4); booted through a copy-on-write overlay.
    #[arg(long, value_name = "IMG")]
    image: PathBuf,
    /// Keep the guest's writes in this overlay (created if missing); default: a throwaway one.
    #[arg(long, value_name = "COW")]
    overlay: Option<PathBuf>,
    /// Guest memory, e.g. 64M.
    #[arg(long, value_name = "SIZE", default_value = "256M")]
    mem: String,
    /// UML kernel binary.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Extra disk (raw image) for the guest, as ubdb, ubdc, ... Repeatable.
    #[arg(long = "disk", value_name = "FILE")]
    disks: Vec<PathBuf>,
    /// Init to run instead of /sbin/init.
    #[arg(long, value_name = "PATH")]
    init: Option<PathBuf>,
    /// Seconds the kernel may take to come up.
    #[arg(long, value_name = "SECS", default_value = "60")]
    boot_timeout: u64,
    /// Do not preload the xstate shim.
    #[arg(long)]
    no_xstate_shim: bool,
    /// Connect the guest to this host bridge through netd (vec0, vec1, … in order). The tap
    /// lives as long as the guest; umlctl's init configures address, route and name servers
    /// before the image's init runs (which also gets them as UMLCTL_NET<i>_*). `user` instead
    /// of a bridge: user-mode networking through passt, no root and no netd (10.0.2.15/24, the
    /// outside reached as this user; --publish ports listen on this host). Repeatable.
    #[arg(long = "net", value_name = "BRIDGE|user")]
    nets: Vec<String>,
    /// netd's socket (default: $UMLCTL_NETD_SOCKET, else /run/umlctl/netd.sock).
    #[arg(long, value_name = "PATH")]
    netd_socket: Option<PathBuf>,
    /// The guest's hostname (default: its name).
    #[arg(long, value_name = "NAME")]
    hostname: Option<String>,
    /// Publish a host port to the guest, [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|udp]: connections to
    /// it from outside the host (through the uplink) reach the guest on its first --net bridge,
    /// which must be a NAT bridge; netd's policy must allow the port. With --net user first,
    /// passt listens on the port (all of this host's addresses, or HOST_IP). Repeatable.
    #[arg(long, value_name = "PORTS")]
    publish: Vec<umlctl_netd::protocol::Publish>,
    /// Return only when the guest is ready: `exec` (the exec channel answers; the default when
    /// --wait has no value), `booted` (that, the image's init started, and a systemd init
    /// finished booting: running, or degraded with a warning naming the failed units) or
    /// `tcp:PORT` (a port on its first
    /// address accepts). A guest not ready in time is stopped and removed, with its console's
    /// last lines.
    #[arg(long, value_name = "PROBE", num_args = 0..=1, default_missing_value = "exec")]
    wait: Option<detached::Ready>,
    /// How the guest's processes run: ptrace (default: the guest kernel's memory is out of their
    /// reach), seccomp (faster, UML >= 6.16; they can reach the guest kernel's memory: trusted
    /// workloads only) or auto (seccomp where the host allows it).
    #[arg(long, value_name = "MODE", default_value = "ptrace")]
    userspace: umlctl_kernel::cmdline::Userspace,
    /// CPUs for the guest: more than 1 needs a kernel with SMP (UML >= 6.19, CONFIG_SMP).
    #[arg(long, value_name = "N", default_value_t = 1)]
    cpus: u32,
    /// Seconds --wait may take.
    #[arg(long, value_name = "SECS", default_value = "120")]
    wait_timeout: u64,
    #[command(flatten)]
    jail: crate::run_cmd::JailArgs,
}

#[derive(Args)]
pub struct PsArgs {
    /// Also show stopped and dead guests.
    #[arg(long, short = 'a')]
    all: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct StopArgs {
    name: String,
    /// Seconds to wait for the guest's own shutdown before halting it.
    #[arg(long, value_name = "SECS", default_value = "30")]
    timeout: u64,
    /// Skip the graceful shutdown: halt (or kill) at once.
    #[arg(long)]
    force: bool,
    /// Remove the guest's record, console log and throwaway overlay too
    /// (otherwise they stay for `logs` and `ps --all` until `gc`).
    #[arg(long)]
    rm: bool,
}

#[derive(Args)]
#[command(after_help = "Detach with Ctrl-] (the guest keeps running).")]
pub struct ConsoleArgs {
    name: String,
}

#[derive(Args)]
#[command(
    after_help = "Exit status: CMD's own (0-255; 128+N if CMD died of signal N), or 125 umlctl failure (no such guest, not running, no free exec slot, the guest stopped), 126 CMD not executable, 127 CMD not found.\n\n\
Examples:\n  umlctl exec web -- systemctl is-system-running\n  umlctl exec -it web -- bash\n  \
tar c site | umlctl exec -i web -- tar x -C /srv"
)]
pub struct ExecArgs {
    /// The guest (with `lab exec`: the device).
    pub(crate) name: String,
    /// Pass stdin to CMD (otherwise its stdin is /dev/null).
    #[arg(long, short = 'i')]
    interactive: bool,
    /// Give CMD a pseudo-terminal (with -i: an interactive shell; Ctrl-C is a key).
    #[arg(long, short = 't')]
    tty: bool,
    /// Set an environment variable for CMD (KEY=VALUE, or KEY to pass the host's value). Repeatable.
    #[arg(long = "env", short = 'e', value_name = "KEY[=VALUE]")]
    env: Vec<String>,
    /// CMD's working directory in the guest (default /).
    #[arg(long, short = 'w', value_name = "DIR")]
    workdir: Option<String>,
    /// Run CMD as this user of the guest (name or uid; default root).
    #[arg(long, short = 'u', value_name = "USER")]
    user: Option<String>,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

#[derive(Args)]
pub struct LogsArgs {
    name: String,
    /// Keep following the log until the guest stops.
    #[arg(long, short = 'f')]
    follow: bool,
}

#[derive(Args)]
#[command(
    after_help = "Commands (UML's mconsole): version, help, halt, reboot, config DEV[=SPEC], remove DEV, \
sysrq KEY, cad, stop, go, log TEXT, proc FILE, stack PID. Exit status 1 when the guest answers with an error."
)]
pub struct DebugArgs {
    /// The guest's name (see `umlctl ps`).
    name: String,
    #[command(flatten)]
    gdb: crate::run_cmd::GdbArgs,
}

#[derive(Args)]
pub struct CtlArgs {
    name: String,
    /// The mconsole command and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
#[command(
    after_help = "A UML guest keeps every page it ever touched in its memory file on the host, and fills its RAM with page cache: an idle guest costs the host what it used at its busiest. `reclaim` drops the guest's clean page cache and passes its free pages through UML's mconsole balloon, so they leave the host; the guest keeps its whole RAM (a page comes back when the guest writes it).\n\n\
Examples:\n  umlctl reclaim web\n  umlctl reclaim --all --json"
)]
pub struct ReclaimArgs {
    /// The guests (running).
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    names: Vec<String>,
    /// Every running guest.
    #[arg(long)]
    all: bool,
    /// Keep the guests' page cache (return only memory they already freed).
    #[arg(long)]
    keep_cache: bool,
    #[arg(long)]
    json: bool,
}

/// `MiB` with one decimal.
fn mib(bytes: u64) -> String {
    #[allow(clippy::cast_precision_loss)]
    let m = bytes as f64 / (1024.0 * 1024.0);
    format!("{m:.1} MiB")
}

/// What a reclaim did, in one line (without the guest's name).
pub(crate) fn describe_reclaimed(r: &umlctl_kernel::reclaim::Reclaimed) -> String {
    let host = match (r.host_before, r.host_after) {
        (Some(b), Some(f)) => format!(
            "returned {} to the host ({} → {})",
            mib(b.saturating_sub(f)),
            mib(b),
            mib(f)
        ),
        _ => format!("lent and took back {}", mib(r.balloon_kib * 1024)),
    };
    match &r.note {
        Some(n) => format!("{host}; {n}"),
        None => host,
    }
}

/// A reclaim's `--json` object.
pub(crate) fn reclaimed_json(r: &umlctl_kernel::reclaim::Reclaimed) -> serde_json::Value {
    serde_json::json!({
        "guest": r.guest,
        "ok": true,
        "dropped_cache": r.dropped_cache,
        "balloon_kib": r.balloon_kib,
        "host_bytes_before": r.host_before,
        "host_bytes_after": r.host_after,
        "returned_bytes": r.returned(),
        "note": r.note,
    })
}

pub fn reclaim(a: ReclaimArgs) -> u8 {
    let guests: Vec<Result<instance::Guest, String>> = if a.all {
        match instance::list() {
            Ok(g) => g
                .into_iter()
                .filter(|g| g.state() == State::Running)
                .map(Ok)
                .collect(),
            Err(e) => return fail(e),
        }
    } else {
        a.names
            .iter()
            .map(|n| instance::load(n).map_err(|e| e.to_string()))
            .collect()
    };
    let o = umlctl_kernel::reclaim::Options {
        keep_cache: a.keep_cache,
    };
    // Side by side: each guest's work is in its own kernel.
    let results: Vec<Result<umlctl_kernel::reclaim::Reclaimed, String>> = std::thread::scope(|s| {
        let hs: Vec<_> = guests
            .iter()
            .map(|g| {
                s.spawn(move || match g {
                    Ok(g) => umlctl_kernel::reclaim::reclaim(g, &o).map_err(|e| e.to_string()),
                    Err(e) => Err(e.clone()),
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("reclaim panicked".into())))
            .collect()
    });
    let mut code = 0;
    if a.json {
        let v: Vec<_> = results
            .iter()
            .map(|r| match r {
                Ok(r) => reclaimed_json(r),
                Err(e) => serde_json::json!({ "ok": false, "error": e }),
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
    }
    for r in &results {
        match r {
            Ok(r) if !a.json => println!("{}: {}", r.guest, describe_reclaimed(r)),
            Ok(_) => {}
            Err(e) => {
                if !a.json {
                    eprintln!("umlctl: {e}");
                }
                code = exit::FAILURE;
            }
        }
    }
    code
}

fn fail(e: impl std::fmt::Display) -> u8 {
    eprintln!("umlctl: {e}");
    exit::FAILURE
}

pub fn start(a: StartArgs) -> u8 {
    let mut spec = StartSpec::new(a.image);
    spec.name = a.name;
    spec.overlay = a.overlay;
    spec.kernel = a.kernel;
    spec.disks = a.disks;
    spec.init = a.init;
    spec.nets = a.nets;
    spec.netd_socket = a.netd_socket;
    spec.hostname = a.hostname;
    spec.publish = a.publish;
    spec.userspace = a.userspace;
    spec.cpus = a.cpus;
    spec.jail = a.jail.opts();
    spec.boot_timeout = Duration::from_secs(a.boot_timeout.max(1));
    spec.shim = if a.no_xstate_shim {
        ShimMode::Off
    } else {
        ShimMode::Auto
    };
    spec.mem_bytes = match parse_size(&a.mem) {
        Ok(m) => m,
        Err(e) => return fail(e),
    };
    if let (Some(detached::Ready::Tcp(p)), Some(first)) = (&a.wait, spec.nets.first()) {
        if first == umlctl_kernel::run::USER_NET {
            return fail(format!(
                "--wait tcp:{p} cannot probe a --net user interface (the host cannot reach its address, and passt accepts a published port whether or not the guest listens): use --wait booted or --wait exec"
            ));
        }
    }
    let g = match detached::start(&spec) {
        Ok(g) => g,
        Err(e) => return fail(e),
    };
    if let Some(probe) = &a.wait {
        match detached::wait_ready(&g, probe, Duration::from_secs(a.wait_timeout)) {
            Ok(None) => {}
            Ok(Some(note)) => eprintln!("umlctl: warning: {note}"),
            Err(e) => {
                let _ = detached::stop(&g, Duration::from_secs(5), true, true);
                return fail(e);
            }
        }
    }
    println!("{}", g.record.name);
    0
}

fn human_secs(s: u64) -> String {
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// Bytes of a running guest's RAM the host holds (its memory file's
/// allocated size), when its UML process can be looked into.
fn host_ram(g: &instance::Guest) -> Option<u64> {
    umlctl_kernel::reclaim::memory_file_bytes(g.record.pid, g.record.mem_bytes)
}

pub fn ps(a: PsArgs) -> u8 {
    let guests = match instance::list() {
        Ok(g) => g,
        Err(e) => return fail(e),
    };
    let orphans = instance::orphaned_uml_dirs().unwrap_or_default();
    let damaged: Vec<_> = instance::damaged()
        .unwrap_or_default()
        .into_iter()
        .filter(|d| a.all || d.running.is_some())
        .collect();
    let rows: Vec<_> = guests
        .iter()
        .map(|g| (g, g.state()))
        .filter(|(_, s)| a.all || *s == State::Running)
        .collect();
    if a.json {
        let v: Vec<_> = rows
            .iter()
            .map(|(g, s)| {
                serde_json::json!({
                    "name": g.record.name,
                    "state": s,
                    "pid": g.record.pid,
                    "uptime_secs": (*s == State::Running).then(|| g.uptime()),
                    "kernel": g.record.kernel,
                    "kernel_version": g.record.kernel_version,
                    "mem_bytes": g.record.mem_bytes,
                    // The guest's RAM as the host holds it now (what it has
                    // touched; `reclaim` lowers it).
                    "host_ram_bytes": (*s == State::Running).then(|| host_ram(g)).flatten(),
                    "image": g.record.image,
                    "overlay": g.record.overlay,
                    "disks": g.record.disks,
                    // A stopped guest holds no lease.
                    "nics": if *s == State::Running { g.record.nics.clone() } else { Vec::new() },
                    "ended": g.record.ended,
                    "lab": g.record.lab,
                    // --cpu-quota/--memory-max, and what the cgroup saw.
                    "limits": (!g.record.cgroup.is_empty()).then(|| {
                        let usage = (*s == State::Running).then(|| {
                            umlctl_kernel::cgroup::Cgroup {
                                dirs: g.record.cgroup.clone(),
                            }
                            .usage()
                        });
                        serde_json::json!({
                            "cpu_quota_percent": g.record.cpu_quota,
                            "memory_max": g.record.memory_max,
                            "cgroup": g.record.cgroup,
                            "usage": usage,
                        })
                    }),
                })
            })
            .chain(damaged.iter().map(|d| {
                serde_json::json!({
                    "name": d.name,
                    "state": "damaged",
                    "pid": d.running,
                    "why": d.why,
                })
            }))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return 0;
    }
    println!(
        "{:<20} {:<8} {:>8} {:>8} {:<10} {:>6} {:>7} {:<5} NICS",
        "NAME", "STATE", "PID", "UPTIME", "KERNEL", "MEM", "ONHOST", "DISKS"
    );
    for (g, s) in &rows {
        let r = &g.record;
        println!(
            "{:<20} {:<8} {:>8} {:>8} {:<10} {:>5}M {:>7} {:<5} {}",
            r.name,
            s.to_string(),
            if *s == State::Running {
                r.pid.to_string()
            } else {
                "-".into()
            },
            if *s == State::Running {
                human_secs(g.uptime())
            } else {
                "-".into()
            },
            r.kernel_version,
            r.mem_bytes >> 20,
            (*s == State::Running)
                .then(|| host_ram(g))
                .flatten()
                .map_or("-".into(), |b| format!("{}M", b >> 20)),
            1 + r.disks.len(),
            if *s != State::Running {
                // How it ended, not leases it no longer holds.
                r.ended.as_ref().map_or("-".into(), |e| format!("({e})"))
            } else if r.nics.is_empty() {
                "-".into()
            } else {
                r.nics.join(",")
            }
        );
    }
    for d in &damaged {
        println!(
            "{:<20} {:<8} {:>8} {:>8} {}",
            d.name,
            "damaged",
            d.running.map_or("-".into(), |p| p.to_string()),
            "-",
            d.why
        );
    }
    let dead = guests
        .iter()
        .filter(|g| g.state() != State::Running)
        .count()
        + orphans.len()
        + damaged.iter().filter(|d| d.collectable()).count();
    if dead > 0 {
        eprintln!(
            "{dead} stopped or dead instance(s) left files behind{}; `umlctl gc` removes them",
            if a.all {
                ""
            } else {
                " (see `umlctl ps --all`)"
            }
        );
    }
    0
}

pub fn stop(a: StopArgs) -> u8 {
    let g = match instance::load(&a.name) {
        Ok(g) => g,
        Err(e) => return fail(e),
    };
    match detached::stop(&g, Duration::from_secs(a.timeout), a.force, a.rm) {
        Ok(how) => {
            let how = match how {
                StopHow::AlreadyDown => "was not running; cleaned up",
                h => h.describe(),
            };
            println!("{}: {how}", a.name);
            0
        }
        Err(e) => fail(e),
    }
}

pub fn exec(a: ExecArgs) -> u8 {
    let mut env = Vec::new();
    for kv in a.env {
        let (k, v) = match kv.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => match std::env::var(&kv) {
                Ok(v) => (kv, v),
                Err(_) => continue,
            },
        };
        if k.is_empty() || k.contains('\0') || v.contains('\0') {
            return fail(format!("--env {k:?}: invalid name or value"));
        }
        env.push((k, v));
    }
    let spec = umlctl_kernel::execproto::ExecSpec {
        argv: a.command,
        env,
        cwd: a.workdir,
        user: a.user,
        tty: a.tty,
        rows: 0,
        cols: 0,
        term: std::env::var("TERM").ok(),
        stdin: a.interactive,
    };
    match umlctl_kernel::exec::exec(&a.name, &spec) {
        Ok(code) => u8::try_from(code.clamp(0, 255)).unwrap_or(u8::MAX),
        Err(e) => fail(e),
    }
}

pub fn debug(a: DebugArgs) -> u8 {
    debug_named(a.name, &a.gdb)
}

/// gdb on guest `name`'s kernel (`debug`, `lab debug`).
pub fn debug_named(name: String, gdb: &crate::run_cmd::GdbArgs) -> u8 {
    let spec = match gdb.spec(true, "") {
        Ok(Some(s)) => s,
        Ok(None) => return fail("no debugging session asked for"),
        Err(e) => return fail(e),
    };
    match instance::load(&name).and_then(|g| detached::debug(&g, &spec)) {
        Ok(st) => match st.code() {
            Some(c) => u8::try_from(c.clamp(0, 255)).unwrap_or(u8::MAX),
            None => exit::FAILURE,
        },
        Err(e) => fail(e),
    }
}

pub fn console(a: ConsoleArgs) -> u8 {
    console_named(a.name)
}

/// Attach to guest `name`'s console.
pub fn console_named(name: String) -> u8 {
    let r = instance::load(&name).and_then(|g| {
        eprintln!("attached to {name} (detach with Ctrl-])");
        detached::attach(&g)
    });
    match r {
        Ok(()) => {
            eprintln!("\r\ndetached from {name}");
            0
        }
        Err(e) => fail(e),
    }
}

pub fn logs(a: LogsArgs) -> u8 {
    let r = instance::load(&a.name)
        .and_then(|g| detached::logs(&g, a.follow, &mut std::io::stdout().lock()));
    match r {
        Ok(()) => 0,
        Err(e) => fail(e),
    }
}

pub fn ctl(a: CtlArgs) -> u8 {
    let command = a.command.join(" ");
    let g = match instance::load(&a.name) {
        Ok(g) => g,
        Err(e) => return fail(e),
    };
    let reply = detached::ctl(&g, &command);
    match reply {
        Ok(r) => {
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({ "ok": r.ok(), "err": r.err, "reply": r.text })
                );
            } else if r.ok() {
                if !r.text.is_empty() {
                    println!("{}", r.text.trim_end_matches('\n'));
                }
            } else {
                eprintln!(
                    "umlctl: guest {} answered with an error ({}): {}",
                    a.name,
                    r.err,
                    r.text.trim_end()
                );
            }
            if r.ok() {
                0
            } else {
                1
            }
        }
        Err(e) => fail(e),
    }
}

pub fn gc() -> u8 {
    let mut removed = 0;
    let mut failed = false;
    match instance::list() {
        Ok(guests) => {
            for g in guests.iter().filter(|g| g.state() != State::Running) {
                let state = g.state();
                match g.remove() {
                    Ok(()) => {
                        println!("removed {} ({state})", g.record.name);
                        removed += 1;
                    }
                    Err(e) => {
                        failed = true;
                        eprintln!("umlctl: {e}");
                    }
                }
            }
        }
        Err(e) => return fail(e),
    }
    for d in instance::damaged().unwrap_or_default() {
        if let Some(pid) = d.running {
            eprintln!(
                "umlctl: kept {}: its record is unreadable ({}), but its UML (pid {pid}) is running; stop it with `kill {pid}`, then run gc again",
                d.name, d.why
            );
            continue;
        }
        if d.fresh {
            continue;
        }
        match d.remove() {
            Ok(()) => {
                println!("removed {} (damaged record: {})", d.name, d.why);
                removed += 1;
            }
            Err(e) => {
                failed = true;
                eprintln!("umlctl: {e}");
            }
        }
    }
    for d in instance::orphaned_uml_dirs().unwrap_or_default() {
        match std::fs::remove_dir_all(&d) {
            Ok(()) => {
                println!("removed UML instance directory {}", d.display());
                removed += 1;
            }
            Err(e) => {
                failed = true;
                eprintln!("umlctl: remove {}: {e}", d.display());
            }
        }
    }
    if removed == 0 && !failed {
        println!("nothing to collect");
    }
    if failed {
        exit::FAILURE
    } else {
        0
    }
}

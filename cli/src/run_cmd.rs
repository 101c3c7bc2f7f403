//! `umlctl run`.

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use umlctl_kernel::cmdline::parse_size;
use umlctl_kernel::run::JailOpts;
use umlctl_kernel::{GuestSpec, ShimMode, TtyMode};

use crate::exit;

#[derive(Clone, Copy, ValueEnum)]
pub enum TtyArg {
    /// A terminal when stdin and stdout are terminals.
    Auto,
    /// Always a terminal (stdin must be one).
    Always,
    /// Never: stdio are byte-exact pipes.
    Never,
}

#[derive(Args)]
#[command(
    after_help = "Exit status: CMD's own (0-255; 128+N if CMD died of signal N), or 124 timeout, \
125 umlctl/host/kernel failure (guest panic included), 126 CMD not executable, 127 CMD not found.\n\n\
Examples:\n  umlctl run -- uname -r\n  echo hi | umlctl run -- cat\n  umlctl run --image root.ext4 -- sh -c 'cat /etc/os-release'"
)]
pub struct RunArgs {
    /// UML kernel binary (default: $UMLCTL_KERNEL, the kernel cache, then linux.uml / linux on PATH).
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Boot this ext4 image as root, through a throwaway copy-on-write overlay (the image is never written).
    #[arg(long, value_name = "IMG")]
    image: Option<PathBuf>,
    /// With --image: keep the guest's writes in this UML COW overlay (created if missing, reused
    /// across runs); without it they are thrown away.
    #[arg(long, value_name = "COW", requires = "image")]
    overlay: Option<PathBuf>,
    /// Guest memory, e.g. 256M or 1G.
    #[arg(long, value_name = "SIZE", default_value = "256M")]
    mem: String,
    /// Set an environment variable for CMD (KEY=VALUE, or KEY to pass the host's value). Repeatable.
    #[arg(long = "env", short = 'e', value_name = "KEY[=VALUE]")]
    env: Vec<OsString>,
    /// CMD's working directory (default: the current directory; / with --image).
    #[arg(long, short = 'w', value_name = "DIR")]
    workdir: Option<PathBuf>,
    /// How CMD's processes run: ptrace (default: the guest kernel's memory is out of their reach),
    /// seccomp (faster, UML >= 6.16; they can reach the guest kernel's memory: for trusted work
    /// such as a CI job's own code) or auto (seccomp where the host allows it).
    #[arg(long, value_name = "MODE", default_value = "ptrace")]
    userspace: umlctl_kernel::cmdline::Userspace,
    /// Keep the boot-time RAID6 speed test that run skips on kernels that have it (Debian's
    /// linux.uml: about a second). Only needed to build btrfs or md RAID6 arrays in the guest.
    #[arg(long)]
    full_boot: bool,
    /// CPUs for the guest: more than 1 needs a kernel with SMP (UML >= 6.19, CONFIG_SMP).
    #[arg(long, value_name = "N", default_value_t = 1)]
    cpus: u32,
    /// Stop the guest and exit 124 after this many seconds.
    #[arg(long, value_name = "SECS")]
    timeout: Option<f64>,
    /// Write the guest's kernel messages to FILE (by default they are kept only for error reports).
    #[arg(long, value_name = "FILE")]
    console_log: Option<PathBuf>,
    /// Do not preload the xstate shim, even when the host's XSAVE area is too large for the kernel.
    #[arg(long)]
    no_xstate_shim: bool,
    /// Give CMD an interactive terminal.
    #[arg(long, value_enum, default_value = "auto")]
    tty: TtyArg,
    /// Connect the guest to this host bridge through netd (vec0, vec1, … in order; the first
    /// one's gateway is the default route). `user` instead of a bridge: user-mode networking
    /// through passt, no root and no netd (10.0.2.15/24; the outside is reached as this user).
    /// Repeatable.
    #[arg(long = "net", value_name = "BRIDGE|user")]
    nets: Vec<String>,
    /// netd's socket (default: $UMLCTL_NETD_SOCKET, else /run/umlctl/netd.sock).
    #[arg(long, value_name = "PATH")]
    netd_socket: Option<PathBuf>,
    /// Publish a host port to the guest while CMD runs, [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|udp],
    /// on its first --net: with `user`, passt listens on the port; with a NAT bridge, netd
    /// forwards it (within its policy). Repeatable.
    #[arg(long, value_name = "PORTS")]
    publish: Vec<umlctl_netd::protocol::Publish>,
    #[command(flatten)]
    jail: JailArgs,
    /// Run the guest kernel under gdb, which gets the terminal: UML stops at the kernel's first
    /// instruction with UML's own signals passed through, the kernel's lx- helpers loaded (when
    /// built with `kernel build --debug`) and the --break breakpoints set; `continue` boots it.
    /// CMD's output still goes to stdout and stderr; CMD reads no input from the terminal.
    #[arg(long, conflicts_with = "gdb_batch")]
    gdb: bool,
    #[command(flatten)]
    debug: GdbArgs,
    /// Print a JSON result object (exit_code, reason, timings) as the last line of stderr.
    #[arg(long)]
    json: bool,
    /// Show the guest's kernel messages on stderr.
    #[arg(long, short = 'v')]
    verbose: bool,
    /// The command to run in the guest, and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    command: Vec<OsString>,
}

/// gdb scripts and breakpoints: shared by `run` and `debug`.
#[derive(Args, Clone)]
pub struct GdbArgs {
    /// Run this gdb script without a terminal (for CI): gdb attaches as with --gdb, runs FILE,
    /// prints its output on stderr, and detaches when FILE ends (the guest runs on).
    #[arg(long, value_name = "FILE")]
    gdb_batch: Option<PathBuf>,
    /// A breakpoint (function or any gdb location), set before FILE or the prompt. Repeatable.
    #[arg(long = "break", value_name = "SYMBOL")]
    breaks: Vec<String>,
}

impl GdbArgs {
    /// The session asked for; `interactive` is `--gdb`.
    pub fn spec(
        &self,
        interactive: bool,
        what: &str,
    ) -> Result<Option<umlctl_kernel::gdb::GdbSpec>, umlctl_kernel::Error> {
        if !interactive && self.gdb_batch.is_none() {
            if self.breaks.is_empty() {
                return Ok(None);
            }
            return Err(umlctl_kernel::Error::Usage(format!(
                "--break needs {what} or --gdb-batch FILE"
            )));
        }
        Ok(Some(umlctl_kernel::gdb::GdbSpec {
            breaks: self.breaks.clone(),
            batch: self.gdb_batch.clone(),
        }))
    }
}

/// How UML is confined: shared by `run`, `start` and `kernel test`.
#[derive(Args, Clone, Copy)]
pub struct JailArgs {
    /// Run UML without its jail. UML then sees every host file you can, and a guest that breaks
    /// out of its kernel acts as you on this host. Only for hosts that cannot build the jail
    /// (see `umlctl doctor`).
    #[arg(long)]
    no_jail: bool,
    /// When umlctl runs as root: the uid (and gid) UML runs as in its jail (default: 65534,
    /// "nobody", for image guests; 0 for `run` on the host's root, whose point is your files).
    /// Uid 0 keeps root's identity without any capability.
    #[arg(long, value_name = "UID", conflicts_with = "no_jail")]
    jail_uid: Option<u32>,
    /// CPU time the guest may use, in percent of one host CPU (50% = half a CPU, 200% = two),
    /// enforced by a cgroup of its own (root, or a cgroup delegated to you).
    #[arg(long, value_name = "PERCENT", value_parser = umlctl_kernel::cgroup::parse_cpu_quota)]
    cpu_quota: Option<u32>,
    /// Host memory the guest may use in all (its RAM, UML itself, no swap), e.g. 600M; at least
    /// --mem plus 32M. Enforced by a cgroup of its own.
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
    memory_max: Option<u64>,
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

impl JailArgs {
    pub fn opts(&self) -> JailOpts {
        JailOpts {
            enabled: !self.no_jail,
            uid: self.jail_uid,
            limits: umlctl_kernel::cgroup::Limits {
                cpu_percent: self.cpu_quota,
                memory_max: self.memory_max,
            },
        }
    }
}

fn to_spec(a: RunArgs) -> Result<(GuestSpec, bool), umlctl_kernel::Error> {
    let mut spec = GuestSpec::new(a.command);
    spec.nets = a.nets;
    spec.netd_socket = a.netd_socket;
    spec.publish = a.publish;
    spec.jail = a.jail.opts();
    spec.gdb = a.debug.spec(a.gdb, "--gdb")?;
    spec.kernel = a.kernel;
    spec.image = a.image;
    spec.overlay = a.overlay;
    spec.mem_bytes = parse_size(&a.mem)?;
    spec.workdir = a.workdir;
    spec.userspace = a.userspace;
    spec.full_boot = a.full_boot;
    spec.cpus = a.cpus;
    spec.console_log = a.console_log;
    spec.verbose = a.verbose;
    spec.shim = match (
        a.no_xstate_shim,
        std::env::var("UMLCTL_XSTATE_SHIM").as_deref(),
    ) {
        (true, _) | (false, Ok("never")) => ShimMode::Off,
        // A testing knob: preload the shim even where the host does not need it.
        (false, Ok("always")) => ShimMode::Always,
        _ => ShimMode::Auto,
    };
    spec.tty = match a.tty {
        TtyArg::Auto => TtyMode::Auto,
        TtyArg::Always => TtyMode::Always,
        TtyArg::Never => TtyMode::Never,
    };
    spec.timeout = match a.timeout {
        None => None,
        Some(t) if t.is_finite() && t > 0.0 && t < 1e9 => Some(Duration::from_secs_f64(t)),
        Some(t) => {
            return Err(umlctl_kernel::Error::Usage(format!(
                "--timeout {t}: expected a positive number of seconds"
            )))
        }
    };
    for kv in a.env {
        let b = kv.as_bytes();
        let (k, v) = match b.iter().position(|&c| c == b'=') {
            Some(i) => (
                OsString::from(std::ffi::OsStr::from_bytes(&b[..i])),
                Some(OsString::from(std::ffi::OsStr::from_bytes(&b[i + 1..]))),
            ),
            None => (kv.clone(), None),
        };
        spec.env.push((k, v));
    }
    Ok((spec, a.json))
}

pub fn main(a: RunArgs) -> u8 {
    let json = a.json;
    let result = to_spec(a).and_then(|(spec, _)| umlctl_kernel::run(&spec));
    match result {
        Ok(o) => {
            if let Some(m) = &o.message {
                // The command's own "not found" message reads like a shell's.
                eprintln!("umlctl: {m}");
            }
            if json {
                let mut err = std::io::stderr().lock();
                let _ = writeln!(err, "{}", serde_json::to_string(&o).unwrap_or_default());
            }
            u8::try_from(o.exit_code.clamp(0, 255)).unwrap_or(u8::MAX)
        }
        Err(e) => {
            eprintln!("umlctl: {e}");
            if json {
                let v = serde_json::json!({
                    "exit_code": exit::FAILURE,
                    "reason": e.kind(),
                    "message": e.to_string(),
                });
                eprintln!("{v}");
            }
            exit::FAILURE
        }
    }
}

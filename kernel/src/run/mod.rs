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
use std::fs::OpenOptions;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::mem::ManuallyDrop;
use std::os::fd::AsFd;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::sys::signal::{kill, Signal};
use nix::unistd::{pipe2, Pid};

use crate::cmdline::{BootPlan, BootRoot, Chan, Disk};
use crate::error::{errno, Error, Result};
use crate::flow::Window;
use crate::initroot;
use crate::jail::{Bind, JailRoot, JailSpec, Launch, Spawned};
use crate::locate::{locate, Located};
use crate::paths;
use crate::protocol::{ring, Control, InitSpec, RootSpec, Status, TtySpec};
use crate::protocol::{CONTROL_LINE, STATUS_LINE, STDIN_LINE};
use crate::xstate::{self, HostXstate};

mod launch;
mod outcome;
pub(crate) mod relay;
mod supervise;

pub use launch::*;
pub use outcome::*;
use relay::*;
use supervise::*;

/// Paths the guest sees as tmpfs when its root is the host filesystem.
pub const HOST_ROOT_TMPFS: &[&str] = &["/tmp", "/var/tmp", "/run"];

/// Default guest memory.
pub const DEFAULT_MEM: u64 = 256 << 20;

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
    /// `--userspace`: the mode the guest's processes run in.
    pub userspace: crate::cmdline::Userspace,
    /// `--full-boot`: keep the boot-time RAID6 speed test (see
    /// [`RAID6_SELECT`]).
    pub full_boot: bool,
    /// `--cpus`: the guest's CPUs (more than one on SMP kernels only).
    pub cpus: u32,
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
    /// `--publish`: host ports for the guest on its first interface.
    pub publish: Vec<umlctl_netd::protocol::Publish>,
    /// How UML is confined.
    pub jail: JailOpts,
    /// `--gdb` / `--gdb-batch`: run the guest kernel under the host's gdb.
    pub gdb: Option<crate::gdb::GdbSpec>,
}

/// Whether and how UML runs jailed ([`crate::jail`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JailOpts {
    /// `false` (`--no-jail`): UML runs as umlctl's own process, seeing what
    /// umlctl sees.
    pub enabled: bool,
    /// `--jail-uid`: when umlctl is root, the uid UML runs as.
    pub uid: Option<u32>,
    /// `--cpu-quota` and `--memory-max`: a cgroup for the guest (with or
    /// without the jail).
    pub limits: crate::cgroup::Limits,
}

impl Default for JailOpts {
    fn default() -> Self {
        JailOpts {
            enabled: true,
            uid: None,
            limits: crate::cgroup::Limits::default(),
        }
    }
}

impl GuestSpec {
    /// Check the spec on its own (no host state): everything a caller can
    /// get wrong is reported here, with the option named, before anything
    /// is prepared. [`run`] calls it first.
    pub fn validate(&self) -> Result<()> {
        let usage = |m: String| Err(Error::Usage(m));
        if self.command.is_empty() {
            return usage("no command given: umlctl run [OPTIONS] -- CMD [ARGS...]".into());
        }
        if self.command.iter().any(|a| a.as_bytes().contains(&0)) {
            return usage("command arguments cannot contain NUL bytes".into());
        }
        if self.overlay.is_some() && self.image.is_none() {
            return usage("--overlay needs --image (it is an overlay over that image)".into());
        }
        if let Some(w) = &self.workdir {
            if !w.is_absolute() {
                return usage(format!(
                    "--workdir {} must be an absolute path",
                    w.display()
                ));
            }
            if w.as_os_str().as_bytes().contains(&0) {
                return usage("--workdir cannot contain a NUL byte".into());
            }
        }
        if self.timeout.is_some_and(|t| t.is_zero()) {
            return usage("--timeout must be more than 0 seconds".into());
        }
        if self.mem_bytes < 16 << 20 {
            return usage(format!(
                "--mem: guest memory of {} bytes is too small: UML needs at least 16M",
                self.mem_bytes
            ));
        }
        for (k, v) in &self.env {
            let kb = k.as_bytes();
            if kb.is_empty() || kb.contains(&b'=') || kb.contains(&0) {
                return usage(format!("invalid --env name {k:?}"));
            }
            if v.as_ref().is_some_and(|v| v.as_bytes().contains(&0)) {
                return usage(format!("--env {k:?}: a value cannot contain a NUL byte"));
            }
        }
        self.jail.limits.validate(self.mem_bytes)?;
        if let Some(b) = self.nets.iter().find(|b| b.is_empty()) {
            return usage(format!("--net {b:?}: name a bridge (see `umlctl net ls`)"));
        }
        if let Some(g) = &self.gdb {
            if !self.jail.enabled {
                return usage(
                    "--gdb and --gdb-batch need the jail (it holds UML just before exec for gdb to attach); drop --no-jail, or attach to a running guest with `umlctl start --no-jail` and `umlctl debug NAME`".into(),
                );
            }
            if self.tty == TtyMode::Always {
                return usage(
                    "--tty always and --gdb both want the terminal; under gdb the command's output goes through pipes".into(),
                );
            }
            g.validate()?;
        }
        Ok(())
    }

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
            publish: Vec::new(),
            jail: JailOpts::default(),
            gdb: None,
            userspace: crate::cmdline::Userspace::Ptrace,
            full_boot: false,
            cpus: 1,
        }
    }
}

fn is_tty(fd: RawFd) -> bool {
    nix::unistd::isatty(fd).unwrap_or(false)
}

pub(crate) fn winsize(fd: RawFd) -> Option<(u16, u16)> {
    // SAFETY: TIOCGWINSZ writes a winsize into `ws`.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        // A terminal without a size (0×0, as a fresh pty has) is passed on
        // as it is: the guest's `stty size` says what the host's would.
        (libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) == 0).then_some((ws.ws_row, ws.ws_col))
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
        let seed = t ^ (u128::from(std::process::id()) << 64);
        for (i, x) in b.iter_mut().enumerate() {
            *x = seed.to_le_bytes()[i % 16];
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
        // Names were checked by GuestSpec::validate.
        let kb = k.as_bytes();
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

/// The guest init's plan: what to run, with what environment and working
/// directory, on which root, with which terminal and interfaces. Pure: the
/// host facts (environment, terminal size, network lease) come in.
pub(crate) fn init_plan(
    spec: &GuestSpec,
    env: Vec<Vec<u8>>,
    workdir: &Path,
    host_root: bool,
    tty: Option<TtySpec>,
    nics: &[crate::protocol::NicSpec],
) -> InitSpec {
    // The ring disk comes after the guest's other disks: the image's
    // overlay and the init disk, or none.
    let ring = if host_root { "/dev/ubda" } else { "/dev/ubdc" };
    let root = if host_root {
        // A working directory under one of the guest's private tmpfs
        // mounts stays visible: it is bound back over it.
        let binds = HOST_ROOT_TMPFS
            .iter()
            .filter(|t| workdir.starts_with(t) && workdir != Path::new(t))
            .map(|_| workdir.to_string_lossy().into_owned())
            .collect();
        RootSpec::Host {
            tmpfs: HOST_ROOT_TMPFS.iter().map(|s| s.to_string()).collect(),
            binds,
        }
    } else {
        RootSpec::Image {
            device: "/dev/ubda".into(),
        }
    };
    InitSpec {
        argv: spec.command.iter().map(|a| a.as_bytes().to_vec()).collect(),
        env,
        workdir: workdir.as_os_str().as_bytes().to_vec(),
        root,
        hostname: "uml".into(),
        tty,
        nics: nics.to_vec(),
        ring: ring.into(),
    }
}

/// What the boot plan needs from the host and the run directory.
pub(crate) struct BootFacts {
    pub(crate) umid: String,
    pub(crate) rundir: PathBuf,
    pub(crate) root: BootRoot,
    pub(crate) init: PathBuf,
    pub(crate) disks: Vec<Disk>,
    pub(crate) interactive: bool,
    pub(crate) nics: Vec<crate::cmdline::Nic>,
    /// `$UMLCTL_TRACE`: the init reports its timings.
    pub(crate) trace: bool,
    /// UML's `seccomp=`, for kernels that have it.
    pub(crate) seccomp: Option<&'static str>,
    /// Initcalls to skip.
    pub(crate) skip_initcalls: Vec<&'static str>,
    /// UML's `ncpus=`.
    pub(crate) ncpus: Option<u32>,
}

/// UML's boot plan for `run`: memory, disks (the ring last), root, init,
/// and the serial lines on their fixed descriptors (3 the terminal, both
/// ways, in tty mode; 6 control, 7 status). Pure.
pub(crate) fn boot_plan(spec: &GuestSpec, f: BootFacts) -> BootPlan {
    let mut lines = vec![
        (CONTROL_LINE, Chan::Fd(6), Chan::Null),
        (STATUS_LINE, Chan::Null, Chan::Fd(7)),
    ];
    if f.interactive {
        lines.insert(0, (STDIN_LINE, Chan::Fd(3), Chan::Fd(3)));
    }
    BootPlan {
        mem_bytes: spec.mem_bytes,
        umid: f.umid,
        uml_dir: f.rundir,
        root: f.root,
        init: Some(f.init),
        notify: None,
        disks: f.disks,
        fixed_disks: Vec::new(),
        console_line: 0,
        console: (Chan::Fd(0), Chan::Fd(1)),
        lines,
        init_env: if f.trace {
            vec![("UMLCTL_TRACE".into(), "1".into())]
        } else {
            vec![]
        },
        nics: f.nics,
        seccomp: f.seccomp,
        skip_initcalls: f.skip_initcalls,
        ncpus: f.ncpus,
        hostfs: None,
    }
}

/// The initcall that times the kernel's RAID6 algorithms at boot, when the
/// kernel is built with `CONFIG_RAID6_PQ_BENCHMARK` (Debian's `linux.uml`
/// is: RAID6 is built in for btrfs). It takes most of a second of such a
/// kernel's boot, so `run` skips it: nothing a `run` guest is given uses
/// RAID6 (its root is the host's, read-only, or an ext4 image; it gets no
/// other disks). The algorithms are then never chosen, so a guest that
/// builds a btrfs RAID6 (or md RAID6) array on its own, on loop devices,
/// would crash its kernel; `--full-boot` keeps the test for that.
pub const RAID6_SELECT: &str = "raid6_select_algo";

/// Boot a guest, run `spec.command` in it, and report how it ended.
///
/// The command's stdin, stdout and stderr are this process's own. Errors
/// before the guest starts (no kernel, bad options, host problems) are
/// returned as `Err`; everything after is a [`RunOutcome`].
pub fn run(spec: &GuestSpec) -> Result<RunOutcome> {
    spec.validate()?;
    // ubd: the command's stdio goes through the ring disk.
    let mut need = vec!["serial-lines", "devtmpfs", "exitcode", "tmpfs", "ubd"];
    if spec.image.is_some() {
        need.push("ext4");
    } else {
        need.push("hostfs");
    }
    if !spec.nets.is_empty() {
        need.push("vector-net");
    }
    if let Some(g) = &spec.gdb {
        crate::gdb::find_gdb()?;
        if g.interactive() {
            crate::gdb::check_terminal()?;
        }
    }
    let prep = prepare_kernel(spec.kernel.as_deref(), &need, spec.shim)?;
    if spec.gdb.is_some() && !prep.located.info.symbols {
        eprintln!(
            "umlctl: warning: {} has no symbols (a stripped kernel, like Debian's): gdb shows addresses only and --break cannot find functions; `umlctl kernel build --debug` makes one with symbols, source lines and the lx- helpers",
            prep.located.info.path.display()
        );
    }
    if let Some(g) = &spec.gdb {
        crate::gdb::warn_unknown_functions(&prep.located.info.path, &g.breaks);
    }
    let (seccomp, ncpus) = prep.processes(spec.userspace, spec.cpus)?;
    let skip_initcalls = if prep.located.info.has("raid6-benchmark") && !spec.full_boot {
        vec![RAID6_SELECT]
    } else {
        vec![]
    };
    // Held until the guest is gone: the taps live as long as this connection.
    check_nics(
        &prep.located.info,
        spec.nets.iter().filter(|b| *b != USER_NET).count(),
    )?;
    let network = attach_network(&spec.nets, spec.netd_socket.as_deref(), None, &spec.publish)?;
    let info = &prep.located.info;
    let use_shim = prep.shim.is_some();

    // Terminal or pipes (under gdb, gdb has the terminal).
    let interactive = match spec.tty {
        _ if spec.gdb.is_some() => false,
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
    let host_root = matches!(root, Root::Host { .. });
    let init_spec = init_plan(spec, env, &workdir, host_root, tty_spec, &network.specs);

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

    let (ring_path, ring_file) = create_ring(&rundir)?;
    let (boot_root, init_path, mut disks) = match &root {
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

    disks.push(Disk {
        file: ring_path,
        backing: None,
        read_only: false,
    });

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

    // The UML process's descriptors: 0 console in, 1+2 kernel log, 3 the
    // terminal (tty mode), 6 control line, 7 status line.
    let (con_in_r, con_in_w) = cloexec_pipe()?;
    let (log_r, log_w) = cloexec_pipe()?;
    let (ctl_r, ctl_w) = cloexec_pipe()?;
    let (st_r, st_w) = cloexec_pipe()?;
    let terminal: Option<OwnedFd> = if interactive {
        // F_DUPFD_CLOEXEC at 3 or above.
        Some(
            io::stdin()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| Error::sys("dup stdin", e))?,
        )
    } else {
        None
    };
    let plan = boot_plan(
        spec,
        BootFacts {
            umid: umid.clone(),
            rundir: rundir.clone(),
            root: boot_root,
            init: init_path,
            disks,
            interactive,
            nics: network.nics.clone(),
            trace: std::env::var_os("UMLCTL_TRACE").is_some(),
            seccomp,
            skip_initcalls: skip_initcalls.clone(),
            ncpus,
        },
    );
    let args = plan.to_args()?;

    let term_guard = if interactive {
        crate::terminal::TermGuard::save(0)
    } else {
        None
    };

    // We adopt UML's helpers if UML dies, so that we can kill them.
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) has no memory effects.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };

    // 0 console in, 1+2 kernel log, 3 and 6..=7 the lines, then the
    // fd-mode taps from FIRST_TAP_FD (= 8).
    let mut fds: Vec<(RawFd, i32)> = vec![
        (con_in_r.as_raw_fd(), 0),
        (log_w.as_raw_fd(), 1),
        (log_w.as_raw_fd(), 2),
        (ctl_r.as_raw_fd(), 6),
        (st_w.as_raw_fd(), 7),
    ];
    if let Some(t) = &terminal {
        fds.push((t.as_raw_fd(), 3));
    }
    for (i, f) in network.fds.iter().enumerate() {
        fds.push((f.as_raw_fd(), FIRST_TAP_FD + crate::num::small_i32(i)));
    }
    let cgroup = crate::cgroup::for_guest(&crate::cgroup::run_name(), &spec.jail.limits)?;
    network.join(cgroup.as_ref())?;
    let uml_launch = Launch {
        program: info.path.clone(),
        args,
        env: prep.uml_env(jail.is_some(), spec.verbose)?,
        cwd: rundir.clone(),
        fds,
        // Under gdb, UML stays out of the terminal's signals (gdb has them).
        new_session: spec.gdb.is_some(),
        die_with_parent: true,
        stop_before_exec: spec.gdb.is_some(),
        cgroup: cgroup.as_ref().map(|g| g.0.clone()),
    };

    let (tx, rx) = mpsc::channel::<Event>();
    let signals = install_signals(interactive, tx.clone())?;

    let reaper = crate::reaper::Reaper::spawn(&initroot::current_exe()?, &rundir)?;
    let t0 = Instant::now();
    let mut child = launch(jail.as_ref(), &uml_launch, true)?;
    reaper.watch(child.kill_target().as_raw().unsigned_abs());
    let debugger = match &spec.gdb {
        Some(g) if child.stopped => {
            let target = crate::gdb::Target {
                pid: child.pid,
                kernel: info.path.clone(),
                before_exec: true,
                label: "the guest".into(),
            };
            let mut release = || {
                let _ = child.release();
            };
            match crate::gdb::start(&target, g, &mut release) {
                Ok(s) => Some(s),
                Err(e) => {
                    let jail = child.kill_target();
                    let _ = nix::sys::signal::kill(jail, nix::sys::signal::Signal::SIGKILL);
                    let _ = child.wait();
                    return Err(e);
                }
            }
        }
        _ => None,
    };
    // With gdb on the terminal, the command reads no input from it.
    let stdin_source = match &spec.gdb {
        Some(g) if g.interactive() && is_tty(0) => Some(
            File::open("/dev/null").map_err(|e| Error::io("open", Path::new("/dev/null"), e))?,
        ),
        _ => None,
    };
    // Close our copies of the UML ends so that EOFs arrive when UML exits.
    drop((con_in_r, log_w, terminal, ctl_r, st_w));
    let uml_pid = child.pid;
    let jail_pid = child.kill_target();

    let tail = Arc::new(Mutex::new(LogTail::default()));
    let log_thread = read_log(File::from(log_r), console_log, spec.verbose, tail.clone());
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
    // The streams through the ring: stdout unless the terminal has it,
    // stderr unless it shares the terminal, stdin unless it is the terminal.
    let mut outputs = Vec::new();
    let mut streams: [Option<SyncSender<Chunk>>; 3] = [None, None, None];
    for (stream, fd, relayed) in [
        (ring::STDOUT, 1, !interactive),
        (ring::STDERR, 2, !stderr_on_tty),
    ] {
        if relayed {
            let (data, h) = copy_out(ring_file.clone(), stream, fd, control.clone());
            streams[usize::from(stream)] = Some(data);
            outputs.push(h);
        }
    }
    let credits = Arc::new(Window::new(ring::SLOTS));
    read_status(File::from(st_r), tx.clone(), credits.clone(), streams);
    let mut stdin_go = None;
    if !interactive {
        let (go_tx, go_rx) = mpsc::channel();
        copy_in(
            ring_file.clone(),
            stdin_source,
            go_rx,
            control.clone(),
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
    // gdb leaves when its user quits or its script ends; it is umlctl's
    // child, so it would be killed below.
    if let Some(d) = debugger {
        match d.wait() {
            Ok(st) if !st.success() => eprintln!(
                "umlctl: gdb exited with {st} (a command of its script failed? see its messages above)"
            ),
            Err(e) => eprintln!("umlctl: {e}"),
            Ok(_) => {}
        }
    }

    kill_descendants();
    reaper.dismiss();
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
    let mut o = outcome(
        sup,
        &prep.located,
        use_shim,
        prep.needs_shim && !use_shim,
        prep.host_xstate,
        tail,
        t0,
    );
    o.skipped_initcalls = skip_initcalls;
    if let Some(cg) = &cgroup {
        let usage = cg.0.usage();
        if usage.oom_kills.unwrap_or(0) > 0
            && matches!(o.reason, Reason::BootFailed | Reason::Panic)
        {
            let max = spec.jail.limits.memory_max.unwrap_or(0);
            o.message = Some(format!(
                "the guest went over --memory-max ({} MiB): the host's OOM killer ended UML; raise --memory-max{}",
                max >> 20,
                o.message.as_deref().map(|m| format!("\n{m}")).unwrap_or_default()
            ));
        }
        o.limits = Some(usage);
    }
    o.userspace = match seccomp {
        Some("on") => "seccomp",
        Some("auto") => "auto",
        _ => "ptrace",
    };
    Ok(o)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_names_what_is_wrong_before_anything_is_prepared() {
        let ok = GuestSpec::new(vec!["true".into()]);
        ok.validate().unwrap();
        type Breaker = Box<dyn Fn(&mut GuestSpec)>;
        let cases: Vec<(Breaker, &str)> = vec![
            (Box::new(|s| s.command.clear()), "no command given"),
            (Box::new(|s| s.command.push("a\0b".into())), "NUL"),
            (
                Box::new(|s| s.overlay = Some("o.cow".into())),
                "--overlay needs --image",
            ),
            (
                Box::new(|s| s.workdir = Some("rel".into())),
                "must be an absolute path",
            ),
            (Box::new(|s| s.timeout = Some(Duration::ZERO)), "--timeout"),
            (Box::new(|s| s.mem_bytes = 1 << 20), "at least 16M"),
            (
                Box::new(|s| s.env.push(("A=B".into(), None))),
                "invalid --env name",
            ),
            (
                Box::new(|s| s.env.push(("".into(), None))),
                "invalid --env name",
            ),
            (
                Box::new(|s| s.env.push(("A".into(), Some("x\0y".into())))),
                "NUL byte",
            ),
            (Box::new(|s| s.nets.push(String::new())), "name a bridge"),
        ];
        for (break_it, want) in cases {
            let mut s = ok.clone();
            break_it(&mut s);
            let e = s.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} lacks {want:?}");
        }
    }

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
        assert!(s.validate().is_err());
    }

    /// The plans are computed without booting: what the init and UML are
    /// told for a host-root run under /tmp, an image run, and a terminal.
    #[test]
    fn the_init_and_boot_plans_follow_the_spec() {
        let mut spec = GuestSpec::new(vec!["make".into(), "check".into()]);
        spec.mem_bytes = 512 << 20;
        let init = init_plan(
            &spec,
            vec![b"A=1".to_vec()],
            Path::new("/tmp/work/src"),
            true,
            None,
            &[],
        );
        assert_eq!(init.argv, [b"make".to_vec(), b"check".to_vec()]);
        assert_eq!(init.workdir, b"/tmp/work/src");
        match &init.root {
            RootSpec::Host { tmpfs, binds } => {
                assert!(tmpfs.iter().any(|t| t == "/tmp"));
                assert_eq!(binds, &["/tmp/work/src".to_string()]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(init.ring, "/dev/ubda", "the ring is the only disk");
        let image = init_plan(&spec, vec![], Path::new("/"), false, None, &[]);
        assert!(matches!(image.root, RootSpec::Image { ref device } if device == "/dev/ubda"));
        assert_eq!(
            image.ring, "/dev/ubdc",
            "after the overlay and the init disk"
        );

        let facts = |interactive| BootFacts {
            umid: "umlctl-abc".into(),
            rundir: "/run/user/0/umlctl/umlctl-abc".into(),
            root: BootRoot::InitDisk { index: 1 },
            init: "/init".into(),
            disks: vec![
                Disk {
                    file: "/img.cow".into(),
                    backing: None,
                    read_only: false,
                },
                Disk {
                    file: "/initroot.ext4".into(),
                    backing: None,
                    read_only: true,
                },
                Disk {
                    file: "/run/ring".into(),
                    backing: None,
                    read_only: false,
                },
            ],
            interactive,
            nics: vec![],
            trace: false,
            seccomp: None,
            skip_initcalls: vec![RAID6_SELECT],
            ncpus: Some(2),
        };
        // Without a terminal only the control and status lines: the
        // command's stdio goes through the ring.
        let pipes = boot_plan(&spec, facts(false));
        assert_eq!(
            pipes.lines,
            [
                (CONTROL_LINE, Chan::Fd(6), Chan::Null),
                (STATUS_LINE, Chan::Null, Chan::Fd(7))
            ]
        );
        let args = pipes.to_args().unwrap().join(" ");
        for want in [
            "mem=512M",
            "umid=umlctl-abc",
            "init=/init",
            "ubd0=/img.cow",
            "ubd1r=/initroot.ext4",
            "ubd2=/run/ring",
            "initcall_blacklist=raid6_select_algo",
            "ncpus=2",
        ] {
            assert!(args.contains(want), "{want:?} not in {args}");
        }
        let term = boot_plan(&spec, facts(true));
        assert!(term.lines.contains(&(STDIN_LINE, Chan::Fd(3), Chan::Fd(3))));
        assert_eq!(term.lines.len(), 3, "the terminal, control and status");
    }
}
